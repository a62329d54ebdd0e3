//! The import step: a verified object in an `oci://` destination becomes a
//! custom image in that destination's region (OCI Compute's CreateImage),
//! and ferry waits until the image is AVAILABLE.
//!
//! Promises:
//! - **One image per object, whatever happens.** Every CreateImage carries an
//!   `opc-retry-token` made from the verified upload (its object URL, CRC32C
//!   and the time it verified) and the destination. The token, the source
//!   (the pre-authenticated request) and the body are journaled *before* the
//!   create is sent, and the image OCID as soon as it is answered: after a
//!   crash the create is sent again with the same token and the same body,
//!   which OCI answers with the image it made the first time (for 24 hours),
//!   or ferry goes straight to waiting for the journaled image.
//! - **Nothing is imported without a basis for its launch mode**, nor what OCI
//!   does not import (only QCOW2, VMDK and `.oci`): refused before a request.
//! - **The wait ends.** GetImage is polled with backoff until AVAILABLE;
//!   DISABLED or DELETED is a failure with the work request's own error
//!   text; `timeout_minutes` after the journaled start it gives up, naming
//!   the image. The pre-authenticated request is deleted when the import
//!   ends either way (it is read access to the image).
//! - Each destination imports on its own: nothing here waits for another.
//!
//! The source is by default a read-only pre-authenticated request (PAR) on
//! the object: Oracle documents that CreateImage from a namespace, bucket and
//! object name fails for instance principals and federated users, while a PAR
//! works for every caller. `source = "tuple"` sends the names instead.
//!
//! Rooms: this file is one import (PAR, create, wait) and the manifest
//! written again once it ends; `command.rs` is `ferry import`.
//!
//! Design choice: the import is driven from the object's manifest, not from
//! the job that shipped it. The daemon hands over the manifest it just wrote
//! (or reads it back from the destination after a restart), and `ferry
//! import` reads it from a bucket or a file: one path for both, and an object
//! shipped months ago imports exactly as one shipped a second ago.

mod command;

pub use command::{Ended, ImportArgs, after_push, run_command};

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use reqwest::Method;
use serde::Deserialize;
use tracing::{info, warn};

use crate::config::{
    DestinationConfig, DestinationUrl, ImportConfig, ImportSource, TransferConfig,
};
use crate::error::Class;
use crate::journal::ImportRecord;
use crate::manifest::{self, ImportEntry, Manifest};
use crate::oci::client::{self, Client, Payload, segment};
use crate::shutdown::Shutdown;
use crate::store::{Destination, StoreError};

/// Compute's API version, the path every Core call starts with.
const CORE: &str = "/20160918";

/// The first pause between two GetImage polls; each next is 1.5 times the
/// last, up to [`POLL_MAX`].
const POLL_FIRST: Duration = Duration::from_secs(1);
const POLL_MAX: Duration = Duration::from_secs(30);

/// Work request errors read at most (one page of OCI's list).
const MAX_ERRORS: usize = 20;

/// Why an import did not end AVAILABLE.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A request to OCI failed: no answer, or an error answer.
    #[error("{0}")]
    Api(#[from] StoreError),
    /// The image ended DISABLED or DELETED.
    #[error("image {} ended {}: {}", .0.image_id.as_deref().unwrap_or("-"), .0.state, .0.error.as_deref().unwrap_or("OCI gave no reason"))]
    Ended(Box<ImportEntry>),
    /// It was still not AVAILABLE `timeout_minutes` after it began.
    #[error("{}", timed_out(.0))]
    TimedOut(Box<ImportEntry>),
    /// The import ended, but the manifest that says how could not be
    /// written.
    #[error("{} ended {}, but its manifest could not be written: {source}", .entry.image_id.as_deref().unwrap_or("the import"), .entry.state)]
    ManifestNotWritten {
        entry: Box<ImportEntry>,
        source: StoreError,
    },
    /// What the manifest says cannot be imported (or cannot be read as a
    /// manifest).
    #[error("{0}")]
    Refused(String),
    /// The import table or the destination cannot make an importer.
    #[error("{0}")]
    Setup(String),
    /// Where the import stands could not be journaled: nothing more is sent
    /// until it can be (a crash would lose the image's OCID).
    #[error("cannot journal the import ({0}); it continues at the next attempt")]
    Journal(String),
    #[error("stopped before the import ended")]
    Cancelled,
}

impl ImportError {
    /// A request's passing failure, a journal that refuses writes and a stop
    /// are [`Class::Retry`] (the import continues where it stands); what the
    /// manifest says is [`Class::Refuse`]; an image that ended badly, a
    /// timeout, and a request OCI will never accept are [`Class::Fatal`].
    pub fn class(&self) -> Class {
        match self {
            ImportError::Api(e) if e.retryable() => Class::Retry,
            ImportError::ManifestNotWritten { source, .. } if source.retryable() => Class::Retry,
            ImportError::Journal(_) | ImportError::Cancelled => Class::Retry,
            ImportError::Refused(_) => Class::Refuse,
            ImportError::Api(_)
            | ImportError::ManifestNotWritten { .. }
            | ImportError::Ended(_)
            | ImportError::TimedOut(_)
            | ImportError::Setup(_) => Class::Fatal,
        }
    }

