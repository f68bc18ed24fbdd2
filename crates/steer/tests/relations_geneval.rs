//! The prompt parser against GenEval's official position prompts, when the reference copy is present.

use std::path::Path;

use l2s_steer::parse_prompt;

#[test]
fn parses_every_official_position_prompt() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/geneval_position_prompts.jsonl");
    if !path.exists() {
        eprintln!("skipping: {} not found", path.display());
        return;
    }
    let prompts = l2s_eval::read_position_prompts(&path).unwrap();
    assert_eq!(prompts.len(), 100);
    for p in &prompts {
        let t = parse_prompt(&p.prompt).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.len(), 1, "{}", p.prompt);
        assert_eq!(t[0].to_eval(), p.triplet, "{}", p.prompt);
    }
}
