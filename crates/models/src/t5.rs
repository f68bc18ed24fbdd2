//! The T5 v1.1 encoder (transformers' `T5EncoderModel`) and its sentencepiece tokenizer, as FLUX
//! uses them: RMS-style layer norms, unscaled attention with a learned bucketed relative-position
//! bias (computed once, in block 0, shared by all blocks), gated-GELU feed-forward.

use std::path::{Path, PathBuf};

use crate::nn::Linear;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::config::{parse_config, read_text};
use crate::error::{ModelError, Result as ModelResult};
use crate::flux::norm::RmsNorm;
use crate::nn::softmax_last_dim;

fn d_buckets() -> usize {
    32
}
fn d_distance() -> usize {
    128
}
fn d_eps() -> f64 {
    1e-6
}
fn d_ffp() -> String {
    "gated-gelu".into()
}

/// `text_encoder_2/config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "d_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "d_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_ffp")]
    pub feed_forward_proj: String,
}

impl T5Config {
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        Self::from_json(&read_text(path)?, path)
    }

    /// Parses and checks the config's text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> ModelResult<Self> {
        let cfg: Self = parse_config(text, path, "a T5Config")?;
        let unsupported = |field: &str, value: String, supported: &str| ModelError::Unsupported {
            path: path.to_path_buf(),
            field: field.into(),
            value,
            supported: supported.into(),
        };
        for (field, v) in [
            ("vocab_size", cfg.vocab_size),
            ("d_model", cfg.d_model),
            ("d_kv", cfg.d_kv),
            ("d_ff", cfg.d_ff),
            ("num_layers", cfg.num_layers),
            ("num_heads", cfg.num_heads),
        ] {
            if v == 0 {
                return Err(unsupported(field, "0".into(), "at least 1"));
            }
        }
        if cfg.relative_attention_num_buckets < 2 {
            return Err(unsupported(
                "relative_attention_num_buckets",
                cfg.relative_attention_num_buckets.to_string(),
                "at least 2 (one per direction; T5: 32)",
            ));
        }
        if !cfg.layer_norm_epsilon.is_finite() || cfg.layer_norm_epsilon <= 0.0 {
            return Err(unsupported(
                "layer_norm_epsilon",
                cfg.layer_norm_epsilon.to_string(),
                "a finite number > 0 (T5: 1e-6)",
            ));
        }
        if cfg.feed_forward_proj != "gated-gelu" {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: "feed_forward_proj".into(),
                value: cfg.feed_forward_proj.clone(),
                supported: "gated-gelu (T5 v1.1, as FLUX uses)".into(),
            });
        }
        Ok(cfg)
    }
}

/// transformers' bidirectional bucketing: half the buckets per direction; within one, small
/// distances get their own bucket and larger ones share logarithmically wider ones. Computed in
/// f32 like PyTorch so that bucket boundaries agree.
fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    let max_exact = half / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        let ratio = (distance as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as u32
}

struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    relative_attention_bias: Option<Embedding>,
    heads: usize,
    d_kv: usize,
    num_buckets: usize,
    max_distance: usize,
}

