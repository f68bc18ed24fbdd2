//! Rendering scenes of 1–3 coloured shapes on a plain light background.

use image::{Rgb, RgbImage};
use l2s_eval::{relations, BBox, RelationSet};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{ShapeClass, ShapesError};

/// Supersampling factor per axis when anti-aliasing (16 samples per pixel).
const SUPERSAMPLE: u32 = 4;
/// A pixel belongs to an object's extent when at least this much of it is covered.
pub const COVERAGE_THRESHOLD: f32 = 0.5;

/// How scenes are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderConfig {
    /// Image side in pixels (images are square).
    pub size: u32,
    /// Smallest and largest object side in pixels (inclusive).
    pub min_object: u32,
    pub max_object: u32,
    /// Fewest and most objects per image (inclusive); classes never repeat in an image.
    pub min_objects: usize,
    pub max_objects: usize,
    /// Least empty space, in pixels, between the boxes of two objects.
    pub gap: u32,
    /// Background colour.
    pub background: [u8; 3],
    /// Smooth edges by supersampling (4×4 samples per pixel).
    pub antialias: bool,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self::with_size(32)
    }
}

impl RenderConfig {
    /// The default world at another image size: objects span 1/4 to 7/16 of
    /// the side (8–14 px at 32×32, 16–28 px at 64×64).
    pub fn with_size(size: u32) -> Self {
        let s = size as f32;
        Self {
            size,
            min_object: (s * 0.25).round().max(3.0) as u32,
            max_object: (s * 0.4375).round().max(3.0) as u32,
            min_objects: 1,
            max_objects: 3,
            gap: (size / 32).max(1),
            background: [245, 245, 245],
            antialias: true,
        }
    }

    /// Checks that the settings describe drawable scenes.
    pub fn validate(&self) -> Result<(), ShapesError> {
        let bad = |m: String| Err(ShapesError::InvalidConfig(m));
        if self.size < 8 || self.size > 4096 {
            return bad(format!("image size {} outside 8..=4096", self.size));
        }
        if self.min_object < 3 || self.min_object > self.max_object || self.max_object > self.size {
            return bad(format!(
                "object sizes {}..={} must satisfy 3 <= min <= max <= image size {}",
                self.min_object, self.max_object, self.size
            ));
        }
        if self.min_objects < 1
            || self.min_objects > self.max_objects
            || self.max_objects > ShapeClass::ALL.len()
        {
            return bad(format!(
                "object counts {}..={} must satisfy 1 <= min <= max <= {}",
                self.min_objects,
                self.max_objects,
                ShapeClass::ALL.len()
            ));
        }
        // Objects must fit side by side, one per cell of a grid that holds max_objects.
        let per_row = (self.max_objects as f32).sqrt().ceil() as u32;
        if per_row * (self.min_object + self.gap) > self.size + self.gap {
            return bad(format!(
                "{} objects of {} px with a {} px gap do not fit in {} px",
                self.max_objects, self.min_object, self.gap, self.size
            ));
        }
        Ok(())
    }
}

/// One object of a scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneObject {
    pub class: ShapeClass,
    /// The box the silhouette was stretched over when drawing.
    pub frame: BBox,
    /// Tight box of the pixels the object covers at least half of (xyxy, pixel edges).
    pub bbox: BBox,
}

/// A rendered image and what is in it.
#[derive(Debug, Clone)]
pub struct Scene {
    /// Position in the rendered sequence; with the seed it determines the scene.
    pub index: u64,
    pub objects: Vec<SceneObject>,
    pub image: RgbImage,
}

/// The relations between two objects of a scene (object `a` relative to object `b`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairRelations {
    pub a: usize,
    pub b: usize,
    pub relations: RelationSet,
}

impl Scene {
    /// The classes present, in drawing order.
    pub fn classes(&self) -> Vec<ShapeClass> {
        self.objects.iter().map(|o| o.class).collect()
    }

    /// For every ordered pair of distinct objects, GenEval's relations of the first to the second.
    pub fn pair_relations(&self) -> Vec<PairRelations> {
        pair_relations(&self.objects)
    }
}

/// For every ordered pair of distinct objects, GenEval's relations of the first to the second.
pub fn pair_relations(objects: &[SceneObject]) -> Vec<PairRelations> {
    let mut out = Vec::new();
    for (i, a) in objects.iter().enumerate() {
        for (j, b) in objects.iter().enumerate() {
            if i != j {
                out.push(PairRelations {
                    a: i,
                    b: j,
                    relations: relations(&a.bbox, &b.bbox),
                });
            }
        }
    }
    out
}

