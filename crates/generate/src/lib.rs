//! Text → image with Stable Diffusion models: the one place that wires a model
//! ([`l2s_models::StableDiffusion`]) to the samplers ([`l2s_diffusion`]).
//!
//! - [`encode_prompt`]: prompt → conditioning (with truncation warnings); [`word_tokens`]: a
//!   word → its token positions.
//! - [`SdDenoiser`]: the UNet as a [`l2s_diffusion::Denoiser`], optionally reporting the
//!   text-conditioned rows of its cross-attention to an observer.
//! - [`generate`]: seeded noise → DDIM with classifier-free guidance → VAE → image; the same
//!   request gives the same bytes.
//! - [`invert`] / [`reconstruct`]: image → noise by (fixed-point) DDIM inversion and back, with
//!   PSNR.
//! - [`generate_with_attention`]: per-word cross-attention maps at chosen steps, averaged over
//!   layers and heads on a common grid; [`attention_sheet`] draws them.
//! - [`flux`]: the same for FLUX.1 (flow-matching Euler, RF-inversion, T5 word tokens).
//! - [`convert`]: tensors ↔ 8-bit images exactly as diffusers converts them; [`png`]: PNG files
//!   with text metadata, written atomically.
//!
//! ```text
//! let sd = StableDiffusion::load(&resolve_model("model-dir")?, &LoadOptions::default())?;
//! let mut req = GenerateRequest::new("a dog to the right of a teddy bear");
//! req.seed = 7;
//! let out = generate(&sd, &req, &mut |_| {})?;
//! write_png(Path::new("dog.png"), &out.image, &generation_metadata(&req, "model-dir", out.width, out.height, &[]))?;
//! ```

pub mod attention;
pub mod convert;
pub mod denoiser;
pub mod error;
pub mod flux;
pub mod generate;
pub mod invert;
pub mod png;
pub mod prompt;
pub mod sample;
pub mod sheet;

pub use attention::{
    default_map_steps, generate_with_attention, resize_maps, AttentionCollector, AttentionMaps,
    AttentionRequest, LayerMap,
};
pub use convert::{decoded_to_images, image_to_tensor, psnr, to_unit_nhwc};
pub use denoiser::{ObservedRows, SdDenoiser};
pub use error::{GenerateError, Result};
pub use generate::{
    generate, generate_observed, native_size, read_latents, resolve_size, size_multiple,
    write_tensors, GenerateRequest, Generated,
};
pub use invert::{
    invert, invert_latents, read_rgb_image, reconstruct, Inversion, InvertRequest, Reconstruction,
};
pub use png::{generation_metadata, read_png_text, write_atomic, write_png};
pub use prompt::{encode_prompt, prompt_words, word_tokens, PromptEmbedding, WordTokens};
pub use sample::{sample_latents, Conditioning, Phase, Progress, StepObserver};
pub use sheet::{attention_sheet, side_by_side};
