//! The published training samples imported as a dataset: each prompt's steps become one sample,
//! maps exactly as written, labels the true relation (tests/data/published-steps, written by
//! tools/fixtures/make_published_steps_fixture.py; its docstring lists the rows).

use std::path::PathBuf;

use candle_core::DType;
use l2s_steer::dataset::SampleKind;
use l2s_steer::import::import_published;
use l2s_steer::Dataset;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/published-steps")
}

/// k/8 + v for k = 0..48, the fixture's subject maps; the object's are their negation.
fn expected(v: f32) -> Vec<f32> {
    let subject: Vec<f32> = (0..48).map(|k| k as f32 / 8.0 + v).collect();
    let object: Vec<f32> = subject.iter().map(|x| -x).collect();
    [subject, object].concat()
}

#[test]
fn published_rows_become_one_sample_per_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imported");
    let report = import_published(&fixture(), &out, 2).unwrap();
    assert_eq!(report.rows_seen, 9);
    assert_eq!(report.samples, 4);
    assert_eq!(report.step_indices, [1, 3]);
    assert_eq!((report.num_maps, report.map_size), (3, 4));
    // Image 13's prompt was recorded at step 1 only.
    assert_eq!(report.left_out.total(), 1);

    let ds = Dataset::open(&out).unwrap();
    let info = ds.info();
    assert_eq!(info.model, l2s_steer::dataset::UNNAMED_MODEL);
    assert_eq!(info.extra["orig_map_size"], 16);
    assert_eq!(
        info.relations,
        ["left of", "right of", "above", "below"].map(String::from)
    );
    let ex = ds.load_all(DType::F32).unwrap();
    // One example per sample and step.
    assert_eq!(ex.maps.dims(), [8, 2, 3, 4, 4]);
    let steps: Vec<u32> = ex.steps.to_vec1().unwrap();
    let metas: Vec<_> = ds.entries().iter().map(|e| e.meta.clone()).collect();
    // Image 11 is image 0 (samples 0, 1), image 12 image 1 (samples 2, 3).
    let want = [
        (0, "11", SampleKind::Positive, "left of", "left of", 0.0),
        (1, "11", SampleKind::Negative, "left of", "above", 100.0),
        (2, "12", SampleKind::Positive, "above", "above", 10.0),
        (3, "12", SampleKind::Negative, "above", "below", 110.0),
    ];
    for (row, (m, w)) in metas.iter().zip(want).enumerate() {
        assert_eq!(
            (
                m.sample,
                m.image_id.as_str(),
                m.kind,
                m.relation.as_str(),
                m.prompt_relation.as_str()
            ),
            (w.0, w.1, w.2, w.3, w.4)
        );
        assert_eq!(m.label, info.label_of(w.3).unwrap());
        for (slot, step) in [1.0f32, 3.0].into_iter().enumerate() {
            let k = (0..ex.len())
                .find(|&k| ex.samples[k] == m.sample && steps[k] as usize == slot)
                .unwrap();
            assert_eq!(ex.label_list[k] as usize, m.label);
            let got: Vec<f32> = ex
                .maps
                .get(k)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, expected(w.5 + step), "sample {row} step {step}");
        }
    }
    // A second import into the same folder is refused, the dataset left as it was.
    let e = import_published(&fixture(), &out, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds a dataset"), "{e}");
    assert_eq!(Dataset::open(&out).unwrap().entries().len(), 4);
}
