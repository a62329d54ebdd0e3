//! The live board: what `/readyz`, `/status` and `/metrics` show of a running
//! daemon or push. The daemon and the jobs keep it current (jobs in flight,
//! the queue, jobs waiting to retry, recent errors, each destination's last
//! probe, problems with the spool and state directories); `http` only serves it.
//!
//! Promises: reading the board never touches the disk or the network: the
//! state directory and the destinations are probed by the daemon on its own
//! ticks, and the board holds the answers. (Only the spool's listing is read,
//! which writes nothing.)

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::chunk::Budget;
use crate::metrics::Metrics;
use crate::progress::{Board, Phase};

/// How many recent errors `/status` keeps.
const LAST_ERRORS: usize = 20;
/// How many ended imports `/status` keeps.
const LAST_IMPORTS: usize = 20;

/// An import that ended, as `/status` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ImportEnded {
    pub file: String,
    pub destination: String,
    pub image_id: Option<String>,
    /// The image's last lifecycle state.
    pub state: String,
    /// `ok` (AVAILABLE) or `failed`.
    pub outcome: String,
    pub finished_at: String,
    pub duration_secs: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    pub at: String,
    pub file: String,
    /// refused, failed (the words of `ferry_jobs_total`) or retrying.
    pub outcome: String,
    pub reason: String,
    /// When the same file later shipped: the error no longer stands.
    pub resolved_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationHealth {
    pub url: String,
    pub ready: bool,
    pub last_probe: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Waiting {
    pub file: String,
    pub bytes: u64,
    /// Why it is not in flight yet: settling, waiting for a job slot, ...
    pub why: String,
}

/// A job that failed for a passing reason and waits for its next attempt.
#[derive(Debug, Clone)]
pub struct Retrying {
    pub file: String,
    /// The attempt that comes next, of `of`.
    pub attempt: u32,
    pub of: u32,
    pub next_attempt: Instant,
    pub reason: String,
}

/// What the endpoint shows; the daemon (or a push) keeps it current.
pub struct Status {
    pub metrics: Arc<Metrics>,
    pub board: Arc<Board>,
    pub spool_dir: Option<PathBuf>,
    pub budget: Mutex<Option<Budget>>,
    /// The bandwidth limits jobs pay into, for the gauges and `/status`.
    pub bandwidth: Mutex<Option<Arc<crate::bandwidth::Bandwidth>>>,
    pub waiting: Mutex<Vec<Waiting>>,
    pub errors: Mutex<VecDeque<LastError>>,
    pub health: Mutex<BTreeMap<String, DestinationHealth>>,
    /// Set once the state directory refused a write (full, read-only).
    pub state_problem: Mutex<Option<String>>,
    /// Set while the spool's own directories cannot be made again.
    pub spool_problem: Mutex<Option<String>>,
    /// Bucket sources that cannot be listed, by name.
    pub source_problems: Mutex<BTreeMap<String, String>>,
    pub retrying: Mutex<Vec<Retrying>>,
    /// The last imports that ended, newest last.
    pub imports: Mutex<VecDeque<ImportEnded>>,
}

impl Status {
    pub fn new(metrics: Arc<Metrics>, board: Arc<Board>) -> Arc<Status> {
        Arc::new(Status {
            metrics,
            board,
            spool_dir: None,
            budget: Mutex::new(None),
            bandwidth: Mutex::new(None),
            waiting: Mutex::new(vec![]),
            errors: Mutex::new(VecDeque::new()),
            health: Mutex::new(BTreeMap::new()),
            state_problem: Mutex::new(None),
            spool_problem: Mutex::new(None),
            source_problems: Mutex::new(BTreeMap::new()),
            retrying: Mutex::new(vec![]),
            imports: Mutex::new(VecDeque::new()),
        })
    }

    /// An import ended: listed on `/status` until newer ones push it out.
    pub fn record_import(&self, ended: ImportEnded) {
        if let Ok(mut i) = self.imports.lock() {
            if i.len() >= LAST_IMPORTS {
                i.pop_front();
            }
            i.push_back(ended);
        }
    }

    /// The jobs waiting to be tried again.
    pub fn set_retrying(&self, jobs: Vec<Retrying>) {
        if let Ok(mut r) = self.retrying.lock() {
            *r = jobs;
        }
    }

    /// Whether something keeps the spool from working.
    pub fn spool_broken(&self) -> bool {
        self.spool_problem
            .lock()
            .map(|p| p.is_some())
            .unwrap_or(false)
    }

    /// What keeps the spool from working, if anything; logged when it changes.
    pub fn set_spool_problem(&self, problem: Option<String>) {
        let Ok(mut p) = self.spool_problem.lock() else {
            return;
        };
        if *p == problem {
            return;
        }
        match &problem {
            Some(e) => tracing::error!("{e}"),
            None => tracing::info!("the spool's directories are in place again"),
        }
        *p = problem;
    }

    pub fn record_error(&self, file: &str, outcome: &str, reason: &str) {
        if let Ok(mut e) = self.errors.lock() {
            if e.len() >= LAST_ERRORS {
                e.pop_front();
            }
            e.push_back(LastError {
                at: crate::manifest::timestamp(SystemTime::now()),
                file: file.to_string(),
                outcome: outcome.to_string(),
                reason: reason.to_string(),
                resolved_at: None,
            });
        }
    }

    /// `file` shipped: its earlier errors are marked resolved (they stay
    /// listed, with the time, until newer errors push them out).
    pub fn resolve(&self, file: &str) {
        if let Ok(mut e) = self.errors.lock() {
            let now = crate::manifest::timestamp(SystemTime::now());
            for err in e
                .iter_mut()
                .filter(|err| err.file == file && err.resolved_at.is_none())
            {
                err.resolved_at = Some(now.clone());
            }
        }
    }

    pub fn set_health(&self, name: &str, url: &str, result: Result<(), String>) {
        if let Ok(mut h) = self.health.lock() {
            h.insert(
                name.to_string(),
                DestinationHealth {
                    url: url.to_string(),
                    ready: result.is_ok(),
                    last_probe: crate::manifest::timestamp(SystemTime::now()),
                    error: result.err(),
                },
            );
        }
    }

    /// Problems that make the daemon not ready; empty when ready.
    /// A bucket source's problem (it cannot be listed), or `None` once it
    /// lists again; logged when it starts and ends, shown on `/readyz`
    /// while it lasts.
    pub fn set_source_problem(&self, source: &str, problem: Option<String>) {
        let Ok(mut p) = self.source_problems.lock() else {
            return;
        };
        match problem {
            Some(why) => {
                // Once when it starts: the words may differ at each poll
                // (a timing in them) while the problem is the same.
                if !p.contains_key(source) {
                    tracing::error!("{why}");
                }
                p.insert(source.to_string(), why);
            }
            None => {
                if p.remove(source).is_some() {
                    tracing::info!("source {source} lists again");
                }
            }
        }
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(dir) = &self.spool_dir
            && let Err(e) = std::fs::read_dir(dir)
        {
            p.push(format!("spool {} is not readable: {e}", dir.display()));
        }
        for problem in [&self.state_problem, &self.spool_problem] {
            if let Ok(s) = problem.lock()
                && let Some(s) = s.as_ref()
            {
                p.push(s.clone());
            }
        }
        if let Ok(s) = self.source_problems.lock() {
            p.extend(s.values().cloned());
        }
        if let Ok(h) = self.health.lock() {
            for (name, d) in h.iter().filter(|(_, d)| !d.ready) {
                p.push(format!(
                    "destination {name} ({}) is not ready: {}",
                    d.url,
                    d.error.as_deref().unwrap_or("unknown error")
                ));
            }
        }
        p
    }

    /// Puts the memory budget and jobs in flight into their gauges (before a scrape).
    pub fn sample_gauges(&self) {
        if let Ok(b) = self.budget.lock()
            && let Some(b) = b.as_ref()
        {
            self.metrics.buffer_in_use.set(b.in_use_bytes() as i64);
            self.metrics.buffer_limit.set(b.limit_bytes() as i64);
        }
        for (destination, limit) in self.bandwidth_limits() {
            self.metrics
                .set_bandwidth_limit(&destination, limit.bytes_per_sec);
        }
        self.metrics
            .jobs_in_flight
            .set(self.board.snapshot().len() as i64);
    }

    /// The bandwidth limits in force now: all destinations together
    /// (`bandwidth::ALL`) and each configured one.
    fn bandwidth_limits(&self) -> BTreeMap<String, crate::bandwidth::Limit> {
        self.bandwidth
            .lock()
            .ok()
            .and_then(|b| b.as_ref().map(|b| b.limits()))
            .unwrap_or_default()
    }

    /// What `/status` answers.
    pub fn status_json(&self) -> serde_json::Value {
        let jobs: Vec<serde_json::Value> = self
            .board
            .snapshot()
            .iter()
            .map(|p| {
                let secs = p.started.elapsed().as_secs_f64().max(1e-3);
                let conversion = p.conversion();
                serde_json::json!({
                    "file": p.file_name,
                    "running_secs": secs.round(),
                    "phase": if conversion.is_some() { "converting" } else { "shipping" },
                    "conversion": conversion.map(|(step, percent)| serde_json::json!({
                        "step": step,
                        "percent": (percent * 100.0).round() / 100.0,
                    })),
                    "waiting_for": p.waiting_for_memory().then_some(
                        "memory: every part buffer that transfer.memory_limit allows is in use"
                    ),
                    "destinations": p.destinations.iter().map(|d| {
                        let done = d.done_bytes();
                        let rate = done as f64 / secs;
                        let eta = (rate > 0.0).then(|| (d.total_bytes.saturating_sub(done) as f64 / rate).ceil());
                        serde_json::json!({
                            "name": d.name,
                            "bytes_done": done,
                            "bytes_total": d.total_bytes,
                            "rate_bytes_per_sec": rate.round(),
                            "eta_secs": eta,
                            "phase": match d.phase() {
                                Phase::Uploading => "uploading",
                                Phase::Verifying => "verifying",
                                Phase::Done => "verified",
                                Phase::Importing => "importing",
                                Phase::Imported => "imported",
                                Phase::Failed => "failed",
                            },
                            "import": d.import().map(|i| serde_json::json!({
                                "image_id": i.image_id,
                                "state": i.state,
                                "percent": i.percent,
                            })),
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "version": crate::VERSION,
            "ready": self.problems().is_empty(),
            "jobs": jobs,
            "waiting": self.waiting.lock().map(|w| w.clone()).unwrap_or_default(),
            "retrying": self.retrying.lock().map(|r| r.iter().map(|j| serde_json::json!({
                "file": j.file,
                "attempt": j.attempt,
                "of": j.of,
                "next_attempt_in_secs": j.next_attempt.saturating_duration_since(Instant::now()).as_secs(),
                "reason": j.reason,
            })).collect::<Vec<_>>()).unwrap_or_default(),
            "last_errors": self.errors.lock().map(|e| e.iter().cloned().collect::<Vec<_>>()).unwrap_or_default(),
            "last_imports": self.imports.lock().map(|i| i.iter().cloned().collect::<Vec<_>>()).unwrap_or_default(),
            "destinations": self.health.lock().map(|h| h.clone()).unwrap_or_default(),
            "bandwidth_limits": self.bandwidth_limits(),
        })
    }
}
