//! Flow matching with Euler steps (diffusers' `FlowMatchEulerDiscreteScheduler` as FluxPipeline
//! drives it): the latent moves along x ← x + (σᵢ₊₁ − σᵢ)·v from σ = 1 (noise) to σ = 0.
//!
//! Entry points: [`FlowMatchConfig::from_file`], [`FlowMatchEulerScheduler::set_timesteps`]
//! (FluxPipeline's sigmas and resolution-dependent shift) and [`FlowMatchEulerScheduler::step`];
//! the loop is [`crate::sample`]. Timesteps are σ·1000; the loop hands the model σ itself.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Map, Value};

use crate::error::{DiffusionError, Result};
use crate::transfer::check_same_shape;

/// How the resolution-dependent shift μ bends the sigmas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeShift {
    /// σ' = e^μ / (e^μ + 1/σ − 1) (FLUX).
    Exponential,
    /// σ' = μ / (μ + 1/σ − 1).
    Linear,
}

/// `scheduler/scheduler_config.json` of a flow-matching model; missing fields take diffusers'
/// defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    /// Static shift, used when dynamic shifting is off (schnell: 1, i.e. none).
    pub shift: f64,
    /// Shift by μ from the image's token count (dev).
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub time_shift_type: TimeShift,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            time_shift_type: TimeShift::Exponential,
        }
    }
}

/// Options of diffusers' scheduler that change the sigmas in ways this crate does not implement;
/// a config that turns one on is refused rather than silently sampled differently.
const UNSUPPORTED_FLAGS: &[&str] = &[
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
];

impl FlowMatchConfig {
    /// FLUX.1-dev's published scheduler config.
    pub fn flux1_dev() -> Self {
        Self {
            shift: 3.0,
            use_dynamic_shifting: true,
            ..Self::default()
        }
    }

    /// FLUX.1-schnell's published scheduler config.
    pub fn flux1_schnell() -> Self {
        Self::default()
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| DiffusionError::ConfigIo {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| DiffusionError::ConfigJson {
            origin: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_json_value(&value, &path.display().to_string())
    }

    /// Reads a config from parsed JSON; `origin` names it in errors.
    pub fn from_json_value(value: &Value, origin: &str) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| DiffusionError::ConfigJson {
                origin: origin.into(),
                reason: "expected a JSON object".into(),
            })?;
        let bad = |field: &str, v: &Value, expected: &str| DiffusionError::ConfigValue {
            origin: origin.into(),
            field: field.into(),
            value: v.to_string(),
            expected: expected.into(),
        };
        let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let num = |obj: &Map<String, Value>, k: &str, default: f64| -> Result<f64> {
            match obj.get(k).filter(|v| !v.is_null()) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| bad(k, v, "a number")),
            }
        };
        let count = |k: &str, default: usize| -> Result<usize> {
            match present(k) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(k, v, "a positive integer")),
            }
        };
        if let Some(class) = present("_class_name").and_then(|c| c.as_str()) {
            if !class.starts_with("FlowMatch") {
                return Err(DiffusionError::ConfigValue {
                    origin: origin.into(),
                    field: "_class_name".into(),
                    value: format!("\"{class}\""),
                    expected: "FlowMatchEulerDiscreteScheduler".into(),
                });
            }
        }
        for flag in UNSUPPORTED_FLAGS {
            if let Some(v) = present(flag) {
                if v.as_bool() != Some(false) {
                    return Err(bad(flag, v, "false (not implemented)"));
                }
            }
        }
        if let Some(v) = present("shift_terminal") {
            return Err(bad("shift_terminal", v, "null (not implemented)"));
        }
        let d = Self::default();
        let time_shift_type = match present("time_shift_type") {
            None => TimeShift::Exponential,
            Some(v) => match v.as_str() {
                Some("exponential") => TimeShift::Exponential,
                Some("linear") => TimeShift::Linear,
                _ => return Err(bad("time_shift_type", v, "\"exponential\" or \"linear\"")),
            },
        };
        let use_dynamic_shifting = match present("use_dynamic_shifting") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad("use_dynamic_shifting", v, "true or false"))?,
        };
        let cfg = Self {
            num_train_timesteps: count("num_train_timesteps", d.num_train_timesteps)?,
            shift: num(obj, "shift", d.shift)?,
            use_dynamic_shifting,
            base_shift: num(obj, "base_shift", d.base_shift)?,
            max_shift: num(obj, "max_shift", d.max_shift)?,
            base_image_seq_len: count("base_image_seq_len", d.base_image_seq_len)?,
            max_image_seq_len: count("max_image_seq_len", d.max_image_seq_len)?,
            time_shift_type,
        };
        if cfg.shift <= 0.0 {
            return Err(bad("shift", &Value::from(cfg.shift), "a positive number"));
        }
        if cfg.base_image_seq_len == cfg.max_image_seq_len {
            return Err(bad(
                "max_image_seq_len",
                &Value::from(cfg.max_image_seq_len),
                "different from base_image_seq_len",
            ));
        }
        Ok(cfg)
    }

    /// FluxPipeline's μ: linear in the image token count, base_shift at base_image_seq_len and
    /// max_shift at max_image_seq_len.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }
}

