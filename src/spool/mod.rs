//! The spool: which files are complete, claiming them exactly once, and where
//! they go when their job ends.
//!
//! Promises (the spool contract of DESIGN.md):
//! - a file is taken when it was renamed into place, when `X.ready` exists, or
//!   once its size and mtime have been still for `settle`;
//! - names starting with `.` or ending in `.partial`, `.tmp`, `.ready`,
//!   `.meta.json` are never images;
//! - only regular files are taken; a symlink, FIFO, socket, device or directory is
//!   logged once and left where it is;
//! - a file is claimed by an atomic rename (with its sidecar) into
//!   `.ferry/active/`, then opened without following symlinks and checked to be
//!   the same device and inode that was seen: a second daemon or a restart never
//!   takes it twice, and a file swapped in during the claim is refused;
//! - a file leaves `active/` only to `done/` (or is deleted) after every
//!   destination verified it, or to `failed/` with `X.error.json`.
//!
//! - ferry's own directories (the spool itself and `.ferry/{active,done,failed}`)
//!   are made again when they disappear ([`Spool::ensure`], before every scan),
//!   and the daemon is told, so it can watch the new spool directory.
//!
//! Design choice: inotify (through `notify`) is a hint, not the truth. Events
//! only say "look now" and "this name was renamed in"; the spool is rescanned on
//! every tick (a directory listing is cheap next to an upload), so an overflowed
//! queue or a missed event costs at most one tick.

use crate::error::Class;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::image::sidecar::SUFFIX as SIDECAR_SUFFIX;

