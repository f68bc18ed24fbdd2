//! Evaluation primitives for spatial text-to-image generation.
//!
//! - [`BBox`]: a pixel box (xyxy, y grows downwards);
//! - [`Detection`] and the [`Detector`] trait;
//! - [`Relation`] / [`RelationSet`] and [`relations`], GenEval's rule for
//!   reading "left of / right of / above / below" from two boxes;
//! - [`judge`]: GenEval's per-image decision for the position task, and
//!   [`Tally`] for the mean score; [`read_position_prompts`] reads GenEval's
//!   metadata files.

mod bbox;
mod detect;
mod geneval;
mod relation;

pub use bbox::BBox;
pub use detect::{top1_per_class, Detection, Detector};
pub use geneval::{
    judge, judge_with_threshold, parse_position_line, read_position_prompts, Judgement,
    PositionPrompt, PromptFileError, Tally, Triplet, SCORE_THRESHOLD,
};
pub use relation::{
    relations, relations_with_threshold, Relation, RelationSet, UnknownRelation, POSITION_THRESHOLD,
};
