//! A classifier is tied to the model whose attention it read: the fingerprint is stable for the
//! same weights and differs between models.

use std::path::PathBuf;

use l2s_models::{LoadOptions, StableDiffusion};
use l2s_steer::method::model_id;

fn load(name: &str) -> StableDiffusion {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .join("model");
    StableDiffusion::load(&dir, &LoadOptions::default()).unwrap()
}

#[test]
fn fingerprint_is_stable_and_model_specific() {
    let (a, b) = (load("sd1-tiny"), load("sd2-tiny"));
    let id_a = model_id(&a).unwrap();
    assert_eq!(id_a, model_id(&a).unwrap());
    assert_ne!(id_a, model_id(&b).unwrap());
    assert!(id_a.starts_with("unet-") && id_a.len() == 5 + 16, "{id_a}");
}
