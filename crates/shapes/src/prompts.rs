//! Evaluation prompts "a {A} {relation} a {B}" and reading prompts back into classes.

use l2s_eval::prompts::article;
use l2s_eval::{Relation, Triplet};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::ShapeClass;

/// One spatial prompt over two different classes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EvalPrompt {
    pub a: ShapeClass,
    pub relation: Relation,
    pub b: ShapeClass,
}

impl EvalPrompt {
    /// "a circle left of a square".
    pub fn text(&self) -> String {
        format!(
            "{} {} {} {} {}",
            article(self.a.name()),
            self.a,
            self.relation,
            article(self.b.name()),
            self.b
        )
    }

    /// GenEval's wording: "a photo of a circle left of a square".
    pub fn geneval_text(&self) -> String {
        format!("a photo of {}", self.text())
    }

    /// The wanted layout, for [`l2s_eval::judge`].
    pub fn triplet(&self) -> Triplet {
        Triplet::new(self.a.name(), self.relation, self.b.name())
    }

    /// The prompt as a GenEval metadata line (B listed first, A positioned relative to it).
    pub fn geneval_line(&self) -> String {
        serde_json::json!({
            "tag": "position",
            "include": [
                {"class": self.b.name(), "count": 1},
                {"class": self.a.name(), "count": 1, "position": [self.relation.name(), 0]},
            ],
            "prompt": self.geneval_text(),
        })
        .to_string()
    }
}

/// Every prompt: each ordered pair of different classes with each relation
/// (8 · 7 · 4 = 224), in a fixed order.
pub fn all_prompts() -> Vec<EvalPrompt> {
    let mut out = Vec::new();
    for a in ShapeClass::ALL {
        for b in ShapeClass::ALL {
            if a == b {
                continue;
            }
            for relation in Relation::ALL {
                out.push(EvalPrompt { a, relation, b });
            }
        }
    }
    out
}

/// [`all_prompts`] in an order fixed by `seed`.
pub fn shuffled_prompts(seed: u64) -> Vec<EvalPrompt> {
    let mut all = all_prompts();
    all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    all
}

/// Splits the shuffled prompts into `held_out` prompts for evaluation and the
/// rest (for training or tuning). `held_out` is capped at the number of prompts.
pub fn split_prompts(held_out: usize, seed: u64) -> (Vec<EvalPrompt>, Vec<EvalPrompt>) {
    let mut all = shuffled_prompts(seed);
    let rest = all.split_off(held_out.min(all.len()));
    (all, rest)
}

/// A prompt that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("no relation phrase (left of, right of, above, below, …) in prompt {0:?}")]
    NoRelation(String),
    #[error("prompt {prompt:?}: cannot map {words:?} to a shape class (known: circle, square, triangle, star, heart, ring, cross, diamond)")]
    UnknownWords { prompt: String, words: Vec<String> },
}

/// Words that may surround an object name without naming anything.
const FILLER: &[&str] = &[
    "a", "an", "the", "one", "photo", "picture", "image", "of", "is", "single",
];

/// Maps object phrases ("a circle", "the star", "ring") to classes. Fails
/// with every word that is neither a class name nor filler; an object phrase
/// with no class word is reported whole.
pub fn map_objects(prompt: &str, phrases: &[&str]) -> Result<Vec<ShapeClass>, PromptError> {
    let mut classes = Vec::new();
    let mut unknown = Vec::new();
    for phrase in phrases {
        let mut found = None;
        let mut bad = Vec::new();
        for w in words(phrase) {
            if FILLER.contains(&w.as_str()) {
                continue;
            }
            match ShapeClass::from_word(&w) {
                Some(c) if found.is_none() => found = Some(c),
                _ => bad.push(w),
            }
        }
        match found {
            Some(c) if bad.is_empty() => classes.push(c),
            _ if bad.is_empty() => unknown.push(phrase.trim().to_string()),
            _ => unknown.extend(bad),
        }
    }
    if unknown.is_empty() {
        Ok(classes)
    } else {
        Err(PromptError::UnknownWords {
            prompt: prompt.to_string(),
            words: unknown,
        })
    }
}

/// Reads "a photo of a circle to the left of a square" (or any phrasing
/// [`Relation::parse`] accepts) into a prompt over classes.
pub fn parse_prompt(text: &str) -> Result<EvalPrompt, PromptError> {
    let ws = words(text);
    // Find the earliest relation phrase, preferring the longest at a position.
    let mut hit = None;
    'outer: for start in 0..ws.len() {
        for (phrase, rel) in Relation::phrases() {
            let pw: Vec<&str> = phrase.split(' ').collect();
            if ws.len() >= start + pw.len()
                && ws[start..start + pw.len()]
                    .iter()
                    .zip(&pw)
                    .all(|(a, b)| a == b)
            {
                hit = Some((start, pw.len(), *rel));
                break 'outer;
            }
        }
    }
    let (start, len, relation) = hit.ok_or_else(|| PromptError::NoRelation(text.to_string()))?;
    let left = ws[..start].join(" ");
    let right = ws[start + len..].join(" ");
    let classes = map_objects(text, &[&left, &right])?;
    Ok(EvalPrompt {
        a: classes[0],
        relation,
        b: classes[1],
    })
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn all_and_split() {
        let all = all_prompts();
        assert_eq!(all.len(), 224);
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), 224);
        assert_eq!(all[0].text(), "a circle left of a square");
        let (held, rest) = split_prompts(100, 3);
        assert_eq!((held.len(), rest.len()), (100, 124));
        let union: HashSet<_> = held.iter().chain(&rest).collect();
        assert_eq!(union.len(), 224);
        assert_eq!(split_prompts(100, 3).0, held);
        assert_ne!(split_prompts(100, 4).0, held);
        assert_eq!(split_prompts(1000, 3).0.len(), 224);
    }

    #[test]
    fn parse_round_trip() {
        for p in all_prompts() {
            assert_eq!(parse_prompt(&p.text()).unwrap(), p);
            assert_eq!(parse_prompt(&p.geneval_text()).unwrap(), p);
            let line = l2s_eval::parse_position_line(&p.geneval_line())
                .unwrap()
                .unwrap();
            assert_eq!(line.triplet, p.triplet());
        }
        let p = parse_prompt("A photo of a Star, to the left of the ring.").unwrap();
        assert_eq!(
            (p.a, p.relation, p.b),
            (ShapeClass::Star, Relation::LeftOf, ShapeClass::Ring)
        );
        let p = parse_prompt("a heart on top of a cross").unwrap();
        assert_eq!(p.relation, Relation::Above);
    }

    #[test]
    fn reports_unmapped_words() {
        match parse_prompt("a photo of a dog right of a teddy bear") {
            Err(PromptError::UnknownWords { words, .. }) => {
                assert_eq!(words, ["dog", "teddy", "bear"])
            }
            other => panic!("{other:?}"),
        }
        match parse_prompt("a red circle above a square") {
            Err(PromptError::UnknownWords { words, .. }) => assert_eq!(words, ["red"]),
            other => panic!("{other:?}"),
        }
        match parse_prompt("a circle above") {
            Err(PromptError::UnknownWords { words, .. }) => assert_eq!(words, [""]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_prompt("a circle near a square"),
            Err(PromptError::NoRelation(_))
        ));
        assert_eq!(
            map_objects("", &["the circles", "a ring"]).unwrap(),
            [ShapeClass::Circle, ShapeClass::Ring]
        );
    }
}
