//! The relation classifier: reads the spatial relation between two objects from their
//! cross-attention maps.
//!
//! Input: maps `(B, 2, C, S, S)` — for each sample the C maps (layers × heads) of the subject
//! word and of the object word, each S×S map summing to 1 — and a step input `(B)`. Output:
//! logits `(B, classes)`.
//!
//! The default [`Architecture`] ([`Architecture::authors`]) computes the published classifier
//! of Learn-to-Steer, and reads its PyTorch state-dict names:
//!
//! ```text
//! per object (weights shared by both):
//!   maps (C, S·S) → Linear → d  + sinusoidal position over the C maps
//!   L × [ + step embedding; x + Attn(LN x); x + FF(LN x) ]          (ReLU feed-forward)
//!   learned query attends over the C tokens → Linear d → S·S (one map per object)
//! relation head:
//!   concat (2·S·S) → Linear → d  + position 0 → L' × [x + Attn(LN x); x + FF(LN x)]
//!   concat step embedding (16) → Linear 272→256 → LN → LeakyReLU(0.1) → Dropout
//!                              → Linear 256→128 → LN → LeakyReLU(0.1) → Dropout → Linear → classes
//! ```
//!
//! The step input is the raw denoising step index (an embedding row per step of the schedule).
//!
//! [`Architecture::legacy`] is the variant `l2s train` has written so far (and still trains by
//! default): maps multiplied by S·S on entry (a map summing to 1 has mean 1), GELU feed-forward,
//! a LayerNorm after each encoder stack, each object encoded as a d-vector, no position on the
//! relation token, and the step input is the position of the step in the checkpoint's list of
//! recorded steps. Each of these is a separate option of [`Architecture`].
//!
//! Every operation has a backward pass, so the classifier's loss can be differentiated with
//! respect to its input maps (steering backpropagates through it to the latent). Softmax and
//! LayerNorm go through [`l2s_models::nn`], which uses candle's fused kernels (no backward) only
//! when no tensor involved is tracked by autograd.

use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Init, Linear, VarBuilder};

use crate::seeded::{Dropout, MaskRng};
use l2s_models::nn::{softmax_last_dim, LayerNorm};
use serde::{Deserialize, Serialize};

const LN_EPS: f64 = 1e-5;

/// Sizes of one pre-norm Transformer encoder stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub layers: usize,
    pub heads: usize,
    /// Hidden width of the feed-forward block.
    pub ff: usize,
    /// Dropout on the attention and feed-forward outputs (training only).
    pub dropout: f32,
}

/// Which published configuration a classifier follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Stable Diffusion 1.x / 2.x sizes.
    Sd,
    /// FLUX sizes.
    Flux,
}

impl Preset {
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sd" | "sd1" | "sd2" | "stable-diffusion" | "shapes" => Some(Self::Sd),
            "flux" => Some(Self::Flux),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sd => "sd",
            Self::Flux => "flux",
        }
    }
}

/// The classifier's shape. Serialised into checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    /// C: maps per object word (layers × heads).
    pub num_maps: usize,
    /// S: side of each map.
    pub map_size: usize,
    /// Number of step indices the step embeddings cover.
    pub num_steps: usize,
    /// Number of relation classes.
    pub classes: usize,
    /// Token width d of both encoders.
    pub d_model: usize,
    /// The per-object encoder.
    pub object: EncoderConfig,
    /// The encoder of the relation head (on one token).
    pub head: EncoderConfig,
    /// Width of the step embedding concatenated before the MLP.
    pub step_dim: usize,
    /// Hidden widths of the final MLP.
    pub mlp_hidden: Vec<usize>,
    /// Dropout inside the final MLP (training only).
    pub mlp_dropout: f32,
    /// Negative slope of the MLP's LeakyReLU.
    pub leaky_slope: f64,
}

impl ClassifierConfig {
    /// Stable Diffusion sizes: object encoder 2 layers, 2 heads, FF 128; head 2 layers, 4 heads,
    /// FF 128; d = 256.
    pub fn sd(num_maps: usize, num_steps: usize, classes: usize) -> Self {
        Self {
            num_maps,
            map_size: 16,
            num_steps,
            classes,
            d_model: 256,
            object: EncoderConfig {
                layers: 2,
                heads: 2,
                ff: 128,
                dropout: 0.3,
            },
            head: EncoderConfig {
                layers: 2,
                heads: 4,
                ff: 128,
                dropout: 0.3,
            },
            step_dim: 16,
            mlp_hidden: vec![256, 128],
            mlp_dropout: 0.3,
            leaky_slope: 0.1,
        }
    }

