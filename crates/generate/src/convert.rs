//! Tensors ↔ 8-bit RGB images, the way diffusers converts them.
//!
//! Decoder output x ∈ [-1, 1] (batch, 3, H, W) → `(x / 2 + 0.5).clamp(0, 1)` in the tensor's own
//! dtype, then float32 (batch, H, W, 3) → `round(x · 255)` (ties to even, as numpy rounds) → u8.
//! The other way: `u8 / 255` in float32, then `2x − 1`.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::error::{GenerateError, Result};

/// Decoder output (batch, 3, H, W) in about [-1, 1] → (batch, H, W, 3) float32 in [0, 1]: the
/// array diffusers' pipelines return with `output_type="np"`.
pub fn to_unit_nhwc(decoded: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = decoded.dims4()?;
    if c != 3 {
        return Err(GenerateError::Shape {
            what: "decoded image".into(),
            found: format!("{:?}", decoded.dims()),
            expected: "(batch, 3, height, width)".into(),
        });
    }
    check_finite(decoded, "decoded image")?;
    let unit = decoded.affine(0.5, 0.5)?.clamp(0f32, 1f32)?;
    Ok(unit
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}

/// Fails when `t` holds NaN or ±Inf: quantising would silently turn them into black or white
/// pixels, and an image that looks like a result would be written.
pub fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad == 0 {
        return Ok(());
    }
    let nan = values.iter().filter(|v| v.is_nan()).count();
    Err(GenerateError::NonFinite {
        what: what.into(),
        count: bad,
        total: values.len(),
        nan,
    })
}

/// (batch, H, W, 3) float in [0, 1] → one 8-bit image per batch entry, `round(x · 255)`.
pub fn unit_nhwc_to_images(pixels: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, h, w, c) = pixels.dims4()?;
    if c != 3 {
        return Err(GenerateError::Shape {
            what: "image pixels".into(),
            found: format!("{:?}", pixels.dims()),
            expected: "(batch, height, width, 3)".into(),
        });
    }
    check_finite(pixels, "image pixels")?;
    let data = pixels
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * 3;
    (0..b)
        .map(|i| {
            let bytes: Vec<u8> = data[i * per..(i + 1) * per]
                .iter()
                .map(|&v| quantize(v))
                .collect();
            RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| {
                GenerateError::invalid("image buffer", "size does not match its dimensions")
            })
        })
        .collect()
}

/// One channel value in [0, 1] → u8, as `(x * 255).round().astype(uint8)` does in float32.
pub fn quantize(v: f32) -> u8 {
    let scaled = (v * 255.0).round_ties_even();
    if scaled.is_nan() {
        0
    } else {
        scaled.clamp(0.0, 255.0) as u8
    }
}

/// Decoder output (batch, 3, H, W) → 8-bit images.
pub fn decoded_to_images(decoded: &Tensor) -> Result<Vec<RgbImage>> {
    unit_nhwc_to_images(&to_unit_nhwc(decoded)?)
}

/// An 8-bit image → (1, 3, H, W) in [-1, 1], the VAE encoder's input.
pub fn image_to_tensor(image: &RgbImage, dtype: DType, device: &Device) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 255.0)
        .map(|x| 2.0 * x - 1.0)
        .collect();
    let t = Tensor::from_vec(data, (1, h, w, 3), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    Ok(t.to_dtype(dtype)?.to_device(device)?)
}

/// Peak signal-to-noise ratio of two 8-bit images of the same size, in dB (infinite when equal).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    if a.dimensions() != b.dimensions() {
        return Err(GenerateError::Shape {
            what: "PSNR of two images".into(),
            found: format!("{}×{}", b.width(), b.height()),
            expected: format!("{}×{} like the first", a.width(), a.height()),
        });
    }
    let n = a.as_raw().len().max(1) as f64;
    let sse: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum();
    let mse = sse / n;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_rounds_half_to_even_like_numpy() {
        assert_eq!(quantize(0.0), 0);
        assert_eq!(quantize(1.0), 255);
        assert_eq!(quantize(0.5), 128); // 127.5 → 128 (even)
        assert_eq!(quantize(2.5 / 255.0), 2);
        assert_eq!(quantize(-0.1), 0);
        assert_eq!(quantize(f32::NAN), 0);
    }

    #[test]
    fn image_round_trip() {
        let img = RgbImage::from_fn(4, 3, |x, y| {
            image::Rgb([(x * 60) as u8, (y * 80) as u8, 255])
        });
        let t = image_to_tensor(&img, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 3, 4]);
        let back = decoded_to_images(&t).unwrap();
        assert_eq!(back[0], img);
        assert!(psnr(&img, &back[0]).unwrap().is_infinite());
    }

    #[test]
    fn a_non_finite_image_is_never_quantised() {
        let mut v = vec![0f32; 3 * 4 * 4];
        v[5] = f32::NAN;
        v[7] = f32::INFINITY;
        let decoded = Tensor::from_vec(v, (1, 3, 4, 4), &Device::Cpu).unwrap();
        let e = decoded_to_images(&decoded).unwrap_err().to_string();
        assert!(
            e.contains("decoded image: 2 of 48 values are not finite (1 NaN, 1 ±Inf)")
                && e.contains("no image is written"),
            "{e}"
        );
        let pixels = Tensor::full(f32::NAN, (1, 4, 4, 3), &Device::Cpu).unwrap();
        let e = unit_nhwc_to_images(&pixels).unwrap_err().to_string();
        assert!(e.contains("image pixels: 48 of 48"), "{e}");
    }
}
