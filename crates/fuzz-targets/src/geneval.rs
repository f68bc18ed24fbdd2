//! GenEval's JSONL files: prompt metadata, results, and detections to score.

use std::path::Path;

use l2s_eval::score::{parse_results, ScoreOptions};
use l2s_eval::sources::score_detections_text;

use crate::Outcome;

/// Reads the text as each GenEval JSONL file (prompt metadata, results, detections) and each
/// line as a position prompt; `Ok` when one of the file readers accepts it.
pub fn geneval_jsonl(data: &[u8]) -> Outcome {
    let text = crate::text(data)?;
    for line in text.lines() {
        // Only for the panics it might have: a line may well be another kind.
        let _ = l2s_eval::parse_position_line(line);
    }
    let results = [
        l2s_eval::prompts::parse_prompt_file(text, Path::new("metadata.jsonl"))
            .map(drop)
            .map_err(|e| e.to_string()),
        parse_results(text, Path::new("results.jsonl")).map(drop),
        score_detections_text(
            text,
            Path::new("detections.jsonl"),
            Some(4),
            &ScoreOptions::default(),
        )
        .and_then(|scored| {
            // A detections file where nothing could be scored is refused by `l2s score`.
            if scored.results.is_empty() {
                Err("nothing scored".into())
            } else {
                Ok(())
            }
        }),
    ];
    if results.iter().any(Result::is_ok) {
        return Ok(());
    }
    Err(results
        .into_iter()
        .filter_map(Result::err)
        .collect::<Vec<_>>()
        .join("; "))
}
