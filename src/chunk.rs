//! The part plan and the readers that turn a file into checksummed parts.
//!
//! Promises:
//! - the plan covers the file exactly, with at most `max_parts` parts, each within
//!   the store's size limits (all but the last have the same size);
//! - a [`Part`] is built only here, by a reader, with the CRC32C of its bytes computed
//!   while they are hot in cache; the whole-file CRC32C is the combination of the
//!   part CRCs ([`combine`]), never a second pass over the data;
//! - a part's bytes are a [`Bytes`] that every destination shares without a copy,
//!   and they hold a share of the [`Budget`] until the last destination lets go, so
//!   the bytes of all parts in memory never exceed the budget;
//! - a part is handed out only while its source is unchanged (`Source::check`
//!   after every read) and only if its CRC32C equals that of the part's first
//!   read in this job ([`FirstReads`]); otherwise the read fails as
//!   [`ReadError::Changed`], never as a part with other bytes.
//!
//! Design choice: the budget is a semaphore counted in 4 KiB pages whose permit
//! lives *inside* the part's `Bytes` owner (`Bytes::from_owner`). Memory is returned
//! exactly when the last clone drops, wherever that happens, with no bookkeeping
//! by the destinations.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::source::{Change, Source};

const MIB: u64 = 1024 * 1024;
const PAGE: u64 = 4096;

/// Limits of a store's multipart upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLimits {
    pub min_part_bytes: u64,
    pub max_part_bytes: u64,
    pub max_parts: u64,
}

impl PartLimits {
    /// S3 and OCI Object Storage: 5 MiB .. 5 GiB, 10,000 parts.
    pub const S3: PartLimits = PartLimits {
        min_part_bytes: 5 * MIB,
        max_part_bytes: 5 * 1024 * MIB,
        max_parts: 10_000,
    };

    /// The largest file these limits can carry.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_part_bytes.saturating_mul(self.max_parts)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "file of {file_bytes} bytes is larger than the {max_bytes} bytes a multipart upload can hold (10,000 parts of at most 5 GiB)"
    )]
    TooLarge { file_bytes: u64, max_bytes: u64 },
}

/// How a file is cut into parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPlan {
    pub file_bytes: u64,
    pub part_bytes: u64,
    pub count: u32,
}

impl PartPlan {
    /// The requested part size, raised to fit `max_parts`, kept within the limits and
    /// rounded up to a whole MiB (so mmap offsets stay page aligned).
    pub fn new(
        file_bytes: u64,
        requested_part_bytes: u64,
        limits: PartLimits,
    ) -> Result<PartPlan, PlanError> {
        if file_bytes > limits.max_file_bytes() {
            return Err(PlanError::TooLarge {
                file_bytes,
                max_bytes: limits.max_file_bytes(),
            });
        }
        let mut part = requested_part_bytes.clamp(limits.min_part_bytes, limits.max_part_bytes);
        let needed = file_bytes.div_ceil(limits.max_parts);
        if part < needed {
            part = needed;
        }
        part = part.div_ceil(MIB) * MIB;
        if part > limits.max_part_bytes {
            part = limits.max_part_bytes;
        }
        let count = file_bytes.div_ceil(part).max(1);
        Ok(PartPlan {
            file_bytes,
            part_bytes: part,
            count: u32::try_from(count).expect("count <= max_parts fits u32"),
        })
    }

    pub fn offset(&self, index: u32) -> u64 {
        u64::from(index) * self.part_bytes
    }

    pub fn len(&self, index: u32) -> u64 {
        let start = self.offset(index);
        self.part_bytes.min(self.file_bytes.saturating_sub(start))
    }

    pub fn is_empty(&self) -> bool {
        self.file_bytes == 0
    }
}

/// Combines per-part CRCs, in order, into the CRC32C of the whole.
pub fn combine(parts: impl IntoIterator<Item = (u32, u64)>) -> u32 {
    let mut crc = 0u32;
    for (part_crc, len) in parts {
        crc = crc32c::crc32c_combine(crc, part_crc, len as usize);
    }
    crc
}

