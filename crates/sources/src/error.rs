//! Whole-file errors: the input is not what it claims to be.

use std::path::PathBuf;

/// A file a reader cannot use at all. Problems with single records are [`crate::Problems`].
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file parses as something else than `expected`, or lacks a required field.
    #[error("{} is not {expected}: {message}", path.display())]
    Format {
        path: PathBuf,
        expected: &'static str,
        message: String,
    },
}

impl SourceError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(
        path: impl Into<PathBuf>,
        expected: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self::Format {
            path: path.into(),
            expected,
            message: message.into(),
        }
    }

    /// The file concerned.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Self::Io { path, .. } | Self::Format { path, .. } => path,
        }
    }
}
