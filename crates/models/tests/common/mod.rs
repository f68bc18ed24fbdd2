//! Shared helpers for the parity tests: fixture paths and error measures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn expected(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(name).join("expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn meta(name: &str) -> serde_json::Value {
    let path = fixtures().join(name).join("meta.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// max |a − b| / max |b|: the error relative to the scale of the expected output.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    let a = actual.to_dtype(DType::F64).unwrap();
    let e = expected.to_dtype(DType::F64).unwrap();
    let diff = (a - &e)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = e
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale.max(1e-12)
}

/// Asserts the relative error is within the project's parity tolerance and reports it.
pub fn check(what: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    let err = rel_err(actual, expected);
    eprintln!("parity {what:<70} rel. max err {err:.2e}");
    assert!(err <= 1e-4, "{what}: relative max error {err:.3e} > 1e-4");
    err
}

/// The fixture's loss: Σ_l Σ_q [mean_{b,h} P[b,h,q,ia]·cx(q) − mean_{b,h} P[b,h,q,ib]·cy(q)] + 0.1·mean(out²).
pub fn fixture_loss(
    records: &[(l2s_models::AttentionSite, Tensor)],
    out: &Tensor,
    ia: usize,
    ib: usize,
) -> Tensor {
    let dev = out.device();
    let dtype = out.dtype();
    let mut total = (out.sqr().unwrap().mean_all().unwrap() * 0.1).unwrap();
    for (site, probs) in records {
        let (h, w) = (site.height, site.width);
        let cx: Vec<f64> = (0..h * w)
            .map(|q| ((q % w) as f64 + 0.5) / w as f64)
            .collect();
        let cy: Vec<f64> = (0..h * w)
            .map(|q| ((q / w) as f64 + 0.5) / h as f64)
            .collect();
        let cx = Tensor::new(cx, dev).unwrap().to_dtype(dtype).unwrap();
        let cy = Tensor::new(cy, dev).unwrap().to_dtype(dtype).unwrap();
        let mean_bh = |k: usize| {
            probs
                .i((.., .., .., k))
                .unwrap()
                .mean(0)
                .unwrap()
                .mean(0)
                .unwrap()
        };
        let term = ((mean_bh(ia) * cx).unwrap().sum_all().unwrap()
            - (mean_bh(ib) * cy).unwrap().sum_all().unwrap())
        .unwrap();
        total = (total + term).unwrap();
    }
    total
}
