//! The published sample reader on tests/data/phase2 (written by
//! tools/fixtures/make_phase2_fixture.py; its docstring lists the samples).

use std::path::{Path, PathBuf};

use l2s_sources::phase2::{read_phase2, Phase2Options, Phase2Sample, PromptType};
use l2s_sources::{ControlFlow, ProblemKind, Problems, Relation};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

fn read(opts: &Phase2Options) -> (Vec<Phase2Sample>, Problems) {
    let mut problems = Problems::new();
    let mut out = Vec::new();
    let summary = read_phase2(data("phase2"), opts, &mut problems, |s| {
        out.push(s);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(summary.seen, 8);
    assert_eq!(summary.yielded, out.len());
    (out, problems)
}

/// k / 8 + offset, k = c·16 + i·4 + j, for the (3, 4, 4) maps.
fn expected(sign: f32, offset: f32) -> Vec<f32> {
    (0..48).map(|k| sign * k as f32 / 8.0 + offset).collect()
}

#[test]
fn samples_maps_and_problems() {
    let (samples, problems) = read(&Phase2Options::default());
    // Kept: 0 (bfloat16), 1 (float32), 7 (float16).
    assert_eq!(
        samples.iter().map(|s| s.index).collect::<Vec<_>>(),
        [0, 1, 7]
    );
    let s0 = &samples[0];
    assert_eq!(s0.img_id, "2370799");
    assert_eq!(s0.relation, Relation::LeftOf);
    // The mapping sorts the names: above 0, below 1, is 2, to the left of 3.
    assert_eq!(s0.authors_label, Some(3));
    assert_eq!(s0.prompt_type, PromptType::Positive);
    assert_eq!(s0.timestep, 1);
    assert_eq!(s0.prompt.as_deref(), Some("A dog to the left of a cat"));
    assert_eq!(s0.objects, Some(["dog".to_string(), "cat".to_string()]));
    assert_eq!(s0.maps.dims(), [2, 3, 4, 4]);
    assert_eq!(s0.maps.dtype(), candle_core::DType::F32);
    let v = s0.maps.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v[..48], expected(1.0, 0.0)[..]);
    assert_eq!(v[48..], expected(-1.0, 0.0)[..]);
    // The recorded paths were the writing machine's; the files are found under the folder.
    assert!(s0.map_paths[0].starts_with(data("phase2/chunk_0__GPU_0")));

    let s1 = &samples[1];
    assert_eq!(s1.prompt_type, PromptType::Negative);
    assert_eq!(s1.relation, Relation::LeftOf);
    let v = s1.maps.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v[..48], expected(1.0, 1.0)[..]);
    assert_eq!(v[48..], expected(1.0, 2.0)[..]);

    let s7 = &samples[2];
    assert_eq!(
        (s7.relation, s7.timestep, s7.img_id.as_str()),
        (Relation::Below, 3, "2370801")
    );
    assert_eq!(s7.augmentation, None);
    let v = s7.maps.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v[..48], expected(1.0, 0.5)[..]);
    assert_eq!(v[48..], expected(1.0, -0.5)[..]);

    // 2: "is"; 3: the object's file was never written; 4: a dict; 5: collections.Counter,
    // refused by the pickle reader; 6: maps of side 8 where target_map_size is 4.
    let kinds: Vec<_> = problems.counts().iter().map(|(k, n)| (*k, *n)).collect();
    assert_eq!(
        kinds,
        vec![
            (ProblemKind::MissingMaps, 1),
            (ProblemKind::UnreadableMaps, 1),
            (ProblemKind::BadMaps, 2),
            (ProblemKind::RelationNotKept, 1),
        ]
    );
    let refused = problems
        .listed()
        .iter()
        .find(|p| p.kind == ProblemKind::UnreadableMaps)
        .unwrap();
    assert_eq!(refused.id, "sample 5");
    assert!(refused.detail.contains("collections"), "{}", refused.detail);
    let dict = problems
        .listed()
        .iter()
        .find(|p| p.id == "sample 4")
        .unwrap();
    assert!(dict.detail.contains("holds a dict"), "{}", dict.detail);
}

#[test]
fn map_size_check_can_be_turned_off() {
    let opts = Phase2Options {
        check_map_size: false,
        ..Phase2Options::default()
    };
    let (samples, problems) = read(&opts);
    let s6 = samples.iter().find(|s| s.index == 6).unwrap();
    assert_eq!(s6.maps.dims(), [2, 3, 8, 8]);
    assert_eq!(problems.count(ProblemKind::BadMaps), 1);
}
