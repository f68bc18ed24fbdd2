//! GroupNorm, LayerNorm and RMSNorm as single kernels with hand-written backward passes.
//!
//! All three normalise "rows" — a group of channels × pixels for GroupNorm, the last dimension for
//! the other two — and then scale and shift per channel, so one kernel serves them. On the CPU in
//! f32/f64 the forward pass is one read for the statistics and one write, and the backward pass
//! two reads and one write, instead of the seven to ten buffers of the composed form (whose
//! backward also differentiates the frozen weight and bias). Statistics are accumulated in f64.
//! CUDA tensors (f32, f64, bf16, f16) run the same passes in `kernels.cu`; other devices and CPU
//! half precision use the composed form.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::{
    contiguous_slice, fused_kernel, rows_per_task, sum1, sum2, sum3, Real, PARALLEL_MIN_ELEMENTS,
};

/// How elements are grouped into normalised rows and which affine channel each one uses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
    /// Consecutive rows cycle through this many groups (GroupNorm's groups; 1 otherwise).
    pub groups: usize,
    /// Channels per row.
    pub channels: usize,
    /// Consecutive elements sharing one channel (pixels per channel for GroupNorm; 1 otherwise).
    pub spatial: usize,
    pub eps: f64,
    /// Subtract the mean (LayerNorm, GroupNorm) or not (RMSNorm).
    pub centre: bool,
}

impl Rows {
    pub(crate) fn len(&self) -> usize {
        self.channels * self.spatial
    }

    /// The first affine channel of row `r`.
    fn first_channel(&self, r: usize) -> usize {
        (r % self.groups) * self.channels
    }

    /// Mean (0 for RMSNorm) and 1/√(variance + eps) of one row.
    fn stats<T: Real>(&self, row: &[T]) -> (f64, f64) {
        let n = row.len() as f64;
        let mean = if self.centre {
            sum1(row, |v| v.f64()) / n
        } else {
            0.0
        };
        let var = sum1(row, |v| {
            let d = v.f64() - mean;
            d * d
        }) / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    /// Normalises, scales and shifts one row (`r` is its index).
    fn forward_row<T: Real>(&self, r: usize, out: &mut [T], row: &[T], w: &[T], b: &[T]) {
        let (mean, rstd) = self.stats(row);
        let mean_t = T::of(mean);
        let c0 = self.first_channel(r);
        if self.spatial == 1 {
            // One element per channel (LayerNorm, RMSNorm): a single vectorisable loop.
            let (w, b) = (&w[c0..c0 + self.channels], &b[c0..c0 + self.channels]);
            let rstd = T::of(rstd);
            for ((o, &v), (&wc, &bc)) in out.iter_mut().zip(row).zip(w.iter().zip(b)) {
                *o = (v - mean_t) * (wc * rstd) + bc;
            }
            return;
        }
        for (c, (o, xs)) in out
            .chunks_mut(self.spatial)
            .zip(row.chunks(self.spatial))
            .enumerate()
        {
            let scale = T::of(w[c0 + c].f64() * rstd);
            let shift = b[c0 + c];
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = (v - mean_t) * scale + shift;
            }
        }
    }

