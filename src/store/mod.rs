//! Destinations: where parts go, as an upload that can be resumed by its id.
//!
//! Promises: every destination offers the same steps, addressed by index so
//! parts can be sent concurrently, in any order, retried and resumed after a
//! crash: `begin` -> `put_part(index)` ... -> `complete(receipts)`, or `abort`.
//! Then `head` / `readback` for verification and `put_small` for the manifest.
//! Each kind of destination is one [`Backend`] in its own file:
//!
//! - `s3.rs`, `s3://BUCKET/PREFIX/`: object_store's `MultipartStore`;
//! - `file.rs`, `file://PATH/`: written here (object_store's `LocalFileSystem`
//!   has no `MultipartStore`; its uploads are positional and cannot be resumed):
//!   each part is `pwrite` at its own offset into a staging file beside the
//!   object, then fsynced and renamed into place, so file destinations resume
//!   from the same journal as S3;
//! - `oci.rs`, `oci://BUCKET/PREFIX/`: OCI Object Storage's own API, signed
//!   with an OCI CLI profile's API key, each part's CRC32C checked by the
//!   service and the whole object's answered at commit;
//! - `memory.rs`, `memory://NAME/PREFIX/`: an in-process store for benchmarks
//!   and tests, kept here because object_store's `InMemory` keeps the caller's
//!   part buffers (pinning ferry's memory budget) and concatenates all parts on
//!   completion (a second copy of the whole object).
//!
//! Every backend runs the one shared suite in `tests/backends.rs`: a new kind
//! of destination is a new file here and one line there.
//!
//! Design choice: object_store's own retries are turned off. ferry retries every
//! request itself (`transfer`), so each retry is counted, logged and bounded in
//! one place, with backoff and jitter.

mod error;
mod file;
mod memory;
mod oci;
mod s3;

use std::collections::HashSet;
use std::path::PathBuf;

use bytes::Bytes;

use crate::chunk::{Part, PartLimits};
use crate::config::{DestinationConfig, DestinationUrl, TransferConfig};

pub use error::{StoreError, readable};
pub(crate) use oci::{account_and_region as oci_account, allow_http as oci_allow_http};

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
                DestinationUrl::Oci { bucket, .. } => format!("oci-{bucket}"),
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
                "unknown destination {t:?}: the config names {}; or give a URL (file://, s3://, oci://, memory://)",
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

/// One finished part as the store knows it (an ETag for S3, nothing for files).
/// An object opened as a source, with its sidecar (the small object named
/// as it plus the sidecar's suffix), if it has one: its URL and text.
pub struct OpenedObject {
    pub source: crate::source::Source,
    pub sidecar: Option<(String, String)>,
}

/// Splits an object's URL into its directory's URL and its name.
pub fn split_object_url(url: &str) -> Result<(String, String), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url}: not a URL"))?;
    if scheme != "s3" && scheme != "oci" {
        return Err(format!(
            "{url}: an object to ship is s3://BUCKET/KEY or oci://BUCKET/KEY; a file is given by its path"
        ));
    }
    match rest.rsplit_once('/') {
        Some((dir, name)) if !dir.is_empty() && !name.is_empty() => {
            Ok((format!("{scheme}://{dir}/"), name.to_string()))
        }
        _ => Err(format!(
            "{url}: names a bucket or a prefix, not an object; give the object's whole key"
        )),
    }
}

/// The small object that travels with an image: its name's suffix
/// (`.meta.json`) and its largest size.
#[derive(Debug, Clone, Copy)]
pub struct Beside {
    pub suffix: &'static str,
    pub max_bytes: u64,
}

