//! ferry-sink: an S3 endpoint for benchmarks that takes every upload, counts
//! and discards the bytes, and keeps only what the protocol needs: upload
//! ids, part sizes and ETags, object sizes, and bodies of at most 1 MiB
//! (manifests, which the benchmarks read back). A benchmark against it
//! measures the client, not the server: SeaweedFS spends 12–16 CPU seconds
//! per GiB here, most of it in MD5s of every byte.
//!
//! ```text
//! ferry-sink [--listen 127.0.0.1:18900] [--tls-ca-out FILE]
//! ```
//!
//! Requests are signed (SigV4) with `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY`, which s3s checks. With `--tls-ca-out` it serves
//! HTTPS with a certificate for 127.0.0.1 and localhost signed by a CA made
//! at start, written to FILE for clients to trust. `GET /__sink/stats`
//! (unsigned) answers the bytes received, the process's CPU seconds, and the
//! bytes whose SHA-256 s3s computed to check a signed payload.
//!
//! Design choice: s3s answers the protocol (parsing, signatures,
//! aws-chunked bodies and their trailers); this file only keeps the
//! bookkeeping. Part ETags are the client's Content-MD5 when it sent one, so
//! that nothing here reads a body but to count it; checksums sent are echoed,
//! never verified (the sink stores nothing to verify).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use futures::StreamExt;
use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};

/// Bodies up to this size are kept, so that a GET can answer them.
const KEEP_UP_TO: usize = 1 << 20;

#[derive(Default)]
struct Stats {
    bytes_in: AtomicU64,
    requests: AtomicU64,
    objects: AtomicU64,
    /// Bytes of requests whose payload s3s hashed (a hex x-amz-content-sha256).
    sha256_bytes: AtomicU64,
}

impl Stats {
    fn json(&self) -> String {
        format!(
            "{{\"bytes_in\": {}, \"requests\": {}, \"objects\": {}, \"sha256_bytes\": {}, \"cpu_secs\": {:.3}}}\n",
            self.bytes_in.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.objects.load(Ordering::Relaxed),
            self.sha256_bytes.load(Ordering::Relaxed),
            cpu_secs()
        )
    }
}

/// CPU seconds (user and system) of every thread of this process so far.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

struct Part {
    size: u64,
    etag: String,
}

struct Upload {
    bucket: String,
    key: String,
    parts: BTreeMap<i32, Part>,
}

struct Stored {
    size: u64,
    etag: String,
    body: Option<Bytes>,
    modified: SystemTime,
}

#[derive(Default)]
struct Sink {
    uploads: Mutex<HashMap<String, Upload>>,
    objects: Mutex<BTreeMap<(String, String), Stored>>,
    stats: Arc<Stats>,
    next: AtomicU64,
}

/// The hex form of a Content-MD5 header (base64 of 16 bytes).
fn md5_hex(content_md5: &str) -> Option<String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(content_md5)
        .ok()?;
    (raw.len() == 16).then(|| raw.iter().map(|b| format!("{b:02x}")).collect())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sink {
    /// A unique value where the protocol wants one (upload ids, ETags of
    /// bodies without a Content-MD5): not MD5-shaped, so that no client
    /// takes it for the body's MD5.
    fn unique(&self, suffix: &str) -> String {
        format!("{:024x}{suffix}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// A body's ETag: the client's Content-MD5 as S3 gives it, else a
    /// unique value (the sink hashes no body).
    fn etag(&self, content_md5: Option<&str>) -> String {
        content_md5
            .and_then(md5_hex)
            .unwrap_or_else(|| self.unique(""))
    }

    /// Counts the body's bytes; keeps it when it is small.
    async fn drain(&self, body: Option<StreamingBlob>) -> S3Result<(u64, Option<Bytes>)> {
        let Some(mut body) = body else {
            return Ok((0, Some(Bytes::new())));
        };
        let (mut n, mut kept, mut keep) = (0u64, Vec::new(), true);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| s3_error!(IncompleteBody, "{e}"))?;
            n += chunk.len() as u64;
            self.stats
                .bytes_in
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if keep && kept.len() + chunk.len() <= KEEP_UP_TO {
                kept.extend_from_slice(&chunk);
            } else {
                keep = false;
                kept = Vec::new();
            }
        }
        Ok((n, keep.then(|| Bytes::from(kept))))
    }

    fn store(&self, bucket: String, key: String, size: u64, etag: String, body: Option<Bytes>) {
        lock(&self.objects).insert(
            (bucket, key),
            Stored {
                size,
                etag,
                body,
                modified: SystemTime::now(),
            },
        );
        self.stats.objects.fetch_add(1, Ordering::Relaxed);
    }
}

