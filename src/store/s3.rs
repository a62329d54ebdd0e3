//! `s3://BUCKET/PREFIX/`: any S3-compatible store, through object_store's
//! `MultipartStore`, with the endpoint, region and credentials resolved once
//! (S3Target) and nothing else ever contacted.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use tracing::warn;

use super::{Address, Backend, ObjectInfo, PartReceipt, StoreError, url_escape};
use crate::chunk::Part;
use crate::config::{DestinationConfig, PayloadChecksum, TransferConfig};

pub(super) struct S3Backend {
    /// The client itself, for presigned requests (a source's HEAD with
    /// checksum mode on, which object_store does not send).
    s3: Arc<AmazonS3>,
    /// Connect timeout, for those requests.
    connect_timeout: Duration,
    /// CA certificates trusted besides the system's (`ca_file`), for those requests.
    roots: Vec<reqwest::Certificate>,
    /// The region, which signs them, and the bucket they name.
    region: String,
    bucket: String,
    store: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    prefix: String,
    object_url_base: String,
    /// The base of `import_url`: the bucket in OCI's native form, when the
    /// endpoint is OCI's.
    import_base: Option<String>,
    endpoint: String,
    /// What the store checks of each part: the payload checksum sent.
    part_check: &'static str,
}

impl S3Backend {
    pub(super) fn new(
        name: &str,
        bucket: &str,
        prefix: String,
        cfg: &DestinationConfig,
        transfer: &TransferConfig,
        part_bytes_hint: u64,
    ) -> Result<(S3Backend, Address), StoreError> {
        let target = S3Target::resolve(name, bucket, cfg)?;
        let checksum = target.payload_checksum(name, transfer);
        let roots = match &cfg.ca_file {
            Some(path) => ca_pem(path).and_then(|pem| {
                reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| ca_error(path, &e.to_string()))
            })?,
            None => Vec::new(),
        };
        let s3 = build_s3(&target, checksum, cfg, transfer, part_bytes_hint)?;
        Ok((
            S3Backend {
                s3: s3.clone(),
                connect_timeout: Duration::from_secs(transfer.connect_timeout_secs),
                roots,
                region: target.region.clone(),
                bucket: target.bucket.clone(),
                store: s3.clone(),
                multipart: s3,
                prefix,
                object_url_base: target.object_url_base(),
                import_base: target.oci_native_base(),
                endpoint: target.endpoint.clone(),
                // OCI's S3-compatible API does not check CRC64NVME.
                part_check: match checksum {
                    PayloadChecksum::Crc64nvme if oci_compat(&target.endpoint).is_some() => "none",
                    PayloadChecksum::Crc64nvme => "crc64nvme-per-part",
                    PayloadChecksum::Sha256 => "sha256-per-part",
                },
            },
            target.address(),
        ))
    }

    /// The object path of `prefix + name`, exactly: object_store's
    /// `Path::from` would percent-encode `%`, `#`, `[`, `~`, quotes and more
    /// into the stored key. A key object_store cannot carry (control
    /// characters, `.`/`..` segments) is refused.
    fn obj_path(&self, name: &str) -> Result<ObjPath, StoreError> {
        key_path(&self.key(name))
    }

    fn remote(&self, op: &'static str, name: &str) -> impl Fn(object_store::Error) -> StoreError {
        let key = self.key(name);
        move |source| StoreError::Remote {
            op,
            key: key.clone(),
            source,
        }
    }
}

impl S3Backend {
    /// The bucket and prefix as a source's claims, markers and listing.
    pub(super) fn bucket(&self) -> S3Bucket {
        S3Bucket {
            store: self.store.clone(),
            prefix: self.prefix.clone(),
        }
    }

