//! Convolutional pieces shared by the UNet and the VAE: residual blocks and 2× resampling.

use crate::nn::{GroupNorm, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::conv::Conv2d;
use crate::ops::silu::silu;

use crate::nn::{conv2d, group_norm};

#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` in the VAE.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

/// GroupNorm → SiLU → conv, (+ time embedding), GroupNorm → SiLU → conv, plus a (1×1-projected) skip.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(cfg: ResnetConfig, vb: VarBuilder) -> Result<Self> {
        let (i, o) = (cfg.in_channels, cfg.out_channels);
        Ok(Self {
            norm1: group_norm(cfg.groups, i, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(i, o, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: cfg
                .temb_channels
                .map(|t| crate::nn::linear(t, o, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(cfg.groups, o, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(o, o, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if i != o {
                Some(conv2d(i, o, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&silu(&self.norm1.forward(xs)?)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = crate::nn::add_broadcast(&h, &t)?;
        }
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
        match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)? + h,
            None => xs + h,
        }
    }
}

/// Stride-2 3×3 convolution. `padding` 1 in the UNet; 0 in the VAE, which pads right and bottom only.
pub struct Downsample {
    conv: Conv2d,
    asymmetric: bool,
}

impl Downsample {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            asymmetric: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.asymmetric {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour 2× upsampling (or to an explicit size) followed by a 3×3 convolution.
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}
