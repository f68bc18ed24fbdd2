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
