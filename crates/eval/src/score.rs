//! Scoring GenEval's tasks the way GenEval does, with VISOR's metrics beside it for the
//! spatial ones.
//!
//! [`judge_prompt`] applies GenEval's check to one image: keep the detections of each class
//! scoring above the task's threshold, best first, at most [`ScoreOptions::max_objects`]; per
//! object of the prompt (in `include` order) take as many as it asks for; when it asks for a
//! colour, that many must have it; an object placed relative to an earlier one must stand in
//! the wanted relation (by [`relations_with_threshold`]) to every kept instance of it; and no
//! `exclude` class may be found as often as its count. For the usual two-object position
//! prompts this is exactly [`crate::judge`].
//!
//! [`ImageResult`] is one line of a results file: GenEval's fields (`filename`, `tag`,
//! `prompt`, `correct`, `reason`, `metadata`, `details`, so GenEval's own summary script reads
//! it) and ours (status, per-relation checks, the detections with the ones used marked).
//! [`summarize`] turns results into a [`Summary`]; [`compare`] lines up two result sets
//! prompt by prompt.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::prompts::Unsupported;
use crate::tasks::{color_reason, TaskPrompt, COUNTING_TAG};
use crate::{relations_with_threshold, BBox, Detection, Relation, RelationSet};

/// Format name written into every summary.
pub const SUMMARY_FORMAT: &str = "l2s-geneval-summary/1";

/// GenEval's score threshold for counting prompts.
pub const COUNTING_THRESHOLD: f32 = 0.9;

/// GenEval's limit on detections kept per class.
pub const MAX_OBJECTS: usize = 16;

/// GenEval's thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreOptions {
    /// Detections must score strictly above this (GenEval: 0.3).
    pub min_score: f32,
    /// The same for counting prompts (GenEval: 0.9).
    pub counting_min_score: f32,
    /// At most this many detections of a class are kept, best first (GenEval: 16).
    pub max_objects: usize,
    /// The relation rule's shrink factor (GenEval: 0.1).
    pub position_threshold: f32,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            min_score: crate::SCORE_THRESHOLD,
            counting_min_score: COUNTING_THRESHOLD,
            max_objects: MAX_OBJECTS,
            position_threshold: crate::POSITION_THRESHOLD,
        }
    }
}

impl ScoreOptions {
    /// The score a detection must beat for a prompt of `tag`.
    pub fn threshold_for(&self, tag: &str) -> f32 {
        if tag == COUNTING_TAG {
            self.counting_min_score
        } else {
            self.min_score
        }
    }
}

/// Colours of detections (by index into the image's detections), as a colour classifier named
/// them.
pub type Colors = BTreeMap<usize, String>;

/// One wanted relation, checked on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelationCheck {
    pub subject: String,
    pub relation: Relation,
    pub object: String,
    /// Both objects found (as many instances as asked for).
    pub found: bool,
    /// Relations of the best subject box to the best object box (empty unless found).
    pub holds: RelationSet,
    /// Found, and the wanted relation holds between every kept pair.
    pub correct: bool,
}

/// GenEval's decision on one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub correct: bool,
    /// GenEval's reasons for a wrong image, one per failed clause.
    pub reason: Vec<String>,
    /// Every object found as many times as asked for (VISOR's object accuracy).
    pub all_found: bool,
    /// Each wanted relation on its own, in `include` order.
    pub relations: Vec<RelationCheck>,
    /// Indices (into the detections) of the boxes the decision used.
    pub used: Vec<usize>,
}

/// Detections of each class scoring above `min_score`, best first (ties keep input order), at
/// most `max_objects` of each.
fn kept_by_class(
    detections: &[Detection],
    min_score: f32,
    max_objects: usize,
) -> HashMap<&str, Vec<usize>> {
    let mut by: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, d) in detections.iter().enumerate() {
        if d.score.is_finite() && d.score > min_score {
            by.entry(d.class.as_str()).or_default().push(i);
        }
    }
    for v in by.values_mut() {
        v.sort_by(|&a, &b| detections[b].score.total_cmp(&detections[a].score));
        v.truncate(max_objects);
    }
    by
}

/// The detections whose colours [`judge_prompt`] will look at: per include asking for a
/// colour and found often enough, its class and the kept detections, in include order.
pub fn color_requests(
    prompt: &TaskPrompt,
    detections: &[Detection],
    opts: &ScoreOptions,
) -> Vec<(String, Vec<usize>)> {
    let by = kept_by_class(
        detections,
        opts.threshold_for(&prompt.tag),
        opts.max_objects,
    );
    prompt
        .include
        .iter()
        .filter(|inc| inc.color.is_some())
        .filter_map(|inc| {
            let all = by.get(inc.class.as_str())?;
            (all.len() >= inc.count).then(|| (inc.class.clone(), all[..inc.count].to_vec()))
        })
        .collect()
}

/// Judges one image (see the module documentation). `colors` names the colours of the
/// detections [`color_requests`] lists; one without a colour counts as not the wanted one.
pub fn judge_prompt(
    prompt: &TaskPrompt,
    detections: &[Detection],
    colors: &Colors,
    opts: &ScoreOptions,
) -> Verdict {
    let by = kept_by_class(
        detections,
        opts.threshold_for(&prompt.tag),
        opts.max_objects,
    );
    let found: Vec<&[usize]> = prompt
        .include
        .iter()
        .map(|inc| {
            let all = by.get(inc.class.as_str()).map_or(&[][..], |v| v.as_slice());
            &all[..all.len().min(inc.count)]
        })
        .collect();
    let rel = |a: usize, b: usize| {
        relations_with_threshold(
            &detections[a].bbox,
            &detections[b].bbox,
            opts.position_threshold,
        )
    };
    let mut correct = true;
    let mut reason = Vec::new();
    let mut groups: Vec<Option<&[usize]>> = Vec::with_capacity(prompt.include.len());
    let mut used = Vec::new();
    for (i, inc) in prompt.include.iter().enumerate() {
        let objs = found[i];
        used.extend_from_slice(objs);
        let mut matched = true;
        if objs.len() < inc.count {
            correct = false;
            matched = false;
            reason.push(format!(
                "expected {}>={}, found {}",
                inc.class,
                inc.count,
                objs.len()
            ));
        } else {
            if let Some(wanted) = &inc.color {
                let seen: Vec<&str> = objs
                    .iter()
                    .map(|o| colors.get(o).map_or("", String::as_str))
                    .collect();
                if seen.iter().filter(|c| **c == wanted.as_str()).count() < inc.count {
                    correct = false;
                    matched = false;
                    reason.push(color_reason(&inc.class, inc.count, wanted, &seen));
                }
            }
            if let (Some((wanted, target)), true) = (inc.position, matched) {
                match groups.get(target).copied().flatten() {
                    None => {
                        correct = false;
                        matched = false;
                        reason.push(format!("no target for {} to be {wanted}", inc.class));
                    }
                    Some(targets) => {
                        'pairs: for &o in objs {
                            for &t in targets {
                                let holds = rel(o, t);
                                if !holds.contains(wanted) {
                                    correct = false;
                                    matched = false;
                                    let names = holds.names().join(" and ");
                                    reason.push(format!(
                                        "expected {} {wanted} target, found {names} target",
                                        inc.class
                                    ));
                                    break 'pairs;
                                }
                            }
                        }
                    }
                }
            }
        }
        groups.push(matched.then_some(objs));
    }
    for ex in &prompt.exclude {
        let n = by.get(ex.class.as_str()).map_or(0, Vec::len);
        if n >= ex.count {
            correct = false;
            reason.push(format!("expected {}<{}, found {n}", ex.class, ex.count));
        }
    }
    let complete = |i: usize| found[i].len() >= prompt.include[i].count;
    let relations = prompt
        .include
        .iter()
        .enumerate()
        .filter_map(|(i, inc)| {
            let (wanted, t) = inc.position?;
            let ok = complete(i) && complete(t);
            let holds = if ok {
                rel(found[i][0], found[t][0])
            } else {
                RelationSet::empty()
            };
            let all_pairs = ok
                && found[i]
                    .iter()
                    .all(|&o| found[t].iter().all(|&b| rel(o, b).contains(wanted)));
            Some(RelationCheck {
                subject: inc.class.clone(),
                relation: wanted,
                object: prompt.include[t].class.clone(),
                found: ok,
                holds,
                correct: all_pairs,
            })
        })
        .collect();
    Verdict {
        correct,
        reason,
        all_found: (0..prompt.include.len()).all(complete),
        relations,
        used,
    }
}