mod watch;
pub use watch::{Hint, watch};
pub const READY_SUFFIX: &str = ".ready";
pub const ERROR_SUFFIX: &str = ".error.json";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SpoolError {
    /// [`Class::Retry`]: the daemon says so on `/readyz` and looks again
    /// every second (a directory removed, a disk full).
    pub fn class(&self) -> Class {
        Class::Retry
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the QCOW2 that a claimed file `name` of the spool `dir` is
/// converted into lives (`policy.convert`): `.ferry/convert/NAME.qcow2`,
/// with its `.partial` and `.conversion.json` beside it.
pub fn conversion_of(dir: &Path, name: &OsStr) -> PathBuf {
    let mut file = name.to_os_string();
    file.push(".qcow2");
    dir.join(".ferry").join("convert").join(file)
}

/// Removes what a conversion left of claimed files that are no longer in
/// `active/` (their jobs ended, or ended while ferry was down).
pub fn sweep_conversions(dir: &Path, active: &[OsString]) {
    let convert = dir.join(".ferry").join("convert");
    let Ok(entries) = std::fs::read_dir(&convert) else {
        return;
    };
    // Bounded: one pass over the directory.
    for e in entries.flatten() {
        let name = e.file_name();
        let live = active.iter().any(|a| {
            CONVERSION_SUFFIXES.iter().any(|suffix| {
                let mut kept = a.clone();
                kept.push(".qcow2");
                kept.push(suffix);
                kept == name
            })
        });
        if !live {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The files of a conversion `OUT`: itself, while it is written, its
/// record, while that is written.
const CONVERSION_SUFFIXES: [&str; 4] = [
    "",
    ".partial",
    ".conversion.json",
    ".conversion.json.partial",
];

/// Removes the conversion of the claimed file `name`, once its job ended
/// for good.
pub fn remove_conversion(dir: &Path, name: &OsStr) {
    let out = conversion_of(dir, name);
    for suffix in CONVERSION_SUFFIXES {
        let mut p = out.as_os_str().to_os_string();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) if suffix.is_empty() => {
                tracing::info!("removed the conversion {}", out.display())
            }
            _ => {}
        }
    }
}

/// True for names that are never images (in-progress writes, markers, sidecars).
pub fn ignored(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.is_empty()
        || b[0] == b'.'
        || [
            ".partial",
            ".tmp",
            READY_SUFFIX,
            SIDECAR_SUFFIX,
            ERROR_SUFFIX,
        ]
        .iter()
        .any(|s| b.ends_with(s.as_bytes()))
}

fn with_suffix(name: &OsStr, suffix: &str) -> OsString {
    let mut n = name.to_os_string();
    n.push(suffix);
    n
}

/// A file ready to be claimed.
#[derive(Debug, Clone)]
pub struct Ready {
    pub name: OsString,
    pub dev: u64,
    pub ino: u64,
    pub size_bytes: u64,
}

#[derive(Debug)]
struct Seen {
    size: u64,
    mtime: SystemTime,
    ino: u64,
    still_since: Instant,
    first_seen: Instant,
    /// Complete at the last scan: renamed in, marked with `X.ready`, or
    /// still for `settle_secs` (what `/status` shows between scans).
    ready: bool,
}

/// A claimed file in `active/`.
#[derive(Debug)]
pub struct Claimed {
    pub name: OsString,
    pub path: PathBuf,
    pub sidecar: Option<PathBuf>,
    /// The device and inode of the file this claim took. The job opens
    /// `path` once and ships only that file: another one renamed over it
    /// after the claim is refused, never inspected or read. `None` for a job
    /// found in `active/` at start: its journal record then says which file
    /// it was.
    pub file_id: Option<(u64, u64)>,
}

/// Why a claim did not happen.
#[derive(Debug)]
pub enum ClaimOutcome {
    Claimed(Claimed),
    /// Gone or busy: try again on a later tick.
    NotNow,
    /// Moved into `active/` but not the file that was seen: fail it.
    Replaced(Claimed, String),
}

/// What [`Spool::waiting_list`] says of a file that is complete, not claimed yet.
pub const READY: &str = "ready";

/// What `failed/X.error.json` says.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorReport {
    /// 2: `outcome` added and `failed_at` named `at` (1 had neither field).
    pub format_version: u32,
    pub file: String,
    /// "refused" (the image, its sidecar or the configuration is at fault:
    /// shipping it again as it is gives the same answer) or "failed"
    /// (something went wrong on the way), the words of `ferry_jobs_total`.
    pub outcome: &'static str,
    /// When the job ended so.
    pub at: String,
    pub reason: String,
    pub destinations: Vec<DestinationError>,
    pub what_to_do: String,
    /// The inspection report, when the image was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspection: Option<crate::image::Report>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationError {
    pub destination: String,
    pub url: String,
    pub error: String,
}

pub struct Spool {
    dir: PathBuf,
    /// Device and inode of the spool directory when last seen.
    dir_id: Option<(u64, u64)>,
    active: PathBuf,
    done: PathBuf,
    failed: PathBuf,
    settle: Duration,
    seen: HashMap<OsString, Seen>,
    renamed_in: HashSet<OsString>,
    refused: HashSet<(OsString, u64)>,
}

impl Spool {
    pub fn open(dir: &Path, settle: Duration) -> Result<Spool, SpoolError> {
        let base = dir.join(".ferry");
        let (active, done, failed) = (base.join("active"), base.join("done"), base.join("failed"));
        for d in [dir, &active, &done, &failed] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            dir_id: dir_id(dir),
            active,
            done,
            failed,
            settle,
            seen: HashMap::new(),
            renamed_in: HashSet::new(),
            refused: HashSet::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// `.ferry/`, ferry's own part of the spool.
    pub fn ferry_dir(&self) -> &Path {
        self.active.parent().unwrap_or(&self.dir)
    }
    pub fn active_dir(&self) -> &Path {
        &self.active
    }
    pub fn done_dir(&self) -> &Path {
        &self.done
    }
    pub fn failed_dir(&self) -> &Path {
        &self.failed
    }

    /// Makes ferry's directories again if any disappeared (someone removed
    /// the spool, or its `.ferry/`). Returns what was made again, for the log,
    /// or `None` when all was in place. When the spool directory itself is a
    /// new one, the caller must watch it again.
    pub fn ensure(&mut self) -> Result<Option<String>, SpoolError> {
        let now = dir_id(&self.dir);
        let mut made = Vec::new();
        if now.is_none() {
            made.push(self.dir.display().to_string());
        } else if now != self.dir_id {
            made.push(format!("{} (a new directory)", self.dir.display()));
        }
        for d in [&self.dir, &self.active, &self.done, &self.failed] {
            if !d.is_dir() {
                std::fs::create_dir_all(d).map_err(io(d))?;
                if d != &self.dir {
                    made.push(d.display().to_string());
                }
            }
        }
        self.dir_id = dir_id(&self.dir);
        if made.is_empty() {
            return Ok(None);
        }
        // Whatever was seen in the old directory is gone with it.
        self.seen.clear();
        self.renamed_in.clear();
        Ok(Some(made.join(", ")))
    }

    /// inotify said `name` was renamed into the spool: it is complete.
    pub fn note_renamed_in(&mut self, name: &OsStr) {
        if !ignored(name) {
            self.renamed_in.insert(name.to_os_string());
        }
    }

    /// Lists the spool; returns the files ready to claim, first come first.
    pub fn scan(&mut self, now: Instant) -> Result<Vec<Ready>, SpoolError> {
        let entries = std::fs::read_dir(&self.dir).map_err(io(&self.dir))?;
        let mut present = HashSet::new();
        let mut ready = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            if ignored(&name) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let ft = meta.file_type();
            if !ft.is_file() {
                let kind = if ft.is_symlink() {
                    "a symbolic link"
                } else if ft.is_dir() {
                    "a directory"
                } else if ft.is_fifo() {
                    "a FIFO"
                } else if ft.is_socket() {
                    "a socket"
                } else {
                    "a device"
                };
                if self.refused.insert((name.clone(), meta.ino())) {
                    tracing::warn!(
                        "spool: refusing {:?}: it is {kind}, not a regular file; ferry leaves it where it is",
                        name
                    );
                }
                continue;
            }
            present.insert(name.clone());
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let old_enough = SystemTime::now()
                .duration_since(mtime)
                .is_ok_and(|age| age >= self.settle);
            let marked = self.renamed_in.contains(&name)
                || std::fs::symlink_metadata(self.dir.join(with_suffix(&name, READY_SUFFIX)))
                    .is_ok();
            let settle = self.settle;
            let seen = self.seen.entry(name.clone()).or_insert_with(|| Seen {
                size: meta.len(),
                mtime,
                ino: meta.ino(),
                still_since: if old_enough {
                    now.checked_sub(self.settle).unwrap_or(now)
                } else {
                    now
                },
                first_seen: now,
                ready: false,
            });
            if seen.size != meta.len() || seen.mtime != mtime || seen.ino != meta.ino() {
                seen.size = meta.len();
                seen.mtime = mtime;
                seen.ino = meta.ino();
                seen.still_since = now;
            }
            seen.ready = marked || now.duration_since(seen.still_since) >= settle;
            if seen.ready {
                ready.push((
                    seen.first_seen,
                    Ready {
                        name,
                        dev: meta.dev(),
                        ino: meta.ino(),
                        size_bytes: meta.len(),
                    },
                ));
            }
        }
        self.seen.retain(|n, _| present.contains(n));
        self.renamed_in.retain(|n| present.contains(n));
        ready.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
        Ok(ready.into_iter().map(|(_, r)| r).collect())
    }

    /// Images waiting in the spool (count, bytes), ready or not.
    pub fn waiting(&self) -> (u64, u64) {
        (
            self.seen.len() as u64,
            self.seen.values().map(|s| s.size).sum(),
        )
    }

    /// The images waiting, for `/status`, as the last scan found them: those
    /// still settling say so and for how long; the others say [`READY`], for
    /// the daemon to say why it has not claimed them.
    pub fn waiting_list(&self, now: Instant) -> Vec<crate::status::Waiting> {
        let mut v: Vec<(&Instant, crate::status::Waiting)> = self
            .seen
            .iter()
            .map(|(n, s)| {
                let why = if s.ready {
                    READY.to_string()
                } else {
                    let to_go = self.settle.saturating_sub(now.duration_since(s.still_since));
                    format!(
                        "settling: taken once its size and modification time have been still for {}s ({}s to go), or at once when {} appears",
                        self.settle.as_secs(),
                        to_go.as_secs_f64().ceil(),
                        with_suffix(n, READY_SUFFIX).to_string_lossy()
                    )
                };
                (
                    &s.first_seen,
                    crate::status::Waiting {
                        file: n.to_string_lossy().into_owned(),
                        bytes: s.size,
                        why,
                    },
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.into_iter().map(|(_, w)| w).collect()
    }

    /// Claims a ready file by renaming it (and its sidecar) into `active/`.
    pub fn claim(&mut self, r: &Ready) -> Result<ClaimOutcome, SpoolError> {
        let src = self.dir.join(&r.name);
        let dst = self.active.join(&r.name);
        if std::fs::symlink_metadata(&dst).is_ok() {
            // A job of the same name is still in flight: wait for it.
            return Ok(ClaimOutcome::NotNow);
        }
        match std::fs::rename(&src, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Gone (taken by someone else), or active/ itself is gone: the
                // latter is an error to report, not a file to wait for.
                if !self.active.is_dir() {
                    return Err(io(&self.active)(e));
                }
                return Ok(ClaimOutcome::NotNow);
            }
            Err(e) => return Err(io(&src)(e)),
        }
        self.seen.remove(&r.name);
        self.renamed_in.remove(&r.name);
        let side_src = self.dir.join(with_suffix(&r.name, SIDECAR_SUFFIX));
        let side_dst = self.active.join(with_suffix(&r.name, SIDECAR_SUFFIX));
        let sidecar = match std::fs::rename(&side_src, &side_dst) {
            Ok(()) => Some(side_dst),
            Err(_) => None,
        };
        let _ = std::fs::remove_file(self.dir.join(with_suffix(&r.name, READY_SUFFIX)));
        sync_dir(&self.active);
        sync_dir(&self.dir);
        let claimed = Claimed {
            name: r.name.clone(),
            path: dst.clone(),
            sidecar,
            file_id: Some((r.dev, r.ino)),
        };
        match std::fs::symlink_metadata(&dst) {
            Ok(m) if m.file_type().is_file() && m.dev() == r.dev && m.ino() == r.ino => {
                Ok(ClaimOutcome::Claimed(claimed))
            }
            Ok(m) if !m.file_type().is_file() => Ok(ClaimOutcome::Replaced(
                claimed,
                "the file was replaced by something that is not a regular file while it was being claimed".into(),
            )),
            _ => Ok(ClaimOutcome::Replaced(
                claimed,
                "the file was replaced by another one while it was being claimed".into(),
            )),
        }
    }

    /// Jobs left in `active/` by an earlier run (images, not sidecars).
    pub fn active_jobs(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = std::fs::read_dir(&self.active)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| !n.as_bytes().ends_with(SIDECAR_SUFFIX.as_bytes()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The claimed file for a job found in `active/`.
    pub fn reclaim(&self, name: &OsStr) -> Claimed {
        let side = self.active.join(with_suffix(name, SIDECAR_SUFFIX));
        Claimed {
            name: name.to_os_string(),
            path: self.active.join(name),
            sidecar: side.exists().then_some(side),
            file_id: None,
        }
    }

    /// Every destination verified: delete, or move to `done/`.
    /// Returns whether an `X.error.json` of an earlier attempt was removed
    /// from `failed/`: the file was put back and has now shipped, so the
    /// report no longer describes anything there.
    pub fn finish_done(&self, c: &Claimed, delete: bool) -> Result<bool, SpoolError> {
        if delete {
            remove_if_present(&c.path)?;
            if let Some(s) = &c.sidecar {
                remove_if_present(s)?;
            }
        } else {
            let to = self.done.join(&c.name);
            std::fs::rename(&c.path, &to).map_err(io(&c.path))?;
            if let Some(s) = &c.sidecar {
                let _ = std::fs::rename(s, self.done.join(with_suffix(&c.name, SIDECAR_SUFFIX)));
            }
            sync_dir(&self.done);
        }
        sync_dir(&self.active);
        // A copy still in failed/ keeps its report beside it.
        let stale = self.failed.join(with_suffix(&c.name, ERROR_SUFFIX));
        let resolved = std::fs::symlink_metadata(self.failed.join(&c.name)).is_err()
            && std::fs::remove_file(&stale).is_ok();
        if resolved {
            sync_dir(&self.failed);
        }
        Ok(resolved)
    }

    /// Refused or failed: move to `failed/` and write `X.error.json` beside it.
    pub fn finish_failed(&self, c: &Claimed, report: &ErrorReport) -> Result<(), SpoolError> {
        let body = serde_json::to_vec_pretty(report).expect("an error report always serializes");
        let report_path = self.failed.join(with_suffix(&c.name, ERROR_SUFFIX));
        let tmp = self
            .failed
            .join(with_suffix(&with_suffix(&c.name, ERROR_SUFFIX), ".tmp"));
        std::fs::write(&tmp, &body).map_err(io(&tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &report_path).map_err(io(&report_path))?;
        if std::fs::symlink_metadata(&c.path).is_ok() {
            std::fs::rename(&c.path, self.failed.join(&c.name)).map_err(io(&c.path))?;
        }
        if let Some(s) = &c.sidecar {
            let _ = std::fs::rename(s, self.failed.join(with_suffix(&c.name, SIDECAR_SUFFIX)));
        }
        sync_dir(&self.failed);
        sync_dir(&self.active);
        Ok(())
    }
}

fn dir_id(d: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(d)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

fn remove_if_present(p: &Path) -> Result<(), SpoolError> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(p)(e)),
        _ => Ok(()),
    }
}

fn sync_dir(d: &Path) {
    if let Ok(f) = std::fs::File::open(d) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_never_images() {
        for n in [
            ".x",
            "a.partial",
            "a.tmp",
            "a.ready",
            "a.meta.json",
            "a.error.json",
            "",
        ] {
            assert!(ignored(OsStr::new(n)), "{n}");
        }
        for n in ["disk.qcow2", "a.vmdk", "partial", "x.oci"] {
            assert!(!ignored(OsStr::new(n)), "{n}");
        }
    }

    #[test]
    fn ready_by_marker_by_rename_or_by_settling() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), Duration::from_secs(30)).unwrap();
        let t0 = Instant::now();
        std::fs::write(d.path().join("a"), b"1").unwrap();
        std::fs::write(d.path().join("b"), b"2").unwrap();
        std::fs::write(d.path().join("c"), b"3").unwrap();
        std::fs::write(d.path().join("b.ready"), b"").unwrap();
        s.note_renamed_in(OsStr::new("c"));
        let names: Vec<OsString> = s.scan(t0).unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, vec![OsString::from("b"), OsString::from("c")]);
        // "a" settles after 30 s of stillness
        let later = t0 + Duration::from_secs(31);
        let names: Vec<OsString> = s.scan(later).unwrap().into_iter().map(|r| r.name).collect();
        assert!(names.contains(&OsString::from("a")));
    }

    #[test]
    fn a_growing_file_is_not_ready() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), Duration::from_secs(2)).unwrap();
        let t0 = Instant::now();
        std::fs::write(d.path().join("g"), b"1").unwrap();
        assert!(s.scan(t0).unwrap().is_empty());
        std::fs::write(d.path().join("g"), b"12").unwrap();
        assert!(s.scan(t0 + Duration::from_secs(3)).unwrap().is_empty());
        assert_eq!(s.scan(t0 + Duration::from_secs(6)).unwrap().len(), 1);
    }

    #[test]
    fn a_removed_spool_is_made_again_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("spool");
        let mut s = Spool::open(&root, Duration::from_secs(0)).unwrap();
        assert_eq!(s.ensure().unwrap(), None);
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::create_dir(&root).unwrap();
        // (The new directory may even have the old one's inode number.)
        let made = s.ensure().unwrap().expect("something was made again");
        assert!(made.contains("active"), "{made}");
        assert!(s.active_dir().is_dir() && s.done_dir().is_dir() && s.failed_dir().is_dir());
        std::fs::write(root.join("img"), b"x").unwrap();
        let r = s.scan(Instant::now()).unwrap();
        assert!(matches!(s.claim(&r[0]).unwrap(), ClaimOutcome::Claimed(_)));
        // Gone entirely: made again too.
        std::fs::remove_dir_all(&root).unwrap();
        assert!(s.ensure().unwrap().is_some());
        assert!(s.active_dir().is_dir());
    }

    #[test]
    fn claim_moves_file_and_sidecar_and_only_once() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), Duration::from_secs(0)).unwrap();
        std::fs::write(d.path().join("img"), b"data").unwrap();
        std::fs::write(d.path().join("img.meta.json"), b"{}").unwrap();
        let r = s.scan(Instant::now()).unwrap();
        assert_eq!(r.len(), 1);
        let ClaimOutcome::Claimed(c) = s.claim(&r[0]).unwrap() else {
            panic!("not claimed")
        };
        assert!(c.path.exists() && c.sidecar.as_ref().unwrap().exists());
        assert!(!d.path().join("img").exists());
        assert!(matches!(s.claim(&r[0]).unwrap(), ClaimOutcome::NotNow));
        s.finish_done(&c, false).unwrap();
        assert!(s.done_dir().join("img").exists());
        assert!(s.done_dir().join("img.meta.json").exists());
    }

    /// A shipped file's old report leaves failed/, unless a copy of the file
    /// it describes is still there.
    #[test]
    fn a_stale_error_report_goes_unless_its_file_is_still_there() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), Duration::from_secs(0)).unwrap();
        let ship = |s: &mut Spool, name: &str| {
            std::fs::write(d.path().join(name), b"data").unwrap();
            let r = s.scan(Instant::now()).unwrap();
            let ClaimOutcome::Claimed(c) = s.claim(&r[0]).unwrap() else {
                panic!("not claimed")
            };
            s.finish_done(&c, true).unwrap()
        };
        let failed = s.failed_dir().to_path_buf();
        std::fs::write(failed.join("put-back.error.json"), b"{}").unwrap();
        assert!(ship(&mut s, "put-back"));
        assert!(!failed.join("put-back.error.json").exists());
        std::fs::write(failed.join("copied.error.json"), b"{}").unwrap();
        std::fs::write(failed.join("copied"), b"old").unwrap();
        assert!(!ship(&mut s, "copied"));
        assert!(failed.join("copied.error.json").exists());
        assert!(!ship(&mut s, "never-failed"));
    }
}
