//! One image in the daemon, from claim to its end: the file opened, inspected
//! and planned; the journal record of an earlier attempt continued, started
//! over or found to be of a changed file; the transfer run; each verified
//! object imported as a custom image where its destination says so; and the
//! outcomes turned into a [`JobEnd`] that the run loop acts on.
//!
//! Design choice: a job gives its slot (`daemon.max_jobs`) back when its
//! uploads end, and waits for its imports apart ([`JobEnd::Importing`]): an
//! import is OCI's work, hours of polling that use neither memory nor
//! bandwidth here, and must not keep the next image from shipping. Each
//! destination's import starts as soon as that destination verified, so a
//! slow upload elsewhere delays no import.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::Settings;
use super::recovery::abort_record;
use super::retries::JOB_ATTEMPTS;
use crate::chunk::{FirstReads, PartPlan};
use crate::error::Class;
use crate::events::{JobMetrics, Observer, Observers};
use crate::import::{ImportError, ImportView, Importer, Watch, import_object};
use crate::journal::{DestinationRecord, ImportRecord, JobJournal, JobRecord, Journal};
use crate::manifest::{self, Manifest};
use crate::metrics::Metrics;
use crate::progress::{Board, DestinationProgress, ImportShown, Phase, Progress, ProgressLog};
use crate::source::Source;
use crate::spool::{Claimed, DestinationError, ErrorReport};
use crate::status::{ImportEnded, Status};
use crate::store::Destination;
use crate::transfer::{
    self, CHANGED_ADVICE, DESTINATION_ADVICE, Job, Outcome, PrepareError, Resume, RetryPolicy,
    TransferError,
};

/// What every job shares.
#[derive(Clone)]
pub(super) struct JobCtx {
    pub settings: Arc<Settings>,
    pub journal: Journal,
    pub board: Arc<Board>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub cancel: crate::shutdown::Shutdown,
}

/// How a job ended, for the loop to act on the spool.
pub(super) enum JobEnd {
    Done(Claimed, Instant),
    /// The file was refused before a byte was sent: it is not an image OCI
    /// takes, or cannot be read, or the configuration cannot take it.
    Refused(Claimed, Box<ErrorReport>, Instant),
    /// At least one destination did not verify it, for good.
    Failed(Claimed, Box<ErrorReport>, Instant),
    /// Shutting down: the file stays in `active/` with its journal record.
    Interrupted(Claimed),
    /// Every failure may pass by itself (a destination down, throttling): the
    /// file stays in `active/` with its uploads and journal, and is tried again.
    Retry(Claimed, String),
    /// The uploads ended and imports go on: the loop waits for them apart
    /// ([`wait_imports`]), and the job's slot is free.
    Importing(Box<Waiting>),
}

impl JobEnd {
    pub(super) fn claimed(&self) -> &Claimed {
        match self {
            JobEnd::Done(c, _)
            | JobEnd::Refused(c, ..)
            | JobEnd::Failed(c, ..)
            | JobEnd::Interrupted(c)
            | JobEnd::Retry(c, _) => c,
            JobEnd::Importing(w) => &w.claimed,
        }
    }
}

pub(super) fn report(
    name: &OsString,
    reason: &str,
    destinations: Vec<DestinationError>,
    what_to_do: &str,
) -> ErrorReport {
    ErrorReport {
        format_version: 2,
        file: name.to_string_lossy().into_owned(),
        outcome: "failed",
        at: manifest::timestamp(SystemTime::now()),
        reason: reason.to_string(),
        destinations,
        what_to_do: what_to_do.to_string(),
        inspection: None,
    }
}

