//! The UNet's down, mid and up blocks (with and without cross-attention).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::transformer::{SpatialTransformer, TransformerConfig};
use crate::observer::AttentionObserver;
use crate::resnet::{Downsample, ResnetBlock, ResnetConfig, Upsample};

/// Settings every block of one UNet shares.
#[derive(Clone, Copy, Debug)]
pub struct BlockContext {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub context_dim: usize,
    pub linear_projection: bool,
    pub upcast_attention: bool,
    pub downsample_padding: usize,
}

impl BlockContext {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
        }
    }

    fn transformer(&self, channels: usize, heads: usize, layers: usize) -> TransformerConfig {
        TransformerConfig {
            channels,
            heads,
            layers,
            context_dim: self.context_dim,
            groups: self.groups,
            linear_projection: self.linear_projection,
            upcast_attention: self.upcast_attention,
        }
    }
}

/// Cross-attention settings of a block; `None` for a plain convolutional block.
#[derive(Clone, Copy, Debug)]
pub struct CrossAttention {
    pub heads: usize,
    pub transformer_layers: usize,
}

pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &BlockContext,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        cross: Option<CrossAttention>,
        add_downsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let cin = if i == 0 { in_channels } else { out_channels };
            resnets.push(ResnetBlock::new(
                ctx.resnet(cin, out_channels),
                vb.pp("resnets").pp(i),
            )?);
            if let Some(c) = cross {
                let cfg = ctx.transformer(out_channels, c.heads, c.transformer_layers);
                attentions.push(SpatialTransformer::new(&cfg, vb.pp("attentions").pp(i))?);
            }
        }
        let downsampler = if add_downsample {
            Some(Downsample::new(
                out_channels,
                ctx.downsample_padding,
                vb.pp("downsamplers").pp(0),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the output and the skip connections it produced, in order.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        observer: &mut dyn AttentionObserver,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, observer)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

pub struct MidBlock {
    resnet_in: ResnetBlock,
    attention: SpatialTransformer,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    pub fn new(
        ctx: &BlockContext,
        channels: usize,
        cross: CrossAttention,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = ctx.transformer(channels, cross.heads, cross.transformer_layers);
        Ok(Self {
            resnet_in: ResnetBlock::new(ctx.resnet(channels, channels), vb.pp("resnets").pp(0))?,
            attention: SpatialTransformer::new(&cfg, vb.pp("attentions").pp(0))?,
            resnet_out: ResnetBlock::new(ctx.resnet(channels, channels), vb.pp("resnets").pp(1))?,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let h = self.resnet_in.forward(xs, Some(temb))?;
        let h = self.attention.forward(&h, context, observer)?;
        self.resnet_out.forward(&h, Some(temb))
    }
}

pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample>,
}

/// Channel bookkeeping of an up block: what comes from below, from the skips, and what goes out.
#[derive(Clone, Copy, Debug)]
pub struct UpChannels {
    /// Channels of the block's input (the previous up block's output).
    pub prev_out: usize,
    /// Channels of the deepest skip this block consumes (its last resnet's skip).
    pub skip_in: usize,
    pub out: usize,
}

impl UpBlock {
    pub fn new(
        ctx: &BlockContext,
        ch: UpChannels,
        layers: usize,
        cross: Option<CrossAttention>,
        add_upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { ch.skip_in } else { ch.out };
            let cin = if i == 0 { ch.prev_out } else { ch.out };
            resnets.push(ResnetBlock::new(
                ctx.resnet(cin + skip, ch.out),
                vb.pp("resnets").pp(i),
            )?);
            if let Some(c) = cross {
                let cfg = ctx.transformer(ch.out, c.heads, c.transformer_layers);
                attentions.push(SpatialTransformer::new(&cfg, vb.pp("attentions").pp(i))?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample::new(ch.out, vb.pp("upsamplers").pp(0))?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn layers(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the end; `upsample_size` is the spatial size of the next skip.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let mut h = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("UNet: ran out of skip connections".into())
            })?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, observer)?;
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, upsample_size)?;
        }
        Ok(h)
    }
}
