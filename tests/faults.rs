//! Nothing lost, nothing corrupted, nobody let in: the daemon against injected
//! faults (a relay between ferry and the real SeaweedFS), crashes at every phase,
//! a hostile spool, secrets, and a full state directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use common::*;

/// 1: every 10th part upload answered 503 SlowDown.
#[test]
fn part_503s_are_retried_and_every_object_verifies() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("slowdown");
    let relay = Relay::start(&s3);
    relay.set(r#"{"part_error_every": 10, "error_status": 503}"#);
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"5MiB\"\nretry_base_ms = 50\n{}",
        s3_dest("ashburn", &s3.buckets[0], &prefix, &relay.endpoint(), "")
    ));
    let _d = site.daemon();
    let images = drop_images(&site.spool, "slow", 3, 60 << 20, 300);
    assert!(
        all_done(&site, &images, Duration::from_secs(180)),
        "not all done"
    );
    assert_everywhere(&site, &s3, &s3.buckets[0], &prefix, &images);
    let injected = relay.injected("503");
    assert!(injected >= 3, "only {injected} 503s injected");
    let retries =
        site.metric("ferry_part_retries_total{destination=\"ashburn\",reason=\"slow_down\"}");
    assert!(
        retries >= injected as u64,
        "{retries} slow_down retries counted for {injected} injected"
    );
}

/// 2: the connection reset in the middle of every 10th part.
#[test]
fn connections_reset_mid_part_are_retried() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("reset");
    let relay = Relay::start(&s3);
    relay.set(r#"{"part_reset_every": 10}"#);
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"5MiB\"\nretry_base_ms = 50\n{}",
        s3_dest("ashburn", &s3.buckets[1], &prefix, &relay.endpoint(), "")
    ));
    let _d = site.daemon();
    let images = drop_images(&site.spool, "reset", 3, 60 << 20, 310);
    assert!(
        all_done(&site, &images, Duration::from_secs(180)),
        "not all done"
    );
    assert_everywhere(&site, &s3, &s3.buckets[1], &prefix, &images);
    let injected = relay.injected("reset");
    assert!(injected >= 3, "only {injected} resets injected");
    let retries = site.metric("ferry_part_retries_total{destination=\"ashburn\"");
    assert!(
        retries >= injected as u64,
        "{retries} retries counted for {injected} resets"
    );
}

/// 3: one bit flipped in one part on its way: caught, retried, never reported
/// verified while corrupt; the final object is byte-identical.
#[test]
fn a_flipped_bit_is_caught_and_the_object_is_exact() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("flip");
    let relay = Relay::start(&s3);
    relay.set(r#"{"flip_bit_in_parts": 1}"#);
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"5MiB\"\nverify = \"readback\"\nretry_base_ms = 50\n{}",
        s3_dest("ashburn", &s3.buckets[2], &prefix, &relay.endpoint(), "")
    ));
    let _d = site.daemon();
    let images = drop_images(&site.spool, "flip", 1, 30 << 20, 320);
    assert!(
        all_done(&site, &images, Duration::from_secs(120)),
        "not done"
    );
    assert_eq!(relay.injected("flip"), 1, "no bit was flipped");
    assert_everywhere(&site, &s3, &s3.buckets[2], &prefix, &images);
    assert!(
        site.metric("ferry_checksum_mismatches_total{destination=\"ashburn\"}") >= 1,
        "the flip was not counted"
    );
    assert_eq!(
        site.metric("ferry_objects_verified_total{destination=\"ashburn\",outcome=\"failed\"}"),
        0
    );
}

