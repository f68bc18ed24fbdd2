//! One writer per output folder.
//!
//! [`FolderLock::acquire`] creates a lock file in the folder (`.l2s.lock` by default) with
//! `create_new`, so of two processes started on one folder exactly one gets it; the file holds
//! the holder's process id and host name, and is removed when the lock is dropped. A lock left
//! by a process that died without removing it is taken over when that process ran on this host
//! and no longer exists (a note says so through [`FolderLock::took_over`]); a lock from another
//! host is never taken over, as its process cannot be seen from here: the message says which
//! host and process hold it, so a user who knows it is gone can delete the file.
//!
//! A process killed at any moment never leaves a half-written lock: the file is written in full
//! under a temporary name and then hard-linked into place, which fails if a lock is there. The
//! holder's start time is recorded too, so a process id reused after a crash (a restarted
//! container's process often gets the same one) is not mistaken for the holder; a zombie (killed,
//! not yet reaped) counts as gone.

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
    /// The process's start time (clock ticks after boot, Linux), when known.
    pub started: Option<u64>,
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

/// The state letter and start time of process `pid` from `/proc/PID/stat`; `None` when it has
/// no entry there.
fn proc_stat(pid: u32) -> Option<(char, Option<u64>)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID …": COMM may hold spaces and parentheses, so split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of the line (starttime) is the 20th after COMM.
    Some((state, fields.get(19).and_then(|f| f.parse().ok())))
}

/// Whether process `pid` of this host is certainly gone (see [`certainly_dead`]; no start time
/// is known).
pub(crate) fn process_gone(pid: u32) -> bool {
    certainly_dead(&LockHolder {
        pid,
        host: String::new(),
        started: None,
    })
}

/// Whether `holder`, a process of this host, is certainly gone (Linux: no `/proc/PID`, a zombie,
/// or a process of another start time under its id). Where that cannot be told, the process is
/// taken to be alive.
fn certainly_dead(holder: &LockHolder) -> bool {
    if !Path::new("/proc/self").exists() {
        return false;
    }
    match proc_stat(holder.pid) {
        None => true,
        Some(('Z' | 'X', _)) => true,
        Some((_, started)) => holder.started.is_some() && started != holder.started,
    }
}

fn parse_holder(text: &str) -> Option<LockHolder> {
    let mut pid = None;
    let mut host = None;
    let mut started = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("pid", v)) => pid = v.trim().parse().ok(),
            Some(("host", v)) => host = Some(v.trim().to_string()),
            Some(("started", v)) => started = v.trim().parse().ok(),
            _ => {}
        }
    }
    Some(LockHolder {
        pid: pid?,
        host: host?,
        started,
    })
}

