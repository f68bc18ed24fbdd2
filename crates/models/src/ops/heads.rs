//! Multi-head attention on the projections' own layout: q (b, n, H·d), k (b, m, H·d),
//! v (b, m, H·e) → (b, n, H·e), with a hand-written backward pass.
//!
//! Split into heads, attention reads (b, H, n, d) copies of q, k and v, and its output needs a
//! copy back to (b, n, H·e). Here each head's products address its columns of the packed buffers
//! through the matrix kernel's strides, so no copy is made. The scores of each block of query
//! rows live in a small scratch buffer that stays in cache, and the full probabilities exist
//! only for an observer: the backward pass recomputes each block's (as flash attention does),
//! trading one more product per block for memory that holds no n × m matrix per head. CPU,
//! f32/f64; elsewhere the split form ([`super::attention::attention`]).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::{cpu_kernel, sum2, Real};

/// Query rows per block of the no-gradient forward pass: 64 rows of 1024 keys is 256 KiB in f32.
const BLOCK_ROWS: usize = 64;

/// A raw pointer the parallel tasks share; each writes only its own head's columns.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: tasks write disjoint elements (distinct heads or row blocks) through it.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// Through a method, so that closures capture the wrapper rather than the bare pointer.
    fn get(self) -> *mut T {
        self.0
    }
}

/// A strided matrix operand: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

/// `dst (m × n) = [dst +] lhs (m × k) · rhs (k × n)`, single-threaded (callers parallelise).
///
/// # Safety
/// Every pointer must address the elements its strides reach for these sizes, and nothing else
/// may access `dst`'s elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: isize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        if accumulate { T::one() } else { T::zero() },
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Sizes of one call: batch, heads, queries, keys, head width of q/k, head width of v.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    n: usize,
    m: usize,
    d: usize,
    e: usize,
}

fn dims(heads: usize, q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
    let ok = q.len() == 3
        && k.len() == 3
        && v.len() == 3
        && heads > 0
        && q[0] == k[0]
        && q[0] == v[0]
        && k[1] == v[1]
        && q[2] == k[2]
        && q[2].is_multiple_of(heads)
        && v[2].is_multiple_of(heads);
    if !ok {
        candle_core::bail!("attention: q {q:?}, k {k:?}, v {v:?} for {heads} heads do not fit");
    }
    Ok(Dims {
        b: q[0],
        h: heads,
        n: q[1],
        m: k[1],
        d: q[2] / heads,
        e: v[2] / heads,
    })
}

fn tasks_in_parallel() -> bool {
    candle_core::utils::get_num_threads() > 1
}

/// Runs `f` for every index below `count` (on the thread pool when it has more than one thread),
/// handing each task a scratch buffer of `len` elements that is made once per worker thread and
/// reused by its later tasks (a fresh buffer per task was zeroed each time, and a large one came
/// as new pages from the OS).
fn for_each_task_with_scratch<T: Real>(
    count: usize,
    len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if tasks_in_parallel() && count > 1 {
        (0..count)
            .into_par_iter()
            .for_each_init(|| vec![T::zero(); len], |scratch, task| f(task, scratch));
    } else {
        let mut scratch = vec![T::zero(); len];
        (0..count).for_each(|task| f(task, &mut scratch));
    }
}

/// softmax(scale · row) in place for every row of `len` elements of `rows`.
fn softmax_rows<T: Real>(rows: &mut [T], len: usize, scale: T) {
    for row in rows.chunks_exact_mut(len) {
        T::softmax_row(row, scale);
    }
}

/// softmax(scale · q·kᵀ) of query rows `r0..` of head `hi` in image `bi` (as many rows as `p`
/// holds, m keys each) into `p`, for the forward pass and the backward pass's recomputation
/// alike, so both see the same values. Returns the block of q it read.
///
/// # Safety
/// `q` and `k` must point at the (b, n, H·d) and (b, m, H·d) buffers `g` describes, and the rows
/// must lie inside n.
unsafe fn block_probabilities<T: Real>(
    g: Dims,
    scale: T,
    q: *const T,
    k: *const T,
    (bi, hi, r0): (usize, usize, usize),
    p: &mut [T],
) -> Mat<T> {
    let Dims { n, m, h, d, .. } = g;
    let hd = (h * d) as isize;
    let q_blk = Mat {
        ptr: q.add(bi * n * h * d + r0 * h * d + hi * d),
        rs: hd,
        cs: 1,
    };
    let k_t = Mat {
        ptr: k.add(bi * m * h * d + hi * d),
        rs: 1,
        cs: hd,
    };
    let rows = p.len() / m;
    gemm_strided(rows, m, d, p.as_mut_ptr(), m as isize, false, q_blk, k_t);
    softmax_rows(p, m, scale);
    q_blk
}

