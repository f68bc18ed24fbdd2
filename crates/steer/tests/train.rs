//! Training on a synthetic, separable dataset; the split by image; early stopping; the learning
//! rate schedule; checkpoints and their refusal errors.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use l2s_steer::classifier::{Architecture, StepInput, WeightLayout};
use l2s_steer::dataset::Examples;
use l2s_steer::train::{
    evaluate_classifier, fit, save_checkpoint, split_by_image, split_examples, ReduceOnPlateau,
    SplitFractions, META_FILE, WEIGHTS_FILE,
};
use l2s_steer::{
    load_classifier, train, train_on, CheckpointError, CheckpointMeta, ClassifierConfig, Dataset,
    DatasetError, DatasetInfo, DatasetWriter, EncoderConfig, LayerInfo, ManifestEntry, Preset,
    RelationClassifier, SampleKind, SampleMeta, ShardSpec, TrainConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const RELS: [&str; 4] = ["left of", "right of", "above", "below"];
const C: usize = 4;
const S: usize = 16;

fn info() -> DatasetInfo {
    DatasetInfo {
        model: "synthetic-blobs".into(),
        num_maps: C,
        map_size: S,
        step_indices: vec![5, 10],
        relations: RELS.iter().map(|s| s.to_string()).collect(),
        layers: vec![LayerInfo {
            name: "mid".into(),
            heads: C,
            height: S,
            width: S,
        }],
        dual_inversion: true,
        extra: Default::default(),
    }
}

fn small_classifier() -> ClassifierConfig {
    ClassifierConfig {
        d_model: 32,
        object: EncoderConfig {
            layers: 1,
            heads: 2,
            ff: 64,
            dropout: 0.1,
        },
        head: EncoderConfig {
            layers: 1,
            heads: 2,
            ff: 64,
            dropout: 0.1,
        },
        step_dim: 8,
        mlp_hidden: vec![32, 16],
        mlp_dropout: 0.1,
        ..ClassifierConfig::sd(C, 2, 4)
    }
}

fn quick_config() -> TrainConfig {
    TrainConfig {
        classifier: Some(small_classifier()),
        max_epochs: 12,
        batch_size: 32,
        lr: 2e-3,
        split: SplitFractions {
            train: 0.7,
            val: 0.15,
            test: 0.15,
        },
        seed: 7,
        ..TrainConfig::sd()
    }
}

/// One word's C maps: Gaussian blobs near (cx, cy) with jitter and background noise, each summing to 1.
fn blob_maps(rng: &mut ChaCha8Rng, cx: f32, cy: f32, noise: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(C * S * S);
    for _ in 0..C {
        let (jx, jy) = (rng.gen_range(-1.0..1.0f32), rng.gen_range(-1.0..1.0f32));
        let sigma = rng.gen_range(1.5..2.5f32);
        let mut m: Vec<f32> = (0..S * S)
            .map(|p| {
                let (x, y) = ((p % S) as f32 + 0.5, (p / S) as f32 + 0.5);
                let d2 = (x - cx - jx).powi(2) + (y - cy - jy).powi(2);
                (-d2 / (2.0 * sigma * sigma)).exp() + noise * rng.gen::<f32>()
            })
            .collect();
        let sum: f32 = m.iter().sum();
        m.iter_mut().for_each(|v| *v /= sum);
        out.extend(m);
    }
    out
}

/// (S=2 steps, 2 words, C, 16, 16) maps whose layout shows `label`.
fn sample_maps(rng: &mut ChaCha8Rng, label: usize) -> Tensor {
    let (ox, oy) = (rng.gen_range(5.0..11.0f32), rng.gen_range(5.0..11.0f32));
    let gap = rng.gen_range(4.0..6.0f32);
    let side = rng.gen_range(-1.5..1.5f32);
    let (sx, sy) = match label {
        0 => (ox - gap, oy + side),
        1 => (ox + gap, oy + side),
        2 => (ox + side, oy - gap),
        _ => (ox + side, oy + gap),
    };
    let mut v = Vec::new();
    for step in 0..2 {
        let noise = if step == 0 { 0.3 } else { 0.15 };
        v.extend(blob_maps(rng, sx, sy, noise));
        v.extend(blob_maps(rng, ox, oy, noise));
    }
    Tensor::from_vec(v, (2, 2, C, S, S), &Device::Cpu).unwrap()
}

fn meta(id: u64, image: usize, label: usize, positive: bool) -> SampleMeta {
    let prompt_rel = if positive {
        RELS[label]
    } else {
        RELS[(label + 1 + image % 3) % 4]
    };
    SampleMeta {
        sample: id,
        image_id: format!("image-{image:04}"),
        subject: "red circle".into(),
        object: "blue square".into(),
        relation: RELS[label].into(),
        label,
        prompt: format!("a red circle {prompt_rel} a blue square"),
        prompt_relation: prompt_rel.into(),
        kind: if positive {
            SampleKind::Positive
        } else {
            SampleKind::Negative
        },
        psnr: 30.0,
    }
}

/// A dataset folder of `images` images, each with a positive and a negative sample.
fn synthetic_dataset(dir: &Path, images: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = DatasetWriter::open(dir, info(), 64).unwrap();
    for image in 0..images {
        let label = image % 4;
        for (k, positive) in [true, false].into_iter().enumerate() {
            let maps = sample_maps(&mut rng, label);
            w.append(meta((image * 2 + k) as u64, image, label, positive), &maps)
                .unwrap();
        }
    }
    w.finish().unwrap();
}

/// [`synthetic_dataset`]'s samples split into parts of one build: part `i` of `dirs.len()`
/// gets the samples whose id is `i − 1` mod n, each with the maps the whole dataset gives it.
fn synthetic_parts(dirs: &[PathBuf], images: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = dirs.len();
    let mut writers: Vec<DatasetWriter> = dirs
        .iter()
        .map(|d| DatasetWriter::open(d, info(), 64).unwrap())
        .collect();
    for image in 0..images {
        let label = image % 4;
        for (k, positive) in [true, false].into_iter().enumerate() {
            let maps = sample_maps(&mut rng, label);
            let id = (image * 2 + k) as u64;
            let part = (1..=n)
                .find(|i| ShardSpec::new(*i, n).unwrap().owns(id))
                .unwrap();
            writers[part - 1]
                .append(meta(id, image, label, positive), &maps)
                .unwrap();
        }
    }
    for w in writers {
        w.finish().unwrap();
    }
}

fn same_examples(a: &Examples, b: &Examples) {
    assert_eq!(a.samples, b.samples);
    assert_eq!(a.image_ids, b.image_ids);
    assert_eq!(a.label_list, b.label_list);
    assert_eq!(
        a.steps.to_vec1::<u32>().unwrap(),
        b.steps.to_vec1::<u32>().unwrap()
    );
    let diff = (&a.maps - &b.maps)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(a.maps.dims(), b.maps.dims());
    assert_eq!(diff, 0.0);
}

#[test]
fn training_on_parts_sees_what_training_on_their_merge_sees() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = [tmp.path().join("part1"), tmp.path().join("part2")];
    synthetic_parts(&parts, 24, 3);
    let merged = tmp.path().join("merged");
    l2s_steer::merge(&parts, &merged).unwrap();
    let many = Dataset::open_many(&parts).unwrap();
    let one = Dataset::open(&merged).unwrap();
    assert_eq!(many.len(), 48);
    // Both halves of each image (its two prompts, in different parts) land in one split.
    let cfg = TrainConfig {
        max_epochs: 1,
        ..quick_config()
    };
    let (a, b) = (
        split_examples(&many, &cfg).unwrap(),
        split_examples(&one, &cfg).unwrap(),
    );
    same_examples(&a.train, &b.train);
    same_examples(&a.val, &b.val);
    same_examples(&a.test, &b.test);
    let images = |e: &Examples| e.image_ids.iter().cloned().collect::<HashSet<String>>();
    assert!(images(&a.train).is_disjoint(&images(&a.val)));
    assert_eq!(
        images(&a.train).len() + images(&a.val).len() + images(&a.test).len(),
        24
    );
    // Training reads the same splits from both.
    let report = |ds: &Dataset, out: &str| {
        train_on(ds, &tmp.path().join(out), &cfg, &Device::Cpu, &mut |_| {})
            .unwrap()
            .meta
    };
    let (m_many, m_one) = (report(&many, "clf-parts"), report(&one, "clf-merged"));
    let sizes = |m: &CheckpointMeta| {
        let t = m.metrics.as_ref().unwrap();
        (t.train_split, t.val_split, t.test_split)
    };
    assert_eq!(sizes(&m_many), sizes(&m_one));
    assert_eq!(sizes(&m_many).0.samples, a.train.len() / 2);
    assert_eq!(
        (m_many.model.as_str(), &m_many.step_indices),
        (m_one.model.as_str(), &m_one.step_indices)
    );

    // A dataset of other relations cannot join them; the error names the field.
    let odd = tmp.path().join("odd");
    let mut other = info();
    other.relations.reverse();
    let mut w = DatasetWriter::open(&odd, other, 64).unwrap();
    w.append(
        SampleMeta {
            label: 3,
            ..meta(100, 50, 0, true)
        },
        &sample_maps(&mut ChaCha8Rng::seed_from_u64(0), 0),
    )
    .unwrap();
    w.finish().unwrap();
    let e = Dataset::open_many(&[parts[0].clone(), odd]).unwrap_err();
    assert!(
        matches!(e, DatasetError::InfoMismatch { ref field, .. } if field == "relations"),
        "{e}"
    );
    assert!(
        e.to_string().contains("part1") && e.to_string().contains("odd"),
        "{e}"
    );
}

