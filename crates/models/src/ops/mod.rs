//! Differentiable operations that do less work than candle's composed ones.
//!
//! Two costs dominate steering (forward and backward through a frozen denoiser, many times per
//! image) with candle's own ops:
//!
//! - candle's backward pass differentiates every argument of every op: both sides of each matrix
//!   product, every convolution kernel, every broadcast weight, even when the weights are plain
//!   (untracked) tensors. The ops in [`matmul`] and [`crate::conv`] run candle's own kernels
//!   forward and return a gradient only for the arguments autograd tracks, so a frozen model costs
//!   only what reaches the latent, and training only its trainable parameters.
//! - composed normalisations and softmax take six to ten passes (and buffers) each way. The ops in
//!   [`norm`] and [`softmax`] are single kernels with hand-written backward passes on the CPU
//!   in f32 and f64. Elsewhere (CUDA, half precision) they fall back to the composed form, which
//!   is correct by construction there because no kernel of ours is involved.

pub mod matmul;
pub mod norm;
pub mod softmax;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

/// True when the tensor lives on the CPU in a dtype the hand-written kernels cover.
pub(crate) fn cpu_kernel(xs: &Tensor) -> bool {
    matches!(xs.device(), Device::Cpu) && matches!(xs.dtype(), DType::F32 | DType::F64)
}

/// Element type of the hand-written kernels: statistics are accumulated in f64 whatever it is.
pub(crate) trait Real: candle_core::WithDType + Copy + Send + Sync {
    fn f64(self) -> f64;
    fn of(v: f64) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
}

/// The elements of a contiguous CPU storage, or an error naming the op that needs them so.
pub(crate) fn contiguous_slice<'a, T: candle_core::WithDType>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: expects a contiguous input"),
    }
}
