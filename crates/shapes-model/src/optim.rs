//! AdamW and an exponential moving average of the weights, with state that can be saved and
//! restored (candle-nn's AdamW keeps its moments private, so a resumed run could not continue it).
//!
//! On the CPU in f32 each parameter's update is one pass over its buffers, written in place: the
//! composed form (kept for other devices and dtypes, and as the reference) runs about a dozen
//! candle ops per parameter, each allocating and filling a fresh buffer. The fused pass does the
//! same f32 operations in the same order, so its results are bit-identical to the composed ones.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};

/// Both moments of one parameter: host vectors updated in place on the CPU in f32, tensors
/// otherwise.
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Tensors { m: Tensor, v: Tensor },
}

/// Whether `var` takes the fused in-place path.
fn fused(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32 && var.is_contiguous()
}

impl Moments {
    fn zeros(var: &Var) -> Result<Self> {
        Ok(if fused(var) {
            let n = var.elem_count();
            Moments::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }
        } else {
            Moments::Tensors {
                m: var.zeros_like()?,
                v: var.zeros_like()?,
            }
        })
    }

    fn from_tensors(var: &Var, m: &Tensor, v: &Tensor) -> Result<Self> {
        for t in [m, v] {
            if t.shape() != var.shape() {
                candle_core::bail!(
                    "optimizer state of shape {:?} for a parameter of shape {:?}",
                    t.dims(),
                    var.dims()
                );
            }
        }
        Ok(if fused(var) {
            let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            Moments::Host {
                m: host(m)?,
                v: host(v)?,
            }
        } else {
            Moments::Tensors {
                m: m.copy()?,
                v: v.copy()?,
            }
        })
    }

    fn tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v } => (
                Tensor::from_slice(m, var.shape(), var.device())?,
                Tensor::from_slice(v, var.shape(), var.device())?,
            ),
            Moments::Tensors { m, v } => (m.clone(), v.clone()),
        })
    }
}

/// One step's constants, as candle's scalar ops see them: `t * a` is `t * (a as f32) + 0`,
/// `t / a` is `t * ((1 / a) as f32) + 0`, `t + a` is `t * 1 + (a as f32)`.
#[derive(Clone, Copy)]
struct AdamStep {
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    inv_c1: f32,
    inv_c2: f32,
    eps: f32,
    decay: f32,
    lr: f32,
}

impl AdamStep {
    /// The update of one element: (parameter, gradient, m, v) → new (parameter, m, v). The `+ 0.0`
    /// terms are those of candle's scalar multiply; they only ever turn −0 into +0, and keep the
    /// fused pass bit-identical to the composed one.
    #[inline(always)]
    fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let m = (m * self.b1 + 0.0) + (g * self.one_minus_b1 + 0.0);
        let v = (v * self.b2 + 0.0) + ((g * g) * self.one_minus_b2 + 0.0);
        let update = (m * self.inv_c1 + 0.0) / ((v * self.inv_c2 + 0.0).sqrt() * 1.0 + self.eps);
        let p = (p * self.decay + 0.0) - (update * self.lr + 0.0);
        (p, m, v)
    }
}

/// The fused update of one parameter, in place; the moments ride along in the op.
struct FusedAdamW<'a> {
    step: AdamStep,
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw-step: expects contiguous parameter and gradient");
        };
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adamw-step: only f32");
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if p.len() != g.len() || p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("adamw-step: parameter, gradient and moments differ in length");
        }
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            (*p, *m, *v) = self.step.apply(*p, g, *m, *v);
        }
        Ok(())
    }
}

pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: usize,
    /// Parameter name → (var, its moments).
    state: Vec<(String, Var, Moments)>,
}

