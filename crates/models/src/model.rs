//! One value for every supported text-to-image pipeline. The family is decided here, from
//! `model_index.json`'s `_class_name` (as diffusers' `DiffusionPipeline.from_pretrained` does),
//! and nothing outside this crate branches on it: sampling, inversion, map capture and steering
//! go through [`Pipeline`]'s methods and its [`ModelDenoiser`].
//!
//! Latents outside this module are always (batch, channels, height/f, width/f); FLUX's 2×2
//! packing happens inside the denoiser (a pure reshape, so results are unchanged).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use l2s_diffusion::{
    ddim_invert, sample, DdimConfig, DdimInverseScheduler, DdimScheduler, Denoiser,
    FlowMatchConfig, FlowMatchEulerScheduler, Guidance, RfInversionConfig, RfInversionFlow,
    RfReconstructionFlow, Scheduler, StepHook,
};

use crate::config::read_config;
use crate::error::{ModelError, Result};
use crate::flux::{pack_latents, unpack_latents, FluxConditioning, FluxPipeline};
use crate::observer::AttentionObserver;
use crate::pipeline::{LoadOptions, SamplingDefaults, StableDiffusion};
use crate::tokenizer::{prompt_words, ClipTokenizer};
use crate::vae::{seeded_normal, LatentDraw};
use crate::weights::{component_files, Variant};

enum Family {
    StableDiffusion(Box<StableDiffusion>),
    Flux(Box<FluxPipeline>),
}

/// A loaded text-to-image pipeline of any supported family.
pub struct Pipeline {
    family: Family,
    /// See [`Pipeline::native_size`]; read once at load (FLUX's comes from a config file).
    native_size: usize,
}

/// A prompt (and negative prompt) encoded for one pipeline, with the guidance it asks for.
pub struct Conditioning {
    pub guidance: Guidance<ModelCond>,
    /// Notes for the user (truncated prompts, unused negative prompt).
    pub warnings: Vec<String>,
}

/// What [`ModelDenoiser`] is conditioned on; built by [`Pipeline::encode`].
#[derive(Clone, Debug)]
pub struct ModelCond(CondInner);

#[derive(Clone, Debug)]
enum CondInner {
    /// Text-encoder hidden states (batch, tokens, hidden).
    Text(Tensor),
    /// FLUX's T5 + pooled CLIP conditioning and its guidance input (dev only).
    Flux {
        cond: FluxConditioning,
        guidance: Option<f64>,
    },
}

/// How an image is inverted to noise.
#[derive(Clone, Debug, Default)]
pub struct InversionSettings {
    /// Fixed-point refinements per DDIM inversion step (0: plain DDIM inversion).
    pub fixed_point_iterations: usize,
    /// RF-inversion's controllers (flow-matching models).
    pub rf: RfInversionConfig,
    /// Seed of RF-inversion's noise target y₁ (0 by default).
    pub noise_seed: u64,
}

/// An image's latent inverted to noise.
#[derive(Clone, Debug)]
pub struct InvertedLatents {
    /// The clean latent the inversion started from.
    pub z0: Tensor,
    /// The noise it reached.
    pub latents: Tensor,
    /// Latents from the clean end to the noisiest (DDIM: every step; RF: both ends).
    pub trajectory: Vec<Tensor>,
    /// Residual of the last fixed-point iteration of each step (empty without iterations).
    pub fixed_point_residuals: Vec<f64>,
}

/// The largest image side accepted, in pixels (a decoded 8192 px side already needs several GB).
pub const MAX_IMAGE_SIDE: usize = 8192;
/// The most pixels an image may have (4096 × 4096): the VAE decoder's activations grow with the
/// pixel count, and beyond this they need tens of GB.
pub const MAX_IMAGE_PIXELS: usize = 4096 * 4096;