    fn forward<T: Real>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let len = self.len();
        let mut out = vec![T::zero(); x.len()];
        let row_fn =
            |(r, (out, row)): (usize, (&mut [T], &[T]))| self.forward_row(r, out, row, w, b);
        if x.len() >= PARALLEL_MIN_ELEMENTS {
            out.par_chunks_mut(len)
                .zip(x.par_chunks(len))
                .enumerate()
                .with_min_len(rows_per_task(len))
                .for_each(row_fn);
        } else {
            out.chunks_mut(len)
                .zip(x.chunks(len))
                .enumerate()
                .for_each(row_fn);
        }
        out
    }

    /// The input gradient of one row, adding its weight and bias gradients to `dw` and `db`
    /// unless those are empty (frozen weight and bias).
    #[allow(clippy::too_many_arguments)]
    fn backward_row<T: Real>(
        &self,
        r: usize,
        dx: &mut [T],
        row: &[T],
        grad: &[T],
        w: &[T],
        dw: &mut [f64],
        db: &mut [f64],
    ) {
        let (mean, rstd) = self.stats(row);
        let c0 = self.first_channel(r);
        let n = self.len() as f64;
        if self.spatial == 1 {
            // One element per channel (LayerNorm, RMSNorm): vectorisable loops over the row.
            let wr = &w[c0..c0 + self.channels];
            let sum_gy = sum2(grad, wr, |gv, wc| gv.f64() * wc.f64());
            let sum_gy_xc = sum3(row, grad, wr, |v, gv, wc| {
                gv.f64() * wc.f64() * (v.f64() - mean)
            });
            let mean_t = T::of(mean);
            let rstd_t = T::of(rstd);
            if !dw.is_empty() {
                for (j, (&v, &gv)) in row.iter().zip(grad).enumerate() {
                    dw[c0 + j] += gv.f64() * (v.f64() - mean) * rstd;
                    db[c0 + j] += gv.f64();
                }
            }
            let mean_gy = T::of(if self.centre { sum_gy / n } else { 0.0 });
            let k = T::of(sum_gy_xc * rstd / n * rstd);
            for ((d, &v), (&gv, &wc)) in dx.iter_mut().zip(row).zip(grad.iter().zip(wr)) {
                *d = rstd_t * (gv * wc - mean_gy - (v - mean_t) * k);
            }
            return;
        }
        // Σ gy and Σ gy·x̂ over the row, gy = g·w being the gradient of x̂.
        let (mut sum_gy, mut sum_gy_xhat) = (0f64, 0f64);
        for c in 0..self.channels {
            let span = c * self.spatial..(c + 1) * self.spatial;
            let (row, grad) = (&row[span.clone()], &grad[span]);
            let sg = sum1(grad, |gv| gv.f64());
            let sgx = sum2(row, grad, |v, gv| gv.f64() * (v.f64() - mean)) * rstd;
            let wc = w[c0 + c].f64();
            if !dw.is_empty() {
                dw[c0 + c] += sgx;
                db[c0 + c] += sg;
            }
            sum_gy += sg * wc;
            sum_gy_xhat += sgx * wc;
        }
        let mean_gy = if self.centre { sum_gy / n } else { 0.0 };
        // ∂x = rstd·(gy − mean(gy) − x̂·mean(gy·x̂)), with x̂ = (x − mean)·rstd.
        let k = T::of(sum_gy_xhat / n * rstd);
        let (mean_t, rstd_t, mean_gy_t) = (T::of(mean), T::of(rstd), T::of(mean_gy));
        for c in 0..self.channels {
            let span = c * self.spatial..(c + 1) * self.spatial;
            let wc = w[c0 + c];
            for ((d, &v), &gv) in dx[span.clone()]
                .iter_mut()
                .zip(&row[span.clone()])
                .zip(&grad[span])
            {
                *d = rstd_t * (gv * wc - mean_gy_t - (v - mean_t) * k);
            }
        }
    }

    /// Gradients of the input, the weight and the bias, concatenated in that order; the input's
    /// alone unless `affine`.
    fn backward<T: Real>(&self, x: &[T], w: &[T], g: &[T], affine: bool) -> Vec<T> {
        let len = self.len();
        let n_channels = if affine {
            self.groups * self.channels
        } else {
            0
        };
        let mut dx = vec![T::zero(); x.len()];
        let zeros = || (vec![0f64; n_channels], vec![0f64; n_channels]);
        let (dw, db) = if x.len() >= PARALLEL_MIN_ELEMENTS {
            dx.par_chunks_mut(len)
                .zip(x.par_chunks(len).zip(g.par_chunks(len)))
                .enumerate()
                .with_min_len(rows_per_task(len))
                .fold(zeros, |(mut dw, mut db), (r, (dx, (row, grad)))| {
                    self.backward_row(r, dx, row, grad, w, &mut dw, &mut db);
                    (dw, db)
                })
                .reduce(zeros, |(mut dw, mut db), (dw2, db2)| {
                    dw.iter_mut().zip(dw2).for_each(|(a, b)| *a += b);
                    db.iter_mut().zip(db2).for_each(|(a, b)| *a += b);
                    (dw, db)
                })
        } else {
            let (mut dw, mut db) = zeros();
            for (r, (dx, (row, grad))) in dx
                .chunks_mut(len)
                .zip(x.chunks(len).zip(g.chunks(len)))
                .enumerate()
            {
                self.backward_row(r, dx, row, grad, w, &mut dw, &mut db);
            }
            (dw, db)
        };
        dx.extend(dw.into_iter().map(T::of));
        dx.extend(db.into_iter().map(T::of));
        dx
    }
}