/// One image, from claim to verified (or failed, or interrupted).
pub(super) async fn job(ctx: JobCtx, claimed: Claimed) -> JobEnd {
    let started = Instant::now();
    let settings = &ctx.settings;
    // A conversion may take minutes: a stop request ends it (qemu-img is
    // killed with its future) and the job resumes at the next start.
    let prepared = tokio::select! {
        p = prepare(&ctx, &claimed) => Some(p),
        _ = ctx.cancel.requested() => None,
    };
    let Some(prepared) = prepared else {
        return JobEnd::Interrupted(claimed);
    };
    let prepared = match prepared {
        Ok(p) => p,
        Err(NotPrepared::Refused(r)) => {
            // Refused for good: what an earlier attempt of this job left open
            // (it waited for a retry) can never finish.
            forget_earlier(&ctx, &claimed).await;
            return JobEnd::Refused(claimed, r, started);
        }
        Err(NotPrepared::Retry(why)) => return JobEnd::Retry(claimed, why),
    };
    // Two files may ship under one name (web.raw converted, and web.qcow2;
    // app.ova and app.vmdk): one at a time, or both would upload to one
    // key. The second waits, holding its slot, until the first ended (its
    // imports too: OCI may be reading the object).
    let held = Progress::new(&prepared.name, prepared.plan.file_bytes, &[]);
    let mut said = false;
    while !ctx.board.insert_new(&prepared.name, held.clone()) {
        if !said {
            info!(
                "{:?} ships as {}, like another image in flight: it waits for that one to end",
                claimed.name, prepared.name
            );
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = ctx.cancel.requested() => return JobEnd::Interrupted(claimed),
        }
    }
    let mut dests = settings.destinations.clone();
    let start = match start(&ctx, &prepared, &mut dests).await {
        Ok(s) => s,
        Err(why) => {
            ctx.board.remove(&prepared.name);
            let r = report(
                &claimed.name,
                &format!(
                    "changed while uploading: between two attempts (ferry stopped, or waiting to try again), {why}; every upload of it was aborted"
                ),
                vec![],
                CHANGED_ADVICE,
            );
            return JobEnd::Failed(claimed, Box::new(r), started);
        }
    };
    let Prepared {
        name,
        claimed: _,
        source,
        image,
        plan,
    } = prepared;
    let earlier_verified = start.verified;
    let job_journal = JobJournal::new(ctx.journal.clone(), start.record);
    if let Err(e) = job_journal.flush(true) {
        // Without a record the job cannot resume; it can still run.
        error!("{e}");
    }
    // Destinations that verified the file in an earlier attempt and whose
    // import has not ended well: their imports continue.
    let still_importing: Vec<Arc<Destination>> = {
        let record = job_journal.record();
        settings
            .destinations
            .iter()
            .filter(|d| earlier_verified.iter().any(|v| v == d.name()))
            .filter(|d| settings.importers.contains_key(d.name()))
            .filter(|d| {
                !record
                    .destinations
                    .get(d.name())
                    .and_then(|r| r.import.as_ref())
                    .is_some_and(|i| i.done)
            })
            .cloned()
            .collect()
    };

    let names: Vec<&str> = dests
        .iter()
        .chain(&still_importing)
        .map(|d| d.name())
        .collect();
    let progress = Progress::new(&name, plan.file_bytes, &names);
    for d in &still_importing {
        if let Some(dp) = progress.get(d.name()) {
            dp.add(plan.file_bytes);
            dp.set_phase(Phase::Done);
        }
    }
    ctx.board.insert(&name, progress.clone());
    let uploading: Vec<&str> = dests.iter().map(|d| d.name()).collect();
    let (feed, mut verified) = mpsc::unbounded_channel();
    let observer: Arc<dyn Observer> = Arc::new(Observers(vec![
        job_journal.clone() as Arc<dyn Observer>,
        Arc::new(ProgressLog::new(progress.clone())),
        progress.clone(),
        Arc::new(JobMetrics::new(ctx.metrics.clone(), &uploading)),
        Arc::new(ImportFeed {
            tx: feed,
            importing: settings.importers.keys().cloned().collect(),
        }),
    ]));
    let mut imports = Imports {
        set: JoinSet::new(),
        tasks: HashMap::new(),
        ctx: ctx.clone(),
        journal: job_journal.clone(),
        progress: progress.clone(),
        file: name.clone(),
    };
    for d in &still_importing {
        imports.start(d.clone(), None);
    }
    let config = &settings.config;
    let outcomes = if dests.is_empty() {
        vec![]
    } else {
        let job = Arc::new(Job {
            name: name.clone(),
            source,
            first_reads: start.first_reads,
            plan,
            reader: config.transfer.reader,
            verify: config.transfer.verify,
            retry: RetryPolicy::from_config(&config.transfer),
            image: Some(image),
            resumable: true,
            bandwidth: settings.bandwidth.clone(),
            keep_cache: config.daemon.keep_cache,
        });
        let run = transfer::run(
            job,
            dests,
            settings.budget.clone(),
            progress,
            start.resume,
            observer,
            ctx.cancel.clone(),
        );
        tokio::pin!(run);
        // Each verified destination's import starts at once, while the
        // others still upload. Bounded: one message per destination.
        loop {
            tokio::select! {
                outcomes = &mut run => break outcomes,
                Some(v) = verified.recv() => imports.start_named(&settings.destinations, v),
            }
        }
    };
    while let Ok(v) = verified.try_recv() {
        imports.start_named(&settings.destinations, v);
    }
    let _ = job_journal.flush(true);
    // An upload that failed for a passing reason is tried again soon; the
    // imports under way stop here (where they stand is journaled) and go on
    // with that attempt, rather than hold it for as long as OCI imports.
    if outcomes
        .iter()
        .any(|o| matches!(&o.result, Err(e) if e.class() == Class::Retry))
    {
        imports.set.shutdown().await;
        imports.tasks.clear();
    }
    let waiting = Waiting {
        claimed,
        outcomes,
        imports,
        journal: job_journal,
        started,
    };
    if waiting.imports.set.is_empty() {
        return wait_imports(waiting).await;
    }
    JobEnd::Importing(Box::new(waiting))
}

