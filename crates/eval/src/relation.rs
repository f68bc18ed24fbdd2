//! Spatial relations and GenEval's rule for reading them from two boxes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::BBox;

/// GenEval's default `position_threshold`: each axis offset is shrunk by this
/// fraction of the two boxes' summed extent on that axis.
pub const POSITION_THRESHOLD: f32 = 0.1;

/// One of the four GenEval spatial relations, read as "A *relation* B".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

/// A phrase that names no known relation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown relation {0:?}: expected one of \"left of\", \"right of\", \"above\", \"below\" (or a phrasing such as \"to the left of\", \"on top of\", \"under\")")]
pub struct UnknownRelation(pub String);

impl Relation {
    /// All four, in the order left of, right of, above, below.
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    /// The canonical GenEval name: "left of", "right of", "above", "below".
    pub fn name(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// The phrase prompts use and the published Learn-to-Steer classifiers name their classes
    /// by: "to the left of", "to the right of", "above", "below".
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// Position in [`Relation::ALL`] (a stable class index).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The relation with the roles of A and B swapped ("A left of B" ⇔ "B right of A").
    pub fn inverse(self) -> Relation {
        match self {
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
        }
    }

    /// True for left of / right of.
    pub fn is_horizontal(self) -> bool {
        matches!(self, Relation::LeftOf | Relation::RightOf)
    }

    /// Reads a relation phrase. Case, surrounding spaces, repeated spaces and a
    /// trailing "the"/"side of" are tolerated; accepted phrasings include
    /// "left of", "to the left of", "on the left of", "on the left side of",
    /// "right of", "to the right of", "above", "over", "on top of",
    /// "below", "under", "underneath", "beneath".
    pub fn parse(phrase: &str) -> Result<Relation, UnknownRelation> {
        let norm: Vec<String> = phrase
            .split_whitespace()
            .map(|w| w.to_ascii_lowercase())
            .collect();
        let norm = norm.join(" ");
        PHRASES
            .iter()
            .find(|(p, _)| *p == norm)
            .map(|(_, r)| *r)
            .ok_or_else(|| UnknownRelation(phrase.to_string()))
    }

    /// Every phrasing [`Relation::parse`] accepts, longest first, with its
    /// relation; useful for finding a relation inside a longer sentence.
    pub fn phrases() -> &'static [(&'static str, Relation)] {
        PHRASES
    }
}

// Longest first so that a scan of a sentence prefers "to the left of" over "left of".
static PHRASES: &[(&str, Relation)] = &[
    ("on the left side of", Relation::LeftOf),
    ("on the right side of", Relation::RightOf),
    ("to the left side of", Relation::LeftOf),
    ("to the right side of", Relation::RightOf),
    ("on the left of", Relation::LeftOf),
    ("on the right of", Relation::RightOf),
    ("to the left of", Relation::LeftOf),
    ("to the right of", Relation::RightOf),
    ("on the top of", Relation::Above),
    ("at the left of", Relation::LeftOf),
    ("at the right of", Relation::RightOf),
    ("on top of", Relation::Above),
    ("left side of", Relation::LeftOf),
    ("right side of", Relation::RightOf),
    ("left of", Relation::LeftOf),
    ("right of", Relation::RightOf),
    ("underneath", Relation::Below),
    ("beneath", Relation::Below),
    ("above", Relation::Above),
    ("below", Relation::Below),
    ("under", Relation::Below),
    ("over", Relation::Above),
];

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Relation {
    type Err = UnknownRelation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Relation::parse(s)
    }
}

impl Serialize for Relation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Relation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Relation::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A set of relations (at most two hold at once under GenEval's rule, one per axis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RelationSet(u8);

impl RelationSet {
    /// The empty set.
    pub fn empty() -> Self {
        Self(0)
    }

    /// Adds a relation.
    pub fn insert(&mut self, r: Relation) {
        self.0 |= 1 << r.index();
    }

    /// Membership test.
    pub fn contains(&self, r: Relation) -> bool {
        self.0 & (1 << r.index()) != 0
    }

    /// True when no relation holds.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// Number of relations in the set.
    pub fn len(&self) -> usize {
        self.0.count_ones() as usize
    }

    /// Members in [`Relation::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = Relation> + '_ {
        Relation::ALL.into_iter().filter(|r| self.contains(*r))
    }

    /// Canonical names of the members.
    pub fn names(&self) -> Vec<&'static str> {
        self.iter().map(Relation::name).collect()
    }

    /// The set seen from B: each member replaced by its inverse.
    pub fn inverse(&self) -> Self {
        self.iter().map(Relation::inverse).collect()
    }
}

