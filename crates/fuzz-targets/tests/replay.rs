//! Replays the committed fuzz corpora (`fuzz/corpus/TARGET`) and seeds (`fuzz/seeds/TARGET`)
//! through the same entry points the fuzz targets call: no input may panic, a seed named
//! `ok-*` must load and one named `bad-*` must be refused.

use std::path::{Path, PathBuf};

use l2s_fuzz_targets::{Outcome, Target, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn run(f: Target, path: &Path) -> Outcome {
    let data = std::fs::read(path).unwrap();
    std::panic::catch_unwind(|| f(&data))
        .unwrap_or_else(|_| panic!("{}: the loader panicked", path.display()))
}

#[test]
fn every_seed_loads_or_is_refused_as_its_name_says() {
    for (name, f) in TARGETS {
        let seeds = files(&fuzz_dir().join("seeds").join(name));
        let (mut ok, mut bad) = (0, 0);
        for path in &seeds {
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            let outcome = run(f, path);
            if file.starts_with("ok-") {
                assert!(outcome.is_ok(), "{name}: {file} should load: {outcome:?}");
                ok += 1;
            } else if file.starts_with("bad-") {
                assert!(outcome.is_err(), "{name}: {file} should be refused");
                bad += 1;
            }
        }
        assert!(ok > 0, "{name}: no seed that should load");
        eprintln!(
            "{name}: {} seeds, {ok} load, {bad} refused as expected",
            seeds.len()
        );
    }
}

#[test]
fn no_corpus_input_panics() {
    for (name, f) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(!corpus.is_empty(), "{name}: the corpus is empty");
        let refused = corpus.iter().filter(|p| run(f, p).is_err()).count();
        eprintln!("{name}: {} inputs, {refused} refused", corpus.len());
    }
}
