//! `l2s score`: hand-made detections with hand-computed summaries, a folder of drawn scenes
//! judged by the shapes detector, the prompt-by-prompt comparison, and bad input.

mod eval_support;

use eval_support::*;
use l2s_eval::score::{read_results, ImageStatus};
use l2s_eval::Relation::*;
use l2s_shapes::ShapeClass::*;
use serde_json::{json, Value};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn summary(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// One detections line for `prompt` (a GenEval metadata value) on a 100×100 image.
fn line(meta: &Value, sample: usize, dets: Value) -> String {
    let mut v = meta.clone();
    v["filename"] = json!(format!("{:05}/samples/{sample:04}.png", prompt_index(meta)));
    v["width"] = json!(100);
    v["height"] = json!(100);
    v["detections"] = dets;
    v.to_string()
}

fn prompt_index(meta: &Value) -> usize {
    match meta["prompt"].as_str().unwrap() {
        p if p.contains("dog") => 0,
        p if p.contains("cup") => 1,
        _ => 2,
    }
}

fn d(class: &str, bbox: [f64; 4], score: f64) -> Value {
    json!({"class": class, "bbox": bbox, "score": score})
}

/// Three prompts × four images; every number below is worked out by hand in the comments.
#[test]
fn hand_made_detections_give_hand_computed_summary() {
    let dir = tempfile::tempdir().unwrap();
    let p0 = l2s_eval::prompts::position_prompt("dog", LeftOf, "cat")
        .metadata
        .clone();
    let p1 = l2s_eval::prompts::position_prompt("cup", Above, "kite")
        .metadata
        .clone();
    let p2 = l2s_eval::prompts::position_prompt("bus", Below, "car")
        .metadata
        .clone();
    let lines = [
        // P0 "dog left of cat"
        // s0: centres 20 vs 70: offset −50, shrink 0.1·40 = 4 → −46/50 = −0.92: left of ✓
        line(&p0, 0, json!([d("dog", [10., 40., 30., 60.], 0.9), d("cat", [60., 40., 80., 60.], 0.8)])),
        // s1: the dog scores 0.25 ≤ 0.3: not found ✗
        line(&p0, 1, json!([d("dog", [10., 40., 30., 60.], 0.25), d("cat", [60., 40., 80., 60.], 0.8)])),
        // s2: swapped: right of ✗ (both found)
        line(&p0, 2, json!([d("dog", [60., 40., 80., 60.], 0.9), d("cat", [10., 40., 30., 60.], 0.8)])),
        // s3: diagonal offset (−50, −50) → (−46, −46)/70.7 = −0.65 each: left of and above ✓
        line(&p0, 3, json!([d("dog", [10., 10., 30., 30.], 0.9), d("cat", [60., 60., 80., 80.], 0.8)])),
        // P1 "cup above kite"
        // s0: offset (0, −65) → −61/65: above ✓
        line(&p1, 0, json!([d("cup", [40., 5., 60., 25.], 0.9), d("kite", [40., 70., 60., 90.], 0.9)])),
        // s1: offset (−2, −2), shrink 4 → 0: no relation ✗ (both found)
        line(&p1, 1, json!([d("cup", [40., 40., 60., 60.], 0.9), d("kite", [42., 42., 62., 62.], 0.9)])),
        // s2: as s0, plus a person the prompt does not mention (reported, ignored) ✓
        line(&p1, 2, json!([d("cup", [40., 5., 60., 25.], 0.9), d("kite", [40., 70., 60., 90.], 0.9), d("person", [0., 0., 5., 5.], 0.99)])),
        // s3: no line at all → missing ✗
        // An unsupported tag and a malformed line: reported, not scored.
        r#"{"tag": "texture", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a furry cat", "detections": []}"#.to_string(),
        "{not json".to_string(),
        // P2 "bus below car"
        // s0: the bus box reaches y = 130 on a 100-px image: clipped to 100 (reported);
        //     centres (25, 85) vs (25, 17.5): below ✓
        line(&p2, 0, json!([d("bus", [10., 70., 40., 130.], 0.9), d("car", [10., 5., 40., 30.], 0.9)])),
        // s1: only the car ✗; s2, s3: nothing ✗
        line(&p2, 1, json!([d("car", [10., 5., 40., 30.], 0.9)])),
        line(&p2, 2, json!([])),
        line(&p2, 3, json!([])),
    ];
    let dets = dir.path().join("dets.jsonl");
    std::fs::write(&dets, lines.join("\n") + "\n").unwrap();
    let (out, sum) = (
        dir.path().join("results.jsonl"),
        dir.path().join("summary.json"),
    );
    let stdout = ok(&[
        "score",
        "--detections",
        s(&dets),
        "--images-per-prompt",
        "4",
        "--out",
        s(&out),
        "--summary",
        s(&sum),
    ]);
    assert!(
        stdout.contains("position accuracy 41.7% (5/12)"),
        "{stdout}"
    );
    let v = summary(&sum);
    // 12 images: correct P0 s0, s3; P1 s0, s2; P2 s0 = 5.
    assert_eq!(v["images"], 12);
    assert_eq!(v["correct_images"], 5);
    assert_eq!(v["prompts"], 3);
    assert!(close(v["position_accuracy"].as_f64().unwrap(), 5.0 / 12.0));
    // Per relation: left of 2/4, above 2/4, below 1/4.
    assert_eq!(
        v["per_relation"]["left of"],
        json!({"total": 4, "correct": 2, "accuracy": 0.5})
    );
    assert_eq!(
        v["per_relation"]["above"],
        json!({"total": 4, "correct": 2, "accuracy": 0.5})
    );
    assert_eq!(
        v["per_relation"]["below"],
        json!({"total": 4, "correct": 1, "accuracy": 0.25})
    );
    // Every prompt has a correct image.
    assert!(close(v["correct_prompts"].as_f64().unwrap(), 1.0));
    // Both found: P0 s0, s2, s3; P1 s0, s1, s2; P2 s0 = 7 of 12; correct among them 5 of 7.
    let visor = &v["visor"];
    assert!(close(visor["oa"].as_f64().unwrap(), 7.0 / 12.0));
    assert!(close(visor["cond"].as_f64().unwrap(), 5.0 / 7.0));
    assert!(close(visor["uncond"].as_f64().unwrap(), 5.0 / 12.0));
    // Correct per prompt: 2, 2, 1 → ≥1: 3/3, ≥2: 2/3, ≥3: 0, ≥4: 0.
    assert!(close(visor["visor_1"].as_f64().unwrap(), 1.0));
    assert!(close(visor["visor_2"].as_f64().unwrap(), 2.0 / 3.0));
    assert_eq!(visor["visor_3"], 0.0);
    assert_eq!(visor["visor_4"], 0.0);
    assert_eq!(v["missing_images"], 1);
    // Every problem listed with its place.
    let counts = &v["error_counts"];
    assert_eq!(counts["unsupported_tag"], 1);
    assert_eq!(counts["bad_line"], 1);
    assert_eq!(counts["class_not_in_prompt"], 1);
    assert_eq!(counts["box_outside_image"], 1);
    assert_eq!(counts["missing_image"], 1);
    assert_eq!(v["errors"].as_array().unwrap().len(), 5);
    let at = |kind: &str| -> String {
        v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap()["location"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(at("unsupported_tag"), format!("{}:8", dets.display()));
    assert_eq!(at("bad_line"), format!("{}:9", dets.display()));
    assert_eq!(at("class_not_in_prompt"), format!("{}:7", dets.display()));
    assert_eq!(at("box_outside_image"), format!("{}:10", dets.display()));
    assert_eq!(at("missing_image"), "00001/samples/0003.png");
    assert_eq!(v["unsupported"]["texture"]["count"], 1);

    // Results: one line per image, GenEval's fields included.
    let rs = read_results(&out).unwrap();
    assert_eq!(rs.len(), 12);
    let missing: Vec<_> = rs
        .iter()
        .filter(|r| r.status == ImageStatus::Missing)
        .collect();
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].filename, "00001/samples/0003.png");
    assert!(!missing[0].correct);
    let s0 = rs
        .iter()
        .find(|r| r.filename == "00000/samples/0003.png")
        .unwrap();
    assert!(s0.correct);
    assert_eq!(s0.relations[0].holds.names(), ["left of", "above"]);
    let wrong = rs
        .iter()
        .find(|r| r.filename == "00000/samples/0002.png")
        .unwrap();
    assert_eq!(
        wrong.reason,
        "expected dog left of target, found right of target"
    );
}

/// Two prompts of drawn scenes judged by the shapes detector, including a missing and a corrupt
/// image; then a second run compared prompt by prompt.
#[test]
fn folder_of_drawn_scenes_and_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let left = vec![(Circle, 2, 10, 10), (Square, 20, 10, 10)];
    let right = vec![(Circle, 20, 10, 10), (Square, 2, 10, 10)];
    let above = vec![(Star, 10, 2, 11), (Heart, 10, 19, 11)];
    let star_only = vec![(Star, 10, 2, 11)];
    write_folder(
        &a,
        32,
        &[
            (
                shapes_prompt(Circle, LeftOf, Square),
                vec![
                    Sample::Image(left.clone()),
                    Sample::Image(right.clone()),
                    Sample::Missing,
                    Sample::Corrupt,
                ],
            ),
            (
                shapes_prompt(Star, Above, Heart),
                vec![
                    Sample::Image(above.clone()),
                    Sample::Image(above.clone()),
                    Sample::Image(star_only),
                    Sample::Image(above.clone()),
                ],
            ),
        ],
    );
    let stdout = ok(&["score", s(&a), "--images-per-prompt", "4"]);
    // 8 images; correct: P0 s0, P1 s0, s1, s3 = 4. Both found: P0 s0, s1; P1 s0, s1, s3 = 5.
    assert!(stdout.contains("position accuracy 50.0% (4/8)"), "{stdout}");
    let v = summary(&a.join("summary.json"));
    assert_eq!(v["detector"], "shapes");
    assert!(close(v["visor"]["oa"].as_f64().unwrap(), 5.0 / 8.0));
    assert!(close(v["visor"]["cond"].as_f64().unwrap(), 4.0 / 5.0));
    // Correct per prompt 1 and 3: ≥1 2/2, ≥2 1/2, ≥3 1/2, ≥4 0.
    assert_eq!(
        [1, 2, 3, 4].map(|n| v["visor"][format!("visor_{n}")].as_f64().unwrap()),
        [1.0, 0.5, 0.5, 0.0]
    );
    assert_eq!(v["missing_images"], 1);
    assert_eq!(v["unreadable_images"], 1);
    assert_eq!(v["error_counts"]["missing_image"], 1);
    assert_eq!(v["error_counts"]["undecodable_image"], 1);
    let errs = v["errors"].as_array().unwrap();
    assert!(errs.iter().any(|e| e["location"]
        .as_str()
        .unwrap()
        .ends_with("00000/samples/0002.png")));
    assert!(errs.iter().any(|e| e["location"]
        .as_str()
        .unwrap()
        .ends_with("00000/samples/0003.png")));
    let rs = read_results(&a.join("results.jsonl")).unwrap();
    let first = &rs[0];
    assert!(first.correct);
    let classes: Vec<&str> = first
        .detections
        .iter()
        .filter(|b| b.used)
        .map(|b| b.class.as_str())
        .collect();
    assert_eq!(classes.len(), 2, "{:?}", first.detections);

    // Run B: P0 all right (improved 1/4 → 4/4), P1 worse (3/4 → 0/4).
    let b = dir.path().join("b");
    write_folder(
        &b,
        32,
        &[
            (
                shapes_prompt(Circle, LeftOf, Square),
                (0..4).map(|_| Sample::Image(left.clone())).collect(),
            ),
            (
                shapes_prompt(Star, Above, Heart),
                (0..4)
                    .map(|_| Sample::Image(vec![(Star, 10, 19, 11), (Heart, 10, 2, 11)]))
                    .collect(),
            ),
        ],
    );
    let stdout = ok(&["score", s(&b), "--compare", s(&a.join("results.jsonl"))]);
    assert!(
        stdout.contains("improved (1):\n  1/4 -> 4/4  a photo of a circle left of a square"),
        "{stdout}"
    );
    assert!(
        stdout.contains("regressed (1):\n  3/4 -> 0/4  a photo of a star above a heart"),
        "{stdout}"
    );
    // Without a run.json the images per prompt default to the most any prompt has (4 here).
    let v = summary(&b.join("summary.json"));
    assert_eq!(v["images_per_prompt"], 4);
    assert!(close(v["position_accuracy"].as_f64().unwrap(), 0.5));
}

