//! Where bytes come from: an image file opened once, and everything ferry
//! does to notice that it changed while it was being shipped; or an object
//! in a bucket, pinned by its ETag and read by ranges (`object.rs`).
//!
//! Promises (for a file; `object.rs` says what holds for an object):
//! - a [`Source`] is a regular, non-empty file opened without following a
//!   symlink, known by device, inode, size, modification time and change time;
//! - [`Source::check`] says, in words, whether the file changed since it was
//!   opened; once a change is seen it stays seen (the first reason is kept);
//! - nothing here ever blocks a writer for longer than it takes ferry to
//!   notice it.
//!
//! Which of the kernel's means, and why (a source must never be reported
//! verified after it changed):
//! - **The change time** (`st_ctime`) as well as size, modification time and
//!   inode. A write, a truncation and setting the times back all move it, and
//!   no unprivileged call can set it back. The transfer checks after every
//!   part read and again right before each destination completes its object,
//!   so every byte a destination holds was sent before a check that would
//!   have seen a change.
//! - **The CRC32C of a part read again** (a detached destination reading its
//!   own parts, an upload started over, a resumed job) against its first read
//!   (`chunk::FirstReads`): this needs no clock at all.
//! - **A read lease** (`F_SETLEASE` with `F_RDLCK`) where the kernel grants one:
//!   the daemon's user owns the file or has `CAP_LEASE`, the filesystem is
//!   local, and no process holds the file open for writing. A process that then
//!   opens it for writing or truncates it is made to wait while the kernel
//!   sends ferry SIGIO; ferry marks the source changed and gives the lease up
//!   at once, so the writer goes on and the job fails. Where no lease can be
//!   had the other checks still hold.
//! - **The path** still names the same inode: otherwise the file that would be
//!   moved to `done/` is not the one that was read.
//!
//! What none of these sees: a process that keeps the file open for writing
//! (so no lease can be had; ferry warns) and changes it through a shared
//! writable mapping, whose stores to pages already dirty move no time stamp.
//! Only a part read twice would show it.
//!
//! Design choice: the lease's SIGIO is taken by a thread of its own (the
//! `signal-hook` crate's self-pipe iterator), not by the async runtime, so it
//! works the same in the daemon, in `ferry push` and in tests, and SIGIO can
//! never terminate the process (its default action) once a lease exists.

pub mod lease;
mod object;

pub use lease::{Bucket, BucketError, Listed};
pub use object::{Chunks, Object, RangeError, Remote, Stored};

use crate::error::Class;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Why a file cannot be a source. Each is a refusal of this file, never retryable.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: no such file")]
    Missing { path: String },
    #[error(
        "{path}: is a symbolic link; ferry reads regular files only, give the file it points to"
    )]
    Symlink { path: String },
    #[error("{path}: is a {kind}, not a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path}: is empty; there is nothing to upload")]
    Empty { path: String },
    #[error("{path}: its name is not valid UTF-8; rename it before uploading")]
    BadName { path: String },
    #[error(
        "{path}: another file was renamed over it after ferry claimed it; ferry ships only the file it claimed, and this one was neither inspected nor read"
    )]
    Replaced { path: String },
    #[error("{path}: cannot open: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl SourceError {
    /// Always [`Class::Refuse`]: the file cannot be a source as it is.
    pub fn class(&self) -> Class {
        Class::Refuse
    }
}

/// What identifies the bytes of a file: if any of it moves, the bytes may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size_bytes: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Identity {
    pub fn of(m: &std::fs::Metadata) -> Identity {
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size_bytes: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    /// What differs between `self` (as opened) and `now`, in words; `None`
    /// when nothing does. The device number alone is not a change: it may be
    /// numbered differently after a reboot while inode and times stay put.
    pub fn difference(&self, now: &Identity) -> Option<String> {
        if now.ino != self.ino {
            Some("it was replaced by another file (another inode)".into())
        } else if now.size_bytes != self.size_bytes {
            Some(format!(
                "its size changed from {} to {} bytes",
                self.size_bytes, now.size_bytes
            ))
        } else if now.mtime_ns != self.mtime_ns {
            Some("its modification time changed (it was written to)".into())
        } else if now.ctime_ns != self.ctime_ns {
            Some(
                "its change time moved although size and modification time did not \
                 (it was written to and its modification time was set back, or its \
                 owner, permissions or times were changed)"
                    .into(),
            )
        } else {
            None
        }
    }
}

