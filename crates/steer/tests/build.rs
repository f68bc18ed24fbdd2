//! The dataset builder end to end on the built-in shapes model: several workers write exactly
//! what one writes, and the relation check drops what the detector does not confirm.

use l2s_eval::{Detection, Detector};
use l2s_models::{LoadOptions, Pipeline};
use l2s_shapes::{render_scene, DetectorConfig, RenderConfig, ShapeDetector};
use l2s_steer::build::{
    build, relation_names, AnnotatedImage, BuildConfig, BuildSummary, DropRule, ImageData,
    ReconstructionCheck,
};
use l2s_steer::dataset::{DatasetInfo, DatasetWriter, ShardSpec};
use l2s_steer::maps::MapLayout;
use l2s_steer::Dataset;

fn model() -> Pipeline {
    let dir = l2s_shapes_model::embedded::model_dir().unwrap();
    Pipeline::load(&dir, &LoadOptions::default(), None).unwrap()
}

fn images(n: u64) -> Vec<AnnotatedImage> {
    let cfg = RenderConfig {
        min_objects: 2,
        max_objects: 2,
        ..RenderConfig::with_size(32)
    };
    (0..n)
        .map(|i| {
            let scene = render_scene(&cfg, 11, i).unwrap();
            AnnotatedImage {
                id: i.to_string(),
                objects: scene
                    .objects
                    .iter()
                    .map(|o| (o.class.name().to_string(), o.bbox))
                    .collect(),
                image: ImageData::Pixels(scene.image),
                triplets: Vec::new(),
            }
        })
        .collect()
}

fn config() -> BuildConfig {
    BuildConfig {
        steps: 4,
        fixed_point_iterations: 0,
        step_indices: vec![1, 3],
        psnr_threshold: 0.0,
        dual_inversion: true,
        seed: 0,
        shard: ShardSpec::all(),
        rf: Default::default(),
        drop_rule: DropRule::PerSample,
        map_layout: MapLayout::Ours,
    }
}

fn info(num_maps: usize) -> DatasetInfo {
    DatasetInfo {
        model: "shapes".into(),
        num_maps,
        map_size: 16,
        step_indices: vec![1, 3],
        relations: relation_names(),
        layers: Vec::new(),
        dual_inversion: true,
        extra: Default::default(),
    }
}

/// Builds into `dir` and returns the summary.
fn run(
    sd: &Pipeline,
    imgs: &[AnnotatedImage],
    dir: &std::path::Path,
    workers: usize,
    check: Option<&ReconstructionCheck>,
) -> BuildSummary {
    run_with(sd, imgs, dir, workers, check, &config())
}

