//! The configuration: one TOML file, parsed with serde, checked before anything runs.
//!
//! Promises: every key has a default that works on a laptop (the shipped
//! `config/ferry.toml` is compiled in and is the default), and an unknown key is an
//! error naming the key, so a typo never silently falls back to a default.
//!
//! Design choice: the shipped file *is* the embedded default (`include_str!`), so the
//! documented file and the behaviour without `--config` can never drift apart.
//! This module imports no other module of ferry but `bandwidth`, whose
//! timetables it reads: everything reads the configuration, the
//! configuration reads nothing else (destination URLs are parsed here for
//! that reason).

use crate::bandwidth::Schedule;
use crate::error::Class;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use serde::Deserialize;

/// The annotated default configuration shipped in `config/ferry.toml`.
pub const EMBEDDED: &str = include_str!("../config/ferry.toml");

/// Errors while loading or checking a configuration. All of them are fatal: ferry
/// does not start on a configuration it does not understand.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config {origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl ConfigError {
    /// [`Class::Fatal`]: the configuration must be fixed; a reload keeps the
    /// running one.
    pub fn class(&self) -> Class {
        Class::Fatal
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub spool_dir: PathBuf,
    pub state_dir: PathBuf,
    pub metrics_addr: SocketAddr,
    pub daemon: DaemonConfig,
    pub policy: PolicyConfig,
    pub transfer: TransferConfig,
    pub destinations: BTreeMap<String, DestinationConfig>,
    pub sources: BTreeMap<String, SourceConfig>,
}

/// `[sources.NAME]`: a bucket (and prefix) that images are shipped from, and
/// how to reach it. `ferry push s3://...` or `oci://...` takes the store
/// settings of the table whose URL holds the object.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// s3://BUCKET/PREFIX/ or oci://BUCKET/PREFIX/.
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials: Option<Credentials>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub allow_http: Option<bool>,
    /// As a destination's `ca_file`.
    pub ca_file: Option<PathBuf>,
    /// Ranges read at once (default `transfer.parallel_parts`).
    pub parallel_reads: Option<usize>,
    pub namespace: Option<String>,
    pub profile: Option<String>,
    pub config_file: Option<PathBuf>,
    /// The daemon lists the prefix this often.
    #[serde(default = "default_poll_secs")]
    pub poll_secs: u64,
    /// What becomes of an object once every destination verified it.
    #[serde(default)]
    pub on_success: SourceOnSuccess,
    /// How long a claim holds without renewal (renewed every third of it).
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// An object (or its sidecar) written less than this long ago waits.
    #[serde(default = "default_source_settle_secs")]
    pub settle_secs: u64,
}

fn default_source_settle_secs() -> u64 {
    30
}

fn default_poll_secs() -> u64 {
    30
}

fn default_lease_secs() -> u64 {
    300
}

/// What becomes of a bucket source's object once every destination
/// verified it (its done marker is written in either case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceOnSuccess {
    #[default]
    Keep,
    /// Delete it and its sidecar.
    Delete,
}

impl SourceConfig {
    /// The store settings, in the form the stores take.
    pub fn store(&self) -> DestinationConfig {
        DestinationConfig {
            url: self.url.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            credentials: self.credentials,
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            allow_http: self.allow_http,
            ca_file: self.ca_file.clone(),
            parallel_parts: self.parallel_reads,
            bandwidth_limit: None,
            namespace: self.namespace.clone(),
            profile: self.profile.clone(),
            config_file: self.config_file.clone(),
            import: None,
        }
    }
}

impl Config {
    /// The store settings for the object at `url`: those of the
    /// `[sources.NAME]` table whose URL holds it (the longest), else of a
    /// destination in the same bucket, else none but the URL's (the
    /// environment's, as for `--to URL`).
    pub fn source_store(&self, url: &str) -> DestinationConfig {
        let holds = |base: &str| url.starts_with(base);
        if let Some(s) = self
            .sources
            .values()
            .filter(|s| holds(&s.url))
            .max_by_key(|s| s.url.len())
        {
            return s.store();
        }
        let bucket = |u: &str| {
            let (scheme, rest) = u.split_once("://")?;
            Some((scheme.to_string(), rest.split('/').next()?.to_string()))
        };
        if let Some(d) = self
            .destinations
            .values()
            .find(|d| bucket(&d.url).is_some() && bucket(&d.url) == bucket(url))
        {
            return DestinationConfig {
                import: None,
                parallel_parts: None,
                ..d.clone()
            };
        }
        DestinationConfig::default()
    }
}

