//! The object classes of the shapes world: a name, a colour and a silhouette each.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One of the eight object classes. Each name is a single CLIP BPE token, and
/// each class has its own silhouette and its own saturated colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShapeClass {
    Circle,
    Square,
    Triangle,
    Star,
    Heart,
    Ring,
    Cross,
    Diamond,
}

/// A word that names no class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown shape class {0:?}: expected one of circle, square, triangle, star, heart, ring, cross, diamond")]
pub struct UnknownClass(pub String);

impl ShapeClass {
    /// Every class, in index order.
    pub const ALL: [ShapeClass; 8] = [
        ShapeClass::Circle,
        ShapeClass::Square,
        ShapeClass::Triangle,
        ShapeClass::Star,
        ShapeClass::Heart,
        ShapeClass::Ring,
        ShapeClass::Cross,
        ShapeClass::Diamond,
    ];

    /// The class word ("circle", …).
    pub fn name(self) -> &'static str {
        match self {
            ShapeClass::Circle => "circle",
            ShapeClass::Square => "square",
            ShapeClass::Triangle => "triangle",
            ShapeClass::Star => "star",
            ShapeClass::Heart => "heart",
            ShapeClass::Ring => "ring",
            ShapeClass::Cross => "cross",
            ShapeClass::Diamond => "diamond",
        }
    }

    /// Position in [`ShapeClass::ALL`]; COCO category ids are `index() + 1`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The class with this index.
    pub fn from_index(i: usize) -> Option<ShapeClass> {
        Self::ALL.get(i).copied()
    }

    /// The class named by `word` (case-insensitive; a plural "s"/"es" is accepted).
    pub fn from_word(word: &str) -> Option<ShapeClass> {
        let w = word.trim().to_ascii_lowercase();
        let singular = [
            w.as_str(),
            w.strip_suffix("es").unwrap_or(""),
            w.strip_suffix('s').unwrap_or(""),
        ];
        Self::ALL
            .into_iter()
            .find(|c| singular.iter().any(|s| !s.is_empty() && *s == c.name()))
    }

    /// The fill colour (sRGB).
    pub fn color(self) -> [u8; 3] {
        match self {
            ShapeClass::Circle => [220, 30, 30],  // red
            ShapeClass::Square => [30, 60, 225],  // blue
            ShapeClass::Triangle => [0, 150, 50], // green
            ShapeClass::Star => [245, 140, 0],    // orange
            ShapeClass::Heart => [220, 20, 180],  // magenta
            ShapeClass::Ring => [0, 180, 200],    // cyan
            ShapeClass::Cross => [70, 0, 130],    // purple
            ShapeClass::Diamond => [130, 210, 0], // lime
        }
    }

    /// An English name of [`ShapeClass::color`].
    pub fn color_name(self) -> &'static str {
        match self {
            ShapeClass::Circle => "red",
            ShapeClass::Square => "blue",
            ShapeClass::Triangle => "green",
            ShapeClass::Star => "orange",
            ShapeClass::Heart => "magenta",
            ShapeClass::Ring => "cyan",
            ShapeClass::Cross => "purple",
            ShapeClass::Diamond => "lime",
        }
    }

    /// Whether the point `(u, v)` of the unit box (`u` rightwards, `v`
    /// downwards, both in `[0, 1]`) lies inside the silhouette. Every
    /// silhouette touches all four sides of the unit box, so a drawn object's
    /// box is the box it was drawn into.
    pub fn contains(self, u: f32, v: f32) -> bool {
        let (x, y) = (u - 0.5, v - 0.5); // centred, in [-0.5, 0.5]
        match self {
            ShapeClass::Circle => x * x + y * y <= 0.25,
            ShapeClass::Square => x.abs() <= 0.5 && y.abs() <= 0.5,
            // Apex at the top centre, base along the bottom edge.
            ShapeClass::Triangle => x.abs() <= 0.5 * v,
            ShapeClass::Diamond => x.abs() + y.abs() <= 0.5,
            ShapeClass::Ring => {
                let r2 = x * x + y * y;
                (0.0625..=0.25).contains(&r2) // inner radius half the outer one
            }
            ShapeClass::Cross => x.abs() <= ARM || y.abs() <= ARM,
            ShapeClass::Star => star_contains(u, v),
            ShapeClass::Heart => heart_contains(u, v),
        }
    }

    /// Fraction of its box that a silhouette covers.
    pub fn fill_ratio(self) -> f32 {
        const N: usize = 128;
        let mut inside = 0usize;
        for j in 0..N {
            for i in 0..N {
                let (u, v) = ((i as f32 + 0.5) / N as f32, (j as f32 + 0.5) / N as f32);
                inside += self.contains(u, v) as usize;
            }
        }
        inside as f32 / (N * N) as f32
    }
}

/// Half the width of a cross's arm, as a fraction of its box.
const ARM: f32 = 0.17;

