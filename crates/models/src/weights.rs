//! Weight loading: safetensors files → a candle `VarBuilder` whose errors name the file and tensor.
//!
//! Model structs are built from a `VarBuilder`, so the same code loads frozen checkpoints
//! ([`SafetensorsWeights`]), trains from scratch (`VarBuilder::from_varmap`) or merely lists the
//! parameters a config expects ([`ParameterRecorder`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use safetensors::tensor::Dtype as StDtype;

use crate::error::{ModelError, Result};

/// The bytes of a safetensors file holding `tensors`, for an atomic writer to put in place.
///
/// candle's `safetensors::save` writes through a temporary file of the safetensors crate's own
/// (`.tmpXXXXXX` beside the target), which a process killed mid-write leaves behind under a name
/// that cannot be traced to its writer; serialising in memory leaves the writing to ours.
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> candle_core::Result<Vec<u8>> {
    Ok(safetensors::serialize(tensors, None)?)
}

/// Which files of a component folder hold its weights.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// Plain files if present, otherwise the `fp16` variant.
    #[default]
    Auto,
    /// Only `*.{name}.safetensors` files (e.g. `fp16`).
    Named(String),
}

/// Finds the safetensors files of a diffusers component folder (`unet/`, `vae/`, `text_encoder/`).
///
/// Handles single files (`diffusion_pytorch_model.safetensors`, `model.safetensors`), their variants
/// (`model.fp16.safetensors`) and sharded checkpoints with a `*.safetensors.index.json`.
pub fn component_files(dir: &Path, variant: &Variant) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let variant_of = |name: &str| -> Option<String> {
        // "model.fp16.safetensors" → Some("fp16"); "model.safetensors" → None;
        // shards "model-00001-of-00002.fp16.safetensors" likewise.
        let stem = name.strip_suffix(".safetensors")?;
        stem.rsplit_once('.').map(|(_, v)| v.to_string())
    };
    let pick = |want: Option<&str>| -> Vec<String> {
        names
            .iter()
            .filter(|n| n.ends_with(".safetensors"))
            .filter(|n| variant_of(n).as_deref() == want)
            .cloned()
            .collect()
    };
    let chosen = match variant {
        Variant::Auto => {
            let plain = pick(None);
            if plain.is_empty() {
                pick(Some("fp16"))
            } else {
                plain
            }
        }
        Variant::Named(v) => pick(Some(v)),
    };
    if chosen.is_empty() {
        let has_bin = names
            .iter()
            .any(|n| n.ends_with(".bin") || n.ends_with(".ckpt"));
        let hint = if has_bin {
            "; only pickle (.bin/.ckpt) weights are present, which are not loaded for safety: convert them to safetensors"
        } else {
            ""
        };
        let wanted = match variant {
            Variant::Auto => "*.safetensors".to_string(),
            Variant::Named(v) => format!("*.{v}.safetensors"),
        };
        return Err(ModelError::io(
            dir,
            format!("no weight files matching {wanted}{hint}"),
        ));
    }
    Ok(chosen.into_iter().map(|n| dir.join(n)).collect())
}

struct TensorEntry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range inside the file.
    start: usize,
    end: usize,
}

/// A weights file's bytes: mapped from disk, or already in memory.
enum WeightBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for WeightBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// Memory-mapped safetensors files, indexed by tensor name.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, WeightBytes)>,
    index: HashMap<String, TensorEntry>,
    /// Old diffusers names still found in some checkpoints, tried when the current name is absent.
    aliases: Vec<(&'static str, &'static str)>,
}

