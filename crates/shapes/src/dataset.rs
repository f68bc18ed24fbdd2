//! Scene-set folders: PNG images, COCO-style `annotations.json`, `relations.jsonl`.
//!
//! Layout of a folder:
//! ```text
//! images/000000.png …
//! annotations.json   COCO: info, images (file_name relative to the folder),
//!                    annotations (bbox [x, y, w, h] in pixels), categories
//! relations.jsonl    one line per ordered pair of objects in an image:
//!                    {"image_id", "a", "b", "a_id", "b_id", "relations": [...]}
//! ```
//! Every file is written to a temporary name and renamed into place, and
//! `annotations.json` is written last, so a reader never sees a half-written file.

use std::fs;
use std::path::{Path, PathBuf};

use image::RgbImage;
use l2s_eval::{BBox, RelationSet};
use l2s_files::write_atomic;
use serde::{Deserialize, Serialize};

use crate::render::{pair_relations, render_scene};
use crate::{RenderConfig, Scene, SceneObject, ShapeClass, ShapesError};

/// Name of the COCO file in a dataset folder.
pub const ANNOTATIONS_FILE: &str = "annotations.json";
/// Name of the relations file in a dataset folder.
pub const RELATIONS_FILE: &str = "relations.jsonl";
/// Folder of the images inside a dataset folder.
pub const IMAGES_DIR: &str = "images";

/// How a folder was made (stored as COCO `info`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneSetInfo {
    pub description: String,
    pub seed: u64,
    /// First scene index rendered (scenes `first_index .. first_index + count`).
    pub first_index: u64,
    pub render: RenderConfig,
}

#[derive(Debug, Serialize, Deserialize)]
struct CocoFile {
    info: SceneSetInfo,
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct CocoAnnotation {
    id: u64,
    image_id: u64,
    category_id: u32,
    bbox: [f32; 4],
    area: f32,
    iscrowd: u8,
    /// The square the silhouette was drawn into, [x, y, w, h].
    frame: [f32; 4],
}

#[derive(Debug, Serialize, Deserialize)]
struct CocoCategory {
    id: u32,
    name: String,
    supercategory: String,
    color: [u8; 3],
}

#[derive(Debug, Serialize, Deserialize)]
struct RelationLine {
    image_id: u64,
    a: ShapeClass,
    b: ShapeClass,
    a_id: u64,
    b_id: u64,
    relations: RelationSet,
}

/// One image of a dataset folder, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneImage {
    /// Scene index (the COCO image id).
    pub id: u64,
    /// Path of the PNG.
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    pub objects: Vec<SceneObject>,
}

impl SceneImage {
    /// Loads the PNG as RGB.
    pub fn load(&self) -> Result<RgbImage, ShapesError> {
        let bytes =
            l2s_files::read_capped(&self.path, l2s_files::MAX_IMAGE_BYTES).map_err(|e| {
                ShapesError::Format {
                    path: self.path.clone(),
                    msg: e.reason(),
                }
            })?;
        let decoded = match image::ImageFormat::from_path(&self.path) {
            Ok(format) => image::load_from_memory_with_format(&bytes, format),
            Err(_) => image::load_from_memory(&bytes),
        };
        let img = decoded.map_err(|source| ShapesError::Image {
            path: self.path.clone(),
            source,
        })?;
        Ok(img.to_rgb8())
    }

    /// Loads the image and pairs it with its objects.
    pub fn scene(&self) -> Result<Scene, ShapesError> {
        Ok(Scene {
            index: self.id,
            objects: self.objects.clone(),
            image: self.load()?,
        })
    }
}

/// A dataset folder read back.
#[derive(Debug, Clone)]
pub struct SceneSet {
    pub root: PathBuf,
    pub info: SceneSetInfo,
    pub images: Vec<SceneImage>,
}

/// Renders scenes `0..count` of `config` with `seed` into `dir` (created if
/// needed; existing files of the same names are replaced).
pub fn generate(
    dir: &Path,
    config: &RenderConfig,
    count: usize,
    seed: u64,
) -> Result<SceneSet, ShapesError> {
    config.validate()?;
    let info = SceneSetInfo {
        description: format!("shapes world: {count} images of {0}x{0}", config.size),
        seed,
        first_index: 0,
        render: config.clone(),
    };
    let scenes = (0..count as u64).map(|i| render_scene(config, seed, i));
    write_scenes(dir, info, scenes)
}

