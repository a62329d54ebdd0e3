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
//! page cache, usually). The others keep the single read; the laggard costs a
//! second read instead of costing everyone time. Destinations that merely differ
//! a little in speed are never detached, because the budget absorbs the difference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::chunk::{self, Budget, FirstReads, Part, PartPlan};
use crate::config::{ReaderKind, TransferConfig, VerifyMode};
use crate::events::Observer;
use crate::manifest::{self, DestinationEntry, Manifest, PartEntry};
use crate::progress::{Phase, Progress};
use crate::shutdown::Shutdown;
use crate::source::{Change, Source};
use crate::store::{Destination, PartReceipt, StoreError};

/// How requests are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub fn from_config(t: &TransferConfig) -> RetryPolicy {
        RetryPolicy {
            max_retries: t.max_retries,
            base: Duration::from_millis(t.retry_base_ms),
            max: Duration::from_millis(t.retry_max_ms),
        }
    }

    /// Full jitter: a random pause up to `min(max, base * 2^attempt)`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        cap.mul_f64(rand::random::<f64>())
    }
}

/// Why a destination did not verify.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("reading the source failed: {0}")]
    Read(String),
    #[error("verification failed: {0}")]
    Verify(String),
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
}

impl TransferError {
    /// A failure that may pass by itself (network, server errors, throttling).
    pub fn transient(&self) -> bool {
        matches!(self, TransferError::Store(e) if e.retryable())
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

struct Feed {
    tx: Option<mpsc::UnboundedSender<Part>>,
    queued_bytes: Arc<AtomicU64>,
    detached: Arc<AtomicBool>,
    skip: Arc<HashSet<u32>>,
}

impl Feed {
    fn live(&self) -> bool {
        self.tx.is_some()
    }
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
        let detached = Arc::new(AtomicBool::new(false));
        let resumed = resume.remove(dest.name());
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
    let zeroed = crate::mapping::zeroed_faults().saturating_sub(zeroed_before);
    if zeroed > 0 {
        warn!(
            "{}: {zeroed} read(s) of mapped pages that could not be read (a file cut short, or an I/O error) were answered with zeros instead of ending ferry (SIGBUS); no object was completed after them",
            job.name
        );
    }
    destinations
        .iter()
        .zip(results)
        .map(|(d, r)| Outcome {
            destination: d.name().to_string(),
            url: d.url().to_string(),
            key: d.key(&job.name),
            result: r.unwrap_or_else(|| {
                Err(TransferError::Read(
                    "the destination task ended abnormally".into(),
                ))
            }),
        })
        .collect()
}

/// Reads each part once, in order, and hands it to every destination that wants it.
async fn fan_out(
    reader: Arc<dyn chunk::Reader>,
    budget: Budget,
    mut feeds: Vec<Feed>,
    lag_limit: u64,
    read_error: Arc<Mutex<Option<String>>>,
    observer: Arc<dyn Observer>,
    cancel: Shutdown,
) {
    let plan = *reader.plan();
    for index in 0..plan.count {
        if cancel.is_requested() {
            return;
        }
        let len = plan.len(index);
        let wanted: Vec<usize> = feeds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.live() && !f.skip.contains(&index))
            .map(|(i, _)| i)
            .collect();
        if feeds.iter().all(|f| !f.live()) {
            return;
        }
        if wanted.is_empty() {
            continue;
        }
        let lease = loop {
            if let Some(l) = chunk::try_lease(&*reader, &budget, index) {
                break l;
            }
            detach_laggard(&mut feeds, lag_limit);
            if let Ok(l) =
                tokio::time::timeout(LAG_CHECK, chunk::lease(&*reader, &budget, index)).await
            {
                break l;
            }
        };
        let part = match chunk::read_leased(reader.clone(), index, lease).await {
            Ok(p) => p,
            Err(e) => {
                if let Ok(mut slot) = read_error.lock() {
                    *slot = Some(e.to_string());
                }
                return;
            }
        };
        observer.read_bytes(len);
        for i in wanted {
            let f = &mut feeds[i];
            let Some(tx) = &f.tx else { continue };
            f.queued_bytes.fetch_add(len, Ordering::Relaxed);
            if tx.send(part.clone()).is_err() {
                f.tx = None;
            }
        }
    }
}

/// Parts one destination may have on the wire at once when several share the
/// budget: its share of the budget, at least one. Parts in flight hold memory
/// until they are sent; without a share, a slow link with all of its
/// `parallel_parts` in flight holds the whole budget and the fast links wait for
/// it (the detaching of laggards only sees parts still queued).
fn in_flight_share(budget_bytes: u64, part_bytes: u64, destinations: usize) -> usize {
    if destinations <= 1 {
        return usize::MAX;
    }
    let parts = budget_bytes / part_bytes.max(1);
    ((parts / destinations as u64) as usize).max(1)
}

/// How often a reader waiting for memory looks for a destination to detach.
const LAG_CHECK: Duration = Duration::from_millis(100);

/// Detaches the destination holding the most unsent parts, if it holds more than
/// `lag_limit` while another destination has nothing left to send: then it is
/// holding the others back. When every destination still has parts queued, a
/// full budget is plain back-pressure (the store is the bottleneck), and the
/// parts keep being read once.
fn detach_laggard(feeds: &mut [Feed], lag_limit: u64) {
    let queued = |f: &Feed| f.queued_bytes.load(Ordering::Relaxed);
    let starving = feeds.iter().filter(|f| f.live() && queued(f) == 0).count();
    let worst = feeds
        .iter_mut()
        .filter(|f| f.live())
        .max_by_key(|f| f.queued_bytes.load(Ordering::Relaxed));
    if let Some(f) = worst
        && starving > 0
        && queued(f) > lag_limit
    {
        f.detached.store(true, Ordering::Release);
        // Dropping the sender wakes a worker waiting in recv; the worker drops
        // the parts still queued, which returns their memory.
        f.tx = None;
    }
}

struct Worker {
    job: Arc<Job>,
    dest: Arc<Destination>,
    reader: Arc<dyn chunk::Reader>,
    budget: Budget,
    progress: Arc<Progress>,
    observer: Arc<dyn Observer>,
    read_error: Arc<Mutex<Option<String>>>,
    queued: Arc<AtomicU64>,
    detached: Arc<AtomicBool>,
    /// This destination's share of parts in flight (see [`in_flight_share`]).
    max_in_flight: usize,
    cancel: Shutdown,
    /// `mapping::zeroed_faults()` when the job began.
    zeroed_before: u64,
}

impl Worker {
    async fn upload(
        &self,
        rx: mpsc::UnboundedReceiver<Part>,
        resumed: Option<Resume>,
    ) -> Result<Manifest, TransferError> {
        let was_resumed = resumed.is_some();
        let dp = self.progress.get(self.dest.name());
        let result = self.blame(self.attempt(Some(rx), resumed, dp.as_deref()).await);
        let result = match result {
            Err(TransferError::Store(e)) if was_resumed && !e.retryable() => {
                // The store no longer knows the upload (expired, aborted by hand,
                // or a record from before a restart of the store): start over.
                warn!(
                    destination = self.dest.name(),
                    "cannot continue the journaled upload of {} ({e}); starting it over",
                    self.job.name
                );
                self.observer.upload_restarted(self.dest.name());
                if let Some(dp) = &dp {
                    dp.reset();
                }
                self.blame(self.attempt(None, None, dp.as_deref()).await)
            }
            other => other,
        };
        if let Some(dp) = &dp {
            dp.set_phase(if result.is_ok() {
                Phase::Done
            } else {
                Phase::Failed
            });
        }
        if result.is_ok() {
            self.observer.verified(self.dest.name());
        }
        result
    }

