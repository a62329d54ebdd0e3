//! `ferry daemon` driven as a service runs: the real binary watching a temporary
//! spool, shipping to `file://` directories and to SeaweedFS on loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    spool: PathBuf,
    config: PathBuf,
}

impl Setup {
    /// Two file:// destinations, plus `extra` TOML.
    fn new(extra: &str) -> Setup {
        Setup::with(&format!(
            "[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n\n[destinations.frankfurt]\nurl = \"file://ROOT/frankfurt/\"\n{extra}"
        ))
    }

    /// Only the given TOML after the daemon table (ROOT stands for the test root).
    fn with(tables: &str) -> Setup {
        let dir = tmpdir();
        let root = dir.path().to_path_buf();
        let spool = root.join("spool");
        let config = write(
            &root.join("ferry.toml"),
            &format!(
                r#"
spool_dir = "{root}/spool"
state_dir = "{root}/state"
metrics_addr = "127.0.0.1:0"

[daemon]
settle_secs = 2
rescan_secs = 5
max_jobs = 3
shutdown_timeout_secs = 20

[policy]
refuse = false
require_license_attestation = false

{tables}
"#,
                root = root.display(),
                tables = tables.replace("ROOT", &root.display().to_string())
            ),
        );
        std::fs::create_dir_all(&spool).unwrap();
        Setup {
            _dir: dir,
            root,
            spool,
            config,
        }
    }

    fn done(&self) -> PathBuf {
        self.spool.join(".ferry/done")
    }

    fn daemon(&self) -> Daemon {
        Daemon::start(&self.config, &self.root.join("daemon.log"))
    }
}

fn images_in(dir: &Path) -> Vec<String> {
    list(dir)
        .into_iter()
        .filter(|n| !n.ends_with(".manifest.json") && !n.starts_with('.'))
        .collect()
}

/// Acceptance 1: ten images of 1 MiB..512 MiB dropped at once with write-then-rename
/// arrive byte-identical at two file:// and one s3:// destination, each exactly once.
#[test]
fn ten_images_arrive_everywhere_exactly_once() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("ten");
    let setup = Setup::new(&s3_dest(
        "ashburn",
        &s3.buckets[1],
        &prefix,
        &s3.endpoint,
        "",
    ));
    let mut d = setup.daemon();
    let staging = setup.root.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("img-{i:02}.qcow2")).collect();
    let mut crcs = Vec::new();
    // Write all ten first, then rename them into the spool at once.
    for (i, n) in names.iter().enumerate() {
        let size = (1u64 << 20) << i; // 1 MiB .. 512 MiB
        crcs.push(random_file(&staging.join(n), size, 100 + i as u64));
    }
    for n in &names {
        std::fs::rename(staging.join(n), setup.spool.join(n)).unwrap();
    }
    let all_done = wait_until(Duration::from_secs(300), || {
        images_in(&setup.done()).len() == names.len()
    });
    assert!(
        all_done,
        "not every image reached done/: {:?}",
        list(&setup.done())
    );
    assert!(d.running());
    assert_eq!(
        images_in(&setup.spool),
        Vec::<String>::new(),
        "spool not empty"
    );
    let store = s3.store(&s3.buckets[1]);
    for (n, crc) in names.iter().zip(&crcs) {
        let src = setup.done().join(n);
        for region in ["phoenix", "frankfurt"] {
            let dir = setup.root.join(region);
            assert!(same_bytes(&src, &dir.join(n)), "{region}/{n}");
            let m = manifest(&dir.join(format!("{n}.manifest.json")));
            assert_eq!(m["crc32c"], format!("{crc:08x}"), "{region}/{n}");
        }
        assert!(
            s3_object_equals(&store, &format!("{prefix}/{n}"), &src),
            "s3 {n}"
        );
    }
    for region in ["phoenix", "frankfurt"] {
        assert_eq!(images_in(&setup.root.join(region)), names, "{region}");
    }
    let log = d.log_text();
    for n in &names {
        assert_eq!(
            log.matches(&format!("claimed \"{n}\"")).count(),
            1,
            "{n} claimed more than once"
        );
    }
}

