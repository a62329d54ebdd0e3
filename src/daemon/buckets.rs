//! Bucket sources in the daemon: every object under a `[sources.NAME]`
//! prefix is a job, claimed by a lease (`source::lease`) so that daemons on
//! several hosts share one export bucket with no coordinator.
//!
//! Each source has a watcher task: every `poll_secs` it lists the prefix,
//! and for each object that is a job (not ferry's own, not partial, without
//! a done or failed marker, not running here) it claims the lease while a
//! slot is free (`daemon.max_jobs` objects at once, apart from the spool's
//! jobs). A claimed object ships as `ferry push URL` ships it: read once by
//! ranged GETs, inspected with the daemon's policy, fanned out to every
//! destination and imported where a destination says so. While it runs its
//! lease is renewed every third of `lease_secs`; a renewal refused means
//! another ferry took the object over, and the job stops with nothing
//! marked. At its end the object gets `.ferry/done/NAME` (its manifests)
//! or `.ferry/failed/NAME` (the error report), and the lease is released.
//!
//! Design choice: a bucket job keeps no journal on its host, since any host
//! may take it over: the manifests beside the verified objects are its
//! record. A daemon that dies leaves its lease to expire; the daemon that
//! takes the object over skips every destination whose manifest names this
//! version of the object, waits for an image its manifest says is being
//! imported rather than make another, and ships to the rest from the
//! start (the object is still in its bucket). The uploads the dead job left
//! open are the stores' to expire (a lifecycle rule on incomplete multipart
//! uploads).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::job::{JobCtx, report};
use super::retries::JOB_ATTEMPTS;
use crate::config::SourceConfig;
use crate::error::Class;
use crate::events::{JobMetrics, Observer, Observers};
use crate::progress::{Progress, ProgressLog};
use crate::source::lease::{self, Bucket, BucketError, Claim, Lease};
use crate::spool::DestinationError;
use crate::store::Destination;
use crate::transfer::{self, Job, PrepareError, RetryPolicy};

/// Starts a watcher for every configured source; each runs until the stop
/// request, then waits for its jobs.
pub(super) fn watch_all(ctx: &JobCtx) -> JoinSet<()> {
    let mut set = JoinSet::new();
    let slots = Arc::new(Semaphore::new(ctx.settings.config.daemon.max_jobs));
    for (name, src) in &ctx.settings.config.sources {
        set.spawn(watch(ctx.clone(), name.clone(), src.clone(), slots.clone()));
    }
    set
}

/// Who holds a lease: this host and process.
fn holder() -> String {
    format!("{}:{}", crate::manifest::hostname(), std::process::id())
}

