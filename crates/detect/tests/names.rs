//! The full-size model asks for exactly the tensors of the published checkpoints: a dry run
//! records every name and shape requested, compared with the lists written by
//! tools/fixtures/make_mask2former_names.py.

use std::collections::BTreeMap;

use candle_core::Device;
use l2s_detect::{Mask2Former, Mask2FormerConfig, Naming, Weights};

fn list(file: &str) -> BTreeMap<String, Vec<usize>> {
    let path = format!("{}/names/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, shape) = l.split_once(' ').unwrap();
            let shape = shape.split(',').map(|d| d.parse().unwrap()).collect();
            (name.to_string(), shape)
        })
        .collect()
}

fn requested(naming: Naming) -> BTreeMap<String, Vec<usize>> {
    let rec = Weights::recorder(naming, &Device::Cpu);
    Mask2Former::load(&rec, &Mask2FormerConfig::swin_small_coco_instance()).unwrap();
    let reqs = rec.requested();
    let n = reqs.len();
    let map: BTreeMap<_, _> = reqs.into_iter().collect();
    assert_eq!(map.len(), n, "a tensor was requested twice");
    map
}

fn compare(naming: Naming, file: &str, unused: impl Fn(&str) -> bool) {
    let want = list(file);
    let got = requested(naming);
    let stored: BTreeMap<_, _> = want.iter().filter(|(k, _)| !unused(k)).collect();
    let missing: Vec<_> = stored.keys().filter(|k| !got.contains_key(**k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(missing.is_empty(), "{file}: never requested: {missing:?}");
    assert!(
        extra.is_empty(),
        "{file}: requested but not in the list: {extra:?}"
    );
    for (k, shape) in &got {
        assert_eq!(&want[k], shape, "{file}: shape of {k}");
    }
    println!("{file}: {} requested of {} listed", got.len(), want.len());
}

#[test]
fn hugging_face_swin_s_coco_instance() {
    // SwinBackbone keeps the classification model's final norm, which no feature map uses.
    compare(Naming::HuggingFace, "hf-swin-s-coco-instance.txt", |k| {
        k.starts_with("model.pixel_level_module.encoder.swin.layernorm.")
    });
}

#[test]
fn mmdet_swin_s_coco_instance() {
    // Index buffers: recomputed from the window size.
    compare(Naming::Mmdet, "mmdet-swin-s-coco-instance.txt", |k| {
        k.ends_with(".relative_position_index")
    });
}
