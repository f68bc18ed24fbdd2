//! `l2s data build`: the classifier's training data by dual inversion of annotated images;
//! `l2s data merge`: the parts of a build split with `--shard` joined into one dataset.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use l2s_models::{InversionSettings, Pipeline};
use l2s_steer::build::{
    build, layer_infos, record_sample, relation_names, AnnotatedImage, BuildConfig, BuildSummary,
    RelationCheck,
};

use crate::cmd::score::DetectorArg;
use l2s_steer::dataset::{merge, DatasetInfo, DatasetWriter, ShardSpec};

use crate::common::{default_workers, load_model, Global, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Invert annotated images with true and wrong-relation prompts and record relation maps
    Build(Box<BuildArgs>),
    /// Join the parts of one build (`data build --shard i/n`, each into its own folder) into one
    /// dataset
    Merge(MergeArgs),
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The parts' dataset folders. They must come from one build: the same model, maps and
    /// settings (the first differing field is named); a sample found in several is kept once
    #[arg(required = true, value_name = "PART")]
    parts: Vec<PathBuf>,
    /// New dataset folder (an existing one holding a dataset is refused)
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A folder with COCO-style annotations.json and its images (e.g. `l2s shapes render` output)
    #[arg(long)]
    images: PathBuf,
    /// Output dataset folder (resumed if it exists)
    #[arg(long)]
    out: PathBuf,
    /// Sampling steps of inversion and reconstruction (default: 50; FLUX: the model's)
    #[arg(long)]
    steps: Option<usize>,
    /// Fixed-point iterations per inversion step (Stable Diffusion; FLUX uses RF-inversion)
    #[arg(long, default_value_t = 5)]
    fixed_point: usize,
    /// Steps at which maps are recorded (default: the paper's 5,10,15,20,25,49 scaled to --steps;
    /// FLUX.1-schnell: 1,3)
    #[arg(long, value_delimiter = ',')]
    at_steps: Vec<usize>,
    /// Drop samples whose reconstruction PSNR is below this (dB; default: 19.5, FLUX 20)
    #[arg(long)]
    min_psnr: Option<f64>,
    /// Also drop samples whose reconstruction, read by this detector, no longer shows both
    /// objects in the true relation (the maps would otherwise carry a wrong label)
    #[arg(long, value_enum, value_name = "DETECTOR")]
    check_relation: Option<DetectorArg>,
    /// Invert with the true prompt only (the ablation of dual inversion)
    #[arg(long)]
    single_inversion: bool,
    /// Use at most this many images
    #[arg(long)]
    limit: Option<usize>,
    /// Build only part i of n (1-based, e.g. 2/4): samples i−1, i−1+n, i−1+2n, …, for
    /// splitting work across machines; give each part its own --out and join them afterwards
    /// with `l2s data merge`
    #[arg(long, value_name = "I/N")]
    shard: Option<ShardSpec>,
    /// Seed of each image's object pair and wrong relation; on FLUX also of the RF-inversion
    /// noise, drawn per sample from a seed mixed from this and the sample's number (2i for image
    /// i's true prompt, 2i + 1 for its wrong one), so no two samples share noise
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per shard file
    #[arg(long, default_value_t = 256)]
    shard_size: usize,
    /// Images inverted at once, each on its own thread [default: one per core]
    #[arg(long)]
    workers: Option<usize>,
}

/// The progress line of a build: samples kept and why others were dropped.
pub fn progress_message(s: &BuildSummary) -> String {
    format!(
        "{} samples, dropped {} under the PSNR threshold, {} relation lost; PSNR {:.1} dB",
        s.written, s.dropped_low_psnr, s.dropped_relation_lost, s.mean_psnr
    )
}

/// The detector that checks reconstructions, sized for the images' resolution. Refuses images
/// whose objects it cannot detect (every sample would be dropped).
pub fn shapes_detector(
    which: DetectorArg,
    images: &[AnnotatedImage],
) -> Result<l2s_shapes::ShapeDetector> {
    match which {
        DetectorArg::Shapes => {
            let size = images.first().map_or(32, |i| i.image.width());
            let detector = l2s_shapes::ShapeDetector::new(l2s_shapes::DetectorConfig::for_render(
                &l2s_shapes::RenderConfig::with_size(size),
            ));
            let known = l2s_eval::Detector::classes(&detector);
            for img in images {
                if let Some((name, _)) = img.objects.iter().find(|(n, _)| !known.contains(n)) {
                    anyhow::bail!(
                        "--check-relation shapes: image {} has an object {name:?}, which the shapes detector cannot find \
                         (it knows {}); use it only on shapes-world images",
                        img.id,
                        known.join(", ")
                    );
                }
            }
            Ok(detector)
        }
    }
}

/// Reads a COCO-style folder into annotated images.
pub fn read_annotated(dir: &std::path::Path, limit: Option<usize>) -> Result<Vec<AnnotatedImage>> {
    let ds = l2s_shapes::read_dataset(dir)
        .with_context(|| format!("reading annotated images from {}", dir.display()))?;
    ds.images
        .iter()
        .take(limit.unwrap_or(usize::MAX))
        .map(|img| {
            Ok(AnnotatedImage {
                id: img.id.to_string(),
                image: img.load()?,
                objects: img
                    .objects
                    .iter()
                    .map(|o| (o.class.name().to_string(), o.bbox))
                    .collect(),
            })
        })
        .collect()
}