/// A change of the source, said in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Change(pub String);

/// What is shared by every clone of a [`Source`]: the first change seen, and
/// whether a lease is held.
#[derive(Debug)]
struct Watch {
    /// The file a lease is held on; none for an object.
    file: Option<Arc<File>>,
    path: PathBuf,
    change: Mutex<Option<Change>>,
    leased: std::sync::atomic::AtomicBool,
}

impl Watch {
    fn note(&self, why: String) -> Change {
        let mut c = self.change.lock().unwrap_or_else(|p| p.into_inner());
        c.get_or_insert_with(|| {
            tracing::warn!(
                "{}: changed while ferry was reading it: {why}",
                self.path.display()
            );
            Change(why)
        })
        .clone()
    }
}

/// What a file is when it is neither a regular file nor a symlink.
fn special_kind(ft: &std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        Some("directory")
    } else if ft.is_fifo() {
        Some("FIFO")
    } else if ft.is_socket() {
        Some("socket")
    } else if ft.is_block_device() || ft.is_char_device() {
        Some("device")
    } else {
        None
    }
}

/// Where a source's bytes are.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A file, opened once.
    File(Arc<File>),
    /// An object in a bucket, pinned by its ETag.
    Object(Arc<Object>),
}

/// An open source: a file, or an object.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file's path; for an object, its URL.
    pub path: PathBuf,
    pub name: String,
    pub origin: Origin,
    /// The bytes shipped: for a member of an archive (an OVA's disk), its
    /// length, from `start_bytes` in the file; otherwise the whole file.
    pub size_bytes: u64,
    pub start_bytes: u64,
    /// A file's identity; for an object only its size is known.
    pub identity: Identity,
    watch: Arc<Watch>,
}

impl Source {
    /// Opens the file a claim took: as [`Source::open`], and, when `file_id`
    /// (device, inode) is known, only if it is still that file.
    pub fn open_claimed(path: &Path, file_id: Option<(u64, u64)>) -> Result<Source, SourceError> {
        let source = Source::open(path)?;
        match file_id {
            Some(id) if id != (source.identity.dev, source.identity.ino) => {
                Err(SourceError::Replaced {
                    path: path.display().to_string(),
                })
            }
            _ => Ok(source),
        }
    }

