//! Test-time optimisation of the noisy latent (DESIGN §2), written once for every model.
//!
//! A model takes part by implementing [`SteerTarget`]: "give me the relation maps of these word
//! pairs at (z, t), differentiably" and "take one ordinary denoising step". A loss takes part by
//! implementing [`SteerLoss`]. [`steered_sample`] is the loop: for each of the first denoising
//! steps, up to `max_iterations` gradient steps z ← z − α·∇z loss (triplets round-robin, stopping
//! early under the step's loss threshold), then the model's own denoising step.

use candle_core::{Tensor, Var};

/// One triplet to enforce: token positions of subject and object and the wanted relation.
#[derive(Clone, Debug)]
pub struct SteerTriplet {
    pub pair: crate::maps::WordPair,
    /// Class index of the wanted relation in the loss's label space.
    pub label: usize,
    /// Canonical relation name ("left of", …), for handcrafted losses and reports.
    pub relation: l2s_eval::Relation,
}

impl SteerTriplet {
    /// The triplets of a prompt for any model: `positions` maps a word of the prompt to its token
    /// positions in that model's tokenizer; `label` maps a relation to the loss's class index.
    pub fn for_prompt(
        triplets: &[crate::relations::RelationTriplet],
        positions: &dyn Fn(&str) -> anyhow::Result<Vec<usize>>,
        label: &dyn Fn(l2s_eval::Relation) -> anyhow::Result<usize>,
    ) -> anyhow::Result<Vec<Self>> {
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

/// What the steering loop needs from a model.
pub trait SteerTarget {
    /// Timesteps of the sampling run, in order (one per denoising step; flow models give σ·1000).
    fn timesteps(&self) -> Vec<usize>;
    /// The (2, C, S, S) maps of `pair` from a conditional-only model pass at `z` and denoising
    /// step `step` (0-based, an index into [`Self::timesteps`]); differentiable with respect to `z`.
    fn relation_maps(
        &mut self,
        z: &Tensor,
        step: usize,
        pair: &crate::maps::WordPair,
    ) -> anyhow::Result<Tensor>;
    /// One ordinary (guided) denoising step from `z` at step `index`.
    fn denoise(&mut self, z: &Tensor, index: usize) -> anyhow::Result<Tensor>;
}

/// A differentiable loss on one triplet's maps.
/// `Send + Sync` so evaluation can run one method on several images at once.
pub trait SteerLoss: Send + Sync {
    /// Short name for metadata ("l2s", "centroid", "attend-excite").
    fn name(&self) -> &str;
    /// `maps`: (2, C, S, S); `step`: the denoising step index (0-based) of the run.
    fn loss(&self, maps: &Tensor, triplet: &SteerTriplet, step: usize) -> anyhow::Result<Tensor>;
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

/// Steers and samples: returns the final latent and what steering did.
pub fn steered_sample(
    target: &mut dyn SteerTarget,
    loss: &dyn SteerLoss,
    triplets: &[SteerTriplet],
    cfg: &SteerConfig,
    latents: Tensor,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<(Tensor, SteerReport)> {
    let timesteps = target.timesteps();
    let mut report = SteerReport::default();
    let mut z = latents;
    for index in 0..timesteps.len() {
        if index < cfg.steer_steps && !triplets.is_empty() && cfg.max_iterations > 0 {
            let mut first = None;
            let mut last = f64::NAN;
            let mut rms_sum = 0.0;
            let mut rms_n = 0usize;
            for it in 0..loss.max_iterations(index, cfg.max_iterations) {
                let triplet = &triplets[it % triplets.len()];
                let var = Var::from_tensor(&z.detach())?;
                let maps = target.relation_maps(var.as_tensor(), index, &triplet.pair)?;
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
                    anyhow::bail!(
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
                    tracing::warn!(
                        "step {index}, iteration {it}: non-finite gradient, update skipped"
                    );
                    report.skipped_nonfinite += 1;
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
                report.iterations += 1;
            }
            report.first_losses.push(first.unwrap_or(f64::NAN));
            report.last_losses.push(last);
            report.grad_rms.push(if rms_n > 0 {
                rms_sum / rms_n as f64
            } else {
                0.0
            });
        }
        z = target.denoise(&z, index)?;
        progress(index + 1, timesteps.len());
    }
    Ok((z, report))
}
