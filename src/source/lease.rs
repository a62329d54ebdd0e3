//! Claims on the objects of a bucket source, shared by several ferries
//! without a coordinator: the object store's conditional writes are the lock.
//!
//! For an object `NAME` under a source's prefix:
//! - `.ferry/leases/NAME` is the claim: created with `If-None-Match: *` (one
//!   creator wins), holding who holds it and until when; renewed while the
//!   job runs by an overwrite with `If-Match` on its ETag (a renewal that
//!   fails means another ferry took it over: the job must stop); taken over
//!   once it expired, by the same conditional overwrite (one taker wins);
//!   deleted when the job ends.
//! - `.ferry/done/NAME` (the manifest) or `.ferry/failed/NAME` (the error
//!   report) says how it ended; an object with either is never taken again.
//!
//! What it guarantees, and what it does not:
//! - two ferries never hold the same lease at once *by the store's word*:
//!   every create, renewal and takeover is conditional, so exactly one of
//!   concurrent writers succeeds;
//! - a lease's expiry is written by its holder's clock and judged by the
//!   taker's: clocks must agree to well within the lease (`lease_secs`), and
//!   a holder must renew well within it. A holder stalled longer than the
//!   lease (a frozen VM, a network partition) finds its renewal refused and
//!   stops, but may have sent parts meanwhile: both ferries then upload the
//!   same object; each destination's object is still whole and checked (the
//!   last completed wins), never a mix, because each upload completes only
//!   its own parts.
//!
//! Design choice: the store operations are a trait ([`Bucket`]) that the
//! stores implement, so this module knows no store and can be tested with
//! any of them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Where ferry keeps its own objects under a source's prefix.
pub const FERRY_DIR: &str = ".ferry/";
pub const LEASES: &str = ".ferry/leases/";
pub const DONE: &str = ".ferry/done/";
pub const FAILED: &str = ".ferry/failed/";

/// A store's answer that is not the one hoped for, or a failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BucketError {
    /// A conditional write lost: the object exists (create) or its ETag
    /// moved (overwrite).
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Failed(String),
}

/// An object under the source's prefix, as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key under the prefix.
    pub name: String,
    pub size_bytes: u64,
    pub etag: Option<String>,
    /// When it was last written, by the store's clock (seconds since the
    /// Unix epoch), where the listing says.
    pub modified_unix: Option<u64>,
}

/// The store operations claims need, on keys under the source's prefix.
#[async_trait::async_trait]
pub trait Bucket: Send + Sync {
    /// Every object under the prefix, ferry's own included (bounded by the
    /// store's paging).
    async fn list(&self) -> Result<Vec<Listed>, BucketError>;
    /// The object's bytes and ETag; `None` when it is not there.
    async fn read(&self, name: &str) -> Result<Option<(Bytes, String)>, BucketError>;
    /// Creates the object only if it does not exist; its ETag.
    async fn create(&self, name: &str, body: Bytes) -> Result<String, BucketError>;
    /// Overwrites the object only if its ETag is still `etag`; the new ETag.
    async fn replace(&self, name: &str, body: Bytes, etag: &str) -> Result<String, BucketError>;
    /// Writes the object, whatever is there.
    async fn write(&self, name: &str, body: Bytes) -> Result<(), BucketError>;
    async fn delete(&self, name: &str) -> Result<(), BucketError>;
}

/// What a lease object holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Seconds since the Unix epoch, by the holder's clock.
    pub expires_unix: u64,
    /// The same, for people.
    pub expires_at: String,
    /// This claim's own mark: a renewal whose answer was lost is known as
    /// this ferry's by it.
    #[serde(default)]
    pub token: String,
}

