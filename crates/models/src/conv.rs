//! 2-D convolution with bias whose backward pass is fast and skips frozen weights.
//!
//! candle differentiates `conv2d` through `conv_transpose2d`, which on the CPU is a direct loop,
//! sums the bias gradient with a strided reduction over three axes, and computes the kernel and
//! bias gradients even for frozen weights; together they made up about a quarter of a training
//! step of the shapes model. Here the forward pass is candle's (im2col + gemm on the CPU), and for
//! stride 1 the input gradient is an ordinary convolution with the flipped, transposed kernel, so
//! it takes the same fast path; kernel and bias get gradients only when autograd tracks them. On
//! the CPU in f32/f64 the forward convolutions of a frozen kernel (and that input gradient) run
//! the im2col kernel of [`crate::ops::conv`], which writes the bias and the product straight into
//! the output; elsewhere they are candle's.
//!
//! When the kernel itself is trained (on the CPU), the convolution is an explicit im2col matrix
//! times the kernel, one product for the whole batch, and the matrix is kept for the backward
//! pass: candle's tiled im2col is a scalar loop per 16×16 tile that, with the kernel gradient's
//! swapped roles, cost about 40 % of a training step of the shapes model.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{
    CpuStorage, CudaStorage, DType, Layout, Module, Result, Shape, Storage, Tensor, WithDType, D,
};
use candle_nn::VarBuilder;

use crate::ops;
use crate::ops::conv::conv2d_no_grad;

