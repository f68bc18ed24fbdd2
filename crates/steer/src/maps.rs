//! The classifier's input: for each (subject, object) word pair, the cross-attention maps of
//! both words from every cross-attention layer and head, resized to S×S and renormalised —
//! shape (2, C, S, S), C = Σ layers × heads (DESIGN §2). Differentiable to the latent.

use candle_core::{DType, Tensor};
use l2s_generate::attention::{renormalize, resize_maps};
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
        Self { pairs, size, detach, active: true, per_layer: Vec::new(), sites: Vec::new() }
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

fn mean_columns(probs: &Tensor, positions: &[usize]) -> candle_core::Result<Tensor> {
    // probs: (B, heads, HW, T) → mean over the given token columns → (B, heads, HW)
    let mut acc: Option<Tensor> = None;
    for &p in positions {
        let col = probs.narrow(3, p, 1)?.squeeze(3)?;
        acc = Some(match acc {
            Some(a) => (a + col)?,
            None => col,
        });
    }
    let acc = acc.ok_or_else(|| candle_core::Error::Msg("a word with no token positions".into()))?;
    acc / positions.len() as f64
}

impl AttentionObserver for MapRecorder {
    fn wants(&self, _site: &AttentionSite) -> bool {
        self.active
    }

    fn observe(&mut self, site: &AttentionSite, probs: &Tensor) -> candle_core::Result<()> {
        let probs = if self.detach { probs.detach() } else { probs.clone() };
        let probs = probs.to_dtype(DType::F32)?;
        let (b, heads, _, _) = probs.dims4()?;
        let mut pairs = Vec::with_capacity(self.pairs.len());
        for pair in &self.pairs {
            let mut words = Vec::with_capacity(2);
            for positions in [&pair.subject, &pair.object] {
                let m = mean_columns(&probs, positions)?.reshape((b, heads, site.height, site.width))?;
                let m = resize_maps(&m, self.size, self.size).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                words.push(renormalize(&m).map_err(|e| candle_core::Error::Msg(e.to_string()))?);
            }
            pairs.push(Tensor::stack(&words, 1)?); // (B, 2, heads, S, S)
        }
        self.per_layer.push(Tensor::stack(&pairs, 1)?); // (B, P, 2, heads, S, S)
        self.sites.push(site.clone());
        Ok(())
    }
}
