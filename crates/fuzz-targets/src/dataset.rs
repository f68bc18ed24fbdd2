//! Dataset folders: `info.json`, `manifest.jsonl` and shard headers.

use std::path::Path;

use l2s_steer::dataset::{parse_info, parse_manifest, shard_sample_ids};
use l2s_steer::DatasetInfo;

use crate::Outcome;

/// A small dataset's `info.json` (2 maps of 2×2 at one step), against which manifests and
/// shards are checked.
const INFO_JSON: &str = include_str!("../data/info.json");

/// The info manifests and shards are read against.
pub fn reference_info() -> DatasetInfo {
    parse_info(INFO_JSON, Path::new("data/info.json")).expect("the reference info.json parses")
}

/// Reads the bytes as `info.json`, as `manifest.jsonl` and as a shard's header and sample ids;
/// `Ok` when one of them accepts it.
pub fn dataset_files(data: &[u8]) -> Outcome {
    let info = reference_info();
    let shard = shard_sample_ids(data, Path::new("shard-00000.safetensors"), &info)
        .map(drop)
        .map_err(|e| e.to_string());
    let Ok(text) = crate::text(data) else {
        return shard;
    };
    let results = [
        parse_info(text, Path::new("info.json"))
            .map(drop)
            .map_err(|e| e.to_string()),
        parse_manifest(text, Path::new("manifest.jsonl"), &info)
            .map(drop)
            .map_err(|e| e.to_string()),
        shard,
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
