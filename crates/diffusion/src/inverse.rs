//! DDIM inversion steps, matching diffusers' `DDIMInverseScheduler`.
//!
//! Entry point: [`DdimInverseScheduler`]. Its conventions differ from the sampler's:
//! - `timesteps()` ascend (e.g. 1, 21, …, 981 for SD's leading spacing with offset 1);
//! - `step(out, t, x)` moves `x` *from* level t − T div n (or from the start level when that is
//!   below 0) *to* level t: the timestep named is the target, and diffusers' pipelines evaluate the
//!   model at that target timestep on the less noisy sample;
//! - `set_alpha_to_one` picks the start level: ᾱ = 1 when true, ᾱ₀ when false (the mirror of the
//!   sampler's final level, so a sampler and an inverse scheduler from one config pair up step for
//!   step);
//! - only `leading` and `trailing` spacing exist; thresholding is not part of the inverse
//!   scheduler and is ignored.

use candle_core::Tensor;

use crate::config::DdimConfig;
use crate::error::{DiffusionError, Result};
use crate::schedule;
use crate::timesteps::inverse_timesteps;
use crate::transfer::{StepOutput, Transfer};

/// Deterministic DDIM inversion from data (t = 0) towards noise.
#[derive(Clone, Debug)]
pub struct DdimInverseScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f64>,
    /// ᾱ before the first step: 1 with `set_alpha_to_one`, else ᾱ₀.
    initial_alpha_cumprod: f64,
    num_inference_steps: Option<usize>,
    timesteps: Vec<usize>,
}

impl DdimInverseScheduler {
    /// Builds the noise schedule. `thresholding` is ignored (as diffusers does); `linspace`
    /// spacing is refused.
    pub fn new(config: DdimConfig) -> Result<Self> {
        let mut schedule_config = config.clone();
        schedule_config.thresholding = false;
        let alphas_cumprod = schedule::alphas_cumprod(&schedule_config)?;
        // Fails early on linspace spacing rather than at set_timesteps.
        inverse_timesteps(config.timestep_spacing, 1, config.num_train_timesteps, 0)?;
        let initial_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps = (0..config.num_train_timesteps).collect();
        Ok(DdimInverseScheduler {
            config,
            alphas_cumprod,
            initial_alpha_cumprod,
            num_inference_steps: None,
            timesteps,
        })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// ᾱ_t for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// ᾱ of the level the first step starts from.
    pub fn initial_alpha_cumprod(&self) -> f64 {
        self.initial_alpha_cumprod
    }

    /// Chooses `n` inversion timesteps (1 ≤ n ≤ T).
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        self.timesteps =
            inverse_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)?;
        self.num_inference_steps = Some(n);
        Ok(())
    }

    /// Timesteps in inversion order (ascending). Before `set_timesteps`: 0 … T−1.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// The level a step to `timestep` starts from: `min(timestep − T div n, T − 1)`, or `None`
    /// when that is below 0 (the start level [`Self::initial_alpha_cumprod`]).
    pub fn source_timestep(&self, timestep: usize) -> Result<Option<usize>> {
        let n = self
            .num_inference_steps
            .ok_or(DiffusionError::TimestepsNotSet {
                scheduler: "DdimInverseScheduler",
            })?;
        let t_max = self.config.num_train_timesteps - 1;
        Ok(timestep
            .checked_sub(self.config.num_train_timesteps / n)
            .map(|s| s.min(t_max)))
    }

    fn alpha(&self, timestep: usize) -> Result<f64> {
        self.alphas_cumprod
            .get(timestep)
            .copied()
            .ok_or(DiffusionError::TimestepOutOfRange {
                timestep,
                num_train_timesteps: self.config.num_train_timesteps,
            })
    }

    /// One inversion step: moves `sample` from level [`Self::source_timestep`] up to level
    /// `timestep`, given the model output (evaluated at `timestep`, by diffusers' convention).
    /// The result's `prev_sample` is the noisier sample.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let alpha_to = self.alpha(timestep)?;
        let alpha_from = match self.source_timestep(timestep)? {
            Some(s) => self.alpha(s)?,
            None => self.initial_alpha_cumprod,
        };
        Transfer {
            prediction_type: self.config.prediction_type,
            clip: self
                .config
                .clip_sample
                .then_some(self.config.clip_sample_range),
            alpha_from,
            alpha_to,
            timestep,
        }
        .apply(model_output, sample)
    }
}
