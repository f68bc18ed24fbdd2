//! Text → image for every pipeline [`l2s_models::Pipeline`] loads (SD1.x/2.x, FLUX.1): the
//! requests and results users work with, on top of the one sampling loop.
//!
//! - [`generate`]: seeded noise → the model's sampler, with a step hook (steering, recording)
//!   → VAE → image; the same request gives the same bytes.
//! - [`invert`] / [`reconstruct`]: image → noise (fixed-point DDIM inversion or RF-inversion,
//!   as the model's sampler calls for) and back, with PSNR.
//! - [`generate_with_attention`]: per-word cross-attention maps at chosen steps, averaged over
//!   layers and heads on a common grid; [`attention_sheet`] draws them.
//! - [`word_tokens`]: a word → its token positions in the model's tokenizer.
//! - [`convert`]: tensors ↔ 8-bit images exactly as diffusers converts them; [`png`]: PNG files
//!   with text metadata, written atomically.
//!
//! ```text
//! let model = Pipeline::load(&resolve_model("model-dir")?, &LoadOptions::default(), None)?;
//! let mut req = GenerateRequest::new("a dog to the right of a teddy bear");
//! req.seed = 7;
//! let out = generate(&model, &req, &mut NoHook, &mut |_| {})?;
//! ```

pub mod attention;
pub mod convert;
pub mod error;
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
pub use error::{GenerateError, Result};
pub use generate::{
    generate, generate_observed, read_latents, write_tensors, GenerateRequest, Generated,
};
pub use invert::{
    invert, invert_latents, read_rgb_image, reconstruct, Inversion, InvertRequest, Reconstruction,
};
pub use png::{generation_metadata, read_png_text, write_atomic, write_png};
pub use prompt::{prompt_words, word_tokens, WordTokens};
pub use sample::{ObserveSteps, Observers, Phase, Progress, StepObserver, WithProgress};
pub use sheet::{attention_sheet, side_by_side};
