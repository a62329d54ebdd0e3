//! `ferry status` as an operator sees it: drawn in a real terminal (tmux)
//! from a daemon in the middle of a job, with a queue; one line when no
//! daemon answers; `--json` passes `/status` through.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A tmux session of its own (its own server socket), killed when dropped.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn start(dir: &Path, width: u16, height: u16, command: &str) -> Tmux {
        let socket = dir.join("tmux.sock");
        let ok = Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args([
                "new-session",
                "-d",
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
            ])
            .arg(command)
            .status()
            .expect("tmux runs (tests/run.sh installs it)");
        assert!(ok.success());
        Tmux { socket }
    }

    /// The screen as tmux renders it.
    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(["capture-pane", "-p"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
    }
}

/// Issue case 4: a daemon with two jobs in flight, held back by a bandwidth
/// limit, and a third image waiting for a job slot: `ferry status --watch`
/// in tmux shows the job, both destinations with their bars, and the queue,
/// and redraws as the bytes move. With no daemon, one line.
#[test]
fn status_draws_a_running_daemon_in_a_terminal() {
    let site = Site::new(
        "[transfer]\npart_size = \"5MiB\"\nbandwidth_limit = \"2MiB\"\n[destinations.phoenix]\nurl = \"file://ROOT/phoenix/\"\n[destinations.ashburn]\nurl = \"file://ROOT/ashburn/\"\n",
    );
    let _d = site.daemon();
    for (i, name) in ["web01.qcow2", "web02.qcow2", "db03.qcow2"]
        .iter()
        .enumerate()
    {
        drop_image(&site.spool, name, 20 << 20, i as u64);
        // In this order: the first two take the job slots.
        if i < 2 {
            assert!(wait_until(Duration::from_secs(20), || site
                .metric("ferry_jobs_in_flight")
                == i as u64 + 1));
        }
    }
    assert!(wait_until(Duration::from_secs(20), || site
        .metric("ferry_jobs_in_flight")
        == 2));
    let tmux = Tmux::start(
        &site.root,
        160,
        50,
        &format!(
            "{} status --watch --interval 1 --config {}",
            env!("CARGO_BIN_EXE_ferry"),
            site.config.display()
        ),
    );
    let mut screen = String::new();
    let drawn = wait_until(Duration::from_secs(20), || {
        screen = tmux.screen();
        screen.contains("JOBS (2)") && screen.contains("db03.qcow2") && screen.contains("MiB/s")
    });
    eprintln!("--- the screen\n{screen}");
    assert!(drawn, "the view never showed both jobs and the queue");
    let line = |needle: &str| {
        screen
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}"))
            .to_string()
    };
    assert!(line("web01.qcow2").contains("shipping"));
    for dest in ["phoenix", "ashburn"] {
        let l = line(&format!("{dest}  "));
        assert!(
            l.contains('[') && l.contains("] ") && l.contains("of 20.0 MiB"),
            "{l}"
        );
        assert!(l.contains("ETA"), "{l}");
    }
    let queued = line("db03.qcow2");
    assert!(queued.contains("waiting for a job slot"), "{queued}");
    assert!(screen.contains("QUEUE (1)"), "{screen}");
    assert!(screen.contains("DESTINATIONS (2)"), "{screen}");
    assert!(
        screen.contains("bandwidth: (all) 2.0 MiB/s (2MiB)"),
        "{screen}"
    );
    // Redrawn in place: the bytes done move on, and the screen holds one frame.
    let bar = |screen: &str| {
        screen
            .lines()
            .find(|l| l.contains("phoenix ") && l.contains('['))
            .map(str::to_string)
    };
    let first = bar(&screen);
    assert!(
        wait_until(Duration::from_secs(15), || {
            let now = tmux.screen();
            now.matches("JOBS (").count() == 1 && bar(&now) != first
        }),
        "the view was not redrawn in place"
    );

    // --json passes /status through.
    let out = run(ferry()
        .args(["status", "--json", "--config"])
        .arg(&site.config));
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["bandwidth_limits"]["(all)"]["bytes_per_sec"], 2 << 20);
}

#[test]
fn status_without_a_daemon_says_so_in_one_line() {
    let dir = tmpdir();
    let port = free_port();
    let cfg = write(
        &dir.path().join("ferry.toml"),
        &format!("metrics_addr = \"127.0.0.1:{port}\"\n"),
    );
    let out = run(ferry().args(["status", "--config"]).arg(&cfg));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("no ferry daemon answers on 127.0.0.1:{port}"))
            && err.contains("Connection refused"),
        "{err}"
    );
}
