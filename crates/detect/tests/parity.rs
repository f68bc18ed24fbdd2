//! The tiny random-weight Mask2Former against what transformers computes (fixtures made by
//! tools/fixtures/make_mask2former_fixtures.py), loaded from both namings.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use l2s_detect::{infer_config, CheckpointNaming, Mask2Former, Mask2FormerConfig, Weights};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/mask2former-tiny")
        .join(name)
}

fn expected(prefix: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture(&format!("{prefix}expected.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn config(prefix: &str) -> Mask2FormerConfig {
    let text = std::fs::read_to_string(fixture(&format!("{prefix}config.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-12)
}

fn check(file: &str, naming: CheckpointNaming) {
    check_with(file, naming, true)
}

fn check_with(file: &str, naming: CheckpointNaming, fused: bool) {
    let prefix = if file.starts_with("w7-") { "w7-" } else { "" };
    let exp = expected(prefix);
    let w = Weights::open(fixture(file), &Device::Cpu).unwrap();
    assert_eq!(w.naming(), naming);
    let cfg = infer_config(&w).unwrap();
    assert_eq!(
        cfg,
        config(prefix),
        "configuration read back from the shapes"
    );
    let mut model = Mask2Former::load(&w, &cfg).unwrap();
    model.set_fused_sampling(fused);
    let out = model.forward(&exp["pixels"]).unwrap();
    let mut worst = 0f32;
    let mut cmp = |name: String, t: &Tensor| {
        let e = rel_err(t, &exp[&name]);
        println!("{file} {name}: relative error {e:.2e}");
        assert!(e <= 1e-4, "{file}: {name} differs by {e} (relative)");
        worst = worst.max(e);
    };
    assert_eq!(out.backbone.len(), 4);
    for (s, t) in out.backbone.iter().enumerate() {
        cmp(format!("backbone.{s}"), t);
    }
    cmp("mask_features".into(), &out.mask_features);
    for (i, t) in out.multi_scale.iter().enumerate() {
        cmp(format!("multi_scale.{i}"), t);
    }
    assert_eq!(out.class_logits.len(), cfg.decoder_layers + 1);
    for (r, t) in out.class_logits.iter().enumerate() {
        cmp(format!("class_logits.{r}"), t);
    }
    for (r, t) in out.mask_logits.iter().enumerate() {
        cmp(format!("mask_logits.{r}"), t);
    }
    println!("{file}: worst relative error {worst:.2e}");
}

#[test]
fn hugging_face_weights_match_transformers() {
    check("hf.safetensors", CheckpointNaming::HuggingFace);
}

#[test]
fn mmdet_weights_give_the_same_outputs() {
    check("mmdet.pth", CheckpointNaming::Mmdet);
}

#[test]
fn transformers_4_names_in_a_pickle_give_the_same_outputs() {
    check("hf-legacy.bin", CheckpointNaming::HuggingFace);
}

#[test]
fn the_device_generic_gather_matches_transformers_too() {
    check_with("hf.safetensors", CheckpointNaming::HuggingFace, false);
}

#[test]
fn the_published_window_of_7_matches_transformers() {
    check("w7-hf.safetensors", CheckpointNaming::HuggingFace);
    check_with("w7-hf.safetensors", CheckpointNaming::HuggingFace, false);
}
