//! The shapes-world text-to-image model: a Stable-Diffusion-architecture model small enough to
//! train on a CPU, its trainer, and the folder format it is saved in.

pub mod architecture;
pub mod embedded;
pub mod error;

pub mod folder;
pub mod optim;
pub mod plot;
pub mod train;

pub use error::ShapesModelError;
pub use train::{Batch, TrainOptions, TrainProgress, TrainSummary, Trainer};
