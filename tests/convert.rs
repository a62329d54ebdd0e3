//! Images OCI cannot import, made importable: conversion to QCOW2 by
//! qemu-img (`policy.convert`, `push --convert`) and OVA appliances shipped
//! as their disk. Every image is made by qemu-img at test time, and every
//! shipped conversion is fetched back from SeaweedFS and compared with its
//! original by `qemu-img compare`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A raw disk with an MBR and `mib` MiB of data that does not compress.
fn raw_disk(path: &Path, mib: usize) {
    boot_raw(path, mib << 20);
    let mut b = std::fs::read(path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in b[1 << 20..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    std::fs::write(path, b).unwrap();
}

/// A config for `ferry push` in `d`: its state in `d/state`, one
/// destination, the directory `d/phoenix`.
fn push_config(d: &Path) -> PathBuf {
    write(
        &d.join("ferry.toml"),
        &format!(
            "state_dir = \"{r}/state\"\n[destinations.phoenix]\nurl = \"file://{r}/phoenix/\"\n",
            r = d.display()
        ),
    )
}

/// `qemu-img compare` of `a` (format `fa`) and `b` (format `fb`): its exit
/// status and what it printed.
fn compare(fa: &str, a: &Path, fb: &str, b: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A site shipping to a directory and to SeaweedFS that refuses what OCI
/// cannot import, with `policy` lines in its `[policy]` table.
fn site(s3: &S3, prefix: &str, daemon: &str, policy: &str) -> Site {
    let site = Site::with_daemon(
        daemon,
        &format!(
            "[transfer]\npart_size = \"5MiB\"\nmemory_limit = \"64MiB\"\n\
             [destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n{}",
            s3_dest("frankfurt", &s3.buckets[0], prefix, &s3.endpoint, "")
        ),
    );
    let text = std::fs::read_to_string(&site.config).unwrap();
    write(
        &site.config,
        &text.replace("refuse = false\n", &format!("refuse = true\n{policy}\n")),
    );
    site
}

/// Case 1: a raw disk, a dynamic VHD, a VHDX and a VDI, with conversion on,
/// each ship as a QCOW2 that `qemu-img compare` finds identical to its
/// original once fetched back from the S3 destination; each manifest
/// records the conversion; `/status` shows the phase `converting`.
#[test]
fn raw_vhd_vhdx_and_vdi_ship_as_qcow2_identical_to_their_originals() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("convert");
    let site = site(&s3, &prefix, "max_conversions = 1", "convert = true");
    let work = tmpdir();
    let w = work.path();
    raw_disk(&w.join("web.raw"), 96);
    // (file, qemu's format name, the option that makes it)
    let images = [
        ("web.raw", "raw", None),
        ("db.vhd", "vpc", Some("subformat=dynamic")),
        ("app.vhdx", "vhdx", None),
        ("mail.vdi", "vdi", None),
    ];
    for (name, fmt, opt) in images.iter().skip(1) {
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if let Some(o) = opt {
            args.extend(["-o", o]);
        }
        args.extend(["web.raw", name]);
        qemu(&args, w);
    }
    let d = site.daemon();
    for (name, _, _) in &images {
        spool_copy(&w.join(name), &site.spool);
    }
    // While they wait for the one conversion slot and convert, /status says so.
    let mut seen_converting = false;
    let all_done = wait_until(Duration::from_secs(240), || {
        if let Some((200, body)) = http_get(site.metrics_port, "/status") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            seen_converting |= v["jobs"]
                .as_array()
                .is_some_and(|j| j.iter().any(|j| j["phase"] == "converting"));
        }
        images.iter().all(|(n, _, _)| site.done().join(n).exists())
    });
    assert!(all_done, "not all in done/: {:?}", list(&site.done()));
    assert!(seen_converting, "/status never showed the phase converting");

    let store = s3.store(&s3.buckets[0]);
    for (name, fmt, _) in &images {
        let stem = name.split('.').next().unwrap();
        let object = format!("{stem}.qcow2");
        let fetched: PathBuf = w.join(format!("fetched-{object}"));
        std::fs::write(
            &fetched,
            s3_get(&store, &format!("{prefix}/{object}")).expect("the QCOW2 is in the bucket"),
        )
        .unwrap();
        let (code, said) = compare(fmt, &w.join(name), "qcow2", &fetched);
        assert_eq!(code, 0, "{name} against the shipped {object}: {said}");
        assert!(said.contains("Images are identical"), "{said}");
        // The original went to done/ untouched.
        assert!(same_bytes(&w.join(name), &site.done().join(name)), "{name}");

        let m = manifest(&site.root.join(format!("phoenix/{object}.manifest.json")));
        assert_eq!(m["image"]["format"], "qcow2", "{name}");
        let c = &m["conversion"];
        assert_eq!(c["original_file"], *name);
        assert_eq!(c["original_format"], *fmt);
        assert_eq!(
            c["original_size_bytes"].as_u64(),
            Some(std::fs::metadata(w.join(name)).unwrap().len())
        );
        assert_eq!(c["converter"], "qemu-img");
        assert!(
            c["converter_version"]
                .as_str()
                .is_some_and(|v| v.starts_with("qemu-img version")),
            "{c}"
        );
        assert_eq!(c["command"][0], "qemu-img");
        assert_eq!(c["command"][1], "convert");
        assert!(
            c["command"].as_array().unwrap().iter().any(|a| a == *fmt),
            "the command names the source format: {c}"
        );
        assert_eq!(c["compare"], "identical");
        assert_eq!(c["compare_command"][1], "compare");
        assert_eq!(m["file_size_bytes"], c["converted_size_bytes"]);
    }
    assert_eq!(
        site.metric("ferry_conversions_total{outcome=\"converted\"}"),
        4
    );
    assert_eq!(site.metric("ferry_conversion_duration_seconds_count"), 4);
    // Nothing of the conversions is left in the spool.
    assert_eq!(
        list(&site.spool.join(".ferry/convert")),
        Vec::<String>::new()
    );
    drop(d);
}

/// Case 2: a conversion that cannot fit in its directory is refused before
/// it starts, with the figures, and the original is kept.
#[test]
fn a_conversion_without_room_is_refused_with_the_figures_and_the_original_kept() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("convert-full");
    let site = site(&s3, &prefix, "", "convert = true");
    let Some(_mounted) = Tmpfs::mount(&site.spool.join(".ferry/convert"), "16m") else {
        return;
    };
    let work = tmpdir();
    raw_disk(&work.path().join("big.raw"), 48);
    let d = site.daemon();
    spool_copy(&work.path().join("big.raw"), &site.spool);
    let report = site
        .error_report("big.raw", Duration::from_secs(60))
        .expect("refused with a report");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("needs up to"), "{reason}");
    assert!(
        reason.contains(&format!("{} bytes", 48u64 << 20)) || reason.contains("48.0 MiB"),
        "{reason}"
    );
    assert!(reason.contains("is free there"), "{reason}");
    assert!(
        report["what_to_do"]
            .as_str()
            .unwrap()
            .contains("Free space"),
        "{report}"
    );
    assert!(
        same_bytes(&work.path().join("big.raw"), &site.failed().join("big.raw")),
        "the original is kept in failed/, unchanged"
    );
    assert_eq!(
        list(&site.spool.join(".ferry/convert")),
        Vec::<String>::new()
    );
    assert!(!site.root.join("phoenix/big.qcow2").exists());
    assert_eq!(
        site.metric("ferry_conversions_total{outcome=\"no_space\"}"),
        1
    );
    drop(d);
}