    /// FLUX sizes: object encoder 4 layers, 4 heads, FF 512; head 4 layers, 8 heads, FF 512.
    pub fn flux(num_maps: usize, num_steps: usize, classes: usize) -> Self {
        Self {
            object: EncoderConfig {
                layers: 4,
                heads: 4,
                ff: 512,
                dropout: 0.3,
            },
            head: EncoderConfig {
                layers: 4,
                heads: 8,
                ff: 512,
                dropout: 0.3,
            },
            ..Self::sd(num_maps, num_steps, classes)
        }
    }

    /// The sizes of a preset.
    pub fn preset(preset: Preset, num_maps: usize, num_steps: usize, classes: usize) -> Self {
        match preset {
            Preset::Sd => Self::sd(num_maps, num_steps, classes),
            Preset::Flux => Self::flux(num_maps, num_steps, classes),
        }
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("num_maps", self.num_maps),
            ("map_size", self.map_size),
            ("num_steps", self.num_steps),
            ("classes", self.classes),
            ("d_model", self.d_model),
            ("object.heads", self.object.heads),
            ("object.ff", self.object.ff),
            ("head.heads", self.head.heads),
            ("head.ff", self.head.ff),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("classifier config: {name} must be positive")
            }
        }
        for (name, enc) in [("object", &self.object), ("head", &self.head)] {
            if !self.d_model.is_multiple_of(enc.heads) {
                bail!(
                    "classifier config: d_model {} is not divisible by {name}.heads {}",
                    self.d_model,
                    enc.heads
                )
            }
            if !(0.0..1.0).contains(&enc.dropout) {
                bail!(
                    "classifier config: {name}.dropout {} is not in [0, 1)",
                    enc.dropout
                )
            }
        }
        if !(0.0..1.0).contains(&self.mlp_dropout) {
            bail!(
                "classifier config: mlp_dropout {} is not in [0, 1)",
                self.mlp_dropout
            )
        }
        Ok(())
    }
}

/// Weight names and module layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightLayout {
    /// The published PyTorch module: `object_extractor.*` and `relation_classifier.*` names,
    /// packed attention projections (`in_proj_weight`), each object encoded as one S×S map,
    /// position tables read from the weights (`positional_encoding.pe`) when they hold them,
    /// dropout on attention weights and none on the input tokens.
    Torch,
    /// This crate's first layout: `object.*` and `head.*` names, separate q/k/v projections,
    /// each object encoded as a d-vector, position tables computed, dropout on the input tokens.
    L2s,
}

/// The activation of the encoders' feed-forward blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedForwardActivation {
    Relu,
    /// Exact (erf) GELU.
    Gelu,
}

/// What the classifier's step input means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepInput {
    /// The denoising step index itself; the step embeddings have a row per step of the
    /// schedule (`num_steps` is the schedule's length).
    Raw,
    /// The position of the step in the checkpoint's list of recorded steps (`num_steps` is the
    /// length of that list).
    Slot,
}

/// Where the step embedding enters the per-object encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepInjection {
    /// Added before every layer (the published "mid" mode).
    EveryLayer,
    /// Added once, before the first layer ("pre").
    Input,
    /// No step embedding in the per-object encoder.
    Off,
}

/// How the classifier computes, beyond its sizes ([`ClassifierConfig`]). Recorded in a
/// checkpoint's `classifier.json` as `config.architecture`; a checkpoint without it is
/// [`Architecture::legacy`], and so is every field it lacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default = "Architecture::legacy")]
pub struct Architecture {
    pub layout: WeightLayout,
    /// Multiply the maps by S·S on entry (a map summing to 1 then has mean 1).
    pub scale_maps: bool,
    /// A LayerNorm after each encoder stack.
    pub final_norm: bool,
    pub activation: FeedForwardActivation,
    pub step_input: StepInput,
    pub object_step: StepInjection,
    /// Add position 0 of the sinusoidal table to the relation head's token.
    pub relation_position: bool,
    /// Heads of the attention that pools the C tokens; `None`: the object encoder's heads.
    pub pool_heads: Option<usize>,
}

impl Default for Architecture {
    fn default() -> Self {
        Self::authors()
    }
}

impl Architecture {
    /// The published classifier.
    pub fn authors() -> Self {
        Self {
            layout: WeightLayout::Torch,
            scale_maps: false,
            final_norm: false,
            activation: FeedForwardActivation::Relu,
            step_input: StepInput::Raw,
            object_step: StepInjection::EveryLayer,
            relation_position: true,
            pool_heads: None,
        }
    }

    /// The variant `l2s train` writes by default (and every checkpoint written before the
    /// architecture was recorded).
    pub fn legacy() -> Self {
        Self {
            layout: WeightLayout::L2s,
            scale_maps: true,
            final_norm: true,
            activation: FeedForwardActivation::Gelu,
            step_input: StepInput::Slot,
            object_step: StepInjection::EveryLayer,
            relation_position: false,
            pool_heads: None,
        }
    }

