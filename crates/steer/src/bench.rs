//! The Learn-to-Steer experiment on the shapes world, as a recipe over the library's stages,
//! resumable stage by stage in one work folder: render annotated images, build dual- and
//! single-inversion data ([`crate::build`]), train both classifiers ([`crate::train`]), then per
//! method one evaluation run in GenEval's layout ([`crate::evaluate`], `eval-METHOD/`) scored in
//! place as `l2s score` scores it, so `l2s report` shows any of them.

use std::path::{Path, PathBuf};

use l2s_sources::Fit;

use crate::error::{Context, Result};
use l2s_eval::layout::{read_run_info, Seeding};
use l2s_eval::prompts::SpatialPrompt;
use l2s_eval::report::{RESULTS_FILE, SUMMARY_FILE};
use l2s_eval::score::{results_jsonl, ScoreOptions};
use l2s_eval::sources::score_folder;
use l2s_eval::tasks::TaskPrompt;
use l2s_models::Pipeline;
use l2s_shapes::{DetectorConfig, RenderConfig, ShapeDetector};

use crate::build::{
    build, open_dataset, progress_message, read_images, shapes_relation_detector, BuildConfig,
    BuildSource, ReconstructionCheck,
};
use crate::classifier::Architecture;
use crate::dataset::{Dataset, ShardSpec};
use crate::evaluate::{run_eval, EvalRun};
use crate::maps::MapLayout;
use crate::method::{Method, MethodSpec};
use crate::train::{evaluate_classifier, load_classifier, split_by_image, train, TrainConfig};
use crate::Augment;

/// The experiment's settings; [`Default`] is the published table's.
#[derive(Clone, Debug)]
pub struct ShapesBench {
    /// Working folder: images/, data-dual/, data-single/, clf-dual/, clf-single/, eval-METHOD/,
    /// results.json, results.md.
    pub work: PathBuf,
    /// Annotated training images, two objects each.
    pub train_images: usize,
    /// Keep a training sample only when the exact detector still finds the true relation in its
    /// reconstruction.
    pub check_relation: bool,
    /// Sampling steps everywhere (data building and generation).
    pub steps: usize,
    /// Fixed-point iterations per inversion step.
    pub fixed_point: usize,
    /// Drop training samples whose reconstruction is below this PSNR (dB).
    pub min_psnr: f64,
    /// Held-out prompts.
    pub prompts: usize,
    /// Seeds (images) per prompt.
    pub seeds: u64,
    /// Guidance of generation; `None`: the model's own.
    pub guidance: Option<f64>,
    /// Methods: base, centroid, attend-excite, l2s-single, l2s-dual.
    pub methods: Vec<String>,
    /// Gradient iterations per steered step, for every steering method.
    pub steer_iterations: usize,
    /// Steer during the first N steps (`None`: half of `steps`).
    pub steer_steps: Option<usize>,
    /// Step size of the learned methods (RMS of each update, or α with `raw_gradient`).
    pub step_size: f64,
    pub raw_gradient: bool,
    /// Learned methods stop a step's iterations once their loss is below this.
    pub stop_below: f64,
    /// Images generated or inverted at once.
    pub workers: usize,
    pub epochs: usize,
    pub classifier_lr: f64,
    pub patience: usize,
    pub augment: Augment,
    /// The classifiers' architecture.
    pub architecture: Architecture,
    /// How the training maps (and so the steering maps) become classifier channels.
    pub map_layout: MapLayout,
}

impl Default for ShapesBench {
    fn default() -> Self {
        Self {
            work: PathBuf::from("bench-shapes"),
            train_images: 600,
            check_relation: true,
            steps: 20,
            fixed_point: 0,
            min_psnr: 10.0,
            prompts: 24,
            seeds: 4,
            guidance: None,
            methods: [
                "base",
                "centroid",
                "attend-excite",
                "l2s-single",
                "l2s-dual",
            ]
            .map(String::from)
            .to_vec(),
            steer_iterations: 3,
            steer_steps: None,
            step_size: 0.1,
            raw_gradient: false,
            stop_below: 0.1,
            workers: 1,
            epochs: 30,
            classifier_lr: 1e-3,
            patience: 8,
            augment: Augment::Dihedral,
            // A few hundred samples: the variant that learns from them (BENCHMARKS.md,
            // "Classifier architecture on few samples"); the published one reaches chance-level
            // test accuracy here.
            architecture: Architecture::legacy(),
            map_layout: MapLayout::Ours,
        }
    }
}

