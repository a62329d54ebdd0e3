//! VMDK: the hosted sparse extent header (`KDMV`), its embedded descriptor, both
//! streamOptimized layouts (grain directory at the front, or `GD_AT_END` with a
//! footer and end-of-stream marker), grain bounds, and guest sector 0 through the
//! grain directory and tables (compressed grains included). Little-endian.
//! A text descriptor or a COWD header is a multi-file or snapshot VMDK: refused.
//!
//! `check` is long (about 180 lines) on purpose: it follows the sparse
//! extent header and the descriptor field by field, in the order of VMware's
//! specification, each with its refusal, so it can be read beside it.

use super::{ReadAt, Report, boot, le32, le64};

const GD_AT_END: u64 = u64::MAX;
const FLAG_NEWLINE_CHECK: u32 = 1;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const KNOWN_INCOMPAT: u32 = FLAG_COMPRESSED | FLAG_MARKERS;
/// Grain directory + tables read for the truncation scan, at most.
const MAX_TABLE_BYTES: u64 = 64 << 20;

struct Descriptor {
    create_type: Option<String>,
    parent_cid: Option<String>,
    parent_hint: Option<String>,
    extents: Vec<(String, u64, String)>, // access, sectors, type
}

fn parse_descriptor(text: &str) -> Descriptor {
    let mut d = Descriptor {
        create_type: None,
        parent_cid: None,
        parent_hint: None,
        extents: vec![],
    };
    for line in text.lines().take(10_000) {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().trim_matches('"').to_string();
            match k.trim() {
                "createType" => d.create_type = Some(v),
                "parentCID" => d.parent_cid = Some(v),
                "parentFileNameHint" => d.parent_hint = Some(v),
                _ => {}
            }
            continue;
        }
        let mut parts = line.split_whitespace();
        if let (Some(access), Some(sectors), Some(ty)) = (parts.next(), parts.next(), parts.next())
            && matches!(access, "RW" | "RDONLY" | "NOACCESS")
            && let Ok(n) = sectors.parse::<u64>()
        {
            d.extents.push((access.into(), n, ty.into()));
        }
    }
    d
}

fn judge_descriptor(d: &Descriptor, rep: &mut Report, embedded: bool) {
    let ct = d.create_type.clone().unwrap_or_else(|| "(none)".into());
    rep.format_name = format!("VMDK {ct}");
    rep.detail("create_type", ct.clone());
    if let Some(cid) = &d.parent_cid {
        rep.detail("parent_cid", cid.clone());
        if !cid.eq_ignore_ascii_case("ffffffff") {
            rep.refuse(format!(
                "a delta (child) VMDK: parentCID={cid} points at a parent disk; flatten it first: qemu-img convert -O vmdk -o subformat=streamOptimized {} flat.vmdk",
                rep.file
            ));
        }
    }
    if let Some(hint) = &d.parent_hint {
        rep.refuse(format!(
            "a delta (child) VMDK with parentFileNameHint={hint:?}; flatten it first: qemu-img convert -O vmdk -o subformat=streamOptimized {} flat.vmdk",
            rep.file
        ));
    }
    if !embedded {
        rep.refuse(format!(
            "a multi-file VMDK (createType {ct}): this file is only a descriptor and OCI imports single-file VMDKs; convert it: qemu-img convert -O vmdk -o subformat=streamOptimized {} single.vmdk",
            rep.file
        ));
    } else if !matches!(ct.as_str(), "monolithicSparse" | "streamOptimized") {
        rep.refuse(format!(
            "VMDK createType {ct} cannot be imported (OCI takes monolithicSparse or streamOptimized); convert: qemu-img convert -O vmdk -o subformat=streamOptimized"
        ));
    }
    if d.extents.len() > 1 {
        rep.refuse(format!(
            "the VMDK has {} extents; OCI imports single-extent VMDKs only",
            d.extents.len()
        ));
    }
    if embedded
        && let Some((_, _, ty)) = d.extents.first()
        && ty != "SPARSE"
    {
        rep.refuse(format!("the VMDK extent is of type {ty}, not SPARSE"));
    }
}

