//! The sampling and inversion loops with toy denoisers whose answers are known in closed form.

use candle_core::{DType, Device, Tensor, Var};
use l2s_diffusion::{
    ddim_invert, sample, AfterStep, BetaSchedule, DdimConfig, DdimInverseScheduler, DdimScheduler,
    Denoiser, Guidance, NoHook, PredictionType, Result, StepContext, StepControl,
};

fn sd_config(prediction_type: PredictionType, set_alpha_to_one: bool) -> DdimConfig {
    DdimConfig {
        beta_schedule: BetaSchedule::ScaledLinear,
        beta_start: 0.00085,
        beta_end: 0.012,
        clip_sample: false,
        set_alpha_to_one,
        steps_offset: 1,
        prediction_type,
        ..DdimConfig::default()
    }
}

fn randn(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    // A small deterministic generator, so the tests do not depend on candle's RNG.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|_| {
            let mut u = [0f64; 2];
            for x in &mut u {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *x = ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            }
            (-2.0 * u[0].ln()).sqrt() * (2.0 * std::f64::consts::PI * u[1]).cos()
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The exact denoiser of a point mass: the data is the conditioning tensor m itself. Then
/// ε(z, t) = (z − √ᾱ_t·m)/√(1−ᾱ_t), the x₀ estimate is m at every step, and DDIM keeps ε fixed,
/// so sampling from any z_T ends at √ᾱ_end·m + √(1−ᾱ_end)·ε_T.
struct PointMass {
    alphas: Vec<f64>,
    prediction_type: PredictionType,
    calls: usize,
}

impl Denoiser for PointMass {
    type Cond = Tensor;
    fn predict(&mut self, z: &Tensor, t: f64, m: &Tensor) -> Result<Tensor> {
        self.calls += 1;
        assert_eq!(
            z.dims(),
            m.dims(),
            "latents and conditioning batch must agree"
        );
        let a = self.alphas[t as usize];
        let eps = (z - m.affine(a.sqrt(), 0.0)?)?.affine(1.0 / (1.0 - a).sqrt(), 0.0)?;
        Ok(match self.prediction_type {
            PredictionType::Epsilon => eps,
            PredictionType::Sample => m.clone(),
            PredictionType::VPrediction => {
                (eps.affine(a.sqrt(), 0.0)? - m.affine((1.0 - a).sqrt(), 0.0)?)?
            }
        })
    }
}

#[test]
fn point_mass_is_reached_exactly_for_every_prediction_type() {
    for pt in [
        PredictionType::Epsilon,
        PredictionType::VPrediction,
        PredictionType::Sample,
    ] {
        for set_alpha_to_one in [true, false] {
            let mut s = DdimScheduler::new(sd_config(pt, set_alpha_to_one)).unwrap();
            s.set_timesteps(50).unwrap();
            let m = randn(1, &[2, 4, 8, 8], DType::F64);
            let z_t = randn(2, &[2, 4, 8, 8], DType::F64);
            let mut d = PointMass {
                alphas: s.alphas_cumprod().to_vec(),
                prediction_type: pt,
                calls: 0,
            };
            let z0 = sample(
                &mut d,
                &s,
                z_t.clone(),
                &Guidance::Unguided(m.clone()),
                &mut NoHook,
            )
            .unwrap();
            assert_eq!(d.calls, 50);
            // Closed form: ε_T = (z_T − √ᾱ_T m)/√(1−ᾱ_T); end at √ᾱ_end m + √(1−ᾱ_end) ε_T.
            let a_t = s.alphas_cumprod()[s.timesteps()[0]];
            let a_end = s.final_alpha_cumprod();
            let eps = (&z_t - m.affine(a_t.sqrt(), 0.0).unwrap())
                .unwrap()
                .affine(1.0 / (1.0 - a_t).sqrt(), 0.0)
                .unwrap();
            let want = (m.affine(a_end.sqrt(), 0.0).unwrap()
                + eps.affine((1.0 - a_end).sqrt(), 0.0).unwrap())
            .unwrap();
            let err = max_abs_diff(&z0, &want);
            assert!(
                err < 1e-10,
                "{pt:?} set_alpha_to_one={set_alpha_to_one}: error {err:e}"
            );
            if set_alpha_to_one {
                assert!(max_abs_diff(&z0, &m) < 1e-10);
            }
        }
    }
}

#[test]
fn guidance_moves_the_point_mass_and_batched_equals_two_pass() {
    let mut s = DdimScheduler::new(sd_config(PredictionType::Epsilon, true)).unwrap();
    s.set_timesteps(20).unwrap();
    let alphas = s.alphas_cumprod().to_vec();
    let (mu, mc) = (
        randn(3, &[1, 4, 4, 4], DType::F32),
        randn(4, &[1, 4, 4, 4], DType::F32),
    );
    let z_t = randn(5, &[1, 4, 4, 4], DType::F32);
    let scale = 7.5;
    // ε is affine in m, so guidance gives the point mass at mu + scale·(mc − mu).
    let want = (&mu + (&mc - &mu).unwrap().affine(scale, 0.0).unwrap()).unwrap();

    let mut d = PointMass {
        alphas: alphas.clone(),
        prediction_type: PredictionType::Epsilon,
        calls: 0,
    };
    let batched = Guidance::batched_tensors(&mu, &mc, scale).unwrap();
    let a = sample(&mut d, &s, z_t.clone(), &batched, &mut NoHook).unwrap();
    assert_eq!(d.calls, 20, "one batched call per step");

    let mut d2 = PointMass {
        alphas,
        prediction_type: PredictionType::Epsilon,
        calls: 0,
    };
    let two = Guidance::TwoPass {
        uncond: mu.clone(),
        cond: mc.clone(),
        scale,
    };
    let b = sample(&mut d2, &s, z_t, &two, &mut NoHook).unwrap();
    assert_eq!(d2.calls, 40, "two calls per step");

    let scale_of = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        max_abs_diff(&a, &want) < 1e-5 * scale_of,
        "batched: {}",
        max_abs_diff(&a, &want)
    );
    assert!(
        max_abs_diff(&a, &b) < 1e-5 * scale_of,
        "batched vs two-pass: {}",
        max_abs_diff(&a, &b)
    );
}

