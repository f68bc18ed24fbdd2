//! The masked-attention transformer decoder and the class and mask heads applied after the
//! query input and after every layer.

use candle_core::{DType, Tensor};

use crate::config::Mask2FormerConfig;
use crate::layers::{resize_bilinear, Linear, MultiHeadAttention, Norm, Path};
use crate::position::sine_position;
use crate::Result;

/// Added to the logits a query may not attend to; large enough that softmax gives exactly 0.
const MASKED: f64 = -1e9;

struct DecoderLayer {
    cross: MultiHeadAttention,
    norm_cross: Norm,
    self_attn: MultiHeadAttention,
    norm_self: Norm,
    fc1: Linear,
    fc2: Linear,
    norm_ffn: Norm,
}

impl DecoderLayer {
    fn load(p: &Path, cfg: &Mask2FormerConfig) -> Result<Self> {
        let d = cfg.hidden_dim;
        Ok(Self {
            cross: MultiHeadAttention::load(&p.pp("cross_attn"), d, cfg.decoder_heads)?,
            norm_cross: Norm::load(&p.pp("norm_cross"), d, 1e-5)?,
            self_attn: MultiHeadAttention::load(&p.pp("self_attn"), d, cfg.decoder_heads)?,
            norm_self: Norm::load(&p.pp("norm_self"), d, 1e-5)?,
            fc1: Linear::load(&p.pp("ffn.fc1"), d, cfg.decoder_ffn_dim, true)?,
            fc2: Linear::load(&p.pp("ffn.fc2"), cfg.decoder_ffn_dim, d, true)?,
            norm_ffn: Norm::load(&p.pp("norm_ffn"), d, 1e-5)?,
        })
    }

    fn forward(
        &self,
        q: &Tensor,
        qpos: &Tensor,
        src: &Tensor,
        src_pos: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let k = src.broadcast_add(src_pos)?;
        let a = self
            .cross
            .forward(&q.broadcast_add(qpos)?, &k, src, Some(mask))?;
        let q = self.norm_cross.forward(&(q + a)?)?;
        let qp = q.broadcast_add(qpos)?;
        let a = self.self_attn.forward(&qp, &qp, &q, None)?;
        let q = self.norm_self.forward(&(q + a)?)?;
        let f = self.fc2.forward(&self.fc1.forward(&q)?.relu()?)?;
        self.norm_ffn.forward(&(q + f)?)
    }
}

/// Class and mask logits of every prediction round (the query input, then each layer).
pub struct DecoderOutput {
    /// (B, Q, classes + 1) per round.
    pub class_logits: Vec<Tensor>,
    /// (B, Q, H/4, W/4) per round.
    pub mask_logits: Vec<Tensor>,
}

pub struct Decoder {
    query_feat: Tensor,
    query_pos: Tensor,
    level_embed: Tensor,
    layers: Vec<DecoderLayer>,
    final_norm: Norm,
    class: Linear,
    mask_embed: Vec<Linear>,
    heads: usize,
    hidden: usize,
}

impl Decoder {
    pub fn load(p: &Path, head: &Path, cfg: &Mask2FormerConfig) -> Result<Self> {
        let d = cfg.hidden_dim;
        let q = cfg.num_queries;
        let layers = (0..cfg.decoder_layers)
            .map(|l| DecoderLayer::load(&p.pp(format!("layers.{l}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let mask_embed = (0..3)
            .map(|i| {
                let out = if i == 2 { cfg.mask_feature_size } else { d };
                Linear::load(&head.pp(format!("mask_embed.{i}")), d, out, true)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            query_feat: p.pp("query_feat").get_self(&[q, d])?,
            query_pos: p.pp("query_pos").get_self(&[q, d])?,
            level_embed: p.pp("level_embed").get_self(&[cfg.num_levels, d])?,
            layers,
            final_norm: Norm::load(&p.pp("final_norm"), d, 1e-5)?,
            class: Linear::load(&head.pp("class"), d, cfg.num_classes + 1, true)?,
            mask_embed,
            heads: cfg.decoder_heads,
            hidden: d,
        })
    }

    /// Class logits, mask logits, and the cross-attention bias for a level of size `target`.
    fn predict(
        &self,
        q: &Tensor,
        mask_features: &Tensor,
        target: (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let x = self.final_norm.forward(q)?;
        let class = self.class.forward(&x)?;
        let mut e = x;
        for (i, l) in self.mask_embed.iter().enumerate() {
            e = l.forward(&e)?;
            if i < 2 {
                e = e.relu()?;
            }
        }
        let (b, c, h, w) = mask_features.dims4()?;
        let nq = e.dim(1)?;
        let masks = e
            .matmul(&mask_features.reshape((b, c, h * w))?)?
            .reshape((b, nq, h, w))?;
        let small = resize_bilinear(&masks, target.0, target.1)?;
        let hw = target.0 * target.1;
        // A query attends only where its previous mask is on (probability ≥ 0.5) …
        let blocked = candle_nn::ops::sigmoid(&small)?
            .lt(0.5)?
            .to_dtype(DType::F32)?
            .reshape((b, nq, hw))?;
        // … unless that leaves nothing, in which case it attends everywhere.
        let full = blocked
            .sum_keepdim(2)?
            .ge(hw as f64)?
            .to_dtype(DType::F32)?;
        let blocked = blocked.broadcast_mul(&(1.0 - full)?)?;
        let bias = (blocked * MASKED)?.unsqueeze(1)?;
        Ok((class, masks, bias))
    }

    /// `multi_scale` coarsest first, as the pixel decoder gives them.
    pub fn forward(&self, multi_scale: &[Tensor], mask_features: &Tensor) -> Result<DecoderOutput> {
        let nl = multi_scale.len();
        let dev = mask_features.device();
        let b = mask_features.dim(0)?;
        let mut srcs = Vec::new();
        let mut poss = Vec::new();
        let mut sizes = Vec::new();
        for (i, f) in multi_scale.iter().enumerate() {
            let (_, _, h, w) = f.dims4()?;
            let s = f
                .flatten_from(2)?
                .transpose(1, 2)?
                .broadcast_add(&self.level_embed.get(i)?.unsqueeze(0)?.unsqueeze(0)?)?
                .contiguous()?;
            srcs.push(s);
            poss.push(sine_position(h, w, self.hidden / 2, dev)?.unsqueeze(0)?);
            sizes.push((h, w));
        }
        let nq = self.query_feat.dim(0)?;
        let mut q = self
            .query_feat
            .unsqueeze(0)?
            .broadcast_as((b, nq, self.hidden))?
            .contiguous()?;
        let qpos = self.query_pos.unsqueeze(0)?;
        let mut class_logits = Vec::new();
        let mut mask_logits = Vec::new();
        let (c, m, mut bias) = self.predict(&q, mask_features, sizes[0])?;
        class_logits.push(c);
        mask_logits.push(m);
        for (l, layer) in self.layers.iter().enumerate() {
            let lvl = l % nl;
            let bias_h = bias.broadcast_as((b, self.heads, nq, sizes[lvl].0 * sizes[lvl].1))?;
            q = layer.forward(&q, &qpos, &srcs[lvl], &poss[lvl], &bias_h)?;
            let (c, m, next) = self.predict(&q, mask_features, sizes[(l + 1) % nl])?;
            class_logits.push(c);
            mask_logits.push(m);
            bias = next;
        }
        Ok(DecoderOutput {
            class_logits,
            mask_logits,
        })
    }
}
