//! The GELU-gated linear unit `value · gelu(gate)` of the UNet's feed-forward, where value and
//! gate are the two halves of the last dimension: one pass forward, one backward.
//!
//! Composed, it is a narrow, an erf-GELU and a product forward, and about a dozen passes back
//! (candle differentiates the exact GELU through exp, erf and five scalar ops). Here the forward
//! pass is one loop, and the backward pass writes d value = grad · gelu(gate) and
//! d gate = grad · value · gelu′(gate) at once, from the Φ(gate) the forward pass kept (only
//! when a backward pass can follow). In f32 erf is a branch-free rational approximation that
//! vectorises ([`erf_f32`]); libm's scalar erf was the largest cost after the matrix products.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

use super::contiguous_slice;

/// Element types of the kernels, each with the erf and normal density they compute with.
trait Erf: super::Real {
    fn erf(self) -> Self;
    /// The standard normal density exp(−x²/2)/√(2π).
    fn gauss(self) -> Self {
        (-(self * self) * Self::of(0.5)).exp() * Self::FRAC_1_SQRT_2PI
    }
    const FRAC_1_SQRT_2: Self;
    /// 1 / √(2π).
    const FRAC_1_SQRT_2PI: Self;
}

/// erf in f32 to within 4e-7 absolute: x·P(x²)/Q(x²) on x clamped to ±4 (where erf is 1 to f32
/// precision), with P of degree 6 and Q of degree 4 fitted for the smallest largest error on
/// [0, 4]. No branch, so that loops over it vectorise.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    const P: [f32; 7] = [
        1.128_378_7,
        0.214_029_99,
        0.052_445_146,
        0.004_296_896,
        1.556_437e-4,
        -1.991_011_4e-6,
        1.921_999_2e-8,
    ];
    const Q: [f32; 5] = [
        1.0,
        0.523_006_8,
        0.120_835_25,
        0.015_558_675,
        0.001_099_019_2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let t = x * x;
    let mut p = P[6];
    for &c in P[..6].iter().rev() {
        p = p * t + c;
    }
    let mut q = Q[4];
    for &c in Q[..4].iter().rev() {
        q = q * t + c;
    }
    x * p / q
}

