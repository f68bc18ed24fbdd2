//! Seeded randomness for classifier training. candle draws its CPU random numbers from an
//! unseedable thread generator, so parameters initialised through a `VarMap` and candle's
//! `Dropout` masks differ on every run and two trainings on the same data never agree. Here both
//! come from ChaCha generators seeded by the training seed: the same data and settings train the
//! same classifier.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

/// A `VarMap` whose new variables are drawn, in creation order, from one seeded generator with
/// the distribution the model asks for (the same `Init` hints candle's own map honours).
pub struct SeededVarMap {
    map: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SeededVarMap {
    /// Creates its variables in `map` (a `VarMap` shares its contents with its clones, so the
    /// caller trains and saves them through `map` as usual).
    pub fn new(map: &VarMap, seed: u64) -> Self {
        Self {
            map: map.clone(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    fn draw(&self, shape: &Shape, init: Init) -> Result<Vec<f32>> {
        let n = shape.elem_count();
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("the initialiser's lock was poisoned".into()))?;
        let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Result<Vec<f32>> {
            let d = Normal::new(mean, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Ok((0..n).map(|_| d.sample(rng) as f32).collect())
        };
        let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
            if lo >= up {
                return vec![lo as f32; n];
            }
            let d = Uniform::new(lo, up);
            (0..n).map(|_| d.sample(rng) as f32).collect()
        };
        Ok(match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev)?,
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std)?,
                }
            }
        })
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(var) = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the variable map's lock was poisoned".into()))?
            .get(name)
        {
            if var.shape() != &s {
                candle_core::bail!(
                    "variable {name}: shape {:?} requested, {:?} exists",
                    s,
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.draw(&s, h)?;
        let tensor = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        self.map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the variable map's lock was poisoned".into()))?
            .insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("variable {name}: a seeded map creates variables only with a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.data().lock().is_ok_and(|d| d.contains_key(name))
    }
}

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
    use candle_nn::VarBuilder;

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
