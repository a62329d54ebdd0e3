//! `ferry push`: one image to every chosen destination at once, with
//! progress, and what the command says about each destination.
//!
//! Promises: nothing is sent before the image, its sidecar, the destinations
//! and the part size are all accepted ([`PrepareError`] otherwise); a stop
//! request (Ctrl-C, SIGTERM) aborts every upload not yet complete (nothing
//! resumes a push), and destinations that verified keep their objects; each
//! destination gets one line: `verified ...` on stdout, `ferry: FAILED ...` or
//! `ferry: INTERRUPTED ...` on stderr.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::chunk::{self, Budget, FirstReads, PartPlan};
use crate::config::VerifyMode;
use crate::events::{NoObserver, Observer};
use crate::import::Importer;
use crate::progress::Progress;
use crate::shutdown::Shutdown;
use crate::source::Source;
use crate::status::Status;
use crate::transfer::{
    self, Job, Outcome, PrepareError, RetryPolicy, TransferError, check_import, destinations,
    inspect_object, plan_for,
};

/// What `ferry push` was asked for, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Destination names or URLs; all configured destinations when empty.
    pub to: Vec<String>,
    pub part_size_bytes: Option<u64>,
    pub verify: Option<VerifyMode>,
    /// Ship even what inspection refuses (the manifest records the verdict).
    pub force: bool,
    /// Do not import verified objects, whatever the destinations' import
    /// tables say.
    pub no_import: bool,
    /// Convert an image OCI cannot import into QCOW2 first, as
    /// `policy.convert = true` does.
    pub convert: bool,
    /// All destinations together, instead of `transfer.bandwidth_limit`.
    pub bandwidth_limit: Option<crate::bandwidth::Schedule>,
}

/// What a push did: each destination's upload, and the imports that
/// followed where a destination has an import table.
#[derive(Debug)]
pub struct Pushed {
    pub outcomes: Vec<Outcome>,
    pub imports: Vec<(String, crate::import::ImportOutcome)>,
}

/// Puts a push on the status board `st` serves, and returns the observer
/// that counts its events in `st`'s metrics.
fn shown(
    st: &Status,
    budget: &Budget,
    bandwidth: &Arc<crate::bandwidth::Bandwidth>,
    name: &str,
    progress: &Arc<Progress>,
    names: &[&str],
) -> Arc<dyn Observer> {
    if let Ok(mut b) = st.budget.lock() {
        *b = Some(budget.clone());
    }
    if let Ok(mut b) = st.bandwidth.lock() {
        *b = Some(bandwidth.clone());
    }
    st.board.insert(name, progress.clone());
    for n in names {
        st.metrics.add_destination(n, None);
    }
    Arc::new(crate::events::Observers(vec![
        Arc::new(crate::events::JobMetrics::new(st.metrics.clone(), names)),
        progress.clone(),
    ]))
}

