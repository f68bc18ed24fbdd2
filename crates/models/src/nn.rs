//! Layers shared by the models, in forms that keep gradients flowing.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` kernels have no backward pass and
//! silently stop gradients. We use them only when no tensor involved is tracked for autograd, and
//! otherwise our own kernels with backward passes ([`crate::ops`]), which also skip the gradients
//! of frozen weights.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops;

/// True when autograd tracks any of the tensors (a `Var`, or something computed from one).
pub fn tracked(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
}

/// `full + small`, `small` broadcast to `full`'s shape. candle's `broadcast_add` wraps the side
/// that already has the full shape in a broadcast too, and the backward pass of that no-op
/// broadcast is a "sum over no axes": a copy of the whole gradient, one element at a time.
pub fn add_broadcast(full: &Tensor, small: &Tensor) -> Result<Tensor> {
    full + small.broadcast_as(full.shape())?
}

/// Softmax over the last dimension: candle's fused kernel when no gradient is needed.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if tracked(&[xs]) || xs.dtype() == DType::F64 {
        ops::softmax::softmax_last_dim(xs)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// A fully connected layer with `candle_nn::Linear`'s parameters and initialisation, whose
/// backward pass differentiates only what autograd tracks (see [`ops::matmul`]).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(l: candle_nn::Linear) -> Self {
        Self {
            weight: l.weight().clone(),
            bias: l.bias().cloned(),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::matmul::linear(xs, &self.weight, self.bias.as_ref())
    }
}

/// A linear layer with bias, weights `weight` and `bias` (initialised as candle_nn's).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear::from)
}

/// A linear layer without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear::from)
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
        ops::norm::layer_norm(xs, &self.weight, &self.bias, self.eps)
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
            Self::Silu => crate::ops::silu::silu(xs),
            Self::Gelu => xs.gelu_erf(),
            Self::QuickGelu => crate::ops::silu::quick_gelu(xs),
        }
    }
}

/// GroupNorm as in PyTorch (statistics in f32 for half-precision inputs), weights `weight` and
/// `bias`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::norm::group_norm(xs, self.groups, &self.weight, &self.bias, self.eps)
    }
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels");
    }
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
    Ok(GroupNorm {
        weight,
        bias,
        groups,
        eps,
    })
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
