//! Swin Transformer backbone: patch embedding, (shifted-)window attention with relative position
//! bias, patch merging, and a Norm on each stage's output.

use candle_core::{Device, Tensor};

use crate::config::SwinConfig;
use crate::layers::{Conv, Linear, Norm, Path};
use crate::{Mask2FormerError, Result};

struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    /// (heads, N, N) with N = window².
    bias: Tensor,
    heads: usize,
}

impl WindowAttention {
    fn load(p: &Path, dim: usize, heads: usize, window: usize, qkv_bias: bool) -> Result<Self> {
        let table_len = (2 * window - 1) * (2 * window - 1);
        let table = p.get("rel_bias_table", &[table_len, heads])?;
        let n = window * window;
        // Index of the relative offset (dy, dx) between tokens i and j of a window.
        let mut index = Vec::with_capacity(n * n);
        for i in 0..n {
            for j in 0..n {
                let (yi, xi) = (i / window, i % window);
                let (yj, xj) = (j / window, j % window);
                let dy = yi + window - 1 - yj;
                let dx = xi + window - 1 - xj;
                index.push((dy * (2 * window - 1) + dx) as u32);
            }
        }
        // Checkpoints that store the index table must agree with ours.
        if let Some((name, stored)) = p.w.get_index(&format!("{}.rel_index", p.prefix))? {
            let same = stored.len() == index.len()
                && stored.iter().zip(&index).all(|(&a, &b)| a == b as i64);
            if !same {
                return Err(Mask2FormerError::Format {
                    path: p.w.path().to_path_buf(),
                    message: format!(
                        "tensor `{name}` differs from the relative position index of a {window}×{window} window"
                    ),
                });
            }
        }
        let index = Tensor::new(index, table.device())?;
        let bias = table
            .index_select(&index, 0)?
            .reshape((n, n, heads))?
            .permute((2, 0, 1))?
            .contiguous()?;
        Ok(Self {
            qkv: Linear::load(&p.pp("qkv"), dim, 3 * dim, qkv_bias)?,
            proj: Linear::load(&p.pp("proj"), dim, dim, true)?,
            bias,
            heads,
        })
    }

    /// `x` (B·nW, N, C); `mask` (nW, N, N) for shifted windows.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (bw, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((bw, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * (1.0 / (hd as f64).sqrt()))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let mut att = q.matmul(&k.t()?)?.broadcast_add(&self.bias.unsqueeze(0)?)?;
        if let Some(mask) = mask {
            let nw = mask.dim(0)?;
            att = att
                .reshape((bw / nw, nw, self.heads, n, n))?
                .broadcast_add(&mask.unsqueeze(1)?.unsqueeze(0)?)?
                .reshape((bw, self.heads, n, n))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((bw, n, c))?;
        self.proj.forward(&y)
    }
}

struct Block {
    norm1: Norm,
    attn: WindowAttention,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    window: usize,
    shift: usize,
}

/// Pads (B, H, W, C) with zeros at the bottom and right to (ph, pw).
fn pad_hw(x: &Tensor, ph: usize, pw: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let mut x = x.clone();
    if pw > w {
        x = x.pad_with_zeros(2, 0, pw - w)?;
    }
    if ph > h {
        x = x.pad_with_zeros(1, 0, ph - h)?;
    }
    Ok(x)
}

/// The shifted-window mask: tokens of one window that came from different regions of the
/// cyclically shifted map may not attend to each other.
fn shift_mask(hp: usize, wp: usize, window: usize, shift: usize, dev: &Device) -> Result<Tensor> {
    let region = |i: usize, len: usize| -> usize {
        if i < len - window {
            0
        } else if i < len - shift {
            1
        } else {
            2
        }
    };
    let (nh, nw) = (hp / window, wp / window);
    let n = window * window;
    let mut labels = vec![0usize; nh * nw * n];
    for wy in 0..nh {
        for wx in 0..nw {
            for t in 0..n {
                let (y, x) = (wy * window + t / window, wx * window + t % window);
                labels[(wy * nw + wx) * n + t] = region(y, hp) * 3 + region(x, wp);
            }
        }
    }
    let mut mask = Vec::with_capacity(nh * nw * n * n);
    for win in 0..nh * nw {
        let l = &labels[win * n..(win + 1) * n];
        for i in 0..n {
            for j in 0..n {
                mask.push(if l[i] == l[j] { 0f32 } else { -100f32 });
            }
        }
    }
    Ok(Tensor::from_vec(mask, (nh * nw, n, n), dev)?)
}

