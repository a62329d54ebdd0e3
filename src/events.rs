//! What happens to a job, as one trait: a part sent, a request retried, an
//! upload begun, resumed, aborted, an object verified. The transfer calls an
//! [`Observer`]; the journal (crash-safe state), the metrics (counters) and the
//! progress log each implement it, so none of them needs the transfer, and
//! the transfer needs none of them.
//!
//! Design choice: plain method calls on a trait object, not a channel of
//! event values: every hook is a few atomic adds or a journal write behind a
//! mutex, cheaper than a message, and the order of events is the order of
//! the calls.

use std::sync::Arc;
use std::time::Duration;

use crate::manifest::Manifest;
use crate::metrics::{DestinationMetrics, Metrics};
use crate::store::PartReceipt;

/// Hooks for whoever keeps state or counts (the journal, metrics, progress).
pub trait Observer: Send + Sync {
    fn upload_started(&self, _destination: &str, _upload_id: &str) {}
    fn part_done(&self, _destination: &str, _receipt: &PartReceipt, _took: Duration) {}
    fn retried(&self, _destination: &str, _reason: &'static str) {}
    fn read_bytes(&self, _bytes: u64) {}
    /// A resumed upload could not be continued; the destination starts over.
    fn upload_restarted(&self, _destination: &str) {}
    /// The object verified and its manifest was written.
    fn verified(&self, _destination: &str, _manifest: &Manifest) {}
    /// Verification failed; `checksum` when the CRC32C did not match.
    fn verify_failed(&self, _destination: &str, _checksum: bool) {}
    fn part_failed(&self, _destination: &str) {}
    /// An upload continues from the journal.
    fn resumed(&self, _destination: &str) {}
    /// An upload was aborted at its destination: nothing of it is left there.
    fn upload_aborted(&self, _destination: &str) {}
    /// The next read waits for part-buffer memory (`true`), or has it (`false`).
    fn memory_wait(&self, _waiting: bool) {}
}

/// Several observers as one.
pub struct Observers(pub Vec<Arc<dyn Observer>>);

impl Observer for Observers {
    fn upload_started(&self, d: &str, id: &str) {
        self.0.iter().for_each(|o| o.upload_started(d, id));
    }
    fn part_done(&self, d: &str, r: &PartReceipt, took: Duration) {
        self.0.iter().for_each(|o| o.part_done(d, r, took));
    }
    fn retried(&self, d: &str, reason: &'static str) {
        self.0.iter().for_each(|o| o.retried(d, reason));
    }
    fn read_bytes(&self, b: u64) {
        self.0.iter().for_each(|o| o.read_bytes(b));
    }
    fn upload_restarted(&self, d: &str) {
        self.0.iter().for_each(|o| o.upload_restarted(d));
    }
    fn verified(&self, d: &str, m: &Manifest) {
        self.0.iter().for_each(|o| o.verified(d, m));
    }
    fn part_failed(&self, d: &str) {
        self.0.iter().for_each(|o| o.part_failed(d));
    }
    fn verify_failed(&self, d: &str, checksum: bool) {
        self.0.iter().for_each(|o| o.verify_failed(d, checksum));
    }
    fn resumed(&self, d: &str) {
        self.0.iter().for_each(|o| o.resumed(d));
    }
    fn upload_aborted(&self, d: &str) {
        self.0.iter().for_each(|o| o.upload_aborted(d));
    }
    fn memory_wait(&self, waiting: bool) {
        self.0.iter().for_each(|o| o.memory_wait(waiting));
    }
}

/// An observer that keeps nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

/// Feeds one job's events into the metrics.
pub struct JobMetrics {
    metrics: Arc<Metrics>,
    destinations: Vec<Arc<DestinationMetrics>>,
}

impl JobMetrics {
    pub fn new(metrics: Arc<Metrics>, names: &[&str]) -> JobMetrics {
        let destinations = names.iter().map(|n| metrics.destination(n)).collect();
        JobMetrics {
            metrics,
            destinations,
        }
    }

    fn get(&self, name: &str) -> Option<&DestinationMetrics> {
        self.destinations
            .iter()
            .find(|d| d.name == name)
            .map(|d| &**d)
    }
}

impl Observer for JobMetrics {
    fn part_done(&self, destination: &str, receipt: &PartReceipt, took: Duration) {
        if let Some(d) = self.get(destination) {
            d.uploaded_bytes.inc_by(receipt.size_bytes);
            d.parts_uploaded.inc();
            d.part_duration.observe(took.as_secs_f64());
        }
    }
    fn retried(&self, destination: &str, reason: &'static str) {
        if let Some(d) = self.get(destination) {
            d.retries.with_label_values(&[destination, reason]).inc();
            if reason == "checksum" {
                d.checksum_mismatches.inc();
            }
        }
    }
    fn read_bytes(&self, bytes: u64) {
        self.metrics.read_bytes.inc_by(bytes);
    }
    fn verified(&self, destination: &str, _manifest: &Manifest) {
        if let Some(d) = self.get(destination) {
            d.verified_ok.inc();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| t.as_secs() as i64);
            d.last_success.set(now);
        }
    }
    fn verify_failed(&self, destination: &str, checksum: bool) {
        if let Some(d) = self.get(destination) {
            d.verified_failed.inc();
            if checksum {
                d.checksum_mismatches.inc();
            }
        }
    }
    fn resumed(&self, destination: &str) {
        if let Some(d) = self.get(destination) {
            d.uploads_resumed.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_moves_its_counter() {
        let m = Metrics::new();
        let j = JobMetrics::new(m.clone(), &["phoenix"]);
        let r = PartReceipt {
            index: 0,
            part_id: String::new(),
            size_bytes: 10,
            crc32c: 0,
        };
        j.part_done("phoenix", &r, Duration::from_millis(5));
        j.retried("phoenix", "slow_down");
        j.verified("phoenix", &Manifest::example());
        j.verify_failed("phoenix", true);
        j.resumed("phoenix");
        j.read_bytes(10);
        // An event for a destination this job does not have counts nothing.
        j.part_done("elsewhere", &r, Duration::from_millis(5));
        let (_, text) = m.encode();
        let text = String::from_utf8(text).unwrap();
        for line in [
            "ferry_read_bytes_total 10",
            "ferry_uploaded_bytes_total{destination=\"phoenix\"} 10",
            "ferry_parts_uploaded_total{destination=\"phoenix\"} 1",
            "ferry_part_retries_total{destination=\"phoenix\",reason=\"slow_down\"} 1",
            "ferry_checksum_mismatches_total{destination=\"phoenix\"} 1",
            "ferry_objects_verified_total{destination=\"phoenix\",outcome=\"ok\"} 1",
            "ferry_objects_verified_total{destination=\"phoenix\",outcome=\"failed\"} 1",
            "ferry_uploads_resumed_total{destination=\"phoenix\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert!(!text.contains("elsewhere"));
        let t = m.last_successes();
        assert!(t.is_empty(), "a destination never added is not kept: {t:?}");
        m.add_destination("phoenix", None);
        let t = m.last_successes();
        assert!(t.len() == 1 && t[0].1 > 1_700_000_000, "{t:?}");
    }
}
