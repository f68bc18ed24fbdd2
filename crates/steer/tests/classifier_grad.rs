//! The relation classifier is differentiable with respect to its input maps: the analytic
//! gradient of the cross-entropy matches central finite differences (f64), and a frozen f32
//! classifier (weights loaded from safetensors, as when steering) passes the same gradient on.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use l2s_steer::classifier::cross_entropy;
use l2s_steer::{ClassifierConfig, EncoderConfig, RelationClassifier};

fn tiny() -> ClassifierConfig {
    ClassifierConfig {
        num_maps: 3,
        map_size: 4,
        num_steps: 3,
        classes: 4,
        d_model: 8,
        object: EncoderConfig {
            layers: 2,
            heads: 2,
            ff: 12,
            dropout: 0.3,
        },
        head: EncoderConfig {
            layers: 2,
            heads: 2,
            ff: 12,
            dropout: 0.3,
        },
        step_dim: 4,
        mlp_hidden: vec![10, 6],
        mlp_dropout: 0.3,
        leaky_slope: 0.1,
    }
}

/// Random maps (B, 2, C, S, S), each map positive and summing to 1.
fn maps(b: usize, cfg: &ClassifierConfig, dtype: DType) -> Tensor {
    let dev = Device::Cpu;
    let raw = Tensor::rand(
        0.05f64,
        1.0,
        (b, 2, cfg.num_maps, cfg.map_size * cfg.map_size),
        &dev,
    )
    .unwrap();
    let norm = raw.broadcast_div(&raw.sum_keepdim(3).unwrap()).unwrap();
    norm.reshape((b, 2, cfg.num_maps, cfg.map_size, cfg.map_size))
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn loss_at(model: &RelationClassifier, x: &Tensor, steps: &Tensor, labels: &Tensor) -> f64 {
    cross_entropy(&model.forward(x, steps, false).unwrap(), labels)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn input_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let cfg = tiny();
    let vm = VarMap::new();
    let model =
        RelationClassifier::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
    let b = 2;
    let x0 = maps(b, &cfg, DType::F64);
    let steps = Tensor::new(&[0u32, 2], &dev).unwrap();
    let labels = Tensor::new(&[1u32, 3], &dev).unwrap();

    let x = Var::from_tensor(&x0).unwrap();
    let loss = cross_entropy(
        &model.forward(x.as_tensor(), &steps, false).unwrap(),
        &labels,
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(x.as_tensor())
        .expect("gradient w.r.t. the input maps");
    let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
    let flat: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let n = flat.len();
    assert_eq!(g.len(), n);

    let eps = 1e-6;
    let mut worst: f64 = 0.0;
    // Every 7th coordinate covers both objects, all maps, all batch rows.
    for i in (0..n).step_by(7) {
        let bump = |d: f64| {
            let mut v = flat.clone();
            v[i] += d;
            let t = Tensor::from_vec(v, x0.shape(), &dev).unwrap();
            loss_at(&model, &t, &steps, &labels)
        };
        let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
        let err = (numeric - g[i]).abs() / (numeric.abs().max(g[i].abs()).max(1e-3));
        worst = worst.max(err);
        assert!(
            err < 1e-4,
            "coordinate {i}: analytic {} vs numeric {numeric}",
            g[i]
        );
    }
    eprintln!(
        "worst relative error over {} coordinates: {worst:.2e}",
        n.div_ceil(7)
    );
    let norm: f64 = g.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(norm > 1e-6, "gradient norm {norm}");
}

#[test]
fn frozen_f32_classifier_passes_gradients_to_its_input() {
    let dev = Device::Cpu;
    let cfg = tiny();
    let vm = VarMap::new();
    let _ = RelationClassifier::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    vm.save(&path).unwrap();

    // Frozen weights, as a steering run loads them: nothing but the input is tracked.
    let weights = candle_core::safetensors::load(&path, &dev).unwrap();
    let frozen = RelationClassifier::new(
        &cfg,
        VarBuilder::from_tensors(weights.clone(), DType::F32, &dev),
    )
    .unwrap();
    let reference =
        RelationClassifier::new(&cfg, VarBuilder::from_tensors(weights, DType::F64, &dev)).unwrap();

    let x0 = maps(3, &cfg, DType::F64);
    let steps = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
    let labels = Tensor::new(&[0u32, 1, 2], &dev).unwrap();

    let grad = |model: &RelationClassifier, dtype: DType| -> Vec<f64> {
        let x = Var::from_tensor(&x0.to_dtype(dtype).unwrap()).unwrap();
        let loss = cross_entropy(
            &model.forward(x.as_tensor(), &steps, false).unwrap(),
            &labels,
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        grads
            .get(x.as_tensor())
            .expect("gradient w.r.t. the input maps")
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let g32 = grad(&frozen, DType::F32);
    let g64 = grad(&reference, DType::F64);
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    assert!(
        norm(&g32) > 1e-6,
        "the input gradient vanished: {}",
        norm(&g32)
    );
    assert!(
        g32.iter().filter(|v| **v != 0.0).count() > g32.len() / 2,
        "mostly zero gradient"
    );
    // The f64 reference itself agrees with finite differences.
    let flat: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
    for i in (0..flat.len()).step_by(23) {
        let bump = |d: f64| {
            let mut v = flat.clone();
            v[i] += d;
            loss_at(
                &reference,
                &Tensor::from_vec(v, x0.shape(), &dev).unwrap(),
                &steps,
                &labels,
            )
        };
        let numeric = (bump(1e-6) - bump(-1e-6)) / 2e-6;
        let err = (numeric - g64[i]).abs() / numeric.abs().max(g64[i].abs()).max(1e-3);
        assert!(
            err < 1e-4,
            "coordinate {i}: analytic {} vs numeric {numeric}",
            g64[i]
        );
    }
    let diff: Vec<f64> = g32.iter().zip(&g64).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(&g64);
    assert!(
        rel < 1e-3,
        "f32 frozen gradient differs from the f64 one by {rel:.2e}"
    );
}

#[test]
fn gradients_reach_every_weight_in_training_mode() {
    let dev = Device::Cpu;
    let cfg = tiny();
    let vm = VarMap::new();
    let model =
        RelationClassifier::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let x = maps(4, &cfg, DType::F32);
    let steps = Tensor::new(&[0u32, 1, 2, 0], &dev).unwrap();
    let labels = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
    let loss = model.loss(&x, &steps, &labels, true).unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite(), "{name}");
    }
}
