//! GenEval's folder layout for generated images, and the files this crate adds beside it.
//!
//! ```text
//! DIR/run.json                  settings of the run (ours; identical for every shard)
//! DIR/prompts.jsonl             every prompt of the run, one GenEval metadata line each (ours)
//! DIR/00000/metadata.jsonl      the prompt's metadata line (GenEval)
//! DIR/00000/samples/0000.png    its images (GenEval), seeds in the PNG text chunks
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The run's settings file.
pub const RUN_FILE: &str = "run.json";
/// The run's full prompt list.
pub const PROMPTS_FILE: &str = "prompts.jsonl";
/// A prompt folder's metadata file.
pub const METADATA_FILE: &str = "metadata.jsonl";
/// A prompt folder's image folder.
pub const SAMPLES_DIR: &str = "samples";
/// Format name of [`RunInfo`].
pub const RUN_FORMAT: &str = "l2s-geneval-run/1";

/// PNG text keys of evaluation images (besides the generator's own prompt, seed, steps, …).
pub const KEY_METHOD: &str = "method";
pub const KEY_STEER_LOSS: &str = "steer_final_loss";
pub const KEY_SEED: &str = "seed";

/// `DIR/NNNNN`.
pub fn prompt_dir(root: &Path, index: usize) -> PathBuf {
    root.join(format!("{index:05}"))
}

/// `DIR/NNNNN/samples/SSSS.png`.
pub fn sample_path(root: &Path, index: usize, sample: usize) -> PathBuf {
    prompt_dir(root, index)
        .join(SAMPLES_DIR)
        .join(format!("{sample:04}.png"))
}

/// `NNNNN/samples/SSSS.png`, the name results files use.
pub fn sample_relpath(index: usize, sample: usize) -> String {
    format!("{index:05}/{SAMPLES_DIR}/{sample:04}.png")
}

/// Seed of image `sample` of prompt `index`: every image of a run gets its own seed, the same
/// for every method and every shard split.
pub fn image_seed(base: u64, index: usize, sample: usize, images_per_prompt: usize) -> u64 {
    base.wrapping_add((index as u64).wrapping_mul(images_per_prompt as u64))
        .wrapping_add(sample as u64)
}

/// How a run seeds its images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Seeding {
    /// Every image its own seed ([`image_seed`]; GenEval-style runs).
    #[default]
    PerImage,
    /// Sample j of every prompt uses seed base + j (the shapes benchmark's convention).
    PerSample,
}

impl Seeding {
    pub fn seed(self, base: u64, index: usize, sample: usize, images_per_prompt: usize) -> u64 {
        match self {
            Seeding::PerImage => image_seed(base, index, sample, images_per_prompt),
            Seeding::PerSample => base.wrapping_add(sample as u64),
        }
    }
}

/// Reads `NNNNN/samples/SSSS.png` (or a path ending so) back into (prompt index, sample).
pub fn parse_relpath(name: &str) -> (Option<usize>, Option<usize>) {
    let parts: Vec<&str> = name.split(['/', '\\']).filter(|p| !p.is_empty()).collect();
    let digits = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<usize>().ok())
            .flatten()
    };
    let n = parts.len();
    if n >= 3 && parts[n - 2] == SAMPLES_DIR {
        let sample = parts[n - 1].strip_suffix(".png").and_then(digits);
        return (digits(parts[n - 3]), sample);
    }
    (None, None)
}

/// The settings of an evaluation run, stored as `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub format: String,
    /// Method label ("base", "centroid", "attend-excite", "l2s:NAME").
    pub method: String,
    /// `--steer` as given.
    pub steer: String,
    pub model: String,
    pub steps: usize,
    pub guidance: f64,
    /// Base seed; see [`image_seed`].
    pub seed: u64,
    pub images_per_prompt: usize,
    /// Number of prompts in the whole run (all shards).
    pub prompts: usize,
    /// Where the prompts came from ("file PATH" or a generator description).
    pub prompt_source: String,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    /// The steering loop's settings, when steered.
    #[serde(default)]
    pub steering: Option<Value>,
    #[serde(default)]
    pub seeding: Seeding,
    /// Classifier-free guidance's unconditional prompt (Stable Diffusion), when not empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub negative_prompt: String,
}

