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
//!   [`norm`] and [`softmax`] are single kernels with hand-written backward passes: on the CPU in
//!   f32 and f64, and on CUDA (`kernels.cu`, compiled by NVRTC at first use) in f32, f64, bf16 and
//!   f16. Other devices and CPU half precision use the composed form.
//! - candle's element-wise activations call libm per element; [`silu`] and [`geglu`] use
//!   branch-free exp and erf that vectorise, with one-pass backward passes.
//! - layout copies and fresh buffers around the big products: [`conv`] builds its patch matrix
//!   and writes bias and product straight into the output, and [`heads`] runs attention on the
//!   projections' own layout, never materialising the probabilities when nothing differentiates.

pub mod attention;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub mod geglu;
pub mod heads;
#[cfg(test)]
mod host_tests;
pub(crate) mod im2col;
#[cfg(any(feature = "cuda", test))]
pub(crate) mod launch;
pub mod matmul;
mod narrow;
pub mod norm;
pub mod silu;
pub mod softmax;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

/// True when the tensor lives on the CPU in a dtype the hand-written kernels cover.
pub(crate) fn cpu_kernel(xs: &Tensor) -> bool {
    matches!(xs.device(), Device::Cpu) && matches!(xs.dtype(), DType::F32 | DType::F64)
}

/// True when a fused normalisation or softmax kernel covers the tensor: [`cpu_kernel`], or (built
/// with `cuda`) a CUDA tensor in f32, f64, bf16 or f16 once `kernels.cu` has compiled.
pub(crate) fn fused_kernel(xs: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if xs.device().is_cuda() {
        return launch::suffix(xs.dtype()).is_some() && cuda::available();
    }
    cpu_kernel(xs)
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
    /// `x ← exp((x − shift) · scale)` for every element (the softmax numerator).
    #[inline(always)]
    fn exp_scaled_shifted(xs: &mut [Self], scale: Self, shift: Self) {
        for x in xs.iter_mut() {
            *x = ((*x - shift) * scale).exp();
        }
    }
    /// softmax(scale · row) in place; `scale` > 0.
    fn softmax_row(row: &mut [Self], scale: Self) {
        softmax_row_generic(row, scale)
    }
    /// eˣ as the kernels compute it (f32: [`exp_f32`], which vectorises).
    #[inline(always)]
    fn exp_kernel(self) -> Self {
        self.exp()
    }
    /// The largest element of a non-empty row.
    fn row_max(row: &[Self]) -> Self {
        row_max_generic(row)
    }
    /// `x ← exp((x − max) · scale)` for every element; returns their sum, accumulated in f64.
    fn exp_shifted_sum(row: &mut [Self], scale: Self, max: Self) -> f64 {
        exp_shifted_sum_generic(row, scale, max)
    }
    /// `x ← exp((x − max) · scale) · factor` for every element.
    fn exp_shifted_times(row: &mut [Self], scale: Self, max: Self, factor: Self) {
        exp_shifted_times_generic(row, scale, max, factor)
    }
}

/// Lanes of the running maxima and sums below: one AVX-512 vector of f32.
const ROW_LANES: usize = 16;

#[inline(always)]
fn row_max_generic<T: Real>(row: &[T]) -> T {
    // Running maxima per lane, so that the loop vectorises.
    let mut lanes = [T::neg_infinity(); ROW_LANES];
    let chunks = row.chunks_exact(ROW_LANES);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
    for c in chunks {
        for l in 0..ROW_LANES {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    for l in lanes {
        max = if l > max { l } else { max };
    }
    max
}

#[inline(always)]
fn exp_shifted_sum_generic<T: Real>(row: &mut [T], scale: T, max: T) -> f64 {
    // Two passes over a row that stays in L1: one loop that widens each value to f64 as it goes
    // does not vectorise as well as the exponentials and the f64 sum apart.
    T::exp_scaled_shifted(row, scale, max);
    sum1(row, |v| v.f64())
}

#[inline(always)]
fn exp_shifted_times_generic<T: Real>(row: &mut [T], scale: T, max: T, factor: T) {
    for x in row.iter_mut() {
        *x = ((*x - max) * scale).exp_kernel() * factor;
    }
}

#[inline(always)]
fn softmax_row_generic<T: Real>(row: &mut [T], scale: T) {
    let max = row_max_generic(row);
    T::exp_scaled_shifted(row, scale, max);
    let sum = T::of(sum1(row, |v| v.f64()));
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// `fn name(args) -> R` that calls `kernel(args)` compiled with the widest vectors the CPU has:
/// AVX-512 (16 f32 lanes), else AVX2 (8), else as built. The kernel (`#[inline(always)]`) is
/// inlined into a `#[target_feature]` copy per width, so that its loops vectorise that wide.
/// Rust never fuses a multiply and an add on its own, and the kernels' sums keep their own
/// lane order, so every copy gives the same bits.
macro_rules! simd_dispatch {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $kernel:path
    ) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn wide16($($arg: $ty),*) $(-> $ret)? {
                        $kernel($($arg),*)
                    }
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { wide16($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    #[target_feature(enable = "avx2")]
                    unsafe fn wide8($($arg: $ty),*) $(-> $ret)? {
                        $kernel($($arg),*)
                    }
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe { wide8($($arg),*) };
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

impl Real for f32 {
    #[inline(always)]
    fn exp_scaled_shifted(xs: &mut [Self], scale: Self, shift: Self) {
        for x in xs.iter_mut() {
            *x = exp_f32((*x - shift) * scale);
        }
    }
    simd_dispatch!(fn softmax_row(row: &mut [f32], scale: f32) => softmax_row_generic);
    #[inline(always)]
    fn exp_kernel(self) -> Self {
        exp_f32(self)
    }
    simd_dispatch!(fn row_max(row: &[f32]) -> f32 => row_max_generic);
    simd_dispatch!(
        fn exp_shifted_sum(row: &mut [f32], scale: f32, max: f32) -> f64 => exp_shifted_sum_generic
    );
    simd_dispatch!(
        fn exp_shifted_times(row: &mut [f32], scale: f32, max: f32, factor: f32)
            => exp_shifted_times_generic
    );
}
impl Real for f64 {}

/// eˣ in f32 within about one ulp (Cephes' `expf`: Cody–Waite reduction by ln 2 and a degree-5
/// polynomial), branch-free so that loops over it vectorise; libm's `expf` is a call per element
/// and was a tenth of a UNet forward pass. Inputs below −87 give e⁻⁸⁷ (softmax only feeds x ≤ 0).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let exponent = (t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23;
    y * f32::from_bits(exponent as u32)
}

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
