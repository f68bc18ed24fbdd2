//! The relation classifier's training data on disk.
//!
//! A dataset is a folder:
//!
//! - `info.json` — [`DatasetInfo`]: the model id, C (`num_maps`), the map side, the recorded
//!   denoising step indices, the relation class names, the attention layers the maps came from,
//!   and whether dual inversion was used; further fields are kept as they are.
//! - `manifest.jsonl` — one [`ManifestEntry`] per recorded sample (one image inverted with one
//!   prompt): ids, the triplet, the class label, the prompt and its relation word, positive or
//!   negative, the reconstruction PSNR, and where its maps are (`shard`, `row`).
//! - `shard-NNNNN.safetensors` — tensors `maps` (f16, `(N, S, 2, C, H, W)`, S = number of step
//!   indices, the subject word's maps first) and `sample` (i64, `(N)`, the sample ids of the rows).
//!
//! [`DatasetWriter`] writes shards atomically (temporary file, then rename) and appends the
//! manifest lines of a shard only once the shard is on disk, so an interrupted build never leaves
//! manifest lines pointing at missing data; reopening the folder resumes it
//! ([`DatasetWriter::completed_samples`]). [`ShardSpec`] splits the work of one build over
//! several processes (part `i/n` records the samples whose id is `i − 1` mod `n`), each writing
//! its own folder, and [`merge`] joins such folders into one.
//! [`Dataset`] reads a folder back, or several parts of one build as one
//! ([`Dataset::open_many`]); [`Dataset::load`] turns every recorded step of every selected
//! sample into one training example.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
pub use l2s_files::ShardSpec;
use l2s_files::{copy_atomic, write_atomic, WriteError};
use l2s_models::weights::safetensors_bytes;
use serde::{Deserialize, Serialize};

use crate::classifier::StepInput;
use crate::maps::MapLayout;

pub const INFO_FILE: &str = "info.json";
pub const MANIFEST_FILE: &str = "manifest.jsonl";
/// Written first into the folder [`merge`] fills and removed last: a folder holding it is an
/// unfinished merge, whose leftovers a rerun may replace.
pub const MERGE_MARKER: &str = ".l2s-merge-unfinished";

/// One attention layer whose heads contribute maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub name: String,
    pub heads: usize,
    /// The layer's own map resolution before resizing.
    pub height: usize,
    pub width: usize,
}

/// `info.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Model id or fingerprint; a classifier only applies to the model whose maps it saw.
    pub model: String,
    /// C: maps per word (sum of the layers' heads).
    pub num_maps: usize,
    /// Side of each stored map.
    pub map_size: usize,
    /// Denoising step indices at which maps were recorded, ascending.
    pub step_indices: Vec<usize>,
    /// Class names; a label is an index into this list.
    pub relations: Vec<String>,
    /// The layers, in the order their heads appear along C.
    pub layers: Vec<LayerInfo>,
    /// Whether each image was also inverted with a wrong-relation prompt.
    pub dual_inversion: bool,
    /// Any other fields, kept as written.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The `model` of maps from an unnamed model (imported published samples): a classifier trained
/// on them is tied to a model by map count and attention resolution, as a published checkpoint
/// is, instead of by fingerprint.
pub const UNNAMED_MODEL: &str = "unnamed";

impl DatasetInfo {
    /// Class index of a relation name.
    pub fn label_of(&self, relation: &str) -> Option<usize> {
        self.relations.iter().position(|r| r == relation)
    }

    /// How the maps were turned into classifier channels (`map_layout`); datasets written
    /// before it was recorded hold [`MapLayout::Ours`].
    pub fn map_layout(&self) -> std::result::Result<MapLayout, String> {
        match self.extra.get(MAP_LAYOUT_FIELD) {
            None => Ok(MapLayout::Ours),
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                format!("\"{MAP_LAYOUT_FIELD}\" is {v}, expected \"ours\" or \"published\"")
            }),
        }
    }

    /// Steps of the sampling runs the maps were recorded in (`num_inference_steps`), when the
    /// build says.
    pub fn num_inference_steps(&self) -> Option<usize> {
        self.extra
            .get("num_inference_steps")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    }

    /// Records the maps' layout in the extra fields.
    pub fn set_map_layout(&mut self, layout: MapLayout) {
        let value = serde_json::to_value(layout).expect("a map layout serialises");
        self.extra.insert(MAP_LAYOUT_FIELD.into(), value);
    }

    /// Checks internal consistency; the message names the offending field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model.trim().is_empty() {
            return Err("\"model\" is empty".into());
        }
        if self.num_maps == 0 || self.map_size == 0 {
            return Err("\"num_maps\" and \"map_size\" must be positive".into());
        }
        if self.step_indices.is_empty() {
            return Err("\"step_indices\" is empty".into());
        }
        if self.step_indices.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "\"step_indices\" {:?} is not strictly ascending",
                self.step_indices
            ));
        }
        if self.relations.is_empty() {
            return Err("\"relations\" is empty".into());
        }
        self.map_layout()?;
        let unique: HashSet<&String> = self.relations.iter().collect();
        if unique.len() != self.relations.len() {
            return Err(format!("\"relations\" {:?} has duplicates", self.relations));
        }
        if !self.layers.is_empty() {
            let heads: usize = self.layers.iter().map(|l| l.heads).sum();
            if heads != self.num_maps {
                return Err(format!(
                    "\"layers\" have {heads} heads in total but \"num_maps\" is {}",
                    self.num_maps
                ));
            }
        }
        Ok(())
    }

    /// The first field (name, this value, other value) in which two datasets differ, ignoring
    /// extra fields.
    pub fn difference(&self, other: &DatasetInfo) -> Option<(&'static str, String, String)> {
        macro_rules! cmp {
            ($f:ident) => {
                if self.$f != other.$f {
                    return Some((
                        stringify!($f),
                        format!("{:?}", self.$f),
                        format!("{:?}", other.$f),
                    ));
                }
            };
        }
        cmp!(model);
        cmp!(num_maps);
        cmp!(map_size);
        cmp!(step_indices);
        cmp!(relations);
        cmp!(layers);
        cmp!(dual_inversion);
        None
    }

    /// [`difference`](Self::difference), then the extra fields that say what the recorded steps
    /// are (`num_inference_steps`): datasets that agree on these can be trained on together.
    pub fn training_difference(&self, other: &DatasetInfo) -> Option<(String, String, String)> {
        self.difference(other)
            .map(|(f, l, r)| (f.to_string(), l, r))
            .or_else(|| self.extra_difference(other, |k| MAP_FIELDS.contains(&k)))
    }

    /// [`difference`](Self::difference), then every extra field (the build's settings: steps,
    /// inversion, PSNR threshold, relation check, seed, …) except those that only say where the
    /// model was read from: datasets that agree on these are parts of one build.
    pub fn settings_difference(&self, other: &DatasetInfo) -> Option<(String, String, String)> {
        self.difference(other)
            .map(|(f, l, r)| (f.to_string(), l, r))
            .or_else(|| self.extra_difference(other, |k| !LOCATION_FIELDS.contains(&k)))
    }

    fn extra_difference(
        &self,
        other: &DatasetInfo,
        compared: impl Fn(&str) -> bool,
    ) -> Option<(String, String, String)> {
        let keys: BTreeSet<&String> = self.extra.keys().chain(other.extra.keys()).collect();
        let show =
            |v: Option<&serde_json::Value>| v.map_or("absent".to_string(), |v| v.to_string());
        keys.into_iter()
            .filter(|k| compared(k))
            .find(|k| self.extra.get(*k) != other.extra.get(*k))
            .map(|k| (k.clone(), show(self.extra.get(k)), show(other.extra.get(k))))
    }
}

