//! mmdet 2.x's test pipeline and instance post-processing for Mask2Former, as GenEval runs it:
//!
//! * `Resize(img_scale=(1333, 800), keep_ratio=True)`: one scale factor fitting the long side in
//!   1333 and the short side in 800, sizes rounded half up, bilinear with half-pixel centres
//!   (OpenCV's `INTER_LINEAR`, reproduced to the bit in its 8-bit fixed-point form);
//! * `Normalize` with the ImageNet mean and std on RGB;
//! * `Pad(size_divisor=32)` with zeros at the bottom and right;
//! * scores: softmax over the classes, the no-object class dropped, the top 100 (query, class)
//!   pairs; masks: the query's logits resized to the padded input, cropped to the resized image,
//!   resized to the original size, `> 0`; the score times the mean mask probability inside the
//!   mask; the box is the tight box of the mask (`x2`, `y2` exclusive), zeros for an empty mask.

use candle_core::{DType, Device, Tensor};

use crate::layers::resize_bilinear;
use crate::{Mask2FormerError, Result};

pub const MEAN: [f32; 3] = [123.675, 116.28, 103.53];
pub const STD: [f32; 3] = [58.395, 57.12, 57.375];
pub const IMG_SCALE: (usize, usize) = (1333, 800);
pub const SIZE_DIVISOR: usize = 32;
pub const MAX_PER_IMAGE: usize = 100;

/// The size (h, w) mmcv's `rescale_size` gives an (h, w) image for `scale` (long, short).
pub fn rescale_size(h: usize, w: usize, scale: (usize, usize)) -> (usize, usize) {
    let long = scale.0.max(scale.1) as f64;
    let short = scale.0.min(scale.1) as f64;
    let f = (long / h.max(w) as f64).min(short / h.min(w) as f64);
    let r = |v: usize| ((v as f64 * f + 0.5) as usize).max(1);
    (r(h), r(w))
}

/// Fixed-point taps of OpenCV's 8-bit `INTER_LINEAR`: source index and the two weights in
/// 1/2048ths, per output index. Sampling is half-pixel (`(d + 0.5)·scale − 0.5`, in f32 as
/// OpenCV computes it). Along x, OpenCV clamps positions before the image edge to the edge
/// pixel; along y it keeps the fraction and clamps the row indices instead (`clamp_fraction`).
fn cv_taps(src: usize, dst: usize, clamp_fraction: bool) -> Vec<(i64, [i64; 2])> {
    let scale = 1.0 / (dst as f64 / src as f64);
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut i = f.floor() as i64;
            let mut frac = f - i as f32;
            if clamp_fraction {
                if i < 0 {
                    (i, frac) = (0, 0.0);
                }
                if i >= src as i64 - 1 {
                    (i, frac) = (src as i64 - 1, 0.0);
                }
            }
            let w0 = ((1.0f32 - frac) * 2048.0).round_ties_even() as i64;
            let w1 = (frac * 2048.0).round_ties_even() as i64;
            (i, [w0, w1])
        })
        .collect()
}

/// Resizes an 8-bit RGB image (channels interleaved) as `cv2.resize(..., INTER_LINEAR)` does,
/// to the bit: the horizontal pass in 11-bit fixed point, the vertical one with the rounding of
/// OpenCV's vectorised 8-bit path.
pub fn resize_rgb(src: &[u8], h: usize, w: usize, nh: usize, nw: usize) -> Vec<u8> {
    let tx = cv_taps(w, nw, true);
    let ty = cv_taps(h, nh, false);
    let mut rows = vec![0i64; h * nw * 3];
    for y in 0..h {
        for (x, &(i0, [a0, a1])) in tx.iter().enumerate() {
            let i0 = i0 as usize;
            let i1 = (i0 + 1).min(w - 1);
            for c in 0..3 {
                let s0 = src[(y * w + i0) * 3 + c] as i64;
                let s1 = src[(y * w + i1) * 3 + c] as i64;
                rows[(y * nw + x) * 3 + c] = s0 * a0 + s1 * a1;
            }
        }
    }
    let clamp_row = |r: i64| r.clamp(0, h as i64 - 1) as usize;
    let mut out = vec![0u8; nh * nw * 3];
    for (y, &(i0, [b0, b1])) in ty.iter().enumerate() {
        let (r0, r1) = (clamp_row(i0), clamp_row(i0 + 1));
        for x in 0..nw * 3 {
            let v0 = rows[r0 * nw * 3 + x];
            let v1 = rows[r1 * nw * 3 + x];
            let v = (((b0 * (v0 >> 4)) >> 16) + ((b1 * (v1 >> 4)) >> 16) + 2) >> 2;
            out[y * nw * 3 + x] = v.clamp(0, 255) as u8;
        }
    }
    out
}

/// An image ready for the network, with the sizes post-processing needs.
pub struct Prepared {
    /// (3, Hp, Wp), normalised and zero-padded.
    pub pixels: Tensor,
    pub original: (usize, usize),
    pub resized: (usize, usize),
}

