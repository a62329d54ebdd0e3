//! README.md's "Running as a service", held to `systemd/ferry.service` and to
//! the Debian package that installs it: the steps build the package, install it
//! as root, edit the config the unit names and enable the unit; the package
//! metadata in `Cargo.toml` installs every file the unit names (the binary at
//! `ExecStart=`, its config, the `Documentation=` pages) and its maintainer
//! scripts make the user, directories and credentials file the unit expects;
//! the man pages and shell completions `ferry assets` writes cover every
//! command and option; and the drop-ins the section shows (a `file://`
//! destination outside the spool, `CAP_LEASE`) pass `systemd-analyze verify`
//! with the unit.
//!
//! Design choice: these tests need neither cargo-deb nor a package build; they
//! read what the package is made from. `packaging/check-deb.sh` builds the real
//! package and installs it in a scratch Debian root (README.md says why that is
//! a separate script). The drop-ins are read from the README's own fenced blocks
//! and installed under the names the README gives them, so the README is the
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

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn readme() -> String {
    repo_file("README.md")
}

fn unit() -> String {
    repo_file("systemd/ferry.service")
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

/// The position of the first command that starts with `start`, or a failure naming it.
fn step(commands: &[String], start: &str) -> usize {
    commands
        .iter()
        .position(|c| c.starts_with(start))
        .unwrap_or_else(|| panic!("no step starts with `{start}`: {commands:#?}"))
}

/// The program and the `--config` file of the unit's `ExecStart=`.
fn exec_start(unit: &str) -> (String, String) {
    let exec_start = values(unit, "ExecStart").concat();
    let program = exec_start
        .split_whitespace()
        .next()
        .expect("ExecStart= is empty")
        .to_string();
    let config = exec_start
        .split_whitespace()
        .skip_while(|w| *w != "--config")
        .nth(1)
        .expect("ExecStart names its --config")
        .to_string();
    (program, config)
}

/// `[package.metadata.deb]` of Cargo.toml.
fn deb_metadata() -> toml::Table {
    let manifest: toml::Table = repo_file("Cargo.toml").parse().expect("Cargo.toml parses");
    manifest
        .get("package")
        .and_then(|p| p.get("metadata"))
        .and_then(|m| m.get("deb"))
        .and_then(|d| d.as_table())
        .cloned()
        .expect("Cargo.toml has [package.metadata.deb]")
}

/// One of cargo-deb's `assets`: source (a path or glob in the repository), where it
/// goes in the package (a directory when it ends in '/'), and its mode.
struct Asset {
    source: String,
    dest: String,
    mode: String,
}

fn deb_assets(meta: &toml::Table) -> Vec<Asset> {
    let list = meta
        .get("assets")
        .and_then(|a| a.as_array())
        .expect("[package.metadata.deb] lists its assets");
    list.iter()
        .map(|a| {
            let fields: Vec<&str> = a
                .as_array()
                .unwrap_or_else(|| panic!("asset {a} is not [source, dest, mode]"))
                .iter()
                .map(|f| f.as_str().expect("asset fields are strings"))
                .collect();
            assert_eq!(
                fields.len(),
                3,
                "asset {fields:?} is not [source, dest, mode]"
            );
            Asset {
                source: fields[0].to_string(),
                dest: fields[1].to_string(),
                mode: fields[2].to_string(),
            }
        })
        .collect()
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(after) = name.strip_prefix(head) else {
                return false;
            };
            (0..=after.len())
                .filter(|i| after.is_char_boundary(*i))
                .any(|i| glob_match(rest, &after[i..]))
        }
    }
}

/// The asset that installs the absolute path `path`, if any.
fn installing<'a>(assets: &'a [Asset], path: &str) -> Option<&'a Asset> {
    let path = path.strip_prefix('/').expect("an absolute path");
    assets.iter().find(|a| {
        if let Some(dir) = a.dest.strip_suffix('/') {
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
            let pattern = a.source.rsplit('/').next().unwrap_or(&a.source);
            parent == dir && glob_match(pattern, name)
        } else {
            a.dest == path
        }
    })
}

