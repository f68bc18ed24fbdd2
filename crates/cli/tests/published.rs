//! The built-in classifier and the published ones through the command line: `--steer l2s` with
//! its schedule and `--preview`, `l2s classify`, `l2s attention --classifier-maps`, steering with a
//! published `.pth`, and the refusals.

use std::path::Path;

use l2s_generate::read_png_text;

mod run;
use run::{fails, fixture, ok, s};

const PROMPT: &str = "a dog to the right of a bear";

fn meta(path: &Path) -> std::collections::HashMap<String, String> {
    read_png_text(path).unwrap().into_iter().collect()
}

#[test]
fn steer_l2s_uses_the_builtin_classifier_and_its_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, preview) = (tmp.path().join("x.png"), tmp.path().join("p.png"));
    let prompt = "a star to the left of a heart";
    ok(&[
        "generate",
        "--prompt",
        prompt,
        "--steer",
        "l2s",
        "--seed",
        "2",
        "--out",
        s(&out),
        "--preview",
        s(&preview),
        "-q",
    ]);
    let m = meta(&out);
    assert_eq!(m["steer"], "l2s");
    assert_eq!(m["steps"], "20", "the schedule's sampling steps");
    let cfg: serde_json::Value = serde_json::from_str(&m["steer_config"]).unwrap();
    assert_eq!(cfg["max_iterations"], 3);
    assert_eq!(cfg["update"], "normalized");
    assert!(m["steer_iterations"].parse::<usize>().unwrap() > 0);

    // The preview: plain and steered side by side, each 32×32 image enlarged 8×.
    let sheet = image::open(&preview).unwrap().to_rgb8();
    assert!(
        sheet.width() >= 2 * 256 && sheet.height() >= 256,
        "{:?}",
        sheet.dimensions()
    );
    let steered = image::open(&out).unwrap().to_rgb8();
    let (w, h) = sheet.dimensions();
    // The steered image is the right-hand one: its top-left pixel block, bottom-aligned.
    let (x0, y0) = (w - 256, h - 256);
    for (x, y) in [(0u32, 0u32), (13, 7), (31, 31)] {
        assert_eq!(
            sheet.get_pixel(x0 + 8 * x + 3, y0 + 8 * y + 3),
            steered.get_pixel(x, y)
        );
    }

    // An explicit --steps wins over the schedule's.
    ok(&[
        "generate",
        "--prompt",
        prompt,
        "--steer",
        "l2s",
        "--steps",
        "6",
        "--out",
        s(&out),
        "-q",
    ]);
    assert_eq!(meta(&out)["steps"], "6");
}

#[test]
fn classify_prints_the_published_classifiers_logits() {
    let out = ok(&[
        "classify",
        "--classifier",
        s(&fixture("authors-classifier/sd.pth")),
        "--maps",
        s(&fixture("authors-classifier/sd.expected.safetensors")),
    ]);
    let exp = candle_core::safetensors::load(
        fixture("authors-classifier/sd.expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let want = exp["logits_f32"].to_vec2::<f32>().unwrap();
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), want.len());
    for (row, w) in rows.iter().zip(&want) {
        let got: Vec<f32> = serde_json::from_value(row["logits"].clone()).unwrap();
        for (g, e) in got.iter().zip(w) {
            assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "{got:?} vs {w:?}");
        }
        let p: Vec<f32> = serde_json::from_value(row["probabilities"].clone()).unwrap();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(row["relation"].is_string());
    }
}

#[test]
fn attention_writes_what_classify_reads_and_a_published_pth_steers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("sd1-tiny/model");
    let clf = fixture("authors-classifier/sd1-tiny-steer.pth");
    let maps = tmp.path().join("maps.safetensors");
    ok(&[
        "attention",
        "--model",
        s(&model),
        "--prompt",
        PROMPT,
        "--words",
        "dog,bear",
        "--steps",
        "6",
        "--at-steps",
        "1,3",
        "--out",
        s(&tmp.path().join("a.png")),
        "--classifier-maps",
        s(&maps),
        "-q",
    ]);
    let t = candle_core::safetensors::load(&maps, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["maps"].dims(), &[2, 2, 14, 16, 16]);
    assert_eq!(t["steps"].to_vec1::<i64>().unwrap(), vec![1, 3]);
    let rows = ok(&["classify", "--classifier", s(&clf), "--maps", s(&maps)]);
    assert_eq!(rows.lines().count(), 2);

    let out = tmp.path().join("steered.png");
    ok(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        PROMPT,
        "--steps",
        "6",
        "--steer",
        s(&clf),
        "--out",
        s(&out),
        "-q",
    ]);
    let m = meta(&out);
    assert!(m["steer_iterations"].parse::<usize>().unwrap() > 0, "{m:?}");
    // The paper's schedule: the first half of the steps, 16 iterations.
    let cfg: serde_json::Value = serde_json::from_str(&m["steer_config"]).unwrap();
    assert_eq!(
        (cfg["steer_steps"].as_u64(), cfg["max_iterations"].as_u64()),
        (Some(3), Some(16))
    );
}

#[test]
fn published_classifiers_of_another_model_and_bad_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let run = |model: &str, clf: &str| {
        fails(&[
            "generate",
            "--model",
            s(&fixture(model)),
            "--prompt",
            PROMPT,
            "--steps",
            "4",
            "--steer",
            s(&fixture(clf)),
            "--out",
            s(&out),
            "-q",
        ])
    };
    let err = run(
        "flux-schnell-tiny/model",
        "authors-classifier/sd1-tiny-steer.pth",
    );
    assert!(
        err.contains("sd1-tiny-steer.pth") && err.contains("FLUX") && err.contains("16×16"),
        "{err}"
    );
    let err = run("sd1-tiny/model", "authors-classifier/flux.pth");
    assert!(
        err.contains("flux.pth") && err.contains("Stable Diffusion"),
        "{err}"
    );
    let err = run("sd1-tiny/model", "authors-classifier/unet_state_dict.pth");
    assert!(
        err.contains("unet_state_dict.pth") && err.contains("not a relation classifier"),
        "{err}"
    );
    let err = run("sd1-tiny/model", "torch-pickle/malicious_system.pth");
    assert!(
        err.contains("malicious_system.pth") && err.contains("system"),
        "{err}"
    );
    let err = run("sd1-tiny/model", "torch-pickle/truncated.pth");
    assert!(err.contains("truncated.pth"), "{err}");
    assert!(!out.exists());
}