/// Extra fields of `info.json` that only say where the model was read from; they may differ
/// between the parts of one build made on different machines.
const LOCATION_FIELDS: [&str; 2] = ["model_folder", "transformer_file"];

/// Extra fields that give the recorded maps and step indices their meaning: datasets that
/// differ in one cannot be trained on together.
const MAP_FIELDS: [&str; 2] = ["num_inference_steps", MAP_LAYOUT_FIELD];

/// The extra field holding [`DatasetInfo::map_layout`].
const MAP_LAYOUT_FIELD: &str = "map_layout";

/// Whether the prompt carried the true relation or a wrong one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleKind {
    Positive,
    Negative,
}

/// What a dataset builder knows about one recorded sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleMeta {
    /// Unique id within the dataset.
    pub sample: u64,
    /// The source image; both prompts of one image share it.
    pub image_id: String,
    pub subject: String,
    pub object: String,
    /// The true relation (canonical name, one of the info's relations).
    pub relation: String,
    /// Class index of `relation`.
    pub label: usize,
    pub prompt: String,
    /// The relation named in the prompt: `relation` for a positive, another one for a negative.
    pub prompt_relation: String,
    pub kind: SampleKind,
    /// Reconstruction PSNR in dB.
    pub psnr: f64,
}

/// One line of `manifest.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    #[serde(flatten)]
    pub meta: SampleMeta,
    /// File name of the shard holding the maps.
    pub shard: String,
    /// Row in that shard.
    pub row: usize,
}

/// Something wrong with a dataset folder; every message names the file (and line).
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{what}: \"{field}\" differs ({left} vs {right})")]
    InfoMismatch {
        what: String,
        field: String,
        left: String,
        right: String,
    },
    #[error("{}: {source}", path.display())]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
    },
    /// Writing a file failed (the message names it).
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Another process writes to the folder (the message names it and the holder).
    #[error(transparent)]
    Lock(#[from] l2s_files::LockError),
    /// The output folder holds files but no dataset: they are not ours to replace.
    #[error(
        "{}: the folder is not empty and holds no dataset (no {INFO_FILE}); refusing to write \
         into it (it holds {first}); give a new or empty folder",
        path.display()
    )]
    NotADataset { path: PathBuf, first: String },
    #[error("no dataset folders given")]
    NoFolders,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that a manifest entry's row exists in its shard (of `rows` rows) and holds its sample
/// (`found`: the id stored at that row).
fn check_row(
    manifest: &Path,
    line: Option<usize>,
    shard: &str,
    e: &ManifestEntry,
    found: Option<u64>,
    rows: usize,
) -> Result<()> {
    match found {
        None => Err(invalid(
            manifest,
            line,
            format!(
                "sample {} points at row {} of {shard}, which has {rows} rows",
                e.meta.sample, e.row
            ),
        )),
        Some(id) if id != e.meta.sample => Err(invalid(
            manifest,
            line,
            format!(
                "sample {}: row {} of {shard} holds sample {id}",
                e.meta.sample, e.row
            ),
        )),
        _ => Ok(()),
    }
}