/// One image (a file, or an object at `path` when it is an `s3://` or
/// `oci://` URL) to every chosen destination, with progress. When `cancel` trips,
/// uploads not yet complete are aborted and end `Cancelled`; destinations
/// that verified before keep their objects.
pub async fn push(
    config: &crate::config::Config,
    path: &std::path::Path,
    opts: PushOptions,
    progress_every: Duration,
    status: Option<Arc<crate::status::Status>>,
    cancel: Shutdown,
) -> Result<Pushed, PrepareError> {
    let started = std::time::Instant::now();
    // Before anything is read, and before qemu-img starts (it inherits it).
    crate::priority::apply(config.daemon.io_priority);
    let mut cleanup = RemoveOnDrop(None);
    let (source, report) = match object_url(path) {
        Some(url) => {
            let opened = crate::store::open_object(
                url,
                &config.source_store(url),
                &config.transfer,
                transfer::SIDECAR_BESIDE,
            )
            .await
            .map_err(PrepareError::Open)?;
            let report =
                inspect_object(&opened.source, opened.sidecar, config, false, opts.force).await?;
            (opened.source, report)
        }
        None => {
            let source = Source::open(path)?;
            let sidecar = crate::image::sidecar::path_of(path);
            let sidecar = sidecar.exists().then_some(sidecar.as_path());
            if opts.convert || config.policy.convert {
                let out = config.state_dir.join("convert").join(format!(
                    "{}.{}.qcow2",
                    source.name,
                    std::process::id()
                ));
                // A push resumes nothing: its conversion goes when it ends.
                cleanup.0 = Some(out.clone());
                // A stop request ends a conversion (qemu-img dies with it).
                tokio::select! {
                    r = convert_and_inspect(config, source, sidecar, &opts, &status, &out) => r?,
                    _ = cancel.requested() => return Err(PrepareError::Stopped),
                }
            } else {
                crate::transfer::inspect_or_convert(
                    source, sidecar, config, false, opts.force, None,
                )
                .await?
            }
        }
    };
    let part_size = opts
        .part_size_bytes
        .unwrap_or(config.transfer.part_size.as_u64());
    crate::config::check_part_size(part_size, config.transfer.memory_limit.as_u64())
        .map_err(PrepareError::PartSize)?;
    let budget = Budget::new(config.transfer.memory_limit.as_u64());
    let hint = PartPlan::new(source.size_bytes, part_size, chunk::PartLimits::S3)
        .map(|p| p.part_bytes)
        .unwrap_or(part_size);
    let dests = destinations(config, &opts.to, hint)?;
    let plan = plan_for(&source, &dests, part_size, &budget)?;
    // The imports the destinations' tables ask for, ready before a byte is sent.
    let mut importers = Vec::new();
    if !opts.no_import {
        let names: Vec<&str> = dests.iter().map(|d| d.name()).collect();
        check_import(&report, config, &names)?;
        for d in &dests {
            if let Some(cfg) = config.destinations.get(d.name())
                && cfg.url == d.url()
                && let Some(table) = &cfg.import
            {
                let i = Importer::new(d.name(), cfg, table, &config.transfer)
                    .map_err(|e| PrepareError::Destination(e.to_string()))?;
                importers.push((d.clone(), Arc::new(i)));
            }
        }
    }
    info!(
        "pushing {} ({} bytes) in {} parts of {} to {}",
        source.name,
        plan.file_bytes,
        plan.count,
        bytesize::ByteSize(plan.part_bytes).display().iec(),
        dests
            .iter()
            .map(|d| d.name().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let names: Vec<&str> = dests.iter().map(|d| d.name()).collect();
    let progress = Progress::new(&source.name, plan.file_bytes, &names);
    let renderer = crate::progress::Renderer::start(progress.clone(), progress_every);
    let bandwidth = Arc::new(crate::bandwidth::Bandwidth::new(
        opts.bandwidth_limit
            .clone()
            .or_else(|| config.transfer.bandwidth_limit.clone()),
        config.destination_bandwidth(),
    ));
    let observer = match &status {
        Some(st) => shown(st, &budget, &bandwidth, &source.name, &progress, &names),
        None => Arc::new(NoObserver),
    };
    let job = Arc::new(Job {
        name: source.name.clone(),
        source: source.clone(),
        first_reads: Arc::new(FirstReads::new(plan.count)),
        plan,
        // An object is read by GETs: never the mmap reader's checks.
        reader: if source.remote().is_some() {
            crate::config::ReaderKind::Pread
        } else {
            config.transfer.reader
        },
        verify: opts.verify.unwrap_or(config.transfer.verify),
        retry: RetryPolicy::from_config(&config.transfer),
        image: Some(report),
        resumable: false,
        bandwidth,
        keep_cache: config.daemon.keep_cache,
    });
    let outcomes = transfer::run(
        job,
        dests,
        budget,
        progress,
        HashMap::new(),
        observer,
        cancel.clone(),
    )
    .await;
    renderer.finish().await;
    let verified: Vec<(String, crate::manifest::Manifest)> = outcomes
        .iter()
        .filter_map(|o| Some((o.destination.clone(), o.result.as_ref().ok()?.clone())))
        .collect();
    let imports = if importers.is_empty() || cancel.is_requested() {
        vec![]
    } else {
        crate::import::after_push(&importers, &verified, progress_every, &cancel).await
    };
    if let Some(st) = &status {
        st.board.remove(&source.name);
        let ok = outcomes.iter().all(|o| o.result.is_ok())
            && imports.iter().all(|(_, i)| i.result.is_ok());
        st.metrics
            .job_ended(if ok { "done" } else { "failed" }, started.elapsed());
    }
    Ok(Pushed { outcomes, imports })
}

/// Inspects a file for a push with `--convert`, converting it into `out`
/// when OCI cannot import it as it is; progress goes to the log every 10%.
async fn convert_and_inspect(
    config: &crate::config::Config,
    source: Source,
    sidecar: Option<&std::path::Path>,
    opts: &PushOptions,
    status: &Option<Arc<Status>>,
    out: &std::path::Path,
) -> Result<(Source, crate::image::Report), PrepareError> {
    // Needed only for an image that is converted: a QCOW2 ships without it.
    let converter = crate::image::convert::Converter::find().ok();
    let shown = std::sync::Mutex::new((crate::image::convert::Step::Waiting, -1i64));
    let name = source.name.clone();
    let progress = |step: crate::image::convert::Step, percent: f64| {
        let tenth = (percent / 10.0).floor() as i64;
        let mut last = shown.lock().unwrap_or_else(|p| p.into_inner());
        if *last != (step, tenth) && step != crate::image::convert::Step::Waiting {
            *last = (step, tenth);
            info!("{name}: {} {:.0}%", step.as_str(), tenth * 10);
        }
    };
    let ended = |outcome: &'static str, took: Duration| {
        if let Some(st) = status {
            st.metrics.conversion_ended(outcome, took);
        }
    };
    let converting = crate::transfer::Converting {
        converter: converter.as_ref(),
        out: out.to_path_buf(),
        permits: None,
        progress: &progress,
        ended: &ended,
    };
    crate::transfer::inspect_or_convert(
        source,
        sidecar,
        config,
        false,
        opts.force,
        Some(&converting),
    )
    .await
}

/// Removes a push's conversion (and its record) when the push ends.
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(out) = self.0.take() {
            let record = crate::transfer::conversion_record_of(&out);
            let _ = std::fs::remove_file(crate::image::convert::partial_of(&record));
            let _ = std::fs::remove_file(record);
            let _ = std::fs::remove_file(crate::image::convert::partial_of(&out));
            let _ = std::fs::remove_file(&out);
        }
    }
}

