//! Bad input and shared use: clear errors (never a panic, a silent wrong result or lost files),
//! one process per output folder, and `--shard auto` from a scheduler's environment.

mod run;

use std::fs;
use std::path::Path;

use run::*;

fn tiny() -> String {
    fixture("sd1-tiny/model").display().to_string()
}

/// Every file under `root`, relative paths sorted.
fn files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn eval_args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "eval",
        "--model",
        model,
        "--generate-prompts",
        "3",
        "--images-per-prompt",
        "1",
        "--steps",
        "2",
        "--out",
        out,
        "-q",
    ];
    v.extend_from_slice(extra);
    v
}

fn slurm(id: &str) -> Vec<(&str, &str)> {
    vec![
        ("SLURM_ARRAY_TASK_ID", id),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
        ("SLURM_ARRAY_TASK_MIN", "0"),
        ("SLURM_ARRAY_TASK_MAX", "2"),
        ("SLURM_ARRAY_TASK_STEP", "1"),
    ]
}

#[test]
fn eval_shard_auto_takes_its_part_from_the_scheduler() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let m = tiny();
    let args = eval_args(&m, s(&out), &["--shard", "auto"]);
    let o = l2s_env(&args, &slurm("1"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("shard 2/3: 1 of 3 prompts"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(out.join("00001/samples/0000.png").is_file());
    assert!(!out.join("00000").exists() && !out.join("00002").exists());
    // Kubernetes: the 0-based index and the count from L2S_SHARD_COUNT or auto/N.
    let args = eval_args(&m, s(&out), &["--shard", "auto/3"]);
    let o = l2s_env(&args, &[("JOB_COMPLETION_INDEX", "2")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("00002/samples/0000.png").is_file());
    assert!(!out.join("00000").exists());
    // Nothing to read, or two schedulers that disagree: refused before any work.
    let fresh = tmp.path().join("fresh");
    let args = eval_args(&m, s(&fresh), &["--shard", "auto"]);
    let e = fails(&args);
    assert!(
        e.contains("SLURM_ARRAY_TASK_ID") && e.contains("JOB_COMPLETION_INDEX"),
        "{e}"
    );
    let mut both = slurm("0");
    both.extend([("JOB_COMPLETION_INDEX", "1"), ("L2S_SHARD_COUNT", "3")]);
    let e = fails_env(&args, &both);
    assert!(e.contains("disagree"), "{e}");
    assert!(!fresh.exists());
}

/// A lock file naming this test process, which is alive, on this host.
fn hold(dir: &Path, name: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(
        dir.join(name),
        format!(
            "pid={}\nhost={}\n",
            std::process::id(),
            l2s_files::host_name()
        ),
    )
    .unwrap();
}

#[test]
fn a_second_process_on_one_output_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny();
    let out = tmp.path().join("eval");
    hold(&out, ".l2s.lock");
    let e = fails(&eval_args(&m, s(&out), &[]));
    let holder = format!(
        "process {} on {}",
        std::process::id(),
        l2s_files::host_name()
    );
    assert!(
        e.contains(&out.display().to_string()) && e.contains(&holder) && e.contains(".l2s.lock"),
        "{e}"
    );
    assert_eq!(files(&out), [".l2s.lock"]);
    // The shards of one run share a folder: each locks its own part.
    hold(&out, ".l2s.shard-2-of-3.lock");
    ok(&eval_args(&m, s(&out), &["--shard", "1/3"]));
    let e = fails(&eval_args(&m, s(&out), &["--shard", "2/3"]));
    assert!(
        e.contains(".l2s.shard-2-of-3.lock") && e.contains(&holder),
        "{e}"
    );

    let shapes = tmp.path().join("shapes-run");
    hold(&shapes, ".l2s.lock");
    let e = fails(&["shapes", "train", "--out", s(&shapes), "--steps", "1"]);
    assert!(e.contains(&holder), "{e}");
    assert_eq!(files(&shapes), [".l2s.lock"]);

    let clf = tmp.path().join("clf");
    hold(&clf, ".l2s.lock");
    let data = fixture("authors-classifier");
    let e = fails(&["train", "--data", s(&data), "--out", s(&clf)]);
    assert!(e.contains(&holder), "{e}");
    assert_eq!(files(&clf), [".l2s.lock"]);
}

#[test]
fn a_lock_left_by_a_dead_process_is_taken_over_with_a_note() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("eval");
    fs::create_dir_all(&out).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    fs::write(
        out.join(".l2s.lock"),
        format!("pid={pid}\nhost={}\n", l2s_files::host_name()),
    )
    .unwrap();
    let m = tiny();
    let o = l2s(&eval_args(&m, s(&out), &[]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("took over the lock left by process {pid}")),
        "{stderr}"
    );
    assert!(!out.join(".l2s.lock").exists());
}

/// Writes a safetensors file with one f32 tensor `latents`.
fn latents_file(path: &Path, shape: &[usize], first: f32) {
    let n: usize = shape.iter().product();
    let mut v = vec![0f32; n];
    v[0] = first;
    let t = candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("latents".to_string(), t)].into_iter().collect(), path)
        .unwrap();
}