/// ε(z) = k·z with k from the conditioning (one scalar per batch row).
struct Linear;

impl Denoiser for Linear {
    type Cond = Tensor;
    fn predict(&mut self, z: &Tensor, _t: f64, k: &Tensor) -> Result<Tensor> {
        Ok(z.broadcast_mul(&k.reshape((k.dim(0)?, 1, 1, 1))?)?)
    }
}

#[test]
fn linear_denoiser_matches_the_hand_computed_product_and_its_gradient() {
    let mut s = DdimScheduler::new(sd_config(PredictionType::Epsilon, false)).unwrap();
    s.set_timesteps(10).unwrap();
    let (ku, kc, scale) = (0.3, 0.9, 3.0);
    // Guided ε = k·z with k = ku + scale·(kc − ku). One DDIM step multiplies z by
    // c_t = √ᾱ_prev·(1 − k√(1−ᾱ_t))/√ᾱ_t + k·√(1−ᾱ_prev).
    let k = ku + scale * (kc - ku);
    let ac = s.alphas_cumprod();
    let mut factor = 1.0f64;
    for &t in s.timesteps() {
        let a = ac[t];
        let ap = match s.previous_timestep(t).unwrap() {
            Some(p) => ac[p],
            None => s.final_alpha_cumprod(),
        };
        factor *= ap.sqrt() * (1.0 - k * (1.0 - a).sqrt()) / a.sqrt() + k * (1.0 - ap).sqrt();
    }

    let z = Var::from_tensor(&randn(6, &[1, 2, 3, 3], DType::F64)).unwrap();
    let dev = Device::Cpu;
    let guidance = Guidance::batched_tensors(
        &Tensor::new(&[ku], &dev).unwrap(),
        &Tensor::new(&[kc], &dev).unwrap(),
        scale,
    )
    .unwrap();
    let mut seen = Vec::new();
    let out = sample(
        &mut Linear,
        &s,
        z.as_tensor().clone(),
        &guidance,
        &mut AfterStep(|step: &StepContext, _: &Tensor, _: &Tensor| {
            seen.push((step.index, step.timestep));
            Ok(StepControl::Continue)
        }),
    )
    .unwrap();
    let want = z.as_tensor().affine(factor, 0.0).unwrap();
    assert!(max_abs_diff(&out, &want) < 1e-9 * factor.abs().max(1.0));
    assert_eq!(
        seen,
        s.timesteps()
            .iter()
            .copied()
            .enumerate()
            .collect::<Vec<_>>()
    );

    // The loop is differentiable: d(sum z_0)/dz_T = factor everywhere.
    let grads = out.sum_all().unwrap().backward().unwrap();
    let g = grads
        .get(z.as_tensor())
        .expect("gradient reaches the initial latents");
    let err = max_abs_diff(g, &g.ones_like().unwrap().affine(factor, 0.0).unwrap());
    assert!(err < 1e-9, "gradient error {err:e}");
}

