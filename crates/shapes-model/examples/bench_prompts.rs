//! The held-out prompts `l2s bench shapes` evaluates, as a GenEval metadata file for `l2s eval
//! --prompts`: the first N of every shapes prompt shuffled with seed 7, in the bench's wording
//! ("a star to the left of a heart", without GenEval's "a photo of").
//!
//! `cargo run --release -p l2s-shapes-model --example bench_prompts -- [N] > prompts.jsonl`
//! (default 24, the bench's default).

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().context("N: not a whole number")?,
        None => 24,
    };
    for p in l2s_shapes::prompts::shuffled_prompts(7).into_iter().take(n) {
        let line = serde_json::json!({
            "tag": "position",
            "include": [
                {"class": p.b.name(), "count": 1},
                {"class": p.a.name(), "count": 1, "position": [p.relation.name(), 0]},
            ],
            "prompt": p.text(),
        });
        println!("{line}");
    }
    Ok(())
}
