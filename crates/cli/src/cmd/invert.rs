//! `l2s invert`: image → DDIM inversion → reconstruction PNG, with its PSNR.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Tensor;
use l2s_diffusion::RfInversionConfig;
use l2s_generate::{invert, read_rgb_image, reconstruct, write_png, write_tensors, InvertRequest};

use crate::common::{load_model, png_target, warn_all, Bars, Global, ModelArgs, SampleArgs};

#[derive(clap::Args)]
#[command(
    after_help = "The image must be 8-bit RGB at the model's size (or --width × --height). It is encoded with the \
VAE mean, inverted under the prompt (Stable Diffusion: fixed-point DDIM inversion, 50 steps, guidance 1 by default; \
FLUX: RF-inversion with the model's steps, guidance 0 by default), and sampled back with the same prompt, guidance and steps. The reconstruction \
is written to --out and its PSNR against the image printed. --save-latents writes `latents` (the inverted noise, \
usable as `l2s generate --init-latents`) and `z0` (the encoded image)."
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image to invert
    #[arg(long)]
    pub image: PathBuf,
    /// The prompt to invert under
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub sampling: SampleArgs,
    /// Fixed-point iterations per inversion step (0: plain DDIM inversion; Stable Diffusion only)
    #[arg(long, default_value_t = 5)]
    pub fixed_point: usize,
    /// FLUX RF-inversion: γ, the forward ODE's pull towards the noise sample
    #[arg(long, default_value_t = RfInversionConfig::default().gamma)]
    pub rf_gamma: f64,
    /// FLUX RF-inversion: η, the reverse ODE's pull towards the image
    #[arg(long, default_value_t = RfInversionConfig::default().eta)]
    pub rf_eta: f64,
    /// FLUX RF-inversion: τ, the fraction of reverse steps during which η acts
    #[arg(long, default_value_t = RfInversionConfig::default().stop)]
    pub rf_stop: f64,
    /// FLUX RF-inversion: seed of the noise sample
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the reconstruction (.png)
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the inverted latents to this safetensors file
    #[arg(long, value_name = "FILE")]
    pub save_latents: Option<PathBuf>,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let out = png_target(&args.out, "--out")?;
    let (model, model_name) = load_model(&args.model)?;
    let (steps, guidance) = args.sampling.resolve(&model, true);
    let image =
        read_rgb_image(&args.image).with_context(|| format!("--image {}", args.image.display()))?;
    let req = InvertRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.sampling.negative_prompt.clone(),
        guidance,
        steps,
        fixed_point_iterations: args.fixed_point,
        rf: RfInversionConfig {
            gamma: args.rf_gamma,
            eta: args.rf_eta,
            start: 0.0,
            stop: args.rf_stop,
        },
        noise_seed: args.seed,
        width: args.sampling.width,
        height: args.sampling.height,
    };
    let mut bars = Bars::new(global, "image");
    let inverting = || format!("inverting {}", args.image.display());
    let inv = invert(&model, &image, &req, &mut |p| bars.update(p)).with_context(inverting)?;
    warn_all(&inv.warnings);
    let rec = reconstruct(&model, &inv, None, &mut |p| bars.update(p)).context("reconstructing")?;
    let sampler = model.inversion_name(&req.settings());
    bars.finish();
    let psnr = rec.psnr.unwrap_or(f64::NAN);
    if let Some(path) = &args.save_latents {
        let meta = vec![
            ("prompt".to_string(), req.prompt.clone()),
            ("steps".to_string(), req.steps.to_string()),
            ("guidance".to_string(), req.guidance.to_string()),
            (
                "fixed_point_iterations".to_string(),
                req.fixed_point_iterations.to_string(),
            ),
            ("image".to_string(), args.image.display().to_string()),
            ("model".to_string(), model_name.clone()),
        ];
        let tensors: Vec<(String, Tensor)> = vec![
            ("latents".into(), inv.latents.clone()),
            ("z0".into(), inv.z0.clone()),
        ];
        write_tensors(path, &tensors, &meta)
            .with_context(|| format!("--save-latents {}", path.display()))?;
        tracing::info!("wrote {}", path.display());
    }
    let meta = vec![
        ("prompt".to_string(), req.prompt.clone()),
        ("negative_prompt".to_string(), req.negative_prompt.clone()),
        ("steps".to_string(), req.steps.to_string()),
        ("guidance".to_string(), req.guidance.to_string()),
        (
            "fixed_point_iterations".to_string(),
            req.fixed_point_iterations.to_string(),
        ),
        ("model".to_string(), model_name),
        (
            "size".to_string(),
            format!("{}x{}", image.width(), image.height()),
        ),
        ("source_image".to_string(), args.image.display().to_string()),
        ("psnr".to_string(), format!("{psnr:.4}")),
        ("sampler".to_string(), sampler),
    ];
    write_png(&out, &rec.image, &meta).with_context(|| format!("writing {}", out.display()))?;
    println!("PSNR {psnr:.2} dB");
    Ok(())
}