/// The published architecture with its maps scaled by S·S on entry: raw maps (values near
/// 1/(S·S)) need far more optimiser steps than these 160 images give (BENCHMARKS.md).
fn scaled_authors() -> Architecture {
    Architecture {
        scale_maps: true,
        ..Architecture::authors()
    }
}

#[test]
fn the_published_architecture_learns_separable_relations_and_round_trips() {
    learns_separable_relations_and_round_trips_the_checkpoint(scaled_authors());
}

#[test]
fn the_legacy_architecture_learns_separable_relations_and_round_trips() {
    learns_separable_relations_and_round_trips_the_checkpoint(Architecture::legacy());
}

fn learns_separable_relations_and_round_trips_the_checkpoint(architecture: Architecture) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_dataset(&data, 160, 1);
    let out = tmp.path().join("clf");
    let mut epochs_seen = Vec::new();
    let cfg = TrainConfig {
        architecture: architecture.clone(),
        ..quick_config()
    };
    let report = train(&data, &out, &cfg, &Device::Cpu, &mut |r| {
        epochs_seen.push(r.epoch);
        eprintln!(
            "epoch {:>2}: train {:.3} ({:.2}) val {:.3} ({:.2}) lr {:.1e}{}",
            r.epoch,
            r.train_loss,
            r.train_accuracy,
            r.val_loss,
            r.val_accuracy,
            r.lr,
            if r.improved { " *" } else { "" }
        );
    })
    .unwrap();
    assert_eq!(epochs_seen, (1..=report.history.len()).collect::<Vec<_>>());
    let metrics = report.meta.metrics.as_ref().unwrap();
    let test = metrics.test.as_ref().unwrap();
    eprintln!(
        "test accuracy {:.3} on {} examples, best epoch {} of {} in {:.1}s; per relation {:?}",
        test.accuracy,
        test.examples,
        metrics.best_epoch,
        metrics.epochs_run,
        metrics.seconds,
        test.per_relation
            .iter()
            .map(|r| (r.relation.as_str(), r.accuracy))
            .collect::<Vec<_>>()
    );
    assert!(test.accuracy >= 0.9, "test accuracy {}", test.accuracy);
    assert_eq!(test.per_relation.len(), 4);
    assert_eq!(
        test.confusion.iter().flatten().sum::<usize>(),
        test.examples
    );
    assert_eq!(test.examples, metrics.test_split.examples);
    assert_eq!(
        metrics.train_split.images + metrics.val_split.images + metrics.test_split.images,
        160
    );
    assert_eq!(
        metrics.train_split.samples * 2,
        metrics.train_split.examples
    );
    assert!(out.join(WEIGHTS_FILE).is_file() && out.join(META_FILE).is_file());

    // The checkpoint describes its data and reloads as the same classifier.
    let (model, meta) = load_classifier(
        &out,
        Some("synthetic-blobs"),
        Some(C),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    // (JSON keeps floats to within an ulp; compare the description exactly and the numbers closely.)
    assert_eq!(
        CheckpointMeta {
            metrics: None,
            ..meta.clone()
        },
        CheckpointMeta {
            metrics: None,
            ..report.meta.clone()
        }
    );
    let reread = meta.metrics.as_ref().unwrap().test.as_ref().unwrap();
    assert!((reread.accuracy - test.accuracy).abs() < 1e-12 && reread.confusion == test.confusion);
    assert_eq!(meta.step_indices, vec![5, 10]);
    assert_eq!(meta.relations, RELS.to_vec());
    assert!(meta.dual_inversion);
    assert_eq!(meta.layers[0].name, "mid");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(META_FILE)).unwrap()).unwrap();
    for key in [
        "config",
        "relations",
        "step_indices",
        "map_size",
        "num_maps",
        "layers",
        "model",
        "dual_inversion",
        "metrics",
    ] {
        assert!(json.get(key).is_some(), "classifier.json lacks {key}");
    }
    let ds = Dataset::open(&data).unwrap();
    let split = split_by_image(ds.entries(), quick_config().split, quick_config().seed);
    let test_ex = ds.load(&split.test, DType::F32).unwrap();
    let again = evaluate_classifier(&model, &test_ex, 64, &meta.relations, &Device::Cpu).unwrap();
    assert_eq!(again.accuracy, test.accuracy);
    assert!((again.loss - test.loss).abs() < 1e-5);
    assert_eq!(model.architecture(), &architecture);
    // Either file of the pair also names the checkpoint.
    load_classifier(&out.join(META_FILE), None, None, &Device::Cpu, DType::F32).unwrap();
    load_classifier(
        &out.join(WEIGHTS_FILE),
        None,
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
}

