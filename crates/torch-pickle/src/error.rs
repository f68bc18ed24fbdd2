//! Errors. Every [`Error`] names the file it concerns; its [`ErrorKind`] says what was wrong
//! and what was expected.

use std::path::PathBuf;

/// A problem with one checkpoint file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct Error {
    pub path: PathBuf,
    pub kind: ErrorKind,
}

impl Error {
    pub(crate) fn new(path: impl Into<PathBuf>, kind: ErrorKind) -> Self {
        Self {
            path: path.into(),
            kind,
        }
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("{0}")]
    Io(#[from] std::io::Error),

    #[error("not a zip archive ({0}); expected a PyTorch checkpoint written by torch.save (PyTorch 1.6 or later writes a zip archive)")]
    NotZip(String),

    #[error("this is a legacy (pre-1.6, non-zip) torch.save file, which is not supported; re-save it with a current PyTorch")]
    LegacyFormat,

    #[error("zip archive: {0}")]
    Zip(String),

    #[error("the archive has no {0}; expected a torch.save archive with <name>/data.pkl and <name>/data/<key> records")]
    MissingRecord(String),

    #[error("{0}")]
    Layout(String),

    #[error(
        "record {record} is compressed ({method}); torch.save stores its records uncompressed"
    )]
    Compressed { record: String, method: String },

    #[error("pickle byte {offset}: refusing to load the global {module}.{name}: only PyTorch tensor and storage rebuilders and plain containers (OrderedDict, set, frozenset) are allowed, and nothing that could run code")]
    ForbiddenGlobal {
        offset: usize,
        module: String,
        name: String,
    },

    #[error("pickle byte {offset}: opcode {opcode:#04x} ({what}) is not supported by this reader")]
    UnsupportedOpcode {
        offset: usize,
        opcode: u8,
        what: &'static str,
    },

    #[error("pickle byte {offset}: {message}")]
    Pickle { offset: usize, message: String },

    #[error("{what} exceeds the limit of {limit} ({actual} requested)")]
    Limit {
        what: &'static str,
        limit: u64,
        actual: u64,
    },

    #[error("tensor {tensor}: {message}")]
    Tensor { tensor: String, message: String },

    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}
