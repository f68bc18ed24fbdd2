//! The CLIP BPE tokenizer as Stable Diffusion uses it: lower-cased, start and end tokens, truncated
//! and padded to the model length with the folder's own padding token.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{ModelError, Result};

/// CLIP's word pattern: contractions, runs of letters, single digits, runs of other symbols.
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
    source: PathBuf,
}

/// A token as a string in `tokenizer_config.json`: plain, or an AddedToken object.
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Parses a `tokenizer.json`. Its JSON syntax is checked first: the tokenizers library panics
/// (an `expect` in its decoder deserializer) instead of returning an error on some malformed
/// text, which a syntax check ahead of it rules out.
pub(crate) fn tokenizer_from_json(json: &str) -> std::result::Result<Tokenizer, String> {
    serde_json::from_str::<serde::de::IgnoredAny>(json).map_err(|e| format!("not JSON: {e}"))?;
    Tokenizer::from_bytes(json).map_err(|e| e.to_string())
}

/// The texts of a `tokenizer/` folder's files (`None`: the file is absent).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenizerTexts<'a> {
    pub tokenizer_json: Option<&'a str>,
    pub vocab_json: Option<&'a str>,
    pub merges_txt: Option<&'a str>,
    pub tokenizer_config_json: Option<&'a str>,
    pub special_tokens_map_json: Option<&'a str>,
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`; the padding token and length come from `tokenizer_config.json` /
    /// `special_tokens_map.json`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Option<String>> {
            let path = dir.join(name);
            if !path.exists() {
                return Ok(None);
            }
            std::fs::read_to_string(&path)
                .map(Some)
                .map_err(|e| ModelError::io(&path, e))
        };
        let json = read("tokenizer.json")?;
        let (vocab, merges) = if json.is_some() {
            (None, None)
        } else {
            (read("vocab.json")?, read("merges.txt")?)
        };
        Self::from_texts(
            dir,
            &TokenizerTexts {
                tokenizer_json: json.as_deref(),
                vocab_json: vocab.as_deref(),
                merges_txt: merges.as_deref(),
                tokenizer_config_json: read("tokenizer_config.json")?.as_deref(),
                special_tokens_map_json: read("special_tokens_map.json")?.as_deref(),
            },
        )
    }

    /// Builds the tokenizer from the texts of a `tokenizer/` folder's files; `dir` names the
    /// folder in errors.
    pub fn from_texts(dir: &Path, files: &TokenizerTexts) -> Result<Self> {
        let err = |reason: String| ModelError::Tokenizer {
            path: dir.to_path_buf(),
            reason,
        };
        let inner = if let Some(json) = files.tokenizer_json {
            tokenizer_from_json(json).map_err(|e| err(format!("tokenizer.json: {e}")))?
        } else if let (Some(vocab), Some(merges)) = (files.vocab_json, files.merges_txt) {
            Self::from_vocab_merges_text(vocab, merges, dir)?
        } else {
            return Err(err(
                "expected tokenizer.json, or vocab.json and merges.txt".into()
            ));
        };
        let parse_json = |text: Option<&str>, name: &str| -> Result<Option<Value>> {
            text.map(|t| {
                serde_json::from_str(t).map_err(|e| ModelError::Config {
                    path: dir.join(name),
                    expected: "a tokenizer configuration".into(),
                    reason: e.to_string(),
                })
            })
            .transpose()
        };
        let config = parse_json(files.tokenizer_config_json, "tokenizer_config.json")?;
        let special = parse_json(files.special_tokens_map_json, "special_tokens_map.json")?;
        let lookup = |key: &str| -> Option<String> {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(token_string)
                .or_else(|| {
                    special
                        .as_ref()
                        .and_then(|s| s.get(key))
                        .and_then(token_string)
                })
        };
        let id = |token: &str| -> Result<u32> {
            inner
                .token_to_id(token)
                .ok_or_else(|| err(format!("special token `{token}` is not in the vocabulary")))
        };
        let specials = [
            lookup("bos_token").unwrap_or_else(|| BOS.into()),
            lookup("eos_token").unwrap_or_else(|| EOS.into()),
            lookup("pad_token").unwrap_or_else(|| EOS.into()),
        ];
        let [bos, eos, pad] = [id(&specials[0])?, id(&specials[1])?, id(&specials[2])?];
        // Like transformers, split special tokens out of the text before BPE. This matters for
        // SD2, whose padding token is "!": every "!" in a prompt becomes that token.
        let mut inner = inner;
        let added: Vec<AddedToken> = specials
            .iter()
            .map(|s| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(&added);
        // Some configs store a huge sentinel instead of the real length.
        let max_len = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(|v| v.as_f64())
            .filter(|n| (2.0..=4096.0).contains(n))
            .map(|n| n as usize)
            .unwrap_or(77);
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
            source: dir.to_path_buf(),
        })
    }

    /// Builds CLIP's pipeline around a BPE vocabulary in Hugging Face's file format.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        let vocab_text = std::fs::read_to_string(vocab).map_err(|e| ModelError::io(vocab, e))?;
        let merges_text = std::fs::read_to_string(merges).map_err(|e| ModelError::io(merges, e))?;
        let dir = vocab.parent().unwrap_or(Path::new(""));
        Self::from_vocab_merges_text(&vocab_text, &merges_text, dir)
    }

    /// [`from_vocab_merges`](Self::from_vocab_merges) on the files' texts; `dir` is their folder.
    /// The files are parsed here, as tokenizers' `BPE::read_file` does, so that text in memory
    /// and files on disk go through one parser.
    pub fn from_vocab_merges_text(vocab: &str, merges: &str, dir: &Path) -> Result<Tokenizer> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let err = |reason: String| ModelError::Tokenizer {
            path: vocab_path.clone(),
            reason,
        };
        // An empty merge list tokenizes every word into single characters: the text encoder
        // then sees ids it was never trained on, silently.
        let merge_lines: Vec<&str> = merges
            .lines()
            .filter(|l| !l.starts_with("#version"))
            .collect();
        if !merge_lines.iter().any(|l| !l.trim().is_empty()) {
            return Err(ModelError::Tokenizer {
                path: merges_path,
                reason: "no merges: expected lines of two symbols (\"t h\") after an optional \
                         #version line"
                    .into(),
            });
        }
        let mut merge_pairs = Vec::with_capacity(merge_lines.len());
        for (i, line) in merge_lines.iter().enumerate() {
            match line.split(' ').collect::<Vec<_>>()[..] {
                [a, b] => merge_pairs.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(ModelError::Tokenizer {
                        path: merges_path,
                        reason: format!(
                            "merge {}: {line:?} is not two symbols separated by one space",
                            i + 1
                        ),
                    })
                }
            }
        }
        let ids: std::collections::HashMap<String, Value> = serde_json::from_str(vocab)
            .map_err(|e| err(format!("expected a JSON object of token → id: {e}")))?;
        let mut table = tokenizers::models::bpe::Vocab::default();
        for (token, id) in ids {
            // Like tokenizers, entries whose value is not a number are skipped.
            let Value::Number(n) = id else { continue };
            let id = n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| err(format!("token {token:?}: id {n} is not a 32-bit id")))?;
            table.insert(token, id);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(table, merge_pairs)
            .unk_token(EOS.into())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| err(format!("vocab.json/merges.txt: {e}")))?;
        let mut tok = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| err(e.to_string()))?;
        tok.with_normalizer(Some(NormSeq::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])));
        let words = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| err(e.to_string()))?;
        tok.with_pre_tokenizer(Some(PreSeq::new(vec![
            words.into(),
            ByteLevel::new(false, false, false).into(),
        ])));
        Ok(tok)
    }

    /// Token ids of the text alone, without start/end tokens, untruncated.
    pub fn encode_words(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text.trim(), false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.source.clone(),
                reason: format!("cannot tokenize {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The model input: start token, at most `max_len − 2` text tokens, end token, padding.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let words = self.encode_words(text)?;
        let keep = words.len().min(self.max_len - 2);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&words[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(Encoded {
            ids,
            text_tokens: keep,
            truncated: words.len() - keep,
        })
    }

    /// Token strings of an id sequence (for showing which positions a word occupies).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn bos_id(&self) -> u32 {
        self.bos
    }
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
}

/// A tokenized prompt, padded to the model length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Text tokens kept (positions 1..=text_tokens).
    pub text_tokens: usize,
    /// Text tokens dropped by truncation.
    pub truncated: usize,
}

/// The distinct words of a prompt, lower-cased, punctuation trimmed (for "the prompt's words"
/// in error messages).
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
