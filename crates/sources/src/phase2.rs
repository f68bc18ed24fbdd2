//! The published Learn-to-Steer training samples (their second phase): per-sample metadata
//! and the cross-attention maps saved with `torch.save`.
//!
//! A split folder holds `result_metadata.json` — `{result_data_path, mapping_path,
//! orig_map_size, target_map_size}` — naming `result_data.json`, a JSON list of samples:
//!
//! ```json
//! {"flux_output_path": "...", "prompt": "A dog to the left of a cat", "timestep": 1,
//!  "cross_attn_maps_paths": [".../cross_attn__T_1__obj_0.pth", ".../cross_attn__T_1__obj_1.pth"],
//!  "rel_objects": ["dog", "cat"], "gt_relation_name": "to the left of",
//!  "img_id": "2370799", "prompt_type": "pos"}
//! ```
//!
//! Each `.pth` holds one tensor of shape (C, S, S): one map per layer and head of the
//! object's word (C = layers × heads, S = `target_map_size`), bfloat16 from the FLUX
//! pipelines. The two files are the subject's and the object's maps; `timestep` is the
//! denoising step index the maps were taken at; `prompt_type` is `"pos"` for the true prompt
//! and `"neg"` for a prompt naming another relation; `gt_relation_name` is the true relation
//! either way.
//!
//! Tensors are read with [`l2s_torch_pickle`], which executes nothing and refuses any pickle
//! that names a class or function other than plain containers and tensor rebuilders. The
//! paths in the files are the writing machine's; missing ones are looked for under the folder
//! of the file naming them ([`crate::resolve_moved`]).

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use l2s_eval::Relation;
use l2s_torch_pickle::{TorchFile, Value};
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::Deserialize;

use crate::authors::{locate, metadata_path, read_mapping, RelationMapping};
use crate::gqa::kept_relation;
use crate::stream::{read_json, stream_json, IdString, StopFlag};
use crate::{ControlFlow, ProblemKind, Problems, ReadSummary, SourceError};

/// The samples' file name.
pub const RESULT_DATA_FILE: &str = "result_data.json";

/// Which prompt the maps were recorded under.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum PromptType {
    /// `"pos"`: the prompt names the true relation.
    Positive,
    /// `"neg"`: the prompt names another relation.
    Negative,
    /// Any other value, as written.
    Other(String),
}

impl PromptType {
    fn parse(s: &str) -> Self {
        match s {
            "pos" => Self::Positive,
            "neg" => Self::Negative,
            other => Self::Other(other.to_string()),
        }
    }
}

/// One published sample.
#[derive(Debug, Clone)]
pub struct Phase2Sample {
    /// Position in `result_data.json` (0-based).
    pub index: usize,
    pub img_id: String,
    pub prompt: Option<String>,
    pub prompt_type: PromptType,
    /// The true relation of subject to object.
    pub relation: Relation,
    /// The relation's index in the published mapping, when a mapping was read.
    pub authors_label: Option<usize>,
    /// The denoising step index the maps were taken at.
    pub timestep: i64,
    /// Subject and object names (`rel_objects`), when given.
    pub objects: Option<[String; 2]>,
    /// `augmentation_type`, when given and not empty.
    pub augmentation: Option<String>,
    /// The two `.pth` files read.
    pub map_paths: [PathBuf; 2],
    /// (2, C, S, S) float32 on the requested device: subject's maps, then object's.
    pub maps: Tensor,
}

/// What a published split's metadata says.
#[derive(Debug, Clone)]
pub struct Phase2Files {
    pub metadata: PathBuf,
    pub result_data: PathBuf,
    pub mapping: RelationMapping,
    /// `orig_map_size` (the attention resolution), when given.
    pub orig_map_size: Option<i64>,
    /// `target_map_size` (S), when given and positive.
    pub target_map_size: Option<i64>,
}

#[derive(Deserialize)]
struct RawMetadata {
    result_data_path: String,
    mapping_path: String,
    #[serde(default)]
    orig_map_size: Option<i64>,
    #[serde(default)]
    target_map_size: Option<i64>,
}

