//! What an attacker's afternoon found, and the weak spots found beside it,
//! each as a test of the real binary against real servers (SeaweedFS, behind
//! the fault relay where the test needs to see or slow the traffic). Every
//! test here failed on the code before its fix.

mod common;

use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// S3 destinations (name, bucket) on the test server, all through `relay`:
/// 5 MiB parts, a budget of three of them, one part on the wire per
/// destination; `transfer` adds lines to the `[transfer]` table.
fn relayed_site(relay: &Relay, prefix: &str, dests: &[(&str, &str)], transfer: &str) -> Site {
    let tables: String = dests
        .iter()
        .map(|(name, bucket)| s3_dest(name, bucket, prefix, &relay.endpoint(), ""))
        .collect();
    Site::new(&format!(
        "[transfer]\npart_size = \"5MiB\"\nmemory_limit = \"16MiB\"\nparallel_parts = 1\nretry_base_ms = 50\n{transfer}\n{tables}"
    ))
}

/// Writes `NAME.partial`, renames it to `NAME` as a producer should, but keeps
/// it open for writing: no read lease can be taken on it.
fn renamed_but_held_open(spool: &Path, name: &str, size: u64, seed: u64) -> std::fs::File {
    let partial = spool.join(format!("{name}.partial"));
    random_file(&partial, size, seed);
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&partial)
        .unwrap();
    std::fs::rename(&partial, spool.join(name)).unwrap();
    held
}

/// Overwrites the first 4 KiB in place (same size) and puts the modification
/// time back, as an attacker who wants the change to go unnoticed would.
fn rewrite_in_place(f: &std::fs::File) {
    let mtime = f.metadata().unwrap().modified().unwrap();
    let mut old = vec![0u8; 4096];
    f.read_exact_at(&mut old, 0).unwrap();
    let new: Vec<u8> = old.iter().map(|b| !b).collect();
    f.write_all_at(&new, 0).unwrap();
    f.set_modified(mtime).unwrap();
    assert_eq!(f.metadata().unwrap().modified().unwrap(), mtime);
}

/// Nothing of `name` is anywhere in `buckets`: no object, no manifest, no
/// multipart upload left open.
fn nothing_shipped(s3: &S3, buckets: &[&str], prefix: &str, name: &str) {
    for bucket in buckets {
        let store = s3.store(bucket);
        let key = format!("{prefix}/{name}");
        assert!(s3_get(&store, &key).is_none(), "{bucket}/{key} exists");
        assert!(
            s3_get(&store, &format!("{key}.manifest.json")).is_none(),
            "{bucket}/{key}.manifest.json exists"
        );
        assert_eq!(
            s3.open_uploads(bucket, prefix),
            Vec::<String>::new(),
            "an upload was left open in {bucket}"
        );
    }
}

/// Waits (bounded) until every destination named has had a part accepted.
fn a_part_accepted_at(site: &Site, dests: &[&str], d: &Daemon) {
    let accepted = wait_until(Duration::from_secs(60), || {
        dests.iter().all(|n| {
            site.metric(&format!(
                "ferry_parts_uploaded_total{{destination=\"{n}\"}}"
            )) >= 1
        })
    });
    assert!(accepted, "no part accepted:\n{}", d.log_text());
}

fn reason(report: &serde_json::Value) -> String {
    report["reason"].as_str().unwrap_or_default().to_string()
}

