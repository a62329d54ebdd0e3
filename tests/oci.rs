//! `oci://` destinations end to end, through the OCI Object Storage double
//! (`tests/support/oci_double.py`, which checks every signature and every
//! part's CRC32C as the service does) and the fault relay in front of it:
//! a 1 GiB push to OCI, S3 and a directory at once; a flipped bit in a part;
//! kill -9 in the middle of a daemon's upload; and the refusals an operator
//! meets first (a wrong key, a wrong fingerprint, an unknown bucket, a clock
//! 10 minutes off).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use ferry::config::TransferConfig;
use ferry::store::Destination;

/// The object `key` of bucket `images` as the double holds it, read through
/// ferry's own client (a signed GET).
fn oci_object(double: &OciDouble, url: &str, name: &str) -> Vec<u8> {
    let dest = Destination::new(
        "check",
        &double.destination_config(url),
        &TransferConfig::default(),
        5 << 20,
    )
    .unwrap();
    block_on(dest.get_small(name)).unwrap().to_vec()
}

/// Sends other bytes as part `index` of upload `upload_id` (parts of
/// `part_bytes`), as another writer would.
fn replace_part(
    double: &OciDouble,
    url: &str,
    name: &str,
    upload_id: &str,
    index: u32,
    part_bytes: u64,
) {
    use ferry::chunk::{self, Budget, FirstReads, PartLimits, PartPlan};
    let dir = tmpdir();
    let other = dir.path().join("other.img");
    random_file(&other, part_bytes * (index as u64 + 1), 77);
    let source = ferry::source::Source::open(&other).unwrap();
    let plan = PartPlan::new(source.size_bytes, part_bytes, PartLimits::S3).unwrap();
    let reader = chunk::reader(
        ferry::config::ReaderKind::Pread,
        source,
        plan,
        std::sync::Arc::new(FirstReads::new(plan.count)),
        chunk::Cache::Keep,
    );
    let dest = Destination::new(
        "other",
        &double.destination_config(url),
        &TransferConfig::default(),
        part_bytes,
    )
    .unwrap();
    block_on(async {
        let part = chunk::read(reader, &Budget::new(4 * part_bytes), index)
            .await
            .unwrap();
        dest.put_part(name, upload_id, &part).await.unwrap();
    });
}

fn equals_file(bytes: &[u8], file: &Path) -> bool {
    let want = std::fs::read(file).unwrap();
    bytes.len() == want.len() && bytes == want.as_slice()
}

/// Issue 14, test 1: `ferry push` of a 1 GiB image to `oci://`, `s3://` and
/// `file://` at once. Exit 0, every copy byte-identical, and each manifest
/// says what the store checked: OCI the whole object's CRC32C.
#[test]
fn one_gib_to_oci_s3_and_a_directory_at_once() {
    let Some(s3) = s3() else { return };
    let double = OciDouble::start();
    let dir = tmpdir();
    let img = dir.path().join("disk-1g.qcow2");
    let crc = random_file(&img, 1 << 30, 14);
    let prefix = unique_prefix("oci-gib");
    let cfg = write(
        &dir.path().join("ferry.toml"),
        &format!(
            "[transfer]\npart_size = \"64MiB\"\n{}\n{}\n[destinations.local]\nurl = \"file://{}/local/\"\n",
            double.table("ashburn", "oci://images/exports/"),
            s3_dest("phoenix", &s3.buckets[0], &prefix, &s3.endpoint, ""),
            dir.path().display()
        ),
    );
    let mut cmd = ferry();
    cmd.arg("push")
        .arg("--force")
        .arg(&img)
        .arg("--config")
        .arg(&cfg);
    let out = run(s3.env(&mut cmd));
    assert!(out.status.success(), "{out:?}");

    // The OCI copy, and its manifest: the server's whole-object CRC32C.
    let url = "oci://images/exports/";
    assert!(equals_file(
        &oci_object(&double, url, "disk-1g.qcow2"),
        &img
    ));
    let m: serde_json::Value =
        serde_json::from_slice(&oci_object(&double, url, "disk-1g.qcow2.manifest.json")).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&m).unwrap());
    assert_eq!(m["manifest_version"], 6);
    assert_eq!(m["crc32c"], format!("{crc:08x}"));
    assert_eq!(m["part_count"], 16);
    assert_eq!(m["server_verified"], "crc32c-whole-object");
    assert_eq!(m["destination"]["key"], "exports/disk-1g.qcow2");
    assert_eq!(
        m["destination"]["object_url"],
        format!(
            "{}/n/{OCI_NAMESPACE}/b/images/o/exports/disk-1g.qcow2",
            double.endpoint()
        )
    );

    // The S3 copy: its parts were checked by the payload checksum only.
    let store = s3.store(&s3.buckets[0]);
    let key = format!("{prefix}/disk-1g.qcow2");
    assert!(s3_object_equals(&store, &key, &img));
    let m: serde_json::Value =
        serde_json::from_slice(&s3_get(&store, &format!("{key}.manifest.json")).unwrap()).unwrap();
    assert_eq!(m["server_verified"], "crc64nvme-per-part");

    // The directory: nothing but ferry checked it.
    let local = dir.path().join("local");
    assert!(same_bytes(&img, &local.join("disk-1g.qcow2")));
    let m = manifest(&local.join("disk-1g.qcow2.manifest.json"));
    assert_eq!(m["server_verified"], "none");
}

