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
//! γ = 0 is plain Euler inversion and η = 0 plain Euler sampling. Both flows are
//! [`Scheduler`]s ([`RfInversionFlow`], [`RfReconstructionFlow`]) run by the one sampling loop,
//! [`crate::sample`].

use candle_core::{DType, Tensor};

use crate::error::{DiffusionError, Result};
use crate::flow_match::euler_step;
use crate::sample::Scheduler;
use crate::transfer::check_same_shape;

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
    /// γ = 1, η = 1 at every reverse step: the reconstruction held to the image throughout, as
    /// Learn-to-Steer builds its FLUX training data (the maps then show the image's layout).
    pub fn held_to_image() -> Self {
        Self {
            gamma: 1.0,
            eta: 1.0,
            start: 0.0,
            stop: 1.0,
        }
    }

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

/// The forward (inverting) flow as a [`Scheduler`]: step s goes from σ_k to σ_{k−1}, k = N − s,
/// with the drift pulled towards the noise sample by γ. Sampled from the clean latent y₀, it ends
/// at the latent at σ₀ (1 for a full schedule).
pub struct RfInversionFlow {
    sigmas: Vec<f64>,
    noise: Tensor,
    gamma: f64,
}

impl RfInversionFlow {
    /// `sigmas`: a sampler's schedule (N values from 1 down, then 0); `noise`: y₁, shaped as the
    /// latent.
    pub fn new(sigmas: &[f64], noise: &Tensor, cfg: &RfInversionConfig) -> Result<Self> {
        cfg.check()?;
        check_sigmas(sigmas)?;
        Ok(Self {
            sigmas: sigmas.to_vec(),
            noise: noise.to_dtype(DType::F32)?,
            gamma: cfg.gamma,
        })
    }

    fn levels(&self, index: usize) -> (f64, f64) {
        let k = self.sigmas.len() - 1 - index;
        (self.sigmas[k], self.sigmas[k - 1])
    }
}

impl Scheduler for RfInversionFlow {
    fn name(&self) -> &'static str {
        "RF-inversion"
    }
    fn num_steps(&self) -> usize {
        self.sigmas.len() - 1
    }
    fn model_time(&self, index: usize) -> f64 {
        self.levels(index).0
    }
    fn timestep(&self, index: usize) -> usize {
        (self.levels(index).0 * 1000.0).round() as usize
    }
    fn step_at(&self, index: usize, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        check_same_shape("RF-inversion noise vs latent", &self.noise, x)?;
        let (sigma, next) = self.levels(index);
        // The field that carries x straight to y₁ by σ = 1.
        let field = if self.gamma > 0.0 {
            ((&self.noise - x.to_dtype(DType::F32)?)? / (1.0 - sigma))?
        } else {
            v.clone()
        };
        euler_step(x, &controlled(v, &field, self.gamma)?, sigma, next)
    }
}

/// The reverse (reconstructing) flow as a [`Scheduler`]: Euler steps over `sigmas` with the drift
/// pulled towards the clean latent y₀ by η during the config's window
/// ([`RfInversionConfig::eta_at`]).
pub struct RfReconstructionFlow {
    sigmas: Vec<f64>,
    clean: Tensor,
    cfg: RfInversionConfig,
}

impl RfReconstructionFlow {
    pub fn new(sigmas: &[f64], clean: &Tensor, cfg: &RfInversionConfig) -> Result<Self> {
        cfg.check()?;
        check_sigmas(sigmas)?;
        Ok(Self {
            sigmas: sigmas.to_vec(),
            clean: clean.to_dtype(DType::F32)?,
            cfg: *cfg,
        })
    }
}

impl Scheduler for RfReconstructionFlow {
    fn name(&self) -> &'static str {
        "RF-inversion reconstruction"
    }
    fn num_steps(&self) -> usize {
        self.sigmas.len() - 1
    }
    fn model_time(&self, index: usize) -> f64 {
        self.sigmas[index]
    }
    fn timestep(&self, index: usize) -> usize {
        (self.sigmas[index] * 1000.0).round() as usize
    }
    fn step_at(&self, index: usize, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        check_same_shape("RF-inversion clean latent vs latent", &self.clean, x)?;
        let (sigma, next) = (self.sigmas[index], self.sigmas[index + 1]);
        let eta = self.cfg.eta_at(index, self.num_steps());
        // The field that carries x straight to y₀ by σ = 0 (σ > 0 at every evaluated step).
        let field = if eta > 0.0 {
            ((x.to_dtype(DType::F32)? - &self.clean)? / sigma)?
        } else {
            v.clone()
        };
        euler_step(x, &controlled(v, &field, eta)?, sigma, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::{Denoiser, Guidance};
    use crate::sample::{sample, NoHook};
    use candle_core::Device;

    /// The test field as a denoiser (its time is σ).
    struct Field;

    impl Denoiser for Field {
        type Cond = ();
        fn predict(&mut self, x: &Tensor, sigma: f64, _: &()) -> Result<Tensor> {
            field(x, sigma)
        }
    }

    fn rf_invert(
        y0: &Tensor,
        noise: &Tensor,
        sigmas: &[f64],
        cfg: &RfInversionConfig,
    ) -> Result<Tensor> {
        let flow = RfInversionFlow::new(sigmas, noise, cfg)?;
        sample(
            &mut Field,
            &flow,
            y0.clone(),
            &Guidance::Unguided(()),
            &mut NoHook,
        )
    }

    fn rf_reconstruct(
        x1: &Tensor,
        y0: &Tensor,
        sigmas: &[f64],
        cfg: &RfInversionConfig,
    ) -> Result<Tensor> {
        let flow = RfReconstructionFlow::new(sigmas, y0, cfg)?;
        sample(
            &mut Field,
            &flow,
            x1.clone(),
            &Guidance::Unguided(()),
            &mut NoHook,
        )
    }

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
        let got = rf_invert(&y0, &noise, &SIGMAS, &RfInversionConfig::plain()).unwrap();
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
        let got = rf_reconstruct(&x1, &y0, &SIGMAS, &RfInversionConfig::plain()).unwrap();
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
        let x1 = rf_invert(&y0, &noise, &SIGMAS, &cfg).unwrap();
        for (g, w) in vals(&x1).iter().zip([2.0f32, 3.0]) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        // η = 1 throughout: the reverse ODE returns to y0 whatever the model says.
        let back = rf_reconstruct(&x1, &y0, &SIGMAS, &cfg).unwrap();
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
