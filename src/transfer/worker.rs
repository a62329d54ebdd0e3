//! One destination's upload: begin (or resume), send its parts with its own
//! concurrency and retries, then finish (`verify`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::chunk::{self, Budget, Part};
use crate::error::Class;
use crate::events::Observer;
use crate::manifest::Manifest;
use crate::progress::{Phase, Progress};
use crate::shutdown::Shutdown;
use crate::store::{Destination, PartReceipt, StoreError};

use super::retry::{Halt, retry};
use super::{Job, Resume, TransferError};

/// A part task's end: its receipt and how long it took.
type Sent = Result<(PartReceipt, Duration), TransferError>;

/// Where a destination's parts come from: the fan-out's queue, or, once it
/// is detached (or when it has no queue), its own reads.
struct Inbox {
    rx: mpsc::UnboundedReceiver<Part>,
    self_read: bool,
}

pub(super) struct Worker {
    pub(super) job: Arc<Job>,
    pub(super) dest: Arc<Destination>,
    pub(super) reader: Arc<dyn chunk::Reader>,
    pub(super) budget: Budget,
    pub(super) progress: Arc<Progress>,
    pub(super) observer: Arc<dyn Observer>,
    pub(super) read_error: Arc<Mutex<Option<String>>>,
    pub(super) queued: Arc<AtomicU64>,
    pub(super) detached: Arc<super::fan_out::Detach>,
    /// This destination's share of parts in flight (see [`in_flight_share`]).
    pub(super) max_in_flight: usize,
    pub(super) cancel: Shutdown,
    /// `mapping::zeroed_faults()` when the job began.
    pub(super) zeroed_before: u64,
}

