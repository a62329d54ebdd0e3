//! README.md's "Running as a service", held to `systemd/ferry.service`: the
//! steps run as root, keep the credentials file root's alone, install what the
//! unit names, and the drop-ins the section shows (a `file://` destination
//! outside the spool, `CAP_LEASE`) pass `systemd-analyze verify` with the unit.
//!
//! Design choice: the drop-ins are read from the README's own fenced blocks and
//! installed under the names the README gives them, so the README is the
//! example under test. `systemd-analyze verify` only warns about a bad drop-in
//! line and still exits 0, so each drop-in is also verified broken, and the
//! warning must name it: that proves the drop-in was read at all.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SECTION_START: &str = "\n### Running as a service\n";
const SECTION_END: &str = "\n## `ferry inspect`";
const DROP_IN_DIR: &str = "/etc/systemd/system/ferry.service.d/";

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

fn unit() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/ferry.service"
    ))
    .unwrap()
}

/// The text from "### Running as a service" to the next section.
fn section(readme: &str) -> &str {
    let start = readme
        .find(SECTION_START)
        .expect("README has a \"### Running as a service\" section");
    let len = readme[start..]
        .find(SECTION_END)
        .expect("\"## `ferry inspect`\" follows the service section");
    &readme[start..start + len]
}

/// A fenced block: its info string, its text, and the prose since the block before it.
struct Block {
    lang: String,
    text: String,
    before: String,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    let mut prose = String::new();
    for line in text.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (open.take(), fence) {
            (None, Some(lang)) => open = Some((lang.trim().to_string(), String::new())),
            (None, None) => {
                prose.push_str(line);
                prose.push('\n');
            }
            (Some((lang, text)), Some(_)) => out.push(Block {
                lang,
                text,
                before: std::mem::take(&mut prose),
            }),
            (Some((lang, mut text)), None) => {
                text.push_str(line);
                text.push('\n');
                open = Some((lang, text));
            }
        }
    }
    assert!(
        open.is_none(),
        "a fenced block in the section is never closed"
    );
    out
}

/// The shell commands of the section's `sh` blocks, comments dropped.
fn commands(blocks: &[Block]) -> Vec<String> {
    blocks
        .iter()
        .filter(|b| b.lang == "sh")
        .flat_map(|b| b.text.lines())
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Every value of `key=` in a unit file or drop-in.
fn values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
        .collect()
}

/// The command that installs `src` (when given) to `dest`, with every one of `flags`.
fn installs<'a>(
    commands: &'a [String],
    src: Option<&str>,
    dest: &str,
    flags: &[&str],
) -> Option<&'a String> {
    commands.iter().find(|c| {
        // `[ -e FILE ] || install ...`: the install after a guard.
        let c = c.rsplit("|| ").next().unwrap_or(c);
        let words: Vec<&str> = c.split_whitespace().collect();
        words.first() == Some(&"install")
            && words.last() == Some(&dest)
            && src.is_none_or(|s| words.len() >= 3 && words[words.len() - 2] == s)
            && flags.iter().all(|f| c.contains(f))
    })
}

