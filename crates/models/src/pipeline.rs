//! A Stable Diffusion model folder in diffusers' layout, loaded as one value.
//!
//! ```text
//! model_index.json  tokenizer/  text_encoder/  unet/  vae/  scheduler/
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::config::read_config;
use crate::error::{ModelError, Result};
use crate::space_to_depth::{SpaceToDepth, SpaceToDepthConfig};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{Autoencoder, AutoencoderKL, VaeConfig};
use crate::weights::{var_builder, Variant};

/// How to load weights.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    pub variant: Variant,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: Variant::Auto,
        }
    }
}

/// The sampling settings a model folder recommends when the user gives none.
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize)]
pub struct SamplingDefaults {
    pub steps: usize,
    pub guidance: f64,
}

impl SamplingDefaults {
    /// Stable Diffusion's usual settings (50 DDIM steps, guidance 7.5).
    pub const STABLE_DIFFUSION: Self = Self {
        steps: 50,
        guidance: 7.5,
    };

    /// Key in `model_index.json` (ours, ignored by diffusers) where a folder may name its own.
    pub const INDEX_KEY: &'static str = "_l2s_sampling";

    /// A folder's own defaults from its `model_index.json`, or `fallback`.
    pub fn from_index(index: &Value, index_path: &Path, fallback: Self) -> Result<Self> {
        match index.get(Self::INDEX_KEY) {
            None => Ok(fallback),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| ModelError::Unsupported {
                path: index_path.to_path_buf(),
                field: Self::INDEX_KEY.into(),
                value: v.to_string(),
                supported: format!("{{\"steps\": <integer>, \"guidance\": <number>}} ({e})"),
            }),
        }
    }
}

pub struct StableDiffusion {
    pub folder: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: Autoencoder,
    /// `scheduler/scheduler_config.json`, parsed by the sampler.
    pub scheduler_config: PathBuf,
    /// Steps and guidance to use when the user names none.
    pub sampling: SamplingDefaults,
    pub dtype: DType,
    pub device: Device,
}

/// Resolves a model argument: an existing folder, or a hub id (`org/name`) found in the local
/// Hugging Face cache (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`).
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    let direct = PathBuf::from(arg);
    if direct.is_dir() {
        return Ok(direct);
    }
    let looks_like_id =
        arg.split('/').count() == 2 && !arg.starts_with('.') && !arg.starts_with('/');
    if !looks_like_id {
        return Err(ModelError::io(&direct, "no such model folder"));
    }
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        })
        .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
    let repo = hub.join(format!("models--{}", arg.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    // Prefer the snapshot `refs/main` names; otherwise the only (or newest) one.
    let by_ref = std::fs::read_to_string(repo.join("refs/main"))
        .ok()
        .map(|r| snapshots.join(r.trim()));
    if let Some(p) = by_ref.filter(|p| p.is_dir()) {
        return Ok(p);
    }
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| {
                    (
                        e.metadata()
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH),
                        e.path(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        ModelError::io(
            &snapshots,
            format!("`{arg}` is neither a model folder nor a model in the local Hugging Face cache (nothing is downloaded; fetch it elsewhere and pass its folder)"),
        )
    })
}

fn component(folder: &Path, name: &str, expected: &str) -> Result<PathBuf> {
    let dir = folder.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(ModelError::MissingComponent {
            folder: folder.to_path_buf(),
            component: name.to_string(),
            expected: expected.to_string(),
        })
    }
}

