//! Learn-to-Steer: read spatial relations from prompts, classify the relation between two
//! objects from a diffusion model's cross-attention maps, store the classifier's training data,
//! and train it.

pub mod annotated;
pub mod augment;
pub mod bench;
pub mod build;
pub mod classifier;
pub mod classify;
pub mod dataset;
pub mod error;
pub mod evaluate;
pub mod import;
pub mod losses;
pub mod maps;
pub mod method;
pub mod relations;
pub mod seeded;
pub mod steering;
pub mod train;
pub mod verified;
pub mod workers;

pub use augment::Augment;
pub use classifier::{ClassifierConfig, EncoderConfig, Preset, RelationClassifier};
pub use dataset::{
    merge, Dataset, DatasetError, DatasetInfo, DatasetWriter, Examples, LayerInfo, ManifestEntry,
    MergeSummary, SampleKind, SampleMeta, ShardSpec,
};
pub use error::SteerError;
pub use relations::{parse_override, parse_prompt, triplets_for, RelationParseError};
pub use train::{
    load_classifier, split_by_image, train, train_on, CheckpointError, CheckpointMeta, EpochReport,
    Evaluation, SplitFractions, TrainConfig, TrainError, TrainMetrics, TrainReport,
};
