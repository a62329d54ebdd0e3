//! Images already in a bucket as sources (`ferry push s3://...`,
//! `oci://...`): read once by ranged GETs and fanned out to every
//! destination, checked against the checksum the source's store keeps.
//! Against SeaweedFS (through the fault relay, which counts the bytes each
//! GET served and flips bits in them) and the OCI double.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Puts `file` at `bucket/key` of the S3 server behind `endpoint`, with its
/// full-object CRC32C in `x-amz-checksum-crc32c`, which the server keeps (a
/// single PUT, as an export or a producer's upload would make it).
fn put_with_crc32c(endpoint: &str, bucket: &str, key: &str, file: &Path) {
    use base64::Engine;
    let crc = base64::engine::general_purpose::STANDARD.encode(file_crc(file).to_be_bytes());
    let out = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-X",
            "PUT",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
        ])
        .arg("--user")
        .arg(format!("{}:{}", key_id(), secret()))
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("-H")
        .arg(format!("x-amz-checksum-crc32c: {crc}"))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("{endpoint}/{bucket}/{key}"))
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "PUT {key}: {out:?}");
}

/// A config whose `[sources.exports]` reaches `bucket/prefix/` through
/// `endpoint`, with `destinations` (TOML tables) and small parts.
fn config(dir: &Path, endpoint: &str, bucket: &str, prefix: &str, destinations: &str) -> String {
    let text = format!(
        "[transfer]\npart_size = \"5MiB\"\nmemory_limit = \"64MiB\"\nretry_base_ms = 50\n\n\
         [sources.exports]\nurl = \"s3://{bucket}/{prefix}/\"\nendpoint = \"{endpoint}\"\n\
         access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\n{destinations}",
        key_id(),
        secret()
    );
    write(&dir.join("ferry.toml"), &text).display().to_string()
}

