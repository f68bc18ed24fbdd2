//! The steering loop on a toy model whose attention maps are Gaussian blobs at positions held in
//! the latent: the centroid loss must move the subject's blob to the left of the object's, and a
//! non-finite gradient must be skipped without touching the latent.

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use l2s_diffusion::{sample, Denoiser, Guidance, Scheduler};
use l2s_eval::Relation;
use l2s_models::{AttentionObserver, AttentionSite};
use l2s_steer::losses::CentroidLoss;
use l2s_steer::maps::WordPair;
use l2s_steer::steering::{SteerConfig, SteerGoal, SteerLoss, SteerReport, Steering, UpdateRule};

const S: usize = 16;

/// z = (1, 2): horizontal blob centres (in [0, 1]) of subject and object. Its one "attention
/// layer" reports tokens 1 and 2 as the two blobs; its prediction is zero.
struct Blobs;

impl Denoiser for Blobs {
    type Cond = ();
    fn predict(&mut self, z: &Tensor, _t: f64, _: &()) -> l2s_diffusion::Result<Tensor> {
        Ok(z.zeros_like()?)
    }
    fn predict_observed(
        &mut self,
        z: &Tensor,
        t: f64,
        cond: &(),
        observer: &mut dyn AttentionObserver,
    ) -> l2s_diffusion::Result<Tensor> {
        let cols: Vec<f32> = (0..S * S)
            .map(|q| ((q % S) as f32 + 0.5) / S as f32)
            .collect();
        let cols = Tensor::from_vec(cols, (1, S * S), z.device())?;
        let centres = z.reshape((2, 1))?;
        let d = cols.broadcast_sub(&centres)?.sqr()?; // (2, S·S)
        let maps = candle_nn::ops::softmax(&(d * -50.0)?, D::Minus1)?;
        let start = Tensor::zeros((1, S * S), maps.dtype(), z.device())?;
        // (batch 1, heads 1, queries S·S, tokens 3)
        let probs = Tensor::cat(&[&start, &maps], 0)?
            .t()?
            .reshape((1, 1, S * S, 3))?;
        let site = AttentionSite {
            layer: "blobs".into(),
            height: S,
            width: S,
            heads: 1,
            tokens: 3,
        };
        observer.observe(&site, &probs)?;
        self.predict(z, t, cond)
    }
}

/// A schedule whose steps leave the latent where it is.
struct Still(usize);

impl Scheduler for Still {
    fn name(&self) -> &'static str {
        "still"
    }
    fn num_steps(&self) -> usize {
        self.0
    }
    fn model_time(&self, index: usize) -> f64 {
        (self.0 - index) as f64
    }
    fn timestep(&self, index: usize) -> usize {
        self.0 - index
    }
    fn step_at(&self, _: usize, _: &Tensor, z: &Tensor) -> l2s_diffusion::Result<Tensor> {
        Ok(z.clone())
    }
}

/// The one sampling loop with the steering hook.
fn steered_sample(
    steps: usize,
    loss: &dyn SteerLoss,
    triplets: &[SteerGoal],
    cfg: &SteerConfig,
    z0: Tensor,
) -> Result<(Tensor, SteerReport)> {
    let mut hook = Steering::new(loss, triplets, cfg);
    let z = sample(
        &mut Blobs,
        &Still(steps),
        z0,
        &Guidance::Unguided(()),
        &mut hook,
    )?;
    Ok((z, hook.report))
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
    let (z, report) = steered_sample(20, &loss, &[triplet(Relation::LeftOf)], &cfg, z0).unwrap();
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
        steered_sample(20, &loss, &[triplet(Relation::LeftOf)], &cfg, z0)
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
    fn loss(
        &self,
        maps: &Tensor,
        _t: &SteerGoal,
        _step: usize,
    ) -> l2s_steer::error::Result<Tensor> {
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
    let (z, report) =
        steered_sample(4, &NanLoss, &[triplet(Relation::LeftOf)], &cfg, z0.clone()).unwrap();
    assert_eq!(report.skipped_nonfinite, 6);
    assert_eq!(report.iterations, 0);
    assert_eq!(
        z.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.7, 0.3]
    );
}
