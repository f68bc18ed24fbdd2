//! RF-inversion for rectified-flow models (Rout et al., "Semantic Image Inversion and Editing
//! using Rectified Stochastic Differential Equations"): image latent → noise by a *controlled*
//! forward ODE, and noise → image by a controlled reverse ODE.
//!
//! Conventions as in [`crate::flow_match`]: x_σ = (1 − σ)·x₀ + σ·ε, the model's velocity
//! v(x, σ) ≈ ε − x₀, σ runs from 1 (noise) to 0 (image) while sampling. The schedule is a
//! sampler's σ list (N values from 1 down, then the terminal 0).
//!
//! - Forward (inversion), σ ascending from 0 over the reversed schedule: the drift is pulled
//!   towards a fixed noise sample y₁ with strength γ:
//!   u = v(x, σ) + γ·((y₁ − x)/(1 − σ) − v(x, σ)),  x ← x + (σ_next − σ)·u.
//! - Reverse (reconstruction), σ descending: for steps in [start, stop) the drift is pulled
//!   towards the clean latent y₀ with strength η:
//!   u = v(x, σ) + η·((x − y₀)/σ − v(x, σ)),  x ← x + (σ_next − σ)·u
//!   (the paper's v_t = −v in its time t = 1 − σ; the same update written in ours).
//!
//! γ = 0 is plain Euler inversion and η = 0 plain Euler sampling.

use candle_core::{DType, Tensor};

use crate::error::{DiffusionError, Result};
use crate::flow_match::euler_step;

/// The controller strengths and where the reverse controller acts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RfInversionConfig {
    /// γ: pull of the forward ODE towards the noise sample (0: plain inversion).
    pub gamma: f64,
    /// η: pull of the reverse ODE towards the clean latent (0: plain sampling).
    pub eta: f64,
    /// The reverse controller acts during steps [start·N, stop·N) of N (τ = stop).
    pub start: f64,
    pub stop: f64,
}

impl Default for RfInversionConfig {
    /// γ = 0.5, η = 0.9 over the first quarter of the reverse steps: faithful reconstructions
    /// whose late steps are left to the model (the paper's reconstruction/editing regime).
    fn default() -> Self {
        Self {
            gamma: 0.5,
            eta: 0.9,
            start: 0.0,
            stop: 0.25,
        }
    }
}

impl RfInversionConfig {
    /// No control: plain Euler inversion and sampling.
    pub fn plain() -> Self {
        Self {
            gamma: 0.0,
            eta: 0.0,
            start: 0.0,
            stop: 0.0,
        }
    }

    fn check(&self) -> Result<()> {
        for (what, v) in [("gamma", self.gamma), ("eta", self.eta)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(DiffusionError::InvalidArgument {
                    what: format!("RF-inversion {what}"),
                    reason: format!("{v}; expected 0..=1"),
                });
            }
        }
        if !(0.0 <= self.start && self.start <= self.stop && self.stop <= 1.0) {
            return Err(DiffusionError::InvalidArgument {
                what: "RF-inversion start/stop".into(),
                reason: format!(
                    "{}..{}; expected 0 ≤ start ≤ stop ≤ 1",
                    self.start, self.stop
                ),
            });
        }
        Ok(())
    }

    /// The η of reverse step `index` of `steps`.
    pub fn eta_at(&self, index: usize, steps: usize) -> f64 {
        let (lo, hi) = (
            (self.start * steps as f64) as usize,
            ((self.stop * steps as f64) as usize).min(steps),
        );
        if (lo..hi).contains(&index) {
            self.eta
        } else {
            0.0
        }
    }
}

fn check_sigmas(sigmas: &[f64]) -> Result<()> {
    let ok = sigmas.len() >= 2
        && sigmas.last() == Some(&0.0)
        && sigmas.windows(2).all(|w| w[0] > w[1])
        && sigmas[0] <= 1.0;
    if ok {
        Ok(())
    } else {
        Err(DiffusionError::InvalidArgument {
            what: "RF-inversion sigmas".into(),
            reason: format!("expected a decreasing list in (0, 1] ending with 0 (a sampler's schedule), got {sigmas:?}"),
        })
    }
}

/// u = v + k·(target_field − v), in f32.
fn controlled(v: &Tensor, field: &Tensor, k: f64) -> Result<Tensor> {
    let v = v.to_dtype(DType::F32)?;
    if k == 0.0 {
        return Ok(v);
    }
    Ok((&v + ((field.to_dtype(DType::F32)? - &v)? * k)?)?)
}

/// Inverts the clean latent `y0` to noise over the reversed `sigmas` with controller γ towards
/// `noise` (same shape). `velocity(step, x, σ)` evaluates the model, `step` counting the forward
/// steps from 0. Returns the latent at σ = σ₀ (1 for a full schedule).
pub fn rf_invert<F>(
    y0: &Tensor,
    noise: &Tensor,
    sigmas: &[f64],
    cfg: &RfInversionConfig,
    mut velocity: F,
) -> Result<Tensor>
where
    F: FnMut(usize, &Tensor, f64) -> Result<Tensor>,
{
    cfg.check()?;
    check_sigmas(sigmas)?;
    crate::transfer::check_same_shape("RF-inversion noise vs latent", noise, y0)?;
    let noise = noise.to_dtype(DType::F32)?;
    let mut x = y0.clone();
    let n = sigmas.len() - 1;
    for (step, k) in (1..=n).rev().enumerate() {
        let (sigma, next) = (sigmas[k], sigmas[k - 1]);
        let v = velocity(step, &x, sigma)?;
        // The field that carries x straight to y₁ by σ = 1.
        let field = if cfg.gamma > 0.0 {
            ((&noise - x.to_dtype(DType::F32)?)? / (1.0 - sigma))?
        } else {
            v.clone()
        };
        let u = controlled(&v, &field, cfg.gamma)?;
        x = euler_step(&x, &u, sigma, next)?;
    }
    Ok(x)
}