/// Progress of one stage (indicatif's `ProgressBar` is one).
pub trait StageBar: Send + Sync {
    fn set_position(&self, done: u64);
    fn inc(&self, by: u64);
    fn set_message(&self, message: String);
    fn finish_and_clear(&self);
}

/// Where the stages report progress.
pub trait BenchProgress: Sync {
    /// A new stage `name` of `total` units.
    fn stage(&self, name: &str, total: usize) -> Box<dyn StageBar>;
}

/// What the experiment measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResults {
    pub methods: Vec<MethodSummary>,
    /// Each classifier's accuracy on the dual-inversion test maps (when classifiers were trained).
    pub classifier_accuracy: serde_json::Value,
    /// The table as Markdown (also in `results.md`).
    pub table: String,
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    l2s_generate::write_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())?;
    Ok(())
}

/// Stage 1–2: images and both datasets.
fn build_data(sd: &Pipeline, a: &ShapesBench, progress: &dyn BenchProgress) -> Result<()> {
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
    let images = read_images(
        &BuildSource::Shapes(images_dir.clone()),
        0,
        Fit::Resize,
        None,
    )?
    .images;
    let cfg = BuildConfig {
        fixed_point_iterations: a.fixed_point,
        psnr_threshold: a.min_psnr,
        map_layout: a.map_layout,
        ..BuildConfig::for_model(sd, a.steps)
    };
    let detector = shapes_relation_detector(&images)?;
    let check = a.check_relation.then_some(ReconstructionCheck {
        detector: &detector,
        min_score: l2s_eval::SCORE_THRESHOLD,
    });
    let check_name = a.check_relation.then_some("shapes");
    let mut dual = open_dataset(
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
    let mut single = open_dataset(
        sd,
        &images,
        &single_cfg,
        check_name,
        &a.work.join("data-single"),
        256,
    )?;
    let b = progress.stage("data", images.len());
    let summary = build(
        sd,
        &images,
        &cfg,
        check.as_ref(),
        a.workers,
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
    tracing::info!("data: {}", serde_json::to_string(&summary)?);
    l2s_generate::write_atomic(&done, b"done")?;
    Ok(())
}

/// Stage 3: both classifiers.
fn train_classifiers(a: &ShapesBench, progress: &dyn BenchProgress) -> Result<()> {
    let mut cfg = TrainConfig::sd();
    cfg.max_epochs = a.epochs;
    cfg.lr = a.classifier_lr;
    cfg.early_stop_patience = a.patience;
    cfg.augment = a.augment;
    cfg.architecture = a.architecture.clone();
    let todo: Vec<&str> = ["dual", "single"]
        .into_iter()
        .filter(|k| {
            !a.work
                .join(format!("clf-{k}"))
                .join("classifier.json")
                .exists()
        })
        .collect();
    let one = |kind: &str, b: Box<dyn StageBar>| -> Result<()> {
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
        tracing::info!(
            "classifier {kind}: {}",
            serde_json::to_string(&report.meta.metrics)?
        );
        Ok(())
    };
    let new_bar = |kind: &str| progress.stage(&format!("train {kind}"), a.epochs);
    if a.workers < 2 {
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
            h.join().map_err(|_| {
                crate::SteerError::Invalid("a classifier training thread panicked".into())
            })?
        })
    })
}