/// `count` scenes of the default 32×32 world. Scene `i` depends only on
/// `(seed, i)`, so a longer run extends a shorter one.
pub fn render(count: usize, seed: u64) -> Vec<Scene> {
    render_with(&RenderConfig::default(), count, seed).expect("the default config is valid")
}

/// `count` scenes drawn with `config`.
pub fn render_with(
    config: &RenderConfig,
    count: usize,
    seed: u64,
) -> Result<Vec<Scene>, ShapesError> {
    config.validate()?;
    Ok((0..count as u64)
        .map(|i| draw_scene(config, seed, i))
        .collect())
}

/// The random generator for scene `index` of the sequence seeded by `seed`.
fn scene_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Scene `index` of the sequence seeded by `seed`: the same scene that
/// [`render_with`] returns at that position, made on its own (for drawing
/// training batches on the fly).
pub fn render_scene(config: &RenderConfig, seed: u64, index: u64) -> Result<Scene, ShapesError> {
    config.validate()?;
    Ok(draw_scene(config, seed, index))
}

/// [`render_scene`] for a config already validated.
fn draw_scene(config: &RenderConfig, seed: u64, index: u64) -> Scene {
    let mut rng = scene_rng(seed, index);
    let n = rng.gen_range(config.min_objects..=config.max_objects);
    let mut classes = ShapeClass::ALL.to_vec();
    classes.shuffle(&mut rng);
    classes.truncate(n);

    // Place square frames at random, without overlap (with the gap).
    let mut frames: Vec<(ShapeClass, [u32; 3])> = Vec::new(); // (class, [x, y, side])
    for class in classes {
        for _ in 0..500 {
            let side = rng.gen_range(config.min_object..=config.max_object);
            let x = rng.gen_range(0..=config.size - side);
            let y = rng.gen_range(0..=config.size - side);
            let free = frames.iter().all(|(_, [fx, fy, fs])| {
                let g = config.gap;
                x + side + g <= *fx || *fx + fs + g <= x || y + side + g <= *fy || *fy + fs + g <= y
            });
            if free {
                frames.push((class, [x, y, side]));
                break;
            }
        }
    }

    let [r, g, b] = config.background;
    let mut image = RgbImage::from_pixel(config.size, config.size, Rgb([r, g, b]));
    let mut objects = Vec::with_capacity(frames.len());
    for (class, [x, y, side]) in frames {
        let bbox = draw_shape(
            &mut image,
            class,
            class.color(),
            x,
            y,
            side,
            side,
            config.antialias,
        )
        .expect("a frame inside the image always covers pixels");
        let frame = BBox::new(x as f32, y as f32, (x + side) as f32, (y + side) as f32);
        objects.push(SceneObject { class, frame, bbox });
    }
    Scene {
        index,
        objects,
        image,
    }
}

/// Coverage in `[0, 1]` of each pixel of a `w`×`h` box by the silhouette of
/// `class` stretched over it, row-major. With `antialias` each pixel averages
/// 4×4 samples; otherwise its centre decides.
pub fn coverage(class: ShapeClass, w: u32, h: u32, antialias: bool) -> Vec<f32> {
    let k = if antialias { SUPERSAMPLE } else { 1 };
    let mut out = Vec::with_capacity((w * h) as usize);
    for py in 0..h {
        for px in 0..w {
            let mut hits = 0u32;
            for sy in 0..k {
                for sx in 0..k {
                    let u = (px as f32 + (sx as f32 + 0.5) / k as f32) / w as f32;
                    let v = (py as f32 + (sy as f32 + 0.5) / k as f32) / h as f32;
                    hits += class.contains(u, v) as u32;
                }
            }
            out.push(hits as f32 / (k * k) as f32);
        }
    }
    out
}

