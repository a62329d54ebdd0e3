//! Image inspection: what is being shipped, and whether OCI can import it.
//!
//! Promises:
//! - the format is found from the bytes (never the name), and every format OCI
//!   cannot import is *named* in the refusal, with the command that converts it;
//! - QCOW2 and VMDK are checked as OCI's importer would, before a byte is sent:
//!   backing files, external data, encryption, corrupt/unknown feature bits,
//!   delta and multi-file VMDKs, truncated files, size over the limit, and a guest
//!   sector 0 without a boot signature (read through the format's own mapping);
//! - parsers never panic, never read past the end of the file (every read is
//!   checked against the size), and never allocate from an unchecked header
//!   field (every table read is capped).
//!
//! Design choice: ferry reads the headers itself, with no qemu-img at run time.
//! qemu-img is the reference in the tests, and the JSON names formats as qemu's
//! drivers do (`qcow2`, `vmdk`, `vpc`, `vhdx`, `vdi`, `raw`) so both can be
//! compared field by field.

mod boot;
pub mod convert;
mod oci;
mod others;
mod ova;
mod qcow2;
pub mod sidecar;
mod vmdk;

use crate::error::Class;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

pub use ova::{Member, OvfHints};
pub use sidecar::{License, Sidecar};

const GIB: u64 = 1 << 30;

/// What an inspection may not read.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Sidecar { path: String, message: String },
}

impl InspectError {
    /// Always [`Class::Refuse`]: the image or its sidecar cannot be read as
    /// one.
    pub fn class(&self) -> Class {
        Class::Refuse
    }
}

/// Inspection policy (the `[policy]` table).
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_virtual_size_bytes: u64,
    pub allow_extended_l2: bool,
    pub require_license_attestation: bool,
}

impl Policy {
    /// The policy of the `[policy]` table for the daemon (`daemon = true`,
    /// where a licence attestation is required unless the table says
    /// otherwise) or for `ferry push`.
    pub fn from_config(p: &crate::config::PolicyConfig, daemon: bool) -> Policy {
        Policy {
            max_virtual_size_bytes: p.max_virtual_size.as_u64(),
            allow_extended_l2: p.allow_extended_l2,
            require_license_attestation: p.require_license_attestation.unwrap_or(daemon),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_virtual_size_bytes: 400 * GIB,
            allow_extended_l2: false,
            require_license_attestation: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Refuse,
}

/// What guest sectors 0..33 say.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Boot {
    pub boot_signature: bool,
    /// "mbr", "gpt" or "none".
    pub partition_table: String,
    pub efi_system_partition: bool,
    pub bios_boot_partition: bool,
}

/// The result of an inspection, as `ferry inspect --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub file: String,
    pub file_size: u64,
    /// qemu's driver name: qcow2, vmdk, oci, vpc, vhdx, vdi, qed, raw, iso, ...
    pub format: String,
    /// For people: "QCOW2 v3", "VMDK streamOptimized", "VHD (fixed)", ...
    pub format_name: String,
    pub details: serde_json::Map<String, serde_json::Value>,
    pub virtual_size: Option<u64>,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub warnings: Vec<String>,
    pub boot: Option<Boot>,
    pub firmware: String,
    pub firmware_basis: String,
    pub launch_mode: String,
    pub launch_mode_basis: String,
    pub os: Option<String>,
    pub os_version: Option<String>,
    /// Where `os` comes from: `oci-metadata`, `attested`, `ovf` or `none`.
    pub os_basis: String,
    pub license: Option<License>,
    /// For an archive shipped as one of its members (an OVA's disk): that
    /// member, whose bytes are the object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<Member>,
    /// For a QCOW2 that ferry made (`policy.convert`): what it was made
    /// from, and how. The manifest carries it beside `image`.
    #[serde(skip)]
    pub conversion: Option<convert::Conversion>,
    /// The refusal that names a format OCI cannot import, when a
    /// conversion would answer it: only an image refused for that reason
    /// alone is converted (a damaged or differencing one is not).
    #[serde(skip)]
    pub(crate) format_reason: Option<String>,
}

impl Report {
    fn new(file: &str, file_size: u64) -> Report {
        Report {
            file: file.to_string(),
            file_size,
            format: "unknown".into(),
            format_name: "unknown".into(),
            details: serde_json::Map::new(),
            virtual_size: None,
            verdict: Verdict::Accept,
            reasons: vec![],
            warnings: vec![],
            boot: None,
            firmware: "UNKNOWN".into(),
            firmware_basis: "none".into(),
            launch_mode: "UNKNOWN".into(),
            launch_mode_basis: "none".into(),
            os: None,
            os_version: None,
            os_basis: "none".into(),
            license: None,
            member: None,
            conversion: None,
            format_reason: None,
        }
    }

