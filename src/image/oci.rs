//! `.oci`: a tar (plain or gzip) holding one QCOW2 member and
//! `image_metadata.json`, in any order. The inner QCOW2 passes the QCOW2 rules;
//! launch mode, firmware and OS come from the metadata. Member sizes over 8 GiB
//! (GNU base-256, pax `size=`) are read by the `tar` crate.

use std::io::Read;

use super::{GzMember, Hints, Policy, Range, ReadAt, Report, STREAM_BUFFER_BYTES, ova, qcow2};

const METADATA: &str = "image_metadata.json";
const MAX_METADATA_BYTES: u64 = 1 << 20;
/// Members looked at before giving up on finding the two that matter.
const MAX_MEMBERS: usize = 64;

pub(super) fn is_tar(head: &[u8]) -> bool {
    head.len() >= 262 && &head[257..262] == b"ustar"
}

struct Found {
    metadata: Option<Result<serde_json::Value, String>>,
    qcow2: Option<(String, u64, u64)>,
    names: Vec<String>,
}

fn scan<R: Read>(entries: tar::Entries<'_, R>) -> std::io::Result<Found> {
    let mut found = Found {
        metadata: None,
        qcow2: None,
        names: vec![],
    };
    for (i, entry) in entries.enumerate() {
        if i >= MAX_MEMBERS {
            break;
        }
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let size = entry.size();
        let base = name.rsplit('/').next().unwrap_or(&name).to_string();
        if base == METADATA {
            let mut text = String::new();
            let r = if size > MAX_METADATA_BYTES {
                Err(format!(
                    "{METADATA} has {size} bytes; that is not image metadata"
                ))
            } else {
                (&mut entry)
                    .take(MAX_METADATA_BYTES)
                    .read_to_string(&mut text)
                    .map_err(|e| e.to_string())
                    .and_then(|_| serde_json::from_str(&text).map_err(|e| e.to_string()))
            };
            found.metadata = Some(r);
        } else if base.to_ascii_lowercase().ends_with(".qcow2") && found.qcow2.is_none() {
            found.qcow2 = Some((name.clone(), entry.raw_file_position(), size));
        }
        found.names.push(name);
    }
    Ok(found)
}

fn judge(
    found: Found,
    inner: &dyn ReadAt,
    rep: &mut Report,
    policy: &Policy,
    hints: &mut Hints,
    container: &str,
) -> std::io::Result<()> {
    rep.format = "oci".into();
    rep.format_name = format!(".oci ({container})");
    rep.detail("container", container);
    let names = found.names.join(", ");
    match found.metadata {
        None => {
            if ova::is_ova(&found.names) {
                rep.format = "ova".into();
                rep.format_name = "OVA (gzip-compressed)".into();
                rep.refuse(format!(
                    "a gzip-compressed OVA ({names}); decompress it (gunzip), then ship the .ova"
                ));
            } else {
                rep.format = "tar".into();
                rep.format_name = "tar archive".into();
                rep.refuse(format!(
                    "a tar archive without {METADATA} ({names}): not an .oci image; ship the disk image inside it instead"
                ));
            }
            return Ok(());
        }
        Some(Err(e)) => rep.refuse(format!(
            "the .oci image's {METADATA} is not valid JSON: {e}"
        )),
        Some(Ok(v)) => hints.oci_meta = Some(v),
    }
    let Some((name, _, _)) = found.qcow2 else {
        rep.refuse(format!(
            "the .oci image holds no QCOW2 member (members: {names})"
        ));
        return Ok(());
    };
    rep.detail("inner_member", name);
    let mut inner_rep = Report::new(&rep.file, inner.size());
    let head = inner.read_vec(0, inner.size().min(4) as usize)?;
    if head != b"QFI\xfb" {
        rep.refuse("the .oci image's QCOW2 member does not start with a QCOW2 header");
        return Ok(());
    }
    qcow2::check(inner, &mut inner_rep, policy)?;
    rep.detail("inner_format", "qcow2");
    rep.detail("inner", serde_json::Value::Object(inner_rep.details));
    rep.virtual_size = inner_rep.virtual_size;
    rep.boot = inner_rep.boot;
    for r in inner_rep.reasons {
        rep.refuse(format!("inner QCOW2: {r}"));
    }
    for w in inner_rep.warnings {
        rep.warn(format!("inner QCOW2: {w}"));
    }
    Ok(())
}

pub(super) fn check_tar(
    r: &dyn ReadAt,
    rep: &mut Report,
    policy: &Policy,
    hints: &mut Hints,
) -> std::io::Result<()> {
    // Seekable: members are skipped, not read (an object source is read by
    // ranged GETs, and the QCOW2 member is most of the file).
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(
        64 << 10,
        Range::new(r, 0, r.size()),
    ));
    let found = match archive.entries_with_seek().and_then(scan) {
        Ok(f) => f,
        Err(e) => {
            rep.format = "tar".into();
            rep.format_name = "tar archive".into();
            rep.refuse(format!("the tar archive is damaged or truncated: {e}"));
            return Ok(());
        }
    };
    if found.metadata.is_none() && ova::is_ova(&found.names) {
        return ova::check(r, rep, policy, &mut hints.ovf);
    }
    let (start, len) = found.qcow2.as_ref().map(|q| (q.1, q.2)).unwrap_or((0, 0));
    if start.saturating_add(len) > r.size() {
        rep.format = "oci".into();
        rep.refuse("truncated: the .oci image's QCOW2 member reaches past the end of the file");
        return Ok(());
    }
    let inner = Range::new(r, start, len);
    judge(found, &inner, rep, policy, hints, "oci-tar")
}

pub(super) fn check_gzip(
    r: &dyn ReadAt,
    rep: &mut Report,
    policy: &Policy,
    hints: &mut Hints,
) -> std::io::Result<()> {
    let stream = || {
        flate2::read::GzDecoder::new(std::io::BufReader::with_capacity(
            STREAM_BUFFER_BYTES,
            Range::new(r, 0, r.size()),
        ))
    };
    let mut peek = [0u8; 512];
    let n = read_up_to(&mut stream(), &mut peek);
    if n < 512 || !is_tar(&peek) {
        rep.format = "gzip".into();
        rep.format_name = "a gzip-compressed file".into();
        rep.refuse("OCI cannot import a gzip-compressed file; decompress it first (gunzip), then check the image inside with ferry inspect");
        return Ok(());
    }
    let mut archive = tar::Archive::new(stream());
    let found = match archive.entries().and_then(scan) {
        Ok(f) => f,
        Err(e) => {
            rep.format = "oci".into();
            rep.refuse(format!(
                "the gzip-compressed tar is damaged or truncated: {e}"
            ));
            return Ok(());
        }
    };
    let (start, len) = found.qcow2.as_ref().map(|q| (q.1, q.2)).unwrap_or((0, 0));
    let inner = GzMember::new(r, start, len);
    judge(found, &inner, rep, policy, hints, "oci-tar-gz")
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}
