//! Training the relation classifier, and its checkpoints.
//!
//! [`train`] reads a dataset folder, splits it by image (both prompts of an image, and all their
//! recorded steps, stay on one side), trains with AdamW, halves the learning rate when the
//! validation loss stalls, stops early, keeps the weights of the best validation epoch, and
//! measures them on the test split (accuracy per relation and a confusion matrix).
//!
//! A checkpoint is a pair of files in one folder: `classifier.safetensors` (weights) and
//! `classifier.json` ([`CheckpointMeta`]: the classifier config, the relation names, the step
//! indices, the map layout, the model the maps came from, and the metrics).
//! [`load_classifier`] refuses a checkpoint made for another model or another map layout.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::{Augment, Augmenter};
use crate::classifier::{ClassifierConfig, Preset, RelationClassifier};
use crate::dataset::{Dataset, DatasetError, DatasetInfo, Examples, LayerInfo, ManifestEntry};

pub const WEIGHTS_FILE: &str = "classifier.safetensors";
pub const META_FILE: &str = "classifier.json";

/// Fractions of the images that go to each split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitFractions {
    pub train: f64,
    pub val: f64,
    pub test: f64,
}

impl Default for SplitFractions {
    fn default() -> Self {
        Self {
            train: 0.8,
            val: 0.1,
            test: 0.1,
        }
    }
}

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Classifier sizes (and default learning rate).
    pub preset: Preset,
    /// Replaces the preset's sizes; `num_maps`, `map_size`, `num_steps` and `classes` are always
    /// taken from the dataset.
    pub classifier: Option<ClassifierConfig>,
    pub max_epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// ReduceLROnPlateau on the validation loss.
    pub plateau_factor: f64,
    pub plateau_patience: usize,
    pub min_lr: f64,
    /// Stop after this many epochs without a better validation loss.
    pub early_stop_patience: usize,
    pub split: SplitFractions,
    /// Seeds the split and the batch order.
    pub seed: u64,
    /// Keep the loaded maps in f16 (half the memory); batches are computed in f32.
    pub half_storage: bool,
    /// Label-preserving symmetries drawn per training example (none in the paper).
    #[serde(default)]
    pub augment: Augment,
}

impl TrainConfig {
    /// Stable Diffusion settings: lr 1e-4.
    pub fn sd() -> Self {
        Self {
            preset: Preset::Sd,
            classifier: None,
            max_epochs: 200,
            batch_size: 64,
            lr: 1e-4,
            weight_decay: 0.05,
            plateau_factor: 0.5,
            plateau_patience: 5,
            min_lr: 1e-6,
            early_stop_patience: 10,
            split: SplitFractions::default(),
            seed: 0,
            half_storage: false,
            augment: Augment::None,
        }
    }

    /// FLUX settings: lr 5e-5.
    pub fn flux() -> Self {
        Self {
            preset: Preset::Flux,
            lr: 5e-5,
            ..Self::sd()
        }
    }

    pub fn for_preset(preset: Preset) -> Self {
        match preset {
            Preset::Sd => Self::sd(),
            Preset::Flux => Self::flux(),
        }
    }

    /// The classifier config for a dataset.
    pub fn classifier_config(&self, info: &DatasetInfo) -> ClassifierConfig {
        let mut c = self
            .classifier
            .clone()
            .unwrap_or_else(|| ClassifierConfig::preset(self.preset, 1, 1, 1));
        c.num_maps = info.num_maps;
        c.map_size = info.map_size;
        c.num_steps = info.step_indices.len();
        c.classes = info.relations.len();
        c
    }

