//! OCI request signing: HTTP signatures (draft-cavage-http-signatures-08)
//! with RSA-SHA256, as Oracle documents them (`signingrequests.htm`) and its
//! SDKs send them.
//!
//! Which headers are signed:
//! - GET, HEAD, DELETE, and Object Storage's PutObject and UploadPart (whose
//!   bodies Oracle's SDKs leave unhashed, so a part is never read twice):
//!   `date (request-target) host`;
//! - every other request with a body (CreateMultipartUpload,
//!   CommitMultipartUpload, CreateImage, ...): those three and
//!   `content-length content-type x-content-sha256`.
//!
//! Promises: key material never appears in an error or a log line; a key
//! ferry cannot use is refused in words that say how to make one it can.
//!
//! Design choice: the RSA signature comes from aws-lc-rs, which object_store
//! already builds for TLS, not from a second RSA implementation (the `rsa`
//! crate carries an open timing advisory, RUSTSEC-2023-0071). aws-lc-rs
//! signs only with keys of 2048 to 8192 bits; OCI's API keys are 2048 bits
//! or more, but Oracle's published test vectors use a 1024-bit key, so the
//! tests check the signing strings built here against those vectors by
//! verifying Oracle's published signatures over them, and check the signer
//! against `openssl dgst -sha256 -sign` with 2048-bit keys
//! (`tests/oci_sign.rs`).

use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine;

use crate::error::Class;

/// Why a key cannot sign.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{path}: the key is encrypted with a pass phrase, which ferry does not read; write an unencrypted copy only ferry's user can read: openssl pkey -in {path} -out {path}.ferry && chmod 600 {path}.ferry, then point key_file at it"
    )]
    Encrypted { path: String },
    #[error(
        "{path}: not a PEM private key (\"-----BEGIN RSA PRIVATE KEY-----\" or \"-----BEGIN PRIVATE KEY-----\"); key_file should name the private half of the API key uploaded to OCI"
    )]
    NotPem { path: String },
    #[error(
        "{path}: the key is not an RSA key of 2048 to 8192 bits ({why}); OCI's API keys are RSA keys of at least 2048 bits: openssl genrsa -out oci_api_key.pem 2048"
    )]
    Rejected { path: String, why: String },
}

impl KeyError {
    /// [`Class::Fatal`]: an operator must give ferry a key it can use.
    pub fn class(&self) -> Class {
        Class::Fatal
    }
}

/// An API key ready to sign: its id (`TENANCY/USER/FINGERPRINT`) and its
/// private half. Debug shows the id only.
pub struct Signer {
    key_id: String,
    key: RsaKeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A request's body, as far as signing cares.
pub enum Body<'a> {
    /// No body. A POST or PUT without one still signs an empty body's
    /// length, type (`application/json`) and SHA-256, as OCI requires.
    None,
    /// An object's bytes (PutObject, UploadPart, so a PUT): not hashed, not
    /// signed.
    Object,
    /// Any other body: its length, type and SHA-256 are signed.
    Signed {
        content_type: &'a str,
        bytes: &'a [u8],
    },
}

/// What to sign of one request. `path_and_query` is exactly as sent
/// (encoded), `date` exactly as in the `date` header.
pub struct Request<'a> {
    pub method: &'a str,
    pub path_and_query: &'a str,
    pub host: &'a str,
    pub date: &'a str,
    pub body: Body<'a>,
}

/// The headers to add to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub authorization: String,
    /// Every signed header but `date` and `host` that the request must carry
    /// with exactly this value: for a signed body, `content-length`,
    /// `content-type` and `x-content-sha256`.
    pub headers: Vec<(&'static str, String)>,
}