/// Ships a 40 MiB image to two S3 regions behind a 2 MB/s relay; `put` puts
/// it in the spool (and may keep a handle on it), `change` changes it once a
/// part has reached both regions. Then the job must fail: nothing verified
/// anywhere, no upload left open, the daemon running, the changed file kept.
/// Returns the reason in `failed/NAME.error.json`; `None` without S3.
fn changed_mid_upload<H>(
    tag: &str,
    seed: u64,
    put: impl FnOnce(&Path, &str, u64) -> H,
    change: impl FnOnce(&Site, &str, H),
) -> Option<String> {
    let s3 = s3()?;
    let prefix = unique_prefix(tag);
    let relay = Relay::start(&s3);
    relay.set(r#"{"part_bytes_per_sec": 2000000}"#);
    let (b0, b1) = (s3.buckets[0].as_str(), s3.buckets[1].as_str());
    let site = relayed_site(&relay, &prefix, &[("phoenix", b0), ("frankfurt", b1)], "");
    let mut d = site.daemon();
    let name = format!("{tag}.qcow2");
    let held = put(&site.spool, &name, seed);
    a_part_accepted_at(&site, &["phoenix", "frankfurt"], &d);
    change(&site, &name, held);
    let Some(report) = site.error_report(&name, Duration::from_secs(60)) else {
        panic!(
            "the changed file was not failed; done/: {:?}",
            list(&site.done())
        );
    };
    assert!(d.running(), "the daemon stopped");
    // The file is kept as it now is, and nothing claims to be a copy of it.
    assert!(site.failed().join(&name).exists());
    nothing_shipped(&s3, &[b0, b1], &prefix, &name);
    assert!(d.log_text().contains("changed while uploading"));
    Some(reason(&report))
}

/// Bug 1: a source rewritten in place during an upload, same size, its mtime
/// put back, by a producer that kept it open (so no lease can be taken). Its
/// change time moved: no destination reports it verified, every upload is
/// aborted, and the file is kept in failed/ with a reason that says what changed.
#[test]
fn a_source_rewritten_in_place_with_its_mtime_put_back_is_never_verified() {
    let Some(why) = changed_mid_upload(
        "rewritten",
        1100,
        |spool, name, seed| renamed_but_held_open(spool, name, 40 * MIB, seed),
        |_, _, held| rewrite_in_place(&held),
    ) else {
        return;
    };
    // A check between the write and the mtime put back sees the mtime move;
    // any later one only the change time.
    assert!(
        why.contains("changed while uploading")
            && (why.contains("change time") || why.contains("modification time")),
        "{why}"
    );
}

/// Bug 1, with a read lease: a process that opens the claimed file for writing
/// during the upload waits until ferry lets go of it; ferry, told by the
/// kernel, fails the job. Nothing verifies, every upload is aborted, and the
/// reason names the writer.
#[test]
fn a_writer_opening_the_claimed_file_breaks_the_lease_and_nothing_verifies() {
    let Some(why) = changed_mid_upload(
        "leased",
        1110,
        |spool, name, seed| drop_image(spool, name, 40 * MIB, seed),
        |site, name, _| {
            // Blocks until ferry gives the lease up (the kernel breaks it after
            // /proc/sys/fs/lease-break-time, 45 s by default, if ferry does not).
            let started = Instant::now();
            let writer = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(site.active().join(name))
                .unwrap();
            eprintln!("the writer's open took {:?}", started.elapsed());
            rewrite_in_place(&writer);
        },
    ) else {
        return;
    };
    assert!(
        why.contains("changed while uploading") && why.contains("opened it for writing"),
        "{why}"
    );
}

/// Bug 1, across a restart: the daemon dies mid-upload, the claimed file is
/// rewritten in place with its mtime put back, and the restarted daemon must
/// not finish the journaled uploads (their first parts hold the old bytes):
/// the file fails as changed and every upload is aborted.
#[test]
fn a_source_changed_while_the_daemon_was_down_is_not_resumed() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("changed-down");
    let (b0, b1) = (s3.buckets[0].as_str(), s3.buckets[1].as_str());
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"5MiB\"\n{}{}",
        s3_dest("phoenix", b0, &prefix, &s3.endpoint, ""),
        s3_dest("frankfurt", b1, &prefix, &s3.endpoint, "")
    ));
    let name = "downtime.qcow2";
    drop_image(&site.spool, name, 40 * MIB, 1120);
    let mut crashing = Daemon::start_with(&site.config, &site.root.join("crash.log"), |c| {
        c.env("FERRY_CRASH_AT", "part:3");
    });
    assert!(
        crashing.wait_exit(Duration::from_secs(60)).is_some(),
        "the daemon never reached its crash point"
    );
    let active = site.active().join(name);
    assert!(
        !s3.open_uploads(b0, &prefix).is_empty() || !s3.open_uploads(b1, &prefix).is_empty(),
        "no upload was open at the crash"
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&active)
        .unwrap();
    rewrite_in_place(&f);
    drop(f);
    let mut d = site.daemon();
    let Some(report) = site.error_report(name, Duration::from_secs(60)) else {
        panic!(
            "the changed file was resumed; done/: {:?}",
            list(&site.done())
        );
    };
    let why = reason(&report);
    assert!(why.contains("changed"), "{why}");
    assert!(d.running());
    nothing_shipped(&s3, &[b0, b1], &prefix, name);
}

