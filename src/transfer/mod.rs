//! One job: a file read once and uploaded to every destination at the same time.
//!
//! Promises:
//! - each part is read from disk once and handed to every destination as the same
//!   `Bytes` (no copy); the memory of all parts in flight stays within the budget;
//! - each destination uploads with its own concurrency and its own retries; a slow
//!   or failing destination never stalls the others;
//! - a destination reports success only after its object verified (size and part
//!   count, or a full read-back and CRC32C) and its manifest was written;
//! - every request is retried a bounded number of times with exponential backoff
//!   and full jitter.
//!
//! Design choice: no lockstep. The reader runs ahead for the fastest destination.
//! When the budget is full and one destination holds more than its share of it in
//! unsent parts, that destination is *detached*: its queued parts are dropped, the
//! reader stops feeding it, and it reads the rest of its parts itself (from the
//! page cache, usually: from then on the reader leaves the pages there, and the
//! job's end releases them). The others keep the single read; the laggard costs
//! a second read instead of costing everyone time. Destinations that merely
//! differ a little in speed are never detached, because the budget absorbs the
//! difference.
//!
//! Rooms: `prepare.rs` (what a job needs before a byte is sent), `fan_out.rs`
//! (the single read, handed to every destination), `worker.rs` (one
//! destination's upload), `retry.rs` (bounded retries), `verify.rs` (the last
//! check and the manifest). [`run`] is about 90 lines on purpose: it is the
//! whole wiring of a job (the reader, a feed and a worker per destination, the
//! fan-out, the outcomes gathered), read top to bottom in one place.

mod fan_out;
mod prepare;
mod retry;
mod verify;
mod worker;

pub use prepare::{
    Converting, PrepareError, SIDECAR_BESIDE, check_import, conversion_record_of, destinations,
    inspect_object, inspect_or_convert, object_report, plan_for, shipped,
};
pub use retry::{Halt, RetryPolicy, retry};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::warn;

use crate::chunk::{self, Budget, FirstReads, PartPlan};
use crate::config::{ReaderKind, VerifyMode};
use crate::error::Class;
use crate::events::Observer;
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::shutdown::Shutdown;
use crate::source::{Change, Source};
use crate::store::{Destination, PartReceipt, StoreError};

use fan_out::{Feed, fan_out, in_flight_share};
use worker::Worker;

/// Why a destination did not verify.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("reading the source failed: {0}")]
    Read(String),
    /// The finished object is not what was sent: parts missing, another size.
    #[error("verification failed: {0}")]
    Verify(String),
    /// The object read back does not give the file's size and CRC32C.
    #[error(
        "verification failed: read back {size} bytes with CRC32C {}, expected {} bytes with {}",
        crate::manifest::crc_hex(*crc32c),
        expected_size,
        crate::manifest::crc_hex(*expected_crc32c)
    )]
    Mismatch {
        size: u64,
        crc32c: u32,
        expected_size: u64,
        expected_crc32c: u32,
    },
    /// The store's CRC32C of the whole object is not the file's.
    #[error(
        "verification failed: the store computed CRC32C {} over the whole object, the file's is {}",
        crate::manifest::crc_hex(*crc32c),
        crate::manifest::crc_hex(*expected_crc32c)
    )]
    ServerMismatch { crc32c: u32, expected_crc32c: u32 },
    /// What was read from a bucket does not give the checksum its store
    /// keeps (`what`: CRC32C or MD5), after every part was read again.
    #[error(
        "the source's bytes as read give {what} {got}, its store keeps {expected}, even after reading every part again {} times",
        verify::REPAIR_ROUNDS
    )]
    SourceMismatch {
        what: &'static str,
        got: String,
        expected: String,
    },
    #[error("stopped before finishing")]
    Cancelled,
    /// The source changed: nothing read from it may be completed anywhere.
    #[error("the source changed while uploading: {0}")]
    Changed(Change),
}

