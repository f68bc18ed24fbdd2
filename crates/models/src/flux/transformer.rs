//! `FluxTransformer2DModel`: embeds packed latents and T5 states, runs the double- then the
//! single-stream blocks under one conditioning vector, and predicts the flow velocity.

use std::path::Path;

use crate::nn::Linear;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::JointLayout;
use super::block::{DoubleStreamBlock, SingleStreamBlock};
use super::checkpoint::{self, Block};
use super::embeddings::TimeTextEmbed;
use super::norm::AdaLayerNormContinuous;
use super::rope::{image_ids, text_ids, Rope};
use crate::config::{parse_config, read_text};
use crate::error::{ModelError, Result as ModelResult};
use crate::observer::AttentionObserver;

fn d_one() -> usize {
    1
}
fn d_in() -> usize {
    64
}
fn d_layers() -> usize {
    19
}
fn d_single() -> usize {
    38
}
fn d_head_dim() -> usize {
    128
}
fn d_heads() -> usize {
    24
}
fn d_joint() -> usize {
    4096
}
fn d_pooled() -> usize {
    768
}
fn d_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

/// `transformer/config.json`; missing fields take diffusers' defaults (FLUX.1's sizes).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct FluxConfig {
    #[serde(default = "d_one")]
    pub patch_size: usize,
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_single")]
    pub num_single_layers: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_joint")]
    pub joint_attention_dim: usize,
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<usize>,
}

impl FluxConfig {
    /// The published FLUX.1-dev transformer (guidance-distilled).
    pub fn flux1_dev() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: d_axes(),
        }
    }

    /// The published FLUX.1-schnell transformer (no guidance embedding).
    pub fn flux1_schnell() -> Self {
        Self {
            guidance_embeds: false,
            ..Self::flux1_dev()
        }
    }

    pub fn from_file(path: &Path) -> ModelResult<Self> {
        Self::from_json(&read_text(path)?, path)
    }

    /// Parses and checks the config's text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> ModelResult<Self> {
        let cfg: Self = parse_config(text, path, "a FluxTransformer2DModel config")?;
        cfg.validate()
            .map_err(|(field, value, supported)| ModelError::Unsupported {
                path: path.to_path_buf(),
                field: field.into(),
                value,
                supported,
            })?;
        Ok(cfg)
    }

    /// (field, value, what is supported) of the first unusable setting.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String, String)> {
        if self.patch_size != 1 {
            return Err((
                "patch_size",
                self.patch_size.to_string(),
                "1 (latents are packed into 2×2 patches outside the model)".into(),
            ));
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.attention_head_dim || self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err((
                "axes_dims_rope",
                format!("{:?}", self.axes_dims_rope),
                format!(
                    "even sizes summing to attention_head_dim {}",
                    self.attention_head_dim
                ),
            ));
        }
        if !self.in_channels.is_multiple_of(4) {
            return Err((
                "in_channels",
                self.in_channels.to_string(),
                "4 × the VAE's latent channels".into(),
            ));
        }
        Ok(())
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

/// One transformer evaluation's inputs.
#[derive(Clone, Copy, Debug)]
pub struct FluxInputs<'a> {
    /// Packed latents (batch, h·w, in_channels), row-major over the grid.
    pub latents: &'a Tensor,
    /// The packed grid (h, w).
    pub grid: (usize, usize),
    /// T5 hidden states (batch, text tokens, joint_attention_dim).
    pub text: &'a Tensor,
    /// CLIP pooled output (batch, pooled_projection_dim).
    pub pooled: &'a Tensor,
    /// σ in [0, 1] per sample (batch,): the scheduler timestep / 1000, as FluxPipeline passes it.
    pub timestep: &'a Tensor,
    /// Guidance scale per sample (batch,): required by guidance-distilled models (dev), refused
    /// by the others (schnell).
    pub guidance: Option<&'a Tensor>,
}

pub struct FluxTransformer2DModel {
    x_embedder: Linear,
    context_embedder: Linear,
    time_text_embed: TimeTextEmbed,
    transformer_blocks: Vec<DoubleStreamBlock>,
    single_transformer_blocks: Vec<SingleStreamBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
    config: FluxConfig,
    checkpointing: bool,
}

