//! The CRC32C (Castagnoli) of bytes, as fast as this CPU allows.
//!
//! Promises: [`crc32c`] and [`crc32c_append`] give the same values as the
//! `crc32c` crate, which the tests keep as the reference and which
//! `chunk::combine` still uses to join part CRCs (no bytes are read there).
//!
//! Design choice: every byte ferry ships passes through [`crc32c`] once, so
//! its speed is the reader's. `crc-fast` (already built for object_store's
//! CRC64NVME) folds with VPCLMULQDQ where the CPU has it: 22.6–24.0 GB/s
//! against the `crc32c` crate's 12.1–13.2 on a 64 MiB buffer on this
//! project's machine, three runs each.

use crc_fast::CrcAlgorithm::Crc32Iscsi;

/// The CRC32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(bytes)
}

/// The CRC32C of the bytes whose CRC32C is `crc`, followed by `bytes`: the
/// register goes on from `!crc` (CRC-32C's final XOR undone). Not
/// `checksum_combine`, which builds its shift operator anew at every call
/// (tens of microseconds), too slow for the 8 KiB chunks of a network body.
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    let mut digest = crc_fast::Digest::new_with_init_state(Crc32Iscsi, u64::from(!crc));
    digest.update(bytes);
    digest.finalize() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_check_value_of_crc32c() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c_append(0, b"123456789"), 0xe306_9283);
    }

    proptest! {
        #[test]
        fn equals_the_reference_crate(data in proptest::collection::vec(any::<u8>(), 0..70_000),
                                      cut in 0usize..70_000) {
            let cut = cut.min(data.len());
            prop_assert_eq!(crc32c(&data), crc32c::crc32c(&data));
            let (a, b) = data.split_at(cut);
            prop_assert_eq!(crc32c_append(crc32c(a), b), crc32c::crc32c(&data));
            prop_assert_eq!(crc32c_append(crc32c::crc32c(a), b), crc32c::crc32c_append(crc32c::crc32c(a), b));
        }
    }
}
