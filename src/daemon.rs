//! The daemon: wiring of spool, journal, transfer and signals.
//!
//! Promises:
//! - at start, every job left in `spool/.ferry/active/` resumes from its journal
//!   record (parts already sent are not sent again), and uploads that can no
//!   longer finish are aborted, with a log line naming them;
//! - at most `max_jobs` images are in flight, first come first served, all sharing
//!   one memory budget;
//! - SIGTERM/SIGINT stop taking files, let in-flight parts finish for up to
//!   `shutdown_timeout_secs`, write every journal record, and exit 0; a second
//!   signal exits at once (records on disk are always whole, so the state stays
//!   consistent); SIGHUP reloads destinations and limits for new jobs without
//!   touching jobs in flight, except `memory_limit`, which binds every job at
//!   once (one budget, resized);
//! - a bad file in the spool never stops the daemon: it is refused and logged.
//!
//! Design choice: one loop owns the spool (claims and moves happen in one place,
//! in order); jobs are tasks that return their outcome to the loop. The loop
//! wakes on inotify hints, on a 1 s tick while a file is settling, and on a full
//! rescan every `rescan_secs`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::chunk::{Budget, FirstReads};
use crate::config::{Config, OnSuccess};
use crate::events::{JobMetrics, Observer, Observers};
use crate::journal::{DestinationRecord, JobJournal, JobRecord, Journal};
use crate::lock::DirLock;
use crate::manifest;
use crate::metrics::Metrics;
use crate::progress::{Board, Progress, ProgressLog};
use crate::source::Source;
use crate::spool::{ClaimOutcome, Claimed, DestinationError, ErrorReport, Spool};
use crate::status::Status;
use crate::store::Destination;
use crate::transfer::{self, Job, Outcome, Resume, RetryPolicy, TransferError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "state directory {path} is not usable ({source}); ferry keeps its journal there and cannot resume uploads without it: make it writable or set state_dir"
    )]
    State {
        path: PathBuf,
        source: crate::journal::JournalError,
    },
    #[error("{0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("destinations: {0}")]
    Destinations(String),
    #[error("cannot watch signals: {0}")]
    Signals(std::io::Error),
    #[error("cannot serve metrics on {0}: {1}; free the port or set metrics_addr")]
    Metrics(std::net::SocketAddr, std::io::Error),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

/// The lock file in the state directory and in the spool's `.ferry/`.
const LOCK_FILE: &str = "daemon.lock";

fn spool_lock(spool: &Spool) -> Result<DirLock, crate::lock::LockError> {
    DirLock::take(spool.ferry_dir(), LOCK_FILE, "spool", "spool_dir")
}

/// Asks every destination for a sign of life every `PROBE_EVERY`, for /readyz.
async fn probe_destinations(settings: Arc<Settings>, status: Arc<Status>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    loop {
        tick.tick().await;
        for d in &settings.destinations {
            let r = match tokio::time::timeout(PROBE_TIMEOUT, d.probe()).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
            };
            status.set_health(d.name(), d.url(), r);
        }
    }
}

const PROBE_EVERY: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon shares with its jobs; replaced as a whole on SIGHUP.
struct Settings {
    config: Config,
    destinations: Vec<Arc<Destination>>,
    budget: Budget,
}

impl Settings {
    /// A destination that reaches uploads at `address`: a configured one that
    /// names exactly that place, or, for a directory, that directory itself (a
    /// local path needs no endpoint or credentials). `None` otherwise.
    fn reach(&self, address: &crate::store::Address) -> Option<Arc<Destination>> {
        if let Some(d) = self.destinations.iter().find(|d| d.address() == address) {
            return Some(d.clone());
        }
        let crate::store::Address::File { dir } = address else {
            return None;
        };
        let cfg = crate::config::DestinationConfig {
            url: format!("file://{}/", dir.display()),
            ..Default::default()
        };
        Destination::new("journaled", &cfg, &self.config.transfer, 0)
            .ok()
            .map(Arc::new)
    }

    fn new(config: Config) -> Result<Settings, DaemonError> {
        let destinations = transfer::destinations(&config, &[], config.transfer.part_size.as_u64())
            .map_err(|e| DaemonError::Destinations(e.to_string()))?;
        let budget = Budget::new(config.transfer.memory_limit.as_u64());
        Ok(Settings {
            config,
            destinations,
            budget,
        })
    }
}

/// How a job ended, for the loop to act on the spool.
enum JobEnd {
    Done(Claimed, Instant),
    /// The report, and whether it is a refusal of the file (not a failure).
    Failed(Claimed, Box<ErrorReport>, bool, Instant),
    /// Shutting down: the file stays in `active/` with its journal record.
    Interrupted(Claimed),
    /// Every failure may pass by itself (a destination down, throttling): the
    /// file stays in `active/` with its uploads and journal, and is tried again.
    Retry(Claimed, String),
}

/// Attempts of a job whose destinations keep failing for passing reasons
/// before it goes to `failed/`, and the pause before attempt N (N x this,
/// at most `JOB_RETRY_MAX_PAUSE`): about an hour of outage in all.
const JOB_ATTEMPTS: u32 = 12;
const JOB_RETRY_PAUSE: Duration = Duration::from_secs(15);
const JOB_RETRY_MAX_PAUSE: Duration = Duration::from_secs(300);

