//! The part plan, the memory budget, and the readers that turn a file into
//! checksummed parts.
//!
//! Promises:
//! - the plan covers the file exactly, with at most `max_parts` parts, each within
//!   the store's size limits (all but the last have the same size) ([`plan`]);
//! - a [`Part`] is built only here, by a reader, with the CRC32C of its bytes computed
//!   while they are hot in cache; the whole-file CRC32C is the combination of the
//!   part CRCs ([`combine`]), never a second pass over the data;
//! - a part's bytes are a [`Bytes`](bytes::Bytes) that every destination shares
//!   without a copy, and they hold a share of the [`Budget`] until the last
//!   destination lets go, so the bytes of all parts in memory never exceed the
//!   budget ([`budget`]);
//! - a part is handed out only while its source is unchanged (`Source::check`
//!   after every read) and only if its CRC32C equals that of the part's first
//!   read in this job ([`FirstReads`]); otherwise the read fails as
//!   [`ReadError::Changed`], never as a part with other bytes ([`part`], [`read`]).

pub mod budget;
pub mod part;
pub mod plan;
pub mod read;

pub use budget::Budget;
pub use part::{FirstReads, Part, ReadError};
pub use plan::{PartLimits, PartPlan, PlanError, combine};
pub use read::{
    Cache, Lease, MmapReader, PreadReader, Reader, buffer, lease, read, read_leased, reader,
    reread, try_lease,
};

const MIB: u64 = 1024 * 1024;
