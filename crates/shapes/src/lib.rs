//! The shapes world: a small synthetic text-to-image domain in which spatial
//! accuracy can be measured exactly.
//!
//! - [`ShapeClass`]: eight classes (circle, square, triangle, star, heart, ring,
//!   cross, diamond), each a single CLIP token with its own silhouette and colour;
//! - [`render()`] / [`render_scene`]: deterministic scenes of 1–3 objects on a
//!   light background, with exact boxes;
//! - [`caption()`]: captions whose relation words, when present, are random;
//! - [`ShapeDetector`]: a colour-and-shape detector implementing
//!   [`l2s_eval::Detector`];
//! - [`generate`] / [`read_dataset`]: dataset folders (PNG + COCO + relations);
//! - [`all_prompts`] / [`split_prompts`] / [`parse_prompt`]: evaluation prompts.

use std::path::PathBuf;

pub mod caption;
pub mod classes;
pub mod dataset;
pub mod detect;
pub mod prompts;
pub mod render;

pub use caption::{caption, caption_for};
pub use classes::{class_names, ShapeClass, UnknownClass};
pub use dataset::{generate, read_dataset, write_scenes, SceneImage, SceneSet, SceneSetInfo};
pub use detect::{Analysis, Blob, DetectorConfig, Rejection, ShapeDetector};
pub use prompts::{all_prompts, map_objects, parse_prompt, split_prompts, EvalPrompt, PromptError};
pub use render::{render, render_scene, render_with, RenderConfig, Scene, SceneObject};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ShapesError {
    #[error("invalid render config: {0}")]
    InvalidConfig(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Image {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("{path}: not valid JSON of the expected form: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// Writing a file failed (the message names it).
    #[error(transparent)]
    Write(#[from] l2s_files::WriteError),
}
