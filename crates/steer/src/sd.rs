//! Stable Diffusion (UNet) models as steering targets, and steered generation.

use anyhow::{Context, Result};
use candle_core::Tensor;
use l2s_diffusion::{denoise_step, DdimScheduler, Guidance};
use l2s_generate::generate::seeded_latents;
use l2s_generate::sample::{scheduler, Conditioning};
use l2s_generate::{decoded_to_images, word_tokens, GenerateRequest, SdDenoiser};
use l2s_models::StableDiffusion;

use crate::maps::{MapRecorder, WordPair};
use crate::relations::RelationTriplet;
use crate::steering::{
    steered_sample, SteerConfig, SteerLoss, SteerReport, SteerTarget, SteerTriplet,
};

/// Map side the classifier reads.
pub const MAP_SIZE: usize = 16;

pub struct SdTarget<'a> {
    sd: &'a StableDiffusion,
    scheduler: DdimScheduler,
    guidance: Guidance<Tensor>,
    /// The prompt alone (no guidance): what the gradient pass sees.
    cond: Tensor,
}

impl<'a> SdTarget<'a> {
    pub fn new(sd: &'a StableDiffusion, conditioning: &Conditioning, steps: usize) -> Result<Self> {
        Ok(Self {
            sd,
            scheduler: scheduler(sd, steps)?,
            guidance: conditioning.guidance()?,
            cond: conditioning.cond.embedding.clone(),
        })
    }
}

impl SteerTarget for SdTarget<'_> {
    fn timesteps(&self) -> Vec<usize> {
        self.scheduler.timesteps().to_vec()
    }

    fn relation_maps(&mut self, z: &Tensor, step: usize, pair: &WordPair) -> Result<Tensor> {
        let t = self.scheduler.timesteps()[step];
        let mut recorder = MapRecorder::new(vec![pair.clone()], MAP_SIZE, false);
        self.sd
            .unet
            .forward_observed(z, t as f64, &self.cond, &mut recorder)?;
        Ok(recorder.maps()?.squeeze(0)?.squeeze(0)?)
    }

    fn denoise(&mut self, z: &Tensor, index: usize) -> Result<Tensor> {
        let t = self.scheduler.timesteps()[index];
        let mut denoiser = SdDenoiser::new(&self.sd.unet);
        let (_, out) = denoise_step(&mut denoiser, &self.scheduler, z, t, &self.guidance)?;
        Ok(out.prev_sample)
    }
}

/// Token positions of each triplet's words in `prompt`, with the loss's labels.
pub fn steer_triplets(
    sd: &StableDiffusion,
    prompt: &str,
    triplets: &[RelationTriplet],
    label: &dyn Fn(l2s_eval::Relation) -> Result<usize>,
) -> Result<Vec<SteerTriplet>> {
    SteerTriplet::for_prompt(
        triplets,
        &|word| Ok(word_tokens(&sd.tokenizer, prompt, word)?.positions),
        label,
    )
}

/// A steered image.
pub struct Steered {
    pub image: image::RgbImage,
    pub latents: Tensor,
    pub report: SteerReport,
}

/// Generates `req` while steering `triplets` with `loss`.
pub fn generate_steered(
    sd: &StableDiffusion,
    req: &GenerateRequest,
    triplets: &[SteerTriplet],
    loss: &dyn SteerLoss,
    cfg: &SteerConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Steered> {
    let (w, h) = l2s_generate::resolve_size(sd, req.width, req.height)?;
    let initial = match &req.init_latents {
        Some(t) => {
            let want = l2s_generate::generate::latent_shape(sd, w, h);
            anyhow::ensure!(
                t.dims() == want,
                "initial latents of shape {:?}; expected {want:?} for a {w}×{h} image",
                t.dims()
            );
            t.to_dtype(sd.dtype)?.to_device(&sd.device)?
        }
        None => seeded_latents(sd, w, h, req.seed)?,
    };
    let cond = Conditioning::new(sd, &req.prompt, &req.negative_prompt, req.guidance)?;
    let mut target = SdTarget::new(sd, &cond, req.steps)?;
    let (latents, report) = steered_sample(&mut target, loss, triplets, cfg, initial, progress)?;
    let image = decoded_to_images(&sd.vae.decode_latents(&latents)?)?
        .into_iter()
        .next()
        .context("no image decoded")?;
    Ok(Steered {
        image,
        latents,
        report,
    })
}
