//! Formats OCI cannot import, recognised so the refusal names them (with the
//! virtual size qemu-img would report): VHD (fixed and dynamic), VHDX, VDI, QED,
//! ISO 9660, compressed files, zip, and raw.

use super::{ReadAt, Report, be32, be64, le32, le64};

pub(super) fn check(r: &dyn ReadAt, head: &[u8], rep: &mut Report) -> std::io::Result<()> {
    let size = r.size();
    let at = |o: usize, sig: &[u8]| head.len() >= o + sig.len() && &head[o..o + sig.len()] == sig;
    if at(0, b"conectix") {
        return vhd(head, rep, "dynamic");
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
        rep.virtual_size = vhdx_size(r).ok().flatten();
        rep.cannot_import("VHDX", " -f vhdx");
        return Ok(());
    }
    if head.len() >= 0x178 && le32(head, 0x40) == 0xbeda_107f {
        rep.format = "vdi".into();
        rep.format_name = "VDI".into();
        rep.virtual_size = Some(le64(head, 0x170));
        rep.cannot_import("VDI", " -f vdi");
        return Ok(());
    }
    if at(0, b"QED\0") {
        rep.format = "qed".into();
        rep.format_name = "QED".into();
        if head.len() >= 48 {
            rep.virtual_size = Some(le64(head, 40));
        }
        rep.cannot_import("QED", " -f qed");
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
    Ok(())
}

/// Virtual size of a VHDX from its metadata region.
fn vhdx_size(r: &dyn ReadAt) -> std::io::Result<Option<u64>> {
    const METADATA_REGION: [u8; 16] = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
    const VIRTUAL_DISK_SIZE: [u8; 16] = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
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
            for j in 0..n {
                let me = 32 + j * 32;
                if me + 32 > m.len() {
                    break;
                }
                if m[me..me + 16] == VIRTUAL_DISK_SIZE {
                    let item = u64::from(le32(&m, me + 16));
                    let v = r.read_vec(off + item, 8)?;
                    return Ok(Some(le64(&v, 0)));
                }
            }
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
