//! The dataset folder format: writing, resuming after an interruption, reading, merging, errors.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use l2s_steer::dataset::{merge, owns, shard_name, MANIFEST_FILE};
use l2s_steer::{
    Dataset, DatasetError, DatasetInfo, DatasetWriter, LayerInfo, SampleKind, SampleMeta, ShardSpec,
};

const RELS: [&str; 4] = ["left of", "right of", "above", "below"];

fn info() -> DatasetInfo {
    DatasetInfo {
        model: "test-model@1".into(),
        num_maps: 3,
        map_size: 4,
        step_indices: vec![5, 10],
        relations: RELS.iter().map(|s| s.to_string()).collect(),
        layers: vec![
            LayerInfo {
                name: "down.0".into(),
                heads: 2,
                height: 8,
                width: 8,
            },
            LayerInfo {
                name: "up.0".into(),
                heads: 1,
                height: 8,
                width: 8,
            },
        ],
        dual_inversion: true,
        extra: serde_json::Map::from_iter([("source".to_string(), serde_json::json!("unit test"))]),
    }
}

/// Sample `id`: image id/2, positive when even; label id mod 4.
fn meta(id: u64) -> SampleMeta {
    let label = (id % 4) as usize;
    let positive = id.is_multiple_of(2);
    let prompt_rel = if positive {
        RELS[label]
    } else {
        RELS[(label + 1) % 4]
    };
    SampleMeta {
        sample: id,
        image_id: format!("img{}", id / 2),
        subject: "dog".into(),
        object: "teddy bear".into(),
        relation: RELS[label].into(),
        label,
        prompt: format!("a dog {prompt_rel} a teddy bear"),
        prompt_relation: prompt_rel.into(),
        kind: if positive {
            SampleKind::Positive
        } else {
            SampleKind::Negative
        },
        psnr: 25.0,
    }
}

/// Maps of sample `id` (S=2, 2, C=3, 4, 4): value id + 0.5·step + 0.25·word (exact in f16).
fn maps_of(id: u64) -> Tensor {
    let mut v = Vec::new();
    for s in 0..2 {
        for w in 0..2 {
            for _ in 0..3 * 16 {
                v.push(id as f32 + 0.5 * s as f32 + 0.25 * w as f32);
            }
        }
    }
    Tensor::from_vec(v, (2, 2, 3, 4, 4), &Device::Cpu).unwrap()
}

fn write(dir: &Path, ids: impl IntoIterator<Item = u64>, shard_size: usize) -> usize {
    let mut w = DatasetWriter::open(dir, info(), shard_size).unwrap();
    for id in ids {
        if !w.contains(id) {
            w.append(meta(id), &maps_of(id)).unwrap();
        }
    }
    w.finish().unwrap()
}

/// Checks that every example carries its sample's maps, step and label.
fn check_examples(ds: &Dataset, expect_ids: &[u64]) {
    let ex = ds.load_all(DType::F32).unwrap();
    assert_eq!(ex.len(), 2 * expect_ids.len());
    let mut got: Vec<u64> = ex.samples.iter().copied().step_by(2).collect();
    got.sort();
    let mut want = expect_ids.to_vec();
    want.sort();
    assert_eq!(got, want, "each sample exactly once");
    let steps: Vec<u32> = ex.steps.to_vec1().unwrap();
    let labels: Vec<u32> = ex.labels.to_vec1().unwrap();
    for m in 0..ex.len() {
        let id = ex.samples[m];
        assert_eq!(steps[m], (m % 2) as u32);
        assert_eq!(labels[m], (id % 4) as u32);
        assert_eq!(ex.label_list[m], labels[m]);
        assert_eq!(ex.image_ids[m], format!("img{}", id / 2));
        for w in 0..2 {
            let v: Vec<f32> = ex
                .maps
                .get(m)
                .unwrap()
                .get(w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = id as f32 + 0.5 * steps[m] as f32 + 0.25 * w as f32;
            assert!(
                v.iter().all(|x| *x == want),
                "example {m} word {w}: {} vs {want}",
                v[0]
            );
        }
    }
}

fn shard_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    v.sort();
    v
}