async fn watch(ctx: JobCtx, name: String, src: SourceConfig, slots: Arc<Semaphore>) {
    let config = &ctx.settings.config;
    let bucket = match crate::store::open_bucket(&src.url, &src.store(), &config.transfer) {
        Ok(b) => b,
        Err(e) => {
            ctx.status.set_source_problem(
                &name,
                Some(format!("source {name} ({}) cannot be used: {e}", src.url)),
            );
            return;
        }
    };
    let poll = Duration::from_secs(src.poll_secs);
    let lease_for = Duration::from_secs(src.lease_secs);
    let host = holder();
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut jobs: JoinSet<(String, Option<String>)> = JoinSet::new();
    // Objects whose last attempt here failed for a passing reason: how many
    // attempts they had, and when the next may start.
    let mut retrying: HashMap<String, (u32, Instant)> = HashMap::new();
    info!(
        "watching source {name} ({}) every {}s, leases of {}s held as {host}",
        src.url, src.poll_secs, src.lease_secs
    );
    loop {
        if ctx.cancel.is_requested() {
            break;
        }
        match bucket.list().await {
            Err(e) => ctx.status.set_source_problem(
                &name,
                Some(format!("source {name} ({}) cannot be listed: {e}", src.url)),
            ),
            Ok(listing) => {
                ctx.status.set_source_problem(&name, None);
                let wanted = lease::jobs(
                    &listing,
                    crate::image::sidecar::SUFFIX,
                    crate::manifest::MANIFEST_SUFFIX,
                    Duration::from_secs(src.settle_secs),
                    SystemTime::now(),
                );
                for object in wanted {
                    if ctx.cancel.is_requested() {
                        break;
                    }
                    if running.lock().is_ok_and(|r| r.contains(&object.name))
                        || retrying
                            .get(&object.name)
                            .is_some_and(|(_, at)| *at > Instant::now())
                    {
                        continue;
                    }
                    let attempt = retrying.get(&object.name).map_or(1, |(n, _)| n + 1);
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        break;
                    };
                    match lease::claim(&*bucket, &object.name, &host, lease_for, SystemTime::now())
                        .await
                    {
                        Ok(Claim::Taken { lease, took_over }) => {
                            match took_over {
                                Some(h) => info!(
                                    "claimed {}{} ({} bytes), taking over from {} whose lease expired at {}",
                                    src.url, object.name, object.size_bytes, h.host, h.expires_at
                                ),
                                None => info!(
                                    "claimed {}{} ({} bytes)",
                                    src.url, object.name, object.size_bytes
                                ),
                            }
                            if let Ok(mut r) = running.lock() {
                                r.insert(object.name.clone());
                            }
                            jobs.spawn(run(
                                ctx.clone(),
                                src.clone(),
                                bucket.clone(),
                                lease,
                                slot,
                                running.clone(),
                                attempt,
                            ));
                        }
                        Ok(Claim::Held(h)) => tracing::debug!(
                            "{}{}: held by {} until {}",
                            src.url,
                            object.name,
                            h.host,
                            h.expires_at
                        ),
                        Ok(Claim::Ended) => {}
                        Err(e) => warn!("claiming {}{}: {e}", src.url, object.name),
                    }
                }
            }
        }
        tokio::select! {
            _ = ctx.cancel.requested() => break,
            _ = tokio::time::sleep(poll) => {}
            // A job ended: its slot may take the next object now.
            Some(ended) = jobs.join_next() => {
                if let Ok((name, again)) = ended {
                    match again {
                        Some(_) => {
                            let n = retrying.get(&name).map_or(1, |(n, _)| n + 1);
                            let pause = (JOB_RETRY_PAUSE * n).min(JOB_RETRY_MAX_PAUSE);
                            retrying.insert(name, (n, Instant::now() + pause));
                        }
                        None => {
                            retrying.remove(&name);
                        }
                    }
                }
            }
        }
    }
    // Bounded by the jobs' own stop: they see the same request.
    while jobs.join_next().await.is_some() {}
}

/// The pause before an object that failed for a passing reason is tried
/// again here (after the N-th failure: N times this, at most the maximum),
/// as for the spool's jobs; after `JOB_ATTEMPTS` attempts it is marked
/// failed. Another host may try it meanwhile.
const JOB_RETRY_PAUSE: Duration = Duration::from_secs(15);
const JOB_RETRY_MAX_PAUSE: Duration = Duration::from_secs(300);

/// How a bucket job ended.
enum Ended {
    /// Every destination verified (and every import asked ended well):
    /// the done marker's body.
    Done(Bytes),
    /// For good: why, and the failed marker's body (an error report).
    Failed(String, Bytes),
    /// Every failure may pass: no marker, the next poll tries again.
    Retry(String),
    /// Stopped (shutdown, or the lease was lost).
    Stopped,
}

