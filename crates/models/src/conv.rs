//! 2-D convolution with bias whose backward pass is fast and skips frozen weights.
//!
//! candle differentiates `conv2d` through `conv_transpose2d`, which on the CPU is a direct loop,
//! sums the bias gradient with a strided reduction over three axes, and computes the kernel and
//! bias gradients even for frozen weights; together they made up about a quarter of a training
//! step of the shapes model. Here kernel and bias get gradients only when autograd tracks them. On
//! the CPU in f32/f64 the forward convolution of a frozen kernel runs the im2col kernel of
//! [`crate::ops::conv`], which writes the bias and the product straight into the output, and the
//! input gradient is the transposed product of the same kernel read in place, scattered back by
//! col2im (any stride). Elsewhere the forward pass is candle's, and for stride 1 the input
//! gradient an ordinary convolution with the flipped, transposed kernel (made once for a frozen
//! kernel), which takes the same fast path.
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
use crate::ops::im2col::Geometry;

/// A convolution layer with diffusers' weight names (`weight`, `bias`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    /// The flipped, transposed kernel of the input gradient off the CPU, made once for a frozen
    /// kernel: a steering run differentiates through the same weights at every iteration. (On
    /// the CPU the input gradient reads the kernel in place, so no copy doubles its memory.)
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
        let g = Geometry::new(xs.dims(), self.weight.dims(), self.stride, self.padding)?;
        let (batch, c_out) = (g.batch, g.c_out);
        let col = xs
            .detach()
            .contiguous()?
            .apply_op1_no_bwd(&Patches::Gather(g))?;
        let conv = self
            .weight
            .detach()
            .reshape((c_out, g.rows()))?
            .matmul(&col)?
            .reshape((c_out, batch, g.out_h(), g.out_w()))?
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
        let grad_xs = if let Some(g) = ops::conv::conv2d_input_grad(grad, weight, xs.dims(), p, s)?
        {
            // On the CPU: the transposed product and col2im, the kernel read in place.
            g
        } else if s == 1 && k_h == k_w && p < k_h {
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
            Patches::Scatter(g) => Shape::from((g.batch, g.c_in, g.h, g.w)),
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
                    // A second pass (off the CPU: with the flipped kernel the first one made)
                    // gives the same gradient.
                    let again = (conv.forward(xs.as_tensor())? * &probe)?
                        .sum_all()?
                        .backward()?;
                    let (a, b) = (again.get(&xs).unwrap(), g_plain.get(&xs).unwrap());
                    let err = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(err < 1e-10, "second pass: input gradient off by {err}");
                }
            }
        }
        Ok(())
    }
}
