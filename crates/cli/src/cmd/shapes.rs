//! `l2s shapes`: the synthetic shapes world — render datasets, train the shapes model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use l2s_shapes::RenderConfig;
use l2s_shapes_model::{TrainOptions, Trainer};

use crate::common::{Global, OutFolder};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Render scenes of coloured shapes: PNGs, COCO-style annotations.json, relations.jsonl
    Render {
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image side in pixels
        #[arg(long, default_value_t = 32)]
        size: u32,
        /// Fewest objects per image
        #[arg(long, default_value_t = 1)]
        min_objects: usize,
        /// Most objects per image (classes never repeat within an image)
        #[arg(long, default_value_t = 3)]
        max_objects: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train the shapes text-to-image model from scratch (resumes from RUN_DIR's latest checkpoint)
    Train {
        /// Run folder: checkpoints/, loss.png and the exported model/ (diffusers layout)
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 6000)]
        steps: usize,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0.995)]
        ema: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Min-SNR-γ loss weighting; 0 (the default) weighs every noise level's v-loss equally,
        /// which keeps the high-noise steps, where only the caption tells what to draw, in the loss
        #[arg(long, default_value_t = 0.0)]
        min_snr_gamma: f64,
        /// Stop (after saving) when this many minutes of training have passed in this call
        #[arg(long)]
        minutes: Option<f64>,
        #[arg(long, default_value_t = 250)]
        checkpoint_every: usize,
        /// Start from this shapes-model folder's weights (`shapes` = the built-in model) instead of
        /// from scratch; only for a new run folder
        #[arg(long)]
        init_from: Option<String>,
    },
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    match args.command {
        Command::Render {
            count,
            seed,
            size,
            min_objects,
            max_objects,
            out,
        } => {
            let cfg = RenderConfig {
                min_objects,
                max_objects,
                ..RenderConfig::with_size(size)
            };
            let ds = l2s_shapes::generate(&out, &cfg, count, seed)
                .with_context(|| format!("rendering into {}", out.display()))?;
            eprintln!("rendered {} images into {}", ds.images.len(), out.display());
            Ok(())
        }
        Command::Train {
            out,
            steps,
            batch,
            lr,
            ema,
            seed,
            min_snr_gamma,
            minutes,
            checkpoint_every,
            init_from,
        } => {
            let device = candle_core::Device::Cpu;
            let folder = OutFolder::open(&out, "--out")?;
            let trainer = Trainer::with_seed(&out, &device, seed)?;
            if let Some(from) = init_from {
                let dir = if from == l2s_shapes_model::embedded::NAME {
                    l2s_shapes_model::embedded::model_dir()?
                } else {
                    PathBuf::from(&from)
                };
                trainer.init_from_model(&dir)?;
                eprintln!("starting from the weights in {}", dir.display());
            }
            eprintln!(
                "shapes model: {} parameters; run folder {}",
                trainer.parameter_count(),
                out.display()
            );
            let min_snr_gamma = (min_snr_gamma > 0.0).then_some(min_snr_gamma);
            let opts = TrainOptions {
                steps,
                batch,
                lr,
                ema_decay: ema,
                seed,
                checkpoint_every,
                min_snr_gamma,
                ..Default::default()
            };
            let bar = if global.quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(steps as u64)
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "train [{bar:32}] {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let summary = trainer.run(&opts, minutes.map(|m| m * 60.0), |p| {
                bar.set_position(p.step as u64);
                bar.set_message(format!("loss {:.4}", p.loss));
            })?;
            bar.finish_and_clear();
            eprintln!(
                "trained to step {} ({:.1} min in all), mean loss of the last 100 steps {:.4}; model in {}",
                summary.steps,
                summary.seconds / 60.0,
                summary.final_loss,
                summary.model_dir.display()
            );
            folder.finish();
            Ok(())
        }
    }
}
