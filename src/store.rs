//! Destinations: where parts go, as an upload that can be resumed by its id.
//!
//! Promises: every destination offers the same four steps, addressed by index so
//! parts can be sent concurrently, in any order, retried and resumed after a crash:
//! `begin` -> `put_part(index)` ... -> `complete(receipts)`, or `abort`. Then
//! `head` / `readback` for verification and `put_small` for the manifest.
//!
//! - `s3://BUCKET/PREFIX/` uses object_store's `MultipartStore`
//!   (create_multipart / put_part / complete_multipart).
//! - `memory://NAME/PREFIX/` is an in-process store kept here: object_store's
//!   `InMemory` keeps the caller's part buffers (which would pin ferry's memory
//!   budget) and concatenates all parts on completion (a second copy of the whole
//!   object), which would make it measure itself rather than ferry's pipeline.
//! - `file://PATH/` is written here: object_store's `LocalFileSystem` has no
//!   `MultipartStore` (its uploads are positional and cannot be resumed), so ferry
//!   writes each part with `pwrite` at its own offset into a staging file beside
//!   the object, then fsyncs and renames it into place. That makes file
//!   destinations resumable by the same journal as S3.
//!
//! Design choice: object_store's own retries are turned off. ferry retries every
//! request itself (`transfer`), so each retry is counted, logged and bounded in
//! one place, with backoff and jitter.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use crate::chunk::{Part, PartLimits};
use crate::config::{DestinationConfig, DestinationUrl, TransferConfig};

/// Picks the destinations for a push: every configured one when `to` is empty,
/// otherwise each `--to` value as a configured name or a URL.
pub fn resolve(
    configured: &std::collections::BTreeMap<String, DestinationConfig>,
    to: &[String],
) -> Result<Vec<(String, DestinationConfig)>, String> {
    if to.is_empty() {
        if configured.is_empty() {
            return Err(
                "no destinations: add a [destinations.NAME] table to the config or pass --to URL"
                    .into(),
            );
        }
        return Ok(configured
            .iter()
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect());
    }
    let mut out: Vec<(String, DestinationConfig)> = Vec::new();
    for t in to {
        let (name, cfg) = if let Some(d) = configured.get(t) {
            (t.clone(), d.clone())
        } else if t.contains("://") {
            let url = DestinationUrl::parse(t).map_err(|e| e.to_string())?;
            let base = match &url {
                DestinationUrl::File { dir } => format!(
                    "file-{}",
                    dir.components()
                        .next_back()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .unwrap_or_default()
                ),
                DestinationUrl::Memory { name, .. } => format!("memory-{name}"),
                DestinationUrl::S3 { bucket, .. } => format!("s3-{bucket}"),
            };
            let mut base: String = base
                .to_ascii_lowercase()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .take(56)
                .collect();
            if base.is_empty() {
                base = "dest".into();
            }
            let mut name = base.clone();
            let mut n = 2;
            while out.iter().any(|(o, _)| *o == name) || configured.contains_key(&name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            (
                name,
                DestinationConfig {
                    url: t.clone(),
                    ..DestinationConfig::default()
                },
            )
        } else {
            let known: Vec<&str> = configured.keys().map(String::as_str).collect();
            return Err(format!(
                "unknown destination {t:?}: the config names {}; or give a URL (file://, s3://, memory://)",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        };
        if out.iter().any(|(_, c)| c.url == cfg.url) {
            return Err(format!("destination {} is given twice", cfg.url));
        }
        out.push((name, cfg));
    }
    Ok(out)
}

/// An S3 error message as a person reads it, on one line: object_store appends
/// the server's XML error document; only its Code and Message are kept.
pub fn readable(message: &str) -> String {
    let Some(at) = message.find("<?xml") else {
        return message.to_string();
    };
    let xml = &message[at..];
    let head = message[..at].trim_end();
    match (xml_field(xml, "Code"), xml_field(xml, "Message")) {
        (Some(code), Some(text)) if !text.is_empty() => format!("{head} {code} ({text})"),
        (Some(code), _) => format!("{head} {code}"),
        _ => head.to_string(),
    }
}

/// A request that never reached a server, by why: the kind an operator acts
/// on differently (a typo in the endpoint, a server down, a certificate, a
/// firewall). Read from the error's source chain: reqwest and hyper keep their
/// error types private, but their messages and the `io::Error` at the bottom
/// of the chain say which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unreachable {
    NoSuchHost,
    Refused,
    Tls,
    Timeout,
}

impl Unreachable {
    fn of(e: &(dyn std::error::Error + 'static)) -> Option<Unreachable> {
        let mut cur = Some(e);
        // Bounded: error chains are a handful of links deep.
        for _ in 0..16 {
            let Some(err) = cur else { break };
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return Some(Unreachable::Refused),
                    std::io::ErrorKind::TimedOut => return Some(Unreachable::Timeout),
                    _ => {}
                }
            }
            let text = err.to_string();
            if text.starts_with("dns error") || text.contains("failed to lookup address") {
                return Some(Unreachable::NoSuchHost);
            }
            if text.contains("certificate") || text.contains("tls handshake") {
                return Some(Unreachable::Tls);
            }
            cur = err.source();
        }
        None
    }

    fn words(self) -> &'static str {
        match self {
            Unreachable::NoSuchHost => "no such host: the endpoint's name does not resolve",
            Unreachable::Refused => "connection refused: nothing listens at the endpoint",
            Unreachable::Tls => {
                "TLS failed: the endpoint's certificate or protocol was not accepted"
            }
            Unreachable::Timeout => "no answer: the connection timed out",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Unreachable::NoSuchHost => "dns",
            Unreachable::Refused => "refused",
            Unreachable::Tls => "tls",
            Unreachable::Timeout => "timeout",
        }
    }
}

