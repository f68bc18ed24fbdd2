//! FLUX's joint attention: text and image tokens attend to each other in one softmax. Beside it,
//! for the observer, the image-query × text-key probabilities with the softmax over the text
//! tokens only (what Learn-to-Steer reads for FLUX), from the same normalised, rotated q and k.

use crate::nn::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::norm::RmsNorm;
use super::rope::Rope;
use crate::nn::softmax_last_dim;
use crate::observer::{AttentionObserver, AttentionSite};
use crate::ops::attention::attention;
use crate::ops::matmul::matmul;

/// The text stream's projections of a double-stream block.
#[derive(Clone, Debug)]
struct Added {
    add_q_proj: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    norm_added_q: RmsNorm,
    norm_added_k: RmsNorm,
    to_add_out: Linear,
}

#[derive(Clone, Debug)]
pub struct FluxAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// `to_out.0`; absent in single-stream blocks, whose `proj_out` follows instead.
    to_out: Option<Linear>,
    added: Option<Added>,
    heads: usize,
    head_dim: usize,
    name: String,
}

/// Where the text tokens sit in the sequence and what grid the image tokens form.
#[derive(Clone, Copy, Debug)]
pub struct JointLayout {
    pub text_tokens: usize,
    pub grid: (usize, usize),
}

impl FluxAttention {
    /// `double`: a double-stream block's attention (separate text projections and outputs).
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        double: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let added = if double {
            Some(Added {
                add_q_proj: crate::nn::linear(dim, inner, vb.pp("add_q_proj"))?,
                add_k_proj: crate::nn::linear(dim, inner, vb.pp("add_k_proj"))?,
                add_v_proj: crate::nn::linear(dim, inner, vb.pp("add_v_proj"))?,
                norm_added_q: RmsNorm::new(head_dim, 1e-6, vb.pp("norm_added_q"))?,
                norm_added_k: RmsNorm::new(head_dim, 1e-6, vb.pp("norm_added_k"))?,
                to_add_out: crate::nn::linear(inner, dim, vb.pp("to_add_out"))?,
            })
        } else {
            None
        };
        Ok(Self {
            to_q: crate::nn::linear(dim, inner, vb.pp("to_q"))?,
            to_k: crate::nn::linear(dim, inner, vb.pp("to_k"))?,
            to_v: crate::nn::linear(dim, inner, vb.pp("to_v"))?,
            norm_q: RmsNorm::new(head_dim, 1e-6, vb.pp("norm_q"))?,
            norm_k: RmsNorm::new(head_dim, 1e-6, vb.pp("norm_k"))?,
            to_out: if double {
                Some(crate::nn::linear(inner, dim, vb.pp("to_out").pp("0"))?)
            } else {
                None
            },
            added,
            heads,
            head_dim,
            name: vb.prefix(),
        })
    }

    /// (batch, seq, heads·head_dim) → (batch, heads, seq, head_dim), optionally RMS-normed per head.
    fn heads_of(&self, xs: &Tensor, norm: Option<&RmsNorm>) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let x = xs.reshape((b, n, self.heads, self.head_dim))?;
        let x = match norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        x.transpose(1, 2)?.contiguous()
    }

    /// Double-stream: `xs` holds the image tokens and `context` the text tokens; returns
    /// (image output, text output). Single-stream: `xs` is the joint [text; image] sequence,
    /// `context` is `None`, and the returned pair is (joint output, None).
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        rope: &Rope,
        layout: JointLayout,
        observer: &mut dyn AttentionObserver,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut q = self.heads_of(&self.to_q.forward(xs)?, Some(&self.norm_q))?;
        let mut k = self.heads_of(&self.to_k.forward(xs)?, Some(&self.norm_k))?;
        let mut v = self.heads_of(&self.to_v.forward(xs)?, None)?;
        if let (Some(a), Some(ctx)) = (&self.added, context) {
            let cq = self.heads_of(&a.add_q_proj.forward(ctx)?, Some(&a.norm_added_q))?;
            let ck = self.heads_of(&a.add_k_proj.forward(ctx)?, Some(&a.norm_added_k))?;
            let cv = self.heads_of(&a.add_v_proj.forward(ctx)?, None)?;
            q = Tensor::cat(&[cq, q], 2)?;
            k = Tensor::cat(&[ck, k], 2)?;
            v = Tensor::cat(&[cv, v], 2)?;
        } else if self.added.is_some() || context.is_some() {
            candle_core::bail!("{}: a double-stream attention needs the text stream and a single-stream one takes none", self.name);
        }
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let (b, _, seq, _) = q.dims4()?;
        let t = layout.text_tokens;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let dtype = q.dtype();
        // Scores and softmax in f32 for half-precision models, as PyTorch's fused attention does.
        let upcast = |x: &Tensor| {
            if matches!(dtype, DType::F16 | DType::BF16) {
                x.to_dtype(DType::F32)
            } else {
                Ok(x.clone())
            }
        };

        let site = AttentionSite {
            layer: self.name.clone(),
            height: layout.grid.0,
            width: layout.grid.1,
            heads: self.heads,
            tokens: t,
        };
        if observer.wants(&site) {
            let qi = upcast(&q.narrow(2, t, seq - t)?)?;
            let kt = upcast(&k.narrow(2, 0, t)?)?;
            let scores = (matmul(&qi, &kt.t()?)? * scale)?;
            let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
            observer.observe(&site, &probs)?;
        }

        let out = if matches!(dtype, DType::F16 | DType::BF16) {
            let scores = (upcast(&q)?.matmul(&upcast(&k)?.t()?)? * scale)?;
            softmax_last_dim(&scores)?.to_dtype(dtype)?.matmul(&v)?
        } else {
            attention(&q, &k, &v, scale)?
        };
        let out = out
            .transpose(1, 2)?
            .reshape((b, seq, self.heads * self.head_dim))?;
        match (&self.added, &self.to_out) {
            (Some(a), Some(to_out)) => {
                let text = a.to_add_out.forward(&out.narrow(1, 0, t)?)?;
                let image = to_out.forward(&out.narrow(1, t, seq - t)?)?;
                Ok((image, Some(text)))
            }
            _ => Ok((out, None)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn heads(&self) -> usize {
        self.heads
    }
}
