//! Handcrafted losses on hand-made maps, and the learned loss's step mapping.

use candle_core::{Device, Tensor};
use l2s_eval::Relation;
use l2s_steer::classifier::{ClassifierConfig, RelationClassifier};
use l2s_steer::losses::{AttendExciteLoss, CentroidLoss, LearnedLoss};
use l2s_steer::maps::WordPair;
use l2s_steer::steering::{SteerGoal, SteerLoss};

const S: usize = 16;

/// (2, 1, S, S): each word's map is a single hot pixel at the given (row, col).
fn hot(subject: (usize, usize), object: (usize, usize)) -> Tensor {
    let mut v = vec![0f32; 2 * S * S];
    v[subject.0 * S + subject.1] = 1.0;
    v[S * S + object.0 * S + object.1] = 1.0;
    Tensor::from_vec(v, (2, 1, S, S), &Device::Cpu).unwrap()
}

fn triplet(relation: Relation) -> SteerGoal {
    SteerGoal {
        pair: WordPair {
            subject: vec![1],
            object: vec![2],
        },
        label: 0,
        relation,
    }
}

fn value(t: Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

#[test]
fn centroid_hinge_by_hand() {
    let loss = CentroidLoss { margin: 0.1 };
    // Subject at column 2, object at column 12: centres (2.5/16, 12.5/16).
    let maps = hot((8, 2), (8, 12));
    let left = value(loss.loss(&maps, &triplet(Relation::LeftOf), 0).unwrap());
    assert!(left.abs() < 1e-6, "already left by 10/16 > margin: {left}");
    let right = value(loss.loss(&maps, &triplet(Relation::RightOf), 0).unwrap());
    // relu(cx_o − cx_s + 0.1) = 10/16 + 0.1
    assert!((right - (10.0 / 16.0 + 0.1)).abs() < 1e-5, "{right}");
    // Vertical: subject row 3, object row 9; y grows downwards, so the subject is above.
    let maps = hot((3, 5), (9, 5));
    assert!(value(loss.loss(&maps, &triplet(Relation::Above), 0).unwrap()).abs() < 1e-6);
    let below = value(loss.loss(&maps, &triplet(Relation::Below), 0).unwrap());
    assert!((below - (6.0 / 16.0 + 0.1)).abs() < 1e-5, "{below}");
}

#[test]
fn attend_excite_prefers_concentrated_maps() {
    let ae = AttendExciteLoss::new(50, &Device::Cpu).unwrap();
    let peaked = value(
        ae.loss(&hot((4, 4), (10, 10)), &triplet(Relation::LeftOf), 0)
            .unwrap(),
    );
    let flat = Tensor::full(1.0 / (S * S) as f32, (2, 1, S, S), &Device::Cpu).unwrap();
    let spread = value(ae.loss(&flat, &triplet(Relation::LeftOf), 0).unwrap());
    assert!(
        peaked < spread,
        "peaked {peaked} should be below flat {spread}"
    );
    // Refinement at steps 0, 10, 20 of 50 (targets 0.95, 0.5, 0.2); one update elsewhere.
    assert!((ae.threshold(0) - 0.95).abs() < 1e-9 && (ae.threshold(10) - 0.5).abs() < 1e-9);
    assert!((ae.threshold(20) - 0.2).abs() < 1e-9 && ae.threshold(5) == 0.0);
    assert_eq!(ae.max_iterations(5, 16), 1);
    assert_eq!(ae.max_iterations(10, 16), 16);
}

#[test]
fn learned_loss_maps_steps_like_the_paper() {
    let cfg = ClassifierConfig::sd(1, 6, 4);
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &Device::Cpu);
    let classifier = RelationClassifier::new(&cfg, vb).unwrap();
    let relations: Vec<String> = Relation::ALL.iter().map(|r| r.name().to_string()).collect();
    let mut loss = LearnedLoss {
        classifier,
        step_indices: vec![5, 10, 15, 20, 25, 49],
        build_steps: 50,
        run_steps: 50,
        relations,
        map_layout: Default::default(),
    };
    // 0–5 → 5 (slot 0), 6–10 → 10, …, past 25 → the last slot.
    let slots: Vec<usize> = [0, 5, 6, 10, 11, 24, 25, 26, 49]
        .iter()
        .map(|&s| loss.step_slot(s))
        .collect();
    assert_eq!(slots, vec![0, 0, 1, 1, 2, 4, 4, 5, 5]);
    // A 20-step run maps onto the 50-step training run: step 4 ≈ 10 → slot 1.
    loss.run_steps = 20;
    assert_eq!(loss.step_slot(4), 1);
    assert_eq!(loss.label(Relation::Below).unwrap(), 3);
    assert_eq!(loss.threshold(0), 1e-5);
    assert_eq!(loss.threshold(7), 7e-5);
    // The loss is a finite cross-entropy on (2, C, S, S) maps.
    let v = value(
        loss.loss(&hot((1, 1), (2, 2)), &triplet(Relation::LeftOf), 3)
            .unwrap(),
    );
    assert!(v.is_finite() && v > 0.0);
}
