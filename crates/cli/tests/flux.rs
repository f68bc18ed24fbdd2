//! The `l2s` binary on the tiny FLUX fixtures: the same commands and flags as Stable Diffusion,
//! the model's own defaults, and clear refusals (missing component, classifier of the other
//! model family).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use l2s_generate::read_png_text;
use l2s_steer::dataset::LayerInfo;
use l2s_steer::train::save_checkpoint;
use l2s_steer::{CheckpointMeta, ClassifierConfig, EncoderConfig, RelationClassifier};

const PROMPT: &str = "a dog to the right of a teddy bear";

fn model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .join("model")
}

fn l2s(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_l2s"))
        .args(args)
        .env_remove("L2S_MODEL")
        .env_remove("RUST_LOG")
        .output()
        .expect("running l2s")
}

/// Runs a command that must succeed; returns (stdout, stderr).
fn ok(args: &[&str]) -> (String, String) {
    let out = l2s(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "l2s {args:?} failed: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

fn fails(args: &[&str]) -> String {
    let out = l2s(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "l2s {args:?} should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn meta(path: &Path) -> std::collections::HashMap<String, String> {
    read_png_text(path).unwrap().into_iter().collect()
}

#[test]
fn generate_uses_the_models_defaults_and_writes_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev.png");
    let m = model("flux-dev-tiny");
    ok(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--seed",
        "3",
        "--out",
        s(&dev),
        "-q",
    ]);
    let text = meta(&dev);
    assert_eq!(text["steps"], "50");
    assert_eq!(text["guidance"], "3.5");
    assert_eq!(text["seed"], "3");
    assert_eq!(text["size"], "64x64");
    assert_eq!(text["sampler"], "flow-match-euler");
    assert_eq!(image::open(&dev).unwrap().width(), 64);

    let schnell = tmp.path().join("schnell.png");
    let m = model("flux-schnell-tiny");
    ok(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--out",
        s(&schnell),
        "-q",
    ]);
    let text = meta(&schnell);
    assert_eq!(
        (text["steps"].as_str(), text["guidance"].as_str()),
        ("4", "0")
    );
    // Flags still win over the defaults.
    ok(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--width",
        "32",
        "--out",
        s(&schnell),
        "-q",
    ]);
    let text = meta(&schnell);
    assert_eq!(
        (text["steps"].as_str(), text["size"].as_str()),
        ("2", "32x64")
    );
}

#[test]
fn overlong_prompt_warns_about_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("long.png");
    let long = "a dog to the right of a teddy bear ".repeat(80);
    let m = model("flux-schnell-tiny");
    let (_, stderr) = ok(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        &long,
        "--out",
        s(&out),
        "-q",
    ]);
    assert!(
        stderr.contains("truncated") || stderr.contains("dropped"),
        "{stderr}"
    );
}

#[test]
fn folder_without_text_encoder_2_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("model");
    copy_dir(&model("flux-schnell-tiny"), &copy);
    std::fs::remove_dir_all(copy.join("text_encoder_2")).unwrap();
    let out = tmp.path().join("x.png");
    let err = fails(&[
        "generate",
        "--model",
        s(&copy),
        "--prompt",
        PROMPT,
        "--out",
        s(&out),
        "-q",
    ]);
    assert!(
        err.contains("text_encoder_2") && err.contains("T5"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn invert_and_attention_take_a_flux_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("flux-dev-tiny");
    let image = tmp.path().join("image.png");
    ok(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--steps",
        "6",
        "--out",
        s(&image),
        "-q",
    ]);
    let rec = tmp.path().join("rec.png");
    let (stdout, _) = ok(&[
        "invert",
        "--model",
        s(&m),
        "--image",
        s(&image),
        "--prompt",
        PROMPT,
        "--steps",
        "6",
        "--out",
        s(&rec),
        "-q",
    ]);
    assert!(stdout.starts_with("PSNR"), "{stdout}");
    assert!(meta(&rec)["sampler"].starts_with("rf-inversion"));

    let sheet = tmp.path().join("sheet.png");
    let maps = tmp.path().join("maps.safetensors");
    let schnell = model("flux-schnell-tiny");
    ok(&[
        "attention",
        "--model",
        s(&schnell),
        "--prompt",
        PROMPT,
        "--words",
        "dog,teddy bear",
        "--out",
        s(&sheet),
        "--maps",
        s(&maps),
        "-q",
    ]);
    let t = candle_core::safetensors::load(&maps, &Device::Cpu).unwrap();
    // schnell's map steps {1, 3}; 4 blocks × 2 heads.
    assert_eq!(t["per_head"].dims(), &[2, 2, 8, 16, 16]);
}

