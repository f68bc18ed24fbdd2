//! The published Learn-to-Steer triplet files (their first phase) and an image folder.
//!
//! One split is one folder (`train__size_2000`, …) holding:
//! - `result_metadata.json`: `{flat_data_path, mapping_path, data_source, relations,
//!   attributes}`; `data_source` is `"GQA"` (the default when absent) or `"ORM"`;
//! - `data__FLAT.json`: a JSON list of rows `[img_id, obj1, obj2, relation]` meaning
//!   "obj1 relation obj2" (attribute rows `[img_id, object, attribute, "is"]` too);
//! - `mapping.json`: `{rel_name_to_idx: {name: "index"}, idx_to_rel_name: {index: name}}`,
//!   the relation names sorted, indices as written by the authors (strings in the first map).
//!
//! The paths in the metadata are those of the machine that wrote it; when they do not exist
//! the files are looked for next to the metadata ([`crate::resolve_moved`]). Images are
//! `<images>/<img_id>.jpg` for GQA and `<images>/<img_id>` (a relative path) for ORM.
//!
//! Rows are grouped by image id, in order of first appearance: one record per image with
//! every usable triplet of its rows. A row is left out, and counted, when its relation is not
//! one of the four ([`crate::gqa::kept_relation`]), is missing from the mapping, names the same
//! object twice, repeats a triplet (or its mirror image) of the same image, or is malformed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use l2s_eval::Triplet;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::Deserialize;

use crate::gqa::kept_relation;
use crate::stream::{read_json, stream_json, StopFlag};
use crate::{
    resolve_moved, ControlFlow, Frame, ProblemKind, Problems, ReadSummary, SourceError,
    SourceImage, Split, SplitWeights,
};

/// `result_metadata.json`, the file naming a split's files.
pub const RESULT_METADATA_FILE: &str = "result_metadata.json";
/// The triplet rows' file name.
pub const FLAT_DATA_FILE: &str = "data__FLAT.json";
/// The relation → index mapping's file name.
pub const MAPPING_FILE: &str = "mapping.json";

/// Where the published images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DataSource {
    /// GQA: images are `<img_id>.jpg`.
    Gqa,
    /// The ORM image set: an image id is the image's relative path.
    Orm,
}

/// The published relation → index mapping.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RelationMapping {
    pub name_to_index: BTreeMap<String, usize>,
}

impl RelationMapping {
    /// The index of a relation name, as the published classifier numbers its classes.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.name_to_index.get(name).copied()
    }
}

#[derive(Deserialize)]
struct RawMapping {
    rel_name_to_idx: BTreeMap<String, IndexValue>,
}

/// The authors write indices as strings in `rel_name_to_idx`; numbers are accepted too.
#[derive(Deserialize)]
#[serde(untagged)]
enum IndexValue {
    Number(usize),
    Text(String),
}

/// Reads a `mapping.json`.
pub fn read_mapping(path: impl AsRef<Path>) -> Result<RelationMapping, SourceError> {
    const EXPECTED: &str = "a relation mapping file (an object with rel_name_to_idx)";
    let path = path.as_ref();
    let raw: RawMapping = read_json(path, EXPECTED)?;
    let mut name_to_index = BTreeMap::new();
    for (name, v) in raw.rel_name_to_idx {
        let index = match v {
            IndexValue::Number(n) => n,
            IndexValue::Text(s) => s.trim().parse().map_err(|_| {
                SourceError::format(
                    path,
                    EXPECTED,
                    format!("the index of {name:?} is {s:?}, not a number"),
                )
            })?,
        };
        name_to_index.insert(name, index);
    }
    Ok(RelationMapping { name_to_index })
}

#[derive(Deserialize)]
struct RawMetadata {
    flat_data_path: String,
    mapping_path: String,
    #[serde(default)]
    data_source: Option<String>,
}

/// A split folder's files, found from its `result_metadata.json`.
#[derive(Debug, Clone)]
pub struct TripletFiles {
    pub metadata: PathBuf,
    pub flat_data: PathBuf,
    pub mapping_file: PathBuf,
    pub data_source: DataSource,
    pub mapping: RelationMapping,
}

/// `path` itself, or `path/result_metadata.json` when `path` is a folder.
pub(crate) fn metadata_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(RESULT_METADATA_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Finds a file the metadata names, moved along with the metadata.
pub(crate) fn locate(
    recorded: &str,
    metadata: &Path,
    what: &'static str,
) -> Result<PathBuf, SourceError> {
    let base = metadata.parent().unwrap_or(Path::new("."));
    resolve_moved(Path::new(recorded), base).ok_or_else(|| {
        SourceError::io(
            metadata,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "the {what} it names, {recorded}, exists neither there nor under {}",
                    base.display()
                ),
            ),
        )
    })
}

impl TripletFiles {
    /// Reads a split's `result_metadata.json` (or the one in the folder `path`) and its
    /// mapping.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        const EXPECTED: &str =
            "a published triplet metadata file (an object with flat_data_path and mapping_path)";
        let metadata = metadata_path(path.as_ref());
        let raw: RawMetadata = read_json(&metadata, EXPECTED)?;
        let data_source = match raw.data_source.as_deref() {
            None | Some("GQA") => DataSource::Gqa,
            Some("ORM") => DataSource::Orm,
            Some(other) => {
                return Err(SourceError::format(
                    &metadata,
                    EXPECTED,
                    format!("data_source is {other:?}; expected \"GQA\" or \"ORM\""),
                ))
            }
        };
        let flat_data = locate(&raw.flat_data_path, &metadata, "triplet file")?;
        let mapping_file = locate(&raw.mapping_path, &metadata, "mapping file")?;
        let mapping = read_mapping(&mapping_file)?;
        Ok(Self {
            metadata,
            flat_data,
            mapping_file,
            data_source,
            mapping,
        })
    }
}

