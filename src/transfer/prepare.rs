//! What a job needs before a byte is sent, shared by `ferry push` and the
//! daemon: the image inspected (and refused if OCI would refuse it), the
//! destinations built, the part plan checked against them and the budget.

use std::sync::Arc;

use tracing::warn;

use crate::chunk::{self, Budget, PartPlan};
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
    #[error("refused {}: {}", .0.file, .0.reasons.join("; "))]
    Refused(Box<crate::image::Report>),
}

/// Inspects a source with its sidecar (`X.meta.json` beside it, if present);
/// a refusal is an error unless the policy or `force` says ship anyway.
pub fn inspect_source(
    path: &std::path::Path,
    sidecar: Option<&std::path::Path>,
    config: &crate::config::Config,
    daemon: bool,
    force: bool,
) -> Result<crate::image::Report, PrepareError> {
    let policy = crate::image::Policy::from_config(&config.policy, daemon);
    let report = crate::image::inspect(path, sidecar, &policy)?;
    if report.verdict == crate::image::Verdict::Refuse {
        if config.policy.refuse && !force {
            return Err(PrepareError::Refused(Box::new(report)));
        }
        warn!(
            "shipping {} although OCI would refuse it: {}",
            report.file,
            report.reasons.join("; ")
        );
    }
    Ok(report)
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
