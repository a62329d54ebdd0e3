//! The import manifest written beside each object as `<name>.manifest.json`.
//!
//! Promises: a manifest is written only after its object verified, so its presence
//! means "this object is complete and checked". It records what a person (or a
//! later `ferry verify`) needs to check the object again without ferry's state:
//! sizes, the part plan, each part's CRC32C and the whole-object CRC32C.
//!
//! Design choice: CRCs are written as 8 lowercase hex digits (as `crc32c` tools
//! print them) and the whole-object CRC also in base64 of its big-endian bytes,
//! the form S3's `x-amz-checksum-crc32c` uses.

use base64::Engine;
use serde::{Deserialize, Serialize};

pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// 2: `destination.object_url` and, for a directory, `destination.path`
/// (its `key` became the file's name in it); `oci_create_image` only where
/// OCI can import from, else `oci_create_image_unavailable`.
/// 3: `server_verified`.
/// 4: `import`, once an import of the object as a custom image ended.
/// 5: `source`, for an image shipped from a bucket.
/// 6: `conversion`, for a QCOW2 ferry converted the image into; `image.member`
/// and `image.os_basis`.
pub const FORMAT_VERSION: u32 = 6;

/// `server_verified` when the store answered the whole object's CRC32C and
/// it was the file's.
pub const SERVER_WHOLE_CRC32C: &str = "crc32c-whole-object";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartEntry {
    pub index: u32,
    pub offset: u64,
    pub size_bytes: u64,
    pub crc32c: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DestinationEntry {
    pub name: String,
    /// The destination's URL as configured.
    pub url: String,
    /// The object's name in the store: the prefix and the file's name (for a
    /// directory, the file's name in it).
    pub key: String,
    /// The object's URL, the key encoded once (absent in version 1).
    #[serde(default)]
    pub object_url: String,
    /// For a directory: the file's path on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Where an image shipped from a bucket came from, and what its bytes were
/// checked against.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceEntry {
    /// The object's URL (`s3://...`, `oci://...`).
    pub url: String,
    /// The version read: every range was read by this ETag.
    pub etag: String,
    /// The whole object's CRC32C that its store keeps, which the parts sent
    /// combine to; absent when the store keeps none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_crc32c: Option<String>,
    /// The MD5 in the object's single-part ETag, which the bytes shipped
    /// give, where the store keeps no CRC32C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_md5: Option<String>,
    /// `crc32c-stored` (the bytes shipped were checked against the store's
    /// CRC32C), `md5-etag` (against the MD5 its single-part ETag is), or
    /// `none` (the store keeps no checksum ferry can check them with: only
    /// the ETag pinned the version).
    pub checked: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub manifest_version: u32,
    pub ferry_version: String,
    pub file_name: String,
    pub file_size_bytes: u64,
    pub part_size_bytes: u64,
    pub part_count: u32,
    pub crc32c: String,
    pub crc32c_base64: String,
    pub parts: Vec<PartEntry>,
    pub destination: DestinationEntry,
    pub verify: String,
    /// What the store itself checked: `crc32c-whole-object` (OCI answered
    /// the whole object's CRC32C and it was the file's), else what it
    /// checked of each part on arrival (`crc32c-per-part`,
    /// `crc64nvme-per-part`, `sha256-per-part`), or `none` (a directory).
    #[serde(default)]
    pub server_verified: String,
    pub source_host: String,
    /// For an image shipped from a bucket: the object it was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceEntry>,
    pub started_at: String,
    pub finished_at: String,
    /// The import of the object as a custom image, once it ended (the
    /// manifest is written again then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportEntry>,
    /// Fields added by image inspection (format, launch mode, licence, ...).
    #[serde(flatten)]
    pub image: serde_json::Map<String, serde_json::Value>,
}

/// The import of the object as a custom image: while it runs (from the
/// moment the image exists), and how it ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImportEntry {
    /// The image's OCID (absent when it was never created).
    pub image_id: Option<String>,
    /// Its lifecycle state: IMPORTING while it runs; when it ended,
    /// AVAILABLE, or why not (DISABLED, DELETED, IMPORTING at a timeout,
    /// `none` when the image was never created).
    pub state: String,
    /// `importing` (it runs: a `ferry import` waits for this image rather
    /// than make another), `available`, `failed` or `timed_out`.
    pub outcome: String,
    pub region: String,
    pub compartment_id: String,
    pub display_name: String,
    /// `par` (a pre-authenticated request, deleted afterwards) or `tuple`.
    pub source: String,
    pub launch_mode: String,
    pub work_request_id: Option<String>,
    pub started_at: String,
    /// Absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<u64>,
    /// Why it failed, in OCI's words (the work request's errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn crc_hex(crc: u32) -> String {
    format!("{crc:08x}")
}