/// An OVF descriptor naming `disks` (file names), with its OS and firmware.
fn ovf(disks: &[&str]) -> String {
    let files: String = disks
        .iter()
        .enumerate()
        .map(|(i, d)| format!("<File ovf:id=\"file{i}\" ovf:href=\"{d}\"/>"))
        .collect();
    let disk_entries: String = disks
        .iter()
        .enumerate()
        .map(|(i, _)| {
            format!("<Disk ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" ovf:capacity=\"64\" ovf:capacityAllocationUnits=\"byte * 2^20\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>")
        })
        .collect();
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>{files}</References>
  <DiskSection><Info>Virtual disk information</Info>{disk_entries}</DiskSection>
  <VirtualSystem ovf:id="web01">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="109" ovf:version="9" vmw:osType="oracleLinux9_64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Oracle Linux</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// A tar of `members` (in `dir`), as `dir/name`, in the ustar format OVF requires.
fn tar(dir: &Path, name: &str, members: &[&str]) {
    let out = Command::new("tar")
        .arg("--format=ustar")
        .arg("-cf")
        .arg(name)
        .args(members)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {out:?}");
}

/// Case 3: an OVA of an OVF and a streamOptimized VMDK ships the VMDK
/// byte for byte as STEM.vmdk, with the OS and firmware from the OVF; an
/// OVA of two disks is refused, naming both.
#[test]
fn an_ova_ships_its_disk_byte_for_byte_and_two_disks_are_refused_by_name() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("ova");
    let site = site(&s3, &prefix, "", "");
    let work = tmpdir();
    let w = work.path();
    raw_disk(&w.join("boot.img"), 24);
    for disk in ["web01-disk1.vmdk", "web01-disk2.vmdk"] {
        qemu(
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                "boot.img",
                disk,
            ],
            w,
        );
    }
    write(&w.join("web01.ovf"), &ovf(&["web01-disk1.vmdk"]));
    tar(w, "web01.ova", &["web01.ovf", "web01-disk1.vmdk"]);
    write(
        &w.join("two.ovf"),
        &ovf(&["web01-disk1.vmdk", "web01-disk2.vmdk"]),
    );
    tar(
        w,
        "two.ova",
        &["two.ovf", "web01-disk1.vmdk", "web01-disk2.vmdk"],
    );
    let d = site.daemon();
    for name in ["web01.ova", "two.ova"] {
        spool_copy(&w.join(name), &site.spool);
    }
    assert!(site.wait_done("web01.ova", Duration::from_secs(90)));
    let store = s3.store(&s3.buckets[0]);
    let inner = w.join("web01-disk1.vmdk");
    assert!(
        s3_object_equals(&store, &format!("{prefix}/web01.vmdk"), &inner),
        "the object is the OVA's VMDK, byte for byte"
    );
    assert!(same_bytes(&site.root.join("phoenix/web01.vmdk"), &inner));
    let m = manifest(&site.root.join("phoenix/web01.vmdk.manifest.json"));
    let img = &m["image"];
    assert_eq!(img["format"], "vmdk");
    assert_eq!(img["os"], "Oracle Linux");
    assert_eq!(img["os_version"], "9");
    assert_eq!(img["os_basis"], "ovf");
    assert_eq!(img["firmware"], "UEFI_64");
    assert_eq!(img["firmware_basis"], "ovf");
    assert_eq!(img["member"]["name"], "web01-disk1.vmdk");
    assert_eq!(
        m["file_size_bytes"].as_u64(),
        Some(std::fs::metadata(&inner).unwrap().len())
    );
    assert!(m["oci_create_image_unavailable"].is_string());

    let report = site
        .error_report("two.ova", Duration::from_secs(60))
        .expect("refused with a report");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("web01-disk1.vmdk") && reason.contains("web01-disk2.vmdk"),
        "{reason}"
    );
    assert!(reason.contains("2 disks"), "{reason}");
    assert!(reason.contains("block volumes"), "{reason}");
    assert!(s3_get(&store, &format!("{prefix}/two.vmdk")).is_none());
    drop(d);
}

