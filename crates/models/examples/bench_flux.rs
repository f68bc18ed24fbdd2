//! Rust half of the FLUX steering benchmark (`tools/bench/flux_cpu.sh`, `tools/gpu/bench.sh`).
//!
//! Loads the transformer that `tools/fixtures/bench_flux_torch.py --save DIR` wrote, and times one
//! steering iteration at batch 1 on the same inputs: velocity with text-only attention capture of
//! the two loss tokens in every block, the fixtures' attention loss, backward to the packed latent.
//! The velocity and the gradient are compared with PyTorch's. Prints one JSON line.
//!
//! Usage: cargo run --release -p l2s-models --example bench_flux -- DIR [RUNS] [WARMUP]
//!        [--checkpointing off|on] [--device cpu|cuda] [--dtype f32|bf16|f16]
//!
//! `bench_flux --probe cuda` only opens the device: a quick check that the build has CUDA.

mod bench_common;

use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use bench_common::{input, rel_err, timed, Args};
use candle_core::{IndexOp, Tensor, Var};
use l2s_models::flux::{FluxConfig, FluxInputs, FluxTransformer2DModel};
use l2s_models::weights::{var_builder, Variant};
use l2s_models::{AttentionSite, AttentionStore};

/// Σ_blocks Σ_{b,h,q} (P[..,0]²·cx(q) + P[..,1]²·cy(q)) + 0.1·mean(out²) on maps kept for the two
/// loss tokens only: the fixtures' loss (make_flux_fixtures.GRAD_LOSS_TEXT).
fn attention_loss(records: &[(AttentionSite, Tensor)], out: &Tensor) -> Result<Tensor> {
    let mut total = (out.sqr()?.mean_all()? * 0.1)?;
    for (site, p) in records {
        let (h, w) = (site.height, site.width);
        let cx: Vec<f32> = (0..h * w)
            .map(|q| ((q % w) as f32 + 0.5) / w as f32)
            .collect();
        let cy: Vec<f32> = (0..h * w)
            .map(|q| ((q / w) as f32 + 0.5) / h as f32)
            .collect();
        let cx = Tensor::new(cx, out.device())?.to_dtype(p.dtype())?;
        let cy = Tensor::new(cy, out.device())?.to_dtype(p.dtype())?;
        let term = |k: usize, c: &Tensor| -> Result<Tensor> {
            Ok(p.i((.., .., .., k))?.sqr()?.broadcast_mul(c)?.sum_all()?)
        };
        total = (total + term(0, &cx)? + term(1, &cy)?)?;
    }
    Ok(total)
}

fn main() -> Result<()> {
    let args = Args::parse()?;
    args.only_flags(&["device", "dtype", "checkpointing", "probe"])?;
    bench_common::keep_freed_memory_mapped();
    if let Some(probe) = args.flag("probe") {
        let dev = match probe {
            "cpu" => candle_core::Device::Cpu,
            "cuda" => candle_core::Device::new_cuda(0)
                .context("no CUDA device (is this a `--features cuda` build?)")?,
            other => bail!("--probe {other:?}: expected cpu or cuda"),
        };
        Tensor::zeros(4, candle_core::DType::F32, &dev)?.sum_all()?;
        println!("{{\"probe\":\"{probe}\",\"ok\":true}}");
        return Ok(());
    }
    let dir = PathBuf::from(args.positional.first().context(
        "usage: bench_flux DIR [RUNS] [WARMUP] [--checkpointing off|on] [--device cpu|cuda] [--dtype f32|bf16|f16]",
    )?);
    let runs = args.positional_usize(1, 3)?.max(1);
    let warmup = args.positional_usize(2, 1)?;
    let checkpointing = match args.flag("checkpointing").unwrap_or("off") {
        "on" => true,
        "off" => false,
        other => bail!("--checkpointing {other:?}: expected on or off"),
    };
    let dev = args.device()?;
    let dtype = args.dtype()?;

    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("bench_meta.json")).context("reading bench_meta.json")?,
    )?;
    let num = |k: &str| -> Result<usize> {
        meta[k]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("bench_meta.json: no {k}"))
    };
    let grid = (
        meta["grid"][0].as_u64().context("bench_meta.json: grid")? as usize,
        meta["grid"][1].as_u64().context("bench_meta.json: grid")? as usize,
    );
    let (ia, ib) = (num("ia")?, num("ib")?);

    let load_start = std::time::Instant::now();
    let cfg = FluxConfig::from_file(&dir.join("config.json"))?;
    let mut model =
        FluxTransformer2DModel::new(&cfg, var_builder(&dir, &Variant::Auto, dtype, &dev)?)?;
    model.set_gradient_checkpointing(checkpointing);
    dev.synchronize()?;
    let load_s = load_start.elapsed().as_secs_f64();

    let io = bench_common::load_io(&dir)?;
    let latents = input(&io, "hidden_states", &dev, dtype)?;
    let text = input(&io, "encoder_hidden_states", &dev, dtype)?;
    let pooled = input(&io, "pooled_projections", &dev, dtype)?;
    let timestep = input(&io, "timestep", &dev, dtype)?;
    let guidance = match io.contains_key("guidance") {
        true => Some(input(&io, "guidance", &dev, dtype)?),
        false => None,
    };

    let (mut out_err, mut grad_err) = (f64::NAN, f64::NAN);
    let (t, runs_s, cpu) = timed(&dev, warmup, runs, || {
        let x = Var::from_tensor(&latents)?;
        let mut store = AttentionStore::with_tokens(&[ia, ib], &dev)?;
        let inputs = FluxInputs {
            latents: x.as_tensor(),
            grid,
            text: &text,
            pooled: &pooled,
            timestep: &timestep,
            guidance: guidance.as_ref(),
        };
        let out = model.forward(&inputs, &mut store)?;
        let loss = attention_loss(store.records(), &out)?;
        let grads = loss.backward()?;
        let g = grads
            .get(x.as_tensor())
            .context("no gradient reached the latent")?;
        out_err = rel_err(&out, &io["out"])?;
        grad_err = rel_err(g, &io["grad"])?;
        Ok(())
    })?;

    let report = serde_json::json!({
        "impl": "candle",
        "candle": "0.11.1",
        "device": bench_common::device_name(&dev),
        "dtype": bench_common::dtype_name(dtype),
        "threads": candle_core::utils::get_num_threads(),
        "runs": runs,
        "warmup": warmup,
        "double_blocks": cfg.num_layers,
        "single_blocks": cfg.num_single_layers,
        "image_tokens": grid.0 * grid.1,
        "text_tokens": text.dim(1)?,
        "resolution": meta["resolution"],
        "checkpointing": checkpointing,
        "load_s": load_s,
        "steer_fwd_bwd_s": t,
        "steer_fwd_bwd_cpu_s": cpu,
        "steer_fwd_bwd_runs_s": runs_s,
        "peak_rss_mib": bench_common::peak_rss_mib(),
        "rel_err_vs_torch": {"out": out_err, "grad": grad_err},
    });
    println!("{report}");
    Ok(())
}