impl Block {
    fn load(p: &Path, cfg: &SwinConfig, dim: usize, heads: usize, shift: usize) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        let hidden = cfg.mlp_ratio * dim;
        Ok(Self {
            norm1: Norm::load(&p.pp("norm1"), dim, eps)?,
            attn: WindowAttention::load(&p.pp("attn"), dim, heads, cfg.window_size, cfg.qkv_bias)?,
            norm2: Norm::load(&p.pp("norm2"), dim, eps)?,
            fc1: Linear::load(&p.pp("mlp.fc1"), dim, hidden, true)?,
            fc2: Linear::load(&p.pp("mlp.fc2"), hidden, dim, true)?,
            window: cfg.window_size,
            shift,
        })
    }

    /// `x` (B, H·W, C).
    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let ws = self.window;
        let y = self.norm1.forward(x)?.reshape((b, h, w, c))?;
        // Windows tile the padded map; padding is applied even when the map is smaller than a
        // window, as both reference implementations of this backbone do.
        let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let mut y = pad_hw(&y, hp, wp)?;
        let s = self.shift as i32;
        if self.shift > 0 {
            y = y.roll(-s, 1)?.roll(-s, 2)?;
        }
        let (nh, nw) = (hp / ws, wp / ws);
        let windows = y
            .reshape((b, nh, ws, nw, ws, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b * nh * nw, ws * ws, c))?;
        let mask = if self.shift > 0 {
            Some(shift_mask(hp, wp, ws, self.shift, x.device())?)
        } else {
            None
        };
        let out = self.attn.forward(&windows, mask.as_ref())?;
        let mut y = out
            .reshape((b, nh, nw, ws, ws, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b, hp, wp, c))?;
        if self.shift > 0 {
            y = y.roll(s, 1)?.roll(s, 2)?;
        }
        let y = y
            .narrow(1, 0, h)?
            .narrow(2, 0, w)?
            .contiguous()?
            .reshape((b, h * w, c))?;
        let x = (x + y)?;
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?)?;
        Ok((x + m)?)
    }
}

struct PatchMerging {
    norm: Norm,
    reduction: Linear,
}

impl PatchMerging {
    fn load(p: &Path, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm: Norm::load(&p.pp("norm"), 4 * dim, eps)?,
            reduction: Linear::load(&p.pp("reduction"), 4 * dim, 2 * dim, false)?,
        })
    }

    /// (B, H·W, C) → (B, ⌈H/2⌉·⌈W/2⌉, 2C).
    fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let y = pad_hw(&x.reshape((b, h, w, c))?, 2 * h2, 2 * w2)?;
        // Neighbours in the order (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
        let y = y
            .reshape((b, h2, 2, w2, 2, c))?
            .permute((0, 1, 3, 4, 2, 5))?
            .contiguous()?
            .reshape((b, h2 * w2, 4 * c))?;
        self.reduction.forward(&self.norm.forward(&y)?)
    }
}

pub struct Swin {
    cfg: SwinConfig,
    patch: Conv,
    patch_norm: Norm,
    stages: Vec<(Vec<Block>, Option<PatchMerging>)>,
    out_norms: Vec<Norm>,
}

impl Swin {
    pub fn load(p: &Path, cfg: &SwinConfig) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        let patch = Conv::load(
            &p.pp("patch_embed.proj"),
            cfg.in_channels,
            cfg.embed_dim,
            cfg.patch_size,
            cfg.patch_size,
            0,
            true,
        )?;
        let patch_norm = Norm::load(&p.pp("patch_embed.norm"), cfg.embed_dim, eps)?;
        let mut stages = Vec::new();
        let mut out_norms = Vec::new();
        let ns = cfg.num_stages();
        for s in 0..ns {
            let dim = cfg.stage_dim(s);
            let sp = p.pp(format!("stages.{s}"));
            let blocks = (0..cfg.depths[s])
                .map(|i| {
                    let shift = if i % 2 == 1 { cfg.window_size / 2 } else { 0 };
                    Block::load(
                        &sp.pp(format!("blocks.{i}")),
                        cfg,
                        dim,
                        cfg.num_heads[s],
                        shift,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let merge = if s + 1 < ns {
                Some(PatchMerging::load(&sp.pp("merge"), dim, eps)?)
            } else {
                None
            };
            stages.push((blocks, merge));
            out_norms.push(Norm::load(&p.pp(format!("out_norms.{s}")), dim, eps)?);
        }
        Ok(Self {
            cfg: cfg.clone(),
            patch,
            patch_norm,
            stages,
            out_norms,
        })
    }

    /// (B, 3, H, W) → one (B, C_s, H_s, W_s) map per stage, strides 4, 8, 16, 32.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let ps = self.cfg.patch_size;
        let (hp, wp) = (h.div_ceil(ps) * ps, w.div_ceil(ps) * ps);
        let mut x = x.clone();
        if wp > w {
            x = x.pad_with_zeros(3, 0, wp - w)?;
        }
        if hp > h {
            x = x.pad_with_zeros(2, 0, hp - h)?;
        }
        let y = self.patch.forward(&x)?;
        let (b, _, mut h, mut w) = y.dims4()?;
        let mut x = self
            .patch_norm
            .forward(&y.flatten_from(2)?.transpose(1, 2)?)?;
        let mut outs = Vec::with_capacity(self.stages.len());
        for (s, (blocks, merge)) in self.stages.iter().enumerate() {
            for blk in blocks {
                x = blk.forward(&x, h, w)?;
            }
            let dim = self.cfg.stage_dim(s);
            let o = self.out_norms[s]
                .forward(&x)?
                .reshape((b, h, w, dim))?
                .permute((0, 3, 1, 2))?
                .contiguous()?;
            outs.push(o);
            if let Some(m) = merge {
                x = m.forward(&x, h, w)?;
                h = h.div_ceil(2);
                w = w.div_ceil(2);
            }
        }
        Ok(outs)
    }
}
