//! kill -9 anywhere: each long-running command is killed with SIGKILL at seeded random moments,
//! restarted with the same arguments until it finishes, and its output folder must then be
//! byte-identical to an uninterrupted run's: no sample lost or duplicated, no half-written or
//! stray file, manifests consistent.
//!
//! `L2S_KILLS` sets the kills per command (default 2, which keeps this test to about a minute);
//! `tools/reliability/kill_anywhere.sh` runs it with 20.

mod run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use run::*;

/// A small seeded generator (SplitMix64) for the kill moments.
struct KillClock(u64);

impl KillClock {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A moment in [0, limit).
    fn moment(&mut self, limit: Duration) -> Duration {
        let f = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        limit.mul_f64(f)
    }
}

fn kills_per_command() -> usize {
    std::env::var("L2S_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn command(args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l2s"));
    cmd.args(args)
        .env_remove("L2S_MODEL")
        .env_remove("RUST_LOG")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Runs to the end; returns how long it took.
fn run_to_end(args: &[String]) -> Duration {
    let start = Instant::now();
    let out = command(args).output().expect("running l2s");
    assert!(
        out.status.success(),
        "l2s {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

/// What one round of kills did.
struct Round {
    kills: usize,
    starts: usize,
}

/// Starts `args` again and again, killing it with SIGKILL at a moment drawn from `clock` within
/// `window` of each start, until `kills` kills have landed on a running process or a start ran to
/// the end before its moment; then lets it finish. The output folder is complete afterwards.
fn kill_and_restart(
    args: &[String],
    kills: usize,
    window: Duration,
    clock: &mut KillClock,
) -> Round {
    let mut round = Round {
        kills: 0,
        starts: 0,
    };
    while round.kills < kills {
        let at = clock.moment(window);
        let mut child = command(args).spawn().expect("starting l2s");
        round.starts += 1;
        let start = Instant::now();
        let mut finished = None;
        while start.elapsed() < at {
            if let Some(status) = child.try_wait().unwrap() {
                finished = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match finished {
            // It finished before the kill: a failure is a bug, a success ends the round (a
            // finished folder has no moments left to kill).
            Some(status) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).ok();
                }
                assert!(status.success(), "l2s {args:?} after a kill: {err}");
                // Already reaped by `try_wait`; this returns its status again.
                child.wait().unwrap();
                return round;
            }
            None => {
                child.kill().unwrap();
                // Reaped before the next start, as a scheduler's restart would find it.
                child.wait().unwrap();
                round.kills += 1;
            }
        }
    }
    run_to_end(args);
    round
}

/// A JSON file without its wall-clock fields (`seconds`: how long training took, which no two
/// runs share); every other file is compared as it is.
fn without_timing(name: &str, bytes: &[u8]) -> Vec<u8> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("seconds");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    if !name.ends_with(".json") {
        return bytes.to_vec();
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return bytes.to_vec();
    };
    strip(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// The folder of an interrupted run equals the uninterrupted run's, file for file.
fn assert_same_folder(reference: &Path, killed: &Path, what: &str) {
    let (a, b) = (contents(reference), contents(killed));
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "{what}: the files differ");
    for (name, bytes) in &a {
        assert!(
            without_timing(name, bytes) == without_timing(name, &b[name]),
            "{what}: {name} differs after the kills"
        );
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// One command: a reference run into `ref`, then rounds of killed runs, each into a fresh folder
/// and compared with the reference once it finishes, until the kills per command have landed.
fn check(dir: &Path, what: &str, args: impl Fn(&Path) -> Vec<String>, seed: u64) {
    let reference = dir.join(format!("{what}-ref"));
    let took = run_to_end(&args(&reference));
    let kills = kills_per_command();
    let mut clock = KillClock(seed);
    let (mut landed, mut starts, mut rounds) = (0, 0, 0);
    while landed < kills {
        assert!(
            starts < 10 * kills + 10,
            "{what}: {landed} kills in {starts} starts"
        );
        let killed = dir.join(format!("{what}-killed-{rounds}"));
        let round = kill_and_restart(
            &args(&killed),
            kills - landed,
            took.mul_f64(0.7),
            &mut clock,
        );
        assert_same_folder(&reference, &killed, what);
        std::fs::remove_dir_all(&killed).unwrap();
        landed += round.kills;
        starts += round.starts;
        rounds += 1;
    }
    eprintln!(
        "{what}: {landed} kills over {starts} starts in {rounds} rounds (uninterrupted run {:.1} s), \
         output identical after each",
        took.as_secs_f64()
    );
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().to_path_buf();
    (t, p)
}

/// The four long-running commands on the built-in shapes model, at small sizes, one after the
/// other (the classifier trains on the dataset the first built).
#[test]
fn killed_commands_resume_to_the_uninterrupted_result() {
    let (_t, dir) = tmp();
    let images = dir.join("scenes");
    ok(&[
        "shapes",
        "render",
        "--count",
        "8",
        "--out",
        s(&images),
        "-q",
    ]);
    let data = |out: &Path| {
        strings(&[
            "data",
            "build",
            "--images",
            s(&images),
            "--out",
            s(out),
            "--limit",
            "6",
            "--steps",
            "4",
            "--min-psnr",
            "0",
            "--shard-size",
            "3",
            "-q",
        ])
    };
    check(&dir, "data-build", data, 1);
    let dataset = dir.join("data-build-ref");
    let train = |out: &Path| {
        strings(&[
            "train",
            "--data",
            s(&dataset),
            "--out",
            s(out),
            "--epochs",
            "2",
            "-q",
        ])
    };
    check(&dir, "train", train, 2);
    let eval = |out: &Path| {
        strings(&[
            "eval",
            "--generate-prompts",
            "3",
            "--images-per-prompt",
            "2",
            "--steps",
            "3",
            "--out",
            s(out),
            "-q",
        ])
    };
    check(&dir, "eval", eval, 3);
    let shapes_train = |out: &Path| {
        strings(&[
            "shapes",
            "train",
            "--out",
            s(out),
            "--steps",
            "6",
            "--batch",
            "2",
            "--checkpoint-every",
            "2",
            "-q",
        ])
    };
    check(&dir, "shapes-train", shapes_train, 4);
}
