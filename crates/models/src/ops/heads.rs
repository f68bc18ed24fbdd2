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

use super::{cpu_kernel, narrow, sum2, Real};

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
    let positive = |s: isize| usize::try_from(s).ok();
    if let (true, Some(dst_rs), Some(a_rs), Some(a_cs), Some(b_rs)) = (
        T::DTYPE == candle_core::DType::F32 && n == narrow::WIDTH && rhs.cs == 1,
        positive(dst_rs),
        positive(lhs.rs),
        positive(lhs.cs),
        positive(rhs.rs),
    ) {
        if narrow::available() {
            // T is f32 (checked above), so the casts only rename the type.
            return narrow::product(
                m,
                k,
                dst as *mut f32,
                dst_rs,
                accumulate,
                (lhs.ptr as *const f32, a_rs, a_cs),
                (rhs.ptr as *const f32, b_rs),
            );
        }
    }
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

/// Where each head's query rows find their softmax statistics in a buffer of `2·b·H·n`
/// elements: the largest score of each row (before the scale), then 1 / Σ exp.
#[derive(Clone, Copy)]
struct RowStats<T> {
    ptr: *mut T,
    half: usize,
}

impl<T: Real> RowStats<T> {
    fn new(stats: &mut [T]) -> Self {
        Self {
            ptr: stats.as_mut_ptr(),
            half: stats.len() / 2,
        }
    }
    /// # Safety
    /// `row` below `half`; no other task writes it meanwhile.
    unsafe fn set(self, row: usize, max: T, inv_sum: T) {
        *self.ptr.add(row) = max;
        *self.ptr.add(self.half + row) = inv_sum;
    }
    /// # Safety
    /// `row` below `half`.
    unsafe fn get(self, row: usize) -> (T, T) {
        (*self.ptr.add(row), *self.ptr.add(self.half + row))
    }
}
// SAFETY: tasks touch disjoint rows (forward) or only read (backward).
unsafe impl<T> Send for RowStats<T> {}
unsafe impl<T> Sync for RowStats<T> {}

/// q·kᵀ of query rows `r0..` of head `hi` in image `bi` (as many rows as `p` holds, m keys each)
/// into `p`. Returns the block of q it read.
///
/// # Safety
/// `q` and `k` must point at the (b, n, H·d) and (b, m, H·d) buffers `g` describes, and the rows
/// must lie inside n.
unsafe fn block_scores<T: Real>(
    g: Dims,
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
    q_blk
}

