//! Cross-attention maps of chosen words at chosen sampling steps.
//!
//! For every watched step and every cross-attention layer, the collector keeps the conditional
//! rows' probabilities of the words' token columns; a word of several tokens averages its columns.
//! [`AttentionCollector::finish`] then resizes every layer's per-head map to a common S×S grid,
//! renormalises each to sum 1, and averages over layers and heads:
//!
//! ```text
//! per_head[step, word, c]  c over (layer, head) in forward order, each S×S and summing to 1
//! per_word[step, word]     = mean_c per_head[step, word, c]
//! ```
//!
//! Resizing is a pair of matrix products (rows, then columns), so it is differentiable and works
//! for any sizes: area averaging when shrinking (exact average pooling for integer factors),
//! bilinear interpolation with half-pixel centres when enlarging.

use candle_core::{DType, Device, Tensor};
use l2s_models::{AttentionObserver, AttentionSite, Pipeline};

pub use l2s_models::{default_map_steps, METHOD_STEPS};

use crate::error::{GenerateError, Result};
use crate::generate::{generate_observed, GenerateRequest, Generated};
use crate::prompt::{word_tokens, WordTokens};
use crate::sample::{Progress, StepObserver};

/// Which maps to keep.
#[derive(Clone, Debug)]
pub struct AttentionRequest {
    /// Words or phrases of the prompt.
    pub words: Vec<String>,
    /// 0-based sampling steps to record.
    pub at_steps: Vec<usize>,
    /// Side of the common grid the layers' maps are resized to.
    pub map_size: usize,
}

/// One layer's maps at one step: (words, heads, height, width), at the layer's own resolution,
/// conditional rows only (averaged over the batch).
#[derive(Clone, Debug)]
pub struct LayerMap {
    pub step: usize,
    pub site: AttentionSite,
    pub maps: Tensor,
}

/// The collected maps.
#[derive(Clone, Debug)]
pub struct AttentionMaps {
    pub words: Vec<WordTokens>,
    /// The recorded steps, ascending.
    pub steps: Vec<usize>,
    pub size: usize,
    /// (steps, words, layers·heads, S, S), each map summing to 1.
    pub per_head: Tensor,
    /// (steps, words, S, S): the mean over layers and heads.
    pub per_word: Tensor,
    /// The raw maps per layer and step, in recording order.
    pub layers: Vec<LayerMap>,
}

/// Resampling weights (out × n) along one axis; see the module documentation.
pub fn resize_matrix(n: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * n];
    if out == n {
        for i in 0..n {
            m[i * n + i] = 1.0;
        }
    } else if out < n {
        // Area: output cell i covers [i·n/out, (i+1)·n/out) of the input.
        let scale = n as f64 / out as f64;
        for i in 0..out {
            let (lo, hi) = (i as f64 * scale, (i + 1) as f64 * scale);
            for j in lo.floor() as usize..(hi.ceil() as usize).min(n) {
                let overlap = (hi.min(j as f64 + 1.0) - lo.max(j as f64)).max(0.0);
                m[i * n + j] = (overlap / scale) as f32;
            }
        }
    } else {
        // Enlarging: bilinear, half-pixel centres, edges clamped.
        return bilinear_matrix(n, out);
    }
    m
}

/// Resizes maps (…, h, w) to (…, out_h, out_w); differentiable.
pub fn resize_maps(maps: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    resize_maps_with(maps, out_h, out_w, Resize::Area)
}

/// How maps are resized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Area averaging when shrinking, bilinear when enlarging ([`resize_matrix`]).
    Area,
    /// Bilinear interpolation with half-pixel centres (PyTorch's `interpolate(mode="bilinear",
    /// align_corners=False)` without antialiasing) in both directions: shrinking 64 → 16 samples
    /// between two source pixels rather than averaging four.
    Bilinear,
}

