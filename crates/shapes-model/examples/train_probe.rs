//! Times a few training steps: `cargo run --release -p l2s-shapes-model --example train_probe -- RUN_DIR STEPS BATCH`
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(&args[1]);
    let steps: usize = args[2].parse()?;
    let batch: usize = args[3].parse()?;
    let trainer = l2s_shapes_model::Trainer::new(&dir, &candle_core::Device::Cpu)?;
    eprintln!("parameters: {}", trainer.parameter_count());
    let opts = l2s_shapes_model::TrainOptions { steps, batch, checkpoint_every: 100, ..Default::default() };
    let summary = trainer.run(&opts, None, |p| {
        if p.step % 10 == 0 || p.step < 5 {
            eprintln!("step {} loss {:.4} {:.2}s ({:.3} s/step)", p.step, p.loss, p.seconds, p.seconds / p.step as f64);
        }
    })?;
    eprintln!("done {} steps, final loss {:.4}, {:.1}s", summary.steps, summary.final_loss, summary.seconds);
    Ok(())
}