#[test]
fn generate_refuses_bad_numbers_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny();
    let png = tmp.path().join("a.png");
    let gen = |extra: &[&str]| {
        let mut v = vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            "a dog to the left of a cat",
            "--steps",
            "2",
            "--out",
            s(&png),
        ];
        v.extend_from_slice(extra);
        fails(&v)
    };
    for (extra, expect) in [
        (
            &["--width", "18446744073709551608"][..],
            "largest side, 8192 px",
        ),
        (
            &["--width", "4294967296", "--height", "4294967296"],
            "largest side",
        ),
        (&["--width", "100000", "--height", "100000"], "largest side"),
        (&["--width", "8192", "--height", "8192"], "pixel budget"),
        (
            &["--steer", "centroid", "--step-size", "nan"],
            "--step-size NaN",
        ),
        (
            &["--steer", "centroid", "--step-size=-1e30"],
            "--step-size -1e30",
        ),
        (&["--step-size=-1"], "expected a number > 0"),
        (
            &["--steer", "centroid", "--relation", "dog,left of,dog"],
            "the same word \"dog\"",
        ),
    ] {
        let e = gen(extra);
        assert!(e.contains(expect), "{extra:?}: {e}");
    }
    for (name, first) in [
        ("nan.safetensors", f32::NAN),
        ("inf.safetensors", f32::INFINITY),
    ] {
        let p = tmp.path().join(name);
        latents_file(&p, &[1, 4, 16, 16], first);
        let e = gen(&["--init-latents", s(&p)]);
        assert!(
            e.contains("initial latents") && e.contains("1 of 1024 values are not finite"),
            "{e}"
        );
    }
    assert!(!png.exists());
    let e = fails(&[
        "attention",
        "--model",
        &m,
        "--prompt",
        "a dog",
        "--words",
        "dog",
        "--steps",
        "1",
        "--map-size",
        "100000",
        "--out",
        s(&png),
    ]);
    assert!(e.contains("--map-size") && e.contains("1..=1024"), "{e}");
    assert_eq!(files(tmp.path()), ["inf.safetensors", "nan.safetensors"]);
}

