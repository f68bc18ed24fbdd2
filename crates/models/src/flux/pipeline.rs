//! A FLUX.1 pipeline folder in diffusers' layout, loaded as one value, and its sampling loop.
//!
//! ```text
//! model_index.json  scheduler/  text_encoder/ (CLIP-L)  text_encoder_2/ (T5)  tokenizer/
//! tokenizer_2/  transformer/  vae/ (16-channel AutoencoderKL with shift_factor)
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

use super::packing::{packed_grid, unpack_latents};
use super::transformer::{FluxConfig, FluxInputs, FluxTransformer2DModel};
use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::config::read_config;
use crate::error::{ModelError, Result as ModelResult};
use crate::observer::AttentionObserver;
use crate::pipeline::LoadOptions;
use crate::t5::{T5Config, T5EncoderModel, T5Tokenizer};
use crate::tokenizer::ClipTokenizer;
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::var_builder;

/// The text conditioning of one or more prompts.
#[derive(Clone, Debug)]
pub struct FluxConditioning {
    /// T5 last hidden state (batch, max_sequence_length, joint_attention_dim).
    pub text: Tensor,
    /// CLIP pooled output (batch, pooled_projection_dim).
    pub pooled: Tensor,
    /// T5 ids per prompt (text tokens, end token, padding).
    pub t5_ids: Vec<Vec<u32>>,
    /// T5 tokens dropped per prompt by truncation (a warning was emitted for each).
    pub truncated: Vec<usize>,
}

pub struct FluxPipeline {
    pub folder: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub tokenizer_2: T5Tokenizer,
    pub text_encoder_2: T5EncoderModel,
    pub transformer: FluxTransformer2DModel,
    /// The single-file checkpoint the transformer came from, when not the folder's `transformer/`.
    pub transformer_file: Option<PathBuf>,
    pub vae: AutoencoderKL,
    /// `scheduler/scheduler_config.json` (a FlowMatchEulerDiscreteScheduler config).
    pub scheduler_config: PathBuf,
    pub dtype: DType,
    pub device: Device,
}

fn component(folder: &Path, name: &str, expected: &str) -> ModelResult<PathBuf> {
    let dir = folder.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(ModelError::MissingComponent {
            folder: folder.to_path_buf(),
            component: name.into(),
            expected: expected.into(),
        })
    }
}

