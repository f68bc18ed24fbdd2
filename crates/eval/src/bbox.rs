//! Axis-aligned pixel boxes.

use serde::{Deserialize, Serialize};

/// An axis-aligned box in pixel coordinates, corners `(x0, y0)` – `(x1, y1)`.
///
/// `x` grows to the right and `y` grows downwards. A box covering the pixel
/// columns `a..=b` has `x0 = a` and `x1 = b + 1`, so `width = x1 - x0` is the
/// number of pixels it spans.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BBox {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

impl BBox {
    /// A box from its corners (xyxy).
    pub fn new(x0: f32, y0: f32, x1: f32, y1: f32) -> Self {
        Self { x0, y0, x1, y1 }
    }

    /// A box from its top-left corner and size (COCO's xywh).
    pub fn from_xywh(x: f32, y: f32, w: f32, h: f32) -> Self {
        Self::new(x, y, x + w, y + h)
    }

    /// `[x0, y0, x1, y1]`.
    pub fn xyxy(&self) -> [f32; 4] {
        [self.x0, self.y0, self.x1, self.y1]
    }

    /// `[x, y, w, h]` as COCO writes boxes.
    pub fn xywh(&self) -> [f32; 4] {
        [self.x0, self.y0, self.width(), self.height()]
    }

    /// Horizontal extent `|x1 - x0|`.
    pub fn width(&self) -> f32 {
        (self.x1 - self.x0).abs()
    }

    /// Vertical extent `|y1 - y0|`.
    pub fn height(&self) -> f32 {
        (self.y1 - self.y0).abs()
    }

    /// Mean of the two corners.
    pub fn center(&self) -> (f32, f32) {
        ((self.x0 + self.x1) * 0.5, (self.y0 + self.y1) * 0.5)
    }

    /// `width * height`.
    pub fn area(&self) -> f32 {
        self.width() * self.height()
    }

    /// Intersection over union of two boxes (0 when they do not meet).
    pub fn iou(&self, other: &BBox) -> f32 {
        let ix = (self.x1.min(other.x1) - self.x0.max(other.x0)).max(0.0);
        let iy = (self.y1.min(other.y1) - self.y0.max(other.y0)).max(0.0);
        let inter = ix * iy;
        let union = self.area() + other.area() - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }

    /// The same box with every coordinate multiplied by `k`.
    pub fn scaled(&self, k: f32) -> Self {
        Self::new(self.x0 * k, self.y0 * k, self.x1 * k, self.y1 * k)
    }

    /// True when every coordinate is finite.
    pub fn is_finite(&self) -> bool {
        self.xyxy().iter().all(|v| v.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        let b = BBox::from_xywh(2.0, 3.0, 4.0, 6.0);
        assert_eq!(b.xyxy(), [2.0, 3.0, 6.0, 9.0]);
        assert_eq!(b.xywh(), [2.0, 3.0, 4.0, 6.0]);
        assert_eq!(b.center(), (4.0, 6.0));
        assert_eq!(b.area(), 24.0);
    }

    #[test]
    fn iou_cases() {
        let a = BBox::new(0.0, 0.0, 10.0, 10.0);
        assert_eq!(a.iou(&a), 1.0);
        assert_eq!(a.iou(&BBox::new(20.0, 20.0, 30.0, 30.0)), 0.0);
        // Half overlap: inter 50, union 150.
        let b = BBox::new(5.0, 0.0, 15.0, 10.0);
        assert!((a.iou(&b) - 1.0 / 3.0).abs() < 1e-6);
        // Degenerate boxes never divide by zero.
        let p = BBox::new(1.0, 1.0, 1.0, 1.0);
        assert_eq!(p.iou(&p), 0.0);
    }
}
