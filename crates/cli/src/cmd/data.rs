//! `l2s data build`: the classifier's training data by dual inversion of annotated images;
//! `l2s data merge`: the parts of a build split with `--shard` joined into one dataset;
//! `l2s data import`: the published training samples as a dataset.

use std::path::PathBuf;

use anyhow::{bail, Result};
use l2s_eval::prompts::{group_unsupported, split_spatial, NO_RELATION};
use l2s_sources::Fit;
use l2s_steer::build::{
    progress_message, run_build, BuildConfig, BuildJob, BuildSource, DropRule, RelationCheckKind,
    Replicas,
};

use crate::cmd::score::{load_detector_on, DetectorArg};
use l2s_steer::dataset::{merge, ShardSpec};

use crate::common::{
    default_workers, device_for, image_bar, load_replicas, EvalArgs, Global, MapLayoutArg,
    ModelArgs,
};

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
    /// Generate images for spatial prompts (plain or steered) and keep those a detector judges
    /// correct, as a JSONL source for `data build --jsonl` (GenEval's layout; resumable)
    Generate(Box<GenerateArgs>),
    /// Convert the published Learn-to-Steer training samples (their result_metadata.json,
    /// result_data.json and .pth map files) into a dataset `l2s train` reads
    Import(ImportArgs),
}