/// What happens to a spool file once every destination verified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnSuccess {
    /// Remove it from the spool.
    Delete,
    /// Move it to `spool/.ferry/done/`.
    #[default]
    Move,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// A file that arrived without a rename or a `.ready` marker is taken once
    /// its size and mtime have been still this long.
    pub settle_secs: u64,
    /// Full rescan of the spool, whatever inotify says.
    pub rescan_secs: u64,
    /// Images in flight at once (all share `transfer.memory_limit`).
    pub max_jobs: usize,
    pub on_success: OnSuccess,
    /// After SIGTERM/SIGINT, in-flight parts may finish for this long.
    pub shutdown_timeout_secs: u64,
    /// Conversions (`policy.convert`) run at once, at most.
    pub max_conversions: usize,
    /// Keep an image's pages in the page cache after reading them; by
    /// default each part's pages are released once it is read.
    pub keep_cache: bool,
    /// The I/O scheduling class of ferry's reads (and of its qemu-img).
    pub io_priority: IoPriority,
}

/// The I/O scheduling class ferry runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoPriority {
    /// As the process was started (best effort, or what systemd's
    /// `IOSchedulingClass=` says).
    #[default]
    Normal,
    /// The idle class: the disk serves ferry only when nothing else asks.
    Idle,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            settle_secs: 30,
            rescan_secs: 60,
            max_jobs: 2,
            on_success: OnSuccess::Move,
            shutdown_timeout_secs: 30,
            max_conversions: 1,
            keep_cache: false,
            io_priority: IoPriority::Normal,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            spool_dir: PathBuf::from("./spool"),
            state_dir: PathBuf::from("./var/state"),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9465)),
            daemon: DaemonConfig::default(),
            policy: PolicyConfig::default(),
            transfer: TransferConfig::default(),
            destinations: BTreeMap::new(),
            sources: BTreeMap::new(),
        }
    }
}

/// What is refused before a byte is sent (see `image`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Refuse images OCI cannot import. `false` ships them anyway, with the
    /// verdict and reasons in the manifest (for raw backups, or tests).
    pub refuse: bool,
    pub max_virtual_size: ByteSize,
    pub allow_extended_l2: bool,
    /// Unset: on for the daemon, off for `ferry push`.
    pub require_license_attestation: Option<bool>,
    /// Convert what OCI cannot import (raw, VHD, VHDX, VDI, QED, an OVA's
    /// disk) into QCOW2 with qemu-img, and ship the QCOW2.
    pub convert: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            refuse: true,
            max_virtual_size: ByteSize::gib(400),
            allow_extended_l2: false,
            require_license_attestation: None,
            convert: false,
        }
    }
}

/// How a finished object is checked before it is reported verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// Size and part count from the store's metadata; each part was checked on arrival.
    #[default]
    Head,
    /// Read the whole object back and compare its CRC32C.
    Readback,
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "head" => Ok(VerifyMode::Head),
            "readback" => Ok(VerifyMode::Readback),
            other => Err(format!(
                "unknown verify mode {other:?}: use \"head\" or \"readback\""
            )),
        }
    }
}

/// How each S3 part is protected in transit (the server checks it on arrival).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadChecksum {
    /// `x-amz-checksum-crc64nvme` per part, payload unsigned: cheap, and checked
    /// by AWS S3, SeaweedFS and other current stores (the default but at
    /// OCI's S3-compatible endpoints, which do not check it).
    Crc64nvme,
    /// SigV4 over the SHA-256 of every byte: checked by every S3 store, at the
    /// cost of one SHA-256 pass over the data (the default at OCI's
    /// S3-compatible endpoints).
    Sha256,
}

/// Which reader turns the file into parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReaderKind {
    /// `pread` into pooled buffers.
    Pread,
    /// One read-only mapping per part, guarded against a truncation
    /// (`mapping`): no copy out of the page cache, so the default.
    #[default]
    Mmap,
}

impl ReaderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReaderKind::Pread => "pread",
            ReaderKind::Mmap => "mmap",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransferConfig {
    pub part_size: ByteSize,
    pub memory_limit: ByteSize,
    pub parallel_parts: usize,
    pub verify: VerifyMode,
    pub reader: ReaderKind,
    pub max_retries: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub connect_timeout_secs: u64,
    pub min_throughput_kib: u64,
    /// None: SHA-256 at OCI's S3-compatible endpoints, CRC64NVME elsewhere.
    pub payload_checksum: Option<PayloadChecksum>,
    /// All destinations together: a rate or a timetable (`bandwidth`).
    pub bandwidth_limit: Option<Schedule>,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            part_size: ByteSize::mib(64),
            memory_limit: ByteSize::mib(512),
            parallel_parts: 8,
            verify: VerifyMode::Head,
            reader: ReaderKind::Mmap,
            max_retries: 10,
            retry_base_ms: 200,
            retry_max_ms: 30_000,
            connect_timeout_secs: 10,
            min_throughput_kib: 256,
            payload_checksum: None,
            bandwidth_limit: None,
        }
    }
}

