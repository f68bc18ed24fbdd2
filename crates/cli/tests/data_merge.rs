//! `l2s data build --shard` in two parts, `l2s data merge` and `l2s train --data A --data B` on
//! the built-in shapes model: the merge holds what a one-process build holds, and parts of other
//! builds are refused with the differing field named.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use l2s_steer::{Dataset, SampleMeta};

mod run;
use run::{fails, ok, s};

/// Builds `out` from the images with small settings, plus `extra`.
fn build(images: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "data",
        "build",
        "--images",
        s(images),
        "--out",
        s(out),
        "--steps",
        "4",
        "--fixed-point",
        "0",
        "--min-psnr",
        "0",
        "--shard-size",
        "3",
        "-q",
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

/// Renders `count` two-object shapes scenes into `out`.
fn render(out: &Path, count: &str, seed: &str) {
    ok(&[
        "shapes",
        "render",
        "--out",
        s(out),
        "--count",
        count,
        "--min-objects",
        "2",
        "--max-objects",
        "2",
        "--seed",
        seed,
    ]);
}

/// Sample id → (its manifest entry's meta, its maps as f32 values).
fn samples(dir: &Path) -> BTreeMap<u64, (SampleMeta, Vec<f32>)> {
    let ds = Dataset::open(dir).unwrap();
    let ex = ds.load_all(DType::F32).unwrap();
    let steps = ds.info().step_indices.len();
    ds.entries()
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let maps = ex
                .maps
                .narrow(0, i * steps, steps)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (e.meta.sample, (e.meta.clone(), maps))
        })
        .collect()
}

fn train_split(clf: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(clf.join("classifier.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    let m = &meta["metrics"];
    serde_json::json!([m["train_split"], m["val_split"], m["test_split"]])
}

#[test]
fn shards_merge_into_what_one_build_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let images = dir("images");
    render(&images, "4", "0");
    build(&images, &dir("one"), &[]);
    build(&images, &dir("part1"), &["--shard", "1/2"]);
    build(&images, &dir("part2"), &["--shard", "2/2"]);

    let merged = dir("merged");
    let said = ok(&[
        "data",
        "merge",
        s(&dir("part1")),
        s(&dir("part2")),
        "--out",
        s(&merged),
    ]);
    let one = samples(&dir("one"));
    assert_eq!(one.len(), 8, "4 images, a true and a wrong prompt each");
    assert!(
        said.contains("8 samples") && said.contains("from 2 parts"),
        "{said}"
    );
    let (a, b) = (samples(&dir("part1")), samples(&dir("part2")));
    // Shards split by image (image i's samples are 2i and 2i + 1), keeping twins together.
    assert!(a.keys().all(|id| (id / 2) % 2 == 0) && b.keys().all(|id| (id / 2) % 2 == 1));
    assert_eq!((a.len(), b.len()), (4, 4));
    assert_eq!(samples(&merged), one, "same samples, same maps");
    let infos = |d: &Path| {
        let ds = Dataset::open(d).unwrap();
        ds.info().clone()
    };
    assert_eq!(infos(&merged), infos(&dir("one")));

    // Merging into a dataset, or parts of another build, is refused.
    let e = fails(&[
        "data",
        "merge",
        s(&dir("part1")),
        s(&dir("part2")),
        "--out",
        s(&merged),
    ]);
    assert!(e.contains("already holds a dataset"), "{e}");
    build(
        &images,
        &dir("other-seed"),
        &["--shard", "2/2", "--seed", "1"],
    );
    let e = fails(&[
        "data",
        "merge",
        s(&dir("part1")),
        s(&dir("other-seed")),
        "--out",
        s(&dir("mixed")),
    ]);
    assert!(
        e.contains("\"seed\" differs (0 vs 1)") && e.contains("other-seed"),
        "{e}"
    );
    assert!(!dir("mixed").join("info.json").exists());

    // Training on the two parts reads the splits that training on their merge reads.
    let train = |data: &[&Path], out: &Path| {
        let mut args = vec!["train", "--epochs", "1", "--out", s(out), "-q"];
        for d in data {
            args.extend(["--data", s(d)]);
        }
        ok(&args);
    };
    train(&[&dir("part1"), &dir("part2")], &dir("clf-parts"));
    train(&[&merged], &dir("clf-merged"));
    let split = train_split(&dir("clf-parts"));
    assert_eq!(split, train_split(&dir("clf-merged")));
    let samples_seen: u64 = (0..3).map(|k| split[k]["samples"].as_u64().unwrap()).sum();
    assert_eq!(samples_seen, 8);
    build(
        &images,
        &dir("other-steps"),
        &["--shard", "2/2", "--at-steps", "1,3"],
    );
    let e = fails(&[
        "train",
        "--data",
        s(&dir("part1")),
        "--data",
        s(&dir("other-steps")),
        "--out",
        s(&dir("clf-mixed")),
    ]);
    assert!(e.contains("\"step_indices\" differs"), "{e}");
    assert!(fails(&["train", "--out", s(&dir("clf-none"))]).contains("--data"));
}

/// `--device cpu,cpu` loads a copy of the model per device and runs one worker on each: the
/// dataset is the one a single device and worker writes, sample for sample.
#[test]
fn a_copy_of_the_model_per_device_builds_what_one_device_builds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let images = dir("images");
    render(&images, "3", "5");
    build(&images, &dir("one"), &["--device", "cpu", "--workers", "1"]);
    build(&images, &dir("two"), &["--device", "cpu,cpu"]);
    let one = samples(&dir("one"));
    assert_eq!(one.len(), 6);
    assert_eq!(samples(&dir("two")), one);
    let e = fails(&[
        "data",
        "build",
        "--images",
        s(&images),
        "--out",
        s(&dir("bad")),
        "--device",
        "cpu,gpu7",
    ]);
    assert!(e.contains("gpu7"), "{e}");
}