#[derive(clap::Args)]
#[command(
    after_help = "Writes DIR in GenEval's layout (as `l2s eval` does), DIR/results.jsonl and DIR/summary.json (as \
`l2s score` does), and DIR/verified.jsonl: one line per relation of each image judged correct, with the boxes the \
judgement used. Build training data from it with `l2s data build --jsonl DIR/verified.jsonl`."
)]
pub struct GenerateArgs {
    #[command(flatten)]
    eval: EvalArgs,
    /// Who judges the images: `shapes` (the shapes world's exact detector) or `mask2former`
    /// (GenEval's, from --detector-weights)
    #[arg(long, value_enum, default_value = "shapes")]
    detector: DetectorArg,
    /// The checkpoint of --detector mask2former
    #[arg(long, value_name = "FILE")]
    detector_weights: Option<PathBuf>,
    /// Device of --detector mask2former: cpu, cuda or cuda:N (default: the model's)
    #[arg(long, value_name = "DEVICE")]
    detector_device: Option<String>,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The published split: its folder or its result_metadata.json (map files are found under
    /// it even when the JSON names another machine's paths)
    #[arg(long, value_name = "PATH")]
    published: PathBuf,
    /// New dataset folder
    #[arg(long)]
    out: PathBuf,
    /// Samples per shard file
    #[arg(long, default_value_t = 256)]
    shard_size: usize,
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
#[command(
    group(clap::ArgGroup::new("source").required(true).args(["images", "gqa", "coco", "triplets", "jsonl"])),
    after_help = "Sources: --images (the shapes renderer's folders), --gqa (GQA scene graphs: objects named once, no \
is-a pair, the relations above, below, to the left of, to the right of, one per image), --coco (COCO instances: \
categories with one non-crowd instance, pairs in exactly one relation by GenEval's rule, boxes of 32 px or more), \
--triplets (the published phase-1 triplet files), --jsonl (one {\"image\", \"subject\", \"relation\", \"object\"} per \
line). Photos are fitted to the model's square (--fit). Records and images left out are counted by reason and \
listed in DIR/build-summary.json, with the samples kept and dropped."
)]
pub struct BuildArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A folder with the shapes renderer's annotations.json and its images (`l2s shapes render`)
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// GQA scene graphs (train_sceneGraphs.json or val_sceneGraphs.json); images from --image-dir
    #[arg(long, value_name = "FILE", requires = "image_dir")]
    gqa: Option<PathBuf>,
    /// COCO instances_*.json; images from --image-dir
    #[arg(long, value_name = "FILE", requires = "image_dir")]
    coco: Option<PathBuf>,
    /// The published triplet files (their folder or result_metadata.json); images from --image-dir
    #[arg(long, value_name = "PATH", requires = "image_dir")]
    triplets: Option<PathBuf>,
    /// JSON Lines of {"image", "subject", "relation", "object"} (image paths relative to the file;
    /// optional "subject_box"/"object_box" [x1, y1, x2, y2] are checked against the relation)
    #[arg(long, value_name = "FILE")]
    jsonl: Option<PathBuf>,
    /// The images of --gqa, --coco or --triplets
    #[arg(long, value_name = "DIR")]
    image_dir: Option<PathBuf>,
    /// How a photo becomes the model's square: `crop` (the centre square, resized: the default
    /// for Stable Diffusion) or `resize` (the whole image: the default for FLUX)
    #[arg(long, value_enum)]
    fit: Option<FitArg>,
    /// Output dataset folder (resumed if it exists)
    #[arg(long)]
    out: PathBuf,
    /// Sampling steps of inversion and reconstruction (default: 50; FLUX: the model's)
    #[arg(long)]
    steps: Option<usize>,
    /// Fixed-point iterations per inversion step (Stable Diffusion; FLUX uses RF-inversion)
    #[arg(long, default_value_t = 5)]
    fixed_point: usize,
    /// When an image's true-prompt sample is dropped: `twins` drops its wrong-prompt sample too
    /// without inverting it (the paper's rule), `per-sample` judges each sample on its own
    #[arg(long, value_enum, default_value = "twins")]
    drop: DropArg,
    /// How the maps become classifier channels: `published` (the published Learn-to-Steer
    /// classifiers' layout: layers by resolution ascending, bilinear resize to 16×16,
    /// renormalised only when resized) or `ours` (layers in forward order, area-averaged, every
    /// map renormalised). A classifier trained on the data steers with the same layout
    #[arg(long, value_enum, default_value = "published")]
    map_layout: MapLayoutArg,
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
    /// The checkpoint of --check-relation mask2former
    #[arg(long, value_name = "FILE")]
    detector_weights: Option<PathBuf>,
    /// Device of --check-relation mask2former: cpu, cuda or cuda:N (default: the model's, the
    /// first one with --device LIST)
    #[arg(long, value_name = "DEVICE")]
    detector_device: Option<String>,
    /// Invert with the true prompt only (the ablation of dual inversion)
    #[arg(long)]
    single_inversion: bool,
    /// Use at most this many images
    #[arg(long)]
    limit: Option<usize>,
    /// Build only part i of n (1-based, e.g. 2/4; `auto`: from a Slurm job array or a Kubernetes
    /// Indexed Job, see docs/cluster.md): images i−1, i−1+n, i−1+2n, …, for
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

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FitArg {
    Crop,
    Resize,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DropArg {
    Twins,
    PerSample,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    match args.command {
        Command::Build(a) => build(*a, global),
        Command::Merge(a) => run_merge(a),
        Command::Import(a) => run_import(a),
        Command::Generate(a) => run_generate(*a, global),
    }
}

fn run_generate(a: GenerateArgs, global: &Global) -> Result<()> {
    let args = &a.eval;
    let out = args.lock_out()?;
    let prepared = args.prepare()?;
    let run = prepared.run(args);
    let (detector, name): (Box<dyn l2s_eval::Detector + Sync>, &str) = match a.detector {
        DetectorArg::Shapes => (
            Box::new(l2s_shapes::ShapeDetector::new(
                l2s_shapes::DetectorConfig::for_render(&l2s_shapes::RenderConfig::with_size(
                    prepared.model.native_size() as u32,
                )),
            )),
            "shapes",
        ),
        DetectorArg::Mask2former => (
            load_detector_on(
                a.detector,
                a.detector_weights.as_deref(),
                &match &a.detector_device {
                    Some(d) => device_for("--detector-device", Some(d))?,
                    None => prepared.model.device().clone(),
                },
            )?,
            "mask2former",
        ),
    };
    // Verification judges relations: the other tasks' prompts are left out, and said so.
    let numbered = prepared.prompts.iter().cloned().enumerate();
    let (spatial, left_out) = split_spatial(numbered.map(|(i, p)| (i + 1, p)));
    for (tag, prompts) in group_unsupported(&left_out) {
        let n = prompts.len();
        eprintln!("note: {n} prompts tagged {tag:?} left out ({NO_RELATION})");
    }
    let spatial: Vec<_> = spatial.into_iter().map(|(_, p)| p).collect();
    if spatial.is_empty() {
        bail!("no prompt with a relation to verify");
    }
    let bar = image_bar(global, &run.label());
    let report = l2s_steer::verified::generate_verified(
        &run,
        &spatial,
        &prepared.source,
        &args.out,
        detector.as_ref(),
        name,
        &mut |done, total, prompt| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(prompt.to_string());
        },
    )?;
    bar.finish_and_clear();
    println!(
        "{}: {} of {} images judged correct ({} generated now); {} lines in {}",
        args.out.display(),
        report.kept_images,
        report.images,
        report.generated,
        report.lines,
        report.file.display()
    );
    out.finish();
    Ok(())
}