impl Holder {
    fn new(host: &str, token: &str, lease: Duration, now: SystemTime) -> Holder {
        let at = now + lease;
        Holder {
            host: host.to_string(),
            pid: std::process::id(),
            token: token.to_string(),
            expires_unix: unix(at),
            expires_at: chrono::DateTime::<chrono::Utc>::from(at)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    fn body(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    fn expired(&self, now: SystemTime) -> bool {
        unix(now) >= self.expires_unix
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A lease this ferry holds on one object.
#[derive(Debug, Clone)]
pub struct Lease {
    pub name: String,
    pub holder: Holder,
    etag: String,
    lease: Duration,
}

/// How a claim went.
#[derive(Debug, Clone)]
pub enum Claim {
    /// This ferry holds it now; `took_over` names the holder whose lease
    /// had expired.
    Taken {
        lease: Lease,
        took_over: Option<Holder>,
    },
    /// Another ferry holds it until its lease expires.
    Held(Holder),
    /// It ended (a done or failed marker) after the listing that offered it
    /// was made: the ferry that shipped it wrote its marker, then released
    /// the lease this claim then got.
    Ended,
}

/// Claims object `name` for `host` for `lease`: a conditional create, or,
/// where a lease exists and expired by `now`, a conditional takeover. A
/// lease taken is given back at once when the object has a done or failed
/// marker: markers are written before leases are released, so the marker of
/// a job that ended before this claim is seen (the stores read after write).
pub async fn claim(
    bucket: &dyn Bucket,
    name: &str,
    host: &str,
    lease: Duration,
    now: SystemTime,
) -> Result<Claim, BucketError> {
    let claim = claim_lease(bucket, name, host, lease, now).await?;
    let Claim::Taken { lease, .. } = &claim else {
        return Ok(claim);
    };
    for marker in [DONE, FAILED] {
        match bucket.read(&format!("{marker}{name}")).await {
            Ok(None) => {}
            Ok(Some(_)) => {
                lease.clone().release(bucket).await?;
                return Ok(Claim::Ended);
            }
            // Not known whether it ended: the lease goes back, and the next
            // poll asks again.
            Err(e) => {
                let _ = lease.clone().release(bucket).await;
                return Err(e);
            }
        }
    }
    Ok(claim)
}

async fn claim_lease(
    bucket: &dyn Bucket,
    name: &str,
    host: &str,
    lease: Duration,
    now: SystemTime,
) -> Result<Claim, BucketError> {
    let key = format!("{LEASES}{name}");
    let token = format!("{:016x}", rand::random::<u64>());
    let holder = Holder::new(host, &token, lease, now);
    match bucket.create(&key, holder.body()).await {
        Ok(etag) => {
            return Ok(Claim::Taken {
                lease: Lease {
                    name: name.to_string(),
                    holder,
                    etag,
                    lease,
                },
                took_over: None,
            });
        }
        Err(BucketError::Precondition(_)) => {}
        Err(e) => return Err(e),
    }
    // Bounded: a lease deleted between the create and this read is claimed
    // on the next poll, not in a loop here.
    let Some((text, etag)) = bucket.read(&key).await? else {
        return Err(BucketError::Precondition(format!(
            "{key} was released while it was being claimed; it is claimed on the next poll"
        )));
    };
    let current: Holder = match serde_json::from_slice(&text) {
        Ok(h) => h,
        // Not a lease ferry wrote: treated as expired, so a damaged lease
        // cannot hold an object forever.
        Err(_) => Holder {
            host: "(unreadable lease)".into(),
            pid: 0,
            expires_unix: 0,
            expires_at: "-".into(),
            token: String::new(),
        },
    };
    if !current.expired(now) {
        return Ok(Claim::Held(current));
    }
    match bucket.replace(&key, holder.body(), &etag).await {
        Ok(etag) => Ok(Claim::Taken {
            lease: Lease {
                name: name.to_string(),
                holder,
                etag,
                lease,
            },
            took_over: Some(current),
        }),
        // Another ferry took it over first.
        Err(BucketError::Precondition(_)) => match bucket.read(&key).await? {
            Some((text, _)) => Ok(Claim::Held(
                serde_json::from_slice(&text).unwrap_or(current),
            )),
            None => Ok(Claim::Held(current)),
        },
        Err(e) => Err(e),
    }
}

impl Lease {
    /// Extends the lease from `now`, only if it is still this ferry's: an
    /// error [`BucketError::Precondition`] means another ferry took it over,
    /// and the job must stop.
    pub async fn renew(&mut self, bucket: &dyn Bucket, now: SystemTime) -> Result<(), BucketError> {
        let holder = Holder::new(&self.holder.host, &self.holder.token, self.lease, now);
        let key = format!("{LEASES}{}", self.name);
        self.etag = match bucket.replace(&key, holder.body(), &self.etag).await {
            Ok(etag) => etag,
            // A renewal the store applied but whose answer was lost moved
            // the ETag: the lease still carries this claim's token.
            Err(BucketError::Precondition(why)) => match bucket.read(&key).await? {
                Some((text, etag))
                    if serde_json::from_slice::<Holder>(&text)
                        .is_ok_and(|h| h.token == self.holder.token) =>
                {
                    bucket.replace(&key, holder.body(), &etag).await?
                }
                _ => return Err(BucketError::Precondition(why)),
            },
            Err(e) => return Err(e),
        };
        self.holder = holder;
        Ok(())
    }

    /// How often to renew: a third of the lease, so that two renewals may
    /// fail before it expires.
    pub fn renew_every(&self) -> Duration {
        (self.lease / 3).max(Duration::from_secs(1))
    }

    /// Gives the lease up (the job ended, its marker written), only if it
    /// still carries this claim's token: a lease another ferry took over
    /// while this one could not renew is left to it.
    pub async fn release(self, bucket: &dyn Bucket) -> Result<(), BucketError> {
        let key = format!("{LEASES}{}", self.name);
        match bucket.read(&key).await? {
            Some((text, _))
                if serde_json::from_slice::<Holder>(&text)
                    .is_ok_and(|h| h.token == self.holder.token) =>
            {
                bucket.delete(&key).await
            }
            _ => Ok(()),
        }
    }
}

/// Marks object `name` done, with its manifest, so no ferry takes it again.
pub async fn mark_done(
    bucket: &dyn Bucket,
    name: &str,
    manifest: Bytes,
) -> Result<(), BucketError> {
    bucket.write(&format!("{DONE}{name}"), manifest).await
}

/// Marks object `name` failed, with the error report, so no ferry takes it
/// again until an operator deletes the marker.
pub async fn mark_failed(
    bucket: &dyn Bucket,
    name: &str,
    report: Bytes,
) -> Result<(), BucketError> {
    bucket.write(&format!("{FAILED}{name}"), report).await
}

/// The objects of a listing that are jobs: not ferry's own, not partial
/// (`.partial`, `.tmp`), not a sidecar or a manifest, without a done or
/// failed marker, and settled: neither it nor its sidecar written less than
/// `settle` before `now` (an object store has no rename, so a producer's
/// image and its sidecar arrive one after the other). In the listing's
/// order.
pub fn jobs(
    listing: &[Listed],
    sidecar_suffix: &str,
    manifest_suffix: &str,
    settle: Duration,
    now: SystemTime,
) -> Vec<Listed> {
    let fresh = |l: &Listed| {
        l.modified_unix
            .is_some_and(|m| m.saturating_add(settle.as_secs()) > unix(now))
    };
    let unsettled: std::collections::HashSet<&str> = listing
        .iter()
        .filter(|l| fresh(l))
        .map(|l| l.name.strip_suffix(sidecar_suffix).unwrap_or(&l.name))
        .collect();
    let ended: std::collections::HashSet<&str> = listing
        .iter()
        .filter_map(|l| {
            l.name
                .strip_prefix(DONE)
                .or_else(|| l.name.strip_prefix(FAILED))
        })
        .collect();
    listing
        .iter()
        .filter(|l| {
            !l.name.starts_with(FERRY_DIR)
                && !l.name.ends_with(".partial")
                && !l.name.ends_with(".tmp")
                && !l.name.ends_with(sidecar_suffix)
                && !l.name.ends_with(manifest_suffix)
                && !l.name.ends_with('/')
                && l.size_bytes > 0
                && !ended.contains(l.name.as_str())
                && !unsettled.contains(l.name.as_str())
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(name: &str) -> Listed {
        Listed {
            name: name.into(),
            size_bytes: 1,
            etag: None,
            modified_unix: Some(1_000),
        }
    }

    #[test]
    fn an_image_or_its_sidecar_written_within_the_settle_time_waits() {
        let now = UNIX_EPOCH + Duration::from_secs(1_030);
        let mut side = l("b.qcow2.meta.json");
        side.modified_unix = Some(1_020);
        let mut c = l("c.qcow2");
        c.modified_unix = Some(1_025);
        let listing = [l("a.qcow2"), l("b.qcow2"), side, c];
        let names = |settle| -> Vec<String> {
            jobs(
                &listing,
                ".meta.json",
                ".manifest.json",
                Duration::from_secs(settle),
                now,
            )
            .into_iter()
            .map(|l| l.name)
            .collect()
        };
        assert_eq!(names(20), ["a.qcow2"]);
        assert_eq!(names(10), ["a.qcow2", "b.qcow2"]);
        assert_eq!(names(0), ["a.qcow2", "b.qcow2", "c.qcow2"]);
    }

    #[test]
    fn only_whole_images_without_a_marker_are_jobs() {
        let listing = [
            l("a.qcow2"),
            l("a.qcow2.meta.json"),
            l("b.vmdk.partial"),
            l("c.oci.tmp"),
            l("d.qcow2"),
            l("d.qcow2.manifest.json"),
            l(".ferry/done/d.qcow2"),
            l("e.qcow2"),
            l(".ferry/failed/e.qcow2"),
            l(".ferry/leases/f.qcow2"),
            l("f.qcow2"),
        ];
        let names: Vec<String> = jobs(
            &listing,
            ".meta.json",
            ".manifest.json",
            Duration::ZERO,
            SystemTime::now(),
        )
        .into_iter()
        .map(|l| l.name)
        .collect();
        assert_eq!(names, ["a.qcow2", "f.qcow2"]);
    }

    #[test]
    fn a_lease_expires_by_the_judges_clock() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let h = Holder::new("h1", "t", Duration::from_secs(30), now);
        assert!(!h.expired(now + Duration::from_secs(29)));
        assert!(h.expired(now + Duration::from_secs(30)));
        assert_eq!(h.expires_at, "1970-01-12T13:47:10Z");
    }
}