/// An object_store error as a person reads it: a request that never reached
/// the server says why in plain words, with the system's own message; an
/// answer from the server keeps its S3 code and message on one line.
fn describe(e: &object_store::Error) -> String {
    let Some(u) = Unreachable::of(e) else {
        return readable(&e.to_string());
    };
    // The innermost message is the system's (os error, resolver).
    let mut deepest = e.to_string();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    for _ in 0..16 {
        let Some(err) = cur else { break };
        deepest = err.to_string();
        cur = err.source();
    }
    let url = e
        .to_string()
        .split_whitespace()
        .find(|w| w.starts_with("http://") || w.starts_with("https://"))
        .map(|u| format!(" ({u})"))
        .unwrap_or_default();
    format!("{}{url}: {deepest}", u.words())
}

/// What went wrong talking to a destination.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {key}: {source}")]
    Io {
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {key}: {}", describe(source))]
    Remote {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{op} {key}: {message}")]
    Check {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("cannot set up destination: {0}")]
    Setup(String),
    #[error("{key:?} cannot be an object key: {message}; rename the file")]
    Key { key: String, message: String },
}

/// S3 error codes that say the bytes did not arrive as sent.
const CHECKSUM_CODES: &[&str] = &[
    "BadDigest",
    "InvalidDigest",
    "XAmzContentChecksumMismatch",
    "XAmzContentSHA256Mismatch",
];

/// S3 error codes that ask the client to slow down.
const SLOW_DOWN_CODES: &[&str] = &["SlowDown", "Throttling", "ThrottlingException"];

/// Further codes of a 4xx answer that another try may cure (besides the two
/// lists above): the body was cut short, or the server was busy.
const OTHER_RETRYABLE_CODES: &[&str] = &[
    "IncompleteBody",
    "RequestTimeout",
    "TooManyRequests",
    "InternalError",
];

/// What is known of a failed S3 request. object_store keeps its request error
/// type private, so the HTTP status is read from that error's own message
/// ("Server returned non-2xx status code: 400 Bad Request: <body>"), never
/// from the whole text, whose URL holds upload ids that may contain any digits.
#[derive(Debug, Default, PartialEq)]
struct RemoteFailure {
    status: Option<u16>,
    code: Option<String>,
    http: Option<object_store::client::HttpErrorKind>,
}

impl RemoteFailure {
    fn of(e: &object_store::Error) -> RemoteFailure {
        let mut f = RemoteFailure::default();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        // Bounded: error chains are a handful of links deep.
        for _ in 0..16 {
            let Some(err) = cur else { break };
            if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
                f.http = Some(h.kind());
            }
            f.read(&err.to_string());
            cur = err.source();
        }
        f
    }

    fn read(&mut self, text: &str) {
        if let Some(rest) = text.strip_prefix("Server returned non-2xx status code: ") {
            self.status = rest.get(..3).and_then(|s| s.parse().ok());
            self.code = xml_field(rest, "Code");
        } else if let Some(rest) = text.strip_prefix("Server returned error response: ") {
            self.code = xml_field(rest, "Code");
        }
    }

    fn code_in(&self, list: &[&str]) -> bool {
        self.code.as_deref().is_some_and(|c| list.contains(&c))
    }
}

/// The text of the first `<tag>` element in an XML document, if any.
fn xml_field(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..start + len].trim().to_string())
}

impl StoreError {
    /// Worth another try after a pause: network trouble, timeouts, 5xx,
    /// throttling, a body damaged on its way. Not: refused credentials, a
    /// missing bucket or upload, a request the server will never accept.
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::ResourceBusy
            ),
            StoreError::Remote { source, .. } => match source {
                object_store::Error::Generic { .. } => {
                    let f = RemoteFailure::of(source);
                    match f.status {
                        Some(s) if s >= 500 || s == 408 || s == 429 => true,
                        Some(_) => {
                            f.code_in(CHECKSUM_CODES)
                                || f.code_in(SLOW_DOWN_CODES)
                                || f.code_in(OTHER_RETRYABLE_CODES)
                        }
                        // No answer at all: the connection failed.
                        None => true,
                    }
                }
                object_store::Error::JoinError { .. } => true,
                _ => false,
            },
            StoreError::Check { .. } => true,
            StoreError::Setup(_) | StoreError::Key { .. } => false,
        }
    }

    /// A low-cardinality reason for logs and metrics: checksum, slow_down,
    /// timeout, reset, server_error or other.
    pub fn reason(&self) -> &'static str {
        use object_store::client::HttpErrorKind as K;
        match self {
            StoreError::Check { .. } => "checksum",
            StoreError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::TimedOut => "timeout",
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe => "reset",
                _ => "other",
            },
            StoreError::Remote { source, .. } => {
                let f = RemoteFailure::of(source);
                if f.code_in(CHECKSUM_CODES) {
                    "checksum"
                } else if f.status == Some(503)
                    || f.status == Some(429)
                    || f.code_in(SLOW_DOWN_CODES)
                {
                    "slow_down"
                } else if f.status == Some(408)
                    || f.code_in(&["RequestTimeout"])
                    || f.http == Some(K::Timeout)
                {
                    "timeout"
                } else if f.status.is_some_and(|s| s >= 500) {
                    "server_error"
                } else if let Some(u) = f
                    .status
                    .is_none()
                    .then(|| Unreachable::of(source))
                    .flatten()
                {
                    u.reason()
                } else if f.status.is_none()
                    && matches!(f.http, Some(K::Connect | K::Request | K::Interrupted))
                {
                    "reset"
                } else {
                    "other"
                }
            }
            StoreError::Setup(_) | StoreError::Key { .. } => "other",
        }
    }
}