/// A job whose uploads ended, waiting for its imports.
pub(super) struct Waiting {
    claimed: Claimed,
    outcomes: Vec<Outcome>,
    imports: Imports,
    journal: Arc<JobJournal>,
    started: Instant,
}

impl Waiting {
    pub(super) fn claimed(&self) -> &Claimed {
        &self.claimed
    }
}

/// Waits for a job's imports to end, then ends the job: its record is
/// removed when it ends for good, and its board entry in any case.
pub(super) async fn wait_imports(w: Waiting) -> JobEnd {
    let Waiting {
        claimed,
        outcomes,
        mut imports,
        journal,
        started,
    } = w;
    let mut ended = Vec::new();
    while let Some(joined) = imports.set.join_next_with_id().await {
        let (id, result) = match joined {
            Ok((id, result)) => (id, result),
            // Never taken for an import that ended: the job must not end
            // done without it.
            Err(e) => {
                warn!("an import task ended abnormally: {e}");
                let why = format!("the import task ended abnormally ({e}); its record is kept");
                (e.id(), Err(ImportError::Setup(why)))
            }
        };
        if let Some((destination, url)) = imports.tasks.remove(&id) {
            ended.push(ImportEnd {
                destination,
                url,
                result,
            });
        }
    }
    let ctx = &imports.ctx;
    ctx.board.remove(&imports.file);
    let _ = journal.flush(true);
    let end = conclude(claimed, outcomes, ended, ctx.cancel.is_requested(), started);
    if matches!(
        end,
        JobEnd::Done(..) | JobEnd::Failed(..) | JobEnd::Refused(..)
    ) {
        // The job ends for good: an upload still recorded (kept for a retry
        // while another destination failed for good) can never finish.
        abort_record(&journal.record(), &ctx.settings).await;
        if let Err(e) = journal.remove() {
            error!("{e}");
        }
    }
    end
}

/// Hands each verified object's manifest to its import, for destinations
/// with an import table.
struct ImportFeed {
    tx: mpsc::UnboundedSender<(String, Manifest)>,
    importing: HashSet<String>,
}

impl Observer for ImportFeed {
    fn verified(&self, destination: &str, manifest: &Manifest) {
        if self.importing.contains(destination) {
            let _ = self.tx.send((destination.to_string(), manifest.clone()));
        }
    }
}

/// One job's imports, a task per destination.
struct Imports {
    set: JoinSet<Result<(), ImportError>>,
    /// Each task's destination and URL, by task id.
    tasks: HashMap<tokio::task::Id, (String, String)>,
    ctx: JobCtx,
    journal: Arc<JobJournal>,
    progress: Arc<Progress>,
    /// The job's (the file's) name.
    file: String,
}

/// How one destination's import ended.
struct ImportEnd {
    destination: String,
    url: String,
    result: Result<(), ImportError>,
}

impl Imports {
    /// Starts the import of a destination among `dests` that verified.
    fn start_named(&mut self, dests: &[Arc<Destination>], (name, m): (String, Manifest)) {
        if let Some(d) = dests.iter().find(|d| d.name() == name) {
            self.start(d.clone(), Some(m));
        }
    }

    /// Starts `dest`'s import of the job's object, from its manifest (read
    /// back from the destination when `None`: an import continued after a
    /// restart).
    fn start(&mut self, dest: Arc<Destination>, m: Option<Manifest>) {
        let Some(importer) = self.ctx.settings.importers.get(dest.name()).cloned() else {
            return;
        };
        let ctx = self.ctx.clone();
        let journal = self.journal.clone();
        let dp = self.progress.get(dest.name());
        let file = self.file.clone();
        let named = (dest.name().to_string(), dest.url().to_string());
        let task = self.set.spawn(async move {
            if let Some(dp) = &dp {
                dp.set_phase(Phase::Importing);
            }
            let result = import_one(&ctx, &journal, dp.clone(), &dest, &importer, &file, m).await;
            if let Some(dp) = &dp {
                match &result {
                    Ok(()) => dp.set_phase(Phase::Imported),
                    // It goes on at the next attempt, or the next start.
                    Err(e) if e.class() == Class::Retry => {}
                    Err(_) => dp.set_phase(Phase::Failed),
                }
            }
            result
        });
        self.tasks.insert(task.id(), named);
    }
}

