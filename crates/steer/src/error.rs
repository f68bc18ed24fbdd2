//! The error of this crate's recipes (steering, data building, evaluation, the bench): the failing
//! layer's own typed error kept as a variant, and [`SteerError::Context`] for where it happened.
//! Printed with its sources (as the command line does), it reads "where: what went wrong".

/// `Result` with [`SteerError`].
pub type Result<T, E = SteerError> = std::result::Result<T, E>;

/// The larger sources are boxed so that every `Result` of the crate stays small.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error(transparent)]
    Tensor(Box<candle_core::Error>),
    #[error(transparent)]
    Model(Box<l2s_models::ModelError>),
    #[error(transparent)]
    Generate(Box<l2s_generate::GenerateError>),
    #[error(transparent)]
    Diffusion(Box<l2s_diffusion::DiffusionError>),
    #[error(transparent)]
    Dataset(Box<crate::DatasetError>),
    #[error(transparent)]
    Checkpoint(Box<crate::CheckpointError>),
    #[error(transparent)]
    Train(Box<crate::TrainError>),
    #[error(transparent)]
    Classify(Box<crate::classify::ClassifyError>),
    #[error(transparent)]
    Relation(Box<crate::RelationParseError>),
    #[error(transparent)]
    Detect(#[from] l2s_eval::DetectError),
    #[error(transparent)]
    Prompts(#[from] l2s_eval::prompts::PromptSetError),
    #[error(transparent)]
    Shapes(Box<l2s_shapes::ShapesError>),
    #[error(transparent)]
    Write(#[from] l2s_files::WriteError),
    #[error(transparent)]
    Source(Box<l2s_sources::SourceError>),
    #[error(transparent)]
    ImageLoad(Box<l2s_sources::ImageLoadError>),
    #[error(transparent)]
    Mask2Former(Box<l2s_detect::Mask2FormerError>),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A setting, file or input that cannot work; the message says which and why.
    #[error("{0}")]
    Invalid(String),
    /// `source` happened while doing `context`.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<SteerError>,
    },
}

/// `From` for the boxed variants.
macro_rules! from_boxed {
    ($($variant:ident: $source:ty),* $(,)?) => {$(
        impl From<$source> for SteerError {
            fn from(e: $source) -> Self {
                SteerError::$variant(Box::new(e))
            }
        }
    )*};
}

from_boxed!(
    Tensor: candle_core::Error,
    Model: l2s_models::ModelError,
    Generate: l2s_generate::GenerateError,
    Diffusion: l2s_diffusion::DiffusionError,
    Dataset: crate::DatasetError,
    Checkpoint: crate::CheckpointError,
    Train: crate::TrainError,
    Classify: crate::classify::ClassifyError,
    Relation: crate::RelationParseError,
    Shapes: l2s_shapes::ShapesError,
    Source: l2s_sources::SourceError,
    ImageLoad: l2s_sources::ImageLoadError,
    Mask2Former: l2s_detect::Mask2FormerError,
);

impl SteerError {
    /// The innermost error, past every [`SteerError::Context`].
    pub fn root(&self) -> &SteerError {
        match self {
            SteerError::Context { source, .. } => source.root(),
            other => other,
        }
    }
}

/// Says where an error happened, as `anyhow::Context` does, but keeping the typed error.
pub trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<SteerError>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| SteerError::Context {
            context: context.into(),
            source: Box::new(e.into()),
        })
    }

    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| SteerError::Context {
            context: context().into(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    /// A missing value: the context is the whole message.
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| SteerError::Invalid(context.into()))
    }

    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| SteerError::Invalid(context().into()))
    }
}

/// Returns a [`SteerError::Invalid`] with a formatted message.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::SteerError::Invalid(format!($($arg)*)))
    };
}
pub(crate) use bail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_typed_source_and_prints_the_chain() {
        let io: std::result::Result<(), std::io::Error> =
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, "gone"));
        let err = io.context("reading x.json").unwrap_err();
        assert_eq!(err.to_string(), "reading x.json");
        assert!(
            matches!(err.root(), SteerError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
        );
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("gone"));
        let none: Option<u8> = None;
        assert_eq!(
            none.context("no value").unwrap_err().to_string(),
            "no value"
        );
    }
}
