//! The OCI Object Storage test double (`tests/support/oci_double.py`) and
//! ferry's request signer, held to each other: what the double accepts when
//! ferry signs it, and what it refuses as the service would (an unknown key,
//! a header left unsigned, a body that is not the one signed, a clock 10
//! minutes off, a part whose CRC32C does not match), and that it carries
//! parts of tens of MiB in parallel, kept on disk, with the whole object's
//! CRC32C at commit. For the image import (issue 15) it also holds the
//! double's pre-authenticated requests (read unsigned, refused once deleted
//! or expired) and its Compute calls (CreateImage checked field by field,
//! one image per `opc-retry-token`, IMPORTING then AVAILABLE, or DISABLED
//! with a work-request error for bytes that are no image). The `oci://`
//! destination will be tested through this double; these tests keep the
//! double honest first.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use base64::Engine;
use common::*;
use ferry::oci::sign::{Body, Request, Signer};

const MIB: usize = 1 << 20;

/// The double (started as every test starts it, `common::OciDouble`) and a
/// signer of the key it knows.
struct Double {
    _double: OciDouble,
    port: u16,
    signer: Signer,
}

/// What the double answered.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Double {
    /// Starts the double with a new 2048-bit key, bucket `images` in
    /// namespace `ns`.
    fn start() -> Double {
        Double::start_with(serde_json::json!({}))
    }

    /// As `start`, with the config's keys in `extra` added or replaced.
    fn start_with(extra: serde_json::Value) -> Double {
        let double = OciDouble::start_with(|cfg| {
            cfg["namespace"] = "ns".into();
            cfg["buckets"] = serde_json::json!(["images"]);
            cfg["page_size"] = 1.into();
            for (k, v) in extra.as_object().expect("extra config is an object") {
                cfg[k] = v.clone();
            }
        });
        let key = &double.key_file;
        let signer = Signer::from_pem(
            &format!("{OCI_TENANCY}/{OCI_USER}/{OCI_FINGERPRINT}"),
            &std::fs::read_to_string(key).unwrap(),
            key.to_str().unwrap(),
        )
        .unwrap();
        Double {
            port: double.port,
            signer,
            _double: double,
        }
    }

    /// Sends one request signed by `signer` (as ferry will: the body's
    /// headers signed unless it is an object's bytes), `date` as given.
    #[allow(clippy::too_many_arguments)]
    fn send_as(
        &self,
        signer: &Signer,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        object_body: bool,
        date: SystemTime,
        extra: &[(&str, String)],
    ) -> Answer {
        let host = format!("127.0.0.1:{}", self.port);
        let date = httpdate::fmt_http_date(date);
        let signed = signer.sign(&Request {
            method,
            path_and_query: path,
            host: &host,
            date: &date,
            body: match body {
                None => Body::None,
                Some(_) if object_body => Body::Object,
                Some((content_type, bytes)) => Body::Signed {
                    content_type,
                    bytes,
                },
            },
        });
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {host}\r\ndate: {date}\r\nauthorization: {}\r\nconnection: close\r\n",
            signed.authorization
        );
        for (k, v) in &signed.headers {
            head += &format!("{k}: {v}\r\n");
        }
        let bytes = body.map(|(t, b)| (t, b.to_vec()));
        if signed.headers.is_empty()
            && let Some((t, b)) = &bytes
        {
            head += &format!("content-type: {t}\r\ncontent-length: {}\r\n", b.len());
        }
        for (k, v) in extra {
            head += &format!("{k}: {v}\r\n");
        }
        head += "\r\n";
        self.raw(head.as_bytes(), bytes.as_ref().map(|(_, b)| b.as_slice()))
    }

    /// CreateMultipartUpload with CRC32C in bucket `images`; its upload id.
    fn create_upload(&self, details: &[u8]) -> String {
        let created = self.send_as(
            &self.signer,
            "POST",
            "/n/ns/b/images/u",
            Some(("application/json", details)),
            false,
            SystemTime::now(),
            &[("opc-checksum-algorithm", "CRC32C".into())],
        );
        assert_eq!(created.status, 200, "{}", created.text());
        let upload: serde_json::Value = serde_json::from_slice(&created.body).unwrap();
        upload["uploadId"].as_str().unwrap().to_string()
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        object_body: bool,
    ) -> Answer {
        self.send_as(
            &self.signer,
            method,
            path,
            body,
            object_body,
            SystemTime::now(),
            &[],
        )
    }

    /// A request with no signature (a PAR's object, a `/_double/` call).
    fn unsigned(&self, method: &str, path: &str) -> Answer {
        self.raw(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{}\r\nconnection: close\r\n\r\n",
                self.port
            )
            .as_bytes(),
            None,
        )
    }

    /// A signed POST of a JSON document, with `extra` headers.
    fn post_json(&self, path: &str, doc: &serde_json::Value, extra: &[(&str, String)]) -> Answer {
        let doc = doc.to_string();
        self.send_as(
            &self.signer,
            "POST",
            path,
            Some(("application/json", doc.as_bytes())),
            false,
            SystemTime::now(),
            extra,
        )
    }

    /// PutObject into bucket `images`.
    fn put_object(&self, name: &str, bytes: &[u8]) {
        let put = self.send(
            "PUT",
            &format!("/n/ns/b/images/o/{name}"),
            Some(("application/octet-stream", bytes)),
            true,
        );
        assert_eq!(put.status, 200, "{}", put.text());
    }

    /// A PAR of `access_type` on `object` in bucket `images`, ending
    /// `expires_in` from now.
    fn make_par(&self, object: &str, access_type: &str, expires_in: Duration) -> serde_json::Value {
        let made = self.post_json(
            "/n/ns/b/images/p/",
            &serde_json::json!({
                "name": format!("ferry-{object}"),
                "accessType": access_type,
                "objectName": object,
                "timeExpires": humantime::format_rfc3339_millis(SystemTime::now() + expires_in).to_string(),
            }),
            &[],
        );
        assert_eq!(made.status, 200, "{}", made.text());
        serde_json::from_slice(&made.body).unwrap()
    }

    /// A signed GET answered with JSON: (status, document).
    fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let got = self.send("GET", path, None, false);
        let doc = serde_json::from_slice(&got.body).unwrap_or(serde_json::Value::Null);
        (got.status, doc)
    }

    /// GetImage until it leaves IMPORTING (at most 30 s): the final Image.
    fn wait_imported(&self, image_id: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (status, image) = self.get_json(&format!("/20160918/images/{image_id}"));
            assert_eq!(status, 200, "{image}");
            if image["lifecycleState"] != "IMPORTING" {
                return image;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still IMPORTING after 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn raw(&self, head: &[u8], body: Option<&[u8]>) -> Answer {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(head).unwrap();
        if let Some(b) = body {
            s.write_all(b).unwrap();
        }
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP answer");
        let head = String::from_utf8_lossy(&all[..split]).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Answer {
            status,
            headers,
            body: all[split + 4..].to_vec(),
        }
    }
}

fn b64_crc(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc32c::crc32c(data).to_be_bytes())
}