/// One claimed object, from its lease to its marker.
async fn run(
    ctx: JobCtx,
    src: SourceConfig,
    bucket: Arc<dyn Bucket>,
    lease: Lease,
    slot: OwnedSemaphorePermit,
    running: Arc<Mutex<HashSet<String>>>,
    attempt: u32,
) -> (String, Option<String>) {
    let name = lease.name.clone();
    let url = format!("{}{name}", src.url);
    let started = Instant::now();
    let (trip, cancel) = crate::shutdown::new();
    let lease = Arc::new(tokio::sync::Mutex::new(lease));
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = tokio::spawn(keep(
        bucket.clone(),
        lease.clone(),
        trip,
        ctx.cancel.clone(),
        lost.clone(),
    ));
    let ended = match ship(&ctx, &src, &url, &name, &cancel).await {
        Ended::Retry(why) if attempt >= JOB_ATTEMPTS => {
            let r = report(
                &name.clone().into(),
                &format!("{why}; given up after {attempt} attempts"),
                vec![],
                transfer::DESTINATION_ADVICE,
            );
            let body = Bytes::from(serde_json::to_vec_pretty(&r).unwrap_or_default());
            Ended::Failed(r.reason, body)
        }
        ended => ended,
    };
    let again = match &ended {
        Ended::Retry(why) => Some(why.clone()),
        _ => None,
    };
    keeper.abort();
    let _ = keeper.await;
    let lease = Arc::into_inner(lease).map(tokio::sync::Mutex::into_inner);
    if lost.load(std::sync::atomic::Ordering::Acquire) {
        warn!(
            "{url}: another ferry took the object over (this one's lease could not be renewed); stopped with nothing marked"
        );
    } else {
        let marked = match &ended {
            Ended::Done(body) => {
                info!("{url}: every destination verified it");
                ctx.metrics.job_ended("done", started.elapsed());
                let mut r = lease::mark_done(&*bucket, &name, body.clone()).await;
                if r.is_ok() && src.on_success == crate::config::SourceOnSuccess::Delete {
                    r = delete_object(&*bucket, &name).await;
                }
                r
            }
            Ended::Failed(why, body) => {
                warn!(
                    "{url}: {why}; marked failed ({}{FAILED}{name}), it is not taken again until that marker is deleted",
                    src.url,
                    FAILED = lease::FAILED
                );
                ctx.metrics.job_ended("failed", started.elapsed());
                lease::mark_failed(&*bucket, &name, body.clone()).await
            }
            Ended::Retry(why) => {
                warn!(
                    "{url}: {why}; attempt {attempt} of {JOB_ATTEMPTS}, tried again after a pause (by this or another host)"
                );
                Ok(())
            }
            Ended::Stopped => Ok(()),
        };
        if let Err(e) = marked {
            warn!(
                "{url}: cannot write its marker: {e}; it is shipped again once its lease is free"
            );
        }
        if let Some(lease) = lease
            && let Err(e) = lease.release(&*bucket).await
        {
            warn!("{url}: cannot release its lease ({e}); it expires by itself");
        }
    }
    if let Ok(mut r) = running.lock() {
        r.remove(&name);
    }
    drop(slot);
    (name, again)
}

/// The object and its sidecar, deleted once every destination verified it
/// (`on_success = "delete"`).
async fn delete_object(bucket: &dyn Bucket, name: &str) -> Result<(), BucketError> {
    bucket.delete(name).await?;
    bucket
        .delete(&format!("{name}{}", crate::image::sidecar::SUFFIX))
        .await
}

/// Renews the lease every third of its length; trips `trip` when it cannot
/// be renewed (another ferry took it over) or when the daemon stops.
async fn keep(
    bucket: Arc<dyn Bucket>,
    lease: Arc<tokio::sync::Mutex<Lease>>,
    trip: crate::shutdown::Trigger,
    stop: crate::shutdown::Shutdown,
    lost: Arc<std::sync::atomic::AtomicBool>,
) {
    let every = lease.lock().await.renew_every();
    loop {
        tokio::select! {
            _ = stop.requested() => {
                trip.trip();
                return;
            }
            _ = tokio::time::sleep(every) => {}
        }
        let mut l = lease.lock().await;
        match l.renew(&*bucket, SystemTime::now()).await {
            Ok(()) => {}
            Err(BucketError::Precondition(_)) => {
                lost.store(true, std::sync::atomic::Ordering::Release);
                trip.trip();
                return;
            }
            // A renewal that failed for another reason is tried again at the
            // next turn: two may fail before the lease expires.
            Err(e) => warn!("renewing the lease on {}: {e}", l.name),
        }
    }
}