fn entries(images: usize, per_image: usize) -> Vec<ManifestEntry> {
    (0..images * per_image)
        .map(|i| ManifestEntry {
            meta: meta(i as u64, i / per_image, 0, i % per_image == 0),
            shard: "shard-00000.safetensors".into(),
            row: i,
        })
        .collect()
}

#[test]
fn split_by_image_has_no_leakage() {
    let es = entries(200, 2);
    let fr = SplitFractions {
        train: 0.8,
        val: 0.1,
        test: 0.1,
    };
    let split = split_by_image(&es, fr, 3);
    let images = |idx: &[usize]| {
        idx.iter()
            .map(|&i| es[i].meta.image_id.clone())
            .collect::<HashSet<_>>()
    };
    let (tr, va, te) = (
        images(&split.train),
        images(&split.val),
        images(&split.test),
    );
    assert!(tr.is_disjoint(&va) && tr.is_disjoint(&te) && va.is_disjoint(&te));
    assert_eq!((tr.len(), va.len(), te.len()), (160, 20, 20));
    let mut all: Vec<usize> = [split.train.clone(), split.val.clone(), split.test.clone()].concat();
    all.sort();
    assert_eq!(
        all,
        (0..400).collect::<Vec<_>>(),
        "every entry in exactly one split"
    );
    // Both prompts of an image travel together.
    let side: HashMap<usize, u8> = split
        .train
        .iter()
        .map(|&i| (i, 0))
        .chain(split.val.iter().map(|&i| (i, 1)))
        .chain(split.test.iter().map(|&i| (i, 2)))
        .collect();
    for i in (0..400).step_by(2) {
        assert_eq!(side[&i], side[&(i + 1)]);
    }
    assert_eq!(split_by_image(&es, fr, 3), split, "seeded");
    assert_ne!(split_by_image(&es, fr, 4), split);
    // Tiny sets still get a validation and a test image.
    let small = split_by_image(&entries(3, 2), fr, 0);
    assert_eq!(
        (small.train.len(), small.val.len(), small.test.len()),
        (2, 2, 2)
    );
    let no_test = split_by_image(
        &es,
        SplitFractions {
            train: 0.9,
            val: 0.1,
            test: 0.0,
        },
        0,
    );
    assert!(no_test.test.is_empty());
}

