//! The sidecar `X.meta.json`: what the bytes cannot tell (OS, launch mode,
//! firmware) and the licence attestation OCI requires. Unknown keys are errors,
//! so a misspelt key never silently drops an attestation.

use serde::{Deserialize, Serialize};

/// What to write, shown when an attestation is required and missing.
pub const EXAMPLE: &str = r#"{"os": "Oracle Linux", "os_version": "8", "launch_mode": "PARAVIRTUALIZED", "firmware": "BIOS", "license": {"model": "BYOL", "attested_by": "ops@example.com", "attested_at": "2026-11-26T12:00:00Z", "statement": "This image complies with the licences of its OS and software."}}"#;

/// The sidecar of image `X` is `X` + this, beside it.
pub const SUFFIX: &str = ".meta.json";

/// The sidecar of the image at `path`: `path` + [`SUFFIX`].
pub fn path_of(image: &std::path::Path) -> std::path::PathBuf {
    let mut p = image.as_os_str().to_os_string();
    p.push(SUFFIX);
    std::path::PathBuf::from(p)
}

/// Sidecars larger than this are refused unread.
pub const MAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct License {
    /// e.g. BYOL, LICENSE_INCLUDED, OPEN_SOURCE.
    pub model: String,
    pub attested_by: String,
    pub attested_at: String,
    pub statement: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    pub os: Option<String>,
    pub os_version: Option<String>,
    pub launch_mode: Option<String>,
    pub firmware: Option<String>,
    pub license: Option<License>,
}

impl Sidecar {
    pub fn load(path: &std::path::Path) -> Result<Sidecar, String> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| format!("cannot read the sidecar: {e}"))?;
        let meta = f.metadata().map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("the sidecar is not a regular file".into());
        }
        if meta.len() > MAX_BYTES {
            return Err(format!(
                "the sidecar has {} bytes, more than the {MAX_BYTES} a sidecar may have",
                meta.len()
            ));
        }
        let mut text = String::new();
        f.take(MAX_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| format!("the sidecar is not UTF-8 text: {e}"))?;
        Sidecar::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Sidecar, String> {
        let s: Sidecar = serde_json::from_str(text)
            .map_err(|e| format!("the sidecar is not valid: {e}; it should look like {EXAMPLE}"))?;
        if let Some(m) = &s.launch_mode
            && !matches!(m.as_str(), "NATIVE" | "PARAVIRTUALIZED" | "EMULATED")
        {
            return Err(format!(
                "launch_mode {m:?} is not NATIVE, PARAVIRTUALIZED or EMULATED"
            ));
        }
        if let Some(f) = &s.firmware
            && !matches!(f.as_str(), "BIOS" | "UEFI_64")
        {
            return Err(format!("firmware {f:?} is not BIOS or UEFI_64"));
        }
        if let Some(l) = &s.license
            && [&l.model, &l.attested_by, &l.attested_at, &l.statement]
                .iter()
                .any(|v| v.trim().is_empty())
        {
            return Err(
                "license needs model, attested_by, attested_at and statement, none empty".into(),
            );
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_and_unknown_keys_fail() {
        let s = Sidecar::parse(EXAMPLE).unwrap();
        assert_eq!(s.license.unwrap().model, "BYOL");
        assert!(
            Sidecar::parse(r#"{"licence": {}}"#)
                .unwrap_err()
                .contains("licence")
        );
        assert!(Sidecar::parse(r#"{"launch_mode": "FAST"}"#).is_err());
    }
}