/// Jobs that failed only for passing reasons, waiting to be tried again with
/// their uploads kept, and how many attempts each name has had.
#[derive(Default)]
struct Retries {
    attempts: HashMap<OsString, u32>,
    /// When each waiting job is tried again, and why it is waiting.
    waiting: Vec<(Instant, Claimed, String)>,
}

impl Retries {
    /// Settles an ended job. One that may still pass waits for its next attempt;
    /// after `JOB_ATTEMPTS` it goes to `failed/`. A job that ended any other way
    /// clears its count, so a later file of the same name starts afresh.
    /// Returns a job that has had all its attempts: the caller ends it with
    /// [`give_up`].
    fn job_ended(
        &mut self,
        spool: &Spool,
        settings: &Settings,
        status: &Status,
        end: JobEnd,
    ) -> Option<Claimed> {
        let name = end.claimed().name.clone();
        let Some((c, why)) = settle_job(spool, settings, status, end) else {
            self.attempts.remove(&name);
            return None;
        };
        self.failed(c, why, Instant::now())
    }

    /// Counts a failed attempt and schedules the next one (N x `JOB_RETRY_PAUSE`
    /// after the N-th failure, at most `JOB_RETRY_MAX_PAUSE`); hands the job back
    /// when it has had all its attempts.
    fn failed(&mut self, c: Claimed, why: String, now: Instant) -> Option<Claimed> {
        let n = self.attempts.entry(c.name.clone()).or_insert(0);
        *n += 1;
        if *n >= JOB_ATTEMPTS {
            self.attempts.remove(&c.name);
            return Some(c);
        }
        let pause = (JOB_RETRY_PAUSE * *n).min(JOB_RETRY_MAX_PAUSE);
        warn!(
            "{:?}: a destination is failing for a passing reason; attempt {} of {JOB_ATTEMPTS} in {}s (the upload is kept)",
            c.name,
            *n + 1,
            pause.as_secs()
        );
        self.waiting.push((now + pause, c, why));
        None
    }

    /// The jobs whose pause is over, taken out of the waiting list.
    fn due(&mut self, now: Instant) -> Vec<Claimed> {
        let (due, later): (Vec<_>, Vec<_>) =
            self.waiting.drain(..).partition(|(t, _, _)| *t <= now);
        self.waiting = later;
        due.into_iter().map(|(_, c, _)| c).collect()
    }