/// Case 4: with conversion off nothing changes: a raw image is refused with
/// the command that converts it, and nothing is converted or sent. With
/// `push --convert` the same file ships as a QCOW2.
#[test]
fn without_conversion_a_raw_image_is_refused_with_the_command() {
    let dir = tmpdir();
    let d = dir.path();
    raw_disk(&d.join("disk.raw"), 8);
    let config = push_config(d);
    let out = run(ferry()
        .arg("push")
        .arg("--config")
        .arg(&config)
        .arg(d.join("disk.raw")));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "qemu-img convert -f raw -O qcow2 {} disk.qcow2",
            "disk.raw"
        )),
        "{err}"
    );
    assert!(list(&d.join("phoenix")).is_empty());
    assert!(!d.join("state/convert").exists(), "nothing was converted");

    let out = run(ferry()
        .arg("push")
        .arg("--convert")
        .arg("--config")
        .arg(&config)
        .arg(d.join("disk.raw")));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (code, said) = compare(
        "raw",
        &d.join("disk.raw"),
        "qcow2",
        &d.join("phoenix/disk.qcow2"),
    );
    assert_eq!(code, 0, "{said}");
    assert_eq!(
        manifest(&d.join("phoenix/disk.qcow2.manifest.json"))["conversion"]["original_format"],
        "raw"
    );
    assert_eq!(
        list(&d.join("state/convert")),
        Vec::<String>::new(),
        "a push leaves no conversion behind"
    );
}

