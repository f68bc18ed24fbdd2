//! A small is-a table (hypernyms) for GQA's ambiguity filter.

use std::collections::{BTreeMap, BTreeSet};

/// The table shipped with the crate (`data/hypernyms.txt`).
const BUILTIN: &str = include_str!("../data/hypernyms.txt");

/// A malformed hypernym table line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hypernym table line {line}: {message}")]
pub struct HypernymError {
    pub line: usize,
    pub message: String,
}

/// Is-a pairs between object names: "dog" is an "animal".
///
/// Text form: one line per general name, `general: specific, specific, …`; `#` starts a
/// comment line; names are lower-cased and their spaces collapsed. A specific name may be the
/// general name of another line: [`Hypernyms::is_a`] follows such chains (the transitive
/// closure is computed once, at parse time). A chain that comes back to its start is refused.
#[derive(Debug, Clone, Default)]
pub struct Hypernyms {
    /// name → every name it is a kind of.
    ancestors: BTreeMap<String, BTreeSet<String>>,
}

fn norm(name: &str) -> String {
    name.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Hypernyms {
    /// The table shipped with the crate: people, animals, vehicles, furniture, clothing,
    /// food, plants, buildings, containers, dishes, devices and a few more, over GQA's
    /// frequent object names.
    pub fn builtin() -> Self {
        Self::parse(BUILTIN).expect("the shipped hypernym table parses")
    }

    /// A table with no pairs (the is-a filter then removes nothing).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses the text form.
    pub fn parse(text: &str) -> Result<Self, HypernymError> {
        let mut parents: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: &str| HypernymError {
                line: i + 1,
                message: message.to_string(),
            };
            let (general, specifics) = line
                .split_once(':')
                .ok_or_else(|| err("expected \"general: specific, specific, ...\""))?;
            let general = norm(general);
            if general.is_empty() {
                return Err(err("empty general name"));
            }
            for s in specifics.split(',') {
                let s = norm(s);
                if s.is_empty() {
                    continue;
                }
                if s == general {
                    return Err(err(&format!("{s:?} is listed as a kind of itself")));
                }
                parents.entry(s).or_default().insert(general.clone());
            }
        }
        // Transitive closure by walking up from every name.
        let mut ancestors = BTreeMap::new();
        for name in parents.keys() {
            let mut seen = BTreeSet::new();
            let mut todo: Vec<&String> = parents[name].iter().collect();
            while let Some(p) = todo.pop() {
                if p == name {
                    return Err(HypernymError {
                        line: 0,
                        message: format!("{name:?} is, through a chain, a kind of itself"),
                    });
                }
                if seen.insert(p.clone()) {
                    if let Some(up) = parents.get(p) {
                        todo.extend(up.iter());
                    }
                }
            }
            ancestors.insert(name.clone(), seen);
        }
        Ok(Self { ancestors })
    }

    /// True when `specific` is a kind of `general` (directly or through a chain).
    pub fn is_a(&self, specific: &str, general: &str) -> bool {
        self.ancestors
            .get(&norm(specific))
            .is_some_and(|a| a.contains(&norm(general)))
    }

    /// True when either name is a kind of the other.
    pub fn related(&self, a: &str, b: &str) -> bool {
        self.is_a(a, b) || self.is_a(b, a)
    }

    /// Every name of `names` that is a kind of another one or has another one as a kind
    /// (both names of each is-a pair), in `names` order.
    pub fn in_pairs<'a>(&self, names: &[&'a str]) -> Vec<&'a str> {
        names
            .iter()
            .enumerate()
            .filter(|(i, a)| {
                names
                    .iter()
                    .enumerate()
                    .any(|(j, b)| *i != j && norm(a) != norm(b) && self.related(a, b))
            })
            .map(|(_, a)| *a)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_pairs_and_chains() {
        let h = Hypernyms::builtin();
        assert!(h.is_a("dog", "animal"));
        assert!(h.is_a("puppy", "dog"));
        // Through the chain puppy → dog → animal.
        assert!(h.is_a("puppy", "animal"));
        assert!(h.is_a("Man", "person"));
        assert!(h.is_a("palm  tree", "plant"));
        assert!(!h.is_a("animal", "dog"));
        assert!(h.related("animal", "dog"));
        assert!(!h.related("dog", "cat"));
        assert!(!h.related("dog", "dog"));
        assert!(!h.is_a("table", "chair"));
    }

    #[test]
    fn in_pairs_marks_both_names() {
        let h = Hypernyms::builtin();
        assert_eq!(
            h.in_pairs(&["dog", "table", "animal", "cat"]),
            vec!["dog", "animal", "cat"]
        );
        assert!(h.in_pairs(&["dog", "table", "cat"]).is_empty());
    }

    #[test]
    fn parse_errors_and_custom_tables() {
        let h = Hypernyms::parse("# c\nfruit: apple, pear\n\napple: green apple\n").unwrap();
        assert!(h.is_a("green apple", "fruit"));
        assert!(!h.is_a("dog", "animal"));
        let e = Hypernyms::parse("fruit apple").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(Hypernyms::parse("a: b\nb: a").is_err());
        assert!(Hypernyms::parse("a: a").is_err());
        assert!(!Hypernyms::empty().related("dog", "animal"));
    }
}