/// One destination's import: the manifest (given, or read back), the
/// journaled record continued (or a new one), the import, and what it
/// ended as in the log, the metrics and `/status`.
async fn import_one(
    ctx: &JobCtx,
    journal: &Arc<JobJournal>,
    dp: Option<Arc<DestinationProgress>>,
    dest: &Destination,
    importer: &Importer,
    file: &str,
    m: Option<Manifest>,
) -> Result<(), ImportError> {
    let dn = dest.name();
    let m = match m {
        Some(m) => m,
        None => {
            let mname = format!("{file}{}", manifest::MANIFEST_SUFFIX);
            let bytes = dest.get_small(&mname).await?;
            Manifest::parse(&bytes)
                .map_err(|e| ImportError::Setup(format!("{}: {e}", dest.key(&mname))))?
        }
    };
    let journaled = journal
        .record()
        .destinations
        .get(dn)
        .and_then(|r| r.import.clone());
    let mut rec = match journaled {
        Some(r) => {
            info!(
                destination = dn,
                "{file}: continuing its import in {}{}",
                importer.region(),
                r.image_id
                    .as_deref()
                    .map(|i| format!(" (image {i})"))
                    .unwrap_or_default()
            );
            r
        }
        None => {
            info!(
                destination = dn,
                "{file}: verified at {dn}; importing it as a custom image in {} (compartment {})",
                importer.region(),
                importer.config().compartment_id
            );
            importer.record(&m, "")
        }
    };
    let watch = JournalWatch {
        journal: journal.clone(),
        destination: dn.to_string(),
        file: file.to_string(),
        dp,
        logged: std::sync::Mutex::new(None),
    };
    let outcome = import_object(dest, importer, m, &mut rec, &watch, &ctx.cancel).await;
    let written = outcome.manifest.as_ref().and_then(|m| m.import.as_ref());
    let fatal = outcome
        .result
        .as_ref()
        .err()
        .filter(|e| e.class() != Class::Retry);
    // An import counts once it ended for good: its manifest written, or
    // failed in a way no later attempt takes up again.
    let counted = written.or_else(|| fatal.and_then(|e| e.entry()));
    let ok = outcome.result.is_ok();
    if let Some(entry) = counted {
        let took = Duration::from_secs(entry.duration_secs.unwrap_or(0));
        ctx.metrics.import_ended(dn, ok, took);
        ctx.status.record_import(ImportEnded {
            file: file.to_string(),
            destination: dn.to_string(),
            image_id: entry.image_id.clone(),
            state: entry.state.clone(),
            outcome: if ok { "ok" } else { "failed" }.into(),
            finished_at: entry.finished_at.clone().unwrap_or_default(),
            duration_secs: took.as_secs(),
            error: outcome.result.as_ref().err().map(|e| e.to_string()),
        });
        if ok {
            info!(
                destination = dn,
                "{file}: imported in {} as image {} ({}) in {}",
                entry.region,
                entry.image_id.as_deref().unwrap_or("-"),
                entry.state,
                humantime::format_duration(took)
            );
        }
    } else if fatal.is_some() {
        // It ended before an image did (OCI refused the request): it counts.
        ctx.metrics.import_ended(dn, false, Duration::ZERO);
    }
    outcome.result
}

/// Keeps an import's record in the job's journal and shows it on the board,
/// and in the log when its state changes and every [`IMPORT_LOG_EVERY`].
struct JournalWatch {
    journal: Arc<JobJournal>,
    destination: String,
    file: String,
    dp: Option<Arc<DestinationProgress>>,
    /// When the log last said where the import stands, and what it said.
    logged: std::sync::Mutex<Option<(Instant, String)>>,
}

/// An import's progress line in the log, at most this often (imports take
/// minutes to hours).
const IMPORT_LOG_EVERY: Duration = Duration::from_secs(300);

impl Watch for JournalWatch {
    fn keep(&self, record: &ImportRecord) -> Result<(), String> {
        self.journal.set_import(&self.destination, record)
    }

    fn shown(&self, v: &ImportView) {
        if let Some(dp) = &self.dp {
            dp.set_import(ImportShown {
                image_id: v.image_id.clone(),
                state: v.state.clone(),
                percent: v.percent,
            });
        }
        // The end has a line of its own (`import_one`, or the job's failure).
        if matches!(v.state.as_str(), "AVAILABLE" | "DISABLED" | "DELETED") {
            return;
        }
        let Ok(mut logged) = self.logged.lock() else {
            return;
        };
        let due = match &*logged {
            Some((at, state)) => *state != v.state || at.elapsed() >= IMPORT_LOG_EVERY,
            None => v.image_id.is_some(),
        };
        if due && let Some(id) = &v.image_id {
            info!(
                destination = self.destination.as_str(),
                "{}: image {id} {}{}, {} since the import began",
                self.file,
                v.state,
                v.percent.map(|p| format!(" ({p:.0}%)")).unwrap_or_default(),
                humantime::format_duration(Duration::from_secs(v.elapsed.as_secs()))
            );
            *logged = Some((Instant::now(), v.state.clone()));
        }
    }
}

