//! Bucket sources in the daemon (`[sources.NAME]`): several daemons share
//! one export bucket through lease objects made with conditional writes,
//! against SeaweedFS (which honours `If-None-Match: *` and `If-Match`).
//! Every image is shipped exactly once, a dead daemon's object is taken
//! over once its lease expires, and a refused image gets a failed marker
//! and is not taken again.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A daemon's directory: spool, state, config with one bucket source and
/// the destinations `tables` (lines of TOML).
struct Host {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
    metrics_port: u16,
}

impl Host {
    fn new(source: &str, lease_secs: u64, tables: &str) -> Host {
        let dir = tmpdir();
        let root = dir.path().to_path_buf();
        let metrics_port = free_port();
        let config = write(
            &root.join("ferry.toml"),
            &format!(
                "spool_dir = \"{r}/spool\"\nstate_dir = \"{r}/state\"\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\n\
                 [daemon]\nmax_jobs = 2\n[policy]\nrequire_license_attestation = false\n\
                 [transfer]\npart_size = \"5MiB\"\nmemory_limit = \"64MiB\"\nretry_base_ms = 50\n\
                 {source}\npoll_secs = 1\nsettle_secs = 0\nlease_secs = {lease_secs}\n{tables}",
                r = root.display()
            ),
        );
        Host {
            _dir: dir,
            root,
            config,
            metrics_port,
        }
    }

    fn daemon(&self, log: &str) -> Daemon {
        Daemon::start(&self.config, &self.root.join(log))
    }
}

/// `[sources.exports]` for `bucket/prefix/` at `endpoint`.
fn source_table(endpoint: &str, bucket: &str, prefix: &str) -> String {
    format!(
        "[sources.exports]\nurl = \"s3://{bucket}/{prefix}/\"\nendpoint = \"{endpoint}\"\n\
         access_key_id = \"{}\"\nsecret_access_key = \"{}\"",
        key_id(),
        secret()
    )
}

/// Puts `file` at `key` in `bucket`.
fn put(s3: &S3, bucket: &str, key: &str, file: &Path) {
    let body = std::fs::read(file).unwrap();
    block_on(async {
        use object_store::ObjectStoreExt;
        s3.store(bucket)
            .put(&obj_path(key), body.into())
            .await
            .unwrap();
    });
}

/// The keys under `prefix/.ferry/KIND/` (done, failed, leases).
fn markers(s3: &S3, bucket: &str, prefix: &str, kind: &str) -> Vec<String> {
    s3.keys(bucket, &format!("{prefix}/.ferry/{kind}/"))
}

