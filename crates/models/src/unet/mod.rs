//! `UNet2DConditionModel` as configured by diffusers' `unet/config.json`: SD1.x (conv projections,
//! 8 heads everywhere) and SD2.x (per-block heads, linear projections, upcast attention).

mod blocks;
mod transformer;

use std::path::Path;

use crate::nn::{GroupNorm, Linear};
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::conv::Conv2d;
use serde::Deserialize;

pub use blocks::CrossAttention;
use blocks::{BlockContext, DownBlock, MidBlock, UpBlock, UpChannels};

use crate::config::{parse_config, read_text, OneOrMany};
use crate::error::{ModelError, Result as ModelResult};
use crate::nn::{conv2d, group_norm};
use crate::observer::{AttentionObserver, NoObserver};

fn d_channels() -> usize {
    4
}
fn d_blocks() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_layers() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_heads() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_cross() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_one() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_pad() -> usize {
    1
}
fn d_act() -> String {
    "silu".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_kernel() -> usize {
    3
}

/// The fields of diffusers' `UNet2DConditionModel` config that this implementation reads.
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_channels")]
    pub out_channels: usize,
    #[serde(default = "d_blocks")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_layers")]
    pub layers_per_block: OneOrMany<usize>,
    /// In diffusers' SD configs this field is really the number of heads (a historic misnomer).
    #[serde(default = "d_heads")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "d_one")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_pad")]
    pub downsample_padding: usize,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub only_cross_attention: Option<OneOrMany<bool>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
}

