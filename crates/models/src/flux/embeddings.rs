//! The conditioning vector of FLUX: sinusoidal timestep (and guidance) embeddings through small
//! MLPs, plus the projected CLIP pooled text embedding (`time_text_embed`).

use crate::nn::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Width of the sinusoidal embedding fed to the timestep and guidance MLPs.
const SINUSOID_DIM: usize = 256;

/// [cos(t·f_i), sin(t·f_i)] with f_i = 10000^(−i/half), cosines first (`flip_sin_to_cos`),
/// computed in f32. `t`: (batch,) → (batch, dim).
pub fn timestep_sinusoid(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    // In f32 step by step like diffusers: guidance·1000 reaches thousands, where a last-bit
    // difference in a frequency moves the angle visibly.
    let log_max = -(10000f32.ln());
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_max * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

/// linear_1 → SiLU → linear_2 (`TimestepEmbedding`, `PixArtAlphaTextProjection`).
#[derive(Clone, Debug)]
pub struct MlpEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl MlpEmbedder {
    pub fn new(in_dim: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: crate::nn::linear(in_dim, dim, vb.pp("linear_1"))?,
            linear_2: crate::nn::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for MlpEmbedder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&crate::ops::silu::silu(&self.linear_1.forward(xs)?)?)
    }
}

/// `time_text_embed`: timestep MLP + (dev) guidance MLP + pooled-text MLP, summed.
#[derive(Clone, Debug)]
pub struct TimeTextEmbed {
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
}

impl TimeTextEmbed {
    pub fn new(dim: usize, pooled_dim: usize, guidance: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            timestep_embedder: MlpEmbedder::new(SINUSOID_DIM, dim, vb.pp("timestep_embedder"))?,
            guidance_embedder: if guidance {
                Some(MlpEmbedder::new(
                    SINUSOID_DIM,
                    dim,
                    vb.pp("guidance_embedder"),
                )?)
            } else {
                None
            },
            text_embedder: MlpEmbedder::new(pooled_dim, dim, vb.pp("text_embedder"))?,
        })
    }

    pub fn has_guidance(&self) -> bool {
        self.guidance_embedder.is_some()
    }

    /// `timestep` and `guidance` as the pipeline passes them (σ in [0, 1], guidance scale), shape
    /// (batch,); they are scaled by 1000 in the model dtype, as diffusers does.
    pub fn forward(
        &self,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let dtype = pooled.dtype();
        let embed = |mlp: &MlpEmbedder, v: &Tensor| -> Result<Tensor> {
            let scaled = (v.to_dtype(dtype)? * 1000.0)?;
            mlp.forward(&timestep_sinusoid(&scaled, SINUSOID_DIM)?.to_dtype(dtype)?)
        };
        let mut emb = embed(&self.timestep_embedder, timestep)?;
        match (&self.guidance_embedder, guidance) {
            (Some(mlp), Some(g)) => emb = (emb + embed(mlp, g)?)?,
            (Some(_), None) => candle_core::bail!("this FLUX model embeds guidance (guidance_embeds = true): a guidance value is required"),
            (None, Some(_)) => candle_core::bail!("this FLUX model has no guidance embedder (guidance_embeds = false): pass no guidance"),
            (None, None) => {}
        }
        emb + self.text_embedder.forward(pooled)?
    }
}
