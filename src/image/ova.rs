//! OVA: a tar of an OVF descriptor and the disks it names (VMware's and
//! VirtualBox's appliance exports). OCI imports one boot disk, so an OVA with
//! one disk is shipped as that disk: its bytes are a member of the tar, and the
//! report names the member's byte range ([`Member`]) for the upload to read,
//! with no extraction and no copy. The disk inside is inspected like any image.
//!
//! The OVF gives what a sidecar would otherwise have to: the operating system
//! (`OperatingSystemSection`: its description, `ovf:version`, VMware's
//! `vmw:osType`) and the firmware (VMware's `vmw:Config` key `firmware`,
//! VirtualBox's `Firmware` element), recorded with the basis `ovf`. A sidecar
//! still wins over them: it is a person's word.
//!
//! Design choice: the descriptor is read with `quick-xml` as a stream of
//! elements, matched by local name (OVF 1.x and 2.x use different namespace
//! URIs for the same elements), and capped at 1 MiB; nothing in it is trusted
//! to size an allocation.

use std::io::Read;

use serde::Serialize;

use super::{Policy, Range, ReadAt, Report};

/// The most of a descriptor read.
const MAX_OVF_BYTES: u64 = 1 << 20;
/// Members looked at, at most.
const MAX_MEMBERS: usize = 256;

/// The member of an archive that is shipped as the image.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Member {
    /// Its name in the archive.
    pub name: String,
    /// Where its bytes start in the archive, and how many there are.
    pub offset_bytes: u64,
    pub size_bytes: u64,
    /// The object's name: the archive's stem and the disk's format
    /// (`appliance.ova` holding a VMDK ships as `appliance.vmdk`).
    pub object_name: String,
}

/// What the OVF says of the guest, for the launch decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OvfHints {
    pub os: Option<String>,
    pub os_version: Option<String>,
    /// `BIOS` or `UEFI_64`.
    pub firmware: Option<String>,
}

#[derive(Debug, Default)]
struct Ovf {
    /// `ovf:id` -> `ovf:href` of each `References/File`, with its compression.
    files: Vec<(String, String, Option<String>)>,
    /// Each `DiskSection/Disk`: its id and the file it refers to.
    disks: Vec<(String, Option<String>)>,
    hints: OvfHints,
}

fn parse_ovf(text: &str) -> Result<Ovf, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut ovf = Ovf::default();
    let mut path: Vec<String> = Vec::new();
    let mut description = String::new();
    let mut os_type = None;
    let mut os_id = None;
    // Bounded: every event consumes input, and the text is at most 1 MiB.
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| format!("the OVF descriptor is not well-formed XML: {e}"))?;
        let (start, empty) = match &ev {
            Event::Start(s) => (Some(s.clone()), false),
            Event::Empty(s) => (Some(s.clone()), true),
            _ => (None, false),
        };
        if let Some(s) = start {
            let name = String::from_utf8_lossy(s.local_name().as_ref()).into_owned();
            let attrs: Vec<(String, String)> = s
                .attributes()
                .flatten()
                .map(|a| {
                    (
                        String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned(),
                        a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .map(|v| v.into_owned())
                            .unwrap_or_default(),
                    )
                })
                .collect();
            let attr = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let parent = path.last().map(String::as_str).unwrap_or("");
            match name.as_str() {
                "File" if parent == "References" => {
                    if let (Some(id), Some(href)) = (attr("id"), attr("href")) {
                        ovf.files.push((id, href, attr("compression")));
                    }
                }
                "Disk" if parent == "DiskSection" => {
                    ovf.disks
                        .push((attr("diskId").unwrap_or_default(), attr("fileRef")));
                }
                "OperatingSystemSection" if ovf.hints.os.is_none() && os_id.is_none() => {
                    os_id = attr("id");
                    os_type = attr("osType");
                    ovf.hints.os_version = attr("version").filter(|v| !v.is_empty());
                }
                // VMware: <vmw:Config vmw:key="firmware" vmw:value="efi"/>.
                "Config" if attr("key").as_deref() == Some("firmware") => {
                    ovf.hints.firmware = firmware(attr("value").as_deref());
                }
                // VirtualBox: <Firmware type="EFI"/> in its machine section.
                "Firmware" => {
                    ovf.hints.firmware = firmware(attr("type").as_deref());
                }
                _ => {}
            }
            if !empty {
                path.push(name);
            }
            continue;
        }
        match ev {
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t)
                if path.last().map(String::as_str) == Some("Description")
                    && path.iter().any(|p| p == "OperatingSystemSection") =>
            {
                if let Ok(s) = t.decode() {
                    description.push_str(&s);
                }
            }
            Event::GeneralRef(r)
                if path.last().map(String::as_str) == Some("Description")
                    && path.iter().any(|p| p == "OperatingSystemSection") =>
            {
                let c = match r.decode().as_deref() {
                    Ok("amp") => Some('&'),
                    Ok("lt") => Some('<'),
                    Ok("gt") => Some('>'),
                    Ok("quot") => Some('"'),
                    Ok("apos") => Some('\''),
                    _ => r.resolve_char_ref().ok().flatten(),
                };
                description.extend(c);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let description = description.trim();
    ovf.hints.os = if !description.is_empty() {
        Some(description.to_string())
    } else if let Some(t) = os_type.filter(|t| !t.is_empty()) {
        Some(t)
    } else {
        os_id.map(|id| format!("CIM operating system {id}"))
    };
    Ok(ovf)
}

