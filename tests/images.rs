//! Image inspection against qemu-img as the reference: images are made by
//! qemu-img at test time (and by hand where qemu-img cannot make them), and
//! `ferry inspect --json` must agree with `qemu-img info --output=json -f FMT`
//! on format and virtual size, and give the verdict OCI's importer would.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn qemu_info(path: &Path, fmt: &str) -> Option<serde_json::Value> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt])
        .arg(path)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn inspect(path: &Path, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = ferry()
        .arg("inspect")
        .arg("--json")
        .args(extra)
        .arg(path)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{}: not JSON ({e}): {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), v)
}

fn set_byte(path: &Path, at: u64, v: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[v], at).unwrap();
}

struct Case {
    file: &'static str,
    /// qemu-img's -f for the reference; None when qemu-img cannot open it.
    fmt: Option<&'static str>,
    accept: bool,
    /// A phrase the reasons (refusals) or warnings (acceptances) must hold.
    phrase: &'static str,
}

fn c(file: &'static str, fmt: Option<&'static str>, accept: bool, phrase: &'static str) -> Case {
    Case {
        file,
        fmt,
        accept,
        phrase,
    }
}

fn make_images(d: &Path) {
    boot_raw(&d.join("boot.raw"), 4 << 20);
    let q = |a: &[&str]| qemu(a, d);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10",
        "boot.raw",
        "v2.qcow2",
    ]);
    q(&[
        "convert", "-f", "raw", "-O", "qcow2", "boot.raw", "v3.qcow2",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "v3.qcow2",
        "-F",
        "qcow2",
        "backing.qcow2",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        "luks.qcow2",
        "64M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=extdata.raw",
        "extdata.qcow2",
        "64M",
    ]);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on",
        "boot.raw",
        "extl2.qcow2",
    ]);
    q(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "boot.raw",
        "zlib.qcow2",
    ]);
    q(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "boot.raw",
        "zstd.qcow2",
    ]);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "boot.raw",
        "snap.qcow2",
    ]);
    q(&["snapshot", "-c", "before-export", "snap.qcow2"]);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "boot.raw",
        "bitmap.qcow2",
    ]);
    q(&["bitmap", "--add", "bitmap.qcow2", "b0"]);
    for (name, bit) in [
        ("corrupt.qcow2", 0x02u8),
        ("dirty.qcow2", 0x01),
        ("unknown.qcow2", 0x20),
    ] {
        std::fs::copy(d.join("v3.qcow2"), d.join(name)).unwrap();
        set_byte(&d.join(name), 79, bit);
    }
    std::fs::copy(d.join("v3.qcow2"), d.join("truncated.qcow2")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("truncated.qcow2"))
        .unwrap()
        .set_len(200_000)
        .unwrap();
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "boot.raw",
        "mono.vmdk",
    ]);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "boot.raw",
        "stream.vmdk",
    ]);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        "boot.raw",
        "twogb.vmdk",
    ]);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        "boot.raw",
        "flat.vmdk",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "mono.vmdk",
        "-F",
        "vmdk",
        "delta.vmdk",
    ]);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        "boot.raw",
        "fixed.vhd",
    ]);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "boot.raw",
        "dynamic.vhd",
    ]);
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "boot.raw",
        "disk.vhdx",
    ]);
    q(&["convert", "-f", "raw", "-O", "vdi", "boot.raw", "disk.vdi"]);
    // .oci: a tar of output.QCOW2 and image_metadata.json, plain and gzipped.
    let oci = d.join("oci");
    std::fs::create_dir_all(&oci).unwrap();
    std::fs::copy(d.join("zstd.qcow2"), oci.join("output.QCOW2")).unwrap();
    let caps = r#"{\"capabilities\":{\"Compute.LaunchMode\":{\"descriptorType\":\"enumstring\",\"values\":[\"NATIVE\",\"PARAVIRTUALIZED\"],\"defaultValue\":\"PARAVIRTUALIZED\"}}}"#;
    std::fs::write(
        oci.join("image_metadata.json"),
        format!(r#"{{"version":2,"externalLaunchOptions":{{"firmware":"UEFI_64","launchOptionsSource":"PARAVIRTUALIZED"}},"imageCapabilityData":"{caps}","operatingSystem":"Oracle Linux","operatingSystemVersion":"9"}}"#),
    )
    .unwrap();
    let tar = |args: &[&str]| {
        let ok = Command::new("tar")
            .args(args)
            .current_dir(&oci)
            .status()
            .unwrap();
        assert!(ok.success());
    };
    tar(&[
        "--format=gnu",
        "-cf",
        "../plain.oci",
        "image_metadata.json",
        "output.QCOW2",
    ]);
    tar(&["-czf", "../gzip.oci", "output.QCOW2", "image_metadata.json"]);
    make_gd_at_end_vmdk(&d.join("gdatend.vmdk"), &d.join("boot.raw"));
}