/// A claimed file, open, inspected and planned.
struct Prepared {
    /// The object's name: the file's, or what it ships as (an OVA's disk,
    /// a conversion).
    name: String,
    /// The claimed file's name in `active/`, which names its journal record.
    claimed: String,
    source: Source,
    image: crate::image::Report,
    plan: PartPlan,
}

/// Why a claimed file was not prepared.
enum NotPrepared {
    /// For good: the report says why and what to do.
    Refused(Box<ErrorReport>),
    /// For a reason that may pass (a conversion's directory not writable
    /// now): the file stays in `active/` and is tried again.
    Retry(String),
}

/// Opens, inspects (converting it where `policy.convert` says so) and
/// plans the claimed file.
async fn prepare(ctx: &JobCtx, claimed: &Claimed) -> Result<Prepared, NotPrepared> {
    let settings = &ctx.settings;
    let refuse = |e: PrepareError| {
        if let PrepareError::Convert(c) = &e
            && c.class() == crate::error::Class::Retry
        {
            return NotPrepared::Retry(format!("{c}; {}", c.advice()));
        }
        let reason = match &e {
            PrepareError::Refused(i)
            | PrepareError::Unattested(i)
            | PrepareError::NotImportable(i) => i.reasons.join("; "),
            _ => e.to_string(),
        };
        let mut r = report(&claimed.name, &reason, vec![], e.advice());
        r.inspection = e.into_report();
        NotPrepared::Refused(Box::new(r))
    };
    let source =
        Source::open_claimed(&claimed.path, claimed.file_id).map_err(|e| refuse(e.into()))?;
    let config = &settings.config;
    let names: Vec<&str> = settings.destinations.iter().map(|d| d.name()).collect();
    let claimed_name = claimed.name.to_string_lossy().into_owned();
    // On the board while it converts, under the claimed file's name.
    let shown = Progress::new(&claimed_name, 0, &names);
    let (source, image) = match &settings.converter {
        Some(converter) => {
            let on_board = std::sync::Once::new();
            let progress = |step: crate::image::convert::Step, percent: f64| {
                on_board.call_once(|| ctx.board.insert(&claimed_name, shown.clone()));
                shown.set_conversion(step.as_str(), percent);
            };
            let ended = |outcome: &'static str, took: Duration| {
                ctx.metrics.conversion_ended(outcome, took);
            };
            let converting = transfer::Converting {
                converter: Some(converter),
                out: crate::spool::conversion_of(&config.spool_dir, &claimed.name),
                permits: Some(&settings.conversions),
                progress: &progress,
                ended: &ended,
            };
            let r = transfer::inspect_or_convert(
                source,
                claimed.sidecar.as_deref(),
                config,
                true,
                false,
                Some(&converting),
            )
            .await;
            if on_board.is_completed() {
                ctx.board.remove(&claimed_name);
            }
            r
        }
        None => {
            transfer::inspect_or_convert(
                source,
                claimed.sidecar.as_deref(),
                config,
                true,
                false,
                None,
            )
            .await
        }
    }
    .map_err(refuse)?;
    transfer::check_import(&image, config, &names).map_err(refuse)?;
    let plan = transfer::plan_for(
        &source,
        &settings.destinations,
        config.transfer.part_size.as_u64(),
        &settings.budget,
    )
    .map_err(refuse)?;
    Ok(Prepared {
        name: source.name.clone(),
        claimed: claimed_name,
        source,
        image,
        plan,
    })
}

/// This attempt's journal record, and what it continues of an earlier one.
struct Start {
    record: JobRecord,
    resume: HashMap<String, Resume>,
    first_reads: Arc<FirstReads>,
    /// Destinations that verified the file in an earlier attempt (taken out
    /// of the destinations to upload to; kept in the record, with their
    /// imports).
    verified: Vec<String>,
}