    pub fn refuse(&mut self, reason: impl Into<String>) {
        self.verdict = Verdict::Refuse;
        let r = reason.into();
        if !self.reasons.contains(&r) {
            self.reasons.push(r);
        }
    }

    pub fn warn(&mut self, w: impl Into<String>) {
        let w = w.into();
        if !self.warnings.contains(&w) {
            self.warnings.push(w);
        }
    }

    fn detail(&mut self, k: &str, v: impl Into<serde_json::Value>) {
        self.details.insert(k.to_string(), v.into());
    }

    /// The firmware `fw` on `basis`, unless one with a stronger basis
    /// (OCI's metadata, an attestation, an OVF) is set: it wins over
    /// only none and the boot sector's inference. Callers offer in order
    /// of trust, strongest first.
    pub(crate) fn offer_firmware(&mut self, fw: Option<&str>, basis: &str) {
        if matches!(self.firmware_basis.as_str(), "none" | "inspected")
            && let Some(fw) = fw
        {
            self.firmware = fw.to_string();
            self.firmware_basis = basis.to_string();
        }
    }

    /// The OS `os` (and its version) on `basis`, unless one is set.
    pub(crate) fn offer_os(&mut self, os: Option<&str>, version: Option<&str>, basis: &str) {
        if self.os.is_none()
            && let Some(os) = os
        {
            self.os = Some(os.to_string());
            self.os_version = version.map(str::to_string);
            self.os_basis = basis.to_string();
        }
    }

    /// A refusal for a format OCI cannot import, naming it.
    fn cannot_import(&mut self, name: &str, convert_from: &str) {
        let stem = Path::new(&self.file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let mut out = format!("{stem}.qcow2");
        if out == self.file {
            out = format!("{stem}-converted.qcow2");
        }
        let reason = format!(
            "OCI cannot import {name}; convert it first: qemu-img convert{convert_from} -O qcow2 {} {out} (or let ferry convert it: policy.convert = true, or ferry push --convert)",
            self.file
        );
        self.refuse(reason.clone());
        self.format_reason = Some(reason);
    }

    /// The fields the import manifest carries, beside the transfer's own.
    pub fn manifest_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let v = serde_json::to_value(self).unwrap_or_default();
        let mut image = v.as_object().cloned().unwrap_or_default();
        image.remove("file");
        image.remove("file_size");
        m.insert("image".into(), serde_json::Value::Object(image));
        if let Some(c) = &self.conversion {
            m.insert(
                "conversion".into(),
                serde_json::to_value(c).unwrap_or_default(),
            );
        }
        m
    }
}

/// Bounded positional reads over an image, or a member inside a container.
pub trait ReadAt {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; an error if that reaches past the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;

    fn read_vec(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size())
        {
            return Err(eof());
        }
        let mut v = vec![0u8; len];
        self.read_at(offset, &mut v)?;
        Ok(v)
    }
}

// Fixed-width integers at a byte offset; callers check `o + width <= b.len()`.
pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}
pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// `len` bytes at `offset` lie inside `size`, or an end-of-file error.
pub fn within(offset: u64, len: usize, size: u64) -> std::io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(eof()),
    }
}

pub(crate) fn eof() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end")
}

/// A whole open file, read by `pread`.
pub struct FileAt<'a> {
    pub file: &'a File,
    pub len: u64,
}

impl ReadAt for FileAt<'_> {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        within(offset, buf.len(), self.len)?;
        self.file.read_exact_at(buf, offset)
    }
}

/// A byte range of an image (a whole image, or a member of an uncompressed
/// tar), readable by position and, from a cursor, as a stream that can seek
/// (for the `tar` crate, which then skips members without reading them).
pub struct Range<'a> {
    pub base: &'a dyn ReadAt,
    pub start: u64,
    pub len: u64,
    pos: u64,
}

impl<'a> Range<'a> {
    pub fn new(base: &'a dyn ReadAt, start: u64, len: u64) -> Range<'a> {
        Range {
            base,
            start,
            len,
            pos: 0,
        }
    }
}

impl ReadAt for Range<'_> {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        within(offset, buf.len(), self.len)?;
        self.base.read_at(self.start + offset, buf)
    }
}

