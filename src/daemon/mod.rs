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
//! Rooms: `job.rs` is one image from claim to end, `retries.rs` the jobs
//! waiting to be tried again, `recovery.rs` the aborting of uploads that can
//! no longer finish; this file is the run loop and the settings it shares.
//!
//! Design choice: one loop owns the spool (claims and moves happen in one place,
//! in order); jobs are tasks that return their outcome to the loop. The loop
//! wakes on inotify hints, on a 1 s tick while a file is settling, and on a full
//! rescan every `rescan_secs`.

mod buckets;
mod job;
mod recovery;
mod retries;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{error, info, warn};

use crate::chunk::Budget;
use crate::config::{Config, OnSuccess};
use crate::error::Class;
use crate::import::Importer;
use crate::journal::Journal;
use crate::lock::DirLock;
use crate::metrics::Metrics;
use crate::progress::Board;
use crate::spool::{ClaimOutcome, Claimed, Hint, Spool};
use crate::status::Status;
use crate::store::Destination;
use crate::transfer;
use job::{JobCtx, JobEnd, give_up, job, report, wait_imports};
use recovery::abort_orphans;
use retries::Retries;

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
    #[error(transparent)]
    Convert(#[from] crate::image::convert::ConvertError),
}

impl DaemonError {
    /// [`Class::Fatal`]: the daemon does not start.
    pub fn class(&self) -> Class {
        Class::Fatal
    }
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
    /// The importer of each destination with an import table, by its name.
    importers: BTreeMap<String, Arc<Importer>>,
    budget: Budget,
    /// The bandwidth limits every job pays into; one for the daemon's life,
    /// its limits replaced on SIGHUP.
    bandwidth: Arc<crate::bandwidth::Bandwidth>,
    /// qemu-img, found at start when `policy.convert` is on.
    converter: Option<crate::image::convert::Converter>,
    /// `daemon.max_conversions` permits, shared by every job.
    conversions: Arc<tokio::sync::Semaphore>,
}

impl Settings {
    fn new(config: Config) -> Result<Settings, DaemonError> {
        let destinations = transfer::destinations(&config, &[], config.transfer.part_size.as_u64())
            .map_err(|e| DaemonError::Destinations(e.to_string()))?;
        let mut importers = BTreeMap::new();
        for (name, d) in &config.destinations {
            if let Some(table) = &d.import {
                let i = Importer::new(name, d, table, &config.transfer)
                    .map_err(|e| DaemonError::Destinations(e.to_string()))?;
                importers.insert(name.clone(), Arc::new(i));
            }
        }
        let budget = Budget::new(config.transfer.memory_limit.as_u64());
        let converter = if config.policy.convert {
            Some(crate::image::convert::Converter::find()?)
        } else {
            None
        };
        let conversions = Arc::new(tokio::sync::Semaphore::new(config.daemon.max_conversions));
        let bandwidth = Arc::new(config.bandwidth());
        Ok(Settings {
            config,
            destinations,
            importers,
            budget,
            bandwidth,
            converter,
            conversions,
        })
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
    if new.daemon.io_priority != old.daemon.io_priority {
        warn!("daemon.io_priority changed: it takes effect at the next start");
    }
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
    // Jobs in flight follow the new limits too.
    current.bandwidth.set(
        s.config.transfer.bandwidth_limit.clone(),
        s.config.destination_bandwidth(),
    );
    s.bandwidth = current.bandwidth.clone();
    if new.daemon.max_conversions == old.daemon.max_conversions {
        // Conversions under way keep counting against the same limit.
        s.conversions = current.conversions.clone();
    }
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
    let (trigger, cancel) = crate::shutdown::new();
    crate::shutdown::on_signals(trigger, || info!("stop requested"))
        .map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let (mut d, mut hints) = Daemon::start(config_path, cancel.clone()).await?;
    d.resume_active().await;
    d.sources = buckets::watch_all(&d.ctx());
    d.announce();
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(5));
    let mut next_scan = Instant::now();
    loop {
        let wait = next_scan.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = cancel.requested() => break,
            _ = sighup.recv() => {
                d.reload();
                next_scan = Instant::now();
            }
            hint = hints.recv() => {
                if let Some(Hint::RenamedIn(name)) = hint {
                    d.spool.note_renamed_in(&name);
                }
                next_scan = Instant::now();
            }
            Some(ended) = d.jobs.join_next() => {
                match ended {
                    Ok(end) => d.job_ended(end),
                    Err(e) => error!("a job task ended abnormally: {e}"),
                }
                next_scan = Instant::now();
            }
            Some(ended) = d.waits.join_next() => {
                match ended {
                    Ok(end) => d.job_ended(end),
                    Err(e) => error!("a job's imports ended abnormally: {e}"),
                }
                next_scan = Instant::now();
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            _ = status_tick.tick() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status_line(&d.board))]);
                // /readyz reads this; checked here too so an idle daemon (one
                // scan a rescan_secs) shows a broken state directory within 5 s.
                d.state_ok = state_dir_ok(&d.journal, &d.status, d.state_ok);
            }
            _ = tokio::time::sleep(wait) => {
                next_scan = Instant::now() + d.tick();
            }
        }
    }
    d.stop().await;
    Ok(())
}