/// One finished part as the store knows it (an ETag for S3, nothing for files).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartReceipt {
    pub index: u32,
    pub part_id: String,
    pub size_bytes: u64,
    pub crc32c: u32,
}

/// Where a destination's uploads live, without secrets: what a journal record
/// keeps so that a later run reaches an upload again only through a configured
/// destination that names the same place (see `daemon`), never by rebuilding
/// a client from a URL alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Address {
    /// An absolute directory.
    File {
        dir: PathBuf,
    },
    Memory {
        name: String,
    },
    /// The endpoint ferry talks to (as configured, from `AWS_ENDPOINT_URL`, or
    /// AWS's own for the region), the signing region and the bucket.
    S3 {
        endpoint: String,
        region: String,
        bucket: String,
    },
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::File { dir } => write!(f, "directory {}", dir.display()),
            Address::Memory { name } => write!(f, "memory store {name}"),
            Address::S3 {
                endpoint,
                region,
                bucket,
            } => write!(f, "bucket {bucket} at {endpoint} (region {region})"),
        }
    }
}

/// What `head` found.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub size_bytes: u64,
    /// Part count from an S3 multipart ETag (`"...-N"`), when the store says.
    pub parts: Option<u32>,
}

enum Backend {
    File {
        dir: PathBuf,
    },
    Multipart {
        store: Arc<dyn ObjectStore>,
        multipart: Arc<dyn MultipartStore>,
        prefix: String,
    },
    Memory {
        store: Arc<MemoryStore>,
        prefix: String,
    },
}

/// An in-process object store: objects are kept as their parts.
#[derive(Default)]
pub struct MemoryStore {
    uploads: Mutex<HashMap<String, BTreeMap<u32, Bytes>>>,
    objects: Mutex<HashMap<String, Arc<Vec<Bytes>>>>,
}

impl MemoryStore {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn missing(op: &'static str, key: &str, what: &str) -> StoreError {
        StoreError::Io {
            op,
            key: key.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string()),
        }
    }

    fn object(&self, op: &'static str, key: &str) -> Result<Arc<Vec<Bytes>>, StoreError> {
        Self::lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| Self::missing(op, key, "no such object"))
    }
}

