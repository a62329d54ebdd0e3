//! QCOW2 v2/v3: header, feature bits, extensions, table bounds, and guest
//! sector 0 through L1/L2 (compressed clusters included). Big-endian.
//!
//! `check` is long (about 250 lines) on purpose: it walks the header in the
//! order of the specification, one field and its refusal after another, so
//! that it reads side by side with `docs/interop/qcow2.txt`. Cut into
//! helpers it would hide the order, which is the point.

use super::{Policy, ReadAt, Report, be32, be64, boot, human};

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_FDE: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Metadata read for the truncation scan, at most (L1 + L2 tables).
const MAX_TABLE_BYTES: u64 = 256 << 20;

/// The parsed header fields ferry uses.
pub(super) struct Header {
    pub cluster_bits: u32,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub extended_l2: bool,
    pub zstd: bool,
    pub version: u32,
}

pub(super) fn check(r: &dyn ReadAt, rep: &mut Report, policy: &Policy) -> std::io::Result<()> {
    rep.format = "qcow2".into();
    let size = r.size();
    if size < 72 {
        rep.format_name = "QCOW2".into();
        rep.refuse(format!(
            "truncated QCOW2: the file has {size} bytes, less than its 72-byte header; the copy is incomplete"
        ));
        return Ok(());
    }
    let h = r.read_vec(0, size.min(112) as usize)?;
    let version = be32(&h, 4);
    rep.format_name = format!("QCOW2 v{version}");
    rep.detail("version", version);
    if version != 2 && version != 3 {
        rep.refuse(format!(
            "QCOW2 version {version} (offset 4) is not 2 or 3; convert it: qemu-img convert -O qcow2 -o compat=1.1"
        ));
        return Ok(());
    }
    rep.detail("compat", if version == 2 { "0.10" } else { "1.1" });
    let backing_offset = be64(&h, 8);
    let backing_len = be32(&h, 16);
    let cluster_bits = be32(&h, 20);
    let virtual_size = be64(&h, 24);
    let crypt = be32(&h, 32);
    let l1_size = be32(&h, 36);
    let l1_offset = be64(&h, 40);
    let refcount_offset = be64(&h, 48);
    let refcount_clusters = be32(&h, 56);
    let nb_snapshots = be32(&h, 60);
    let snapshots_offset = be64(&h, 64);
    rep.virtual_size = Some(virtual_size);

    if !(9..=21).contains(&cluster_bits) {
        rep.refuse(format!(
            "QCOW2 cluster_bits {cluster_bits} (offset 20) is outside 9..21: the header is damaged"
        ));
        return Ok(());
    }
    let cluster = 1u64 << cluster_bits;
    rep.detail("cluster_size", cluster);
    if backing_offset != 0 {
        let name = if backing_len > 0 && backing_len <= 1023 {
            r.read_vec(backing_offset, backing_len as usize)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        rep.detail("backing_file", name.clone());
        rep.refuse(format!(
            "the image has a backing file ({name:?}, header offset 8): it is only a delta; flatten it first: qemu-img convert -O qcow2 {} flat.qcow2",
            rep.file
        ));
    }
    match crypt {
        0 => {}
        1 => rep.refuse("the image is encrypted (AES, crypt_method at offset 32): OCI cannot import an encrypted disk; decrypt it with qemu-img convert"),
        2 => rep.refuse("the image is encrypted (LUKS, crypt_method at offset 32): OCI cannot import an encrypted disk; decrypt it with qemu-img convert"),
        n => rep.refuse(format!("unknown encryption method {n} (offset 32)")),
    }

    let mut extended_l2 = false;
    let mut zstd = false;
    let mut ext_start = 72u64;
    if version == 3 {
        if h.len() < 104 {
            rep.refuse(format!(
                "truncated QCOW2 v3: the file has {size} bytes, less than its 104-byte header"
            ));
            return Ok(());
        }
        let incompat = be64(&h, 72);
        let autoclear = be64(&h, 88);
        let header_len = be32(&h, 100);
        rep.detail("incompatible_features", format!("{incompat:#x}"));
        if incompat & 1 != 0 {
            rep.detail("dirty", true);
            rep.warn("the dirty bit is set (refcounts may be stale after a crash); run qemu-img check -r all on a copy, or re-convert");
        }
        if incompat & 2 != 0 {
            rep.detail("corrupt", true);
            rep.refuse("the corrupt bit is set (incompatible feature bit 1): qemu found damage in this image; repair it with qemu-img check -r all, then re-convert");
        }
        if incompat & 4 != 0 || autoclear & 2 != 0 {
            rep.refuse("the guest data lives in an external data file (incompatible feature bit 2): the image is incomplete; convert it: qemu-img convert -O qcow2");
        }
        if incompat & 16 != 0 {
            extended_l2 = true;
            rep.detail("extended_l2", true);
            if policy.allow_extended_l2 {
                rep.warn(
                    "extended L2 entries (subclusters): OCI's support for them is not documented",
                );
            } else {
                rep.refuse("extended L2 entries (incompatible feature bit 4) are refused by policy (OCI does not document support); convert: qemu-img convert -O qcow2 -o extended_l2=off, or set policy.allow_extended_l2");
            }
        }
        let unknown = incompat & !0x1f;
        if unknown != 0 {
            rep.refuse(format!(
                "unknown incompatible feature bits {unknown:#x} (offset 72): no importer can read this image safely"
            ));
        }
        if header_len < 104 || !header_len.is_multiple_of(8) {
            rep.refuse(format!(
                "QCOW2 header_length {header_len} (offset 100) is invalid: the header is damaged"
            ));
            return Ok(());
        }
        ext_start = u64::from(header_len);
        let compression = if header_len > 104 && h.len() > 104 {
            h[104]
        } else {
            0
        };
        if incompat & 8 != 0 || compression != 0 {
            match compression {
                0 => {}
                1 => {
                    zstd = true;
                    rep.warn("clusters are zstd-compressed: accepted (FreeBSD's OCI images use it), though OCI does not document it");
                }
                n => rep.refuse(format!("unknown compression type {n} (offset 104)")),
            }
        }
        rep.detail("compression_type", if zstd { "zstd" } else { "zlib" });
    } else {
        rep.detail("compression_type", "zlib");
    }

    // Header extensions: bounded by the first cluster and by count.
    let mut off = ext_start;
    for _ in 0..64 {
        if off + 8 > cluster.min(size) {
            break;
        }
        let e = r.read_vec(off, 8)?;
        let (ty, len) = (be32(&e, 0), u64::from(be32(&e, 4)));
        if ty == EXT_END {
            break;
        }
        match ty {
            EXT_FDE => rep.refuse("a full-disk-encryption header is present (extension 0x0537be77): OCI cannot import an encrypted disk"),
            EXT_DATA_FILE => {
                let name = r
                    .read_vec(off + 8, len.min(1023) as usize)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                rep.detail("data_file", name.clone());
                rep.refuse(format!("the guest data lives in an external data file ({name:?}): the image is incomplete; convert it: qemu-img convert -O qcow2"));
            }
            EXT_BITMAPS => {
                rep.detail("bitmaps", true);
                rep.warn("persistent dirty bitmaps are present; they are not needed for import");
            }
            EXT_BACKING_FORMAT | EXT_FEATURE_TABLE => {}
            _ => {}
        }
        off = off.saturating_add(8 + len.div_ceil(8) * 8);
    }

    if nb_snapshots > 0 {
        rep.detail("snapshots", nb_snapshots);
        rep.warn(format!(
            "{nb_snapshots} internal snapshot(s): only the active state is imported, and the file is larger than needed; OCI suggests a clone instead"
        ));
    }

    // Tables past the end of the file mean a truncated copy.
    let past = |what: &str, at: u64, len: u64| -> Option<String> {
        let end = at.checked_add(len)?;
        (end > size).then(|| {
            format!(
                "truncated: the {what} at offset {at} ends at {end}, past the end of the file ({size} bytes); the copy is incomplete"
            )
        })
    };
    let l1_bytes = u64::from(l1_size) * 8;
    for (what, at, len) in [
        ("L1 table", l1_offset, l1_bytes),
        (
            "refcount table",
            refcount_offset,
            u64::from(refcount_clusters) * cluster,
        ),
        (
            "snapshot table",
            if nb_snapshots > 0 {
                snapshots_offset
            } else {
                0
            },
            if nb_snapshots > 0 { 40 } else { 0 },
        ),
    ] {
        if let Some(msg) = past(what, at, len) {
            rep.refuse(msg);
            return Ok(());
        }
    }
    if l1_bytes > 32 << 20 {
        rep.refuse(format!(
            "the L1 table has {l1_size} entries, more than any valid image: the header is damaged"
        ));
        return Ok(());
    }
    let hdr = Header {
        cluster_bits,
        l1_size,
        l1_offset,
        extended_l2,
        zstd,
        version,
    };
    if let Some(msg) = scan_tables(r, &hdr, size)? {
        rep.refuse(msg);
        return Ok(());
    }
    // Refcount blocks past the end.
    if refcount_clusters > 0 && u64::from(refcount_clusters) * cluster <= 8 << 20 {
        let rt = r.read_vec(
            refcount_offset,
            (u64::from(refcount_clusters) * cluster) as usize,
        )?;
        for i in 0..rt.len() / 8 {
            let b = be64(&rt, i * 8) & !0x1ff;
            if b != 0 && b.saturating_add(cluster) > size {
                rep.refuse(format!(
                    "truncated: refcount block {i} at offset {b} lies past the end of the file ({size} bytes); the copy is incomplete"
                ));
                return Ok(());
            }
        }
    }

    match read_guest(r, &hdr, 0, boot::BOOT_BYTES) {
        Ok(sectors) => boot::judge(&sectors, rep),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => rep.refuse(format!(
            "truncated: guest sector 0 maps past the end of the file ({}); the copy is incomplete",
            human(size)
        )),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            rep.refuse(format!("guest sector 0 cannot be read: {e}"))
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Every L2 table and data cluster the L1 points at must lie inside the file.
fn scan_tables(r: &dyn ReadAt, h: &Header, size: u64) -> std::io::Result<Option<String>> {
    let cluster = 1u64 << h.cluster_bits;
    let l1 = r.read_vec(h.l1_offset, h.l1_size as usize * 8)?;
    let mut read_bytes = l1.len() as u64;
    let entry = if h.extended_l2 { 16 } else { 8 };
    for i in 0..h.l1_size as usize {
        let l2_off = be64(&l1, i * 8) & 0x00ff_ffff_ffff_fe00;
        if l2_off == 0 {
            continue;
        }
        if l2_off.saturating_add(cluster) > size {
            return Ok(Some(format!(
                "truncated: L2 table {i} at offset {l2_off} lies past the end of the file ({size} bytes); the copy is incomplete"
            )));
        }
        read_bytes += cluster;
        if read_bytes > MAX_TABLE_BYTES {
            break;
        }
        let l2 = r.read_vec(l2_off, cluster as usize)?;
        for j in 0..(cluster as usize / entry) {
            let e = be64(&l2, j * entry);
            let (start, len) = if e & (1 << 62) != 0 {
                compressed_range(e, h.cluster_bits)
            } else {
                (e & 0x00ff_ffff_ffff_fe00, cluster)
            };
            if start != 0 && start.saturating_add(len) > size {
                return Ok(Some(format!(
                    "truncated: a data cluster at offset {start} lies past the end of the file ({size} bytes); the copy is incomplete"
                )));
            }
        }
    }
    Ok(None)
}

fn compressed_range(e: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let offset = e & ((1u64 << x) - 1);
    let sectors = (e >> x) & ((1u64 << (62 - x)) - 1);
    // qemu: nb_csectors = sectors + 1, size = nb_csectors * 512 - (offset & 511)
    (offset, (sectors + 1) * 512 - (offset & 511))
}

/// Reads `len` guest bytes from guest offset `off` through L1/L2.
pub(super) fn read_guest(
    r: &dyn ReadAt,
    h: &Header,
    off: u64,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let cluster = 1u64 << h.cluster_bits;
    let entry = if h.extended_l2 { 16 } else { 8 };
    let l2_entries = cluster / entry as u64;
    let mut out = vec![0u8; len];
    let mut done = 0usize;
    while done < len {
        let g = off + done as u64;
        let in_cluster = g % cluster;
        let n = ((cluster - in_cluster) as usize).min(len - done);
        let ci = g / cluster;
        let (l1i, l2i) = (ci / l2_entries, ci % l2_entries);
        if l1i < u64::from(h.l1_size) {
            let l1e = be64(&r.read_vec(h.l1_offset + l1i * 8, 8)?, 0);
            let l2_off = l1e & 0x00ff_ffff_ffff_fe00;
            if l2_off != 0 {
                let e = r.read_vec(l2_off + l2i * entry as u64, entry)?;
                let l2e = be64(&e, 0);
                let zero_flag = if h.extended_l2 {
                    let bitmap = be64(&e, 8);
                    let sub = in_cluster / (cluster / 32);
                    bitmap & (1u64 << (32 + sub)) != 0 || bitmap & (1u64 << sub) == 0
                } else {
                    h.version == 3 && l2e & 1 != 0
                };
                if l2e & (1 << 62) != 0 {
                    let (start, clen) = compressed_range(l2e, h.cluster_bits);
                    let clen = clen.min(cluster * 2 + 512);
                    let avail = clen.min(r.size().saturating_sub(start));
                    let raw = r.read_vec(start, avail as usize)?;
                    let data = decompress(&raw, cluster as usize, h.zstd)?;
                    let s = in_cluster as usize;
                    let e2 = (s + n).min(data.len());
                    if s < e2 {
                        out[done..done + (e2 - s)].copy_from_slice(&data[s..e2]);
                    }
                } else if !zero_flag {
                    let host = l2e & 0x00ff_ffff_ffff_fe00;
                    if host != 0 {
                        r.read_at(host + in_cluster, &mut out[done..done + n])?;
                    }
                }
            }
        }
        done += n;
    }
    Ok(out)
}

fn decompress(raw: &[u8], cluster: usize, zstd: bool) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(cluster);
    let limit = cluster as u64;
    let r = if zstd {
        let dec = ruzstd::decoding::StreamingDecoder::new(raw).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("zstd: {e}"))
        })?;
        dec.take(limit).read_to_end(&mut out)
    } else {
        flate2::read::DeflateDecoder::new(raw)
            .take(limit)
            .read_to_end(&mut out)
    };
    r.map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("compressed cluster: {e}"),
        )
    })?;
    if out.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "empty compressed cluster",
        ));
    }
    Ok(out)
}