    fn validate(&self) -> Result<(), TrainError> {
        let f = &self.split;
        let bad = |m: String| Err(TrainError::Config(m));
        if self.batch_size == 0 {
            return bad("batch size must be positive".into());
        }
        if self.max_epochs == 0 {
            return bad("the number of epochs must be positive".into());
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !positive(self.lr) || !non_negative(self.min_lr) {
            return bad(format!(
                "learning rate {} / minimum {} must be positive",
                self.lr, self.min_lr
            ));
        }
        if !positive(self.plateau_factor) || self.plateau_factor >= 1.0 {
            return bad(format!(
                "plateau factor {} must be in (0, 1)",
                self.plateau_factor
            ));
        }
        if !positive(f.train) || !positive(f.val) || !non_negative(f.test) {
            return bad(format!(
                "split fractions {}/{}/{}: train and validation must be positive, test non-negative",
                f.train, f.val, f.test
            ));
        }
        Ok(())
    }
}

/// Problems while training or checking the training setup.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("training: {0}")]
    Config(String),
    #[error("training: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Problems with a checkpoint; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a classifier description: {message}", path.display())]
    Json { path: PathBuf, message: String },
    #[error("{}: this classifier was trained on attention maps of model {trained_for:?}, not {expected:?}; use a classifier trained for {expected:?}", path.display())]
    WrongModel {
        path: PathBuf,
        trained_for: String,
        expected: String,
    },
    #[error("{}: this classifier reads {trained} maps per word, but the model gives {expected} (a different set of attention layers or heads)", path.display())]
    WrongLayout {
        path: PathBuf,
        trained: usize,
        expected: usize,
    },
    #[error("{}: {source}", path.display())]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
}

/// Positions (into the manifest) of each split's samples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

/// Splits manifest entries by `image_id`: the distinct images are shuffled with `seed` and cut
/// by the fractions, so every entry of one image lands in the same split. With at least three
/// images, validation and (when its fraction is positive) test get at least one image each.
pub fn split_by_image(entries: &[ManifestEntry], fractions: SplitFractions, seed: u64) -> Split {
    let images: BTreeSet<&str> = entries.iter().map(|e| e.meta.image_id.as_str()).collect();
    let mut images: Vec<&str> = images.into_iter().collect();
    images.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n = images.len();
    let total = fractions.train + fractions.val + fractions.test;
    let mut n_val = ((fractions.val / total) * n as f64).round() as usize;
    let mut n_test = ((fractions.test / total) * n as f64).round() as usize;
    if n >= 3 {
        n_val = n_val.max(1);
        if fractions.test > 0.0 {
            n_test = n_test.max(1);
        }
    }
    while n_val + n_test >= n && n_val + n_test > 0 {
        if n_test > n_val || (n_test > 0 && n_val == 0) {
            n_test -= 1;
        } else {
            n_val -= 1;
        }
        if n == 0 {
            break;
        }
    }
    let side: HashMap<&str, u8> = images
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let s = if i < n_val {
                1
            } else if i < n_val + n_test {
                2
            } else {
                0
            };
            (*id, s)
        })
        .collect();
    let mut split = Split::default();
    for (i, e) in entries.iter().enumerate() {
        match side[e.meta.image_id.as_str()] {
            0 => split.train.push(i),
            1 => split.val.push(i),
            _ => split.test.push(i),
        }
    }
    split
}

/// PyTorch's ReduceLROnPlateau in "min" mode with a relative threshold of 1e-4.
#[derive(Debug, Clone)]
pub struct ReduceOnPlateau {
    pub factor: f64,
    pub patience: usize,
    pub min_lr: f64,
    best: f64,
    bad_epochs: usize,
}

impl ReduceOnPlateau {
    pub fn new(factor: f64, patience: usize, min_lr: f64) -> Self {
        Self {
            factor,
            patience,
            min_lr,
            best: f64::INFINITY,
            bad_epochs: 0,
        }
    }

    /// Records an epoch's metric; returns the learning rate to use next.
    pub fn step(&mut self, metric: f64, lr: f64) -> f64 {
        if metric < self.best * (1.0 - 1e-4) {
            self.best = metric;
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        if self.bad_epochs > self.patience {
            self.bad_epochs = 0;
            (lr * self.factor).max(self.min_lr)
        } else {
            lr
        }
    }
}

/// What happened in one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    pub max_epochs: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    /// The learning rate used in this epoch.
    pub lr: f64,
    /// A new best validation loss (these weights are kept).
    pub improved: bool,
    pub seconds: f64,
}

