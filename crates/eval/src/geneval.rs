//! GenEval's "position" task: per-image decision, score summary, prompt files.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{relations, top1_per_class, Detection, Relation, RelationSet, Triplet};

/// GenEval's detection score threshold (detections must score strictly above it).
pub const SCORE_THRESHOLD: f32 = 0.3;

/// The verdict on one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// Both objects found and the wanted relation among those that hold.
    pub correct: bool,
    /// The selected detection of A, if any.
    pub a: Option<Detection>,
    /// The selected detection of B, if any.
    pub b: Option<Detection>,
    /// Relations of A to B (empty unless both were found).
    pub relations: RelationSet,
}

impl Judgement {
    /// Both objects were found (VISOR's "object accuracy").
    pub fn both_found(&self) -> bool {
        self.a.is_some() && self.b.is_some()
    }
}

/// Judges one image the way GenEval does for the position task: keep
/// detections scoring above [`SCORE_THRESHOLD`], the best one per class; the
/// image is correct when both classes are present and the wanted relation is
/// among the relations of A's box to B's box.
pub fn judge(wanted: &Triplet, detections: &[Detection]) -> Judgement {
    judge_with_threshold(wanted, detections, SCORE_THRESHOLD)
}

/// [`judge`] with another score threshold.
pub fn judge_with_threshold(
    wanted: &Triplet,
    detections: &[Detection],
    min_score: f32,
) -> Judgement {
    let mut top = top1_per_class(detections, min_score);
    let a = top.remove(&wanted.subject);
    let b = top.remove(&wanted.object);
    let rels = match (&a, &b) {
        (Some(a), Some(b)) => relations(&a.bbox, &b.bbox),
        _ => RelationSet::empty(),
    };
    Judgement {
        correct: rels.contains(wanted.relation),
        a,
        b,
        relations: rels,
    }
}

/// Running totals over judged images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub images: usize,
    pub correct: usize,
    pub both_found: usize,
}

impl Tally {
    pub fn add(&mut self, j: &Judgement) {
        self.images += 1;
        self.correct += j.correct as usize;
        self.both_found += j.both_found() as usize;
    }

    /// GenEval position score: mean correctness over images (0 when empty).
    pub fn accuracy(&self) -> f64 {
        ratio(self.correct, self.images)
    }

    /// Fraction of images where both objects were found.
    pub fn object_accuracy(&self) -> f64 {
        ratio(self.both_found, self.images)
    }

    /// Accuracy among images where both objects were found (VISOR_cond).
    pub fn conditional_accuracy(&self) -> f64 {
        ratio(self.correct, self.both_found)
    }
}

fn ratio(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

/// One line of a GenEval metadata file for the position task.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionPrompt {
    pub prompt: String,
    pub triplet: Triplet,
}

/// A problem with a GenEval prompt file.
#[derive(Debug, thiserror::Error)]
pub enum PromptFileError {
    #[error("cannot read GenEval prompt file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Line {
        path: String,
        line: usize,
        msg: String,
    },
}

#[derive(Deserialize)]
struct RawLine {
    tag: String,
    prompt: String,
    include: Vec<RawInclude>,
}

#[derive(Deserialize)]
struct RawInclude {
    class: String,
    #[serde(default)]
    position: Option<(String, usize)>,
}

/// Parses one GenEval metadata line. Lines of other tags give `Ok(None)`.
/// A position line lists B first and then A with `"position": [rel, 0]`.
pub fn parse_position_line(line: &str) -> Result<Option<PositionPrompt>, String> {
    let raw: RawLine =
        serde_json::from_str(line).map_err(|e| format!("not a GenEval metadata line: {e}"))?;
    if raw.tag != "position" {
        return Ok(None);
    }
    let (a_idx, rel, target) = raw
        .include
        .iter()
        .enumerate()
        .find_map(|(i, inc)| inc.position.as_ref().map(|(r, t)| (i, r.clone(), *t)))
        .ok_or("position line without a \"position\" entry")?;
    let b = raw.include.get(target).ok_or_else(|| {
        format!(
            "position target {target} is not among the {} included objects",
            raw.include.len()
        )
    })?;
    let relation = Relation::parse(&rel).map_err(|e| e.to_string())?;
    Ok(Some(PositionPrompt {
        prompt: raw.prompt,
        triplet: Triplet::new(raw.include[a_idx].class.clone(), relation, b.class.clone()),
    }))
}