/// A maintainer script of the package, from the directory its metadata names.
fn maintainer_script(meta: &toml::Table, name: &str) -> (PathBuf, String) {
    let dir = meta
        .get("maintainer-scripts")
        .and_then(|d| d.as_str())
        .expect("[package.metadata.deb] names its maintainer-scripts");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the package has no {name}: {}: {e}", path.display()));
    (path, text)
}

/// The commands `ferry --help` lists (not `help`).
fn subcommands() -> Vec<String> {
    let out = common::run(Command::new(env!("CARGO_BIN_EXE_ferry")).arg("--help"));
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let listed: Vec<String> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase()))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect();
    assert!(!listed.is_empty(), "ferry --help lists no command:\n{help}");
    listed
}

/// The long options `ferry ARGS --help` lists.
fn long_options(args: &[&str]) -> Vec<String> {
    let out = common::run(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .arg("--help"),
    );
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = match l.split_once(", ") {
                Some((short, rest)) if short.len() == 2 && short.starts_with('-') => rest,
                _ => l,
            };
            let name: String = l
                .strip_prefix("--")?
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty()).then(|| format!("--{name}"))
        })
        .collect()
}

/// Runs `ferry assets DIR` and gives DIR/man and DIR/completions.
fn write_assets(dir: &Path) -> (PathBuf, PathBuf) {
    let out = common::run(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("assets")
            .arg(dir),
    );
    assert!(out.status.success(), "ferry assets failed");
    (dir.join("man"), dir.join("completions"))
}

/// A MANPATH under `scratch` whose man1/ holds the pages `ferry assets` writes, so
/// that `systemd-analyze verify` finds the unit's `Documentation=man:...` pages.
fn man_path(scratch: &Path) -> PathBuf {
    let (man, _) = write_assets(&scratch.join("assets"));
    let root = scratch.join("manpath");
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(&man, root.join("man1")).unwrap();
    root
}