/// Examples in memory with random labels: nothing to learn, so validation loss stops improving.
fn noise_examples(n: usize, seed: u64) -> Examples {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let maps = Tensor::rand(0f32, 1.0, (n, 2, C, S, S), &Device::Cpu).unwrap();
    let label_list: Vec<u32> = (0..n).map(|_| rng.gen_range(0..4)).collect();
    Examples {
        maps,
        steps: Tensor::new(
            (0..n).map(|i| (i % 2) as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap(),
        labels: Tensor::new(label_list.clone(), &Device::Cpu).unwrap(),
        recorded_steps: vec![0, 1],
        image_ids: (0..n).map(|i| format!("img{i}")).collect(),
        samples: (0..n as u64).collect(),
        label_list,
    }
}

#[test]
fn early_stopping_triggers_and_keeps_the_best_epoch() {
    let cfg = TrainConfig {
        max_epochs: 200,
        early_stop_patience: 3,
        plateau_patience: 1,
        lr: 1e-2,
        batch_size: 16,
        ..quick_config()
    };
    let (tr, va) = (noise_examples(96, 1), noise_examples(48, 2));
    let rels: Vec<String> = RELS.iter().map(|s| s.to_string()).collect();
    let mut lrs = Vec::new();
    let out = fit(
        &small_classifier(),
        &cfg,
        &tr,
        &va,
        &rels,
        &Device::Cpu,
        &mut |r| lrs.push(r.lr),
    )
    .unwrap();
    eprintln!(
        "stopped after {} epochs, best {} ({:.3}); lrs {lrs:?}",
        out.epochs_run, out.best_epoch, out.best_val_loss
    );
    assert!(out.stopped_early);
    assert!(out.epochs_run < 200);
    assert_eq!(out.epochs_run, out.best_epoch + 3);
    let best = &out.history[out.best_epoch - 1];
    assert!(best.improved && out.history[out.best_epoch..].iter().all(|r| !r.improved));
    assert_eq!(best.val_loss, out.best_val_loss);
    assert!(out.history.iter().all(|r| r.val_loss >= out.best_val_loss));
    // The kept weights are the best epoch's.
    let model = RelationClassifier::with_architecture(
        &small_classifier(),
        &cfg.architecture,
        VarBuilder::from_varmap(&out.varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let ev = evaluate_classifier(&model, &va, 16, &rels, &Device::Cpu).unwrap();
    assert!(
        (ev.loss - out.best_val_loss).abs() < 1e-5,
        "{} vs {}",
        ev.loss,
        out.best_val_loss
    );
    // With plateau patience 1, two epochs without improvement halve the learning rate.
    if out.epochs_run > out.best_epoch + 2 {
        assert!(lrs.last().unwrap() < &1e-2, "{lrs:?}");
    }
}

#[test]
fn plateau_schedule() {
    let mut p = ReduceOnPlateau::new(0.5, 2, 1e-3);
    let mut lr = 1e-2;
    for m in [1.0, 0.9, 0.8] {
        lr = p.step(m, lr);
    }
    assert_eq!(lr, 1e-2);
    // Patience 2: the third epoch without improvement halves the rate.
    lr = p.step(0.8, lr);
    lr = p.step(0.85, lr);
    assert_eq!(lr, 1e-2);
    lr = p.step(0.8, lr);
    assert_eq!(lr, 5e-3);
    for _ in 0..20 {
        lr = p.step(1.0, lr);
    }
    assert_eq!(lr, 1e-3, "floored at the minimum");
}

fn fake_checkpoint(dir: &Path) -> CheckpointMeta {
    let cfg = small_classifier();
    let vm = VarMap::new();
    RelationClassifier::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let info = info();
    let meta = CheckpointMeta {
        config: cfg,
        relations: info.relations.clone(),
        step_indices: info.step_indices.clone(),
        map_size: S,
        num_maps: C,
        layers: info.layers.clone(),
        model: info.model.clone(),
        dual_inversion: true,
        metrics: None,
        num_inference_steps: None,
        orig_map_size: None,
        map_layout: Default::default(),
    };
    save_checkpoint(dir, &vm, &meta).unwrap();
    meta
}

#[test]
fn refuses_checkpoints_for_another_model_or_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("clf");
    let meta = fake_checkpoint(&dir);
    assert_eq!(meta.step_index_for(0), 0);
    assert_eq!(meta.step_index_for(5), 0);
    assert_eq!(meta.step_index_for(6), 1);
    assert_eq!(meta.step_index_for(40), 1);

    let (_, m) = load_classifier(
        &dir,
        Some("synthetic-blobs"),
        Some(C),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_eq!(m, meta);

    let e = load_classifier(
        &dir,
        Some("stable-diffusion-2-1-base"),
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err();
    assert!(matches!(e, CheckpointError::WrongModel { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("synthetic-blobs")
            && msg.contains("stable-diffusion-2-1-base")
            && msg.contains("classifier.json"),
        "{msg}"
    );

    let e = load_classifier(&dir, None, Some(195), &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(
        e,
        CheckpointError::WrongLayout {
            trained: 4,
            expected: 195,
            ..
        }
    ));
    assert!(
        e.to_string().contains("4 maps") && e.to_string().contains("195"),
        "{e}"
    );

    // Weights that do not fit the description.
    let other = tmp.path().join("other");
    fake_checkpoint(&other);
    let mut bigger = meta.clone();
    bigger.config.d_model = 64;
    std::fs::write(
        other.join(META_FILE),
        serde_json::to_string(&bigger).unwrap(),
    )
    .unwrap();
    let e = load_classifier(&other, None, None, &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(e, CheckpointError::Weights { .. }), "{e}");
    assert!(e.to_string().contains(WEIGHTS_FILE), "{e}");

    // Missing weights, broken description, nothing there.
    std::fs::remove_file(other.join(WEIGHTS_FILE)).unwrap();
    let e = load_classifier(&other, None, None, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains(WEIGHTS_FILE) && e.contains("missing"), "{e}");
    std::fs::write(other.join(META_FILE), "{\"config\": 3}").unwrap();
    let e = load_classifier(&other, None, None, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(META_FILE) && e.contains("not a classifier description"),
        "{e}"
    );
    assert!(load_classifier(
        &tmp.path().join("none"),
        None,
        None,
        &Device::Cpu,
        DType::F32
    )
    .is_err());
}

#[test]
fn bad_settings_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_dataset(&data, 8, 2);
    let cfg = TrainConfig {
        batch_size: 0,
        ..quick_config()
    };
    let e = train(
        &data,
        &tmp.path().join("o"),
        &cfg,
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("batch size"), "{e}");
    let cfg = TrainConfig {
        split: SplitFractions {
            train: 1.0,
            val: 0.0,
            test: 0.0,
        },
        ..quick_config()
    };
    assert!(train(
        &data,
        &tmp.path().join("o"),
        &cfg,
        &Device::Cpu,
        &mut |_| {}
    )
    .is_err());
    let e = train(
        &tmp.path().join("missing"),
        &tmp.path().join("o"),
        &quick_config(),
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("info.json"), "{e}");
    assert_eq!(TrainConfig::flux().lr, 5e-5);
    assert_eq!(TrainConfig::for_preset(Preset::Sd).lr, 1e-4);
    assert_eq!(
        TrainConfig::flux().classifier_config(&info()).object.layers,
        4
    );
}

/// Initialisation and dropout draw from generators seeded by the training seed: the same data
/// and settings give the same classifier file, byte for byte; another seed another classifier.
#[test]
fn training_is_reproducible_from_its_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_dataset(&data, 40, 3);
    let cfg = TrainConfig {
        max_epochs: 2,
        ..quick_config()
    };
    let weights = |name: &str, cfg: &TrainConfig| {
        let out = tmp.path().join(name);
        train(&data, &out, cfg, &Device::Cpu, &mut |_| {}).unwrap();
        std::fs::read(out.join("classifier.safetensors")).unwrap()
    };
    let a = weights("a", &cfg);
    assert!(a == weights("b", &cfg), "two trainings with seed 7 differ");
    let other = TrainConfig { seed: 8, ..cfg };
    assert!(
        a != weights("c", &other),
        "seeds 7 and 8 train the same weights"
    );
}

/// `l2s train` builds the published classifier by default: its weight names, a step embedding
/// row per denoising step of the build's schedule (fed the recorded step itself), and the maps'
/// layout carried from the dataset into the checkpoint, where steering reads it.
#[test]
fn training_builds_the_published_architecture_by_default() {
    assert_eq!(TrainConfig::sd().architecture, Architecture::authors());
    assert_eq!(TrainConfig::flux().architecture, Architecture::authors());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut published = info();
    published.set_map_layout(l2s_steer::maps::MapLayout::Published);
    published
        .extra
        .insert("num_inference_steps".into(), 12.into());
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut w = DatasetWriter::open(&data, published, 64).unwrap();
    for image in 0..24 {
        let maps = sample_maps(&mut rng, image % 4);
        w.append(meta(image as u64, image, image % 4, true), &maps)
            .unwrap();
    }
    w.finish().unwrap();
    let out = tmp.path().join("clf");
    let cfg = TrainConfig {
        max_epochs: 1,
        classifier: Some(small_classifier()),
        ..TrainConfig::sd()
    };
    let report = train(&data, &out, &cfg, &Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(
        report.meta.map_layout,
        l2s_steer::maps::MapLayout::Published
    );
    // Rows for steps 0..12 of the build's schedule, not one per recorded step (5, 10).
    assert_eq!(report.meta.config.num_steps, 12);
    let names = candle_core::safetensors::load(out.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    assert_eq!(
        names["object_extractor.timestep_embedding.weight"].dims()[0],
        12
    );
    assert!(names
        .keys()
        .all(|k| k.starts_with("object_extractor.") || k.starts_with("relation_classifier.")));
    let (model, meta) = load_classifier(&out, None, None, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.architecture().layout, WeightLayout::Torch);
    assert_eq!(model.architecture().step_input, StepInput::Raw);
    assert_eq!(meta.map_layout, l2s_steer::maps::MapLayout::Published);
    // Evaluation feeds the recorded steps: step 10's row changes the logits, row 3 does not.
    let ds = Dataset::open(&data).unwrap();
    let ex = ds.load(&[0], DType::F32).unwrap();
    let (maps, steps, _) = ex
        .batch(&[1], DType::F32, &Device::Cpu, StepInput::Raw)
        .unwrap();
    assert_eq!(steps.to_vec1::<u32>().unwrap(), vec![10]);
    let logits = |t: &[u32]| {
        model
            .forward(&maps, &Tensor::new(t, &Device::Cpu).unwrap(), false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_ne!(logits(&[10]), logits(&[3]));
    // A dataset in the other layout is not trained on together with this one.
    let other = tmp.path().join("ours");
    synthetic_dataset(&other, 8, 5);
    let err = Dataset::open_many(&[data.clone(), other]).unwrap_err();
    assert!(err.to_string().contains("map_layout"), "{err}");
}
