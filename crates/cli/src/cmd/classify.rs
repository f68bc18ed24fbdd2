//! `l2s classify`: the relation a classifier reads from stored attention maps, one JSON line per
//! sample.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use l2s_steer::classify::classify;

use crate::common::Global;

#[derive(clap::Args)]
pub struct Args {
    /// Classifier: a folder from `l2s train`, either of its files, or a published PyTorch .pth
    #[arg(long)]
    classifier: PathBuf,
    /// safetensors file with `maps` (B, 2, C, S, S) f32 and `steps` (B) i64, the raw denoising
    /// step index of each sample
    #[arg(long)]
    maps: PathBuf,
}

/// Prints `{"logits": [...], "probabilities": [...], "relation": "<name>"}` per sample.
pub fn run(args: Args, _global: &Global) -> Result<()> {
    let rows = classify(&args.classifier, &args.maps)?;
    let mut out = std::io::stdout().lock();
    for row in &rows {
        match writeln!(out, "{}", serde_json::to_string(row)?) {
            // A closed pipe (`l2s classify … | head`) ends the output quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
    }
    Ok(())
}