    /// The jobs waiting, for `/status`.
    fn list(&self) -> Vec<crate::status::Retrying> {
        self.waiting
            .iter()
            .map(|(at, c, why)| crate::status::Retrying {
                file: c.name.to_string_lossy().into_owned(),
                attempt: self.attempts.get(&c.name).map_or(1, |n| n + 1),
                of: JOB_ATTEMPTS,
                next_attempt: *at,
                reason: why.clone(),
            })
            .collect()
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

impl JobEnd {
    fn claimed(&self) -> &Claimed {
        match self {
            JobEnd::Done(c, _)
            | JobEnd::Failed(c, ..)
            | JobEnd::Interrupted(c)
            | JobEnd::Retry(c, _) => c,
        }
    }
}

/// The configuration file (or the embedded default) made into settings, for a
/// reload, with the spool to watch if it moved (its lock taken). Nothing
/// changes unless all of it is good. The memory budget stays the one every job
/// shares, resized to the new `memory_limit`, so jobs started before and after
/// the reload stay within it.
fn reload(
    path: Option<&Path>,
    current: &Settings,
    locks: &mut Locks,
) -> Result<(Settings, Option<Spool>), String> {
    let config = Config::load_or_embedded(path).map_err(|e| e.to_string())?;
    let mut s = Settings::new(config).map_err(|e| e.to_string())?;
    let (old, new) = (&current.config, &s.config);
    if new.state_dir != old.state_dir {
        warn!(
            "state_dir changed to {}: it takes effect at the next start; the journal stays in {} until then",
            new.state_dir.display(),
            old.state_dir.display()
        );
    }
    let mut spool = None;
    if new.spool_dir != old.spool_dir || new.daemon.settle_secs != old.daemon.settle_secs {
        let sp = Spool::open(&new.spool_dir, Duration::from_secs(new.daemon.settle_secs))
            .map_err(|e| e.to_string())?;
        if new.spool_dir != old.spool_dir {
            locks.spool = spool_lock(&sp).map_err(|e| e.to_string())?;
        }
        spool = Some(sp);
    }
    current
        .budget
        .resize(s.config.transfer.memory_limit.as_u64());
    s.budget = current.budget.clone();
    Ok((s, spool))
}

/// The locks that keep a second daemon off this one's state and spool.
struct Locks {
    state: DirLock,
    spool: DirLock,
}

/// Before each scan: ferry's own directories and lock files are put back if
/// someone removed them (said in the log). Returns whether the spool directory
/// is a new one, to be watched again, whether both locks are held (no new
/// claims otherwise), and what could not be put back.
fn tend(spool: &mut Spool, locks: &mut Locks) -> (bool, bool, Option<String>) {
    let mut rewatch = false;
    let mut problem = match spool.ensure() {
        Ok(Some(made)) => {
            warn!(
                "recreated {made}: ferry's spool directories had been removed; watching the spool again"
            );
            rewatch = true;
            None
        }
        Ok(None) => None,
        Err(e) => Some(format!(
            "{e}; ferry cannot make its spool directories again"
        )),
    };
    let mut locked = true;
    for lock in [&mut locks.state, &mut locks.spool] {
        match lock.renew() {
            Ok(true) => warn!("recreated the lock file {}", lock.path().display()),
            Ok(false) => {}
            Err(e) => {
                locked = false;
                problem.get_or_insert(format!("{e}; not taking new files"));
            }
        }
    }
    (rewatch, locked, problem)
}

/// Raises the soft limit of open files to the hard one: every connection,
/// part upload and watched file takes a descriptor, and the usual soft limit
/// (1,024) is low for a daemon.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Whether the state directory takes writes; logs and reports on `/readyz`
/// only the changes (`was_ok` is the last answer).
fn state_dir_ok(journal: &Journal, status: &Status, was_ok: bool) -> bool {
    match journal.writable() {
        Ok(()) => {
            if !was_ok {
                info!("the state directory takes writes again; taking new files");
                if let Ok(mut p) = status.state_problem.lock() {
                    *p = None;
                }
            }
            true
        }
        Err(e) => {
            if was_ok {
                error!(
                    "{e}: not taking new files until the state directory takes writes again (nothing is lost: files wait in the spool)"
                );
            }
            if let Ok(mut p) = status.state_problem.lock() {
                *p = Some(format!(
                    "state directory does not take writes ({e}); not taking new files"
                ));
            }
            false
        }
    }
}

/// Runs the daemon until a signal stops it.
pub async fn run(config_path: Option<PathBuf>) -> Result<(), DaemonError> {
    let config = Config::load_or_embedded(config_path.as_deref())?;
    raise_open_files_limit();
    // The lock first: a second daemon must not touch the journal at all.
    std::fs::create_dir_all(&config.state_dir).map_err(|e| DaemonError::State {
        path: config.state_dir.clone(),
        source: crate::journal::JournalError::Io {
            path: config.state_dir.clone(),
            source: e,
        },
    })?;
    let state_lock = DirLock::take(&config.state_dir, LOCK_FILE, "state directory", "state_dir")?;
    let journal = Journal::open(&config.state_dir).map_err(|source| DaemonError::State {
        path: config.state_dir.clone(),
        source,
    })?;
    journal.writable().map_err(|source| DaemonError::State {
        path: config.state_dir.clone(),
        source,
    })?;
    let mut spool = Spool::open(
        &config.spool_dir,
        Duration::from_secs(config.daemon.settle_secs),
    )?;
    let mut locks = Locks {
        state: state_lock,
        spool: spool_lock(&spool)?,
    };
    let mut settings = Arc::new(Settings::new(config)?);
    let board = Arc::new(Board::default());
    let metrics = Metrics::new();
    let status = Arc::new(Status {
        spool_dir: Some(settings.config.spool_dir.clone()),
        budget: std::sync::Mutex::new(Some(settings.budget.clone())),
        ..Arc::into_inner(Status::new(metrics.clone(), board.clone())).expect("just made")
    });
    let (stop_http, http_stopped) = crate::shutdown::new();
    let bound = crate::http::serve(settings.config.metrics_addr, status.clone(), http_stopped)
        .await
        .map_err(|e| DaemonError::Metrics(settings.config.metrics_addr, e))?;
    info!("serving http://{bound}/metrics, /healthz, /readyz and /status");
    let mut prober = tokio::spawn(probe_destinations(settings.clone(), status.clone()));

    let (trigger, cancel) = crate::shutdown::new();
    crate::shutdown::on_signals(trigger, || info!("stop requested"))
        .map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;

    let (hint_tx, mut hints) = mpsc::channel::<Hint>(1024);
    // Kept for its Drop: dropping the watcher stops watching.
    let mut _watcher = watch_spool(spool.dir(), hint_tx.clone());

    let mut jobs: JoinSet<JobEnd> = JoinSet::new();
    let ctx = |s: &Arc<Settings>| JobCtx {
        settings: s.clone(),
        journal: journal.clone(),
        board: board.clone(),
        metrics: metrics.clone(),
        cancel: cancel.clone(),
    };

    abort_orphans(&journal, &spool, &settings).await;
    for name in spool.active_jobs() {
        let claimed = spool.reclaim(&name);
        info!(
            "resuming {:?} found in {}",
            name,
            spool.active_dir().display()
        );
        jobs.spawn(job(ctx(&settings), claimed));
    }

    info!(
        "ferry {} watching {} ({} destination(s): {})",
        crate::VERSION,
        settings.config.spool_dir.display(),
        settings.destinations.len(),
        settings
            .destinations
            .iter()
            .map(|d| format!("{} = {}", d.name(), d.url()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(5));

    let mut next_scan = Instant::now();
    let mut last_full_scan = Instant::now();
    let mut retries = Retries::default();
    let mut state_ok = true;
    loop {
        let wait = next_scan.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = cancel.requested() => break,
            _ = sighup.recv() => {
                match reload(config_path.as_deref(), &settings, &mut locks) {
                    Ok((s, new_spool)) => {
                        if let Some(new_spool) = new_spool {
                            spool = new_spool;
                            _watcher = watch_spool(spool.dir(), hint_tx.clone());
                        }
                        settings = Arc::new(s);
                        prober.abort();
                        prober = tokio::spawn(probe_destinations(settings.clone(), status.clone()));
                        info!("configuration reloaded; jobs in flight keep their destinations");
                    }
                    Err(e) => error!("reload refused, keeping the running configuration: {e}"),
                }
                next_scan = Instant::now();
            }
            hint = hints.recv() => {
                if let Some(Hint::RenamedIn(name)) = hint {
                    spool.note_renamed_in(&name);
                }
                next_scan = Instant::now();
            }
            Some(ended) = jobs.join_next() => {
                match ended {
                    Ok(end) => {
                        if let Some(c) = retries.job_ended(&spool, &settings, &status, end) {
                            jobs.spawn(give_up(ctx(&settings), c));
                        }
                    }
                    Err(e) => error!("a job task ended abnormally: {e}"),
                }
                next_scan = Instant::now();
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            _ = status_tick.tick() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status_line(&board))]);
            }
            _ = tokio::time::sleep(wait) => {
                let full = last_full_scan.elapsed() >= Duration::from_secs(settings.config.daemon.rescan_secs);
                if full {
                    last_full_scan = Instant::now();
                }
                // Jobs waiting to be tried again.
                for c in retries.due(Instant::now()) {
                    jobs.spawn(job(ctx(&settings), c));
                }
                let (rewatch, locked, mut spool_problem) = tend(&mut spool, &mut locks);
                if rewatch {
                    _watcher = watch_spool(spool.dir(), hint_tx.clone());
                }
                // No new work while the state directory refuses writes.
                state_ok = state_dir_ok(&journal, &status, state_ok);
                match spool.scan(Instant::now()) {
                    Ok(ready) if state_ok && locked => {
                        for r in ready {
                            if jobs.len() >= settings.config.daemon.max_jobs {
                                break;
                            }
                            match spool.claim(&r) {
                                Ok(ClaimOutcome::Claimed(c)) => {
                                    info!("claimed {:?} ({} bytes)", c.name, r.size_bytes);
                                    crate::failpoint::reached("claim");
                                    jobs.spawn(job(ctx(&settings), c));
                                }
                                Ok(ClaimOutcome::NotNow) => {}
                                Ok(ClaimOutcome::Replaced(c, why)) => {
                                    warn!("refusing {:?}: {why}", c.name);
                                    let report = report(&c.name, &why, vec![], "Put the image back in the spool as a regular file, written in full, then renamed into place.");
                                    if let Err(e) = spool.finish_failed(&c, &report) {
                                        error!("{e}");
                                    }
                                }
                                Err(e) => error!("claiming {:?}: {e}", r.name),
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        spool_problem.get_or_insert(format!("{e}; ferry looks again every second"));
                    }
                }
                // Logged when it changes, shown on /readyz while it lasts.
                status.set_spool_problem(spool_problem);
                status.set_retrying(retries.list());
                let (waiting, waiting_bytes) = spool.waiting();
                metrics.spool_waiting_images.set(waiting as i64);
                metrics.spool_waiting_bytes.set(waiting_bytes as i64);
                if let Ok(mut w) = status.waiting.lock() {
                    *w = spool.waiting_list();
                }
                next_scan = Instant::now()
                    + if waiting > 0 || !state_ok || !retries.is_empty() || status.spool_broken() {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_secs(settings.config.daemon.rescan_secs)
                    };
            }
        }
    }

    // Shutdown: stop claiming; let in-flight parts finish; write every record.
    let timeout = Duration::from_secs(settings.config.daemon.shutdown_timeout_secs);
    info!(
        "stopping: {} job(s) in flight get up to {}s to reach a resumable point",
        jobs.len(),
        timeout.as_secs()
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Every job saw the stop request already (the token is theirs too).
    let left = crate::shutdown::drain(&mut jobs, timeout, |ended| match ended {
        Ok(end) => {
            if let Some((c, _)) = settle_job(&spool, &settings, &status, end) {
                info!(
                    "{:?} stays in active/ and resumes at the next start",
                    c.name
                );
            }
        }
        Err(e) => error!("a job task ended abnormally: {e}"),
    })
    .await;
    if left > 0 {
        warn!(
            "shutdown timeout reached; {left} job(s) stop where they are and resume at the next start"
        );
    }
    jobs.abort_all();
    prober.abort();
    stop_http.trip();
    info!("stopped");
    Ok(())
}

enum Hint {
    RenamedIn(OsString),
    Look,
}

/// inotify via `notify`, as a hint only. Returns the watcher (dropping it stops
/// watching); without one the daemon still works on its periodic scans.
fn watch_spool(dir: &Path, tx: mpsc::Sender<Hint>) -> Option<notify::RecommendedWatcher> {
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

fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

fn status_line(board: &Board) -> String {
    let jobs = board.snapshot();
    if jobs.is_empty() {
        return "idle, watching the spool".into();
    }
    let rate: f64 = jobs
        .iter()
        .map(|p| {
            let secs = p.started.elapsed().as_secs_f64().max(1e-3);
            p.destinations
                .iter()
                .map(|d| d.done_bytes() as f64 / secs)
                .sum::<f64>()
        })
        .sum();
    format!(
        "{} job(s) in flight, {}/s uploaded",
        jobs.len(),
        bytesize::ByteSize(rate as u64).display().iec()
    )
}

fn report(
    name: &OsString,
    reason: &str,
    destinations: Vec<DestinationError>,
    what_to_do: &str,
) -> ErrorReport {
    ErrorReport {
        file: name.to_string_lossy().into_owned(),
        failed_at: manifest::timestamp(SystemTime::now()),
        reason: reason.to_string(),
        destinations,
        what_to_do: what_to_do.to_string(),
        inspection: None,
    }
}

/// Acts on the spool for a job that ended.
fn settle_job(
    spool: &Spool,
    settings: &Settings,
    status: &Status,
    end: JobEnd,
) -> Option<(Claimed, String)> {
    match &end {
        JobEnd::Done(_, t) => status.metrics.job_ended("done", t.elapsed()),
        JobEnd::Failed(c, r, refused, t) => {
            status
                .metrics
                .job_ended(if *refused { "refused" } else { "failed" }, t.elapsed());
            status.record_error(&c.name.to_string_lossy(), &r.reason);
        }
        JobEnd::Interrupted(_) | JobEnd::Retry(..) => {}
    }
    match end {
        JobEnd::Done(c, _) => {
            crate::failpoint::reached("done");
            let delete = settings.config.daemon.on_success == OnSuccess::Delete;
            match spool.finish_done(&c, delete) {
                Ok(()) => info!(
                    "{:?} verified at every destination; {}",
                    c.name,
                    if delete {
                        "deleted from the spool".to_string()
                    } else {
                        format!("moved to {}", spool.done_dir().display())
                    }
                ),
                Err(e) => error!("{e}"),
            }
        }
        JobEnd::Failed(c, report, _, _) => {
            warn!("{:?} failed: {}", c.name, report.reason);
            if let Err(e) = spool.finish_failed(&c, &report) {
                error!("{e}; the file stays in {}", spool.active_dir().display());
            }
        }
        JobEnd::Interrupted(c) => info!("{:?} interrupted; it resumes at the next start", c.name),
        JobEnd::Retry(c, why) => {
            status.record_error(&c.name.to_string_lossy(), &why);
            return Some((c, why));
        }
    }
    None
}

/// Journal records without a file in `active/` belong to jobs that can no longer
/// finish: abort their uploads so nothing is left behind in the stores.
async fn abort_orphans(journal: &Journal, spool: &Spool, settings: &Settings) {
    let active: Vec<String> = spool
        .active_jobs()
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    let records: Vec<(String, Option<JobRecord>)> = journal
        .names()
        .into_iter()
        .map(|n| {
            let r = journal.load(&n);
            (n, r)
        })
        .collect();
    let live: std::collections::HashSet<String> = records
        .iter()
        .filter(|(n, _)| active.contains(n))
        .filter_map(|(_, r)| r.as_ref())
        .flat_map(|r| r.destinations.values().filter_map(|d| d.upload_id.clone()))
        .collect();
    for d in &settings.destinations {
        d.sweep(&live).await;
    }
    for (name, record) in records {
        if active.contains(&name) {
            continue;
        }
        if let Some(record) = record {
            abort_record(&record, settings).await;
        }
        if let Err(e) = journal.remove(&name) {
            error!("{e}");
        }
    }
}

/// Aborts the unfinished, unverified uploads of `record`. Each is reached only
/// through a configured destination that names the place it lives (endpoint,
/// region and bucket, as journaled), with that destination's credentials, at
/// the journaled key; a directory is reached by its journaled path. An upload
/// no configured destination reaches is left alone, and the log says exactly
/// what is left open where: ferry never rebuilds a client from a URL alone
/// (that would fall back to public AWS and the instance-metadata service).
async fn abort_record(record: &JobRecord, settings: &Settings) {
    for (dname, d) in &record.destinations {
        let Some(id) = &d.upload_id else { continue };
        if d.verified {
            continue;
        }
        let reached = match (&d.address, &d.key) {
            (Some(address), Some(key)) => settings.reach(address).map(|dest| (dest, key.clone())),
            // A record from before addresses were journaled: only the
            // destination still configured under that name and URL is known.
            _ => settings
                .destinations
                .iter()
                .find(|x| x.name() == dname && x.url() == d.url)
                .map(|x| (x.clone(), x.key(&record.name))),
        };
        let Some((dest, key)) = reached else {
            error!("{}", left_open(record, dname, d, id));
            continue;
        };
        match dest.abort_key(&key, id).await {
            Ok(()) => info!(
                destination = dname.as_str(),
                "aborted the unfinished upload of {} (upload id {id}, {})",
                record.name,
                dest.address()
            ),
            Err(e) => error!(
                destination = dname.as_str(),
                "could not abort the unfinished upload of {} ({}, key {key}, upload id {id}): {e}; abort it by hand",
                record.name,
                dest.address()
            ),
        }
    }
}

/// The log line for an upload that no configured destination reaches.
fn left_open(record: &JobRecord, dname: &str, d: &DestinationRecord, id: &str) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    match (&d.address, &d.key) {
        (
            Some(crate::store::Address::S3 {
                endpoint,
                region,
                bucket,
            }),
            Some(key),
        ) => format!(
            "the unfinished upload of {} for destination {dname} is left open: upload id {id} of key {key} in bucket {bucket} at {endpoint} (region {region}). No configured destination names that endpoint, region and bucket, so ferry leaves it alone; abort it by hand, e.g. aws s3api abort-multipart-upload --endpoint-url {endpoint} --region {region} --bucket {bucket} --key {} --upload-id {}",
            record.name,
            quote(key),
            quote(id)
        ),
        (Some(address), key) => format!(
            "the unfinished upload of {} for destination {dname} is left open: upload id {id}{} in {address}; no configured destination reaches it, so ferry leaves it alone",
            record.name,
            key.as_deref()
                .map(|k| format!(" of {k}"))
                .unwrap_or_default()
        ),
        (None, _) => format!(
            "the unfinished upload of {} for destination {dname} is left open: upload id {id} at {} (journaled by an older ferry, without its endpoint); no destination of that name and URL is configured, so ferry leaves it alone; abort it by hand",
            record.name, d.url
        ),
    }
}

/// What every job shares.
#[derive(Clone)]
struct JobCtx {
    settings: Arc<Settings>,
    journal: Journal,
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    cancel: crate::shutdown::Shutdown,
}

/// One image, from claim to verified (or failed, or interrupted).
async fn job(ctx: JobCtx, claimed: Claimed) -> JobEnd {
    let started = Instant::now();
    let settings = ctx.settings.clone();
    let journal = ctx.journal.clone();
    let board = ctx.board.clone();
    let fail = |c: Claimed, reason: String, what: &str| {
        let r = report(&c.name, &reason, vec![], what);
        JobEnd::Failed(c, Box::new(r), true, started)
    };
    let Some(name) = claimed.name.to_str().map(str::to_string) else {
        return fail(
            claimed,
            "the file name is not valid UTF-8, so it cannot be an object key".into(),
            "Rename the file to a UTF-8 name and put it back in the spool.",
        );
    };
    let source = match Source::open(&claimed.path) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                claimed,
                e.to_string(),
                "Put the image back in the spool as a regular, readable, non-empty file.",
            );
        }
    };
    let config = &settings.config;
    let report = match transfer::inspect_source(
        &claimed.path,
        claimed.sidecar.as_deref(),
        config,
        true,
        false,
    ) {
        Ok(r) => r,
        Err(transfer::PrepareError::Refused(r)) => {
            let what = if r.license.is_none()
                && r.reasons.iter().any(|x| x.starts_with("no licence"))
            {
                "Write the sidecar as the reason says, then put the image (and its .meta.json) back in the spool."
            } else {
                "Fix or convert the image as the reasons say, then put it back in the spool."
            };
            let mut rep = report(&claimed.name, &r.reasons.join("; "), vec![], what);
            rep.inspection = Some(*r);
            return JobEnd::Failed(claimed, Box::new(rep), true, started);
        }
        Err(e) => {
            return fail(
                claimed,
                e.to_string(),
                "Put the image back in the spool as a regular, readable file with a valid sidecar.",
            );
        }
    };
    let mut dests = settings.destinations.clone();
    let plan = match transfer::plan_for(
        &source,
        &dests,
        config.transfer.part_size.as_u64(),
        &settings.budget,
    ) {
        Ok(p) => p,
        Err(e) => {
            return fail(
                claimed,
                e.to_string(),
                "Change the configuration as the reason says, or split the image.",
            );
        }
    };