/// Opens the object at `url` as a source, with the store settings of `cfg`
/// (endpoint, region, credentials; its own URL is not used), and reads its
/// sidecar as `beside` says.
pub async fn open_object(
    url: &str,
    cfg: &DestinationConfig,
    transfer: &TransferConfig,
    beside: Beside,
) -> Result<OpenedObject, StoreError> {
    let (dir, name) = split_object_url(url).map_err(StoreError::Setup)?;
    let cfg = DestinationConfig {
        url: dir.clone(),
        import: None,
        ..cfg.clone()
    };
    let parsed = DestinationUrl::parse(&dir).map_err(|e| StoreError::Setup(e.to_string()))?;
    let hint = transfer.part_size.as_u64();
    let parallel = cfg.parallel_parts.unwrap_or(transfer.parallel_parts);
    let (object, sidecar) = match parsed {
        DestinationUrl::S3 { bucket, prefix } => {
            let (b, _) = s3::S3Backend::new("source", &bucket, prefix, &cfg, transfer, hint)?;
            let o = b.open_source(url, &name, parallel).await?;
            (o, sidecar_of(&b, &dir, &name, beside).await?)
        }
        DestinationUrl::Oci { bucket, prefix } => {
            let (b, _) = oci::OciBackend::new("source", &bucket, prefix, &cfg, transfer, hint)?;
            let b = std::sync::Arc::new(b);
            let o = b.clone().open_source(url, &name, parallel).await?;
            (o, sidecar_of(&*b, &dir, &name, beside).await?)
        }
        _ => {
            return Err(StoreError::Setup(format!(
                "{url}: only s3:// and oci:// objects can be shipped from a bucket"
            )));
        }
    };
    Ok(OpenedObject {
        source: crate::source::Source::object(&name, object),
        sidecar,
    })
}

/// The bucket (and prefix) at `url` as a source's claims, markers and
/// listing, with the store settings of `cfg`.
pub fn open_bucket(
    url: &str,
    cfg: &DestinationConfig,
    transfer: &TransferConfig,
) -> Result<std::sync::Arc<dyn crate::source::Bucket>, StoreError> {
    let cfg = DestinationConfig {
        url: url.to_string(),
        import: None,
        ..cfg.clone()
    };
    let hint = transfer.part_size.as_u64();
    match DestinationUrl::parse(url).map_err(|e| StoreError::Setup(e.to_string()))? {
        DestinationUrl::S3 { bucket, prefix } => {
            let (b, _) = s3::S3Backend::new("source", &bucket, prefix, &cfg, transfer, hint)?;
            Ok(std::sync::Arc::new(b.bucket()))
        }
        DestinationUrl::Oci { bucket, prefix } => {
            let (b, _) = oci::OciBackend::new("source", &bucket, prefix, &cfg, transfer, hint)?;
            Ok(std::sync::Arc::new(oci::OciBucket(std::sync::Arc::new(b))))
        }
        _ => Err(StoreError::Setup(format!(
            "{url}: a bucket source is s3://BUCKET/PREFIX/ or oci://BUCKET/PREFIX/"
        ))),
    }
}

/// The sidecar beside object `name` (its URL under `dir`, and its text), if
/// there is one.
async fn sidecar_of(
    backend: &dyn Backend,
    dir: &str,
    name: &str,
    beside: Beside,
) -> Result<Option<(String, String)>, StoreError> {
    let side = format!("{name}{}", beside.suffix);
    // Its size first: a sidecar is read whole, and must be small.
    match backend.head(&side).await {
        Ok(info) if info.size_bytes > beside.max_bytes => {
            return Err(StoreError::Answer {
                op: "read",
                key: backend.key(&side),
                message: format!(
                    "the sidecar has {} bytes, more than a sidecar's {}",
                    info.size_bytes, beside.max_bytes
                ),
            });
        }
        Ok(_) => {}
        Err(e) if e.is_missing() => return Ok(None),
        Err(e) => return Err(e),
    }
    match backend.get_small(&side).await {
        Ok(b) if b.len() as u64 > beside.max_bytes => Err(StoreError::Answer {
            op: "read",
            key: backend.key(&side),
            message: format!(
                "the sidecar has {} bytes, more than a sidecar's {}",
                b.len(),
                beside.max_bytes
            ),
        }),
        Ok(b) => Ok(Some((
            format!("{dir}{side}"),
            String::from_utf8_lossy(&b).into_owned(),
        ))),
        Err(e) if e.is_missing() => Ok(None),
        Err(e) => Err(e),
    }
}

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
    /// OCI Object Storage's own API: the endpoint, the tenancy whose key
    /// signs (its namespace is the tenancy's), and the bucket.
    Oci {
        endpoint: String,
        tenancy: String,
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
            Address::Oci {
                endpoint,
                tenancy,
                bucket,
            } => write!(f, "bucket {bucket} at {endpoint} (tenancy {tenancy})"),
        }
    }
}

/// What `head` found.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub size_bytes: u64,
    /// Part count from an S3 multipart ETag (`"...-N"`), when the store says.
    pub parts: Option<u32>,
    /// The whole object's CRC32C as the store keeps it, when it does (OCI).
    pub crc32c: Option<u32>,
}

