//! Conversion: an image OCI cannot import (raw, VHD, VHDX, VDI, QED, or the
//! disk inside an OVA that is not importable as it is) made into a QCOW2 by
//! `qemu-img convert`, and checked before anything ships it.
//!
//! Promises:
//! - nothing starts that cannot finish for space: the directory the QCOW2 is
//!   written to must hold the image's virtual size plus QCOW2's metadata,
//!   counting what the other conversions under way in this process reserved;
//! - a conversion is complete only when `qemu-img compare` says that the
//!   original and the QCOW2 are identical; until then it is `NAME.partial`,
//!   and a failed one leaves nothing;
//! - what was run is recorded ([`Conversion`]): the converter and its
//!   version, the commands, the comparison's answer;
//! - dropping the future kills qemu-img (a stop request ends a conversion at
//!   once; the next attempt starts it again).
//!
//! Design choice: qemu-img is the reference converter, the one the formats'
//! own tools are checked against, and it is not rewritten here. It is always
//! given the source's format (`-f`, never a probe: a raw disk can start with
//! any bytes). A disk inside an archive is given to it as a `json:` filename
//! whose `raw` layer has the member's offset and size, so nothing is
//! extracted first.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::{Policy, Report, human};
use crate::error::Class;

/// The converter.
pub const CONVERTER: &str = "qemu-img";

/// Why a conversion did not give a checked QCOW2.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(
        "conversion is on (policy.convert), but {program} cannot be run: {why}; install it (Debian, Ubuntu: apt install qemu-utils; Oracle Linux, RHEL: dnf install qemu-img), or turn policy.convert off"
    )]
    Missing { program: String, why: String },
    #[error(
        "{file}: converting it needs up to {} ({needed_bytes} bytes) in {dir} (its virtual size, {}, and QCOW2's tables), and only {} ({free_bytes} bytes) is free there{}; nothing was converted",
        human(*needed_bytes),
        human(*virtual_size),
        human(*free_bytes),
        reserved(*reserved_bytes)
    )]
    NoSpace {
        file: String,
        dir: String,
        needed_bytes: u64,
        virtual_size: u64,
        free_bytes: u64,
        /// Promised to the other conversions under way.
        reserved_bytes: u64,
    },
    #[error("{file}: qemu-img convert failed ({status}): {said}")]
    Failed {
        file: String,
        status: String,
        said: String,
    },
    #[error(
        "{file}: the QCOW2 made from it is not identical to it: qemu-img compare said: {said}; nothing was shipped"
    )]
    Differs { file: String, said: String },
    #[error("{file}: changed while it was being converted: {why}; the conversion was thrown away")]
    Changed { file: String, why: String },
    #[error("{file}: {what}: {source}")]
    Io {
        file: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConvertError {
    /// A converter that is missing is [`Class::Fatal`] (install it); a
    /// conversion that cannot fit, fails or differs is a refusal of this
    /// file ([`Class::Refuse`]: the original is kept, with the figures);
    /// a directory that cannot be written is [`Class::Retry`].
    pub fn class(&self) -> Class {
        match self {
            ConvertError::Missing { .. } => Class::Fatal,
            ConvertError::NoSpace { .. }
            | ConvertError::Failed { .. }
            | ConvertError::Differs { .. }
            | ConvertError::Changed { .. } => Class::Refuse,
            ConvertError::Io { .. } => Class::Retry,
        }
    }

    /// The `outcome` label of `ferry_conversions_total` (`metrics` lists them).
    pub fn outcome(&self) -> &'static str {
        match self {
            ConvertError::NoSpace { .. } => "no_space",
            ConvertError::Differs { .. } => "differs",
            ConvertError::Missing { .. }
            | ConvertError::Failed { .. }
            | ConvertError::Changed { .. }
            | ConvertError::Io { .. } => "failed",
        }
    }

    /// What the operator should do.
    pub fn advice(&self) -> &'static str {
        match self {
            ConvertError::Missing { .. } => "Install qemu-img, or set policy.convert = false.",
            ConvertError::NoSpace { .. } => {
                "Free space in the directory named (the daemon's spool/.ferry/convert/, a push's state_dir/convert/), or put it on a larger filesystem, then ship the image again (the daemon's: move it from failed/ back into the spool); or convert it elsewhere and ship the QCOW2."
            }
            ConvertError::Failed { .. } => {
                "Check the image with qemu-img info and qemu-img check, as the reason says; repair or export it again, then put it back in the spool."
            }
            ConvertError::Differs { .. } => {
                "Convert it by hand and compare (qemu-img compare); report the difference: qemu-img or the disk under the spool is at fault."
            }
            ConvertError::Changed { .. } => {
                "Put the image back in the spool once it is written in full (write it under a temporary name, then rename it in)."
            }
            ConvertError::Io { .. } => {
                "Check the directory conversions are written to (the daemon's spool/.ferry/convert/, a push's state_dir/convert/): it must be writable by ferry, with room."
            }
        }
    }
}

