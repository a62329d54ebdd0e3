//! The part plan: how a file is cut into parts within a store's multipart
//! limits, and how the parts' CRC32Cs make the whole file's.

use crate::chunk::MIB;
use crate::error::Class;

/// Limits of a store's multipart upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLimits {
    pub min_part_bytes: u64,
    pub max_part_bytes: u64,
    pub max_parts: u64,
}

impl PartLimits {
    /// S3 and OCI Object Storage: 5 MiB .. 5 GiB, 10,000 parts.
    pub const S3: PartLimits = PartLimits {
        min_part_bytes: 5 * MIB,
        max_part_bytes: 5 * 1024 * MIB,
        max_parts: 10_000,
    };

    /// The largest file these limits can carry.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_part_bytes.saturating_mul(self.max_parts)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "file of {file_bytes} bytes is larger than the {max_bytes} bytes a multipart upload can hold (10,000 parts of at most 5 GiB)"
    )]
    TooLarge { file_bytes: u64, max_bytes: u64 },
}

impl PlanError {
    /// [`Class::Refuse`]: no part size the stores take can carry this file.
    pub fn class(&self) -> Class {
        Class::Refuse
    }
}

/// How a file is cut into parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPlan {
    pub file_bytes: u64,
    pub part_bytes: u64,
    pub count: u32,
}

impl PartPlan {
    /// The requested part size, raised to fit `max_parts`, kept within the limits and
    /// rounded up to a whole MiB (so mmap offsets stay page aligned).
    pub fn new(
        file_bytes: u64,
        requested_part_bytes: u64,
        limits: PartLimits,
    ) -> Result<PartPlan, PlanError> {
        if file_bytes > limits.max_file_bytes() {
            return Err(PlanError::TooLarge {
                file_bytes,
                max_bytes: limits.max_file_bytes(),
            });
        }
        let mut part = requested_part_bytes.clamp(limits.min_part_bytes, limits.max_part_bytes);
        let needed = file_bytes.div_ceil(limits.max_parts);
        if part < needed {
            part = needed;
        }
        part = part.div_ceil(MIB) * MIB;
        if part > limits.max_part_bytes {
            part = limits.max_part_bytes;
        }
        let count = file_bytes.div_ceil(part).max(1);
        Ok(PartPlan {
            file_bytes,
            part_bytes: part,
            count: u32::try_from(count).expect("count <= max_parts fits u32"),
        })
    }

    pub fn offset(&self, index: u32) -> u64 {
        u64::from(index) * self.part_bytes
    }

    pub fn len(&self, index: u32) -> u64 {
        let start = self.offset(index);
        self.part_bytes.min(self.file_bytes.saturating_sub(start))
    }

    pub fn is_empty(&self) -> bool {
        self.file_bytes == 0
    }
}

/// Combines per-part CRCs, in order, into the CRC32C of the whole.
pub fn combine(parts: impl IntoIterator<Item = (u32, u64)>) -> u32 {
    let mut crc = 0u32;
    for (part_crc, len) in parts {
        crc = crc32c::crc32c_combine(crc, part_crc, len as usize);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TIB: u64 = 1024 * 1024 * MIB;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn plan_fits_the_limits(file in 0u64..=50 * TIB, requested in 1u64..=8 * 1024 * MIB) {
            let limits = PartLimits::S3;
            match PartPlan::new(file, requested, limits) {
                Err(PlanError::TooLarge { .. }) => prop_assert!(file > limits.max_file_bytes()),
                Ok(plan) => {
                    prop_assert!(file <= limits.max_file_bytes());
                    prop_assert!(u64::from(plan.count) <= limits.max_parts);
                    prop_assert!(plan.part_bytes >= limits.min_part_bytes);
                    prop_assert!(plan.part_bytes <= limits.max_part_bytes);
                    // covers the file exactly
                    prop_assert!(u64::from(plan.count) * plan.part_bytes >= file);
                    if file > 0 {
                        prop_assert!(u64::from(plan.count - 1) * plan.part_bytes < file);
                    }
                    let last = plan.count - 1;
                    prop_assert_eq!(plan.offset(last) + plan.len(last), file);
                    // never below what was asked, unless the limits say so
                    prop_assert!(plan.part_bytes >= requested.min(limits.max_part_bytes));
                }
            }
        }

        #[test]
        fn combined_crc_equals_whole_crc(data in proptest::collection::vec(any::<u8>(), 0..4096), cuts in proptest::collection::vec(0usize..4096, 0..8)) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort();
            let pieces = cuts.windows(2).map(|w| {
                let s = &data[w[0]..w[1]];
                (crc32c::crc32c(s), s.len() as u64)
            });
            prop_assert_eq!(combine(pieces), crc32c::crc32c(&data));
        }
    }

    #[test]
    fn the_config_checks_part_sizes_against_the_same_limits() {
        assert_eq!(crate::config::MIN_PART_BYTES, PartLimits::S3.min_part_bytes);
        assert_eq!(crate::config::MAX_PART_BYTES, PartLimits::S3.max_part_bytes);
    }

    #[test]
    fn small_part_size_is_raised_to_the_minimum() {
        let p = PartPlan::new(100 * MIB, 1, PartLimits::S3).unwrap();
        assert_eq!(p.part_bytes, 5 * MIB);
        assert_eq!(p.count, 20);
    }
}
