//! Formats OCI cannot import, recognised so the refusal names them (with the
//! virtual size qemu-img would report): VHD (fixed and dynamic), VHDX, VDI, QED,
//! ISO 9660, compressed files, zip, and raw.

use super::{ReadAt, Report, be32, be64, le32, le64};

pub(super) fn check(r: &dyn ReadAt, head: &[u8], rep: &mut Report) -> std::io::Result<()> {
    let size = r.size();
    let at = |o: usize, sig: &[u8]| head.len() >= o + sig.len() && &head[o..o + sig.len()] == sig;
    if at(0, b"conectix") {
        vhd(head, rep, "dynamic")?;
        // A dynamic VHD ends with a copy of its footer: a copy cut short
        // has none, and its blocks past the end would read as zeros.
        let whole = size >= 1024 && r.read_vec(size - 512, 512)?.starts_with(b"conectix");
        if !whole {
            rep.refuse("truncated: a dynamic VHD ends with a copy of its footer, and this one does not; copy it again in full");
        }
        return Ok(());
    }
    if size >= 512 {
        let tail = r.read_vec(size - 512, 512)?;
        if tail.starts_with(b"conectix") {
            return vhd(&tail, rep, "fixed");
        }
    }
    if at(0, b"vhdxfile") {
        rep.format = "vhdx".into();
        rep.format_name = "VHDX".into();
        let meta = vhdx_metadata(r).ok().flatten();
        rep.virtual_size = meta.and_then(|m| m.0);
        rep.cannot_import("VHDX", " -f vhdx");
        if meta.is_some_and(|m| m.1) {
            rep.format_name = "VHDX (differencing)".into();
            rep.refuse(DIFFERENCING);
        }
        return Ok(());
    }
    if head.len() >= 0x1c8 && le32(head, 0x40) == 0xbeda_107f {
        rep.format = "vdi".into();
        rep.format_name = "VDI".into();
        rep.virtual_size = Some(le64(head, 0x170));
        rep.cannot_import("VDI", " -f vdi");
        // qemu's VdiHeader: image type 4 is a differencing image, and a
        // differencing image names its parent's UUID.
        if le32(head, 76) == 4 || head[0x1b8..0x1c8].iter().any(|b| *b != 0) {
            rep.format_name = "VDI (differencing)".into();
            rep.refuse(DIFFERENCING);
        }
        let data = u64::from(le32(head, 0x158));
        let allocated = u64::from(le32(head, 0x184)).saturating_mul(u64::from(le32(head, 0x178)));
        if data.saturating_add(allocated) > size {
            rep.refuse(format!(
                "truncated: the VDI's {allocated} bytes of blocks from offset {data} reach past its end ({size} bytes); copy it again in full"
            ));
        }
        return Ok(());
    }
    if at(0, b"QED\0") {
        rep.format = "qed".into();
        rep.format_name = "QED".into();
        // qemu's QEDHeader: features at 16, image_size at 48.
        if head.len() >= 64 {
            rep.virtual_size = Some(le64(head, 48));
        }
        rep.cannot_import("QED", " -f qed");
        if head.len() >= 64 && le64(head, 16) & QED_F_BACKING_FILE != 0 {
            rep.refuse("the QED image has a backing file: it holds only the changes to another image; merge it first (qemu-img convert -f qed -O qcow2 reads the chain)");
        }
        return Ok(());
    }
    let named = [
        (
            &[0x28u8, 0xb5, 0x2f, 0xfd][..],
            "zstd",
            "a zstd-compressed file",
        ),
        (
            &[0xfd, b'7', b'z', b'X', b'Z', 0][..],
            "xz",
            "an xz-compressed file",
        ),
        (&b"BZh"[..], "bzip2", "a bzip2-compressed file"),
        (&b"PK\x03\x04"[..], "zip", "a zip archive"),
    ];
    for (sig, fmt, what) in named {
        if head.starts_with(sig) {
            rep.format = fmt.into();
            rep.format_name = what.into();
            rep.refuse(format!(
                "OCI cannot import {what}; decompress it first, then check the image inside with ferry inspect"
            ));
            return Ok(());
        }
    }
    if size >= 32769 + 5 {
        let iso = r.read_vec(32769, 5)?;
        if iso == b"CD001" {
            rep.format = "iso".into();
            rep.format_name = "ISO 9660".into();
            rep.virtual_size = Some(size);
            rep.refuse("OCI cannot import an ISO 9660 image (an installer or CD image, not a disk); install the system to a disk, then export that disk as QCOW2");
            return Ok(());
        }
    }
    rep.format = "raw".into();
    rep.format_name = "raw".into();
    rep.virtual_size = Some(size);
    rep.cannot_import("raw (no known image header)", " -f raw");
    Ok(())
}

