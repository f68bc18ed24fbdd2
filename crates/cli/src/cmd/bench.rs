//! `l2s bench shapes`: the whole experiment on the shapes world as a recipe over the library's
//! stages, resumable stage by stage — render annotated images, build dual- and single-inversion
//! data, train both classifiers, then per method an evaluation run in GenEval's layout
//! (`eval-METHOD/`, what `l2s eval` writes) scored in place as `l2s score` scores it, so `l2s
//! report` can show any of them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use l2s_eval::layout::{read_run_info, Seeding};
use l2s_eval::prompts::SpatialPrompt;
use l2s_eval::report::{RESULTS_FILE, SUMMARY_FILE};
use l2s_eval::score::{results_jsonl, ScoreOptions};
use l2s_eval::sources::score_folder;
use l2s_models::Pipeline;
use l2s_shapes::{DetectorConfig, RenderConfig, ShapeDetector};
use l2s_steer::build::{build, BuildConfig, RelationCheck};
use l2s_steer::dataset::{Dataset, ShardSpec};
use l2s_steer::evaluate::{run_eval, EvalRun};
use l2s_steer::method::{Method, MethodSpec};
use l2s_steer::train::{
    evaluate as evaluate_classifier, load_classifier, split_by_image, train, TrainConfig,
};
use l2s_steer::Augment;

use crate::cmd::data::{open_writer, progress_message, read_annotated, shapes_detector};
use crate::cmd::score::DetectorArg;
use crate::common::{default_workers, load_model, Global, ModelArgs};

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
    /// Working folder: images/, data-dual/, data-single/, clf-dual/, clf-single/, eval-*.jsonl, results.*
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
    #[arg(long = "guidance", value_name = "SCALE")]
    guidance_arg: Option<f64>,
    #[arg(skip)]
    guidance: f64,
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
}

fn bar(global: &Global, len: usize, what: &str) -> ProgressBar {
    let b = if global.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len as u64)
    };
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>12} [{{bar:32}}] {{pos}}/{{len}} {{elapsed_precise}} (eta {{eta}}) {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    l2s_generate::write_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())?;
    Ok(())
}

/// Stage 1–2: images and both datasets.
fn build_data(sd: &Pipeline, a: &ShapesArgs, global: &Global) -> Result<()> {
    let images_dir = a.work.join("images");
    if !images_dir.join("annotations.json").exists() {
        // Two objects per image: the pair is the whole scene, so the two-object prompt describes
        // everything the reconstruction has to redraw.
        let render = RenderConfig {
            min_objects: 2,
            max_objects: 2,
            ..RenderConfig::with_size(32)
        };
        l2s_shapes::generate(&images_dir, &render, a.train_images, 1000)?;
    }
    let done = a.work.join("data.done");
    if done.exists() {
        return Ok(());
    }
    let images = read_annotated(&images_dir, None)?;
    let cfg = BuildConfig {
        steps: a.steps,
        fixed_point_iterations: a.fixed_point,
        step_indices: sd.map_steps(a.steps),
        psnr_threshold: a.min_psnr,
        dual_inversion: true,
        seed: 0,
        shard: ShardSpec::all(),
        rf: l2s_diffusion::RfInversionConfig::default(),
    };
    let detector = shapes_detector(DetectorArg::Shapes, &images)?;
    let check = a.check_relation.then_some(RelationCheck {
        detector: &detector,
        min_score: l2s_eval::SCORE_THRESHOLD,
    });
    let check_name = a.check_relation.then_some("shapes");
    let mut dual = open_writer(
        sd,
        &images,
        &cfg,
        check_name,
        &a.work.join("data-dual"),
        256,
    )?;
    let single_cfg = BuildConfig {
        dual_inversion: false,
        ..cfg.clone()
    };
    let mut single = open_writer(
        sd,
        &images,
        &single_cfg,
        check_name,
        &a.work.join("data-single"),
        256,
    )?;
    let b = bar(global, images.len(), "data");
    let summary = build(
        sd,
        &images,
        &cfg,
        check.as_ref(),
        a.workers.unwrap_or_else(default_workers),
        &mut dual,
        Some(&mut single),
        &mut |done, _, s| {
            b.set_position(done as u64);
            b.set_message(progress_message(s));
        },
    )?;
    b.finish_and_clear();
    dual.finish()?;
    single.finish()?;
    write_json(&a.work.join("data-summary.json"), &summary)?;
    eprintln!("data: {}", serde_json::to_string(&summary)?);
    l2s_generate::write_atomic(&done, b"done")?;
    Ok(())
}