/// Acceptance 2: a file written slowly in place is not taken before it has been
/// still for settle_secs, and then is taken once.
#[test]
fn a_slowly_written_file_waits_for_settle() {
    let setup = Setup::new("");
    let d = setup.daemon();
    let path = setup.spool.join("slow.vmdk");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![7u8; 1 << 20];
    for _ in 0..30 {
        use std::io::Write;
        f.write_all(&block).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(path.exists(), "taken while still being written");
    }
    drop(f);
    let last_write = Instant::now();
    // settle_secs = 2: it must still be there for most of that time.
    while last_write.elapsed() < Duration::from_millis(1500) {
        assert!(
            path.exists(),
            "taken {:?} after the last write",
            last_write.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let taken = wait_until(Duration::from_secs(20), || {
        setup.done().join("slow.vmdk").exists()
    });
    assert!(taken, "never taken");
    assert!(last_write.elapsed() >= Duration::from_secs(2));
    assert_eq!(d.log_text().matches("claimed \"slow.vmdk\"").count(), 1);
    assert_eq!(
        std::fs::metadata(setup.root.join("phoenix/slow.vmdk"))
            .unwrap()
            .len(),
        30 << 20
    );
}

/// Acceptance 3: kill -9 in the middle of a 2 GiB upload to SeaweedFS; after a
/// restart the upload completes byte-identical, and fewer than half of the parts
/// are sent after the restart.
#[test]
fn kill_9_mid_upload_resumes_without_resending() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("kill9");
    // Only the S3 destination, so the journal holds its parts alone.
    let setup = Setup::with(&format!(
        "[transfer]\npart_size = \"32MiB\"\n{}",
        s3_dest(
            "ashburn",
            &s3.buckets[2],
            &prefix,
            &s3.endpoint,
            "parallel_parts = 4"
        )
    ));
    let staged = setup.root.join("big.qcow2");
    random_file(&staged, 2 << 30, 7);
    let mut d = setup.daemon();
    std::fs::rename(&staged, setup.spool.join("big.qcow2")).unwrap();

    // Kill once the journal holds more than 60% of the 64 parts.
    let record = setup.root.join("state/jobs/big.qcow2.json");
    let parts_in_record = || -> usize {
        std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v["destinations"]["ashburn"]["parts"]
                    .as_array()
                    .map(|a| a.len())
            })
            .unwrap_or(0)
    };
    let far_enough = wait_until(Duration::from_secs(120), || parts_in_record() > 38);
    assert!(far_enough, "upload never got past 60%");
    d.signal(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(10)).is_some());
    let journaled = parts_in_record();
    assert!(journaled < 64, "finished before the kill");
    assert!(setup.spool.join(".ferry/active/big.qcow2").exists());
    drop(d);

    let d2 = setup.daemon();
    let finished = wait_until(Duration::from_secs(180), || {
        setup.done().join("big.qcow2").exists()
    });
    assert!(finished, "not finished after restart");
    let log = d2.log_text();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming upload of big.qcow2"))
        .expect("a resume line");
    let already: usize = resumed
        .split(": ")
        .last()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("{resumed}");
    assert_eq!(already, journaled, "the restart did not use the journal");
    assert!(
        64 - already < 32,
        "{} parts sent after the restart",
        64 - already
    );
    let store = s3.store(&s3.buckets[2]);
    assert!(s3_object_equals(
        &store,
        &format!("{prefix}/big.qcow2"),
        &setup.done().join("big.qcow2")
    ));
    assert_eq!(
        s3_part_count(&store, &format!("{prefix}/big.qcow2")),
        Some(64)
    );
}

/// Acceptance 4: SIGTERM during uploads exits 0 within shutdown_timeout_secs; a
/// restart finishes every image.
#[test]
fn sigterm_exits_cleanly_and_a_restart_finishes() {
    let setup = Setup::with(
        "[transfer]\nparallel_parts = 1\npart_size = \"8MiB\"\n\n[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n\n[destinations.frankfurt]\nurl = \"file://ROOT/frankfurt/\"\n",
    );
    let mut d = setup.daemon();
    let mut crcs = Vec::new();
    for i in 0..3 {
        crcs.push(drop_image(
            &setup.spool,
            &format!("t{i}.qcow2"),
            256 << 20,
            200 + i,
        ));
    }
    let busy = wait_until(Duration::from_secs(30), || {
        !list(&setup.spool.join(".ferry/active")).is_empty()
    });
    assert!(busy);
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d
        .wait_exit(Duration::from_secs(25))
        .expect("exited within the timeout");
    assert_eq!(status.code(), Some(0), "exit status");
    assert!(t.elapsed() < Duration::from_secs(21));
    drop(d);
    let _d2 = setup.daemon();
    let all = wait_until(Duration::from_secs(120), || {
        images_in(&setup.done()).len() == 3
    });
    assert!(all, "done: {:?}", list(&setup.done()));
    for i in 0..3 {
        let n = format!("t{i}.qcow2");
        for region in ["phoenix", "frankfurt"] {
            assert!(same_bytes(
                &setup.done().join(&n),
                &setup.root.join(region).join(&n)
            ));
        }
    }
}

