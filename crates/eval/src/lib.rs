//! Evaluation primitives for spatial text-to-image generation.
//!
//! - [`BBox`]: a pixel box (xyxy, y grows downwards);
//! - [`Detection`] and the [`Detector`] trait;
//! - [`Relation`] / [`RelationSet`] and [`relations`], GenEval's rule for
//!   reading "left of / right of / above / below" from two boxes;
//! - [`judge`]: GenEval's per-image decision for the position task, and
//!   [`Tally`] for the mean score; [`read_position_prompts`] reads GenEval's
//!   metadata files.
//! - [`prompts`]: GenEval metadata files (unsupported tags reported, never dropped silently),
//!   seeded generators of position and multi-relation prompt sets, COCO's class names;
//! - [`layout`]: GenEval's image folder layout (`NNNNN/metadata.jsonl`, `NNNNN/samples/SSSS.png`);
//! - [`score`] / [`sources`]: GenEval's check for spatial prompts, per-image results, summaries
//!   with VISOR's metrics, and scoring a folder (through a [`Detector`]) or a detections file;
//! - [`tasks`]: GenEval's six tasks (and our multi-relation one) as metadata lines to judge;
//! - [`report`]: a self-contained HTML report of scored runs.

mod bbox;
mod detect;
mod geneval;
pub mod layout;
pub mod prompts;
mod relation;
pub mod report;
pub mod score;
pub mod sources;
pub mod tasks;
mod triplet;

pub use bbox::BBox;
pub use detect::{
    top1_per_class, ColorClassifier, ColorQuery, DetectError, Detection, Detector, ObjectMask,
    Segment,
};
pub use geneval::{
    judge, judge_with_threshold, parse_position_line, read_position_prompts, Judgement,
    PositionPrompt, PromptFileError, Tally, SCORE_THRESHOLD,
};
pub use relation::{
    relations, relations_with_threshold, Relation, RelationSet, UnknownRelation, POSITION_THRESHOLD,
};
pub use triplet::Triplet;
