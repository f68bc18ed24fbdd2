//! One writer per output folder.
//!
//! [`FolderLock::acquire`] creates a lock file in the folder (`.l2s.lock` by default) with
//! `create_new`, so of two processes started on one folder exactly one gets it; the file holds
//! the holder's process id and host name, and is removed when the lock is dropped. A lock left
//! by a process that died without removing it is taken over when that process ran on this host
//! and no longer exists (a note says so through [`FolderLock::took_over`]); a lock from another
//! host is never taken over, as its process cannot be seen from here: the message says which
//! host and process hold it, so a user who knows it is gone can delete the file.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The lock file's usual name.
pub const LOCK_FILE: &str = ".l2s.lock";

/// Who holds a lock: the process id and host name read from its lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {} on {}", self.pid, self.host)
    }
}

/// The folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live (or unverifiable) process holds the folder.
    #[error(
        "{} is in use by {holder} (lock file {}); wait for it to finish, or delete the lock file \
         if that process is gone",
        folder.display(),
        lock.display()
    )]
    Held {
        folder: PathBuf,
        lock: PathBuf,
        holder: LockHolder,
    },
    /// The lock file exists but is not one of ours.
    #[error(
        "{}: unreadable lock file ({reason}); delete it if no other l2s process writes to {}",
        lock.display(),
        folder.display()
    )]
    Unreadable {
        folder: PathBuf,
        lock: PathBuf,
        reason: String,
    },
    #[error("cannot lock {}: {step}: {error}", folder.display())]
    Io {
        folder: PathBuf,
        step: &'static str,
        error: io::Error,
    },
}

/// A held lock on a folder; dropping it removes the lock file.
#[derive(Debug)]
pub struct FolderLock {
    path: PathBuf,
    took_over: Option<LockHolder>,
}

/// This host's name, as the lock file records it.
pub fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-host".to_string())
}

/// Whether process `pid` of this host is certainly gone (Linux: no `/proc/PID`). Where that
/// cannot be told, the process is taken to be alive.
fn certainly_dead(pid: u32) -> bool {
    let proc = Path::new("/proc");
    proc.join("self").exists() && !proc.join(pid.to_string()).exists()
}

fn parse_holder(text: &str) -> Option<LockHolder> {
    let mut pid = None;
    let mut host = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("pid", v)) => pid = v.trim().parse().ok(),
            Some(("host", v)) => host = Some(v.trim().to_string()),
            _ => {}
        }
    }
    Some(LockHolder {
        pid: pid?,
        host: host?,
    })
}

impl FolderLock {
    /// Locks `folder` (which must exist) with the lock file [`LOCK_FILE`].
    pub fn acquire(folder: &Path) -> Result<Self, LockError> {
        Self::acquire_named(folder, LOCK_FILE)
    }

    /// Locks `folder` with the lock file `name`: processes that may share a folder (the shards
    /// of one evaluation) each take their own name.
    pub fn acquire_named(folder: &Path, name: &str) -> Result<Self, LockError> {
        let path = folder.join(name);
        let io_err = |step: &'static str| {
            move |error| LockError::Io {
                folder: folder.to_path_buf(),
                step,
                error,
            }
        };
        let me = LockHolder {
            pid: std::process::id(),
            host: host_name(),
        };
        let mut took_over = None;
        // Two rounds: the second after moving a stale lock away.
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    let text = format!("pid={}\nhost={}\n", me.pid, me.host);
                    if let Err(e) = file
                        .write_all(text.as_bytes())
                        .and_then(|_| file.sync_all())
                    {
                        let _ = fs::remove_file(&path);
                        return Err(io_err("writing the lock file")(e));
                    }
                    return Ok(Self { path, took_over });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("creating the lock file")(e)),
            }
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                // Released between our attempt and the read: try again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("reading the lock file")(e)),
            };
            let holder = parse_holder(&text).ok_or_else(|| LockError::Unreadable {
                folder: folder.to_path_buf(),
                lock: path.clone(),
                reason: "expected lines pid=… and host=…".into(),
            })?;
            if holder.host != me.host || !certainly_dead(holder.pid) || holder == me {
                return Err(LockError::Held {
                    folder: folder.to_path_buf(),
                    lock: path.clone(),
                    holder,
                });
            }
            // Stale: move it aside under a name of our own, so that of two processes taking it
            // over at once only one succeeds (the other's rename finds nothing).
            let aside = folder.join(format!("{name}.stale.{}", me.pid));
            match fs::rename(&path, &aside) {
                Ok(()) => {
                    let _ = fs::remove_file(&aside);
                    took_over = Some(holder);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("moving a stale lock file aside")(e)),
            }
        }
        let holder = fs::read_to_string(&path)
            .ok()
            .and_then(|t| parse_holder(&t))
            .unwrap_or(LockHolder {
                pid: 0,
                host: "unknown-host".into(),
            });
        Err(LockError::Held {
            folder: folder.to_path_buf(),
            lock: path,
            holder,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dead process whose lock this one replaced, if any: callers tell the user.
    pub fn took_over(&self) -> Option<&LockHolder> {
        self.took_over.as_ref()
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_folder_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let lock = FolderLock::acquire(dir.path()).unwrap();
        assert!(lock.took_over().is_none());
        let text = fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(
            text,
            format!("pid={}\nhost={}\n", std::process::id(), host_name())
        );
        let e = FolderLock::acquire(dir.path()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string())
                && msg.contains(&format!("process {}", std::process::id()))
                && msg.contains(&host_name())
                && msg.contains(LOCK_FILE),
            "{msg}"
        );
        // Another name in the same folder is a different lock.
        let other = FolderLock::acquire_named(dir.path(), ".l2s.shard-1-of-2.lock").unwrap();
        drop(other);
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        let again = FolderLock::acquire(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_dead_process_lock_on_this_host_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // A process that has exited: its id no longer exists.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let host = host_name();
        fs::write(
            dir.path().join(LOCK_FILE),
            format!("pid={pid}\nhost={host}\n"),
        )
        .unwrap();
        let lock = FolderLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.took_over(), Some(&LockHolder { pid, host }));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [LOCK_FILE]);
    }

    #[test]
    fn a_lock_from_another_host_or_unreadable_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(LOCK_FILE);
        fs::write(&lock, "pid=1\nhost=some-other-host.example\n").unwrap();
        let e = FolderLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("process 1 on some-other-host.example") && e.contains("delete the lock"),
            "{e}"
        );
        fs::write(&lock, "garbage").unwrap();
        let e = FolderLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(e.contains("unreadable lock file"), "{e}");
        assert_eq!(fs::read_to_string(&lock).unwrap(), "garbage");
    }
}