/// A part the store holds of an unfinished upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    pub index: u32,
    pub part_id: String,
    pub size_bytes: u64,
}

/// What every kind of destination does. `name` is an object's name under the
/// destination's prefix (or in its directory); a key is what [`Backend::key`]
/// gave when an upload began (the journal keeps it).
#[async_trait::async_trait]
pub(crate) trait Backend: Send + Sync {
    /// The key of `name` as a person reads it (prefix + name, or a path).
    fn key(&self, name: &str) -> String;
    /// The URL of object `name`: the key, encoded once.
    fn object_url(&self, name: &str) -> String;
    /// The URL OCI's CreateImage can import `name` from, or why there is
    /// none (OCI imports only from OCI Object Storage).
    fn import_url(&self, name: &str) -> Result<String, String>;
    /// Starts an upload of `name`; returns its id, to be journaled.
    async fn begin(&self, name: &str) -> Result<String, StoreError>;
    /// Sends one part; returns the store's id for it (an ETag for S3). Safe to
    /// repeat: a part sent twice replaces itself.
    async fn put_part(
        &self,
        name: &str,
        upload_id: &str,
        part: &Part,
    ) -> Result<String, StoreError>;
    /// What the store checks of each part on arrival, for the manifest's
    /// `server_verified`: `crc32c-per-part`, `crc64nvme-per-part`,
    /// `sha256-per-part`, or `none`.
    fn server_check(&self) -> &'static str;
    /// Whether a finished object's head gives its whole CRC32C (OCI, for an
    /// upload that asked for CRC32C).
    fn keeps_whole_crc32c(&self) -> bool {
        false
    }
    /// Finishes an upload from its receipts, in part order; returns the
    /// whole object's CRC32C when the store computed one (OCI).
    async fn complete(
        &self,
        name: &str,
        upload_id: &str,
        receipts: &[PartReceipt],
    ) -> Result<Option<u32>, StoreError>;
    /// The parts the store holds of an unfinished upload, where it lists them
    /// (OCI); `None` where the journal alone is trusted.
    async fn listed_parts(
        &self,
        _name: &str,
        _upload_id: &str,
    ) -> Result<Option<Vec<ListedPart>>, StoreError> {
        Ok(None)
    }
    /// Abandons the upload `upload_id` of `key` and frees what the store kept.
    async fn abort_key(&self, key: &str, upload_id: &str) -> Result<(), StoreError>;
    /// Size (and part count where the store tells) of a finished object.
    async fn head(&self, name: &str) -> Result<ObjectInfo, StoreError>;
    /// Reads the whole object back; returns its size and CRC32C.
    async fn readback(&self, name: &str) -> Result<(u64, u32), StoreError>;
    /// Writes a small object (the manifest) in one request, replacing any old one.
    async fn put_small(&self, name: &str, body: Bytes) -> Result<(), StoreError>;
    /// Reads a small object whole (a manifest, a test).
    async fn get_small(&self, name: &str) -> Result<Bytes, StoreError>;
    /// A cheap request that shows the destination can take a part of
    /// `part_bytes` (for `/readyz`).
    async fn probe(&self, part_bytes: u64) -> Result<(), StoreError>;
    /// Removes what interrupted writes left behind, but uploads in `live`.
    async fn sweep(&self, _live: &HashSet<String>) {}
}

