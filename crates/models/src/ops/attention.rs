//! softmax(q·kᵀ·scale)·v as one op with a hand-written backward pass.
//!
//! Composed, attention allocates the scores, the scaled scores and the probabilities (three
//! buffers of heads × queries × keys), and its backward pass as many again, with both sides of
//! every product differentiated. Here, on the CPU in f32/f64, the scores are scaled and
//! normalised in place, so the probabilities are the only such buffer, kept for the backward pass;
//! that pass differentiates only the tracked operands (not a frozen text context's keys and
//! values). The observer needs the probabilities as a differentiable tensor of their own, so an
//! observed layer uses the composed form; so do other devices and dtypes.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::cpu_kernel;
use super::matmul::matmul;
use super::softmax::{softmax_rows_in_place, SoftmaxGrad};

struct Attention {
    scale: f64,
    /// The probabilities of the forward pass, for the backward pass.
    probs: Mutex<Option<Tensor>>,
}

/// (batch, queries, keys, head_dim, value_dim) of q (…, n, d), k (…, m, d), v (…, m, e).
fn attention_dims(
    q: &Layout,
    k: &Layout,
    v: &Layout,
) -> Result<(usize, usize, usize, usize, usize)> {
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let r = qd.len();
    let fits = r >= 2
        && kd.len() == r
        && vd.len() == r
        && qd[..r - 2] == kd[..r - 2]
        && qd[..r - 2] == vd[..r - 2]
        && qd[r - 1] == kd[r - 1]
        && kd[r - 2] == vd[r - 2];
    if !fits {
        candle_core::bail!("attention: q {qd:?}, k {kd:?} and v {vd:?} do not fit");
    }
    let batch = qd[..r - 2].iter().product();
    Ok((batch, qd[r - 2], kd[r - 2], qd[r - 1], vd[r - 1]))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
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
        let (batch, n, m, d, e) = attention_dims(lq, lk, lv)?;
        let r = lq.dims().len();
        let kt = lk.transpose(r - 2, r - 1)?;
        let mut scores = q.matmul(k, (batch, n, m, d), lq, &kt)?;
        match &mut scores {
            CpuStorage::F32(s) => softmax_rows_in_place(s, m, self.scale),
            CpuStorage::F64(s) => softmax_rows_in_place(s, m, self.scale),
            _ => candle_core::bail!("attention: only f32 and f64"),
        }
        let mut probs_dims = lq.dims()[..r - 2].to_vec();
        probs_dims.extend([n, m]);
        let probs_layout = Layout::contiguous(probs_dims.clone());
        let out = scores.matmul(v, (batch, n, e, m), &probs_layout, lv)?;
        let probs =
            Tensor::from_storage(Storage::Cpu(scores), probs_dims, BackpropOp::none(), false);
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(probs);
        }
        let mut out_dims = lq.dims()[..r - 1].to_vec();
        out_dims.push(e);
        Ok((out, Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = self.probs.lock().ok().and_then(|p| p.clone());
        let probs =
            probs.ok_or_else(|| candle_core::Error::Msg("attention: no forward pass".into()))?;
        let grad_v = v.track_op().then(|| probs.t()?.matmul(grad)).transpose()?;
        if !q.track_op() && !k.track_op() {
            return Ok((None, None, grad_v));
        }
        let grad_probs = grad.matmul(&v.t()?)?;
        let grad_scores =
            probs.apply_op2_no_bwd(&grad_probs, &SoftmaxGrad { scale: self.scale })?;
        let grad_q = q.track_op().then(|| grad_scores.matmul(k)).transpose()?;
        let grad_k = k
            .track_op()
            .then(|| grad_scores.t()?.matmul(q))
            .transpose()?;
        Ok((grad_q, grad_k, grad_v))
    }
}

/// softmax(q·kᵀ·scale)·v for q (…, n, d), k (…, m, d), v (…, m, e); `scale` > 0.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let same_dtype = q.dtype() == k.dtype() && q.dtype() == v.dtype();
    // Untracked, the composed form is as fast (candle's fused softmax forward beats ours).
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let fits = same_dtype && scale > 0.0 && q.elem_count() > 0 && k.elem_count() > 0;
    if tracked && cpu_kernel(q) && fits {
        let op = Attention {
            scale,
            probs: Mutex::new(None),
        };
        return q.apply_op3(k, v, op);
    }
    attention_composed(q, k, v, scale)
}

/// The same from matrix products and a softmax (the reference, and the path off the CPU).
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = matmul(q, &k.t()?)?;
    // Tracked, the differentiable softmax takes the scale inside its exponent: a pass less each way.
    let probs = if scores.track_op() {
        super::softmax::softmax_scaled_last_dim(&scores, scale)?
    } else {
        crate::nn::softmax_last_dim(&(scores * scale)?)?
    };
    matmul(&probs, v)
}
