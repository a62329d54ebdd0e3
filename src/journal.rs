//! Crash-safe job state: what a restarted daemon needs to finish every upload
//! without sending again what was already sent.
//!
//! Promises: a job's record (`STATE_DIR/jobs/<name>.json`) holds the file's
//! identity (device, inode, size, mtime, ctime), the part plan, and per
//! destination where its upload lives (endpoint, region and bucket, or
//! directory: never a secret), the object key, the upload id and every
//! finished part's id and CRC32C. It is written temp file ->
//! fsync -> rename -> fsync of the directory, with a format version, so after a
//! crash it is either the old record or the new one, never a torn one. A record
//! with an unknown version, or that does not parse, is set aside (renamed
//! `.bad`) and its job starts over: never trusted, never silently deleted. A
//! version 1 record (before ctime and addresses were kept) is read; its job
//! starts over, since it cannot show that the file is unchanged.
//!
//! The state directory may be removed and made again by hand while the daemon
//! runs: the `jobs/` directory is made again on the next write.
//!
//! Design choice: parts finish far more often than a record can be rewritten
//! (6,400 parts for a 400 GiB image). The record in memory is the truth; it is
//! written at most every `FLUSH_EVERY` and at once when an upload starts or
//! completes. A crash loses at most that long of part receipts, which are then
//! sent again: resending a part is safe, losing a record is not.

use crate::error::Class;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::store::{Address, PartReceipt};

/// 3: `import` per destination.
pub const FORMAT_VERSION: u32 = 3;
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl JournalError {
    /// [`Class::Retry`]: a running daemon takes no new files until the state
    /// directory takes writes again (fatal only at start).
    pub fn class(&self) -> Class {
        Class::Retry
    }
}

impl JournalError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
        move |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DestinationRecord {
    pub url: String,
    /// Where the upload lives (version 2 on).
    #[serde(default)]
    pub address: Option<Address>,
    /// The object key the upload was begun for (version 2 on).
    #[serde(default)]
    pub key: Option<String>,
    pub upload_id: Option<String>,
    pub parts: Vec<PartReceipt>,
    pub verified: bool,
    /// The import of the verified object as a custom image (version 3 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportRecord>,
}

/// Where an import stands, so that a restarted daemon waits for the same
/// image and never creates a second one: the CreateImage is sent again only
/// with the same retry token and the same body, which OCI answers with the
/// image it made the first time.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImportRecord {
    /// CreateImage's `opc-retry-token`.
    pub retry_token: String,
    /// When the import began (RFC 3339): its timeout runs from here.
    pub started_at: String,
    /// The pre-authenticated request made for it, until it is deleted.
    #[serde(default)]
    pub par_id: Option<String>,
    /// Its URL: a credential (read access to the object) while it lives.
    #[serde(default)]
    pub par_url: Option<String>,
    /// The CreateImage body as first built.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    #[serde(default)]
    pub image_id: Option<String>,
    #[serde(default)]
    pub work_request_id: Option<String>,
    /// The image's lifecycle state when last seen.
    #[serde(default)]
    pub state: Option<String>,
    /// The import ended well and the manifest says so: nothing is left to do.
    #[serde(default)]
    pub done: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    pub format_version: u32,
    pub name: String,
    pub dev: u64,
    pub ino: u64,
    pub size_bytes: u64,
    pub mtime_ns: i128,
    /// The change time when the job began (version 2 on).
    #[serde(default)]
    pub ctime_ns: Option<i128>,
    pub part_size_bytes: u64,
    pub part_count: u32,
    pub destinations: BTreeMap<String, DestinationRecord>,
}

