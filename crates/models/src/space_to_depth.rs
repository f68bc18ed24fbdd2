//! An exactly invertible "autoencoder" for small pixel-space models: each f×f patch of pixels
//! becomes f·f·C channels of one latent cell (PyTorch's `pixel_unshuffle`). Nothing is learned and
//! nothing is lost, so a model trained on it sees exact pixels at 1/f the spatial size.
//!
//! `vae/config.json`: `{"_class_name": "SpaceToDepthAutoencoder", "factor": 2, "in_channels": 3,
//! "scaling_factor": 1.0}` — no weight file.

use std::path::Path;

use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::config::{parse_config, read_text};
use crate::error::{ModelError, Result as ModelResult};

fn d_factor() -> usize {
    2
}
fn d_channels() -> usize {
    3
}
fn d_scale() -> f64 {
    1.0
}

#[derive(Clone, Debug, Deserialize)]
pub struct SpaceToDepthConfig {
    #[serde(default = "d_factor")]
    pub factor: usize,
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
}

impl SpaceToDepthConfig {
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        Self::from_json(&read_text(path)?, path)
    }

    /// Parses and checks the config's text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> ModelResult<Self> {
        let cfg: Self = parse_config(text, path, "a SpaceToDepthAutoencoder config")?;
        if cfg.factor == 0 || cfg.in_channels == 0 || cfg.scaling_factor == 0.0 {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: "factor/in_channels/scaling_factor".into(),
                value: format!("{}/{}/{}", cfg.factor, cfg.in_channels, cfg.scaling_factor),
                supported: "positive values".into(),
            });
        }
        Ok(cfg)
    }
}

#[derive(Clone, Debug)]
pub struct SpaceToDepth {
    config: SpaceToDepthConfig,
}

impl SpaceToDepth {
    pub fn new(config: SpaceToDepthConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &SpaceToDepthConfig {
        &self.config
    }

    pub fn latent_channels(&self) -> usize {
        self.config.in_channels * self.config.factor * self.config.factor
    }

    /// (B, C, H, W) in [-1, 1] → (B, C·f·f, H/f, W/f) · scaling_factor.
    pub fn encode_latents(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        let f = self.config.factor;
        if c != self.config.in_channels || h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "space-to-depth encode: image of {c} channels, {h}×{w}; expected {} channels and sides that are multiples of {f}",
                self.config.in_channels
            );
        }
        let z = images
            .reshape((b, c, h / f, f, w / f, f))?
            .permute((0, 1, 3, 5, 2, 4))?
            .reshape((b, c * f * f, h / f, w / f))?;
        z * self.config.scaling_factor
    }

    /// Inverse of [`Self::encode_latents`].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, cl, h, w) = latents.dims4()?;
        let f = self.config.factor;
        if cl != self.latent_channels() {
            candle_core::bail!(
                "space-to-depth decode: {cl} latent channels, expected {}",
                self.latent_channels()
            );
        }
        let c = cl / (f * f);
        let z = (latents / self.config.scaling_factor)?;
        z.reshape((b, c, f, f, h, w))?
            .permute((0, 1, 4, 2, 5, 3))?
            .reshape((b, c, h * f, w * f))
    }
}
