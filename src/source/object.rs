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
    /// The store keeps no checksum ferry can check the whole object with
    /// (an S3 object uploaded without one, or with a per-part composite):
    /// shipped with that said in the manifest.
    Unknown,
}

impl Stored {
    /// How the manifest names what the source's bytes were checked against.
    pub fn basis(&self) -> &'static str {
        match self {
            Stored::Crc32c(_) => "crc32c-stored",
            Stored::Unknown => "none",
        }
    }
}

/// Tries of one range before its read fails.
const RANGE_TRIES: u32 = 4;

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
        }
    }

    /// Fills `buf` with the object's bytes from `offset` and returns their
    /// CRC32C, computed as they arrive. Blocks: call it from a blocking
    /// thread, never from the runtime's own.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<u32, RangeError> {
        self.runtime.block_on(self.read_async(offset, buf))
    }

    async fn read_async(&self, offset: u64, buf: &mut [u8]) -> Result<u32, RangeError> {
        let mut last = None;
        // Bounded: RANGE_TRIES tries, at most 0.25 + 0.5 + 1 s apart.
        for attempt in 0..RANGE_TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << (attempt - 1))).await;
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
            crc = crc32c::crc32c_append(crc, &chunk);
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
