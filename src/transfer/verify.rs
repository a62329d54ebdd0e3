//! The end of one destination's upload: a last check of the source, the
//! completion, the verification of the object (size and part count, or a
//! full read-back and its CRC32C), and the manifest written beside it.

use std::time::SystemTime;

use tracing::warn;

use crate::chunk;
use crate::config::{ReaderKind, VerifyMode};
use crate::manifest::{self, DestinationEntry, Manifest, PartEntry};
use crate::store::{Address, PartReceipt};

use super::TransferError;
use super::retry::retry;
use super::worker::Worker;

/// Times every part of an object source is read again when what was read
/// does not match its store's checksum.
pub(super) const REPAIR_ROUNDS: u32 = 2;

impl Worker {
    pub(super) async fn finish(
        &self,
        upload_id: &str,
        receipts: &[PartReceipt],
        started: SystemTime,
    ) -> Result<Manifest, TransferError> {
        let name = &self.job.name;
        let policy = &self.job.retry;
        let dn = self.dest.name();
        // Every part was sent before this check: a change it does not see
        // happened after the last byte left, and cannot be in the object.
        if let Err(c) = self.job.source.check() {
            self.abort(upload_id).await;
            return Err(TransferError::Changed(c));
        }
        // A mapped page that could not be read was answered with zeros, which
        // may have gone out in a part: nothing read since then is trusted. The
        // count is the process's, so another job's fault also stops this one:
        // a spurious failure, never a wrong copy.
        if self.job.reader == ReaderKind::Mmap
            && crate::mapping::zeroed_faults() != self.zeroed_before
        {
            self.abort(upload_id).await;
            return Err(TransferError::Read(
                "a mapped page of the source could not be read (SIGBUS: an I/O error, or a file cut short) and read as zeros; nothing was completed".into(),
            ));
        }
        // An upload is completed only with every part in it: a store would
        // make an object of fewer.
        if let Err(e) = self.all_sent(receipts) {
            self.abort(upload_id).await;
            return Err(e);
        }
        // Read from a bucket: the parts must be the bytes its store keeps.
        let repaired = match self.match_stored(upload_id, receipts).await {
            Ok(r) => r,
            Err(e) => {
                let e = self.blamed(e);
                if !self.keeps_upload(&e) {
                    self.abort(upload_id).await;
                }
                return Err(e);
            }
        };
        let receipts = &repaired[..];
        let halt = self.halt();
        let complete = retry(policy, dn, &*self.observer, &halt, || {
            self.dest.complete(name, upload_id, receipts)
        })
        .await;
        let mut server_crc = None;
        let mut found = None;
        match complete {
            Ok(crc) => server_crc = crc,
            Err(e) => {
                // A retried complete may fail only because an earlier attempt succeeded
                // and its answer was lost: let verification decide. Where the
                // store keeps the whole object's CRC32C (OCI), the object must
                // have the file's: an older object of the same size at the key
                // is not this upload's.
                warn!(
                    destination = dn,
                    "completing {name} failed ({e}); checking the object"
                );
                match self.verify(receipts, None).await {
                    Ok(v) if v.server_whole || !self.dest.keeps_whole_crc32c() => found = Some(v),
                    _ => {
                        let e = self.blamed(e);
                        if !self.keeps_upload(&e) {
                            self.abort(upload_id).await;
                        }
                        return Err(e);
                    }
                }
            }
        }
        crate::failpoint::reached("complete");
        let verified = match found {
            Some(v) => Ok(v),
            None => self.verify(receipts, server_crc).await,
        };
        let verified = match verified {
            Ok(v) => v,
            Err(e) => {
                let checksum = matches!(
                    &e,
                    TransferError::Mismatch { .. } | TransferError::ServerMismatch { .. }
                );
                self.observer.verify_failed(dn, checksum);
                return Err(e);
            }
        };
        let m = self.manifest(receipts, verified, started);
        let body = bytes::Bytes::from(m.to_json());
        let mname = format!("{name}{}", manifest::MANIFEST_SUFFIX);
        retry(policy, dn, &*self.observer, &halt, || {
            self.dest.put_small(&mname, body.clone())
        })
        .await?;
        crate::failpoint::reached("manifest");
        Ok(m)
    }

