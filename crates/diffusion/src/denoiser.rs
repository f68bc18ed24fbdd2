//! How a model plugs into the samplers, and classifier-free guidance.
//!
//! Entry points: the [`Denoiser`] trait (implemented by the model side) and
//! [`guided_prediction`], which runs one guided model evaluation as a [`Guidance`] says.
//!
//! The sampler knows nothing of the model: not its architecture, not what its conditioning is
//! (text embeddings, pooled vectors, …: the associated type [`Denoiser::Cond`]), and not whether
//! anybody watches its attention. An observer is attached on the model side: the type
//! implementing `Denoiser` holds it (or a `&mut` to it) and hands it to its forward pass; since
//! `predict` takes `&mut self`, the observer may record freely. The batch layout used by
//! [`Guidance::Batched`] (unconditional half first) is part of this contract, so an observer
//! knows which half of the batch is text-conditioned.

use candle_core::Tensor;

use crate::error::Result;
use crate::observer::{AttentionObserver, AttentionSite};
use crate::transfer::{check_same_shape, work_dtype};

/// A model that predicts, for latents at a timestep, the quantity the scheduler's
/// `prediction_type` names (ε, v or x₀).
pub trait Denoiser {
    /// The conditioning the model takes, opaque to the samplers. Its batch size must equal the
    /// latents' batch size.
    type Cond;

    /// The model output for `latents` (batch B) at timestep `t` under `cond` (batch B).
    /// Return model-side errors with [`crate::DiffusionError::denoiser`]; candle errors convert
    /// with `?`.
    fn predict(&mut self, latents: &Tensor, t: f64, cond: &Self::Cond) -> Result<Tensor>;

    /// [`Self::predict`] with every attention layer reporting to `observer`. A model without
    /// attention to report ignores it.
    fn predict_observed(
        &mut self,
        latents: &Tensor,
        t: f64,
        cond: &Self::Cond,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let _ = observer;
        self.predict(latents, t, cond)
    }
}

impl<D: Denoiser + ?Sized> Denoiser for &mut D {
    type Cond = D::Cond;
    fn predict(&mut self, latents: &Tensor, t: f64, cond: &Self::Cond) -> Result<Tensor> {
        (**self).predict(latents, t, cond)
    }
    fn predict_observed(
        &mut self,
        latents: &Tensor,
        t: f64,
        cond: &Self::Cond,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        (**self).predict_observed(latents, t, cond, observer)
    }
}

/// How to turn conditioning into one model output per step.
#[derive(Clone, Debug)]
pub enum Guidance<C> {
    /// One call with this conditioning, no guidance (also: guidance scale 1 at half the cost).
    Unguided(C),
    /// Classifier-free guidance in one model call: `batched` holds the B unconditional entries
    /// followed by the B conditional ones (batch 2B); the latents are duplicated to match, and the
    /// output's first half is read as unconditional, the second as conditional. `cond` is the
    /// conditional half alone, for passes without guidance (steering's gradient pass).
    Batched { batched: C, cond: C, scale: f64 },
    /// Classifier-free guidance in two model calls of batch B (less peak memory).
    TwoPass { uncond: C, cond: C, scale: f64 },
}

impl Guidance<Tensor> {
    /// [`Guidance::Batched`] for tensor conditioning: concatenates `[uncond; cond]` on dim 0 once,
    /// so the steps do not repeat it.
    pub fn batched_tensors(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Self> {
        check_same_shape("unconditional vs conditional embeddings", uncond, cond)?;
        Ok(Guidance::Batched {
            batched: Tensor::cat(&[uncond, cond], 0)?,
            cond: cond.clone(),
            scale,
        })
    }
}

impl<C> Guidance<C> {
    /// The prompt's own conditioning, without guidance.
    pub fn conditional(&self) -> &C {
        match self {
            Guidance::Unguided(c) => c,
            Guidance::Batched { cond, .. } | Guidance::TwoPass { cond, .. } => cond,
        }
    }
}

/// Classifier-free guidance: uncond + scale·(cond − uncond), computed in f32 (f64 for f64
/// inputs) and returned in `cond`'s dtype.
pub fn classifier_free_guidance(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    check_same_shape("unconditional vs conditional prediction", uncond, cond)?;
    let w = work_dtype(uncond, cond);
    let (u, c) = (uncond.to_dtype(w)?, cond.to_dtype(w)?);
    Ok((&u + (&c - &u)?.affine(scale, 0.0)?)?.to_dtype(cond.dtype())?)
}

/// One model evaluation at (`latents`, `t`) under `guidance`.
pub fn guided_prediction<D: Denoiser + ?Sized>(
    denoiser: &mut D,
    latents: &Tensor,
    t: f64,
    guidance: &Guidance<D::Cond>,
) -> Result<Tensor> {
    guided_prediction_observed(denoiser, latents, t, guidance, None)
}

/// Passes on the second half of every reported batch: the conditional rows of a
/// [`Guidance::Batched`] call.
struct SecondHalf<'o> {
    inner: &'o mut dyn AttentionObserver,
}

impl AttentionObserver for SecondHalf<'_> {
    fn wants(&self, site: &AttentionSite) -> bool {
        self.inner.wants(site)
    }
    fn observe(&mut self, site: &AttentionSite, probs: &Tensor) -> candle_core::Result<()> {
        let b = probs.dim(0)?;
        self.inner.observe(site, &probs.narrow(0, b / 2, b / 2)?)
    }
}

/// [`guided_prediction`] that shows `observer` the text-conditioned rows only (maps of the
/// negative prompt say nothing about the prompt's words): every row when unguided, the second
/// half of a batched call, the second call of a two-pass step.
pub fn guided_prediction_observed<D: Denoiser + ?Sized>(
    denoiser: &mut D,
    latents: &Tensor,
    t: f64,
    guidance: &Guidance<D::Cond>,
    observer: Option<&mut dyn AttentionObserver>,
) -> Result<Tensor> {
    match guidance {
        Guidance::Unguided(cond) => match observer {
            Some(o) => denoiser.predict_observed(latents, t, cond, o),
            None => denoiser.predict(latents, t, cond),
        },
        Guidance::Batched { batched, scale, .. } => {
            let b = latents.dim(0)?;
            let doubled = Tensor::cat(&[latents, latents], 0)?;
            let out = match observer {
                Some(inner) => {
                    denoiser.predict_observed(&doubled, t, batched, &mut SecondHalf { inner })?
                }
                None => denoiser.predict(&doubled, t, batched)?,
            };
            check_same_shape(
                "batched guidance: model output vs doubled latents",
                &out,
                &doubled,
            )?;
            let (uncond, cond) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
            classifier_free_guidance(&uncond, &cond, *scale)
        }
        Guidance::TwoPass {
            uncond,
            cond,
            scale,
        } => {
            let u = denoiser.predict(latents, t, uncond)?;
            let c = match observer {
                Some(o) => denoiser.predict_observed(latents, t, cond, o)?,
                None => denoiser.predict(latents, t, cond)?,
            };
            classifier_free_guidance(&u, &c, *scale)
        }
    }
}
