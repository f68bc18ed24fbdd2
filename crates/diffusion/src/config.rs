//! DDIM configuration, read from a diffusers `scheduler/scheduler_config.json`.
//!
//! Entry point: [`DdimConfig::from_file`]. Fields missing from the file (or `null`) take diffusers'
//! `DDIMScheduler` defaults; fields this crate does not use are ignored. Real model folders often
//! ship another scheduler's config (SD1.4: `PNDMScheduler`, SDXL: `EulerDiscreteScheduler`); any
//! such config that carries a beta schedule loads as DDIM, with a note saying so.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{DiffusionError, Result};

/// How the per-timestep noise variances β_t are laid out over the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// β evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// √β evenly spaced from √`beta_start` to √`beta_end` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), β ≤ 0.999.
    SquaredcosCapV2,
}

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise ε.
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀.
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// How inference timesteps are picked from the training range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// 0, k, 2k, … (k = T div n), plus `steps_offset`.
    Leading,
    /// Counted down from T in steps of T/n, minus one: always includes T−1.
    Trailing,
    /// n rounded points evenly spread over 0..=T−1.
    Linspace,
}

macro_rules! string_enum {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The name diffusers uses in its configs.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
            fn parse(origin: &str, field: &str, value: &str) -> Result<Self> {
                match value {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(DiffusionError::ConfigValue {
                        origin: origin.to_string(),
                        field: field.to_string(),
                        value: format!("\"{value}\""),
                        expected: format!("one of {}", [$(concat!("\"", $name, "\"")),+].join(", ")),
                    }),
                }
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(BetaSchedule {
    Linear => "linear",
    ScaledLinear => "scaled_linear",
    SquaredcosCapV2 => "squaredcos_cap_v2",
});
string_enum!(PredictionType {
    Epsilon => "epsilon",
    VPrediction => "v_prediction",
    Sample => "sample",
});
string_enum!(TimestepSpacing {
    Leading => "leading",
    Trailing => "trailing",
    Linspace => "linspace",
});

/// The DDIM scheduler settings. `Default` gives diffusers' `DDIMScheduler` defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct DdimConfig {
    /// Number of timesteps T the model was trained with.
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit β per training timestep; overrides the three fields above when present.
    pub trained_betas: Option<Vec<f64>>,
    /// Clamp the predicted x₀ to ±`clip_sample_range`.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// DDIM: the ᾱ after the last step is 1 (true) or ᾱ₀ (false).
    /// Inverse DDIM: the ᾱ before the first step is 1 (true) or ᾱ₀ (false).
    pub set_alpha_to_one: bool,
    /// Added to the timesteps of `leading` spacing (diffusers ignores it for the other spacings).
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    /// Rescale β so that the last timestep has zero signal (Lin et al. 2023).
    pub rescale_betas_zero_snr: bool,
    /// Dynamic thresholding of x₀; not supported (schedulers refuse `true`).
    pub thresholding: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        DdimConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
            thresholding: false,
        }
    }
}

/// A config as loaded, with what the loader has to say about it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedConfig {
    pub config: DdimConfig,
    /// The file's `_class_name`, if any.
    pub class_name: Option<String>,
    /// Human-readable remarks, e.g. that a `PNDMScheduler` config is sampled with DDIM and which
    /// DDIM fields took defaults. Empty for a plain DDIM config.
    pub notes: Vec<String>,
}

/// Scheduler classes whose configs are DDIM configs as they are.
const DDIM_CLASSES: [&str; 2] = ["DDIMScheduler", "DDIMInverseScheduler"];
/// diffusers' schedulers over the same discrete noise schedule (`betas` → `alphas_cumprod`):
/// their configs carry a beta schedule DDIM can sample with. Any other class (a flow-matching
/// scheduler, a class from another library, a misspelling) is refused rather than guessed at.
const DISCRETE_BETA_CLASSES: [&str; 15] = [
    "PNDMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
];
/// Fields from which the noise schedule is derived.
const BETA_FIELDS: [&str; 4] = ["beta_start", "beta_end", "beta_schedule", "trained_betas"];
/// DDIM fields whose diffusers default is worth a note when a foreign config leaves them out.
const NOTED_DEFAULTS: [&str; 5] = [
    "clip_sample",
    "set_alpha_to_one",
    "steps_offset",
    "prediction_type",
    "timestep_spacing",
];

