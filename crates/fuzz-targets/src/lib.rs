//! One function per loader of outside data, each taking raw bytes and running the loader's own
//! parsing code (the byte/text entry point its path-based reader calls). The fuzz targets in
//! `fuzz/` call these, and `tests/replay.rs` feeds them every committed corpus file, so a
//! finding fixed once stays fixed under a plain `cargo test`.
//!
//! Each returns `Ok` when the input loaded and `Err` with the loader's message when it was
//! refused; a panic, an abort or unbounded memory is the bug the fuzzers look for.

mod checkpoint;
mod configs;
mod dataset;
mod geneval;
mod tokenizers;
mod weights;

pub use checkpoint::classifier_checkpoint;
pub use configs::diffusers_config;
pub use dataset::dataset_files;
pub use geneval::geneval_jsonl;
pub use tokenizers::tokenizer_files;
pub use weights::{safetensors_file, torch_pickle};

/// What a refused input's loader said.
pub type Outcome = Result<(), String>;

/// One loader's entry point.
pub type Target = fn(&[u8]) -> Outcome;

/// The fuzz targets, by name: the corpus folder `fuzz/corpus/NAME` of each is replayed through
/// its function.
pub const TARGETS: [(&str, Target); 8] = [
    ("safetensors", safetensors_file),
    ("torch_pickle", torch_pickle),
    ("diffusers_config", diffusers_config),
    ("tokenizer", tokenizer_files),
    ("png_text", png_text),
    ("geneval_jsonl", geneval_jsonl),
    ("dataset", dataset_files),
    ("classifier", classifier_checkpoint),
];

/// A PNG's text chunks, strictly (as `read_png_text`) and leniently (as the report reads them).
pub fn png_text(data: &[u8]) -> Outcome {
    let lenient = l2s_files::png_text_chunks(data);
    let strict = l2s_files::parse_png_text(data, std::path::Path::new("fuzz.png"))
        .map_err(|e| e.to_string())?;
    // Whatever the strict reader accepts, the lenient one reads the same way.
    assert_eq!(
        strict, lenient,
        "strict and lenient PNG text readers disagree"
    );
    Ok(())
}

/// Splits `data` at its first NUL byte: (before, after); `None` when it has none.
fn split_at_nul(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = data.iter().position(|&b| b == 0)?;
    Some((&data[..at], &data[at + 1..]))
}

/// The input as text, or the refusal a loader reading text would give.
fn text(data: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))
}