/// Five-pointed star, point up, inner radius half the outer one, stretched to
/// fill its box.
fn star_contains(u: f32, v: f32) -> bool {
    // Native star: outer radius 1 about the origin, y downwards; it spans
    // x ∈ [−cos 18°, cos 18°] and y ∈ [−1, cos 36°].
    const XR: f32 = 0.951_056_5; // cos 18°
    const YB: f32 = 0.809_017; // cos 36°
    let x = (u - 0.5) * 2.0 * XR;
    let y = -1.0 + v * (1.0 + YB);
    point_in_polygon(x, y, &STAR[..])
}

/// The star's vertices, alternating outer (radius 1) and inner (radius 1/2), first one at the top.
static STAR: LazyLock<[(f32, f32); 10]> = LazyLock::new(|| {
    let mut pts = [(0f32, 0f32); 10];
    for (k, p) in pts.iter_mut().enumerate() {
        let r = if k % 2 == 0 { 1.0 } else { 0.5 };
        let a = (-90.0 + 36.0 * k as f32).to_radians();
        *p = (r * a.cos(), r * a.sin());
    }
    pts
});

/// The classic heart curve (x² + y² − 1)³ − x²y³ ≤ 0 (y up), fitted to its box.
fn heart_contains(u: f32, v: f32) -> bool {
    const XR: f32 = 1.1394; // half-width of the curve
    const Y_TOP: f32 = 1.2361;
    const Y_BOTTOM: f32 = -1.0;
    let x = (u - 0.5) * 2.0 * XR;
    let y = Y_TOP - v * (Y_TOP - Y_BOTTOM);
    let q = x * x + y * y - 1.0;
    q * q * q - x * x * y * y * y <= 0.0
}

fn point_in_polygon(x: f32, y: f32, pts: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let (xi, yi) = pts[i];
        let (xj, yj) = pts[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

impl fmt::Display for ShapeClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ShapeClass {
    type Err = UnknownClass;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ShapeClass::from_word(s).ok_or_else(|| UnknownClass(s.to_string()))
    }
}

impl Serialize for ShapeClass {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ShapeClass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The class names, in index order.
pub fn class_names() -> Vec<String> {
    ShapeClass::ALL
        .iter()
        .map(|c| c.name().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in ShapeClass::ALL {
            assert_eq!(ShapeClass::from_word(c.name()), Some(c));
            assert_eq!(c.name().to_uppercase().parse::<ShapeClass>().unwrap(), c);
            assert_eq!(ShapeClass::from_index(c.index()), Some(c));
        }
        assert_eq!(ShapeClass::from_word("circles"), Some(ShapeClass::Circle));
        assert_eq!(ShapeClass::from_word("crosses"), Some(ShapeClass::Cross));
        assert_eq!(ShapeClass::from_word("dog"), None);
        assert_eq!(ShapeClass::from_word("s"), None);
    }

    /// Every class word is one token of the real CLIP vocabulary, when it is present.
    #[test]
    fn names_are_single_clip_tokens() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/sd1-tiny/model/tokenizer/vocab.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("skipping: {} not found", path.display());
            return;
        };
        let vocab: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).unwrap();
        for c in ShapeClass::ALL {
            assert!(
                vocab.contains_key(&format!("{}</w>", c.name())),
                "{c} is not a single token"
            );
        }
    }

    /// Each silhouette touches all four sides of its box, and the classes differ.
    #[test]
    fn silhouettes_fill_their_box() {
        const N: usize = 200;
        for c in ShapeClass::ALL {
            let (mut u0, mut u1, mut v0, mut v1) = (1f32, 0f32, 1f32, 0f32);
            for j in 0..N {
                for i in 0..N {
                    let (u, v) = (i as f32 / (N - 1) as f32, j as f32 / (N - 1) as f32);
                    if c.contains(u, v) {
                        u0 = u0.min(u);
                        u1 = u1.max(u);
                        v0 = v0.min(v);
                        v1 = v1.max(v);
                    }
                }
            }
            let tol = 0.02;
            assert!(
                u0 < tol && v0 < tol && u1 > 1.0 - tol && v1 > 1.0 - tol,
                "{c}: {u0} {u1} {v0} {v1}"
            );
            let f = c.fill_ratio();
            assert!((0.3..=1.0).contains(&f), "{c} fill {f}");
        }
    }

    /// The colours stay apart even for a pale (half-strength) drawing: the
    /// distance of one class's colour from another class's background→colour line.
    #[test]
    fn colours_are_well_separated() {
        let bg = [245f32; 3];
        let mut min = f32::MAX;
        for a in ShapeClass::ALL {
            for b in ShapeClass::ALL {
                if a == b {
                    continue;
                }
                let q: Vec<f32> = (0..3).map(|k| a.color()[k] as f32 - bg[k]).collect();
                let d: Vec<f32> = (0..3).map(|k| b.color()[k] as f32 - bg[k]).collect();
                let dd: f32 = d.iter().map(|x| x * x).sum();
                let t = (q.iter().zip(&d).map(|(x, y)| x * y).sum::<f32>() / dd).clamp(0.0, 1.0);
                let r = (0..3)
                    .map(|k| (q[k] - t * d[k]).powi(2))
                    .sum::<f32>()
                    .sqrt();
                min = min.min(r);
            }
        }
        assert!(min > 95.0, "closest pair of colours only {min} apart");
    }
}
