//! The GELU-gated linear unit `value · gelu(gate)` of the UNet's feed-forward, where value and
//! gate are the two halves of the last dimension: one pass forward, one backward.
//!
//! Composed, it is a narrow, an erf-GELU and a product forward, and about a dozen passes back
//! (candle differentiates the exact GELU through exp, erf and five scalar ops). The forward pass
//! here computes each element exactly as candle's ops do, so outputs are bit-identical; the
//! backward pass writes d value = grad · gelu(gate) and d gate = grad · value · gelu′(gate) at once,
//! from the Φ(gate) the forward pass kept.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

use super::contiguous_slice;

/// Element types with candle's erf.
trait Erf: super::Real {
    fn erf(self) -> Self;
    const FRAC_1_SQRT_2: Self;
    /// 1 / √(2π).
    const FRAC_1_SQRT_2PI: Self;
}

impl Erf for f32 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
    const FRAC_1_SQRT_2: Self = std::f32::consts::FRAC_1_SQRT_2;
    const FRAC_1_SQRT_2PI: Self = 0.398_942_3;
}

impl Erf for f64 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
    const FRAC_1_SQRT_2: Self = std::f64::consts::FRAC_1_SQRT_2;
    const FRAC_1_SQRT_2PI: Self = 0.398_942_280_401_432_7;
}

/// The output, and the normal CDF `Φ(gate)` of every gate for the backward pass (computed as
/// candle's `gelu_erf` computes it, so `Φ(g) · g` is candle's GELU bit for bit).
fn forward<T: Erf>(h: &[T], half: usize) -> (Vec<T>, Vec<T>) {
    let point_five = T::of(0.5);
    let mut out = Vec::with_capacity(h.len() / 2);
    let mut cdf = Vec::with_capacity(h.len() / 2);
    for row in h.chunks_exact(2 * half) {
        let (value, gate) = row.split_at(half);
        for (&v, &g) in value.iter().zip(gate) {
            let c = ((g * T::FRAC_1_SQRT_2).erf() + T::one()) * point_five;
            out.push(v * (c * g));
            cdf.push(c);
        }
    }
    (out, cdf)
}

fn backward<T: Erf>(h: &[T], cdf: &[T], grad: &[T], half: usize) -> Vec<T> {
    let mut out = vec![T::zero(); h.len()];
    let point_five = T::of(0.5);
    for (((row, c_row), g_row), o_row) in h
        .chunks_exact(2 * half)
        .zip(cdf.chunks_exact(half))
        .zip(grad.chunks_exact(half))
        .zip(out.chunks_exact_mut(2 * half))
    {
        let (value, gate) = row.split_at(half);
        let (d_value, d_gate) = o_row.split_at_mut(half);
        for j in 0..half {
            let (v, g, c, dy) = (value[j], gate[j], c_row[j], g_row[j]);
            let pdf = (-(g * g) * point_five).exp() * T::FRAC_1_SQRT_2PI;
            d_value[j] = dy * c * g;
            d_gate[j] = dy * v * (c + g * pdf);
        }
    }
    out
}

fn last_half(layout: &Layout) -> Result<usize> {
    match layout.dims().last() {
        Some(&n) if n > 0 && n % 2 == 0 => Ok(n / 2),
        _ => candle_core::bail!("geglu: last dimension of {:?} not even", layout.dims()),
    }
}

/// Keeps the forward pass's Φ(gate) for the backward pass (one erf per element, not two).
struct Geglu {
    cdf: Mutex<Option<Tensor>>,
}

impl Geglu {
    fn new() -> Self {
        Self {
            cdf: Mutex::new(None),
        }
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let half = last_half(l)?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("checked by last_half") = half;
        let shape = Shape::from(dims);
        let (out, cdf) = match s {
            CpuStorage::F32(_) => {
                let (o, c) = forward::<f32>(contiguous_slice(self.name(), s, l)?, half);
                let c = Tensor::from_vec(c, &shape, &candle_core::Device::Cpu)?;
                (CpuStorage::F32(o), c)
            }
            CpuStorage::F64(_) => {
                let (o, c) = forward::<f64>(contiguous_slice(self.name(), s, l)?, half);
                let c = Tensor::from_vec(c, &shape, &candle_core::Device::Cpu)?;
                (CpuStorage::F64(o), c)
            }
            _ => candle_core::bail!("geglu: only f32 and f64"),
        };
        if let Ok(mut slot) = self.cdf.lock() {
            *slot = Some(cdf);
        }
        Ok((out, shape))
    }

    fn bwd(&self, h: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let cdf = self.cdf.lock().ok().and_then(|c| c.clone());
        let cdf =
            cdf.ok_or_else(|| candle_core::Error::Msg("geglu: backward before forward".into()))?;
        Ok(Some(h.apply_op3_no_bwd(
            &cdf,
            &grad.contiguous()?,
            &GegluGrad,
        )?))
    }
}

/// (input, Φ(gate), output gradient) → input gradient.
struct GegluGrad;

impl candle_core::CustomOp3 for GegluGrad {
    fn name(&self) -> &'static str {
        "geglu-grad"
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
        let half = last_half(l1)?;
        for l in [l2, l3] {
            if l.dims().last() != Some(&half)
                || l.shape().elem_count() * 2 != l1.shape().elem_count()
            {
                candle_core::bail!(
                    "geglu-grad: operand of shape {:?} for input {:?}",
                    l.dims(),
                    l1.dims()
                );
            }
        }
        let name = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(backward::<f32>(
                contiguous_slice(name, s1, l1)?,
                contiguous_slice(name, s2, l2)?,
                contiguous_slice(name, s3, l3)?,
                half,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(backward::<f64>(
                contiguous_slice(name, s1, l1)?,
                contiguous_slice(name, s2, l2)?,
                contiguous_slice(name, s3, l3)?,
                half,
            )),
            _ => candle_core::bail!("geglu-grad: only f32 and f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `value · gelu(gate)` (exact, erf GELU) with `[value, gate]` the halves of the last dimension.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if super::cpu_kernel(h) {
        let h = h.contiguous()?;
        return if h.track_op() {
            h.apply_op1(Geglu::new())
        } else {
            h.apply_op1_no_bwd(&Geglu::new())
        };
    }
    composed(h)
}

/// The same with candle's ops: the reference, and the path off the CPU.
pub fn composed(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn forward_is_bit_identical_and_gradients_match() -> Result<()> {
        let dev = Device::Cpu;
        let h = (Tensor::randn(0f32, 2., (3, 5, 8), &dev)? + 0.25)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|f| f.to_bits())
                .collect())
        };
        assert_eq!(bits(&geglu(&h)?)?, bits(&composed(&h)?)?);
        for dt in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&h.to_dtype(dt)?)?;
            let probe = Tensor::randn(0f32, 1., (3, 5, 4), &dev)?.to_dtype(dt)?;
            let ga = (geglu(x.as_tensor())? * &probe)?.sum_all()?.backward()?;
            let gb = (composed(x.as_tensor())? * &probe)?.sum_all()?.backward()?;
            let (a, b) = (
                ga.get(&x).expect("geglu gradient"),
                gb.get(&x).expect("candle gradient"),
            );
            let err = (a - b)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            // candle's own gradient rounds 1/√(2π) to 0.398942.
            assert!(err < 1e-5, "{dt:?}: gradients differ by {err}");
        }
        Ok(())
    }
}
