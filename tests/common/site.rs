//! A fault-injecting relay in front of the test S3 server, and a daemon's
//! site (spool, state, config, metrics port) for the fault and attack tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::*;

const RELAY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/fault_relay.py");

pub struct Relay {
    child: Child,
    pub port: u16,
    control: PathBuf,
    /// Holds the control file and the log of what was injected.
    _dir: tempfile::TempDir,
}

impl Relay {
    pub fn start(s3: &S3) -> Relay {
        Relay::to(s3.endpoint.rsplit(':').next().unwrap().parse().unwrap())
    }

    /// A relay to the server on 127.0.0.1:`target`.
    pub fn to(target: u16) -> Relay {
        Relay::serving(target, None)
    }

    /// A relay that serves HTTPS with `cert` and `key` (PEM files) to the
    /// plain-HTTP server on 127.0.0.1:`target`.
    pub fn tls_to(target: u16, cert: &Path, key: &Path) -> Relay {
        Relay::serving(target, Some((cert, key)))
    }

    fn serving(target: u16, tls: Option<(&Path, &Path)>) -> Relay {
        let port = free_port();
        let dir = tmpdir();
        let control = dir.path().join("relay.json");
        std::fs::write(&control, "{}").unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg(RELAY)
            .arg(port.to_string())
            .arg(target.to_string())
            .arg(&control);
        if let Some((cert, key)) = tls {
            cmd.arg(cert).arg(key);
        }
        let child = cmd.spawn().unwrap();
        assert!(wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }));
        Relay {
            child,
            port,
            control,
            _dir: dir,
        }
    }
    pub fn set(&self, json: &str) {
        std::fs::write(&self.control, json).unwrap();
    }
    /// What the relay logged: one line per injected fault or throttled part.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.control.with_extension("json.log")).unwrap_or_default()
    }
    /// Forgets what was logged so far.
    pub fn clear_log(&self) {
        let _ = std::fs::remove_file(self.control.with_extension("json.log"));
    }
    pub fn injected(&self, what: &str) -> usize {
        self.log().lines().filter(|l| l.starts_with(what)).count()
    }
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    /// Part bytes the relay has passed on to the server while throttled.
    pub fn slow_bytes(&self) -> u64 {
        self.log()
            .lines()
            .filter_map(|l| l.strip_prefix("slow ")?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Site {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub spool: PathBuf,
    pub config: PathBuf,
    pub metrics_port: u16,
}

impl Site {
    pub fn new(tables: &str) -> Site {
        Site::with_daemon("", tables)
    }

    /// A site whose `[daemon]` table also holds `daemon` (lines of TOML).
    pub fn with_daemon(daemon: &str, tables: &str) -> Site {
        let dir = tmpdir();
        let root = dir.path().to_path_buf();
        let spool = root.join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let metrics_port = free_port();
        let config = write(
            &root.join("ferry.toml"),
            &format!(
                "spool_dir = \"{r}/spool\"\nstate_dir = \"{r}/state\"\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\n[daemon]\nsettle_secs = 1\nmax_jobs = 2\n{daemon}\n[policy]\nrefuse = false\nrequire_license_attestation = false\n{}",
                tables.replace("ROOT", &root.display().to_string()),
                r = root.display()
            ),
        );
        Site {
            _dir: dir,
            root,
            spool,
            config,
            metrics_port,
        }
    }
    pub fn daemon(&self) -> Daemon {
        Daemon::start(&self.config, &self.root.join("daemon.log"))
    }
    pub fn active(&self) -> PathBuf {
        self.spool.join(".ferry/active")
    }
    pub fn failed(&self) -> PathBuf {
        self.spool.join(".ferry/failed")
    }
    /// `failed/NAME.error.json`, parsed, once it exists (waits at most `limit`).
    pub fn error_report(&self, name: &str, limit: Duration) -> Option<serde_json::Value> {
        let p = self.failed().join(format!("{name}.error.json"));
        wait_until(limit, || p.exists());
        let text = std::fs::read_to_string(&p).ok()?;
        eprintln!("--- failed/{name}.error.json\n{text}");
        serde_json::from_str(&text).ok()
    }
    pub fn done(&self) -> PathBuf {
        self.spool.join(".ferry/done")
    }
    /// Whether `name` reached `done/` within `limit`.
    pub fn wait_done(&self, name: &str, limit: Duration) -> bool {
        let p = self.done().join(name);
        wait_until(limit, || p.exists())
    }
    pub fn metric(&self, needle: &str) -> u64 {
        http_get(self.metrics_port, "/metrics")
            .map(|(_, body)| {
                body.lines()
                    .filter(|l| l.starts_with(needle))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64
            })
            .unwrap_or(0)
    }
}

/// Drops images; returns (name, crc) pairs.
pub fn drop_images(
    spool: &Path,
    prefix: &str,
    n: usize,
    size: u64,
    seed: u64,
) -> Vec<(String, u32)> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i}.qcow2");
            let crc = drop_image(spool, &name, size, seed + i as u64);
            (name, crc)
        })
        .collect()
}

/// Every image reached done/ within `limit`. Stops early, printing the reports,
/// once anything lands in failed/ (it never comes back by itself).
pub fn all_done(site: &Site, images: &[(String, u32)], limit: Duration) -> bool {
    let failed_dir = site.spool.join(".ferry/failed");
    let mut failed = Vec::new();
    wait_until(limit, || {
        failed = list(&failed_dir)
            .into_iter()
            .filter(|n| n.ends_with(".error.json"))
            .collect();
        !failed.is_empty() || images.iter().all(|(n, _)| site.done().join(n).exists())
    });
    for n in &failed {
        let report = std::fs::read_to_string(failed_dir.join(n)).unwrap_or_default();
        eprintln!("--- failed/{n}\n{report}");
    }
    failed.is_empty() && images.iter().all(|(n, _)| site.done().join(n).exists())
}

pub fn assert_everywhere(
    site: &Site,
    s3: &S3,
    bucket: &str,
    prefix: &str,
    images: &[(String, u32)],
) {
    let store = s3.store(bucket);
    for (n, crc) in images {
        let src = site.done().join(n);
        assert_eq!(file_crc(&src), *crc, "{n} changed in the spool");
        assert!(
            s3_object_equals(&store, &format!("{prefix}/{n}"), &src),
            "{n} differs on S3"
        );
        let m: serde_json::Value = serde_json::from_slice(
            &s3_get(&store, &format!("{prefix}/{n}.manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(m["crc32c"], format!("{crc:08x}"), "{n} manifest");
    }
    assert!(
        list(&site.spool.join(".ferry/failed")).is_empty(),
        "failed/: {:?}",
        list(&site.spool.join(".ferry/failed"))
    );
}

/// Mounts a tmpfs of `size` on `dir` for the rest of the test.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var_os("FERRY_REQUIRE_S3").is_none(),
                "tests/run.sh runs as root and must be able to mount a tmpfs"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
        }
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