/// What became of an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    /// Detected and judged (also every line of a GenEval results file, which judges only what
    /// it found).
    #[default]
    Scored,
    /// Expected but not on disk (or not in the detections file): counted as wrong.
    Missing,
    /// On disk but not a readable image: counted as wrong.
    Undecodable,
    /// The detector failed on it: counted as wrong.
    DetectorFailed,
}

/// A detection as results files store it: pixel box `[x1, y1, x2, y2]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxRecord {
    pub class: String,
    pub bbox: [f32; 4],
    pub score: f32,
    /// The decision used this box.
    #[serde(default)]
    pub used: bool,
    /// Its colour, when the prompt asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
}

/// One line of a results file. A field that is neither GenEval's nor ours is refused by name:
/// a results file from some other tool is not read as if it were one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageResult {
    /// Image path relative to the run folder ("00012/samples/0003.png"), or as the detections
    /// file named it.
    pub filename: String,
    pub tag: String,
    pub prompt: String,
    pub correct: bool,
    /// GenEval's reasons, newline-separated ("" when correct).
    pub reason: String,
    /// The prompt's metadata line (a JSON string, as GenEval stores it).
    pub metadata: String,
    /// Detected boxes above the threshold per class, `{class: [[x1, y1, x2, y2, score], …]}`
    /// (a JSON string, as GenEval stores it).
    pub details: String,
    /// The prompt folder's number, when known.
    #[serde(default)]
    pub prompt_index: Option<usize>,
    /// The sample's number within its prompt, when known.
    #[serde(default)]
    pub sample: Option<usize>,
    /// GenEval's own results files carry only the fields above; the rest default.
    #[serde(default)]
    pub status: ImageStatus,
    /// Every object found (VISOR's object accuracy).
    #[serde(default)]
    pub all_found: bool,
    #[serde(default)]
    pub relations: Vec<RelationCheck>,
    /// Every detection above the threshold.
    #[serde(default)]
    pub detections: Vec<BoxRecord>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    /// From the image's metadata, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The steering loss at the last steered iteration, when the image was steered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steer_loss: Option<f64>,
}

/// Where an image comes from and what it carried.
#[derive(Debug, Clone, Default)]
pub struct ImageSource {
    pub filename: String,
    pub prompt_index: Option<usize>,
    pub sample: Option<usize>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub method: Option<String>,
    pub seed: Option<u64>,
    pub steer_loss: Option<f64>,
}

impl ImageResult {
    /// Judges `detections` (already checked) and their `colors` for `prompt`.
    pub fn scored(
        prompt: &TaskPrompt,
        source: ImageSource,
        detections: &[Detection],
        colors: &Colors,
        opts: &ScoreOptions,
    ) -> Self {
        let v = judge_prompt(prompt, detections, colors, opts);
        let kept = kept_by_class(
            detections,
            opts.threshold_for(&prompt.tag),
            opts.max_objects,
        );
        let mut boxes = Vec::new();
        let mut details: BTreeMap<&str, Vec<[f32; 5]>> = BTreeMap::new();
        for (i, d) in detections.iter().enumerate() {
            if !kept.get(d.class.as_str()).is_some_and(|k| k.contains(&i)) {
                continue;
            }
            boxes.push(BoxRecord {
                class: d.class.clone(),
                bbox: d.bbox.xyxy(),
                score: d.score,
                used: v.used.contains(&i),
                color: colors.get(&i).cloned(),
            });
        }
        for (class, idx) in &kept {
            details.insert(
                class,
                idx.iter()
                    .map(|&i| {
                        let b = detections[i].bbox.xyxy();
                        [b[0], b[1], b[2], b[3], detections[i].score]
                    })
                    .collect(),
            );
        }
        Self {
            filename: source.filename,
            tag: prompt.tag.clone(),
            prompt: prompt.prompt.clone(),
            correct: v.correct,
            reason: v.reason.join("\n"),
            metadata: metadata_key(&prompt.metadata),
            details: serde_json::to_string(&details).unwrap_or_default(),
            prompt_index: source.prompt_index,
            sample: source.sample,
            status: ImageStatus::Scored,
            all_found: v.all_found,
            relations: v.relations,
            detections: boxes,
            width: source.width,
            height: source.height,
            method: source.method,
            seed: source.seed,
            steer_loss: source.steer_loss,
        }
    }

    /// An image that could not be judged: wrong, nothing found, `why` as the reason.
    pub fn unjudged(
        prompt: &TaskPrompt,
        source: ImageSource,
        status: ImageStatus,
        why: &str,
    ) -> Self {
        let relations = prompt
            .triplets()
            .into_iter()
            .map(|t| RelationCheck {
                subject: t.subject,
                relation: t.relation,
                object: t.object,
                found: false,
                holds: RelationSet::empty(),
                correct: false,
            })
            .collect();
        Self {
            filename: source.filename,
            tag: prompt.tag.clone(),
            prompt: prompt.prompt.clone(),
            correct: false,
            reason: why.to_string(),
            metadata: metadata_key(&prompt.metadata),
            details: "{}".into(),
            prompt_index: source.prompt_index,
            sample: source.sample,
            status,
            all_found: false,
            relations,
            detections: Vec::new(),
            width: source.width,
            height: source.height,
            method: source.method,
            seed: source.seed,
            steer_loss: source.steer_loss,
        }
    }

    /// The prompt this image belongs to: its folder number when known, else its metadata.
    pub fn prompt_key(&self) -> String {
        match self.prompt_index {
            Some(i) => format!("#{i:05}"),
            None => self.metadata.clone(),
        }
    }
}

