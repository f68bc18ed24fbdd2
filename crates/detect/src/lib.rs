//! GenEval's object detector on candle: Mask2Former (masked-attention mask transformer) with a
//! Swin backbone, loading Hugging Face `Mask2FormerForUniversalSegmentation` or mmdet 2.x
//! `Mask2Former` checkpoints into one set of modules, followed by mmdet's instance-segmentation
//! post-processing.
//!
//! ```no_run
//! # fn main() -> l2s_detect::Result<()> {
//! // mmdet's mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco .pth, or transformers'
//! // model.safetensors / pytorch_model.bin: the naming is read from the tensor names and the
//! // architecture from their shapes.
//! let detector = l2s_detect::InstanceDetector::load("mask2former_swin-s.pth")?;
//! let image = image::RgbImage::new(512, 512);
//! for d in detector.detect(&image)? {
//!     println!("{} {:.3} {:?}", d.class_name, d.score, d.bbox);
//! }
//! # Ok(()) }
//! ```
//!
//! Modules: [`swin`] (backbone), [`deformable`] and [`pixel_decoder`], [`decoder`] (masked
//! attention and the class / mask heads), [`model`] (the whole network and reading the
//! architecture from a checkpoint), [`naming`] (our parameter paths → each checkpoint naming),
//! [`weights`] (files, shape checks, dry runs), [`postprocess`] (mmdet's test pipeline and
//! instance post-processing) and [`detector`]; [`colors`] is GenEval's CLIP colour classifier.

pub mod colors;
pub mod config;
pub mod decoder;
pub mod deformable;
pub mod detector;
pub mod error;
pub mod layers;
pub mod model;
pub mod naming;
pub mod pixel_decoder;
pub mod position;
pub mod postprocess;
pub mod swin;
pub mod weights;

pub use colors::{ClipColorClassifier, ColorClassifierError};
pub use config::{Mask2FormerConfig, SwinConfig};
pub use detector::{Instance, InstanceDetector, COCO_CLASSES};
pub use error::{Mask2FormerError, Result};
pub use model::{infer_config, Mask2Former, Mask2FormerOutput};
pub use naming::CheckpointNaming;
pub use weights::Weights;
