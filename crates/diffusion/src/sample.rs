//! The DDIM sampling loop.
//!
//! Entry point: [`ddim_sample`]. A loop that must do more between steps than a callback can
//! (e.g. steering, which needs the model itself) is written with [`denoise_step`], one guided
//! model call plus one scheduler step.

use candle_core::Tensor;

use crate::ddim::DdimScheduler;
use crate::denoiser::{guided_prediction, Denoiser, Guidance};
use crate::error::{DiffusionError, Result};
use crate::transfer::StepOutput;

/// What the per-step callback sees, after the step was taken.
pub struct StepInfo<'a> {
    /// 0-based index of the step.
    pub index: usize,
    /// Number of steps of the whole loop.
    pub num_steps: usize,
    /// The timestep the step started from.
    pub timestep: usize,
    /// z_t, the latents the step started from.
    pub latents: &'a Tensor,
    /// The (guided) model output at (z_t, t).
    pub model_output: &'a Tensor,
    /// z_{t−Δ} and the x₀ estimate.
    pub output: &'a StepOutput,
}

/// What the loop does after a callback.
#[derive(Clone, Debug)]
pub enum StepControl {
    /// Go on with the step's `prev_sample`.
    Continue,
    /// Go on with these latents instead (same shape).
    Replace(Tensor),
    /// End the loop now and return the step's `prev_sample`.
    Stop,
}

/// One guided model evaluation at (`latents`, `timestep`) followed by one DDIM step.
/// Returns the model output and the step result.
pub fn denoise_step<D: Denoiser + ?Sized>(
    denoiser: &mut D,
    scheduler: &DdimScheduler,
    latents: &Tensor,
    timestep: usize,
    guidance: &Guidance<D::Cond>,
) -> Result<(Tensor, StepOutput)> {
    let model_output = guided_prediction(denoiser, latents, timestep as f64, guidance)?;
    let output = scheduler.step(&model_output, timestep, latents)?;
    Ok((model_output, output))
}

/// Runs DDIM from `latents` (noise scaled by `init_noise_sigma`, which is 1) over all of the
/// scheduler's timesteps and returns the final latents. `on_step` is called after every step.
/// `scheduler.set_timesteps` must have been called.
pub fn ddim_sample<D, F>(
    denoiser: &mut D,
    scheduler: &DdimScheduler,
    latents: Tensor,
    guidance: &Guidance<D::Cond>,
    mut on_step: F,
) -> Result<Tensor>
where
    D: Denoiser + ?Sized,
    F: FnMut(&StepInfo<'_>) -> Result<StepControl>,
{
    if scheduler.num_inference_steps().is_none() {
        return Err(DiffusionError::TimestepsNotSet {
            scheduler: "DdimScheduler",
        });
    }
    let timesteps = scheduler.timesteps();
    let mut z = latents;
    for (index, &t) in timesteps.iter().enumerate() {
        let (model_output, output) = denoise_step(denoiser, scheduler, &z, t, guidance)?;
        let info = StepInfo {
            index,
            num_steps: timesteps.len(),
            timestep: t,
            latents: &z,
            model_output: &model_output,
            output: &output,
        };
        match on_step(&info)? {
            StepControl::Continue => z = output.prev_sample,
            StepControl::Replace(new) => {
                crate::transfer::check_same_shape("replacement vs latents", &new, &z)?;
                z = new;
            }
            StepControl::Stop => return Ok(output.prev_sample),
        }
    }
    Ok(z)
}