    /// Opens a regular, non-empty file without following a symlink and without
    /// blocking on a FIFO, and takes a read lease on it where the kernel grants one.
    pub fn open(path: &Path) -> Result<Source, SourceError> {
        use std::os::unix::fs::OpenOptionsExt;
        let shown = path.display().to_string();
        let lmeta = std::fs::symlink_metadata(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                SourceError::Missing {
                    path: shown.clone(),
                }
            } else {
                SourceError::Open {
                    path: shown.clone(),
                    source,
                }
            }
        })?;
        if lmeta.file_type().is_symlink() {
            return Err(SourceError::Symlink { path: shown });
        }
        if let Some(kind) = special_kind(&lmeta.file_type()) {
            return Err(SourceError::NotRegular { path: shown, kind });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| SourceError::Open {
                path: shown.clone(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| SourceError::Open {
            path: shown.clone(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(SourceError::NotRegular {
                path: shown,
                kind: "special file",
            });
        }
        if meta.len() == 0 {
            return Err(SourceError::Empty { path: shown });
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| SourceError::BadName {
                path: shown.clone(),
            })?
            .to_string();
        let file = Arc::new(file);
        let watch = Arc::new(Watch {
            file: Some(file.clone()),
            path: path.to_path_buf(),
            change: Mutex::new(None),
            leased: std::sync::atomic::AtomicBool::new(false),
        });
        lease(&watch);
        // Taken after the lease: a write that raced the open shows as a change.
        let identity = match file.metadata() {
            Ok(m) => Identity::of(&m),
            Err(_) => Identity::of(&meta),
        };
        Ok(Source {
            path: path.to_path_buf(),
            name,
            origin: Origin::File(file),
            size_bytes: identity.size_bytes,
            start_bytes: 0,
            identity,
            watch,
        })
    }

    /// An object opened by its store (`store::open_object`): `name` is the
    /// last segment of its key.
    pub fn object(name: &str, object: Object) -> Source {
        let size_bytes = object.size_bytes;
        Source {
            path: PathBuf::from(&object.url),
            name: name.to_string(),
            watch: Arc::new(Watch {
                file: None,
                path: PathBuf::from(&object.url),
                change: Mutex::new(None),
                leased: std::sync::atomic::AtomicBool::new(false),
            }),
            origin: Origin::Object(Arc::new(object)),
            size_bytes,
            start_bytes: 0,
            identity: Identity {
                dev: 0,
                ino: 0,
                size_bytes,
                mtime_ns: 0,
                ctime_ns: 0,
            },
        }
    }

    /// The same file, shipping only `len` bytes from `start` (a member of
    /// an archive) under the object name `name`. Every check of the file
    /// still covers the whole of it.
    pub fn window(mut self, name: &str, start: u64, len: u64) -> Source {
        self.name = name.to_string();
        self.start_bytes = start;
        self.size_bytes = len;
        self
    }

    /// The open file, for a file source.
    pub fn file(&self) -> Option<&Arc<File>> {
        match &self.origin {
            Origin::File(f) => Some(f),
            Origin::Object(_) => None,
        }
    }

    /// The object, for an object source.
    pub fn remote(&self) -> Option<&Arc<Object>> {
        match &self.origin {
            Origin::Object(o) => Some(o),
            Origin::File(_) => None,
        }
    }

    /// Whether the file is still the one that was opened, unchanged: no lease
    /// broken, the same size, modification and change times through the open
    /// descriptor, and the same inode at its path.
    pub fn check(&self) -> Result<(), Change> {
        if let Some(c) = self
            .watch
            .change
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(c);
        }
        // An object is read only by its ETag (a change answers 412 and is
        // noted): what was read is the version opened.
        let Origin::File(file) = &self.origin else {
            return Ok(());
        };
        let now = match file.metadata() {
            Ok(m) => Identity::of(&m),
            Err(e) => return Err(self.watch.note(format!("it cannot be examined: {e}"))),
        };
        // The path first: replacing or removing a file also moves the old
        // inode's change time, and "replaced" is what a person needs to hear.
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.ino() == self.identity.ino && m.dev() == now.dev => {}
            Ok(_) => {
                return Err(self.watch.note(format!(
                    "{} now names another file: it was replaced",
                    self.path.display()
                )));
            }
            Err(e) => {
                return Err(self.watch.note(format!(
                    "{} is gone ({e}): it was moved or removed",
                    self.path.display()
                )));
            }
        }
        match self.identity.difference(&now) {
            Some(why) => Err(self.watch.note(why)),
            None => Ok(()),
        }
    }

    /// Records a change found by reading (a part whose bytes differ from its
    /// first read); later checks report it.
    pub fn note_change(&self, why: String) -> Change {
        self.watch.note(why)
    }

    /// True while ferry holds a read lease on the file.
    pub fn leased(&self) -> bool {
        self.watch.leased.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Sources holding a lease, for the SIGIO thread.
static LEASED: Mutex<Vec<Weak<Watch>>> = Mutex::new(Vec::new());

/// Starts the thread that answers SIGIO, once; false if it cannot run (then
/// no lease is taken: SIGIO's default action would end the process).
fn sigio_thread() -> bool {
    static STARTED: OnceLock<bool> = OnceLock::new();
    *STARTED.get_or_init(|| {
        let mut signals = match signal_hook::iterator::Signals::new([libc::SIGIO]) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot take SIGIO ({e}); reading sources without leases");
                return false;
            }
        };
        std::thread::Builder::new()
            .name("ferry-leases".into())
            .spawn(move || {
                for _ in signals.forever() {
                    leases_broken();
                }
            })
            .is_ok()
    })
}

