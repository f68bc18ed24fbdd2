//! Prompt sets for spatial evaluation, in GenEval's metadata format.
//!
//! A GenEval metadata line names the objects an image must show (`include`, in order) and,
//! for spatial prompts, where one object must stand relative to an earlier one:
//!
//! ```text
//! {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
//!   {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}
//! ```
//!
//! - [`read_prompt_file`] reads such a file; lines of tags other than the spatial ones are kept
//!   as [`Unsupported`] entries with their line numbers, so callers can report them.
//! - [`position_prompts`] builds GenEval-style prompts "a photo of {a/an A} {rel} {a/an B}"
//!   from a class list ([`COCO_CLASSES`] by default, as GenEval does), reproducibly from a seed.
//! - [`multi_relation_prompts`] builds prompts with several objects and relations
//!   ("a photo of a cup left of a dog above a kite and a book"), tagged [`MULTI_TAG`]. Their
//!   lines use GenEval's own `include`/`position` encoding, so GenEval's checker reads them too.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::tasks::TaskPrompt;
use crate::Relation;

/// GenEval's tag of the two-object spatial task.
pub const POSITION_TAG: &str = "position";
/// Tag of prompts with several objects and relations (not one of GenEval's own tags).
pub const MULTI_TAG: &str = "multi_position";

/// True for the tags this crate scores: [`POSITION_TAG`] and [`MULTI_TAG`].
pub fn is_supported_tag(tag: &str) -> bool {
    tag == POSITION_TAG || tag == MULTI_TAG
}

/// GenEval's 80 COCO class names, in COCO's category order.
pub const COCO_CLASSES: [&str; 80] = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
];

/// The eight classes of the shapes world (the same names the shapes detector reports).
pub const SHAPES_CLASSES: [&str; 8] = [
    "circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond",
];

/// One object an image must show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Include {
    /// Detector class name.
    pub class: String,
    /// How many instances (spatial prompts use 1).
    #[serde(default = "one")]
    pub count: usize,
    /// Where it must stand: the relation to the object at that earlier `include` index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<(Relation, usize)>,
    /// The colour it must have (GenEval's colour tasks): one of [`crate::tasks::COLORS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
}

fn one() -> usize {
    1
}

/// A spatial prompt: a [`TaskPrompt`] of a spatial tag, whose objects stand in at least one
/// relation (what steering and training data need). Its fields are the task prompt's.
#[derive(Debug, Clone, PartialEq)]
pub struct SpatialPrompt(TaskPrompt);

impl std::ops::Deref for SpatialPrompt {
    type Target = TaskPrompt;

    fn deref(&self) -> &TaskPrompt {
        &self.0
    }
}

impl SpatialPrompt {
    /// Builds a prompt and its metadata line. `include` must already be valid
    /// (see [`TaskPrompt::from_metadata`] for the rules).
    fn build(tag: &str, prompt: String, include: Vec<Include>) -> Self {
        let metadata = json!({ "tag": tag, "include": include, "prompt": prompt });
        Self(TaskPrompt {
            tag: tag.to_string(),
            prompt,
            include,
            exclude: Vec::new(),
            metadata,
        })
    }

    /// Reads a metadata value: `Ok(None)` for tags other than the spatial ones, otherwise the
    /// checks of [`TaskPrompt::from_metadata`] (a spatial line needs a relation).
    pub fn from_metadata(value: Value) -> Result<Option<Self>, String> {
        Ok(TaskPrompt::from_metadata(value)?
            .filter(TaskPrompt::is_spatial)
            .map(Self))
    }

    /// [`SpatialPrompt::from_metadata`] on one line of text.
    pub fn from_line(line: &str) -> Result<Option<Self>, String> {
        Self::from_metadata(metadata_object(line)?)
    }

    /// The task prompt it is.
    pub fn task(&self) -> &TaskPrompt {
        &self.0
    }
}

/// One metadata line as a JSON object (the one reader of both prompt kinds' lines).
pub(crate) fn metadata_object(line: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    if !value.is_object() {
        return Err("not a JSON object".into());
    }
    Ok(value)
}