pub fn prepare(image: &image::RgbImage, device: &Device) -> Result<Prepared> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    if w == 0 || h == 0 {
        return Err(Mask2FormerError::Input(format!("an empty {w}x{h} image")));
    }
    let (nh, nw) = rescale_size(h, w, IMG_SCALE);
    let resized = resize_rgb(image.as_raw(), h, w, nh, nw);
    let (ph, pw) = (
        nh.div_ceil(SIZE_DIVISOR) * SIZE_DIVISOR,
        nw.div_ceil(SIZE_DIVISOR) * SIZE_DIVISOR,
    );
    let mut data = vec![0f32; 3 * ph * pw];
    for y in 0..nh {
        for x in 0..nw {
            for c in 0..3 {
                let v = resized[(y * nw + x) * 3 + c] as f32;
                data[(c * ph + y) * pw + x] = (v - MEAN[c]) / STD[c];
            }
        }
    }
    Ok(Prepared {
        pixels: Tensor::from_vec(data, (3, ph, pw), device)?,
        original: (h, w),
        resized: (nh, nw),
    })
}

/// A binary mask at the original image size, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<bool>,
}

/// One instance, as mmdet reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskedInstance {
    pub query: usize,
    pub label: usize,
    /// Class probability × mean mask probability inside the mask.
    pub score: f32,
    /// [x1, y1, x2, y2] in original-image pixels, x2 and y2 exclusive.
    pub bbox: [f32; 4],
    pub mask: Option<Mask>,
}

/// Queries resized at once (each is a full-image float map).
const MASK_CHUNK: usize = 8;

/// Instances of one image from the last round's `class_logits` (Q, K+1) and `mask_logits`
/// (Q, h, w), highest score first.
pub fn instances(
    class_logits: &Tensor,
    mask_logits: &Tensor,
    prep_padded: (usize, usize),
    resized: (usize, usize),
    original: (usize, usize),
    keep_masks: bool,
) -> Result<Vec<MaskedInstance>> {
    let (nq, k1) = class_logits.dims2()?;
    let k = k1 - 1;
    let probs = candle_nn::ops::softmax_last_dim(&class_logits.to_dtype(DType::F32)?)?
        .narrow(1, 0, k)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // Top-k over (query, class) pairs, as torch.topk orders them: descending, ties by index.
    let mut order: Vec<usize> = (0..nq * k).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(MAX_PER_IMAGE.min(nq * k));

    let mut queries: Vec<usize> = order.iter().map(|i| i / k).collect();
    queries.sort_unstable();
    queries.dedup();
    let (oh, ow) = original;
    let mut per_query = std::collections::HashMap::new();
    for chunk in queries.chunks(MASK_CHUNK) {
        let ids = Tensor::new(
            chunk.iter().map(|&q| q as u32).collect::<Vec<_>>(),
            mask_logits.device(),
        )?;
        let m = mask_logits.index_select(&ids, 0)?.unsqueeze(1)?;
        let m = resize_bilinear(&m, prep_padded.0, prep_padded.1)?
            .narrow(2, 0, resized.0)?
            .narrow(3, 0, resized.1)?
            .contiguous()?;
        let m = resize_bilinear(&m, oh, ow)?;
        let m = m.flatten_from(1)?.to_vec2::<f32>()?;
        // One thread per mask: each is a pass over the whole image.
        let sums: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = m
                .iter()
                .map(|logits| scope.spawn(move || summarise(logits, oh, ow, keep_masks)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("mask summary"))
                .collect()
        });
        for (&q, sum) in chunk.iter().zip(sums) {
            per_query.insert(q, sum);
        }
    }
    let mut out: Vec<MaskedInstance> = order
        .iter()
        .map(|&i| {
            let (q, label) = (i / k, i % k);
            let (mask_score, bbox, mask) = per_query[&q].clone();
            MaskedInstance {
                query: q,
                label,
                score: (probs[i] as f64 * mask_score) as f32,
                bbox,
                mask,
            }
        })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(out)
}

/// Mean sigmoid inside the mask, the tight box, and the mask itself.
fn summarise(logits: &[f32], h: usize, w: usize, keep: bool) -> (f64, [f32; 4], Option<Mask>) {
    let mut sum = 0f64;
    let mut count = 0usize;
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for y in 0..h {
        for x in 0..w {
            let v = logits[y * w + x];
            if v > 0.0 {
                sum += 1.0 / (1.0 + (-v as f64).exp());
                count += 1;
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
    }
    let bbox = if count > 0 {
        [x0 as f32, y0 as f32, x1 as f32, y1 as f32]
    } else {
        [0.0; 4]
    };
    let mask = keep.then(|| Mask {
        width: w,
        height: h,
        data: logits.iter().map(|&v| v > 0.0).collect(),
    });
    (sum / (count as f64 + 1e-6), bbox, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescale_follows_mmcv() {
        // 512² → 800² (the short side binds); 480×640 → 800×1067; a long strip is bound by 1333.
        assert_eq!(rescale_size(512, 512, IMG_SCALE), (800, 800));
        assert_eq!(rescale_size(480, 640, IMG_SCALE), (800, 1067));
        assert_eq!(rescale_size(100, 1000, IMG_SCALE), (133, 1333));
    }

    #[test]
    fn box_is_tight_and_exclusive() {
        let mut l = vec![-1f32; 4 * 5];
        l[6] = 2.0; // (x 1, y 1)
        l[13] = 0.5; // (x 3, y 2)
        let (s, b, _) = summarise(&l, 4, 5, false);
        assert_eq!(b, [1.0, 1.0, 4.0, 3.0]);
        let want = (1.0 / (1.0 + (-2f64).exp()) + 1.0 / (1.0 + (-0.5f64).exp())) / (2.0 + 1e-6);
        assert!((s - want).abs() < 1e-12);
        let (s, b, _) = summarise(&[-1.0; 4], 2, 2, false);
        assert_eq!((s, b), (0.0, [0.0; 4]));
    }
}