/// The URL of an object to ship from a bucket (`s3://...`, `oci://...`),
/// when that is what `path` is.
pub fn object_url(path: &std::path::Path) -> Option<&str> {
    path.to_str().filter(|s| s.contains("://"))
}

/// How a push ended, for its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every destination verified.
    Verified,
    /// At least one destination failed.
    Failed,
    /// Stopped by a signal.
    Interrupted,
}

/// Prints one line per destination (and per import) and says how the push
/// ended.
pub fn report(pushed: &Pushed, interrupted: bool) -> Ended {
    let mut failed = false;
    for o in &pushed.outcomes {
        match &o.result {
            Ok(m) => println!(
                "verified {} ({} bytes, crc32c {}) at {} [{}]",
                o.key, m.file_size_bytes, m.crc32c, o.destination, m.verify
            ),
            Err(TransferError::Cancelled) => eprintln!(
                "ferry: INTERRUPTED {}: {} ({}): the upload was aborted; nothing is left there",
                o.destination, o.key, o.url
            ),
            Err(e) => {
                failed = true;
                eprintln!(
                    "ferry: FAILED {}: {} ({}): {e}",
                    o.destination, o.key, o.url
                );
            }
        }
    }
    for (d, i) in &pushed.imports {
        let entry = i.manifest.as_ref().and_then(|m| m.import.as_ref());
        match (&i.result, entry) {
            (Ok(()), Some(e)) => println!(
                "imported {} at {d} as {} ({}, {} s)",
                e.display_name,
                e.image_id.as_deref().unwrap_or("-"),
                e.state,
                e.duration_secs.unwrap_or(0)
            ),
            (Ok(()), None) => println!("imported at {d}"),
            (Err(crate::import::ImportError::Cancelled), _) => {
                eprintln!("ferry: INTERRUPTED import at {d} (the line above says what it leaves)")
            }
            (Err(e), _) => {
                failed = true;
                eprintln!("ferry: FAILED import at {d}: {e}; {}", e.advice());
            }
        }
    }
    if interrupted {
        Ended::Interrupted
    } else if failed {
        Ended::Failed
    } else {
        Ended::Verified
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/status` for the push on
/// `addr` (`ferry push --metrics-addr`) until the process ends.
pub async fn serve_status(
    addr: std::net::SocketAddr,
) -> std::io::Result<(Arc<Status>, std::net::SocketAddr)> {
    let st = Status::new(
        crate::metrics::Metrics::new(),
        Arc::new(crate::progress::Board::default()),
    );
    let bound = crate::http::serve(addr, st.clone(), Shutdown::never()).await?;
    Ok((st, bound))
}
