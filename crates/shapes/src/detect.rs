//! An exact detector for the shapes world, tolerant of imperfect drawings.
//!
//! 1. The background colour is the per-channel median of the border pixels
//!    (or a fixed colour).
//! 2. Each pixel is explained as a blend `background + t·(class colour −
//!    background)`; it is labelled with the class whose blend line passes
//!    closest to it, if that class reaches `t ≥ min_strength` and the distance
//!    is within `color_tolerance`. Isolated labels that disagree with their
//!    neighbours are relabelled.
//! 3. Connected regions of one label (8-neighbourhood) are candidate objects.
//!    A region is rejected when it is far too small or too large for a drawn
//!    object, too elongated, or when its silhouette does not match the class
//!    template stretched over its box. Bars and smears therefore do not count.
//! 4. The score combines colour fit and shape fit. Per class the best region is
//!    reported; further accepted regions of that class are counted as duplicates.

use image::RgbImage;
use l2s_eval::{BBox, Detection, Detector};
use serde::{Deserialize, Serialize};

use crate::render::{coverage, COVERAGE_THRESHOLD};
use crate::{class_names, RenderConfig, ShapeClass};

/// Detector settings. Sizes are fractions of the image side, so one detector
/// serves any image size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// Fixed background colour; `None` estimates it from the image border.
    pub background: Option<[u8; 3]>,
    /// Smallest and largest side of a drawn object, as fractions of the image side.
    pub min_extent: f32,
    pub max_extent: f32,
    /// Least blend weight towards a class colour for a pixel to belong to it.
    pub min_strength: f32,
    /// Largest distance (0–255 units) of a pixel from a class's blend line.
    pub color_tolerance: f32,
    /// A region larger than this multiple of the class's largest drawn area is rejected.
    pub max_area_factor: f32,
    /// A region smaller than this multiple of the class's smallest drawn area is rejected.
    pub min_area_factor: f32,
    /// Largest allowed ratio of a region's longer to shorter box side.
    pub max_aspect: f32,
    /// Least IoU between a region and its class template for it to count.
    pub min_shape_iou: f32,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self::for_render(&RenderConfig::default())
    }
}

impl DetectorConfig {
    /// Settings matched to the objects a [`RenderConfig`] draws.
    pub fn for_render(r: &RenderConfig) -> Self {
        Self {
            background: None,
            min_extent: r.min_object as f32 / r.size as f32,
            max_extent: r.max_object as f32 / r.size as f32,
            min_strength: 0.4,
            color_tolerance: 75.0,
            max_area_factor: 2.0,
            min_area_factor: 0.3,
            max_aspect: 1.6,
            min_shape_iou: 0.5,
        }
    }
}

/// Why a candidate region was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    TooSmall,
    TooLarge,
    Elongated,
    WrongShape,
}

/// A connected region of one class colour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blob {
    pub class: ShapeClass,
    pub bbox: BBox,
    /// Pixel count.
    pub area: usize,
    /// How well the region's mean colour matches the class colour, in `[0, 1]`.
    pub color_score: f32,
    /// Best IoU of the region with the class template, in `[0, 1]`.
    pub shape_score: f32,
    /// Geometric mean of the colour and shape scores.
    pub score: f32,
    /// `None` when the region counts as an object.
    pub rejection: Option<Rejection>,
}

/// Everything the detector saw in one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// The best accepted region of each class, best score first.
    pub detections: Vec<Detection>,
    /// Every candidate region, accepted or not.
    pub blobs: Vec<Blob>,
    /// Per class (index order): accepted regions beyond the best one.
    pub duplicates: [usize; 8],
    /// The background colour used.
    pub background: [u8; 3],
}

impl Analysis {
    /// Accepted regions beyond the first, over all classes.
    pub fn total_duplicates(&self) -> usize {
        self.duplicates.iter().sum()
    }
}

/// Colour-and-shape detector for the shapes world; see the module documentation.
#[derive(Debug, Clone)]
pub struct ShapeDetector {
    config: DetectorConfig,
    names: Vec<String>,
    fill: [f32; 8],
}

impl Default for ShapeDetector {
    fn default() -> Self {
        Self::new(DetectorConfig::default())
    }
}

