//! Peak memory of one steering gradient pass through a FLUX transformer, with and without
//! per-block gradient checkpointing: velocity with text-only attention capture of two word
//! tokens in every block, a loss on those maps, backward to the latent. Prints one JSON line with
//! the process's peak resident memory (VmHWM) before and after the pass.
//!
//! Usage: cargo run --release -p l2s-models --example flux_checkpoint_memory -- tiny|mid on|off
//!
//! - tiny: the `fixtures/flux-dev-tiny` transformer at 64² (4×4 packed tokens), 512 T5 tokens.
//! - mid: random weights, 4 double + 8 single blocks, 8 heads × 64, T5 width 4096, at 256²
//!   (16×16 packed tokens), 512 T5 tokens.
//!
//! Run each setting in its own process: VmHWM only grows.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use l2s_models::flux::{FluxConfig, FluxInputs, FluxTransformer2DModel};
use l2s_models::weights::{var_builder, Variant};
use l2s_models::AttentionStore;

/// Random weights of any requested shape (memory does not depend on their values).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match h {
            Init::Const(v) => Tensor::full(v as f32, s, dev)?.to_dtype(dtype),
            _ => Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype),
        }
    }
    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no shape for `{name}`")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The process's peak resident set size in MiB.
fn vm_hwm_mib() -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM line in /proc/self/status")?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM without a value")?
        .parse()?;
    Ok(kb / 1024.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (which, on) = match args.as_slice() {
        [w, c] if (c == "on" || c == "off") => (w.as_str(), c == "on"),
        _ => bail!("usage: flux_checkpoint_memory tiny|mid on|off"),
    };
    let dev = Device::Cpu;
    let (cfg, vb, grid) = match which {
        "tiny" => {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../fixtures/flux-dev-tiny/model/transformer");
            let cfg = FluxConfig::from_file(&dir.join("config.json"))?;
            (
                cfg,
                var_builder(&dir, &Variant::Auto, DType::F32, &dev)?,
                (4, 4),
            )
        }
        "mid" => {
            let cfg = FluxConfig {
                num_layers: 4,
                num_single_layers: 8,
                num_attention_heads: 8,
                attention_head_dim: 64,
                axes_dims_rope: vec![8, 28, 28],
                ..FluxConfig::flux1_dev()
            };
            (
                cfg,
                VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone()),
                (16, 16),
            )
        }
        other => bail!("unknown setting {other:?}: expected tiny or mid"),
    };
    let mut model = FluxTransformer2DModel::new(&cfg, vb)?;
    model.set_gradient_checkpointing(on);
    let tokens = 512;
    let text = Tensor::randn(0f32, 1.0, (1, tokens, cfg.joint_attention_dim), &dev)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, cfg.pooled_projection_dim), &dev)?;
    let latent = Var::from_tensor(&Tensor::randn(
        0f32,
        1.0,
        (1, grid.0 * grid.1, cfg.in_channels),
        &dev,
    )?)?;
    let timestep = Tensor::new(&[0.7f32], &dev)?;
    let guidance = Tensor::new(&[3.5f32], &dev)?;
    let before = vm_hwm_mib()?;

    let start = Instant::now();
    let mut store = AttentionStore::with_tokens(&[1, 4], &dev)?;
    let inputs = FluxInputs {
        latents: latent.as_tensor(),
        grid,
        text: &text,
        pooled: &pooled,
        timestep: &timestep,
        guidance: cfg.guidance_embeds.then_some(&guidance),
    };
    let v = model.forward(&inputs, &mut store)?;
    let mut loss = v.sqr()?.mean_all()?;
    for (_, maps) in store.records() {
        loss = (loss + maps.sqr()?.sum_all()?)?;
    }
    let grads = loss.backward()?;
    let g = grads
        .get(latent.as_tensor())
        .context("no gradient reached the latent")?;
    let grad_rms = g.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt();
    let seconds = start.elapsed().as_secs_f64();
    let peak = vm_hwm_mib()?;
    println!(
        "{}",
        serde_json::json!({
            "config": which,
            "blocks": format!("{} double + {} single, {} heads x {}", cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.attention_head_dim),
            "image_tokens": grid.0 * grid.1,
            "text_tokens": tokens,
            "checkpointing": on,
            "vm_hwm_before_pass_mib": (before * 10.0).round() / 10.0,
            "vm_hwm_peak_mib": (peak * 10.0).round() / 10.0,
            "pass_mib": ((peak - before) * 10.0).round() / 10.0,
            "seconds": (seconds * 100.0).round() / 100.0,
            "grad_rms": grad_rms,
        })
    );
    Ok(())
}