/// A streamOptimized VMDK in the VMware-spec layout: gdOffset = GD_AT_END in the
/// header, grains, GT and GD with markers, a footer with the real gdOffset, EOS.
fn make_gd_at_end_vmdk(out: &Path, raw: &Path) {
    let data = std::fs::read(raw).unwrap();
    let capacity = data.len() as u64 / 512;
    let grain = 128u64; // sectors
    let gtes = 512u32;
    let header = |gd: u64| {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        h[8..12].copy_from_slice(&0x30001u32.to_le_bytes());
        h[12..20].copy_from_slice(&capacity.to_le_bytes());
        h[20..28].copy_from_slice(&grain.to_le_bytes());
        h[28..36].copy_from_slice(&1u64.to_le_bytes());
        h[36..44].copy_from_slice(&20u64.to_le_bytes());
        h[44..48].copy_from_slice(&gtes.to_le_bytes());
        h[56..64].copy_from_slice(&gd.to_le_bytes());
        h[64..72].copy_from_slice(&21u64.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
        h
    };
    let mut f = header(u64::MAX);
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n# Extent description\nRDONLY {capacity} SPARSE \"gdatend.vmdk\"\n\n# The Disk Data Base\n#DDB\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n"
    );
    let mut d = desc.into_bytes();
    d.resize(20 * 512, 0);
    f.extend_from_slice(&d);
    let pad = |f: &mut Vec<u8>| {
        let n = f.len().div_ceil(512) * 512;
        f.resize(n, 0);
    };
    let grains = capacity / grain;
    let mut gt = vec![0u32; gtes as usize];
    for g in 0..grains {
        let chunk = &data[(g * grain * 512) as usize..((g + 1) * grain * 512) as usize];
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(chunk).unwrap();
        let z = enc.finish().unwrap();
        gt[g as usize] = (f.len() / 512) as u32;
        f.extend_from_slice(&(g * grain).to_le_bytes());
        f.extend_from_slice(&(z.len() as u32).to_le_bytes());
        f.extend_from_slice(&z);
        pad(&mut f);
    }
    let marker = |f: &mut Vec<u8>, val: u64, ty: u32| {
        let mut m = vec![0u8; 512];
        m[0..8].copy_from_slice(&val.to_le_bytes());
        m[12..16].copy_from_slice(&ty.to_le_bytes());
        f.extend_from_slice(&m);
    };
    marker(&mut f, 4, 1); // GT: 512 entries = 4 sectors
    let gt_sector = f.len() / 512;
    for e in &gt {
        f.extend_from_slice(&e.to_le_bytes());
    }
    pad(&mut f);
    marker(&mut f, 1, 2); // GD
    let gd_sector = (f.len() / 512) as u64;
    f.extend_from_slice(&(gt_sector as u32).to_le_bytes());
    pad(&mut f);
    marker(&mut f, 1, 3); // footer
    f.extend_from_slice(&header(gd_sector));
    f.extend_from_slice(&[0u8; 512]); // EOS
    std::fs::write(out, f).unwrap();
}