    /// A failure while the source changed is the source's doing, whatever the
    /// destination answered (a short read, a part the store refused): say so.
    fn blame(&self, r: Result<Manifest, TransferError>) -> Result<Manifest, TransferError> {
        r.map_err(|e| self.blamed(e))
    }

    fn blamed(&self, e: TransferError) -> TransferError {
        if matches!(e, TransferError::Changed(_) | TransferError::Cancelled) {
            return e;
        }
        match self.job.source.check() {
            Err(c) => TransferError::Changed(c),
            Ok(()) => e,
        }
    }

    /// What ends this destination's retries early.
    fn halt(&self) -> Halt {
        Halt {
            cancel: self.cancel.clone(),
            source: Some(self.job.source.clone()),
        }
    }

    /// One go at the upload; without `rx` it reads every part itself.
    async fn attempt(
        &self,
        rx: Option<mpsc::UnboundedReceiver<Part>>,
        resumed: Option<Resume>,
        dp: Option<&crate::progress::DestinationProgress>,
    ) -> Result<Manifest, TransferError> {
        let started = SystemTime::now();
        let name = self.job.name.clone();
        let (upload_id, mut receipts) = match resumed {
            Some(r) => {
                self.observer.resumed(self.dest.name());
                info!(
                    destination = self.dest.name(),
                    "resuming upload of {name}: {} of {} parts already sent",
                    r.receipts.len(),
                    self.job.plan.count
                );
                let done: BTreeMap<u32, PartReceipt> =
                    r.receipts.into_iter().map(|p| (p.index, p)).collect();
                (r.upload_id, done)
            }
            None => {
                let id = retry(
                    &self.job.retry,
                    self.dest.name(),
                    &*self.observer,
                    &self.halt(),
                    || self.dest.begin(&name),
                )
                .await?;
                crate::failpoint::reached("begin");
                (id, BTreeMap::new())
            }
        };
        self.observer.upload_started(self.dest.name(), &upload_id);
        if let Some(dp) = dp {
            dp.add(receipts.values().map(|r| r.size_bytes).sum());
        }

        let sent = self.send_parts(rx, &upload_id, &mut receipts, dp).await;
        if let Err(e) = sent {
            // Blamed before deciding: an upload of a changed source is never kept.
            let e = self.blamed(e);
            if !self.keeps_upload(&e) {
                self.abort(&upload_id).await;
            }
            return Err(e);
        }
        if let Some(dp) = dp {
            dp.set_phase(Phase::Verifying);
        }
        let receipts: Vec<PartReceipt> = receipts.into_values().collect();
        self.finish(&upload_id, &receipts, started).await
    }