/// Bugs 2 and a weak spot: a source truncated while it is being uploaded, with
/// each reader. The mmap reader used to die with SIGBUS (the daemon vanished
/// without a log line, leaving its upload open); the pread reader failed with
/// advice about the destinations. Now the daemon lives, the job fails as
/// changed and blames the source, the upload is aborted and no journal record
/// is left.
fn truncated_source_case(reader: &str, seed: u64) {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix(&format!("truncated-{reader}"));
    let relay = Relay::start(&s3);
    relay.set(r#"{"part_bytes_per_sec": 2000000}"#);
    let b = s3.buckets[2].as_str();
    let site = relayed_site(
        &relay,
        &prefix,
        &[("ashburn", b)],
        &format!("reader = \"{reader}\""),
    );
    let mut d = site.daemon();
    let name = format!("truncated-{reader}.qcow2");
    drop_image(&site.spool, &name, 40 * MIB, seed);
    a_part_accepted_at(&site, &["ashburn"], &d);
    // Parts 1..3 are read (mapped, for mmap) and waiting: cut the file under them.
    std::fs::OpenOptions::new()
        .write(true)
        .open(site.active().join(&name))
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let report = site.error_report(&name, Duration::from_secs(60));
    let exit = d.child.try_wait().unwrap();
    assert!(exit.is_none(), "the daemon died: {exit:?}");
    let Some(report) = report else {
        panic!("the truncated file was not failed")
    };
    // The lease tells ferry first (the truncation opened the file for
    // writing); without a lease the size shows it.
    let why = reason(&report);
    assert!(
        why.contains("changed while uploading")
            && (why.contains("size") || why.contains("truncated")),
        "{why}"
    );
    let what = report["what_to_do"].as_str().unwrap_or_default();
    assert!(
        what.contains("producer") && !what.contains("credentials"),
        "the advice should be about the source: {what}"
    );
    nothing_shipped(&s3, &[b], &prefix, &name);
    let records: Vec<String> = list(&site.root.join("state/jobs"))
        .into_iter()
        .filter(|n| n.ends_with(".json"))
        .collect();
    assert!(records.is_empty(), "journal records left: {records:?}");
}

#[test]
fn a_source_truncated_under_the_mmap_reader_does_not_kill_the_daemon() {
    truncated_source_case("mmap", 1130);
}

#[test]
fn a_source_truncated_under_the_pread_reader_is_blamed_on_the_source() {
    truncated_source_case("pread", 1140);
}

/// Bug 2 for `ferry push`: the same truncation under the mmap reader ends the
/// push with exit status 1 and a line that blames the source (it used to die
/// of SIGBUS and leave the upload open), and no upload is left open.
#[test]
fn a_push_with_the_mmap_reader_survives_a_truncated_source() {
    use std::os::unix::process::ExitStatusExt;
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("push-truncated");
    let relay = Relay::start(&s3);
    relay.set(r#"{"part_bytes_per_sec": 2000000}"#);
    let b = s3.buckets[0].as_str();
    let dir = tmpdir();
    let img = dir.path().join("cut.qcow2");
    random_file(&img, 40 * MIB, 1150);
    let cfg = write(
        &dir.path().join("ferry.toml"),
        &format!(
            "[transfer]\npart_size = \"5MiB\"\nmemory_limit = \"16MiB\"\nparallel_parts = 1\nreader = \"mmap\"\n{}",
            s3_dest("slow", b, &prefix, &relay.endpoint(), "")
        ),
    );
    let err = dir.path().join("push.err");
    let mut push = s3
        .env(ferry().args(["push", "--force", "-c"]).arg(&cfg).arg(&img))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let midway = wait_until(Duration::from_secs(60), || relay.slow_bytes() >= 5 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let exited = wait_until(Duration::from_secs(60), || {
        push.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = push.kill();
    }
    let status = push.wait().unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    eprintln!("--- push stderr\n{stderr}");
    assert!(midway, "the push never got midway");
    assert_eq!(status.signal(), None, "the push was killed by a signal");
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("FAILED slow") && stderr.contains("changed while uploading"),
        "{stderr}"
    );
    assert_eq!(s3.open_uploads(b, &prefix), Vec::<String>::new());
}

/// A TCP listener on loopback standing in for a service nobody configured
/// (the cloud instance-metadata service): it counts connections and closes them.
struct Trap {
    port: u16,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Trap {
    fn start() -> Trap {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            // Bounded: ten minutes at most, or until the trap is dropped.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok(_) => {
                        h.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Trap { port, hits, stop }
    }
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The environment of a host with no AWS credentials in it, whose instance
/// metadata service is `trap`.
fn no_credentials_but_a_metadata_service(cmd: &mut Command, trap: &Trap) {
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("AWS_METADATA_ENDPOINT", trap.url());
}

/// Bug 3, first rule: an s3:// destination with no credentials configured is
/// refused before a byte is sent, by `ferry push` and by the daemon at start,
/// naming the ways to give them; nothing asks an instance-metadata service.
#[test]
fn an_s3_destination_without_credentials_is_refused_and_no_metadata_service_is_asked() {
    let Some(s3) = s3() else { return };
    let trap = Trap::start();
    let prefix = unique_prefix("nocreds");
    let dir = tmpdir();
    let img = dir.path().join("nocreds.qcow2");
    random_file(&img, 6 * MIB, 1160);
    let out_dir = dir.path().join("local");
    let cfg = write(
        &dir.path().join("ferry.toml"),
        &format!(
            "[destinations.local]\nurl = \"file://{}/\"\n{}",
            out_dir.display(),
            s3_dest("ashburn", &s3.buckets[0], &prefix, &s3.endpoint, "")
        ),
    );
    let mut cmd = ferry();
    cmd.args(["push", "--force", "-c"]).arg(&cfg).arg(&img);
    no_credentials_but_a_metadata_service(&mut cmd, &trap);
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(2), "not refused before sending");
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    for needle in [
        "ashburn",
        "access_key_id",
        "AWS_ACCESS_KEY_ID",
        "credentials = \"instance\"",
    ] {
        assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    }
    assert!(
        !out_dir.exists() || list(&out_dir).is_empty(),
        "something was uploaded before the refusal"
    );
    // The daemon refuses it at start, in the same words.
    let site = Site::new(&s3_dest(
        "ashburn",
        &s3.buckets[0],
        &prefix,
        &s3.endpoint,
        "",
    ));
    let mut d = Daemon::start_with(&site.config, &site.root.join("daemon.log"), |c| {
        no_credentials_but_a_metadata_service(c, &trap)
    });
    let status = d.wait_exit(Duration::from_secs(15));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "the daemon started");
    let refusal = |log: &str| {
        log.lines()
            .find(|l| l.contains("credentials = \"instance\""))
            .map(|l| l[l.find("ashburn").unwrap_or(0)..].to_string())
    };
    let at_start = refusal(&d.log_text()).expect("the refusal names the ways to give credentials");
    // Issue 13, item 1: a reload that adds such a destination is refused in
    // the same words, and the running daemon keeps its configuration.
    let running = Site::new("[destinations.local]\nurl = \"file://ROOT/local/\"\n");
    let mut d = Daemon::start_with(&running.config, &running.root.join("daemon.log"), |c| {
        no_credentials_but_a_metadata_service(c, &trap)
    });
    assert!(wait_until(Duration::from_secs(20), || d
        .log_text()
        .contains(" watching ")));
    let config = std::fs::read_to_string(&running.config).unwrap();
    write(
        &running.config,
        &format!(
            "{config}{}",
            s3_dest("ashburn", &s3.buckets[0], &prefix, &s3.endpoint, "")
        ),
    );
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || d
            .log_text()
            .contains("reload refused")),
        "the reload was not refused"
    );
    assert!(d.running(), "a refused reload stopped the daemon");
    let on_reload = refusal(&d.log_text()).expect("the reload's refusal names the ways");
    assert_eq!(on_reload, at_start, "not the same words");
    drop_image(&running.spool, "after-reload.qcow2", MIB, 1161);
    assert!(
        wait_until(Duration::from_secs(30), || running
            .done()
            .join("after-reload.qcow2")
            .exists()),
        "the old configuration did not go on"
    );
    assert_eq!(trap.hits(), 0, "the instance-metadata service was asked");
}

/// Bug 3, second rule: a daemon killed mid-upload restarts with a changed
/// config. A destination renamed but still naming the same endpoint and bucket
/// reaches the old upload (the journal holds endpoint, region and bucket); one
/// moved to another bucket cannot, and ferry says exactly what is left open
/// where instead of guessing. Nothing is asked of anything the config does not
/// name: not the instance-metadata service, not public AWS.
#[test]
fn after_a_config_change_clean_up_goes_only_where_the_config_says() {
    let Some(s3) = s3() else { return };
    let trap = Trap::start();
    let prefix = unique_prefix("moved");
    let (b0, b1) = (s3.buckets[0].as_str(), s3.buckets[1].as_str());
    let keys = format!(
        "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        key_id(),
        secret()
    );
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"5MiB\"\n{}",
        s3_dest("ash", b0, &prefix, &s3.endpoint, &keys)
    ));
    let original = std::fs::read_to_string(&site.config).unwrap();
    let start = |log: &str, crash: bool| {
        Daemon::start_with(&site.config, &site.root.join(log), |c| {
            no_credentials_but_a_metadata_service(c, &trap);
            if crash {
                c.env("FERRY_CRASH_AT", "part:2");
            }
        })
    };
    let crash_mid_upload = |name: &str, seed: u64| {
        drop_image(&site.spool, name, 40 * MIB, seed);
        let mut c = start(&format!("crash-{name}.log"), true);
        assert!(
            c.wait_exit(Duration::from_secs(60)).is_some(),
            "no crash:\n{}",
            c.log_text()
        );
        let open = s3.open_upload_ids(b0, &prefix);
        assert_eq!(open.len(), 1, "{open:?}");
        open.into_iter().next().unwrap()
    };

    // Renamed, same place: the old upload is reached and the image ships.
    crash_mid_upload("renamed.qcow2", 1170);
    std::fs::write(
        &site.config,
        original.replace("[destinations.ash]", "[destinations.ashburn]"),
    )
    .unwrap();
    let mut d = start("renamed.log", false);
    assert!(
        wait_until(Duration::from_secs(60), || site
            .done()
            .join("renamed.qcow2")
            .exists()),
        "not shipped after the rename:\n{}",
        d.log_text()
    );
    assert!(s3_object_equals(
        &s3.store(b0),
        &format!("{prefix}/renamed.qcow2"),
        &site.done().join("renamed.qcow2")
    ));
    assert_eq!(
        s3.open_uploads(b0, &prefix),
        Vec::<String>::new(),
        "the renamed destination's old upload was left open"
    );
    let log = d.log_text();
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(30));

    // Moved to another bucket: the old upload cannot be reached with what the
    // config says; ferry names it and leaves it.
    let (key, upload_id) = crash_mid_upload("moved.qcow2", 1180);
    std::fs::write(
        &site.config,
        original
            .replace("[destinations.ash]", "[destinations.ashburn]")
            .replace(&format!("s3://{b0}/"), &format!("s3://{b1}/")),
    )
    .unwrap();
    let d2 = start("moved.log", false);
    assert!(
        wait_until(Duration::from_secs(60), || site
            .done()
            .join("moved.qcow2")
            .exists()),
        "not shipped after the move:\n{}",
        d2.log_text()
    );
    let log2 = d2.log_text();
    let left_line = log2
        .lines()
        .find(|l| l.contains("left open"))
        .unwrap_or_else(|| panic!("nothing said about the old upload:\n{log2}"));
    for needle in [upload_id.as_str(), key.as_str(), b0, s3.endpoint.as_str()] {
        assert!(left_line.contains(needle), "{left_line:?} lacks {needle:?}");
    }
    assert_eq!(
        s3.open_upload_ids(b0, &prefix),
        vec![(key.clone(), upload_id.clone())],
        "ferry guessed"
    );
    for l in [&log, &log2] {
        assert!(
            !l.contains("amazonaws.com") && !l.contains("169.254."),
            "a request went where no config says:\n{l}"
        );
    }
    assert_eq!(trap.hits(), 0, "the instance-metadata service was asked");
    drop(d2);
    // Tidy up the upload ferry rightly left alone.
    block_on(async {
        use object_store::multipart::MultipartStore;
        s3.store(b0)
            .abort_multipart(&obj_path(&key), &upload_id)
            .await
            .unwrap();
    });
}