    fn pool_heads(&self, cfg: &ClassifierConfig) -> usize {
        self.pool_heads.unwrap_or(cfg.object.heads)
    }

    /// Checks the options against the sizes.
    pub fn validate(&self, cfg: &ClassifierConfig) -> Result<()> {
        let heads = self.pool_heads(cfg);
        if heads == 0 || !cfg.d_model.is_multiple_of(heads) {
            bail!(
                "classifier architecture: d_model {} is not divisible by the pooling heads {heads}",
                cfg.d_model
            )
        }
        Ok(())
    }
}

/// Multi-head attention with separate query and key/value inputs.
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    /// On the attention weights (training only).
    dropout: Option<Dropout>,
}

impl Attention {
    /// Separate `q`, `k`, `v`, `out` projections.
    fn new(d: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q: candle_nn::linear(d, d, vb.pp("q"))?,
            k: candle_nn::linear(d, d, vb.pp("k"))?,
            v: candle_nn::linear(d, d, vb.pp("v"))?,
            out: candle_nn::linear(d, d, vb.pp("out"))?,
            heads,
            dropout: None,
        })
    }

    /// PyTorch's `nn.MultiheadAttention` layout: `in_proj_weight` (3d, d) and `in_proj_bias`
    /// (3d) hold the q, k, v projections in that order; `out_proj`.
    fn packed(
        d: usize,
        heads: usize,
        dropout: f32,
        masks: &MaskRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bound = (6.0 / (4 * d) as f64).sqrt();
        let w = vb.get_with_hints(
            (3 * d, d),
            "in_proj_weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let b = vb.get_with_hints(3 * d, "in_proj_bias", Init::Const(0.0))?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear::new(
                w.narrow(0, i * d, d)?,
                Some(b.narrow(0, i * d, d)?),
            ))
        };
        Ok(Self {
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            heads,
            dropout: (dropout > 0.0).then(|| Dropout::new(dropout, masks)),
        })
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b, t, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `query` (B, Tq, d), `kv` (B, Tk, d) → (B, Tq, d).
    fn forward(&self, query: &Tensor, kv: &Tensor, train: bool) -> Result<Tensor> {
        let (b, tq, d) = query.dims3()?;
        let q = self.split_heads(&self.q.forward(query)?)?;
        let k = self.split_heads(&self.k.forward(kv)?)?;
        let v = self.split_heads(&self.v.forward(kv)?)?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let mut probs = softmax_last_dim(&scores)?;
        if let Some(dropout) = &self.dropout {
            probs = dropout.forward(&probs, train)?;
        }
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, tq, d))?;
        self.out.forward(&ctx)
    }
}

/// One pre-norm Transformer encoder layer.
#[derive(Debug, Clone)]
struct EncoderLayer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    dropout: Dropout,
    activation: FeedForwardActivation,
}