fn run_with(
    sd: &Pipeline,
    imgs: &[AnnotatedImage],
    dir: &std::path::Path,
    workers: usize,
    check: Option<&ReconstructionCheck>,
    cfg: &BuildConfig,
) -> BuildSummary {
    let num_maps = 22;
    let mut w = DatasetWriter::open(dir, info(num_maps), 3).unwrap();
    let s = build(
        sd,
        imgs,
        cfg,
        check,
        workers,
        &mut w,
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    w.finish().unwrap();
    s
}

struct Nothing(Vec<String>);

impl Detector for Nothing {
    fn detect(&self, _: &image::RgbImage) -> Result<Vec<Detection>, l2s_eval::DetectError> {
        Ok(Vec::new())
    }
    fn classes(&self) -> &[String] {
        &self.0
    }
}

#[test]
fn workers_write_what_one_writes_and_the_check_filters() {
    let sd = model();
    let imgs = images(3);
    let tmp = tempfile::tempdir().unwrap();
    let one = run(&sd, &imgs, &tmp.path().join("one"), 1, None);
    let two = run(&sd, &imgs, &tmp.path().join("two"), 2, None);
    let pairs = imgs.len() - one.no_unambiguous_pair;
    assert!(pairs >= 2, "the test needs images with an unambiguous pair");
    assert_eq!(one.written, 2 * pairs);
    assert_eq!(two.written, one.written);
    for name in [
        "manifest.jsonl",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ] {
        let a = std::fs::read(tmp.path().join("one").join(name)).unwrap();
        let b = std::fs::read(tmp.path().join("two").join(name)).unwrap();
        assert!(a == b, "{name} differs between one and two workers");
    }
    let ds = Dataset::open(tmp.path().join("two")).unwrap();
    let samples: Vec<u64> = ds.entries().iter().map(|e| e.meta.sample).collect();
    let mut sorted = samples.clone();
    sorted.sort();
    assert_eq!(samples, sorted, "samples are written in order");

    // A detector that sees nothing drops every sample, and says why.
    let blind = Nothing(Vec::new());
    let none = run(
        &sd,
        &imgs,
        &tmp.path().join("none"),
        2,
        Some(&ReconstructionCheck {
            detector: &blind,
            min_score: 0.3,
        }),
    );
    assert_eq!(none.written, 0);
    assert_eq!(none.dropped_relation_lost, 2 * pairs);

    // The exact detector keeps some and drops some; each kept sample's reconstruction was judged
    // to show the true relation, so kept + dropped covers every sample.
    let exact = ShapeDetector::new(DetectorConfig::for_render(&RenderConfig::with_size(32)));
    let checked = run(
        &sd,
        &imgs,
        &tmp.path().join("checked"),
        1,
        Some(&ReconstructionCheck {
            detector: &exact,
            min_score: 0.3,
        }),
    );
    assert_eq!(checked.written + checked.dropped_relation_lost, 2 * pairs);
}

/// The paper's rule: a true-prompt sample that is dropped takes its wrong-prompt twin with it,
/// uninverted; judged per sample, each twin is inverted and dropped on its own.
#[test]
fn a_dropped_true_prompt_sample_takes_its_twin() {
    let sd = model();
    let imgs = images(3);
    let tmp = tempfile::tempdir().unwrap();
    // No reconstruction reaches an infinite PSNR: every true-prompt sample fails.
    let unreachable = BuildConfig {
        psnr_threshold: f64::INFINITY,
        drop_rule: DropRule::Twins,
        ..config()
    };
    let twins = run_with(&sd, &imgs, &tmp.path().join("twins"), 2, None, &unreachable);
    let pairs = imgs.len() - twins.no_unambiguous_pair;
    assert!(pairs >= 2, "the test needs images with an unambiguous pair");
    assert_eq!(
        (twins.written, twins.dropped_low_psnr, twins.dropped_twin),
        (0, pairs, pairs)
    );
    let per_sample = BuildConfig {
        drop_rule: DropRule::PerSample,
        ..unreachable
    };
    let alone = run_with(&sd, &imgs, &tmp.path().join("alone"), 1, None, &per_sample);
    assert_eq!(
        (alone.written, alone.dropped_low_psnr, alone.dropped_twin),
        (0, 2 * pairs, 0)
    );
    // The relation check's drops count the same way.
    let blind = Nothing(Vec::new());
    let check = ReconstructionCheck {
        detector: &blind,
        min_score: 0.3,
    };
    let twins_rule = BuildConfig {
        drop_rule: DropRule::Twins,
        ..config()
    };
    let lost = run_with(
        &sd,
        &imgs,
        &tmp.path().join("lost"),
        1,
        Some(&check),
        &twins_rule,
    );
    assert_eq!(
        (lost.written, lost.dropped_relation_lost, lost.dropped_twin),
        (0, pairs, pairs)
    );
    // A true-prompt sample that passes keeps its twin: the rule drops nothing else.
    let kept = run_with(&sd, &imgs, &tmp.path().join("kept"), 1, None, &twins_rule);
    assert_eq!((kept.written, kept.dropped_twin), (2 * pairs, 0));
}
