//! What the benchmark examples share: options, timing, memory figures, comparison with PyTorch.
#![allow(dead_code)]

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// Positional arguments plus `--device cpu|cuda`, `--dtype f32|bf16|f16` and any other
/// `--name value` pairs, in any order.
pub struct Args {
    pub positional: Vec<String>,
    pub flags: Vec<(String, String)>,
}

impl Args {
    pub fn parse() -> Result<Self> {
        let mut positional = Vec::new();
        let mut flags = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                let value = it
                    .next()
                    .with_context(|| format!("--{name} needs a value"))?;
                flags.push((name.to_string(), value));
            } else {
                positional.push(a);
            }
        }
        Ok(Self { positional, flags })
    }

    pub fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Refuses flags the example does not know, so a typo is not silently ignored.
    pub fn only_flags(&self, known: &[&str]) -> Result<()> {
        for (n, _) in &self.flags {
            if !known.contains(&n.as_str()) {
                bail!("unknown option --{n} (known: {})", known.join(", "));
            }
        }
        Ok(())
    }

    pub fn positional_usize(&self, i: usize, default: usize) -> Result<usize> {
        self.positional
            .get(i)
            .map(|s| s.parse().with_context(|| format!("{s:?} is not a count")))
            .transpose()
            .map(|v| v.unwrap_or(default))
    }

    pub fn device(&self) -> Result<Device> {
        match self.flag("device").unwrap_or("cpu") {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::new_cuda(0)
                .context("--device cuda: no CUDA device (is this a `--features cuda` build?)"),
            other => bail!("--device {other:?}: expected cpu or cuda"),
        }
    }

    pub fn dtype(&self) -> Result<DType> {
        match self.flag("dtype").unwrap_or("f32") {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            "f16" => Ok(DType::F16),
            other => bail!("--dtype {other:?}: expected f32, bf16 or f16"),
        }
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

pub fn device_name(dev: &Device) -> &'static str {
    match dev {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// As the `l2s` binary does: keep freed memory mapped, or the kernel zeroes fresh pages for the
/// large buffers of every pass. `MIMALLOC_PURGE_DELAY` in the environment still wins.
pub fn keep_freed_memory_mapped() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option (15 = mi_option_purge_delay in mimalloc.h).
        unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    }
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// CPU time of this process so far, all threads, user + system (from /proc/self/stat, in clock
/// ticks of 1/100 s). Under a loaded machine it measures the work done where wall time does not.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum::<f64>() / 100.0
}

/// Median wall time, every run's wall time, and the median CPU time. Waits for the device after
/// each run, since CUDA work is queued asynchronously.
pub fn timed(
    dev: &Device,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, Vec<f64>, f64)> {
    for _ in 0..warmup {
        f()?;
        dev.synchronize()?;
    }
    let mut times = Vec::with_capacity(runs);
    let mut cpu = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (t, c) = (Instant::now(), cpu_seconds());
        f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
        cpu.push(cpu_seconds() - c);
    }
    Ok((median(times.clone()), times, median(cpu)))
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// max |a − b| / max |b| in f64 on the CPU, whatever device and dtype `actual` has.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    if actual.dims() != expected.dims() {
        bail!(
            "shape {:?}, PyTorch's is {:?}",
            actual.dims(),
            expected.dims()
        );
    }
    let a = actual.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let e = expected.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (a - &e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-12))
}

/// The saved inputs and PyTorch's outputs, on the CPU as written.
pub fn load_io(dir: &std::path::Path) -> Result<std::collections::HashMap<String, Tensor>> {
    let path = dir.join("bench_io.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

/// One saved tensor on `dev` in `dtype`.
pub fn input(
    io: &std::collections::HashMap<String, Tensor>,
    name: &str,
    dev: &Device,
    dtype: DType,
) -> Result<Tensor> {
    Ok(io
        .get(name)
        .with_context(|| format!("bench_io.safetensors has no {name}"))?
        .to_dtype(dtype)?
        .to_device(dev)?)
}
