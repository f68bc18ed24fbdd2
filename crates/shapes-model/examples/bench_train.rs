//! Rust half of the shapes-model training benchmark (`tools/bench/shapes_train.sh` runs both
//! halves).
//!
//! `bench_train DIR --write-batches K` writes the trainer's own first K batches of the default
//! recipe (batch 16, seed 0, uniform v-loss weights) to `DIR/batches.safetensors`, so that both
//! halves train on identical inputs. `bench_train DIR [RUNS] [WARMUP]` then starts from the
//! shipped weights and times the trainer's step function (text encoder + UNet forward, loss,
//! backward, AdamW, EMA) on those batches in turn: WARMUP steps, then RUNS timed ones. Scene
//! rendering and noise drawing are left out of the timing (they are timed once, separately).
//! Prints one JSON line; when `DIR/torch_losses.json` exists its losses are compared with ours.
//!
//! Usage: cargo run --release -p l2s-shapes-model --example bench_train -- DIR [RUNS] [WARMUP]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use l2s_shapes_model::{Batch, TrainOptions, Trainer};

// As in the `l2s` binary: mimalloc, with freed memory kept mapped.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// CPU time of this process so far, all threads, user + system (from /proc/self/stat, in clock
/// ticks of 1/100 s). On a loaded machine it measures the work done where wall time does not.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum::<f64>() / 100.0
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The recipe of `l2s shapes train` at its defaults (batch 16, AdamW 1e-3, EMA 0.995).
fn recipe() -> TrainOptions {
    TrainOptions {
        batch: 16,
        ..Default::default()
    }
}

fn shipped_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/shapes")
}

fn write_batches(trainer: &Trainer, dir: &Path, count: usize) -> Result<()> {
    let opts = recipe();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let (t0, c0) = (Instant::now(), cpu_seconds());
    for i in 0..count {
        let b = trainer.batch(&opts, i)?;
        let ts: Vec<f32> = b.timesteps.iter().map(|&t| t as f32).collect();
        let n = ts.len();
        tensors.insert(format!("{i}.noisy"), b.noisy);
        // PyTorch's embedding wants int64 ids.
        tensors.insert(format!("{i}.ids"), b.ids.to_dtype(DType::I64)?);
        tensors.insert(
            format!("{i}.timesteps"),
            Tensor::from_vec(ts, n, &Device::Cpu)?,
        );
        tensors.insert(format!("{i}.target"), b.target);
        tensors.insert(format!("{i}.weights"), b.weights);
    }
    let cpu = (cpu_seconds() - c0) / count as f64;
    let wall = t0.elapsed().as_secs_f64() / count as f64;
    candle_core::safetensors::save(&tensors, dir.join("batches.safetensors"))?;
    println!(
        "{}",
        serde_json::json!({
            "impl": "candle", "what": "batch preparation (render, caption, tokenise, noise)",
            "batches": count, "batch_prep_cpu_s": cpu, "batch_prep_s": wall,
        })
    );
    Ok(())
}

fn load_batches(dir: &Path) -> Result<Vec<Batch>> {
    let path = dir.join("batches.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| {
        format!(
            "reading {} (run with --write-batches first)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    while let Some(noisy) = t.get(&format!("{}.noisy", out.len())) {
        let i = out.len();
        let get = |k: &str| {
            t.get(&format!("{i}.{k}"))
                .cloned()
                .with_context(|| format!("no `{i}.{k}` in {}", path.display()))
        };
        out.push(Batch {
            noisy: noisy.clone(),
            ids: get("ids")?.to_dtype(DType::U32)?,
            timesteps: get("timesteps")?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect(),
            target: get("target")?,
            weights: get("weights")?,
        });
    }
    if out.is_empty() {
        bail!("no batches in {}", path.display());
    }
    Ok(out)
}

fn main() -> Result<()> {
    // SAFETY: sets a plain integer option before any allocation-heavy work.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .context("usage: bench_train DIR [RUNS] [WARMUP]")?,
    );
    std::fs::create_dir_all(&dir)?;
    let scratch = tempfile::tempdir()?;
    let trainer = Trainer::with_seed(&scratch.path().join("run"), &Device::Cpu, 0)?;
    trainer.init_from_model(&shipped_model())?;
    if args.get(1).map(String::as_str) == Some("--write-batches") {
        let count = args.get(2).map_or(Ok(4), |s| s.parse())?;
        return write_batches(&trainer, &dir, count);
    }
    let runs: usize = args.get(1).map_or(Ok(5), |s| s.parse())?;
    let warmup: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    if runs == 0 {
        bail!("RUNS must be at least 1");
    }
    let batches = load_batches(&dir)?;
    let opts = recipe();
    let (mut opt, mut ema) = trainer.optimizer(&opts)?;
    // Past the warm-up of the learning rate, as in most of a run.
    opt.lr = opts.lr;
    let (mut cpu, mut wall, mut losses) = (vec![], vec![], vec![]);
    for i in 0..warmup + runs {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let loss = trainer.step(&batches[i % batches.len()], &mut opt, &mut ema, i)?;
        if i >= warmup {
            cpu.push(cpu_seconds() - c0);
            wall.push(t0.elapsed().as_secs_f64());
        }
        losses.push(loss);
    }
    let torch_losses: Option<Vec<f64>> = std::fs::read_to_string(dir.join("torch_losses.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let loss_rel_diff: Option<Vec<f64>> = torch_losses.map(|tl| {
        tl.iter()
            .zip(&losses)
            .map(|(t, &o)| ((o as f64 - t) / t).abs())
            .collect()
    });
    let cpu_s = median(cpu.clone());
    println!(
        "{}",
        serde_json::json!({
            "impl": "candle",
            "threads": std::env::var("RAYON_NUM_THREADS").ok(),
            "batch": opts.batch,
            "batches": batches.len(),
            "warmup": warmup,
            "runs": runs,
            "params": trainer.parameter_count(),
            "step_cpu_s": cpu_s,
            "steps_per_cpu_s": 1.0 / cpu_s,
            "step_s": median(wall.clone()),
            "step_cpu_runs_s": cpu,
            "step_runs_s": wall,
            "peak_rss_mib": peak_rss_mib(),
            "losses": losses,
            "loss_rel_diff_vs_torch": loss_rel_diff,
        })
    );
    Ok(())
}