    // Resume from the journal only what is known to be this very file, unchanged.
    let mut resume = HashMap::new();
    let first_reads = Arc::new(FirstReads::new(plan.count));
    let mut record = JobRecord {
        format_version: crate::journal::FORMAT_VERSION,
        name: name.clone(),
        dev: source.identity.dev,
        ino: source.identity.ino,
        size_bytes: source.identity.size_bytes,
        mtime_ns: source.identity.mtime_ns,
        ctime_ns: Some(source.identity.ctime_ns),
        part_size_bytes: plan.part_bytes,
        part_count: plan.count,
        destinations: dests
            .iter()
            .map(|d| {
                (
                    d.name().to_string(),
                    DestinationRecord {
                        url: d.url().to_string(),
                        address: Some(d.address().clone()),
                        key: Some(d.key(&name)),
                        upload_id: None,
                        parts: vec![],
                        verified: false,
                    },
                )
            })
            .collect(),
    };
    if let Some(prev) = journal.load(&name) {
        match continuation(&prev, &source, plan.part_bytes, &first_reads) {
            Continuation::Resume => {
                let mut taken = std::collections::HashSet::new();
                let mut verified = Vec::new();
                for dest in &dests {
                    let key = dest.key(&name);
                    let Some((pname, pd)) = prev.destinations.iter().find(|(n, d)| {
                        !taken.contains(*n)
                            && d.address.as_ref() == Some(dest.address())
                            && d.key.as_deref() == Some(key.as_str())
                    }) else {
                        continue;
                    };
                    taken.insert(pname.clone());
                    if pd.verified {
                        verified.push(dest.name().to_string());
                    } else if let Some(id) = &pd.upload_id {
                        resume.insert(
                            dest.name().to_string(),
                            Resume {
                                upload_id: id.clone(),
                                receipts: pd.parts.clone(),
                            },
                        );
                        if let Some(r) = record.destinations.get_mut(dest.name()) {
                            r.upload_id = Some(id.clone());
                            r.parts = pd.parts.clone();
                        }
                    }
                }
                if !verified.is_empty() {
                    info!("{name}: already verified at {verified:?}");
                    dests.retain(|d| !verified.iter().any(|v| v == d.name()));
                    record.destinations.retain(|n, _| !verified.contains(n));
                }
                // Uploads no configured destination continues cannot finish.
                let mut gone = prev.clone();
                gone.destinations.retain(|n, _| !taken.contains(n));
                abort_record(&gone, &settings).await;
            }
            Continuation::StartOver(why) => {
                info!("{name}: {why}; starting over");
                abort_record(&prev, &settings).await;
            }
            Continuation::Changed(why) => {
                abort_record(&prev, &settings).await;
                if let Err(e) = journal.remove(&name) {
                    error!("{e}");
                }
                let r = self::report(
                    &claimed.name,
                    &format!(
                        "changed while uploading: between two attempts (ferry stopped, or waiting to try again), {why}; every upload of it was aborted"
                    ),
                    vec![],
                    CHANGED_ADVICE,
                );
                return JobEnd::Failed(claimed, Box::new(r), false, started);
            }
        }
    }
    let job_journal = JobJournal::new(journal.clone(), record);
    if let Err(e) = job_journal.flush(true) {
        // Without a record the job cannot resume; it can still run.
        error!("{e}");
    }