impl FromIterator<Relation> for RelationSet {
    fn from_iter<I: IntoIterator<Item = Relation>>(iter: I) -> Self {
        let mut s = Self::empty();
        for r in iter {
            s.insert(r);
        }
        s
    }
}

impl fmt::Display for RelationSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(none)");
        }
        f.write_str(&self.names().join(" and "))
    }
}

impl Serialize for RelationSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names().serialize(s)
    }
}

impl<'de> Deserialize<'de> for RelationSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<Relation>::deserialize(d)?;
        Ok(v.into_iter().collect())
    }
}

/// The relations in which box `a` stands to box `b`, by GenEval's rule with
/// the default threshold (see [`relations_with_threshold`]).
pub fn relations(a: &BBox, b: &BBox) -> RelationSet {
    relations_with_threshold(a, b, POSITION_THRESHOLD)
}

/// GenEval's position rule. With `offset = centre(a) − centre(b)`, each axis is
/// shrunk towards zero by `threshold · (extent_a + extent_b)` on that axis (width
/// for x, height for y), keeping its sign and stopping at zero. If both shrunk
/// components are below 1e-3 in magnitude, no relation holds. Otherwise the
/// shrunk vector is divided by the length of the *unshrunk* offset, giving
/// `(dx, dy)`: `dx < −0.5` → left of, `dx > 0.5` → right of, `dy < −0.5` →
/// above, `dy > 0.5` → below (y grows downwards). A diagonal layout can hold
/// one relation on each axis.
pub fn relations_with_threshold(a: &BBox, b: &BBox, threshold: f32) -> RelationSet {
    let (ax, ay) = a.center();
    let (bx, by) = b.center();
    // Work in f64 so results do not depend on the order of f32 rounding.
    let off = [(ax - bx) as f64, (ay - by) as f64];
    let dims = [
        (a.width() + b.width()) as f64,
        (a.height() + b.height()) as f64,
    ];
    let t = threshold as f64;
    let shrunk = [
        (off[0].abs() - t * dims[0]).max(0.0) * sign(off[0]),
        (off[1].abs() - t * dims[1]).max(0.0) * sign(off[1]),
    ];
    let mut set = RelationSet::empty();
    if shrunk[0].abs() < 1e-3 && shrunk[1].abs() < 1e-3 {
        return set;
    }
    let norm = (off[0] * off[0] + off[1] * off[1]).sqrt();
    let (dx, dy) = (shrunk[0] / norm, shrunk[1] / norm);
    if dx < -0.5 {
        set.insert(Relation::LeftOf);
    }
    if dx > 0.5 {
        set.insert(Relation::RightOf);
    }
    if dy < -0.5 {
        set.insert(Relation::Above);
    }
    if dy > 0.5 {
        set.insert(Relation::Below);
    }
    set
}