/// The directory of job records.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let dir = state_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(JournalError::io(&dir))?;
        // A leftover temp file is an interrupted write: the record it would have
        // replaced is still there.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Journal { dir })
    }

    /// Records are named by the encoded job name, shortened with a CRC32C of the
    /// name when that would not fit a file name; the name itself is inside.
    fn path(&self, name: &str) -> PathBuf {
        let mut e = encode(name);
        if e.len() > 180 {
            e.truncate(120);
            e = format!("{e}-{:08x}", crc32c::crc32c(name.as_bytes()));
        }
        self.dir.join(format!("{e}.json"))
    }

    /// Checks that the state directory takes writes (for readiness and
    /// start-up), making `jobs/` again if it was removed.
    pub fn writable(&self) -> Result<(), JournalError> {
        self.ensure_dir()?;
        let probe = self.dir.join(".probe.tmp");
        let r = std::fs::write(&probe, b"ok").map_err(JournalError::io(&probe));
        let _ = std::fs::remove_file(&probe);
        r
    }

    /// Makes `jobs/` again if it is gone (the state directory was removed and
    /// made again by hand); says so once each time.
    fn ensure_dir(&self) -> Result<(), JournalError> {
        if self.dir.is_dir() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).map_err(JournalError::io(&self.dir))?;
        tracing::warn!(
            "the journal directory {} was gone; recreated it (records of jobs in flight are written again as they go on)",
            self.dir.display()
        );
        Ok(())
    }

    /// The record of job `name`, if there is a usable one.
    pub fn load(&self, name: &str) -> Option<JobRecord> {
        let path = self.path(name);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<JobRecord>(&bytes) {
            Ok(r) if (1..=FORMAT_VERSION).contains(&r.format_version) && r.name == name => Some(r),
            other => {
                let why = match other {
                    Ok(r) => format!("format version {}", r.format_version),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(
                    "journal record {} is unusable ({why}); setting it aside as .bad and starting the job over",
                    path.display()
                );
                let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                None
            }
        }
    }

    /// Every job name with a record (the name is read from the record).
    pub fn names(&self) -> Vec<String> {
        #[derive(Deserialize)]
        struct Name {
            name: String,
        }
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if !e.file_name().to_string_lossy().ends_with(".json") {
                    continue;
                }
                let name = std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Name>(&b).ok())
                    .map(|n| n.name)
                    .or_else(|| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        decode(n.strip_suffix(".json")?)
                    });
                if let Some(n) = name {
                    out.push(n);
                }
            }
        }
        out.sort();
        out
    }

    pub fn save(&self, record: &JobRecord) -> Result<(), JournalError> {
        self.ensure_dir()?;
        let body = serde_json::to_vec(record).expect("a job record always serializes");
        write_whole(&self.dir, &self.path(&record.name), &body)
    }

    /// `STATE_DIR/last-success.json`: when each destination last verified an
    /// object, so `ferry_last_success_timestamp_seconds` survives a restart.
    fn last_success_path(&self) -> PathBuf {
        let state_dir = self.dir.parent().unwrap_or(&self.dir);
        state_dir.join(LAST_SUCCESS_FILE)
    }

    /// Each destination's last success (Unix seconds); empty when none was
    /// kept, or the file is unreadable (said in the log: it only feeds a metric).
    pub fn last_successes(&self) -> BTreeMap<String, i64> {
        let path = self.last_success_path();
        let Ok(bytes) = std::fs::read(&path) else {
            return BTreeMap::new();
        };
        match serde_json::from_slice::<LastSuccesses>(&bytes) {
            Ok(l) if l.format_version == LAST_SUCCESS_VERSION => l.destinations,
            other => {
                let why = match other {
                    Ok(l) => format!("format version {}", l.format_version),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(
                    "{} is unusable ({why}); last-success times start again from the next success",
                    path.display()
                );
                BTreeMap::new()
            }
        }
    }

    pub fn save_last_successes(&self, times: &[(String, i64)]) -> Result<(), JournalError> {
        let path = self.last_success_path();
        let body = serde_json::to_vec_pretty(&LastSuccesses {
            format_version: LAST_SUCCESS_VERSION,
            destinations: times.iter().cloned().collect(),
        })
        .expect("a map of times always serializes");
        write_whole(path.parent().unwrap_or(&self.dir), &path, &body)
    }

    pub fn remove(&self, name: &str) -> Result<(), JournalError> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(JournalError::io(&path)(e)),
            _ => std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(JournalError::io(&self.dir)),
        }
    }
}

const LAST_SUCCESS_FILE: &str = "last-success.json";
const LAST_SUCCESS_VERSION: u32 = 1;

/// `last-success.json`: each destination's last verified object, Unix seconds.
#[derive(Serialize, Deserialize)]
struct LastSuccesses {
    format_version: u32,
    destinations: BTreeMap<String, i64>,
}

