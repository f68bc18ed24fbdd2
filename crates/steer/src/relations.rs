//! Reading spatial relations out of prompts.
//!
//! A prompt such as "a photo of a dog to the right of a teddy bear" yields the triplet
//! (dog, right of, teddy bear). Chains yield one triplet per relation phrase:
//! "a frog above a sneaker to the right of an umbrella" gives (frog, above, sneaker) and
//! (sneaker, right of, umbrella). Relation phrasings come from [`Relation::phrases`]
//! ("left of", "on the left of", "to the right side of", "on top of", "under", "beneath", …).
//!
//! Object phrases keep every word except leading articles/quantifiers and filler such as
//! "is placed": "a red traffic light" → "red traffic light". When the parser guesses wrong,
//! an explicit override ("dog,right of,teddy bear") names the triplets directly
//! ([`parse_override`], checked against the prompt by [`triplets_for`]).

use l2s_eval::{Relation, Triplet};

/// Why no triplets could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelationParseError {
    #[error("no spatial relation found in prompt {prompt:?}: expected a phrase such as \"left of\", \"to the right of\", \"above\", \"on top of\", \"below\" or \"under\" between two objects (or give the triplet explicitly, e.g. \"dog,right of,teddy bear\")")]
    NoRelation { prompt: String },
    #[error("prompt {prompt:?}: no object named before the relation {phrase:?}")]
    MissingSubject { prompt: String, phrase: String },
    #[error("prompt {prompt:?}: no object named after the relation {phrase:?}")]
    MissingObject { prompt: String, phrase: String },
    #[error("relation override {spec:?}: {reason}")]
    BadOverride { spec: String, reason: String },
    #[error("relation override {spec:?}: {word:?} does not occur in the prompt {prompt:?}")]
    NotInPrompt {
        spec: String,
        word: String,
        prompt: String,
    },
}

// Leading words that are not part of an object's name.
const DETERMINERS: &[&str] = &[
    "a", "an", "the", "some", "one", "two", "three", "four", "this", "that", "these", "those",
    "another", "single", "my", "his", "her", "their", "its", "our", "your",
];

// Words that introduce the depicted scene: "a photo of", "an image of", …
const MEDIA: &[&str] = &[
    "photo",
    "photograph",
    "picture",
    "image",
    "painting",
    "drawing",
    "illustration",
    "render",
    "rendering",
    "sketch",
    "snapshot",
    "shot",
    "close-up",
    "closeup",
    "view",
    "scene",
    "depiction",
];

// Trailing filler between a subject and its relation phrase: "a cup is placed above …".
const FILLERS: &[&str] = &[
    "is",
    "are",
    "was",
    "were",
    "be",
    "being",
    "sits",
    "sit",
    "sitting",
    "stands",
    "stand",
    "standing",
    "lies",
    "lie",
    "lying",
    "placed",
    "located",
    "positioned",
    "situated",
    "hanging",
    "floating",
    "appears",
    "that",
    "which",
    "who",
    "directly",
    "just",
    "right",
];

// Words after which an object phrase stops: "… a teddy bear in a park", "… a sneaker which is …".
const OBJECT_END: &[&str] = &[
    "in", "at", "with", "on", "near", "during", "inside", "by", "from", "against", "while",
    "which", "that", "who", "and",
];

const SEPARATOR: &str = ",";