fn invalid(path: &Path, line: Option<usize>, message: impl Into<String>) -> DatasetError {
    DatasetError::Invalid {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

fn tensor_err(path: &Path) -> impl FnOnce(candle_core::Error) -> DatasetError + '_ {
    move |source| DatasetError::Tensor {
        path: path.to_path_buf(),
        source,
    }
}

type Result<T> = std::result::Result<T, DatasetError>;

/// The file name of shard `index`: `shard-00003.safetensors`.
pub fn shard_name(index: usize) -> String {
    format!("shard-{index:05}.safetensors")
}

/// The index of a shard file name, if it is one.
pub fn parse_shard_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("shard-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn read_info(dir: &Path) -> Result<DatasetInfo> {
    let path = dir.join(INFO_FILE);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    parse_info(&text, &path)
}

/// Parses and checks `info.json`'s text; `path` names it in errors.
pub fn parse_info(text: &str, path: &Path) -> Result<DatasetInfo> {
    let info: DatasetInfo =
        serde_json::from_str(text).map_err(|e| invalid(path, Some(e.line()), e.to_string()))?;
    info.validate().map_err(|m| invalid(path, None, m))?;
    Ok(info)
}

/// Checks one manifest entry against the info.
fn check_entry(info: &DatasetInfo, e: &ManifestEntry) -> std::result::Result<(), String> {
    let m = &e.meta;
    match info.relations.get(m.label) {
        None => {
            return Err(format!(
                "sample {}: label {} is out of range ({} relations)",
                m.sample,
                m.label,
                info.relations.len()
            ))
        }
        Some(r) if *r != m.relation => {
            return Err(format!(
                "sample {}: label {} is {r:?} but relation is {:?}",
                m.sample, m.label, m.relation
            ))
        }
        _ => {}
    }
    match m.kind {
        SampleKind::Positive if m.prompt_relation != m.relation => {
            return Err(format!(
            "sample {}: a positive sample's prompt relation {:?} differs from its relation {:?}",
            m.sample, m.prompt_relation, m.relation
        ))
        }
        SampleKind::Negative if m.prompt_relation == m.relation => {
            return Err(format!(
                "sample {}: a negative sample's prompt relation equals its relation {:?}",
                m.sample, m.relation
            ))
        }
        _ => {}
    }
    if !m.psnr.is_finite() {
        return Err(format!(
            "sample {}: psnr {} is not finite",
            m.sample, m.psnr
        ));
    }
    if parse_shard_name(&e.shard).is_none() {
        return Err(format!(
            "sample {}: shard {:?} is not a shard file name (shard-NNNNN.safetensors)",
            m.sample, e.shard
        ));
    }
    Ok(())
}

/// Parses the manifest. With `repair`, an unterminated, unparsable last line (a write cut short)
/// is cut off the file; without, it is an error.
fn read_manifest(
    dir: &Path,
    info: &DatasetInfo,
    repair: bool,
) -> Result<Vec<(usize, ManifestEntry)>> {
    let path = dir.join(MANIFEST_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut text = String::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(io_err(&path))?;
    let (entries, cut_at) = parse_manifest_lines(&text, &path, info, repair)?;
    if let Some((start, line_no)) = cut_at {
        tracing::warn!(
            "{}: dropping the unfinished last line {line_no}",
            path.display()
        );
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.set_len(start as u64).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))?;
    }
    Ok(entries)
}

/// Parses and checks `manifest.jsonl`'s text against the dataset's info; `path` names it in
/// errors. Each entry comes with its line number.
pub fn parse_manifest(
    text: &str,
    path: &Path,
    info: &DatasetInfo,
) -> Result<Vec<(usize, ManifestEntry)>> {
    parse_manifest_lines(text, path, info, false).map(|(entries, _)| entries)
}

/// Byte offset and line number of a manifest line cut short by an interrupted write.
type CutLine = (usize, usize);

/// Manifest entries with their line numbers.
type NumberedEntries = Vec<(usize, ManifestEntry)>;

/// The entries, and with `allow_cut` the byte offset and line number of an unterminated,
/// unparsable last line (a write cut short) that was left out.
fn parse_manifest_lines(
    text: &str,
    path: &Path,
    info: &DatasetInfo,
    allow_cut: bool,
) -> Result<(NumberedEntries, Option<CutLine>)> {
    let mut out = Vec::new();
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut offset = 0usize;
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        let start = offset;
        offset += raw.len();
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let entry: ManifestEntry = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(err) => {
                let last = !raw.ends_with('\n') && offset == text.len();
                if last && allow_cut {
                    return Ok((out, Some((start, line_no))));
                }
                let hint = if last {
                    " (an unfinished write? reopening the folder with the writer repairs it)"
                } else {
                    ""
                };
                return Err(invalid(path, Some(line_no), format!("{err}{hint}")));
            }
        };
        check_entry(info, &entry).map_err(|m| invalid(path, Some(line_no), m))?;
        if let Some(prev) = seen.insert(entry.meta.sample, line_no) {
            return Err(invalid(
                path,
                Some(line_no),
                format!(
                    "sample {} already appears on line {prev}",
                    entry.meta.sample
                ),
            ));
        }
        out.push((line_no, entry));
    }
    Ok((out, None))
}

/// Appends samples to a dataset folder, one shard at a time. See the module documentation.
///
/// Samples given to [`append`](Self::append) are buffered; every `shard_size` of them become one
/// shard. Call [`finish`](Self::finish) to write the last partial shard: samples still buffered
/// when the writer is dropped are lost, as in a crash, and a resumed build redoes them.
pub struct DatasetWriter {
    dir: PathBuf,
    /// Held while the writer lives: a second build into the folder is refused.
    _lock: l2s_files::FolderLock,
    info: DatasetInfo,
    shard_size: usize,
    pending_meta: Vec<SampleMeta>,
    pending_maps: Vec<Tensor>,
    pending_ids: HashSet<u64>,
    done: HashSet<u64>,
    /// The PSNR of each sample on disk, as its manifest line gives it.
    done_psnr: HashMap<u64, f64>,
    next_shard: usize,
    shards_written: usize,
}

/// The files in `dir` besides its lock, described for a refusal ("a.txt and 3 more"); `None`
/// when there are none.
fn other_files(dir: &Path) -> Result<Option<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != l2s_files::LOCK_FILE)
        .collect();
    names.sort();
    Ok(names.first().map(|first| match names.len() {
        1 => first.clone(),
        n => format!("{first} and {} more", n - 1),
    }))
}

