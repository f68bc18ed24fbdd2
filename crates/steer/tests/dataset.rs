//! The dataset folder format: writing, resuming after an interruption, reading, merging, errors.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use l2s_steer::classifier::StepInput;
use l2s_steer::dataset::{merge, shard_name, MergeSummary, MANIFEST_FILE};
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
    let (maps, steps, labels) = ex
        .batch(&[1, 4], DType::F32, &Device::Cpu, StepInput::Slot)
        .unwrap();
    assert_eq!(maps.dims(), &[2, 2, 3, 4, 4]);
    assert_eq!(steps.to_vec1::<u32>().unwrap(), vec![1, 0]);
    assert_eq!(labels.to_vec1::<u32>().unwrap(), vec![3, 1]);
    // A classifier that takes the denoising step itself gets the recorded steps (5, 10).
    let (_, raw, _) = ex
        .batch(&[1, 4], DType::F32, &Device::Cpu, StepInput::Raw)
        .unwrap();
    assert_eq!(raw.to_vec1::<u32>().unwrap(), vec![10, 5]);

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
            DatasetError::InfoMismatch { ref field, .. } if field == "step_indices"
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

/// Writes part `spec` of samples 0..20 into `dir`.
fn write_part(dir: &Path, spec: ShardSpec) {
    write(dir, (0..20).filter(|id| spec.owns(*id)), 4);
}