/// Forward pass; writes the probabilities into `probs` (b, H, n, m) when given.
fn forward<T: Real>(
    g: Dims,
    scale: f64,
    q: &[T],
    k: &[T],
    v: &[T],
    probs: Option<&mut [T]>,
) -> Vec<T> {
    let Dims { b, h, n, m, e, .. } = g;
    let he = (h * e) as isize;
    let mut out = vec![T::zero(); b * n * h * e];
    let scale = T::of(scale);
    let out_ptr = Shared(out.as_mut_ptr());
    let probs_ptr = probs.map(|p| Shared(p.as_mut_ptr()));
    let rows_per_block = if probs_ptr.is_some() {
        n
    } else {
        BLOCK_ROWS.min(n)
    };
    let blocks = n.div_ceil(rows_per_block);
    let (qp, kp, vp) = (
        Shared(q.as_ptr() as *mut T),
        Shared(k.as_ptr() as *mut T),
        Shared(v.as_ptr() as *mut T),
    );
    // The kept probabilities are the scores' buffer; otherwise each worker has its own block.
    let scratch_len = if probs_ptr.is_some() {
        0
    } else {
        rows_per_block * m
    };
    for_each_task_with_scratch(b * h * blocks, scratch_len, |task, scratch: &mut [T]| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let r0 = blk * rows_per_block;
        let rows = rows_per_block.min(n - r0);
        let scores: &mut [T] = match probs_ptr {
            // SAFETY: head (bi, hi) owns its n × m slice of the probabilities.
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p.get().add(bh * n * m), n * m) },
            None => &mut scratch[..rows * m],
        };
        // SAFETY: the offsets and strides stay inside q (b, n, H·d), k (b, m, H·d),
        // v (b, m, H·e) and out (b, n, H·e); this task alone writes its rows of head hi.
        unsafe {
            block_probabilities(g, scale, qp.get(), kp.get(), (bi, hi, r0), scores);
            let p = Mat {
                ptr: scores.as_ptr(),
                rs: m as isize,
                cs: 1,
            };
            let v_h = Mat {
                ptr: vp.get().add(bi * m * h * e + hi * e),
                rs: he,
                cs: 1,
            };
            let dst = out_ptr.get().add(bi * n * h * e + r0 * h * e + hi * e);
            gemm_strided(rows, e, m, dst, he, false, p, v_h);
        }
    });
    out
}

/// Query rows per block of the backward pass: 128 rows of 4096 keys is 2 MiB in f32 per buffer.
const BACKWARD_BLOCK_ROWS: usize = 128;

