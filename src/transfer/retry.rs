//! Requests retried: bounded, with exponential backoff and full jitter, and
//! stopped at once by a stop request or a changed source.

use std::time::Duration;

use tracing::warn;

use crate::config::TransferConfig;
use crate::error::Class;
use crate::events::Observer;
use crate::shutdown::Shutdown;
use crate::source::Source;
use crate::store::StoreError;

use super::TransferError;

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
        if e.class() != Class::Retry || attempt >= policy.max_retries {
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
    use crate::events::NoObserver;

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
