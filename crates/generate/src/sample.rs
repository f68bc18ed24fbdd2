//! The pieces every text-to-image run shares: conditioning with guidance, the scheduler, the DDIM
//! loop with per-step observation, and progress reports.

use candle_core::Tensor;
use l2s_diffusion::{denoise_step, DdimConfig, DdimInverseScheduler, DdimScheduler, Guidance};
use l2s_models::{AttentionObserver, StableDiffusion};

use crate::denoiser::SdDenoiser;
use crate::error::{GenerateError, Result};
use crate::prompt::{encode_prompt, PromptEmbedding};

/// What a long-running call is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// DDIM sampling (generation or reconstruction).
    Denoise,
    /// DDIM inversion.
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

/// A prompt, its negative prompt and the guidance scale, encoded once for a whole run.
#[derive(Clone, Debug)]
pub struct Conditioning {
    pub cond: PromptEmbedding,
    /// The negative prompt's embedding; `None` when the scale does not call for guidance.
    pub uncond: Option<PromptEmbedding>,
    pub scale: f64,
}

impl Conditioning {
    /// Encodes the prompts. As in diffusers, classifier-free guidance is used only when
    /// `scale > 1`; otherwise the model sees the prompt alone and the negative prompt is unused.
    pub fn new(
        sd: &StableDiffusion,
        prompt: &str,
        negative_prompt: &str,
        scale: f64,
    ) -> Result<Self> {
        if !scale.is_finite() {
            return Err(GenerateError::invalid(
                "guidance scale",
                format!("{scale} is not a finite number"),
            ));
        }
        let cond = encode_prompt(sd, prompt)?;
        let uncond = if scale > 1.0 {
            Some(encode_prompt(sd, negative_prompt)?)
        } else {
            None
        };
        Ok(Self {
            cond,
            uncond,
            scale,
        })
    }

    /// The guidance for the samplers: `Batched` ([uncond; cond]) with a negative prompt,
    /// `Unguided` otherwise.
    pub fn guidance(&self) -> Result<Guidance<Tensor>> {
        Ok(match &self.uncond {
            Some(u) => Guidance::batched_tensors(&u.embedding, &self.cond.embedding, self.scale)?,
            None => Guidance::Unguided(self.cond.embedding.clone()),
        })
    }

    /// Warnings of both prompts (truncation).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = self.cond.warnings.clone();
        if let Some(u) = &self.uncond {
            w.extend(u.warnings.iter().map(|s| format!("negative {s}")));
        }
        w
    }
}

/// The model's DDIM scheduler config (any scheduler config with a beta schedule loads as DDIM).
pub fn ddim_config(sd: &StableDiffusion) -> Result<DdimConfig> {
    let loaded = DdimConfig::from_file(&sd.scheduler_config)?;
    for note in &loaded.notes {
        tracing::debug!("{}: {note}", sd.scheduler_config.display());
    }
    Ok(loaded.config)
}

fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 {
        return Err(GenerateError::invalid(
            "number of steps",
            "0; expected at least 1",
        ));
    }
    Ok(())
}

/// A DDIM sampler with `steps` timesteps set.
pub fn scheduler(sd: &StableDiffusion, steps: usize) -> Result<DdimScheduler> {
    check_steps(steps)?;
    let mut s = DdimScheduler::new(ddim_config(sd)?)?;
    s.set_timesteps(steps)?;
    Ok(s)
}

/// A DDIM inverse scheduler with `steps` timesteps set.
pub fn inverse_scheduler(sd: &StableDiffusion, steps: usize) -> Result<DdimInverseScheduler> {
    check_steps(steps)?;
    let mut s = DdimInverseScheduler::new(ddim_config(sd)?)?;
    s.set_timesteps(steps)?;
    Ok(s)
}

/// Runs DDIM from `latents` over all of `scheduler`'s timesteps and returns the final latents.
/// Before each step, `observer` (if any) is asked whether to watch it; watched steps report the
/// conditional rows of their cross-attention.
pub fn sample_latents(
    sd: &StableDiffusion,
    scheduler: &DdimScheduler,
    latents: Tensor,
    guidance: &Guidance<Tensor>,
    mut observer: Option<&mut dyn StepObserver>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps();
    let total = timesteps.len();
    let mut z = latents;
    for (index, &t) in timesteps.iter().enumerate() {
        let watch = match observer.as_deref_mut() {
            Some(o) => o.begin_step(index, t),
            None => false,
        };
        let mut denoiser = match observer.as_deref_mut() {
            Some(o) if watch => {
                SdDenoiser::for_guidance(&sd.unet, o as &mut dyn AttentionObserver, guidance)
            }
            _ => SdDenoiser::new(&sd.unet),
        };
        let (_, out) = denoise_step(&mut denoiser, scheduler, &z, t, guidance)?;
        z = out.prev_sample;
        progress(Progress {
            phase: Phase::Denoise,
            done: index + 1,
            total,
        });
    }
    Ok(z)
}
