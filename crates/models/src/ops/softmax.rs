//! Softmax over the last dimension as one kernel with a hand-written backward pass.
//!
//! candle's fused `softmax_last_dim` has no backward pass (gradients silently stop) and its
//! differentiable `softmax` takes five buffers forward and more backward. Here, on the CPU in f32
//! and f64, the forward pass is one kernel, and the backward pass, ∂x = y·(∂y − Σ ∂y·y), one more
//! that reads the saved output. Elsewhere the composed form is used.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{contiguous_slice, cpu_kernel, Real};

/// exp for the kernel's element type (f32's own, so f32 rows stay fast).
trait Exp: Real {
    fn exp(self) -> Self;
}

impl Exp for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Exp for f64 {
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

fn rows_per_task(len: usize) -> usize {
    (16_384 / len.max(1)).max(1)
}

fn forward<T: Exp>(x: &[T], len: usize) -> Vec<T> {
    let mut out = vec![T::of(0.0); x.len()];
    out.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .with_min_len(rows_per_task(len))
        .for_each(|(out, row)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.f64()));
            let max = T::of(max);
            let mut sum = 0f64;
            for (o, &v) in out.iter_mut().zip(row) {
                *o = T::of(v.f64() - max.f64()).exp();
                sum += o.f64();
            }
            let inv = 1.0 / sum;
            for o in out.iter_mut() {
                *o = T::of(o.f64() * inv);
            }
        });
    out
}

fn backward<T: Real>(y: &[T], g: &[T], len: usize) -> Vec<T> {
    let mut out = vec![T::of(0.0); y.len()];
    out.par_chunks_mut(len)
        .zip(y.par_chunks(len).zip(g.par_chunks(len)))
        .with_min_len(rows_per_task(len))
        .for_each(|(out, (y, g))| {
            let dot: f64 = y.iter().zip(g).map(|(a, b)| a.f64() * b.f64()).sum();
            for ((o, &yv), &gv) in out.iter_mut().zip(y).zip(g) {
                *o = T::of(yv.f64() * (gv.f64() - dot));
            }
        });
    out
}

fn last_dim(layout: &Layout) -> Result<usize> {
    match layout.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("softmax: input of shape {:?}", layout.dims()),
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let len = last_dim(l)?;
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(forward(contiguous_slice(self.name(), s, l)?, len))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(forward(contiguous_slice(self.name(), s, l)?, len))
            }
            _ => candle_core::bail!("softmax-last-dim: only f32 and f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// (softmax output, output gradient) → input gradient.
struct SoftmaxGrad;

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
            )),
            CpuStorage::F64(_) => CpuStorage::F64(backward::<f64>(
                contiguous_slice(name, s1, l1)?,
                contiguous_slice(name, s2, l2)?,
                len,
            )),
            _ => candle_core::bail!("softmax-last-dim-grad: only f32 and f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Softmax over the last dimension, differentiable everywhere.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if cpu_kernel(xs) && xs.elem_count() > 0 {
        return xs.contiguous()?.apply_op1(Softmax);
    }
    candle_nn::ops::softmax(xs, D::Minus1)
}