    /// The object `name` as a source: its size, ETag and stored checksum from
    /// a HEAD with checksum mode on (signed by object_store's SigV4 signer
    /// and sent here: object_store sends no such HEAD), then its ranges by
    /// object_store's GET with `If-Match`.
    pub(super) async fn open_source(
        &self,
        url: &str,
        name: &str,
        parallel_reads: usize,
    ) -> Result<crate::source::Object, StoreError> {
        let path = self.obj_path(name)?;
        let key = self.key(name);
        let http = |source| StoreError::Http {
            op: "open",
            key: key.clone(),
            source,
        };
        let setup = |e: String| StoreError::Setup(format!("signing a HEAD of {key}: {e}"));
        let credential = self
            .s3
            .credentials()
            .get_credential()
            .await
            .map_err(self.remote("open", name))?;
        let target = format!(
            "{}/{}/{}",
            self.endpoint.trim_end_matches('/'),
            self.bucket,
            url_escape(&key)
        );
        let mut request = http::Request::builder()
            .method(http::Method::HEAD)
            .uri(&target)
            .header("x-amz-checksum-mode", "ENABLED")
            .body(object_store::client::HttpRequestBody::empty())
            .map_err(|e| setup(e.to_string()))?;
        object_store::aws::AwsAuthorizer::new(&credential, "s3", &self.region)
            .try_authorize(&mut request, None)
            .map_err(|e| setup(e.to_string()))?;
        let client = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .tls_certs_merge(self.roots.iter().cloned())
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(http)?;
        let mut head = client.head(&target);
        for (k, v) in request.headers() {
            head = head.header(k.as_str(), v.as_bytes());
        }
        let r = head.send().await.map_err(http)?;
        let answer = |message: String| StoreError::Answer {
            op: "open",
            key: key.clone(),
            message,
        };
        match r.status().as_u16() {
            200 => {}
            404 => {
                return Err(StoreError::Missing {
                    key: key.clone(),
                    what: "HEAD answered 404 Not Found".into(),
                });
            }
            403 => {
                return Err(answer(
                    "HEAD answered 403 Forbidden: check the credentials and that they may read the bucket".into(),
                ));
            }
            s => return Err(answer(format!("HEAD answered {s}"))),
        }
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let size: u64 = h("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| answer("HEAD answered no Content-Length".into()))?;
        let etag = h("etag").ok_or_else(|| answer("HEAD answered no ETag".into()))?;
        // A composite checksum ("...-N", or type COMPOSITE) is of the parts'
        // checksums, not of the bytes: it cannot check ferry's reads.
        let composite =
            h("x-amz-checksum-type").is_some_and(|t| t.eq_ignore_ascii_case("COMPOSITE"));
        // Else a single PUT's ETag is the MD5 of its bytes, unless the
        // object is encrypted with KMS or a customer key.
        let encrypted = h("x-amz-server-side-encryption").is_some_and(|v| v != "AES256")
            || h("x-amz-server-side-encryption-customer-algorithm").is_some();
        let stored = match h("x-amz-checksum-crc32c") {
            Some(v) if !composite && !v.contains('-') => crc_from_b64(&v)
                .map(crate::source::Stored::Crc32c)
                .ok_or_else(|| answer(format!("x-amz-checksum-crc32c {v:?} is not a CRC32C")))?,
            _ => match md5_of_etag(&etag) {
                Some(m) if !encrypted => crate::source::Stored::Md5(m),
                _ => crate::source::Stored::Unknown,
            },
        };
        if size == 0 {
            return Err(answer(
                "the object is empty; there is nothing to ship".into(),
            ));
        }
        Ok(crate::source::Object::new(
            url.to_string(),
            etag,
            size,
            stored,
            parallel_reads,
            Arc::new(S3Ranges {
                store: self.store.clone(),
                path,
            }),
        ))
    }
}

/// The MD5 a single-part ETag is (32 hex digits, quoted); `None` for a
/// multipart ETag (`...-N`) or anything else.
fn md5_of_etag(etag: &str) -> Option<[u8; 16]> {
    let hex = etag.trim_matches('"');
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A CRC32C in base64 of its big-endian bytes.
fn crc_from_b64(v: &str) -> Option<u32> {
    let b = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, v).ok()?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// An S3 object's ranges, by object_store's GET with `If-Match`.
#[derive(Debug)]
struct S3Ranges {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
}

#[async_trait::async_trait]
impl crate::source::Remote for S3Ranges {
    async fn range(
        &self,
        offset: u64,
        len: u64,
        etag: &str,
    ) -> Result<crate::source::Chunks, crate::source::RangeError> {
        use crate::source::RangeError;
        let opts = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(offset..offset + len)),
            if_match: Some(etag.to_string()),
            ..Default::default()
        };
        match self.store.get_opts(&self.path, opts).await {
            Ok(r) => Ok(r
                .into_stream()
                .map(|c| c.map_err(|e| RangeError::Failed(super::error::describe(&e))))
                .boxed()),
            Err(object_store::Error::Precondition { .. }) => Err(RangeError::Changed(
                "the store answered 412 Precondition Failed to a read by its ETag: it was replaced"
                    .into(),
            )),
            Err(object_store::Error::NotFound { .. }) => Err(RangeError::Changed(
                "the store answered 404 Not Found: it was deleted".into(),
            )),
            Err(e) => Err(RangeError::Failed(super::error::describe(&e))),
        }
    }
}

