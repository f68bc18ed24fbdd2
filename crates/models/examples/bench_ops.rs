//! Times each fused op of `l2s_models::ops` against its composed form on the mid-size UNet's
//! largest shapes: forward, and forward + backward to the input (weights frozen). Prints one JSON
//! line per op with wall and CPU seconds per call (medians).
//!
//! Usage: cargo run --release -p l2s-models --example bench_ops -- [RUNS]

use std::time::Instant;

// As in the `l2s` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use l2s_models::ops::{attention, norm, softmax};

/// CPU seconds of this process so far (user + system, all threads; clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<f64>().ok())
        .sum::<f64>()
        / 100.0
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median wall and CPU seconds of one call of `f`, each sample averaging enough calls to take
/// about 0.2 s (CPU time has a resolution of 10 ms).
fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let t = Instant::now();
    f()?;
    let inner = (0.2 / t.elapsed().as_secs_f64().max(1e-6)).clamp(1.0, 2000.0) as usize;
    let (mut wall, mut cpu) = (vec![], vec![]);
    for _ in 0..runs {
        let (t, c) = (Instant::now(), cpu_seconds());
        for _ in 0..inner {
            f()?;
        }
        wall.push(t.elapsed().as_secs_f64() / inner as f64);
        cpu.push((cpu_seconds() - c) / inner as f64);
    }
    Ok((median(wall), median(cpu)))
}

type Op = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    let dev = Device::Cpu;
    let f32_ = DType::F32;
    let gn_w = (Tensor::randn(0f32, 1., 64, &dev)? + 1.0)?;
    let gn_b = Tensor::randn(0f32, 1., 64, &dev)?;
    let ln_w = (Tensor::randn(0f32, 1., 64, &dev)? + 1.0)?;
    let ln_b = Tensor::randn(0f32, 1., 64, &dev)?;
    let k = Tensor::randn(0f32, 1., (1, 8, 1024, 8), &dev)?;
    let v = Tensor::randn(0f32, 1., (1, 8, 1024, 8), &dev)?;
    let cases: Vec<(&str, Vec<usize>, Op, Op)> = vec![
        (
            "group_norm (2,64,32,32), 32 groups",
            vec![2, 64, 32, 32],
            Box::new({
                let (w, b) = (gn_w.clone(), gn_b.clone());
                move |x| norm::group_norm(x, 32, &w, &b, 1e-5)
            }),
            Box::new({
                let (w, b) = (gn_w.clone(), gn_b.clone());
                move |x| norm::group_norm_composed(x, 32, &w, &b, 1e-5)
            }),
        ),
        (
            "layer_norm (2,1024,64)",
            vec![2, 1024, 64],
            Box::new({
                let (w, b) = (ln_w.clone(), ln_b.clone());
                move |x| norm::layer_norm(x, &w, &b, 1e-5)
            }),
            Box::new({
                let (w, b) = (ln_w.clone(), ln_b.clone());
                move |x| norm::layer_norm_composed(x, &w, &b, 1e-5)
            }),
        ),
        (
            "softmax (1,8,1024,1024)",
            vec![1, 8, 1024, 1024],
            Box::new(softmax::softmax_last_dim),
            Box::new(|x| candle_nn::ops::softmax(x, D::Minus1)),
        ),
        (
            "self-attention q (1,8,1024,8), k and v frozen",
            vec![1, 8, 1024, 8],
            Box::new({
                let (k, v) = (k.clone(), v.clone());
                move |q| attention::attention(q, &k, &v, 0.35)
            }),
            Box::new({
                let (k, v) = (k.clone(), v.clone());
                move |q| attention::attention_composed(q, &k, &v, 0.35)
            }),
        ),
    ];
    for (name, dims, fused, composed) in cases {
        let x = Tensor::randn(0f32, 1., dims.as_slice(), &dev)?.to_dtype(f32_)?;
        let var = Var::from_tensor(&x)?;
        let mut row = serde_json::json!({ "op": name });
        for (label, op) in [("fused", &fused), ("composed", &composed)] {
            let fwd = time(runs, || {
                op(&x)?;
                Ok(())
            })?;
            let bwd = time(runs, || {
                let out = op(var.as_tensor())?;
                out.sqr()?.sum_all()?.backward()?;
                Ok(())
            })?;
            row[label] = serde_json::json!({
                "forward_s": fwd.0, "forward_cpu_s": fwd.1,
                "forward_backward_s": bwd.0, "forward_backward_cpu_s": bwd.1,
            });
        }
        println!("{row}");
    }
    Ok(())
}
