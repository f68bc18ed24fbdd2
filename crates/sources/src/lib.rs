//! Real training-data sources for the relation classifier, read into one record type.
//!
//! Every reader streams its input and hands records to a callback one at a time; none decodes
//! images (a [`SourceImage`] carries the image's path, its named boxes and the relations the
//! source asserts). [`load_image`] decodes an image at the model's size and returns the
//! [`BoxTransform`] that maps the record's boxes onto it.
//!
//! | reader | input | triplets |
//! |---|---|---|
//! | [`gqa::read_gqa`] | GQA `*_sceneGraphs.json` + image folder | asserted by the scene graph |
//! | [`coco::read_coco`] | COCO `instances_*.json` + image folder | derived from boxes by GenEval's rule |
//! | [`authors::read_triplets`] | the published phase-1 triplet folder + image folder | asserted by the file |
//! | [`jsonl::read_jsonl`] | one JSON object per line | asserted by the line |
//! | [`phase2::read_phase2`] | the published phase-2 samples and their `.pth` maps | per sample |
//!
//! Input that is not what it claims to be (another top-level type, missing fields) stops a
//! reader with one [`SourceError`] naming the file. Problems with single records (a missing
//! image, a duplicate id, an unknown category) and records a selection rule leaves out are
//! counted in [`Problems`] by [`ProblemKind`], never dropped unnoticed.

pub mod authors;
pub mod coco;
mod error;
pub mod gqa;
mod hypernyms;
mod image_load;
pub mod jsonl;
mod names;
mod paths;
pub mod phase2;
mod problems;
mod record;
mod split;
mod stream;

pub use error::SourceError;
pub use hypernyms::{HypernymError, Hypernyms};
pub use image_load::{
    load_image, load_image_in, load_source_image, probe_source_image, BoxTransform, Fit,
    ImageLoadError, ImageProbe, LoadedImage, MappedBox,
};
pub use l2s_eval::{BBox, Relation, Triplet};
pub use names::singular_name;
pub use paths::resolve_moved;
pub use problems::{Problem, ProblemKind, Problems};
pub use record::{
    CutObject, Frame, MappedImage, NamedBox, ReadSummary, SourceImage, DEFAULT_MIN_VISIBLE,
};
pub use split::{Split, SplitWeights};

/// What a record callback tells a reader: go on, or stop reading here (not an error).
pub use std::ops::ControlFlow;
