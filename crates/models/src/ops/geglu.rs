//! The GELU-gated linear unit `value · gelu(gate)` of the UNet's feed-forward, where value and
//! gate are the two halves of the last dimension: one pass forward, one backward.
//!
//! Composed, it is a narrow, an erf-GELU and a product forward, and about a dozen passes back
//! (candle differentiates the exact GELU through exp, erf and five scalar ops). The forward pass
//! here computes each element exactly as candle's ops do, so outputs are bit-identical; the
//! backward pass writes d value = grad · gelu(gate) and d gate = grad · value · gelu′(gate) at once.

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

/// candle's `gelu_erf`, term for term.
#[inline(always)]
fn gelu<T: Erf>(g: T) -> T {
    let half = T::of(0.5);
    ((g * T::FRAC_1_SQRT_2).erf() + T::one()) * half * g
}

fn forward<T: Erf>(h: &[T], half: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(h.len() / 2);
    for row in h.chunks_exact(2 * half) {
        let (value, gate) = row.split_at(half);
        out.extend(value.iter().zip(gate).map(|(&v, &g)| v * gelu(g)));
    }
    out
}

fn backward<T: Erf>(h: &[T], grad: &[T], half: usize) -> Vec<T> {
    let mut out = vec![T::zero(); h.len()];
    let point_five = T::of(0.5);
    for ((row, g_row), o_row) in h
        .chunks_exact(2 * half)
        .zip(grad.chunks_exact(half))
        .zip(out.chunks_exact_mut(2 * half))
    {
        let (value, gate) = row.split_at(half);
        let (d_value, d_gate) = o_row.split_at_mut(half);
        for j in 0..half {
            let (v, g, dy) = (value[j], gate[j], g_row[j]);
            let cdf = ((g * T::FRAC_1_SQRT_2).erf() + T::one()) * point_five;
            let pdf = (-(g * g) * point_five).exp() * T::FRAC_1_SQRT_2PI;
            d_value[j] = dy * cdf * g;
            d_gate[j] = dy * v * (cdf + g * pdf);
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

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let half = last_half(l)?;
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(forward(contiguous_slice(self.name(), s, l)?, half))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(forward(contiguous_slice(self.name(), s, l)?, half))
            }
            _ => candle_core::bail!("geglu: only f32 and f64"),
        };
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("checked by last_half") = half;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(h.apply_op2_no_bwd(&grad.contiguous()?, &GegluGrad)?))
    }
}

/// (input, output gradient) → input gradient.
struct GegluGrad;

impl candle_core::CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let half = last_half(l1)?;
        if l2.dims().last() != Some(&half) || l2.shape().elem_count() * 2 != l1.shape().elem_count()
        {
            candle_core::bail!(
                "geglu-grad: gradient of shape {:?} for input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let name = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(backward::<f32>(
                contiguous_slice(name, s1, l1)?,
                contiguous_slice(name, s2, l2)?,
                half,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(backward::<f64>(
                contiguous_slice(name, s1, l1)?,
                contiguous_slice(name, s2, l2)?,
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
            h.apply_op1(Geglu)
        } else {
            h.apply_op1_no_bwd(&Geglu)
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
