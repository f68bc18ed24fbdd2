//! A full disk, simulated with a file-size limit (`ulimit -f`, with SIGXFSZ ignored so a write
//! past it fails with EFBIG as on a full disk, instead of killing the process): the error names
//! the file, what was written before stays whole (no temporary or half-written file), and a
//! rerun without the limit finishes with exactly what an uninterrupted run writes.

mod run;

use std::path::Path;
use std::process::{Command, Output};

use run::*;

/// `l2s args` with every file it writes limited to `kib` KiB.
fn l2s_limited(kib: u64, args: &[&str]) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_l2s"))
        .args(args)
        .env_remove("L2S_MODEL")
        .env_remove("RUST_LOG")
        .output()
        .expect("running l2s under bash")
}

/// Runs `args(out)` under the limit: it must fail naming a file under `out` whose name ends in
/// `file_end`, leaving at least the files `left`, each (as every file left) whole, as the
/// uninterrupted run `reference` wrote it. Then reruns it without the limit, which must finish
/// with exactly the reference's files.
fn fills_then_resumes(
    args: &dyn Fn(&str) -> Vec<String>,
    kib: u64,
    reference: &Path,
    out: &Path,
    file_end: &str,
    left: &[&str],
) {
    let limited = args(s(out));
    let limited: Vec<&str> = limited.iter().map(String::as_str).collect();
    let run = l2s_limited(kib, &limited);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    let prefix = format!("cannot write {}/", out.display());
    let named = stderr
        .split(&prefix)
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no file named: {stderr}"));
    assert!(named.ends_with(file_end), "{stderr}");
    assert!(stderr.contains("File too large"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let expected = contents(reference);
    let kept = contents(out);
    for name in left {
        assert!(kept.contains_key(*name), "{name} missing: {stderr}");
    }
    for (name, bytes) in &kept {
        assert!(
            expected.get(name) == Some(bytes),
            "{name} is left but is not as the uninterrupted run wrote it: {stderr}"
        );
    }
    ok(&limited);
    assert_eq!(
        expected,
        contents(out),
        "the resumed run differs from an uninterrupted one"
    );
}

#[test]
fn a_full_disk_is_named_keeps_what_was_written_and_the_rerun_finishes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("scenes");
    ok(&[
        "shapes",
        "render",
        "--count",
        "4",
        "--out",
        s(&images),
        "-q",
    ]);
    let images = s(&images).to_string();
    let data = move |out: &str| -> Vec<String> {
        [
            "data",
            "build",
            "--images",
            &images,
            "--out",
            out,
            "--limit",
            "3",
            "--steps",
            "4",
            "--min-psnr",
            "0",
            "--shard-size",
            "2",
            "-q",
        ]
        .map(String::from)
        .to_vec()
    };
    let reference = dir.path().join("data-ref");
    let args = data(s(&reference));
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // A shard of two samples is about 180 KB: the first one cannot be written.
    fills_then_resumes(
        &data,
        100,
        &reference,
        &dir.path().join("data"),
        "shard-00000.safetensors",
        &["info.json"],
    );

    let eval = |out: &str| -> Vec<String> {
        [
            "eval",
            "--generate-prompts",
            "2",
            "--images-per-prompt",
            "1",
            "--steps",
            "2",
            "--out",
            out,
            "-q",
        ]
        .map(String::from)
        .to_vec()
    };
    let reference = dir.path().join("eval-ref");
    let args = eval(s(&reference));
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // An image is about 2.7 KB, its metadata line far less.
    fills_then_resumes(
        &eval,
        2,
        &reference,
        &dir.path().join("eval"),
        ".png",
        &["prompts.jsonl", "run.json"],
    );
}
