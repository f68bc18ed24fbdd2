//! What the subcommands share: global flags, logging, model loading, progress bars, output paths.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use l2s_eval::prompts::{
    multi_relation_prompts, position_prompts, read_prompt_file, MultiRelationSpec, COCO_CLASSES,
    SHAPES_CLASSES,
};
use l2s_eval::tasks::TaskPrompt;
use l2s_generate::{Phase, Progress};
use l2s_models::weights::Variant;
use l2s_models::{resolve_model, LoadOptions, Pipeline};

/// Flags every subcommand takes.
#[derive(clap::Args)]
pub struct Global {
    /// More log output (-v: info, -vv: debug); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress bars
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

pub fn init_logging(global: &Global) {
    let default = match global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(global.verbose > 1)
        .without_time()
        .try_init();
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

/// Which model to load and how.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model: a diffusers folder, a hub id (org/name) already in the local Hugging Face cache, or
    /// `shapes` (the built-in shapes-world model, the default)
    #[arg(long, env = "L2S_MODEL", value_name = "DIR|HUB_ID")]
    pub model: Option<String>,
    /// Weight dtype
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Weight file variant, e.g. fp16 (default: the plain files, else fp16)
    #[arg(long)]
    pub variant: Option<String>,
    /// cpu, cuda or cuda:N (default: the first GPU when built with CUDA and one is present).
    /// `data build` also takes a list (cuda:0,cuda:1): a copy of the model on each, one worker
    /// per device; by default it uses every GPU present
    #[arg(long)]
    pub device: Option<String>,
    /// FLUX only: load the transformer from this single safetensors file (original BFL naming as
    /// in flux1-dev.safetensors, or diffusers naming; optionally under model.diffusion_model.)
    /// instead of the folder's transformer/. Configured by the folder's transformer/config.json if
    /// present, else by the FLUX.1-dev or schnell preset, whichever the file's guidance embedding
    /// matches
    #[arg(long, value_name = "FILE")]
    pub transformer: Option<PathBuf>,
}

/// The device used without `--device`: the first GPU if the binary has CUDA and it opens, else
/// the CPU. A CUDA build on a machine without a usable GPU (no driver, the stub library, no
/// device) gets an error from the driver here; that means "no GPU", so the CPU is used with a note
/// naming the reason instead of failing.
fn default_device(
    open_gpu: impl FnOnce() -> candle_core::Result<Device>,
) -> (Device, Option<String>) {
    match open_gpu() {
        Ok(device) => (device, None),
        Err(e) => (
            Device::Cpu,
            Some(format!("no usable GPU ({e}); running on the CPU")),
        ),
    }
}

pub(crate) fn device(arg: Option<&str>) -> Result<Device> {
    device_for("--device", arg)
}

/// The device a flag such as `--detector-device` names (`cpu`, `cuda`, `cuda:N`); without it the
/// default device.
pub(crate) fn device_for(flag: &str, arg: Option<&str>) -> Result<Device> {
    Ok(match arg {
        None => {
            let (device, note) = default_device(|| Device::cuda_if_available(0));
            if let Some(note) = note {
                eprintln!("note: {note}");
            }
            device
        }
        Some("cpu") => Device::Cpu,
        Some("cuda") => Device::new_cuda(0).with_context(|| format!("{flag} cuda"))?,
        Some(other) => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Device::new_cuda(n).with_context(|| format!("{flag} {other}"))?,
            None => bail!("{flag} {other:?}: expected cpu, cuda or cuda:N"),
        },
    })
}

/// The folder and load options `args` name, with the name to record in metadata (the argument as
/// given).
fn resolve(args: &ModelArgs) -> Result<(std::path::PathBuf, LoadOptions, String)> {
    // No --model: the shapes-world model compiled into this binary.
    let name = args
        .model
        .clone()
        .unwrap_or_else(|| l2s_shapes_model::embedded::NAME.to_string());
    let folder = if name == l2s_shapes_model::embedded::NAME {
        l2s_shapes_model::embedded::model_dir()?
    } else {
        resolve_model(&name).with_context(|| format!("model `{name}`"))?
    };
    let opts = LoadOptions {
        dtype: match args.dtype {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        },
        device: device(args.device.as_deref())?,
        variant: match &args.variant {
            Some(v) => Variant::Named(v.clone()),
            None => Variant::Auto,
        },
    };
    if opts.dtype == DType::BF16 && opts.device.is_cpu() {
        bail!("--dtype bf16 needs a GPU (candle has no bf16 matrix product on the CPU); use f32 or f16 on the CPU");
    }
    tracing::info!(
        "loading {} ({:?} on {:?})",
        folder.display(),
        opts.dtype,
        opts.device
    );
    Ok((folder, opts, name))
}

