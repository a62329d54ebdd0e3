//! `ferry status`: a running daemon's `/status`, read over HTTP and drawn
//! for a terminal: each job with a bar, rate and ETA per destination, the
//! queue, jobs waiting to retry, the last errors, each destination's health
//! and the bandwidth limits.
//!
//! Promises: it only reads `/status` at the `metrics_addr` it is given
//! (loopback by default) and writes nothing; when nothing answers there it
//! says so in one line.
//!
//! Design choice: the view is drawn from the JSON alone, never from ferry's
//! own types, so that it reads any daemon that answers `/status`, including
//! one of another version (a field it does not know is ignored, one that is
//! missing shows as "?"). Plain text with a clear-screen between frames, no
//! terminal UI crate: the view is one screen of lines, and it must also read
//! well in a log or a pipe.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

/// How long to wait for `/status` before saying nothing answers.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Width of a progress bar, in characters.
const BAR: usize = 24;

/// Why there is nothing to draw.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(
        "no ferry daemon answers on {addr} ({why}): start it (systemctl start ferry, or ferry daemon), or give the --config whose metrics_addr it serves"
    )]
    NoAnswer { addr: String, why: String },
    #[error(
        "{addr}/status answered {status}, not ferry's status: is another program on that port?"
    )]
    NotFerry { addr: String, status: String },
}

/// `/status` of the daemon at `addr`, as its JSON text.
pub async fn fetch(addr: std::net::SocketAddr) -> Result<String, ViewError> {
    let base = format!("http://{addr}");
    let no_answer = |e: &dyn std::fmt::Display| ViewError::NoAnswer {
        addr: addr.to_string(),
        why: e.to_string(),
    };
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .no_proxy()
        .build()
        .map_err(|e| no_answer(&e))?;
    let answer = client
        .get(format!("{base}/status"))
        .send()
        .await
        .map_err(|e| no_answer(&deepest(&e)))?;
    let status = answer.status();
    let body = answer.text().await.map_err(|e| no_answer(&e))?;
    if !status.is_success() || serde_json::from_str::<Value>(&body).is_err() {
        return Err(ViewError::NotFerry {
            addr: base,
            status: status.to_string(),
        });
    }
    Ok(body)
}