/// 4: the server unreachable for 30 s in the middle of an upload: ferry backs
/// off, keeps the job, completes after the server returns; nothing in failed/.
#[test]
fn thirty_seconds_of_outage_are_ridden_out() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("outage");
    let relay = Relay::start(&s3);
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"8MiB\"\nparallel_parts = 2\n{}",
        s3_dest("ashburn", &s3.buckets[0], &prefix, &relay.endpoint(), "")
    ));
    let d = site.daemon();
    let images = drop_images(&site.spool, "outage", 1, 400 << 20, 330);
    assert!(wait_until(Duration::from_secs(60), || site
        .metric("ferry_parts_uploaded_total{destination=\"ashburn\"}")
        >= 3));
    relay.set(r#"{"refuse": true}"#);
    std::thread::sleep(Duration::from_secs(30));
    relay.set("{}");
    assert!(
        all_done(&site, &images, Duration::from_secs(300)),
        "not done after the outage:\n{}",
        d.log_text()
    );
    assert_everywhere(&site, &s3, &s3.buckets[0], &prefix, &images);
    assert!(
        site.metric("ferry_part_retries_total{destination=\"ashburn\"") >= 1,
        "no retry was counted"
    );
}

/// 5: kill -9 at 20 points of the daemon's work (claim, upload start, part upload, complete,
/// manifest write, move to done/); after the restarts every image is verified
/// at every destination exactly once, and no image is lost or changed.
#[test]
fn kill_9_at_twenty_points_loses_nothing() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("crash");
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"5MiB\"\nparallel_parts = 2\n[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n{}",
        s3_dest("ashburn", &s3.buckets[1], &prefix, &s3.endpoint, "")
    ));
    let points = [
        "claim:1",
        "part:1",
        "part:4",
        "complete:1",
        "manifest:1",
        "done:1",
        "claim:2",
        "part:9",
        "complete:2",
        "manifest:2",
        "done:2",
        "part:2",
        "complete:3",
        "manifest:3",
        "begin:1",
        "part:6",
        "done:1",
        "manifest:4",
        "complete:4",
        "begin:2",
    ];
    let mut images = Vec::new();
    let mut crashed = 0;
    for (i, point) in points.iter().enumerate() {
        // Fresh work every round, so every kind of point is reached.
        images.extend(drop_images(
            &site.spool,
            &format!("c{i}"),
            2,
            12 << 20,
            400 + i as u64 * 10,
        ));
        let log = site.root.join(format!("daemon-{i}.log"));
        let mut child = ferry()
            .arg("daemon")
            .arg("--config")
            .arg(&site.config)
            .env("FERRY_CRASH_AT", point)
            .env("AWS_ACCESS_KEY_ID", key_id())
            .env("AWS_SECRET_ACCESS_KEY", secret())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        let exited = wait_until(Duration::from_secs(20), || {
            child.try_wait().unwrap().is_some()
        });
        if exited {
            crashed += 1;
        } else {
            child.kill().unwrap();
            let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(6).collect();
            eprintln!(
                "run {i} ({point}) did not crash; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = child.wait();
    }
    assert!(
        crashed >= 15,
        "only {crashed} of 20 runs reached their crash point"
    );
    let _d = site.daemon();
    assert!(
        all_done(&site, &images, Duration::from_secs(180)),
        "not all done; done: {:?}",
        list(&site.done())
    );
    // Nothing lost, nothing twice, nothing changed.
    assert!(list(&site.spool.join(".ferry/active")).is_empty());
    let left: Vec<String> = list(&site.spool)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left in the spool: {left:?}");
    assert_everywhere(&site, &s3, &s3.buckets[1], &prefix, &images);
    let phoenix: Vec<String> = list(&site.root.join("phoenix"))
        .into_iter()
        .filter(|n| !n.ends_with(".manifest.json"))
        .collect();
    // Nothing left behind either (interrupted writes are swept at start).
    assert_eq!(phoenix.len(), images.len(), "phoenix holds {phoenix:?}");
    for (n, crc) in &images {
        assert_eq!(
            file_crc(&site.root.join("phoenix").join(n)),
            *crc,
            "phoenix/{n}"
        );
    }
    eprintln!("{crashed} crashes, {} images, all verified", images.len());
}

/// 6: a hostile spool: odd names, a symlink swapped in after the claim, a huge
/// sidecar, a sidecar that is a symlink; keys stay under the prefix, nothing
/// outside the spool is read, and the daemon keeps running.
#[test]
fn a_hostile_spool_cannot_escape() {
    use std::os::unix::ffi::OsStrExt;
    let site = Site::new("[destinations.phoenix]\nurl = \"file://ROOT/out/phoenix/\"\n");
    let secret_file = site.root.join("outside-secret.img");
    random_file(&secret_file, 3 << 20, 500);
    std::fs::create_dir_all(site.root.join("out")).unwrap();
    let names: Vec<std::ffi::OsString> = vec![
        "new\nline.img".into(),
        "dots..in..name.img".into(),
        std::ffi::OsString::from("y".repeat(255)),
        std::ffi::OsStr::from_bytes(b"bad-\xff\xfe-utf8.img").to_os_string(),
        "%2e%2e%2fescape.img".into(),
    ];
    for (i, n) in names.iter().enumerate() {
        let p = site.spool.join(n);
        random_file(&p, 1 << 20, 510 + i as u64);
    }
    // A 1 GiB sidecar (sparse) and a sidecar that is a symlink to a file outside.
    random_file(&site.spool.join("bigside.img"), 1 << 20, 520);
    let big = std::fs::File::create(site.spool.join("bigside.img.meta.json")).unwrap();
    big.set_len(1 << 30).unwrap();
    random_file(&site.spool.join("linkside.img"), 1 << 20, 521);
    std::os::unix::fs::symlink(&secret_file, site.spool.join("linkside.img.meta.json")).unwrap();
    // Every claim pauses 1.5 s, so a file can be swapped for a symlink to the
    // outside file right after its claim.
    let log = site.root.join("daemon.log");
    random_file(&site.spool.join("swapped.img.partial"), 2 << 20, 522);
    let mut swap = Daemon {
        child: ferry()
            .arg("daemon")
            .arg("--config")
            .arg(&site.config)
            .env("FERRY_PAUSE_AT", "claim:1500")
            .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log: log.clone(),
    };
    assert!(wait_until(Duration::from_secs(20), || http_get(
        site.metrics_port,
        "/healthz"
    )
    .is_some()));
    std::fs::rename(
        site.spool.join("swapped.img.partial"),
        site.spool.join("swapped.img"),
    )
    .unwrap();
    let active = site.spool.join(".ferry/active/swapped.img");
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::symlink_metadata(
            &active
        )
        .is_ok()),
        "never claimed"
    );
    std::fs::remove_file(&active).unwrap();
    std::os::unix::fs::symlink(&secret_file, &active).unwrap();
    // Wait until every file has ended: the refusals in failed/, the ordinary
    // odd names (and their manifests) at the destination.
    let failed = site.spool.join(".ferry/failed");
    let out = site.root.join("out/phoenix");
    let manifest_of = |n: &std::ffi::OsString| {
        let mut m = n.clone();
        m.push(".manifest.json");
        out.join(m)
    };
    assert!(
        wait_until(Duration::from_secs(90), || failed
            .join("swapped.img.error.json")
            .exists()
            && failed.join("bigside.img.error.json").exists()
            && failed.join("linkside.img.error.json").exists()
            && [&names[0], &names[1], &names[4]]
                .iter()
                .all(|n| manifest_of(n).exists())
            && [&names[2], &names[3]].iter().all(|n| {
                let mut e = (*n).clone();
                e.push(".error.json");
                out.join(n).exists() || failed.join(e).exists()
            })),
        "failed/: {:?}, out: {:?}",
        list(&failed),
        list(&out)
    );
    assert!(swap.running(), "the daemon stopped");
    let err = std::fs::read_to_string(failed.join("bigside.img.error.json")).unwrap();
    assert!(err.contains("sidecar"), "{err}");
    // Nothing outside the destination directory was written, and the outside
    // file's bytes were never uploaded anywhere.
    assert_eq!(list(&site.root.join("out")), vec!["phoenix".to_string()]);
    let secret_crc = file_crc(&secret_file);
    for entry in std::fs::read_dir(site.root.join("out/phoenix"))
        .unwrap()
        .flatten()
    {
        assert_ne!(
            file_crc(&entry.path()),
            secret_crc,
            "the outside file was uploaded as {:?}",
            entry.file_name()
        );
    }
    // The ordinary odd names arrived under the prefix with their own names.
    let uploaded: Vec<std::ffi::OsString> = std::fs::read_dir(site.root.join("out/phoenix"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    for n in [&names[0], &names[1], &names[4]] {
        assert!(
            uploaded.contains(n),
            "{n:?} not uploaded; have {uploaded:?}"
        );
    }
    // A name that cannot be a key, or whose manifest name would be too long, is
    // refused with a reason instead.
    for n in [&names[2], &names[3]] {
        let mut e = n.clone();
        e.push(".error.json");
        assert!(
            uploaded.contains(n) || failed.join(&e).exists(),
            "{n:?} neither uploaded nor failed"
        );
    }
    assert!(
        failed
            .join({
                let mut e = names[3].clone();
                e.push(".error.json");
                e
            })
            .exists(),
        "the non-UTF-8 name was not refused"
    );
    drop(swap);
}

/// 7: the credentials in use never appear in logs, /status, error.json or manifests.
#[test]
fn secrets_never_leak() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("secret");
    let site = Site::new(&format!(
        "{}access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n{}access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        s3_dest("ashburn", &s3.buckets[0], &prefix, &s3.endpoint, ""),
        key_id(),
        secret(),
        s3_dest("nowhere", "no-such-bucket-x", &prefix, &s3.endpoint, "").replace("\n\n", "\n"),
        key_id(),
        secret()
    ).replace("[transfer]", ""));
    let cfg = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        cfg + "[transfer]\nmax_retries = 1\nretry_base_ms = 10\n",
    )
    .unwrap();
    let d = site.daemon();
    let images = drop_images(&site.spool, "secret", 1, 6 << 20, 600);
    let failed = site.spool.join(".ferry/failed");
    assert!(
        wait_until(Duration::from_secs(120), || failed
            .join(format!("{}.error.json", images[0].0))
            .exists()
            || site.done().join(&images[0].0).exists()),
        "job did not end"
    );
    let status = http_get(site.metrics_port, "/status")
        .map(|r| r.1)
        .unwrap_or_default();
    let mut haystack = d.log_text() + &status;
    for dir in [failed.clone(), site.done()] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with(".json") {
                haystack += &std::fs::read_to_string(e.path()).unwrap();
            }
        }
    }
    if let Some(m) = s3_get(
        &s3.store(&s3.buckets[0]),
        &format!("{prefix}/{}.manifest.json", images[0].0),
    ) {
        haystack += &String::from_utf8_lossy(&m);
    }
    assert!(haystack.len() > 200, "nothing to search");
    for secret in [secret(), key_id()] {
        assert!(!haystack.contains(&secret), "{secret:?} leaked");
    }
}

