//! One image in the daemon, from claim to its end: the file opened, inspected
//! and planned; the journal record of an earlier attempt continued, started
//! over or found to be of a changed file; the transfer run; and its outcomes
//! turned into a [`JobEnd`] that the run loop acts on.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tracing::{error, info};

use super::Settings;
use super::recovery::abort_record;
use super::retries::JOB_ATTEMPTS;
use crate::chunk::{FirstReads, PartPlan};
use crate::error::Class;
use crate::events::{JobMetrics, Observer, Observers};
use crate::journal::{DestinationRecord, JobJournal, JobRecord, Journal};
use crate::manifest;
use crate::metrics::Metrics;
use crate::progress::{Board, Progress, ProgressLog};
use crate::source::Source;
use crate::spool::{Claimed, DestinationError, ErrorReport};
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
}

impl JobEnd {
    pub(super) fn claimed(&self) -> &Claimed {
        match self {
            JobEnd::Done(c, _)
            | JobEnd::Refused(c, ..)
            | JobEnd::Failed(c, ..)
            | JobEnd::Interrupted(c)
            | JobEnd::Retry(c, _) => c,
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
    let prepared = match prepare(settings, &claimed) {
        Ok(p) => p,
        Err(r) => {
            // Refused for good: what an earlier attempt of this job left open
            // (it waited for a retry) can never finish.
            forget_earlier(&ctx, &claimed).await;
            return JobEnd::Refused(claimed, r, started);
        }
    };
    let mut dests = settings.destinations.clone();
    let start = match start(&ctx, &prepared, &mut dests).await {
        Ok(s) => s,
        Err(why) => {
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
        source,
        image,
        plan,
    } = prepared;
    let job_journal = JobJournal::new(ctx.journal.clone(), start.record);
    if let Err(e) = job_journal.flush(true) {
        // Without a record the job cannot resume; it can still run.
        error!("{e}");
    }

    let names: Vec<&str> = dests.iter().map(|d| d.name()).collect();
    let progress = Progress::new(&name, plan.file_bytes, &names);
    ctx.board.insert(&name, progress.clone());
    let observer: Arc<dyn Observer> = Arc::new(Observers(vec![
        job_journal.clone() as Arc<dyn Observer>,
        Arc::new(ProgressLog::new(progress.clone())),
        progress.clone(),
        Arc::new(JobMetrics::new(ctx.metrics.clone(), &names)),
    ]));
    let config = &settings.config;
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
    });
    let outcomes = transfer::run(
        job,
        dests,
        settings.budget.clone(),
        progress,
        start.resume,
        observer,
        ctx.cancel.clone(),
    )
    .await;
    ctx.board.remove(&name);
    let _ = job_journal.flush(true);
    let end = conclude(claimed, outcomes, ctx.cancel.is_requested(), started);
    if matches!(
        end,
        JobEnd::Done(..) | JobEnd::Failed(..) | JobEnd::Refused(..)
    ) {
        // The job ends for good: an upload still recorded (kept for a retry
        // while another destination failed for good) can never finish.
        abort_record(&job_journal.record(), settings).await;
        if let Err(e) = job_journal.remove() {
            error!("{e}");
        }
    }
    end
}

/// A claimed file, open, inspected and planned.
struct Prepared {
    name: String,
    source: Source,
    image: crate::image::Report,
    plan: PartPlan,
}

/// Opens, inspects and plans the claimed file. An error is a refusal of the
/// file, with the report that says why and what to do.
fn prepare(settings: &Settings, claimed: &Claimed) -> Result<Prepared, Box<ErrorReport>> {
    let refuse = |e: PrepareError| {
        let reason = match &e {
            PrepareError::Refused(i) | PrepareError::Unattested(i) => i.reasons.join("; "),
            _ => e.to_string(),
        };
        let mut r = report(&claimed.name, &reason, vec![], e.advice());
        r.inspection = e.into_report();
        Box::new(r)
    };
    let source =
        Source::open_claimed(&claimed.path, claimed.file_id).map_err(|e| refuse(e.into()))?;
    let config = &settings.config;
    let image = transfer::inspect_source(&source, claimed.sidecar.as_deref(), config, true, false)
        .map_err(refuse)?;
    let plan = transfer::plan_for(
        &source,
        &settings.destinations,
        config.transfer.part_size.as_u64(),
        &settings.budget,
    )
    .map_err(refuse)?;
    Ok(Prepared {
        name: source.name.clone(),
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
            name: name.clone(),
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
                        },
                    )
                })
                .collect(),
        },
        resume: HashMap::new(),
        first_reads: Arc::new(FirstReads::new(p.plan.count)),
    };
    let Some(prev) = ctx.journal.load(name) else {
        return Ok(start);
    };
    match continuation(&prev, &p.source, p.plan.part_bytes, &start.first_reads) {
        Continuation::Resume => {
            let taken = resume(&prev, name, dests, &mut start);
            // Uploads no configured destination continues cannot finish.
            let mut gone = prev.clone();
            gone.destinations.retain(|n, _| !taken.contains(n));
            abort_record(&gone, &ctx.settings).await;
        }
        Continuation::StartOver(why) => {
            info!("{name}: {why}; starting over");
            abort_record(&prev, &ctx.settings).await;
        }
        Continuation::Changed(why) => {
            abort_and_forget(ctx, name, &prev).await;
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
        start
            .record
            .destinations
            .retain(|n, _| !verified.contains(n));
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
            "{JOB_ATTEMPTS} attempts failed for passing reasons (network, server errors); giving up; its uploads were aborted"
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

/// The job's end from its outcomes, one per destination.
fn conclude(claimed: Claimed, outcomes: Vec<Outcome>, cancelled: bool, started: Instant) -> JobEnd {
    let interrupted = outcomes
        .iter()
        .any(|o| matches!(o.result, Err(TransferError::Cancelled)));
    if interrupted || (cancelled && outcomes.iter().any(|o| o.result.is_err())) {
        return JobEnd::Interrupted(claimed);
    }
    let passing_only = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .all(|e| e.class() == Class::Retry);
    if passing_only && outcomes.iter().any(|o| o.result.is_err()) {
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
        Err(e @ TransferError::Changed(c)) => Some((c.clone(), e.advice())),
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
            outcomes
                .iter()
                .find_map(|o| o.result.as_ref().err())
                .map_or(DESTINATION_ADVICE, TransferError::advice),
        )
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
        let end = conclude(claimed(), vec![failed("a", timeout())], false, t);
        assert!(matches!(end, JobEnd::Retry(..)), "a timeout passes");

        let outcomes = vec![failed("a", timeout()), failed("b", mismatch())];
        let JobEnd::Failed(_, r, _) = conclude(claimed(), outcomes, false, t) else {
            panic!("a mismatch is for good");
        };
        assert_eq!(r.what_to_do, DESTINATION_ADVICE);
        assert_eq!(r.destinations.len(), 2);

        let JobEnd::Failed(_, r, _) = conclude(claimed(), vec![failed("b", mismatch())], false, t)
        else {
            panic!("a mismatch is for good");
        };
        assert_eq!(r.what_to_do, crate::transfer::MISMATCH_ADVICE);

        let changed = TransferError::Changed(Change("its size changed".into()));
        let JobEnd::Failed(_, r, _) = conclude(claimed(), vec![failed("a", changed)], false, t)
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
            true,
            t,
        );
        assert!(matches!(end, JobEnd::Interrupted(..)));
    }
}
