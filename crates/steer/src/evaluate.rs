//! The one evaluation harness: every prompt's images, plain or steered, generated into GenEval's
//! folder layout (`NNNNN/metadata.jsonl`, `NNNNN/samples/SSSS.png`, `prompts.jsonl`, `run.json`)
//! — resumable (images on disk are kept), shardable, several images at once. `l2s eval` runs it;
//! `l2s bench shapes` runs it per method; `l2s score` / [`l2s_eval::sources::score_folder`] judge
//! what it wrote and `l2s report` shows it.

use std::path::Path;
use std::time::Instant;

use crate::error::{bail, Context, Result};
use l2s_diffusion::NoHook;
use l2s_eval::layout::{
    prompt_dir, read_run_info, sample_path, RunInfo, Seeding, KEY_METHOD, KEY_STEER_LOSS,
    METADATA_FILE, PROMPTS_FILE, RUN_FILE, RUN_FORMAT, SAMPLES_DIR,
};
use l2s_eval::prompts::to_jsonl;
use l2s_eval::tasks::TaskPrompt;
use l2s_generate::{generate, generation_metadata, write_atomic, write_png, GenerateRequest};
use l2s_models::Pipeline;

use crate::method::Method;
use crate::steering::{generate_steered, SteerGoal};
use crate::workers::run_ordered;
use l2s_eval::Triplet;

/// The settings of one run.
pub struct EvalRun<'a> {
    pub model: &'a Pipeline,
    /// The model as the user named it (recorded in run.json and every PNG).
    pub model_name: String,
    /// `None`: the plain model.
    pub method: Option<&'a Method>,
    /// The steering argument as given (recorded).
    pub steer: String,
    pub steps: usize,
    pub guidance: f64,
    /// Classifier-free guidance's unconditional prompt (Stable Diffusion; usually empty).
    pub negative_prompt: String,
    pub seed: u64,
    pub seeding: Seeding,
    pub images_per_prompt: usize,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// This machine's part of the prompts.
    pub shard: crate::ShardSpec,
    /// Images generated at once, each on its own thread (the model is shared, read-only).
    pub workers: usize,
}