/// A line left out: its tag is not scored, or (for uses that need a relation) not spatial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unsupported {
    /// 1-based line number.
    pub line: usize,
    pub tag: String,
}

/// The contents of a GenEval metadata file.
#[derive(Debug, Clone)]
pub struct PromptFile {
    pub path: PathBuf,
    /// Lines of the scored tasks (GenEval's six and [`MULTI_TAG`]) with their 1-based line
    /// numbers.
    pub prompts: Vec<(usize, TaskPrompt)>,
    /// Lines of tags no task scores, in file order.
    pub unsupported: Vec<Unsupported>,
}

/// Why a line of an unscored tag is left out.
pub const NOT_A_TASK: &str = "not one of GenEval's tasks nor \"multi_position\"";
/// Why a scored line is left out where a relation is needed.
pub const NO_RELATION: &str = "only \"position\" and \"multi_position\" lines have a relation";

impl PromptFile {
    /// Unsupported line numbers grouped by tag.
    pub fn unsupported_by_tag(&self) -> BTreeMap<String, Vec<usize>> {
        group_unsupported(&self.unsupported)
    }

    /// One sentence per unsupported tag: "{path}: 2 lines tagged \"texture\" left out (…): lines 5, 9".
    pub fn unsupported_report(&self) -> Vec<String> {
        describe_unsupported(
            &self.path.display().to_string(),
            &self.unsupported,
            NOT_A_TASK,
        )
    }

    /// The spatial prompts, and every other scored line as left out for want of a relation.
    pub fn spatial(&self) -> (Vec<(usize, SpatialPrompt)>, Vec<Unsupported>) {
        split_spatial(self.prompts.iter().cloned())
    }
}

/// Splits numbered prompts into the spatial ones and the others, listed as left out for want of a
/// relation (what uses that need one report).
pub fn split_spatial(
    prompts: impl IntoIterator<Item = (usize, TaskPrompt)>,
) -> (Vec<(usize, SpatialPrompt)>, Vec<Unsupported>) {
    let mut spatial = Vec::new();
    let mut others = Vec::new();
    for (line, p) in prompts {
        if p.is_spatial() {
            spatial.push((line, SpatialPrompt(p)));
        } else {
            others.push(Unsupported { line, tag: p.tag });
        }
    }
    (spatial, others)
}

/// Unsupported line numbers grouped by tag.
pub fn group_unsupported(list: &[Unsupported]) -> BTreeMap<String, Vec<usize>> {
    let mut by: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for u in list {
        by.entry(u.tag.clone()).or_default().push(u.line);
    }
    by
}

/// Human-readable lines about left-out lines, one per tag, with a count, `why` and the line
/// numbers (the first 20, then "…").
pub fn describe_unsupported(source: &str, list: &[Unsupported], why: &str) -> Vec<String> {
    group_unsupported(list)
        .into_iter()
        .map(|(tag, lines)| {
            let shown: Vec<String> = lines.iter().take(20).map(|l| l.to_string()).collect();
            let more = if lines.len() > 20 { ", …" } else { "" };
            format!(
                "{source}: {} line{} tagged {tag:?} left out ({why}): line{} {}{more}",
                lines.len(),
                if lines.len() == 1 { "" } else { "s" },
                if lines.len() == 1 { "" } else { "s" },
                shown.join(", ")
            )
        })
        .collect()
}

/// A GenEval metadata file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PromptSetError {
    #[error("cannot read prompt file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Reads a GenEval metadata JSONL file: lines of the scored tasks become prompts; lines of other
/// tags are listed in [`PromptFile::unsupported`]; blank lines are skipped; a malformed line is
/// an error naming its line number.
pub fn read_prompt_file(path: &Path) -> Result<PromptFile, PromptSetError> {
    let text = std::fs::read_to_string(path).map_err(|source| PromptSetError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_prompt_file(&text, path)
}

/// [`read_prompt_file`] on the file's text; `path` names it in errors.
pub fn parse_prompt_file(text: &str, path: &Path) -> Result<PromptFile, PromptSetError> {
    let mut prompts = Vec::new();
    let mut unsupported = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| PromptSetError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let value: Value = serde_json::from_str(line)
            .map_err(|e| err(format!("not a GenEval metadata line: {e}")))?;
        match TaskPrompt::from_metadata(value.clone()).map_err(err)? {
            Some(p) => prompts.push((i + 1, p)),
            None => unsupported.push(Unsupported {
                line: i + 1,
                tag: value["tag"].as_str().unwrap_or_default().to_string(),
            }),
        }
    }
    Ok(PromptFile {
        path: path.to_path_buf(),
        prompts,
        unsupported,
    })
}

