//! A good neighbour on a busy host: bandwidth limits measured on the wire,
//! a timetable that switches while a push runs, the page cache an image
//! leaves behind (`fincore`), and the idle I/O class.
//!
//! Design choice: the rate is measured where the bytes land, not from
//! ferry's own counters: the file destinations' blocks written (sampled
//! every 100 ms) and the part bodies the fault relay took from ferry on
//! their way to SeaweedFS (logged with the time their last byte arrived).
//! The rate is the least-squares slope of those bytes against time over the
//! middle of the transfer (20% to 80% of the bytes), so the first and last
//! parts, which a limit cannot space, do not count.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

/// Bytes written so far into the files under `dirs` (blocks allocated: the
/// staging files are sparse until their parts arrive).
fn written(dirs: &[PathBuf]) -> u64 {
    dirs.iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Part bodies the relay took from ferry: (unix time, bytes).
fn relayed(relay: &Relay) -> Vec<(f64, u64)> {
    relay
        .log()
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("part ")?.split(' ');
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Samples (unix time, bytes on the wire) until `child` exits (at most `limit`).
fn sample(
    child: &mut Child,
    dirs: &[PathBuf],
    relay: Option<&Relay>,
    limit: Duration,
) -> Vec<(f64, u64)> {
    let deadline = Instant::now() + limit;
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        let t = unix_now();
        let files = written(dirs);
        samples.push((t, files));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        child.try_wait().unwrap().is_some(),
        "the push did not end within {limit:?}"
    );
    // The relay's parts, each counted from the moment its last byte arrived.
    let parts = relay.map(relayed).unwrap_or_default();
    samples
        .into_iter()
        .map(|(t, files)| {
            let s3: u64 = parts
                .iter()
                .filter(|(at, _)| *at <= t)
                .map(|(_, n)| n)
                .sum();
            (t, files + s3)
        })
        .collect()
}

/// The least-squares slope (bytes per second) of the samples whose bytes
/// lie between `from` and `to` of the last sample's.
fn slope(samples: &[(f64, u64)], from: f64, to: f64) -> f64 {
    let total = samples.last().unwrap().1 as f64;
    let mid: Vec<(f64, f64)> = samples
        .iter()
        .map(|&(t, b)| (t, b as f64))
        .filter(|&(_, b)| b >= total * from && b <= total * to)
        .collect();
    slope_of(&mid)
}

fn slope_of(points: &[(f64, f64)]) -> f64 {
    assert!(points.len() >= 10, "too few samples: {points:?}");
    let n = points.len() as f64;
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mb = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - mb)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mt) * (p.0 - mt)).sum();
    cov / var
}

fn push_config(root: &Path, tables: &str, daemon: &str) -> PathBuf {
    write(
        &root.join("ferry.toml"),
        &format!(
            "spool_dir = \"{r}/spool\"\nstate_dir = \"{r}/state\"\n[daemon]\n{daemon}\n[policy]\nrefuse = false\nrequire_license_attestation = false\n[transfer]\npart_size = \"5MiB\"\n{tables}",
            r = root.display()
        ),
    )
}

const MIB: f64 = 1048576.0;

