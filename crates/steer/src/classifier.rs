//! The relation classifier: reads the spatial relation between two objects from their
//! cross-attention maps.
//!
//! Input: maps `(B, 2, C, S, S)` — for each sample the C maps (layers × heads) of the subject
//! word and of the object word, each S×S map summing to 1 — and a step index `(B)`, the position
//! of the denoising step in the classifier's list of recorded steps. Output: logits `(B, classes)`.
//!
//! ```text
//! per object (weights shared by both):
//!   maps (C, S·S) ·(S·S)→ Linear → d  + sinusoidal position over the C maps
//!   L × [ + step embedding; x + Attn(LN x); x + FF(LN x) ]  → LN
//!   learned query attends over the C tokens → Linear d→d
//! relation head:
//!   concat (2d) → Linear → d → L' × [x + Attn(LN x); x + FF(LN x)] → LN
//!   concat step embedding (16) → Linear 272→256 → LN → LeakyReLU(0.1) → Dropout
//!                              → Linear 256→128 → LN → LeakyReLU(0.1) → Dropout → Linear → classes
//! ```
//!
//! Every operation has a backward pass, so the classifier's loss can be differentiated with
//! respect to its input maps (steering backpropagates through it to the latent). Softmax and
//! LayerNorm go through [`l2s_models::nn`], which uses candle's fused kernels (no backward) only
//! when no tensor involved is tracked by autograd.
//!
//! The maps are multiplied by S·S on entry, so that a map summing to 1 has mean 1.

use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::{Dropout, Embedding, Linear, VarBuilder};
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

/// Multi-head attention with separate query and key/value inputs.
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q: candle_nn::linear(d, d, vb.pp("q"))?,
            k: candle_nn::linear(d, d, vb.pp("k"))?,
            v: candle_nn::linear(d, d, vb.pp("v"))?,
            out: candle_nn::linear(d, d, vb.pp("out"))?,
            heads,
        })
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b, t, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `query` (B, Tq, d), `kv` (B, Tk, d) → (B, Tq, d).
    fn forward(&self, query: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let (b, tq, d) = query.dims3()?;
        let q = self.split_heads(&self.q.forward(query)?)?;
        let k = self.split_heads(&self.k.forward(kv)?)?;
        let v = self.split_heads(&self.v.forward(kv)?)?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let probs = softmax_last_dim(&scores)?;
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
}

