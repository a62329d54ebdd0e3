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
pub const FORMAT_VERSION: u32 = 3;

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
    pub started_at: String,
    pub finished_at: String,
    /// Fields added by image inspection (format, launch mode, licence, ...).
    #[serde(flatten)]
    pub image: serde_json::Map<String, serde_json::Value>,
}

pub fn crc_hex(crc: u32) -> String {
    format!("{crc:08x}")
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
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        v.push(b'\n');
        v
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
}
