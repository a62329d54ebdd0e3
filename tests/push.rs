//! `ferry push` driven as a user runs it: the real binary, real files, the embedded
//! `file://` store, and a real S3 server (SeaweedFS) on loopback.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn config(dir: &Path, body: &str) -> std::path::PathBuf {
    write(&dir.join("ferry.toml"), body)
}

/// Acceptance: 1 GiB to two file:// URLs and one s3:// URL; byte-identical objects,
/// manifests carrying the file's CRC32C, several parts on S3, and a peak RSS under
/// memory_limit + 64 MiB with memory_limit = 256 MiB.
#[test]
fn one_gib_to_two_directories_and_s3_is_byte_identical_within_memory() {
    let Some(s3) = s3() else { return };
    let dir = tmpdir();
    let img = dir.path().join("disk-1g.qcow2");
    let crc = random_file(&img, 1 << 30, 1);
    let cfg = config(
        dir.path(),
        "[transfer]\nmemory_limit = \"256MiB\"\npart_size = \"32MiB\"\n",
    );
    let prefix = unique_prefix("gib");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-v")
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .arg("push")
        .arg("--force")
        .arg(&img)
        .arg("--config")
        .arg(&cfg)
        .arg("--to")
        .arg(format!("file://{}/", a.display()))
        .arg("--to")
        .arg(format!("file://{}/", b.display()))
        .arg("--to")
        .arg(format!("s3://{}/{prefix}/", s3.buckets[0]));
    let out = run(s3.env(&mut cmd));
    assert!(out.status.success());

    for d in [&a, &b] {
        assert!(
            same_bytes(&img, &d.join("disk-1g.qcow2")),
            "{}",
            d.display()
        );
        let m = manifest(&d.join("disk-1g.qcow2.manifest.json"));
        assert_eq!(m["crc32c"], format!("{crc:08x}"));
        assert_eq!(m["file_size_bytes"], 1u64 << 30);
        assert_eq!(m["part_count"], 32);
    }
    let store = s3.store(&s3.buckets[0]);
    let key = format!("{prefix}/disk-1g.qcow2");
    assert!(s3_object_equals(&store, &key, &img));
    assert_eq!(
        s3_part_count(&store, &key),
        Some(32),
        "S3 object is not multipart"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&s3_get(&store, &format!("{key}.manifest.json")).unwrap()).unwrap();
    assert_eq!(m["crc32c"], format!("{crc:08x}"));
    assert_eq!(m["parts"].as_array().unwrap().len(), 32);

    let stderr = String::from_utf8_lossy(&out.stderr);
    let rss_kib: u64 = stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .expect("time -v reports the peak RSS")
        .trim()
        .parse()
        .unwrap();
    eprintln!("peak RSS {} MiB", rss_kib / 1024);
    assert!(
        rss_kib < (256 + 64) * 1024,
        "peak RSS {rss_kib} KiB is above memory_limit + 64 MiB"
    );
}

/// Acceptance: a destination whose server stops mid-push fails alone; the others
/// finish and verify, and ferry exits non-zero naming the failed destination.
#[test]
fn a_stopped_server_fails_only_its_destination() {
    if s3().is_none() {
        return;
    }
    let dir = tmpdir();
    let weed_dir = dir.path().join("weed");
    let port = 18433;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/seaweedfs.sh");
    let started = Command::new("bash")
        .args([script, "start"])
        .arg(&weed_dir)
        .arg(port.to_string())
        .status()
        .unwrap();
    assert!(started.success(), "second SeaweedFS did not start");
    let stop = || {
        Command::new("bash")
            .args([script, "stop"])
            .arg(&weed_dir)
            .status()
            .unwrap()
    };
    let created = Command::new("bash")
        .args([script, "bucket", &port.to_string(), "ferry-doomed"])
        .status()
        .unwrap();
    assert!(created.success());

    let img = dir.path().join("big.vmdk");
    random_file(&img, 1 << 30, 2);
    let endpoint = format!("http://127.0.0.1:{port}");
    let cfg = config(
        dir.path(),
        &format!(
            r#"
[transfer]
part_size = "8MiB"
max_retries = 2
retry_base_ms = 100
retry_max_ms = 400

[destinations.local]
url = "file://{}/local/"

[destinations.doomed]
url = "s3://ferry-doomed/x/"
endpoint = "{endpoint}"
parallel_parts = 1
"#,
            dir.path().display()
        ),
    );
    let mut child = ferry()
        .args(["push", "--force", "--progress-secs", "1", "--config"])
        .arg(&cfg)
        .arg(&img)
        .env("AWS_ACCESS_KEY_ID", key_id())
        .env("AWS_SECRET_ACCESS_KEY", secret())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stop the server once the doomed destination has sent something.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = Vec::new();
    let mut stopped = false;
    while Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        log.push(line.clone());
        if line.contains(": doomed: ") && !line.contains(": doomed: 0 B of") {
            assert!(
                !line.contains("[verified]"),
                "the upload ended before the stop"
            );
            stop();
            stopped = true;
            break;
        }
    }
    assert!(
        stopped,
        "never saw progress for doomed:\n{}",
        log.join("\n")
    );
    let status = child.wait().unwrap();
    log.extend(rx.try_iter());
    stop();
    let stdout = {
        use std::io::Read;
        let mut s = String::new();
        child.stdout.take().unwrap().read_to_string(&mut s).unwrap();
        s
    };
    eprintln!("{stdout}\n{}", log.join("\n"));
    assert_eq!(status.code(), Some(1));
    assert!(same_bytes(&img, &dir.path().join("local/big.vmdk")));
    assert!(dir.path().join("local/big.vmdk.manifest.json").exists());
    assert!(stdout.contains("verified") && stdout.contains("at local"));
    let failed: Vec<&String> = log
        .iter()
        .filter(|l| l.starts_with("ferry: FAILED"))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("doomed"), "{}", failed[0]);
}

