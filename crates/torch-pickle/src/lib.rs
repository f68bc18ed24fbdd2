//! Reads PyTorch checkpoints written by `torch.save` (PyTorch 1.6 and later: a zip archive with
//! `<name>/data.pkl` and one `<name>/data/<key>` record per storage) without executing code.
//!
//! The pickle is interpreted by [`pickle::parse`], which only knows how to build plain values:
//! dicts (and OrderedDicts), lists, tuples, sets, strings, bytes, numbers, booleans, None, and
//! tensors. Any other class or function the pickle names is refused, with its module and name
//! in the error, before anything is built from it. Tensors stay references into the archive
//! until [`TorchFile::tensor`] reads them, checking the view against the storage's bounds
//! first.
//!
//! ```no_run
//! # fn main() -> Result<(), l2s_torch_pickle::Error> {
//! let mut ckpt = l2s_torch_pickle::TorchFile::open("model.pth")?;
//! let weights = ckpt.root().get("model_state_dict").cloned();
//! if let Some(sd) = weights {
//!     for (name, tensor) in ckpt.state_dict(&sd, &candle_core::Device::Cpu)? {
//!         println!("{name}: {:?}", tensor.shape());
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod error;
pub mod pickle;
pub mod value;

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use error::{Error, ErrorKind};
pub use value::{StorageRef, StorageType, TensorRef, Value};

/// Bounds on what a file may make the reader allocate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Size of `data.pkl`.
    pub max_pickle_bytes: u64,
    /// Values in the tree, counting a shared (memoised) value once per place it appears.
    pub max_nodes: usize,
    /// Nesting depth of the tree.
    pub max_depth: usize,
    /// Bytes one tensor may occupy when its view is larger than its storage (stride-0 views).
    pub max_broadcast_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pickle_bytes: 256 << 20,
            max_nodes: 4_000_000,
            max_depth: 200,
            max_broadcast_bytes: 256 << 20,
        }
    }
}

/// What an archive is read from: a file, or bytes in memory.
trait Source: Read + Seek + Send + Sync {}

impl<T: Read + Seek + Send + Sync> Source for T {}

/// An opened `torch.save` archive: its pickled value, and access to its storages.
pub struct TorchFile {
    path: PathBuf,
    archive: zip::ZipArchive<Box<dyn Source>>,
    /// `<name>/`, the folder every record sits in.
    prefix: String,
    file_len: u64,
    root: Value,
    limits: Limits,
}

impl std::fmt::Debug for TorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchFile")
            .field("path", &self.path)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