    /// An upload that failed with `e` is kept for a later attempt (stopped, or
    /// failed for a passing reason, in a job that resumes); else aborted.
    fn keeps_upload(&self, e: &TransferError) -> bool {
        self.job.resumable && (matches!(e, TransferError::Cancelled) || e.transient())
    }

    async fn abort(&self, upload_id: &str) {
        match self.dest.abort(&self.job.name, upload_id).await {
            Ok(()) => self.observer.upload_aborted(self.dest.name()),
            Err(e) => warn!(
                destination = self.dest.name(),
                "could not abort the upload of {}: {e}", self.job.name
            ),
        }
    }

    async fn send_parts(
        &self,
        rx: Option<mpsc::UnboundedReceiver<Part>>,
        upload_id: &str,
        receipts: &mut BTreeMap<u32, PartReceipt>,
        dp: Option<&crate::progress::DestinationProgress>,
    ) -> Result<(), TransferError> {
        let slots = Arc::new(Semaphore::new(
            self.dest.parallel_parts().min(self.max_in_flight),
        ));
        let mut tasks: JoinSet<Sent> = JoinSet::new();
        let mut self_read = rx.is_none();
        let mut rx = rx.unwrap_or_else(|| mpsc::unbounded_channel().1);
        let cancel = self.cancel.clone();
        let plan = self.job.plan;
        type Sent = Result<(PartReceipt, Duration), TransferError>;
        let reap = |r: Result<Sent, tokio::task::JoinError>,
                    receipts: &mut BTreeMap<u32, PartReceipt>|
         -> Result<(), TransferError> {
            match r {
                Ok(Ok((receipt, took))) => {
                    if let Some(dp) = dp {
                        dp.add(receipt.size_bytes);
                    }
                    self.observer.part_done(self.dest.name(), &receipt, took);
                    crate::failpoint::reached("part");
                    receipts.insert(receipt.index, receipt);
                    Ok(())
                }
                Ok(Err(e)) => {
                    self.observer.part_failed(self.dest.name());
                    Err(e)
                }
                Err(e) => Err(TransferError::Read(format!("part task failed: {e}"))),
            }
        };
        for index in 0..plan.count {
            if receipts.contains_key(&index) {
                continue;
            }
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => s.expect("never closed"),
                _ = cancel.requested() => break,
            };
            while let Some(r) = tasks.try_join_next() {
                reap(r, receipts)?;
            }
            if !self_read && self.detached.load(Ordering::Acquire) {
                self_read = true;
                self.note_detached(index);
                // Drop what is still queued: that returns its memory to the budget.
                rx.close();
                while let Ok(p) = rx.try_recv() {
                    self.queued.fetch_sub(p.len(), Ordering::Relaxed);
                }
            }
            let part = if self_read {
                self.read_self(index).await?
            } else {
                match rx.recv().await {
                    Some(p) => {
                        self.queued.fetch_sub(p.len(), Ordering::Relaxed);
                        p
                    }
                    None if self.detached.load(Ordering::Acquire) => {
                        self_read = true;
                        self.note_detached(index);
                        self.read_self(index).await?
                    }
                    None => {
                        if cancel.is_requested() {
                            break;
                        }
                        // The reader stopped: a changed source is the usual reason.
                        self.job.source.check().map_err(TransferError::Changed)?;
                        let why = self
                            .read_error
                            .lock()
                            .ok()
                            .and_then(|e| e.clone())
                            .unwrap_or_else(|| "the reader stopped".into());
                        return Err(TransferError::Read(why));
                    }
                }
            };
            debug_assert_eq!(part.index(), index);
            let dest = self.dest.clone();
            let name = self.job.name.clone();
            let id = upload_id.to_string();
            let policy = self.job.retry;
            let observer = self.observer.clone();
            let halt = self.halt();
            tasks.spawn(async move {
                let _slot = slot;
                let started = std::time::Instant::now();
                retry(&policy, dest.name(), &*observer, &halt, || {
                    dest.put_part(&name, &id, &part)
                })
                .await
                .map(|r| (r, started.elapsed()))
            });
        }
        if self.cancel.is_requested() && !self.job.resumable {
            // Nothing resumes this upload: drop the parts on the wire at once.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            return Err(TransferError::Cancelled);
        }
        while let Some(r) = tasks.join_next().await {
            reap(r, receipts)?;
        }
        if self.cancel.is_requested() && receipts.len() < plan.count as usize {
            return Err(TransferError::Cancelled);
        }
        Ok(())
    }

