//! The trainer resumes from its latest checkpoint, refuses an incompatible or corrupt one with a
//! clear error, and leaves a loadable model folder and a loss curve behind.

use candle_core::Device;
use l2s_models::{LoadOptions, StableDiffusion};
use l2s_shapes_model::{TrainOptions, Trainer};

fn opts(steps: usize) -> TrainOptions {
    TrainOptions {
        steps,
        batch: 2,
        checkpoint_every: 1,
        warmup: 1,
        ..Default::default()
    }
}

#[test]
fn resumes_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let t = Trainer::new(&run, &Device::Cpu).unwrap();
    let first = t.run(&opts(2), None, |_| {}).unwrap();
    assert_eq!(first.steps, 2);
    // A new trainer on the same folder continues at step 2.
    let t = Trainer::new(&run, &Device::Cpu).unwrap();
    let mut seen = Vec::new();
    let second = t.run(&opts(3), None, |p| seen.push(p.step)).unwrap();
    assert_eq!(seen, vec![3]);
    assert_eq!(second.steps, 3);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoints/step-00000003/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["losses"].as_array().unwrap().len(), 3);
    // Only the newest checkpoint is kept; the exported folder loads with the ordinary loader.
    let kept: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(kept.len(), 1);
    let sd = StableDiffusion::load(&second.model_dir, &LoadOptions::default()).unwrap();
    assert_eq!(sd.unet.config().in_channels, 12);
    assert!(image::open(run.join("loss.png")).is_ok());
}

#[test]
fn incompatible_or_corrupt_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    Trainer::new(&run, &Device::Cpu)
        .unwrap()
        .run(&opts(1), None, |_| {})
        .unwrap();
    let ckpt = run.join("checkpoints/step-00000001");

    let state_path = ckpt.join("state.json");
    let good = std::fs::read_to_string(&state_path).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&good).unwrap();
    state["architecture"]["unet"]["block_out_channels"] = serde_json::json!([16, 32, 32]);
    std::fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
    let err = Trainer::new(&run, &Device::Cpu)
        .unwrap()
        .run(&opts(2), None, |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("different model architecture"), "{err}");

    std::fs::write(&state_path, good).unwrap();
    std::fs::write(ckpt.join("state.safetensors"), b"not a safetensors file").unwrap();
    let err = Trainer::new(&run, &Device::Cpu)
        .unwrap()
        .run(&opts(2), None, |_| {})
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("state.safetensors") && msg.contains("unreadable checkpoint"),
        "{msg}"
    );
}

#[test]
fn warm_start_from_an_exported_model() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let first = Trainer::new(&a, &Device::Cpu)
        .unwrap()
        .run(&opts(1), None, |_| {})
        .unwrap();
    let b = dir.path().join("b");
    let t = Trainer::new(&b, &Device::Cpu).unwrap();
    t.init_from_model(&first.model_dir).unwrap();
    // A folder that already has checkpoints resumes from them instead.
    let err = Trainer::new(&a, &Device::Cpu)
        .unwrap()
        .init_from_model(&first.model_dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already has checkpoints"), "{err}");
}