impl SafetensorsWeights {
    /// Maps and indexes the files; a corrupt header or overlapping tensors is reported with the path.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we assume it is not
            // truncated by another process while we hold it.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            files.push((path.clone(), WeightBytes::Mapped(mmap)));
        }
        Self::index(files)
    }

    /// Indexes safetensors files already in memory, each with the path its errors name.
    pub fn from_bytes(files: Vec<(PathBuf, Vec<u8>)>) -> Result<Self> {
        Self::index(
            files
                .into_iter()
                .map(|(path, bytes)| (path, WeightBytes::Owned(bytes)))
                .collect(),
        )
    }

    fn index(files: Vec<(PathBuf, WeightBytes)>) -> Result<Self> {
        let mut index = HashMap::new();
        for (file_idx, (path, bytes)) in files.iter().enumerate() {
            let (header_len, metadata) =
                safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
                    ModelError::CorruptWeights {
                        path: path.clone(),
                        reason: e.to_string(),
                    }
                })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                if data_start + end > bytes.len() {
                    return Err(ModelError::CorruptWeights {
                        path: path.clone(),
                        reason: format!("tensor `{name}` extends past the end of the file"),
                    });
                }
                if let Some(prev) = index.insert(
                    name.clone(),
                    TensorEntry {
                        file: file_idx,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + start,
                        end: data_start + end,
                    },
                ) {
                    return Err(ModelError::CorruptWeights {
                        path: path.clone(),
                        reason: format!(
                            "tensor `{name}` also appears in {}",
                            files[prev.file].0.display()
                        ),
                    });
                }
            }
        }
        Ok(Self {
            files,
            index,
            aliases: DEFAULT_ALIASES.to_vec(),
        })
    }

    /// Tensor names with their shapes, sorted.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.index
            .iter()
            .map(|(k, v)| (k.clone(), v.shape.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn describe_files(&self) -> String {
        self.files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn resolve(&self, name: &str) -> Option<(&str, &TensorEntry)> {
        if let Some((k, e)) = self.index.get_key_value(name) {
            return Some((k.as_str(), e));
        }
        for (new, old) in &self.aliases {
            if name.contains(new) {
                let alt = name.replace(new, old);
                if let Some((k, e)) = self.index.get_key_value(&alt) {
                    return Some((k.as_str(), e));
                }
            }
        }
        None
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (_, entry) = self.resolve(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: no tensor `{name}` (the file holds {} tensors)",
                self.describe_files(),
                self.index.len()
            ))
        })?;
        let path = &self.files[entry.file].0;
        let src_dtype = match entry.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor `{name}` has dtype {other:?}, expected a floating-point dtype (f32, f16, bf16)",
                    path.display()
                )))
            }
        };
        let bytes = &self.files[entry.file].1[entry.start..entry.end];
        let tensor = Tensor::from_raw_buffer(bytes, src_dtype, &entry.shape, &Device::Cpu)
            .map_err(|e| {
                candle_core::Error::Msg(format!("{}: tensor `{name}`: {e}", path.display()))
            })?;
        tensor.to_dtype(dtype)?.to_device(dev)
    }
}

/// Renamings between current diffusers parameter names and those of older checkpoints.
const DEFAULT_ALIASES: &[(&str, &str)] = &[
    // AutoencoderKL mid-block attention before diffusers 0.14.
    (".to_q.", ".query."),
    (".to_k.", ".key."),
    (".to_v.", ".value."),
    (".to_out.0.", ".proj_attn."),
];

impl SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut tensor = self.load(name, dtype, dev)?;
        if tensor.shape() != &s {
            // Old checkpoints store attention projections as 1×1 convolutions.
            let squeezable = tensor.rank() == 4
                && s.rank() == 2
                && tensor.dims()[2..] == [1, 1]
                && tensor.dims()[..2] == s.dims()[..];
            if squeezable {
                tensor = tensor.reshape(s.clone())?;
            } else {
                let path = self
                    .resolve(name)
                    .map(|(_, e)| self.files[e.file].0.display().to_string());
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor `{name}` has shape {:?}, expected {:?}",
                    path.unwrap_or_default(),
                    tensor.dims(),
                    s.dims()
                )));
            }
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }
}

/// Opens a component folder's weights as a `VarBuilder` in `dtype` on `device`.
pub fn var_builder(
    dir: &Path,
    variant: &Variant,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let files = component_files(dir, variant)?;
    let weights = SafetensorsWeights::open(&files)?;
    Ok(VarBuilder::from_backend(
        Box::new(weights),
        dtype,
        device.clone(),
    ))
}

/// A backend that hands out zero-cost placeholder tensors and records every name and shape asked
/// for: builds a model of any size without memory, to list exactly the parameters it expects.
#[derive(Clone, Default)]
pub struct ParameterRecorder {
    seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl ParameterRecorder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// The recorded parameters, name → shape.
    pub fn parameters(&self) -> BTreeMap<String, Vec<usize>> {
        self.seen.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl SimpleBackend for ParameterRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(name.to_string(), s.dims().to_vec());
        }
        // A broadcast scalar: the requested shape without allocating it.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "parameter recorder: shape of `{name}` is unknown"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_bytes_read_back_as_the_same_tensors() {
        let dev = Device::Cpu;
        let tensors: HashMap<String, Tensor> = [
            (
                "w".to_string(),
                Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &dev).unwrap(),
            ),
            (
                "ids".to_string(),
                Tensor::new(&[7u32, 0, 42], &dev).unwrap(),
            ),
        ]
        .into_iter()
        .collect();
        let bytes = safetensors_bytes(&tensors).unwrap();
        let back = candle_core::safetensors::load_buffer(&bytes, &dev).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(
            back["w"].to_vec2::<f32>().unwrap(),
            vec![vec![1.5, -2.0], vec![0.25, 3.0]]
        );
        assert_eq!(back["ids"].to_vec1::<u32>().unwrap(), vec![7, 0, 42]);
    }
}
