//! The whole network: Swin backbone → pixel decoder → masked-attention decoder with heads.

use candle_core::Tensor;

use crate::config::{Mask2FormerConfig, SwinConfig};
use crate::decoder::Decoder;
use crate::layers::Path;
use crate::pixel_decoder::PixelDecoder;
use crate::swin::Swin;
use crate::weights::Weights;
use crate::{Mask2FormerError, Result};

/// Everything the network computes for a batch, for inspection and tests.
pub struct Mask2FormerOutput {
    /// Backbone maps after each stage's output norm, finest first.
    pub backbone: Vec<Tensor>,
    pub mask_features: Tensor,
    /// Pixel decoder maps, coarsest first.
    pub multi_scale: Vec<Tensor>,
    /// (B, Q, classes + 1) per round: the query input, then each decoder layer.
    pub class_logits: Vec<Tensor>,
    /// (B, Q, H/4, W/4) per round.
    pub mask_logits: Vec<Tensor>,
}

pub struct Mask2Former {
    pub config: Mask2FormerConfig,
    backbone: Swin,
    pixel_decoder: PixelDecoder,
    decoder: Decoder,
}

impl Mask2Former {
    pub fn load(w: &Weights, config: &Mask2FormerConfig) -> Result<Self> {
        config.validate()?;
        let root = Path::root(w);
        Ok(Self {
            config: config.clone(),
            backbone: Swin::load(&root.pp("backbone"), &config.backbone)?,
            pixel_decoder: PixelDecoder::load(&root.pp("pixel_decoder"), config)?,
            decoder: Decoder::load(&root.pp("decoder"), &root.pp("head"), config)?,
        })
    }

    /// Chooses the deformable sampling: the CPU loop (`true`, the default on the CPU) or the
    /// tensor gather every device runs.
    pub fn set_fused_sampling(&mut self, fused: bool) {
        self.pixel_decoder.set_fused_sampling(fused);
    }

    /// `pixels` (B, 3, H, W), normalised.
    pub fn forward(&self, pixels: &Tensor) -> Result<Mask2FormerOutput> {
        let (_, c, h, w) = pixels.dims4()?;
        if c != self.config.backbone.in_channels || h == 0 || w == 0 {
            return Err(Mask2FormerError::Input(format!(
                "pixels of shape {:?}; expected (B, {}, H, W) with H, W > 0",
                pixels.dims(),
                self.config.backbone.in_channels
            )));
        }
        let backbone = self.backbone.forward(pixels)?;
        let pd = self.pixel_decoder.forward(&backbone)?;
        let dec = self.decoder.forward(&pd.multi_scale, &pd.mask_features)?;
        Ok(Mask2FormerOutput {
            backbone,
            mask_features: pd.mask_features,
            multi_scale: pd.multi_scale,
            class_logits: dec.class_logits,
            mask_logits: dec.mask_logits,
        })
    }
}

/// Reads the architecture back from the shapes in a checkpoint. Head and sampling-point counts
/// are not visible in shapes and keep the published values (8 heads, 4 points, 3 levels).
pub fn infer_config(w: &Weights) -> Result<Mask2FormerConfig> {
    let shape = |p: &str| -> Result<Vec<usize>> {
        w.shape_of(p).ok_or_else(|| {
            let name = crate::naming::translate(w.naming(), p)
                .and_then(|s| s.parts.first().and_then(|n| n.first().cloned()))
                .unwrap_or_else(|| p.to_string());
            Mask2FormerError::Format {
                path: w.path().to_path_buf(),
                message: format!(
                    "tensor `{name}` ({} naming) is missing; the architecture of a Swin-backbone Mask2Former is read from it",
                    w.naming().label()
                ),
            }
        })
    };
    let count = |f: &dyn Fn(usize) -> String| -> usize {
        let mut n = 0;
        while w.has(&f(n)) {
            n += 1;
        }
        n
    };
    let pe = shape("backbone.patch_embed.proj.weight")?;
    if pe.len() != 4 {
        return Err(Mask2FormerError::Config(format!(
            "patch embedding of shape {pe:?}"
        )));
    }
    let (embed_dim, in_channels, patch_size) = (pe[0], pe[1], pe[2]);
    let stages = count(&|s| format!("backbone.stages.{s}.blocks.0.norm1.weight"));
    let mut depths = Vec::new();
    let mut num_heads = Vec::new();
    let mut window_size = 0;
    for s in 0..stages {
        depths.push(count(&|b| {
            format!("backbone.stages.{s}.blocks.{b}.norm1.weight")
        }));
        let t = shape(&format!("backbone.stages.{s}.blocks.0.attn.rel_bias_table"))?;
        num_heads.push(t[1]);
        // (2w − 1)² rows.
        let side = (t[0] as f64).sqrt().round() as usize;
        window_size = side.div_ceil(2);
    }
    let fc1 = shape("backbone.stages.0.blocks.0.mlp.fc1.weight")?;
    let qkv_bias = w.has("backbone.stages.0.blocks.0.attn.qkv.bias");
    let backbone = SwinConfig {
        in_channels,
        patch_size,
        embed_dim,
        depths,
        num_heads,
        window_size,
        mlp_ratio: fc1[0] / embed_dim.max(1),
        qkv_bias,
        layer_norm_eps: 1e-5,
    };
    let ip = shape("pixel_decoder.input_proj.0.conv.weight")?;
    let mp = shape("pixel_decoder.mask_proj.weight")?;
    let qf = shape("decoder.query_feat")?;
    let cls = shape("head.class.weight")?;
    let num_levels = shape("pixel_decoder.level_embed")?[0];
    let cfg = Mask2FormerConfig {
        backbone,
        feature_size: ip[0],
        mask_feature_size: mp[0],
        hidden_dim: qf[1],
        encoder_layers: count(&|l| format!("pixel_decoder.layers.{l}.norm1.weight")),
        encoder_ffn_dim: shape("pixel_decoder.layers.0.ffn.fc1.weight")?[0],
        encoder_heads: 8,
        encoder_points: 4,
        num_levels,
        decoder_layers: count(&|l| format!("decoder.layers.{l}.norm_ffn.weight")),
        decoder_heads: 8,
        decoder_ffn_dim: shape("decoder.layers.0.ffn.fc1.weight")?[0],
        num_queries: qf[0],
        num_classes: cls[0].saturating_sub(1),
        group_norm_groups: 32,
    };
    cfg.validate()?;
    Ok(cfg)
}