impl DatasetWriter {
    /// Opens `dir` for writing: creates it with `info`, or resumes it when it already holds a
    /// dataset with the same settings (an error names the first differing field). On resume a
    /// cut-short last manifest line is dropped and shard files that no manifest line refers to
    /// (written just before an interruption) are deleted; their samples are not counted as
    /// completed.
    ///
    /// The folder is locked for the writer's life ([`l2s_files::FolderLock`]): a second writer
    /// is refused naming the process that holds it. An existing folder that holds files but no
    /// `info.json` is refused ([`DatasetError::NotADataset`]), so nothing of the user's is
    /// ever removed.
    pub fn open(dir: impl AsRef<Path>, info: DatasetInfo, shard_size: usize) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        info.validate()
            .map_err(|m| invalid(&dir.join(INFO_FILE), None, m))?;
        if shard_size == 0 {
            return Err(invalid(&dir, None, "shard size must be positive"));
        }
        if dir.exists() && !dir.is_dir() {
            return Err(invalid(&dir, None, "exists and is not a folder"));
        }
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock = l2s_files::FolderLock::acquire(&dir)?;
        if let Some(dead) = lock.took_over() {
            tracing::warn!(
                "{}: took over the lock left by {dead}, which no longer runs",
                dir.display()
            );
        }
        let info_path = dir.join(INFO_FILE);
        if !info_path.exists() {
            if let Some(first) = other_files(&dir)? {
                return Err(DatasetError::NotADataset { path: dir, first });
            }
        }
        let info = if info_path.exists() {
            let existing = read_info(&dir)?;
            if let Some((field, left, right)) = existing.difference(&info) {
                return Err(DatasetError::InfoMismatch {
                    what: format!(
                        "cannot resume {}: the existing dataset and the requested settings differ",
                        dir.display()
                    ),
                    field: field.into(),
                    left,
                    right,
                });
            }
            existing
        } else {
            let text = serde_json::to_string_pretty(&info).expect("info serialises");
            write_atomic(&info_path, text.as_bytes())?;
            info
        };

        let entries = read_manifest(&dir, &info, true)?;
        let mut done = HashSet::new();
        let mut done_psnr = HashMap::new();
        let mut referenced = HashSet::new();
        let mut next_shard = 0;
        for (line, e) in &entries {
            if referenced.insert(e.shard.clone()) && !dir.join(&e.shard).exists() {
                return Err(invalid(
                    &dir.join(MANIFEST_FILE),
                    Some(*line),
                    format!("points at the missing shard {}", e.shard),
                ));
            }
            done.insert(e.meta.sample);
            done_psnr.insert(e.meta.sample, e.meta.psnr);
            next_shard = next_shard.max(parse_shard_name(&e.shard).unwrap_or(0) + 1);
        }
        for item in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let item = item.map_err(io_err(&dir))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let orphan = parse_shard_name(&name).is_some() && !referenced.contains(&name);
            let temporary = name.starts_with('.') && name.ends_with(".tmp");
            if orphan || temporary {
                tracing::warn!(
                    "{}: removing {name}, which no manifest line refers to",
                    dir.display()
                );
                fs::remove_file(item.path()).map_err(io_err(&item.path()))?;
            }
        }
        Ok(Self {
            dir,
            _lock: lock,
            info,
            shard_size,
            pending_meta: Vec::new(),
            pending_maps: Vec::new(),
            pending_ids: HashSet::new(),
            done,
            done_psnr,
            next_shard,
            shards_written: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// Samples whose maps and manifest lines are on disk.
    pub fn completed_samples(&self) -> &HashSet<u64> {
        &self.done
    }

    /// The PSNR recorded for a sample on disk.
    pub fn completed_psnr(&self, sample: u64) -> Option<f64> {
        self.done_psnr.get(&sample).copied()
    }

    /// True when a sample is on disk or buffered: a build skips it.
    pub fn contains(&self, sample: u64) -> bool {
        self.done.contains(&sample) || self.pending_ids.contains(&sample)
    }

    /// Buffered samples not yet on disk.
    pub fn pending(&self) -> usize {
        self.pending_meta.len()
    }

    /// Shards written by this writer.
    pub fn shards_written(&self) -> usize {
        self.shards_written
    }

    /// The expected shape of one sample's maps: (S, 2, C, H, W).
    pub fn sample_shape(&self) -> [usize; 5] {
        let i = &self.info;
        [i.step_indices.len(), 2, i.num_maps, i.map_size, i.map_size]
    }

    /// Buffers one sample; `maps` is `(S, 2, C, H, W)` in any float dtype, on any device.
    /// Writes a shard when `shard_size` samples are buffered.
    pub fn append(&mut self, meta: SampleMeta, maps: &Tensor) -> Result<()> {
        let what = format!("sample {}", meta.sample);
        let manifest = self.dir.join(MANIFEST_FILE);
        if self.contains(meta.sample) {
            return Err(invalid(
                &manifest,
                None,
                format!("{what} is already in the dataset"),
            ));
        }
        let probe = ManifestEntry {
            meta,
            shard: shard_name(0),
            row: 0,
        };
        check_entry(&self.info, &probe).map_err(|m| invalid(&manifest, None, m))?;
        let want = self.sample_shape();
        if maps.dims() != want {
            return Err(invalid(
                &manifest,
                None,
                format!(
                    "{what}: maps have shape {:?}, expected {:?} (steps, 2, C, H, W)",
                    maps.dims(),
                    want
                ),
            ));
        }
        let maps = maps
            .to_device(&Device::Cpu)
            .and_then(|m| m.to_dtype(DType::F32))
            .map_err(tensor_err(&manifest))?;
        let sum = maps
            .sum_all()
            .and_then(|s| s.to_scalar::<f32>())
            .map_err(tensor_err(&manifest))?;
        if !sum.is_finite() {
            return Err(invalid(
                &manifest,
                None,
                format!("{what}: maps contain NaN or infinite values"),
            ));
        }
        let maps = maps.to_dtype(DType::F16).map_err(tensor_err(&manifest))?;
        self.pending_ids.insert(probe.meta.sample);
        self.pending_meta.push(probe.meta);
        self.pending_maps.push(maps);
        if self.pending_meta.len() >= self.shard_size {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the buffered samples as one shard, then their manifest lines.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending_meta.is_empty() {
            return Ok(());
        }
        let name = shard_name(self.next_shard);
        let path = self.dir.join(&name);
        let maps = Tensor::stack(&self.pending_maps, 0).map_err(tensor_err(&path))?;
        let ids: Vec<i64> = self.pending_meta.iter().map(|m| m.sample as i64).collect();
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, &Device::Cpu).map_err(tensor_err(&path))?;
        let tensors: HashMap<String, Tensor> =
            [("maps".to_string(), maps), ("sample".to_string(), ids)]
                .into_iter()
                .collect();
        write_atomic(
            &path,
            &safetensors_bytes(&tensors).map_err(tensor_err(&path))?,
        )?;

        let mut lines = String::new();
        for (row, meta) in self.pending_meta.iter().enumerate() {
            let entry = ManifestEntry {
                meta: meta.clone(),
                shard: name.clone(),
                row,
            };
            lines.push_str(&serde_json::to_string(&entry).expect("entry serialises"));
            lines.push('\n');
        }
        let manifest = self.dir.join(MANIFEST_FILE);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&manifest)
            .map_err(io_err(&manifest))?;
        let before = f.metadata().map_err(io_err(&manifest))?.len();
        if let Err(e) = f.write_all(lines.as_bytes()).and_then(|()| f.sync_data()) {
            // A full disk may take part of the lines: cut them off again, so the manifest ends
            // at its last whole batch and the shard just written is an orphan a resumed build
            // deletes (a partly listed shard would be kept with rows the manifest never names).
            let _ = f.set_len(before).and_then(|()| f.sync_data());
            return Err(io_err(&manifest)(e));
        }

        for meta in self.pending_meta.drain(..) {
            self.done.insert(meta.sample);
            self.done_psnr.insert(meta.sample, meta.psnr);
        }
        self.pending_maps.clear();
        self.pending_ids.clear();
        self.next_shard += 1;
        self.shards_written += 1;
        Ok(())
    }

    /// Writes what is buffered; returns the number of samples in the dataset.
    pub fn finish(mut self) -> Result<usize> {
        self.flush()?;
        Ok(self.done.len())
    }
}