/// A bucket source's claims, markers and listing, through object_store
/// (`source::Bucket`): conditional PUTs (`If-None-Match: *`, `If-Match`).
pub(super) struct S3Bucket {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) prefix: String,
}

/// Objects listed at most under one source's prefix.
const MAX_LISTED: usize = 1_000_000;

impl S3Bucket {
    /// A PUT in `mode` (`If-None-Match: *`, `If-Match`); the new ETag.
    async fn put(
        &self,
        name: &str,
        body: Bytes,
        mode: object_store::PutMode,
    ) -> Result<String, crate::source::BucketError> {
        let opts = object_store::PutOptions {
            mode,
            ..Default::default()
        };
        let r = self
            .store
            .put_opts(&self.path(name)?, PutPayload::from(body), opts)
            .await
            .map_err(failed)?;
        Ok(r.e_tag.unwrap_or_default())
    }

    fn path(&self, name: &str) -> Result<ObjPath, crate::source::BucketError> {
        key_path(&format!("{}{name}", self.prefix))
            .map_err(|e| crate::source::BucketError::Failed(e.to_string()))
    }
}

fn failed(e: object_store::Error) -> crate::source::BucketError {
    match e {
        object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. } => {
            crate::source::BucketError::Precondition(super::error::describe(&e))
        }
        e => crate::source::BucketError::Failed(super::error::describe(&e)),
    }
}

#[async_trait::async_trait]
impl crate::source::Bucket for S3Bucket {
    async fn list(&self) -> Result<Vec<crate::source::Listed>, crate::source::BucketError> {
        let prefix = self.prefix.trim_end_matches('/');
        let prefix = (!prefix.is_empty())
            .then(|| key_path(prefix))
            .transpose()
            .map_err(|e| crate::source::BucketError::Failed(e.to_string()))?;
        let mut listing = self.store.list(prefix.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(failed)?;
            if out.len() >= MAX_LISTED {
                return Err(crate::source::BucketError::Failed(format!(
                    "more than {MAX_LISTED} objects under {}",
                    self.prefix
                )));
            }
            if let Some(name) = meta.location.as_ref().strip_prefix(&self.prefix) {
                out.push(crate::source::Listed {
                    name: name.to_string(),
                    size_bytes: meta.size,
                    etag: meta.e_tag,
                    modified_unix: u64::try_from(meta.last_modified.timestamp()).ok(),
                });
            }
        }
        Ok(out)
    }