// numpy's sign: 0 for 0.
fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sq(cx: f32, cy: f32, side: f32) -> BBox {
        BBox::new(
            cx - side / 2.0,
            cy - side / 2.0,
            cx + side / 2.0,
            cy + side / 2.0,
        )
    }

    fn set(rs: &[Relation]) -> RelationSet {
        rs.iter().copied().collect()
    }

    use Relation::*;

    #[test]
    fn clear_horizontal_and_vertical() {
        // A at (10,50), B at (40,50), both 10 wide: offset (-30, 0);
        // shrink 0.1*(10+10)=2 → (-28, 0); /30 → dx = -0.933.
        let a = sq(10.0, 50.0, 10.0);
        let b = sq(40.0, 50.0, 10.0);
        assert_eq!(relations(&a, &b), set(&[LeftOf]));
        assert_eq!(relations(&b, &a), set(&[RightOf]));
        // Vertical: A above B (smaller y is higher up).
        let a = sq(50.0, 10.0, 10.0);
        let b = sq(50.0, 40.0, 10.0);
        assert_eq!(relations(&a, &b), set(&[Above]));
        assert_eq!(relations(&b, &a), set(&[Below]));
    }

    #[test]
    fn diagonal_gives_two() {
        // offset (-30, -30), shrink 2 per axis → (-28, -28) / 42.43 = -0.66 each.
        let a = sq(10.0, 10.0, 10.0);
        let b = sq(40.0, 40.0, 10.0);
        assert_eq!(relations(&a, &b), set(&[LeftOf, Above]));
        assert_eq!(relations(&b, &a), set(&[RightOf, Below]));
        // Up-right diagonal.
        let a = sq(40.0, 10.0, 10.0);
        let b = sq(10.0, 40.0, 10.0);
        assert_eq!(relations(&a, &b), set(&[RightOf, Above]));
    }

    #[test]
    fn mostly_horizontal_diagonal_gives_one() {
        // offset (-30, -10); shrink 2 → (-28, -8); norm 31.62 → dx -0.885, dy -0.253.
        let a = sq(10.0, 30.0, 10.0);
        let b = sq(40.0, 40.0, 10.0);
        assert_eq!(relations(&a, &b), set(&[LeftOf]));
    }

    #[test]
    fn uses_per_axis_extent() {
        // Tall thin boxes: widths 4, heights 40. offset (-10, -10).
        // x: |−10| − 0.1·8 = 9.2; y: |−10| − 0.1·80 = 2. norm 14.14 →
        // dx = −0.651 (left of), dy = −0.141 (no vertical relation).
        let a = BBox::new(8.0, -10.0, 12.0, 30.0); // centre (10, 10)
        let b = BBox::new(18.0, 0.0, 22.0, 40.0); // centre (20, 20)
        assert_eq!(relations(&a, &b), set(&[LeftOf]));
        // Swap the roles of width and height: only the vertical relation survives.
        let a = BBox::new(-10.0, 8.0, 30.0, 12.0);
        let b = BBox::new(0.0, 18.0, 40.0, 22.0);
        assert_eq!(relations(&a, &b), set(&[Above]));
    }

    #[test]
    fn overlapping_boxes() {
        // Heavy overlap: offset (-3, 0), shrink 0.1·40 = 4 → 0: no relation.
        let a = sq(47.0, 50.0, 20.0);
        let b = sq(50.0, 50.0, 20.0);
        assert!(relations(&a, &b).is_empty());
        // Partial overlap but clearly shifted: offset (-12, 0), shrink 4 → -8; /12 = -0.667.
        let a = sq(38.0, 50.0, 20.0);
        assert_eq!(relations(&a, &b), set(&[LeftOf]));
        // Small box inside a big one, shifted up: offset (0,-20); shrink 0.1·(10+60)=7 → -13/20 = -0.65.
        let small = sq(50.0, 30.0, 10.0);
        let big = sq(50.0, 50.0, 60.0);
        assert_eq!(relations(&small, &big), set(&[Above]));
    }

    #[test]
    fn near_zero_offsets() {
        let a = sq(50.0, 50.0, 10.0);
        assert!(relations(&a, &a).is_empty());
        // Zero-size boxes at (nearly) the same point: shrunk offset below 1e-3.
        let p = BBox::new(5.0, 5.0, 5.0, 5.0);
        let q = BBox::new(5.0005, 5.0, 5.0005, 5.0);
        assert!(relations(&p, &q).is_empty());
        // Zero-size boxes a tiny but measurable distance apart still relate.
        let q = BBox::new(5.01, 5.0, 5.01, 5.0);
        assert_eq!(relations(&q, &p), set(&[RightOf]));
    }

    #[test]
    fn threshold_boundary() {
        // offset (-x, 0) with 10-px boxes: dx = -(x - 2)/x; equals -0.5 at x = 4.
        let b = sq(50.0, 50.0, 10.0);
        assert!(relations(&sq(46.0, 50.0, 10.0), &b).is_empty()); // dx = -0.5 exactly: not < -0.5
        assert_eq!(relations(&sq(45.9, 50.0, 10.0), &b), set(&[LeftOf]));
        // Larger threshold removes the relation.
        let a = sq(40.0, 50.0, 10.0); // offset -10: dx = -0.8 at 0.1; at 0.3: (10-6)/10 = 0.4
        assert_eq!(relations_with_threshold(&a, &b, 0.1), set(&[LeftOf]));
        assert!(relations_with_threshold(&a, &b, 0.3).is_empty());
    }

    #[test]
    fn scale_invariant_across_image_sizes() {
        let layouts = [
            (
                BBox::new(2.0, 3.0, 12.0, 11.0),
                BBox::new(18.0, 20.0, 29.0, 30.0),
            ),
            (
                BBox::new(20.0, 2.0, 30.0, 10.0),
                BBox::new(2.0, 5.0, 12.0, 14.0),
            ),
            (
                BBox::new(10.0, 2.0, 20.0, 10.0),
                BBox::new(11.0, 18.0, 19.0, 30.0),
            ),
            (
                BBox::new(10.0, 10.0, 20.0, 20.0),
                BBox::new(12.0, 11.0, 22.0, 21.0),
            ),
        ];
        for (a, b) in layouts {
            let r32 = relations(&a, &b);
            for k in [2.0, 16.0, 0.5] {
                assert_eq!(
                    relations(&a.scaled(k), &b.scaled(k)),
                    r32,
                    "{a:?} {b:?} ×{k}"
                );
            }
            assert_eq!(relations(&b, &a), r32.inverse());
        }
    }

    /// Boxes as a detector reports them on real image sizes; the rule reads only the boxes,
    /// so the image size matters only through them. Each case worked by hand.
    #[test]
    fn hand_computed_real_sizes() {
        // 512×512: dog (50,200)-(150,300), bear (300,180)-(450,330). Centres (100,250) and
        // (375,255): offset (−275, −5). Shrink x by 0.1·(100+150) = 25 → −250; y by
        // 0.1·(100+150) = 25 → 0. Norm 275.05 → dx = −0.909, dy = 0: left of only.
        let dog = BBox::new(50.0, 200.0, 150.0, 300.0);
        let bear = BBox::new(300.0, 180.0, 450.0, 330.0);
        assert_eq!(relations(&dog, &bear), set(&[LeftOf]));
        assert_eq!(relations(&bear, &dog), set(&[RightOf]));
        // 1024×256 (wide): A (100,20)-(300,120) centre (200,70), B (700,140)-(900,240) centre
        // (800,190): offset (−600, −120). Shrink x 0.1·400 = 40 → −560; y 0.1·200 = 20 → −100.
        // Norm 611.88 → dx = −0.915, dy = −0.163: left of only, although A is also higher.
        let a = BBox::new(100.0, 20.0, 300.0, 120.0);
        let b = BBox::new(700.0, 140.0, 900.0, 240.0);
        assert_eq!(relations(&a, &b), set(&[LeftOf]));
        // 256×1024 (tall), the same layout transposed: above only.
        let at = BBox::new(20.0, 100.0, 120.0, 300.0);
        let bt = BBox::new(140.0, 700.0, 240.0, 900.0);
        assert_eq!(relations(&at, &bt), set(&[Above]));
        // 32×32 (the shapes world): A (2,2)-(12,12) centre (7,7), B (18,18)-(30,30) centre
        // (24,24): offset (−17, −17). Shrink 0.1·22 = 2.2 → −14.8 each; norm 24.04 →
        // dx = dy = −0.616: left of and above.
        let a = BBox::new(2.0, 2.0, 12.0, 12.0);
        let b = BBox::new(18.0, 18.0, 30.0, 30.0);
        assert_eq!(relations(&a, &b), set(&[LeftOf, Above]));
        // 512×512 diagonal just short of two relations: offset (−200, −110), 100-px boxes.
        // Shrink 20 → (−180, −90); norm 228.25 → dx = −0.789, dy = −0.394: left of only.
        let a = sq(100.0, 140.0, 100.0);
        let b = sq(300.0, 250.0, 100.0);
        assert_eq!(relations(&a, &b), set(&[LeftOf]));
        // … and with offset (−200, −140): shrink → (−180, −120); norm 244.13 →
        // dx = −0.737, dy = −0.492 (still one); with (−200, −150): (−180, −130) / 250 →
        // dy = −0.52: both.
        assert_eq!(relations(&sq(100.0, 110.0, 100.0), &b), set(&[LeftOf]));
        assert_eq!(
            relations(&sq(100.0, 100.0, 100.0), &b),
            set(&[LeftOf, Above])
        );
    }

    /// Overlapping and nested boxes, worked by hand.
    #[test]
    fn hand_computed_overlaps() {
        // Nested with the same centre: offset 0 → no relation whatever the sizes.
        let big = BBox::new(0.0, 0.0, 100.0, 100.0);
        let small = BBox::new(40.0, 40.0, 60.0, 60.0);
        assert!(relations(&small, &big).is_empty());
        // Nested, off-centre to the right: small (70,45)-(90,55) centre (80,50); big centre
        // (50,50): offset (30, 0); shrink 0.1·(20+100) = 12 → 18; /30 = 0.6 → right of.
        let small = BBox::new(70.0, 45.0, 90.0, 55.0);
        assert_eq!(relations(&small, &big), set(&[RightOf]));
        // Same box shifted by 25 on a side of 100: shrink 20 → 5/25 = 0.2: no relation,
        // although A is plainly further right — the rule asks for a clear offset.
        let a = BBox::new(25.0, 0.0, 125.0, 100.0);
        assert!(relations(&a, &big).is_empty());
        // Shifted by 41: (41−20)/41 = 0.512 → right of; by 40: 20/40 = 0.5 → none.
        assert_eq!(
            relations(&BBox::new(41.0, 0.0, 141.0, 100.0), &big),
            set(&[RightOf])
        );
        assert!(relations(&BBox::new(40.0, 0.0, 140.0, 100.0), &big).is_empty());
    }

    /// Offsets at and just past the shrink margin, worked by hand.
    #[test]
    fn hand_computed_near_zero() {
        let b = sq(50.0, 50.0, 10.0);
        // Offset equal to the margin (2): shrunk to 0 → none.
        assert!(relations(&sq(52.0, 50.0, 10.0), &b).is_empty());
        // 0.0005 past the margin: below the 1e-3 floor → none.
        assert!(relations(&sq(52.0005, 50.0, 10.0), &b).is_empty());
        // 0.002 past it: above the floor, but dx = 0.002/2.002 ≈ 0.001 → still none.
        assert!(relations(&sq(52.002, 50.0, 10.0), &b).is_empty());
        // Zero-size boxes have no margin: offset (0.01, −0.01) → dx = 0.707, dy = −0.707.
        let p = BBox::new(5.0, 5.0, 5.0, 5.0);
        let q = BBox::new(5.01, 4.99, 5.01, 4.99);
        assert_eq!(relations(&q, &p), set(&[RightOf, Above]));
    }

    #[test]
    fn parse_phrases() {
        for (p, r) in [
            ("left of", LeftOf),
            ("to the left of", LeftOf),
            ("On the Left of", LeftOf),
            ("on the left side of", LeftOf),
            ("  right   of ", RightOf),
            ("to the right of", RightOf),
            ("above", Above),
            ("over", Above),
            ("on top of", Above),
            ("below", Below),
            ("under", Below),
            ("beneath", Below),
            ("underneath", Below),
        ] {
            assert_eq!(Relation::parse(p), Ok(r), "{p}");
        }
        assert!(Relation::parse("near").is_err());
        assert!(Relation::parse("").is_err());
        for r in Relation::ALL {
            assert_eq!(r.name().parse::<Relation>().unwrap(), r);
            assert_eq!(r.inverse().inverse(), r);
        }
    }

    #[test]
    fn serde_round_trip() {
        let s = set(&[LeftOf, Below]);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, r#"["left of","below"]"#);
        assert_eq!(serde_json::from_str::<RelationSet>(&j).unwrap(), s);
        assert_eq!(serde_json::to_string(&RightOf).unwrap(), r#""right of""#);
        assert_eq!(s.to_string(), "left of and below");
        assert_eq!(s.len(), 2);
    }
}