/// The examples of a dataset (or of part of it) in memory: one per recorded step of each sample.
#[derive(Debug, Clone)]
pub struct Examples {
    /// `(M, 2, C, H, W)`.
    pub maps: Tensor,
    /// `(M)` u32: position in `recorded_steps`.
    pub steps: Tensor,
    /// `(M)` u32 class indices.
    pub labels: Tensor,
    /// The denoising steps the maps were recorded at (the info's `step_indices`).
    pub recorded_steps: Vec<usize>,
    /// Per example: the source image.
    pub image_ids: Vec<String>,
    /// Per example: the sample id.
    pub samples: Vec<u64>,
    /// Per example: the class index (as in `labels`).
    pub label_list: Vec<u32>,
}

impl Examples {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Gathers a batch `(maps, steps, labels)` by example index, maps converted to `dtype`, all
    /// moved to `device`; the steps as a classifier with `step_input` takes them (the position
    /// in `recorded_steps`, or the denoising step itself).
    pub fn batch(
        &self,
        indices: &[usize],
        dtype: DType,
        device: &Device,
        step_input: StepInput,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, indices.len(), self.maps.device())?;
        let maps = self
            .maps
            .index_select(&idx, 0)?
            .to_device(device)?
            .to_dtype(dtype)?;
        let slots = self.steps.index_select(&idx, 0)?;
        let steps = match step_input {
            StepInput::Slot => slots,
            StepInput::Raw => {
                let raw = slots
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|k| {
                        self.recorded_steps
                            .get(k as usize)
                            .map(|&s| s as u32)
                            .ok_or_else(|| {
                                candle_core::Error::Msg(format!(
                                    "step position {k} is past the {} recorded steps",
                                    self.recorded_steps.len()
                                ))
                            })
                    })
                    .collect::<candle_core::Result<Vec<u32>>>()?;
                Tensor::from_vec(raw, indices.len(), self.maps.device())?
            }
        }
        .to_device(device)?;
        let labels = self.labels.index_select(&idx, 0)?.to_device(device)?;
        Ok((maps, steps, labels))
    }
}

/// A dataset opened for reading: info and manifest parsed and checked, maps not loaded. Either
/// one folder ([`open`](Self::open)) or several parts of one build read as one
/// ([`open_many`](Self::open_many)).
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The folders, in the order given.
    dirs: Vec<PathBuf>,
    info: DatasetInfo,
    entries: Vec<ManifestEntry>,
    /// Per entry: its line in its folder's manifest.
    lines: Vec<usize>,
    /// Per entry: its folder, an index into `dirs`.
    parts: Vec<usize>,
    /// Sample records left out because an earlier folder had them.
    duplicates: usize,
}

/// How strictly [`Dataset::join`] compares the parts' infos.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Join {
    /// Same model, maps, layout, relations and recorded steps.
    Training,
    /// Also every build setting: the parts of one build.
    Merge,
}

/// The first identity field (name, this value, other value) in which two records of one sample
/// id differ. The PSNR is left out: a sample rebuilt elsewhere may differ in its last digits.
fn sample_difference(a: &SampleMeta, b: &SampleMeta) -> Option<(&'static str, String, String)> {
    macro_rules! cmp {
        ($f:ident) => {
            if a.$f != b.$f {
                return Some((stringify!($f), format!("{:?}", a.$f), format!("{:?}", b.$f)));
            }
        };
    }
    cmp!(image_id);
    cmp!(subject);
    cmp!(object);
    cmp!(relation);
    cmp!(label);
    cmp!(prompt);
    cmp!(prompt_relation);
    cmp!(kind);
    None
}

