//! Bad checkpoints give errors that name the file, the tensor and the expected shape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use l2s_detect::{InstanceDetector, Mask2FormerError};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A file in a temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("l2s-detect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir.join(name))
}

fn load_err(path: &Path) -> (Mask2FormerError, String) {
    match InstanceDetector::load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            let msg = e.to_string();
            println!("{msg}");
            (e, msg)
        }
    }
}

fn hf_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(root().join("mask2former-tiny/hf.safetensors"), &Device::Cpu)
        .unwrap()
}

#[test]
fn another_models_weights_are_refused_by_naming() {
    let p = root().join("flux-dev-tiny/model/text_encoder/model.safetensors");
    let (e, msg) = load_err(&p);
    assert!(matches!(e, Mask2FormerError::UnknownNaming { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("panoptic_head"),
        "{msg}"
    );
}

#[test]
fn truncated_files_are_refused() {
    for (src, name) in [
        ("mask2former-tiny/hf.safetensors", "cut.safetensors"),
        ("mask2former-tiny/mmdet.pth", "cut.pth"),
    ] {
        let bytes = std::fs::read(root().join(src)).unwrap();
        let p = scratch(name);
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let (e, msg) = load_err(&p);
        assert!(matches!(e, Mask2FormerError::Format { .. }), "{msg}");
        assert!(msg.contains(name), "{msg}");
        let p = scratch(&format!("tiny-{name}"));
        std::fs::write(&p, &bytes[..3]).unwrap();
        let (_, msg) = load_err(&p);
        assert!(msg.contains("only 3 bytes"), "{msg}");
    }
}

#[test]
fn a_pickle_that_runs_code_is_refused() {
    let (e, msg) = load_err(&root().join("torch-pickle/malicious_exec.pth"));
    assert!(matches!(e, Mask2FormerError::Format { .. }), "{msg}");
    assert!(msg.contains("refusing"), "{msg}");
}

#[test]
fn a_missing_tensor_is_named_with_its_shape() {
    let mut t = hf_tensors();
    let gone = "model.transformer_module.decoder.layers.1.fc2.bias";
    t.remove(gone).unwrap();
    let p = scratch("missing.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let (e, msg) = load_err(&p);
    assert!(matches!(e, Mask2FormerError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains(gone) && msg.contains("[32]") && msg.contains("missing.safetensors"),
        "{msg}"
    );
}

#[test]
fn a_wrong_shape_is_named_with_both_shapes() {
    let mut t = hf_tensors();
    t.insert(
        "class_predictor.bias".into(),
        Tensor::zeros(7, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = scratch("shape.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let (e, msg) = load_err(&p);
    assert!(matches!(e, Mask2FormerError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("class_predictor.bias") && msg.contains("[7]") && msg.contains("[6]"),
        "{msg}"
    );
}

#[test]
fn an_mmdet_model_with_another_backbone_is_refused() {
    // mmdet's names, but no Swin patch embedding (a ResNet Mask2Former, say).
    let mut t = candle_core::safetensors::load(
        root().join("mask2former-tiny/hf.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    t.clear();
    t.insert(
        "panoptic_head.cls_embed.weight".into(),
        Tensor::zeros((81, 256), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        "backbone.conv1.weight".into(),
        Tensor::zeros((64, 3, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = scratch("resnet.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let (e, msg) = load_err(&p);
    assert!(matches!(e, Mask2FormerError::Format { .. }), "{msg}");
    assert!(
        msg.contains("backbone.patch_embed.projection.weight") && msg.contains("Swin"),
        "{msg}"
    );
}

#[test]
fn a_missing_file_is_an_io_error() {
    let (e, msg) = load_err(&root().join("mask2former-tiny/absent.pth"));
    assert!(matches!(e, Mask2FormerError::Io { .. }), "{msg}");
    assert!(msg.contains("absent.pth"), "{msg}");
}

#[test]
fn a_stored_index_table_that_disagrees_is_refused() {
    let path = root().join("mask2former-tiny/mmdet.pth");
    let mut f = l2s_torch_pickle::TorchFile::open(&path).unwrap();
    let sd = f.root().get("state_dict").unwrap().clone();
    let mut t: HashMap<String, Tensor> = f
        .state_dict(&sd, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let name = "backbone.stages.1.blocks.0.attn.w_msa.relative_position_index";
    // Transposed: the table of the opposite offsets.
    let flipped = t[name].t().unwrap().contiguous().unwrap();
    t.insert(name.into(), flipped);
    let p = scratch("index.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let (e, msg) = load_err(&p);
    assert!(matches!(e, Mask2FormerError::Format { .. }), "{msg}");
    assert!(msg.contains(name) && msg.contains("3×3"), "{msg}");
}