/// The pipeline class a parsed `model_index.json` names (`StableDiffusionPipeline` when it names
/// none), refused by name unless this code runs it.
pub fn pipeline_class<'a>(index: &'a serde_json::Value, index_path: &Path) -> Result<&'a str> {
    let class = index
        .get("_class_name")
        .and_then(|c| c.as_str())
        .unwrap_or("StableDiffusionPipeline");
    let known = crate::pipeline::SD_PIPELINE_CLASSES
        .iter()
        .chain(&crate::flux::pipeline::FLUX_PIPELINE_CLASSES);
    if !known.clone().any(|c| *c == class) {
        return Err(ModelError::Unsupported {
            path: index_path.to_path_buf(),
            field: "_class_name".into(),
            value: class.into(),
            supported: format!(
                "{} (SD1.x, SD2.x and FLUX.1; SDXL, SD3 and other pipelines are not supported)",
                known.copied().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    Ok(class)
}

impl Pipeline {
    /// Loads the pipeline a diffusers folder holds, by its `model_index.json`'s `_class_name`:
    /// `FluxPipeline…` → FLUX.1, `StableDiffusionPipeline…` → SD1.x/2.x. `transformer` replaces a
    /// FLUX folder's `transformer/` by one single-file checkpoint.
    pub fn load(folder: &Path, opts: &LoadOptions, transformer: Option<&Path>) -> Result<Self> {
        let index_path = folder.join("model_index.json");
        if !index_path.exists() {
            return Err(ModelError::MissingComponent {
                folder: folder.to_path_buf(),
                component: "model_index.json".into(),
                expected: "a diffusers pipeline folder".into(),
            });
        }
        let index: serde_json::Value = read_config(&index_path, "a diffusers model_index.json")?;
        let class = pipeline_class(&index, &index_path)?;
        let family = if class.starts_with("Flux") {
            if let Some(f) = transformer.filter(|f| !f.is_file()) {
                return Err(ModelError::io(
                    f,
                    "no such file (expected a FLUX transformer .safetensors file)",
                ));
            }
            Family::Flux(Box::new(FluxPipeline::load_with_transformer(
                folder,
                opts,
                transformer,
            )?))
        } else {
            if let Some(f) = transformer {
                return Err(ModelError::io(
                    f,
                    format!(
                        "a single-file transformer replaces the transformer of a FLUX folder, but {} holds a Stable Diffusion pipeline (`{class}`)",
                        folder.display()
                    ),
                ));
            }
            Family::StableDiffusion(Box::new(StableDiffusion::load(folder, opts)?))
        };
        let native_size = native_size_of(&family);
        Ok(Self {
            family,
            native_size,
        })
    }

    /// The model family in words, e.g. "Stable Diffusion", "FLUX.1-schnell".
    pub fn family_name(&self) -> &'static str {
        match &self.family {
            Family::StableDiffusion(_) => "Stable Diffusion",
            Family::Flux(f) if is_schnell(f) => "FLUX.1-schnell",
            Family::Flux(_) => "FLUX.1-dev",
        }
    }

    pub fn folder(&self) -> &Path {
        match &self.family {
            Family::StableDiffusion(sd) => &sd.folder,
            Family::Flux(f) => &f.folder,
        }
    }

    pub fn dtype(&self) -> DType {
        match &self.family {
            Family::StableDiffusion(sd) => sd.dtype,
            Family::Flux(f) => f.dtype,
        }
    }

    pub fn device(&self) -> &Device {
        match &self.family {
            Family::StableDiffusion(sd) => &sd.device,
            Family::Flux(f) => &f.device,
        }
    }

    /// Steps and guidance when the user names none: the folder's own (`_l2s_sampling`), else
    /// Stable Diffusion 50 DDIM steps at guidance 7.5, FLUX.1-dev 50 steps at guidance 3.5 (a
    /// model input), FLUX.1-schnell 4 steps without guidance.
    pub fn sampling_defaults(&self) -> SamplingDefaults {
        match &self.family {
            Family::StableDiffusion(sd) => sd.sampling,
            Family::Flux(f) if is_schnell(f) => SamplingDefaults {
                steps: 4,
                guidance: 0.0,
            },
            Family::Flux(_) => SamplingDefaults {
                steps: 50,
                guidance: 3.5,
            },
        }
    }

    /// Guidance of an inversion and its reconstruction when the user names none: 1 (off) for
    /// classifier-free guidance; 0 for FLUX's guidance input, as diffusers' RF-inversion
    /// pipeline inverts and as the paper's FLUX training data is reconstructed.
    pub fn inversion_guidance(&self) -> f64 {
        match &self.family {
            Family::StableDiffusion(_) => 1.0,
            Family::Flux(_) => 0.0,
        }
    }

    /// The name of the sampler, for metadata.
    pub fn sampler_name(&self) -> &'static str {
        match &self.family {
            Family::StableDiffusion(_) => "ddim",
            Family::Flux(_) => "flow-match-euler",
        }
    }

    /// Pixels per latent cell along each side.
    fn vae_factor(&self) -> usize {
        match &self.family {
            Family::StableDiffusion(sd) => sd.vae.downsample_factor(),
            Family::Flux(f) => f.vae_scale_factor(),
        }
    }

    /// Image sides must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        match &self.family {
            Family::StableDiffusion(sd) => sd.vae.downsample_factor() * sd.unet.size_multiple(),
            // The VAE's factor times the 2×2 packing.
            Family::Flux(f) => 2 * f.vae_scale_factor(),
        }
    }

    /// The side the model was trained at: the UNet's `sample_size` × the VAE factor (512 if
    /// absent); FLUX the paper's size (dev 512², schnell 256²) or the VAE's `sample_size` when
    /// smaller (tiny test models).
    pub fn native_size(&self) -> usize {
        self.native_size
    }

    /// Checks an image size against the model and returns (width, height), the native size
    /// where none is given.
    pub fn resolve_size(
        &self,
        width: Option<usize>,
        height: Option<usize>,
    ) -> Result<(usize, usize)> {
        let native = self.native_size();
        let (w, h) = (width.unwrap_or(native), height.unwrap_or(native));
        for (name, v) in [("width", w), ("height", h)] {
            if v > MAX_IMAGE_SIDE {
                return Err(ModelError::InvalidArgument {
                    what: name.into(),
                    reason: format!("{v} px is more than the largest side, {MAX_IMAGE_SIDE} px"),
                });
            }
        }
        if w * h > MAX_IMAGE_PIXELS {
            return Err(ModelError::InvalidArgument {
                what: "width × height".into(),
                reason: format!(
                    "{w} × {h} = {} px is more than the pixel budget of {MAX_IMAGE_PIXELS} px \
                     (4096 × 4096)",
                    w * h
                ),
            });
        }
        let m = self.size_multiple();
        for (name, v) in [("width", w), ("height", h)] {
            if v == 0 || v % m != 0 {
                let why = match &self.family {
                    Family::StableDiffusion(sd) => format!(
                        "the VAE's factor {} × the UNet's {}",
                        self.vae_factor(),
                        sd.unet.size_multiple()
                    ),
                    Family::Flux(_) => {
                        format!(
                            "the VAE's factor {} × FLUX's 2×2 packing",
                            self.vae_factor()
                        )
                    }
                };
                return Err(ModelError::InvalidArgument {
                    what: name.into(),
                    reason: format!(
                        "{v} is not a positive multiple of {m} ({why}); try {}",
                        (v / m).max(1) * m
                    ),
                });
            }
        }
        Ok((w, h))
    }

    /// The latent shape (1, channels, height/f, width/f) of one image.
    pub fn latent_shape(&self, width: usize, height: usize) -> [usize; 4] {
        let f = self.vae_factor();
        let channels = match &self.family {
            Family::StableDiffusion(sd) => sd.unet.config().in_channels,
            Family::Flux(fl) => fl.vae.config().latent_channels,
        };
        [1, channels, height / f, width / f]
    }

    /// Seeded standard-normal latents, the same on every machine for the same seed.
    pub fn seeded_latents(&self, width: usize, height: usize, seed: u64) -> Result<Tensor> {
        let shape = self.latent_shape(width, height);
        Ok(seeded_normal(&shape, seed, &Device::Cpu)?
            .to_dtype(self.dtype())?
            .to_device(self.device())?)
    }

    /// `latents` on the model's device and dtype, checked against a `width`×`height` image.
    pub fn check_latents(
        &self,
        latents: &Tensor,
        width: usize,
        height: usize,
        what: &str,
    ) -> Result<Tensor> {
        let want = self.latent_shape(width, height);
        if latents.dims() != want {
            return Err(ModelError::InvalidArgument {
                what: what.into(),
                reason: format!(
                    "shape {:?}; expected {want:?} for a {width}×{height} image",
                    latents.dims()
                ),
            });
        }
        let values = latents
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            let nan = values.iter().filter(|v| v.is_nan()).count();
            return Err(ModelError::InvalidArgument {
                what: what.into(),
                reason: format!(
                    "{bad} of {} values are not finite ({nan} NaN, {} ±Inf); sampling from them \
                     gives a blank or garbage image",
                    values.len(),
                    bad - nan
                ),
            });
        }
        Ok(latents.to_dtype(self.dtype())?.to_device(self.device())?)
    }

    /// Encodes a prompt with its guidance. Stable Diffusion uses classifier-free guidance with
    /// `negative` only when `scale > 1` (as diffusers); FLUX.1-dev takes `scale` as a model input,
    /// schnell ignores it, and neither reads a negative prompt.
    pub fn encode(&self, prompt: &str, negative: &str, scale: f64) -> Result<Conditioning> {
        if !scale.is_finite() {
            return Err(ModelError::InvalidArgument {
                what: "guidance scale".into(),
                reason: format!("{scale} is not a finite number"),
            });
        }
        match &self.family {
            Family::StableDiffusion(sd) => {
                let (cond, mut warnings) = encode_clip(sd, prompt)?;
                let guidance = if scale > 1.0 {
                    let (uncond, w) = encode_clip(sd, negative)?;
                    warnings.extend(w.into_iter().map(|s| format!("negative {s}")));
                    Guidance::Batched {
                        batched: ModelCond(CondInner::Text(Tensor::cat(&[&uncond, &cond], 0)?)),
                        cond: ModelCond(CondInner::Text(cond)),
                        scale,
                    }
                } else {
                    Guidance::Unguided(ModelCond(CondInner::Text(cond)))
                };
                Ok(Conditioning { guidance, warnings })
            }
            Family::Flux(f) => {
                let cond = f.encode_prompt(prompt)?;
                let mut warnings = Vec::new();
                if cond.truncated[0] > 0 {
                    let kept = f.max_sequence_length() - 1;
                    warnings.push(format!(
                        "prompt {prompt:?} has {} T5 tokens but the model reads at most {kept}: the last {} were dropped",
                        kept + cond.truncated[0],
                        cond.truncated[0]
                    ));
                }
                if !negative.is_empty() {
                    warnings.push(
                        "FLUX has no classifier-free guidance: the negative prompt is not used"
                            .into(),
                    );
                }
                let guidance = (!is_schnell(f)).then_some(scale);
                Ok(Conditioning {
                    guidance: Guidance::Unguided(ModelCond(CondInner::Flux { cond, guidance })),
                    warnings,
                })
            }
        }
    }

    /// Where `word` (or a phrase) sits among the prompt's tokens as the text encoder whose
    /// states the attention reads sees them (CLIP: after the start token; FLUX: T5, from 0). A
    /// word the tokenizer splits occupies all of its tokens.
    pub fn word_positions(&self, prompt: &str, word: &str) -> Result<Vec<usize>> {
        let not_found = || ModelError::WordNotInPrompt {
            word: word.to_string(),
            prompt: prompt.to_string(),
            words: prompt_words(prompt).join(", "),
        };
        let (needle, text, offset) = match &self.family {
            Family::StableDiffusion(sd) => {
                let enc = sd.tokenizer.encode(prompt)?;
                let text = enc.ids[1..1 + enc.text_tokens].to_vec();
                (sd.tokenizer.encode_words(word)?, text, 1)
            }
            Family::Flux(f) => {
                let enc = f.tokenizer_2.encode(prompt)?;
                let text = enc.ids[..enc.text_tokens].to_vec();
                (f.tokenizer_2.encode_words(word)?, text, 0)
            }
        };
        if needle.is_empty() {
            return Err(not_found());
        }
        let start = text
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
            .ok_or_else(not_found)?;
        Ok((offset + start..offset + start + needle.len()).collect())
    }

    /// The sampler of a `steps`-step run at this image size: DDIM from the folder's scheduler
    /// config, or flow-matching Euler with the resolution-dependent shift.
    pub fn scheduler(
        &self,
        steps: usize,
        width: usize,
        height: usize,
    ) -> Result<Box<dyn Scheduler>> {
        check_steps(steps)?;
        Ok(match &self.family {
            Family::StableDiffusion(sd) => {
                let mut s = DdimScheduler::new(ddim_config(sd)?)?;
                s.set_timesteps(steps)?;
                Box::new(s)
            }
            Family::Flux(f) => Box::new(flow_scheduler(f, steps, width, height)?),
        })
    }

    /// The model as the samplers see it.
    pub fn denoiser(&self) -> ModelDenoiser<'_> {
        ModelDenoiser { pipeline: self }
    }

    /// Latents → decoded image batch in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(match &self.family {
            Family::StableDiffusion(sd) => sd.vae.decode_latents(latents)?,
            Family::Flux(f) => f.vae.decode_latents(latents)?,
        })
    }

    /// Image batch in [-1, 1] → latents (the posterior mean).
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        Ok(match &self.family {
            Family::StableDiffusion(sd) => sd.vae.encode_latents(image, LatentDraw::Mean)?,
            Family::Flux(f) => f.vae.encode_latents(image, LatentDraw::Mean)?,
        })
    }

    /// Inverts a clean latent to noise under `cond` over `steps` steps: fixed-point DDIM
    /// inversion for Stable Diffusion, RF-inversion (controlled by `settings.rf`, towards noise
    /// seeded by `settings.noise_seed`) for flow-matching models. `hook` sees every step.
    pub fn invert<'a>(
        &'a self,
        z0: &Tensor,
        cond: &Conditioning,
        steps: usize,
        settings: &InversionSettings,
        hook: &mut dyn StepHook<ModelDenoiser<'a>>,
    ) -> Result<InvertedLatents> {
        check_steps(steps)?;
        let z0 = z0.to_dtype(self.dtype())?.to_device(self.device())?;
        let mut denoiser = self.denoiser();
        match &self.family {
            Family::StableDiffusion(sd) => {
                let mut s = DdimInverseScheduler::new(ddim_config(sd)?)?;
                s.set_timesteps(steps)?;
                let total = s.timesteps().len();
                let inv = ddim_invert(
                    &mut denoiser,
                    &s,
                    z0.clone(),
                    &cond.guidance,
                    settings.fixed_point_iterations,
                    |info| {
                        let step = l2s_diffusion::StepContext {
                            index: info.index,
                            num_steps: total,
                            timestep: info.timestep,
                            model_time: info.timestep as f64,
                        };
                        hook.after_step(&step, info.latents, info.latents)
                            .map(|_| ())
                    },
                )?;
                Ok(InvertedLatents {
                    z0,
                    latents: inv.latents().clone(),
                    fixed_point_residuals: inv.fixed_point_residuals().to_vec(),
                    trajectory: inv.into_trajectory(),
                })
            }
            Family::Flux(f) => {
                let (_, _, lh, lw) = z0.dims4()?;
                let (w, h) = (lw * self.vae_factor(), lh * self.vae_factor());
                let sigmas = flow_scheduler(f, steps, w, h)?.sigmas().to_vec();
                let noise = self.seeded_latents(w, h, settings.noise_seed)?;
                let flow = RfInversionFlow::new(&sigmas, &noise, &settings.rf)?;
                let latents = sample(&mut denoiser, &flow, z0.clone(), &cond.guidance, hook)?;
                Ok(InvertedLatents {
                    trajectory: vec![z0.clone(), latents.clone()],
                    z0,
                    latents,
                    fixed_point_residuals: Vec::new(),
                })
            }
        }
    }

    /// The sampler that brings an inversion back: the ordinary DDIM sampler, or RF-inversion's
    /// reverse flow pulled towards the inverted image's latent.
    pub fn reconstruction_scheduler(
        &self,
        inverted: &InvertedLatents,
        steps: usize,
        settings: &InversionSettings,
    ) -> Result<Box<dyn Scheduler>> {
        let (_, _, lh, lw) = inverted.latents.dims4()?;
        let (w, h) = (lw * self.vae_factor(), lh * self.vae_factor());
        match &self.family {
            Family::StableDiffusion(_) => self.scheduler(steps, w, h),
            Family::Flux(f) => {
                check_steps(steps)?;
                let sigmas = flow_scheduler(f, steps, w, h)?.sigmas().to_vec();
                Ok(Box::new(RfReconstructionFlow::new(
                    &sigmas,
                    &inverted.z0,
                    &settings.rf,
                )?))
            }
        }
    }

    /// How this model inverts, for metadata.
    pub fn inversion_name(&self, settings: &InversionSettings) -> String {
        match &self.family {
            Family::StableDiffusion(_) => "ddim-inversion".into(),
            Family::Flux(_) => {
                let rf = &settings.rf;
                format!(
                    "rf-inversion gamma={} eta={} stop={} seed={}",
                    rf.gamma, rf.eta, rf.stop, settings.noise_seed
                )
            }
        }
    }

    /// The 0-based sampling steps at which Learn-to-Steer records maps: {5, 10, 15, 20, 25, 49}
    /// of 50 (Stable Diffusion: scaled to other step counts), FLUX.1-schnell's {1, 3} of 4.
    pub fn map_steps(&self, steps: usize) -> Vec<usize> {
        match &self.family {
            Family::StableDiffusion(_) => scaled_map_steps(steps),
            Family::Flux(f) if is_schnell(f) && steps == 4 => vec![1, 3],
            Family::Flux(_) => default_map_steps(steps),
        }
    }

    /// The steps `l2s attention` shows by default: the paper's steps that exist in the run
    /// ({5, 10, 15, 20, 25, 49} of 50), FLUX.1-schnell's {1, 3} of 4.
    pub fn attention_steps(&self, steps: usize) -> Vec<usize> {
        match &self.family {
            Family::Flux(f) if is_schnell(f) && steps == 4 => vec![1, 3],
            _ => default_map_steps(steps),
        }
    }

    /// Whether photos for training data are centre-cropped to a square before resizing (the
    /// paper's Stable Diffusion data) rather than resized whole (its FLUX data).
    pub fn crops_training_images(&self) -> bool {
        matches!(self.family, Family::StableDiffusion(_))
    }

    /// The reconstruction PSNR (dB) below which a data sample is dropped: the paper's 19.5 for
    /// Stable Diffusion, 20 for FLUX.
    pub fn min_reconstruction_psnr(&self) -> f64 {
        match &self.family {
            Family::StableDiffusion(_) => 19.5,
            Family::Flux(_) => 20.0,
        }
    }

    /// The single-file transformer checkpoint, when it replaced the folder's.
    pub fn transformer_file(&self) -> Option<&Path> {
        match &self.family {
            Family::Flux(f) => f.transformer_file.as_deref(),
            Family::StableDiffusion(_) => None,
        }
    }

    /// How many of a run's first steps the paper steers: the first half; FLUX.1-schnell step 0.
    pub fn steer_steps(&self, steps: usize) -> usize {
        match &self.family {
            Family::Flux(f) if is_schnell(f) => 1,
            _ => steps / 2,
        }
    }

    /// The paper's steering step size α: 7.5 for SD1.x (CLIP-L text states of width 768), 5 for
    /// SD2.x and FLUX.
    pub fn paper_step_size(&self) -> f64 {
        match &self.family {
            Family::StableDiffusion(sd) if sd.text_encoder.config().hidden_size == 768 => 7.5,
            _ => 5.0,
        }
    }

    /// Turns per-block gradient checkpointing on or off; returns false where the model has none
    /// (only FLUX's transformer does).
    pub fn set_gradient_checkpointing(&mut self, on: bool) -> bool {
        match &mut self.family {
            Family::Flux(f) => {
                f.transformer.set_gradient_checkpointing(on);
                true
            }
            Family::StableDiffusion(_) => false,
        }
    }

    /// A fingerprint of the network whose attention is read (config and a sample of its weight
    /// bytes): `unet-…` or `flux-…`. A classifier applies only to the model it was trained on.
    pub fn fingerprint(&self) -> Result<String> {
        match &self.family {
            Family::StableDiffusion(sd) => fingerprint_dir(&sd.folder.join("unet"), "unet"),
            Family::Flux(f) => match &f.transformer_file {
                // The file holds no config; the one it was built with (folder's or preset) counts.
                Some(file) => fingerprint_files(
                    format!("{:?}", f.transformer.config()).as_bytes(),
                    std::slice::from_ref(file),
                    "flux",
                ),
                None => fingerprint_dir(&f.folder.join("transformer"), "flux"),
            },
        }
    }

    /// Side of the model's largest attention maps at its native size: the latent side for a
    /// UNet (64 at 512²), the packed grid for FLUX (32 for dev at 512², 16 for schnell at 256²).
    pub fn attention_grid(&self) -> usize {
        let side = self.native_size() / self.vae_factor();
        match &self.family {
            Family::StableDiffusion(_) => side,
            Family::Flux(_) => side / 2,
        }
    }

    /// How many attention maps the model gives per word (Σ heads over its attention layers), by
    /// one unguided pass at the smallest image size it takes.
    pub fn maps_per_word(&self) -> Result<usize> {
        struct Heads(usize);
        impl AttentionObserver for Heads {
            fn observe(
                &mut self,
                site: &crate::observer::AttentionSite,
                _: &Tensor,
            ) -> candle_core::Result<()> {
                self.0 += site.heads;
                Ok(())
            }
        }
        let m = self.size_multiple();
        let z = Tensor::zeros(
            self.latent_shape(m, m).to_vec(),
            self.dtype(),
            self.device(),
        )?;
        let cond = self.encode("", "", 1.0)?;
        let mut heads = Heads(0);
        self.denoiser().predict_observed(
            &z,
            self.first_model_time()?,
            cond.guidance.conditional(),
            &mut heads,
        )?;
        Ok(heads.0)
    }

    /// The model input of a run's first step (any valid time would do for counting layers).
    fn first_model_time(&self) -> Result<f64> {
        let m = self.size_multiple();
        Ok(self.scheduler(1, m, m)?.model_time(0))
    }

    /// The prefix of [`Self::fingerprint`] ("unet" or "flux"): which kind of attention maps the
    /// model gives.
    pub fn map_family(&self) -> &'static str {
        match &self.family {
            Family::StableDiffusion(_) => "unet",
            Family::Flux(_) => "flux",
        }
    }

    /// The attention the model reports, for error messages.
    pub fn describe_maps(&self, id: &str) -> String {
        match &self.family {
            Family::StableDiffusion(_) => {
                format!("a Stable Diffusion UNet ({id}, maps from its cross-attention layers)")
            }
            Family::Flux(f) => {
                let c = f.transformer.config();
                format!(
                    "a FLUX transformer ({id}, ({} double + {} single blocks) × {} heads = {} maps per word)",
                    c.num_layers,
                    c.num_single_layers,
                    c.num_attention_heads,
                    (c.num_layers + c.num_single_layers) * c.num_attention_heads
                )
            }
        }
    }
}