/// The metadata as one canonical JSON string (keys sorted): equal prompts give equal strings.
pub fn metadata_key(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Kinds of problems found while scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// A line that is not JSON or lacks the metadata fields.
    BadLine,
    /// A metadata line whose tag is not scored.
    UnsupportedTag,
    /// A prompt folder without (readable) metadata.
    MissingMetadata,
    /// A prompt folder whose metadata differs from the run's prompt list.
    MetadataMismatch,
    /// A detection entry that is not `{class, bbox: [x1, y1, x2, y2], score}`.
    BadDetection,
    /// A detection of a class the prompt does not mention (ignored by the judgement).
    ClassNotInPrompt,
    /// A prompt class the detector cannot report (such images can never be correct).
    ClassUnknownToDetector,
    /// A box reaching outside the image: clipped to it.
    BoxOutsideImage,
    /// A box with non-finite, inverted or fully-outside coordinates: dropped.
    BadBox,
    /// A score outside [0, 1] or not a number: dropped.
    BadScore,
    /// No image width/height given: boxes not checked against the image.
    MissingSize,
    /// An expected image that is not there (counted as wrong).
    MissingImage,
    /// An image file that does not decode (counted as wrong).
    UndecodableImage,
    /// The detector failed (counted as wrong).
    DetectorFailed,
    /// An image that is not 8-bit RGB (grey, with alpha, 16-bit, …): converted to RGB as GenEval
    /// converts it, and scored.
    ConvertedImage,
    /// The run's settings file does not parse.
    BadRunFile,
    /// The same image appears twice (the later one is ignored).
    DuplicateImage,
}

/// One problem, where it was found, and what was done about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Issue {
    pub kind: IssueKind,
    /// A path, or `file:line`.
    pub location: String,
    pub message: String,
}

impl Issue {
    pub fn new(kind: IssueKind, location: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            location: location.into(),
            message: message.into(),
        }
    }
}

/// Counts and accuracy of a group of images or relations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub total: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl Rate {
    fn add(&mut self, ok: bool) {
        self.total += 1;
        self.correct += ok as usize;
        self.accuracy = ratio(self.correct, self.total);
    }
}

/// VISOR's metrics (Gokhale et al., "Benchmarking Spatial Relationships in Text-to-Image
/// Generation").
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Visor {
    /// Object accuracy: images with every object found.
    pub oa: f64,
    /// Accuracy among images with every object found.
    pub cond: f64,
    /// `cond × oa` (= accuracy over all images).
    pub uncond: f64,
    /// Prompts with at least n correct images, n = 1…4.
    pub visor_1: f64,
    pub visor_2: f64,
    pub visor_3: f64,
    pub visor_4: f64,
}

/// Lines of one unsupported tag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UnsupportedTag {
    pub count: usize,
    pub locations: Vec<String>,
}

/// One task's images, as GenEval's summary lists them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskRate {
    pub tag: String,
    pub total: usize,
    pub correct: usize,
    pub accuracy: f64,
}

/// GenEval's own summary of a results file (what its `summary_scores.py` prints): prompts are
/// the distinct metadata lines, tasks listed in order of first appearance, and the overall
/// score is the mean of the task accuracies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenevalTable {
    pub images: usize,
    pub prompts: usize,
    /// Fraction of images judged correct.
    pub correct_images: f64,
    /// Fraction of prompts with at least one correct image.
    pub correct_prompts: f64,
    pub tasks: Vec<TaskRate>,
    /// Mean over tasks of their accuracy (GenEval's "Overall score").
    pub overall: f64,
}

impl GenevalTable {
    /// GenEval's summary of `results`.
    pub fn of(results: &[ImageResult]) -> Self {
        let mut tasks: Vec<TaskRate> = Vec::new();
        for r in results {
            let i = match tasks.iter().position(|t| t.tag == r.tag) {
                Some(i) => i,
                None => {
                    tasks.push(TaskRate {
                        tag: r.tag.clone(),
                        ..Default::default()
                    });
                    tasks.len() - 1
                }
            };
            tasks[i].total += 1;
            tasks[i].correct += r.correct as usize;
        }
        for t in &mut tasks {
            t.accuracy = ratio(t.correct, t.total);
        }
        let by_metadata = tallies_by(results, |r| r.metadata.clone());
        let overall = if tasks.is_empty() {
            0.0
        } else {
            tasks.iter().map(|t| t.accuracy).sum::<f64>() / tasks.len() as f64
        };
        Self {
            images: results.len(),
            prompts: by_metadata.len(),
            correct_images: ratio(results.iter().filter(|r| r.correct).count(), results.len()),
            correct_prompts: ratio(
                by_metadata.iter().filter(|t| t.correct > 0).count(),
                by_metadata.len(),
            ),
            tasks,
            overall,
        }
    }

    /// GenEval's table for a terminal.
    pub fn text(&self) -> String {
        let mut s = format!(
            "GenEval: {} images, {} prompts, {:.2}% correct images, {:.2}% correct prompts
",
            self.images,
            self.prompts,
            100.0 * self.correct_images,
            100.0 * self.correct_prompts
        );
        for t in &self.tasks {
            s.push_str(&format!(
                "  {:<16} = {:.2}% ({} / {})
",
                t.tag,
                100.0 * t.accuracy,
                t.correct,
                t.total
            ));
        }
        s.push_str(&format!(
            "  overall score (mean over tasks): {:.5}\n",
            self.overall
        ));
        s
    }
}

/// Everything a run's images add up to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub format: String,
    /// The folder or detections file scored.
    pub source: String,
    /// "shapes", or "external" for a detections file.
    pub detector: String,
    /// The generation method, when the run recorded it.
    pub method: Option<String>,
    /// Judged images, missing and unreadable ones included (they count as wrong).
    pub images: usize,
    pub correct_images: usize,
    pub prompts: usize,
    pub images_per_prompt: Option<usize>,
    /// GenEval's position score: correct images / images of the spatial tasks.
    pub position_accuracy: f64,
    /// Per wanted relation ("left of", …): each relation of each image checked on its own.
    pub per_relation: BTreeMap<String, Rate>,
    /// Per metadata tag ("position", "multi_position").
    pub per_tag: BTreeMap<String, Rate>,
    /// Spatial prompts with at least one correct image.
    pub correct_prompts: f64,
    /// VISOR's metrics over the spatial tasks' images.
    pub visor: Visor,
    /// GenEval's whole table, every task.
    #[serde(default)]
    pub geneval: GenevalTable,
    pub missing_images: usize,
    pub unreadable_images: usize,
    /// Mean final steering loss over steered images, when recorded.
    pub mean_steer_loss: Option<f64>,
    /// Lines of tags that are not scored, by tag.
    pub unsupported: BTreeMap<String, UnsupportedTag>,
    /// Number of issues of each kind.
    pub error_counts: BTreeMap<IssueKind, usize>,
    /// Every issue, in the order found.
    pub errors: Vec<Issue>,
}

/// Context for [`summarize`].
#[derive(Debug, Clone, Default)]
pub struct SummaryContext {
    pub source: String,
    pub detector: String,
    pub method: Option<String>,
    pub images_per_prompt: Option<usize>,
    /// Unsupported lines with their location strings.
    pub unsupported: Vec<(String, Unsupported)>,
    pub issues: Vec<Issue>,
}

