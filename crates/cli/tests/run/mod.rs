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

/// Runs `l2s` with `args`, without the caller's model or log settings.
pub fn l2s(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_l2s"))
        .args(args)
        .env_remove("L2S_MODEL")
        .env_remove("RUST_LOG")
        .output()
        .expect("running l2s")
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
    let out = l2s(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "l2s {args:?} should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