    async fn read(
        &self,
        name: &str,
    ) -> Result<Option<(Bytes, String)>, crate::source::BucketError> {
        match self.store.get(&self.path(name)?).await {
            Ok(r) => {
                let etag = r.meta.e_tag.clone().unwrap_or_default();
                Ok(Some((r.bytes().await.map_err(failed)?, etag)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(failed(e)),
        }
    }

    async fn create(&self, name: &str, body: Bytes) -> Result<String, crate::source::BucketError> {
        self.put(name, body, object_store::PutMode::Create).await
    }

    async fn replace(
        &self,
        name: &str,
        body: Bytes,
        etag: &str,
    ) -> Result<String, crate::source::BucketError> {
        let version = object_store::UpdateVersion {
            e_tag: Some(etag.to_string()),
            version: None,
        };
        self.put(name, body, object_store::PutMode::Update(version))
            .await
    }

    async fn write(&self, name: &str, body: Bytes) -> Result<(), crate::source::BucketError> {
        self.store
            .put(&self.path(name)?, PutPayload::from(body))
            .await
            .map(drop)
            .map_err(failed)
    }

    async fn delete(&self, name: &str) -> Result<(), crate::source::BucketError> {
        match self.store.delete(&self.path(name)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(failed(e)),
        }
    }
}

fn key_path(key: &str) -> Result<ObjPath, StoreError> {
    if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
        return Err(StoreError::Key {
            key: key.to_string(),
            message: "it may not be empty or start or end with '/'".into(),
        });
    }
    ObjPath::parse(key).map_err(|e| StoreError::Key {
        key: key.to_string(),
        message: e.to_string(),
    })
}

#[async_trait::async_trait]
impl Backend for S3Backend {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn object_url(&self, name: &str) -> String {
        format!("{}{}", self.object_url_base, url_escape(&self.key(name)))
    }

    fn import_url(&self, name: &str) -> Result<String, String> {
        match &self.import_base {
            Some(base) => Ok(format!("{base}{}", url_escape(&self.key(name)))),
            None => Err(format!(
                "this destination's endpoint ({}) is not OCI Object Storage; OCI imports \
                 custom images only from there (an endpoint such as \
                 https://NAMESPACE.compat.objectstorage.REGION.oraclecloud.com)",
                self.endpoint
            )),
        }
    }

    fn server_check(&self) -> &'static str {
        self.part_check
    }

    async fn begin(&self, name: &str) -> Result<String, StoreError> {
        self.multipart
            .create_multipart(&self.obj_path(name)?)
            .await
            .map_err(self.remote("begin upload", name))
    }

    async fn put_part(
        &self,
        name: &str,
        upload_id: &str,
        part: &Part,
    ) -> Result<String, StoreError> {
        let id = self
            .multipart
            .put_part(
                &self.obj_path(name)?,
                &upload_id.to_string(),
                part.index() as usize,
                PutPayload::from_bytes(part.bytes().clone()),
            )
            .await
            .map_err(self.remote("upload part", name))?;
        Ok(id.content_id)
    }

    async fn complete(
        &self,
        name: &str,
        upload_id: &str,
        receipts: &[PartReceipt],
    ) -> Result<Option<u32>, StoreError> {
        let parts = receipts
            .iter()
            .map(|r| PartId {
                content_id: r.part_id.clone(),
            })
            .collect();
        self.multipart
            .complete_multipart(&self.obj_path(name)?, &upload_id.to_string(), parts)
            .await
            .map(|_| None)
            .map_err(self.remote("complete upload", name))
    }

    async fn abort_key(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.multipart
            .abort_multipart(&key_path(key)?, &upload_id.to_string())
            .await
            .map_err(|source| StoreError::Remote {
                op: "abort upload",
                key: key.to_string(),
                source,
            })
    }

    async fn head(&self, name: &str) -> Result<ObjectInfo, StoreError> {
        let meta = self
            .store
            .head(&self.obj_path(name)?)
            .await
            .map_err(self.remote("head", name))?;
        let parts = meta
            .e_tag
            .as_deref()
            .map(|t| t.trim_matches('"'))
            .and_then(|t| t.rsplit_once('-'))
            .and_then(|(_, n)| n.parse().ok());
        Ok(ObjectInfo {
            size_bytes: meta.size,
            parts,
            crc32c: None,
        })
    }

    async fn readback(&self, name: &str) -> Result<(u64, u32), StoreError> {
        let remote = self.remote("read back", name);
        let mut stream = self
            .store
            .get(&self.obj_path(name)?)
            .await
            .map_err(&remote)?
            .into_stream();
        let (mut crc, mut size) = (0u32, 0u64);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(&remote)?;
            crc = crate::crc::crc32c_append(crc, &chunk);
            size += chunk.len() as u64;
        }
        Ok((size, crc))
    }

