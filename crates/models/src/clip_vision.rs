//! CLIP's image tower and the joint model (transformers' `CLIPVisionModel` / `CLIPModel`): the
//! text tower is [`crate::clip::ClipTextModel`], the one Stable Diffusion 1.x uses; this adds the
//! ViT image encoder and both projections, so image and text features can be compared.
//! Loads transformers' naming (`vision_model.*`, `text_model.*`, `visual_projection`,
//! `text_projection`), as `openai/clip-vit-large-patch14` ships it.

use std::path::Path;

use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use crate::clip::{ClipTextConfig, ClipTextModel, EncoderLayer};
use crate::error::{ModelError, Result as ModelResult};
use crate::nn::{Activation, LayerNorm};

/// transformers' `CLIPVisionConfig` (its defaults where a field is absent).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ClipVisionConfig {
    #[serde(default = "vision_defaults::hidden")]
    pub hidden_size: usize,
    #[serde(default = "vision_defaults::intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "vision_defaults::layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "vision_defaults::heads")]
    pub num_attention_heads: usize,
    #[serde(default = "vision_defaults::channels")]
    pub num_channels: usize,
    #[serde(default = "vision_defaults::image")]
    pub image_size: usize,
    #[serde(default = "vision_defaults::patch")]
    pub patch_size: usize,
    #[serde(default = "vision_defaults::act")]
    pub hidden_act: String,
    #[serde(default = "vision_defaults::eps")]
    pub layer_norm_eps: f64,
}

mod vision_defaults {
    pub fn hidden() -> usize {
        768
    }
    pub fn intermediate() -> usize {
        3072
    }
    pub fn layers() -> usize {
        12
    }
    pub fn heads() -> usize {
        12
    }
    pub fn channels() -> usize {
        3
    }
    pub fn image() -> usize {
        224
    }
    pub fn patch() -> usize {
        32
    }
    pub fn act() -> String {
        "quick_gelu".into()
    }
    pub fn eps() -> f64 {
        1e-5
    }
}

impl ClipVisionConfig {
    /// Patches per image plus the class token.
    pub fn positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    /// The same block settings as a text config, so the vision tower reuses the text blocks.
    fn as_block_config(&self) -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 1,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            max_position_embeddings: self.positions(),
            hidden_act: self.hidden_act.clone(),
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

/// transformers' `CLIPConfig`: both towers and the shared embedding size.
#[derive(Clone, Debug)]
pub struct ClipModelConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
}

/// transformers' `CLIPTextConfig` defaults, for fields a `text_config` leaves out.
fn text_defaults() -> Value {
    serde_json::json!({
        "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
        "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
    })
}

impl ClipModelConfig {
    /// Reads a `CLIPModel` `config.json`. Older files keep the real sizes in
    /// `text_config_dict` / `vision_config_dict` beside `text_config` / `vision_config`; as in
    /// transformers, the `_dict` entries win.
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let bad = |reason: String| ModelError::Config {
            path: path.to_path_buf(),
            expected: "a CLIPModel config (text_config, vision_config, projection_dim)".into(),
            reason,
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if !v.is_object() {
            return Err(bad("not a JSON object".into()));
        }
        if v.get("vision_config").is_none() && v.get("vision_config_dict").is_none() {
            return Err(bad(
                "no vision_config: not a CLIPModel (a text encoder alone cannot see images)".into(),
            ));
        }
        let merged = |key: &str, base: Value| -> Value {
            let mut out = base;
            for k in [key.to_string(), format!("{key}_dict")] {
                if let (Some(Value::Object(src)), Value::Object(dst)) = (v.get(&k), &mut out) {
                    for (name, value) in src {
                        dst.insert(name.clone(), value.clone());
                    }
                }
            }
            out
        };
        let text: ClipTextConfig = serde_json::from_value(merged("text_config", text_defaults()))
            .map_err(|e| bad(format!("text_config: {e}")))?;
        let vision: ClipVisionConfig =
            serde_json::from_value(merged("vision_config", serde_json::json!({})))
                .map_err(|e| bad(format!("vision_config: {e}")))?;
        let projection_dim = v
            .get("projection_dim")
            .and_then(Value::as_u64)
            .unwrap_or(512) as usize;
        let unsupported = |field: &str, value: String, supported: &str| ModelError::Unsupported {
            path: path.to_path_buf(),
            field: field.into(),
            value,
            supported: supported.into(),
        };
        for (field, act) in [
            ("text_config.hidden_act", &text.hidden_act),
            ("vision_config.hidden_act", &vision.hidden_act),
        ] {
            if Activation::parse(act).is_none() {
                return Err(unsupported(field, act.clone(), "quick_gelu, gelu"));
            }
        }
        for (field, n, h) in [
            (
                "text_config.num_attention_heads",
                text.num_attention_heads,
                text.hidden_size,
            ),
            (
                "vision_config.num_attention_heads",
                vision.num_attention_heads,
                vision.hidden_size,
            ),
        ] {
            if n == 0 || h % n != 0 {
                return Err(unsupported(
                    field,
                    n.to_string(),
                    &format!("a divisor of hidden_size {h}"),
                ));
            }
        }
        if vision.patch_size == 0 || vision.image_size < vision.patch_size {
            return Err(unsupported(
                "vision_config.patch_size",
                vision.patch_size.to_string(),
                &format!("1 to image_size {}", vision.image_size),
            ));
        }
        if projection_dim == 0 || vision.num_channels == 0 || text.vocab_size == 0 {
            return Err(bad(
                "projection_dim, num_channels and vocab_size must be at least 1".into(),
            ));
        }
        Ok(Self {
            text,
            vision,
            projection_dim,
        })
    }
}

