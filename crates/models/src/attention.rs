//! Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`).

use crate::nn::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::softmax_last_dim;
use crate::observer::{AttentionObserver, AttentionSite};
use crate::ops::attention::attention;
use crate::ops::heads::{attention_heads, attention_heads_observed};
use crate::ops::matmul::matmul;

#[derive(Clone, Debug)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Key/value input width; `None` for self-attention.
    pub context_dim: Option<usize>,
    pub heads: usize,
    pub head_dim: usize,
    /// Whether `to_q`/`to_k`/`to_v` carry a bias (the VAE's do, the UNet's don't).
    pub qkv_bias: bool,
    /// Compute scores and softmax in f32 whatever the model dtype (SD2.x's `upcast_attention`).
    pub upcast: bool,
    /// Report probabilities to the observer (cross-attention layers).
    pub observed: bool,
}

#[derive(Clone, Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
    upcast: bool,
    observed: bool,
    name: String,
}

fn linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    if bias {
        crate::nn::linear(i, o, vb)
    } else {
        crate::nn::linear_no_bias(i, o, vb)
    }
}

impl Attention {
    pub fn new(cfg: &AttentionConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let kv_in = cfg.context_dim.unwrap_or(cfg.query_dim);
        Ok(Self {
            to_q: linear(cfg.query_dim, inner, cfg.qkv_bias, vb.pp("to_q"))?,
            to_k: linear(kv_in, inner, cfg.qkv_bias, vb.pp("to_k"))?,
            to_v: linear(kv_in, inner, cfg.qkv_bias, vb.pp("to_v"))?,
            to_out: crate::nn::linear(inner, cfg.query_dim, vb.pp("to_out").pp("0"))?,
            heads: cfg.heads,
            head_dim: cfg.head_dim,
            scale: 1.0 / (cfg.head_dim as f64).sqrt(),
            upcast: cfg.upcast,
            observed: cfg.observed,
            name: vb.prefix(),
        })
    }

    /// (batch, len, heads·head_dim) → (batch, heads, len, head_dim)
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        xs.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `xs`: (batch, height·width, query_dim); `context`: (batch, tokens, context_dim) or `None`.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        grid: (usize, usize),
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let ctx = context.unwrap_or(xs);
        let (q, k, v) = (
            self.to_q.forward(xs)?,
            self.to_k.forward(ctx)?,
            self.to_v.forward(ctx)?,
        );
        let site = AttentionSite {
            layer: self.name.clone(),
            height: grid.0,
            width: grid.1,
            heads: self.heads,
            tokens: k.dim(1)?,
        };
        let dtype = q.dtype();
        let upcast = self.upcast && matches!(dtype, DType::F16 | DType::BF16);
        let observed = self.observed && observer.wants(&site);
        if !observed && !upcast {
            // Heads stay side by side in the projections' layout: no split or merge copies.
            let out = attention_heads(&q, &k, &v, self.heads, self.scale)?;
            return self.to_out.forward(&out);
        }
        if observed && !upcast {
            // Observed without gradients: the same kernel, so the output equals an unobserved pass.
            if let Some((out, probs)) =
                attention_heads_observed(&q, &k, &v, self.heads, self.scale)?
            {
                observer.observe(&site, &probs)?;
                return self.to_out.forward(&out);
            }
        }
        let (q, k, v) = (
            self.split_heads(&q)?,
            self.split_heads(&k)?,
            self.split_heads(&v)?,
        );
        let (q, k) = if upcast {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q, k)
        };
        let out = if observed {
            // The observer gets the probabilities as a tensor of their own.
            let scores = (matmul(&q, &k.t()?)? * self.scale)?;
            let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
            observer.observe(&site, &probs)?;
            matmul(&probs, &v)?
        } else if q.dtype() == dtype {
            attention(&q, &k, &v, self.scale)?
        } else {
            let scores = (matmul(&q, &k.t()?)? * self.scale)?;
            matmul(&softmax_last_dim(&scores)?.to_dtype(dtype)?, &v)?
        }; // (b, heads, n, head_dim)
        let out = out
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?;
        self.to_out.forward(&out)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}