#[test]
fn write_then_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    assert_eq!(write(&dir, 0..10, 4), 10);
    assert_eq!(
        shard_files(&dir),
        vec![shard_name(0), shard_name(1), shard_name(2)]
    );
    let ds = Dataset::open(&dir).unwrap();
    assert_eq!(ds.len(), 10);
    assert_eq!(ds.info(), &info());
    assert_eq!(ds.entries()[5].shard, shard_name(1));
    assert_eq!(ds.entries()[5].row, 1);
    assert_eq!(ds.entries()[5].meta, meta(5));
    check_examples(&ds, &(0..10).collect::<Vec<_>>());

    // A chosen subset comes back in the order asked for, steps of one sample together.
    let ex = ds.load(&[7, 2, 9], DType::F16).unwrap();
    assert_eq!(ex.maps.dtype(), DType::F16);
    assert_eq!(ex.samples, vec![7, 7, 2, 2, 9, 9]);
    let first: f32 = ex
        .maps
        .get(2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert_eq!(first, 2.0);
    let (maps, steps, labels) = ex.batch(&[1, 4], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(maps.dims(), &[2, 2, 3, 4, 4]);
    assert_eq!(steps.to_vec1::<u32>().unwrap(), vec![1, 0]);
    assert_eq!(labels.to_vec1::<u32>().unwrap(), vec![3, 1]);

    // The manifest is plain JSON lines with the documented fields.
    let text = fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().nth(3).unwrap()).unwrap();
    for key in [
        "sample",
        "image_id",
        "subject",
        "object",
        "relation",
        "label",
        "prompt",
        "prompt_relation",
        "kind",
        "psnr",
        "shard",
        "row",
    ] {
        assert!(line.get(key).is_some(), "missing {key}");
    }
    assert_eq!(line["kind"], "negative");
    let info_json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("info.json")).unwrap()).unwrap();
    assert_eq!(info_json["source"], "unit test");
    assert_eq!(info_json["step_indices"], serde_json::json!([5, 10]));
}

#[test]
fn interrupted_build_resumes_without_duplicates_or_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    {
        let mut w = DatasetWriter::open(&dir, info(), 4).unwrap();
        for id in 0..6 {
            w.append(meta(id), &maps_of(id)).unwrap();
        }
        assert_eq!(w.completed_samples().len(), 4);
        assert_eq!(w.pending(), 2);
        // Dropped without finish: samples 4 and 5 are lost, as in a crash.
    }
    // A crash after the next shard reached the disk but before its manifest lines did, and a
    // manifest line cut short.
    let ids = Tensor::new(&[6i64, 7, 8, 9], &Device::Cpu).unwrap();
    let maps = Tensor::stack(&(6..10).map(maps_of).collect::<Vec<_>>(), 0)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let orphan: HashMap<String, Tensor> =
        [("maps".to_string(), maps), ("sample".to_string(), ids)].into();
    candle_core::safetensors::save(&orphan, dir.join(shard_name(1))).unwrap();
    fs::write(dir.join(".shard-00002.safetensors.tmp"), b"partial").unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(dir.join(MANIFEST_FILE))
        .unwrap();
    f.write_all(br#"{"sample":6,"image_id":"img3","subj"#)
        .unwrap();
    drop(f);

    // The reader refuses the cut line and points at it.
    let err = Dataset::open(&dir).unwrap_err().to_string();
    assert!(err.contains("manifest.jsonl line 5"), "{err}");

    // Resume: the writer repairs the folder and reports what is done.
    let mut w = DatasetWriter::open(&dir, info(), 4).unwrap();
    let mut done: Vec<u64> = w.completed_samples().iter().copied().collect();
    done.sort();
    assert_eq!(done, vec![0, 1, 2, 3]);
    assert_eq!(
        shard_files(&dir),
        vec![shard_name(0)],
        "orphan and temporary shards removed"
    );
    let mut redone = Vec::new();
    for id in 0..10 {
        if !w.contains(id) {
            w.append(meta(id), &maps_of(id)).unwrap();
            redone.push(id);
        }
    }
    assert_eq!(redone, vec![4, 5, 6, 7, 8, 9]);
    assert_eq!(w.finish().unwrap(), 10);

    let ds = Dataset::open(&dir).unwrap();
    check_examples(&ds, &(0..10).collect::<Vec<_>>());

    // Resuming a finished build does nothing.
    assert_eq!(write(&dir, 0..10, 4), 10);
    assert_eq!(Dataset::open(&dir).unwrap().len(), 10);
}

