//! Helpers shared by the integration tests: temporary spools, random images,
//! the real `ferry` binary, and the SeaweedFS server that `tests/run.sh` starts.
#![allow(dead_code)]

mod oci;
mod site;
#[allow(unused_imports)]
pub use oci::*;
#[allow(unused_imports)]
pub use site::*;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use rand::{RngCore, SeedableRng};

/// The python that runs the OCI double: the test venv's, which has the C
/// `crc32c` and `cryptography` (`tests/support/seaweedfs.sh install`).
pub fn oci_double_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin/python3");
    assert!(
        p.exists(),
        "{} is missing: run tests/support/seaweedfs.sh install (tests/run.sh does)",
        p.display()
    );
    p
}

pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env("FERRY_LOG", "info");
    c
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("ferry runs");
    eprintln!(
        "--- ferry exited {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn tmpdir() -> tempfile::TempDir {
    match std::env::var_os("FERRY_TEST_TMP") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            tempfile::tempdir_in(d).unwrap()
        }
        None => tempfile::tempdir().unwrap(),
    }
}

/// Writes `size` pseudo-random (incompressible) bytes; returns their CRC32C.
pub fn random_file(path: &Path, size: u64, seed: u64) -> u32 {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    let mut crc = 0u32;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    crc
}

pub fn file_crc(path: &Path) -> u32 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return crc;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
}

/// True when both files hold the same bytes.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = match (std::fs::File::open(a), std::fs::File::open(b)) {
        (Ok(fa), Ok(fb)) => (fa, fb),
        _ => return false,
    };
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        if n != m || ba[..n] != bb[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..]).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    got
}

pub fn manifest(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The S3 server started by `tests/run.sh`.
pub struct S3 {
    pub endpoint: String,
    pub buckets: Vec<String>,
}

/// A `[destinations.NAME]` table for an S3 bucket, with `extra` lines inside it.
pub fn s3_dest(name: &str, bucket: &str, prefix: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "[destinations.{name}]\nurl = \"s3://{bucket}/{prefix}/\"\nendpoint = \"{endpoint}\"\n{extra}\n"
    )
}

/// The test S3 server, or `None` (with a note) when run outside `tests/run.sh`.
/// With `FERRY_REQUIRE_S3=1` (as `tests/run.sh` sets) a missing server fails the test.
pub fn s3() -> Option<S3> {
    match std::env::var("FERRY_TEST_S3_ENDPOINT") {
        Ok(endpoint) => Some(S3 {
            endpoint,
            buckets: std::env::var("FERRY_TEST_BUCKETS")
                .unwrap_or_else(|_| "ferry-phx,ferry-fra,ferry-ash".into())
                .split(',')
                .map(String::from)
                .collect(),
        }),
        Err(_) => {
            assert!(
                std::env::var_os("FERRY_REQUIRE_S3").is_none(),
                "FERRY_REQUIRE_S3 is set but FERRY_TEST_S3_ENDPOINT is not"
            );
            eprintln!("SKIPPED: no S3 server; run this test through tests/run.sh");
            None
        }
    }
}

impl S3 {
    pub fn store(&self, bucket: &str) -> Arc<AmazonS3> {
        s3_store(&self.endpoint, bucket)
    }

    /// Keys of the multipart uploads still open under `prefix` (S3
    /// ListMultipartUploads, signed by curl; object_store has no call for it).
    pub fn open_uploads(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.open_upload_ids(bucket, prefix)
            .into_iter()
            .map(|(key, _)| key)
            .collect()
    }

    /// Keys and upload ids of the multipart uploads still open under `prefix`.
    pub fn open_upload_ids(&self, bucket: &str, prefix: &str) -> Vec<(String, String)> {
        let xml = self.signed_get(&format!(
            "{bucket}/?prefix={}&uploads=",
            query_escape(prefix)
        ));
        assert!(xml.contains("<ListMultipartUploadsResult"), "{xml}");
        xml.split("<Upload>")
            .skip(1)
            .filter_map(|u| {
                let key = xml_unescape(u.split("<Key>").nth(1)?.split("</Key>").next()?);
                let id = u.split("<UploadId>").nth(1)?.split("</UploadId>").next()?;
                Some((key, id.to_string()))
            })
            .collect()
    }

    /// Every key under `prefix`, exactly as the server stores it (S3
    /// ListObjectsV2, signed by curl, the XML read here: no client library
    /// between the test and the server's own names).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let xml = self.signed_get(&format!(
            "{bucket}/?list-type=2&prefix={}",
            query_escape(prefix)
        ));
        assert!(xml.contains("<ListBucketResult"), "{xml}");
        let mut keys: Vec<String> = xml
            .split("<Contents>")
            .skip(1)
            .filter_map(|c| {
                Some(xml_unescape(
                    c.split("<Key>").nth(1)?.split("</Key>").next()?,
                ))
            })
            .collect();
        keys.sort();
        keys
    }

    /// A GET of `path_and_query` on the server, signed with SigV4 by curl (the
    /// query sorted, each parameter with `=`: curl 7.88 signs it the way the
    /// server checks it).
    fn signed_get(&self, path_and_query: &str) -> String {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
            ])
            .arg(format!("{}:{}", key_id(), secret()))
            .arg(format!("{}/{path_and_query}", self.endpoint))
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "GET {path_and_query}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Adds the endpoint and credentials to a ferry command.
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", key_id())
            .env("AWS_SECRET_ACCESS_KEY", secret())
            .env("AWS_REGION", "us-east-1")
    }
}

