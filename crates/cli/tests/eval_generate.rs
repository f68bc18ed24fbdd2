//! `l2s eval` on the tiny fixture model (its images are noise; the plumbing is what is tested):
//! GenEval's layout, metadata, resuming after an interruption, shards, and bad input.

mod eval_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use eval_support::*;
use l2s_eval::layout::{image_seed, sample_path};

/// Every file under `root`, relative path → bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn text_chunks(path: &Path) -> BTreeMap<String, String> {
    l2s_generate::read_png_text(path)
        .unwrap()
        .into_iter()
        .collect()
}

fn eval_args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "eval",
        "--model",
        model,
        "--generate-prompts",
        "3",
        "--images-per-prompt",
        "2",
        "--steps",
        "2",
        "--seed",
        "10",
        "--out",
        out,
        "-q",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn layout_metadata_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let m = fixture_model();
    let stdout = ok(&eval_args(&m, s(&out), &[]));
    assert!(
        stdout.contains("6 images generated, 0 already present"),
        "{stdout}"
    );
    let full = snapshot(&out);
    // GenEval's layout plus the run's settings and prompt list.
    let names: Vec<String> = full.keys().map(|p| p.display().to_string()).collect();
    assert_eq!(
        names,
        [
            "00000/metadata.jsonl",
            "00000/samples/0000.png",
            "00000/samples/0001.png",
            "00001/metadata.jsonl",
            "00001/samples/0000.png",
            "00001/samples/0001.png",
            "00002/metadata.jsonl",
            "00002/samples/0000.png",
            "00002/samples/0001.png",
            "prompts.jsonl",
            "run.json",
        ]
    );
    let prompts: Vec<String> = std::fs::read_to_string(out.join("prompts.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(prompts.len(), 3);
    for (i, line) in prompts.iter().enumerate() {
        let meta = std::fs::read_to_string(out.join(format!("{i:05}/metadata.jsonl"))).unwrap();
        assert_eq!(meta.trim_end(), line);
        let p = l2s_eval::prompts::SpatialPrompt::from_line(line)
            .unwrap()
            .unwrap();
        assert_eq!(p.tag, "position");
        assert!(
            l2s_eval::prompts::COCO_CLASSES.contains(&p.include[0].class.as_str()),
            "{line}"
        );
        for j in 0..2 {
            let t = text_chunks(&sample_path(&out, i, j));
            assert_eq!(t["prompt"], p.prompt);
            assert_eq!(t["seed"], image_seed(10, i, j, 2).to_string());
            assert_eq!(t["method"], "base");
            assert_eq!(t["prompt_index"], i.to_string());
            assert_eq!(t["sample"], j.to_string());
            assert_eq!(t["geneval_metadata"], *line);
        }
    }
    let run: serde_json::Value = serde_json::from_slice(&full[Path::new("run.json")]).unwrap();
    assert_eq!(run["images_per_prompt"], 2);
    assert_eq!(run["prompts"], 3);
    assert_eq!(run["method"], "base");

    // Interrupt: delete half of the samples, rerun, same bytes; the kept files are not rewritten.
    let gone = [(0, 1), (1, 0), (2, 1)];
    for (i, j) in gone {
        std::fs::remove_file(sample_path(&out, i, j)).unwrap();
    }
    let kept = sample_path(&out, 0, 0);
    let before = std::fs::metadata(&kept).unwrap().modified().unwrap();
    let stdout = ok(&eval_args(&m, s(&out), &[]));
    assert!(
        stdout.contains("3 images generated, 3 already present"),
        "{stdout}"
    );
    assert_eq!(snapshot(&out), full);
    assert_eq!(
        std::fs::metadata(&kept).unwrap().modified().unwrap(),
        before
    );
    // Nothing left to do.
    assert!(ok(&eval_args(&m, s(&out), &[])).contains("0 images generated, 6 already present"));

    // Shards into one folder give the same files as the whole run.
    let sharded = dir.path().join("sharded");
    let st = ok(&eval_args(&m, s(&sharded), &["--shard", "2/2"]));
    assert!(st.contains("shard 2/2: 1 of 3 prompts"), "{st}");
    assert!(!sharded.join("00000").exists() && sharded.join("00001").exists());
    ok(&eval_args(&m, s(&sharded), &["--shard", "1/2"]));
    assert_eq!(snapshot(&sharded), full);

    // The same folder with other settings is refused.
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--generate-prompts",
        "3",
        "--images-per-prompt",
        "2",
        "--steps",
        "3",
        "--seed",
        "10",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("other settings") && e.contains("steps"), "{e}");
    let e = fails(&eval_args(&m, s(&out), &["--prompt-seed", "1"]));
    assert!(e.contains("prompt_source"), "{e}");

    // Scoring the noise images: every image judged (all wrong), and the COCO classes the
    // shapes detector cannot see are reported once per prompt.
    ok(&["score", s(&out)]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(v["images"], 6);
    assert_eq!(v["method"], "base");
    assert_eq!(v["error_counts"]["class_unknown_to_detector"], 3);
}

#[test]
fn steered_run_records_the_loss_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("steered");
    let m = fixture_model();
    let args = [
        "eval",
        "--model",
        &m,
        "--generate-prompts",
        "2",
        "--images-per-prompt",
        "2",
        "--steps",
        "3",
        "--steer",
        "centroid",
        "--out",
        s(&out),
        "-q",
    ];
    ok(&args);
    let full = snapshot(&out);
    let t = text_chunks(&sample_path(&out, 1, 1));
    assert_eq!(t["method"], "centroid");
    assert!(t["steer_final_loss"].parse::<f64>().unwrap().is_finite());
    assert!(t.contains_key("steer_config"));
    std::fs::remove_file(sample_path(&out, 0, 0)).unwrap();
    std::fs::remove_file(sample_path(&out, 1, 1)).unwrap();
    assert!(ok(&args).contains("2 images generated, 2 already present"));
    assert_eq!(snapshot(&out), full);
    // A GenEval prompt file: every task's lines used, the spatial one steered, the others
    // sampled plainly; a tag of no task listed with its line.
    let file = dir.path().join("meta.jsonl");
    std::fs::write(
        &file,
        [
            r#"{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}"#,
            r#"{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}"#,
            r#"{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"}"#,
            r#"{"tag": "texture", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a glass cat"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let from_file = dir.path().join("from-file");
    let o = l2s(&[
        "eval",
        "--model",
        &m,
        "--prompts",
        s(&file),
        "--images-per-prompt",
        "1",
        "--steps",
        "2",
        "--steer",
        "centroid",
        "--out",
        s(&from_file),
        "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("1 line tagged \"texture\" left out") && stderr.contains("line 4"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 of 3 prompts name no relation"),
        "{stderr}"
    );
    for (i, steered) in [(0, false), (1, true), (2, false)] {
        let t = text_chunks(&sample_path(&from_file, i, 0));
        assert_eq!(t.contains_key("steer_final_loss"), steered, "prompt {i}");
        assert_eq!(
            t.get("steer_skipped").map(String::as_str),
            (!steered).then_some("no relation in the prompt"),
            "prompt {i}"
        );
    }
    assert!(!from_file.join("00003").exists());
}

#[test]
fn bad_input_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture_model();
    let out = dir.path().join("o");
    let o = s(&out);
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--generate-prompts",
        "2",
        "--images-per-prompt",
        "0",
        "--out",
        o,
    ]);
    assert!(e.contains("--images-per-prompt 0"), "{e}");
    for shard in ["0/2", "3/2", "x"] {
        let e = fails(&[
            "eval",
            "--model",
            &m,
            "--generate-prompts",
            "2",
            "--shard",
            shard,
            "--out",
            o,
        ]);
        assert!(e.contains("--shard") && e.contains("i/n"), "{e}");
    }
    let e = fails(&["eval", "--model", &m, "--generate-prompts", "0", "--out", o]);
    assert!(e.contains("--generate-prompts 0"), "{e}");
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--generate-prompts",
        "300",
        "--classes",
        "shapes",
        "--out",
        o,
    ]);
    assert!(e.contains("224"), "{e}");
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--prompts",
        s(&dir.path().join("absent.jsonl")),
        "--out",
        o,
    ]);
    assert!(e.contains("absent.jsonl"), "{e}");
    let only_other = dir.path().join("other.jsonl");
    std::fs::write(&only_other, r#"{"tag": "texture", "include": [{"class": "car", "count": 1}], "prompt": "a photo of a furry car"}"#).unwrap();
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--prompts",
        s(&only_other),
        "--out",
        o,
    ]);
    assert!(e.contains("no line of a GenEval task"), "{e}");
    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"tag\": \"position\", \"prompt\": \"x\", \"include\": [{\"class\": \"a\"}, {\"class\": \"b\", \"position\": [\"near\", 0]}]}\n").unwrap();
    let e = fails(&["eval", "--model", &m, "--prompts", s(&broken), "--out", o]);
    assert!(e.contains("broken.jsonl:1") && e.contains("near"), "{e}");
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--generate-prompts",
        "2",
        "--steer",
        s(&dir.path().join("no-classifier")),
        "--out",
        o,
    ]);
    assert!(e.contains("no-classifier"), "{e}");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--generate-prompts",
        "2",
        "--out",
        s(&file),
    ]);
    assert!(e.contains("not a folder"), "{e}");
    // Neither --prompts nor --generate-prompts, or both: usage errors.
    assert_eq!(
        l2s(&["eval", "--model", &m, "--out", o]).status.code(),
        Some(2)
    );
    assert_eq!(
        l2s(&[
            "eval",
            "--model",
            &m,
            "--prompts",
            "x",
            "--generate-prompts",
            "2",
            "--out",
            o
        ])
        .status
        .code(),
        Some(2)
    );
    assert!(!out.exists(), "a refused run leaves nothing behind");
}

