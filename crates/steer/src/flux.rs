//! FLUX.1 as a steering target, and steered FLUX generation. The loop is [`steered_sample`];
//! only the model side lives here: the gradient pass reads the text-only attention of every
//! double and single block at the step's σ (no classifier-free guidance exists to skip), and the
//! denoising step is one flow-matching Euler step. Latents are packed inside the loop.

use anyhow::{Context, Result};
use candle_core::Tensor;
use l2s_generate::flux::{
    flux_encode, flux_latent_shape, flux_resolve_size, flux_seeded_latents, flux_sigmas,
    flux_word_tokens, is_schnell,
};
use l2s_generate::{decoded_to_images, GenerateRequest};
use l2s_models::flux::{pack_latents, unpack_latents, FluxConditioning, FluxPipeline};
use l2s_models::NoObserver;

use crate::maps::{MapRecorder, WordPair};
use crate::relations::RelationTriplet;
use crate::sd::{Steered, MAP_SIZE};
use crate::steering::{steered_sample, SteerConfig, SteerLoss, SteerTarget, SteerTriplet};

pub struct FluxTarget<'a> {
    flux: &'a FluxPipeline,
    cond: FluxConditioning,
    guidance: Option<f64>,
    /// N sigmas and the terminal 0.
    sigmas: Vec<f64>,
    grid: (usize, usize),
}

impl<'a> FluxTarget<'a> {
    /// `guidance`: the guidance input (dev); ignored by schnell.
    pub fn new(
        flux: &'a FluxPipeline,
        prompt: &str,
        guidance: f64,
        steps: usize,
        grid: (usize, usize),
    ) -> Result<Self> {
        let (cond, _) = flux_encode(flux, prompt)?;
        let guidance = (!is_schnell(flux)).then_some(guidance);
        Ok(Self {
            flux,
            cond,
            guidance,
            sigmas: flux_sigmas(flux, steps, grid)?,
            grid,
        })
    }
}

impl SteerTarget for FluxTarget<'_> {
    fn timesteps(&self) -> Vec<usize> {
        self.sigmas[..self.sigmas.len() - 1]
            .iter()
            .map(|s| (s * 1000.0).round() as usize)
            .collect()
    }

    fn relation_maps(&mut self, z: &Tensor, step: usize, pair: &WordPair) -> Result<Tensor> {
        let mut recorder = MapRecorder::new(vec![pair.clone()], MAP_SIZE, false);
        self.flux.velocity(
            z,
            self.grid,
            &self.cond,
            self.sigmas[step],
            self.guidance,
            &mut recorder,
        )?;
        Ok(recorder.maps()?.squeeze(0)?.squeeze(0)?)
    }

    fn denoise(&mut self, z: &Tensor, index: usize) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[index], self.sigmas[index + 1]);
        let v = self.flux.velocity(
            z,
            self.grid,
            &self.cond,
            sigma,
            self.guidance,
            &mut NoObserver,
        )?;
        Ok(l2s_diffusion::flow_match::euler_step(z, &v, sigma, next)?)
    }
}

/// The paper's FLUX schedule for a run of `steps` steps: dev steers steps 0…steps/2 − 1
/// (0…24 of 50), schnell step 0 only; 16 iterations, α = 5.
pub fn paper_config(flux: &FluxPipeline, steps: usize) -> SteerConfig {
    let mut cfg = SteerConfig::paper(steps);
    if is_schnell(flux) {
        cfg.steer_steps = 1;
    }
    cfg
}

/// The RF-inversion noise seed of dataset sample `sample` (`l2s data build` numbers image i's
/// true-prompt sample 2i and its wrong-prompt sample 2i + 1): `seed` and the number mixed by
/// SplitMix64's finaliser, so every sample draws its own noise, the same in any shard or resumed
/// run, and nearby seeds share none.
pub fn inversion_seed(seed: u64, sample: u64) -> u64 {
    let mut z = seed ^ sample.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// T5 token positions of each triplet's words in `prompt`, with the loss's labels.
pub fn steer_triplets(
    flux: &FluxPipeline,
    prompt: &str,
    triplets: &[RelationTriplet],
    label: &dyn Fn(l2s_eval::Relation) -> Result<usize>,
) -> Result<Vec<SteerTriplet>> {
    SteerTriplet::for_prompt(
        triplets,
        &|word| Ok(flux_word_tokens(flux, prompt, word)?.positions),
        label,
    )
}

/// Generates `req` on FLUX while steering `triplets` with `loss`. The returned latents are
/// unpacked (1, 16, h/8, w/8).
pub fn generate_steered(
    flux: &FluxPipeline,
    req: &GenerateRequest,
    triplets: &[SteerTriplet],
    loss: &dyn SteerLoss,
    cfg: &SteerConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Steered> {
    let (w, h) = flux_resolve_size(flux, req.width, req.height)?;
    let initial = match &req.init_latents {
        Some(t) => {
            let want = flux_latent_shape(flux, w, h);
            anyhow::ensure!(
                t.dims() == want,
                "initial latents of shape {:?}; expected {want:?} for a {w}×{h} image",
                t.dims()
            );
            t.to_dtype(flux.dtype)?.to_device(&flux.device)?
        }
        None => flux_seeded_latents(flux, w, h, req.seed)?,
    };
    let grid = flux.grid_for(h, w);
    let mut target = FluxTarget::new(flux, &req.prompt, req.guidance, req.steps, grid)?;
    let (packed, report) = steered_sample(
        &mut target,
        loss,
        triplets,
        cfg,
        pack_latents(&initial)?,
        progress,
    )?;
    let latents = unpack_latents(&packed, grid)?;
    let image = decoded_to_images(&flux.vae.decode_latents(&latents)?)?
        .into_iter()
        .next()
        .context("no image decoded")?;
    Ok(Steered {
        image,
        latents,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::inversion_seed;

    #[test]
    fn every_sample_and_seed_draws_its_own_noise() {
        let seeds: std::collections::HashSet<u64> = (0..4)
            .flat_map(|s| (0..64).map(move |n| inversion_seed(s, n)))
            .collect();
        assert_eq!(seeds.len(), 4 * 64);
        assert_eq!(inversion_seed(7, 3), inversion_seed(7, 3));
    }
}