/// Where a destination's upload stood when the job was interrupted.
#[derive(Debug, Clone)]
pub struct Resume {
    pub upload_id: String,
    pub receipts: Vec<PartReceipt>,
}

/// What to upload.
pub struct Job {
    /// The object's name under each destination's prefix.
    pub name: String,
    /// The open file, checked for changes after each part read and before each
    /// object is completed.
    pub source: Source,
    /// The CRC32C of each part's first read (seeded from the journal on resume).
    pub first_reads: Arc<FirstReads>,
    pub plan: PartPlan,
    pub reader: ReaderKind,
    pub verify: VerifyMode,
    pub retry: RetryPolicy,
    /// What inspection found, for the manifest and the CreateImage body.
    pub image: Option<crate::image::Report>,
    /// A later attempt resumes this job (the daemon, with its journal): an upload
    /// that was stopped or failed for a passing reason (network, 5xx) is kept for
    /// it. Nothing resumes a `ferry push`: every upload it does not complete is
    /// aborted, including when it is interrupted.
    pub resumable: bool,
    /// The bandwidth limits every part pays into before it is sent.
    pub bandwidth: Arc<crate::bandwidth::Bandwidth>,
    /// Leave the image's pages in the page cache (`daemon.keep_cache`);
    /// else each part's are released once it is read.
    pub keep_cache: bool,
}

/// What to do about an image that changed while ferry had it.
/// What to do when a completed object is not the file's.
pub const MISMATCH_ADVICE: &str = "The object now at the key of the destination named is not the file's (no manifest was written beside it, so nothing reports it verified): delete it, look for what changes bytes on the way (a proxy, a faulty NIC or memory on this host), then move the file from failed/ back into the spool.";
/// What to do when an object source does not match its store's checksum.
pub const SOURCE_MISMATCH_ADVICE: &str = "Nothing was completed. Read the source object with another tool and compare its CRC32C with the one its store keeps; if they differ the object is damaged at the source (export it again), else look for what changes bytes on the way (a proxy, a faulty NIC or memory on this host).";
pub const CHANGED_ADVICE: &str = "Make sure the producer has finished writing before the file appears in the spool (write X.partial, then rename it to X) and that nothing writes to it afterwards; then put it back. Nothing was completed from the changed bytes.";

/// What to do about destinations that did not verify.
pub const DESTINATION_ADVICE: &str = "Check the named destinations (reachable, credentials, bucket exists), then move the file from failed/ back into the spool; destinations that verified are uploaded again.";

impl TransferError {
    /// A stop request and a store's passing failures are [`Class::Retry`]; a
    /// changed source is [`Class::Refuse`] (the file is at fault); a read
    /// error, a failed verification and a store's lasting failures are
    /// [`Class::Fatal`] for this destination's upload.
    pub fn class(&self) -> Class {
        match self {
            TransferError::Store(e) => e.class(),
            TransferError::Cancelled => Class::Retry,
            TransferError::Changed(_) => Class::Refuse,
            TransferError::Read(_)
            | TransferError::Verify(_)
            | TransferError::Mismatch { .. }
            | TransferError::ServerMismatch { .. }
            | TransferError::SourceMismatch { .. } => Class::Fatal,
        }
    }

    /// What the operator should do.
    pub fn advice(&self) -> &'static str {
        match self {
            TransferError::Changed(_) => CHANGED_ADVICE,
            TransferError::Store(e) if e.class() == Class::Refuse => {
                "Rename the file as the reason says, then put it back in the spool."
            }
            TransferError::Mismatch { .. } | TransferError::ServerMismatch { .. } => {
                MISMATCH_ADVICE
            }
            TransferError::SourceMismatch { .. } => SOURCE_MISMATCH_ADVICE,
            _ => DESTINATION_ADVICE,
        }
    }
}

/// The result for one destination.
#[derive(Debug)]
pub struct Outcome {
    pub destination: String,
    pub url: String,
    pub key: String,
    pub result: Result<Manifest, TransferError>,
}