impl AdamW {
    pub fn new(vars: &[(String, Var)], lr: f64, weight_decay: f64) -> Result<Self> {
        let state = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.clone(), Moments::zeros(v)?)))
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
        self.step_with(|var| grads.get(var.as_tensor()).cloned())
    }

    /// One update from the gradients `grad_of` returns (none: the parameter is left alone).
    pub fn step_with(&mut self, grad_of: impl Fn(&Var) -> Option<Tensor>) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        let consts = AdamStep {
            b1: b1 as f32,
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            inv_c1: (1.0 / c1) as f32,
            inv_c2: (1.0 / c2) as f32,
            eps: self.eps as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            lr: self.lr as f32,
        };
        for (_, var, moments) in self.state.iter_mut() {
            // Detached: a gradient carries the step's autograd graph, which the moments must not
            // keep alive from one step to the next.
            let Some(g) = grad_of(var).map(|g| g.detach()) else {
                continue;
            };
            match moments {
                Moments::Host { m, v } => {
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    let op = FusedAdamW {
                        step: consts,
                        m: RefCell::new(m.as_mut_slice()),
                        v: RefCell::new(v.as_mut_slice()),
                    };
                    var.as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Tensors { m, v } => {
                    *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
                    *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + self.eps)?)?;
                    let decayed = (var.as_tensor() * (1.0 - self.lr * self.weight_decay))?;
                    var.set(&(decayed - (update * self.lr)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// Moments as named tensors (`adam.m.<name>`, `adam.v.<name>`).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (n, var, moments) in &self.state {
            let (m, v) = moments.tensors(var)?;
            out.insert(format!("adam.m.{n}"), m);
            out.insert(format!("adam.v.{n}"), v);
        }
        Ok(out)
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (n, var, moments) in self.state.iter_mut() {
            if let (Some(tm), Some(tv)) = (
                tensors.get(&format!("adam.m.{n}")),
                tensors.get(&format!("adam.v.{n}")),
            ) {
                *moments = Moments::from_tensors(var, tm, tv)?;
            } else {
                candle_core::bail!("checkpoint has no optimizer state for `{n}`");
            }
        }
        self.step = step;
        Ok(())
    }
}

/// `shadow ← shadow · decay + weight · (1 − decay)` in place, as candle's composed ops round it.
struct FusedEma {
    decay: f32,
    one_minus_decay: f32,
}

impl InplaceOp2 for FusedEma {
    fn name(&self) -> &'static str {
        "ema-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((s0, s1_end)), Some((w0, w1))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("ema-step: expects contiguous tensors");
        };
        let (CpuStorage::F32(s), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("ema-step: only f32");
        };
        let (s, w) = (&mut s[s0..s1_end], &w[w0..w1]);
        if s.len() != w.len() {
            candle_core::bail!("ema-step: average and weight differ in length");
        }
        for (s, &w) in s.iter_mut().zip(w) {
            *s = (*s * self.decay + 0.0) + (w * self.one_minus_decay + 0.0);
        }
        Ok(())
    }
}

