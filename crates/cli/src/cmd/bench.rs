//! `l2s bench shapes`: the Learn-to-Steer experiment on the shapes world
//! ([`l2s_steer::bench::run_shapes_bench`]); this module parses its flags and shows progress.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use l2s_steer::bench::{run_shapes_bench, BenchProgress, ShapesBench, StageBar};
use l2s_steer::Augment;

use crate::common::{
    default_workers, load_model, say, ArchitectureArg, Global, MapLayoutArg, ModelArgs,
};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// The Learn-to-Steer experiment on the shapes world (resumable; stages are cached in --work)
    Shapes(ShapesArgs),
}

#[derive(clap::Args)]
pub struct ShapesArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Working folder: images/, data-dual/, data-single/, clf-dual/, clf-single/, eval-METHOD/ (GenEval layout, scored), results.*
    #[arg(long, default_value = "bench-shapes")]
    work: PathBuf,
    /// Annotated training images to render, two objects each (only those whose pair has one
    /// unambiguous relation are used)
    #[arg(long, default_value_t = 600)]
    train_images: usize,
    /// Keep a training sample only when the exact detector still finds both objects in the true
    /// relation in its reconstruction (`false`: the PSNR threshold alone, as in the paper)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    check_relation: bool,
    /// Sampling steps everywhere (data building and generation). Fewer than the built-in model's
    /// own 50, so that the whole experiment fits in half an hour on two cores
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Fixed-point iterations per inversion step (more do not reconstruct this model's images
    /// better, and each costs a model pass per step)
    #[arg(long, default_value_t = 0)]
    fixed_point: usize,
    /// Drop training samples whose reconstruction is below this PSNR (dB). Lower than the paper's
    /// 19.5–20 dB: on 32×32 images a one-pixel shift of an edge already costs several dB, and the
    /// relation check (on by default) is the stricter filter here
    #[arg(long, default_value_t = 10.0)]
    min_psnr: f64,
    /// Held-out prompts "a {A} {relation} a {B}" (24 × 4 seeds keeps the whole experiment within
    /// about half an hour on two cores)
    #[arg(long, default_value_t = 24)]
    prompts: usize,
    /// Seeds per prompt
    #[arg(long, default_value_t = 4)]
    seeds: u64,
    /// Classifier-free guidance of generation [default: the model's own, 1.25 for the built-in model]
    #[arg(long, value_name = "SCALE")]
    guidance: Option<f64>,
    /// Methods to evaluate (comma-separated): base, centroid, attend-excite, l2s-single, l2s-dual
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "base,centroid,attend-excite,l2s-single,l2s-dual"
    )]
    methods: Vec<String>,
    /// Gradient iterations per steered step, for every steering method (the paper's 16 costs
    /// ~20 s per image here)
    #[arg(long, default_value_t = 3)]
    steer_iterations: usize,
    /// Steer during the first N steps (default: half of --steps)
    #[arg(long)]
    steer_steps: Option<usize>,
    /// Step size of the learned methods: the RMS of each latent update (with --raw-gradient: α
    /// times the raw gradient, the paper's rule with α = 5). The default equals the centroid
    /// baseline's, so the two differ only in their loss
    #[arg(long, default_value_t = 0.1)]
    step_size: f64,
    /// Learned methods step along the raw gradient (the paper's rule) instead of the RMS-normalised one
    #[arg(long)]
    raw_gradient: bool,
    /// Learned methods stop a step's iterations once the classifier's loss is below this, i.e.
    /// once it is ~90 % sure of the wanted relation. Each further step pushes the latent away from
    /// what the model can draw; the paper's thresholds (~1e-5, `--stop-below 1e-5`) run every
    /// iteration, which costs this model a tenth of its objects
    #[arg(long, value_name = "LOSS", default_value_t = 0.1)]
    stop_below: f64,
    /// Images generated or inverted at once, each on its own thread [default: one per core]
    #[arg(long)]
    workers: Option<usize>,
    /// Classifier training epochs (early stopping may end sooner)
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Classifier learning rate (the paper's 1e-4 is made for thousands of samples)
    #[arg(long, default_value_t = 1e-3)]
    classifier_lr: f64,
    /// Classifier early-stopping patience in epochs
    #[arg(long, default_value_t = 8)]
    patience: usize,
    /// Label-preserving symmetries of the classifier's training maps: none, mirror or dihedral
    /// (the shapes world has no preferred up, so all 16 apply)
    #[arg(long, default_value = "dihedral")]
    augment: Augment,
    /// Classifier architecture: legacy (learns from this experiment's few hundred samples) or
    /// authors (the published one; see BENCHMARKS.md for both on this data)
    #[arg(long, value_enum, default_value = "legacy")]
    architecture: ArchitectureArg,
    /// Multiply the classifiers' maps by S·S on entry (see `l2s train --scale-maps`)
    #[arg(long)]
    scale_maps: bool,
    /// How training and steering maps become classifier channels: ours or published
    #[arg(long, value_enum, default_value = "ours")]
    map_layout: MapLayoutArg,
}

impl ShapesArgs {
    fn settings(&self) -> ShapesBench {
        ShapesBench {
            work: self.work.clone(),
            train_images: self.train_images,
            check_relation: self.check_relation,
            steps: self.steps,
            fixed_point: self.fixed_point,
            min_psnr: self.min_psnr,
            prompts: self.prompts,
            seeds: self.seeds,
            guidance: self.guidance,
            methods: self.methods.clone(),
            steer_iterations: self.steer_iterations,
            steer_steps: self.steer_steps,
            step_size: self.step_size,
            raw_gradient: self.raw_gradient,
            stop_below: self.stop_below,
            workers: self.workers.unwrap_or_else(default_workers),
            epochs: self.epochs,
            classifier_lr: self.classifier_lr,
            patience: self.patience,
            augment: self.augment,
            architecture: self.architecture.with_scaling(self.scale_maps),
            map_layout: self.map_layout.into(),
        }
    }
}

struct Bar(ProgressBar);

impl StageBar for Bar {
    fn set_position(&self, done: u64) {
        self.0.set_position(done);
    }
    fn inc(&self, by: u64) {
        self.0.inc(by);
    }
    fn set_message(&self, message: String) {
        self.0.set_message(message);
    }
    fn finish_and_clear(&self) {
        self.0.finish_and_clear();
    }
}

/// One bar per stage (two at once while the classifiers train side by side).
struct Bars {
    quiet: bool,
    multi: MultiProgress,
}

impl BenchProgress for Bars {
    fn stage(&self, name: &str, total: usize) -> Box<dyn StageBar> {
        if self.quiet {
            return Box::new(Bar(ProgressBar::hidden()));
        }
        let b = self.multi.add(ProgressBar::new(total as u64));
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{name:>12} [{{bar:32}}] {{pos}}/{{len}} {{elapsed_precise}} (eta {{eta}}) {{msg}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Box::new(Bar(b))
    }
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let Command::Shapes(a) = args.command;
    let (model, model_name) = load_model(&a.model)?;
    let bars = Bars {
        quiet: global.quiet,
        multi: MultiProgress::new(),
    };
    let results = run_shapes_bench(&model, &model_name, &a.settings(), &bars)?;
    say(&format!("{}\n", results.table));
    Ok(())
}