/// Acceptance 5: a symlink to a file outside the spool, a FIFO and a directory are
/// never uploaded and never stop the daemon.
#[test]
fn symlinks_fifos_and_directories_are_left_alone() {
    let setup = Setup::new("");
    let outside = setup.root.join("secret.img");
    random_file(&outside, 1 << 20, 9);
    std::os::unix::fs::symlink(&outside, setup.spool.join("link.img")).unwrap();
    let made = Command::new("mkfifo")
        .arg(setup.spool.join("pipe.img"))
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::create_dir(setup.spool.join("dir.img")).unwrap();
    std::fs::write(setup.spool.join("link.img.ready"), b"").unwrap();
    let mut d = setup.daemon();
    // A real image afterwards proves the daemon kept working.
    drop_image(&setup.spool, "real.img", 1 << 20, 10);
    assert!(wait_until(Duration::from_secs(20), || setup
        .done()
        .join("real.img")
        .exists()));
    // Every refusal is logged once the spool was scanned with them in it.
    let logged = wait_until(Duration::from_secs(20), || {
        let log = d.log_text();
        ["symbolic link", "FIFO", "directory"]
            .iter()
            .all(|k| log.contains(k))
    });
    assert!(logged, "not every refusal was logged");
    assert!(d.running());
    for n in ["link.img", "pipe.img", "dir.img"] {
        assert!(
            std::fs::symlink_metadata(setup.spool.join(n)).is_ok(),
            "{n} was moved"
        );
        assert!(
            !setup.root.join("phoenix").join(n).exists(),
            "{n} was uploaded"
        );
    }
    assert_eq!(
        images_in(&setup.root.join("phoenix")),
        vec!["real.img".to_string()]
    );
    let log = d.log_text();
    for kind in ["symbolic link", "FIFO", "directory"] {
        assert!(log.contains(kind), "no refusal logged for the {kind}");
    }
}

/// SIGHUP reloads the config: a destination added takes the next image and a new
/// memory_limit shows on /metrics at once; a config with a typo is refused, named
/// in the log, and the running config keeps working.
#[test]
fn sighup_reloads_the_config_and_refuses_a_broken_one() {
    let setup = Setup::with(
        "[transfer]\nmemory_limit = \"64MiB\"\n\n[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n",
    );
    let d = setup.daemon();
    let mut port = 0u16;
    assert!(wait_until(Duration::from_secs(20), || {
        let log = d.log_text();
        let Some(rest) = log.split("serving http://127.0.0.1:").nth(1) else {
            return false;
        };
        port = rest.split('/').next().unwrap().parse().unwrap();
        true
    }));
    let limit = || {
        http_get(port, "/metrics").and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with("ferry_buffer_bytes_limit "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        })
    };
    let arrives =
        |name: &str| wait_until(Duration::from_secs(30), || setup.done().join(name).exists());
    drop_image(&setup.spool, "before.img", 1 << 20, 21);
    assert!(arrives("before.img"));
    assert_eq!(limit(), Some((64u64 << 20) as f64));

    let original = std::fs::read_to_string(&setup.config).unwrap();
    let grown = original.replace("\"64MiB\"", "\"96MiB\"")
        + &format!(
            "\n[destinations.frankfurt]\nurl = \"file://{}/frankfurt/\"\n",
            setup.root.display()
        );
    std::fs::write(&setup.config, &grown).unwrap();
    d.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(20), || d
        .log_text()
        .contains("configuration reloaded")));
    assert!(
        wait_until(Duration::from_secs(20), || limit()
            == Some((96u64 << 20) as f64)),
        "memory_limit not applied: {:?}",
        limit()
    );
    drop_image(&setup.spool, "after.img", 1 << 20, 22);
    assert!(arrives("after.img"));
    assert_eq!(images_in(&setup.root.join("frankfurt")), vec!["after.img"]);
    assert_eq!(
        images_in(&setup.root.join("phoenix")),
        vec!["after.img", "before.img"]
    );

    std::fs::write(&setup.config, grown + "\n[daemon2]\nsettle_secs = 1\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(20), || d
            .log_text()
            .contains("reload refused")),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    let refusal = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(
        refusal.contains("daemon2"),
        "the typo is not named: {refusal}"
    );
    drop_image(&setup.spool, "third.img", 1 << 20, 23);
    assert!(arrives("third.img"), "the running config stopped working");
    assert_eq!(
        images_in(&setup.root.join("frankfurt")),
        vec!["after.img", "third.img"]
    );
    assert_eq!(limit(), Some((96u64 << 20) as f64));
}