impl SelfAttention {
    fn new(cfg: &T5Config, has_bias: bool, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let relative_attention_bias = if has_bias {
            Some(candle_nn::embedding(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                vb.pp("relative_attention_bias"),
            )?)
        } else {
            None
        };
        Ok(Self {
            q: crate::nn::linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: crate::nn::linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: crate::nn::linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: crate::nn::linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            relative_attention_bias,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// (1, heads, n, n) bias from this layer's bucket embedding.
    fn position_bias(&self, n: usize, device: &Device) -> Result<Option<Tensor>> {
        let Some(emb) = &self.relative_attention_bias else {
            return Ok(None);
        };
        let buckets: Vec<u32> = (0..n as i64)
            .flat_map(|q| {
                (0..n as i64)
                    .map(move |k| relative_bucket(k - q, self.num_buckets, self.max_distance))
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (n, n), device)?;
        Ok(Some(
            emb.forward(&buckets)?.permute((2, 0, 1))?.unsqueeze(0)?,
        ))
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(xs)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let dtype = q.dtype();
        // No 1/√d scaling in T5; softmax in f32 as transformers does.
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(&bias.to_dtype(DType::F32)?)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ff_norm: RmsNorm,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

/// Keeps f16 activations finite, as transformers does after every sub-layer.
fn clamp_f16(xs: Tensor) -> Result<Tensor> {
    if xs.dtype() == DType::F16 {
        xs.clamp(-64504f32, 64504f32)
    } else {
        Ok(xs)
    }
}

impl Block {
    fn new(cfg: &T5Config, index: usize, vb: VarBuilder) -> Result<Self> {
        let l0 = vb.pp("layer").pp("0");
        let l1 = vb.pp("layer").pp("1");
        let ff = l1.pp("DenseReluDense");
        Ok(Self {
            attn_norm: RmsNorm::new(cfg.d_model, cfg.layer_norm_epsilon, l0.pp("layer_norm"))?,
            attn: SelfAttention::new(cfg, index == 0, l0.pp("SelfAttention"))?,
            ff_norm: RmsNorm::new(cfg.d_model, cfg.layer_norm_epsilon, l1.pp("layer_norm"))?,
            wi_0: crate::nn::linear_no_bias(cfg.d_model, cfg.d_ff, ff.pp("wi_0"))?,
            wi_1: crate::nn::linear_no_bias(cfg.d_model, cfg.d_ff, ff.pp("wi_1"))?,
            wo: crate::nn::linear_no_bias(cfg.d_ff, cfg.d_model, ff.pp("wo"))?,
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let h = clamp_f16((xs + self.attn.forward(&self.attn_norm.forward(xs)?, bias)?)?)?;
        let x = self.ff_norm.forward(&h)?;
        // gelu_new: the tanh approximation.
        let gated = self
            .wi_0
            .forward(&x)?
            .gelu()?
            .mul(&self.wi_1.forward(&x)?)?;
        clamp_f16((&h + self.wo.forward(&gated)?)?)
    }
}

pub struct T5EncoderModel {
    shared: Embedding,
    blocks: Vec<Block>,
    final_layer_norm: RmsNorm,
    config: T5Config,
}

impl T5EncoderModel {
    /// `vb` points at the component root (`shared.weight`, `encoder.block.{i}…`).
    pub fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        // Some exports keep only the tied copy `encoder.embed_tokens.weight`.
        let emb_vb = if vb.contains_tensor("shared.weight")
            || !vb.contains_tensor("encoder.embed_tokens.weight")
        {
            vb.pp("shared")
        } else {
            vb.pp("encoder").pp("embed_tokens")
        };
        let shared = candle_nn::embedding(cfg.vocab_size, cfg.d_model, emb_vb)?;
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, i, enc.pp("block").pp(i)))
            .collect::<Result<_>>()?;
        let final_layer_norm = RmsNorm::new(
            cfg.d_model,
            cfg.layer_norm_epsilon,
            enc.pp("final_layer_norm"),
        )?;
        Ok(Self {
            shared,
            blocks,
            final_layer_norm,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// `ids`: (batch, tokens) u32 → last hidden state (batch, tokens, d_model). No attention mask,
    /// as FluxPipeline calls it: padding tokens are attended to.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, n) = ids.dims2()?;
        let mut xs = self.shared.forward(ids)?;
        let bias = self.blocks[0]
            .attn
            .position_bias(n, xs.device())?
            .ok_or_else(|| {
                candle_core::Error::Msg("T5: block 0 has no relative_attention_bias".into())
            })?;
        for block in &self.blocks {
            xs = block.forward(&xs, &bias)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}

/// The T5 sentencepiece tokenizer from a `tokenizer_2/tokenizer.json`: text tokens, the end token,
/// padding to a fixed length.
pub struct T5Tokenizer {
    inner: Tokenizer,
    eos: u32,
    pad: u32,
    max_len: usize,
    source: PathBuf,
}

/// A T5-tokenized prompt, padded to the model length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct T5Encoded {
    pub ids: Vec<u32>,
    /// Text tokens kept (positions 0..text_tokens); the end token follows them.
    pub text_tokens: usize,
    /// Text tokens dropped because the prompt was longer than the limit.
    pub truncated: usize,
}

impl T5Tokenizer {
    /// `max_len`: FluxPipeline's `max_sequence_length` (512).
    pub fn from_folder(dir: &Path, max_len: usize) -> ModelResult<Self> {
        let err = |reason: String| ModelError::Tokenizer {
            path: dir.to_path_buf(),
            reason,
        };
        let json = dir.join("tokenizer.json");
        if !json.exists() {
            return Err(err("expected tokenizer.json (a sentencepiece-only folder with spiece.model is not supported: convert it with transformers)".into()));
        }
        let text = std::fs::read_to_string(&json).map_err(|e| ModelError::io(&json, e))?;
        Self::from_json_text(dir, &text, max_len)
    }

    /// Builds the tokenizer from the text of `tokenizer.json`; `dir` names its folder in errors.
    pub fn from_json_text(dir: &Path, json: &str, max_len: usize) -> ModelResult<Self> {
        let err = |reason: String| ModelError::Tokenizer {
            path: dir.to_path_buf(),
            reason,
        };
        let inner = crate::tokenizer::tokenizer_from_json(json)
            .map_err(|e| err(format!("tokenizer.json: {e}")))?;
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| err(format!("special token `{t}` is not in the vocabulary")))
        };
        let (eos, pad) = (id("</s>")?, id("<pad>")?);
        if max_len < 2 {
            return Err(err(format!(
                "max_sequence_length {max_len}: at least 2 expected"
            )));
        }
        Ok(Self {
            inner,
            eos,
            pad,
            max_len,
            source: dir.to_path_buf(),
        })
    }

    /// Text tokens, end token, padding to `max_len`. A prompt longer than `max_len − 1` tokens is
    /// cut, with a warning saying how much was dropped.
    pub fn encode(&self, text: &str) -> ModelResult<T5Encoded> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.source.clone(),
                reason: format!("cannot tokenize {text:?}: {e}"),
            })?;
        let words = enc.get_ids();
        let keep = words.len().min(self.max_len - 1);
        let truncated = words.len() - keep;
        if truncated > 0 {
            tracing::warn!(
                "T5 prompt truncated: {truncated} of {} tokens dropped (max_sequence_length {}): {text:?}",
                words.len(),
                self.max_len
            );
        }
        let mut ids = Vec::with_capacity(self.max_len);
        ids.extend_from_slice(&words[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(T5Encoded {
            ids,
            text_tokens: keep,
            truncated,
        })
    }

    /// Token ids of the text alone, without end token, untruncated.
    pub fn encode_words(&self, text: &str) -> ModelResult<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.source.clone(),
                reason: format!("cannot tokenize {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len.max(2);
    }
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
}
