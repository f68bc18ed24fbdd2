//! Object names as the prompts use them: singular ("trees" → "tree"), as the published data
//! builder turns GQA's names before selecting pairs.

/// The singular form of an object name. The rule of the published GQA preprocessing: a name
/// ending in "ss" ("glass", "grass") and "bus"/"buses" stay as they are; otherwise the last
/// word of the name is singularised ("tennis rackets" → "tennis racket"). Singularisation is
/// the `pluralizer` crate's (the English rules of the `pluralize` package, irregular and
/// uncountable words included), standing in for the `inflect` package the published code uses.
pub fn singular_name(name: &str) -> String {
    if name.ends_with("ss") || name == "bus" || name == "buses" {
        return name.to_string();
    }
    let (head, last) = match name.rfind(' ') {
        Some(i) => name.split_at(i + 1),
        None => ("", name),
    };
    if last.is_empty() {
        return name.to_string();
    }
    format!("{head}{}", pluralizer::pluralize(last, 1, false))
}

#[cfg(test)]
mod tests {
    use super::singular_name;

    #[test]
    fn names_become_singular() {
        for (name, want) in [
            ("trees", "tree"),
            ("leaves", "leaf"),
            ("glasses", "glass"),
            ("benches", "bench"),
            ("people", "person"),
            ("women", "woman"),
            ("children", "child"),
            ("mice", "mouse"),
            ("tennis rackets", "tennis racket"),
            ("traffic lights", "traffic light"),
            ("skis", "ski"),
            ("boxes", "box"),
            ("bus", "bus"),
            ("buses", "buses"),
            ("grass", "grass"),
            ("dress", "dress"),
            ("sheep", "sheep"),
            ("tree", "tree"),
            ("man", "man"),
            ("teddy bear", "teddy bear"),
        ] {
            assert_eq!(singular_name(name), want, "{name}");
        }
    }
}