/// The (out × n) bilinear interpolation matrix, edges clamped as PyTorch clamps them.
pub fn bilinear_matrix(n: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * n];
    let scale = n as f64 / out as f64;
    for i in 0..out {
        let src = ((i as f64 + 0.5) * scale - 0.5).clamp(0.0, (n - 1) as f64);
        let j0 = src.floor() as usize;
        let j1 = (j0 + 1).min(n - 1);
        let f = src - j0 as f64;
        m[i * n + j0] += (1.0 - f) as f32;
        m[i * n + j1] += f as f32;
    }
    m
}

/// [`resize_maps`] with a chosen interpolation.
pub fn resize_maps_with(maps: &Tensor, out_h: usize, out_w: usize, kind: Resize) -> Result<Tensor> {
    let matrix = |n: usize, out: usize| match kind {
        Resize::Area => resize_matrix(n, out),
        Resize::Bilinear => bilinear_matrix(n, out),
    };
    let dims = maps.dims().to_vec();
    if dims.len() < 2 {
        return Err(GenerateError::Shape {
            what: "maps to resize".into(),
            found: format!("{dims:?}"),
            expected: "at least (height, width)".into(),
        });
    }
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if (h, w) == (out_h, out_w) {
        return Ok(maps.clone());
    }
    let lead: usize = dims[..dims.len() - 2].iter().product();
    let dev = maps.device();
    let rh = Tensor::from_vec(matrix(h, out_h), (out_h, h), dev)?.to_dtype(maps.dtype())?;
    let rw = Tensor::from_vec(matrix(w, out_w), (out_w, w), dev)?
        .to_dtype(maps.dtype())?
        .t()?;
    let flat = maps.reshape((lead, h, w))?;
    let out = rh.broadcast_matmul(&flat)?.broadcast_matmul(&rw)?;
    let mut shape = dims[..dims.len() - 2].to_vec();
    shape.extend([out_h, out_w]);
    Ok(out.reshape(shape)?)
}

/// Divides every map (last two dims) by its sum.
pub fn renormalize(maps: &Tensor) -> Result<Tensor> {
    let sums = maps
        .sum_keepdim(maps.rank() - 1)?
        .sum_keepdim(maps.rank() - 2)?;
    let eps = if maps.dtype() == DType::F64 {
        1e-30
    } else {
        1e-20
    };
    Ok(maps.broadcast_div(&(sums + eps)?)?)
}

/// Each word's map in one layer's probabilities `probs` (batch, heads, h·w, tokens): the mean of
/// the word's token columns, as (batch, words, heads, h, w). Differentiable; every consumer of
/// cross-attention (display, dataset building, steering) reads word maps through this.
pub fn word_maps(
    probs: &Tensor,
    words: &[Vec<usize>],
    site: &AttentionSite,
) -> candle_core::Result<Tensor> {
    let (b, heads, _, _) = probs.dims4()?;
    let mut per_word = Vec::with_capacity(words.len());
    for positions in words {
        let mut acc: Option<Tensor> = None;
        for &p in positions {
            let col = probs.narrow(3, p, 1)?.squeeze(3)?;
            acc = Some(match acc {
                Some(a) => (a + col)?,
                None => col,
            });
        }
        let acc =
            acc.ok_or_else(|| candle_core::Error::Msg("a word with no token positions".into()))?;
        per_word.push((acc / positions.len() as f64)?.reshape((
            b,
            heads,
            site.height,
            site.width,
        ))?);
    }
    Tensor::stack(&per_word, 1)
}

/// Keeps the words' maps at the chosen steps (an [`StepObserver`] for the sampling loop).
pub struct AttentionCollector {
    words: Vec<WordTokens>,
    at_steps: Vec<usize>,
    current: Option<usize>,
    layers: Vec<LayerMap>,
}