/// "a" or "an" by the first letter, as GenEval's prompts use them.
pub fn article(word: &str) -> &'static str {
    match word.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

fn noun(class: &str) -> String {
    format!("{} {class}", article(class))
}

/// GenEval's wording: "a photo of {a/an A} {rel} {a/an B}".
pub fn position_text(a: &str, relation: Relation, b: &str) -> String {
    format!("a photo of {} {relation} {}", noun(a), noun(b))
}

/// A GenEval position prompt "A rel B", with B listed first as GenEval does.
pub fn position_prompt(a: &str, relation: Relation, b: &str) -> SpatialPrompt {
    SpatialPrompt::build(
        POSITION_TAG,
        position_text(a, relation, b),
        vec![
            Include {
                class: b.to_string(),
                count: 1,
                position: None,
                color: None,
            },
            Include {
                class: a.to_string(),
                count: 1,
                position: Some((relation, 0)),
                color: None,
            },
        ],
    )
}

/// GenEval's evaluation prompts (`prompts/evaluation_metadata.jsonl`: 553 lines over its six
/// tasks), rebuilt from their facts (task, classes, counts, colours, relation; one line each in
/// `geneval_prompts.tsv`) with GenEval's wording and metadata, in its order.
pub fn geneval_prompts() -> Vec<TaskPrompt> {
    const FACTS: &str = include_str!("geneval_prompts.tsv");
    FACTS
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let obj = |class: &str| json!({"class": class, "count": 1});
            let colored =
                |class: &str, color: &str| json!({"class": class, "count": 1, "color": color});
            let (include, exclude, prompt) = match f.as_slice() {
                ["single_object", c] => (vec![obj(c)], None, format!("a photo of {}", noun(c))),
                ["two_object", a, b] => (
                    vec![obj(a), obj(b)],
                    None,
                    format!("a photo of {} and {}", noun(a), noun(b)),
                ),
                ["counting", c, n] => {
                    let n: usize = n.parse().expect("a count in the built-in table");
                    let word = ["two", "three", "four"][n - 2];
                    // GenEval's plural: "es" after a final "s", else "s" ("toothbrushs").
                    let plural = if c.ends_with('s') {
                        format!("{c}es")
                    } else {
                        format!("{c}s")
                    };
                    (
                        vec![json!({"class": c, "count": n})],
                        Some(json!([{"class": c, "count": n + 1}])),
                        format!("a photo of {word} {plural}"),
                    )
                }
                ["colors", c, color] => (
                    vec![colored(c, color)],
                    None,
                    format!("a photo of {}", noun(&format!("{color} {c}"))),
                ),
                ["position", a, rel, b] => {
                    let relation: Relation = rel.parse().expect("a relation in the built-in table");
                    let p = position_prompt(a, relation, b);
                    return p.task().clone();
                }
                ["color_attr", a, ca, b, cb] => (
                    vec![colored(a, ca), colored(b, cb)],
                    None,
                    format!(
                        "a photo of {} and {}",
                        noun(&format!("{ca} {a}")),
                        noun(&format!("{cb} {b}"))
                    ),
                ),
                other => unreachable!("built-in GenEval table line {other:?}"),
            };
            let mut meta = json!({"tag": f[0], "include": include, "prompt": prompt});
            if let Some(e) = exclude {
                meta["exclude"] = e;
            }
            TaskPrompt::from_metadata(meta)
                .expect("the built-in GenEval lines are valid")
                .expect("the built-in GenEval lines are scored")
        })
        .collect()
}

