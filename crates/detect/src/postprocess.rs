//! mmdet 2.x's test pipeline and instance post-processing for Mask2Former, as GenEval runs it:
//!
//! * `Resize(img_scale=(1333, 800), keep_ratio=True)`: one scale factor fitting the long side in
//!   1333 and the short side in 800, sizes rounded half up, bilinear with half-pixel centres
//!   (OpenCV's `INTER_LINEAR`), back to 8 bits;
//! * `Normalize` with the ImageNet mean and std on RGB;
//! * `Pad(size_divisor=32)` with zeros at the bottom and right;
//! * scores: softmax over the classes, the no-object class dropped, the top 100 (query, class)
//!   pairs; masks: the query's logits resized to the padded input, cropped to the resized image,
//!   resized to the original size, `> 0`; the score times the mean mask probability inside the
//!   mask; the box is the tight box of the mask (`x2`, `y2` exclusive), zeros for an empty mask.

use candle_core::{DType, Device, Tensor};

use crate::layers::resize_bilinear;
use crate::{DetectError, Result};

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

/// Source taps of half-pixel bilinear resampling: (i0, i1, weight of i1) per output index.
fn taps(src: usize, dst: usize) -> Vec<(usize, usize, f64)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let s = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(src - 1);
            let i1 = (i0 + 1).min(src - 1);
            (i0, i1, s - i0 as f64)
        })
        .collect()
}

/// Bilinear resize of an 8-bit RGB image (channels interleaved), rounded back to 8 bits.
pub fn resize_rgb(src: &[u8], h: usize, w: usize, nh: usize, nw: usize) -> Vec<u8> {
    let tx = taps(w, nw);
    let ty = taps(h, nh);
    // Rows first, then columns; all in f64 so the arithmetic is exact for dyadic scales.
    let mut rows = vec![0f64; h * nw * 3];
    for y in 0..h {
        for (x, &(i0, i1, f)) in tx.iter().enumerate() {
            for c in 0..3 {
                let a = src[(y * w + i0) * 3 + c] as f64;
                let b = src[(y * w + i1) * 3 + c] as f64;
                rows[(y * nw + x) * 3 + c] = a * (1.0 - f) + b * f;
            }
        }
    }
    let mut out = vec![0u8; nh * nw * 3];
    for (y, &(i0, i1, f)) in ty.iter().enumerate() {
        for x in 0..nw {
            for c in 0..3 {
                let a = rows[(i0 * nw + x) * 3 + c];
                let b = rows[(i1 * nw + x) * 3 + c];
                let v = (a * (1.0 - f) + b * f + 0.5).floor().clamp(0.0, 255.0);
                out[(y * nw + x) * 3 + c] = v as u8;
            }
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
        return Err(DetectError::Input(format!("an empty {w}x{h} image")));
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
pub struct Instance {
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
) -> Result<Vec<Instance>> {
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
        for (&q, logits) in chunk.iter().zip(m) {
            per_query.insert(q, summarise(&logits, oh, ow, keep_masks));
        }
    }
    let mut out: Vec<Instance> = order
        .iter()
        .map(|&i| {
            let (q, label) = (i / k, i % k);
            let (mask_score, bbox, mask) = per_query[&q].clone();
            Instance {
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