/// Runs one job to every destination and returns one outcome per destination.
pub async fn run(
    job: Arc<Job>,
    destinations: Vec<Arc<Destination>>,
    budget: Budget,
    progress: Arc<Progress>,
    mut resume: HashMap<String, Resume>,
    observer: Arc<dyn Observer>,
    cancel: Shutdown,
) -> Vec<Outcome> {
    let reader = chunk::reader(
        job.reader,
        job.source.clone(),
        job.plan,
        job.first_reads.clone(),
        if job.keep_cache {
            chunk::Cache::Keep
        } else {
            chunk::Cache::Release
        },
    );
    let read_error: Arc<Mutex<Option<String>>> = Arc::default();
    // More than a part queued while another destination starves (see detach_laggard).
    let lag_limit = if destinations.len() <= 1 {
        u64::MAX
    } else {
        job.plan.part_bytes
    };
    let max_in_flight = in_flight_share(
        budget.limit_bytes(),
        job.plan.part_bytes,
        destinations.len(),
    );

    let zeroed_before = crate::mapping::zeroed_faults();
    let mut feeds = Vec::new();
    let mut workers = JoinSet::new();
    for (slot, dest) in destinations.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicU64::new(0));
        let detached = Arc::new(fan_out::Detach::default());
        let resumed =
            worker::as_held(dest, &job, &*observer, &cancel, resume.remove(dest.name())).await;
        let skip: HashSet<u32> = resumed
            .as_ref()
            .map(|r| r.receipts.iter().map(|p| p.index).collect())
            .unwrap_or_default();
        let skip = Arc::new(skip);
        feeds.push(Feed {
            tx: Some(tx),
            queued_bytes: queued.clone(),
            detached: detached.clone(),
            skip: skip.clone(),
        });
        let ctx = Worker {
            job: job.clone(),
            dest: dest.clone(),
            reader: reader.clone(),
            budget: budget.clone(),
            progress: progress.clone(),
            observer: observer.clone(),
            read_error: read_error.clone(),
            queued,
            detached,
            max_in_flight,
            cancel: cancel.clone(),
            zeroed_before,
        };
        workers.spawn(async move {
            let result = ctx.upload(rx, resumed).await;
            (slot, result)
        });
    }

    let reader_end = reader.clone();
    let fan_out = tokio::spawn(fan_out(
        reader, budget, feeds, lag_limit, read_error, observer, cancel,
    ));

    let mut results: Vec<Option<Result<Manifest, TransferError>>> =
        destinations.iter().map(|_| None).collect();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((slot, r)) => results[slot] = Some(r),
            Err(e) => warn!("a destination task ended abnormally: {e}"),
        }
    }
    let _ = fan_out.await;
    // The pages kept for a destination that fell behind, and any the kernel
    // held on to, leave the page cache now.
    let _ = tokio::task::spawn_blocking(move || reader_end.release_all()).await;
    let zeroed = crate::mapping::zeroed_faults().saturating_sub(zeroed_before);
    if zeroed > 0 {
        warn!(
            "{}: {zeroed} read(s) of mapped pages that could not be read (a file cut short, or an I/O error) were answered with zeros instead of ending ferry (SIGBUS); no object was completed after them",
            job.name
        );
    }
    outcomes(&job.name, &destinations, results)
}

/// One outcome per destination, in their order.
fn outcomes(
    name: &str,
    destinations: &[Arc<Destination>],
    results: Vec<Option<Result<Manifest, TransferError>>>,
) -> Vec<Outcome> {
    destinations
        .iter()
        .zip(results)
        .map(|(d, r)| Outcome {
            destination: d.name().to_string(),
            url: d.url().to_string(),
            key: d.key(name),
            result: r.unwrap_or_else(|| {
                Err(TransferError::Read(
                    "the destination task ended abnormally".into(),
                ))
            }),
        })
        .collect()
}
