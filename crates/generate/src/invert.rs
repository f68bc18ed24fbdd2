//! Image → noise and back: DDIM inversion (plain or fixed-point) for Stable Diffusion,
//! RF-inversion for FLUX — whichever the model's sampler calls for — and reconstruction through
//! the one sampling loop.
//!
//! The image is encoded with the VAE's mean (no sampling), inverted under the prompt, and the
//! reconstruction samples from the inverted latent with the same prompt and guidance, so a good
//! inversion reproduces the input (measured by PSNR).

use std::path::Path;

use candle_core::Tensor;
use image::RgbImage;
use l2s_diffusion::{sample, NoHook, RfInversionConfig};
use l2s_models::{InversionSettings, InvertedLatents, Pipeline};

use crate::convert::{image_to_tensor, psnr, to_unit_nhwc, unit_nhwc_to_images};
use crate::error::{GenerateError, Result};
use crate::sample::{ObserveSteps, Phase, Progress, StepObserver, WithProgress};

/// How to invert.
#[derive(Clone, Debug)]
pub struct InvertRequest {
    pub prompt: String,
    /// Used only when `guidance > 1`.
    pub negative_prompt: String,
    /// Guidance scale of both inversion and reconstruction (1: the prompt alone).
    pub guidance: f64,
    pub steps: usize,
    /// Fixed-point refinements per step (0: plain DDIM inversion).
    pub fixed_point_iterations: usize,
    /// RF-inversion's controllers (flow-matching models).
    pub rf: RfInversionConfig,
    /// Seed of RF-inversion's noise target.
    pub noise_seed: u64,
    /// The image size expected; `None`: the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
}

impl InvertRequest {
    pub fn settings(&self) -> InversionSettings {
        InversionSettings {
            fixed_point_iterations: self.fixed_point_iterations,
            rf: self.rf,
            noise_seed: self.noise_seed,
        }
    }

    /// The defaults of the method: guidance 1, 50 steps, 5 fixed-point iterations, native size.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            guidance: 1.0,
            steps: 50,
            fixed_point_iterations: 5,
            rf: RfInversionConfig::default(),
            noise_seed: 0,
            width: None,
            height: None,
        }
    }
}

/// An inverted image.
#[derive(Clone, Debug)]
pub struct Inversion {
    /// The clean latent the inversion started from (VAE mean × scaling factor).
    pub z0: Tensor,
    /// The inverted latent z_T.
    pub latents: Tensor,
    /// z0, then the latent after every step.
    pub trajectory: Vec<Tensor>,
    /// Per step, the relative size of the last fixed-point update (empty for plain inversion).
    pub fixed_point_residuals: Vec<f64>,
    pub request: InvertRequest,
    /// The inverted image, when the inversion started from one.
    pub image: Option<RgbImage>,
    pub warnings: Vec<String>,
}

/// A reconstruction from an inverted latent.
#[derive(Clone, Debug)]
pub struct Reconstruction {
    pub image: RgbImage,
    /// (1, H, W, 3) float32 in [0, 1].
    pub pixels: Tensor,
    /// The final latents (before the VAE).
    pub latents: Tensor,
    /// PSNR against the inverted image in dB, when there was one.
    pub psnr: Option<f64>,
}

/// Checks that `image` has the size the request expects.
pub fn check_image(pipeline: &Pipeline, image: &RgbImage, req: &InvertRequest) -> Result<()> {
    let (w, h) = pipeline.resolve_size(req.width, req.height)?;
    if (image.width() as usize, image.height() as usize) != (w, h) {
        return Err(GenerateError::Shape {
            what: "image to invert".into(),
            found: format!("{}×{} pixels", image.width(), image.height()),
            expected: if req.width.is_none() && req.height.is_none() {
                format!(
                    "{w}×{h}, the model's size (ask for another size explicitly to invert at it)"
                )
            } else {
                format!("{w}×{h} as requested")
            },
        });
    }
    Ok(())
}