/// A convolution layer with diffusers' weight names (`weight`, `bias`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    /// The flipped, transposed kernel of the input gradient, made once for a frozen kernel: a
    /// steering run differentiates through the same weights at every iteration.
    flipped: Arc<OnceLock<Tensor>>,
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        // Fresh weights (training from scratch) start as in PyTorch: Kaiming-normal kernel, bias
        // uniform in ±1/√fan_in.
        let weight = vb.get_with_hints(
            (out_channels, in_channels, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bound = 1. / ((in_channels * kernel * kernel) as f64).sqrt();
        let bias = vb.get_with_hints(
            out_channels,
            "bias",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            flipped: Arc::default(),
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Training: `kernel (c_out, K) · im2col (K, B·pixels)`, the bias added by the op that owns
    /// the backward pass.
    fn forward_im2col(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let (c_out, c_in, k_h, k_w) = self.weight.dims4()?;
        if c_in != channels || k_h != k_w {
            candle_core::bail!(
                "conv2d: input of shape {:?} for a kernel of shape {:?}",
                xs.dims(),
                self.weight.dims()
            );
        }
        let g = Geometry::new(
            batch,
            channels,
            height,
            width,
            k_h,
            self.stride,
            self.padding,
        )?;
        let col = xs
            .detach()
            .contiguous()?
            .apply_op1_no_bwd(&Patches::Gather(g))?;
        let conv = self
            .weight
            .detach()
            .reshape((c_out, g.rows()))?
            .matmul(&col)?
            .reshape((c_out, batch, g.out_h, g.out_w))?
            .transpose(0, 1)?;
        xs.apply_op3(
            &self.weight,
            &self.bias,
            ConvIm2Col {
                g,
                col,
                conv: Mutex::new(Some(conv)),
            },
        )
    }

    /// candle's convolution plus a broadcast bias: the reference the fast path must equal.
    #[cfg(test)]
    fn forward_plain(&self, xs: &Tensor) -> Result<Tensor> {
        let out = xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        out.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (p, s) = (self.padding, self.stride);
        if !crate::nn::tracked(&[xs, &self.weight, &self.bias]) {
            return conv2d_no_grad(xs, &self.weight, Some(&self.bias), p, s);
        }
        // A trained kernel: one product for the batch, the patch matrix kept for its gradient.
        if self.weight.track_op()
            && xs.device().is_cpu()
            && matches!(xs.dtype(), DType::F32 | DType::F64)
        {
            return self.forward_im2col(xs);
        }
        let bias = self.bias.contiguous()?;
        if ops::conv::fits(xs, &self.weight, Some(&bias)) {
            // The op runs the CPU kernel on the storages and owns the backward pass.
            let op = ConvWithBias {
                stride: s,
                padding: p,
                conv: Mutex::new(None),
                flipped: self.flipped.clone(),
            };
            return xs
                .contiguous()?
                .apply_op3(&self.weight.contiguous()?, &bias, op);
        }
        // candle's convolution on untracked views of the same storage; the op adds the bias while
        // writing its output and owns the backward pass.
        let conv = xs.detach().conv2d(&self.weight.detach(), p, s, 1, 1)?;
        xs.apply_op3(
            &self.weight,
            &self.bias,
            ConvWithBias {
                stride: s,
                padding: p,
                conv: Mutex::new(Some(conv)),
                flipped: self.flipped.clone(),
            },
        )
    }
}

/// The op behind [`Conv2d`] on tracked tensors: (input, kernel, bias) → output.
struct ConvWithBias {
    stride: usize,
    padding: usize,
    /// The bias-free convolution, computed before the op runs and dropped once it has.
    conv: Mutex<Option<Tensor>>,
    flipped: Arc<OnceLock<Tensor>>,
}

/// The convolution an op computed before it ran, taken once.
fn take_once(slot: &Mutex<Option<Tensor>>, op: &str) -> Result<Tensor> {
    let taken = slot.lock().ok().and_then(|mut c| c.take());
    taken.ok_or_else(|| candle_core::Error::Msg(format!("{op}: run twice")))
}

impl ConvWithBias {
    fn take_conv(&self) -> Result<Tensor> {
        take_once(&self.conv, "conv2d-with-bias")
    }
}

/// `conv + bias`, the bias broadcast over batch and pixels.
fn add_channel_bias<S: BackendStorage>(
    conv: &S,
    l_conv: &Layout,
    bias: &S,
    l_bias: &Layout,
) -> Result<(S, Shape)> {
    let channels = l_conv.dim(1)?;
    if l_bias.dims() != [channels] {
        candle_core::bail!(
            "conv2d: bias of shape {:?} for {channels} output channels",
            l_bias.dims()
        );
    }
    let per_channel = Layout::new(
        Shape::from((1, channels, 1, 1)),
        vec![0, l_bias.stride()[0], 0, 0],
        l_bias.start_offset(),
    )
    .broadcast_as(l_conv.shape().clone())?;
    let out = conv.binary_impl::<Add>(bias, l_conv, &per_channel)?;
    Ok((out, l_conv.shape().clone()))
}

/// Reverses a tensor along `dim`.
fn flip(t: &Tensor, dim: usize) -> Result<Tensor> {
    let n = t.dim(dim)?;
    let reversed: Vec<u32> = (0..n as u32).rev().collect();
    t.contiguous()?
        .index_select(&Tensor::new(reversed, t.device())?, dim)
}

impl candle_core::CustomOp3 for ConvWithBias {
    fn name(&self) -> &'static str {
        "conv2d-with-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        l_xs: &Layout,
        weight: &CpuStorage,
        l_weight: &Layout,
        bias: &CpuStorage,
        l_bias: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.conv.lock().map(|c| c.is_none()).unwrap_or(false) {
            return ops::conv::conv2d_storage(
                self.stride,
                self.padding,
                (xs, l_xs),
                (weight, l_weight),
                Some((bias, l_bias)),
            );
        }
        let conv = self.take_conv()?;
        let (storage, layout) = conv.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => add_channel_bias(s, layout, bias, l_bias),
            _ => candle_core::bail!("conv2d-with-bias: convolution on another device"),
        }
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        bias: &CudaStorage,
        l_bias: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let conv = self.take_conv()?;
        let (storage, layout) = conv.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => add_channel_bias(s, layout, bias, l_bias),
            _ => candle_core::bail!("conv2d-with-bias: convolution on another device"),
        }
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (p, s) = (self.padding, self.stride);
        let (_, _, k_h, k_w) = weight.dims4()?;
        // Only what autograd tracks gets a gradient: frozen weights while steering cost nothing.
        let grad_bias = if bias.track_op() {
            // Sum over width·height first: that reduction runs over the contiguous last axis.
            Some(grad.flatten_from(2)?.sum(D::Minus1)?.sum(0)?)
        } else {
            None
        };
        let grad_weight = if weight.track_op() {
            // Batch and channels swap roles and the output gradient becomes the kernel.
            let g = xs
                .transpose(0, 1)?
                .conv2d(&grad.transpose(0, 1)?, p, 1, s, 1)?
                .transpose(0, 1)?;
            Some(g.narrow(2, 0, k_h)?.narrow(3, 0, k_w)?)
        } else {
            None
        };
        if !xs.track_op() {
            return Ok((None, grad_weight, grad_bias));
        }
        let grad_xs = if s == 1 && k_h == k_w && p < k_h {
            // Stride 1: the input gradient is the correlation of the output gradient with the
            // kernel flipped in space and transposed in channels, padded by k − 1 − p.
            let make =
                || -> Result<Tensor> { flip(&flip(&weight.transpose(0, 1)?, 2)?, 3)?.contiguous() };
            let kernel = if weight.track_op() {
                make()?
            } else if let Some(k) = self.flipped.get() {
                k.clone()
            } else {
                let k = make()?;
                self.flipped.get_or_init(|| k).clone()
            };
            conv2d_no_grad(grad, &kernel, None, k_h - 1 - p, 1)?
        } else {
            // candle takes one output padding for both axes: use the larger, crop the other.
            let (_, _, h, w) = xs.dims4()?;
            let (_, _, g_h, g_w) = grad.dims4()?;
            let extra_h = h - ((g_h - 1) * s + k_h - 2 * p);
            let extra_w = w - ((g_w - 1) * s + k_w - 2 * p);
            grad.conv_transpose2d(weight, p, extra_h.max(extra_w), s, 1)?
                .narrow(2, 0, h)?
                .narrow(3, 0, w)?
        };
        Ok((Some(grad_xs), grad_weight, grad_bias))
    }
}