impl EncoderLayer {
    fn new(d: usize, cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(d, LN_EPS, vb.pp("norm1"))?,
            attn: Attention::new(d, cfg.heads, vb.pp("attn"))?,
            norm2: LayerNorm::new(d, LN_EPS, vb.pp("norm2"))?,
            fc1: candle_nn::linear(d, cfg.ff, vb.pp("ff.fc1"))?,
            fc2: candle_nn::linear(cfg.ff, d, vb.pp("ff.fc2"))?,
            dropout: Dropout::new(cfg.dropout),
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let h = self.attn.forward(&h, &h)?;
        let x = (x + self.dropout.forward(&h, train)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        let h = self.fc2.forward(&self.dropout.forward(&h, train)?)?;
        x + self.dropout.forward(&h, train)?
    }
}

/// A stack of pre-norm layers with a final LayerNorm.
#[derive(Debug, Clone)]
struct Encoder {
    layers: Vec<EncoderLayer>,
    norm: LayerNorm,
}

impl Encoder {
    fn new(d: usize, cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.layers)
            .map(|i| EncoderLayer::new(d, cfg, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            norm: LayerNorm::new(d, LN_EPS, vb.pp("norm"))?,
        })
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
        self.norm.forward(&x)
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

/// Encodes the C maps of one object word into one d-vector.
#[derive(Debug, Clone)]
struct ObjectEncoder {
    input: Linear,
    position: Tensor,
    step: Embedding,
    encoder: Encoder,
    query: Tensor,
    pool: Attention,
    proj: Linear,
    dropout: Dropout,
}

impl ObjectEncoder {
    fn new(cfg: &ClassifierConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let pixels = cfg.map_size * cfg.map_size;
        let step = vb.pp("step_embed").get_with_hints(
            (cfg.num_steps, d),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        Ok(Self {
            input: candle_nn::linear(pixels, d, vb.pp("input"))?,
            position: sinusoidal_encoding(cfg.num_maps, d, vb.dtype(), vb.device())?,
            step: Embedding::new(step, d),
            encoder: Encoder::new(d, &cfg.object, vb.pp("encoder"))?,
            query: vb.get_with_hints(
                (1, 1, d),
                "pool_query",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            pool: Attention::new(d, cfg.object.heads, vb.pp("pool"))?,
            proj: candle_nn::linear(d, d, vb.pp("proj"))?,
            dropout: Dropout::new(cfg.object.dropout),
        })
    }

    /// `maps` (N, C, S·S), `steps` (N) u32 → (N, d).
    fn forward(&self, maps: &Tensor, steps: &Tensor, train: bool) -> Result<Tensor> {
        let n = maps.dim(0)?;
        let x = self.input.forward(maps)?.broadcast_add(&self.position)?;
        let x = self.dropout.forward(&x, train)?;
        let step = self.step.forward(steps)?.unsqueeze(1)?;
        let x = self.encoder.forward(&x, Some(&step), train)?;
        let d = self.query.dim(2)?;
        let q = self.query.broadcast_as((n, 1, d))?;
        let pooled = self.pool.forward(&q, &x)?.squeeze(1)?;
        self.proj.forward(&pooled)
    }
}

/// The relation head: two object vectors and the step → logits.
#[derive(Debug, Clone)]
struct RelationHead {
    input: Linear,
    encoder: Encoder,
    step: Embedding,
    mlp: Vec<(Linear, LayerNorm)>,
    out: Linear,
    dropout: Dropout,
    slope: f64,
}

impl RelationHead {
    fn new(cfg: &ClassifierConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let step = vb.pp("step_embed").get_with_hints(
            (cfg.num_steps, cfg.step_dim),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let mut mlp = Vec::new();
        let mut width = d + cfg.step_dim;
        for (i, &h) in cfg.mlp_hidden.iter().enumerate() {
            let vbi = vb.pp(format!("mlp.{i}"));
            mlp.push((
                candle_nn::linear(width, h, vbi.pp("fc"))?,
                LayerNorm::new(h, LN_EPS, vbi.pp("norm"))?,
            ));
            width = h;
        }
        Ok(Self {
            input: candle_nn::linear(2 * d, d, vb.pp("input"))?,
            encoder: Encoder::new(d, &cfg.head, vb.pp("encoder"))?,
            step: Embedding::new(step, cfg.step_dim),
            mlp,
            out: candle_nn::linear(width, cfg.classes, vb.pp("out"))?,
            dropout: Dropout::new(cfg.mlp_dropout),
            slope: cfg.leaky_slope,
        })
    }

    /// `pair` (B, 2d), `steps` (B) → (B, classes).
    fn forward(&self, pair: &Tensor, steps: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.input.forward(pair)?.unsqueeze(1)?;
        let x = self.encoder.forward(&x, None, train)?.squeeze(1)?;
        let mut x = Tensor::cat(&[&x, &self.step.forward(steps)?], 1)?;
        for (fc, norm) in &self.mlp {
            x = norm.forward(&fc.forward(&x)?)?;
            x = candle_nn::ops::leaky_relu(&x, self.slope)?;
            x = self.dropout.forward(&x, train)?;
        }
        self.out.forward(&x)
    }
}

/// The relation classifier. Build it from a `VarBuilder`: over a `VarMap` to train, over loaded
/// safetensors to use it frozen.
#[derive(Debug, Clone)]
pub struct RelationClassifier {
    cfg: ClassifierConfig,
    object: ObjectEncoder,
    head: RelationHead,
    dtype: DType,
}

impl RelationClassifier {
    /// Weight names: `object.*` (per-object encoder) and `head.*` (relation head).
    pub fn new(cfg: &ClassifierConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg: cfg.clone(),
            object: ObjectEncoder::new(cfg, vb.pp("object"))?,
            head: RelationHead::new(cfg, vb.pp("head"))?,
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.cfg
    }

    /// The weights' dtype; inputs are converted to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn check_inputs(&self, maps: &Tensor, steps: &Tensor) -> Result<usize> {
        let c = &self.cfg;
        let want = [2, c.num_maps, c.map_size, c.map_size];
        let dims = maps.dims();
        if dims.len() != 5 || dims[1..] != want {
            bail!(
                "relation classifier: maps have shape {:?}, expected (batch, 2, {}, {}, {})",
                dims,
                c.num_maps,
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

    /// Logits `(B, classes)` for maps `(B, 2, C, S, S)` and step indices `(B)` (any integer dtype,
    /// each below `num_steps`). Dropout acts only when `train` is true.
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
            bail!(
                "relation classifier: step index {} out of range (the classifier knows {} steps)",
                bad[0],
                c.num_steps
            )
        }
        let pixels = c.map_size * c.map_size;
        let x =
            (maps.to_dtype(self.dtype)? * pixels as f64)?.reshape((b * 2, c.num_maps, pixels))?;
        let pair_steps = Tensor::stack(&[&steps, &steps], 1)?.flatten_all()?;
        let objects = self.object.forward(&x, &pair_steps, train)?;
        let pair = objects.reshape((b, 2 * c.d_model))?;
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
}