/// Where an s3:// destination's credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Credentials {
    /// `access_key_id` and `secret_access_key` from the destination's table,
    /// else `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and
    /// `AWS_SESSION_TOKEN`) from the environment; none is an error.
    #[default]
    Keys,
    /// The role of the cloud instance ferry runs on, found as the AWS SDKs do
    /// (web identity, container credentials, the instance-metadata service).
    Instance,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials: Option<Credentials>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub allow_http: Option<bool>,
    /// s3://: a PEM file of CA certificates to trust besides the system's
    /// (an endpoint whose certificate a private CA signed).
    pub ca_file: Option<PathBuf>,
    /// Overrides `transfer.parallel_parts` for this destination.
    pub parallel_parts: Option<usize>,
    /// This destination alone: a rate or a timetable (`bandwidth`), within
    /// `transfer.bandwidth_limit`.
    pub bandwidth_limit: Option<Schedule>,
    /// oci://: the tenancy's Object Storage namespace; looked up when absent.
    pub namespace: Option<String>,
    /// oci://: the profile in the OCI CLI's config file (default
    /// `OCI_CLI_PROFILE`, else `DEFAULT`).
    pub profile: Option<String>,
    /// oci://: the OCI CLI's config file (default `OCI_CLI_CONFIG_FILE`, else
    /// `~/.oci/config`).
    pub config_file: Option<PathBuf>,
    /// oci://: import every verified object as a custom image in this
    /// destination's region.
    pub import: Option<ImportConfig>,
}

/// Where CreateImage reads the object from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImportSource {
    /// A read-only pre-authenticated request on the object, made for the
    /// import and deleted after it: works for every kind of caller.
    #[default]
    Par,
    /// The namespace, bucket and object name: fails for instance principals
    /// and federated users (Oracle documents it).
    Tuple,
}

impl ImportSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportSource::Par => "par",
            ImportSource::Tuple => "tuple",
        }
    }
}

impl std::str::FromStr for ImportSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "par" => Ok(ImportSource::Par),
            "tuple" => Ok(ImportSource::Tuple),
            other => Err(format!("{other:?}: use par or tuple")),
        }
    }
}

/// `[destinations.NAME.import]`: each verified object becomes a custom image
/// in the destination's region (OCI Compute's CreateImage).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportConfig {
    /// The compartment the image is created in (an OCID).
    pub compartment_id: String,
    /// The image's name: a template of `{stem}`, `{name}`, `{date}`, `{crc32c}`.
    #[serde(default = "default_display_name")]
    pub display_name: String,
    #[serde(default)]
    pub source: ImportSource,
    /// How long the pre-authenticated request lives (it is deleted as soon
    /// as the import ends).
    #[serde(default = "default_par_expiry_hours")]
    pub par_expiry_hours: u64,
    /// Give up waiting for AVAILABLE after this long.
    #[serde(default = "default_import_timeout_minutes")]
    pub timeout_minutes: u64,
    /// Tags for the image, beside ferry's own (`ferry-crc32c`, `ferry-source-host`).
    #[serde(default)]
    pub freeform_tags: BTreeMap<String, String>,
    /// Compute's endpoint (default `https://iaas.REGION.oraclecloud.com`).
    pub endpoint: Option<String>,
}

fn default_display_name() -> String {
    "{stem}".into()
}
fn default_par_expiry_hours() -> u64 {
    24
}
fn default_import_timeout_minutes() -> u64 {
    120
}

/// The placeholders a display-name template may hold.
pub const DISPLAY_NAME_FIELDS: &[&str] = &["stem", "name", "date", "crc32c"];

/// Freeform tag keys ferry sets on every image it imports.
pub const IMPORT_TAGS: &[&str] = &["ferry-crc32c", "ferry-source-host"];

/// Fills a display-name template: `fill` gives each placeholder's value.
/// `Err` names a placeholder that is not one, or a brace left open.
pub fn display_name(template: &str, fill: impl Fn(&str) -> String) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    // Bounded: each turn consumes at least one '{'.
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{template:?} has a '{{' with no '}}'"))?;
        let field = &after[..close];
        if !DISPLAY_NAME_FIELDS.contains(&field) {
            return Err(format!(
                "{template:?} has {{{field}}}, which is not one of {{stem}}, {{name}}, {{date}}, {{crc32c}}"
            ));
        }
        out.push_str(&fill(field));
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("{template:?} has a '}}' with no '{{'"));
    }
    out.push_str(rest);
    Ok(out)
}

