//! Errors that name the file, the tensor and the shape that was expected.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Mask2FormerError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}` ({naming} naming) is missing; expected shape {expected:?}")]
    MissingTensor {
        path: PathBuf,
        name: String,
        naming: &'static str,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}; expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: not a Mask2Former checkpoint in a known naming: {message}")]
    UnknownNaming { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Mask2FormerError>;
