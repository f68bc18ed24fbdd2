//! Model-agnostic samplers for diffusion models: DDIM sampling and DDIM inversion (plain and
//! fixed-point), flow-matching Euler sampling (FLUX), with classifier-free guidance, matching
//! diffusers' schedulers.
//!
//! Models plug in through the [`Denoiser`] trait and nothing else.
//!
//! ```text
//! let loaded = DdimConfig::from_file("model/scheduler/scheduler_config.json")?;
//! let mut scheduler = DdimScheduler::new(loaded.config)?;
//! scheduler.set_timesteps(50)?;
//! let guidance = Guidance::batched_tensors(&uncond_emb, &cond_emb, 7.5)?;
//! let z0 = ddim_sample(&mut unet_denoiser, &scheduler, noise, &guidance, |_| Ok(StepControl::Continue))?;
//! ```
//!
//! Modules, one entry point each: [`config`] (`DdimConfig::from_file`), [`schedule`]
//! (`alphas_cumprod`), [`timesteps`] (`ddim_timesteps`), [`ddim`] (`DdimScheduler`), [`inverse`]
//! (`DdimInverseScheduler`), [`denoiser`] (`Denoiser`, `guided_prediction`), [`sample`]
//! (`ddim_sample`), [`invert`] (`ddim_invert`), [`flow_match`] (`FlowMatchEulerScheduler`,
//! `flow_match_sample`), [`rf_invert`] (RF-inversion: `rf_invert`, `rf_reconstruct`).

pub mod config;
pub mod ddim;
pub mod denoiser;
pub mod error;
pub mod flow_match;
pub mod inverse;
pub mod invert;
pub mod rf_invert;
pub mod sample;
pub mod schedule;
pub mod timesteps;
mod transfer;

pub use config::{BetaSchedule, DdimConfig, LoadedConfig, PredictionType, TimestepSpacing};
pub use ddim::DdimScheduler;
pub use denoiser::{classifier_free_guidance, guided_prediction, Denoiser, Guidance};
pub use error::{DiffusionError, Result};
pub use flow_match::{
    flow_match_sample, FlowMatchConfig, FlowMatchEulerScheduler, FlowStepInfo, TimeShift,
};
pub use inverse::DdimInverseScheduler;
pub use invert::{ddim_invert, Inversion, InversionStepInfo};
pub use rf_invert::{rf_invert, rf_reconstruct, RfInversionConfig};
pub use sample::{ddim_sample, denoise_step, StepControl, StepInfo};
pub use transfer::StepOutput;
