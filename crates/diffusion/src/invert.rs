//! DDIM inversion, plain or refined by fixed-point iterations.
//!
//! Entry point: [`ddim_invert`].
//!
//! A DDIM sampling step from z_t (model output ε_θ(z_t, t)) gives z_s, s = t − Δ. Inverting it
//! means finding z_t from z_s:
//!
//! ```text
//! z_t = Inv(ε_θ(z_t, t); z_s)          Inv(ε; z_s) = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε,  x₀ = (z_s − √(1−ᾱ_s)·ε)/√ᾱ_s
//! ```
//!
//! (written for ε-prediction; v and x₀ predictions go through the same scheduler step). The
//! unknown z_t appears on both sides. Plain DDIM inversion (diffusers' `DDIMInverseScheduler`
//! loop) evaluates the model on the sample it has, z_s: z_t ≈ Inv(ε_θ(z_s, t); z_s). Fixed-point
//! inversion then iterates the equation itself, each time re-estimating ε at the current guess:
//!
//! ```text
//! z⁽⁰⁾ = Inv(ε_θ(z_s, t); z_s),    z⁽ᵏ⁺¹⁾ = Inv(ε_θ(z⁽ᵏ⁾, t); z_s),   k = 0 … n−1
//! ```
//!
//! With n = 0 this is plain DDIM inversion; each iteration costs one more model call per step.
//! The map is a contraction when the model's ε changes slowly with z (‖∂ε/∂z‖ times the step's
//! noise coefficient below 1), which holds for the small steps of 50-step schedules.

use candle_core::{DType, Tensor};

use crate::denoiser::{guided_prediction, Denoiser, Guidance};
use crate::error::{DiffusionError, Result};
use crate::inverse::DdimInverseScheduler;

/// What the per-step callback of [`ddim_invert`] sees.
pub struct InversionStepInfo<'a> {
    /// 0-based index of the step.
    pub index: usize,
    pub num_steps: usize,
    /// The timestep the step reached.
    pub timestep: usize,
    /// The latents at that timestep.
    pub latents: &'a Tensor,
    /// ‖z⁽ⁿ⁾ − z⁽ⁿ⁻¹⁾‖ / ‖z⁽ⁿ⁾‖ of the last fixed-point iteration; `None` when n = 0.
    pub residual: Option<f64>,
}

/// The result of an inversion.
#[derive(Clone, Debug)]
pub struct DdimInversion {
    latents: Tensor,
    trajectory: Vec<Tensor>,
    fixed_point_residuals: Vec<f64>,
}

impl DdimInversion {
    /// The fully inverted latents (the last trajectory entry).
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }

    /// The latents before the first step (the input) and after every step: steps + 1 entries,
    /// from the clean end to the noisiest.
    pub fn trajectory(&self) -> &[Tensor] {
        &self.trajectory
    }

    pub fn into_trajectory(self) -> Vec<Tensor> {
        self.trajectory
    }

    /// Per step, the relative size of the last fixed-point update (how far from converged the
    /// step is); empty when no fixed-point iterations were asked for.
    pub fn fixed_point_residuals(&self) -> &[f64] {
        &self.fixed_point_residuals
    }
}

fn norm(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f64>()?)
}

/// Inverts `latents` (a clean or lightly noised sample at the inverse scheduler's start level)
/// over all of `scheduler`'s timesteps. `fixed_point_iterations` = n refines every step with n
/// fixed-point iterations (0: plain DDIM inversion). `on_step` is called after every step.
/// `scheduler.set_timesteps` must have been called.
pub fn ddim_invert<D, F>(
    denoiser: &mut D,
    scheduler: &DdimInverseScheduler,
    latents: Tensor,
    guidance: &Guidance<D::Cond>,
    fixed_point_iterations: usize,
    mut on_step: F,
) -> Result<DdimInversion>
where
    D: Denoiser + ?Sized,
    F: FnMut(&InversionStepInfo<'_>) -> Result<()>,
{
    if scheduler.num_inference_steps().is_none() {
        return Err(DiffusionError::TimestepsNotSet {
            scheduler: "DdimInverseScheduler",
        });
    }
    let timesteps = scheduler.timesteps();
    let mut trajectory = Vec::with_capacity(timesteps.len() + 1);
    let mut residuals = Vec::new();
    let mut z_s = latents;
    for (index, &t) in timesteps.iter().enumerate() {
        // z⁽⁰⁾: the model evaluated on the sample we have.
        let eps = guided_prediction(denoiser, &z_s, t as f64, guidance)?;
        let mut z_t = scheduler.step(&eps, t, &z_s)?.prev_sample;
        let mut residual = None;
        for k in 0..fixed_point_iterations {
            // z⁽ᵏ⁺¹⁾ = Inv(ε_θ(z⁽ᵏ⁾, t); z_s)
            let eps = guided_prediction(denoiser, &z_t, t as f64, guidance)?;
            let next = scheduler.step(&eps, t, &z_s)?.prev_sample;
            if k + 1 == fixed_point_iterations {
                let denom = norm(&next)?;
                let change = norm(&(&next - &z_t)?)?;
                residual = Some(if denom > 0.0 { change / denom } else { change });
            }
            z_t = next;
        }
        if let Some(r) = residual {
            residuals.push(r);
        }
        on_step(&InversionStepInfo {
            index,
            num_steps: timesteps.len(),
            timestep: t,
            latents: &z_t,
            residual,
        })?;
        trajectory.push(std::mem::replace(&mut z_s, z_t));
    }
    trajectory.push(z_s.clone());
    Ok(DdimInversion {
        latents: z_s,
        trajectory,
        fixed_point_residuals: residuals,
    })
}