/// Reads an 8-bit RGB image (PNG, JPEG, …). Other colour types (grey, alpha, 16-bit) are refused
/// rather than silently converted.
pub fn read_rgb_image(path: &Path) -> Result<RgbImage> {
    let bytes = l2s_files::read_capped(path, l2s_files::MAX_IMAGE_BYTES)
        .map_err(|e| GenerateError::file(path, e.reason()))?;
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| GenerateError::file(path, e))?
        .decode()
        .map_err(|e| GenerateError::file(path, format!("cannot decode image: {e}")))?;
    match img {
        image::DynamicImage::ImageRgb8(rgb) => Ok(rgb),
        other => Err(GenerateError::file(
            path,
            format!(
                "colour type {:?}; expected 8-bit RGB without alpha",
                other.color()
            ),
        )),
    }
}

/// Encodes `image` with the VAE and inverts it.
pub fn invert(
    pipeline: &Pipeline,
    image: &RgbImage,
    req: &InvertRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<Inversion> {
    check_image(pipeline, image, req)?;
    let x = image_to_tensor(image, pipeline.dtype(), pipeline.device())?;
    let z0 = pipeline.encode_image(&x)?;
    let mut inv = invert_latents(pipeline, &z0, req, progress)?;
    inv.image = Some(image.clone());
    Ok(inv)
}

/// Inverts a clean latent `z0` (1, C, h, w) under the request's prompt and guidance.
pub fn invert_latents(
    pipeline: &Pipeline,
    z0: &Tensor,
    req: &InvertRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<Inversion> {
    let (w, h) = pipeline.resolve_size(req.width, req.height)?;
    let z0 = pipeline.check_latents(z0, w, h, "latents to invert")?;
    let cond = pipeline.encode(&req.prompt, &req.negative_prompt, req.guidance)?;
    let mut hook = WithProgress {
        inner: &mut NoHook,
        phase: Phase::Invert,
        progress,
    };
    let InvertedLatents {
        z0,
        latents,
        trajectory,
        fixed_point_residuals,
    } = pipeline.invert(&z0, &cond, req.steps, &req.settings(), &mut hook)?;
    Ok(Inversion {
        z0,
        latents,
        fixed_point_residuals,
        trajectory,
        request: req.clone(),
        image: None,
        warnings: cond.warnings,
    })
}

/// Samples back from an inversion with its prompt, guidance and step count; `observer` may watch
/// chosen steps (e.g. to record attention maps of a real image).
pub fn reconstruct(
    pipeline: &Pipeline,
    inversion: &Inversion,
    observer: Option<&mut dyn StepObserver>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Reconstruction> {
    let req = &inversion.request;
    let cond = pipeline.encode(&req.prompt, &req.negative_prompt, req.guidance)?;
    let inverted = InvertedLatents {
        z0: inversion.z0.clone(),
        latents: inversion.latents.clone(),
        trajectory: Vec::new(),
        fixed_point_residuals: Vec::new(),
    };
    let scheduler = pipeline.reconstruction_scheduler(&inverted, req.steps, &req.settings())?;
    let mut observe;
    let mut none = NoHook;
    let inner: &mut dyn l2s_diffusion::StepHook<_> = match observer {
        Some(o) => {
            observe = ObserveSteps(o);
            &mut observe
        }
        None => &mut none,
    };
    let mut hook = WithProgress {
        inner,
        phase: Phase::Denoise,
        progress,
    };
    let latents = sample(
        &mut pipeline.denoiser(),
        &*scheduler,
        inversion.latents.clone(),
        &cond.guidance,
        &mut hook,
    )?;
    let pixels = to_unit_nhwc(&pipeline.decode(&latents)?)?;
    let image = unit_nhwc_to_images(&pixels)?.remove(0);
    let psnr = inversion
        .image
        .as_ref()
        .map(|orig| psnr(orig, &image))
        .transpose()?;
    Ok(Reconstruction {
        image,
        pixels,
        latents,
        psnr,
    })
}
