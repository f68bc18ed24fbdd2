//! The trained shapes model, compiled into the binary so that the first command works with
//! nothing to download. It is unpacked once into a cache folder (diffusers layout) and then loaded
//! by the same loader as any Stable Diffusion folder.
//!
//! With it comes a Learn-to-Steer relation classifier trained on the model's cross-attention maps
//! (the dual-inversion classifier of `l2s bench shapes`), unpacked the same way by
//! [`classifier_dir`]: `classifier.json` and `classifier.safetensors` as `l2s train` writes them
//! (the weights stored as f16, which measures the same and loads into f32), plus `steering.json`,
//! the sampling and steering schedule it was measured with.

use std::path::{Path, PathBuf};

use crate::error::{Result, ShapesModelError};

use crate::folder::write_file;

macro_rules! asset {
    ($rel:literal) => {
        (
            $rel,
            include_bytes!(concat!("../weights/shapes/", $rel)).as_slice(),
        )
    };
}

macro_rules! classifier_asset {
    ($rel:literal) => {
        (
            $rel,
            include_bytes!(concat!("../weights/shapes-classifier/", $rel)).as_slice(),
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

/// (path inside the classifier folder, contents); `classifier.json` is written last.
const CLASSIFIER_FILES: &[(&str, &[u8])] = &[
    classifier_asset!("classifier.safetensors"),
    classifier_asset!("steering.json"),
    classifier_asset!("classifier.json"),
];

/// The name users pass as `--model` for the embedded model (also the default).
pub const NAME: &str = "shapes";

/// The name users pass as `--steer` for the embedded classifier.
pub const CLASSIFIER_NAME: &str = "l2s";

/// A short fingerprint of the embedded files, so a newer binary never reuses an older unpacking.
fn fingerprint() -> String {
    fingerprint_of(FILES)
}

/// FNV-1a over 8-byte words rather than bytes: it runs on every command, and byte by byte the
/// 10 MB of weights took about 30 ms. Each file's name and length go in too.
fn fingerprint_of(files: &[(&str, &[u8])]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |word: u64| {
        h ^= word;
        h = h.wrapping_mul(0x0100_0000_01b3).rotate_left(29);
    };
    for (name, bytes) in files {
        mix(bytes.len() as u64);
        for part in [name.as_bytes(), bytes] {
            let words = part.chunks_exact(8);
            let mut tail = [0u8; 8];
            tail[..words.remainder().len()].copy_from_slice(words.remainder());
            for w in words {
                mix(u64::from_le_bytes(w.try_into().expect("8 bytes")));
            }
            mix(u64::from_le_bytes(tail));
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
    write_files(dir, FILES, "model_index.json", "model")
}

/// Unpacks the embedded relation classifier (once) and returns its folder, which
/// `l2s_steer::train::load_classifier` reads like any `l2s train` output.
pub fn classifier_dir() -> Result<PathBuf> {
    classifier_dir_in(&cache_root())
}

fn classifier_dir_in(root: &Path) -> Result<PathBuf> {
    let dir = root.join(format!(
        "shapes-classifier-{}",
        fingerprint_of(CLASSIFIER_FILES)
    ));
    if dir.join(CLASSIFIER_MARKER).exists() {
        return Ok(dir);
    }
    unpack_classifier_to(&dir)?;
    Ok(dir)
}

/// The file written last when unpacking the classifier: the folder is complete once it exists.
const CLASSIFIER_MARKER: &str = "classifier.json";

/// Writes the embedded classifier folder to `dir`; `classifier.json` last, so its presence means
/// the folder is complete.
pub fn unpack_classifier_to(dir: &Path) -> Result<()> {
    write_files(dir, CLASSIFIER_FILES, CLASSIFIER_MARKER, "classifier")
}

/// The embedded classifier's `steering.json`: the schedule it was measured with.
pub fn classifier_steering() -> Result<TunedSteering> {
    let (_, bytes) = CLASSIFIER_FILES
        .iter()
        .find(|(n, _)| *n == "steering.json")
        .expect("listed above");
    serde_json::from_slice(bytes).map_err(ShapesModelError::json(
        "the embedded classifier's steering.json",
    ))
}

/// `steering.json` of a classifier folder: the sampling steps and the steering schedule
/// (`l2s_steer::steering::SteerConfig`'s fields, kept as JSON here so that this crate need not
/// know the steering code).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TunedSteering {
    pub sampling_steps: usize,
    pub steer: serde_json::Value,
}

fn write_files(dir: &Path, files: &[(&str, &[u8])], last: &str, what: &'static str) -> Result<()> {
    let unpack = |name: &str, bytes: &[u8]| {
        write_file(&dir.join(name), bytes).map_err(|e| ShapesModelError::Unpack {
            what,
            dir: dir.to_path_buf(),
            source: Box::new(e),
        })
    };
    for (name, bytes) in files.iter().filter(|(n, _)| *n != last) {
        unpack(name, bytes)?;
    }
    let (name, bytes) = files
        .iter()
        .find(|(n, _)| *n == last)
        .expect("the marker file is listed");
    unpack(name, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier_unpacks_byte_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("clf");
        unpack_classifier_to(&dir).unwrap();
        for (name, bytes) in CLASSIFIER_FILES {
            assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
        }
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/shapes-classifier");
        let mut on_disk: Vec<String> = std::fs::read_dir(&source)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = CLASSIFIER_FILES
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        embedded.sort();
        assert_eq!(
            on_disk,
            embedded,
            "every file of {} is embedded",
            source.display()
        );
    }

    #[test]
    fn fingerprint_tells_apart_any_change_of_content_name_or_split() {
        let base = fingerprint_of(&[("a.bin", b"0123456789abcdef-x"), ("b", b"")]);
        let changed = [
            fingerprint_of(&[("a.bin", b"0123456789abcdef-y"), ("b", b"")]),
            fingerprint_of(&[("a.bin", b"1123456789abcdef-x"), ("b", b"")]),
            fingerprint_of(&[("a.bim", b"0123456789abcdef-x"), ("b", b"")]),
            // The same bytes split differently between the two files.
            fingerprint_of(&[("a.bin", b"0123456789abcdef-"), ("b", b"x")]),
            // A trailing zero byte, which the zero-padded last word alone would not show.
            fingerprint_of(&[("a.bin", b"0123456789abcdef-x\0"), ("b", b"")]),
        ];
        for (i, other) in changed.iter().enumerate() {
            assert_ne!(&base, other, "change {i} kept the fingerprint");
        }
        assert_eq!(
            base,
            fingerprint_of(&[("a.bin", b"0123456789abcdef-x"), ("b", b"")])
        );
    }

    #[test]
    fn classifier_steering_is_the_measured_schedule() {
        let s = classifier_steering().unwrap();
        assert_eq!(s.sampling_steps, 20);
        assert_eq!(s.steer["steer_steps"], 10);
        assert_eq!(s.steer["max_iterations"], 3);
        assert_eq!(s.steer["step_size"], 0.1);
        assert_eq!(s.steer["update"], "normalized");
        assert_eq!(s.steer["stop_below"], 0.1);
        let meta: serde_json::Value = serde_json::from_slice(
            CLASSIFIER_FILES
                .iter()
                .find(|(n, _)| *n == "classifier.json")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(meta["num_inference_steps"], 20);
    }

    #[test]
    fn classifier_dir_unpacks_once_into_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = classifier_dir_in(tmp.path()).unwrap();
        assert!(dir.starts_with(tmp.path()));
        assert!(dir.join("classifier.safetensors").is_file());
        // A complete folder is reused as it is, not written again.
        let weights = dir.join("classifier.safetensors");
        std::fs::write(&weights, b"kept").unwrap();
        assert_eq!(classifier_dir_in(tmp.path()).unwrap(), dir);
        assert_eq!(std::fs::read(&weights).unwrap(), b"kept");
        // Without its marker, a folder counts as unfinished and is written again.
        std::fs::remove_file(dir.join(CLASSIFIER_MARKER)).unwrap();
        classifier_dir_in(tmp.path()).unwrap();
        assert_ne!(std::fs::read(&weights).unwrap(), b"kept");
    }
}