/// Reads the position-task lines of a GenEval metadata JSONL file (other tags
/// and blank lines are skipped).
pub fn read_position_prompts(path: &Path) -> Result<Vec<PositionPrompt>, PromptFileError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PromptFileError::Io {
        path: p.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_position_line(line) {
            Ok(Some(pp)) => out.push(pp),
            Ok(None) => {}
            Err(msg) => {
                return Err(PromptFileError::Line {
                    path: p,
                    line: i + 1,
                    msg,
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BBox;

    fn det(class: &str, score: f32, b: BBox) -> Detection {
        Detection {
            class: class.into(),
            bbox: b,
            score,
        }
    }

    #[test]
    fn judge_cases() {
        let left = BBox::new(0.0, 10.0, 10.0, 20.0);
        let right = BBox::new(20.0, 10.0, 30.0, 20.0);
        let want = Triplet::new("dog", Relation::LeftOf, "cat");
        let j = judge(&want, &[det("dog", 0.9, left), det("cat", 0.8, right)]);
        assert!(j.correct && j.both_found());
        // Wrong relation.
        let j = judge(&want, &[det("dog", 0.9, right), det("cat", 0.8, left)]);
        assert!(!j.correct && j.both_found());
        assert!(j.relations.contains(Relation::RightOf));
        // B below threshold.
        let j = judge(&want, &[det("dog", 0.9, left), det("cat", 0.3, right)]);
        assert!(!j.correct && !j.both_found());
        // Only the top-scoring dog counts.
        let j = judge(
            &want,
            &[
                det("dog", 0.5, left),
                det("dog", 0.95, right),
                det("cat", 0.8, BBox::new(10.0, 10.0, 20.0, 20.0)),
            ],
        );
        assert!(!j.correct);
        assert_eq!(j.a.unwrap().score, 0.95);
        let mut t = Tally::default();
        t.add(&judge(
            &want,
            &[det("dog", 0.9, left), det("cat", 0.8, right)],
        ));
        t.add(&judge(&want, &[]));
        assert_eq!(
            (t.accuracy(), t.object_accuracy(), t.conditional_accuracy()),
            (0.5, 0.5, 1.0)
        );
    }

    #[test]
    fn parse_geneval_line() {
        let l = r#"{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}"#;
        let p = parse_position_line(l).unwrap().unwrap();
        assert_eq!(
            p.triplet,
            Triplet::new("dog", Relation::RightOf, "teddy bear")
        );
        let other = r#"{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}"#;
        assert!(parse_position_line(other).unwrap().is_none());
        assert!(parse_position_line("{").is_err());
    }

    /// Position prompts in GenEval's metadata form read back as their triplets.
    #[test]
    fn reads_position_prompts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let lines: String = [
            ("dog", Relation::RightOf, "teddy bear"),
            ("wine glass", Relation::Above, "kite"),
        ]
        .iter()
        .map(|(a, r, b)| crate::prompts::position_prompt(a, *r, b).metadata_line() + "\n")
        .collect();
        std::fs::write(&path, lines).unwrap();
        let ps = read_position_prompts(&path).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(
            ps[0].triplet,
            Triplet::new("dog", Relation::RightOf, "teddy bear")
        );
        assert_eq!(ps[1].prompt, "a photo of a wine glass above a kite");
        assert!(read_position_prompts(Path::new("/nonexistent/x.jsonl")).is_err());
    }
}
