//! Losses the steering loop can descend: the learned relation classifier (Learn-to-Steer) and two
//! handcrafted baselines (soft-centroid hinge; Attend-and-Excite), all on the same (2, C, S, S) maps.

use crate::error::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use l2s_eval::Relation;

use crate::classifier::{cross_entropy, RelationClassifier};
use crate::steering::{SteerGoal, SteerLoss};

/// The classifier's cross-entropy against the wanted relation.
pub struct LearnedLoss {
    pub classifier: RelationClassifier,
    /// Denoising steps (0-based, in a run of `build_steps`) the classifier was trained on.
    pub step_indices: Vec<usize>,
    /// Steps of the runs the training maps were recorded in.
    pub build_steps: usize,
    /// Steps of the run being steered.
    pub run_steps: usize,
    pub relations: Vec<String>,
    /// The layout of the maps the classifier was trained on.
    pub map_layout: crate::maps::MapLayout,
}

impl LearnedLoss {
    /// Class index of `relation` in the classifier's label space.
    pub fn label(&self, relation: Relation) -> Result<usize> {
        self.relations
            .iter()
            .position(|r| r == relation.name())
            .with_context(|| {
                format!(
                    "the classifier was not trained on the relation `{}` (it knows {:?})",
                    relation.name(),
                    self.relations
                )
            })
    }

    /// The classifier's step input: the first training step at or after the current one
    /// (0–5 → 5, 6–10 → 10, …), after mapping the run's step onto the training run's length.
    pub fn step_slot(&self, step: usize) -> usize {
        let scaled = if self.run_steps == self.build_steps || self.run_steps == 0 {
            step
        } else {
            ((step as f64) * self.build_steps as f64 / self.run_steps as f64).round() as usize
        };
        self.step_indices
            .iter()
            .position(|&s| s >= scaled)
            .unwrap_or(self.step_indices.len().saturating_sub(1))
    }
}

impl SteerLoss for LearnedLoss {
    fn name(&self) -> &str {
        "l2s"
    }

    /// The maps as the classifier saw them in training.
    fn map_layout(&self) -> crate::maps::MapLayout {
        self.map_layout
    }

    fn loss(&self, maps: &Tensor, triplet: &SteerGoal, step: usize) -> Result<Tensor> {
        let dev = maps.device();
        let maps = maps.unsqueeze(0)?.to_dtype(self.classifier.dtype())?;
        let step = self
            .classifier
            .step_input(&self.step_indices, self.step_slot(step));
        let steps = Tensor::new(&[step as u32], dev)?;
        let labels = Tensor::new(&[triplet.label as u32], dev)?;
        let logits = self.classifier.forward(&maps, &steps, false)?;
        Ok(cross_entropy(&logits, &labels)?)
    }

    /// The paper's early-stop thresholds.
    fn threshold(&self, step: usize) -> f64 {
        match step {
            0 => 1e-5,
            1 => 3e-5,
            2 => 5e-5,
            _ => 7e-5,
        }
    }
}

/// Soft centroids (x, y in [0, 1], y downwards) of the two words' maps averaged over layers/heads.
fn centroids(maps: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, _, s, _) = maps.dims4()?;
    let m = maps.to_dtype(DType::F32)?.mean(1)?; // (2, S, S)
    let m = m.broadcast_div(&(m.sum_keepdim(2)?.sum_keepdim(1)? + 1e-12)?)?;
    let coords: Vec<f32> = (0..s).map(|i| (i as f32 + 0.5) / s as f32).collect();
    let c = Tensor::new(coords, maps.device())?;
    let cx = m.sum(1)?.broadcast_mul(&c)?.sum(D::Minus1)?; // (2,)
    let cy = m.sum(2)?.broadcast_mul(&c)?.sum(D::Minus1)?;
    Ok((cx, cy))
}

/// Hinge on the difference of the words' soft centroids along the relation's axis.
pub struct CentroidLoss {
    pub margin: f64,
}