/// A piece of the file: its place, its bytes and their CRC32C.
#[derive(Clone)]
pub struct Part {
    index: u32,
    offset: u64,
    bytes: Bytes,
    crc32c: u32,
    /// For parts whose bytes are the page cache (mmap), the budget is held by the
    /// part, not by the bytes: a store that keeps the bytes (memory://) keeps a
    /// mapping of the file, not a buffer of ferry's.
    budget: Option<Arc<OwnedSemaphorePermit>>,
}

impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Part")
            .field("index", &self.index)
            .field("offset", &self.offset)
            .field("len", &self.bytes.len())
            .field("crc32c", &format_args!("{:08x}", self.crc32c))
            .finish()
    }
}

impl Part {
    pub fn index(&self) -> u32 {
        self.index
    }
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    pub fn crc32c(&self) -> u32 {
        self.crc32c
    }
    /// True when a store may keep `bytes()` without pinning ferry's memory budget.
    pub fn bytes_are_shareable(&self) -> bool {
        self.budget.is_some()
    }
}

/// The memory all part buffers may use, shared by every job and destination.
/// Clones share one budget; [`Budget::resize`] changes it for all of them.
#[derive(Clone, Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    limit_pages: Arc<AtomicU64>,
}

impl Budget {
    pub fn new(limit_bytes: u64) -> Budget {
        let pages = (limit_bytes / PAGE).max(1);
        Budget {
            sem: Arc::new(Semaphore::new(pages as usize)),
            limit_pages: Arc::new(AtomicU64::new(pages)),
        }
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_pages.load(Ordering::Acquire) * PAGE
    }

    /// Bytes currently held by parts (and, just after the budget shrank, the part
    /// of the old budget not yet handed back).
    pub fn in_use_bytes(&self) -> u64 {
        self.limit_bytes()
            .saturating_sub(self.sem.available_permits() as u64 * PAGE)
    }

    /// Changes the limit for every job sharing this budget (a configuration
    /// reload). Growing frees the difference at once; shrinking takes back what
    /// is free now and the rest as parts in flight are released, so the memory
    /// in use never exceeds the old limit and settles within the new one. Must
    /// be called inside the runtime when it shrinks.
    pub fn resize(&self, limit_bytes: u64) {
        let new = (limit_bytes / PAGE).max(1);
        let old = self.limit_pages.swap(new, Ordering::AcqRel);
        if new > old {
            self.sem.add_permits((new - old) as usize);
        } else if new < old {
            let owed = (old - new) as usize;
            let taken = self.sem.forget_permits(owed);
            if taken < owed {
                let sem = self.sem.clone();
                let rest = u32::try_from(owed - taken).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(rest).await {
                        p.forget();
                    }
                });
            }
        }
    }

    fn pages_for(&self, bytes: u64) -> u32 {
        let limit = self.limit_pages.load(Ordering::Acquire);
        u32::try_from(bytes.div_ceil(PAGE).clamp(1, limit)).unwrap_or(u32::MAX)
    }

    /// Takes `bytes` if they fit now.
    pub fn try_acquire(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        self.sem
            .clone()
            .try_acquire_many_owned(self.pages_for(bytes))
            .ok()
    }

    /// Waits until `bytes` fit. Callers never ask for more than the whole budget
    /// (the plan is checked against it before a job starts; a part larger than a
    /// budget shrunk since then takes the whole budget).
    pub async fn acquire(&self, bytes: u64) -> OwnedSemaphorePermit {
        self.sem
            .clone()
            .acquire_many_owned(self.pages_for(bytes))
            .await
            .expect("the budget semaphore is never closed")
    }
}

