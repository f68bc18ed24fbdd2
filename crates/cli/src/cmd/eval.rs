//! `l2s eval`: generate every prompt's images into GenEval's folder layout, plain or steered.
//! Resumable (images already on disk are kept) and splittable across machines (`--shard`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use l2s_eval::layout::Seeding;
use l2s_eval::prompts::{
    describe_unsupported, multi_relation_prompts, position_prompts, read_prompt_file,
    MultiRelationSpec, SpatialPrompt, COCO_CLASSES, SHAPES_CLASSES,
};
use l2s_steer::evaluate::{run_eval, EvalRun};

use crate::common::{
    default_workers, load_model, say, warn_all, Global, ModelArgs, SampleArgs, SteerArgs,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClassesArg {
    /// The shapes classes for the built-in shapes model, GenEval's 80 COCO classes otherwise
    Auto,
    /// GenEval's 80 COCO class names
    Coco,
    /// The eight shapes-world classes
    Shapes,
}

#[derive(clap::Args)]
#[command(
    after_help = "Output (GenEval's layout): DIR/NNNNN/metadata.jsonl and DIR/NNNNN/samples/SSSS.png, plus \
DIR/prompts.jsonl (every prompt of the run) and DIR/run.json (the settings). Image SSSS of prompt NNNNN uses seed \
--seed + NNNNN × --images-per-prompt + SSSS, the same for every method, so runs compare image by image. Images \
already on disk are kept, so an interrupted run continues where it stopped; rerunning into a folder made with \
other settings is refused. --shard i/n (1-based) takes prompts i-1, i-1+n, i-1+2n, …: run the n shards \
anywhere into folders of the same name, then copy them together. Score with `l2s score DIR`."
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// GenEval metadata JSONL: spatial lines are used; lines of other tags are listed and skipped
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "generate_prompts",
        required_unless_present = "generate_prompts"
    )]
    pub prompts: Option<PathBuf>,
    /// Generate N GenEval-style prompts "a photo of {a/an A} {rel} {a/an B}" instead
    #[arg(long, value_name = "N")]
    pub generate_prompts: Option<usize>,
    /// Class list of generated prompts
    #[arg(long, value_enum, default_value = "auto")]
    pub classes: ClassesArg,
    /// Generate prompts with 2–5 objects and 1–3 relations instead of two objects and one relation
    #[arg(long)]
    pub multi: bool,
    /// Seed of the prompt generator
    #[arg(long, default_value_t = 0)]
    pub prompt_seed: u64,
    /// Images per prompt (GenEval: 4)
    #[arg(long, default_value_t = 4)]
    pub images_per_prompt: usize,
    #[command(flatten)]
    pub sampling: SampleArgs,
    #[command(flatten)]
    pub steer: SteerArgs,
    /// Output folder (created if needed)
    #[arg(long)]
    pub out: PathBuf,
    /// Generate only shard i of n (1-based), e.g. 2/4
    #[arg(long, value_name = "I/N")]
    pub shard: Option<l2s_steer::ShardSpec>,
    /// Base seed of the images
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images generated at once, each on its own thread (default: one per core)
    #[arg(long)]
    pub workers: Option<usize>,
}

/// The prompts and a description of where they came from.
fn prompt_set(args: &Args, model_name: &str) -> Result<(Vec<SpatialPrompt>, String)> {
    if let Some(path) = &args.prompts {
        let file = read_prompt_file(path)?;
        for line in describe_unsupported(&path.display().to_string(), &file.unsupported) {
            eprintln!("note: {line}");
        }
        if file.prompts.is_empty() {
            bail!(
                "--prompts {}: no spatial (\"position\" or \"multi_position\") lines",
                path.display()
            );
        }
        let source = format!("file {}", path.display());
        return Ok((file.prompts.into_iter().map(|(_, p)| p).collect(), source));
    }
    let n = args.generate_prompts.unwrap_or(0);
    if n == 0 {
        bail!("--generate-prompts 0: expected at least 1");
    }
    let shapes = match args.classes {
        ClassesArg::Shapes => true,
        ClassesArg::Coco => false,
        ClassesArg::Auto => model_name == l2s_shapes_model::embedded::NAME,
    };
    let (classes, cname): (&[&str], &str) = if shapes {
        (&SHAPES_CLASSES, "shapes")
    } else {
        (&COCO_CLASSES, "coco")
    };
    let (prompts, kind) = if args.multi {
        (
            multi_relation_prompts(n, classes, args.prompt_seed, MultiRelationSpec::default())?,
            "multi-relation",
        )
    } else {
        (position_prompts(n, classes, args.prompt_seed)?, "position")
    };
    Ok((
        prompts,
        format!(
            "generated: {n} {kind} prompts over the {cname} classes, prompt seed {}",
            args.prompt_seed
        ),
    ))
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    if args.images_per_prompt == 0 {
        bail!("--images-per-prompt 0: expected at least 1");
    }
    let shard = args.shard.unwrap_or_default();
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out {}: exists and is not a folder", args.out.display());
    }
    let (model, model_name) = load_model(&args.model)?;
    let (steps, guidance) = args.sampling.resolve_steered(&model, &args.steer)?;
    let (prompts, source) = prompt_set(&args, &model_name)?;
    let method = args.steer.method(&model, steps)?;
    let run = EvalRun {
        model: &model,
        model_name: model_name.clone(),
        method: method.as_ref(),
        steer: args.steer.steer.clone(),
        steps,
        guidance,
        negative_prompt: args.sampling.negative_prompt.clone(),
        seed: args.seed,
        seeding: Seeding::PerImage,
        images_per_prompt: args.images_per_prompt,
        width: args.sampling.width,
        height: args.sampling.height,
        shard,
        workers: args.workers.unwrap_or_else(default_workers),
    };
    let bar = if global.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:32}] {pos}/{len} images {elapsed_precise} (eta {eta}) {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(
        method
            .as_ref()
            .map_or("base".to_string(), |m| m.name.clone()),
    );
    let outcome = run_eval(
        &run,
        &prompts,
        &source,
        &args.out,
        &mut |done, total, prompt| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(prompt.to_string());
        },
    )?;
    bar.finish_and_clear();
    warn_all(&outcome.warnings);
    let (made, present, ipp) = (outcome.made, outcome.present, args.images_per_prompt);
    let mine_len = outcome.prompts;
    let shard_note = if !shard.is_all() {
        format!(
            " (shard {shard}: {} of {} prompts)",
            mine_len,
            prompts.len()
        )
    } else {
        String::new()
    };
    say(&format!(
        "{}: {made} images generated, {present} already present, {} prompts × {ipp}{shard_note}; score with: l2s score {}\n",
        args.out.display(),
        mine_len,
        args.out.display()
    ));
    Ok(())
}