/// Shape of one convolution: input (batch, channels, height, width), square kernel.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    fn new(
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let out = |n: usize| {
            (n + 2 * padding)
                .checked_sub(kernel)
                .map(|d| d / stride + 1)
        };
        match (out(height), out(width)) {
            (Some(out_h), Some(out_w)) if stride > 0 => Ok(Self {
                batch,
                channels,
                height,
                width,
                kernel,
                stride,
                padding,
                out_h,
                out_w,
            }),
            _ => candle_core::bail!(
                "conv2d: kernel {kernel} stride {stride} padding {padding} on {height}×{width}"
            ),
        }
    }

    /// Rows of the im2col matrix: (channel, kernel row, kernel column).
    fn rows(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// Columns: (batch, output row, output column).
    fn cols(&self) -> usize {
        self.batch * self.out_h * self.out_w
    }

    /// The output columns `ox` whose input column `ox·stride + kx − padding` is inside the image.
    fn valid_cols(&self, kx: usize) -> std::ops::Range<usize> {
        let (s, p) = (self.stride, self.padding);
        let lo = p.saturating_sub(kx).div_ceil(s);
        let hi = (self.width + p)
            .saturating_sub(kx)
            .div_ceil(s)
            .min(self.out_w);
        lo..hi.max(lo)
    }

    /// Calls `f(im2col row segment, input row, ox range)` for every in-image piece: row
    /// `(c, ky, kx)`, batch `b`, output row `oy` reads input row `oy·stride + ky − padding`.
    fn for_each_segment(&self, mut f: impl FnMut(usize, usize, std::ops::Range<usize>, usize)) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let pixels = self.out_h * self.out_w;
        for c in 0..self.channels {
            for ky in 0..k {
                for kx in 0..k {
                    let row = (c * k + ky) * k + kx;
                    let cols = self.valid_cols(kx);
                    for b in 0..self.batch {
                        let plane = (b * self.channels + c) * self.height;
                        for oy in 0..self.out_h {
                            let iy = oy * s + ky;
                            if iy < p || iy - p >= self.height {
                                continue;
                            }
                            let start = (row * self.batch + b) * pixels + oy * self.out_w;
                            f(start, (plane + iy - p) * self.width, cols.clone(), kx);
                        }
                    }
                }
            }
        }
    }

    fn im2col<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let mut col = vec![T::zero(); self.rows() * self.cols()];
        let (s, p) = (self.stride, self.padding);
        self.for_each_segment(|start, src, cols, kx| {
            if cols.is_empty() {
                return;
            }
            let dst = &mut col[start + cols.start..start + cols.end];
            let first = src + cols.start * s + kx - p;
            if s == 1 {
                dst.copy_from_slice(&x[first..first + dst.len()]);
            } else {
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = x[first + i * s];
                }
            }
        });
        col
    }

    /// The adjoint of [`im2col`](Self::im2col): every matrix entry added back to its pixel.
    fn col2im<T: WithDType>(&self, col: &[T]) -> Vec<T> {
        let mut x = vec![T::zero(); self.batch * self.channels * self.height * self.width];
        let (s, p) = (self.stride, self.padding);
        self.for_each_segment(|start, src, cols, kx| {
            if cols.is_empty() {
                return;
            }
            let first = src + cols.start * s + kx - p;
            let seg = &col[start + cols.start..start + cols.end];
            if s == 1 {
                let dst = &mut x[first..first + seg.len()];
                dst.iter_mut().zip(seg).for_each(|(d, &v)| *d += v);
            } else {
                for (i, &v) in seg.iter().enumerate() {
                    x[first + i * s] += v;
                }
            }
        });
        x
    }
}

