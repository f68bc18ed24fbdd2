//! The deterministic DDIM move of a sample between two noise levels, shared by sampling and
//! inversion.
//!
//! A sample at level ᾱ is x = √ᾱ·x₀ + √(1−ᾱ)·ε. From the model output the step recovers the pair
//! (x₀, ε) at the source level ᾱ_s, then re-mixes it at the target level ᾱ_d:
//!
//! ```text
//! epsilon:       x₀ = (x − √(1−ᾱ_s)·out) / √ᾱ_s          ε = out
//! sample:        x₀ = out                                 ε = (x − √ᾱ_s·x₀) / √(1−ᾱ_s)
//! v_prediction:  x₀ = √ᾱ_s·x − √(1−ᾱ_s)·out               ε = √ᾱ_s·out + √(1−ᾱ_s)·x
//! (x₀ optionally clamped to ±clip_sample_range; ε is computed before clamping)
//! x_d = √ᾱ_d·x₀ + √(1−ᾱ_d)·ε
//! ```
//!
//! Sampling moves to a smaller t (larger ᾱ), inversion to a larger t. Scalars are f64; the
//! tensor arithmetic is plain candle ops (affine, sub, add, clamp, casts), so it is
//! differentiable. It runs in f32 (f64 if either tensor is f64): candle's `affine` rounds its
//! coefficient to the tensor's dtype, which for bf16 would be a 0.4% error amplified by the
//! 1/√ᾱ of noisy steps. Results come back in the sample's dtype, on its device.

use candle_core::{DType, Tensor};

use crate::config::PredictionType;
use crate::error::{DiffusionError, Result};

/// The result of one scheduler step.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The sample at the step's target noise level. For sampling that is x_{t−Δ}; for the inverse
    /// scheduler it is the *noisier* x_t (the name follows diffusers' output class).
    pub prev_sample: Tensor,
    /// The model's estimate of the clean sample x₀ (after clipping, if enabled).
    pub pred_original_sample: Tensor,
}

/// What the step needs to know besides the tensors.
pub(crate) struct Transfer {
    pub prediction_type: PredictionType,
    /// `Some(r)`: clamp x₀ to [−r, r].
    pub clip: Option<f64>,
    /// ᾱ at the sample's current level.
    pub alpha_from: f64,
    /// ᾱ at the level to move to.
    pub alpha_to: f64,
    /// For error messages only.
    pub timestep: usize,
}

/// The dtype step arithmetic runs in: f64 if either tensor is f64, else f32.
pub(crate) fn work_dtype(a: &Tensor, b: &Tensor) -> DType {
    if a.dtype() == DType::F64 || b.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

pub(crate) fn check_same_shape(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(DiffusionError::ShapeMismatch {
            what: what.to_string(),
            left: a.dims().to_vec(),
            right: b.dims().to_vec(),
        });
    }
    Ok(())
}

impl Transfer {
    pub fn apply(&self, model_output: &Tensor, sample: &Tensor) -> Result<StepOutput> {
        check_same_shape("model_output vs sample", model_output, sample)?;
        let (out_dtype, work) = (sample.dtype(), work_dtype(model_output, sample));
        let (model_output, sample) = (&model_output.to_dtype(work)?, &sample.to_dtype(work)?);
        let a = self.alpha_from;
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let degenerate = |reason: &str| DiffusionError::DegenerateStep {
            timestep: self.timestep,
            reason: reason.to_string(),
        };
        let (x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => {
                if sa == 0.0 {
                    return Err(degenerate(
                        "an epsilon prediction carries no information on x0 where alpha_cumprod = 0 \
                         (zero terminal SNR); use v_prediction or leave out that timestep",
                    ));
                }
                let x0 = (sample - model_output.affine(sb, 0.0)?)?.affine(1.0 / sa, 0.0)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                if sb == 0.0 {
                    return Err(degenerate(
                        "a sample prediction carries no information on the noise where \
                         alpha_cumprod = 1 (set_alpha_to_one at the start of inversion)",
                    ));
                }
                let eps = (sample - model_output.affine(sa, 0.0)?)?.affine(1.0 / sb, 0.0)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = (sample.affine(sa, 0.0)? - model_output.affine(sb, 0.0)?)?;
                let eps = (model_output.affine(sa, 0.0)? + sample.affine(sb, 0.0)?)?;
                (x0, eps)
            }
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let d = self.alpha_to;
        let prev = (x0.affine(d.sqrt(), 0.0)? + eps.affine((1.0 - d).sqrt(), 0.0)?)?;
        Ok(StepOutput {
            prev_sample: prev.to_dtype(out_dtype)?,
            pred_original_sample: x0.to_dtype(out_dtype)?,
        })
    }
}
