//! Errors of the shapes-world model crate.

use std::path::PathBuf;

/// `Result` with [`ShapesModelError`].
pub type Result<T, E = ShapesModelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ShapesModelError {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] l2s_models::ModelError),
    #[error(transparent)]
    Diffusion(#[from] l2s_diffusion::DiffusionError),
    #[error(transparent)]
    Shapes(#[from] l2s_shapes::ShapesError),
    #[error(transparent)]
    Write(#[from] l2s_files::WriteError),
    #[error("encoding an image: {0}")]
    Image(#[from] image::ImageError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `what`: the file or built-in document that is not the JSON expected.
    #[error("{what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    /// A weight file that does not fit the model: the tensor named and why.
    #[error("{}: {reason}", path.display())]
    Weights { path: PathBuf, reason: String },
    /// A run folder that cannot be used for this run.
    #[error("{}: {reason}", path.display())]
    RunFolder { path: PathBuf, reason: String },
    #[error("training diverged at step {step} (loss {loss}); lower --lr")]
    Diverged { step: usize, loss: f32 },
    #[error("unpacking the embedded {what} into {}", dir.display())]
    Unpack {
        what: &'static str,
        dir: PathBuf,
        #[source]
        source: Box<ShapesModelError>,
    },
}

impl ShapesModelError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub(crate) fn json(what: impl Into<String>) -> impl FnOnce(serde_json::Error) -> Self {
        let what = what.into();
        move |source| Self::Json { what, source }
    }

    pub(crate) fn weights(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Self::Weights {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