    fn note_detached(&self, index: u32) {
        info!(
            destination = self.dest.name(),
            "{} falls behind the others; it reads its own parts from part {index}",
            self.dest.name()
        );
    }

    async fn read_self(&self, index: u32) -> Result<Part, TransferError> {
        let part = chunk::read(self.reader.clone(), &self.budget, index)
            .await
            .map_err(|e| match e {
                chunk::ReadError::Changed(c) => TransferError::Changed(c),
                e => TransferError::Read(e.to_string()),
            })?;
        self.observer.read_bytes(part.len());
        Ok(part)
    }

    async fn finish(
        &self,
        upload_id: &str,
        receipts: &[PartReceipt],
        started: SystemTime,
    ) -> Result<Manifest, TransferError> {
        let name = &self.job.name;
        let plan = self.job.plan;
        let policy = &self.job.retry;
        let dn = self.dest.name();
        // Every part was sent before this check: a change it does not see
        // happened after the last byte left, and cannot be in the object.
        if let Err(c) = self.job.source.check() {
            self.abort(upload_id).await;
            return Err(TransferError::Changed(c));
        }
        // A mapped page that could not be read was answered with zeros, which
        // may have gone out in a part: nothing read since then is trusted. The
        // count is the process's, so another job's fault also stops this one:
        // a spurious failure, never a wrong copy.
        if self.job.reader == ReaderKind::Mmap
            && crate::mapping::zeroed_faults() != self.zeroed_before
        {
            self.abort(upload_id).await;
            return Err(TransferError::Read(
                "a mapped page of the source could not be read (SIGBUS: an I/O error, or a file cut short) and read as zeros; nothing was completed".into(),
            ));
        }
        let halt = self.halt();
        let complete = retry(policy, dn, &*self.observer, &halt, || {
            self.dest.complete(name, upload_id, receipts)
        })
        .await;
        if let Err(e) = complete {
            // A retried complete may fail only because an earlier attempt succeeded
            // and its answer was lost: let verification decide.
            warn!(
                destination = dn,
                "completing {name} failed ({e}); checking the object"
            );
            if self.verify(receipts).await.is_err() {
                let e = self.blamed(e);
                if !self.keeps_upload(&e) {
                    self.abort(upload_id).await;
                }
                return Err(e);
            }
        }
        crate::failpoint::reached("complete");
        let crc = match self.verify(receipts).await {
            Ok(crc) => crc,
            Err(e) => {
                let checksum = matches!(&e, TransferError::Verify(m) if m.contains("CRC32C"));
                self.observer.verify_failed(dn, checksum);
                return Err(e);
            }
        };
        let m = Manifest {
            manifest_version: manifest::FORMAT_VERSION,
            ferry_version: crate::VERSION.to_string(),
            file_name: name.clone(),
            file_size_bytes: plan.file_bytes,
            part_size_bytes: plan.part_bytes,
            part_count: plan.count,
            crc32c: manifest::crc_hex(crc),
            crc32c_base64: manifest::crc_base64(crc),
            parts: receipts
                .iter()
                .map(|r| PartEntry {
                    index: r.index,
                    offset: plan.offset(r.index),
                    size_bytes: r.size_bytes,
                    crc32c: manifest::crc_hex(r.crc32c),
                })
                .collect(),
            destination: DestinationEntry {
                name: dn.to_string(),
                url: self.dest.url().to_string(),
                key: self.dest.key(name),
            },
            verify: match self.job.verify {
                VerifyMode::Head => "head".into(),
                VerifyMode::Readback => "readback".into(),
            },
            source_host: manifest::hostname(),
            started_at: manifest::timestamp(started),
            finished_at: manifest::timestamp(SystemTime::now()),
            image: self.image_fields(),
        };
        let body = bytes::Bytes::from(m.to_json());
        let mname = format!("{name}{}", manifest::MANIFEST_SUFFIX);
        retry(policy, dn, &*self.observer, &halt, || {
            self.dest.put_small(&mname, body.clone())
        })
        .await?;
        crate::failpoint::reached("manifest");
        Ok(m)
    }

