//! Atomic, durable file writes.
//!
//! The new content goes to a temporary file in the target's folder
//! (`.NAME.l2s-HOST-PID.XXXXXX.tmp`), which is synced to disk, renamed over the target, and then
//! the folder itself is synced so the rename survives a crash. On any error the temporary file
//! is removed and the target keeps its old content (or stays absent): it is never left half
//! written. A process killed mid-write leaves its temporary file behind; the host and process id
//! in its name let [`remove_stale_temp_files`] tell it from one a live writer is filling.

use std::error::Error as StdError;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

/// A file could not be written; every message names the target.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The folder the file should go to is missing.
    #[error("cannot write {}: the folder {} does not exist", path.display(), folder.display())]
    MissingFolder { path: PathBuf, folder: PathBuf },
    /// The path names no file (e.g. it ends in `..` or is empty).
    #[error("cannot write {}: not a file path", path.display())]
    NotAFile { path: PathBuf },
    /// A file-system operation failed; `step` says which.
    #[error("cannot write {}: {step}: {error}", path.display())]
    Io {
        path: PathBuf,
        step: String,
        error: io::Error,
    },
    /// The caller's writer failed (see [`write_atomic_with`]).
    #[error("cannot write {}: {error}", path.display())]
    Content {
        path: PathBuf,
        error: Box<dyn StdError + Send + Sync>,
    },
}

impl WriteError {
    /// The file that was to be written.
    pub fn path(&self) -> &Path {
        match self {
            WriteError::MissingFolder { path, .. }
            | WriteError::NotAFile { path }
            | WriteError::Io { path, .. }
            | WriteError::Content { path, .. } => path,
        }
    }

    fn io(path: &Path, step: impl Into<String>) -> impl FnOnce(io::Error) -> WriteError + '_ {
        let step = step.into();
        move |error| WriteError::Io {
            path: path.to_path_buf(),
            step,
            error,
        }
    }
}

/// Writes `bytes` to `path` atomically and durably (see the module documentation). The folder
/// must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let mut tmp = begin(path)?;
    tmp.write_all(bytes)
        .map_err(WriteError::io(path, "writing the temporary file"))?;
    commit(path, tmp, None)
}

/// Like [`write_atomic`] for writers that take a file name: `write` gets the temporary file's
/// path, writes the whole content there (replacing the empty file in place), and its error is
/// reported as the target's.
pub fn write_atomic_with<E>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), WriteError>
where
    E: Into<Box<dyn StdError + Send + Sync>>,
{
    let tmp = begin(path)?;
    write(tmp.path()).map_err(|e| WriteError::Content {
        path: path.to_path_buf(),
        error: e.into(),
    })?;
    // The writer may have written through its own handle; sync what is at the path now.
    let written =
        File::open(tmp.path()).map_err(WriteError::io(path, "reopening the temporary file"))?;
    commit(path, tmp, Some(written))
}

/// Copies `src` to `dst` atomically and durably.
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<(), WriteError> {
    let mut from =
        File::open(src).map_err(WriteError::io(dst, format!("reading {}", src.display())))?;
    let mut tmp = begin(dst)?;
    io::copy(&mut from, tmp.as_file_mut())
        .map_err(WriteError::io(dst, format!("copying {}", src.display())))?;
    commit(dst, tmp, None)
}

/// Marks our temporary files' names, before the writer's host and process id.
const TEMP_MARK: &str = "l2s-";

/// The (host, process id) in one of our temporary files' names.
fn temp_file_writer(name: &str) -> Option<(&str, u32)> {
    let stem = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (left, _random) = stem.rsplit_once('.')?;
    let (_, writer) = left.rsplit_once(&format!(".{TEMP_MARK}"))?;
    let (host, pid) = writer.rsplit_once('-')?;
    Some((host, pid.parse().ok()?))
}

/// Removes the temporary files that writers on this host which no longer run left in `folder`
/// and its subfolders down to `depth` levels (a process killed mid-write leaves one). Files of
/// live writers, of other hosts, and all other files are kept. Returns how many were removed.
pub fn remove_stale_temp_files(folder: &Path, depth: usize) -> usize {
    let host = crate::lock::host_name();
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() && depth > 0 {
            removed += remove_stale_temp_files(&path, depth - 1);
        } else if kind.is_file() {
            let name = entry.file_name();
            let stale = name
                .to_str()
                .and_then(temp_file_writer)
                .is_some_and(|(h, pid)| {
                    h == host
                        && crate::lock::process_gone(pid)
                        && std::fs::remove_file(&path).is_ok()
                });
            removed += usize::from(stale);
        }
    }
    removed
}

