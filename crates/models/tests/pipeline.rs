//! The one pipeline value: the family comes from `model_index.json`, fingerprints tie classifiers
//! to models, and text encoders load under both namings transformers writes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use l2s_models::{LoadOptions, Pipeline, StableDiffusion};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .join("model")
}

fn load(name: &str) -> Pipeline {
    Pipeline::load(&fixture(name), &LoadOptions::default(), None).unwrap()
}

#[test]
fn the_family_comes_from_the_class_name() {
    assert_eq!(load("sd1-tiny").family_name(), "Stable Diffusion");
    assert_eq!(load("flux-dev-tiny").family_name(), "FLUX.1-dev");
    assert_eq!(load("flux-schnell-tiny").family_name(), "FLUX.1-schnell");
    assert_eq!(load("flux-schnell-tiny").sampling_defaults().steps, 4);
    assert_eq!(load("flux-schnell-tiny").map_steps(4), vec![1, 3]);
    assert_eq!(load("sd1-tiny").map_steps(50), vec![5, 10, 15, 20, 25, 49]);
}

#[test]
fn a_transformer_file_is_refused_for_stable_diffusion() {
    let err = Pipeline::load(
        &fixture("sd1-tiny"),
        &LoadOptions::default(),
        Some(Path::new("x.safetensors")),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("x.safetensors") && err.contains("StableDiffusion"),
        "{err}"
    );
}

#[test]
fn fingerprint_is_stable_and_model_specific() {
    let (a, b) = (load("sd1-tiny"), load("sd2-tiny"));
    let id_a = a.fingerprint().unwrap();
    assert_eq!(id_a, a.fingerprint().unwrap());
    assert_ne!(id_a, b.fingerprint().unwrap());
    assert!(id_a.starts_with("unet-") && id_a.len() == 5 + 16, "{id_a}");
    assert!(load("flux-dev-tiny")
        .fingerprint()
        .unwrap()
        .starts_with("flux-"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// transformers ≥ 5 saves CLIPTextModel without the `text_model.` level; such a folder loads and
/// encodes exactly as the published naming does.
#[test]
fn text_encoders_load_with_and_without_the_text_model_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let stripped = tmp.path().join("model");
    copy_dir(&fixture("sd1-tiny"), &stripped);
    let file = stripped.join("text_encoder/model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    assert!(tensors.keys().all(|k| k.starts_with("text_model.")));
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("text_model.").to_string(), v))
        .collect();
    candle_core::safetensors::save(&renamed, &file).unwrap();

    let ids = Tensor::new(&[[49406u32, 320, 1929, 49407]], &Device::Cpu).unwrap();
    let encode = |dir: &Path| {
        let sd = StableDiffusion::load(dir, &LoadOptions::default()).unwrap();
        sd.text_encoder
            .forward(&ids)
            .unwrap()
            .last_hidden_state
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(encode(&fixture("sd1-tiny")), encode(&stripped));
}