impl ShapeDetector {
    pub fn new(config: DetectorConfig) -> Self {
        let mut fill = [0f32; 8];
        for c in ShapeClass::ALL {
            fill[c.index()] = c.fill_ratio();
        }
        Self {
            config,
            names: class_names(),
            fill,
        }
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Finds, checks and scores every candidate region.
    pub fn analyze(&self, image: &RgbImage) -> Analysis {
        let (w, h) = image.dimensions();
        let bg = self
            .config
            .background
            .unwrap_or_else(|| border_median(image));
        let bgf = bg.map(|v| v as f32);
        let dirs: Vec<([f32; 3], f32)> = ShapeClass::ALL
            .iter()
            .map(|c| {
                let d = [0, 1, 2].map(|k| c.color()[k] as f32 - bgf[k]);
                (d, dot(d, d))
            })
            .collect();

        let labels = smooth_labels(&self.label_pixels(image, bgf, &dirs), w, h);
        let regions = components(&labels, w, h);

        let mut blobs = Vec::new();
        for region in regions {
            let class = ShapeClass::ALL[(region.label - 1) as usize];
            blobs.push(self.judge_region(image, &labels, &region, class, bgf, dirs[class.index()]));
        }
        blobs.sort_by(|a, b| b.score.total_cmp(&a.score));

        let mut duplicates = [0usize; 8];
        let mut seen = [false; 8];
        let mut detections = Vec::new();
        for b in blobs.iter().filter(|b| b.rejection.is_none()) {
            let i = b.class.index();
            if seen[i] {
                duplicates[i] += 1;
            } else {
                seen[i] = true;
                detections.push(Detection {
                    class: b.class.name().to_string(),
                    bbox: b.bbox,
                    score: b.score,
                });
            }
        }
        Analysis {
            detections,
            blobs,
            duplicates,
            background: bg,
        }
    }

    /// Per-pixel class labels (0 = none, class index + 1 otherwise).
    fn label_pixels(&self, image: &RgbImage, bg: [f32; 3], dirs: &[([f32; 3], f32)]) -> Vec<u8> {
        let tol = self.config.color_tolerance;
        image
            .pixels()
            .map(|p| {
                let q = [0, 1, 2].map(|k| p.0[k] as f32 - bg[k]);
                let mut best = (0u8, f32::MAX);
                for (i, (d, dd)) in dirs.iter().enumerate() {
                    if *dd < 1.0 {
                        continue; // class colour equals the background: undetectable
                    }
                    let (t, r) = blend_fit(q, *d, *dd);
                    if t >= self.config.min_strength && r <= tol && r < best.1 {
                        best = (i as u8 + 1, r);
                    }
                }
                best.0
            })
            .collect()
    }

    fn judge_region(
        &self,
        image: &RgbImage,
        labels: &[u8],
        region: &Region,
        class: ShapeClass,
        bg: [f32; 3],
        dir: ([f32; 3], f32),
    ) -> Blob {
        let cfg = &self.config;
        let side = image.width().min(image.height()) as f32;
        let (bw, bh) = (region.x1 - region.x0, region.y1 - region.y0);
        let region_box = BBox::new(
            region.x0 as f32,
            region.y0 as f32,
            region.x1 as f32,
            region.y1 as f32,
        );
        let area = region.pixels.len();

        // Colour: the region's mean colour against the class's blend line.
        let mut mean = [0f32; 3];
        for &(x, y) in &region.pixels {
            let p = image.get_pixel(x, y).0;
            for k in 0..3 {
                mean[k] += p[k] as f32 - bg[k];
            }
        }
        let mean = mean.map(|v| v / area as f32);
        let (t, r) = blend_fit(mean, dir.0, dir.1);
        let color_score = (t / 0.7).clamp(0.0, 1.0) * (-(r / 60.0).powi(2)).exp();

        let fill = self.fill[class.index()];
        let (emin, emax) = (cfg.min_extent * side, cfg.max_extent * side);
        let long = bw.max(bh) as f32;
        let short = bw.min(bh) as f32;
        let rejection = if area as f32 > cfg.max_area_factor * fill * emax * emax
            || long > 1.5 * emax
        {
            Some(Rejection::TooLarge)
        } else if (area as f32) < cfg.min_area_factor * fill * emin * emin || short < 0.4 * emin {
            Some(Rejection::TooSmall)
        } else if long > cfg.max_aspect * short {
            Some(Rejection::Elongated)
        } else {
            None
        };
        let (bbox, shape_score) = if matches!(rejection, None | Some(Rejection::Elongated)) {
            let fit = fit_template(image, labels, region, class, bg, dir);
            (fit.bbox.unwrap_or(region_box), fit.iou)
        } else {
            (region_box, 0.0)
        };
        let rejection =
            rejection.or((shape_score < cfg.min_shape_iou).then_some(Rejection::WrongShape));
        Blob {
            class,
            bbox,
            area,
            color_score,
            shape_score,
            score: (color_score * shape_score).sqrt(),
            rejection,
        }
    }
}

impl Detector for ShapeDetector {
    fn detect(&self, image: &RgbImage) -> Result<Vec<Detection>, l2s_eval::DetectError> {
        Ok(self.analyze(image).detections)
    }