impl AttentionCollector {
    pub fn new(words: Vec<WordTokens>, at_steps: &[usize]) -> Result<Self> {
        if words.is_empty() {
            return Err(GenerateError::invalid(
                "words",
                "none given; expected at least one word of the prompt",
            ));
        }
        let mut at_steps = at_steps.to_vec();
        at_steps.sort_unstable();
        at_steps.dedup();
        Ok(Self {
            words,
            at_steps,
            current: None,
            layers: Vec::new(),
        })
    }

    pub fn layers(&self) -> &[LayerMap] {
        &self.layers
    }

    /// Resizes, renormalises and averages what was recorded.
    pub fn finish(self, size: usize) -> Result<AttentionMaps> {
        if size == 0 {
            return Err(GenerateError::invalid("map size", "0; expected at least 1"));
        }
        let mut per_step = Vec::with_capacity(self.at_steps.len());
        for &step in &self.at_steps {
            let maps = self
                .layers
                .iter()
                .filter(|l| l.step == step)
                .map(|l| renormalize(&resize_maps(&l.maps, size, size)?))
                .collect::<Result<Vec<_>>>()?;
            if maps.is_empty() {
                return Err(GenerateError::invalid(
                    "attention steps",
                    format!("step {step} was never run or the model has no cross-attention layer"),
                ));
            }
            per_step.push(Tensor::cat(&maps, 1)?);
        }
        let per_head = Tensor::stack(&per_step, 0)?;
        let per_word = per_head.mean(2)?;
        Ok(AttentionMaps {
            words: self.words,
            steps: self.at_steps,
            size,
            per_head,
            per_word,
            layers: self.layers,
        })
    }
}

impl AttentionObserver for AttentionCollector {
    fn wants(&self, _site: &AttentionSite) -> bool {
        self.current.is_some()
    }

    fn observe(&mut self, site: &AttentionSite, probs: &Tensor) -> candle_core::Result<()> {
        let Some(step) = self.current else {
            return Ok(());
        };
        let positions: Vec<Vec<usize>> = self.words.iter().map(|w| w.positions.clone()).collect();
        // (batch, words, heads, h, w), averaged over the batch rows.
        let maps = word_maps(&probs.detach().to_dtype(DType::F32)?, &positions, site)?.mean(0)?;
        self.layers.push(LayerMap {
            step,
            site: site.clone(),
            maps,
        });
        Ok(())
    }
}

impl StepObserver for AttentionCollector {
    fn begin_step(&mut self, index: usize, _timestep: usize) -> bool {
        self.current = self.at_steps.binary_search(&index).ok().map(|_| index);
        self.current.is_some()
    }
}

/// Finds every word of `words` in the prompt (see [`word_tokens`]).
pub fn words_in_prompt(
    pipeline: &Pipeline,
    prompt: &str,
    words: &[String],
) -> Result<Vec<WordTokens>> {
    words
        .iter()
        .map(|w| word_tokens(pipeline, prompt, w.trim()))
        .collect()
}

/// Checks that the request's steps exist in a run of `steps` steps and its map size is usable.
pub fn check_request(att: &AttentionRequest, steps: usize) -> Result<()> {
    if att.at_steps.is_empty() {
        return Err(GenerateError::invalid("attention steps", "none given"));
    }
    if let Some(&bad) = att.at_steps.iter().find(|&&s| s >= steps) {
        return Err(GenerateError::invalid(
            "attention steps",
            format!(
                "step {bad} does not exist in a {steps}-step run (steps are numbered 0..={})",
                steps.saturating_sub(1)
            ),
        ));
    }
    if att.map_size == 0 {
        return Err(GenerateError::invalid("map size", "0; expected at least 1"));
    }
    Ok(())
}

/// Generates an image while recording the requested words' attention maps.
pub fn generate_with_attention(
    pipeline: &Pipeline,
    req: &GenerateRequest,
    att: &AttentionRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Generated, AttentionMaps)> {
    let words = words_in_prompt(pipeline, &req.prompt, &att.words)?;
    check_request(att, req.steps)?;
    let mut collector = AttentionCollector::new(words, &att.at_steps)?;
    let generated = generate_observed(pipeline, req, &mut collector, progress)?;
    let maps = collector.finish(att.map_size)?;
    Ok((generated, maps))
}

