//! The `l2s` binary on the tiny fixture models: outputs, metadata, determinism, and clear
//! failures on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use l2s_generate::read_png_text;

const PROMPT: &str = "a dog to the right of a teddy bear";

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .join("model")
        .display()
        .to_string()
}

fn l2s(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_l2s"))
        .args(args)
        .env_remove("L2S_MODEL")
        .env_remove("RUST_LOG")
        .output()
        .expect("running l2s")
}

fn ok(args: &[&str]) -> String {
    let out = l2s(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "l2s {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    fails_with(args, &[])
}

fn fails_with(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l2s"));
    cmd.args(args)
        .env_remove("L2S_MODEL")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running l2s");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "l2s {args:?} should fail");
    assert_ne!(
        out.status.code(),
        Some(101),
        "l2s {args:?} panicked: {stderr}"
    );
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
fn generate_writes_png_with_metadata_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let m = model("sd1-tiny");
    let args = |out: &Path| {
        vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            PROMPT,
            "--negative-prompt",
            "blurry",
            "--seed",
            "7",
            "--steps",
            "4",
            "--guidance",
            "6",
            "--out",
        ]
        .into_iter()
        .map(String::from)
        .chain([s(out).to_string()])
        .collect::<Vec<_>>()
    };
    let run = |out: &Path| ok(&args(out).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run(&a).contains("a.png"));
    run(&b);
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same arguments, different bytes"
    );
    let md = meta(&a);
    assert_eq!(md["prompt"], PROMPT);
    assert_eq!(md["negative_prompt"], "blurry");
    assert_eq!(md["seed"], "7");
    assert_eq!(md["steps"], "4");
    assert_eq!(md["guidance"], "6");
    assert_eq!(md["model"], m);
    assert_eq!(md["size"], "32x32");
    let img = image::open(&a).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    // Nothing but the outputs is left in the folder.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn several_images_go_to_a_folder_with_consecutive_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imgs");
    let m = model("sd2-tiny");
    ok(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--seed",
        "5",
        "--num-images",
        "2",
        "--out",
        s(&out),
    ]);
    assert_eq!(meta(&out.join("0000.png"))["seed"], "5");
    assert_eq!(meta(&out.join("0001.png"))["seed"], "6");
    assert_ne!(
        std::fs::read(out.join("0000.png")).unwrap(),
        std::fs::read(out.join("0001.png")).unwrap()
    );
    // The model may also come from L2S_MODEL.
    let single = dir.path().join("env.png");
    let status = Command::new(env!("CARGO_BIN_EXE_l2s"))
        .args([
            "generate",
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--seed",
            "5",
            "--out",
            s(&single),
        ])
        .env("L2S_MODEL", &m)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let a = image::open(&single).unwrap().to_rgb8();
    let b = image::open(out.join("0000.png")).unwrap().to_rgb8();
    assert_eq!(a, b);
}

#[test]
fn invert_reconstructs_and_its_latents_regenerate_the_reconstruction() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("sd1-tiny");
    let src = dir.path().join("src.png");
    ok(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        PROMPT,
        "--steps",
        "5",
        "--out",
        s(&src),
    ]);
    let rec = dir.path().join("rec.png");
    let lat = dir.path().join("z.safetensors");
    let stdout = ok(&[
        "invert",
        "--model",
        &m,
        "--image",
        s(&src),
        "--prompt",
        PROMPT,
        "--steps",
        "5",
        "--fixed-point",
        "2",
        "--out",
        s(&rec),
        "--save-latents",
        s(&lat),
    ]);
    assert!(stdout.contains("PSNR") && stdout.contains("dB"), "{stdout}");
    let md = meta(&rec);
    assert_eq!(md["fixed_point_iterations"], "2");
    assert!(md["psnr"].parse::<f64>().is_ok());
    // Sampling from the saved latents with the same prompt and guidance 1 gives the reconstruction.
    let again = dir.path().join("again.png");
    ok(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        PROMPT,
        "--steps",
        "5",
        "--guidance",
        "1",
        "--init-latents",
        s(&lat),
        "--out",
        s(&again),
    ]);
    assert_eq!(
        image::open(&rec).unwrap().to_rgb8(),
        image::open(&again).unwrap().to_rgb8()
    );
}

#[test]
fn attention_writes_sheet_and_maps() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("sd2-tiny");
    let sheet = dir.path().join("sheet.png");
    let maps = dir.path().join("maps.safetensors");
    ok(&[
        "attention",
        "--model",
        &m,
        "--prompt",
        PROMPT,
        "--words",
        "dog, teddy bear",
        "--steps",
        "6",
        "--at-steps",
        "1,5",
        "--out",
        s(&sheet),
        "--maps",
        s(&maps),
    ]);
    // 32-pixel images are drawn in 128-pixel cells: the image and two maps.
    let img = image::open(&sheet).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 128 + 2 * 8, 128));
    assert_eq!(meta(&sheet)["words"], "dog,teddy bear");
    let t = candle_core::safetensors::load(&maps, &Device::Cpu).unwrap();
    assert_eq!(t["per_word"].dims(), &[2, 2, 16, 16]);
    // sd2-tiny: 7 cross-attention layers with 2, 4, 4, 4, 4, 2, 2 heads.
    assert_eq!(t["per_head"].dims(), &[2, 2, 22, 16, 16]);
    let sums = t["per_word"]
        .sum((2, 3))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-4), "{sums:?}");
    assert_eq!(
        t["layer.5.mid_block.attentions.0.transformer_blocks.0.attn2"].dims(),
        &[2, 4, 4, 4]
    );
}

