//! Read-only file mappings that a truncation cannot turn into a crash.
//!
//! Promises: the bytes of a [`Mapped`] range can be read whatever another
//! process does to the file. Pages that a truncation cut off read as zeros
//! instead of raising SIGBUS. The change itself is caught elsewhere (the
//! source's size and change time are checked after each part is read and
//! before anything is completed, see `source`); this module only keeps the
//! process alive long enough to notice it and abort cleanly.
//!
//! Design choice: the mmap reader saves a copy of every byte (see README,
//! Benchmarks), but a mapped file that shrinks kills the process on the next
//! read of a lost page, and those reads happen in code ferry does not own
//! (object_store's checksum, the TLS and HTTP stack). A read lease cannot
//! prevent it (the kernel breaks a lease after `lease-break-time` whatever the
//! holder does), and no crate offers a guarded mapping, so this module keeps a
//! lock-free table of the ranges it mapped and a SIGBUS handler. For a faulting
//! address inside one of them, the handler maps anonymous zero pages over the
//! rest of that range (`MAP_FIXED`) and returns, and the read goes on. Any
//! other SIGBUS is handed to the handler that was installed before (Rust's
//! own, which lets the signal end the process, as it should). The handler only
//! loads atomics and calls mmap(2), a system call: it is async-signal-safe.

use std::fs::File;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Ranges mapped at once. Each slot packs a range's first page number (high 40
/// bits) and its length in pages (low 24 bits: up to 64 GiB with 4 KiB pages);
/// 0 is a free slot. Parts in memory are bounded by `memory_limit`, so 4,096
/// ranges are 20 GiB of 5 MiB parts; beyond that a part is read with pread.
const SLOTS: usize = 4096;
const LEN_BITS: u32 = 24;
static RANGES: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

/// Faults answered with zero pages since the process started.
static ZEROED: AtomicU64 = AtomicU64::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(0);

/// The handler that was installed for SIGBUS before this module's.
struct Previous(libc::sigaction);
// SAFETY: a plain C struct of function pointers and flags, read only after
// it is set once.
unsafe impl Sync for Previous {}
unsafe impl Send for Previous {}
static PREVIOUS: OnceLock<Previous> = OnceLock::new();

/// Installs the handler once; false if it could not be installed.
fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page <= 0 {
            return false;
        }
        PAGE.store(page as usize, Ordering::Release);
        // SAFETY: installing a handler with a zeroed, then filled, sigaction;
        // the old one is kept for chaining.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut old) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(Previous(old));
        }
        true
    })
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let page = PAGE.load(Ordering::Acquire);
    // Only a fault on an address (not a SIGBUS sent by kill, whose si_addr
    // means something else) can be in a mapped range.
    if code == libc::BUS_ADRERR
        && let Some(at) = addr.checked_div(page)
    {
        let at = at as u64;
        for slot in &RANGES {
            let v = slot.load(Ordering::Acquire);
            if v == 0 {
                continue;
            }
            let (first, pages) = (v >> LEN_BITS, v & ((1 << LEN_BITS) - 1));
            if at >= first && at < first + pages {
                let len = ((first + pages - at) as usize) * page;
                // SAFETY: replaces pages of a read-only mapping this module
                // made, from the faulting page to its end, with zero pages.
                let p = unsafe {
                    libc::mmap(
                        (at as usize * page) as *mut libc::c_void,
                        len,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    ZEROED.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                break;
            }
        }
    }
    // Not ours (or the zero pages could not be mapped): whatever handled it before.
    if let Some(Previous(prev)) = PREVIOUS.get() {
        let h = prev.sa_sigaction;
        // An ignored SIGBUS from a fault would fault again forever: treat it
        // as the default.
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    // The default action: restore it and return; the access faults again and
    // the signal ends the process.
    // SAFETY: resetting a disposition is async-signal-safe.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
    }
}

/// How many faults were answered with zero pages (a mapped file shrank).
pub fn zeroed_faults() -> u64 {
    ZEROED.load(Ordering::Relaxed)
}

/// A read-only mapping of a range of a file, guarded (see the module doc).
pub struct Mapped {
    map: memmap2::Mmap,
    slot: usize,
}

impl Mapped {
    /// Maps `len` bytes at `offset`, pre-faulted. `None` when no guard can be
    /// had (no handler, or every slot in use): read another way then.
    pub fn new(file: &File, offset: u64, len: usize) -> std::io::Result<Option<Mapped>> {
        if len == 0 || !install() {
            return Ok(None);
        }
        // SAFETY: a read-only private mapping; a truncation of the file under
        // it is answered by the handler above once the range is registered,
        // and nothing reads the mapping before that.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .populate()
                .map(file)
        }?;
        let page = PAGE.load(Ordering::Acquire) as u64;
        let start = map.as_ptr() as u64 / page;
        let end = (map.as_ptr() as u64 + map.len() as u64).div_ceil(page);
        let pages = end - start;
        if pages >= 1 << LEN_BITS || start >= 1 << (64 - LEN_BITS) {
            return Ok(None);
        }
        let packed = (start << LEN_BITS) | pages;
        for (i, slot) in RANGES.iter().enumerate() {
            if slot
                .compare_exchange(0, packed, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(Some(Mapped { map, slot: i }));
            }
        }
        Ok(None)
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Nobody reads the mapping any more: forget the range, then the map
        // field unmaps it.
        RANGES[self.slot].store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_truncated_mapping_reads_zeros_instead_of_killing_the_process() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        let file = File::open(f.path()).unwrap();
        let m = Mapped::new(&file, 0, data.len()).unwrap().expect("guarded");
        assert_eq!(m.as_ref(), &data[..]);
        let before = zeroed_faults();
        // Cut the file under the mapping; without the guard the next read of
        // a lost page raises SIGBUS and ends this test process.
        std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap()
            .set_len(8192)
            .unwrap();
        let bytes = m.as_ref();
        assert_eq!(&bytes[..8192], &data[..8192]);
        assert!(bytes[8192..].iter().all(|&b| b == 0), "lost pages not zero");
        assert!(zeroed_faults() > before);
    }
}