fn reserved(bytes: u64) -> String {
    if bytes == 0 {
        String::new()
    } else {
        format!(
            ", of which {} is promised to conversions under way",
            human(bytes)
        )
    }
}

/// What a conversion did, as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Conversion {
    /// The file as it came (an OVA's disk: the archive, and `member`).
    pub original_file: String,
    /// qemu's driver name: raw, vpc, vhdx, vdi, qed, vmdk.
    pub original_format: String,
    pub original_format_name: String,
    pub original_size_bytes: u64,
    pub original_virtual_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    pub converter: String,
    /// The first line of `qemu-img --version`.
    pub converter_version: String,
    pub command: Vec<String>,
    pub compare_command: Vec<String>,
    /// `identical`: nothing else ships.
    pub compare: String,
    pub converted_size_bytes: u64,
    pub duration_secs: f64,
    /// Made in this attempt (not the QCOW2 of an earlier one, kept).
    #[serde(skip)]
    pub fresh: bool,
}

/// The converter found on this host.
#[derive(Debug, Clone)]
pub struct Converter {
    program: PathBuf,
    pub version: String,
}

impl Converter {
    /// Runs `qemu-img --version`: the converter is there, and this is its
    /// version. Quick: for the start of the daemon or of a push.
    pub fn find() -> Result<Converter, ConvertError> {
        let program = PathBuf::from(CONVERTER);
        let missing = |why: String| ConvertError::Missing {
            program: CONVERTER.into(),
            why,
        };
        let out = std::process::Command::new(&program)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| missing(e.to_string()))?;
        if !out.status.success() {
            return Err(missing(format!("qemu-img --version exited {}", out.status)));
        }
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(Converter { program, version })
    }
}

/// What is converted: a file, or a member of it, in a format qemu-img reads.
#[derive(Debug, Clone)]
pub struct Input {
    pub path: PathBuf,
    /// qemu's driver name.
    pub format: String,
    /// A member of an archive: its offset and size in the file.
    pub range: Option<(u64, u64)>,
    /// The QCOW2's object name.
    pub object_name: String,
}

/// Formats qemu-img converts and OCI does not import.
fn convertible(format: &str) -> bool {
    matches!(format, "raw" | "vpc" | "vhdx" | "vdi" | "qed")
}

impl Input {
    /// What to convert for an image refused as it is, when a conversion
    /// would make it importable: refused only for a format OCI does not
    /// take (alone or as an OVA's disk), never for anything else (a
    /// differencing, damaged or truncated image; a virtual size over the
    /// policy's limit; a licence attestation the policy requires and the
    /// sidecar lacks).
    pub fn of(report: &Report, path: &Path, policy: &Policy) -> Option<Input> {
        if report.verdict != super::Verdict::Refuse || !convertible(&report.format) {
            return None;
        }
        let only_the_format = report
            .format_reason
            .as_ref()
            .is_some_and(|f| !report.reasons.is_empty() && report.reasons.iter().all(|r| r == f));
        let size_ok = report
            .virtual_size
            .is_some_and(|v| v > 0 && v <= policy.max_virtual_size_bytes);
        let licence_ok = !policy.require_license_attestation || report.license.is_some();
        if !(only_the_format && size_ok && licence_ok) {
            return None;
        }
        let stem = |name: &str| {
            Path::new(name)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into())
        };
        Some(Input {
            // Absolute: qemu-img takes `nbd:x` or `http:x` in a relative
            // name for a protocol, and ferry reaches no endpoint its
            // configuration does not name.
            path: std::path::absolute(path).ok()?,
            format: report.format.clone(),
            range: report
                .member
                .as_ref()
                .map(|m| (m.offset_bytes, m.size_bytes)),
            object_name: format!("{}.qcow2", stem(&report.file)),
        })
    }

    /// How qemu-img is told to read it: `-f FORMAT PATH`, or for a member
    /// a `json:` filename with the member's offset and size.
    fn args(&self) -> Vec<String> {
        let path = self.path.display().to_string();
        match self.range {
            None => vec!["-f".into(), self.format.clone(), path],
            Some((offset, size)) => vec![format!(
                "json:{}",
                serde_json::json!({
                    "driver": self.format,
                    "file": {
                        "driver": "raw",
                        "offset": offset,
                        "size": size,
                        "file": {"driver": "file", "filename": path},
                    },
                })
            )],
        }
    }
}

