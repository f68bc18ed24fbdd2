//! Candle half of the Mask2Former CPU benchmark (`tools/bench/mask2former_cpu.sh` runs both).
//!
//! For each configuration `tools/fixtures/bench_mask2former_torch.py --save DIR` wrote, loads the
//! weights, checks the last round's logits against PyTorch's on the same input, then times the
//! forward pass; for 80-class models it also times `InstanceDetector::detect` on a 512×512 image
//! (resize to 800×800, forward, post-processing). Prints one JSON line.
//!
//! Usage: cargo run --release -p l2s-detect --example bench -- DIR [RUNS] [CONFIGS]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use l2s_detect::{infer_config, InstanceDetector, Mask2Former, Weights};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / m.max(1e-12))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).context("usage: bench DIR [RUNS] [CONFIGS]")?);
    let runs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let configs = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "tiny,mid,swin-s".into());
    let dev = Device::Cpu;
    let mut out = serde_json::Map::new();
    out.insert("candle".into(), "0.11.1".into());
    for name in configs.split(',') {
        let w = Weights::open(dir.join(format!("{name}.safetensors")), &dev)?;
        let cfg = infer_config(&w)?;
        let model = Mask2Former::load(&w, &cfg)?;
        let exp =
            candle_core::safetensors::load(dir.join(format!("{name}.expected.safetensors")), &dev)?;
        let x = &exp["pixels"];
        let o = model.forward(x)?;
        let ec = rel_err(
            o.class_logits.last().context("rounds")?,
            &exp["class_logits"],
        )?;
        let em = rel_err(o.mask_logits.last().context("rounds")?, &exp["mask_logits"])?;
        eprintln!("{name}: class logits {ec:.2e}, mask logits {em:.2e} (relative)");
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            model.forward(x)?;
            times.push(t.elapsed().as_secs_f64());
        }
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let mut entry = serde_json::json!({
            "median_s": median(times.clone()),
            "min_s": min,
            "times_s": times,
            "rel_err_class": ec,
            "rel_err_mask": em,
        });
        eprintln!("{name}: forward {:.3} s", entry["median_s"]);
        if cfg.num_classes == 80 {
            let det = InstanceDetector::from_weights(&w, &cfg, None)?;
            let img = image::RgbImage::from_fn(512, 512, |x, y| {
                image::Rgb([(x / 2) as u8, (y / 2) as u8, ((x + y) / 4) as u8])
            });
            det.detect(&img)?;
            let mut times = Vec::new();
            for _ in 0..runs {
                let t = Instant::now();
                det.detect(&img)?;
                times.push(t.elapsed().as_secs_f64());
            }
            entry["detect_512_min_s"] = times.iter().copied().fold(f64::INFINITY, f64::min).into();
            entry["detect_512_median_s"] = median(times).into();
        }
        out.insert(name.to_string(), entry);
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
