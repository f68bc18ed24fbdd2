//! GenEval's colour classifier against tools/fixtures/make_clip_fixtures.py: transformers'
//! CLIPModel on a tiny random config (both towers and projections), and the crop, background
//! and resize pipeline restated with Pillow.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use l2s_detect::colors::{clip_view, masked_crop, normalised, resize_bicubic};
use l2s_detect::ClipColorClassifier;
use l2s_eval::{BBox, ColorClassifier, ColorQuery, ObjectMask};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("clip-tiny/expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn classifier() -> ClipColorClassifier {
    let dir = fixtures().join("clip-tiny");
    ClipColorClassifier::from_files(
        &dir.join("config.json"),
        &dir.join("model.safetensors"),
        &fixtures().join("sd1-tiny/model/tokenizer"),
        &Device::Cpu,
    )
    .unwrap()
}

fn rgb(t: &Tensor) -> image::RgbImage {
    let (h, w, _) = t.dims3().unwrap();
    image::RgbImage::from_raw(
        w as u32,
        h as u32,
        t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
    )
    .unwrap()
}

/// Largest |a − b| / max(|b|) over the tensor.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale.max(1e-12)
}

#[test]
fn clip_towers_match_transformers() {
    let r = reference();
    let dir = fixtures().join("clip-tiny");
    let cfg =
        l2s_models::clip_vision::ClipModelConfig::from_file(&dir.join("config.json")).unwrap();
    let files =
        l2s_models::weights::SafetensorsWeights::open(&[dir.join("model.safetensors")]).unwrap();
    let vb =
        candle_nn::VarBuilder::from_backend(Box::new(files), candle_core::DType::F32, Device::Cpu);
    let model = l2s_models::clip_vision::ClipModel::new(&cfg, vb).unwrap();
    let img = model.image_features(&r["pixels"]).unwrap();
    let e = rel_err(&img, &r["image_embeds"]);
    println!("image features: relative error {e:.2e}");
    assert!(e <= 1e-4, "image features differ by {e}");
    let ids = r["text_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let txt = model.text_features(&ids).unwrap();
    let e = rel_err(&txt, &r["text_embeds"]);
    println!("text features: relative error {e:.2e}");
    assert!(e <= 1e-4, "text features differ by {e}");
}

fn objects(r: &HashMap<String, Tensor>) -> (image::RgbImage, Vec<BBox>, Vec<ObjectMask>) {
    let image = rgb(&r["image"]);
    let boxes: Vec<BBox> = r["boxes"]
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|b| BBox::new(b[0], b[1], b[2], b[3]))
        .collect();
    let masks = (0..3)
        .map(|i| ObjectMask {
            width: image.width(),
            height: image.height(),
            data: r["masks"]
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
                .into_iter()
                .map(|v| v != 0)
                .collect(),
        })
        .collect();
    (image, boxes, masks)
}

#[test]
fn crops_and_views_match_pillow_to_the_bit() {
    let r = reference();
    let (image, boxes, masks) = objects(&r);
    for i in 0..3 {
        let crop = masked_crop(&image, boxes[i], Some(&masks[i])).unwrap();
        let want = rgb(&r[&format!("crop.{i}")]);
        assert_eq!(crop.dimensions(), want.dimensions(), "crop {i} size");
        assert_eq!(crop, want, "crop {i}: composite over #999 and crop");
        // Upscaled to 32 (the tiny model) and to ViT-L/14's 224.
        let small = clip_view(&crop, 32);
        let pixels = Tensor::from_vec(normalised(&small), (3, 32, 32), &Device::Cpu).unwrap();
        let e = rel_err(&pixels, &r[&format!("pixels.{i}")]);
        assert!(e <= 1e-6, "view {i} at 32: {e}");
        let big = clip_view(&crop, 224);
        let want = rgb(&r[&format!("big.{i}")]);
        let bad = big
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(bad, 0, "view {i} at 224: {bad} values differ from Pillow");
    }
    // A downscale on both axes keeps the Pillow arithmetic too (checked against the 224 view of
    // a wide crop): resizing to the same size is the identity.
    let crop = masked_crop(&image, boxes[1], None).unwrap();
    assert_eq!(resize_bicubic(&crop, crop.width(), crop.height()), crop);
    // Bad boxes and masks are refused, not cropped to nothing.
    assert!(masked_crop(&image, BBox::new(5.0, 5.0, 5.2, 9.0), None).is_err());
    let wrong = ObjectMask {
        width: 3,
        height: 3,
        data: vec![true; 9],
    };
    assert!(masked_crop(&image, boxes[0], Some(&wrong)).is_err());
}

#[test]
fn colour_logits_match_genevals_zero_shot_classifier() {
    let r = reference();
    let (image, boxes, masks) = objects(&r);
    let clf = classifier();
    let queries: Vec<ColorQuery<'_>> = (0..3)
        .map(|i| ColorQuery {
            bbox: boxes[i],
            mask: Some(&masks[i]),
        })
        .collect();
    let ours = clf.logits(&image, "car", &queries).unwrap();
    let ours = Tensor::new(ours, &Device::Cpu).unwrap();
    let e = rel_err(&ours, &r["logits"]);
    println!("colour logits: relative error {e:.2e}");
    assert!(e <= 1e-4, "colour logits differ by {e}");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("clip-tiny/meta.json")).unwrap(),
    )
    .unwrap();
    let names = clf.colors(&image, "car", &queries).unwrap();
    let want: Vec<String> = meta["predicted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, want);
}

#[test]
fn other_checkpoints_are_refused_by_name() {
    let dir = fixtures().join("clip-tiny");
    // Mask2Former weights are not a CLIP model.
    let e = ClipColorClassifier::from_files(
        &dir.join("config.json"),
        &fixtures().join("mask2former-tiny/hf.safetensors"),
        &fixtures().join("sd1-tiny/model/tokenizer"),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("not a transformers CLIPModel"), "{e}");
    // A text encoder's config has no vision tower.
    let e = ClipColorClassifier::from_files(
        &fixtures().join("sd1-tiny/model/text_encoder/config.json"),
        &dir.join("model.safetensors"),
        &fixtures().join("sd1-tiny/model/tokenizer"),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("vision_config"), "{e}");
    // A truncated file.
    let tmp = tempfile::tempdir().unwrap();
    let cut = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = ClipColorClassifier::from_files(
        &dir.join("config.json"),
        &cut,
        &fixtures().join("sd1-tiny/model/tokenizer"),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}
