//! Reading files whose size is not ours to choose: a path read from a results or annotations
//! file may name a device (`/dev/zero`, a FIFO) or a huge file. [`read_capped`] reads regular
//! files only, and at most a given number of bytes; [`check_relative`] keeps a path written in
//! a file inside the folder it belongs to.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// A file could not be read; every message names it.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: not a regular file ({kind}); expected a file", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{}: {size} bytes is more than the {limit} bytes accepted", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
}

/// The largest image file read (a 4096 × 4096 RGB PNG is at most about 50 MB).
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

impl ReadError {
    /// The file concerned.
    pub fn path(&self) -> &Path {
        match self {
            ReadError::NotAFile { path, .. }
            | ReadError::TooLarge { path, .. }
            | ReadError::Io { path, .. } => path,
        }
    }

    /// The message without the file's name, for callers that name it themselves.
    pub fn reason(&self) -> String {
        let full = self.to_string();
        let prefix = format!("{}: ", self.path().display());
        full.strip_prefix(&prefix).unwrap_or(&full).to_string()
    }

    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io { error, .. } if error.kind() == io::ErrorKind::NotFound)
    }
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a folder"
    } else {
        "not a plain file"
    }
}

/// The bytes of the regular file `path`, refused when larger than `limit` bytes (also when it
/// grows past `limit` while being read).
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let io_err = |error| ReadError::Io {
        path: path.to_path_buf(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if !meta.is_file() {
        return Err(ReadError::NotAFile {
            path: path.to_path_buf(),
            kind: kind_of(&meta),
        });
    }
    let too_large = |size| ReadError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    File::open(path)
        .map_err(io_err)?
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_capped`] as UTF-8 text.
pub fn read_text_capped(path: &Path, limit: u64) -> Result<String, ReadError> {
    let bytes = read_capped(path, limit)?;
    String::from_utf8(bytes).map_err(|e| ReadError::Io {
        path: path.to_path_buf(),
        error: io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

/// Why a path written in a file may not be followed: it must be relative and stay below the
/// folder it is read against (no root, drive prefix or `..`). `None` when it is fine.
pub fn check_relative(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("an empty path");
    }
    if path.contains('\0') {
        return Some("a path with a NUL character");
    }
    for c in Path::new(path).components() {
        match c {
            Component::Prefix(_) | Component::RootDir => {
                return Some("an absolute path; expected one relative to the folder")
            }
            Component::ParentDir => {
                return Some("a path with `..`; expected one inside the folder")
            }
            Component::CurDir | Component::Normal(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_folders_and_large_files_are_refused_by_name() {
        let e = read_capped(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/zero") && e.contains("a character device"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let e = read_capped(dir.path(), 10).unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
        let f = dir.path().join("big.txt");
        std::fs::write(&f, "0123456789").unwrap();
        let e = read_capped(&f, 9).unwrap_err().to_string();
        assert!(
            e.contains("big.txt") && e.contains("10 bytes is more than the 9"),
            "{e}"
        );
        assert_eq!(read_capped(&f, 10).unwrap(), b"0123456789");
        assert_eq!(read_text_capped(&f, 10).unwrap(), "0123456789");
        let e = read_capped(&dir.path().join("absent"), 10).unwrap_err();
        assert!(matches!(e, ReadError::Io { .. }), "{e}");
    }

    #[test]
    fn paths_leaving_their_folder_are_named() {
        for ok in ["00001/samples/0000.png", "./a.png", "a/./b.png"] {
            assert_eq!(check_relative(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("../x.png", ".."),
            ("00001/../../etc/passwd", ".."),
            ("/etc/passwd", "absolute"),
            ("", "empty"),
            ("a\0b", "NUL"),
        ] {
            assert!(check_relative(bad).unwrap().contains(why), "{bad:?}");
        }
    }
}
