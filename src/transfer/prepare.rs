//! What a job needs before a byte is sent, shared by `ferry push` and the
//! daemon: the image inspected (and refused if OCI would refuse it), the
//! destinations built, the part plan checked against them and the budget.

use std::sync::Arc;

use tracing::warn;

use crate::chunk::{self, Budget, PartPlan};
use crate::error::Class;
use crate::image::convert::{Conversion, ConvertError, Converter, Input, Step, convert};
use crate::source::Source;
use crate::store::Destination;

/// Why a job could not start (a push, or a daemon job). Nothing was uploaded.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// An object to ship from a bucket that could not be opened.
    #[error("{0}")]
    Open(crate::store::StoreError),
    #[error("{0}")]
    Destination(String),
    /// A conversion (`policy.convert`) that did not give a checked QCOW2.
    #[error(transparent)]
    Convert(#[from] crate::image::convert::ConvertError),
    /// A stop was requested before a byte was sent (during a conversion).
    #[error("stopped before a byte was sent: a stop was requested")]
    Stopped,
    /// `--part-size` (or the config's) that no store or the budget can take.
    #[error("{0}")]
    PartSize(String),
    #[error("{path}: {source}")]
    Plan {
        path: String,
        source: chunk::PlanError,
    },
    #[error(
        "part size {part} is larger than transfer.memory_limit {limit}: raise memory_limit or lower part_size"
    )]
    Budget { part: String, limit: String },
    #[error(transparent)]
    Inspect(#[from] crate::image::InspectError),
    /// Inspection refused the image: OCI would not import it.
    #[error("refused {}: {}", .0.file, .0.reasons.join("; "))]
    Refused(Box<crate::image::Report>),
    /// Inspection refused the image, among its reasons that no sidecar
    /// attests its licences (the policy requires one).
    #[error("refused {}: {}", .0.file, .0.reasons.join("; "))]
    Unattested(Box<crate::image::Report>),
    /// A destination imports every image it verifies, and this one cannot
    /// be imported as it is (no basis for its launch mode, or a format OCI
    /// does not import).
    #[error("refused {}: {}", .0.file, .0.reasons.join("; "))]
    NotImportable(Box<crate::image::Report>),
}

impl PrepareError {
    /// The file's own faults are [`Class::Refuse`]; a destination that cannot
    /// be set up and a part size no store or budget takes are
    /// [`Class::Fatal`] (the configuration must change).
    pub fn class(&self) -> Class {
        match self {
            PrepareError::Source(_)
            | PrepareError::Plan { .. }
            | PrepareError::Inspect(_)
            | PrepareError::Refused(_)
            | PrepareError::Unattested(_)
            | PrepareError::NotImportable(_) => Class::Refuse,
            PrepareError::Open(e) => e.class(),
            PrepareError::Convert(e) => e.class(),
            PrepareError::Stopped => Class::Retry,
            PrepareError::Destination(_)
            | PrepareError::PartSize(_)
            | PrepareError::Budget { .. } => Class::Fatal,
        }
    }

    /// What the operator should do, for the daemon's `X.error.json`.
    pub fn advice(&self) -> &'static str {
        match self {
            PrepareError::Source(crate::source::SourceError::BadName { .. }) => {
                "Rename the file to a UTF-8 name and put it back in the spool."
            }
            PrepareError::Source(crate::source::SourceError::Replaced { .. }) => {
                "Put the image back in the spool as a regular file, written in full, then renamed into place; nothing but ferry may write in the spool's .ferry/ directory."
            }
            PrepareError::Source(_) => {
                "Put the image back in the spool as a regular, readable, non-empty file."
            }
            PrepareError::Unattested(_) | PrepareError::NotImportable(_) => {
                "Write the sidecar as the reason says, then put the image (and its .meta.json) back in the spool."
            }
            PrepareError::Refused(_) => {
                "Fix or convert the image as the reasons say, then put it back in the spool."
            }
            PrepareError::Convert(e) => e.advice(),
            PrepareError::Stopped => "Run it again: nothing was sent.",
            PrepareError::Open(_) => {
                "Check the object's URL, that it exists, and the store settings of the [sources.NAME] table that holds it (endpoint, credentials)."
            }
            PrepareError::Inspect(_) => {
                "Put the image back in the spool as a regular, readable file with a valid sidecar."
            }
            PrepareError::Destination(_)
            | PrepareError::PartSize(_)
            | PrepareError::Plan { .. }
            | PrepareError::Budget { .. } => {
                "Change the configuration as the reason says, or split the image."
            }
        }
    }

    /// The inspection report of a refused image.
    pub fn into_report(self) -> Option<crate::image::Report> {
        match self {
            PrepareError::Refused(r)
            | PrepareError::Unattested(r)
            | PrepareError::NotImportable(r) => Some(*r),
            _ => None,
        }
    }
}