/// Accuracy on one true relation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelationAccuracy {
    pub relation: String,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
}

/// Loss, accuracy, per-relation accuracy and confusion matrix over a set of examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub examples: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub per_relation: Vec<RelationAccuracy>,
    /// `confusion[true][predicted]`, in the order of the relation names.
    pub confusion: Vec<Vec<usize>>,
}

/// Evaluates a classifier (eval mode, no dropout) on examples, in batches.
pub fn evaluate(
    model: &RelationClassifier,
    data: &Examples,
    batch_size: usize,
    relations: &[String],
    device: &Device,
) -> candle_core::Result<Evaluation> {
    let k = relations.len();
    let mut confusion = vec![vec![0usize; k]; k];
    let mut loss_sum = 0.0;
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (maps, steps, labels) = data.batch(chunk, model.dtype(), device)?;
        let logits = model.forward(&maps, &steps, false)?.detach();
        let loss = crate::classifier::cross_entropy(&logits, &labels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        loss_sum += loss * chunk.len() as f64;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        for (j, &p) in pred.iter().enumerate() {
            let t = data.label_list[chunk[j]] as usize;
            if t < k && (p as usize) < k {
                confusion[t][p as usize] += 1;
            }
        }
    }
    Ok(summarise(confusion, loss_sum, data.len(), relations))
}

fn summarise(
    confusion: Vec<Vec<usize>>,
    loss_sum: f64,
    n: usize,
    relations: &[String],
) -> Evaluation {
    let correct: usize = (0..relations.len()).map(|i| confusion[i][i]).sum();
    let per_relation = relations
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let total: usize = confusion[i].iter().sum();
            RelationAccuracy {
                relation: r.clone(),
                correct: confusion[i][i],
                total,
                accuracy: if total > 0 {
                    confusion[i][i] as f64 / total as f64
                } else {
                    0.0
                },
            }
        })
        .collect();
    Evaluation {
        examples: n,
        loss: if n > 0 { loss_sum / n as f64 } else { 0.0 },
        accuracy: if n > 0 {
            correct as f64 / n as f64
        } else {
            0.0
        },
        per_relation,
        confusion,
    }
}

/// The result of [`fit`]: the best weights and the run's history.
pub struct FitOutcome {
    /// Holds the weights of the best validation epoch.
    pub varmap: VarMap,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    pub best_val_accuracy: f64,
    pub epochs_run: usize,
    pub stopped_early: bool,
    pub history: Vec<EpochReport>,
}

fn weights(varmap: &VarMap, copy: bool) -> candle_core::Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().expect("varmap lock");
    data.iter()
        .map(|(k, v)| {
            let t = v.as_tensor().detach();
            Ok((k.clone(), if copy { t.copy()? } else { t }))
        })
        .collect()
}

/// A frozen classifier over the varmap's current weights (no autograd tracking).
fn frozen(
    cfg: &ClassifierConfig,
    varmap: &VarMap,
    device: &Device,
) -> candle_core::Result<RelationClassifier> {
    RelationClassifier::new(
        cfg,
        VarBuilder::from_tensors(weights(varmap, false)?, DType::F32, device),
    )
}

