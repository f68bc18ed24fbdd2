//! Test-time optimisation of the noisy latent, written once for every model: [`Steering`] is a
//! step hook of the one sampling loop. Before each of the first denoising steps it takes up to
//! `max_iterations` gradient steps z ← z − α·∇z loss (triplets round-robin, stopping early under
//! the step's loss threshold), each from an unguided pass of the model under the prompt alone
//! whose attention maps feed the loss; the loop then takes the model's own (guided) step.
//! A loss takes part by implementing [`SteerLoss`]; any [`Denoiser`] that reports its attention
//! can be steered.

use candle_core::{Tensor, Var};
use l2s_diffusion::{Denoiser, DiffusionError, Guidance, StepContext, StepHook};
use l2s_generate::{generate, GenerateRequest, Generated, Progress};
use l2s_models::Pipeline;

use crate::maps::MapRecorder;

/// Map side the classifier reads.
pub const MAP_SIZE: usize = 16;

/// One relation to enforce, resolved for a model and a loss: the token positions of subject and
/// object and the class index of the wanted relation.
#[derive(Clone, Debug)]
pub struct SteerGoal {
    pub pair: crate::maps::WordPair,
    /// Class index of the wanted relation in the loss's label space.
    pub label: usize,
    /// Canonical relation name ("left of", …), for handcrafted losses and reports.
    pub relation: l2s_eval::Relation,
}

impl SteerGoal {
    /// The triplets of a prompt for any model: `positions` maps a word of the prompt to its token
    /// positions in that model's tokenizer; `label` maps a relation to the loss's class index.
    pub fn for_prompt(
        triplets: &[l2s_eval::Triplet],
        positions: &dyn Fn(&str) -> crate::error::Result<Vec<usize>>,
        label: &dyn Fn(l2s_eval::Relation) -> crate::error::Result<usize>,
    ) -> crate::error::Result<Vec<Self>> {
        triplets
            .iter()
            .map(|t| {
                let pair = crate::maps::WordPair {
                    subject: positions(&t.subject)?,
                    object: positions(&t.object)?,
                };
                Ok(Self {
                    pair,
                    label: label(t.relation)?,
                    relation: t.relation,
                })
            })
            .collect()
    }
}

/// A differentiable loss on one triplet's maps.
/// `Send + Sync` so evaluation can run one method on several images at once.
pub trait SteerLoss: Send + Sync {
    /// Short name for metadata ("l2s", "centroid", "attend-excite").
    fn name(&self) -> &str;
    /// `maps`: (2, C, S, S); `step`: the denoising step index (0-based) of the run.
    fn loss(&self, maps: &Tensor, triplet: &SteerGoal, step: usize)
        -> crate::error::Result<Tensor>;
    /// Loss below which iteration stops at this step.
    fn threshold(&self, step: usize) -> f64;
    /// Step size at this step (the loss may schedule it).
    fn step_size(&self, step: usize, base: f64) -> f64 {
        let _ = step;
        base
    }
    /// Gradient iterations at this step.
    fn max_iterations(&self, step: usize, default: usize) -> usize {
        let _ = step;
        default
    }
    /// How the maps it reads are laid out.
    fn map_layout(&self) -> crate::maps::MapLayout {
        crate::maps::MapLayout::Ours
    }
}

/// How a gradient becomes an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateRule {
    /// z ← z − α·g (the paper).
    Raw,
    /// z ← z − α·g/rms(g): the same step length whatever the gradient's scale.
    Normalized,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SteerConfig {
    /// Steer during denoising steps `0..steer_steps`.
    pub steer_steps: usize,
    /// Gradient iterations per steered step (the paper: 15 + 1).
    pub max_iterations: usize,
    /// α.
    pub step_size: f64,
    pub update: UpdateRule,
    /// Stop a step's iterations once the loss is below this, instead of the loss's own
    /// thresholds (the paper's are ~1e-5: every iteration runs). Fewer updates once the loss is
    /// satisfied keep the latent closer to what the model can draw.
    #[serde(default)]
    pub stop_below: Option<f64>,
}

impl SteerConfig {
    /// The paper's schedule for a run of `steps` steps: the first half, 16 iterations, α = 5.
    pub fn paper(steps: usize) -> Self {
        Self {
            steer_steps: steps / 2,
            max_iterations: 16,
            step_size: 5.0,
            update: UpdateRule::Raw,
            stop_below: None,
        }
    }

    /// The paper's schedule as `pipeline` runs it (FLUX.1-schnell steers step 0 only; α 7.5
    /// for SD1.x).
    pub fn paper_for(pipeline: &Pipeline, steps: usize) -> Self {
        Self {
            steer_steps: pipeline.steer_steps(steps),
            step_size: pipeline.paper_step_size(),
            ..Self::paper(steps)
        }
    }
}

