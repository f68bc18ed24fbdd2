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

pub mod attention;
pub mod geglu;
pub mod matmul;
pub mod norm;
pub mod softmax;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

/// True when the tensor lives on the CPU in a dtype the hand-written kernels cover.
pub(crate) fn cpu_kernel(xs: &Tensor) -> bool {
    matches!(xs.device(), Device::Cpu) && matches!(xs.dtype(), DType::F32 | DType::F64)
}

/// Element type of the hand-written kernels: element-wise arithmetic in the type itself (as the
/// composed ops do), sums accumulated in f64.
pub(crate) trait Real: candle_core::WithDType + num_traits::Float + Send + Sync {
    #[inline(always)]
    fn f64(self) -> f64 {
        num_traits::ToPrimitive::to_f64(&self).unwrap_or(f64::NAN)
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        <Self as num_traits::NumCast>::from(v).unwrap_or(Self::nan())
    }
}

impl Real for f32 {}
impl Real for f64 {}

/// Σ f(a[i], b[i], c[i]) in f64 with eight independent accumulators, so that the loop
/// vectorises (one running sum would serialise every addition).
#[inline(always)]
pub(crate) fn sum3<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let tail: f64 = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .map(|((&x, &y), &z)| f(x, y, z))
    .sum();
    for ((xa, xb), xc) in ca.zip(cb).zip(cc) {
        for l in 0..LANES {
            acc[l] += f(xa[l], xb[l], xc[l]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Σ f(a[i], b[i]), as [`sum3`].
#[inline(always)]
pub(crate) fn sum2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> f64) -> f64 {
    sum3(a, b, b, |x, y, _| f(x, y))
}

/// Σ f(a[i]), as [`sum3`].
#[inline(always)]
pub(crate) fn sum1<T: Real>(a: &[T], f: impl Fn(T) -> f64) -> f64 {
    sum3(a, a, a, |x, _, _| f(x))
}

/// Below this many elements a kernel runs on the calling thread: handing small work to the thread
/// pool costs more than it saves (and much more on a busy machine, where the pool's threads wait
/// to be scheduled).
pub(crate) const PARALLEL_MIN_ELEMENTS: usize = 1 << 18;

/// Rows per parallel task, so that each task has some thousands of elements.
pub(crate) fn rows_per_task(len: usize) -> usize {
    (16_384 / len.max(1)).max(1)
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