impl ImportConfig {
    /// What is wrong with this table, in words that name the key.
    pub fn check(&self) -> Result<(), String> {
        if !(self.compartment_id.starts_with("ocid1.compartment.")
            || self.compartment_id.starts_with("ocid1.tenancy."))
        {
            return Err(format!(
                "compartment_id = {:?} is not a compartment OCID (ocid1.compartment.oc1..…, or the tenancy's ocid1.tenancy.oc1..… for the root compartment); `oci iam compartment list` shows them",
                self.compartment_id
            ));
        }
        display_name(&self.display_name, |_| "x".into())
            .map_err(|e| format!("display_name = {e}"))?;
        if self.display_name.trim().is_empty() {
            return Err("display_name is empty: use a template such as \"{stem}\"".into());
        }
        if self.timeout_minutes == 0 || self.timeout_minutes > 7 * 24 * 60 {
            return Err(format!(
                "timeout_minutes = {} is out of range: use 1..=10080 (a week)",
                self.timeout_minutes
            ));
        }
        if self.source == ImportSource::Par {
            if self.par_expiry_hours == 0 || self.par_expiry_hours > 365 * 24 {
                return Err(format!(
                    "par_expiry_hours = {} is out of range: use 1..=8760",
                    self.par_expiry_hours
                ));
            }
            if self.par_expiry_hours * 60 < self.timeout_minutes {
                return Err(format!(
                    "par_expiry_hours = {} ends before timeout_minutes = {}: the pre-authenticated request would expire while the import may still read it; raise par_expiry_hours",
                    self.par_expiry_hours, self.timeout_minutes
                ));
            }
        }
        for (k, v) in &self.freeform_tags {
            if IMPORT_TAGS.contains(&k.as_str()) {
                return Err(format!(
                    "freeform_tags.{k} is ferry's own tag (it records the image's source): use another key"
                ));
            }
            if k.is_empty()
                || k.chars().count() > 100
                || k.chars().any(|c| c.is_control() || c == '.' || c == ' ')
            {
                return Err(format!(
                    "freeform_tags key {k:?}: OCI takes 1 to 100 characters, without '.', spaces or control characters"
                ));
            }
            if v.chars().count() > 256 {
                return Err(format!(
                    "freeform_tags.{k}: OCI takes values of at most 256 characters"
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The bandwidth limits: all destinations together, and each one's own.
    pub fn bandwidth(&self) -> crate::bandwidth::Bandwidth {
        crate::bandwidth::Bandwidth::new(
            self.transfer.bandwidth_limit.clone(),
            self.destination_bandwidth(),
        )
    }

    /// Each destination's own limit, by name.
    pub fn destination_bandwidth(&self) -> BTreeMap<String, Option<Schedule>> {
        self.destinations
            .iter()
            .map(|(name, d)| (name.clone(), d.bandwidth_limit.clone()))
            .collect()
    }

    /// The compiled-in default (the shipped `config/ferry.toml`).
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED, "(embedded default)")
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Loads `path` when given, the embedded default otherwise.
    pub fn load_or_embedded(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::load(p),
            None => Config::embedded(),
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            // toml's message names the key and the line; keep it on one line.
            message: e.message().trim().to_string()
                + &e.span()
                    .map(|s| format!(" (at line {})", line_of(text, s.start)))
                    .unwrap_or_default(),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let d = &self.daemon;
        if d.max_jobs == 0 || d.max_jobs > 64 {
            return Err(invalid(format!(
                "daemon.max_jobs = {} is out of range: use 1..=64",
                d.max_jobs
            )));
        }
        if d.max_conversions == 0 || d.max_conversions > 16 {
            return Err(invalid(format!(
                "daemon.max_conversions = {} is out of range: use 1..=16",
                d.max_conversions
            )));
        }
        if d.rescan_secs == 0 {
            return Err(invalid("daemon.rescan_secs must be above 0".into()));
        }
        if d.shutdown_timeout_secs == 0 {
            return Err(invalid(
                "daemon.shutdown_timeout_secs must be above 0".into(),
            ));
        }
        let t = &self.transfer;
        if t.parallel_parts == 0 || t.parallel_parts > 256 {
            return Err(invalid(format!(
                "transfer.parallel_parts = {} is out of range: use 1..=256",
                t.parallel_parts
            )));
        }
        if t.memory_limit.as_u64() < 16 * 1024 * 1024 {
            return Err(invalid(format!(
                "transfer.memory_limit = {} is too small: use at least 16MiB",
                t.memory_limit
            )));
        }
        check_part_size(t.part_size.as_u64(), t.memory_limit.as_u64())
            .map_err(|m| invalid(format!("transfer.{m}")))?;
        if t.retry_base_ms == 0 || t.retry_max_ms < t.retry_base_ms {
            return Err(invalid(
                "transfer.retry_base_ms must be above 0 and at most retry_max_ms".into(),
            ));
        }
        if t.min_throughput_kib == 0 {
            return Err(invalid(
                "transfer.min_throughput_kib must be above 0".into(),
            ));
        }
        for (name, s) in &self.sources {
            if !valid_destination_name(name) {
                return Err(invalid(format!(
                    "source name {name:?} must be 1..=64 characters of a-z, 0-9, '-' and '_'"
                )));
            }
            if s.poll_secs == 0 {
                return Err(invalid(format!("sources.{name}.poll_secs must be above 0")));
            }
            if s.lease_secs < 3 {
                return Err(invalid(format!(
                    "sources.{name}.lease_secs = {} is too short: use at least 3 (it is renewed every third of it), and well over the longest stall a host may have",
                    s.lease_secs
                )));
            }
            if let Some(0) = s.parallel_reads {
                return Err(invalid(format!(
                    "sources.{name}.parallel_reads must be above 0"
                )));
            }
            let d = s.store();
            let url = DestinationUrl::parse(&d.url)
                .map_err(|e| invalid(format!("sources.{name}.url: {e}")))?;
            if !matches!(url, DestinationUrl::S3 { .. } | DestinationUrl::Oci { .. }) {
                return Err(invalid(format!(
                    "sources.{name}.url: a source is a bucket, s3://BUCKET/PREFIX/ or oci://BUCKET/PREFIX/"
                )));
            }
            if let Some(key) = d.misplaced_key(&url) {
                return Err(invalid(format!(
                    "sources.{name}.{key} does not apply to {}; remove it",
                    d.url
                )));
            }
        }
        for (name, d) in &self.destinations {
            if !valid_destination_name(name) {
                return Err(invalid(format!(
                    "destination name {name:?} must be 1..=64 characters of a-z, 0-9, '-' and '_'"
                )));
            }
            if let Some(0) = d.parallel_parts {
                return Err(invalid(format!(
                    "destinations.{name}.parallel_parts must be above 0"
                )));
            }
            let url = DestinationUrl::parse(&d.url)
                .map_err(|e| invalid(format!("destinations.{name}.url: {e}")))?;
            if let Some(import) = &d.import {
                if !matches!(url, DestinationUrl::Oci { .. }) {
                    return Err(invalid(format!(
                        "destinations.{name}.import needs an oci:// destination: OCI imports \
                         custom images only from OCI Object Storage, and ferry signs the import \
                         with the destination's OCI CLI profile; use oci://BUCKET/PREFIX/ or \
                         remove the import table"
                    )));
                }
                import
                    .check()
                    .map_err(|m| invalid(format!("destinations.{name}.import.{m}")))?;
            }
            if let Some(key) = d.misplaced_key(&url) {
                return Err(invalid(format!(
                    "destinations.{name}.{key} does not apply to {}: {}",
                    d.url,
                    match url {
                        DestinationUrl::Oci { .. } =>
                            "an oci:// destination signs with the API key of an OCI CLI profile (profile, config_file); remove it",
                        DestinationUrl::S3 { .. } =>
                            "namespace, profile and config_file are for oci:// destinations; remove it",
                        _ =>
                            "a directory or memory store takes only url and parallel_parts; remove it",
                    }
                )));
            }
        }
        Ok(())
    }
}

/// The smallest and largest part S3's and OCI's multipart uploads take (the
/// same as `chunk::PartLimits::S3`; a test there checks they agree: config
/// imports no other module of ferry).
pub const MIN_PART_BYTES: u64 = 5 << 20;
pub const MAX_PART_BYTES: u64 = 5 << 30;

/// A part size every store takes (S3's and OCI's multipart limits, 5 MiB to
/// 5 GiB) and the memory budget holds. Raised at run time only to fit a large
/// file in 10,000 parts, never silently cut or raised here.
pub fn check_part_size(part_bytes: u64, memory_limit_bytes: u64) -> Result<(), String> {
    let show = |b: u64| ByteSize(b).display().iec().to_string();
    if !(MIN_PART_BYTES..=MAX_PART_BYTES).contains(&part_bytes) {
        return Err(format!(
            "part_size = {} is outside what multipart uploads take (5 MiB to 5 GiB): use a size in that range",
            show(part_bytes),
        ));
    }
    if part_bytes > memory_limit_bytes {
        return Err(format!(
            "part_size = {} is larger than memory_limit = {}, so no part would fit in memory: raise memory_limit or lower part_size",
            show(part_bytes),
            show(memory_limit_bytes)
        ));
    }
    Ok(())
}

/// Whether `endpoint` is plain http to this host (where a signed request
/// does not leave the machine): such an endpoint is allowed without
/// `allow_http`.
pub fn is_loopback_http(endpoint: &str) -> bool {
    url::Url::parse(endpoint).is_ok_and(|u| {
        u.scheme() == "http"
            && match u.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            }
    })
}

/// A parsed destination URL.
///
/// Parsed here rather than by the `url` crate, on purpose: `url` resolves
/// `..` segments away (`s3://b/a/../c` would become `s3://b/c`, a prefix the
/// operator did not write, where ferry must refuse), and `file://./var/`,
/// the relative directory of the quick start, is not a URL to it. What is
/// parsed is small: a scheme, a bucket, a prefix checked segment by segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationUrl {
    /// A directory; relative paths are relative to the working directory.
    File {
        dir: PathBuf,
    },
    /// An in-process store, for benchmarks and tests: data is gone when ferry exits.
    Memory {
        name: String,
        prefix: String,
    },
    S3 {
        bucket: String,
        prefix: String,
    },
    /// OCI Object Storage's own API.
    Oci {
        bucket: String,
        prefix: String,
    },
}

impl DestinationConfig {
    /// The first key set in this table that its kind of destination does not
    /// take (a key for another kind is a mistake worth a loud refusal: it
    /// would be silently ignored).
    fn misplaced_key(&self, url: &DestinationUrl) -> Option<&'static str> {
        let s3 = [
            ("credentials", self.credentials.is_some()),
            ("access_key_id", self.access_key_id.is_some()),
            ("secret_access_key", self.secret_access_key.is_some()),
            ("ca_file", self.ca_file.is_some()),
        ];
        let oci = [
            ("namespace", self.namespace.is_some()),
            ("profile", self.profile.is_some()),
            ("config_file", self.config_file.is_some()),
        ];
        let remote = [
            ("endpoint", self.endpoint.is_some()),
            ("region", self.region.is_some()),
            ("allow_http", self.allow_http.is_some()),
        ];
        let wrong: Vec<(&'static str, bool)> = match url {
            DestinationUrl::S3 { .. } => oci.to_vec(),
            DestinationUrl::Oci { .. } => s3.to_vec(),
            DestinationUrl::File { .. } | DestinationUrl::Memory { .. } => {
                s3.iter().chain(&oci).chain(&remote).copied().collect()
            }
        };
        wrong.into_iter().find(|(_, set)| *set).map(|(k, _)| k)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error(
        "{0:?} is not a destination URL: use file://PATH/, s3://BUCKET/PREFIX/, oci://BUCKET/PREFIX/ or memory://NAME/"
    )]
    Scheme(String),
    #[error("{0:?} has no bucket name: use s3://BUCKET/PREFIX/ or oci://BUCKET/PREFIX/")]
    NoBucket(String),
    #[error("{0:?}: bucket names are 3..=63 characters of a-z, 0-9, '.' and '-'")]
    BadBucket(String),
    #[error("{0:?}: OCI bucket names are 1..=256 characters of letters, digits, '-', '_' and '.'")]
    BadOciBucket(String),
    #[error("{0:?} has no path: use file:///absolute/dir/ or file://./relative/dir/")]
    NoPath(String),
    #[error("{0:?}: the prefix may not contain empty, '.' or '..' segments")]
    BadPrefix(String),
    #[error("{0:?}: a directory URL may not contain '..' segments; give the directory itself")]
    BadPath(String),
    #[error(
        "{0:?}: destination URLs take no query ('?') or fragment ('#'); a key prefix or directory holding them is not supported"
    )]
    QueryOrFragment(String),
}

