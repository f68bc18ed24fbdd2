//! Which kernels of `kernels.cu` each fused op launches, with what grid and scalar parameters: one
//! description, used by the CUDA path (`cuda.rs`) and by the tests that run the same kernels on
//! the host.
//!
//! A kernel's parameters are its scalars (in [`KernelCall::scalars`]' order) followed by its
//! buffers, in the order each constructor's doc lists them.

use candle_core::DType;

use super::norm::Rows;

/// Threads per block (a power of two: the reductions halve it).
pub(crate) const BLOCK: u32 = 256;

/// A scalar kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Scalar {
    U64(u64),
    F64(f64),
    I32(i32),
}

/// One kernel launch: `grid` blocks of [`BLOCK`] threads.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct KernelCall {
    pub name: String,
    pub grid: u32,
    pub scalars: Vec<Scalar>,
}

/// The kernel-name suffix of a storage type, `None` where no kernel covers it.
pub(crate) fn suffix(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F64 => Some("f64"),
        DType::BF16 => Some("bf16"),
        DType::F16 => Some("f16"),
        _ => None,
    }
}

fn grid(blocks: usize, what: &str) -> candle_core::Result<u32> {
    match u32::try_from(blocks) {
        Ok(g) if g > 0 && g < i32::MAX as u32 => Ok(g),
        _ => candle_core::bail!("{what}: {blocks} thread blocks do not fit one CUDA grid"),
    }
}

fn rows_scalars(rows: &Rows) -> Vec<Scalar> {
    [rows.len(), rows.groups, rows.channels, rows.spatial]
        .map(|v| Scalar::U64(v as u64))
        .to_vec()
}

/// Buffers: x, weight, bias, y (`n_rows` · len elements).
pub(crate) fn normalise_forward(
    rows: &Rows,
    n_rows: usize,
    suffix: &str,
) -> candle_core::Result<KernelCall> {
    let mut scalars = rows_scalars(rows);
    scalars.extend([Scalar::F64(rows.eps), Scalar::I32(rows.centre as i32)]);
    Ok(KernelCall {
        name: format!("normalise_forward_{suffix}"),
        grid: grid(n_rows, "normalise-rows")?,
        scalars,
    })
}

/// Buffers: x, weight, output gradient, input gradient, stats (2 · `n_rows` f64, written).
pub(crate) fn normalise_backward_input(
    rows: &Rows,
    n_rows: usize,
    suffix: &str,
) -> candle_core::Result<KernelCall> {
    let mut call = normalise_forward(rows, n_rows, suffix)?;
    call.name = format!("normalise_backward_input_{suffix}");
    Ok(call)
}

/// Buffers: x, output gradient, stats (from [`normalise_backward_input`]), weight gradient, bias
/// gradient (one element per affine channel each).
pub(crate) fn normalise_backward_affine(
    rows: &Rows,
    n_rows: usize,
    suffix: &str,
) -> candle_core::Result<KernelCall> {
    let mut scalars = rows_scalars(rows);
    scalars.push(Scalar::U64(n_rows as u64));
    Ok(KernelCall {
        name: format!("normalise_backward_affine_{suffix}"),
        grid: grid(rows.groups * rows.channels, "normalise-rows-grad")?,
        scalars,
    })
}

/// softmax(scale · row) over `n_rows` rows of `len`. Buffers: x, y.
pub(crate) fn softmax_forward(
    len: usize,
    n_rows: usize,
    scale: f64,
    suffix: &str,
) -> candle_core::Result<KernelCall> {
    Ok(KernelCall {
        name: format!("softmax_forward_{suffix}"),
        grid: grid(n_rows, "softmax")?,
        scalars: vec![Scalar::U64(len as u64), Scalar::F64(scale)],
    })
}

/// The input gradient of [`softmax_forward`]. Buffers: y, output gradient, input gradient.
pub(crate) fn softmax_backward(
    len: usize,
    n_rows: usize,
    scale: f64,
    suffix: &str,
) -> candle_core::Result<KernelCall> {
    let mut call = softmax_forward(len, n_rows, scale, suffix)?;
    call.name = format!("softmax_backward_{suffix}");
    Ok(call)
}
