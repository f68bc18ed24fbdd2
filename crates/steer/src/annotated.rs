//! The images a dataset is built from, whatever their source: the shapes renderer's folders,
//! GQA scene graphs, COCO instances, the published triplet files, or plain JSONL. Each becomes an
//! [`AnnotatedImage`] at the model's size, its boxes and relations mapped onto the fitted pixels;
//! photos stay on disk until their samples run, so a source of thousands of images is not held
//! in memory. Images that cannot be used are listed and counted in [`Problems`], never fatal.

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use image::RgbImage;
use l2s_eval::{BBox, Triplet};
use l2s_sources::{
    load_source_image, probe_source_image, Fit, ProblemKind, Problems, SourceImage,
    DEFAULT_MIN_VISIBLE,
};

use crate::error::{Context, Result};

/// An image with named boxes (pixel xyxy) and, when its source says, its relations.
pub struct AnnotatedImage {
    pub id: String,
    pub image: ImageData,
    pub objects: Vec<(String, BBox)>,
    /// The relations the source asserts, on the fitted image; empty: the builder reads a pair
    /// from the boxes.
    pub triplets: Vec<Triplet>,
}

/// An image's pixels, or where to read them.
pub enum ImageData {
    /// Already at the model's size (rendered scenes).
    Pixels(RgbImage),
    /// A photo, decoded and fitted when its samples run.
    File {
        record: SourceImage,
        size: u32,
        fit: Fit,
    },
}

impl AnnotatedImage {
    /// The side of the image at the model's size (rendered scenes: their width).
    pub fn side(&self) -> u32 {
        match &self.image {
            ImageData::Pixels(p) => p.width(),
            ImageData::File { size, .. } => *size,
        }
    }

    /// The image at the model's size.
    pub fn pixels(&self) -> Result<Cow<'_, RgbImage>> {
        match &self.image {
            ImageData::Pixels(p) => Ok(Cow::Borrowed(p)),
            ImageData::File { record, size, fit } => {
                Ok(Cow::Owned(load_source_image(record, *size, *fit)?.image))
            }
        }
    }
}

/// Where a build's images come from.
#[derive(Clone, Debug)]
pub enum BuildSource {
    /// A folder with the shapes renderer's `annotations.json` and its images.
    Shapes(PathBuf),
    /// GQA `*_sceneGraphs.json` and the folder of `<id>.jpg`.
    Gqa {
        scene_graphs: PathBuf,
        images: PathBuf,
    },
    /// COCO `instances_*.json` and its image folder.
    Coco { instances: PathBuf, images: PathBuf },
    /// The published phase-1 triplet folder (or its `result_metadata.json`) and its images.
    Triplets { path: PathBuf, images: PathBuf },
    /// One JSON object per line: `{image, subject, relation, object}` (optional boxes).
    Jsonl(PathBuf),
}

impl BuildSource {
    /// The file or folder read, for messages and metadata.
    pub fn describe(&self) -> String {
        match self {
            BuildSource::Shapes(d) => format!("shapes folder {}", d.display()),
            BuildSource::Gqa { scene_graphs, .. } => {
                format!("GQA scene graphs {}", scene_graphs.display())
            }
            BuildSource::Coco { instances, .. } => format!("COCO {}", instances.display()),
            BuildSource::Triplets { path, .. } => format!("triplet files {}", path.display()),
            BuildSource::Jsonl(p) => format!("JSONL {}", p.display()),
        }
    }
}

/// The images read from a source and what was left out.
pub struct ReadImages {
    pub images: Vec<AnnotatedImage>,
    /// Records the source held that were looked at.
    pub seen: usize,
    pub problems: Problems,
}