impl AttentionMaps {
    /// (words, S, S): `per_word` averaged over the recorded steps.
    pub fn averaged(&self) -> Result<Tensor> {
        Ok(self.per_word.mean(0)?)
    }

    /// Writes the maps to a safetensors file: `per_word` (steps, words, S, S), `per_head`
    /// (steps, words, C, S, S), `map_steps` (u32), and every raw layer map as
    /// `layer.{step}.{layer name}` (words, heads, h, w). The header's metadata holds `extra`,
    /// then (taking precedence) `words` and `token_positions` (JSON lists), `map_steps`,
    /// `map_size` and `layers` (JSON: name, heads, height, width in forward order).
    pub fn save(&self, path: &std::path::Path, extra: &[(String, String)]) -> Result<()> {
        let mut tensors = vec![
            ("per_word".to_string(), self.per_word.clone()),
            ("per_head".to_string(), self.per_head.clone()),
            (
                "map_steps".to_string(),
                Tensor::new(
                    self.steps.iter().map(|&s| s as u32).collect::<Vec<_>>(),
                    &Device::Cpu,
                )?,
            ),
        ];
        for l in &self.layers {
            tensors.push((format!("layer.{}.{}", l.step, l.site.layer), l.maps.clone()));
        }
        let json = |v: serde_json::Value| v.to_string();
        let mut meta = extra.to_vec();
        meta.extend([
            ("words".to_string(), json(serde_json::json!(self.words.iter().map(|w| &w.word).collect::<Vec<_>>()))),
            (
                "token_positions".to_string(),
                json(serde_json::json!(self.words.iter().map(|w| &w.positions).collect::<Vec<_>>())),
            ),
            ("map_steps".to_string(), json(serde_json::json!(self.steps))),
            ("map_size".to_string(), self.size.to_string()),
            (
                "layers".to_string(),
                json(serde_json::json!(self
                    .layers
                    .iter()
                    .filter(|l| Some(&l.step) == self.steps.first())
                    .map(|l| serde_json::json!({"name": l.site.layer, "heads": l.site.heads, "height": l.site.height, "width": l.site.width}))
                    .collect::<Vec<_>>())),
            ),
        ]);
        crate::generate::write_tensors(path, &tensors, &meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_downsampling_is_average_pooling() {
        let m = resize_matrix(4, 2);
        assert_eq!(m, vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]);
        // Non-integer factor: rows still sum to 1.
        let m = resize_matrix(5, 3);
        for r in m.chunks(5) {
            assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn bilinear_upsampling_matches_half_pixel_convention() {
        // torch.nn.functional.interpolate([a, b], size=4, mode="linear", align_corners=False)
        // = [a, 0.75a+0.25b, 0.25a+0.75b, b]
        let m = resize_matrix(2, 4);
        assert_eq!(m, vec![1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
    }

    #[test]
    fn resized_maps_keep_mass_after_renormalising() {
        let x = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 8, 8))
            .unwrap();
        for s in [2, 4, 8, 16, 5] {
            let r = renormalize(&resize_maps(&x, s, s).unwrap()).unwrap();
            assert_eq!(r.dims(), &[1, s, s]);
            let sum = r.sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!((sum - 1.0).abs() < 1e-5, "{s}: {sum}");
        }
        let pooled = resize_maps(&x, 4, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(pooled[0], (0.0 + 1.0 + 8.0 + 9.0) / 4.0);
    }

    #[test]
    fn default_steps() {
        assert_eq!(default_map_steps(50), vec![5, 10, 15, 20, 25, 49]);
        assert_eq!(default_map_steps(10), vec![5]);
        assert_eq!(default_map_steps(3), vec![2]);
    }
}
