//! GQA scene graphs (`train_sceneGraphs.json`, `val_sceneGraphs.json`) and their image folder.
//!
//! The file is one JSON object, image id → `{width, height, objects: {object id → {name, x, y,
//! w, h, attributes, relations: [{name, object}]}}}`, about a gigabyte for train. It is read
//! one image at a time by a serde visitor over the top-level object; only the current image's
//! scene graph is held.
//!
//! Per image, in file order (names read in their singular form, [`GqaOptions::singular_names`]):
//! 1. an object is usable unless its name occurs more than once in the image
//!    ([`ProblemKind::RepeatedName`], when [`GqaOptions::unique_names`]), its name and another
//!    name of the image form an is-a pair in [`GqaOptions::hypernyms`] (both names out,
//!    [`ProblemKind::HypernymPair`]), or its box is invalid;
//! 2. each relation of a usable object is a candidate when its name is one of the four kept
//!    ([`kept_relation`]: "to the left of", "to the right of", "above", "below", exactly as
//!    GQA writes them; "on top of", "under", "next to" … are not kept), its target exists and
//!    is usable and has another name, and neither it nor its mirror image ("B right of A" after
//!    "A left of B") was taken already;
//! 3. the first [`GqaOptions::max_per_image`] candidates (default 1: one relation per image
//!    first) become the record's triplets; an image without any is counted
//!    ([`ProblemKind::NoTriplet`]), as is one whose `<images>/<id>.jpg` is missing.
//!
//! Every object, relation and image left out is counted in [`Problems`]. Boxes are GQA's
//! `x, y, w, h` in stored pixels ([`Frame::Stored`]).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use l2s_eval::{BBox, Relation, Triplet};
use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::Deserialize;

use crate::stream::{stream_json, Ordered, StopFlag};
use crate::{
    singular_name, ControlFlow, Frame, Hypernyms, NamedBox, ProblemKind, Problems, ReadSummary,
    SourceError, SourceImage, Split, SplitWeights,
};

/// The relation a kept GQA (or published triplet) relation name stands for: exactly "to the
/// left of", "to the right of", "above" or "below"; every other name gives `None`.
pub fn kept_relation(name: &str) -> Option<Relation> {
    match name {
        "to the left of" => Some(Relation::LeftOf),
        "to the right of" => Some(Relation::RightOf),
        "above" => Some(Relation::Above),
        "below" => Some(Relation::Below),
        _ => None,
    }
}

/// How [`read_gqa`] selects.
#[derive(Debug, Clone)]
pub struct GqaOptions {
    /// The folder holding `<image id>.jpg`.
    pub images: PathBuf,
    /// Is-a pairs that make two names ambiguous ([`Hypernyms::builtin`] by default).
    pub hypernyms: Hypernyms,
    /// Leave out objects whose name occurs more than once in the image (default true).
    pub unique_names: bool,
    /// Triplets per image (default 1). A first pass with 1 gives every image one relation;
    /// a larger limit (or `usize::MAX`) gives more where more are needed.
    pub max_per_image: usize,
    /// Check that each yielded record's image file exists (default true).
    pub check_images: bool,
    /// Read every object name in its singular form ([`singular_name`]) before selecting, as
    /// the published data builder does (default true): "trees" and "tree" are then one name.
    pub singular_names: bool,
    pub split_weights: SplitWeights,
}

impl GqaOptions {
    pub fn new(images: impl Into<PathBuf>) -> Self {
        Self {
            images: images.into(),
            hypernyms: Hypernyms::builtin(),
            unique_names: true,
            max_per_image: 1,
            check_images: true,
            singular_names: true,
            split_weights: SplitWeights::default(),
        }
    }
}

#[derive(Deserialize)]
struct Scene {
    width: u32,
    height: u32,
    objects: Ordered<Object>,
}

#[derive(Deserialize)]
struct Object {
    name: String,
    x: f32,
    y: f32,
    w: f32,
    h: f32,
    #[serde(default)]
    relations: Vec<Rel>,
}

