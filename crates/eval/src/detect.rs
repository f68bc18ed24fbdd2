//! Detections and the detector contract.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::BBox;

/// One object found in an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Class name, as listed by [`Detector::classes`].
    pub class: String,
    /// Pixel box (xyxy).
    pub bbox: BBox,
    /// Confidence in `[0, 1]`.
    pub score: f32,
}

/// Why a detector failed on an image: the detector's own error, kept as the source so callers
/// can print or downcast it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DetectError(#[from] Box<dyn std::error::Error + Send + Sync>);

impl DetectError {
    pub fn new(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(source.into())
    }
}

/// The pixels one detection covers, row-major at the image's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMask {
    pub width: u32,
    pub height: u32,
    pub data: Vec<bool>,
}

/// A detection with its mask, when the detector segments.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub detection: Detection,
    pub mask: Option<ObjectMask>,
}

impl From<Detection> for Segment {
    fn from(detection: Detection) -> Self {
        Self {
            detection,
            mask: None,
        }
    }
}

/// Anything that finds objects in an RGB image.
pub trait Detector {
    /// All detections, in any order; callers apply their own score threshold.
    fn detect(&self, image: &image::RgbImage) -> Result<Vec<Detection>, DetectError>;

    /// The class names this detector can report.
    fn classes(&self) -> &[String];

    /// Several images at once, one result per image, each as [`Detector::detect`] would give it.
    /// With `masks_above`, detections scoring above it carry their masks (detectors that do not
    /// segment give none). The default runs one image at a time.
    fn detect_batch(
        &self,
        images: &[image::RgbImage],
        masks_above: Option<f32>,
    ) -> Vec<Result<Vec<Segment>, DetectError>> {
        let _ = masks_above;
        images
            .iter()
            .map(|im| {
                self.detect(im)
                    .map(|ds| ds.into_iter().map(Segment::from).collect())
            })
            .collect()
    }
}

/// One object whose colour is asked for: its box and, when the detector segments, its mask.
#[derive(Debug, Clone, Copy)]
pub struct ColorQuery<'a> {
    pub bbox: BBox,
    pub mask: Option<&'a ObjectMask>,
}

/// Names the colours of objects, for GenEval's colour tasks.
pub trait ColorClassifier {
    /// One of [`crate::tasks::COLORS`] per object, in order; `class` is the objects' class name.
    fn colors(
        &self,
        image: &image::RgbImage,
        class: &str,
        objects: &[ColorQuery<'_>],
    ) -> Result<Vec<String>, DetectError>;
}

/// GenEval's selection: drop detections with `score <= min_score`, then keep
/// the highest-scoring detection of each class (ties keep the earlier one).
pub fn top1_per_class(detections: &[Detection], min_score: f32) -> BTreeMap<String, Detection> {
    let mut best: BTreeMap<String, Detection> = BTreeMap::new();
    for d in detections {
        if d.score.is_nan() || d.score <= min_score {
            continue;
        }
        match best.get(&d.class) {
            Some(cur) if cur.score >= d.score => {}
            _ => {
                best.insert(d.class.clone(), d.clone());
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(class: &str, score: f32, x: f32) -> Detection {
        Detection {
            class: class.into(),
            bbox: BBox::new(x, 0.0, x + 1.0, 1.0),
            score,
        }
    }

    #[test]
    fn selection() {
        let ds = vec![
            det("dog", 0.5, 0.0),
            det("dog", 0.9, 1.0),
            det("cat", 0.3, 2.0), // not above the threshold
            det("cat", 0.31, 3.0),
            det("cow", f32::NAN, 4.0),
        ];
        let top = top1_per_class(&ds, 0.3);
        assert_eq!(top.len(), 2);
        assert_eq!(top["dog"].bbox.x0, 1.0);
        assert_eq!(top["cat"].bbox.x0, 3.0);
    }
}