fn firmware(v: Option<&str>) -> Option<String> {
    match v?.to_ascii_lowercase().as_str() {
        "efi" | "efi64" | "uefi" => Some("UEFI_64".into()),
        "bios" => Some("BIOS".into()),
        _ => None,
    }
}

/// A tar member: its name, where its data starts, and its size.
struct Entry {
    name: String,
    offset: u64,
    size: u64,
    /// Its bytes are stored whole, in order, from `offset` (a regular
    /// file; not sparse, a link or a directory).
    contiguous: bool,
}

fn base(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn is_descriptor(name: &str) -> bool {
    base(name).to_ascii_lowercase().ends_with(".ovf")
}

/// Whether a tar with these members is an OVA (an OVF descriptor in it).
pub(super) fn is_ova(names: &[String]) -> bool {
    names.iter().any(|n| is_descriptor(n))
}

/// Checks an OVA: one disk, named by its OVF, inspected as an image; the
/// report names the member to ship and the OVF's hints.
pub(super) fn check(
    r: &dyn ReadAt,
    rep: &mut Report,
    policy: &Policy,
    hints: &mut Option<OvfHints>,
) -> std::io::Result<()> {
    rep.format = "ova".into();
    rep.format_name = "OVA".into();
    rep.detail("container", "ova");
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(
        64 << 10,
        Range::new(r, 0, r.size()),
    ));
    let mut entries = Vec::new();
    let mut text = None;
    let walked = archive.entries_with_seek().and_then(|it| {
        for entry in it.take(MAX_MEMBERS) {
            let mut entry = entry?;
            let name = entry.path()?.to_string_lossy().into_owned();
            let size = entry.size();
            if text.is_none() && is_descriptor(&name) {
                let mut s = String::new();
                text = Some(if size > MAX_OVF_BYTES {
                    Err(format!(
                        "{name} has {size} bytes; that is not an OVF descriptor"
                    ))
                } else {
                    (&mut entry)
                        .take(MAX_OVF_BYTES)
                        .read_to_string(&mut s)
                        .map(|_| s)
                        .map_err(|e| format!("{name}: {e}"))
                });
            }
            let kind = entry.header().entry_type();
            // A PAX sparse file keeps its map in extension keys.
            let pax_sparse = entry.pax_extensions().ok().flatten().is_some_and(|mut x| {
                x.any(|e| e.is_ok_and(|e| e.key_bytes().starts_with(b"GNU.sparse")))
            });
            entries.push(Entry {
                offset: entry.raw_file_position(),
                size,
                name,
                contiguous: (kind.is_file() || kind.is_contiguous()) && !pax_sparse,
            });
        }
        Ok(())
    });
    if let Err(e) = walked {
        rep.refuse(format!(
            "the OVA's tar archive is damaged or truncated: {e}"
        ));
        return Ok(());
    }
    let ovf = match text.map(|t| t.and_then(|t| parse_ovf(&t))) {
        Some(Ok(o)) => o,
        Some(Err(e)) => {
            rep.refuse(format!("the OVA's descriptor cannot be read: {e}"));
            return Ok(());
        }
        None => {
            rep.refuse("the OVA holds no OVF descriptor (NAME.ovf): export the appliance again, or ship its disk image alone");
            return Ok(());
        }
    };
    // The disks the OVF names, by their files; with no DiskSection, every
    // member that is not the descriptor, its manifest or its certificate.
    let disks: Vec<(String, Option<String>)> = if ovf.disks.is_empty() {
        entries
            .iter()
            .filter(|e| {
                let l = base(&e.name).to_ascii_lowercase();
                !(l.ends_with(".ovf") || l.ends_with(".mf") || l.ends_with(".cert"))
            })
            .map(|e| (base(&e.name).to_string(), None))
            .collect()
    } else {
        ovf.disks
            .iter()
            .map(|(id, file_ref)| {
                let file = file_ref
                    .as_ref()
                    .and_then(|f| ovf.files.iter().find(|(fid, _, _)| fid == f));
                match file {
                    Some((_, href, compression)) => (href.clone(), compression.clone()),
                    None => (format!("{id} (no file)"), None),
                }
            })
            .collect()
    };
    rep.detail(
        "ovf_disks",
        disks.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
    );
    *hints = Some(ovf.hints);
    let (href, compression) = match disks.as_slice() {
        [] => {
            rep.refuse("the OVA holds no disk: export the appliance again with its disk");
            return Ok(());
        }
        [one] => one.clone(),
        many => {
            let names: Vec<&str> = many.iter().map(|(n, _)| n.as_str()).collect();
            rep.refuse(format!(
                "the OVA holds {} disks ({}); OCI imports one boot disk: extract the boot disk (one of them: tar xf {} {}) and ship it alone, and move the data disks as block volumes",
                names.len(),
                names.join(", "),
                rep.file,
                names.join(" ")
            ));
            return Ok(());
        }
    };
    if let Some(c) = compression.filter(|c| !c.is_empty() && c != "identity") {
        rep.refuse(format!(
            "the OVA's disk {href} is stored compressed ({c}); extract it (tar xf {} {href}), decompress it, and ship the disk",
            rep.file
        ));
        return Ok(());
    }
    let Some(member) = entries.iter().find(|e| base(&e.name) == base(&href)) else {
        rep.refuse(format!(
            "the OVF names the disk {href}, which is not in the archive (an OVA exported in chunks, ovf:chunkSize, holds {href}.000000000 and the rest): export it again without chunks, or join the chunks and ship the disk"
        ));
        return Ok(());
    };
    if !member.contiguous {
        rep.refuse(format!(
            "the OVA's disk {} is not stored as a plain file in the tar (a sparse member, or a link): make the OVA again without --sparse (tar --format=ustar), or extract the disk and ship it",
            member.name
        ));
        return Ok(());
    }
    if member.offset.saturating_add(member.size) > r.size() {
        rep.refuse(format!(
            "truncated: the OVA's disk {} reaches past the end of the file",
            member.name
        ));
        return Ok(());
    }
    let inner = Range::new(r, member.offset, member.size);
    let mut inner_rep = Report::new(base(&member.name), member.size);
    let head = inner.read_vec(0, inner.size().min(4096) as usize)?;
    if super::oci::is_tar(&head) || head.starts_with(&[0x1f, 0x8b]) {
        rep.refuse(format!(
            "the OVA's disk {} is itself an archive; extract the disk image and ship it",
            member.name
        ));
        return Ok(());
    }
    super::detect_one(&inner, &head, &mut inner_rep, policy)?;
    let stem = std::path::Path::new(&rep.file)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let ext = match inner_rep.format.as_str() {
        "vpc" => "vhd",
        f => f,
    };
    rep.member = Some(Member {
        name: member.name.clone(),
        offset_bytes: member.offset,
        size_bytes: member.size,
        object_name: format!("{stem}.{ext}"),
    });
    rep.format = inner_rep.format;
    rep.format_name = format!("{}, in an OVA", inner_rep.format_name);
    rep.detail("inner_member", member.name.clone());
    rep.detail("inner", serde_json::Value::Object(inner_rep.details));
    rep.virtual_size = inner_rep.virtual_size;
    rep.boot = inner_rep.boot;
    // `tar xf` first: the commands in the reasons are for the disk itself.
    let disk = format!(
        "the OVA's disk {} (tar xf {} {0} extracts it)",
        member.name, rep.file
    );
    for reason in inner_rep.reasons {
        rep.refuse(format!("{disk}: {reason}"));
    }
    rep.format_reason = inner_rep.format_reason.map(|r| format!("{disk}: {r}"));
    for w in inner_rep.warnings {
        rep.warn(format!("the OVA's disk {}: {w}", member.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><File ovf:id="file1" ovf:href="web-disk1.vmdk" ovf:size="1234"/></References>
  <DiskSection><Info>disks</Info><Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="64"/></DiskSection>
  <VirtualSystem ovf:id="web">
    <OperatingSystemSection ovf:id="109" ovf:version="9" vmw:osType="oracleLinux9_64Guest">
      <Info>The guest</Info><Description>Oracle Linux &amp; more</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection><vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/></VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;

    #[test]
    fn an_ovf_gives_its_disks_os_and_firmware() {
        let o = parse_ovf(OVF).unwrap();
        assert_eq!(
            o.files,
            vec![("file1".into(), "web-disk1.vmdk".into(), None)]
        );
        assert_eq!(o.disks, vec![("vmdisk1".into(), Some("file1".into()))]);
        assert_eq!(o.hints.os.as_deref(), Some("Oracle Linux & more"));
        assert_eq!(o.hints.os_version.as_deref(), Some("9"));
        assert_eq!(o.hints.firmware.as_deref(), Some("UEFI_64"));
    }

    #[test]
    fn a_bad_ovf_is_an_error_not_a_panic() {
        for text in [
            "<a><b></a>",
            "<<<",
            "",
            "<Envelope><OperatingSystemSection/>",
        ] {
            let _ = parse_ovf(text);
        }
        assert!(parse_ovf("<a><b></a>").is_err());
    }
}
