//! A profile of the OCI CLI's config file (`~/.oci/config`): the API key
//! ferry signs with, found the way the OCI CLI and SDKs find it.
//!
//! - The file: the destination's `config_file`, else `OCI_CLI_CONFIG_FILE`,
//!   else `~/.oci/config`. The profile: `profile`, else `OCI_CLI_PROFILE`,
//!   else `DEFAULT`.
//! - An INI file read as Python's configparser, which the OCI CLI uses,
//!   reads it: `[DEFAULT]`'s keys are inherited by every other profile;
//!   profile names are case-sensitive, key names are not; `#` and `;` start
//!   a comment only at the start of a line; an indented line continues the
//!   value above it.
//! - Keys ferry reads: `user`, `fingerprint`, `key_file`, `tenancy`,
//!   `region`, `pass_phrase`. Other keys belong to other tools and are left
//!   alone, but a profile made by `oci session authenticate`
//!   (`security_token_file`) is refused: it signs as a session, which ferry
//!   does not do yet. A `key_file` starting with `~/` is under `$HOME`.
//!
//! Promises: no error or warning shows a pass phrase or key material; a key
//! file others can read is warned about.
//!
//! Design choice: the `configparser` crate, a port of Python's, set to its
//! semantics (case-sensitive sections, no inline comments, indented
//! continuation lines). `rust-ini` was tried first: it lets a line without
//! `=` swallow the next key and joins a value ending in `\` with the next
//! line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::Class;
use crate::oci::sign::{KeyError, Signer};

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "OCI config file {path}: {source}; make one with `oci setup config`, or set the destination's config_file (or OCI_CLI_CONFIG_FILE)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("OCI config file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error(
        "OCI config file {path} has no profile [{profile}] (it has: {known}); set the destination's profile (or OCI_CLI_PROFILE)"
    )]
    NoProfile {
        path: String,
        profile: String,
        known: String,
    },
    #[error(
        "profile [{profile}] of {path} is a session-token profile (security_token_file, made by `oci session authenticate`), which ferry does not sign with yet; use an API-key profile (`oci setup config`)"
    )]
    SessionToken { path: String, profile: String },
    #[error(
        "profile [{profile}] of {path} has no {key} (neither its own nor [DEFAULT]'s, or it is empty); `oci setup config` writes user, fingerprint, key_file, tenancy and region"
    )]
    Missing {
        path: String,
        profile: String,
        key: &'static str,
    },
    #[error("key_file {path} of profile [{profile}]: {source}")]
    KeyFile {
        path: String,
        profile: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl ProfileError {
    /// [`Class::Fatal`]: an operator must fix the configuration.
    pub fn class(&self) -> Class {
        Class::Fatal
    }
}

/// One profile, its `[DEFAULT]` keys folded in.
#[derive(Clone, PartialEq, Eq)]
pub struct Profile {
    pub file: PathBuf,
    pub name: String,
    pub user: String,
    pub fingerprint: String,
    pub tenancy: String,
    pub key_file: PathBuf,
    pub region: Option<String>,
    /// Whether a pass phrase is set (its value is never kept).
    pub has_pass_phrase: bool,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("file", &self.file)
            .field("name", &self.name)
            .field("key_id", &self.key_id())
            .field("key_file", &self.key_file)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Where the file is: `explicit`, else `env` (`OCI_CLI_CONFIG_FILE`), else
/// `~/.oci/config`; a leading `~/` is under `home`.
pub fn config_path(explicit: Option<&str>, env: Option<&str>, home: &Path) -> PathBuf {
    let p = explicit
        .or(env.filter(|e| !e.is_empty()))
        .unwrap_or("~/.oci/config");
    under_home(p, home)
}

/// Which profile: `explicit`, else `env` (`OCI_CLI_PROFILE`), else `DEFAULT`.
pub fn profile_name(explicit: Option<&str>, env: Option<&str>) -> String {
    explicit
        .or(env.filter(|e| !e.is_empty()))
        .unwrap_or("DEFAULT")
        .to_string()
}

fn under_home(p: &str, home: &Path) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => PathBuf::from(p),
    }
}