/// The refusal of a differencing (snapshot) image.
const DIFFERENCING: &str = "a differencing image: it holds only the changes to a parent image, which ferry never reads; merge it into its parent first (or export the whole disk again)";

/// QED's feature bit for a backing file.
const QED_F_BACKING_FILE: u64 = 1;

fn vhd(footer: &[u8], rep: &mut Report, kind: &str) -> std::io::Result<()> {
    rep.format = "vpc".into();
    let disk_type = be32(footer, 60);
    let kind = match disk_type {
        2 => "fixed",
        3 => "dynamic",
        4 => "differencing",
        _ => kind,
    };
    rep.format_name = format!("VHD ({kind})");
    let creator = &footer[28..32];
    let current = be64(footer, 48);
    let (c, h, s) = (
        u64::from(u16::from_be_bytes([footer[56], footer[57]])),
        u64::from(footer[58]),
        u64::from(footer[59]),
    );
    // qemu's rule: the CHS product for creators "vpc " and "qemu", unless the
    // geometry is at its maximum; the footer's current size otherwise.
    let chs_max = c == 65535 && h == 16 && s == 255;
    let size = if (creator == b"vpc " || creator == b"qemu") && !chs_max {
        c * h * s * 512
    } else {
        current
    };
    rep.virtual_size = Some(size);
    rep.detail("creator", String::from_utf8_lossy(creator).into_owned());
    rep.cannot_import(&format!("VHD ({kind})"), " -f vpc");
    if disk_type == 4 {
        rep.refuse(DIFFERENCING);
    }
    Ok(())
}

/// A VHDX's virtual size and whether it has a parent (a differencing
/// disk), from its metadata region.
fn vhdx_metadata(r: &dyn ReadAt) -> std::io::Result<Option<(Option<u64>, bool)>> {
    const METADATA_REGION: [u8; 16] = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
    const VIRTUAL_DISK_SIZE: [u8; 16] = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
    const FILE_PARAMETERS: [u8; 16] = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
    const HAS_PARENT: u32 = 2;
    for table in [192 * 1024u64, 256 * 1024] {
        let Ok(t) = r.read_vec(table, 64 * 1024) else {
            continue;
        };
        if &t[0..4] != b"regi" {
            continue;
        }
        let count = le32(&t, 8).min(2047) as usize;
        for i in 0..count {
            let e = 16 + i * 32;
            if t[e..e + 16] != METADATA_REGION {
                continue;
            }
            let off = le64(&t, e + 16);
            let m = r.read_vec(off, 64 * 1024)?;
            if &m[0..8] != b"metadata" {
                return Ok(None);
            }
            let n = usize::from(u16::from_le_bytes([m[10], m[11]])).min(2047);
            let (mut size, mut parent) = (None, false);
            for j in 0..n {
                let me = 32 + j * 32;
                if me + 32 > m.len() {
                    break;
                }
                let item = off.saturating_add(u64::from(le32(&m, me + 16)));
                if m[me..me + 16] == VIRTUAL_DISK_SIZE {
                    size = Some(le64(&r.read_vec(item, 8)?, 0));
                } else if m[me..me + 16] == FILE_PARAMETERS {
                    parent = le32(&r.read_vec(item, 8)?, 4) & HAS_PARENT != 0;
                }
            }
            return Ok(Some((size, parent)));
        }
    }
    Ok(None)
}

/// A GUID in its on-disk (mixed-endian) byte order.
const fn guid(s: &str) -> [u8; 16] {
    let b = s.as_bytes();
    let mut hex = [0u8; 16];
    let (mut i, mut j) = (0, 0);
    while i < b.len() {
        if b[i] != b'-' {
            let v = match b[i] {
                b'0'..=b'9' => b[i] - b'0',
                b'a'..=b'f' => b[i] - b'a' + 10,
                _ => b[i] - b'A' + 10,
            };
            if j % 2 == 0 {
                hex[j / 2] = v << 4;
            } else {
                hex[j / 2] |= v;
            }
            j += 1;
        }
        i += 1;
    }
    [
        hex[3], hex[2], hex[1], hex[0], hex[5], hex[4], hex[7], hex[6], hex[8], hex[9], hex[10],
        hex[11], hex[12], hex[13], hex[14], hex[15],
    ]
}

#[cfg(test)]
pub(super) fn guid_for_test(s: &str) -> [u8; 16] {
    guid(s)
}