/// Opens (or resumes) a dataset for `model`, probing one sample for the map layout.
pub fn open_writer(
    model: &Pipeline,
    images: &[AnnotatedImage],
    cfg: &BuildConfig,
    relation_check: Option<&str>,
    out: &std::path::Path,
    shard_size: usize,
) -> Result<DatasetWriter> {
    let probe = images
        .iter()
        .find(|i| i.objects.len() >= 2)
        .context("no image with two or more objects")?;
    let (a, b) = (&probe.objects[0].0, &probe.objects[1].0);
    let prompt = format!("a {a} and a {b}");
    let mut probe_cfg = cfg.clone();
    probe_cfg.fixed_point_iterations = 0;
    let probe = record_sample(model, &probe.image, &prompt, a, b, &probe_cfg)?;
    let (maps, sites) = (probe.maps, probe.sites);
    let mut extra = serde_json::Map::new();
    if let Some(check) = relation_check {
        extra.insert("relation_check".into(), check.into());
    }
    extra.insert("num_inference_steps".into(), cfg.steps.into());
    extra.insert(
        "fixed_point_iterations".into(),
        cfg.fixed_point_iterations.into(),
    );
    extra.insert("min_psnr".into(), cfg.psnr_threshold.into());
    extra.insert("seed".into(), cfg.seed.into());
    let inversion = InversionSettings {
        fixed_point_iterations: cfg.fixed_point_iterations,
        rf: cfg.rf,
        noise_seed: cfg.seed,
    };
    extra.insert("inversion".into(), model.inversion_name(&inversion).into());
    if let Some(file) = model.transformer_file() {
        extra.insert("transformer_file".into(), file.display().to_string().into());
    }
    extra.insert(
        "model_folder".into(),
        model.folder().display().to_string().into(),
    );
    let info = DatasetInfo {
        model: model.fingerprint()?,
        num_maps: maps.dim(2)?,
        map_size: maps.dim(3)?,
        step_indices: cfg.step_indices.clone(),
        relations: relation_names(),
        layers: layer_infos(&sites),
        dual_inversion: cfg.dual_inversion,
        extra,
    };
    Ok(DatasetWriter::open(out, info, shard_size)?)
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    match args.command {
        Command::Build(a) => run_build(*a, global),
        Command::Merge(a) => run_merge(a),
    }
}

fn run_merge(a: MergeArgs) -> Result<()> {
    let summary = merge(&a.parts, &a.out)?;
    let duplicates = if summary.duplicates > 0 {
        format!(
            " ({} found in more than one part kept once)",
            summary.duplicates
        )
    } else {
        String::new()
    };
    println!(
        "{}: {} samples in {} shards from {} parts{duplicates}",
        a.out.display(),
        summary.samples,
        summary.shards,
        summary.parts
    );
    Ok(())
}

fn run_build(a: BuildArgs, global: &Global) -> Result<()> {
    let (model, _) = load_model(&a.model)?;
    let model = &model;
    let images = read_annotated(&a.images, a.limit)?;
    let steps = a.steps.unwrap_or(model.sampling_defaults().steps);
    let (step_indices, min_psnr) = (model.map_steps(steps), model.min_reconstruction_psnr());
    let cfg = BuildConfig {
        steps,
        fixed_point_iterations: a.fixed_point,
        step_indices: if a.at_steps.is_empty() {
            step_indices
        } else {
            a.at_steps.clone()
        },
        psnr_threshold: a.min_psnr.unwrap_or(min_psnr),
        dual_inversion: !a.single_inversion,
        seed: a.seed,
        shard: a.shard.unwrap_or_default(),
        rf: l2s_diffusion::RfInversionConfig::default(),
    };
    let detector = a
        .check_relation
        .map(|d| shapes_detector(d, &images))
        .transpose()?;
    let check = detector.as_ref().map(|d| RelationCheck {
        detector: d,
        min_score: l2s_eval::SCORE_THRESHOLD,
    });
    let check_name = a.check_relation.map(|_| "shapes");
    let mut writer = open_writer(model, &images, &cfg, check_name, &a.out, a.shard_size)?;
    let bar = if global.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(images.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "build [{bar:32}] {pos}/{len} images {elapsed_precise} (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let summary = build(
        model,
        &images,
        &cfg,
        check.as_ref(),
        a.workers.unwrap_or_else(default_workers),
        &mut writer,
        None,
        &mut |done, _, s| {
            bar.set_position(done as u64);
            bar.set_message(progress_message(s));
        },
    )?;
    writer.finish()?;
    bar.finish_and_clear();
    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_check_refuses_objects_its_detector_cannot_find() {
        let image = |names: &[&str]| AnnotatedImage {
            id: "7".into(),
            image: image::RgbImage::new(32, 32),
            objects: names
                .iter()
                .map(|n| (n.to_string(), l2s_eval::BBox::new(0.0, 0.0, 4.0, 4.0)))
                .collect(),
        };
        assert!(shapes_detector(DetectorArg::Shapes, &[image(&["star", "heart"])]).is_ok());
        let err = shapes_detector(
            DetectorArg::Shapes,
            &[image(&["star", "heart"]), image(&["dog", "star"])],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("image 7") && err.contains("\"dog\"") && err.contains("circle"),
            "{err}"
        );
    }
}