impl RunInfo {
    /// Names of the fields in which two runs differ (`prompt_source` is compared too: a
    /// resumed run must use the same prompts).
    pub fn differences(&self, other: &RunInfo) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec!["(unreadable)".into()];
        };
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k}: {} here, {} in the folder",
                    b.get(k).cloned().unwrap_or(Value::Null),
                    v
                )
            })
            .collect()
    }
}

/// One prompt folder as found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderPrompt {
    pub index: usize,
    pub dir: PathBuf,
    /// The first non-empty line of `metadata.jsonl`: `None` when the file is absent,
    /// `Some(Err)` when it cannot be read or parsed.
    pub metadata: Option<Result<Value, String>>,
    /// Sample number → path, for files named `SSSS.png` in `samples/`.
    pub samples: BTreeMap<usize, PathBuf>,
}

/// Lists the prompt folders (names of digits only) of `root`, in index order.
pub fn scan_folder(root: &Path) -> std::io::Result<Vec<FolderPrompt>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) || !entry.path().is_dir() {
            continue;
        }
        let Ok(index) = name.parse::<usize>() else {
            continue;
        };
        let dir = entry.path();
        let meta_path = dir.join(METADATA_FILE);
        let metadata = meta_path.exists().then(|| read_metadata_file(&meta_path));
        let mut samples = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(dir.join(SAMPLES_DIR)) {
            for e in rd.flatten() {
                let n = e.file_name();
                let Some(n) = n.to_str() else { continue };
                if let Some(stem) = n.strip_suffix(".png") {
                    if !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()) {
                        if let Ok(s) = stem.parse::<usize>() {
                            samples.insert(s, e.path());
                        }
                    }
                }
            }
        }
        out.push(FolderPrompt {
            index,
            dir,
            metadata,
            samples,
        });
    }
    out.sort_by_key(|p| p.index);
    Ok(out)
}

fn read_metadata_file(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .ok_or("empty file")?;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not a JSON line: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    Ok(v)
}

/// Reads `run.json`: `None` when absent.
pub fn read_run_info(root: &Path) -> Option<Result<RunInfo, String>> {
    let path = root.join(RUN_FILE);
    if !path.exists() {
        return None;
    }
    Some(
        std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", path.display())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let root = Path::new("/r");
        assert_eq!(
            sample_path(root, 12, 3),
            Path::new("/r/00012/samples/0003.png")
        );
        assert_eq!(sample_relpath(12, 3), "00012/samples/0003.png");
        assert_eq!(parse_relpath("00012/samples/0003.png"), (Some(12), Some(3)));
        assert_eq!(
            parse_relpath("/x/y/00012/samples/0003.png"),
            (Some(12), Some(3))
        );
        assert_eq!(parse_relpath("img.png"), (None, None));
        assert_eq!(parse_relpath("a/samples/b.png"), (None, None));
        // Distinct seeds for every image, independent of how the prompts are split.
        let mut seen = std::collections::HashSet::new();
        for i in 0..10 {
            for j in 0..4 {
                assert!(seen.insert(image_seed(5, i, j, 4)));
            }
        }
        assert_eq!(image_seed(5, 2, 1, 4), 14);
    }

    #[test]
    fn run_info_differences() {
        let a = RunInfo {
            format: RUN_FORMAT.into(),
            method: "base".into(),
            steer: "none".into(),
            model: "m".into(),
            steps: 10,
            guidance: 7.5,
            seed: 0,
            images_per_prompt: 4,
            prompts: 3,
            prompt_source: "x".into(),
            width: None,
            height: None,
            steering: None,
            seeding: Seeding::PerImage,
            negative_prompt: String::new(),
        };
        assert!(a.differences(&a).is_empty());
        // A run.json written before runs named their seeding reads as per-image seeds.
        let mut old = serde_json::to_value(&a).unwrap();
        old.as_object_mut().unwrap().remove("seeding");
        let old: RunInfo = serde_json::from_value(old).unwrap();
        assert!(a.differences(&old).is_empty());
        assert_eq!(Seeding::PerImage.seed(10, 2, 1, 4), 19);
        assert_eq!(Seeding::PerSample.seed(10, 2, 1, 4), 11);
        let b = RunInfo {
            steps: 20,
            ..a.clone()
        };
        let d = a.differences(&b);
        assert_eq!(d.len(), 1);
        assert!(
            d[0].starts_with("steps: 20 here, 10 in the folder"),
            "{d:?}"
        );
    }
}
