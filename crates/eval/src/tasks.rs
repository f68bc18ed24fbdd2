//! GenEval's six tasks and our multi-relation one, as metadata lines to judge.
//!
//! Every GenEval metadata line is a list of clauses: `include` objects (a class, how many, and
//! optionally a colour and a position relative to an earlier include) that must all hold, and
//! `exclude` objects (a class and a count) of which none may reach its count. The tags only
//! name the task for the summary, except `counting`, whose detections must clear a higher score
//! threshold ([`crate::score::ScoreOptions::counting_min_score`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::prompts::{Include, SpatialPrompt, MULTI_TAG, POSITION_TAG};
use crate::Triplet;

/// GenEval's tags, in the order its metadata file lists the tasks.
pub const GENEVAL_TAGS: [&str; 6] = [
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
];

/// GenEval's tag of the counting task (its detections use the counting threshold).
pub const COUNTING_TAG: &str = "counting";

/// The colours GenEval's colour classifier chooses among, in its order.
pub const COLORS: [&str; 10] = [
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
];

/// True for the tags scored: GenEval's six and [`MULTI_TAG`].
pub fn is_scored_tag(tag: &str) -> bool {
    GENEVAL_TAGS.contains(&tag) || tag == MULTI_TAG
}

/// True for the tags whose lines must carry a relation.
pub fn is_spatial_tag(tag: &str) -> bool {
    tag == POSITION_TAG || tag == MULTI_TAG
}

/// An object the image must not show `count` or more times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclude {
    pub class: String,
    pub count: usize,
}

/// One metadata line of any scored task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPrompt {
    pub tag: String,
    pub prompt: String,
    pub include: Vec<Include>,
    pub exclude: Vec<Exclude>,
    /// The metadata line as read.
    pub metadata: Value,
}

impl From<&SpatialPrompt> for TaskPrompt {
    fn from(p: &SpatialPrompt) -> Self {
        p.task().clone()
    }
}

impl TaskPrompt {
    /// Reads a metadata value; `Ok(None)` for tags that are not scored. Checks that counts are
    /// at least 1, that colours are GenEval's, that every `position` refers to an earlier include
    /// (GenEval resolves targets in order), and that spatial lines have a relation.
    pub fn from_metadata(value: Value) -> Result<Option<Self>, String> {
        let tag = value
            .get("tag")
            .and_then(Value::as_str)
            .ok_or("no \"tag\" string")?
            .to_string();
        if !is_scored_tag(&tag) {
            return Ok(None);
        }
        let prompt = value
            .get("prompt")
            .and_then(Value::as_str)
            .ok_or("no \"prompt\" string")?
            .to_string();
        let raw = value.get("include").ok_or("no \"include\" list")?;
        let include: Vec<Include> = serde_json::from_value(raw.clone()).map_err(|e| {
            format!("\"include\" is not a list of {{class, count, color, position}}: {e}")
        })?;
        let exclude: Vec<Exclude> = match value.get("exclude") {
            None => Vec::new(),
            Some(raw) => serde_json::from_value(raw.clone())
                .map_err(|e| format!("\"exclude\" is not a list of {{class, count}}: {e}"))?,
        };
        for (i, inc) in include.iter().enumerate() {
            if inc.count == 0 {
                return Err(format!(
                    "include {i} ({}): count must be at least 1",
                    inc.class
                ));
            }
            if let Some(c) = &inc.color {
                if !COLORS.contains(&c.as_str()) {
                    return Err(format!(
                        "include {i} ({}): color {c:?} is not one of GenEval's {}",
                        inc.class,
                        COLORS.join(", ")
                    ));
                }
            }
            if let Some((rel, t)) = inc.position {
                if t >= i {
                    return Err(format!(
                        "include {i} ({}): position [\"{rel}\", {t}] must refer to an earlier include (0..{i})",
                        inc.class
                    ));
                }
            }
        }
        if let Some(e) = exclude.iter().find(|e| e.count == 0) {
            return Err(format!(
                "exclude {}: count must be at least 1 (0 would fail every image)",
                e.class
            ));
        }
        if include.is_empty() {
            return Err("\"include\" is empty".into());
        }
        if is_spatial_tag(&tag) && include.iter().all(|inc| inc.position.is_none()) {
            return Err(format!(
                "a {tag:?} line needs at least one \"position\" entry"
            ));
        }
        Ok(Some(Self {
            tag,
            prompt,
            include,
            exclude,
            metadata: value,
        }))
    }