impl Read for Range<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.base.read_at(self.start + self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for Range<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let at = match to {
            std::io::SeekFrom::Start(n) => Some(n),
            std::io::SeekFrom::End(d) => self.len.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let at = at.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        self.pos = at;
        Ok(at)
    }
}

/// A member of a gzip-compressed tar: read by decompressing from the start
/// again whenever a read goes backwards (only a handful of reads are needed).
pub struct GzMember<'a> {
    base: &'a dyn ReadAt,
    start: u64,
    len: u64,
    state: Mutex<Option<(flate2::read::GzDecoder<std::io::BufReader<Range<'a>>>, u64)>>,
}

impl<'a> GzMember<'a> {
    pub fn new(base: &'a dyn ReadAt, start: u64, len: u64) -> GzMember<'a> {
        GzMember {
            base,
            start,
            len,
            state: Mutex::new(None),
        }
    }
}

/// The buffer of a stream read from an image: large, so that an image read
/// by ranged GETs costs few requests.
pub(crate) const STREAM_BUFFER_BYTES: usize = 1 << 20;

impl ReadAt for GzMember<'_> {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        within(offset, buf.len(), self.len)?;
        let mut g = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let want = self.start + offset;
        if g.as_ref().is_none_or(|(_, pos)| *pos > want) {
            let whole = Range::new(self.base, 0, self.base.size());
            *g = Some((
                flate2::read::GzDecoder::new(std::io::BufReader::with_capacity(
                    STREAM_BUFFER_BYTES,
                    whole,
                )),
                0,
            ));
        }
        let (dec, pos) = g.as_mut().ok_or_else(eof)?;
        let skip = want - *pos;
        let skipped = std::io::copy(&mut (&mut *dec).take(skip), &mut std::io::sink())?;
        *pos += skipped;
        if skipped != skip {
            return Err(eof());
        }
        dec.read_exact(buf)?;
        *pos += buf.len() as u64;
        Ok(())
    }
}

/// Inspects an image file, with its sidecar if one is given (`ferry inspect`).
pub fn inspect(
    path: &Path,
    sidecar: Option<&Path>,
    policy: &Policy,
) -> Result<Report, InspectError> {
    let shown = path.display().to_string();
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| InspectError::Io {
                path: shown.clone(),
                source,
            })?
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    inspect_file(&file, &name, &shown, sidecar, policy)
}