/// Stage 3: both classifiers.
fn train_classifiers(a: &ShapesArgs, global: &Global) -> Result<()> {
    let mut cfg = TrainConfig::sd();
    cfg.max_epochs = a.epochs;
    cfg.lr = a.classifier_lr;
    cfg.early_stop_patience = a.patience;
    cfg.augment = a.augment;
    let todo: Vec<&str> = ["dual", "single"]
        .into_iter()
        .filter(|k| {
            !a.work
                .join(format!("clf-{k}"))
                .join("classifier.json")
                .exists()
        })
        .collect();
    let one = |kind: &str, b: ProgressBar| -> Result<()> {
        let out = a.work.join(format!("clf-{kind}"));
        let report = train(
            &a.work.join(format!("data-{kind}")),
            &out,
            &cfg,
            &candle_core::Device::Cpu,
            &mut |e| {
                b.inc(1);
                b.set_message(format!("val acc {:.3}", e.val_accuracy));
            },
        )
        .with_context(|| format!("training the {kind}-inversion classifier"))?;
        b.finish_and_clear();
        eprintln!(
            "classifier {kind}: {}",
            serde_json::to_string(&report.meta.metrics)?
        );
        Ok(())
    };
    let bars = MultiProgress::new();
    let new_bar = |kind: &str| bars.add(bar(global, a.epochs, &format!("train {kind}")));
    if a.workers.unwrap_or_else(default_workers) < 2 {
        return todo.iter().try_for_each(|&kind| one(kind, new_bar(kind)));
    }
    // The two classifiers are independent: with two or more workers they train side by side.
    std::thread::scope(|scope| {
        let handles: Vec<_> = todo
            .iter()
            .map(|&kind| {
                let b = new_bar(kind);
                scope.spawn(move || one(kind, b))
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a classifier training thread panicked"))?
        })
    })
}

/// Each classifier's accuracy on the dual-inversion test maps (the same held-out images).
fn classifier_accuracies(sd: &Pipeline, a: &ShapesArgs) -> Result<serde_json::Value> {
    let ds = Dataset::open(a.work.join("data-dual"))?;
    let split = split_by_image(
        ds.entries(),
        TrainConfig::sd().split,
        TrainConfig::sd().seed,
    );
    let test = ds.load(&split.test, candle_core::DType::F32)?;
    let mut out = serde_json::Map::new();
    let id = sd.fingerprint()?;
    for kind in ["dual", "single"] {
        let (clf, meta) = load_classifier(
            &a.work.join(format!("clf-{kind}")),
            Some(&id),
            None,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )?;
        let ev = evaluate_classifier(&clf, &test, 64, &meta.relations, &candle_core::Device::Cpu)?;
        out.insert(kind.into(), serde_json::json!({"test_examples": ev.examples, "accuracy": ev.accuracy, "loss": ev.loss}));
    }
    Ok(out.into())
}

/// The held-out prompts: every shapes prompt shuffled with seed 7, the first `n`, in GenEval's
/// metadata form (the bench's wording, without "a photo of").
fn prompts(n: usize) -> Result<Vec<SpatialPrompt>> {
    let mut all = l2s_shapes::all_prompts();
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
    all.into_iter()
        .take(n)
        .map(|p| {
            let meta = serde_json::json!({
                "tag": "position",
                "include": [
                    {"class": p.b.name(), "count": 1},
                    {"class": p.a.name(), "count": 1, "position": [p.relation.name(), 0]},
                ],
                "prompt": p.text(),
            });
            SpatialPrompt::from_metadata(meta)
                .map_err(anyhow::Error::msg)?
                .context("a shapes prompt that is not a position prompt")
        })
        .collect()
}