#[test]
fn the_double_takes_what_ferry_signs_and_refuses_what_oci_would() {
    let d = Double::start();
    let ns = d.send("GET", "/n/", None, false);
    assert_eq!((ns.status, ns.text()), (200, "\"ns\"".to_string()));
    assert!(ns.header("opc-request-id").is_some());

    // Refusals, each a 401 NotAuthenticated that says why.
    let unauthorized = |a: Answer, why: &str| {
        assert_eq!(a.status, 401, "{why}: {}", a.text());
        assert!(
            a.text().contains("NotAuthenticated") && a.text().contains(why),
            "{}",
            a.text()
        );
    };
    unauthorized(
        d.raw(
            format!(
                "GET /n/ HTTP/1.1\r\nhost: 127.0.0.1:{}\r\nconnection: close\r\n\r\n",
                d.port
            )
            .as_bytes(),
            None,
        ),
        "no Signature",
    );
    let dir = tmpdir();
    let other_key = dir.path().join("other.pem");
    oci_key(&other_key);
    let pem = std::fs::read_to_string(&other_key).unwrap();
    let stranger = Signer::from_pem(
        "ocid1.tenancy.oc1..t/ocid1.user.oc1..x/cc:dd",
        &pem,
        "other.pem",
    )
    .unwrap();
    unauthorized(
        d.send_as(&stranger, "GET", "/n/", None, false, SystemTime::now(), &[]),
        "unknown keyId",
    );
    // The right key id with the wrong key: the signature does not verify.
    let impostor = Signer::from_pem(d.signer.key_id(), &pem, "other.pem").unwrap();
    unauthorized(
        d.send_as(&impostor, "GET", "/n/", None, false, SystemTime::now(), &[]),
        "signature does not verify",
    );
    unauthorized(
        d.send_as(
            &d.signer,
            "GET",
            "/n/",
            None,
            false,
            SystemTime::now() - Duration::from_secs(600),
            &[],
        ),
        "more than 5 minutes off",
    );
    // A POST whose body headers are not signed (signed as if an object's bytes).
    let details = br#"{"object": "disk.qcow2"}"#;
    unauthorized(
        d.send(
            "POST",
            "/n/ns/b/images/u",
            Some(("application/json", details)),
            true,
        ),
        "headers not signed",
    );

    // A body that is not the one signed: its x-content-sha256 gives it away.
    let host = format!("127.0.0.1:{}", d.port);
    let date = httpdate::fmt_http_date(SystemTime::now());
    let signed = d.signer.sign(&Request {
        method: "POST",
        path_and_query: "/n/ns/b/images/u",
        host: &host,
        date: &date,
        body: Body::Signed {
            content_type: "application/json",
            bytes: details,
        },
    });
    let swapped = br#"{"object": "other.qcow"}"#;
    assert_eq!(swapped.len(), details.len(), "same length, other bytes");
    let mut head = format!(
        "POST /n/ns/b/images/u HTTP/1.1\r\nhost: {host}\r\ndate: {date}\r\nauthorization: {}\r\nconnection: close\r\n",
        signed.authorization
    );
    for (k, v) in &signed.headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    unauthorized(
        d.raw(head.as_bytes(), Some(swapped)),
        "x-content-sha256 is not the body's SHA-256",
    );
    // No Content-Length on a PUT: 411, as Object Storage takes no chunked body.
    let a = d.raw(
        format!("PUT /n/ns/b/images/o/x HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
        None,
    );
    assert_eq!(a.status, 411, "{}", a.text());

    // Multipart with CRC32C: a part whose CRC32C is wrong is refused; the
    // commit answers the whole object's CRC32C.
    let id = d.create_upload(details);
    let part1: Vec<u8> = (0..5 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    let part2: Vec<u8> = (0..MIB).map(|i| (i * 13 % 241) as u8).collect();
    let put = |n: u32, data: &[u8], crc: String| {
        d.send_as(
            &d.signer,
            "PUT",
            &format!("/n/ns/b/images/u/disk.qcow2?uploadId={id}&uploadPartNum={n}"),
            Some(("application/octet-stream", data)),
            true,
            SystemTime::now(),
            &[("opc-content-crc32c", crc)],
        )
    };
    let p1 = put(1, &part1, b64_crc(&part1));
    assert_eq!(p1.status, 200, "{}", p1.text());
    assert_eq!(
        p1.header("opc-content-crc32c"),
        Some(b64_crc(&part1).as_str())
    );
    let bad = put(2, &part2, b64_crc(&part1));
    assert_eq!(bad.status, 400);
    assert!(
        bad.text().contains("Unmatched Content CRC32C"),
        "{}",
        bad.text()
    );
    let md5_wrong = d.send_as(
        &d.signer,
        "PUT",
        &format!("/n/ns/b/images/u/disk.qcow2?uploadId={id}&uploadPartNum=2"),
        Some(("application/octet-stream", &part2)),
        true,
        SystemTime::now(),
        &[("content-md5", "AAAAAAAAAAAAAAAAAAAAAA==".into())],
    );
    assert_eq!(md5_wrong.status, 400);
    assert!(
        md5_wrong.text().contains("Unmatched Content MD5"),
        "{}",
        md5_wrong.text()
    );
    let p2 = put(2, &part2, b64_crc(&part2));
    assert_eq!(p2.status, 200, "{}", p2.text());
    // Listed a page at a time (page_size 1 here): a client must follow
    // opc-next-page to see every part.
    let list = |page: &str| {
        d.send(
            "GET",
            &format!("/n/ns/b/images/u/disk.qcow2?uploadId={id}{page}"),
            None,
            false,
        )
    };
    let first = list("");
    let items: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(items[0]["partNumber"], 1, "{items}");
    assert_eq!(items.as_array().unwrap().len(), 1, "{items}");
    let next = first
        .header("opc-next-page")
        .expect("a next page")
        .to_string();
    let second = list(&format!("&page={next}"));
    let items: serde_json::Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(items[0]["partNumber"], 2, "{items}");
    assert!(second.header("opc-next-page").is_none());
    // A commit must account for every part uploaded.
    let partial = serde_json::json!({"partsToCommit": [
        {"partNum": 1, "etag": p1.header("etag").unwrap()},
    ]})
    .to_string();
    let refused = d.send(
        "POST",
        &format!("/n/ns/b/images/u/disk.qcow2?uploadId={id}"),
        Some(("application/json", partial.as_bytes())),
        false,
    );
    assert_eq!(refused.status, 400);
    assert!(
        refused.text().contains("partsToExclude"),
        "{}",
        refused.text()
    );
    let commit = serde_json::json!({"partsToCommit": [
        {"partNum": 1, "etag": p1.header("etag").unwrap()},
        {"partNum": 2, "etag": p2.header("etag").unwrap()},
    ]})
    .to_string();
    let committed = d.send(
        "POST",
        &format!("/n/ns/b/images/u/disk.qcow2?uploadId={id}"),
        Some(("application/json", commit.as_bytes())),
        false,
    );
    assert_eq!(committed.status, 200, "{}", committed.text());
    let whole: Vec<u8> = [part1.as_slice(), part2.as_slice()].concat();
    assert_eq!(
        committed.header("opc-content-crc32c"),
        Some(b64_crc(&whole).as_str())
    );

    // The object: HEAD gives its size and CRC32C, a ranged GET its bytes.
    let head = d.send("HEAD", "/n/ns/b/images/o/disk.qcow2", None, false);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(whole.len().to_string().as_str())
    );
    assert_eq!(
        head.header("opc-content-crc32c"),
        Some(b64_crc(&whole).as_str())
    );
    assert_eq!(head.header("etag"), committed.header("etag"));
    assert!(
        head.header("opc-multipart-md5")
            .is_some_and(|m| m.ends_with("-2"))
    );
    let got = d.send_as(
        &d.signer,
        "GET",
        "/n/ns/b/images/o/disk.qcow2",
        None,
        false,
        SystemTime::now(),
        &[("range", format!("bytes={}-{}", 5 * MIB - 3, 5 * MIB + 2))],
    );
    assert_eq!(got.status, 206);
    assert_eq!(got.body, whole[5 * MIB - 3..5 * MIB + 3]);
    // An unknown bucket is named.
    let missing = d.send("HEAD", "/n/ns/b/nope/o/x", None, false);
    assert_eq!(missing.status, 404);
    let missing = d.send("GET", "/n/ns/b/nope/o/x", None, false);
    assert!(missing.text().contains("'nope'"), "{}", missing.text());
}

#[test]
fn the_double_carries_large_parts_in_parallel_and_answers_the_whole_crc32c() {
    use rand::{RngCore, SeedableRng};
    const PART: usize = 64 * MIB;
    let d = Double::start();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(64);
    let parts: Vec<Vec<u8>> = (0..3)
        .map(|_| {
            let mut p = vec![0u8; PART];
            rng.fill_bytes(&mut p);
            p
        })
        .collect();
    let details = br#"{"object": "big.qcow2"}"#;
    let id = d.create_upload(details);

    // All three parts in flight at once, as ferry sends them.
    let answers: Vec<Answer> = std::thread::scope(|scope| {
        let sent: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let (d, id) = (&d, &id);
                scope.spawn(move || {
                    d.send_as(
                        &d.signer,
                        "PUT",
                        &format!(
                            "/n/ns/b/images/u/big.qcow2?uploadId={id}&uploadPartNum={}",
                            i + 1
                        ),
                        Some(("application/octet-stream", part)),
                        true,
                        SystemTime::now(),
                        &[("opc-content-crc32c", b64_crc(part))],
                    )
                })
            })
            .collect();
        sent.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (part, a) in parts.iter().zip(&answers) {
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.header("opc-content-crc32c"), Some(b64_crc(part).as_str()));
    }
    let commit = serde_json::json!({"partsToCommit": answers.iter().enumerate().map(|(i, a)| {
        serde_json::json!({"partNum": i + 1, "etag": a.header("etag").unwrap()})
    }).collect::<Vec<_>>()})
    .to_string();
    let committed = d.send(
        "POST",
        &format!("/n/ns/b/images/u/big.qcow2?uploadId={id}"),
        Some(("application/json", commit.as_bytes())),
        false,
    );
    assert_eq!(committed.status, 200, "{}", committed.text());
    let whole_crc = parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p));
    let whole_crc = base64::engine::general_purpose::STANDARD.encode(whole_crc.to_be_bytes());
    assert_eq!(
        committed.header("opc-content-crc32c"),
        Some(whole_crc.as_str())
    );

    let head = d.send("HEAD", "/n/ns/b/images/o/big.qcow2", None, false);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some((3 * PART).to_string().as_str())
    );
    assert_eq!(head.header("opc-content-crc32c"), Some(whole_crc.as_str()));
    // A range across the boundary of parts 1 and 2, and one across 2 and 3.
    for boundary in [1, 2] {
        let (start, end) = (boundary * PART - 5, boundary * PART + 4);
        let got = d.send_as(
            &d.signer,
            "GET",
            "/n/ns/b/images/o/big.qcow2",
            None,
            false,
            SystemTime::now(),
            &[("range", format!("bytes={start}-{end}"))],
        );
        assert_eq!(got.status, 206, "{}", got.text());
        let want: Vec<u8> = parts[boundary - 1][PART - 5..]
            .iter()
            .chain(&parts[boundary][..5])
            .copied()
            .collect();
        assert_eq!(got.body, want);
    }
    let got = d.send("GET", "/n/ns/b/images/o/big.qcow2", None, false);
    assert_eq!(got.status, 200);
    assert!(got.body == parts.concat(), "the whole object is the parts");
}