#[test]
fn bad_input_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    // No folder.
    let e = fails(&["score", s(&p.join("absent"))]);
    assert!(e.contains("absent") && e.contains("not a folder"), "{e}");
    // A folder that is not a GenEval layout.
    let e = fails(&["score", s(p)]);
    assert!(e.contains("not a GenEval image folder"), "{e}");
    // Detections without outputs named.
    let dets = p.join("d.jsonl");
    std::fs::write(&dets, "").unwrap();
    let e = fails(&["score", "--detections", s(&dets)]);
    assert!(e.contains("--out FILE is required"), "{e}");
    let e = fails(&[
        "score",
        "--detections",
        s(&dets),
        "--out",
        s(&p.join("r.jsonl")),
        "--summary",
        s(&p.join("s.json")),
    ]);
    assert!(e.contains("no detections lines"), "{e}");
    let e = fails(&[
        "score",
        "--detections",
        s(&p.join("none.jsonl")),
        "--out",
        s(&p.join("r.jsonl")),
        "--summary",
        s(&p.join("s.json")),
    ]);
    assert!(e.contains("none.jsonl"), "{e}");
    // Outputs in a folder that does not exist; same file twice.
    std::fs::write(
        &dets,
        line(
            &l2s_eval::prompts::position_prompt("dog", LeftOf, "cat").metadata,
            0,
            json!([]),
        ),
    )
    .unwrap();
    let e = fails(&[
        "score",
        "--detections",
        s(&dets),
        "--out",
        s(&p.join("no/r.jsonl")),
        "--summary",
        s(&p.join("s.json")),
    ]);
    assert!(e.contains("does not exist"), "{e}");
    let e = fails(&[
        "score",
        "--detections",
        s(&dets),
        "--out",
        s(&p.join("x")),
        "--summary",
        s(&p.join("x")),
    ]);
    assert!(e.contains("same file"), "{e}");
    // Bad thresholds and comparison files.
    let e = fails(&[
        "score",
        "--detections",
        s(&dets),
        "--out",
        s(&p.join("r.jsonl")),
        "--summary",
        s(&p.join("s.json")),
        "--min-score",
        "1.5",
    ]);
    assert!(e.contains("--min-score"), "{e}");
    let e = fails(&[
        "score",
        "--detections",
        s(&dets),
        "--out",
        s(&p.join("r.jsonl")),
        "--summary",
        s(&p.join("s.json")),
        "--compare",
        s(&dets),
    ]);
    assert!(
        e.contains("--compare") && e.contains("not a results line"),
        "{e}"
    );
    // Neither a folder nor a detections file: a usage error.
    let out = l2s(&["score"]);
    assert_eq!(out.status.code(), Some(2));
    // A file that is all problems fails, and its summary lists them.
    std::fs::write(&dets, "{oops\n[1,2]\n").unwrap();
    let e = fails(&[
        "score",
        "--detections",
        s(&dets),
        "--out",
        s(&p.join("r.jsonl")),
        "--summary",
        s(&p.join("s.json")),
    ]);
    assert!(
        e.contains("nothing could be scored; 2 problem(s)") && e.contains(":1: not JSON"),
        "{e}"
    );
    let v = summary(&p.join("s.json"));
    assert_eq!(v["images"], 0);
    assert_eq!(v["error_counts"]["bad_line"], 2);
}