/// 8: the state directory on a tiny filesystem that fills up: no new work, the
/// reason on /readyz and in the log, nothing lost, and work resumes once space returns.
#[test]
fn a_full_state_directory_pauses_work_and_loses_nothing() {
    let site = Site::new("[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n");
    let state = site.root.join("state");
    let Some(_mounted) = Tmpfs::mount(&state, "256k") else {
        return;
    };
    let d = site.daemon();
    assert!(wait_until(Duration::from_secs(20), || http_get(
        site.metrics_port,
        "/readyz"
    )
    .is_some_and(|r| r.0 == 200)));
    // Fill the state filesystem.
    let filler = state.join("filler");
    let _ = std::fs::write(&filler, vec![7u8; 512 << 10]);
    let images = drop_images(&site.spool, "full", 2, 2 << 20, 700);
    let refused = wait_until(Duration::from_secs(20), || {
        http_get(site.metrics_port, "/readyz")
            .is_some_and(|(c, b)| c == 503 && b.contains("state directory"))
    });
    assert!(
        refused,
        "/readyz did not report the full state directory: {:?}",
        http_get(site.metrics_port, "/readyz")
    );
    // A scan has seen both images (and left them) while the state directory was full.
    assert!(wait_until(Duration::from_secs(20), || site
        .metric("ferry_spool_waiting_images")
        >= 2));
    for (n, _) in &images {
        assert!(
            site.spool.join(n).exists(),
            "{n} was taken while the state directory was full"
        );
    }
    assert!(d.log_text().contains("not taking new files"));
    std::fs::remove_file(&filler).unwrap();
    assert!(
        all_done(&site, &images, Duration::from_secs(60)),
        "work did not resume"
    );
    for (n, crc) in &images {
        assert_eq!(file_crc(&site.root.join("phoenix").join(n)), *crc);
    }
    assert!(wait_until(Duration::from_secs(20), || http_get(
        site.metrics_port,
        "/readyz"
    )
    .is_some_and(|r| r.0 == 200)));
}

