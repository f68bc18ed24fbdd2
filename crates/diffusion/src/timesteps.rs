//! Inference timesteps, identical to diffusers' `set_timesteps` (which computes them with numpy:
//! the float arithmetic and the round-half-to-even below reproduce numpy's results exactly).
//!
//! Entry point: [`ddim_timesteps`] (descending, for sampling); [`inverse_timesteps`] gives the
//! ascending order of `DDIMInverseScheduler`.

use crate::config::TimestepSpacing;
use crate::error::{DiffusionError, Result};

fn check(n: usize, num_train_timesteps: usize) -> Result<()> {
    if n == 0 || n > num_train_timesteps {
        return Err(DiffusionError::InvalidStepCount {
            requested: n,
            num_train_timesteps,
        });
    }
    Ok(())
}

/// numpy's `arange(start, stop, step)` for floats: length ⌈(stop − start)/step⌉, then
/// `start`, `start + step`, and from there `start + i·d` with d = (start + step) − start.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let second = start + step;
    let d = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * d,
        })
        .collect()
}

/// `[0, k, 2k, …]` (k = T div n) plus the offset, ascending.
fn leading(n: usize, t: usize, offset: usize) -> Vec<usize> {
    let ratio = t / n;
    (0..n).map(|i| i * ratio + offset).collect()
}

/// `round(arange(T, 0, −T/n)) − 1`, ascending.
///
/// For some n (61, 103, 121, … of T = 1000) the float `arange` has one element too many, ≈ 0,
/// which diffusers turns into a timestep −1 (its step then reads ᾱ[−1], the *last* entry). That
/// spurious element is dropped here, so there are always exactly n timesteps.
fn trailing(n: usize, t: usize) -> Vec<usize> {
    let ratio = t as f64 / n as f64;
    let mut ts: Vec<usize> = np_arange(t as f64, 0.0, -ratio)
        .into_iter()
        .map(|v| v.round_ties_even() as i64 - 1)
        .filter(|&v| v >= 0)
        .map(|v| v as usize)
        .collect();
    ts.reverse();
    ts
}

/// `round(linspace(0, T − 1, n))`, ascending.
fn linspace(n: usize, t: usize) -> Vec<usize> {
    let last = (t - 1) as f64;
    if n == 1 {
        return vec![0];
    }
    let step = last / (n - 1) as f64;
    (0..n)
        .map(|i| if i + 1 == n { last } else { i as f64 * step })
        .map(|v| v.round_ties_even() as usize)
        .collect()
}

/// The DDIM sampling timesteps, descending, as `DDIMScheduler.set_timesteps(n)` gives them.
/// `steps_offset` only applies to `leading` spacing, as in diffusers.
pub fn ddim_timesteps(
    spacing: TimestepSpacing,
    n: usize,
    num_train_timesteps: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    check(n, num_train_timesteps)?;
    let mut ts = match spacing {
        TimestepSpacing::Leading => leading(n, num_train_timesteps, steps_offset),
        TimestepSpacing::Trailing => trailing(n, num_train_timesteps),
        TimestepSpacing::Linspace => linspace(n, num_train_timesteps),
    };
    ts.reverse();
    Ok(ts)
}

/// The inversion timesteps, ascending, as `DDIMInverseScheduler.set_timesteps(n)` gives them.
/// diffusers' inverse scheduler has no `linspace` spacing; asking for it is an error.
pub fn inverse_timesteps(
    spacing: TimestepSpacing,
    n: usize,
    num_train_timesteps: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    check(n, num_train_timesteps)?;
    match spacing {
        TimestepSpacing::Leading => Ok(leading(n, num_train_timesteps, steps_offset)),
        TimestepSpacing::Trailing => Ok(trailing(n, num_train_timesteps)),
        TimestepSpacing::Linspace => Err(DiffusionError::ConfigValue {
            origin: "DDIMInverseScheduler".into(),
            field: "timestep_spacing".into(),
            value: "\"linspace\"".into(),
            expected: "\"leading\" or \"trailing\" (diffusers' inverse scheduler has no linspace)"
                .into(),
        }),
    }
}