#[test]
fn callback_can_replace_latents_and_stop() {
    let mut s = DdimScheduler::new(sd_config(PredictionType::Epsilon, true)).unwrap();
    s.set_timesteps(10).unwrap();
    let z = randn(7, &[1, 1, 2, 2], DType::F32);
    let k = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
    let mut steps = 0;
    let out = sample(
        &mut Linear,
        &s,
        z.clone(),
        &Guidance::Unguided(k.clone()),
        &mut AfterStep(|step: &StepContext, latents: &Tensor, _: &Tensor| {
            steps += 1;
            Ok(match step.index {
                0 => StepControl::Replace(latents.zeros_like()?),
                3 => StepControl::Stop,
                _ => StepControl::Continue,
            })
        }),
    )
    .unwrap();
    assert_eq!(steps, 4);
    assert_eq!(
        max_abs_diff(&out, &z.zeros_like().unwrap()),
        0.0,
        "zeros stay zeros under ε = k·z"
    );
}

/// A nonlinear toy: ε(z, t) = 0.8·tanh(1.5·z + 0.3) · (0.5 + t/T) + 0.1.
struct Nonlinear {
    calls: usize,
}

impl Denoiser for Nonlinear {
    type Cond = ();
    fn predict(&mut self, z: &Tensor, t: f64, _: &()) -> Result<Tensor> {
        self.calls += 1;
        let g = 0.8 * (0.5 + t / 1000.0);
        Ok(z.affine(1.5, 0.3)?.tanh()?.affine(g, 0.1)?)
    }
}

fn invert_and_reconstruct(iterations: usize) -> (f64, Vec<f64>, usize) {
    let config = sd_config(PredictionType::Epsilon, false);
    let mut inv = DdimInverseScheduler::new(config.clone()).unwrap();
    inv.set_timesteps(50).unwrap();
    let mut fwd = DdimScheduler::new(config).unwrap();
    fwd.set_timesteps(50).unwrap();
    let x0 = randn(8, &[1, 4, 8, 8], DType::F32);
    let mut d = Nonlinear { calls: 0 };
    let inversion = ddim_invert(
        &mut d,
        &inv,
        x0.clone(),
        &Guidance::Unguided(()),
        iterations,
        |_| Ok(()),
    )
    .unwrap();
    let calls = d.calls;
    assert_eq!(inversion.trajectory().len(), 51);
    let back = sample(
        &mut d,
        &fwd,
        inversion.latents().clone(),
        &Guidance::Unguided(()),
        &mut NoHook,
    )
    .unwrap();
    let err = max_abs_diff(&back, &x0);
    (err, inversion.fixed_point_residuals().to_vec(), calls)
}

#[test]
fn fixed_point_inversion_reconstructs_better_than_plain_ddim_inversion() {
    let (plain, plain_res, plain_calls) = invert_and_reconstruct(0);
    let (fixed, fixed_res, fixed_calls) = invert_and_reconstruct(5);
    println!("reconstruction max error: n=0 {plain:.3e}, n=5 {fixed:.3e}");
    println!(
        "fixed-point residual of the last iteration: max {:.3e}",
        fixed_res.iter().cloned().fold(0.0, f64::max)
    );
    assert_eq!(plain_calls, 50);
    assert_eq!(fixed_calls, 50 * 6);
    assert!(plain_res.is_empty() && fixed_res.len() == 50);
    assert!(
        plain > 1e-2,
        "the toy must make plain inversion visibly inexact ({plain:e})"
    );
    assert!(fixed < plain / 100.0, "n=5: {fixed:e} vs n=0: {plain:e}");
}

