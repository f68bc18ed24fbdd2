//! COCO instance annotations (`instances_*.json`) and their image folder.
//!
//! The file's sections are read by a serde visitor over the top-level object: `images`
//! (id, file_name, width, height), `annotations` (image_id, category_id, bbox `[x, y, w, h]`,
//! iscrowd; segmentations are skipped unparsed into memory) and `categories` (id, name); any
//! other section is skipped. Only these compact rows are held (40 bytes an annotation: ids
//! are integers, as COCO defines them), never the file's text or segmentations.
//!
//! Per image (file order), over its annotations:
//! 1. a category is usable when it has exactly one non-crowd instance and no crowd
//!    annotation (else [`ProblemKind::MultipleInstances`] / [`ProblemKind::CrowdCategory`]);
//!    every instance counts, however small, since a second small dog still makes "the dog"
//!    ambiguous;
//! 2. a usable category's box must have both sides at least [`CocoOptions::min_box_side`]
//!    pixels (default 32) and cover at least [`CocoOptions::min_box_area_fraction`] of the
//!    image (default 0), else [`ProblemKind::SmallBox`];
//! 3. the remaining objects, ordered by category id, form pairs `(a, b)` with `a` before `b`;
//!    a pair is a triplet when GenEval's rule ([`l2s_eval::relations`]) gives exactly one
//!    relation of `a` to `b` (else [`ProblemKind::NoRelation`] / [`ProblemKind::TwoRelations`]);
//!    each unordered pair appears once;
//! 4. at most [`CocoOptions::max_per_image`] triplets are kept (default all: they are derived,
//!    not asserted, and a builder picks among them).
//!
//! Names are COCO's category names; boxes are in stored pixels ([`Frame::Stored`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use l2s_eval::{relations, BBox, Triplet};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::stream::{stream_json, StopFlag};
use crate::{
    ControlFlow, Frame, NamedBox, ProblemKind, Problems, ReadSummary, SourceError, SourceImage,
    Split, SplitWeights,
};

/// How [`read_coco`] selects.
#[derive(Debug, Clone)]
pub struct CocoOptions {
    /// The folder holding the images' `file_name`s.
    pub images: PathBuf,
    /// Both sides of a box at least this many pixels (default 32).
    pub min_box_side: f32,
    /// A box's area at least this share of the image's (default 0: no area rule).
    pub min_box_area_fraction: f32,
    /// Triplets per image (default `usize::MAX`).
    pub max_per_image: usize,
    /// Check that each yielded record's image file exists (default true).
    pub check_images: bool,
    pub split_weights: SplitWeights,
}

impl CocoOptions {
    pub fn new(images: impl Into<PathBuf>) -> Self {
        Self {
            images: images.into(),
            min_box_side: 32.0,
            min_box_area_fraction: 0.0,
            max_per_image: usize::MAX,
            check_images: true,
            split_weights: SplitWeights::default(),
        }
    }
}

#[derive(Deserialize)]
struct Image {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct Annotation {
    image_id: u64,
    category_id: u64,
    bbox: [f32; 4],
    #[serde(default)]
    iscrowd: u8,
}

#[derive(Deserialize)]
struct Category {
    id: u64,
    name: String,
}

const EXPECTED: &str =
    "a COCO instances file (a JSON object with images, annotations and categories)";

#[derive(Default)]
struct Sections {
    images: Option<Vec<Image>>,
    annotations: Option<Vec<Annotation>>,
    categories: Option<Vec<Category>>,
}

struct TopLevel<'a>(&'a mut Sections);

impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object with images, annotations and categories")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let section = |name: &str, e: A::Error| {
            <A::Error as serde::de::Error>::custom(format!("section {name}: {e}"))
        };
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "images" => self.0.images = Some(map.next_value().map_err(|e| section(&key, e))?),
                "annotations" => {
                    self.0.annotations = Some(map.next_value().map_err(|e| section(&key, e))?)
                }
                "categories" => {
                    self.0.categories = Some(map.next_value().map_err(|e| section(&key, e))?)
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Reads a COCO instances file, calling `on_image` with each image that has at least one
/// triplet (see the module documentation). Stops early, without error, when `on_image` returns
/// [`ControlFlow::Break`].
pub fn read_coco(
    path: impl AsRef<Path>,
    opts: &CocoOptions,
    problems: &mut Problems,
    mut on_image: impl FnMut(SourceImage) -> ControlFlow<()>,
) -> Result<ReadSummary, SourceError> {
    let path = path.as_ref();
    let mut sections = Sections::default();
    // Reading the sections has no early stop; the flag stays unset.
    let stop = StopFlag::default();
    stream_json(path, EXPECTED, &stop, TopLevel(&mut sections))?;
    let missing =
        |name: &str| SourceError::format(path, EXPECTED, format!("it has no \"{name}\" section"));
    let images = sections.images.ok_or_else(|| missing("images"))?;
    let annotations = sections.annotations.ok_or_else(|| missing("annotations"))?;
    let categories = sections.categories.ok_or_else(|| missing("categories"))?;

    let mut category_names: HashMap<u64, String> = HashMap::new();
    for c in categories {
        if category_names.contains_key(&c.id) {
            let cid = format!("category {}", c.id);
            problems.push(path, cid, ProblemKind::DuplicateId, c.name);
            continue;
        }
        category_names.insert(c.id, c.name);
    }
    // The first entry of each image id (a later one is a duplicate, counted below).
    let mut first_of: HashMap<u64, usize> = HashMap::new();
    for (k, img) in images.iter().enumerate() {
        first_of.entry(img.id).or_insert(k);
    }
    // Annotations grouped by image, in file order.
    let mut per_image: Vec<Vec<&Annotation>> = vec![Vec::new(); images.len()];
    for a in &annotations {
        let aid = || format!("image {} category {}", a.image_id, a.category_id);
        let Some(&k) = first_of.get(&a.image_id) else {
            problems.push(path, aid(), ProblemKind::UnknownImage, "");
            continue;
        };
        if !category_names.contains_key(&a.category_id) {
            problems.push(path, aid(), ProblemKind::UnknownCategory, "");
            continue;
        }
        per_image[k].push(a);
    }

    let mut summary = ReadSummary::default();
    let mut seen = HashSet::new();
    for (k, img) in images.iter().enumerate() {
        summary.seen += 1;
        if !seen.insert(img.id) {
            let (iid, why) = (img.id.to_string(), "later entry skipped");
            problems.push(path, iid, ProblemKind::DuplicateId, why);
            continue;
        }
        let Some(record) = select(img, &per_image[k], &category_names, opts, path, problems) else {
            continue;
        };
        summary.yielded += 1;
        if on_image(record).is_break() {
            summary.stopped = true;
            break;
        }
    }
    Ok(summary)
}

fn select(
    img: &Image,
    anns: &[&Annotation],
    names: &HashMap<u64, String>,
    opts: &CocoOptions,
    file: &Path,
    problems: &mut Problems,
) -> Option<SourceImage> {
    let id = &img.id.to_string();
    // Per category, ordered by id: its non-crowd boxes, and whether it has a crowd annotation.
    let mut per_cat: BTreeMap<u64, (Vec<BBox>, bool)> = BTreeMap::new();
    for a in anns {
        let entry = per_cat.entry(a.category_id).or_default();
        if a.iscrowd != 0 {
            entry.1 = true;
        } else {
            let [x, y, w, h] = a.bbox;
            entry.0.push(BBox::from_xywh(x, y, w, h));
        }
    }
    let image_area = img.width as f32 * img.height as f32;
    let mut objects: Vec<NamedBox> = Vec::new();
    for (cat, (boxes, crowd)) in &per_cat {
        let name = &names[cat];
        let oid = || format!("{id}/{name}");
        if *crowd {
            problems.push(file, oid(), ProblemKind::CrowdCategory, "");
            continue;
        }
        if boxes.len() != 1 {
            let n = format!("{} instances", boxes.len());
            problems.push(file, oid(), ProblemKind::MultipleInstances, n);
            continue;
        }
        let b = boxes[0];
        if !b.is_finite() || b.x1 < b.x0 || b.y1 < b.y0 {
            problems.push(file, oid(), ProblemKind::BadBox, format!("{:?}", b.xywh()));
            continue;
        }
        let small_side = b.width() < opts.min_box_side || b.height() < opts.min_box_side;
        let small_area = image_area > 0.0 && b.area() < opts.min_box_area_fraction * image_area;
        if small_side || small_area {
            let size = format!("{}x{}", b.width(), b.height());
            problems.push(file, oid(), ProblemKind::SmallBox, size);
            continue;
        }
        objects.push(NamedBox::new(name.clone(), b));
    }
    let mut triplets = Vec::new();
    for i in 0..objects.len() {
        for j in i + 1..objects.len() {
            let (a, b) = (&objects[i], &objects[j]);
            let set: Vec<_> = relations(&a.bbox, &b.bbox).iter().collect();
            let pair = || format!("{id}/{}+{}", a.name, b.name);
            match set.as_slice() {
                [r] if triplets.len() < opts.max_per_image => {
                    triplets.push(Triplet::new(a.name.clone(), *r, b.name.clone()))
                }
                [r] => problems.push(
                    file,
                    pair(),
                    ProblemKind::BeyondPerImageLimit,
                    r.to_string(),
                ),
                [] => problems.push(file, pair(), ProblemKind::NoRelation, ""),
                _ => problems.push(file, pair(), ProblemKind::TwoRelations, ""),
            }
        }
    }
    if triplets.is_empty() {
        problems.push(file, id, ProblemKind::NoTriplet, "");
        return None;
    }
    let path = opts.images.join(&img.file_name);
    if opts.check_images && !path.is_file() {
        problems.push(
            file,
            id,
            ProblemKind::MissingImage,
            path.display().to_string(),
        );
        return None;
    }
    Some(SourceImage {
        id: id.clone(),
        path,
        size: Some((img.width, img.height)),
        frame: Frame::Stored,
        objects,
        triplets,
        derived_from_boxes: true,
        split: Split::of(id, &opts.split_weights),
    })
}