/// The drop-ins the section shows, each under the name the prose before it gives
/// (`/etc/systemd/system/ferry.service.d/NAME.conf`).
fn drop_ins(blocks: &[Block]) -> Vec<(String, String)> {
    blocks
        .iter()
        .filter(|b| b.lang == "ini")
        .map(|b| {
            let at = b.before.rfind(DROP_IN_DIR).unwrap_or_else(|| {
                panic!(
                    "the README does not say where this drop-in goes:\n{}",
                    b.text
                )
            });
            let name: String = b.before[at + DROP_IN_DIR.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .collect();
            assert!(name.ends_with(".conf"), "drop-in name {name:?}");
            assert!(
                b.text.starts_with("[Service]\n"),
                "drop-in {name} is not a [Service] section"
            );
            (name, b.text.clone())
        })
        .collect()
}

#[test]
fn readme_service_steps_run_as_root_and_install_what_the_unit_names() {
    let readme = readme();
    let section = section(&readme);
    let blocks = blocks(section);
    let commands = commands(&blocks);
    let unit = unit();
    assert!(
        section.contains("as root"),
        "the steps do not say who runs them"
    );
    for b in &blocks {
        assert!(!b.text.contains("sudo "), "a step uses sudo:\n{}", b.text);
    }

    // The unit itself, and the file its Documentation= names, so the link works offline.
    assert!(
        installs(
            &commands,
            Some("systemd/ferry.service"),
            "/etc/systemd/system/ferry.service",
            &[]
        )
        .is_some(),
        "the steps do not install the unit"
    );
    let docs = values(&unit, "Documentation");
    assert!(!docs.is_empty(), "the unit has no Documentation=");
    for url in docs.iter().flat_map(|d| d.split_whitespace()) {
        if let Some(path) = url.strip_prefix("file://") {
            assert!(
                installs(&commands, Some("README.md"), path, &["-m 0644"]).is_some(),
                "the unit's Documentation= names {path}, which the steps never install"
            );
        }
    }

    // Credentials: EnvironmentFile= is read by systemd as root, so it is root's alone;
    // the config is read by the daemon as its own group, on start and on reload.
    let env_files = values(&unit, "EnvironmentFile");
    assert_eq!(env_files.len(), 1, "{env_files:?}");
    let env_file = env_files[0].trim_start_matches('-');
    let made = installs(
        &commands,
        None,
        env_file,
        &["-m 0600", "-o root", "-g root"],
    )
    .unwrap_or_else(|| panic!("the steps do not make {env_file} 0600 root:root"));
    // Steps run again (an upgrade) must not empty the credentials.
    assert!(
        made.starts_with(&format!("[ -e {env_file} ] || ")),
        "running the steps again would empty {env_file}: {made}"
    );
    let exec_start = values(&unit, "ExecStart").concat();
    let config = exec_start
        .split_whitespace()
        .skip_while(|w| *w != "--config")
        .nth(1)
        .expect("ExecStart names its --config");
    let group = values(&unit, "Group").concat();
    assert!(
        installs(
            &commands,
            None,
            config,
            &["-m 0640", "-o root", &format!("-g {group}")]
        )
        .is_some(),
        "the steps do not make {config} 0640 root:{group}"
    );

    // A file:// destination outside what the unit may write: named, created, owned by ferry.
    let user = values(&unit, "User").concat();
    let writable: Vec<String> = values(&unit, "ReadWritePaths")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect();
    let added: Vec<String> = drop_ins(&blocks)
        .iter()
        .flat_map(|(_, text)| values(text, "ReadWritePaths"))
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    assert!(!added.is_empty(), "no drop-in adds to ReadWritePaths=");
    for path in &added {
        assert!(path.starts_with('/'), "{path} is not absolute");
        assert!(
            !writable.iter().any(|w| Path::new(path).starts_with(w)),
            "{path} is inside what the unit already lets ferry write: {writable:?}"
        );
        assert!(
            section.contains(&format!("file://{path}/")),
            "the README does not show the file:// destination at {path}"
        );
        assert!(
            commands.iter().any(|c| c.starts_with("install -d")
                && c.contains(&format!("-o {user}"))
                && c.split_whitespace().last() == Some(path.as_str())),
            "the steps do not create {path} for {user}"
        );
    }
}

/// Whether `systemd-analyze` is here; under tests/run.sh it must be.
fn have_systemd_analyze() -> bool {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: systemd-analyze is not installed (tests/run.sh installs it)");
        assert!(
            std::env::var_os("FERRY_REQUIRE_S3").is_none(),
            "tests/run.sh should have installed systemd"
        );
        return false;
    };
    assert!(out.status.success());
    true
}

