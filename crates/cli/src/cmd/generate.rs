//! `l2s generate`: prompt → PNG files with their settings in text chunks.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use l2s_diffusion::NoHook;
use l2s_generate::{
    generate, generation_metadata, read_latents, side_by_side, write_png, GenerateRequest,
};
use l2s_models::Pipeline;
use l2s_steer::method::Method;
use l2s_steer::steering::{generate_steered, SteerGoal};

use crate::common::{
    load_model, warn_all, Bars, Global, ModelArgs, OutFolder, SampleArgs, SteerArgs,
};

#[derive(clap::Args)]
#[command(
    after_help = "Image i of --num-images N uses seed + i. With one image, --out is a .png file; with several, \
a folder (created if needed) that receives 0000.png, 0001.png, …. Each PNG carries the prompt, negative prompt, \
seed, steps, guidance, model and size as text chunks. Stable Diffusion defaults to 50 DDIM steps at guidance 7.5, unless the folder names its own (the built-in model: 50 steps at guidance 1.25); \
a FLUX folder to its model's own settings (dev: 50 steps, guidance 3.5 as a model input; schnell: 4 steps)."
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt
    #[arg(long)]
    pub prompt: String,
    /// Seed of the initial noise
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub sampling: SampleArgs,
    /// Number of images
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Start from these latents instead of seeded noise: a safetensors file with a tensor
    /// `latents` of shape (N, C, height/f, width/f), one row per image
    #[arg(long, value_name = "FILE")]
    pub init_latents: Option<PathBuf>,
    /// Output: a .png file, or a folder for several images
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub steer: SteerArgs,
    /// When steering a FLUX model, recompute each transformer block in the backward pass instead
    /// of keeping its activations: less memory, more time, the same images (ignored for Stable
    /// Diffusion)
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Relations to enforce, "subject,relation,object" (several separated by ';'); default: parsed
    /// from the prompt
    #[arg(long)]
    pub relation: Option<String>,
    /// Also write an enlarged preview (.png) of the first image: side by side with the plain
    /// model's image from the same seed when steering, alone otherwise
    #[arg(long, value_name = "FILE")]
    pub preview: Option<PathBuf>,
}

/// The integer enlargement that makes an image's longer side at least 256 pixels.
fn preview_scale(width: usize, height: usize) -> u32 {
    256usize.div_ceil(width.max(height).max(1)).max(1) as u32
}

/// The most images one `generate` writes.
const MAX_IMAGES: usize = 10_000;

/// Image formats other than PNG: an `--out` ending so names a file this command cannot write,
/// not a folder.
const OTHER_IMAGE_EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic",
];

/// Where each image goes, and the output folder (locked; removed again on failure if it was
/// made here and stayed empty) when there are several.
fn targets(out: &Path, n: usize) -> Result<(Vec<PathBuf>, Option<OutFolder>)> {
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let is_png = ext.as_deref() == Some("png");
    if let Some(e) = ext
        .as_deref()
        .filter(|e| OTHER_IMAGE_EXTENSIONS.contains(e))
    {
        bail!(
            "--out {}: images are written as PNG only, not .{e}; give a name ending in .png (or a \
             folder for several images)",
            out.display()
        );
    }
    if is_png {
        if n != 1 {
            bail!(
                "--out {} names one file but --num-images is {n}: give a folder",
                out.display()
            );
        }
        return Ok((vec![crate::common::png_target(out, "--out")?], None));
    }
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {}: exists and is not a folder (or give a name ending in .png)",
            out.display()
        );
    }
    let folder = OutFolder::open(out, "--out")?;
    Ok((
        (0..n).map(|i| out.join(format!("{i:04}.png"))).collect(),
        Some(folder),
    ))
}

/// One latent row per image from `--init-latents`.
fn init_rows(path: &Path, n: usize) -> Result<Vec<Tensor>> {
    let t = read_latents(path, "latents").context("--init-latents")?;
    if t.rank() == 4 && t.dim(0)? == n {
        return (0..n).map(|i| Ok(t.narrow(0, i, 1)?)).collect();
    }
    if n == 1 {
        // Let the generator name the expected shape.
        return Ok(vec![t]);
    }
    bail!(
        "--init-latents {}: tensor `latents` has shape {:?}; expected {n} rows (one per image)",
        path.display(),
        t.dims()
    )
}

