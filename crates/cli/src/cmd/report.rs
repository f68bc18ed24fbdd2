//! `l2s report`: one self-contained HTML page comparing scored runs image by image.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use l2s_eval::report::{load_run, render_html, ReportOptions};
use l2s_generate::write_atomic;

use crate::common::{say, Global};

#[derive(clap::Args)]
#[command(
    after_help = "Each RUN_DIR is an `l2s eval` folder scored by `l2s score RUN_DIR` (it holds results.jsonl \
and summary.json). The page embeds every image (as PNG data), its detected boxes and the summary table; it needs \
no network and no other file. Filters: all / wrong / right / runs disagree, and a search over the prompts."
)]
pub struct Args {
    /// Scored run folders, shown side by side in this order
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The HTML file to write
    #[arg(long)]
    pub out: PathBuf,
    /// Page title
    #[arg(long, default_value = "Spatial evaluation")]
    pub title: String,
    /// Embedded images are scaled down to at most this many pixels a side
    #[arg(long, default_value_t = 256)]
    pub max_side: u32,
    /// Displayed image size in CSS pixels
    #[arg(long, default_value_t = 140)]
    pub image_size: u32,
}

pub fn run(args: Args, _global: &Global) -> Result<()> {
    if args.max_side < 8 {
        bail!("--max-side {}: expected at least 8", args.max_side);
    }
    if !(16..=1024).contains(&args.image_size) {
        bail!("--image-size {}: expected 16 to 1024", args.image_size);
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "--out {}: folder {} does not exist",
                args.out.display(),
                dir.display()
            );
        }
    }
    let mut runs = Vec::new();
    for dir in &args.runs {
        runs.push(load_run(dir).map_err(anyhow::Error::msg)?);
    }
    // Two runs of the same method get their folder names to tell them apart.
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for (r, dir) in runs.iter_mut().zip(&args.runs) {
        if names.iter().filter(|n| **n == r.name).count() > 1 {
            let folder = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            r.name = format!("{} ({folder})", r.name);
        }
    }
    let opts = ReportOptions {
        title: args.title.clone(),
        max_side: args.max_side,
        display_px: args.image_size,
    };
    let (html, warnings) = render_html(&runs, &opts);
    for w in warnings.iter().take(10) {
        eprintln!("warning: {w}");
    }
    if warnings.len() > 10 {
        eprintln!(
            "warning: … {} more images could not be embedded",
            warnings.len() - 10
        );
    }
    write_atomic(&args.out, html.as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    let images: usize = runs.iter().map(|r| r.results.len()).sum();
    say(&format!(
        "{}: {} runs, {images} images, {:.1} MB\n",
        args.out.display(),
        runs.len(),
        html.len() as f64 / 1e6
    ));
    Ok(())
}