/// A configured destination, ready to take uploads.
pub struct Destination {
    name: String,
    url: String,
    address: Address,
    /// Where objects can be fetched from, e.g. for OCI's CreateImage.
    object_url_base: String,
    backend: Backend,
    parallel_parts: usize,
    limits: PartLimits,
    /// The part size this destination was built for: a directory with less
    /// free space than that is not ready.
    part_bytes: u64,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

static MEMORY_STORES: LazyLock<Mutex<HashMap<String, Arc<MemoryStore>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl Destination {
    /// Builds a destination from its config. Credentials come from the config or the
    /// usual `AWS_*` environment variables; they are never logged.
    pub fn new(
        name: &str,
        cfg: &DestinationConfig,
        transfer: &TransferConfig,
        part_bytes_hint: u64,
    ) -> Result<Destination, StoreError> {
        let url = DestinationUrl::parse(&cfg.url).map_err(|e| StoreError::Setup(e.to_string()))?;
        let parallel_parts = cfg.parallel_parts.unwrap_or(transfer.parallel_parts);
        let (backend, address, object_url_base) = match url {
            DestinationUrl::File { dir } => {
                let abs = std::path::absolute(&dir).unwrap_or_else(|_| dir.clone());
                let mut base = format!("file://{}", url_escape(&abs.display().to_string()));
                if !base.ends_with('/') {
                    base.push('/');
                }
                (Backend::File { dir }, Address::File { dir: abs }, base)
            }
            DestinationUrl::Memory { name: m, prefix } => {
                let store = MEMORY_STORES
                    .lock()
                    .map_err(|_| StoreError::Setup("memory store registry poisoned".into()))?
                    .entry(m.clone())
                    .or_default()
                    .clone();
                (
                    Backend::Memory { store, prefix },
                    Address::Memory { name: m.clone() },
                    format!("memory://{m}/"),
                )
            }
            DestinationUrl::S3 { bucket, prefix } => {
                let target = S3Target::resolve(name, &bucket, cfg)?;
                let s3 = build_s3(&target, cfg, transfer, part_bytes_hint)?;
                let base = target.object_url_base();
                (
                    Backend::Multipart {
                        store: s3.clone(),
                        multipart: s3,
                        prefix,
                    },
                    target.address(),
                    base,
                )
            }
        };
        Ok(Destination {
            name: name.to_string(),
            url: cfg.url.clone(),
            address,
            object_url_base,
            backend,
            parallel_parts,
            limits: PartLimits::S3,
            part_bytes: part_bytes_hint.max(PartLimits::S3.min_part_bytes),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn url(&self) -> &str {
        &self.url
    }
    pub fn parallel_parts(&self) -> usize {
        self.parallel_parts
    }
    pub fn limits(&self) -> PartLimits {
        self.limits
    }
    /// Where this destination's uploads live (for the journal).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The URL an importer fetches object `name` from: the key, encoded once.
    pub fn object_url(&self, name: &str) -> String {
        match &self.backend {
            Backend::File { .. } => format!("{}{}", self.object_url_base, url_escape(name)),
            Backend::Multipart { prefix, .. } | Backend::Memory { prefix, .. } => {
                format!(
                    "{}{}",
                    self.object_url_base,
                    url_escape(&format!("{prefix}{name}"))
                )
            }
        }
    }

    /// The key of `name` as a person reads it (prefix + name).
    pub fn key(&self, name: &str) -> String {
        match &self.backend {
            Backend::File { dir } => dir.join(name).display().to_string(),
            Backend::Multipart { prefix, .. } | Backend::Memory { prefix, .. } => {
                format!("{prefix}{name}")
            }
        }
    }

    /// The object path of `prefix + name`, exactly: object_store's
    /// `Path::from` would percent-encode `%`, `#`, `[`, `~`, quotes and more
    /// into the stored key. A key object_store cannot carry (control
    /// characters, `.`/`..` segments) is refused.
    fn obj_path(prefix: &str, name: &str) -> Result<ObjPath, StoreError> {
        Self::key_path(&format!("{prefix}{name}"))
    }

    fn key_path(key: &str) -> Result<ObjPath, StoreError> {
        if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
            return Err(StoreError::Key {
                key: key.to_string(),
                message: "it may not be empty or start or end with '/'".into(),
            });
        }
        ObjPath::parse(key).map_err(|e| StoreError::Key {
            key: key.to_string(),
            message: e.to_string(),
        })
    }

    /// The object and its staging file; the staging name is short (the upload
    /// id is unique) so a 255-byte object name still fits.
    fn file_paths(dir: &FsPath, name: &str, upload_id: &str) -> (PathBuf, PathBuf) {
        (
            dir.join(name),
            dir.join(format!(".ferry-upload.{upload_id}")),
        )
    }

    /// Starts an upload of `name`; returns its id, to be journaled.
    pub async fn begin(&self, name: &str) -> Result<String, StoreError> {
        match &self.backend {
            Backend::File { dir } => {
                let id = format!("{:016x}", rand::random::<u64>());
                let (_, staging) = Self::file_paths(dir, name, &id);
                let dir = dir.clone();
                let key = self.key(name);
                blocking(move || {
                    std::fs::create_dir_all(&dir)?;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&staging)
                        .map(drop)
                })
                .await
                .map_err(|source| StoreError::Io {
                    op: "begin upload",
                    key,
                    source,
                })?;
                Ok(id)
            }
            Backend::Memory { store, .. } => {
                let id = format!("{:016x}", rand::random::<u64>());
                MemoryStore::lock(&store.uploads).insert(id.clone(), BTreeMap::new());
                Ok(id)
            }
            Backend::Multipart {
                multipart, prefix, ..
            } => multipart
                .create_multipart(&Self::obj_path(prefix, name)?)
                .await
                .map_err(|source| StoreError::Remote {
                    op: "begin upload",
                    key: self.key(name),
                    source,
                }),
        }
    }

    /// Sends one part. Safe to repeat: a part sent twice replaces itself.
    pub async fn put_part(
        &self,
        name: &str,
        upload_id: &str,
        part: &Part,
    ) -> Result<PartReceipt, StoreError> {
        let receipt = |part_id: String| PartReceipt {
            index: part.index(),
            part_id,
            size_bytes: part.len(),
            crc32c: part.crc32c(),
        };
        match &self.backend {
            Backend::File { dir } => {
                let (_, staging) = Self::file_paths(dir, name, upload_id);
                let bytes: Bytes = part.bytes().clone();
                let offset = part.offset();
                blocking(move || {
                    let f = std::fs::OpenOptions::new().write(true).open(&staging)?;
                    f.write_all_at(&bytes, offset)
                })
                .await
                .map_err(|source| StoreError::Io {
                    op: "write part",
                    key: self.key(name),
                    source,
                })?;
                Ok(receipt(String::new()))
            }
            Backend::Memory { store, .. } => {
                // The store keeps what it is given. Pooled buffers are copied, so
                // their share of the budget comes back when the part is sent, as
                // with any store; page-cache mappings are kept as they are.
                let bytes = if part.bytes_are_shareable() {
                    part.bytes().clone()
                } else {
                    let len = part.bytes().len();
                    let mut copy = crate::chunk::buffer(len).map_err(|source| StoreError::Io {
                        op: "upload part",
                        key: self.key(name),
                        source,
                    })?;
                    copy[..len].copy_from_slice(part.bytes());
                    Bytes::from_owner(copy).slice(..len)
                };
                let mut uploads = MemoryStore::lock(&store.uploads);
                let upload = uploads.get_mut(upload_id).ok_or_else(|| {
                    MemoryStore::missing("upload part", &self.key(name), "no such upload")
                })?;
                upload.insert(part.index(), bytes);
                Ok(receipt(String::new()))
            }
            Backend::Multipart {
                multipart, prefix, ..
            } => {
                let bytes = part.bytes().clone();
                let id = multipart
                    .put_part(
                        &Self::obj_path(prefix, name)?,
                        &upload_id.to_string(),
                        part.index() as usize,
                        PutPayload::from_bytes(bytes),
                    )
                    .await
                    .map_err(|source| StoreError::Remote {
                        op: "upload part",
                        key: self.key(name),
                        source,
                    })?;
                Ok(receipt(id.content_id))
            }
        }
    }

    /// Finishes an upload from its receipts, in part order.
    pub async fn complete(
        &self,
        name: &str,
        upload_id: &str,
        receipts: &[PartReceipt],
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File { dir } => {
                let (final_path, staging) = Self::file_paths(dir, name, upload_id);
                let dir = dir.clone();
                let size: u64 = receipts.iter().map(|r| r.size_bytes).sum();
                blocking(move || {
                    let f = std::fs::OpenOptions::new().write(true).open(&staging)?;
                    // A resumed staging file may be longer than a smaller new plan.
                    f.set_len(size)?;
                    f.sync_all()?;
                    std::fs::rename(&staging, &final_path)?;
                    std::fs::File::open(&dir)?.sync_all()
                })
                .await
                .map_err(|source| StoreError::Io {
                    op: "complete upload",
                    key: self.key(name),
                    source,
                })
            }
            Backend::Memory { store, .. } => {
                let key = self.key(name);
                let mut upload = MemoryStore::lock(&store.uploads)
                    .remove(upload_id)
                    .ok_or_else(|| {
                        MemoryStore::missing("complete upload", &key, "no such upload")
                    })?;
                let parts: Option<Vec<Bytes>> =
                    receipts.iter().map(|r| upload.remove(&r.index)).collect();
                let parts = parts.ok_or_else(|| {
                    MemoryStore::missing("complete upload", &key, "a listed part was never sent")
                })?;
                MemoryStore::lock(&store.objects).insert(key, Arc::new(parts));
                Ok(())
            }
            Backend::Multipart {
                multipart, prefix, ..
            } => {
                let parts = receipts
                    .iter()
                    .map(|r| PartId {
                        content_id: r.part_id.clone(),
                    })
                    .collect();
                multipart
                    .complete_multipart(
                        &Self::obj_path(prefix, name)?,
                        &upload_id.to_string(),
                        parts,
                    )
                    .await
                    .map(drop)
                    .map_err(|source| StoreError::Remote {
                        op: "complete upload",
                        key: self.key(name),
                        source,
                    })
            }
        }
    }

    /// Abandons an upload and frees what the store kept of it.
    pub async fn abort(&self, name: &str, upload_id: &str) -> Result<(), StoreError> {
        self.abort_key(&self.key(name), upload_id).await
    }

    /// Abandons the upload `upload_id` of `key` as [`Destination::key`] gave it
    /// when the upload began (a journal record's key, whatever the prefix
    /// configured now).
    pub async fn abort_key(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File { dir } => {
                let (_, staging) = Self::file_paths(dir, "", upload_id);
                blocking(move || match std::fs::remove_file(&staging) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                })
                .await
                .map_err(|source| StoreError::Io {
                    op: "abort upload",
                    key: key.to_string(),
                    source,
                })
            }
            Backend::Memory { store, .. } => {
                MemoryStore::lock(&store.uploads).remove(upload_id);
                Ok(())
            }
            Backend::Multipart { multipart, .. } => multipart
                .abort_multipart(&Self::key_path(key)?, &upload_id.to_string())
                .await
                .map_err(|source| StoreError::Remote {
                    op: "abort upload",
                    key: key.to_string(),
                    source,
                }),
        }
    }

    /// Size (and part count where the store tells) of a finished object.
    pub async fn head(&self, name: &str) -> Result<ObjectInfo, StoreError> {
        match &self.backend {
            Backend::File { dir } => {
                let path = dir.join(name);
                let meta = tokio::fs::metadata(&path)
                    .await
                    .map_err(|source| StoreError::Io {
                        op: "head",
                        key: self.key(name),
                        source,
                    })?;
                Ok(ObjectInfo {
                    size_bytes: meta.len(),
                    parts: None,
                })
            }
            Backend::Memory { store, .. } => {
                let parts = store.object("head", &self.key(name))?;
                Ok(ObjectInfo {
                    size_bytes: parts.iter().map(|b| b.len() as u64).sum(),
                    parts: u32::try_from(parts.len()).ok(),
                })
            }
            Backend::Multipart { store, prefix, .. } => {
                let meta = store
                    .head(&Self::obj_path(prefix, name)?)
                    .await
                    .map_err(|source| StoreError::Remote {
                        op: "head",
                        key: self.key(name),
                        source,
                    })?;
                let parts = meta
                    .e_tag
                    .as_deref()
                    .map(|t| t.trim_matches('"'))
                    .and_then(|t| t.rsplit_once('-'))
                    .and_then(|(_, n)| n.parse().ok());
                Ok(ObjectInfo {
                    size_bytes: meta.size,
                    parts,
                })
            }
        }
    }

    /// Reads the whole object back; returns its size and CRC32C.
    pub async fn readback(&self, name: &str) -> Result<(u64, u32), StoreError> {
        match &self.backend {
            Backend::File { dir } => {
                let path = dir.join(name);
                blocking(move || {
                    let f = std::fs::File::open(&path)?;
                    let mut buf = vec![0u8; 8 << 20];
                    let (mut crc, mut size) = (0u32, 0u64);
                    loop {
                        let n = f.read_at(&mut buf, size)?;
                        if n == 0 {
                            return Ok((size, crc));
                        }
                        crc = crc32c::crc32c_append(crc, &buf[..n]);
                        size += n as u64;
                    }
                })
                .await
                .map_err(|source| StoreError::Io {
                    op: "read back",
                    key: self.key(name),
                    source,
                })
            }
            Backend::Memory { store, .. } => {
                let parts = store.object("read back", &self.key(name))?;
                Ok(parts.iter().fold((0u64, 0u32), |(size, crc), b| {
                    (size + b.len() as u64, crc32c::crc32c_append(crc, b))
                }))
            }
            Backend::Multipart { store, prefix, .. } => {
                let remote = |source| StoreError::Remote {
                    op: "read back",
                    key: self.key(name),
                    source,
                };
                let mut stream = store
                    .get(&Self::obj_path(prefix, name)?)
                    .await
                    .map_err(remote)?
                    .into_stream();
                let (mut crc, mut size) = (0u32, 0u64);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(remote)?;
                    crc = crc32c::crc32c_append(crc, &chunk);
                    size += chunk.len() as u64;
                }
                Ok((size, crc))
            }
        }
    }

    /// Writes a small object (the manifest) in one request, replacing any old one.
    pub async fn put_small(&self, name: &str, body: Bytes) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File { dir } => {
                let dir = dir.clone();
                let name = name.to_string();
                let key = self.key(&name);
                blocking(move || {
                    std::fs::create_dir_all(&dir)?;
                    let tmp = dir.join(format!(".ferry-tmp.{:016x}", rand::random::<u64>()));
                    std::fs::write(&tmp, &body)?;
                    std::fs::File::open(&tmp)?.sync_all()?;
                    std::fs::rename(&tmp, dir.join(&name))?;
                    std::fs::File::open(&dir)?.sync_all()
                })
                .await
                .map_err(|source| StoreError::Io {
                    op: "write",
                    key,
                    source,
                })
            }
            Backend::Memory { store, .. } => {
                MemoryStore::lock(&store.objects).insert(self.key(name), Arc::new(vec![body]));
                Ok(())
            }
            Backend::Multipart { store, prefix, .. } => store
                .put(&Self::obj_path(prefix, name)?, PutPayload::from_bytes(body))
                .await
                .map(drop)
                .map_err(|source| StoreError::Remote {
                    op: "write",
                    key: self.key(name),
                    source,
                }),
        }
    }

    /// Removes what interrupted writes left in a file:// directory: temp files
    /// of small writes (never valid) and staging files of uploads no journal
    /// names (`live` holds the upload ids still journaled), such as one whose
    /// process died between creating it and journaling its id. The daemon
    /// calls this at start; it owns its file:// directories, so a `ferry push`
    /// into the same directory at that moment would lose its staging file and
    /// fail (never complete a wrong object).
    pub async fn sweep(&self, live: &std::collections::HashSet<String>) {
        if let Backend::File { dir } = &self.backend {
            let dir = dir.clone();
            let live = live.clone();
            let _ = blocking(move || {
                for e in std::fs::read_dir(&dir)?.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let orphan = name.starts_with(".ferry-tmp.")
                        || name
                            .strip_prefix(".ferry-upload.")
                            .is_some_and(|id| !live.contains(id));
                    if orphan {
                        tracing::info!(
                            "removing {}, left by an interrupted write",
                            e.path().display()
                        );
                        let _ = std::fs::remove_file(e.path());
                    }
                }
                Ok(())
            })
            .await;
        }
    }

    /// A cheap request that shows the destination can take a part (for
    /// `/readyz`): a store answers; a directory takes a file and has room
    /// for at least one part.
    pub async fn probe(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File { dir } => {
                let d = dir.clone();
                let need = self.part_bytes;
                blocking(move || {
                    std::fs::create_dir_all(&d)?;
                    let probe = d.join(".ferry-probe");
                    std::fs::write(&probe, b"")?;
                    std::fs::remove_file(&probe)?;
                    let free = free_bytes(&d)?;
                    if free < need {
                        let show = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::StorageFull,
                            format!(
                                "its filesystem has {} free, less than one part ({}): every part would fail; free some space",
                                show(free),
                                show(need)
                            ),
                        ));
                    }
                    Ok(())
                })
                .await
                .map_err(|source| StoreError::Io {
                    op: "probe",
                    key: dir.display().to_string(),
                    source,
                })
            }
            Backend::Memory { .. } => Ok(()),
            Backend::Multipart { store, prefix, .. } => {
                match store.head(&Self::obj_path(prefix, ".ferry-probe")?).await {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(source) => Err(StoreError::Remote {
                        op: "probe",
                        key: format!("{prefix}.ferry-probe"),
                        source,
                    }),
                }
            }
        }
    }

    /// Reads a small object whole (a manifest, a test).
    pub async fn get_small(&self, name: &str) -> Result<Bytes, StoreError> {
        match &self.backend {
            Backend::File { dir } => tokio::fs::read(dir.join(name))
                .await
                .map(Bytes::from)
                .map_err(|source| StoreError::Io {
                    op: "read",
                    key: self.key(name),
                    source,
                }),
            Backend::Memory { store, .. } => {
                let parts = store.object("read", &self.key(name))?;
                Ok(parts.iter().flat_map(|b| b.iter().copied()).collect())
            }
            Backend::Multipart { store, prefix, .. } => {
                let remote = |source| StoreError::Remote {
                    op: "read",
                    key: self.key(name),
                    source,
                };
                store
                    .get(&Self::obj_path(prefix, name)?)
                    .await
                    .map_err(remote)?
                    .bytes()
                    .await
                    .map_err(remote)
            }
        }
    }
}

