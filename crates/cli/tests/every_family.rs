//! Every command on every model family: the tiny SD1-style, SD2-style, FLUX.1-dev-style and
//! FLUX.1-schnell-style fixtures through `data build`, `train`, `eval`, `score` and `bench
//! shapes` (which runs the same library calls), and `l2s report` on what the bench wrote.

use std::path::{Path, PathBuf};

mod run;
use run::{fixture, ok, s};

const FIXTURES: [&str; 4] = ["sd1-tiny", "sd2-tiny", "flux-dev-tiny", "flux-schnell-tiny"];

fn model(name: &str) -> PathBuf {
    fixture(name).join("model")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn data_build_train_eval_and_score_run_for_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    ok(&[
        "shapes",
        "render",
        "--count",
        "3",
        "--min-objects",
        "2",
        "--max-objects",
        "2",
        "--out",
        s(&images),
        "-q",
    ]);
    for name in FIXTURES {
        let m = model(name);
        let dir = tmp.path().join(name);
        let data = dir.join("data");
        ok(&[
            "data",
            "build",
            "--model",
            s(&m),
            "--images",
            s(&images),
            "--out",
            s(&data),
            "--steps",
            "4",
            "--fixed-point",
            "0",
            "--min-psnr",
            "0",
            "-q",
        ]);
        let clf = dir.join("clf");
        ok(&[
            "train",
            "--data",
            s(&data),
            "--out",
            s(&clf),
            "--epochs",
            "1",
            "-q",
        ]);
        let info = json(&clf.join("classifier.json"));
        let id = info["model"].as_str().unwrap().to_string();
        assert!(
            id.starts_with(if name.starts_with("flux") {
                "flux-"
            } else {
                "unet-"
            }),
            "{name}: {id}"
        );

        let run = dir.join("eval");
        ok(&[
            "eval",
            "--model",
            s(&m),
            "--generate-prompts",
            "2",
            "--classes",
            "shapes",
            "--images-per-prompt",
            "1",
            "--steps",
            "4",
            "--steer",
            s(&clf),
            "--steer-steps",
            "1",
            "--steer-iterations",
            "1",
            "--out",
            s(&run),
            "-q",
        ]);
        assert!(run.join("00001/samples/0000.png").is_file(), "{name}");
        let run_info = json(&run.join("run.json"));
        assert_eq!(run_info["steps"], 4);
        ok(&["score", s(&run)]);
        let summary = json(&run.join("summary.json"));
        assert_eq!(summary["images"], 2, "{name}: {summary}");
    }
}

#[test]
fn bench_runs_on_every_family_and_report_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let work = tmp.path().join(name);
        let table = ok(&[
            "bench",
            "shapes",
            "--model",
            s(&model(name)),
            "--work",
            s(&work),
            "--methods",
            "base,l2s-dual",
            "--prompts",
            "2",
            "--seeds",
            "1",
            "--steps",
            "4",
            "--train-images",
            "4",
            "--epochs",
            "1",
            "--min-psnr",
            "0",
            "--check-relation",
            "false",
            "-q",
        ]);
        assert!(
            table.contains("| base |") && table.contains("| l2s-dual |"),
            "{table}"
        );
        // Each method is a GenEval-layout run, scored in place.
        for method in ["base", "l2s-dual"] {
            let run = work.join(format!("eval-{method}"));
            assert_eq!(json(&run.join("run.json"))["method"], method);
            assert_eq!(json(&run.join("summary.json"))["images"], 2);
            assert!(run.join("results.jsonl").is_file());
        }
        let report = work.join("report.html");
        ok(&[
            "report",
            s(&work.join("eval-base")),
            s(&work.join("eval-l2s-dual")),
            "--out",
            s(&report),
        ]);
        let html = std::fs::read_to_string(&report).unwrap();
        assert!(html.contains("l2s-dual"), "{name}");
    }
}