    async fn put_small(&self, name: &str, body: Bytes) -> Result<(), StoreError> {
        self.store
            .put(&self.obj_path(name)?, PutPayload::from_bytes(body))
            .await
            .map(drop)
            .map_err(self.remote("write", name))
    }

    async fn get_small(&self, name: &str) -> Result<Bytes, StoreError> {
        let remote = self.remote("read", name);
        self.store
            .get(&self.obj_path(name)?)
            .await
            .map_err(&remote)?
            .bytes()
            .await
            .map_err(&remote)
    }

    async fn probe(&self, _part_bytes: u64) -> Result<(), StoreError> {
        match self.store.head(&self.obj_path(".ferry-probe")?).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(StoreError::Remote {
                op: "probe",
                key: self.key(".ferry-probe"),
                source,
            }),
        }
    }
}

/// An S3 destination's endpoint, region, bucket and credentials, resolved
/// once from its table and the environment. These are the only endpoint and
/// credential source the destination ever uses: object_store's own fallbacks
/// (public AWS for a URL alone, the instance-metadata service when no key is
/// found) are never reached unless the table says `credentials = "instance"`.
struct S3Target {
    bucket: String,
    endpoint: String,
    region: String,
    keys: Option<(String, String, Option<String>)>,
}

impl S3Target {
    fn resolve(name: &str, bucket: &str, cfg: &DestinationConfig) -> Result<S3Target, StoreError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let region = cfg
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_string());
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"))
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"))
            .trim_end_matches('/')
            .to_string();
        let setup = |m: String| StoreError::Setup(format!("destination {name} ({}): {m}", cfg.url));
        // OCI's S3-compatible API signs with the OCI region id of its
        // endpoint (us-ashburn-1), never an AWS name: take it from the
        // endpoint, and refuse another.
        let region = match oci_compat(&endpoint) {
            None => region,
            Some((_, oci_region, _)) => match cfg.region.as_deref() {
                None => oci_region,
                Some(r) if r == oci_region => oci_region,
                Some(r) => {
                    return Err(setup(format!(
                        "region {r:?} is not the OCI region of the endpoint {endpoint}: OCI's \
                         S3-compatible API takes the OCI region id (such as us-ashburn-1); set \
                         region = \"{oci_region}\" or leave it out"
                    )));
                }
            },
        };
        let keys = match cfg.credentials.unwrap_or_default() {
            crate::config::Credentials::Instance => {
                if cfg.access_key_id.is_some() || cfg.secret_access_key.is_some() {
                    return Err(setup(
                        "credentials = \"instance\" and access keys are both set: keep one".into(),
                    ));
                }
                None
            }
            crate::config::Credentials::Keys => {
                let pair = match (&cfg.access_key_id, &cfg.secret_access_key) {
                    (Some(id), Some(secret)) => (id.clone(), secret.clone(), None),
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(setup(
                            "access_key_id and secret_access_key go together: set both".into(),
                        ));
                    }
                    (None, None) => {
                        match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                            (Some(id), Some(secret)) => (id, secret, env("AWS_SESSION_TOKEN")),
                            (Some(_), None) | (None, Some(_)) => {
                                return Err(setup(
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together: set both"
                                    .into(),
                            ));
                            }
                            (None, None) => {
                                return Err(setup(format!(
                                    "no credentials: set access_key_id and secret_access_key in \
                                 [destinations.{name}], or AWS_ACCESS_KEY_ID and \
                                 AWS_SECRET_ACCESS_KEY in ferry's environment, or \
                                 credentials = \"instance\" to use the role of the cloud \
                                 instance ferry runs on"
                                )));
                            }
                        }
                    }
                };
                Some(pair)
            }
        };
        Ok(S3Target {
            bucket: bucket.to_string(),
            endpoint,
            region,
            keys,
        })
    }

    /// How parts are protected: as configured, else SHA-256 at OCI's
    /// S3-compatible endpoints (OCI checks MD5, SHA-256 and CRC32C there,
    /// not CRC64NVME) and CRC64NVME elsewhere.
    fn payload_checksum(&self, name: &str, transfer: &TransferConfig) -> PayloadChecksum {
        let oci = oci_compat(&self.endpoint).is_some();
        match transfer.payload_checksum {
            Some(PayloadChecksum::Crc64nvme) if oci => {
                warn!(
                    destination = name,
                    "transfer.payload_checksum = \"crc64nvme\" at OCI's S3-compatible endpoint \
                     {}: OCI does not check that checksum, so no part is verified by the \
                     server; remove the setting (SHA-256 is the default there) or use an \
                     oci:// destination, whose parts OCI checks by CRC32C",
                    self.endpoint
                );
                PayloadChecksum::Crc64nvme
            }
            Some(c) => c,
            None if oci => PayloadChecksum::Sha256,
            None => PayloadChecksum::Crc64nvme,
        }
    }

    fn address(&self) -> Address {
        Address::S3 {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            bucket: self.bucket.clone(),
        }
    }

    /// The base URL of objects: OCI's native form for OCI's S3-compatible
    /// endpoint, path style otherwise.
    fn object_url_base(&self) -> String {
        self.oci_native_base()
            .unwrap_or_else(|| format!("{}/{}/", self.endpoint, self.bucket))
    }

    /// For OCI's S3-compatible endpoint
    /// (`https://NS.compat.objectstorage.REGION.REALM_DOMAIN`), the base of
    /// the bucket's objects in OCI's native form, which CreateImage takes as
    /// `sourceUri`. The realm domains are those of Oracle's SDKs
    /// (`oraclecloud.com`, `oraclegovcloud.com`, `oraclegovcloud.uk`,
    /// `oraclecloudN.com`, `oraclecloud.eu`, ...) and `oci.customer-oci.com`.
    fn oci_native_base(&self) -> Option<String> {
        let (ns, region, domain) = oci_compat(&self.endpoint)?;
        Some(format!(
            "https://objectstorage.{region}.{domain}/n/{ns}/b/{}/o/",
            self.bucket
        ))
    }
}