/// Loads the pipeline `args` name, of whatever family its `model_index.json` says; returns it
/// with the name to record in metadata.
pub fn load_model(args: &ModelArgs) -> Result<(Pipeline, String)> {
    let (folder, opts, name) = resolve(args)?;
    if let Some(f) = &args.transformer {
        tracing::info!("transformer from {}", f.display());
    }
    let model = Pipeline::load(&folder, &opts, args.transformer.as_deref()).with_context(|| {
        let file = args
            .transformer
            .as_ref()
            .map(|f| format!(" with --transformer {}", f.display()));
        format!(
            "loading model `{name}`{} from {}",
            file.unwrap_or_default(),
            folder.display()
        )
    })?;
    Ok((model, name))
}

/// The devices a `--device` list names (`cuda:0,cuda:1`), or without one every GPU when built
/// with CUDA and several are present; `None` entries mean the single default device.
fn device_list(arg: Option<&str>) -> Vec<Option<String>> {
    match arg {
        Some(list) if list.contains(',') => list
            .split(',')
            .map(|d| Some(d.trim().to_string()))
            .collect(),
        Some(one) => vec![Some(one.to_string())],
        None => {
            let gpus = cuda_device_count();
            if gpus > 1 {
                (0..gpus).map(|i| Some(format!("cuda:{i}"))).collect()
            } else {
                vec![None]
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> usize {
    candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
        .map_or(0, |n| n.max(0) as usize)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> usize {
    0
}

/// The model `args` name loaded once per device of its `--device` list (see [`device_list`]),
/// so that each device's worker runs on its own copy; with the name to record in metadata.
pub fn load_replicas(args: &ModelArgs) -> Result<(Vec<Pipeline>, String)> {
    let mut models = Vec::new();
    let mut name = String::new();
    for device in device_list(args.device.as_deref()) {
        let one = ModelArgs {
            model: args.model.clone(),
            dtype: args.dtype,
            variant: args.variant.clone(),
            device,
            transformer: args.transformer.clone(),
        };
        let (model, n) = load_model(&one)?;
        models.push(model);
        name = n;
    }
    if models.len() > 1 {
        tracing::info!("{} copies of the model, one per device", models.len());
    }
    Ok((models, name))
}

/// Sampling settings of `generate`, `invert`, `attention` and `eval`. Steps and guidance default to the
/// model's own: Stable Diffusion as each command says, FLUX.1-dev 50 steps at guidance 3.5,
/// FLUX.1-schnell 4 steps without guidance.
#[derive(clap::Args)]
pub struct SampleArgs {
    /// The unconditional prompt of classifier-free guidance (Stable Diffusion only)
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Sampling steps (default: the model's)
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale: classifier-free for Stable Diffusion (off at 1 or below), the guidance
    /// input for FLUX.1-dev (default: the model's)
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Image width in pixels (default: the model's native size)
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size)
    #[arg(long)]
    pub height: Option<usize>,
}

impl SampleArgs {
    /// (steps, guidance): the flags, else the model's defaults (a folder may name its own: the
    /// built-in model 50 steps at guidance 1.25). `inversion`: the guidance default of an
    /// inversion instead (1 for classifier-free guidance).
    pub fn resolve(&self, model: &Pipeline, inversion: bool) -> (usize, f64) {
        let defaults = model.sampling_defaults();
        let guidance = if inversion {
            model.inversion_guidance()
        } else {
            defaults.guidance
        };
        (
            self.steps.unwrap_or(defaults.steps),
            self.guidance.unwrap_or(guidance),
        )
    }

    /// [`SampleArgs::resolve`] for a steered run: without `--steps`, a classifier's own tuned
    /// schedule names the sampling steps (the built-in one: 20), else the model does.
    pub fn resolve_steered(&self, model: &Pipeline, steer: &SteerArgs) -> Result<(usize, f64)> {
        let (steps, guidance) = self.resolve(model, false);
        let steps = match self.steps {
            Some(n) => n,
            None => steer.tuned_steps()?.unwrap_or(steps),
        };
        if steps == 0 {
            bail!("--steps 0: expected at least 1");
        }
        Ok((steps, guidance))
    }
}

/// A progress bar per phase of a run; hidden with --quiet or when stderr is not a terminal.
pub struct Bars {
    quiet: bool,
    label: String,
    current: Option<(Phase, ProgressBar)>,
}

impl Bars {
    pub fn new(global: &Global, label: impl Into<String>) -> Self {
        Self {
            quiet: global.quiet,
            label: label.into(),
            current: None,
        }
    }

    pub fn update(&mut self, p: Progress) {
        if self.quiet {
            return;
        }
        if self.current.as_ref().map(|(phase, _)| *phase) != Some(p.phase) {
            self.finish();
            let bar = ProgressBar::new(p.total as u64);
            let style = ProgressStyle::with_template(
                "{prefix:>14} [{bar:32}] {pos}/{len} steps {elapsed_precise} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            let verb = match p.phase {
                Phase::Denoise => "",
                Phase::Invert => " invert",
            };
            bar.set_prefix(format!("{}{verb}", self.label));
            self.current = Some((p.phase, bar));
        }
        if let Some((_, bar)) = &self.current {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
        }
    }

    pub fn finish(&mut self) {
        if let Some((_, bar)) = self.current.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Checks that `path` names a PNG file whose folder exists.
pub fn png_target(path: &Path, flag: &str) -> Result<PathBuf> {
    let is_png = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!(
            "{flag} {}: expected a file name ending in .png",
            path.display()
        );
    }
    if path.is_dir() {
        bail!("{flag} {}: is a folder, not a .png file", path.display());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "{flag} {}: folder {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(path.to_path_buf())
}

/// Logs a library's warnings.
pub fn warn_all(warnings: &[String]) {
    for w in warnings {
        tracing::warn!("{w}");
    }
}

/// Writes to stdout; a closed pipe (`l2s … | head`) ends the output quietly instead of panicking.
pub fn say(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// The largest `--step-size` accepted.
pub const MAX_STEP_SIZE: f64 = 1e6;

/// Test-time steering of spatial relations (shared by `generate` and `eval`).
#[derive(clap::Args)]
pub struct SteerArgs {
    /// Steering method: none, centroid, attend-excite, l2s (Learn-to-Steer with the classifier
    /// built in for the shapes model, at its tuned schedule), or a Learn-to-Steer classifier
    /// (folder or classifier.json from `l2s train`; a steering.json beside it sets its schedule)
    #[arg(long, default_value = "none", value_name = "METHOD|PATH")]
    pub steer: String,
    /// Steer during the first N denoising steps (default: half of the steps; FLUX.1-schnell: 1)
    #[arg(long)]
    pub steer_steps: Option<usize>,
    /// Gradient iterations per steered step (default: the method's)
    #[arg(long)]
    pub steer_iterations: Option<usize>,
    /// Step size α (default: the method's)
    #[arg(long)]
    pub step_size: Option<f64>,
    /// Divide each gradient by its RMS before scaling by α
    #[arg(long)]
    pub normalized: bool,
    /// Stop a step's gradient iterations once the loss is below this (default: the method's own
    /// thresholds; Learn-to-Steer's, from the paper, are ~1e-5, so every iteration runs)
    #[arg(long, value_name = "LOSS")]
    pub stop_below: Option<f64>,
}

impl SteerArgs {
    /// What `--steer` names; `l2s` is the classifier built in with the shapes model.
    pub fn spec(&self) -> Result<l2s_steer::method::MethodSpec> {
        use l2s_steer::method::MethodSpec;
        if self.steer == l2s_shapes_model::embedded::CLASSIFIER_NAME {
            return Ok(MethodSpec::Classifier(
                l2s_shapes_model::embedded::classifier_dir()?,
            ));
        }
        let spec = MethodSpec::parse(&self.steer);
        if let MethodSpec::Classifier(p) = &spec {
            if !p.exists() {
                bail!("--steer {}: not a method (none, centroid, attend-excite, l2s) and no such classifier file or folder", p.display());
            }
        }
        Ok(spec)
    }

    /// The sampling steps the classifier's own schedule was tuned at (`steering.json`), if any:
    /// the default when the user gives no `--steps`.
    pub fn tuned_steps(&self) -> Result<Option<usize>> {
        Ok(match self.spec()? {
            l2s_steer::method::MethodSpec::Classifier(p) => {
                l2s_steer::method::TunedSchedule::read(&p)
                    .with_context(|| format!("--steer {}", self.steer))?
                    .and_then(|t| t.sampling_steps)
            }
            _ => None,
        })
    }

    /// The method with the command line's overrides, or `None` for the plain model.
    pub fn method(
        &self,
        model: &Pipeline,
        steps: usize,
    ) -> Result<Option<l2s_steer::method::Method>> {
        use l2s_steer::method::{Method, MethodSpec};
        if let Some(x) = self.step_size {
            if !x.is_finite() || x <= 0.0 || x > MAX_STEP_SIZE {
                let shown = if x.abs() < 1e6 {
                    x.to_string()
                } else {
                    format!("{x:e}")
                };
                bail!(
                    "--step-size {shown}: expected a number > 0 and at most {MAX_STEP_SIZE:e}; a \
                     NaN, negative or huge step turns the latents into NaN or noise"
                );
            }
        }
        if let Some(x) = self.stop_below.filter(|x| !x.is_finite()) {
            bail!("--stop-below {x}: expected a finite loss value");
        }
        let spec = self.spec()?;
        if spec == MethodSpec::None {
            return Ok(None);
        }
        let mut m =
            Method::load(&spec, model, steps).with_context(|| format!("--steer {}", self.steer))?;
        if self.steer == l2s_shapes_model::embedded::CLASSIFIER_NAME {
            m.name = "l2s".into();
        }
        if let Some(n) = self.steer_steps {
            m.config.steer_steps = n;
        }
        if let Some(n) = self.steer_iterations {
            m.config.max_iterations = n;
        }
        if let Some(x) = self.step_size {
            m.config.step_size = x;
        }
        if self.normalized {
            m.config.update = l2s_steer::steering::UpdateRule::Normalized;
        }
        if let Some(x) = self.stop_below {
            if !x.is_finite() {
                bail!("--stop-below {x}: expected a finite loss value");
            }
            m.config.stop_below = Some(x);
        }
        Ok(Some(m))
    }
}

/// Images processed at once by commands that take `--workers`: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClassesArg {
    /// The shapes classes for the built-in shapes model, GenEval's 80 COCO classes otherwise
    Auto,
    /// GenEval's 80 COCO class names
    Coco,
    /// The eight shapes-world classes
    Shapes,
}

/// The prompts of `eval` and `data generate`: a GenEval metadata file, or generated.
#[derive(clap::Args)]
pub struct PromptArgs {
    /// GenEval metadata JSONL (e.g. GenEval's evaluation_metadata.jsonl): every task's lines are
    /// used (`data generate`: the spatial ones); lines of other tags are listed and skipped
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["generate_prompts", "geneval"],
        required_unless_present_any = ["generate_prompts", "geneval"]
    )]
    pub prompts: Option<PathBuf>,
    /// Generate N GenEval-style prompts "a photo of {a/an A} {rel} {a/an B}" instead
    #[arg(long, value_name = "N", conflicts_with = "geneval")]
    pub generate_prompts: Option<usize>,
    /// GenEval's own 553 evaluation prompts (its evaluation_metadata.jsonl, built in) instead
    #[arg(long)]
    pub geneval: bool,
    /// Class list of generated prompts
    #[arg(long, value_enum, default_value = "auto")]
    pub classes: ClassesArg,
    /// Generate prompts with 2–5 objects and 1–3 relations instead of two objects and one relation
    #[arg(long)]
    pub multi: bool,
    /// Seed of the prompt generator
    #[arg(long, default_value_t = 0)]
    pub prompt_seed: u64,
}

impl PromptArgs {
    /// The prompts and a description of where they came from.
    pub fn resolve(&self, model_name: &str) -> Result<(Vec<TaskPrompt>, String)> {
        let args = self;
        if let Some(path) = &args.prompts {
            let file = read_prompt_file(path)?;
            for line in file.unsupported_report() {
                eprintln!("note: {line}");
            }
            if file.prompts.is_empty() {
                bail!(
                    "--prompts {}: no line of a GenEval task (or \"multi_position\")",
                    path.display()
                );
            }
            let source = format!("file {}", path.display());
            return Ok((file.prompts.into_iter().map(|(_, p)| p).collect(), source));
        }
        if args.geneval {
            let prompts = l2s_eval::prompts::geneval_prompts();
            let source = format!(
                "GenEval's evaluation prompts (built in, {} lines)",
                prompts.len()
            );
            return Ok((prompts, source));
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
            prompts.iter().map(TaskPrompt::from).collect(),
            format!(
                "generated: {n} {kind} prompts over the {cname} classes, prompt seed {}",
                args.prompt_seed
            ),
        ))
    }
}

/// What `eval` and `data generate` share: the model, the prompts, how each image is made and
/// where the images go (GenEval's layout).
#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompts: PromptArgs,
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
    /// Generate only shard i of n (1-based), e.g. 2/4; `auto` reads it from a Slurm job array or
    /// a Kubernetes Indexed Job (see docs/cluster.md)
    #[arg(long, value_name = "I/N")]
    pub shard: Option<l2s_steer::ShardSpec>,
    /// Base seed of the images
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images generated at once, each on its own thread (default: one per core)
    #[arg(long)]
    pub workers: Option<usize>,
}

/// The loaded model, method and prompts of an [`EvalArgs`] run.
pub struct PreparedEval {
    pub model: Pipeline,
    pub model_name: String,
    pub method: Option<l2s_steer::method::Method>,
    pub steps: usize,
    pub guidance: f64,
    pub prompts: Vec<TaskPrompt>,
    /// Where the prompts came from.
    pub source: String,
}

impl EvalArgs {
    /// Takes the output folder for this process: the shards of one run may share a folder
    /// (shared storage), each locking it under its own name, so only two processes doing the
    /// same part are refused.
    pub fn lock_out(&self) -> Result<OutFolder> {
        let shard = self.shard.unwrap_or_default();
        let lock_name = if shard.is_all() {
            l2s_files::LOCK_FILE.to_string()
        } else {
            format!(".l2s.shard-{}-of-{}.lock", shard.index(), shard.count())
        };
        OutFolder::open_named(&self.out, "--out", &lock_name)
    }

    /// Checks the flags, loads the model and the method, reads or generates the prompts.
    pub fn prepare(&self) -> Result<PreparedEval> {
        if self.images_per_prompt == 0 {
            bail!("--images-per-prompt 0: expected at least 1");
        }
        if self.images_per_prompt > l2s_eval::score::MAX_IMAGES_PER_PROMPT {
            bail!(
                "--images-per-prompt {}: expected at most {} (sample files are numbered SSSS.png)",
                self.images_per_prompt,
                l2s_eval::score::MAX_IMAGES_PER_PROMPT
            );
        }
        let (model, model_name) = load_model(&self.model)?;
        let (steps, guidance) = self.sampling.resolve_steered(&model, &self.steer)?;
        let (prompts, source) = self.prompts.resolve(&model_name)?;
        let method = self.steer.method(&model, steps)?;
        Ok(PreparedEval {
            model,
            model_name,
            method,
            steps,
            guidance,
            prompts,
            source,
        })
    }
}

impl PreparedEval {
    /// The harness's run description.
    pub fn run<'a>(&'a self, args: &EvalArgs) -> l2s_steer::evaluate::EvalRun<'a> {
        l2s_steer::evaluate::EvalRun {
            model: &self.model,
            model_name: self.model_name.clone(),
            method: self.method.as_ref(),
            steer: args.steer.steer.clone(),
            steps: self.steps,
            guidance: self.guidance,
            negative_prompt: args.sampling.negative_prompt.clone(),
            seed: args.seed,
            seeding: l2s_eval::layout::Seeding::PerImage,
            images_per_prompt: args.images_per_prompt,
            width: args.sampling.width,
            height: args.sampling.height,
            shard: args.shard.unwrap_or_default(),
            workers: args.workers.unwrap_or_else(default_workers),
        }
    }
}

/// A progress bar over images, labelled `prefix`; hidden with --quiet.
pub fn image_bar(global: &Global, prefix: &str) -> ProgressBar {
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
    bar.set_prefix(prefix.to_string());
    bar
}

/// An output folder held by this process: created if missing, locked against a second `l2s`
/// writing to it ([`l2s_files::FolderLock`]), and, when the command fails, removed again if
/// this process created it and left it empty.
pub struct OutFolder {
    path: PathBuf,
    created: bool,
    lock: Option<l2s_files::FolderLock>,
    done: bool,
}

impl OutFolder {
    /// Creates (if needed) and locks `path`, given as `flag`, with the lock file `lock_name`.
    pub fn open_named(path: &Path, flag: &str, lock_name: &str) -> Result<Self> {
        if path.exists() && !path.is_dir() {
            bail!("{flag} {}: exists and is not a folder", path.display());
        }
        let created = !path.exists();
        std::fs::create_dir_all(path)
            .with_context(|| format!("{flag} {}: cannot create the folder", path.display()))?;
        let mut out = Self {
            path: path.to_path_buf(),
            created,
            lock: None,
            done: false,
        };
        let lock = l2s_files::FolderLock::acquire_named(path, lock_name)
            .with_context(|| flag.to_string())?;
        if let Some(dead) = lock.took_over() {
            eprintln!(
                "note: {flag} {}: took over the lock left by {dead}, which no longer runs",
                path.display()
            );
        }
        out.lock = Some(lock);
        Ok(out)
    }

    /// [`open_named`](Self::open_named) with the usual lock file.
    pub fn open(path: &Path, flag: &str) -> Result<Self> {
        Self::open_named(path, flag, l2s_files::LOCK_FILE)
    }

    /// The command succeeded: keep the folder whatever it holds.
    pub fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for OutFolder {
    fn drop(&mut self) {
        drop(self.lock.take());
        if !self.done && self.created {
            // Only removes an empty folder.
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// `--map-layout`: how attention maps become a classifier's channels.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum MapLayoutArg {
    Published,
    Ours,
}

impl From<MapLayoutArg> for l2s_steer::maps::MapLayout {
    fn from(a: MapLayoutArg) -> Self {
        match a {
            MapLayoutArg::Published => Self::Published,
            MapLayoutArg::Ours => Self::Ours,
        }
    }
}

/// `--architecture`: which relation classifier `l2s train` builds.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ArchitectureArg {
    /// The published Learn-to-Steer classifier: raw maps, ReLU, no final LayerNorm, a step
    /// embedding row per denoising step.
    Authors,
    /// This project's first variant: maps scaled by S·S, GELU, a final LayerNorm, a step
    /// embedding row per recorded step.
    Legacy,
}

impl ArchitectureArg {
    /// The architecture, with its maps scaled on entry when `scale_maps` (`--scale-maps`;
    /// legacy always scales).
    pub fn with_scaling(self, scale_maps: bool) -> l2s_steer::classifier::Architecture {
        let mut arch = match self {
            ArchitectureArg::Authors => l2s_steer::classifier::Architecture::authors(),
            ArchitectureArg::Legacy => l2s_steer::classifier::Architecture::legacy(),
        };
        arch.scale_maps |= scale_maps;
        arch
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn a_gpu_that_fails_to_open_means_the_cpu_with_a_note() {
        let stub = || {
            Err(candle_core::Error::Msg(
                "DriverError(CUDA_ERROR_STUB_LIBRARY, \"CUDA driver is a stub library\")".into(),
            ))
        };
        let (device, note) = default_device(stub);
        assert!(matches!(device, Device::Cpu));
        let note = note.expect("a note saying why");
        assert!(
            note.contains("CUDA_ERROR_STUB_LIBRARY") && note.contains("CPU"),
            "{note}"
        );
    }

    #[test]
    fn the_default_without_cuda_is_the_cpu_without_a_note() {
        let (device, note) = default_device(|| Ok(Device::Cpu));
        assert!(matches!(device, Device::Cpu));
        assert!(note.is_none());
        // Built without CUDA, candle's own probe says so too.
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(device_or_cpu(), Device::Cpu));
    }

    #[cfg(not(feature = "cuda"))]
    fn device_or_cpu() -> Device {
        device(None).expect("the default device")
    }
}
