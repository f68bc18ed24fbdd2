//! The prompt parser on GenEval's 100 official position prompts (the built-in copy of GenEval's
//! evaluation prompts; eval's tests check it is the official file byte for byte).

use l2s_eval::prompts::geneval_prompts;
use l2s_steer::parse_prompt;

#[test]
fn parses_every_official_position_prompt() {
    let mut n = 0;
    for p in geneval_prompts().iter().filter(|p| p.tag == "position") {
        let t = parse_prompt(&p.prompt).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t, p.triplets(), "{}", p.prompt);
        assert_eq!(t.len(), 1, "{}", p.prompt);
        n += 1;
    }
    assert_eq!(n, 100);
}
