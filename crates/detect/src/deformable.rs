//! Multi-scale deformable attention (Deformable DETR), inference only.
//!
//! Each query samples `points` locations per head and level around its reference point and mixes
//! them with softmaxed weights. Sampling is bilinear in the manner of
//! `grid_sample(align_corners=False, padding_mode="zeros")`: pixel centres sit at half-integers
//! and neighbours outside the map contribute zero. It is written with tensor ops and one
//! `index_select` gather so it runs on any candle device.

use candle_core::{DType, Tensor};

use crate::layers::{Linear, Path};
use crate::Result;

/// Queries gathered at once; bounds the memory of the gathered values.
const QUERY_CHUNK: usize = 2048;

pub struct DeformableAttention {
    sampling_offsets: Linear,
    attention_weights: Linear,
    value_proj: Linear,
    output_proj: Linear,
    heads: usize,
    levels: usize,
    points: usize,
    /// Sample with the CPU loop (the default on the CPU) rather than the tensor gather.
    pub fused: bool,
}

impl DeformableAttention {
    pub fn load(p: &Path, dim: usize, heads: usize, levels: usize, points: usize) -> Result<Self> {
        Ok(Self {
            sampling_offsets: Linear::load(
                &p.pp("sampling_offsets"),
                dim,
                heads * levels * points * 2,
                true,
            )?,
            attention_weights: Linear::load(
                &p.pp("attention_weights"),
                dim,
                heads * levels * points,
                true,
            )?,
            value_proj: Linear::load(&p.pp("value_proj"), dim, dim, true)?,
            output_proj: Linear::load(&p.pp("output_proj"), dim, dim, true)?,
            heads,
            levels,
            points,
            fused: p.w.device().is_cpu(),
        })
    }

    /// `query` (B, S, C) with positions added, `value` (B, S, C) without, `reference` (S, 2) as
    /// normalised (x, y), `shapes` the (H, W) of each level in the order they are concatenated.
    pub fn forward(
        &self,
        query: &Tensor,
        value: &Tensor,
        reference: &Tensor,
        shapes: &[(usize, usize)],
    ) -> Result<Tensor> {
        let fused = self.fused && query.device().is_cpu();
        self.forward_with(query, value, reference, shapes, fused)
    }

    /// As [`Self::forward`]; `fused` picks the CPU loop over the device-generic gather.
    pub fn forward_with(
        &self,
        query: &Tensor,
        value: &Tensor,
        reference: &Tensor,
        shapes: &[(usize, usize)],
        fused: bool,
    ) -> Result<Tensor> {
        let (b, s, c) = query.dims3()?;
        let (nh, nl, np) = (self.heads, self.levels, self.points);
        let value = self
            .value_proj
            .forward(value)?
            .reshape((b, s, nh, c / nh))?;
        let offsets = self
            .sampling_offsets
            .forward(query)?
            .reshape((b, s, nh, nl, np, 2))?;
        let weights = self
            .attention_weights
            .forward(query)?
            .reshape((b, s, nh, nl * np))?;
        let weights = candle_nn::ops::softmax_last_dim(&weights)?.reshape((b, s, nh, nl, np))?;
        let out = if fused {
            sample_cpu(&value, &offsets, &weights, reference, shapes)?
        } else {
            sample_gather(&value, &offsets, &weights, reference, shapes)?
        };
        self.output_proj.forward(&out)
    }
}

/// Bilinear corners of a sampling location in pixels: (dx, dy) offsets and their weights.
const CORNERS: [(f32, f32); 4] = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)];

