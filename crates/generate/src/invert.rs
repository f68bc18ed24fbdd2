//! Image → noise by DDIM inversion (plain or fixed-point), and back by DDIM sampling.
//!
//! The image is encoded with the VAE's mean (no sampling), inverted under the prompt, and the
//! reconstruction samples from the inverted latent with the same prompt and guidance, so a good
//! inversion reproduces the input (measured by PSNR).

use std::path::Path;

use candle_core::Tensor;
use image::RgbImage;
use l2s_diffusion::ddim_invert;
use l2s_models::vae::LatentDraw;
use l2s_models::StableDiffusion;

use crate::convert::{image_to_tensor, psnr, to_unit_nhwc, unit_nhwc_to_images};
use crate::denoiser::SdDenoiser;
use crate::error::{GenerateError, Result};
use crate::generate::{latent_shape, resolve_size};
use crate::sample::{
    inverse_scheduler, sample_latents, scheduler, Conditioning, Phase, Progress, StepObserver,
};

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
    /// The image size expected; `None`: the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
}

impl InvertRequest {
    /// The defaults of the method: guidance 1, 50 steps, 5 fixed-point iterations, native size.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            guidance: 1.0,
            steps: 50,
            fixed_point_iterations: 5,
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
pub fn check_image(sd: &StableDiffusion, image: &RgbImage, req: &InvertRequest) -> Result<()> {
    let (w, h) = resolve_size(sd, req.width, req.height)?;
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
    let img = image::ImageReader::open(path)
        .map_err(|e| GenerateError::file(path, e))?
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
    sd: &StableDiffusion,
    image: &RgbImage,
    req: &InvertRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<Inversion> {
    check_image(sd, image, req)?;
    let x = image_to_tensor(image, sd.dtype, &sd.device)?;
    let z0 = sd.vae.encode_latents(&x, LatentDraw::Mean)?;
    let mut inv = invert_latents(sd, &z0, req, progress)?;
    inv.image = Some(image.clone());
    Ok(inv)
}

/// Inverts a clean latent `z0` (1, C, h, w) under the request's prompt and guidance.
pub fn invert_latents(
    sd: &StableDiffusion,
    z0: &Tensor,
    req: &InvertRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<Inversion> {
    let (w, h) = resolve_size(sd, req.width, req.height)?;
    let want = latent_shape(sd, w, h);
    if z0.dims() != want {
        return Err(GenerateError::Shape {
            what: "latents to invert".into(),
            found: format!("{:?}", z0.dims()),
            expected: format!("{want:?} for a {w}×{h} image"),
        });
    }
    let cond = Conditioning::new(sd, &req.prompt, &req.negative_prompt, req.guidance)?;
    let guidance = cond.guidance()?;
    let scheduler = inverse_scheduler(sd, req.steps)?;
    let mut denoiser = SdDenoiser::new(&sd.unet);
    let total = scheduler.timesteps().len();
    let z0 = z0.to_dtype(sd.dtype)?.to_device(&sd.device)?;
    let inv = ddim_invert(
        &mut denoiser,
        &scheduler,
        z0.clone(),
        &guidance,
        req.fixed_point_iterations,
        |info| {
            progress(Progress {
                phase: Phase::Invert,
                done: info.index + 1,
                total,
            });
            Ok(())
        },
    )?;
    Ok(Inversion {
        z0,
        latents: inv.latents().clone(),
        fixed_point_residuals: inv.fixed_point_residuals().to_vec(),
        trajectory: inv.into_trajectory(),
        request: req.clone(),
        image: None,
        warnings: cond.warnings(),
    })
}

/// Samples back from an inversion with its prompt, guidance and step count; `observer` may watch
/// chosen steps (e.g. to record attention maps of a real image).
pub fn reconstruct(
    sd: &StableDiffusion,
    inversion: &Inversion,
    observer: Option<&mut dyn StepObserver>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Reconstruction> {
    let req = &inversion.request;
    let cond = Conditioning::new(sd, &req.prompt, &req.negative_prompt, req.guidance)?;
    let guidance = cond.guidance()?;
    let scheduler = scheduler(sd, req.steps)?;
    let latents = sample_latents(
        sd,
        &scheduler,
        inversion.latents.clone(),
        &guidance,
        observer,
        progress,
    )?;
    let pixels = to_unit_nhwc(&sd.vae.decode_latents(&latents)?)?;
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