impl Dataset {
    /// Reads `info.json` and `manifest.jsonl` and checks that every shard the manifest names exists.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.join(INFO_FILE).exists() {
            return Err(invalid(
                &dir,
                None,
                "is not a dataset folder: info.json is missing",
            ));
        }
        let info = read_info(&dir)?;
        let parsed = read_manifest(&dir, &info, false)?;
        let mut checked = HashSet::new();
        for (line, e) in &parsed {
            if checked.insert(e.shard.as_str()) && !dir.join(&e.shard).is_file() {
                return Err(invalid(
                    &dir.join(MANIFEST_FILE),
                    Some(*line),
                    format!(
                        "sample {} points at the missing shard {}",
                        e.meta.sample, e.shard
                    ),
                ));
            }
        }
        let (lines, entries): (Vec<usize>, Vec<ManifestEntry>) = parsed.into_iter().unzip();
        Ok(Self {
            dirs: vec![dir],
            info,
            parts: vec![0; entries.len()],
            entries,
            lines,
            duplicates: 0,
        })
    }

    /// Opens several dataset folders as one: their samples in the order given, a sample found
    /// in several folders (the same id, image and prompt) counted once, at its first
    /// occurrence. Refuses folders that disagree on the model, the maps, their layout, the
    /// relations or the recorded steps (naming the field), and a sample id that means
    /// different samples in two folders (separate builds, which number their samples alike,
    /// cannot be joined).
    pub fn open_many<P: AsRef<Path>>(dirs: &[P]) -> Result<Self> {
        let sets = dirs.iter().map(Dataset::open).collect::<Result<Vec<_>>>()?;
        Self::join(sets, Join::Training)
    }

    fn join(sets: Vec<Dataset>, how: Join) -> Result<Self> {
        let Some(first) = sets.first() else {
            return Err(DatasetError::NoFolders);
        };
        let info = first.info.clone();
        let first_dir = first.dirs[0].clone();
        let mut out = Dataset {
            dirs: Vec::new(),
            info,
            entries: Vec::new(),
            lines: Vec::new(),
            parts: Vec::new(),
            duplicates: 0,
        };
        // The entry holding each sample id.
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for set in sets {
            let here = set.dirs[0].clone();
            let differs = match how {
                Join::Training => out.info.training_difference(&set.info),
                Join::Merge => out.info.settings_difference(&set.info),
            };
            if let Some((field, left, right)) = differs {
                let what = match how {
                    Join::Training => "cannot use",
                    Join::Merge => "cannot merge",
                };
                return Err(DatasetError::InfoMismatch {
                    what: format!(
                        "{what} {} together with {}",
                        first_dir.display(),
                        here.display()
                    ),
                    field,
                    left,
                    right,
                });
            }
            let offset = out.dirs.len();
            out.dirs.extend(set.dirs);
            out.duplicates += set.duplicates;
            for (k, e) in set.entries.into_iter().enumerate() {
                let part = offset + set.parts[k];
                if let Some(&prev) = seen.get(&e.meta.sample) {
                    let before = &out.entries[prev];
                    if let Some((field, left, right)) = sample_difference(&before.meta, &e.meta) {
                        return Err(invalid(
                            &out.dirs[part].join(MANIFEST_FILE),
                            Some(set.lines[k]),
                            format!(
                                "sample {} has {field} {right} here but {left} in {}: these are not parts of one build (separate builds number their samples alike)",
                                e.meta.sample,
                                out.dirs[out.parts[prev]].display()
                            ),
                        ));
                    }
                    out.duplicates += 1;
                    continue;
                }
                seen.insert(e.meta.sample, out.entries.len());
                out.entries.push(e);
                out.lines.push(set.lines[k]);
                out.parts.push(part);
            }
        }
        Ok(out)
    }

    /// The folder (the first one, for several).
    pub fn dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// The folders, in the order given.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Sample records left out because an earlier folder had the same sample.
    pub fn duplicates(&self) -> usize {
        self.duplicates
    }

    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// The manifest, in file order (folder after folder).
    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Loads every sample.
    pub fn load_all(&self, dtype: DType) -> Result<Examples> {
        self.load(&(0..self.entries.len()).collect::<Vec<_>>(), dtype)
    }

    /// Loads the samples at the given manifest positions (in that order), each recorded step
    /// becoming one example, maps stored in `dtype` on the CPU (f16 halves the memory; batches are
    /// converted when gathered).
    pub fn load(&self, entry_indices: &[usize], dtype: DType) -> Result<Examples> {
        let s = self.info.step_indices.len();
        let (c, h) = (self.info.num_maps, self.info.map_size);
        // Rows wanted per shard, remembering where each goes in the output.
        let mut by_shard: BTreeMap<(usize, &str), Vec<(usize, usize)>> = BTreeMap::new();
        for (pos, &i) in entry_indices.iter().enumerate() {
            let e = self.entries.get(i).ok_or_else(|| {
                invalid(
                    &self.dirs[0].join(MANIFEST_FILE),
                    None,
                    format!(
                        "entry index {i} out of range ({} entries)",
                        self.entries.len()
                    ),
                )
            })?;
            by_shard
                .entry((self.parts[i], e.shard.as_str()))
                .or_default()
                .push((pos, i));
        }
        let mut pieces: Vec<(Vec<usize>, Tensor)> = Vec::new();
        for ((part, shard), wanted) in by_shard {
            let path = self.dirs[part].join(shard);
            let manifest = self.dirs[part].join(MANIFEST_FILE);
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
                .map_err(|e| invalid(&path, None, format!("cannot read the shard: {e}")))?;
            let maps = tensors
                .get("maps")
                .ok_or_else(|| invalid(&path, None, "has no \"maps\" tensor"))?;
            let ids = tensors
                .get("sample")
                .ok_or_else(|| invalid(&path, None, "has no \"sample\" tensor"))?;
            let ids: Vec<i64> = ids
                .to_dtype(DType::I64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(|e| invalid(&path, None, format!("bad \"sample\" tensor: {e}")))?;
            let dims = maps.dims();
            if dims.len() != 6 || dims[1..] != [s, 2, c, h, h] || dims[0] != ids.len() {
                return Err(invalid(
                    &path,
                    None,
                    format!(
                        "\"maps\" has shape {dims:?}, expected ({}, {s}, 2, {c}, {h}, {h}) for {} sample ids",
                        ids.len(),
                        ids.len()
                    ),
                ));
            }
            if ids.is_empty() {
                return Err(invalid(&path, None, "is empty"));
            }
            let mut rows = Vec::with_capacity(wanted.len());
            let mut positions = Vec::with_capacity(wanted.len());
            for (pos, i) in wanted {
                let e = &self.entries[i];
                let line = Some(self.lines[i]);
                check_row(
                    &manifest,
                    line,
                    shard,
                    e,
                    ids.get(e.row).map(|&id| id as u64),
                    ids.len(),
                )?;
                rows.push(e.row as u32);
                positions.push(pos);
            }
            let n = rows.len();
            let rows = Tensor::from_vec(rows, n, &Device::Cpu).map_err(tensor_err(&path))?;
            let picked = maps
                .index_select(&rows, 0)
                .and_then(|m| m.to_dtype(dtype))
                .map_err(tensor_err(&path))?;
            pieces.push((positions, picked));
        }
        // Back into the requested order.
        let total = entry_indices.len();
        let mut order = vec![(0usize, 0usize); total];
        for (p, (positions, _)) in pieces.iter().enumerate() {
            for (k, &pos) in positions.iter().enumerate() {
                order[pos] = (p, k);
            }
        }
        let maps = if total == 0 {
            Tensor::zeros((0, 2, c, h, h), dtype, &Device::Cpu)
                .map_err(tensor_err(&self.dirs[0]))?
        } else {
            let all = Tensor::cat(&pieces.iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)
                .map_err(tensor_err(&self.dirs[0]))?;
            let offsets: Vec<usize> = pieces
                .iter()
                .scan(0, |acc, (pos, _)| {
                    let o = *acc;
                    *acc += pos.len();
                    Some(o)
                })
                .collect();
            let gather: Vec<u32> = order
                .iter()
                .map(|&(p, k)| (offsets[p] + k) as u32)
                .collect();
            let gather =
                Tensor::from_vec(gather, total, &Device::Cpu).map_err(tensor_err(&self.dirs[0]))?;
            all.index_select(&gather, 0)
                .and_then(|t| t.reshape((total * s, 2, c, h, h)))
                .map_err(tensor_err(&self.dirs[0]))?
        };
        let mut steps = Vec::with_capacity(total * s);
        let mut labels = Vec::with_capacity(total * s);
        let mut image_ids = Vec::with_capacity(total * s);
        let mut samples = Vec::with_capacity(total * s);
        for &i in entry_indices {
            let e = &self.entries[i];
            for k in 0..s {
                steps.push(k as u32);
                labels.push(e.meta.label as u32);
                image_ids.push(e.meta.image_id.clone());
                samples.push(e.meta.sample);
            }
        }
        let m = steps.len();
        let label_list = labels.clone();
        let steps = Tensor::from_vec(steps, m, &Device::Cpu).map_err(tensor_err(&self.dirs[0]))?;
        let labels =
            Tensor::from_vec(labels, m, &Device::Cpu).map_err(tensor_err(&self.dirs[0]))?;
        Ok(Examples {
            maps,
            steps,
            labels,
            recorded_steps: self.info.step_indices.clone(),
            image_ids,
            samples,
            label_list,
        })
    }
}

