//! Scoring what a run produced: a GenEval-layout folder of images (through a [`Detector`]) or
//! a detections JSONL file written by any external detector.
//!
//! Problems never stop scoring and never shrink the denominator unnoticed: an expected image
//! that is missing, unreadable or that the detector fails on is counted as wrong and listed;
//! every other problem (unsupported tags, malformed lines, boxes outside the image, classes
//! the prompt does not mention, …) is listed with its file and line or path.
//!
//! A detections file has one JSON object per image: the prompt's metadata fields (`tag`,
//! `include`, `prompt`), `width`, `height`, and `detections: [{class, bbox: [x1, y1, x2, y2],
//! score}]` in pixels; optionally `filename` ("00012/samples/0003.png" gives the prompt and
//! sample numbers), or `prompt_index` and `sample` directly.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use l2s_files::png_text_chunks;
use serde_json::Value;

use crate::layout::{
    parse_relpath, read_run_info, sample_path, sample_relpath, scan_folder, KEY_METHOD, KEY_SEED,
    KEY_STEER_LOSS, METADATA_FILE, PROMPTS_FILE,
};
use crate::prompts::Unsupported;
use crate::score::{
    check_detections, color_requests, metadata_key, summarize, Colors, ImageResult, ImageSource,
    ImageStatus, Issue, IssueKind, ScoreOptions, Summary, SummaryContext,
};
use crate::tasks::TaskPrompt;
use crate::{BBox, ColorClassifier, ColorQuery, Detection, Detector, ObjectMask};

/// Results and their summary.
#[derive(Debug, Clone)]
pub struct Scored {
    pub results: Vec<ImageResult>,
    pub summary: Summary,
}

/// How a prompt's metadata was resolved.
enum PromptState {
    Scored(TaskPrompt),
    Unsupported(String),
    Unusable,
}

fn classify(value: Value, location: &str, issues: &mut Vec<Issue>) -> PromptState {
    let tag = value.get("tag").and_then(Value::as_str).map(String::from);
    match TaskPrompt::from_metadata(value) {
        Ok(Some(p)) => PromptState::Scored(p),
        Ok(None) => PromptState::Unsupported(tag.unwrap_or_default()),
        Err(msg) => {
            issues.push(Issue::new(IssueKind::BadLine, location, msg));
            PromptState::Unusable
        }
    }
}

/// Refuses more images per prompt than [`crate::score::MAX_IMAGES_PER_PROMPT`]: every missing
/// one becomes a result line, so a mistyped number would fill the memory.
fn check_images_per_prompt(n: Option<usize>, what: &str) -> Result<(), String> {
    match n {
        Some(n) if n > crate::score::MAX_IMAGES_PER_PROMPT => Err(format!(
            "{what} {n}: expected at most {} images per prompt",
            crate::score::MAX_IMAGES_PER_PROMPT
        )),
        _ => Ok(()),
    }
}

/// How to score a folder: the detector, an optional colour classifier, and batching.
pub struct FolderScoring<'a> {
    pub detector: &'a dyn Detector,
    /// The detector's name, for messages and the summary.
    pub detector_name: &'a str,
    /// Names object colours for GenEval's colour tasks; without one, colour prompts are listed
    /// as not scored.
    pub colors: Option<&'a dyn ColorClassifier>,
    /// Images per call of [`Detector::detect_batch`] (at least 1).
    pub batch_size: usize,
    pub images_per_prompt: Option<usize>,
    pub opts: ScoreOptions,
}

