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

/// Declares the subcommands, one line each: `Variant(module) "one-line help",`. Every module
/// `src/cmd/<module>.rs` defines `Args` (clap derive) and `run(Args, &Global) -> anyhow::Result<()>`.
macro_rules! subcommands {
    ($($variant:ident($module:ident) $about:literal,)+) => {
        mod cmd {
            $(pub mod $module;)+
        }

        #[derive(Subcommand)]
        enum Command {
            $(#[command(about = $about)] $variant(cmd::$module::Args),)+
        }

        impl Command {
            fn run(self, global: &common::Global) -> anyhow::Result<()> {
                match self {
                    $(Command::$variant(args) => cmd::$module::run(args, global),)+
                }
            }
        }
    };
}

subcommands! {
    Generate(generate) "Generate images from a prompt (DDIM, classifier-free guidance)",
    Invert(invert) "Invert an image to noise with DDIM, reconstruct it and report the PSNR",
    Attention(attention) "Generate an image and draw the cross-attention maps of chosen words",
    Shapes(shapes) "The synthetic shapes world: render datasets, train the shapes model",
    Data(data) "Build the relation classifier's training data by dual inversion",
    Train(train) "Train a relation classifier on maps from `l2s data build`",
    Bench(bench) "Benchmarks: the Learn-to-Steer experiment on the shapes world",
    Eval(eval) "Generate a prompt set's images into GenEval's folder layout, plain or steered (resumable, shardable)",
    Score(score) "Score generated images (or an external detector's detections) by GenEval's rule, with VISOR metrics",
    Report(report) "Write one self-contained HTML page comparing scored runs image by image",
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
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