/// The sample ids of a shard's rows, read from its header and its `sample` tensor only; checks
/// that the file is whole and that `maps` has the shape `info` gives each row.
fn shard_ids(path: &Path, info: &DatasetInfo) -> Result<Vec<u64>> {
    let f = File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    shard_ids_from(f, file_len, path, info)
}

/// [`shard_ids`] of a shard's bytes in memory; `path` names it in errors.
pub fn shard_sample_ids(bytes: &[u8], path: &Path, info: &DatasetInfo) -> Result<Vec<u64>> {
    shard_ids_from(std::io::Cursor::new(bytes), bytes.len() as u64, path, info)
}

fn shard_ids_from(
    mut f: impl Read + Seek,
    file_len: u64,
    path: &Path,
    info: &DatasetInfo,
) -> Result<Vec<u64>> {
    let bad = |message: String| invalid(path, None, message);
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("is too short to be a safetensors file".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > file_len {
        return Err(bad(format!(
            "has a header of {n} bytes in a file of {file_len}: not a safetensors file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the safetensors header is not JSON: {e}")))?;
    let data_len = file_len - 8 - n;
    let tensor = |name: &str| -> Result<(String, Vec<usize>, u64, u64)> {
        let t = header
            .get(name)
            .ok_or_else(|| bad(format!("has no {name:?} tensor")))?;
        let dtype = t["dtype"].as_str().unwrap_or_default().to_string();
        let shape: Option<Vec<usize>> = t["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
        let offsets: Option<Vec<u64>> = t["data_offsets"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        match (shape, offsets.as_deref()) {
            (Some(shape), Some(&[start, end])) if start <= end && end <= data_len => {
                Ok((dtype, shape, start, end))
            }
            _ => Err(bad(format!(
                "the {name:?} tensor's shape or data offsets are missing or past the end of the file (cut short?)"
            ))),
        }
    };
    let (_, maps, _, _) = tensor("maps")?;
    let (dtype, ids_shape, start, end) = tensor("sample")?;
    let s = info.step_indices.len();
    let (c, h) = (info.num_maps, info.map_size);
    if maps.len() != 6 || maps[1..] != [s, 2, c, h, h] {
        return Err(bad(format!(
            "\"maps\" has shape {maps:?}, expected (N, {s}, 2, {c}, {h}, {h})"
        )));
    }
    let rows = maps[0];
    if dtype != "I64" || ids_shape != [rows] || end - start != 8 * rows as u64 {
        return Err(bad(format!(
            "\"sample\" is {dtype} of shape {ids_shape:?}, expected I64 of shape [{rows}] (one id per row of \"maps\")"
        )));
    }
    f.seek(SeekFrom::Start(8 + n + start))
        .map_err(io_err(path))?;
    let mut raw = vec![0u8; (end - start) as usize];
    f.read_exact(&mut raw).map_err(io_err(path))?;
    Ok(raw
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u64)
        .collect())
}

/// Totals of a [`merge`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MergeSummary {
    /// Input folders.
    pub parts: usize,
    /// Samples in the merged dataset.
    pub samples: usize,
    /// Sample records left out because an earlier part had the same sample.
    pub duplicates: usize,
    /// Shard files written.
    pub shards: usize,
}

/// Joins several dataset folders (the parts of a partitioned build) into `out`, which must not
/// hold a dataset yet.
///
/// The parts must agree on the model, the maps and every build setting in `info.json` except
/// where the model was read from (an error names the first differing field); `info.json` is
/// the first part's. A sample in several parts (the same id, image and prompt) is kept once, at
/// its first occurrence; a sample id that means different samples in two parts is refused.
/// Every shard a kept sample points at is checked first: present, whole, `maps` of the
/// dataset's shape, the sample's id in its row. Shards are copied (or, when some of their rows
/// are duplicates, rewritten without them) and renumbered, each atomically; the manifest and
/// then `info.json` are written last, so an interrupted merge can simply be rerun.
pub fn merge(inputs: &[PathBuf], out: &Path) -> Result<MergeSummary> {
    if inputs.is_empty() {
        return Err(invalid(
            out,
            None,
            "nothing to merge: no input folders given",
        ));
    }
    // info.json is written last, so a folder without one holds no finished merge and may be
    // overwritten by a rerun.
    if out.join(INFO_FILE).exists() {
        return Err(invalid(
            out,
            None,
            "already holds a dataset; merge into a new folder",
        ));
    }
    let sets = inputs
        .iter()
        .map(Dataset::open)
        .collect::<Result<Vec<_>>>()?;
    let all = Dataset::join(sets, Join::Merge)?;

    // The kept samples of each source shard, checked against the shard's header.
    let mut used: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
    for (i, e) in all.entries.iter().enumerate() {
        used.entry((all.parts[i], e.shard.as_str()))
            .or_default()
            .push(i);
    }
    let mut rows_in: HashMap<(usize, &str), usize> = HashMap::new();
    for (&(part, shard), kept) in &used {
        let path = all.dirs[part].join(shard);
        let ids = shard_ids(&path, &all.info)?;
        for &i in kept {
            let e = &all.entries[i];
            let line = Some(all.lines[i]);
            let manifest = all.dirs[part].join(MANIFEST_FILE);
            check_row(
                &manifest,
                line,
                shard,
                e,
                ids.get(e.row).copied(),
                ids.len(),
            )?;
        }
        rows_in.insert((part, shard), ids.len());
    }

    if out.exists() && !out.is_dir() {
        return Err(invalid(out, None, "exists and is not a folder"));
    }
    fs::create_dir_all(out).map_err(io_err(out))?;
    let _lock = l2s_files::FolderLock::acquire(out)?;
    // A folder that holds files but no marker of an unfinished merge is the user's: refused,
    // and nothing in it is removed.
    let marker = out.join(MERGE_MARKER);
    if !marker.exists() {
        if let Some(first) = other_files(out)? {
            return Err(DatasetError::NotADataset {
                path: out.to_path_buf(),
                first,
            });
        }
        write_atomic(&marker, b"an l2s data merge is writing this folder\n")?;
    }
    // What an interrupted merge left behind.
    for item in fs::read_dir(out).map_err(io_err(out))? {
        let item = item.map_err(io_err(out))?;
        let name = item.file_name().to_string_lossy().into_owned();
        let leftover = parse_shard_name(&name).is_some()
            || name == MANIFEST_FILE
            || (name.starts_with('.') && name.ends_with(".tmp"));
        if leftover && item.path().is_file() {
            tracing::warn!(
                "{}: removing {name}, left by an unfinished merge",
                out.display()
            );
            fs::remove_file(item.path()).map_err(io_err(&item.path()))?;
        }
    }

    // Where each kept entry goes: (shard name, row).
    let mut placed: Vec<(String, usize)> = vec![(String::new(), 0); all.entries.len()];
    for (next, (&(part, shard), kept)) in used.iter().enumerate() {
        let src = all.dirs[part].join(shard);
        let name = shard_name(next);
        let dst = out.join(&name);
        if kept.len() == rows_in[&(part, shard)] {
            copy_atomic(&src, &dst)?;
            for &i in kept {
                placed[i] = (name.clone(), all.entries[i].row);
            }
        } else {
            // Some rows are duplicates kept from an earlier part: write the others only.
            let mut kept = kept.clone();
            kept.sort_by_key(|&i| all.entries[i].row);
            let tensors = candle_core::safetensors::load(&src, &Device::Cpu)
                .map_err(|e| invalid(&src, None, format!("cannot read the shard: {e}")))?;
            let rows: Vec<u32> = kept.iter().map(|&i| all.entries[i].row as u32).collect();
            let n = rows.len();
            let rows = Tensor::from_vec(rows, n, &Device::Cpu).map_err(tensor_err(&src))?;
            let picked: HashMap<String, Tensor> = ["maps", "sample"]
                .into_iter()
                .map(|k| {
                    let t = tensors
                        .get(k)
                        .ok_or_else(|| invalid(&src, None, format!("has no {k:?} tensor")))?;
                    let t = t.index_select(&rows, 0).map_err(tensor_err(&src))?;
                    Ok((k.to_string(), t))
                })
                .collect::<Result<_>>()?;
            write_atomic(&dst, &safetensors_bytes(&picked).map_err(tensor_err(&dst))?)?;
            for (row, &i) in kept.iter().enumerate() {
                placed[i] = (name.clone(), row);
            }
        }
    }
    let mut lines = String::new();
    for (e, (shard, row)) in all.entries.iter().zip(placed) {
        let entry = ManifestEntry {
            meta: e.meta.clone(),
            shard,
            row,
        };
        lines.push_str(&serde_json::to_string(&entry).expect("entry serialises"));
        lines.push('\n');
    }
    let text = serde_json::to_string_pretty(&all.info).expect("info serialises");
    write_atomic(&out.join(MANIFEST_FILE), lines.as_bytes())?;
    write_atomic(&out.join(INFO_FILE), text.as_bytes())?;
    fs::remove_file(&marker).map_err(io_err(&marker))?;
    Ok(MergeSummary {
        parts: inputs.len(),
        samples: all.entries.len(),
        duplicates: all.duplicates,
        shards: used.len(),
    })
}
