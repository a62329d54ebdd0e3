//! `oci://BUCKET/PREFIX/`: OCI Object Storage through its own API, signed
//! with the API key of an OCI CLI profile (`crate::oci`).
//!
//! What the service checks: the upload is created with
//! `opc-checksum-algorithm: CRC32C`, every part carries the CRC32C ferry
//! computed when it read the part (`opc-content-crc32c`), which OCI checks on
//! arrival (400 "Unmatched Content CRC32C", retried as a checksum failure),
//! and the commit answers the whole object's CRC32C, which `transfer`
//! compares with the file's: end-to-end verification by the server with no
//! second pass over the bytes.
//!
//! Design choice: written on reqwest (already in the tree through
//! object_store) rather than on object_store, which has no OCI-native
//! client, and rather than a third-party OCI crate (`crate::oci` says why).
//! The API's calls and headers are those of Oracle's SDKs' request and
//! response models (`../shared/OCI.md`, section 2).

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use reqwest::{Method, Response, StatusCode};
use tokio::sync::OnceCell;
use tracing::warn;

use super::error::OciAnswer;
use super::{Address, Backend, ListedPart, ObjectInfo, PartReceipt, StoreError, url_escape};
use crate::chunk::Part;
use crate::config::{DestinationConfig, TransferConfig};
use crate::oci::client::{self, Account, Client, Payload, header, segment};

/// ListMultipartUploadParts pages followed at most (10,000 parts, one per
/// page at worst).
const MAX_PAGES: usize = 10_001;

pub(super) struct OciBackend {
    client: Client,
    region: String,
    bucket: String,
    prefix: String,
    /// The namespace as configured, or as `GET /n/` answered once.
    namespace: OnceCell<String>,
    /// Which profile and key sign, for the words of a refused signature.
    profile: String,
    /// The size of each range of a read-back.
    range_bytes: u64,
}

/// The profile that signs for an oci:// destination (or its import), and
/// the region it is in: the destination's own, else the profile's.
pub(crate) fn account_and_region(
    name: &str,
    cfg: &DestinationConfig,
) -> Result<(Account, String), String> {
    let account = Account::load(cfg.config_file.as_deref(), cfg.profile.as_deref())?;
    for w in &account.warnings {
        warn!(destination = name, "{w}");
    }
    let region = cfg
        .region
        .clone()
        .or_else(|| account.profile.region.clone())
        .ok_or_else(|| {
            format!(
                "no region: set region (an OCI region id such as us-ashburn-1) in \
                 [destinations.{name}] or in profile [{}] of {}",
                account.profile.name,
                account.profile.file.display()
            )
        })?;
    if !client::is_region_id(&region) {
        return Err(format!(
            "region {region:?} is not an OCI region id (such as us-ashburn-1 or eu-frankfurt-1)"
        ));
    }
    Ok((account, region))
}

/// Whether an oci:// destination's endpoint may be plain http: as
/// configured, else only on loopback.
pub(crate) fn allow_http(cfg: &DestinationConfig, endpoint: &str) -> bool {
    cfg.allow_http
        .unwrap_or_else(|| crate::config::is_loopback_http(endpoint))
}

impl OciBackend {
    pub(super) fn new(
        name: &str,
        bucket: &str,
        prefix: String,
        cfg: &DestinationConfig,
        transfer: &TransferConfig,
        part_bytes_hint: u64,
    ) -> Result<(OciBackend, Address), StoreError> {
        let setup = |m: String| StoreError::Setup(format!("destination {name} ({}): {m}", cfg.url));
        let (account, region) = account_and_region(name, cfg).map_err(setup)?;
        let endpoint = cfg
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://objectstorage.{region}.oraclecloud.com"));
        // Every request is bounded: a whole part at min_throughput, never under 60 s.
        let secs = (part_bytes_hint / (transfer.min_throughput_kib * 1024)).max(60);
        let client = Client::new(
            &account,
            &endpoint,
            &format!("https://objectstorage.{region}.oraclecloud.com"),
            allow_http(cfg, &endpoint),
            client::Limits {
                request: Duration::from_secs(secs),
                connect: Duration::from_secs(transfer.connect_timeout_secs),
            },
        )
        .map_err(setup)?;
        let namespace = OnceCell::new();
        if let Some(ns) = cfg.namespace.clone().filter(|n| !n.is_empty()) {
            let _ = namespace.set(ns);
        }
        let address = Address::Oci {
            endpoint: client.endpoint().to_string(),
            tenancy: account.profile.tenancy.clone(),
            bucket: bucket.to_string(),
        };
        Ok((
            OciBackend {
                profile: account.who.clone(),
                client,
                region,
                bucket: bucket.to_string(),
                prefix,
                namespace,
                range_bytes: part_bytes_hint.max(crate::config::MIN_PART_BYTES),
            },
            address,
        ))
    }