#[derive(Deserialize)]
struct Rel {
    name: String,
    object: String,
}

const EXPECTED: &str =
    "a GQA scene-graph file (a JSON object of image ids to {width, height, objects})";

/// Streams a GQA scene-graph file, calling `on_image` with each selected image (see the
/// module documentation for the selection). Stops early, without error, when `on_image`
/// returns [`ControlFlow::Break`].
pub fn read_gqa(
    path: impl AsRef<Path>,
    opts: &GqaOptions,
    problems: &mut Problems,
    mut on_image: impl FnMut(SourceImage) -> ControlFlow<()>,
) -> Result<ReadSummary, SourceError> {
    let path = path.as_ref();
    let stop = StopFlag::default();
    let mut summary = ReadSummary::default();
    let mut seen_ids = HashSet::new();
    let seed = TopLevel {
        file: path,
        opts,
        problems,
        on_image: &mut on_image,
        stop: &stop,
        summary: &mut summary,
        seen_ids: &mut seen_ids,
    };
    stream_json(path, EXPECTED, &stop, seed)?;
    summary.stopped = stop.stopped();
    Ok(summary)
}

struct TopLevel<'a, F> {
    file: &'a Path,
    opts: &'a GqaOptions,
    problems: &'a mut Problems,
    on_image: &'a mut F,
    stop: &'a StopFlag,
    summary: &'a mut ReadSummary,
    seen_ids: &'a mut HashSet<String>,
}

impl<'de, F: FnMut(SourceImage) -> ControlFlow<()>> DeserializeSeed<'de> for TopLevel<'_, F> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(SourceImage) -> ControlFlow<()>> Visitor<'de> for TopLevel<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of image ids to scene graphs")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(id) = map.next_key::<String>()? {
            let mut scene: Scene = map.next_value().map_err(|e| {
                <A::Error as serde::de::Error>::custom(format!("image {id:?}: {e}"))
            })?;
            if self.opts.singular_names {
                for (_, o) in &mut scene.objects.0 {
                    o.name = singular_name(&o.name);
                }
            }
            self.summary.seen += 1;
            if !self.seen_ids.insert(id.clone()) {
                self.problems.push(
                    self.file,
                    &id,
                    ProblemKind::DuplicateId,
                    "later entry skipped",
                );
                continue;
            }
            let Some(record) = select(&id, &scene, self.opts, self.file, self.problems) else {
                continue;
            };
            self.summary.yielded += 1;
            if (self.on_image)(record).is_break() {
                return Err(self.stop.stop());
            }
        }
        Ok(())
    }
}