fn method_spec(name: &str, work: &Path) -> Result<MethodSpec> {
    Ok(match name {
        "base" => MethodSpec::None,
        "centroid" => MethodSpec::Centroid,
        "attend-excite" => MethodSpec::AttendExcite,
        "l2s-dual" => MethodSpec::Classifier(work.join("clf-dual")),
        "l2s-single" => MethodSpec::Classifier(work.join("clf-single")),
        other => anyhow::bail!("--methods: unknown method `{other}` (base, centroid, attend-excite, l2s-single, l2s-dual)"),
    })
}

/// One row of the table.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct MethodSummary {
    method: String,
    images: usize,
    spatial_accuracy: f64,
    object_accuracy: f64,
    seconds_per_image: f64,
    mean_final_loss: Option<f64>,
}

/// Generation time of a method's images, kept beside its run folder (PNGs carry no timing, so
/// that reruns stay byte-identical).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Timing {
    images: usize,
    seconds: f64,
}

/// One method through the evaluation harness: its images into `eval-NAME/` in GenEval's layout
/// (resumable), scored there like `l2s score` does (results.jsonl, summary.json), so `l2s report`
/// shows the run.
fn run_method(
    model: &Pipeline,
    model_name: &str,
    a: &ShapesArgs,
    name: &str,
    global: &Global,
) -> Result<MethodSummary> {
    let dir = a.work.join(format!("eval-{name}"));
    let spec = method_spec(name, &a.work)?;
    let method = match spec {
        MethodSpec::None => None,
        _ => {
            let mut m = Method::load(&spec, model, a.steps)?;
            m.name = name.to_string();
            m.config.max_iterations = a.steer_iterations;
            if let Some(n) = a.steer_steps {
                m.config.steer_steps = n;
            }
            if name.starts_with("l2s") {
                m.config.step_size = a.step_size;
                m.config.update = if a.raw_gradient {
                    l2s_steer::steering::UpdateRule::Raw
                } else {
                    l2s_steer::steering::UpdateRule::Normalized
                };
                m.config.stop_below = Some(a.stop_below);
            }
            Some(m)
        }
    };
    let run = EvalRun {
        model,
        model_name: model_name.to_string(),
        method: method.as_ref(),
        steer: name.to_string(),
        steps: a.steps,
        guidance: a.guidance,
        seed: 0,
        seeding: Seeding::PerSample,
        images_per_prompt: a.seeds as usize,
        width: None,
        height: None,
        shard: l2s_steer::ShardSpec::all(),
        workers: a.workers.unwrap_or_else(default_workers),
    };
    // A run folder of other evaluation settings is the bench's own cache: start it again.
    if let Some(Ok(old)) = read_run_info(&dir) {
        let fresh = run_info_probe(&run, &dir)?;
        if !old.differences(&fresh).is_empty() {
            eprintln!("{name}: evaluation settings changed; evaluating again");
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
    }
    let ps = prompts(a.prompts)?;
    let b = bar(global, ps.len() * a.seeds as usize, name);
    let outcome = run_eval(&run, &ps, PROMPT_SOURCE, &dir, &mut |done, _, _| {
        b.set_position(done as u64)
    })?;
    b.finish_and_clear();
    let timing_path = a.work.join(format!("eval-{name}.timing.json"));
    let mut timing: Timing = std::fs::read_to_string(&timing_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|_| outcome.present > 0)
        .unwrap_or_default();
    timing.images += outcome.made;
    timing.seconds += outcome.seconds;
    write_json(&timing_path, &timing)?;

    let detector = ShapeDetector::new(DetectorConfig::for_render(&RenderConfig::with_size(32)));
    let scored = score_folder(
        &dir,
        &detector,
        "shapes",
        Some(a.seeds as usize),
        &ScoreOptions::default(),
        &mut |_, _| {},
    )
    .map_err(anyhow::Error::msg)?;
    l2s_generate::write_atomic(
        &dir.join(RESULTS_FILE),
        results_jsonl(&scored.results).as_bytes(),
    )?;
    write_json(&dir.join(SUMMARY_FILE), &scored.summary)?;
    let s = &scored.summary;
    let row = MethodSummary {
        method: name.to_string(),
        images: s.images,
        spatial_accuracy: s.position_accuracy,
        object_accuracy: s.visor.oa,
        seconds_per_image: timing.seconds / timing.images.max(1) as f64,
        mean_final_loss: s.mean_steer_loss,
    };
    eprintln!("{name}: {}", serde_json::to_string(&row)?);
    Ok(row)
}

const PROMPT_SOURCE: &str = "l2s bench shapes: held-out shapes prompts (shuffled with seed 7)";

/// The run.json a run of these settings writes, to compare with one on disk.
fn run_info_probe(run: &EvalRun, dir: &Path) -> Result<l2s_eval::layout::RunInfo> {
    let mut info = read_run_info(dir)
        .and_then(|r| r.ok())
        .context("no run.json")?;
    info.method = run.method.map_or("base".into(), |m| m.name.clone());
    info.steer = run.steer.clone();
    info.model = run.model_name.clone();
    info.steps = run.steps;
    info.guidance = run.guidance;
    info.images_per_prompt = run.images_per_prompt;
    info.steering = run
        .method
        .map(|m| serde_json::to_value(&m.config))
        .transpose()?;
    info.seeding = run.seeding;
    Ok(info)
}

/// The data and classifiers cached in --work belong to one model and one set of data settings; a
/// rerun with others would silently mix them, so it is refused. (Evaluation settings are checked
/// per method in [`run_method`].)
fn check_work_folder(sd: &Pipeline, a: &ShapesArgs) -> Result<()> {
    let path = a.work.join("settings.json");
    let settings = serde_json::json!({
        "model": sd.fingerprint()?,
        "steps": a.steps,
        "train_images": a.train_images,
        "fixed_point": a.fixed_point,
        "min_psnr": a.min_psnr,
        "objects_per_image": 2,
        "check_relation": a.check_relation,
        "epochs": a.epochs,
        "classifier_lr": a.classifier_lr,
        "patience": a.patience,
        "augment": a.augment,
    });
    if path.exists() {
        let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{}: not a settings file", path.display()))?;
        if saved != settings {
            anyhow::bail!(
                "{} was made with other settings ({saved}); this run asks for {settings}. \
                 Use another --work folder, or delete this one to start over",
                a.work.display()
            );
        }
        return Ok(());
    }
    write_json(&path, &settings)
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let Command::Shapes(mut a) = args.command;
    std::fs::create_dir_all(&a.work).with_context(|| format!("creating {}", a.work.display()))?;
    let (sd, model_name) = load_model(&a.model)?;
    a.guidance = a.guidance_arg.unwrap_or(sd.sampling_defaults().guidance);
    check_work_folder(&sd, &a)?;
    let needs_classifiers = a.methods.iter().any(|m| m.starts_with("l2s"));
    let mut accuracies = serde_json::Value::Null;
    if needs_classifiers {
        build_data(&sd, &a, global)?;
        train_classifiers(&a, global)?;
        accuracies = classifier_accuracies(&sd, &a)?;
        eprintln!("classifier accuracy on dual-inversion test maps: {accuracies}");
    }
    let mut summaries = Vec::new();
    for m in &a.methods {
        summaries.push(run_method(&sd, &model_name, &a, m, global)?);
    }
    let mut table = String::from("| method | spatial accuracy | object accuracy | s / image | final steering loss |\n|---|---|---|---|---|\n");
    for s in &summaries {
        table.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.2} | {} |\n",
            s.method,
            s.spatial_accuracy,
            s.object_accuracy,
            s.seconds_per_image,
            s.mean_final_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "—".into())
        ));
    }
    let results = serde_json::json!({
        "model": model_name,
        "prompts": a.prompts,
        "seeds": a.seeds,
        "steps": a.steps,
        "guidance": a.guidance,
        "methods": summaries,
        "classifier_accuracy_on_dual_test_maps": accuracies,
    });
    write_json(&a.work.join("results.json"), &results)?;
    l2s_generate::write_atomic(&a.work.join("results.md"), table.as_bytes())?;
    println!("{table}");
    Ok(())
}