/// Writes `path` whole or not at all: a temp file, fsync, rename, fsync of
/// `dir`. Readable by ferry's user only: a record may hold an import's
/// pre-authenticated request, read access to the image while it lives.
fn write_whole(dir: &Path, path: &Path, body: &[u8]) -> Result<(), JournalError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(JournalError::io(&tmp))?;
    // A temp file left by an older ferry keeps its mode through open().
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(JournalError::io(&tmp))?;
    f.write_all(body).map_err(JournalError::io(&tmp))?;
    f.sync_all().map_err(JournalError::io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(JournalError::io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(JournalError::io(dir))
}

/// File names may hold any byte but '/'; records are named by a reversible
/// encoding that keeps them plain ASCII.
fn encode(name: &str) -> String {
    let mut s = percent_encoding::utf8_percent_encode(name, RECORD_NAME).to_string();
    // Never a hidden file, never "." or "..".
    if s.starts_with('.') {
        s.replace_range(0..1, "%2E");
    }
    s
}

/// What stays as it is in a record's file name: letters, digits, '-', '_', '.'.
const RECORD_NAME: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

/// The name a record's file stands for; `None` for a file ferry did not name
/// (not the encoding of any name).
fn decode(s: &str) -> Option<String> {
    let name = percent_encoding::percent_decode_str(s).decode_utf8().ok()?;
    (encode(&name) == s).then(|| name.into_owned())
}

/// A job's record kept in memory and written behind, as the module doc says.
pub struct JobJournal {
    journal: Journal,
    state: Mutex<(JobRecord, bool, Instant)>,
}

impl JobJournal {
    pub fn new(journal: Journal, record: JobRecord) -> Arc<JobJournal> {
        Arc::new(JobJournal {
            journal,
            state: Mutex::new((record, true, Instant::now() - FLUSH_EVERY)),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut JobRecord) -> R) -> R {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        f(&mut g.0)
    }

    pub fn record(&self) -> JobRecord {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Writes the record if it changed (now, or only if `FLUSH_EVERY` passed).
    pub fn flush(&self, now: bool) -> Result<(), JournalError> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !g.1 || (!now && g.2.elapsed() < FLUSH_EVERY) {
            return Ok(());
        }
        self.journal.save(&g.0)?;
        g.1 = false;
        g.2 = Instant::now();
        Ok(())
    }

    fn flush_logged(&self, now: bool) {
        if let Err(e) = self.flush(now) {
            tracing::error!("{e}; the job goes on, but a crash now would resend more parts");
        }
    }

    pub fn remove(&self) -> Result<(), JournalError> {
        let name = self.record().name;
        self.journal.remove(&name)
    }

    /// Records where `destination`'s import stands, at once: an image OCID
    /// must be on disk before anything else happens.
    pub fn set_import(&self, destination: &str, import: &ImportRecord) -> Result<(), String> {
        let found = self.with(|r| match r.destinations.get_mut(destination) {
            Some(d) => {
                d.import = Some(import.clone());
                true
            }
            None => false,
        });
        if !found {
            return Err(format!(
                "the job's record has no destination {destination} to keep its import in"
            ));
        }
        self.flush(true).map_err(|e| e.to_string())
    }
}

impl crate::events::Observer for JobJournal {
    fn upload_started(&self, destination: &str, upload_id: &str) {
        self.with(|r| {
            if let Some(d) = r.destinations.get_mut(destination)
                && d.upload_id.as_deref() != Some(upload_id)
            {
                d.upload_id = Some(upload_id.to_string());
                d.parts.clear();
            }
        });
        self.flush_logged(true);
    }

    fn part_done(&self, destination: &str, receipt: &PartReceipt, _took: std::time::Duration) {
        self.with(|r| {
            if let Some(d) = r.destinations.get_mut(destination) {
                d.parts.push(receipt.clone());
            }
        });
        self.flush_logged(false);
    }

    fn upload_restarted(&self, destination: &str) {
        self.with(|r| {
            if let Some(d) = r.destinations.get_mut(destination) {
                d.upload_id = None;
                d.parts.clear();
            }
        });
        self.flush_logged(true);
    }

    fn verified(&self, destination: &str, _manifest: &crate::manifest::Manifest) {
        self.with(|r| {
            if let Some(d) = r.destinations.get_mut(destination) {
                d.verified = true;
            }
        });
        self.flush_logged(true);
    }

    fn upload_aborted(&self, destination: &str) {
        self.upload_restarted(destination);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_successes_round_trip_and_an_unknown_version_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.last_successes().is_empty());
        j.save_last_successes(&[("ashburn".into(), 1_800_000_000), ("phoenix".into(), 7)])
            .unwrap();
        let got = j.last_successes();
        assert_eq!(got.get("ashburn"), Some(&1_800_000_000));
        assert_eq!(got.get("phoenix"), Some(&7));
        let path = dir.path().join(LAST_SUCCESS_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("\"format_version\": 1", "\"format_version\": 9"),
        )
        .unwrap();
        assert!(j.last_successes().is_empty());
        std::fs::write(&path, "{not json").unwrap();
        assert!(j.last_successes().is_empty());
    }

    fn record(name: &str) -> JobRecord {
        JobRecord {
            format_version: FORMAT_VERSION,
            name: name.into(),
            dev: 1,
            ino: 2,
            size_bytes: 3,
            mtime_ns: 4,
            ctime_ns: Some(6),
            part_size_bytes: 5 << 20,
            part_count: 1,
            destinations: BTreeMap::from([(
                "a".to_string(),
                DestinationRecord {
                    url: "file:///x/".into(),
                    address: Some(Address::File { dir: "/x".into() }),
                    key: Some("/x/n".into()),
                    upload_id: Some("u".into()),
                    parts: vec![PartReceipt {
                        index: 0,
                        part_id: "etag".into(),
                        size_bytes: 3,
                        crc32c: 7,
                    }],
                    verified: false,
                    import: None,
                },
            )]),
        }
    }

    #[test]
    fn only_names_ferry_wrote_decode() {
        for name in ["disk.qcow2", ".hidden", "a b\nc", "ü%41"] {
            assert_eq!(decode(&encode(name)).as_deref(), Some(name));
        }
        // Not the encoding of any name: a bad escape, a lowercase one, a byte
        // ferry would have escaped, a leading dot.
        for foreign in ["a%zz", "a%2f", "a b", ".x", "%FF"] {
            assert_eq!(decode(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn records_round_trip_for_any_name() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let long = "x".repeat(255);
        let all = [
            "disk.qcow2",
            ".hidden",
            "a b\nc",
            "..",
            "ü%41",
            long.as_str(),
        ];
        for name in all {
            j.save(&record(name)).unwrap();
            assert_eq!(j.load(name), Some(record(name)), "{name:?}");
        }
        let mut names = j.names();
        names.sort();
        let mut want: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(names, want);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(j.path("disk.qcow2"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "records are ferry's alone");
        j.remove("disk.qcow2").unwrap();
        assert_eq!(j.load("disk.qcow2"), None);
    }

    #[test]
    fn a_version_1_record_is_read_without_ctime_or_addresses() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        std::fs::write(
            d.path().join("jobs/old.json"),
            br#"{"format_version":1,"name":"old","dev":1,"ino":2,"size_bytes":3,"mtime_ns":4,
                "part_size_bytes":5242880,"part_count":1,"destinations":{"a":{"url":"s3://b/",
                "upload_id":"u","parts":[],"verified":false}}}"#,
        )
        .unwrap();
        let r = j.load("old").expect("version 1 is read");
        assert_eq!(r.ctime_ns, None);
        assert_eq!(r.destinations["a"].address, None);
        assert_eq!(r.destinations["a"].upload_id.as_deref(), Some("u"));
    }

    #[test]
    fn a_removed_jobs_directory_is_made_again() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        std::fs::remove_dir_all(d.path()).unwrap();
        std::fs::create_dir(d.path()).unwrap();
        j.writable().unwrap();
        j.save(&record("x")).unwrap();
        assert_eq!(j.load("x"), Some(record("x")));
    }

    #[test]
    fn a_damaged_or_foreign_record_is_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        std::fs::write(
            d.path().join("jobs/x.json"),
            b"{\"format_version\": 1, \"na",
        )
        .unwrap();
        assert_eq!(j.load("x"), None);
        assert!(d.path().join("jobs/x.json.bad").exists());
        let mut r = record("y");
        r.format_version = 99;
        j.save(&r).unwrap();
        assert_eq!(j.load("y"), None);
        assert!(d.path().join("jobs/y.json.bad").exists());
    }
}
