//! SiLU `x · σ(x)` and CLIP's quick GELU `x · σ(1.702 x)`, one pass forward and one back.
//!
//! candle's SiLU calls libm's `exp` once per element (scalar), its backward pass is composed of
//! five more ops with their buffers, and quick GELU is three ops. Here, on the CPU in f32 and
//! f64, `x · σ(αx)` is one loop forward (in f32 with the branch-free [`super::exp_f32`], which
//! vectorises) and one back, ∂x = ∂y · s · (1 + αx · (1 − s)) with s = σ(αx), from the saved
//! input. Elsewhere candle's ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_slice, cpu_kernel, Real, PARALLEL_MIN_ELEMENTS};

/// The element-wise loops, per chunk; f32 runs them with the CPU's widest vectors.
trait Sigmoid: Real {
    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::one() / (Self::one() + (-self).exp())
    }
    /// `out = x · σ(alpha · x)`.
    fn gate_chunk(out: &mut [Self], x: &[Self], alpha: Self) {
        gate_chunk(out, x, alpha)
    }
    /// `out = grad · s · (1 + alpha·x · (1 − s))` with `s = σ(alpha · x)`.
    fn gate_grad_chunk(out: &mut [Self], x: &[Self], grad: &[Self], alpha: Self) {
        gate_grad_chunk(out, x, grad, alpha)
    }
}

#[inline(always)]
fn gate_chunk<T: Sigmoid>(out: &mut [T], x: &[T], alpha: T) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * (v * alpha).sigmoid();
    }
}

#[inline(always)]
fn gate_grad_chunk<T: Sigmoid>(out: &mut [T], x: &[T], grad: &[T], alpha: T) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(grad) {
        let ax = v * alpha;
        let s = ax.sigmoid();
        *o = g * s * (T::one() + ax * (T::one() - s));
    }
}

impl Sigmoid for f32 {
    #[inline(always)]
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + super::exp_f32(-self))
    }
    super::simd_dispatch!(fn gate_chunk(out: &mut [f32], x: &[f32], alpha: f32) => gate_chunk);
    super::simd_dispatch!(
        fn gate_grad_chunk(out: &mut [f32], x: &[f32], grad: &[f32], alpha: f32) => gate_grad_chunk
    );
}

impl Sigmoid for f64 {}

/// Elements per parallel task of the element-wise loops.
const CHUNK: usize = 1 << 14;

/// Whether element-wise work of `len` elements goes to the thread pool.
fn in_parallel(len: usize) -> bool {
    len >= PARALLEL_MIN_ELEMENTS && candle_core::utils::get_num_threads() > 1
}

fn forward<T: Sigmoid>(x: &[T], alpha: T) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    if in_parallel(x.len()) {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| T::gate_chunk(o, x, alpha));
    } else {
        T::gate_chunk(&mut out, x, alpha);
    }
    out
}

fn backward<T: Sigmoid>(x: &[T], grad: &[T], alpha: T) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    if in_parallel(x.len()) {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| T::gate_grad_chunk(o, x, g, alpha));
    } else {
        T::gate_grad_chunk(&mut out, x, grad, alpha);
    }
    out
}

/// `x · σ(alpha · x)`.
struct SigmoidGated {
    alpha: f64,
}