/// A small seeded generator (SplitMix64): the same seed gives the same prompts on every
/// platform and in every version of this crate.
#[derive(Debug, Clone)]
pub struct PromptRng(u64);

impl PromptRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "PromptRng::below(0)");
        let n = n as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return (v % n) as usize;
            }
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// `k` distinct indices of `0..n`, in random order.
    pub fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut pool: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + self.below(n - i);
            pool.swap(i, j);
        }
        pool.truncate(k.min(n));
        pool
    }
}

fn check_classes(classes: &[&str], need: usize) -> Result<(), PromptSetError> {
    let distinct: BTreeSet<&str> = classes.iter().copied().collect();
    if distinct.len() != classes.len() {
        return Err(PromptSetError::Invalid(
            "the class list has repeated names".into(),
        ));
    }
    if classes.iter().any(|c| c.trim().is_empty()) {
        return Err(PromptSetError::Invalid(
            "the class list has an empty name".into(),
        ));
    }
    if classes.len() < need {
        return Err(PromptSetError::Invalid(format!(
            "need at least {need} classes, got {}",
            classes.len()
        )));
    }
    Ok(())
}

/// `n` distinct GenEval-style position prompts over `classes` (two different classes and one
/// of the four relations each), reproducible from `seed`. Fails when fewer than `n` distinct
/// prompts exist (`classes · (classes − 1) · 4`).
pub fn position_prompts(
    n: usize,
    classes: &[&str],
    seed: u64,
) -> Result<Vec<SpatialPrompt>, PromptSetError> {
    check_classes(classes, 2)?;
    let k = classes.len();
    let possible = k * (k - 1) * 4;
    if n > possible {
        return Err(PromptSetError::Invalid(format!(
            "asked for {n} position prompts but {k} classes give only {possible} distinct ones"
        )));
    }
    let mut rng = PromptRng::new(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let pick = rng.distinct(k, 2);
        let rel = Relation::ALL[rng.below(4)];
        if seen.insert((pick[0], rel, pick[1])) {
            out.push(position_prompt(classes[pick[0]], rel, classes[pick[1]]));
        }
    }
    Ok(out)
}

/// Ranges for [`multi_relation_prompts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiRelationSpec {
    pub min_objects: usize,
    pub max_objects: usize,
    pub min_relations: usize,
    pub max_relations: usize,
}

impl Default for MultiRelationSpec {
    /// 2–5 objects, 1–3 relations.
    fn default() -> Self {
        Self {
            min_objects: 2,
            max_objects: 5,
            min_relations: 1,
            max_relations: 3,
        }
    }
}