impl EvalRun<'_> {
    /// The method's label in records ("base" for the plain model).
    pub fn label(&self) -> String {
        self.method
            .map(|m| m.name.clone())
            .unwrap_or_else(|| "base".into())
    }

    /// The `run.json` this run writes, for `prompts` prompts from `source`.
    pub fn run_info(&self, prompts: usize, source: &str) -> Result<RunInfo> {
        Ok(RunInfo {
            format: RUN_FORMAT.into(),
            method: self.label(),
            steer: self.steer.clone(),
            model: self.model_name.clone(),
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            images_per_prompt: self.images_per_prompt,
            prompts,
            prompt_source: source.to_string(),
            width: self.width,
            height: self.height,
            steering: self
                .method
                .map(|m| serde_json::to_value(&m.config))
                .transpose()?,
            seeding: self.seeding,
            negative_prompt: self.negative_prompt.clone(),
        })
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct EvalOutcome {
    /// Prompts of this shard.
    pub prompts: usize,
    pub made: usize,
    /// Images already on disk, kept.
    pub present: usize,
    /// Seconds of generation summed over the images made (per image, not wall time).
    pub seconds: f64,
    /// The model's notes on the prompts (truncation), once each.
    pub warnings: Vec<String>,
    /// Prompts of this shard a steered run sampled plainly: their task names no relation
    /// (GenEval's single_object, two_object, counting, colors and color_attr).
    pub unsteered: usize,
}

/// Writes `path` with `text`, or checks that it already holds exactly that.
fn write_or_check(path: &Path, text: &str, what: &str) -> Result<()> {
    match std::fs::read_to_string(path) {
        Ok(old) if old == text => Ok(()),
        Ok(_) => bail!(
            "{} already holds a different {what}: this folder belongs to another run (use a new output folder, or delete it)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// One image to make.
struct Job {
    k: usize,
    index: usize,
    sample: usize,
}

/// Generates the run's missing images into `out`. `source` says where the prompts came from
/// (recorded). A steered run steers the prompts that name a relation and samples the others
/// (GenEval's other tasks) as the plain model does, so one run covers a whole GenEval file.
/// `progress(done, total, prompt)` after each image; `done` counts the images already present.
pub fn run_eval(
    run: &EvalRun,
    prompts: &[TaskPrompt],
    source: &str,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<EvalOutcome> {
    if run.images_per_prompt == 0 || run.steps == 0 {
        bail!("an evaluation needs at least one image per prompt and one step");
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.prompt.contains('\0') {
            bail!(
                "prompt {i} {:?}: contains a NUL character, which the images' metadata (PNG text) \
                 cannot hold",
                p.prompt
            );
        }
    }
    let model = run.model;
    let mine: Vec<usize> = (0..prompts.len())
        .filter(|&i| run.shard.owns_index(i))
        .collect();
    // Steering targets of every prompt of this shard, checked before any image is made.
    let mut triplets: Vec<Option<Vec<SteerGoal>>> = Vec::with_capacity(mine.len());
    for &i in &mine {
        let p = &prompts[i];
        let rts: Vec<Triplet> = p.triplets();
        triplets.push(match run.method {
            Some(m) if !rts.is_empty() => Some(
                SteerGoal::for_prompt(
                    &rts,
                    &|word| Ok(model.word_positions(&p.prompt, word)?),
                    &|r| m.label(r),
                )
                .with_context(|| format!("prompt {i} {:?}: cannot steer", p.prompt))?,
            ),
            _ => None,
        });
    }

    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create the folder", out.display()))?;
    let label = run.label();
    let info = run.run_info(prompts.len(), source)?;
    match read_run_info(out) {
        None => {
            let text = serde_json::to_string_pretty(&info)? + "\n";
            write_atomic(&out.join(RUN_FILE), text.as_bytes())?;
        }
        Some(Ok(old)) => {
            let diff = old.differences(&info);
            if !diff.is_empty() {
                bail!(
                    "{} was made with other settings ({}); use a new output folder to start another run",
                    out.join(RUN_FILE).display(),
                    diff.join("; ")
                );
            }
        }
        Some(Err(e)) => bail!("{e}: cannot tell whether the folder belongs to this run"),
    }
    write_or_check(&out.join(PROMPTS_FILE), &to_jsonl(prompts), "prompt list")?;

    let ipp = run.images_per_prompt;
    let mut jobs = Vec::new();
    let mut present = 0;
    let mut damaged = Vec::new();
    for (k, &i) in mine.iter().enumerate() {
        let dir = prompt_dir(out, i);
        std::fs::create_dir_all(dir.join(SAMPLES_DIR))
            .with_context(|| format!("creating {}", dir.display()))?;
        write_or_check(
            &dir.join(METADATA_FILE),
            &(prompts[i].metadata_line() + "\n"),
            "prompt",
        )?;
        for j in 0..ipp {
            let path = sample_path(out, i, j);
            let whole = path.exists()
                && l2s_files::read_capped(&path, l2s_files::MAX_IMAGE_BYTES)
                    .is_ok_and(|bytes| image::load_from_memory(&bytes).is_ok());
            if whole {
                present += 1;
            } else {
                if path.exists() {
                    // Cut short or damaged (a copy interrupted, a full disk): made again.
                    damaged.push(format!(
                        "{}: not a readable PNG; generating it again",
                        path.display()
                    ));
                }
                jobs.push(Job {
                    k,
                    index: i,
                    sample: j,
                });
            }
        }
    }
    let total = mine.len() * ipp;
    progress(present, total, "");

    let one = |job: &Job| -> Result<(f64, Vec<String>)> {
        let (i, j) = (job.index, job.sample);
        let p = &prompts[i];
        let path = sample_path(out, i, j);
        let req = GenerateRequest {
            seed: run.seeding.seed(run.seed, i, j, ipp),
            steps: run.steps,
            guidance: run.guidance,
            negative_prompt: run.negative_prompt.clone(),
            width: run.width,
            height: run.height,
            ..GenerateRequest::new(p.prompt.clone())
        };
        let mut extra = vec![
            (KEY_METHOD.to_string(), label.clone()),
            ("steer".to_string(), run.steer.clone()),
            ("prompt_index".to_string(), i.to_string()),
            ("sample".to_string(), j.to_string()),
            ("geneval_metadata".to_string(), p.metadata_line()),
        ];
        let start = Instant::now();
        let generated = match (run.method, &triplets[job.k]) {
            (Some(m), Some(ts)) => {
                let loss = m.loss().context("steering method without a loss")?;
                let s = generate_steered(model, &req, ts, loss, &m.config, &mut |_| {})?;
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
                s.generated
            }
            (method, _) => {
                if method.is_some() {
                    extra.push((
                        "steer_skipped".to_string(),
                        "no relation in the prompt".to_string(),
                    ));
                }
                generate(model, &req, &mut NoHook, &mut |_| {})?
            }
        };
        let seconds = start.elapsed().as_secs_f64();
        let meta = generation_metadata(
            &req,
            &run.model_name,
            model.sampler_name(),
            generated.width,
            generated.height,
            &extra,
        );
        write_png(&path, &generated.image, &meta)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok((seconds, generated.warnings))
    };
    let mut outcome = EvalOutcome {
        prompts: mine.len(),
        present,
        warnings: damaged,
        unsteered: if run.method.is_some() {
            triplets.iter().filter(|t| t.is_none()).count()
        } else {
            0
        },
        ..EvalOutcome::default()
    };
    run_ordered(
        &jobs,
        run.workers.max(1),
        |_, job| {
            one(job).with_context(|| {
                format!(
                    "prompt {} {:?}, image {}",
                    job.index, prompts[job.index].prompt, job.sample
                )
            })
        },
        |k, (seconds, warnings)| {
            outcome.made += 1;
            outcome.seconds += seconds;
            for w in warnings {
                if !outcome.warnings.contains(&w) {
                    outcome.warnings.push(w);
                }
            }
            progress(
                present + outcome.made,
                total,
                &prompts[jobs[k].index].prompt,
            );
            Ok(())
        },
    )?;
    Ok(outcome)
}
