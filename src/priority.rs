//! The I/O scheduling class ferry runs in (`daemon.io_priority`).
//!
//! Promise: with `"idle"`, every thread of the process, those started later
//! and the child processes (qemu-img) are in the idle class: the disk serves
//! them only when nobody else asks for it, so an export never slows the
//! host's VMs. The class is per thread in Linux, and a new thread takes its
//! creator's: so each thread there is now is set, and the ones to come
//! inherit it.
//!
//! Written by hand: `ioprio_set` is one system call that the `libc` crate
//! does not wrap; the crates that do (`ioprio`) add nothing to it.

/// `IOPRIO_WHO_PROCESS`: `who` is a thread id.
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
/// `IOPRIO_CLASS_IDLE`, shifted into place (`IOPRIO_CLASS_SHIFT` is 13).
const IOPRIO_IDLE: libc::c_int = 3 << 13;

/// Puts every thread of this process into the idle I/O class; answers how
/// many were set and the first error met, if any. The threads are listed
/// again until a pass finds none it had not set (a thread started during a
/// pass may have copied its creator's class before the creator was set).
pub fn idle() -> std::io::Result<(usize, Option<std::io::Error>)> {
    let mut done = std::collections::HashSet::new();
    let mut failed = None;
    for _ in 0..4 {
        let mut new = 0;
        for entry in std::fs::read_dir("/proc/self/task")? {
            let Some(tid) = entry?
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::c_int>().ok())
            else {
                continue;
            };
            if !done.insert(tid) {
                continue;
            }
            new += 1;
            // SAFETY: a plain system call with integer arguments.
            let rc = unsafe {
                libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, IOPRIO_IDLE)
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // A thread that ended since the listing is no failure.
                if e.raw_os_error() != Some(libc::ESRCH) && failed.is_none() {
                    failed = Some(e);
                }
            }
        }
        if new == 0 {
            break;
        }
    }
    Ok((done.len(), failed))
}

/// Puts the process in the class `daemon.io_priority` names, saying so in
/// the log; a failure is logged and changes nothing else.
pub fn apply(priority: crate::config::IoPriority) {
    if priority != crate::config::IoPriority::Idle {
        return;
    }
    match idle() {
        Ok((threads, None)) => tracing::info!(
            "reads in the idle I/O class (daemon.io_priority = \"idle\"; {threads} threads)"
        ),
        Ok((threads, Some(e))) => tracing::warn!(
            "some of ferry's {threads} threads could not be put in the idle I/O class ({e}); those keep the class ferry was started with"
        ),
        Err(e) => tracing::warn!(
            "cannot list ferry's threads to put them in the idle I/O class ({e}); its reads keep the class it was started with"
        ),
    }
}