/// The destinations whose manifest of `name` says they verified this very
/// object (its URL and ETag, its size) and whose object is still that size
/// (and CRC32C, where the store keeps one), with those manifests.
async fn earlier_verified(
    dests: &[Arc<Destination>],
    source: &crate::source::Source,
    url: &str,
    name: &str,
) -> Vec<(String, crate::manifest::Manifest)> {
    let Some(object) = source.remote() else {
        return vec![];
    };
    let mname = format!("{name}{}", crate::manifest::MANIFEST_SUFFIX);
    let mut found = Vec::new();
    for d in dests {
        let Ok(bytes) = d.get_small(&mname).await else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<crate::manifest::Manifest>(&bytes) else {
            continue;
        };
        let same = m
            .source
            .as_ref()
            .is_some_and(|s| s.url == url && s.etag == object.etag)
            && m.file_size_bytes == source.size_bytes;
        let there = same
            && d.head(name).await.is_ok_and(|h| {
                h.size_bytes == m.file_size_bytes
                    && h.crc32c
                        .is_none_or(|c| crate::manifest::crc_hex(c) == m.crc32c)
            });
        if there {
            found.push((d.name().to_string(), m));
        }
    }
    found
}

/// Ships the object at `url`: opened, inspected with the daemon's policy,
/// sent to every destination, imported where a destination says so.
async fn ship(
    ctx: &JobCtx,
    src: &SourceConfig,
    url: &str,
    name: &str,
    cancel: &crate::shutdown::Shutdown,
) -> Ended {
    let settings = &ctx.settings;
    let config = &settings.config;
    let failed = |e: PrepareError| {
        // Reaching or reading the object may fail for passing reasons (a
        // network, a store's 5xx): only its own faults are for good.
        let passing = match &e {
            PrepareError::Open(s) => s.class() != Class::Refuse,
            PrepareError::Inspect(crate::image::InspectError::Io { .. }) => true,
            e => e.class() == Class::Retry,
        };
        let reason = e.to_string();
        ctx.status.record_error(name, "refused", &reason);
        if passing {
            return Ended::Retry(reason);
        }
        let advice = format!(
            "{} Then delete {}{}{name} so that it is shipped again.",
            e.advice(),
            src.url,
            lease::FAILED
        );
        let mut r = report(&name.into(), &reason, vec![], &advice);
        r.outcome = "refused";
        r.inspection = e.into_report();
        let body = Bytes::from(serde_json::to_vec_pretty(&r).unwrap_or_default());
        Ended::Failed(reason, body)
    };
    let opened = match crate::store::open_object(
        url,
        &src.store(),
        &config.transfer,
        transfer::SIDECAR_BESIDE,
    )
    .await
    {
        Ok(o) => o,
        Err(e) => return failed(PrepareError::Open(e)),
    };
    let source = opened.source;
    let image = match transfer::inspect_object(&source, opened.sidecar, config, true, false).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let dests: Vec<Arc<Destination>> = settings.destinations.clone();
    let names: Vec<&str> = dests.iter().map(|d| d.name()).collect();
    if let Err(e) = transfer::check_import(&image, config, &names) {
        return failed(e);
    }
    let plan = match transfer::plan_for(
        &source,
        &dests,
        config.transfer.part_size.as_u64(),
        &settings.budget,
    ) {
        Ok(p) => p,
        Err(e) => return failed(e),
    };
    // Destinations that verified this very version in an earlier attempt
    // (a job taken over from a ferry that stopped): not sent again, and
    // their imports continue from their manifests.
    let earlier = earlier_verified(&dests, &source, url, name).await;
    let upload: Vec<Arc<Destination>> = dests
        .iter()
        .filter(|d| !earlier.iter().any(|(n, _)| n == d.name()))
        .cloned()
        .collect();
    let progress = Progress::new(name, plan.file_bytes, &names);
    for (d, _) in &earlier {
        info!(
            "{url}: verified at {d} by an earlier attempt (its manifest names this version): not sent again"
        );
        if let Some(dp) = progress.get(d) {
            dp.add(plan.file_bytes);
            dp.set_phase(crate::progress::Phase::Done);
        }
    }
    ctx.board.insert(name, progress.clone());
    let observer: Arc<dyn Observer> = Arc::new(Observers(vec![
        Arc::new(ProgressLog::new(progress.clone())),
        progress.clone(),
        Arc::new(JobMetrics::new(ctx.metrics.clone(), &names)),
    ]));
    let job = Arc::new(Job {
        name: name.to_string(),
        source,
        first_reads: Arc::new(crate::chunk::FirstReads::new(plan.count)),
        plan,
        // Never the mmap reader's checks: an object is read by GETs.
        reader: crate::config::ReaderKind::Pread,
        verify: config.transfer.verify,
        retry: RetryPolicy::from_config(&config.transfer),
        image: Some(image),
        resumable: false,
        bandwidth: settings.bandwidth.clone(),
        keep_cache: config.daemon.keep_cache,
    });
    let outcomes = if upload.is_empty() {
        vec![]
    } else {
        transfer::run(
            job,
            upload,
            settings.budget.clone(),
            progress,
            HashMap::new(),
            observer,
            cancel.clone(),
        )
        .await
    };
    let verified: Vec<(String, crate::manifest::Manifest)> = outcomes
        .iter()
        .filter_map(|o| Some((o.destination.clone(), o.result.as_ref().ok()?.clone())))
        .chain(earlier)
        .collect();
    let importers: Vec<(Arc<Destination>, Arc<crate::import::Importer>)> = dests
        .iter()
        .filter_map(|d| Some((d.clone(), settings.importers.get(d.name())?.clone())))
        .collect();
    let imports = if importers.is_empty() || cancel.is_requested() {
        vec![]
    } else {
        crate::import::after_push(&importers, &verified, Duration::from_secs(30), cancel).await
    };
    ctx.board.remove(name);
    if cancel.is_requested() {
        return Ended::Stopped;
    }
    let mut errors = Vec::new();
    let mut passing = true;
    for o in &outcomes {
        if let Err(e) = &o.result {
            // A read of the source that failed after its retries is a
            // network's doing, not the object's.
            passing &= e.class() == Class::Retry || matches!(e, transfer::TransferError::Read(_));
            errors.push(DestinationError {
                destination: o.destination.clone(),
                url: o.url.clone(),
                error: e.to_string(),
            });
        }
    }
    for (d, i) in &imports {
        if let Err(e) = &i.result {
            passing &= e.class() == Class::Retry;
            errors.push(DestinationError {
                destination: d.clone(),
                url: format!("import at {d}"),
                error: e.to_string(),
            });
        }
    }
    if errors.is_empty() {
        let manifests: BTreeMap<String, serde_json::Value> = verified
            .iter()
            .map(|(d, m)| (d.clone(), serde_json::to_value(m).unwrap_or_default()))
            .collect();
        let done = serde_json::json!({ "object": url, "destinations": manifests });
        return Ended::Done(Bytes::from(
            serde_json::to_vec_pretty(&done).unwrap_or_default(),
        ));
    }
    let reason = format!(
        "{} of {} destination(s) did not verify it",
        errors.len(),
        outcomes.len()
    );
    ctx.status.record_error(name, "failed", &reason);
    if passing {
        return Ended::Retry(format!("{reason}, each for a reason that may pass"));
    }
    let advice = format!(
        "Check the named destinations (reachable, credentials, bucket exists), then delete {}{}{name} so that it is shipped again.",
        src.url,
        lease::FAILED
    );
    let r = report(&name.into(), &reason, errors, &advice);
    let body = Bytes::from(serde_json::to_vec_pretty(&r).unwrap_or_default());
    Ended::Failed(reason, body)
}