/// Writes scenes (produced lazily, so large sets need not be held in memory)
/// into `dir` and returns what a later [`read_dataset`] would.
pub fn write_scenes<I>(dir: &Path, info: SceneSetInfo, scenes: I) -> Result<SceneSet, ShapesError>
where
    I: IntoIterator<Item = Result<Scene, ShapesError>>,
{
    let images_dir = dir.join(IMAGES_DIR);
    // The images an earlier render listed: those this one does not replace are removed once it
    // is written, so the folder never holds images its annotations do not describe. Nothing
    // else in the folder is touched.
    let earlier: Vec<String> = read_dataset_file(dir)
        .map(|coco| coco.images.into_iter().map(|im| im.file_name).collect())
        .unwrap_or_default();
    fs::create_dir_all(&images_dir).map_err(|source| ShapesError::Io {
        path: images_dir.clone(),
        source,
    })?;

    let mut coco = CocoFile {
        info,
        images: Vec::new(),
        annotations: Vec::new(),
        categories: categories(),
    };
    let mut relations = String::new();
    let mut out = Vec::new();
    let mut next_ann = 1u64;
    for scene in scenes {
        let scene = scene?;
        let name = format!("{IMAGES_DIR}/{:06}.png", scene.index);
        let path = dir.join(&name);
        write_png(&path, &scene.image)?;
        let (width, height) = scene.image.dimensions();
        coco.images.push(CocoImage {
            id: scene.index,
            file_name: name,
            width,
            height,
        });
        let first_ann = next_ann;
        for o in &scene.objects {
            coco.annotations.push(CocoAnnotation {
                id: next_ann,
                image_id: scene.index,
                category_id: o.class.index() as u32 + 1,
                bbox: o.bbox.xywh(),
                area: o.bbox.area(),
                iscrowd: 0,
                frame: o.frame.xywh(),
            });
            next_ann += 1;
        }
        for p in pair_relations(&scene.objects) {
            let line = RelationLine {
                image_id: scene.index,
                a: scene.objects[p.a].class,
                b: scene.objects[p.b].class,
                a_id: first_ann + p.a as u64,
                b_id: first_ann + p.b as u64,
                relations: p.relations,
            };
            relations.push_str(&serde_json::to_string(&line).expect("serialisable"));
            relations.push('\n');
        }
        out.push(SceneImage {
            id: scene.index,
            path,
            width,
            height,
            objects: scene.objects,
        });
    }
    write_atomic(&dir.join(RELATIONS_FILE), relations.as_bytes())?;
    let json = serde_json::to_vec_pretty(&coco).expect("serialisable");
    write_atomic(&dir.join(ANNOTATIONS_FILE), &json)?;
    let written: std::collections::HashSet<&str> =
        coco.images.iter().map(|im| im.file_name.as_str()).collect();
    for name in earlier.iter().filter(|n| !written.contains(n.as_str())) {
        let ours = name
            .strip_prefix(&format!("{IMAGES_DIR}/"))
            .and_then(|n| n.strip_suffix(".png"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let path = dir.join(name);
        if ours && path.is_file() {
            fs::remove_file(&path).map_err(|source| ShapesError::Io { path, source })?;
        }
    }
    Ok(SceneSet {
        root: dir.to_path_buf(),
        info: coco.info,
        images: out,
    })
}

fn categories() -> Vec<CocoCategory> {
    ShapeClass::ALL
        .iter()
        .map(|c| CocoCategory {
            id: c.index() as u32 + 1,
            name: c.name().to_string(),
            supercategory: "shape".to_string(),
            color: c.color(),
        })
        .collect()
}

/// The largest `annotations.json` read.
pub const MAX_ANNOTATIONS_BYTES: u64 = 1 << 30;

/// `dir/annotations.json` parsed, every `file_name` checked to stay inside `dir`.
fn read_dataset_file(dir: &Path) -> Result<CocoFile, ShapesError> {
    let path = dir.join(ANNOTATIONS_FILE);
    let text = l2s_files::read_text_capped(&path, MAX_ANNOTATIONS_BYTES).map_err(|e| {
        ShapesError::Format {
            path: path.clone(),
            msg: format!("cannot read: {e}"),
        }
    })?;
    let coco: CocoFile = serde_json::from_str(&text).map_err(|source| ShapesError::Json {
        path: path.clone(),
        source,
    })?;
    for im in &coco.images {
        if let Some(why) = l2s_files::check_relative(&im.file_name) {
            return Err(ShapesError::Format {
                path: path.clone(),
                msg: format!("image {}: file_name {:?} is {why}", im.id, im.file_name),
            });
        }
    }
    Ok(coco)
}

/// Reads a folder written by [`generate`] / [`write_scenes`].
pub fn read_dataset(dir: &Path) -> Result<SceneSet, ShapesError> {
    let path = dir.join(ANNOTATIONS_FILE);
    let coco = read_dataset_file(dir)?;
    let mut cat_class = std::collections::HashMap::new();
    for c in &coco.categories {
        let class = ShapeClass::from_word(&c.name).ok_or_else(|| ShapesError::Format {
            path: path.clone(),
            msg: format!("category {} names no shape class: {:?}", c.id, c.name),
        })?;
        cat_class.insert(c.id, class);
    }
    let mut images: Vec<SceneImage> = coco
        .images
        .iter()
        .map(|im| SceneImage {
            id: im.id,
            path: dir.join(&im.file_name),
            width: im.width,
            height: im.height,
            objects: Vec::new(),
        })
        .collect();
    let pos: std::collections::HashMap<u64, usize> = images
        .iter()
        .enumerate()
        .map(|(i, im)| (im.id, i))
        .collect();
    for a in &coco.annotations {
        let class = *cat_class
            .get(&a.category_id)
            .ok_or_else(|| ShapesError::Format {
                path: path.clone(),
                msg: format!("annotation {} has unknown category {}", a.id, a.category_id),
            })?;
        let i = *pos.get(&a.image_id).ok_or_else(|| ShapesError::Format {
            path: path.clone(),
            msg: format!("annotation {} refers to missing image {}", a.id, a.image_id),
        })?;
        let [x, y, w, h] = a.bbox;
        let [fx, fy, fw, fh] = a.frame;
        images[i].objects.push(SceneObject {
            class,
            frame: BBox::from_xywh(fx, fy, fw, fh),
            bbox: BBox::from_xywh(x, y, w, h),
        });
    }
    Ok(SceneSet {
        root: dir.to_path_buf(),
        info: coco.info,
        images,
    })
}

/// Encodes `image` as PNG and writes it atomically.
pub fn write_png(path: &Path, image: &RgbImage) -> Result<(), ShapesError> {
    let mut buf = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|source| ShapesError::Image {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(write_atomic(path, buf.get_ref())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RenderConfig::default();
        let ds = generate(dir.path(), &cfg, 25, 5).unwrap();
        assert_eq!(ds.images.len(), 25);
        let back = read_dataset(dir.path()).unwrap();
        assert_eq!(back.info.seed, 5);
        assert_eq!(back.images, ds.images);
        let scenes = render(25, 5);
        for (im, s) in back.images.iter().zip(&scenes) {
            assert_eq!(im.objects, s.objects);
            assert_eq!(im.load().unwrap(), s.image);
        }
        // Relations file: one line per ordered pair.
        let pairs: usize = scenes
            .iter()
            .map(|s| s.objects.len() * (s.objects.len().saturating_sub(1)))
            .sum();
        let rel = fs::read_to_string(dir.path().join(RELATIONS_FILE)).unwrap();
        assert_eq!(rel.lines().count(), pairs);
        let first: serde_json::Value = serde_json::from_str(rel.lines().next().unwrap()).unwrap();
        assert!(first["relations"].is_array());
        // COCO file has the usual top-level keys and no temporary files are left.
        let coco: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.path().join(ANNOTATIONS_FILE)).unwrap())
                .unwrap();
        for k in ["images", "annotations", "categories", "info"] {
            assert!(coco.get(k).is_some(), "{k}");
        }
        assert_eq!(coco["categories"].as_array().unwrap().len(), 8);
        let leftovers = fs::read_dir(dir.path()).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp")
        });
        assert_eq!(leftovers.count(), 0);
    }

    #[test]
    fn clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_dataset(dir.path()).unwrap_err().to_string();
        assert!(e.contains(ANNOTATIONS_FILE), "{e}");
        fs::write(dir.path().join(ANNOTATIONS_FILE), "{").unwrap();
        let e = read_dataset(dir.path()).unwrap_err().to_string();
        assert!(e.contains(ANNOTATIONS_FILE), "{e}");
    }
}
