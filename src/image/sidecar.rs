//! The sidecar `X.meta.json`: what the bytes cannot tell (OS, launch mode,
//! firmware) and the licence attestation OCI requires. Unknown keys are errors,
//! so a misspelt key never silently drops an attestation.

use serde::{Deserialize, Serialize};

/// What to write, shown when an attestation is required and missing. Every
/// value is a placeholder that cannot pass for a real one, and a sidecar that
/// still holds one is refused: copied as it is, it would be a false attestation.
pub const EXAMPLE: &str = r#"{"os": "<your OS>", "os_version": "<its version>", "launch_mode": "<NATIVE, PARAVIRTUALIZED or EMULATED>", "firmware": "<BIOS or UEFI_64>", "license": {"model": "<BYOL, LICENSE_INCLUDED or OPEN_SOURCE>", "attested_by": "<who attests, e.g. your e-mail>", "attested_at": "<when, RFC 3339, e.g. 2026-11-27T09:30:00Z>", "statement": "<what you attest, e.g. This image complies with the licences of its OS and software.>"}}"#;

/// Whether `value` is a placeholder of [`EXAMPLE`] (or one like it): text in
/// angle brackets with a space in it. An address such as `<ops@example.com>`
/// has no space, so it is not one.
fn is_placeholder(value: &str) -> bool {
    let v = value.trim();
    v.starts_with('<') && v.ends_with('>') && v.contains(' ')
}

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
        let l = s.license.as_ref();
        for (key, value) in [
            ("os", s.os.as_ref()),
            ("os_version", s.os_version.as_ref()),
            ("launch_mode", s.launch_mode.as_ref()),
            ("firmware", s.firmware.as_ref()),
            ("license.model", l.map(|l| &l.model)),
            ("license.attested_by", l.map(|l| &l.attested_by)),
            ("license.attested_at", l.map(|l| &l.attested_at)),
            ("license.statement", l.map(|l| &l.statement)),
        ] {
            if let Some(v) = value
                && is_placeholder(v)
            {
                return Err(format!(
                    "the sidecar still holds the template's placeholder {v:?} in {key}: \
                     write the real value (or leave the key out where it is optional); \
                     an attestation copied from a template is not one"
                ));
            }
        }
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
        if let Some(l) = l
            && chrono::DateTime::parse_from_rfc3339(l.attested_at.trim()).is_err()
        {
            return Err(format!(
                "license.attested_at {:?} is not a time in RFC 3339 form, such as 2026-11-27T09:30:00Z \
                 or 2026-11-27T10:30:00+01:00 (date -Iseconds prints one)",
                l.attested_at
            ));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &str = r#"{"os": "Oracle Linux", "os_version": "9", "launch_mode": "PARAVIRTUALIZED", "license": {"model": "BYOL", "attested_by": "Jane Roe <jane@example.com>", "attested_at": "2026-11-27T09:30:00Z", "statement": "This image complies with the licences of its OS and software."}}"#;

    /// Issue 13, item 6: the template is refused as it is, and so is a
    /// sidecar with any one of its placeholders left in.
    #[test]
    fn the_template_and_any_of_its_placeholders_are_refused() {
        let e = Sidecar::parse(EXAMPLE).unwrap_err();
        assert!(e.contains("placeholder") && e.contains("<your OS>"), "{e}");
        let template: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        let real: serde_json::Value = serde_json::from_str(REAL).unwrap();
        let mut placeholders = 0;
        for key in ["os", "os_version", "launch_mode", "firmware"] {
            let mut v = real.clone();
            v[key] = template[key].clone();
            let e = Sidecar::parse(&v.to_string()).unwrap_err();
            assert!(e.contains("placeholder") && e.contains(key), "{key}: {e}");
            placeholders += 1;
        }
        for key in ["model", "attested_by", "attested_at", "statement"] {
            let mut v = real.clone();
            v["license"][key] = template["license"][key].clone();
            let e = Sidecar::parse(&v.to_string()).unwrap_err();
            assert!(e.contains("placeholder") && e.contains(key), "{key}: {e}");
            placeholders += 1;
        }
        assert_eq!(placeholders, 8);
        // A real one passes, an address in angle brackets included.
        let s = Sidecar::parse(REAL).unwrap();
        assert_eq!(
            s.license.unwrap().attested_by,
            "Jane Roe <jane@example.com>"
        );
        let mut v = real.clone();
        v["license"]["attested_by"] = "<jane@example.com>".into();
        assert!(Sidecar::parse(&v.to_string()).is_ok());
        // Any RFC 3339 offset, as `date -Iseconds` prints on a host not on UTC.
        for at in [
            "2026-11-27T10:30:00+01:00",
            "2026-11-27T09:30:00.123Z",
            "2026-11-27T04:30:00-05:00",
        ] {
            v["license"]["attested_at"] = at.into();
            assert!(Sidecar::parse(&v.to_string()).is_ok(), "{at}");
        }
        v["license"]["attested_at"] = "yesterday".into();
        let e = Sidecar::parse(&v.to_string()).unwrap_err();
        assert!(e.contains("RFC 3339"), "{e}");
    }

    #[test]
    fn example_parses_and_unknown_keys_fail() {
        let s = Sidecar::parse(REAL).unwrap();
        assert_eq!(s.license.unwrap().model, "BYOL");
        assert!(
            Sidecar::parse(r#"{"licence": {}}"#)
                .unwrap_err()
                .contains("licence")
        );
        assert!(Sidecar::parse(r#"{"launch_mode": "FAST"}"#).is_err());
    }
}