/// Bad input: one clear line on stderr, exit status 2, and nothing uploaded.
#[test]
fn bad_input_is_refused_in_one_line_and_nothing_is_uploaded() {
    let dir = tmpdir();
    let d = dir.path();
    let out_dir = d.join("out");
    let to = format!("file://{}/", out_dir.display());
    let good = d.join("good.qcow2");
    random_file(&good, 1 << 20, 3);
    std::fs::create_dir(d.join("adir")).unwrap();
    std::os::unix::fs::symlink(&good, d.join("link.qcow2")).unwrap();
    let fifo = d.join("fifo.qcow2");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    std::fs::write(d.join("empty.qcow2"), b"").unwrap();
    let typo = config(d, "[transfer]\npart_sise = \"8MiB\"\n");
    let broken = write(&d.join("broken.toml"), "[transfer\n");

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing",
            vec![
                d.join("nope.qcow2").display().to_string(),
                "--to".into(),
                to.clone(),
            ],
            "no such file",
        ),
        (
            "directory",
            vec![
                d.join("adir").display().to_string(),
                "--to".into(),
                to.clone(),
            ],
            "directory",
        ),
        (
            "symlink",
            vec![
                d.join("link.qcow2").display().to_string(),
                "--to".into(),
                to.clone(),
            ],
            "symbolic link",
        ),
        (
            "fifo",
            vec![fifo.display().to_string(), "--to".into(), to.clone()],
            "FIFO",
        ),
        (
            "empty",
            vec![
                d.join("empty.qcow2").display().to_string(),
                "--to".into(),
                to.clone(),
            ],
            "empty",
        ),
        (
            "unknown name",
            vec![good.display().to_string(), "--to".into(), "nowhere".into()],
            "unknown destination",
        ),
        (
            "bad url",
            vec![good.display().to_string(), "--to".into(), "s3://".into()],
            "no bucket",
        ),
        (
            "bad scheme",
            vec![good.display().to_string(), "--to".into(), "ftp://x/".into()],
            "not a destination URL",
        ),
        (
            "part size over the stores' limit",
            vec![
                good.display().to_string(),
                "--part-size".into(),
                "100TiB".into(),
                "--to".into(),
                to.clone(),
            ],
            "outside what multipart uploads take",
        ),
        (
            "'..' in a directory URL",
            vec![
                good.display().to_string(),
                "--to".into(),
                format!("file://{}/x/../y/", d.display()),
            ],
            "'..'",
        ),
        (
            "a query in a URL",
            vec![
                good.display().to_string(),
                "--to".into(),
                "s3://bkt/p?x=1".into(),
            ],
            "query",
        ),
        (
            "config typo",
            vec![
                good.display().to_string(),
                "--config".into(),
                typo.display().to_string(),
                "--to".into(),
                to.clone(),
            ],
            "part_sise",
        ),
        (
            "broken config",
            vec![
                good.display().to_string(),
                "--config".into(),
                broken.display().to_string(),
                "--to".into(),
                to.clone(),
            ],
            "broken.toml",
        ),
    ];
    for (what, args, expect) in cases {
        let out = run(ferry().args(["push", "--force"]).args(&args));
        assert_eq!(out.status.code(), Some(2), "{what}");
        let lines = error_lines(&out);
        assert_eq!(lines.len(), 1, "{what}: {lines:?}");
        assert!(
            lines[0].contains(expect),
            "{what}: {:?} lacks {expect:?}",
            lines[0]
        );
        assert!(
            !out_dir.exists() || std::fs::read_dir(&out_dir).unwrap().next().is_none(),
            "{what}: something was uploaded"
        );
    }
}