#[test]
fn readme_service_steps_build_and_install_the_package() {
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

    // Build (cargo-deb, then the script), install, edit the config the unit
    // names, enable: in that order.
    let (_, config) = exec_start(&unit);
    let order = [
        step(&commands, "cargo install cargo-deb"),
        step(&commands, "bash packaging/build-deb.sh"),
        step(&commands, "apt install ./"),
        step(&commands, &format!("editor {config}")),
        step(&commands, "systemctl enable --now ferry"),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "the steps are out of order (build, install, edit, enable): {commands:#?}"
    );
    for script in ["packaging/build-deb.sh", "packaging/check-deb.sh"] {
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(script).is_file(),
            "{script} is missing"
        );
    }
    // What apt installs is what cargo-deb makes: target/debian/NAME_VERSION-REV_ARCH.deb.
    let name = deb_metadata()
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or("ferry")
        .to_string();
    let install = &commands[order[2]];
    assert!(
        install.starts_with(&format!("apt install ./target/debian/{name}_"))
            && install.ends_with(".deb"),
        "the install step does not take the package cargo-deb makes: {install}"
    );
    assert!(
        section.contains("bash packaging/check-deb.sh") && section.contains("tests/run.sh"),
        "the section does not say how to check the package, apart from the test suite"
    );

    // Credentials: the unit's EnvironmentFile= is made by the package, root's alone.
    let env_files = values(&unit, "EnvironmentFile");
    assert_eq!(env_files.len(), 1, "{env_files:?}");
    let env_file = env_files[0].trim_start_matches('-');
    assert!(
        section.contains(env_file) && section.contains("0600 root:root"),
        "the section does not say that {env_file} is 0600 root:root"
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

#[test]
fn package_installs_what_the_unit_names() {
    let unit = unit();
    let meta = deb_metadata();
    let assets = deb_assets(&meta);

    // The unit itself: cargo-deb takes PACKAGE.service from the unit-scripts
    // directory, which must be the repository's systemd/.
    let units = meta
        .get("systemd-units")
        .and_then(|u| u.as_table())
        .expect("[package.metadata.deb] has systemd-units");
    assert_eq!(
        units.get("unit-scripts").and_then(|d| d.as_str()),
        Some("systemd"),
        "the package's unit is not systemd/ferry.service"
    );
    // Neither enabled nor started on install, as the README says (the packaged
    // config ships to example directories until the operator edits it).
    for key in ["enable", "start"] {
        assert_eq!(
            units.get(key).and_then(|v| v.as_bool()),
            Some(false),
            "systemd-units.{key} is not false"
        );
    }
    assert!(readme().contains("neither enabled nor started on install"));

    // The binary ExecStart= runs, built by cargo, and the config it reads.
    let (program, config) = exec_start(&unit);
    let binary = installing(&assets, &program)
        .unwrap_or_else(|| panic!("no asset installs {program}, the unit's ExecStart="));
    assert_eq!(binary.source, "target/release/ferry");
    assert_eq!(binary.mode, "755");
    assert!(
        config.starts_with("/etc/"),
        "{config} is outside /etc: dpkg would not keep it as a conffile"
    );
    let conf = installing(&assets, &config)
        .unwrap_or_else(|| panic!("no asset installs {config}, the unit's --config"));
    assert_eq!(conf.mode, "640", "{config} may hold a secret");

    // Documentation=: man pages (gzipped from `ferry assets`' NAME.SECTION) and files.
    let docs = values(&unit, "Documentation");
    assert!(!docs.is_empty(), "the unit has no Documentation=");
    let scratch = common::tmpdir();
    let (man, _) = write_assets(scratch.path());
    for url in docs.iter().flat_map(|d| d.split_whitespace()) {
        if let Some(page) = url.strip_prefix("man:") {
            let (name, sect) = page
                .strip_suffix(')')
                .and_then(|p| p.split_once('('))
                .unwrap_or_else(|| panic!("{url} is not man:NAME(SECTION)"));
            let path = format!("/usr/share/man/man{sect}/{name}.{sect}.gz");
            assert!(
                installing(&assets, &path).is_some(),
                "the unit's Documentation= names {url}, which no asset installs at {path}"
            );
            assert!(
                man.join(format!("{name}.{sect}")).is_file(),
                "ferry assets writes no {name}.{sect} for {url}"
            );
        } else if let Some(path) = url.strip_prefix("file://") {
            assert!(
                installing(&assets, path).is_some(),
                "the unit's Documentation= names {path}, which no asset installs"
            );
        } else {
            panic!("Documentation={url}: neither man: nor file://");
        }
    }

    // What the unit expects and the maintainer scripts make: its user and group,
    // the directories it may write, the credentials file root's alone.
    let (postinst_path, postinst) = maintainer_script(&meta, "postinst");
    let (postrm_path, postrm) = maintainer_script(&meta, "postrm");
    for (path, text) in [(&postinst_path, &postinst), (&postrm_path, &postrm)] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{} is not executable", path.display());
        // Where cargo-deb puts the unit's (de)registration.
        assert!(
            text.contains("#DEBHELPER#"),
            "{} lacks #DEBHELPER#",
            path.display()
        );
        assert!(text.starts_with("#!/bin/sh\n") && text.contains("\nset -e\n"));
    }
    let user = values(&unit, "User").concat();
    let group = values(&unit, "Group").concat();
    assert_eq!(
        user, group,
        "the postinst makes one group of the user's name"
    );
    assert!(
        postinst.contains(&format!("getent passwd {user}"))
            && postinst.contains("adduser --system")
            && postinst.contains(&format!("--shell /usr/sbin/nologin {user}\n")),
        "the postinst does not make the system user {user} (once)"
    );
    for dir in values(&unit, "ReadWritePaths")
        .iter()
        .flat_map(|v| v.split_whitespace())
    {
        assert!(
            postinst.contains(dir),
            "the postinst does not make {dir}, which the unit lets ferry write"
        );
    }
    assert!(postinst.contains(&format!("install -d -o {user} -g {group} -m 0750")));
    let env_file = values(&unit, "EnvironmentFile").concat();
    let env_file = env_file.trim_start_matches('-');
    assert!(
        postinst.contains(&format!("[ ! -e {env_file} ]")) && postinst.contains("umask 077"),
        "the postinst does not make {env_file} 0600, once"
    );
    assert!(
        postinst.contains(&format!(
            "dpkg-statoverride --update --add root {group} 0640 {config}"
        )),
        "the postinst does not give {config} to group {group}"
    );

    // Every asset kept in the repository exists; the others are made by
    // build-deb.sh: the pages (gzipped) and completions by `ferry assets`.
    let build = repo_file("packaging/build-deb.sh");
    let (_, completions) = write_assets(scratch.path());
    let made_by_assets = |dir: &Path, pattern: &str, suffix: &str| {
        std::fs::read_dir(dir).unwrap().any(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            glob_match(pattern, &format!("{name}{suffix}"))
        })
    };
    for a in &assets {
        if a.source.starts_with("target/release/") {
            continue;
        }
        let made = match a.source.strip_prefix("target/deb-assets/") {
            None => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(&a.source)
                .is_file(),
            Some(made) => match made.split_once('/') {
                Some(("man", pattern)) => {
                    build.contains("gzip -9n") && made_by_assets(&man, pattern, ".gz")
                }
                Some(("completions", pattern)) => made_by_assets(&completions, pattern, ""),
                _ => build.contains(&format!("$assets/{made}")),
            },
        };
        assert!(made, "nothing makes asset {}", a.source);
    }
}

