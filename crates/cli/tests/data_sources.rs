//! `l2s data build` from photos: COCO instances and JSON Lines, fitted to the built-in model's
//! square. Every usable record becomes a true- and a wrong-prompt sample of one of its relations;
//! what was left out is counted by reason in build-summary.json.

use std::path::{Path, PathBuf};

use l2s_steer::Dataset;

mod run;
use run::{fails, ok, s};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../sources/tests/data")
        .join(rel)
}

fn build(source: &[&str], out: &Path) -> serde_json::Value {
    let mut args = vec![
        "data",
        "build",
        "--out",
        s(out),
        "--steps",
        "4",
        "--fixed-point",
        "0",
        "--min-psnr=-1000",
        "-q",
    ];
    args.extend_from_slice(source);
    ok(&args);
    let text = std::fs::read_to_string(out.join("build-summary.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn coco_photos_become_samples_and_the_rest_is_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("coco");
    // The committed images are 8×8 stand-ins: at their annotated 640×480 instead, with a
    // different colour each so that every inversion has something to reconstruct.
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for (k, id) in [1, 2, 3, 5].into_iter().enumerate() {
        let img = image::RgbImage::from_fn(640, 480, |x, y| {
            image::Rgb([(x / 3) as u8, (y / 2) as u8, 60 * k as u8])
        });
        img.save(images.join(format!("{id:012}.jpg"))).unwrap();
    }
    let summary = build(
        &[
            "--coco",
            s(&data("coco/instances_tiny.json")),
            "--image-dir",
            s(&images),
        ],
        &out,
    );
    // The file's six image records: two keep a relation (cat right of dog; car above cat and
    // car right of dog), the rest are left out for the reasons its reader test works out.
    assert_eq!(summary["records_seen"], 6);
    let used = summary["images_used"].as_u64().unwrap();
    assert!((1..=2).contains(&used), "{summary}");
    let left = &summary["left_out"]["counts"];
    assert_eq!(left["missing_image"], 1, "{summary}");
    assert_eq!(left["crowd_category"], 1, "{summary}");
    assert_eq!(left["multiple_instances"], 1, "{summary}");
    // Each used image gives its true-prompt and its wrong-prompt sample.
    assert_eq!(summary["samples"]["written"], 2 * used, "{summary}");
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.entries().len() as u64, 2 * used);
    for e in ds.entries() {
        let m = &e.meta;
        let named = [("cat", "dog"), ("car", "cat"), ("car", "dog")];
        assert!(
            named.contains(&(m.subject.as_str(), m.object.as_str())),
            "{m:?}"
        );
        // The paper's wording, the true relation as the label.
        assert!(m.prompt.starts_with(&format!("A {} ", m.subject)), "{m:?}");
    }
}

#[test]
fn jsonl_lines_and_their_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("jsonl");
    let summary = build(&["--jsonl", s(&data("jsonl/pairs.jsonl"))], &out);
    let left = &summary["left_out"]["counts"];
    // A missing image, a relation that is none of the four, a line that is not JSON.
    assert_eq!(left["missing_image"], 1, "{summary}");
    assert_eq!(left["unknown_relation"], 1, "{summary}");
    assert!(left["bad_record"].as_u64().unwrap() >= 1, "{summary}");
    let used = summary["images_used"].as_u64().unwrap();
    assert!(used >= 2, "{summary}");
    assert_eq!(summary["samples"]["written"], 2 * used, "{summary}");
}