/// The run loop's state. One loop owns it: claims, moves and settings
/// changes happen in one place, in order.
struct Daemon {
    config_path: Option<PathBuf>,
    settings: Arc<Settings>,
    spool: Spool,
    locks: Locks,
    journal: Journal,
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    cancel: crate::shutdown::Shutdown,
    stop_http: crate::shutdown::Trigger,
    prober: JoinHandle<()>,
    hint_tx: mpsc::Sender<Hint>,
    /// Kept for its Drop: dropping the watcher stops watching.
    watcher: Option<notify::RecommendedWatcher>,
    jobs: JoinSet<JobEnd>,
    /// Jobs whose uploads ended, waiting for their imports (they hold no
    /// job slot).
    waits: JoinSet<JobEnd>,
    /// One watcher per bucket source, with its jobs.
    sources: JoinSet<()>,
    retries: Retries,
    state_ok: bool,
}

impl Daemon {
    /// Loads the configuration, takes the locks (before touching the journal:
    /// a second daemon must not), opens journal and spool, and starts serving
    /// HTTP, probing destinations and watching the spool.
    async fn start(
        config_path: Option<PathBuf>,
        cancel: crate::shutdown::Shutdown,
    ) -> Result<(Daemon, mpsc::Receiver<Hint>), DaemonError> {
        let config = Config::load_or_embedded(config_path.as_deref())?;
        raise_open_files_limit();
        crate::priority::apply(config.daemon.io_priority);
        let state_error = |source| DaemonError::State {
            path: config.state_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            state_error(crate::journal::JournalError::Io {
                path: config.state_dir.clone(),
                source: e,
            })
        })?;
        let state_lock =
            DirLock::take(&config.state_dir, LOCK_FILE, "state directory", "state_dir")?;
        let journal = Journal::open(&config.state_dir).map_err(state_error)?;
        journal.writable().map_err(state_error)?;
        let spool = Spool::open(
            &config.spool_dir,
            Duration::from_secs(config.daemon.settle_secs),
        )?;
        let locks = Locks {
            state: state_lock,
            spool: spool_lock(&spool)?,
        };
        let settings = Arc::new(Settings::new(config)?);
        let board = Arc::new(Board::default());
        let metrics = Metrics::new();
        let kept = journal.last_successes();
        for d in &settings.destinations {
            metrics.add_destination(d.name(), kept.get(d.name()).copied());
        }
        for name in settings.importers.keys() {
            metrics.add_import_destination(name);
        }
        let status = Arc::new(Status {
            spool_dir: Some(settings.config.spool_dir.clone()),
            budget: std::sync::Mutex::new(Some(settings.budget.clone())),
            bandwidth: std::sync::Mutex::new(Some(settings.bandwidth.clone())),
            ..Arc::into_inner(Status::new(metrics.clone(), board.clone())).expect("just made")
        });
        let (stop_http, http_stopped) = crate::shutdown::new();
        let addr = settings.config.metrics_addr;
        let bound = crate::http::serve(addr, status.clone(), http_stopped)
            .await
            .map_err(|e| DaemonError::Metrics(addr, e))?;
        info!("serving http://{bound}/metrics, /healthz, /readyz and /status");
        let prober = tokio::spawn(probe_destinations(settings.clone(), status.clone()));
        let (hint_tx, hints) = mpsc::channel::<Hint>(1024);
        let watcher = crate::spool::watch(spool.dir(), hint_tx.clone());
        let d = Daemon {
            config_path,
            settings,
            spool,
            locks,
            journal,
            board,
            metrics,
            status,
            cancel,
            stop_http,
            prober,
            hint_tx,
            watcher,
            jobs: JoinSet::new(),
            sources: JoinSet::new(),
            waits: JoinSet::new(),
            retries: Retries::default(),
            state_ok: true,
        };
        Ok((d, hints))
    }

    fn ctx(&self) -> JobCtx {
        JobCtx {
            settings: self.settings.clone(),
            journal: self.journal.clone(),
            board: self.board.clone(),
            metrics: self.metrics.clone(),
            status: self.status.clone(),
            cancel: self.cancel.clone(),
        }
    }

    /// Aborts what can no longer finish, then resumes every job left in
    /// `active/`.
    async fn resume_active(&mut self) {
        abort_orphans(&self.journal, &self.spool, &self.settings).await;
        crate::spool::sweep_conversions(self.spool.dir(), &self.spool.active_jobs());
        for name in self.spool.active_jobs() {
            let claimed = self.spool.reclaim(&name);
            info!(
                "resuming {:?} found in {}",
                name,
                self.spool.active_dir().display()
            );
            self.jobs.spawn(job(self.ctx(), claimed));
        }
    }

    fn announce(&self) {
        let s = &self.settings;
        info!(
            "ferry {} watching {} ({} destination(s): {})",
            crate::VERSION,
            s.config.spool_dir.display(),
            s.destinations.len(),
            s.destinations
                .iter()
                .map(|d| format!("{} = {}", d.name(), d.url()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let limits: Vec<String> = s
            .bandwidth
            .limits()
            .into_iter()
            .filter_map(|(name, l)| Some(format!("{name}: {}", l.schedule?)))
            .filter(|line| !line.ends_with(": off"))
            .collect();
        if !limits.is_empty() {
            info!("bandwidth limits: {}", limits.join("; "));
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }

    /// SIGHUP: new settings for new jobs, all of the configuration or none.
    fn reload(&mut self) {
        match reload(self.config_path.as_deref(), &self.settings, &mut self.locks) {
            Ok((s, new_spool)) => {
                if let Some(new_spool) = new_spool {
                    self.spool = new_spool;
                    self.watcher = crate::spool::watch(self.spool.dir(), self.hint_tx.clone());
                }
                for d in &s.destinations {
                    self.metrics.add_destination(d.name(), None);
                }
                for name in s.importers.keys() {
                    self.metrics.add_import_destination(name);
                }
                self.settings = Arc::new(s);
                self.prober.abort();
                self.prober = tokio::spawn(probe_destinations(
                    self.settings.clone(),
                    self.status.clone(),
                ));
                info!("configuration reloaded; jobs in flight keep their destinations");
            }
            Err(e) => error!("reload refused, keeping the running configuration: {e}"),
        }
    }

    /// Settles an ended job. One that may still pass waits for its next
    /// attempt, or, after all of them, is given up.
    fn job_ended(&mut self, end: JobEnd) {
        let end = match end {
            JobEnd::Importing(w) => {
                self.waits.spawn(wait_imports(*w));
                return;
            }
            end => end,
        };
        let name = end.claimed().name.clone();
        match settle_job(&self.spool, &self.settings, &self.status, end) {
            None => self.retries.forget(&name),
            Some((c, why)) => {
                if let Some(c) = self.retries.failed(c, why, Instant::now()) {
                    self.jobs.spawn(give_up(self.ctx(), c));
                }
            }
        }
        self.keep_last_successes();
    }

    /// Writes each destination's last success for the next start; it only
    /// feeds a metric, so a failed write is said and nothing more.
    fn keep_last_successes(&self) {
        if let Err(e) = self
            .journal
            .save_last_successes(&self.metrics.last_successes())
        {
            warn!("cannot keep the last-success times: {e}");
        }
    }

    /// One scan: jobs due for another attempt, ferry's directories and locks
    /// tended, new files claimed while there is room, and the board updated.
    /// Returns how long until the next scan.
    fn tick(&mut self) -> Duration {
        let rescan = Duration::from_secs(self.settings.config.daemon.rescan_secs);
        for c in self.retries.due(Instant::now()) {
            self.jobs.spawn(job(self.ctx(), c));
        }
        let (rewatch, locked, mut spool_problem) = tend(&mut self.spool, &mut self.locks);
        if rewatch {
            self.watcher = crate::spool::watch(self.spool.dir(), self.hint_tx.clone());
        }
        // No new work while the state directory refuses writes.
        self.state_ok = state_dir_ok(&self.journal, &self.status, self.state_ok);
        match self.spool.scan(Instant::now()) {
            Ok(ready) if self.state_ok && locked => self.claim(ready),
            Ok(_) => {}
            Err(e) => {
                spool_problem.get_or_insert(format!("{e}; ferry looks again every second"));
            }
        }
        // Logged when it changes, shown on /readyz while it lasts.
        self.status.set_spool_problem(spool_problem);
        self.status.set_retrying(self.retries.list());
        let (waiting, waiting_bytes) = self.spool.waiting();
        self.metrics.spool_waiting_images.set(waiting as i64);
        self.metrics.spool_waiting_bytes.set(waiting_bytes as i64);
        let mut list = self.spool.waiting_list(Instant::now());
        for w in list.iter_mut().filter(|w| w.why == crate::spool::READY) {
            w.why = self.why_not_claimed(&w.file, locked);
        }
        if let Ok(mut w) = self.status.waiting.lock() {
            *w = list;
        }
        if waiting > 0 || !self.state_ok || !self.retries.is_empty() || self.status.spool_broken() {
            Duration::from_secs(1)
        } else {
            rescan
        }
    }

    /// Claims ready files, in order, while fewer than `max_jobs` run.
    fn claim(&mut self, ready: Vec<crate::spool::Ready>) {
        for r in ready {
            if self.jobs.len() >= self.settings.config.daemon.max_jobs {
                break;
            }
            match self.spool.claim(&r) {
                Ok(ClaimOutcome::Claimed(c)) => {
                    info!("claimed {:?} ({} bytes)", c.name, r.size_bytes);
                    crate::failpoint::reached("claim");
                    self.jobs.spawn(job(self.ctx(), c));
                }
                Ok(ClaimOutcome::NotNow) => {}
                Ok(ClaimOutcome::Replaced(c, why)) => {
                    // Refused as a job is: the same log line, counts and report.
                    let report = report(
                        &c.name,
                        &why,
                        vec![],
                        "Put the image back in the spool as a regular file, written in full, then renamed into place.",
                    );
                    let end = JobEnd::Refused(c, Box::new(report), Instant::now());
                    settle_job(&self.spool, &self.settings, &self.status, end);
                }
                Err(e) => error!("claiming {:?}: {e}", r.name),
            }
        }
    }

    /// Why the complete file `name` is still in the spool after a scan
    /// claimed what it could, for `/status`.
    fn why_not_claimed(&self, name: &str, locked: bool) -> String {
        let max = self.settings.config.daemon.max_jobs;
        if !self.state_ok {
            "not taking new files: the state directory does not take writes (see /readyz)".into()
        } else if !locked {
            "not taking new files: ferry's lock on the spool or the state directory is not held (see the log)".into()
        } else if self.spool.active_dir().join(name).exists() {
            "waiting for the image of the same name in flight to end".into()
        } else if self.jobs.len() >= max {
            format!(
                "waiting for a job slot: {} image(s) in flight, daemon.max_jobs = {max}",
                self.jobs.len()
            )
        } else {
            "complete: taken at the next scan".into()
        }
    }

    /// Shutdown: no more claims; in-flight parts get `shutdown_timeout_secs`
    /// to finish; every record is written.
    async fn stop(mut self) {
        let timeout = Duration::from_secs(self.settings.config.daemon.shutdown_timeout_secs);
        info!(
            "stopping: {} job(s) in flight get up to {}s to reach a resumable point",
            self.jobs.len(),
            timeout.as_secs()
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // Every job saw the stop request already (the token is theirs too).
        let until = Instant::now() + timeout;
        let (spool, settings, status) = (&self.spool, &self.settings, &self.status);
        let mut importing = Vec::new();
        let mut left = crate::shutdown::drain(&mut self.jobs, timeout, |ended| match ended {
            Ok(JobEnd::Importing(w)) => importing.push(w),
            Ok(end) => stopped(spool, settings, status, end),
            Err(e) => error!("a job task ended abnormally: {e}"),
        })
        .await;
        // Imports stop at the request too, their records journaled.
        for w in importing {
            self.waits.spawn(wait_imports(*w));
        }
        let rest = until.saturating_duration_since(Instant::now());
        left += crate::shutdown::drain(&mut self.waits, rest, |ended| match ended {
            Ok(end) => stopped(spool, settings, status, end),
            Err(e) => error!("a job's imports ended abnormally: {e}"),
        })
        .await;
        self.waits.abort_all();
        // Bucket jobs stop at the request too; their leases are released.
        let rest = until.saturating_duration_since(Instant::now());
        left += crate::shutdown::drain(&mut self.sources, rest, |_| {}).await;
        self.sources.abort_all();
        if left > 0 {
            warn!(
                "shutdown timeout reached; {left} job(s) stop where they are and resume at the next start"
            );
        }
        self.jobs.abort_all();
        // Objects verified during the drain count too (and a destination
        // that verified one before a job was cut short).
        self.keep_last_successes();
        self.prober.abort();
        self.stop_http.trip();
        info!("stopped");
    }
}

/// Settles a job that ended during the shutdown.
fn stopped(spool: &Spool, settings: &Settings, status: &Status, end: JobEnd) {
    if let Some((c, _)) = settle_job(spool, settings, status, end) {
        info!(
            "{:?} stays in active/ and resumes at the next start",
            c.name
        );
    }
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

/// Acts on the spool for a job that ended.
fn settle_job(
    spool: &Spool,
    settings: &Settings,
    status: &Status,
    end: JobEnd,
) -> Option<(Claimed, String)> {
    match &end {
        JobEnd::Done(_, t) => status.metrics.job_ended("done", t.elapsed()),
        JobEnd::Refused(c, r, t) | JobEnd::Failed(c, r, t) => {
            status.metrics.job_ended(outcome(&end), t.elapsed());
            status.record_error(&c.name.to_string_lossy(), outcome(&end), &r.reason);
        }
        JobEnd::Interrupted(_) | JobEnd::Retry(..) | JobEnd::Importing(_) => {}
    }
    let word = outcome(&end);
    if let JobEnd::Done(c, _) | JobEnd::Refused(c, ..) | JobEnd::Failed(c, ..) = &end {
        // Its job ended for good: the original is kept, the QCOW2 is not.
        crate::spool::remove_conversion(spool.dir(), &c.name);
    }
    match end {
        JobEnd::Done(c, _) => {
            crate::failpoint::reached("done");
            let delete = settings.config.daemon.on_success == OnSuccess::Delete;
            match spool.finish_done(&c, delete) {
                Ok(resolved) => {
                    info!(
                        "{:?} verified at every destination; {}",
                        c.name,
                        if delete {
                            "deleted from the spool".to_string()
                        } else {
                            format!("moved to {}", spool.done_dir().display())
                        }
                    );
                    if resolved {
                        info!(
                            "{:?}: removed the error report of its earlier attempt from {}",
                            c.name,
                            spool.failed_dir().display()
                        );
                    }
                    status.resolve(&c.name.to_string_lossy());
                }
                Err(e) => error!("{e}"),
            }
        }
        JobEnd::Refused(c, mut report, _) | JobEnd::Failed(c, mut report, _) => {
            report.outcome = word;
            // Each destination's reason on its own line, for the journal.
            for f in &report.destinations {
                warn!(destination = %f.destination, "{:?} {word} at {}: {}", c.name, f.destination, f.error);
            }
            warn!(
                "{:?} {word}: {}; moved to {} with its error report",
                c.name,
                report.reason,
                spool.failed_dir().display()
            );
            if let Err(e) = spool.finish_failed(&c, &report) {
                error!("{e}; the file stays in {}", spool.active_dir().display());
            }
        }
        JobEnd::Interrupted(c) => info!("{:?} interrupted; it resumes at the next start", c.name),
        // Handed to the loop's waits before it comes here (`job_ended`).
        JobEnd::Importing(w) => info!("{:?} waits for its imports", w.claimed().name),
        JobEnd::Retry(c, why) => {
            status.record_error(&c.name.to_string_lossy(), "retrying", &why);
            return Some((c, why));
        }
    }
    None
}

/// The word for how a job ended, in the log, in `X.error.json`, on
/// `/status` and in `ferry_jobs_total{outcome}` alike.
fn outcome(end: &JobEnd) -> &'static str {
    match end {
        JobEnd::Done(..) => "done",
        JobEnd::Refused(..) => "refused",
        JobEnd::Failed(..) => "failed",
        JobEnd::Interrupted(..) => "interrupted",
        JobEnd::Retry(..) => "retrying",
        JobEnd::Importing(..) => "importing",
    }
}