/// `ferry push` of a 64 MiB image to a directory ("fast") and to S3 through the
/// relay at 8 MB/s ("slow"), with a budget of three 5 MiB parts.
struct SlowLinkPush {
    relay: Relay,
    img: PathBuf,
    fast: PathBuf,
    push: Child,
    out: PathBuf,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

const SLOW_LINK_IMAGE_BYTES: u64 = 64 << 20;

impl SlowLinkPush {
    fn start(s3: &S3, bucket: &str, prefix: &str, name: &str, seed: u64) -> SlowLinkPush {
        let relay = Relay::start(s3);
        relay.set(r#"{"part_bytes_per_sec": 8000000}"#);
        let dir = tmpdir();
        let img = dir.path().join(name);
        random_file(&img, SLOW_LINK_IMAGE_BYTES, seed);
        let fast = dir.path().join("fast");
        let cfg = write(
            &dir.path().join("ferry.toml"),
            &format!(
                "[transfer]\npart_size = \"5MiB\"\nmemory_limit = \"16MiB\"\nparallel_parts = 4\n\
                 [destinations.fast]\nurl = \"file://{}/\"\n{}",
                fast.display(),
                s3_dest("slow", bucket, prefix, &relay.endpoint(), "")
            ),
        );
        let (out, err) = (dir.path().join("push.out"), dir.path().join("push.err"));
        let push = s3
            .env(ferry().args(["push", "--force", "-c"]).arg(&cfg).arg(&img))
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        SlowLinkPush {
            relay,
            img,
            fast,
            push,
            out,
            err,
            _dir: dir,
        }
    }

    /// Whether the directory's copy is complete (its manifest written).
    fn fast_done(&self) -> bool {
        let mut m = self.img.file_name().unwrap().to_os_string();
        m.push(".manifest.json");
        self.fast.join(m).exists()
    }

    /// Waits (bounded) for the push to exit; its status (None if it did not
    /// exit and was killed), stdout and stderr.
    fn wait(&mut self, limit: Duration) -> (Option<std::process::ExitStatus>, String, String) {
        let exited = wait_until(limit, || self.push.try_wait().unwrap().is_some());
        if !exited {
            let _ = self.push.kill();
        }
        let status = self.push.wait().unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        (exited.then_some(status), read(&self.out), read(&self.err))
    }
}

/// A slow region does not hold a fast one back: with a budget of three parts, the
/// fast copy is complete while the slow link has taken less than half of the
/// image, because the slow destination is detached and reads its own parts; then
/// both copies are byte-identical. Without the detach the fast copy could run at
/// most the budget ahead, so it would finish only after the slow link had taken
/// about three quarters.
#[test]
fn a_slow_region_does_not_hold_back_a_fast_one() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("slowlink");
    let mut p = SlowLinkPush::start(&s3, &s3.buckets[0], &prefix, "slowlink.qcow2", 950);
    let fast_done = wait_until(Duration::from_secs(60), || p.fast_done());
    let slow_then = p.relay.slow_bytes();
    let size = SLOW_LINK_IMAGE_BYTES;
    eprintln!("fast copy complete; the slow link had taken {slow_then} of {size} bytes");
    let (status, _, err) = p.wait(Duration::from_secs(120));
    assert!(fast_done, "the fast copy never completed:\n{err}");
    assert!(
        slow_then < size / 2,
        "the fast copy completed only when the slow link had taken {slow_then} of {size} bytes:\n{err}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "push: {status:?}\n{err}"
    );
    assert!(
        err.contains("slow falls behind the others"),
        "no detach logged:\n{err}"
    );
    assert!(same_bytes(&p.fast.join("slowlink.qcow2"), &p.img));
    let key = format!("{prefix}/slowlink.qcow2");
    assert!(s3_object_equals(&s3.store(&s3.buckets[0]), &key, &p.img));
    assert!(
        p.relay.slow_bytes() >= size,
        "the relay did not throttle the parts"
    );
}

/// `ferry push` interrupted (SIGINT) in the middle of a slow S3 upload: exit 130,
/// the destination that had verified keeps its copy, the S3 upload is aborted (no
/// object, no multipart upload left open to cost storage), and it says so.
#[test]
fn an_interrupted_push_aborts_what_it_cannot_finish() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("interrupted");
    let bucket = &s3.buckets[1];
    let mut p = SlowLinkPush::start(&s3, bucket, &prefix, "halfway.qcow2", 960);
    // The directory has its copy and the slow link has taken a part of the rest.
    let midway = wait_until(Duration::from_secs(60), || {
        p.fast_done() && p.relay.slow_bytes() > 0
    });
    let open_before = s3.open_uploads(bucket, &prefix);
    unsafe { libc::kill(p.push.id() as i32, libc::SIGINT) };
    let (status, stdout, stderr) = p.wait(Duration::from_secs(30));
    assert!(midway, "the push never got midway:\n{stderr}");
    assert_eq!(
        open_before,
        vec![format!("{prefix}/halfway.qcow2")],
        "the S3 upload was not open before the signal"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(130), "{stderr}");
    assert!(
        stdout.contains("halfway.qcow2 (67108864 bytes") && stdout.contains("at fast"),
        "{stdout}"
    );
    assert!(
        stderr.contains("INTERRUPTED slow") && stderr.contains("the upload was aborted"),
        "{stderr}"
    );
    assert!(same_bytes(&p.fast.join("halfway.qcow2"), &p.img));
    assert_eq!(
        std::fs::read_dir(&p.fast).unwrap().count(),
        2,
        "the directory holds more than the image and its manifest"
    );
    let key = format!("{prefix}/halfway.qcow2");
    assert!(!s3_object_equals(&s3.store(bucket), &key, &p.img));
    assert_eq!(
        s3.open_uploads(bucket, &prefix),
        Vec::<String>::new(),
        "a multipart upload was left open"
    );
}