/// For OCI's S3-compatible endpoint
/// (`https://NS.compat.objectstorage.REGION.REALM_DOMAIN`): its namespace,
/// region and realm domain.
fn oci_compat(endpoint: &str) -> Option<(String, String, String)> {
    let url = url::Url::parse(endpoint).ok()?;
    if url.scheme() != "https" {
        return None;
    }
    let host = url.host_str()?;
    let (ns, rest) = host.split_once(".compat.objectstorage.")?;
    let (region, domain) = rest.split_once('.')?;
    if ns.is_empty() || ns.contains('.') || !is_oci_realm_domain(domain) {
        return None;
    }
    Some((ns.into(), region.into(), domain.into()))
}

/// Whether `domain` is one of OCI's realm domains: `oraclecloud.com` and the
/// numbered `oraclecloudN.com`, `oraclegovcloud.com`, `oraclegovcloud.uk`,
/// `oraclecloud.eu`, and `oci.customer-oci.com`.
fn is_oci_realm_domain(domain: &str) -> bool {
    let numbered = domain
        .strip_prefix("oraclecloud")
        .and_then(|d| d.strip_suffix(".com"))
        .is_some_and(|n| n.is_empty() || n.bytes().all(|b| b.is_ascii_digit()));
    numbered
        || matches!(
            domain,
            "oraclegovcloud.com" | "oraclegovcloud.uk" | "oraclecloud.eu" | "oci.customer-oci.com"
        )
}

/// The bytes of a `ca_file`.
fn ca_pem(path: &std::path::Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| ca_error(path, &e.to_string()))
}