#[test]
fn generate_out_must_be_a_png_or_a_folder_and_a_failed_run_leaves_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny();
    let base = [
        "generate",
        "--model",
        m.as_str(),
        "--prompt",
        "a dog",
        "--steps",
        "1",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|x| x.to_string()).collect()
    };
    let run = |v: Vec<String>| fails(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let jpg = tmp.path().join("x.jpg");
    let e = run(with(&["--out", s(&jpg)]));
    assert!(e.contains("PNG only, not .jpg"), "{e}");
    let folder = tmp.path().join("several");
    let bad = tmp.path().join("bad.safetensors");
    latents_file(&bad, &[2, 4, 16, 16], f32::NAN);
    let e = run(with(&[
        "--num-images",
        "2",
        "--init-latents",
        s(&bad),
        "--out",
        s(&folder),
    ]));
    assert!(e.contains("not finite"), "{e}");
    let dir_as_file = tmp.path().join("d.png");
    fs::create_dir(&dir_as_file).unwrap();
    let e = run(with(&["--out", s(&dir_as_file)]));
    assert!(e.contains("is a folder, not a .png file"), "{e}");
    assert_eq!(files(tmp.path()), ["bad.safetensors"]);
    assert!(!jpg.exists() && !folder.exists());
}

#[test]
fn a_nul_in_a_prompt_never_reaches_a_png() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    fs::write(
        &prompts,
        "{\"tag\":\"position\",\"include\":[{\"class\":\"dog\",\"count\":1},{\"class\":\"cat\",\"count\":1,\"position\":[\"left of\",0]}],\"prompt\":\"a photo of a dog\\u0000 left of a cat\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("run");
    let m = tiny();
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--prompts",
        s(&prompts),
        "--images-per-prompt",
        "1",
        "--steps",
        "1",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("NUL character"), "{e}");
    assert!(!out.exists(), "{:?}", files(&out));
}

#[test]
fn counts_that_would_fill_the_memory_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let m = tiny();
    let e = fails(&[
        "eval",
        "--model",
        &m,
        "--generate-prompts",
        "3",
        "--images-per-prompt",
        "1000000000000",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("expected at most 10000"), "{e}");
    assert!(!out.exists());
    let e = fails(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "a dog",
        "--num-images",
        "1000000000000",
        "--out",
        s(&out),
    ]);
    assert!(
        e.contains("--num-images 1000000000000: expected at most 10000"),
        "{e}"
    );
    assert!(!out.exists());
    ok(&eval_args(&m, s(&out), &[]));
    let e = fails(&[
        "score",
        s(&out),
        "--images-per-prompt",
        "1000000000000",
        "-q",
    ]);
    assert!(
        e.contains("expected at most 10000 images per prompt"),
        "{e}"
    );
    assert!(!out.join("results.jsonl").exists());
}

/// A scored run of three prompts, one image each.
fn scored_run(root: &Path) -> std::path::PathBuf {
    let out = root.join("run");
    let m = tiny();
    ok(&eval_args(&m, s(&out), &[]));
    ok(&["score", s(&out), "-q"]);
    out
}

fn edit_results(run: &Path, f: impl Fn(usize, &mut serde_json::Value)) {
    let path = run.join("results.jsonl");
    let text: String = fs::read_to_string(&path)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            f(i, &mut v);
            v.to_string() + "\n"
        })
        .collect();
    fs::write(&path, text).unwrap();
}