/// Scores a GenEval-layout folder with `detector`, one image at a time and without colours
/// (see [`score_folder_with`]).
pub fn score_folder(
    root: &Path,
    detector: &dyn Detector,
    detector_name: &str,
    images_per_prompt: Option<usize>,
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Scored, String> {
    let how = FolderScoring {
        detector,
        detector_name,
        colors: None,
        batch_size: 1,
        images_per_prompt,
        opts: *opts,
    };
    score_folder_with(root, &how, progress)
}

/// Scores a GenEval-layout folder.
///
/// The expected images per prompt come from `images_per_prompt`, else from `run.json`, else
/// the largest number found in any prompt folder. Prompts listed in `prompts.jsonl` but without
/// a folder count as all-missing. Images go to the detector `batch_size` at a time; results do
/// not depend on the batch size. `progress(done, total)` is called after every batch.
pub fn score_folder_with(
    root: &Path,
    how: &FolderScoring<'_>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Scored, String> {
    let (detector, detector_name, opts) = (how.detector, how.detector_name, &how.opts);
    let images_per_prompt = how.images_per_prompt;
    if how.batch_size == 0 {
        return Err("batch size 0: expected at least 1".into());
    }
    if !root.is_dir() {
        return Err(format!("{}: not a folder", root.display()));
    }
    let mut issues = Vec::new();
    let run = match read_run_info(root) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            issues.push(Issue::new(
                IssueKind::BadRunFile,
                root.join(crate::layout::RUN_FILE).display().to_string(),
                e,
            ));
            None
        }
    };
    let folders = scan_folder(root).map_err(|e| format!("{}: cannot list: {e}", root.display()))?;
    // The run's prompt list, when present.
    let listed_path = root.join(PROMPTS_FILE);
    let mut listed: BTreeMap<usize, Value> = BTreeMap::new();
    if listed_path.exists() {
        let text = std::fs::read_to_string(&listed_path)
            .map_err(|e| format!("{}: {e}", listed_path.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str::<Value>(line) {
                Ok(v) if v.is_object() => {
                    listed.insert(listed.len(), v);
                }
                _ => {
                    issues.push(Issue::new(
                        IssueKind::BadLine,
                        format!("{}:{}", listed_path.display(), i + 1),
                        "not a JSON metadata line",
                    ));
                    listed.insert(listed.len(), Value::Null);
                }
            }
        }
    }
    if folders.is_empty() && listed.is_empty() {
        return Err(format!(
            "{}: no prompt folders (NNNNN/{METADATA_FILE} with NNNNN/samples/*.png) and no {PROMPTS_FILE}: not a GenEval image folder",
            root.display()
        ));
    }
    check_images_per_prompt(images_per_prompt, "--images-per-prompt")?;
    check_images_per_prompt(
        run.as_ref().map(|r| r.images_per_prompt),
        &format!(
            "{}: images_per_prompt",
            root.join(crate::layout::RUN_FILE).display()
        ),
    )?;
    let ipp = images_per_prompt
        .or(run.as_ref().map(|r| r.images_per_prompt))
        .unwrap_or_else(|| {
            folders
                .iter()
                .map(|f| f.samples.len())
                .max()
                .unwrap_or(0)
                .max(1)
        });
    let by_index: HashMap<usize, &crate::layout::FolderPrompt> =
        folders.iter().map(|f| (f.index, f)).collect();
    let indices: BTreeSet<usize> = folders
        .iter()
        .map(|f| f.index)
        .chain(listed.keys().copied())
        .collect();

    // Resolve each prompt and count the images to judge.
    let mut plan = Vec::new();
    let mut unsupported = Vec::new();
    let known: HashSet<&str> = detector.classes().iter().map(String::as_str).collect();
    for &index in &indices {
        let folder = by_index.get(&index).copied();
        let meta_path = root.join(format!("{index:05}")).join(METADATA_FILE);
        let meta_loc = meta_path.display().to_string();
        let from_list = listed.get(&index).filter(|v| !v.is_null()).cloned();
        let value = match folder.and_then(|f| f.metadata.clone()) {
            Some(Ok(v)) => {
                if let Some(l) = &from_list {
                    if metadata_key(l) != metadata_key(&v) {
                        issues.push(Issue::new(
                            IssueKind::MetadataMismatch,
                            &meta_loc,
                            format!("differs from line {} of {PROMPTS_FILE}; the folder's metadata is used", index + 1),
                        ));
                    }
                }
                Some(v)
            }
            Some(Err(e)) => {
                issues.push(Issue::new(IssueKind::MissingMetadata, &meta_loc, e));
                from_list
            }
            None => from_list,
        };
        let present = folder.map(|f| f.samples.len()).unwrap_or(0);
        let Some(value) = value else {
            issues.push(Issue::new(
                IssueKind::MissingMetadata,
                &meta_loc,
                format!("no metadata for this prompt: its {present} image(s) cannot be scored"),
            ));
            continue;
        };
        match classify(value, &meta_loc, &mut issues) {
            PromptState::Scored(p) if p.needs_colors() && how.colors.is_none() => {
                issues.push(Issue::new(
                    IssueKind::UnsupportedTag,
                    &meta_loc,
                    format!(
                        "tag {:?} needs a colour classifier (CLIP weights); its {present} image(s) are left out",
                        p.tag
                    ),
                ));
                unsupported.push((
                    meta_loc,
                    Unsupported {
                        line: 1,
                        tag: p.tag.clone(),
                    },
                ));
            }
            PromptState::Scored(p) => {
                let unknown: Vec<&str> = p
                    .include
                    .iter()
                    .map(|i| i.class.as_str())
                    .filter(|c| !known.contains(c))
                    .collect();
                if !unknown.is_empty() {
                    issues.push(Issue::new(
                        IssueKind::ClassUnknownToDetector,
                        &meta_loc,
                        format!(
                            "the {detector_name} detector cannot find {}: this prompt's images can never be correct",
                            unknown.join(", ")
                        ),
                    ));
                }
                let mut samples: BTreeSet<usize> = (0..ipp).collect();
                if let Some(f) = folder {
                    samples.extend(f.samples.keys().copied());
                }
                plan.push((index, p, samples));
            }
            PromptState::Unsupported(tag) => {
                issues.push(Issue::new(
                    IssueKind::UnsupportedTag,
                    &meta_loc,
                    format!("tag {tag:?} is not scored; its {present} image(s) are left out"),
                ));
                unsupported.push((meta_loc, Unsupported { line: 1, tag }));
            }
            PromptState::Unusable => {}
        }
    }

    let total: usize = plan.iter().map(|(_, _, s)| s.len()).sum();
    let jobs: Vec<(usize, usize)> = plan
        .iter()
        .enumerate()
        .flat_map(|(k, (_, _, samples))| samples.iter().map(move |&j| (k, j)))
        .collect();
    let mut results = Vec::with_capacity(total);
    for batch in jobs.chunks(how.batch_size) {
        // Read and decode the batch; images that fail here are judged at once.
        let mut slots: Vec<Result<ImageResult, (ImageSource, String)>> = Vec::new();
        let mut decoded: Vec<image::RgbImage> = Vec::new();
        for &(k, j) in batch {
            let (index, prompt, _) = &plan[k];
            let folder = by_index.get(index).copied();
            let path = folder
                .and_then(|f| f.samples.get(&j).cloned())
                .unwrap_or_else(|| sample_path(root, *index, j));
            let mut src = ImageSource {
                filename: sample_relpath(*index, j),
                prompt_index: Some(*index),
                sample: Some(j),
                ..Default::default()
            };
            let loc = path.display().to_string();
            match load_image(&path, &mut src, &mut issues, || {
                format!(
                    "image {} of {ipp} for {:?} is missing; counted as wrong",
                    j + 1,
                    prompt.prompt
                )
            }) {
                Err((status, why)) => {
                    slots.push(Ok(ImageResult::unjudged(prompt, src, status, why)))
                }
                Ok(rgb) => {
                    decoded.push(rgb);
                    slots.push(Err((src, loc)));
                }
            }
        }
        let wants_masks =
            how.colors.is_some() && batch.iter().any(|&(k, _)| plan[k].1.needs_colors());
        let masks_above = wants_masks.then_some(opts.min_score);
        let mut found = if decoded.is_empty() {
            Vec::new()
        } else {
            detector.detect_batch(&decoded, masks_above)
        }
        .into_iter();
        let mut images = decoded.iter();
        for (&(k, _), slot) in batch.iter().zip(slots) {
            let prompt = &plan[k].1;
            let (src, loc) = match slot {
                Ok(done) => {
                    results.push(done);
                    continue;
                }
                Err(pending) => pending,
            };
            let rgb = images.next().expect("one decoded image per pending slot");
            let result = match found.next() {
                Some(Ok(segments)) => judge_segments(
                    prompt,
                    src,
                    rgb,
                    segments,
                    how.colors,
                    opts,
                    &loc,
                    &mut issues,
                ),
                Some(Err(e)) => {
                    issues.push(Issue::new(
                        IssueKind::DetectorFailed,
                        &loc,
                        format!("{e:#}; counted as wrong"),
                    ));
                    ImageResult::unjudged(
                        prompt,
                        src,
                        ImageStatus::DetectorFailed,
                        "detector failed",
                    )
                }
                None => {
                    issues.push(Issue::new(
                        IssueKind::DetectorFailed,
                        &loc,
                        "the detector returned fewer results than images; counted as wrong",
                    ));
                    ImageResult::unjudged(
                        prompt,
                        src,
                        ImageStatus::DetectorFailed,
                        "detector failed",
                    )
                }
            };
            results.push(result);
        }
        progress(results.len(), total);
    }
    let method = run
        .as_ref()
        .map(|r| r.method.clone())
        .or_else(|| results.iter().find_map(|r| r.method.clone()));
    let summary = summarize(
        &results,
        SummaryContext {
            source: root.display().to_string(),
            detector: detector_name.to_string(),
            method,
            images_per_prompt: Some(ipp),
            unsupported,
            issues,
        },
    );
    Ok(Scored { results, summary })
}

