//! The fan-out: each part read once and handed to every destination that
//! wants it, and the detaching of a destination that holds the others back
//! (see the module doc of `transfer`).
//!
//! The queue of each destination is an unbounded channel whose bound is the
//! memory budget: a queued part holds its share of the budget, and the reader
//! waits for budget before it reads, so a queue never holds more than
//! `memory_limit / part_size` parts.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use crate::chunk::{self, Budget, Part};
use crate::events::Observer;
use crate::shutdown::Shutdown;

pub(super) struct Feed {
    pub(super) tx: Option<mpsc::UnboundedSender<Part>>,
    pub(super) queued_bytes: Arc<AtomicU64>,
    pub(super) detached: Arc<Detach>,
    pub(super) skip: Arc<HashSet<u32>>,
}

/// A destination's detaching: set by the fan-out, and its worker woken at
/// once to drop the parts still queued for it, whose memory the others wait
/// for. Without the wake-up, a worker whose every slot is on a slow link
/// noticed only when one of its parts was sent (up to 13 s later on the WAN
/// bench's slowest link), and the faster destinations starved meanwhile.
#[derive(Default)]
pub(super) struct Detach {
    flag: AtomicBool,
    wake: Notify,
}

impl Detach {
    fn set(&self) {
        self.flag.store(true, Ordering::Release);
        // A permit is kept when the worker is not waiting yet.
        self.wake.notify_one();
    }

    pub(super) fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Returns once the destination is detached.
    pub(super) async fn wait(&self) {
        while !self.is_set() {
            self.wake.notified().await;
        }
    }
}

impl Feed {
    fn live(&self) -> bool {
        self.tx.is_some()
    }
}

/// Reads each part once and hands it to every destination that wants it, in
/// order. A reader that can read several parts at once (an object, by
/// ranged GETs) has up to [`chunk::Reader::parallel_reads`] in flight, each
/// holding its memory from the budget.
pub(super) async fn fan_out(
    reader: Arc<dyn chunk::Reader>,
    budget: Budget,
    mut feeds: Vec<Feed>,
    lag_limit: u64,
    read_error: Arc<Mutex<Option<String>>>,
    observer: Arc<dyn Observer>,
    cancel: Shutdown,
) {
    let plan = *reader.plan();
    let parallel = reader.parallel_reads().max(1);
    let mut reads = futures::stream::FuturesOrdered::new();
    let mut next = 0u32;
    loop {
        if cancel.is_requested() || feeds.iter().all(|f| !f.live()) {
            return;
        }
        // Start reads while memory is free right now, up to `parallel`.
        while reads.len() < parallel && next < plan.count {
            let wanted = wanted(&feeds, next);
            if wanted.is_empty() {
                next += 1;
                continue;
            }
            let Some(lease) = chunk::try_lease(&*reader, &budget, next) else {
                break;
            };
            reads.push_back(read(reader.clone(), next, lease, wanted));
            next += 1;
        }
        if reads.is_empty() {
            if next >= plan.count {
                return;
            }
            // Nothing in flight and no memory free: wait for it, detaching a
            // destination that holds the others back.
            let wanted = wanted(&feeds, next);
            if wanted.is_empty() {
                next += 1;
                continue;
            }
            observer.memory_wait(true);
            let lease = loop {
                if detach_laggard(&mut feeds, lag_limit) {
                    // It will read its own parts: from the page cache, not the disk.
                    reader.keep_pages();
                }
                if let Ok(l) =
                    tokio::time::timeout(LAG_CHECK, chunk::lease(&*reader, &budget, next)).await
                {
                    break l;
                }
                if cancel.is_requested() {
                    observer.memory_wait(false);
                    return;
                }
            };
            observer.memory_wait(false);
            reads.push_back(read(reader.clone(), next, lease, wanted));
            next += 1;
            continue;
        }
        let next_read = tokio::select! {
            r = futures::StreamExt::next(&mut reads) => r,
            _ = cancel.requested() => return,
        };
        let Some((read, wanted)) = next_read else {
            continue;
        };
        let part = match read {
            Ok(p) => p,
            Err(e) => {
                if let Ok(mut slot) = read_error.lock() {
                    *slot = Some(e.to_string());
                }
                return;
            }
        };
        let len = part.len();
        reader.delivered(&part);
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

/// The destinations that want part `index`: live, and without it already.
fn wanted(feeds: &[Feed], index: u32) -> Vec<usize> {
    feeds
        .iter()
        .enumerate()
        .filter(|(_, f)| f.live() && !f.skip.contains(&index))
        .map(|(i, _)| i)
        .collect()
}

/// One part read into memory already leased, with the destinations it is for.
async fn read(
    reader: Arc<dyn chunk::Reader>,
    index: u32,
    lease: chunk::Lease,
    wanted: Vec<usize>,
) -> (Result<Part, chunk::ReadError>, Vec<usize>) {
    (chunk::read_leased(reader, index, lease).await, wanted)
}

/// Parts one destination may have on the wire at once when several share the
/// budget: its share of the budget, at least one. Parts in flight hold memory
/// until they are sent; without a share, a slow link with all of its
/// `parallel_parts` in flight holds the whole budget and the fast links wait for
/// it (the detaching of laggards only sees parts still queued).
pub(super) fn in_flight_share(budget_bytes: u64, part_bytes: u64, destinations: usize) -> usize {
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
/// parts keep being read once. Answers whether it detached one.
fn detach_laggard(feeds: &mut [Feed], lag_limit: u64) -> bool {
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
        f.detached.set();
        // The worker, woken whether it waits in recv (the sender dropped) or
        // for a slot (`Detach::set`), drops the parts still queued, which
        // returns their memory.
        f.tx = None;
        return true;
    }
    false
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
}