    let names: Vec<&str> = dests.iter().map(|d| d.name()).collect();
    let progress = Progress::new(&name, plan.file_bytes, &names);
    board.insert(&name, progress.clone());
    let observer: Arc<dyn Observer> = Arc::new(Observers(vec![
        job_journal.clone() as Arc<dyn Observer>,
        Arc::new(ProgressLog::new(progress.clone())),
        Arc::new(JobMetrics::new(ctx.metrics.clone(), &names)),
    ]));
    let job = Arc::new(Job {
        name: name.clone(),
        source,
        first_reads,
        plan,
        reader: config.transfer.reader,
        verify: config.transfer.verify,
        retry: RetryPolicy::from_config(&config.transfer),
        image: Some(report),
        resumable: true,
    });
    let outcomes = transfer::run(
        job,
        dests,
        settings.budget.clone(),
        progress,
        resume,
        observer,
        ctx.cancel.clone(),
    )
    .await;
    board.remove(&name);
    let _ = job_journal.flush(true);
    let end = conclude(claimed, outcomes, ctx.cancel.is_requested(), started);
    if matches!(end, JobEnd::Done(..) | JobEnd::Failed(..)) {
        // The job ends for good: an upload still recorded (kept for a retry
        // while another destination failed for good) can never finish.
        abort_record(&job_journal.record(), &settings).await;
        if let Err(e) = job_journal.remove() {
            error!("{e}");
        }
    }
    end
}

