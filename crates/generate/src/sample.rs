//! What every text-to-image run shares: progress reports, step observers, and the hook that
//! ties them to the one sampling loop ([`l2s_diffusion::sample`]).

use candle_core::Tensor;
use l2s_diffusion::{Denoiser, Guidance, StepContext, StepControl, StepHook};
use l2s_models::AttentionObserver;

/// What a long-running call is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Sampling (generation or reconstruction).
    Denoise,
    /// Inversion.
    Invert,
}

/// A progress report: `done` of `total` steps of `phase` are finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub done: usize,
    pub total: usize,
}

/// An attention observer that is told which sampling step each model pass belongs to.
pub trait StepObserver: AttentionObserver {
    /// Called before the model pass(es) of step `index` (0-based) at `timestep`. Returns whether
    /// that step is to be observed; the observer then receives the step's text-conditioned rows.
    fn begin_step(&mut self, index: usize, timestep: usize) -> bool;
}

/// A step hook that lets a [`StepObserver`] watch the steps it asks for.
pub struct ObserveSteps<'o>(pub &'o mut dyn StepObserver);

impl<D: Denoiser + ?Sized> StepHook<D> for ObserveSteps<'_> {
    fn observer(&mut self, step: &StepContext) -> Option<&mut dyn AttentionObserver> {
        if self.0.begin_step(step.index, step.timestep) {
            Some(&mut *self.0 as &mut dyn AttentionObserver)
        } else {
            None
        }
    }
}

/// Wraps a hook and reports progress after every step.
pub struct WithProgress<'h, 'p, D: Denoiser + ?Sized> {
    pub inner: &'h mut dyn StepHook<D>,
    pub phase: Phase,
    pub progress: &'p mut dyn FnMut(Progress),
}

impl<D: Denoiser + ?Sized> StepHook<D> for WithProgress<'_, '_, D> {
    fn before_step(
        &mut self,
        step: &StepContext,
        denoiser: &mut D,
        guidance: &Guidance<D::Cond>,
        latents: Tensor,
    ) -> l2s_diffusion::Result<Tensor> {
        self.inner.before_step(step, denoiser, guidance, latents)
    }

    fn observer(&mut self, step: &StepContext) -> Option<&mut dyn AttentionObserver> {
        self.inner.observer(step)
    }

    fn after_step(
        &mut self,
        step: &StepContext,
        latents: &Tensor,
        output: &Tensor,
    ) -> l2s_diffusion::Result<StepControl> {
        let control = self.inner.after_step(step, latents, output)?;
        (self.progress)(Progress {
            phase: self.phase,
            done: step.index + 1,
            total: step.num_steps,
        });
        Ok(control)
    }
}

/// Several step observers watching one run: a layer goes to every observer that wants it.
pub struct Observers<'a>(pub Vec<&'a mut dyn StepObserver>);

impl AttentionObserver for Observers<'_> {
    fn wants(&self, site: &l2s_models::AttentionSite) -> bool {
        self.0.iter().any(|o| o.wants(site))
    }
    fn observe(
        &mut self,
        site: &l2s_models::AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<()> {
        for o in self.0.iter_mut() {
            if o.wants(site) {
                o.observe(site, probs)?;
            }
        }
        Ok(())
    }
}

impl StepObserver for Observers<'_> {
    fn begin_step(&mut self, index: usize, timestep: usize) -> bool {
        // Every observer hears of every step, even after one has said yes.
        let mut any = false;
        for o in self.0.iter_mut() {
            any |= o.begin_step(index, timestep);
        }
        any
    }
}
