//! Single-file FLUX checkpoints in the original Black Forest Labs naming (`flux1-dev.safetensors`
//! style: `img_in`, `double_blocks.{i}.img_attn.qkv`, `single_blocks.{i}.linear1`, …, optionally
//! under `model.diffusion_model.`), read into the diffusers-named model by a name and slicing map.
//! A single file already in diffusers naming loads as it is.

use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::transformer::{FluxConfig, FluxTransformer2DModel};
use crate::error::{ModelError, Result};
use crate::weights::SafetensorsWeights;

/// Prefix of transformer tensors in full (ComfyUI-style) checkpoints.
const FULL_PREFIX: &str = "model.diffusion_model.";

/// Which part of a BFL tensor a diffusers tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Whole,
    /// Rows `index·len .. (index+1)·len` of a fused projection (q, k, v).
    Chunk(usize),
    /// The last `len` rows (the MLP input fused after q, k, v in `linear1`).
    Tail,
    /// The two halves swapped: BFL's final modulation is (shift, scale), diffusers' (scale, shift).
    SwapHalves,
}

/// The BFL tensor (name without prefix) and part holding diffusers tensor `name`.
fn bfl_source(name: &str) -> Option<(String, Part)> {
    let (module, param) = name.rsplit_once('.')?;
    let whole = |m: &str| Some((format!("{m}.{param}"), Part::Whole));
    let top = match module {
        "time_text_embed.timestep_embedder.linear_1" => whole("time_in.in_layer"),
        "time_text_embed.timestep_embedder.linear_2" => whole("time_in.out_layer"),
        "time_text_embed.guidance_embedder.linear_1" => whole("guidance_in.in_layer"),
        "time_text_embed.guidance_embedder.linear_2" => whole("guidance_in.out_layer"),
        "time_text_embed.text_embedder.linear_1" => whole("vector_in.in_layer"),
        "time_text_embed.text_embedder.linear_2" => whole("vector_in.out_layer"),
        "context_embedder" => whole("txt_in"),
        "x_embedder" => whole("img_in"),
        "proj_out" => whole("final_layer.linear"),
        "norm_out.linear" => Some((
            format!("final_layer.adaLN_modulation.1.{param}"),
            Part::SwapHalves,
        )),
        _ => None,
    };
    if top.is_some() {
        return top;
    }
    let mut parts = module.splitn(3, '.');
    let (kind, index, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let norm_scale = |m: &str| Some((format!("{m}.scale"), Part::Whole));
    match kind {
        "transformer_blocks" => {
            let b = format!("double_blocks.{index}");
            match rest {
                "norm1.linear" => whole(&format!("{b}.img_mod.lin")),
                "norm1_context.linear" => whole(&format!("{b}.txt_mod.lin")),
                "attn.to_q" => Some((format!("{b}.img_attn.qkv.{param}"), Part::Chunk(0))),
                "attn.to_k" => Some((format!("{b}.img_attn.qkv.{param}"), Part::Chunk(1))),
                "attn.to_v" => Some((format!("{b}.img_attn.qkv.{param}"), Part::Chunk(2))),
                "attn.add_q_proj" => Some((format!("{b}.txt_attn.qkv.{param}"), Part::Chunk(0))),
                "attn.add_k_proj" => Some((format!("{b}.txt_attn.qkv.{param}"), Part::Chunk(1))),
                "attn.add_v_proj" => Some((format!("{b}.txt_attn.qkv.{param}"), Part::Chunk(2))),
                "attn.norm_q" => norm_scale(&format!("{b}.img_attn.norm.query_norm")),
                "attn.norm_k" => norm_scale(&format!("{b}.img_attn.norm.key_norm")),
                "attn.norm_added_q" => norm_scale(&format!("{b}.txt_attn.norm.query_norm")),
                "attn.norm_added_k" => norm_scale(&format!("{b}.txt_attn.norm.key_norm")),
                "attn.to_out.0" => whole(&format!("{b}.img_attn.proj")),
                "attn.to_add_out" => whole(&format!("{b}.txt_attn.proj")),
                "ff.net.0.proj" => whole(&format!("{b}.img_mlp.0")),
                "ff.net.2" => whole(&format!("{b}.img_mlp.2")),
                "ff_context.net.0.proj" => whole(&format!("{b}.txt_mlp.0")),
                "ff_context.net.2" => whole(&format!("{b}.txt_mlp.2")),
                _ => None,
            }
        }
        "single_transformer_blocks" => {
            let b = format!("single_blocks.{index}");
            match rest {
                "norm.linear" => whole(&format!("{b}.modulation.lin")),
                "attn.to_q" => Some((format!("{b}.linear1.{param}"), Part::Chunk(0))),
                "attn.to_k" => Some((format!("{b}.linear1.{param}"), Part::Chunk(1))),
                "attn.to_v" => Some((format!("{b}.linear1.{param}"), Part::Chunk(2))),
                "proj_mlp" => Some((format!("{b}.linear1.{param}"), Part::Tail)),
                "attn.norm_q" => norm_scale(&format!("{b}.norm.query_norm")),
                "attn.norm_k" => norm_scale(&format!("{b}.norm.key_norm")),
                "proj_out" => whole(&format!("{b}.linear2")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A BFL-named checkpoint seen through diffusers names.
struct BflWeights {
    inner: SafetensorsWeights,
    prefix: String,
    path: String,
}

impl SimpleBackend for BflWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (src, part) = bfl_source(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: no original (BFL) name is known for `{name}`",
                self.path
            ))
        })?;
        let full = format!("{}{src}", self.prefix);
        let t = self.inner.get_unchecked(&full, dtype, dev)?;
        let len = s.dims().first().copied().unwrap_or(0);
        let rows = t.dim(0)?;
        let t = match part {
            Part::Whole => t,
            Part::Chunk(i) if (i + 1) * len <= rows => t.narrow(0, i * len, len)?,
            Part::Tail if len <= rows => t.narrow(0, rows - len, len)?,
            Part::SwapHalves if rows % 2 == 0 => Tensor::cat(
                &[t.narrow(0, rows / 2, rows / 2)?, t.narrow(0, 0, rows / 2)?],
                0,
            )?,
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor `{full}` has {rows} rows, too few to hold `{name}` of shape {:?}",
                    self.path,
                    s.dims()
                )))
            }
        };
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{full}` gives `{name}` the shape {:?}, expected {:?}",
                self.path,
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (src, _) = bfl_source(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: no original (BFL) name is known for `{name}`",
                self.path
            ))
        })?;
        self.inner
            .get_unchecked(&format!("{}{src}", self.prefix), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        bfl_source(name)
            .is_some_and(|(src, _)| self.inner.contains_tensor(&format!("{}{src}", self.prefix)))
    }
}

/// The naming a single-file checkpoint uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FluxFileNaming {
    /// Original BFL names under this prefix (`""` or `model.diffusion_model.`).
    Bfl { prefix: String },
    /// diffusers names under this prefix.
    Diffusers { prefix: String },
}

/// Recognises the naming from marker tensors; anything else is an error listing a few names.
pub fn detect_naming(path: &Path, names: &[String]) -> Result<FluxFileNaming> {
    for prefix in ["", FULL_PREFIX] {
        let has = |n: &str| names.iter().any(|k| k == &format!("{prefix}{n}"));
        if has("img_in.weight") && has("double_blocks.0.img_attn.qkv.weight") {
            return Ok(FluxFileNaming::Bfl {
                prefix: prefix.into(),
            });
        }
        if has("x_embedder.weight") && has("transformer_blocks.0.attn.to_q.weight") {
            return Ok(FluxFileNaming::Diffusers {
                prefix: prefix.into(),
            });
        }
    }
    let mut sample: Vec<&str> = names.iter().map(String::as_str).take(5).collect();
    if names.len() > 5 {
        sample.push("…");
    }
    Err(ModelError::Unsupported {
        path: path.to_path_buf(),
        field: "tensor naming".into(),
        value: format!("{} tensors such as {}", names.len(), sample.join(", ")),
        supported: "a FLUX transformer in the original naming (img_in, double_blocks.{i}.img_attn.qkv, single_blocks.{i}.linear1, optionally under model.diffusion_model.) or in diffusers naming (x_embedder, transformer_blocks.{i}…)".into(),
    })
}

/// Whether a single-file checkpoint has a guidance embedding (`guidance_in.*` in BFL naming,
/// `time_text_embed.guidance_embedder.*` in diffusers naming): FLUX.1-dev has one, schnell not.
/// A file in neither naming is an error naming it.
pub fn has_guidance_embedding(path: &Path) -> Result<bool> {
    let weights = SafetensorsWeights::open(&[path.to_path_buf()])?;
    let names: Vec<String> = weights.shapes().into_keys().collect();
    let marker = match detect_naming(path, &names)? {
        FluxFileNaming::Bfl { prefix } => format!("{prefix}guidance_in.in_layer.weight"),
        FluxFileNaming::Diffusers { prefix } => {
            format!("{prefix}time_text_embed.guidance_embedder.linear_1.weight")
        }
    };
    Ok(names.contains(&marker))
}

/// Loads a FLUX transformer from one safetensors file in BFL or diffusers naming. The file holds
/// no config: pass the published one ([`FluxConfig::flux1_dev`], [`FluxConfig::flux1_schnell`])
/// or the folder's.
pub fn load_single_file(
    path: &Path,
    cfg: &FluxConfig,
    dtype: DType,
    device: &Device,
) -> Result<FluxTransformer2DModel> {
    let weights = SafetensorsWeights::open(&[path.to_path_buf()])?;
    let names: Vec<String> = weights.shapes().into_keys().collect();
    let naming = detect_naming(path, &names)?;
    let build_err = |e: candle_core::Error| ModelError::Build {
        dir: path.to_path_buf(),
        reason: e.to_string(),
    };
    match naming {
        FluxFileNaming::Bfl { prefix } => {
            let has_guidance = names
                .iter()
                .any(|n| n == &format!("{prefix}guidance_in.in_layer.weight"));
            if has_guidance != cfg.guidance_embeds {
                return Err(ModelError::Unsupported {
                    path: path.to_path_buf(),
                    field: "guidance_in".into(),
                    value: if has_guidance { "present".into() } else { "absent".into() },
                    supported: format!(
                        "a file matching the config's guidance_embeds = {} (dev has guidance_in, schnell does not)",
                        cfg.guidance_embeds
                    ),
                });
            }
            let backend = BflWeights {
                inner: weights,
                prefix,
                path: path.display().to_string(),
            };
            let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
            FluxTransformer2DModel::new(cfg, vb).map_err(build_err)
        }
        FluxFileNaming::Diffusers { prefix } => {
            let vb = VarBuilder::from_backend(Box::new(weights), dtype, device.clone());
            let vb = if prefix.is_empty() {
                vb
            } else {
                vb.pp(prefix.trim_end_matches('.'))
            };
            FluxTransformer2DModel::new(cfg, vb).map_err(build_err)
        }
    }
}
