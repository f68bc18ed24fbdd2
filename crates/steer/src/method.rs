//! Choosing a steering method by name: the plain model, the handcrafted baselines, or a trained
//! Learn-to-Steer classifier — each a [`SteerLoss`] for the one steering loop.

use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use candle_core::DType;
use l2s_eval::Relation;
use l2s_models::Pipeline;

use crate::losses::{AttendExciteLoss, CentroidLoss, LearnedLoss};
use crate::steering::{SteerConfig, SteerLoss, UpdateRule};
use crate::train::{load_classifier, read_checkpoint_meta, CheckpointMeta};

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

/// A classifier's own steering schedule, from `steering.json` beside its checkpoint: the settings
/// it was tuned with, used where the user names none.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct TunedSchedule {
    /// Sampling steps of the runs it was tuned on.
    #[serde(default)]
    pub sampling_steps: Option<usize>,
    pub steer: SteerConfig,
}

impl TunedSchedule {
    pub const FILE: &'static str = "steering.json";

    /// The schedule of the classifier at `path` (its folder, or a file in it), if it has one.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        let folder = if path.is_dir() {
            path
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        let file = folder.join(Self::FILE);
        if !file.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let tuned: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{\"sampling_steps\": N, \"steer\": {{steer_steps, max_iterations, step_size, update, stop_below}}}}",
                file.display()
            )
        })?;
        Ok(Some(tuned))
    }
}

/// A ready method: its loss (none for the plain model), the loop settings and its label space.
pub struct Method {
    pub name: String,
    pub loss: Option<Box<dyn SteerLoss>>,
    pub config: SteerConfig,
    relations: Vec<String>,
}

/// Whether a classifier read FLUX maps: its model id says so, or else its layers are the
/// transformer's top-level blocks (SD's UNet layers sit inside down/mid/up blocks).
fn trained_on_flux(meta: &CheckpointMeta) -> bool {
    if meta.model.starts_with("flux-") || meta.model.starts_with("unet-") {
        return meta.model.starts_with("flux-");
    }
    let flux_layer = |n: &str| {
        n.starts_with("transformer_blocks.") || n.starts_with("single_transformer_blocks.")
    };
    meta.layers.first().is_some_and(|l| flux_layer(&l.name))
}

/// Refuses a classifier trained on the other model family, naming both and their map layouts.
fn check_family(path: &Path, meta: &CheckpointMeta, model: &Pipeline, id: &str) -> Result<()> {
    if meta.model.is_empty() || meta.model == crate::dataset::UNNAMED_MODEL {
        return check_published(path, meta, model, id);
    }
    let flux = trained_on_flux(meta);
    if flux == (model.map_family() == "flux") {
        return Ok(());
    }
    let family = if flux { "FLUX" } else { "Stable Diffusion" };
    let first = meta.layers.first().map(|l| l.name.as_str()).unwrap_or("?");
    crate::error::bail!(
        "classifier {} was trained on {family} attention maps (model {}, {} maps per word from {} layers, first {first}) \
         and cannot steer {}: train a classifier on this model's maps (`l2s data build` + `l2s train` with this --model)",
        path.display(),
        meta.model,
        meta.num_maps,
        meta.layers.len(),
        model.describe_maps(id)
    )
}

/// A published checkpoint names no model: its map size and map count must fit the model's.
fn check_published(path: &Path, meta: &CheckpointMeta, model: &Pipeline, id: &str) -> Result<()> {
    let grid = model.attention_grid();
    let count = model.maps_per_word()?;
    let what = || {
        format!(
            "classifier {} (a published checkpoint reading at most {} maps per word)",
            path.display(),
            meta.num_maps
        )
    };
    if let Some(orig) = meta.orig_map_size.filter(|&o| o != grid) {
        crate::error::bail!(
            "{} was trained on {orig}×{orig} attention maps, but {} gives its largest maps at {grid}×{grid} ({count} maps per word): it belongs to another model",
            what(),
            model.describe_maps(id)
        );
    }
    if count > meta.num_maps {
        crate::error::bail!(
            "{} cannot read {}: that model gives {count} maps per word",
            what(),
            model.describe_maps(id)
        );
    }
    Ok(())
}

impl Method {
    /// Builds the method for steering `model` in runs of `steps` steps; the paper's schedule by
    /// default. A classifier must come from the same model.
    pub fn load(spec: &MethodSpec, model: &Pipeline, steps: usize) -> Result<Self> {
        let all: Vec<String> = Relation::ALL.iter().map(|r| r.name().to_string()).collect();
        let paper = SteerConfig::paper_for(model, steps);
        Ok(match spec {
            MethodSpec::None => Self {
                name: "base".into(),
                loss: None,
                config: paper,
                relations: all,
            },
            MethodSpec::Centroid => Self {
                name: "centroid".into(),
                loss: Some(Box::new(CentroidLoss { margin: 0.1 })),
                // Per-element RMS step of 0.1, two iterations per steered step: the calibration that
                // moved a small model's spatial accuracy without breaking its objects.
                config: SteerConfig {
                    step_size: 0.1,
                    update: UpdateRule::Normalized,
                    max_iterations: 2,
                    ..paper
                },
                relations: all,
            },
            MethodSpec::AttendExcite => Self {
                name: "attend-excite".into(),
                loss: Some(Box::new(AttendExciteLoss::new(steps, model.device())?)),
                // A&E's 20·sqrt(linspace(1, 0.5)) schedule shape, on RMS-normalised gradients.
                config: SteerConfig {
                    step_size: 0.1,
                    update: UpdateRule::Normalized,
                    ..paper
                },
                relations: all,
            },
            MethodSpec::Classifier(path) => {
                let id = model.fingerprint()?;
                let meta = read_checkpoint_meta(path)
                    .with_context(|| format!("classifier {}", path.display()))?;
                check_family(path, &meta, model, &id)?;
                let (classifier, meta) =
                    load_classifier(path, Some(&id), None, model.device(), DType::F32)
                        .with_context(|| format!("classifier {}", path.display()))?;
                let build_steps = meta.num_inference_steps.unwrap_or(steps);
                let relations = meta.relations.clone();
                let loss = LearnedLoss {
                    classifier,
                    step_indices: meta.step_indices.clone(),
                    build_steps,
                    run_steps: steps,
                    relations: relations.clone(),
                    map_layout: meta.map_layout,
                };
                let config = TunedSchedule::read(path)?.map_or(paper, |t| t.steer);
                Self {
                    name: classifier_name(path),
                    loss: Some(Box::new(loss)),
                    config,
                    relations,
                }
            }
        })
    }

    /// Class index of a relation in the method's label space.
    pub fn label(&self, relation: Relation) -> Result<usize> {
        self.relations
            .iter()
            .position(|r| r == relation.name())
            .with_context(|| {
                format!(
                    "method {} does not know the relation `{}`",
                    self.name,
                    relation.name()
                )
            })
    }

    pub fn loss(&self) -> Option<&dyn SteerLoss> {
        self.loss.as_deref()
    }
}

fn classifier_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("classifier");
    format!("l2s:{stem}")
}