    /// How the import ended, for the manifest, when it did end.
    pub fn entry(&self) -> Option<&ImportEntry> {
        match self {
            ImportError::Ended(e)
            | ImportError::TimedOut(e)
            | ImportError::ManifestNotWritten { entry: e, .. } => Some(e),
            _ => None,
        }
    }

    /// What the operator should do.
    pub fn advice(&self) -> &'static str {
        match self {
            ImportError::Ended(_) => {
                "The object verified, but OCI did not import it: read the work request's error above. Fix the image (or its sidecar), delete the failed image, and put the file back in the spool; or import the object again with `ferry import`."
            }
            ImportError::TimedOut(_) => {
                "OCI was still importing when ferry stopped waiting: look at the image in the console (it may still end AVAILABLE, though its pre-authenticated request was deleted), delete it if it did not, and import again with `ferry import`, or raise timeout_minutes."
            }
            ImportError::Refused(_) => {
                "Write what the reason asks in the image's sidecar (X.meta.json), then put the image and its sidecar back in the spool."
            }
            ImportError::ManifestNotWritten { .. } => {
                "The image is as the reason says, but the manifest beside the object does not name it: note its OCID, and check that ferry may still write to the bucket. Putting the file back in the spool ships it and imports it again, as a new image."
            }
            _ => {
                "Check the destination's import table, the profile's policies (manage instance-images, and manage buckets for PAR_MANAGE) and the compartment, then put the file back in the spool or run `ferry import` on the object."
            }
        }
    }
}

/// The words of [`ImportError::TimedOut`].
fn timed_out(e: &ImportEntry) -> String {
    let why = e
        .error
        .as_deref()
        .map(|w| format!(": {w}"))
        .unwrap_or_default();
    match &e.image_id {
        Some(id) => format!(
            "image {id} was still {} after {} minutes (timeout_minutes); ferry stopped waiting{why}",
            e.state,
            e.duration_secs.unwrap_or(0) / 60
        ),
        None => format!("no image was made before the import's timeout{why}"),
    }
}

/// What an import is doing now, for a progress line and `/status`.
#[derive(Debug, Clone, Default)]
pub struct ImportView {
    pub image_id: Option<String>,
    /// The image's lifecycle state, or what ferry is doing before there is
    /// an image ("making a pre-authenticated request", "creating").
    pub state: String,
    /// The work request's progress, when OCI says.
    pub percent: Option<f64>,
    pub elapsed: Duration,
}

/// Whoever keeps an import's state (the journal) and shows it.
pub trait Watch: Send + Sync {
    /// Keeps `record` durably before anything else is sent.
    fn keep(&self, record: &ImportRecord) -> Result<(), String>;
    /// Shows where the import stands.
    fn shown(&self, _view: &ImportView) {}
}

