//! `l2s`: the command-line front end. It parses arguments, shows progress and logs; the work is
//! done by the library crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// candle allocates a fresh buffer for nearly every tensor op; mimalloc makes that much cheaper
// than the system allocator on CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's option enum (15 in both mimalloc 2 and 3, mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped. candle frees and reallocates same-sized buffers on every op; when
/// mimalloc hands them back to the OS the kernel zeroes fresh pages each time, which cost about a
/// third of a training step. `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options on every use.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Makes candle's matmul use the thread count the user asked for. candle sizes its matmul
/// parallelism from `RAYON_NUM_THREADS`, and without it counts physical cores by parsing
/// /proc/cpuinfo on every matmul (measured: ~5 % of a training step, and two threads where
/// `CANDLE_NUM_THREADS=1` asked for one). Runs before any thread exists.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let threads = std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}

mod common;

mod cmd;

/// The subcommands; each `cmd::<module>` defines `Args` (clap derive) and
/// `run(Args, &Global) -> anyhow::Result<()>`.
#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt, plain or steered (Learn-to-Steer, baselines)
    Generate(cmd::generate::Args),
    /// Invert an image to noise (DDIM or RF-inversion), reconstruct it and report the PSNR
    Invert(cmd::invert::Args),
    /// Generate an image and draw the cross-attention maps of chosen words
    Attention(cmd::attention::Args),
    /// The synthetic shapes world: render datasets, train the shapes model
    Shapes(cmd::shapes::Args),
    /// Build the relation classifier's training data by dual inversion
    Data(cmd::data::Args),
    /// Train a relation classifier on maps from `l2s data build`
    Train(cmd::train::Args),
    /// Classify stored attention maps with a relation classifier (ours or a published .pth)
    Classify(cmd::classify::Args),
    /// Benchmarks: the Learn-to-Steer experiment on the shapes world
    Bench(cmd::bench::Args),
    /// Generate a prompt set's images into GenEval's folder layout, plain or steered (resumable, shardable)
    Eval(cmd::eval::Args),
    /// Score generated images (or an external detector's detections) by GenEval's rule, with VISOR metrics
    Score(cmd::score::Args),
    /// Write one self-contained HTML page comparing scored runs image by image
    Report(cmd::report::Args),
}

impl Command {
    fn run(self, global: &common::Global) -> anyhow::Result<()> {
        match self {
            Command::Generate(a) => cmd::generate::run(a, global),
            Command::Invert(a) => cmd::invert::run(a, global),
            Command::Attention(a) => cmd::attention::run(a, global),
            Command::Shapes(a) => cmd::shapes::run(a, global),
            Command::Data(a) => cmd::data::run(a, global),
            Command::Train(a) => cmd::train::run(a, global),
            Command::Classify(a) => cmd::classify::run(a, global),
            Command::Bench(a) => cmd::bench::run(a, global),
            Command::Eval(a) => cmd::eval::run(a, global),
            Command::Score(a) => cmd::score::run(a, global),
            Command::Report(a) => cmd::report::run(a, global),
        }
    }
}

/// learn-to-steer: text-to-image diffusion with spatial steering.
#[derive(Parser)]
#[command(name = "l2s", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: common::Global,
    #[command(subcommand)]
    command: Command,
}

fn main() -> ExitCode {
    keep_freed_memory();
    pin_thread_count();
    let cli = Cli::parse();
    common::init_logging(&cli.global);
    match cli.command.run(&cli.global) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_message(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined with ": ", as `{err:#}` writes them, but without a cause
/// whose text an earlier message already includes: many library errors write their source into
/// their own message ("file.png: Invalid PNG signature.") and also return it as the source, and
/// the chain would print it a second (or third) time.
fn error_message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_message;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct FileError {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::other("Invalid PNG signature.");
        let err = anyhow::Error::new(FileError {
            path: "a/0000.png".into(),
            source: io,
        })
        .context("scoring a");
        assert_eq!(
            format!("{err:#}"),
            "scoring a: a/0000.png: Invalid PNG signature.: Invalid PNG signature."
        );
        assert_eq!(
            error_message(&err),
            "scoring a: a/0000.png: Invalid PNG signature."
        );
        // Causes that add something are all kept.
        let err = anyhow::anyhow!("no such file").context("--prompts p.jsonl");
        assert_eq!(error_message(&err), "--prompts p.jsonl: no such file");
    }
}