/// Samples from the inverted latent `x1` over `sigmas` with controller η towards the clean
/// latent `y0` (see [`RfInversionConfig::eta_at`]). `velocity(step, x, σ)` evaluates the model.
pub fn rf_reconstruct<F>(
    x1: &Tensor,
    y0: &Tensor,
    sigmas: &[f64],
    cfg: &RfInversionConfig,
    mut velocity: F,
) -> Result<Tensor>
where
    F: FnMut(usize, &Tensor, f64) -> Result<Tensor>,
{
    cfg.check()?;
    check_sigmas(sigmas)?;
    crate::transfer::check_same_shape("RF-inversion clean latent vs latent", y0, x1)?;
    let y0 = y0.to_dtype(DType::F32)?;
    let steps = sigmas.len() - 1;
    let mut x = x1.clone();
    for (index, pair) in sigmas.windows(2).enumerate() {
        let (sigma, next) = (pair[0], pair[1]);
        let v = velocity(index, &x, sigma)?;
        let eta = cfg.eta_at(index, steps);
        // The field that carries x straight to y₀ by σ = 0 (σ > 0 at every evaluated step).
        let field = if eta > 0.0 {
            ((x.to_dtype(DType::F32)? - &y0)? / sigma)?
        } else {
            v.clone()
        };
        let u = controlled(&v, &field, eta)?;
        x = euler_step(&x, &u, sigma, next)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn vals(x: &Tensor) -> Vec<f32> {
        x.to_vec1::<f32>().unwrap()
    }

    /// A velocity field that depends on x and σ, so inversion is not trivially exact.
    fn field(x: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(((x * (0.3 + sigma))? + 0.1)?)
    }

    const SIGMAS: [f64; 5] = [1.0, 0.8, 0.5, 0.2, 0.0];

    #[test]
    fn plain_inversion_is_euler_backwards() {
        let y0 = t(&[0.5, -1.0]);
        let noise = t(&[9.0, 9.0]);
        let got = rf_invert(
            &y0,
            &noise,
            &SIGMAS,
            &RfInversionConfig::plain(),
            |_, x, s| field(x, s),
        )
        .unwrap();
        // Direct: x ← x + (σ_{k−1} − σ_k)·v(x, σ_k) for k = N..1.
        let mut x = vec![0.5f64, -1.0];
        for k in (1..SIGMAS.len()).rev() {
            let (s, next) = (SIGMAS[k], SIGMAS[k - 1]);
            x = x
                .iter()
                .map(|&xi| xi + (next - s) * (xi * (0.3 + s) + 0.1))
                .collect();
        }
        for (g, w) in vals(&got).iter().zip(&x) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn plain_reconstruction_is_euler_sampling() {
        let x1 = t(&[0.3, 0.7]);
        let y0 = t(&[5.0, 5.0]);
        let got = rf_reconstruct(&x1, &y0, &SIGMAS, &RfInversionConfig::plain(), |_, x, s| {
            field(x, s)
        })
        .unwrap();
        let mut x = vec![0.3f64, 0.7];
        for w in SIGMAS.windows(2) {
            x = x
                .iter()
                .map(|&xi| xi + (w[1] - w[0]) * (xi * (0.3 + w[0]) + 0.1))
                .collect();
        }
        for (g, w) in vals(&got).iter().zip(&x) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn full_control_lands_on_the_targets() {
        // γ = 1: the forward ODE follows the straight line to the noise sample exactly.
        let y0 = t(&[0.5, -1.0]);
        let noise = t(&[2.0, 3.0]);
        let cfg = RfInversionConfig {
            gamma: 1.0,
            eta: 1.0,
            start: 0.0,
            stop: 1.0,
        };
        let x1 = rf_invert(&y0, &noise, &SIGMAS, &cfg, |_, x, s| field(x, s)).unwrap();
        for (g, w) in vals(&x1).iter().zip([2.0f32, 3.0]) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        // η = 1 throughout: the reverse ODE returns to y0 whatever the model says.
        let back = rf_reconstruct(&x1, &y0, &SIGMAS, &cfg, |_, x, s| field(x, s)).unwrap();
        for (g, w) in vals(&back).iter().zip([0.5f32, -1.0]) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn eta_window() {
        let cfg = RfInversionConfig {
            gamma: 0.5,
            eta: 0.9,
            start: 0.0,
            stop: 0.25,
        };
        let on: Vec<usize> = (0..28).filter(|&i| cfg.eta_at(i, 28) > 0.0).collect();
        assert_eq!(on, (0..7).collect::<Vec<_>>());
        assert!(RfInversionConfig { gamma: 2.0, ..cfg }.check().is_err());
    }
}
