//! Per-record problems: counted by kind, the first few of each kind listed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Why a record (an image, an object, a relation, a sample) was not yielded.
///
/// Two families: defects of the input ([`ProblemKind::is_defect`]) and records a selection
/// rule leaves out on purpose (the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    // Defects.
    /// The record's image file does not exist.
    MissingImage,
    /// The image file exists but cannot be decoded.
    UnreadableImage,
    /// An id already seen in this file; the later record is skipped.
    DuplicateId,
    /// A relation names an object id the image does not have.
    UnknownObject,
    /// An annotation names a category the file does not list.
    UnknownCategory,
    /// An annotation names an image the file does not list.
    UnknownImage,
    /// A line or row that is malformed (not JSON, missing fields, wrong types).
    BadRecord,
    /// A relation phrase that names none of the four relations.
    UnknownRelation,
    /// A box that is not finite or has a negative size.
    BadBox,
    /// The boxes given with a triplet do not show its relation under GenEval's rule.
    BoxesDisagree,
    /// A phase-2 map file does not exist.
    MissingMaps,
    /// A phase-2 map file cannot be read safely (not a torch.save file, refused content).
    UnreadableMaps,
    /// A phase-2 map tensor has an unexpected shape or dtype.
    BadMaps,
    /// A relation missing from the relation → index mapping file.
    NotInMapping,
    /// Published samples of one prompt recorded at other steps than the first prompt's.
    StepsDiffer,
    /// An image file whose pixel size differs from the size its annotation gives (its boxes
    /// would land elsewhere).
    SizeMismatch,

    // Selection rules.
    /// A relation outside the kept four (GQA's "on", "near", the authors' attribute "is", …).
    RelationNotKept,
    /// An object whose name occurs more than once in the image.
    RepeatedName,
    /// An object whose name is a hypernym or hyponym of another name in the image.
    HypernymPair,
    /// A relation between two objects of the same name.
    SameName,
    /// A COCO category with a crowd annotation in the image.
    CrowdCategory,
    /// A COCO category with more than one instance in the image.
    MultipleInstances,
    /// A box under the minimum size.
    SmallBox,
    /// A COCO pair with no relation under GenEval's rule.
    NoRelation,
    /// A COCO pair with two relations (a diagonal layout).
    TwoRelations,
    /// A relation already taken in the other direction ("B right of A" after "A left of B")
    /// or twice.
    RepeatedRelation,
    /// A usable triplet beyond the per-image limit.
    BeyondPerImageLimit,
    /// An image left without any usable triplet.
    NoTriplet,
    /// An object cut off by the fit to the model's size (too little of its box left); the
    /// triplets naming it are dropped.
    CutByCrop,
}

impl ProblemKind {
    /// True for defects of the input, false for records left out by a selection rule.
    pub fn is_defect(self) -> bool {
        use ProblemKind::*;
        matches!(
            self,
            MissingImage
                | UnreadableImage
                | DuplicateId
                | UnknownObject
                | UnknownCategory
                | UnknownImage
                | BadRecord
                | UnknownRelation
                | BadBox
                | BoxesDisagree
                | MissingMaps
                | UnreadableMaps
                | BadMaps
                | NotInMapping
                | SizeMismatch
                | StepsDiffer
        )
    }

