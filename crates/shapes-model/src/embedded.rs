//! The trained shapes model, compiled into the binary so that the first command works with
//! nothing to download. It is unpacked once into a cache folder (diffusers layout) and then loaded
//! by the same loader as any Stable Diffusion folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::folder::write_atomic;

macro_rules! asset {
    ($rel:literal) => {
        (
            $rel,
            include_bytes!(concat!("../weights/shapes/", $rel)).as_slice(),
        )
    };
}

/// (path inside the model folder, contents)
const FILES: &[(&str, &[u8])] = &[
    asset!("tokenizer/vocab.json"),
    asset!("tokenizer/merges.txt"),
    asset!("tokenizer/tokenizer_config.json"),
    asset!("tokenizer/special_tokens_map.json"),
    asset!("text_encoder/config.json"),
    asset!("text_encoder/model.safetensors"),
    asset!("unet/config.json"),
    asset!("unet/diffusion_pytorch_model.safetensors"),
    asset!("vae/config.json"),
    asset!("scheduler/scheduler_config.json"),
    asset!("model_index.json"),
];

/// The name users pass as `--model` for the embedded model (also the default).
pub const NAME: &str = "shapes";

/// A short fingerprint of the embedded files, so a newer binary never reuses an older unpacking.
fn fingerprint() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for &b in name.as_bytes().iter().chain(bytes.iter()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("L2S_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("learn-to-steer");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache/learn-to-steer");
    }
    std::env::temp_dir().join("learn-to-steer")
}

/// Unpacks the embedded model (once) and returns its folder.
pub fn model_dir() -> Result<PathBuf> {
    let dir = cache_root().join(format!("shapes-{}", fingerprint()));
    if dir.join("model_index.json").exists() {
        return Ok(dir);
    }
    unpack_to(&dir)?;
    Ok(dir)
}

/// Writes the embedded model folder to `dir`; `model_index.json` last, so its presence means the
/// folder is complete.
pub fn unpack_to(dir: &Path) -> Result<()> {
    for (name, bytes) in FILES.iter().filter(|(n, _)| *n != "model_index.json") {
        write_atomic(&dir.join(name), bytes)
            .with_context(|| format!("unpacking the embedded model into {}", dir.display()))?;
    }
    let (name, bytes) = FILES
        .iter()
        .find(|(n, _)| *n == "model_index.json")
        .expect("listed above");
    write_atomic(&dir.join(name), bytes)?;
    Ok(())
}