/// Starts this attempt's record. An earlier attempt's record is continued
/// only when it is known to be of this very file, unchanged: then its uploads
/// are resumed and destinations that verified it are taken out of `dests`.
/// Otherwise its uploads are aborted. `Err` says how the file changed since.
async fn start(
    ctx: &JobCtx,
    p: &Prepared,
    dests: &mut Vec<Arc<Destination>>,
) -> Result<Start, String> {
    let name = &p.name;
    let identity = &p.source.identity;
    let mut start = Start {
        record: JobRecord {
            format_version: crate::journal::FORMAT_VERSION,
            name: p.claimed.clone(),
            dev: identity.dev,
            ino: identity.ino,
            size_bytes: identity.size_bytes,
            mtime_ns: identity.mtime_ns,
            ctime_ns: Some(identity.ctime_ns),
            part_size_bytes: p.plan.part_bytes,
            part_count: p.plan.count,
            destinations: dests
                .iter()
                .map(|d| {
                    (
                        d.name().to_string(),
                        DestinationRecord {
                            url: d.url().to_string(),
                            address: Some(d.address().clone()),
                            key: Some(d.key(name)),
                            upload_id: None,
                            parts: vec![],
                            verified: false,
                            import: None,
                        },
                    )
                })
                .collect(),
        },
        resume: HashMap::new(),
        first_reads: Arc::new(FirstReads::new(p.plan.count)),
        verified: vec![],
    };
    let Some(prev) = ctx.journal.load(&p.claimed) else {
        return Ok(start);
    };
    let mut next = continuation(&prev, &p.source, p.plan.part_bytes, &start.first_reads);
    if let (Continuation::Changed(why), Some(c)) = (&next, &p.image.conversion)
        && c.fresh
    {
        // The QCOW2 was made again in this attempt, from an original
        // unchanged since the earlier one (a changed original is refused
        // before): nothing sent from the earlier QCOW2 can be continued.
        next = Continuation::StartOver(format!("it was converted again ({why})"), false);
    }
    match next {
        Continuation::Resume => {
            let taken = resume(&prev, name, dests, &mut start);
            // Uploads no configured destination continues cannot finish.
            let mut gone = prev.clone();
            gone.destinations.retain(|n, _| !taken.contains(n));
            abort_record(&gone, &ctx.settings).await;
        }
        Continuation::StartOver(why, keep_verified) => {
            info!("{name}: {why}; starting over");
            // The file is the same: what verified stays verified (and its
            // import goes on), only the unfinished uploads start over.
            let mut verified = prev.clone();
            verified
                .destinations
                .retain(|_, d| keep_verified && d.verified);
            let taken = resume(&verified, name, dests, &mut start);
            let mut gone = prev.clone();
            gone.destinations.retain(|n, _| !taken.contains(n));
            abort_record(&gone, &ctx.settings).await;
        }
        Continuation::Changed(why) => {
            abort_and_forget(ctx, &p.claimed, &prev).await;
            return Err(why);
        }
    }
    Ok(start)
}

/// Takes over the uploads of `prev` that a destination in `dests` continues
/// (the same place and key), and drops from `dests` the destinations that
/// verified the file already. Returns the names in `prev` taken over.
fn resume(
    prev: &JobRecord,
    name: &str,
    dests: &mut Vec<Arc<Destination>>,
    start: &mut Start,
) -> HashSet<String> {
    let mut taken = HashSet::new();
    let mut verified = Vec::new();
    for dest in dests.iter() {
        let key = dest.key(name);
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
            if let Some(r) = start.record.destinations.get_mut(dest.name()) {
                r.verified = true;
                r.import = pd.import.clone();
            }
        } else if let Some(id) = &pd.upload_id {
            start.resume.insert(
                dest.name().to_string(),
                Resume {
                    upload_id: id.clone(),
                    receipts: pd.parts.clone(),
                },
            );
            if let Some(r) = start.record.destinations.get_mut(dest.name()) {
                r.upload_id = Some(id.clone());
                r.parts = pd.parts.clone();
            }
        }
    }
    if !verified.is_empty() {
        info!("{name}: already verified at {verified:?}");
        dests.retain(|d| !verified.iter().any(|v| v == d.name()));
        start.verified = verified;
    }
    taken
}

/// Aborts the uploads of an earlier attempt of this job and removes its
/// record, for a job that ends for good before it starts its own.
async fn forget_earlier(ctx: &JobCtx, c: &Claimed) {
    if let Some(name) = c.name.to_str()
        && let Some(record) = ctx.journal.load(name)
    {
        abort_and_forget(ctx, name, &record).await;
    }
}

/// Aborts the uploads of `record` (of the job `name`) and removes it.
async fn abort_and_forget(ctx: &JobCtx, name: &str, record: &JobRecord) {
    abort_record(record, &ctx.settings).await;
    if let Err(e) = ctx.journal.remove(name) {
        error!("{e}");
    }
}

/// Ends a job that failed for passing reasons `JOB_ATTEMPTS` times: its
/// uploads are aborted and its record removed (so the file, put back in the
/// spool, starts afresh), then it goes to `failed/`.
pub(super) async fn give_up(ctx: JobCtx, c: Claimed) -> JobEnd {
    let started = Instant::now();
    forget_earlier(&ctx, &c).await;
    let r = report(
        &c.name,
        &format!(
            "{JOB_ATTEMPTS} attempts failed for passing reasons (network, server errors); giving up; its unfinished uploads were aborted (objects that verified stay, and images under way are named in the log)"
        ),
        vec![],
        "Check the destinations named in the log and in /status, then move the file from failed/ back into the spool.",
    );
    JobEnd::Failed(c, Box::new(r), started)
}