/// Bug 4: object keys are the file's name under the prefix, exactly, whatever
/// characters it holds: every request names the key encoded once, the server
/// lists it as asked, and the manifest names that key and encodes its URL
/// once; a destination URL with a query or a fragment is refused.
///
/// SeaweedFS itself stores a `\` in a key as `/` (a PUT of `a%5Cb` by curl is
/// listed as `a/b`), so for that one name the test checks what ferry asked
/// for on the wire, not what the server kept.
#[test]
fn object_keys_are_the_file_names_exactly() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("keys");
    let bucket = s3.buckets[2].as_str();
    let relay = Relay::start(&s3);
    relay.set(r#"{"log_requests": true}"#);
    let dir = tmpdir();
    let src = dir.path().join("src");
    let local = dir.path().join("local");
    std::fs::create_dir_all(&src).unwrap();
    let cfg = write(
        &dir.path().join("ferry.toml"),
        &format!(
            "[destinations.local]\nurl = \"file://{}/\"\n{}",
            local.display(),
            s3_dest("ashburn", bucket, &prefix, &relay.endpoint(), "")
        ),
    );
    let names = [
        "100%.qcow2",
        "a#b?c.qcow2",
        "back\\slash~[x]*.qcow2",
        "quote\"'<>.qcow2",
        "plus+and&eq=.qcow2",
        "ünïcødé 空白.qcow2",
    ];
    for (i, name) in names.iter().enumerate() {
        let img = src.join(name);
        random_file(&img, MIB, 1190 + i as u64);
        let out = run(s3
            .env(&mut ferry())
            .args(["push", "--force", "-c"])
            .arg(&cfg)
            .arg(&img));
        assert!(out.status.success(), "{name}");
    }
    // On the wire: the requests for each image name its key, encoded once
    // (begin, the part, complete and head at least).
    let requests = relay.log();
    for name in names {
        let asked = requests
            .lines()
            .filter_map(|l| l.strip_prefix("req "))
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|path| {
                percent_decode(path.split('?').next().unwrap_or_default())
                    == format!("/{bucket}/{prefix}/{name}")
            })
            .count();
        assert!(
            asked >= 4,
            "{name:?}: {asked} requests for its key in:\n{requests}"
        );
    }
    // In the server's listing: every key as asked (but the one SeaweedFS rewrites).
    let kept: Vec<&str> = names.into_iter().filter(|n| !n.contains('\\')).collect();
    let mut want: Vec<String> = kept
        .iter()
        .flat_map(|n| {
            [
                format!("{prefix}/{n}"),
                format!("{prefix}/{n}.manifest.json"),
            ]
        })
        .collect();
    want.sort();
    let mut listed = s3.keys(bucket, &prefix);
    listed.retain(|k| !k.contains("/back"));
    assert_eq!(listed, want);
    let store = s3.store(bucket);
    for name in kept {
        let key = format!("{prefix}/{name}");
        assert!(s3_object_equals(&store, &key, &src.join(name)), "{key}");
        let m: serde_json::Value =
            serde_json::from_slice(&s3_get(&store, &format!("{key}.manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["destination"]["key"], key);
        // Not OCI Object Storage: no CreateImage body, and the manifest says why.
        assert!(m.get("oci_create_image").is_none(), "{m}");
        assert!(
            m["oci_create_image_unavailable"]
                .as_str()
                .is_some_and(|w| w.contains("not OCI Object Storage")),
            "{m}"
        );
        let uri = m["destination"]["object_url"]
            .as_str()
            .unwrap_or_else(|| panic!("no object_url in {m}"));
        assert!(
            uri.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~/:%".contains(&b)),
            "not encoded once: {uri}"
        );
        assert_eq!(
            percent_decode(uri),
            format!("{}/{bucket}/{key}", relay.endpoint()),
            "{uri}"
        );
    }
    // The directory holds every name exactly, with the key in its manifest.
    for name in names {
        assert!(same_bytes(&src.join(name), &local.join(name)), "{name}");
        let lm = manifest(&local.join(format!("{name}.manifest.json")));
        assert_eq!(lm["destination"]["key"], name);
        assert_eq!(
            lm["destination"]["path"],
            local.join(name).display().to_string()
        );
    }
    for url in [
        format!("s3://{bucket}/p?x=1"),
        format!("s3://{bucket}/p#frag"),
        format!("file://{}/q?x=1/", dir.path().display()),
    ] {
        let out = run(ferry()
            .args(["push", "--force", "--to"])
            .arg(&url)
            .arg(src.join(names[0])));
        assert_eq!(out.status.code(), Some(2), "{url} was taken");
        let lines = error_lines(&out);
        assert!(
            lines.len() == 1 && (lines[0].contains("query") || lines[0].contains("fragment")),
            "{url}: {lines:?}"
        );
    }
}

/// Bug 5: a second daemon on the same state directory, or on the same spool,
/// refuses to start with a message that says which and who holds it; the
/// first one keeps shipping.
#[test]
fn a_second_daemon_on_the_same_state_or_spool_refuses_to_start() {
    let site = Site::new("[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n");
    let mut first = site.daemon();
    assert!(wait_until(Duration::from_secs(20), || http_get(
        site.metrics_port,
        "/healthz"
    )
    .is_some()));
    let pid = first.child.id().to_string();
    let text = std::fs::read_to_string(&site.config).unwrap();
    let other_port = text.replace(
        &format!("127.0.0.1:{}", site.metrics_port),
        &format!("127.0.0.1:{}", free_port()),
    );
    let cases = [
        ("same-state", other_port.clone(), "state directory"),
        (
            "same-spool",
            other_port.replace(
                &format!("{}/state", site.root.display()),
                &format!("{}/state2", site.root.display()),
            ),
            "spool",
        ),
    ];
    for (what, config, needle) in cases {
        let cfg = write(&site.root.join(format!("{what}.toml")), &config);
        let mut second = Daemon::start(&cfg, &site.root.join(format!("{what}.log")));
        let status = second.wait_exit(Duration::from_secs(15));
        let log = second.log_text();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{what}: the second daemon runs"
        );
        assert!(
            log.contains(needle) && log.contains(&pid) && log.contains("another ferry daemon"),
            "{what}: {log}"
        );
    }
    let crc = drop_image(&site.spool, "one.img", 3 * MIB, 1200);
    assert!(wait_until(Duration::from_secs(30), || site
        .done()
        .join("one.img")
        .exists()));
    assert_eq!(file_crc(&site.root.join("phoenix/one.img")), crc);
    assert!(first.running());
    // Exactly one claim of it.
    assert_eq!(first.log_text().matches("claimed \"one.img\"").count(), 1);
}

/// Removes a directory tree even while a daemon recreates its own
/// directories inside it (bounded).
fn remove_tree(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot remove {}", dir.display());
}

/// Bug 6: the spool directory removed and made again, then the state
/// directory, under a running daemon: new images still ship, and the log says
/// what ferry recreated.
#[test]
fn spool_and_state_directories_removed_under_a_running_daemon_are_recreated() {
    let site = Site::new("[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n");
    let d = site.daemon();
    let ready = || http_get(site.metrics_port, "/readyz").is_some_and(|(code, _)| code == 200);
    assert!(wait_until(Duration::from_secs(20), ready));
    remove_tree(&site.spool);
    std::fs::create_dir_all(&site.spool).unwrap();
    let crc = drop_image(&site.spool, "after-spool.img", 2 * MIB, 1210);
    assert!(
        wait_until(Duration::from_secs(30), || site
            .done()
            .join("after-spool.img")
            .exists()),
        "stalled after the spool was made again:\n{}",
        d.log_text()
    );
    assert_eq!(file_crc(&site.root.join("phoenix/after-spool.img")), crc);
    let state = site.root.join("state");
    remove_tree(&state);
    std::fs::create_dir_all(&state).unwrap();
    let crc = drop_image(&site.spool, "after-state.img", 2 * MIB, 1211);
    assert!(
        wait_until(Duration::from_secs(30), || site
            .done()
            .join("after-state.img")
            .exists()),
        "stalled after the state directory was made again:\n{}",
        d.log_text()
    );
    assert_eq!(file_crc(&site.root.join("phoenix/after-state.img")), crc);
    assert!(wait_until(Duration::from_secs(20), ready));
    assert!(d.log_text().contains("recreated"), "nothing logged");
}

/// Bug 7: a thousand idle connections to the HTTP endpoint, with the usual
/// limit of 1,024 open files, neither silence `/healthz` nor stop the daemon
/// from taking and shipping an image.
#[test]
fn a_thousand_idle_connections_neither_silence_healthz_nor_stop_the_daemon() {
    use std::os::unix::process::CommandExt;
    let site = Site::new("[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n");
    let d = Daemon::start_with(&site.config, &site.root.join("daemon.log"), |c| {
        // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
        unsafe {
            c.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 1024,
                    rlim_max: 1024,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let healthy = || http_get(site.metrics_port, "/healthz").is_some_and(|(c, _)| c == 200);
    assert!(wait_until(Duration::from_secs(20), healthy));
    // This test process needs more than 1,024 descriptors itself.
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut own);
        if own.rlim_cur < 4096 {
            let want = libc::rlimit {
                rlim_cur: 4096,
                rlim_max: own.rlim_max.max(4096),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                own.rlim_cur = own.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &own);
            }
        }
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], site.metrics_port));
    let idle: Vec<TcpStream> = (0..1100)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
        .collect();
    eprintln!("{} idle connections open", idle.len());
    assert!(idle.len() >= 1024, "only {} connections opened", idle.len());
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), healthy),
        "/healthz silent:\n{}",
        d.log_text()
    );
    eprintln!("/healthz answered after {:?}", started.elapsed());
    let crc = drop_image(&site.spool, "busy.img", 3 * MIB, 1220);
    assert!(
        wait_until(Duration::from_secs(60), || site
            .done()
            .join("busy.img")
            .exists()),
        "not shipped:\n{}",
        d.log_text()
    );
    assert_eq!(file_crc(&site.root.join("phoenix/busy.img")), crc);
    drop(idle);
}

