//! The relation classifier shipped with the built-in shapes model: it belongs to that model, reads
//! maps of the layout it was trained on, and its steering.json is a schedule the steering loop
//! accepts.

use candle_core::{DType, Device, Tensor};
use l2s_models::{LoadOptions, Pipeline};
use l2s_shapes_model::embedded;
use l2s_steer::steering::{SteerConfig, UpdateRule};
use l2s_steer::train::load_classifier;

#[test]
fn builtin_classifier_loads_for_the_builtin_model() {
    let model = Pipeline::load(
        &embedded::model_dir().unwrap(),
        &LoadOptions::default(),
        None,
    )
    .unwrap();
    let id = model.fingerprint().unwrap();
    let dir = embedded::classifier_dir().unwrap();
    let (clf, meta) = load_classifier(&dir, Some(&id), None, &Device::Cpu, DType::F32).unwrap();
    assert!(meta.dual_inversion);
    assert_eq!(meta.num_inference_steps, Some(20));
    let classes = meta.relations.len();
    assert_eq!(classes, clf.config().classes);
    let maps = Tensor::zeros(
        (3, 2, meta.num_maps, meta.map_size, meta.map_size),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let steps = Tensor::new(
        &[0u32, 1, (meta.step_indices.len() - 1) as u32],
        &Device::Cpu,
    )
    .unwrap();
    let logits = clf.forward(&maps, &steps, false).unwrap();
    assert_eq!(logits.dims(), [3, classes]);
    let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite()), "{values:?}");
}

#[test]
fn builtin_classifier_is_refused_on_another_model() {
    let dir = embedded::classifier_dir().unwrap();
    let err = load_classifier(
        &dir,
        Some("unet-0000000000000000"),
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err();
    assert!(err.to_string().contains("unet-0000000000000000"), "{err}");
}

#[test]
fn builtin_schedule_is_a_steering_config() {
    let s = embedded::classifier_steering().unwrap();
    assert_eq!(s.sampling_steps, 20);
    let cfg: SteerConfig = serde_json::from_value(s.steer).unwrap();
    assert_eq!(cfg.steer_steps, 10);
    assert_eq!(cfg.max_iterations, 3);
    assert_eq!(cfg.step_size, 0.1);
    assert_eq!(cfg.update, UpdateRule::Normalized);
    assert_eq!(cfg.stop_below, Some(0.1));
    // The file on disk is the embedded one.
    let text =
        std::fs::read_to_string(embedded::classifier_dir().unwrap().join("steering.json")).unwrap();
    let parsed: embedded::TunedSteering = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed, embedded::classifier_steering().unwrap());
}