/// Trains a fresh classifier on `train`, selecting the epoch by the loss on `val`.
pub fn fit(
    model_cfg: &ClassifierConfig,
    cfg: &TrainConfig,
    train: &Examples,
    val: &Examples,
    relations: &[String],
    device: &Device,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<FitOutcome, TrainError> {
    cfg.validate()?;
    if train.is_empty() || val.is_empty() {
        return Err(TrainError::Config(format!(
            "the training split has {} examples and the validation split {}; both need some (add images or change the split fractions)",
            train.len(),
            val.len()
        )));
    }
    let varmap = VarMap::new();
    let model = RelationClassifier::new(
        model_cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    let params = ParamsAdamW {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let mut plateau = ReduceOnPlateau::new(cfg.plateau_factor, cfg.plateau_patience, cfg.min_lr);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x05ee_d0fb_a7c4);
    let (_, _, _, map_h, map_w) = train.maps.dims5()?;
    let augmenter =
        Augmenter::new(cfg.augment, relations, (map_h, map_w)).map_err(TrainError::Config)?;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut best: Option<(usize, f64, f64, HashMap<String, Tensor>)> = None;
    let mut since_best = 0usize;
    let mut history = Vec::new();
    let mut stopped_early = false;

    for epoch in 1..=cfg.max_epochs {
        let start = Instant::now();
        let lr = opt.learning_rate();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        for chunk in order.chunks(cfg.batch_size) {
            let (maps, steps, _) = train.batch(chunk, DType::F32, device)?;
            let stored: Vec<u32> = chunk.iter().map(|&i| train.label_list[i]).collect();
            let (maps, labels) = augmenter.apply(&maps, &stored, &mut rng)?;
            let logits = model.forward(&maps, &steps, true)?;
            let loss = crate::classifier::cross_entropy(&logits, &labels)?;
            opt.backward_step(&loss)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                return Err(TrainError::Config(format!(
                    "the training loss became {l} in epoch {epoch}"
                )));
            }
            loss_sum += l * chunk.len() as f64;
            let pred = logits.argmax(1)?.to_vec1::<u32>()?;
            let labels = labels.to_vec1::<u32>()?;
            correct += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
        }
        let ev = evaluate(
            &frozen(model_cfg, &varmap, device)?,
            val,
            cfg.batch_size,
            relations,
            device,
        )?;
        let improved = best.as_ref().is_none_or(|b| ev.loss < b.1);
        if improved {
            best = Some((epoch, ev.loss, ev.accuracy, weights(&varmap, true)?));
            since_best = 0;
        } else {
            since_best += 1;
        }
        opt.set_learning_rate(plateau.step(ev.loss, lr));
        let report = EpochReport {
            epoch,
            max_epochs: cfg.max_epochs,
            train_loss: loss_sum / train.len() as f64,
            train_accuracy: correct as f64 / train.len() as f64,
            val_loss: ev.loss,
            val_accuracy: ev.accuracy,
            lr,
            improved,
            seconds: start.elapsed().as_secs_f64(),
        };
        tracing::debug!(?report, "epoch");
        progress(&report);
        history.push(report);
        if since_best >= cfg.early_stop_patience {
            stopped_early = epoch < cfg.max_epochs;
            break;
        }
    }
    let (best_epoch, best_val_loss, best_val_accuracy, snapshot) =
        best.expect("at least one epoch ran");
    let mut varmap = varmap;
    varmap.set(snapshot.iter())?;
    Ok(FitOutcome {
        varmap,
        best_epoch,
        best_val_loss,
        best_val_accuracy,
        epochs_run: history.len(),
        stopped_early,
        history,
    })
}

/// Sizes of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSizes {
    pub images: usize,
    pub samples: usize,
    pub examples: usize,
}

/// What a training run measured; stored in the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
    pub best_epoch: usize,
    pub epochs_run: usize,
    pub stopped_early: bool,
    pub val_loss: f64,
    pub val_accuracy: f64,
    /// Best-epoch weights on the test split (`None` when the test split is empty).
    pub test: Option<Evaluation>,
    pub train_split: SplitSizes,
    pub val_split: SplitSizes,
    pub test_split: SplitSizes,
    pub seconds: f64,
    pub settings: TrainConfig,
}