/// Fills the filesystem holding `dir` (one file, written until it is full).
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![7u8; 1 << 16];
    for _ in 0..100_000 {
        if std::io::Write::write_all(&mut f, &block).is_err() {
            break;
        }
    }
    filler
}

/// A weak spot, twice: a file:// destination whose disk is full made `/readyz`
/// say ready while every part failed with ENOSPC, and the job, waiting between
/// attempts, vanished from `/status`. Now `/readyz` names the destination and
/// its free space, `/status` shows the job waiting with its reason, and the
/// image ships once there is room.
#[test]
fn a_full_destination_disk_is_not_ready_and_a_job_waiting_to_retry_stays_on_status() {
    let site = Site::new(
        "[transfer]\npart_size = \"5MiB\"\nmax_retries = 1\nretry_base_ms = 10\n[destinations.phoenix]\nurl = \"file://ROOT/full/\"\n",
    );
    let Some(_mounted) = Tmpfs::mount(&site.root.join("full"), "16m") else {
        return;
    };
    let filler = fill(&site.root.join("full"));
    let d = site.daemon();
    let readyz = || http_get(site.metrics_port, "/readyz").unwrap_or((0, String::new()));
    let not_ready = wait_until(Duration::from_secs(20), || {
        let (code, body) = readyz();
        code == 503 && body.contains("phoenix") && body.contains("free")
    });
    assert!(not_ready, "/readyz: {:?}", readyz());
    let crc = drop_image(&site.spool, "waits.img", 8 * MIB, 1230);
    let status = || {
        http_get(site.metrics_port, "/status")
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .unwrap_or_default()
    };
    let shown = wait_until(Duration::from_secs(60), || {
        status()["retrying"]
            .as_array()
            .is_some_and(|r| r.iter().any(|j| j["file"] == "waits.img"))
    });
    let s = status();
    assert!(
        shown,
        "the waiting job is not on /status: {s}\n{}",
        d.log_text()
    );
    let job = s["retrying"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["file"] == "waits.img")
        .unwrap()
        .clone();
    assert!(
        job["reason"].as_str().unwrap_or_default().contains("space"),
        "{job}"
    );
    assert!(job["next_attempt_in_secs"].as_u64().is_some(), "{job}");
    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || site
            .done()
            .join("waits.img")
            .exists()),
        "not shipped once there was room:\n{}",
        d.log_text()
    );
    assert_eq!(file_crc(&site.root.join("full/waits.img")), crc);
    assert!(wait_until(Duration::from_secs(20), || readyz().0 == 200));
}

