//! Rust half of the UNet benchmark (`tools/bench/unet_cpu.sh`, `tools/gpu/bench.sh`).
//!
//! Loads the UNet that `tools/fixtures/bench_unet_torch.py --save DIR` wrote, checks our outputs
//! against PyTorch's on the same inputs, then times (a) a no-grad CFG forward at batch 2 (when
//! PyTorch measured it too) and (b) a batch-1 forward with attention capture plus backward to the
//! latent. Prints one JSON line.
//!
//! Usage: cargo run --release -p l2s-models --example bench_unet -- DIR [RUNS] [WARMUP]
//!        [--device cpu|cuda] [--dtype f32|bf16|f16]

mod bench_common;
#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

// As in the `l2s` binary: candle allocates a buffer per op, which mimalloc makes cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use bench_common::{input, rel_err, timed, Args};
use candle_core::Var;
use l2s_models::unet::{UNet2DConditionModel, UNetConfig};
use l2s_models::weights::{var_builder, Variant};
use l2s_models::AttentionStore;

fn main() -> Result<()> {
    let args = Args::parse()?;
    args.only_flags(&["device", "dtype"])?;
    let dir = PathBuf::from(args.positional.first().context(
        "usage: bench_unet DIR [RUNS] [WARMUP] [--device cpu|cuda] [--dtype f32|bf16|f16]",
    )?);
    let runs = args.positional_usize(1, 5)?.max(1);
    let warmup = args.positional_usize(2, 2)?;
    let dev = args.device()?;
    let dtype = args.dtype()?;
    bench_common::keep_freed_memory_mapped();

    let load_start = std::time::Instant::now();
    let cfg = UNetConfig::from_file(&dir.join("config.json"))?;
    let unet = UNet2DConditionModel::new(&cfg, var_builder(&dir, &Variant::Auto, dtype, &dev)?)?;
    dev.synchronize()?;
    let load_s = load_start.elapsed().as_secs_f64();
    let io = bench_common::load_io(&dir)?;
    let t = io["cfg.timestep"].to_vec1::<f32>()?[0] as f64;

    // The CFG forward is measured only where PyTorch measured it (bench_io holds its output).
    let mut cfg_fig = None;
    if io.contains_key("cfg.out") {
        let sample = input(&io, "cfg.sample", &dev, dtype)?;
        let cond = input(&io, "cfg.encoder_hidden_states", &dev, dtype)?;
        let out = unet.forward(&sample, t, &cond)?;
        let err = rel_err(&out, &io["cfg.out"])?;
        let fig = timed(&dev, warmup, runs, || {
            unet.forward(&sample, t, &cond)?;
            Ok(())
        })?;
        cfg_fig = Some((fig, err));
    }

    let sample = input(&io, "steer.sample", &dev, dtype)?;
    let cond = input(&io, "steer.encoder_hidden_states", &dev, dtype)?;
    let mut grad_err = f64::NAN;
    let (t_bwd, bwd_runs, cpu_bwd) = timed(&dev, warmup, runs, || {
        let latent = Var::from_tensor(&sample)?;
        let mut store = AttentionStore::new();
        let out = unet.forward_observed(latent.as_tensor(), t, &cond, &mut store)?;
        let loss = common::fixture_loss(store.records(), &out, 2, 8);
        let grads = loss.backward()?;
        let grad = grads
            .get(latent.as_tensor())
            .context("no gradient reached the latent")?;
        grad_err = rel_err(grad, &io["steer.grad"])?;
        Ok(())
    })?;

    let mut report = serde_json::json!({
        "impl": "candle",
        "candle": "0.11.1",
        "device": bench_common::device_name(&dev),
        "dtype": bench_common::dtype_name(dtype),
        "threads": candle_core::utils::get_num_threads(),
        "runs": runs,
        "warmup": warmup,
        "load_s": load_s,
        "steer_fwd_bwd_batch1_s": t_bwd,
        "steer_fwd_bwd_batch1_cpu_s": cpu_bwd,
        "steer_fwd_bwd_runs_s": bwd_runs,
        "peak_rss_mib": bench_common::peak_rss_mib(),
        "rel_err_vs_torch": {"grad": grad_err},
    });
    if let Some(((t_fwd, fwd_runs, cpu_fwd), err)) = cfg_fig {
        report["cfg_forward_batch2_s"] = t_fwd.into();
        report["cfg_forward_batch2_cpu_s"] = cpu_fwd.into();
        report["cfg_forward_runs_s"] = fwd_runs.into();
        report["rel_err_vs_torch"]["cfg_out"] = err.into();
    }
    println!("{report}");
    Ok(())
}
