//! Seeded parameter initialisation. candle draws its CPU random numbers from an unseedable
//! thread generator, so parameters initialised through a plain `VarMap` differ on every run;
//! here they come from a ChaCha generator seeded by the caller, so one seed gives one model.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarMap;
use rand::SeedableRng;
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