/// Resolved per-block layout.
#[derive(Clone, Debug)]
struct Layout {
    heads: Vec<usize>,
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    context_dim: usize,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        Self::from_json(&read_text(path)?, path)
    }

    /// Parses and checks the config's text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> ModelResult<Self> {
        let cfg: Self = parse_config(text, path, "a UNet2DConditionModel config")?;
        cfg.layout()
            .map_err(|(field, value, supported)| ModelError::Unsupported {
                path: path.to_path_buf(),
                field,
                value,
                supported,
            })?;
        Ok(cfg)
    }

    /// Checks everything this implementation supports and resolves per-block values.
    /// Errors are (field, value, what is supported).
    fn layout(&self) -> std::result::Result<Layout, (String, String, String)> {
        let n = self.block_out_channels.len();
        let bad = |field: &str, value: String, supported: &str| {
            Err((field.to_string(), value, supported.to_string()))
        };
        if n == 0 {
            return bad("block_out_channels", "[]".into(), "at least one block");
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| *c == 0 || c % self.norm_num_groups != 0)
        {
            return bad(
                "norm_num_groups",
                self.norm_num_groups.to_string(),
                &format!(
                    "at least 1 group, dividing every block_out_channels entry {:?}",
                    self.block_out_channels
                ),
            );
        }
        if !self.norm_eps.is_finite() || self.norm_eps <= 0.0 {
            return bad(
                "norm_eps",
                self.norm_eps.to_string(),
                "a finite number > 0 (diffusers: 1e-5)",
            );
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(
                "down_block_types/up_block_types",
                format!(
                    "{} and {} entries",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
                &format!("{n} entries each, one per block_out_channels"),
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(
                    "down_block_types",
                    t.clone(),
                    "CrossAttnDownBlock2D, DownBlock2D",
                );
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad("up_block_types", t.clone(), "CrossAttnUpBlock2D, UpBlock2D");
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => {
                return bad(
                    "mid_block_type",
                    format!("{other:?}"),
                    "UNetMidBlock2DCrossAttn",
                )
            }
        }
        let checks: [(&str, bool, String, &str); 9] = [
            ("act_fn", self.act_fn == "silu", self.act_fn.clone(), "silu"),
            (
                "time_embedding_type",
                self.time_embedding_type == "positional",
                self.time_embedding_type.clone(),
                "positional",
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
                self.resnet_time_scale_shift.clone(),
                "default",
            ),
            (
                "dual_cross_attention",
                !self.dual_cross_attention,
                "true".into(),
                "false",
            ),
            (
                "class_embed_type",
                self.class_embed_type.is_none() && self.num_class_embeds.is_none(),
                format!("{:?}", self.class_embed_type),
                "none",
            ),
            (
                "addition_embed_type",
                self.addition_embed_type.is_none(),
                format!("{:?}", self.addition_embed_type),
                "none",
            ),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.is_none() && self.encoder_hid_dim.is_none(),
                format!("{:?}", self.time_cond_proj_dim),
                "none",
            ),
            (
                "conv_in_kernel/conv_out_kernel",
                self.conv_in_kernel == 3 && self.conv_out_kernel == 3,
                format!("{}/{}", self.conv_in_kernel, self.conv_out_kernel),
                "3/3",
            ),
            (
                "only_cross_attention",
                !matches!(&self.only_cross_attention, Some(OneOrMany::One(true)))
                    && !matches!(&self.only_cross_attention, Some(OneOrMany::Many(v)) if v.iter().any(|&b| b)),
                format!("{:?}", self.only_cross_attention),
                "false",
            ),
        ];
        for (field, ok, value, supported) in checks {
            if !ok {
                return bad(field, value, supported);
            }
        }
        let heads_src = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        let per = |field: &str,
                   v: &OneOrMany<usize>|
         -> std::result::Result<Vec<usize>, (String, String, String)> {
            v.per_block(n).ok_or_else(|| {
                (
                    field.to_string(),
                    format!("{v:?}"),
                    format!("one value or {n} values"),
                )
            })
        };
        let heads = per("attention_head_dim", heads_src)?;
        let layers = per("layers_per_block", &self.layers_per_block)?;
        let transformer_layers = per(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
        )?;
        let context_dim = match &self.cross_attention_dim {
            OneOrMany::One(d) => *d,
            OneOrMany::Many(v) if !v.is_empty() && v.iter().all(|d| *d == v[0]) => v[0],
            other => {
                return bad(
                    "cross_attention_dim",
                    format!("{other:?}"),
                    "one value for all blocks",
                )
            }
        };
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return bad(
                    "attention_head_dim",
                    format!("{h} heads for block {i}"),
                    &format!("a divisor of {c}"),
                );
            }
            if c % self.norm_num_groups != 0 {
                return bad(
                    "norm_num_groups",
                    self.norm_num_groups.to_string(),
                    &format!("a divisor of {c}"),
                );
            }
        }
        Ok(Layout {
            heads,
            layers,
            transformer_layers,
            context_dim,
        })
    }
}

