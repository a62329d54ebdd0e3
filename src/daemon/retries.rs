//! Jobs that failed only for passing reasons (a destination down, throttling)
//! wait here, with their uploads kept, to be tried again after a growing
//! pause; after [`JOB_ATTEMPTS`] they are handed back to go to `failed/`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::spool::Claimed;

/// Attempts of a job whose destinations keep failing for passing reasons
/// before it goes to `failed/`, and the pause before attempt N (N x this,
/// at most `JOB_RETRY_MAX_PAUSE`): about an hour of outage in all.
pub(super) const JOB_ATTEMPTS: u32 = 12;
const JOB_RETRY_PAUSE: Duration = Duration::from_secs(15);
const JOB_RETRY_MAX_PAUSE: Duration = Duration::from_secs(300);

/// The jobs waiting to be tried again, and how many attempts each name has had.
#[derive(Default)]
pub(super) struct Retries {
    attempts: HashMap<OsString, u32>,
    /// When each waiting job is tried again, and why it is waiting.
    waiting: Vec<(Instant, Claimed, String)>,
}

impl Retries {
    /// A job of this name ended some other way than a passing failure: a
    /// later file of the same name starts its count afresh.
    pub(super) fn forget(&mut self, name: &OsStr) {
        self.attempts.remove(name);
    }

    /// Counts a failed attempt and schedules the next one (N x `JOB_RETRY_PAUSE`
    /// after the N-th failure, at most `JOB_RETRY_MAX_PAUSE`); hands the job back
    /// when it has had all its attempts: the caller then gives it up.
    pub(super) fn failed(&mut self, c: Claimed, why: String, now: Instant) -> Option<Claimed> {
        let n = self.attempts.entry(c.name.clone()).or_insert(0);
        *n += 1;
        if *n >= JOB_ATTEMPTS {
            self.attempts.remove(&c.name);
            return Some(c);
        }
        let pause = (JOB_RETRY_PAUSE * *n).min(JOB_RETRY_MAX_PAUSE);
        warn!(
            "{:?}: a destination is failing for a passing reason; attempt {} of {JOB_ATTEMPTS} in {}s (the upload is kept)",
            c.name,
            *n + 1,
            pause.as_secs()
        );
        self.waiting.push((now + pause, c, why));
        None
    }

    /// The jobs whose pause is over, taken out of the waiting list.
    pub(super) fn due(&mut self, now: Instant) -> Vec<Claimed> {
        let (due, later): (Vec<_>, Vec<_>) =
            self.waiting.drain(..).partition(|(t, _, _)| *t <= now);
        self.waiting = later;
        due.into_iter().map(|(_, c, _)| c).collect()
    }

    /// The jobs waiting, for `/status`.
    pub(super) fn list(&self) -> Vec<crate::status::Retrying> {
        self.waiting
            .iter()
            .map(|(at, c, why)| crate::status::Retrying {
                file: c.name.to_string_lossy().into_owned(),
                attempt: self.attempts.get(&c.name).map_or(1, |n| n + 1),
                of: JOB_ATTEMPTS,
                next_attempt: *at,
                reason: why.clone(),
            })
            .collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn claimed(name: &str) -> Claimed {
        Claimed {
            name: name.into(),
            path: PathBuf::from("/spool/.ferry/active").join(name),
            sidecar: None,
            file_id: None,
        }
    }

    #[test]
    fn a_job_failing_for_passing_reasons_gets_its_attempts_then_gives_up() {
        let mut r = Retries::default();
        let t0 = Instant::now();
        let mut pauses = Vec::new();
        for attempt in 1..JOB_ATTEMPTS {
            assert!(
                r.failed(claimed("a.qcow2"), String::new(), t0).is_none(),
                "attempt {attempt}"
            );
            assert!(r.due(t0).is_empty(), "tried again without a pause");
            let (at, _, _) = r.waiting[0];
            pauses.push((at - t0).as_secs());
            assert_eq!(r.due(at).len(), 1);
            assert!(r.is_empty());
        }
        assert_eq!(&pauses[..4], &[15, 30, 45, 60]);
        assert_eq!(*pauses.last().unwrap(), 165);
        assert!(pauses.iter().all(|p| *p <= JOB_RETRY_MAX_PAUSE.as_secs()));
        // The last attempt hands the job back (to go to failed/) and forgets it.
        let c = r
            .failed(claimed("a.qcow2"), String::new(), t0)
            .expect("given up");
        assert_eq!(c.name, "a.qcow2");
        assert!(r.is_empty() && r.attempts.is_empty());
    }

    #[test]
    fn each_name_counts_its_own_attempts() {
        let mut r = Retries::default();
        let t0 = Instant::now();
        assert!(r.failed(claimed("a"), String::new(), t0).is_none());
        assert!(r.failed(claimed("a"), String::new(), t0).is_none());
        assert!(r.failed(claimed("b"), String::new(), t0).is_none());
        assert_eq!(r.attempts[OsStr::new("a")], 2);
        assert_eq!(r.attempts[OsStr::new("b")], 1);
        let later = r.due(t0 + Duration::from_secs(20));
        assert_eq!(
            later.len(),
            2,
            "a after 15 s, b after 15 s; a's second after 30 s"
        );
        assert_eq!(r.waiting.len(), 1);
    }

    #[test]
    fn a_job_that_ends_otherwise_starts_its_count_afresh() {
        let mut r = Retries::default();
        let t0 = Instant::now();
        assert!(r.failed(claimed("a"), String::new(), t0).is_none());
        assert_eq!(r.due(t0 + JOB_RETRY_MAX_PAUSE).len(), 1);
        r.forget(OsStr::new("a"));
        assert!(r.failed(claimed("a"), String::new(), t0).is_none());
        assert_eq!(
            r.list()[0].attempt,
            2,
            "the next attempt after a fresh first"
        );
    }
}
