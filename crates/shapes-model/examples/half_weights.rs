//! Copies a safetensors file with every floating-point tensor stored as f16: how the built-in
//! classifier's weights are kept small (they are read back into f32 when loaded).
//!
//! `cargo run --release -p l2s-shapes-model --example half_weights -- IN.safetensors OUT.safetensors`

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        bail!("usage: half_weights IN.safetensors OUT.safetensors");
    };
    let tensors = candle_core::safetensors::load(input, &Device::Cpu)
        .with_context(|| format!("reading {input}"))?;
    let mut half = std::collections::HashMap::new();
    for (name, t) in tensors {
        let t = if t.dtype().is_float() {
            t.to_dtype(DType::F16)?
        } else {
            t
        };
        half.insert(name, t);
    }
    candle_core::safetensors::save(&half, output).with_context(|| format!("writing {output}"))?;
    println!("{output}");
    Ok(())
}