    fn image_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let Some(report) = &self.job.image else {
            return serde_json::Map::new();
        };
        let mut m = report.manifest_fields();
        m.insert(
            "oci_create_image".into(),
            crate::image::create_image_body(
                report,
                &self.dest.object_url(&self.job.name),
                &self.job.name,
            ),
        );
        m
    }

    /// Checks the finished object; returns its CRC32C.
    async fn verify(&self, receipts: &[PartReceipt]) -> Result<u32, TransferError> {
        let plan = self.job.plan;
        let name = &self.job.name;
        if receipts.len() != plan.count as usize
            || receipts
                .iter()
                .enumerate()
                .any(|(i, r)| r.index as usize != i)
        {
            return Err(TransferError::Verify(format!(
                "{} of {} parts were sent",
                receipts.len(),
                plan.count
            )));
        }
        let crc = chunk::combine(receipts.iter().map(|r| (r.crc32c, r.size_bytes)));
        let sent: u64 = receipts.iter().map(|r| r.size_bytes).sum();
        if sent != plan.file_bytes {
            return Err(TransferError::Verify(format!(
                "sent {sent} bytes of a {} byte file",
                plan.file_bytes
            )));
        }
        let dn = self.dest.name();
        match self.job.verify {
            VerifyMode::Head => {
                let info = retry(&self.job.retry, dn, &*self.observer, &self.halt(), || {
                    self.dest.head(name)
                })
                .await?;
                if info.size_bytes != plan.file_bytes {
                    return Err(TransferError::Verify(format!(
                        "the stored object has {} bytes, the file {}",
                        info.size_bytes, plan.file_bytes
                    )));
                }
                if let Some(n) = info.parts
                    && n != plan.count
                {
                    return Err(TransferError::Verify(format!(
                        "the stored object has {n} parts, {} were sent",
                        plan.count
                    )));
                }
            }
            VerifyMode::Readback => {
                let (size, got) = retry(&self.job.retry, dn, &*self.observer, &self.halt(), || {
                    self.dest.readback(name)
                })
                .await?;
                if size != plan.file_bytes || got != crc {
                    return Err(TransferError::Verify(format!(
                        "read back {size} bytes with CRC32C {}, expected {} bytes with {}",
                        manifest::crc_hex(got),
                        plan.file_bytes,
                        manifest::crc_hex(crc)
                    )));
                }
            }
        }
        Ok(crc)
    }
}

