//! `l2s score`: judge a GenEval-layout image folder (with a detector, and CLIP for colours) or an
//! external detector's detections file by GenEval's rules; write per-image results and a summary
//! with GenEval's table and VISOR's metrics.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use l2s_eval::report::{RESULTS_FILE, SUMMARY_FILE};
use l2s_eval::score::{compare, read_results, results_jsonl, ScoreOptions};
use l2s_eval::sources::{score_detections, score_folder_with, FolderScoring, Scored};
use l2s_generate::write_atomic;

use crate::common::{say, Global};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectorArg {
    /// The exact colour-and-shape detector of the shapes world
    Shapes,
    /// GenEval's detector, Mask2Former with a Swin backbone, from --detector-weights (mmdet's
    /// mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco .pth, or a transformers
    /// Mask2FormerForUniversalSegmentation model.safetensors / pytorch_model.bin)
    Mask2former,
}

/// The device `--device` names; without it the first GPU when this binary is built with CUDA
/// and one answers, else the CPU with a note (never an error for a missing GPU).
pub fn detector_device(arg: Option<&str>, quiet: bool) -> Result<Device> {
    if arg.is_some() {
        return crate::common::device(arg);
    }
    let why = if !candle_core::utils::cuda_is_available() {
        "this binary is built without the cuda feature".to_string()
    } else {
        match Device::new_cuda(0) {
            Ok(d) => return Ok(d),
            Err(e) => format!("no CUDA device answers ({e})"),
        }
    };
    if !quiet {
        eprintln!("note: the detector runs on the CPU: {why}");
    }
    Ok(Device::Cpu)
}

/// The detector a flag names, loaded on `device`.
pub fn load_detector_on(
    arg: DetectorArg,
    weights: Option<&std::path::Path>,
    device: &Device,
) -> Result<Box<dyn l2s_eval::Detector + Sync>> {
    Ok(match arg {
        DetectorArg::Shapes => Box::new(l2s_shapes::ShapeDetector::default()),
        DetectorArg::Mask2former => {
            let Some(w) = weights else {
                bail!("--detector mask2former needs --detector-weights FILE (the checkpoint)")
            };
            Box::new(
                l2s_detect::InstanceDetector::load_on(w, device)
                    .with_context(|| format!("--detector-weights {}", w.display()))?,
            )
        }
    })
}

#[derive(clap::Args)]
#[command(
    after_help = "A detections file (--detections) has one JSON object per image: the prompt's GenEval \
metadata fields (tag, include, prompt), \"width\", \"height\", \"detections\": [{\"class\", \"bbox\": [x1, y1, x2, y2] \
in pixels, \"score\", optionally \"color\"}], and optionally \"filename\" (NNNNN/samples/SSSS.png). All six GenEval \
tasks are scored (single_object, two_object, counting, colors, position, color_attr) and our multi_position; the \
summary holds GenEval's table (per task, overall = mean over tasks). Results: one JSON line per image \
with GenEval's fields (filename, tag, prompt, correct, reason, metadata, details) and ours (status, all_found, \
relations, detections). Missing or unreadable images count as wrong; every problem is listed with its path or \
line in the summary's \"errors\"."
)]
pub struct Args {
    /// A GenEval-layout image folder (as written by `l2s eval`)
    #[arg(
        value_name = "DIR",
        required_unless_present = "detections",
        conflicts_with = "detections"
    )]
    pub dir: Option<PathBuf>,
    /// Score a detections JSONL file from an external detector instead of a folder
    #[arg(long, value_name = "FILE")]
    pub detections: Option<PathBuf>,
    /// Detector run on a folder's images
    #[arg(long, value_enum, default_value = "shapes")]
    pub detector: DetectorArg,
    /// The checkpoint of --detector mask2former
    #[arg(long, value_name = "FILE")]
    pub detector_weights: Option<PathBuf>,
    /// Per-image results JSONL (default: DIR/results.jsonl; required with --detections)
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Summary JSON (default: DIR/summary.json; required with --detections)
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Images expected per prompt; fewer count as missing (default: DIR/run.json's, else the most any prompt has)
    #[arg(long, value_name = "N")]
    pub images_per_prompt: Option<usize>,
    /// Detections must score above this (GenEval: 0.3)
    #[arg(long, default_value_t = l2s_eval::SCORE_THRESHOLD)]
    pub min_score: f32,
    /// The same for GenEval's counting prompts (GenEval: 0.9)
    #[arg(long, default_value_t = l2s_eval::score::COUNTING_THRESHOLD)]
    pub counting_min_score: f32,
    /// Images per detector call; images of one size share a forward pass (default: 1 on the CPU,
    /// where batches are no faster, 8 on a GPU)
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// CLIP for GenEval's colour tasks (colors, color_attr): a transformers CLIPModel folder
    /// (openai/clip-vit-large-patch14: config.json, model.safetensors, tokenizer files). Without
    /// it colour prompts are listed as not scored
    #[arg(long, value_name = "DIR")]
    pub clip: Option<PathBuf>,
    /// Device of --detector mask2former and --clip: cpu, cuda or cuda:N (default: the first GPU when built
    /// with CUDA and one is present, else the CPU)
    #[arg(long)]
    pub device: Option<String>,
    /// Afterwards, list prompt by prompt what changed from this earlier results file
    #[arg(long, value_name = "OTHER_results.jsonl")]
    pub compare: Option<PathBuf>,
}

