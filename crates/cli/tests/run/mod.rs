//! Running the `l2s` binary from the command-line tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A path under the repository's `fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

/// The scheduler variables `--shard auto` reads: removed so a test run inside a job array
/// behaves as anywhere else.
const SCHEDULER_VARS: [&str; 7] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
    "L2S_SHARD_COUNT",
];

/// Runs `l2s` with `args`, without the caller's model, log or scheduler settings.
pub fn l2s(args: &[&str]) -> Output {
    l2s_env(args, &[])
}

/// [`l2s`] with these environment variables set.
pub fn l2s_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l2s"));
    cmd.args(args)
        .env_remove("L2S_MODEL")
        .env_remove("RUST_LOG");
    for v in SCHEDULER_VARS {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running l2s")
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = l2s(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "l2s {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail cleanly (no panic); returns its stderr.
pub fn fails(args: &[&str]) -> String {
    fails_env(args, &[])
}

/// [`fails`] with these environment variables set; the exit code must be 1 (an error) or 2
/// (bad arguments), never a panic's 101.
pub fn fails_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = l2s_env(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "l2s {args:?} should fail");
    assert!(
        matches!(out.status.code(), Some(1) | Some(2)),
        "l2s {args:?}: exit {:?}: {stderr}",
        out.status.code()
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `root` with its bytes, by relative path.
pub fn contents(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}
