//! The readers: part indexes in, [`Part`]s out, each within the memory budget.
//! One guarded read-only mapping per part (`reader = "mmap"`, the default, see
//! `mapping`; a part the file system will not map is read with pread), or
//! `pread` into pooled buffers; an object source by ranged GETs into the same
//! pooled buffers, several at once.
//!
//! A file's pages leave the page cache once their part is read (pread: the
//! bytes are in ferry's buffer; mmap: once the part is dropped and
//! unmapped), unless told to keep them ([`Cache::Keep`],
//! `daemon.keep_cache`): an image of hundreds of GiB read once would
//! otherwise push the host's working set, its VMs' pages, out of memory.
//! Once a destination falls behind and is to read its own parts
//! (`transfer`), the pages are kept for it ([`Reader::keep_pages`]), and the
//! whole image is released when the job ends ([`Reader::release_all`]).

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::chunk::part::checked;
use crate::chunk::{Budget, FirstReads, Part, PartPlan, ReadError};
use crate::source::Source;

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
    /// Parts the fan-out may read at once (a file: one, read ahead by the
    /// kernel; an object: several ranged GETs).
    fn parallel_reads(&self) -> usize {
        1
    }
    /// Reads part `index` afresh, without comparing it with its first read:
    /// for an object whose parts must be read again because what was read
    /// does not match the store's checksum. `None` where that cannot be.
    fn reread(&self, _index: u32, _lease: Lease) -> Option<Result<Part, ReadError>> {
        None
    }
    /// Part `index` as the fan-out hands it on, in order (an object source
    /// whose store's checksum is an MD5 hashes it).
    fn delivered(&self, _part: &Part) {}
    /// From now on, leave the pages of the parts read in the page cache: a
    /// destination that fell behind will read them itself.
    fn keep_pages(&self) {}
    /// The job is over: write back and drop every page of the source, those
    /// kept for a destination that fell behind included (unless the reader
    /// was built to keep them). Blocks: call it from a blocking thread.
    fn release_all(&self) {}
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

/// Reads part `index` afresh on a blocking thread ([`Reader::reread`]);
/// `None` when the reader cannot.
pub async fn reread(
    reader: Arc<dyn Reader>,
    budget: &Budget,
    index: u32,
) -> Option<Result<Part, ReadError>> {
    let lease = lease(&*reader, budget, index).await;
    let offset = reader.plan().offset(index);
    tokio::task::spawn_blocking(move || reader.reread(index, lease))
        .await
        .unwrap_or_else(|e| {
            Some(Err(ReadError::Io {
                index,
                offset,
                source: std::io::Error::other(e),
            }))
        })
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

/// What becomes of a file's pages in the page cache once their part is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// Left to the kernel.
    Keep,
    /// Dropped (`posix_fadvise(DONTNEED)`).
    Release,
}

/// What a reader does with a file's pages: shared by the reader and the
/// parts it mapped.
#[derive(Debug)]
struct Pages {
    cache: Cache,
    /// A destination reads its own parts later: leave the pages for it.
    kept: std::sync::atomic::AtomicBool,
}

impl Pages {
    fn new(cache: Cache) -> Arc<Pages> {
        Arc::new(Pages {
            cache,
            kept: false.into(),
        })
    }