/// Issue 16, case 3: two daemons watch one bucket holding 20 images. Each
/// image reaches the destination exactly once (one CreateMultipartUpload
/// per key, seen by the relay in front of it), and both did some of them.
#[test]
fn two_daemons_share_one_bucket_and_ship_each_image_once() {
    let Some(s3) = s3() else { return };
    let (src, dst) = (&s3.buckets[2], &s3.buckets[0]);
    let prefix = unique_prefix("shared");
    let dir = tmpdir();
    boot_qcow2(dir.path(), "disk.qcow2", 12 << 20);
    let image = dir.path().join("disk.qcow2");
    let names: Vec<String> = (0..20).map(|i| format!("img{i:02}.qcow2")).collect();
    for n in &names {
        put(&s3, src, &format!("{prefix}/in/{n}"), &image);
    }
    let relay = common::Relay::start(&s3);
    relay.set(r#"{"log_requests": true}"#);
    let tables = s3_dest(
        "region",
        dst,
        &prefix,
        &relay.endpoint(),
        &format!(
            "access_key_id = \"{}\"\nsecret_access_key = \"{}\"",
            key_id(),
            secret()
        ),
    );
    let source = source_table(&s3.endpoint, src, &format!("{prefix}/in"));
    let a = Host::new(&source, 30, &tables);
    let b = Host::new(&source, 30, &tables);
    let da = a.daemon("a.log");
    let db = b.daemon("b.log");
    let all_done = wait_until(Duration::from_secs(180), || {
        markers(&s3, src, &format!("{prefix}/in"), "done").len() == names.len()
    });
    assert!(
        all_done,
        "done: {:?}",
        markers(&s3, src, &format!("{prefix}/in"), "done")
    );
    let log = relay.log();
    for n in &names {
        let key = format!("{prefix}/{n}");
        let creates = log
            .lines()
            .filter(|l| l.starts_with(&format!("req POST /{dst}/{key}?uploads")))
            .count();
        assert_eq!(creates, 1, "{key} was uploaded {creates} times");
        assert!(s3_object_equals(&s3.store(dst), &key, &image), "{key}");
    }
    let claimed = |d: &Daemon| d.log_text().matches("claimed s3://").count();
    let (ca, cb) = (claimed(&da), claimed(&db));
    assert_eq!(ca + cb, names.len(), "each image claimed once: {ca} + {cb}");
    assert!(ca > 0 && cb > 0, "both daemons worked: {ca} and {cb}");
    assert!(markers(&s3, src, &format!("{prefix}/in"), "leases").is_empty());
    // Nothing was deleted: on_success keeps the objects.
    assert_eq!(s3.keys(src, &format!("{prefix}/in/img")).len(), names.len());
}

/// Issue 16, case 4: kill -9 of the daemon holding an object mid-job. The
/// other daemon takes it over once the lease expires, and the object at the
/// destination is exact.
#[test]
fn a_dead_daemons_object_is_taken_over_when_its_lease_expires() {
    let Some(s3) = s3() else { return };
    let (src, dst) = (&s3.buckets[2], &s3.buckets[1]);
    let prefix = unique_prefix("takeover");
    let dir = tmpdir();
    boot_qcow2(dir.path(), "big.qcow2", 40 << 20);
    let image = dir.path().join("big.qcow2");
    put(&s3, src, &format!("{prefix}/in/big.qcow2"), &image);
    // The first daemon's uploads crawl (a slow link), so it is mid-job when killed.
    let slow = common::Relay::start(&s3);
    slow.set(r#"{"part_bytes_per_sec": 1048576}"#);
    let creds = format!(
        "access_key_id = \"{}\"\nsecret_access_key = \"{}\"",
        key_id(),
        secret()
    );
    let source = source_table(&s3.endpoint, src, &format!("{prefix}/in"));
    let a = Host::new(
        &source,
        4,
        &s3_dest("region", dst, &prefix, &slow.endpoint(), &creds),
    );
    let b = Host::new(
        &source,
        4,
        &s3_dest("region", dst, &prefix, &s3.endpoint, &creds),
    );
    let mut da = a.daemon("a.log");
    assert!(
        wait_until(Duration::from_secs(30), || slow.slow_bytes() > 0),
        "the first daemon started uploading"
    );
    da.signal(libc::SIGKILL);
    da.wait_exit(Duration::from_secs(10));
    let lease = markers(&s3, src, &format!("{prefix}/in"), "leases");
    assert_eq!(lease.len(), 1, "the dead daemon's lease is left: {lease:?}");
    let db = b.daemon("b.log");
    assert!(
        wait_until(Duration::from_secs(120), || {
            markers(&s3, src, &format!("{prefix}/in"), "done").len() == 1
        }),
        "the second daemon finished it"
    );
    let log = db.log_text();
    assert!(log.contains("taking over from"), "{log}");
    assert!(s3_object_equals(
        &s3.store(dst),
        &format!("{prefix}/big.qcow2"),
        &image
    ));
}

/// Issue 16, case 5: an image OCI would refuse gets a failed marker with
/// the reason, and is not taken again.
#[test]
fn a_refused_image_in_a_bucket_gets_a_failed_marker_and_stays_there() {
    let Some(s3) = s3() else { return };
    let (src, dst) = (&s3.buckets[2], &s3.buckets[1]);
    let prefix = unique_prefix("refused");
    let dir = tmpdir();
    let vhd = dir.path().join("old.vhd");
    qemu(
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            "old.vhd",
            "8M",
        ],
        dir.path(),
    );
    put(&s3, src, &format!("{prefix}/in/old.vhd"), &vhd);
    let creds = format!(
        "access_key_id = \"{}\"\nsecret_access_key = \"{}\"",
        key_id(),
        secret()
    );
    // A second source whose bucket does not exist: /readyz names it.
    let gone = format!(
        "[sources.gone]\nurl = \"s3://ferry-no-such-bucket/x/\"\nendpoint = \"{}\"\n{creds}\npoll_secs = 1\nsettle_secs = 0\n",
        s3.endpoint
    );
    // The source is listed through a relay that logs each request, so the
    // test can wait for polls rather than for time.
    let lister = common::Relay::start(&s3);
    lister.set(r#"{"log_requests": true}"#);
    let host = Host::new(
        &source_table(&lister.endpoint(), src, &format!("{prefix}/in")),
        30,
        &format!(
            "{gone}{}",
            s3_dest("region", dst, &prefix, &s3.endpoint, &creds)
        ),
    );
    let d = host.daemon("d.log");
    let key = format!("{prefix}/in/.ferry/failed/old.vhd");
    assert!(wait_until(Duration::from_secs(60), || s3_get(
        &s3.store(src),
        &key
    )
    .is_some()));
    let report: serde_json::Value =
        serde_json::from_slice(&s3_get(&s3.store(src), &key).unwrap()).unwrap();
    assert_eq!(report["outcome"], "refused");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("VHD"), "{reason}");
    assert!(report["what_to_do"].as_str().is_some());
    // Five more polls after the marker: it is not claimed again, and
    // nothing was uploaded.
    lister.clear_log();
    let polls = || {
        lister
            .log()
            .lines()
            .filter(|l| l.contains("list-type=2"))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(30), || polls() >= 5),
        "the source was listed again: {}",
        lister.log()
    );
    assert_eq!(d.log_text().matches("claimed s3://").count(), 1);
    assert!(s3.keys(dst, &prefix).is_empty());
    assert!(markers(&s3, src, &format!("{prefix}/in"), "leases").is_empty());
    let (code, body) = http_get(host.metrics_port, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("source gone (s3://ferry-no-such-bucket/x/) cannot be listed"),
        "{body}"
    );
    assert!(!body.contains("source exports"), "{body}");
}