#[test]
fn unknown_model_folder_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let err = fails(&[
        "generate",
        "--model",
        "/no/such/model-dir",
        "--prompt",
        "a",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("/no/such/model-dir"), "{err}");
    assert!(!out.exists());
}

#[test]
fn hub_id_missing_from_cache_is_named() {
    let cache = tempfile::tempdir().unwrap();
    let out = cache.path().join("x.png");
    let err = fails_with(
        &[
            "generate",
            "--model",
            "someorg/not-downloaded",
            "--prompt",
            "a",
            "--out",
            s(&out),
        ],
        &[("HF_HUB_CACHE", s(cache.path()))],
    );
    assert!(err.contains("someorg/not-downloaded"), "{err}");
    assert!(err.contains("cache"), "{err}");
}

#[test]
fn without_model_the_builtin_shapes_model_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("star.png");
    let cache = dir.path().join("cache");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_l2s"))
        .args([
            "-q",
            "generate",
            "--prompt",
            "a star to the left of a heart",
            "--steps",
            "4",
            "--out",
            s(&out),
        ])
        .env_remove("L2S_MODEL")
        .env("L2S_CACHE", &cache)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let meta = l2s_generate::read_png_text(&out).unwrap();
    assert!(
        meta.iter().any(|(k, v)| k == "model" && v == "shapes"),
        "{meta:?}"
    );
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
}

#[test]
fn width_not_a_multiple_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let err = fails(&[
        "generate",
        "--model",
        &model("sd1-tiny"),
        "--prompt",
        "a",
        "--width",
        "36",
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("width") && err.contains("36") && err.contains("multiple of 8"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn init_latents_of_wrong_shape_or_name_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let m = model("sd1-tiny");
    let wrong = dir.path().join("wrong.safetensors");
    let t = Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &[("latents".to_string(), t.clone())].into_iter().collect(),
        &wrong,
    )
    .unwrap();
    let err = fails(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "a",
        "--init-latents",
        s(&wrong),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("[1, 4, 8, 8]") && err.contains("[1, 4, 16, 16]"),
        "{err}"
    );
    let misnamed = dir.path().join("misnamed.safetensors");
    candle_core::safetensors::save(&[("noise".to_string(), t)].into_iter().collect(), &misnamed)
        .unwrap();
    let err = fails(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "a",
        "--init-latents",
        s(&misnamed),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("misnamed.safetensors") && err.contains("`latents`") && err.contains("noise"),
        "{err}"
    );
    let err = fails(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "a",
        "--init-latents",
        "/no/such.safetensors",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("/no/such.safetensors"), "{err}");
    assert!(!out.exists());
}

#[test]
fn word_not_in_prompt_is_named_with_the_prompts_words() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let err = fails(&[
        "attention",
        "--model",
        &model("sd1-tiny"),
        "--prompt",
        PROMPT,
        "--words",
        "dog,cat",
        "--steps",
        "2",
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("`cat`") && err.contains("teddy") && err.contains("dog"),
        "{err}"
    );
    let err = fails(&[
        "attention",
        "--model",
        &model("sd1-tiny"),
        "--prompt",
        PROMPT,
        "--words",
        "dog",
        "--steps",
        "4",
        "--at-steps",
        "4",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("step 4"), "{err}");
    assert!(!out.exists());
}

#[test]
fn invert_refuses_wrong_image_size_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("sd1-tiny");
    let out = dir.path().join("rec.png");
    let small = dir.path().join("small.png");
    image::RgbImage::new(20, 20).save(&small).unwrap();
    let err = fails(&[
        "invert",
        "--model",
        &m,
        "--image",
        s(&small),
        "--prompt",
        "a",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("20×20") && err.contains("32×32"), "{err}");
    let rgba = dir.path().join("rgba.png");
    image::RgbaImage::new(32, 32).save(&rgba).unwrap();
    let err = fails(&[
        "invert",
        "--model",
        &m,
        "--image",
        s(&rgba),
        "--prompt",
        "a",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("rgba.png") && err.contains("RGB"), "{err}");
    let err = fails(&[
        "invert",
        "--model",
        &m,
        "--image",
        "/no/such.png",
        "--prompt",
        "a",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("/no/such.png"), "{err}");
    assert!(!out.exists());
}

#[test]
fn bad_output_paths_are_named() {
    let m = model("sd1-tiny");
    let err = fails(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "a",
        "--num-images",
        "2",
        "--out",
        "one.png",
    ]);
    assert!(err.contains("one.png") && err.contains("folder"), "{err}");
    let err = fails(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "a",
        "--steps",
        "1",
        "--out",
        "/no/such/dir/x.png",
    ]);
    assert!(err.contains("/no/such/dir"), "{err}");
    let err = fails(&[
        "generate", "--model", &m, "--prompt", "a", "--steps", "0", "--out", "x.png",
    ]);
    assert!(err.contains("steps"), "{err}");
}
