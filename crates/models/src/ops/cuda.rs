//! The fused normalisations and softmax on CUDA: `kernels.cu`, compiled once per process by NVRTC
//! (so the build needs no device compiler for them and the PTX suits whatever GPU runs it), then
//! launched as [`super::launch`] describes. Inputs must be contiguous; outputs are fresh buffers.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

use super::launch::{self, KernelCall, Scalar, BLOCK};
use super::norm::Rows;

const SOURCE: &str = include_str!("kernels.cu");
const MODULE: &str = "l2s-fused-ops";

/// The PTX of `kernels.cu`, compiled on first use.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        // NVRTC is loaded here, on first use; a missing library is an error, not a crash.
        let compiled = std::panic::catch_unwind(|| nvrtc::compile_ptx(SOURCE))
            .map_err(|_| "NVRTC (libnvrtc.so) could not be loaded".to_string())
            .and_then(|r| r.map_err(|e| format!("{e:?}")));
        match compiled {
            Ok(ptx) => Ok(ptx.to_src()),
            Err(e) => {
                let e = format!("compiling the fused ops' CUDA kernels with NVRTC: {e}");
                tracing::warn!("{e}; normalisations and softmax use candle's composed ops");
                Err(e)
            }
        }
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// Whether the kernels compiled (once per process; a failure is logged once and the fused ops
/// fall back to the composed form on CUDA).
pub(crate) fn available() -> bool {
    ptx().is_ok()
}

/// Launches `$call` (a [`KernelCall`]) on `$dev` with its scalars, then the buffers listed. A
/// macro, not a function: the launch arguments borrow the buffers for the builder's lifetime.
macro_rules! launch {
    ($dev:expr, $call:expr, [$($buffer:expr),* $(,)?]) => {{
        let call: &KernelCall = $call;
        let func = $dev.get_or_load_custom_func(&call.name, MODULE, ptx()?)?;
        let mut args = func.builder();
        for scalar in &call.scalars {
            match scalar {
                Scalar::U64(v) => args.arg(v),
                Scalar::F64(v) => args.arg(v),
                Scalar::I32(v) => args.arg(v),
            };
        }
        $(args.arg($buffer);)*
        let cfg = LaunchConfig {
            grid_dim: (call.grid, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the parameters pushed match the kernel's signature as `launch` documents it,
        // and every buffer holds the elements the grid reads or writes (checked by the callers).
        unsafe { args.launch(cfg) }.w()?;
    }};
}

/// The contiguous elements of `storage` under `layout`.
fn view<'a, T: CudaDType>(
    op: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("{op}: expects a contiguous input"),
    }
}

/// An output buffer of `len` elements, left unset: the kernels write every one of them.
fn alloc<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: each caller launches kernels that write all `len` elements before anything reads.
    unsafe { dev.alloc::<T>(len) }
}

/// Calls `$body` with `$t` bound to the Rust type of `$dtype` (f32, f64, bf16, f16).
macro_rules! with_dtype {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!("{}: no CUDA kernel for {other:?}", $op),
        }
    };
}

fn suffix(op: &str, dtype: DType) -> Result<&'static str> {
    launch::suffix(dtype).ok_or_else(|| candle_core::Error::Msg(format!("{op}: {dtype:?}")))
}

/// Normalised, scaled and shifted rows of `x`.
pub(crate) fn normalise_forward(
    rows: &Rows,
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    const OP: &str = "normalise-rows";
    let n = lx.shape().elem_count();
    let dev = x.device().clone();
    let call = launch::normalise_forward(rows, n / rows.len(), suffix(OP, x.dtype())?)?;
    with_dtype!(OP, x.dtype(), T => {
        let (xv, wv, bv) = (view::<T>(OP, x, lx)?, view::<T>(OP, w, lw)?, view::<T>(OP, b, lb)?);
        let mut y = alloc::<T>(&dev, n)?;
        launch!(dev, &call, [&xv, &wv, &bv, &mut y]);
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

/// [∂x, ∂weight, ∂bias] flattened, as the CPU kernel returns them; ∂x alone unless `affine`.
pub(crate) fn normalise_backward(
    rows: &Rows,
    affine: bool,
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    const OP: &str = "normalise-rows-grad";
    let n = lx.shape().elem_count();
    let n_rows = n / rows.len();
    let channels = if affine {
        rows.groups * rows.channels
    } else {
        0
    };
    let dev = x.device().clone();
    let sfx = suffix(OP, x.dtype())?;
    if lg.shape().elem_count() != n {
        candle_core::bail!("{OP}: gradient {:?} for input {:?}", lg.dims(), lx.dims());
    }
    let input_call = launch::normalise_backward_input(rows, n_rows, sfx)?;
    let affine_call = launch::normalise_backward_affine(rows, n_rows, sfx)?;
    with_dtype!(OP, x.dtype(), T => {
        let (xv, wv, gv) = (view::<T>(OP, x, lx)?, view::<T>(OP, w, lw)?, view::<T>(OP, g, lg)?);
        let mut out = alloc::<T>(&dev, n + 2 * channels)?;
        let mut stats = alloc::<f64>(&dev, 2 * n_rows)?;
        {
            let mut dx = out.slice_mut(0..n);
            launch!(dev, &input_call, [&xv, &wv, &gv, &mut dx, &mut stats]);
        }
        if affine {
            let (_, mut affine) = out.split_at_mut(n);
            let (mut dw, mut db) = affine.split_at_mut(channels);
            launch!(dev, &affine_call, [&xv, &gv, &stats, &mut dw, &mut db]);
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}

/// softmax(scale · row) of every row of the last dimension.
pub(crate) fn softmax_forward(x: &CudaStorage, lx: &Layout, scale: f64) -> Result<CudaStorage> {
    const OP: &str = "softmax-last-dim";
    let n = lx.shape().elem_count();
    let len = lx.dims().last().copied().unwrap_or(1).max(1);
    let dev = x.device().clone();
    let call = launch::softmax_forward(len, n / len, scale, suffix(OP, x.dtype())?)?;
    with_dtype!(OP, x.dtype(), T => {
        let xv = view::<T>(OP, x, lx)?;
        let mut y = alloc::<T>(&dev, n)?;
        launch!(dev, &call, [&xv, &mut y]);
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

/// The input gradient of [`softmax_forward`] from its output `y` and the output gradient `g`.
pub(crate) fn softmax_backward(
    (y, ly): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    scale: f64,
) -> Result<CudaStorage> {
    const OP: &str = "softmax-last-dim-grad";
    let n = ly.shape().elem_count();
    let len = ly.dims().last().copied().unwrap_or(1).max(1);
    let dev = y.device().clone();
    let call = launch::softmax_backward(len, n / len, scale, suffix(OP, y.dtype())?)?;
    with_dtype!(OP, y.dtype(), T => {
        let (yv, gv) = (view::<T>(OP, y, ly)?, view::<T>(OP, g, lg)?);
        let mut dx = alloc::<T>(&dev, n)?;
        launch!(dev, &call, [&yv, &gv, &mut dx]);
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    })
}
