//! ferry's OCI request signer against `openssl dgst -sha256 -sign`, the
//! reference: RSA PKCS#1 v1.5 signatures are deterministic, so for the same
//! key and signing string both must give the same bytes. Keys made by
//! `openssl` in both PEM forms an OCI user may have (PKCS#1 from older
//! OpenSSL and the OCI console's guide, PKCS#8 from OpenSSL 3's default).
//! Oracle's own published vectors use a 1024-bit key, which aws-lc-rs will
//! not sign with; `src/oci/sign.rs` checks its signing strings against them.

mod common;

use std::process::Command;

use base64::Engine;
use common::*;
use ferry::oci::sign::{Body, Request, Signer, signing_string};

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (tests/run.sh installs it)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
    out.stdout
}

#[test]
fn signatures_match_openssl_for_pkcs1_and_pkcs8_keys() {
    let dir = tmpdir();
    let pkcs1 = dir.path().join("pkcs1.pem");
    let pkcs8 = dir.path().join("pkcs8.pem");
    openssl(&[
        "genrsa",
        "-traditional",
        "-out",
        pkcs1.to_str().unwrap(),
        "2048",
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        pkcs8.to_str().unwrap(),
    ]);
    for (key, label) in [
        (&pkcs1, "BEGIN RSA PRIVATE KEY"),
        (&pkcs8, "BEGIN PRIVATE KEY"),
    ] {
        let pem = std::fs::read_to_string(key).unwrap();
        assert!(pem.contains(label), "openssl made another form: {pem:.40}");
        let signer = Signer::from_pem("tenancy/user/fp", &pem, key.to_str().unwrap()).unwrap();
        let body = br#"{"object": "disk.qcow2"}"#;
        let req = Request {
            method: "POST",
            path_and_query: "/n/ns/b/images/u/disk.qcow2",
            host: "objectstorage.us-ashburn-1.oraclecloud.com",
            date: "Fri, 27 Nov 2026 17:00:00 GMT",
            body: Body::Signed {
                content_type: "application/json",
                bytes: body,
            },
        };
        let signed = signer.sign(&req);
        let (_, text, sha) = signing_string(&req);
        let sent = signed
            .headers
            .iter()
            .find(|(k, _)| *k == "x-content-sha256")
            .map(|(_, v)| v.clone());
        assert_eq!(sent, sha);
        let text_file = dir.path().join("signing-string");
        std::fs::write(&text_file, &text).unwrap();
        let reference = openssl(&[
            "dgst",
            "-sha256",
            "-sign",
            key.to_str().unwrap(),
            text_file.to_str().unwrap(),
        ]);
        let want = base64::engine::general_purpose::STANDARD.encode(reference);
        assert!(
            signed
                .authorization
                .ends_with(&format!("signature=\"{want}\"")),
            "{label}: {} against openssl's {want}",
            signed.authorization
        );
        assert!(signed.authorization.starts_with(
            "Signature version=\"1\",headers=\"date (request-target) host content-length content-type x-content-sha256\",keyId=\"tenancy/user/fp\",algorithm=\"rsa-sha256\",signature=\""
        ));
        // The signer's Debug shows the key id, never the key.
        let shown = format!("{signer:?}");
        assert!(
            shown.contains("tenancy/user/fp") && !shown.contains("MII"),
            "{shown}"
        );
    }
}
