//! `l2s score --detector mask2former`: GenEval's detector inside the binary, here with the tiny
//! random-weight Mask2Former of the detector's parity fixtures. The results file keeps exactly
//! the detections the library finds above GenEval's threshold.

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
        let want: Vec<(String, f32)> = l2s_eval::Detector::detect(&detector, &img)
            .unwrap()
            .into_iter()
            .filter(|d| d.score > 0.0)
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