/// A conversion that `qemu-img compare` finds different from its original
/// is never shipped: a `qemu-img` on the daemon's PATH converts with the
/// real one, then changes 4 KiB of the guest's data in the QCOW2 (as a
/// faulty converter or disk would), and the image is refused.
#[test]
fn a_conversion_that_differs_from_its_original_is_never_shipped() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("convert-differs");
    let site = site(&s3, &prefix, "", "convert = true");
    let bin = site.root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let wrapper = write(
        &bin.join("qemu-img"),
        "#!/bin/sh\n/usr/bin/qemu-img \"$@\" || exit $?\n\
         if [ \"$1\" = convert ]; then\n\
           for out; do :; done\n\
           qemu-io -f qcow2 -c 'write -P 0x5a 2M 4k' \"$out\" >/dev/null || exit 3\n\
         fi\n",
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let work = tmpdir();
    raw_disk(&work.path().join("db.raw"), 8);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let d = Daemon::start_with(&site.config, &site.root.join("daemon.log"), |c| {
        c.env("PATH", &path);
    });
    spool_copy(&work.path().join("db.raw"), &site.spool);
    let report = site
        .error_report("db.raw", Duration::from_secs(60))
        .expect("refused with a report");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("not identical"), "{reason}");
    assert!(
        same_bytes(&work.path().join("db.raw"), &site.failed().join("db.raw")),
        "the original is kept"
    );
    assert!(list(&site.root.join("phoenix")).is_empty());
    assert!(s3_get(&s3.store(&s3.buckets[0]), &format!("{prefix}/db.qcow2")).is_none());
    assert_eq!(
        list(&site.spool.join(".ferry/convert")),
        Vec::<String>::new()
    );
    assert_eq!(
        site.metric("ferry_conversions_total{outcome=\"differs\"}"),
        1
    );
    drop(d);
}