    fn classes(&self) -> &[String] {
        &self.names
    }
}

fn dot(a: [f32; 3], b: [f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Blend weight `t` of `q` (a colour minus the background) along `d`, and its
/// distance from the segment `0..1.25·d`.
fn blend_fit(q: [f32; 3], d: [f32; 3], dd: f32) -> (f32, f32) {
    let t = dot(q, d) / dd;
    let tc = t.clamp(0.0, 1.25);
    let e = [0, 1, 2].map(|k| q[k] - tc * d[k]);
    (t, dot(e, e).sqrt())
}

/// Per-channel median of the pixels on the image border.
fn border_median(image: &RgbImage) -> [u8; 3] {
    let (w, h) = image.dimensions();
    let mut chans: [Vec<u8>; 3] = Default::default();
    let mut push = |x: u32, y: u32| {
        let p = image.get_pixel(x, y).0;
        for k in 0..3 {
            chans[k].push(p[k]);
        }
    };
    for x in 0..w {
        push(x, 0);
        if h > 1 {
            push(x, h - 1);
        }
    }
    for y in 1..h.saturating_sub(1) {
        push(0, y);
        if w > 1 {
            push(w - 1, y);
        }
    }
    chans.map(|mut c| {
        if c.is_empty() {
            return 255;
        }
        c.sort_unstable();
        c[c.len() / 2]
    })
}

/// Relabels a pixel none of whose 8 neighbours shares its label when at least
/// two neighbours agree on another class (speckle from noise or blending).
fn smooth_labels(labels: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut out = labels.to_vec();
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let l = labels[(y * w as i64 + x) as usize];
            if l == 0 {
                continue;
            }
            let mut counts = [0u8; 9];
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if (dx, dy) == (0, 0) || nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    counts[labels[(ny * w as i64 + nx) as usize] as usize] += 1;
                }
            }
            if counts[l as usize] == 0 {
                let (best, n) = (1..9)
                    .map(|k| (k, counts[k]))
                    .max_by_key(|&(_, n)| n)
                    .unwrap();
                if n >= 2 {
                    out[(y * w as i64 + x) as usize] = best as u8;
                }
            }
        }
    }
    out
}

/// A connected set of equally labelled pixels.
struct Region {
    label: u8,
    pixels: Vec<(u32, u32)>,
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
}