impl Signer {
    /// Reads a PEM private key: PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8
    /// (`BEGIN PRIVATE KEY`), unencrypted. `path` only names it in errors.
    pub fn from_pem(key_id: &str, pem: &str, path: &str) -> Result<Signer, KeyError> {
        let path = path.to_string();
        if pem.contains("ENCRYPTED") {
            return Err(KeyError::Encrypted { path });
        }
        let (label, der) = pem_block(pem).ok_or_else(|| KeyError::NotPem { path: path.clone() })?;
        let key = match label.as_str() {
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der),
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
            other if other.ends_with("PRIVATE KEY") => {
                return Err(KeyError::Rejected {
                    path,
                    why: format!("a {other}, not an RSA one"),
                });
            }
            _ => return Err(KeyError::NotPem { path }),
        }
        .map_err(|e| KeyError::Rejected {
            path,
            why: e.to_string(),
        })?;
        Ok(Signer {
            key_id: key_id.to_string(),
            key,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The `authorization` header (and `x-content-sha256`) for `req`.
    pub fn sign(&self, req: &Request<'_>) -> Signed {
        let (names, text, sha) = signing_string(req);
        let mut headers = Vec::new();
        if let Some(sha) = &sha {
            let (content_type, len) = match &req.body {
                Body::Signed {
                    content_type,
                    bytes,
                } => (content_type.to_string(), bytes.len()),
                _ => (EMPTY_BODY_TYPE.to_string(), 0),
            };
            headers.push(("content-length", len.to_string()));
            headers.push(("content-type", content_type));
            headers.push(("x-content-sha256", sha.clone()));
        }
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        let rng = aws_lc_rs::rand::SystemRandom::new();
        self.key
            .sign(&RSA_PKCS1_SHA256, &rng, text.as_bytes(), &mut sig)
            .expect("an RSA key of 2048 to 8192 bits signs any message");
        Signed {
            authorization: format!(
                "Signature version=\"1\",headers=\"{names}\",keyId=\"{}\",algorithm=\"rsa-sha256\",signature=\"{}\"",
                self.key_id,
                base64::engine::general_purpose::STANDARD.encode(&sig)
            ),
            headers,
        }
    }
}

/// The type signed for a POST or PUT without a body.
const EMPTY_BODY_TYPE: &str = "application/json";

/// The signed header names (space-separated), the signing string (lines
/// joined by `\n`, none after the last) and the body's SHA-256 if signed.
pub fn signing_string(req: &Request<'_>) -> (String, String, Option<String>) {
    let target = format!("{} {}", req.method.to_ascii_lowercase(), req.path_and_query);
    let mut headers = vec![
        ("date", req.date.to_string()),
        ("(request-target)", target),
        ("host", req.host.to_string()),
    ];
    let mut sha = None;
    let method = req.method.to_ascii_uppercase();
    debug_assert!(
        !matches!(req.body, Body::Object) || method == "PUT",
        "only a PUT carries an object's bytes"
    );
    let body = match &req.body {
        Body::None if matches!(method.as_str(), "POST" | "PUT" | "PATCH") => {
            Some((EMPTY_BODY_TYPE, &[][..]))
        }
        Body::Signed {
            content_type,
            bytes,
        } => Some((*content_type, *bytes)),
        _ => None,
    };
    if let Some((content_type, bytes)) = body {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
        let b64 = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
        headers.push(("content-length", bytes.len().to_string()));
        headers.push(("content-type", content_type.to_string()));
        headers.push(("x-content-sha256", b64.clone()));
        sha = Some(b64);
    }
    let names = headers
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(" ");
    let text = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}"))
        .collect::<Vec<_>>()
        .join("\n");
    (names, text, sha)
}

/// The label and bytes of the first PEM block in `text`.
fn pem_block(text: &str) -> Option<(String, Vec<u8>)> {
    let start = text.find("-----BEGIN ")?;
    let rest = &text[start + "-----BEGIN ".len()..];
    let (label, rest) = rest.split_once("-----")?;
    let end = rest.find(&format!("-----END {label}-----"))?;
    let b64: String = rest[..end].split_whitespace().collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some((label.to_string(), der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, UnparsedPublicKey};

    /// The public half of Oracle's test key (RSA-1024, in `signingrequests.htm`
    /// and oci-go-sdk's `common/http_signer_test.go`), derived here with
    /// `openssl rsa -RSAPublicKey_out`.
    const ORACLE_PUBLIC: &str = "-----BEGIN RSA PUBLIC KEY-----
MIGJAoGBAMIUQ0bDffIaKHL3akONlCGXQLfqs8mP4K99ILz6rbyHEDXrVAU1R3Xf
C4JNRyrRB3aqwF7/aEXJzYMIkmDSHUvvz7pnhQxHsQ5yl91QT0d/eb+Gz4VRHjm4
El4MrUdIUcPxscoPqS/wU8Z8lOi1z7bGMnChiL7WGqnV8h6RrGzJAgMBAAE=
-----END RSA PUBLIC KEY-----";

    /// Oracle's date, verbatim: 5 January 2014 was a Sunday, not a Thursday,
    /// and a date built from a clock would sign something else.
    const DATE: &str = "Thu, 05 Jan 2014 21:31:40 GMT";
    const HOST: &str = "iaas.us-phoenix-1.oraclecloud.com";

    fn oracle_signature_verifies(text: &str, signature_b64: &str) -> bool {
        let (_, der) = pem_block(ORACLE_PUBLIC).unwrap();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(signature_b64)
            .unwrap();
        UnparsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, der)
            .verify(text.as_bytes(), &sig)
            .is_ok()
    }

    /// Oracle's GET vector: the signing string built here is the one Oracle's
    /// published signature was made over.
    #[test]
    fn oracle_get_vector() {
        let path = "/20160918/instances?availabilityDomain=Pjwf%3A%20PHX-AD-1&compartmentId=ocid1.compartment.oc1..aaaaaaaam3we6vgnherjq5q2idnccdflvjsnog7mlr6rtdb25gilchfeyjxa&displayName=TeamXInstances&volumeId=ocid1.volume.oc1.phx.abyhqljrgvttnlx73nmrwfaux7kcvzfs3s66izvxf2h4lgvyndsdsnoiwr5q";
        let (names, text, sha) = signing_string(&Request {
            method: "GET",
            path_and_query: path,
            host: HOST,
            date: DATE,
            body: Body::None,
        });
        assert_eq!(names, "date (request-target) host");
        assert_eq!(
            text,
            format!("date: {DATE}\n(request-target): get {path}\nhost: {HOST}")
        );
        assert_eq!(sha, None);
        assert!(oracle_signature_verifies(
            &text,
            "GBas7grhyrhSKHP6AVIj/h5/Vp8bd/peM79H9Wv8kjoaCivujVXlpbKLjMPeDUhxkFIWtTtLBj3sUzaFj34XE6YZAHc9r2DmE4pMwOAy/kiITcZxa1oHPOeRheC0jP2dqbTll8fmTZVwKZOKHYPtrLJIJQHJjNvxFWeHQjMaR7M="
        ));
        // The check can fail: one byte off, and Oracle's signature does not hold.
        assert!(!oracle_signature_verifies(
            &text.replace("Thu,", "Sun,"),
            "GBas7grhyrhSKHP6AVIj/h5/Vp8bd/peM79H9Wv8kjoaCivujVXlpbKLjMPeDUhxkFIWtTtLBj3sUzaFj34XE6YZAHc9r2DmE4pMwOAy/kiITcZxa1oHPOeRheC0jP2dqbTll8fmTZVwKZOKHYPtrLJIJQHJjNvxFWeHQjMaR7M="
        ));
    }

    /// Oracle's POST vector: the body's length, type and SHA-256 are signed.
    #[test]
    fn oracle_post_vector() {
        let body = "{\n    \"compartmentId\": \"ocid1.compartment.oc1..aaaaaaaam3we6vgnherjq5q2idnccdflvjsnog7mlr6rtdb25gilchfeyjxa\",\n    \"instanceId\": \"ocid1.instance.oc1.phx.abuw4ljrlsfiqw6vzzxb43vyypt4pkodawglp3wqxjqofakrwvou52gb6s5a\",\n    \"volumeId\": \"ocid1.volume.oc1.phx.abyhqljrgvttnlx73nmrwfaux7kcvzfs3s66izvxf2h4lgvyndsdsnoiwr5q\"\n}";
        assert_eq!(body.len(), 316);
        let (names, text, sha) = signing_string(&Request {
            method: "POST",
            path_and_query: "/20160918/volumeAttachments",
            host: HOST,
            date: DATE,
            body: Body::Signed {
                content_type: "application/json",
                bytes: body.as_bytes(),
            },
        });
        assert_eq!(
            names,
            "date (request-target) host content-length content-type x-content-sha256"
        );
        assert_eq!(
            sha.as_deref(),
            Some("V9Z20UJTvkvpJ50flBzKE32+6m2zJjweHpDMX/U4Uy0=")
        );
        assert_eq!(
            text,
            format!(
                "date: {DATE}\n(request-target): post /20160918/volumeAttachments\nhost: {HOST}\ncontent-length: 316\ncontent-type: application/json\nx-content-sha256: V9Z20UJTvkvpJ50flBzKE32+6m2zJjweHpDMX/U4Uy0="
            )
        );
        assert!(oracle_signature_verifies(
            &text,
            "Mje8vIDPlwIHmD/cTDwRxE7HaAvBg16JnVcsuqaNRim23fFPgQfLoOOxae6WqKb1uPjYEl0qIdazWaBy/Ml8DRhqlocMwoSXv0fbukP8J5N80LCmzT/FFBvIvTB91XuXI3hYfP9Zt1l7S6ieVadHUfqBedWH0itrtPJBgKmrWso="
        ));
    }

    /// A POST without a body signs an empty one: OCI wants the three body
    /// headers on every POST and PUT but an object's.
    #[test]
    fn a_post_without_a_body_signs_an_empty_one() {
        let (names, text, sha) = signing_string(&Request {
            method: "POST",
            path_and_query: "/n/ns/b/images/actions/renameObject",
            host: HOST,
            date: DATE,
            body: Body::None,
        });
        assert_eq!(
            names,
            "date (request-target) host content-length content-type x-content-sha256"
        );
        // The SHA-256 of nothing.
        assert_eq!(
            sha.as_deref(),
            Some("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")
        );
        assert!(
            text.contains("content-length: 0\ncontent-type: application/json"),
            "{text}"
        );
    }

    /// PutObject and UploadPart sign only the three headers, as the SDKs do.
    #[test]
    fn object_bodies_are_not_hashed() {
        let (names, text, sha) = signing_string(&Request {
            method: "PUT",
            path_and_query: "/n/ns/b/images/u/disk.qcow2?uploadId=abc&uploadPartNum=1",
            host: "objectstorage.us-ashburn-1.oraclecloud.com",
            date: DATE,
            body: Body::Object,
        });
        assert_eq!(names, "date (request-target) host");
        assert_eq!(text.lines().count(), 3);
        assert_eq!(sha, None);
    }

    /// Oracle's 1024-bit test key: refused in words, the key never shown.
    #[test]
    fn unusable_keys_are_refused_in_words() {
        let pem = "-----BEGIN RSA PRIVATE KEY-----
MIICXgIBAAKBgQDCFENGw33yGihy92pDjZQhl0C36rPJj+CvfSC8+q28hxA161QF
NUd13wuCTUcq0Qd2qsBe/2hFyc2DCJJg0h1L78+6Z4UMR7EOcpfdUE9Hf3m/hs+F
UR45uBJeDK1HSFHD8bHKD6kv8FPGfJTotc+2xjJwoYi+1hqp1fIekaxsyQIDAQAB
AoGBAJR8ZkCUvx5kzv+utdl7T5MnordT1TvoXXJGXK7ZZ+UuvMNUCdN2QPc4sBiA
QWvLw1cSKt5DsKZ8UETpYPy8pPYnnDEz2dDYiaew9+xEpubyeW2oH4Zx71wqBtOK
kqwrXa/pzdpiucRRjk6vE6YY7EBBs/g7uanVpGibOVAEsqH1AkEA7DkjVH28WDUg
f1nqvfn2Kj6CT7nIcE3jGJsZZ7zlZmBmHFDONMLUrXR/Zm3pR5m0tCmBqa5RK95u
412jt1dPIwJBANJT3v8pnkth48bQo/fKel6uEYyboRtA5/uHuHkZ6FQF7OUkGogc
mSJluOdc5t6hI1VsLn0QZEjQZMEOWr+wKSMCQQCC4kXJEsHAve77oP6HtG/IiEn7
kpyUXRNvFsDE0czpJJBvL/aRFUJxuRK91jhjC68sA7NsKMGg5OXb5I5Jj36xAkEA
gIT7aFOYBFwGgQAQkWNKLvySgKbAZRTeLBacpHMuQdl1DfdntvAyqpAZ0lY0RKmW
G6aFKaqQfOXKCyWoUiVknQJAXrlgySFci/2ueKlIE1QqIiLSZ8V8OlpFLRnb1pzI
7U1yQXnTAEFYM560yJlzUpOb1V4cScGd365tiSMvxLOvTA==
-----END RSA PRIVATE KEY-----";
        let e = Signer::from_pem("t/u/f", pem, "/k.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("2048") && e.contains("/k.pem"), "{e}");
        assert!(!e.contains("MIIC"), "key material in {e}");
        let e = Signer::from_pem(
            "t/u/f",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "/k.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("pass phrase") && e.contains("openssl pkey"),
            "{e}"
        );
        assert!(!e.contains("MIIF"), "key material in {e}");
        let e = Signer::from_pem("t/u/f", "not a key", "/k.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a PEM private key"), "{e}");
        let e = Signer::from_pem(
            "t/u/f",
            "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n",
            "/k.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not an RSA one") && e.contains("2048"), "{e}");
    }
}