/// `ferry status`: one screen (or the JSON) on stdout; with `watch`, the
/// screen redrawn in place every `every` until the process is interrupted,
/// a daemon that stops answering said so in place of the screen.
pub async fn show(
    addr: std::net::SocketAddr,
    watch: bool,
    every: Duration,
    json: bool,
) -> Result<(), ViewError> {
    loop {
        let answer = fetch(addr).await;
        let frame = match &answer {
            Ok(body) if json => body.clone(),
            Ok(body) => match serde_json::from_str(body) {
                Ok(v) => render(&addr.to_string(), &v),
                Err(e) => format!("ferry: {addr}/status: {e}\n"),
            },
            Err(e) => format!("ferry: {e}\n"),
        };
        if !watch {
            print!("{}", answer.map(|_| frame)?);
            return Ok(());
        }
        // Home, clear, then the frame: redrawn in place.
        print!("\x1b[H\x1b[2J{frame}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tokio::time::sleep(every).await;
    }
}

/// The innermost cause of an error: the system's words ("Connection
/// refused"), where reqwest's own are "error sending request".
fn deepest(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    for _ in 0..16 {
        match cur.source() {
            Some(s) => cur = s,
            None => break,
        }
    }
    cur.to_string()
}

/// The screen for one `/status` answer from `addr`.
pub fn render(addr: &str, status: &Value) -> String {
    let mut out = String::new();
    let ready = match status["ready"].as_bool() {
        Some(true) => "ready",
        Some(false) => "NOT READY",
        None => "?",
    };
    let _ = writeln!(
        out,
        "ferry {} at {addr}: {ready}    {}",
        text(&status["version"]),
        chrono::Local::now().format("%H:%M:%S")
    );
    limits(&mut out, &status["bandwidth_limits"]);

    let jobs = list(&status["jobs"]);
    let _ = writeln!(out, "\nJOBS ({})", jobs.len());
    for job in jobs {
        // Indexing a Value (never a Map) answers Null for a missing key.
        let c = &job["conversion"];
        let phase = if c.is_object() {
            format!(
                "converting ({}, {}%)",
                text(&c["step"]),
                c["percent"].as_f64().unwrap_or(0.0).round()
            )
        } else {
            text(&job["phase"])
        };
        let _ = writeln!(
            out,
            "  {}  {phase}, {}{}",
            text(&job["file"]),
            secs(&job["running_secs"]),
            job["waiting_for"]
                .as_str()
                .map(|w| format!("; waiting for {w}"))
                .unwrap_or_default()
        );
        for d in list(&job["destinations"]) {
            let _ = writeln!(out, "    {}", destination_line(d));
        }
    }

    let waiting = list(&status["waiting"]);
    let _ = writeln!(out, "\nQUEUE ({})", waiting.len());
    for w in waiting {
        let _ = writeln!(
            out,
            "  {}  {}  {}",
            text(&w["file"]),
            bytes(&w["bytes"]),
            text(&w["why"])
        );
    }

    let retrying = list(&status["retrying"]);
    if !retrying.is_empty() {
        let _ = writeln!(out, "\nRETRYING ({})", retrying.len());
        for r in retrying {
            let _ = writeln!(
                out,
                "  {}  attempt {} of {} in {}: {}",
                text(&r["file"]),
                text(&r["attempt"]),
                text(&r["of"]),
                secs(&r["next_attempt_in_secs"]),
                text(&r["reason"])
            );
        }
    }

    let errors = list(&status["last_errors"]);
    let _ = writeln!(out, "\nLAST ERRORS ({})", errors.len());
    // The newest first, at most five: the rest is in /status and the log.
    for e in errors.iter().rev().take(5) {
        let resolved = e["resolved_at"]
            .as_str()
            .map(|t| format!(" (resolved {t})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {}  {}  {}: {}{resolved}",
            text(&e["at"]),
            text(&e["file"]),
            text(&e["outcome"]),
            text(&e["reason"])
        );
    }

    let health = status["destinations"].as_object();
    let _ = writeln!(
        out,
        "\nDESTINATIONS ({})",
        health.map_or(0, serde_json::Map::len)
    );
    for (name, h) in health.into_iter().flatten() {
        let state = match h["ready"].as_bool() {
            Some(true) => "ready".to_string(),
            Some(false) => format!("NOT READY: {}", text(&h["error"])),
            None => "?".to_string(),
        };
        let _ = writeln!(
            out,
            "  {}  {}  {state}  (probed {})",
            text(&Value::String(name.clone())),
            text(&h["url"]),
            text(&h["last_probe"])
        );
    }
    out
}

/// One destination of a job: bar, share done, bytes, rate, ETA, phase.
fn destination_line(d: &Value) -> String {
    let done = d["bytes_done"].as_u64().unwrap_or(0);
    let total = d["bytes_total"].as_u64().unwrap_or(0);
    let share = if total == 0 {
        0.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = (share * BAR as f64).round() as usize;
    let eta = match d["eta_secs"].as_f64() {
        Some(_) if done >= total => String::new(),
        Some(s) => format!("  ETA {}", duration(s)),
        None => "  ETA ?".into(),
    };
    let i = &d["import"];
    let import = if i.is_object() {
        format!(
            " ({}{})",
            text(&i["state"]),
            i["percent"]
                .as_f64()
                .map(|p| format!(", {p:.0}%"))
                .unwrap_or_default()
        )
    } else {
        String::new()
    };
    format!(
        "{:<12} [{}{}] {:>3.0}%  {} of {}  {}/s{eta}  {}{import}",
        text(&d["name"]),
        "#".repeat(filled),
        "-".repeat(BAR - filled),
        share * 100.0,
        bytes(&d["bytes_done"]),
        bytes(&d["bytes_total"]),
        bytes(&d["rate_bytes_per_sec"]),
        text(&d["phase"])
    )
}

/// The bandwidth limits line, when any limit is set.
fn limits(out: &mut String, limits: &Value) {
    let Some(limits) = limits.as_object() else {
        return;
    };
    let set: Vec<String> = limits
        .iter()
        .filter(|(_, l)| l["schedule"].is_string() && l["schedule"] != "off")
        .map(|(name, l)| {
            let now = match l["bytes_per_sec"].as_u64() {
                Some(_) => format!("{}/s", bytes(&l["bytes_per_sec"])),
                None => "off".into(),
            };
            format!(
                "{} {now} ({})",
                text(&Value::String(name.clone())),
                text(&l["schedule"])
            )
        })
        .collect();
    if !set.is_empty() {
        let _ = writeln!(out, "bandwidth: {}", set.join("; "));
    }
}

fn list(v: &Value) -> Vec<&Value> {
    v.as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

/// A JSON value as text: strings without quotes, "?" for nothing, and no
/// control characters (a file name may hold an escape sequence, and the
/// terminal must not obey it).
fn text(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".into(),
        other => other.to_string(),
    };
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn bytes(v: &Value) -> String {
    match v.as_f64() {
        Some(b) => bytesize::ByteSize(b.max(0.0) as u64)
            .display()
            .iec()
            .to_string(),
        None => "?".into(),
    }
}

fn secs(v: &Value) -> String {
    v.as_f64().map_or("?".into(), duration)
}

fn duration(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0.0).round() as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_its_queue_errors_and_destinations_are_drawn() {
        let status = serde_json::json!({
            "version": "0.1.0",
            "ready": false,
            "jobs": [{
                "file": "web01.qcow2",
                "running_secs": 75.0,
                "phase": "shipping",
                "conversion": null,
                "waiting_for": null,
                "destinations": [
                    {"name": "phoenix", "bytes_done": 512u64 << 20, "bytes_total": 1u64 << 30,
                     "rate_bytes_per_sec": 8u64 << 20, "eta_secs": 64.0, "phase": "uploading", "import": null},
                    {"name": "ashburn", "bytes_done": 1u64 << 30, "bytes_total": 1u64 << 30,
                     "rate_bytes_per_sec": 16u64 << 20, "eta_secs": 0.0, "phase": "importing",
                     "import": {"image_id": "ocid1.image.x", "state": "IMPORTING", "percent": 40}}
                ]
            }],
            "waiting": [{"file": "db02.vmdk", "bytes": 3u64 << 30, "why": "waiting for a job slot"}],
            "retrying": [],
            "last_errors": [{"at": "2026-12-07T22:00:00Z", "file": "bad.vhd", "outcome": "refused",
                             "reason": "VHD: convert it first", "resolved_at": null}],
            "destinations": {
                "phoenix": {"url": "file:///x/", "ready": true, "last_probe": "t1", "error": null},
                "ashburn": {"url": "s3://b/", "ready": false, "last_probe": "t2", "error": "connection refused"}
            },
            "bandwidth_limits": {
                "(all)": {"bytes_per_sec": 20u64 << 20, "schedule": "08:00,20MiB 19:00,off"},
                "phoenix": {"bytes_per_sec": null, "schedule": null}
            }
        });
        let screen = render("127.0.0.1:9465", &status);
        for line in [
            "ferry 0.1.0 at 127.0.0.1:9465: NOT READY",
            "bandwidth: (all) 20.0 MiB/s (08:00,20MiB 19:00,off)",
            "JOBS (1)",
            "  web01.qcow2  shipping, 1m 15s",
            "phoenix      [############------------]  50%  512.0 MiB of 1.0 GiB  8.0 MiB/s  ETA 1m 4s  uploading",
            "ashburn      [########################] 100%  1.0 GiB of 1.0 GiB  16.0 MiB/s  importing (IMPORTING, 40%)",
            "QUEUE (1)",
            "  db02.vmdk  3.0 GiB  waiting for a job slot",
            "LAST ERRORS (1)",
            "bad.vhd  refused: VHD: convert it first",
            "DESTINATIONS (2)",
            "  ashburn  s3://b/  NOT READY: connection refused",
            "  phoenix  file:///x/  ready",
        ] {
            assert!(screen.contains(line), "{line:?} missing from:\n{screen}");
        }
        assert!(!screen.contains("RETRYING"), "{screen}");
    }

    #[test]
    fn an_older_or_newer_status_still_draws() {
        let screen = render("a", &serde_json::json!({"jobs": [{"destinations": [{}]}]}));
        assert!(screen.contains("ferry ? at a: ?"), "{screen}");
        assert!(screen.contains("[------------------------]"), "{screen}");
        // Objects without the keys this version knows (seen: a panic when a
        // Map was indexed).
        let screen = render(
            "a",
            &serde_json::json!({"jobs": [{"conversion": {}, "destinations": [{"import": {}}]}],
                                "destinations": {"x": {}}, "bandwidth_limits": {"y": {"schedule": "1MiB"}},
                                "waiting": [{}], "retrying": [{}], "last_errors": [{}]}),
        );
        assert!(screen.contains("converting (?, 0%)"), "{screen}");
        assert!(screen.contains("(?)"), "{screen}");
        for odd in [
            serde_json::json!(null),
            serde_json::json!([1, 2]),
            serde_json::json!({"jobs": "x", "destinations": [1], "waiting": {"a": 1}}),
        ] {
            render("a", &odd);
        }
    }

    #[test]
    fn control_characters_in_names_are_not_sent_to_the_terminal() {
        let screen = render(
            "a",
            &serde_json::json!({"waiting": [{"file": "evil\u{1b}[2J.qcow2", "bytes": 1, "why": "x"}]}),
        );
        assert!(screen.contains("evil?[2J.qcow2"), "{screen}");
        assert!(!screen.contains('\u{1b}'), "{screen}");
    }
}
