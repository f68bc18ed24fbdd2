//! The detector GenEval uses: load a checkpoint in either naming, run images through mmdet's test
//! pipeline, the network and mmdet's instance post-processing.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::model::{infer_config, Mask2Former};
use crate::postprocess::{instances, prepare, Mask};
use crate::weights::Weights;
use crate::{CheckpointNaming, Mask2FormerConfig, Result};

/// The names of COCO's 80 thing classes in the detector's output order, as GenEval names them
/// (its prompts say "computer mouse", "tv remote", "computer keyboard" where COCO says mouse,
/// remote, keyboard): the scoring matches a prompt's objects to these names.
pub const COCO_CLASSES: [&str; 80] = l2s_eval::prompts::COCO_CLASSES;

#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    /// Class index in the model's output.
    pub label: usize,
    pub class_name: String,
    /// mmdet's instance score in [0, 1].
    pub score: f32,
    /// [x1, y1, x2, y2] in pixels of the input image (x2, y2 exclusive).
    pub bbox: [f32; 4],
    /// The decoder query that produced it.
    pub query: usize,
    /// The binary mask at the image size, when [`InstanceDetector::keep_masks`] is set.
    pub mask: Option<Mask>,
}

pub struct InstanceDetector {
    model: Mask2Former,
    device: Device,
    class_names: Vec<String>,
    naming: CheckpointNaming,
    /// Also return each detection's mask (GenEval's colour task crops with it).
    pub keep_masks: bool,
}