    /// From now on, leave the pages of the parts read.
    fn keep(&self) {
        self.kept.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether a part's pages go once it is read.
    fn releasing(&self) -> bool {
        self.cache == Cache::Release && !self.kept.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Writes back the dirty pages of `len` bytes of `file` at `offset`, and
/// waits: dirty pages cannot be dropped, and an image renamed into the spool
/// a moment ago is still being written back (seen: a fresh qemu-img output
/// stayed 98% cached after its push). The kernel would write them within
/// seconds anyway; on a file already on disk this finds nothing to do.
/// Blocks: call it from a blocking thread.
fn write_back(file: &std::fs::File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    if len == 0 {
        return; // 0 would mean "to the end of the file".
    }
    // SAFETY: a plain system call on a descriptor this process holds open.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
    }
}

/// Drops the clean, unmapped pages of `len` bytes of `file` at `offset` from
/// the page cache (`posix_fadvise(DONTNEED)`). Advice only: a failure
/// changes nothing ferry relies on.
fn forget(file: &std::fs::File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    if len == 0 {
        return;
    }
    // SAFETY: a plain system call on a descriptor this process holds open.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED);
    }
}

/// Writes back and drops the pages of a whole source: at a job's end.
fn release_source(source: &Source, pages: &Pages) {
    if pages.cache == Cache::Keep {
        return;
    }
    if let Some(file) = source.file() {
        write_back(file, source.start_bytes, source.size_bytes);
        forget(file, source.start_bytes, source.size_bytes);
    }
}

/// Builds the configured reader over an open source; `first` holds (or will
/// hold) the CRC32C of every part's first read in this job.
pub fn reader(
    kind: crate::config::ReaderKind,
    source: Source,
    plan: PartPlan,
    first: Arc<FirstReads>,
    cache: Cache,
) -> Arc<dyn Reader> {
    if let Some(object) = source.remote().cloned() {
        return Arc::new(ObjectReader {
            source,
            object,
            plan,
            pool: Arc::default(),
        });
    }
    // A member of an archive starts anywhere: mappings start at a page.
    let kind = if source.start_bytes == 0 {
        kind
    } else {
        crate::config::ReaderKind::Pread
    };
    match (kind, source.file().cloned()) {
        (crate::config::ReaderKind::Mmap, Some(file)) => Arc::new(MmapReader {
            source,
            file,
            plan,
            first,
            pages: Pages::new(cache),
        }),
        _ => Arc::new(PreadReader {
            source,
            plan,
            first,
            pool: Arc::default(),
            pages: Pages::new(cache),
        }),
    }
}

#[derive(Default)]
struct PoolInner {
    idle: Mutex<Vec<(memmap2::MmapMut, OwnedSemaphorePermit)>>,
    returned: Notify,
}

type Pool = Arc<PoolInner>;

impl PoolInner {
    /// An idle buffer with the budget it holds, if there is one.
    fn take(&self) -> Option<Lease> {
        let (buf, permit) = self.idle.lock().ok()?.pop()?;
        Some(Lease {
            permit,
            buf: Some(buf),
        })
    }
}

/// `pread` into buffers that are reused once every destination is done with them.
pub struct PreadReader {
    source: Source,
    plan: PartPlan,
    first: Arc<FirstReads>,
    pool: Pool,
    pages: Arc<Pages>,
}

/// Idle buffers kept for reuse, each still holding its share of the budget (so
/// the budget bounds idle and busy buffers together). Reuse saves the page faults,
/// zeroing and huge-page compaction of fresh memory; the pool is dropped, and its
/// budget returned, with the reader at the end of the job.
const POOL_IDLE_MAX: usize = 16;

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
        self.pool.take()
    }

    fn read(&self, index: u32, lease: Lease) -> Result<Part, ReadError> {
        let offset = self.plan.offset(index);
        let read = pread_part(
            &self.source,
            &self.plan,
            &self.pool,
            index,
            lease,
            &self.pages,
        );
        checked(&self.source, &self.first, read, index, offset)
    }

    fn keep_pages(&self) {
        self.pages.keep();
    }

    fn release_all(&self) {
        release_source(&self.source, &self.pages);
    }
}

/// Reads part `index` into a pooled buffer (or a new one), CRC32C while hot.
fn pread_part(
    source: &Source,
    plan: &PartPlan,
    pool: &Pool,
    index: u32,
    lease: Lease,
    pages: &Pages,
) -> std::io::Result<Part> {
    let file = source
        .file()
        .ok_or_else(|| std::io::Error::other("not a file source"))?;
    let start = source.start_bytes;
    fill_part(plan, pool, index, lease, |buf, offset| {
        file.read_exact_at(buf, start + offset)?;
        if pages.releasing() {
            write_back(file, start + offset, buf.len() as u64);
            forget(file, start + offset, buf.len() as u64);
        }
        Ok(crate::crc::crc32c(buf))
    })
}

/// Part `index` in a pooled buffer (or a new one), filled by `fill`, which
/// answers the bytes' CRC32C.
fn fill_part(
    plan: &PartPlan,
    pool: &Pool,
    index: u32,
    lease: Lease,
    fill: impl FnOnce(&mut [u8], u64) -> std::io::Result<u32>,
) -> std::io::Result<Part> {
    let offset = plan.offset(index);
    let len = plan.len(index) as usize;
    let mut buf = match lease.buf {
        Some(b) if b.len() >= len => b,
        _ => buffer(plan.part_bytes.max(len as u64) as usize)?,
    };
    let crc32c = fill(&mut buf[..len], offset)?;
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
    file: Arc<std::fs::File>,
    plan: PartPlan,
    first: Arc<FirstReads>,
    pages: Arc<Pages>,
}

/// A part's mapping that, once unmapped, releases its pages from the page
/// cache (advice on pages still mapped would do nothing). And the part
/// before it again: pages unmapped a moment ago are not all released at
/// once (seen here: the last MiB of every 5 MiB part stayed, with plain
/// mmap, munmap and fadvise calls; advice given later releases them), and
/// that part's own release has come and gone. Pages of the part before that
/// are still mapped, if any, are left alone by the kernel.
struct MappedPart {
    map: Option<crate::mapping::Mapped>,
    file: Arc<std::fs::File>,
    offset: u64,
    pages: Arc<Pages>,
}