/// The prompt parser behind `l2s generate --steer` reads the generated prompts' texts into the
/// same triplets their metadata lists, so steering from the text or from the metadata agrees.
#[test]
fn generated_prompt_texts_parse_to_their_metadata() {
    use l2s_eval::prompts::{
        multi_relation_prompts, position_prompts, MultiRelationSpec, COCO_CLASSES, SHAPES_CLASSES,
    };
    let mut all = position_prompts(300, &COCO_CLASSES, 1).unwrap();
    all.extend(position_prompts(50, &SHAPES_CLASSES, 1).unwrap());
    all.extend(
        multi_relation_prompts(300, &COCO_CLASSES, 2, MultiRelationSpec::default()).unwrap(),
    );
    for p in &all {
        let parsed = l2s_steer::relations::parse_prompt(&p.prompt)
            .unwrap_or_else(|e| panic!("{}: {e}", p.prompt));
        let mut got: Vec<(String, String, String)> = parsed
            .iter()
            .map(|t| {
                (
                    t.subject.clone(),
                    t.relation.name().to_string(),
                    t.object.clone(),
                )
            })
            .collect();
        let mut want: Vec<(String, String, String)> = p
            .triplets()
            .iter()
            .map(|t| {
                (
                    t.subject.clone(),
                    t.relation.name().to_string(),
                    t.object.clone(),
                )
            })
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{}", p.prompt);
    }
}