fn build<T>(dir: &Path, r: Result<T>) -> ModelResult<T> {
    r.map_err(|e| ModelError::Build {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The T5 prompt length: 512 tokens for dev and schnell alike — diffusers' `FluxPipeline` default
/// and the length the published Learn-to-Steer classifiers were trained and steered with (the
/// reference schnell sampler's 256 would shift nothing in the maps but changes the text padding
/// the joint attention sees, so the same prompt would give other images).
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// The transformer's config: the folder's `transformer/config.json`, else (a single file holds
/// none) the published FLUX.1-dev or schnell config, told apart by the guidance embedding.
fn single_file_config(file: &Path, folder_cfg: &Path) -> ModelResult<FluxConfig> {
    if folder_cfg.exists() {
        return FluxConfig::from_file(folder_cfg);
    }
    let dev = super::bfl::has_guidance_embedding(file)?;
    let (name, cfg) = if dev {
        ("FLUX.1-dev", FluxConfig::flux1_dev())
    } else {
        ("FLUX.1-schnell", FluxConfig::flux1_schnell())
    };
    tracing::info!(
        "{}: no {} to read, so using the {name} config (the file {} guidance-embedding tensors)",
        file.display(),
        folder_cfg.display(),
        if dev { "has" } else { "has no" }
    );
    Ok(cfg)
}

/// `model_index.json` classes of FLUX.1 text-to-image folders (Fill, Kontext, Redux and the
/// control pipelines take other inputs and are refused by name).
pub const FLUX_PIPELINE_CLASSES: [&str; 2] = ["FluxPipeline", "FluxImg2ImgPipeline"];

impl FluxPipeline {
    pub fn load(folder: &Path, opts: &LoadOptions) -> ModelResult<Self> {
        Self::load_with_transformer(folder, opts, None)
    }

    /// [`Self::load`], with the transformer read from `transformer_file` when given: one
    /// safetensors file in BFL or diffusers naming (see [`super::bfl`]), configured by the folder's
    /// `transformer/config.json` if it has one, else by the FLUX.1-dev or schnell preset. The
    /// folder then needs no `transformer/` weights.
    pub fn load_with_transformer(
        folder: &Path,
        opts: &LoadOptions,
        transformer_file: Option<&Path>,
    ) -> ModelResult<Self> {
        let index_path = folder.join("model_index.json");
        if !index_path.exists() {
            return Err(ModelError::MissingComponent {
                folder: folder.to_path_buf(),
                component: "model_index.json".into(),
                expected: "a diffusers FluxPipeline folder".into(),
            });
        }
        let index: Value = read_config(&index_path, "a diffusers model_index.json")?;
        if let Some(class) = index.get("_class_name").and_then(|c| c.as_str()) {
            if !FLUX_PIPELINE_CLASSES.contains(&class) {
                return Err(ModelError::Unsupported {
                    path: index_path,
                    field: "_class_name".into(),
                    value: class.into(),
                    supported: format!(
                        "{} (FLUX.1-dev, FLUX.1-schnell)",
                        FLUX_PIPELINE_CLASSES.join(", ")
                    ),
                });
            }
        }
        let tok_dir = component(
            folder,
            "tokenizer",
            "the CLIP tokenizer (vocab.json + merges.txt or tokenizer.json)",
        )?;
        let te_dir = component(
            folder,
            "text_encoder",
            "the CLIP text encoder (CLIPTextModel: config.json + safetensors)",
        )?;
        let tok2_dir = component(folder, "tokenizer_2", "the T5 tokenizer (tokenizer.json)")?;
        let te2_dir = component(
            folder,
            "text_encoder_2",
            "the T5 encoder (T5EncoderModel: config.json + safetensors)",
        )?;
        let tr_dir = match transformer_file {
            Some(_) => folder.join("transformer"),
            None => component(
                folder,
                "transformer",
                "a FluxTransformer2DModel (config.json + safetensors)",
            )?,
        };
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
        let te2_cfg_path = te2_dir.join("config.json");
        if !te2_cfg_path.exists() {
            return Err(ModelError::MissingComponent {
                folder: folder.to_path_buf(),
                component: "text_encoder_2/config.json".into(),
                expected: "the T5 encoder's T5Config".into(),
            });
        }

        let tr_cfg_path = tr_dir.join("config.json");
        let (tr_cfg, transformer) = match transformer_file {
            Some(file) => {
                let cfg = single_file_config(file, &tr_cfg_path)?;
                let model = super::bfl::load_single_file(file, &cfg, opts.dtype, &opts.device)?;
                (cfg, model)
            }
            None => {
                let cfg = FluxConfig::from_file(&tr_cfg_path)?;
                let vb = var_builder(&tr_dir, &opts.variant, opts.dtype, &opts.device)?;
                let model = build(&tr_dir, FluxTransformer2DModel::new(&cfg, vb))?;
                (cfg, model)
            }
        };

        let tokenizer = ClipTokenizer::from_folder(&tok_dir)?;
        let te_cfg = ClipTextConfig::from_file(&te_dir.join("config.json"))?;
        let vb = var_builder(&te_dir, &opts.variant, opts.dtype, &opts.device)?;
        let text_encoder = build(&te_dir, ClipTextModel::new(&te_cfg, vb))?;

        let tokenizer_2 = T5Tokenizer::from_folder(&tok2_dir, DEFAULT_MAX_SEQUENCE_LENGTH)?;
        let t5_cfg = T5Config::from_file(&te2_cfg_path)?;
        let vb = var_builder(&te2_dir, &opts.variant, opts.dtype, &opts.device)?;
        let text_encoder_2 = build(&te2_dir, T5EncoderModel::new(&t5_cfg, vb))?;

        let vae_cfg = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let vb = var_builder(&vae_dir, &opts.variant, opts.dtype, &opts.device)?;
        let vae = build(&vae_dir, AutoencoderKL::new(&vae_cfg, vb))?;

        let mismatch =
            |what: &str, value: usize, want: usize, path: &Path| ModelError::Unsupported {
                path: path.to_path_buf(),
                field: what.into(),
                value: value.to_string(),
                supported: format!("{want}, to match the other components"),
            };
        // Size mismatches point at the config that set the size.
        let tr_cfg_path = match transformer_file {
            Some(file) if !tr_cfg_path.exists() => file.to_path_buf(),
            _ => tr_cfg_path,
        };
        if tr_cfg.joint_attention_dim != t5_cfg.d_model {
            return Err(mismatch(
                "joint_attention_dim",
                tr_cfg.joint_attention_dim,
                t5_cfg.d_model,
                &tr_cfg_path,
            ));
        }
        if tr_cfg.pooled_projection_dim != te_cfg.hidden_size {
            return Err(mismatch(
                "pooled_projection_dim",
                tr_cfg.pooled_projection_dim,
                te_cfg.hidden_size,
                &tr_cfg_path,
            ));
        }
        if tr_cfg.in_channels != 4 * vae_cfg.latent_channels {
            return Err(mismatch(
                "in_channels",
                tr_cfg.in_channels,
                4 * vae_cfg.latent_channels,
                &tr_cfg_path,
            ));
        }
        Ok(Self {
            folder: folder.to_path_buf(),
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            transformer,
            transformer_file: transformer_file.map(Path::to_path_buf),
            vae,
            scheduler_config,
            dtype: opts.dtype,
            device: opts.device.clone(),
        })
    }

    /// T5 sequence length used by [`Self::encode_prompts`] (FluxPipeline's `max_sequence_length`).
    pub fn max_sequence_length(&self) -> usize {
        self.tokenizer_2.max_len()
    }

    pub fn set_max_sequence_length(&mut self, len: usize) {
        self.tokenizer_2.set_max_len(len);
    }

    pub fn encode_prompt(&self, prompt: &str) -> ModelResult<FluxConditioning> {
        self.encode_prompts(&[prompt])
    }

    /// T5 states and CLIP pooled vectors of the prompts, as FluxPipeline's `encode_prompt`.
    pub fn encode_prompts(&self, prompts: &[&str]) -> ModelResult<FluxConditioning> {
        let mut t5_ids = Vec::new();
        let mut truncated = Vec::new();
        let mut clip_ids = Vec::new();
        for p in prompts {
            let t5 = self.tokenizer_2.encode(p)?;
            truncated.push(t5.truncated);
            t5_ids.push(t5.ids);
            clip_ids.push(self.tokenizer.encode(p)?.ids);
        }
        let to_tensor = |rows: &[Vec<u32>]| -> Result<Tensor> {
            let n = rows.first().map_or(0, Vec::len);
            Tensor::from_vec(rows.concat(), (rows.len(), n), &self.device)
        };
        let text = self.text_encoder_2.forward(&to_tensor(&t5_ids)?)?;
        let pooled = self.text_encoder.forward(&to_tensor(&clip_ids)?)?.pooled;
        Ok(FluxConditioning {
            text,
            pooled,
            t5_ids,
            truncated,
        })
    }

    /// Pixels per latent cell along each side.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downsample_factor()
    }

    /// The packed latent grid for an image of `height`×`width` pixels.
    pub fn grid_for(&self, height: usize, width: usize) -> (usize, usize) {
        packed_grid(height, width, self.vae_scale_factor())
    }

    /// The transformer's velocity at σ for packed `latents` (one guidance value for the batch).
    pub fn velocity(
        &self,
        latents: &Tensor,
        grid: (usize, usize),
        cond: &FluxConditioning,
        sigma: f64,
        guidance: Option<f64>,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let b = latents.dim(0)?;
        // FluxPipeline passes (σ·1000 in f32) / 1000 in the latents' dtype.
        let t = (sigma as f32 * 1000.0) / 1000.0;
        let timestep = Tensor::full(t, b, latents.device())?.to_dtype(latents.dtype())?;
        let guidance = match guidance {
            Some(g) if self.transformer.config().guidance_embeds => {
                Some(Tensor::full(g as f32, b, latents.device())?)
            }
            _ => None,
        };
        let inputs = FluxInputs {
            latents,
            grid,
            text: &cond.text,
            pooled: &cond.pooled,
            timestep: &timestep,
            guidance: guidance.as_ref(),
        };
        self.transformer.forward(&inputs, observer)
    }

    /// Packed latents → image in roughly [-1, 1] (unpacked, unscaled by `scaling_factor`, shifted
    /// back by `shift_factor`, decoded).
    pub fn decode_packed(&self, latents: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        self.vae.decode_latents(&unpack_latents(latents, grid)?)
    }
}