    /// For an object source whose store keeps the whole object's CRC32C:
    /// the parts sent must combine to it. Where they do not, a range was
    /// corrupted on its way from the source (the ETag pins the version, so
    /// the object did not change): every part is read again, each that
    /// differs from what was sent is sent again, and the check repeats, at
    /// most [`REPAIR_ROUNDS`] times. Costs nothing when the parts match.
    async fn match_stored(
        &self,
        upload_id: &str,
        receipts: &[PartReceipt],
    ) -> Result<Vec<PartReceipt>, TransferError> {
        let mut receipts = receipts.to_vec();
        let Some(object) = self.job.source.remote() else {
            return Ok(receipts);
        };
        let expected = match object.stored {
            crate::source::Stored::Crc32c(c) => c,
            crate::source::Stored::Md5(md5) => {
                return self.match_md5(upload_id, receipts, object, md5).await;
            }
            crate::source::Stored::Unknown => return Ok(receipts),
        };
        let name = &self.job.name;
        let dn = self.dest.name();
        let mut got = 0;
        for round in 0..=REPAIR_ROUNDS {
            got = chunk::combine(receipts.iter().map(|r| (r.crc32c, r.size_bytes)));
            if got == expected {
                return Ok(receipts);
            }
            if round == REPAIR_ROUNDS {
                break;
            }
            warn!(
                destination = dn,
                "{name}: the parts read from {} combine to CRC32C {}, its store keeps {}: a read was corrupted on its way; reading every part again",
                object.url,
                manifest::crc_hex(got),
                manifest::crc_hex(expected)
            );
            self.resend_differing(upload_id, &mut receipts, |_| {})
                .await?;
        }
        Err(TransferError::SourceMismatch {
            what: "CRC32C",
            got: manifest::crc_hex(got),
            expected: manifest::crc_hex(expected),
        })
    }

    /// As [`Worker::match_stored`], for a source whose store's checksum is
    /// the MD5 in its ETag: the fan-out's reads, hashed in order, must give
    /// it, and every part this destination sent must be one of those reads
    /// (by CRC32C). Otherwise every part is read again in order, hashed,
    /// each that differs from what was sent is sent again, and the MD5 is
    /// checked again.
    async fn match_md5(
        &self,
        upload_id: &str,
        mut receipts: Vec<PartReceipt>,
        object: &crate::source::Object,
        expected: [u8; 16],
    ) -> Result<Vec<PartReceipt>, TransferError> {
        if let Some((md5, crcs)) = object.digested(self.job.plan.count)
            && md5 == expected
            && receipts
                .iter()
                .all(|r| crcs.get(r.index as usize) == Some(&r.crc32c))
        {
            return Ok(receipts);
        }
        let name = &self.job.name;
        let dn = self.dest.name();
        receipts.sort_by_key(|r| r.index);
        let mut got = [0u8; 16];
        for _ in 0..REPAIR_ROUNDS {
            warn!(
                destination = dn,
                "{name}: the parts read from {} do not give the MD5 its store keeps ({}), or were not all hashed: reading every part again",
                object.url,
                manifest::md5_hex(&expected)
            );
            let mut md5 = <md5::Md5 as md5::Digest>::new();
            self.resend_differing(upload_id, &mut receipts, |part| {
                md5::Digest::update(&mut md5, part.bytes())
            })
            .await?;
            got = md5::Digest::finalize(md5).into();
            if got == expected {
                return Ok(receipts);
            }
        }
        Err(TransferError::SourceMismatch {
            what: "MD5",
            got: manifest::md5_hex(&got),
            expected: manifest::md5_hex(&expected),
        })
    }

    /// One repair pass: every part in `receipts` (in their order) read
    /// again from the source and shown to `each`; those whose CRC32C differs
    /// from what was sent are sent again, their receipts replaced.
    async fn resend_differing(
        &self,
        upload_id: &str,
        receipts: &mut [PartReceipt],
        mut each: impl FnMut(&chunk::Part),
    ) -> Result<(), TransferError> {
        let dn = self.dest.name();
        let halt = self.halt();
        for r in receipts.iter_mut() {
            if self.cancel.is_requested() {
                return Err(TransferError::Cancelled);
            }
            let part = match chunk::reread(self.reader.clone(), &self.budget, r.index).await {
                Some(Ok(p)) => p,
                Some(Err(e)) => return Err(TransferError::Read(e.to_string())),
                None => {
                    return Err(TransferError::Read(
                        "the source cannot be read again".into(),
                    ));
                }
            };
            each(&part);
            if part.crc32c() == r.crc32c {
                continue;
            }
            self.observer.retried(dn, "checksum");
            *r = super::worker::send_paid(
                &self.job,
                &self.dest,
                upload_id,
                &part,
                &*self.observer,
                &halt,
            )
            .await?
            .0;
        }
        Ok(())
    }