/// One destination's importer: its import table and the two signed clients
/// it needs (Compute's, and Object Storage's for the PAR).
pub struct Importer {
    destination: String,
    region: String,
    cfg: ImportConfig,
    compute: Client,
    storage: Client,
    bucket: String,
    namespace: Option<String>,
    /// Passing failures of one request tried again at most this often.
    max_retries: u32,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer")
            .field("destination", &self.destination)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Importer {
    /// The importer of destination `name` with `import` as its table (the
    /// destination's own, or one given on the command line); an oci://
    /// destination only.
    pub fn new(
        name: &str,
        dest: &DestinationConfig,
        import: &ImportConfig,
        transfer: &TransferConfig,
    ) -> Result<Importer, ImportError> {
        let setup = |m: String| ImportError::Setup(format!("import to {name} ({}): {m}", dest.url));
        import.check().map_err(setup)?;
        let bucket = match DestinationUrl::parse(&dest.url) {
            Ok(DestinationUrl::Oci { bucket, .. }) => bucket,
            _ => {
                return Err(setup(
                    "OCI imports custom images only from OCI Object Storage: the destination must be oci://BUCKET/PREFIX/".into(),
                ));
            }
        };
        let (account, region) = crate::store::oci_account(name, dest).map_err(setup)?;
        let limits = client::Limits {
            request: Duration::from_secs(60),
            connect: Duration::from_secs(transfer.connect_timeout_secs),
        };
        // A client of `service` in the region: at `endpoint`, else OCI's own.
        let client = |service: &str, endpoint: &Option<String>| {
            let default = format!("https://{service}.{region}.oraclecloud.com");
            let endpoint = endpoint.clone().unwrap_or_else(|| default.clone());
            let allow_http = crate::store::oci_allow_http(dest, &endpoint);
            Client::new(&account, &endpoint, &default, allow_http, limits)
        };
        let storage = client("objectstorage", &dest.endpoint).map_err(setup)?;
        let compute = client("iaas", &import.endpoint).map_err(|m| setup(format!("import.{m}")))?;
        Ok(Importer {
            destination: name.to_string(),
            region,
            cfg: import.clone(),
            compute,
            storage,
            bucket,
            namespace: dest.namespace.clone().filter(|n| !n.is_empty()),
            max_retries: transfer.max_retries,
        })
    }

    pub fn destination(&self) -> &str {
        &self.destination
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn config(&self) -> &ImportConfig {
        &self.cfg
    }

    /// A new record for the import of the object `m` describes; `salt`
    /// makes a token of its own for an import that must not be taken for
    /// an earlier one (each `ferry import` run).
    pub fn record(&self, m: &Manifest, salt: &str) -> ImportRecord {
        ImportRecord {
            retry_token: retry_token(&self.destination, m, salt),
            started_at: manifest::timestamp(SystemTime::now()),
            ..ImportRecord::default()
        }
    }

    /// The first half of an import, continuing from `rec` (a new record, or
    /// a journaled one): the source (a PAR) and the CreateImage, up to the
    /// image's OCID journaled. Does nothing when `rec` has an image already.
    /// A restart past the timeout ends in [`ImportError::TimedOut`]; other
    /// errors stop it where `rec` says it stands.
    pub async fn begin(
        &self,
        m: &Manifest,
        rec: &mut ImportRecord,
        watch: &dyn Watch,
        cancel: &Shutdown,
    ) -> Result<(), ImportError> {
        let facts = importable(m)?;
        let key = m.destination.key.as_str();
        let started = started_at(rec);
        let keep = |rec: &ImportRecord| watch.keep(rec).map_err(ImportError::Journal);
        let show = |state: &str| show(watch, started, state, None, None);
        keep(rec)?;
        if rec.image_id.is_some() {
            return Ok(());
        }
        // A restart after the timeout creates nothing: a CreateImage sent
        // before it may have made an image whose OCID never reached the
        // journal, and OCI keeps retry tokens for 24 hours only.
        if SystemTime::now() >= self.deadline(rec) {
            let why = if rec.body.is_some() {
                format!(
                    "CreateImage was sent, but its answer never reached the journal before ferry stopped; look for an image named {:?} in compartment {} and delete it if it is not wanted",
                    display_name_of(rec, m),
                    self.cfg.compartment_id
                )
            } else {
                "the import did not begin before its timeout (ferry was stopped)".into()
            };
            let entry = self.entry(m, rec, &facts, "none", Some(why), true);
            self.drop_par(rec, &keep, cancel).await;
            return Err(ImportError::TimedOut(Box::new(entry)));
        }
        if rec.body.is_none() {
            let ns = self.namespace(m, cancel).await?;
            let source = match self.cfg.source {
                ImportSource::Tuple => serde_json::json!({
                    "sourceType": "objectStorageTuple",
                    "namespaceName": ns,
                    "bucketName": self.bucket,
                    "objectName": key,
                }),
                ImportSource::Par => {
                    if rec.par_url.is_none() {
                        show("making a pre-authenticated request");
                        let (id, url) = self.make_par(&ns, key, &rec.retry_token, cancel).await?;
                        rec.par_id = Some(id);
                        rec.par_url = Some(url);
                        keep(rec)?;
                    }
                    serde_json::json!({
                        "sourceType": "objectStorageUri",
                        "sourceUri": rec.par_url.clone().unwrap_or_default(),
                    })
                }
            };
            rec.body = Some(self.body(m, &facts, source, started)?);
            keep(rec)?;
        }
        show("creating");
        let (image, work_request) = self.create(rec, cancel).await?;
        crate::failpoint::reached("image_created");
        info!(
            destination = self.destination.as_str(),
            "{}: CreateImage in {} answered image {} ({}), work request {}",
            m.file_name,
            self.region,
            image.id,
            image.lifecycle_state,
            work_request.as_deref().unwrap_or("-")
        );
        rec.image_id = Some(image.id);
        rec.work_request_id = work_request;
        rec.state = Some(image.lifecycle_state);
        keep(rec)
    }

    /// The second half of an import: the wait for the image of `rec`, and
    /// its end (the PAR deleted): `Ok` once AVAILABLE;
    /// [`ImportError::Ended`] or [`ImportError::TimedOut`] when it ended
    /// otherwise (both carry the entry for the manifest); other errors when
    /// it stopped before it ended.
    pub async fn finish(
        &self,
        m: &Manifest,
        rec: &mut ImportRecord,
        watch: &dyn Watch,
        cancel: &Shutdown,
    ) -> Result<ImportEntry, ImportError> {
        let facts = importable(m)?;
        let started = started_at(rec);
        let keep = |rec: &ImportRecord| watch.keep(rec).map_err(ImportError::Journal);
        let show = |state: &str, image_id: Option<&str>, percent: Option<f64>| {
            show(watch, started, state, image_id, percent)
        };
        let Some(image_id) = rec.image_id.clone() else {
            return Err(ImportError::Setup(
                "the import has no image to wait for".into(),
            ));
        };
        let deadline = self.deadline(rec);
        let (state, error) = self
            .wait(&image_id, rec, deadline, &show, &keep, cancel)
            .await?;
        let entry = self.entry(m, rec, &facts, &state, error, true);
        self.drop_par(rec, &keep, cancel).await;
        match entry.outcome.as_str() {
            "available" => Ok(entry),
            "failed" => Err(ImportError::Ended(Box::new(entry))),
            _ => Err(ImportError::TimedOut(Box::new(entry))),
        }
    }

    /// When the import of `rec` gives up waiting.
    fn deadline(&self, rec: &ImportRecord) -> SystemTime {
        started_at(rec) + Duration::from_secs(self.cfg.timeout_minutes * 60)
    }

    /// The manifest's entry of the import of `rec`, in `state`: ended, or
    /// still running (`ended` false).
    fn entry(
        &self,
        m: &Manifest,
        rec: &ImportRecord,
        facts: &Facts<'_>,
        state: &str,
        error: Option<String>,
        ended: bool,
    ) -> ImportEntry {
        let started = started_at(rec);
        ImportEntry {
            image_id: rec.image_id.clone(),
            state: state.to_string(),
            outcome: match state {
                _ if !ended => "importing",
                "AVAILABLE" => "available",
                "DISABLED" | "DELETED" => "failed",
                _ => "timed_out",
            }
            .into(),
            region: self.region.clone(),
            compartment_id: self.cfg.compartment_id.clone(),
            display_name: display_name_of(rec, m),
            source: self.cfg.source.as_str().into(),
            launch_mode: facts.launch_mode.to_string(),
            work_request_id: rec.work_request_id.clone(),
            started_at: rec.started_at.clone(),
            finished_at: ended.then(|| manifest::timestamp(SystemTime::now())),
            duration_secs: ended.then(|| started.elapsed().unwrap_or_default().as_secs()),
            error: error.map(|e| without_par(&e)),
        }
    }

    /// Deletes the pre-authenticated request of an import that will not go
    /// on (its job ended some other way, or its file is gone).
    pub async fn abandon(&self, rec: &ImportRecord) {
        let mut rec = rec.clone();
        self.drop_par(&mut rec, &|_| Ok(()), &Shutdown::never())
            .await;
    }

    /// The namespace: configured, else the one in the object's URL (the
    /// manifest's), else asked of Object Storage.
    async fn namespace(&self, m: &Manifest, cancel: &Shutdown) -> Result<String, ImportError> {
        if let Some(ns) = &self.namespace {
            return Ok(ns.clone());
        }
        if let Some(ns) = namespace_in(&m.destination.object_url) {
            return Ok(ns);
        }
        let resp = self
            .request(cancel, "look up namespace", "/n/", || {
                self.storage.send(Method::GET, "/n/", Payload::None, &[])
            })
            .await?;
        client::json::<String>(resp, "a JSON string")
            .await
            .map_err(|e| StoreError::from_json("look up namespace", "/n/", e).into())
    }

    /// A read-only PAR on the object: its id and its URL.
    async fn make_par(
        &self,
        ns: &str,
        key: &str,
        token: &str,
        cancel: &Shutdown,
    ) -> Result<(String, String), ImportError> {
        let expires = SystemTime::now() + Duration::from_secs(self.cfg.par_expiry_hours * 3600);
        let body = serde_json::json!({
            // Named after the import, so that a PAR left by a crash is
            // found (`oci os preauth-request list`) and known.
            "name": format!("ferry-import-{}", token.trim_start_matches("ferry-")),
            "accessType": "ObjectRead",
            "objectName": key,
            "timeExpires": humantime::format_rfc3339_seconds(expires).to_string(),
        });
        let path = format!("/n/{}/b/{}/p/", segment(ns), segment(&self.bucket));
        let bytes = serde_json::to_vec(&body).expect("a JSON object serializes");
        let resp = self
            .request(cancel, "create pre-authenticated request", key, || {
                self.storage
                    .send(Method::POST, &path, Payload::Json(bytes.clone()), &[])
            })
            .await?;
        // Read without quoting the answer in an error: it holds the PAR's
        // token, read access to the image.
        let text = resp.text().await.map_err(|source| StoreError::Http {
            op: "create pre-authenticated request",
            key: key.to_string(),
            source,
        })?;
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let field = |f: &str| doc[f].as_str().map(str::to_string);
        let (Some(id), Some(access_uri)) = (field("id"), field("accessUri")) else {
            if let Some(id) = field("id") {
                self.delete_par(ns, &id, cancel).await;
            }
            return Err(StoreError::Answer {
                op: "create pre-authenticated request",
                key: key.to_string(),
                message: "the answer is not a PreauthenticatedRequest with an id and an accessUri (its text is not shown: it may hold the request's token)".into(),
            }
            .into());
        };
        // fullPath is the whole URL where OCI gives it; else the endpoint
        // and the accessUri, as Oracle's documentation builds it.
        let url = match field("fullPath") {
            Some(p) if p.starts_with("https://") || p.starts_with("http://") => p,
            _ => format!("{}{access_uri}", self.storage.endpoint()),
        };
        Ok((id, url))
    }

    /// Deletes the import's PAR, if it has one; a failure is said and left
    /// (the PAR ends at its expiry anyway).
    async fn drop_par(
        &self,
        rec: &mut ImportRecord,
        keep: &(dyn Fn(&ImportRecord) -> Result<(), ImportError> + Sync),
        cancel: &Shutdown,
    ) {
        let Some(id) = rec.par_id.clone() else { return };
        let ns = rec
            .par_url
            .as_deref()
            .and_then(namespace_in)
            .or_else(|| self.namespace.clone())
            .unwrap_or_default();
        if self.delete_par(&ns, &id, cancel).await {
            rec.par_id = None;
            rec.par_url = None;
            if let Err(e) = keep(rec) {
                warn!(destination = self.destination.as_str(), "{e}");
            }
        }
    }

    /// Deletes PAR `id` of the bucket in namespace `ns`; whether it is gone
    /// (a failure is said in the log).
    async fn delete_par(&self, ns: &str, id: &str, cancel: &Shutdown) -> bool {
        let path = format!(
            "/n/{}/b/{}/p/{}",
            segment(ns),
            segment(&self.bucket),
            segment(id)
        );
        let r = self
            .request(cancel, "delete pre-authenticated request", id, || {
                self.storage.send(Method::DELETE, &path, Payload::None, &[])
            })
            .await;
        match r {
            Ok(_) => true,
            Err(ImportError::Api(StoreError::Oci { answer, .. })) if answer.status == 404 => true,
            Err(e) => {
                warn!(
                    destination = self.destination.as_str(),
                    "could not delete the pre-authenticated request {id} of bucket {} ({e}); it ends at its expiry, or delete it: oci os preauth-request delete --bucket-name {} --par-id {id}",
                    self.bucket,
                    self.bucket
                );
                false
            }
        }
    }

    /// The CreateImage body: what the manifest says of the image, the table's
    /// compartment, name and tags, and ferry's own tags.
    fn body(
        &self,
        m: &Manifest,
        facts: &Facts<'_>,
        source: serde_json::Value,
        started: SystemTime,
    ) -> Result<serde_json::Value, ImportError> {
        let stem = std::path::Path::new(&m.file_name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| m.file_name.clone());
        let date = humantime::format_rfc3339_seconds(started).to_string();
        let name = crate::config::display_name(&self.cfg.display_name, |f| match f {
            "stem" => stem.clone(),
            "name" => m.file_name.clone(),
            "date" => date[..10].to_string(),
            _ => m.crc32c.clone(),
        })
        .map_err(ImportError::Setup)?;
        // OCI takes 1 to 255 characters.
        let mut name: String = name.chars().take(255).collect();
        if name.trim().is_empty() {
            name = stem;
        }
        let mut body = crate::image::create_image_body(
            &crate::image::ImportFacts {
                format: facts.format,
                launch_mode: Some(facts.launch_mode),
                os: m.image_field("os"),
                os_version: m.image_field("os_version"),
            },
            source,
            &self.cfg.compartment_id,
            &name,
        );
        let mut tags: BTreeMap<String, String> = self.cfg.freeform_tags.clone();
        tags.insert("ferry-crc32c".into(), m.crc32c.clone());
        tags.insert(
            "ferry-source-host".into(),
            m.source_host.chars().take(256).collect(),
        );
        body["freeformTags"] = serde_json::to_value(tags).unwrap_or_default();
        Ok(body)
    }

    /// CreateImage with the record's token and body: the image and the
    /// work request's id.
    async fn create(
        &self,
        rec: &ImportRecord,
        cancel: &Shutdown,
    ) -> Result<(Image, Option<String>), ImportError> {
        let bytes = serde_json::to_vec(rec.body.as_ref().unwrap_or(&serde_json::Value::Null))
            .expect("a JSON value serializes");
        let path = format!("{CORE}/images");
        let extra = [("opc-retry-token", rec.retry_token.clone())];
        let resp = self
            .request(cancel, "create image", &self.cfg.compartment_id, || {
                self.compute
                    .send(Method::POST, &path, Payload::Json(bytes.clone()), &extra)
            })
            .await?;
        let work_request = client::header(&resp, "opc-work-request-id");
        let image: Image = client::json(resp, "an Image")
            .await
            .map_err(|e| StoreError::from_json("create image", &self.cfg.compartment_id, e))?;
        Ok((image, work_request))
    }

    /// Polls the image until it ends or `deadline`: its last state, and the
    /// work request's errors when it did not end AVAILABLE.
    async fn wait(
        &self,
        image_id: &str,
        rec: &mut ImportRecord,
        deadline: SystemTime,
        show: Show<'_>,
        keep: &(dyn Fn(&ImportRecord) -> Result<(), ImportError> + Sync),
        cancel: &Shutdown,
    ) -> Result<(String, Option<String>), ImportError> {
        let path = format!("{CORE}/images/{}", segment(image_id));
        let mut pause = POLL_FIRST;
        // OCI's trouble while the image imports (no answer, 5xx, 429) is
        // waited out up to the import's own deadline: the import goes on
        // in OCI meanwhile, and giving up on it would leave an image behind.
        let mut failing: Option<String> = None;
        // Bounded by the deadline: every turn sleeps until the next poll,
        // never past the deadline, and the turn after the deadline ends.
        loop {
            let polled = tokio::select! {
                _ = cancel.requested() => return Err(ImportError::Cancelled),
                r = self.compute.send(Method::GET, &path, Payload::None, &[]) => r,
            };
            let image = match polled {
                Ok(resp) => client::json::<Image>(resp, "an Image")
                    .await
                    .map_err(|e| StoreError::from_json("get image", image_id, e)),
                Err(f) => Err(StoreError::from_oci("get image", image_id, f)),
            };
            let state = match image {
                Ok(image) => {
                    if let Some(e) = failing.take() {
                        info!(
                            destination = self.destination.as_str(),
                            "GetImage of {image_id} answers again (it failed with: {e})"
                        );
                    }
                    image.lifecycle_state
                }
                Err(e) if e.retryable() => {
                    let e = redacted(e).to_string();
                    if failing.is_none() {
                        warn!(
                            destination = self.destination.as_str(),
                            "{e}; polling on until the import's timeout"
                        );
                    }
                    failing = Some(e);
                    rec.state.clone().unwrap_or_else(|| "IMPORTING".into())
                }
                Err(e) => return Err(self.advised(redacted(e)).into()),
            };
            if failing.is_none() {
                if rec.state.as_deref() != Some(state.as_str()) {
                    rec.state = Some(state.clone());
                    keep(rec)?;
                }
                match state.as_str() {
                    "AVAILABLE" => {
                        show(&state, Some(image_id), Some(100.0));
                        return Ok((state, None));
                    }
                    "DISABLED" | "DELETED" => {
                        show(&state, Some(image_id), None);
                        let why = self.work_request_errors(rec, cancel).await;
                        return Ok((state, Some(why)));
                    }
                    _ => {}
                }
                let percent = self.percent(rec, cancel).await;
                show(&state, Some(image_id), percent);
            }
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if left.is_zero() {
                let why = failing.map(|e| format!("GetImage failed at the end: {e}"));
                return Ok((state, why));
            }
            tokio::select! {
                _ = cancel.requested() => return Err(ImportError::Cancelled),
                _ = tokio::time::sleep(pause.min(left)) => {}
            }
            pause = (pause.mul_f64(1.5)).min(POLL_MAX);
        }
    }

    /// The work request's progress, if it has one and OCI answers.
    async fn percent(&self, rec: &ImportRecord, cancel: &Shutdown) -> Option<f64> {
        let id = rec.work_request_id.as_deref()?;
        let path = format!("{CORE}/workRequests/{}", segment(id));
        let resp = tokio::select! {
            _ = cancel.requested() => return None,
            r = self.compute.send(Method::GET, &path, Payload::None, &[]) => r.ok()?,
        };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct WorkRequest {
            percent_complete: Option<f64>,
        }
        client::json::<WorkRequest>(resp, "a WorkRequest")
            .await
            .ok()?
            .percent_complete
    }

    /// The work request's errors in one line, or why there are none to tell.
    async fn work_request_errors(&self, rec: &ImportRecord, cancel: &Shutdown) -> String {
        let Some(id) = rec.work_request_id.as_deref() else {
            return "OCI gave no work request to ask why".into();
        };
        let path = format!("{CORE}/workRequests/{}/errors", segment(id));
        let resp = self
            .request(cancel, "list work request errors", id, || {
                self.compute.send(Method::GET, &path, Payload::None, &[])
            })
            .await;
        #[derive(Deserialize)]
        struct WorkRequestError {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        let errors = match resp {
            Ok(r) => client::json::<Vec<WorkRequestError>>(r, "a list of work request errors")
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match errors {
            Ok(list) if list.is_empty() => {
                format!("work request {id} lists no errors")
            }
            Ok(list) => list
                .iter()
                .take(MAX_ERRORS)
                .map(|e| format!("{} ({})", e.message.trim(), e.code))
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => format!("the errors of work request {id} could not be read: {e}"),
        }
    }

    /// One request, tried again while it fails for a passing reason
    /// ([`Importer::retrying`]); an answer it gets for good is advised.
    async fn request<F, Fut>(
        &self,
        cancel: &Shutdown,
        op: &'static str,
        key: &str,
        send: F,
    ) -> Result<reqwest::Response, ImportError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<reqwest::Response, client::Failure>>,
    {
        let once = || async {
            send()
                .await
                .map_err(|f| redacted(StoreError::from_oci(op, key, f)))
        };
        self.retrying(cancel, once).await.map_err(|e| match e {
            ImportError::Api(e) => self.advised(e).into(),
            other => other,
        })
    }

    /// `once`, tried again after a pause (doubling from 500 ms, at most
    /// [`POLL_MAX`]) while it fails for a passing reason, at most
    /// `max_retries` times; a stop ends the wait at once.
    async fn retrying<T, F, Fut>(&self, cancel: &Shutdown, once: F) -> Result<T, ImportError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut pause = Duration::from_millis(500);
        let mut attempt = 0u32;
        // Bounded: at most max_retries + 1 attempts.
        loop {
            let e = tokio::select! {
                _ = cancel.requested() => return Err(ImportError::Cancelled),
                r = once() => match r {
                    Ok(v) => return Ok(v),
                    Err(e) => e,
                },
            };
            if !e.retryable() || attempt >= self.max_retries {
                return Err(ImportError::Api(e));
            }
            attempt += 1;
            warn!(
                destination = self.destination.as_str(),
                "{e}; trying again in {} ms ({attempt} of {})",
                pause.as_millis(),
                self.max_retries
            );
            tokio::select! {
                _ = cancel.requested() => return Err(ImportError::Cancelled),
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// What to do about an answer the import gets for good.
    fn advised(&self, mut e: StoreError) -> StoreError {
        if let StoreError::Oci { answer, .. } = &mut e
            && answer.advice.is_none()
        {
            answer.advice = match answer.status {
                403 | 404 => Some(format!(
                    "the user of {} may not do this, or it does not exist: importing needs `manage instance-images` in compartment {} and, for the pre-authenticated request, `manage buckets` with PAR_MANAGE on bucket {} (OCI answers a missing PAR_MANAGE with 404 BucketNotFound) in region {}",
                    self.compute.who(),
                    self.cfg.compartment_id,
                    self.bucket,
                    self.region
                )),
                400 => Some(format!(
                    "OCI refused the import request of destination {}: check its import table (compartment_id {}) and what the message names",
                    self.destination, self.cfg.compartment_id
                )),
                _ => None,
            };
        }
        e
    }
}

/// When the import of `rec` began (now, for a record without a readable time).
fn started_at(rec: &ImportRecord) -> SystemTime {
    humantime::parse_rfc3339_weak(&rec.started_at)
        .or_else(|_| humantime::parse_rfc3339(&rec.started_at))
        .unwrap_or_else(|_| SystemTime::now())
}

/// Tells `watch` where an import begun at `started` stands.
fn show(
    watch: &dyn Watch,
    started: SystemTime,
    state: &str,
    image_id: Option<&str>,
    percent: Option<f64>,
) {
    watch.shown(&ImportView {
        image_id: image_id.map(str::to_string),
        state: state.to_string(),
        percent,
        elapsed: started.elapsed().unwrap_or_default(),
    })
}

/// The image's name: as sent, else as an earlier run's manifest entry says.
fn display_name_of(rec: &ImportRecord, m: &Manifest) -> String {
    rec.body
        .as_ref()
        .and_then(|b| b["displayName"].as_str())
        .map(str::to_string)
        .or_else(|| m.import.as_ref().map(|i| i.display_name.clone()))
        .unwrap_or_default()
}

/// `text` with the token of any pre-authenticated request URL in it
/// (`/p/TOKEN/`) replaced: a PAR URL is read access to the image, and OCI's
/// words (an error, a work request's message) might quote the source.
pub fn without_par(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // Bounded: each turn consumes the text up to and past one "/p/".
    while let Some(at) = rest.find("/p/") {
        out.push_str(&rest[..at + 3]);
        let after = &rest[at + 3..];
        let end = after.find(['/', ' ', '"', '\'']).unwrap_or(after.len());
        if end > 0 {
            out.push('…');
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// A request's error with OCI's message freed of any PAR token.
fn redacted(mut e: StoreError) -> StoreError {
    if let StoreError::Oci { answer, .. } = &mut e {
        answer.message = without_par(&answer.message);
    }
    e
}

/// Shows a state, an image OCID and a percentage.
type Show<'a> = &'a (dyn Fn(&str, Option<&str>, Option<f64>) + Sync);

/// An image as GetImage and CreateImage answer it (the fields ferry reads).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Image {
    id: String,
    lifecycle_state: String,
}

/// What the manifest says that CreateImage needs, checked.
#[derive(Debug, Clone, Copy)]
struct Facts<'a> {
    format: &'a str,
    launch_mode: &'a str,
}

/// The format and launch mode of the object `m` describes, or why OCI must
/// not be asked to import it.
fn importable(m: &Manifest) -> Result<Facts<'_>, ImportError> {
    let format = m.image_field("format").unwrap_or("unknown");
    if !crate::image::importable(format) {
        return Err(ImportError::Refused(format!(
            "{} is {}: OCI imports only QCOW2, VMDK (monolithicSparse or streamOptimized) and .oci exports",
            m.file_name,
            m.image_field("format_name").unwrap_or(format)
        )));
    }
    let launch_mode = match (
        m.image_field("launch_mode"),
        m.image_field("launch_mode_basis"),
    ) {
        (Some(mode), Some(basis)) if basis != "none" && mode != "UNKNOWN" => mode,
        _ => {
            return Err(ImportError::Refused(crate::image::no_launch_mode(
                &m.file_name,
            )));
        }
    };
    Ok(Facts {
        format,
        launch_mode,
    })
}

/// The namespace in an Object Storage URL (`.../n/NS/b/...`, a PAR's too).
fn namespace_in(url: &str) -> Option<String> {
    let rest = &url[url.find("/n/")? + 3..];
    let ns = &rest[..rest.find('/')?];
    let ns = percent_encoding::percent_decode_str(ns)
        .decode_utf8()
        .ok()?
        .into_owned();
    (!ns.is_empty() && ns != "-").then_some(ns)
}

/// `ferry-` and 52 hex digits of the SHA-256 of the verified upload (its
/// object URL, CRC32C and when it verified), the destination and `salt`:
/// 58 characters, within OCI's 64.
fn retry_token(destination: &str, m: &Manifest, salt: &str) -> String {
    let text = format!(
        "{destination}\n{}\n{}\n{}\n{salt}",
        m.destination.object_url, m.crc32c, m.finished_at
    );
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("ferry-{}", &hex[..52])
}

/// How [`import_object`] ended: the manifest as written again (when the
/// import ended, well or not), and whether it ended AVAILABLE.
#[derive(Debug)]
pub struct ImportOutcome {
    pub manifest: Option<Manifest>,
    pub result: Result<(), ImportError>,
}

/// Imports the object of `m` at `dest`. Once the image exists, its manifest
/// says so (`outcome: importing`, with the OCID), so that a `ferry import`
/// waits for that image rather than make another; once the import ended,
/// well or not, the manifest says how.
pub async fn import_object(
    dest: &Destination,
    importer: &Importer,
    mut m: Manifest,
    rec: &mut ImportRecord,
    watch: &dyn Watch,
    cancel: &Shutdown,
) -> ImportOutcome {
    if let Err(e) = importer.begin(&m, rec, watch, cancel).await {
        let Some(entry) = e.entry().cloned() else {
            return ImportOutcome {
                manifest: None,
                result: Err(e),
            };
        };
        return ended(dest, importer, m, entry, Err(e), rec, watch, cancel).await;
    }
    let running = m.import.as_ref().is_some_and(|i| {
        i.outcome == "importing" && i.image_id.is_some() && i.image_id == rec.image_id
    });
    if !running && let Ok(facts) = importable(&m) {
        let state = rec.state.clone().unwrap_or_else(|| "IMPORTING".into());
        let mut shown = m.clone();
        shown.import = Some(importer.entry(&m, rec, &facts, &state, None, false));
        // Only a help to a later `ferry import`: a failure is said, no more.
        if let Err(e) = write_manifest(dest, importer, &shown, cancel).await {
            warn!(
                destination = dest.name(),
                "could not write the manifest of {} with its image's OCID ({e}); the import goes on",
                m.file_name
            );
        } else {
            m = shown;
        }
    }
    let result = importer.finish(&m, rec, watch, cancel).await;
    let entry = match &result {
        Ok(entry) => entry.clone(),
        Err(e) => match e.entry() {
            Some(entry) => entry.clone(),
            None => {
                return ImportOutcome {
                    manifest: None,
                    result: result.map(drop),
                };
            }
        },
    };
    ended(
        dest,
        importer,
        m,
        entry,
        result.map(drop),
        rec,
        watch,
        cancel,
    )
    .await
}

/// An import ended (well or not): the manifest written with `entry`, and
/// the record marked done once it ended well and the manifest says so.
#[allow(clippy::too_many_arguments)]
async fn ended(
    dest: &Destination,
    importer: &Importer,
    mut m: Manifest,
    entry: ImportEntry,
    result: Result<(), ImportError>,
    rec: &mut ImportRecord,
    watch: &dyn Watch,
    cancel: &Shutdown,
) -> ImportOutcome {
    m.import = Some(entry.clone());
    m.manifest_version = manifest::FORMAT_VERSION;
    if let Err(e) = write_manifest(dest, importer, &m, cancel).await {
        let result = match e {
            ImportError::Api(source) => Err(ImportError::ManifestNotWritten {
                entry: Box::new(entry),
                source,
            }),
            other => Err(other),
        };
        return ImportOutcome {
            manifest: None,
            result,
        };
    }
    let result = match result {
        Ok(()) => {
            rec.done = true;
            watch.keep(rec).map_err(ImportError::Journal)
        }
        Err(e) => Err(e),
    };
    ImportOutcome {
        manifest: Some(m),
        result,
    }
}

/// Writes the manifest `m` beside its object, trying again while that
/// fails for a passing reason.
async fn write_manifest(
    dest: &Destination,
    importer: &Importer,
    m: &Manifest,
    cancel: &Shutdown,
) -> Result<(), ImportError> {
    let body = bytes::Bytes::from(m.to_json());
    let mname = format!("{}{}", m.file_name, manifest::MANIFEST_SUFFIX);
    importer
        .retrying(cancel, || dest.put_small(&mname, body.clone()))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_tokens_are_within_ocis_limit_and_differ_by_upload_and_salt() {
        let m = Manifest::example();
        let t = retry_token("ashburn", &m, "");
        assert_eq!(t.len(), 58);
        assert!(t.starts_with("ferry-"));
        assert_eq!(
            t,
            retry_token("ashburn", &m, ""),
            "the same upload, the same token"
        );
        assert_ne!(t, retry_token("phoenix", &m, ""));
        assert_ne!(t, retry_token("ashburn", &m, "run 2"));
        let mut again = m.clone();
        again.finished_at = "2026-12-08T10:01:00.000Z".into();
        assert_ne!(
            t,
            retry_token("ashburn", &again, ""),
            "another upload of the same file"
        );
    }

    #[test]
    fn only_importable_images_with_a_launch_mode_basis_are_imported() {
        let m = Manifest::example();
        let f = importable(&m).unwrap();
        assert_eq!((f.format, f.launch_mode), ("qcow2", "PARAVIRTUALIZED"));

        let mut none = m.clone();
        none.image["image"]["launch_mode_basis"] = "none".into();
        none.image["image"]["launch_mode"] = "UNKNOWN".into();
        let ImportError::Refused(why) = importable(&none).unwrap_err() else {
            panic!("a refusal")
        };
        assert!(
            why.contains("web01.qcow2.meta.json") && why.contains("\"launch_mode\""),
            "{why}"
        );

        let mut raw = m.clone();
        raw.image["image"]["format"] = "raw".into();
        raw.image["image"]["format_name"] = "raw".into();
        let e = importable(&raw).unwrap_err();
        assert_eq!(e.class(), Class::Refuse);
        assert!(e.to_string().contains("OCI imports only QCOW2"), "{e}");
    }

    #[test]
    fn namespaces_are_read_from_object_and_par_urls() {
        assert_eq!(
            namespace_in(
                "https://objectstorage.us-ashburn-1.oraclecloud.com/n/ns1/b/images/o/a.qcow2"
            )
            .as_deref(),
            Some("ns1")
        );
        assert_eq!(
            namespace_in("http://127.0.0.1:9/p/tok/n/my%20ns/b/b/o/x").as_deref(),
            Some("my ns")
        );
        assert_eq!(namespace_in("https://host/n/-/b/images/o/x"), None);
        assert_eq!(namespace_in("file:///var/x"), None);
    }
}