/// A trailer's value (an aws-chunked body's checksum), once the body is
/// read. Read in place: `take` would leave nothing for the next name asked.
fn trailer(t: &Option<s3s::TrailingHeaders>, name: &str) -> Option<String> {
    t.as_ref()?
        .read(|headers| Some(headers.get(name)?.to_str().ok()?.to_string()))?
}

/// The CRC32 and CRC32C a client sent for a body, in headers or in trailers:
/// echoed as the answer's, never verified.
fn sent_crcs(
    crc32: Option<String>,
    crc32c: Option<String>,
    t: &Option<s3s::TrailingHeaders>,
) -> (Option<String>, Option<String>) {
    (
        crc32.or_else(|| trailer(t, "x-amz-checksum-crc32")),
        crc32c.or_else(|| trailer(t, "x-amz-checksum-crc32c")),
    )
}

#[async_trait::async_trait]
impl S3 for Sink {
    async fn create_bucket(
        &self,
        _req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        Ok(S3Response::new(CreateBucketOutput::default()))
    }

    async fn head_bucket(
        &self,
        _req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        lock(&self.objects).retain(|(b, _), _| *b != req.input.bucket);
        Ok(S3Response::new(DeleteBucketOutput::default()))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let S3Request {
            input,
            trailing_headers,
            ..
        } = req;
        let (size, body) = self.drain(input.body).await?;
        let etag = self.etag(input.content_md5.as_deref());
        // After the body: its trailers arrive with its end.
        let (checksum_crc32, checksum_crc32c) = sent_crcs(
            input.checksum_crc32,
            input.checksum_crc32c,
            &trailing_headers,
        );
        self.store(input.bucket, input.key, size, etag.clone(), body);
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(etag)),
            checksum_crc32,
            checksum_crc32c,
            checksum_crc64nvme: input.checksum_crc64nvme,
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        let id = self.unique("");
        lock(&self.uploads).insert(
            id.clone(),
            Upload {
                bucket: input.bucket.clone(),
                key: input.key.clone(),
                parts: BTreeMap::new(),
            },
        );
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
            checksum_algorithm: input.checksum_algorithm,
            checksum_type: input.checksum_type,
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let S3Request {
            input,
            trailing_headers,
            ..
        } = req;
        if !lock(&self.uploads).contains_key(&input.upload_id) {
            return Err(s3_error!(NoSuchUpload));
        }
        let (size, _) = self.drain(input.body).await?;
        let etag = self.etag(input.content_md5.as_deref());
        // After the body: its trailers arrive with its end.
        let (checksum_crc32, checksum_crc32c) = sent_crcs(
            input.checksum_crc32,
            input.checksum_crc32c,
            &trailing_headers,
        );
        match lock(&self.uploads).get_mut(&input.upload_id) {
            Some(u) => {
                u.parts.insert(
                    input.part_number,
                    Part {
                        size,
                        etag: etag.clone(),
                    },
                );
            }
            None => return Err(s3_error!(NoSuchUpload)),
        }
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(etag)),
            checksum_crc32,
            checksum_crc32c,
            checksum_crc64nvme: input.checksum_crc64nvme,
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        let Some(upload) = lock(&self.uploads).remove(&input.upload_id) else {
            return Err(s3_error!(NoSuchUpload));
        };
        let listed = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default();
        if listed.is_empty() {
            return Err(s3_error!(MalformedXML, "no parts listed"));
        }
        let (mut size, mut md5s, mut all_md5) = (0u64, Vec::new(), true);
        for p in &listed {
            let n = p.part_number.unwrap_or(0);
            let Some(part) = upload.parts.get(&n) else {
                return Err(s3_error!(InvalidPart, "part {n} was never uploaded"));
            };
            if let Some(e) = &p.e_tag
                && e.value().trim_matches('"') != part.etag
            {
                return Err(s3_error!(
                    InvalidPart,
                    "part {n}: ETag {} is not {}",
                    e.value(),
                    part.etag
                ));
            }
            size += part.size;
            match (0..16)
                .map(|i| u8::from_str_radix(part.etag.get(2 * i..2 * i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()
            {
                Some(raw) if part.etag.len() == 32 => md5s.extend(raw),
                _ => all_md5 = false,
            }
        }
        let etag = if all_md5 {
            use md5::Digest;
            let sum = md5::Md5::digest(&md5s);
            let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
            format!("{hex}-{}", listed.len())
        } else {
            self.unique(&format!("-{}", listed.len()))
        };
        self.store(
            upload.bucket.clone(),
            upload.key.clone(),
            size,
            etag.clone(),
            None,
        );
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(upload.bucket),
            key: Some(upload.key),
            e_tag: Some(ETag::Strong(etag)),
            checksum_crc32c: input.checksum_crc32c,
            checksum_crc64nvme: input.checksum_crc64nvme,
            checksum_type: input.checksum_type,
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        match lock(&self.uploads).remove(&req.input.upload_id) {
            Some(_) => Ok(S3Response::new(AbortMultipartUploadOutput::default())),
            None => Err(s3_error!(NoSuchUpload)),
        }
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let objects = lock(&self.objects);
        let Some(o) = objects.get(&(req.input.bucket, req.input.key)) else {
            return Err(s3_error!(NoSuchKey));
        };
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(o.size as i64),
            e_tag: Some(ETag::Strong(o.etag.clone())),
            last_modified: Some(Timestamp::from(o.modified)),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let (body, etag, modified) = {
            let objects = lock(&self.objects);
            let Some(o) = objects.get(&(input.bucket, input.key)) else {
                return Err(s3_error!(NoSuchKey));
            };
            let Some(body) = o.body.clone() else {
                return Err(s3_error!(
                    NotImplemented,
                    "the sink keeps only bodies of at most {KEEP_UP_TO} bytes sent whole"
                ));
            };
            (body, o.etag.clone(), o.modified)
        };
        let len = body.len() as u64;
        let (body, content_range) = match input.range {
            Some(r) => {
                let span = r.check(len)?;
                let range = format!("bytes {}-{}/{len}", span.start, span.end.saturating_sub(1));
                (
                    body.slice(span.start as usize..span.end as usize),
                    Some(range),
                )
            }
            None => (body, None),
        };
        Ok(S3Response::new(GetObjectOutput {
            content_length: Some(body.len() as i64),
            content_range,
            e_tag: Some(ETag::Strong(etag)),
            last_modified: Some(Timestamp::from(modified)),
            body: Some(StreamingBlob::from(s3s::Body::from(body))),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let contents = self.listing(&input.bucket, input.prefix.as_deref());
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: input.prefix,
            key_count: Some(contents.len() as i32),
            is_truncated: Some(false),
            contents: Some(contents),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        let contents = self.listing(&input.bucket, input.prefix.as_deref());
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: input.prefix,
            is_truncated: Some(false),
            contents: Some(contents),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        lock(&self.objects).remove(&(req.input.bucket, req.input.key));
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        let mut objects = lock(&self.objects);
        let deleted = input
            .delete
            .objects
            .into_iter()
            .map(|o| {
                objects.remove(&(input.bucket.clone(), o.key.clone()));
                DeletedObject {
                    key: Some(o.key),
                    ..Default::default()
                }
            })
            .collect();
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            ..Default::default()
        }))
    }
}

impl Sink {
    fn listing(&self, bucket: &str, prefix: Option<&str>) -> Vec<Object> {
        lock(&self.objects)
            .iter()
            .filter(|((b, k), _)| b == bucket && k.starts_with(prefix.unwrap_or("")))
            .map(|((_, k), o)| Object {
                key: Some(k.clone()),
                size: Some(o.size as i64),
                e_tag: Some(ETag::Strong(o.etag.clone())),
                last_modified: Some(Timestamp::from(o.modified)),
                ..Default::default()
            })
            .collect()
    }
}

/// A CA made now, written to `ca_out` as PEM, and a certificate for
/// 127.0.0.1 and localhost that it signed: what the sink serves.
fn tls(ca_out: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor, Box<dyn std::error::Error>> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio_rustls::rustls::{self, ServerConfig};

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ferry bench sink CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    std::fs::write(ca_out, ca_cert.pem())?;
    let chain = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    // S3 speaks HTTP/1.1: offering h2 would make some clients take it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn usage(why: &str) -> ! {
    eprintln!(
        "ferry-sink: {why}\nusage: ferry-sink [--listen 127.0.0.1:18900] [--tls-ca-out FILE]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut listen: SocketAddr = "127.0.0.1:18900".parse().expect("a socket address");
    let mut ca_out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage("--listen takes ADDR:PORT"))
            }
            "--tls-ca-out" => {
                ca_out = Some(std::path::PathBuf::from(
                    args.next()
                        .unwrap_or_else(|| usage("--tls-ca-out takes FILE")),
                ))
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let (Ok(key), Ok(secret)) = (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) else {
        usage("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: requests are checked against them")
    };
    let acceptor = ca_out.as_deref().map(|p| match tls(p) {
        Ok(a) => a,
        Err(e) => usage(&format!("cannot make the TLS certificate: {e}")),
    });
    let sink = Sink::default();
    let stats = sink.stats.clone();
    let mut builder = s3s::service::S3ServiceBuilder::new(sink);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(key, secret));
    let service = builder.build();
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => usage(&format!("cannot listen on {listen}: {e}")),
    };
    println!(
        "ferry-sink listening on {}://{listen}",
        if acceptor.is_some() { "https" } else { "http" }
    );
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (service, stats, acceptor) = (service.clone(), stats.clone(), acceptor.clone());
        tokio::spawn(async move {
            let handler =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (service, stats) = (service.clone(), stats.clone());
                    async move {
                        stats.requests.fetch_add(1, Ordering::Relaxed);
                        if req.uri().path() == "/__sink/stats" {
                            return Ok(hyper::Response::new(s3s::Body::from(stats.json())));
                        }
                        // A hex SHA-256 of the payload: s3s hashes every byte to check it.
                        let sha = req
                            .headers()
                            .get("x-amz-content-sha256")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| {
                                v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())
                            });
                        if sha {
                            let n = req
                                .headers()
                                .get(hyper::header::CONTENT_LENGTH)
                                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                                .unwrap_or(0);
                            stats.sha256_bytes.fetch_add(n, Ordering::Relaxed);
                        }
                        hyper::service::Service::call(&service, req).await
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new();
            let _ = match acceptor {
                Some(a) => match a.accept(tcp).await {
                    Ok(s) => {
                        conn.serve_connection(hyper_util::rt::TokioIo::new(s), handler)
                            .await
                    }
                    Err(_) => return,
                },
                None => {
                    conn.serve_connection(hyper_util::rt::TokioIo::new(tcp), handler)
                        .await
                }
            };
        });
    }
}