/// Acceptance 1 and 2: every image made above, against qemu-img.
#[test]
fn inspect_agrees_with_qemu_img_and_gives_the_right_verdict() {
    let dir = tmpdir();
    let d = dir.path();
    make_images(d);
    let cases = vec![
        c("v2.qcow2", Some("qcow2"), true, ""),
        c("v3.qcow2", Some("qcow2"), true, ""),
        c("backing.qcow2", Some("qcow2"), false, "backing file"),
        c("luks.qcow2", Some("qcow2"), false, "encrypted (LUKS"),
        c("extdata.qcow2", Some("qcow2"), false, "external data file"),
        c("extl2.qcow2", Some("qcow2"), false, "extended L2"),
        c("zlib.qcow2", Some("qcow2"), true, ""),
        c("zstd.qcow2", Some("qcow2"), true, "zstd"),
        c("snap.qcow2", Some("qcow2"), true, "snapshot"),
        c("bitmap.qcow2", Some("qcow2"), true, "bitmap"),
        c("corrupt.qcow2", Some("qcow2"), false, "corrupt bit"),
        c("dirty.qcow2", Some("qcow2"), true, "dirty bit"),
        c(
            "unknown.qcow2",
            None,
            false,
            "unknown incompatible feature bits 0x20",
        ),
        c("truncated.qcow2", Some("qcow2"), false, "truncated"),
        c("mono.vmdk", Some("vmdk"), true, ""),
        c("stream.vmdk", Some("vmdk"), true, ""),
        c("gdatend.vmdk", Some("vmdk"), true, ""),
        c(
            "twogb.vmdk",
            Some("vmdk"),
            false,
            "multi-file VMDK (createType twoGbMaxExtentSparse)",
        ),
        c(
            "flat.vmdk",
            Some("vmdk"),
            false,
            "multi-file VMDK (createType monolithicFlat)",
        ),
        c("delta.vmdk", Some("vmdk"), false, "delta (child) VMDK"),
        c(
            "fixed.vhd",
            Some("vpc"),
            false,
            "OCI cannot import VHD (fixed)",
        ),
        c(
            "dynamic.vhd",
            Some("vpc"),
            false,
            "OCI cannot import VHD (dynamic)",
        ),
        c("disk.vhdx", Some("vhdx"), false, "OCI cannot import VHDX"),
        c("disk.vdi", Some("vdi"), false, "OCI cannot import VDI"),
        c("boot.raw", Some("raw"), false, "OCI cannot import raw"),
        c("plain.oci", None, true, ""),
        c("gzip.oci", None, true, ""),
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let path = d.join(case.file);
        let (rc, v) = inspect(&path, &[]);
        let verdict = if case.accept { "accept" } else { "refuse" };
        let mut check = |ok: bool, what: String| {
            if !ok {
                failures.push(format!(
                    "{}: {what}\n{}",
                    case.file,
                    serde_json::to_string_pretty(&v).unwrap()
                ));
            }
        };
        check(
            v["verdict"] == verdict,
            format!("verdict {} != {verdict}", v["verdict"]),
        );
        check(
            rc == if case.accept { 0 } else { 2 },
            format!("exit status {rc}"),
        );
        let texts: Vec<String> = v[if case.accept { "warnings" } else { "reasons" }]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        check(
            case.phrase.is_empty() || texts.iter().any(|t| t.contains(case.phrase)),
            format!("no {:?} in {texts:?}", case.phrase),
        );
        if let Some(fmt) = case.fmt {
            let info =
                qemu_info(&path, fmt).unwrap_or_else(|| panic!("qemu-img info on {}", case.file));
            check(
                v["format"] == info["format"],
                format!("format {} != qemu's {}", v["format"], info["format"]),
            );
            check(
                v["virtual_size"] == info["virtual-size"],
                format!(
                    "virtual size {} != qemu's {}",
                    v["virtual_size"], info["virtual-size"]
                ),
            );
        }
    }
    // .oci: the inner QCOW2 against qemu-img, and the launch data from the metadata.
    let inner = qemu_info(&d.join("oci/output.QCOW2"), "qcow2").unwrap();
    for oci in ["plain.oci", "gzip.oci"] {
        let (_, v) = inspect(&d.join(oci), &[]);
        assert_eq!(v["format"], "oci", "{oci}");
        assert_eq!(v["details"]["inner_format"], "qcow2", "{oci}");
        assert_eq!(v["virtual_size"], inner["virtual-size"], "{oci}");
        assert_eq!(v["launch_mode"], "PARAVIRTUALIZED", "{oci}");
        assert_eq!(v["launch_mode_basis"], "oci-metadata", "{oci}");
        assert_eq!(v["firmware"], "UEFI_64", "{oci}");
        assert_eq!(v["os"], "Oracle Linux", "{oci}");
    }
    // The GD_AT_END layout is valid for qemu-img too. Its words are kept for
    // the failure message: printed as it goes, "No errors were found on the
    // image." would land in the middle of the test's "... ok" line.
    let check = Command::new("qemu-img")
        .args(["check", "-f", "vmdk"])
        .arg(d.join("gdatend.vmdk"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check rejects the hand-built GD_AT_END VMDK: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let (_, v) = inspect(&d.join("gdatend.vmdk"), &[]);
    assert_eq!(v["details"]["layout"], "gd-at-end");
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// A sidecar sets launch mode and licence; policy can require the attestation.
#[test]
fn sidecar_launch_mode_and_licence_policy() {
    let dir = tmpdir();
    let d = dir.path();
    boot_qcow2(d, "disk.qcow2", 1 << 20);
    let (rc, v) = inspect(&d.join("disk.qcow2"), &["--daemon-policy"]);
    assert_eq!(rc, 2);
    let reason = v["reasons"][0].as_str().unwrap();
    assert!(
        reason.contains("no licence attestation") && reason.contains("disk.qcow2.meta.json"),
        "{reason}"
    );
    // Issue 13, item 6: the template in the refusal holds placeholders, not
    // values that could pass for real ones, and a sidecar copied from it as it
    // is, or with one placeholder left, is refused.
    let template = &reason[reason.find('{').unwrap()..];
    let mut filled: serde_json::Value = serde_json::from_str(template).unwrap();
    let license = filled["license"].as_object().unwrap();
    let leaves: Vec<&serde_json::Value> = filled
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "license")
        .map(|(_, v)| v)
        .chain(license.values())
        .collect();
    assert_eq!(leaves.len(), 8, "{template}");
    for v in leaves {
        let v = v.as_str().unwrap();
        assert!(
            v.starts_with('<') && v.ends_with('>'),
            "{v:?} could pass for a value"
        );
    }
    filled["os"] = "Oracle Linux".into();
    filled["os_version"] = "9".into();
    filled["launch_mode"] = "PARAVIRTUALIZED".into();
    filled["firmware"] = "BIOS".into();
    filled["license"]["model"] = "BYOL".into();
    filled["license"]["attested_at"] = "2026-11-27T09:30:00Z".into();
    filled["license"]["statement"] = "It complies.".into();
    for (sidecar, left) in [
        (template.to_string(), "<your OS>"),
        (filled.to_string(), "<who attests"),
    ] {
        std::fs::write(d.join("disk.qcow2.meta.json"), sidecar).unwrap();
        let out = ferry()
            .args(["inspect", "--daemon-policy"])
            .arg(d.join("disk.qcow2"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("placeholder") && err.contains(left), "{err}");
    }
    filled["license"]["attested_by"] = "ops@corp.example".into();
    std::fs::write(d.join("disk.qcow2.meta.json"), filled.to_string()).unwrap();
    let (rc, v) = inspect(&d.join("disk.qcow2"), &["--daemon-policy"]);
    assert_eq!(rc, 0, "{v}");
    std::fs::remove_file(d.join("disk.qcow2.meta.json")).unwrap();
    let (rc, v) = inspect(&d.join("disk.qcow2"), &[]);
    assert_eq!(rc, 0);
    assert_eq!(v["launch_mode"], "UNKNOWN");
    assert_eq!(v["launch_mode_basis"], "none");
    assert_eq!(v["firmware"], "BIOS");
    assert_eq!(v["firmware_basis"], "inspected");
    std::fs::write(
        d.join("disk.qcow2.meta.json"),
        r#"{"os":"Ubuntu","os_version":"22.04","launch_mode":"PARAVIRTUALIZED","license":{"model":"BYOL","attested_by":"ops@example.com","attested_at":"2026-11-26T00:00:00Z","statement":"complies"}}"#,
    )
    .unwrap();
    let (rc, v) = inspect(&d.join("disk.qcow2"), &["--daemon-policy"]);
    assert_eq!(rc, 0, "{v}");
    assert_eq!(v["launch_mode"], "PARAVIRTUALIZED");
    assert_eq!(v["launch_mode_basis"], "attested");
    assert_eq!(v["license"]["model"], "BYOL");
    std::fs::write(d.join("disk.qcow2.meta.json"), r#"{"licence": {}}"#).unwrap();
    let out = ferry()
        .arg("inspect")
        .arg(d.join("disk.qcow2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("licence"));
}

/// Acceptance 3: 10,000 mutated headers never panic, and each inspection ends
/// in bounded time and memory.
#[test]
fn ten_thousand_mutated_headers_never_panic() {
    use rand::{Rng, SeedableRng};
    let dir = tmpdir();
    let d = dir.path();
    make_images(d);
    let bases = [
        "v3.qcow2",
        "v2.qcow2",
        "zlib.qcow2",
        "mono.vmdk",
        "stream.vmdk",
        "gdatend.vmdk",
        "dynamic.vhd",
        "disk.vhdx",
        "disk.vdi",
        "plain.oci",
        "gzip.oci",
        "snap.qcow2",
    ];
    let policy = ferry::image::Policy::default();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    let mut slowest = Duration::ZERO;
    for i in 0..10_000 {
        let base = d.join(bases[i % bases.len()]);
        let work: PathBuf = d.join(format!("m{}", i % bases.len()));
        std::fs::copy(&base, &work).unwrap();
        let len = std::fs::metadata(&work).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&work).unwrap();
        for _ in 0..rng.random_range(1..=8) {
            // Mostly the header, sometimes the tail (VMDK footer, VHD footer).
            let at = if rng.random_bool(0.8) {
                rng.random_range(0..len.min(4096))
            } else {
                len - 1 - rng.random_range(0..len.min(1536))
            };
            let v: u8 = if rng.random_bool(0.3) {
                0xff
            } else {
                rng.random()
            };
            f.write_all_at(&[v], at).unwrap();
        }
        if rng.random_bool(0.05) {
            f.set_len(rng.random_range(0..len)).unwrap();
        }
        drop(f);
        let t = Instant::now();
        let _ = ferry::image::inspect(&work, None, &policy);
        let took = t.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < Duration::from_secs(5),
            "mutation {i} of {} took {took:?}",
            bases[i % bases.len()]
        );
    }
    let hwm_kib: u64 = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!(
        "slowest inspection {slowest:?}, peak RSS {} MiB",
        hwm_kib / 1024
    );
    assert!(hwm_kib < 1024 * 1024, "peak RSS {hwm_kib} KiB");
}

/// Acceptance 4: the daemon moves a refused image to failed/ with an error.json
/// naming the reason and never uploads it; an accepted image's manifest carries
/// the format, launch and licence fields and the CreateImage body.
#[test]
fn daemon_refuses_before_sending_and_manifests_carry_the_image_fields() {
    let dir = tmpdir();
    let root = dir.path();
    let spool = root.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let cfg = write(
        &root.join("ferry.toml"),
        &format!(
            "spool_dir = \"{r}/spool\"\nstate_dir = \"{r}/state\"\nmetrics_addr = \"127.0.0.1:0\"\n[daemon]\nsettle_secs = 1\n[destinations.phoenix]\nurl = \"file://{r}/phoenix/\"\n",
            r = root.display()
        ),
    );
    boot_qcow2(root, "good.qcow2", 1 << 20);
    boot_qcow2(root, "nolicence.qcow2", 1 << 20);
    let sidecar = r#"{"os":"Oracle Linux","os_version":"8","launch_mode":"PARAVIRTUALIZED","firmware":"BIOS","license":{"model":"BYOL","attested_by":"ops@example.com","attested_at":"2026-11-26T00:00:00Z","statement":"complies"}}"#;
    std::fs::write(spool.join("good.qcow2.meta.json"), sidecar).unwrap();
    let d = Daemon::start(&cfg, &root.join("daemon.log"));
    for n in ["good.qcow2", "nolicence.qcow2", "boot.raw"] {
        std::fs::rename(root.join(n), spool.join(n)).unwrap();
    }
    let failed = spool.join(".ferry/failed");
    let settled = wait_until(Duration::from_secs(30), || {
        spool.join(".ferry/done/good.qcow2").exists()
            && failed.join("nolicence.qcow2.error.json").exists()
            && failed.join("boot.raw.error.json").exists()
    });
    assert!(
        settled,
        "done: {:?} failed: {:?}",
        list(&spool.join(".ferry/done")),
        list(&failed)
    );
    let err: serde_json::Value =
        serde_json::from_slice(&std::fs::read(failed.join("boot.raw.error.json")).unwrap())
            .unwrap();
    assert!(
        err["reason"]
            .as_str()
            .unwrap()
            .contains("OCI cannot import raw"),
        "{err}"
    );
    assert!(err["what_to_do"].as_str().unwrap().len() > 10);
    assert!(failed.join("boot.raw").exists());
    let err: serde_json::Value =
        serde_json::from_slice(&std::fs::read(failed.join("nolicence.qcow2.error.json")).unwrap())
            .unwrap();
    assert!(
        err["reason"]
            .as_str()
            .unwrap()
            .contains("no licence attestation"),
        "{err}"
    );
    let uploaded = list(&root.join("phoenix"));
    assert_eq!(
        uploaded,
        vec![
            "good.qcow2".to_string(),
            "good.qcow2.manifest.json".to_string()
        ]
    );
    let m = manifest(&root.join("phoenix/good.qcow2.manifest.json"));
    let img = &m["image"];
    assert_eq!(img["format"], "qcow2");
    assert_eq!(img["details"]["compat"], "1.1");
    assert_eq!(img["virtual_size"], 1 << 20);
    assert_eq!(img["launch_mode"], "PARAVIRTUALIZED");
    assert_eq!(img["launch_mode_basis"], "attested");
    assert_eq!(img["firmware"], "BIOS");
    assert_eq!(img["os"], "Oracle Linux");
    assert_eq!(img["license"]["attested_by"], "ops@example.com");
    assert!(img["warnings"].is_array());
    // Issue 13, item 2: OCI cannot import from a directory, so there is no
    // CreateImage body, and the manifest says why; the key is the name in
    // the directory, the path where it lies.
    assert!(m.get("oci_create_image").is_none(), "{m}");
    let why = m["oci_create_image_unavailable"].as_str().unwrap();
    assert!(
        why.contains("local directory") && why.contains("OCI Object Storage"),
        "{why}"
    );
    assert_eq!(m["destination"]["key"], "good.qcow2");
    assert_eq!(
        m["destination"]["path"],
        root.join("phoenix/good.qcow2").display().to_string()
    );
    drop(d);
}