/// Issue 14, test 2: one bit flipped in one part on its way to OCI: the
/// service refuses the part (its CRC32C is not the one ferry sent), ferry
/// sends it again, counts a checksum mismatch, and the object is exact.
/// 503s on the way are retried too.
#[test]
fn a_flipped_bit_in_a_part_is_refused_and_sent_again() {
    let double = OciDouble::start();
    let relay = Relay::to(double.port);
    // And every 4th part answered 503, as a busy service does.
    relay.set(r#"{"flip_bit_in_parts": 1, "part_error_every": 4, "error_status": 503}"#);
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"8MiB\"\nretry_base_ms = 50\n[destinations.ashburn]\nurl = \"oci://images/flip/\"\n{}",
        double.table_keys(&relay.endpoint())
    ));
    let _d = site.daemon();
    // /readyz asks the bucket (GetBucket, signed) and is content.
    assert!(
        wait_until(Duration::from_secs(20), || http_get(
            site.metrics_port,
            "/readyz"
        )
        .is_some_and(|r| r.0 == 200)),
        "{:?}",
        http_get(site.metrics_port, "/readyz")
    );
    let crc = drop_image(&site.spool, "flip.qcow2", 40 << 20, 21);
    assert!(
        site.wait_done("flip.qcow2", Duration::from_secs(60)),
        "not shipped: {:?}",
        site.error_report("flip.qcow2", Duration::from_secs(1))
    );
    assert_eq!(relay.injected("flip"), 1, "{}", relay.log());
    assert!(
        site.metric("ferry_part_retries_total{destination=\"ashburn\",reason=\"slow_down\"}") >= 1,
        "the 503s were not retried as slow_down"
    );
    assert_eq!(
        site.metric("ferry_checksum_mismatches_total{destination=\"ashburn\"}"),
        1
    );
    let bytes = oci_object(&double, "oci://images/flip/", "flip.qcow2");
    assert_eq!(crc32c::crc32c(&bytes), crc);
    assert!(equals_file(&bytes, &site.done().join("flip.qcow2")));
}

