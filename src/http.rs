//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`.
//!
//! Promises: it binds `metrics_addr` (loopback by default); `/metrics` is the
//! Prometheus text format 0.0.4; `/healthz` answers while the process serves;
//! `/readyz` is 200 only when the spool is readable, the state directory takes
//! writes and every destination answered its last probe, and 503 naming what is
//! wrong otherwise; `/status` is JSON for people and dashboards. It stops with
//! the daemon.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (one over the cap is
//! closed at once, so it holds no descriptor); a connection that has not sent
//! a whole request head within [`HEADER_TIMEOUT`] (idle keep-alive included)
//! is closed, and none lives longer than [`CONNECTION_LIFETIME`]. Idle or slow
//! clients can therefore neither exhaust the daemon's open files nor keep
//! `/healthz` from answering for long.
//!
//! Design choice: hyper 1.x with HTTP/1 only and one task per connection; the
//! endpoint is scraped every few seconds by a handful of clients, so it needs
//! nothing more, and it never touches the transfer's hot path (it reads
//! counters and snapshots).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::watch;

use crate::chunk::Budget;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::progress::{Board, Phase};

/// How many recent errors `/status` keeps.
const LAST_ERRORS: usize = 20;

/// Connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 256;
/// Time to send a request head, and the longest a kept-alive connection may idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest any connection is served.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    pub at: String,
    pub file: String,
    pub reason: String,
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
    pub journal: Option<Journal>,
    pub budget: Mutex<Option<Budget>>,
    pub waiting: Mutex<Vec<Waiting>>,
    pub errors: Mutex<VecDeque<LastError>>,
    pub health: Mutex<BTreeMap<String, DestinationHealth>>,
    /// Set once the state directory refused a write (full, read-only).
    pub state_problem: Mutex<Option<String>>,
    /// Set while the spool's own directories cannot be made again.
    pub spool_problem: Mutex<Option<String>>,
    pub retrying: Mutex<Vec<Retrying>>,
}

impl Status {
    pub fn new(metrics: Arc<Metrics>, board: Arc<Board>) -> Arc<Status> {
        Arc::new(Status {
            metrics,
            board,
            spool_dir: None,
            journal: None,
            budget: Mutex::new(None),
            waiting: Mutex::new(vec![]),
            errors: Mutex::new(VecDeque::new()),
            health: Mutex::new(BTreeMap::new()),
            state_problem: Mutex::new(None),
            spool_problem: Mutex::new(None),
            retrying: Mutex::new(vec![]),
        })
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

    pub fn record_error(&self, file: &str, reason: &str) {
        if let Ok(mut e) = self.errors.lock() {
            if e.len() >= LAST_ERRORS {
                e.pop_front();
            }
            e.push_back(LastError {
                at: crate::manifest::timestamp(SystemTime::now()),
                file: file.to_string(),
                reason: reason.to_string(),
            });
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
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(dir) = &self.spool_dir
            && let Err(e) = std::fs::read_dir(dir)
        {
            p.push(format!("spool {} is not readable: {e}", dir.display()));
        }
        if let Some(j) = &self.journal
            && let Err(e) = j.writable()
        {
            p.push(format!("state directory does not take writes: {e}"));
        }
        for problem in [&self.state_problem, &self.spool_problem] {
            if let Ok(s) = problem.lock()
                && let Some(s) = s.as_ref()
            {
                p.push(s.clone());
            }
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

    fn sample_gauges(&self) {
        if let Ok(b) = self.budget.lock()
            && let Some(b) = b.as_ref()
        {
            self.metrics.buffer_in_use.set(b.in_use_bytes() as i64);
            self.metrics.buffer_limit.set(b.limit_bytes() as i64);
        }
        self.metrics
            .jobs_in_flight
            .set(self.board.snapshot().len() as i64);
    }

    fn status_json(&self) -> serde_json::Value {
        let jobs: Vec<serde_json::Value> = self
            .board
            .snapshot()
            .iter()
            .map(|p| {
                let secs = p.started.elapsed().as_secs_f64().max(1e-3);
                serde_json::json!({
                    "file": p.file_name,
                    "running_secs": secs.round(),
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
                                Phase::Failed => "failed",
                            },
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
            "destinations": self.health.lock().map(|h| h.clone()).unwrap_or_default(),
        })
    }
}

fn text(code: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    status: Arc<Status>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let r = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            status.sample_gauges();
            let (ctype, body) = status.metrics.encode();
            let mut r = text(StatusCode::OK, body);
            if let Ok(v) = hyper::header::HeaderValue::from_str(&ctype) {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        (&hyper::Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&hyper::Method::GET, "/readyz") => {
            let p = status.problems();
            if p.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready:\n{}\n", p.join("\n")),
                )
            }
        }
        (&hyper::Method::GET, "/status") => {
            status.sample_gauges();
            let mut r = text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&status.status_json()).unwrap_or_default(),
            );
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        (&hyper::Method::GET, _) => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz or /status\n",
        ),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"),
    };
    Ok(r)
}

/// Binds `addr` and serves until `stop` turns true. Returns the bound address
/// (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Status>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut last_full_warning: Option<Instant> = None;
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Over the cap: close it now rather than hold its descriptor.
                drop(stream);
                if last_full_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    last_full_warning = Some(Instant::now());
                    tracing::warn!(
                        "metrics endpoint: {MAX_CONNECTIONS} connections open, the most it serves; closing new ones until some end"
                    );
                }
                continue;
            };
            let st = status.clone();
            let mut conn_stop = stop.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = hyper::service::service_fn(move |req| handle(req, st.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                tokio::pin!(conn);
                let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
                tokio::pin!(lifetime);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = &mut lifetime => {}
                    _ = conn_stop.changed() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                    }
                }
            });
        }
    });
    Ok(bound)
}