/// `classifier.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub config: ClassifierConfig,
    /// Class names, in label order.
    pub relations: Vec<String>,
    /// Denoising step indices; the classifier's step index `i` means `step_indices[i]`.
    pub step_indices: Vec<usize>,
    pub map_size: usize,
    pub num_maps: usize,
    pub layers: Vec<LayerInfo>,
    /// The dataset's model id.
    pub model: String,
    pub dual_inversion: bool,
    pub metrics: Option<TrainMetrics>,
    /// Steps of the sampling runs the maps were recorded in (`step_indices` refer to them).
    #[serde(default)]
    pub num_inference_steps: Option<usize>,
}

impl CheckpointMeta {
    /// The classifier step index for a denoising step: the first recorded step at or above it
    /// (the last one past the end).
    pub fn step_index_for(&self, step: usize) -> usize {
        self.step_indices
            .iter()
            .position(|&s| s >= step)
            .unwrap_or(self.step_indices.len().saturating_sub(1))
    }
}

/// The outcome of [`train`].
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The folder holding `classifier.safetensors` and `classifier.json`.
    pub checkpoint: PathBuf,
    pub meta: CheckpointMeta,
    pub history: Vec<EpochReport>,
}

fn sizes(examples: &Examples) -> SplitSizes {
    let images: BTreeSet<&str> = examples.image_ids.iter().map(String::as_str).collect();
    let samples: BTreeSet<u64> = examples.samples.iter().copied().collect();
    SplitSizes {
        images: images.len(),
        samples: samples.len(),
        examples: examples.len(),
    }
}

/// Trains a classifier on the dataset in `dataset_dir` and writes the best checkpoint to `out_dir`.
/// `progress` is called after every epoch.
pub fn train(
    dataset_dir: &Path,
    out_dir: &Path,
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<TrainReport, TrainError> {
    let started = Instant::now();
    cfg.validate()?;
    let ds = Dataset::open(dataset_dir)?;
    let info = ds.info().clone();
    if ds.is_empty() {
        return Err(TrainError::Config(format!(
            "{} holds no samples",
            dataset_dir.display()
        )));
    }
    let split = split_by_image(ds.entries(), cfg.split, cfg.seed);
    let storage = if cfg.half_storage {
        DType::F16
    } else {
        DType::F32
    };
    let train_ex = ds.load(&split.train, storage)?;
    let val_ex = ds.load(&split.val, storage)?;
    let test_ex = ds.load(&split.test, storage)?;
    tracing::info!(
        train = train_ex.len(),
        val = val_ex.len(),
        test = test_ex.len(),
        "examples loaded"
    );
    let model_cfg = cfg.classifier_config(&info);
    let fitted = fit(
        &model_cfg,
        cfg,
        &train_ex,
        &val_ex,
        &info.relations,
        device,
        progress,
    )?;
    let best = frozen(&model_cfg, &fitted.varmap, device)?;
    let test = if test_ex.is_empty() {
        None
    } else {
        Some(evaluate(
            &best,
            &test_ex,
            cfg.batch_size,
            &info.relations,
            device,
        )?)
    };
    let meta = CheckpointMeta {
        config: model_cfg,
        relations: info.relations.clone(),
        step_indices: info.step_indices.clone(),
        map_size: info.map_size,
        num_maps: info.num_maps,
        layers: info.layers.clone(),
        model: info.model.clone(),
        dual_inversion: info.dual_inversion,
        num_inference_steps: info
            .extra
            .get("num_inference_steps")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize),
        metrics: Some(TrainMetrics {
            best_epoch: fitted.best_epoch,
            epochs_run: fitted.epochs_run,
            stopped_early: fitted.stopped_early,
            val_loss: fitted.best_val_loss,
            val_accuracy: fitted.best_val_accuracy,
            test,
            train_split: sizes(&train_ex),
            val_split: sizes(&val_ex),
            test_split: sizes(&test_ex),
            seconds: started.elapsed().as_secs_f64(),
            settings: cfg.clone(),
        }),
    };
    save_checkpoint(out_dir, &fitted.varmap, &meta)?;
    Ok(TrainReport {
        checkpoint: out_dir.to_path_buf(),
        meta,
        history: fitted.history,
    })
}

fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `classifier.safetensors` then `classifier.json` into `dir` (created if needed), each
/// atomically.
pub fn save_checkpoint(
    dir: &Path,
    varmap: &VarMap,
    meta: &CheckpointMeta,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    write_atomic(&weights_path, |tmp| {
        let tensors = weights(varmap, false).map_err(|source| CheckpointError::Weights {
            path: weights_path.clone(),
            source,
        })?;
        candle_core::safetensors::save(&tensors, tmp).map_err(|source| CheckpointError::Weights {
            path: weights_path.clone(),
            source,
        })
    })?;
    let meta_path = dir.join(META_FILE);
    let text = serde_json::to_string_pretty(meta).expect("checkpoint metadata serialises");
    write_atomic(&meta_path, |tmp| {
        std::fs::write(tmp, text).map_err(|source| CheckpointError::Io {
            path: tmp.to_path_buf(),
            source,
        })
    })
}

/// The (weights, metadata) paths of a checkpoint given as its folder or either of its files.
pub fn checkpoint_paths(path: &Path) -> (PathBuf, PathBuf) {
    if path.is_dir() {
        return (path.join(WEIGHTS_FILE), path.join(META_FILE));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => (path.with_extension("safetensors"), path.to_path_buf()),
        _ => (path.to_path_buf(), path.with_extension("json")),
    }
}

/// Reads a checkpoint's metadata.
pub fn read_checkpoint_meta(path: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let (_, meta_path) = checkpoint_paths(path);
    let text = std::fs::read_to_string(&meta_path).map_err(|source| CheckpointError::Io {
        path: meta_path.clone(),
        source,
    })?;
    let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| CheckpointError::Json {
        path: meta_path.clone(),
        message: e.to_string(),
    })?;
    let c = &meta.config;
    if c.num_maps != meta.num_maps
        || c.map_size != meta.map_size
        || c.num_steps != meta.step_indices.len()
        || c.classes != meta.relations.len()
    {
        return Err(CheckpointError::Json {
            path: meta_path,
            message:
                "the classifier config disagrees with num_maps, map_size, step_indices or relations"
                    .into(),
        });
    }
    Ok(meta)
}

/// Loads a frozen classifier from a checkpoint (its folder or either file), refusing one trained
/// for another model (`expected_model`) or another number of maps per word
/// (`expected_num_maps`). Weights are loaded in `dtype` onto `device`.
pub fn load_classifier(
    path: &Path,
    expected_model: Option<&str>,
    expected_num_maps: Option<usize>,
    device: &Device,
    dtype: DType,
) -> Result<(RelationClassifier, CheckpointMeta), CheckpointError> {
    let (weights_path, meta_path) = checkpoint_paths(path);
    let meta = read_checkpoint_meta(path)?;
    if let Some(expected) = expected_model {
        if meta.model != expected {
            return Err(CheckpointError::WrongModel {
                path: meta_path,
                trained_for: meta.model,
                expected: expected.to_string(),
            });
        }
    }
    if let Some(expected) = expected_num_maps {
        if meta.num_maps != expected {
            return Err(CheckpointError::WrongLayout {
                path: meta_path,
                trained: meta.num_maps,
                expected,
            });
        }
    }
    if !weights_path.is_file() {
        return Err(CheckpointError::Io {
            path: weights_path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the classifier weights are missing",
            ),
        });
    }
    let wrap = |source| CheckpointError::Weights {
        path: weights_path.clone(),
        source,
    };
    let tensors = candle_core::safetensors::load(&weights_path, device).map_err(wrap)?;
    let model = RelationClassifier::new(
        &meta.config,
        VarBuilder::from_tensors(tensors, dtype, device),
    )
    .map_err(wrap)?;
    Ok((model, meta))
}