/// Issue 14, test 3: kill -9 in the middle of a daemon's upload to
/// `oci://` (at the 20th part sent, so the kill lands mid-upload on any
/// machine); after a restart OCI's ListParts confirms the journaled parts,
/// exactly the parts the journal does not hold are sent again (seen at the
/// relay), and the object is exact.
#[test]
fn kill_9_mid_upload_to_oci_sends_only_unjournaled_parts_again() {
    let double = OciDouble::start();
    let relay = Relay::to(double.port);
    // 64 MiB/s a connection: the 20 parts before the kill take over a
    // second, longer than the journal's 500 ms between writes (seen: with
    // nothing slowing them, all 20 went within 500 ms of the upload's first
    // record, and none was journaled).
    relay.set(r#"{"log_requests": true, "part_bytes_per_sec": 67108864}"#);
    let site = Site::new(&format!(
        "[transfer]\npart_size = \"8MiB\"\n[destinations.ashburn]\nurl = \"oci://images/kill9/\"\nparallel_parts = 2\n{}",
        double.table_keys(&relay.endpoint())
    ));
    let staged = site.root.join("big.qcow2");
    let crc = random_file(&staged, 512 << 20, 9);
    let log = site.root.join("daemon.log");
    let mut d = Daemon::start_with(&site.config, &log, |c| {
        c.env("FERRY_CRASH_AT", "part:20");
    });
    std::fs::rename(&staged, site.spool.join("big.qcow2")).unwrap();
    assert!(
        d.wait_exit(Duration::from_secs(120)).is_some(),
        "the daemon did not reach its 20th part"
    );
    drop(d);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(site.root.join("state/jobs/big.qcow2.json")).unwrap(),
    )
    .unwrap();
    let journaled: std::collections::BTreeSet<u64> = record["destinations"]["ashburn"]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["index"].as_u64().unwrap())
        .collect();
    let held = journaled.len();
    // The journal is written a little behind the parts (see journal.rs).
    assert!((1..64).contains(&held), "{held} parts journaled");
    // While the daemon is down, one journaled part is replaced in the store
    // by other bytes (another writer, or a part the store lost and took
    // again): ListParts shows another ETag, and that part goes again too.
    let replaced = *journaled.iter().next().unwrap();
    let upload_id = record["destinations"]["ashburn"]["upload_id"]
        .as_str()
        .unwrap()
        .to_string();
    replace_part(
        &double,
        "oci://images/kill9/",
        "big.qcow2",
        &upload_id,
        replaced as u32,
        8 << 20,
    );
    // The parts sent from here on.
    relay.clear_log();

    let d2 = site.daemon();
    assert!(
        site.wait_done("big.qcow2", Duration::from_secs(120)),
        "not finished after the restart"
    );
    let sent_again: std::collections::BTreeSet<u64> = relay
        .log()
        .lines()
        .filter(|l| l.starts_with("req PUT"))
        .filter_map(|l| {
            let n = l.split("uploadPartNum=").nth(1)?;
            n.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map(|n| n - 1)
        .collect();
    let mut unjournaled: std::collections::BTreeSet<u64> =
        (0..64).filter(|i| !journaled.contains(i)).collect();
    unjournaled.insert(replaced);
    eprintln!(
        "{held} parts journaled at the kill; {} sent after the restart",
        sent_again.len()
    );
    assert!(
        d2.log_text().contains(&format!(
            "resuming upload of big.qcow2: {} of 64 parts already sent",
            held - 1
        )),
        "{}",
        d2.log_text()
    );
    assert!(
        relay
            .log()
            .lines()
            .any(|l| l.starts_with("req GET") && l.contains("uploadId=")),
        "the journaled parts were not listed: {}",
        relay.log()
    );
    assert!(
        d2.log_text().contains(&format!(
            "1 of {held} journaled parts of big.qcow2 are not in the store as sent"
        )),
        "{}",
        d2.log_text()
    );
    assert_eq!(
        sent_again, unjournaled,
        "only the unjournaled parts and the replaced one go again"
    );
    let bytes = oci_object(&double, "oci://images/kill9/", "big.qcow2");
    assert_eq!(crc32c::crc32c(&bytes), crc);
}

/// Issue 14, test 4: a wrong key, a wrong fingerprint, an unknown bucket and
/// a clock 10 minutes off. Each destination fails on one line that says
/// what to check, the image goes to `failed/` with advice, and nothing of
/// the key is printed anywhere.
#[test]
fn refusals_say_what_to_check_and_never_print_the_key() {
    let double = OciDouble::start();
    let late = OciDouble::start_with(|c| c["clock_offset_secs"] = 600.into());
    // Two more profiles in the double's config file: another key, and the
    // right key under a fingerprint OCI does not know.
    let other_key = double.dir.path().join("other.pem");
    oci_key(&other_key);
    let mut profiles = std::fs::read_to_string(&double.config_file).unwrap();
    profiles += &format!(
        "\n[WRONGKEY]\nkey_file={}\n\n[WRONGFP]\nfingerprint=aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99\n",
        other_key.display()
    );
    std::fs::write(&double.config_file, profiles).unwrap();
    let table = |name: &str, url: &str, d: &OciDouble, extra: &str| {
        format!(
            "[destinations.{name}]\nurl = \"{url}\"\n{}{extra}\n",
            d.table_keys(&d.endpoint())
        )
    };
    let site = Site::new(&format!(
        "{}{}{}{}",
        table(
            "wrongkey",
            "oci://images/",
            &double,
            "profile = \"WRONGKEY\"\n"
        ),
        table(
            "wrongfp",
            "oci://images/",
            &double,
            "profile = \"WRONGFP\"\n"
        ),
        table("nobucket", "oci://nosuch/", &double, ""),
        table("skewed", "oci://images/", &late, ""),
    ));
    let d = site.daemon();
    drop_image(&site.spool, "refused.qcow2", 12 << 20, 4);
    let report = site
        .error_report("refused.qcow2", Duration::from_secs(60))
        .expect("the image goes to failed/ with a report");
    assert!(site.failed().join("refused.qcow2").exists());
    let advice = report["what_to_do"].as_str().unwrap_or_default();
    assert!(!advice.is_empty(), "{report}");
    let reasons: std::collections::BTreeMap<String, String> = report["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["destination"].as_str().unwrap().to_string(),
                d["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    eprintln!("{reasons:#?}");
    for (dest, needles) in [
        (
            "wrongkey",
            &[
                "401",
                "NotAuthenticated",
                "profile [WRONGKEY]",
                OCI_FINGERPRINT,
                "opc-request-id",
            ][..],
        ),
        (
            "wrongfp",
            &[
                "401",
                "profile [WRONGFP]",
                "aa:bb:cc:dd:ee:ff",
                "fingerprint",
                "opc-request-id",
            ],
        ),
        (
            "nobucket",
            &[
                "404",
                "BucketNotFound",
                "bucket nosuch",
                OCI_NAMESPACE,
                "us-ashburn-1",
                "opc-request-id",
            ],
        ),
        (
            "skewed",
            &["401", "s behind OCI's", "timedatectl", "opc-request-id"],
        ),
    ] {
        let why = reasons
            .get(dest)
            .unwrap_or_else(|| panic!("no reason for {dest}"));
        assert!(!why.contains('\n'), "{dest}: one line: {why}");
        for n in needles {
            assert!(why.contains(n), "{dest}: {n:?} not in {why}");
        }
    }
    // The clock's offset is measured from the answer's Date (whole seconds).
    let skew: u64 = reasons["skewed"]
        .split("this host's clock is ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the offset in seconds");
    assert!((598..=601).contains(&skew), "{skew}");
    // /readyz asks each bucket: not ready, naming every destination and why.
    let (code, body) = http_get(site.metrics_port, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    for (dest, needle) in [
        ("wrongkey", "401"),
        ("wrongfp", "401"),
        ("nobucket", "BucketNotFound"),
        ("skewed", "401"),
    ] {
        assert!(
            body.lines().any(|l| l.contains(dest) && l.contains(needle)),
            "{dest}: {body}"
        );
    }
    // The daemon's log says each on one line too, and nothing of any key
    // appears in the log or the report.
    let log = d.log_text();
    for dest in reasons.keys() {
        assert!(
            log.lines()
                .any(|l| l.contains(dest.as_str()) && l.contains("opc-request-id")),
            "{dest}: {log}"
        );
    }
    let text = format!("{log}{report}{body}");
    for key in [&double.key_file, &other_key] {
        let pem = std::fs::read_to_string(key).unwrap();
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!text.contains(line), "key material in the output: {line}");
        }
    }
}