/// The inspection report of a file source, not yet judged.
fn file_report(
    source: &Source,
    sidecar: Option<&std::path::Path>,
    policy: &crate::image::Policy,
) -> Result<crate::image::Report, PrepareError> {
    let shown = source.path.display().to_string();
    let file = source.file().ok_or_else(|| {
        PrepareError::Inspect(crate::image::InspectError::Io {
            path: shown.clone(),
            source: std::io::Error::other("not a file"),
        })
    })?;
    Ok(crate::image::inspect_file(
        file,
        &source.name,
        &shown,
        sidecar,
        policy,
    )?)
}

/// How an image OCI cannot import is converted (`policy.convert`): by
/// which converter, into which file, at most how many at once, and who
/// hears of its progress and its end.
pub struct Converting<'a> {
    /// qemu-img, if it was found; looked for again when an image needs it
    /// (its absence is then the error).
    pub converter: Option<&'a Converter>,
    /// The QCOW2 to write; `OUT.conversion.json` beside it records what
    /// it was made from, so that a job resumed after a restart ships the
    /// same QCOW2 rather than convert again.
    pub out: std::path::PathBuf,
    pub permits: Option<&'a tokio::sync::Semaphore>,
    pub progress: &'a (dyn Fn(Step, f64) + Send + Sync),
    /// Each conversion run: its outcome (`converted`, or the error's) and
    /// how long it took.
    pub ended: &'a (dyn Fn(&'static str, std::time::Duration) + Send + Sync),
}

/// What `OUT.conversion.json` holds: the conversion, and the original as
/// it was converted.
#[derive(serde::Serialize, serde::Deserialize)]
struct ConversionRecord {
    conversion: Conversion,
    dev: u64,
    ino: u64,
    size_bytes: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    /// The QCOW2's own identity: (inode, size, modification and change
    /// times). One changed since is not shipped.
    qcow2: (u64, u64, i128, i128),
}

/// What identifies a file's bytes, for a conversion record.
fn identity_of(path: &std::path::Path) -> Option<(u64, u64, i128, i128)> {
    let id = crate::source::Identity::of(&std::fs::metadata(path).ok()?);
    Some((id.ino, id.size_bytes, id.mtime_ns, id.ctime_ns))
}

/// The record beside a conversion `out`.
pub fn conversion_record_of(out: &std::path::Path) -> std::path::PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".conversion.json");
    std::path::PathBuf::from(p)
}