impl Worker {
    pub(super) async fn upload(
        &self,
        rx: mpsc::UnboundedReceiver<Part>,
        resumed: Option<Resume>,
    ) -> Result<Manifest, TransferError> {
        let was_resumed = resumed.is_some();
        let dp = self.progress.get(self.dest.name());
        let result = self.blame(self.attempt(Some(rx), resumed, dp.as_deref()).await);
        let result = match result {
            Err(TransferError::Store(e)) if was_resumed && e.class() != Class::Retry => {
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
        if let Ok(m) = &result {
            self.observer.verified(self.dest.name(), m);
        }
        result
    }

    /// A failure while the source changed is the source's doing, whatever the
    /// destination answered (a short read, a part the store refused): say so.
    fn blame(&self, r: Result<Manifest, TransferError>) -> Result<Manifest, TransferError> {
        r.map_err(|e| self.blamed(e))
    }

    pub(super) fn blamed(&self, e: TransferError) -> TransferError {
        if matches!(e, TransferError::Changed(_) | TransferError::Cancelled) {
            return e;
        }
        match self.job.source.check() {
            Err(c) => TransferError::Changed(c),
            Ok(()) => e,
        }
    }

    /// What ends this destination's retries early.
    pub(super) fn halt(&self) -> Halt {
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
    pub(super) fn keeps_upload(&self, e: &TransferError) -> bool {
        // A stop, or a store's passing failure: a later attempt continues it.
        self.job.resumable && e.class() == Class::Retry
    }

    pub(super) async fn abort(&self, upload_id: &str) {
        match self.dest.abort(&self.job.name, upload_id).await {
            Ok(()) => self.observer.upload_aborted(self.dest.name()),
            Err(e) => warn!(
                destination = self.dest.name(),
                "could not abort the upload of {}: {e}", self.job.name
            ),
        }
    }

    /// Sends every part not in `receipts`, at most `parallel_parts` at once,
    /// each retried on its own; returns when all were sent, one failed for
    /// good, or a stop was requested.
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
        let mut inbox = Inbox {
            self_read: rx.is_none(),
            rx: rx.unwrap_or_else(|| mpsc::unbounded_channel().1),
        };
        let cancel = self.cancel.clone();
        let plan = self.job.plan;
        for index in 0..plan.count {
            if receipts.contains_key(&index) {
                continue;
            }
            // Waiting for a slot, all of them perhaps on a slow link: a
            // detaching drops the queued parts now, not when a slot frees.
            let slot = loop {
                tokio::select! {
                    s = slots.clone().acquire_owned() => break Some(s.expect("never closed")),
                    _ = cancel.requested() => break None,
                    _ = self.detached.wait(), if !inbox.self_read => {
                        self.drop_queue(&mut inbox, index);
                    }
                }
            };
            let Some(slot) = slot else { break };
            while let Some(r) = tasks.try_join_next() {
                self.reap(r, receipts, dp)?;
            }
            let Some(part) = self.next_part(index, &mut inbox).await? else {
                break;
            };
            if part.index() != index {
                // Never expected: the fan-out skips exactly the parts this
                // worker holds receipts for. Stop rather than send a part
                // under another part's number.
                return Err(TransferError::Read(format!(
                    "part {} arrived where part {index} was due; nothing was completed",
                    part.index()
                )));
            }
            let job = self.job.clone();
            let dest = self.dest.clone();
            let id = upload_id.to_string();
            let observer = self.observer.clone();
            let halt = self.halt();
            tasks.spawn(async move {
                let _slot = slot;
                send_paid(&job, &dest, &id, &part, &*observer, &halt).await
            });
        }
        if self.cancel.is_requested() && !self.job.resumable {
            // Nothing resumes this upload: drop the parts on the wire at once.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            return Err(TransferError::Cancelled);
        }
        while let Some(r) = tasks.join_next().await {
            self.reap(r, receipts, dp)?;
        }
        if self.cancel.is_requested() && receipts.len() < plan.count as usize {
            return Err(TransferError::Cancelled);
        }
        Ok(())
    }

    /// Takes in a part task's end: a receipt is recorded, counted and shown.
    fn reap(
        &self,
        r: Result<Sent, tokio::task::JoinError>,
        receipts: &mut BTreeMap<u32, PartReceipt>,
        dp: Option<&crate::progress::DestinationProgress>,
    ) -> Result<(), TransferError> {
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
    }

    /// Part `index`: from the fan-out's queue, or read by this destination
    /// itself once it is detached. `None` when a stop was requested.
    async fn next_part(
        &self,
        index: u32,
        inbox: &mut Inbox,
    ) -> Result<Option<Part>, TransferError> {
        if !inbox.self_read && self.detached.is_set() {
            self.drop_queue(inbox, index);
        }
        if inbox.self_read {
            return self.read_self(index).await.map(Some);
        }
        match inbox.rx.recv().await {
            Some(p) => {
                self.queued.fetch_sub(p.len(), Ordering::Relaxed);
                Ok(Some(p))
            }
            None if self.detached.is_set() => {
                self.drop_queue(inbox, index);
                self.read_self(index).await.map(Some)
            }
            None => {
                if self.cancel.is_requested() {
                    return Ok(None);
                }
                // The reader stopped: a changed source is the usual reason.
                self.job.source.check().map_err(TransferError::Changed)?;
                let why = self
                    .read_error
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .unwrap_or_else(|| "the reader stopped".into());
                Err(TransferError::Read(why))
            }
        }
    }

    /// Detached: parts from `index` on are this worker's own reads, and
    /// what is still queued is dropped, which returns its memory to the budget.
    fn drop_queue(&self, inbox: &mut Inbox, index: u32) {
        inbox.self_read = true;
        self.note_detached(index);
        inbox.rx.close();
        while let Ok(p) = inbox.rx.try_recv() {
            self.queued.fetch_sub(p.len(), Ordering::Relaxed);
        }
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
}

/// Sends `part` of the upload `upload_id`, retried as the job says, every
/// attempt paid for in the bandwidth buckets just before it goes on the
/// wire; a stop request ends a wait for bandwidth. Answers the receipt and
/// how long the sending took, waits for bandwidth left out (the part-time
/// histogram is the store's time, not the limit's).
pub(super) async fn send_paid(
    job: &Job,
    dest: &Destination,
    upload_id: &str,
    part: &Part,
    observer: &dyn Observer,
    halt: &Halt,
) -> Result<(PartReceipt, Duration), TransferError> {
    let started = std::time::Instant::now();
    // Nanoseconds spent waiting for bandwidth, over every attempt.
    let waited = AtomicU64::new(0);
    let receipt = retry(&job.retry, dest.name(), observer, halt, || async {
        let wait = std::time::Instant::now();
        tokio::select! {
            _ = job.bandwidth.take(dest.name(), part.len()) => {}
            // `retry` sees the stop request and answers Cancelled.
            _ = halt.cancel.requested() => return Err(StoreError::Io {
                op: "wait for bandwidth to send",
                key: job.name.clone(),
                source: std::io::ErrorKind::Interrupted.into(),
            }),
        }
        waited.fetch_add(wait.elapsed().as_nanos() as u64, Ordering::Relaxed);
        dest.put_part(&job.name, upload_id, part).await
    })
    .await?;
    let waited = Duration::from_nanos(waited.load(Ordering::Relaxed));
    Ok((receipt, started.elapsed().saturating_sub(waited)))
}

/// A journaled upload as the store holds it: where the store lists an
/// upload's parts (OCI), only the journaled parts it holds as journaled (same
/// id and size) are kept, and the others are sent again. An upload the store
/// cannot list (gone, expired, or the store unreachable after every retry) is
/// aborted where it can be and started over. Runs before the fan-out learns
/// which parts to skip, so every part not kept is read and sent.
pub(super) async fn as_held(
    dest: &Destination,
    job: &Job,
    observer: &dyn Observer,
    cancel: &Shutdown,
    resumed: Option<Resume>,
) -> Option<Resume> {
    let mut r = resumed?;
    let halt = Halt {
        cancel: cancel.clone(),
        source: Some(job.source.clone()),
    };
    let listed = retry(&job.retry, dest.name(), observer, &halt, || {
        dest.listed_parts(&job.name, &r.upload_id)
    })
    .await;
    let held = match listed {
        Ok(None) => return Some(r),
        Ok(Some(held)) => held,
        Err(e) => {
            warn!(
                destination = dest.name(),
                "cannot list the parts of the journaled upload of {} ({e}); starting it over",
                job.name
            );
            if dest.abort(&job.name, &r.upload_id).await.is_ok() {
                observer.upload_aborted(dest.name());
            }
            observer.upload_restarted(dest.name());
            return None;
        }
    };
    let held: std::collections::HashMap<u32, (String, u64)> = held
        .into_iter()
        .map(|p| (p.index, (p.part_id, p.size_bytes)))
        .collect();
    let before = r.receipts.len();
    r.receipts
        .retain(|p| held.get(&p.index) == Some(&(p.part_id.clone(), p.size_bytes)));
    if r.receipts.len() != before {
        warn!(
            destination = dest.name(),
            "{} of {before} journaled parts of {} are not in the store as sent; sending them again",
            before - r.receipts.len(),
            job.name
        );
    }
    Some(r)
}