/// A daemon killed in the middle of uploading a conversion ships the same
/// QCOW2 after its restart: the uploads resume from the journal, nothing is
/// converted again, and the object is the original's, as qemu-img compares.
#[test]
fn a_restart_resumes_the_uploads_of_the_same_conversion() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("convert-crash");
    let site = site(&s3, &prefix, "", "convert = true");
    let work = tmpdir();
    let w = work.path();
    raw_disk(&w.join("crm.raw"), 40);
    qemu(
        &["convert", "-f", "raw", "-O", "vdi", "crm.raw", "crm.vdi"],
        w,
    );
    let log = site.root.join("daemon.log");
    let mut d = Daemon::start_with(&site.config, &log, |c| {
        c.env("FERRY_CRASH_AT", "part:3");
    });
    spool_copy(&w.join("crm.vdi"), &site.spool);
    let ended = d.wait_exit(Duration::from_secs(60));
    assert!(
        ended.is_some_and(|s| !s.success()),
        "the daemon crashed at the third part: {ended:?}"
    );
    assert!(site.active().join("crm.vdi").exists());
    assert!(site.spool.join(".ferry/convert/crm.vdi.qcow2").exists());
    drop(d);
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    let d = Daemon::start(&site.config, &log);
    assert!(site.wait_done("crm.vdi", Duration::from_secs(120)));
    let after = &std::fs::read_to_string(&log).unwrap()[before..];
    assert!(after.contains("made and checked before"), "{after}");
    assert!(
        !after.contains("converting vdi"),
        "converted again: {after}"
    );
    assert!(site.metric("ferry_uploads_resumed_total") >= 1, "{after}");
    assert_eq!(
        site.metric("ferry_conversions_total{outcome=\"converted\"}"),
        0,
        "this daemon converted nothing"
    );
    let fetched = w.join("fetched.qcow2");
    std::fs::write(
        &fetched,
        s3_get(&s3.store(&s3.buckets[0]), &format!("{prefix}/crm.qcow2")).unwrap(),
    )
    .unwrap();
    let (code, said) = compare("vdi", &w.join("crm.vdi"), "qcow2", &fetched);
    assert_eq!(code, 0, "{said}");
    assert_eq!(
        list(&site.spool.join(".ferry/convert")),
        Vec::<String>::new()
    );
    drop(d);
}

/// Only an image refused for its format alone is converted: a QED whose
/// backing file (outside anything ferry was given) holds the rest of the
/// disk is refused, and nothing is converted; the same QED without one
/// converts, with the virtual size qemu-img gives it.
#[test]
fn an_image_with_a_backing_file_is_never_converted() {
    let dir = tmpdir();
    let d = dir.path();
    raw_disk(&d.join("base.raw"), 8);
    qemu(
        &["convert", "-f", "raw", "-O", "qed", "base.raw", "base.qed"],
        d,
    );
    let base = d.join("base.qed").display().to_string();
    qemu(
        &["create", "-f", "qed", "-b", &base, "-F", "qed", "delta.qed"],
        d,
    );
    let config = push_config(d);
    let out = run(ferry().arg("inspect").arg("--json").arg(d.join("base.qed")));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["virtual_size"].as_u64(), Some(8 << 20), "{v}");
    assert_eq!(v["with_convert"]["object_name"], "base.qcow2", "{v}");

    let out = run(ferry()
        .arg("push")
        .arg("--convert")
        .arg("--config")
        .arg(&config)
        .arg(d.join("delta.qed")));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backing file"), "{err}");
    assert!(list(&d.join("phoenix")).is_empty());
    assert_eq!(list(&d.join("state/convert")), Vec::<String>::new());

    let out = run(ferry()
        .arg("push")
        .arg("--convert")
        .arg("--config")
        .arg(&config)
        .arg(d.join("base.qed")));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (code, said) = compare(
        "qed",
        &d.join("base.qed"),
        "qcow2",
        &d.join("phoenix/base.qcow2"),
    );
    assert_eq!(code, 0, "{said}");
}

/// With conversion on and no qemu-img, the daemon does not start, and says
/// how to install it.
#[test]
fn the_daemon_does_not_start_without_qemu_img_when_conversion_is_on() {
    let dir = tmpdir();
    let d = dir.path();
    let config = write(
        &d.join("ferry.toml"),
        &format!(
            "spool_dir = \"{r}/spool\"\nstate_dir = \"{r}/state\"\nmetrics_addr = \"127.0.0.1:0\"\n\
             [policy]\nconvert = true\n[destinations.phoenix]\nurl = \"file://{r}/phoenix/\"\n",
            r = d.display()
        ),
    );
    let empty = d.join("bin");
    std::fs::create_dir_all(&empty).unwrap();
    let mut daemon = Daemon::start_with(&config, &d.join("daemon.log"), |c| {
        c.env("PATH", &empty);
    });
    let ended = daemon.wait_exit(Duration::from_secs(20));
    assert!(ended.is_some_and(|s| !s.success()), "{ended:?}");
    let log = daemon.log_text();
    assert!(log.contains("qemu-img cannot be run"), "{log}");
    assert!(log.contains("apt install qemu-utils"), "{log}");
}