/// `vae/`: an AutoencoderKL, or (by `_class_name`) the weightless space-to-depth map.
fn load_autoencoder(dir: &Path, opts: &LoadOptions) -> Result<Autoencoder> {
    let cfg_path = dir.join("config.json");
    let raw: Value = read_config(&cfg_path, "an autoencoder config")?;
    if raw.get("_class_name").and_then(|c| c.as_str()) == Some("SpaceToDepthAutoencoder") {
        return Ok(Autoencoder::SpaceToDepth(SpaceToDepth::new(
            SpaceToDepthConfig::from_file(&cfg_path)?,
        )));
    }
    let cfg = VaeConfig::from_file(&cfg_path)?;
    let vb = var_builder(dir, &opts.variant, opts.dtype, &opts.device)?;
    let vae = AutoencoderKL::new(&cfg, vb).map_err(|e| ModelError::Build {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(Autoencoder::Kl(vae))
}

/// `model_index.json` classes of SD1.x/2.x folders: one CLIP text encoder, a UNet over 4 latent
/// channels, an AutoencoderKL. SDXL (two text encoders, added conditioning), SD3 (a transformer)
/// and the rest have other components and are refused by name.
pub const SD_PIPELINE_CLASSES: [&str; 2] =
    ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"];

impl StableDiffusion {
    pub fn load(folder: &Path, opts: &LoadOptions) -> Result<Self> {
        let index_path = folder.join("model_index.json");
        if !index_path.exists() {
            return Err(ModelError::MissingComponent {
                folder: folder.to_path_buf(),
                component: "model_index.json".into(),
                expected: "a diffusers pipeline folder".into(),
            });
        }
        let index: Value = read_config(&index_path, "a diffusers model_index.json")?;
        if let Some(class) = index.get("_class_name").and_then(|c| c.as_str()) {
            if !SD_PIPELINE_CLASSES.contains(&class) {
                return Err(ModelError::Unsupported {
                    path: index_path,
                    field: "_class_name".into(),
                    value: class.into(),
                    supported: format!(
                        "{} (SD1.x, SD2.x; SDXL, SD3 and other pipelines are not supported)",
                        SD_PIPELINE_CLASSES.join(", ")
                    ),
                });
            }
        }
        let sampling =
            SamplingDefaults::from_index(&index, &index_path, SamplingDefaults::STABLE_DIFFUSION)?;
        let tok_dir = component(
            folder,
            "tokenizer",
            "a CLIP tokenizer (vocab.json + merges.txt or tokenizer.json)",
        )?;
        let te_dir = component(
            folder,
            "text_encoder",
            "a CLIPTextModel (config.json + safetensors)",
        )?;
        let unet_dir = component(
            folder,
            "unet",
            "a UNet2DConditionModel (config.json + safetensors)",
        )?;
        let vae_dir = component(
            folder,
            "vae",
            "an AutoencoderKL (config.json + safetensors)",
        )?;
        let sched_dir = component(folder, "scheduler", "scheduler_config.json")?;
        let scheduler_config = sched_dir.join("scheduler_config.json");
        if !scheduler_config.exists() {
            return Err(ModelError::io(
                &scheduler_config,
                "missing scheduler config",
            ));
        }

        // Read now, so that a scheduler this sampler cannot run is named before any work.
        l2s_diffusion::DdimConfig::from_file(&scheduler_config)?;
        let tokenizer = ClipTokenizer::from_folder(&tok_dir)?;

        let te_cfg = ClipTextConfig::from_file(&te_dir.join("config.json"))?;
        let vb = var_builder(&te_dir, &opts.variant, opts.dtype, &opts.device)?;
        let text_encoder = ClipTextModel::new(&te_cfg, vb).map_err(|e| ModelError::Build {
            dir: te_dir.clone(),
            reason: e.to_string(),
        })?;

        let unet_cfg = UNetConfig::from_file(&unet_dir.join("config.json"))?;
        let vb = var_builder(&unet_dir, &opts.variant, opts.dtype, &opts.device)?;
        let unet = UNet2DConditionModel::new(&unet_cfg, vb).map_err(|e| ModelError::Build {
            dir: unet_dir.clone(),
            reason: e.to_string(),
        })?;

        let vae = load_autoencoder(&vae_dir, opts)?;

        let context = unet_cfg
            .cross_attention_dim
            .per_block(1)
            .map(|v| v[0])
            .unwrap_or(0);
        if context != te_cfg.hidden_size {
            return Err(ModelError::Unsupported {
                path: unet_dir.join("config.json"),
                field: "cross_attention_dim".into(),
                value: context.to_string(),
                supported: format!("the text encoder's hidden_size {}", te_cfg.hidden_size),
            });
        }
        Ok(Self {
            folder: folder.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            sampling,
            dtype: opts.dtype,
            device: opts.device.clone(),
        })
    }
}

#[cfg(test)]
mod sampling_defaults_tests {
    use super::*;

    #[test]
    fn a_folder_names_its_own_defaults_or_gets_the_fallback() {
        let path = Path::new("m/model_index.json");
        let own = serde_json::json!({"_class_name": "StableDiffusionPipeline", "_l2s_sampling": {"steps": 20, "guidance": 1.5}});
        let got =
            SamplingDefaults::from_index(&own, path, SamplingDefaults::STABLE_DIFFUSION).unwrap();
        assert_eq!(
            got,
            SamplingDefaults {
                steps: 20,
                guidance: 1.5
            }
        );
        let plain = serde_json::json!({"_class_name": "StableDiffusionPipeline"});
        let got =
            SamplingDefaults::from_index(&plain, path, SamplingDefaults::STABLE_DIFFUSION).unwrap();
        assert_eq!(got, SamplingDefaults::STABLE_DIFFUSION);
    }

    #[test]
    fn malformed_defaults_name_the_file_and_key() {
        let path = Path::new("m/model_index.json");
        let bad = serde_json::json!({"_l2s_sampling": {"steps": "many"}});
        let err = SamplingDefaults::from_index(&bad, path, SamplingDefaults::STABLE_DIFFUSION)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model_index.json") && err.contains("_l2s_sampling"),
            "{err}"
        );
    }
}
