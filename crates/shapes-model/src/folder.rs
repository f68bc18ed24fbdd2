//! Writing the shapes model as a diffusers-layout folder that `StableDiffusion::load` reads.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Result, ShapesModelError};
use candle_core::Tensor;

use crate::architecture;

pub const VOCAB_JSON: &str = include_str!("../../shapes/assets/tokenizer/vocab.json");
pub const MERGES_TXT: &str = include_str!("../../shapes/assets/tokenizer/merges.txt");
pub const TOKENIZER_CONFIG: &str =
    include_str!("../../shapes/assets/tokenizer/tokenizer_config.json");
pub const SPECIAL_TOKENS: &str =
    include_str!("../../shapes/assets/tokenizer/special_tokens_map.json");

/// Entries of the trimmed CLIP vocabulary.
pub fn vocab_size() -> usize {
    serde_json::from_str::<HashMap<String, u32>>(VOCAB_JSON)
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Creates the folder `path` goes in.
fn create_parent(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(ShapesModelError::io(dir))
}

/// Writes `bytes` to `path` with [`l2s_files::write_atomic`], creating its folder first.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    create_parent(path)?;
    Ok(l2s_files::write_atomic(path, bytes)?)
}

/// The trimmed CLIP tokenizer's config with this model's sequence length.
fn tokenizer_config() -> Result<serde_json::Value> {
    let mut config: serde_json::Value = serde_json::from_str(TOKENIZER_CONFIG)
        .map_err(ShapesModelError::json("built-in tokenizer_config.json"))?;
    config["model_max_length"] = architecture::MAX_TOKENS.into();
    Ok(config)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(ShapesModelError::json(path.display().to_string()))?;
    write_file(path, text.as_bytes())
}

/// Writes a safetensors file atomically, creating its folder first.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_file(path, &l2s_models::weights::safetensors_bytes(tensors)?)
}

/// Writes configs and tokenizer; with `weights` (names prefixed `text_encoder.` / `unet.`) also
/// the weight files.
pub fn write_model_folder(dir: &Path, weights: Option<&HashMap<String, Tensor>>) -> Result<()> {
    let tok = dir.join("tokenizer");
    write_file(&tok.join("vocab.json"), VOCAB_JSON.as_bytes())?;
    write_file(&tok.join("merges.txt"), MERGES_TXT.as_bytes())?;
    write_json(&tok.join("tokenizer_config.json"), &tokenizer_config()?)?;
    write_file(
        &tok.join("special_tokens_map.json"),
        SPECIAL_TOKENS.as_bytes(),
    )?;
    write_json(
        &dir.join("text_encoder/config.json"),
        &architecture::text_encoder_config(vocab_size()),
    )?;
    write_json(&dir.join("unet/config.json"), &architecture::unet_config())?;
    write_json(&dir.join("vae/config.json"), &architecture::vae_config())?;
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &architecture::scheduler_config(),
    )?;
    if let Some(weights) = weights {
        let part = |prefix: &str| -> HashMap<String, Tensor> {
            weights
                .iter()
                .filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone())))
                .collect()
        };
        save_tensors(
            &dir.join("text_encoder/model.safetensors"),
            &part("text_encoder."),
        )?;
        save_tensors(
            &dir.join("unet/diffusion_pytorch_model.safetensors"),
            &part("unet."),
        )?;
    }
    // Written last: a folder with model_index.json is complete.
    write_json(&dir.join("model_index.json"), &architecture::model_index())?;
    Ok(())
}