/// The unit as shipped passes `systemd-analyze verify` and keeps its hardening.
#[test]
fn systemd_unit_verifies() {
    if !have_systemd_analyze() {
        return;
    }
    let dir = common::tmpdir();
    let unit = unit();
    for key in [
        "Type=notify",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "WatchdogSec=",
        "LimitNOFILE=",
    ] {
        assert!(unit.contains(key), "unit lacks {key}");
    }
    let unit = unit.replace("/usr/local/bin/ferry", env!("CARGO_BIN_EXE_ferry"));
    let path = dir.path().join("ferry.service");
    std::fs::write(&path, unit).unwrap();
    let out = common::run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ferry.service:"),
        "warnings about the unit: {stderr}"
    );
}

#[test]
fn readme_drop_ins_verify_with_the_unit() {
    if !have_systemd_analyze() {
        return;
    }
    let readme = readme();
    let drop_ins = drop_ins(&blocks(section(&readme)));
    assert!(
        drop_ins
            .iter()
            .any(|(_, text)| text.contains("ReadWritePaths=")),
        "the README shows no ReadWritePaths= drop-in"
    );

    let dir = common::tmpdir();
    let units = dir.path().join("units");
    let drop_in_dir = units.join("ferry.service.d");
    std::fs::create_dir_all(&drop_in_dir).unwrap();
    let unit = unit();
    let program = values(&unit, "ExecStart").concat();
    let program = program
        .split_whitespace()
        .next()
        .expect("ExecStart= is empty");
    let unit = unit.replace(
        &format!("ExecStart={program} "),
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_ferry")),
    );
    let unit_path = units.join("ferry.service");
    std::fs::write(&unit_path, unit).unwrap();
    for (name, text) in &drop_ins {
        std::fs::write(drop_in_dir.join(name), text).unwrap();
    }

    let (ok, stderr) = verify(dir.path(), &units, &unit_path);
    assert!(ok, "systemd-analyze verify failed:\n{stderr}");
    assert!(
        !stderr.contains("ferry.service") && !stderr.contains(&units.display().to_string()),
        "warnings about the unit or its drop-ins:\n{stderr}"
    );

    // Each drop-in broken in turn: its first key misspelled, and, for a path,
    // the path made relative. Each must be reported against that drop-in.
    for (name, text) in &drop_ins {
        let (line, key) = text
            .lines()
            .find_map(|l| l.split_once('=').map(|(k, _)| (l, k)))
            .expect("a drop-in sets something");
        let mut broken = vec![(
            text.replacen(line, &line.replacen(key, &format!("{key}z"), 1), 1),
            "Unknown key",
        )];
        if key == "ReadWritePaths" {
            broken.push((
                text.replacen("ReadWritePaths=/", "ReadWritePaths=", 1),
                "not absolute",
            ));
        }
        for (bad, expect) in broken {
            std::fs::write(drop_in_dir.join(name), &bad).unwrap();
            let (_, stderr) = verify(dir.path(), &units, &unit_path);
            assert!(
                stderr.contains(&format!("{name}:")) && stderr.contains(expect),
                "a broken {name} went unreported ({expect:?} expected):\n{bad}\n{stderr}"
            );
        }
        std::fs::write(drop_in_dir.join(name), text).unwrap();
    }
}

/// `systemd-analyze verify UNIT` with the unit search path set to `units` and
/// the distribution's units only, so no drop-in installed on this host is read.
/// Gives success and stderr; gives up after a minute.
fn verify(scratch: &Path, units: &Path, unit: &Path) -> (bool, String) {
    let path = [
        units.to_path_buf(),
        PathBuf::from("/usr/lib/systemd/system"),
        PathBuf::from("/lib/systemd/system"),
    ];
    let stderr_path = scratch.join("verify.stderr");
    let mut child = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .env("SYSTEMD_UNIT_PATH", std::env::join_paths(path).unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let limit = Duration::from_secs(60);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("systemd-analyze verify ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    eprintln!("--- systemd-analyze verify: {status}\n{stderr}");
    (status.success(), stderr)
}
