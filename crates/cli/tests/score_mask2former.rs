//! `l2s score --detector mask2former`: GenEval's detector inside the binary, here with the tiny
//! random-weight Mask2Former of the detector's parity fixtures. The results file keeps exactly
//! the detections the library finds above GenEval's threshold; batches change nothing; CLIP names
//! the colours of GenEval's colour tasks.

use std::path::PathBuf;

mod run;
use run::{fails, ok, s};

fn weights() -> PathBuf {
    run::fixture("mask2former-tiny/hf.safetensors")
}

#[test]
fn scoring_with_mask2former_keeps_the_libraries_detections() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("eval");
    ok(&[
        "eval",
        "--generate-prompts",
        "2",
        "--images-per-prompt",
        "2",
        "--steps",
        "4",
        "--out",
        s(&dir),
        "-q",
    ]);
    ok(&[
        "score",
        s(&dir),
        "--detector",
        "mask2former",
        "--detector-weights",
        s(&weights()),
        "--min-score",
        "0",
        "-q",
    ]);
    let detector = l2s_detect::InstanceDetector::load(weights()).unwrap();
    let results = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for r in &lines {
        let img = image::open(dir.join(r["filename"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        // The trait's view, as scoring uses it.
        // Above the threshold, GenEval's 16 best of each class.
        let mut per_class: std::collections::HashMap<String, usize> = Default::default();
        let mut all = l2s_eval::Detector::detect(&detector, &img).unwrap();
        all.sort_by(|a, b| b.score.total_cmp(&a.score));
        let want: Vec<(String, f32)> = all
            .into_iter()
            .filter(|d| d.score > 0.0)
            .filter(|d| {
                let n = per_class.entry(d.class.clone()).or_default();
                *n += 1;
                *n <= l2s_eval::score::MAX_OBJECTS
            })
            .map(|d| (d.class, d.score))
            .collect();
        let got: Vec<(String, f32)> = r["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["class"].as_str().unwrap().to_string(),
                    d["score"].as_f64().unwrap() as f32,
                )
            })
            .collect();
        let mut want_sorted = want.clone();
        let mut got_sorted = got.clone();
        let key = |a: &(String, f32), b: &(String, f32)| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1));
        want_sorted.sort_by(key);
        got_sorted.sort_by(key);
        assert_eq!(got_sorted, want_sorted, "{}", r["filename"]);
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["detector"], "mask2former");
    assert_eq!(summary["images"], 4);
}

#[test]
fn mask2former_needs_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("eval");
    std::fs::create_dir(&dir).unwrap();
    let e = fails(&["score", s(&dir), "--detector", "mask2former"]);
    assert!(e.contains("--detector-weights"), "{e}");
    // Another model's weights: the file named, nothing written.
    let other = run::fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let e = fails(&[
        "score",
        s(&dir),
        "--detector",
        "mask2former",
        "--detector-weights",
        s(&other),
    ]);
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    assert!(!dir.join("results.jsonl").exists());
}

/// A GenEval folder of the tiny detector's classes with one prompt of each task.
fn geneval_folder(root: &std::path::Path) {
    let prompts = [
        r#"{"tag": "single_object", "include": [{"class": "class1", "count": 1}], "prompt": "a photo of a class1"}"#,
        r#"{"tag": "two_object", "include": [{"class": "class1", "count": 1}, {"class": "class3", "count": 1}], "prompt": "a photo of a class1 and a class3"}"#,
        r#"{"tag": "counting", "include": [{"class": "class2", "count": 2}], "exclude": [{"class": "class2", "count": 3}], "prompt": "a photo of two class2s"}"#,
        r#"{"tag": "colors", "include": [{"class": "class0", "count": 1, "color": "red"}], "prompt": "a photo of a red class0"}"#,
        r#"{"tag": "position", "include": [{"class": "class3", "count": 1}, {"class": "class1", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a class1 left of a class3"}"#,
        r#"{"tag": "color_attr", "include": [{"class": "class4", "count": 1, "color": "blue"}, {"class": "class0", "count": 1, "color": "white"}], "prompt": "a photo of a blue class4 and a white class0"}"#,
    ];
    for (i, p) in prompts.iter().enumerate() {
        let samples = root.join(format!("{i:05}/samples"));
        std::fs::create_dir_all(&samples).unwrap();
        std::fs::write(root.join(format!("{i:05}/metadata.jsonl")), p).unwrap();
        for j in 0..1u32 {
            let k = i as u32 + j;
            let img = image::RgbImage::from_fn(75, 50, |x, y| {
                let inside = (x / 15 + y / 10 + k).is_multiple_of(3);
                let v = (x * 3 + y * 5 + k * 40) as u8;
                image::Rgb(if inside {
                    [v, 200, 255 - v]
                } else {
                    [30, v / 2, 60]
                })
            });
            img.save(samples.join(format!("{j:04}.png"))).unwrap();
        }
    }
}

fn clip_folder(root: &std::path::Path) -> PathBuf {
    let dir = root.join("clip");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(run::fixture("clip-tiny").join(f), dir.join(f)).unwrap();
    }
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(
            run::fixture("sd1-tiny/model/tokenizer").join(f),
            dir.join(f),
        )
        .unwrap();
    }
    dir
}

