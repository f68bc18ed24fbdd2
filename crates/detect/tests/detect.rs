//! End to end against the re-implementation of mmdet's test pipeline and instance
//! post-processing in tools/fixtures/make_mask2former_fixtures.py, with the tiny model.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use l2s_detect::postprocess::{instances, prepare};
use l2s_detect::{Instance, InstanceDetector};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/mask2former-tiny")
        .join(name)
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("detect.safetensors"), &Device::Cpu).unwrap()
}

fn image(r: &HashMap<String, Tensor>) -> image::RgbImage {
    let t = &r["image"];
    let (h, w, _) = t.dims3().unwrap();
    let data = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    image::RgbImage::from_raw(w as u32, h as u32, data).unwrap()
}

#[test]
fn preprocessing_matches_mmdet_pipeline() {
    let r = reference();
    let p = prepare(&image(&r), &Device::Cpu).unwrap();
    assert_eq!(p.original, (50, 75));
    assert_eq!(p.resized, (800, 1200));
    assert_eq!(p.pixels.dims(), &[3, 800, 1216]);
    let rows: Vec<u32> = (0..800).step_by(50).map(|r| r as u32).collect();
    let ours = p
        .pixels
        .index_select(&Tensor::new(rows, &Device::Cpu).unwrap(), 1)
        .unwrap();
    let want = r["input_rows"].squeeze(0).unwrap();
    let diff = (ours - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "sampled rows differ by {diff}");
    let sum = p
        .pixels
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let want_sum = r["input_sum"].to_vec1::<f64>().unwrap()[0];
    println!("input sum {sum} vs {want_sum}");
    assert!((sum - want_sum).abs() <= 1e-6 * want_sum.abs().max(1.0));
}

fn check(dets: &[Instance], r: &HashMap<String, Tensor>) {
    let q = r["queries"].to_vec1::<i64>().unwrap();
    let l = r["labels"].to_vec1::<i64>().unwrap();
    let s = r["scores"].to_vec1::<f32>().unwrap();
    let b = r["boxes"].to_vec2::<f32>().unwrap();
    assert_eq!(dets.len(), q.len());
    let ours: HashMap<(usize, usize), &Instance> =
        dets.iter().map(|d| ((d.query, d.label), d)).collect();
    let mut worst = 0f32;
    for i in 0..q.len() {
        let d = ours
            .get(&(q[i] as usize, l[i] as usize))
            .unwrap_or_else(|| panic!("query {} class {} not reported", q[i], l[i]));
        assert_eq!(
            d.bbox.to_vec(),
            b[i],
            "box of query {} class {}",
            q[i],
            l[i]
        );
        worst = worst.max((d.score - s[i]).abs());
        assert_eq!(d.class_name, format!("class{}", l[i]));
    }
    println!(
        "{} detections, boxes exact, max score difference {worst:.2e}",
        dets.len()
    );
    assert!(worst <= 1e-5);
    for w in dets.windows(2) {
        assert!(w[0].score >= w[1].score, "not sorted by score");
    }
}

#[test]
fn detections_match_mmdet_postprocessing() {
    let r = reference();
    let det = InstanceDetector::load(fixture("hf.safetensors")).unwrap();
    let dets = det.detect(&image(&r)).unwrap();
    check(&dets, &r);
}

