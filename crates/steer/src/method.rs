//! Choosing a steering method by name: the plain model, the handcrafted baselines, or a trained
//! Learn-to-Steer classifier — each a [`SteerLoss`] for the one steering loop.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use l2s_eval::Relation;
use l2s_models::flux::FluxPipeline;
use l2s_models::weights::{component_files, Variant};
use l2s_models::StableDiffusion;

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
    fingerprint(&sd.folder.join("unet"), "unet")
}

/// The same fingerprint of a FLUX model's transformer (`flux-…`): of the single file it was
/// loaded from, if any, else of the folder's `transformer/`.
pub fn flux_model_id(flux: &FluxPipeline) -> Result<String> {
    match &flux.transformer_file {
        // The file holds no config; the one it was built with (the folder's or a preset) counts.
        Some(file) => fingerprint_files(
            format!("{:?}", flux.transformer.config()).as_bytes(),
            std::slice::from_ref(file),
            "flux",
        ),
        None => fingerprint(&flux.folder.join("transformer"), "flux"),
    }
}

fn fingerprint(dir: &Path, prefix: &str) -> Result<String> {
    let cfg = dir.join("config.json");
    let config = std::fs::read(&cfg).with_context(|| format!("reading {}", cfg.display()))?;
    fingerprint_files(&config, &component_files(dir, &Variant::Auto)?, prefix)
}

fn fingerprint_files(config: &[u8], files: &[PathBuf], prefix: &str) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(config);
    // Only the first and last MiB of each weight file (plus its length): checkpoints are
    // gigabytes, and a fingerprint must not read them whole.
    const SPAN: u64 = 1 << 20;
    for file in files {
        let ctx = || format!("reading {}", file.display());
        let mut f = std::fs::File::open(file).with_context(ctx)?;
        let n = f.metadata().with_context(ctx)?.len();
        let mut head = Vec::new();
        (&mut f)
            .take(SPAN)
            .read_to_end(&mut head)
            .with_context(ctx)?;
        eat(&head);
        f.seek(SeekFrom::Start(n.saturating_sub(SPAN)))
            .with_context(ctx)?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).with_context(ctx)?;
        eat(&tail);
        eat(&n.to_le_bytes());
    }
    Ok(format!("{prefix}-{h:016x}"))
}

/// The model a method steers.
#[derive(Clone, Copy)]
pub enum SteerModel<'a> {
    Sd(&'a StableDiffusion),
    Flux(&'a FluxPipeline),
}

impl SteerModel<'_> {
    pub fn id(&self) -> Result<String> {
        match self {
            Self::Sd(sd) => model_id(sd),
            Self::Flux(flux) => flux_model_id(flux),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Self::Sd(sd) => &sd.device,
            Self::Flux(flux) => &flux.device,
        }
    }

    fn is_flux(&self) -> bool {
        matches!(self, Self::Flux(_))
    }

    /// The model and its map layout, for error messages.
    fn describe(&self, id: &str) -> String {
        match self {
            Self::Sd(_) => {
                format!("a Stable Diffusion UNet ({id}, maps from its cross-attention layers)")
            }
            Self::Flux(flux) => {
                let c = flux.transformer.config();
                format!(
                    "a FLUX transformer ({id}, ({} double + {} single blocks) × {} heads = {} maps per word)",
                    c.num_layers,
                    c.num_single_layers,
                    c.num_attention_heads,
                    (c.num_layers + c.num_single_layers) * c.num_attention_heads
                )
            }
        }
    }

    /// The paper's schedule for this model.
    fn paper(&self, steps: usize) -> SteerConfig {
        match self {
            Self::Sd(_) => SteerConfig::paper(steps),
            Self::Flux(flux) => crate::flux::paper_config(flux, steps),
        }
    }
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
fn check_family(
    path: &Path,
    meta: &CheckpointMeta,
    model: &SteerModel<'_>,
    id: &str,
) -> Result<()> {
    let flux = trained_on_flux(meta);
    if flux == model.is_flux() {
        return Ok(());
    }
    let family = if flux { "FLUX" } else { "Stable Diffusion" };
    let first = meta.layers.first().map(|l| l.name.as_str()).unwrap_or("?");
    anyhow::bail!(
        "classifier {} was trained on {family} attention maps (model {}, {} maps per word from {} layers, first {first}) \
         and cannot steer {}: train a classifier on this model's maps (`l2s data build` + `l2s train` with this --model)",
        path.display(),
        meta.model,
        meta.num_maps,
        meta.layers.len(),
        model.describe(id)
    )
}

impl Method {
    /// Builds the method for steering `sd` in runs of `steps` steps; the paper's schedule by default.
    pub fn load(spec: &MethodSpec, sd: &StableDiffusion, steps: usize) -> Result<Self> {
        Self::load_for(spec, SteerModel::Sd(sd), steps)
    }

    /// [`Self::load`] for either model family; a classifier must come from the same model.
    pub fn load_for(spec: &MethodSpec, model: SteerModel<'_>, steps: usize) -> Result<Self> {
        let all: Vec<String> = Relation::ALL.iter().map(|r| r.name().to_string()).collect();
        let paper = model.paper(steps);
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
                let id = model.id()?;
                let meta = read_checkpoint_meta(path)
                    .with_context(|| format!("classifier {}", path.display()))?;
                check_family(path, &meta, &model, &id)?;
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
                };
                Self {
                    name: classifier_name(path),
                    loss: Some(Box::new(loss)),
                    config: paper,
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