/// Reads and decodes one image, taking the method, seed and steering loss from its PNG text.
/// On failure: the status and the reason to record (the issue is already listed).
fn load_image(
    path: &Path,
    src: &mut ImageSource,
    issues: &mut Vec<Issue>,
    missing: impl FnOnce() -> String,
) -> Result<image::RgbImage, (ImageStatus, &'static str)> {
    let loc = path.display().to_string();
    let bytes = match l2s_files::read_capped(path, l2s_files::MAX_IMAGE_BYTES) {
        Ok(b) => b,
        Err(e) => {
            let msg = if e.is_not_found() {
                missing()
            } else {
                format!("cannot read: {}; counted as wrong", e.reason())
            };
            issues.push(Issue::new(IssueKind::MissingImage, &loc, msg));
            return Err((ImageStatus::Missing, "missing image"));
        }
    };
    for (k, v) in png_text_chunks(&bytes) {
        match k.as_str() {
            KEY_METHOD => src.method = Some(v),
            KEY_SEED => src.seed = v.parse().ok(),
            KEY_STEER_LOSS => src.steer_loss = v.parse().ok(),
            _ => {}
        }
    }
    match image::load_from_memory(&bytes) {
        Err(e) => {
            issues.push(Issue::new(
                IssueKind::UndecodableImage,
                &loc,
                format!("not a readable image: {e}; counted as wrong"),
            ));
            Err((ImageStatus::Undecodable, "undecodable image"))
        }
        Ok(img) => {
            if img.color() != image::ColorType::Rgb8 {
                issues.push(Issue::new(
                    IssueKind::ConvertedImage,
                    &loc,
                    format!(
                        "a {:?} image, not 8-bit RGB: converted to RGB (alpha dropped) and scored",
                        img.color()
                    ),
                ));
            }
            let rgb = img.to_rgb8();
            src.width = Some(rgb.width());
            src.height = Some(rgb.height());
            Ok(rgb)
        }
    }
}