/// `/status` as JSON.
fn status_of(port: u16) -> serde_json::Value {
    http_get(port, "/status")
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Issue 13, item 7: one word for one thing. A refusal is "refused" in the
/// log, in `X.error.json`, on `/status` and in `ferry_jobs_total`; when the
/// refused file is put back and ships, its stale `X.error.json` is removed and
/// `/status` marks its error resolved. Waiting entries say why they wait
/// (settling, a job slot), and a job whose reads wait for part-buffer memory
/// says so.
#[test]
fn words_agree_and_status_says_why_files_wait() {
    const MIB: u64 = 1 << 20;
    let Some(s3) = s3() else { return };
    let relay = Relay::start(&s3);
    relay.set(r#"{"part_bytes_per_sec": 2000000}"#);
    let prefix = unique_prefix("words");
    let dir = tmpdir();
    let root = dir.path();
    let spool = root.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let port = free_port();
    let cfg = write(
        &root.join("ferry.toml"),
        &format!(
            "spool_dir = \"{r}/spool\"\nstate_dir = \"{r}/state\"\nmetrics_addr = \"127.0.0.1:{port}\"\n\
             [daemon]\nsettle_secs = 60\nmax_jobs = 1\n\
             [policy]\nrefuse = true\nrequire_license_attestation = true\n\
             [transfer]\npart_size = \"8MiB\"\nmemory_limit = \"16MiB\"\nparallel_parts = 1\n{}",
            s3_dest("slow", &s3.buckets[0], &prefix, &relay.endpoint(), ""),
            r = root.display()
        ),
    );
    let sidecar = |name: &str| {
        write(
            &spool.join(format!("{name}.meta.json")),
            r#"{"license": {"model": "BYOL", "attested_by": "Jane Roe", "attested_at": "2026-11-27T09:30:00Z", "statement": "It complies."}}"#,
        );
    };
    // Images OCI would take but for the attestation, made beside the spool
    // and renamed into it.
    let image = |name: &str, size: u64| {
        boot_qcow2(root, name, size as usize);
        std::fs::rename(root.join(name), spool.join(name)).unwrap();
    };
    let d = Daemon::start(&cfg, &root.join("daemon.log"));
    let failed = spool.join(".ferry/failed");
    let done = spool.join(".ferry/done");
    // Renames are seen once the spool is watched (settle_secs is long).
    assert!(wait_until(Duration::from_secs(20), || d
        .log_text()
        .contains(" watching ")));

    // Refused for want of an attestation: "refused" everywhere.
    image("first.img", MIB);
    let report = failed.join("first.img.error.json");
    assert!(
        wait_until(Duration::from_secs(30), || report.exists()),
        "not refused; spool: {:?}, failed/: {:?}, status: {}",
        list(&spool),
        list(&failed),
        status_of(port)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["outcome"], "refused", "{r}");
    assert_eq!(r["format_version"], 2, "{r}");
    assert!(wait_until(Duration::from_secs(5), || d
        .log_text()
        .contains("\"first.img\" refused: no licence attestation")));
    assert!(!d.log_text().contains("\"first.img\" failed"));
    let metrics = http_get(port, "/metrics").unwrap().1;
    assert!(
        metrics.contains("ferry_jobs_total{outcome=\"refused\"} 1"),
        "{metrics}"
    );
    let st = status_of(port);
    let err = &st["last_errors"][0];
    assert_eq!(err["file"], "first.img", "{st}");
    assert_eq!(err["outcome"], "refused", "{st}");
    assert!(err["resolved_at"].is_null(), "{st}");

    // A slow job holds the only slot; its reads wait for memory.
    sidecar("big.img");
    image("big.img", 30 * MIB);
    let mut memory_seen = false;
    assert!(wait_until(Duration::from_secs(30), || {
        memory_seen |= status_of(port)["jobs"][0]["waiting_for"]
            .as_str()
            .is_some_and(|w| w.starts_with("memory"));
        memory_seen
    }));
    sidecar("second.img");
    image("second.img", MIB);
    random_file(&spool.join("in-place.img"), MIB, 74);
    let why = |st: &serde_json::Value, file: &str| -> String {
        st["waiting"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["file"] == file)
            .and_then(|w| w["why"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let mut last = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            last = status_of(port);
            why(&last, "second.img").starts_with("waiting for a job slot")
                && why(&last, "in-place.img").starts_with("settling")
        }),
        "{last}"
    );
    assert!(
        why(&last, "in-place.img").contains("in-place.img.ready"),
        "{last}"
    );

    // The refused file put back with its sidecar ships; its old report goes.
    sidecar("first.img");
    std::fs::rename(failed.join("first.img"), spool.join("first.img")).unwrap();
    assert!(wait_until(Duration::from_secs(120), || done
        .join("first.img")
        .exists()));
    // The report goes right after the move to done/ (the log says so).
    assert!(
        wait_until(Duration::from_secs(10), || !report.exists()),
        "the stale error.json stayed in failed/"
    );
    assert!(
        d.log_text()
            .contains("removed the error report of its earlier attempt")
    );
    let st = status_of(port);
    let resolved = st["last_errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["file"] == "first.img")
        .all(|e| e["resolved_at"].is_string());
    assert!(resolved, "{st}");
    drop(d);
}
