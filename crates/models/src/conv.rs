//! 2-D convolution with bias whose backward pass is fast on the CPU.
//!
//! candle differentiates `conv2d` through `conv_transpose2d`, which on the CPU is a direct loop,
//! and sums the bias gradient with a strided reduction over three axes; together they made up
//! about a quarter of a training step of the shapes model. Here the forward pass is candle's
//! (im2col + gemm), and for stride 1 the input gradient is an ordinary convolution with the
//! flipped, transposed kernel, so it takes the same fast path. Other devices and untracked inputs
//! use candle's ops unchanged, so results are the same everywhere.

use candle_core::{CpuStorage, DType, Device, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;

/// A convolution layer with diffusers' weight names (`weight`, `bias`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
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
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// candle's convolution plus a broadcast bias: the reference the fast path must equal.
    fn forward_plain(&self, xs: &Tensor) -> Result<Tensor> {
        let out = xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        out.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let cpu_float =
            matches!(xs.device(), Device::Cpu) && matches!(xs.dtype(), DType::F32 | DType::F64);
        if cpu_float && crate::nn::tracked(&[xs, &self.weight, &self.bias]) {
            xs.apply_op3(
                &self.weight,
                &self.bias,
                ConvWithBias {
                    stride: self.stride,
                    padding: self.padding,
                },
            )
        } else {
            self.forward_plain(xs)
        }
    }
}

/// The op behind [`Conv2d`] on tracked CPU tensors: (input, kernel, bias) → output.
struct ConvWithBias {
    stride: usize,
    padding: usize,
}

/// A CPU storage viewed through its layout, as an untracked tensor (copied).
fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    fn gather<T: candle_core::WithDType>(data: &[T], layout: &Layout) -> Result<Tensor> {
        match layout.contiguous_offsets() {
            Some((start, end)) => {
                Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)
            }
            None => {
                // Walk the logical elements in row-major order, following the strides.
                let (dims, strides) = (layout.dims(), layout.stride());
                let mut index = vec![0usize; dims.len()];
                let mut values = Vec::with_capacity(layout.shape().elem_count());
                for _ in 0..layout.shape().elem_count() {
                    values.push(
                        data[layout.start_offset()
                            + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>()],
                    );
                    for d in (0..dims.len()).rev() {
                        index[d] += 1;
                        if index[d] < dims[d] {
                            break;
                        }
                        index[d] = 0;
                    }
                }
                Tensor::from_vec(values, layout.shape(), &Device::Cpu)
            }
        }
    }
    match storage {
        CpuStorage::F32(data) => gather(data, layout),
        CpuStorage::F64(data) => gather(data, layout),
        _ => candle_core::bail!("conv2d fast path: only f32 and f64"),
    }
}

fn into_cpu_storage(t: &Tensor) -> Result<CpuStorage> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => CpuStorage::F32(flat.to_vec1()?),
        DType::F64 => CpuStorage::F64(flat.to_vec1()?),
        other => candle_core::bail!("conv2d fast path: unsupported dtype {other:?}"),
    })
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
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, weight, bias) = (
            cpu_tensor(s1, l1)?,
            cpu_tensor(s2, l2)?,
            cpu_tensor(s3, l3)?,
        );
        let out = xs
            .conv2d(&weight, self.padding, self.stride, 1, 1)?
            .broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
        Ok((into_cpu_storage(&out)?, out.shape().clone()))
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
            let kernel = flip(&flip(&weight.transpose(0, 1)?, 2)?, 3)?.contiguous()?;
            grad.conv2d(&kernel, k_h - 1 - p, 1, 1, 1)?
        } else {
            let out_size = (grad.dim(2)? - 1) * s + k_h - 2 * p;
            grad.conv_transpose2d(weight, p, xs.dim(2)? - out_size, s, 1)?
        };
        Ok((Some(grad_xs), grad_weight, grad_bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

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
