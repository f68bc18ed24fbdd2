//! FLUX.1 (dev, schnell) through the same requests and results as Stable Diffusion: text → image
//! with the flow-matching Euler sampler, image → noise by RF-inversion and back, and word maps
//! from the transformer's text-only attention.
//!
//! FLUX has no classifier-free guidance: dev takes the guidance scale as a model input (3.5 by
//! default), schnell ignores it. Latents are (1, 16, h/8, w/8) outside this module, as for SD;
//! the transformer sees them packed into 2×2 patches.
//!
//! ```text
//! let flux = FluxPipeline::load(folder, &LoadOptions::default())?;
//! let mut req = GenerateRequest::new("a dog to the right of a teddy bear");
//! (req.steps, req.guidance) = flux_defaults(&flux);
//! let out = generate_flux(&flux, &req, None, &mut |_| {})?;
//! ```

use candle_core::{Device, Tensor};
use image::RgbImage;
use l2s_diffusion::{
    rf_invert, rf_reconstruct, FlowMatchConfig, FlowMatchEulerScheduler, RfInversionConfig,
};
use l2s_models::flux::{pack_latents, unpack_latents, FluxConditioning, FluxPipeline};
use l2s_models::vae::{seeded_normal, LatentDraw};
use l2s_models::{AttentionObserver, NoObserver};

use crate::attention::{AttentionCollector, AttentionMaps, AttentionRequest};
use crate::convert::{image_to_tensor, psnr, to_unit_nhwc, unit_nhwc_to_images};
use crate::error::{GenerateError, Result};
use crate::generate::{GenerateRequest, Generated};
use crate::invert::{Inversion, InvertRequest, Reconstruction};
use crate::prompt::{prompt_words, WordTokens};
use crate::sample::{Phase, Progress, StepObserver};

/// The model's (steps, guidance): dev 50 steps at guidance 3.5, schnell 4 steps without guidance
/// (the paper's settings and diffusers' recommendations).
pub fn flux_defaults(flux: &FluxPipeline) -> (usize, f64) {
    if is_schnell(flux) {
        (4, 0.0)
    } else {
        (50, 3.5)
    }
}

/// A timestep-distilled model without a guidance input (FLUX.1-schnell).
pub fn is_schnell(flux: &FluxPipeline) -> bool {
    !flux.transformer.config().guidance_embeds
}

/// The sampling steps (0-based) at which the method records maps: {5, 10, 15, 20, 25, 49} for
/// 50-step runs (as SD), {1, 3} for schnell's 4 steps.
pub fn flux_map_steps(flux: &FluxPipeline, steps: usize) -> Vec<usize> {
    if is_schnell(flux) && steps == 4 {
        vec![1, 3]
    } else {
        crate::attention::default_map_steps(steps)
    }
}

/// The paper's size (512² dev, 256² schnell), or the VAE's `sample_size` when that is smaller
/// (tiny test models).
pub fn flux_native_size(flux: &FluxPipeline) -> usize {
    let paper = if is_schnell(flux) { 256 } else { 512 };
    let cfg = flux.folder.join("vae").join("config.json");
    let vae_size = std::fs::read_to_string(cfg)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("sample_size").and_then(|s| s.as_u64()))
        .map(|s| s as usize);
    vae_size.map_or(paper, |s| s.min(paper))
}

/// Image sides must be multiples of this: the VAE's factor times the 2×2 packing.
pub fn flux_size_multiple(flux: &FluxPipeline) -> usize {
    2 * flux.vae_scale_factor()
}

/// Checks an image size against the model and returns (width, height).
pub fn flux_resolve_size(
    flux: &FluxPipeline,
    width: Option<usize>,
    height: Option<usize>,
) -> Result<(usize, usize)> {
    let native = flux_native_size(flux);
    let (w, h) = (width.unwrap_or(native), height.unwrap_or(native));
    let m = flux_size_multiple(flux);
    for (name, v) in [("width", w), ("height", h)] {
        if v == 0 || v % m != 0 {
            return Err(GenerateError::invalid(
                name,
                format!("{v} is not a positive multiple of {m} (the VAE's factor {} × FLUX's 2×2 packing); try {}", m / 2, (v / m).max(1) * m),
            ));
        }
    }
    Ok((w, h))
}