fn ratio(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

/// Per prompt: its key, text, images and correct images, in order of first appearance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptTally {
    pub key: String,
    pub prompt: String,
    pub images: usize,
    pub correct: usize,
}

/// Groups results by [`ImageResult::prompt_key`].
pub fn prompt_tallies(results: &[ImageResult]) -> Vec<PromptTally> {
    tallies_by(results, ImageResult::prompt_key)
}

fn tallies_by<'a>(
    results: impl IntoIterator<Item = &'a ImageResult>,
    key: impl Fn(&ImageResult) -> String,
) -> Vec<PromptTally> {
    let mut order: Vec<PromptTally> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for r in results {
        let k = key(r);
        let i = *at.entry(k.clone()).or_insert_with(|| {
            order.push(PromptTally {
                key: k,
                prompt: r.prompt.clone(),
                images: 0,
                correct: 0,
            });
            order.len() - 1
        });
        order[i].images += 1;
        order[i].correct += r.correct as usize;
    }
    order
}

/// Adds up results (see [`Summary`]).
pub fn summarize(results: &[ImageResult], ctx: SummaryContext) -> Summary {
    let images = results.len();
    let correct = results.iter().filter(|r| r.correct).count();
    let mut per_relation: BTreeMap<String, Rate> = BTreeMap::new();
    let mut per_tag: BTreeMap<String, Rate> = BTreeMap::new();
    for r in results {
        per_tag.entry(r.tag.clone()).or_default().add(r.correct);
        for c in &r.relations {
            per_relation
                .entry(c.relation.name().to_string())
                .or_default()
                .add(c.correct);
        }
    }
    // The position score and VISOR's metrics read the spatial tasks only.
    let spatial: Vec<&ImageResult> = results
        .iter()
        .filter(|r| crate::tasks::is_spatial_tag(&r.tag))
        .collect();
    let spatial_correct = spatial.iter().filter(|r| r.correct).count();
    let found = spatial.iter().filter(|r| r.all_found).count();
    let found_correct = spatial.iter().filter(|r| r.all_found && r.correct).count();
    let tallies = tallies_by(spatial.iter().copied(), ImageResult::prompt_key);
    let at_least = |n: usize| {
        ratio(
            tallies.iter().filter(|t| t.correct >= n).count(),
            tallies.len(),
        )
    };
    let oa = ratio(found, spatial.len());
    let cond = ratio(found_correct, found);
    let losses: Vec<f64> = results
        .iter()
        .filter_map(|r| r.steer_loss)
        .filter(|l| l.is_finite())
        .collect();
    let mut unsupported: BTreeMap<String, UnsupportedTag> = BTreeMap::new();
    for (loc, u) in &ctx.unsupported {
        let e = unsupported.entry(u.tag.clone()).or_default();
        e.count += 1;
        e.locations.push(loc.clone());
    }
    let mut error_counts = BTreeMap::new();
    for i in &ctx.issues {
        *error_counts.entry(i.kind).or_insert(0) += 1;
    }
    Summary {
        format: SUMMARY_FORMAT.to_string(),
        source: ctx.source,
        detector: ctx.detector,
        method: ctx.method,
        images,
        correct_images: correct,
        prompts: prompt_tallies(results).len(),
        images_per_prompt: ctx.images_per_prompt,
        position_accuracy: ratio(spatial_correct, spatial.len()),
        per_relation,
        per_tag,
        correct_prompts: at_least(1),
        visor: Visor {
            oa,
            cond,
            uncond: cond * oa,
            visor_1: at_least(1),
            visor_2: at_least(2),
            visor_3: at_least(3),
            visor_4: at_least(4),
        },
        geneval: GenevalTable::of(results),
        missing_images: results
            .iter()
            .filter(|r| r.status == ImageStatus::Missing)
            .count(),
        unreadable_images: results
            .iter()
            .filter(|r| {
                matches!(
                    r.status,
                    ImageStatus::Undecodable | ImageStatus::DetectorFailed
                )
            })
            .count(),
        mean_steer_loss: (!losses.is_empty())
            .then(|| losses.iter().sum::<f64>() / losses.len() as f64),
        unsupported,
        error_counts,
        errors: ctx.issues,
    }
}

impl Summary {
    /// A few lines for a terminal.
    pub fn text(&self) -> String {
        let pct = |v: f64| format!("{:.1}%", 100.0 * v);
        let mut s = String::new();
        let method = self
            .method
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        s.push_str(&format!(
            "{}{method}: {} images, {} prompts\n",
            self.source, self.images, self.prompts
        ));
        let (spatial, spatial_correct) = self
            .per_tag
            .iter()
            .filter(|(tag, _)| crate::tasks::is_spatial_tag(tag))
            .fold((0, 0), |(n, c), (_, r)| (n + r.total, c + r.correct));
        if spatial > 0 {
            s.push_str(&format!(
                "position accuracy {} ({spatial_correct}/{spatial}); prompts with a correct image {}\n",
                pct(self.position_accuracy),
                pct(self.correct_prompts)
            ));
            let rels: Vec<String> = self
                .per_relation
                .iter()
                .map(|(k, r)| format!("{k} {} ({}/{})", pct(r.accuracy), r.correct, r.total))
                .collect();
            if !rels.is_empty() {
                s.push_str(&format!("per relation: {}\n", rels.join(", ")));
            }
            let v = &self.visor;
            s.push_str(&format!(
                "VISOR: OA {} cond {} uncond {} | VISOR_1 {} _2 {} _3 {} _4 {}\n",
                pct(v.oa),
                pct(v.cond),
                pct(v.uncond),
                pct(v.visor_1),
                pct(v.visor_2),
                pct(v.visor_3),
                pct(v.visor_4)
            ));
        }
        if self.images > 0 {
            s.push_str(&self.geneval.text());
        }
        if let Some(l) = self.mean_steer_loss {
            s.push_str(&format!("mean final steering loss {l:.4}\n"));
        }
        if !self.errors.is_empty() {
            let counts: Vec<String> = self
                .error_counts
                .iter()
                .map(|(k, n)| {
                    format!(
                        "{} {n}",
                        serde_json::to_value(k)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default()
                    )
                })
                .collect();
            s.push_str(&format!(
                "{} problems: {}\n",
                self.errors.len(),
                counts.join(", ")
            ));
            for e in self.errors.iter().take(10) {
                s.push_str(&format!("  {}: {}\n", e.location, e.message));
            }
            if self.errors.len() > 10 {
                s.push_str(&format!(
                    "  … {} more in the summary's \"errors\" list\n",
                    self.errors.len() - 10
                ));
            }
        }
        s
    }
}

/// Reads a results JSONL file written by [`ImageResult`] serialisation.
/// The largest results or detections file read (a million images take about 500 MB).
pub const MAX_RESULTS_BYTES: u64 = 1 << 30;

/// The most images per prompt a score or an evaluation accepts (sample files are numbered with
/// four digits, `SSSS.png`).
pub const MAX_IMAGES_PER_PROMPT: usize = 10_000;

pub fn read_results(path: &Path) -> Result<Vec<ImageResult>, String> {
    let text = l2s_files::read_text_capped(path, MAX_RESULTS_BYTES)
        .map_err(|e| format!("cannot read results file: {e}"))?;
    parse_results(&text, path)
}