/// A random classifier checkpoint for `model_id` with `layers`.
fn fake_classifier(dir: &Path, model_id: &str, layers: Vec<LayerInfo>) {
    let num_maps = layers.iter().map(|l| l.heads).sum();
    let small = EncoderConfig {
        layers: 1,
        heads: 2,
        ff: 32,
        dropout: 0.0,
    };
    let cfg = ClassifierConfig {
        d_model: 16,
        object: small.clone(),
        head: small,
        step_dim: 4,
        mlp_hidden: vec![16],
        ..ClassifierConfig::flux(num_maps, 2, 4)
    };
    let vm = VarMap::new();
    RelationClassifier::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let meta = CheckpointMeta {
        config: cfg,
        relations: ["left of", "right of", "above", "below"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        step_indices: vec![1, 3],
        map_size: 16,
        num_maps,
        layers,
        model: model_id.into(),
        dual_inversion: true,
        metrics: None,
        num_inference_steps: Some(4),
        orig_map_size: None,
        map_layout: Default::default(),
    };
    save_checkpoint(dir, &vm, &meta).unwrap();
}

fn flux_layers() -> Vec<LayerInfo> {
    let names = [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ];
    names
        .iter()
        .map(|n| LayerInfo {
            name: n.to_string(),
            heads: 2,
            height: 4,
            width: 4,
        })
        .collect()
}

#[test]
fn a_flux_classifier_steers_and_a_stable_diffusion_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("flux-schnell-tiny");
    let flux = l2s_models::Pipeline::load(&m, &Default::default(), None).unwrap();
    let id = flux.fingerprint().unwrap();

    let clf = tmp.path().join("flux-clf");
    fake_classifier(&clf, &id, flux_layers());
    let out = tmp.path().join("steered.png");
    ok(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--steer",
        s(&clf),
        "--steer-iterations",
        "2",
        "--out",
        s(&out),
        "-q",
    ]);
    let text = meta(&out);
    assert_eq!(text["steer_iterations"], "2");
    assert!(
        text["steer_config"].contains("\"steer_steps\":1"),
        "{}",
        text["steer_config"]
    );

    let sd = tmp.path().join("sd-clf");
    let layers = vec![LayerInfo {
        name: "down_blocks.0.attentions.0.transformer_blocks.0.attn2".into(),
        heads: 8,
        height: 8,
        width: 8,
    }];
    fake_classifier(&sd, "unet-0123456789abcdef", layers);
    let err = fails(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--steer",
        s(&sd),
        "--out",
        s(&out),
        "-q",
    ]);
    assert!(
        err.contains("Stable Diffusion")
            && err.contains("FLUX")
            && err.contains("unet-0123456789abcdef"),
        "{err}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn data_build_inverts_a_flux_folder_by_rf_inversion() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("shapes");
    ok(&[
        "shapes",
        "render",
        "--count",
        "3",
        "--size",
        "64",
        "--out",
        s(&images),
        "-q",
    ]);
    let out = tmp.path().join("data");
    let m = model("flux-schnell-tiny");
    ok(&[
        "data",
        "build",
        "--model",
        s(&m),
        "--images",
        s(&images),
        "--out",
        s(&out),
        "--min-psnr",
        "0",
        "-q",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("info.json")).unwrap()).unwrap();
    assert!(
        info["model"].as_str().unwrap().starts_with("flux-"),
        "{info}"
    );
    assert_eq!(info["num_maps"], 8);
    assert_eq!(info["step_indices"], serde_json::json!([1, 3]));
    assert!(
        info["inversion"]
            .as_str()
            .unwrap()
            .starts_with("rf-inversion"),
        "{info}"
    );
    assert_eq!(info["layers"][0]["name"], "transformer_blocks.0.attn");
}