/// `ferry assets DIR`: a man page per command naming its options, and bash and
/// zsh completions that their shells accept.
#[test]
fn assets_cover_every_command_and_option() {
    let scratch = common::tmpdir();
    let (man, completions) = write_assets(scratch.path());
    // clap_mangen writes a '-' as roff's \-.
    let page = |name: &str| -> String {
        let path = man.join(name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .replace("\\-", "-")
    };
    let commands = subcommands();
    let top = page("ferry.1");
    assert!(
        top.starts_with(".ie") || top.contains(".TH ferry 1"),
        "{top}"
    );
    for command in &commands {
        assert!(top.contains(command), "ferry.1 does not mention {command}");
        let text = page(&format!("ferry-{command}.1"));
        assert!(text.contains(&format!(".TH ferry-{command} 1")), "{text}");
        let options = long_options(&[command]);
        for option in &options {
            assert!(
                text.contains(option.as_str()),
                "ferry-{command}.1 does not mention {option}"
            );
        }
    }
    let options_of_all: Vec<String> = commands.iter().flat_map(|c| long_options(&[c])).collect();
    assert!(
        options_of_all.iter().any(|o| o == "--config"),
        "no command lists --config: {options_of_all:?}"
    );
    // The hidden `assets` itself gets no page.
    assert!(!man.join("ferry-assets.1").exists());

    let bash = completions.join("ferry.bash");
    let zsh = completions.join("_ferry");
    for (path, text) in [&bash, &zsh]
        .iter()
        .map(|p| (p, std::fs::read_to_string(p).unwrap()))
    {
        for command in &commands {
            assert!(
                text.contains(command.as_str()),
                "{} does not complete {command}",
                path.display()
            );
        }
        assert!(
            text.contains("--config"),
            "{} lacks --config",
            path.display()
        );
    }
    let out = common::run(Command::new("bash").arg("-n").arg(&bash));
    assert!(out.status.success(), "bash -n rejects {}", bash.display());
    // Sourced, it registers a completion for ferry.
    let out = common::run(
        Command::new("bash")
            .arg("-c")
            .arg("source \"$1\" && complete -p ferry")
            .arg("bash")
            .arg(&bash),
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ferry"));

    let zsh_text = std::fs::read_to_string(&zsh).unwrap();
    assert!(
        zsh_text.starts_with("#compdef ferry\n"),
        "_ferry does not start with #compdef ferry"
    );
    match Command::new("zsh").arg("-n").arg(&zsh).output() {
        Ok(out) => assert!(
            out.status.success(),
            "zsh -n rejects {}: {}",
            zsh.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!(
            "NOTE: zsh is not installed: _ferry checked by its #compdef line and contents only, not by zsh -n"
        ),
    }
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

/// The unit in `units/`, its ExecStart= program replaced by the binary under test.
fn unit_under_test(units: &Path) -> PathBuf {
    let unit = unit();
    let (program, _) = exec_start(&unit);
    let unit = unit.replace(
        &format!("ExecStart={program} "),
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_ferry")),
    );
    std::fs::create_dir_all(units).unwrap();
    let path = units.join("ferry.service");
    std::fs::write(&path, unit).unwrap();
    path
}

/// The unit as shipped passes `systemd-analyze verify`, with the man pages its
/// Documentation= names, and keeps its hardening and its place behind the VMs.
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
        "IOSchedulingClass=idle\n",
    ] {
        assert!(unit.contains(key), "unit lacks {key}");
    }
    let weight: u32 = values(&unit, "CPUWeight")
        .concat()
        .parse()
        .expect("the unit sets a numeric CPUWeight=");
    assert!(
        weight < 100,
        "CPUWeight={weight} is not below the default 100"
    );

    let units = dir.path().join("units");
    let path = unit_under_test(&units);
    let man = man_path(dir.path());
    let (ok, stderr) = verify(dir.path(), &units, &path, &man);
    assert!(ok, "systemd-analyze verify failed:\n{stderr}");
    assert!(
        !stderr.contains("ferry.service"),
        "warnings about the unit: {stderr}"
    );

    // Without the pages, the man: links fail: the check above did look for them.
    if have_man() {
        let empty = dir.path().join("no-pages");
        std::fs::create_dir_all(empty.join("man1")).unwrap();
        let (ok, stderr) = verify(dir.path(), &units, &path, &empty);
        assert!(
            !ok && stderr.contains("man ferry(1)"),
            "man ferry(1) went unchecked:\n{stderr}"
        );
    }
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
    let unit_path = unit_under_test(&units);
    let drop_in_dir = units.join("ferry.service.d");
    std::fs::create_dir_all(&drop_in_dir).unwrap();
    for (name, text) in &drop_ins {
        std::fs::write(drop_in_dir.join(name), text).unwrap();
    }
    let man = man_path(dir.path());

    let (ok, stderr) = verify(dir.path(), &units, &unit_path, &man);
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
            let (_, stderr) = verify(dir.path(), &units, &unit_path, &man);
            assert!(
                stderr.contains(&format!("{name}:")) && stderr.contains(expect),
                "a broken {name} went unreported ({expect:?} expected):\n{bad}\n{stderr}"
            );
        }
        std::fs::write(drop_in_dir.join(name), text).unwrap();
    }
}

/// Whether `man` is here: systemd-analyze verify runs it for Documentation=man:.
fn have_man() -> bool {
    Command::new("man")
        .arg("--version")
        .stdout(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `systemd-analyze verify UNIT` with the unit search path set to `units` and
/// the distribution's units only, so no drop-in installed on this host is read,
/// and MANPATH set to `man_path`. Without `man` on this host, the man: links
/// go unchecked, and that is said. Gives success and stderr; gives up after a
/// minute.
fn verify(scratch: &Path, units: &Path, unit: &Path, man_path: &Path) -> (bool, String) {
    let path = [
        units.to_path_buf(),
        PathBuf::from("/usr/lib/systemd/system"),
        PathBuf::from("/lib/systemd/system"),
    ];
    let stderr_path = scratch.join("verify.stderr");
    let mut command = Command::new("systemd-analyze");
    command.arg("verify");
    if !have_man() {
        eprintln!("NOTE: man is not installed: the unit's man: links go unchecked (--man=no)");
        command.arg("--man=no");
    }
    let mut child = command
        .arg(unit)
        .env("SYSTEMD_UNIT_PATH", std::env::join_paths(path).unwrap())
        .env("MANPATH", man_path)
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
