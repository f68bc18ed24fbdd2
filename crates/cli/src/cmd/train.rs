//! `l2s train`: train a relation classifier on a dataset from `l2s data build` (or on several
//! parts of one build, read as their merge would be).

use std::path::PathBuf;

use anyhow::Result;
use l2s_steer::classifier::Preset;
use l2s_steer::train::{train_on, TrainConfig};
use l2s_steer::Augment;
use l2s_steer::Dataset;

use crate::common::{ArchitectureArg, Global, OutFolder};

#[derive(clap::Args)]
pub struct Args {
    /// Dataset folder written by `l2s data build`; repeat it for the parts of a build split with
    /// --shard, which are trained on as their `l2s data merge` would be: the folders must agree
    /// on the model, the maps and their layout, the relations and the recorded steps (the first
    /// differing field is named), and a sample found in several is used once
    #[arg(long, required = true, value_name = "DIR")]
    data: Vec<PathBuf>,
    /// Output folder: classifier.safetensors + classifier.json
    #[arg(long)]
    out: PathBuf,
    /// Size preset: sd or flux
    #[arg(long, default_value = "sd")]
    preset: String,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    batch: Option<usize>,
    /// Stop after this many epochs without a better validation loss
    #[arg(long)]
    patience: Option<usize>,
    /// Label-preserving symmetries drawn per example: none (the paper), mirror (left–right
    /// mirror and subject/object swap) or dihedral (also vertical mirror and transpose)
    #[arg(long, default_value = "none")]
    augment: Augment,
    /// Classifier architecture: `authors` (the published Learn-to-Steer classifier) or `legacy`
    /// (maps scaled by S·S, GELU, a final LayerNorm; see BENCHMARKS.md for both measured)
    #[arg(long, value_enum, default_value = "authors")]
    architecture: ArchitectureArg,
    /// Multiply the maps by S·S on entry (a map summing to 1 then has mean 1): the published
    /// architecture's one departure that lets it learn from a few hundred samples (measured in
    /// BENCHMARKS.md); `legacy` always scales
    #[arg(long)]
    scale_maps: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let preset = Preset::parse(&args.preset)
        .ok_or_else(|| anyhow::anyhow!("--preset {}: expected sd or flux", args.preset))?;
    let mut cfg = TrainConfig::for_preset(preset);
    if let Some(e) = args.epochs {
        cfg.max_epochs = e;
    }
    if let Some(lr) = args.lr {
        cfg.lr = lr;
    }
    if let Some(b) = args.batch {
        cfg.batch_size = b;
    }
    if let Some(p) = args.patience {
        cfg.early_stop_patience = p;
    }
    cfg.augment = args.augment;
    cfg.architecture = args.architecture.with_scaling(args.scale_maps);
    cfg.seed = args.seed;
    let quiet = global.quiet;
    let out = OutFolder::open(&args.out, "--out")?;
    let data = Dataset::open_many(&args.data)?;
    if data.duplicates() > 0 && !quiet {
        eprintln!(
            "{} samples found in more than one --data folder are used once",
            data.duplicates()
        );
    }
    let report = train_on(
        &data,
        &args.out,
        &cfg,
        &candle_core::Device::Cpu,
        &mut |e| {
            if !quiet {
                eprintln!("{}", serde_json::to_string(e).unwrap_or_default());
            }
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&report.meta)?);
    out.finish();
    Ok(())
}