impl SteerLoss for CentroidLoss {
    fn name(&self) -> &str {
        "centroid"
    }

    fn loss(&self, maps: &Tensor, triplet: &SteerGoal, _step: usize) -> Result<Tensor> {
        let (cx, cy) = centroids(maps)?;
        let pick = |t: &Tensor, i: usize| t.narrow(0, i, 1);
        // Positive while the subject is not yet `margin` beyond the object in the wanted direction.
        let gap = match triplet.relation {
            Relation::LeftOf => (pick(&cx, 0)? - pick(&cx, 1)?)?,
            Relation::RightOf => (pick(&cx, 1)? - pick(&cx, 0)?)?,
            Relation::Above => (pick(&cy, 0)? - pick(&cy, 1)?)?,
            Relation::Below => (pick(&cy, 1)? - pick(&cy, 0)?)?,
        };
        Ok((gap + self.margin)?.relu()?.sum_all()?)
    }

    fn threshold(&self, _step: usize) -> f64 {
        1e-6
    }
}

/// Attend-and-Excite: make the weaker word's strongest (Gaussian-smoothed) attention large.
/// Refinement steps get many iterations until the loss is below 1 − threshold; other steps one.
pub struct AttendExciteLoss {
    pub run_steps: usize,
    kernel: Tensor,
}

impl AttendExciteLoss {
    pub fn new(run_steps: usize, device: &Device) -> Result<Self> {
        // 3×3 Gaussian, σ = 0.5, normalised.
        let g: Vec<f32> = [-1f32, 0.0, 1.0]
            .iter()
            .map(|x| (-x * x / (2.0 * 0.25)).exp())
            .collect();
        let mut k = Vec::with_capacity(9);
        for a in &g {
            for b in &g {
                k.push(a * b);
            }
        }
        let sum: f32 = k.iter().sum();
        let k: Vec<f32> = k.iter().map(|v| v / sum).collect();
        Ok(Self {
            run_steps,
            kernel: Tensor::from_vec(k, (1, 1, 3, 3), device)?,
        })
    }

    /// Refinement points at 0 %, 20 % and 40 % of the run (steps 0, 10, 20 of 50) and their targets.
    fn refinement(&self, step: usize) -> Option<f64> {
        let at = |frac: f64| (frac * self.run_steps as f64).round() as usize;
        [(0.0, 0.05), (0.2, 0.5), (0.4, 0.8)]
            .iter()
            .find(|(f, _)| at(*f) == step)
            .map(|(_, thr)| 1.0 - thr)
    }
}

impl SteerLoss for AttendExciteLoss {
    fn name(&self) -> &str {
        "attend-excite"
    }

    fn loss(&self, maps: &Tensor, _triplet: &SteerGoal, _step: usize) -> Result<Tensor> {
        let m = maps.to_dtype(DType::F32)?.mean(1)?.unsqueeze(1)?; // (2, 1, S, S)
        let smooth = m.conv2d(&self.kernel, 1, 1, 1, 1)?;
        // Each map sums to 1; scale so a fully concentrated map peaks at 1, as A&E's
        // token-softmaxed maps do.
        let peak = smooth.flatten_from(1)?.max(1)?; // (2,)
        let s2 = (maps.dim(2)? * maps.dim(3)?) as f64;
        let peak = (peak * s2.sqrt())?.clamp(0f32, 1f32)?;
        Ok((1.0 - peak)?.max(0)?)
    }

    fn threshold(&self, step: usize) -> f64 {
        self.refinement(step).unwrap_or(0.0)
    }

    /// 20·sqrt(linspace(1, 0.5)) over the run.
    fn step_size(&self, step: usize, base: f64) -> f64 {
        let frac = if self.run_steps > 1 {
            step as f64 / (self.run_steps - 1) as f64
        } else {
            0.0
        };
        base * (1.0 - 0.5 * frac).sqrt()
    }

    fn max_iterations(&self, step: usize, default: usize) -> usize {
        if self.refinement(step).is_some() {
            default
        } else {
            1
        }
    }
}
