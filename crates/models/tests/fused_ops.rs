//! The fused ops against two independent truths: the same function composed from candle's
//! primitives (forward values and every gradient), and central finite differences in f64. Also
//! that frozen (untracked) weights get no gradient while the input's stays the same.

use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use l2s_models::ops::{attention, conv, heads, matmul, norm, softmax};

/// Deterministic values in (-1, 1), different for each `seed`.
fn values(n: usize, seed: u64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let v = ((i as f64 + 1.0) * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453;
            2.0 * (v - v.floor()) - 1.0
        })
        .collect()
}

fn tensor(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(values(n, seed), dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>())
        .unwrap()
}

/// max |a − b| relative to max |b| (or absolute when b is all but zero).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let diff =
        max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap());
    diff / max_abs(b).max(1e-3)
}

/// Runs `fused` and `composed` on Vars made from `inputs` and compares the outputs and the
/// gradients of Σ out·probe; in f64 also against central differences of that loss.
fn check(
    name: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    composed: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let dtype = inputs[0].dtype();
    let (fwd_tol, grad_tol) = match dtype {
        DType::F64 => (1e-12, 1e-10),
        _ => (2e-6, 2e-5),
    };
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = fused(&args).unwrap();
    let reference = composed(&args).unwrap();
    let err = rel_err(&out, &reference);
    assert!(
        err < fwd_tol,
        "{name} {dtype:?}: forward differs by {err:e}"
    );

    let probe = tensor(out.dims(), 99, dtype);
    let loss = |t: &Tensor| (t * &probe).unwrap().sum_all().unwrap();
    let grads = loss(&out).backward().unwrap();
    let ref_grads = loss(&reference).backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v.as_tensor()).expect("fused gradient");
        let r = ref_grads.get(v.as_tensor()).expect("composed gradient");
        let err = rel_err(g, r);
        assert!(
            err < grad_tol,
            "{name} {dtype:?}: gradient of input {i} differs by {err:e}"
        );
    }

    if dtype != DType::F64 {
        return;
    }
    let eps = 1e-6;
    for (i, input) in inputs.iter().enumerate() {
        let g: Vec<f64> = grads
            .get(vars[i].as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x: Vec<f64> = input.flatten_all().unwrap().to_vec1().unwrap();
        let scale = g.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for k in (0..x.len()).step_by((x.len() / 12).max(1)) {
            let at = |delta: f64| {
                let mut y = x.clone();
                y[k] += delta;
                let mut moved: Vec<Tensor> = inputs.to_vec();
                moved[i] = Tensor::from_vec(y, input.dims(), &Device::Cpu).unwrap();
                loss(&fused(&moved).unwrap()).to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (fd - g[k]).abs() / scale;
            assert!(
                err < 1e-6,
                "{name}: input {i}[{k}]: finite difference {fd} vs gradient {}",
                g[k]
            );
        }
    }
}

const DTYPES: [DType; 2] = [DType::F32, DType::F64];

#[test]
fn group_norm_matches_composed_and_finite_differences() {
    for dtype in DTYPES {
        // Two groups of three channels over 3×4 pixels, batch 2; weight and bias away from 1 and 0.
        let inputs = [
            tensor(&[2, 6, 3, 4], 1, dtype),
            (tensor(&[6], 2, dtype) + 1.0).unwrap(),
            tensor(&[6], 3, dtype),
        ];
        check(
            "group_norm",
            &inputs,
            |a| norm::group_norm(&a[0], 2, &a[1], &a[2], 1e-5),
            |a| norm::group_norm_composed(&a[0], 2, &a[1], &a[2], 1e-5),
        );
    }
}

#[test]
fn layer_norm_matches_composed_and_finite_differences() {
    for dtype in DTYPES {
        let inputs = [
            tensor(&[2, 5, 8], 4, dtype),
            (tensor(&[8], 5, dtype) + 1.0).unwrap(),
            tensor(&[8], 6, dtype),
        ];
        check(
            "layer_norm",
            &inputs,
            |a| norm::layer_norm(&a[0], &a[1], &a[2], 1e-5),
            |a| norm::layer_norm_composed(&a[0], &a[1], &a[2], 1e-5),
        );
    }
}

#[test]
fn rms_norm_matches_composed_and_finite_differences() {
    for dtype in DTYPES {
        let inputs = [
            tensor(&[3, 2, 8], 7, dtype),
            (tensor(&[8], 8, dtype) + 1.0).unwrap(),
        ];
        check(
            "rms_norm",
            &inputs,
            |a| norm::rms_norm(&a[0], &a[1], 1e-6),
            |a| norm::rms_norm_composed(&a[0], &a[1], 1e-6),
        );
    }
}

#[test]
fn softmax_matches_composed_and_finite_differences() {
    for dtype in DTYPES {
        // Scaled up so that some rows are peaked.
        let inputs = [(tensor(&[2, 3, 4, 7], 9, dtype) * 4.0).unwrap()];
        check(
            "softmax",
            &inputs,
            |a| softmax::softmax_last_dim(&a[0]),
            |a| candle_nn::ops::softmax(&a[0], D::Minus1),
        );
    }
}

#[test]
fn matmul_and_linear_match_candle_and_finite_differences() {
    for dtype in DTYPES {
        let inputs = [
            tensor(&[2, 3, 4, 5], 10, dtype),
            tensor(&[2, 3, 5, 6], 11, dtype),
        ];
        check(
            "matmul",
            &inputs,
            |a| matmul::matmul(&a[0], &a[1]),
            |a| a[0].matmul(&a[1]),
        );
        let inputs = [
            tensor(&[2, 3, 5], 12, dtype),
            tensor(&[4, 5], 13, dtype),
            tensor(&[4], 14, dtype),
        ];
        check(
            "linear",
            &inputs,
            |a| matmul::linear(&a[0], &a[1], Some(&a[2])),
            |a| candle_nn::Linear::new(a[1].clone(), Some(a[2].clone())).forward(&a[0]),
        );
    }
}

#[test]
fn attention_matches_composed_and_finite_differences() {
    for dtype in DTYPES {
        // batch 2, 3 heads, 5 queries, 4 keys, head size 6, value size 3.
        let inputs = [
            tensor(&[2, 3, 5, 6], 15, dtype),
            tensor(&[2, 3, 4, 6], 16, dtype),
            tensor(&[2, 3, 4, 3], 17, dtype),
        ];
        check(
            "attention",
            &inputs,
            |a| attention::attention(&a[0], &a[1], &a[2], 0.7),
            |a| attention::attention_composed(&a[0], &a[1], &a[2], 0.7),
        );
    }
}

/// Split into heads, composed attention, heads merged again: the reference of the packed op.
fn attention_split_composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        t.reshape((b, n, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let out = attention::attention_composed(&split(q)?, &split(k)?, &split(v)?, 0.7)?;
    let (b, _, n, e) = out.dims4()?;
    out.transpose(1, 2)?.reshape((b, n, heads * e))
}

#[test]
fn packed_heads_attention_matches_composed_and_finite_differences() {
    for dtype in DTYPES {
        // batch 2, 3 heads, 5 queries, 4 keys, head size 6, value size 3, heads side by side.
        let inputs = [
            tensor(&[2, 5, 18], 18, dtype),
            tensor(&[2, 4, 18], 19, dtype),
            tensor(&[2, 4, 9], 20, dtype),
        ];
        check(
            "attention_heads",
            &inputs,
            |a| heads::attention_heads(&a[0], &a[1], &a[2], 3, 0.7),
            |a| attention_split_composed(&a[0], &a[1], &a[2], 3),
        );
    }
}

/// The backward pass recomputes blocks of 128 query rows and adds each block's share into ∂k and
/// ∂v: 300 queries make three blocks, the last one partial.
#[test]
fn packed_heads_attention_over_several_row_blocks_matches_composed() {
    for dtype in DTYPES {
        let inputs = [
            tensor(&[1, 300, 8], 30, dtype),
            tensor(&[1, 40, 8], 31, dtype),
            tensor(&[1, 40, 6], 32, dtype),
        ];
        check(
            "attention_heads, 3 row blocks",
            &inputs,
            |a| heads::attention_heads(&a[0], &a[1], &a[2], 2, 0.7),
            |a| attention_split_composed(&a[0], &a[1], &a[2], 2),
        );
    }
}

/// Heads eight wide take the narrow product kernel in f32 (forward, ∂q, ∂k and ∂v), over
/// several row blocks and a key count that leaves a partial group of rows.
#[test]
fn packed_heads_attention_with_heads_eight_wide_matches_composed() {
    for dtype in DTYPES {
        let inputs = [
            tensor(&[2, 140, 16], 33, dtype),
            tensor(&[2, 45, 16], 34, dtype),
            tensor(&[2, 45, 16], 35, dtype),
        ];
        check(
            "attention_heads, heads of 8",
            &inputs,
            |a| heads::attention_heads(&a[0], &a[1], &a[2], 2, 0.7),
            |a| attention_split_composed(&a[0], &a[1], &a[2], 2),
        );
    }
}

/// Without gradients the packed op works through blocks of query rows (the last one partial).
#[test]
fn packed_heads_attention_without_gradients_matches_composed() {
    for dtype in DTYPES {
        let (q, k, v) = (
            tensor(&[2, 150, 16], 21, dtype),
            tensor(&[2, 77, 16], 22, dtype),
            tensor(&[2, 77, 8], 23, dtype),
        );
        let out = heads::attention_heads(&q, &k, &v, 2, 0.7).unwrap();
        let reference = attention_split_composed(&q, &k, &v, 2).unwrap();
        let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
        let err = rel_err(&out, &reference);
        assert!(err < tol, "{dtype:?}: differs by {err:e}");
        // Observed: bit for bit the same output, and the probabilities of the composed form.
        let (observed, probs) = heads::attention_heads_observed(&q, &k, &v, 2, 0.7)
            .unwrap()
            .expect("the kernel runs on the CPU");
        assert_eq!(rel_err(&observed, &out), 0.0);
        let split = |t: &Tensor| {
            let t = t.reshape((2, (), 2, 8)).unwrap().transpose(1, 2).unwrap();
            t.contiguous().unwrap()
        };
        let scores = (split(&q).matmul(&split(&k).t().unwrap()).unwrap() * 0.7).unwrap();
        let reference = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let err = rel_err(&probs, &reference);
        assert!(err < tol, "{dtype:?}: probabilities differ by {err:e}");
    }
}

/// The im2col convolution against candle's, for the shapes the models use (3×3 with padding 1,
/// stride 1 and 2; 1×1; unpadded), without and with bias, and with gradients through the layer.
#[test]
fn convolution_matches_candle_and_finite_differences() {
    for dtype in DTYPES {
        for (cin, cout, k, stride, padding, h, w) in [
            (3, 4, 3, 1, 1, 5, 6),
            (3, 4, 3, 2, 1, 8, 6),
            (4, 2, 1, 1, 0, 3, 5),
            (2, 3, 3, 1, 0, 5, 4),
            (2, 3, 3, 2, 0, 7, 5),
        ] {
            let inputs = [
                tensor(&[2, cin, h, w], 30, dtype),
                tensor(&[cout, cin, k, k], 31, dtype),
                tensor(&[cout], 32, dtype),
            ];
            let candle_conv = |a: &[Tensor]| -> Result<Tensor> {
                a[0].conv2d(&a[1], padding, stride, 1, 1)?
                    .broadcast_add(&a[2].reshape((1, (), 1, 1))?)
            };
            let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
            let plain =
                conv::conv2d_no_grad(&inputs[0], &inputs[1], None, padding, stride).unwrap();
            let err = rel_err(
                &plain,
                &inputs[0].conv2d(&inputs[1], padding, stride, 1, 1).unwrap(),
            );
            assert!(
                err < tol,
                "conv2d without bias {dtype:?}: differs by {err:e}"
            );
            let layer = move |a: &[Tensor]| -> Result<Tensor> {
                let map = [("weight", &a[1]), ("bias", &a[2])]
                    .into_iter()
                    .map(|(n, t)| (n.to_string(), t.clone()))
                    .collect();
                let vb = candle_nn::VarBuilder::from_tensors(map, a[0].dtype(), a[0].device());
                l2s_models::nn::conv2d(cin, cout, k, stride, padding, vb)?.forward(&a[0])
            };
            check("conv2d", &inputs, layer, candle_conv);
        }
    }
}

/// Cross-attention to a frozen text context: keys and values get no gradient, the queries the
/// same one as when everything is tracked.
#[test]
fn attention_to_a_frozen_context_differentiates_only_the_queries() {
    let dtype = DType::F64;
    let q = Var::from_tensor(&tensor(&[1, 2, 6, 4], 40, dtype)).unwrap();
    let (k, v) = (
        tensor(&[1, 2, 3, 4], 41, dtype),
        tensor(&[1, 2, 3, 4], 42, dtype),
    );
    let (kv, vv) = (Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
    let loss = |k: &Tensor, v: &Tensor| {
        let out = attention::attention(q.as_tensor(), k, v, 0.5).unwrap();
        out.sqr().unwrap().sum_all().unwrap().backward().unwrap()
    };
    let frozen = loss(&k, &v);
    let tracked = loss(kv.as_tensor(), vv.as_tensor());
    assert_eq!(
        frozen.get_ids().count(),
        1,
        "only the queries keep a gradient"
    );
    assert!(tracked.get(kv.as_tensor()).is_some() && tracked.get(vv.as_tensor()).is_some());
    let (g1, g2) = (
        frozen.get(q.as_tensor()).unwrap(),
        tracked.get(q.as_tensor()).unwrap(),
    );
    assert!(rel_err(g1, g2) < 1e-14);
}

/// With the weights plain tensors (a frozen model) the input gets the same gradient, and the
/// weights none at all; candle's composed ops would have computed and kept one for each.
#[test]
fn frozen_weights_get_no_gradient() {
    let dtype = DType::F64;
    let x = Var::from_tensor(&tensor(&[2, 6, 3, 4], 20, dtype)).unwrap();
    let (w, b) = (
        (tensor(&[6], 21, dtype) + 1.0).unwrap(),
        tensor(&[6], 22, dtype),
    );
    let (lw, lb) = (tensor(&[5, 4], 23, dtype), tensor(&[5], 24, dtype));
    let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
    let (lwv, lbv) = (
        Var::from_tensor(&lw).unwrap(),
        Var::from_tensor(&lb).unwrap(),
    );
    let f = |w: &Tensor, b: &Tensor, lw: &Tensor, lb: &Tensor| {
        let h = norm::group_norm(x.as_tensor(), 2, w, b, 1e-5).unwrap();
        let h = matmul::linear(&h, lw, Some(lb)).unwrap();
        let h = softmax::softmax_last_dim(&h).unwrap();
        // A loss with no constant operand, so that only the input and the weights could get one.
        h.sqr().unwrap().sum_all().unwrap()
    };
    let frozen = f(&w, &b, &lw, &lb).backward().unwrap();
    let trained = f(
        wv.as_tensor(),
        bv.as_tensor(),
        lwv.as_tensor(),
        lbv.as_tensor(),
    )
    .backward()
    .unwrap();
    for t in [&w, &b, &lw, &lb] {
        assert!(frozen.get(t).is_none(), "a frozen weight got a gradient");
    }
    assert_eq!(
        frozen.get_ids().count(),
        1,
        "only the input keeps a gradient"
    );
    for v in [&wv, &bv, &lwv, &lbv] {
        assert!(
            trained.get(v.as_tensor()).is_some(),
            "a trained weight got no gradient"
        );
    }
    let (g1, g2) = (
        frozen.get(x.as_tensor()).unwrap(),
        trained.get(x.as_tensor()).unwrap(),
    );
    assert!(rel_err(g1, g2) < 1e-14);

    // LayerNorm and RMSNorm (one element per channel, their own backward loops) likewise.
    let (nw, nb) = (
        (tensor(&[4], 27, dtype) + 1.0).unwrap(),
        tensor(&[4], 28, dtype),
    );
    let (nwv, nbv) = (
        Var::from_tensor(&nw).unwrap(),
        Var::from_tensor(&nb).unwrap(),
    );
    let g = |w: &Tensor, b: &Tensor| {
        let h = norm::layer_norm(x.as_tensor(), w, b, 1e-5).unwrap();
        let h = norm::rms_norm(&h, w, 1e-6).unwrap();
        h.sqr().unwrap().sum_all().unwrap().backward().unwrap()
    };
    let (frozen, trained) = (g(&nw, &nb), g(nwv.as_tensor(), nbv.as_tensor()));
    assert_eq!(
        frozen.get_ids().count(),
        1,
        "only the input keeps a gradient"
    );
    assert!(trained.get(nwv.as_tensor()).is_some() && trained.get(nbv.as_tensor()).is_some());
    let (g1, g2) = (
        frozen.get(x.as_tensor()).unwrap(),
        trained.get(x.as_tensor()).unwrap(),
    );
    assert!(rel_err(g1, g2) < 1e-14);

    // candle's own ops differentiate the frozen weight too (what the ops above avoid).
    let plain = (x
        .as_tensor()
        .flatten_from(1)
        .unwrap()
        .matmul(&tensor(&[72, 3], 26, dtype)))
    .unwrap()
    .sum_all()
    .unwrap()
    .backward()
    .unwrap();
    assert_eq!(plain.get_ids().count(), 2);
}

#[test]
fn bad_shapes_are_errors() {
    let x = Var::from_tensor(&tensor(&[2, 6, 3], 30, DType::F32)).unwrap();
    let x = x.as_tensor();
    let w = tensor(&[6], 31, DType::F32);
    assert!(norm::group_norm(x, 4, &w, &w, 1e-5).is_err());
    assert!(norm::group_norm(x, 0, &w, &w, 1e-5).is_err());
    assert!(norm::layer_norm(x, &w, &w, 1e-5).is_err());
    assert!(matmul::linear(x, &tensor(&[4, 5], 32, DType::F32), None).is_err());
    assert!(matmul::matmul(x, &tensor(&[2, 4, 3], 33, DType::F32)).is_err());
}