impl Erf for f32 {
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
    #[inline(always)]
    fn gauss(self) -> Self {
        super::exp_f32(-(self * self) * 0.5) * Self::FRAC_1_SQRT_2PI
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

/// The output, and when `keep_cdf` the normal CDF `Φ(gate)` of every gate for the backward pass.
#[inline(always)]
fn forward<T: Erf>(h: &[T], half: usize, keep_cdf: bool) -> (Vec<T>, Vec<T>) {
    let mut out = vec![T::zero(); h.len() / 2];
    let mut cdf = if keep_cdf {
        vec![T::zero(); h.len() / 2]
    } else {
        Vec::new()
    };
    // Without `keep_cdf` the CDF buffer is empty and yields no rows.
    let mut cdf_rows = cdf.chunks_exact_mut(half);
    for (row, o) in h.chunks_exact(2 * half).zip(out.chunks_exact_mut(half)) {
        let (value, gate) = row.split_at(half);
        forward_row(value, gate, o, cdf_rows.next());
    }
    (out, cdf)
}

#[inline(always)]
fn forward_row<T: Erf>(value: &[T], gate: &[T], out: &mut [T], cdf: Option<&mut [T]>) {
    let phi = |g: T| ((g * T::FRAC_1_SQRT_2).erf() + T::one()) * T::of(0.5);
    match cdf {
        Some(cdf) => {
            for (((o, c), &v), &g) in out.iter_mut().zip(cdf).zip(value).zip(gate) {
                *c = phi(g);
                *o = v * (*c * g);
            }
        }
        None => {
            for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
                *o = v * (phi(g) * g);
            }
        }
    }
}

super::simd_dispatch!(
    /// [`forward`] with the CPU's widest vectors.
    fn forward_f32(h: &[f32], half: usize, keep_cdf: bool) -> (Vec<f32>, Vec<f32>) => forward
);

fn backward<T: Erf>(h: &[T], cdf: &[T], grad: &[T], half: usize) -> Vec<T> {
    let mut out = vec![T::zero(); h.len()];
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
            d_value[j] = dy * c * g;
            d_gate[j] = dy * v * (c + g * g.gauss());
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

/// Keeps the forward pass's Φ(gate) for the backward pass (one erf per element, not two), when
/// one can follow.
struct Geglu {
    keep_cdf: bool,
    cdf: Mutex<Option<Tensor>>,
}

impl Geglu {
    fn new(keep_cdf: bool) -> Self {
        Self {
            keep_cdf,
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
        let keep = self.keep_cdf;
        let cpu = candle_core::Device::Cpu;
        let (out, cdf) = match s {
            CpuStorage::F32(_) => {
                let (o, c) = forward_f32(contiguous_slice(self.name(), s, l)?, half, keep);
                let c = keep
                    .then(|| Tensor::from_vec(c, &shape, &cpu))
                    .transpose()?;
                (CpuStorage::F32(o), c)
            }
            CpuStorage::F64(_) => {
                let (o, c) = forward::<f64>(contiguous_slice(self.name(), s, l)?, half, keep);
                let c = keep
                    .then(|| Tensor::from_vec(c, &shape, &cpu))
                    .transpose()?;
                (CpuStorage::F64(o), c)
            }
            _ => candle_core::bail!("geglu: only f32 and f64"),
        };
        if let (Some(cdf), Ok(mut slot)) = (cdf, self.cdf.lock()) {
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
            h.apply_op1(Geglu::new(true))
        } else {
            h.apply_op1_no_bwd(&Geglu::new(false))
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
    fn erf_f32_is_within_4e7_of_erf() {
        // Every 1/4096 from −6 to 6, against f64 erf: the whole clamped range and beyond it.
        let mut worst = 0f64;
        for i in -24_576..=24_576 {
            let x = i as f32 / 4096.0;
            let exact = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf_f32(x) as f64 - exact).abs());
        }
        assert!(worst < 4e-7, "erf_f32 is off by {worst}");
        assert_eq!(erf_f32(0.0), 0.0);
        assert_eq!(erf_f32(-1.5), -erf_f32(1.5));
        assert_eq!(erf_f32(f32::INFINITY), erf_f32(4.0));
    }

    #[test]
    fn forward_matches_candle_and_gradients_match() -> Result<()> {
        let dev = Device::Cpu;
        let h = (Tensor::randn(0f32, 2., (3, 5, 8), &dev)? + 0.25)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
            (a - b)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()
        };
        // f32: within the approximate erf's error times the values' size; f64: bit for bit.
        let err = max_diff(&geglu(&h)?, &composed(&h)?)?;
        assert!(err < 5e-6, "f32 forward differs by {err}");
        let h64 = h.to_dtype(DType::F64)?;
        assert_eq!(max_diff(&geglu(&h64)?, &composed(&h64)?)?, 0.0);
        for dt in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&h.to_dtype(dt)?)?;
            let probe = Tensor::randn(0f32, 1., (3, 5, 4), &dev)?.to_dtype(dt)?;
            let ga = (geglu(x.as_tensor())? * &probe)?.sum_all()?.backward()?;
            let gb = (composed(x.as_tensor())? * &probe)?.sum_all()?.backward()?;
            let (a, b) = (
                ga.get(&x).expect("geglu gradient"),
                gb.get(&x).expect("candle gradient"),
            );
            let err = max_diff(a, b)?;
            // candle's own gradient rounds 1/√(2π) to 0.398942.
            assert!(err < 1e-5, "{dt:?}: gradients differ by {err}");
        }
        Ok(())
    }
}
