//! Prompts → text-encoder conditioning, and words → token positions.

use candle_core::Tensor;
use l2s_models::tokenizer::ClipTokenizer;
use l2s_models::StableDiffusion;

use crate::error::{GenerateError, Result};

/// A prompt as the UNet sees it.
#[derive(Clone, Debug)]
pub struct PromptEmbedding {
    /// (1, max_len, hidden): the text encoder's last hidden state (Stable Diffusion's conditioning).
    pub embedding: Tensor,
    /// The padded token ids (start token, text tokens, end token, padding).
    pub ids: Vec<u32>,
    /// Number of text tokens kept (positions 1..=text_tokens).
    pub text_tokens: usize,
    /// Human-readable notes, e.g. that the prompt was truncated.
    pub warnings: Vec<String>,
}

/// Tokenizes and encodes `text` with the model's tokenizer and text encoder. A prompt longer than
/// the model reads is truncated (as diffusers does) and a warning says so.
pub fn encode_prompt(sd: &StableDiffusion, text: &str) -> Result<PromptEmbedding> {
    let enc = sd.tokenizer.encode(text)?;
    let mut warnings = Vec::new();
    if enc.truncated > 0 {
        let kept = sd.tokenizer.max_len() - 2;
        warnings.push(format!(
            "prompt {text:?} has {} tokens but the model reads at most {kept}: the last {} were dropped",
            enc.text_tokens + enc.truncated,
            enc.truncated
        ));
    }
    let ids = Tensor::new(enc.ids.as_slice(), &sd.device)?.unsqueeze(0)?;
    let embedding = sd.text_encoder.forward(&ids)?.last_hidden_state;
    Ok(PromptEmbedding {
        embedding,
        ids: enc.ids,
        text_tokens: enc.text_tokens,
        warnings,
    })
}

/// The words of a prompt, as a person would list them: split on white space, surrounding
/// punctuation removed, lower-cased, each once.
pub fn prompt_words(prompt: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    for raw in prompt.split_whitespace() {
        let w = raw
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        if !w.is_empty() && !words.contains(&w) {
            words.push(w);
        }
    }
    words
}

/// A word (or phrase) of a prompt and the token positions it occupies in the model input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WordTokens {
    pub word: String,
    /// Positions in the padded id sequence (the start token is position 0, so these are ≥ 1).
    pub positions: Vec<usize>,
}

/// Finds where `word` sits in `prompt`'s tokens: the first place where the word's own tokens
/// occur consecutively among the prompt's kept text tokens. A word of several tokens ("teddy
/// bear", or one word the tokenizer splits) occupies several positions.
pub fn word_tokens(tokenizer: &ClipTokenizer, prompt: &str, word: &str) -> Result<WordTokens> {
    let not_found = || GenerateError::WordNotInPrompt {
        word: word.to_string(),
        prompt: prompt.to_string(),
        words: prompt_words(prompt).join(", "),
    };
    let needle = tokenizer.encode_words(word)?;
    if needle.is_empty() {
        return Err(not_found());
    }
    let enc = tokenizer.encode(prompt)?;
    let text = &enc.ids[1..1 + enc.text_tokens];
    let start = text
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .ok_or_else(not_found)?;
    Ok(WordTokens {
        word: word.to_string(),
        positions: (1 + start..1 + start + needle.len()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_of_a_prompt() {
        assert_eq!(
            prompt_words("A dog, right of a (teddy) bear!"),
            ["a", "dog", "right", "of", "teddy", "bear"]
        );
        assert!(prompt_words("  ").is_empty());
    }
}