fn output(
    given: &Option<PathBuf>,
    dir: Option<&Path>,
    default: &str,
    flag: &str,
) -> Result<PathBuf> {
    let path = match (given, dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.join(default),
        (None, None) => bail!("{flag} FILE is required with --detections"),
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!(
                "{flag} {}: folder {} does not exist",
                path.display(),
                parent.display()
            );
        }
    }
    if path.is_dir() {
        bail!(
            "{flag} {}: is a folder; expected a file name",
            path.display()
        );
    }
    Ok(path)
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    for (flag, v) in [
        ("--min-score", args.min_score),
        ("--counting-min-score", args.counting_min_score),
    ] {
        if !(v.is_finite() && (0.0..1.0).contains(&v)) {
            bail!("{flag} {v}: expected a number in [0, 1)");
        }
    }
    if let Some(n) = args.batch_size.filter(|n| !(1..=256).contains(n)) {
        bail!("--batch-size {n}: expected 1 to 256");
    }
    if args.images_per_prompt == Some(0) {
        bail!("--images-per-prompt 0: expected at least 1");
    }
    if let Some(dir) = &args.dir {
        if !dir.is_dir() {
            bail!(
                "{}: not a folder (expected an `l2s eval` output folder)",
                dir.display()
            );
        }
    }
    let out = output(&args.out, args.dir.as_deref(), RESULTS_FILE, "--out")?;
    let summary_path = output(
        &args.summary,
        args.dir.as_deref(),
        SUMMARY_FILE,
        "--summary",
    )?;
    if out == summary_path {
        bail!("--out and --summary name the same file {}", out.display());
    }
    // Read the comparison file first: a bad path should not cost a scoring run.
    let before = match &args.compare {
        Some(p) => Some(
            read_results(p)
                .map_err(anyhow::Error::msg)
                .context("--compare")?,
        ),
        None => None,
    };
    let opts = ScoreOptions {
        min_score: args.min_score,
        counting_min_score: args.counting_min_score,
        ..ScoreOptions::default()
    };
    let Scored { results, summary } = match (&args.dir, &args.detections) {
        (Some(dir), _) => {
            let device = match (args.detector, &args.clip) {
                (DetectorArg::Shapes, None) => Device::Cpu,
                _ => detector_device(args.device.as_deref(), global.quiet)?,
            };
            let clip = match &args.clip {
                Some(d) => Some(
                    l2s_detect::ClipColorClassifier::load(d, &device)
                        .with_context(|| format!("--clip {}", d.display()))?,
                ),
                None => None,
            };
            let detector =
                load_detector_on(args.detector, args.detector_weights.as_deref(), &device)?;
            let name = match args.detector {
                DetectorArg::Shapes => "shapes",
                DetectorArg::Mask2former => "mask2former",
            };
            let bar = if global.quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(0)
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "scoring [{bar:32}] {pos}/{len} images {elapsed_precise} ({per_sec})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let how = FolderScoring {
                detector: detector.as_ref(),
                detector_name: name,
                colors: clip.as_ref().map(|c| c as &dyn l2s_eval::ColorClassifier),
                batch_size: args
                    .batch_size
                    .unwrap_or(if device.is_cpu() { 1 } else { 8 }),
                images_per_prompt: args.images_per_prompt,
                opts,
            };
            let s = score_folder_with(dir, &how, &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })
            .map_err(anyhow::Error::msg)?;
            bar.finish_and_clear();
            s
        }
        (None, Some(file)) => {
            if args.clip.is_some() {
                bail!("--clip reads images; a --detections file gives colours as each detection's \"color\"");
            }
            score_detections(file, args.images_per_prompt, &opts).map_err(anyhow::Error::msg)?
        }
        (None, None) => bail!("give a folder DIR or --detections FILE"),
    };
    write_atomic(&out, results_jsonl(&results).as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    let text = serde_json::to_string_pretty(&summary)? + "\n";
    write_atomic(&summary_path, text.as_bytes())
        .with_context(|| format!("writing {}", summary_path.display()))?;
    // Nothing judged: the files list the problems, and the exit status says it failed.
    if summary.images == 0 {
        let source = &summary.source;
        match summary.errors.first() {
            Some(first) => bail!(
                "{source}: nothing could be scored; {} problem(s) (listed in {}), the first: {}: {}",
                summary.errors.len(),
                summary_path.display(),
                first.location,
                first.message
            ),
            None => bail!("{source}: nothing to score (no spatial prompt with images)"),
        }
    }
    say(&summary.text());
    say(&format!(
        "results: {}\nsummary: {}\n",
        out.display(),
        summary_path.display()
    ));
    if let (Some(before), Some(path)) = (before, &args.compare) {
        let c = compare(&before, &results);
        say(&format!(
            "\n{}",
            c.text(&path.display().to_string(), &out.display().to_string())
        ));
    }
    Ok(())
}
