//! Model-agnostic samplers for diffusion models: DDIM sampling and DDIM inversion (plain and
//! fixed-point), flow-matching Euler sampling (FLUX), with classifier-free guidance, matching
//! diffusers' schedulers.
//!
//! Models plug in through the [`Denoiser`] trait and nothing else; there is one sampling loop,
//! [`sample`], for every [`Scheduler`], and whatever happens between steps is a [`StepHook`].
//!
//! ```text
//! let loaded = DdimConfig::from_file("model/scheduler/scheduler_config.json")?;
//! let mut scheduler = DdimScheduler::new(loaded.config)?;
//! scheduler.set_timesteps(50)?;
//! let guidance = Guidance::batched_tensors(&uncond_emb, &cond_emb, 7.5)?;
//! let z0 = sample(&mut unet_denoiser, &scheduler, noise, &guidance, &mut NoHook)?;
//! ```
//!
//! Modules, one entry point each: [`config`] (`DdimConfig::from_file`), [`schedule`]
//! (`alphas_cumprod`), [`timesteps`] (`ddim_timesteps`), [`ddim`] (`DdimScheduler`), [`inverse`]
//! (`DdimInverseScheduler`), [`denoiser`] (`Denoiser`, `guided_prediction`), [`observer`]
//! (`AttentionObserver`), [`sample`] (`sample`, `StepHook`), [`invert`] (`ddim_invert`, the
//! fixed-point DDIM inversion), [`flow_match`] (`FlowMatchEulerScheduler`), [`rf_invert`]
//! (RF-inversion's two controlled flows).

pub mod config;
pub mod ddim;
pub mod denoiser;
pub mod error;
pub mod flow_match;
pub mod inverse;
pub mod invert;
pub mod observer;
pub mod rf_invert;
pub mod sample;
pub mod schedule;
pub mod timesteps;
mod transfer;

pub use config::{BetaSchedule, DdimConfig, LoadedConfig, PredictionType, TimestepSpacing};
pub use ddim::DdimScheduler;
pub use denoiser::{
    classifier_free_guidance, guided_prediction, guided_prediction_observed, Denoiser, Guidance,
};
pub use error::{DiffusionError, Result};
pub use flow_match::{FlowMatchConfig, FlowMatchEulerScheduler, TimeShift};
pub use inverse::DdimInverseScheduler;
pub use invert::{ddim_invert, DdimInversion, InversionStepInfo};
pub use observer::{AttentionObserver, AttentionSite, AttentionStore, NoObserver};
pub use rf_invert::{RfInversionConfig, RfInversionFlow, RfReconstructionFlow};
pub use sample::{sample, AfterStep, NoHook, Scheduler, StepContext, StepControl, StepHook};
pub use transfer::StepOutput;
