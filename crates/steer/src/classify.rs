//! Classifying stored attention maps: the relation a classifier reads from each pair of maps.
//!
//! The maps file is a safetensors file with `maps` `(B, 2, C, S, S)` (float; f32 expected) — the
//! C maps of the subject word and of the object word for each of B samples — and `steps` `(B)`
//! (integer; i64 expected), the denoising step index each sample was recorded at (the raw step,
//! as the published classifier takes it). Other tensors in the file are ignored.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::classifier::{RelationClassifier, StepInput, WeightLayout};
use crate::train::{load_classifier, CheckpointError, CheckpointMeta};

/// The classifier's reading of one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyRow {
    /// One per class, in the checkpoint's relation order.
    pub logits: Vec<f32>,
    /// Softmax of the logits.
    pub probabilities: Vec<f32>,
    /// The most likely relation's name.
    pub relation: String,
}

/// Problems while classifying.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The maps file, or its tensors, do not fit (the message names the file).
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },
    #[error("classifying: {0}")]
    Tensor(#[from] candle_core::Error),
}

const EXPECTED: &str =
    "expected a safetensors file with `maps` (B, 2, C, S, S) f32 and `steps` (B) i64";

/// Samples per forward pass.
const BATCH: usize = 64;

/// Classifies every sample of a maps file with a classifier (a checkpoint folder from
/// `l2s train`, either of its files, or a published `.pth`), on the CPU in f32.
pub fn classify(
    classifier_path: &Path,
    maps_path: &Path,
) -> Result<Vec<ClassifyRow>, ClassifyError> {
    let device = Device::Cpu;
    let (model, meta) = load_classifier(classifier_path, None, None, &device, DType::F32)?;
    let (maps, steps) = read_maps(maps_path, &device)?;
    classify_tensors(&model, &meta, &maps, &steps).map_err(|e| match e {
        ClassifyError::Input { message, .. } => ClassifyError::Input {
            path: maps_path.to_path_buf(),
            message,
        },
        other => other,
    })
}

/// Reads `maps` (as f32) and `steps` (as i64) from a safetensors file, checking their ranks.
pub fn read_maps(path: &Path, device: &Device) -> Result<(Tensor, Vec<i64>), ClassifyError> {
    let bad = |message: String| ClassifyError::Input {
        path: path.to_path_buf(),
        message,
    };
    let mut tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| bad(format!("cannot read it ({e}); {EXPECTED}")))?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let found = format!("{names:?}");
    let (Some(maps), Some(steps)) = (tensors.remove("maps"), tensors.remove("steps")) else {
        return Err(bad(format!("it holds the tensors {found}; {EXPECTED}")));
    };
    if !maps.dtype().is_float() {
        return Err(bad(format!(
            "`maps` has dtype {:?}; {EXPECTED}",
            maps.dtype()
        )));
    }
    if !steps.dtype().is_int() {
        return Err(bad(format!(
            "`steps` has dtype {:?}; {EXPECTED}",
            steps.dtype()
        )));
    }
    let dims = maps.dims().to_vec();
    if dims.len() != 5 || dims[1] != 2 {
        return Err(bad(format!("`maps` has shape {dims:?}; {EXPECTED}")));
    }
    if steps.dims() != [dims[0]] {
        return Err(bad(format!(
            "`steps` has shape {:?} but `maps` holds {} samples; {EXPECTED}",
            steps.dims(),
            dims[0]
        )));
    }
    let maps = maps.to_dtype(DType::F32)?;
    let steps = steps.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    Ok((maps, steps))
}

/// Classifies maps `(B, 2, C, S, S)` recorded at denoising steps `steps` (B). The step goes to
/// the classifier as it expects it: as is for [`StepInput::Raw`], as the slot of the first
/// recorded step at or after it for [`StepInput::Slot`].
pub fn classify_tensors(
    model: &RelationClassifier,
    meta: &CheckpointMeta,
    maps: &Tensor,
    steps: &[i64],
) -> Result<Vec<ClassifyRow>, ClassifyError> {
    let input = |message: String| ClassifyError::Input {
        path: PathBuf::new(),
        message,
    };
    let cfg = model.config();
    let dims = maps.dims();
    let (layout_ok, wanted) = match model.architecture().layout {
        WeightLayout::L2s => (dims.get(2) == Some(&cfg.num_maps), cfg.num_maps.to_string()),
        WeightLayout::Torch => (
            dims.get(2)
                .is_some_and(|&c| (1..=cfg.num_maps).contains(&c)),
            format!("at most {}", cfg.num_maps),
        ),
    };
    if dims.len() != 5 || dims[1] != 2 || !layout_ok || dims[3..] != [cfg.map_size, cfg.map_size] {
        return Err(input(format!(
            "`maps` has shape {dims:?}; this classifier reads (B, 2, C, {s}, {s}) with C {wanted} maps per word",
            s = cfg.map_size
        )));
    }
    if steps.len() != dims[0] {
        return Err(input(format!(
            "{} steps for {} samples",
            steps.len(),
            dims[0]
        )));
    }
    let mut inputs = Vec::with_capacity(steps.len());
    for &s in steps {
        let Ok(step) = usize::try_from(s) else {
            return Err(input(format!("step {s} is negative")));
        };
        inputs.push(match model.architecture().step_input {
            StepInput::Raw if step < cfg.num_steps => step as u32,
            StepInput::Raw => {
                return Err(input(format!(
                    "step {s} is beyond the classifier's steps 0 to {}",
                    cfg.num_steps - 1
                )))
            }
            StepInput::Slot => meta.step_index_for(step) as u32,
        });
    }
    let mut rows = Vec::with_capacity(steps.len());
    let device = maps.device();
    for start in (0..steps.len()).step_by(BATCH) {
        let n = BATCH.min(steps.len() - start);
        let x = maps.narrow(0, start, n)?;
        let s = Tensor::new(&inputs[start..start + n], device)?;
        let logits = model.forward(&x, &s, false)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        for (l, p) in logits
            .to_vec2::<f32>()?
            .into_iter()
            .zip(probs.to_vec2::<f32>()?)
        {
            let best = l
                .iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > l[b] { i } else { b });
            rows.push(ClassifyRow {
                relation: meta.relations.get(best).cloned().unwrap_or_default(),
                logits: l,
                probabilities: p,
            });
        }
    }
    Ok(rows)
}