/// The unpacked latent shape (1, channels, height/f, width/f).
pub fn flux_latent_shape(flux: &FluxPipeline, width: usize, height: usize) -> [usize; 4] {
    let f = flux.vae_scale_factor();
    [1, flux.vae.config().latent_channels, height / f, width / f]
}

/// Seeded standard-normal latents, unpacked (the same on every machine for the same seed).
pub fn flux_seeded_latents(
    flux: &FluxPipeline,
    width: usize,
    height: usize,
    seed: u64,
) -> Result<Tensor> {
    let shape = flux_latent_shape(flux, width, height);
    Ok(seeded_normal(&shape, seed, &Device::Cpu)?
        .to_dtype(flux.dtype)?
        .to_device(&flux.device)?)
}

/// The model's flow-matching schedule for `steps` steps at this packed grid: N sigmas and the
/// terminal 0.
pub fn flux_sigmas(flux: &FluxPipeline, steps: usize, grid: (usize, usize)) -> Result<Vec<f64>> {
    if steps == 0 {
        return Err(GenerateError::invalid(
            "number of steps",
            "0; expected at least 1",
        ));
    }
    let mut s = FlowMatchEulerScheduler::new(FlowMatchConfig::from_file(&flux.scheduler_config)?);
    s.set_timesteps(steps, grid.0 * grid.1)?;
    Ok(s.sigmas().to_vec())
}

/// The prompt's conditioning and the user's notes (truncation).
pub fn flux_encode(flux: &FluxPipeline, prompt: &str) -> Result<(FluxConditioning, Vec<String>)> {
    let cond = flux.encode_prompt(prompt)?;
    let mut warnings = Vec::new();
    if cond.truncated[0] > 0 {
        let kept = flux.max_sequence_length() - 1;
        warnings.push(format!(
            "prompt {prompt:?} has {} T5 tokens but the model reads at most {kept}: the last {} were dropped",
            kept + cond.truncated[0],
            cond.truncated[0]
        ));
    }
    Ok((cond, warnings))
}

/// Where `word` sits among the prompt's kept T5 tokens (positions from 0: T5 has no start token).
/// A word the tokenizer splits, or a phrase, occupies all of its tokens.
pub fn flux_word_tokens(flux: &FluxPipeline, prompt: &str, word: &str) -> Result<WordTokens> {
    let not_found = || GenerateError::WordNotInPrompt {
        word: word.to_string(),
        prompt: prompt.to_string(),
        words: prompt_words(prompt).join(", "),
    };
    let needle = flux.tokenizer_2.encode_words(word)?;
    if needle.is_empty() {
        return Err(not_found());
    }
    let enc = flux.tokenizer_2.encode(prompt)?;
    let text = &enc.ids[..enc.text_tokens];
    let start = text
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .ok_or_else(not_found)?;
    Ok(WordTokens {
        word: word.to_string(),
        positions: (start..start + needle.len()).collect(),
    })
}

/// The guidance input of a request: dev reads it, schnell has none.
fn guidance_input(flux: &FluxPipeline, guidance: f64) -> Result<Option<f64>> {
    if !guidance.is_finite() {
        return Err(GenerateError::invalid(
            "guidance scale",
            format!("{guidance} is not a finite number"),
        ));
    }
    Ok((!is_schnell(flux)).then_some(guidance))
}