/// The folder a path's file lives in (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Checks the target and creates the temporary file beside it. Dropping the result removes it.
fn begin(path: &Path) -> Result<NamedTempFile, WriteError> {
    let name = path
        .file_name()
        .ok_or_else(|| WriteError::NotAFile {
            path: path.to_path_buf(),
        })?
        .to_string_lossy()
        .into_owned();
    let folder = folder_of(path);
    if !folder.exists() {
        return Err(WriteError::MissingFolder {
            path: path.to_path_buf(),
            folder: folder.to_path_buf(),
        });
    }
    let prefix = format!(
        ".{name}.{TEMP_MARK}{}-{}.",
        crate::lock::host_name(),
        std::process::id()
    );
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // Temporary files are private by default; the result gets the usual mode (umask applies).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder.tempfile_in(folder).map_err(WriteError::io(
        path,
        format!("cannot create a temporary file in {}", folder.display()),
    ))
}

/// Syncs the temporary file (through `written` when given), renames it over `path` and syncs the
/// folder. On error the temporary file is removed.
fn commit(path: &Path, tmp: NamedTempFile, written: Option<File>) -> Result<(), WriteError> {
    written
        .as_ref()
        .unwrap_or(tmp.as_file())
        .sync_all()
        .map_err(WriteError::io(path, "syncing the temporary file"))?;
    drop(written);
    // On failure the error carries the temporary file, whose drop removes it.
    tmp.persist(path).map_err(|e| WriteError::Io {
        path: path.to_path_buf(),
        step: "renaming the temporary file over it".into(),
        error: e.error,
    })?;
    sync_folder(folder_of(path)).map_err(WriteError::io(
        path,
        "written, but syncing its folder failed",
    ))
}

/// Makes a rename in `folder` durable. File systems that cannot sync a folder are let be.
fn sync_folder(folder: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        match File::open(folder).and_then(|d| d.sync_all()) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
                ) =>
            {
                Ok(())
            }
            other => other,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = folder;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_target_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_atomic(&path, b"a long first version of the file").unwrap();
        write_atomic(&path, b"short").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"short");
        write_atomic(&path, b"").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"");
        write_atomic_with(&path, |tmp| fs::write(tmp, "through a path")).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "through a path");
        let src = dir.path().join("src.bin");
        fs::write(&src, [1u8, 2, 3]).unwrap();
        copy_atomic(&src, &path).unwrap();
        assert_eq!(fs::read(&path).unwrap(), [1, 2, 3]);
        assert_eq!(names(dir.path()), ["out.json", "src.bin"]);
    }

    #[cfg(unix)]
    #[test]
    fn the_result_has_the_usual_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (atomic, plain) = (dir.path().join("a"), dir.path().join("b"));
        write_atomic(&atomic, b"x").unwrap();
        fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&atomic), mode(&plain));
    }

    #[test]
    fn a_missing_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nowhere/out.png");
        let err = write_atomic(&path, b"x").unwrap_err();
        assert!(matches!(err, WriteError::MissingFolder { .. }), "{err}");
        assert_eq!(err.path(), path);
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains("nowhere")
                && msg.contains("does not exist"),
            "{msg}"
        );
        assert!(names(dir.path()).is_empty());
        let err = write_atomic(Path::new(""), b"x").unwrap_err();
        assert!(matches!(err, WriteError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn a_failed_rename_keeps_the_target_and_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty folder cannot be replaced by a file.
        let target = dir.path().join("taken");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"kept").unwrap();
        let err = write_atomic(&target, b"new").unwrap_err();
        assert!(matches!(err, WriteError::Io { .. }), "{err}");
        assert!(err.to_string().contains("taken"), "{err}");
        assert_eq!(names(dir.path()), ["taken"]);
        assert_eq!(fs::read(target.join("inside")).unwrap(), b"kept");
    }

    #[test]
    fn a_failing_writer_keeps_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |tmp| {
            fs::write(tmp, b"half")?;
            Err::<(), _>(io::Error::other("encoder gave up"))
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("weights.safetensors") && msg.contains("encoder gave up"),
            "{msg}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["weights.safetensors"]);
        let err = copy_atomic(&dir.path().join("absent"), &path).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
        assert_eq!(names(dir.path()), ["weights.safetensors"]);
    }

    #[cfg(unix)]
    #[test]
    fn a_read_only_folder_is_an_error_naming_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        fs::create_dir(&ro).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        // Permissions do not bind a privileged user; then there is nothing to check.
        let privileged = fs::write(ro.join("probe"), b"").is_ok();
        if !privileged {
            let path = ro.join("out.txt");
            let err = write_atomic(&path, b"x").unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains("temporary file"),
                "{msg}"
            );
            assert!(names(&ro).is_empty());
        }
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
    }
}