/// Moves values between an image batch (B, C, H, W) and its im2col matrix (C·k·k, B·out_h·out_w).
#[derive(Clone, Copy)]
enum Patches {
    /// Image → matrix.
    Gather(Geometry),
    /// Matrix → image, summing overlaps (the adjoint).
    Scatter(Geometry),
}

impl Patches {
    fn run<T: WithDType>(self, x: &[T]) -> Vec<T> {
        match self {
            Patches::Gather(g) => g.im2col(x),
            Patches::Scatter(g) => g.col2im(x),
        }
    }
}

impl candle_core::CustomOp1 for Patches {
    fn name(&self) -> &'static str {
        match self {
            Patches::Gather(_) => "im2col",
            Patches::Scatter(_) => "col2im",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.run(crate::ops::contiguous_slice(self.name(), s, l)?))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.run(crate::ops::contiguous_slice(self.name(), s, l)?))
            }
            _ => candle_core::bail!("{}: only f32 and f64", self.name()),
        };
        let shape = match self {
            Patches::Gather(g) => Shape::from((g.rows(), g.cols())),
            Patches::Scatter(g) => Shape::from((g.batch, g.channels, g.height, g.width)),
        };
        Ok((out, shape))
    }
}

/// The op behind [`Conv2d`] while its kernel trains: (input, kernel, bias) → output, with the
/// input's im2col matrix kept for the kernel gradient.
struct ConvIm2Col {
    g: Geometry,
    col: Tensor,
    /// The bias-free convolution (B, C_out, H', W'), dropped once the op has run.
    conv: Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp3 for ConvIm2Col {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        bias: &CpuStorage,
        l_bias: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let conv = take_once(&self.conv, "conv2d-im2col")?;
        let (storage, layout) = conv.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => add_channel_bias(s, layout, bias, l_bias),
            _ => candle_core::bail!("conv2d-im2col: convolution on another device"),
        }
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.g;
        let c_out = weight.dim(0)?;
        // (C_out, B·pixels), the column order of the im2col matrix.
        let grad = grad
            .detach()
            .transpose(0, 1)?
            .contiguous()?
            .reshape((c_out, g.cols()))?;
        let grad_bias = if bias.track_op() {
            Some(grad.sum(D::Minus1)?)
        } else {
            None
        };
        let grad_weight = if weight.track_op() {
            Some(grad.matmul(&self.col.t()?)?.reshape(weight.shape())?)
        } else {
            None
        };
        let grad_xs = if xs.track_op() {
            let w = weight.detach().reshape((c_out, g.rows()))?;
            Some(
                w.t()?
                    .matmul(&grad)?
                    .apply_op1_no_bwd(&Patches::Scatter(g))?,
            )
        } else {
            None
        };
        Ok((grad_xs, grad_weight, grad_bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradients of both fast paths (kernel trained: im2col; kernel frozen: candle's convolution
    /// with hand-made gradients) equal candle's for every conv shape the models use and more.
    #[test]
    fn gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (cin, cout, k, stride, padding, size) in [
            (3, 5, 3, 1, 1, 8),
            (4, 6, 1, 1, 0, 7),
            (5, 5, 3, 2, 1, 8),
            (5, 5, 3, 2, 0, 9),
            (2, 3, 3, 1, 0, 6),
            (3, 4, 3, 2, 1, 7),
            (2, 2, 5, 1, 2, 4),
            (2, 3, 3, 3, 1, 10),
        ] {
            for frozen in [false, true] {
                let xs = Var::from_tensor(&Tensor::randn(0f64, 1., (2, cin, size, size), &dev)?)?;
                let weight = Var::from_tensor(&Tensor::randn(0f64, 1., (cout, cin, k, k), &dev)?)?;
                let bias = Var::from_tensor(&Tensor::randn(0f64, 1., cout, &dev)?)?;
                let (w, b) = if frozen {
                    (weight.as_tensor().detach(), bias.as_tensor().detach())
                } else {
                    (weight.as_tensor().clone(), bias.as_tensor().clone())
                };
                let conv = Conv2d {
                    weight: w,
                    bias: b,
                    stride,
                    padding,
                    flipped: Arc::default(),
                };
                let probe =
                    Tensor::randn(0f64, 1., conv.forward_plain(xs.as_tensor())?.shape(), &dev)?;
                let fast = conv.forward(xs.as_tensor())?;
                let plain = conv.forward_plain(xs.as_tensor())?;
                let diff = (&fast - &plain)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(
                    diff < 1e-12,
                    "forward differs by {diff} for k={k} s={stride} p={padding} frozen={frozen}"
                );
                let g_fast = (fast * &probe)?.sum_all()?.backward()?;
                let g_plain = (plain * &probe)?.sum_all()?.backward()?;
                for (name, v) in [("input", &xs), ("weight", &weight), ("bias", &bias)] {
                    let (Some(a), Some(b)) = (g_fast.get(v), g_plain.get(v)) else {
                        assert!(frozen && name != "input", "no {name} gradient");
                        continue;
                    };
                    let err = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(
                        err < 1e-10,
                        "{name} gradient differs by {err} for k={k} s={stride} p={padding} frozen={frozen}"
                    );
                }
                if frozen {
                    // The flipped kernel made by the first pass serves the second.
                    let again = (conv.forward(xs.as_tensor())? * &probe)?
                        .sum_all()?
                        .backward()?;
                    let (a, b) = (again.get(&xs).unwrap(), g_plain.get(&xs).unwrap());
                    let err = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(
                        err < 1e-10,
                        "reused flipped kernel: input gradient off by {err}"
                    );
                }
            }
        }
        Ok(())
    }

    /// im2col and col2im are adjoint: ⟨im2col(x), c⟩ = ⟨x, col2im(c)⟩.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        let g = Geometry::new(2, 3, 5, 6, 3, 2, 1).unwrap();
        let x: Vec<f64> = (0..2 * 3 * 5 * 6)
            .map(|i| (i as f64 * 0.37).sin())
            .collect();
        let c: Vec<f64> = (0..g.rows() * g.cols())
            .map(|i| (i as f64 * 0.11).cos())
            .collect();
        let lhs: f64 = g.im2col(&x).iter().zip(&c).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&g.col2im(&c)).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-12, "{lhs} vs {rhs}");
    }
}