impl FluxTransformer2DModel {
    pub fn new(cfg: &FluxConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(|(f, v, s)| {
            candle_core::Error::Msg(format!("FLUX config: {f} = {v}, expected {s}"))
        })?;
        let dim = cfg.inner_dim();
        let (heads, hd) = (cfg.num_attention_heads, cfg.attention_head_dim);
        Ok(Self {
            x_embedder: crate::nn::linear(cfg.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: crate::nn::linear(
                cfg.joint_attention_dim,
                dim,
                vb.pp("context_embedder"),
            )?,
            time_text_embed: TimeTextEmbed::new(
                dim,
                cfg.pooled_projection_dim,
                cfg.guidance_embeds,
                vb.pp("time_text_embed"),
            )?,
            transformer_blocks: (0..cfg.num_layers)
                .map(|i| DoubleStreamBlock::new(dim, heads, hd, vb.pp("transformer_blocks").pp(i)))
                .collect::<Result<_>>()?,
            single_transformer_blocks: (0..cfg.num_single_layers)
                .map(|i| {
                    SingleStreamBlock::new(dim, heads, hd, vb.pp("single_transformer_blocks").pp(i))
                })
                .collect::<Result<_>>()?,
            norm_out: AdaLayerNormContinuous::new(dim, dim, vb.pp("norm_out"))?,
            proj_out: crate::nn::linear(
                dim,
                cfg.patch_size * cfg.patch_size * cfg.out_channels(),
                vb.pp("proj_out"),
            )?,
            config: cfg.clone(),
            checkpointing: false,
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// With checkpointing on, a forward pass on tracked latents keeps no block's intermediates:
    /// each block is recomputed during the backward pass (see `checkpoint.rs`). Values and
    /// gradients with respect to the latents are unchanged; weights get no gradients.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// The predicted velocity (batch, h·w, out_channels). Every double block
    /// (`transformer_blocks.{i}.attn`) and single block (`single_transformer_blocks.{i}.attn`)
    /// offers the observer its text-only image→text probabilities (batch, heads, h·w, tokens).
    pub fn forward(
        &self,
        inputs: &FluxInputs<'_>,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let (b, n, c) = inputs.latents.dims3()?;
        let (gh, gw) = inputs.grid;
        if n != gh * gw || c != self.config.in_channels {
            candle_core::bail!(
                "FLUX transformer: latents of shape ({b}, {n}, {c}), expected (batch, {gh}·{gw}, {}) packed latents",
                self.config.in_channels
            );
        }
        let (tb, t, tc) = inputs.text.dims3()?;
        if tb != b || tc != self.config.joint_attention_dim {
            candle_core::bail!(
                "FLUX transformer: text states of shape ({tb}, {t}, {tc}), expected ({b}, tokens, {})",
                self.config.joint_attention_dim
            );
        }
        let dev = inputs.latents.device();
        let ids = Tensor::cat(&[text_ids(t, dev)?, image_ids(gh, gw, dev)?], 0)?;
        let rope = Rope::new(&ids, &self.config.axes_dims_rope, 10000.0)?;
        let layout = JointLayout {
            text_tokens: t,
            grid: inputs.grid,
        };

        let temb = self
            .time_text_embed
            .forward(inputs.timestep, inputs.guidance, inputs.pooled)?;
        let mut image = self.x_embedder.forward(inputs.latents)?;
        let mut text = self.context_embedder.forward(inputs.text)?;
        if self.checkpointing && crate::nn::tracked(&[inputs.latents]) {
            // Both block kinds run on the joint [text; image] sequence, one op per block.
            let mut joint = Tensor::cat(&[text, image], 1)?;
            let doubles = self
                .transformer_blocks
                .iter()
                .map(|b| Block::Double(b.clone()));
            let singles = self
                .single_transformer_blocks
                .iter()
                .map(|b| Block::Single(b.clone()));
            for block in doubles.chain(singles) {
                joint = checkpoint::forward(&block, &joint, &temb, &rope, layout, observer)?;
            }
            return self.head(&joint, t, n, &temb);
        }
        for block in &self.transformer_blocks {
            (text, image) = block.forward(&image, &text, &temb, &rope, layout, observer)?;
        }
        let mut joint = Tensor::cat(&[text, image], 1)?;
        for block in &self.single_transformer_blocks {
            joint = block.forward(&joint, &temb, &rope, layout, observer)?;
        }
        self.head(&joint, t, n, &temb)
    }

    /// The image tokens of the final sequence → velocity.
    fn head(&self, joint: &Tensor, t: usize, n: usize, temb: &Tensor) -> Result<Tensor> {
        let image = joint.narrow(1, t, n)?;
        self.proj_out.forward(&self.norm_out.forward(&image, temb)?)
    }
}
