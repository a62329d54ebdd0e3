//! Metric definitions: every name is a constant here, documented in the README.
//!
//! Promises: labels are only `destination`, `outcome`, `reason` and `version`,
//! never a file name, so the series count stays small whatever is shipped.
//! Counting on the hot path is a few atomic adds on handles resolved once per
//! destination and job ([`DestinationMetrics`]), never a label lookup per part.
//! Definitions only: which event moves which counter is `events`' business.
//! `Metrics::new` is long (about 90 lines) because it is the list of every
//! series with its help text, one registration after another, in the order
//! of the README's table: a list, not logic.
//!
//! Design choice: the `prometheus` crate, whose classic text format (0.0.4) every
//! scraper and Debian's `promtool` read; OpenMetrics-only encoders are rejected
//! by that promtool.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const READ_BYTES: &str = "ferry_read_bytes_total";
pub const UPLOADED_BYTES: &str = "ferry_uploaded_bytes_total";
pub const PARTS_UPLOADED: &str = "ferry_parts_uploaded_total";
pub const PART_UPLOAD_DURATION: &str = "ferry_part_upload_duration_seconds";
pub const PART_RETRIES: &str = "ferry_part_retries_total";
pub const CHECKSUM_MISMATCHES: &str = "ferry_checksum_mismatches_total";
pub const OBJECTS_VERIFIED: &str = "ferry_objects_verified_total";
pub const JOBS: &str = "ferry_jobs_total";
pub const JOB_DURATION: &str = "ferry_job_duration_seconds";
pub const SPOOL_WAITING_IMAGES: &str = "ferry_spool_waiting_images";
pub const SPOOL_WAITING_BYTES: &str = "ferry_spool_waiting_bytes";
pub const JOBS_IN_FLIGHT: &str = "ferry_jobs_in_flight";
pub const BUFFER_BYTES_IN_USE: &str = "ferry_buffer_bytes_in_use";
pub const BUFFER_BYTES_LIMIT: &str = "ferry_buffer_bytes_limit";
pub const UPLOADS_RESUMED: &str = "ferry_uploads_resumed_total";
pub const BUILD_INFO: &str = "ferry_build_info";
pub const LAST_SUCCESS: &str = "ferry_last_success_timestamp_seconds";
pub const IMPORTS: &str = "ferry_imports_total";
pub const IMPORT_DURATION: &str = "ferry_import_duration_seconds";
pub const CONVERSIONS: &str = "ferry_conversions_total";
pub const CONVERSION_DURATION: &str = "ferry_conversion_duration_seconds";
pub const BANDWIDTH_LIMIT: &str = "ferry_bandwidth_limit_bytes";

/// Every `reason` of [`PART_RETRIES`]: each destination's series exist at 0
/// from the start, so `increase()` sees the first retry after a restart.
pub const RETRY_REASONS: &[&str] = &[
    "timeout",
    "server_error",
    "slow_down",
    "reset",
    "checksum",
    "dns",
    "connection_refused",
    "tls",
    "other",
];
/// Every `outcome` of [`JOBS`].
pub const JOB_OUTCOMES: &[&str] = &["done", "refused", "failed"];
/// Every `outcome` of [`CONVERSIONS`]: a QCOW2 that compared identical
/// (`converted`), or not: too little space, qemu-img failed (or the
/// original changed), or the comparison found a difference.
pub const CONVERSION_OUTCOMES: &[&str] = &["converted", "no_space", "failed", "differs"];
/// Every `outcome` of [`IMPORTS`]: AVAILABLE (`ok`), or not (`failed`:
/// DISABLED, DELETED, a timeout, or a request OCI refused for good).
pub const IMPORT_OUTCOMES: &[&str] = &["ok", "failed"];

/// Buckets for parts of 5 MiB .. 5 GiB on links from a LAN to a slow WAN.
const PART_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Buckets for whole jobs: seconds to hours.
const JOB_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
];

/// Buckets for imports: OCI takes minutes to hours.
const IMPORT_BUCKETS: &[f64] = &[
    5.0, 30.0, 60.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
];