/// The ViT image encoder: patches, class token, positions, blocks; pooled at the class token.
pub struct ClipVisionModel {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// `vb` points at `vision_model`.
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let patch_embedding = candle_nn::conv2d_no_bias(
            cfg.num_channels,
            cfg.hidden_size,
            cfg.patch_size,
            Conv2dConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
            emb.pp("patch_embedding"),
        )?;
        let class_embedding = emb.get(cfg.hidden_size, "class_embedding")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.positions(), cfg.hidden_size), "weight")?;
        let block = cfg.as_block_config();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&block, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        // transformers spells it "pre_layrnorm".
        let pre_layrnorm =
            LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?;
        let post_layernorm =
            LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// `pixels`: (batch, channels, image_size, image_size), normalised. Returns the pooled
    /// (post-layer-normed class token) state, (batch, hidden).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let s = self.config.image_size;
        if (c, h, w) != (self.config.num_channels, s, s) {
            candle_core::bail!(
                "CLIP image encoder: input {c}x{h}x{w}, expected {}x{s}x{s}",
                self.config.num_channels
            );
        }
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?; // (b, patches, hidden)
        let class = self
            .class_embedding
            .reshape((1, 1, self.config.hidden_size))?
            .broadcast_as((b, 1, self.config.hidden_size))?
            .to_dtype(patches.dtype())?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut xs = self.pre_layrnorm.forward(&xs)?;
        let n = xs.dim(1)?;
        // Every patch sees every other: an all-zero additive mask.
        let mask = Tensor::zeros((1, 1, n, n), xs.dtype(), xs.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        self.post_layernorm.forward(&xs.i((.., 0))?.contiguous()?)
    }
}

/// Both towers and their projections into the shared embedding space.
pub struct ClipModel {
    pub text: ClipTextModel,
    pub vision: ClipVisionModel,
    text_projection: Linear,
    visual_projection: Linear,
}

impl ClipModel {
    /// `vb` points at the checkpoint root (`text_model.*`, `vision_model.*`, projections).
    pub fn new(cfg: &ClipModelConfig, vb: VarBuilder) -> Result<Self> {
        let text = ClipTextModel::new(&cfg.text, vb.clone())?;
        let vision = ClipVisionModel::new(&cfg.vision, vb.pp("vision_model"))?;
        let text_projection = candle_nn::linear_no_bias(
            cfg.text.hidden_size,
            cfg.projection_dim,
            vb.pp("text_projection"),
        )?;
        let visual_projection = candle_nn::linear_no_bias(
            cfg.vision.hidden_size,
            cfg.projection_dim,
            vb.pp("visual_projection"),
        )?;
        Ok(Self {
            text,
            vision,
            text_projection,
            visual_projection,
        })
    }

    /// (batch, projection_dim) image features, not normalised.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.visual_projection
            .forward(&self.vision.forward(pixels)?)
    }

    /// (batch, projection_dim) text features of token ids, not normalised.
    pub fn text_features(&self, ids: &Tensor) -> Result<Tensor> {
        self.text_projection
            .forward(&self.text.forward(ids)?.pooled)
    }
}
