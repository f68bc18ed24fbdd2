//! The prompt parser on GenEval's 100 official position prompts, rebuilt from their triplets
//! (`fixtures/geneval/position_triplets.tsv`; eval's tests check the rebuilt file is the official
//! one byte for byte).

use std::path::Path;

use l2s_eval::prompts::position_text;
use l2s_eval::{Relation, Triplet};
use l2s_steer::parse_prompt;

#[test]
fn parses_every_official_position_prompt() {
    let tsv = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/geneval/position_triplets.tsv"),
    )
    .unwrap();
    let mut n = 0;
    for line in tsv.lines() {
        let [a, rel, b]: [&str; 3] = line.split('\t').collect::<Vec<_>>().try_into().unwrap();
        let relation: Relation = rel.parse().unwrap();
        let prompt = position_text(a, relation, b);
        let t = parse_prompt(&prompt).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.len(), 1, "{prompt}");
        assert_eq!(t[0], Triplet::new(a, relation, b), "{prompt}");
        n += 1;
    }
    assert_eq!(n, 100);
}
