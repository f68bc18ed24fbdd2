//! Decoding images at the model's size, with the transform that maps boxes onto them.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use l2s_eval::BBox;
use serde::Serialize;

use crate::{Frame, SourceImage};

/// How an image becomes a `size`×`size` square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    /// The centred square of side min(width, height), resized to the size: the published
    /// Stable Diffusion pipeline's rule. Its crop box is `((w − m)/2, (h − m)/2, (w + m)/2,
    /// (h + m)/2)` with each edge rounded half to even, as PIL's `Image.crop` rounds, so a
    /// crop of an odd-sized image can be a pixel wider than high; it is resized to the square
    /// all the same.
    CenterCrop,
    /// The whole image resized to the square, aspect ratio not kept: the published FLUX
    /// pipeline's rule.
    Resize,
}

/// An image that could not be loaded; the caller lists it and goes on.
#[derive(Debug, thiserror::Error)]
pub enum ImageLoadError {
    #[error("cannot open image {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode image {}: {source}", path.display())]
    Decode {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("image {} is empty ({width}x{height})", path.display())]
    Empty {
        path: PathBuf,
        width: u32,
        height: u32,
    },
}

impl ImageLoadError {
    pub fn path(&self) -> &Path {
        match self {
            Self::Open { path, .. } | Self::Decode { path, .. } | Self::Empty { path, .. } => path,
        }
    }

    /// True when the file does not exist.
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Maps boxes of the source image (in the frame it was loaded in) onto the loaded square:
/// `x' = (x − crop_x0) · scale_x`, `y' = (y − crop_y0) · scale_y`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BoxTransform {
    /// The image's size before fitting, in the frame it was loaded in (EXIF orientation
    /// applied for [`Frame::Displayed`]).
    pub source_size: (u32, u32),
    /// The part of the source kept, xyxy in source pixels.
    pub crop: [u32; 4],
    pub scale_x: f32,
    pub scale_y: f32,
    /// Side of the loaded square.
    pub size: u32,
}

/// A box on the loaded image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MappedBox {
    /// Clipped to the image.
    pub bbox: BBox,
    /// Share of the mapped box's area inside the image (1 when wholly inside; a box of no
    /// area counts 1 inside the image and 0 outside).
    pub visible: f32,
}

impl BoxTransform {
    fn new(source_size: (u32, u32), crop: [u32; 4], size: u32) -> Self {
        Self {
            source_size,
            crop,
            scale_x: size as f32 / (crop[2] - crop[0]) as f32,
            scale_y: size as f32 / (crop[3] - crop[1]) as f32,
            size,
        }
    }

    /// The transform `fit` gives an image of `width`×`height`.
    pub fn for_fit(width: u32, height: u32, size: u32, fit: Fit) -> Self {
        let crop = match fit {
            Fit::Resize => [0, 0, width, height],
            Fit::CenterCrop => {
                let m = width.min(height);
                // Edges at (w ∓ m) / 2, (h ∓ m) / 2 in half pixels, rounded half to even.
                let edge = |twice: u32| round_half_even_of_half(twice);
                [
                    edge(width - m),
                    edge(height - m),
                    edge(width + m),
                    edge(height + m),
                ]
            }
        };
        Self::new((width, height), crop, size)
    }

    /// A box's place on the loaded image, before clipping.
    pub fn map_unclipped(&self, b: &BBox) -> BBox {
        let (x0, y0) = (self.crop[0] as f32, self.crop[1] as f32);
        BBox::new(
            (b.x0 - x0) * self.scale_x,
            (b.y0 - y0) * self.scale_y,
            (b.x1 - x0) * self.scale_x,
            (b.y1 - y0) * self.scale_y,
        )
    }

    /// A box on the loaded image, clipped to it, with the share of it that stayed inside.
    pub fn map_box(&self, b: &BBox) -> MappedBox {
        let m = self.map_unclipped(b);
        let s = self.size as f32;
        let (lx, hx) = (m.x0.min(m.x1), m.x0.max(m.x1));
        let (ly, hy) = (m.y0.min(m.y1), m.y0.max(m.y1));
        let clipped = BBox::new(
            lx.clamp(0.0, s),
            ly.clamp(0.0, s),
            hx.clamp(0.0, s),
            hy.clamp(0.0, s),
        );
        let area = m.area();
        let visible = if area > 0.0 {
            clipped.area() / area
        } else {
            let inside = |v: f32| (0.0..=s).contains(&v);
            if inside(lx) && inside(hx) && inside(ly) && inside(hy) {
                1.0
            } else {
                0.0
            }
        };
        MappedBox {
            bbox: clipped,
            visible,
        }
    }
}

