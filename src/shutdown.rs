//! Stopping, the same way for the daemon and for `ferry push`: one token that
//! says "stop" to everything that runs, the signals that trip it, and a drain
//! that waits for tasks to end within a deadline.
//!
//! Promises: the first SIGINT or SIGTERM trips the token, and every holder sees
//! it at once, including tasks waiting in [`Shutdown::requested`]. A second
//! signal ends the process at once with status 130; that is safe because every
//! record ferry keeps on disk is always whole (written temp, fsync, rename). A
//! token whose [`Trigger`] is dropped without being tripped never trips.
//!
//! Design choice: a `tokio::sync::watch` of one bool, not a crate's
//! cancellation token: it is in the tree already, a late subscriber sees the
//! current value, and waiting for it costs nothing while it is not tripped.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};

/// Seen by everything that must stop: cheap to clone, checked or awaited.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// Trips its [`Shutdown`] tokens.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// A new token and the trigger that trips it.
pub fn new() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn trip(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// A token nothing trips (for a caller with nothing to stop it).
    pub fn never() -> Shutdown {
        watch::channel(false).1.into()
    }

    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once a stop is requested; never, if the trigger is gone untripped.
    pub async fn requested(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl From<watch::Receiver<bool>> for Shutdown {
    fn from(rx: watch::Receiver<bool>) -> Shutdown {
        Shutdown(rx)
    }
}

/// SIGINT and SIGTERM: the first calls `first` (a line for the operator) and
/// trips `trigger`; a second ends the process at once with status 130.
pub fn on_signals(trigger: Trigger, first: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        first();
        trigger.trip();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("second signal: exiting at once; records on disk are whole");
        std::process::exit(130);
    });
    Ok(())
}

/// Waits for the tasks of `set` to end, at most `limit`, handing each result
/// to `ended`; returns how many were still running at the deadline (they are
/// left in `set`).
pub async fn drain<T: 'static>(
    set: &mut JoinSet<T>,
    limit: Duration,
    mut ended: impl FnMut(Result<T, JoinError>),
) -> usize {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = set.join_next() => match next {
                Some(r) => ended(r),
                None => return 0,
            },
            _ = &mut deadline => return set.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_trip_reaches_every_holder_and_a_dropped_trigger_never_trips() {
        let (trigger, s) = new();
        let waiter = s.clone();
        let h = tokio::spawn(async move { waiter.requested().await });
        assert!(!s.is_requested());
        trigger.trip();
        h.await.unwrap();
        assert!(s.is_requested());

        let (trigger, s) = new();
        drop(trigger);
        let waited = tokio::time::timeout(Duration::from_millis(50), s.requested()).await;
        assert!(waited.is_err(), "a dropped trigger tripped the token");
        assert!(!Shutdown::never().is_requested());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_at_most_its_limit() {
        let mut set = JoinSet::new();
        set.spawn(async { 1 });
        set.spawn(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            2
        });
        let mut got = Vec::new();
        let left = drain(&mut set, Duration::from_secs(5), |r| got.push(r.unwrap())).await;
        assert_eq!((got, left), (vec![1], 1));
    }
}