/// Inspects an image through a file already open (the one a push or a job
/// uploads from, so the bytes inspected are the bytes sent), named `name`
/// and shown as `shown` in errors.
pub fn inspect_file(
    file: &File,
    name: &str,
    shown: &str,
    sidecar: Option<&Path>,
    policy: &Policy,
) -> Result<Report, InspectError> {
    let io = |source| InspectError::Io {
        path: shown.to_string(),
        source,
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let side = match sidecar {
        Some(p) => Some(Sidecar::load(p).map_err(|message| InspectError::Sidecar {
            path: p.display().to_string(),
            message,
        })?),
        None => None,
    };
    let whole = FileAt {
        file,
        len: meta.len(),
    };
    inspect_at(&whole, name, shown, side.as_ref(), policy)
}

/// Inspects an image through any positional reader (a file, or an object
/// read by ranged GETs), with its sidecar already read.
pub fn inspect_at(
    whole: &dyn ReadAt,
    name: &str,
    shown: &str,
    side: Option<&Sidecar>,
    policy: &Policy,
) -> Result<Report, InspectError> {
    let io = |source| InspectError::Io {
        path: shown.to_string(),
        source,
    };
    let mut report = Report::new(name, whole.size());
    let mut hints = Hints::default();
    detect_and_check(whole, &mut report, policy, &mut hints).map_err(io)?;

    if let Some(v) = report.virtual_size {
        if v > policy.max_virtual_size_bytes {
            report.refuse(format!(
                "virtual size {} is over the import limit of {}; shrink the disk or raise policy.max_virtual_size",
                human(v),
                human(policy.max_virtual_size_bytes)
            ));
        } else if v > 400_000_000_000 && policy.max_virtual_size_bytes >= 400 * GIB {
            report.warn(format!(
                "virtual size {} is above 400 GB (decimal); OCI's limit is documented as 400 GB",
                human(v)
            ));
        }
    }

    decide_launch(&mut report, side, &hints);
    if policy.require_license_attestation && report.license.is_none() {
        report.refuse(format!(
            "no licence attestation: OCI requires every imported image to comply with its OS and software licences. Write {name}.meta.json beside the image with: {}",
            sidecar::EXAMPLE
        ));
    }
    Ok(report)
}

/// What a container says of the guest: an `.oci`'s `image_metadata.json`,
/// an OVA's descriptor.
#[derive(Debug, Default)]
struct Hints {
    oci_meta: Option<serde_json::Value>,
    ovf: Option<OvfHints>,
}

fn detect_and_check(
    r: &dyn ReadAt,
    report: &mut Report,
    policy: &Policy,
    hints: &mut Hints,
) -> std::io::Result<()> {
    let size = r.size();
    let head = r.read_vec(0, size.min(4096) as usize)?;
    if oci::is_tar(&head) {
        return oci::check_tar(r, report, policy, hints);
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return oci::check_gzip(r, report, policy, hints);
    }
    detect_one(r, &head, report, policy)
}

/// Checks an image that is not an archive, by its first bytes (`head`).
fn detect_one(
    r: &dyn ReadAt,
    head: &[u8],
    report: &mut Report,
    policy: &Policy,
) -> std::io::Result<()> {
    if head.starts_with(b"QFI\xfb") {
        return qcow2::check(r, report, policy);
    }
    if head.starts_with(b"KDMV")
        || head.starts_with(b"# Disk DescriptorFile")
        || head.starts_with(b"COWD")
    {
        return vmdk::check(r, report);
    }
    others::check(r, head, report)
}

/// Launch mode and firmware, each with the basis it rests on. Never a guess.
fn decide_launch(report: &mut Report, side: Option<&Sidecar>, hints: &Hints) {
    if let Some(m) = &hints.oci_meta {
        let ext = &m["externalLaunchOptions"];
        let caps: Option<serde_json::Value> = m["imageCapabilityData"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok());
        let mode = ext["launchOptionsSource"]
            .as_str()
            .filter(|s| matches!(*s, "NATIVE" | "PARAVIRTUALIZED" | "EMULATED"))
            .map(str::to_string)
            .or_else(|| {
                caps.as_ref()
                    .and_then(|c| c["capabilities"]["Compute.LaunchMode"]["defaultValue"].as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "NATIVE".to_string());
        report.launch_mode = mode;
        report.launch_mode_basis = "oci-metadata".into();
        if let Some(fw) = ext["firmware"].as_str() {
            report.firmware = fw.to_string();
            report.firmware_basis = "oci-metadata".into();
        }
        report.os = m["operatingSystem"].as_str().map(str::to_string);
        report.os_version = m["operatingSystemVersion"].as_str().map(str::to_string);
        if report.os.is_some() {
            report.os_basis = "oci-metadata".into();
        }
    }
    if let Some(s) = side {
        if report.launch_mode_basis == "none"
            && let Some(mode) = &s.launch_mode
        {
            report.launch_mode = mode.clone();
            report.launch_mode_basis = "attested".into();
        }
        report.offer_firmware(s.firmware.as_deref(), "attested");
        report.offer_os(s.os.as_deref(), s.os_version.as_deref(), "attested");
        report.license = s.license.clone();
    }
    // An OVA's descriptor: below a person's word, above the boot sector.
    if let Some(o) = &hints.ovf {
        report.offer_firmware(o.firmware.as_deref(), "ovf");
        report.offer_os(o.os.as_deref(), o.os_version.as_deref(), "ovf");
    }
    // The boot sector gives a firmware hint, and checks what was attested.
    if let Some(b) = report.boot.clone() {
        let hint = match (
            b.partition_table.as_str(),
            b.efi_system_partition,
            b.bios_boot_partition,
        ) {
            ("gpt", true, false) => Some("UEFI_64"),
            ("gpt", false, true) | ("mbr", _, _) => Some("BIOS"),
            _ => None,
        };
        if report.firmware_basis == "none" {
            if let Some(h) = hint {
                report.firmware = h.into();
                report.firmware_basis = "inspected".into();
            }
        } else if report.firmware == "BIOS" && hint == Some("UEFI_64") {
            report.warn(
                "the firmware is given as BIOS, but the disk is GPT with only an EFI system partition: it may not boot with BIOS",
            );
        }
    }
}

/// The report as a person reads it.
pub fn describe(r: &Report) -> String {
    let mut s = format!(
        "{}: {}, virtual size {}, file {}\n",
        r.file,
        r.format_name,
        r.virtual_size
            .map(|v| format!("{} ({v} bytes)", human(v)))
            .unwrap_or_else(|| "unknown".into()),
        human(r.file_size)
    );
    s += match r.verdict {
        Verdict::Accept => "verdict: ACCEPT (OCI can import it)\n",
        Verdict::Refuse => "verdict: REFUSE\n",
    };
    for x in &r.reasons {
        s += &format!("  reason: {x}\n");
    }
    for x in &r.warnings {
        s += &format!("  warning: {x}\n");
    }
    if let Some(b) = &r.boot {
        s += &format!(
            "boot: {} partition table, boot signature {}{}\n",
            b.partition_table,
            if b.boot_signature {
                "present"
            } else {
                "MISSING"
            },
            if b.efi_system_partition {
                ", EFI system partition"
            } else {
                ""
            }
        );
    }
    s += &format!(
        "firmware: {} (basis: {}); launch mode: {} (basis: {})\n",
        r.firmware, r.firmware_basis, r.launch_mode, r.launch_mode_basis
    );
    if let Some(os) = &r.os {
        s += &format!("os: {os} {}\n", r.os_version.as_deref().unwrap_or(""));
    }
    s += &match &r.license {
        Some(l) => format!(
            "licence: {} attested by {} at {}\n",
            l.model, l.attested_by, l.attested_at
        ),
        None => "licence: no attestation\n".into(),
    };
    s
}

pub(crate) fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// What OCI's CreateImage needs to know of an image: its format, the launch
/// mode (only one with a basis: never a guess), and the OS it names.
#[derive(Debug, Clone, Copy)]
pub struct ImportFacts<'a> {
    /// qemu's driver name: `qcow2`, `vmdk`, `oci`, ...
    pub format: &'a str,
    pub launch_mode: Option<&'a str>,
    pub os: Option<&'a str>,
    pub os_version: Option<&'a str>,
}

impl Report {
    /// What CreateImage needs of this image.
    pub fn import_facts(&self) -> ImportFacts<'_> {
        ImportFacts {
            format: &self.format,
            launch_mode: (self.launch_mode_basis != "none").then_some(self.launch_mode.as_str()),
            os: self.os.as_deref(),
            os_version: self.os_version.as_deref(),
        }
    }
}

/// OCI's `sourceImageType` for an image format: QCOW2 or VMDK, none for
/// `.oci` (OCI's SDKs: "not used for exported Oracle images with the OCI
/// image format").
pub fn source_image_type(format: &str) -> Option<&'static str> {
    match format {
        "qcow2" => Some("QCOW2"),
        "vmdk" => Some("VMDK"),
        _ => None,
    }
}