/// A configured destination, ready to take uploads.
pub struct Destination {
    name: String,
    url: String,
    address: Address,
    backend: Box<dyn Backend>,
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
        let (backend, address): (Box<dyn Backend>, Address) = match url {
            DestinationUrl::File { dir } => {
                let (b, a) = file::FileBackend::new(dir);
                (Box::new(b), a)
            }
            DestinationUrl::Memory { name: m, prefix } => {
                let (b, a) = memory::MemoryBackend::new(&m, prefix)?;
                (Box::new(b), a)
            }
            DestinationUrl::S3 { bucket, prefix } => {
                let (b, a) =
                    s3::S3Backend::new(name, &bucket, prefix, cfg, transfer, part_bytes_hint)?;
                (Box::new(b), a)
            }
            DestinationUrl::Oci { bucket, prefix } => {
                let (b, a) =
                    oci::OciBackend::new(name, &bucket, prefix, cfg, transfer, part_bytes_hint)?;
                (Box::new(b), a)
            }
        };
        Ok(Destination {
            name: name.to_string(),
            url: cfg.url.clone(),
            address,
            backend,
            parallel_parts: cfg.parallel_parts.unwrap_or(transfer.parallel_parts),
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
    /// The URL of object `name`: the key, encoded once.
    pub fn object_url(&self, name: &str) -> String {
        self.backend.object_url(name)
    }
    /// The URL OCI's CreateImage can import object `name` from, or why this
    /// destination has none.
    pub fn import_url(&self, name: &str) -> Result<String, String> {
        self.backend.import_url(name)
    }
    /// The key of `name` as a person reads it (prefix + name).
    pub fn key(&self, name: &str) -> String {
        self.backend.key(name)
    }
    /// Starts an upload of `name`; returns its id, to be journaled.
    pub async fn begin(&self, name: &str) -> Result<String, StoreError> {
        self.backend.begin(name).await
    }
    /// Sends one part. Safe to repeat: a part sent twice replaces itself.
    pub async fn put_part(
        &self,
        name: &str,
        upload_id: &str,
        part: &Part,
    ) -> Result<PartReceipt, StoreError> {
        let part_id = self.backend.put_part(name, upload_id, part).await?;
        Ok(PartReceipt {
            index: part.index(),
            part_id,
            size_bytes: part.len(),
            crc32c: part.crc32c(),
        })
    }
    /// Finishes an upload from its receipts, in part order; returns the
    /// whole object's CRC32C when the store computed one.
    pub async fn complete(
        &self,
        name: &str,
        upload_id: &str,
        receipts: &[PartReceipt],
    ) -> Result<Option<u32>, StoreError> {
        self.backend.complete(name, upload_id, receipts).await
    }
    /// Whether a finished object's head gives its whole CRC32C.
    pub fn keeps_whole_crc32c(&self) -> bool {
        self.backend.keeps_whole_crc32c()
    }
    /// What the store checks of each part on arrival (see [`Backend::server_check`]).
    pub fn server_check(&self) -> &'static str {
        self.backend.server_check()
    }
    /// The parts the store holds of an unfinished upload, where it lists them.
    pub async fn listed_parts(
        &self,
        name: &str,
        upload_id: &str,
    ) -> Result<Option<Vec<ListedPart>>, StoreError> {
        self.backend.listed_parts(name, upload_id).await
    }
    /// Abandons an upload and frees what the store kept of it.
    pub async fn abort(&self, name: &str, upload_id: &str) -> Result<(), StoreError> {
        self.backend.abort_key(&self.key(name), upload_id).await
    }
    /// Abandons the upload `upload_id` of `key` as [`Destination::key`] gave it
    /// when the upload began (a journal record's key, whatever the prefix
    /// configured now).
    pub async fn abort_key(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.backend.abort_key(key, upload_id).await
    }
    /// Size (and part count where the store tells) of a finished object.
    pub async fn head(&self, name: &str) -> Result<ObjectInfo, StoreError> {
        self.backend.head(name).await
    }
    /// Reads the whole object back; returns its size and CRC32C.
    pub async fn readback(&self, name: &str) -> Result<(u64, u32), StoreError> {
        self.backend.readback(name).await
    }
    /// Writes a small object (the manifest) in one request, replacing any old one.
    pub async fn put_small(&self, name: &str, body: Bytes) -> Result<(), StoreError> {
        self.backend.put_small(name, body).await
    }
    /// Reads a small object whole (a manifest, a test).
    pub async fn get_small(&self, name: &str) -> Result<Bytes, StoreError> {
        self.backend.get_small(name).await
    }
    /// Removes what interrupted writes left in a file:// directory: temp files
    /// of small writes (never valid) and staging files of uploads no journal
    /// names (`live` holds the upload ids still journaled), such as one whose
    /// process died between creating it and journaling its id. The daemon
    /// calls this at start; it owns its file:// directories, so a `ferry push`
    /// into the same directory at that moment would lose its staging file and
    /// fail (never complete a wrong object).
    pub async fn sweep(&self, live: &HashSet<String>) {
        self.backend.sweep(live).await
    }
    /// A cheap request that shows the destination can take a part (for
    /// `/readyz`): a store answers; a directory takes a file and has room
    /// for at least one part.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.backend.probe(self.part_bytes).await
    }
}

/// What stays as it is in a URL path: RFC 3986's unreserved characters and
/// the '/' between segments; every other byte is percent-encoded.
const URL_PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// A key or path as it goes into a manifest's URL.
pub(crate) fn url_escape(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URL_PATH).to_string()
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}