/// Sinusoidal timestep features as diffusers' `Timesteps` computes them, one row per timestep.
fn timestep_features(
    ts: &[f64],
    dim: usize,
    flip: bool,
    shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let mut feats = vec![0f32; dim * ts.len()];
    for (row, &t) in ts.iter().enumerate() {
        let out = &mut feats[row * dim..(row + 1) * dim];
        for i in 0..half {
            let freq = (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32;
            let arg = t as f32 * freq;
            let (first, second) = if flip {
                (arg.cos(), arg.sin())
            } else {
                (arg.sin(), arg.cos())
            };
            out[i] = first;
            out[half + i] = second;
        }
    }
    Tensor::from_vec(feats, (ts.len(), dim), device)
}

pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet2DConditionModel {
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let layout = config.layout().map_err(|(field, value, supported)| {
            candle_core::Error::Msg(format!(
                "UNet config: unsupported {field} `{value}` (supported: {supported})"
            ))
        })?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let ctx = BlockContext {
            temb_channels: temb,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            context_dim: layout.context_dim,
            linear_projection: config.use_linear_projection,
            upcast_attention: config.upcast_attention,
            downsample_padding: config.downsample_padding,
        };
        let cross = |i: usize, is_cross: bool| {
            is_cross.then_some(CrossAttention {
                heads: layout.heads[i],
                transformer_layers: layout.transformer_layers[i],
            })
        };

        let conv_in = conv2d(config.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?;
        let time_linear_1 = crate::nn::linear(ch[0], temb, vb.pp("time_embedding").pp("linear_1"))?;
        let time_linear_2 = crate::nn::linear(temb, temb, vb.pp("time_embedding").pp("linear_2"))?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut prev = ch[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let is_cross = kind == "CrossAttnDownBlock2D";
            let block = DownBlock::new(
                &ctx,
                prev,
                ch[i],
                layout.layers[i],
                cross(i, is_cross),
                i + 1 < n,
                vb.pp("down_blocks").pp(i),
            )?;
            down_blocks.push(block);
            prev = ch[i];
        }

        let mid_cross = CrossAttention {
            heads: layout.heads[n - 1],
            transformer_layers: layout.transformer_layers[n - 1],
        };
        let mid_block = MidBlock::new(&ctx, ch[n - 1], mid_cross, vb.pp("mid_block"))?;

        let rev_ch: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layout.layers.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = rev_ch[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let is_cross = kind == "CrossAttnUpBlock2D";
            let out = rev_ch[i];
            let skip_in = rev_ch[(i + 1).min(n - 1)];
            let block = UpBlock::new(
                &ctx,
                UpChannels {
                    prev_out,
                    skip_in,
                    out,
                },
                rev_layers[i] + 1,
                cross(n - 1 - i, is_cross),
                i + 1 < n,
                vb.pp("up_blocks").pp(i),
            )?;
            up_blocks.push(block);
            prev_out = out;
        }

        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                config.norm_num_groups,
                ch[0],
                config.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(ch[0], config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The spatial downsampling factor of the deepest block: latent sides must be multiples of it.
    pub fn size_multiple(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Predicts noise (or v, or x0 — whatever the model was trained for) without observation.
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        self.forward_observed(sample, timestep, context, &mut NoObserver)
    }

    /// `sample`: (batch, in_channels, h, w); `context`: (batch, tokens, cross_attention_dim).
    /// Every cross-attention layer reports to `observer`.
    pub fn forward_observed(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        self.forward_timesteps(sample, &vec![timestep; b], context, observer)
    }

    /// Like [`Self::forward_observed`] with one timestep per batch row (training).
    pub fn forward_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        observer: &mut dyn AttentionObserver,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        if timesteps.len() != b {
            candle_core::bail!("UNet: {} timesteps for a batch of {b}", timesteps.len());
        }
        let m = self.size_multiple();
        if h % m != 0 || w % m != 0 {
            candle_core::bail!("UNet: latent size {h}×{w} must be a multiple of {m}");
        }
        if context.dim(0)? != b {
            candle_core::bail!(
                "UNet: {} conditioning rows for a batch of {b}",
                context.dim(0)?
            );
        }
        let dtype = sample.dtype();
        let feats = timestep_features(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            sample.device(),
        )?
        .to_dtype(dtype)?;
        let temb = self.time_linear_2.forward(&crate::ops::silu::silu(
            &self.time_linear_1.forward(&feats)?,
        )?)?;

        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&h, &temb, context, observer)?;
            h = out;
            skips.extend(block_skips);
        }
        h = self.mid_block.forward(&h, &temb, context, observer)?;
        let last = self.up_blocks.len() - 1;
        for (i, block) in self.up_blocks.iter().enumerate() {
            // Upsample to the spatial size of the skip the next block starts from (odd sizes).
            let upsample_size = if i < last {
                let next = skips.len().checked_sub(block.layers() + 1);
                next.and_then(|k| skips.get(k))
                    .map(|s| (s.dim(2).unwrap_or(0), s.dim(3).unwrap_or(0)))
            } else {
                None
            };
            h = block.forward(&h, &mut skips, &temb, context, upsample_size, observer)?;
        }
        let h = crate::ops::silu::silu(&self.conv_norm_out.forward(&h)?)?;
        let out = self.conv_out.forward(&h)?;
        Ok(out)
    }
}