impl TorchFile {
    /// Opens a checkpoint and reads its pickle.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with_limits(path, Limits::default())
    }

    pub fn open_with_limits(path: impl AsRef<Path>, limits: Limits) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let err = |kind: ErrorKind| Error::new(&path, kind);
        let file = File::open(&path).map_err(|e| err(e.into()))?;
        let file_len = file.metadata().map_err(|e| err(e.into()))?.len();
        Self::from_source(path, Box::new(file), file_len, limits)
    }

    /// Reads a checkpoint already in memory; `path` names it in errors.
    pub fn from_bytes(
        path: impl AsRef<Path>,
        bytes: Vec<u8>,
        limits: Limits,
    ) -> Result<Self, Error> {
        let len = bytes.len() as u64;
        Self::from_source(
            path.as_ref().to_path_buf(),
            Box::new(std::io::Cursor::new(bytes)),
            len,
            limits,
        )
    }

    fn from_source(
        path: PathBuf,
        mut file: Box<dyn Source>,
        file_len: u64,
        limits: Limits,
    ) -> Result<Self, Error> {
        let err = |kind: ErrorKind| Error::new(&path, kind);
        let mut head = [0u8; 4];
        let n = read_up_to(&mut file, &mut head).map_err(|e| err(e.into()))?;
        file.rewind().map_err(|e| err(e.into()))?;
        if n < 4 || head != ZIP_MAGIC {
            // Legacy torch.save files are bare pickles: they open with PROTO (0x80).
            if n >= 1 && head[0] == 0x80 {
                return Err(err(ErrorKind::LegacyFormat));
            }
            return Err(err(ErrorKind::NotZip(if n < 4 {
                format!("only {n} bytes")
            } else {
                "the file does not start with a zip header".into()
            })));
        }
        // It starts like a zip, so a failure here means a damaged or cut-off archive.
        let archive = zip::ZipArchive::new(file).map_err(|e| {
            err(ErrorKind::Zip(format!(
                "the archive is damaged or truncated ({e}); expected a complete torch.save file"
            )))
        })?;
        let mut me = Self {
            path: path.clone(),
            archive,
            prefix: String::new(),
            file_len,
            root: Value::None,
            limits,
        };
        me.prefix = me.find_prefix()?;
        if let Some(order) = me.read_small(&format!("{}byteorder", me.prefix))? {
            if order.trim_ascii() != b"little" {
                return Err(me.err(ErrorKind::Layout(format!(
                    "byteorder is {:?}; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(&order)
                ))));
            }
        }
        let pkl_name = format!("{}data.pkl", me.prefix);
        let pkl = me.read_record(&pkl_name, me.limits.max_pickle_bytes, "size of data.pkl")?;
        me.root = pickle::parse(&pkl, &me.limits).map_err(|k| me.err(k))?;
        Ok(me)
    }

    fn err(&self, kind: ErrorKind) -> Error {
        Error::new(&self.path, kind)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The unpickled value (for `torch.save(obj)`, `obj`).
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// Finds `<name>/data.pkl`: exactly one record named `data.pkl` one folder deep.
    fn find_prefix(&self) -> Result<String, Error> {
        let mut found = Vec::new();
        for name in self.archive.file_names() {
            let name = name.map_err(|e| self.err(ErrorKind::Zip(e.to_string())))?;
            if let Some(prefix) = name.strip_suffix("data.pkl") {
                if prefix.ends_with('/') && prefix.matches('/').count() == 1 {
                    found.push(prefix.to_string());
                }
            }
        }
        match found.len() {
            1 => Ok(found.pop().expect("one")),
            0 => Err(self.err(ErrorKind::MissingRecord("<name>/data.pkl".into()))),
            n => Err(self.err(ErrorKind::Layout(format!(
                "{n} data.pkl records ({}); expected one",
                found.join("data.pkl, ") + "data.pkl"
            )))),
        }
    }

    /// Reads a whole record, refusing compressed records and sizes beyond `limit` or the file.
    fn read_record(
        &mut self,
        name: &str,
        limit: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, Error> {
        let path = self.path.clone();
        let err = |kind| Error::new(&path, kind);
        let file_len = self.file_len;
        let mut entry = match self.archive.by_name(name) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(err(ErrorKind::MissingRecord(name.to_string())))
            }
            Err(e) => return Err(err(ErrorKind::Zip(format!("record {name}: {e}")))),
        };
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(err(ErrorKind::Compressed {
                record: name.to_string(),
                method: entry.compression().to_string(),
            }));
        }
        let size = entry.size();
        if size > limit {
            return Err(err(ErrorKind::Limit {
                what,
                limit,
                actual: size,
            }));
        }
        // A stored record cannot be larger than the file holding it.
        if size > file_len {
            return Err(err(ErrorKind::Zip(format!(
                "record {name} claims {size} bytes but the file has {file_len}"
            ))));
        }
        let mut buf = Vec::with_capacity(size as usize);
        (&mut entry)
            .take(size)
            .read_to_end(&mut buf)
            .map_err(|e| err(ErrorKind::Zip(format!("record {name}: {e}"))))?;
        if buf.len() as u64 != size {
            return Err(err(ErrorKind::Zip(format!(
                "record {name} is truncated: {} of {size} bytes",
                buf.len()
            ))));
        }
        Ok(buf)
    }

    fn read_small(&mut self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        if self.archive.index_for_name(name).is_none() {
            return Ok(None);
        }
        self.read_record(name, 4096, "size of a metadata record")
            .map(Some)
    }

    /// Reads a tensor onto `device`, in its own dtype (bool as u8; int8 is refused, candle has
    /// no such dtype). `name` is only used in messages.
    pub fn tensor(&mut self, name: &str, t: &TensorRef, device: &Device) -> Result<Tensor, Error> {
        let terr = |message: String| ErrorKind::Tensor {
            tensor: name.to_string(),
            message,
        };
        let st = t.storage.dtype;
        let Some(dtype) = st.candle_dtype() else {
            return Err(self.err(terr(format!("dtype {} is not supported", st.torch_name()))));
        };
        let esize = st.size() as u64;
        let storage_bytes = (t.storage.numel as u64).checked_mul(esize);
        let Some(storage_bytes) = storage_bytes.filter(|&b| b <= self.file_len) else {
            return Err(self.err(terr(format!(
                "its storage {} claims {} elements of {}, more than the file holds",
                t.storage.key,
                t.storage.numel,
                st.torch_name()
            ))));
        };
        let Some(numel) = t.numel() else {
            return Err(self.err(terr(format!("shape {:?} overflows", t.shape))));
        };
        // The furthest element the view touches must lie inside the storage.
        if numel > 0 {
            let mut last = t.offset as u128;
            for (&d, &s) in t.shape.iter().zip(&t.stride) {
                last += (d as u128 - 1) * s as u128;
            }
            if last >= t.storage.numel as u128 {
                return Err(self.err(terr(format!(
                    "the view (offset {}, shape {:?}, stride {:?}) reaches element {last} of a storage of {}",
                    t.offset, t.shape, t.stride, t.storage.numel
                ))));
            }
        }
        let view_bytes = numel as u64 * esize;
        if view_bytes > storage_bytes && view_bytes > self.limits.max_broadcast_bytes {
            return Err(self.err(ErrorKind::Limit {
                what: "bytes of a tensor view larger than its storage",
                limit: self.limits.max_broadcast_bytes,
                actual: view_bytes,
            }));
        }
        let record = format!("{}data/{}", self.prefix, t.storage.key);
        let raw = self.read_record(&record, storage_bytes, "size of a storage record")?;
        if (raw.len() as u64) < storage_bytes {
            return Err(self.err(terr(format!(
                "record {record} has {} bytes, its storage needs {storage_bytes}",
                raw.len()
            ))));
        }
        let bytes = gather(&raw, t, st.size());
        let shape = t.shape.clone();
        let out = decode(&bytes, st, shape, device).map_err(|e| self.err(e.into()))?;
        debug_assert_eq!(out.dtype(), dtype);
        Ok(out)
    }

    /// Reads a tensor and converts it to `dtype`.
    pub fn tensor_as(
        &mut self,
        name: &str,
        t: &TensorRef,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, Error> {
        let x = self.tensor(name, t, device)?;
        x.to_dtype(dtype).map_err(|e| self.err(e.into()))
    }

    /// Reads every tensor of a state dict (a dict of names to tensors), in its order.
    pub fn state_dict(
        &mut self,
        value: &Value,
        device: &Device,
    ) -> Result<Vec<(String, Tensor)>, Error> {
        let Some(items) = value.as_dict() else {
            return Err(self.err(ErrorKind::Layout(format!(
                "the state dict is a {} (expected a dict of names to tensors)",
                value.type_name()
            ))));
        };
        let mut out = Vec::with_capacity(items.len());
        for (k, v) in items {
            let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
                return Err(self.err(ErrorKind::Layout(format!(
                    "a state dict entry maps a {} to a {} (expected names to tensors)",
                    k.type_name(),
                    v.type_name()
                ))));
            };
            out.push((name.clone(), self.tensor(name, t, device)?));
        }
        Ok(out)
    }
}

