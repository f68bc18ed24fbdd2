//! Classifier checkpoints: our `classifier.json` + `classifier.safetensors` pair, and the
//! published training code's `.pth`.

use std::path::Path;

use candle_core::{DType, Device};
use l2s_steer::train::{
    classifier_from_weights, parse_checkpoint_meta, torch_classifier_from_bytes,
};

use crate::Outcome;

/// A zip archive (`PK`) is read as a published `.pth`; anything else as `classifier.json`
/// NUL `classifier.safetensors`. The classifier is built from the weights.
pub fn classifier_checkpoint(data: &[u8]) -> Outcome {
    if data.starts_with(b"PK") {
        return torch_classifier_from_bytes(
            Path::new("fuzz.pth"),
            data.to_vec(),
            &Device::Cpu,
            DType::F32,
        )
        .map(drop)
        .map_err(|e| e.to_string());
    }
    let (meta, weights) = crate::split_at_nul(data).unwrap_or((data, &[]));
    let (meta, arch) = parse_checkpoint_meta(crate::text(meta)?, Path::new("classifier.json"))
        .map_err(|e| e.to_string())?;
    classifier_from_weights(
        &meta,
        &arch,
        weights,
        Path::new("classifier.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .map(drop)
    .map_err(|e| e.to_string())
}