impl UrlError {
    /// [`Class::Fatal`]: the configuration must be fixed.
    pub fn class(&self) -> Class {
        Class::Fatal
    }
}

impl DestinationUrl {
    pub fn parse(url: &str) -> Result<DestinationUrl, UrlError> {
        if ["file://", "s3://", "oci://", "memory://"]
            .iter()
            .any(|s| url.starts_with(s))
            && (url.contains('?') || url.contains('#'))
        {
            return Err(UrlError::QueryOrFragment(url.into()));
        }
        if let Some(rest) = url.strip_prefix("file://") {
            if rest.is_empty() {
                return Err(UrlError::NoPath(url.into()));
            }
            if rest.split('/').any(|s| s == "..") {
                return Err(UrlError::BadPath(url.into()));
            }
            return Ok(DestinationUrl::File {
                dir: PathBuf::from(rest),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(UrlError::NoBucket(url.into()));
            }
            if bucket.len() < 3
                || bucket.len() > 63
                || !bucket
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            {
                return Err(UrlError::BadBucket(url.into()));
            }
            return Ok(DestinationUrl::S3 {
                bucket: bucket.into(),
                prefix: clean_prefix(url, prefix)?,
            });
        }
        if let Some(rest) = url.strip_prefix("oci://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(UrlError::NoBucket(url.into()));
            }
            if bucket.len() > 256
                || !bucket
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return Err(UrlError::BadOciBucket(url.into()));
            }
            return Ok(DestinationUrl::Oci {
                bucket: bucket.into(),
                prefix: clean_prefix(url, prefix)?,
            });
        }
        if let Some(rest) = url.strip_prefix("memory://") {
            let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            return Ok(DestinationUrl::Memory {
                name: name.into(),
                prefix: clean_prefix(url, prefix)?,
            });
        }
        Err(UrlError::Scheme(url.into()))
    }
}

