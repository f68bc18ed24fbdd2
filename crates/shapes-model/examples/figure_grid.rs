//! Lays PNGs out in a grid for the figures in docs/: each image enlarged by an integer factor
//! (nearest neighbour, so every pixel stays visible) with a grey rule right of and below it.
//!
//! `cargo run --release -p l2s-shapes-model --example figure_grid -- COLUMNS OUT.png IMAGE...`
//! (row by row; `SCALE` and `RULE` in the environment set the factor, default 4, and the rule
//! width, default 4 px).

use anyhow::{bail, Context, Result};
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::{imageops, Rgb, RgbImage};

fn env_u32(name: &str, default: u32) -> Result<u32> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v}: not a whole number")),
        Err(_) => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: figure_grid COLUMNS OUT.png IMAGE...");
    }
    let cols: u32 = args[0].parse().context("COLUMNS: not a whole number")?;
    if cols == 0 {
        bail!("COLUMNS must be at least 1");
    }
    let out = &args[1];
    let scale = env_u32("SCALE", 4)?.max(1);
    let rule = env_u32("RULE", 4)?;
    let images = args[2..]
        .iter()
        .map(|p| {
            Ok(image::open(p)
                .with_context(|| format!("reading {p}"))?
                .to_rgb8())
        })
        .collect::<Result<Vec<RgbImage>>>()?;
    let (w, h) = images[0].dimensions();
    if let Some((i, _)) = images
        .iter()
        .enumerate()
        .find(|(_, im)| im.dimensions() != (w, h))
    {
        bail!("{}: not {w}×{h} like the first image", args[2 + i]);
    }
    let (cw, ch) = (w * scale + rule, h * scale + rule);
    let rows = (images.len() as u32).div_ceil(cols);
    let mut grid = RgbImage::from_pixel(cols * cw, rows * ch, Rgb([128, 128, 128]));
    for (i, im) in images.iter().enumerate() {
        let big = imageops::resize(im, w * scale, h * scale, imageops::FilterType::Nearest);
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        imageops::replace(&mut grid, &big, (c * cw) as i64, (r * ch) as i64);
    }
    // The best compression: these files are committed.
    let file = std::fs::File::create(out).with_context(|| format!("writing {out}"))?;
    let encoder = PngEncoder::new_with_quality(
        std::io::BufWriter::new(file),
        CompressionType::Best,
        PngFilter::Adaptive,
    );
    grid.write_with_encoder(encoder)
        .with_context(|| format!("writing {out}"))?;
    println!("{out}");
    Ok(())
}
