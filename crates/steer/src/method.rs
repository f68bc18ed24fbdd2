//! Choosing a steering method by name: the plain model, the handcrafted baselines, or a trained
//! Learn-to-Steer classifier — each a [`SteerLoss`] for the one steering loop.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use l2s_eval::Relation;
use l2s_models::weights::{component_files, Variant};
use l2s_models::StableDiffusion;

use crate::losses::{AttendExciteLoss, CentroidLoss, LearnedLoss};
use crate::steering::{SteerConfig, SteerLoss, UpdateRule};
use crate::train::load_classifier;

/// What `--steer` names.
#[derive(Clone, Debug, PartialEq)]
pub enum MethodSpec {
    None,
    Centroid,
    AttendExcite,
    Classifier(PathBuf),
}

impl MethodSpec {
    pub fn parse(spec: &str) -> Self {
        match spec {
            "" | "none" | "base" => Self::None,
            "centroid" => Self::Centroid,
            "attend-excite" | "attend-and-excite" => Self::AttendExcite,
            path => Self::Classifier(PathBuf::from(path)),
        }
    }
}

/// A ready method: its loss (none for the plain model), the loop settings and its label space.
pub struct Method {
    pub name: String,
    pub loss: Option<Box<dyn SteerLoss>>,
    pub config: SteerConfig,
    relations: Vec<String>,
}

/// A fingerprint of a model's UNet (config and a sample of its weight bytes): a classifier only
/// applies to the model whose attention it was trained on.
pub fn model_id(sd: &StableDiffusion) -> Result<String> {
    let unet = sd.folder.join("unet");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    let cfg = unet.join("config.json");
    eat(&std::fs::read(&cfg).with_context(|| format!("reading {}", cfg.display()))?);
    // Only the first and last MiB of each weight file (plus its length): SD checkpoints are
    // gigabytes, and a fingerprint must not read them whole.
    const SPAN: u64 = 1 << 20;
    for file in component_files(&unet, &Variant::Auto)? {
        let ctx = || format!("reading {}", file.display());
        let mut f = std::fs::File::open(&file).with_context(ctx)?;
        let n = f.metadata().with_context(ctx)?.len();
        let mut head = Vec::new();
        (&mut f).take(SPAN).read_to_end(&mut head).with_context(ctx)?;
        eat(&head);
        f.seek(SeekFrom::Start(n.saturating_sub(SPAN))).with_context(ctx)?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).with_context(ctx)?;
        eat(&tail);
        eat(&n.to_le_bytes());
    }
    Ok(format!("unet-{h:016x}"))
}

impl Method {
    /// Builds the method for steering `sd` in runs of `steps` steps; the paper's schedule by default.
    pub fn load(spec: &MethodSpec, sd: &StableDiffusion, steps: usize) -> Result<Self> {
        let all: Vec<String> = Relation::ALL.iter().map(|r| r.name().to_string()).collect();
        let paper = SteerConfig::paper(steps);
        Ok(match spec {
            MethodSpec::None => Self { name: "base".into(), loss: None, config: paper, relations: all },
            MethodSpec::Centroid => Self {
                name: "centroid".into(),
                loss: Some(Box::new(CentroidLoss { margin: 0.1 })),
                // Per-element RMS step of 0.1, two iterations per steered step: the calibration that
                // moved a small model's spatial accuracy without breaking its objects.
                config: SteerConfig { step_size: 0.1, update: UpdateRule::Normalized, max_iterations: 2, ..paper },
                relations: all,
            },
            MethodSpec::AttendExcite => Self {
                name: "attend-excite".into(),
                loss: Some(Box::new(AttendExciteLoss::new(steps, &sd.device)?)),
                // A&E's 20·sqrt(linspace(1, 0.5)) schedule shape, on RMS-normalised gradients.
                config: SteerConfig { step_size: 0.1, update: UpdateRule::Normalized, ..paper },
                relations: all,
            },
            MethodSpec::Classifier(path) => {
                let id = model_id(sd)?;
                let (classifier, meta) = load_classifier(path, Some(&id), None, &sd.device, DType::F32)
                    .with_context(|| format!("classifier {}", path.display()))?;
                let build_steps = meta.num_inference_steps.unwrap_or(steps);
                let relations = meta.relations.clone();
                let loss = LearnedLoss {
                    classifier,
                    step_indices: meta.step_indices.clone(),
                    build_steps,
                    run_steps: steps,
                    relations: relations.clone(),
                };
                Self { name: classifier_name(path), loss: Some(Box::new(loss)), config: paper, relations }
            }
        })
    }

    /// Class index of a relation in the method's label space.
    pub fn label(&self, relation: Relation) -> Result<usize> {
        self.relations
            .iter()
            .position(|r| r == relation.name())
            .with_context(|| format!("method {} does not know the relation `{}`", self.name, relation.name()))
    }

    pub fn loss(&self) -> Option<&dyn SteerLoss> {
        self.loss.as_deref()
    }
}

fn classifier_name(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("classifier");
    format!("l2s:{stem}")
}