/// The sampling as one loop over queries: no gathered copies, threads over query ranges.
/// `value` (B, S, heads, hd), `offsets` (B, S, heads, L, P, 2), `weights` (B, S, heads, L, P).
fn sample_cpu(
    value: &Tensor,
    offsets: &Tensor,
    weights: &Tensor,
    reference: &Tensor,
    shapes: &[(usize, usize)],
) -> Result<Tensor> {
    let (b, s, nh, hd) = value.dims4()?;
    let (nl, np) = (offsets.dim(3)?, offsets.dim(4)?);
    let v = value.flatten_all()?.to_vec1::<f32>()?;
    let off = offsets.flatten_all()?.to_vec1::<f32>()?;
    let aw = weights.flatten_all()?.to_vec1::<f32>()?;
    let rf = reference.flatten_all()?.to_vec1::<f32>()?;
    let mut starts = Vec::with_capacity(nl);
    let mut acc = 0;
    for &(h, w) in shapes {
        starts.push(acc);
        acc += h * w;
    }
    let rows = b * s;
    let mut out = vec![0f32; rows * nh * hd];
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (ci, chunk) in out.chunks_mut(per * nh * hd).enumerate() {
            let (v, off, aw, rf, starts) = (&v, &off, &aw, &rf, &starts);
            scope.spawn(move || {
                for (ri, o) in chunk.chunks_mut(nh * hd).enumerate() {
                    let row = ci * per + ri;
                    let (bi, q) = (row / s, row % s);
                    let (rx, ry) = (rf[2 * q], rf[2 * q + 1]);
                    for h in 0..nh {
                        let acc = &mut o[h * hd..(h + 1) * hd];
                        for (l, &(lh, lw)) in shapes.iter().enumerate() {
                            let (wf, hf) = (lw as f32, lh as f32);
                            for p in 0..np {
                                let k = ((row * nh + h) * nl + l) * np + p;
                                let px = (rx + off[2 * k] / wf) * wf - 0.5;
                                let py = (ry + off[2 * k + 1] / hf) * hf - 0.5;
                                let (x0, y0) = (px.floor(), py.floor());
                                let (fx, fy) = (px - x0, py - y0);
                                for (dx, dy) in CORNERS {
                                    let (xi, yi) = (x0 + dx, y0 + dy);
                                    if xi < 0.0 || yi < 0.0 || xi > wf - 1.0 || yi > hf - 1.0 {
                                        continue;
                                    }
                                    let wx = if dx == 0.0 { 1.0 - fx } else { fx };
                                    let wy = if dy == 0.0 { 1.0 - fy } else { fy };
                                    let wgt = wx * wy * aw[k];
                                    let pos = starts[l] + yi as usize * lw + xi as usize;
                                    let base = ((bi * s + pos) * nh + h) * hd;
                                    for (a, &x) in acc.iter_mut().zip(&v[base..base + hd]) {
                                        *a += wgt * x;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(Tensor::from_vec(out, (b, s, nh * hd), value.device())?)
}

/// The sampling with tensor ops and one `index_select` per query chunk, for any device.
fn sample_gather(
    value: &Tensor,
    offsets: &Tensor,
    weights: &Tensor,
    reference: &Tensor,
    shapes: &[(usize, usize)],
) -> Result<Tensor> {
    let (b, s, nh, hd) = value.dims4()?;
    let (nl, np) = (offsets.dim(3)?, offsets.dim(4)?);
    let c = nh * hd;
    let dev = value.device();
    // (B, heads, S, hd) flattened to rows: the gather table.
    let value = value
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * nh * s, hd))?;
    let per_level = |f: &dyn Fn(usize, usize, usize) -> f32| -> Result<Tensor> {
        let mut start = 0;
        let mut v = Vec::with_capacity(nl);
        for &(h, w) in shapes {
            v.push(f(h, w, start));
            start += h * w;
        }
        Ok(Tensor::from_vec(v, (1, 1, 1, nl, 1), dev)?)
    };
    let wl = per_level(&|_, w, _| w as f32)?;
    let hl = per_level(&|h, _, _| h as f32)?;
    let start = per_level(&|_, _, s0| s0 as f32)?;
    // Row offset of batch b, head h in the gather table.
    let base: Vec<f32> = (0..b * nh).map(|i| (i * s) as f32).collect();
    let base = Tensor::from_vec(base, (b, 1, nh, 1, 1), dev)?;

    let ref_x = reference.narrow(1, 0, 1)?.reshape((1, s, 1, 1, 1))?;
    let ref_y = reference.narrow(1, 1, 1)?.reshape((1, s, 1, 1, 1))?;
    let off_x = offsets.narrow(5, 0, 1)?.squeeze(5)?;
    let off_y = offsets.narrow(5, 1, 1)?.squeeze(5)?;
    // Sampling location in [0, 1], then in pixels with centres at half-integers.
    let loc_x = ref_x.broadcast_add(&off_x.broadcast_div(&wl)?)?;
    let loc_y = ref_y.broadcast_add(&off_y.broadcast_div(&hl)?)?;
    let px = (loc_x.broadcast_mul(&wl)? - 0.5)?;
    let py = (loc_y.broadcast_mul(&hl)? - 0.5)?;
    let x0 = px.floor()?;
    let y0 = py.floor()?;
    let fx = (&px - &x0)?;
    let fy = (&py - &y0)?;
    let wmax = (&wl - 1.0)?;
    let hmax = (&hl - 1.0)?;

    let mut idx = Vec::with_capacity(4);
    let mut wts = Vec::with_capacity(4);
    for (dx, dy) in CORNERS.map(|(x, y)| (x as f64, y as f64)) {
        let xi = (&x0 + dx)?;
        let yi = (&y0 + dy)?;
        let wx = if dx == 0.0 { (1.0 - &fx)? } else { fx.clone() };
        let wy = if dy == 0.0 { (1.0 - &fy)? } else { fy.clone() };
        let inside = xi
            .ge(0.0)?
            .mul(&xi.broadcast_le(&wmax)?)?
            .mul(&yi.ge(0.0)?)?
            .mul(&yi.broadcast_le(&hmax)?)?
            .to_dtype(DType::F32)?;
        let xc = xi.maximum(0.0)?.broadcast_minimum(&wmax)?;
        let yc = yi.maximum(0.0)?.broadcast_minimum(&hmax)?;
        let flat = yc
            .broadcast_mul(&wl)?
            .add(&xc)?
            .broadcast_add(&start)?
            .broadcast_add(&base)?;
        idx.push(flat);
        wts.push((wx * wy)?.mul(&inside)?.mul(weights)?);
    }
    // (B, S, heads, L, P, 4) → (B, heads, S, L·P·4)
    let arrange = |v: Vec<Tensor>| -> Result<Tensor> {
        Ok(Tensor::stack(&v, 5)?
            .permute((0, 2, 1, 3, 4, 5))?
            .contiguous()?
            .reshape((b, nh, s, nl * np * 4))?)
    };
    let idx = arrange(idx)?.to_dtype(DType::U32)?;
    let wts = arrange(wts)?;
    let k = nl * np * 4;
    let mut outs = Vec::new();
    let mut q0 = 0;
    while q0 < s {
        let n = QUERY_CHUNK.min(s - q0);
        let ids = idx.narrow(2, q0, n)?.contiguous()?.flatten_all()?;
        let gathered = value.index_select(&ids, 0)?.reshape((b * nh * n, k, hd))?;
        let w = wts
            .narrow(2, q0, n)?
            .contiguous()?
            .reshape((b * nh * n, 1, k))?;
        outs.push(w.matmul(&gathered)?.reshape((b, nh, n, hd))?);
        q0 += n;
    }
    Ok(Tensor::cat(&outs, 2)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, c))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_loop_and_gather_agree() {
        let dev = Device::Cpu;
        let shapes = [(3, 5), (2, 3), (1, 2)];
        let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
        let (b, nh, hd, nl, np) = (2, 3, 4, 3, 2);
        let value = Tensor::randn(0f32, 1.0, (b, s, nh, hd), &dev).unwrap();
        // Offsets of several pixels, so that many samples fall outside the maps.
        let offsets =
            (Tensor::randn(0f32, 1.0, (b, s, nh, nl, np, 2), &dev).unwrap() * 3.0).unwrap();
        let logits = Tensor::randn(0f32, 1.0, (b, s, nh, nl * np), &dev).unwrap();
        let weights = candle_nn::ops::softmax_last_dim(&logits)
            .unwrap()
            .reshape((b, s, nh, nl, np))
            .unwrap();
        let reference = Tensor::rand(0f32, 1.0, (s, 2), &dev).unwrap();
        let a = sample_cpu(&value, &offsets, &weights, &reference, &shapes).unwrap();
        let g = sample_gather(&value, &offsets, &weights, &reference, &shapes).unwrap();
        let d = (a - &g)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let m = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(m > 0.1 && d <= 1e-5 * m, "difference {d} of {m}");
    }
}