/// Ends a job that failed for passing reasons `JOB_ATTEMPTS` times: its
/// uploads are aborted and its record removed (so the file, put back in the
/// spool, starts afresh), then it goes to `failed/`.
async fn give_up(ctx: JobCtx, c: Claimed) -> JobEnd {
    let started = Instant::now();
    if let Some(name) = c.name.to_str()
        && let Some(record) = ctx.journal.load(name)
    {
        abort_record(&record, &ctx.settings).await;
        if let Err(e) = ctx.journal.remove(name) {
            error!("{e}");
        }
    }
    let r = report(
        &c.name,
        &format!(
            "{JOB_ATTEMPTS} attempts failed for passing reasons (network, server errors); giving up; its uploads were aborted"
        ),
        vec![],
        "Check the destinations named in the log and in /status, then move the file from failed/ back into the spool.",
    );
    JobEnd::Failed(c, Box::new(r), false, started)
}

/// What a journal record left by an earlier attempt allows.
enum Continuation {
    /// The same file, unchanged, with the same plan: continue its uploads.
    Resume,
    /// Nothing is known to be wrong, but the uploads cannot be continued.
    StartOver(String),
    /// The claimed file changed since the record was written.
    Changed(String),
}

/// Compares a record with the file as it is now. Every part the record says
/// was sent is taken into `first`: a part read again must give its CRC32C.
fn continuation(
    prev: &JobRecord,
    source: &Source,
    part_bytes: u64,
    first: &FirstReads,
) -> Continuation {
    let Some(ctime_ns) = prev.ctime_ns else {
        return Continuation::StartOver(
            "its journal record is from an older ferry, without the change time that shows the file unchanged".into(),
        );
    };
    let then = crate::source::Identity {
        dev: prev.dev,
        ino: prev.ino,
        size_bytes: prev.size_bytes,
        mtime_ns: prev.mtime_ns,
        ctime_ns,
    };
    if let Some(why) = then.difference(&source.identity) {
        return Continuation::Changed(why);
    }
    // Another plan numbers its parts differently: nothing to compare or keep.
    if prev.part_size_bytes != part_bytes {
        return Continuation::StartOver("the part size changed".into());
    }
    for d in prev.destinations.values() {
        for p in &d.parts {
            if let Err(was) = first.record(p.index, p.crc32c) {
                return Continuation::Changed(format!(
                    "part {} was sent with CRC32C {:08x} to one destination and {was:08x} to another",
                    p.index, p.crc32c
                ));
            }
        }
    }
    Continuation::Resume
}