/// Removes what processes killed while taking the lock `name` left (`NAME.new.PID`,
/// `NAME.stale.PID`), when those processes are gone.
fn remove_stale_lock_files(folder: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(name)) else {
            continue;
        };
        let pid = rest
            .strip_prefix(".new.")
            .or_else(|| rest.strip_prefix(".stale."))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(process_gone) {
            let _ = fs::remove_file(entry.path());
        }
    }
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
        let pid = std::process::id();
        let me = LockHolder {
            pid,
            host: host_name(),
            started: proc_stat(pid).and_then(|(_, started)| started),
        };
        let mut took_over = None;
        // The lock's whole text under a name of our own first: linking it into place either
        // makes a complete lock or finds one there.
        let staged = folder.join(format!("{name}.new.{pid}"));
        let mut text = format!("pid={}\nhost={}\n", me.pid, me.host);
        if let Some(started) = me.started {
            text.push_str(&format!("started={started}\n"));
        }
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&staged)
            .and_then(|mut file| {
                file.write_all(text.as_bytes())?;
                file.sync_all()
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&staged);
            return Err(io_err("writing the lock file")(e));
        }
        let result = Self::link_staged(folder, name, &path, &staged, &me, &mut took_over);
        let _ = fs::remove_file(&staged);
        result?;
        remove_stale_lock_files(folder, name);
        // Temporary files of writers killed mid-write (the layouts written here are at most
        // two folders deep: NNNNN/samples/SSSS.png).
        crate::atomic::remove_stale_temp_files(folder, 2);
        Ok(Self { path, took_over })
    }

    /// Links the staged lock file into place, taking over a stale lock at most once.
    fn link_staged(
        folder: &Path,
        name: &str,
        path: &Path,
        staged: &Path,
        me: &LockHolder,
        took_over: &mut Option<LockHolder>,
    ) -> Result<(), LockError> {
        let io_err = |step: &'static str| {
            move |error| LockError::Io {
                folder: folder.to_path_buf(),
                step,
                error,
            }
        };
        // Two rounds: the second after moving a stale lock away.
        for _ in 0..2 {
            match fs::hard_link(staged, path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("creating the lock file")(e)),
            }
            let text = match fs::read_to_string(path) {
                Ok(t) => t,
                // Released between our attempt and the read: try again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("reading the lock file")(e)),
            };
            let holder = parse_holder(&text).ok_or_else(|| LockError::Unreadable {
                folder: folder.to_path_buf(),
                lock: path.to_path_buf(),
                reason: "expected lines pid=… and host=…".into(),
            })?;
            if holder.host != me.host || !certainly_dead(&holder) || holder == *me {
                return Err(LockError::Held {
                    folder: folder.to_path_buf(),
                    lock: path.to_path_buf(),
                    holder,
                });
            }
            // Stale: move it aside under a name of our own, so that of two processes taking it
            // over at once only one succeeds (the other's rename finds nothing).
            let aside = folder.join(format!("{name}.stale.{}", me.pid));
            match fs::rename(path, &aside) {
                Ok(()) => {
                    let _ = fs::remove_file(&aside);
                    *took_over = Some(holder);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("moving a stale lock file aside")(e)),
            }
        }
        let holder = fs::read_to_string(path)
            .ok()
            .and_then(|t| parse_holder(&t))
            .unwrap_or(LockHolder {
                pid: 0,
                host: "unknown-host".into(),
                started: None,
            });
        Err(LockError::Held {
            folder: folder.to_path_buf(),
            lock: path.to_path_buf(),
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
        let me = std::process::id();
        assert!(
            text.starts_with(&format!("pid={me}\nhost={}\nstarted=", host_name())),
            "{text}"
        );
        assert_eq!(
            parse_holder(&text).unwrap().started,
            proc_stat(me).unwrap().1
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
        assert_eq!(
            lock.took_over(),
            Some(&LockHolder {
                pid,
                host,
                started: None
            })
        );
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

    #[test]
    fn a_reused_process_id_or_a_zombie_does_not_hold_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let host = host_name();
        // Our own id with another start time: a restarted container's process.
        let me = std::process::id();
        let started = proc_stat(me).unwrap().1.unwrap();
        fs::write(
            dir.path().join(LOCK_FILE),
            format!("pid={me}\nhost={host}\nstarted={}\n", started + 1),
        )
        .unwrap();
        let lock = FolderLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.took_over().map(|h| h.pid), Some(me));
        drop(lock);
        // A killed child not yet reaped is a zombie: gone, though /proc still lists it.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        child.kill().unwrap();
        while proc_stat(pid).map(|s| s.0) != Some('Z') {
            std::thread::yield_now();
        }
        fs::write(
            dir.path().join(LOCK_FILE),
            format!("pid={pid}\nhost={host}\n"),
        )
        .unwrap();
        let lock = FolderLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.took_over().map(|h| h.pid), Some(pid));
        child.wait().unwrap();
    }

    #[test]
    fn files_left_by_killed_writers_are_removed_when_the_lock_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let host = host_name();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        // Process 1 (init) runs as long as the machine does.
        let live = 1;
        let sub = dir.path().join("00001/samples");
        fs::create_dir_all(&sub).unwrap();
        let stale = [
            dir.path().join(format!("{LOCK_FILE}.new.{dead}")),
            dir.path().join(format!("{LOCK_FILE}.stale.{dead}")),
            dir.path()
                .join(format!(".info.json.l2s-{host}-{dead}.AbC123.tmp")),
            sub.join(format!(".0000.png.l2s-{host}-{dead}.xYz789.tmp")),
        ];
        let kept = [
            sub.join(format!(".0001.png.l2s-{host}-{live}.xYz789.tmp")),
            sub.join(format!(".0002.png.l2s-other-host-{dead}.xYz789.tmp")),
            dir.path().join(".notes.tmp"),
            dir.path().join(format!("{LOCK_FILE}.new.{live}")),
        ];
        for f in stale.iter().chain(&kept) {
            fs::write(f, "x").unwrap();
        }
        let lock = FolderLock::acquire(dir.path()).unwrap();
        for f in &stale {
            assert!(!f.exists(), "{} should be removed", f.display());
        }
        for f in &kept {
            assert!(f.exists(), "{} should be kept", f.display());
        }
        drop(lock);
    }
}