/// Euler steps over a shifted σ schedule.
#[derive(Clone, Debug)]
pub struct FlowMatchEulerScheduler {
    config: FlowMatchConfig,
    /// N sigmas plus the terminal 0.
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
}

impl FlowMatchEulerScheduler {
    pub fn new(config: FlowMatchConfig) -> Self {
        Self {
            config,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
        }
    }

    pub fn config(&self) -> &FlowMatchConfig {
        &self.config
    }

    /// FluxPipeline's schedule for `steps` steps on an image of `image_seq_len` packed tokens
    /// ((height/16)·(width/16) for FLUX): σ = linspace(1, 1/N, N), shifted.
    pub fn set_timesteps(&mut self, steps: usize, image_seq_len: usize) -> Result<()> {
        if steps == 0 {
            return Err(DiffusionError::InvalidArgument {
                what: "number of flow-matching steps".into(),
                reason: "must be at least 1".into(),
            });
        }
        let n = steps as f64;
        let base: Vec<f64> = (0..steps)
            .map(|i| {
                if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / n - 1.0) * i as f64 / (n - 1.0)
                }
            })
            .collect();
        self.set_sigmas(&base, Some(self.config.mu(image_seq_len)))
    }

    /// A custom σ schedule (decreasing, in (0, 1]) shifted as the config says; `mu` is required
    /// with dynamic shifting and ignored otherwise.
    pub fn set_sigmas(&mut self, sigmas: &[f64], mu: Option<f64>) -> Result<()> {
        if sigmas.is_empty() || sigmas.iter().any(|&s| !(s > 0.0 && s <= 1.0)) {
            return Err(DiffusionError::InvalidArgument {
                what: "flow-matching sigmas".into(),
                reason: format!("expected a non-empty list of values in (0, 1], got {sigmas:?}"),
            });
        }
        let shifted: Vec<f64> = if self.config.use_dynamic_shifting {
            let mu = mu.ok_or_else(|| DiffusionError::InvalidArgument {
                what: "mu".into(),
                reason: "required by a config with use_dynamic_shifting = true".into(),
            })?;
            let scale = match self.config.time_shift_type {
                TimeShift::Exponential => mu.exp(),
                TimeShift::Linear => mu,
            };
            sigmas
                .iter()
                .map(|&s| scale / (scale + (1.0 / s - 1.0)))
                .collect()
        } else {
            let k = self.config.shift;
            sigmas
                .iter()
                .map(|&s| k * s / (1.0 + (k - 1.0) * s))
                .collect()
        };
        // diffusers holds the schedule in f32; keep its values exactly.
        let shifted: Vec<f64> = shifted.iter().map(|&s| s as f32 as f64).collect();
        let train = self.config.num_train_timesteps as f32;
        self.timesteps = shifted.iter().map(|&s| (s as f32 * train) as f64).collect();
        self.sigmas = shifted;
        self.sigmas.push(0.0);
        Ok(())
    }

    /// Timesteps (σ·num_train_timesteps), one per step.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The N sigmas followed by the terminal 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    pub fn num_inference_steps(&self) -> Option<usize> {
        (!self.timesteps.is_empty()).then_some(self.timesteps.len())
    }

    /// One Euler step from step `index` ([`euler_step`] from σ_index to σ_{index+1}).
    pub fn step(&self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        if self.timesteps.is_empty() {
            return Err(DiffusionError::TimestepsNotSet {
                scheduler: "FlowMatchEulerScheduler",
            });
        }
        if index >= self.timesteps.len() {
            return Err(DiffusionError::InvalidArgument {
                what: "step index".into(),
                reason: format!("{index} is past the last of {} steps", self.timesteps.len()),
            });
        }
        check_same_shape("model output vs sample", model_output, sample)?;
        euler_step(
            sample,
            model_output,
            self.sigmas[index],
            self.sigmas[index + 1],
        )
    }
}

/// One Euler step of the flow from noise level `sigma` to `sigma_next`:
/// sample + (σ_next − σ)·v, computed in f32 (the difference of the two levels rounded to f32 first,
/// as diffusers does) and returned in the sample's dtype. Every flow-matching loop steps here.
pub fn euler_step(
    sample: &Tensor,
    velocity: &Tensor,
    sigma: f64,
    sigma_next: f64,
) -> Result<Tensor> {
    let dt = (sigma_next as f32 - sigma as f32) as f64;
    let x = (sample.to_dtype(DType::F32)? + (velocity.to_dtype(DType::F32)? * dt)?)?;
    Ok(x.to_dtype(sample.dtype())?)
}

impl crate::sample::Scheduler for FlowMatchEulerScheduler {
    fn name(&self) -> &'static str {
        "FlowMatchEulerScheduler"
    }
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }
    /// σ: what FLUX's transformer takes (it rounds σ·1000 to f32 itself, as FluxPipeline does).
    fn model_time(&self, index: usize) -> f64 {
        self.sigmas[index]
    }
    fn timestep(&self, index: usize) -> usize {
        (self.sigmas[index] * 1000.0).round() as usize
    }
    fn step_at(&self, index: usize, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        self.step(model_output, index, sample)
    }
}