/// Inspects a file source and, when it is refused as it is and
/// `converting` says how, converts it: the QCOW2 is opened, inspected
/// with the same sidecar and judged like any image. Answers the source
/// to ship (the file, its member, or the QCOW2) and its report.
pub async fn inspect_or_convert(
    source: Source,
    sidecar: Option<&std::path::Path>,
    config: &crate::config::Config,
    daemon: bool,
    force: bool,
    converting: Option<&Converting<'_>>,
) -> Result<(Source, crate::image::Report), PrepareError> {
    let policy = crate::image::Policy::from_config(&config.policy, daemon);
    let report = file_report(&source, sidecar, &policy)?;
    let input = converting.and_then(|_| Input::of(&report, &source.path, &policy));
    let (Some(c), Some(input)) = (converting, input) else {
        let report = judged(report, &policy, config, force)?;
        return Ok((shipped(source, &report), report));
    };
    let conversion = match reuse(&c.out, &source, &report.file)? {
        Some(done) => {
            tracing::info!(
                "{}: shipping its conversion {}, made and checked before",
                source.path.display(),
                c.out.display()
            );
            done
        }
        None => {
            (c.progress)(Step::Waiting, 0.0);
            let _permit = match c.permits {
                Some(p) => Some(p.acquire().await.map_err(|_| {
                    PrepareError::Destination("the conversion slots are closed".into())
                })?),
                None => None,
            };
            let started = std::time::Instant::now();
            tracing::info!(
                "{}: converting {} to QCOW2 in {}",
                source.path.display(),
                report.format_name,
                c.out.display()
            );
            // Anything left of an earlier attempt goes first: its space
            // counts for this one.
            let _ = std::fs::remove_file(conversion_record_of(&c.out));
            let _ = std::fs::remove_file(&c.out);
            let found;
            let converter = match c.converter {
                Some(k) => k,
                None => {
                    found = Converter::find()?;
                    &found
                }
            };
            let mut r = convert(converter, &input, &report, &c.out, c.progress).await;
            if let (Ok(_), Err(change)) = (&r, source.check()) {
                let _ = std::fs::remove_file(&c.out);
                r = Err(ConvertError::Changed {
                    file: report.file.clone(),
                    why: change.0,
                });
            }
            (c.ended)(
                r.as_ref().map_or_else(|e| e.outcome(), |_| "converted"),
                started.elapsed(),
            );
            let conversion = r?;
            tracing::info!(
                "{}: converted and compared identical in {:.1} s ({} of QCOW2)",
                source.path.display(),
                conversion.duration_secs,
                crate::image::human(conversion.converted_size_bytes)
            );
            keep_record(&c.out, &source, &conversion);
            conversion
        }
    };
    let converted = Source::open(&c.out)?;
    let size = converted.size_bytes;
    let converted = converted.window(&input.object_name, 0, size);
    let mut report2 = file_report(&converted, sidecar, &policy)?;
    crate::image::convert::keep_hints(&mut report2, &report);
    report2.conversion = Some(conversion);
    let report2 = judged(report2, &policy, config, force)?;
    Ok((converted, report2))
}

/// An earlier attempt's conversion of this very file, still in place and
/// untouched since; an error if the original changed since it was made
/// (as any source that changes between two attempts, it is not shipped).
fn reuse(
    out: &std::path::Path,
    source: &Source,
    file: &str,
) -> Result<Option<Conversion>, ConvertError> {
    let Some(r) = std::fs::read(conversion_record_of(out))
        .ok()
        .and_then(|b| serde_json::from_slice::<ConversionRecord>(&b).ok())
    else {
        return Ok(None);
    };
    let then = crate::source::Identity {
        dev: r.dev,
        ino: r.ino,
        size_bytes: r.size_bytes,
        mtime_ns: r.mtime_ns,
        ctime_ns: r.ctime_ns,
    };
    if let Some(why) = then.difference(&source.identity) {
        return Err(ConvertError::Changed {
            file: file.to_string(),
            why: format!("between two attempts (ferry stopped, or waiting to try again), {why}"),
        });
    }
    Ok(
        (identity_of(out) == Some(r.qcow2) && r.qcow2.1 == r.conversion.converted_size_bytes)
            .then_some(r.conversion),
    )
}

/// Writes `OUT.conversion.json` (temp, fsync, rename); a failure only
/// means a restart converts again.
fn keep_record(out: &std::path::Path, source: &Source, conversion: &Conversion) {
    let id = &source.identity;
    let Some(qcow2) = identity_of(out) else {
        return;
    };
    let record = ConversionRecord {
        conversion: conversion.clone(),
        dev: id.dev,
        ino: id.ino,
        size_bytes: id.size_bytes,
        mtime_ns: id.mtime_ns,
        ctime_ns: id.ctime_ns,
        qcow2,
    };
    let path = conversion_record_of(out);
    let tmp = crate::image::convert::partial_of(&path);
    let written = serde_json::to_vec_pretty(&record)
        .map_err(std::io::Error::other)
        .and_then(|body| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        });
    if let Err(e) = written {
        tracing::warn!(
            "cannot record the conversion in {} ({e}); a restart converts again",
            path.display()
        );
    }
}