/// Lower-cased words; commas, semicolons, full stops, colons and similar become a "," token.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        if ch.is_alphanumeric() || ch == '\'' || ch == '-' {
            cur.extend(ch.to_lowercase());
        } else {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            if matches!(ch, ',' | ';' | '.' | ':' | '!' | '?' | '(' | ')') {
                out.push(SEPARATOR.to_string());
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct Found {
    start: usize,
    end: usize,
    relation: Relation,
    phrase: String,
}

// Relation phrases as word lists, most words first so the longest phrasing wins.
fn phrase_table() -> Vec<(Vec<&'static str>, Relation)> {
    let mut t: Vec<(Vec<&'static str>, Relation)> = Relation::phrases()
        .iter()
        .map(|(p, r)| (p.split_whitespace().collect(), *r))
        .collect();
    t.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    t
}

fn find_relations(ws: &[String]) -> Vec<Found> {
    let table = phrase_table();
    let mut found = Vec::new();
    let mut i = 0;
    while i < ws.len() {
        let hit = table.iter().find(|(p, _)| {
            i + p.len() <= ws.len() && p.iter().zip(&ws[i..]).all(|(a, b)| *a == b.as_str())
        });
        match hit {
            Some((p, r)) => {
                found.push(Found {
                    start: i,
                    end: i + p.len(),
                    relation: *r,
                    phrase: ws[i..i + p.len()].join(" "),
                });
                i += p.len();
            }
            None => i += 1,
        }
    }
    found
}

fn strip_determiners(mut ws: &[String]) -> &[String] {
    while let Some(first) = ws.first() {
        if DETERMINERS.contains(&first.as_str()) {
            ws = &ws[1..];
        } else {
            break;
        }
    }
    ws
}

fn is_break(w: &str) -> bool {
    w == SEPARATOR || w == "and"
}

/// The noun phrase that ends a segment (the subject of the relation that follows it).
fn subject_of(seg: &[String], first: bool) -> String {
    let mut seg = seg;
    if first {
        // "there is a dog …"
        if seg.len() >= 2 && seg[0] == "there" && matches!(seg[1].as_str(), "is" | "are") {
            seg = &seg[2..];
        }
        // "a photo of a dog …": keep what follows the last "<medium> of".
        if let Some(j) = (1..seg.len())
            .rev()
            .find(|&j| seg[j] == "of" && MEDIA.contains(&seg[j - 1].as_str()))
        {
            seg = &seg[j + 1..];
        }
    }
    // Drop trailing filler, then keep the last clause.
    while let Some(last) = seg.last() {
        if FILLERS.contains(&last.as_str()) || last == SEPARATOR {
            seg = &seg[..seg.len() - 1];
        } else {
            break;
        }
    }
    if let Some(k) = seg.iter().rposition(|w| is_break(w)) {
        seg = &seg[k + 1..];
    }
    strip_determiners(seg).join(" ")
}

/// The noun phrase that starts a segment (the object of the relation before it).
fn object_of(seg: &[String]) -> String {
    let seg = strip_determiners(seg);
    let end = seg
        .iter()
        .position(|w| w == SEPARATOR || OBJECT_END.contains(&w.as_str()))
        .unwrap_or(seg.len());
    strip_determiners(&seg[..end]).join(" ")
}

/// Reads every (subject, relation, object) triplet of a prompt, in order.
///
/// With several relation phrases the triplets chain: the object of one relation is the subject
/// of the next unless a clause boundary ("and", a comma) names a new subject
/// ("a dog left of a cat and a cup above a book" → (dog, left of, cat), (cup, above, book)).
pub fn parse_prompt(prompt: &str) -> Result<Vec<Triplet>, RelationParseError> {
    let ws = words(prompt);
    let found = find_relations(&ws);
    if found.is_empty() {
        return Err(RelationParseError::NoRelation {
            prompt: prompt.to_string(),
        });
    }
    let mut out = Vec::with_capacity(found.len());
    for (k, f) in found.iter().enumerate() {
        let before_start = if k == 0 { 0 } else { found[k - 1].end };
        let after_end = found.get(k + 1).map_or(ws.len(), |n| n.start);
        let subject = subject_of(&ws[before_start..f.start], k == 0);
        if subject.is_empty() {
            return Err(RelationParseError::MissingSubject {
                prompt: prompt.to_string(),
                phrase: f.phrase.clone(),
            });
        }
        let object = object_of(&ws[f.end..after_end]);
        if object.is_empty() {
            return Err(RelationParseError::MissingObject {
                prompt: prompt.to_string(),
                phrase: f.phrase.clone(),
            });
        }
        out.push(Triplet {
            subject,
            relation: f.relation,
            object,
        });
    }
    Ok(out)
}

/// Reads an explicit triplet list: "subject,relation,object", several separated by ';'
/// ("dog,right of,teddy bear; cat,above,dog"). Relations accept every phrasing of
/// [`Relation::parse`]; names are lower-cased with spaces normalised.
pub fn parse_override(spec: &str) -> Result<Vec<Triplet>, RelationParseError> {
    let bad = |reason: String| RelationParseError::BadOverride {
        spec: spec.to_string(),
        reason,
    };
    let mut out = Vec::new();
    for part in spec.split(';') {
        if part.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = part.split(',').collect();
        if fields.len() != 3 {
            return Err(bad(format!(
                "{:?} has {} comma-separated fields; expected exactly 3: subject,relation,object",
                part.trim(),
                fields.len()
            )));
        }
        let norm = |s: &str| {
            s.split_whitespace()
                .map(str::to_lowercase)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (subject, object) = (norm(fields[0]), norm(fields[2]));
        if subject.is_empty() || object.is_empty() {
            return Err(bad(format!(
                "{:?}: the subject and the object must not be empty",
                part.trim()
            )));
        }
        if subject == object {
            // Name the triplet only when the spec holds several.
            let which = if part.trim() == spec.trim() {
                String::new()
            } else {
                format!("{:?}: ", part.trim())
            };
            return Err(bad(format!(
                "{which}the subject and the object are the same word {subject:?}; a relation \
                 needs two different objects (their maps would be one and the same)"
            )));
        }
        let relation = Relation::parse(fields[1]).map_err(|e| bad(e.to_string()))?;
        out.push(Triplet {
            subject,
            relation,
            object,
        });
    }
    if out.is_empty() {
        return Err(bad(
            "no triplet given; expected e.g. \"dog,right of,teddy bear\"".to_string(),
        ));
    }
    Ok(out)
}

/// True when `phrase`'s words occur consecutively in `prompt` (case-insensitive, whole words).
pub fn prompt_mentions(prompt: &str, phrase: &str) -> bool {
    let ws: Vec<String> = words(prompt)
        .into_iter()
        .filter(|w| w != SEPARATOR)
        .collect();
    let ps: Vec<String> = words(phrase)
        .into_iter()
        .filter(|w| w != SEPARATOR)
        .collect();
    !ps.is_empty() && ws.windows(ps.len()).any(|win| win == ps.as_slice())
}

/// The triplets of a prompt: from `override_spec` when given (each object must occur in the
/// prompt), parsed from the prompt otherwise.
pub fn triplets_for(
    prompt: &str,
    override_spec: Option<&str>,
) -> Result<Vec<Triplet>, RelationParseError> {
    let Some(spec) = override_spec else {
        return parse_prompt(prompt);
    };
    let triplets = parse_override(spec)?;
    for t in &triplets {
        for word in [&t.subject, &t.object] {
            if !prompt_mentions(prompt, word) {
                return Err(RelationParseError::NotInPrompt {
                    spec: spec.to_string(),
                    word: word.clone(),
                    prompt: prompt.to_string(),
                });
            }
        }
    }
    Ok(triplets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Relation::*;

    fn one(prompt: &str) -> (String, Relation, String) {
        let t = parse_prompt(prompt).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.len(), 1, "{prompt}: {t:?}");
        (t[0].subject.clone(), t[0].relation, t[0].object.clone())
    }

    fn trip(s: &str, r: Relation, o: &str) -> (String, Relation, String) {
        (s.to_string(), r, o.to_string())
    }

    #[test]
    fn geneval_style() {
        assert_eq!(
            one("a photo of a dog right of a teddy bear"),
            trip("dog", RightOf, "teddy bear")
        );
        assert_eq!(
            one("a photo of an apple left of a traffic light"),
            trip("apple", LeftOf, "traffic light")
        );
        assert_eq!(
            one("a photo of a cup above a book"),
            trip("cup", Above, "book")
        );
        assert_eq!(
            one("a photo of a bench below an umbrella"),
            trip("bench", Below, "umbrella")
        );
    }

    #[test]
    fn longer_phrasings() {
        assert_eq!(
            one("A dog to the right of a teddy bear"),
            trip("dog", RightOf, "teddy bear")
        );
        assert_eq!(
            one("a cat on the left of a car"),
            trip("cat", LeftOf, "car")
        );
        assert_eq!(
            one("a cat on the left side of a car"),
            trip("cat", LeftOf, "car")
        );
        assert_eq!(one("a cup on top of a book"), trip("cup", Above, "book"));
        assert_eq!(one("a lamp over a table"), trip("lamp", Above, "table"));
    }

    #[test]
    fn below_synonyms() {
        for w in ["below", "under", "beneath", "underneath"] {
            assert_eq!(
                one(&format!("a cat {w} a table")),
                trip("cat", Below, "table"),
                "{w}"
            );
        }
    }

    #[test]
    fn determiners_and_case() {
        assert_eq!(one("The Dog left of the Car."), trip("dog", LeftOf, "car"));
        assert_eq!(
            one("some apples above some oranges"),
            trip("apples", Above, "oranges")
        );
        assert_eq!(one("an owl below an orange"), trip("owl", Below, "orange"));
        assert_eq!(
            one("  a   dog   left   of   a   cat  "),
            trip("dog", LeftOf, "cat")
        );
    }

    #[test]
    fn multi_word_objects_and_adjectives() {
        assert_eq!(
            one("a fire hydrant left of a parking meter"),
            trip("fire hydrant", LeftOf, "parking meter")
        );
        assert_eq!(
            one("a red circle above a blue square"),
            trip("red circle", Above, "blue square")
        );
        assert_eq!(
            one("a hot-dog right of a wine glass"),
            trip("hot-dog", RightOf, "wine glass")
        );
    }

    #[test]
    fn chains() {
        let t = parse_prompt("a frog above a sneaker to the right of an umbrella").unwrap();
        assert_eq!(
            t,
            vec![
                Triplet::new("frog", Above, "sneaker"),
                Triplet::new("sneaker", RightOf, "umbrella"),
            ]
        );
        let t =
            parse_prompt("a frog above a sneaker which is to the right of an umbrella").unwrap();
        assert_eq!(t[1], Triplet::new("sneaker", RightOf, "umbrella"));
        assert_eq!(t[0], Triplet::new("frog", Above, "sneaker"));
    }

    #[test]
    fn independent_clauses() {
        let t = parse_prompt("a dog left of a cat and a cup above a book").unwrap();
        assert_eq!(
            t,
            vec![
                Triplet::new("dog", LeftOf, "cat"),
                Triplet::new("cup", Above, "book")
            ]
        );
        let t = parse_prompt("a dog left of a cat, a cup under a book").unwrap();
        assert_eq!(t[1], Triplet::new("cup", Below, "book"));
    }

    #[test]
    fn filler_and_trailing_context() {
        assert_eq!(
            one("a cup is placed above a book"),
            trip("cup", Above, "book")
        );
        assert_eq!(
            one("there is a dog to the left of a bench in a park"),
            trip("dog", LeftOf, "bench")
        );
        assert_eq!(
            one("an image of a vase on top of a table, studio lighting"),
            trip("vase", Above, "table")
        );
        assert_eq!(
            one("a painting of a bird directly above a boat"),
            trip("bird", Above, "boat")
        );
    }

    #[test]
    fn errors() {
        let e = parse_prompt("a dog and a cat").unwrap_err();
        assert!(matches!(e, RelationParseError::NoRelation { .. }));
        assert!(e.to_string().contains("a dog and a cat"));
        let e = parse_prompt("left of a cat").unwrap_err();
        assert!(
            matches!(e, RelationParseError::MissingSubject { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("left of"));
        let e = parse_prompt("a photo of a dog above").unwrap_err();
        assert!(matches!(e, RelationParseError::MissingObject { .. }), "{e}");
        assert!(matches!(
            parse_prompt("").unwrap_err(),
            RelationParseError::NoRelation { .. }
        ));
    }

    #[test]
    fn override_parsing() {
        let t = parse_override("dog,right of,teddy bear").unwrap();
        assert_eq!(t, vec![Triplet::new("dog", RightOf, "teddy bear")]);
        let t = parse_override(" Dog , to the left of , Teddy  Bear ; cat,under,dog;").unwrap();
        assert_eq!(
            t,
            vec![
                Triplet::new("dog", LeftOf, "teddy bear"),
                Triplet::new("cat", Below, "dog")
            ]
        );
        assert_eq!(t[0].to_string(), "dog,left of,teddy bear");
        for bad in ["dog,right of", "dog,sideways,cat", ",above,cat", "", " ; "] {
            let e = parse_override(bad).unwrap_err();
            assert!(
                matches!(e, RelationParseError::BadOverride { .. }),
                "{bad}: {e}"
            );
        }
        assert!(parse_override("dog,sideways,cat")
            .unwrap_err()
            .to_string()
            .contains("sideways"));
    }

    #[test]
    fn override_checked_against_prompt() {
        let p = "a photo of a dog next to a teddy bear";
        assert!(matches!(
            triplets_for(p, None),
            Err(RelationParseError::NoRelation { .. })
        ));
        let t = triplets_for(p, Some("dog,right of,teddy bear")).unwrap();
        assert_eq!(t[0].object, "teddy bear");
        let e = triplets_for(p, Some("dog,right of,bear cub")).unwrap_err();
        assert!(
            matches!(&e, RelationParseError::NotInPrompt { word, .. } if word == "bear cub"),
            "{e}"
        );
        assert!(e.to_string().contains("bear cub") && e.to_string().contains(p));
        // Whole words only.
        assert!(triplets_for("a photo of a dogfish next to a cat", Some("dog,above,cat")).is_err());
        // Without an override the parser is used.
        assert_eq!(
            triplets_for("a dog above a cat", None).unwrap()[0].relation,
            Above
        );
    }

    #[test]
    fn mentions() {
        assert!(prompt_mentions("A Teddy Bear, left of a dog", "teddy bear"));
        assert!(!prompt_mentions("a teddy and a bear", "teddy bear"));
        assert!(!prompt_mentions("a dog", ""));
    }

    #[test]
    fn geneval_reference_prompts_parse() {
        // Every official line has the shape "a photo of {a/an} A {rel} {a/an} B".
        for (a, rel, b) in [
            ("giraffe", "below", "airplane"),
            ("bear", "left of", "broccoli"),
            ("tv remote", "above", "cell phone"),
        ] {
            let art = |w: &str| if "aeiou".contains(&w[..1]) { "an" } else { "a" };
            let p = format!("a photo of {} {a} {rel} {} {b}", art(a), art(b));
            assert_eq!(one(&p), trip(a, Relation::parse(rel).unwrap(), b), "{p}");
        }
    }

    #[test]
    fn an_override_relating_a_word_to_itself_is_refused() {
        for spec in [
            "circle,left of,circle",
            "Circle , above, circle ",
            "dog,below,cat;cat,above,cat",
        ] {
            let e = parse_override(spec).unwrap_err().to_string();
            if spec.starts_with("dog") {
                assert!(e.contains("\"cat\""), "{e}");
            } else {
                assert!(e.contains("the same word \"circle\""), "{e}");
            }
        }
        assert_eq!(parse_override("dog,left of,cat").unwrap().len(), 1);
    }
}