    /// The manifest of the verified object.
    fn manifest(&self, receipts: &[PartReceipt], v: Verified, started: SystemTime) -> Manifest {
        let crc = v.crc32c;
        let plan = self.job.plan;
        let name = &self.job.name;
        let dn = self.dest.name();
        Manifest {
            manifest_version: manifest::FORMAT_VERSION,
            ferry_version: crate::VERSION.to_string(),
            file_name: name.clone(),
            file_size_bytes: plan.file_bytes,
            part_size_bytes: plan.part_bytes,
            part_count: plan.count,
            crc32c: manifest::crc_hex(crc),
            crc32c_base64: manifest::crc_base64(crc),
            parts: receipts
                .iter()
                .map(|r| PartEntry {
                    index: r.index,
                    offset: plan.offset(r.index),
                    size_bytes: r.size_bytes,
                    crc32c: manifest::crc_hex(r.crc32c),
                })
                .collect(),
            destination: {
                // A directory's key is the file's path: the manifest names
                // the file in it as its key, and the absolute path apart.
                let (key, path) = match self.dest.address() {
                    Address::File { .. } => {
                        let path = self.dest.key(name);
                        let path =
                            std::path::absolute(&path).map_or(path, |p| p.display().to_string());
                        (name.clone(), Some(path))
                    }
                    _ => (self.dest.key(name), None),
                };
                DestinationEntry {
                    name: dn.to_string(),
                    url: self.dest.url().to_string(),
                    key,
                    object_url: self.dest.object_url(name),
                    path,
                }
            },
            verify: match self.job.verify {
                VerifyMode::Head => "head".into(),
                VerifyMode::Readback => "readback".into(),
            },
            server_verified: if v.server_whole {
                manifest::SERVER_WHOLE_CRC32C.into()
            } else {
                self.dest.server_check().into()
            },
            source_host: manifest::hostname(),
            source: self.job.source.remote().map(|o| manifest::SourceEntry {
                url: o.url.clone(),
                etag: o.etag.clone(),
                stored_crc32c: match o.stored {
                    crate::source::Stored::Crc32c(c) => Some(manifest::crc_hex(c)),
                    _ => None,
                },
                stored_md5: match o.stored {
                    crate::source::Stored::Md5(m) => Some(manifest::md5_hex(&m)),
                    _ => None,
                },
                checked: o.stored.basis().into(),
            }),
            started_at: manifest::timestamp(started),
            finished_at: manifest::timestamp(SystemTime::now()),
            import: None,
            image: self.image_fields(),
        }
    }

    fn image_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let Some(report) = &self.job.image else {
            return serde_json::Map::new();
        };
        let mut m = report.manifest_fields();
        match self.dest.import_url(&self.job.name) {
            Ok(url) => m.insert(
                "oci_create_image".into(),
                crate::image::create_image_body(
                    &report.import_facts(),
                    serde_json::json!({ "sourceType": "objectStorageUri", "sourceUri": url }),
                    "<compartment OCID>",
                    &self.job.name,
                ),
            ),
            Err(why) => m.insert("oci_create_image_unavailable".into(), why.into()),
        };
        m
    }

    /// Checks the finished object against the file: its size (and part
    /// count) or a read-back, and the whole-object CRC32C the store answered
    /// at completion (`server_crc`) or keeps (head) where it has one. A
    /// CRC32C of the store's that is not the file's fails.
    async fn verify(
        &self,
        receipts: &[PartReceipt],
        server_crc: Option<u32>,
    ) -> Result<Verified, TransferError> {
        let plan = self.job.plan;
        let name = &self.job.name;
        self.all_sent(receipts)?;
        let crc = chunk::combine(receipts.iter().map(|r| (r.crc32c, r.size_bytes)));
        let dn = self.dest.name();
        let mut server = server_crc;
        match self.job.verify {
            VerifyMode::Head => {
                let info = retry(&self.job.retry, dn, &*self.observer, &self.halt(), || {
                    self.dest.head(name)
                })
                .await?;
                if info.size_bytes != plan.file_bytes {
                    return Err(TransferError::Verify(format!(
                        "the stored object has {} bytes, the file {}",
                        info.size_bytes, plan.file_bytes
                    )));
                }
                if let Some(n) = info.parts
                    && n != plan.count
                {
                    return Err(TransferError::Verify(format!(
                        "the stored object has {n} parts, {} were sent",
                        plan.count
                    )));
                }
                server = server.or(info.crc32c);
            }
            VerifyMode::Readback => {
                let (size, got) = retry(&self.job.retry, dn, &*self.observer, &self.halt(), || {
                    self.dest.readback(name)
                })
                .await?;
                if size != plan.file_bytes || got != crc {
                    return Err(TransferError::Mismatch {
                        size,
                        crc32c: got,
                        expected_size: plan.file_bytes,
                        expected_crc32c: crc,
                    });
                }
            }
        }
        if let Some(got) = server
            && got != crc
        {
            return Err(TransferError::ServerMismatch {
                crc32c: got,
                expected_crc32c: crc,
            });
        }
        Ok(Verified {
            crc32c: crc,
            server_whole: server.is_some(),
        })
    }
}

impl Worker {
    /// Every part of the plan, in order, and the file's bytes in all.
    fn all_sent(&self, receipts: &[PartReceipt]) -> Result<(), TransferError> {
        let plan = self.job.plan;
        if receipts.len() != plan.count as usize
            || receipts
                .iter()
                .enumerate()
                .any(|(i, r)| r.index as usize != i)
        {
            return Err(TransferError::Verify(format!(
                "{} of {} parts were sent",
                receipts.len(),
                plan.count
            )));
        }
        let sent: u64 = receipts.iter().map(|r| r.size_bytes).sum();
        if sent != plan.file_bytes {
            return Err(TransferError::Verify(format!(
                "sent {sent} bytes of a {} byte file",
                plan.file_bytes
            )));
        }
        Ok(())
    }
}

/// What [`Worker::verify`] found: the object's CRC32C, and whether the store
/// computed the same over the whole object.
#[derive(Debug, Clone, Copy)]
struct Verified {
    crc32c: u32,
    server_whole: bool,
}