impl CustomOp1 for SigmoidGated {
    fn name(&self) -> &'static str {
        "sigmoid-gated"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(forward(contiguous_slice(name, s, l)?, self.alpha as f32))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(forward(contiguous_slice(name, s, l)?, self.alpha))
            }
            _ => candle_core::bail!("sigmoid-gated: only f32 and f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = SigmoidGatedGrad { alpha: self.alpha };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// (input, output gradient) → input gradient of `x · σ(alpha · x)`.
struct SigmoidGatedGrad {
    alpha: f64,
}

impl CustomOp2 for SigmoidGatedGrad {
    fn name(&self) -> &'static str {
        "sigmoid-gated-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "sigmoid-gated-grad: gradient {:?} for input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let name = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(backward(
                contiguous_slice(name, s1, l1)?,
                contiguous_slice(name, s2, l2)?,
                self.alpha as f32,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(backward::<f64>(
                contiguous_slice(name, s1, l1)?,
                contiguous_slice(name, s2, l2)?,
                self.alpha,
            )),
            _ => candle_core::bail!("sigmoid-gated-grad: only f32 and f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

fn sigmoid_gated(xs: &Tensor, alpha: f64) -> Option<Result<Tensor>> {
    if !cpu_kernel(xs) || xs.elem_count() == 0 {
        return None;
    }
    let op = SigmoidGated { alpha };
    Some(xs.contiguous().and_then(|xs| {
        if xs.track_op() {
            xs.apply_op1(op)
        } else {
            xs.apply_op1_no_bwd(&op)
        }
    }))
}

/// SiLU `x · σ(x)`, differentiable everywhere.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    sigmoid_gated(xs, 1.0).unwrap_or_else(|| xs.silu())
}

/// CLIP's quick GELU `x · σ(1.702 x)`, differentiable everywhere.
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    sigmoid_gated(xs, 1.702).unwrap_or_else(|| quick_gelu_composed(xs))
}

/// Quick GELU with candle's ops: the reference, and the path off the CPU.
pub fn quick_gelu_composed(xs: &Tensor) -> Result<Tensor> {
    xs.mul(&candle_nn::ops::sigmoid(&(xs * 1.702)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    }

    #[test]
    fn matches_candle_forward_and_backward_in_f32_and_f64() -> Result<()> {
        let dev = Device::Cpu;
        // Wide enough to reach both tails, and long enough for the parallel path.
        let x = (Tensor::randn(0f32, 6., (3, 1 << 17), &dev)? + 0.5)?;
        for (dt, tol) in [(DType::F32, 2e-6), (DType::F64, 1e-13)] {
            let v = Var::from_tensor(&x.to_dtype(dt)?)?;
            let ours = silu(v.as_tensor())?;
            let theirs = v.as_tensor().silu()?;
            let scale = theirs
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            let err = max_diff(&ours, &theirs)? / scale;
            assert!(err < tol, "{dt:?}: forward differs by {err} (relative)");
            let probe = Tensor::randn(0f32, 1., x.shape(), &dev)?.to_dtype(dt)?;
            let ga = (ours * &probe)?.sum_all()?.backward()?;
            let gb = (theirs * &probe)?.sum_all()?.backward()?;
            let (a, b) = (ga.get(&v).expect("ours"), gb.get(&v).expect("candle's"));
            let err = max_diff(a, b)?;
            assert!(err < 10.0 * tol, "{dt:?}: gradients differ by {err}");

            let ours = quick_gelu(v.as_tensor())?;
            let theirs = quick_gelu_composed(v.as_tensor())?;
            let err = max_diff(&ours, &theirs)? / scale;
            assert!(err < tol, "{dt:?}: quick GELU differs by {err} (relative)");
            let ga = (ours * &probe)?.sum_all()?.backward()?;
            let gb = (theirs * &probe)?.sum_all()?.backward()?;
            let (a, b) = (ga.get(&v).expect("ours"), gb.get(&v).expect("candle's"));
            let err = max_diff(a, b)?;
            assert!(
                err < 10.0 * tol,
                "{dt:?}: quick GELU gradients differ by {err}"
            );
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let xs = [-30.0, -4.0, -1.3, -0.2, 0.0, 0.7, 2.5, 9.0];
        let x = Var::from_tensor(&Tensor::new(&xs, &dev)?)?;
        let grads = silu(x.as_tensor())?.sum_all()?.backward()?;
        let g = grads.get(&x).expect("gradient").to_vec1::<f64>()?;
        let quick = quick_gelu(x.as_tensor())?.sum_all()?.backward()?;
        let gq = quick.get(&x).expect("gradient").to_vec1::<f64>()?;
        for (alpha, g) in [(1.0, &g), (1.702, &gq)] {
            let f = |v: f64| v / (1.0 + (-alpha * v).exp());
            for (i, &v) in xs.iter().enumerate() {
                let h = 1e-6;
                let fd = (f(v + h) - f(v - h)) / (2.0 * h);
                assert!(
                    (g[i] - fd).abs() < 1e-8,
                    "α {alpha}, x = {v}: {} vs {fd}",
                    g[i]
                );
            }
        }
        // The tails: σ saturates without overflow in f32 too.
        let t = Tensor::new(&[-200f32, -90.0, 90.0, 200.0], &dev)?;
        let y = silu(&t)?.to_vec1::<f32>()?;
        assert!(y[0].abs() < 1e-30 && y[1].abs() < 1e-30, "{y:?}");
        assert_eq!(&y[2..], &[90.0, 200.0]);
        Ok(())
    }
}