/// Draws `class` in `color` into the `w`×`h` box at `(x, y)` (clipped to the
/// image), blending partly covered pixels with what is underneath. Returns the
/// tight box of the pixels covered at least [`COVERAGE_THRESHOLD`], or `None`
/// when no pixel is.
#[allow(clippy::too_many_arguments)]
pub fn draw_shape(
    image: &mut RgbImage,
    class: ShapeClass,
    color: [u8; 3],
    x: u32,
    y: u32,
    w: u32,
    h: u32,
    antialias: bool,
) -> Option<BBox> {
    let cov = coverage(class, w, h, antialias);
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0u32, 0u32);
    for py in 0..h {
        for px in 0..w {
            let c = cov[(py * w + px) as usize];
            let (ix, iy) = (x + px, y + py);
            if c <= 0.0 || ix >= image.width() || iy >= image.height() {
                continue;
            }
            let p = image.get_pixel_mut(ix, iy);
            for (old, &col) in p.0.iter_mut().zip(&color) {
                *old = (*old as f32 * (1.0 - c) + col as f32 * c)
                    .round()
                    .clamp(0.0, 255.0) as u8;
            }
            if c >= COVERAGE_THRESHOLD {
                x0 = x0.min(ix);
                y0 = y0.min(iy);
                x1 = x1.max(ix + 1);
                y1 = y1.max(iy + 1);
            }
        }
    }
    (x0 != u32::MAX).then(|| BBox::new(x0 as f32, y0 as f32, x1 as f32, y1 as f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_prefix_stable() {
        let a = render(20, 7);
        let b = render(30, 7);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.objects, y.objects);
            assert_eq!(x.image, y.image);
        }
        let c = render(20, 8);
        assert!(a.iter().zip(&c).any(|(x, y)| x.image != y.image));
    }

    #[test]
    fn scenes_follow_the_config() {
        let cfg = RenderConfig::default();
        let scenes = render(500, 1);
        let mut counts = [0usize; 4];
        for s in &scenes {
            let n = s.objects.len();
            assert!((1..=3).contains(&n));
            counts[n] += 1;
            let mut cls = s.classes();
            cls.sort();
            cls.dedup();
            assert_eq!(cls.len(), n, "repeated class");
            for o in &s.objects {
                let (w, h) = (o.bbox.width(), o.bbox.height());
                assert!(
                    w >= 5.0
                        && w <= cfg.max_object as f32
                        && h >= 5.0
                        && h <= cfg.max_object as f32,
                    "{o:?}"
                );
            }
            for (i, a) in s.objects.iter().enumerate() {
                for b in &s.objects[i + 1..] {
                    assert_eq!(a.bbox.iou(&b.bbox), 0.0, "overlap");
                }
            }
            assert_eq!(s.pair_relations().len(), n * (n - 1));
        }
        // Every count occurs often (uniform over 1..=3).
        assert!(counts[1..].iter().all(|&c| c > 120), "{counts:?}");
    }

    #[test]
    fn box_matches_drawn_pixels() {
        let cfg = RenderConfig::default();
        for s in render(50, 3) {
            for o in &s.objects {
                let c = o.class.color();
                // A pixel well inside the class colour exists within the box and none outside
                // the box is more than half-way from the background to the class colour.
                let mut strong_inside = 0;
                for (x, y, p) in s.image.enumerate_pixels() {
                    let t = blend_weight(p.0, cfg.background, c);
                    let inside = (x as f32) >= o.bbox.x0
                        && (x as f32) < o.bbox.x1
                        && (y as f32) >= o.bbox.y0
                        && (y as f32) < o.bbox.y1;
                    if t > 0.9 && inside {
                        strong_inside += 1;
                    }
                }
                assert!(strong_inside > 5, "{o:?}");
            }
        }
    }

    fn blend_weight(p: [u8; 3], bg: [u8; 3], c: [u8; 3]) -> f32 {
        let d: Vec<f32> = (0..3).map(|k| c[k] as f32 - bg[k] as f32).collect();
        let q: Vec<f32> = (0..3).map(|k| p[k] as f32 - bg[k] as f32).collect();
        let dd: f32 = d.iter().map(|x| x * x).sum();
        q.iter().zip(&d).map(|(a, b)| a * b).sum::<f32>() / dd
    }

    #[test]
    fn single_scene_matches_sequence() {
        let cfg = RenderConfig::with_size(48);
        let seq = render_with(&cfg, 6, 9).unwrap();
        let one = render_scene(&cfg, 9, 5).unwrap();
        assert_eq!(
            (one.index, &one.objects, &one.image),
            (5, &seq[5].objects, &seq[5].image)
        );
        let mut bad = cfg;
        bad.max_objects = 0;
        assert!(render_scene(&bad, 9, 5).is_err());
    }

    #[test]
    fn other_sizes_and_bad_configs() {
        let cfg = RenderConfig::with_size(64);
        assert_eq!((cfg.min_object, cfg.max_object), (16, 28));
        let s = render_with(&cfg, 3, 0).unwrap();
        assert_eq!(s[0].image.dimensions(), (64, 64));
        let mut bad = cfg.clone();
        bad.max_objects = 9;
        assert!(render_with(&bad, 1, 0).is_err());
        let mut bad = cfg.clone();
        bad.min_object = 40;
        assert!(bad.validate().is_err());
        let mut bad = cfg;
        bad.size = 4;
        assert!(bad.validate().is_err());
    }
}
