//! The DDIM sampler (η = 0), matching diffusers' `DDIMScheduler`.
//!
//! Entry point: [`DdimScheduler`]: `new(config)`, `set_timesteps(n)`, then `step` once per entry
//! of `timesteps()`.

use candle_core::Tensor;

use crate::config::DdimConfig;
use crate::error::{DiffusionError, Result};
use crate::schedule;
use crate::timesteps::ddim_timesteps;
use crate::transfer::{check_same_shape, work_dtype, StepOutput, Transfer};

/// Deterministic DDIM sampling from noise (large t) to data (t = 0).
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f64>,
    /// ᾱ after the last step: 1 with `set_alpha_to_one`, else ᾱ₀.
    final_alpha_cumprod: f64,
    num_inference_steps: Option<usize>,
    timesteps: Vec<usize>,
}

impl DdimScheduler {
    /// Builds the noise schedule. Fails on configs the scheduler cannot honour (thresholding,
    /// malformed betas).
    pub fn new(config: DdimConfig) -> Result<Self> {
        let alphas_cumprod = schedule::alphas_cumprod(&config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps = (0..config.num_train_timesteps).rev().collect();
        Ok(DdimScheduler {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: None,
            timesteps,
        })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// ᾱ_t for every training timestep (diffusers' `alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// ᾱ reached by the last step.
    pub fn final_alpha_cumprod(&self) -> f64 {
        self.final_alpha_cumprod
    }

    /// The standard deviation of the initial noise (1 for DDIM).
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Chooses `n` inference timesteps by the config's spacing (1 ≤ n ≤ T).
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        self.timesteps =
            ddim_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)?;
        self.num_inference_steps = Some(n);
        Ok(())
    }

    /// Timesteps in sampling order (descending). Before `set_timesteps`: T−1 … 0.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// The timestep a step from `timestep` lands on: `timestep − T div n`, or `None` when that is
    /// below 0 (the step then lands on the final ᾱ). Used by diffusers for every spacing.
    pub fn previous_timestep(&self, timestep: usize) -> Result<Option<usize>> {
        let n = self
            .num_inference_steps
            .ok_or(DiffusionError::TimestepsNotSet {
                scheduler: "DdimScheduler",
            })?;
        Ok(timestep.checked_sub(self.config.num_train_timesteps / n))
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

    /// One DDIM step (η = 0) from `sample` at `timestep` to the previous timestep, given the
    /// model output at (`sample`, `timestep`).
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let prev = self.previous_timestep(timestep)?;
        let alpha_from = self.alpha(timestep)?;
        let alpha_to = match prev {
            Some(p) => self.alpha(p)?,
            None => self.final_alpha_cumprod,
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

    /// Forward diffusion: √ᾱ_t·x₀ + √(1−ᾱ_t)·noise, in `original`'s dtype.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor> {
        check_same_shape("original vs noise", original, noise)?;
        let a = self.alpha(timestep)?;
        let w = work_dtype(original, noise);
        let (x, n) = (original.to_dtype(w)?, noise.to_dtype(w)?);
        Ok(
            (x.affine(a.sqrt(), 0.0)? + n.affine((1.0 - a).sqrt(), 0.0)?)?
                .to_dtype(original.dtype())?,
        )
    }

    /// The v-prediction target: √ᾱ_t·noise − √(1−ᾱ_t)·x₀, in `sample`'s dtype.
    pub fn get_velocity(&self, sample: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor> {
        check_same_shape("sample vs noise", sample, noise)?;
        let a = self.alpha(timestep)?;
        let w = work_dtype(sample, noise);
        let (x, n) = (sample.to_dtype(w)?, noise.to_dtype(w)?);
        Ok(
            (n.affine(a.sqrt(), 0.0)? - x.affine((1.0 - a).sqrt(), 0.0)?)?
                .to_dtype(sample.dtype())?,
        )
    }
}