/// Why an image without a basis for its launch mode is not imported, and
/// what to write in its sidecar.
pub fn no_launch_mode(file: &str) -> String {
    format!(
        "{file} has no basis for its launch mode (no .oci metadata, nothing attested), and an import is configured: an image imported with the wrong launch mode may never boot. Write {file}.meta.json beside the image with \"launch_mode\": \"PARAVIRTUALIZED\" (most Linux and Windows images; EMULATED for old ones, NATIVE for images exported from OCI), and \"os\" and \"os_version\" if CreateImage should name them"
    )
}

/// Whether OCI imports images of this format: QCOW2, VMDK and `.oci`.
pub fn importable(format: &str) -> bool {
    matches!(format, "qcow2" | "vmdk" | "oci")
}

/// The body of OCI's CreateImage request (`CreateImageDetails`) that
/// imports an image from `source` (an `imageSourceDetails` with its
/// `sourceType` and where to read: a URI, or the namespace, bucket and
/// object). The launch mode is sent only when it has a basis (for an
/// `.oci` export, its metadata's, NATIVE by default).
pub fn create_image_body(
    facts: &ImportFacts<'_>,
    mut source: serde_json::Value,
    compartment_id: &str,
    display_name: &str,
) -> serde_json::Value {
    if let Some(t) = source_image_type(facts.format) {
        source["sourceImageType"] = t.into();
    }
    if let Some(os) = facts.os {
        source["operatingSystem"] = os.into();
    }
    if let Some(v) = facts.os_version {
        source["operatingSystemVersion"] = v.into();
    }
    let mut body = serde_json::json!({
        "compartmentId": compartment_id,
        "displayName": display_name,
        "imageSourceDetails": source,
    });
    if let Some(mode) = facts.launch_mode {
        body["launchMode"] = mode.into();
    }
    body
}

#[cfg(test)]
mod tests;
