//! The shapes model's architecture: the same config files as a Stable Diffusion folder, small.
//!
//! Latents are the image itself, rearranged by an exact 2× space-to-depth (32×32×3 pixels →
//! 16×16×12), so nothing is lost to an autoencoder and the UNet's cross-attention runs at 16×16
//! and 8×8 (plus 4×4 in the mid block) — the map size Learn-to-Steer reads.

use serde_json::{json, Value};

/// Image side in pixels.
pub const IMAGE_SIZE: usize = 32;
/// Space-to-depth factor.
pub const FACTOR: usize = 2;
pub const TEXT_HIDDEN: usize = 64;
/// Token positions of the text encoder (start and end tokens included). Every caption and prompt
/// of this world fits in 16; SD's 77 would leave the few object words among ~65 padding tokens,
/// and a text encoder trained from scratch then barely reaches the image (measured: the model
/// learned to ignore its captions).
pub const MAX_TOKENS: usize = 16;

pub fn text_encoder_config(vocab_size: usize) -> Value {
    json!({
        "_name_or_path": "learn-to-steer/shapes",
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 4 * TEXT_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
        "projection_dim": TEXT_HIDDEN,
        "torch_dtype": "float32"
    })
}

pub fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": IMAGE_SIZE / FACTOR,
        "in_channels": 3 * FACTOR * FACTOR,
        "out_channels": 3 * FACTOR * FACTOR,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": 1,
        "attention_head_dim": [2, 4, 4],
        "cross_attention_dim": TEXT_HIDDEN,
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "use_linear_projection": true,
        "upcast_attention": false,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu"
    })
}

pub fn vae_config() -> Value {
    json!({
        "_class_name": "SpaceToDepthAutoencoder",
        "factor": FACTOR,
        "in_channels": 3,
        "scaling_factor": 1.0
    })
}

/// Cosine noise levels and v-prediction: at 32×32 the linear schedule spends its last few hundred
/// steps on near-pure noise, and predicting noise there makes the image estimate explode (x₀ =
/// (x − σε)/α with α → 0); v keeps every noise level a well-scaled regression target.
pub fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": true,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": false,
        "steps_offset": 0,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing"
    })
}

pub fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_l2s_model": "shapes",
        // Measured on held-out prompts (BENCHMARKS.md): guidance above ~2 breaks the drawings of
        // this small model (both objects found in 0.62 of images at 2.0, 0.02 at 7.5; 0.885 at
        // 1.25, 0.855 at 1.5), and 50 steps draw them more often than 20.
        "_l2s_sampling": { "steps": 50, "guidance": 1.25 },
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["learn-to-steer", "SpaceToDepthAutoencoder"],
        "scheduler": ["diffusers", "DDIMScheduler"]
    })
}