/// A daemon killed while its import waits for OCI. The daemon that takes
/// the object over finds it verified at the destination (its manifest
/// names this version of the object, and the image being imported), sends
/// nothing again, and waits for that image: one image, not two.
#[test]
fn a_taken_over_import_waits_for_the_same_image() {
    let Some(s3) = s3() else { return };
    let double = OciDouble::start_with(|c| c["import_secs"] = serde_json::json!(15));
    let src = &s3.buckets[2];
    let prefix = unique_prefix("import-takeover");
    let dir = tmpdir();
    boot_qcow2(dir.path(), "web.qcow2", 12 << 20);
    let image = dir.path().join("web.qcow2");
    let side = write(
        &dir.path().join("web.qcow2.meta.json"),
        r#"{"os": "Oracle Linux", "os_version": "9", "launch_mode": "PARAVIRTUALIZED"}"#,
    );
    put(&s3, src, &format!("{prefix}/in/web.qcow2"), &image);
    put(&s3, src, &format!("{prefix}/in/web.qcow2.meta.json"), &side);
    let url = format!("oci://images/{prefix}/");
    let tables = double.importing_table("ashburn", &url, "us-ashburn-1", "");
    let source = source_table(&s3.endpoint, src, &format!("{prefix}/in"));
    let a = Host::new(&source, 4, &tables);
    let b = Host::new(&source, 4, &tables);
    let mut da = a.daemon("a.log");
    let dest = ferry::store::Destination::new(
        "check",
        &double.destination_config(&url),
        &ferry::config::TransferConfig::default(),
        5 << 20,
    )
    .unwrap();
    // The image exists and the manifest at the destination names it.
    let importing = wait_until(Duration::from_secs(60), || {
        block_on(dest.get_small("web.qcow2.manifest.json"))
            .is_ok_and(|m| String::from_utf8_lossy(&m).contains("\"importing\""))
    });
    assert!(importing, "the first daemon's import began");
    da.signal(libc::SIGKILL);
    da.wait_exit(Duration::from_secs(10));
    assert_eq!(double.images_created(), 1);
    let db = b.daemon("b.log");
    assert!(
        wait_until(Duration::from_secs(90), || {
            markers(&s3, src, &format!("{prefix}/in"), "done").len() == 1
        }),
        "the second daemon finished it"
    );
    assert_eq!(double.images_created(), 1, "one image, not two");
    let log = db.log_text();
    assert!(log.contains("not sent again"), "{log}");
    assert!(log.contains("being imported already"), "{log}");
    let m: serde_json::Value =
        serde_json::from_slice(&block_on(dest.get_small("web.qcow2.manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["import"]["outcome"], "available", "{m}");
}