/// How [`read_triplets`] reads.
#[derive(Debug, Clone)]
pub struct TripletOptions {
    /// The image folder (GQA's `images/`, or the ORM images' root).
    pub images: PathBuf,
    /// Check that each yielded record's image file exists (default true).
    pub check_images: bool,
    pub split_weights: SplitWeights,
}

impl TripletOptions {
    pub fn new(images: impl Into<PathBuf>) -> Self {
        Self {
            images: images.into(),
            check_images: true,
            split_weights: SplitWeights::default(),
        }
    }
}

/// Reads a published split (its folder or its `result_metadata.json`), calling `on_image`
/// with one record per image. Stops early, without error, on [`ControlFlow::Break`].
pub fn read_triplets(
    path: impl AsRef<Path>,
    opts: &TripletOptions,
    problems: &mut Problems,
    mut on_image: impl FnMut(SourceImage) -> ControlFlow<()>,
) -> Result<ReadSummary, SourceError> {
    let files = TripletFiles::open(path)?;
    let file = files.flat_data.as_path();
    let mut rows = Vec::new();
    let stop = StopFlag::default();
    stream_json(
        file,
        "a published triplet file (a JSON list of [img_id, obj1, obj2, relation] rows)",
        &stop,
        Rows(&mut rows),
    )?;

    let mut summary = ReadSummary::default();
    // Image id → (its triplets), in order of first appearance.
    let mut order: Vec<String> = Vec::new();
    let mut per_image: HashMap<String, Vec<Triplet>> = HashMap::new();
    for (k, row) in rows.into_iter().enumerate() {
        summary.seen += 1;
        let rid = format!("row {k}");
        let (id, a, b, rel) = match parse_row(&row) {
            Ok(r) => r,
            Err(msg) => {
                problems.push(file, rid, ProblemKind::BadRecord, msg);
                continue;
            }
        };
        let what = || format!("{id}: {a} {rel} {b}");
        let Some(relation) = kept_relation(&rel) else {
            problems.push(file, rid, ProblemKind::RelationNotKept, what());
            continue;
        };
        if files.mapping.index(&rel).is_none() {
            problems.push(file, rid, ProblemKind::NotInMapping, what());
            continue;
        }
        if a == b {
            problems.push(file, rid, ProblemKind::SameName, what());
            continue;
        }
        let triplets = per_image.entry(id.clone()).or_insert_with(|| {
            order.push(id.clone());
            Vec::new()
        });
        let repeated = triplets.iter().any(|t| {
            (t.subject == a && t.object == b && t.relation == relation)
                || (t.subject == b && t.object == a && t.relation == relation.inverse())
        });
        if repeated {
            problems.push(file, rid, ProblemKind::RepeatedRelation, what());
            continue;
        }
        triplets.push(Triplet::new(a, relation, b));
    }

    for id in order {
        let triplets = per_image.remove(&id).unwrap_or_default();
        let path = match files.data_source {
            DataSource::Gqa => opts.images.join(format!("{id}.jpg")),
            DataSource::Orm => opts.images.join(&id),
        };
        if opts.check_images && !path.is_file() {
            let shown = path.display().to_string();
            problems.push(file, &id, ProblemKind::MissingImage, shown);
            continue;
        }
        summary.yielded += 1;
        let split = Split::of(&id, &opts.split_weights);
        let record = SourceImage {
            id,
            path,
            size: None,
            frame: Frame::Stored,
            objects: Vec::new(),
            triplets,
            derived_from_boxes: false,
            split,
        };
        if on_image(record).is_break() {
            summary.stopped = true;
            break;
        }
    }
    Ok(summary)
}

/// `[img_id, obj1, obj2, relation, …]` → its four strings (an id may be a number).
fn parse_row(row: &serde_json::Value) -> Result<(String, String, String, String), String> {
    let items = row
        .as_array()
        .ok_or_else(|| format!("{row} is not a list"))?;
    if items.len() < 4 {
        return Err(format!("{row} has {} items, expected 4", items.len()));
    }
    let text = |v: &serde_json::Value, what: &str| match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) if what == "img_id" => Ok(n.to_string()),
        other => Err(format!("{what} is {other}, expected a string")),
    };
    Ok((
        text(&items[0], "img_id")?,
        text(&items[1], "obj1")?,
        text(&items[2], "obj2")?,
        text(&items[3], "relation")?,
    ))
}

/// The rows of a flat triplet file, each kept as JSON until checked (a bad row is a record
/// problem, not a file error).
struct Rows<'a>(&'a mut Vec<serde_json::Value>);

impl<'de> DeserializeSeed<'de> for Rows<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Rows<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON list of [img_id, obj1, obj2, relation] rows")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(row) = seq.next_element::<serde_json::Value>()? {
            self.0.push(row);
        }
        Ok(())
    }
}
