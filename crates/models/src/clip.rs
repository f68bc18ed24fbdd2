//! CLIP text transformer (transformers' `CLIPTextModel`): OpenAI ViT-L/14 text for SD1.x
//! (`quick_gelu`), OpenCLIP ViT-H text as diffusers ships it for SD2.x (`gelu`, 23 layers).

use std::path::Path;

use crate::nn::Linear;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::config::{parse_config, read_text};
use crate::error::{ModelError, Result as ModelResult};
use crate::nn::{softmax_last_dim, Activation, LayerNorm};

#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        Self::from_json(&read_text(path)?, path)
    }

    /// Parses and checks the config's text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> ModelResult<Self> {
        let cfg: Self = parse_config(text, path, "a CLIPTextConfig")?;
        if Activation::parse(&cfg.hidden_act).is_none() {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: "hidden_act".into(),
                value: cfg.hidden_act.clone(),
                supported: "quick_gelu, gelu".into(),
            });
        }
        for (field, v) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_hidden_layers", cfg.num_hidden_layers),
            ("max_position_embeddings", cfg.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(ModelError::Unsupported {
                    path: path.to_path_buf(),
                    field: field.into(),
                    value: "0".into(),
                    supported: "at least 1".into(),
                });
            }
        }
        if !cfg.layer_norm_eps.is_finite() || cfg.layer_norm_eps <= 0.0 {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: "layer_norm_eps".into(),
                value: cfg.layer_norm_eps.to_string(),
                supported: "a finite number > 0 (CLIP: 1e-5)".into(),
            });
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: "num_attention_heads".into(),
                value: cfg.num_attention_heads.to_string(),
                supported: format!("a divisor of hidden_size {}", cfg.hidden_size),
            });
        }
        Ok(cfg)
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: crate::nn::linear(h, h, vb.pp("q_proj"))?,
            k_proj: crate::nn::linear(h, h, vb.pp("k_proj"))?,
            v_proj: crate::nn::linear(h, h, vb.pp("v_proj"))?,
            out_proj: crate::nn::linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q = split((self.q_proj.forward(xs)? * scale)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scores = crate::nn::add_broadcast(&q.matmul(&k.t()?)?, causal_mask)?;
        let probs = softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&out)
    }
}

/// One pre-norm transformer block; CLIP's vision tower uses the same blocks.
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    pub(crate) fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let act = Activation::parse(&cfg.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!("unsupported hidden_act {}", cfg.hidden_act))
        })?;
        Ok(Self {
            layer_norm1: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: crate::nn::linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                vb.pp("mlp").pp("fc1"),
            )?,
            fc2: crate::nn::linear(
                cfg.intermediate_size,
                cfg.hidden_size,
                vb.pp("mlp").pp("fc2"),
            )?,
            act,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        let mlp = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&h)?)?)?,
        )?;
        h + mlp
    }
}

/// Output of the text encoder.
pub struct TextEncoding {
    /// (batch, tokens, hidden): the final-layer-normed states, Stable Diffusion's conditioning.
    pub last_hidden_state: Tensor,
    /// (batch, hidden): the state at each sequence's end token (CLIP's pooled output).
    pub pooled: Tensor,
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` points at the component root. Parameter names start with `text_model.` in the
    /// published checkpoints; transformers ≥ 5 saves them without that level. Both load.
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight")
            || !vb.contains_tensor("embeddings.token_embedding.weight")
        {
            vb.pp("text_model")
        } else {
            vb
        };
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            vb.pp("final_layer_norm"),
        )?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (1, 1, n, n), device)?.to_dtype(dtype)
    }

    /// `ids`: (batch, tokens) u32 token ids.
    pub fn forward(&self, ids: &Tensor) -> Result<TextEncoding> {
        let (_, n) = ids.dims2()?;
        if n > self.config.max_position_embeddings {
            candle_core::bail!(
                "text encoder: {n} tokens, at most max_position_embeddings = {} expected",
                self.config.max_position_embeddings
            );
        }
        let positions = self.position_embedding.i(..n)?;
        let mut xs = crate::nn::add_broadcast(&self.token_embedding.forward(ids)?, &positions)?;
        let mask = Self::causal_mask(n, xs.dtype(), xs.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;
        // CLIP's end token has the largest id in its vocabulary, so the first maximum marks it.
        let eos_pos = ids.to_dtype(DType::F32)?.argmax(D::Minus1)?; // (batch,)
        let pooled = (0..eos_pos.dim(0)?)
            .map(|b| {
                let p = eos_pos.i(b)?.to_scalar::<u32>()? as usize;
                last_hidden_state.i((b, p))
            })
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        Ok(TextEncoding {
            last_hidden_state,
            pooled,
        })
    }
}