#[test]
fn a_clock_offset_makes_a_true_clock_look_ten_minutes_off() {
    let d = Double::start_with(serde_json::json!({ "clock_offset_secs": 600 }));
    let at = |date: SystemTime| d.send_as(&d.signer, "GET", "/n/", None, false, date, &[]);
    let now = at(SystemTime::now());
    assert_eq!(now.status, 401, "{}", now.text());
    assert!(
        now.text().contains("more than 5 minutes off"),
        "{}",
        now.text()
    );
    let ahead = at(SystemTime::now() + Duration::from_secs(600));
    assert_eq!(ahead.status, 200, "{}", ahead.text());
}

/// A CreateImageDetails importing `source` (an imageSourceDetails).
fn create_image_details(source: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "compartmentId": "ocid1.compartment.oc1..c",
        "displayName": "disk",
        "launchMode": "PARAVIRTUALIZED",
        "freeformTags": { "ferry-crc32c": "AAAAAA==" },
        "imageSourceDetails": source,
    })
}

/// The first bytes of a QCOW2 (its magic), then zeros.
fn qcow2_like() -> Vec<u8> {
    let mut bytes = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    bytes.resize(64 * 1024, 0);
    bytes
}

#[test]
fn a_par_reads_an_object_unsigned_until_it_expires_or_is_deleted() {
    let d = Double::start();
    let bytes = qcow2_like();
    d.put_object("disk.qcow2", &bytes);

    let par = d.make_par("disk.qcow2", "ObjectRead", Duration::from_secs(3600));
    let uri = par["accessUri"].as_str().unwrap();
    assert!(
        uri.starts_with("/p/") && uri.ends_with("/n/ns/b/images/o/disk.qcow2"),
        "{par}"
    );
    assert_eq!(par["fullPath"], format!("http://127.0.0.1:{}{uri}", d.port));
    let read = d.unsigned("GET", uri);
    assert_eq!(read.status, 200, "{}", read.text());
    assert!(read.body == bytes, "the PAR serves the object's bytes");
    // Without the PAR the same object needs a signature.
    assert_eq!(d.unsigned("GET", "/n/ns/b/images/o/disk.qcow2").status, 401);
    // A read PAR grants reading that object, nothing else.
    assert_eq!(d.unsigned("DELETE", uri).status, 405);
    let other = uri.replace("disk.qcow2", "other.qcow2");
    assert_eq!(d.unsigned("GET", &other).status, 404);

    // Deleted: refused.
    let id = par["id"].as_str().unwrap();
    let deleted = d.send("DELETE", &format!("/n/ns/b/images/p/{id}"), None, false);
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    let after = d.unsigned("GET", uri);
    assert_eq!(after.status, 404, "{}", after.text());

    // Expired: refused (a PAR already expired cannot be made at all).
    let short = d.make_par("disk.qcow2", "ObjectRead", Duration::from_secs(1));
    let short_uri = short["accessUri"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.unsigned("GET", &short_uri).status == 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the PAR never expired"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.unsigned("GET", &short_uri).status, 404);
    let past = d.post_json(
        "/n/ns/b/images/p/",
        &serde_json::json!({
            "name": "late", "accessType": "ObjectRead", "objectName": "disk.qcow2",
            "timeExpires": humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(60)).to_string(),
        }),
        &[],
    );
    assert_eq!(past.status, 400, "{}", past.text());
    assert!(past.text().contains("timeExpires"), "{}", past.text());
    let no_object = d.post_json(
        "/n/ns/b/images/p/",
        &serde_json::json!({
            "name": "x", "accessType": "ObjectRead",
            "timeExpires": humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(60)).to_string(),
        }),
        &[],
    );
    assert_eq!(no_object.status, 400, "{}", no_object.text());
    assert!(
        no_object.text().contains("objectName"),
        "{}",
        no_object.text()
    );
}