/// A regular file renamed over `active/X` after the claim (a writer in ferry's
/// own directory) is neither inspected nor shipped: the job opens `active/X`
/// once, finds another inode than the one claimed, and refuses it; the
/// inspection and the upload read only through that one descriptor.
#[test]
fn a_file_swapped_in_after_the_claim_is_neither_inspected_nor_shipped() {
    let site = Site::new("[destinations.phoenix]\nurl = \"file://ROOT/out/phoenix/\"\n");
    let out = site.root.join("out/phoenix");
    std::fs::create_dir_all(&out).unwrap();
    let log = site.root.join("daemon.log");
    // Every claim pauses 1.5 s before its job starts.
    let mut daemon = Daemon::start_with(&site.config, &log, |c| {
        c.env("FERRY_PAUSE_AT", "claim:1500");
    });
    assert!(wait_until(Duration::from_secs(20), || http_get(
        site.metrics_port,
        "/healthz"
    )
    .is_some()));
    let intruder = site.root.join("intruder.img");
    random_file(&intruder, 2 << 20, 531);
    random_file(&site.spool.join("x.img.partial"), 2 << 20, 530);
    std::fs::rename(site.spool.join("x.img.partial"), site.spool.join("x.img")).unwrap();
    let active = site.active().join("x.img");
    assert!(
        wait_until(Duration::from_secs(20), || active.exists()),
        "never claimed"
    );
    std::fs::rename(&intruder, &active).unwrap();
    let report = site
        .error_report("x.img", Duration::from_secs(60))
        .expect("the swapped-in file was not refused");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("renamed over it"), "{reason}");
    assert!(
        report["inspection"].is_null(),
        "the swapped-in file was inspected: {report}"
    );
    assert!(
        !list(&out).iter().any(|n| n.starts_with("x.img")),
        "something of x.img was shipped: {:?}",
        list(&out)
    );
    assert_eq!(site.metric("ferry_jobs_total{outcome=\"refused\"}"), 1);
    assert!(daemon.running(), "the daemon stopped");
}