/// Exponential moving average of the weights, used for sampling.
pub struct Ema {
    pub decay: f64,
    /// Each average owns its storage (copied in `new` and `load`), so updating it in place
    /// changes nothing else.
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
        let op = FusedEma {
            decay: self.decay as f32,
            one_minus_decay: (1.0 - self.decay) as f32,
        };
        for (_, var, s) in self.shadow.iter_mut() {
            if fused(var) && s.dtype() == DType::F32 && s.is_contiguous() {
                s.inplace_op2(&var.as_tensor().detach(), &op)?;
            } else {
                *s = ((&*s * self.decay)? + (var.as_tensor().detach() * (1.0 - self.decay))?)?;
            }
        }
        Ok(())
    }

    /// The averages, copied: later updates in place do not reach them.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.shadow
            .iter()
            .map(|(n, _, s)| Ok((n.clone(), s.copy()?)))
            .collect()
    }

    pub fn load(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (n, _, s) in self.shadow.iter_mut() {
            *s = tensors
                .get(n)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("checkpoint has no averaged weight `{n}`"))
                })?
                .copy()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The values of a hand case: ordinary numbers, zeros of both signs, tiny and large
    /// gradients.
    fn case(dev: &Device) -> Result<Vec<(String, Var)>> {
        let p = Tensor::new(&[[0.5f32, -1.25, 0.0, -0.0], [3.0, 1e-6, -2e3, 0.125]], dev)?;
        let q = Tensor::new(&[0.75f32, -0.5, 2.0], dev)?;
        Ok(vec![
            ("a".into(), Var::from_tensor(&p)?),
            ("b".into(), Var::from_tensor(&q)?),
        ])
    }

    fn grads(step: usize, dev: &Device) -> Result<[Tensor; 2]> {
        let s = step as f32;
        Ok([
            Tensor::new(
                &[
                    [0.1f32 * s, -0.0, 0.0, 1e-9],
                    [-3.0, 2e-4 * s, 5.0, -0.25 / s],
                ],
                dev,
            )?,
            Tensor::new(&[1.0f32 / s, -7.5, 0.0], dev)?,
        ])
    }

    /// The fused in-place AdamW and EMA give exactly the composed ops' numbers (f64 parameters
    /// take the composed path), step after step, and a hand-computed first step.
    #[test]
    fn fused_steps_equal_the_composed_ones() -> Result<()> {
        let dev = Device::Cpu;
        let fast_vars = case(&dev)?;
        let ref_vars: Vec<(String, Var)> = case(&dev)?
            .into_iter()
            .map(|(n, v)| Ok((n, Var::from_tensor(&v.to_dtype(DType::F64)?)?)))
            .collect::<Result<_>>()?;
        let mut fast = AdamW::new(&fast_vars, 1e-3, 0.01)?;
        let mut fast_ema = Ema::new(&fast_vars, 0.995)?;
        // The composed path in f32 too: its moments and averages as tensors.
        let comp_vars = case(&dev)?;
        let mut comp = AdamW::new(&comp_vars, 1e-3, 0.01)?;
        for (_, var, m) in comp.state.iter_mut() {
            *m = Moments::Tensors {
                m: var.zeros_like()?,
                v: var.zeros_like()?,
            };
        }
        let mut comp_ema = Ema::new(&comp_vars, 0.995)?;
        let mut reference = AdamW::new(&ref_vars, 1e-3, 0.01)?;
        for step in 1..=5 {
            let g = grads(step, &dev)?;
            let pick = |vars: &[(String, Var)], v: &Var, dt: DType| {
                let i = vars
                    .iter()
                    .position(|(_, w)| w.as_tensor().id() == v.as_tensor().id())?;
                g[i].to_dtype(dt).ok()
            };
            fast.step_with(|v| pick(&fast_vars, v, DType::F32))?;
            comp.step_with(|v| pick(&comp_vars, v, DType::F32))?;
            reference.step_with(|v| pick(&ref_vars, v, DType::F64))?;
            fast_ema.update()?;
            // The composed EMA: the same formula on the same weights, as tensors.
            for (_, var, s) in comp_ema.shadow.iter_mut() {
                *s = ((&*s * 0.995)? + (var.as_tensor().detach() * (1.0 - 0.995))?)?;
            }
            for (i, ((_, a), (_, b))) in fast_vars.iter().zip(&comp_vars).enumerate() {
                let (a, b) = (
                    a.flatten_all()?.to_vec1::<f32>()?,
                    b.flatten_all()?.to_vec1::<f32>()?,
                );
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "parameter {i} at step {step}");
                let r = ref_vars[i].1.flatten_all()?.to_vec1::<f64>()?;
                for (x, y) in a.iter().zip(&r) {
                    assert!(
                        (*x as f64 - y).abs() <= 1e-6 * y.abs().max(1.0),
                        "f32 {x} vs f64 {y}"
                    );
                }
            }
            let (fe, ce) = (fast_ema.tensors()?, comp_ema.tensors()?);
            for n in ["a", "b"] {
                let (a, b) = (
                    fe[n].flatten_all()?.to_vec1::<f32>()?,
                    ce[n].flatten_all()?.to_vec1::<f32>()?,
                );
                assert_eq!(a, b, "average {n} at step {step}");
            }
            let (fs, cs) = (fast.state_tensors()?, comp.state_tensors()?);
            for (k, t) in &fs {
                let (a, b) = (
                    t.flatten_all()?.to_vec1::<f32>()?,
                    cs[k].flatten_all()?.to_vec1::<f32>()?,
                );
                assert_eq!(a, b, "{k} at step {step}");
            }
        }
        // Step 1 by hand for a[0][0] = 0.5 with g = 0.1: m̂ = g, v̂ = g², update = g/(|g| + ε).
        let mut one = AdamW::new(&case(&dev)?[..1], 1e-3, 0.01)?;
        let vars = one
            .state
            .iter()
            .map(|(_, v, _)| v.clone())
            .collect::<Vec<_>>();
        one.step_with(|_| grads(1, &dev).ok().map(|[a, _]| a))?;
        let got = vars[0].flatten_all()?.to_vec1::<f32>()?[0] as f64;
        let want = 0.5 * (1.0 - 1e-3 * 0.01) - 1e-3 * 0.1 / (0.1 + 1e-8);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        Ok(())
    }

    /// Saved state restores the same numbers, and the averages handed out are copies.
    #[test]
    fn state_round_trips_and_averages_are_copies() -> Result<()> {
        let dev = Device::Cpu;
        let vars = case(&dev)?;
        let mut opt = AdamW::new(&vars, 1e-3, 0.01)?;
        let mut ema = Ema::new(&vars, 0.9)?;
        let g = grads(1, &dev)?;
        let pick = |v: &Var| {
            let i = vars
                .iter()
                .position(|(_, w)| w.as_tensor().id() == v.as_tensor().id())?;
            Some(g[i].clone())
        };
        opt.step_with(pick)?;
        ema.update()?;
        let saved = opt.state_tensors()?;
        let before = ema.tensors()?;
        let snapshot = before["a"].flatten_all()?.to_vec1::<f32>()?;
        let mut other = AdamW::new(&vars, 1e-3, 0.01)?;
        other.load_state(&saved, 1)?;
        let restored = other.state_tensors()?;
        for (k, t) in &saved {
            assert_eq!(
                t.flatten_all()?.to_vec1::<f32>()?,
                restored[k].flatten_all()?.to_vec1::<f32>()?,
                "{k}"
            );
        }
        opt.step_with(pick)?;
        ema.update()?;
        assert_eq!(before["a"].flatten_all()?.to_vec1::<f32>()?, snapshot);
        Ok(())
    }
}
