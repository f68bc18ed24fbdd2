//! Our models, built from the published SD1.4 / SD2.1-base / FLUX.1-dev / FLUX.1-schnell configs,
//! ask for exactly the parameter names and shapes that diffusers/transformers define (lists in
//! `fixtures/param-lists/`), so a real checkpoint loads. The lists were produced without weights by
//! `tools/fixtures/make_sd_fixtures.py` and `tools/fixtures/make_flux_fixtures.py`.

mod common;

use std::collections::BTreeMap;

use candle_core::Device;
use l2s_models::clip::{ClipTextConfig, ClipTextModel};
use l2s_models::t5::{T5Config, T5EncoderModel};
use l2s_models::unet::{UNet2DConditionModel, UNetConfig};
use l2s_models::vae::{AutoencoderKL, VaeConfig};
use l2s_models::weights::ParameterRecorder;
use l2s_models::{FluxConfig, FluxTransformer2DModel};

type Params = BTreeMap<String, Vec<usize>>;

fn compare(what: &str, ours: &Params, reference: &Params) {
    let missing: Vec<_> = reference
        .keys()
        .filter(|k| !ours.contains_key(*k))
        .collect();
    let extra: Vec<_> = ours
        .keys()
        .filter(|k| !reference.contains_key(*k))
        .collect();
    let wrong: Vec<_> = ours
        .iter()
        .filter_map(|(k, s)| reference.get(k).filter(|r| *r != s).map(|r| (k, s, r)))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "{what}: {} not built: {:?}; {} unknown: {:?}; {} wrong shape: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)],
        extra.len(),
        &extra[..extra.len().min(5)],
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    let count: usize = ours.values().map(|s| s.iter().product::<usize>()).sum();
    eprintln!(
        "{what}: all {} tensors match, {count} parameters",
        ours.len()
    );
}

fn check_model(file: &str) {
    let path = common::fixtures().join("param-lists").join(file);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let list = |k: &str| -> Params { serde_json::from_value(doc[k].clone()).unwrap() };
    let cfg = &doc["configs"];
    let dev = Device::Cpu;

    let rec = ParameterRecorder::new();
    let unet_cfg: UNetConfig = serde_json::from_value(cfg["unet"].clone()).unwrap();
    UNet2DConditionModel::new(&unet_cfg, rec.var_builder(&dev)).unwrap();
    compare(&format!("{file} unet"), &rec.parameters(), &list("unet"));

    let rec = ParameterRecorder::new();
    let te_cfg: ClipTextConfig = serde_json::from_value(cfg["text_encoder"].clone()).unwrap();
    ClipTextModel::new(&te_cfg, rec.var_builder(&dev)).unwrap();
    compare(
        &format!("{file} text_encoder"),
        &rec.parameters(),
        &list("text_encoder"),
    );

    let rec = ParameterRecorder::new();
    let vae_cfg: VaeConfig = serde_json::from_value(cfg["vae"].clone()).unwrap();
    AutoencoderKL::new(&vae_cfg, rec.var_builder(&dev)).unwrap();
    compare(&format!("{file} vae"), &rec.parameters(), &list("vae"));
}

#[test]
fn sd14_parameters_match_diffusers() {
    check_model("sd1.4.json");
}

#[test]
fn sd21_base_parameters_match_diffusers() {
    check_model("sd2.1-base.json");
}

fn check_flux(file: &str, guidance: bool) {
    let path = common::fixtures().join("param-lists").join(file);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let list = |k: &str| -> Params { serde_json::from_value(doc[k].clone()).unwrap() };
    let cfg = &doc["configs"];
    let dev = Device::Cpu;

    let rec = ParameterRecorder::new();
    let tr_cfg: FluxConfig = serde_json::from_value(cfg["transformer"].clone()).unwrap();
    let published = if guidance {
        FluxConfig::flux1_dev()
    } else {
        FluxConfig::flux1_schnell()
    };
    assert_eq!(
        tr_cfg, published,
        "{file}: the built-in config equals the published one"
    );
    FluxTransformer2DModel::new(&tr_cfg, rec.var_builder(&dev)).unwrap();
    compare(
        &format!("{file} transformer"),
        &rec.parameters(),
        &list("transformer"),
    );

    // transformers lists the tied input embedding twice; the encoder reads `shared.weight`.
    let rec = ParameterRecorder::new();
    let t5_cfg: T5Config = serde_json::from_value(cfg["text_encoder_2"].clone()).unwrap();
    T5EncoderModel::new(&t5_cfg, rec.var_builder(&dev)).unwrap();
    let mut t5 = list("text_encoder_2");
    let tied = t5
        .remove("encoder.embed_tokens.weight")
        .expect("tied embedding listed");
    assert_eq!(Some(&tied), t5.get("shared.weight"));
    compare(&format!("{file} text_encoder_2"), &rec.parameters(), &t5);

    let rec = ParameterRecorder::new();
    let vae_cfg: VaeConfig = serde_json::from_value(cfg["vae"].clone()).unwrap();
    AutoencoderKL::new(&vae_cfg, rec.var_builder(&dev)).unwrap();
    compare(&format!("{file} vae"), &rec.parameters(), &list("vae"));
}

#[test]
fn flux1_dev_parameters_match_diffusers() {
    check_flux("flux1-dev.json", true);
}

#[test]
fn flux1_schnell_parameters_match_diffusers() {
    check_flux("flux1-schnell.json", false);
}