/// 8-connected regions of non-zero labels.
fn components(labels: &[u8], w: u32, h: u32) -> Vec<Region> {
    let mut seen = vec![false; labels.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..labels.len() {
        if seen[start] || labels[start] == 0 {
            continue;
        }
        let label = labels[start];
        seen[start] = true;
        stack.push(start);
        let mut r = Region {
            label,
            pixels: Vec::new(),
            x0: u32::MAX,
            y0: u32::MAX,
            x1: 0,
            y1: 0,
        };
        while let Some(i) = stack.pop() {
            let (x, y) = ((i as u32) % w, (i as u32) / w);
            r.pixels.push((x, y));
            r.x0 = r.x0.min(x);
            r.y0 = r.y0.min(y);
            r.x1 = r.x1.max(x + 1);
            r.y1 = r.y1.max(y + 1);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = (ny as u32 * w + nx as u32) as usize;
                    if !seen[j] && labels[j] == label {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(r);
    }
    out
}

/// The class template fitted to a region.
struct TemplateFit {
    /// Tight box of the template's pixels covered at least half, inside the image.
    bbox: Option<BBox>,
    /// IoU of the region's pixels with those template pixels.
    iou: f32,
}

/// Fits the class silhouette to a region: over frames of the region's size
/// −1…+3 px in each direction, at every offset that keeps the frame within 1 px
/// of covering the region's box, the frame whose anti-aliased coverage best
/// explains (least squares, with a fitted strength) the pixels' blend weights
/// towards the class colour. Pixels of other regions count as weight 0. The
/// fitted frame gives the box: on a clean render it is the drawn one, and a
/// blurred drawing's faded tips do not shrink it.
fn fit_template(
    image: &RgbImage,
    labels: &[u8],
    region: &Region,
    class: ShapeClass,
    bg: [f32; 3],
    dir: ([f32; 3], f32),
) -> TemplateFit {
    let (iw, ih) = (image.width() as i64, image.height() as i64);
    let (bw, bh) = (
        (region.x1 - region.x0) as i64,
        (region.y1 - region.y0) as i64,
    );
    let (bx, by) = (region.x0 as i64, region.y0 as i64);
    let own = region.label;

    // Blend weights over the region's box grown by 4 px on each side.
    const PAD: i64 = 4;
    let (wx0, wy0) = (bx - PAD, by - PAD);
    let (ww, wh) = (bw + 2 * PAD, bh + 2 * PAD);
    let mut weight = vec![0f32; (ww * wh) as usize];
    let mut in_region = vec![false; (ww * wh) as usize];
    for y in 0..wh {
        for x in 0..ww {
            let (ix, iy) = (wx0 + x, wy0 + y);
            if ix < 0 || iy < 0 || ix >= iw || iy >= ih {
                continue;
            }
            let l = labels[(iy * iw + ix) as usize];
            if l != 0 && l != own {
                continue;
            }
            let p = image.get_pixel(ix as u32, iy as u32).0;
            let q = [0, 1, 2].map(|k| p[k] as f32 - bg[k]);
            weight[(y * ww + x) as usize] = (dot(q, dir.0) / dir.1).clamp(0.0, 1.0);
        }
    }
    for &(x, y) in &region.pixels {
        in_region[((y as i64 - wy0) * ww + (x as i64 - wx0)) as usize] = true;
    }
    let total_sq: f32 = weight.iter().map(|v| v * v).sum();

    // (residual, frame x, frame y, frame w, frame h, coverage)
    let mut best: Option<(f32, i64, i64, i64, i64, Vec<f32>)> = None;
    for fw in (bw - 1).max(2)..=bw + 3 {
        for fh in (bh - 1).max(2)..=bh + 3 {
            let cov = coverage(class, fw as u32, fh as u32, true);
            let cc: f32 = cov.iter().map(|v| v * v).sum();
            if cc <= 0.0 {
                continue;
            }
            for fx in bx - (fw - bw) - 1..=bx + 1 {
                for fy in by - (fh - bh) - 1..=by + 1 {
                    let mut mc = 0f32;
                    for y in 0..fh {
                        let wy = fy - wy0 + y;
                        let row = (wy * ww) as usize;
                        for x in 0..fw {
                            let c = cov[(y * fw + x) as usize];
                            if c > 0.0 {
                                mc += weight[row + (fx - wx0 + x) as usize] * c;
                            }
                        }
                    }
                    // min over a ≥ 0 of |m − a·cov|², with cov zero outside the frame.
                    let resid = total_sq - mc.max(0.0).powi(2) / cc;
                    if best.as_ref().is_none_or(|b| resid < b.0 - 1e-6) {
                        best = Some((resid, fx, fy, fw, fh, cov.clone()));
                    }
                }
            }
        }
    }
    let Some((_, fx, fy, fw, fh, cov)) = best else {
        return TemplateFit {
            bbox: None,
            iou: 0.0,
        };
    };

    // Compare the template's pixels with the region's, and box the template.
    let (mut inter, mut tmpl_area) = (0usize, 0usize);
    let (mut x0, mut y0, mut x1, mut y1) = (i64::MAX, i64::MAX, i64::MIN, i64::MIN);
    for y in 0..fh {
        for x in 0..fw {
            if cov[(y * fw + x) as usize] < COVERAGE_THRESHOLD {
                continue;
            }
            tmpl_area += 1;
            let (wx, wy) = (fx - wx0 + x, fy - wy0 + y);
            inter += in_region[(wy * ww + wx) as usize] as usize;
            let (ix, iy) = (fx + x, fy + y);
            if ix >= 0 && iy >= 0 && ix < iw && iy < ih {
                x0 = x0.min(ix);
                y0 = y0.min(iy);
                x1 = x1.max(ix + 1);
                y1 = y1.max(iy + 1);
            }
        }
    }
    let union = region.pixels.len() + tmpl_area - inter;
    let iou = if union > 0 {
        inter as f32 / union as f32
    } else {
        0.0
    };
    let bbox =
        (x0 <= x1 && x0 != i64::MAX).then(|| BBox::new(x0 as f32, y0 as f32, x1 as f32, y1 as f32));
    TemplateFit { bbox, iou }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::draw_shape;
    use image::Rgb;

    fn blank(size: u32) -> RgbImage {
        RgbImage::from_pixel(size, size, Rgb([245, 245, 245]))
    }

    #[test]
    fn finds_a_single_shape() {
        for class in ShapeClass::ALL {
            let mut img = blank(32);
            let b = draw_shape(&mut img, class, class.color(), 5, 9, 11, 11, true).unwrap();
            let a = ShapeDetector::default().analyze(&img);
            assert_eq!(a.detections.len(), 1, "{class}: {:?}", a.blobs);
            let d = &a.detections[0];
            assert_eq!(d.class, class.name());
            assert_eq!(d.bbox, b);
            assert!(d.score > 0.9, "{class}: {d:?}");
        }
    }

    #[test]
    fn rejects_bars_and_smears() {
        let det = ShapeDetector::default();
        for class in ShapeClass::ALL {
            // A long bar in the class colour.
            let mut img = blank(32);
            draw_shape(
                &mut img,
                ShapeClass::Square,
                class.color(),
                4,
                12,
                24,
                5,
                true,
            );
            let a = det.analyze(&img);
            assert!(a.detections.is_empty(), "{class} bar: {:?}", a.blobs);
            assert_eq!(a.blobs.len(), 1);
            assert!(a.blobs[0].rejection.is_some());
            // The class's own silhouette stretched 2× in one direction.
            let mut img = blank(32);
            draw_shape(&mut img, class, class.color(), 4, 2, 11, 24, true);
            assert!(det.detect(&img).unwrap().is_empty(), "{class} stretched");
            // A blob far larger than any drawn object.
            let mut img = blank(32);
            draw_shape(
                &mut img,
                ShapeClass::Square,
                class.color(),
                2,
                2,
                28,
                28,
                true,
            );
            let a = det.analyze(&img);
            assert_eq!(a.blobs[0].rejection, Some(Rejection::TooLarge));
            // A speck.
            let mut img = blank(32);
            draw_shape(
                &mut img,
                ShapeClass::Square,
                class.color(),
                10,
                10,
                2,
                2,
                true,
            );
            assert!(det.detect(&img).unwrap().is_empty(), "{class} speck");
        }
    }

    #[test]
    fn finds_pale_drawings() {
        let det = ShapeDetector::default();
        for class in ShapeClass::ALL {
            let pale =
                [0, 1, 2].map(|k| (245.0 + 0.6 * (class.color()[k] as f32 - 245.0)).round() as u8);
            let mut img = blank(32);
            let b = draw_shape(&mut img, class, pale, 12, 3, 12, 12, true).unwrap();
            let d = det.detect(&img).unwrap();
            assert_eq!(d.len(), 1, "{class}");
            assert!(
                d[0].class == class.name() && d[0].bbox.iou(&b) >= 0.8 && d[0].score > 0.5,
                "{class}: {d:?}"
            );
        }
    }

    #[test]
    fn counts_duplicates() {
        let mut img = blank(32);
        draw_shape(
            &mut img,
            ShapeClass::Heart,
            ShapeClass::Heart.color(),
            2,
            2,
            12,
            12,
            true,
        );
        draw_shape(
            &mut img,
            ShapeClass::Heart,
            ShapeClass::Heart.color(),
            18,
            18,
            10,
            10,
            true,
        );
        draw_shape(
            &mut img,
            ShapeClass::Ring,
            ShapeClass::Ring.color(),
            18,
            2,
            10,
            10,
            true,
        );
        let a = ShapeDetector::default().analyze(&img);
        assert_eq!(a.detections.len(), 2);
        assert_eq!(a.duplicates[ShapeClass::Heart.index()], 1);
        assert_eq!(a.total_duplicates(), 1);
    }

    #[test]
    fn wrong_silhouette_in_class_colour_is_weaker() {
        let det = ShapeDetector::default();
        let mut right = blank(32);
        draw_shape(
            &mut right,
            ShapeClass::Star,
            ShapeClass::Star.color(),
            8,
            8,
            13,
            13,
            true,
        );
        let mut wrong = blank(32);
        draw_shape(
            &mut wrong,
            ShapeClass::Square,
            ShapeClass::Star.color(),
            8,
            8,
            13,
            13,
            true,
        );
        let r = &det.analyze(&right).blobs[0];
        let w = &det.analyze(&wrong).blobs[0];
        assert!(
            r.shape_score > 0.9 && w.shape_score < r.shape_score - 0.3,
            "{r:?} {w:?}"
        );
    }

    #[test]
    fn empty_and_tiny_images() {
        let det = ShapeDetector::default();
        assert!(det.detect(&blank(32)).unwrap().is_empty());
        assert!(det.detect(&RgbImage::new(1, 1)).unwrap().is_empty());
        assert!(det.detect(&RgbImage::new(0, 0)).unwrap().is_empty());
        assert_eq!(det.classes().len(), 8);
    }
}
