//! `AutoencoderKL`: images ↔ latents. Encoding gives a diagonal Gaussian (mean, log-variance);
//! `scaling_factor` (and FLUX's `shift_factor`) map it to the diffusion model's latent scale.

use std::path::Path;

use crate::nn::GroupNorm;
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::conv::Conv2d;
use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Deserialize;

use crate::attention::{Attention, AttentionConfig};
use crate::config::{parse_config, read_text};
use crate::error::{ModelError, Result as ModelResult};
use crate::nn::{conv2d, group_norm};
use crate::observer::NoObserver;
use crate::resnet::{Downsample, ResnetBlock, ResnetConfig, Upsample};

fn d_three() -> usize {
    3
}
fn d_four() -> usize {
    4
}
fn d_blocks() -> Vec<usize> {
    vec![64]
}
fn d_one() -> usize {
    1
}
fn d_groups() -> usize {
    32
}
fn d_scale() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}

#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_blocks")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        Self::from_json(&read_text(path)?, path)
    }

    /// Parses and checks the config's text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> ModelResult<Self> {
        let cfg: Self = parse_config(text, path, "an AutoencoderKL config")?;
        let unsupported = |field: &str, value: String, supported: &str| ModelError::Unsupported {
            path: path.to_path_buf(),
            field: field.into(),
            value,
            supported: supported.into(),
        };
        let n = cfg.block_out_channels.len();
        if n == 0 {
            return Err(unsupported(
                "block_out_channels",
                "[]".into(),
                "at least one block",
            ));
        }
        for t in &cfg.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(unsupported(
                    "down_block_types",
                    t.clone(),
                    "DownEncoderBlock2D",
                ));
            }
        }
        for t in &cfg.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(unsupported("up_block_types", t.clone(), "UpDecoderBlock2D"));
            }
        }
        if (!cfg.down_block_types.is_empty() && cfg.down_block_types.len() != n)
            || (!cfg.up_block_types.is_empty() && cfg.up_block_types.len() != n)
        {
            return Err(unsupported(
                "down_block_types/up_block_types",
                "wrong length".into(),
                "one per block_out_channels",
            ));
        }
        if cfg.act_fn != "silu" {
            return Err(unsupported("act_fn", cfg.act_fn.clone(), "silu"));
        }
        if cfg.norm_num_groups == 0 {
            return Err(unsupported(
                "norm_num_groups",
                "0".into(),
                "at least 1 group, dividing every block_out_channels entry",
            ));
        }
        if !cfg.scaling_factor.is_finite() || cfg.scaling_factor <= 0.0 {
            return Err(unsupported(
                "scaling_factor",
                cfg.scaling_factor.to_string(),
                "a finite number > 0 (SD 1/2: 0.18215, FLUX: 0.3611)",
            ));
        }
        if let Some(shift) = cfg.shift_factor.filter(|s| !s.is_finite()) {
            return Err(unsupported(
                "shift_factor",
                shift.to_string(),
                "a finite number",
            ));
        }
        if cfg.latent_channels == 0 || cfg.in_channels == 0 || cfg.out_channels == 0 {
            return Err(unsupported(
                "latent_channels/in_channels/out_channels",
                format!(
                    "{}/{}/{}",
                    cfg.latent_channels, cfg.in_channels, cfg.out_channels
                ),
                "at least 1 each",
            ));
        }
        if let Some(c) = cfg
            .block_out_channels
            .iter()
            .find(|c| *c % cfg.norm_num_groups != 0)
        {
            return Err(unsupported(
                "norm_num_groups",
                cfg.norm_num_groups.to_string(),
                &format!("a divisor of {c}"),
            ));
        }
        Ok(cfg)
    }

    /// Pixels per latent cell along each side.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Resnet → single-head self-attention → resnet, at the bottleneck.
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<(GroupNorm, Attention)>,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn new(channels: usize, groups: usize, add_attention: bool, vb: VarBuilder) -> Result<Self> {
        let rc = ResnetConfig {
            in_channels: channels,
            out_channels: channels,
            temb_channels: None,
            groups,
            eps: 1e-6,
        };
        let attention = if add_attention {
            let avb = vb.pp("attentions").pp(0);
            let cfg = AttentionConfig {
                query_dim: channels,
                context_dim: None,
                heads: 1,
                head_dim: channels,
                qkv_bias: true,
                upcast: true,
                observed: false,
            };
            Some((
                group_norm(groups, channels, 1e-6, avb.pp("group_norm"))?,
                Attention::new(&cfg, avb)?,
            ))
        } else {
            None
        };
        Ok(Self {
            resnet_in: ResnetBlock::new(rc, vb.pp("resnets").pp(0))?,
            attention,
            resnet_out: ResnetBlock::new(rc, vb.pp("resnets").pp(1))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet_in.forward(xs, None)?;
        if let Some((norm, attn)) = &self.attention {
            let (b, c, hh, ww) = h.dims4()?;
            let tokens = norm
                .forward(&h)?
                .reshape((b, c, hh * ww))?
                .transpose(1, 2)?;
            let out = attn.forward(&tokens, None, (hh, ww), &mut NoObserver)?;
            let out = out.transpose(1, 2)?.reshape((b, c, hh, ww))?;
            h = (out + h)?;
        }
        self.resnet_out.forward(&h, None)
    }
}

struct Stage {
    resnets: Vec<ResnetBlock>,
    down: Option<Downsample>,
    up: Option<Upsample>,
}

impl Stage {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        if let Some(d) = &self.down {
            h = d.forward(&h)?;
        }
        if let Some(u) = &self.up {
            h = u.forward(&h, None)?;
        }
        Ok(h)
    }
}