/// Copies the view's elements, in row-major order, out of the storage bytes (bounds checked by
/// the caller).
fn gather(raw: &[u8], t: &TensorRef, esize: usize) -> Vec<u8> {
    let numel = t.numel().unwrap_or(0);
    let mut out = Vec::with_capacity(numel * esize);
    if numel == 0 {
        return out;
    }
    // Row-major contiguous views are one slice.
    let mut expect = 1usize;
    let mut contiguous = true;
    for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
        if d != 1 && s != expect {
            contiguous = false;
            break;
        }
        expect *= d;
    }
    if contiguous {
        let start = t.offset * esize;
        out.extend_from_slice(&raw[start..start + numel * esize]);
        return out;
    }
    let rank = t.shape.len();
    let mut idx = vec![0usize; rank];
    let mut pos = t.offset;
    for _ in 0..numel {
        out.extend_from_slice(&raw[pos * esize..(pos + 1) * esize]);
        // Odometer over the indices, last dimension fastest.
        for k in (0..rank).rev() {
            idx[k] += 1;
            pos += t.stride[k];
            if idx[k] < t.shape[k] {
                break;
            }
            pos -= t.stride[k] * t.shape[k];
            idx[k] = 0;
        }
    }
    out
}

fn le_vec<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunk of N")))
        .collect()
}

/// Little-endian element bytes to a tensor.
fn decode(
    bytes: &[u8],
    st: StorageType,
    shape: Vec<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    match st {
        StorageType::F32 => Tensor::from_vec(le_vec(bytes, f32::from_le_bytes), shape, device),
        StorageType::F64 => Tensor::from_vec(le_vec(bytes, f64::from_le_bytes), shape, device),
        StorageType::F16 => Tensor::from_vec(
            le_vec(bytes, |b| half::f16::from_bits(u16::from_le_bytes(b))),
            shape,
            device,
        ),
        StorageType::BF16 => Tensor::from_vec(
            le_vec(bytes, |b| half::bf16::from_bits(u16::from_le_bytes(b))),
            shape,
            device,
        ),
        StorageType::I64 => Tensor::from_vec(le_vec(bytes, i64::from_le_bytes), shape, device),
        StorageType::I32 => Tensor::from_vec(le_vec(bytes, i32::from_le_bytes), shape, device),
        StorageType::I16 => Tensor::from_vec(le_vec(bytes, i16::from_le_bytes), shape, device),
        StorageType::U8 => Tensor::from_vec(bytes.to_vec(), shape, device),
        StorageType::Bool => Tensor::from_vec(
            bytes.iter().map(|&b| u8::from(b != 0)).collect::<Vec<u8>>(),
            shape,
            device,
        ),
        StorageType::I8 => candle_core::bail!("int8 tensors are not supported"),
    }
}

/// Reads until `buf` is full or the input ends (a plain `read` may return fewer bytes early).
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
