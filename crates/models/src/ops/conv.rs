//! 2-D convolution on the CPU as one matrix product per image, written straight into the output.
//!
//! candle's CPU convolution copies the input to NHWC, gathers each tile of patches with strided
//! writes, multiplies into a fresh buffer and scatters that into the output, and adds the bias in
//! another pass. Here the patch matrix (input channels × kernel rows × kernel columns, output
//! pixels) is built from NCHW with contiguous row copies, the output starts as the bias, and the
//! product accumulates onto it in place; a 1×1 convolution multiplies the input buffer itself.
//! The input gradient is the transposed product, read from the kernel in place, scattered back by
//! col2im. Other devices and dtypes use candle's convolution.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::im2col::Geometry;
use super::{contiguous_slice, cpu_kernel, Real};

/// How the left operand of [`gemm_into`] is stored.
#[derive(Clone, Copy, PartialEq)]
enum Lhs {
    /// m × k, row-major.
    RowMajor,
    /// Its transpose is stored: k × m, row-major (read in place, not copied).
    Transposed,
}

/// `dst (m × n) = read·dst + lhs (m × k) · rhs (k × n)`, `dst` and `rhs` row-major and contiguous.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    read: bool,
    lhs: &[T],
    lhs_layout: Lhs,
    rhs: &[T],
) {
    // Element (i, j) of lhs sits at i·row_stride + j·col_stride.
    let (lhs_cs, lhs_rs) = match lhs_layout {
        Lhs::RowMajor => (1, k as isize),
        Lhs::Transposed => (m as isize, 1),
    };
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices hold the m×n, m×k and k×n row-major matrices the strides describe
    // (checked above), and `dst` is borrowed mutably so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            1,
            n as isize,
            if read { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// NCHW convolution of contiguous `x` with contiguous `kernel` (c_out, c_in, k_h, k_w), plus
/// `bias` per output channel.
fn conv2d_kernel<T: Real>(g: &Geometry, x: &[T], kernel: &[T], bias: Option<&[T]>) -> Vec<T> {
    let (oh, ow) = (g.out_h(), g.out_w());
    let pixels = oh * ow;
    let k_size = g.c_in * g.k_h * g.k_w;
    let mut out = vec![T::zero(); g.batch * g.c_out * pixels];
    if let Some(bias) = bias {
        for (plane, &b) in out.chunks_exact_mut(pixels).zip(bias.iter().cycle()) {
            plane.fill(b);
        }
    }
    let direct = g.k_h == 1 && g.k_w == 1 && g.stride == 1 && g.padding == 0;
    let mut col = if direct {
        Vec::new()
    } else {
        vec![T::zero(); k_size * pixels]
    };
    let image = g.c_in * g.h * g.w;
    for (n, dst) in out.chunks_exact_mut(g.c_out * pixels).enumerate() {
        let xs = &x[n * image..(n + 1) * image];
        let rhs = if direct {
            xs
        } else {
            g.one_image().im2col_into(xs, &mut col);
            &col
        };
        gemm_into(
            g.c_out,
            pixels,
            k_size,
            dst,
            bias.is_some(),
            kernel,
            Lhs::RowMajor,
            rhs,
        );
    }
    out
}

/// The input gradient of `conv2d(x, kernel)` from the output gradient `grad`, image by image:
/// kernelᵀ · grad (the kernel read in place) gives the gradient of the patch matrix, and col2im
/// adds it back to the pixels. Any stride and padding; no flipped copy of the kernel.
fn conv2d_input_grad_kernel<T: Real>(g: &Geometry, grad: &[T], kernel: &[T]) -> Vec<T> {
    let pixels = g.pixels();
    let image = g.c_in * g.h * g.w;
    let mut dx = vec![T::zero(); g.batch * image];
    let direct = g.k_h == 1 && g.k_w == 1 && g.stride == 1 && g.padding == 0;
    let mut col = if direct {
        Vec::new()
    } else {
        vec![T::zero(); g.rows() * pixels]
    };
    let one = g.one_image();
    for (n, dx) in dx.chunks_exact_mut(image).enumerate() {
        let grad = &grad[n * g.c_out * pixels..(n + 1) * g.c_out * pixels];
        if direct {
            gemm_into(
                g.c_in,
                pixels,
                g.c_out,
                dx,
                false,
                kernel,
                Lhs::Transposed,
                grad,
            );
        } else {
            gemm_into(
                g.rows(),
                pixels,
                g.c_out,
                &mut col,
                false,
                kernel,
                Lhs::Transposed,
                grad,
            );
            one.col2im_add(&col, dx);
        }
    }
    dx
}

/// The kernel on storages, for ops that own their backward pass: `x`, `k` and `bias` must be
/// contiguous f32 or f64.
pub(crate) fn conv2d_storage(
    stride: usize,
    padding: usize,
    x: (&CpuStorage, &Layout),
    k: (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let g = Geometry::new(x.1.dims(), k.1.dims(), stride, padding)?;
    if let Some((_, lb)) = bias {
        if lb.dims() != [g.c_out] {
            candle_core::bail!("conv2d: bias {:?} for {} channels", lb.dims(), g.c_out);
        }
    }
    let shape = Shape::from((g.batch, g.c_out, g.out_h(), g.out_w()));
    fn run<T: Real>(
        g: &Geometry,
        x: (&CpuStorage, &Layout),
        k: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<Vec<T>> {
        let xs = contiguous_slice::<T>("conv2d", x.0, x.1)?;
        let ks = contiguous_slice::<T>("conv2d", k.0, k.1)?;
        let bs = bias
            .map(|(s, l)| contiguous_slice::<T>("conv2d", s, l))
            .transpose()?;
        Ok(conv2d_kernel(g, xs, ks, bs))
    }
    let out = match x.0 {
        CpuStorage::F32(_) => CpuStorage::F32(run::<f32>(&g, x, k, bias)?),
        CpuStorage::F64(_) => CpuStorage::F64(run::<f64>(&g, x, k, bias)?),
        _ => candle_core::bail!("conv2d: only f32 and f64"),
    };
    Ok((out, shape))
}

struct Conv {
    stride: usize,
    padding: usize,
}

/// (output gradient, kernel) → input gradient of the convolution `geometry` describes.
struct ConvInputGrad(Geometry);

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        lg: &Layout,
        k: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let expected = [g.batch, g.c_out, g.out_h(), g.out_w()];
        if lg.dims() != expected || lk.dims() != [g.c_out, g.c_in, g.k_h, g.k_w] {
            candle_core::bail!(
                "conv2d-input-grad: gradient {:?} and kernel {:?} for {g:?}",
                lg.dims(),
                lk.dims()
            );
        }
        fn run<T: Real>(
            g: &Geometry,
            grad: (&CpuStorage, &Layout),
            k: (&CpuStorage, &Layout),
        ) -> Result<Vec<T>> {
            let name = "conv2d-input-grad";
            let grad = contiguous_slice::<T>(name, grad.0, grad.1)?;
            Ok(conv2d_input_grad_kernel(
                g,
                grad,
                contiguous_slice::<T>(name, k.0, k.1)?,
            ))
        }
        let out = match grad {
            CpuStorage::F32(_) => CpuStorage::F32(run::<f32>(g, (grad, lg), (k, lk))?),
            CpuStorage::F64(_) => CpuStorage::F64(run::<f64>(g, (grad, lg), (k, lk))?),
            _ => candle_core::bail!("conv2d-input-grad: only f32 and f64"),
        };
        Ok((out, Shape::from((g.batch, g.c_in, g.h, g.w))))
    }
}

/// The gradient, with respect to an input of shape `input_dims`, of `conv2d(input, weight)`
/// (square padding and stride, no dilation) given the output gradient `grad`; no backward pass.
/// `None` where the kernel above does not run (see [`fits`]): the caller uses candle's ops.
pub fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    input_dims: &[usize],
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    if !fits(grad, weight, None) {
        return Ok(None);
    }
    let g = Geometry::new(input_dims, weight.dims(), stride, padding)?;
    let (grad, weight) = (grad.detach().contiguous()?, weight.detach().contiguous()?);
    grad.apply_op2_no_bwd(&weight, &ConvInputGrad(g)).map(Some)
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        k: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        conv2d_storage(self.stride, self.padding, (x, lx), (k, lk), None)
    }
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-im2col-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        conv2d_storage(self.stride, self.padding, (x, lx), (k, lk), Some((b, lb)))
    }
}

/// True when [`conv2d_no_grad`] runs the kernel here rather than candle's convolution.
pub(crate) fn fits(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    cpu_kernel(xs)
        && weight.dtype() == xs.dtype()
        && bias.is_none_or(|b| b.dtype() == xs.dtype())
        && xs.rank() == 4
        && weight.rank() == 4
}

/// `conv2d(xs, weight) + bias` (square padding and stride, no dilation) with no backward pass:
/// the value only. On the CPU in f32/f64 the kernel above; elsewhere candle's convolution.
pub fn conv2d_no_grad(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (xs, weight) = (xs.detach(), weight.detach());
    if fits(&xs, &weight, bias) {
        let op = Conv { stride, padding };
        let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
        return match bias {
            Some(b) => xs.apply_op3_no_bwd(&weight, &b.detach().contiguous()?, &op),
            None => xs.apply_op2_no_bwd(&weight, &op),
        };
    }
    let out = xs.conv2d(&weight, padding, stride, 1, 1)?;
    match bias {
        Some(b) => out.broadcast_add(&b.detach().reshape((1, (), 1, 1))?),
        None => Ok(out),
    }
}