/// What a journal record left by an earlier attempt allows.
enum Continuation {
    /// The same file, unchanged, with the same plan: continue its uploads.
    Resume,
    /// Nothing is known to be wrong, but the uploads cannot be continued;
    /// `true` when the file is known unchanged, so that what verified
    /// stays verified.
    StartOver(String, bool),
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
            false,
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
        return Continuation::StartOver("the part size changed".into(), true);
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

/// The job's end from its outcomes, one per destination it uploaded to,
/// and the ends of its imports.
fn conclude(
    claimed: Claimed,
    outcomes: Vec<Outcome>,
    imports: Vec<ImportEnd>,
    cancelled: bool,
    started: Instant,
) -> JobEnd {
    let upload_errors: Vec<(&Outcome, &TransferError)> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err().map(|e| (o, e)))
        .collect();
    let import_errors: Vec<(&ImportEnd, &ImportError)> = imports
        .iter()
        .filter_map(|i| i.result.as_ref().err().map(|e| (i, e)))
        .collect();
    let any_error = !upload_errors.is_empty() || !import_errors.is_empty();
    let interrupted = upload_errors
        .iter()
        .any(|(_, e)| matches!(e, TransferError::Cancelled))
        || import_errors
            .iter()
            .any(|(_, e)| matches!(e, ImportError::Cancelled));
    if interrupted || (cancelled && any_error) {
        return JobEnd::Interrupted(claimed);
    }
    let passing_only = upload_errors.iter().all(|(_, e)| e.class() == Class::Retry)
        && import_errors.iter().all(|(_, e)| e.class() == Class::Retry);
    if passing_only && any_error {
        let why = upload_errors
            .iter()
            .map(|(o, e)| format!("{}: {e}", o.destination))
            .chain(
                import_errors
                    .iter()
                    .map(|(i, e)| format!("{}: import: {e}", i.destination)),
            )
            .collect::<Vec<_>>()
            .join("; ");
        return JobEnd::Retry(claimed, why);
    }
    let failures: Vec<DestinationError> = upload_errors
        .iter()
        .map(|(o, e)| DestinationError {
            destination: o.destination.clone(),
            url: o.url.clone(),
            error: e.to_string(),
        })
        .chain(import_errors.iter().map(|(i, e)| DestinationError {
            destination: i.destination.clone(),
            url: i.url.clone(),
            error: format!("import: {e}"),
        }))
        .collect();
    if failures.is_empty() {
        return JobEnd::Done(claimed, started);
    }
    let changed = upload_errors.iter().find_map(|(_, e)| match e {
        TransferError::Changed(c) => Some((c.clone(), e.advice())),
        _ => None,
    });
    let (reason, what) = if let Some((c, advice)) = changed {
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
        (reason, advice)
    } else {
        let mut parts = Vec::new();
        if !upload_errors.is_empty() {
            parts.push(format!(
                "{} of {} destination(s) did not verify: {}",
                upload_errors.len(),
                outcomes.len(),
                upload_errors
                    .iter()
                    .map(|(o, _)| o.destination.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !import_errors.is_empty() {
            parts.push(format!(
                "{} import(s) failed: {}",
                import_errors.len(),
                import_errors
                    .iter()
                    .map(|(i, e)| format!("{}: {e}", i.destination))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        let what = match (upload_errors.first(), import_errors.first()) {
            (Some((_, e)), _) => e.advice(),
            (None, Some((_, e))) => e.advice(),
            (None, None) => DESTINATION_ADVICE,
        };
        (parts.join("; "), what)
    };
    let r = report(&claimed.name, &reason, failures, what);
    JobEnd::Failed(claimed, Box::new(r), started)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Change;
    use crate::store::StoreError;

    fn claimed() -> Claimed {
        Claimed {
            name: "a.qcow2".into(),
            path: "/spool/.ferry/active/a.qcow2".into(),
            sidecar: None,
            file_id: None,
        }
    }

    fn failed(destination: &str, e: TransferError) -> Outcome {
        Outcome {
            destination: destination.into(),
            url: format!("memory://{destination}/"),
            key: "a.qcow2".into(),
            result: Err(e),
        }
    }

    fn timeout() -> TransferError {
        TransferError::Store(StoreError::Io {
            op: "put part",
            key: "a.qcow2".into(),
            source: std::io::Error::from(std::io::ErrorKind::TimedOut),
        })
    }

    fn mismatch() -> TransferError {
        TransferError::Mismatch {
            size: 10,
            crc32c: 1,
            expected_size: 10,
            expected_crc32c: 2,
        }
    }

    /// The end, and the advice of a failure, come from the variants' class.
    #[test]
    fn a_job_ends_by_the_class_of_its_failures() {
        let t = Instant::now();
        let end = conclude(claimed(), vec![failed("a", timeout())], vec![], false, t);
        assert!(matches!(end, JobEnd::Retry(..)), "a timeout passes");

        let outcomes = vec![failed("a", timeout()), failed("b", mismatch())];
        let JobEnd::Failed(_, r, _) = conclude(claimed(), outcomes, vec![], false, t) else {
            panic!("a mismatch is for good");
        };
        assert_eq!(r.what_to_do, DESTINATION_ADVICE);
        assert_eq!(r.destinations.len(), 2);

        let JobEnd::Failed(_, r, _) =
            conclude(claimed(), vec![failed("b", mismatch())], vec![], false, t)
        else {
            panic!("a mismatch is for good");
        };
        assert_eq!(r.what_to_do, crate::transfer::MISMATCH_ADVICE);

        let changed = TransferError::Changed(Change("its size changed".into()));
        let JobEnd::Failed(_, r, _) =
            conclude(claimed(), vec![failed("a", changed)], vec![], false, t)
        else {
            panic!("a changed source is for good");
        };
        assert_eq!(r.what_to_do, CHANGED_ADVICE);
        assert!(
            r.reason.starts_with("changed while uploading"),
            "{}",
            r.reason
        );

        let end = conclude(
            claimed(),
            vec![failed("a", TransferError::Cancelled)],
            vec![],
            true,
            t,
        );
        assert!(matches!(end, JobEnd::Interrupted(..)));
    }

    fn import_failed(destination: &str, e: ImportError) -> ImportEnd {
        ImportEnd {
            destination: destination.into(),
            url: format!("oci://images/{destination}/"),
            result: Err(e),
        }
    }

    fn disabled() -> ImportError {
        ImportError::Ended(Box::new(crate::manifest::ImportEntry {
            image_id: Some("ocid1.image.oc1..x".into()),
            state: "DISABLED".into(),
            outcome: "failed".into(),
            region: "eu-frankfurt-1".into(),
            compartment_id: "ocid1.compartment.oc1..c".into(),
            display_name: "a".into(),
            source: "par".into(),
            launch_mode: "PARAVIRTUALIZED".into(),
            work_request_id: None,
            started_at: String::new(),
            finished_at: None,
            duration_secs: Some(60),
            error: Some("The image import failed (ImageImportFailed)".into()),
        }))
    }

    /// Imports count as the uploads do: a passing failure retries the job,
    /// a failed import fails it with OCI's words and the import's advice, a
    /// stopped one interrupts it.
    #[test]
    fn a_job_ends_by_its_imports_too() {
        let t = Instant::now();
        let ok = |d: &str| Outcome {
            destination: d.into(),
            url: format!("oci://images/{d}/"),
            key: "a.qcow2".into(),
            result: Ok(crate::manifest::Manifest::example()),
        };
        let passing = ImportError::Journal("disk full".into());
        let end = conclude(
            claimed(),
            vec![ok("ashburn")],
            vec![import_failed("ashburn", passing)],
            false,
            t,
        );
        assert!(
            matches!(end, JobEnd::Retry(..)),
            "a journal that refuses writes passes"
        );

        let end = conclude(
            claimed(),
            vec![ok("ashburn"), ok("frankfurt")],
            vec![import_failed("frankfurt", disabled())],
            false,
            t,
        );
        let JobEnd::Failed(_, r, _) = end else {
            panic!("a DISABLED image fails the file");
        };
        assert!(
            r.reason.starts_with(
                "1 import(s) failed: frankfurt: image ocid1.image.oc1..x ended DISABLED"
            ),
            "{}",
            r.reason
        );
        assert!(r.reason.contains("ImageImportFailed"), "{}", r.reason);
        assert_eq!(r.destinations.len(), 1);
        assert!(r.destinations[0].error.starts_with("import: "));
        assert_eq!(r.what_to_do, disabled().advice());

        // An upload that failed for good, and an import: both are named.
        let end = conclude(
            claimed(),
            vec![failed("ashburn", mismatch()), ok("frankfurt")],
            vec![import_failed("frankfurt", disabled())],
            false,
            t,
        );
        let JobEnd::Failed(_, r, _) = end else {
            panic!()
        };
        assert!(
            r.reason
                .contains("1 of 2 destination(s) did not verify: ashburn; 1 import(s) failed"),
            "{}",
            r.reason
        );
        assert_eq!(r.what_to_do, crate::transfer::MISMATCH_ADVICE);

        let end = conclude(
            claimed(),
            vec![ok("ashburn")],
            vec![import_failed("ashburn", ImportError::Cancelled)],
            true,
            t,
        );
        assert!(matches!(end, JobEnd::Interrupted(..)));
        let end = conclude(
            claimed(),
            vec![],
            vec![ImportEnd {
                destination: "a".into(),
                url: String::new(),
                result: Ok(()),
            }],
            false,
            t,
        );
        assert!(
            matches!(end, JobEnd::Done(..)),
            "an import resumed alone that ends well"
        );
    }
}