/// Checks one image's detections against it, names the colours the prompt asks about, and
/// judges it.
#[allow(clippy::too_many_arguments)]
fn judge_segments(
    prompt: &TaskPrompt,
    src: ImageSource,
    rgb: &image::RgbImage,
    segments: Vec<crate::Segment>,
    colors: Option<&dyn ColorClassifier>,
    opts: &ScoreOptions,
    loc: &str,
    issues: &mut Vec<Issue>,
) -> ImageResult {
    let size = Some((rgb.width(), rgb.height()));
    let mut detections = Vec::with_capacity(segments.len());
    let mut masks: Vec<Option<ObjectMask>> = Vec::with_capacity(segments.len());
    for seg in segments {
        // Checked one by one so each mask stays with its detection.
        if let Some(d) = check_detections(vec![seg.detection], size, loc, issues).pop() {
            detections.push(d);
            masks.push(seg.mask);
        }
    }
    let mut named = Colors::new();
    if let Some(classifier) = colors {
        for (class, idx) in color_requests(prompt, &detections, opts) {
            let queries: Vec<ColorQuery<'_>> = idx
                .iter()
                .map(|&i| ColorQuery {
                    bbox: detections[i].bbox,
                    mask: masks[i].as_ref(),
                })
                .collect();
            match classifier.colors(rgb, &class, &queries) {
                Ok(cs) if cs.len() == idx.len() => named.extend(idx.into_iter().zip(cs)),
                Ok(cs) => {
                    issues.push(Issue::new(
                        IssueKind::DetectorFailed,
                        loc,
                        format!("the colour classifier named {} colours for {} objects; counted as wrong", cs.len(), idx.len()),
                    ));
                    return ImageResult::unjudged(
                        prompt,
                        src,
                        ImageStatus::DetectorFailed,
                        "colour classifier failed",
                    );
                }
                Err(e) => {
                    issues.push(Issue::new(
                        IssueKind::DetectorFailed,
                        loc,
                        format!("colour classifier: {e:#}; counted as wrong"),
                    ));
                    return ImageResult::unjudged(
                        prompt,
                        src,
                        ImageStatus::DetectorFailed,
                        "colour classifier failed",
                    );
                }
            }
        }
    }
    ImageResult::scored(prompt, src, &detections, &named, opts)
}

/// Fields of a detections line that are not prompt metadata.
const IMAGE_FIELDS: [&str; 6] = [
    "filename",
    "width",
    "height",
    "detections",
    "prompt_index",
    "sample",
];