/// Why a job could not start (a push, or a daemon job). Nothing was uploaded.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("{0}")]
    Destination(String),
    /// `--part-size` (or the config's) that no store or the budget can take.
    #[error("{0}")]
    PartSize(String),
    #[error("{path}: {source}")]
    Plan {
        path: String,
        source: chunk::PlanError,
    },
    #[error(
        "part size {part} is larger than transfer.memory_limit {limit}: raise memory_limit or lower part_size"
    )]
    Budget { part: String, limit: String },
    #[error(transparent)]
    Inspect(#[from] crate::image::InspectError),
    #[error("refused {}: {}", .0.file, .0.reasons.join("; "))]
    Refused(Box<crate::image::Report>),
}

/// Inspects a source with its sidecar (`X.meta.json` beside it, if present);
/// a refusal is an error unless the policy or `force` says ship anyway.
pub fn inspect_source(
    path: &std::path::Path,
    sidecar: Option<&std::path::Path>,
    config: &crate::config::Config,
    daemon: bool,
    force: bool,
) -> Result<crate::image::Report, PrepareError> {
    let policy = crate::image::Policy::from_config(&config.policy, daemon);
    let report = crate::image::inspect(path, sidecar, &policy)?;
    if report.verdict == crate::image::Verdict::Refuse {
        if config.policy.refuse && !force {
            return Err(PrepareError::Refused(Box::new(report)));
        }
        warn!(
            "shipping {} although OCI would refuse it: {}",
            report.file,
            report.reasons.join("; ")
        );
    }
    Ok(report)
}

/// The plan for a file against every destination's limits and the budget.
pub fn plan_for(
    source: &Source,
    destinations: &[Arc<Destination>],
    part_size_bytes: u64,
    budget: &Budget,
) -> Result<PartPlan, PrepareError> {
    let limits = destinations
        .first()
        .map(|d| d.limits())
        .unwrap_or(chunk::PartLimits::S3);
    let plan = PartPlan::new(source.size_bytes, part_size_bytes, limits).map_err(|source_err| {
        PrepareError::Plan {
            path: source.path.display().to_string(),
            source: source_err,
        }
    })?;
    if plan.part_bytes > budget.limit_bytes() {
        return Err(PrepareError::Budget {
            part: bytesize::ByteSize(plan.part_bytes)
                .display()
                .iec()
                .to_string(),
            limit: bytesize::ByteSize(budget.limit_bytes())
                .display()
                .iec()
                .to_string(),
        });
    }
    Ok(plan)
}

