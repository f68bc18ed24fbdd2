//! diffusers / transformers JSON configs and `model_index.json`.

use std::path::Path;

use l2s_diffusion::{DdimConfig, FlowMatchConfig};
use l2s_models::clip::ClipTextConfig;
use l2s_models::model::pipeline_class;
use l2s_models::space_to_depth::SpaceToDepthConfig;
use l2s_models::t5::T5Config;
use l2s_models::unet::UNetConfig;
use l2s_models::vae::VaeConfig;
use l2s_models::{FluxConfig, SamplingDefaults};

use crate::Outcome;

/// Reads the text as every config a pipeline folder holds (each config reader is tried, as the
/// fuzzer cannot know which file it is writing); `Ok` when at least one accepts it.
pub fn diffusers_config(data: &[u8]) -> Outcome {
    let text = crate::text(data)?;
    let p = Path::new("config.json");
    let results = [
        UNetConfig::from_json(text, p)
            .map(drop)
            .map_err(|e| e.to_string()),
        VaeConfig::from_json(text, p)
            .map(drop)
            .map_err(|e| e.to_string()),
        ClipTextConfig::from_json(text, p)
            .map(drop)
            .map_err(|e| e.to_string()),
        T5Config::from_json(text, p)
            .map(drop)
            .map_err(|e| e.to_string()),
        FluxConfig::from_json(text, p)
            .map(drop)
            .map_err(|e| e.to_string()),
        SpaceToDepthConfig::from_json(text, p)
            .map(drop)
            .map_err(|e| e.to_string()),
        DdimConfig::from_json_str(text, "scheduler_config.json")
            .map(drop)
            .map_err(|e| e.to_string()),
        flow_match(text),
        model_index(text),
    ];
    if results.iter().any(Result::is_ok) {
        return Ok(());
    }
    Err(results
        .into_iter()
        .filter_map(Result::err)
        .collect::<Vec<_>>()
        .join("; "))
}

/// `model_index.json`: the pipeline class and the sampling defaults it may carry.
fn model_index(text: &str) -> Outcome {
    let p = Path::new("model_index.json");
    let index: serde_json::Value = l2s_models::config::parse_config(text, p, "a model_index.json")
        .map_err(|e| e.to_string())?;
    pipeline_class(&index, p).map_err(|e| e.to_string())?;
    SamplingDefaults::from_index(&index, p, SamplingDefaults::STABLE_DIFFUSION)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// FLUX's `scheduler_config.json` (FlowMatchEulerDiscreteScheduler).
fn flow_match(text: &str) -> Outcome {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    FlowMatchConfig::from_json_value(&value, "scheduler_config.json")
        .map(drop)
        .map_err(|e| e.to_string())
}
