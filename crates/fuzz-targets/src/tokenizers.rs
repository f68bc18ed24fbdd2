//! Tokenizer files: CLIP's `vocab.json` + `merges.txt`, and `tokenizer.json` (CLIP and T5).

use std::path::Path;

use l2s_models::t5::T5Tokenizer;
use l2s_models::tokenizer::{ClipTokenizer, TokenizerTexts};

use crate::Outcome;

/// A prompt every loaded tokenizer encodes, so the vocabulary is used as well as parsed.
const PROMPT: &str = "a photo of a dog to the left of a cat!";

/// `vocab.json` NUL `merges.txt` (a CLIP BPE folder), or else one `tokenizer.json`, read both as
/// CLIP's and as T5's; `Ok` when one of them loads.
pub fn tokenizer_files(data: &[u8]) -> Outcome {
    let dir = Path::new("tokenizer");
    if let Some((vocab, merges)) = crate::split_at_nul(data) {
        let texts = TokenizerTexts {
            vocab_json: Some(crate::text(vocab)?),
            merges_txt: Some(crate::text(merges)?),
            ..Default::default()
        };
        let tok = ClipTokenizer::from_texts(dir, &texts).map_err(|e| e.to_string())?;
        return tok.encode(PROMPT).map(drop).map_err(|e| e.to_string());
    }
    let json = crate::text(data)?;
    let clip = ClipTokenizer::from_texts(
        dir,
        &TokenizerTexts {
            tokenizer_json: Some(json),
            ..Default::default()
        },
    )
    .and_then(|t| t.encode(PROMPT).map(drop));
    let t5 = T5Tokenizer::from_json_text(dir, json, 32).and_then(|t| t.encode(PROMPT).map(drop));
    match (clip, t5) {
        (Err(a), Err(b)) => Err(format!("as CLIP's: {a}; as T5's: {b}")),
        _ => Ok(()),
    }
}
