//! Layers shared by the models, in forms that keep gradients flowing.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` kernels have no backward pass and
//! silently stop gradients. We use them only when no tensor involved is tracked for autograd, and
//! compose the operation from differentiable primitives otherwise.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// True when autograd tracks any of the tensors (a `Var`, or something computed from one).
pub fn tracked(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
}

/// Softmax over the last dimension, fused when no gradient is needed.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if tracked(&[xs]) || xs.dtype() == DType::F64 {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// LayerNorm over the last dimension with affine weight and bias.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let fused_dtype = matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16);
        if fused_dtype && !tracked(&[xs, &self.weight, &self.bias]) && xs.is_contiguous() {
            return candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32);
        }
        let dtype = xs.dtype();
        let internal = match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let x = xs.to_dtype(internal)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Activation functions named as in diffusers / transformers configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact GELU (erf), what `gelu` means in PyTorch.
    Gelu,
    /// x · sigmoid(1.702 x), used by OpenAI's CLIP.
    QuickGelu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => xs.silu(),
            Self::Gelu => xs.gelu_erf(),
            Self::QuickGelu => xs.mul(&candle_nn::ops::sigmoid(&(xs * 1.702)?)?),
        }
    }
}

/// GroupNorm as in PyTorch (statistics in f32 for half-precision inputs).
pub fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<candle_nn::GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
}

/// A 2-D convolution with the given kernel, stride and padding, with bias.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<crate::conv::Conv2d> {
    crate::conv::Conv2d::new(in_channels, out_channels, kernel, stride, padding, vb)
}