#[test]
fn resume_refuses_other_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    write(&dir, 0..3, 2);
    let mut other = info();
    other.step_indices = vec![5, 10, 15];
    let err = DatasetWriter::open(&dir, other, 2).err().unwrap();
    assert!(
        matches!(
            err,
            DatasetError::InfoMismatch {
                field: "step_indices",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("step_indices") && err.to_string().contains("[5, 10, 15]"),
        "{err}"
    );
    let mut other = info();
    other.model = "another-model".into();
    let err = DatasetWriter::open(&dir, other, 2)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model") && err.contains("another-model"),
        "{err}"
    );
    // Extra fields may differ.
    let mut other = info();
    other.extra.clear();
    DatasetWriter::open(&dir, other, 2).unwrap();
}

#[test]
fn append_rejects_bad_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = DatasetWriter::open(tmp.path().join("ds"), info(), 8).unwrap();
    w.append(meta(0), &maps_of(0)).unwrap();
    let e = w.append(meta(0), &maps_of(0)).unwrap_err().to_string();
    assert!(e.contains("sample 0 is already"), "{e}");
    let wrong = Tensor::zeros((2, 2, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let e = w.append(meta(1), &wrong).unwrap_err().to_string();
    assert!(e.contains("[2, 2, 3, 4, 4]"), "{e}");
    let nan = (maps_of(1) * f64::NAN).unwrap();
    assert!(w
        .append(meta(1), &nan)
        .unwrap_err()
        .to_string()
        .contains("NaN"));
    let mut m = meta(1);
    m.label = 0;
    assert!(w
        .append(m, &maps_of(1))
        .unwrap_err()
        .to_string()
        .contains("label 0"));
    let mut m = meta(2);
    m.kind = SampleKind::Negative;
    assert!(w
        .append(m, &maps_of(2))
        .unwrap_err()
        .to_string()
        .contains("negative"));
    let mut m = meta(2);
    m.psnr = f64::INFINITY;
    assert!(w
        .append(m, &maps_of(2))
        .unwrap_err()
        .to_string()
        .contains("psnr"));
    assert_eq!(w.finish().unwrap(), 1);
    let mut bad = info();
    bad.num_maps = 4;
    let e = DatasetWriter::open(tmp.path().join("other"), bad, 8)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("info.json") && e.contains("heads"), "{e}");
}

fn edit_manifest(dir: &Path, f: impl Fn(&str) -> String) {
    let p = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&p).unwrap();
    fs::write(&p, f(&text)).unwrap();
}