/// A weak spot: an endpoint that refuses connections and one whose name does
/// not resolve both read "error sending request", counted as reason="reset".
/// Now each says which, in the log and on `/readyz`, and is counted under its
/// own reason.
#[test]
fn connection_failures_say_which() {
    let closed = free_port();
    let keys = "access_key_id = \"k\"\nsecret_access_key = \"s\"\nallow_http = true\n";
    let site = Site::new(&format!(
        "[transfer]\nmax_retries = 1\nretry_base_ms = 10\nretry_max_ms = 20\n{}{}",
        s3_dest(
            "refused",
            "bkt-a",
            "p",
            &format!("http://127.0.0.1:{closed}"),
            keys
        ),
        s3_dest(
            "nohost",
            "bkt-b",
            "p",
            "http://no-such-host.invalid:8333",
            keys
        ),
    ));
    let d = site.daemon();
    drop_image(&site.spool, "nowhere.img", 6 * MIB, 1240);
    let counted = wait_until(Duration::from_secs(60), || {
        site.metric(
            "ferry_part_retries_total{destination=\"refused\",reason=\"connection_refused\"}",
        ) >= 1
            && site.metric("ferry_part_retries_total{destination=\"nohost\",reason=\"dns\"}") >= 1
    });
    let metrics = http_get(site.metrics_port, "/metrics")
        .map(|r| r.1)
        .unwrap_or_default();
    let retries: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ferry_part_retries_total"))
        .collect();
    assert!(counted, "retries counted as {retries:?}\n{}", d.log_text());
    let (_, readyz) = http_get(site.metrics_port, "/readyz").unwrap_or_default();
    let log = d.log_text();
    for text in [&readyz, &log] {
        assert!(
            text.contains("connection refused") && text.contains("no such host"),
            "{text}"
        );
    }
}

