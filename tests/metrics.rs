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
    let d = Daemon::start(&cfg, &root.join("daemon.log"));
    assert!(wait_until(Duration::from_secs(20), || http_get(
        port, "/healthz"
    )
    .is_some()));
    let prom = Prometheus::start(root, port);
    // Prometheus has scraped the idle daemon, so rates have a baseline.
    assert!(
        wait_until(Duration::from_secs(30), || prom
            .query("up{job=\"ferry\"}")
            .iter()
            .any(|(_, v)| *v == 1.0)),
        "prometheus never scraped the daemon"
    );
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
    drop(d);
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
