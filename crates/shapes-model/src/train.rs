//! Training the shapes model from scratch: rendered scenes with geometry-hiding captions, the
//! standard noise-prediction objective, AdamW, an EMA of the weights, resumable checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Result, ShapesModelError};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use l2s_models::clip::{ClipTextConfig, ClipTextModel};
use l2s_models::space_to_depth::SpaceToDepth;
use l2s_models::tokenizer::ClipTokenizer;
use l2s_models::unet::{UNet2DConditionModel, UNetConfig};
use l2s_models::NoObserver;
use l2s_shapes::{caption, render_scene, RenderConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::architecture::{self, IMAGE_SIZE};
use crate::folder::{save_tensors, write_file, write_model_folder};
use crate::optim::{AdamW, Ema};
use crate::plot::loss_curve_png;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub ema_decay: f64,
    /// Fraction of captions replaced by "" so the model also learns the unconditional prediction.
    pub uncond_prob: f64,
    /// Min-SNR-γ loss weighting (Hang et al. 2023). `None` (the default) weighs every timestep's
    /// v-loss equally. Min-SNR all but removes the high-noise steps from the loss, and in this
    /// world those are the only steps where the caption carries information the noisy image does
    /// not (objects stay visible until late): trained with γ = 5 the model learned to ignore text.
    pub min_snr_gamma: Option<f64>,
    pub seed: u64,
    pub checkpoint_every: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 6000,
            batch: 32,
            lr: 1e-3,
            warmup: 200,
            weight_decay: 0.01,
            ema_decay: 0.995,
            uncond_prob: 0.1,
            min_snr_gamma: None,
            seed: 0,
            checkpoint_every: 250,
        }
    }
}

/// What a checkpoint records besides tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    options: TrainOptions,
    architecture: serde_json::Value,
    losses: Vec<f32>,
    seconds: f64,
}

pub struct TrainProgress {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub seconds: f64,
}

pub struct TrainSummary {
    pub steps: usize,
    pub final_loss: f32,
    pub seconds: f64,
    pub model_dir: PathBuf,
}

fn architecture_fingerprint(vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "text_encoder": architecture::text_encoder_config(vocab),
        "unet": architecture::unet_config(),
        "vae": architecture::vae_config(),
        "scheduler": architecture::scheduler_config(),
    })
}

