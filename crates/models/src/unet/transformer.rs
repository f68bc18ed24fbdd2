//! Spatial transformer (diffusers' `Transformer2DModel` with `BasicTransformerBlock`s): where the
//! image attends to the text.

use crate::nn::{GroupNorm, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::conv::Conv2d;

use crate::attention::{Attention, AttentionConfig};
use crate::nn::{group_norm, LayerNorm};
use crate::observer::AttentionObserver;

#[derive(Clone, Debug)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub upcast_attention: bool,
}

/// GELU-gated linear unit feed-forward: Linear(d → 2·4d), x · gelu(gate), Linear(4d → d).
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: crate::nn::linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            out: crate::nn::linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(xs)?;
        self.out.forward(&crate::ops::geglu::geglu(&h)?)
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.channels;
        let head_dim = dim / cfg.heads;
        let attn = |context_dim: Option<usize>, observed: bool| AttentionConfig {
            query_dim: dim,
            context_dim,
            heads: cfg.heads,
            head_dim,
            qkv_bias: false,
            upcast: cfg.upcast_attention,
            observed,
        };
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(&attn(None, false), vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(&attn(Some(cfg.context_dim), true), vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        grid: (usize, usize),
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let xs = (self
            .attn1
            .forward(&self.norm1.forward(xs)?, None, grid, observer)?
            + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context), grid, observer)?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.channels;
        let proj = |name: &str| -> Result<Projection> {
            if cfg.linear_projection {
                Ok(Projection::Linear(crate::nn::linear(c, c, vb.pp(name))?))
            } else {
                Ok(Projection::Conv(crate::nn::conv2d(
                    c,
                    c,
                    1,
                    1,
                    0,
                    vb.pp(name),
                )?))
            }
        };
        let blocks = (0..cfg.layers)
            .map(|i| BasicTransformerBlock::new(cfg, vb.pp("transformer_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    /// `xs`: (batch, channels, height, width); `context`: (batch, tokens, context_dim).
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens =
            |t: &Tensor| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, c)) };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, (h, w), observer)?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> {
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        out + xs
    }
}
