//! Crash points for the crash tests: `FERRY_CRASH_AT=POINT[:N]` makes the process
//! abort (as abruptly as `kill -9`) the N-th time (default 1st) it reaches POINT;
//! `FERRY_PAUSE_AT=POINT:MILLIS` sleeps there instead, so a test can change the
//! world at an exact moment (swap a file after its claim).
//!
//! Points: `claim` (after the rename into active/), `begin` (an upload was
//! started at a destination, before its id was journaled), `part` (after a part was
//! journaled), `complete` (after an object was completed, before its manifest),
//! `manifest` (after the manifest was written), `done` (before the move to done/).
//!
//! Design choice: timing a `kill -9` from outside hits the long phases (part
//! uploads) and almost never the short ones (complete, manifest, the move). A
//! named point reaches every phase deterministically. Without the variables,
//! a point costs one relaxed atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Plan {
    crash: Option<(String, u64)>,
    pause: Option<(String, u64)>,
    hits: AtomicU64,
}

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    PLAN.get_or_init(|| {
        let parse = |v: String| {
            let (p, n) = v.split_once(':').unwrap_or((&v, "1"));
            (p.to_string(), n.parse().unwrap_or(1))
        };
        Plan {
            crash: std::env::var("FERRY_CRASH_AT").ok().map(parse),
            pause: std::env::var("FERRY_PAUSE_AT").ok().map(parse),
            hits: AtomicU64::new(0),
        }
    })
}

/// Reached `point`: crash or pause if a test asked for it.
pub fn reached(point: &str) {
    let p = plan();
    if let Some((at, n)) = &p.crash
        && at == point
        && p.hits.fetch_add(1, Ordering::Relaxed) + 1 == *n
    {
        eprintln!("ferry: FERRY_CRASH_AT={point}:{n} reached; aborting");
        std::process::abort();
    }
    if let Some((at, millis)) = &p.pause
        && at == point
    {
        std::thread::sleep(std::time::Duration::from_millis(*millis));
    }
}
