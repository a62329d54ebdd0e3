//! An object in a bucket as a source (`ferry push s3://...`, `oci://...`).
//!
//! Promises:
//! - the object is pinned by the ETag its store answered when it was opened:
//!   every range is read with `If-Match` on it, so every byte shipped belongs
//!   to that one version, and a replaced object answers 412, which marks the
//!   source changed (nothing read from it is completed anywhere);
//! - each range's CRC32C is computed as its bytes arrive, and the store's
//!   own checksum of the whole object ([`Stored`]) is what the combined
//!   CRC32C of the parts must equal before any destination completes (the
//!   transfer does that check; a range corrupted on the way is read again);
//! - a failed range is tried again, a bounded number of times, before the
//!   read fails.
//!
//! Design choice: the stores that can be sources implement [`Remote`] (in
//! `store`); this module knows no store, so `chunk` and `transfer` read an
//! object as they read a file, through [`Object::read_into`], which blocks on
//! the runtime from a blocking thread as `pread` would.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

/// The bytes of a range, as they arrive.
pub type Chunks = futures::stream::BoxStream<'static, Result<Bytes, RangeError>>;

/// Why a range could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RangeError {
    /// The object is no longer the version opened (its ETag moved).
    #[error("{0}")]
    Changed(String),
    /// The read failed (network, the store's error, a short answer).
    #[error("{0}")]
    Failed(String),
}

/// A store's reads of one object by ranges (S3 and OCI implement it).
#[async_trait::async_trait]
pub trait Remote: Send + Sync + std::fmt::Debug {
    /// Bytes `offset..offset + len` of the object, only while its ETag is
    /// `etag` (412 → [`RangeError::Changed`]).
    async fn range(&self, offset: u64, len: u64, etag: &str) -> Result<Chunks, RangeError>;
}

/// The checksum the source's store keeps of the whole object, which what
/// ferry reads must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// OCI's `opc-content-crc32c`, or S3's full-object
    /// `x-amz-checksum-crc32c` (asked for with checksum mode on).
    Crc32c(u32),
    /// An S3 object uploaded in one PUT without SSE-KMS or SSE-C, whose
    /// store keeps no CRC32C: its ETag is the MD5 of its bytes.
    Md5([u8; 16]),
    /// The store keeps no checksum ferry can check the whole object with
    /// (a multipart upload without a full-object checksum, an encrypted
    /// object): shipped with that said in the manifest.
    Unknown,
}

impl Stored {
    /// How the manifest names what the source's bytes were checked against.
    pub fn basis(&self) -> &'static str {
        match self {
            Stored::Crc32c(_) => "crc32c-stored",
            Stored::Md5(_) => "md5-etag",
            Stored::Unknown => "none",
        }
    }
}

/// Tries of one range before its read fails: 0.5 + 1 + 2 + 4 + 8 s apart,
/// enough for a store's throttling or a restart.
const RANGE_TRIES: u32 = 6;

/// An object opened as a source.
#[derive(Debug)]
pub struct Object {
    /// The object's URL (`s3://bucket/key`, `oci://bucket/key`).
    pub url: String,
    pub etag: String,
    pub size_bytes: u64,
    pub stored: Stored,
    /// Ranges read at once (`transfer.parallel_parts`).
    pub parallel_reads: usize,
    remote: Arc<dyn Remote>,
    runtime: tokio::runtime::Handle,
    /// For [`Stored::Md5`]: the MD5 of the parts the fan-out read, in order.
    digest: std::sync::Mutex<InOrder>,
}

/// An MD5 over parts handed over in index order, with each part's CRC32C
/// (what a destination sent must be these bytes).
#[derive(Default)]
struct InOrder {
    md5: md5::Md5,
    crcs: Vec<u32>,
    /// A part came out of order (a resumed destination skipped some): the
    /// digest cannot be made, and the parts are read again to check them.
    broken: bool,
}

impl std::fmt::Debug for InOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InOrder")
            .field("parts", &self.crcs.len())
            .field("broken", &self.broken)
            .finish()
    }
}

impl Object {
    /// Called from the runtime that will serve the reads.
    pub fn new(
        url: String,
        etag: String,
        size_bytes: u64,
        stored: Stored,
        parallel_reads: usize,
        remote: Arc<dyn Remote>,
    ) -> Object {
        Object {
            url,
            etag,
            size_bytes,
            stored,
            parallel_reads: parallel_reads.max(1),
            remote,
            runtime: tokio::runtime::Handle::current(),
            digest: std::sync::Mutex::default(),
        }
    }

    /// Part `index` (its bytes and CRC32C) as the fan-out hands it on, in
    /// order: hashed where the store's checksum is an MD5.
    pub fn digest_part(&self, index: u32, bytes: &[u8], crc32c: u32) {
        if !matches!(self.stored, Stored::Md5(_)) {
            return;
        }
        let Ok(mut d) = self.digest.lock() else {
            return;
        };
        if d.broken || (index as usize) < d.crcs.len() {
            return;
        }
        if index as usize != d.crcs.len() {
            d.broken = true;
            return;
        }
        md5::Digest::update(&mut d.md5, bytes);
        d.crcs.push(crc32c);
    }

    /// The MD5 of the `count` parts the fan-out handed on and each one's
    /// CRC32C, once all were, in order.
    pub fn digested(&self, count: u32) -> Option<([u8; 16], Vec<u32>)> {
        let d = self.digest.lock().ok()?;
        if d.broken || d.crcs.len() != count as usize {
            return None;
        }
        let md5: [u8; 16] = md5::Digest::finalize(d.md5.clone()).into();
        Some((md5, d.crcs.clone()))
    }

    /// Fills `buf` with the object's bytes from `offset` and returns their
    /// CRC32C, computed as they arrive. Blocks: call it from a blocking
    /// thread, never from the runtime's own.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<u32, RangeError> {
        self.runtime.block_on(self.read_async(offset, buf))
    }

    async fn read_async(&self, offset: u64, buf: &mut [u8]) -> Result<u32, RangeError> {
        let mut last = None;
        // Bounded: RANGE_TRIES tries. The pause blocks this (blocking)
        // thread, not a timer of the runtime, which may be shutting down.
        for attempt in 0..RANGE_TRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500 << (attempt - 1)));
            }
            match self.try_read(offset, buf).await {
                Ok(crc) => return Ok(crc),
                Err(RangeError::Changed(why)) => return Err(RangeError::Changed(why)),
                Err(RangeError::Failed(why)) => {
                    tracing::warn!(
                        "{}: reading bytes {offset}..{} failed ({why}); trying again",
                        self.url,
                        offset + buf.len() as u64
                    );
                    last = Some(why);
                }
            }
        }
        Err(RangeError::Failed(format!(
            "bytes {offset}..{} failed {RANGE_TRIES} times, last: {}",
            offset + buf.len() as u64,
            last.unwrap_or_default()
        )))
    }

    async fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<u32, RangeError> {
        let want = buf.len();
        let mut chunks = self.remote.range(offset, want as u64, &self.etag).await?;
        let (mut at, mut crc) = (0usize, 0u32);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            let end = at + chunk.len();
            if end > want {
                return Err(RangeError::Failed(format!(
                    "the store sent more than the {want} bytes asked for"
                )));
            }
            buf[at..end].copy_from_slice(&chunk);
            crc = crate::crc::crc32c_append(crc, &chunk);
            at = end;
        }
        if at != want {
            return Err(RangeError::Failed(format!(
                "the store sent {at} of the {want} bytes asked for"
            )));
        }
        Ok(crc)
    }
}
