//! The steering loop on a toy model whose attention maps are Gaussian blobs at positions held in
//! the latent: the centroid loss must move the subject's blob to the left of the object's, and a
//! non-finite gradient must be skipped without touching the latent.

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use l2s_eval::Relation;
use l2s_steer::losses::CentroidLoss;
use l2s_steer::maps::WordPair;
use l2s_steer::steering::{
    steered_sample, SteerConfig, SteerLoss, SteerTarget, SteerTriplet, UpdateRule,
};

const S: usize = 16;

/// z = (1, 2): horizontal blob centres (in [0, 1]) of subject and object.
struct Blobs {
    steps: usize,
}

impl SteerTarget for Blobs {
    fn timesteps(&self) -> Vec<usize> {
        (0..self.steps).rev().collect()
    }
    fn relation_maps(&mut self, z: &Tensor, _t: usize, _pair: &WordPair) -> Result<Tensor> {
        let cols: Vec<f32> = (0..S * S)
            .map(|q| ((q % S) as f32 + 0.5) / S as f32)
            .collect();
        let cols = Tensor::from_vec(cols, (1, S * S), z.device())?;
        let centres = z.reshape((2, 1))?;
        let d = cols.broadcast_sub(&centres)?.sqr()?; // (2, S·S)
        let logits = (d * -50.0)?;
        let maps = candle_nn::ops::softmax(&logits, D::Minus1)?;
        Ok(maps.reshape((2, 1, S, S))?)
    }
    fn denoise(&mut self, z: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(z.clone())
    }
}

fn triplet(relation: Relation) -> SteerTriplet {
    SteerTriplet {
        pair: WordPair {
            subject: vec![1],
            object: vec![2],
        },
        label: 0,
        relation,
    }
}

#[test]
fn centroid_steering_moves_the_subject_left() {
    let z0 = Tensor::new(&[[0.7f32, 0.3]], &Device::Cpu).unwrap();
    let cfg = SteerConfig {
        steer_steps: 10,
        max_iterations: 5,
        step_size: 0.02,
        update: UpdateRule::Normalized,
        stop_below: None,
    };
    let loss = CentroidLoss { margin: 0.1 };
    let (z, report) = steered_sample(
        &mut Blobs { steps: 20 },
        &loss,
        &[triplet(Relation::LeftOf)],
        &cfg,
        z0,
        &mut |_, _| {},
    )
    .unwrap();
    let v = z.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        v[0] + 0.05 < v[1],
        "subject {} should now be left of object {}",
        v[0],
        v[1]
    );
    assert!(report.first_losses[0] > 0.4, "{:?}", report.first_losses);
    assert!(
        report.final_loss().unwrap() < 1e-3,
        "{:?}",
        report.last_losses
    );
    assert!(report.iterations > 0 && report.skipped_nonfinite == 0);
    // Once satisfied, steps stop at the threshold without further updates.
    assert_eq!(report.last_losses.len(), 10);
}

#[test]
fn stop_below_ends_each_steps_iterations_once_the_loss_is_met() {
    let run = |stop_below| {
        let cfg = SteerConfig {
            steer_steps: 10,
            max_iterations: 5,
            step_size: 0.02,
            update: UpdateRule::Normalized,
            stop_below,
        };
        let z0 = Tensor::new(&[[0.7f32, 0.3]], &Device::Cpu).unwrap();
        let loss = CentroidLoss { margin: 0.1 };
        steered_sample(
            &mut Blobs { steps: 20 },
            &loss,
            &[triplet(Relation::LeftOf)],
            &cfg,
            z0,
            &mut |_, _| {},
        )
        .unwrap()
        .1
    };
    let full = run(None);
    let early = run(Some(0.3));
    assert!(
        early.iterations < full.iterations,
        "{} vs {}",
        early.iterations,
        full.iterations
    );
    // Once a step starts under the threshold it takes no update, so every later step does too.
    let first_met = early
        .first_losses
        .iter()
        .position(|&l| l < 0.3)
        .expect("the loss was met");
    assert!(
        early.first_losses[first_met..].iter().all(|&l| l < 0.3),
        "{:?}",
        early.first_losses
    );
    assert!(early.first_losses[..first_met].iter().all(|&l| l >= 0.3));
    // Steps before that one ran until the loss was met or their iterations were used up.
    assert!(early.final_loss().unwrap() < 0.3);
    assert!(full.final_loss().unwrap() < early.final_loss().unwrap());
}

/// A loss whose gradient is NaN.
struct NanLoss;

impl SteerLoss for NanLoss {
    fn name(&self) -> &str {
        "nan"
    }
    fn loss(&self, maps: &Tensor, _t: &SteerTriplet, _step: usize) -> Result<Tensor> {
        // sqrt at a negative point: NaN value and gradient.
        Ok((maps.sum_all()? - 10.0)?.sqrt()?)
    }
    fn threshold(&self, _step: usize) -> f64 {
        -1.0
    }
}

#[test]
fn nonfinite_gradients_are_skipped() {
    let z0 = Tensor::new(&[[0.7f32, 0.3]], &Device::Cpu).unwrap();
    let cfg = SteerConfig {
        steer_steps: 2,
        max_iterations: 3,
        step_size: 1.0,
        update: UpdateRule::Raw,
        stop_below: None,
    };
    let (z, report) = steered_sample(
        &mut Blobs { steps: 4 },
        &NanLoss,
        &[triplet(Relation::LeftOf)],
        &cfg,
        z0.clone(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(report.skipped_nonfinite, 6);
    assert_eq!(report.iterations, 0);
    assert_eq!(
        z.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.7, 0.3]
    );
}
