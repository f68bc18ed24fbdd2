//! The noise schedule: β_t per training timestep and the cumulative products ᾱ_t = Π_{s≤t}(1 − β_s).
//!
//! Entry point: [`alphas_cumprod`].
//!
//! The table is built *as diffusers builds it*, so that pipelines give diffusers' numbers: β in
//! f32 (torch's float32 `linspace`, reproduced bit for bit; the cosine schedule computed in f64
//! and rounded), 1 − β in f32, the running product accumulated in f64 (as torch's CPU `cumprod`
//! does) with each ᾱ_t rounded to f32. This matters: near t = 0, 1 − ᾱ_t ≈ 1e-4, so the f32
//! rounding of ᾱ_t moves √(1 − ᾱ_t) by ~1e-5 relative, more than the parity tolerance; and the
//! zero-SNR rescaling amplifies 1-ulp differences of β near the end to ~4e-5. Every coefficient
//! derived from the table is then computed in f64.

use crate::config::{BetaSchedule, DdimConfig};
use crate::error::Result;

/// Rounds to the nearest f32 and back, as storing into a float32 tensor does.
fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

/// torch's float32 `linspace(start, end, n)`: step = (end − start)/(n − 1) in f32, the first
/// half computed as start + i·step and the second as end − (n−1−i)·step, each as one fused
/// multiply-add (what torch's vectorised CPU kernel does; verified bit-exact on the fixtures).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// β for the cosine schedule: β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), 0.999).
fn squaredcos_cap_v2(n: usize) -> Vec<f64> {
    let alpha_bar = |s: f64| {
        ((s + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (s1, s2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(s2) / alpha_bar(s1)).min(0.999)
        })
        .collect()
}

/// The β of the config, rounded to f32 as diffusers stores them.
pub fn betas(config: &DdimConfig) -> Result<Vec<f64>> {
    config.validate("DdimConfig")?;
    let n = config.num_train_timesteps;
    let raw = match &config.trained_betas {
        Some(b) => b.clone(),
        None => match config.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, n)
                .into_iter()
                .map(f64::from)
                .collect(),
            // √β spaced evenly, squared in f32.
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|r| f64::from(r * r))
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => squaredcos_cap_v2(n),
        },
    };
    let betas: Vec<f64> = raw.into_iter().map(f32_round).collect();
    Ok(if config.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    })
}

/// Rescales β so that √ᾱ is shifted and stretched to end at exactly 0 while keeping √ᾱ_0
/// (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1).
/// Done in f32 arithmetic, as diffusers does it: near the end ᾱ is tiny and the f32 rounding of
/// the shift shows at 1e-5 relative.
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let sqrt_ab: Vec<f32> = cumprod(betas)
        .into_iter()
        .map(|a| (a as f32).sqrt())
        .collect();
    let (first, last) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    let scale = first / (first - last);
    let ab: Vec<f32> = sqrt_ab
        .iter()
        .map(|s| ((s - last) * scale).powi(2))
        .collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push((1.0 - ab[0]) as f64);
    for w in ab.windows(2) {
        out.push((1.0 - w[1] / w[0]) as f64);
    }
    out
}

/// ᾱ_t from (f32-rounded) β: 1 − β in f32, product accumulated in f64, each entry rounded to f32.
fn cumprod(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b as f32) as f64;
            f32_round(acc)
        })
        .collect()
}

/// ᾱ_t for t = 0..T of the config, as diffusers' `alphas_cumprod`.
pub fn alphas_cumprod(config: &DdimConfig) -> Result<Vec<f64>> {
    Ok(cumprod(&betas(config)?))
}