/// Each classifier's accuracy on the dual-inversion test maps (the same held-out images).
fn classifier_accuracies(sd: &Pipeline, a: &ShapesBench) -> Result<serde_json::Value> {
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
fn prompts(n: usize) -> Result<Vec<TaskPrompt>> {
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
                .map_err(crate::SteerError::Invalid)?
                .map(|p| p.task().clone())
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
        other => crate::error::bail!("--methods: unknown method `{other}` (base, centroid, attend-excite, l2s-single, l2s-dual)"),
    })
}

/// One row of the table.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MethodSummary {
    pub method: String,
    pub images: usize,
    pub spatial_accuracy: f64,
    pub object_accuracy: f64,
    pub seconds_per_image: f64,
    pub mean_final_loss: Option<f64>,
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
pub fn run_method(
    model: &Pipeline,
    model_name: &str,
    a: &ShapesBench,
    name: &str,
    progress: &dyn BenchProgress,
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
                    crate::steering::UpdateRule::Raw
                } else {
                    crate::steering::UpdateRule::Normalized
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
        guidance: a
            .guidance
            .unwrap_or_else(|| model.sampling_defaults().guidance),
        negative_prompt: String::new(),
        seed: 0,
        seeding: Seeding::PerSample,
        images_per_prompt: a.seeds as usize,
        width: None,
        height: None,
        shard: ShardSpec::all(),
        workers: a.workers,
    };
    // A run folder of other evaluation settings is the bench's own cache: start it again.
    let ps = prompts(a.prompts)?;
    if let Some(Ok(old)) = read_run_info(&dir) {
        if !old
            .differences(&run.run_info(ps.len(), PROMPT_SOURCE)?)
            .is_empty()
        {
            tracing::info!("{name}: evaluation settings changed; evaluating again");
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
    }
    let b = progress.stage(name, ps.len() * a.seeds as usize);
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
    .map_err(crate::SteerError::Invalid)?;
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
    tracing::info!("{name}: {}", serde_json::to_string(&row)?);
    Ok(row)
}

const PROMPT_SOURCE: &str = "l2s bench shapes: held-out shapes prompts (shuffled with seed 7)";

/// The data and classifiers cached in --work belong to one model and one set of data settings; a
/// rerun with others would silently mix them, so it is refused. (Evaluation settings are checked
/// per method in [`run_method`].)
fn check_work_folder(sd: &Pipeline, a: &ShapesBench) -> Result<()> {
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
        "architecture": a.architecture,
        "map_layout": a.map_layout,
    });
    if path.exists() {
        let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{}: not a settings file", path.display()))?;
        if saved != settings {
            crate::error::bail!(
                "{} was made with other settings ({saved}); this run asks for {settings}. \
                 Use another --work folder, or delete this one to start over",
                a.work.display()
            );
        }
        return Ok(());
    }
    write_json(&path, &settings)
}

/// Runs (or resumes) the experiment in `cfg.work` with `sd`, named `model_name` in the records.
pub fn run_shapes_bench(
    sd: &Pipeline,
    model_name: &str,
    cfg: &ShapesBench,
    progress: &dyn BenchProgress,
) -> Result<BenchResults> {
    let a = &ShapesBench {
        guidance: Some(cfg.guidance.unwrap_or(sd.sampling_defaults().guidance)),
        ..cfg.clone()
    };
    std::fs::create_dir_all(&a.work).with_context(|| format!("creating {}", a.work.display()))?;
    check_work_folder(sd, a)?;
    let needs_classifiers = a.methods.iter().any(|m| m.starts_with("l2s"));
    let mut accuracies = serde_json::Value::Null;
    if needs_classifiers {
        build_data(sd, a, progress)?;
        train_classifiers(a, progress)?;
        accuracies = classifier_accuracies(sd, a)?;
        tracing::info!("classifier accuracy on dual-inversion test maps: {accuracies}");
    }
    let mut summaries = Vec::new();
    for m in &a.methods {
        summaries.push(run_method(sd, model_name, a, m, progress)?);
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
    Ok(BenchResults {
        methods: summaries,
        classifier_accuracy: accuracies,
        table,
    })
}
