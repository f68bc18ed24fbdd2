//! `l2s eval`: generate every prompt's images into GenEval's folder layout, plain or steered.
//! Resumable (images already on disk are kept) and splittable across machines (`--shard`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use l2s_diffusion::NoHook;
use l2s_eval::layout::{
    image_seed, prompt_dir, read_run_info, sample_path, RunInfo, KEY_METHOD, KEY_STEER_LOSS,
    METADATA_FILE, PROMPTS_FILE, RUN_FILE, RUN_FORMAT,
};
use l2s_eval::prompts::{
    describe_unsupported, multi_relation_prompts, position_prompts, read_prompt_file, to_jsonl,
    MultiRelationSpec, SpatialPrompt, COCO_CLASSES, SHAPES_CLASSES,
};
use l2s_generate::{generate, generation_metadata, write_atomic, write_png, GenerateRequest};
use l2s_steer::relations::RelationTriplet;
use l2s_steer::steering::{generate_steered, SteerTriplet};

use crate::common::{load_model, say, warn_all, Global, ModelArgs, SteerArgs};

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
    pub steer: SteerArgs,
    /// Output folder (created if needed)
    #[arg(long)]
    pub out: PathBuf,
    /// Generate only shard i of n (1-based), e.g. 2/4
    #[arg(long, value_name = "I/N")]
    pub shard: Option<l2s_steer::ShardSpec>,
    /// Sampling steps (default: the model's own)
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale: classifier-free for Stable Diffusion, the guidance input for FLUX.1-dev
    /// (default: the model's own)
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Base seed of the images
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image width in pixels (default: the model's native size)
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size)
    #[arg(long)]
    pub height: Option<usize>,
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