/// Gradients of q, k and v (each only when wanted) from ∂out. The probabilities are not kept by
/// the forward pass: each block of query rows recomputes its scores and softmax (the same
/// products and kernel, so the same values), so memory holds two blocks per worker instead of
/// every head's n × m matrix, and the blocks stay in cache between the products that use them.
#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    g: Dims,
    scale: f64,
    q: &[T],
    k: &[T],
    v: &[T],
    grad: &[T],
    want: [bool; 3],
) -> [Option<Vec<T>>; 3] {
    let Dims { b, h, n, m, d, e } = g;
    let (hd, he) = ((h * d) as isize, (h * e) as isize);
    let [want_q, want_k, want_v] = want;
    let mut gq = want_q.then(|| vec![T::zero(); b * n * h * d]);
    let mut gk = want_k.then(|| vec![T::zero(); b * m * h * d]);
    let mut gv = want_v.then(|| vec![T::zero(); b * m * h * e]);
    let ptr = |o: &mut Option<Vec<T>>| o.as_mut().map(|v| Shared(v.as_mut_ptr()));
    let (pq, pk, pv) = (ptr(&mut gq), ptr(&mut gk), ptr(&mut gv));
    let scale_t = T::of(scale);
    let c = |s: &[T]| Shared(s.as_ptr() as *mut T);
    let (qp, kp, vp, gp) = (c(q), c(k), c(v), c(grad));
    let block = BACKWARD_BLOCK_ROWS.min(n);
    // Per worker: the probabilities of a block and, when q or k want a gradient, its ∂scores.
    let ds_len = if want_q || want_k { block * m } else { 0 };
    // One task per head: its row blocks add into the head's ∂k and ∂v in turn.
    for_each_task_with_scratch(b * h, block * m + ds_len, |bh, scratch: &mut [T]| {
        let (bi, hi) = (bh / h, bh % h);
        let (probs, ds) = scratch.split_at_mut(block * m);
        for (blk, r0) in (0..n).step_by(block).enumerate() {
            let rows = block.min(n - r0);
            let (p, ds) = (&mut probs[..rows * m], &mut ds[..ds_len.min(rows * m)]);
            let first = blk == 0;
            // SAFETY: the offsets and strides stay inside q, k (b, ·, H·d), v, ∂out (b, ·, H·e)
            // and the gradients; head (bi, hi) alone writes its columns of each gradient.
            unsafe {
                let q_blk = block_probabilities(g, scale_t, qp.get(), kp.get(), (bi, hi, r0), p);
                let g_blk = Mat {
                    ptr: gp.get().add(bi * n * h * e + r0 * h * e + hi * e),
                    rs: he,
                    cs: 1,
                };
                if let Some(dv) = pv {
                    // ∂v += pᵀ · ∂out over this block's rows.
                    let p_t = Mat {
                        ptr: p.as_ptr(),
                        rs: 1,
                        cs: m as isize,
                    };
                    let dst = dv.get().add(bi * m * h * e + hi * e);
                    gemm_strided(m, e, rows, dst, he, !first, p_t, g_blk);
                }
                if pq.is_none() && pk.is_none() {
                    continue;
                }
                // ∂scores = scale · p ⊙ (∂p − Σ ∂p ⊙ p), with ∂p = ∂out · vᵀ.
                let v_t = Mat {
                    ptr: vp.get().add(bi * m * h * e + hi * e),
                    rs: 1,
                    cs: he,
                };
                gemm_strided(rows, m, e, ds.as_mut_ptr(), m as isize, false, g_blk, v_t);
                for (row, p_row) in ds.chunks_exact_mut(m).zip(p.chunks_exact(m)) {
                    let dot = T::of(sum2(row, p_row, |a, b| a.f64() * b.f64()));
                    for (x, &pv) in row.iter_mut().zip(p_row) {
                        *x = scale_t * pv * (*x - dot);
                    }
                }
                if let Some(dq) = pq {
                    // ∂q = ∂scores · k for this block's rows.
                    let ds_m = Mat {
                        ptr: ds.as_ptr(),
                        rs: m as isize,
                        cs: 1,
                    };
                    let k_h = Mat {
                        ptr: kp.get().add(bi * m * h * d + hi * d),
                        rs: hd,
                        cs: 1,
                    };
                    let dst = dq.get().add(bi * n * h * d + r0 * h * d + hi * d);
                    gemm_strided(rows, d, m, dst, hd, false, ds_m, k_h);
                }
                if let Some(dk) = pk {
                    // ∂k += ∂scoresᵀ · q over this block's rows.
                    let ds_t = Mat {
                        ptr: ds.as_ptr(),
                        rs: 1,
                        cs: m as isize,
                    };
                    let dst = dk.get().add(bi * m * h * d + hi * d);
                    gemm_strided(m, d, rows, dst, hd, !first, ds_t, q_blk);
                }
            }
        }
    });
    [gq, gk, gv]
}

struct HeadsAttention {
    heads: usize,
    scale: f64,
    /// Keep the probabilities, for an observer (the backward pass recomputes its own).
    keep: bool,
    probs: Mutex<Option<CpuStorage>>,
}

fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    super::contiguous_slice("attention", s, l)
}

