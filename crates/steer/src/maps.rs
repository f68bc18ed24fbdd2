//! The classifier's input: for each (subject, object) word pair, the cross-attention maps of
//! both words from every cross-attention layer and head, resized to S×S and renormalised —
//! shape (2, C, S, S), C = Σ layers × heads (DESIGN §2). Differentiable to the latent.

use candle_core::{DType, Tensor};
use l2s_generate::attention::{renormalize, resize_maps, word_maps};
use l2s_models::{AttentionObserver, AttentionSite};

/// Token positions of the two words of one relation triplet. A word of several tokens is the
/// mean of its tokens' maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WordPair {
    pub subject: Vec<usize>,
    pub object: Vec<usize>,
}

/// An observer that turns each reported layer into per-pair maps.
pub struct MapRecorder {
    pairs: Vec<WordPair>,
    size: usize,
    detach: bool,
    active: bool,
    /// Per layer: (B, P, 2, heads, S, S).
    per_layer: Vec<Tensor>,
    sites: Vec<AttentionSite>,
}

impl MapRecorder {
    /// `detach`: keep no autograd graph (dataset building); otherwise the maps stay differentiable.
    pub fn new(pairs: Vec<WordPair>, size: usize, detach: bool) -> Self {
        Self {
            pairs,
            size,
            detach,
            active: true,
            per_layer: Vec::new(),
            sites: Vec::new(),
        }
    }

    /// Turns recording on or off (off: layers are not even asked for).
    pub fn set_active(&mut self, active: bool) {
        self.active = active;
    }

    pub fn clear(&mut self) {
        self.per_layer.clear();
        self.sites.clear();
    }

    /// The layers recorded since the last `clear`, in forward order.
    pub fn sites(&self) -> &[AttentionSite] {
        &self.sites
    }

    /// (B, P, 2, C, S, S) of everything recorded since the last `clear`.
    pub fn maps(&self) -> candle_core::Result<Tensor> {
        if self.per_layer.is_empty() {
            candle_core::bail!("no cross-attention layer was recorded");
        }
        Tensor::cat(&self.per_layer, 3)
    }

    /// Σ heads over the recorded layers: the C of the classifier input.
    pub fn num_maps(&self) -> usize {
        self.sites.iter().map(|s| s.heads).sum()
    }
}

impl AttentionObserver for MapRecorder {
    fn wants(&self, _site: &AttentionSite) -> bool {
        self.active
    }

    fn observe(&mut self, site: &AttentionSite, probs: &Tensor) -> candle_core::Result<()> {
        let probs = if self.detach {
            probs.detach()
        } else {
            probs.clone()
        };
        let probs = probs.to_dtype(DType::F32)?;
        let mut pairs = Vec::with_capacity(self.pairs.len());
        for pair in &self.pairs {
            // (B, 2, heads, h, w) → resized to S×S and renormalised per map.
            let words = word_maps(&probs, &[pair.subject.clone(), pair.object.clone()], site)?;
            let m = resize_maps(&words, self.size, self.size)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            pairs.push(renormalize(&m).map_err(|e| candle_core::Error::Msg(e.to_string()))?);
        }
        self.per_layer.push(Tensor::stack(&pairs, 1)?); // (B, P, 2, heads, S, S)
        self.sites.push(site.clone());
        Ok(())
    }
}