/// `n` distinct prompts with several objects (distinct classes) and relations, reproducible
/// from `seed`. Relations form chains ("a cup left of a dog above a kite": the reference of
/// one relation is the subject of the next); separate chains and unrelated objects follow as a
/// list ("…, a bowl and a book"). Every object is the subject of at most one relation and no chain loops, so any
/// drawn combination is satisfiable and encodable in GenEval's format.
pub fn multi_relation_prompts(
    n: usize,
    classes: &[&str],
    seed: u64,
    spec: MultiRelationSpec,
) -> Result<Vec<SpatialPrompt>, PromptSetError> {
    let bad = |m: String| Err(PromptSetError::Invalid(m));
    if spec.min_objects < 2 || spec.min_objects > spec.max_objects {
        return bad(format!(
            "objects {}..={}: need 2 ≤ min ≤ max",
            spec.min_objects, spec.max_objects
        ));
    }
    if spec.min_relations < 1 || spec.min_relations > spec.max_relations {
        return bad(format!(
            "relations {}..={}: need 1 ≤ min ≤ max",
            spec.min_relations, spec.max_relations
        ));
    }
    if spec.min_relations > spec.max_objects - 1 {
        return bad(format!(
            "{} relations need at least {} objects, but at most {} are allowed",
            spec.min_relations,
            spec.min_relations + 1,
            spec.max_objects
        ));
    }
    check_classes(classes, spec.min_objects.max(spec.min_relations + 1))?;
    let max_objects = spec.max_objects.min(classes.len());
    let mut rng = PromptRng::new(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    let mut attempts = 0usize;
    while out.len() < n {
        attempts += 1;
        if attempts > 1000 * (n + 10) {
            return bad(format!(
                "could only find {} distinct multi-relation prompts of the {n} asked for",
                out.len()
            ));
        }
        let lo_obj = spec.min_objects.max(spec.min_relations + 1);
        let objects = rng.between(lo_obj, max_objects);
        let relations = rng.between(spec.min_relations, spec.max_relations.min(objects - 1));
        let p = draw_multi(&mut rng, classes, objects, relations);
        if seen.insert(p.prompt.clone()) {
            out.push(p);
        }
    }
    Ok(out)
}

fn draw_multi(
    rng: &mut PromptRng,
    classes: &[&str],
    objects: usize,
    relations: usize,
) -> SpatialPrompt {
    let picked: Vec<&str> = rng
        .distinct(classes.len(), objects)
        .into_iter()
        .map(|i| classes[i])
        .collect();
    // Split the relations into chains; a chain of r relations uses r + 1 objects.
    let max_chains = relations.min(objects - relations);
    let chains = rng.between(1, max_chains);
    let mut lengths = vec![1usize; chains];
    for _ in chains..relations {
        let c = rng.below(chains);
        lengths[c] += 1;
    }
    // Text and include list. Within a chain the last object is the reference; GenEval needs
    // targets listed before the objects placed relative to them, so each chain's include
    // entries are written from its end.
    let mut clauses = Vec::new();
    let mut include: Vec<Include> = Vec::new();
    let mut next = 0usize;
    for len in lengths {
        let members = &picked[next..next + len + 1];
        let rels: Vec<Relation> = (0..len).map(|_| Relation::ALL[rng.below(4)]).collect();
        next += len + 1;
        let mut text = noun(members[0]);
        for (k, r) in rels.iter().enumerate() {
            text.push_str(&format!(" {r} {}", noun(members[k + 1])));
        }
        clauses.push(text);
        let base = include.len();
        include.push(Include {
            class: members[len].to_string(),
            count: 1,
            position: None,
            color: None,
        });
        for k in (0..len).rev() {
            // members[k] rel[k] members[k + 1]; members[k + 1] sits at base + (len − 1 − k).
            include.push(Include {
                class: members[k].to_string(),
                count: 1,
                position: Some((rels[k], base + (len - 1 - k))),
                color: None,
            });
        }
    }
    for extra in &picked[next..] {
        clauses.push(noun(extra));
        include.push(Include {
            class: extra.to_string(),
            count: 1,
            position: None,
            color: None,
        });
    }
    // "A, B and C".
    let text = match clauses.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("a photo of {} and {last}", rest.join(", "))
        }
        _ => format!("a photo of {}", clauses.join("")),
    };
    SpatialPrompt::build(MULTI_TAG, text, include)
}