/// Writes `path` with `text`, or checks that it already holds exactly that.
fn write_or_check(path: &Path, text: &str, what: &str) -> Result<()> {
    match std::fs::read_to_string(path) {
        Ok(old) if old == text => Ok(()),
        Ok(_) => bail!(
            "{} already holds a different {what}: this folder belongs to another run (use a new --out, or delete the folder)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    if args.images_per_prompt == 0 {
        bail!("--images-per-prompt 0: expected at least 1");
    }
    if args.steps == Some(0) {
        bail!("--steps 0: expected at least 1");
    }
    let (shard, shards) = match &args.shard {
        Some(s) => (s.index() - 1, s.count()),
        None => (0, 1),
    };
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out {}: exists and is not a folder", args.out.display());
    }
    let (model, model_name) = load_model(&args.model)?;
    let defaults = model.sampling_defaults();
    let (steps, guidance) = (
        args.steps.unwrap_or(defaults.steps),
        args.guidance.unwrap_or(defaults.guidance),
    );
    let (prompts, source) = prompt_set(&args, &model_name)?;
    let method = args.steer.method(&model, steps)?;
    let method_label = method
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_else(|| "base".into());

    // Steering targets of every prompt of this shard, checked before any image is made.
    let mine: Vec<usize> = (0..prompts.len()).filter(|i| i % shards == shard).collect();
    let mut triplets: Vec<Option<Vec<SteerTriplet>>> = Vec::with_capacity(mine.len());
    for &i in &mine {
        let p = &prompts[i];
        triplets.push(match &method {
            None => None,
            Some(m) => {
                let rts: Vec<RelationTriplet> = p
                    .triplets()
                    .into_iter()
                    .map(|t| RelationTriplet::new(t.a, t.relation, t.b))
                    .collect();
                Some(
                    SteerTriplet::for_prompt(
                        &rts,
                        &|word| Ok(model.word_positions(&p.prompt, word)?),
                        &|r| m.label(r),
                    )
                    .with_context(|| format!("prompt {i} {:?}: cannot steer", p.prompt))?,
                )
            }
        });
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create the folder", args.out.display()))?;
    let info = RunInfo {
        format: RUN_FORMAT.into(),
        method: method_label.clone(),
        steer: args.steer.steer.clone(),
        model: model_name.clone(),
        steps,
        guidance,
        seed: args.seed,
        images_per_prompt: args.images_per_prompt,
        prompts: prompts.len(),
        prompt_source: source,
        width: args.width,
        height: args.height,
        steering: method
            .as_ref()
            .map(|m| serde_json::to_value(&m.config))
            .transpose()?,
    };
    match read_run_info(&args.out) {
        None => {
            let text = serde_json::to_string_pretty(&info)? + "\n";
            write_atomic(&args.out.join(RUN_FILE), text.as_bytes())?;
        }
        Some(Ok(old)) => {
            let diff = old.differences(&info);
            if !diff.is_empty() {
                bail!(
                    "{} was made with other settings ({}); use a new --out to start another run",
                    args.out.join(RUN_FILE).display(),
                    diff.join("; ")
                );
            }
        }
        Some(Err(e)) => bail!("{e}: cannot tell whether the folder belongs to this run"),
    }
    write_or_check(
        &args.out.join(PROMPTS_FILE),
        &to_jsonl(&prompts),
        "prompt list",
    )?;

    let ipp = args.images_per_prompt;
    let total = mine.len() * ipp;
    let present = mine
        .iter()
        .flat_map(|&i| (0..ipp).map(move |j| (i, j)))
        .filter(|&(i, j)| sample_path(&args.out, i, j).exists())
        .count();
    let bar = if global.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:32}] {pos}/{len} images {elapsed_precise} (eta {eta}) {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(method_label.clone());
    bar.set_position(present as u64);
    let mut made = 0usize;
    let mut warned = false;
    for (k, &i) in mine.iter().enumerate() {
        let p = &prompts[i];
        let dir = prompt_dir(&args.out, i);
        std::fs::create_dir_all(dir.join(l2s_eval::layout::SAMPLES_DIR))
            .with_context(|| format!("creating {}", dir.display()))?;
        write_or_check(
            &dir.join(METADATA_FILE),
            &(p.metadata_line() + "\n"),
            "prompt",
        )?;
        for j in 0..ipp {
            let path = sample_path(&args.out, i, j);
            if path.exists() {
                continue;
            }
            bar.set_message(format!("#{i:05} {}", p.prompt));
            let req = GenerateRequest {
                seed: image_seed(args.seed, i, j, ipp),
                steps,
                guidance,
                width: args.width,
                height: args.height,
                ..GenerateRequest::new(p.prompt.clone())
            };
            let mut extra = vec![
                (KEY_METHOD.to_string(), method_label.clone()),
                ("steer".to_string(), args.steer.steer.clone()),
                ("prompt_index".to_string(), i.to_string()),
                ("sample".to_string(), j.to_string()),
                ("geneval_metadata".to_string(), p.metadata_line()),
            ];
            let (image, w, h) = match (&method, &triplets[k]) {
                (Some(m), Some(ts)) => {
                    let loss = m.loss().context("steering method without a loss")?;
                    let s = generate_steered(&model, &req, ts, loss, &m.config, &mut |_| {})
                        .with_context(|| format!("generating {}", path.display()))?;
                    extra.push((
                        "steer_config".to_string(),
                        serde_json::to_string(&m.config)?,
                    ));
                    if let Some(l) = s.report.final_loss() {
                        extra.push((KEY_STEER_LOSS.to_string(), format!("{l:.6}")));
                    }
                    extra.push((
                        "steer_iterations".to_string(),
                        s.report.iterations.to_string(),
                    ));
                    (s.generated.image, s.generated.width, s.generated.height)
                }
                _ => {
                    let g = generate(&model, &req, &mut NoHook, &mut |_| {})
                        .with_context(|| format!("generating {}", path.display()))?;
                    if !warned {
                        warn_all(&g.warnings);
                        warned = true;
                    }
                    (g.image, g.width, g.height)
                }
            };
            let meta = generation_metadata(&req, &model_name, model.sampler_name(), w, h, &extra);
            write_png(&path, &image, &meta)
                .with_context(|| format!("writing {}", path.display()))?;
            made += 1;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let shard_note = if shards > 1 {
        format!(
            " (shard {}/{shards}: {} of {} prompts)",
            shard + 1,
            mine.len(),
            prompts.len()
        )
    } else {
        String::new()
    };
    say(&format!(
        "{}: {made} images generated, {present} already present, {} prompts × {ipp}{shard_note}; score with: l2s score {}\n",
        args.out.display(),
        mine.len(),
        args.out.display()
    ));
    Ok(())
}