#[test]
fn several_workers_write_the_same_files_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture_model();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let (one_s, two_s) = (one.display().to_string(), two.display().to_string());
    ok(&eval_args(
        &model,
        &one_s,
        &["--workers", "1", "--steer", "centroid"],
    ));
    ok(&eval_args(
        &model,
        &two_s,
        &["--workers", "2", "--steer", "centroid"],
    ));
    let (a, b) = (snapshot(&one), snapshot(&two));
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= 6 + 3 + 2, "{:?}", a.keys().collect::<Vec<_>>());
    for (path, bytes) in &a {
        assert!(b.get(path) == Some(bytes), "{} differs", path.display());
    }
}

/// `--geneval`: GenEval's 553 prompts in its order and folder numbering (here one shard of 100:
/// prompts 0, 100, …, 500: one of each task), every metadata line as GenEval's file has it.
#[test]
fn genevals_own_prompts_are_built_in() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("geneval");
    let printed = ok(&[
        "eval",
        "--geneval",
        "--shard",
        "1/100",
        "--images-per-prompt",
        "1",
        "--steps",
        "1",
        "--out",
        s(&out),
        "-q",
    ]);
    assert!(printed.contains("6 of 553 prompts"), "{printed}");
    let all = l2s_eval::prompts::geneval_prompts();
    let mut tags = Vec::new();
    for i in (0..553).step_by(100) {
        let line = std::fs::read_to_string(out.join(format!("{i:05}/metadata.jsonl"))).unwrap();
        assert_eq!(line, all[i].metadata_line() + "\n");
        assert!(sample_path(&out, i, 0).exists());
        tags.push(all[i].tag.clone());
    }
    assert!(!out.join("00001").exists());
    assert_eq!(tags, l2s_eval::tasks::GENEVAL_TAGS);
    let e = fails(&[
        "eval",
        "--geneval",
        "--generate-prompts",
        "2",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
}
