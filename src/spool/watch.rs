//! The spool's inotify watcher, through `notify`. It only hints: the daemon
//! scans the spool on every hint, and also every `rescan_secs` without one,
//! so a lost event (a full queue, no inotify at all) delays a claim by at most
//! one rescan and never loses a file.

use std::ffi::OsString;
use std::path::Path;

use tokio::sync::mpsc;
use tracing::warn;

/// What the watcher saw.
pub enum Hint {
    /// A name was renamed into the spool: it is complete now (the producer
    /// wrote `X.partial` and renamed it), no need to wait for it to settle.
    RenamedIn(OsString),
    /// Something changed: scan.
    Look,
}

/// Watches `dir`, sending hints on `tx`. Returns the watcher (dropping it
/// stops watching); `None`, with a warning, where inotify is unavailable: the
/// daemon then works on its periodic scans alone.
pub fn watch(dir: &Path, tx: mpsc::Sender<Hint>) -> Option<notify::RecommendedWatcher> {
    use notify::event::{EventKind, ModifyKind, RenameMode};
    use notify::{RecursiveMode, Watcher};
    let mut watcher = match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else {
            let _ = tx.try_send(Hint::Look);
            return;
        };
        let renamed_in = matches!(
            ev.kind,
            EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        );
        if renamed_in {
            // With Both, the last path is the new name.
            if let Some(name) = ev.paths.last().and_then(|p| p.file_name()) {
                let _ = tx.try_send(Hint::RenamedIn(name.to_os_string()));
            }
        }
        // A full queue only means a scan is already due.
        let _ = tx.try_send(Hint::Look);
    }) {
        Ok(w) => w,
        Err(e) => {
            warn!("inotify unavailable ({e}); relying on periodic scans");
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
        warn!(
            "cannot watch {} ({e}); relying on periodic scans",
            dir.display()
        );
        return None;
    }
    Some(watcher)
}
