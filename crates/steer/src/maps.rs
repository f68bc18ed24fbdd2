//! The classifier's input: for each (subject, object) word pair, the cross-attention maps of
//! both words from every cross-attention layer and head, resized to S×S and renormalised —
//! shape (2, C, S, S), C = Σ layers × heads (DESIGN §2). Differentiable to the latent.

use candle_core::{DType, Tensor};
use l2s_generate::attention::{renormalize, resize_maps, resize_maps_with, word_maps, Resize};
use l2s_models::{AttentionObserver, AttentionSite};

/// Token positions of the two words of one relation triplet. A word of several tokens is the
/// mean of its tokens' maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WordPair {
    pub subject: Vec<usize>,
    pub object: Vec<usize>,
}

/// How a layer's maps become classifier channels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MapLayout {
    /// Ours: area-averaged to S×S, every map renormalised to sum 1, layers in forward order.
    #[default]
    Ours,
    /// What the published Learn-to-Steer classifiers read: bilinear resize (align_corners=False,
    /// no antialias), divided by (sum + 1e-8) only when resized (FLUX.1-schnell's 16×16 maps go
    /// in raw), channels ordered by resolution ascending, forward order within one resolution.
    Published,
}

/// An observer that turns each reported layer into per-pair maps.
pub struct MapRecorder {
    layout: MapLayout,
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
        Self::with_layout(pairs, size, detach, MapLayout::Ours)
    }

    /// [`Self::new`] for a given channel layout.
    pub fn with_layout(pairs: Vec<WordPair>, size: usize, detach: bool, layout: MapLayout) -> Self {
        Self {
            layout,
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

    /// The layers recorded since the last `clear`, in channel order.
    pub fn sites(&self) -> Vec<AttentionSite> {
        self.channel_order()
            .into_iter()
            .map(|i| self.sites[i].clone())
            .collect()
    }

    /// Indices of the recorded layers in the layout's channel order.
    fn channel_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.sites.len()).collect();
        if self.layout == MapLayout::Published {
            // Stable: forward order within one resolution.
            order.sort_by_key(|&i| self.sites[i].height * self.sites[i].width);
        }
        order
    }

    /// (B, P, 2, C, S, S) of everything recorded since the last `clear`.
    pub fn maps(&self) -> candle_core::Result<Tensor> {
        if self.per_layer.is_empty() {
            candle_core::bail!("no cross-attention layer was recorded");
        }
        let layers: Vec<&Tensor> = self
            .channel_order()
            .into_iter()
            .map(|i| &self.per_layer[i])
            .collect();
        Tensor::cat(&layers, 3)
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
            let msg = |e: l2s_generate::GenerateError| candle_core::Error::Msg(e.to_string());
            pairs.push(match self.layout {
                MapLayout::Ours => {
                    renormalize(&resize_maps(&words, self.size, self.size).map_err(msg)?)
                        .map_err(msg)?
                }
                MapLayout::Published if (site.height, site.width) == (self.size, self.size) => {
                    words
                }
                MapLayout::Published => {
                    let m = resize_maps_with(&words, self.size, self.size, Resize::Bilinear)
                        .map_err(msg)?;
                    let sums = m.sum_keepdim(4)?.sum_keepdim(3)?;
                    m.broadcast_div(&(sums + 1e-8)?)?
                }
            });
        }
        self.per_layer.push(Tensor::stack(&pairs, 1)?); // (B, P, 2, heads, S, S)
        self.sites.push(site.clone());
        Ok(())
    }
}