/// Takes a read lease on `watch`'s file if the kernel grants one.
fn lease(watch: &Arc<Watch>) {
    if !sigio_thread() {
        return;
    }
    // Registered (and marked leased) before the lease exists: a writer
    // arriving the moment it is granted finds the SIGIO thread ready for it.
    {
        let mut all = LEASED.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(watch));
    }
    watch
        .leased
        .store(true, std::sync::atomic::Ordering::Release);
    let Some(file) = &watch.file else {
        return;
    };
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this Watch owns (through its Arc<File>).
    let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        return;
    }
    watch
        .leased
        .store(false, std::sync::atomic::Ordering::Release);
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EAGAIN) {
        tracing::warn!(
            "{}: another process holds it open for writing, so ferry cannot take a read lease; \
             changes are still caught by its change time and by re-reading checksums",
            watch.path.display()
        );
    } else {
        // EACCES (another owner, no CAP_LEASE) or EINVAL (a filesystem without
        // leases): common and expected; the other checks hold.
        tracing::debug!("{}: no read lease ({e})", watch.path.display());
    }
}

/// SIGIO arrived: a lease is being broken. Whichever leased file now reports
/// a pending break (F_GETLEASE answers the type the breaker needs, F_UNLCK) is
/// marked changed and its lease given up, so its writer goes on at once.
fn leases_broken() {
    let all: Vec<Arc<Watch>> = LEASED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for w in all {
        if !w.leased.load(std::sync::atomic::Ordering::Acquire) {
            continue;
        }
        let Some(file) = &w.file else {
            continue;
        };
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor kept open by the Arc<File> held here.
        let now = unsafe { libc::fcntl(fd, libc::F_GETLEASE) };
        if now == libc::F_RDLCK {
            continue;
        }
        w.note(
            "a process opened it for writing or truncated it (ferry's read lease on it was broken)"
                .into(),
        );
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        w.leased.store(false, std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        (d, p)
    }

    #[test]
    fn a_rewrite_with_the_mtime_put_back_is_a_change() {
        let (_d, p) = file_with(&[1u8; 8192]);
        let s = Source::open(&p).unwrap();
        assert_eq!(s.check(), Ok(()));
        // Opening for writing breaks the lease (if one was granted); either way
        // the write and the mtime put back move the change time.
        let w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let mtime = w.metadata().unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        w.write_all_at(&[2u8; 16], 0).unwrap();
        w.set_modified(mtime).unwrap();
        let c = s.check().unwrap_err();
        assert!(c.0.contains("change time") || c.0.contains("lease"), "{c}");
        // The first reason stays, whatever is seen later.
        assert_eq!(s.check().unwrap_err(), c);
    }

    #[test]
    fn without_a_lease_the_change_time_shows_a_rewrite_with_the_mtime_put_back() {
        let (_d, p) = file_with(&[1u8; 8192]);
        // A writer that holds the file open: the kernel grants no lease.
        let w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let s = Source::open(&p).unwrap();
        assert!(!s.leased());
        assert_eq!(s.check(), Ok(()));
        let mtime = w.metadata().unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        w.write_all_at(&[2u8; 16], 0).unwrap();
        w.set_modified(mtime).unwrap();
        let c = s.check().unwrap_err();
        assert!(c.0.contains("change time"), "{c}");
    }

    #[test]
    fn a_truncation_and_a_replacement_are_changes() {
        let (_d, p) = file_with(&[1u8; 8192]);
        let s = Source::open(&p).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(100)
            .unwrap();
        let c = s.check().unwrap_err();
        assert!(
            c.0.contains("size changed from 8192 to 100") || c.0.contains("lease"),
            "{c}"
        );

        let (_d2, p2) = file_with(&[1u8; 100]);
        let s2 = Source::open(&p2).unwrap();
        let other = p2.with_file_name("other");
        std::fs::write(&other, [1u8; 100]).unwrap();
        std::fs::rename(&other, &p2).unwrap();
        let c2 = s2.check().unwrap_err();
        assert!(c2.0.contains("replaced"), "{c2}");
    }

    #[test]
    fn the_identity_says_what_moved() {
        let a = Identity {
            dev: 1,
            ino: 2,
            size_bytes: 3,
            mtime_ns: 4,
            ctime_ns: 5,
        };
        assert_eq!(a.difference(&a), None);
        assert_eq!(a.difference(&Identity { dev: 9, ..a }), None);
        assert!(
            a.difference(&Identity { ctime_ns: 6, ..a })
                .unwrap()
                .contains("change time")
        );
        assert!(
            a.difference(&Identity { size_bytes: 7, ..a })
                .unwrap()
                .contains("from 3 to 7")
        );
    }
}