impl Profile {
    /// Reads profile `name` of the config file at `path`.
    pub fn load(path: &Path, name: &str, home: &Path) -> Result<Profile, ProfileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: shown.clone(),
            source,
        })?;
        Profile::parse(&text, path, name, home)
    }

    pub fn parse(
        text: &str,
        path: &Path,
        name: &str,
        home: &Path,
    ) -> Result<Profile, ProfileError> {
        let shown = path.display().to_string();
        let mut defaults = configparser::ini::IniDefault::default();
        defaults.default_section = "DEFAULT".into();
        defaults.case_sensitive = true;
        defaults.multiline = true;
        defaults.enable_inline_comments = false;
        let sections = configparser::ini::Ini::new_from_defaults(defaults)
            .read(text.to_string())
            .map_err(|message| ProfileError::Syntax {
                path: shown.clone(),
                message,
            })?;
        // Key names are case-insensitive, as configparser's are.
        let section = |s: &str| -> Option<BTreeMap<String, String>> {
            sections.get(s).map(|keys| {
                keys.iter()
                    .map(|(k, v)| {
                        (
                            k.to_ascii_lowercase(),
                            v.as_deref().unwrap_or("").trim().to_string(),
                        )
                    })
                    .collect()
            })
        };
        let defaults = section("DEFAULT").unwrap_or_default();
        let own = section(name).ok_or_else(|| {
            let mut known: Vec<&str> = sections.keys().map(String::as_str).collect();
            known.sort();
            ProfileError::NoProfile {
                path: shown.clone(),
                profile: name.to_string(),
                known: known.join(", "),
            }
        })?;
        if own.contains_key("security_token_file") {
            return Err(ProfileError::SessionToken {
                path: shown,
                profile: name.to_string(),
            });
        }
        let get = |key: &'static str| -> Option<String> {
            own.get(key)
                .or_else(|| defaults.get(key))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let need = |key: &'static str| {
            get(key).ok_or_else(|| ProfileError::Missing {
                path: shown.clone(),
                profile: name.to_string(),
                key,
            })
        };
        Ok(Profile {
            file: path.to_path_buf(),
            name: name.to_string(),
            user: need("user")?,
            fingerprint: need("fingerprint")?,
            tenancy: need("tenancy")?,
            key_file: under_home(&need("key_file")?, home),
            region: get("region"),
            has_pass_phrase: get("pass_phrase").is_some(),
        })
    }

    /// The `keyId` of the signature: `TENANCY/USER/FINGERPRINT`.
    pub fn key_id(&self) -> String {
        format!("{}/{}/{}", self.tenancy, self.user, self.fingerprint)
    }

    /// The signer of this profile's key, and warnings to log (a key file
    /// that others can read).
    pub fn signer(&self) -> Result<(Signer, Vec<String>), ProfileError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = self.key_file.display().to_string();
        let key_err = |source| ProfileError::KeyFile {
            path: shown.clone(),
            profile: self.name.clone(),
            source,
        };
        let mode = std::fs::metadata(&self.key_file)
            .map_err(key_err)?
            .permissions()
            .mode();
        let mut warnings = Vec::new();
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "the OCI API key {shown} can be read by others (mode {:04o}): chmod 600 {shown}",
                mode & 0o7777
            ));
        }
        let pem = std::fs::read_to_string(&self.key_file).map_err(key_err)?;
        let signer = Signer::from_pem(&self.key_id(), &pem, &shown)?;
        Ok((signer, warnings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "# written by oci setup config
[DEFAULT]
user=ocid1.user.oc1..aaaa
fingerprint=20:3b:97:13:55:1c:5b:0d:d3:37:d8:50:4e:c5:3a:34
key_file=~/.oci/oci_api_key.pem
tenancy=ocid1.tenancy.oc1..bbbb
region=us-ashburn-1

[FRANKFURT]
Region = eu-frankfurt-1
  # a comment, indented
pass_phrase = s3cret#phrase;
not a key line

[SESSION]
security_token_file=~/.oci/token
";

    #[test]
    fn where_the_file_and_profile_are() {
        let home = Path::new("/home/op");
        assert_eq!(
            config_path(None, None, home),
            PathBuf::from("/home/op/.oci/config")
        );
        assert_eq!(
            config_path(None, Some("/etc/oci.conf"), home),
            PathBuf::from("/etc/oci.conf")
        );
        assert_eq!(
            config_path(Some("~/x"), Some("/etc/oci.conf"), home),
            PathBuf::from("/home/op/x")
        );
        assert_eq!(profile_name(None, None), "DEFAULT");
        assert_eq!(profile_name(None, Some("")), "DEFAULT");
        assert_eq!(profile_name(None, Some("ASH")), "ASH");
        assert_eq!(profile_name(Some("FRA"), Some("ASH")), "FRA");
    }

    #[test]
    fn profiles_inherit_default_and_keep_no_pass_phrase() {
        let home = Path::new("/home/op");
        let path = Path::new("/home/op/.oci/config");
        let d = Profile::parse(CONFIG, path, "DEFAULT", home).unwrap();
        assert_eq!(d.region.as_deref(), Some("us-ashburn-1"));
        assert_eq!(d.key_file, PathBuf::from("/home/op/.oci/oci_api_key.pem"));
        assert_eq!(
            d.key_id(),
            "ocid1.tenancy.oc1..bbbb/ocid1.user.oc1..aaaa/20:3b:97:13:55:1c:5b:0d:d3:37:d8:50:4e:c5:3a:34"
        );
        assert!(!d.has_pass_phrase);
        let f = Profile::parse(CONFIG, path, "FRANKFURT", home).unwrap();
        assert_eq!(f.region.as_deref(), Some("eu-frankfurt-1"));
        assert_eq!(f.user, d.user);
        assert!(f.has_pass_phrase);
        assert!(!format!("{f:?}").contains("s3cret"), "{f:?}");
        // Profile names are case-sensitive, as the OCI CLI's are.
        assert!(Profile::parse(CONFIG, path, "frankfurt", home).is_err());
        let e = Profile::parse(CONFIG, path, "SESSION", home)
            .unwrap_err()
            .to_string();
        assert!(e.contains("session-token profile"), "{e}");
    }

    #[test]
    fn what_is_wrong_is_said() {
        let home = Path::new("/home/op");
        let path = Path::new("/c");
        let e = Profile::parse(CONFIG, path, "PHOENIX", home)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[PHOENIX]") && e.contains("FRANKFURT"), "{e}");
        let e = Profile::parse(
            "[DEFAULT]\nuser=u\nfingerprint=f\nkey_file=k\n",
            path,
            "DEFAULT",
            home,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("has no tenancy"), "{e}");
        let e = Profile::load(Path::new("/nonexistent/oci/config"), "DEFAULT", home)
            .unwrap_err()
            .to_string();
        assert!(e.contains("oci setup config"), "{e}");
    }

    /// A new 2048-bit key in PKCS#8 PEM, made for the test.
    fn fresh_key_pem() -> String {
        use aws_lc_rs::encoding::AsDer;
        use base64::Engine;
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&key).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn a_key_others_can_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not a key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = CONFIG.replace("~/.oci/oci_api_key.pem", key.to_str().unwrap());
        let p = Profile::parse(&text, Path::new("/c"), "DEFAULT", dir.path()).unwrap();
        // Not a key: refused in words.
        let e = p.signer().unwrap_err().to_string();
        assert!(e.contains("not a PEM private key"), "{e}");
        std::fs::write(&key, fresh_key_pem()).unwrap();
        let (signer, warnings) = p.signer().unwrap();
        assert_eq!(signer.key_id(), p.key_id());
        assert!(
            warnings.len() == 1 && warnings[0].contains("chmod 600"),
            "{warnings:?}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(p.signer().unwrap().1.is_empty());
    }
}
