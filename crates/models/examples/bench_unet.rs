//! Rust half of the UNet CPU benchmark (`tools/bench/unet_cpu.sh` runs both halves).
//!
//! Loads the UNet that `tools/fixtures/bench_unet_torch.py --save DIR` wrote, checks our outputs
//! against PyTorch's on the same inputs, then times (a) a no-grad CFG forward at batch 2 and
//! (b) a batch-1 forward with attention capture plus backward to the latent. Prints one JSON line.
//!
//! Usage: cargo run --release -p l2s-models --example bench_unet -- DIR [RUNS] [WARMUP]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

// As in the `l2s` binary: candle allocates a buffer per op, which mimalloc makes cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Var};
use l2s_models::unet::{UNet2DConditionModel, UNetConfig};
use l2s_models::weights::{var_builder, Variant};
use l2s_models::AttentionStore;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// CPU time of this process so far, all threads, user + system (from /proc/self/stat, in clock
/// ticks of 1/100 s). Under a loaded machine it measures the work done where wall time does not.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum::<f64>() / 100.0
}

/// Median wall time, every run's wall time, and the median CPU time.
fn timed(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, Vec<f64>, f64)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    let mut cpu = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (t, c) = (Instant::now(), cpu_seconds());
        f()?;
        times.push(t.elapsed().as_secs_f64());
        cpu.push(cpu_seconds() - c);
    }
    Ok((median(times.clone()), times, median(cpu)))
}

/// Peak resident set size of this process (VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .context("usage: bench_unet DIR [RUNS] [WARMUP]")?,
    );
    let runs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let warmup: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2);
    // As the `l2s` binary does: keep freed memory mapped, or the kernel zeroes fresh pages for
    // the large buffers of every pass. `MIMALLOC_PURGE_DELAY` in the environment still wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option (15 = mi_option_purge_delay in mimalloc.h).
        unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    }
    let dev = Device::Cpu;

    let cfg = UNetConfig::from_file(&dir.join("config.json"))?;
    let unet =
        UNet2DConditionModel::new(&cfg, var_builder(&dir, &Variant::Auto, DType::F32, &dev)?)?;
    let io = candle_core::safetensors::load(dir.join("bench_io.safetensors"), &dev)?;
    let t = io["cfg.timestep"].to_vec1::<f32>()?[0] as f64;

    let out = unet.forward(&io["cfg.sample"], t, &io["cfg.encoder_hidden_states"])?;
    let fwd_err = common::rel_err(&out, &io["cfg.out"]);
    let (t_fwd, fwd_runs, cpu_fwd) = timed(warmup, runs, || {
        unet.forward(&io["cfg.sample"], t, &io["cfg.encoder_hidden_states"])?;
        Ok(())
    })?;

    let mut grad_err = f64::NAN;
    let (t_bwd, bwd_runs, cpu_bwd) = timed(warmup, runs, || {
        let latent = Var::from_tensor(&io["steer.sample"])?;
        let mut store = AttentionStore::new();
        let out = unet.forward_observed(
            latent.as_tensor(),
            t,
            &io["steer.encoder_hidden_states"],
            &mut store,
        )?;
        let loss = common::fixture_loss(store.records(), &out, 2, 8);
        let grads = loss.backward()?;
        let grad = grads
            .get(latent.as_tensor())
            .context("no gradient reached the latent")?;
        grad_err = common::rel_err(grad, &io["steer.grad"]);
        Ok(())
    })?;

    let report = serde_json::json!({
        "impl": "candle",
        "candle": "0.11.1",
        "threads": candle_core::utils::get_num_threads(),
        "runs": runs,
        "warmup": warmup,
        "cfg_forward_batch2_s": t_fwd,
        "steer_fwd_bwd_batch1_s": t_bwd,
        "cfg_forward_batch2_cpu_s": cpu_fwd,
        "steer_fwd_bwd_batch1_cpu_s": cpu_bwd,
        "cfg_forward_runs_s": fwd_runs,
        "steer_fwd_bwd_runs_s": bwd_runs,
        "peak_rss_mib": peak_rss_mib(),
        "rel_err_vs_torch": {"cfg_out": fwd_err, "grad": grad_err},
    });
    println!("{report}");
    Ok(())
}
