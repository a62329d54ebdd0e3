//! io_uring reads for the `uring` reader (cargo feature `io-uring`).
//!
//! Written on the `io-uring` crate (the tokio project's plain binding), not on
//! `tokio-uring`, which is unmaintained and brings its own runtime. One ring per
//! blocking thread; a part is read as 1 MiB reads with up to [`DEPTH`] in flight
//! at once, so the device sees a deep queue where `pread` reads one range at a
//! time. Everything else (buffers, pool, budget, CRC32C) is the `pread` reader's.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, types};

/// Bytes per read request.
const CHUNK: usize = 1 << 20;
/// Reads in flight per thread.
const DEPTH: u32 = 32;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Fills `buf` from `file` at `offset`, like `FileExt::read_exact_at`.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoUring::new(DEPTH).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("io_uring is not available here ({e}); use reader = \"pread\""),
                )
            })?);
        }
        let ring = slot.as_mut().expect("set above");
        read_with(ring, file, buf, offset)
    })
}

fn read_with(ring: &mut IoUring, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let fd = types::Fd(file.as_raw_fd());
    let base = buf.as_mut_ptr();
    // Ranges of `buf` still to read, as (start, len); a short read puts its rest back.
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut todo: Vec<usize> = Vec::new();
    for start in (0..buf.len()).step_by(CHUNK) {
        todo.push(ranges.len());
        ranges.push((start, CHUNK.min(buf.len() - start)));
    }
    todo.reverse();
    let mut in_flight = 0usize;
    let mut failed: Option<io::Error> = None;
    let mut wait_errors = 0u32;
    // Every turn completes at least one read, and a read either finishes its
    // range, shortens it, or fails the whole call: the loop is bounded.
    while (failed.is_none() && !todo.is_empty()) || in_flight > 0 {
        while failed.is_none() && in_flight < DEPTH as usize {
            let Some(id) = todo.pop() else { break };
            let (start, len) = ranges[id];
            // SAFETY: `start + len <= buf.len()`, and `buf` outlives the read:
            // this function waits for every submitted read before it returns.
            let entry = opcode::Read::new(fd, unsafe { base.add(start) }, len as u32)
                .offset(offset + start as u64)
                .build()
                .user_data(id as u64);
            // SAFETY: the entry points into `buf`, valid until completion (above).
            if unsafe { ring.submission().push(&entry) }.is_err() {
                todo.push(id);
                break;
            }
            in_flight += 1;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            let passing = matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::ResourceBusy
            );
            if !passing {
                failed.get_or_insert(e);
                wait_errors += 1;
                if in_flight == 0 {
                    break;
                }
                // Reads in flight still write into `buf`: returning now would be
                // unsound. A ring that keeps failing cannot be waited out.
                if wait_errors > 100 {
                    eprintln!("ferry: io_uring stopped answering with reads in flight; aborting");
                    std::process::abort();
                }
            }
        }
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (id, result) in done {
            in_flight -= 1;
            let (start, len) = ranges[id];
            if result < 0 {
                let e = io::Error::from_raw_os_error(-result);
                if e.kind() == io::ErrorKind::Interrupted {
                    todo.push(id);
                } else if failed.is_none() {
                    failed = Some(e);
                }
            } else if result == 0 {
                failed.get_or_insert_with(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the file ended early")
                });
            } else if (result as usize) < len {
                let n = result as usize;
                ranges[id] = (start + n, len - n);
                todo.push(id);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn reads_every_byte_and_reports_a_short_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..(5 * super::CHUNK + 12345))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let file = std::fs::File::open(f.path()).unwrap();
        let mut buf = vec![0u8; data.len() - 100];
        super::read_exact_at(&file, &mut buf, 100).unwrap();
        assert_eq!(buf, data[100..]);
        let mut too_long = vec![0u8; data.len()];
        let e = super::read_exact_at(&file, &mut too_long, 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