impl Phase2Files {
    /// Reads a split's `result_metadata.json` (or the one in the folder `path`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        const EXPECTED: &str =
            "a published sample metadata file (an object with result_data_path and mapping_path)";
        let metadata = metadata_path(path.as_ref());
        let raw: RawMetadata = read_json(&metadata, EXPECTED)?;
        let result_data = locate(&raw.result_data_path, &metadata, "sample file")?;
        let mapping = read_mapping(locate(&raw.mapping_path, &metadata, "mapping file")?)?;
        Ok(Self {
            metadata,
            result_data,
            mapping,
            orig_map_size: raw.orig_map_size,
            target_map_size: raw.target_map_size.filter(|&s| s > 0),
        })
    }
}

/// How [`read_phase2`] reads.
#[derive(Debug, Clone)]
pub struct Phase2Options {
    /// Where the map tensors go.
    pub device: Device,
    /// Refuse maps whose side is not the metadata's `target_map_size` (default true).
    pub check_map_size: bool,
}

impl Default for Phase2Options {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            check_map_size: true,
        }
    }
}

/// Reads a published split (its folder or its `result_metadata.json`), calling `on_sample`
/// for each sample whose maps read cleanly. Stops early, without error, on
/// [`ControlFlow::Break`].
pub fn read_phase2(
    path: impl AsRef<Path>,
    opts: &Phase2Options,
    problems: &mut Problems,
    on_sample: impl FnMut(Phase2Sample) -> ControlFlow<()>,
) -> Result<ReadSummary, SourceError> {
    let files = Phase2Files::open(path)?;
    let size = files.target_map_size.filter(|_| opts.check_map_size);
    read_phase2_samples(
        &files.result_data,
        Some(&files.mapping),
        size,
        opts,
        problems,
        on_sample,
    )
}

#[derive(Deserialize)]
struct RawSample {
    cross_attn_maps_paths: Vec<String>,
    gt_relation_name: String,
    timestep: i64,
    img_id: IdString,
    prompt_type: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    rel_objects: Option<Vec<String>>,
    #[serde(default)]
    augmentation_type: Option<String>,
}

/// Reads a `result_data.json` directly. With a `mapping`, relations missing from it are
/// counted ([`ProblemKind::NotInMapping`]); with a `map_size`, maps of another side are.
pub fn read_phase2_samples(
    result_data: impl AsRef<Path>,
    mapping: Option<&RelationMapping>,
    map_size: Option<i64>,
    opts: &Phase2Options,
    problems: &mut Problems,
    mut on_sample: impl FnMut(Phase2Sample) -> ControlFlow<()>,
) -> Result<ReadSummary, SourceError> {
    let file = result_data.as_ref();
    let stop = StopFlag::default();
    let mut summary = ReadSummary::default();
    let seed = Samples {
        ctx: Context {
            file,
            base: file.parent().unwrap_or(Path::new(".")),
            mapping,
            map_size,
            opts,
        },
        problems,
        on_sample: &mut on_sample,
        stop: &stop,
        summary: &mut summary,
    };
    stream_json(
        file,
        "a published sample file (a JSON list of samples with cross_attn_maps_paths, gt_relation_name, timestep, img_id, prompt_type)",
        &stop,
        seed,
    )?;
    summary.stopped = stop.stopped();
    Ok(summary)
}

struct Context<'a> {
    file: &'a Path,
    base: &'a Path,
    mapping: Option<&'a RelationMapping>,
    map_size: Option<i64>,
    opts: &'a Phase2Options,
}

struct Samples<'a, F> {
    ctx: Context<'a>,
    problems: &'a mut Problems,
    on_sample: &'a mut F,
    stop: &'a StopFlag,
    summary: &'a mut ReadSummary,
}

impl<'de, F: FnMut(Phase2Sample) -> ControlFlow<()>> DeserializeSeed<'de> for Samples<'_, F> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Phase2Sample) -> ControlFlow<()>> Visitor<'de> for Samples<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON list of samples")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while let Some(raw) = seq.next_element::<RawSample>().map_err(|e| {
            <A::Error as serde::de::Error>::custom(format!("sample {}: {e}", self.summary.seen))
        })? {
            self.summary.seen += 1;
            if let Some(sample) = self.ctx.sample(index, raw, self.problems) {
                self.summary.yielded += 1;
                if (self.on_sample)(sample).is_break() {
                    return Err(self.stop.stop());
                }
            }
            index += 1;
        }
        Ok(())
    }
}

