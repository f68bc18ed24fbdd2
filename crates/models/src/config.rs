//! Reading diffusers / transformers JSON configs with errors that name the file.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{ModelError, Result};

pub fn read_config<T: DeserializeOwned>(path: &Path, expected: &str) -> Result<T> {
    parse_config(&read_text(path)?, path, expected)
}

/// A config file's text, with an error naming the file.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))
}

/// Parses a config's JSON text; `path` is where it came from, for errors.
pub fn parse_config<T: DeserializeOwned>(text: &str, path: &Path, expected: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        expected: expected.to_string(),
        reason: e.to_string(),
    })
}

/// A config field that diffusers allows as one value or one per block.
#[derive(Clone, Debug, serde::Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The value per block for `n` blocks; `None` when a list has the wrong length.
    pub fn per_block(&self, n: usize) -> Option<Vec<T>> {
        match self {
            Self::One(v) => Some(vec![v.clone(); n]),
            Self::Many(v) if v.len() == n => Some(v.clone()),
            Self::Many(_) => None,
        }
    }
}