#[test]
fn a_source_needs_its_images_and_one_source_only() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let coco = data("coco/instances_tiny.json");
    let e = fails(&["data", "build", "--coco", s(&coco), "--out", s(&out)]);
    assert!(e.contains("--image-dir"), "{e}");
    let e = fails(&[
        "data",
        "build",
        "--coco",
        s(&coco),
        "--jsonl",
        s(&data("jsonl/pairs.jsonl")),
        "--image-dir",
        s(&data("coco/images")),
        "--out",
        s(&out),
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    // Images whose size disagrees with their annotation are left out and counted.
    let e = fails(&[
        "data",
        "build",
        "--coco",
        s(&coco),
        "--image-dir",
        s(&data("coco/images")),
        "--out",
        s(&out),
    ]);
    assert!(e.contains("image size differs from its annotation"), "{e}");
    // A file that is not what it claims: one clear error naming it, nothing written.
    let e = fails(&[
        "data",
        "build",
        "--coco",
        s(&data("jsonl/pairs.jsonl")),
        "--image-dir",
        s(&data("coco/images")),
        "--out",
        s(&out),
    ]);
    assert!(e.contains("pairs.jsonl"), "{e}");
    assert!(!out.join("manifest.jsonl").exists());
}

/// `l2s data generate` keeps the images its detector judges correct and writes them as a JSONL
/// source, which `l2s data build --jsonl` turns into samples.
#[test]
fn verified_generations_become_a_source() {
    let tmp = tempfile::tempdir().unwrap();
    let gen = tmp.path().join("gen");
    let said = ok(&[
        "data",
        "generate",
        "--generate-prompts",
        "4",
        "--images-per-prompt",
        "2",
        "--steer",
        "l2s",
        "--out",
        s(&gen),
        "-q",
    ]);
    assert!(said.contains("judged correct"), "{said}");
    // One line per correct image (each prompt names one relation), with the boxes used.
    let results = std::fs::read_to_string(gen.join("results.jsonl")).unwrap();
    let correct: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["correct"] == true)
        .collect();
    let verified = std::fs::read_to_string(gen.join("verified.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = verified
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), correct.len());
    assert!(!lines.is_empty(), "the steered images include correct ones");
    for (line, r) in lines.iter().zip(&correct) {
        assert_eq!(line["image"], r["filename"]);
        assert!(line["subject_box"].is_array() && line["object_box"].is_array());
        assert!(gen.join(line["image"].as_str().unwrap()).is_file());
    }
    // The builder reads them, boxes agreeing with every relation.
    let out = tmp.path().join("data");
    let summary = build(&["--jsonl", s(&gen.join("verified.jsonl"))], &out);
    assert_eq!(summary["images_used"], lines.len(), "{summary}");
    assert!(
        summary["left_out"]["counts"]["boxes_disagree"].is_null(),
        "{summary}"
    );
    assert_eq!(summary["samples"]["written"], 2 * lines.len(), "{summary}");
}

/// A photo whose header reads but whose pixels do not (a truncated download) is found when its
/// samples run: its samples are counted as unreadable and the build goes on.
#[test]
fn a_photo_that_does_not_decode_is_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("photos");
    std::fs::create_dir(&dir).unwrap();
    for (name, shade) in [("good.png", 40u8), ("cut.png", 200)] {
        let img = image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, shade])
        });
        img.save(dir.join(name)).unwrap();
    }
    let cut = std::fs::read(dir.join("cut.png")).unwrap();
    std::fs::write(dir.join("cut.png"), &cut[..cut.len() / 2]).unwrap();
    let lines = [
        r#"{"image": "good.png", "subject": "cup", "relation": "to the left of", "object": "book", "subject_box": [0, 10, 20, 30], "object_box": [40, 10, 60, 30]}"#,
        r#"{"image": "cut.png", "subject": "dog", "relation": "above", "object": "cat", "subject_box": [20, 0, 40, 15], "object_box": [20, 30, 40, 45]}"#,
    ];
    let jsonl = dir.join("pairs.jsonl");
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let out = tmp.path().join("data");
    let summary = build(&["--jsonl", s(&jsonl)], &out);
    assert_eq!(summary["images_used"], 2, "{summary}");
    assert_eq!(summary["samples"]["written"], 2, "{summary}");
    assert_eq!(summary["samples"]["dropped_unreadable"], 2, "{summary}");
    let ds = Dataset::open(&out).unwrap();
    assert!(ds.entries().iter().all(|e| e.meta.subject == "cup"));
}