pub(super) fn check(r: &dyn ReadAt, rep: &mut Report) -> std::io::Result<()> {
    rep.format = "vmdk".into();
    rep.format_name = "VMDK".into();
    let size = r.size();
    let head = r.read_vec(0, size.min(512) as usize)?;
    if head.starts_with(b"COWD") {
        rep.format_name = "VMDK vmfsSparse (COWD)".into();
        if head.len() >= 16 {
            rep.virtual_size = Some(u64::from(le32(&head, 12)) * 512);
        }
        rep.refuse("a COWD (vmfsSparse) VMDK extent: an ESXi snapshot, not a whole disk; convert: qemu-img convert -O vmdk -o subformat=streamOptimized");
        return Ok(());
    }
    if !head.starts_with(b"KDMV") {
        // A text descriptor: a multi-file VMDK.
        let text = r.read_vec(0, size.min(64 * 1024) as usize)?;
        let d = parse_descriptor(&String::from_utf8_lossy(&text));
        rep.virtual_size = Some(
            d.extents
                .iter()
                .fold(0u64, |a, e| a.saturating_add(e.1))
                .saturating_mul(512),
        );
        judge_descriptor(&d, rep, false);
        return Ok(());
    }
    if head.len() < 512 {
        rep.refuse(format!(
            "truncated VMDK: {size} bytes, less than its 512-byte header; the copy is incomplete"
        ));
        return Ok(());
    }
    let version = le32(&head, 4);
    let flags = le32(&head, 8);
    let capacity = le64(&head, 12);
    let grain = le64(&head, 20);
    let desc_off = le64(&head, 28);
    let desc_size = le64(&head, 36);
    let gtes = le32(&head, 44);
    let mut gd_off = le64(&head, 56);
    let overhead = le64(&head, 64);
    let unclean = head[72];
    let compress = u16::from_le_bytes([head[77], head[78]]);
    rep.virtual_size = Some(capacity.saturating_mul(512));
    rep.detail("version", version);
    rep.detail("compressed", compress == 1);
    if version == 0 || version > 3 {
        rep.refuse(format!("VMDK version {version} (offset 4) is not 1..3"));
        return Ok(());
    }
    let unknown = flags & 0xffff_0000 & !KNOWN_INCOMPAT;
    if unknown != 0 {
        rep.refuse(format!(
            "unknown incompatible VMDK flags {unknown:#x} (offset 8): no importer can read this image safely"
        ));
    }
    if flags & FLAG_NEWLINE_CHECK != 0 && &head[73..77] != b"\n \r\n" {
        rep.refuse("the VMDK newline-check bytes (offset 73..76) are damaged: the file was probably copied in text mode (FTP ASCII); copy it again in binary mode");
    }
    if unclean != 0 {
        rep.warn("the VMDK was not closed cleanly (uncleanShutdown is set); re-export it from a powered-off VM if you can");
    }
    if grain == 0 || !grain.is_power_of_two() || grain > 0x20_0000 || gtes == 0 || gtes > 512 {
        rep.refuse(format!(
            "VMDK grain size {grain} sectors or {gtes} entries per grain table is invalid: the header is damaged"
        ));
        return Ok(());
    }
    // The embedded descriptor.
    if desc_off != 0 && desc_size != 0 {
        let at = desc_off.saturating_mul(512);
        let len = desc_size.saturating_mul(512).min(1 << 20);
        if at.saturating_add(len) > size {
            rep.refuse("truncated: the VMDK descriptor lies past the end of the file; the copy is incomplete");
            return Ok(());
        }
        let text = r.read_vec(at, len as usize)?;
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        let d = parse_descriptor(&String::from_utf8_lossy(&text[..end]));
        judge_descriptor(&d, rep, true);
    } else {
        rep.refuse("the VMDK has no embedded descriptor, so its type cannot be known");
    }
    // streamOptimized with the grain directory at the end: read the footer.
    if gd_off == GD_AT_END {
        rep.detail("layout", "gd-at-end");
        if size < 1536 + 512 {
            rep.refuse(
                "truncated streamOptimized VMDK: no room for the footer and end-of-stream marker",
            );
            return Ok(());
        }
        let tail = r.read_vec(size - 1536, 1536)?;
        let footer_marker = le32(&tail, 8) == 0 && le32(&tail, 12) == 3;
        let footer_magic = &tail[512..516] == b"KDMV";
        let eos = tail[1024..].iter().all(|&b| b == 0);
        if !(footer_marker && footer_magic && eos) {
            rep.refuse("streamOptimized VMDK with the grain directory at the end, but the last 1536 bytes are not a footer marker, footer and end-of-stream marker: the file is truncated");
            return Ok(());
        }
        gd_off = le64(&tail, 512 + 56);
        if gd_off == GD_AT_END {
            rep.refuse("the VMDK footer does not say where the grain directory is");
            return Ok(());
        }
    } else {
        rep.detail("layout", "gd-at-front");
    }
    let _ = overhead;
    let gt_cover = u64::from(gtes) * grain;
    let gd_entries = capacity.div_ceil(gt_cover);
    let gd_at = gd_off.saturating_mul(512);
    let gd_len = gd_entries.saturating_mul(4);
    if gd_len > MAX_TABLE_BYTES {
        rep.refuse(format!(
            "the VMDK capacity ({capacity} sectors) needs an impossibly large grain directory: the header is damaged"
        ));
        return Ok(());
    }
    if gd_at.saturating_add(gd_len) > size {
        rep.refuse(format!(
            "truncated: the VMDK grain directory at offset {gd_at} lies past the end of the file ({size} bytes); the copy is incomplete"
        ));
        return Ok(());
    }
    let gd = r.read_vec(gd_at, gd_len as usize)?;
    let compressed = flags & FLAG_COMPRESSED != 0;
    let mut read = gd_len;
    for i in 0..gd_entries as usize {
        let gt = u64::from(le32(&gd, i * 4)).saturating_mul(512);
        if gt == 0 {
            continue;
        }
        let gt_len = u64::from(gtes) * 4;
        if gt.saturating_add(gt_len) > size {
            rep.refuse(format!(
                "truncated: grain table {i} at offset {gt} lies past the end of the file ({size} bytes); the copy is incomplete"
            ));
            return Ok(());
        }
        read += gt_len;
        if read > MAX_TABLE_BYTES {
            break;
        }
        let t = r.read_vec(gt, gt_len as usize)?;
        for j in 0..gtes as usize {
            let g = u64::from(le32(&t, j * 4));
            if g <= 1 {
                continue;
            }
            let at = g.saturating_mul(512);
            let end = if compressed {
                // A grain marker: u64 lba, u32 compressed size, then the data.
                if at.saturating_add(12) > size {
                    u64::MAX
                } else {
                    let m = r.read_vec(at, 12)?;
                    at + 12 + u64::from(le32(&m, 8))
                }
            } else {
                at.saturating_add(grain * 512)
            };
            if end > size {
                rep.refuse(format!(
                    "truncated: a grain at offset {at} lies past the end of the file ({size} bytes); the copy is incomplete"
                ));
                return Ok(());
            }
        }
    }
    // Guest sector 0 (and the GPT behind it).
    match read_guest_start(r, &gd, gtes, grain, compressed) {
        Ok(sectors) => boot::judge(&sectors, rep),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
            ) =>
        {
            rep.refuse(format!(
                "guest sector 0 cannot be read: {e}; the file is damaged or truncated"
            ))
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

fn read_guest_start(
    r: &dyn ReadAt,
    gd: &[u8],
    gtes: u32,
    grain: u64,
    compressed: bool,
) -> std::io::Result<Vec<u8>> {
    let mut out = vec![0u8; boot::BOOT_BYTES];
    let grain_bytes = grain * 512;
    let mut done = 0usize;
    while done < out.len() {
        let g = done as u64 / grain_bytes;
        let in_grain = done as u64 % grain_bytes;
        let n = ((grain_bytes - in_grain) as usize).min(out.len() - done);
        let (gdi, gti) = (g / u64::from(gtes), g % u64::from(gtes));
        if (gdi as usize) * 4 + 4 <= gd.len() {
            let gt = u64::from(le32(gd, gdi as usize * 4)) * 512;
            if gt != 0 {
                let e = r.read_vec(gt + gti * 4, 4)?;
                let sector = u64::from(le32(&e, 0));
                if sector > 1 {
                    let at = sector * 512;
                    if compressed {
                        let m = r.read_vec(at, 12)?;
                        let clen = u64::from(le32(&m, 8)).min(grain_bytes * 2 + 4096);
                        let raw = r.read_vec(at + 12, clen as usize)?;
                        let data = inflate(&raw, grain_bytes)?;
                        let s = in_grain as usize;
                        let e2 = (s + n).min(data.len());
                        if s < e2 {
                            out[done..done + (e2 - s)].copy_from_slice(&data[s..e2]);
                        }
                    } else {
                        r.read_at(at + in_grain, &mut out[done..done + n])?;
                    }
                }
            }
        }
        done += n;
    }
    Ok(out)
}

fn inflate(raw: &[u8], limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(raw)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("compressed grain: {e}"),
            )
        })?;
    Ok(out)
}