/// The method, its settings and the triplets' token positions, or `None` without steering.
pub fn steering_for(
    model: &Pipeline,
    prompt: &str,
    steps: usize,
    a: &SteerArgs,
    relation: Option<&str>,
) -> Result<Option<(Method, Vec<SteerGoal>)>> {
    let Some(method) = a.method(model, steps)? else {
        return Ok(None);
    };
    let triplets =
        l2s_steer::relations::triplets_for(prompt, relation).with_context(|| match relation {
            Some(_) => "--relation".to_string(),
            None => format!(
                "--steer {} needs a relation in the prompt or --relation",
                a.steer
            ),
        })?;
    let label = |r| method.label(r);
    let steer = SteerGoal::for_prompt(
        &triplets,
        &|word| Ok(model.word_positions(prompt, word)?),
        &label,
    )?;
    Ok(Some((method, steer)))
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    if args.num_images == 0 {
        bail!("--num-images 0: expected at least 1");
    }
    if args.num_images > MAX_IMAGES {
        bail!(
            "--num-images {}: expected at most {MAX_IMAGES} (files are numbered 0000.png …)",
            args.num_images
        );
    }
    let (mut model, model_name) = load_model(&args.model)?;
    if args.gradient_checkpointing && !model.set_gradient_checkpointing(true) {
        tracing::warn!(
            "--gradient-checkpointing applies to FLUX models only; ignored for {}",
            model.family_name()
        );
    }
    let (steps, guidance) = args.sampling.resolve_steered(&model, &args.steer)?;
    model.resolve_size(args.sampling.width, args.sampling.height)?;
    let (paths, folder) = targets(&args.out, args.num_images)?;
    let preview = match &args.preview {
        Some(p) => Some(crate::common::png_target(p, "--preview")?),
        None => None,
    };
    let inits = match &args.init_latents {
        Some(p) => Some(init_rows(p, args.num_images)?),
        None => None,
    };
    let steering = steering_for(
        &model,
        &args.prompt,
        steps,
        &args.steer,
        args.relation.as_deref(),
    )?;
    for (i, path) in paths.iter().enumerate() {
        let req = GenerateRequest {
            prompt: args.prompt.clone(),
            negative_prompt: args.sampling.negative_prompt.clone(),
            seed: args.seed.wrapping_add(i as u64),
            steps,
            guidance,
            width: args.sampling.width,
            height: args.sampling.height,
            init_latents: inits.as_ref().map(|v| v[i].clone()),
        };
        let label = if args.num_images > 1 {
            format!("image {}/{}", i + 1, args.num_images)
        } else {
            "image".into()
        };
        let mut bars = Bars::new(global, label);
        let mut extra = Vec::new();
        let (image, width, height, warnings) = match &steering {
            None => {
                let g = generate(&model, &req, &mut NoHook, &mut |p| bars.update(p))
                    .with_context(|| format!("generating {}", path.display()))?;
                (g.image, g.width, g.height, g.warnings)
            }
            Some((method, triplets)) => {
                let loss = method.loss().context("steering method without a loss")?;
                let s = generate_steered(&model, &req, triplets, loss, &method.config, &mut |p| {
                    bars.update(p)
                })
                .with_context(|| format!("generating {}", path.display()))?;
                extra.push(("steer".to_string(), method.name.clone()));
                extra.push((
                    "steer_config".to_string(),
                    serde_json::to_string(&method.config)?,
                ));
                extra.push((
                    "steer_relations".to_string(),
                    args.relation
                        .clone()
                        .unwrap_or_else(|| "from prompt".into()),
                ));
                if let Some(l) = s.report.final_loss() {
                    extra.push(("steer_final_loss".to_string(), format!("{l:.6}")));
                }
                extra.push((
                    "steer_iterations".to_string(),
                    s.report.iterations.to_string(),
                ));
                let g = s.generated;
                (g.image, g.width, g.height, g.warnings)
            }
        };
        bars.finish();
        if i == 0 {
            warn_all(&warnings);
        }
        if let Some(p) = &args.init_latents {
            extra.push(("init_latents".to_string(), p.display().to_string()));
        }
        let meta = generation_metadata(
            &req,
            &model_name,
            model.sampler_name(),
            width,
            height,
            &extra,
        );
        write_png(path, &image, &meta).with_context(|| format!("writing {}", path.display()))?;
        tracing::info!("wrote {}", path.display());
        println!("{}", path.display());
        if let (0, Some(target)) = (i, &preview) {
            let scale = preview_scale(width, height);
            let sheet = match &steering {
                Some((method, _)) => {
                    let plain = generate(&model, &req, &mut NoHook, &mut |_| {})
                        .context("generating the plain image for --preview")?;
                    let label = format!("steered ({})", method.name);
                    side_by_side(&[("plain", &plain.image), (&label, &image)], scale)
                }
                None => side_by_side(&[("image", &image)], scale),
            };
            write_png(target, &sheet, &meta)
                .with_context(|| format!("writing {}", target.display()))?;
            println!("{}", target.display());
        }
    }
    if let Some(f) = folder {
        f.finish();
    }
    Ok(())
}
