//! The import step (issue 15) end to end: the daemon ships an image to two
//! `oci://` regions, each a double of OCI (`tests/support/oci_double.py`:
//! Object Storage and Compute's CreateImage, GetImage and work requests, as
//! strict as the API reference), and each verified object becomes a custom
//! image there. Also: kill -9 while waiting, an import that ends DISABLED,
//! an `.oci` export, an image refused before upload for want of a launch
//! mode, and `ferry import` from a manifest.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use ferry::config::TransferConfig;
use ferry::store::Destination;

const SIDECAR: &str =
    r#"{"os": "Oracle Linux", "os_version": "9", "launch_mode": "PARAVIRTUALIZED"}"#;

/// A region: a double of its own, with images IMPORTING for `import_secs`.
fn region(import_secs: f64) -> OciDouble {
    OciDouble::start_with(|c| c["import_secs"] = import_secs.into())
}

/// A destination of `double` reached with ferry's own client.
fn dest(double: &OciDouble, url: &str) -> Destination {
    Destination::new(
        "check",
        &double.destination_config(url),
        &TransferConfig::default(),
        5 << 20,
    )
    .unwrap()
}

/// The manifest of `name` in `double`'s bucket at `url`.
fn oci_manifest(double: &OciDouble, url: &str, name: &str) -> serde_json::Value {
    let bytes = block_on(dest(double, url).get_small(&format!("{name}.manifest.json"))).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A bootable QCOW2 made by qemu-img, and its sidecar, written as a
/// producer would into `spool`; returns its CRC32C.
fn drop_qcow2(spool: &Path, name: &str, sidecar: Option<&str>) -> u32 {
    let dir = tmpdir();
    boot_qcow2(dir.path(), name, 32 << 20);
    if let Some(s) = sidecar {
        write(&spool.join(format!("{name}.meta.json")), s);
    }
    let crc = file_crc(&dir.path().join(name));
    spool_copy(&dir.path().join(name), spool);
    crc
}

/// The two regions' destination tables.
fn two_regions(ash: &OciDouble, fra: &OciDouble, import: &str) -> String {
    format!(
        "{}{}",
        ash.importing_table("ashburn", "oci://images/exports/", "us-ashburn-1", import),
        fra.importing_table(
            "frankfurt",
            "oci://images/exports/",
            "eu-frankfurt-1",
            import
        )
    )
}

fn status(site: &Site) -> serde_json::Value {
    http_get(site.metrics_port, "/status")
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap_or_default()
}

/// The image OCIDs `/status` shows for `file`, by destination: of the job in
/// flight (phase importing) and of the imports that ended.
fn status_images(site: &Site, file: &str) -> std::collections::BTreeMap<String, String> {
    let s = status(site);
    let mut out = std::collections::BTreeMap::new();
    for job in s["jobs"].as_array().into_iter().flatten() {
        if job["file"] != file {
            continue;
        }
        for d in job["destinations"].as_array().into_iter().flatten() {
            if let Some(id) = d["import"]["image_id"].as_str() {
                out.insert(d["name"].as_str().unwrap().to_string(), id.to_string());
            }
        }
    }
    for i in s["last_imports"].as_array().into_iter().flatten() {
        if i["file"] == file
            && let Some(id) = i["image_id"].as_str()
        {
            out.insert(
                i["destination"].as_str().unwrap().to_string(),
                id.to_string(),
            );
        }
    }
    out
}

/// Issue 15, test 1: a qcow2 shipped to two `oci://` regions with import
/// on. Both images become AVAILABLE; the manifests and `/status` carry
/// both OCIDs; the CreateImage bodies have the launch mode, the source image
/// type and the OS; the PAR is gone afterwards; the metrics count them.
#[test]
fn a_qcow2_becomes_an_available_image_in_two_regions() {
    let ash = region(3.0);
    let fra = region(3.0);
    let site = Site::new(&two_regions(
        &ash,
        &fra,
        "display_name = \"{stem}-{crc32c}\"\nfreeform_tags = { team = \"migration\" }",
    ));
    let _d = site.daemon();
    // The import series exist before the first import.
    assert!(wait_until(Duration::from_secs(10), || http_get(
        site.metrics_port,
        "/metrics"
    )
    .is_some_and(
        |(_, m)| m.contains("ferry_imports_total{destination=\"frankfurt\",outcome=\"ok\"} 0")
    )));
    let crc = drop_qcow2(&site.spool, "web01.qcow2", Some(SIDECAR));
    // While OCI imports, /status shows the phase and both images.
    let mut seen_importing = false;
    let shown = wait_until(Duration::from_secs(60), || {
        let s = status(&site);
        seen_importing |= s["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|j| j["destinations"].as_array().cloned().unwrap_or_default())
            .any(|d| d["phase"] == "importing");
        status_images(&site, "web01.qcow2").len() == 2
    });
    assert!(shown, "status: {}", status(&site));
    assert!(seen_importing, "no destination was shown importing");
    assert!(
        site.wait_done("web01.qcow2", Duration::from_secs(60)),
        "not done: {:?}",
        site.error_report("web01.qcow2", Duration::from_secs(1))
    );
    let on_status = status_images(&site, "web01.qcow2");
    for (double, name) in [(&ash, "ashburn"), (&fra, "frankfurt")] {
        let m = oci_manifest(double, "oci://images/exports/", "web01.qcow2");
        let i = &m["import"];
        eprintln!("{name}: {}", serde_json::to_string_pretty(i).unwrap());
        assert_eq!(i["state"], "AVAILABLE", "{m}");
        assert_eq!(i["outcome"], "available");
        assert_eq!(i["source"], "par");
        assert_eq!(m["manifest_version"], 6);
        let id = i["image_id"].as_str().unwrap();
        assert!(id.starts_with("ocid1.image."), "{id}");
        assert_eq!(on_status.get(name).map(String::as_str), Some(id));
        let record = double.images();
        assert_eq!(record["created"], 1, "{record}");
        let body = &record["bodies"][0];
        assert_eq!(body["launchMode"], "PARAVIRTUALIZED", "{body}");
        assert_eq!(body["compartmentId"], OCI_COMPARTMENT);
        assert_eq!(body["displayName"], format!("web01-{crc:08x}"));
        assert_eq!(body["freeformTags"]["team"], "migration");
        assert_eq!(body["freeformTags"]["ferry-crc32c"], format!("{crc:08x}"));
        assert!(
            body["freeformTags"]["ferry-source-host"]
                .as_str()
                .is_some_and(|h| !h.is_empty())
        );
        let src = &body["imageSourceDetails"];
        assert_eq!(src["sourceImageType"], "QCOW2");
        assert_eq!(src["operatingSystem"], "Oracle Linux");
        assert_eq!(src["operatingSystemVersion"], "9");
        assert_eq!(src["sourceType"], "objectStorageUri");
        // The source was a PAR, deleted once the import ended.
        let uri = src["sourceUri"].as_str().unwrap();
        let path = &uri[uri.find("/p/").expect("a PAR URL")..];
        assert_eq!(http_get(double.port, path).map(|r| r.0), Some(404), "{uri}");
        assert_eq!(
            site.metric(&format!(
                "ferry_imports_total{{destination=\"{name}\",outcome=\"ok\"}}"
            )),
            1
        );
        assert_eq!(
            site.metric(&format!(
                "ferry_import_duration_seconds_count{{destination=\"{name}\"}}"
            )),
            1
        );
    }
    assert_eq!(site.metric("ferry_jobs_total{outcome=\"done\"}"), 1);
}

/// Issue 15, test 2: kill -9 while waiting for AVAILABLE. After the
/// restart ferry waits for the same images and never creates a second one:
/// the double's count of created images is exactly one per region.
#[test]
fn kill_9_while_waiting_for_available_never_makes_a_second_image() {
    let ash = region(10.0);
    let fra = region(10.0);
    let site = Site::new(&two_regions(&ash, &fra, ""));
    let d = site.daemon();
    drop_qcow2(&site.spool, "db02.qcow2", Some(SIDECAR));
    // Both images exist and their OCIDs are journaled: the wait is on.
    let journal = site.root.join("state/jobs/db02.qcow2.json");
    let journaled = |region: &str| -> Option<String> {
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&journal).ok()?).ok()?;
        r["destinations"][region]["import"]["image_id"]
            .as_str()
            .map(str::to_string)
    };
    assert!(
        wait_until(Duration::from_secs(60), || journaled("ashburn").is_some()
            && journaled("frankfurt").is_some()),
        "no image OCIDs journaled: {}",
        std::fs::read_to_string(&journal).unwrap_or_default()
    );
    let before = (
        journaled("ashburn").unwrap(),
        journaled("frankfurt").unwrap(),
    );
    assert_eq!((ash.images_created(), fra.images_created()), (1, 1));
    // While it imports, the manifest names the image: a `ferry import`
    // would wait for it.
    let m = oci_manifest(&ash, "oci://images/exports/", "db02.qcow2");
    assert_eq!(m["import"]["outcome"], "importing", "{m}");
    assert_eq!(m["import"]["image_id"].as_str(), Some(before.0.as_str()));
    d.signal(libc::SIGKILL);
    drop(d);
    assert!(site.active().join("db02.qcow2").exists());

    let d2 = site.daemon();
    assert!(
        site.wait_done("db02.qcow2", Duration::from_secs(90)),
        "not done after the restart: {:?}",
        site.error_report("db02.qcow2", Duration::from_secs(1))
    );
    assert_eq!(
        (ash.images_created(), fra.images_created()),
        (1, 1),
        "a second image was created"
    );
    // Waited for the journaled images: no CreateImage was sent again.
    for double in [&ash, &fra] {
        let record = double.images();
        assert_eq!(record["bodies"].as_array().unwrap().len(), 1, "{record}");
    }
    let ids = (
        oci_manifest(&ash, "oci://images/exports/", "db02.qcow2")["import"]["image_id"]
            .as_str()
            .unwrap()
            .to_string(),
        oci_manifest(&fra, "oci://images/exports/", "db02.qcow2")["import"]["image_id"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    assert_eq!(ids, before, "the manifests name other images");
    assert!(
        d2.log_text().contains("continuing its import"),
        "{}",
        d2.log_text()
    );
    // Nothing was uploaded again: both destinations had verified.
    assert_eq!(site.metric("ferry_parts_uploaded_total"), 0);
}

/// A crash after CreateImage answered, before the OCID was journaled: the
/// restarted daemon sends the same body with the same retry token, and OCI
/// answers with the image it made the first time.
#[test]
fn a_crash_before_the_image_is_journaled_gets_the_same_image_by_its_retry_token() {
    let ash = region(2.0);
    let site =
        Site::new(&ash.importing_table("ashburn", "oci://images/exports/", "us-ashburn-1", ""));
    let mut d = Daemon::start_with(&site.config, &site.root.join("daemon.log"), |c| {
        c.env("FERRY_CRASH_AT", "image_created");
    });
    drop_qcow2(&site.spool, "app03.qcow2", Some(SIDECAR));
    assert!(
        d.wait_exit(Duration::from_secs(60)).is_some(),
        "the daemon never reached image_created"
    );
    drop(d);
    assert_eq!(ash.images_created(), 1);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(site.root.join("state/jobs/app03.qcow2.json")).unwrap(),
    )
    .unwrap();
    let import = &record["destinations"]["ashburn"]["import"];
    assert!(import["image_id"].is_null(), "{import}");
    assert!(
        import["body"].is_object() && import["retry_token"].is_string(),
        "{import}"
    );

    let _d2 = site.daemon();
    assert!(
        site.wait_done("app03.qcow2", Duration::from_secs(60)),
        "{:?}",
        site.error_report("app03.qcow2", Duration::from_secs(1))
    );
    let record = ash.images();
    assert_eq!(record["created"], 1, "{record}");
    let bodies = record["bodies"].as_array().unwrap();
    assert_eq!(bodies.len(), 2, "the create was sent again: {record}");
    assert_eq!(bodies[0], bodies[1], "with the same body");
    assert_eq!(
        oci_manifest(&ash, "oci://images/exports/", "app03.qcow2")["import"]["state"],
        "AVAILABLE"
    );
}

/// Issue 15, test 3: an import that ends DISABLED (the object in one region
/// is replaced by bytes that are no image, between its verification and its
/// import). The file goes to `failed/` with the work request's message, and
/// the other region's image is still AVAILABLE.
#[test]
fn an_import_that_ends_disabled_fails_the_file_and_spares_the_other_region() {
    let ash = region(2.0);
    let fra = region(2.0);
    let site = Site::new(&two_regions(&ash, &fra, ""));
    // Each destination pauses after its manifest is written, before its
    // import starts.
    let _d = Daemon::start_with(&site.config, &site.root.join("daemon.log"), |c| {
        c.env("FERRY_PAUSE_AT", "manifest:4000");
    });
    drop_qcow2(&site.spool, "bad.qcow2", Some(SIDECAR));
    let fra_dest = dest(&fra, "oci://images/exports/");
    assert!(
        wait_until(Duration::from_secs(60), || block_on(
            fra_dest.get_small("bad.qcow2.manifest.json")
        )
        .is_ok()),
        "frankfurt never verified"
    );
    block_on(fra_dest.put_small("bad.qcow2", bytes::Bytes::from(vec![0x5a; 1 << 20]))).unwrap();

    let report = site
        .error_report("bad.qcow2", Duration::from_secs(60))
        .expect("bad.qcow2 went to failed/");
    assert_eq!(report["outcome"], "failed");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("1 import(s) failed"), "{reason}");
    assert!(reason.contains("DISABLED"), "{reason}");
    assert!(
        reason.contains("the object's format is not supported"),
        "the work request's message: {reason}"
    );
    let failed: Vec<&str> = report["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["destination"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["frankfurt"]);
    assert!(
        report["what_to_do"]
            .as_str()
            .unwrap()
            .contains("work request")
    );
    let m = oci_manifest(&ash, "oci://images/exports/", "bad.qcow2");
    assert_eq!(m["import"]["state"], "AVAILABLE", "{m}");
    let m = oci_manifest(&fra, "oci://images/exports/", "bad.qcow2");
    assert_eq!(m["import"]["state"], "DISABLED", "{m}");
    assert_eq!(m["import"]["outcome"], "failed");
    assert!(
        m["import"]["error"]
            .as_str()
            .unwrap()
            .contains("ImageImportFailed")
    );
    // /status names the failure too.
    let s = status(&site);
    assert!(s["last_errors"].to_string().contains("DISABLED"), "{s}");
    assert_eq!(
        site.metric("ferry_imports_total{destination=\"frankfurt\",outcome=\"failed\"}"),
        1
    );
    assert_eq!(
        site.metric("ferry_imports_total{destination=\"ashburn\",outcome=\"ok\"}"),
        1
    );
    // The PAR (read access to the image) is in none of what a person or the
    // bucket's readers see.
    let log = std::fs::read_to_string(site.root.join("daemon.log")).unwrap();
    let error_json = std::fs::read_to_string(site.failed().join("bad.qcow2.error.json")).unwrap();
    for (what, text) in [
        ("the log", log),
        ("error.json", error_json),
        ("/status", s.to_string()),
        ("a manifest", m.to_string()),
    ] {
        assert!(!text.contains("/p/"), "{what} holds a PAR URL: {text}");
    }
}

/// Issue 15, test 4: an `.oci` export imports with launch mode NATIVE and
/// no `sourceImageType`.
#[test]
fn an_oci_export_imports_native_without_a_source_image_type() {
    let ash = region(1.0);
    let site =
        Site::new(&ash.importing_table("ashburn", "oci://images/exports/", "us-ashburn-1", ""));
    let _d = site.daemon();
    let dir = tmpdir();
    boot_qcow2(dir.path(), "output.QCOW2", 32 << 20);
    write(
        &dir.path().join("image_metadata.json"),
        r#"{"version": 2, "externalLaunchOptions": {"firmware": "BIOS"}, "operatingSystem": "Oracle Linux", "operatingSystemVersion": "8"}"#,
    );
    let tar = std::process::Command::new("tar")
        .args(["-cf", "export.oci", "output.QCOW2", "image_metadata.json"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(tar.success());
    spool_copy(&dir.path().join("export.oci"), &site.spool);
    assert!(
        site.wait_done("export.oci", Duration::from_secs(60)),
        "{:?}",
        site.error_report("export.oci", Duration::from_secs(1))
    );
    let record = ash.images();
    assert_eq!(record["created"], 1);
    let body = &record["bodies"][0];
    assert_eq!(body["launchMode"], "NATIVE", "{body}");
    assert!(
        body["imageSourceDetails"].get("sourceImageType").is_none(),
        "{body}"
    );
    assert_eq!(
        body["imageSourceDetails"]["operatingSystem"],
        "Oracle Linux"
    );
    let m = oci_manifest(&ash, "oci://images/exports/", "export.oci");
    assert_eq!(m["import"]["state"], "AVAILABLE");
    assert_eq!(m["import"]["launch_mode"], "NATIVE");
}

/// Issue 15, test 5: an image with no basis for its launch mode, and an
/// import configured: refused before a byte is sent, with the sidecar to
/// write.
#[test]
fn an_image_without_a_launch_mode_basis_is_refused_before_upload() {
    let ash = region(1.0);
    let site =
        Site::new(&ash.importing_table("ashburn", "oci://images/exports/", "us-ashburn-1", ""));
    let _d = site.daemon();
    drop_qcow2(
        &site.spool,
        "nomode.qcow2",
        Some(r#"{"os": "Ubuntu", "os_version": "24.04"}"#),
    );
    let report = site
        .error_report("nomode.qcow2", Duration::from_secs(30))
        .expect("refused");
    assert_eq!(report["outcome"], "refused");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("no basis for its launch mode"), "{reason}");
    assert!(reason.contains("nomode.qcow2.meta.json"), "{reason}");
    assert!(
        reason.contains("\"launch_mode\": \"PARAVIRTUALIZED\""),
        "{reason}"
    );
    assert!(
        reason.contains("ashburn"),
        "names the importing destination: {reason}"
    );
    assert!(report["what_to_do"].as_str().unwrap().contains("sidecar"));
    // Nothing was sent.
    assert!(block_on(dest(&ash, "oci://images/exports/").head("nomode.qcow2")).is_err());
    assert_eq!(ash.images_created(), 0);
    assert_eq!(site.metric("ferry_uploaded_bytes_total"), 0);
}

/// Issue 15, test 6: `ferry import` of an object ferry shipped, from its
/// `oci://` URL and from its manifest file: the image is AVAILABLE, the
/// manifest says so, a second import is not made unless asked, and an
/// object changed since it verified is refused.
#[test]
fn ferry_import_makes_an_image_from_a_manifest() {
    let ash = region(2.0);
    let dir = tmpdir();
    // Shipped by a push to a destination without an import table.
    let cfg = write(
        &dir.path().join("ferry.toml"),
        &ash.table("ashburn", "oci://images/lift/"),
    );
    boot_qcow2(dir.path(), "lift.qcow2", 32 << 20);
    write(&dir.path().join("lift.qcow2.meta.json"), SIDECAR);
    let out = run(ferry()
        .arg("push")
        .arg(dir.path().join("lift.qcow2"))
        .arg("--config")
        .arg(&cfg));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        ash.images_created(),
        0,
        "a push to a table without import imports nothing"
    );

    let import = |target: &str, extra: &[&str]| {
        let mut cmd = ferry();
        cmd.arg("import")
            .arg(target)
            .arg("--config")
            .arg(&cfg)
            .args(["--endpoint", &ash.endpoint()])
            .args(["--progress-secs", "1"])
            .args(extra);
        run(&mut cmd)
    };
    // The same bucket and prefix in two regions: which one cannot be guessed.
    let two = write(
        &dir.path().join("two.toml"),
        &format!(
            "{}[destinations.frankfurt]\nurl = \"oci://images/lift/\"\nregion = \"eu-frankfurt-1\"\n{}",
            ash.table("ashburn", "oci://images/lift/"),
            ash.table_keys(&ash.endpoint())
                .replace("region = \"us-ashburn-1\"\n", "")
        ),
    );
    let out = run(ferry()
        .args(["import", "oci://images/lift/lift.qcow2", "--config"])
        .arg(&two)
        .args(["--compartment-id", OCI_COMPARTMENT]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ashburn (us-ashburn-1), frankfurt (eu-frankfurt-1)")
            && stderr.contains("--destination"),
        "{stderr}"
    );
    assert_eq!(ash.images_created(), 0);

    // No import table and no compartment: refused, saying what to give.
    let out = import("oci://images/lift/lift.qcow2", &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--compartment-id"),
        "{out:?}"
    );

    let out = import(
        "oci://images/lift/lift.qcow2",
        &[
            "--compartment-id",
            OCI_COMPARTMENT,
            "--display-name",
            "lift-{date}",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("imported lift.qcow2 in us-ashburn-1 as ocid1.image."),
        "{stdout}"
    );
    assert!(stderr.contains("IMPORTING"), "a progress line: {stderr}");
    assert_eq!(ash.images_created(), 1);
    let body = &ash.images()["bodies"][0];
    assert!(
        body["displayName"].as_str().unwrap().starts_with("lift-20"),
        "{body}"
    );
    assert_eq!(body["launchMode"], "PARAVIRTUALIZED");
    let m = oci_manifest(&ash, "oci://images/lift/", "lift.qcow2");
    assert_eq!(m["import"]["state"], "AVAILABLE", "{m}");
    let id = m["import"]["image_id"].as_str().unwrap().to_string();
    assert!(stdout.contains(&id));

    // From the manifest file: already imported, nothing new unless --again.
    let file = write(&dir.path().join("lift.qcow2.manifest.json"), &m.to_string());
    let out = import(file.to_str().unwrap(), &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already imported"),
        "{out:?}"
    );
    assert_eq!(ash.images_created(), 1);
    let out = import(
        file.to_str().unwrap(),
        &["--again", "--compartment-id", OCI_COMPARTMENT],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ash.images_created(), 2, "--again makes a new image");
    let rewritten = manifest(&file);
    assert_ne!(
        rewritten["import"]["image_id"],
        id.as_str(),
        "the file says the new one"
    );

    // An object changed since it verified (the same size, other bytes: OCI's
    // CRC32C tells) is refused, and nothing is created.
    let size = std::fs::metadata(dir.path().join("lift.qcow2"))
        .unwrap()
        .len() as usize;
    block_on(
        dest(&ash, "oci://images/lift/")
            .put_small("lift.qcow2", bytes::Bytes::from(vec![7u8; size])),
    )
    .unwrap();
    let out = import(
        "oci://images/lift/lift.qcow2",
        &["--again", "--compartment-id", OCI_COMPARTMENT],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("changed since it verified") && stderr.contains("has CRC32C"),
        "{out:?}"
    );
    assert_eq!(ash.images_created(), 2);
}

/// `ferry push` honours the import tables too: it waits for the image and
/// says so; an image without a launch mode basis is refused before a byte
/// is sent; `--no-import` only ships.
#[test]
fn ferry_push_imports_where_the_table_says() {
    let ash = region(1.0);
    let dir = tmpdir();
    let cfg = write(
        &dir.path().join("ferry.toml"),
        &ash.importing_table("ashburn", "oci://images/pushed/", "us-ashburn-1", ""),
    );
    boot_qcow2(dir.path(), "p.qcow2", 32 << 20);
    let push = |extra: &[&str]| {
        run(ferry()
            .arg("push")
            .arg(dir.path().join("p.qcow2"))
            .arg("--config")
            .arg(&cfg)
            .args(extra))
    };
    // No sidecar yet: no basis for a launch mode.
    let out = push(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no basis for its launch mode"),
        "{out:?}"
    );
    assert!(block_on(dest(&ash, "oci://images/pushed/").head("p.qcow2")).is_err());
    // --no-import ships it as it is.
    let out = push(&["--no-import"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ash.images_created(), 0);

    write(&dir.path().join("p.qcow2.meta.json"), SIDECAR);
    let out = push(&[]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("verified pushed/p.qcow2"), "{stdout}");
    assert!(
        stdout.contains("imported p at ashburn as ocid1.image."),
        "{stdout}"
    );
    assert_eq!(ash.images_created(), 1);
    let m = oci_manifest(&ash, "oci://images/pushed/", "p.qcow2");
    assert_eq!(m["import"]["state"], "AVAILABLE");
}

/// SIGTERM while waiting for AVAILABLE: the daemon stops at once (the wait
/// is a poll), and the next start waits for the same image.
#[test]
fn sigterm_while_importing_stops_and_the_next_start_waits_for_the_same_image() {
    let ash = region(8.0);
    let site =
        Site::new(&ash.importing_table("ashburn", "oci://images/exports/", "us-ashburn-1", ""));
    let mut d = site.daemon();
    drop_qcow2(&site.spool, "term.qcow2", Some(SIDECAR));
    assert!(
        wait_until(Duration::from_secs(60), || ash.images_created() == 1),
        "no image created"
    );
    d.signal(libc::SIGTERM);
    let exit = d.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    assert!(
        d.log_text().contains("\"term.qcow2\" interrupted"),
        "{}",
        d.log_text()
    );
    drop(d);
    let _d2 = site.daemon();
    assert!(
        site.wait_done("term.qcow2", Duration::from_secs(60)),
        "{:?}",
        site.error_report("term.qcow2", Duration::from_secs(1))
    );
    let record = ash.images();
    assert_eq!(record["created"], 1, "{record}");
    assert_eq!(record["bodies"].as_array().unwrap().len(), 1, "{record}");
}

/// Compute unreachable for a while during the wait (the relay in front of
/// it refuses connections): the daemon polls on through it, the job is not
/// tried again, and the same image ends AVAILABLE.
#[test]
fn compute_down_for_a_while_during_the_wait_is_waited_out() {
    let ash = region(6.0);
    let relay = Relay::to(ash.port);
    let table = ash
        .importing_table("ashburn", "oci://images/exports/", "us-ashburn-1", "")
        .replace(
            &format!("[destinations.ashburn.import]\ncompartment_id = \"{OCI_COMPARTMENT}\"\nendpoint = \"{}\"", ash.endpoint()),
            &format!("[destinations.ashburn.import]\ncompartment_id = \"{OCI_COMPARTMENT}\"\nendpoint = \"{}\"", relay.endpoint()),
        );
    assert!(table.contains(&relay.endpoint()), "{table}");
    let site = Site::new(&format!(
        "[transfer]\nmax_retries = 2\nretry_base_ms = 50\n{table}"
    ));
    let d = site.daemon();
    drop_qcow2(&site.spool, "down.qcow2", Some(SIDECAR));
    assert!(
        wait_until(Duration::from_secs(60), || ash.images_created() == 1),
        "no image created"
    );
    relay.set(r#"{"refuse": true}"#);
    assert!(
        wait_until(Duration::from_secs(20), || d
            .log_text()
            .contains("polling on until the import's timeout")),
        "{}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_secs(3));
    relay.set(r#"{"refuse": false}"#);
    assert!(
        site.wait_done("down.qcow2", Duration::from_secs(60)),
        "{:?}",
        site.error_report("down.qcow2", Duration::from_secs(1))
    );
    let log = d.log_text();
    assert!(log.contains("answers again"), "{log}");
    assert!(
        !log.contains("attempt 2 of"),
        "the job was tried again: {log}"
    );
    assert_eq!(ash.images_created(), 1);
    assert_eq!(
        oci_manifest(&ash, "oci://images/exports/", "down.qcow2")["import"]["state"],
        "AVAILABLE"
    );
}

/// An image still IMPORTING `timeout_minutes` after the import began: the
/// file fails, naming the image, and its PAR is deleted.
#[test]
fn an_import_past_its_timeout_fails_naming_the_image() {
    let ash = region(600.0);
    let site = Site::new(&ash.importing_table(
        "ashburn",
        "oci://images/exports/",
        "us-ashburn-1",
        "timeout_minutes = 1",
    ));
    let _d = site.daemon();
    drop_qcow2(&site.spool, "slow.qcow2", Some(SIDECAR));
    let report = site
        .error_report("slow.qcow2", Duration::from_secs(120))
        .expect("slow.qcow2 went to failed/");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("was still IMPORTING after 1 minutes (timeout_minutes)"),
        "{reason}"
    );
    assert!(reason.contains("ocid1.image."), "{reason}");
    let m = oci_manifest(&ash, "oci://images/exports/", "slow.qcow2");
    assert_eq!(m["import"]["outcome"], "timed_out", "{m}");
    let body = &ash.images()["bodies"][0];
    let uri = body["imageSourceDetails"]["sourceUri"].as_str().unwrap();
    let path = &uri[uri.find("/p/").unwrap()..];
    assert_eq!(
        http_get(ash.port, path).map(|r| r.0),
        Some(404),
        "the PAR lives on"
    );
    assert_eq!(
        site.metric("ferry_imports_total{destination=\"ashburn\",outcome=\"failed\"}"),
        1
    );
}
