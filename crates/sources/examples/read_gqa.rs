//! Reading speed and memory of the streaming GQA reader on a synthetic scene-graph file the size
//! of GQA's (`train_sceneGraphs.json` is about 1 GB):
//!
//!     cargo run --release -p l2s-sources --example read_gqa -- [IMAGES] [OBJECTS_PER_IMAGE]
//!
//! writes the file to the system's temporary folder, reads it with `read_gqa`, and prints the
//! file size, the time, records per second and the process's peak resident memory.

use std::io::Write;
use std::ops::ControlFlow;
use std::time::Instant;

use l2s_sources::gqa::{read_gqa, GqaOptions};
use l2s_sources::Problems;

const NAMES: [&str; 12] = [
    "dog", "cat", "car", "tree", "man", "woman", "table", "chair", "cup", "book", "lamp", "bench",
];
const RELATIONS: [&str; 6] = [
    "to the left of",
    "to the right of",
    "above",
    "below",
    "on",
    "near",
];

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let images: usize = args.next().map_or(Ok(60_000), |a| a.parse())?;
    let per_image: usize = args.next().map_or(Ok(20), |a| a.parse())?;
    let dir = std::env::temp_dir().join("l2s-gqa-speed");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("sceneGraphs.json");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        write!(f, "{{")?;
        for i in 0..images {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(
                f,
                "\"{}\":{{\"width\":640,\"height\":480,\"objects\":{{",
                2_000_000 + i
            )?;
            for o in 0..per_image {
                if o > 0 {
                    write!(f, ",")?;
                }
                let rel = RELATIONS[(i + o) % RELATIONS.len()];
                let target = 1_000_000 * (i + 1) + (o + 1) % per_image;
                write!(
                    f,
                    "\"{}\":{{\"name\":\"{}\",\"x\":{},\"y\":{},\"w\":40,\"h\":30,\"attributes\":[\"red\"],\"relations\":[{{\"name\":\"{rel}\",\"object\":\"{target}\"}}]}}",
                    1_000_000 * (i + 1) + o,
                    NAMES[(i * 7 + o) % NAMES.len()],
                    (o * 31) % 600,
                    (o * 17) % 450,
                )?;
            }
            write!(f, "}}}}")?;
        }
        write!(f, "}}")?;
    }
    let bytes = std::fs::metadata(&path)?.len();
    let mut opts = GqaOptions::new(&dir);
    opts.check_images = false;
    let mut problems = Problems::new();
    let mut kept = 0usize;
    let start = Instant::now();
    let summary = read_gqa(&path, &opts, &mut problems, |_| {
        kept += 1;
        ControlFlow::Continue(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.0} MB, {} images ({} with a kept relation) in {secs:.1} s: {:.0} images/s, {:.0} MB/s; peak resident memory {:.0} MiB",
        bytes as f64 / 1e6,
        summary.seen,
        kept,
        summary.seen as f64 / secs,
        bytes as f64 / 1e6 / secs,
        peak_rss_mib().unwrap_or(f64::NAN),
    );
    std::fs::remove_file(&path)?;
    Ok(())
}
