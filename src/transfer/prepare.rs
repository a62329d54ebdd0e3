//! What a job needs before a byte is sent, shared by `ferry push` and the
//! daemon: the image inspected (and refused if OCI would refuse it), the
//! destinations built, the part plan checked against them and the budget.

use std::sync::Arc;

use tracing::warn;

use crate::chunk::{self, Budget, PartPlan};
use crate::error::Class;
use crate::source::Source;
use crate::store::Destination;

/// Why a job could not start (a push, or a daemon job). Nothing was uploaded.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("{0}")]
    Destination(String),
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

/// Inspects an open source, through the descriptor the upload reads, with
/// its sidecar (`X.meta.json` beside it, if present); a refusal is an error
/// unless the policy or `force` says ship anyway.
pub fn inspect_source(
    source: &Source,
    sidecar: Option<&std::path::Path>,
    config: &crate::config::Config,
    daemon: bool,
    force: bool,
) -> Result<crate::image::Report, PrepareError> {
    let policy = crate::image::Policy::from_config(&config.policy, daemon);
    let shown = source.path.display().to_string();
    let report = crate::image::inspect_file(&source.file, &source.name, &shown, sidecar, &policy)?;
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