/// Two files that ship under one name never upload at once: `web.raw`
/// (converted to `web.qcow2`) waits while `web.qcow2` uploads through a
/// slow link, then ships over it; the object and its manifest are then both
/// the conversion's.
#[test]
fn two_files_shipping_under_one_name_upload_one_after_the_other() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("convert-same-name");
    let relay = Relay::start(&s3);
    relay.set(r#"{"part_bytes_per_sec": 1000000}"#);
    let site = Site::with_daemon(
        "",
        &format!(
            "[transfer]\npart_size = \"5MiB\"\nmemory_limit = \"64MiB\"\n{}",
            s3_dest("frankfurt", &s3.buckets[0], &prefix, &relay.endpoint(), "")
        ),
    );
    let text = std::fs::read_to_string(&site.config).unwrap();
    write(
        &site.config,
        &text.replace("refuse = false\n", "refuse = true\nconvert = true\n"),
    );
    let work = tmpdir();
    let w = work.path();
    boot_qcow2(w, "web.qcow2", 12 << 20);
    raw_disk(&w.join("web.raw"), 8);
    let d = site.daemon();
    spool_copy(&w.join("web.qcow2"), &site.spool);
    assert!(
        wait_until(Duration::from_secs(30), || relay.slow_bytes() > 0),
        "web.qcow2 is uploading"
    );
    spool_copy(&w.join("web.raw"), &site.spool);
    assert!(
        wait_until(Duration::from_secs(120), || {
            site.done().join("web.qcow2").exists() && site.done().join("web.raw").exists()
        }),
        "both shipped: {:?}",
        list(&site.done())
    );
    let log = d.log_text();
    assert!(
        log.contains("\"web.raw\" ships as web.qcow2, like another image in flight"),
        "{log}"
    );
    let store = s3.store(&s3.buckets[0]);
    let fetched = w.join("fetched.qcow2");
    std::fs::write(
        &fetched,
        s3_get(&store, &format!("{prefix}/web.qcow2")).unwrap(),
    )
    .unwrap();
    let (code, said) = compare("raw", &w.join("web.raw"), "qcow2", &fetched);
    assert_eq!(code, 0, "the object is web.raw's conversion: {said}");
    let m: serde_json::Value = serde_json::from_slice(
        &s3_get(&store, &format!("{prefix}/web.qcow2.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["conversion"]["original_file"], "web.raw");
    assert_eq!(
        m["crc32c"].as_str().unwrap(),
        format!("{:08x}", file_crc(&fetched)),
        "the manifest is the object's"
    );
    drop(d);
}

/// A file whose relative name reads as one of qemu's protocols (`nbd:`)
/// is converted as the file it is: qemu-img is given absolute paths, and
/// reaches nothing the configuration does not name.
#[test]
fn a_relative_name_with_a_colon_is_converted_as_a_file() {
    let dir = tmpdir();
    let d = dir.path();
    raw_disk(&d.join("nbd:web.raw"), 8);
    let config = push_config(d);
    let out = run(ferry()
        .current_dir(d)
        .arg("push")
        .arg("--convert")
        .arg("--config")
        .arg(&config)
        .arg("nbd:web.raw"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (code, said) = compare(
        "raw",
        &d.join("nbd:web.raw"),
        "qcow2",
        &d.join("phoenix/nbd:web.qcow2"),
    );
    assert_eq!(code, 0, "{said}");
}