/// [`read_results`] on the file's text; `path` names it in errors.
pub fn parse_results(text: &str, path: &Path) -> Result<Vec<ImageResult>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut r: ImageResult = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not a results line: {e}", path.display(), i + 1))?;
        // GenEval's evaluate_images.py names each image by the path it was given
        // (`IMAGEDIR/00012/samples/0003.png`, often absolute): keep the layout's own part.
        if let Some((tail, prompt, sample)) = layout_tail(&r.filename) {
            r.filename = tail;
            r.prompt_index = r.prompt_index.or(Some(prompt));
            r.sample = r.sample.or(Some(sample));
        }
        if let Some(why) = l2s_files::check_relative(&r.filename) {
            return Err(format!(
                "{}:{}: filename {:?} is {why}",
                path.display(),
                i + 1,
                r.filename
            ));
        }
        out.push(r);
    }
    Ok(out)
}

/// `…/NNNNN/samples/SSSS.png` → ("NNNNN/samples/SSSS.png", NNNNN, SSSS).
fn layout_tail(filename: &str) -> Option<(String, usize, usize)> {
    let parts: Vec<&str> = filename.rsplit(['/', '\\']).take(3).collect();
    let [file, samples, folder] = parts.as_slice() else {
        return None;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let stem = file.strip_suffix(".png")?;
    if *samples != "samples" || !digits(folder) || !digits(stem) {
        return None;
    }
    Some((
        format!("{folder}/samples/{file}"),
        folder.parse().ok()?,
        stem.parse().ok()?,
    ))
}

/// Results as JSONL text.
pub fn results_jsonl(results: &[ImageResult]) -> String {
    let mut s = String::new();
    for r in results {
        s.push_str(&serde_json::to_string(r).unwrap_or_default());
        s.push('\n');
    }
    s
}

/// Two result sets lined up prompt by prompt (prompts matched by their metadata).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Comparison {
    /// (before, after) for prompts with more correct images in the second set.
    pub improved: Vec<(PromptTally, PromptTally)>,
    /// (before, after) for prompts with fewer correct images.
    pub regressed: Vec<(PromptTally, PromptTally)>,
    /// Prompts with as many correct images in both.
    pub unchanged: usize,
    /// Prompts of only one side.
    pub only_before: Vec<PromptTally>,
    pub only_after: Vec<PromptTally>,
    pub before_correct: usize,
    pub after_correct: usize,
    /// Images each side judged.
    pub before_images: usize,
    pub after_images: usize,
}

/// Compares `before` with `after` prompt by prompt.
pub fn compare(before: &[ImageResult], after: &[ImageResult]) -> Comparison {
    let a = tallies_by(before, |r| r.metadata.clone());
    let b = tallies_by(after, |r| r.metadata.clone());
    let b_at: HashMap<&str, &PromptTally> = b.iter().map(|t| (t.key.as_str(), t)).collect();
    let a_keys: HashMap<&str, ()> = a.iter().map(|t| (t.key.as_str(), ())).collect();
    let mut c = Comparison {
        before_correct: before.iter().filter(|r| r.correct).count(),
        after_correct: after.iter().filter(|r| r.correct).count(),
        before_images: before.len(),
        after_images: after.len(),
        ..Default::default()
    };
    for t in &a {
        match b_at.get(t.key.as_str()) {
            None => c.only_before.push(t.clone()),
            Some(u) => {
                // Compare rates so sets with different image counts still line up.
                let (x, y) = (t.correct * u.images, u.correct * t.images);
                if y > x {
                    c.improved.push((t.clone(), (*u).clone()));
                } else if y < x {
                    c.regressed.push((t.clone(), (*u).clone()));
                } else {
                    c.unchanged += 1;
                }
            }
        }
    }
    c.only_after = b
        .iter()
        .filter(|t| !a_keys.contains_key(t.key.as_str()))
        .cloned()
        .collect();
    c
}

impl Comparison {
    /// A listing for a terminal.
    pub fn text(&self, before: &str, after: &str) -> String {
        let mut s = format!(
            "before: {before} ({}/{} correct)\nafter:  {after} ({}/{} correct)\n",
            self.before_correct, self.before_images, self.after_correct, self.after_images
        );
        let line = |(x, y): &(PromptTally, PromptTally)| {
            format!(
                "  {}/{} -> {}/{}  {}\n",
                x.correct, x.images, y.correct, y.images, x.prompt
            )
        };
        s.push_str(&format!("improved ({}):\n", self.improved.len()));
        for p in &self.improved {
            s.push_str(&line(p));
        }
        s.push_str(&format!("regressed ({}):\n", self.regressed.len()));
        for p in &self.regressed {
            s.push_str(&line(p));
        }
        s.push_str(&format!("unchanged: {}\n", self.unchanged));
        if !self.only_before.is_empty() || !self.only_after.is_empty() {
            s.push_str(&format!(
                "prompts only before: {}, only after: {}\n",
                self.only_before.len(),
                self.only_after.len()
            ));
        }
        s
    }
}