/// Scenes → (B, 3, H, W) in [-1, 1].
fn images_tensor(images: &[&image::RgbImage], device: &Device) -> Result<Tensor> {
    let n = IMAGE_SIZE;
    let mut data = Vec::with_capacity(images.len() * 3 * n * n);
    for img in images {
        for c in 0..3 {
            for y in 0..n as u32 {
                for x in 0..n as u32 {
                    data.push(img.get_pixel(x, y)[c] as f32 / 127.5 - 1.0);
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, n, n), device)?)
}

/// One training batch: noisy latents, token ids, timesteps, the regression target (v) and the
/// per-sample loss weights.
pub struct Batch {
    /// (B, 12, 16, 16) noisy latents x_t.
    pub noisy: Tensor,
    /// (B, tokens) u32 token ids.
    pub ids: Tensor,
    pub timesteps: Vec<f64>,
    /// (B, 12, 16, 16) v = α·ε − σ·x₀.
    pub target: Tensor,
    /// (B, 1, 1, 1) loss weight of each sample.
    pub weights: Tensor,
}

pub struct Trainer {
    varmap: VarMap,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    tokenizer: ClipTokenizer,
    named_vars: Vec<(String, Var)>,
    alphas_cumprod: Vec<f64>,
    /// The model folder's exact space-to-depth map, used here to encode training images.
    latents: SpaceToDepth,
    device: Device,
    run_dir: PathBuf,
    vocab: usize,
}

impl Trainer {
    /// Sets up a run folder (`run_dir/model` is the exported model, `run_dir/checkpoints` the
    /// state), its parameters initialised from seed 0.
    pub fn new(run_dir: &Path, device: &Device) -> Result<Self> {
        Self::with_seed(run_dir, device, 0)
    }

    /// [`new`](Self::new) with the parameters initialised from `seed`: a run restarted before its
    /// first checkpoint starts from the same weights.
    pub fn with_seed(run_dir: &Path, device: &Device, seed: u64) -> Result<Self> {
        std::fs::create_dir_all(run_dir).map_err(ShapesModelError::io(run_dir))?;
        let model_dir = run_dir.join("model");
        write_model_folder(&model_dir, None)?;
        let tokenizer = ClipTokenizer::from_folder(&model_dir.join("tokenizer"))?;
        let vocab = crate::folder::vocab_size();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_backend(
            Box::new(l2s_models::seeded::SeededVarMap::new(&varmap, seed)),
            DType::F32,
            device.clone(),
        );
        let te_cfg: ClipTextConfig =
            serde_json::from_value(architecture::text_encoder_config(vocab))
                .map_err(ShapesModelError::json("built-in text encoder config"))?;
        let unet_cfg: UNetConfig = serde_json::from_value(architecture::unet_config())
            .map_err(ShapesModelError::json("built-in UNet config"))?;
        let text_encoder = ClipTextModel::new(&te_cfg, vb.pp("text_encoder"))?;
        let unet = UNet2DConditionModel::new(&unet_cfg, vb.pp("unet"))?;
        let mut named_vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the parameter map's lock was poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named_vars.sort_by(|a, b| a.0.cmp(&b.0));
        let sched: l2s_diffusion::DdimConfig = l2s_diffusion::DdimConfig::from_json_value(
            &architecture::scheduler_config(),
            "shapes scheduler",
        )?
        .config;
        let alphas_cumprod = l2s_diffusion::schedule::alphas_cumprod(&sched)?;
        Ok(Self {
            varmap,
            text_encoder,
            unet,
            tokenizer,
            named_vars,
            alphas_cumprod,
            latents: SpaceToDepth::new(
                serde_json::from_value(architecture::vae_config())
                    .map_err(ShapesModelError::json("built-in VAE config"))?,
            ),
            device: device.clone(),
            run_dir: run_dir.to_path_buf(),
            vocab,
        })
    }

    /// Starts from the weights of an exported shapes-model folder (a warm start, e.g. to continue
    /// training the built-in model with fresh optimizer state). Only for a run without checkpoints.
    pub fn init_from_model(&self, model_dir: &Path) -> Result<()> {
        if self.latest_checkpoint().is_some() {
            return Err(ShapesModelError::RunFolder {
                path: self.run_dir.clone(),
                reason: "already has checkpoints; it resumes from them (use a new run folder to start from a model)".into(),
            });
        }
        for (part, file) in [
            ("text_encoder", "model.safetensors"),
            ("unet", "diffusion_pytorch_model.safetensors"),
        ] {
            let path = model_dir.join(part).join(file);
            let tensors = candle_core::safetensors::load(&path, &self.device)
                .map_err(|e| ShapesModelError::weights(&path, e.to_string()))?;
            for (name, var) in &self.named_vars {
                let Some(local) = name.strip_prefix(&format!("{part}.")) else {
                    continue;
                };
                let t = tensors.get(local).ok_or_else(|| {
                    ShapesModelError::weights(&path, format!("no tensor `{local}`"))
                })?;
                // A model with more token positions: keep the first ones.
                let t = if local.ends_with("position_embedding.weight") && t.dim(0)? > var.dim(0)? {
                    t.narrow(0, 0, var.dim(0)?)?
                } else {
                    t.clone()
                };
                var.set(&t).map_err(|e| {
                    ShapesModelError::weights(&path, format!("tensor `{local}`: {e}"))
                })?;
            }
        }
        Ok(())
    }

    pub fn parameter_count(&self) -> usize {
        self.named_vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.run_dir.join("checkpoints")
    }

    /// The newest complete checkpoint, named by `checkpoints/latest`.
    fn latest_checkpoint(&self) -> Option<PathBuf> {
        let name = std::fs::read_to_string(self.checkpoints_dir().join("latest")).ok()?;
        let dir = self.checkpoints_dir().join(name.trim());
        dir.join("state.json").exists().then_some(dir)
    }

    fn save_checkpoint(&self, state: &CheckpointState, opt: &AdamW, ema: &Ema) -> Result<()> {
        let root = self.checkpoints_dir();
        let name = format!("step-{:08}", state.step);
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir).map_err(ShapesModelError::io(&dir))?;
        let mut tensors: HashMap<String, Tensor> = self
            .named_vars
            .iter()
            .map(|(n, v)| (format!("param.{n}"), v.as_tensor().clone()))
            .collect();
        tensors.extend(opt.state_tensors()?);
        tensors.extend(
            ema.tensors()?
                .into_iter()
                .map(|(n, t)| (format!("ema.{n}"), t)),
        );
        save_tensors(&dir.join("state.safetensors"), &tensors)?;
        write_file(
            &dir.join("state.json"),
            serde_json::to_string_pretty(state)
                .map_err(ShapesModelError::json("checkpoint state"))?
                .as_bytes(),
        )?;
        // Only now does the new checkpoint become the one to resume from.
        write_file(&root.join("latest"), name.as_bytes())?;
        for entry in std::fs::read_dir(&root)
            .map_err(ShapesModelError::io(&root))?
            .flatten()
        {
            let p = entry.path();
            if p.is_dir() && p.file_name().and_then(|n| n.to_str()) != Some(name.as_str()) {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(())
    }

    /// Exports the averaged weights as a diffusers-layout model folder in `run_dir/model`.
    pub fn export(&self, ema: &Ema) -> Result<PathBuf> {
        let model_dir = self.run_dir.join("model");
        write_model_folder(&model_dir, Some(&ema.tensors()?))?;
        Ok(model_dir)
    }

    /// The batch of training step `step`: rendered scenes, captions, timesteps and noise, all
    /// drawn from generators seeded by `opts.seed` and `step`.
    pub fn batch(&self, opts: &TrainOptions, step: usize) -> Result<Batch> {
        let cfg = RenderConfig::with_size(IMAGE_SIZE as u32);
        let mut rng = ChaCha8Rng::seed_from_u64(
            opts.seed
                .wrapping_mul(0x9E37_79B9)
                .wrapping_add(step as u64),
        );
        let mut scenes = Vec::with_capacity(opts.batch);
        let tokens = self.tokenizer.max_len();
        let mut ids = Vec::with_capacity(opts.batch * tokens);
        for i in 0..opts.batch {
            let scene = render_scene(&cfg, opts.seed, (step * opts.batch + i) as u64)?;
            let text = if rng.gen::<f64>() < opts.uncond_prob {
                String::new()
            } else {
                caption(&scene, &mut rng)
            };
            ids.extend(self.tokenizer.encode(&text)?.ids);
            scenes.push(scene);
        }
        let images: Vec<&image::RgbImage> = scenes.iter().map(|s| &s.image).collect();
        let x0 = self
            .latents
            .encode_latents(&images_tensor(&images, &self.device)?)?;
        let ids = Tensor::from_vec(ids, (opts.batch, tokens), &self.device)?;
        let ts: Vec<usize> = (0..opts.batch)
            .map(|_| rng.gen_range(0..self.alphas_cumprod.len()))
            .collect();
        // From the step's own generator (candle's CPU randn cannot be seeded): a resumed run
        // sees the same noise as an uninterrupted one.
        let normal = rand_distr::StandardNormal;
        let noise: Vec<f32> = (0..x0.elem_count())
            .map(|_| rng.sample::<f32, _>(normal))
            .collect();
        let noise = Tensor::from_vec(noise, x0.shape(), &self.device)?;
        let a: Vec<f32> = ts
            .iter()
            .map(|&t| self.alphas_cumprod[t].sqrt() as f32)
            .collect();
        let s: Vec<f32> = ts
            .iter()
            .map(|&t| (1.0 - self.alphas_cumprod[t]).sqrt() as f32)
            .collect();
        let a = Tensor::from_vec(a, (opts.batch, 1, 1, 1), &self.device)?;
        let s = Tensor::from_vec(s, (opts.batch, 1, 1, 1), &self.device)?;
        let xt = (x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?;
        // v = α·ε − σ·x₀, the scheduler's `v_prediction`.
        let target = (noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?;
        let weights: Vec<f32> = ts
            .iter()
            .map(|&t| {
                let snr = self.alphas_cumprod[t] / (1.0 - self.alphas_cumprod[t]);
                // For a v target, min-SNR-γ weighting is min(SNR, γ) / (SNR + 1).
                opts.min_snr_gamma.map_or(1.0, |g| snr.min(g) / (snr + 1.0)) as f32
            })
            .collect();
        let weights = Tensor::from_vec(weights, (opts.batch, 1, 1, 1), &self.device)?;
        Ok(Batch {
            noisy: xt,
            ids,
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            target,
            weights,
        })
    }

    /// The optimiser and the weight average a run starts with (before any checkpoint is loaded).
    pub fn optimizer(&self, opts: &TrainOptions) -> Result<(AdamW, Ema)> {
        Ok((
            AdamW::new(&self.named_vars, opts.lr, opts.weight_decay)?,
            Ema::new(&self.named_vars, opts.ema_decay)?,
        ))
    }

    /// One training step on `batch`: text encoder and UNet forward, the weighted v-loss, backward,
    /// AdamW (at `opt.lr`) and the EMA update. Returns the loss; a non-finite loss is an error and
    /// leaves the weights untouched. `step` only labels that error.
    pub fn step(&self, batch: &Batch, opt: &mut AdamW, ema: &mut Ema, step: usize) -> Result<f32> {
        let context = self.text_encoder.forward(&batch.ids)?.last_hidden_state;
        let pred = self.unet.forward_timesteps(
            &batch.noisy,
            &batch.timesteps,
            &context,
            &mut NoObserver,
        )?;
        let sq = (pred - &batch.target)?.sqr()?;
        // Only the weights broadcast: a broadcast of the full-shaped side would copy the whole
        // gradient element by element on the way back.
        let loss = (&sq * batch.weights.broadcast_as(sq.shape())?)?.mean_all()?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Err(ShapesModelError::Diverged {
                step,
                loss: loss_value,
            });
        }
        opt.backward_step(&loss)?;
        ema.update()?;
        Ok(loss_value)
    }

    /// Trains until `opts.steps` (resuming from the latest checkpoint if there is one) or until
    /// `deadline_secs` of training time in this call have passed. Returns after saving.
    pub fn run(
        &self,
        opts: &TrainOptions,
        deadline_secs: Option<f64>,
        mut on_progress: impl FnMut(&TrainProgress),
    ) -> Result<TrainSummary> {
        let (mut opt, mut ema) = self.optimizer(opts)?;
        let arch = architecture_fingerprint(self.vocab);
        let mut state = CheckpointState {
            step: 0,
            options: opts.clone(),
            architecture: arch.clone(),
            losses: vec![],
            seconds: 0.0,
        };
        if let Some(dir) = self.latest_checkpoint() {
            let state_path = dir.join("state.json");
            let text =
                std::fs::read_to_string(&state_path).map_err(ShapesModelError::io(&state_path))?;
            let saved: CheckpointState =
                serde_json::from_str(&text).map_err(ShapesModelError::json(format!(
                    "{}: not a training checkpoint",
                    state_path.display()
                )))?;
            if saved.architecture != arch {
                return Err(ShapesModelError::RunFolder {
                    path: state_path,
                    reason: "checkpoint of a different model architecture; use another run folder"
                        .into(),
                });
            }
            let weights = dir.join("state.safetensors");
            let tensors = candle_core::safetensors::load(&weights, &self.device).map_err(|e| {
                ShapesModelError::weights(&weights, format!("unreadable checkpoint: {e}"))
            })?;
            for (n, v) in &self.named_vars {
                let t = tensors.get(&format!("param.{n}")).ok_or_else(|| {
                    ShapesModelError::weights(&weights, format!("no parameter `{n}`"))
                })?;
                v.set(t).map_err(|e| {
                    ShapesModelError::weights(&weights, format!("parameter `{n}`: {e}"))
                })?;
            }
            opt.load_state(&tensors, saved.step)?;
            let ema_t: HashMap<String, Tensor> = tensors
                .iter()
                .filter_map(|(k, t)| k.strip_prefix("ema.").map(|n| (n.to_string(), t.clone())))
                .collect();
            ema.load(&ema_t)?;
            tracing::info!("resuming from {} at step {}", dir.display(), saved.step);
            state.step = saved.step;
            state.losses = saved.losses;
            state.seconds = saved.seconds;
        }
        let start = Instant::now();
        let base_seconds = state.seconds;
        while state.step < opts.steps {
            if let Some(limit) = deadline_secs {
                if start.elapsed().as_secs_f64() >= limit {
                    break;
                }
            }
            let step = state.step;
            opt.lr = opts.lr * ((step + 1) as f64 / opts.warmup.max(1) as f64).min(1.0);
            let batch = self.batch(opts, step)?;
            let loss_value = self.step(&batch, &mut opt, &mut ema, step)?;
            state.step += 1;
            state.losses.push(loss_value);
            state.seconds = base_seconds + start.elapsed().as_secs_f64();
            on_progress(&TrainProgress {
                step: state.step,
                steps: opts.steps,
                loss: loss_value,
                seconds: state.seconds,
            });
            if state.step.is_multiple_of(opts.checkpoint_every) || state.step == opts.steps {
                self.save_checkpoint(&state, &opt, &ema)?;
                self.export(&ema)?;
                write_file(
                    &self.run_dir.join("loss.png"),
                    &loss_curve_png(&state.losses)?,
                )?;
            }
        }
        self.save_checkpoint(&state, &opt, &ema)?;
        let model_dir = self.export(&ema)?;
        write_file(
            &self.run_dir.join("loss.png"),
            &loss_curve_png(&state.losses)?,
        )?;
        let tail = &state.losses[state.losses.len().saturating_sub(100)..];
        let final_loss = if tail.is_empty() {
            f32::NAN
        } else {
            tail.iter().sum::<f32>() / tail.len() as f32
        };
        Ok(TrainSummary {
            steps: state.step,
            final_loss,
            seconds: state.seconds,
            model_dir,
        })
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}
