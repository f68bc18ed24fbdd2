//! Training the relation classifier, and its checkpoints.
//!
//! [`train`] reads a dataset folder ([`train_on`] an opened [`Dataset`], possibly several
//! folders read as one), splits it by image (both prompts of an image, and all their
//! recorded steps, stay on one side), trains with AdamW, halves the learning rate when the
//! validation loss stalls, stops early, keeps the weights of the best validation epoch, and
//! measures them on the test split (accuracy per relation and a confusion matrix).
//!
//! A checkpoint is a pair of files in one folder: `classifier.safetensors` (weights) and
//! `classifier.json` ([`CheckpointMeta`]: the classifier config, the relation names, the step
//! indices, the map layout, the model the maps came from, and the metrics).
//! [`load_classifier`] refuses a checkpoint made for another model or another map layout. It
//! also loads the PyTorch checkpoints (`.pth`) of the published Learn-to-Steer training, read
//! without executing code, as [`Architecture::authors`] classifiers.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use l2s_files::write_atomic;
use l2s_models::weights::safetensors_bytes;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::maps::MapLayout;

use crate::augment::{Augment, Augmenter};
use crate::classifier::{
    Architecture, ClassifierConfig, EncoderConfig, Preset, RelationClassifier, StepInjection,
    StepInput,
};
use crate::dataset::{Dataset, DatasetError, DatasetInfo, Examples, LayerInfo, ManifestEntry};
use crate::seeded::SeededVarMap;

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
    /// How the classifier computes: the published one by default. Settings recorded before
    /// the architecture was a choice trained [`Architecture::legacy`].
    #[serde(default = "Architecture::legacy")]
    pub architecture: Architecture,
}

impl TrainConfig {
    /// Stable Diffusion settings, the published ones: lr 1e-4, 150 epochs at most.
    pub fn sd() -> Self {
        Self {
            preset: Preset::Sd,
            classifier: None,
            max_epochs: 150,
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
            architecture: Architecture::authors(),
        }
    }

    /// FLUX settings, the published ones: lr 5e-5, 200 epochs at most.
    pub fn flux() -> Self {
        Self {
            preset: Preset::Flux,
            lr: 5e-5,
            max_epochs: 200,
            ..Self::sd()
        }
    }

    pub fn for_preset(preset: Preset) -> Self {
        match preset {
            Preset::Sd => Self::sd(),
            Preset::Flux => Self::flux(),
        }
    }