fn resnets(
    n: usize,
    cin: usize,
    cout: usize,
    groups: usize,
    vb: VarBuilder,
) -> Result<Vec<ResnetBlock>> {
    (0..n)
        .map(|i| {
            let rc = ResnetConfig {
                in_channels: if i == 0 { cin } else { cout },
                out_channels: cout,
                temb_channels: None,
                groups,
                eps: 1e-6,
            };
            ResnetBlock::new(rc, vb.pp("resnets").pp(i))
        })
        .collect()
}

struct Encoder {
    conv_in: Conv2d,
    stages: Vec<Stage>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut stages = Vec::new();
        let mut prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let bvb = vb.pp("down_blocks").pp(i);
            let down = if i + 1 < ch.len() {
                Some(Downsample::new(c, 0, bvb.pp("downsamplers").pp(0))?)
            } else {
                None
            };
            stages.push(Stage {
                resnets: resnets(cfg.layers_per_block, prev, c, g, bvb)?,
                down,
                up: None,
            });
            prev = c;
        }
        let last = *ch.last().unwrap_or(&ch[0]);
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            stages,
            mid: MidBlock::new(last, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            norm_out: group_norm(g, last, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(last, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        for s in &self.stages {
            h = s.forward(&h)?;
        }
        let h = self.mid.forward(&h)?;
        self.conv_out
            .forward(&crate::ops::silu::silu(&self.norm_out.forward(&h)?)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    stages: Vec<Stage>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut stages = Vec::new();
        let mut prev = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let bvb = vb.pp("up_blocks").pp(i);
            let up = if i + 1 < rev.len() {
                Some(Upsample::new(c, bvb.pp("upsamplers").pp(0))?)
            } else {
                None
            };
            stages.push(Stage {
                resnets: resnets(cfg.layers_per_block + 1, prev, c, g, bvb)?,
                down: None,
                up,
            });
            prev = c;
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, rev[0], 3, 1, 1, vb.pp("conv_in"))?,
            mid: MidBlock::new(rev[0], g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            stages,
            norm_out: group_norm(g, first, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(first, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for s in &self.stages {
            h = s.forward(&h)?;
        }
        self.conv_out
            .forward(&crate::ops::silu::silu(&self.norm_out.forward(&h)?)?)
    }
}

/// The encoder's output distribution per latent cell.
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// mean + σ·ε with ε drawn from a seeded generator (reproducible across runs and machines).
    pub fn sample(&self, seed: u64) -> Result<Tensor> {
        let noise = seeded_normal(self.mean.dims(), seed, self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        let std = (&self.logvar * 0.5)?.exp()?;
        self.mean.add(&std.mul(&noise)?)
    }
}

/// Standard-normal noise of the given shape from a seeded ChaCha generator.
pub fn seeded_normal(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let normal = rand_distr::StandardNormal;
    let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Tensor::from_vec(data, shape, device)
}

/// How to turn the encoder's distribution into a latent.
#[derive(Clone, Copy, Debug)]
pub enum LatentDraw {
    Mean,
    Sample { seed: u64 },
}

pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl AutoencoderKL {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv: if cfg.use_quant_conv {
                Some(conv2d(2 * l, 2 * l, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `images`: (batch, 3, H, W) in [-1, 1], H and W multiples of the downsampling factor.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let (_, c, h, w) = images.dims4()?;
        let f = self.config.downsample_factor();
        if c != self.config.in_channels || h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "VAE encode: image of {c} channels, {h}×{w}; expected {} channels and sides that are multiples of {f}",
                self.config.in_channels
            );
        }
        let mut moments = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok(DiagonalGaussian { mean, logvar })
    }

    /// Raw latent → image in roughly [-1, 1] (no scaling applied).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Image → latent at the diffusion model's scale: (draw − shift) · scale.
    pub fn encode_latents(&self, images: &Tensor, draw: LatentDraw) -> Result<Tensor> {
        let dist = self.encode(images)?;
        let z = match draw {
            LatentDraw::Mean => dist.mean,
            LatentDraw::Sample { seed } => dist.sample(seed)?,
        };
        let shift = self.config.shift_factor.unwrap_or(0.0);
        (z - shift)? * self.config.scaling_factor
    }

    /// Latent at the diffusion model's scale → image in roughly [-1, 1].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        let z = ((latents / self.config.scaling_factor)? + shift)?;
        self.decode(&z)
    }
}

/// The image ↔ latent map of a pipeline: a learned `AutoencoderKL` or an exact space-to-depth.
// One value per loaded model: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Autoencoder {
    Kl(AutoencoderKL),
    SpaceToDepth(crate::space_to_depth::SpaceToDepth),
}

impl Autoencoder {
    /// Image in [-1, 1] → latent at the diffusion model's scale. `draw` only matters for the KL VAE.
    pub fn encode_latents(&self, images: &Tensor, draw: LatentDraw) -> Result<Tensor> {
        match self {
            Self::Kl(v) => v.encode_latents(images, draw),
            Self::SpaceToDepth(s) => s.encode_latents(images),
        }
    }

    /// Latent at the diffusion model's scale → image in roughly [-1, 1].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        match self {
            Self::Kl(v) => v.decode_latents(latents),
            Self::SpaceToDepth(s) => s.decode_latents(latents),
        }
    }

    /// Pixels per latent cell along each side.
    pub fn downsample_factor(&self) -> usize {
        match self {
            Self::Kl(v) => v.config().downsample_factor(),
            Self::SpaceToDepth(s) => s.config().factor,
        }
    }

    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(v) => v.config().latent_channels,
            Self::SpaceToDepth(s) => s.latent_channels(),
        }
    }

    pub fn image_channels(&self) -> usize {
        match self {
            Self::Kl(v) => v.config().in_channels,
            Self::SpaceToDepth(s) => s.config().in_channels,
        }
    }

    /// The learned VAE, if this is one.
    pub fn kl(&self) -> Option<&AutoencoderKL> {
        match self {
            Self::Kl(v) => Some(v),
            Self::SpaceToDepth(_) => None,
        }
    }
}
