//! Per-block gradient checkpointing of the FLUX transformer changes nothing but memory: the same
//! velocity, the same attention maps, and the same gradient of an attention-map loss with
//! respect to the latent.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use l2s_models::flux::FluxPipeline;
use l2s_models::vae::seeded_normal;
use l2s_models::{AttentionStore, LoadOptions};

fn load(dtype: DType) -> FluxPipeline {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux-dev-tiny/model");
    FluxPipeline::load(
        &dir,
        &LoadOptions {
            dtype,
            device: Device::Cpu,
            ..Default::default()
        },
    )
    .unwrap()
}

/// (velocity, maps, ∇latent) of Σ_layers ⟨maps of tokens 1 and 4, fixed weights⟩ + mean(v²).
fn pass(flux: &FluxPipeline, latent: &Tensor) -> (Tensor, Vec<Tensor>, Tensor) {
    let cond = flux
        .encode_prompt("a dog to the right of a teddy bear")
        .unwrap();
    let grid = flux.grid_for(64, 96);
    let var = Var::from_tensor(latent).unwrap();
    let mut store = AttentionStore::new();
    let v = flux
        .velocity(var.as_tensor(), grid, &cond, 0.7, Some(3.5), &mut store)
        .unwrap();
    let mut loss = v.sqr().unwrap().mean_all().unwrap();
    let mut maps = Vec::new();
    for (i, (_, probs)) in store.records().iter().enumerate() {
        let words = Tensor::cat(
            &[
                probs.narrow(3, 1, 1).unwrap(),
                probs.narrow(3, 4, 1).unwrap(),
            ],
            3,
        )
        .unwrap();
        let n = words.elem_count();
        let w = Tensor::arange(0.0, n as f64, &Device::Cpu)
            .unwrap()
            .to_dtype(words.dtype())
            .unwrap();
        let w = ((w * (0.37 + i as f64)).unwrap().sin().unwrap())
            .reshape(words.shape())
            .unwrap();
        loss = (loss + (words.clone() * w).unwrap().sum_all().unwrap()).unwrap();
        maps.push(words.detach());
    }
    let grad = loss
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .clone();
    (v.detach(), maps, grad)
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let s = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    d / s.max(1e-30)
}

fn compare(dtype: DType, tol: f64) {
    let mut flux = load(dtype);
    let latent = seeded_normal(&[1, 24, 64], 5, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let (v0, maps0, g0) = pass(&flux, &latent);
    flux.transformer.set_gradient_checkpointing(true);
    let (v1, maps1, g1) = pass(&flux, &latent);
    assert_eq!(maps0.len(), 4, "every block reports its maps");
    assert_eq!(maps0.len(), maps1.len());
    assert!(rel_diff(&v0, &v1) <= tol, "velocity {}", rel_diff(&v0, &v1));
    for (a, b) in maps0.iter().zip(&maps1) {
        assert!(rel_diff(a, b) <= tol, "maps {}", rel_diff(a, b));
    }
    let d = rel_diff(&g0, &g1);
    eprintln!("{dtype:?}: gradient relative difference with/without checkpointing {d:.3e}");
    assert!(d <= tol, "gradient {d}");
    assert!(
        g0.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn checkpointing_keeps_values_and_latent_gradients_f32() {
    compare(DType::F32, 1e-6);
}

#[test]
fn checkpointing_keeps_values_and_latent_gradients_f64() {
    compare(DType::F64, 1e-12);
}