/// Forward pass. Each block of query rows gets its scores, then exp(scale·(s − max)) and the
/// row sums in one pass; the output is (exp · v) / sum, so the n × m probabilities are never
/// divided unless `probs` (b, H, n, m) asks for them. The rows' max and 1 / sum go to `stats`
/// when given, for the backward pass.
fn forward<T: Real>(
    g: Dims,
    scale: f64,
    q: &[T],
    k: &[T],
    v: &[T],
    probs: Option<&mut [T]>,
    stats: Option<&mut [T]>,
) -> Vec<T> {
    let Dims { b, h, n, m, e, .. } = g;
    let he = (h * e) as isize;
    let mut out = vec![T::zero(); b * n * h * e];
    let scale = T::of(scale);
    let out_ptr = Shared(out.as_mut_ptr());
    let probs_ptr = probs.map(|p| Shared(p.as_mut_ptr()));
    let stats = stats.map(RowStats::new);
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
    // Either way the scratch ends with the block's 1 / sum per row.
    let scores_len = if probs_ptr.is_some() {
        0
    } else {
        rows_per_block * m
    };
    let scratch_len = scores_len + rows_per_block;
    for_each_task_with_scratch(b * h * blocks, scratch_len, |task, scratch: &mut [T]| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let r0 = blk * rows_per_block;
        let rows = rows_per_block.min(n - r0);
        let (scores, inv_sums) = scratch.split_at_mut(scores_len);
        let inv_sums = &mut inv_sums[..rows];
        let scores: &mut [T] = match probs_ptr {
            // SAFETY: head (bi, hi) owns its n × m slice of the probabilities.
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p.get().add(bh * n * m), n * m) },
            None => &mut scores[..rows * m],
        };
        // SAFETY: the offsets and strides stay inside q (b, n, H·d), k (b, m, H·d),
        // v (b, m, H·e), out (b, n, H·e) and the statistics (2·b·H·n); this task alone writes
        // its rows of head hi.
        unsafe {
            block_scores(g, qp.get(), kp.get(), (bi, hi, r0), scores);
            for (i, (row, inv_sum)) in scores.chunks_exact_mut(m).zip(&mut *inv_sums).enumerate() {
                let max = T::row_max(row);
                *inv_sum = T::of(1.0 / T::exp_shifted_sum(row, scale, max));
                if let Some(stats) = stats {
                    stats.set(bh * n + r0 + i, max, *inv_sum);
                }
            }
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
            for (i, &inv_sum) in inv_sums.iter().enumerate() {
                for c in 0..e {
                    *dst.add(i * he as usize + c) *= inv_sum;
                }
            }
            if probs_ptr.is_some() {
                for (row, &inv_sum) in scores.chunks_exact_mut(m).zip(&*inv_sums) {
                    row.iter_mut().for_each(|x| *x *= inv_sum);
                }
            }
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
    (q, k, v): (&[T], &[T], &[T]),
    (out, grad): (&[T], &[T]),
    stats: &[T],
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
    let stats = RowStats {
        ptr: stats.as_ptr() as *mut T,
        half: stats.len() / 2,
    };
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
                // The forward pass's probabilities again: the same scores, exponentials and
                // row statistics, so the same values.
                let q_blk = block_scores(g, qp.get(), kp.get(), (bi, hi, r0), p);
                for (i, row) in p.chunks_exact_mut(m).enumerate() {
                    let (max, inv_sum) = stats.get(bh * n + r0 + i);
                    T::exp_shifted_times(row, scale_t, max, inv_sum);
                }
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
                // ∂scores = scale · p ⊙ (∂p − Σ ∂p ⊙ p), with ∂p = ∂out · vᵀ; the sum over keys
                // is ∂out · out per row (out = p · v), e products instead of m.
                let v_t = Mat {
                    ptr: vp.get().add(bi * m * h * e + hi * e),
                    rs: 1,
                    cs: he,
                };
                gemm_strided(rows, m, e, ds.as_mut_ptr(), m as isize, false, g_blk, v_t);
                for (i, (row, p_row)) in ds.chunks_exact_mut(m).zip(p.chunks_exact(m)).enumerate() {
                    let at = bi * n * h * e + (r0 + i) * h * e + hi * e;
                    let dot = T::of(sum2(&grad[at..at + e], &out[at..at + e], |a, b| {
                        a.f64() * b.f64()
                    }));
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
    /// Keep each query row's softmax max and 1 / sum (2·b·H·n elements), for the backward pass.
    keep_stats: bool,
    stats: Mutex<Option<CpuStorage>>,
}

impl HeadsAttention {
    fn new(heads: usize, scale: f64, keep: bool, keep_stats: bool) -> Self {
        Self {
            heads,
            scale,
            keep,
            probs: Mutex::new(None),
            keep_stats,
            stats: Mutex::new(None),
        }
    }
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
                let mut probs = self.keep.then(|| vec![<$t>::default(); probs_len]);
                let mut stats = self
                    .keep_stats
                    .then(|| vec![<$t>::default(); 2 * g.b * g.h * g.n]);
                let out = forward(
                    g,
                    self.scale,
                    q,
                    k,
                    v,
                    probs.as_deref_mut(),
                    stats.as_deref_mut(),
                );
                for (slot, kept) in [(&self.probs, probs), (&self.stats, stats)] {
                    if let (Ok(mut slot), Some(kept)) = (slot.lock(), kept) {
                        *slot = Some(CpuStorage::$variant(kept));
                    }
                }
                CpuStorage::$variant(out)
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
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = [q.track_op(), k.track_op(), v.track_op()];
        let g = dims(self.heads, q.dims(), k.dims(), v.dims())?;
        let grad = grad.contiguous()?;
        let stats = self
            .stats
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| {
                candle_core::Error::Msg("attention: the forward pass kept no row statistics".into())
            })?;
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (so, lo) = out.storage_and_layout();
        let (
            Storage::Cpu(sq),
            Storage::Cpu(sk),
            Storage::Cpu(sv),
            Storage::Cpu(sg),
            Storage::Cpu(so),
        ) = (&*sq, &*sk, &*sv, &*sg, &*so)
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
                    (slice(sq, lq)?, slice(sk, lk)?, slice(sv, lv)?),
                    (slice(so, lo)?, slice(sg, lg)?),
                    stats.as_slice::<$t>()?,
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
    let op = HeadsAttention::new(heads, scale, true, false);
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
        let tracked = q.track_op() || k.track_op() || v.track_op();
        let op = HeadsAttention::new(heads, scale, false, tracked);
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