#[test]
fn partitioned_build_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 3;
    let parts: Vec<PathBuf> = (1..=n)
        .map(|i| {
            let d = tmp.path().join(format!("part{i}"));
            write_part(&d, format!("{i}/{n}").parse().unwrap());
            d
        })
        .collect();
    let out = tmp.path().join("merged");
    let summary = merge(&parts, &out).unwrap();
    assert_eq!(
        summary,
        MergeSummary {
            parts: 3,
            samples: 20,
            duplicates: 0,
            shards: summary.shards
        }
    );
    let ds = Dataset::open(&out).unwrap();
    check_examples(&ds, &(0..20).collect::<Vec<_>>());
    assert_eq!(shard_files(&out).len(), summary.shards);
    // Reading the parts as one gives the merged dataset's entries and maps.
    let many = Dataset::open_many(&parts).unwrap();
    assert_eq!(many.dirs(), parts.as_slice());
    let metas = |d: &Dataset| {
        d.entries()
            .iter()
            .map(|e| e.meta.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(metas(&many), metas(&ds));
    check_examples(&many, &(0..20).collect::<Vec<_>>());

    // Merging again into the same folder is refused.
    assert!(merge(&parts, &out)
        .unwrap_err()
        .to_string()
        .contains("already holds a dataset"));
}

#[test]
fn merge_keeps_a_sample_in_several_parts_once() {
    let tmp = tempfile::tempdir().unwrap();
    let part = |name: &str, ids: std::ops::Range<u64>, shard_size: usize| {
        let d = tmp.path().join(name);
        write(&d, ids, shard_size);
        d
    };
    // 0..12 and 8..20 overlap in 8..12: one shard of b (rows 8..12) is all duplicates, so it
    // is not copied; with shards of 3, b's first shard (8, 9, 10) is dropped and its second
    // (11, 12, 13) rewritten without 11.
    let a = part("a", 0..12, 4);
    let b = part("b", 8..20, 4);
    let c = part("c", 8..20, 3);
    for (k, inputs) in [vec![a.clone(), b], vec![a.clone(), c]]
        .into_iter()
        .enumerate()
    {
        let out = tmp.path().join(format!("merged{k}"));
        let summary = merge(&inputs, &out).unwrap();
        assert_eq!((summary.samples, summary.duplicates), (20, 4), "{inputs:?}");
        let sources: usize = inputs.iter().map(|d| shard_files(d).len()).sum();
        assert_eq!(summary.shards, sources - 1, "{inputs:?}");
        let ds = Dataset::open(&out).unwrap();
        check_examples(&ds, &(0..20).collect::<Vec<_>>());
        let rows: Vec<usize> = shard_files(&out)
            .iter()
            .map(|n| {
                let t = candle_core::safetensors::load(out.join(n), &Device::Cpu).unwrap();
                t["sample"].dim(0).unwrap()
            })
            .collect();
        let want: &[usize] = if k == 0 { &[4; 5] } else { &[4, 4, 4, 2, 3, 3] };
        assert_eq!(rows, want, "rows per merged shard");
        let many = Dataset::open_many(&inputs).unwrap();
        assert_eq!((many.len(), many.duplicates()), (20, 4));
        check_examples(&many, &(0..20).collect::<Vec<_>>());
    }
    // The same part twice is one part.
    let out = tmp.path().join("twice");
    let summary = merge(&[a.clone(), a.clone()], &out).unwrap();
    assert_eq!((summary.samples, summary.duplicates), (12, 12));
    check_examples(&Dataset::open(&out).unwrap(), &(0..12).collect::<Vec<_>>());
}

#[test]
fn merge_refuses_parts_of_other_builds_and_damaged_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    write_part(&a, "1/2".parse().unwrap());

    // Other settings, core or extra, are refused naming the field.
    let odd = tmp.path().join("odd");
    let mut other = info();
    other.dual_inversion = false;
    let mut w = DatasetWriter::open(&odd, other, 4).unwrap();
    w.append(meta(101), &maps_of(101)).unwrap();
    w.finish().unwrap();
    let e = merge(&[a.clone(), odd], &tmp.path().join("mixed")).unwrap_err();
    assert!(
        matches!(e, DatasetError::InfoMismatch { ref field, .. } if field == "dual_inversion"),
        "{e}"
    );
    assert!(
        e.to_string().contains("a") && e.to_string().contains("odd"),
        "{e}"
    );
    let steps = tmp.path().join("steps");
    let mut other = info();
    other.extra.insert("num_inference_steps".into(), 50.into());
    let mut w = DatasetWriter::open(&steps, other, 4).unwrap();
    w.append(meta(101), &maps_of(101)).unwrap();
    w.finish().unwrap();
    let e = merge(&[a.clone(), steps.clone()], &tmp.path().join("m1")).unwrap_err();
    assert!(
        matches!(e, DatasetError::InfoMismatch { ref field, .. } if field == "num_inference_steps"),
        "{e}"
    );
    assert!(e.to_string().contains("absent vs 50"), "{e}");
    let e = Dataset::open_many(&[a.clone(), steps]).unwrap_err();
    assert!(e.to_string().contains("num_inference_steps"), "{e}");
    // Where the model was read from may differ; other extra fields only for merging.
    let moved = tmp.path().join("moved");
    let mut other = info();
    other
        .extra
        .insert("model_folder".into(), "/elsewhere".into());
    other.extra.insert("min_psnr".into(), 12.into());
    let mut w = DatasetWriter::open(&moved, other, 4).unwrap();
    w.append(meta(101), &maps_of(101)).unwrap();
    w.finish().unwrap();
    let e = merge(&[a.clone(), moved.clone()], &tmp.path().join("m2")).unwrap_err();
    assert!(e.to_string().contains("\"min_psnr\" differs"), "{e}");
    assert_eq!(Dataset::open_many(&[a.clone(), moved]).unwrap().len(), 11);

    // The same sample id meaning another sample: not parts of one build.
    let clash = tmp.path().join("clash");
    let mut w = DatasetWriter::open(&clash, info(), 4).unwrap();
    let mut m = meta(2);
    m.image_id = "another".into();
    w.append(m, &maps_of(2)).unwrap();
    w.finish().unwrap();
    let e = merge(&[a.clone(), clash.clone()], &tmp.path().join("m3"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sample 2") && e.contains("image_id") && e.contains("not parts of one build"),
        "{e}"
    );
    assert!(Dataset::open_many(&[a.clone(), clash]).is_err());

    // A shard cut short or of the wrong shape is found before anything is written.
    let cut = tmp.path().join("cut");
    write_part(&cut, "2/2".parse().unwrap());
    let shard = cut.join(shard_name(1));
    let bytes = fs::read(&shard).unwrap();
    fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let out = tmp.path().join("m4");
    let e = merge(&[a.clone(), cut.clone()], &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shard-00001") && e.contains("cut short"), "{e}");
    assert!(!out.join("info.json").exists());
    let tensors: HashMap<String, Tensor> = [
        (
            "maps".to_string(),
            Tensor::zeros((4, 2, 2, 3, 4, 5), DType::F16, &Device::Cpu).unwrap(),
        ),
        (
            "sample".to_string(),
            Tensor::new(&[1i64, 3, 5, 7], &Device::Cpu).unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, cut.join(shard_name(0))).unwrap();
    fs::write(&shard, &bytes).unwrap();
    let e = merge(&[a.clone(), cut.clone()], &out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shard-00000") && e.contains("[4, 2, 2, 3, 4, 5]"),
        "{e}"
    );
    // A missing one too.
    fs::remove_file(cut.join(shard_name(0))).unwrap();
    let e = merge(&[a, cut], &out).unwrap_err().to_string();
    assert!(e.contains("missing shard shard-00000"), "{e}");
    assert!(!out.join("info.json").exists());
}

#[test]
fn shard_spec_parts_are_one_based() {
    let spec: ShardSpec = "2/4".parse().unwrap();
    assert_eq!((spec.index(), spec.count()), (2, 4));
    assert_eq!("1/1".parse::<ShardSpec>().unwrap(), ShardSpec::all());
    assert!("0/4".parse::<ShardSpec>().is_err());
    // Part 1 of 3 takes sample ids 0, 3, 6, …
    let first: ShardSpec = "1/3".parse().unwrap();
    assert_eq!(
        (0..10).filter(|id| first.owns(*id)).collect::<Vec<u64>>(),
        [0, 3, 6, 9]
    );
}

#[test]
fn a_folder_of_other_files_is_refused_and_left_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mine");
    fs::create_dir(&dir).unwrap();
    // Names the writer would otherwise clean up as leftovers of an interrupted build.
    for (name, text) in [
        ("shard-00000.safetensors", "my file"),
        (".notes.tmp", "my notes"),
        ("thesis.tex", "chapter 1"),
    ] {
        fs::write(dir.join(name), text).unwrap();
    }
    let e = DatasetWriter::open(&dir, info(), 4).err().unwrap();
    assert!(matches!(e, DatasetError::NotADataset { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains(&dir.display().to_string())
            && e.contains("holds no dataset")
            && e.contains(".notes.tmp and 2 more"),
        "{e}"
    );
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [".notes.tmp", "shard-00000.safetensors", "thesis.tex"]
    );
    assert_eq!(
        fs::read_to_string(dir.join("shard-00000.safetensors")).unwrap(),
        "my file"
    );
    // An empty folder is fine.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert_eq!(write(&empty, 0..3, 2), 3);
}

#[test]
fn a_second_writer_on_one_folder_is_refused_until_the_first_is_done() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let mut first = DatasetWriter::open(&dir, info(), 4).unwrap();
    first.append(meta(0), &maps_of(0)).unwrap();
    let e = DatasetWriter::open(&dir, info(), 4).err().unwrap();
    assert!(matches!(e, DatasetError::Lock(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.contains(&dir.display().to_string())
            && e.contains(&format!("process {}", std::process::id()))
            && e.contains(".l2s.lock"),
        "{e}"
    );
    assert_eq!(first.finish().unwrap(), 1);
    assert!(!dir.join(".l2s.lock").exists());
    // Resumed once the first is done: sample 0 is kept, 1 added.
    assert_eq!(write(&dir, 0..2, 4), 2);
}

#[test]
fn merge_never_clears_a_folder_of_other_files_but_redoes_an_unfinished_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    write(&a, 0..6, 4);
    let mine = tmp.path().join("mine");
    fs::create_dir(&mine).unwrap();
    fs::write(mine.join(shard_name(0)), "my file").unwrap();
    fs::write(mine.join(MANIFEST_FILE), "my notes").unwrap();
    let e = merge(std::slice::from_ref(&a), &mine).unwrap_err();
    assert!(matches!(e, DatasetError::NotADataset { .. }), "{e}");
    assert_eq!(
        fs::read_to_string(mine.join(shard_name(0))).unwrap(),
        "my file"
    );
    assert_eq!(
        fs::read_to_string(mine.join(MANIFEST_FILE)).unwrap(),
        "my notes"
    );
    assert_eq!(fs::read_dir(&mine).unwrap().count(), 2);
    // An unfinished merge (its marker, a stray shard, no info.json) is simply done again.
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join(l2s_steer::dataset::MERGE_MARKER), "").unwrap();
    fs::write(out.join(shard_name(7)), "left over").unwrap();
    let summary = merge(std::slice::from_ref(&a), &out).unwrap();
    assert_eq!(summary.samples, 6);
    assert!(!out.join(shard_name(7)).exists());
    assert!(!out.join(l2s_steer::dataset::MERGE_MARKER).exists());
    assert!(!out.join(".l2s.lock").exists());
    check_examples(&Dataset::open(&out).unwrap(), &(0..6).collect::<Vec<_>>());
}

/// A resumed build reads the PSNRs of the samples already written from the manifest and sums
/// them with the new ones: each must come back bit for bit, or the resumed build's mean differs
/// from an uninterrupted one's in the last digit.
#[test]
fn reopened_manifest_gives_back_every_psnr_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    // Many full-precision values (a fast float parser is off by one unit for some of them).
    let psnr = |id: u64| 5.0 + 35.0 * ((id as f64 * 0.618_033_988_749_895).fract());
    let ids = 0..400u64;
    {
        let mut w = DatasetWriter::open(&dir, info(), 64).unwrap();
        for id in ids.clone() {
            let m = SampleMeta {
                psnr: psnr(id),
                ..meta(id)
            };
            w.append(m, &maps_of(id)).unwrap();
        }
        w.finish().unwrap();
    }
    let w = DatasetWriter::open(&dir, info(), 64).unwrap();
    for id in ids {
        assert_eq!(
            w.completed_psnr(id).map(f64::to_bits),
            Some(psnr(id).to_bits()),
            "sample {id}"
        );
    }
}
