//! The published classifiers (PyTorch `.pth` checkpoints) load unchanged and compute what
//! PyTorch computes: logits, cross-entropy and its gradient with respect to the maps, against
//! `tools/fixtures/make_classifier_fixtures.py` (an independent PyTorch implementation with
//! seeded random weights, saved in the published checkpoint format).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use l2s_steer::classifier::{cross_entropy, Architecture, StepInjection, StepInput};
use l2s_steer::classify::{classify, ClassifyError};
use l2s_steer::train::{
    load_classifier, read_checkpoint, read_checkpoint_meta, save_checkpoint_with_architecture,
};
use l2s_steer::{CheckpointError, CheckpointMeta, RelationClassifier};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/authors-classifier")
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        dir().join(format!("{name}.expected.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    diff / scale
}

/// Logits, loss and d loss / d maps of a loaded classifier, in `dtype`.
fn run(
    model: &RelationClassifier,
    exp: &HashMap<String, Tensor>,
    dtype: DType,
) -> (Tensor, Tensor, Tensor) {
    let maps = Var::from_tensor(&exp["maps"].to_dtype(dtype).unwrap()).unwrap();
    let logits = model
        .forward(maps.as_tensor(), &exp["steps"], false)
        .unwrap();
    let loss = cross_entropy(&logits, &exp["labels"]).unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads.get(maps.as_tensor()).unwrap().clone();
    (logits, loss, grad)
}

fn parity(name: &str) {
    let exp = expected(name);
    let path = dir().join(format!("{name}.pth"));
    for (dtype, tag, tol) in [(DType::F32, "f32", 1e-5), (DType::F64, "f64", 1e-10)] {
        let (model, _) = load_classifier(&path, None, None, &Device::Cpu, dtype).unwrap();
        assert_eq!(model.dtype(), dtype);
        let (logits, loss, grad) = run(&model, &exp, dtype);
        let errs = [
            ("logits", rel_err(&logits, &exp[&format!("logits_{tag}")])),
            (
                "loss",
                rel_err(&loss.reshape(1).unwrap(), &exp[&format!("loss_{tag}")]),
            ),
            ("grad", rel_err(&grad, &exp[&format!("grad_{tag}")])),
        ];
        eprintln!("{name} {tag}: relative errors {errs:?}");
        for (what, e) in errs {
            assert!(e < tol, "{name} {tag} {what}: relative error {e:e}");
        }
    }
}

#[test]
fn sd_preset_matches_pytorch() {
    parity("sd");
}

#[test]
fn flux_preset_matches_pytorch() {
    parity("flux");
}

#[test]
fn other_published_options_match_pytorch() {
    parity("variant");
}

#[test]
fn describes_the_published_checkpoint() {
    let (meta, arch) = read_checkpoint(&dir().join("sd.pth")).unwrap();
    assert_eq!(
        meta.relations,
        ["above", "below", "is", "left of", "right of"]
    );
    assert_eq!(meta.step_indices, vec![5, 10, 15, 20, 25, 49]);
    assert_eq!(meta.num_inference_steps, Some(50));
    assert_eq!((meta.num_maps, meta.map_size), (12, 16));
    let c = &meta.config;
    assert_eq!(
        (c.num_steps, c.classes, c.d_model, c.step_dim),
        (50, 5, 32, 16)
    );
    assert_eq!((c.object.layers, c.object.heads, c.object.ff), (2, 2, 48));
    assert_eq!((c.head.layers, c.head.heads, c.head.ff), (2, 4, 48));
    assert_eq!(c.mlp_hidden, vec![256, 128]);
    assert_eq!(
        arch,
        Architecture {
            pool_heads: Some(2),
            ..Architecture::authors()
        }
    );
    let (_, variant) = read_checkpoint(&dir().join("variant.pth")).unwrap();
    assert_eq!(variant.object_step, StepInjection::Input);
    assert_eq!(variant.pool_heads, Some(4));
    assert_eq!(variant.step_input, StepInput::Raw);
    let flux = read_checkpoint_meta(&dir().join("flux.pth")).unwrap();
    assert_eq!(flux.step_indices, vec![1, 3]);
    assert_eq!(flux.config.num_steps, 4);

    // The classifier's step input for a recorded step's slot is the step itself.
    let (model, meta) = load_classifier(
        &dir().join("sd.pth"),
        Some("any-model"),
        Some(8),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_eq!(model.step_input(&meta.step_indices, 1), 10);
    assert_eq!(
        model.step_input(&meta.step_indices, meta.step_index_for(30)),
        49
    );
    // More maps per word than its position table covers.
    let e = load_classifier(
        &dir().join("sd.pth"),
        None,
        Some(13),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            CheckpointError::WrongLayout {
                trained: 12,
                expected: 13,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn refuses_files_that_are_not_relation_classifiers() {
    for (file, needle) in [
        ("unet_state_dict.pth", "bare state dict of 2 tensors"),
        ("no_config.pth", "checkpoint.config is missing"),
    ] {
        let path = dir().join(file);
        for e in [
            load_classifier(&path, None, None, &Device::Cpu, DType::F32).unwrap_err(),
            read_checkpoint_meta(&path).unwrap_err(),
        ] {
            assert!(matches!(e, CheckpointError::NotAClassifier { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(file) && msg.contains(needle), "{msg}");
            assert!(msg.contains("expected a torch.save dict"), "{msg}");
        }
    }
    // Weights the published architecture does not have are reported, not ignored.
    let e = load_classifier(
        &dir().join("extra_weight.pth"),
        None,
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err();
    assert!(matches!(e, CheckpointError::NotAClassifier { .. }), "{e}");
    assert!(
        e.to_string().contains(
            "holds 1 weights the published architecture does not use (object_extractor.transformer.norm.weight)"
        ),
        "{e}"
    );
    // A hostile pickle is refused by the reader, naming the file and the global.
    let evil = dir().join("../torch-pickle/malicious_system.pth");
    let e = load_classifier(&evil, None, None, &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(e, CheckpointError::Torch(_)), "{e}");
    assert!(e.to_string().contains("posix.system"), "{e}");
}

#[test]
fn classify_reads_a_maps_file() {
    let exp = expected("sd");
    let path = dir().join("sd.expected.safetensors");
    let rows = classify(&dir().join("sd.pth"), &path).unwrap();
    let want = exp["logits_f32"].to_vec2::<f32>().unwrap();
    assert_eq!(rows.len(), want.len());
    let names = ["above", "below", "is", "left of", "right of"];
    for (row, w) in rows.iter().zip(&want) {
        for (a, b) in row.logits.iter().zip(w) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        let sum: f32 = row.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5);
        let best = w
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(row.relation, names[best]);
        let json = serde_json::to_value(row).unwrap();
        assert!(json["logits"].is_array() && json["probabilities"].is_array());
    }

    // Wrong names, shapes and steps are reported with the file.
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: Vec<(&str, Tensor)>| {
        let p = tmp.path().join(name);
        let map: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        candle_core::safetensors::save(&map, &p).unwrap();
        p
    };
    let maps = exp["maps"].clone();
    let steps = exp["steps"].clone();
    let cases = [
        (
            write(
                "names.safetensors",
                vec![("map", maps.clone()), ("steps", steps.clone())],
            ),
            "holds the tensors [\"map\", \"steps\"]",
        ),
        (
            write(
                "shape.safetensors",
                vec![
                    ("maps", maps.narrow(4, 0, 8).unwrap().contiguous().unwrap()),
                    ("steps", steps.clone()),
                ],
            ),
            "this classifier reads (B, 2, C, 16, 16)",
        ),
        (
            write(
                "rank.safetensors",
                vec![
                    ("maps", maps.flatten_from(2).unwrap()),
                    ("steps", steps.clone()),
                ],
            ),
            "`maps` has shape [3, 2, 2048]",
        ),
        (
            write(
                "count.safetensors",
                vec![
                    ("maps", maps.clone()),
                    ("steps", steps.narrow(0, 0, 2).unwrap()),
                ],
            ),
            "`maps` holds 3 samples",
        ),
        (
            write(
                "step.safetensors",
                vec![
                    ("maps", maps.clone()),
                    ("steps", Tensor::new(&[5i64, 50, 10], &Device::Cpu).unwrap()),
                ],
            ),
            "step 50 is beyond the classifier's steps 0 to 49",
        ),
        (
            write(
                "dtype.safetensors",
                vec![("maps", maps.clone()), ("steps", maps.clone())],
            ),
            "`steps` has dtype F32",
        ),
    ];
    for (p, needle) in cases {
        let e = classify(&dir().join("sd.pth"), &p).unwrap_err();
        assert!(matches!(e, ClassifyError::Input { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(needle) && msg.contains(p.file_name().unwrap().to_str().unwrap()),
            "{msg}"
        );
    }
}

/// A classifier of the published architecture written as our checkpoint records its
/// architecture and reloads as the same function.
#[test]
fn our_checkpoints_record_the_architecture() {
    let (published, meta) = load_classifier(
        &dir().join("flux.pth"),
        None,
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let arch = published.architecture().clone();
    // The published weights without their position tables (which are not weights of ours:
    // a classifier built without them computes them).
    let mut ck = l2s_torch_pickle::TorchFile::open(dir().join("flux.pth")).unwrap();
    let sd = ck.root().get("model_state_dict").unwrap().clone();
    let weights: HashMap<String, Tensor> = ck
        .state_dict(&sd, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".pe"))
        .collect();
    let reference = RelationClassifier::with_architecture(
        &meta.config,
        &arch,
        VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap();
    let vm = VarMap::new();
    RelationClassifier::with_architecture(
        &meta.config,
        &arch,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    {
        let mut data = vm.data().lock().unwrap();
        assert_eq!(data.len(), weights.len());
        for (name, t) in &weights {
            data.get_mut(name).unwrap().set(t).unwrap();
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("clf");
    let ours = CheckpointMeta {
        model: "flux-schnell".into(),
        ..meta.clone()
    };
    save_checkpoint_with_architecture(&out, &vm, &ours, &arch).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("classifier.json")).unwrap())
            .unwrap();
    assert_eq!(json["config"]["architecture"]["layout"], "torch");
    let (reloaded, m2) =
        load_classifier(&out, Some("flux-schnell"), None, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(reloaded.architecture(), &arch);
    assert_eq!(m2.step_indices, meta.step_indices);
    let exp = expected("flux");
    let a = reference
        .forward(&exp["maps"], &exp["steps"], false)
        .unwrap();
    let b = reloaded
        .forward(&exp["maps"], &exp["steps"], false)
        .unwrap();
    assert_eq!(rel_err(&b, &a), 0.0);
    // The published classifier reads its (perturbed) tables, so it differs.
    let c = published
        .forward(&exp["maps"], &exp["steps"], false)
        .unwrap();
    assert!(rel_err(&c, &a) > 0.0);
}

/// `classify` maps raw steps to the slots of a classifier that takes slots (ours).
#[test]
fn classify_maps_steps_to_the_slots_of_our_classifiers() {
    let mut cfg = l2s_steer::ClassifierConfig::sd(3, 2, 4);
    cfg.map_size = 4;
    cfg.d_model = 8;
    cfg.object.ff = 8;
    cfg.head.ff = 8;
    cfg.mlp_hidden = vec![8];
    let vm = VarMap::new();
    let model =
        RelationClassifier::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
            .unwrap();
    let meta = CheckpointMeta {
        config: cfg.clone(),
        relations: ["left of", "right of", "above", "below"]
            .map(String::from)
            .to_vec(),
        step_indices: vec![5, 10],
        map_size: 4,
        num_maps: 3,
        layers: Vec::new(),
        model: "synthetic".into(),
        dual_inversion: true,
        metrics: None,
        num_inference_steps: Some(50),
        orig_map_size: None,
        map_layout: Default::default(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("clf");
    l2s_steer::train::save_checkpoint(&ck, &vm, &meta).unwrap();
    let maps = Tensor::rand(0f32, 1f32, (3, 2, 3, 4, 4), &Device::Cpu).unwrap();
    let file = tmp.path().join("maps.safetensors");
    let tensors: HashMap<String, Tensor> = [
        ("maps".to_string(), maps.clone()),
        (
            "steps".to_string(),
            Tensor::new(&[3i64, 10, 40], &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let rows = classify(&ck, &file).unwrap();
    // Steps 3, 10, 40 → slots 0, 1, 1 (the first recorded step at or after; the last past the end).
    let slots = Tensor::new(&[0u32, 1, 1], &Device::Cpu).unwrap();
    let want = model
        .forward(&maps, &slots, false)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    // (The trainable model composes LayerNorm and softmax; the loaded one uses fused kernels.)
    for (row, w) in rows.iter().zip(&want) {
        for (a, b) in row.logits.iter().zip(w) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
    let (_, arch) = read_checkpoint(&ck).unwrap();
    assert_eq!(arch, Architecture::legacy());
}
