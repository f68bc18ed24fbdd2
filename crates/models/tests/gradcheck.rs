//! Finite-difference check of the latent gradient through the whole UNet (in f64, so central
//! differences are exact to ~1e-9). Guards against ops that silently drop gradients.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use l2s_models::{AttentionStore, LoadOptions, StableDiffusion};

fn loss_at(sd: &StableDiffusion, latent: &Tensor, ctx: &Tensor, t: f64) -> (Tensor, Tensor) {
    let mut store = AttentionStore::new();
    let out = sd
        .unet
        .forward_observed(latent, t, ctx, &mut store)
        .unwrap();
    (common::fixture_loss(store.records(), &out, 2, 8), out)
}

fn check(name: &str) {
    let opts = LoadOptions {
        dtype: DType::F64,
        device: Device::Cpu,
        ..Default::default()
    };
    let sd = StableDiffusion::load(&common::fixtures().join(name).join("model"), &opts).unwrap();
    let exp = common::expected(name);
    let latent0 = exp["unet.sample"].to_dtype(DType::F64).unwrap();
    let ctx = exp["unet.encoder_hidden_states"]
        .to_dtype(DType::F64)
        .unwrap();
    let t = 501.0;

    let var = Var::from_tensor(&latent0).unwrap();
    let (loss, _) = loss_at(&sd, var.as_tensor(), &ctx, t);
    let grad = loss
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .clone();
    let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let x: Vec<f64> = latent0.flatten_all().unwrap().to_vec1().unwrap();

    // The largest components plus a spread of ordinary ones.
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let mut picks: Vec<usize> = order[..4].to_vec();
    picks.extend((0..8).map(|k| (k * 797 + 13) % g.len()));

    let eps = 1e-4;
    let scale = g.iter().fold(0f64, |m, v| m.max(v.abs()));
    let mut worst = 0f64;
    for &i in &picks {
        let eval = |delta: f64| {
            let mut y = x.clone();
            y[i] += delta;
            let t_in = Tensor::from_vec(y, latent0.dims(), &Device::Cpu).unwrap();
            loss_at(&sd, &t_in, &ctx, t).0.to_scalar::<f64>().unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let err = (fd - g[i]).abs() / scale;
        worst = worst.max(err);
        assert!(
            err < 1e-6,
            "{name}: d loss / d z[{i}]: autograd {} vs finite difference {fd}",
            g[i]
        );
    }
    eprintln!("{name}: finite differences agree with autograd, worst error {worst:.1e} of max |grad| {scale:.3e}");
}

#[test]
fn sd1_gradient_matches_finite_differences() {
    check("sd1-tiny");
}

#[test]
fn sd2_gradient_matches_finite_differences() {
    check("sd2-tiny");
}
