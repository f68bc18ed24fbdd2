//! Small building blocks loaded through [`Weights`] by our parameter paths.

use candle_core::{Module, Tensor};

use crate::weights::Weights;
use crate::Result;

/// A parameter path prefix over a [`Weights`].
pub struct Path<'a> {
    pub w: &'a Weights,
    pub prefix: String,
}

impl<'a> Path<'a> {
    pub fn root(w: &'a Weights) -> Self {
        Self {
            w,
            prefix: String::new(),
        }
    }
    pub fn pp(&self, s: impl std::fmt::Display) -> Path<'a> {
        let prefix = if self.prefix.is_empty() {
            s.to_string()
        } else {
            format!("{}.{s}", self.prefix)
        };
        Path { w: self.w, prefix }
    }
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.w.get(&format!("{}.{name}", self.prefix), shape)
    }
    pub fn get_self(&self, shape: &[usize]) -> Result<Tensor> {
        self.w.get(&self.prefix, shape)
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(p: &Path, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = p.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(p.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / last.max(1);
        let y = x.reshape((rows, last))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        if let Some(l) = out.last_mut() {
            *l = self.weight.dim(0)?;
        }
        Ok(y.reshape(out)?)
    }
}

#[derive(Clone, Debug)]
pub struct Norm(candle_nn::LayerNorm);

impl Norm {
    pub fn load(p: &Path, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self(candle_nn::LayerNorm::new(
            p.get("weight", &[dim])?,
            p.get("bias", &[dim])?,
            eps,
        )))
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(&x.contiguous()?)?)
    }
}

#[derive(Clone, Debug)]
pub struct GroupNorm(candle_nn::GroupNorm);

impl GroupNorm {
    pub fn load(p: &Path, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self(candle_nn::GroupNorm::new(
            p.get("weight", &[channels])?,
            p.get("bias", &[channels])?,
            channels,
            groups,
            1e-5,
        )?))
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(x)?)
    }
}

#[derive(Clone, Debug)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        p: &Path,
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = p.get("weight", &[out_c, in_c, k, k])?;
        let bias = if bias {
            Some(p.get("bias", &[out_c])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => y,
        })
    }
}

/// Multi-head attention with packed input projections (PyTorch's `nn.MultiheadAttention`).
#[derive(Clone, Debug)]
pub struct MultiHeadAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl MultiHeadAttention {
    pub fn load(p: &Path, dim: usize, heads: usize) -> Result<Self> {
        let w = p.get("in_proj.weight", &[3 * dim, dim])?;
        let b = p.get("in_proj.bias", &[3 * dim])?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear::from_parts(
                w.narrow(0, i * dim, dim)?.contiguous()?,
                Some(b.narrow(0, i * dim, dim)?.contiguous()?),
            ))
        };
        Ok(Self {
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out: Linear::load(&p.pp("out_proj"), dim, dim, true)?,
            heads,
        })
    }

    /// `q` (B, Lq, C), `k`/`v` (B, Lk, C); `bias` additive, broadcastable to (B, heads, Lq, Lk).
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, lq, c) = q.dims3()?;
        let lk = k.dim(1)?;
        let hd = c / self.heads;
        let split = |x: Tensor, l: usize| -> Result<Tensor> {
            Ok(x.reshape((b, l, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let qh = split((self.q.forward(q)? * scale)?, lq)?;
        let kh = split(self.k.forward(k)?, lk)?;
        let vh = split(self.v.forward(v)?, lk)?;
        let mut att = qh.matmul(&kh.t()?)?;
        if let Some(bias) = bias {
            att = att.broadcast_add(bias)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&vh)?.transpose(1, 2)?.reshape((b, lq, c))?;
        self.out.forward(&y)
    }
}

/// Bilinear resize of (B, C, H, W), PyTorch's `interpolate(mode="bilinear", align_corners=False)`.
pub fn resize_bilinear(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    Ok(x.contiguous()?.upsample_bilinear2d(h, w, false)?)
}