/// What the original's container said of the guest (an OVA's descriptor:
/// its OS and firmware, basis `ovf`) kept for the QCOW2 made from it, in
/// the same order of trust: a sidecar's word still wins.
pub fn keep_hints(converted: &mut Report, original: &Report) {
    if original.firmware_basis == "ovf" {
        converted.offer_firmware(Some(&original.firmware), "ovf");
    }
    if original.os_basis == "ovf" {
        converted.offer_os(
            original.os.as_deref(),
            original.os_version.as_deref(),
            "ovf",
        );
    }
}

/// The space a QCOW2 of `virtual_size` bytes may take at most: every
/// cluster, its L2 entry and refcount (under 1/4096 of it), and the header.
pub fn needed_bytes(virtual_size: u64) -> u64 {
    virtual_size
        .saturating_add(virtual_size / 4096)
        .saturating_add(1 << 20)
}

/// The bytes an unprivileged writer may still use in the filesystem of `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is written by the call
    // before it is read (only when it returns 0).
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // c_ulong is not u64 everywhere
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Space promised to conversions under way in this process.
static RESERVED: Mutex<u64> = Mutex::new(0);

/// A share of [`RESERVED`], given back when dropped.
struct Reservation(u64);

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut r = RESERVED.lock().unwrap_or_else(|p| p.into_inner());
        *r = r.saturating_sub(self.0);
    }
}

/// Where a conversion is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// For a conversion slot (`daemon.max_conversions`).
    Waiting,
    Converting,
    Comparing,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Waiting => "waiting",
            Step::Converting => "converting",
            Step::Comparing => "comparing",
        }
    }
}

/// The file beside `out` that a conversion writes into.
pub fn partial_of(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Converts `input` (inspected as `report`) into the QCOW2 `out`, checks
/// it with `qemu-img compare`, and says what was done. `progress` hears the
/// step and its percentage as qemu-img prints them.
pub async fn convert(
    converter: &Converter,
    input: &Input,
    report: &Report,
    out: &Path,
    progress: &(dyn Fn(Step, f64) + Send + Sync),
) -> Result<Conversion, ConvertError> {
    let started = Instant::now();
    let file = report.file.clone();
    let io = |what: &str| {
        let (file, what) = (file.clone(), what.to_string());
        move |source| ConvertError::Io { file, what, source }
    };
    let dir = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(&format!("cannot make {}", dir.display())))?;
    let virtual_size = report.virtual_size.unwrap_or(0);
    let needed = needed_bytes(virtual_size);
    let partial = partial_of(out);
    let _ = std::fs::remove_file(&partial);
    let _reservation = {
        let free = free_bytes(dir).map_err(io(&format!("cannot measure {}", dir.display())))?;
        let mut reserved = RESERVED.lock().unwrap_or_else(|p| p.into_inner());
        if needed > free.saturating_sub(*reserved) {
            return Err(ConvertError::NoSpace {
                file,
                dir: dir.display().to_string(),
                needed_bytes: needed,
                virtual_size,
                free_bytes: free,
                reserved_bytes: *reserved,
            });
        }
        *reserved += needed;
        Reservation(needed)
    };
    let partial_s = partial.display().to_string();
    let mut command: Vec<String> = vec![CONVERTER.into(), "convert".into(), "-p".into()];
    command.extend(input.args());
    command.extend(["-O".into(), "qcow2".into(), partial_s.clone()]);
    let converted = run(converter, &command, Step::Converting, progress).await;
    let (status, _, said) = match converted {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(io("cannot run qemu-img convert")(e));
        }
    };
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(ConvertError::Failed {
            file,
            status: status.to_string(),
            said,
        });
    }
    // compare: -f and -F name the formats of the first and second image.
    let mut compare_command: Vec<String> = vec![CONVERTER.into(), "compare".into(), "-p".into()];
    match input.range {
        None => compare_command.extend([
            "-f".into(),
            input.format.clone(),
            "-F".into(),
            "qcow2".into(),
            input.path.display().to_string(),
        ]),
        Some(_) => {
            compare_command.extend(["-F".into(), "qcow2".into()]);
            compare_command.extend(input.args());
        }
    }
    compare_command.push(partial_s);
    let compared = run(converter, &compare_command, Step::Comparing, progress).await;
    let (status, last, said) = match compared {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(io("cannot run qemu-img compare")(e));
        }
    };
    match status.code() {
        Some(0) => {}
        Some(1) => {
            let _ = std::fs::remove_file(&partial);
            return Err(ConvertError::Differs { file, said: last });
        }
        _ => {
            let _ = std::fs::remove_file(&partial);
            return Err(ConvertError::Failed {
                file,
                status: format!("qemu-img compare {status}"),
                said,
            });
        }
    }
    // Durable before it is named: a restart ships a QCOW2 by its name.
    // A whole disk's writes may wait in the page cache: off the runtime.
    let (from, to, parent) = (partial.clone(), out.to_path_buf(), dir.to_path_buf());
    let converted_size_bytes = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&from)?;
        f.sync_all()?;
        let len = f.metadata()?.len();
        std::fs::rename(&from, &to)?;
        if let Ok(d) = std::fs::File::open(&parent) {
            let _ = d.sync_all();
        }
        Ok(len)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    .map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        io("cannot sync and name the conversion")(e)
    })?;
    progress(Step::Comparing, 100.0);
    Ok(Conversion {
        original_file: report.file.clone(),
        original_format: report.format.clone(),
        original_format_name: report.format_name.clone(),
        original_size_bytes: report.file_size,
        original_virtual_size: virtual_size,
        member: report.member.as_ref().map(|m| m.name.clone()),
        converter: CONVERTER.into(),
        converter_version: converter.version.clone(),
        command,
        compare_command,
        compare: "identical".into(),
        converted_size_bytes,
        duration_secs: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        fresh: true,
    })
}