/// The model side of the samplers: the UNet's noise/v prediction or FLUX's velocity.
pub struct ModelDenoiser<'a> {
    pipeline: &'a Pipeline,
}

impl ModelDenoiser<'_> {
    fn run(
        &self,
        latents: &Tensor,
        t: f64,
        cond: &ModelCond,
        observer: &mut dyn AttentionObserver,
    ) -> candle_core::Result<Tensor> {
        match (&self.pipeline.family, &cond.0) {
            (Family::StableDiffusion(sd), CondInner::Text(text)) => {
                sd.unet.forward_observed(latents, t, text, observer)
            }
            (Family::Flux(f), CondInner::Flux { cond, guidance }) => {
                let (_, _, lh, lw) = latents.dims4()?;
                let factor = f.vae_scale_factor();
                let grid = f.grid_for(lh * factor, lw * factor);
                let v = f.velocity(&pack_latents(latents)?, grid, cond, t, *guidance, observer)?;
                unpack_latents(&v, grid)
            }
            _ => candle_core::bail!("conditioning encoded for another model family"),
        }
    }
}

impl Denoiser for ModelDenoiser<'_> {
    type Cond = ModelCond;

    fn predict(
        &mut self,
        latents: &Tensor,
        t: f64,
        cond: &ModelCond,
    ) -> l2s_diffusion::Result<Tensor> {
        match (&self.pipeline.family, &cond.0) {
            // The plain forward skips the observer plumbing altogether.
            (Family::StableDiffusion(sd), CondInner::Text(text)) => {
                Ok(sd.unet.forward(latents, t, text)?)
            }
            _ => Ok(self.run(latents, t, cond, &mut crate::observer::NoObserver)?),
        }
    }

    fn predict_observed(
        &mut self,
        latents: &Tensor,
        t: f64,
        cond: &ModelCond,
        observer: &mut dyn AttentionObserver,
    ) -> l2s_diffusion::Result<Tensor> {
        Ok(self.run(latents, t, cond, observer)?)
    }
}