impl InstanceDetector {
    /// Loads a checkpoint on the CPU; see [`InstanceDetector::load_on`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_on(path, &Device::Cpu)
    }

    /// Loads mmdet's `.pth`, or transformers' `model.safetensors` / `pytorch_model.bin`, telling
    /// the naming from the tensor names and the architecture from their shapes. A transformers
    /// `config.json` beside the weights supplies the head count and class names.
    pub fn load_on(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let w = Weights::open(path, device)?;
        let mut cfg = infer_config(&w)?;
        let mut names = None;
        if w.naming() == CheckpointNaming::HuggingFace {
            if let Some(hf) = path.parent().map(|d| d.join("config.json")) {
                if let Ok(text) = std::fs::read_to_string(&hf) {
                    apply_hf_config(&text, &mut cfg, &mut names);
                }
            }
        }
        Self::from_weights(&w, &cfg, names)
    }

    /// Builds from loaded weights and an explicit configuration; `class_names` defaults to
    /// COCO's for 80 classes and `class{i}` otherwise.
    pub fn from_weights(
        w: &Weights,
        cfg: &Mask2FormerConfig,
        class_names: Option<Vec<String>>,
    ) -> Result<Self> {
        let model = Mask2Former::load(w, cfg)?;
        let class_names = match class_names {
            Some(n) if n.len() == cfg.num_classes => n,
            _ if cfg.num_classes == COCO_CLASSES.len() => {
                COCO_CLASSES.iter().map(|s| s.to_string()).collect()
            }
            _ => (0..cfg.num_classes).map(|i| format!("class{i}")).collect(),
        };
        Ok(Self {
            model,
            device: w.device().clone(),
            class_names,
            naming: w.naming(),
            keep_masks: false,
        })
    }

    pub fn model(&self) -> &Mask2Former {
        &self.model
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn naming(&self) -> CheckpointNaming {
        self.naming
    }

    /// Instances in one image, highest score first (at most 100, unthresholded, as mmdet
    /// returns them; GenEval applies its own thresholds).
    pub fn detect(&self, image: &image::RgbImage) -> Result<Vec<Instance>> {
        Ok(self
            .detect_batch(std::slice::from_ref(image))?
            .pop()
            .unwrap_or_default())
    }

    /// Several images; those of one padded size share a forward pass. Each image gets the
    /// results it would get alone (no padding to a common size).
    pub fn detect_batch(&self, images: &[image::RgbImage]) -> Result<Vec<Vec<Instance>>> {
        self.detect_batch_with(images, self.keep_masks)
    }

    /// [`InstanceDetector::detect_batch`], with or without each instance's mask.
    pub fn detect_batch_with(
        &self,
        images: &[image::RgbImage],
        keep_masks: bool,
    ) -> Result<Vec<Vec<Instance>>> {
        let prepared = images
            .iter()
            .map(|im| prepare(im, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let mut results: Vec<Option<Vec<Instance>>> = vec![None; images.len()];
        let mut groups: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
        for (i, p) in prepared.iter().enumerate() {
            let dims = p.pixels.dims().to_vec();
            match groups.iter_mut().find(|(d, _)| *d == dims) {
                Some((_, members)) => members.push(i),
                None => groups.push((dims, vec![i])),
            }
        }
        for (dims, members) in groups {
            let batch = Tensor::stack(
                &members
                    .iter()
                    .map(|&i| prepared[i].pixels.clone())
                    .collect::<Vec<_>>(),
                0,
            )?;
            let out = self.model.forward(&batch)?;
            let cls = out.class_logits.last().expect("rounds");
            let msk = out.mask_logits.last().expect("rounds");
            for (j, &i) in members.iter().enumerate() {
                let p = &prepared[i];
                let inst = instances(
                    &cls.get(j)?,
                    &msk.get(j)?,
                    (dims[1], dims[2]),
                    p.resized,
                    p.original,
                    keep_masks,
                )?;
                results[i] = Some(
                    inst.into_iter()
                        .map(|d| Instance {
                            label: d.label,
                            class_name: self.class_names[d.label].clone(),
                            score: d.score,
                            bbox: d.bbox,
                            query: d.query,
                            mask: d.mask,
                        })
                        .collect(),
                );
            }
        }
        Ok(results.into_iter().map(Option::unwrap_or_default).collect())
    }
}

/// Takes the head count and class names from a transformers `config.json`.
fn apply_hf_config(text: &str, cfg: &mut Mask2FormerConfig, names: &mut Option<Vec<String>>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    if v.get("model_type").and_then(|m| m.as_str()) != Some("mask2former") {
        return;
    }
    if let Some(h) = v.get("num_attention_heads").and_then(|h| h.as_u64()) {
        cfg.decoder_heads = h as usize;
        cfg.encoder_heads = h as usize;
    }
    if let Some(map) = v.get("id2label").and_then(|m| m.as_object()) {
        let mut list = vec![None; map.len()];
        for (k, name) in map {
            if let (Ok(i), Some(n)) = (k.parse::<usize>(), name.as_str()) {
                if i < list.len() {
                    list[i] = Some(n.to_string());
                }
            }
        }
        if list.iter().all(Option::is_some) {
            *names = Some(list.into_iter().flatten().collect());
        }
    }
}

/// The detector the scoring and the data builder's relation check use: GenEval's selection
/// (thresholds, best box per class) is applied by the caller on these unthresholded instances.
impl l2s_eval::Detector for InstanceDetector {
    fn detect(
        &self,
        image: &image::RgbImage,
    ) -> std::result::Result<Vec<l2s_eval::Detection>, l2s_eval::DetectError> {
        let found = self
            .detect_batch_with(std::slice::from_ref(image), false)
            .map_err(l2s_eval::DetectError::new)?;
        Ok(found
            .into_iter()
            .flatten()
            .map(|d| segment(d, None).detection)
            .collect())
    }

    fn classes(&self) -> &[String] {
        &self.class_names
    }

    /// One forward pass per padded size; when the batch fails, each image is retried alone so
    /// that only the image at fault fails.
    fn detect_batch(
        &self,
        images: &[image::RgbImage],
        masks_above: Option<f32>,
    ) -> Vec<std::result::Result<Vec<l2s_eval::Segment>, l2s_eval::DetectError>> {
        let convert = |found: Vec<Instance>| -> Vec<l2s_eval::Segment> {
            found.into_iter().map(|d| segment(d, masks_above)).collect()
        };
        match self.detect_batch_with(images, masks_above.is_some()) {
            Ok(all) => all.into_iter().map(|f| Ok(convert(f))).collect(),
            Err(_) if images.len() > 1 => images
                .iter()
                .map(|im| {
                    self.detect_batch_with(std::slice::from_ref(im), masks_above.is_some())
                        .map(|mut f| convert(f.pop().unwrap_or_default()))
                        .map_err(l2s_eval::DetectError::new)
                })
                .collect(),
            Err(e) => vec![Err(l2s_eval::DetectError::new(e))],
        }
    }
}

/// An instance as the scoring sees it; its mask is kept when it scores above `masks_above`.
fn segment(d: Instance, masks_above: Option<f32>) -> l2s_eval::Segment {
    let keep = masks_above.is_some_and(|t| d.score > t);
    l2s_eval::Segment {
        detection: l2s_eval::Detection {
            class: d.class_name,
            bbox: l2s_eval::BBox::new(d.bbox[0], d.bbox[1], d.bbox[2], d.bbox[3]),
            score: d.score,
        },
        mask: d.mask.filter(|_| keep).map(|m| l2s_eval::ObjectMask {
            width: m.width as u32,
            height: m.height as u32,
            data: m.data,
        }),
    }
}