#[test]
fn mmdet_checkpoint_detects_the_same_and_batches() {
    let r = reference();
    let mut det = InstanceDetector::load(fixture("mmdet.pth")).unwrap();
    det.keep_masks = true;
    let img = image(&r);
    // A second image of another size goes through its own forward pass.
    let small = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let out = det.detect_batch(&[img.clone(), small, img]).unwrap();
    assert_eq!(out.len(), 3);
    check(&out[0], &r);
    assert_eq!(out[0], out[2]);
    let m = out[0][0].mask.as_ref().unwrap();
    assert_eq!((m.width, m.height), (75, 50));
    // The box is the mask's tight box.
    let on: Vec<(usize, usize)> = (0..m.height)
        .flat_map(|y| (0..m.width).map(move |x| (x, y)))
        .filter(|&(x, y)| m.data[y * m.width + x])
        .collect();
    assert!(!on.is_empty());
    let x0 = on.iter().map(|p| p.0).min().unwrap();
    let y0 = on.iter().map(|p| p.1).min().unwrap();
    let x1 = on.iter().map(|p| p.0).max().unwrap() + 1;
    let y1 = on.iter().map(|p| p.1).max().unwrap() + 1;
    assert_eq!(out[0][0].bbox, [x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
}

#[test]
fn postprocessing_of_blob_masks_matches_mmdet() {
    let r =
        candle_core::safetensors::load(fixture("postprocess.safetensors"), &Device::Cpu).unwrap();
    let z: Vec<usize> = r["sizes"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect();
    let got = instances(
        &r["class_logits"],
        &r["mask_logits"],
        (z[0], z[1]),
        (z[2], z[3]),
        (z[4], z[5]),
        false,
    )
    .unwrap();
    let q = r["queries"].to_vec1::<i64>().unwrap();
    let l = r["labels"].to_vec1::<i64>().unwrap();
    let s = r["scores"].to_vec1::<f32>().unwrap();
    let b = r["boxes"].to_vec2::<f32>().unwrap();
    assert_eq!(got.len(), q.len());
    let ours: HashMap<(usize, usize), _> = got.iter().map(|d| ((d.query, d.label), d)).collect();
    let mut worst = 0f32;
    let mut distinct = std::collections::BTreeSet::new();
    for i in 0..q.len() {
        let d = ours[&(q[i] as usize, l[i] as usize)];
        assert_eq!(
            d.bbox.to_vec(),
            b[i],
            "box of query {} class {}",
            q[i],
            l[i]
        );
        worst = worst.max((d.score - s[i]).abs());
        distinct.insert(format!("{:?}", d.bbox));
    }
    println!(
        "{} instances, {} distinct boxes, exact; max score difference {worst:.2e}",
        got.len(),
        distinct.len()
    );
    assert!(distinct.len() >= 5 && distinct.contains(&format!("{:?}", [0f32; 4])));
    assert!(worst <= 1e-5);
}

#[test]
fn resize_matches_opencv_to_the_bit() {
    let r = candle_core::safetensors::load(fixture("resize.safetensors"), &Device::Cpu).unwrap();
    for i in 0..5 {
        let src = &r[&format!("src.{i}")];
        let dst = &r[&format!("dst.{i}")];
        let (h, w, _) = src.dims3().unwrap();
        let (nh, nw, _) = dst.dims3().unwrap();
        let ours = l2s_detect::postprocess::resize_rgb(
            &src.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            h,
            w,
            nh,
            nw,
        );
        let want = dst.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let bad = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            bad,
            0,
            "{h}x{w} -> {nh}x{nw}: {bad} of {} values differ",
            want.len()
        );
    }
}

#[test]
fn a_transformers_config_beside_the_weights_names_the_classes() {
    let dir = std::env::temp_dir().join(format!("l2s-detect-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("hf.safetensors"), dir.join("model.safetensors")).unwrap();
    let names = ["cat", "dog", "kite", "cup", "vase"];
    let id2label: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), serde_json::Value::from(*n)))
        .collect();
    let config = serde_json::json!({
        "model_type": "mask2former",
        "num_attention_heads": 8,
        "id2label": id2label,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let det = InstanceDetector::load(dir.join("model.safetensors")).unwrap();
    assert_eq!(det.class_names(), names.map(String::from).as_slice());
    let r = reference();
    let dets = det.detect(&image(&r)).unwrap();
    assert!(dets.iter().all(|d| d.class_name == names[d.label]));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Scoring's batches: images of one size stacked into one forward pass get the detections each
/// gets alone, and masks come only with the detections scoring above the asked threshold.
#[test]
fn a_batch_detects_what_each_image_detects_alone() {
    use l2s_eval::Detector;
    let r = reference();
    let det = InstanceDetector::load(fixture("hf.safetensors")).unwrap();
    let first = image(&r);
    let (w, h) = first.dimensions();
    let images: Vec<image::RgbImage> = (0..3u32)
        .map(|k| {
            image::RgbImage::from_fn(w, h, |x, y| {
                let p = first.get_pixel((x + 7 * k) % w, (y + 3 * k) % h).0;
                image::Rgb([p[0], p[1].wrapping_add(40 * k as u8), p[2]])
            })
        })
        .collect();
    let batch = Detector::detect_batch(&det, &images, Some(0.05));
    assert_eq!(batch.len(), images.len());
    let mut compared = 0;
    for (im, got) in images.iter().zip(batch) {
        let got = got.unwrap();
        let alone = Detector::detect(&det, im).unwrap();
        assert_eq!(got.len(), alone.len());
        for (g, a) in got.iter().zip(&alone) {
            assert_eq!(g.detection.class, a.class);
            assert_eq!(g.detection.bbox, a.bbox);
            let rel = (g.detection.score - a.score).abs() / a.score.abs().max(1e-6);
            assert!(
                rel <= 1e-5,
                "score {} alone vs {} in a batch",
                a.score,
                g.detection.score
            );
            assert_eq!(g.mask.is_some(), g.detection.score > 0.05);
            if let Some(m) = &g.mask {
                assert_eq!((m.width, m.height), (w, h));
            }
            compared += 1;
        }
    }
    assert!(compared >= 3 * 10, "{compared} detections compared");
    // Without a mask threshold no masks are made.
    assert!(Detector::detect_batch(&det, &images[..1], None)[0]
        .as_ref()
        .unwrap()
        .iter()
        .all(|s| s.mask.is_none()));
}