/// Euler sampling of packed latents over `sigmas`; watched steps report to `observer`.
#[allow(clippy::too_many_arguments)]
pub fn flux_sample_latents(
    flux: &FluxPipeline,
    sigmas: &[f64],
    packed: Tensor,
    grid: (usize, usize),
    cond: &FluxConditioning,
    guidance: Option<f64>,
    mut observer: Option<&mut dyn StepObserver>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let total = sigmas.len() - 1;
    let mut x = packed;
    for (index, pair) in sigmas.windows(2).enumerate() {
        let v = velocity_observed(
            flux,
            &x,
            grid,
            cond,
            pair[0],
            guidance,
            index,
            observer.as_deref_mut(),
        )?;
        x = l2s_diffusion::flow_match::euler_step(&x, &v, pair[0], pair[1])?;
        progress(Progress {
            phase: Phase::Denoise,
            done: index + 1,
            total,
        });
    }
    Ok(x)
}

/// One velocity evaluation, reported to `observer` when it watches step `index`.
#[allow(clippy::too_many_arguments)]
fn velocity_observed(
    flux: &FluxPipeline,
    x: &Tensor,
    grid: (usize, usize),
    cond: &FluxConditioning,
    sigma: f64,
    guidance: Option<f64>,
    index: usize,
    observer: Option<&mut (dyn StepObserver + '_)>,
) -> candle_core::Result<Tensor> {
    if let Some(o) = observer {
        if o.begin_step(index, (sigma * 1000.0).round() as usize) {
            return flux.velocity(
                x,
                grid,
                cond,
                sigma,
                guidance,
                o as &mut dyn AttentionObserver,
            );
        }
    }
    flux.velocity(x, grid, cond, sigma, guidance, &mut NoObserver)
}

/// Generates one image (the negative prompt is not used: FLUX has no classifier-free guidance).
pub fn generate_flux(
    flux: &FluxPipeline,
    req: &GenerateRequest,
    observer: Option<&mut dyn StepObserver>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generated> {
    let (width, height) = flux_resolve_size(flux, req.width, req.height)?;
    let initial = match &req.init_latents {
        Some(t) => {
            let want = flux_latent_shape(flux, width, height);
            if t.dims() != want {
                return Err(GenerateError::Shape {
                    what: "initial latents".into(),
                    found: format!("{:?}", t.dims()),
                    expected: format!("{want:?} for a {width}×{height} image"),
                });
            }
            t.to_dtype(flux.dtype)?.to_device(&flux.device)?
        }
        None => flux_seeded_latents(flux, width, height, req.seed)?,
    };
    let guidance = guidance_input(flux, req.guidance)?;
    let (cond, mut warnings) = flux_encode(flux, &req.prompt)?;
    if !req.negative_prompt.is_empty() {
        warnings
            .push("FLUX has no classifier-free guidance: the negative prompt is not used".into());
    }
    let grid = flux.grid_for(height, width);
    let sigmas = flux_sigmas(flux, req.steps, grid)?;
    let packed = flux_sample_latents(
        flux,
        &sigmas,
        pack_latents(&initial)?,
        grid,
        &cond,
        guidance,
        observer,
        progress,
    )?;
    let latents = unpack_latents(&packed, grid)?;
    let pixels = to_unit_nhwc(&flux.vae.decode_latents(&latents)?)?;
    let image = unit_nhwc_to_images(&pixels)?.remove(0);
    Ok(Generated {
        image,
        pixels,
        initial_latents: initial,
        latents,
        width,
        height,
        warnings,
    })
}

/// Generates an image while recording the requested words' attention maps.
pub fn generate_flux_with_attention(
    flux: &FluxPipeline,
    req: &GenerateRequest,
    att: &AttentionRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Generated, AttentionMaps)> {
    let words = att
        .words
        .iter()
        .map(|w| flux_word_tokens(flux, &req.prompt, w.trim()))
        .collect::<Result<Vec<_>>>()?;
    crate::attention::check_request(att, req.steps)?;
    let mut collector = AttentionCollector::new(words, &att.at_steps)?;
    let generated = generate_flux(flux, req, Some(&mut collector), progress)?;
    let maps = collector.finish(att.map_size)?;
    Ok((generated, maps))
}

/// Metadata for a FLUX image: [`crate::generation_metadata`] with the flow-matching sampler.
pub fn flux_metadata(
    req: &GenerateRequest,
    model: &str,
    width: usize,
    height: usize,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut m = crate::png::generation_metadata(req, model, width, height, extra);
    for (k, v) in m.iter_mut() {
        if k == "sampler" {
            *v = "flow-match-euler".into();
        }
    }
    m
}

/// Encodes `image` with the VAE and inverts it by RF-inversion under the request's prompt and
/// guidance (`fixed_point_iterations` is not used). The noise sample y₁ is seeded by `seed`.
pub fn invert_flux(
    flux: &FluxPipeline,
    image: &RgbImage,
    req: &InvertRequest,
    rf: &RfInversionConfig,
    seed: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<Inversion> {
    let (w, h) = flux_resolve_size(flux, req.width, req.height)?;
    if (image.width() as usize, image.height() as usize) != (w, h) {
        return Err(GenerateError::Shape {
            what: "image to invert".into(),
            found: format!("{}×{} pixels", image.width(), image.height()),
            expected: format!("{w}×{h}, the size asked for (or the model's)"),
        });
    }
    let x = image_to_tensor(image, flux.dtype, &flux.device)?;
    let z0 = flux.vae.encode_latents(&x, LatentDraw::Mean)?;
    let guidance = guidance_input(flux, req.guidance)?;
    let (cond, warnings) = flux_encode(flux, &req.prompt)?;
    let grid = flux.grid_for(h, w);
    let sigmas = flux_sigmas(flux, req.steps, grid)?;
    let y0 = pack_latents(&z0)?;
    let noise = pack_latents(&flux_seeded_latents(flux, w, h, seed)?)?;
    let total = req.steps;
    let x1 = rf_invert(&y0, &noise, &sigmas, rf, |step, x, sigma| {
        let v = flux
            .velocity(x, grid, &cond, sigma, guidance, &mut NoObserver)
            .map_err(l2s_diffusion::DiffusionError::from)?;
        progress(Progress {
            phase: Phase::Invert,
            done: step + 1,
            total,
        });
        Ok(v)
    })?;
    let latents = unpack_latents(&x1, grid)?;
    Ok(Inversion {
        z0: z0.clone(),
        trajectory: vec![z0, latents.clone()],
        latents,
        fixed_point_residuals: Vec::new(),
        request: req.clone(),
        image: Some(image.clone()),
        warnings,
    })
}

/// Samples back from an RF-inversion with its prompt, guidance and steps, the reverse controller
/// pulling towards the inverted image's latent; `observer` may watch chosen steps.
pub fn reconstruct_flux(
    flux: &FluxPipeline,
    inversion: &Inversion,
    rf: &RfInversionConfig,
    mut observer: Option<&mut dyn StepObserver>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Reconstruction> {
    let req = &inversion.request;
    let [_, _, lh, lw] = inversion.latents.dims4().map(|(a, b, c, d)| [a, b, c, d])?;
    let f = flux.vae_scale_factor();
    let grid = flux.grid_for(lh * f, lw * f);
    let guidance = guidance_input(flux, req.guidance)?;
    let (cond, _) = flux_encode(flux, &req.prompt)?;
    let sigmas = flux_sigmas(flux, req.steps, grid)?;
    let total = req.steps;
    let packed = rf_reconstruct(
        &pack_latents(&inversion.latents)?,
        &pack_latents(&inversion.z0)?,
        &sigmas,
        rf,
        |index, x, sigma| {
            let v = velocity_observed(
                flux,
                x,
                grid,
                &cond,
                sigma,
                guidance,
                index,
                observer.as_deref_mut(),
            )
            .map_err(l2s_diffusion::DiffusionError::from)?;
            progress(Progress {
                phase: Phase::Denoise,
                done: index + 1,
                total,
            });
            Ok(v)
        },
    )?;
    let latents = unpack_latents(&packed, grid)?;
    let pixels = to_unit_nhwc(&flux.vae.decode_latents(&latents)?)?;
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