/// A detection entry and its optional `"color"` (one of GenEval's colours).
fn parse_detection(v: &Value) -> Result<(Detection, Option<String>), String> {
    let class = v
        .get("class")
        .and_then(Value::as_str)
        .ok_or("no \"class\" string")?;
    let b = v
        .get("bbox")
        .and_then(Value::as_array)
        .ok_or("no \"bbox\" list")?;
    let nums: Vec<f64> = b.iter().filter_map(Value::as_f64).collect();
    if b.len() != 4 || nums.len() != 4 {
        return Err(format!(
            "bbox {}: expected 4 numbers [x1, y1, x2, y2]",
            Value::Array(b.clone())
        ));
    }
    let score = v
        .get("score")
        .and_then(Value::as_f64)
        .ok_or("no \"score\" number")?;
    let color = match v.get("color") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if crate::tasks::COLORS.contains(&c.as_str()) => Some(c.clone()),
        Some(other) => {
            return Err(format!(
                "color {other}: expected one of {}",
                crate::tasks::COLORS.join(", ")
            ))
        }
    };
    let detection = Detection {
        class: class.to_string(),
        bbox: BBox::new(
            nums[0] as f32,
            nums[1] as f32,
            nums[2] as f32,
            nums[3] as f32,
        ),
        score: score as f32,
    };
    Ok((detection, color))
}

/// Scores a detections JSONL file (see the module documentation). With `images_per_prompt`,
/// prompts with fewer lines get the rest as missing images (wrong, listed).
pub fn score_detections(
    path: &Path,
    images_per_prompt: Option<usize>,
    opts: &ScoreOptions,
) -> Result<Scored, String> {
    check_images_per_prompt(images_per_prompt, "--images-per-prompt")?;
    let text = l2s_files::read_text_capped(path, crate::score::MAX_RESULTS_BYTES)
        .map_err(|e| format!("cannot read detections file: {e}"))?;
    score_detections_text(&text, path, images_per_prompt, opts)
}

