//! Words of a prompt and where a model's tokenizer puts them.

use l2s_models::Pipeline;

use crate::error::Result;

pub use l2s_models::tokenizer::prompt_words;

/// A word (or phrase) of the prompt and its token positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WordTokens {
    pub word: String,
    pub positions: Vec<usize>,
}

/// Finds `word` in `prompt` as `pipeline`'s tokenizer splits it.
pub fn word_tokens(pipeline: &Pipeline, prompt: &str, word: &str) -> Result<WordTokens> {
    Ok(WordTokens {
        word: word.to_string(),
        positions: pipeline.word_positions(prompt, word)?,
    })
}