/// Bytes the relay's GETs answered 206 served, as it logged them.
fn served(relay: &Relay) -> u64 {
    relay
        .log()
        .lines()
        .filter_map(|l| l.strip_prefix("get 206 "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Issue 16, case 1: one object to two directories and an S3 bucket at
/// once. Every copy is the object byte for byte, the object was read once
/// (the bytes the server served through the relay: the image and a few
/// inspection reads, not three times the image), and each manifest names
/// the source and the CRC32C its store keeps.
#[test]
fn an_object_is_read_once_and_shipped_to_every_destination() {
    let Some(s3) = s3() else { return };
    let dir = tmpdir();
    let prefix = unique_prefix("src-once");
    boot_qcow2(dir.path(), "disk.qcow2", 40 << 20);
    let image = dir.path().join("disk.qcow2");
    let size = std::fs::metadata(&image).unwrap().len();
    assert!(size > 30 << 20, "the image is several parts: {size}");
    let (src_bucket, dst_bucket) = (&s3.buckets[2], &s3.buckets[0]);
    put_with_crc32c(
        &s3.endpoint,
        src_bucket,
        &format!("{prefix}/disk.qcow2"),
        &image,
    );
    let relay = Relay::start(&s3);
    relay.set(r#"{"count_gets": true}"#);
    let out_a = dir.path().join("a");
    let out_b = dir.path().join("b");
    let tables = format!(
        "[destinations.a]\nurl = \"file://{}/\"\n[destinations.b]\nurl = \"file://{}/\"\n{}",
        out_a.display(),
        out_b.display(),
        s3_dest(
            "s3",
            dst_bucket,
            &prefix,
            &s3.endpoint,
            &format!(
                "access_key_id = \"{}\"\nsecret_access_key = \"{}\"",
                key_id(),
                secret()
            )
        )
    );
    let cfg = config(dir.path(), &relay.endpoint(), src_bucket, &prefix, &tables);
    let url = format!("s3://{src_bucket}/{prefix}/disk.qcow2");
    let out = run(ferry().args(["push", "-c", &cfg, &url]));
    assert_eq!(out.status.code(), Some(0));
    assert!(same_bytes(&image, &out_a.join("disk.qcow2")));
    assert!(same_bytes(&image, &out_b.join("disk.qcow2")));
    assert!(s3_object_equals(
        &s3.store(dst_bucket),
        &format!("{prefix}/disk.qcow2"),
        &image
    ));
    // Read once: the parts' ranges cover the image exactly once; inspection
    // adds a few small blocks (headers, tables, the boot sector).
    let got = served(&relay);
    assert!(
        got >= size && got <= size + (4 << 20),
        "the server served {got} bytes for an image of {size}:\n{}",
        relay.log()
    );
    let crc = format!("{:08x}", file_crc(&image));
    for m in [
        manifest(&out_a.join("disk.qcow2.manifest.json")),
        manifest(&out_b.join("disk.qcow2.manifest.json")),
    ] {
        assert_eq!(m["crc32c"], crc.as_str());
        assert_eq!(m["source"]["url"], url.as_str());
        assert_eq!(m["source"]["stored_crc32c"], crc.as_str());
        assert_eq!(m["source"]["checked"], "crc32c-stored");
        assert_eq!(m["image"]["format"], "qcow2", "inspected by ranged reads");
    }
}

/// Issue 16, case 2: a bit flipped in a part as it comes from the source.
/// The parts read do not combine to the CRC32C the source's store keeps, so
/// every part is read again and the damaged one sent again: the push
/// verifies with the right bytes. With every read damaged, nothing
/// verifies and nothing is left at the destinations.
#[test]
fn a_range_damaged_on_its_way_is_read_again_and_never_verified() {
    let Some(s3) = s3() else { return };
    let dir = tmpdir();
    let prefix = unique_prefix("src-flip");
    boot_qcow2(dir.path(), "disk.qcow2", 24 << 20);
    let image = dir.path().join("disk.qcow2");
    let src_bucket = &s3.buckets[2];
    put_with_crc32c(
        &s3.endpoint,
        src_bucket,
        &format!("{prefix}/disk.qcow2"),
        &image,
    );
    let relay = Relay::start(&s3);
    // Parts are 5 MiB; inspection reads blocks of at most 256 KiB.
    relay.set(r#"{"flip_bit_in_gets": 1, "flip_min_bytes": 4194304}"#);
    let out_a = dir.path().join("a");
    let out_b = dir.path().join("b");
    let tables = format!(
        "[destinations.a]\nurl = \"file://{}/\"\n[destinations.b]\nurl = \"file://{}/\"\n",
        out_a.display(),
        out_b.display()
    );
    let cfg = config(dir.path(), &relay.endpoint(), src_bucket, &prefix, &tables);
    let url = format!("s3://{src_bucket}/{prefix}/disk.qcow2");
    let out = run(ferry().args(["push", "-c", &cfg, &url]));
    assert_eq!(relay.injected("flipget"), 1, "{}", relay.log());
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a read was corrupted on its way; reading every part again"),
        "{stderr}"
    );
    assert!(same_bytes(&image, &out_a.join("disk.qcow2")));
    assert!(same_bytes(&image, &out_b.join("disk.qcow2")));

    // Every part read damaged, the re-reads too: nothing may verify.
    let (out_c, out_d) = (dir.path().join("c"), dir.path().join("d"));
    let tables = format!(
        "[destinations.c]\nurl = \"file://{}/\"\n[destinations.d]\nurl = \"file://{}/\"\n",
        out_c.display(),
        out_d.display()
    );
    let cfg = config(dir.path(), &relay.endpoint(), src_bucket, &prefix, &tables);
    relay.set(r#"{"flip_bit_in_gets": 100000, "flip_min_bytes": 4194304}"#);
    let out = run(ferry().args(["push", "-c", &cfg, &url]));
    assert_eq!(out.status.code(), Some(1));
    let errors = error_lines(&out).join("\n");
    assert!(
        errors.contains("FAILED c") && errors.contains("FAILED d"),
        "{errors}"
    );
    assert!(
        errors.contains("its store keeps"),
        "the failure names the stored checksum: {errors}"
    );
    for d in [&out_c, &out_d] {
        assert!(
            list(d).is_empty(),
            "nothing was completed at {}: {:?}",
            d.display(),
            list(d)
        );
    }
}

/// An `oci://` object (in the double, with the CRC32C OCI keeps) shipped to
/// a directory: every range read by its ETag, the copy exact, the manifest
/// naming OCI's stored CRC32C. A missing object is refused in plain words.
#[test]
fn an_oci_object_ships_checked_against_the_crc32c_oci_keeps() {
    let double = OciDouble::start();
    let dir = tmpdir();
    boot_qcow2(dir.path(), "web01.qcow2", 20 << 20);
    let image = dir.path().join("web01.qcow2");
    let src = ferry::store::Destination::new(
        "put",
        &double.destination_config("oci://spare/exports/"),
        &ferry::config::TransferConfig::default(),
        5 << 20,
    )
    .unwrap();
    block_on(src.put_small(
        "web01.qcow2",
        bytes::Bytes::from(std::fs::read(&image).unwrap()),
    ))
    .unwrap();
    let out_a = dir.path().join("a");
    let text = format!(
        "[transfer]\npart_size = \"5MiB\"\n\n[sources.exports]\nurl = \"oci://spare/exports/\"\n{}\n\
         [destinations.a]\nurl = \"file://{}/\"\n",
        double.table_keys(&double.endpoint()),
        out_a.display()
    );
    let cfg = write(&dir.path().join("ferry.toml"), &text);
    let cfg = cfg.to_str().unwrap();
    let out = run(ferry().args(["push", "-c", cfg, "oci://spare/exports/web01.qcow2"]));
    assert_eq!(out.status.code(), Some(0));
    assert!(same_bytes(&image, &out_a.join("web01.qcow2")));
    let m = manifest(&out_a.join("web01.qcow2.manifest.json"));
    let crc = format!("{:08x}", file_crc(&image));
    assert_eq!(m["source"]["stored_crc32c"], crc.as_str());
    assert_eq!(m["source"]["checked"], "crc32c-stored");
    assert_eq!(m["source"]["url"], "oci://spare/exports/web01.qcow2");

    let out = run(ferry().args(["push", "-c", cfg, "oci://spare/exports/nope.qcow2"]));
    assert_eq!(out.status.code(), Some(2));
    let errors = error_lines(&out).join("\n");
    assert!(errors.contains("no such object"), "{errors}");
}

/// An S3 object whose store keeps no CRC32C (a plain single PUT): its ETag
/// is its MD5, which the parts read must give. A bit flipped on the way is
/// caught by it and the part read and sent again.
#[test]
fn an_object_without_a_crc32c_is_checked_against_the_md5_of_its_etag() {
    let Some(s3) = s3() else { return };
    let dir = tmpdir();
    let prefix = unique_prefix("src-md5");
    boot_qcow2(dir.path(), "disk.qcow2", 24 << 20);
    let image = dir.path().join("disk.qcow2");
    let src_bucket = &s3.buckets[2];
    let key = format!("{prefix}/disk.qcow2");
    let etag = block_on(async {
        use object_store::ObjectStoreExt;
        let store = s3.store(src_bucket);
        store
            .put(&obj_path(&key), std::fs::read(&image).unwrap().into())
            .await
            .unwrap();
        store.head(&obj_path(&key)).await.unwrap().e_tag.unwrap()
    });
    let relay = Relay::start(&s3);
    relay.set(r#"{"flip_bit_in_gets": 1, "flip_min_bytes": 4194304}"#);
    let out_a = dir.path().join("a");
    let tables = format!("[destinations.a]\nurl = \"file://{}/\"\n", out_a.display());
    let cfg = config(dir.path(), &relay.endpoint(), src_bucket, &prefix, &tables);
    let url = format!("s3://{src_bucket}/{key}");
    let out = run(ferry().args(["push", "-c", &cfg, &url]));
    assert_eq!(relay.injected("flipget"), 1, "{}", relay.log());
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("do not give the MD5 its store keeps"),
        "{stderr}"
    );
    assert!(same_bytes(&image, &out_a.join("disk.qcow2")));
    let m = manifest(&out_a.join("disk.qcow2.manifest.json"));
    assert_eq!(m["source"]["checked"], "md5-etag");
    assert_eq!(m["source"]["stored_md5"], etag.trim_matches('"'));
    assert!(m["source"].get("stored_crc32c").is_none());
}
