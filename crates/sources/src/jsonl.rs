//! Plain JSONL: one image and one asserted relation per line.
//!
//! ```json
//! {"image": "photos/dog_cat.jpg", "subject": "dog", "relation": "to the left of", "object": "cat"}
//! {"image": "a.png", "subject": "cup", "relation": "above", "object": "book",
//!  "subject_box": [10, 5, 60, 40], "object_box": [8, 50, 90, 120], "id": "kitchen-3"}
//! ```
//!
//! - `image`: a path relative to the JSONL file's folder (or absolute);
//! - `relation`: any phrasing [`Relation::parse`] accepts ("left of", "to the left of",
//!   "on the left of", "above", "on top of", "below", "under", …);
//! - `subject_box`, `object_box` (optional): `[x0, y0, x1, y1]` pixels of the image as a
//!   viewer shows it, EXIF orientation applied ([`Frame::Displayed`]: a person describes the
//!   photo they see). With both boxes, a line whose boxes do not show the relation under
//!   GenEval's rule is counted and left out ([`ProblemKind::BoxesDisagree`]) unless
//!   [`JsonlOptions::check_boxes`] is off;
//! - `id` (optional): the record's id; without one it is `<file name>:<line number>`.
//!
//! Each line is a record: a line that is not a JSON object with these fields, whose relation
//! is unknown, whose subject and object are the same, whose image is missing or whose `id`
//! repeats an earlier line's is counted and skipped. Blank lines are skipped. A file whose
//! first line opens a JSON list is refused as a whole (that is a JSON file, not JSONL).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use l2s_eval::{relations, BBox, Relation, Triplet};
use serde::Deserialize;

use crate::{
    ControlFlow, Frame, NamedBox, ProblemKind, Problems, ReadSummary, SourceError, SourceImage,
    Split, SplitWeights,
};

/// How [`read_jsonl`] reads.
#[derive(Debug, Clone)]
pub struct JsonlOptions {
    /// Leave out lines whose two boxes do not show their relation (default true).
    pub check_boxes: bool,
    /// Check that each line's image exists (default true).
    pub check_images: bool,
    pub split_weights: SplitWeights,
}

impl Default for JsonlOptions {
    fn default() -> Self {
        Self {
            check_boxes: true,
            check_images: true,
            split_weights: SplitWeights::default(),
        }
    }
}

#[derive(Deserialize)]
struct Line {
    image: String,
    subject: String,
    relation: String,
    object: String,
    #[serde(default)]
    subject_box: Option<[f32; 4]>,
    #[serde(default)]
    object_box: Option<[f32; 4]>,
    #[serde(default)]
    id: Option<String>,
}

/// Reads a JSONL file, calling `on_image` with each usable line's record. Stops early,
/// without error, on [`ControlFlow::Break`].
pub fn read_jsonl(
    path: impl AsRef<Path>,
    opts: &JsonlOptions,
    problems: &mut Problems,
    mut on_image: impl FnMut(SourceImage) -> ControlFlow<()>,
) -> Result<ReadSummary, SourceError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| SourceError::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut summary = ReadSummary::default();
    let mut ids = HashSet::new();
    let mut first = true;
    for (k, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| SourceError::io(path, e))?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if first && text.starts_with('[') {
            return Err(SourceError::format(
                path,
                "a JSONL file (one JSON object per line)",
                "its first line opens a JSON list",
            ));
        }
        first = false;
        summary.seen += 1;
        let number = k + 1;
        let lid = format!("line {number}");
        let parsed: Line = match serde_json::from_str(text) {
            Ok(l) => l,
            Err(e) => {
                problems.push(path, lid, ProblemKind::BadRecord, e.to_string());
                continue;
            }
        };
        let relation = match Relation::parse(&parsed.relation) {
            Ok(r) => r,
            Err(e) => {
                problems.push(path, lid, ProblemKind::UnknownRelation, e.0);
                continue;
            }
        };
        let (subject, object) = (parsed.subject.trim(), parsed.object.trim());
        if subject.is_empty() || object.is_empty() {
            let what = "empty subject or object";
            problems.push(path, lid, ProblemKind::BadRecord, what);
            continue;
        }
        if subject == object {
            problems.push(path, lid, ProblemKind::SameName, subject.to_string());
            continue;
        }
        let to_box = |b: Option<[f32; 4]>| b.map(|[x0, y0, x1, y1]| BBox::new(x0, y0, x1, y1));
        let (sb, ob) = (to_box(parsed.subject_box), to_box(parsed.object_box));
        let bad_box = [sb, ob]
            .into_iter()
            .flatten()
            .find(|b| !b.is_finite() || b.x1 < b.x0 || b.y1 < b.y0);
        if let Some(b) = bad_box {
            problems.push(path, lid, ProblemKind::BadBox, format!("{:?}", b.xyxy()));
            continue;
        }
        if let (true, Some(a), Some(b)) = (opts.check_boxes, sb, ob) {
            let held = relations(&a, &b);
            if !held.contains(relation) {
                let what = format!("{subject} {relation} {object}; the boxes show {held}");
                problems.push(path, lid, ProblemKind::BoxesDisagree, what);
                continue;
            }
        }
        let id = parsed.id.unwrap_or_else(|| format!("{file_name}:{number}"));
        if !ids.insert(id.clone()) {
            problems.push(path, lid, ProblemKind::DuplicateId, id);
            continue;
        }
        let image = PathBuf::from(&parsed.image);
        let image = if image.is_absolute() {
            image
        } else {
            base.join(image)
        };
        if opts.check_images && !image.is_file() {
            let shown = image.display().to_string();
            problems.push(path, lid, ProblemKind::MissingImage, shown);
            continue;
        }
        let mut objects = Vec::new();
        if let Some(b) = sb {
            objects.push(NamedBox::new(subject, b));
        }
        if let Some(b) = ob {
            objects.push(NamedBox::new(object, b));
        }
        summary.yielded += 1;
        let split = Split::of(&id, &opts.split_weights);
        let record = SourceImage {
            id,
            path: image,
            size: None,
            frame: Frame::Displayed,
            objects,
            triplets: vec![Triplet::new(subject, relation, object)],
            derived_from_boxes: false,
            split,
        };
        if on_image(record).is_break() {
            summary.stopped = true;
            break;
        }
    }
    Ok(summary)
}