    /// The namespace, looked up once when not configured.
    async fn ns(&self) -> Result<&str, StoreError> {
        self.namespace
            .get_or_try_init(|| async {
                let r = self
                    .send(
                        "look up namespace",
                        "/n/",
                        Method::GET,
                        "/n/".into(),
                        Payload::None,
                        &[],
                    )
                    .await?;
                json::<String>("look up namespace", "/n/", r, "a JSON string").await
            })
            .await
            .map(String::as_str)
    }

    /// `/n/NS/b/BUCKET/KIND/OBJECT` (KIND: `o` objects, `u` uploads).
    async fn path(&self, kind: &str, key: &str) -> Result<String, StoreError> {
        Ok(format!(
            "/n/{}/b/{}/{kind}/{}",
            segment(self.ns().await?),
            segment(&self.bucket),
            segment(key)
        ))
    }

    /// `/n/NS/b/BUCKET/u/OBJECT?uploadId=ID`: one upload of `key`.
    async fn upload_path(&self, key: &str, upload_id: &str) -> Result<String, StoreError> {
        Ok(format!(
            "{}?uploadId={}",
            self.path("u", key).await?,
            segment(upload_id)
        ))
    }

    /// Signs and sends one request; an error answer becomes
    /// [`StoreError::Oci`], with Object Storage's advice.
    async fn send(
        &self,
        op: &'static str,
        key: &str,
        method: Method,
        path_and_query: String,
        payload: Payload,
        extra: &[(&'static str, String)],
    ) -> Result<Response, StoreError> {
        self.client
            .send(method, &path_and_query, payload, extra)
            .await
            .map_err(|f| {
                let mut e = StoreError::from_oci(op, key, f);
                if let StoreError::Oci { answer, .. } = &mut e {
                    self.advise(answer);
                }
                e
            })
    }

    /// What to do about a missing bucket or a refused permission.
    fn advise(&self, a: &mut OciAnswer) {
        if a.advice.is_some() {
            return;
        }
        let ns = self
            .namespace
            .get()
            .map_or("(not yet known)", String::as_str);
        a.advice = match a.status {
            404 if a.code.contains("Bucket") || a.code.contains("Namespace") => Some(format!(
                "namespace {ns}, bucket {}, region {}: check each (`oci os ns get` gives \
                 the namespace), and that the user may read the bucket (policy: read \
                 buckets, manage objects in its compartment)",
                self.bucket, self.region
            )),
            403 => Some(format!(
                "the user of {} may not do this in bucket {} (namespace {ns}, region {}): \
                 its group needs `read buckets` and `manage objects` in the bucket's compartment",
                self.profile, self.bucket, self.region
            )),
            _ => None,
        };
    }

    /// A GET or HEAD of object `name`; its key and the answer.
    async fn object_request(
        &self,
        op: &'static str,
        name: &str,
        method: Method,
        extra: &[(&'static str, String)],
    ) -> Result<(String, Response), StoreError> {
        let key = self.key_of(name);
        let path = self.path("o", &key).await?;
        let r = self
            .send(op, &key, method, path, Payload::None, extra)
            .await?;
        Ok((key, r))
    }

    fn key_of(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn key_ok(&self, key: &str) -> Result<(), StoreError> {
        if key.is_empty() || key.len() > 1024 || key.chars().any(char::is_control) {
            return Err(StoreError::Key {
                key: key.to_string(),
                message: "OCI object names are 1 to 1024 bytes without control characters".into(),
            });
        }
        Ok(())
    }

    fn base_url(&self) -> String {
        let ns = self.namespace.get().map_or("-", String::as_str);
        format!(
            "{}/n/{}/b/{}/o/",
            self.client.endpoint(),
            url_escape(ns),
            url_escape(&self.bucket)
        )
    }

    async fn read_to_end(
        &self,
        op: &'static str,
        key: &str,
        resp: Response,
        mut each: impl FnMut(&[u8]),
    ) -> Result<u64, StoreError> {
        let mut stream = resp.bytes_stream();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| StoreError::Http {
                op,
                key: key.to_string(),
                source,
            })?;
            each(&chunk);
            size += chunk.len() as u64;
        }
        Ok(size)
    }
}

impl OciBackend {
    /// The object `name` as a source: its size, ETag and stored CRC32C from
    /// a HEAD, then its ranges by GETs with `if-match`.
    pub(super) async fn open_source(
        self: std::sync::Arc<Self>,
        url: &str,
        name: &str,
        parallel_reads: usize,
    ) -> Result<crate::source::Object, StoreError> {
        let (key, r) = match self.object_request("open", name, Method::HEAD, &[]).await {
            Err(e) if e.is_missing() => {
                return Err(StoreError::Missing {
                    key: self.key_of(name),
                    what: "HEAD answered 404".into(),
                });
            }
            other => other?,
        };
        let answer = |message: &str| StoreError::Answer {
            op: "open",
            key: key.clone(),
            message: message.into(),
        };
        let size: u64 = header(&r, "content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| answer("the answer has no Content-Length"))?;
        let etag = header(&r, "etag").ok_or_else(|| answer("the answer has no ETag"))?;
        // OCI keeps a CRC32C only when the uploader asked for one.
        let stored = match header(&r, "opc-content-crc32c") {
            Some(v) => crc_from_b64(&v)
                .map(crate::source::Stored::Crc32c)
                .ok_or_else(|| answer("its opc-content-crc32c is not a CRC32C"))?,
            None => crate::source::Stored::Unknown,
        };
        if size == 0 {
            return Err(answer("the object is empty; there is nothing to ship"));
        }
        Ok(crate::source::Object::new(
            url.to_string(),
            etag,
            size,
            stored,
            parallel_reads,
            std::sync::Arc::new(OciRanges {
                backend: self,
                name: name.to_string(),
            }),
        ))
    }
}

/// An OCI object's ranges, by GETs with `if-match`.
struct OciRanges {
    backend: std::sync::Arc<OciBackend>,
    name: String,
}

impl std::fmt::Debug for OciRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciRanges")
            .field("name", &self.name)
            .finish()
    }
}

#[async_trait::async_trait]
impl crate::source::Remote for OciRanges {
    async fn range(
        &self,
        offset: u64,
        len: u64,
        etag: &str,
    ) -> Result<crate::source::Chunks, crate::source::RangeError> {
        use crate::source::RangeError;
        let headers = [
            ("range", format!("bytes={offset}-{}", offset + len - 1)),
            ("if-match", etag.to_string()),
        ];
        let r = match self
            .backend
            .object_request("read", &self.name, Method::GET, &headers)
            .await
        {
            Ok((_, r)) => r,
            Err(StoreError::Oci { answer, .. }) if answer.status == 412 => {
                return Err(RangeError::Changed(format!(
                    "OCI answered 412 {} to a read by its ETag: it was replaced",
                    answer.code
                )));
            }
            Err(e) if e.is_missing() => {
                return Err(RangeError::Changed(
                    "OCI answered 404: it was deleted".into(),
                ));
            }
            Err(e) => return Err(RangeError::Failed(e.to_string())),
        };
        if r.status() != StatusCode::PARTIAL_CONTENT && r.status() != StatusCode::OK {
            return Err(RangeError::Failed(format!(
                "a range request was answered {}",
                r.status()
            )));
        }
        if r.status() == StatusCode::OK && offset != 0 {
            return Err(RangeError::Failed(
                "a range request was answered with the whole object".into(),
            ));
        }
        Ok(r.bytes_stream()
            .map(|c| c.map_err(|e| RangeError::Failed(e.to_string())))
            .boxed())
    }
}

/// A bucket source's claims, markers and listing, through OCI's own API
/// (`source::Bucket`): conditional PutObject (`if-none-match: *`,
/// `if-match`), ListObjects.
pub(super) struct OciBucket(pub(super) std::sync::Arc<OciBackend>);

/// ListObjects pages followed at most (1,000 objects a page).
const MAX_LIST_PAGES: usize = 1_000;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListedObjects {
    objects: Vec<ListedObject>,
    next_start_with: Option<String>,
}

#[derive(serde::Deserialize)]
struct ListedObject {
    name: String,
    size: Option<u64>,
    etag: Option<String>,
    #[serde(rename = "timeCreated")]
    time_created: Option<String>,
}

impl OciBucket {
    fn failed(e: StoreError) -> crate::source::BucketError {
        match &e {
            StoreError::Oci { answer, .. } if answer.status == 412 => {
                crate::source::BucketError::Precondition(e.to_string())
            }
            _ => crate::source::BucketError::Failed(e.to_string()),
        }
    }

    async fn put(
        &self,
        name: &str,
        body: Bytes,
        condition: Option<(&'static str, String)>,
    ) -> Result<String, StoreError> {
        let b = &self.0;
        let key = b.key_of(name);
        b.key_ok(&key)?;
        let path = b.path("o", &key).await?;
        let mut extra = vec![(
            "opc-content-crc32c",
            crate::manifest::crc_base64(crate::crc::crc32c(&body)),
        )];
        extra.extend(condition);
        let r = b
            .send(
                "write",
                &key,
                Method::PUT,
                path,
                Payload::Object(body),
                &extra,
            )
            .await?;
        header(&r, "etag").ok_or_else(|| StoreError::Answer {
            op: "write",
            key,
            message: "the answer has no ETag".into(),
        })
    }
}

#[async_trait::async_trait]
impl crate::source::Bucket for OciBucket {
    async fn list(&self) -> Result<Vec<crate::source::Listed>, crate::source::BucketError> {
        let b = &self.0;
        let ns = b.ns().await.map_err(Self::failed)?;
        let base = format!(
            "/n/{}/b/{}/o?prefix={}&fields=name,size,etag,timeCreated",
            segment(ns),
            segment(&b.bucket),
            segment(&b.prefix)
        );
        let mut out = Vec::new();
        let mut start: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let path = match &start {
                Some(s) => format!("{base}&start={}", segment(s)),
                None => base.clone(),
            };
            let r = b
                .send("list", &b.prefix, Method::GET, path, Payload::None, &[])
                .await
                .map_err(Self::failed)?;
            let page: ListedObjects = json("list", &b.prefix, r, "a ListObjects answer")
                .await
                .map_err(Self::failed)?;
            out.extend(page.objects.into_iter().filter_map(|o| {
                Some(crate::source::Listed {
                    name: o.name.strip_prefix(&b.prefix)?.to_string(),
                    size_bytes: o.size.unwrap_or(0),
                    etag: o.etag,
                    modified_unix: o
                        .time_created
                        .as_deref()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .and_then(|t| u64::try_from(t.timestamp()).ok()),
                })
            }));
            match page.next_start_with {
                Some(s) => start = Some(s),
                None => return Ok(out),
            }
        }
        Err(crate::source::BucketError::Failed(format!(
            "listing {} did not end within {MAX_LIST_PAGES} pages",
            b.prefix
        )))
    }

    async fn read(
        &self,
        name: &str,
    ) -> Result<Option<(Bytes, String)>, crate::source::BucketError> {
        let r = match self.0.object_request("read", name, Method::GET, &[]).await {
            Ok((_, r)) => r,
            Err(e) if e.is_missing() => return Ok(None),
            Err(e) => return Err(Self::failed(e)),
        };
        let etag = header(&r, "etag").unwrap_or_default();
        let body = r
            .bytes()
            .await
            .map_err(|e| crate::source::BucketError::Failed(e.to_string()))?;
        Ok(Some((body, etag)))
    }

    async fn create(&self, name: &str, body: Bytes) -> Result<String, crate::source::BucketError> {
        self.put(name, body, Some(("if-none-match", "*".into())))
            .await
            .map_err(Self::failed)
    }

    async fn replace(
        &self,
        name: &str,
        body: Bytes,
        etag: &str,
    ) -> Result<String, crate::source::BucketError> {
        self.put(name, body, Some(("if-match", etag.to_string())))
            .await
            .map_err(Self::failed)
    }

    async fn write(&self, name: &str, body: Bytes) -> Result<(), crate::source::BucketError> {
        self.put(name, body, None)
            .await
            .map(drop)
            .map_err(Self::failed)
    }

    async fn delete(&self, name: &str) -> Result<(), crate::source::BucketError> {
        match self
            .0
            .object_request("delete", name, Method::DELETE, &[])
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_missing() => Ok(()),
            Err(e) => Err(Self::failed(e)),
        }
    }
}

/// A JSON answer read whole as `T` (`what` says what it should have been).
async fn json<T: serde::de::DeserializeOwned>(
    op: &'static str,
    key: &str,
    resp: Response,
    what: &str,
) -> Result<T, StoreError> {
    client::json(resp, what)
        .await
        .map_err(|e| StoreError::from_json(op, key, e))
}

/// A CRC32C from OCI's form (the manifest's: base64 of its big-endian bytes).
fn crc_from_b64(s: &str) -> Option<u32> {
    let b = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

#[async_trait::async_trait]
impl Backend for OciBackend {
    fn key(&self, name: &str) -> String {
        self.key_of(name)
    }

    fn object_url(&self, name: &str) -> String {
        format!("{}{}", self.base_url(), url_escape(&self.key_of(name)))
    }

    fn import_url(&self, name: &str) -> Result<String, String> {
        match self.namespace.get() {
            Some(_) => Ok(self.object_url(name)),
            None => Err("the bucket's namespace was never looked up".into()),
        }
    }

    fn server_check(&self) -> &'static str {
        "crc32c-per-part"
    }

    fn keeps_whole_crc32c(&self) -> bool {
        true
    }

    async fn begin(&self, name: &str) -> Result<String, StoreError> {
        let key = self.key_of(name);
        self.key_ok(&key)?;
        let path = format!(
            "/n/{}/b/{}/u",
            segment(self.ns().await?),
            segment(&self.bucket)
        );
        let body = serde_json::to_vec(&serde_json::json!({ "object": key }))
            .expect("a JSON object serializes");
        let r = self
            .send(
                "begin upload",
                &key,
                Method::POST,
                path,
                Payload::Json(body),
                &[("opc-checksum-algorithm", "CRC32C".into())],
            )
            .await?;
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Created {
            upload_id: String,
        }
        json::<Created>("begin upload", &key, r, "an upload with its uploadId")
            .await
            .map(|c| c.upload_id)
    }

    async fn put_part(
        &self,
        name: &str,
        upload_id: &str,
        part: &Part,
    ) -> Result<String, StoreError> {
        let key = self.key_of(name);
        let path = format!(
            "{}&uploadPartNum={}",
            self.upload_path(&key, upload_id).await?,
            part.index() + 1
        );
        let want = crate::manifest::crc_base64(part.crc32c());
        let r = self
            .send(
                "upload part",
                &key,
                Method::PUT,
                path,
                Payload::Object(part.bytes().clone()),
                &[("opc-content-crc32c", want.clone())],
            )
            .await?;
        // OCI checked the part against `want`; an answer naming another
        // CRC32C would mean the part stored is not the one sent.
        if let Some(got) = header(&r, "opc-content-crc32c")
            && got != want
        {
            return Err(StoreError::Check {
                op: "upload part",
                key,
                message: format!(
                    "part {} was stored with CRC32C {got}, sent with {want}",
                    part.index() + 1
                ),
            });
        }
        header(&r, "etag").ok_or_else(|| StoreError::Answer {
            op: "upload part",
            key,
            message: "the answer has no ETag".into(),
        })
    }

    async fn complete(
        &self,
        name: &str,
        upload_id: &str,
        receipts: &[PartReceipt],
    ) -> Result<Option<u32>, StoreError> {
        let key = self.key_of(name);
        let path = self.upload_path(&key, upload_id).await?;
        let parts: Vec<serde_json::Value> = receipts
            .iter()
            .map(|r| serde_json::json!({ "partNum": r.index + 1, "etag": r.part_id }))
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({ "partsToCommit": parts }))
            .expect("a JSON object serializes");
        let r = self
            .send(
                "complete upload",
                &key,
                Method::POST,
                path,
                Payload::Json(body),
                &[],
            )
            .await?;
        match header(&r, "opc-content-crc32c") {
            None => Ok(None),
            Some(v) => crc_from_b64(&v)
                .map(Some)
                .ok_or_else(|| StoreError::Answer {
                    op: "complete upload",
                    key,
                    message: format!("opc-content-crc32c {v:?} is not a base64 CRC32C"),
                }),
        }
    }