#[test]
fn every_geneval_task_is_scored_in_batches_with_clip_colours() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("geneval");
    geneval_folder(&dir);
    let clip = clip_folder(tmp.path());
    let m2f = weights();
    let score = |batch: &str, out: &str, with_clip: bool| {
        let results = tmp.path().join(format!("{out}.jsonl"));
        let summary = tmp.path().join(format!("{out}.json"));
        let mut args = vec![
            "score",
            s(&dir),
            "--detector",
            "mask2former",
            "--detector-weights",
            s(&m2f),
            "--min-score",
            "0.01",
            "--counting-min-score",
            "0.02",
            "--batch-size",
            batch,
            "--device",
            "cpu",
            "--out",
            s(&results),
            "--summary",
            s(&summary),
            "-q",
        ];
        if with_clip {
            args.extend(["--clip", s(&clip)]);
        }
        let printed = ok(&args);
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
        (std::fs::read_to_string(&results).unwrap(), summary, printed)
    };
    let (one, summary, printed) = score("1", "one", true);
    let (three, _, _) = score("3", "three", true);
    assert_eq!(
        one, three,
        "batches of 3 give the results of one image at a time"
    );
    let tags: Vec<&str> = summary["geneval"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag"].as_str().unwrap())
        .collect();
    assert_eq!(
        tags,
        [
            "single_object",
            "two_object",
            "counting",
            "colors",
            "position",
            "color_attr"
        ]
    );
    assert_eq!(summary["geneval"]["images"], 6);
    assert!(
        printed.contains("overall score (mean over tasks)"),
        "{printed}"
    );

    // The colours in the results are CLIP's on the detector's own masks.
    let detector = l2s_detect::InstanceDetector::load(&m2f).unwrap();
    let colors = l2s_detect::ClipColorClassifier::load(&clip, &candle_core::Device::Cpu).unwrap();
    let mut checked = 0;
    // Dark 50x75 images under a random detector: the scores are low, so the thresholds above are
    // low too; what matters here is that every clause is exercised.
    for line in one.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["status"], "scored");
        let named = r["detections"].as_array().unwrap();
        if !named.iter().any(|b| b["color"].is_string()) {
            continue;
        }
        let img = image::open(dir.join(r["filename"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let found =
            l2s_eval::Detector::detect_batch(&detector, std::slice::from_ref(&img), Some(0.01))
                .pop()
                .unwrap()
                .unwrap();
        for b in r["detections"].as_array().unwrap() {
            let Some(color) = b["color"].as_str() else {
                continue;
            };
            let bbox: Vec<f32> = b["bbox"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let score = b["score"].as_f64().unwrap() as f32;
            let seg = found
                .iter()
                .find(|s| s.detection.bbox.xyxy() == bbox[..] && s.detection.score == score)
                .expect("the box is the detector's");
            let query = l2s_eval::ColorQuery {
                bbox: seg.detection.bbox,
                mask: seg.mask.as_ref(),
            };
            let class = b["class"].as_str().unwrap();
            let want = l2s_eval::ColorClassifier::colors(&colors, &img, class, &[query]).unwrap();
            assert_eq!(color, want[0], "{}", r["filename"]);
            checked += 1;
        }
    }
    assert!(checked >= 2, "{checked} colours checked");

    // Without CLIP the colour prompts are listed as not scored, and counted.
    let (plain, summary, _) = score("2", "plain", false);
    assert_eq!(plain.lines().count(), 4);
    assert_eq!(summary["unsupported"]["colors"]["count"], 1);
    assert_eq!(summary["unsupported"]["color_attr"]["count"], 1);
}

/// The detector's own device for data building and generation: a device that is no device is
/// refused by its flag before any work; `cpu` judges as the default does.
#[test]
fn the_detector_takes_its_own_device() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gen");
    let w = weights();
    let generate = |device| {
        vec![
            "data",
            "generate",
            "--generate-prompts",
            "1",
            "--images-per-prompt",
            "1",
            "--steps",
            "3",
            "--detector",
            "mask2former",
            "--detector-weights",
            s(&w),
            "--detector-device",
            device,
            "--out",
            s(&out),
            "-q",
        ]
    };
    let e = fails(&generate("gpu0"));
    assert!(
        e.contains("--detector-device \"gpu0\": expected cpu, cuda or cuda:N"),
        "{e}"
    );
    assert!(!out.join("results.jsonl").exists());
    ok(&generate("cpu"));
    assert!(out.join("verified.jsonl").exists());

    let images = tmp.path().join("scenes");
    ok(&[
        "shapes",
        "render",
        "--count",
        "2",
        "--out",
        s(&images),
        "-q",
    ]);
    let e = fails(&[
        "data",
        "build",
        "--images",
        s(&images),
        "--out",
        s(&tmp.path().join("data")),
        "--steps",
        "3",
        "--check-relation",
        "mask2former",
        "--detector-weights",
        s(&weights()),
        "--detector-device",
        "tpu",
        "-q",
    ]);
    assert!(e.contains("--detector-device \"tpu\""), "{e}");
}