    /// A short description.
    pub fn describe(self) -> &'static str {
        use ProblemKind::*;
        match self {
            MissingImage => "image file missing",
            UnreadableImage => "image unreadable",
            DuplicateId => "duplicate id",
            UnknownObject => "relation to an unknown object id",
            UnknownCategory => "unknown category id",
            UnknownImage => "annotation of an unknown image id",
            BadRecord => "malformed record",
            UnknownRelation => "unknown relation phrase",
            BadBox => "invalid box",
            BoxesDisagree => "boxes disagree with the relation",
            MissingMaps => "map file missing",
            UnreadableMaps => "map file unreadable",
            BadMaps => "map tensor of unexpected shape",
            NotInMapping => "relation missing from the mapping file",
            RelationNotKept => "relation outside the four kept",
            RepeatedName => "object name repeated in the image",
            HypernymPair => "object name in an is-a pair",
            SameName => "relation between objects of the same name",
            CrowdCategory => "category with a crowd annotation",
            MultipleInstances => "category with several instances",
            SmallBox => "box under the minimum size",
            NoRelation => "pair with no relation",
            TwoRelations => "pair with two relations",
            RepeatedRelation => "relation repeated or mirrored",
            BeyondPerImageLimit => "beyond the per-image limit",
            NoTriplet => "image without a usable triplet",
            CutByCrop => "object cut off by the crop",
            SizeMismatch => "image size differs from its annotation",
            StepsDiffer => "prompt recorded at other steps",
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// One listed problem: where, which record, why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub file: PathBuf,
    /// The record: an image id, `image/object`, `line N`, `sample N`.
    pub id: String,
    pub kind: ProblemKind,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.id, self.kind)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// Counts of every problem by kind (exact), and the first [`Problems::listed_per_kind`] of
/// each kind in full (a GQA file leaves out millions of relations by rule; listing them all
/// would cost more than the records).
#[derive(Debug, Clone, Serialize)]
pub struct Problems {
    counts: BTreeMap<ProblemKind, usize>,
    listed: Vec<Problem>,
    listed_per_kind: usize,
}

impl Default for Problems {
    fn default() -> Self {
        Self::new()
    }
}

impl Problems {
    /// How many problems of each kind are listed by default.
    pub const DEFAULT_LISTED_PER_KIND: usize = 50;

    pub fn new() -> Self {
        Self::with_listed_per_kind(Self::DEFAULT_LISTED_PER_KIND)
    }

    /// Lists up to `n` problems of each kind (counts stay exact).
    pub fn with_listed_per_kind(n: usize) -> Self {
        Self {
            counts: BTreeMap::new(),
            listed: Vec::new(),
            listed_per_kind: n,
        }
    }

    /// Records one problem.
    pub fn push(
        &mut self,
        file: &Path,
        id: impl Into<String>,
        kind: ProblemKind,
        detail: impl Into<String>,
    ) {
        let count = self.counts.entry(kind).or_insert(0);
        *count += 1;
        if *count <= self.listed_per_kind {
            self.listed.push(Problem {
                file: file.to_path_buf(),
                id: id.into(),
                kind,
                detail: detail.into(),
            });
        }
    }

    /// Records an image that failed to load ([`ProblemKind::UnreadableImage`], or
    /// [`ProblemKind::MissingImage`] when the file is absent).
    pub fn push_image_error(&mut self, id: impl Into<String>, err: &crate::ImageLoadError) {
        let kind = if err.is_missing() {
            ProblemKind::MissingImage
        } else {
            ProblemKind::UnreadableImage
        };
        self.push(err.path(), id, kind, err.to_string());
    }

    /// How many problems of `kind` were recorded.
    pub fn count(&self, kind: ProblemKind) -> usize {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    /// Every kind seen, with its count.
    pub fn counts(&self) -> &BTreeMap<ProblemKind, usize> {
        &self.counts
    }

    /// Total over all kinds.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// Total over the defects only.
    pub fn defects(&self) -> usize {
        self.counts
            .iter()
            .filter(|(k, _)| k.is_defect())
            .map(|(_, n)| n)
            .sum()
    }

    /// The listed problems, in the order they were recorded.
    pub fn listed(&self) -> &[Problem] {
        &self.listed
    }

    /// How many of each kind are listed.
    pub fn listed_per_kind(&self) -> usize {
        self.listed_per_kind
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// One line per kind: "  12 image file missing".
    pub fn summary(&self) -> String {
        self.counts
            .iter()
            .map(|(k, n)| format!("{n:>8} {k}\n"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_stay_exact_past_the_listing_cap() {
        let mut p = Problems::with_listed_per_kind(2);
        for i in 0..5 {
            p.push(
                Path::new("f.json"),
                i.to_string(),
                ProblemKind::SmallBox,
                "",
            );
        }
        p.push(Path::new("f.json"), "x", ProblemKind::MissingImage, "x.jpg");
        assert_eq!(p.count(ProblemKind::SmallBox), 5);
        assert_eq!(p.total(), 6);
        assert_eq!(p.defects(), 1);
        assert_eq!(p.listed().len(), 3);
        assert_eq!(
            p.listed()[2].to_string(),
            "f.json: x: image file missing (x.jpg)"
        );
        assert!(p.summary().contains("       5 box under the minimum size"));
    }
}