/// Why a part could not be handed out.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read (and did not change).
    #[error("reading part {index} at offset {offset}: {source}")]
    Io {
        index: u32,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The source changed since it was opened: nothing read from it now may
    /// be shipped.
    #[error("{0}")]
    Changed(#[from] Change),
}

/// The CRC32C of each part's first read in a job, shared by every reader of
/// it (the fan-out, detached destinations, restarted uploads) and seeded from
/// the journal when a job resumes. A part read again must give the same
/// CRC32C: a source that changed in a way its change time does not show still
/// cannot mix old and new bytes.
#[derive(Debug)]
pub struct FirstReads {
    /// Per part: 0 when not yet read, else `1 << 32 | crc32c`.
    crcs: Vec<AtomicU64>,
}

impl FirstReads {
    pub fn new(count: u32) -> FirstReads {
        FirstReads {
            crcs: (0..count).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Records `crc` as the CRC32C of part `index`; `Err(first)` when the part
    /// was read before with another CRC32C. An index outside the plan is
    /// ignored (the plan bounds every read).
    pub fn record(&self, index: u32, crc: u32) -> Result<(), u32> {
        let Some(slot) = self.crcs.get(index as usize) else {
            return Ok(());
        };
        let new = 1u64 << 32 | u64::from(crc);
        match slot.compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(()),
            Err(first) if first == new => Ok(()),
            Err(first) => Err(first as u32),
        }
    }
}

/// What every reader does with what it read: a part is handed out only while
/// the source is unchanged and only if it matches its first read.
fn checked(
    source: &Source,
    first: &FirstReads,
    read: Result<Part, std::io::Error>,
    index: u32,
    offset: u64,
) -> Result<Part, ReadError> {
    let part = match read {
        Ok(p) => p,
        Err(e) => {
            // A short read of a file that was cut is the file's doing.
            source.check()?;
            return Err(ReadError::Io {
                index,
                offset,
                source: e,
            });
        }
    };
    if let Err(was) = first.record(index, part.crc32c) {
        return Err(ReadError::Changed(source.note_change(format!(
            "part {index} (offset {offset}) read again gave CRC32C {:08x}, its first read {was:08x}",
            part.crc32c
        ))));
    }
    source.check()?;
    Ok(part)
}

/// A share of the budget for one part, possibly with a buffer to reuse.
pub struct Lease {
    permit: OwnedSemaphorePermit,
    buf: Option<memmap2::MmapMut>,
}

/// A zeroed anonymous mapping for a part: returned to the kernel at once when
/// dropped, whatever the allocator would do. (`MADV_HUGEPAGE` was measured here
/// and lost: direct compaction on fault cost more than the saved page faults.)
///
/// Pre-faulted (`MAP_POPULATE`): the kernel fills the whole mapping in one go,
/// instead of one page fault per 4 KiB as the bytes are first written.
pub fn buffer(len: usize) -> std::io::Result<memmap2::MmapMut> {
    memmap2::MmapOptions::new()
        .len(len.max(1))
        .populate()
        .map_anon()
}

/// Turns part indexes into [`Part`]s. `read` blocks: call it from a blocking thread.
pub trait Reader: Send + Sync {
    /// A pooled buffer with the budget it already holds, if one is idle.
    fn pooled(&self) -> Option<Lease> {
        None
    }
    /// Notified when a buffer returns to the pool.
    fn returned(&self) -> Option<&Notify> {
        None
    }
    fn read(&self, index: u32, lease: Lease) -> Result<Part, ReadError>;
    fn plan(&self) -> &PartPlan;
}

/// Waits for the memory of part `index`: an idle pooled buffer, or new budget.
///
/// Idle pooled buffers hold budget, so waiting only on the budget could wait
/// forever while every permit sits in the pool: wait on both.
pub async fn lease(reader: &dyn Reader, budget: &Budget, index: u32) -> Lease {
    let bytes = reader.plan().part_bytes.max(reader.plan().len(index));
    let Some(returned) = reader.returned() else {
        return Lease {
            permit: budget.acquire(bytes).await,
            buf: None,
        };
    };
    loop {
        let mut notified = std::pin::pin!(returned.notified());
        notified.as_mut().enable();
        if let Some(l) = reader.pooled() {
            return l;
        }
        tokio::select! {
            permit = budget.acquire(bytes) => return Lease { permit, buf: None },
            _ = notified => continue,
        }
    }
}

/// Reads part `index` on a blocking thread.
pub async fn read(reader: Arc<dyn Reader>, budget: &Budget, index: u32) -> Result<Part, ReadError> {
    let lease = lease(&*reader, budget, index).await;
    read_leased(reader, index, lease).await
}

/// The memory of part `index` if it is free right now.
pub fn try_lease(reader: &dyn Reader, budget: &Budget, index: u32) -> Option<Lease> {
    if let Some(l) = reader.pooled() {
        return Some(l);
    }
    let bytes = reader.plan().part_bytes.max(reader.plan().len(index));
    budget
        .try_acquire(bytes)
        .map(|permit| Lease { permit, buf: None })
}

/// Reads part `index` into memory already leased, on a blocking thread.
pub async fn read_leased(
    reader: Arc<dyn Reader>,
    index: u32,
    lease: Lease,
) -> Result<Part, ReadError> {
    let offset = reader.plan().offset(index);
    tokio::task::spawn_blocking(move || reader.read(index, lease))
        .await
        .unwrap_or_else(|e| {
            Err(ReadError::Io {
                index,
                offset,
                source: std::io::Error::other(e),
            })
        })
}

/// Builds the configured reader over an open source; `first` holds (or will
/// hold) the CRC32C of every part's first read in this job.
pub fn reader(
    kind: crate::config::ReaderKind,
    source: Source,
    plan: PartPlan,
    first: Arc<FirstReads>,
) -> Arc<dyn Reader> {
    match kind {
        crate::config::ReaderKind::Pread => Arc::new(PreadReader::new(source, plan, first)),
        crate::config::ReaderKind::Mmap => Arc::new(MmapReader {
            source,
            plan,
            first,
        }),
    }
}

#[derive(Default)]
struct PoolInner {
    idle: Mutex<Vec<(memmap2::MmapMut, OwnedSemaphorePermit)>>,
    returned: Notify,
}

type Pool = Arc<PoolInner>;

/// `pread` into buffers that are reused once every destination is done with them.
pub struct PreadReader {
    source: Source,
    plan: PartPlan,
    first: Arc<FirstReads>,
    pool: Pool,
}

/// Idle buffers kept for reuse, each still holding its share of the budget (so
/// the budget bounds idle and busy buffers together). Reuse saves the page faults,
/// zeroing and huge-page compaction of fresh memory; the pool is dropped, and its
/// budget returned, with the reader at the end of the job.
const POOL_IDLE_MAX: usize = 16;

impl PreadReader {
    pub fn new(source: Source, plan: PartPlan, first: Arc<FirstReads>) -> PreadReader {
        PreadReader {
            source,
            plan,
            first,
            pool: Arc::default(),
        }
    }
}

struct PooledBuf {
    buf: Option<memmap2::MmapMut>,
    len: usize,
    pool: Pool,
    permit: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().map_or(&[], |b| &b[..self.len])
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let (Some(buf), Some(permit), Ok(mut idle)) =
            (self.buf.take(), self.permit.take(), self.pool.idle.lock())
            && idle.len() < POOL_IDLE_MAX
        {
            idle.push((buf, permit));
        }
        self.pool.returned.notify_waiters();
    }
}

impl Reader for PreadReader {
    fn plan(&self) -> &PartPlan {
        &self.plan
    }

    fn returned(&self) -> Option<&Notify> {
        Some(&self.pool.returned)
    }

    fn pooled(&self) -> Option<Lease> {
        let (buf, permit) = self.pool.idle.lock().ok()?.pop()?;
        Some(Lease {
            permit,
            buf: Some(buf),
        })
    }

    fn read(&self, index: u32, lease: Lease) -> Result<Part, ReadError> {
        let offset = self.plan.offset(index);
        let read = pread_part(&self.source, &self.plan, &self.pool, index, lease);
        checked(&self.source, &self.first, read, index, offset)
    }
}

/// Reads part `index` into a pooled buffer (or a new one), CRC32C while hot.
fn pread_part(
    source: &Source,
    plan: &PartPlan,
    pool: &Pool,
    index: u32,
    lease: Lease,
) -> std::io::Result<Part> {
    let offset = plan.offset(index);
    let len = plan.len(index) as usize;
    let mut buf = match lease.buf {
        Some(b) if b.len() >= len => b,
        _ => buffer(plan.part_bytes.max(len as u64) as usize)?,
    };
    source.file.read_exact_at(&mut buf[..len], offset)?;
    let crc32c = crc32c::crc32c(&buf[..len]);
    let owner = PooledBuf {
        buf: Some(buf),
        len,
        pool: pool.clone(),
        permit: Some(lease.permit),
    };
    Ok(Part {
        index,
        offset,
        bytes: Bytes::from_owner(owner),
        crc32c,
        budget: None,
    })
}

/// One read-only, pre-faulted mapping per part, unmapped when the part drops.
/// Mappings are guarded (`mapping`): a truncation under them cannot kill the
/// process. Where no guard can be had the part is read with pread.
pub struct MmapReader {
    source: Source,
    plan: PartPlan,
    first: Arc<FirstReads>,
}

impl Reader for MmapReader {
    fn plan(&self) -> &PartPlan {
        &self.plan
    }

    fn read(&self, index: u32, lease: Lease) -> Result<Part, ReadError> {
        let offset = self.plan.offset(index);
        let len = self.plan.len(index) as usize;
        // Never map past the end of a file that was cut before this read.
        self.source.check()?;
        let read = match crate::mapping::Mapped::new(&self.source.file, offset, len) {
            Ok(Some(map)) => {
                let faults = crate::mapping::zeroed_faults();
                let crc32c = crc32c::crc32c(map.as_ref());
                if crate::mapping::zeroed_faults() != faults {
                    // A page read as zeros: the CRC is not the file's. A file
                    // cut short says so at the check below; anything else
                    // (an I/O error) is an error of this read.
                    self.source.check()?;
                    return Err(ReadError::Io {
                        index,
                        offset,
                        source: std::io::Error::other(
                            "a page of the mapping could not be read (SIGBUS)",
                        ),
                    });
                }
                Ok(Part {
                    index,
                    offset,
                    bytes: Bytes::from_owner(map),
                    crc32c,
                    budget: Some(Arc::new(lease.permit)),
                })
            }
            Ok(None) => pread_part(&self.source, &self.plan, &Pool::default(), index, lease),
            Err(e) => Err(e),
        };
        checked(&self.source, &self.first, read, index, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    const TIB: u64 = 1024 * 1024 * MIB;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn plan_fits_the_limits(file in 0u64..=50 * TIB, requested in 1u64..=8 * 1024 * MIB) {
            let limits = PartLimits::S3;
            match PartPlan::new(file, requested, limits) {
                Err(PlanError::TooLarge { .. }) => prop_assert!(file > limits.max_file_bytes()),
                Ok(plan) => {
                    prop_assert!(file <= limits.max_file_bytes());
                    prop_assert!(u64::from(plan.count) <= limits.max_parts);
                    prop_assert!(plan.part_bytes >= limits.min_part_bytes);
                    prop_assert!(plan.part_bytes <= limits.max_part_bytes);
                    // covers the file exactly
                    prop_assert!(u64::from(plan.count) * plan.part_bytes >= file);
                    if file > 0 {
                        prop_assert!(u64::from(plan.count - 1) * plan.part_bytes < file);
                    }
                    let last = plan.count - 1;
                    prop_assert_eq!(plan.offset(last) + plan.len(last), file);
                    // never below what was asked, unless the limits say so
                    prop_assert!(plan.part_bytes >= requested.min(limits.max_part_bytes));
                }
            }
        }

        #[test]
        fn combined_crc_equals_whole_crc(data in proptest::collection::vec(any::<u8>(), 0..4096), cuts in proptest::collection::vec(0usize..4096, 0..8)) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort();
            let pieces = cuts.windows(2).map(|w| {
                let s = &data[w[0]..w[1]];
                (crc32c::crc32c(s), s.len() as u64)
            });
            prop_assert_eq!(combine(pieces), crc32c::crc32c(&data));
        }
    }

    #[test]
    fn the_config_checks_part_sizes_against_the_same_limits() {
        assert_eq!(crate::config::MIN_PART_BYTES, PartLimits::S3.min_part_bytes);
        assert_eq!(crate::config::MAX_PART_BYTES, PartLimits::S3.max_part_bytes);
    }

    #[test]
    fn small_part_size_is_raised_to_the_minimum() {
        let p = PartPlan::new(100 * MIB, 1, PartLimits::S3).unwrap();
        assert_eq!(p.part_bytes, 5 * MIB);
        assert_eq!(p.count, 20);
    }

    #[tokio::test]
    async fn both_readers_give_the_same_parts_and_release_the_budget() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..(13 * MIB as usize))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let source = Source::open(f.path()).unwrap();
        let plan = PartPlan::new(data.len() as u64, 5 * MIB, PartLimits::S3).unwrap();
        assert_eq!(plan.count, 3);
        let budget = Budget::new(64 * MIB);
        // One table for both: the second reader's parts match the first's.
        let first = Arc::new(FirstReads::new(plan.count));
        for kind in [
            crate::config::ReaderKind::Pread,
            crate::config::ReaderKind::Mmap,
        ] {
            let r = reader(kind, source.clone(), plan, first.clone());
            let mut crcs = Vec::new();
            for i in 0..plan.count {
                let part = read(r.clone(), &budget, i).await.unwrap();
                let start = part.offset() as usize;
                assert_eq!(&part.bytes()[..], &data[start..start + part.len() as usize]);
                assert!(budget.in_use_bytes() >= part.len());
                crcs.push((part.crc32c(), part.len()));
            }
            assert_eq!(combine(crcs), crc32c::crc32c(&data));
            drop(r);
            assert_eq!(budget.in_use_bytes(), 0, "{kind:?} leaked budget");
        }
    }

    #[tokio::test]
    async fn a_part_read_again_must_match_its_first_read() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![9u8; 12 * MIB as usize]).unwrap();
        let source = Source::open(f.path()).unwrap();
        let plan = PartPlan::new(12 * MIB, 5 * MIB, PartLimits::S3).unwrap();
        let first = Arc::new(FirstReads::new(plan.count));
        // As a resumed job's journal would say: part 1 was read before, and
        // gave another CRC32C than the file gives now.
        let now = crc32c::crc32c(&vec![9u8; 5 * MIB as usize]);
        first.record(1, now ^ 1).unwrap();
        let budget = Budget::new(64 * MIB);
        for kind in [
            crate::config::ReaderKind::Pread,
            crate::config::ReaderKind::Mmap,
        ] {
            let r = reader(kind, source.clone(), plan, first.clone());
            let e = read(r, &budget, 1).await.unwrap_err();
            assert!(matches!(e, ReadError::Changed(_)), "{kind:?}: {e}");
            assert!(e.to_string().contains("read again"), "{e}");
        }
        // The source stays changed for every later check, and every part fails.
        assert!(source.check().is_err());
        let r = reader(crate::config::ReaderKind::Pread, source, plan, first);
        assert!(matches!(
            read(r, &budget, 0).await,
            Err(ReadError::Changed(_))
        ));
        assert_eq!(budget.in_use_bytes(), 0, "a refused part kept its memory");
    }

    #[test]
    fn first_reads_keep_the_first_crc() {
        let f = FirstReads::new(2);
        assert_eq!(f.record(0, 7), Ok(()));
        assert_eq!(f.record(0, 7), Ok(()));
        assert_eq!(f.record(0, 8), Err(7));
        assert_eq!(f.record(1, 0), Ok(()), "a CRC32C of 0 is a CRC32C");
        assert_eq!(f.record(1, 1), Err(0));
        assert_eq!(f.record(5, 1), Ok(()), "outside the plan: ignored");
    }

    #[tokio::test]
    async fn a_resized_budget_binds_parts_already_in_flight() {
        let budget = Budget::new(64 * MIB);
        let a = budget.acquire(32 * MIB).await;
        let b = budget.acquire(24 * MIB).await;
        // Shrink below what is in use: nothing more fits until enough is released.
        budget.resize(32 * MIB);
        assert_eq!(budget.limit_bytes(), 32 * MIB);
        assert!(
            budget.try_acquire(MIB).is_none(),
            "fits beyond the new limit"
        );
        drop(b);
        tokio::task::yield_now().await;
        assert!(
            budget.try_acquire(MIB).is_none(),
            "56 MiB held under a 32 MiB limit"
        );
        drop(a);
        // The debt is collected by a task; wait for it (bounded).
        for _ in 0..100 {
            if budget.in_use_bytes() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.in_use_bytes(), 0);
        let all = budget
            .try_acquire(32 * MIB)
            .expect("the whole new limit fits");
        assert!(
            budget.try_acquire(MIB).is_none(),
            "more than 32 MiB handed out"
        );
        drop(all);
        // Growing frees the difference at once.
        budget.resize(96 * MIB);
        let big = budget.try_acquire(96 * MIB).expect("the grown limit fits");
        assert_eq!(budget.in_use_bytes(), 96 * MIB);
        drop(big);
        // A clone is the same budget.
        let other = budget.clone();
        other.resize(16 * MIB);
        assert_eq!(budget.limit_bytes(), 16 * MIB);
        assert!(
            budget.try_acquire(17 * MIB).is_some(),
            "a request is clamped to the limit"
        );
    }
}
