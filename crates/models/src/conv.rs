//! 2-D convolution with bias whose backward pass is fast and skips frozen weights.
//!
//! candle differentiates `conv2d` through `conv_transpose2d`, which on the CPU is a direct loop,
//! sums the bias gradient with a strided reduction over three axes, and computes the kernel and
//! bias gradients even for frozen weights; together they made up about a quarter of a training
//! step of the shapes model. Here the forward pass is candle's (im2col + gemm on the CPU), and for
//! stride 1 the input gradient is an ordinary convolution with the flipped, transposed kernel, so
//! it takes the same fast path; kernel and bias get gradients only when autograd tracks them. On
//! the CPU in f32/f64 the forward convolutions (and that input gradient) run the im2col kernel of
//! [`crate::ops::conv`], which writes the bias and the product straight into the output; elsewhere
//! they are candle's.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CudaStorage, Layout, Module, Result, Shape, Storage, Tensor, D};
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

impl ConvWithBias {
    fn take_conv(&self) -> Result<Tensor> {
        let taken = self.conv.lock().ok().and_then(|mut c| c.take());
        taken.ok_or_else(|| candle_core::Error::Msg("conv2d-with-bias: run twice".into()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradients of the fast path equal candle's for every conv shape the models use.
    #[test]
    fn gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (cin, cout, k, stride, padding, size) in [
            (3, 5, 3, 1, 1, 8),
            (4, 6, 1, 1, 0, 7),
            (5, 5, 3, 2, 1, 8),
            (5, 5, 3, 2, 0, 9),
            (2, 3, 3, 1, 0, 6),
        ] {
            let xs = Var::from_tensor(&Tensor::randn(0f64, 1., (2, cin, size, size), &dev)?)?;
            let weight = Var::from_tensor(&Tensor::randn(0f64, 1., (cout, cin, k, k), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f64, 1., cout, &dev)?)?;
            let conv = Conv2d {
                weight: weight.as_tensor().clone(),
                bias: bias.as_tensor().clone(),
                stride,
                padding,
                flipped: Arc::default(),
            };
            let probe = Tensor::randn(0f64, 1., conv.forward_plain(xs.as_tensor())?.shape(), &dev)?;
            let fast = conv.forward(xs.as_tensor())?;
            let plain = conv.forward_plain(xs.as_tensor())?;
            let diff = (&fast - &plain)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(
                diff < 1e-12,
                "forward differs by {diff} for k={k} s={stride} p={padding}"
            );
            let g_fast = (fast * &probe)?.sum_all()?.backward()?;
            let g_plain = (plain * &probe)?.sum_all()?.backward()?;
            // A frozen kernel: the flipped kernel is made once and reused by later passes.
            let frozen = Conv2d {
                weight: weight.as_tensor().detach(),
                bias: bias.as_tensor().detach(),
                stride,
                padding,
                flipped: Arc::default(),
            };
            for _ in 0..2 {
                let g = (frozen.forward(xs.as_tensor())? * &probe)?
                    .sum_all()?
                    .backward()?;
                let a = g.get(&xs).expect("frozen-kernel gradient");
                let b = g_plain.get(&xs).expect("candle gradient");
                let err = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 1e-10, "frozen-kernel input gradient differs by {err}");
            }
            for (name, v) in [("input", &xs), ("weight", &weight), ("bias", &bias)] {
                let a = g_fast.get(v).expect("fast gradient");
                let b = g_plain.get(v).expect("candle gradient");
                let err = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(
                    err < 1e-10,
                    "{name} gradient differs by {err} for k={k} s={stride} p={padding}"
                );
            }
        }
        Ok(())
    }
}
