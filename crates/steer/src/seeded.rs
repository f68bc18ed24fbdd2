//! Seeded randomness for classifier training. candle draws its CPU random numbers from an
//! unseedable thread generator, so parameters initialised through a `VarMap` and candle's
//! `Dropout` masks differ on every run and two trainings on the same data never agree. Here both
//! come from ChaCha generators seeded by the training seed: the same data and settings train the
//! same classifier.

use std::sync::{Arc, Mutex};

use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use l2s_models::seeded::SeededVarMap;

/// The generator every dropout layer of one model draws its masks from, in forward order.
#[derive(Clone, Debug)]
pub struct MaskRng(Arc<Mutex<ChaCha8Rng>>);

impl MaskRng {
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))))
    }

    /// Restarts the sequence from `seed`.
    pub fn reseed(&self, seed: u64) {
        if let Ok(mut rng) = self.0.lock() {
            *rng = ChaCha8Rng::seed_from_u64(seed);
        }
    }
}

/// Inverted dropout (kept values scaled by 1/(1−p)) with masks from a [`MaskRng`].
#[derive(Clone, Debug)]
pub struct Dropout {
    p: f32,
    rng: MaskRng,
}

impl Dropout {
    pub fn new(p: f32, rng: &MaskRng) -> Self {
        Self {
            p,
            rng: rng.clone(),
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = 1.0 / keep;
        let n = x.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self.rng.0.lock().map_err(|_| {
                candle_core::Error::Msg("the dropout generator's lock was poisoned".into())
            })?;
            (0..n)
                .map(|_| if rng.gen::<f32>() < keep { scale } else { 0.0 })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        x * mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarBuilder;
    use candle_nn::VarMap;

    fn linear_weights(seed: u64) -> Vec<f32> {
        let map = SeededVarMap::new(&VarMap::new(), seed);
        let vb = VarBuilder::from_backend(Box::new(map), DType::F32, Device::Cpu);
        let l = candle_nn::linear(64, 32, vb.pp("fc")).unwrap();
        l.weight().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let a = linear_weights(3);
        assert_eq!(a, linear_weights(3));
        assert_ne!(a, linear_weights(4));
        // candle's Linear asks for Kaiming-normal weights with ReLU's gain: variance 2/fan_in.
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|w| (w - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var / (2.0 / 64.0) - 1.0).abs() < 0.1, "{var}");
    }

    #[test]
    fn the_callers_map_holds_what_it_created() {
        let vars = VarMap::new();
        let vb = VarBuilder::from_backend(
            Box::new(SeededVarMap::new(&vars, 0)),
            DType::F32,
            Device::Cpu,
        );
        let l = candle_nn::linear(4, 2, vb.pp("fc")).unwrap();
        let data = vars.data().lock().unwrap();
        assert_eq!(data.len(), 2);
        let w: Vec<f32> = data["fc.weight"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            w,
            l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn dropout_is_seeded_and_keeps_the_expectation() {
        let x = Tensor::ones(10_000, DType::F32, &Device::Cpu).unwrap();
        let mask = |seed| {
            let d = Dropout::new(0.3, &MaskRng::new(seed));
            d.forward(&x, true).unwrap().to_vec1::<f32>().unwrap()
        };
        let a = mask(1);
        assert_eq!(a, mask(1));
        assert_ne!(a, mask(2));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!((mean - 1.0).abs() < 0.03, "{mean}");
        let kept = a.iter().filter(|v| **v > 0.0).count() as f32 / a.len() as f32;
        assert!((kept - 0.7).abs() < 0.02, "{kept}");
        let d = Dropout::new(0.3, &MaskRng::new(1));
        assert_eq!(
            d.forward(&x, false).unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; 10_000]
        );
    }
}
