//! Stable Diffusion 1.x/2.x on candle: CLIP tokenizer and text encoder, UNet2DConditionModel and
//! AutoencoderKL, built from diffusers configs, loading diffusers folders, with every
//! cross-attention layer reporting to an [`observer::AttentionObserver`] and every path
//! differentiable back to the latent.

pub mod attention;
pub mod clip;
pub mod clip_vision;
pub mod config;
pub mod conv;
pub mod error;
pub mod flux;
pub mod model;
pub mod nn;
pub mod ops;
pub mod pipeline;
pub mod resnet;
pub mod seeded;
pub mod space_to_depth;
pub mod t5;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{ModelError, Result};
pub use flux::{FluxConditioning, FluxConfig, FluxInputs, FluxPipeline, FluxTransformer2DModel};
pub use l2s_diffusion::observer;
pub use model::{
    default_map_steps, Conditioning, InversionSettings, InvertedLatents, ModelCond, ModelDenoiser,
    Pipeline, METHOD_STEPS,
};
pub use observer::{AttentionObserver, AttentionSite, AttentionStore, NoObserver};
pub use pipeline::{resolve_model, LoadOptions, SamplingDefaults, StableDiffusion};