impl CustomOp3 for HeadsAttention {
    fn name(&self) -> &'static str {
        "attention-packed-heads"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = dims(self.heads, lq.dims(), lk.dims(), lv.dims())?;
        let shape = Shape::from((g.b, g.n, g.h * g.e));
        let probs_len = g.b * g.h * g.n * g.m;
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let (q, k, v) = (
                    slice::<$t>(q, lq)?,
                    slice::<$t>(k, lk)?,
                    slice::<$t>(v, lv)?,
                );
                if self.keep {
                    let mut probs = vec![<$t>::default(); probs_len];
                    let out = forward(g, self.scale, q, k, v, Some(&mut probs));
                    if let Ok(mut slot) = self.probs.lock() {
                        *slot = Some(CpuStorage::$variant(probs));
                    }
                    CpuStorage::$variant(out)
                } else {
                    CpuStorage::$variant(forward(g, self.scale, q, k, v, None))
                }
            }};
        }
        let out = match q {
            CpuStorage::F32(_) => run!(f32, F32),
            CpuStorage::F64(_) => run!(f64, F64),
            _ => candle_core::bail!("attention: only f32 and f64"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = [q.track_op(), k.track_op(), v.track_op()];
        let g = dims(self.heads, q.dims(), k.dims(), v.dims())?;
        let grad = grad.contiguous()?;
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (Storage::Cpu(sq), Storage::Cpu(sk), Storage::Cpu(sv), Storage::Cpu(sg)) =
            (&*sq, &*sk, &*sv, &*sg)
        else {
            candle_core::bail!("attention: backward pass off the CPU");
        };
        let dev = q.device();
        let shapes = [q.shape().clone(), k.shape().clone(), v.shape().clone()];
        macro_rules! run {
            ($t:ty) => {{
                let grads = backward::<$t>(
                    g,
                    self.scale,
                    slice(sq, lq)?,
                    slice(sk, lk)?,
                    slice(sv, lv)?,
                    slice(sg, lg)?,
                    want,
                );
                let mut out = [None, None, None];
                for (i, grad) in grads.into_iter().enumerate() {
                    if let Some(grad) = grad {
                        out[i] = Some(Tensor::from_vec(grad, shapes[i].clone(), dev)?);
                    }
                }
                out
            }};
        }
        let [gq, gk, gv] = match sq {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            _ => candle_core::bail!("attention: only f32 and f64"),
        };
        Ok((gq, gk, gv))
    }
}

/// [`attention_heads`] without gradients that also returns the probabilities (b, H, n, m), for an
/// observer: the same kernel as the unobserved layers, so observing does not change the output.
/// `None` where that kernel does not run (tracked inputs, other devices and dtypes).
pub fn attention_heads_observed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let g = dims(heads, q.dims(), k.dims(), v.dims())?;
    let same_dtype = q.dtype() == k.dtype() && q.dtype() == v.dtype();
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let fits = cpu_kernel(q) && same_dtype && scale > 0.0 && q.elem_count() > 0;
    if tracked || !fits || k.elem_count() == 0 {
        return Ok(None);
    }
    let op = HeadsAttention {
        heads,
        scale,
        keep: true,
        probs: Mutex::new(None),
    };
    let out = q
        .contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    let probs = op.probs.lock().ok().and_then(|mut p| p.take());
    let probs =
        probs.ok_or_else(|| candle_core::Error::Msg("attention: no probabilities".into()))?;
    let probs = Tensor::from_storage(
        Storage::Cpu(probs),
        (g.b, g.h, g.n, g.m),
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok(Some((out, probs)))
}

/// softmax(q·kᵀ·scale)·v per head, for q (b, n, H·d), k (b, m, H·d), v (b, m, H·e) with heads
/// side by side in the last dimension; returns (b, n, H·e). `scale` > 0.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let g = dims(heads, q.dims(), k.dims(), v.dims())?;
    let same_dtype = q.dtype() == k.dtype() && q.dtype() == v.dtype();
    if cpu_kernel(q) && same_dtype && scale > 0.0 && q.elem_count() > 0 && k.elem_count() > 0 {
        let op = HeadsAttention {
            heads,
            scale,
            keep: false,
            probs: Mutex::new(None),
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let split = |t: &Tensor, w: usize| -> Result<Tensor> {
        let (b, n, _) = t.dims3()?;
        t.reshape((b, n, heads, w))?.transpose(1, 2)?.contiguous()
    };
    let out =
        super::attention::attention(&split(q, g.d)?, &split(k, g.d)?, &split(v, g.e)?, scale)?;
    out.transpose(1, 2)?.reshape((g.b, g.n, heads * g.e))
}