/// What to do about an image that changed while ferry had it.
const CHANGED_ADVICE: &str = "Make sure the producer has finished writing before the file appears in the spool (write X.partial, then rename it to X) and that nothing writes to it afterwards; then put it back. Nothing was completed from the changed bytes.";

fn conclude(claimed: Claimed, outcomes: Vec<Outcome>, cancelled: bool, started: Instant) -> JobEnd {
    let interrupted = outcomes
        .iter()
        .any(|o| matches!(o.result, Err(TransferError::Cancelled)));
    if interrupted || (cancelled && outcomes.iter().any(|o| o.result.is_err())) {
        return JobEnd::Interrupted(claimed);
    }
    let transient_only = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .all(|e| e.transient());
    if transient_only && outcomes.iter().any(|o| o.result.is_err()) {
        let why = outcomes
            .iter()
            .filter_map(|o| {
                o.result
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e}", o.destination))
            })
            .collect::<Vec<_>>()
            .join("; ");
        return JobEnd::Retry(claimed, why);
    }
    let failures: Vec<DestinationError> = outcomes
        .iter()
        .filter_map(|o| {
            o.result.as_ref().err().map(|e| DestinationError {
                destination: o.destination.clone(),
                url: o.url.clone(),
                error: e.to_string(),
            })
        })
        .collect();
    if failures.is_empty() {
        return JobEnd::Done(claimed, started);
    }
    let changed = outcomes.iter().find_map(|o| match &o.result {
        Err(TransferError::Changed(c)) => Some(c.clone()),
        _ => None,
    });
    let (reason, what) = if let Some(c) = changed {
        let before: Vec<&str> = outcomes
            .iter()
            .filter(|o| o.result.is_ok())
            .map(|o| o.destination.as_str())
            .collect();
        let mut reason =
            format!("changed while uploading: {c}; every unfinished upload of it was aborted");
        if !before.is_empty() {
            reason += &format!(
                " ({} had verified it before the change, with the bytes as claimed)",
                before.join(", ")
            );
        }
        (reason, CHANGED_ADVICE)
    } else {
        (
            format!(
                "{} of {} destination(s) did not verify: {}",
                failures.len(),
                outcomes.len(),
                failures
                    .iter()
                    .map(|f| f.destination.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "Check the named destinations (reachable, credentials, bucket exists), then move the file from failed/ back into the spool; destinations that verified are uploaded again.",
        )
    };
    let r = report(&claimed.name, &reason, failures, what);
    JobEnd::Failed(claimed, Box::new(r), false, started)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn claimed(name: &str) -> Claimed {
        Claimed {
            name: name.into(),
            path: PathBuf::from("/spool/.ferry/active").join(name),
            sidecar: None,
        }
    }

    #[test]
    fn a_job_failing_for_passing_reasons_gets_its_attempts_then_gives_up() {
        let mut r = Retries::default();
        let t0 = Instant::now();
        let mut pauses = Vec::new();
        for attempt in 1..JOB_ATTEMPTS {
            assert!(
                r.failed(claimed("a.qcow2"), String::new(), t0).is_none(),
                "attempt {attempt}"
            );
            assert!(r.due(t0).is_empty(), "tried again without a pause");
            let (at, _, _) = r.waiting[0];
            pauses.push((at - t0).as_secs());
            assert_eq!(r.due(at).len(), 1);
            assert!(r.is_empty());
        }
        assert_eq!(&pauses[..4], &[15, 30, 45, 60]);
        assert_eq!(*pauses.last().unwrap(), 165);
        assert!(pauses.iter().all(|p| *p <= JOB_RETRY_MAX_PAUSE.as_secs()));
        // The last attempt hands the job back (to go to failed/) and forgets it.
        let c = r
            .failed(claimed("a.qcow2"), String::new(), t0)
            .expect("given up");
        assert_eq!(c.name, "a.qcow2");
        assert!(r.is_empty() && r.attempts.is_empty());
    }

    #[test]
    fn each_name_counts_its_own_attempts() {
        let mut r = Retries::default();
        let t0 = Instant::now();
        assert!(r.failed(claimed("a"), String::new(), t0).is_none());
        assert!(r.failed(claimed("a"), String::new(), t0).is_none());
        assert!(r.failed(claimed("b"), String::new(), t0).is_none());
        assert_eq!(r.attempts[OsStr::new("a")], 2);
        assert_eq!(r.attempts[OsStr::new("b")], 1);
        let later = r.due(t0 + Duration::from_secs(20));
        assert_eq!(
            later.len(),
            2,
            "a after 15 s, b after 15 s; a's second after 30 s"
        );
        assert_eq!(r.waiting.len(), 1);
    }
}