/// A weak spot: SIGTERM while every request is waiting out a retry pause took
/// the whole shutdown_timeout_secs although nothing was in flight. Now the
/// daemon stops at once, and the file stays in active/ to resume.
#[test]
fn sigterm_during_a_retry_wait_stops_at_once() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("retrywait");
    let relay = Relay::start(&s3);
    relay.set(r#"{"refuse": true}"#);
    let site = Site::with_daemon(
        "shutdown_timeout_secs = 30",
        &format!(
            "[transfer]\nretry_base_ms = 20000\nretry_max_ms = 20000\n{}",
            s3_dest("ashburn", &s3.buckets[0], &prefix, &relay.endpoint(), "")
        ),
    );
    let mut d = site.daemon();
    drop_image(&site.spool, "pausing.img", 6 * MIB, 1250);
    assert!(
        wait_until(Duration::from_secs(30), || d
            .log_text()
            .contains("retrying in")),
        "no retry:\n{}",
        d.log_text()
    );
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(40));
    let took = t.elapsed();
    eprintln!("stopped after {took:?}");
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(site.active().join("pausing.img").exists());
}

/// Found in review: a destination failing for a passing reason keeps its
/// upload for the next attempt, but when another destination fails for good
/// the job ends for good too (here: wrong credentials at another), and the
/// kept upload was left open with its journal record gone. Now a job that ends
/// aborts every upload it still has.
#[test]
fn a_job_that_ends_for_good_leaves_no_upload_open() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("ended");
    let relay = Relay::start(&s3);
    // Every part to the first destination is answered 503: it keeps its upload.
    relay.set(r#"{"part_error_every": 1, "error_status": 503}"#);
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"5MiB\"\nmax_retries = 1\nretry_base_ms = 10\nretry_max_ms = 20\n{}{}",
        s3_dest("busy", &s3.buckets[0], &prefix, &relay.endpoint(), ""),
        s3_dest(
            "refused",
            &s3.buckets[1],
            &prefix,
            &s3.endpoint,
            "access_key_id = \"nobody\"\nsecret_access_key = \"wrong\"\n"
        )
    ));
    let d = site.daemon();
    let name = "ended.qcow2";
    drop_image(&site.spool, name, 12 * MIB, 1260);
    let Some(report) = site.error_report(name, Duration::from_secs(60)) else {
        panic!("the job did not end:\n{}", d.log_text())
    };
    assert!(reason(&report).contains("refused"), "{report}");
    assert_nothing_left(&s3, &prefix, &site, "the kept upload was left open");
}

