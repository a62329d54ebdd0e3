//! The memory budget of part buffers, shared by every job and destination.
//!
//! Design choice: a semaphore counted in 4 KiB pages whose permit lives inside
//! the part's `Bytes` owner, so memory returns exactly when the last clone of
//! a part drops, wherever that happens.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const PAGE: u64 = 4096;

/// The memory all part buffers may use, shared by every job and destination.
/// Clones share one budget; [`Budget::resize`] changes it for all of them.
#[derive(Clone, Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    limit_pages: Arc<AtomicU64>,
}

impl Budget {
    pub fn new(limit_bytes: u64) -> Budget {
        let pages = (limit_bytes / PAGE).max(1);
        Budget {
            sem: Arc::new(Semaphore::new(pages as usize)),
            limit_pages: Arc::new(AtomicU64::new(pages)),
        }
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_pages.load(Ordering::Acquire) * PAGE
    }

    /// Bytes currently held by parts (and, just after the budget shrank, the part
    /// of the old budget not yet handed back).
    pub fn in_use_bytes(&self) -> u64 {
        self.limit_bytes()
            .saturating_sub(self.sem.available_permits() as u64 * PAGE)
    }

    /// Changes the limit for every job sharing this budget (a configuration
    /// reload). Growing frees the difference at once; shrinking takes back what
    /// is free now and the rest as parts in flight are released, so the memory
    /// in use never exceeds the old limit and settles within the new one. Must
    /// be called inside the runtime when it shrinks.
    pub fn resize(&self, limit_bytes: u64) {
        let new = (limit_bytes / PAGE).max(1);
        let old = self.limit_pages.swap(new, Ordering::AcqRel);
        if new > old {
            self.sem.add_permits((new - old) as usize);
        } else if new < old {
            let owed = (old - new) as usize;
            let taken = self.sem.forget_permits(owed);
            if taken < owed {
                let sem = self.sem.clone();
                let rest = u32::try_from(owed - taken).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(rest).await {
                        p.forget();
                    }
                });
            }
        }
    }

    fn pages_for(&self, bytes: u64) -> u32 {
        let limit = self.limit_pages.load(Ordering::Acquire);
        u32::try_from(bytes.div_ceil(PAGE).clamp(1, limit)).unwrap_or(u32::MAX)
    }

    /// Takes `bytes` if they fit now.
    pub fn try_acquire(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        self.sem
            .clone()
            .try_acquire_many_owned(self.pages_for(bytes))
            .ok()
    }

    /// Waits until `bytes` fit. Callers never ask for more than the whole budget
    /// (the plan is checked against it before a job starts; a part larger than a
    /// budget shrunk since then takes the whole budget).
    pub async fn acquire(&self, bytes: u64) -> OwnedSemaphorePermit {
        self.sem
            .clone()
            .acquire_many_owned(self.pages_for(bytes))
            .await
            .expect("the budget semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::MIB;

    #[tokio::test]
    async fn a_resized_budget_binds_parts_already_in_flight() {
        let budget = Budget::new(64 * MIB);
        let a = budget.acquire(32 * MIB).await;
        let b = budget.acquire(24 * MIB).await;
        // Shrink below what is in use: nothing more fits until enough is released.
        budget.resize(32 * MIB);
        assert_eq!(budget.limit_bytes(), 32 * MIB);
        assert!(
            budget.try_acquire(MIB).is_none(),
            "fits beyond the new limit"
        );
        drop(b);
        tokio::task::yield_now().await;
        assert!(
            budget.try_acquire(MIB).is_none(),
            "56 MiB held under a 32 MiB limit"
        );
        drop(a);
        // The debt is collected by a task; wait for it (bounded).
        for _ in 0..100 {
            if budget.in_use_bytes() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.in_use_bytes(), 0);
        let all = budget
            .try_acquire(32 * MIB)
            .expect("the whole new limit fits");
        assert!(
            budget.try_acquire(MIB).is_none(),
            "more than 32 MiB handed out"
        );
        drop(all);
        // Growing frees the difference at once.
        budget.resize(96 * MIB);
        let big = budget.try_acquire(96 * MIB).expect("the grown limit fits");
        assert_eq!(budget.in_use_bytes(), 96 * MIB);
        drop(big);
        // A clone is the same budget.
        let other = budget.clone();
        other.resize(16 * MIB);
        assert_eq!(budget.limit_bytes(), 16 * MIB);
        assert!(
            budget.try_acquire(17 * MIB).is_some(),
            "a request is clamped to the limit"
        );
    }
}
