//! Runs the detector on PNG images and prints one JSON line per image.
//!
//! Usage: cargo run --release -p l2s-detect --example detect -- CHECKPOINT IMAGE.png... [--min-score S]
//!
//! CHECKPOINT is mmdet's `.pth` or transformers' `model.safetensors` / `pytorch_model.bin`.

use anyhow::{bail, Context, Result};
use l2s_detect::InstanceDetector;

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut min_score = 0.0f32;
    if let Some(i) = args.iter().position(|a| a == "--min-score") {
        let v = args.get(i + 1).context("--min-score needs a value")?;
        min_score = v.parse().context("--min-score")?;
        args.drain(i..i + 2);
    }
    if args.len() < 2 {
        bail!("usage: detect CHECKPOINT IMAGE.png... [--min-score S]");
    }
    let det = InstanceDetector::load(&args[0])?;
    eprintln!(
        "{}: {} naming, {} classes",
        args[0],
        det.naming().label(),
        det.class_names().len()
    );
    for path in &args[1..] {
        let img = image::open(path)
            .with_context(|| format!("reading {path}"))?
            .to_rgb8();
        let dets: Vec<_> = det
            .detect(&img)?
            .into_iter()
            .filter(|d| d.score > min_score)
            .map(|d| {
                serde_json::json!({
                    "class": d.class_name,
                    "label": d.label,
                    "score": d.score,
                    "bbox": d.bbox,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "image": path, "detections": dets })
        );
    }
    Ok(())
}