impl EncoderLayer {
    fn new(
        d: usize,
        cfg: &EncoderConfig,
        arch: &Architecture,
        masks: &MaskRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (attn, fc1, fc2) = match arch.layout {
            WeightLayout::L2s => (
                Attention::new(d, cfg.heads, vb.pp("attn"))?,
                candle_nn::linear(d, cfg.ff, vb.pp("ff.fc1"))?,
                candle_nn::linear(cfg.ff, d, vb.pp("ff.fc2"))?,
            ),
            // nn.TransformerEncoderLayer's names.
            WeightLayout::Torch => (
                Attention::packed(d, cfg.heads, cfg.dropout, masks, vb.pp("self_attn"))?,
                candle_nn::linear(d, cfg.ff, vb.pp("linear1"))?,
                candle_nn::linear(cfg.ff, d, vb.pp("linear2"))?,
            ),
        };
        Ok(Self {
            norm1: LayerNorm::new(d, LN_EPS, vb.pp("norm1"))?,
            attn,
            norm2: LayerNorm::new(d, LN_EPS, vb.pp("norm2"))?,
            fc1,
            fc2,
            dropout: Dropout::new(cfg.dropout, masks),
            activation: arch.activation,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let h = self.attn.forward(&h, &h, train)?;
        let x = (x + self.dropout.forward(&h, train)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let h = match self.activation {
            FeedForwardActivation::Gelu => h.gelu_erf()?,
            FeedForwardActivation::Relu => h.relu()?,
        };
        let h = self.fc2.forward(&self.dropout.forward(&h, train)?)?;
        x + self.dropout.forward(&h, train)?
    }
}

/// A stack of pre-norm layers, with a final LayerNorm when the architecture has one.
#[derive(Debug, Clone)]
struct Encoder {
    layers: Vec<EncoderLayer>,
    norm: Option<LayerNorm>,
}

impl Encoder {
    fn new(
        d: usize,
        cfg: &EncoderConfig,
        arch: &Architecture,
        masks: &MaskRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        let layers = (0..cfg.layers)
            .map(|i| EncoderLayer::new(d, cfg, arch, masks, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = if arch.final_norm {
            Some(LayerNorm::new(d, LN_EPS, vb.pp("norm"))?)
        } else {
            None
        };
        Ok(Self { layers, norm })
    }

    /// `x` (B, T, d); `add` (B, 1, d) is added before every layer when given.
    fn forward(&self, x: &Tensor, add: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            if let Some(a) = add {
                x = x.broadcast_add(a)?;
            }
            x = layer.forward(&x, train)?;
        }
        match &self.norm {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }
}

/// Sinusoidal position encoding (positions, d): sin on even, cos on odd features.
pub fn sinusoidal_encoding(
    positions: usize,
    d: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut pe = vec![0f64; positions * d];
    for p in 0..positions {
        for i in 0..d {
            let freq = 1.0 / 10000f64.powf((2 * (i / 2)) as f64 / d as f64);
            let a = p as f64 * freq;
            pe[p * d + i] = if i % 2 == 0 { a.sin() } else { a.cos() };
        }
    }
    Tensor::from_vec(pe, (positions, d), device)?.to_dtype(dtype)
}

/// The first `rows` rows (rows, d) of a position table: read from `vb` (PyTorch's buffer
/// `pe`, shape (1, max_len, d)) in the Torch layout when it holds one, computed otherwise.
fn position_table(rows: usize, d: usize, arch: &Architecture, vb: &VarBuilder) -> Result<Tensor> {
    if arch.layout == WeightLayout::Torch && vb.contains_tensor("pe") {
        let pe = vb.get_unchecked("pe")?;
        match pe.dims() {
            &[1, len, width] if len >= rows && width == d => {
                return pe.squeeze(0)?.narrow(0, 0, rows)?.contiguous()
            }
            dims => bail!(
                "position table {}: shape {dims:?}, expected (1, at least {rows}, {d})",
                vb.prefix()
            ),
        }
    }
    sinusoidal_encoding(rows, d, vb.dtype(), vb.device())
}

fn step_embedding(rows: usize, dim: usize, vb: VarBuilder) -> Result<Embedding> {
    let w = vb.get_with_hints(
        (rows, dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )?;
    Ok(Embedding::new(w, dim))
}

/// Encodes the C maps of one object word into one vector (d, or S·S in the Torch layout).
#[derive(Debug, Clone)]
struct ObjectEncoder {
    input: Linear,
    /// (num_maps, d); the first C rows are used.
    position: Tensor,
    step: Option<Embedding>,
    step_mode: StepInjection,
    encoder: Encoder,
    query: Tensor,
    pool: Attention,
    proj: Linear,
    input_dropout: Option<Dropout>,
}

impl ObjectEncoder {
    fn new(
        cfg: &ClassifierConfig,
        arch: &Architecture,
        masks: &MaskRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        let d = cfg.d_model;
        let pixels = cfg.map_size * cfg.map_size;
        let torch = arch.layout == WeightLayout::Torch;
        let name = |l2s: &'static str, torch_name: &'static str| {
            if torch {
                torch_name
            } else {
                l2s
            }
        };
        let step = match arch.object_step {
            StepInjection::Off => None,
            _ => Some(step_embedding(
                cfg.num_steps,
                d,
                vb.pp(name("step_embed", "timestep_embedding")),
            )?),
        };
        let input = candle_nn::linear(pixels, d, vb.pp(name("input", "input_projection")))?;
        let position = position_table(
            cfg.num_maps,
            d,
            arch,
            &vb.pp(name("position", "positional_encoding")),
        )?;
        let encoder = Encoder::new(
            d,
            &cfg.object,
            arch,
            masks,
            vb.pp(name("encoder", "transformer")),
        )?;
        let query = vb.get_with_hints(
            (1, 1, d),
            name("pool_query", "query_vector"),
            Init::Randn {
                mean: 0.0,
                stdev: if torch { 1.0 } else { 0.02 },
            },
        )?;
        let heads = arch.pool_heads(cfg);
        let (pool, proj) = if torch {
            (
                Attention::packed(d, heads, 0.0, masks, vb.pp("layer_attention"))?,
                candle_nn::linear(d, pixels, vb.pp("output_projection"))?,
            )
        } else {
            (
                Attention::new(d, heads, vb.pp("pool"))?,
                candle_nn::linear(d, d, vb.pp("proj"))?,
            )
        };
        Ok(Self {
            input,
            position,
            step,
            step_mode: arch.object_step,
            encoder,
            query,
            pool,
            proj,
            input_dropout: (!torch).then(|| Dropout::new(cfg.object.dropout, masks)),
        })
    }

    /// Width of the per-object output.
    fn out_dim(&self) -> Result<usize> {
        self.proj.weight().dim(0)
    }

    /// `maps` (N, C, S·S), `steps` (N) u32 → (N, out_dim).
    fn forward(&self, maps: &Tensor, steps: &Tensor, train: bool) -> Result<Tensor> {
        let (n, c, _) = maps.dims3()?;
        let position = if c == self.position.dim(0)? {
            self.position.clone()
        } else {
            self.position.narrow(0, 0, c)?
        };
        let mut x = self.input.forward(maps)?.broadcast_add(&position)?;
        if let Some(dropout) = &self.input_dropout {
            x = dropout.forward(&x, train)?;
        }
        let step = match &self.step {
            Some(e) => Some(e.forward(steps)?.unsqueeze(1)?),
            None => None,
        };
        let x = match (self.step_mode, &step) {
            (StepInjection::EveryLayer, Some(s)) => self.encoder.forward(&x, Some(s), train)?,
            (StepInjection::Input, Some(s)) => {
                self.encoder.forward(&x.broadcast_add(s)?, None, train)?
            }
            _ => self.encoder.forward(&x, None, train)?,
        };
        let d = self.query.dim(2)?;
        let q = self.query.broadcast_as((n, 1, d))?;
        let pooled = self.pool.forward(&q, &x, train)?.squeeze(1)?;
        self.proj.forward(&pooled)
    }
}

/// The relation head: two object vectors and the step → logits.
#[derive(Debug, Clone)]
struct RelationHead {
    input: Linear,
    /// (1, d), added to the token when the architecture says so.
    position: Option<Tensor>,
    encoder: Encoder,
    step: Option<Embedding>,
    mlp: Vec<(Linear, LayerNorm)>,
    out: Linear,
    dropout: Dropout,
    slope: f64,
}

impl RelationHead {
    fn new(
        cfg: &ClassifierConfig,
        arch: &Architecture,
        object_dim: usize,
        masks: &MaskRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        let d = cfg.d_model;
        let torch = arch.layout == WeightLayout::Torch;
        // The published head concatenates no step embedding when its width is 0.
        let step = if torch && cfg.step_dim == 0 {
            None
        } else {
            let name = if torch {
                "timestep_embedding"
            } else {
                "step_embed"
            };
            Some(step_embedding(cfg.num_steps, cfg.step_dim, vb.pp(name))?)
        };
        let mut mlp = Vec::new();
        let mut width = d + cfg.step_dim;
        for (i, &h) in cfg.mlp_hidden.iter().enumerate() {
            // nn.Sequential numbering: Linear, LayerNorm, LeakyReLU, Dropout per hidden layer.
            let (fc, norm) = if torch {
                (
                    vb.pp(format!("fc.{}", 4 * i)),
                    vb.pp(format!("fc.{}", 4 * i + 1)),
                )
            } else {
                let vbi = vb.pp(format!("mlp.{i}"));
                (vbi.pp("fc"), vbi.pp("norm"))
            };
            mlp.push((
                candle_nn::linear(width, h, fc)?,
                LayerNorm::new(h, LN_EPS, norm)?,
            ));
            width = h;
        }
        let out = if torch {
            vb.pp(format!("fc.{}", 4 * cfg.mlp_hidden.len()))
        } else {
            vb.pp("out")
        };
        let position = if arch.relation_position {
            let name = if torch {
                "positional_encoding"
            } else {
                "position"
            };
            Some(position_table(1, d, arch, &vb.pp(name))?)
        } else {
            None
        };
        let (input, encoder) = if torch {
            (
                candle_nn::linear(2 * object_dim, d, vb.pp("projection"))?,
                Encoder::new(d, &cfg.head, arch, masks, vb.pp("transformer"))?,
            )
        } else {
            (
                candle_nn::linear(2 * object_dim, d, vb.pp("input"))?,
                Encoder::new(d, &cfg.head, arch, masks, vb.pp("encoder"))?,
            )
        };
        Ok(Self {
            input,
            position,
            encoder,
            step,
            mlp,
            out: candle_nn::linear(width, cfg.classes, out)?,
            dropout: Dropout::new(cfg.mlp_dropout, masks),
            slope: cfg.leaky_slope,
        })
    }

    /// `pair` (B, 2·object_dim), `steps` (B) → (B, classes).
    fn forward(&self, pair: &Tensor, steps: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.input.forward(pair)?.unsqueeze(1)?;
        if let Some(p) = &self.position {
            x = x.broadcast_add(p)?;
        }
        let mut x = self.encoder.forward(&x, None, train)?.squeeze(1)?;
        if let Some(step) = &self.step {
            x = Tensor::cat(&[&x, &step.forward(steps)?], 1)?;
        }
        for (fc, norm) in &self.mlp {
            x = norm.forward(&fc.forward(&x)?)?;
            x = candle_nn::ops::leaky_relu(&x, self.slope)?;
            x = self.dropout.forward(&x, train)?;
        }
        self.out.forward(&x)
    }
}

/// The relation classifier. Build it from a `VarBuilder`: over a `VarMap` to train, over loaded
/// weights to use it frozen.
#[derive(Debug, Clone)]
pub struct RelationClassifier {
    cfg: ClassifierConfig,
    arch: Architecture,
    object: ObjectEncoder,
    head: RelationHead,
    /// Where every dropout layer draws its masks.
    masks: MaskRng,
    dtype: DType,
}

impl RelationClassifier {
    /// The [`Architecture::legacy`] classifier, the one `l2s train` writes. Weight names:
    /// `object.*` (per-object encoder) and `head.*` (relation head).
    pub fn new(cfg: &ClassifierConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_architecture(cfg, &Architecture::legacy(), vb)
    }

    /// A classifier of any architecture. In the Torch layout the weight names are the
    /// published state dict's: `object_extractor.*` and `relation_classifier.*`.
    pub fn with_architecture(
        cfg: &ClassifierConfig,
        arch: &Architecture,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        arch.validate(cfg)?;
        let (object_vb, head_vb) = match arch.layout {
            WeightLayout::L2s => (vb.pp("object"), vb.pp("head")),
            WeightLayout::Torch => (vb.pp("object_extractor"), vb.pp("relation_classifier")),
        };
        let masks = MaskRng::new(0);
        let object = ObjectEncoder::new(cfg, arch, &masks, object_vb)?;
        let head = RelationHead::new(cfg, arch, object.out_dim()?, &masks, head_vb)?;
        Ok(Self {
            cfg: cfg.clone(),
            arch: arch.clone(),
            object,
            head,
            masks,
            dtype: vb.dtype(),
        })
    }

    /// Restarts the dropout masks' sequence from `seed` (training draws them in forward order).
    pub fn reseed_dropout(&self, seed: u64) {
        self.masks.reseed(seed);
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.cfg
    }

    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The weights' dtype; inputs are converted to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// This classifier's step input for position `slot` of a checkpoint's recorded steps
    /// (`step_indices`): the slot itself for [`StepInput::Slot`], the step it names for
    /// [`StepInput::Raw`] (the last recorded step past the end).
    pub fn step_input(&self, step_indices: &[usize], slot: usize) -> usize {
        match self.arch.step_input {
            StepInput::Slot => slot,
            StepInput::Raw => step_indices
                .get(slot)
                .or(step_indices.last())
                .copied()
                .unwrap_or(slot),
        }
    }

    fn check_inputs(&self, maps: &Tensor, steps: &Tensor) -> Result<usize> {
        let c = &self.cfg;
        let dims = maps.dims();
        // The Torch layout reads any number of maps up to its position table's length.
        let maps_ok = match self.arch.layout {
            WeightLayout::L2s => dims.get(2) == Some(&c.num_maps),
            WeightLayout::Torch => dims.get(2).is_some_and(|&n| (1..=c.num_maps).contains(&n)),
        };
        if dims.len() != 5 || dims[1] != 2 || !maps_ok || dims[3..] != [c.map_size, c.map_size] {
            let maps = match self.arch.layout {
                WeightLayout::L2s => c.num_maps.to_string(),
                WeightLayout::Torch => format!("C ≤ {}", c.num_maps),
            };
            bail!(
                "relation classifier: maps have shape {:?}, expected (batch, 2, {maps}, {}, {})",
                dims,
                c.map_size,
                c.map_size
            )
        }
        let b = dims[0];
        if steps.dims() != [b] {
            bail!(
                "relation classifier: step indices have shape {:?}, expected ({b}) to match the maps",
                steps.dims()
            )
        }
        Ok(b)
    }

    /// Logits `(B, classes)` for maps `(B, 2, C, S, S)` and step inputs `(B)` (any integer
    /// dtype, each below `num_steps`; see [`StepInput`]). Dropout acts only when `train` is true.
    pub fn forward(&self, maps: &Tensor, steps: &Tensor, train: bool) -> Result<Tensor> {
        let b = self.check_inputs(maps, steps)?;
        let c = &self.cfg;
        let steps = steps.to_dtype(DType::U32)?;
        let bad: Vec<u32> = steps
            .to_vec1::<u32>()?
            .into_iter()
            .filter(|&s| s as usize >= c.num_steps)
            .collect();
        if !bad.is_empty() {
            match self.arch.step_input {
                StepInput::Slot => bail!(
                    "relation classifier: step index {} out of range (the classifier knows {} steps)",
                    bad[0],
                    c.num_steps
                ),
                StepInput::Raw => bail!(
                    "relation classifier: denoising step {} out of range (the classifier's step embedding covers steps 0 to {})",
                    bad[0],
                    c.num_steps - 1
                ),
            }
        }
        let pixels = c.map_size * c.map_size;
        let num_maps = maps.dim(2)?;
        let mut x = maps.to_dtype(self.dtype)?;
        if self.arch.scale_maps {
            x = (x * pixels as f64)?;
        }
        let x = x.reshape((b * 2, num_maps, pixels))?;
        let pair_steps = Tensor::stack(&[&steps, &steps], 1)?.flatten_all()?;
        let objects = self.object.forward(&x, &pair_steps, train)?;
        let pair = objects.reshape((b, 2 * objects.dim(1)?))?;
        self.head.forward(&pair, &steps, train)
    }

    /// Mean cross-entropy of the logits against `labels` (B) class indices.
    pub fn loss(
        &self,
        maps: &Tensor,
        steps: &Tensor,
        labels: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let logits = self.forward(maps, steps, train)?;
        cross_entropy(&logits, labels)
    }
}

/// Mean cross-entropy of `logits` (B, K) against integer `labels` (B); differentiable.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, &labels.to_dtype(DType::U32)?)
}

/// Softmax probabilities over the last dimension (differentiable).
pub fn probabilities(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(logits, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    pub(crate) fn tiny(num_maps: usize, classes: usize) -> ClassifierConfig {
        ClassifierConfig {
            num_maps,
            map_size: 4,
            num_steps: 3,
            classes,
            d_model: 8,
            object: EncoderConfig {
                layers: 2,
                heads: 2,
                ff: 12,
                dropout: 0.3,
            },
            head: EncoderConfig {
                layers: 1,
                heads: 2,
                ff: 12,
                dropout: 0.3,
            },
            step_dim: 4,
            mlp_hidden: vec![10, 6],
            mlp_dropout: 0.3,
            leaky_slope: 0.1,
        }
    }

    #[test]
    fn presets() {
        let sd = ClassifierConfig::sd(195, 6, 4);
        assert_eq!(
            (sd.object.layers, sd.object.heads, sd.object.ff),
            (2, 2, 128)
        );
        assert_eq!((sd.head.layers, sd.head.heads, sd.head.ff), (2, 4, 128));
        assert_eq!(sd.d_model + sd.step_dim, 272);
        let fx = ClassifierConfig::flux(1368, 6, 4);
        assert_eq!(
            (fx.object.layers, fx.object.heads, fx.object.ff),
            (4, 4, 512)
        );
        assert_eq!((fx.head.layers, fx.head.heads, fx.head.ff), (4, 8, 512));
        assert_eq!(fx.mlp_hidden, vec![256, 128]);
        sd.validate().unwrap();
        fx.validate().unwrap();
        let mut bad = sd.clone();
        bad.object.heads = 3;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("divisible"));
        assert_eq!(Preset::parse("FLUX"), Some(Preset::Flux));
    }

    #[test]
    fn shapes_and_bad_inputs() {
        let cfg = tiny(3, 4);
        let vm = VarMap::new();
        let dev = Device::Cpu;
        let m =
            RelationClassifier::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let maps = Tensor::rand(0f32, 1f32, (5, 2, 3, 4, 4), &dev).unwrap();
        let steps = Tensor::new(&[0u32, 1, 2, 0, 1], &dev).unwrap();
        let out = m.forward(&maps, &steps, false).unwrap();
        assert_eq!(out.dims(), &[5, 4]);
        // Eval mode is deterministic.
        let again = m.forward(&maps, &steps, false).unwrap();
        let diff = (out - again)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        let wrong = Tensor::zeros((5, 2, 4, 4, 4), DType::F32, &dev).unwrap();
        assert!(m
            .forward(&wrong, &steps, false)
            .unwrap_err()
            .to_string()
            .contains("expected (batch, 2, 3, 4, 4)"));
        let bad_steps = Tensor::new(&[0u32, 1, 2, 3, 1], &dev).unwrap();
        assert!(m
            .forward(&maps, &bad_steps, false)
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        let short = Tensor::new(&[0u32, 1], &dev).unwrap();
        assert!(m.forward(&maps, &short, false).is_err());
        // i64 step indices work too.
        let steps64 = Tensor::new(&[0i64, 1, 2, 0, 1], &dev).unwrap();
        m.forward(&maps, &steps64, true).unwrap();
    }

    #[test]
    fn weight_names_are_stable() {
        let cfg = tiny(3, 4);
        let vm = VarMap::new();
        RelationClassifier::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
            .unwrap();
        let data = vm.data().lock().unwrap();
        for name in [
            "object.input.weight",
            "object.step_embed.weight",
            "object.pool_query",
            "object.encoder.layers.1.attn.q.weight",
            "object.encoder.layers.0.ff.fc2.bias",
            "object.encoder.norm.weight",
            "object.pool.out.weight",
            "object.proj.weight",
            "head.input.weight",
            "head.encoder.layers.0.norm2.bias",
            "head.step_embed.weight",
            "head.mlp.0.fc.weight",
            "head.mlp.1.norm.weight",
            "head.out.bias",
        ] {
            assert!(data.contains_key(name), "missing {name}");
        }
        assert_eq!(data["head.mlp.0.fc.weight"].dims(), &[10, 8 + 4]);
    }

    #[test]
    fn torch_layout_uses_the_published_names() {
        let cfg = tiny(3, 5);
        let vm = VarMap::new();
        let arch = Architecture::authors();
        let m = RelationClassifier::with_architecture(
            &cfg,
            &arch,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let data = vm.data().lock().unwrap();
        let d = cfg.d_model;
        let pixels = cfg.map_size * cfg.map_size;
        for (name, dims) in [
            ("object_extractor.input_projection.weight", vec![d, pixels]),
            ("object_extractor.timestep_embedding.weight", vec![3, d]),
            ("object_extractor.query_vector", vec![1, 1, d]),
            (
                "object_extractor.transformer.layers.1.self_attn.in_proj_weight",
                vec![3 * d, d],
            ),
            (
                "object_extractor.transformer.layers.0.self_attn.out_proj.bias",
                vec![d],
            ),
            (
                "object_extractor.transformer.layers.0.linear1.weight",
                vec![12, d],
            ),
            (
                "object_extractor.transformer.layers.0.norm2.weight",
                vec![d],
            ),
            ("object_extractor.layer_attention.in_proj_bias", vec![3 * d]),
            ("object_extractor.output_projection.weight", vec![pixels, d]),
            ("relation_classifier.projection.weight", vec![d, 2 * pixels]),
            ("relation_classifier.timestep_embedding.weight", vec![3, 4]),
            ("relation_classifier.fc.0.weight", vec![10, d + 4]),
            ("relation_classifier.fc.1.bias", vec![10]),
            ("relation_classifier.fc.4.weight", vec![6, 10]),
            ("relation_classifier.fc.5.weight", vec![6]),
            ("relation_classifier.fc.8.weight", vec![5, 6]),
        ] {
            assert_eq!(
                data.get(name).map(|v| v.dims().to_vec()),
                Some(dims),
                "{name}"
            );
        }
        // No final norms, and the position tables are not trainable weights.
        assert!(!data
            .keys()
            .any(|k| k.ends_with("transformer.norm.weight") || k.ends_with(".pe")));
        drop(data);
        // Fewer maps than the position table covers are accepted; more are not.
        let dev = Device::Cpu;
        let steps = Tensor::new(&[0i64, 2], &dev).unwrap();
        let few = Tensor::rand(0f32, 1f32, (2, 2, 2, 4, 4), &dev).unwrap();
        assert_eq!(m.forward(&few, &steps, false).unwrap().dims(), &[2, 5]);
        let many = Tensor::rand(0f32, 1f32, (2, 2, 4, 4, 4), &dev).unwrap();
        let e = m.forward(&many, &steps, false).unwrap_err().to_string();
        assert!(e.contains("C ≤ 3"), "{e}");
        let e = m
            .forward(&few, &Tensor::new(&[0i64, 3], &dev).unwrap(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("denoising step 3 out of range"), "{e}");
        assert_eq!(m.step_input(&[5, 10], 1), 10);
        assert_eq!(m.step_input(&[5, 10], 7), 10);
    }

    #[test]
    fn architecture_serialises_and_defaults_to_legacy_when_absent() {
        let a = Architecture::authors();
        assert_eq!(Architecture::default(), a);
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["layout"], "torch");
        assert_eq!(json["object_step"], "every_layer");
        assert_eq!(serde_json::from_value::<Architecture>(json).unwrap(), a);
        let partial: Architecture = serde_json::from_str(r#"{"activation": "relu"}"#).unwrap();
        assert_eq!(
            partial,
            Architecture {
                activation: FeedForwardActivation::Relu,
                ..Architecture::legacy()
            }
        );
        let mut bad = Architecture::authors();
        bad.pool_heads = Some(3);
        assert!(bad.validate(&tiny(3, 4)).is_err());
    }
}
