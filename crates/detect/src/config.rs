//! Architecture hyper-parameters. Most are read back from the shapes of a checkpoint; the ones a
//! shape cannot tell (head counts, sampling points) keep the values every published model uses.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwinConfig {
    pub in_channels: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_size: usize,
    /// Hidden width of each block's MLP as a multiple of the stage width.
    pub mlp_ratio: usize,
    pub qkv_bias: bool,
    pub layer_norm_eps: f64,
}

impl SwinConfig {
    /// Swin-S: the backbone of GenEval's detector.
    pub fn small() -> Self {
        Self {
            in_channels: 3,
            patch_size: 4,
            embed_dim: 96,
            depths: vec![2, 2, 18, 2],
            num_heads: vec![3, 6, 12, 24],
            window_size: 7,
            mlp_ratio: 4,
            qkv_bias: true,
            layer_norm_eps: 1e-5,
        }
    }

    /// Channels of stage `s` (the width doubles at every patch merging).
    pub fn stage_dim(&self, s: usize) -> usize {
        self.embed_dim << s
    }

    pub fn num_stages(&self) -> usize {
        self.depths.len()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mask2FormerConfig {
    pub backbone: SwinConfig,
    /// Width of the pixel decoder (`feature_size` / `feat_channels`).
    pub feature_size: usize,
    /// Channels of the per-pixel mask embeddings (`mask_feature_size` / `out_channels`).
    pub mask_feature_size: usize,
    /// Width of the transformer decoder (`hidden_dim`).
    pub hidden_dim: usize,
    pub encoder_layers: usize,
    pub encoder_ffn_dim: usize,
    pub encoder_heads: usize,
    pub encoder_points: usize,
    /// Feature levels seen by the deformable encoder and the masked-attention decoder.
    pub num_levels: usize,
    /// Transformer decoder layers (HF's `decoder_layers` counts one more: the query input).
    pub decoder_layers: usize,
    pub decoder_heads: usize,
    pub decoder_ffn_dim: usize,
    pub num_queries: usize,
    /// Classes without the no-object class.
    pub num_classes: usize,
    pub group_norm_groups: usize,
}

impl Mask2FormerConfig {
    /// `facebook/mask2former-swin-small-coco-instance` and mmdet's
    /// `mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`.
    pub fn swin_small_coco_instance() -> Self {
        Self {
            backbone: SwinConfig::small(),
            feature_size: 256,
            mask_feature_size: 256,
            hidden_dim: 256,
            encoder_layers: 6,
            encoder_ffn_dim: 1024,
            encoder_heads: 8,
            encoder_points: 4,
            num_levels: 3,
            decoder_layers: 9,
            decoder_heads: 8,
            decoder_ffn_dim: 2048,
            num_queries: 100,
            num_classes: 80,
            group_norm_groups: 32,
        }
    }

    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Mask2FormerError::Config(m));
        let b = &self.backbone;
        if b.depths.is_empty() || b.depths.len() != b.num_heads.len() {
            return bad(format!(
                "depths {:?} and num_heads {:?} must be non-empty and of one length",
                b.depths, b.num_heads
            ));
        }
        for (s, &h) in b.num_heads.iter().enumerate() {
            if h == 0 || !b.stage_dim(s).is_multiple_of(h) {
                return bad(format!(
                    "stage {s}: width {} is not divisible by {h} heads",
                    b.stage_dim(s)
                ));
            }
        }
        if b.window_size == 0 || b.patch_size == 0 {
            return bad("window_size and patch_size must be positive".into());
        }
        if self.num_levels == 0 || self.num_levels > b.num_stages() {
            return bad(format!(
                "{} feature levels but the backbone has {} stages",
                self.num_levels,
                b.num_stages()
            ));
        }
        if self.hidden_dim != self.feature_size {
            return bad(format!(
                "hidden_dim {} differs from feature_size {}: decoder input projections are not supported",
                self.hidden_dim, self.feature_size
            ));
        }
        for (what, dim, heads) in [
            ("encoder", self.feature_size, self.encoder_heads),
            ("decoder", self.hidden_dim, self.decoder_heads),
        ] {
            if heads == 0 || !dim.is_multiple_of(heads) {
                return bad(format!(
                    "{what}: width {dim} not divisible by {heads} heads"
                ));
            }
        }
        if !self.feature_size.is_multiple_of(2)
            || self.group_norm_groups == 0
            || !self.feature_size.is_multiple_of(self.group_norm_groups)
        {
            return bad(format!(
                "feature_size {} must be even and divisible by {} groups",
                self.feature_size, self.group_norm_groups
            ));
        }
        if self.num_queries == 0 || self.num_classes == 0 {
            return bad("num_queries and num_classes must be positive".into());
        }
        Ok(())
    }
}
