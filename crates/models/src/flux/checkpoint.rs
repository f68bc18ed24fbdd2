//! Per-block gradient checkpointing for the FLUX transformer.
//!
//! A steering gradient pass through all 57 blocks of FLUX.1 would keep every block's
//! intermediates (attention scores, MLP activations) until the backward pass. Instead each block
//! runs as one candle [`CustomOp1`] on the joint [text; image] sequence: its forward computes the
//! block on a private copy of the input and keeps only the output; its backward recomputes the
//! block on a fresh [`Var`] of the input and back-propagates the incoming gradient through that
//! one block. The attention maps the block reports travel in the op's output (flattened after
//! the sequence), so an observer's maps stay differentiable.
//!
//! Only the gradient with respect to the block's input flows: weights, the conditioning vector
//! and the rotary tables are constants here (steering differentiates with respect to the latent).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, Var,
};

use super::attention::JointLayout;
use super::block::{DoubleStreamBlock, SingleStreamBlock};
use super::rope::Rope;
use crate::observer::{AttentionObserver, AttentionSite};

/// One block of either kind.
#[derive(Clone)]
pub(crate) enum Block {
    Double(DoubleStreamBlock),
    Single(SingleStreamBlock),
}

impl Block {
    fn site(&self, layout: JointLayout) -> AttentionSite {
        let attn = match self {
            Block::Double(b) => b.attention(),
            Block::Single(b) => b.attention(),
        };
        AttentionSite {
            layer: attn.name().to_string(),
            height: layout.grid.0,
            width: layout.grid.1,
            heads: attn.heads(),
            tokens: layout.text_tokens,
        }
    }
}

/// Keeps the probabilities the block's attention reports.
struct Capture {
    wanted: bool,
    probs: Option<Tensor>,
}

impl AttentionObserver for Capture {
    fn wants(&self, _site: &AttentionSite) -> bool {
        self.wanted
    }
    fn observe(&mut self, _site: &AttentionSite, probs: &Tensor) -> Result<()> {
        self.probs = Some(probs.clone());
        Ok(())
    }
}

struct Checkpointed {
    block: Block,
    temb: Tensor,
    rope: Rope,
    layout: JointLayout,
    /// Whether the observer wants this block's maps (they then follow the sequence in the output).
    maps: bool,
    /// The forward result, handed to candle once by `*_fwd`.
    result: Mutex<Option<Tensor>>,
}

impl Checkpointed {
    /// joint (b, t + n, dim) → flat [joint'; maps (b, heads, n, t) if wanted].
    fn run(&self, joint: &Tensor) -> Result<Tensor> {
        let t = self.layout.text_tokens;
        let mut capture = Capture {
            wanted: self.maps,
            probs: None,
        };
        let out = match &self.block {
            Block::Double(b) => {
                let n = joint.dim(1)? - t;
                let text = joint.narrow(1, 0, t)?.contiguous()?;
                let image = joint.narrow(1, t, n)?.contiguous()?;
                let (text, image) = b.forward(
                    &image,
                    &text,
                    &self.temb,
                    &self.rope,
                    self.layout,
                    &mut capture,
                )?;
                Tensor::cat(&[text, image], 1)?
            }
            Block::Single(b) => {
                b.forward(joint, &self.temb, &self.rope, self.layout, &mut capture)?
            }
        };
        let mut parts = vec![out.flatten_all()?];
        if let Some(p) = capture.probs {
            parts.push(p.to_dtype(out.dtype())?.flatten_all()?);
        }
        // Always a fresh, contiguous buffer: `*_fwd` hands its storage over as is.
        Tensor::cat(&parts, 0)?.copy()
    }

    fn take(&self) -> Result<Tensor> {
        let taken = self
            .result
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint lock poisoned".into()))?
            .take();
        taken.ok_or_else(|| {
            candle_core::Error::Msg("checkpointed FLUX block: forward result already used".into())
        })
    }
}

impl CustomOp1 for Checkpointed {
    fn name(&self) -> &'static str {
        "flux-block-checkpoint"
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let r = self.take()?;
        let (storage, layout) = r.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!(
                "checkpointed FLUX block: result on another device than its input"
            ),
        }
    }

    fn cuda_fwd(&self, _storage: &CudaStorage, _layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let r = self.take()?;
        let (storage, layout) = r.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!(
                "checkpointed FLUX block: result on another device than its input"
            ),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = self.run(x.as_tensor())?;
        // d/dy Σ y·g = g: back-propagates exactly the incoming gradient.
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        Ok(grads.get(x.as_tensor()).cloned())
    }
}

/// Runs `block` on the joint sequence `joint` (b, t + n, dim) as one checkpointed op and returns
/// the updated sequence; the block's maps go to `observer` if it wants them.
pub(crate) fn forward(
    block: &Block,
    joint: &Tensor,
    temb: &Tensor,
    rope: &Rope,
    layout: JointLayout,
    observer: &mut dyn AttentionObserver,
) -> Result<Tensor> {
    let site = block.site(layout);
    let op = Checkpointed {
        block: block.clone(),
        temb: temb.detach(),
        rope: rope.clone(),
        layout,
        maps: observer.wants(&site),
        result: Mutex::new(None),
    };
    // The forward runs on a tracked copy, as the plain path does (candle's fused kernels serve
    // only untracked tensors), so values match it bit for bit; its graph is dropped at once.
    let copy = Var::from_tensor(&joint.detach())?;
    let result = op.run(copy.as_tensor())?.detach();
    drop(copy);
    let wants = op.maps;
    *op.result
        .lock()
        .map_err(|_| candle_core::Error::Msg("checkpoint lock poisoned".into()))? = Some(result);
    let flat = joint.apply_op1(op)?;
    let numel = joint.elem_count();
    let out = flat.narrow(0, 0, numel)?.reshape(joint.shape())?;
    if wants {
        let (b, _, _) = joint.dims3()?;
        let n = layout.grid.0 * layout.grid.1;
        let probs = flat.narrow(0, numel, flat.dim(0)? - numel)?.reshape((
            b,
            site.heads,
            n,
            layout.text_tokens,
        ))?;
        observer.observe(&site, &probs)?;
    }
    Ok(out)
}