/// Every metric ferry exposes.
pub struct Metrics {
    registry: Registry,
    pub read_bytes: IntCounter,
    uploaded_bytes: IntCounterVec,
    parts_uploaded: IntCounterVec,
    part_duration: HistogramVec,
    part_retries: IntCounterVec,
    checksum_mismatches: IntCounterVec,
    objects_verified: IntCounterVec,
    jobs: IntCounterVec,
    pub job_duration: Histogram,
    pub spool_waiting_images: IntGauge,
    pub spool_waiting_bytes: IntGauge,
    pub jobs_in_flight: IntGauge,
    pub buffer_in_use: IntGauge,
    pub buffer_limit: IntGauge,
    uploads_resumed: IntCounterVec,
    last_success: IntGaugeVec,
    imports: IntCounterVec,
    import_duration: HistogramVec,
    conversions: IntCounterVec,
    conversion_duration: Histogram,
    bandwidth_limit: IntGaugeVec,
    /// Destinations given to [`Metrics::add_destination`].
    known: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// Handles for one destination, resolved once.
pub struct DestinationMetrics {
    pub name: String,
    pub uploaded_bytes: IntCounter,
    pub parts_uploaded: IntCounter,
    pub part_duration: Histogram,
    pub checksum_mismatches: IntCounter,
    pub verified_ok: IntCounter,
    pub verified_failed: IntCounter,
    pub uploads_resumed: IntCounter,
    /// By destination and reason; the reason is only known per event.
    pub retries: IntCounterVec,
    /// When this destination last verified an object (Unix seconds).
    pub last_success: IntGauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only fails on an invalid name or a duplicate registration: a bug in this
    // module, caught by its unit test.
    r.expect("metric definitions are valid and registered once")
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let part_duration = must(HistogramVec::new(
            HistogramOpts::new(
                PART_UPLOAD_DURATION,
                "Time to upload one part, retries included, by destination.",
            )
            .buckets(PART_BUCKETS.to_vec()),
            &["destination"],
        ));
        must(registry.register(Box::new(part_duration.clone())));
        let job_duration = must(Histogram::with_opts(
            HistogramOpts::new(JOB_DURATION, "Time from claim to the end of a job.")
                .buckets(JOB_BUCKETS.to_vec()),
        ));
        must(registry.register(Box::new(job_duration.clone())));
        let build = must(IntGaugeVec::new(
            Opts::new(BUILD_INFO, "ferry's version; always 1."),
            &["version"],
        ));
        must(registry.register(Box::new(build.clone())));
        build.with_label_values(&[crate::VERSION]).set(1);
        // process_cpu_seconds_total, process_resident_memory_bytes,
        // process_open_fds and the rest, read from /proc at each scrape.
        must(registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )));
        let last_success = must(IntGaugeVec::new(
            Opts::new(
                LAST_SUCCESS,
                "When a destination last verified an object, in Unix seconds; 0: never (as far as this state directory knows).",
            ),
            &["destination"],
        ));
        must(registry.register(Box::new(last_success.clone())));
        let import_duration = must(HistogramVec::new(
            HistogramOpts::new(
                IMPORT_DURATION,
                "Time from the start of an import (CreateImage) to its end, by destination.",
            )
            .buckets(IMPORT_BUCKETS.to_vec()),
            &["destination"],
        ));
        must(registry.register(Box::new(import_duration.clone())));
        let conversion_duration = must(Histogram::with_opts(
            HistogramOpts::new(
                CONVERSION_DURATION,
                "Time a conversion to QCOW2 took, its comparison included, whatever its outcome.",
            )
            .buckets(JOB_BUCKETS.to_vec()),
        ));
        must(registry.register(Box::new(conversion_duration.clone())));
        let bandwidth_limit = must(IntGaugeVec::new(
            Opts::new(
                BANDWIDTH_LIMIT,
                "The bandwidth limit in force, in bytes per second, by destination; destination=\"(all)\": all destinations together; 0: no limit.",
            ),
            &["destination"],
        ));
        must(registry.register(Box::new(bandwidth_limit.clone())));
        let metrics = Arc::new(Metrics {
            read_bytes: counter(READ_BYTES, "Bytes read from source images."),
            uploaded_bytes: counter_vec(
                UPLOADED_BYTES,
                "Bytes of parts accepted by a destination.",
                &["destination"],
            ),
            parts_uploaded: counter_vec(
                PARTS_UPLOADED,
                "Parts accepted by a destination.",
                &["destination"],
            ),
            part_duration,
            part_retries: counter_vec(
                PART_RETRIES,
                "Requests retried, by destination and reason (timeout, server_error, slow_down, reset, checksum, dns, connection_refused, tls, other).",
                &["destination", "reason"],
            ),
            checksum_mismatches: counter_vec(
                CHECKSUM_MISMATCHES,
                "Parts or objects whose checksum did not match, by destination.",
                &["destination"],
            ),
            objects_verified: counter_vec(
                OBJECTS_VERIFIED,
                "Objects checked after completion, by destination and outcome (ok, failed).",
                &["destination", "outcome"],
            ),
            jobs: counter_vec(
                JOBS,
                "Jobs ended, by outcome (done, refused, failed).",
                &["outcome"],
            ),
            job_duration,
            spool_waiting_images: gauge(
                SPOOL_WAITING_IMAGES,
                "Images in the spool not yet claimed.",
            ),
            spool_waiting_bytes: gauge(
                SPOOL_WAITING_BYTES,
                "Bytes of images in the spool not yet claimed.",
            ),
            jobs_in_flight: gauge(JOBS_IN_FLIGHT, "Jobs in flight."),
            buffer_in_use: gauge(BUFFER_BYTES_IN_USE, "Bytes of part buffers in use."),
            buffer_limit: gauge(BUFFER_BYTES_LIMIT, "The memory limit of part buffers."),
            uploads_resumed: counter_vec(
                UPLOADS_RESUMED,
                "Uploads continued from the journal after a restart, by destination.",
                &["destination"],
            ),
            last_success,
            imports: counter_vec(
                IMPORTS,
                "Imports of verified objects as custom images ended, by destination and outcome (ok: AVAILABLE; failed).",
                &["destination", "outcome"],
            ),
            import_duration,
            conversions: counter_vec(
                CONVERSIONS,
                "Conversions to QCOW2 (policy.convert) ended, by outcome (converted, no_space, failed, differs).",
                &["outcome"],
            ),
            conversion_duration,
            bandwidth_limit,
            known: Default::default(),
            registry,
        });
        for outcome in JOB_OUTCOMES {
            metrics.jobs.with_label_values(&[outcome]);
        }
        for outcome in CONVERSION_OUTCOMES {
            metrics.conversions.with_label_values(&[outcome]);
        }
        metrics
    }

    /// A conversion ended with `outcome` (one of [`CONVERSION_OUTCOMES`]).
    pub fn conversion_ended(&self, outcome: &str, took: Duration) {
        self.conversions.with_label_values(&[outcome]).inc();
        self.conversion_duration.observe(took.as_secs_f64());
    }

    /// The bandwidth limit in force for `destination` (or `bandwidth::ALL`);
    /// `None`, no limit, shows as 0.
    pub fn set_bandwidth_limit(&self, destination: &str, bytes_per_sec: Option<u64>) {
        self.bandwidth_limit
            .with_label_values(&[destination])
            .set(bytes_per_sec.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
    }

    /// Makes every series of `destination` exist, at 0 (or the last success
    /// given), before its first event: a dashboard's `increase()` then sees
    /// the first one. Call at start and for each destination a reload adds;
    /// calling it again for a known destination changes nothing.
    pub fn add_destination(&self, destination: &str, last_success: Option<i64>) {
        let handles = self.destination(destination);
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(destination.to_string());
        for reason in RETRY_REASONS {
            handles.retries.with_label_values(&[destination, reason]);
        }
        if let Some(t) = last_success
            && t > handles.last_success.get()
        {
            handles.last_success.set(t);
        }
    }

    /// Makes the import series of `destination` (one with an import table)
    /// exist at 0 before its first import.
    pub fn add_import_destination(&self, destination: &str) {
        for outcome in IMPORT_OUTCOMES {
            self.imports.with_label_values(&[destination, outcome]);
        }
        self.import_duration.with_label_values(&[destination]);
    }

    /// An import to `destination` ended (`ok` or `failed`) after `took`.
    pub fn import_ended(&self, destination: &str, ok: bool, took: Duration) {
        self.imports
            .with_label_values(&[destination, if ok { "ok" } else { "failed" }])
            .inc();
        self.import_duration
            .with_label_values(&[destination])
            .observe(took.as_secs_f64());
    }

    /// The last success of every destination added so far that has one
    /// (Unix seconds), for the state directory to keep across restarts.
    pub fn last_successes(&self) -> Vec<(String, i64)> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known
            .iter()
            .map(|d| (d.clone(), self.last_success.with_label_values(&[d]).get()))
            .filter(|(_, t)| *t > 0)
            .collect()
    }

    /// Handles for `destination`; call once per destination and job.
    pub fn destination(&self, destination: &str) -> Arc<DestinationMetrics> {
        let d = [destination];
        Arc::new(DestinationMetrics {
            name: destination.to_string(),
            uploaded_bytes: self.uploaded_bytes.with_label_values(&d),
            parts_uploaded: self.parts_uploaded.with_label_values(&d),
            part_duration: self.part_duration.with_label_values(&d),
            checksum_mismatches: self.checksum_mismatches.with_label_values(&d),
            verified_ok: self
                .objects_verified
                .with_label_values(&[destination, "ok"]),
            verified_failed: self
                .objects_verified
                .with_label_values(&[destination, "failed"]),
            uploads_resumed: self.uploads_resumed.with_label_values(&d),
            retries: self.part_retries.clone(),
            last_success: self.last_success.with_label_values(&d),
        })
    }

    pub fn job_ended(&self, outcome: &str, took: Duration) {
        self.jobs.with_label_values(&[outcome]).inc();
        self.job_duration.observe(took.as_secs_f64());
    }

    /// The text exposition format 0.0.4.
    pub fn encode(&self) -> (String, Vec<u8>) {
        let enc = TextEncoder::new();
        let mut buf = Vec::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        (enc.format_type().to_string(), buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_its_name() {
        let m = Metrics::new();
        let d = m.destination("phoenix");
        d.uploaded_bytes.inc_by(10);
        d.retries.with_label_values(&["phoenix", "slow_down"]).inc();
        d.checksum_mismatches.inc();
        m.job_ended("done", Duration::from_secs(1));
        m.add_import_destination("ashburn");
        m.set_bandwidth_limit("(all)", Some(20 << 20));
        let (_, text) = m.encode();
        let text = String::from_utf8(text).unwrap();
        for name in [
            READ_BYTES,
            UPLOADED_BYTES,
            PARTS_UPLOADED,
            PART_UPLOAD_DURATION,
            PART_RETRIES,
            CHECKSUM_MISMATCHES,
            OBJECTS_VERIFIED,
            JOBS,
            JOB_DURATION,
            CONVERSIONS,
            CONVERSION_DURATION,
            BANDWIDTH_LIMIT,
            SPOOL_WAITING_IMAGES,
            SPOOL_WAITING_BYTES,
            JOBS_IN_FLIGHT,
            BUFFER_BYTES_IN_USE,
            BUFFER_BYTES_LIMIT,
            UPLOADS_RESUMED,
            BUILD_INFO,
            IMPORTS,
            IMPORT_DURATION,
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains("ferry_uploaded_bytes_total{destination=\"phoenix\"} 10"));
        for line in [
            "ferry_imports_total{destination=\"ashburn\",outcome=\"ok\"} 0",
            "ferry_imports_total{destination=\"ashburn\",outcome=\"failed\"} 0",
            "ferry_import_duration_seconds_count{destination=\"ashburn\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        m.import_ended("ashburn", false, Duration::from_secs(90));
        let text = String::from_utf8(m.encode().1).unwrap();
        assert!(text.contains("ferry_imports_total{destination=\"ashburn\",outcome=\"failed\"} 1"));
        assert!(text.contains("ferry_import_duration_seconds_sum{destination=\"ashburn\"} 90"));
    }
}
