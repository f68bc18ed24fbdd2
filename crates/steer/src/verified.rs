//! Self-verified generations, the paper's second source of training data: images generated for
//! spatial prompts (plain or steered, through the evaluation harness, so the run resumes and
//! shards like `l2s eval`), judged by a detector with GenEval's rule, and the correct ones
//! written as a JSON Lines source (`verified.jsonl`) that `l2s data build --jsonl` reads, with
//! the boxes the judgement used.

use std::path::{Path, PathBuf};

use l2s_eval::prompts::SpatialPrompt;
use l2s_eval::report::{RESULTS_FILE, SUMMARY_FILE};
use l2s_eval::score::{results_jsonl, ImageResult, ScoreOptions};
use l2s_eval::sources::score_folder;
use l2s_eval::tasks::TaskPrompt;
use l2s_eval::Detector;
use serde_json::json;

use crate::error::Result;
use crate::evaluate::{run_eval, EvalRun};

/// The source file a verified run writes into its folder.
pub const VERIFIED_FILE: &str = "verified.jsonl";

/// What a verified generation did.
#[derive(Debug, serde::Serialize)]
pub struct VerifiedReport {
    /// Images judged (generated now or already present).
    pub images: usize,
    pub generated: usize,
    /// Images the detector judged correct.
    pub kept_images: usize,
    /// Lines written: one per relation of a kept image.
    pub lines: usize,
    pub file: PathBuf,
}

/// The `verified.jsonl` lines of one judged image: one per relation, with the boxes used.
fn lines_of(r: &ImageResult) -> Vec<serde_json::Value> {
    if !r.correct {
        return Vec::new();
    }
    let used = |class: &str| {
        r.detections
            .iter()
            .filter(|d| d.used && d.class == class)
            .max_by(|a, b| a.score.total_cmp(&b.score))
            .map(|d| d.bbox)
    };
    r.relations
        .iter()
        .filter(|c| c.correct)
        .map(|c| {
            let mut line = json!({
                "image": r.filename,
                "subject": c.subject,
                "relation": c.relation.name(),
                "object": c.object,
                "id": r.filename,
            });
            if let (Some(a), Some(b)) = (used(&c.subject), used(&c.object)) {
                line["subject_box"] = json!(a);
                line["object_box"] = json!(b);
            }
            line
        })
        .collect()
}

/// Generates `prompts` into `out` with `run` (GenEval's layout, resumable), scores the folder
/// with `detector` and writes `out/verified.jsonl` (also `results.jsonl` and `summary.json`).
/// `progress(done, total, prompt)` while generating.
pub fn generate_verified(
    run: &EvalRun,
    prompts: &[SpatialPrompt],
    source: &str,
    out: &Path,
    detector: &dyn Detector,
    detector_name: &str,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<VerifiedReport> {
    let tasks: Vec<TaskPrompt> = prompts.iter().map(TaskPrompt::from).collect();
    let outcome = run_eval(run, &tasks, source, out, progress)?;
    let scored = score_folder(
        out,
        detector,
        detector_name,
        Some(run.images_per_prompt),
        &ScoreOptions::default(),
        &mut |_, _| {},
    )
    .map_err(crate::SteerError::Invalid)?;
    l2s_files::write_atomic(
        &out.join(RESULTS_FILE),
        results_jsonl(&scored.results).as_bytes(),
    )?;
    l2s_files::write_atomic(
        &out.join(SUMMARY_FILE),
        serde_json::to_string_pretty(&scored.summary)?.as_bytes(),
    )?;
    let mut text = String::new();
    let mut kept_images = 0;
    let mut lines = 0;
    for r in &scored.results {
        let of = lines_of(r);
        kept_images += usize::from(!of.is_empty());
        for line in of {
            text.push_str(&line.to_string());
            text.push('\n');
            lines += 1;
        }
    }
    let file = out.join(VERIFIED_FILE);
    l2s_files::write_atomic(&file, text.as_bytes())?;
    Ok(VerifiedReport {
        images: scored.results.len(),
        generated: outcome.made,
        kept_images,
        lines,
        file,
    })
}
