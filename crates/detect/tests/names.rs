//! The full-size model asks for exactly the tensors of the published checkpoints: a dry run
//! records every name and shape requested, compared with the lists written by
//! tools/fixtures/make_mask2former_names.py; the same for the colour classifier's CLIP ViT-L/14
//! (tools/fixtures/make_clip_names.py).

use std::collections::BTreeMap;

use candle_core::Device;
use l2s_detect::{CheckpointNaming, Mask2Former, Mask2FormerConfig, Weights};
use l2s_models::clip_vision::{ClipModel, ClipModelConfig};
use l2s_models::weights::ParameterRecorder;

fn list(file: &str) -> BTreeMap<String, Vec<usize>> {
    let path = format!("{}/names/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, shape) = l.split_once(' ').unwrap();
            // A scalar (CLIP's logit_scale) has an empty shape.
            let shape = shape
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            (name.to_string(), shape)
        })
        .collect()
}

fn requested(naming: CheckpointNaming) -> BTreeMap<String, Vec<usize>> {
    let rec = Weights::recorder(naming, &Device::Cpu);
    Mask2Former::load(&rec, &Mask2FormerConfig::swin_small_coco_instance()).unwrap();
    let reqs = rec.requested();
    let n = reqs.len();
    let map: BTreeMap<_, _> = reqs.into_iter().collect();
    assert_eq!(map.len(), n, "a tensor was requested twice");
    map
}

fn compare(naming: CheckpointNaming, file: &str, unused: impl Fn(&str) -> bool) {
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
    compare(
        CheckpointNaming::HuggingFace,
        "hf-swin-s-coco-instance.txt",
        |k| k.starts_with("model.pixel_level_module.encoder.swin.layernorm."),
    );
}

#[test]
fn mmdet_swin_s_coco_instance() {
    // Index buffers: recomputed from the window size.
    compare(
        CheckpointNaming::Mmdet,
        "mmdet-swin-s-coco-instance.txt",
        |k| k.ends_with(".relative_position_index"),
    );
}

/// The mmdet list counted from the architecture (mmdet 2.x config of
/// mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco): tensors per part and value totals.
#[test]
fn mmdet_list_counts_follow_the_architecture() {
    let want = list("mmdet-swin-s-coco-instance.txt");
    let count = |prefix: &str| want.keys().filter(|k| k.starts_with(prefix)).count();
    let depths = [2usize, 2, 18, 2];
    let blocks: usize = depths.iter().sum();
    // Patch embedding (conv + norm), per block 14 (2 norms, qkv, proj, ffn's 2 linears, the
    // bias table and the index buffer), 3 per patch merging, 2 per output norm.
    assert_eq!(count("backbone."), 4 + 14 * blocks + 3 * 3 + 2 * 4);
    // 3 input convs with GroupNorm, the level embedding, 6 deformable layers of 16, the lateral
    // and output convs (no conv bias under GroupNorm), the mask feature conv.
    assert_eq!(
        count("panoptic_head.pixel_decoder."),
        3 * 4 + 1 + 6 * 16 + 3 + 3 + 2
    );
    // 9 layers of cross- and self-attention (4 each), 3 norms, an FFN; the post norm.
    assert_eq!(count("panoptic_head.transformer_decoder."), 9 * 18 + 2);
    // The class head (81 = 80 things + no-object), the 3-layer mask MLP, query feat / embed,
    // level embedding.
    assert_eq!(want.len(), 357 + 117 + 164 + 2 + 6 + 3);
    assert_eq!(want["panoptic_head.cls_embed.weight"], vec![81, 256]);
    assert_eq!(want["panoptic_head.query_feat.weight"], vec![100, 256]);
    assert_eq!(
        want["panoptic_head.pixel_decoder.encoder.layers.5.ffns.0.layers.0.0.weight"],
        vec![1024, 256]
    );
    assert_eq!(
        want["panoptic_head.transformer_decoder.layers.8.ffns.0.layers.0.0.weight"],
        vec![2048, 256]
    );
    assert_eq!(
        want["backbone.stages.2.blocks.17.attn.w_msa.relative_position_bias_table"],
        vec![169, 12]
    );
    // 68.74 M values besides the index buffers: Mask2Former's published "69 M" for Swin-S.
    let values: usize = want
        .iter()
        .filter(|(k, _)| !k.ends_with("relative_position_index"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(values, 68_739_547);
}

/// GenEval's colour classifier at full size (openai/clip-vit-large-patch14 under transformers'
/// names): our CLIPModel asks for every tensor of the list, at its shape, and nothing else, but
/// `logit_scale`: colours are picked by the largest cosine (GenEval scales by a fixed 100).
#[test]
fn hugging_face_clip_vit_large_patch14() {
    let dir = format!("{}/names", env!("CARGO_MANIFEST_DIR"));
    let cfg = ClipModelConfig::from_file(
        std::path::Path::new(&dir)
            .join("clip-vit-large-patch14.config.json")
            .as_path(),
    )
    .unwrap();
    assert_eq!((cfg.vision.image_size, cfg.vision.patch_size), (224, 14));
    let rec = ParameterRecorder::new();
    ClipModel::new(&cfg, rec.var_builder(&Device::Cpu)).unwrap();
    let got = rec.parameters();
    let want = list("hf-clip-vit-large-patch14.txt");
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k) && *k != "logit_scale")
        .collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(missing.is_empty(), "never requested: {missing:?}");
    assert!(extra.is_empty(), "requested but not in the list: {extra:?}");
    for (k, shape) in &got {
        assert_eq!(&want[k], shape, "shape of {k}");
    }
    let values: usize = want.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(values, 427_616_513, "ViT-L/14's parameter count");
}
