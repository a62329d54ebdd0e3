//! A part, and what makes one trustworthy: the CRC32C computed while its
//! bytes were read, its first read's CRC32C when it is read again, and a
//! source that did not change meanwhile.

use crate::error::Class;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use crate::source::{Change, Source};

/// A piece of the file: its place, its bytes and their CRC32C.
#[derive(Clone)]
pub struct Part {
    pub(super) index: u32,
    pub(super) offset: u64,
    pub(super) bytes: Bytes,
    pub(super) crc32c: u32,
    /// For parts whose bytes are the page cache (mmap), the budget is held by the
    /// part, not by the bytes: a store that keeps the bytes (memory://) keeps a
    /// mapping of the file, not a buffer of ferry's.
    pub(super) budget: Option<Arc<OwnedSemaphorePermit>>,
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

impl ReadError {
    /// A changed source is [`Class::Refuse`] (the file is at fault); a read
    /// error is [`Class::Fatal`] for the job (the disk needs a look).
    pub fn class(&self) -> Class {
        match self {
            ReadError::Changed(_) => Class::Refuse,
            ReadError::Io { .. } => Class::Fatal,
        }
    }
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
pub(super) fn checked(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
