//! Writes the classifier fuzz seed `fuzz/seeds/classifier/ok-tiny-pair`: the built-in
//! classifier's `classifier.json` shrunk to 2 maps of 2×2 and 8-wide encoders, NUL, a
//! `classifier.safetensors` with seeded random weights of exactly the shapes it asks for.
//!
//! `cargo run --release -p l2s-fuzz-targets --example tiny_classifier_seed`

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use l2s_models::weights::ParameterRecorder;
use l2s_steer::train::parse_checkpoint_meta;
use l2s_steer::RelationClassifier;
use serde_json::{json, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let builtin = root.join("crates/shapes-model/weights/shapes-classifier/classifier.json");
    let mut meta: Value = serde_json::from_str(&std::fs::read_to_string(builtin)?)?;
    let layer = json!([{"name": "mid_block.attentions.0.transformer_blocks.0.attn2",
                        "heads": 2, "height": 2, "width": 2}]);
    let encoder = json!({"layers": 1, "heads": 1, "ff": 8, "dropout": 0.0});
    let c = &mut meta["config"];
    c["num_maps"] = json!(2);
    c["map_size"] = json!(2);
    c["d_model"] = json!(8);
    c["object"] = encoder.clone();
    c["head"] = encoder;
    c["step_dim"] = json!(2);
    c["mlp_hidden"] = json!([4]);
    meta["map_size"] = json!(2);
    meta["num_maps"] = json!(2);
    meta["layers"] = layer;
    let text = serde_json::to_string(&meta)?;
    let (parsed, arch) = parse_checkpoint_meta(&text, Path::new("classifier.json"))?;
    let recorder = ParameterRecorder::new();
    RelationClassifier::with_architecture(
        &parsed.config,
        &arch,
        recorder.var_builder(&Device::Cpu),
    )?;
    let mut tensors = HashMap::new();
    for (i, (name, shape)) in recorder.parameters().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        // A fixed pattern instead of a random generator: the seed is the same on every run.
        let values: Vec<f32> = (0..n).map(|k| ((k + i) % 7) as f32 * 0.1 - 0.3).collect();
        tensors.insert(
            name,
            Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(DType::F32)?,
        );
    }
    let weights = root.join("target/tiny-classifier.safetensors");
    candle_core::safetensors::save(&tensors, &weights)?;
    let mut seed = text.into_bytes();
    seed.push(0);
    seed.extend(std::fs::read(&weights)?);
    let out = root.join("fuzz/seeds/classifier/ok-tiny-pair");
    std::fs::write(&out, seed)?;
    println!("{}", out.display());
    Ok(())
}
