//! The README's quick start and the `--help` texts, run as written: a new
//! operator's first hour, held to what the code does (issue 13, items 5 and 8).
//!
//! The shell blocks are read from README.md and from `ferry daemon --help`,
//! not copied here, so a change to either that stops working fails the suite.
//! Only what a test cannot do as written is replaced, each named where it
//! happens: `cargo run --release -- daemon` is the built binary started in the
//! test's directory, and the S3 block gets a free port and a temporary data
//! directory instead of 8333 and /tmp/ferry-weed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// Both examples run the embedded default, whose metrics port is fixed
/// (127.0.0.1:9465): one at a time.
static DEFAULT_PORT: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fenced `sh` blocks of the README's "## Quick start", in order.
fn quick_start_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("\n## Quick start\n")
        .expect("a Quick start section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let mut blocks = Vec::new();
    let mut open: Option<String> = None;
    for line in section.lines() {
        match (&mut open, line.trim_end()) {
            (None, "```sh") => open = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                open = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Runs `script` with `sh -eu` in `dir`; panics with its output if it fails.
fn sh(dir: &Path, script: &str) -> String {
    let out = run(Command::new("sh")
        .args(["-euc", script])
        .current_dir(dir)
        .env_remove("FERRY_LOG"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "this failed:\n{script}\n--- output\n{text}"
    );
    text
}

/// Starts `ferry daemon` on the embedded default in `dir`, as `ferry daemon`
/// or `cargo run --release -- daemon` would there.
fn default_daemon(dir: &Path) -> Daemon {
    let log = dir.join("daemon.log");
    let out = std::fs::File::create(&log).unwrap();
    // No --config: the embedded default, relative to the directory.
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("daemon")
        .current_dir(dir)
        .env_remove("FERRY_LOG")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Daemon { child, log }
}

/// Waits until the daemon shipped `disk.qcow2` to both default regions and
/// moved it to done/, as the quick start says.
fn shipped_everywhere(dir: &Path, d: &Daemon) {
    let done = dir.join("spool/.ferry/done/disk.qcow2");
    assert!(
        wait_until(Duration::from_secs(60), || done.exists()),
        "disk.qcow2 never reached done/; log:\n{}",
        d.log_text()
    );
    for region in ["phoenix", "frankfurt"] {
        let images = dir.join(format!("var/regions/{region}/images"));
        assert_eq!(
            list(&images),
            vec!["disk.qcow2", "disk.qcow2.manifest.json"],
            "{region}"
        );
        assert!(same_bytes(&done, &images.join("disk.qcow2")), "{region}");
    }
    assert!(list(&dir.join("spool/.ferry/failed")).is_empty());
}

/// A port for SeaweedFS's S3 API: below 55000, with the three ports above it
/// and each of those + 10000 (its gRPC ports) free now.
fn weed_port() -> u16 {
    for _ in 0..200 {
        let p = 20000 + (rand::random::<u16>() % 30000);
        let free = |q: u16| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok();
        if (p..=p + 3).all(free) && (p + 10001..=p + 10003).all(free) {
            return p;
        }
    }
    panic!("no free ports for SeaweedFS");
}

/// Acceptance 3 of issue 13: the README from the top. Quick start on the
/// embedded default, the first image made by its recipe (inspect accepts it),
/// the drop with its sidecar, then the push to SeaweedFS, each block as written.
#[test]
fn the_readme_quick_start_works_as_written() {
    let _one = DEFAULT_PORT.lock().unwrap_or_else(|e| e.into_inner());
    let blocks = quick_start_blocks();
    assert_eq!(blocks.len(), 5, "{blocks:#?}");
    assert_eq!(blocks[0].trim(), "cargo run --release -- daemon");
    assert_eq!(blocks[4].trim(), "bash tests/run.sh");
    let dir = tmpdir();
    let dir = dir.path();
    let d = default_daemon(dir);
    // The first image, by the recipe.
    sh(dir, &blocks[1]);
    assert!(dir.join("disk.qcow2").is_file() && !dir.join("disk.raw").exists());
    let out = run(ferry().args(["inspect", "disk.qcow2"]).current_dir(dir));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("verdict: ACCEPT"), "{said}");
    // `ferry inspect --help` shows this very output.
    let help = String::from_utf8(run(ferry().args(["inspect", "--help"])).stdout).unwrap();
    for line in said.lines().take(2) {
        assert!(
            help.contains(line),
            "inspect --help lacks {line:?}:\n{help}"
        );
    }
    // The drop: a sidecar the default policy accepts, then the rename.
    assert!(wait_until(Duration::from_secs(20), || dir
        .join("spool")
        .is_dir()));
    sh(dir, &blocks[2]);
    shipped_everywhere(dir, &d);
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("var/regions/phoenix/images/disk.qcow2.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["image"]["verdict"], "accept", "{m}");
    assert_eq!(m["image"]["license"]["model"], "BYOL", "{m}");
    // The default's directories are relative; the manifest names the file
    // where it lies, whatever directory the reader is in.
    assert_eq!(
        m["destination"]["path"],
        dir.join("var/regions/phoenix/images/disk.qcow2")
            .display()
            .to_string(),
        "{m}"
    );
    drop(d);

    // A push to SeaweedFS: the block as written, run from the repository
    // (the script's path is relative to it), on ports that are free now.
    let port = weed_port().to_string();
    let weed_dir = dir.join("weed");
    let block = blocks[3]
        .replace("8333", &port)
        .replace("/tmp/ferry-weed", weed_dir.to_str().unwrap())
        .replace("target/release/ferry", env!("CARGO_BIN_EXE_ferry"))
        .replace("disk.qcow2", dir.join("disk.qcow2").to_str().unwrap());
    let said = sh(
        &repo(),
        &format!(
            "trap 'tests/support/seaweedfs.sh stop {w}' EXIT\n{block}",
            w = weed_dir.display()
        ),
    );
    assert!(said.contains("verified"), "{said}");
}

/// Issue 13, item 5: `ferry daemon --help`'s EXAMPLE works as written in an
/// empty directory: the image it makes is taken, not refused for want of a
/// sidecar or a boot signature.
#[test]
fn the_daemon_help_example_works_as_written() {
    let _one = DEFAULT_PORT.lock().unwrap_or_else(|e| e.into_inner());
    // As an 80-column terminal shows it (clap wraps help to the terminal's
    // width, and reads COLUMNS when there is none): a wrapped line would
    // break the script.
    let help =
        String::from_utf8(run(ferry().args(["daemon", "--help"]).env("COLUMNS", "80")).stdout)
            .unwrap();
    let example = &help[help.find("\nEXAMPLE").expect("an EXAMPLE section")..];
    let mut lines = example.lines().skip(2);
    assert_eq!(
        lines
            .next()
            .and_then(|l| l.split('#').next())
            .map(str::trim),
        Some("ferry daemon")
    );
    // The rest is a script; the help indents its commands by two spaces.
    let script: String = lines
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        script.contains("meta.json") && script.contains("mv "),
        "{script}"
    );
    let dir = tmpdir();
    let dir = dir.path();
    let d = default_daemon(dir);
    assert!(wait_until(Duration::from_secs(20), || dir
        .join("spool")
        .is_dir()));
    sh(dir, &script);
    shipped_everywhere(dir, &d);
}

/// Issue 13, item 8: what each `--help` must say.
#[test]
fn every_help_has_its_sections() {
    let help = |args: &[&str]| String::from_utf8(run(ferry().args(args)).stdout).unwrap();
    let top = help(&["--help"]);
    for want in ["EXIT STATUS", "  130", "ENVIRONMENT", "FERRY_LOG"] {
        assert!(top.contains(want), "ferry --help lacks {want:?}");
    }
    let daemon = help(&["daemon", "--help"]);
    for want in [
        "EXIT STATUS",
        "FILES",
        "ENVIRONMENT",
        "ENDPOINTS",
        "SIGNALS",
        "EXAMPLE",
        "FERRY_LOG",
        "AWS_ACCESS_KEY_ID",
        "/metrics",
        "/healthz",
        "/readyz",
        "/status",
        ".ferry/failed/",
        "last-success.json",
        "  130",
    ] {
        assert!(daemon.contains(want), "daemon --help lacks {want:?}");
    }
    let push = help(&["push", "--help"]);
    for want in [
        "EXIT STATUS",
        "ENVIRONMENT",
        "FERRY_LOG",
        "AWS_ENDPOINT_URL",
        "AWS_SECRET_ACCESS_KEY",
        "transfer.part_size (64MiB",
        "transfer.verify (head",
        "  130",
    ] {
        assert!(push.contains(want), "push --help lacks {want:?}");
    }
    // The defaults it names are the embedded config's.
    let config = std::fs::read_to_string(repo().join("config/ferry.toml")).unwrap();
    for line in ["part_size = \"64MiB\"", "verify = \"head\""] {
        assert!(config.contains(line), "config/ferry.toml lacks {line:?}");
    }
    let inspect = help(&["inspect", "--help"]);
    for want in [
        "EXIT STATUS",
        "SIDECAR",
        "EXAMPLES",
        "license.attested_at",
        "placeholder",
    ] {
        assert!(inspect.contains(want), "inspect --help lacks {want:?}");
    }
}
