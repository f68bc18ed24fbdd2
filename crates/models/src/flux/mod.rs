//! FLUX.1 (dev and schnell): the MM-DiT transformer with text-only attention capture, latent
//! packing, the original (BFL) single-file naming, the pipeline folder loader, and optional
//! per-block gradient checkpointing for steering passes.
//!
//! ```text
//! let flux = FluxPipeline::load(folder, &LoadOptions::default())?;
//! let cond = flux.encode_prompt("a dog to the right of a teddy bear")?;
//! let v = flux.transformer.forward(&FluxInputs { latents, grid, text: &cond.text, pooled: &cond.pooled,
//!                                                timestep: &sigma, guidance: Some(&g) }, &mut store)?;
//! ```

pub mod attention;
pub mod bfl;
pub mod block;
mod checkpoint;
pub mod embeddings;
pub mod norm;
pub mod packing;
pub mod pipeline;
pub mod rope;
pub mod transformer;

pub use packing::{pack_latents, packed_grid, unpack_latents};
pub use pipeline::{FluxConditioning, FluxPipeline};
pub use transformer::{FluxConfig, FluxInputs, FluxTransformer2DModel};