/// Inspects an object source by ranged reads of the version the upload
/// reads, with its sidecar's text (`X.meta.json` beside it in the bucket, if
/// there is one); a refusal is an error unless the policy or `force` says
/// ship anyway.
pub async fn inspect_object(
    source: &Source,
    sidecar: Option<(String, String)>,
    config: &crate::config::Config,
    daemon: bool,
    force: bool,
) -> Result<crate::image::Report, PrepareError> {
    let policy = crate::image::Policy::from_config(&config.policy, daemon);
    let mut report = object_report(source, sidecar, &policy).await?;
    if let Some(m) = report.member.take() {
        // Its store's checksum is of the whole archive, not of the member.
        report.refuse(format!(
            "an archive in a bucket is not shipped as its member {}: copy the object to a host and ship it from there, or export the disk itself",
            m.name
        ));
    }
    judged(report, &policy, config, force)
}

/// The inspection report of an object source (`ferry inspect URL`).
pub async fn object_report(
    source: &Source,
    sidecar: Option<(String, String)>,
    policy: &crate::image::Policy,
) -> Result<crate::image::Report, PrepareError> {
    let shown = source.path.display().to_string();
    let io = |e: std::io::Error| {
        PrepareError::Inspect(crate::image::InspectError::Io {
            path: shown.clone(),
            source: e,
        })
    };
    let object = source
        .remote()
        .cloned()
        .ok_or_else(|| io(std::io::Error::other("not an object")))?;
    let side = match sidecar {
        Some((url, text)) => Some(crate::image::Sidecar::parse(&text).map_err(|message| {
            PrepareError::Inspect(crate::image::InspectError::Sidecar { path: url, message })
        })?),
        None => None,
    };
    let (name, shown2, p) = (source.name.clone(), shown.clone(), policy.clone());
    // The parsers read synchronously; each read of an object blocks on a GET.
    let report = tokio::task::spawn_blocking(move || {
        let at = ObjectAt::new(&object);
        crate::image::inspect_at(&at, &name, &shown2, side.as_ref(), &p)
    })
    .await
    .map_err(|e| io(std::io::Error::other(e)))??;
    Ok(report)
}

/// The bytes an inspection says to ship: an archive's member (an OVA's
/// disk, under its object name), or the whole source.
pub fn shipped(source: Source, report: &crate::image::Report) -> Source {
    match &report.member {
        Some(m) => source.window(&m.object_name, m.offset_bytes, m.size_bytes),
        None => source,
    }
}

/// How an image's sidecar travels beside it in a bucket (`X.meta.json`).
pub const SIDECAR_BESIDE: crate::store::Beside = crate::store::Beside {
    suffix: crate::image::sidecar::SUFFIX,
    max_bytes: crate::image::sidecar::MAX_BYTES,
};

/// A refused report is an error unless the policy or `force` says ship anyway.
fn judged(
    report: crate::image::Report,
    policy: &crate::image::Policy,
    config: &crate::config::Config,
    force: bool,
) -> Result<crate::image::Report, PrepareError> {
    if report.verdict == crate::image::Verdict::Refuse {
        if config.policy.refuse && !force {
            let unattested = policy.require_license_attestation && report.license.is_none();
            return Err(if unattested {
                PrepareError::Unattested(Box::new(report))
            } else {
                PrepareError::Refused(Box::new(report))
            });
        }
        warn!(
            "shipping {} although OCI would refuse it: {}",
            report.file,
            report.reasons.join("; ")
        );
    }
    Ok(report)
}

/// An object read by position for inspection: whole blocks by ranged GETs,
/// the last few kept, since the parsers read small pieces, often the same
/// ones (headers, tables, sector 0).
struct ObjectAt<'a> {
    object: &'a crate::source::Object,
    blocks: std::sync::Mutex<std::collections::VecDeque<(u64, Arc<Vec<u8>>)>>,
}

/// The size of a block read for inspection, and how many are kept.
const INSPECT_BLOCK_BYTES: u64 = 256 << 10;
const INSPECT_BLOCKS_KEPT: usize = 32;

