//! GenEval's object detector on candle: Mask2Former (masked-attention mask transformer) with a
//! Swin backbone, loading Hugging Face `Mask2FormerForUniversalSegmentation` or mmdet 2.x
//! `Mask2Former` checkpoints into one set of modules, followed by mmdet's instance-segmentation
//! post-processing.

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

pub use config::{Mask2FormerConfig, SwinConfig};
pub use detector::{Detection, Detector, COCO_CLASSES};
pub use error::{DetectError, Result};
pub use model::{infer_config, Mask2Former, Mask2FormerOutput};
pub use naming::Naming;
pub use weights::Weights;
