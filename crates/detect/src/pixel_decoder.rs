//! Mask2Former's pixel decoder: a deformable-attention encoder over the coarsest feature levels,
//! then an FPN step up to stride 4 that yields the per-pixel mask features.

use candle_core::Tensor;

use crate::config::Mask2FormerConfig;
use crate::deformable::DeformableAttention;
use crate::layers::{resize_bilinear, Conv, GroupNorm, Linear, Norm, Path};
use crate::position::sine_position;
use crate::Result;

struct EncoderLayer {
    attn: DeformableAttention,
    norm1: Norm,
    fc1: Linear,
    fc2: Linear,
    norm2: Norm,
}

impl EncoderLayer {
    fn load(p: &Path, cfg: &Mask2FormerConfig) -> Result<Self> {
        let d = cfg.feature_size;
        Ok(Self {
            attn: DeformableAttention::load(
                &p.pp("attn"),
                d,
                cfg.encoder_heads,
                cfg.num_levels,
                cfg.encoder_points,
            )?,
            norm1: Norm::load(&p.pp("norm1"), d, 1e-5)?,
            fc1: Linear::load(&p.pp("ffn.fc1"), d, cfg.encoder_ffn_dim, true)?,
            fc2: Linear::load(&p.pp("ffn.fc2"), cfg.encoder_ffn_dim, d, true)?,
            norm2: Norm::load(&p.pp("norm2"), d, 1e-5)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        pos: &Tensor,
        reference: &Tensor,
        shapes: &[(usize, usize)],
    ) -> Result<Tensor> {
        let q = x.broadcast_add(pos)?;
        let a = self.attn.forward(&q, x, reference, shapes)?;
        let x = self.norm1.forward(&(x + a)?)?;
        let f = self.fc2.forward(&self.fc1.forward(&x)?.relu()?)?;
        self.norm2.forward(&(x + f)?)
    }
}

/// Outputs of the pixel decoder.
pub struct PixelDecoderOutput {
    /// (B, mask_feature_size, H/4, W/4).
    pub mask_features: Tensor,
    /// The `num_levels` maps the transformer decoder attends to, coarsest first.
    pub multi_scale: Vec<Tensor>,
}

pub struct PixelDecoder {
    input_proj: Vec<(Conv, GroupNorm)>,
    level_embed: Tensor,
    layers: Vec<EncoderLayer>,
    /// FPN steps for the finer backbone levels, indexed by level.
    fpn: Vec<(Conv, GroupNorm, Conv, GroupNorm)>,
    mask_proj: Conv,
    feature_size: usize,
}

impl PixelDecoder {
    pub fn load(p: &Path, cfg: &Mask2FormerConfig) -> Result<Self> {
        let d = cfg.feature_size;
        let g = cfg.group_norm_groups;
        let ns = cfg.backbone.num_stages();
        let mut input_proj = Vec::new();
        // Projections run coarsest level first.
        for i in 0..cfg.num_levels {
            let c = cfg.backbone.stage_dim(ns - 1 - i);
            let ip = p.pp(format!("input_proj.{i}"));
            input_proj.push((
                Conv::load(&ip.pp("conv"), c, d, 1, 1, 0, true)?,
                GroupNorm::load(&ip.pp("gn"), d, g)?,
            ));
        }
        let level_embed = p.pp("level_embed").get_self(&[cfg.num_levels, d])?;
        let layers = (0..cfg.encoder_layers)
            .map(|l| EncoderLayer::load(&p.pp(format!("layers.{l}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let mut fpn = Vec::new();
        for lvl in 0..ns - cfg.num_levels {
            let c = cfg.backbone.stage_dim(lvl);
            let lp = p.pp(format!("lateral.{lvl}"));
            let op = p.pp(format!("output.{lvl}"));
            fpn.push((
                Conv::load(&lp.pp("conv"), c, d, 1, 1, 0, false)?,
                GroupNorm::load(&lp.pp("gn"), d, g)?,
                Conv::load(&op.pp("conv"), d, d, 3, 1, 1, false)?,
                GroupNorm::load(&op.pp("gn"), d, g)?,
            ));
        }
        let mask_proj = Conv::load(&p.pp("mask_proj"), d, cfg.mask_feature_size, 1, 1, 0, true)?;
        Ok(Self {
            input_proj,
            level_embed,
            layers,
            fpn,
            mask_proj,
            feature_size: d,
        })
    }

    /// Chooses the deformable sampling: the CPU loop (`true`) or the device-generic gather.
    pub fn set_fused_sampling(&mut self, fused: bool) {
        for l in &mut self.layers {
            l.attn.fused = fused;
        }
    }

    /// `features`: the backbone maps, finest first.
    pub fn forward(&self, features: &[Tensor]) -> Result<PixelDecoderOutput> {
        let ns = features.len();
        let nl = self.input_proj.len();
        let dev = features[0].device().clone();
        let mut srcs = Vec::new();
        let mut poss = Vec::new();
        let mut refs = Vec::new();
        let mut shapes = Vec::new();
        for (i, (conv, gn)) in self.input_proj.iter().enumerate() {
            let f = &features[ns - 1 - i];
            let y = gn.forward(&conv.forward(f)?)?;
            let (_, _, h, w) = y.dims4()?;
            srcs.push(y.flatten_from(2)?.transpose(1, 2)?);
            let pos = sine_position(h, w, self.feature_size / 2, &dev)?
                .broadcast_add(&self.level_embed.get(i)?.unsqueeze(0)?)?;
            poss.push(pos);
            // Reference points: pixel centres, normalised by the level's size.
            let mut r = Vec::with_capacity(h * w * 2);
            for y in 0..h {
                for x in 0..w {
                    r.push((x as f32 + 0.5) / w as f32);
                    r.push((y as f32 + 0.5) / h as f32);
                }
            }
            refs.push(Tensor::from_vec(r, (h * w, 2), &dev)?);
            shapes.push((h, w));
        }
        let mut x = Tensor::cat(&srcs, 1)?.contiguous()?;
        let pos = Tensor::cat(&poss, 0)?.unsqueeze(0)?;
        let reference = Tensor::cat(&refs, 0)?;
        for layer in &self.layers {
            x = layer.forward(&x, &pos, &reference, &shapes)?;
        }
        let b = x.dim(0)?;
        let mut outs = Vec::new();
        let mut start = 0;
        for &(h, w) in &shapes {
            let o = x
                .narrow(1, start, h * w)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, self.feature_size, h, w))?;
            outs.push(o);
            start += h * w;
        }
        for lvl in (0..self.fpn.len()).rev() {
            let (lat, lat_gn, out, out_gn) = &self.fpn[lvl];
            let cur = lat_gn.forward(&lat.forward(&features[lvl])?)?;
            let (_, _, h, w) = cur.dims4()?;
            let last = outs.last().expect("encoder levels");
            let y = (cur + resize_bilinear(last, h, w)?)?;
            outs.push(out_gn.forward(&out.forward(&y)?)?.relu()?);
        }
        let mask_features = self.mask_proj.forward(outs.last().expect("levels"))?;
        outs.truncate(nl);
        Ok(PixelDecoderOutput {
            mask_features,
            multi_scale: outs,
        })
    }
}