impl<'a> ObjectAt<'a> {
    fn new(object: &'a crate::source::Object) -> ObjectAt<'a> {
        ObjectAt {
            object,
            blocks: std::sync::Mutex::default(),
        }
    }

    fn block(&self, n: u64) -> std::io::Result<Arc<Vec<u8>>> {
        let mut kept = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, b)) = kept.iter().find(|(k, _)| *k == n) {
            return Ok(b.clone());
        }
        let start = n * INSPECT_BLOCK_BYTES;
        let len = INSPECT_BLOCK_BYTES.min(self.object.size_bytes.saturating_sub(start));
        let mut buf = vec![0u8; len as usize];
        self.object
            .read_into(start, &mut buf)
            .map_err(std::io::Error::other)?;
        let b = Arc::new(buf);
        if kept.len() >= INSPECT_BLOCKS_KEPT {
            kept.pop_front();
        }
        kept.push_back((n, b.clone()));
        Ok(b)
    }
}

impl crate::image::ReadAt for ObjectAt<'_> {
    fn size(&self) -> u64 {
        self.object.size_bytes
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        crate::image::within(offset, buf.len(), self.object.size_bytes)?;
        let mut done = 0usize;
        // Bounded: one block per INSPECT_BLOCK_BYTES of buf.
        while done < buf.len() {
            let at = offset + done as u64;
            let block = self.block(at / INSPECT_BLOCK_BYTES)?;
            let from = (at % INSPECT_BLOCK_BYTES) as usize;
            let n = (block.len() - from).min(buf.len() - done);
            if n == 0 {
                return Err(std::io::Error::other("an empty block"));
            }
            buf[done..done + n].copy_from_slice(&block[from..from + n]);
            done += n;
        }
        Ok(())
    }
}

/// Refuses, before a byte is sent, an image that a destination among
/// `names` would import and that cannot be imported as it is: without a
/// basis for its launch mode, or of a format OCI does not import.
pub fn check_import(
    report: &crate::image::Report,
    config: &crate::config::Config,
    names: &[&str],
) -> Result<(), PrepareError> {
    let importing: Vec<&str> = names
        .iter()
        .filter(|n| {
            config
                .destinations
                .get(**n)
                .is_some_and(|d| d.import.is_some())
        })
        .copied()
        .collect();
    if importing.is_empty() {
        return Ok(());
    }
    let reason = if !crate::image::importable(&report.format) {
        format!(
            "OCI cannot import {} ({}), and {} import(s) every image it verifies",
            report.file,
            report.format_name,
            importing.join(", ")
        )
    } else if report.import_facts().launch_mode.is_none() {
        format!(
            "{} (destination(s) {} import)",
            crate::image::no_launch_mode(&report.file),
            importing.join(", ")
        )
    } else {
        return Ok(());
    };
    let mut r = report.clone();
    r.refuse(reason);
    Err(PrepareError::NotImportable(Box::new(r)))
}

/// The plan for a file against every destination's limits and the budget.
pub fn plan_for(
    source: &Source,
    destinations: &[Arc<Destination>],
    part_size_bytes: u64,
    budget: &Budget,
) -> Result<PartPlan, PrepareError> {
    let limits = destinations
        .first()
        .map(|d| d.limits())
        .unwrap_or(chunk::PartLimits::S3);
    let plan = PartPlan::new(source.size_bytes, part_size_bytes, limits).map_err(|source_err| {
        PrepareError::Plan {
            path: source.path.display().to_string(),
            source: source_err,
        }
    })?;
    if plan.part_bytes > budget.limit_bytes() {
        return Err(PrepareError::Budget {
            part: bytesize::ByteSize(plan.part_bytes)
                .display()
                .iec()
                .to_string(),
            limit: bytesize::ByteSize(budget.limit_bytes())
                .display()
                .iec()
                .to_string(),
        });
    }
    Ok(plan)
}

/// Builds the destinations for a push or a job.
pub fn destinations(
    config: &crate::config::Config,
    to: &[String],
    part_bytes_hint: u64,
) -> Result<Vec<Arc<Destination>>, PrepareError> {
    let chosen =
        crate::store::resolve(&config.destinations, to).map_err(PrepareError::Destination)?;
    chosen
        .iter()
        .map(|(name, cfg)| {
            Destination::new(name, cfg, &config.transfer, part_bytes_hint)
                .map(Arc::new)
                .map_err(|e| PrepareError::Destination(format!("{name}: {e}")))
        })
        .collect()
}
