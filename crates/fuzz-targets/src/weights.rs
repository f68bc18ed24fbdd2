//! Weight files: safetensors (model components, shards) and `torch.save` archives.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use l2s_models::weights::SafetensorsWeights;
use l2s_torch_pickle::{Limits, TorchFile, Value};

use crate::Outcome;

/// Indexes a safetensors file as a model component does, then reads every tensor as f32.
pub fn safetensors_file(data: &[u8]) -> Outcome {
    let weights =
        SafetensorsWeights::from_bytes(vec![(PathBuf::from("fuzz.safetensors"), data.to_vec())])
            .map_err(|e| e.to_string())?;
    let mut refused = None;
    for name in weights.shapes().keys() {
        if let Err(e) = weights.get_unchecked(name, DType::F32, &Device::Cpu) {
            refused.get_or_insert(e.to_string());
        }
    }
    refused.map_or(Ok(()), Err)
}

/// Opens a `torch.save` archive and reads every state dict found at its top two levels.
pub fn torch_pickle(data: &[u8]) -> Outcome {
    let mut file = TorchFile::from_bytes(Path::new("fuzz.pth"), data.to_vec(), Limits::default())
        .map_err(|e| e.to_string())?;
    let root = file.root().clone();
    let mut dicts: Vec<&Value> = vec![&root];
    if let Some(items) = root.as_dict() {
        dicts.extend(items.iter().map(|(_, v)| v));
    }
    for d in dicts.into_iter().filter(|d| d.is_state_dict()) {
        file.state_dict(d, &Device::Cpu)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
