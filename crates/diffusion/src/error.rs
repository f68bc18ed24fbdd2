//! The crate's one error type. Every variant says which file, field or timestep is concerned, the
//! value found, and what was expected.

use std::path::PathBuf;

/// Errors of scheduler configuration, stepping and sampling.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// The config file could not be read.
    #[error("{path}: cannot read scheduler config: {reason}")]
    ConfigIo { path: PathBuf, reason: String },

    /// The config text is not JSON, or not a JSON object.
    #[error("{origin}: not a valid scheduler config: {reason}")]
    ConfigJson { origin: String, reason: String },

    /// A config field holds a value this crate cannot use.
    #[error("{origin}: field `{field}` = {value} is not supported (expected {expected})")]
    ConfigValue {
        origin: String,
        field: String,
        value: String,
        expected: String,
    },

    /// The config belongs to a scheduler from which no DDIM noise schedule can be derived.
    #[error("{origin}: a `{class_name}` config cannot be sampled with DDIM: {reason}")]
    IncompatibleScheduler {
        origin: String,
        class_name: String,
        reason: String,
    },

    /// `set_timesteps` was asked for an impossible number of steps.
    #[error(
        "cannot use {requested} inference steps: expected 1..={num_train_timesteps} \
         (the model was trained with {num_train_timesteps} timesteps)"
    )]
    InvalidStepCount {
        requested: usize,
        num_train_timesteps: usize,
    },

    /// A step was requested before `set_timesteps`.
    #[error("{scheduler}: `step` called before `set_timesteps`")]
    TimestepsNotSet { scheduler: &'static str },

    /// A timestep outside the training range was passed to a scheduler.
    #[error("timestep {timestep} is outside the training range 0..{num_train_timesteps}")]
    TimestepOutOfRange {
        timestep: usize,
        num_train_timesteps: usize,
    },

    /// A step whose result is undefined (diffusers would return infinities or NaNs).
    #[error("step at timestep {timestep} is undefined: {reason}")]
    DegenerateStep { timestep: usize, reason: String },

    /// Tensors that must agree in shape do not.
    #[error("{what}: shapes {left:?} and {right:?} must be equal")]
    ShapeMismatch {
        what: String,
        left: Vec<usize>,
        right: Vec<usize>,
    },

    /// A sampler option is out of its range.
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: String, reason: String },

    /// The denoiser (the model side) failed.
    #[error("denoiser failed: {0}")]
    Denoiser(Box<dyn std::error::Error + Send + Sync>),

    /// A step hook (steering, recording) failed; its error is kept whole.
    #[error("{0}")]
    Hook(Box<dyn std::error::Error + Send + Sync>),

    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Result with [`DiffusionError`].
pub type Result<T> = std::result::Result<T, DiffusionError>;

impl DiffusionError {
    /// Wraps a model-side error so that a [`crate::Denoiser`] implementation can return it.
    pub fn denoiser(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        DiffusionError::Denoiser(Box::new(err))
    }

    /// Wraps a step hook's error (see [`crate::StepHook`]).
    pub fn hook(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        DiffusionError::Hook(err.into())
    }
}
