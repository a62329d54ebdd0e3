//! One daemon per state directory and per spool.
//!
//! Promises: [`DirLock::take`] holds an exclusive `flock` on a lock file in a
//! directory for as long as the [`DirLock`] lives, which for the daemon is the
//! process's life; the kernel drops it when the process ends, however it ends
//! (`kill -9` included), so a lock is never left stale. A second daemon on the
//! same state directory or spool is refused at start with the pid of the one
//! holding it. A lock file removed with its directory is made and taken again
//! ([`DirLock::renew`]).
//!
//! Design choice: `flock` on a file rather than a pid file checked by hand: no
//! guessing whether a pid is still alive or was reused. The holder's pid is
//! written into the file only so the refusal can name it.

use crate::error::Class;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another ferry daemon (pid {pid}) is using the {what} {dir}: two daemons there would upload the same images twice and abort each other's uploads; stop that daemon first, or give this one its own {key}"
    )]
    Held {
        what: &'static str,
        key: &'static str,
        dir: String,
        pid: String,
    },
    #[error("cannot lock the {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LockError {
    /// [`Class::Fatal`] at start (another daemon, or a directory ferry cannot
    /// lock); a running daemon takes no new files while its lock is lost.
    pub fn class(&self) -> Class {
        Class::Fatal
    }
}

/// An exclusive lock on `DIR/<file>`, held while this lives.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
    what: &'static str,
    key: &'static str,
}

impl DirLock {
    /// Takes the lock file `name` in `dir` (made if missing). `what` names the
    /// directory for people ("state directory"), `key` the config key that
    /// moves it ("state_dir").
    pub fn take(
        dir: &Path,
        name: &str,
        what: &'static str,
        key: &'static str,
    ) -> Result<DirLock, LockError> {
        let path = dir.join(name);
        let io = |source| LockError::Io {
            what,
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor owned by `file`.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let pid = std::fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "unknown".into());
                return Err(LockError::Held {
                    what,
                    key,
                    dir: dir.display().to_string(),
                    pid,
                });
            }
            return Err(io(e));
        }
        file.set_len(0).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DirLock {
            file,
            path,
            what,
            key,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the lock again if its file was removed or replaced (the directory
    /// was removed and made again): a lock on a file nobody can open any more
    /// keeps no second daemon out. `Ok(true)` when it was taken again.
    pub fn renew(&mut self) -> Result<bool, LockError> {
        let ours = self.file.metadata().map(|m| (m.dev(), m.ino())).ok();
        let there = std::fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        if ours.is_some() && ours == there {
            return Ok(false);
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| LockError::Io {
                what: self.what,
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        *self = DirLock::take(dir, &name, self.what, self.key)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let d = tempfile::tempdir().unwrap();
        let first = DirLock::take(d.path(), "l.lock", "state directory", "state_dir").unwrap();
        // flock locks belong to open file descriptions: a second open in the
        // same process is refused like another process would be.
        let e = DirLock::take(d.path(), "l.lock", "state directory", "state_dir").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("another ferry daemon")
                && m.contains(&std::process::id().to_string())
                && m.contains("state_dir"),
            "{m}"
        );
        drop(first);
        DirLock::take(d.path(), "l.lock", "state directory", "state_dir").unwrap();
    }

    #[test]
    fn a_removed_lock_file_is_taken_again() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let mut l = DirLock::take(&dir, "l.lock", "state directory", "state_dir").unwrap();
        assert!(!l.renew().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        assert!(l.renew().unwrap());
        assert!(DirLock::take(&dir, "l.lock", "state directory", "state_dir").is_err());
    }
}
