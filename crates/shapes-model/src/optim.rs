//! AdamW and an exponential moving average of the weights, with state that can be saved and
//! restored (candle-nn's AdamW keeps its moments private, so a resumed run could not continue it).

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: usize,
    /// Parameter name → (var, first moment, second moment).
    state: Vec<(String, Var, Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(vars: &[(String, Var)], lr: f64, weight_decay: f64) -> Result<Self> {
        let state = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.clone(), v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            state,
        })
    }

    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        for (_, var, m, v) in self.state.iter_mut() {
            // Detached: a gradient carries the step's autograd graph, which the moments must not
            // keep alive from one step to the next.
            let Some(g) = grads.get(var.as_tensor()).map(|g| g.detach()) else {
                continue;
            };
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - self.lr * self.weight_decay))?;
            var.set(&(decayed - (update * self.lr)?)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`adam.m.<name>`, `adam.v.<name>`).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (n, _, m, v) in &self.state {
            out.insert(format!("adam.m.{n}"), m.clone());
            out.insert(format!("adam.v.{n}"), v.clone());
        }
        out
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (n, _, m, v) in self.state.iter_mut() {
            if let (Some(tm), Some(tv)) = (
                tensors.get(&format!("adam.m.{n}")),
                tensors.get(&format!("adam.v.{n}")),
            ) {
                *m = tm.clone();
                *v = tv.clone();
            } else {
                candle_core::bail!("checkpoint has no optimizer state for `{n}`");
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Exponential moving average of the weights, used for sampling.
pub struct Ema {
    pub decay: f64,
    shadow: Vec<(String, Var, Tensor)>,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    pub fn update(&mut self) -> Result<()> {
        for (_, var, s) in self.shadow.iter_mut() {
            *s = ((&*s * self.decay)? + (var.as_tensor().detach() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.shadow
            .iter()
            .map(|(n, _, s)| (n.clone(), s.clone()))
            .collect()
    }

    pub fn load(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (n, _, s) in self.shadow.iter_mut() {
            *s = tensors
                .get(n)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("checkpoint has no averaged weight `{n}`"))
                })?
                .clone();
        }
        Ok(())
    }
}