/// [`score_detections`] on the file's text; `path` names it in errors.
pub fn score_detections_text(
    text: &str,
    path: &Path,
    images_per_prompt: Option<usize>,
    opts: &ScoreOptions,
) -> Result<Scored, String> {
    check_images_per_prompt(images_per_prompt, "--images-per-prompt")?;
    let name = path.display().to_string();
    let mut issues = Vec::new();
    let mut unsupported = Vec::new();
    let mut results: Vec<ImageResult> = Vec::new();
    let mut seen_files = HashSet::new();
    let mut prompts: Vec<(String, TaskPrompt, Option<usize>)> = Vec::new();
    let mut prompt_at: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let loc = format!("{name}:{}", i + 1);
        let mut obj = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => o,
            Ok(_) => {
                issues.push(Issue::new(
                    IssueKind::BadLine,
                    &loc,
                    "not a JSON object; line not scored",
                ));
                continue;
            }
            Err(e) => {
                issues.push(Issue::new(
                    IssueKind::BadLine,
                    &loc,
                    format!("not JSON ({e}); line not scored"),
                ));
                continue;
            }
        };
        let image: BTreeMap<&str, Value> = IMAGE_FIELDS
            .iter()
            .filter_map(|k| obj.remove(*k).map(|v| (*k, v)))
            .collect();
        let prompt = match classify(Value::Object(obj), &loc, &mut issues) {
            PromptState::Scored(p) => p,
            PromptState::Unsupported(tag) => {
                issues.push(Issue::new(
                    IssueKind::UnsupportedTag,
                    &loc,
                    format!("tag {tag:?} is not scored; line left out"),
                ));
                unsupported.push((loc, Unsupported { line: i + 1, tag }));
                continue;
            }
            PromptState::Unusable => continue,
        };
        let filename = image
            .get("filename")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if !filename.is_empty() && !seen_files.insert(filename.clone()) {
            issues.push(Issue::new(
                IssueKind::DuplicateImage,
                &loc,
                format!("{filename} appears again; this line is ignored"),
            ));
            continue;
        }
        let (mut pi, mut si) = parse_relpath(&filename);
        let as_usize = |k: &str| image.get(k).and_then(Value::as_u64).map(|v| v as usize);
        pi = as_usize("prompt_index").or(pi);
        si = as_usize("sample").or(si);
        let as_u32 = |k: &str| {
            image
                .get(k)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| v > 0)
        };
        let (w, h) = (as_u32("width"), as_u32("height"));
        let size = w.zip(h);
        if size.is_none() {
            issues.push(Issue::new(
                IssueKind::MissingSize,
                &loc,
                "no positive \"width\" and \"height\": boxes not checked against the image",
            ));
        }
        let src = ImageSource {
            filename: if filename.is_empty() {
                loc.clone()
            } else {
                filename
            },
            prompt_index: pi,
            sample: si,
            width: w,
            height: h,
            ..Default::default()
        };
        let result = match image.get("detections") {
            Some(Value::Array(list)) => {
                let mut ds = Vec::new();
                let mut given_colors = Vec::new();
                for (k, d) in list.iter().enumerate() {
                    match parse_detection(d) {
                        Ok((d, color)) => {
                            ds.push(d);
                            given_colors.push(color);
                        }
                        Err(e) => issues.push(Issue::new(
                            IssueKind::BadDetection,
                            &loc,
                            format!("detection {k}: {e}; dropped"),
                        )),
                    }
                }
                let wanted: HashSet<&str> = prompt
                    .include
                    .iter()
                    .map(|i| i.class.as_str())
                    .chain(prompt.exclude.iter().map(|e| e.class.as_str()))
                    .collect();
                let stray: BTreeSet<&str> = ds
                    .iter()
                    .map(|d| d.class.as_str())
                    .filter(|c| !wanted.contains(c))
                    .collect();
                if !stray.is_empty() {
                    issues.push(Issue::new(
                        IssueKind::ClassNotInPrompt,
                        &loc,
                        format!(
                            "detections of {} which the prompt does not mention (ignored; check class names)",
                            stray.into_iter().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                let mut kept = Vec::with_capacity(ds.len());
                let mut colors = Colors::new();
                for (d, color) in ds.into_iter().zip(given_colors) {
                    if let Some(d) = check_detections(vec![d], size, &loc, &mut issues).pop() {
                        if let Some(c) = color {
                            colors.insert(kept.len(), c);
                        }
                        kept.push(d);
                    }
                }
                for (class, idx) in color_requests(&prompt, &kept, opts) {
                    let unnamed = idx.iter().filter(|i| !colors.contains_key(i)).count();
                    if unnamed > 0 {
                        issues.push(Issue::new(
                            IssueKind::BadDetection,
                            &loc,
                            format!("{unnamed} {class} detection(s) the prompt asks the colour of have no \"color\"; they count as not the wanted colour"),
                        ));
                    }
                }
                ImageResult::scored(&prompt, src, &kept, &colors, opts)
            }
            _ => {
                issues.push(Issue::new(
                    IssueKind::MissingImage,
                    &loc,
                    "no \"detections\" list: the image counts as missing (wrong)",
                ));
                ImageResult::unjudged(&prompt, src, ImageStatus::Missing, "no detections given")
            }
        };
        let key = result.prompt_key();
        if !prompt_at.contains_key(&key) {
            prompt_at.insert(key.clone(), prompts.len());
            prompts.push((key, prompt.clone(), pi));
        }
        results.push(result);
    }
    if let Some(ipp) = images_per_prompt {
        let mut count: HashMap<String, BTreeSet<Option<usize>>> = HashMap::new();
        let mut lines: HashMap<String, usize> = HashMap::new();
        for r in &results {
            count.entry(r.prompt_key()).or_default().insert(r.sample);
            *lines.entry(r.prompt_key()).or_default() += 1;
        }
        for (key, prompt, pi) in &prompts {
            let have = lines.get(key).copied().unwrap_or(0);
            let samples = &count[key];
            let mut missing: Vec<Option<usize>> = Vec::new();
            if samples.iter().all(Option::is_some) {
                // Known sample numbers: exactly the absent ones below ipp.
                missing.extend((0..ipp).filter(|j| !samples.contains(&Some(*j))).map(Some));
            } else {
                missing.extend((have..ipp).map(|_| None));
            }
            for j in missing {
                let filename = match (pi, j) {
                    (Some(p), Some(s)) => sample_relpath(*p, s),
                    _ => format!("{name}: image of {:?}", prompt.prompt),
                };
                issues.push(Issue::new(
                    IssueKind::MissingImage,
                    &filename,
                    format!(
                        "{:?} has {have} of {ipp} images in {name}; counted as wrong",
                        prompt.prompt
                    ),
                ));
                let src = ImageSource {
                    filename,
                    prompt_index: *pi,
                    sample: j,
                    ..Default::default()
                };
                results.push(ImageResult::unjudged(
                    prompt,
                    src,
                    ImageStatus::Missing,
                    "missing image",
                ));
            }
        }
    }
    if results.is_empty() && unsupported.is_empty() && issues.is_empty() {
        return Err(format!("{name}: no detections lines"));
    }
    let summary = summarize(
        &results,
        SummaryContext {
            source: name,
            detector: "external".into(),
            method: None,
            images_per_prompt,
            unsupported,
            issues,
        },
    );
    Ok(Scored { results, summary })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::{position_prompt, SpatialPrompt};
    use crate::Relation::*;

    struct Fixed(Vec<String>);
    impl Detector for Fixed {
        fn detect(&self, image: &image::RgbImage) -> Result<Vec<Detection>, crate::DetectError> {
            // A red pixel at (x, 0) marks a "dog" box at x; blue a "cat".
            let mut out = Vec::new();
            for x in 0..image.width() {
                let p = image.get_pixel(x, 0).0;
                let bbox = BBox::new(x as f32, 10.0, x as f32 + 4.0, 14.0);
                if p == [255, 0, 0] {
                    out.push(Detection {
                        class: "dog".into(),
                        bbox,
                        score: 0.9,
                    });
                }
                if p == [0, 0, 255] {
                    out.push(Detection {
                        class: "cat".into(),
                        bbox,
                        score: 0.9,
                    });
                }
            }
            if image.get_pixel(0, 1).0 == [0, 255, 0] {
                return Err(crate::DetectError::new("green means trouble"));
            }
            Ok(out)
        }
        fn classes(&self) -> &[String] {
            &self.0
        }
    }

    fn img(dog: u32, cat: u32) -> image::RgbImage {
        let mut im = image::RgbImage::new(32, 32);
        im.put_pixel(dog, 0, image::Rgb([255, 0, 0]));
        im.put_pixel(cat, 0, image::Rgb([0, 0, 255]));
        im
    }

    #[test]
    fn folder_with_problems() {
        let dir = std::env::temp_dir().join(format!("l2s-eval-folder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p0 = position_prompt("dog", LeftOf, "cat");
        let p1 = position_prompt("cup", Above, "dog");
        let p2 = position_prompt("cat", RightOf, "dog");
        let counting =
            r#"{"tag":"texture","prompt":"a furry dog","include":[{"class":"dog","count":1}]}"#;
        // prompts.jsonl lists four prompts; folder 00002 is absent.
        std::fs::create_dir_all(&dir).unwrap();
        let list = [
            p0.metadata_line(),
            p1.metadata_line(),
            p2.metadata_line(),
            counting.to_string(),
        ]
        .join("\n");
        std::fs::write(dir.join(PROMPTS_FILE), list).unwrap();
        for (i, p) in [(0, &p0), (1, &p1)] {
            std::fs::create_dir_all(sample_path(&dir, i, 0).parent().unwrap()).unwrap();
            std::fs::write(
                crate::layout::prompt_dir(&dir, i).join(METADATA_FILE),
                p.metadata_line(),
            )
            .unwrap();
        }
        std::fs::create_dir_all(sample_path(&dir, 3, 0).parent().unwrap()).unwrap();
        std::fs::write(
            crate::layout::prompt_dir(&dir, 3).join(METADATA_FILE),
            counting,
        )
        .unwrap();
        img(2, 20).save(sample_path(&dir, 3, 0)).unwrap();
        // Prompt 0: right, wrong, undecodable, detector failure.
        img(2, 20).save(sample_path(&dir, 0, 0)).unwrap();
        img(20, 2).save(sample_path(&dir, 0, 1)).unwrap();
        std::fs::write(sample_path(&dir, 0, 2), b"not a png").unwrap();
        let mut bad = img(2, 20);
        bad.put_pixel(0, 1, image::Rgb([0, 255, 0]));
        bad.save(sample_path(&dir, 0, 3)).unwrap();
        // Prompt 1: one image of four, grey with alpha; "cup" is unknown to the detector.
        image::DynamicImage::ImageRgb8(img(2, 20))
            .to_luma_alpha8()
            .save(sample_path(&dir, 1, 0))
            .unwrap();

        let det = Fixed(vec!["dog".into(), "cat".into()]);
        let mut calls = 0;
        let s = score_folder(
            &dir,
            &det,
            "fixed",
            Some(4),
            &ScoreOptions::default(),
            &mut |_, _| calls += 1,
        )
        .unwrap();
        assert_eq!(calls, 12);
        let sum = &s.summary;
        assert_eq!((sum.images, sum.correct_images, sum.prompts), (12, 1, 3));
        assert_eq!(sum.missing_images, 7, "three of prompt 1, four of prompt 2");
        assert_eq!(sum.unreadable_images, 2);
        assert_eq!(sum.unsupported["texture"].count, 1);
        let c = &sum.error_counts;
        assert_eq!(c[&IssueKind::MissingImage], 7);
        assert_eq!(c[&IssueKind::UndecodableImage], 1);
        assert_eq!(c[&IssueKind::DetectorFailed], 1);
        assert_eq!(c[&IssueKind::ClassUnknownToDetector], 1);
        assert_eq!(c[&IssueKind::ConvertedImage], 1, "the grey image is listed");
        assert_eq!(s.results[4].status, ImageStatus::Scored, "and scored");
        assert_eq!(c[&IssueKind::UnsupportedTag], 1);
        let missing: Vec<&str> = sum
            .errors
            .iter()
            .filter(|e| e.kind == IssueKind::MissingImage)
            .map(|e| e.location.as_str())
            .collect();
        assert!(
            missing
                .iter()
                .any(|l| l.ends_with("00002/samples/0003.png")),
            "{missing:?}"
        );
        // Results are in prompt, sample order with GenEval's file names.
        assert_eq!(s.results[0].filename, "00000/samples/0000.png");
        assert!(s.results[0].correct && !s.results[1].correct && s.results[1].all_found);
        assert_eq!(s.results[2].status, ImageStatus::Undecodable);
        assert_eq!(s.results[3].status, ImageStatus::DetectorFailed);
        // Not a GenEval folder at all.
        let empty = dir.join("00000").join("samples");
        assert!(score_folder(
            &empty,
            &det,
            "fixed",
            None,
            &ScoreOptions::default(),
            &mut |_, _| {}
        )
        .unwrap_err()
        .contains("not a GenEval image folder"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn detections_file_with_problems() {
        let dir = std::env::temp_dir().join(format!("l2s-eval-dets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.jsonl");
        let meta = |p: &SpatialPrompt| {
            let mut v = p.metadata.clone();
            v.as_object_mut().unwrap().insert("width".into(), 64.into());
            v.as_object_mut()
                .unwrap()
                .insert("height".into(), 64.into());
            v
        };
        let p = position_prompt("dog", LeftOf, "cat");
        let mut ok = meta(&p);
        ok["filename"] = "00000/samples/0000.png".into();
        ok["detections"] = serde_json::json!([
            {"class": "dog", "bbox": [0, 0, 10, 10], "score": 0.9},
            {"class": "cat", "bbox": [40, 0, 70, 10], "score": 0.9},
            {"class": "person", "bbox": [0, 0, 1, 1], "score": 0.9},
            {"class": "cat", "bbox": [1, 2], "score": 0.9}
        ]);
        let mut dup = ok.clone();
        dup["detections"] = serde_json::json!([]);
        let mut no_dets = meta(&p);
        no_dets["filename"] = "00000/samples/0001.png".into();
        let lines = [
            ok.to_string(),
            "{broken".to_string(),
            dup.to_string(),
            r#"{"tag":"texture","prompt":"a furry car","include":[{"class":"car","count":1}],"detections":[]}"#.to_string(),
            no_dets.to_string(),
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let s = score_detections(&path, Some(4), &ScoreOptions::default()).unwrap();
        let sum = &s.summary;
        // Image 0 correct (cat box clipped to 40..64), image 1 missing, images 2 and 3 missing.
        assert_eq!(
            (sum.images, sum.correct_images, sum.missing_images),
            (4, 1, 3)
        );
        let c = &sum.error_counts;
        assert_eq!(c[&IssueKind::ClassNotInPrompt], 1);
        assert_eq!(c[&IssueKind::BoxOutsideImage], 1);
        assert_eq!(c[&IssueKind::BadDetection], 1);
        assert_eq!(c[&IssueKind::BadLine], 1);
        assert_eq!(c[&IssueKind::DuplicateImage], 1);
        assert_eq!(c[&IssueKind::UnsupportedTag], 1);
        assert_eq!(c[&IssueKind::MissingImage], 3);
        assert_eq!(
            sum.unsupported["texture"].locations,
            [format!("{}:4", path.display())]
        );
        let loc = |k: IssueKind| {
            sum.errors
                .iter()
                .find(|e| e.kind == k)
                .unwrap()
                .location
                .clone()
        };
        assert_eq!(loc(IssueKind::BadLine), format!("{}:2", path.display()));
        assert_eq!(
            loc(IssueKind::ClassNotInPrompt),
            format!("{}:1", path.display())
        );
        let filled: Vec<&str> = s.results[2..].iter().map(|r| r.filename.as_str()).collect();
        assert_eq!(filled, ["00000/samples/0002.png", "00000/samples/0003.png"]);
        assert!(score_detections(&dir.join("none.jsonl"), None, &ScoreOptions::default()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
