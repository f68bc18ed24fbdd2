//! Errors of model loading and execution. Every variant names the file, tensor or field concerned.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {what}")]
    Io { path: PathBuf, what: String },

    #[error("{path}: not valid JSON for {expected}: {reason}")]
    Config {
        path: PathBuf,
        expected: String,
        reason: String,
    },

    #[error("{path}: unsupported {field} `{value}` (supported: {supported})")]
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        supported: String,
    },

    #[error("model folder {folder}: missing component `{component}` ({expected})")]
    MissingComponent {
        folder: PathBuf,
        component: String,
        expected: String,
    },

    #[error("{path}: corrupt or unreadable safetensors file: {reason}")]
    CorruptWeights { path: PathBuf, reason: String },

    #[error("loading {dir}: {reason}")]
    Build { dir: PathBuf, reason: String },

    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: String, reason: String },

    #[error("word `{word}` is not in the prompt {prompt:?} (the prompt's words: {words})")]
    WordNotInPrompt {
        word: String,
        prompt: String,
        words: String,
    },

    #[error(transparent)]
    Diffusion(#[from] l2s_diffusion::DiffusionError),

    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        ModelError::Io {
            path: path.into(),
            what: err.to_string(),
        }
    }
}
