//! Recovery: uploads that can no longer finish are aborted, in the stores
//! this configuration names and nowhere else.
//!
//! At start, journal records without a file in `active/` belong to jobs that
//! can no longer finish; a job that ends for good, starts over or finds its
//! file changed leaves uploads that must not stay open either. Each upload is
//! reached only through a configured destination that names the place it
//! lives, or, for a directory, that directory: ferry never rebuilds a client
//! from a journaled URL alone.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::Settings;
use crate::journal::{DestinationRecord, JobRecord, Journal};
use crate::spool::Spool;
use crate::store::{Address, Destination};

impl Settings {
    /// A destination that reaches uploads at `address`: a configured one that
    /// names exactly that place, or, for a directory, that directory itself (a
    /// local path needs no endpoint or credentials). `None` otherwise.
    pub(super) fn reach(&self, address: &Address) -> Option<Arc<Destination>> {
        if let Some(d) = self.destinations.iter().find(|d| d.address() == address) {
            return Some(d.clone());
        }
        let Address::File { dir } = address else {
            return None;
        };
        let cfg = crate::config::DestinationConfig {
            url: format!("file://{}/", dir.display()),
            ..Default::default()
        };
        Destination::new("journaled", &cfg, &self.config.transfer, 0)
            .ok()
            .map(Arc::new)
    }
}

/// Journal records without a file in `active/` belong to jobs that can no longer
/// finish: abort their uploads so nothing is left behind in the stores.
pub(super) async fn abort_orphans(journal: &Journal, spool: &Spool, settings: &Settings) {
    let active: Vec<String> = spool
        .active_jobs()
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    let records: Vec<(String, Option<JobRecord>)> = journal
        .names()
        .into_iter()
        .map(|n| {
            let r = journal.load(&n);
            (n, r)
        })
        .collect();
    let live: HashSet<String> = records
        .iter()
        .filter(|(n, _)| active.contains(n))
        .filter_map(|(_, r)| r.as_ref())
        .flat_map(|r| r.destinations.values().filter_map(|d| d.upload_id.clone()))
        .collect();
    for d in &settings.destinations {
        d.sweep(&live).await;
    }
    for (name, record) in records {
        if active.contains(&name) {
            continue;
        }
        if let Some(record) = record {
            abort_record(&record, settings).await;
        }
        if let Err(e) = journal.remove(&name) {
            error!("{e}");
        }
    }
}

/// Aborts the unfinished, unverified uploads of `record`. Each is reached only
/// through a configured destination that names the place it lives (endpoint,
/// region and bucket, as journaled), with that destination's credentials, at
/// the journaled key; a directory is reached by its journaled path. An upload
/// no configured destination reaches is left alone, and the log says exactly
/// what is left open where: ferry never rebuilds a client from a URL alone
/// (that would fall back to public AWS and the instance-metadata service).
pub(super) async fn abort_record(record: &JobRecord, settings: &Settings) {
    // An import that will not go on: before its image exists, it leaves no
    // pre-authenticated request; once it exists, OCI may be reading through
    // it, so it is left to its expiry and the image is named for a person.
    for (dname, d) in &record.destinations {
        let Some(import) = d.import.as_ref().filter(|i| !i.done) else {
            continue;
        };
        match &import.image_id {
            Some(id) => warn!(
                destination = dname.as_str(),
                "{}: ferry no longer waits for its image {id} ({}): check it in the console and delete it if it is not wanted{}",
                record.name,
                import.state.as_deref().unwrap_or("state unknown"),
                import
                    .par_id
                    .as_deref()
                    .map(|p| format!("; its pre-authenticated request {p} ends at its expiry"))
                    .unwrap_or_default()
            ),
            None if import.par_id.is_some() => {
                if let Some(importer) = settings.importers.get(dname) {
                    importer.abandon(import).await;
                }
            }
            None => {}
        }
    }
    for (dname, d) in &record.destinations {
        let Some(id) = &d.upload_id else { continue };
        if d.verified {
            continue;
        }
        let reached = match (&d.address, &d.key) {
            (Some(address), Some(key)) => settings.reach(address).map(|dest| (dest, key.clone())),
            // A record from before addresses were journaled: only the
            // destination still configured under that name and URL is known.
            _ => settings
                .destinations
                .iter()
                .find(|x| x.name() == dname && x.url() == d.url)
                .map(|x| (x.clone(), x.key(&record.name))),
        };
        let Some((dest, key)) = reached else {
            error!("{}", left_open(record, dname, d, id));
            continue;
        };
        match dest.abort_key(&key, id).await {
            Ok(()) => info!(
                destination = dname.as_str(),
                "aborted the unfinished upload of {} (upload id {id}, {})",
                record.name,
                dest.address()
            ),
            Err(e) => error!(
                destination = dname.as_str(),
                "could not abort the unfinished upload of {} ({}, key {key}, upload id {id}): {e}; abort it by hand",
                record.name,
                dest.address()
            ),
        }
    }
}

/// The log line for an upload that no configured destination reaches.
fn left_open(record: &JobRecord, dname: &str, d: &DestinationRecord, id: &str) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    match (&d.address, &d.key) {
        (
            Some(Address::S3 {
                endpoint,
                region,
                bucket,
            }),
            Some(key),
        ) => format!(
            "the unfinished upload of {} for destination {dname} is left open: upload id {id} of key {key} in bucket {bucket} at {endpoint} (region {region}). No configured destination names that endpoint, region and bucket, so ferry leaves it alone; abort it by hand, e.g. aws s3api abort-multipart-upload --endpoint-url {endpoint} --region {region} --bucket {bucket} --key {} --upload-id {}",
            record.name,
            quote(key),
            quote(id)
        ),
        (Some(address), key) => format!(
            "the unfinished upload of {} for destination {dname} is left open: upload id {id}{} in {address}; no configured destination reaches it, so ferry leaves it alone",
            record.name,
            key.as_deref()
                .map(|k| format!(" of {k}"))
                .unwrap_or_default()
        ),
        (None, _) => format!(
            "the unfinished upload of {} for destination {dname} is left open: upload id {id} at {} (journaled by an older ferry, without its endpoint); no destination of that name and URL is configured, so ferry leaves it alone; abort it by hand",
            record.name, d.url
        ),
    }
}
