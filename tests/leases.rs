//! Claims on a bucket source's objects, shared by several ferries with no
//! coordinator (`source::lease`), against the real conditional writes of
//! SeaweedFS and the OCI double: exactly one of two concurrent claimers
//! wins, a live lease holds, an expired one is taken over exactly once, a
//! holder that lost its lease cannot renew it, and done or failed objects
//! are no longer jobs.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use ferry::source::lease::{self, Bucket, BucketError, Claim};

const LEASE: Duration = Duration::from_secs(30);

fn taken(c: &Result<Claim, BucketError>) -> bool {
    matches!(c, Ok(Claim::Taken { .. }))
}

/// The whole contract, on one store.
fn claims_hold(bucket: Arc<dyn Bucket>) {
    block_on(async {
        let b = &*bucket;
        // Two ferries at once, ten times: one wins each object.
        for i in 0..10 {
            let name = format!("race{i}.qcow2");
            let now = SystemTime::now();
            let (x, y) = tokio::join!(
                lease::claim(b, &name, "host-a", LEASE, now),
                lease::claim(b, &name, "host-b", LEASE, now)
            );
            assert_eq!(
                [taken(&x), taken(&y)].iter().filter(|t| **t).count(),
                1,
                "{name}: {x:?} / {y:?}"
            );
            let loser = if taken(&x) { y } else { x };
            assert!(matches!(loser, Ok(Claim::Held(_))), "{loser:?}");
        }

        // A live lease holds; an expired one is taken over, once.
        let now = SystemTime::now();
        let Ok(Claim::Taken {
            lease: mut first,
            took_over: None,
        }) = lease::claim(b, "web01.qcow2", "host-a", LEASE, now).await
        else {
            panic!("a free object is taken");
        };
        first.renew(b, now + Duration::from_secs(5)).await.unwrap();
        // A renewal the store applied but whose answer was lost: the lease's
        // ETag moved, its body is still this claim's. The next renewal
        // knows it by its token and goes on.
        let key = ".ferry/leases/web01.qcow2";
        let (body, _) = b.read(key).await.unwrap().unwrap();
        b.write(key, body).await.unwrap();
        first.renew(b, now + Duration::from_secs(5)).await.unwrap();
        let later = now + Duration::from_secs(20);
        match lease::claim(b, "web01.qcow2", "host-b", LEASE, later).await {
            Ok(Claim::Held(h)) => assert_eq!(h.host, "host-a"),
            other => panic!("a live lease holds: {other:?}"),
        }
        let expired = now + Duration::from_secs(5) + LEASE + Duration::from_secs(1);
        let (x, y) = tokio::join!(
            lease::claim(b, "web01.qcow2", "host-b", LEASE, expired),
            lease::claim(b, "web01.qcow2", "host-c", LEASE, expired)
        );
        assert_eq!(
            [taken(&x), taken(&y)].iter().filter(|t| **t).count(),
            1,
            "one takeover: {x:?} / {y:?}"
        );
        let (winner, _) = if taken(&x) { (x, y) } else { (y, x) };
        let Ok(Claim::Taken {
            lease: second,
            took_over: Some(was),
        }) = winner
        else {
            panic!("taken over");
        };
        assert_eq!(was.host, "host-a");
        // The old holder learns it lost the lease: its job must stop.
        assert!(matches!(
            first.renew(b, expired).await,
            Err(BucketError::Precondition(_))
        ));
        second.release(b).await.unwrap();
        assert!(taken(
            &lease::claim(b, "web01.qcow2", "host-a", LEASE, expired).await
        ));

        // Done and failed objects are not jobs; ferry's own objects never are.
        b.write("a.qcow2", bytes::Bytes::from_static(b"A"))
            .await
            .unwrap();
        b.write("b.qcow2", bytes::Bytes::from_static(b"B"))
            .await
            .unwrap();
        b.write("c.qcow2", bytes::Bytes::from_static(b"C"))
            .await
            .unwrap();
        lease::mark_done(b, "a.qcow2", bytes::Bytes::from_static(b"{}"))
            .await
            .unwrap();
        lease::mark_failed(b, "b.qcow2", bytes::Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let listing = b.list().await.unwrap();
        let jobs: Vec<String> = lease::jobs(
            &listing,
            ".meta.json",
            ".manifest.json",
            Duration::ZERO,
            SystemTime::now(),
        )
        .into_iter()
        .map(|l| l.name)
        .collect();
        assert_eq!(jobs, ["c.qcow2"], "listing: {listing:?}");
    })
}

#[test]
fn claims_on_an_s3_bucket_are_exclusive_and_expire() {
    let Some(s3) = s3() else { return };
    let prefix = unique_prefix("leases");
    let cfg = ferry::config::DestinationConfig {
        endpoint: Some(s3.endpoint.clone()),
        access_key_id: Some(key_id()),
        secret_access_key: Some(secret()),
        ..Default::default()
    };
    let url = format!("s3://{}/{prefix}/", s3.buckets[1]);
    let bucket =
        ferry::store::open_bucket(&url, &cfg, &ferry::config::TransferConfig::default()).unwrap();
    claims_hold(bucket);
}

#[test]
fn claims_on_an_oci_bucket_are_exclusive_and_expire() {
    let double = OciDouble::start();
    let cfg = double.destination_config("oci://spare/incoming/");
    let bucket = ferry::store::open_bucket(
        "oci://spare/incoming/",
        &cfg,
        &ferry::config::TransferConfig::default(),
    )
    .unwrap();
    claims_hold(bucket);
}