#[test]
fn create_image_from_a_par_imports_once_per_retry_token_and_becomes_available() {
    let d = Double::start_with(serde_json::json!({ "import_secs": 1 }));
    d.put_object("disk.qcow2", &qcow2_like());
    let par = d.make_par("disk.qcow2", "ObjectRead", Duration::from_secs(3600));
    let details = create_image_details(serde_json::json!({
        "sourceType": "objectStorageUri",
        "sourceUri": par["fullPath"],
        "sourceImageType": "QCOW2",
        "operatingSystem": "Ubuntu",
        "operatingSystemVersion": "24.04",
    }));
    let token = [("opc-retry-token", "ferry-job-1-ashburn".to_string())];

    let created = d.post_json("/20160918/images", &details, &token);
    assert_eq!(created.status, 200, "{}", created.text());
    let image: serde_json::Value = serde_json::from_slice(&created.body).unwrap();
    let id = image["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ocid1.image.oc1.."), "{image}");
    assert_eq!(image["lifecycleState"], "IMPORTING");
    assert_eq!(image["launchMode"], "PARAVIRTUALIZED");
    assert_eq!(image["operatingSystem"], "Ubuntu");
    assert_eq!(image["freeformTags"]["ferry-crc32c"], "AAAAAA==");
    let work_request = created.header("opc-work-request-id").unwrap().to_string();

    // The same create again (a retry after a lost answer): the same image.
    let again = d.post_json("/20160918/images", &details, &token);
    assert_eq!(again.status, 200, "{}", again.text());
    let again: serde_json::Value = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(again["id"], id.as_str());
    // The same token with another body is a conflict.
    let mut changed = details.clone();
    changed["displayName"] = "other".into();
    let conflict = d.post_json("/20160918/images", &changed, &token);
    assert_eq!(conflict.status, 409, "{}", conflict.text());

    let (status, wr) = d.get_json(&format!("/20160918/workRequests/{work_request}"));
    assert_eq!(status, 200, "{wr}");
    assert_eq!(wr["operationType"], "CreateImage");
    assert_eq!(wr["resources"][0]["identifier"], id.as_str());

    let image = d.wait_imported(&id);
    assert_eq!(image["lifecycleState"], "AVAILABLE", "{image}");
    let (_, wr) = d.get_json(&format!("/20160918/workRequests/{work_request}"));
    assert_eq!(wr["status"], "SUCCEEDED", "{wr}");
    let (_, errors) = d.get_json(&format!("/20160918/workRequests/{work_request}/errors"));
    assert_eq!(errors, serde_json::json!([]));

    let record = d.unsigned("GET", "/_double/images");
    assert_eq!(record.status, 200, "{}", record.text());
    let record: serde_json::Value = serde_json::from_slice(&record.body).unwrap();
    assert_eq!(record["created"], 1, "{record}");
    assert_eq!(record["bodies"][0], details);
    assert_eq!(record["bodies"].as_array().unwrap().len(), 3);

    // GetImage and the work requests are signed calls like the rest.
    assert_eq!(
        d.unsigned("GET", &format!("/20160918/images/{id}")).status,
        401
    );
    let (status, _) = d.get_json("/20160918/images/ocid1.image.oc1..nosuch");
    assert_eq!(status, 404);
}

