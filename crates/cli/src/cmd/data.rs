//! `l2s data build`: the classifier's training data by dual inversion of annotated images;
//! `l2s data merge`: the parts of a build split with `--shard` joined into one dataset.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use l2s_steer::build::{
    build, open_dataset, progress_message, read_annotated, shapes_relation_detector, BuildConfig,
    DropRule, ReconstructionCheck,
};

use crate::cmd::score::DetectorArg;
use l2s_steer::dataset::{merge, ShardSpec};

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
    /// When an image's true-prompt sample is dropped: `twins` drops its wrong-prompt sample too
    /// without inverting it (the paper's rule), `per-sample` judges each sample on its own
    #[arg(long, value_enum, default_value = "twins")]
    drop: DropArg,
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
    /// Build only part i of n (1-based, e.g. 2/4): images i−1, i−1+n, i−1+2n, …, for
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
enum DropArg {
    Twins,
    PerSample,
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
    let defaults = BuildConfig::for_model(model, steps);
    let cfg = BuildConfig {
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
        ..defaults
    };
    let detector = a
        .check_relation
        .map(|DetectorArg::Shapes| shapes_relation_detector(&images))
        .transpose()?;
    let check = detector.as_ref().map(|d| ReconstructionCheck {
        detector: d,
        min_score: l2s_eval::SCORE_THRESHOLD,
    });
    let check_name = a.check_relation.map(|_| "shapes");
    let mut writer = open_dataset(model, &images, &cfg, check_name, &a.out, a.shard_size)?;
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