/// A weak spot: a part size the stores cannot take was silently changed
/// (100 TiB cut to 5 GiB), and one larger than memory_limit let the daemon
/// start and then failed every image. Both are config errors at start now.
#[test]
fn impossible_part_sizes_are_refused_at_start() {
    for (transfer, needle) in [
        ("part_size = \"100TiB\"", "5 GiB"),
        ("part_size = \"1MiB\"", "5 MiB"),
        (
            "part_size = \"1GiB\"\nmemory_limit = \"512MiB\"",
            "memory_limit",
        ),
    ] {
        let site = Site::new(&format!(
            "[transfer]\n{transfer}\n[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n"
        ));
        let mut d = site.daemon();
        let status = d.wait_exit(Duration::from_secs(15));
        let log = d.log_text();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{transfer}: the daemon started"
        );
        assert!(
            log.contains("part_size") && log.contains(needle),
            "{transfer}: {log}"
        );
    }
}

/// No upload left open under `prefix` in the first bucket, and no journal
/// record: what a job that ended for good must leave.
fn assert_nothing_left(s3: &S3, prefix: &str, site: &Site, what: &str) {
    assert_eq!(
        s3.open_uploads(&s3.buckets[0], prefix),
        Vec::<String>::new(),
        "{what}"
    );
    assert!(
        list(&site.root.join("state/jobs"))
            .iter()
            .all(|n| !n.ends_with(".json")),
        "a journal record was left"
    );
}

/// Found in review: a job waiting to be tried again keeps its uploads and its
/// journal record. When its file is then replaced in `active/` (another file
/// renamed over it), the next attempt refuses it, and must also abort what
/// the earlier attempt left open and forget its record; otherwise the
/// uploads stay open, and the next file of that name is taken for a changed
/// one.
#[test]
fn a_file_replaced_while_its_job_waits_leaves_nothing_open() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("waits");
    let relay = Relay::start(&s3);
    // Every part is answered 503: the job waits for another attempt (15 s).
    relay.set(r#"{"part_error_every": 1, "error_status": 503}"#);
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"5MiB\"\nmax_retries = 1\nretry_base_ms = 10\nretry_max_ms = 20\n{}",
        s3_dest("busy", &s3.buckets[0], &prefix, &relay.endpoint(), ""),
    ));
    let d = site.daemon();
    let name = "waits.qcow2";
    drop_image(&site.spool, name, 12 * MIB, 1270);
    assert!(
        wait_until(Duration::from_secs(60), || d
            .log_text()
            .contains("failing for a passing reason")),
        "the job never waited for another attempt:\n{}",
        d.log_text()
    );
    assert_eq!(
        s3.open_uploads(&s3.buckets[0], &prefix).len(),
        1,
        "the waiting job keeps its upload"
    );
    let intruder = site.root.join("intruder.qcow2");
    random_file(&intruder, 6 * MIB, 1271);
    std::fs::rename(&intruder, site.active().join(name)).unwrap();
    let Some(report) = site.error_report(name, Duration::from_secs(60)) else {
        panic!("the replaced file was not refused:\n{}", d.log_text())
    };
    assert!(reason(&report).contains("renamed over it"), "{report}");
    assert_nothing_left(
        &s3,
        &prefix,
        &site,
        "the waiting job's upload was left open",
    );
}