impl AsRef<[u8]> for MappedPart {
    fn as_ref(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], |m| m.as_ref())
    }
}

impl Drop for MappedPart {
    fn drop(&mut self) {
        let len = self.as_ref().len() as u64;
        drop(self.map.take());
        // Advice only, never a write: this may run on any thread (the pages
        // were written back when the part was read).
        if self.pages.releasing() {
            let from = self.offset.saturating_sub(len);
            forget(&self.file, from, self.offset + len - from);
        }
    }
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
        if self.pages.releasing() {
            // Here, on a blocking thread; the part's drop only drops pages.
            write_back(&self.file, offset, len as u64);
        }
        let read = match crate::mapping::Mapped::new(&self.file, offset, len) {
            Ok(Some(map)) => {
                let faults = crate::mapping::zeroed_faults();
                let crc32c = crate::crc::crc32c(map.as_ref());
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
                    bytes: Bytes::from_owner(MappedPart {
                        map: Some(map),
                        file: self.file.clone(),
                        offset,
                        pages: self.pages.clone(),
                    }),
                    crc32c,
                    budget: Some(Arc::new(lease.permit)),
                })
            }
            // No guard to be had, a file system that cannot map (FUSE with
            // direct_io, say), or no address space left: the same bytes by pread.
            refused => {
                if let Err(e) = refused {
                    tracing::debug!(index, error = %e, "mmap refused; this part is read with pread");
                }
                pread_part(
                    &self.source,
                    &self.plan,
                    &Pool::default(),
                    index,
                    lease,
                    &self.pages,
                )
            }
        };
        checked(&self.source, &self.first, read, index, offset)
    }

    fn keep_pages(&self) {
        self.pages.keep();
    }

    fn release_all(&self) {
        release_source(&self.source, &self.pages);
    }
}

/// An object read by ranged GETs into pooled buffers, several at once.
///
/// No part is compared with its first read: the object is pinned by its
/// ETag (a change answers 412), so two reads that differ mean one was
/// corrupted on the way, and the store's checksum of the whole object, which
/// the transfer checks before completing, says which set is right.
pub struct ObjectReader {
    source: Source,
    object: Arc<crate::source::Object>,
    plan: PartPlan,
    pool: Pool,
}

impl ObjectReader {
    fn fetch(&self, index: u32, lease: Lease) -> Result<Part, ReadError> {
        let offset = self.plan.offset(index);
        let object = &self.object;
        let mut changed = None;
        let read = fill_part(&self.plan, &self.pool, index, lease, |buf, at| {
            object.read_into(at, buf).map_err(|e| match e {
                crate::source::RangeError::Changed(why) => {
                    changed = Some(why.clone());
                    std::io::Error::other(why)
                }
                crate::source::RangeError::Failed(why) => std::io::Error::other(why),
            })
        });
        if let Some(why) = changed {
            return Err(ReadError::Changed(self.source.note_change(format!(
                "the object is no longer the version opened (ETag {}): {why}",
                object.etag
            ))));
        }
        self.source.check()?;
        read.map_err(|source| ReadError::Io {
            index,
            offset,
            source,
        })
    }
}

impl Reader for ObjectReader {
    fn plan(&self) -> &PartPlan {
        &self.plan
    }

    fn returned(&self) -> Option<&Notify> {
        Some(&self.pool.returned)
    }

    fn pooled(&self) -> Option<Lease> {
        self.pool.take()
    }

    fn parallel_reads(&self) -> usize {
        self.object.parallel_reads
    }

    fn read(&self, index: u32, lease: Lease) -> Result<Part, ReadError> {
        self.fetch(index, lease)
    }

    fn reread(&self, index: u32, lease: Lease) -> Option<Result<Part, ReadError>> {
        Some(self.fetch(index, lease))
    }

    fn delivered(&self, part: &Part) {
        self.object
            .digest_part(part.index(), part.bytes(), part.crc32c());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{MIB, PartLimits, combine};
    use std::io::Write;

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
            let r = reader(kind, source.clone(), plan, first.clone(), Cache::Keep);
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
            let r = reader(kind, source.clone(), plan, first.clone(), Cache::Keep);
            let e = read(r, &budget, 1).await.unwrap_err();
            assert!(matches!(e, ReadError::Changed(_)), "{kind:?}: {e}");
            assert!(e.to_string().contains("read again"), "{e}");
        }
        // The source stays changed for every later check, and every part fails.
        assert!(source.check().is_err());
        let r = reader(
            crate::config::ReaderKind::Pread,
            source,
            plan,
            first,
            Cache::Release,
        );
        assert!(matches!(
            read(r, &budget, 0).await,
            Err(ReadError::Changed(_))
        ));
        assert_eq!(budget.in_use_bytes(), 0, "a refused part kept its memory");
    }
}