/// An S3 destination's endpoint, region, bucket and credentials, resolved
/// once from its table and the environment. These are the only endpoint and
/// credential source the destination ever uses: object_store's own fallbacks
/// (public AWS for a URL alone, the instance-metadata service when no key is
/// found) are never reached unless the table says `credentials = "instance"`.
struct S3Target {
    bucket: String,
    endpoint: String,
    region: String,
    keys: Option<(String, String, Option<String>)>,
}

impl S3Target {
    fn resolve(name: &str, bucket: &str, cfg: &DestinationConfig) -> Result<S3Target, StoreError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let region = cfg
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_string());
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"))
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"))
            .trim_end_matches('/')
            .to_string();
        let setup = |m: String| StoreError::Setup(format!("destination {name} ({}): {m}", cfg.url));
        let keys = match cfg.credentials.unwrap_or_default() {
            crate::config::Credentials::Instance => {
                if cfg.access_key_id.is_some() || cfg.secret_access_key.is_some() {
                    return Err(setup(
                        "credentials = \"instance\" and access keys are both set: keep one".into(),
                    ));
                }
                None
            }
            crate::config::Credentials::Keys => {
                let pair = match (&cfg.access_key_id, &cfg.secret_access_key) {
                    (Some(id), Some(secret)) => (id.clone(), secret.clone(), None),
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(setup(
                            "access_key_id and secret_access_key go together: set both".into(),
                        ));
                    }
                    (None, None) => {
                        match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                            (Some(id), Some(secret)) => (id, secret, env("AWS_SESSION_TOKEN")),
                            (Some(_), None) | (None, Some(_)) => {
                                return Err(setup(
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together: set both"
                                    .into(),
                            ));
                            }
                            (None, None) => {
                                return Err(setup(format!(
                                    "no credentials: set access_key_id and secret_access_key in \
                                 [destinations.{name}], or AWS_ACCESS_KEY_ID and \
                                 AWS_SECRET_ACCESS_KEY in ferry's environment, or \
                                 credentials = \"instance\" to use the role of the cloud \
                                 instance ferry runs on"
                                )));
                            }
                        }
                    }
                };
                Some(pair)
            }
        };
        Ok(S3Target {
            bucket: bucket.to_string(),
            endpoint,
            region,
            keys,
        })
    }

    fn address(&self) -> Address {
        Address::S3 {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            bucket: self.bucket.clone(),
        }
    }

    /// The base URL of objects: OCI's native form for OCI's S3-compatible
    /// endpoint (`https://NS.compat.objectstorage.REGION.oraclecloud.com`),
    /// path style otherwise.
    fn object_url_base(&self) -> String {
        let host = url::Url::parse(&self.endpoint)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        if let Some((ns, rest)) = host.split_once(".compat.objectstorage.")
            && let Some(region) = rest.strip_suffix(".oraclecloud.com")
        {
            format!(
                "https://objectstorage.{region}.oraclecloud.com/n/{ns}/b/{}/o/",
                self.bucket
            )
        } else {
            format!("{}/{}/", self.endpoint, self.bucket)
        }
    }
}

fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn build_s3(
    target: &S3Target,
    cfg: &DestinationConfig,
    transfer: &TransferConfig,
    part_bytes_hint: u64,
) -> Result<Arc<AmazonS3>, StoreError> {
    // object_store's whole-request timeout defaults to 30 s, which a large part on a
    // slow link exceeds: allow part_size at min_throughput, and never under 60 s.
    let secs = (part_bytes_hint / (transfer.min_throughput_kib * 1024)).max(60);
    let options = ClientOptions::new()
        .with_timeout(Duration::from_secs(secs))
        .with_connect_timeout(Duration::from_secs(transfer.connect_timeout_secs))
        .with_pool_idle_timeout(Duration::from_secs(30));
    let allow_http = cfg
        .allow_http
        .unwrap_or_else(|| is_loopback_http(&target.endpoint));
    // Keys: nothing from the environment but what S3Target read. Instance:
    // the AWS SDKs' chain (web identity, container, instance metadata), as asked.
    let b = match target.keys {
        Some(_) => AmazonS3Builder::new(),
        None => AmazonS3Builder::from_env(),
    };
    // Client options first: they replace the whole option set, allow_http included.
    let mut b = b
        .with_client_options(options)
        .with_allow_http(allow_http)
        .with_bucket_name(&target.bucket)
        .with_retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        })
        .with_virtual_hosted_style_request(false)
        .with_endpoint(&target.endpoint)
        .with_region(&target.region);
    b = match transfer.payload_checksum {
        crate::config::PayloadChecksum::Crc64nvme => b
            .with_unsigned_payload(true)
            .with_checksum_algorithm(object_store::aws::Checksum::CRC64NVME),
        crate::config::PayloadChecksum::Sha256 => b,
    };
    if let Some((id, secret, token)) = &target.keys {
        b = b.with_access_key_id(id).with_secret_access_key(secret);
        if let Some(t) = token {
            b = b.with_token(t);
        }
    }
    b.build()
        .map(Arc::new)
        .map_err(|e| StoreError::Setup(format!("s3://{}: {e}", target.bucket)))
}