/// Asserts two PNGs are byte-identical; otherwise says how their pixels and text differ.
fn assert_same_png(a: &Path, b: &Path) {
    if std::fs::read(a).unwrap() == std::fs::read(b).unwrap() {
        return;
    }
    let (pa, pb) = (
        image::open(a).unwrap().to_rgb8(),
        image::open(b).unwrap().to_rgb8(),
    );
    let diffs: Vec<i32> = pa
        .as_raw()
        .iter()
        .zip(pb.as_raw())
        .map(|(x, y)| (*x as i32 - *y as i32).abs())
        .filter(|d| *d > 0)
        .collect();
    let (ta, tb) = (meta(a), meta(b));
    let text: Vec<String> = ta
        .iter()
        .filter(|(k, v)| tb.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v:?} vs {:?}", tb.get(k)))
        .collect();
    panic!(
        "{} and {} differ: {} of {} channel values (max {}), text {text:?}",
        a.display(),
        b.display(),
        diffs.len(),
        pa.as_raw().len(),
        diffs.iter().max().unwrap_or(&0)
    );
}

fn bfl_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/flux-dev-tiny/transformer-bfl.safetensors")
}

#[test]
fn a_single_file_transformer_gives_the_folders_images() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("flux-dev-tiny");
    let bfl = bfl_file();
    let (folder, file) = (tmp.path().join("folder.png"), tmp.path().join("file.png"));
    let common = [
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--seed",
        "5",
        "--steps",
        "4",
        "-q",
    ];
    ok(&[&common[..], &["--out", s(&folder)]].concat());
    ok(&[&common[..], &["--transformer", s(&bfl), "--out", s(&file)]].concat());
    assert_same_png(&folder, &file);
}

#[test]
fn a_classifier_is_tied_to_the_transformer_file_actually_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("flux-dev-tiny");
    let bfl = bfl_file();
    let from_folder = l2s_models::Pipeline::load(&m, &Default::default(), None).unwrap();
    let from_file = l2s_models::Pipeline::load(&m, &Default::default(), Some(&bfl)).unwrap();
    let (folder_id, file_id) = (
        from_folder.fingerprint().unwrap(),
        from_file.fingerprint().unwrap(),
    );
    assert_ne!(folder_id, file_id);

    let out = tmp.path().join("steered.png");
    let steer = [
        "--steps",
        "4",
        "--steer-steps",
        "1",
        "--steer-iterations",
        "1",
        "-q",
    ];
    let clf = tmp.path().join("folder-clf");
    fake_classifier(&clf, &folder_id, flux_layers());
    let args = [
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--steer",
        s(&clf),
        "--out",
        s(&out),
    ];
    ok(&[&args[..], &steer].concat());
    let err = fails(&[&args[..], &steer, &["--transformer", s(&bfl)]].concat());
    assert!(err.contains(&folder_id) && err.contains(&file_id), "{err}");

    let clf = tmp.path().join("file-clf");
    fake_classifier(&clf, &file_id, flux_layers());
    let args = [
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--steer",
        s(&clf),
        "--transformer",
        s(&bfl),
        "--out",
        s(&out),
    ];
    ok(&[&args[..], &steer].concat());
}