impl Context<'_> {
    fn sample(
        &self,
        index: usize,
        raw: RawSample,
        problems: &mut Problems,
    ) -> Option<Phase2Sample> {
        let sid = format!("sample {index}");
        let file = self.file;
        let Some(relation) = kept_relation(&raw.gt_relation_name) else {
            let what = raw.gt_relation_name.clone();
            problems.push(file, sid, ProblemKind::RelationNotKept, what);
            return None;
        };
        let authors_label = match self.mapping {
            Some(m) => match m.index(&raw.gt_relation_name) {
                Some(i) => Some(i),
                None => {
                    let what = raw.gt_relation_name.clone();
                    problems.push(file, sid, ProblemKind::NotInMapping, what);
                    return None;
                }
            },
            None => None,
        };
        let [p0, p1] = raw.cross_attn_maps_paths.as_slice() else {
            let n = raw.cross_attn_maps_paths.len();
            let what = format!("{n} map paths, expected 2");
            problems.push(file, sid, ProblemKind::BadRecord, what);
            return None;
        };
        let mut paths = Vec::with_capacity(2);
        for recorded in [p0, p1] {
            match crate::resolve_moved(Path::new(recorded), self.base) {
                Some(p) => paths.push(p),
                None => {
                    problems.push(file, sid, ProblemKind::MissingMaps, recorded.clone());
                    return None;
                }
            }
        }
        let mut maps = Vec::with_capacity(2);
        for p in &paths {
            match self.read_map(p) {
                Ok(t) => maps.push(t),
                Err((kind, msg)) => {
                    problems.push(file, sid, kind, msg);
                    return None;
                }
            }
        }
        if maps[0].dims() != maps[1].dims() {
            let what = format!(
                "subject maps {:?} and object maps {:?} differ",
                maps[0].dims(),
                maps[1].dims()
            );
            problems.push(file, sid, ProblemKind::BadMaps, what);
            return None;
        }
        let maps = match Tensor::stack(&maps, 0) {
            Ok(t) => t,
            Err(e) => {
                problems.push(file, sid, ProblemKind::BadMaps, e.to_string());
                return None;
            }
        };
        let objects = match raw.rel_objects.as_deref() {
            Some([a, b]) => Some([a.clone(), b.clone()]),
            _ => None,
        };
        let [path0, path1]: [PathBuf; 2] = paths.try_into().expect("two paths");
        Some(Phase2Sample {
            index,
            img_id: raw.img_id.0,
            prompt: raw.prompt,
            prompt_type: PromptType::parse(&raw.prompt_type),
            relation,
            authors_label,
            timestep: raw.timestep,
            objects,
            augmentation: raw.augmentation_type.filter(|s| !s.is_empty()),
            map_paths: [path0, path1],
            maps,
        })
    }

    /// One `.pth`: a single (C, S, S) floating-point tensor, as float32.
    fn read_map(&self, path: &Path) -> Result<Tensor, (ProblemKind, String)> {
        let unreadable = |e: l2s_torch_pickle::Error| (ProblemKind::UnreadableMaps, e.to_string());
        let bad = |m: String| (ProblemKind::BadMaps, format!("{}: {m}", path.display()));
        let mut f = TorchFile::open(path).map_err(unreadable)?;
        let Value::Tensor(t) = f.root().clone() else {
            return Err(bad(format!(
                "holds a {}, expected one tensor",
                f.root().type_name()
            )));
        };
        if t.shape.len() != 3 {
            return Err(bad(format!("shape {:?}, expected (C, S, S)", t.shape)));
        }
        if t.shape[1] != t.shape[2] {
            return Err(bad(format!("shape {:?}: maps not square", t.shape)));
        }
        if let Some(s) = self.map_size {
            if t.shape[1] as i64 != s {
                return Err(bad(format!(
                    "shape {:?}, expected maps of side {s} (target_map_size)",
                    t.shape
                )));
            }
        }
        let float = matches!(
            t.storage.dtype.candle_dtype(),
            Some(DType::F32 | DType::F16 | DType::BF16 | DType::F64)
        );
        if !float {
            return Err(bad(format!(
                "dtype {}, expected a floating-point tensor",
                t.storage.dtype.torch_name()
            )));
        }
        f.tensor_as("maps", &t, DType::F32, &self.opts.device)
            .map_err(unreadable)
    }
}
