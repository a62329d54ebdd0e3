//! One suite that every kind of destination runs, as object_store's own
//! `integration.rs` does for its stores: an upload begun, its parts sent out of
//! order and one sent twice (a retry), completed, checked with head and a
//! full read-back; a small object replaced; an aborted upload that leaves no
//! object; an upload continued by its id from a destination built anew (a
//! restart); a key with characters that need encoding; and a probe.
//!
//! A new kind of destination is a new file in `src/store/` and one test here.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ferry::chunk::{self, Budget, FirstReads, PartLimits, PartPlan};
use ferry::config::{DestinationConfig, ReaderKind, TransferConfig};
use ferry::source::Source;
use ferry::store::{Destination, PartReceipt};

use common::*;

const MIB: u64 = 1 << 20;

/// Reads parts of `image` as the transfer does (pread, 5 MiB parts).
struct Parts {
    reader: Arc<dyn chunk::Reader>,
    budget: Budget,
    plan: PartPlan,
}

impl Parts {
    fn of(image: &Path) -> Parts {
        let source = Source::open(image).unwrap();
        let plan = PartPlan::new(source.size_bytes, 5 * MIB, PartLimits::S3).unwrap();
        let first = Arc::new(FirstReads::new(plan.count));
        Parts {
            reader: chunk::reader(ReaderKind::Pread, source, plan, first, chunk::Cache::Keep),
            budget: Budget::new(64 * MIB),
            plan,
        }
    }

    async fn send(&self, dest: &Destination, name: &str, id: &str, index: u32) -> PartReceipt {
        let part = chunk::read(self.reader.clone(), &self.budget, index)
            .await
            .unwrap();
        dest.put_part(name, id, &part).await.unwrap()
    }
}

/// The suite. `make` builds the destination under test; it is called again
/// to stand for a restarted process.
async fn suite(make: impl Fn() -> Destination, image: &Path) {
    let parts = Parts::of(image);
    assert_eq!(parts.plan.count, 3, "the image makes three parts");
    let (size, crc) = (std::fs::metadata(image).unwrap().len(), file_crc(image));
    let dest = make();

    // Out of order, part 1 twice: the second replaces the first.
    let name = "odd %#?[] name ü.img";
    let id = dest.begin(name).await.unwrap();
    let mut receipts = BTreeMap::new();
    for i in [2, 0, 1, 1] {
        receipts.insert(i, parts.send(&dest, name, &id, i).await);
    }
    let receipts: Vec<PartReceipt> = receipts.into_values().collect();
    dest.complete(name, &id, &receipts).await.unwrap();
    let info = dest.head(name).await.unwrap();
    assert_eq!(info.size_bytes, size);
    if let Some(n) = info.parts {
        assert_eq!(n, 3, "part count");
    }
    assert_eq!(dest.readback(name).await.unwrap(), (size, crc));
    assert!(dest.key(name).ends_with(name), "{}", dest.key(name));

    // A small object is replaced whole.
    dest.put_small("note.json", "first".into()).await.unwrap();
    dest.put_small("note.json", "second".into()).await.unwrap();
    assert_eq!(&dest.get_small("note.json").await.unwrap()[..], b"second");

    // An aborted upload leaves no object.
    let id = dest.begin("aborted.img").await.unwrap();
    parts.send(&dest, "aborted.img", &id, 0).await;
    dest.abort("aborted.img", &id).await.unwrap();
    assert!(
        dest.head("aborted.img").await.is_err(),
        "an aborted upload left an object"
    );

    // Begun by one process, finished by the next, by its id.
    let id = dest.begin("resumed.img").await.unwrap();
    let first = parts.send(&dest, "resumed.img", &id, 0).await;
    drop(dest);
    let again = make();
    let mut receipts = vec![first];
    for i in 1..3 {
        receipts.push(parts.send(&again, "resumed.img", &id, i).await);
    }
    again.complete("resumed.img", &id, &receipts).await.unwrap();
    assert_eq!(again.readback("resumed.img").await.unwrap(), (size, crc));

    again.probe().await.unwrap();
}

fn destination(url: &str, extra: impl Fn(&mut DestinationConfig)) -> Destination {
    let mut cfg = DestinationConfig {
        url: url.to_string(),
        ..Default::default()
    };
    extra(&mut cfg);
    Destination::new("suite", &cfg, &TransferConfig::default(), 5 * MIB).unwrap()
}

fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("suite.img");
    random_file(&p, 12 * MIB, 2300);
    p
}

#[test]
fn file_destinations_run_the_suite() {
    let dir = tmpdir();
    let url = format!("file://{}/out/", dir.path().display());
    block_on(suite(|| destination(&url, |_| {}), &image(dir.path())));
}

#[test]
fn memory_destinations_run_the_suite() {
    let dir = tmpdir();
    block_on(suite(
        || destination("memory://suite/p/", |_| {}),
        &image(dir.path()),
    ));
}

#[test]
fn s3_destinations_run_the_suite() {
    let Some(s3) = s3() else { return };
    let dir = tmpdir();
    let url = format!("s3://{}/{}/", s3.buckets[0], unique_prefix("suite"));
    let endpoint = s3.endpoint.clone();
    block_on(suite(
        || {
            destination(&url, |c| {
                c.endpoint = Some(endpoint.clone());
                c.access_key_id = Some(key_id());
                c.secret_access_key = Some(secret());
            })
        },
        &image(dir.path()),
    ));
}

/// OCI Object Storage's own API, through the double of it
/// (`tests/support/oci_double.py`), which checks every signature and every
/// part's CRC32C. Every part is listed for a resume, and the commit answers
/// the whole object's CRC32C.
#[test]
fn oci_destinations_run_the_suite() {
    let double = OciDouble::start_with(|c| c["page_size"] = 2.into());
    let dir = tmpdir();
    let url = "oci://images/suite/";
    block_on(async {
        suite(
            || destination(url, |c| *c = double.destination_config(url)),
            &image(dir.path()),
        )
        .await;
        // What only OCI does: the commit's whole-object CRC32C, the parts it
        // lists for a resume (across pages: two per page here), and head's
        // stored CRC32C.
        let dest = destination(url, |c| *c = double.destination_config(url));
        let image = image(dir.path());
        let parts = Parts::of(&image);
        let id = dest.begin("whole.img").await.unwrap();
        let mut receipts = Vec::new();
        for i in 0..3 {
            receipts.push(parts.send(&dest, "whole.img", &id, i).await);
        }
        let listed = dest.listed_parts("whole.img", &id).await.unwrap().unwrap();
        assert_eq!(listed.len(), 3);
        for (l, r) in listed.iter().zip(&receipts) {
            assert_eq!(
                (l.index, &l.part_id, l.size_bytes),
                (r.index, &r.part_id, r.size_bytes)
            );
        }
        let crc = file_crc(&image);
        assert_eq!(
            dest.complete("whole.img", &id, &receipts).await.unwrap(),
            Some(crc)
        );
        assert_eq!(dest.head("whole.img").await.unwrap().crc32c, Some(crc));
        assert_eq!(dest.server_check(), "crc32c-per-part");
    });
}
