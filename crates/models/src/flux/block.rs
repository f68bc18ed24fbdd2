//! FLUX's two block kinds: double-stream (`transformer_blocks.{i}`: text and image keep separate
//! weights and meet in the attention) and single-stream (`single_transformer_blocks.{i}`: one
//! sequence, attention and MLP in parallel).

use crate::nn::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{FluxAttention, JointLayout};
use super::norm::{AdaLayerNormZero, AdaLayerNormZeroSingle};
use super::rope::Rope;
use crate::observer::AttentionObserver;

/// Keeps f16 activations finite, as diffusers does after every block.
fn clip_f16(xs: Tensor) -> Result<Tensor> {
    if xs.dtype() == DType::F16 {
        xs.clamp(-65504f32, 65504f32)
    } else {
        Ok(xs)
    }
}

/// `ff.net.0.proj` → GELU (tanh approximation) → `ff.net.2`, 4× wide.
#[derive(Clone, Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let net = vb.pp("net");
        Ok(Self {
            proj: crate::nn::linear(dim, 4 * dim, net.pp("0").pp("proj"))?,
            out: crate::nn::linear(4 * dim, dim, net.pp("2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward(xs)?.gelu()?)
    }
}

/// Broadcasts a per-sample (batch, dim) gate over the tokens.
fn gated(gate: &Tensor, xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_mul(&gate.unsqueeze(1)?)
}

#[derive(Clone, Debug)]
pub struct DoubleStreamBlock {
    norm1: AdaLayerNormZero,
    norm1_context: AdaLayerNormZero,
    attn: FluxAttention,
    ff: FeedForward,
    ff_context: FeedForward,
}

impl DoubleStreamBlock {
    pub fn new(dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: AdaLayerNormZero::new(dim, vb.pp("norm1"))?,
            norm1_context: AdaLayerNormZero::new(dim, vb.pp("norm1_context"))?,
            attn: FluxAttention::new(dim, heads, head_dim, true, vb.pp("attn"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            ff_context: FeedForward::new(dim, vb.pp("ff_context"))?,
        })
    }

    pub fn attention(&self) -> &FluxAttention {
        &self.attn
    }

    /// Returns the updated (text, image) streams.
    pub fn forward(
        &self,
        image: &Tensor,
        text: &Tensor,
        temb: &Tensor,
        rope: &Rope,
        layout: JointLayout,
        observer: &mut dyn AttentionObserver,
    ) -> Result<(Tensor, Tensor)> {
        let (x, m) = self.norm1.forward(image, temb)?;
        let (c, cm) = self.norm1_context.forward(text, temb)?;
        let (attn_img, attn_txt) = self.attn.forward(&x, Some(&c), rope, layout, observer)?;
        let attn_txt = attn_txt.ok_or_else(|| {
            candle_core::Error::Msg("double-stream attention without text output".into())
        })?;

        let image = (image + gated(&m.gate_msa, &attn_img)?)?;
        let ff = self.ff.forward(&self.norm1.modulate_mlp(&image, &m)?)?;
        let image = (&image + gated(&m.gate_mlp, &ff)?)?;

        let text = (text + gated(&cm.gate_msa, &attn_txt)?)?;
        let ff = self
            .ff_context
            .forward(&self.norm1_context.modulate_mlp(&text, &cm)?)?;
        let text = (&text + gated(&cm.gate_mlp, &ff)?)?;
        Ok((clip_f16(text)?, image))
    }
}

#[derive(Clone, Debug)]
pub struct SingleStreamBlock {
    norm: AdaLayerNormZeroSingle,
    proj_mlp: Linear,
    proj_out: Linear,
    attn: FluxAttention,
}

impl SingleStreamBlock {
    pub fn new(dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        let mlp = 4 * dim;
        Ok(Self {
            norm: AdaLayerNormZeroSingle::new(dim, vb.pp("norm"))?,
            proj_mlp: crate::nn::linear(dim, mlp, vb.pp("proj_mlp"))?,
            proj_out: crate::nn::linear(dim + mlp, dim, vb.pp("proj_out"))?,
            attn: FluxAttention::new(dim, heads, head_dim, false, vb.pp("attn"))?,
        })
    }

    pub fn attention(&self) -> &FluxAttention {
        &self.attn
    }

    /// `joint`: the [text; image] sequence; returns it updated.
    pub fn forward(
        &self,
        joint: &Tensor,
        temb: &Tensor,
        rope: &Rope,
        layout: JointLayout,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let (x, gate) = self.norm.forward(joint, temb)?;
        let mlp = self.proj_mlp.forward(&x)?.gelu()?;
        let (attn, _) = self.attn.forward(&x, None, rope, layout, observer)?;
        let h = self.proj_out.forward(&Tensor::cat(&[attn, mlp], 2)?)?;
        clip_f16((joint + gated(&gate, &h)?)?)
    }
}