#[test]
fn results_naming_files_outside_their_folder_or_devices_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = scored_run(tmp.path());
    let html = tmp.path().join("r.html");
    for (name, expect) in [
        ("../../../../etc/passwd", "a path with `..`"),
        ("/dev/zero", "an absolute path"),
    ] {
        let copy = tmp.path().join(format!("copy{}", expect.len()));
        copy_tree(&run, &copy);
        edit_results(&copy, |i, v| {
            if i == 1 {
                v["filename"] = name.into();
            }
        });
        let e = fails(&["report", s(&copy), "--out", s(&html)]);
        assert!(e.contains("results.jsonl:2") && e.contains(expect), "{e}");
        let e = fails(&[
            "score",
            s(&run),
            "--compare",
            s(&copy.join("results.jsonl")),
            "-q",
        ]);
        assert!(e.contains("--compare") && e.contains(expect), "{e}");
    }
    assert!(!html.exists());
    // A results file or an image that is a device: refused or counted unreadable, never read.
    let dev = tmp.path().join("dev");
    copy_tree(&run, &dev);
    fs::remove_file(dev.join("00000/samples/0000.png")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dev.join("00000/samples/0000.png")).unwrap();
    let o = l2s(&["report", s(&dev), "--out", s(&html)]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("a character device"), "{stderr}");
    assert_eq!(stderr.matches("0000.png").count(), 1, "{stderr}");
    let o = l2s(&["score", s(&dev), "-q"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("a character device"), "{stdout}");
    fs::remove_file(dev.join("results.jsonl")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dev.join("results.jsonl")).unwrap();
    let e = fails(&["report", s(&dev), "--out", s(&html)]);
    assert!(e.contains("not a regular file (a character device)"), "{e}");
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn a_cut_short_png_in_an_eval_folder_is_made_again() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let m = tiny();
    ok(&eval_args(&m, s(&out), &[]));
    let image = out.join("00001/samples/0000.png");
    let whole = fs::read(&image).unwrap();
    fs::write(&image, &whole[..whole.len() / 2]).unwrap();
    let o = l2s(&eval_args(&m, s(&out), &[]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("1 images generated, 2 already present"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        stderr.contains("not a readable PNG; generating it again"),
        "{stderr}"
    );
    assert_eq!(fs::read(&image).unwrap(), whole);
}

#[test]
fn shapes_render_leaves_no_image_of_an_earlier_larger_render() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shapes");
    ok(&["shapes", "render", "--count", "5", "--out", s(&out)]);
    fs::write(out.join("images/notes.txt"), "mine").unwrap();
    fs::write(out.join("images/cover.png"), "mine too").unwrap();
    ok(&["shapes", "render", "--count", "2", "--out", s(&out)]);
    assert_eq!(
        files(&out),
        [
            "annotations.json",
            "images/000000.png",
            "images/000001.png",
            "images/cover.png",
            "images/notes.txt",
            "relations.jsonl",
        ]
    );
}

#[test]
fn data_build_never_writes_into_a_folder_of_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("shapes");
    ok(&["shapes", "render", "--count", "2", "--out", s(&images)]);
    let out = tmp.path().join("mine");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("shard-00000.safetensors"), "my own file").unwrap();
    fs::write(out.join("thesis.tex"), "chapter 1").unwrap();
    let e = fails(&[
        "data",
        "build",
        "--images",
        s(&images),
        "--out",
        s(&out),
        "--steps",
        "2",
    ]);
    assert!(
        e.contains("holds no dataset") && e.contains(&out.display().to_string()),
        "{e}"
    );
    assert_eq!(files(&out), ["shard-00000.safetensors", "thesis.tex"]);
    assert_eq!(
        fs::read_to_string(out.join("shard-00000.safetensors")).unwrap(),
        "my own file"
    );
}

#[test]
fn an_image_path_leaving_the_folder_or_a_broken_png_is_named_once() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("shapes");
    ok(&["shapes", "render", "--count", "2", "--out", s(&images)]);
    let ann = images.join("annotations.json");
    let original = fs::read_to_string(&ann).unwrap();
    for name in ["../../etc/passwd", "/etc/passwd"] {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        v["images"][0]["file_name"] = name.into();
        fs::write(&ann, v.to_string()).unwrap();
        let e = fails(&[
            "data",
            "build",
            "--images",
            s(&images),
            "--out",
            s(&tmp.path().join("d")),
        ]);
        assert!(e.contains(&format!("file_name {name:?}")), "{e}");
    }
    fs::write(&ann, original).unwrap();
    fs::write(images.join("images/000001.png"), "not a png at all").unwrap();
    let e = fails(&[
        "data",
        "build",
        "--images",
        s(&images),
        "--out",
        s(&tmp.path().join("d")),
    ]);
    assert!(e.contains("000001.png"), "{e}");
    assert_eq!(e.matches("Invalid PNG signature").count(), 1, "{e}");
    assert!(!tmp.path().join("d").exists());
}