    /// [`TaskPrompt::from_metadata`] on one line of text.
    pub fn from_line(line: &str) -> Result<Option<Self>, String> {
        Self::from_metadata(crate::prompts::metadata_object(line)?)
    }

    /// The relations asked for, as (subject class, relation, reference class), in `include` order.
    pub fn triplets(&self) -> Vec<Triplet> {
        self.include
            .iter()
            .filter_map(|inc| {
                inc.position
                    .map(|(r, t)| Triplet::new(inc.class.clone(), r, self.include[t].class.clone()))
            })
            .collect()
    }

    /// The metadata as one JSON line (what GenEval writes to `metadata.jsonl`).
    pub fn metadata_line(&self) -> String {
        self.metadata.to_string()
    }

    /// Some object must have a colour.
    pub fn needs_colors(&self) -> bool {
        self.include.iter().any(|i| i.color.is_some())
    }

    /// A spatial task (its images also count towards VISOR's metrics).
    pub fn is_spatial(&self) -> bool {
        is_spatial_tag(&self.tag)
    }
}

/// GenEval's reason for too few objects of the wanted colour: "expected red car>=1, found 0 red;
/// and 1 blue", the tally listing the colours seen in [`COLORS`] order.
pub fn color_reason(class: &str, count: usize, wanted: &str, seen: &[&str]) -> String {
    let n = |c: &str| seen.iter().filter(|s| **s == c).count();
    let tally: Vec<String> = COLORS
        .iter()
        .filter(|c| seen.contains(c))
        .map(|c| format!("{} {c}", n(c)))
        .collect();
    format!(
        "expected {wanted} {class}>={count}, found {} {wanted}; and {}",
        n(wanted),
        tally.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_geneval_task() {
        let lines = [
            r#"{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}"#,
            r#"{"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}], "prompt": "a photo of a dog and a cat"}"#,
            r#"{"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}], "prompt": "a photo of three dogs"}"#,
            r#"{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}"#,
            r#"{"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "cup", "count": 1, "color": "blue"}], "prompt": "a photo of a red car and a blue cup"}"#,
        ];
        let ps: Vec<TaskPrompt> = lines
            .iter()
            .map(|l| TaskPrompt::from_line(l).unwrap().unwrap())
            .collect();
        assert_eq!(
            ps[2].exclude,
            [Exclude {
                class: "dog".into(),
                count: 4
            }]
        );
        assert_eq!(ps[4].include[1].color.as_deref(), Some("blue"));
        assert!(ps[3].needs_colors() && !ps[1].needs_colors());
        assert!(
            TaskPrompt::from_line(r#"{"tag": "other", "include": [], "prompt": "x"}"#)
                .unwrap()
                .is_none()
        );
        let bad = [
            (
                r#"{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "teal"}], "prompt": "p"}"#,
                "teal",
            ),
            (
                r#"{"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 0}], "prompt": "p"}"#,
                "exclude dog",
            ),
            (
                r#"{"tag": "single_object", "include": [], "prompt": "p"}"#,
                "empty",
            ),
            (
                r#"{"tag": "position", "include": [{"class": "dog", "count": 1}], "prompt": "p"}"#,
                "position",
            ),
        ];
        for (line, word) in bad {
            let e = TaskPrompt::from_line(line).unwrap_err();
            assert!(e.contains(word), "{e}");
        }
    }

    #[test]
    fn color_reasons_read_like_genevals() {
        assert_eq!(
            color_reason("car", 1, "red", &["blue"]),
            "expected red car>=1, found 0 red; and 1 blue"
        );
        assert_eq!(
            color_reason("cup", 3, "white", &["white", "black", "white"]),
            "expected white cup>=3, found 2 white; and 1 black, 2 white"
        );
    }
}