fn run_import(a: ImportArgs) -> Result<()> {
    let report = l2s_steer::import::import_published(&a.published, &a.out, a.shard_size)?;
    if report.left_out.total() > 0 {
        eprintln!(
            "left out of {} rows:\n{}",
            report.rows_seen,
            report.left_out.summary()
        );
    }
    println!(
        "{}: {} samples ({} maps per word of {}×{}, steps {:?}) from {} rows",
        a.out.display(),
        report.samples,
        report.num_maps,
        report.map_size,
        report.map_size,
        report.step_indices,
        report.rows_seen
    );
    Ok(())
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

/// The source the flags name (clap makes exactly one present).
fn source(a: &BuildArgs) -> Result<BuildSource> {
    let images = || a.image_dir.clone().unwrap_or_default();
    Ok(if let Some(dir) = &a.images {
        BuildSource::Shapes(dir.clone())
    } else if let Some(file) = &a.gqa {
        BuildSource::Gqa {
            scene_graphs: file.clone(),
            images: images(),
        }
    } else if let Some(file) = &a.coco {
        BuildSource::Coco {
            instances: file.clone(),
            images: images(),
        }
    } else if let Some(path) = &a.triplets {
        BuildSource::Triplets {
            path: path.clone(),
            images: images(),
        }
    } else if let Some(file) = &a.jsonl {
        BuildSource::Jsonl(file.clone())
    } else {
        bail!("no source: give --images, --gqa, --coco, --triplets or --jsonl")
    })
}

fn build(a: BuildArgs, global: &Global) -> Result<()> {
    let (models, _) = load_replicas(&a.model)?;
    let model = &models[0];
    let steps = a.steps.unwrap_or(model.sampling_defaults().steps);
    let defaults = BuildConfig::for_model(model, steps);
    let config = BuildConfig {
        fixed_point_iterations: a.fixed_point,
        step_indices: if a.at_steps.is_empty() {
            defaults.step_indices.clone()
        } else {
            a.at_steps.clone()
        },
        psnr_threshold: a.min_psnr.unwrap_or(defaults.psnr_threshold),
        dual_inversion: !a.single_inversion,
        seed: a.seed,
        shard: a.shard.unwrap_or_default(),
        drop_rule: match a.drop {
            DropArg::Twins => DropRule::Twins,
            DropArg::PerSample => DropRule::PerSample,
        },
        map_layout: a.map_layout.into(),
        ..defaults
    };
    let job = BuildJob {
        source: source(&a)?,
        fit: a.fit.map(|f| match f {
            FitArg::Crop => Fit::CenterCrop,
            FitArg::Resize => Fit::Resize,
        }),
        limit: a.limit,
        config,
        relation_check: match a.check_relation {
            None => None,
            Some(DetectorArg::Shapes) => Some(RelationCheckKind::Shapes),
            Some(DetectorArg::Mask2former) => Some(RelationCheckKind::Mask2Former(
                a.detector_weights.clone().ok_or_else(|| {
                    anyhow::anyhow!(
                        "--check-relation mask2former needs --detector-weights FILE (the checkpoint)"
                    )
                })?,
            )),
        },
        detector_device: a
            .detector_device
            .as_deref()
            .map(|d| device_for("--detector-device", Some(d)))
            .transpose()?,
        out: a.out.clone(),
        shard_size: a.shard_size,
        // Several devices: one worker each unless told otherwise.
        workers: a.workers.unwrap_or_else(|| match models.len() {
            1 => default_workers(),
            n => n,
        }),
    };
    let bar = image_bar(global, "build");
    let replicas = Replicas::new(&models).expect("at least one model is loaded");
    let report = run_build(replicas, &job, &mut |done, total, s| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(progress_message(s));
    })?;
    bar.finish_and_clear();
    if report.left_out.total() > 0 {
        eprintln!(
            "left out of {} records:\n{}",
            report.records_seen,
            report.left_out.summary()
        );
    }
    eprintln!("{}", serde_json::to_string_pretty(&report.samples)?);
    eprintln!(
        "summary: {}",
        a.out.join(l2s_steer::build::BUILD_SUMMARY_FILE).display()
    );
    Ok(())
}
