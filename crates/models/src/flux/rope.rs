//! FLUX's rotary position embedding over three axes: each token has an id (axis 0, row, col);
//! text tokens are all zero, image tokens carry their row and column in the packed latent grid.
//! Each axis rotates its own slice of the head dimension (`axes_dims_rope`, summing to head_dim).

use candle_core::{DType, Device, Result, Tensor};

/// Position ids of a packed latent grid: (h·w, 3) rows of (0, row, col), row-major.
pub fn image_ids(height: usize, width: usize, device: &Device) -> Result<Tensor> {
    let ids: Vec<f32> = (0..height * width)
        .flat_map(|q| [0.0, (q / width) as f32, (q % width) as f32])
        .collect();
    Tensor::from_vec(ids, (height * width, 3), device)
}

/// Position ids of `tokens` text tokens: all zero.
pub fn text_ids(tokens: usize, device: &Device) -> Result<Tensor> {
    Tensor::zeros((tokens, 3), DType::F32, device)
}

/// Rotation angles' cosines and sines, each (1, 1, seq, head_dim/2, 1) in f32.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `ids`: (seq, axes) positions; angles are computed in f64 like diffusers, then stored in f32.
    pub fn new(ids: &Tensor, axes_dims: &[usize], theta: f64) -> Result<Self> {
        let (seq, axes) = ids.dims2()?;
        if axes != axes_dims.len() {
            candle_core::bail!(
                "rope: ids have {axes} axes, axes_dims_rope has {}",
                axes_dims.len()
            );
        }
        let pos = ids
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f64>()?;
        let half: usize = axes_dims.iter().map(|d| d / 2).sum();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for row in &pos {
            for (axis, &dim) in axes_dims.iter().enumerate() {
                for j in 0..dim / 2 {
                    let freq = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                    let angle = row[axis] * freq;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let dev = ids.device();
        let shape = (1, 1, seq, half, 1);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, dev)?,
            sin: Tensor::from_vec(sin, shape, dev)?,
        })
    }

    /// Rotates consecutive pairs (x₂ᵢ, x₂ᵢ₊₁) of `xs` (batch, heads, seq, head_dim), in f32.
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, s, d) = xs.dims4()?;
        let dtype = xs.dtype();
        let pairs = xs.to_dtype(DType::F32)?.reshape((b, h, s, d / 2, 2))?;
        let re = pairs.narrow(4, 0, 1)?;
        let im = pairs.narrow(4, 1, 1)?;
        let out_re = (re.broadcast_mul(&self.cos)? - im.broadcast_mul(&self.sin)?)?;
        let out_im = (im.broadcast_mul(&self.cos)? + re.broadcast_mul(&self.sin)?)?;
        Tensor::cat(&[out_re, out_im], 4)?
            .reshape((b, h, s, d))?
            .to_dtype(dtype)
    }
}
