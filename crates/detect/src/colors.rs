//! GenEval's colour classifier: each object's mask pasted over a #999 grey image, cropped to
//! its box, put through open_clip's evaluation transform and compared by CLIP ViT-L/14 with
//! zero-shot colour embeddings ("a photo of a {colour} {class}", "a photo of a {colour}-colored
//! {class}", "a photo of a {colour} object": each normalised, averaged, normalised again).
//!
//! The image side is Pillow's arithmetic, restated: `Image.composite`, `crop` (box corners
//! rounded half to even, as Python's `round`), and `resize` with the bicubic filter in 8-bit
//! fixed point, then the centre crop torchvision takes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use image::RgbImage;
use l2s_eval::tasks::COLORS;
use l2s_eval::{BBox, ColorQuery, DetectError, ObjectMask};
use l2s_models::clip_vision::{ClipModel, ClipModelConfig};
use l2s_models::tokenizer::ClipTokenizer;
use l2s_models::weights::SafetensorsWeights;

/// GenEval's background behind the masked object.
pub const BACKGROUND: [u8; 3] = [0x99, 0x99, 0x99];

/// OpenAI CLIP's normalisation.
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// GenEval's colour prompt templates; `{c}` is the colour, `{class}` the object.
pub const TEMPLATES: [&str; 3] = [
    "a photo of a {c} {class}",
    "a photo of a {c}-colored {class}",
    "a photo of a {c} object",
];

#[derive(Debug, thiserror::Error)]
pub enum ColorClassifierError {
    #[error("CLIP model: {0}")]
    Model(#[from] l2s_models::ModelError),
    #[error("CLIP weights {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("colour classifier input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, ColorClassifierError>;

/// The object over the grey background, cropped to its box as Pillow crops: corners rounded
/// half to even, pixels outside the image black. Without a mask the whole box is kept.
pub fn masked_crop(image: &RgbImage, bbox: BBox, mask: Option<&ObjectMask>) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    if let Some(m) = mask {
        if (m.width, m.height) != (w, h) || m.data.len() != (w * h) as usize {
            return Err(ColorClassifierError::Input(format!(
                "mask {}x{} for a {w}x{h} image",
                m.width, m.height
            )));
        }
    }
    let [x0, y0, x1, y1] = bbox.xyxy().map(|v| (v as f64).round_ties_even());
    if !(x0.is_finite() && y0.is_finite() && x1 > x0 && y1 > y0) || x1 - x0 > 65_536.0 {
        return Err(ColorClassifierError::Input(format!(
            "box {:?} is empty or not finite",
            bbox.xyxy()
        )));
    }
    let (x0, y0) = (x0 as i64, y0 as i64);
    let (cw, ch) = ((x1 as i64 - x0) as u32, (y1 as i64 - y0) as u32);
    Ok(RgbImage::from_fn(cw, ch, |cx, cy| {
        let (x, y) = (x0 + cx as i64, y0 + cy as i64);
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            return image::Rgb([0, 0, 0]);
        }
        let (x, y) = (x as u32, y as u32);
        let inside = mask.is_none_or(|m| m.data[(y * w + x) as usize]);
        if inside {
            *image.get_pixel(x, y)
        } else {
            image::Rgb(BACKGROUND)
        }
    }))
}

