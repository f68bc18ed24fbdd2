//! The normalisations of the FLUX transformer (and T5's RMS norm), in forms that keep gradients
//! flowing: candle's fused kernels are used only when no tensor involved is tracked by autograd.

use crate::nn::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::tracked;

/// x / sqrt(mean(x²) + eps) · weight over the last dimension: `torch.nn.RMSNorm` (FLUX's q/k
/// norms, weight `weight`) and T5's layer norm (no mean subtraction, no bias).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let fused = matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        if fused && !tracked(&[xs, &self.weight]) && xs.is_contiguous() {
            return candle_nn::ops::rms_norm(xs, &self.weight, self.eps as f32);
        }
        crate::ops::norm::rms_norm(xs, &self.weight, self.eps)
    }
}

/// LayerNorm without learned parameters (FLUX's adaptive norms bring their own scale and shift).
#[derive(Clone, Debug)]
pub struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
    eps: f64,
}

impl PlainLayerNorm {
    pub fn new(dim: usize, eps: f64, vb: &VarBuilder) -> Result<Self> {
        let ones = Tensor::ones(dim, vb.dtype(), vb.device())?;
        Ok(Self {
            zeros: ones.zeros_like()?,
            ones,
            eps,
        })
    }
}

impl Module for PlainLayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let fused = matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        if fused && !tracked(&[xs]) && xs.is_contiguous() {
            return candle_nn::ops::layer_norm(xs, &self.ones, &self.zeros, self.eps as f32);
        }
        crate::ops::norm::layer_norm(xs, &self.ones, &self.zeros, self.eps)
    }
}

/// norm(x)·(1 + scale) + shift with per-sample (batch, dim) modulation vectors.
fn modulate(normed: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    normed
        .broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `linear(silu(emb))` cut into `n` equal chunks along the feature dimension.
fn chunks(linear: &Linear, emb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let e = linear.forward(&crate::ops::silu::silu(emb)?)?;
    let width = e.dim(1)? / n;
    (0..n).map(|i| e.narrow(1, i * width, width)).collect()
}

/// The modulation of the double-stream blocks (`AdaLayerNormZero`): six vectors from the
/// conditioning embedding; the first two modulate the attention input.
#[derive(Clone, Debug)]
pub struct AdaLayerNormZero {
    linear: Linear,
    norm: PlainLayerNorm,
}

/// What [`AdaLayerNormZero`] hands on besides the modulated input.
pub struct ZeroMod {
    pub gate_msa: Tensor,
    pub shift_mlp: Tensor,
    pub scale_mlp: Tensor,
    pub gate_mlp: Tensor,
}

impl AdaLayerNormZero {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: PlainLayerNorm::new(dim, 1e-6, &vb)?,
            linear: crate::nn::linear(dim, 6 * dim, vb.pp("linear"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, emb: &Tensor) -> Result<(Tensor, ZeroMod)> {
        let c = chunks(&self.linear, emb, 6)?;
        let x = modulate(&self.norm.forward(xs)?, &c[0], &c[1])?;
        let m = ZeroMod {
            gate_msa: c[2].clone(),
            shift_mlp: c[3].clone(),
            scale_mlp: c[4].clone(),
            gate_mlp: c[5].clone(),
        };
        Ok((x, m))
    }

    /// The second LayerNorm of a block, modulated by the MLP shift and scale.
    pub fn modulate_mlp(&self, xs: &Tensor, m: &ZeroMod) -> Result<Tensor> {
        modulate(&self.norm.forward(xs)?, &m.shift_mlp, &m.scale_mlp)
    }
}

/// The modulation of the single-stream blocks (`AdaLayerNormZeroSingle`): shift, scale, gate.
#[derive(Clone, Debug)]
pub struct AdaLayerNormZeroSingle {
    linear: Linear,
    norm: PlainLayerNorm,
}

impl AdaLayerNormZeroSingle {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: PlainLayerNorm::new(dim, 1e-6, &vb)?,
            linear: crate::nn::linear(dim, 3 * dim, vb.pp("linear"))?,
        })
    }

    /// Returns the modulated input and the gate.
    pub fn forward(&self, xs: &Tensor, emb: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = chunks(&self.linear, emb, 3)?;
        Ok((
            modulate(&self.norm.forward(xs)?, &c[0], &c[1])?,
            c[2].clone(),
        ))
    }
}

/// The output norm (`AdaLayerNormContinuous`): diffusers orders the projection as (scale, shift),
/// the original checkpoints as (shift, scale).
#[derive(Clone, Debug)]
pub struct AdaLayerNormContinuous {
    linear: Linear,
    norm: PlainLayerNorm,
}

impl AdaLayerNormContinuous {
    pub fn new(dim: usize, cond_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: PlainLayerNorm::new(dim, 1e-6, &vb)?,
            linear: crate::nn::linear(cond_dim, 2 * dim, vb.pp("linear"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let c = chunks(&self.linear, emb, 2)?;
        modulate(&self.norm.forward(xs)?, &c[1], &c[0])
    }
}