/// Writes prompts as GenEval metadata JSONL text (one line each, trailing newline).
pub fn to_jsonl<'a>(prompts: impl IntoIterator<Item = &'a TaskPrompt>) -> String {
    let mut s = String::new();
    for p in prompts {
        s.push_str(&p.metadata_line());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Triplet;
    use Relation::*;

    #[test]
    fn coco_list() {
        assert_eq!(COCO_CLASSES.len(), 80);
        let set: BTreeSet<_> = COCO_CLASSES.iter().collect();
        assert_eq!(set.len(), 80);
        for c in [
            "teddy bear",
            "computer mouse",
            "tv remote",
            "hair drier",
            "dining table",
        ] {
            assert!(COCO_CLASSES.contains(&c), "{c}");
        }
    }

    #[test]
    fn wording_and_metadata() {
        let p = position_prompt("dog", RightOf, "teddy bear");
        assert_eq!(p.prompt, "a photo of a dog right of a teddy bear");
        assert_eq!(
            p.metadata_line(),
            r#"{"include":[{"class":"teddy bear","count":1},{"class":"dog","count":1,"position":["right of",0]}],"prompt":"a photo of a dog right of a teddy bear","tag":"position"}"#
        );
        assert_eq!(
            p.triplets(),
            vec![Triplet::new("dog", RightOf, "teddy bear")]
        );
        assert_eq!(
            position_text("elephant", Below, "umbrella"),
            "a photo of an elephant below an umbrella"
        );
        // Round trip through the reader.
        let back = SpatialPrompt::from_line(&p.metadata_line())
            .unwrap()
            .unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn metadata_checks() {
        let bad_target = r#"{"tag":"position","prompt":"x","include":[{"class":"a","count":1,"position":["above",1]},{"class":"b","count":1}]}"#;
        assert!(SpatialPrompt::from_line(bad_target)
            .unwrap_err()
            .contains("earlier include"));
        let bad_rel = r#"{"tag":"position","prompt":"x","include":[{"class":"a"},{"class":"b","position":["near",0]}]}"#;
        assert!(SpatialPrompt::from_line(bad_rel)
            .unwrap_err()
            .contains("near"));
        let no_rel = r#"{"tag":"position","prompt":"x","include":[{"class":"a"},{"class":"b"}]}"#;
        assert!(SpatialPrompt::from_line(no_rel)
            .unwrap_err()
            .contains("position"));
        let zero = r#"{"tag":"position","prompt":"x","include":[{"class":"a","count":0},{"class":"b","position":["above",0]}]}"#;
        assert!(SpatialPrompt::from_line(zero)
            .unwrap_err()
            .contains("count"));
        assert!(SpatialPrompt::from_line("[1]").is_err());
        assert!(SpatialPrompt::from_line(r#"{"prompt":"x"}"#)
            .unwrap_err()
            .contains("tag"));
        let other =
            r#"{"tag":"counting","prompt":"three cats","include":[{"class":"cat","count":3}]}"#;
        assert_eq!(SpatialPrompt::from_line(other).unwrap(), None);
        // Count defaults to 1; unknown fields are kept in the metadata.
        let p = SpatialPrompt::from_line(r#"{"tag":"position","prompt":"x","extra":7,"include":[{"class":"a"},{"class":"b","position":["under",0]}]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(p.include[0].count, 1);
        assert_eq!(p.include[1].position, Some((Below, 0)));
        assert_eq!(p.metadata["extra"], 7);
    }

    #[test]
    fn reads_file_and_lists_unsupported_and_unspatial_lines() {
        let dir = std::env::temp_dir().join(format!("l2s-eval-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meta.jsonl");
        let lines = [
            r#"{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}"#,
            &position_prompt("cat", Above, "cup").metadata_line(),
            "",
            r#"{"tag": "counting", "include": [{"class": "cat", "count": 3}], "prompt": "a photo of three cats"}"#,
            r#"{"tag": "counting", "include": [{"class": "cup", "count": 2}], "prompt": "a photo of two cups"}"#,
            &position_prompt("dog", LeftOf, "kite").metadata_line(),
            r#"{"tag": "texture", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a furry cup"}"#,
            r#"{"tag": "texture", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a glass dog"}"#,
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let f = read_prompt_file(&path).unwrap();
        let numbers = |v: &[(usize, TaskPrompt)]| v.iter().map(|(l, _)| *l).collect::<Vec<_>>();
        assert_eq!(numbers(&f.prompts), [1, 2, 4, 5, 6]);
        assert_eq!(f.prompts[4].1.prompt, "a photo of a dog left of a kite");
        let report = f.unsupported_report();
        assert_eq!(report.len(), 1);
        assert!(
            report[0].contains("2 lines tagged \"texture\" left out")
                && report[0].contains("lines 7, 8"),
            "{report:?}"
        );
        // Where a relation is needed, the other tasks' lines are left out and listed.
        let (spatial, others) = f.spatial();
        assert_eq!(spatial.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [2, 6]);
        let by = group_unsupported(&others);
        assert_eq!(by["counting"], [4, 5]);
        assert_eq!(by["single_object"], [1]);
        let report = describe_unsupported("meta.jsonl", &others, NO_RELATION);
        assert!(
            report[0].contains("2 lines tagged \"counting\" left out (only \"position\"")
                && report[0].contains("lines 4, 5"),
            "{report:?}"
        );

        std::fs::write(&path, format!("{}\n{{oops\n", lines[1])).unwrap();
        let e = read_prompt_file(&path).unwrap_err().to_string();
        assert!(e.contains("meta.jsonl:2:"), "{e}");
        assert!(read_prompt_file(&dir.join("absent.jsonl"))
            .unwrap_err()
            .to_string()
            .contains("absent.jsonl"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn position_generator() {
        let a = position_prompts(100, &COCO_CLASSES, 0).unwrap();
        assert_eq!(a.len(), 100);
        assert_eq!(a, position_prompts(100, &COCO_CLASSES, 0).unwrap());
        assert_ne!(a, position_prompts(100, &COCO_CLASSES, 1).unwrap());
        let texts: HashSet<_> = a.iter().map(|p| p.prompt.clone()).collect();
        assert_eq!(texts.len(), 100);
        let mut rels = BTreeMap::new();
        for p in &a {
            assert!(p.prompt.starts_with("a photo of "));
            let t = &p.triplets()[0];
            assert_ne!(t.subject, t.object);
            assert_eq!(p.prompt, position_text(&t.subject, t.relation, &t.object));
            *rels.entry(t.relation).or_insert(0) += 1;
        }
        assert_eq!(rels.len(), 4, "all four relations drawn: {rels:?}");
        // A prefix of a longer set is the shorter set: growing N keeps earlier prompts.
        assert_eq!(position_prompts(10, &COCO_CLASSES, 0).unwrap(), a[..10]);
        // Every distinct prompt of a small class list, and no more.
        let all = position_prompts(224, &SHAPES_CLASSES, 5).unwrap();
        assert_eq!(
            all.iter().map(|p| &p.prompt).collect::<HashSet<_>>().len(),
            224
        );
        assert!(position_prompts(225, &SHAPES_CLASSES, 5).is_err());
        assert!(position_prompts(1, &["dog"], 0).is_err());
        assert!(position_prompts(1, &["dog", "dog"], 0).is_err());
    }

    #[test]
    fn multi_generator() {
        let ps =
            multi_relation_prompts(200, &COCO_CLASSES, 3, MultiRelationSpec::default()).unwrap();
        assert_eq!(ps.len(), 200);
        let mut objects_seen = BTreeSet::new();
        let mut relations_seen = BTreeSet::new();
        for p in &ps {
            assert_eq!(p.tag, MULTI_TAG);
            let n_obj = p.include.len();
            let trips = p.triplets();
            objects_seen.insert(n_obj);
            relations_seen.insert(trips.len());
            assert!(
                (2..=5).contains(&n_obj) && (1..=3).contains(&trips.len()),
                "{}",
                p.prompt
            );
            let classes: BTreeSet<_> = p.include.iter().map(|i| &i.class).collect();
            assert_eq!(classes.len(), n_obj, "distinct classes: {}", p.prompt);
            // Every include is mentioned in the text; every relation phrase reads "A rel B".
            for inc in &p.include {
                assert!(p.prompt.contains(&noun(&inc.class)), "{}", p.prompt);
            }
            for t in &trips {
                let phrase = format!("{} {} {}", t.subject, t.relation, noun(&t.object));
                assert!(p.prompt.contains(&phrase), "{phrase:?} in {:?}", p.prompt);
            }
            // Valid GenEval metadata that reads back identically.
            let back = SpatialPrompt::from_line(&p.metadata_line())
                .unwrap()
                .unwrap();
            assert_eq!(&back, p);
        }
        assert_eq!(objects_seen, (2..=5).collect());
        assert_eq!(relations_seen, (1..=3).collect());
        assert_eq!(
            ps,
            multi_relation_prompts(200, &COCO_CLASSES, 3, MultiRelationSpec::default()).unwrap()
        );
    }

    #[test]
    fn multi_chain_encoding() {
        // Find a three-relation single chain and check its include order by hand.
        let spec = MultiRelationSpec {
            min_objects: 4,
            max_objects: 4,
            min_relations: 3,
            max_relations: 3,
        };
        let p = &multi_relation_prompts(1, &["cup", "dog", "kite", "book"], 9, spec).unwrap()[0];
        // "a photo of a W r0 a X r1 a Y r2 a Z": include = [Z, Y→0, X→1, W→2].
        let inc = &p.include;
        assert_eq!(inc.len(), 4);
        assert_eq!(inc[0].position, None);
        assert_eq!(inc[1].position.unwrap().1, 0);
        assert_eq!(inc[2].position.unwrap().1, 1);
        assert_eq!(inc[3].position.unwrap().1, 2);
        let order: Vec<usize> = inc
            .iter()
            .rev()
            .map(|i| p.prompt.find(&noun(&i.class)).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{}", p.prompt);
        // Impossible ranges are refused.
        let bad = MultiRelationSpec {
            min_objects: 2,
            max_objects: 3,
            min_relations: 3,
            max_relations: 3,
        };
        assert!(multi_relation_prompts(1, &COCO_CLASSES, 0, bad).is_err());
        let bad = MultiRelationSpec {
            min_objects: 1,
            ..Default::default()
        };
        assert!(multi_relation_prompts(1, &COCO_CLASSES, 0, bad).is_err());
        assert!(multi_relation_prompts(
            1,
            &["a", "b"],
            0,
            MultiRelationSpec {
                min_objects: 3,
                ..Default::default()
            }
        )
        .is_err());
    }

    /// GenEval's evaluation prompts rebuilt from their facts and written in GenEval's own JSON
    /// formatting (Python's json.dumps): the bytes hash to the SHA-256 of the published
    /// evaluation_metadata.jsonl, so wording, order and metadata reproduce it exactly; then the
    /// file reads back as the same prompts.
    #[test]
    fn genevals_evaluation_prompts_are_reproduced_exactly() {
        use sha2::Digest;
        const OFFICIAL_SHA256: &str =
            "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13";
        let prompts = geneval_prompts();
        let python_line = |p: &TaskPrompt| {
            let object =
                |class: &str, count: usize| format!("{{\"class\": \"{class}\", \"count\": {count}");
            let include: Vec<String> = p
                .include
                .iter()
                .map(|i| {
                    let mut s = object(&i.class, i.count);
                    if let Some(c) = &i.color {
                        s.push_str(&format!(", \"color\": \"{c}\""));
                    }
                    if let Some((r, t)) = i.position {
                        s.push_str(&format!(", \"position\": [\"{}\", {t}]", r.name()));
                    }
                    s + "}"
                })
                .collect();
            let mut s = format!(
                "{{\"tag\": \"{}\", \"include\": [{}]",
                p.tag,
                include.join(", ")
            );
            if !p.exclude.is_empty() {
                let ex: Vec<String> = p
                    .exclude
                    .iter()
                    .map(|e| object(&e.class, e.count) + "}")
                    .collect();
                s.push_str(&format!(", \"exclude\": [{}]", ex.join(", ")));
            }
            s + &format!(", \"prompt\": \"{}\"}}\n", p.prompt)
        };
        let text: String = prompts.iter().map(python_line).collect();
        let digest = sha2::Sha256::digest(text.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, OFFICIAL_SHA256);
        let mut by_tag = BTreeMap::new();
        for p in &prompts {
            *by_tag.entry(p.tag.as_str()).or_insert(0) += 1;
        }
        assert_eq!(
            by_tag.into_iter().collect::<Vec<_>>(),
            [
                ("color_attr", 100),
                ("colors", 94),
                ("counting", 80),
                ("position", 100),
                ("single_object", 80),
                ("two_object", 99)
            ]
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evaluation_metadata.jsonl");
        std::fs::write(&path, &text).unwrap();
        let f = read_prompt_file(&path).unwrap();
        assert!(f.unsupported.is_empty());
        let read: Vec<TaskPrompt> = f.prompts.into_iter().map(|(_, p)| p).collect();
        assert_eq!(read.len(), 553);
        for (got, want) in read.iter().zip(&prompts) {
            assert_eq!(
                (&got.tag, &got.prompt, &got.include, &got.exclude),
                (&want.tag, &want.prompt, &want.include, &want.exclude)
            );
        }
    }
}
