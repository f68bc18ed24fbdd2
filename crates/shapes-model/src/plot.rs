//! A loss-curve PNG: raw losses (light) and their running mean (dark) on a log scale.

use crate::error::Result;
use image::{Rgb, RgbImage};

const W: u32 = 640;
const H: u32 = 320;
const PAD: u32 = 24;

fn line(img: &mut RgbImage, (x0, y0): (f32, f32), (x1, y1): (f32, f32), colour: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f32 / n as f32;
        let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
        if x >= 0.0 && y >= 0.0 && (x as u32) < W && (y as u32) < H {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}

/// PNG bytes of the curve; the y axis spans log10 of the smallest to largest loss, with grey
/// gridlines at each power of ten.
pub fn loss_curve_png(losses: &[f32]) -> Result<Vec<u8>> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let finite: Vec<f32> = losses
        .iter()
        .copied()
        .filter(|l| l.is_finite() && *l > 0.0)
        .collect();
    if finite.len() >= 2 {
        let lo = finite
            .iter()
            .fold(f32::MAX, |a, &b| a.min(b))
            .log10()
            .floor();
        let hi = finite
            .iter()
            .fold(f32::MIN, |a, &b| a.max(b))
            .log10()
            .ceil()
            .max(lo + 1.0);
        let px =
            |i: usize| PAD as f32 + i as f32 / (finite.len() - 1) as f32 * (W - 2 * PAD) as f32;
        let py = |l: f32| (H - PAD) as f32 - (l.log10() - lo) / (hi - lo) * (H - 2 * PAD) as f32;
        let mut decade = lo;
        while decade <= hi {
            let y = py(10f32.powf(decade));
            line(
                &mut img,
                (PAD as f32, y),
                ((W - PAD) as f32, y),
                Rgb([220, 220, 220]),
            );
            decade += 1.0;
        }
        for i in 1..finite.len() {
            line(
                &mut img,
                (px(i - 1), py(finite[i - 1])),
                (px(i), py(finite[i])),
                Rgb([170, 200, 240]),
            );
        }
        let mut avg = finite[0];
        let mut prev = (px(0), py(avg));
        for (i, &l) in finite.iter().enumerate().skip(1) {
            avg = 0.98 * avg + 0.02 * l;
            let p = (px(i), py(avg));
            line(&mut img, prev, p, Rgb([20, 60, 160]));
            prev = p;
        }
    }
    line(
        &mut img,
        (PAD as f32, PAD as f32),
        (PAD as f32, (H - PAD) as f32),
        Rgb([0, 0, 0]),
    );
    line(
        &mut img,
        (PAD as f32, (H - PAD) as f32),
        ((W - PAD) as f32, (H - PAD) as f32),
        Rgb([0, 0, 0]),
    );
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}
