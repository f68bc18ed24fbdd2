//! Watching cross-attention: every cross-attention layer reports its per-head probabilities to one
//! [`AttentionObserver`]; the observer alone decides what to keep.

use candle_core::{Result, Tensor};

/// Where a reported attention map comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionSite {
    /// Module path in diffusers naming, e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn2`.
    pub layer: String,
    /// Spatial grid of the image queries (queries are row-major over it).
    pub height: usize,
    pub width: usize,
    pub heads: usize,
    /// Number of text tokens (keys).
    pub tokens: usize,
}

/// Receives cross-attention probabilities during a forward pass.
///
/// `probs` has shape (batch, heads, height·width, tokens) and is part of the autograd graph, so a
/// loss computed from what the observer keeps can be differentiated back to the latent.
pub trait AttentionObserver {
    /// Whether the layer should be reported at all; layers nobody wants cost nothing extra.
    fn wants(&self, _site: &AttentionSite) -> bool {
        true
    }
    fn observe(&mut self, site: &AttentionSite, probs: &Tensor) -> Result<()>;
}

/// The observer that keeps nothing: plain inference.
pub struct NoObserver;

impl AttentionObserver for NoObserver {
    fn wants(&self, _site: &AttentionSite) -> bool {
        false
    }
    fn observe(&mut self, _site: &AttentionSite, _probs: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Keeps every reported map in forward order, optionally only some token columns (so memory stays
/// bounded by batch × heads × queries × kept tokens).
#[derive(Default)]
pub struct AttentionStore {
    token_columns: Option<Tensor>,
    records: Vec<(AttentionSite, Tensor)>,
}

impl AttentionStore {
    /// Keeps all token columns.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps only the given token positions, in the given order.
    pub fn with_tokens(tokens: &[usize], device: &candle_core::Device) -> Result<Self> {
        let idx: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        Ok(Self {
            token_columns: Some(Tensor::new(idx, device)?),
            records: Vec::new(),
        })
    }

    pub fn records(&self) -> &[(AttentionSite, Tensor)] {
        &self.records
    }

    pub fn into_records(self) -> Vec<(AttentionSite, Tensor)> {
        self.records
    }

    pub fn clear(&mut self) {
        self.records.clear();
    }
}

impl AttentionObserver for AttentionStore {
    fn observe(&mut self, site: &AttentionSite, probs: &Tensor) -> Result<()> {
        let kept = match &self.token_columns {
            Some(idx) => probs.index_select(idx, 3)?,
            None => probs.clone(),
        };
        self.records.push((site.clone(), kept));
        Ok(())
    }
}