    /// The classifier config for a dataset. The step embedding has a row per recorded step
    /// ([`StepInput::Slot`]), or, as the published classifiers have, a row per step of the
    /// sampling schedule ([`StepInput::Raw`]: the build's step count, at least the last recorded
    /// step + 1).
    pub fn classifier_config(&self, info: &DatasetInfo) -> ClassifierConfig {
        let mut c = self
            .classifier
            .clone()
            .unwrap_or_else(|| ClassifierConfig::preset(self.preset, 1, 1, 1));
        c.num_maps = info.num_maps;
        c.map_size = info.map_size;
        c.num_steps = match self.architecture.step_input {
            StepInput::Slot => info.step_indices.len(),
            StepInput::Raw => {
                let schedule = info.num_inference_steps().unwrap_or(0);
                let last = info.step_indices.last().map_or(0, |&s| s + 1);
                schedule.max(last)
            }
        };
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
    #[error("{}: not a relation classifier checkpoint: {message}; expected a torch.save dict with model_state_dict, rel_name_to_idx, input_channels, config and training_config, as the published Learn-to-Steer training writes", path.display())]
    NotAClassifier { path: PathBuf, message: String },
    /// The PyTorch file could not be read (its message names the file).
    #[error(transparent)]
    Torch(Box<l2s_torch_pickle::Error>),
    /// Writing a checkpoint file failed (the message names it).
    #[error(transparent)]
    Write(#[from] l2s_files::WriteError),
}

impl From<l2s_torch_pickle::Error> for CheckpointError {
    fn from(e: l2s_torch_pickle::Error) -> Self {
        Self::Torch(Box::new(e))
    }
}

/// Positions (into the manifest) of each split's samples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitPositions {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

/// Splits manifest entries by `image_id`: the distinct images are shuffled with `seed` and cut
/// by the fractions, so every entry of one image lands in the same split. With at least three
/// images, validation and (when its fraction is positive) test get at least one image each.
pub fn split_by_image(
    entries: &[ManifestEntry],
    fractions: SplitFractions,
    seed: u64,
) -> SplitPositions {
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
    let mut split = SplitPositions::default();
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
pub fn evaluate_classifier(
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
        let step_input = model.architecture().step_input;
        let (maps, steps, labels) = data.batch(chunk, model.dtype(), device, step_input)?;
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
    arch: &Architecture,
    varmap: &VarMap,
    device: &Device,
) -> candle_core::Result<RelationClassifier> {
    RelationClassifier::with_architecture(
        cfg,
        arch,
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
    // Seeded initialisation and dropout: the same data and settings train the same classifier.
    let varmap = VarMap::new();
    let init = SeededVarMap::new(&varmap, cfg.seed ^ 0x1a17_5eed);
    let arch = &cfg.architecture;
    let model = RelationClassifier::with_architecture(
        model_cfg,
        arch,
        VarBuilder::from_backend(Box::new(init), DType::F32, device.clone()),
    )?;
    model.reseed_dropout(cfg.seed ^ 0xd209_0a75);
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
            let (maps, steps, _) = train.batch(chunk, DType::F32, device, arch.step_input)?;
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
        let ev = evaluate_classifier(
            &frozen(model_cfg, arch, &varmap, device)?,
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
    /// Denoising step indices the classifier was trained on. A [`StepInput::Slot`] classifier's
    /// step input `i` means `step_indices[i]`; a [`StepInput::Raw`] one takes the step itself
    /// (see [`RelationClassifier::step_input`]).
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
    /// Side of the largest attention maps before resizing, as a published checkpoint records it
    /// (`training_config.orig_map_size`): what ties a foreign checkpoint to a model family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_map_size: Option<usize>,
    /// How the model's maps become the classifier's channels; steering records them the same
    /// way. Checkpoints written before it was recorded read [`MapLayout::Ours`].
    #[serde(default)]
    pub map_layout: MapLayout,
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

/// The examples of each split, as [`train_on`] trains on them.
#[derive(Debug, Clone)]
pub struct SplitExamples {
    pub train: Examples,
    pub val: Examples,
    pub test: Examples,
}

/// Splits a dataset by image ([`split_by_image`] with the config's fractions and seed) and loads
/// each split (maps in f16 with `half_storage`).
pub fn split_examples(ds: &Dataset, cfg: &TrainConfig) -> Result<SplitExamples, TrainError> {
    let split = split_by_image(ds.entries(), cfg.split, cfg.seed);
    let storage = if cfg.half_storage {
        DType::F16
    } else {
        DType::F32
    };
    Ok(SplitExamples {
        train: ds.load(&split.train, storage)?,
        val: ds.load(&split.val, storage)?,
        test: ds.load(&split.test, storage)?,
    })
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
    cfg.validate()?;
    let ds = Dataset::open(dataset_dir)?;
    train_on(&ds, out_dir, cfg, device, progress)
}

/// [`train`] on an opened dataset: one folder, or several parts of one build read as one
/// ([`Dataset::open_many`]), which trains exactly as their [`merge`](crate::dataset::merge)
/// would.
pub fn train_on(
    ds: &Dataset,
    out_dir: &Path,
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<TrainReport, TrainError> {
    let started = Instant::now();
    cfg.validate()?;
    let info = ds.info().clone();
    if ds.is_empty() {
        let dirs: Vec<String> = ds.dirs().iter().map(|d| d.display().to_string()).collect();
        return Err(TrainError::Config(format!(
            "{} holds no samples",
            dirs.join(" + ")
        )));
    }
    let SplitExamples {
        train: train_ex,
        val: val_ex,
        test: test_ex,
    } = split_examples(ds, cfg)?;
    tracing::info!(
        train = train_ex.len(),
        val = val_ex.len(),
        test = test_ex.len(),
        "examples loaded"
    );
    let model_cfg = cfg.classifier_config(&info);
    let map_layout = info.map_layout().map_err(TrainError::Config)?;
    let fitted = fit(
        &model_cfg,
        cfg,
        &train_ex,
        &val_ex,
        &info.relations,
        device,
        progress,
    )?;
    let best = frozen(&model_cfg, &cfg.architecture, &fitted.varmap, device)?;
    let test = if test_ex.is_empty() {
        None
    } else {
        Some(evaluate_classifier(
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
        num_inference_steps: info.num_inference_steps(),
        // Imported published data names no model; its attention resolution ties it to one.
        orig_map_size: info
            .extra
            .get("orig_map_size")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize),
        map_layout,
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
    save_checkpoint_with_architecture(out_dir, &fitted.varmap, &meta, &cfg.architecture)?;
    Ok(TrainReport {
        checkpoint: out_dir.to_path_buf(),
        meta,
        history: fitted.history,
    })
}

/// Writes `classifier.safetensors` then `classifier.json` into `dir` (created if needed), each
/// atomically, for an [`Architecture::legacy`] classifier (what [`train`] builds).
pub fn save_checkpoint(
    dir: &Path,
    varmap: &VarMap,
    meta: &CheckpointMeta,
) -> Result<(), CheckpointError> {
    save_checkpoint_with_architecture(dir, varmap, meta, &Architecture::legacy())
}

/// [`save_checkpoint`] for a classifier of any architecture; `classifier.json` records it as
/// `config.architecture`.
pub fn save_checkpoint_with_architecture(
    dir: &Path,
    varmap: &VarMap,
    meta: &CheckpointMeta,
    arch: &Architecture,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let tensors = weights(varmap, false).map_err(|source| CheckpointError::Weights {
        path: weights_path.clone(),
        source,
    })?;
    let bytes = safetensors_bytes(&tensors).map_err(|source| CheckpointError::Weights {
        path: weights_path.clone(),
        source,
    })?;
    write_atomic(&weights_path, &bytes)?;
    let mut json = serde_json::to_value(meta).expect("checkpoint metadata serialises");
    json["config"]["architecture"] = serde_json::to_value(arch).expect("architecture serialises");
    let text = serde_json::to_string_pretty(&json).expect("checkpoint metadata serialises");
    Ok(write_atomic(&dir.join(META_FILE), text.as_bytes())?)
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

/// Whether `path` is a PyTorch checkpoint (`torch.save` output, such as the published
/// classifiers): a `.pth`/`.pt` file, or any file that is a zip archive.
pub fn is_torch_checkpoint(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pth" | "pt")
    ) {
        return true;
    }
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && &head == b"PK\x03\x04"
}

/// `config.architecture` of `classifier.json`.
#[derive(Deserialize)]
struct RecordedArchitecture {
    config: RecordedConfig,
}

#[derive(Deserialize)]
struct RecordedConfig {
    #[serde(default)]
    architecture: Option<Architecture>,
}

/// Reads a checkpoint's metadata and architecture: a `classifier.json` (its folder or either
/// file of the pair; without `config.architecture` it is [`Architecture::legacy`]), or a
/// PyTorch `.pth` of the published training code.
pub fn read_checkpoint(path: &Path) -> Result<(CheckpointMeta, Architecture), CheckpointError> {
    if is_torch_checkpoint(path) {
        let file = l2s_torch_pickle::TorchFile::open(path)?;
        return describe(path, file.root());
    }
    let (_, meta_path) = checkpoint_paths(path);
    let text = std::fs::read_to_string(&meta_path).map_err(|source| CheckpointError::Io {
        path: meta_path.clone(),
        source,
    })?;
    parse_checkpoint_meta(&text, &meta_path)
}

/// Parses and checks a `classifier.json`'s text; `meta_path` names it in errors.
pub fn parse_checkpoint_meta(
    text: &str,
    meta_path: &Path,
) -> Result<(CheckpointMeta, Architecture), CheckpointError> {
    let meta_path = meta_path.to_path_buf();
    let json_err = |e: serde_json::Error| CheckpointError::Json {
        path: meta_path.clone(),
        message: e.to_string(),
    };
    let meta: CheckpointMeta = serde_json::from_str(text).map_err(json_err)?;
    let arch = serde_json::from_str::<RecordedArchitecture>(text)
        .map_err(json_err)?
        .config
        .architecture
        .unwrap_or_else(Architecture::legacy);
    let c = &meta.config;
    let steps_fit = match arch.step_input {
        StepInput::Slot => c.num_steps == meta.step_indices.len(),
        StepInput::Raw => meta.step_indices.iter().all(|&s| s < c.num_steps),
    };
    if c.num_maps != meta.num_maps
        || c.map_size != meta.map_size
        || !steps_fit
        || c.classes != meta.relations.len()
    {
        return Err(CheckpointError::Json {
            path: meta_path,
            message:
                "the classifier config disagrees with num_maps, map_size, step_indices or relations"
                    .into(),
        });
    }
    Ok((meta, arch))
}

/// Reads a checkpoint's metadata (see [`read_checkpoint`]).
pub fn read_checkpoint_meta(path: &Path) -> Result<CheckpointMeta, CheckpointError> {
    read_checkpoint(path).map(|(meta, _)| meta)
}

/// Loads a frozen classifier from a checkpoint (its folder or either file, or a PyTorch `.pth`
/// of the published training code), refusing one trained for another model (`expected_model`)
/// or another number of maps per word (`expected_num_maps`). Weights are loaded in `dtype`
/// onto `device`.
///
/// A `.pth` does not name the model its maps came from, so `expected_model` is not checked for
/// one; its classifier reads up to `input_channels` maps per word.
pub fn load_classifier(
    path: &Path,
    expected_model: Option<&str>,
    expected_num_maps: Option<usize>,
    device: &Device,
    dtype: DType,
) -> Result<(RelationClassifier, CheckpointMeta), CheckpointError> {
    if is_torch_checkpoint(path) {
        return load_torch_classifier(path, expected_num_maps, device, dtype);
    }
    let (weights_path, meta_path) = checkpoint_paths(path);
    let (meta, arch) = read_checkpoint(path)?;
    // A classifier trained on imported published data names no model (checked by map count
    // and size instead, as a published checkpoint is).
    let unnamed = meta.model.is_empty() || meta.model == crate::dataset::UNNAMED_MODEL;
    if let Some(expected) = expected_model.filter(|_| !unnamed) {
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
    let weights = std::fs::read(&weights_path).map_err(|source| CheckpointError::Io {
        path: weights_path.clone(),
        source,
    })?;
    let model = classifier_from_weights(&meta, &arch, &weights, &weights_path, device, dtype)?;
    Ok((model, meta))
}

/// Builds the classifier a checked `classifier.json` describes from the bytes of its
/// `classifier.safetensors`; `weights_path` names them in errors.
pub fn classifier_from_weights(
    meta: &CheckpointMeta,
    arch: &Architecture,
    weights: &[u8],
    weights_path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<RelationClassifier, CheckpointError> {
    let wrap = |source| CheckpointError::Weights {
        path: weights_path.to_path_buf(),
        source,
    };
    let tensors = candle_core::safetensors::load_buffer(weights, device).map_err(wrap)?;
    RelationClassifier::with_architecture(
        &meta.config,
        arch,
        VarBuilder::from_tensors(tensors, dtype, device),
    )
    .map_err(wrap)
}

// ---------------------------------------------------------------------------------------------
// Checkpoints of the published training code: `torch.save({'model_state_dict', 'rel_name_to_idx',
// 'idx_to_rel_name', 'input_channels', 'config', 'training_config'})`.

/// `input_channels` when a checkpoint lacks it (57 FLUX blocks × 24 heads), as the published
/// loader assumes.
const DEFAULT_INPUT_CHANNELS: usize = 57 * 24;

/// Widths of the published head's MLP (fixed in its code, not in its config).
const PUBLISHED_MLP: [usize; 2] = [256, 128];

/// Reads the published config dicts, naming the key path in every complaint.
struct ConfigReader<'a> {
    path: &'a Path,
    value: &'a l2s_torch_pickle::Value,
    at: String,
}

impl<'a> ConfigReader<'a> {
    fn bad(&self, message: String) -> CheckpointError {
        CheckpointError::NotAClassifier {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn get(&self, key: &str) -> Option<&'a l2s_torch_pickle::Value> {
        self.value
            .get(key)
            .filter(|v| !matches!(v, l2s_torch_pickle::Value::None))
    }

    fn need(&self, key: &str, what: &str) -> Result<&'a l2s_torch_pickle::Value, CheckpointError> {
        self.get(key)
            .ok_or_else(|| self.bad(format!("{}.{key} is missing (expected {what})", self.at)))
    }

    fn wrong(&self, key: &str, v: &l2s_torch_pickle::Value, what: &str) -> CheckpointError {
        self.bad(format!(
            "{}.{key} is a {} (expected {what})",
            self.at,
            v.type_name()
        ))
    }

    fn sub(&self, key: &str) -> Result<ConfigReader<'a>, CheckpointError> {
        let v = self.need(key, "a dict")?;
        if v.as_dict().is_none() {
            return Err(self.wrong(key, v, "a dict"));
        }
        Ok(ConfigReader {
            path: self.path,
            value: v,
            at: format!("{}.{key}", self.at),
        })
    }

    fn usize(&self, key: &str) -> Result<usize, CheckpointError> {
        let what = "a non-negative int";
        let v = self.need(key, what)?;
        match v.as_i64() {
            Some(i) if i >= 0 => Ok(i as usize),
            _ => Err(self.wrong(key, v, what)),
        }
    }

    fn f64_or(&self, key: &str, default: Option<f64>) -> Result<f64, CheckpointError> {
        let what = "a number";
        match (self.get(key), default) {
            (None, Some(d)) => Ok(d),
            (None, None) => {
                Err(self.bad(format!("{}.{key} is missing (expected {what})", self.at)))
            }
            (Some(v), _) => v.as_f64().ok_or_else(|| self.wrong(key, v, what)),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, CheckpointError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.wrong(key, v, "a bool")),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "a str")),
        }
    }

    fn encoder(&self) -> Result<EncoderConfig, CheckpointError> {
        Ok(EncoderConfig {
            layers: self.usize("num_layers")?,
            heads: self.usize("nhead")?,
            ff: self.usize("dim_feedforward")?,
            dropout: 0.0,
        })
    }
}

/// Our name for a published relation name ("to the left of" → "left of"); names that are no
/// spatial relation ("is") stay as they are.
fn canonical_relation(name: &str) -> String {
    l2s_eval::Relation::parse(name)
        .map(|r| r.name().to_string())
        .unwrap_or_else(|_| name.to_string())
}

fn describe(
    path: &Path,
    root: &l2s_torch_pickle::Value,
) -> Result<(CheckpointMeta, Architecture), CheckpointError> {
    use l2s_torch_pickle::Value;
    let bad = |message: String| CheckpointError::NotAClassifier {
        path: path.to_path_buf(),
        message,
    };
    if root.is_state_dict() {
        let d = root.as_dict().unwrap_or_default();
        let first = d.first().and_then(|(k, _)| k.as_str()).unwrap_or("?");
        return Err(bad(format!(
            "it holds a bare state dict of {} tensors (first {first:?}), not a classifier with its config",
            d.len()
        )));
    }
    if root.as_dict().is_none() {
        return Err(bad(format!("it holds a {}", root.type_name())));
    }
    let top = ConfigReader {
        path,
        value: root,
        at: "checkpoint".into(),
    };
    let config = top.sub("config")?;
    match root.get("model_state_dict") {
        Some(v) if v.is_state_dict() => {}
        Some(v) => return Err(top.wrong("model_state_dict", v, "a dict of names to tensors")),
        None => return Err(bad("it has no model_state_dict".into())),
    }

    // Class names in label order.
    let rels = top.sub("rel_name_to_idx")?;
    let entries = rels.value.as_dict().unwrap_or_default();
    let mut relations: Vec<Option<String>> = vec![None; entries.len()];
    for (k, v) in entries {
        let (Some(name), Some(i)) = (k.as_str(), v.as_i64()) else {
            return Err(bad(format!(
                "checkpoint.rel_name_to_idx maps a {} to a {} (expected names to ints)",
                k.type_name(),
                v.type_name()
            )));
        };
        let slot = usize::try_from(i)
            .ok()
            .and_then(|i| relations.get_mut(i))
            .filter(|s| s.is_none());
        let Some(slot) = slot else {
            return Err(bad(format!(
                "checkpoint.rel_name_to_idx gives {name:?} the index {i}; expected each of 0..{} once",
                entries.len()
            )));
        };
        *slot = Some(name.to_string());
    }
    let published: Vec<String> = relations
        .into_iter()
        .map(|r| r.unwrap_or_default())
        .collect();
    if let Some(Value::Dict(idx)) = root.get("idx_to_rel_name") {
        for (k, v) in idx {
            let agrees = k
                .as_i64()
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| published.get(i))
                .is_some_and(|n| Some(n.as_str()) == v.as_str());
            if !agrees {
                return Err(bad(format!(
                    "checkpoint.idx_to_rel_name ({k:?} → {v:?}) disagrees with rel_name_to_idx"
                )));
            }
        }
    }
    let relations: Vec<String> = published.iter().map(|n| canonical_relation(n)).collect();

    let num_maps = match root.get("input_channels") {
        None | Some(Value::None) => DEFAULT_INPUT_CHANNELS,
        Some(_) => top.usize("input_channels")?,
    };
    if let Some(kind) = config.str_opt("architecture")? {
        if kind != "attention" {
            return Err(bad(format!(
                "config.architecture is {kind:?}; only the \"attention\" classifier is supported"
            )));
        }
    }
    let num_timesteps = config.usize("num_timesteps")?;
    let map_size = config.usize("map_size")?;
    let d_model = config.usize("d_model")?;

    let ex = config.sub("extractor")?;
    if ex.bool_or("use_mean", false)? {
        return Err(bad(
            "config.extractor.use_mean is true (maps averaged instead of encoded); only the attention extractor is supported".into(),
        ));
    }
    let mut object = ex.encoder()?;
    object.dropout = ex.f64_or("dropout", Some(0.1))? as f32;
    let pool_heads = ex.usize("layer_attn_nheads")?;
    let ts = ex.sub("timestep_embedding")?;
    let object_step = if !ts.bool_or("enable", false)? {
        StepInjection::Off
    } else {
        match ts.str_opt("mode")? {
            Some("mid") => StepInjection::EveryLayer,
            Some("pre") => StepInjection::Input,
            other => {
                return Err(bad(format!(
                    "config.extractor.timestep_embedding.mode is {other:?}; expected \"mid\" or \"pre\""
                )))
            }
        }
    };

    let cl = config.sub("classifier")?;
    if let Some(v) = cl.str_opt("fc_ver")? {
        if v != "v1" {
            return Err(bad(format!(
                "config.classifier.fc_ver is {v:?}; only \"v1\" is supported"
            )));
        }
    }
    let mut head = cl.encoder()?;
    let mlp_dropout = cl.f64_or("dropout", None)? as f32;
    head.dropout = mlp_dropout;
    let step_dim = cl.usize("timestep_embedding_dim")?;

    // The steps the classifier was trained on (raw step indices of a schedule of
    // `num_timesteps`); all of them when the checkpoint does not say.
    let orig_map_size = match root.get("training_config") {
        Some(Value::Dict(_)) => {
            let tc = top.sub("training_config")?;
            match tc.get("orig_map_size") {
                Some(_) => Some(tc.usize("orig_map_size")?),
                None => None,
            }
        }
        _ => None,
    };
    let (step_indices, schedule) = match root.get("training_config") {
        None | Some(Value::None) => ((0..num_timesteps).collect(), num_timesteps),
        Some(_) => {
            let tc = top.sub("training_config")?;
            let steps = tc.need("timesteps", "a list of ints")?;
            let Some(list) = steps.as_seq() else {
                return Err(tc.wrong("timesteps", steps, "a list of ints"));
            };
            let mut out = Vec::with_capacity(list.len());
            for s in list {
                match s.as_i64() {
                    Some(s) if (0..num_timesteps as i64).contains(&s) => out.push(s as usize),
                    _ => {
                        return Err(bad(format!(
                            "checkpoint.training_config.timesteps holds {s:?}; expected steps below config.num_timesteps {num_timesteps}"
                        )))
                    }
                }
            }
            let schedule = match tc.get("num_timesteps") {
                Some(_) => tc.usize("num_timesteps")?,
                None => num_timesteps,
            };
            (out, schedule)
        }
    };

    let cfg = ClassifierConfig {
        num_maps,
        map_size,
        num_steps: num_timesteps,
        classes: relations.len(),
        d_model,
        object,
        head,
        step_dim,
        mlp_hidden: PUBLISHED_MLP.to_vec(),
        mlp_dropout,
        leaky_slope: 0.1,
    };
    let arch = Architecture {
        object_step,
        pool_heads: Some(pool_heads),
        ..Architecture::authors()
    };
    cfg.validate()
        .and_then(|_| arch.validate(&cfg))
        .map_err(|e| bad(e.to_string()))?;
    let meta = CheckpointMeta {
        config: cfg,
        relations,
        step_indices,
        map_size,
        num_maps,
        layers: Vec::new(),
        model: String::new(),
        dual_inversion: false,
        metrics: None,
        num_inference_steps: Some(schedule),
        orig_map_size,
        map_layout: MapLayout::Published,
    };
    Ok((meta, arch))
}

/// A weight source that records which names were read, so that weights the architecture does
/// not use are reported instead of ignored (as PyTorch's strict `load_state_dict` does).
struct RecordingBackend {
    tensors: HashMap<String, Tensor>,
    used: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl RecordingBackend {
    fn take(&self, name: &str) -> candle_core::Result<&Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("the state dict has no weight {name}"))
        })?;
        self.used
            .lock()
            .expect("name set lock")
            .insert(name.to_string());
        Ok(t)
    }
}

impl candle_nn::var_builder::SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.take(name)?;
        if t.shape() != &s {
            candle_core::bail!(
                "weight {name} has shape {:?}, the architecture expects {:?}",
                t.dims(),
                s.dims()
            )
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.take(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

fn load_torch_classifier(
    path: &Path,
    expected_num_maps: Option<usize>,
    device: &Device,
    dtype: DType,
) -> Result<(RelationClassifier, CheckpointMeta), CheckpointError> {
    let file = l2s_torch_pickle::TorchFile::open(path)?;
    torch_classifier_from(file, expected_num_maps, device, dtype)
}

/// Loads a published training code's classifier from a `.pth` file's bytes; `path` names them
/// in errors.
pub fn torch_classifier_from_bytes(
    path: &Path,
    bytes: Vec<u8>,
    device: &Device,
    dtype: DType,
) -> Result<(RelationClassifier, CheckpointMeta), CheckpointError> {
    let file = l2s_torch_pickle::TorchFile::from_bytes(path, bytes, Default::default())?;
    torch_classifier_from(file, None, device, dtype)
}

fn torch_classifier_from(
    mut file: l2s_torch_pickle::TorchFile,
    expected_num_maps: Option<usize>,
    device: &Device,
    dtype: DType,
) -> Result<(RelationClassifier, CheckpointMeta), CheckpointError> {
    let path = &file.path().to_path_buf();
    let (meta, arch) = describe(path, file.root())?;
    if let Some(expected) = expected_num_maps {
        if expected > meta.num_maps {
            return Err(CheckpointError::WrongLayout {
                path: path.to_path_buf(),
                trained: meta.num_maps,
                expected,
            });
        }
    }
    let state = file
        .root()
        .get("model_state_dict")
        .cloned()
        .unwrap_or(l2s_torch_pickle::Value::None);
    let tensors: HashMap<String, Tensor> =
        file.state_dict(&state, &Device::Cpu)?.into_iter().collect();
    let names: Vec<String> = tensors.keys().cloned().collect();
    let used = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let backend = RecordingBackend {
        tensors,
        used: used.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model =
        RelationClassifier::with_architecture(&meta.config, &arch, vb).map_err(|source| {
            CheckpointError::Weights {
                path: path.to_path_buf(),
                source,
            }
        })?;
    let used = used.lock().expect("name set lock");
    let mut unused: Vec<&String> = names.iter().filter(|n| !used.contains(*n)).collect();
    if !unused.is_empty() {
        unused.sort();
        let shown: Vec<&str> = unused.iter().take(5).map(|s| s.as_str()).collect();
        return Err(CheckpointError::NotAClassifier {
            path: path.to_path_buf(),
            message: format!(
                "its state dict holds {} weights the published architecture does not use ({}{})",
                unused.len(),
                shown.join(", "),
                if unused.len() > 5 { ", …" } else { "" }
            ),
        });
    }
    Ok((model, meta))
}
