//! Guest sectors 0..33: the boot signature, MBR or GPT, and the partitions that
//! hint at the firmware (an EFI system partition, a BIOS boot partition).

use super::{Boot, Report};

/// LBA 0 (MBR), LBA 1 (GPT header) and LBA 2..33 (128 GPT entries).
pub(super) const BOOT_BYTES: usize = 34 * 512;

const ESP: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];
const BIOS_BOOT: [u8; 16] = *b"Hah!IdontNeedEFI";

pub(super) fn inspect(s: &[u8]) -> Boot {
    let mut b = Boot {
        partition_table: "none".into(),
        ..Boot::default()
    };
    if s.len() < 512 {
        return b;
    }
    b.boot_signature = s[510] == 0x55 && s[511] == 0xaa;
    if !b.boot_signature {
        return b;
    }
    let types: Vec<u8> = (0..4).map(|i| s[446 + i * 16 + 4]).collect();
    if types.contains(&0xee) && s.len() >= 1024 && &s[512..520] == b"EFI PART" {
        b.partition_table = "gpt".into();
        let le32 = |o: usize| u32::from_le_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]]);
        let le64 = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&s[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let start = le64(512 + 72).saturating_mul(512);
        let count = u64::from(le32(512 + 80));
        let size = u64::from(le32(512 + 84));
        if size >= 128 {
            for i in 0..count.min(128) {
                let at = start.saturating_add(i * size);
                let Ok(at) = usize::try_from(at) else { break };
                if at + 16 > s.len() {
                    break;
                }
                let t = &s[at..at + 16];
                b.efi_system_partition |= t == ESP;
                b.bios_boot_partition |= t == BIOS_BOOT;
            }
        }
    } else if types.iter().any(|&t| t != 0) || s[..446].iter().any(|&x| x != 0) {
        b.partition_table = "mbr".into();
        b.efi_system_partition = types.contains(&0xef);
    }
    b
}

/// Records what sector 0 says and refuses a disk no BIOS could boot.
pub(super) fn judge(sectors: &[u8], rep: &mut Report) {
    let b = inspect(sectors);
    if !b.boot_signature {
        rep.refuse(
            "guest sector 0 has no boot signature (0x55AA at byte 510): OCI boots an imported image by BIOS from a boot loader in the MBR; install one, or this is not a bootable system disk",
        );
    }
    rep.boot = Some(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_gpt_and_nothing() {
        let mut s = vec![0u8; BOOT_BYTES];
        assert!(!inspect(&s).boot_signature);
        s[510] = 0x55;
        s[511] = 0xaa;
        s[0] = 0xeb;
        assert_eq!(inspect(&s).partition_table, "mbr");
        s[446 + 4] = 0xee;
        s[512..520].copy_from_slice(b"EFI PART");
        s[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        s[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        s[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        s[1024..1040].copy_from_slice(&ESP);
        let b = inspect(&s);
        assert_eq!(b.partition_table, "gpt");
        assert!(b.efi_system_partition && !b.bios_boot_partition);
    }
}