/// RFC 3986's unreserved characters: what a query value keeps as it is.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A query parameter value, percent-encoded (RFC 3986 unreserved kept).
pub fn query_escape(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Percent-decoding of a URL path (`%XX` to the byte), as UTF-8.
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .expect("UTF-8")
        .into_owned()
}

/// The five predefined XML entities and numeric character references.
pub fn xml_unescape(s: &str) -> String {
    quick_xml::escape::unescape(s)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| s.to_string())
}

pub fn key_id() -> String {
    std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "ferrytest".into())
}
pub fn secret() -> String {
    std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "ferrytestsecret".into())
}

pub fn s3_store(endpoint: &str, bucket: &str) -> Arc<AmazonS3> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id(key_id())
            .with_secret_access_key(secret())
            .build()
            .unwrap(),
    )
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The object path of `key` exactly as written: `ObjPath::from` would
/// percent-encode characters such as `%`, `#` or `[` into the key.
pub fn obj_path(key: &str) -> ObjPath {
    ObjPath::parse(key).expect("a key without control characters or empty segments")
}

/// True when the object at `key` holds exactly the bytes of `file`.
pub fn s3_object_equals(store: &AmazonS3, key: &str, file: &Path) -> bool {
    block_on(async {
        let Ok(got) = store.get(&obj_path(key)).await else {
            return false;
        };
        let mut f = std::fs::File::open(file).unwrap();
        if got.meta.size != f.metadata().unwrap().len() {
            return false;
        }
        let mut stream = got.into_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            buf.resize(chunk.len(), 0);
            f.read_exact(&mut buf).unwrap();
            if buf[..] != chunk[..] {
                return false;
            }
        }
        true
    })
}

/// The part count from an S3 multipart ETag (`"...-N"`).
pub fn s3_part_count(store: &AmazonS3, key: &str) -> Option<u32> {
    block_on(async {
        let meta = store.head(&obj_path(key)).await.ok()?;
        meta.e_tag?
            .trim_matches('"')
            .rsplit_once('-')?
            .1
            .parse()
            .ok()
    })
}

pub fn s3_get(store: &AmazonS3, key: &str) -> Option<Vec<u8>> {
    block_on(async {
        let got = store.get(&obj_path(key)).await.ok()?;
        Some(got.bytes().await.ok()?.to_vec())
    })
}

/// A unique prefix so tests sharing a bucket never see each other's objects.
pub fn unique_prefix(test: &str) -> String {
    format!(
        "{test}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Lines of stderr that are not log lines.
pub fn error_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("ferry:"))
        .map(String::from)
        .collect()
}

pub fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// A running `ferry daemon`, its log in a file; killed when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, log: &Path) -> Daemon {
        Daemon::start_with(config, log, |_| {})
    }

    /// Starts a daemon after `adjust` had its say on the command (environment,
    /// limits).
    pub fn start_with(config: &Path, log: &Path, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = ferry();
        cmd.arg("daemon")
            .arg("--config")
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", key_id())
            .env("AWS_SECRET_ACCESS_KEY", secret())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        adjust(&mut cmd);
        let child = cmd.spawn().unwrap();
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the exit, at most `limit`; None if it is still running.
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("--- daemon log {}\n{}", self.log.display(), self.log_text());
    }
}

/// Polls `cond` every 50 ms for at most `limit`.
pub fn wait_until(limit: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cond()
}

/// Writes `X.partial` and renames it to `X`, as a producer should.
pub fn drop_image(spool: &Path, name: &str, size: u64, seed: u64) -> u32 {
    let partial = spool.join(format!("{name}.partial"));
    let crc = random_file(&partial, size, seed);
    std::fs::rename(&partial, spool.join(name)).unwrap();
    crc
}

/// Copies `file` into `spool` as a producer should: as `NAME.partial`,
/// then renamed to its own name.
pub fn spool_copy(file: &Path, spool: &Path) {
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let partial = spool.join(format!("{name}.partial"));
    std::fs::copy(file, &partial).unwrap();
    std::fs::rename(&partial, spool.join(name)).unwrap();
}

/// Files in a directory (names), sorted; empty if it does not exist.
pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET on loopback: (status code, body). None if no answer.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Runs `qemu-img` with `args` in `dir`; panics with its words if it fails.
pub fn qemu(args: &[&str], dir: &Path) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw disk of `size` bytes with an MBR: boot code, one partition, 0x55AA,
/// and non-zero data after the first 4 KiB.
pub fn boot_raw(path: &Path, size: usize) {
    let mut b = vec![0u8; size];
    b[0] = 0xeb;
    b[1] = 0x63;
    b[446 + 4] = 0x83;
    b[446 + 8] = 0x01;
    b[510] = 0x55;
    b[511] = 0xaa;
    for (i, x) in b[4096..].iter_mut().enumerate() {
        *x = (i * 7 % 251) as u8;
    }
    std::fs::write(path, b).unwrap();
}

/// A bootable QCOW2 of `size` bytes made by qemu-img, as `dir/name` (from
/// `dir/boot.raw`, made here too): an image OCI would import.
pub fn boot_qcow2(dir: &Path, name: &str, size: usize) {
    boot_raw(&dir.join("boot.raw"), size);
    qemu(
        &["convert", "-f", "raw", "-O", "qcow2", "boot.raw", name],
        dir,
    );
}