/// `round(twice / 2)` with halves to even (Python's `round`).
fn round_half_even_of_half(twice: u32) -> u32 {
    let (q, r) = (twice / 2, twice % 2);
    if r == 0 || q % 2 == 0 {
        q
    } else {
        q + 1
    }
}

/// A decoded image at the model's size, and how the source's boxes map onto it.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    pub image: RgbImage,
    pub transform: BoxTransform,
    /// The pixel size as stored in the file (before any EXIF orientation).
    pub stored_size: (u32, u32),
}

/// Loads an image as a viewer shows it (EXIF orientation applied), as RGB, fitted to a
/// `size`×`size` square; see [`load_image_in`].
pub fn load_image(
    path: impl AsRef<Path>,
    size: u32,
    fit: Fit,
) -> Result<LoadedImage, ImageLoadError> {
    load_image_in(path, size, fit, Frame::Displayed)
}

/// Loads a record's image in the record's frame.
pub fn load_source_image(
    record: &SourceImage,
    size: u32,
    fit: Fit,
) -> Result<LoadedImage, ImageLoadError> {
    load_image_in(&record.path, size, fit, record.frame)
}

/// What a record's image file gives without decoding its pixels: enough to map its boxes
/// and to check its size against the annotation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageProbe {
    /// From the image (in its frame) to the model's square.
    pub transform: BoxTransform,
    /// Width and height as stored in the file (before EXIF orientation).
    pub stored_size: (u32, u32),
}

