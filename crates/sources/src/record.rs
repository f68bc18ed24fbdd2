//! The one record every reader yields.

use std::path::PathBuf;

use l2s_eval::{relations, BBox, Triplet};
use serde::Serialize;

use crate::{BoxTransform, Split};

/// The smallest share of an object's box that must stay inside a cropped image
/// ([`SourceImage::mapped`]) for the object to count as shown.
pub const DEFAULT_MIN_VISIBLE: f32 = 0.5;

/// A named object and its box (pixel xyxy in the record's [`Frame`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedBox {
    pub name: String,
    pub bbox: BBox,
}

impl NamedBox {
    pub fn new(name: impl Into<String>, bbox: BBox) -> Self {
        Self {
            name: name.into(),
            bbox,
        }
    }
}

/// Which pixels a record's boxes and relations refer to.
///
/// GQA and COCO were annotated on the pixels as stored (their width and height are the stored
/// ones, and the published pipeline opens images without applying EXIF orientation); turning
/// such an image upright would make "left of" read "above". A person describing a photo
/// describes it as displayed, EXIF orientation applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    /// The pixels in file order; EXIF orientation ignored.
    Stored,
    /// The image as a viewer shows it; EXIF orientation applied.
    Displayed,
}

/// One image of a source: where it is, its named boxes, and the relations the source asserts.
///
/// Object names are unique within a record. `objects` holds every object the reader found
/// usable (for GQA and COCO, more than the triplets name); a triplet may name an object with
/// no box (the published triplet files carry none). Triplets read `subject relation object`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceImage {
    /// The source's image id (GQA's and COCO's ids; for JSONL the line's `id`, else `file:line`).
    pub id: String,
    pub path: PathBuf,
    /// The image's size as the source annotates it (width, height), when it says.
    pub size: Option<(u32, u32)>,
    pub frame: Frame,
    pub objects: Vec<NamedBox>,
    pub triplets: Vec<Triplet>,
    /// True when the triplets were read from the boxes by GenEval's rule (COCO) rather than
    /// asserted; [`SourceImage::mapped`] then checks them again on the mapped boxes.
    pub derived_from_boxes: bool,
    /// The image's split, fixed by its id ([`Split::of`]).
    pub split: Split,
}

/// An object [`SourceImage::mapped`] found cut off by the crop.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CutObject {
    pub name: String,
    /// Share of its box inside the image.
    pub visible: f32,
}

/// A record's boxes and triplets on a loaded image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MappedImage {
    /// Boxes in the loaded image's pixels, clipped to it.
    pub objects: Vec<NamedBox>,
    /// The triplets whose objects are still shown (and, when derived from boxes, whose
    /// relation still holds alone on the mapped boxes).
    pub triplets: Vec<Triplet>,
    /// Objects left with less than the minimum visible share.
    pub cut: Vec<CutObject>,
    /// Derived triplets whose relation changed on the mapped boxes.
    pub changed: Vec<Triplet>,
}

impl MappedImage {
    /// The boxes as `(name, box)` pairs, the form the dataset builder's annotated images take.
    pub fn object_list(&self) -> Vec<(String, BBox)> {
        self.objects
            .iter()
            .map(|o| (o.name.clone(), o.bbox))
            .collect()
    }
}

impl SourceImage {
    /// The box of the object called `name`, if the record has one.
    pub fn object(&self, name: &str) -> Option<&NamedBox> {
        self.objects.iter().find(|o| o.name == name)
    }

    /// Maps the boxes onto a loaded image. An object with less than `min_visible` of its box
    /// inside the image is cut: its box and the triplets naming it are dropped and it is
    /// listed. Derived triplets are checked again on the mapped boxes, since clipping and an
    /// unequal resize can change GenEval's reading.
    pub fn mapped(&self, transform: &BoxTransform, min_visible: f32) -> MappedImage {
        let mut objects = Vec::new();
        let mut cut = Vec::new();
        for o in &self.objects {
            let m = transform.map_box(&o.bbox);
            if m.visible >= min_visible {
                objects.push(NamedBox::new(o.name.clone(), m.bbox));
            } else {
                cut.push(CutObject {
                    name: o.name.clone(),
                    visible: m.visible,
                });
            }
        }
        let is_cut = |name: &str| cut.iter().any(|c| c.name == name);
        let find = |name: &str| objects.iter().find(|o: &&NamedBox| o.name == name);
        let mut triplets = Vec::new();
        let mut changed = Vec::new();
        for t in &self.triplets {
            if is_cut(&t.subject) || is_cut(&t.object) {
                continue;
            }
            if self.derived_from_boxes {
                if let (Some(a), Some(b)) = (find(&t.subject), find(&t.object)) {
                    let set: Vec<_> = relations(&a.bbox, &b.bbox).iter().collect();
                    if set != [t.relation] {
                        changed.push(t.clone());
                        continue;
                    }
                }
            }
            triplets.push(t.clone());
        }
        MappedImage {
            objects,
            triplets,
            cut,
            changed,
        }
    }
}

/// What a reader did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReadSummary {
    /// Records the file holds that the reader looked at (images, lines, rows, samples).
    pub seen: usize,
    /// Records handed to the callback.
    pub yielded: usize,
    /// The callback stopped the reading before the end of the file.
    pub stopped: bool,
}