/// The most of qemu-img's error output kept for a message.
const SAID_MAX_BYTES: usize = 2048;

/// Runs a qemu-img command; its progress (`(12.34/100%)`, on stdout) goes
/// to `progress`. Answers its exit status, the last line it printed on
/// stdout that is not progress, and the end of its error output.
async fn run(
    converter: &Converter,
    command: &[String],
    step: Step,
    progress: &(dyn Fn(Step, f64) + Send + Sync),
) -> std::io::Result<(std::process::ExitStatus, String, String)> {
    let mut child = tokio::process::Command::new(&converter.program)
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let no_pipe = || std::io::Error::other("no pipe to qemu-img");
    let mut stdout = child.stdout.take().ok_or_else(no_pipe)?;
    let mut stderr = child.stderr.take().ok_or_else(no_pipe)?;
    let errors = tokio::spawn(async move {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // Bounded: keeps the last SAID_MAX_BYTES.
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if all.len() > SAID_MAX_BYTES {
                all.drain(..all.len() - SAID_MAX_BYTES);
            }
        }
        String::from_utf8_lossy(&all).trim().to_string()
    });
    let mut line = Vec::new();
    let mut last = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                let text = String::from_utf8_lossy(&line).trim().to_string();
                match percent(&text) {
                    Some(p) => progress(step, p),
                    None if !text.is_empty() => last = text,
                    None => {}
                }
                line.clear();
            } else if line.len() < 1024 {
                line.push(b);
            }
        }
    }
    let status = child.wait().await?;
    let said = errors.await.unwrap_or_default();
    let said = if said.is_empty() { last.clone() } else { said };
    Ok((status, last, said))
}

/// The percentage in a progress line of qemu-img: `(12.34/100%)`.
fn percent(line: &str) -> Option<f64> {
    let inner = line.strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_are_read_and_others_are_not() {
        assert_eq!(percent("(12.34/100%)"), Some(12.34));
        assert_eq!(percent("(100.00/100%)"), Some(100.0));
        assert_eq!(percent("Images are identical."), None);
        assert_eq!(percent("(x/100%)"), None);
    }

    #[test]
    fn the_space_needed_covers_the_virtual_size_and_tables() {
        assert_eq!(needed_bytes(0), 1 << 20);
        let v = 4u64 << 30;
        assert!(needed_bytes(v) > v + v / 8192 + v / 32768);
        assert_eq!(needed_bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_member_is_read_through_a_raw_layer_with_its_offset() {
        let i = Input {
            path: "/s/a.ova".into(),
            format: "vpc".into(),
            range: Some((1536, 4096)),
            object_name: "a.qcow2".into(),
        };
        let a = i.args();
        assert_eq!(a.len(), 1);
        let v: serde_json::Value =
            serde_json::from_str(a[0].strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(v["driver"], "vpc");
        assert_eq!(v["file"]["offset"], 1536);
        assert_eq!(v["file"]["size"], 4096);
        assert_eq!(v["file"]["file"]["filename"], "/s/a.ova");
    }
}
