//! The normalised sine position encoding of DETR-style models.

use candle_core::{Device, Tensor};

use crate::Result;

/// (H·W, 2·`feats`) position features: `feats` channels for y then `feats` for x, alternating
/// sine and cosine, with coordinates normalised to (0, 2π].
pub fn sine_position(h: usize, w: usize, feats: usize, dev: &Device) -> Result<Tensor> {
    let scale = 2.0 * std::f64::consts::PI;
    let eps = 1e-6;
    let dim_t: Vec<f64> = (0..feats)
        .map(|k| 10000f64.powf(2.0 * (k / 2) as f64 / feats as f64))
        .collect();
    let enc = |v: f64, out: &mut Vec<f32>| {
        for (k, d) in dim_t.iter().enumerate() {
            let a = v / d;
            out.push(if k % 2 == 0 { a.sin() } else { a.cos() } as f32);
        }
    };
    let mut data = Vec::with_capacity(h * w * 2 * feats);
    for y in 0..h {
        let ye = (y + 1) as f64 / (h as f64 + eps) * scale;
        for x in 0..w {
            let xe = (x + 1) as f64 / (w as f64 + eps) * scale;
            enc(ye, &mut data);
            enc(xe, &mut data);
        }
    }
    Ok(Tensor::from_vec(data, (h * w, 2 * feats), dev)?)
}