/// Checks that `x` holds whole rows and the weight and bias one value per channel.
fn check(rows: &Rows, x: &Layout, w: &Layout, b: &Layout) -> Result<()> {
    let channels = rows.groups * rows.channels;
    if !x
        .shape()
        .elem_count()
        .is_multiple_of((rows.len() * rows.groups).max(1))
        || w.shape().elem_count() != channels
        || b.shape().elem_count() != channels
    {
        candle_core::bail!(
            "normalisation: input {:?}, weight {:?} and bias {:?} do not fit {rows:?}",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    Ok(())
}

/// Forward op: (input, weight, bias) → normalised, scaled and shifted input.
struct Normalise(Rows);

impl CustomOp3 for Normalise {
    fn name(&self) -> &'static str {
        "normalise-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(&self.0, l1, l2, l3)?;
        fn run<T: Real>(
            rows: &Rows,
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
        ) -> Result<Vec<T>> {
            let name = "normalise-rows";
            Ok(rows.forward(
                contiguous_slice::<T>(name, s1, l1)?,
                contiguous_slice::<T>(name, s2, l2)?,
                contiguous_slice::<T>(name, s3, l3)?,
            ))
        }
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(run::<f32>(&self.0, args.0, args.1, args.2)?),
            CpuStorage::F64(_) => CpuStorage::F64(run::<f64>(&self.0, args.0, args.1, args.2)?),
            _ => candle_core::bail!("normalise-rows: only f32 and f64"),
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
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check(&self.0, l1, l2, l3)?;
        let out = super::cuda::normalise_forward(&self.0, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let affine = weight.track_op() || bias.track_op();
        let op = NormaliseGrad {
            rows: self.0,
            affine,
        };
        let all = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &op)?;
        let (n, c) = (x.elem_count(), weight.elem_count());
        let grad_x = x
            .track_op()
            .then(|| all.narrow(0, 0, n)?.reshape(x.shape()));
        let grad_w = weight
            .track_op()
            .then(|| all.narrow(0, n, c)?.reshape(weight.shape()));
        let grad_b = bias
            .track_op()
            .then(|| all.narrow(0, n + c, c)?.reshape(bias.shape()));
        Ok((
            grad_x.transpose()?,
            grad_w.transpose()?,
            grad_b.transpose()?,
        ))
    }
}

/// Backward op: (input, weight, output gradient) → [∂input, ∂weight, ∂bias] flattened, or
/// ∂input alone when the weight and bias are frozen (`affine` false): steering's case.
struct NormaliseGrad {
    rows: Rows,
    affine: bool,
}

impl CustomOp3 for NormaliseGrad {
    fn name(&self) -> &'static str {
        "normalise-rows-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            op: &NormaliseGrad,
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
        ) -> Result<Vec<T>> {
            let name = "normalise-rows-grad";
            Ok(op.rows.backward(
                contiguous_slice::<T>(name, s1, l1)?,
                contiguous_slice::<T>(name, s2, l2)?,
                contiguous_slice::<T>(name, s3, l3)?,
                op.affine,
            ))
        }
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(run::<f32>(self, args.0, args.1, args.2)?),
            CpuStorage::F64(_) => CpuStorage::F64(run::<f64>(self, args.0, args.1, args.2)?),
            _ => candle_core::bail!("normalise-rows-grad: only f32 and f64"),
        };
        Ok((out, self.out_shape(l1, l2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check(&self.rows, l1, l2, l2)?;
        let out =
            super::cuda::normalise_backward(&self.rows, self.affine, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, self.out_shape(l1, l2)))
    }
}

impl NormaliseGrad {
    fn out_shape(&self, x: &Layout, w: &Layout) -> Shape {
        let affine = if self.affine {
            2 * w.shape().elem_count()
        } else {
            0
        };
        Shape::from(x.shape().elem_count() + affine)
    }
}

/// Statistics of half-precision inputs are taken in f32, as PyTorch does.
fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

fn fused(xs: &Tensor, rows: Rows, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (w, b) = (weight.contiguous()?, bias.contiguous()?);
    xs.contiguous()?.apply_op3(&w, &b, Normalise(rows))
}

/// GroupNorm over (batch, channels, …) with per-channel weight and bias.
pub fn group_norm(
    xs: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = xs.dims();
    if dims.len() < 3 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group_norm: input of shape {dims:?} for {groups} groups");
    }
    if fused_kernel(xs) && xs.elem_count() > 0 {
        let rows = Rows {
            groups,
            channels: dims[1] / groups,
            spatial: dims[2..].iter().product(),
            eps,
            centre: true,
        };
        return fused(xs, rows, weight, bias);
    }
    group_norm_composed(xs, groups, weight, bias, eps)
}

/// GroupNorm from candle's differentiable primitives (the reference, and the path off the CPU).
pub fn group_norm_composed(
    xs: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let dtype = xs.dtype();
    let x = xs
        .reshape((dims[0], groups, ()))?
        .to_dtype(internal_dtype(dtype))?;
    let centred = x.broadcast_sub(&x.mean_keepdim(2)?)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut affine = vec![1; dims.len()];
    affine[1] = dims[1];
    normed
        .to_dtype(dtype)?
        .reshape(dims)?
        .broadcast_mul(&weight.reshape(affine.clone())?)?
        .broadcast_add(&bias.reshape(affine)?)
}

/// LayerNorm over the last dimension with weight and bias.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = xs.dim(D::Minus1)?;
    if fused_kernel(xs) && xs.elem_count() > 0 {
        let rows = Rows {
            groups: 1,
            channels: dim,
            spatial: 1,
            eps,
            centre: true,
        };
        return fused(xs, rows, weight, bias);
    }
    layer_norm_composed(xs, weight, bias, eps)
}

/// LayerNorm from candle's differentiable primitives.
pub fn layer_norm_composed(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let x = xs.to_dtype(internal_dtype(dtype))?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// x / √(mean(x²) + eps) · weight over the last dimension.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = xs.dim(D::Minus1)?;
    if fused_kernel(xs) && xs.elem_count() > 0 {
        let rows = Rows {
            groups: 1,
            channels: dim,
            spatial: 1,
            eps,
            centre: false,
        };
        return fused(xs, rows, weight, &weight.zeros_like()?.detach());
    }
    rms_norm_composed(xs, weight, eps)
}

/// RMSNorm from candle's differentiable primitives.
pub fn rms_norm_composed(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let x = xs.to_dtype(internal_dtype(dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}