fn is_loopback_http(endpoint: &str) -> bool {
    url::Url::parse(endpoint).is_ok_and(|u| {
        u.scheme() == "http"
            && match u.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            }
    })
}

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`.
fn free_bytes(dir: &FsPath) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs with a NUL-terminated path and a zeroed struct to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn s3_error_documents_become_one_readable_line() {
        let m = "Error performing PUT http://h/b/k?partNumber=2 in 236ms - Server returned non-2xx status code: 400 Bad Request: <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>BadDigest</Code><Message>The Content-Md5 you specified did not match what we received.</Message><Resource>/b/k</Resource></Error>";
        assert_eq!(
            super::readable(m),
            "Error performing PUT http://h/b/k?partNumber=2 in 236ms - Server returned non-2xx status code: 400 Bad Request: BadDigest (The Content-Md5 you specified did not match what we received.)"
        );
        assert_eq!(
            super::readable("503 Slow Down: <?xml?><Error><Code>SlowDown</Code></Error>"),
            "503 Slow Down: SlowDown"
        );
        assert_eq!(super::readable("400: <?xml broken"), "400:");
        assert_eq!(super::readable("connection reset"), "connection reset");
    }

    #[test]
    fn the_status_comes_from_the_answer_not_from_the_url() {
        let mut f = super::RemoteFailure::default();
        f.read("Error performing PUT http://h/b/k?partNumber=1&uploadId=d3e4403f503 in 220.403ms - Server returned non-2xx status code: 400 Bad Request: <Error><Code>BadDigest</Code></Error>");
        assert_eq!(f.status, None, "only the request error's own text counts");
        f.read("Server returned non-2xx status code: 400 Bad Request: <?xml?><Error><Code>BadDigest</Code></Error>");
        assert_eq!(f.status, Some(400));
        assert!(f.code_in(super::CHECKSUM_CODES));
        let mut g = super::RemoteFailure::default();
        g.read("Server returned non-2xx status code: 400 Bad Request: <Error><Code>EntityTooSmall</Code></Error>");
        assert_eq!(g.code.as_deref(), Some("EntityTooSmall"));
        assert!(!g.code_in(super::CHECKSUM_CODES) && !g.code_in(super::SLOW_DOWN_CODES));
        assert!(!g.code_in(super::OTHER_RETRYABLE_CODES));
        let mut h = super::RemoteFailure::default();
        h.read("Server returned non-2xx status code: 503 Service Unavailable: ");
        assert_eq!((h.status, h.code), (Some(503), None));
    }

    use super::*;

    #[test]
    fn loopback_endpoints_allow_http() {
        assert!(is_loopback_http("http://127.0.0.1:8333"));
        assert!(is_loopback_http("http://localhost:8333"));
        assert!(!is_loopback_http("http://10.0.0.1:8333"));
        assert!(!is_loopback_http("https://127.0.0.1"));
    }

    #[test]
    fn keys_are_the_name_exactly_and_never_leave_the_prefix() {
        for name in ["100%.qcow2", "a#b?c", "back\\slash~[x]*", "q\"'<>", "ü 空"] {
            let p = Destination::obj_path("exports/", name).unwrap();
            assert_eq!(p.as_ref(), format!("exports/{name}"));
        }
        for bad in ["..", ".", "new\nline", "a/../../etc"] {
            assert!(Destination::obj_path("exports/", bad).is_err(), "{bad:?}");
        }
    }
}