/// The denoising steps (0-based) of a 50-step run at which the paper records maps.
pub const METHOD_STEPS: [usize; 6] = [5, 10, 15, 20, 25, 49];

/// The steps of [`METHOD_STEPS`] a `steps`-step run has, or its last step if it has none.
pub fn default_map_steps(steps: usize) -> Vec<usize> {
    let v: Vec<usize> = METHOD_STEPS
        .iter()
        .copied()
        .filter(|&s| s < steps)
        .collect();
    if v.is_empty() {
        vec![steps.saturating_sub(1)]
    } else {
        v
    }
}

/// [`METHOD_STEPS`] scaled to a `steps`-step run (rounded, within range, without repeats).
pub fn scaled_map_steps(steps: usize) -> Vec<usize> {
    let mut v: Vec<usize> = METHOD_STEPS
        .iter()
        .map(|&s| ((s as f64) * steps as f64 / 50.0).round() as usize)
        .map(|s| s.min(steps.saturating_sub(1)))
        .collect();
    v.dedup();
    v
}

fn native_size_of(family: &Family) -> usize {
    match family {
        Family::StableDiffusion(sd) => sd
            .unet
            .config()
            .sample_size
            .map(|s| s * sd.vae.downsample_factor())
            .unwrap_or(512),
        Family::Flux(f) => {
            let paper = if is_schnell(f) { 256 } else { 512 };
            let vae_size = std::fs::read_to_string(f.folder.join("vae/config.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v.get("sample_size").and_then(|s| s.as_u64()))
                .map(|s| s as usize);
            vae_size.map_or(paper, |s| s.min(paper))
        }
    }
}

fn is_schnell(f: &FluxPipeline) -> bool {
    !f.transformer.config().guidance_embeds
}

fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 {
        return Err(ModelError::InvalidArgument {
            what: "number of steps".into(),
            reason: "0; expected at least 1".into(),
        });
    }
    Ok(())
}

fn encode_clip(sd: &StableDiffusion, text: &str) -> Result<(Tensor, Vec<String>)> {
    let tokenizer: &ClipTokenizer = &sd.tokenizer;
    let enc = tokenizer.encode(text)?;
    let mut warnings = Vec::new();
    if enc.truncated > 0 {
        let kept = tokenizer.max_len() - 2;
        warnings.push(format!(
            "prompt {text:?} has {} tokens but the model reads at most {kept}: the last {} were dropped",
            enc.text_tokens + enc.truncated,
            enc.truncated
        ));
    }
    let ids = Tensor::new(enc.ids.as_slice(), &sd.device)?.unsqueeze(0)?;
    Ok((sd.text_encoder.forward(&ids)?.last_hidden_state, warnings))
}

/// The folder's DDIM config (any scheduler config with a beta schedule loads as DDIM).
fn ddim_config(sd: &StableDiffusion) -> Result<DdimConfig> {
    let loaded = DdimConfig::from_file(&sd.scheduler_config)?;
    for note in &loaded.notes {
        tracing::debug!("{}: {note}", sd.scheduler_config.display());
    }
    Ok(loaded.config)
}

fn flow_scheduler(
    f: &FluxPipeline,
    steps: usize,
    width: usize,
    height: usize,
) -> Result<FlowMatchEulerScheduler> {
    let grid = f.grid_for(height, width);
    let mut s = FlowMatchEulerScheduler::new(FlowMatchConfig::from_file(&f.scheduler_config)?);
    s.set_timesteps(steps, grid.0 * grid.1)?;
    Ok(s)
}

fn fingerprint_dir(dir: &Path, prefix: &str) -> Result<String> {
    let cfg = dir.join("config.json");
    let config = std::fs::read(&cfg).map_err(|e| ModelError::io(&cfg, e.to_string()))?;
    fingerprint_files(&config, &component_files(dir, &Variant::Auto)?, prefix)
}

fn fingerprint_files(config: &[u8], files: &[PathBuf], prefix: &str) -> Result<String> {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(config);
    // Only the first and last MiB of each weight file (plus its length): checkpoints are
    // gigabytes, and a fingerprint must not read them whole.
    const SPAN: u64 = 1 << 20;
    for file in files {
        let err = |e: std::io::Error| ModelError::io(file, e.to_string());
        let mut f = std::fs::File::open(file).map_err(err)?;
        let n = f.metadata().map_err(err)?.len();
        let mut head = Vec::new();
        (&mut f).take(SPAN).read_to_end(&mut head).map_err(err)?;
        eat(&head);
        f.seek(SeekFrom::Start(n.saturating_sub(SPAN)))
            .map_err(err)?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).map_err(err)?;
        eat(&tail);
        eat(&n.to_le_bytes());
    }
    Ok(format!("{prefix}-{h:016x}"))
}