/// Builds the destinations for a push or a job.
pub fn destinations(
    config: &crate::config::Config,
    to: &[String],
    part_bytes_hint: u64,
) -> Result<Vec<Arc<Destination>>, PrepareError> {
    let chosen =
        crate::store::resolve(&config.destinations, to).map_err(PrepareError::Destination)?;
    chosen
        .iter()
        .map(|(name, cfg)| {
            Destination::new(name, cfg, &config.transfer, part_bytes_hint)
                .map(Arc::new)
                .map_err(|e| PrepareError::Destination(format!("{name}: {e}")))
        })
        .collect()
}

/// What ends a retry loop early: a stop request (shutdown, Ctrl-C), or a
/// source that changed (no further try can make its copy right).
#[derive(Clone)]
pub struct Halt {
    pub cancel: Shutdown,
    pub source: Option<Source>,
}

impl Halt {
    /// Never halts (for callers with nothing to watch).
    pub fn never() -> Halt {
        Halt {
            cancel: Shutdown::never(),
            source: None,
        }
    }

    fn why(&self) -> Option<TransferError> {
        if let Some(s) = &self.source
            && let Err(c) = s.check()
        {
            return Some(TransferError::Changed(c));
        }
        if self.cancel.is_requested() {
            return Some(TransferError::Cancelled);
        }
        None
    }
}

/// Calls `f` until it succeeds, fails for good, the retries run out, or
/// `halt` says stop (also in the middle of a pause: a stop never waits for
/// a backoff to end).
pub async fn retry<T, F, Fut>(
    policy: &RetryPolicy,
    destination: &str,
    observer: &dyn Observer,
    halt: &Halt,
    mut f: F,
) -> Result<T, TransferError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        let e = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if let Some(why) = halt.why() {
            return Err(why);
        }
        if !e.retryable() || attempt >= policy.max_retries {
            return Err(e.into());
        }
        let pause = policy.backoff(attempt);
        let reason = e.reason();
        observer.retried(destination, reason);
        warn!(
            destination,
            reason,
            "attempt {} failed: {e}; retrying in {} ms",
            attempt + 1,
            pause.as_millis()
        );
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = halt.cancel.requested() => return Err(TransferError::Cancelled),
        }
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_share_the_parts_in_flight() {
        const MIB: u64 = 1 << 20;
        assert_eq!(in_flight_share(512 * MIB, 64 * MIB, 1), usize::MAX);
        assert_eq!(in_flight_share(512 * MIB, 64 * MIB, 2), 4);
        assert_eq!(in_flight_share(512 * MIB, 64 * MIB, 3), 2);
        assert_eq!(in_flight_share(128 * MIB, 64 * MIB, 3), 1);
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let p = RetryPolicy {
            max_retries: 10,
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let d = p.backoff(attempt);
            assert!(d <= Duration::from_secs(2), "{attempt}: {d:?}");
            assert!(d <= Duration::from_millis(100) * (1 << attempt.min(20)));
        }
    }

    /// A request that fails for a passing reason.
    async fn reset() -> Result<(), StoreError> {
        Err(StoreError::Io {
            op: "x",
            key: "k".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionReset, "boom"),
        })
    }

    use crate::events::NoObserver;

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_retry_pause_at_once() {
        let p = RetryPolicy {
            max_retries: 10,
            base: Duration::from_secs(60),
            max: Duration::from_secs(60),
        };
        let (stop, cancel) = crate::shutdown::new();
        let halt = Halt {
            cancel,
            source: None,
        };
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            stop.trip();
        });
        let mut calls = 0;
        let r: Result<(), _> = retry(&p, "t", &NoObserver, &halt, || {
            calls += 1;
            reset()
        })
        .await;
        assert!(matches!(r, Err(TransferError::Cancelled)), "{r:?}");
        // Pauses are up to 60 s; the stop came after 5 ms.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(calls <= 2, "{calls} calls");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_gives_up_after_max_retries() {
        let p = RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        let mut calls = 0;
        let r: Result<(), _> = retry(&p, "t", &NoObserver, &Halt::never(), || {
            calls += 1;
            reset()
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 4);
    }
}
