//! The classifier input in the published layout equals an independent PyTorch computation
//! (`tools/fixtures/make_published_maps_fixture.py`: torch's bilinear interpolation, resolution
//! ascending) from the attention diffusers recorded for each tiny fixture.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use l2s_models::flux::{FluxInputs, FluxPipeline};
use l2s_models::{LoadOptions, StableDiffusion};
use l2s_steer::maps::{MapLayout, MapRecorder, WordPair};

fn root(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn tensors(name: &str, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(root(name).join(file), &Device::Cpu).unwrap()
}

/// The fixture's maps and the word positions it used.
fn expected(name: &str) -> (Tensor, WordPair) {
    let path = root(name).join("published_maps.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().unwrap();
    let positions = |k: &str| serde_json::from_str::<Vec<usize>>(&meta[k]).unwrap();
    let pair = WordPair {
        subject: positions("subject"),
        object: positions("object"),
    };
    (
        tensors(name, "published_maps.safetensors")["maps"].clone(),
        pair,
    )
}

fn rel_max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let m = b
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    d / m
}

fn row0(t: &Tensor) -> Tensor {
    t.narrow(0, 0, 1).unwrap()
}

fn check(name: &str, recorder: &MapRecorder, want: &Tensor) {
    // (1, 1, 2, C, S, S) → (2, C, S, S)
    let got = recorder
        .maps()
        .unwrap()
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let err = rel_max_err(&got, want);
    eprintln!(
        "{name}: published-layout maps {:?}, rel. max err {err:.1e}",
        got.dims()
    );
    assert!(err <= 1e-5, "{name}: {err:.2e}");
}

fn stable_diffusion(name: &str) {
    let sd = StableDiffusion::load(&root(name).join("model"), &LoadOptions::default()).unwrap();
    let exp = tensors(name, "expected.safetensors");
    let t = exp["unet.timestep"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    let (want, pair) = expected(name);
    let mut rec = MapRecorder::with_layout(vec![pair], 16, true, MapLayout::Published);
    sd.unet
        .forward_observed(
            &row0(&exp["unet.sample"]),
            t,
            &row0(&exp["unet.encoder_hidden_states"]),
            &mut rec,
        )
        .unwrap();
    // Resolution ascending: the first layer is the smallest.
    let sites = rec.sites();
    assert!(
        sites.windows(2).all(|w| w[0].height <= w[1].height),
        "{sites:?}"
    );
    check(name, &rec, &want);
}

fn flux(name: &str) {
    let flux = FluxPipeline::load(&root(name).join("model"), &LoadOptions::default()).unwrap();
    let exp = tensors(name, "expected.safetensors");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root(name).join("meta.json")).unwrap())
            .unwrap();
    let g = meta["grid"].as_array().unwrap();
    let grid = (
        g[0].as_u64().unwrap() as usize,
        g[1].as_u64().unwrap() as usize,
    );
    let (latents, text, pooled, timestep) = (
        row0(&exp["transformer.hidden_states"]),
        row0(&exp["transformer.encoder_hidden_states"]),
        row0(&exp["transformer.pooled_projections"]),
        row0(&exp["transformer.timestep"]),
    );
    let guidance = exp.get("transformer.guidance").map(row0);
    let inputs = FluxInputs {
        latents: &latents,
        grid,
        text: &text,
        pooled: &pooled,
        timestep: &timestep,
        guidance: guidance.as_ref(),
    };
    let (want, pair) = expected(name);
    let mut rec = MapRecorder::with_layout(vec![pair], 16, true, MapLayout::Published);
    flux.transformer.forward(&inputs, &mut rec).unwrap();
    check(name, &rec, &want);
}

#[test]
fn sd1_published_maps_match_pytorch() {
    stable_diffusion("sd1-tiny");
}

#[test]
fn sd2_published_maps_match_pytorch() {
    stable_diffusion("sd2-tiny");
}

#[test]
fn flux_dev_published_maps_match_pytorch() {
    flux("flux-dev-tiny");
}

#[test]
fn flux_schnell_published_maps_match_pytorch() {
    flux("flux-schnell-tiny");
}

/// A map already at the classifier's size goes in raw; a resized one sums to 1.
#[test]
fn only_resized_maps_are_renormalised() {
    let site = |h: usize| l2s_models::AttentionSite {
        layer: format!("layer{h}"),
        height: h,
        width: h,
        heads: 1,
        tokens: 2,
    };
    let mut rec = MapRecorder::with_layout(
        vec![WordPair {
            subject: vec![0],
            object: vec![1],
        }],
        16,
        true,
        MapLayout::Published,
    );
    use l2s_models::AttentionObserver;
    for h in [32usize, 16] {
        let probs = Tensor::full(0.5f32, (1, 1, h * h, 2), &Device::Cpu).unwrap();
        rec.observe(&site(h), &probs).unwrap();
    }
    // Channels: 16×16 (raw, sums to 128) before 32×32 (resized, sums to 1).
    let sums = rec
        .maps()
        .unwrap()
        .sum((4, 5))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(sums.len(), 4);
    for (i, s) in sums.iter().enumerate() {
        let want = if i % 2 == 0 { 128.0 } else { 1.0 };
        assert!(
            (s - want).abs() < 1e-4,
            "channel {i}: {s} vs {want} ({sums:?})"
        );
    }
}
