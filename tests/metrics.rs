//! Metrics, health and status as a dashboard sees them: the real daemon, the
//! real `promtool`, a real Prometheus server scraping it, and SeaweedFS.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn daemon_config(root: &Path, port: u16, tables: &str) -> std::path::PathBuf {
    write(
        &root.join("ferry.toml"),
        &format!(
            r#"spool_dir = "{r}/spool"
state_dir = "{r}/state"
metrics_addr = "127.0.0.1:{port}"
[daemon]
settle_secs = 1
[policy]
refuse = false
require_license_attestation = false
{tables}
"#,
            r = root.display()
        ),
    )
}

fn promtool_check(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (tests/run.sh installs Debian's prometheus)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

struct Prometheus {
    child: std::process::Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, target_port: u16) -> Prometheus {
        let port = free_port();
        let cfg = write(
            &dir.join("prometheus.yml"),
            &format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ferry\n    static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n"
            ),
        );
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (tests/run.sh installs it)");
        let p = Prometheus { child, port };
        assert!(
            wait_until(Duration::from_secs(30), || http_get(port, "/-/ready")
                .is_some_and(|r| r.0 == 200)),
            "prometheus did not become ready"
        );
        p
    }

    /// Instant query; returns (labels, value) pairs.
    fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let path = format!("/api/v1/query?query={}", query_escape(q));
        let Some((200, body)) = http_get(self.port, &path) else {
            return vec![];
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["metric"].clone(),
                            r["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0.0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The daemon of `cfg` (serving on `port`, its log in `root`), and a
/// Prometheus that has scraped it once: rates have a baseline.
fn scraped_daemon(root: &Path, cfg: &Path, port: u16) -> (Daemon, Prometheus) {
    let d = Daemon::start(cfg, &root.join("daemon.log"));
    assert!(wait_until(Duration::from_secs(20), || http_get(
        port, "/healthz"
    )
    .is_some()));
    let prom = Prometheus::start(root, port);
    assert!(
        wait_until(Duration::from_secs(30), || prom
            .query("up{job=\"ferry\"}")
            .iter()
            .any(|(_, v)| *v == 1.0)),
        "prometheus never scraped the daemon"
    );
    (d, prom)
}

/// Acceptance 1 and 2: promtool finds no problem in /metrics during an upload, and
/// a real Prometheus scraping every second sees both destinations' upload rate
/// above zero during a 2 GiB upload, and final counters equal the bytes uploaded.
#[test]
fn prometheus_scrapes_a_daemon_during_a_two_gib_upload() {
    let Some(s3) = s3() else { return };
    let dir = tmpdir();
    let root = dir.path();
    std::fs::create_dir_all(root.join("spool")).unwrap();
    let port = free_port();
    let prefix = unique_prefix("prom");
    let cfg = daemon_config(
        root,
        port,
        &format!(
            "[transfer]\nparallel_parts = 2\npart_size = \"32MiB\"\n[destinations.phoenix]\nurl = \"file://{}/phoenix/\"\nparallel_parts = 1\n[destinations.ashburn]\nurl = \"s3://{}/{prefix}/\"\nendpoint = \"{}\"\n",
            root.display(),
            s3.buckets[0],
            s3.endpoint
        ),
    );
    let (d, prom) = scraped_daemon(root, &cfg, port);
    let size: u64 = 2 << 30;
    drop_image(&root.join("spool"), "two-gib.qcow2", size, 11);

    let mut promtool_ran = false;
    let mut rate_seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while Instant::now() < deadline && !root.join("spool/.ferry/done/two-gib.qcow2").exists() {
        if !promtool_ran
            && let Some((200, text)) = http_get(port, "/metrics")
            && text.contains("ferry_uploaded_bytes_total{")
        {
            let (rc, out) = promtool_check(&text);
            assert_eq!(rc, 0, "promtool: {out}\n{text}");
            assert!(out.trim().is_empty(), "promtool printed: {out}");
            promtool_ran = true;
        }
        for (labels, v) in prom.query("rate(ferry_uploaded_bytes_total[5s])") {
            if v > 0.0 {
                rate_seen.insert(labels["destination"].as_str().unwrap_or("").to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        root.join("spool/.ferry/done/two-gib.qcow2").exists(),
        "upload did not finish"
    );
    assert!(promtool_ran, "never saw an upload in /metrics");
    assert_eq!(
        rate_seen.iter().cloned().collect::<Vec<_>>(),
        vec!["ashburn".to_string(), "phoenix".to_string()],
        "rate > 0 not seen for both destinations"
    );
    // Once scraped after the end, the counters equal what each destination received.
    wait_until(Duration::from_secs(30), || {
        let q = prom.query("ferry_uploaded_bytes_total");
        q.len() == 2 && q.iter().all(|(_, v)| *v as u64 == size)
    });
    let finals = prom.query("ferry_uploaded_bytes_total");
    for dest in ["ashburn", "phoenix"] {
        let v = finals
            .iter()
            .find(|(l, _)| l["destination"] == dest)
            .map(|(_, v)| *v)
            .unwrap_or(-1.0);
        assert_eq!(v as u64, size, "{dest}: counter {v}");
    }
    assert_eq!(
        std::fs::metadata(root.join("phoenix/two-gib.qcow2"))
            .unwrap()
            .len(),
        size
    );
    let store = s3.store(&s3.buckets[0]);
    assert!(s3_object_equals(
        &store,
        &format!("{prefix}/two-gib.qcow2"),
        &root.join("spool/.ferry/done/two-gib.qcow2")
    ));
    let (_, status) = http_get(port, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["jobs"].as_array().unwrap().len(), 0);
    // The last-success panel's query shows both regions (every panel is
    // checked by the next test).
    let since = prom.query(
        "time() - max by (destination) (ferry_last_success_timestamp_seconds{instance=~\".*\"} > 0)",
    );
    assert_eq!(since.len(), 2, "{since:?}");
    assert!(
        since.iter().all(|(_, s)| (0.0..600.0).contains(s)),
        "{since:?}"
    );
    drop(d);
}

/// Every query of every panel of `config/grafana-dashboard.json`, as
/// Grafana would send it: parsed by a real Prometheus (an error answers 400)
/// and returning data, after a daemon shipped two images, one of them
/// converted, to a directory and to an `oci://` region that imports them
/// (the OCI double). A panel with nothing to show is a bug in the panel.
#[test]
fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    let ash = OciDouble::start_with(|c| c["import_secs"] = 1.0.into());
    let dir = tmpdir();
    let root = dir.path();
    let spool = root.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let port = free_port();
    let cfg = write(
        &root.join("ferry.toml"),
        &format!(
            "spool_dir = \"{r}/spool\"\nstate_dir = \"{r}/state\"\nmetrics_addr = \"127.0.0.1:{port}\"\n[daemon]\nsettle_secs = 1\n[policy]\nrequire_license_attestation = false\nconvert = true\n[transfer]\npart_size = \"5MiB\"\nbandwidth_limit = \"200MiB\"\n[destinations.phoenix]\nurl = \"file://{r}/phoenix/\"\n{}",
            ash.importing_table("ashburn", "oci://images/exports/", "us-ashburn-1", ""),
            r = root.display()
        ),
    );
    let (d, prom) = scraped_daemon(root, &cfg, port);
    // Two images with what an import needs: a QCOW2, and a raw disk that
    // is converted first.
    let images = tmpdir();
    boot_qcow2(images.path(), "web.qcow2", 24 << 20);
    boot_raw(&images.path().join("db.raw"), 24 << 20);
    for name in ["web.qcow2", "db.raw"] {
        write(
            &spool.join(format!("{name}.meta.json")),
            r#"{"os": "Oracle Linux", "os_version": "9", "launch_mode": "PARAVIRTUALIZED"}"#,
        );
        spool_copy(&images.path().join(name), &spool);
    }
    let done = spool.join(".ferry/done");
    assert!(
        wait_until(Duration::from_secs(120), || done.join("web.qcow2").exists()
            && done.join("db.raw").exists()),
        "both images did not end in done/: {}",
        d.log_text()
    );
    assert_eq!(ash.images_created(), 2);
    // Prometheus has scraped the end (the jobs end after their imports).
    assert!(
        wait_until(Duration::from_secs(30), || prom
            .query("sum(ferry_jobs_total{outcome=\"done\"})")
            .iter()
            .any(|(_, v)| *v == 2.0)),
        "prometheus never saw both jobs done"
    );

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut empty = Vec::new();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        let mut finite = false;
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h");
            let path = format!("/api/v1/query?query={}", query_escape(&expr));
            let (code, body) = http_get(prom.port, &path).expect("prometheus answers");
            assert_eq!(code, 200, "{title}: {expr}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
            if result.is_empty() {
                empty.push(format!("{title}: {expr}"));
            }
            finite |= result.iter().any(|r| {
                r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            });
            checked += 1;
        }
        if !finite {
            empty.push(format!("{title}: no finite value in any of its queries"));
        }
    }
    assert!(checked >= 25, "{checked} queries");
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
}

/// Acceptance 3: /readyz answers 503 naming the destination while its S3 server
/// is stopped, and 200 again within 30 s after it returns.
#[test]
fn readyz_follows_an_s3_destination_down_and_up() {
    if s3().is_none() {
        return;
    }
    let dir = tmpdir();
    let root = dir.path();
    std::fs::create_dir_all(root.join("spool")).unwrap();
    let weed_dir = root.join("weed");
    let s3_port = 18533;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/seaweedfs.sh");
    let weed = |args: &[&str]| {
        let ok = Command::new("bash")
            .arg(script)
            .args(args)
            .status()
            .unwrap();
        assert!(ok.success(), "seaweedfs.sh {args:?}");
    };
    let wd = weed_dir.display().to_string();
    weed(&["start", &wd, &s3_port.to_string()]);
    weed(&["bucket", &s3_port.to_string(), "ferry-ready"]);
    let port = free_port();
    let cfg = daemon_config(
        root,
        port,
        &format!(
            "[destinations.local]\nurl = \"file://{}/local/\"\n[destinations.osaka]\nurl = \"s3://ferry-ready/x/\"\nendpoint = \"http://127.0.0.1:{s3_port}\"\n",
            root.display()
        ),
    );
    let _d = Daemon::start(&cfg, &root.join("daemon.log"));
    let ready = || http_get(port, "/readyz");
    assert!(
        wait_until(Duration::from_secs(30), || ready()
            .is_some_and(|r| r.0 == 200)),
        "never ready: {:?}",
        ready()
    );
    weed(&["stop", &wd]);
    let down = wait_until(Duration::from_secs(30), || {
        ready().is_some_and(|(code, body)| code == 503 && body.contains("osaka"))
    });
    let seen = ready();
    weed(&["start", &wd, &s3_port.to_string()]);
    let back_from = Instant::now();
    assert!(
        down,
        "no 503 naming osaka while its server was down: {seen:?}"
    );
    let (_, body) = seen.unwrap();
    assert!(
        !body.contains("local"),
        "the healthy destination was named: {body}"
    );
    let up = wait_until(Duration::from_secs(30), || {
        ready().is_some_and(|r| r.0 == 200)
    });
    let took = back_from.elapsed();
    weed(&["stop", &wd]);
    assert!(up, "not ready again within 30 s: {:?}", ready());
    eprintln!("ready again {took:?} after the server returned");
}

/// The value of the series `name{labels}` (labels as the text format writes
/// them, or "" for none) in `text`; None when it is not there.
fn series(text: &str, name: &str, labels: &str) -> Option<f64> {
    let head = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&head)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// Issue 13, item 3: right after start, every labelled counter of every
/// configured destination is at 0 (a dashboard's `increase()` sees the first
/// event), the process_* metrics are there, promtool is content; a destination
/// added by SIGHUP gets its series too; the last-success time is set by a
/// verified object and survives a restart.
#[test]
fn every_labelled_series_exists_at_zero_right_after_start() {
    let dir = tmpdir();
    let root = dir.path();
    std::fs::create_dir_all(root.join("spool")).unwrap();
    let port = free_port();
    let tables = |names: &[&str]| {
        names
            .iter()
            .map(|n| {
                format!(
                    "[destinations.{n}]\nurl = \"file://{}/{n}/\"\n",
                    root.display()
                )
            })
            .collect::<String>()
    };
    let cfg = daemon_config(root, port, &tables(&["phoenix", "ashburn"]));
    let d = Daemon::start(&cfg, &root.join("daemon.log"));
    let mut text = String::new();
    assert!(wait_until(Duration::from_secs(20), || {
        match http_get(port, "/metrics") {
            Some((200, t)) => {
                text = t;
                true
            }
            _ => false,
        }
    }));
    let (rc, out) = promtool_check(&text);
    assert_eq!(rc, 0, "promtool: {out}\n{text}");
    assert!(out.trim().is_empty(), "promtool printed: {out}");
    let at_zero = |text: &str, dest: &str| {
        let d = format!("destination=\"{dest}\"");
        let mut want = vec![
            ("ferry_uploaded_bytes_total", d.clone()),
            ("ferry_parts_uploaded_total", d.clone()),
            ("ferry_checksum_mismatches_total", d.clone()),
            ("ferry_uploads_resumed_total", d.clone()),
            ("ferry_part_upload_duration_seconds_count", d.clone()),
            ("ferry_last_success_timestamp_seconds", d.clone()),
            (
                "ferry_objects_verified_total",
                format!("{d},outcome=\"ok\""),
            ),
            (
                "ferry_objects_verified_total",
                format!("{d},outcome=\"failed\""),
            ),
        ];
        for reason in [
            "timeout",
            "server_error",
            "slow_down",
            "reset",
            "checksum",
            "dns",
            "connection_refused",
            "tls",
            "other",
        ] {
            want.push((
                "ferry_part_retries_total",
                format!("{d},reason=\"{reason}\""),
            ));
        }
        for (name, labels) in want {
            assert_eq!(
                series(text, name, &labels),
                Some(0.0),
                "{name}{{{labels}}} is not at 0 in:\n{text}"
            );
        }
    };
    for dest in ["phoenix", "ashburn"] {
        at_zero(&text, dest);
    }
    for outcome in ["done", "refused", "failed"] {
        let labels = format!("outcome=\"{outcome}\"");
        assert_eq!(
            series(&text, "ferry_jobs_total", &labels),
            Some(0.0),
            "{labels}"
        );
    }
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(series(&text, name, "").is_some(), "{name} missing");
    }
    // A destination added by a reload has its series before its first event.
    write(
        &root.join("ferry.toml"),
        &std::fs::read_to_string(&cfg).unwrap().replace(
            "[destinations.phoenix]",
            &format!("{}[destinations.phoenix]", tables(&["frankfurt"])),
        ),
    );
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || http_get(port, "/metrics")
            .is_some_and(|(_, t)| t.contains("destination=\"frankfurt\""))),
        "no frankfurt series after SIGHUP"
    );
    at_zero(&http_get(port, "/metrics").unwrap().1, "frankfurt");
    // A verified object sets the time; a restart keeps it.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    drop_image(&root.join("spool"), "first.qcow2", 6 << 20, 13);
    assert!(wait_until(Duration::from_secs(60), || root
        .join("spool/.ferry/done/first.qcow2")
        .exists()));
    let last = |port| {
        let text = http_get(port, "/metrics").unwrap().1;
        ["phoenix", "ashburn", "frankfurt"].map(|d| {
            series(
                &text,
                "ferry_last_success_timestamp_seconds",
                &format!("destination=\"{d}\""),
            )
            .unwrap_or(-1.0)
        })
    };
    let shipped = last(port);
    assert!(shipped.iter().all(|t| *t >= before.floor()), "{shipped:?}");
    let jobs = http_get(port, "/metrics").unwrap().1;
    assert_eq!(
        series(&jobs, "ferry_jobs_total", "outcome=\"done\""),
        Some(1.0)
    );
    drop(d);
    let _d = Daemon::start(&cfg, &root.join("daemon.log"));
    assert!(wait_until(Duration::from_secs(20), || http_get(
        port, "/healthz"
    )
    .is_some()));
    assert_eq!(last(port), shipped, "the last-success times were not kept");
}
