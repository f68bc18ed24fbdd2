//! Checkpoint files → tensors looked up by our parameter paths.
//!
//! [`Weights`] holds every tensor of a file by its checkpoint name, with the file's [`CheckpointNaming`];
//! [`Weights::get`] translates one of our paths, assembles the tensor and checks its shape.
//! [`Weights::recorder`] answers every request with zeros and remembers what was asked, which
//! lists the exact names and shapes a configuration loads without any file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::naming::{translate, unfold_permutation, CheckpointNaming, Reorder};
use crate::{Mask2FormerError, Result};

/// A checkpoint name and the shape asked for it.
pub type Request = (String, Vec<usize>);

pub struct Weights {
    path: PathBuf,
    naming: CheckpointNaming,
    device: Device,
    tensors: HashMap<String, Tensor>,
    record: Option<Mutex<Vec<Request>>>,
}

impl Weights {
    /// Opens a safetensors file, or a `torch.save` archive (mmdet's `.pth` with a `state_dict`
    /// entry, or a bare state dict like `pytorch_model.bin`), and detects its naming.
    pub fn open(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut head = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(&path).map_err(|e| Mask2FormerError::Io {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let n = f.read(&mut head).map_err(|e| Mask2FormerError::Io {
                path: path.clone(),
                message: e.to_string(),
            })?;
            if n < 4 {
                return Err(Mask2FormerError::Format {
                    path,
                    message: format!("only {n} bytes; expected a safetensors or torch.save file"),
                });
            }
        }
        let tensors = if &head == b"PK\x03\x04" {
            read_torch(&path)?
        } else {
            read_safetensors(&path)?
        };
        let naming = CheckpointNaming::detect(tensors.keys().map(|k| k.as_str())).ok_or_else(|| {
            let mut some: Vec<&str> = tensors.keys().map(|k| k.as_str()).collect();
            some.sort();
            some.truncate(5);
            Mask2FormerError::UnknownNaming {
                path: path.clone(),
                message: format!(
                    "{} tensors, none under `model.pixel_level_module.` (Hugging Face) or `panoptic_head.`/`backbone.stages.` (mmdet); first names: {some:?}",
                    tensors.len()
                ),
            }
        })?;
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(device)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            path,
            naming,
            device: device.clone(),
            tensors,
            record: None,
        })
    }

    /// Tensors given by name (tests, conversions).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        naming: CheckpointNaming,
        label: &str,
        device: &Device,
    ) -> Self {
        Self {
            path: PathBuf::from(label),
            naming,
            device: device.clone(),
            tensors,
            record: None,
        }
    }

    /// A store that answers every request with zeros and records the checkpoint names asked for.
    pub fn recorder(naming: CheckpointNaming, device: &Device) -> Self {
        Self {
            path: PathBuf::from("<dry run>"),
            naming,
            device: device.clone(),
            tensors: HashMap::new(),
            record: Some(Mutex::new(Vec::new())),
        }
    }

    /// The names and shapes requested so far (recorder only), in request order.
    pub fn requested(&self) -> Vec<Request> {
        self.record
            .as_ref()
            .map(|r| r.lock().map(|v| v.clone()).unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn naming(&self) -> CheckpointNaming {
        self.naming
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The shape of a checkpoint tensor, by our path (first part), if present.
    pub fn shape_of(&self, ours: &str) -> Option<Vec<usize>> {
        let src = translate(self.naming, ours)?;
        let part = src.parts.first()?;
        part.iter()
            .find_map(|n| self.tensors.get(n))
            .map(|t| t.dims().to_vec())
    }

    /// Whether a parameter is present (used to count blocks and layers).
    pub fn has(&self, ours: &str) -> bool {
        self.shape_of(ours).is_some()
    }

    /// An integer buffer the checkpoint may store (index tables we recompute), with its name.
    pub fn get_index(&self, ours: &str) -> Result<Option<(String, Vec<i64>)>> {
        let Some(src) = translate(self.naming, ours) else {
            return Ok(None);
        };
        let Some(part) = src.parts.first() else {
            return Ok(None);
        };
        let Some((name, t)) = part
            .iter()
            .find_map(|n| self.tensors.get(n).map(|t| (n, t)))
        else {
            return Ok(None);
        };
        let v = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        Ok(Some((name.clone(), v)))
    }

    /// Our parameter `ours`, of shape `shape`, as f32.
    pub fn get(&self, ours: &str, shape: &[usize]) -> Result<Tensor> {
        let src = translate(self.naming, ours).ok_or_else(|| {
            Mask2FormerError::Config(format!(
                "no {} name for parameter {ours}",
                self.naming.label()
            ))
        })?;
        let nparts = src.parts.len();
        if shape.is_empty() || !shape[0].is_multiple_of(nparts) {
            return Err(Mask2FormerError::Config(format!(
                "parameter {ours}: shape {shape:?} cannot be split into {nparts} parts"
            )));
        }
        let mut part_shape = shape.to_vec();
        part_shape[0] /= nparts;
        let mut pieces = Vec::with_capacity(nparts);
        for names in &src.parts {
            if let Some(rec) = &self.record {
                if let Ok(mut r) = rec.lock() {
                    r.push((names[0].clone(), part_shape.clone()));
                }
                pieces.push(Tensor::zeros(
                    part_shape.as_slice(),
                    DType::F32,
                    &self.device,
                )?);
                continue;
            }
            let Some((name, t)) = names
                .iter()
                .find_map(|n| self.tensors.get(n).map(|t| (n, t)))
            else {
                return Err(Mask2FormerError::MissingTensor {
                    path: self.path.clone(),
                    name: names[0].clone(),
                    naming: self.naming.label(),
                    expected: part_shape,
                });
            };
            if t.dims() != part_shape.as_slice() {
                return Err(Mask2FormerError::ShapeMismatch {
                    path: self.path.clone(),
                    name: name.clone(),
                    expected: part_shape,
                    found: t.dims().to_vec(),
                });
            }
            pieces.push(t.to_dtype(DType::F32)?);
        }
        let t = if pieces.len() == 1 {
            pieces.pop().expect("one piece")
        } else {
            Tensor::cat(&pieces, 0)?
        };
        match src.reorder {
            Reorder::None => Ok(t),
            Reorder::UnfoldToConcat { axis } => {
                let n = t.dim(axis)?;
                if !n.is_multiple_of(4) {
                    return Err(Mask2FormerError::Config(format!(
                        "parameter {ours}: axis {axis} of length {n} is not 4·C"
                    )));
                }
                let perm = Tensor::new(unfold_permutation(n), &self.device)?;
                Ok(t.index_select(&perm, axis)?)
            }
        }
    }
}

fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Mask2FormerError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Mask2FormerError::Format {
            path: path.to_path_buf(),
            message: format!(
                "not a readable safetensors file ({e}); expected safetensors or torch.save"
            ),
        })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::I64 => DType::I64,
            // Integer buffers (index tables) are never loaded; skip what candle cannot hold.
            _ => continue,
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu).map_err(
            |e| Mask2FormerError::Format {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            },
        )?;
        out.insert(name, t);
    }
    Ok(out)
}

fn read_torch(path: &Path) -> Result<HashMap<String, Tensor>> {
    let fmt = |e: l2s_torch_pickle::Error| Mask2FormerError::Format {
        path: path.to_path_buf(),
        message: e.kind.to_string(),
    };
    let mut file = l2s_torch_pickle::TorchFile::open(path).map_err(fmt)?;
    let root = file.root().clone();
    // mmdet keeps the weights under `state_dict` next to `meta`; transformers' .bin is the dict.
    let sd = match root.get("state_dict") {
        Some(sd) => sd.clone(),
        None if root.is_state_dict() => root,
        None => return Err(Mask2FormerError::Format {
            path: path.to_path_buf(),
            message:
                "a torch.save file with neither a `state_dict` entry nor a state dict at its root"
                    .into(),
        }),
    };
    let list = file.state_dict(&sd, &Device::Cpu).map_err(fmt)?;
    Ok(list.into_iter().collect())
}
