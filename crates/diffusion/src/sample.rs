//! The sampling loop, one for every scheduler, with a step hook.
//!
//! Entry point: [`sample`]. A scheduler takes part by implementing [`Scheduler`] (DDIM, the
//! flow-matching Euler scheduler and RF-inversion's controlled flows do); whatever must happen
//! between steps — steering the latent, recording attention, progress, stopping early — is a
//! [`StepHook`], the idea of diffusers' `callback_on_step_end`, so no caller copies the loop.

use candle_core::Tensor;

use crate::denoiser::{guided_prediction_observed, Denoiser, Guidance};
use crate::error::Result;
use crate::observer::AttentionObserver;
use crate::transfer::check_same_shape;

/// A schedule of denoising steps as the loop drives it.
pub trait Scheduler {
    /// Name for error messages.
    fn name(&self) -> &'static str;
    /// Number of steps; 0 until the timesteps are set.
    fn num_steps(&self) -> usize;
    /// What the denoiser receives at step `index`: the integer timestep for DDIM, σ for flow
    /// matching (FLUX's transformer takes σ).
    fn model_time(&self, index: usize) -> f64;
    /// The step's timestep as an integer, for observers and reports (flow matching: σ·1000).
    fn timestep(&self, index: usize) -> usize;
    /// Moves `sample` by step `index` given the (guided) model output there.
    fn step_at(&self, index: usize, model_output: &Tensor, sample: &Tensor) -> Result<Tensor>;
}

/// Where the loop is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepContext {
    /// 0-based index of the step.
    pub index: usize,
    pub num_steps: usize,
    /// See [`Scheduler::timestep`].
    pub timestep: usize,
    /// See [`Scheduler::model_time`].
    pub model_time: f64,
}

/// What the loop does after a step.
#[derive(Clone, Debug)]
pub enum StepControl {
    /// Go on with the step's result.
    Continue,
    /// Go on with these latents instead (same shape).
    Replace(Tensor),
    /// End the loop now and return the step's result.
    Stop,
}

/// Called around every step of [`sample`]; every method has a do-nothing default.
pub trait StepHook<D: Denoiser + ?Sized> {
    /// Before the step's model call; returns the latents to step from. Steering moves z_t here,
    /// using `denoiser` (for example an unguided pass under `guidance.conditional()`).
    fn before_step(
        &mut self,
        step: &StepContext,
        denoiser: &mut D,
        guidance: &Guidance<D::Cond>,
        latents: Tensor,
    ) -> Result<Tensor> {
        let _ = (step, denoiser, guidance);
        Ok(latents)
    }

    /// The observer of this step's model call, if the step is watched; it sees the
    /// text-conditioned rows only.
    fn observer(&mut self, step: &StepContext) -> Option<&mut dyn AttentionObserver> {
        let _ = step;
        None
    }

    /// After the step: `output` is where it went from `latents`.
    fn after_step(
        &mut self,
        step: &StepContext,
        latents: &Tensor,
        output: &Tensor,
    ) -> Result<StepControl> {
        let _ = (step, latents, output);
        Ok(StepControl::Continue)
    }
}

/// The hook that does nothing: plain sampling.
pub struct NoHook;

impl<D: Denoiser + ?Sized> StepHook<D> for NoHook {}

/// A hook from a closure called after every step with (step, latents, output).
pub struct AfterStep<F>(pub F);

impl<D, F> StepHook<D> for AfterStep<F>
where
    D: Denoiser + ?Sized,
    F: FnMut(&StepContext, &Tensor, &Tensor) -> Result<StepControl>,
{
    fn after_step(
        &mut self,
        step: &StepContext,
        latents: &Tensor,
        output: &Tensor,
    ) -> Result<StepControl> {
        (self.0)(step, latents, output)
    }
}

/// Runs every step of `scheduler` from `latents` and returns the final latents. Each step: the
/// hook's `before_step`, one guided model evaluation (observed if the hook asks), one scheduler
/// step, the hook's `after_step`.
pub fn sample<D, S, H>(
    denoiser: &mut D,
    scheduler: &S,
    latents: Tensor,
    guidance: &Guidance<D::Cond>,
    hook: &mut H,
) -> Result<Tensor>
where
    D: Denoiser + ?Sized,
    S: Scheduler + ?Sized,
    H: StepHook<D> + ?Sized,
{
    let num_steps = scheduler.num_steps();
    if num_steps == 0 {
        return Err(crate::DiffusionError::TimestepsNotSet {
            scheduler: scheduler.name(),
        });
    }
    let mut z = latents;
    for index in 0..num_steps {
        let step = StepContext {
            index,
            num_steps,
            timestep: scheduler.timestep(index),
            model_time: scheduler.model_time(index),
        };
        let moved = hook.before_step(&step, denoiser, guidance, z.clone())?;
        check_same_shape("latents from the step hook vs latents", &moved, &z)?;
        z = moved;
        let output = guided_prediction_observed(
            denoiser,
            &z,
            step.model_time,
            guidance,
            hook.observer(&step),
        )?;
        let next = scheduler.step_at(index, &output, &z)?;
        match hook.after_step(&step, &z, &next)? {
            StepControl::Continue => z = next,
            StepControl::Replace(new) => {
                check_same_shape("replacement vs latents", &new, &z)?;
                z = new;
            }
            StepControl::Stop => return Ok(next),
        }
    }
    Ok(z)
}

impl Scheduler for crate::ddim::DdimScheduler {
    fn name(&self) -> &'static str {
        "DdimScheduler"
    }
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }
    fn model_time(&self, index: usize) -> f64 {
        self.timesteps()[index] as f64
    }
    fn timestep(&self, index: usize) -> usize {
        self.timesteps()[index]
    }
    fn step_at(&self, index: usize, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        Ok(self
            .step(model_output, self.timesteps()[index], sample)?
            .prev_sample)
    }
}