/// An MD5 as 32 lowercase hex digits (the form of an S3 ETag).
pub fn md5_hex(md5: &[u8; 16]) -> String {
    md5.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn crc_base64(crc: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Manifest {
    /// Reads a manifest of any version ferry wrote; `Err` says what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("not a ferry manifest ({e})"))?;
        if !(1..=FORMAT_VERSION).contains(&m.manifest_version) {
            return Err(format!(
                "manifest_version {} is not one this ferry reads (1 to {FORMAT_VERSION}): use a newer ferry",
                m.manifest_version
            ));
        }
        Ok(m)
    }

    /// The image field `key` that inspection recorded (`format`,
    /// `launch_mode`, `launch_mode_basis`, `os`, ...), if it is text.
    pub fn image_field(&self, key: &str) -> Option<&str> {
        self.image.get("image")?.get(key)?.as_str()
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
impl Manifest {
    /// A manifest of a 3-part QCOW2 in an oci:// destination, for tests.
    pub(crate) fn example() -> Manifest {
        let image = serde_json::json!({
            "image": {
                "format": "qcow2",
                "format_name": "QCOW2 v3",
                "verdict": "accept",
                "launch_mode": "PARAVIRTUALIZED",
                "launch_mode_basis": "attested",
                "firmware": "BIOS",
                "firmware_basis": "inspected",
                "os": "Oracle Linux",
                "os_version": "9",
            }
        });
        Manifest {
            manifest_version: FORMAT_VERSION,
            ferry_version: "0.1.0".into(),
            file_name: "web01.qcow2".into(),
            file_size_bytes: 3 << 20,
            part_size_bytes: 1 << 20,
            part_count: 3,
            crc32c: crc_hex(0xe3069283),
            crc32c_base64: crc_base64(0xe3069283),
            parts: vec![],
            destination: DestinationEntry {
                name: "ashburn".into(),
                url: "oci://images/exports/".into(),
                key: "exports/web01.qcow2".into(),
                object_url: "https://objectstorage.us-ashburn-1.oraclecloud.com/n/ns1/b/images/o/exports/web01.qcow2".into(),
                path: None,
            },
            verify: "head".into(),
            server_verified: SERVER_WHOLE_CRC32C.into(),
            source_host: "host1".into(),
            source: None,
            started_at: "2026-12-07T10:00:00.000Z".into(),
            finished_at: "2026-12-07T10:01:00.000Z".into(),
            import: None,
            image: image.as_object().cloned().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_forms() {
        assert_eq!(crc_hex(0xe3069283), "e3069283");
        // CRC32C("123456789") = 0xe3069283 -> 4waSgw== in S3's base64 form
        assert_eq!(crc_base64(0xe3069283), "4waSgw==");
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe3069283);
    }

    #[test]
    fn a_manifest_reads_back_with_its_image_fields() {
        let m = Manifest::example();
        let back = Manifest::parse(&m.to_json()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.image_field("launch_mode"), Some("PARAVIRTUALIZED"));
        assert_eq!(back.image_field("nothing"), None);
        let mut newer = m.clone();
        newer.manifest_version = FORMAT_VERSION + 1;
        let e = Manifest::parse(&newer.to_json()).unwrap_err();
        assert!(e.contains("newer ferry"), "{e}");
        assert!(
            Manifest::parse(b"{}")
                .unwrap_err()
                .contains("not a ferry manifest")
        );
    }
}