    async fn listed_parts(
        &self,
        name: &str,
        upload_id: &str,
    ) -> Result<Option<Vec<ListedPart>>, StoreError> {
        let key = self.key_of(name);
        let base = format!("{}&limit=1000", self.upload_path(&key, upload_id).await?);
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Listed {
            part_number: u32,
            etag: String,
            size: u64,
        }
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let path = match &page {
                Some(p) => format!("{base}&page={}", segment(p)),
                None => base.clone(),
            };
            let r = self
                .send("list parts", &key, Method::GET, path, Payload::None, &[])
                .await?;
            page = header(&r, "opc-next-page");
            let listed: Vec<Listed> = json("list parts", &key, r, "a list of parts").await?;
            out.extend(
                listed
                    .into_iter()
                    .filter(|p| p.part_number > 0)
                    .map(|p| ListedPart {
                        index: p.part_number - 1,
                        part_id: p.etag,
                        size_bytes: p.size,
                    }),
            );
            if page.is_none() {
                return Ok(Some(out));
            }
        }
        Err(StoreError::Answer {
            op: "list parts",
            key,
            message: format!("more than {MAX_PAGES} pages of parts"),
        })
    }

    async fn abort_key(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let path = self.upload_path(key, upload_id).await?;
        self.send(
            "abort upload",
            key,
            Method::DELETE,
            path,
            Payload::None,
            &[],
        )
        .await
        .map(drop)
    }

    async fn head(&self, name: &str) -> Result<ObjectInfo, StoreError> {
        let (key, r) = self.object_request("head", name, Method::HEAD, &[]).await?;
        let size = header(&r, "content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| StoreError::Answer {
                op: "head",
                key: key.clone(),
                message: "the answer has no Content-Length".into(),
            })?;
        // A multipart object's MD5 is OCI's composite "BASE64-N".
        let parts = header(&r, "opc-multipart-md5")
            .and_then(|m| m.rsplit_once('-').and_then(|(_, n)| n.parse().ok()));
        Ok(ObjectInfo {
            size_bytes: size,
            parts,
            crc32c: header(&r, "opc-content-crc32c").and_then(|v| crc_from_b64(&v)),
        })
    }

    /// In ranges of a part's size, each a request with a part's time limit
    /// (one GET of a whole large object would outlast it).
    async fn readback(&self, name: &str) -> Result<(u64, u32), StoreError> {
        let size = self.head(name).await?.size_bytes;
        let (mut crc, mut at) = (0u32, 0u64);
        // Bounded: at most size / range_bytes + 1 ranges.
        while at < size {
            let end = (at + self.range_bytes).min(size);
            let range = [("range", format!("bytes={at}-{}", end - 1))];
            let (key, r) = self
                .object_request("read back", name, Method::GET, &range)
                .await?;
            if r.status() != StatusCode::PARTIAL_CONTENT && !(at == 0 && end == size) {
                return Err(StoreError::Answer {
                    op: "read back",
                    key,
                    message: format!("a range request was answered {}", r.status()),
                });
            }
            let got = self
                .read_to_end("read back", &key, r, |c| {
                    crc = crate::crc::crc32c_append(crc, c)
                })
                .await?;
            if got != end - at {
                return Err(StoreError::Answer {
                    op: "read back",
                    key,
                    message: format!("bytes {at}-{} came back as {got} bytes", end - 1),
                });
            }
            at = end;
        }
        Ok((size, crc))
    }

    async fn put_small(&self, name: &str, body: Bytes) -> Result<(), StoreError> {
        let key = self.key_of(name);
        self.key_ok(&key)?;
        let path = self.path("o", &key).await?;
        let crc = crate::manifest::crc_base64(crate::crc::crc32c(&body));
        self.send(
            "write",
            &key,
            Method::PUT,
            path,
            Payload::Object(body),
            &[("opc-content-crc32c", crc)],
        )
        .await
        .map(drop)
    }

    async fn get_small(&self, name: &str) -> Result<Bytes, StoreError> {
        let (key, r) = self.object_request("read", name, Method::GET, &[]).await?;
        r.bytes().await.map_err(|source| StoreError::Http {
            op: "read",
            key,
            source,
        })
    }

    async fn probe(&self, _part_bytes: u64) -> Result<(), StoreError> {
        let path = format!(
            "/n/{}/b/{}/",
            segment(self.ns().await?),
            segment(&self.bucket)
        );
        self.send("probe", &self.bucket, Method::GET, path, Payload::None, &[])
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_in_ocis_form() {
        // CRC32C("123456789") = 0xe3069283, base64 of its big-endian bytes.
        assert_eq!(crate::manifest::crc_base64(0xe3069283), "4waSgw==");
        assert_eq!(crc_from_b64("4waSgw=="), Some(0xe3069283));
        assert_eq!(crc_from_b64("4waS"), None);
        assert_eq!(crc_from_b64("not base64"), None);
    }
}