#[test]
fn a_transformer_file_of_unknown_naming_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let odd = tmp.path().join("odd.safetensors");
    let t = candle_core::Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &[("encoder.layer.0.weight", t.clone()), ("decoder.bias", t)]
            .into_iter()
            .collect(),
        &odd,
    )
    .unwrap();
    let m = model("flux-dev-tiny");
    let out = tmp.path().join("x.png");
    let err = fails(&[
        "generate",
        "--model",
        s(&m),
        "--transformer",
        s(&odd),
        "--prompt",
        PROMPT,
        "--out",
        s(&out),
        "-q",
    ]);
    assert!(
        err.contains(s(&odd)) && err.contains("naming") && err.contains("encoder.layer.0.weight"),
        "{err}"
    );
    assert!(!out.exists());

    let missing = tmp.path().join("missing.safetensors");
    let err = fails(&[
        "generate",
        "--model",
        s(&m),
        "--transformer",
        s(&missing),
        "--prompt",
        PROMPT,
        "--out",
        s(&out),
        "-q",
    ]);
    assert!(
        err.contains(s(&missing)) && err.contains("no such file"),
        "{err}"
    );
}

#[test]
fn without_a_transformer_config_the_file_picks_the_dev_or_schnell_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("model");
    copy_dir(&model("flux-dev-tiny"), &copy);
    std::fs::remove_dir_all(copy.join("transformer")).unwrap();
    let out = tmp.path().join("x.png");
    // The tiny weights are not FLUX.1's sizes, so the preset is chosen, logged, then refused.
    let bfl = bfl_file();
    let err = fails(&[
        "generate",
        "--model",
        s(&copy),
        "--transformer",
        s(&bfl),
        "--prompt",
        PROMPT,
        "--out",
        s(&out),
        "-v",
        "-q",
    ]);
    assert!(
        err.contains("FLUX.1-dev config") && err.contains("has guidance-embedding tensors"),
        "{err}"
    );
    assert!(err.contains(s(&bfl)), "{err}");
}

#[test]
fn transformer_file_is_refused_for_stable_diffusion() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sd1-tiny/model");
    let out = tmp.path().join("x.png");
    let bfl = bfl_file();
    let err = fails(&[
        "generate",
        "--model",
        s(&sd),
        "--transformer",
        s(&bfl),
        "--prompt",
        PROMPT,
        "--out",
        s(&out),
        "-q",
    ]);
    assert!(
        err.contains("--transformer") && err.contains("Stable Diffusion") && err.contains("FLUX"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn gradient_checkpointing_steers_to_the_same_image() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("flux-schnell-tiny");
    let flux = l2s_models::Pipeline::load(&m, &Default::default(), None).unwrap();
    let clf = tmp.path().join("flux-clf");
    fake_classifier(&clf, &flux.fingerprint().unwrap(), flux_layers());
    let (plain, checkpointed) = (
        tmp.path().join("plain.png"),
        tmp.path().join("checkpointed.png"),
    );
    // The recomputed blocks run the same f32 operations in another grouping, so the two runs may
    // differ in the last bits (exact equality of the gradients is checked in f64 by the models
    // crate's checkpoint test): the images must agree to one 8-bit level, the losses to 1e-5.
    let args = [
        "generate",
        "--model",
        s(&m),
        "--prompt",
        PROMPT,
        "--steer",
        s(&clf),
        "--steer-iterations",
        "2",
        "-q",
    ];
    ok(&[&args[..], &["--out", s(&plain)]].concat());
    ok(&[
        &args[..],
        &["--gradient-checkpointing", "--out", s(&checkpointed)],
    ]
    .concat());
    assert_eq!(meta(&plain)["steer_iterations"], "2");
    let (pa, pb) = (
        image::open(&plain).unwrap().to_rgb8(),
        image::open(&checkpointed).unwrap().to_rgb8(),
    );
    let worst = pa
        .as_raw()
        .iter()
        .zip(pb.as_raw())
        .map(|(x, y)| (*x as i32 - *y as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "pixels differ by up to {worst} levels");
    let loss = |p: &Path| meta(p)["steer_final_loss"].parse::<f64>().unwrap();
    let (la, lb) = (loss(&plain), loss(&checkpointed));
    assert!(
        (la - lb).abs() <= 1e-5 * la.abs().max(1.0),
        "final losses {la} vs {lb}"
    );
}