#[test]
fn create_image_refuses_bad_details_and_disables_what_is_no_image() {
    let d = Double::start_with(serde_json::json!({ "import_secs": 1 }));
    d.put_object("notes.txt", &[b'x'; 4096]);
    let tuple = serde_json::json!({
        "sourceType": "objectStorageTuple",
        "namespaceName": "ns", "bucketName": "images", "objectName": "notes.txt",
    });
    let refused = |doc: serde_json::Value, status: u16, code: &str, field: &str| {
        let a = d.post_json("/20160918/images", &doc, &[]);
        assert_eq!(a.status, status, "{}", a.text());
        assert!(
            a.text().contains(code) && a.text().contains(field),
            "{}",
            a.text()
        );
    };
    let mut no_compartment = create_image_details(tuple.clone());
    no_compartment
        .as_object_mut()
        .unwrap()
        .remove("compartmentId");
    refused(no_compartment, 400, "MissingParameter", "compartmentId");
    let mut bad_mode = create_image_details(tuple.clone());
    bad_mode["launchMode"] = "UNKNOWN".into();
    refused(bad_mode, 400, "InvalidParameter", "launchMode");
    let mut bad_type = create_image_details(tuple.clone());
    bad_type["imageSourceDetails"]["sourceImageType"] = "OCI".into();
    refused(bad_type, 400, "InvalidParameter", "sourceImageType");
    let mut missing_object = create_image_details(tuple.clone());
    missing_object["imageSourceDetails"]["objectName"] = "nosuch.qcow2".into();
    refused(missing_object, 400, "InvalidParameter", "nosuch.qcow2");
    let forged = create_image_details(serde_json::json!({
        "sourceType": "objectStorageUri",
        "sourceUri": format!("http://127.0.0.1:{}/p/forged/n/ns/b/images/o/notes.txt", d.port),
    }));
    refused(forged, 400, "InvalidParameter", "sourceUri");

    // An .oci export (a tar), put through a write PAR unsigned, imports.
    let mut tar = vec![0u8; 1024];
    tar[257..263].copy_from_slice(b"ustar\0");
    let write = d.make_par("disk.oci", "ObjectWrite", Duration::from_secs(3600));
    let head = format!(
        "PUT {} HTTP/1.1\r\nhost: 127.0.0.1:{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        write["accessUri"].as_str().unwrap(),
        d.port,
        tar.len()
    );
    let put = d.raw(head.as_bytes(), Some(&tar));
    assert_eq!(put.status, 200, "{}", put.text());
    let mut oci = create_image_details(tuple.clone());
    oci["launchMode"] = "NATIVE".into();
    oci["imageSourceDetails"]["objectName"] = "disk.oci".into();
    let oci = d.post_json("/20160918/images", &oci, &[]);
    assert_eq!(oci.status, 200, "{}", oci.text());
    let oci: serde_json::Value = serde_json::from_slice(&oci.body).unwrap();

    // A raw object imports, then ends DISABLED with the work request's error.
    let created = d.post_json("/20160918/images", &create_image_details(tuple), &[]);
    assert_eq!(created.status, 200, "{}", created.text());
    let image: serde_json::Value = serde_json::from_slice(&created.body).unwrap();
    let work_request = created.header("opc-work-request-id").unwrap().to_string();
    let image = d.wait_imported(image["id"].as_str().unwrap());
    assert_eq!(image["lifecycleState"], "DISABLED", "{image}");
    let (_, wr) = d.get_json(&format!("/20160918/workRequests/{work_request}"));
    assert_eq!(wr["status"], "FAILED", "{wr}");
    let (status, errors) = d.get_json(&format!("/20160918/workRequests/{work_request}/errors"));
    assert_eq!(status, 200);
    assert_eq!(errors[0]["code"], "ImageImportFailed", "{errors}");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("not supported"),
        "{errors}"
    );
    let oci = d.wait_imported(oci["id"].as_str().unwrap());
    assert_eq!(oci["lifecycleState"], "AVAILABLE", "{oci}");
    let record: serde_json::Value =
        serde_json::from_slice(&d.unsigned("GET", "/_double/images").body).unwrap();
    assert_eq!(record["created"], 2, "{record}");
}
