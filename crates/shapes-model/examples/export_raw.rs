//! Writes the raw (non-averaged) weights of a training checkpoint as a model folder.
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let t = candle_core::safetensors::load(&args[1], &candle_core::Device::Cpu)?;
    let w: std::collections::HashMap<String, candle_core::Tensor> =
        t.into_iter().filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v))).collect();
    l2s_shapes_model::folder::write_model_folder(std::path::Path::new(&args[2]), Some(&w))?;
    Ok(())
}