/// Reads a record's image header (size and EXIF orientation) without decoding the pixels:
/// the same transform [`load_source_image`] will give, at the cost of a few kilobytes read.
/// A file whose header reads but whose pixels do not is only found when it is loaded.
pub fn probe_source_image(
    record: &SourceImage,
    size: u32,
    fit: Fit,
) -> Result<ImageProbe, ImageLoadError> {
    let path = &record.path;
    let mut decoder = open_decoder(path)?;
    let (w, h) = decoder.dimensions();
    let orientation = decoder
        .orientation()
        .map_err(|source| ImageLoadError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    check_not_empty(path, (w, h))?;
    let quarter_turn = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let (fw, fh) = if record.frame == Frame::Displayed && quarter_turn {
        (h, w)
    } else {
        (w, h)
    };
    Ok(ImageProbe {
        transform: BoxTransform::for_fit(fw, fh, size, fit),
        stored_size: (w, h),
    })
}

/// The decoder of an image file, its format read from its first bytes.
fn open_decoder(path: &Path) -> Result<impl ImageDecoder, ImageLoadError> {
    let file = File::open(path).map_err(|source| ImageLoadError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    ImageReader::new(BufReader::new(file))
        .with_guessed_format()
        .map_err(|source| ImageLoadError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .into_decoder()
        .map_err(|source| ImageLoadError::Decode {
            path: path.to_path_buf(),
            source,
        })
}

fn check_not_empty(path: &Path, (width, height): (u32, u32)) -> Result<(), ImageLoadError> {
    if width == 0 || height == 0 {
        return Err(ImageLoadError::Empty {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    Ok(())
}

/// Loads an image (JPEG or PNG, the format read from its first bytes) in `frame`, converts
/// it to 8-bit RGB (grey is repeated, CMYK converted by the JPEG decoder, alpha dropped
/// without blending, as PIL's `convert("RGB")` does) and fits it to `size`×`size` with `fit`,
/// resampling with Catmull-Rom (the bicubic filter PIL resizes with by default).
pub fn load_image_in(
    path: impl AsRef<Path>,
    size: u32,
    fit: Fit,
    frame: Frame,
) -> Result<LoadedImage, ImageLoadError> {
    let path = path.as_ref();
    let decode_err = |source| ImageLoadError::Decode {
        path: path.to_path_buf(),
        source,
    };
    let mut decoder = open_decoder(path)?;
    let orientation = decoder.orientation().map_err(decode_err)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    let stored_size = (img.width(), img.height());
    check_not_empty(path, stored_size)?;
    if frame == Frame::Displayed {
        img.apply_orientation(orientation);
    }
    let rgb = img.into_rgb8();
    let transform = BoxTransform::for_fit(rgb.width(), rgb.height(), size, fit);
    let [x0, y0, x1, y1] = transform.crop;
    let cropped = if [x0, y0, x1, y1] == [0, 0, rgb.width(), rgb.height()] {
        rgb
    } else {
        image::imageops::crop_imm(&rgb, x0, y0, x1 - x0, y1 - y0).to_image()
    };
    let image = if cropped.dimensions() == (size, size) {
        cropped
    } else {
        image::imageops::resize(&cropped, size, size, FilterType::CatmullRom)
    };
    Ok(LoadedImage {
        image,
        transform,
        stored_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_crop_rounds_like_pil() {
        // 640×480: m = 480, edges (80, 0, 560, 480).
        let t = BoxTransform::for_fit(640, 480, 512, Fit::CenterCrop);
        assert_eq!(t.crop, [80, 0, 560, 480]);
        assert!((t.scale_x - 512.0 / 480.0).abs() < 1e-6);
        // 641×480: 80.5 → 80 and 560.5 → 560 (halves to even).
        assert_eq!(
            BoxTransform::for_fit(641, 480, 512, Fit::CenterCrop).crop,
            [80, 0, 560, 480]
        );
        // 643×480: 81.5 → 82, 561.5 → 562.
        assert_eq!(
            BoxTransform::for_fit(643, 480, 512, Fit::CenterCrop).crop,
            [82, 0, 562, 480]
        );
        // 482×481: m = 481; 0.5 → 0 and 481.5 → 482: a 482-wide, 481-high crop.
        assert_eq!(
            BoxTransform::for_fit(482, 481, 512, Fit::CenterCrop).crop,
            [0, 0, 482, 481]
        );
        // Portrait 300×500: (0, 100, 300, 400).
        assert_eq!(
            BoxTransform::for_fit(300, 500, 256, Fit::CenterCrop).crop,
            [0, 100, 300, 400]
        );
        assert_eq!(
            BoxTransform::for_fit(300, 500, 256, Fit::Resize).crop,
            [0, 0, 300, 500]
        );
    }

    #[test]
    fn boxes_follow_the_crop_and_are_clipped() {
        // 640×480 → 480 crop from x = 80, scale 512/480 = 16/15.
        let t = BoxTransform::for_fit(640, 480, 512, Fit::CenterCrop);
        // (110, 30)-(200, 120) → (30, 30)-(120, 120) · 16/15 = (32, 32)-(128, 128).
        let m = t.map_box(&BBox::new(110.0, 30.0, 200.0, 120.0));
        assert_eq!(m.visible, 1.0);
        for (got, want) in m.bbox.xyxy().iter().zip([32.0, 32.0, 128.0, 128.0]) {
            assert!((got - want).abs() < 1e-3, "{:?}", m.bbox);
        }
        // (40, 0)-(120, 60): x 40..120 → −40..40 · 16/15; half outside → visible 0.5.
        let m = t.map_box(&BBox::new(40.0, 0.0, 120.0, 60.0));
        assert!((m.visible - 0.5).abs() < 1e-6);
        assert_eq!(m.bbox.x0, 0.0);
        // Wholly in the cropped-away margin.
        let m = t.map_box(&BBox::new(0.0, 0.0, 60.0, 60.0));
        assert_eq!(m.visible, 0.0);
        // Resize: 640×480 → 256: x · 0.4, y · 0.5333.
        let t = BoxTransform::for_fit(640, 480, 256, Fit::Resize);
        let m = t.map_box(&BBox::new(100.0, 120.0, 200.0, 240.0));
        assert!((m.bbox.x0 - 40.0).abs() < 1e-4 && (m.bbox.y1 - 128.0).abs() < 1e-4);
    }
}
