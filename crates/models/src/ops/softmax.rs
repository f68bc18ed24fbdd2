//! Softmax over the last dimension as one kernel with a hand-written backward pass.
//!
//! candle's fused `softmax_last_dim` has no backward pass (gradients silently stop) and its
//! differentiable `softmax` takes five buffers forward and more backward. Here, on the CPU in f32
//! and f64 and on CUDA (`kernels.cu`, also bf16 and f16), the forward pass is one kernel, and the
//! backward pass, ∂x = y·(∂y − Σ ∂y·y), one more that reads the saved output. Elsewhere the
//! composed form is used.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::{contiguous_slice, fused_kernel, rows_per_task, sum2, Real, PARALLEL_MIN_ELEMENTS};

/// softmax(scale · row) of every row of `len` elements, in place; `scale` > 0.
pub(crate) fn softmax_rows_in_place<T: Real>(data: &mut [T], len: usize, scale: f64) {
    let scale = T::of(scale);
    let row_fn = |row: &mut [T]| T::softmax_row(row, scale);
    if data.len() >= PARALLEL_MIN_ELEMENTS {
        data.par_chunks_mut(len)
            .with_min_len(rows_per_task(len))
            .for_each(row_fn);
    } else {
        data.chunks_mut(len).for_each(row_fn);
    }
}

fn forward<T: Real>(x: &[T], len: usize, scale: f64) -> Vec<T> {
    let mut out = x.to_vec();
    softmax_rows_in_place(&mut out, len, scale);
    out
}

/// scale · y·(g − Σ g·y) row by row.
fn backward<T: Real>(y: &[T], g: &[T], len: usize, scale: f64) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    let scale = T::of(scale);
    let row_fn = |(out, (y, g)): (&mut [T], (&[T], &[T]))| {
        let dot = T::of(sum2(y, g, |a, b| a.f64() * b.f64()));
        for ((o, &yv), &gv) in out.iter_mut().zip(y).zip(g) {
            *o = scale * yv * (gv - dot);
        }
    };
    if y.len() >= PARALLEL_MIN_ELEMENTS {
        out.par_chunks_mut(len)
            .zip(y.par_chunks(len).zip(g.par_chunks(len)))
            .with_min_len(rows_per_task(len))
            .for_each(row_fn);
    } else {
        out.chunks_mut(len)
            .zip(y.chunks(len).zip(g.chunks(len)))
            .for_each(row_fn);
    }
    out
}

fn last_dim(layout: &Layout) -> Result<usize> {
    match layout.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("softmax: input of shape {:?}", layout.dims()),
    }
}

/// softmax(scale · x) over the last dimension.
struct Softmax {
    scale: f64,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let len = last_dim(l)?;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(forward(
                contiguous_slice(self.name(), s, l)?,
                len,
                self.scale,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(forward(
                contiguous_slice(self.name(), s, l)?,
                len,
                self.scale,
            )),
            _ => candle_core::bail!("softmax-last-dim: only f32 and f64"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        last_dim(l)?;
        let out = super::cuda::softmax_forward(s, l, self.scale)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// (softmax output, output gradient) → input gradient, for the softmax of `scale` · input.
pub(crate) struct SoftmaxGrad {
    pub scale: f64,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let len = last_dim(l1)?;
        let name = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(backward::<f32>(
                contiguous_slice(name, s1, l1)?,
                contiguous_slice(name, s2, l2)?,
                len,
                self.scale,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(backward::<f64>(
                contiguous_slice(name, s1, l1)?,
                contiguous_slice(name, s2, l2)?,
                len,
                self.scale,
            )),
            _ => candle_core::bail!("softmax-last-dim-grad: only f32 and f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        last_dim(l1)?;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "softmax-last-dim-grad: output {:?} and gradient {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let out = super::cuda::softmax_backward((s1, l1), (s2, l2), self.scale)?;
        Ok((out, l1.shape().clone()))
    }
}

/// Softmax over the last dimension, differentiable everywhere.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    softmax_scaled_last_dim(xs, 1.0)
}

/// softmax(scale · xs) over the last dimension, differentiable everywhere; `scale` > 0. The fused
/// kernels apply the scale inside the exponent, saving a pass each way.
pub fn softmax_scaled_last_dim(xs: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_kernel(xs) && xs.elem_count() > 0 && scale > 0.0 {
        return xs.contiguous()?.apply_op1(Softmax { scale });
    }
    let xs = if scale == 1.0 {
        xs.clone()
    } else {
        (xs * scale)?
    };
    candle_nn::ops::softmax(&xs, D::Minus1)
}
