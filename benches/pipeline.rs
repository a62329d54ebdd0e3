//! ferry's own ceiling, with no network: reader + CRC32C throughput for each
//! reader on a 1 GiB file (from the page cache, and from the disk), and a whole
//! `push` of a 4 GiB file to `memory://` (page cache). Figures are the median
//! of three runs, in GB/s (10^9 bytes per second).
//!
//!     cargo bench --bench pipeline
//!
//! Set FERRY_BENCH_DIR to choose where the test files go (default: target/bench-data).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::chunk::{self, Budget, FirstReads, PartLimits, PartPlan};
use ferry::config::{Config, ReaderKind};
use ferry::push::{self, PushOptions};
use ferry::source::Source;

const GIB: u64 = 1 << 30;

fn make_file(path: &Path, size: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return;
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9e3779b97f4a7c15u64;
    for _ in 0..size / block.len() as u64 {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

fn warm(path: &Path) {
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut std::io::sink()).unwrap();
}

/// Drops the file's pages from the page cache (no root needed), so the next
/// read comes from the disk.
fn uncache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: posix_fadvise on an open descriptor; only advice to the kernel.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise failed");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

async fn read_all(path: &Path, kind: ReaderKind) -> Duration {
    let src = Source::open(path).unwrap();
    let plan = PartPlan::new(src.size_bytes, 64 << 20, PartLimits::S3).unwrap();
    let budget = Budget::new(512 << 20);
    let reader = chunk::reader(
        kind,
        src,
        plan,
        Arc::new(FirstReads::new(plan.count)),
        chunk::Cache::Keep,
    );
    let started = Instant::now();
    // Two reads in flight, as the pipeline keeps the disk busy.
    let mut crc = Vec::new();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..plan.count {
        let r = reader.clone();
        let b = budget.clone();
        pending.push_back(tokio::spawn(async move { chunk::read(r, &b, i).await }));
        if pending.len() >= 2 {
            let p = pending.pop_front().unwrap().await.unwrap().unwrap();
            crc.push((p.crc32c(), p.len()));
        }
    }
    for h in pending {
        let p = h.await.unwrap().unwrap();
        crc.push((p.crc32c(), p.len()));
    }
    let took = started.elapsed();
    std::hint::black_box(chunk::combine(crc));
    took
}

async fn push_memory(path: &Path, kind: ReaderKind) -> Duration {
    push_memory_with(path, kind, None).await
}

async fn push_memory_with(
    path: &Path,
    kind: ReaderKind,
    status: Option<Arc<ferry::status::Status>>,
) -> Duration {
    let mut config = Config::embedded().unwrap();
    config.transfer.reader = kind;
    let opts = PushOptions {
        to: vec!["memory://bench/".into()],
        force: true,
        ..Default::default()
    };
    let started = Instant::now();
    let outcomes = push::push(
        &config,
        path,
        opts,
        Duration::from_secs(3600),
        status,
        ferry::shutdown::Shutdown::never(),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    for o in outcomes.outcomes {
        o.result.expect("memory push verified");
    }
    took
}

fn main() {
    let dir = std::env::var_os("FERRY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-data"))
        });
    std::fs::create_dir_all(&dir).unwrap();
    let one = dir.join("pipeline-1g.img");
    let four = dir.join("pipeline-4g.img");
    make_file(&one, GIB);
    make_file(&four, 4 * GIB);
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("ferry pipeline benchmark (median of 3, GB/s = 10^9 B/s)");
    let readers = [ReaderKind::Pread, ReaderKind::Mmap];
    for &kind in &readers {
        warm(&one);
        let runs: Vec<Duration> = (0..3).map(|_| rt.block_on(read_all(&one, kind))).collect();
        let d = median(runs);
        println!(
            "read+crc32c  1 GiB  reader={:<5}  {:>6.2} GB/s  ({:.3} s)",
            kind.as_str(),
            gbps(GIB, d),
            d.as_secs_f64()
        );
    }
    // From the disk: the file's pages are dropped from the cache before each run.
    for &kind in &readers {
        let runs: Vec<Duration> = (0..3)
            .map(|_| {
                uncache(&one);
                rt.block_on(read_all(&one, kind))
            })
            .collect();
        let d = median(runs);
        println!(
            "read+crc32c  1 GiB  reader={:<5}  {:>6.2} GB/s  ({:.3} s)  from disk",
            kind.as_str(),
            gbps(GIB, d),
            d.as_secs_f64()
        );
    }
    for &kind in &readers {
        warm(&four);
        let runs: Vec<Duration> = (0..3)
            .map(|_| rt.block_on(push_memory(&four, kind)))
            .collect();
        let d = median(runs);
        println!(
            "push memory:// 4 GiB reader={:<5}  {:>6.2} GB/s  ({:.3} s)",
            kind.as_str(),
            gbps(4 * GIB, d),
            d.as_secs_f64()
        );
    }
    // Metrics on the hot path: the same push with metrics counting (and an HTTP
    // endpoint scraped every 100 ms) against none, runs alternating.
    let metrics = ferry::metrics::Metrics::new();
    let status = ferry::status::Status::new(metrics, Arc::new(ferry::progress::Board::default()));
    let (stop, stopped) = ferry::shutdown::new();
    let addr = rt
        .block_on(ferry::http::serve(
            "127.0.0.1:0".parse().unwrap(),
            status.clone(),
            stopped,
        ))
        .unwrap();
    let scraper = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let until = Instant::now() + Duration::from_secs(600);
        let mut n = 0u64;
        while Instant::now() < until && n < 100_000 {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
                if sink.is_empty() {
                    break;
                }
            } else {
                break;
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let (mut on, mut off) = (Vec::new(), Vec::new());
    warm(&four);
    for _ in 0..5 {
        off.push(rt.block_on(push_memory_with(&four, ReaderKind::Mmap, None)));
        on.push(rt.block_on(push_memory_with(
            &four,
            ReaderKind::Mmap,
            Some(status.clone()),
        )));
    }
    let (on, off) = (median(on), median(off));
    println!(
        "metrics on/off, push memory:// 4 GiB mmap: on {:.2} GB/s, off {:.2} GB/s, cost {:+.2}% (median of 5, alternating)",
        gbps(4 * GIB, on),
        gbps(4 * GIB, off),
        (on.as_secs_f64() / off.as_secs_f64() - 1.0) * 100.0
    );
    // The scraper ends when the endpoint stops answering.
    stop.trip();
    let _ = scraper.join();
}