/// `--verify readback` re-reads every object; memory:// works as a destination.
#[test]
fn readback_verification_and_memory_destination() {
    let dir = tmpdir();
    let img = dir.path().join("small.vmdk");
    let crc = random_file(&img, 13 << 20, 4);
    let a = dir.path().join("a");
    let out = run(ferry()
        .args(["push", "--force"])
        .arg(&img)
        .args(["--verify", "readback", "--part-size", "5MiB", "--to"])
        .arg(format!("file://{}/", a.display()))
        .args(["--to", "memory://bench/x/"]));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("[readback]").count(), 2, "{stdout}");
    let m = manifest(&a.join("small.vmdk.manifest.json"));
    assert_eq!(m["verify"], "readback");
    assert_eq!(m["crc32c"], format!("{crc:08x}"));
    assert_eq!(m["part_count"], 3);
    assert!(same_bytes(&img, &a.join("small.vmdk")));
}

/// Without --config, push uses the embedded default: two file:// regions under ./var.
#[test]
fn embedded_default_ships_to_var_regions() {
    let dir = tmpdir();
    let img = dir.path().join("default.qcow2");
    random_file(&img, 6 << 20, 5);
    let out = run(ferry()
        .current_dir(dir.path())
        .args(["push", "--force", "default.qcow2"]));
    assert!(out.status.success());
    for region in ["phoenix", "frankfurt"] {
        let obj = dir
            .path()
            .join(format!("var/regions/{region}/images/default.qcow2"));
        assert!(same_bytes(&img, &obj), "{region}");
        assert!(
            obj.with_extension("qcow2.manifest.json").exists(),
            "{region}"
        );
    }
}

/// All three S3 buckets ("regions") at once, one of them with readback.
#[test]
fn three_s3_regions_at_once() {
    let Some(s3) = s3() else { return };
    let dir = tmpdir();
    let img = dir.path().join("three.qcow2");
    random_file(&img, 40 << 20, 6);
    let prefix = unique_prefix("three");
    let mut cmd = ferry();
    cmd.args(["push", "--force"])
        .arg(&img)
        .args(["--part-size", "8MiB"]);
    for b in &s3.buckets {
        cmd.arg("--to").arg(format!("s3://{b}/{prefix}/"));
    }
    let out = run(s3.env(&mut cmd));
    assert!(out.status.success());
    for b in &s3.buckets {
        let store = s3.store(b);
        let key = format!("{prefix}/three.qcow2");
        assert!(s3_object_equals(&store, &key, &img), "{b}");
        assert_eq!(s3_part_count(&store, &key), Some(5), "{b}");
    }
}

/// Runs openssl in `dir`; panics with its words if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An S3 endpoint behind HTTPS whose certificate a private CA signed (the
/// relay, in front of SeaweedFS): refused without `ca_file`, with words that
/// say the certificate was the reason; shipped and verified with it.
#[test]
fn an_https_endpoint_signed_by_a_private_ca_needs_ca_file() {
    let Some(s3) = s3() else { return };
    let dir = tmpdir();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ferry test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
        ],
    );
    write(
        &d.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.pem",
        ],
    );
    let port: u16 = s3.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let relay = Relay::tls_to(port, &d.join("leaf.pem"), &d.join("leaf.key"));
    let endpoint = format!("https://127.0.0.1:{}", relay.port);
    let img = d.join("tls.qcow2");
    random_file(&img, 12 << 20, 8);
    let prefix = unique_prefix("tls");
    let table = |extra: &str| {
        config(
            d,
            &format!(
                "state_dir = \"{}/state\"\n[transfer]\npart_size = \"5MiB\"\nmax_retries = 1\n[destinations.private]\nurl = \"s3://{}/{prefix}/\"\nendpoint = \"{endpoint}\"\n{extra}",
                d.display(),
                s3.buckets[0]
            ),
        )
    };
    let push = |cfg: &Path| {
        run(s3.env(
            ferry()
                .args(["push", "--force"])
                .arg(&img)
                .arg("--config")
                .arg(cfg),
        ))
    };
    let without = push(&table(""));
    assert_eq!(without.status.code(), Some(1));
    let err = String::from_utf8_lossy(&without.stderr).to_lowercase();
    assert!(
        err.contains("certificate") && err.contains("ca_file"),
        "{err}"
    );
    let with = push(&table(&format!("ca_file = \"{}/ca.pem\"\n", d.display())));
    assert!(with.status.success());
    let store = s3.store(&s3.buckets[0]);
    assert!(s3_object_equals(
        &store,
        &format!("{prefix}/tls.qcow2"),
        &img
    ));
}