/// What happened during steering, for metadata and diagnosis.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SteerReport {
    pub iterations: usize,
    pub skipped_nonfinite: usize,
    /// Loss at the first and last iteration of each steered step.
    pub first_losses: Vec<f64>,
    pub last_losses: Vec<f64>,
    /// Mean gradient RMS per steered step.
    pub grad_rms: Vec<f64>,
}

impl SteerReport {
    pub fn final_loss(&self) -> Option<f64> {
        self.last_losses.last().copied()
    }
}

/// The steering hook: steers the triplets with the loss as the config says, and keeps a
/// report of what it did.
pub struct Steering<'a> {
    loss: &'a dyn SteerLoss,
    triplets: &'a [SteerGoal],
    config: &'a SteerConfig,
    pub report: SteerReport,
}

impl<'a> Steering<'a> {
    pub fn new(
        loss: &'a dyn SteerLoss,
        triplets: &'a [SteerGoal],
        config: &'a SteerConfig,
    ) -> Self {
        Self {
            loss,
            triplets,
            config,
            report: SteerReport::default(),
        }
    }

    /// The gradient iterations of one denoising step; returns the moved latent.
    fn steer_step<D: Denoiser + ?Sized>(
        &mut self,
        step: &StepContext,
        denoiser: &mut D,
        cond: &D::Cond,
        mut z: Tensor,
    ) -> crate::error::Result<Tensor> {
        let (cfg, loss, index) = (self.config, self.loss, step.index);
        let mut first = None;
        let mut last = f64::NAN;
        let mut rms_sum = 0.0;
        let mut rms_n = 0usize;
        for it in 0..loss.max_iterations(index, cfg.max_iterations) {
            let triplet = &self.triplets[it % self.triplets.len()];
            let var = Var::from_tensor(&z.detach())?;
            let mut recorder = MapRecorder::with_layout(
                vec![triplet.pair.clone()],
                MAP_SIZE,
                false,
                loss.map_layout(),
            );
            denoiser.predict_observed(var.as_tensor(), step.model_time, cond, &mut recorder)?;
            let maps = recorder.maps()?.squeeze(0)?.squeeze(0)?;
            let value = loss.loss(&maps, triplet, index)?;
            let v = value
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            first.get_or_insert(v);
            last = v;
            if v < cfg.stop_below.unwrap_or_else(|| loss.threshold(index)) {
                break;
            }
            let grads = value.backward()?;
            let Some(g) = grads.get(var.as_tensor()) else {
                crate::error::bail!(
                    "the steering loss does not depend on the latent (no gradient reached it)"
                );
            };
            let g = g.detach();
            let rms = g
                .sqr()?
                .mean_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?
                .sqrt();
            if !rms.is_finite() {
                tracing::warn!("step {index}, iteration {it}: non-finite gradient, update skipped");
                self.report.skipped_nonfinite += 1;
                continue;
            }
            rms_sum += rms;
            rms_n += 1;
            let alpha = loss.step_size(index, cfg.step_size);
            let update = match cfg.update {
                UpdateRule::Raw => (g * alpha)?,
                UpdateRule::Normalized => (g * (alpha / rms.max(1e-12)))?,
            };
            let update = update.to_dtype(z.dtype())?;
            z = (&z - update)?;
            self.report.iterations += 1;
        }
        self.report.first_losses.push(first.unwrap_or(f64::NAN));
        self.report.last_losses.push(last);
        self.report.grad_rms.push(if rms_n > 0 {
            rms_sum / rms_n as f64
        } else {
            0.0
        });
        Ok(z)
    }
}

impl<D: Denoiser + ?Sized> StepHook<D> for Steering<'_> {
    fn before_step(
        &mut self,
        step: &StepContext,
        denoiser: &mut D,
        guidance: &Guidance<D::Cond>,
        latents: Tensor,
    ) -> l2s_diffusion::Result<Tensor> {
        let cfg = self.config;
        if step.index >= cfg.steer_steps || self.triplets.is_empty() || cfg.max_iterations == 0 {
            return Ok(latents);
        }
        self.steer_step(step, denoiser, guidance.conditional(), latents)
            .map_err(DiffusionError::hook)
    }
}

/// A steered image.
pub struct Steered {
    pub generated: Generated,
    pub report: SteerReport,
}

/// Generates `req` with `pipeline` while steering `triplets` with `loss`.
pub fn generate_steered(
    pipeline: &Pipeline,
    req: &GenerateRequest,
    triplets: &[SteerGoal],
    loss: &dyn SteerLoss,
    config: &SteerConfig,
    progress: &mut dyn FnMut(Progress),
) -> crate::error::Result<Steered> {
    let mut steering = Steering::new(loss, triplets, config);
    let generated = generate(pipeline, req, &mut steering, progress)?;
    Ok(Steered {
        generated,
        report: steering.report,
    })
}