#[test]
fn reader_errors_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = |name: &str| -> PathBuf {
        let d = tmp.path().join(name);
        write(&d, 0..6, 3);
        d
    };

    // Manifest line pointing at a missing shard.
    let d = fresh("missing-shard");
    fs::remove_file(d.join(shard_name(1))).unwrap();
    let e = Dataset::open(&d).unwrap_err().to_string();
    assert!(
        e.contains("manifest.jsonl line 4") && e.contains("missing shard shard-00001"),
        "{e}"
    );

    // Row out of range.
    let d = fresh("bad-row");
    edit_manifest(&d, |t| t.replacen("\"row\":2", "\"row\":7", 1));
    let ds = Dataset::open(&d).unwrap();
    let e = ds.load_all(DType::F32).unwrap_err().to_string();
    assert!(
        e.contains("manifest.jsonl line 3") && e.contains("row 7") && e.contains("3 rows"),
        "{e}"
    );

    // Row holding another sample.
    let d = fresh("swapped-row");
    edit_manifest(&d, |t| t.replacen("\"row\":0", "\"row\":1", 1));
    let e = Dataset::open(&d)
        .unwrap()
        .load_all(DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 1") && e.contains("holds sample 1"), "{e}");

    // Corrupt shard.
    let d = fresh("corrupt");
    fs::write(d.join(shard_name(0)), b"not a safetensors file").unwrap();
    let e = Dataset::open(&d)
        .unwrap()
        .load_all(DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shard-00000.safetensors") && e.contains("cannot read"),
        "{e}"
    );

    // Empty shard.
    let d = fresh("empty");
    let empty: HashMap<String, Tensor> = [
        (
            "maps".to_string(),
            Tensor::zeros((0, 2, 2, 3, 4, 4), DType::F16, &Device::Cpu).unwrap(),
        ),
        (
            "sample".to_string(),
            Tensor::zeros(0, DType::I64, &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    candle_core::safetensors::save(&empty, d.join(shard_name(1))).unwrap();
    let e = Dataset::open(&d)
        .unwrap()
        .load_all(DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shard-00001.safetensors") && e.contains("empty"),
        "{e}"
    );

    // Shard with the wrong map layout.
    let d = fresh("layout");
    let wrong: HashMap<String, Tensor> = [
        (
            "maps".to_string(),
            Tensor::zeros((3, 2, 2, 5, 4, 4), DType::F16, &Device::Cpu).unwrap(),
        ),
        (
            "sample".to_string(),
            Tensor::new(&[3i64, 4, 5], &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    candle_core::safetensors::save(&wrong, d.join(shard_name(1))).unwrap();
    let e = Dataset::open(&d)
        .unwrap()
        .load_all(DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shard-00001.safetensors") && e.contains("(3, 2, 2, 3, 4, 4)"),
        "{e}"
    );

    // Broken JSON in the middle, a label that disagrees with the relation, duplicates.
    let d = fresh("json");
    edit_manifest(&d, |t| {
        let mut lines: Vec<String> = t.lines().map(String::from).collect();
        lines[1] = "{oops".into();
        lines.join("\n") + "\n"
    });
    let e = Dataset::open(&d).unwrap_err().to_string();
    assert!(e.contains("manifest.jsonl line 2"), "{e}");
    let d = fresh("label");
    edit_manifest(&d, |t| t.replacen("\"label\":1", "\"label\":2", 1));
    let e = Dataset::open(&d).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("label 2"), "{e}");
    let d = fresh("dup");
    edit_manifest(&d, |t| {
        let first = t.lines().next().unwrap().to_string();
        format!("{t}{first}\n")
    });
    let e = Dataset::open(&d).unwrap_err().to_string();
    assert!(
        e.contains("line 7") && e.contains("already appears on line 1"),
        "{e}"
    );

    let e = Dataset::open(tmp.path().join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("info.json is missing"), "{e}");
}

#[test]
fn partitioned_build_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 3;
    let parts: Vec<PathBuf> = (0..n)
        .map(|i| {
            let d = tmp.path().join(format!("part{i}"));
            let spec = ShardSpec::parse(&format!("{i}/{n}")).unwrap();
            write(&d, (0..20).filter(|id| spec.owns(*id)), 4);
            d
        })
        .collect();
    // Every id owned by exactly one part.
    for id in 0..100u64 {
        assert_eq!((0..n).filter(|i| owns(id, *i, n)).count(), 1);
    }
    let out = tmp.path().join("merged");
    let summary = merge(&parts, &out).unwrap();
    assert_eq!(summary.samples, 20);
    let ds = Dataset::open(&out).unwrap();
    check_examples(&ds, &(0..20).collect::<Vec<_>>());
    assert_eq!(shard_files(&out).len(), summary.shards);

    // Merging again into the same folder is refused; overlapping inputs are refused.
    assert!(merge(&parts, &out)
        .unwrap_err()
        .to_string()
        .contains("already holds a dataset"));
    let e = merge(
        &[parts[0].clone(), parts[0].clone()],
        &tmp.path().join("dup"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is also in"), "{e}");

    // Folders made with other settings are refused.
    let odd = tmp.path().join("odd");
    let mut other = info();
    other.dual_inversion = false;
    let mut w = DatasetWriter::open(&odd, other, 4).unwrap();
    w.append(meta(100), &maps_of(100)).unwrap();
    w.finish().unwrap();
    let e = merge(&[parts[0].clone(), odd], &tmp.path().join("mixed")).unwrap_err();
    assert!(
        matches!(
            e,
            DatasetError::InfoMismatch {
                field: "dual_inversion",
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("part0") && e.to_string().contains("odd"),
        "{e}"
    );
}

#[test]
fn shard_spec_parsing() {
    assert_eq!(
        ShardSpec::parse("2/4").unwrap(),
        ShardSpec { index: 2, count: 4 }
    );
    assert_eq!(ShardSpec::parse("0/1").unwrap(), ShardSpec::all());
    assert_eq!(ShardSpec::parse("1/3").unwrap().to_string(), "1/3");
    for bad in ["4/4", "1/0", "x/2", "3", "-1/2"] {
        assert!(ShardSpec::parse(bad).is_err(), "{bad}");
    }
    assert!(ShardSpec::parse("4/4").unwrap_err().contains("0/4"));
}