#[test]
fn plain_inversion_is_exact_for_a_constant_denoiser() {
    // With ε independent of z, the inverse step is the exact inverse of the sampling step.
    struct Constant(Tensor);
    impl Denoiser for Constant {
        type Cond = ();
        fn predict(&mut self, _z: &Tensor, _t: f64, _: &()) -> Result<Tensor> {
            Ok(self.0.clone())
        }
    }
    let config = sd_config(PredictionType::Epsilon, true);
    let mut inv = DdimInverseScheduler::new(config.clone()).unwrap();
    inv.set_timesteps(25).unwrap();
    let mut fwd = DdimScheduler::new(config).unwrap();
    fwd.set_timesteps(25).unwrap();
    let x0 = randn(9, &[1, 2, 4, 4], DType::F64);
    let mut d = Constant(randn(10, &[1, 2, 4, 4], DType::F64));
    let z = ddim_invert(&mut d, &inv, x0.clone(), &Guidance::Unguided(()), 0, |_| {
        Ok(())
    })
    .unwrap();
    let back = sample(
        &mut d,
        &fwd,
        z.latents().clone(),
        &Guidance::Unguided(()),
        &mut NoHook,
    )
    .unwrap();
    assert!(max_abs_diff(&back, &x0) < 1e-10);
}

#[test]
fn sampling_through_clipping_and_tanh_matches_finite_differences() {
    // Gradient of a scalar loss through 5 DDIM steps (with x₀ clipping on) vs central differences.
    let config = DdimConfig {
        clip_sample: true,
        clip_sample_range: 1.5,
        ..sd_config(PredictionType::Epsilon, false)
    };
    let mut s = DdimScheduler::new(config).unwrap();
    s.set_timesteps(5).unwrap();
    let z = randn(11, &[1, 1, 2, 3], DType::F64);
    let w = randn(12, &[1, 1, 2, 3], DType::F64);
    let loss = |z: &Tensor| -> Tensor {
        let out = sample(
            &mut Nonlinear { calls: 0 },
            &s,
            z.clone(),
            &Guidance::Unguided(()),
            &mut NoHook,
        )
        .unwrap();
        (out * &w).unwrap().sum_all().unwrap()
    };
    let var = Var::from_tensor(&z).unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = z.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-5;
    for i in 0..base.len() {
        let shifted = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            let t = Tensor::from_vec(v, z.dims(), &Device::Cpu).unwrap();
            loss(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "element {i}: autograd {} vs fd {fd}",
            g[i]
        );
    }
}

#[test]
fn half_precision_steps_keep_their_dtype_and_f32_accuracy() {
    let mut s = DdimScheduler::new(sd_config(PredictionType::Epsilon, false)).unwrap();
    s.set_timesteps(50).unwrap();
    let x = randn(13, &[1, 4, 8, 8], DType::F32);
    let e = randn(14, &[1, 4, 8, 8], DType::F32);
    for dtype in [DType::BF16, DType::F16] {
        let (xh, eh) = (x.to_dtype(dtype).unwrap(), e.to_dtype(dtype).unwrap());
        for &t in &[s.timesteps()[0], s.timesteps()[25], s.timesteps()[49]] {
            let half = s.step(&eh, t, &xh).unwrap();
            // Reference: the same rounded inputs, stepped in f32; only the output rounding differs.
            let full = s
                .step(
                    &eh.to_dtype(DType::F32).unwrap(),
                    t,
                    &xh.to_dtype(DType::F32).unwrap(),
                )
                .unwrap();
            assert_eq!(half.prev_sample.dtype(), dtype);
            let scale = full
                .prev_sample
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let err = max_abs_diff(&half.prev_sample, &full.prev_sample) / scale;
            // One rounding to bf16 (2^-8 relative) at most.
            assert!(
                err <= 1.0 / 256.0,
                "{dtype:?} t={t}: relative error {err:e}"
            );
        }
    }
}
