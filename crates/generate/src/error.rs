//! The crate's error type. Every variant names the argument, file, word or tensor concerned and
//! what was expected.

use std::path::PathBuf;

use l2s_diffusion::DiffusionError;
use l2s_models::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// An argument is out of range or inconsistent with the model.
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: String, reason: String },

    /// A tensor or image has the wrong shape.
    #[error("{what}: found {found}, expected {expected}")]
    Shape {
        what: String,
        found: String,
        expected: String,
    },

    /// A tensor that becomes an image holds NaN or ±Inf.
    #[error(
        "{what}: {count} of {total} values are not finite ({nan} NaN, {} ±Inf), so no image is \
         written; the sampling diverged (a steering step size too large, non-finite initial \
         latents, or a model whose weights or config give NaN)",
        count - nan
    )]
    NonFinite {
        what: String,
        count: usize,
        total: usize,
        nan: usize,
    },

    /// A word asked for is not among the prompt's tokens.
    #[error("word `{word}` is not in the prompt {prompt:?} (the prompt's words: {words})")]
    WordNotInPrompt {
        word: String,
        prompt: String,
        words: String,
    },

    /// Reading or writing a file failed, or its content is not what was expected.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },

    /// Writing a file failed (the message names it).
    #[error(transparent)]
    Write(#[from] l2s_files::WriteError),

    #[error(transparent)]
    Model(#[from] ModelError),

    #[error(transparent)]
    Diffusion(#[from] DiffusionError),

    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, GenerateError>;

impl GenerateError {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        GenerateError::InvalidArgument {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        GenerateError::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
