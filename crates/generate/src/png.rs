//! PNG files with text metadata, written atomically.
//!
//! Each (key, value) pair becomes one text chunk placed before the image data: `tEXt` when the
//! value is plain ASCII, `iTXt` (UTF-8) otherwise; [`read_png_text`] reads them back. Files are
//! written with [`write_atomic`] (a synced temporary file in the target's folder, renamed into
//! place), so an interrupted run never leaves a partial file under the target name.

use std::path::Path;

use image::RgbImage;
pub use l2s_files::{read_png_text, write_atomic};

use crate::error::{GenerateError, Result};
use crate::generate::GenerateRequest;

/// Encodes `image` as an 8-bit RGB PNG with the given text chunks. Deterministic: the same image
/// and metadata give the same bytes.
pub fn encode_png(image: &RgbImage, metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, image.width(), image.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in metadata {
            check_keyword(key)?;
            if value.contains('\0') {
                // PNG text ends at a NUL: a reader would see a cut-short (different) value.
                return Err(GenerateError::invalid(
                    format!("PNG text chunk `{key}`"),
                    format!("{value:?} contains a NUL character, which PNG text cannot hold"),
                ));
            }
            let added = if value.is_ascii() {
                enc.add_text_chunk(key.clone(), value.clone())
            } else {
                enc.add_itxt_chunk(key.clone(), value.clone())
            };
            added.map_err(|e| {
                GenerateError::invalid(format!("PNG text chunk `{key}`"), e.to_string())
            })?;
        }
        let mut writer = enc
            .write_header()
            .map_err(|e| GenerateError::invalid("PNG header", e.to_string()))?;
        writer
            .write_image_data(image.as_raw())
            .map_err(|e| GenerateError::invalid("PNG image data", e.to_string()))?;
        writer
            .finish()
            .map_err(|e| GenerateError::invalid("PNG image data", e.to_string()))?;
    }
    Ok(out)
}

/// PNG keywords: 1–79 printable Latin-1 characters, no leading, trailing or double spaces.
fn check_keyword(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.chars().count() <= 79
        && key
            .chars()
            .all(|c| (' '..='~').contains(&c) || ('\u{a1}'..='\u{ff}').contains(&c))
        && !key.starts_with(' ')
        && !key.ends_with(' ')
        && !key.contains("  ");
    if ok {
        Ok(())
    } else {
        Err(GenerateError::invalid(
            "PNG metadata key",
            format!("{key:?}: expected 1–79 printable Latin-1 characters without leading, trailing or double spaces"),
        ))
    }
}

/// Writes `image` with its metadata to `path` atomically.
pub fn write_png(path: &Path, image: &RgbImage, metadata: &[(String, String)]) -> Result<()> {
    let bytes = encode_png(image, metadata)?;
    Ok(write_atomic(path, &bytes)?)
}

/// The metadata of a generated image: prompt, negative prompt, seed, steps, guidance, model,
/// size, sampler and software, then `extra` in order.
pub fn generation_metadata(
    req: &GenerateRequest,
    model: &str,
    sampler: &str,
    width: usize,
    height: usize,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut m: Vec<(String, String)> = vec![
        ("prompt".into(), req.prompt.clone()),
        ("negative_prompt".into(), req.negative_prompt.clone()),
        ("seed".into(), req.seed.to_string()),
        ("steps".into(), req.steps.to_string()),
        ("guidance".into(), req.guidance.to_string()),
        ("model".into(), model.to_string()),
        ("size".into(), format!("{width}x{height}")),
        ("sampler".into(), sampler.into()),
        (
            "Software".into(),
            concat!("learn-to-steer ", env!("CARGO_PKG_VERSION")).into(),
        ),
    ];
    m.extend(extra.iter().cloned());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        let meta = vec![
            (
                "prompt".to_string(),
                "a dog right of a teddy bear".to_string(),
            ),
            ("negative_prompt".to_string(), "café, 日本の猫".to_string()),
            ("empty".to_string(), String::new()),
        ];
        write_png(&path, &img, &meta).unwrap();
        let mut back = read_png_text(&path).unwrap();
        back.sort();
        let mut want = meta.clone();
        want.sort();
        assert_eq!(back, want);
        let decoded = image::open(&path).unwrap().to_rgb8();
        assert_eq!(decoded, img);
        // Only the target file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.png")]);
        assert_eq!(
            encode_png(&img, &meta).unwrap(),
            std::fs::read(&path).unwrap()
        );
    }

    #[test]
    fn bad_keyword_and_missing_folder_are_errors() {
        let img = RgbImage::new(2, 2);
        let err = encode_png(&img, &[(" bad".into(), "x".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\" bad\""), "{err}");
        let err = write_png(Path::new("/nonexistent-folder/x.png"), &img, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent-folder"), "{err}");
    }

    #[test]
    fn a_nul_in_a_text_value_is_refused() {
        let img = RgbImage::new(2, 2);
        let meta = vec![("prompt".to_string(), "a dog\0 left of a cat".to_string())];
        let e = encode_png(&img, &meta).unwrap_err().to_string();
        assert!(e.contains("`prompt`") && e.contains("NUL"), "{e}");
        let mut req = GenerateRequest::new("a dog\0");
        assert!(req.check_text().unwrap_err().to_string().contains("NUL"));
        req.prompt = "a dog".into();
        req.negative_prompt = "\0".into();
        assert!(req
            .check_text()
            .unwrap_err()
            .to_string()
            .contains("negative prompt"));
    }
}