/// Pillow's bicubic kernel (a = −0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Fixed-point bits of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input pixel and the integer weights, as Pillow computes them
/// for a resize of `in_size` to `out_size`.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's truncating casts of Pillow's rounding.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut k: Vec<f64> = (0..n)
                .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = k.iter().sum();
            if total != 0.0 {
                k.iter_mut().for_each(|v| *v /= total);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let fixed = k
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize(size, Image.BICUBIC)` of an RGB image, to the bit: a horizontal pass
/// into 8-bit rows, then a vertical pass (each only when that side changes).
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (src.width() as usize, src.height() as usize);
    let (nw, nh) = (width as usize, height as usize);
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut rows: Vec<u8> = src.as_raw().clone();
    let mut cur_w = w;
    if nw != w {
        let cx = coefficients(w, nw);
        let mut out = vec![0u8; nw * h * 3];
        for y in 0..h {
            for (xx, (xmin, k)) in cx.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = half;
                    for (i, &kv) in k.iter().enumerate() {
                        ss += rows[(y * cur_w + xmin + i) * 3 + c] as i64 * kv as i64;
                    }
                    out[(y * nw + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        rows = out;
        cur_w = nw;
    }
    if nh != h {
        let cy = coefficients(h, nh);
        let mut out = vec![0u8; cur_w * nh * 3];
        for (yy, (ymin, k)) in cy.iter().enumerate() {
            for x in 0..cur_w {
                for c in 0..3 {
                    let mut ss = half;
                    for (i, &kv) in k.iter().enumerate() {
                        ss += rows[((ymin + i) * cur_w + x) * 3 + c] as i64 * kv as i64;
                    }
                    out[(yy * cur_w + x) * 3 + c] = clip8(ss);
                }
            }
        }
        rows = out;
    }
    RgbImage::from_raw(cur_w as u32, rows.len() as u32 / (cur_w as u32 * 3), rows)
        .expect("sizes agree")
}

/// open_clip's evaluation transform up to the 8-bit pixels: the short side resized to `size`
/// (the long side `int(size * long / short)`), then the centre `size`×`size`.
pub fn clip_view(crop: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = crop.dimensions();
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as u64 * long as u64 / short as u64) as u32;
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    let resized = if (nw, nh) == (w, h) {
        crop.clone()
    } else {
        resize_bicubic(crop, nw, nh)
    };
    let top = ((nh as f64 - size as f64) / 2.0).round_ties_even() as u32;
    let left = ((nw as f64 - size as f64) / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(&resized, left, top, size, size).to_image()
}

/// The model input (3, size, size): /255, then OpenAI's mean and standard deviation.
pub fn normalised(view: &RgbImage) -> Vec<f32> {
    let (w, h) = view.dimensions();
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in view.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = (p.0[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// CLIP with GenEval's zero-shot colour prompts.
pub struct ClipColorClassifier {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    device: Device,
    /// Per class: (projection_dim, colours) normalised colour embeddings.
    prompts: Mutex<HashMap<String, Tensor>>,
}

impl ClipColorClassifier {
    /// Loads a transformers CLIPModel folder (`openai/clip-vit-large-patch14`): config.json,
    /// model.safetensors and the tokenizer files.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_files(
            &dir.join("config.json"),
            &dir.join("model.safetensors"),
            dir,
            device,
        )
    }

    pub fn from_files(
        config: &Path,
        weights: &Path,
        tokenizer_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let cfg = ClipModelConfig::from_file(config)?;
        let files = SafetensorsWeights::open(&[weights.to_path_buf()])?;
        if !files
            .shapes()
            .contains_key("vision_model.embeddings.class_embedding")
        {
            return Err(ColorClassifierError::Weights {
                path: weights.to_path_buf(),
                message: "no `vision_model.embeddings.class_embedding`: not a transformers CLIPModel checkpoint".into(),
            });
        }
        let vb = VarBuilder::from_backend(Box::new(files), DType::F32, device.clone());
        let model = ClipModel::new(&cfg, vb).map_err(|e| ColorClassifierError::Weights {
            path: weights.to_path_buf(),
            message: e.to_string(),
        })?;
        let tokenizer = ClipTokenizer::from_folder(tokenizer_dir)?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            prompts: Mutex::new(HashMap::new()),
        })
    }

    /// The image size the model takes.
    pub fn image_size(&self) -> u32 {
        self.model.vision.config().image_size as u32
    }

    /// Unit-length colour embeddings for `class`, one column per colour of [`COLORS`].
    fn colour_embeddings(&self, class: &str) -> Result<Tensor> {
        let mut cache = self.prompts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(class) {
            return Ok(t.clone());
        }
        let mut columns = Vec::with_capacity(COLORS.len());
        for c in COLORS {
            let mut ids = Vec::new();
            for t in TEMPLATES {
                let text = t.replace("{c}", c).replace("{class}", class);
                ids.extend(self.tokenizer.encode(&text)?.ids);
            }
            let ids = Tensor::from_vec(
                ids,
                (TEMPLATES.len(), self.tokenizer.max_len()),
                &self.device,
            )?;
            let e = unit(&self.model.text_features(&ids)?)?.mean(0)?;
            columns.push(unit(&e.unsqueeze(0)?)?.squeeze(0)?);
        }
        let t = Tensor::stack(&columns, 1)?;
        cache.insert(class.to_string(), t.clone());
        Ok(t)
    }

    /// 100 × the cosine of each object's view with each colour (rows: objects, columns:
    /// [`COLORS`]), as GenEval's classifier scores them.
    pub fn logits(
        &self,
        image: &RgbImage,
        class: &str,
        objects: &[ColorQuery<'_>],
    ) -> Result<Vec<Vec<f32>>> {
        if objects.is_empty() {
            return Ok(Vec::new());
        }
        let size = self.image_size();
        let mut pixels = Vec::with_capacity(objects.len() * 3 * (size * size) as usize);
        for o in objects {
            let crop = masked_crop(image, o.bbox, o.mask)?;
            pixels.extend(normalised(&clip_view(&crop, size)));
        }
        let s = size as usize;
        let x = Tensor::from_vec(pixels, (objects.len(), 3, s, s), &self.device)?;
        let f = unit(&self.model.image_features(&x)?)?;
        let logits = (f.matmul(&self.colour_embeddings(class)?)? * 100.0)?;
        Ok(logits.to_vec2::<f32>()?)
    }
}

/// Each row scaled to unit length.
fn unit(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

impl l2s_eval::ColorClassifier for ClipColorClassifier {
    fn colors(
        &self,
        image: &RgbImage,
        class: &str,
        objects: &[ColorQuery<'_>],
    ) -> std::result::Result<Vec<String>, DetectError> {
        let rows = self
            .logits(image, class, objects)
            .map_err(DetectError::new)?;
        Ok(rows
            .iter()
            .map(|r| {
                let best = r
                    .iter()
                    .enumerate()
                    .fold(0, |b, (i, v)| if *v > r[b] { i } else { b });
                COLORS[best].to_string()
            })
            .collect())
    }
}