/// Reads up to `limit` usable images from `source`, fitted to `size`×`size` with `fit`
/// (rendered scenes are used at their own size). Each photo is decoded once here to map its
/// boxes onto the fitted image, and again when its samples run.
pub fn read_images(
    source: &BuildSource,
    size: u32,
    fit: Fit,
    limit: Option<usize>,
) -> Result<ReadImages> {
    let limit = limit.unwrap_or(usize::MAX);
    let mut problems = Problems::new();
    if let BuildSource::Shapes(dir) = source {
        let images = read_shapes(dir, limit)?;
        return Ok(ReadImages {
            seen: images.len(),
            images,
            problems,
        });
    }
    let mut records = Vec::new();
    let mut keep = |r: SourceImage| {
        records.push(r);
        if records.len() >= limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let what = source.describe();
    let summary = match source {
        BuildSource::Shapes(_) => unreachable!("handled above"),
        BuildSource::Gqa {
            scene_graphs,
            images,
        } => l2s_sources::gqa::read_gqa(
            scene_graphs,
            &l2s_sources::gqa::GqaOptions::new(images),
            &mut problems,
            &mut keep,
        ),
        BuildSource::Coco { instances, images } => l2s_sources::coco::read_coco(
            instances,
            &l2s_sources::coco::CocoOptions::new(images),
            &mut problems,
            &mut keep,
        ),
        BuildSource::Triplets { path, images } => l2s_sources::authors::read_triplets(
            path,
            &l2s_sources::authors::TripletOptions::new(images),
            &mut problems,
            &mut keep,
        ),
        BuildSource::Jsonl(path) => l2s_sources::jsonl::read_jsonl(
            path,
            &l2s_sources::jsonl::JsonlOptions::default(),
            &mut problems,
            &mut keep,
        ),
    }
    .with_context(|| format!("reading {what}"))?;
    let mut images = Vec::with_capacity(records.len());
    for record in records {
        if let Some(img) = fit_record(record, size, fit, &mut problems) {
            images.push(img);
        }
    }
    Ok(ReadImages {
        images,
        seen: summary.seen,
        problems,
    })
}

/// A record on the fitted image, or `None` (listed in `problems`) when its image cannot be
/// read or the fit cut off every object its triplets name. Only the image's header is read
/// here; its pixels are decoded once, when its samples run.
fn fit_record(
    record: SourceImage,
    size: u32,
    fit: Fit,
    problems: &mut Problems,
) -> Option<AnnotatedImage> {
    let loaded = match probe_source_image(&record, size, fit) {
        Ok(l) => l,
        Err(e) => {
            problems.push_image_error(record.id.clone(), &e);
            return None;
        }
    };
    if let Some((w, h)) = record.size {
        if loaded.stored_size != (w, h) {
            let (sw, sh) = loaded.stored_size;
            problems.push(
                &record.path,
                record.id.clone(),
                ProblemKind::SizeMismatch,
                format!("annotated {w}x{h}, the file is {sw}x{sh}"),
            );
            return None;
        }
    }
    let mapped = record.mapped(&loaded.transform, DEFAULT_MIN_VISIBLE);
    for c in &mapped.cut {
        problems.push(
            &record.path,
            record.id.clone(),
            ProblemKind::CutByCrop,
            format!("{}: {:.0} % of its box left", c.name, 100.0 * c.visible),
        );
    }
    if mapped.triplets.is_empty() {
        problems.push(
            &record.path,
            record.id.clone(),
            ProblemKind::NoTriplet,
            "no relation left on the fitted image".to_string(),
        );
        return None;
    }
    Some(AnnotatedImage {
        id: record.id.clone(),
        objects: mapped.object_list(),
        triplets: mapped.triplets,
        image: ImageData::File { record, size, fit },
    })
}

/// The shapes renderer's folder (`l2s shapes render`): scenes at their own size, relations read
/// from the boxes.
fn read_shapes(dir: &Path, limit: usize) -> Result<Vec<AnnotatedImage>> {
    let ds = l2s_shapes::read_dataset(dir)
        .with_context(|| format!("reading annotated images from {}", dir.display()))?;
    ds.images
        .iter()
        .take(limit)
        .map(|img| {
            Ok(AnnotatedImage {
                id: img.id.to_string(),
                image: ImageData::Pixels(img.load()?),
                objects: img
                    .objects
                    .iter()
                    .map(|o| (o.class.name().to_string(), o.bbox))
                    .collect(),
                triplets: Vec::new(),
            })
        })
        .collect()
}
