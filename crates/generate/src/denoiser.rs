//! The UNet as an [`l2s_diffusion::Denoiser`], with optional attention observation.
//!
//! The samplers evaluate the model in one of three batch layouts ([`Guidance`]):
//!
//! - `Unguided(cond)`: one call, every row text-conditioned;
//! - `Batched { [uncond; cond] }`: one call of batch 2B whose **first half is unconditional and
//!   second half conditional**;
//! - `TwoPass { uncond, cond }`: two calls per step, unconditional first.
//!
//! An attention observer usually wants the text-conditioned rows only (maps of the empty
//! prompt say nothing about the words). [`ObservedRows`] says which rows reach it, and
//! [`SdDenoiser::for_guidance`] picks the rows that are conditional under a given guidance, so the
//! observer sees exactly the conditional half and nothing else.

use candle_core::Tensor;
use l2s_diffusion::{Denoiser, Guidance};
use l2s_models::unet::UNet2DConditionModel;
use l2s_models::{AttentionObserver, AttentionSite};

/// Which rows of which model calls an observer is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObservedRows {
    /// Every row of every call.
    All,
    /// Only the second half of each call's batch: the conditional rows under
    /// [`Guidance::Batched`].
    SecondHalf,
    /// Every row of every second call (the 2nd, 4th, …): the conditional calls under
    /// [`Guidance::TwoPass`].
    SecondOfEachPair,
}

impl ObservedRows {
    /// The rows that are text-conditioned under `guidance`.
    pub fn conditional<C>(guidance: &Guidance<C>) -> Self {
        match guidance {
            Guidance::Unguided(_) => ObservedRows::All,
            Guidance::Batched { .. } => ObservedRows::SecondHalf,
            Guidance::TwoPass { .. } => ObservedRows::SecondOfEachPair,
        }
    }
}

/// Passes on the second half of every reported batch.
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

/// A Stable Diffusion UNet predicting for the samplers; its conditioning is the text encoder's
/// hidden states, (batch, tokens, hidden).
pub struct SdDenoiser<'a> {
    unet: &'a UNet2DConditionModel,
    observer: Option<(&'a mut dyn AttentionObserver, ObservedRows)>,
    calls: usize,
}

impl<'a> SdDenoiser<'a> {
    /// Plain inference: no observer.
    pub fn new(unet: &'a UNet2DConditionModel) -> Self {
        Self {
            unet,
            observer: None,
            calls: 0,
        }
    }

    /// Reports the given rows' cross-attention to `observer`.
    pub fn observed(
        unet: &'a UNet2DConditionModel,
        observer: &'a mut dyn AttentionObserver,
        rows: ObservedRows,
    ) -> Self {
        Self {
            unet,
            observer: Some((observer, rows)),
            calls: 0,
        }
    }

    /// Reports exactly the text-conditioned rows under `guidance` to `observer`.
    pub fn for_guidance<C>(
        unet: &'a UNet2DConditionModel,
        observer: &'a mut dyn AttentionObserver,
        guidance: &Guidance<C>,
    ) -> Self {
        Self::observed(unet, observer, ObservedRows::conditional(guidance))
    }

    pub fn unet(&self) -> &'a UNet2DConditionModel {
        self.unet
    }

    /// Number of model calls made so far.
    pub fn calls(&self) -> usize {
        self.calls
    }
}

impl Denoiser for SdDenoiser<'_> {
    type Cond = Tensor;

    fn predict(
        &mut self,
        latents: &Tensor,
        t: f64,
        cond: &Tensor,
    ) -> l2s_diffusion::Result<Tensor> {
        let call = self.calls;
        self.calls += 1;
        let out = match &mut self.observer {
            None => self.unet.forward(latents, t, cond)?,
            Some((observer, rows)) => match rows {
                ObservedRows::All => {
                    self.unet
                        .forward_observed(latents, t, cond, &mut **observer)?
                }
                ObservedRows::SecondHalf => {
                    let mut half = SecondHalf {
                        inner: &mut **observer,
                    };
                    self.unet.forward_observed(latents, t, cond, &mut half)?
                }
                ObservedRows::SecondOfEachPair if call % 2 == 1 => {
                    self.unet
                        .forward_observed(latents, t, cond, &mut **observer)?
                }
                ObservedRows::SecondOfEachPair => self.unet.forward(latents, t, cond)?,
            },
        };
        Ok(out)
    }
}
