//! Matrix products that differentiate only the operands autograd tracks.
//!
//! The forward pass is candle's own matmul kernel called on the storage, on whatever device the
//! operands live, so values are bit for bit those of `Tensor::matmul` (plus the bias add of
//! `candle_nn::Linear`). Only the backward pass differs: candle's computes `aᵀ·g` and `g·bᵀ` for
//! every product and keeps a gradient for every frozen weight until the pass ends; here a frozen
//! operand gets nothing.

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// The (batch, m, n, k) of `a · b` and the result's shape, checked as `Tensor::matmul` checks.
fn product_dims(a: &[usize], b: &[usize]) -> Result<((usize, usize, usize, usize), Shape)> {
    let rank = a.len();
    if rank < 2 || b.len() != rank {
        candle_core::bail!("matmul: operands of shapes {a:?} and {b:?} do not multiply");
    }
    let (m, k, k2, n) = (a[rank - 2], a[rank - 1], b[rank - 2], b[rank - 1]);
    let batch: usize = a[..rank - 2].iter().product();
    if k != k2 || batch != b[..rank - 2].iter().product::<usize>() {
        candle_core::bail!("matmul: operands of shapes {a:?} and {b:?} do not multiply");
    }
    let mut dims = a[..rank - 2].to_vec();
    dims.extend([m, n]);
    Ok(((batch, m, n, k), Shape::from(dims)))
}

fn product<S: BackendStorage>(a: &S, la: &Layout, b: &S, lb: &Layout) -> Result<(S, Shape)> {
    let (bmnk, shape) = product_dims(la.dims(), lb.dims())?;
    Ok((a.matmul(b, bmnk, la, lb)?, shape))
}

/// `a · b + bias`, the bias broadcast along the last dimension.
fn product_plus_bias<S: BackendStorage>(
    a: &S,
    la: &Layout,
    b: &S,
    lb: &Layout,
    bias: &S,
    l_bias: &Layout,
) -> Result<(S, Shape)> {
    let (out, shape) = product(a, la, b, lb)?;
    if l_bias.dims() != [*shape.dims().last().unwrap_or(&0)] {
        candle_core::bail!(
            "linear: bias of shape {:?} for an output of shape {shape:?}",
            l_bias.dims()
        );
    }
    let broadcast = l_bias.broadcast_as(shape.clone())?;
    let out = out.binary_impl::<Add>(bias, &Layout::contiguous(shape.clone()), &broadcast)?;
    Ok((out, shape))
}

fn grad_lhs(a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
    a.track_op().then(|| grad.matmul(&b.t()?)).transpose()
}

fn grad_rhs(a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
    b.track_op().then(|| a.t()?.matmul(grad)).transpose()
}

struct Product;

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "matmul-tracked-operands"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        product(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        product(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((grad_lhs(a, b, grad)?, grad_rhs(a, b, grad)?))
    }
}

struct ProductPlusBias;

impl CustomOp3 for ProductPlusBias {
    fn name(&self) -> &'static str {
        "linear-tracked-operands"
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
        product_plus_bias(s1, l1, s2, l2, s3, l3)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        product_plus_bias(s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The column sums of the (rows, features) gradient as a product with a row of ones: one
        // pass, where candle's sum over the leading axis divides every index.
        let grad_bias = bias
            .track_op()
            .then(|| {
                let g = grad.flatten_to(grad.rank().saturating_sub(2))?;
                let ones = Tensor::ones((1, g.dim(0)?), g.dtype(), g.device())?;
                ones.matmul(&g.contiguous()?)?.squeeze(0)
            })
            .transpose()?;
        Ok((grad_lhs(a, b, grad)?, grad_rhs(a, b, grad)?, grad_bias))
    }
}

/// True when candle's own op is just as good: nothing to differentiate, or everything.
fn nothing_to_skip(tensors: &[&Tensor]) -> bool {
    let tracked = tensors.iter().filter(|t| t.track_op()).count();
    tracked == 0 || tracked == tensors.len()
}

/// `a · b` (batched over leading dimensions) whose backward pass skips untracked operands.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let empty = a.elem_count() == 0 || b.elem_count() == 0;
    if empty || nothing_to_skip(&[a, b]) {
        return a.matmul(b);
    }
    a.apply_op2(b, Product)
}

/// `xs · weightᵀ + bias` over the last dimension of `xs`, as `candle_nn::Linear` computes it,
/// whose backward pass skips whatever is untracked (the weights of a frozen model).
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let dims = xs.dims().to_vec();
    if dims.last() != Some(&in_features) {
        candle_core::bail!("linear: input of shape {dims:?} for a weight of {in_features} inputs");
    }
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("checked above") = out_features;
    // One 2-D product over all rows, as candle_nn::Linear does for contiguous inputs.
    let rows = xs.contiguous()?.reshape(((), in_features))?;
    let w = weight.t()?;
    let out = match bias {
        // Also when everything trains: candle's `broadcast_add` would take the backward pass
        // through an element-by-element copy of the gradient and a strided sum for the bias.
        Some(bias) if rows.elem_count() > 0 && crate::nn::tracked(&[&rows, weight, bias]) => {
            rows.apply_op3(&w, bias, ProductPlusBias)?
        }
        Some(bias) => matmul(&rows, &w)?.broadcast_add(bias)?,
        None => matmul(&rows, &w)?,
    };
    out.reshape(out_dims)
}
