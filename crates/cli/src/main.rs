//! `l2s`: the command-line front end. It parses arguments, shows progress and logs; the work is
//! done by the library crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// candle allocates a fresh buffer for nearly every tensor op; mimalloc makes that much cheaper
// than the system allocator on CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