/// Issue case 1: a 6 MiB/s limit on all destinations together, two
/// directories and SeaweedFS through the relay: the wire rate over the middle
/// of the push is within 10% of it.
#[test]
fn a_global_limit_holds_the_total_wire_rate() {
    let Some(s3) = s3() else { return };
    let relay = Relay::start(&s3);
    relay.set(r#"{"log_parts": true}"#);
    let dir = tmpdir();
    let root = dir.path();
    let image = root.join("web.raw");
    let size: u64 = 40 << 20;
    random_file(&image, size, 7);
    let prefix = unique_prefix("bwlimit");
    let (a, b) = (root.join("a"), root.join("b"));
    let cfg = push_config(
        root,
        &format!(
            "bandwidth_limit = \"6MiB\"\n[destinations.a]\nurl = \"file://{}/\"\n[destinations.b]\nurl = \"file://{}/\"\n{}",
            a.display(),
            b.display(),
            s3_dest("s3", &s3.buckets[0], &prefix, &relay.endpoint(), "")
        ),
        "",
    );
    let mut cmd = ferry();
    cmd.arg("push").arg(&image).arg("--config").arg(&cfg);
    s3.env(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let samples = sample(
        &mut child,
        &[a.clone(), b.clone()],
        Some(&relay),
        Duration::from_secs(120),
    );
    let took = started.elapsed();
    assert!(child.wait().unwrap().success(), "the push failed");
    let total = samples.last().unwrap().1;
    assert!(
        total >= 3 * size,
        "{total} bytes seen on the wire, {} sent",
        3 * size
    );
    let rate = slope(&samples, 0.2, 0.8);
    eprintln!(
        "limit 6 MiB/s: measured {:.2} MiB/s over the middle; {:.1} s for {} MiB on the wire",
        rate / MIB,
        took.as_secs_f64(),
        total >> 20
    );
    assert!(
        (5.4 * MIB..=6.6 * MIB).contains(&rate),
        "the wire rate {:.2} MiB/s is not within 10% of the 6 MiB/s limit",
        rate / MIB
    );
    let store = s3.store(&s3.buckets[0]);
    assert!(s3_object_equals(
        &store,
        &format!("{prefix}/web.raw"),
        &image
    ));
    assert!(same_bytes(&a.join("web.raw"), &image));
    assert!(same_bytes(&b.join("web.raw"), &image));
}

/// Issue case 2: `--bwlimit` with a timetable that goes from 4 MiB/s to
/// 16 MiB/s while the push runs: the rate follows, and a destination's own
/// limit still holds within it.
#[test]
fn a_timetable_switches_the_rate_while_a_push_runs() {
    let dir = tmpdir();
    let root = dir.path();
    let image = root.join("db.raw");
    let size: u64 = 240 << 20;
    random_file(&image, size, 8);
    let (a, b) = (root.join("a"), root.join("b"));
    // b's own limit, 2 MiB/s, binds it under either rate of the timetable.
    let cfg = push_config(
        root,
        &format!(
            "[destinations.a]\nurl = \"file://{}/\"\n[destinations.b]\nurl = \"file://{}/\"\nbandwidth_limit = \"2MiB\"\n",
            a.display(),
            b.display()
        ),
        "",
    );
    let now = chrono::Local::now();
    let at = |secs: i64| {
        (now + chrono::Duration::seconds(secs))
            .format("%H:%M:%S")
            .to_string()
    };
    let (slow_from, fast_from) = (unix_now() + 1.0, unix_now() + 13.0);
    let timetable = format!("{},4MiB {},16MiB", at(1), at(13));
    let mut child = ferry()
        .arg("push")
        .arg(&image)
        .arg("--config")
        .arg(&cfg)
        .arg("--to")
        .arg("a")
        .arg("--to")
        .arg("b")
        .arg("--no-import")
        .arg("--bwlimit")
        .arg(&timetable)
        .spawn()
        .unwrap();
    // Both destinations' bytes and b's alone, sampled together. b, at
    // 2 MiB/s, is still sending when the test has seen enough: it is stopped.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut samples = Vec::new();
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        samples.push((
            unix_now(),
            written(std::slice::from_ref(&a)) as f64,
            written(std::slice::from_ref(&b)) as f64,
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let window = |from: f64, to: f64, which: usize| -> f64 {
        let pts: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.0 >= from && s.0 <= to)
            .map(|s| (s.0, if which == 0 { s.1 + s.2 } else { s.2 }))
            .collect();
        slope_of(&pts)
    };
    // The switch times are whole seconds: the switch may come up to a second
    // before `fast_from`.
    let slow = window(slow_from + 2.0, fast_from - 1.0, 0);
    let fast = window(fast_from + 2.0, fast_from + 12.0, 0);
    let b_rate = window(slow_from + 2.0, fast_from + 12.0, 1);
    eprintln!(
        "timetable {timetable:?}: {:.2} MiB/s, then {:.2} MiB/s; b alone {:.2} MiB/s",
        slow / MIB,
        fast / MIB,
        b_rate / MIB
    );
    assert!(
        (3.4 * MIB..=4.6 * MIB).contains(&slow),
        "4 MiB/s held as {:.2} MiB/s",
        slow / MIB
    );
    assert!(
        (13.6 * MIB..=18.4 * MIB).contains(&fast),
        "16 MiB/s held as {:.2} MiB/s",
        fast / MIB
    );
    // A limit is a ceiling: b shares the 4 MiB/s with a at first.
    assert!(
        (1.0 * MIB..=2.2 * MIB).contains(&b_rate),
        "b's own 2 MiB/s: {:.2} MiB/s",
        b_rate / MIB
    );
}

/// Resident bytes of `file` in the page cache, as util-linux's fincore says.
fn resident(file: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .expect("fincore (util-linux) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Issue case 3: after a 512 MiB push the page cache holds less than 10% of
/// the image; with `daemon.keep_cache = true`, most of it.
#[test]
fn a_push_releases_the_image_from_the_page_cache() {
    let dir = tmpdir();
    let root = dir.path();
    let image = root.join("big.raw");
    let size: u64 = 512 << 20;
    random_file(&image, size, 9);
    // Freshly written, as an export is: the image is all in the cache, dirty.
    let before = resident(&image);
    let mut figures = vec![format!("before: {} MiB resident", before >> 20)];
    for (keep, reader) in [(false, "pread"), (false, "mmap"), (true, "pread")] {
        let out_dir = root.join(format!("out-{keep}-{reader}"));
        let cfg = push_config(
            root,
            &format!(
                "reader = \"{reader}\"\n[destinations.a]\nurl = \"file://{}/\"\n",
                out_dir.display()
            ),
            &format!("keep_cache = {keep}"),
        );
        // Read it into the cache first, whatever the last round left.
        file_crc(&image);
        let out = run(ferry().arg("push").arg(&image).arg("--config").arg(&cfg));
        assert!(out.status.success());
        // Before anything else reads the image.
        let left = resident(&image);
        assert!(same_bytes(&out_dir.join("big.raw"), &image));
        figures.push(format!(
            "keep_cache = {keep}, reader = {reader}: {} MiB resident ({:.1}%)",
            left >> 20,
            left as f64 * 100.0 / size as f64
        ));
        if keep {
            assert!(left > size / 2, "{figures:?}");
        } else {
            assert!(left < size / 10, "{figures:?}");
        }
    }
    eprintln!("{}", figures.join("\n"));
}

/// `daemon.io_priority = "idle"`: every thread of the running daemon is in
/// the idle I/O class, as `ionice` reads it.
#[test]
fn io_priority_idle_puts_every_thread_of_the_daemon_in_the_idle_class() {
    let site = Site::with_daemon(
        "io_priority = \"idle\"",
        "[destinations.a]\nurl = \"file://ROOT/a/\"\n",
    );
    let d = site.daemon();
    assert!(wait_until(Duration::from_secs(20), || http_get(
        site.metrics_port,
        "/healthz"
    )
    .is_some()));
    let tasks: Vec<String> = list(&PathBuf::from(format!("/proc/{}/task", d.child.id())));
    assert!(tasks.len() > 2, "{tasks:?}");
    for tid in &tasks {
        let out = Command::new("ionice").args(["-p", tid]).output().unwrap();
        let class = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(class, "idle", "thread {tid}: {class}");
    }
    assert!(d.log_text().contains("idle I/O class"), "{}", d.log_text());
}

/// SIGHUP changes the limits at once: the gauges and `/status` show the new
/// ones, and a job in flight, held to 1 MiB/s, finishes soon after its
/// limit is lifted.
#[test]
fn sighup_changes_the_limits_of_a_running_daemon() {
    let tables = |all: &str, a: &str| {
        format!(
            "[transfer]\npart_size = \"5MiB\"\nbandwidth_limit = \"{all}\"\n[destinations.a]\nurl = \"file://ROOT/a/\"\nbandwidth_limit = \"{a}\"\n[destinations.b]\nurl = \"file://ROOT/b/\"\n"
        )
    };
    let site = Site::new(&tables("1MiB", "512KiB"));
    let d = site.daemon();
    let gauge = |dest: &str| {
        site.metric(&format!(
            "ferry_bandwidth_limit_bytes{{destination=\"{dest}\"}}"
        ))
    };
    assert!(wait_until(Duration::from_secs(20), || gauge("(all)") == 1 << 20));
    assert_eq!(gauge("a"), 512 << 10);
    assert_eq!(gauge("b"), 0, "no limit of its own shows as 0");
    drop_image(&site.spool, "vm.raw", 40 << 20, 3);
    // Two parts sent: the limit has held the job for a few seconds.
    assert!(wait_until(Duration::from_secs(30), || site
        .metric("ferry_uploaded_bytes_total{")
        >= 10 << 20));
    // 40 MiB to two destinations at 1 MiB/s would take 80 s.
    assert!(!site.done().join("vm.raw").exists());
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("bandwidth_limit = \"1MiB\"", "bandwidth_limit = \"off\"")
        .replace("bandwidth_limit = \"512KiB\"", "bandwidth_limit = \"8MiB\"");
    std::fs::write(&site.config, text).unwrap();
    let lifted = Instant::now();
    d.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || gauge("a") == 8 << 20));
    assert_eq!(gauge("(all)"), 0);
    let (_, status) = http_get(site.metrics_port, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status["bandwidth_limits"]["a"]["schedule"], "8MiB",
        "{status}"
    );
    assert_eq!(
        status["bandwidth_limits"]["(all)"]["bytes_per_sec"],
        serde_json::Value::Null
    );
    assert!(
        site.wait_done("vm.raw", Duration::from_secs(20)),
        "the job in flight kept the old limit"
    );
    eprintln!(
        "done {:.1} s after the limit was lifted",
        lifted.elapsed().as_secs_f64()
    );
}

/// A destination held back by its own limit falls behind and reads its own
/// parts: from the page cache, which the reader then leaves to it, not from
/// the disk; the job's end releases the image all the same.
#[test]
fn a_destination_that_falls_behind_reads_from_the_cache_not_the_disk() {
    let dir = tmpdir();
    let root = dir.path();
    let image = root.join("lag.raw");
    let size: u64 = 48 << 20;
    random_file(&image, size, 10);
    let (a, b) = (root.join("a"), root.join("b"));
    let cfg = push_config(
        root,
        &format!(
            "memory_limit = \"20MiB\"\n[destinations.a]\nurl = \"file://{}/\"\n[destinations.b]\nurl = \"file://{}/\"\nbandwidth_limit = \"8MiB\"\n",
            a.display(),
            b.display()
        ),
        "",
    );
    file_crc(&image); // all of it in the page cache
    // %I: blocks read from the disk by the push (getrusage's ru_inblock).
    let out = run(Command::new("/usr/bin/time")
        .args(["-f", "inblocks %I"])
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .arg("push")
        .arg(&image)
        .arg("--config")
        .arg(&cfg));
    assert!(out.status.success());
    let left = resident(&image);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("falls behind the others"),
        "b was never detached: the test shows nothing\n{err}"
    );
    let read: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("inblocks "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .expect("/usr/bin/time's line")
        * 512;
    eprintln!(
        "read from disk: {} MiB of a {} MiB image; resident after: {} MiB",
        read >> 20,
        size >> 20,
        left >> 20
    );
    assert!(read < size / 4, "{read} bytes read from the disk");
    assert!(
        left < size / 10,
        "{left} bytes of the image left in the cache"
    );
    assert!(same_bytes(&b.join("lag.raw"), &image));
}

/// A destination detached while every one of its slots waits (here, for its
/// own bandwidth) drops its queued parts at once, so the others stop waiting
/// for that memory. b, held to 256 KiB/s, sends its first part at once and
/// its second only 20 s later; a must have its whole copy before then. Seen
/// failing before the fix: b's worker took in its detaching only when a slot
/// freed, and a finished only after b had written its second part.
#[test]
fn a_detached_destination_frees_its_queue_while_its_parts_wait() {
    let dir = tmpdir();
    let root = dir.path();
    let image = root.join("held.raw");
    random_file(&image, 48 << 20, 11);
    let (a, b) = (root.join("a"), root.join("b"));
    let cfg = push_config(
        root,
        &format!(
            "memory_limit = \"20MiB\"\n[destinations.a]\nurl = \"file://{}/\"\n[destinations.b]\nurl = \"file://{}/\"\nbandwidth_limit = \"256KiB\"\n",
            a.display(),
            b.display()
        ),
        "",
    );
    let log = root.join("push.log");
    let mut push = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("push")
        .arg(&image)
        .arg("--config")
        .arg(&cfg)
        .env("FERRY_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let manifest = a.join("held.raw.manifest.json");
    let done = wait_until(Duration::from_secs(60), || manifest.exists());
    let b_written = written(std::slice::from_ref(&b));
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(push.id() as i32, libc::SIGINT) };
    push.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(done, "a never verified\n{err}");
    assert!(
        err.contains("b falls behind the others"),
        "b was never detached: the test shows nothing\n{err}"
    );
    assert!(same_bytes(&a.join("held.raw"), &image));
    assert!(
        b_written < 10 << 20,
        "b had written {b_written} bytes (its second part) before a was whole: a waited for b's queue\n{err}"
    );
}