/// Applies the selection to one image.
fn select(
    id: &str,
    scene: &Scene,
    opts: &GqaOptions,
    file: &Path,
    problems: &mut Problems,
) -> Option<SourceImage> {
    let objects = &scene.objects.0;
    let mut name_counts: HashMap<&str, usize> = HashMap::new();
    for (_, o) in objects {
        *name_counts.entry(o.name.as_str()).or_insert(0) += 1;
    }
    let mut names: Vec<&str> = Vec::new();
    for (_, o) in objects {
        if !names.contains(&o.name.as_str()) {
            names.push(&o.name);
        }
    }
    let in_pairs: HashSet<&str> = opts.hypernyms.in_pairs(&names).into_iter().collect();

    // Why each object is unusable, if it is.
    let mut unusable: HashMap<&str, ProblemKind> = HashMap::new();
    for (oid, o) in objects {
        let b = BBox::from_xywh(o.x, o.y, o.w, o.h);
        let reason = if !b.is_finite() || o.w < 0.0 || o.h < 0.0 {
            Some(ProblemKind::BadBox)
        } else if opts.unique_names && name_counts[o.name.as_str()] > 1 {
            Some(ProblemKind::RepeatedName)
        } else if in_pairs.contains(o.name.as_str()) {
            Some(ProblemKind::HypernymPair)
        } else {
            None
        };
        if let Some(kind) = reason {
            problems.push(file, format!("{id}/{oid}"), kind, o.name.clone());
            unusable.insert(oid, kind);
        }
    }
    let by_id: HashMap<&str, &Object> = objects.iter().map(|(k, o)| (k.as_str(), o)).collect();

    // Candidates in file order: (subject id, relation, object id).
    let mut taken: Vec<(&str, Relation, &str)> = Vec::new();
    // With repeated names allowed, a name must still mean one box within a record.
    let mut bound: HashMap<&str, &str> = HashMap::new();
    for (sid, s) in objects {
        if unusable.contains_key(sid.as_str()) {
            continue;
        }
        for rel in &s.relations {
            let rid = || format!("{id}/{sid}");
            let Some(relation) = kept_relation(&rel.name) else {
                problems.push(file, rid(), ProblemKind::RelationNotKept, rel.name.clone());
                continue;
            };
            let Some(target) = by_id.get(rel.object.as_str()) else {
                problems.push(
                    file,
                    rid(),
                    ProblemKind::UnknownObject,
                    format!("{} {}", rel.name, rel.object),
                );
                continue;
            };
            if let Some(kind) = unusable.get(rel.object.as_str()) {
                let detail = format!("{} {} {}", s.name, rel.name, target.name);
                problems.push(file, rid(), *kind, detail);
                continue;
            }
            let what = || format!("{} {} {}", s.name, rel.name, target.name);
            if target.name == s.name {
                problems.push(file, rid(), ProblemKind::SameName, what());
                continue;
            }
            let oid = rel.object.as_str();
            let repeated = taken.iter().any(|&(a, r, b)| {
                (a == sid && r == relation && b == oid)
                    || (a == oid && r == relation.inverse() && b == sid)
            });
            if repeated {
                problems.push(file, rid(), ProblemKind::RepeatedRelation, what());
                continue;
            }
            let clash = |name: &str, obj: &str| bound.get(name).is_some_and(|&o| o != obj);
            if clash(&s.name, sid) || clash(&target.name, oid) {
                problems.push(file, rid(), ProblemKind::RepeatedName, what());
                continue;
            }
            if taken.len() >= opts.max_per_image {
                problems.push(file, rid(), ProblemKind::BeyondPerImageLimit, what());
                continue;
            }
            bound.insert(&s.name, sid);
            bound.insert(&target.name, oid);
            taken.push((sid, relation, oid));
        }
    }
    if taken.is_empty() {
        problems.push(file, id, ProblemKind::NoTriplet, "");
        return None;
    }
    let path = opts.images.join(format!("{id}.jpg"));
    if opts.check_images && !path.is_file() {
        problems.push(
            file,
            id,
            ProblemKind::MissingImage,
            path.display().to_string(),
        );
        return None;
    }
    // Usable objects in file order, one per name: the instance a triplet names, else the first.
    let mut record_objects: Vec<NamedBox> = Vec::new();
    for (oid, o) in objects {
        if unusable.contains_key(oid.as_str()) {
            continue;
        }
        let keep = match bound.get(o.name.as_str()) {
            Some(&b) => b == oid,
            None => !record_objects.iter().any(|r| r.name == o.name),
        };
        if keep {
            record_objects.push(NamedBox::new(
                o.name.clone(),
                BBox::from_xywh(o.x, o.y, o.w, o.h),
            ));
        }
    }
    let triplets = taken
        .iter()
        .map(|&(a, r, b)| Triplet::new(by_id[a].name.clone(), r, by_id[b].name.clone()))
        .collect();
    Some(SourceImage {
        id: id.to_string(),
        path,
        size: Some((scene.width, scene.height)),
        frame: Frame::Stored,
        objects: record_objects,
        triplets,
        derived_from_boxes: false,
        split: Split::of(id, &opts.split_weights),
    })
}
