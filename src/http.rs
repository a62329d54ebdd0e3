//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`.
//!
//! Promises: it binds `metrics_addr` (loopback by default); `/metrics` is the
//! Prometheus text format 0.0.4; `/healthz` answers while the process serves;
//! `/readyz` is 200 only when `status` finds no problem, and 503 naming what is
//! wrong otherwise; `/status` is JSON for people and dashboards. It only serves
//! what `status` holds: no request writes anything. It stops with the daemon.
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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::shutdown::Shutdown;
use crate::status::Status;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

/// Connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 256;
/// Time to send a request head, and the longest a kept-alive connection may idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest any connection is served.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

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

/// Binds `addr` and serves until `stop` trips; then connections get a second
/// to finish their answer. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Status>,
    stop: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
                _ = stop.requested() => break,
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
            let svc = hyper::service::service_fn(move |req| handle(req, st.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _slot = slot;
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            });
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    });
    Ok(bound)
}
