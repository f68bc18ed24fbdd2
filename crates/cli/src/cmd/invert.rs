//! `l2s invert`: image → DDIM inversion → reconstruction PNG, with its PSNR.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Tensor;
use l2s_generate::{invert, read_rgb_image, reconstruct, write_png, write_tensors, InvertRequest};

use crate::common::{load_model, png_target, warn_all, Bars, Global, ModelArgs};

#[derive(clap::Args)]
#[command(after_help = "The image must be 8-bit RGB at the model's size (or --width × --height). It is encoded with the \
VAE mean, inverted under the prompt, and sampled back with the same prompt, guidance and steps. The reconstruction \
is written to --out and its PSNR against the image printed. --save-latents writes `latents` (the inverted noise, \
usable as `l2s generate --init-latents`) and `z0` (the encoded image).")]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image to invert
    #[arg(long)]
    pub image: PathBuf,
    /// The prompt to invert under
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt (used only with guidance above 1)
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// DDIM steps
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Guidance scale of inversion and reconstruction
    #[arg(long, default_value_t = 1.0)]
    pub guidance: f64,
    /// Fixed-point iterations per inversion step (0: plain DDIM inversion)
    #[arg(long, default_value_t = 5)]
    pub fixed_point: usize,
    /// Expected image width (default: the model's native size)
    #[arg(long)]
    pub width: Option<usize>,
    /// Expected image height (default: the model's native size)
    #[arg(long)]
    pub height: Option<usize>,
    /// Where to write the reconstruction (.png)
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the inverted latents to this safetensors file
    #[arg(long, value_name = "FILE")]
    pub save_latents: Option<PathBuf>,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let out = png_target(&args.out, "--out")?;
    let (sd, model_name) = load_model(&args.model)?;
    let image = read_rgb_image(&args.image).with_context(|| format!("--image {}", args.image.display()))?;
    let req = InvertRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        guidance: args.guidance,
        steps: args.steps,
        fixed_point_iterations: args.fixed_point,
        width: args.width,
        height: args.height,
    };
    let mut bars = Bars::new(global, "image");
    let inv = invert(&sd, &image, &req, &mut |p| bars.update(p)).with_context(|| format!("inverting {}", args.image.display()))?;
    warn_all(&inv.warnings);
    let rec = reconstruct(&sd, &inv, None, &mut |p| bars.update(p)).context("reconstructing")?;
    bars.finish();
    let psnr = rec.psnr.unwrap_or(f64::NAN);
    if let Some(path) = &args.save_latents {
        let meta = vec![
            ("prompt".to_string(), req.prompt.clone()),
            ("steps".to_string(), req.steps.to_string()),
            ("guidance".to_string(), req.guidance.to_string()),
            ("fixed_point_iterations".to_string(), req.fixed_point_iterations.to_string()),
            ("image".to_string(), args.image.display().to_string()),
            ("model".to_string(), model_name.clone()),
        ];
        let tensors: Vec<(String, Tensor)> = vec![("latents".into(), inv.latents.clone()), ("z0".into(), inv.z0.clone())];
        write_tensors(path, &tensors, &meta).with_context(|| format!("--save-latents {}", path.display()))?;
        tracing::info!("wrote {}", path.display());
    }
    let meta = vec![
        ("prompt".to_string(), req.prompt.clone()),
        ("negative_prompt".to_string(), req.negative_prompt.clone()),
        ("steps".to_string(), req.steps.to_string()),
        ("guidance".to_string(), req.guidance.to_string()),
        ("fixed_point_iterations".to_string(), req.fixed_point_iterations.to_string()),
        ("model".to_string(), model_name),
        ("size".to_string(), format!("{}x{}", image.width(), image.height())),
        ("source_image".to_string(), args.image.display().to_string()),
        ("psnr".to_string(), format!("{psnr:.4}")),
        ("sampler".to_string(), "ddim-inversion".to_string()),
    ];
    write_png(&out, &rec.image, &meta).with_context(|| format!("writing {}", out.display()))?;
    println!("PSNR {psnr:.2} dB");
    Ok(())
}