/// A prefix of `/`-separated segments without empty, `.` or `..` ones; kept with a
/// trailing `/` so `prefix + name` is the key.
fn clean_prefix(url: &str, prefix: &str) -> Result<String, UrlError> {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(UrlError::BadPrefix(url.into()));
    }
    Ok(format!("{trimmed}/"))
}

/// Destination names become metric labels and log fields: keep them tame.
pub fn valid_destination_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_endpoints_allow_http() {
        assert!(is_loopback_http("http://127.0.0.1:8333"));
        assert!(is_loopback_http("http://localhost:8333"));
        assert!(!is_loopback_http("http://10.0.0.1:8333"));
        assert!(!is_loopback_http("https://127.0.0.1"));
    }

    #[test]
    fn embedded_default_parses_with_two_file_destinations() {
        let c = Config::embedded().unwrap();
        assert_eq!(c.destinations.len(), 2);
        for d in c.destinations.values() {
            assert!(d.url.starts_with("file://./var/regions/"), "{}", d.url);
        }
        assert_eq!(c.transfer.part_size.as_u64(), 64 << 20);
        assert_eq!(c.transfer.memory_limit.as_u64(), 512 << 20);
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9465");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::parse("[transfer]\npart_sise = \"8MiB\"\n", "t").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("part_sise"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Config::parse("[transfer]\nparallel_parts = 0\n", "t").is_err());
        assert!(Config::parse("[transfer]\nmemory_limit = \"1MiB\"\n", "t").is_err());
        assert!(Config::parse("[transfer]\nverify = \"maybe\"\n", "t").is_err());
        assert!(Config::parse("[destinations.x]\nurl = \"ftp://a/b\"\n", "t").is_err());
        assert!(Config::parse("[destinations.X]\nurl = \"file:///tmp/a/\"\n", "t").is_err());
    }

    #[test]
    fn part_sizes_the_stores_or_the_budget_cannot_take_are_refused() {
        for (t, needle) in [
            ("part_size = \"100TiB\"", "5 GiB"),
            ("part_size = \"1MiB\"", "5 MiB"),
            (
                "part_size = \"1GiB\"\nmemory_limit = \"512MiB\"",
                "memory_limit",
            ),
        ] {
            let e = Config::parse(&format!("[transfer]\n{t}\n"), "t").unwrap_err();
            let m = e.to_string();
            assert!(m.contains("part_size") && m.contains(needle), "{t}: {m}");
        }
        assert!(
            Config::parse(
                "[transfer]\npart_size = \"5GiB\"\nmemory_limit = \"6GiB\"\n",
                "t"
            )
            .is_ok()
        );
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            DestinationUrl::parse("s3://images-fra/exports/").unwrap(),
            DestinationUrl::S3 {
                bucket: "images-fra".into(),
                prefix: "exports/".into()
            }
        );
        assert_eq!(
            DestinationUrl::parse("s3://bkt").unwrap(),
            DestinationUrl::S3 {
                bucket: "bkt".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            DestinationUrl::parse("file://./var/x/").unwrap(),
            DestinationUrl::File {
                dir: "./var/x/".into()
            }
        );
        assert!(DestinationUrl::parse("s3:///x").is_err());
        assert!(DestinationUrl::parse("s3://B/x").is_err());
        assert!(DestinationUrl::parse("s3://bkt/a/../b").is_err());
        assert!(DestinationUrl::parse("http://x/").is_err());
        assert!(DestinationUrl::parse("file://").is_err());
    }

    #[test]
    fn oci_urls_take_ocis_bucket_names() {
        assert_eq!(
            DestinationUrl::parse("oci://Images_2024.x/exports/").unwrap(),
            DestinationUrl::Oci {
                bucket: "Images_2024.x".into(),
                prefix: "exports/".into()
            }
        );
        for bad in [
            "oci://",
            "oci:///x",
            "oci://a b/",
            "oci://b/a/../c",
            "oci://b/p?x",
        ] {
            assert!(DestinationUrl::parse(bad).is_err(), "{bad}");
        }
    }

    /// A key of another kind of destination would be silently ignored: it
    /// is refused, naming it.
    #[test]
    fn keys_of_another_kind_of_destination_are_refused() {
        for (url, key, value) in [
            ("oci://b/", "access_key_id", "\"k\""),
            ("oci://b/", "credentials", "\"instance\""),
            ("s3://bkt/", "profile", "\"DEFAULT\""),
            ("s3://bkt/", "namespace", "\"ns\""),
            ("file:///tmp/x/", "region", "\"us-ashburn-1\""),
            ("file:///tmp/x/", "config_file", "\"/x\""),
        ] {
            let text = format!("[destinations.d]\nurl = \"{url}\"\n{key} = {value}\n");
            let m = Config::parse(&text, "t").unwrap_err().to_string();
            assert!(
                m.contains(&format!("destinations.d.{key}")),
                "{url} {key}: {m}"
            );
        }
        let ok = "[destinations.d]\nurl = \"oci://b/\"\nnamespace = \"ns\"\nprofile = \"P\"\nconfig_file = \"/x\"\nregion = \"us-ashburn-1\"\nendpoint = \"https://e\"\n";
        assert!(Config::parse(ok, "t").is_ok());
    }

    #[test]
    fn urls_with_a_query_a_fragment_or_dot_dot_are_refused() {
        for url in [
            "s3://bkt/p?x=1",
            "s3://bkt/p#f",
            "memory://m/p?x",
            "file:///tmp/a?b/",
            "file:///tmp/a/../b/",
            "file://../b/",
        ] {
            assert!(DestinationUrl::parse(url).is_err(), "{url}");
        }
        assert!(DestinationUrl::parse("file://./var/x/").is_ok());
    }

    /// Why destination URLs are parsed here (see [`DestinationUrl`]): the
    /// `url` crate would hand back a prefix the operator did not write.
    #[test]
    fn the_url_crate_would_resolve_dot_dot_away() {
        let u = url::Url::parse("s3://bkt/a/../b/").unwrap();
        assert_eq!(u.path(), "/b/");
    }
    #[test]
    fn import_tables_are_checked_at_load() {
        let table = |url: &str, import: &str| {
            format!(
                "[destinations.ashburn]\nurl = \"{url}\"\n[destinations.ashburn.import]\n{import}\n"
            )
        };
        let ok = "compartment_id = \"ocid1.compartment.oc1..aaaa\"";
        let c = Config::parse(&table("oci://images/x/", ok), "t").unwrap();
        let i = c.destinations["ashburn"].import.clone().unwrap();
        assert_eq!(
            (
                i.display_name.as_str(),
                i.source,
                i.par_expiry_hours,
                i.timeout_minutes
            ),
            ("{stem}", ImportSource::Par, 24, 120)
        );
        for (url, import, words) in [
            ("s3://images/x/", ok, "needs an oci:// destination"),
            ("file:///tmp/x/", ok, "needs an oci:// destination"),
            ("oci://images/x/", "", "missing field `compartment_id`"),
            (
                "oci://images/x/",
                "compartment_id = \"images\"",
                "not a compartment OCID",
            ),
            (
                "oci://images/x/",
                &format!("{ok}\ncompartmentid = 1"),
                "unknown field `compartmentid`",
            ),
            (
                "oci://images/x/",
                &format!("{ok}\ndisplay_name = \"{{host}}\""),
                "{host}, which is not one of",
            ),
            (
                "oci://images/x/",
                &format!("{ok}\ndisplay_name = \"a{{stem\""),
                "'{' with no '}'",
            ),
            (
                "oci://images/x/",
                &format!("{ok}\nsource = \"uri\""),
                "unknown variant `uri`",
            ),
            (
                "oci://images/x/",
                &format!("{ok}\ntimeout_minutes = 0"),
                "timeout_minutes = 0",
            ),
            (
                "oci://images/x/",
                &format!("{ok}\npar_expiry_hours = 1\ntimeout_minutes = 120"),
                "ends before timeout_minutes",
            ),
            (
                "oci://images/x/",
                &format!("{ok}\nfreeform_tags = {{ \"ferry-crc32c\" = \"x\" }}"),
                "ferry's own tag",
            ),
            (
                "oci://images/x/",
                &format!("{ok}\nfreeform_tags = {{ \"a.b\" = \"x\" }}"),
                "without '.'",
            ),
        ] {
            let e = Config::parse(&table(url, import), "t")
                .unwrap_err()
                .to_string();
            assert!(e.contains(words), "{import:?}: {e}");
        }
        // A tuple source needs no PAR expiry.
        let tuple =
            format!("{ok}\nsource = \"tuple\"\npar_expiry_hours = 1\ntimeout_minutes = 600");
        assert!(Config::parse(&table("oci://images/x/", &tuple), "t").is_ok());
    }

    #[test]
    fn display_names_fill_their_placeholders() {
        let fill = |f: &str| match f {
            "stem" => "web01".to_string(),
            "date" => "2026-12-07".to_string(),
            other => format!("<{other}>"),
        };
        assert_eq!(
            display_name("{stem}-{date}", fill).unwrap(),
            "web01-2026-12-07"
        );
        assert_eq!(display_name("plain", fill).unwrap(), "plain");
        assert!(display_name("}", fill).is_err());
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        let c = Config::parse("[transfer]\npart_size = \"8MiB\"\n", "t").unwrap();
        assert_eq!(c.transfer.part_size.as_u64(), 8 << 20);
    }
}