/// Checks external detections against an image of `size` (when known): drops entries with
/// bad scores or unusable boxes, clips boxes that reach outside, and reports each problem at
/// `location`. Boxes may overhang by up to one pixel without a report.
pub fn check_detections(
    detections: Vec<Detection>,
    size: Option<(u32, u32)>,
    location: &str,
    issues: &mut Vec<Issue>,
) -> Vec<Detection> {
    let mut out = Vec::with_capacity(detections.len());
    for mut d in detections {
        let b = d.bbox;
        if !(d.score.is_finite() && (0.0..=1.0).contains(&d.score)) {
            issues.push(Issue::new(
                IssueKind::BadScore,
                location,
                format!(
                    "{} detection with score {}: expected a number in [0, 1]; dropped",
                    d.class, d.score
                ),
            ));
            continue;
        }
        if !b.is_finite() || b.x1 < b.x0 || b.y1 < b.y0 {
            issues.push(Issue::new(
                IssueKind::BadBox,
                location,
                format!("{} box {:?}: expected finite [x1, y1, x2, y2] with x1 <= x2, y1 <= y2; dropped", d.class, b.xyxy()),
            ));
            continue;
        }
        if let Some((w, h)) = size {
            let (w, h) = (w as f32, h as f32);
            let tol = 1.0;
            if b.x0 < -tol || b.y0 < -tol || b.x1 > w + tol || b.y1 > h + tol {
                let clipped = BBox::new(
                    b.x0.clamp(0.0, w),
                    b.y0.clamp(0.0, h),
                    b.x1.clamp(0.0, w),
                    b.y1.clamp(0.0, h),
                );
                if clipped.x1 <= clipped.x0 || clipped.y1 <= clipped.y0 {
                    issues.push(Issue::new(
                        IssueKind::BadBox,
                        location,
                        format!(
                            "{} box {:?} lies outside the {w}x{h} image; dropped",
                            d.class,
                            b.xyxy()
                        ),
                    ));
                    continue;
                }
                issues.push(Issue::new(
                    IssueKind::BoxOutsideImage,
                    location,
                    format!(
                        "{} box {:?} reaches outside the {w}x{h} image; clipped to {:?}",
                        d.class,
                        b.xyxy(),
                        clipped.xyxy()
                    ),
                ));
                d.bbox = clipped;
            }
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod geneval_results_tests {
    use super::*;

    /// Lines as GenEval's evaluate_images.py writes them (pandas `to_json(orient="records",
    /// lines=True)`: the path as given, `/` escaped, metadata and details as JSON strings).
    #[test]
    fn genevals_own_results_file_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let meta = r#"{\"tag\": \"position\", \"include\": [{\"class\": \"dog\", \"count\": 1}, {\"class\": \"cat\", \"count\": 1, \"position\": [\"left of\", 0]}], \"prompt\": \"a photo of a dog right of a cat\"}"#;
        let lines = [
            format!(
                r#"{{"filename":"\/data\/runs\/sd2\/00012\/samples\/0003.png","tag":"position","prompt":"a photo of a dog right of a cat","correct":true,"reason":"","metadata":"{meta}","details":"{{\"dog\": [[10.0, 20.0, 50.0, 60.0, 0.9]]}}"}}"#
            ),
            format!(
                r#"{{"filename":"outputs\/00000\/samples\/0000.png","tag":"position","prompt":"a photo of a dog right of a cat","correct":false,"reason":"expected cat>=1, found 0","metadata":"{meta}","details":"{{}}"}}"#
            ),
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let r = read_results(&path).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].filename, "00012/samples/0003.png");
        assert_eq!((r[0].prompt_index, r[0].sample), (Some(12), Some(3)));
        assert!(r[0].correct && !r[1].correct);
        assert_eq!(r[1].filename, "00000/samples/0000.png");
        assert_eq!(r[1].reason, "expected cat>=1, found 0");
        assert_eq!(r[0].status, ImageStatus::Scored);
        // A path outside the layout is still refused.
        std::fs::write(&path, lines[0].replace("00012", "x")).unwrap();
        assert!(read_results(&path).unwrap_err().contains("filename"));
        // A field of neither schema, and a broken line: errors naming the line.
        let extra = lines[1].replacen('{', r#"{"bbox_score":0.5,"#, 1);
        std::fs::write(&path, format!("{}\n{extra}\n", lines[0])).unwrap();
        let e = read_results(&path).unwrap_err();
        assert!(
            e.contains(":2:") && e.contains("unknown field `bbox_score`"),
            "{e}"
        );
        std::fs::write(&path, format!("{}\n{}", lines[0], &lines[1][..40])).unwrap();
        let e = read_results(&path).unwrap_err();
        assert!(e.contains(":2: not a results line"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::{position_prompt, SpatialPrompt};
    use crate::tasks::TaskPrompt;

    /// The judgement of a spatial prompt (no colours involved).
    fn judge_prompt(p: &SpatialPrompt, ds: &[Detection], opts: &ScoreOptions) -> Verdict {
        super::judge_prompt(&TaskPrompt::from(p), ds, &Colors::new(), opts)
    }

    fn scored(
        p: &SpatialPrompt,
        src: ImageSource,
        ds: &[Detection],
        opts: &ScoreOptions,
    ) -> ImageResult {
        ImageResult::scored(&p.into(), src, ds, &Colors::new(), opts)
    }
    use crate::{judge, Triplet};
    use Relation::*;

    fn det(class: &str, score: f32, b: [f32; 4]) -> Detection {
        Detection {
            class: class.into(),
            bbox: BBox::new(b[0], b[1], b[2], b[3]),
            score,
        }
    }

    /// The general check agrees with the two-object judge on many random layouts.
    #[test]
    fn agrees_with_two_object_judge() {
        let mut rng = crate::prompts::PromptRng::new(11);
        let mut f = |n: usize| rng.below(n) as f32;
        let opts = ScoreOptions::default();
        for _ in 0..2000 {
            let rel = Relation::ALL[f(4) as usize];
            let p = position_prompt("dog", rel, "cat");
            let mut ds = Vec::new();
            for _ in 0..(f(5) as usize) {
                let class = ["dog", "cat", "cup"][f(3) as usize];
                let (x, y) = (f(60), f(60));
                ds.push(det(
                    class,
                    f(10) / 10.0,
                    [x, y, x + 1.0 + f(30), y + 1.0 + f(30)],
                ));
            }
            let want = Triplet::new("dog", rel, "cat");
            let j = judge(&want, &ds);
            let v = judge_prompt(&p, &ds, &opts);
            assert_eq!(v.correct, j.correct, "{ds:?}");
            assert_eq!(v.all_found, j.both_found());
            assert_eq!(v.relations[0].holds, j.relations);
            assert_eq!(v.relations[0].correct, j.correct);
        }
    }

    #[test]
    fn reasons_follow_geneval() {
        let opts = ScoreOptions::default();
        let p = position_prompt("dog", LeftOf, "cat");
        let v = judge_prompt(&p, &[det("dog", 0.9, [0., 0., 10., 10.])], &opts);
        assert_eq!(
            v.reason,
            [
                "expected cat>=1, found 0",
                "no target for dog to be left of"
            ]
        );
        let v = judge_prompt(
            &p,
            &[
                det("dog", 0.9, [50., 0., 60., 10.]),
                det("cat", 0.9, [0., 0., 10., 10.]),
            ],
            &opts,
        );
        assert_eq!(
            v.reason,
            ["expected dog left of target, found right of target"]
        );
        assert!(v.all_found && !v.correct);
        assert_eq!(v.used, [1, 0]);
    }

    /// A chain: the kite above the dog, the dog left of the cup; include = [cup, dog→0, kite→1].
    #[test]
    fn chains_and_counts() {
        let line = r#"{"tag":"multi_position","prompt":"a photo of a kite above a dog left of a cup","include":[{"class":"cup","count":1},{"class":"dog","count":1,"position":["left of",0]},{"class":"kite","count":1,"position":["above",1]}]}"#;
        let p = SpatialPrompt::from_line(line).unwrap().unwrap();
        let opts = ScoreOptions::default();
        let cup = det("cup", 0.8, [60., 40., 80., 60.]);
        let dog = det("dog", 0.8, [10., 40., 30., 60.]);
        let kite_up = det("kite", 0.8, [10., 0., 30., 15.]);
        let kite_down = det("kite", 0.8, [10., 80., 30., 95.]);
        let v = judge_prompt(&p, &[cup.clone(), dog.clone(), kite_up], &opts);
        assert!(v.correct && v.all_found);
        assert!(v.relations.iter().all(|r| r.correct));
        let v = judge_prompt(&p, &[cup.clone(), dog.clone(), kite_down], &opts);
        assert!(!v.correct && v.all_found);
        assert_eq!(
            (v.relations[0].correct, v.relations[1].correct),
            (true, false)
        );
        // The dog right of the cup: the dog's group fails, so GenEval finds no target for the
        // kite, while the kite-above-dog relation on its own still holds.
        let dog_right = det("dog", 0.8, [90., 40., 110., 60.]);
        let kite_up_right = det("kite", 0.8, [90., 0., 110., 15.]);
        let v = judge_prompt(&p, &[cup, dog_right, kite_up_right], &opts);
        assert!(!v.correct);
        assert_eq!(v.reason[1], "no target for kite to be above");
        assert_eq!(
            (v.relations[0].correct, v.relations[1].correct),
            (false, true)
        );

        // count 2: both instances must satisfy the relation.
        let line = r#"{"tag":"position","prompt":"two dogs left of a cat","include":[{"class":"cat","count":1},{"class":"dog","count":2,"position":["left of",0]}]}"#;
        let p = SpatialPrompt::from_line(line).unwrap().unwrap();
        let cat = det("cat", 0.9, [50., 0., 60., 10.]);
        let v = judge_prompt(
            &p,
            &[cat.clone(), det("dog", 0.9, [0., 0., 10., 10.])],
            &opts,
        );
        assert_eq!(v.reason, ["expected dog>=2, found 1"]);
        let v = judge_prompt(
            &p,
            &[
                cat.clone(),
                det("dog", 0.9, [0., 0., 10., 10.]),
                det("dog", 0.5, [70., 0., 80., 10.]),
            ],
            &opts,
        );
        assert!(!v.correct && !v.relations[0].correct && v.relations[0].found);
        let v = judge_prompt(
            &p,
            &[
                cat,
                det("dog", 0.9, [0., 0., 10., 10.]),
                det("dog", 0.5, [20., 0., 30., 10.]),
            ],
            &opts,
        );
        assert!(v.correct);
    }

    #[test]
    fn results_record_boxes_and_round_trip() {
        let p = position_prompt("dog", LeftOf, "cat");
        let ds = [
            det("dog", 0.9, [0., 0., 10., 10.]),
            det("cat", 0.8, [50., 0., 60., 10.]),
            det("cat", 0.5, [20., 20., 30., 30.]),
            det("cup", 0.2, [0., 0., 5., 5.]),
        ];
        let src = ImageSource {
            filename: "00003/samples/0001.png".into(),
            prompt_index: Some(3),
            sample: Some(1),
            ..Default::default()
        };
        let r = scored(&p, src, &ds, &ScoreOptions::default());
        assert!(r.correct && r.reason.is_empty());
        assert_eq!(r.detections.len(), 3, "the cup is below the threshold");
        assert_eq!(
            r.detections.iter().map(|b| b.used).collect::<Vec<_>>(),
            [true, true, false]
        );
        let details: Value = serde_json::from_str(&r.details).unwrap();
        assert_eq!(details["cat"].as_array().unwrap().len(), 2);
        assert_eq!(details["cat"][0][4].as_f64().unwrap() as f32, 0.8);
        assert_eq!(r.prompt_key(), "#00003");
        let line = serde_json::to_string(&r).unwrap();
        let back: ImageResult = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        let v: Value = serde_json::from_str(&line).unwrap();
        for k in [
            "filename", "tag", "prompt", "correct", "reason", "metadata", "details",
        ] {
            assert!(v.get(k).is_some(), "GenEval field {k}");
        }
        assert!(v["metadata"].is_string() && v["details"].is_string());
    }

    /// Hand-computed summary: two prompts × 4 images.
    #[test]
    fn summary_numbers() {
        let p1 = position_prompt("dog", LeftOf, "cat");
        let p2 = position_prompt("cup", Above, "kite");
        let opts = ScoreOptions::default();
        let left = det("dog", 0.9, [0., 0., 10., 10.]);
        let cat = det("cat", 0.9, [50., 0., 60., 10.]);
        let dog_right = det("dog", 0.9, [80., 0., 90., 10.]);
        let src = |i, s| ImageSource {
            prompt_index: Some(i),
            sample: Some(s),
            ..Default::default()
        };
        let mut rs = vec![
            // prompt 0: 3 correct, 1 both-found-but-wrong
            scored(&p1, src(0, 0), &[left.clone(), cat.clone()], &opts),
            scored(&p1, src(0, 1), &[left.clone(), cat.clone()], &opts),
            scored(&p1, src(0, 2), &[left.clone(), cat.clone()], &opts),
            scored(&p1, src(0, 3), &[dog_right, cat.clone()], &opts),
        ];
        let cup = det("cup", 0.9, [0., 0., 10., 10.]);
        let kite = det("kite", 0.9, [0., 50., 10., 60.]);
        rs.extend([
            // prompt 1: 1 correct, 1 kite missing, 1 missing image, 1 undecodable
            scored(&p2, src(1, 0), &[cup.clone(), kite], &opts),
            scored(&p2, src(1, 1), &[cup], &opts),
            ImageResult::unjudged(
                &(&p2).into(),
                src(1, 2),
                ImageStatus::Missing,
                "missing image",
            ),
            ImageResult::unjudged(
                &(&p2).into(),
                src(1, 3),
                ImageStatus::Undecodable,
                "undecodable",
            ),
        ]);
        let s = summarize(
            &rs,
            SummaryContext {
                images_per_prompt: Some(4),
                ..Default::default()
            },
        );
        assert_eq!((s.images, s.correct_images, s.prompts), (8, 4, 2));
        assert_eq!(s.position_accuracy, 0.5);
        assert_eq!(
            s.per_relation["left of"],
            Rate {
                total: 4,
                correct: 3,
                accuracy: 0.75
            }
        );
        assert_eq!(
            s.per_relation["above"],
            Rate {
                total: 4,
                correct: 1,
                accuracy: 0.25
            }
        );
        assert_eq!(s.correct_prompts, 1.0);
        // Both found in 5 of 8; correct among those 4 of 5.
        assert_eq!(s.visor.oa, 5.0 / 8.0);
        assert_eq!(s.visor.cond, 4.0 / 5.0);
        assert!((s.visor.uncond - 0.5).abs() < 1e-12);
        assert_eq!(
            (
                s.visor.visor_1,
                s.visor.visor_2,
                s.visor.visor_3,
                s.visor.visor_4
            ),
            (1.0, 0.5, 0.5, 0.0)
        );
        assert_eq!((s.missing_images, s.unreadable_images), (1, 1));
        assert_eq!(
            s.per_tag["position"],
            Rate {
                total: 8,
                correct: 4,
                accuracy: 0.5
            }
        );
        // Empty input never divides by zero.
        let e = summarize(&[], SummaryContext::default());
        assert_eq!((e.images, e.position_accuracy, e.visor.cond), (0, 0.0, 0.0));
    }

    #[test]
    fn comparison() {
        let p1 = position_prompt("dog", LeftOf, "cat");
        let p2 = position_prompt("cup", Above, "kite");
        let p3 = position_prompt("bus", Below, "car");
        let mk = |p: &SpatialPrompt, ok: &[bool]| -> Vec<ImageResult> {
            ok.iter()
                .map(|&c| {
                    let mut r = ImageResult::unjudged(
                        &p.into(),
                        ImageSource::default(),
                        ImageStatus::Scored,
                        "",
                    );
                    r.correct = c;
                    r
                })
                .collect()
        };
        let before: Vec<_> = [
            mk(&p1, &[false, false]),
            mk(&p2, &[true, true]),
            mk(&p3, &[true, false]),
        ]
        .concat();
        let after: Vec<_> = [mk(&p1, &[true, false]), mk(&p2, &[true, false])].concat();
        let c = compare(&before, &after);
        assert_eq!(c.improved.len(), 1);
        assert_eq!(c.improved[0].0.prompt, p1.prompt);
        assert_eq!(c.regressed.len(), 1);
        assert_eq!(c.regressed[0].1.correct, 1);
        assert_eq!(c.only_before.len(), 1);
        assert_eq!(c.unchanged, 0);
        let t = c.text("a.jsonl", "b.jsonl");
        assert!(
            t.contains("improved (1):\n  0/2 -> 1/2  a photo of a dog left of a cat"),
            "{t}"
        );
    }

    #[test]
    fn detection_checks() {
        let mut issues = Vec::new();
        let ds = vec![
            det("dog", 0.9, [0., 0., 10., 10.]),
            det("dog", 0.9, [-0.5, 0., 64.5, 10.]), // within the 1-px tolerance
            det("dog", 0.9, [-20., 0., 10., 10.]),  // clipped
            det("dog", 0.9, [70., 0., 90., 10.]),   // fully outside
            det("dog", 0.9, [10., 0., 5., 10.]),    // inverted
            det("dog", f32::NAN, [0., 0., 1., 1.]),
            det("dog", 1.5, [0., 0., 1., 1.]),
            det("dog", 0.9, [f32::INFINITY, 0., 1., 1.]),
        ];
        let kept = check_detections(ds, Some((64, 64)), "x.jsonl:3", &mut issues);
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[2].bbox.xyxy(), [0., 0., 10., 10.]);
        let kinds: Vec<IssueKind> = issues.iter().map(|i| i.kind).collect();
        use IssueKind::*;
        assert_eq!(
            kinds,
            [BoxOutsideImage, BadBox, BadBox, BadScore, BadScore, BadBox]
        );
        assert!(issues.iter().all(|i| i.location == "x.jsonl:3"));
        // Without a size only the box itself is checked.
        let mut issues = Vec::new();
        let kept = check_detections(
            vec![det("dog", 0.9, [-20., 0., 10., 10.])],
            None,
            "y",
            &mut issues,
        );
        assert_eq!((kept.len(), issues.len()), (1, 0));
    }
}

/// Each GenEval task's judgement on hand-made detections.
#[cfg(test)]
mod task_tests {
    use super::*;
    use crate::tasks::TaskPrompt;

    fn det(class: &str, score: f32, x: f32) -> Detection {
        Detection {
            class: class.into(),
            bbox: BBox::new(x, 0.0, x + 10.0, 10.0),
            score,
        }
    }

    fn prompt(line: &str) -> TaskPrompt {
        TaskPrompt::from_line(line).unwrap().unwrap()
    }

    fn judge(p: &TaskPrompt, ds: &[Detection], colors: &[(usize, &str)]) -> (bool, Vec<String>) {
        let colors: Colors = colors.iter().map(|(i, c)| (*i, c.to_string())).collect();
        let v = judge_prompt(p, ds, &colors, &ScoreOptions::default());
        (v.correct, v.reason)
    }

    #[test]
    fn single_and_two_objects() {
        let one = prompt(
            r#"{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}"#,
        );
        assert_eq!(judge(&one, &[det("dog", 0.31, 0.0)], &[]), (true, vec![]));
        // 0.3 is not above the threshold; a cat is not a dog.
        assert_eq!(
            judge(&one, &[det("dog", 0.3, 0.0), det("cat", 0.9, 0.0)], &[]),
            (false, vec!["expected dog>=1, found 0".to_string()])
        );
        let two = prompt(
            r#"{"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}], "prompt": "a photo of a dog and a cat"}"#,
        );
        assert!(judge(&two, &[det("cat", 0.5, 0.0), det("dog", 0.5, 50.0)], &[]).0);
        assert_eq!(
            judge(&two, &[det("dog", 0.9, 0.0), det("dog", 0.8, 50.0)], &[]),
            (false, vec!["expected cat>=1, found 0".to_string()])
        );
    }

    #[test]
    fn counting_uses_its_own_threshold_and_the_object_limit() {
        let three = prompt(
            r#"{"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}], "prompt": "a photo of three dogs"}"#,
        );
        let dogs = |scores: &[f32]| -> Vec<Detection> {
            scores
                .iter()
                .enumerate()
                .map(|(i, &s)| det("dog", s, 20.0 * i as f32))
                .collect()
        };
        assert!(judge(&three, &dogs(&[0.95, 0.92, 0.91, 0.5]), &[]).0);
        // 0.85 clears GenEval's usual 0.3 but not the counting threshold 0.9.
        assert_eq!(
            judge(&three, &dogs(&[0.95, 0.92, 0.85]), &[]),
            (false, vec!["expected dog>=3, found 2".to_string()])
        );
        assert_eq!(
            judge(&three, &dogs(&[0.95, 0.94, 0.93, 0.92]), &[]),
            (false, vec!["expected dog<4, found 4".to_string()])
        );
        // At most 16 detections of a class are kept, so 20 dogs read as 16.
        assert_eq!(
            judge(&three, &dogs(&[0.95; 20]), &[]).1,
            ["expected dog<4, found 16"]
        );
    }

    #[test]
    fn colors_and_color_attribution() {
        let red_car = prompt(
            r#"{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}"#,
        );
        let cars = [det("car", 0.6, 0.0), det("car", 0.9, 50.0)];
        // Only the best car is looked at: detection 1.
        assert_eq!(
            color_requests(&red_car, &cars, &ScoreOptions::default()),
            [("car".to_string(), vec![1])]
        );
        assert!(judge(&red_car, &cars, &[(1, "red")]).0);
        assert_eq!(
            judge(&red_car, &cars, &[(0, "red"), (1, "blue")]),
            (
                false,
                vec!["expected red car>=1, found 0 red; and 1 blue".to_string()]
            )
        );
        // No car: no colour is asked.
        let none = [det("car", 0.2, 0.0)];
        assert!(color_requests(&red_car, &none, &ScoreOptions::default()).is_empty());
        assert_eq!(judge(&red_car, &none, &[]).1, ["expected car>=1, found 0"]);

        let attr = prompt(
            r#"{"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "cup", "count": 1, "color": "blue"}], "prompt": "a photo of a red car and a blue cup"}"#,
        );
        let ds = [det("cup", 0.8, 0.0), det("car", 0.7, 50.0)];
        assert_eq!(
            color_requests(&attr, &ds, &ScoreOptions::default()),
            [("car".to_string(), vec![1]), ("cup".to_string(), vec![0])]
        );
        assert!(judge(&attr, &ds, &[(1, "red"), (0, "blue")]).0);
        // Swapped colours: both clauses fail.
        assert_eq!(
            judge(&attr, &ds, &[(1, "blue"), (0, "red")]).1,
            [
                "expected red car>=1, found 0 red; and 1 blue",
                "expected blue cup>=1, found 0 blue; and 1 red"
            ]
        );
        // A colour the classifier did not give counts as not the wanted one.
        assert!(!judge(&attr, &ds, &[(1, "red")]).0);
    }
}
