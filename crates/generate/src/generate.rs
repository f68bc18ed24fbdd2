//! Text → image: seeded noise, DDIM with classifier-free guidance, VAE decoding.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use l2s_diffusion::{sample, StepHook};
use l2s_models::{ModelDenoiser, Pipeline};

use crate::convert::{to_unit_nhwc, unit_nhwc_to_images};
use crate::error::{GenerateError, Result};
use crate::sample::{ObserveSteps, Phase, Progress, StepObserver, WithProgress};

/// One text-to-image run. Same request and model → byte-identical image.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: String,
    /// The unconditional prompt of classifier-free guidance ("" by default, as in diffusers).
    pub negative_prompt: String,
    /// Seeds the initial noise (ignored when `init_latents` is given).
    pub seed: u64,
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is used only above 1.
    pub guidance: f64,
    /// Image size in pixels; `None`: the model's native size (see [`native_size`]).
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Start from these latents, shape (1, latent channels, height / f, width / f), instead of
    /// seeded noise.
    pub init_latents: Option<Tensor>,
}

impl GenerateRequest {
    /// The project's defaults: empty negative prompt, seed 0, 50 steps, guidance 7.5, native size.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            seed: 0,
            steps: 50,
            guidance: 7.5,
            width: None,
            height: None,
            init_latents: None,
        }
    }

    /// Refuses a prompt or negative prompt holding a NUL character: the images' metadata
    /// (PNG text) cannot hold it, and the text encoder never saw one.
    pub fn check_text(&self) -> Result<()> {
        for (what, text) in [
            ("prompt", &self.prompt),
            ("negative prompt", &self.negative_prompt),
        ] {
            if text.contains('\0') {
                return Err(GenerateError::invalid(
                    what,
                    format!("{text:?} contains a NUL character"),
                ));
            }
        }
        Ok(())
    }
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generated {
    pub image: RgbImage,
    /// (1, H, W, 3) float32 in [0, 1] before quantisation (diffusers' `output_type="np"`).
    pub pixels: Tensor,
    /// The latents the loop started from.
    pub initial_latents: Tensor,
    /// The latents after the last step, before the VAE.
    pub latents: Tensor,
    pub width: usize,
    pub height: usize,
    /// Notes for the user (e.g. a truncated prompt).
    pub warnings: Vec<String>,
}

/// Generates one image: seeded (or given) latents → the model's sampler, with `hook` around
/// every step (steering, attention recording; [`l2s_diffusion::NoHook`] for neither) → VAE.
/// The same request gives the same bytes.
pub fn generate<'p>(
    pipeline: &'p Pipeline,
    req: &GenerateRequest,
    hook: &mut dyn StepHook<ModelDenoiser<'p>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generated> {
    let (width, height) = pipeline.resolve_size(req.width, req.height)?;
    req.check_text()?;
    let initial = match &req.init_latents {
        Some(t) => pipeline.check_latents(t, width, height, "initial latents")?,
        None => pipeline.seeded_latents(width, height, req.seed)?,
    };
    let cond = pipeline.encode(&req.prompt, &req.negative_prompt, req.guidance)?;
    let scheduler = pipeline.scheduler(req.steps, width, height)?;
    let mut hook = WithProgress {
        inner: hook,
        phase: Phase::Denoise,
        progress,
    };
    let latents = sample(
        &mut pipeline.denoiser(),
        &*scheduler,
        initial.clone(),
        &cond.guidance,
        &mut hook,
    )?;
    let pixels = to_unit_nhwc(&pipeline.decode(&latents)?)?;
    let image = unit_nhwc_to_images(&pixels)?.remove(0);
    Ok(Generated {
        image,
        pixels,
        initial_latents: initial,
        latents,
        width,
        height,
        warnings: cond.warnings,
    })
}

/// [`generate`] with `observer` watching the steps it asks for.
pub fn generate_observed(
    pipeline: &Pipeline,
    req: &GenerateRequest,
    observer: &mut dyn StepObserver,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generated> {
    generate(pipeline, req, &mut ObserveSteps(observer), progress)
}

/// Reads a latent tensor named `name` from a safetensors file, as float32.
pub fn read_latents(path: &Path, name: &str) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| GenerateError::file(path, e))?;
    let t = tensors.get(name).ok_or_else(|| {
        let mut names: Vec<&str> = tensors.keys().map(String::as_str).collect();
        names.sort();
        let more = names.len().saturating_sub(8);
        names.truncate(8);
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        GenerateError::file(
            path,
            format!(
                "no tensor named `{name}` (found: {}{tail})",
                names.join(", ")
            ),
        )
    })?;
    Ok(t.to_dtype(DType::F32)?)
}

/// Writes tensors to a safetensors file atomically, with string metadata in its header. Half
/// precision tensors are stored as float32.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &[(String, String)],
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let mut t = t.to_device(&Device::Cpu)?.contiguous()?;
        if matches!(t.dtype(), DType::F16 | DType::BF16) {
            t = t.to_dtype(DType::F32)?;
        }
        let dtype = match t.dtype() {
            DType::F32 => safetensors::Dtype::F32,
            DType::F64 => safetensors::Dtype::F64,
            DType::U32 => safetensors::Dtype::U32,
            DType::I64 => safetensors::Dtype::I64,
            DType::U8 => safetensors::Dtype::U8,
            other => {
                return Err(GenerateError::invalid(
                    format!("tensor `{name}`"),
                    format!("dtype {other:?} cannot be saved"),
                ))
            }
        };
        let bytes = tensor_bytes(&t)?;
        views.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let data: Vec<(String, safetensors::tensor::TensorView<'_>)> = views
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| GenerateError::invalid(format!("tensor `{n}`"), e.to_string()))
        })
        .collect::<Result<_>>()?;
    let meta: std::collections::HashMap<String, String> = metadata.iter().cloned().collect();
    let bytes = safetensors::tensor::serialize(data, Some(meta))
        .map_err(|e| GenerateError::file(path, e))?;
    Ok(l2s_files::write_atomic(path, &bytes)?)
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U32 => flat
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        other => {
            return Err(GenerateError::invalid(
                "tensor",
                format!("dtype {other:?} cannot be saved"),
            ))
        }
    })
}