impl DdimConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<LoadedConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| DiffusionError::ConfigIo {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses config JSON text; `origin` names it in errors (a path, or e.g. `"<inline>"`).
    pub fn from_json_str(json: &str, origin: &str) -> Result<LoadedConfig> {
        let value: Value = serde_json::from_str(json).map_err(|e| DiffusionError::ConfigJson {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        Self::from_json_value(&value, origin)
    }

    /// Reads a config from an already parsed JSON value (must be an object).
    pub fn from_json_value(value: &Value, origin: &str) -> Result<LoadedConfig> {
        let obj = value
            .as_object()
            .ok_or_else(|| DiffusionError::ConfigJson {
                origin: origin.to_string(),
                reason: format!("expected a JSON object, found {}", kind_of(value)),
            })?;
        let fields = Fields { obj, origin };
        let class_name = fields.string("_class_name")?;
        let mut notes = Vec::new();
        if let Some(class) = class_name.as_deref().filter(|c| !DDIM_CLASSES.contains(c)) {
            if !DISCRETE_BETA_CLASSES.contains(&class) {
                return Err(DiffusionError::IncompatibleScheduler {
                    origin: origin.to_string(),
                    class_name: class.to_string(),
                    reason: format!(
                        "not a scheduler over a discrete beta schedule; expected {} or one of {}",
                        DDIM_CLASSES.join(", "),
                        DISCRETE_BETA_CLASSES.join(", ")
                    ),
                });
            }
            if !BETA_FIELDS.iter().any(|f| fields.present(f)) {
                return Err(DiffusionError::IncompatibleScheduler {
                    origin: origin.to_string(),
                    class_name: class.to_string(),
                    reason: format!("it has none of the fields {}", BETA_FIELDS.join(", ")),
                });
            }
            notes.push(format!(
                "{origin}: `{class}` config loaded as DDIM (its beta schedule is kept; \
                 fields specific to `{class}` are ignored)"
            ));
            let defaulted: Vec<&str> = NOTED_DEFAULTS
                .iter()
                .copied()
                .filter(|f| !fields.present(f))
                .collect();
            if !defaulted.is_empty() {
                notes.push(format!(
                    "{origin}: not set, so diffusers' DDIM defaults apply: {}",
                    defaulted
                        .iter()
                        .map(|f| default_text(f))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }

        let d = DdimConfig::default();
        let config = DdimConfig {
            num_train_timesteps: fields
                .count("num_train_timesteps")?
                .unwrap_or(d.num_train_timesteps),
            beta_start: fields.number("beta_start")?.unwrap_or(d.beta_start),
            beta_end: fields.number("beta_end")?.unwrap_or(d.beta_end),
            beta_schedule: match fields.string("beta_schedule")? {
                Some(s) => BetaSchedule::parse(origin, "beta_schedule", &s)?,
                None => d.beta_schedule,
            },
            trained_betas: fields.numbers("trained_betas")?,
            clip_sample: fields.flag("clip_sample")?.unwrap_or(d.clip_sample),
            clip_sample_range: fields
                .number("clip_sample_range")?
                .unwrap_or(d.clip_sample_range),
            set_alpha_to_one: fields
                .flag("set_alpha_to_one")?
                .unwrap_or(d.set_alpha_to_one),
            steps_offset: fields.count("steps_offset")?.unwrap_or(d.steps_offset),
            prediction_type: match fields.string("prediction_type")? {
                Some(s) => PredictionType::parse(origin, "prediction_type", &s)?,
                None => d.prediction_type,
            },
            timestep_spacing: match fields.string("timestep_spacing")? {
                Some(s) => TimestepSpacing::parse(origin, "timestep_spacing", &s)?,
                None => d.timestep_spacing,
            },
            rescale_betas_zero_snr: fields.flag("rescale_betas_zero_snr")?.unwrap_or(false),
            thresholding: fields.flag("thresholding")?.unwrap_or(false),
        };
        config.validate(origin)?;
        Ok(LoadedConfig {
            config,
            class_name,
            notes,
        })
    }

    /// Checks the values a scheduler cannot work with; `origin` names the config in errors.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |field: &str, value: String, expected: &str| {
            Err(DiffusionError::ConfigValue {
                origin: origin.to_string(),
                field: field.to_string(),
                value,
                expected: expected.to_string(),
            })
        };
        if self.thresholding {
            return bad(
                "thresholding",
                "true".into(),
                "false: dynamic thresholding is not implemented (it is meant for pixel-space models)",
            );
        }
        if self.num_train_timesteps == 0 {
            return bad("num_train_timesteps", "0".into(), "at least 1");
        }
        if !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return bad(
                "clip_sample_range",
                self.clip_sample_range.to_string(),
                "a positive number",
            );
        }
        match &self.trained_betas {
            Some(betas) => {
                if betas.len() != self.num_train_timesteps {
                    return bad(
                        "trained_betas",
                        format!("a list of {} values", betas.len()),
                        &format!(
                            "one beta per training timestep ({})",
                            self.num_train_timesteps
                        ),
                    );
                }
                if let Some((i, b)) = betas
                    .iter()
                    .enumerate()
                    .find(|(_, b)| !(b.is_finite() && **b >= 0.0 && **b <= 1.0))
                {
                    return bad(
                        "trained_betas",
                        format!("{b} at index {i}"),
                        "values in [0, 1]",
                    );
                }
            }
            None => {
                for (field, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                    if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                        return bad(field, v.to_string(), "a number in [0, 1)");
                    }
                }
            }
        }
        Ok(())
    }
}

fn default_text(field: &str) -> String {
    let d = DdimConfig::default();
    let v = match field {
        "clip_sample" => d.clip_sample.to_string(),
        "set_alpha_to_one" => d.set_alpha_to_one.to_string(),
        "steps_offset" => d.steps_offset.to_string(),
        "prediction_type" => d.prediction_type.to_string(),
        "timestep_spacing" => d.timestep_spacing.to_string(),
        _ => "?".to_string(),
    };
    format!("{field} = {v}")
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to the fields of a config object; `null` counts as absent.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
}

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn present(&self, field: &str) -> bool {
        self.get(field).is_some()
    }

    fn wrong(&self, field: &str, value: &Value, expected: &str) -> DiffusionError {
        DiffusionError::ConfigValue {
            origin: self.origin.to_string(),
            field: field.to_string(),
            value: format!("{value} ({})", kind_of(value)),
            expected: expected.to_string(),
        }
    }

    fn string(&self, field: &str) -> Result<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong(field, v, "a string")),
        }
    }

    fn flag(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(field, v, "true or false")),
        }
    }

    fn number(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(field, v, "a number")),
        }
    }

    /// A non-negative integer; integral floats such as `1000.0` are accepted.
    fn count(&self, field: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        if let Some(n) = v.as_u64() {
            return Ok(Some(n as usize));
        }
        match v.as_f64() {
            Some(x) if x >= 0.0 && x.fract() == 0.0 && x < 1e15 => Ok(Some(x as usize)),
            _ => Err(self.wrong(field, v, "a non-negative integer")),
        }
    }

    fn numbers(&self, field: &str) -> Result<Option<Vec<f64>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|x| {
                    x.as_f64()
                        .ok_or_else(|| self.wrong(field, x, "a list of numbers"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.wrong(field, v, "a list of numbers")),
        }
    }
}