fn ca_error(path: &std::path::Path, why: &str) -> StoreError {
    StoreError::Setup(format!(
        "ca_file {}: {why}; give a PEM file of the CA certificates that signed the endpoint's",
        path.display()
    ))
}

fn build_s3(
    target: &S3Target,
    checksum: PayloadChecksum,
    cfg: &DestinationConfig,
    transfer: &TransferConfig,
    part_bytes_hint: u64,
) -> Result<Arc<AmazonS3>, StoreError> {
    // object_store's whole-request timeout defaults to 30 s, which a large part on a
    // slow link exceeds: allow part_size at min_throughput, and never under 60 s.
    let secs = (part_bytes_hint / (transfer.min_throughput_kib * 1024)).max(60);
    let mut options = ClientOptions::new()
        .with_timeout(Duration::from_secs(secs))
        .with_connect_timeout(Duration::from_secs(transfer.connect_timeout_secs))
        .with_pool_idle_timeout(Duration::from_secs(30));
    if let Some(path) = &cfg.ca_file {
        let roots = object_store::Certificate::from_pem_bundle(&ca_pem(path)?)
            .map_err(|e| ca_error(path, &e.to_string()))?;
        for root in roots {
            options = options.with_root_certificate(root);
        }
    }
    let allow_http = cfg
        .allow_http
        .unwrap_or_else(|| crate::config::is_loopback_http(&target.endpoint));
    // Keys: nothing from the environment but what S3Target read. Instance:
    // the AWS SDKs' chain (web identity, container, instance metadata), as asked.
    let b = match target.keys {
        Some(_) => AmazonS3Builder::new(),
        None => AmazonS3Builder::from_env(),
    };
    // Client options first: they replace the whole option set, allow_http included.
    let mut b = b
        .with_client_options(options)
        .with_allow_http(allow_http)
        .with_bucket_name(&target.bucket)
        .with_retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        })
        .with_virtual_hosted_style_request(false)
        .with_endpoint(&target.endpoint)
        .with_region(&target.region);
    b = match checksum {
        PayloadChecksum::Crc64nvme => b
            .with_unsigned_payload(true)
            .with_checksum_algorithm(object_store::aws::Checksum::CRC64NVME),
        PayloadChecksum::Sha256 => b,
    };
    if let Some((id, secret, token)) = &target.keys {
        b = b.with_access_key_id(id).with_secret_access_key(secret);
        if let Some(t) = token {
            b = b.with_token(t);
        }
    }
    b.build()
        .map(Arc::new)
        .map_err(|e| StoreError::Setup(format!("s3://{}: {e}", target.bucket)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_name_exactly_and_never_leave_the_prefix() {
        for name in ["100%.qcow2", "a#b?c", "back\\slash~[x]*", "q\"'<>", "ü 空"] {
            let p = backend("exports/").obj_path(name).unwrap();
            assert_eq!(p.as_ref(), format!("exports/{name}"));
        }
        for bad in ["..", ".", "new\nline", "a/../../etc"] {
            assert!(backend("exports/").obj_path(bad).is_err(), "{bad:?}");
        }
    }

    /// An S3 backend that is never asked anything (keys and paths only).
    fn backend(prefix: &str) -> S3Backend {
        let cfg = DestinationConfig {
            url: "s3://bkt/".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            ..Default::default()
        };
        S3Backend::new(
            "t",
            "bkt",
            prefix.into(),
            &cfg,
            &TransferConfig::default(),
            5 << 20,
        )
        .unwrap()
        .0
    }

    fn at(endpoint: &str) -> S3Backend {
        let cfg = DestinationConfig {
            url: "s3://images/".into(),
            endpoint: Some(endpoint.into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            allow_http: Some(true),
            ..Default::default()
        };
        S3Backend::new(
            "t",
            "images",
            "ex/".into(),
            &cfg,
            &TransferConfig::default(),
            5 << 20,
        )
        .unwrap()
        .0
    }

    /// Issue 14: at OCI's S3-compatible endpoint the region is the OCI one
    /// in it (another is refused), and parts are signed by SHA-256, which
    /// OCI checks, unless the config says otherwise.
    #[test]
    fn ocis_s3_compatible_endpoints_get_their_region_and_sha256() {
        let oci = "https://ns1.compat.objectstorage.eu-frankfurt-1.oraclecloud.com";
        let cfg = |region: Option<&str>| DestinationConfig {
            url: "s3://images/".into(),
            endpoint: Some(oci.into()),
            region: region.map(Into::into),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            ..Default::default()
        };
        let build = |c: &DestinationConfig, t: &TransferConfig| {
            S3Backend::new("fra", "images", String::new(), c, t, 5 << 20)
        };
        let t = TransferConfig::default();
        for region in [None, Some("eu-frankfurt-1")] {
            let (b, a) = build(&cfg(region), &t).unwrap();
            assert!(
                matches!(&a, Address::S3 { region, .. } if region == "eu-frankfurt-1"),
                "{a:?}"
            );
            assert_eq!(b.server_check(), "sha256-per-part");
        }
        for wrong in ["us-east-1", "eu-central-1", "us-ashburn-1"] {
            let e = build(&cfg(Some(wrong)), &t).err().unwrap().to_string();
            assert!(
                e.contains(wrong) && e.contains("region = \"eu-frankfurt-1\""),
                "{e}"
            );
        }
        let forced = TransferConfig {
            payload_checksum: Some(PayloadChecksum::Crc64nvme),
            ..TransferConfig::default()
        };
        assert_eq!(
            build(&cfg(None), &forced).unwrap().0.server_check(),
            "none",
            "OCI does not check CRC64NVME"
        );
        // Elsewhere: CRC64NVME by default, and the region as configured.
        assert_eq!(backend("p/").server_check(), "crc64nvme-per-part");
    }

    /// Issue 13, item 2: only OCI's own endpoints give a CreateImage source,
    /// in OCI's native form, the key encoded once; any other store says why not.
    #[test]
    fn only_oci_endpoints_give_an_import_url() {
        for (endpoint, want) in [
            (
                "https://axaxnpcrorw5.compat.objectstorage.us-ashburn-1.oraclecloud.com",
                "https://objectstorage.us-ashburn-1.oraclecloud.com/n/axaxnpcrorw5/b/images/o/ex/100%25%20a%23b.qcow2",
            ),
            (
                "https://ns1.compat.objectstorage.eu-frankfurt-1.oci.customer-oci.com",
                "https://objectstorage.eu-frankfurt-1.oci.customer-oci.com/n/ns1/b/images/o/ex/100%25%20a%23b.qcow2",
            ),
            (
                "https://ns2.compat.objectstorage.uk-gov-london-1.oraclegovcloud.uk",
                "https://objectstorage.uk-gov-london-1.oraclegovcloud.uk/n/ns2/b/images/o/ex/100%25%20a%23b.qcow2",
            ),
            (
                "https://ns3.compat.objectstorage.us-tacoma-1.oraclecloud10.com/",
                "https://objectstorage.us-tacoma-1.oraclecloud10.com/n/ns3/b/images/o/ex/100%25%20a%23b.qcow2",
            ),
        ] {
            assert_eq!(
                at(endpoint).import_url("100% a#b.qcow2").as_deref(),
                Ok(want)
            );
        }
        for endpoint in [
            "http://127.0.0.1:8333",
            "https://s3.us-east-1.amazonaws.com",
            "https://ns.compat.objectstorage.us-ashburn-1.oraclecloud.com.evil.example",
            "https://compat.objectstorage.us-ashburn-1.oraclecloud.com",
            "https://ns.compat.objectstorage.us-ashburn-1.oraclecloudx.com",
            "http://ns.compat.objectstorage.us-ashburn-1.oraclecloud.com",
        ] {
            let why = at(endpoint).import_url("a.qcow2").unwrap_err();
            assert!(
                why.contains(endpoint) && why.contains("not OCI Object Storage"),
                "{endpoint}: {why}"
            );
        }
    }
}
