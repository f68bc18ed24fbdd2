//! The fused ops on a GPU: forward and backward of GroupNorm, LayerNorm, RMSNorm, softmax and
//! attention on CUDA, in f32, f64, bf16 and f16, against the same ops on the CPU in f64 (which
//! the CPU tests check against the composed ops and finite differences). Built only with the
//! `cuda` feature; on a machine without a usable GPU each test says so and checks nothing else.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var, D};
use l2s_models::ops::{attention, norm, softmax};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA device ({e}): the GPU checks did not run");
            None
        }
    }
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Relative error allowed against the largest magnitude, per dtype.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    let got = got
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let top = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-30);
    let err = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        / top;
    assert!(
        err <= tolerance(dtype),
        "{what} ({dtype:?}): error {err:e} of the largest value"
    );
}

/// `f` of the inputs and the gradients of Σ f·g with respect to each, as f64 CPU tensors.
fn run(
    inputs: &[Tensor],
    g: &Tensor,
    device: &Device,
    dtype: DType,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(device).unwrap()).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors).unwrap();
    let g = g.to_dtype(dtype).unwrap().to_device(device).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let back = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let dx = vars
        .iter()
        .map(|v| back(grads.get(v.as_tensor()).unwrap()))
        .collect();
    (back(&y), dx)
}

/// Checks `f` on the GPU in every dtype against `f` on the CPU in f64, forward and backward.
fn check(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
    let Some(gpu) = gpu() else { return };
    let probe = f(inputs).unwrap();
    let g = random(probe.dims(), 99);
    let (want_y, want_dx) = run(inputs, &g, &Device::Cpu, DType::F64, f);
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        // Half-precision runs start from rounded inputs: compare with the CPU on those.
        let rounded: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap())
            .collect();
        let g_rounded = g.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let (want_y, want_dx) = if matches!(dtype, DType::F64 | DType::F32) {
            (want_y.clone(), want_dx.clone())
        } else {
            run(&rounded, &g_rounded, &Device::Cpu, DType::F64, f)
        };
        let (y, dx) = run(&rounded, &g_rounded, &gpu, dtype, f);
        assert_close(&format!("{name} forward"), &y, &want_y, dtype);
        for (i, (got, want)) in dx.iter().zip(&want_dx).enumerate() {
            assert_close(&format!("{name} ∂input {i}"), got, want, dtype);
        }
    }
}

#[test]
fn group_norm_on_cuda_matches_the_cpu() {
    let inputs = [
        random(&[2, 32, 9, 11], 1),
        random(&[32], 2),
        random(&[32], 3),
    ];
    check("group norm", &inputs, &|t| {
        norm::group_norm(&t[0], 8, &t[1], &t[2], 1e-5)
    });
}

#[test]
fn layer_and_rms_norm_on_cuda_match_the_cpu() {
    let inputs = [
        random(&[3, 77, 320], 4),
        random(&[320], 5),
        random(&[320], 6),
    ];
    check("layer norm", &inputs, &|t| {
        norm::layer_norm(&t[0], &t[1], &t[2], 1e-5)
    });
    check("rms norm", &inputs[..2], &|t| {
        norm::rms_norm(&t[0], &t[1], 1e-6)
    });
}

#[test]
fn softmax_and_attention_on_cuda_match_the_cpu() {
    check("softmax", &[random(&[4, 3, 1000], 7)], &|t| {
        softmax::softmax_scaled_last_dim(&t[0], 0.3)
    });
    let (q, k, v) = (
        random(&[2, 4, 64, 40], 8),
        random(&[2, 4, 77, 40], 9),
        random(&[2, 4, 77, 40], 10),
    );
    check("attention", &[q, k, v], &|t| {
        attention::attention_composed(&t[0], &t[1], &t[2], 40f64.powf(-0.5))
    });
    // The probabilities sum to one per row on the GPU too.
    let Some(gpu) = gpu() else { return };
    let p = softmax::softmax_scaled_last_dim(&random(&[5, 300], 11).to_device(&gpu).unwrap(), 1.0)
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(p.iter().all(|s| (s - 1.0).abs() < 1e-12), "{p:?}");
}
