//! Mapping lists as sets of address ranges: validation of a layer's VMAs and
//! the "is this run inside the layer's mappings" check the receiver makes
//! for every run of every batch.

use crate::pb;

/// More mappings than Linux allows a process by default (`vm.max_map_count`
/// is 65530), with room for raised limits.
pub const MAX_VMAS: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmaError {
    #[error("{count} mappings exceed the limit of {MAX_VMAS}")]
    TooMany { count: usize },
    #[error("mapping {start:#x}-{end:#x} is empty, reversed or not page aligned")]
    BadRange { start: u64, end: u64 },
    #[error("mappings {a_start:#x}-{a_end:#x} and {b_start:#x}-{b_end:#x} overlap")]
    Overlap {
        a_start: u64,
        a_end: u64,
        b_start: u64,
        b_end: u64,
    },
}

/// Sorted, non-overlapping `[start, end)` ranges, adjacent ones merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// Validates a layer's mapping list and builds its range set.
    pub fn from_vmas(vmas: &[pb::Vma], page_size: u32) -> Result<Self, VmaError> {
        if vmas.len() > MAX_VMAS {
            return Err(VmaError::TooMany { count: vmas.len() });
        }
        let mask = page_size as u64 - 1;
        let mut r: Vec<(u64, u64)> = Vec::with_capacity(vmas.len());
        for v in vmas {
            if v.start >= v.end || v.start & mask != 0 || v.end & mask != 0 {
                return Err(VmaError::BadRange {
                    start: v.start,
                    end: v.end,
                });
            }
            r.push((v.start, v.end));
        }
        r.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(r.len());
        for (s, e) in r {
            match merged.last_mut() {
                Some(last) if s < last.1 => {
                    return Err(VmaError::Overlap {
                        a_start: last.0,
                        a_end: last.1,
                        b_start: s,
                        b_end: e,
                    })
                }
                Some(last) if s == last.1 => last.1 = e,
                _ => merged.push((s, e)),
            }
        }
        Ok(Self { ranges: merged })
    }

    /// True if `[start, end)` lies entirely inside the set.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        let i = self.ranges.partition_point(|&(_, e)| e <= start);
        matches!(self.ranges.get(i), Some(&(s, e)) if s <= start && end <= e)
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Bytes covered.
    pub fn len_bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(start: u64, end: u64) -> pb::Vma {
        pb::Vma {
            start,
            end,
            ..Default::default()
        }
    }

    #[test]
    fn adjacent_mappings_merge_and_contain_spanning_runs() {
        let s = RangeSet::from_vmas(&[vma(0x3000, 0x5000), vma(0x1000, 0x3000)], 4096).unwrap();
        assert_eq!(s.ranges(), &[(0x1000, 0x5000)]);
        assert!(s.contains(0x2000, 0x4000));
        assert!(!s.contains(0x0, 0x2000));
        assert!(!s.contains(0x4000, 0x6000));
        assert!(!s.contains(0x2000, 0x2000));
    }

    #[test]
    fn gaps_are_not_contained() {
        let s = RangeSet::from_vmas(&[vma(0x1000, 0x2000), vma(0x3000, 0x4000)], 4096).unwrap();
        assert!(s.contains(0x1000, 0x2000));
        assert!(s.contains(0x3000, 0x4000));
        assert!(!s.contains(0x1000, 0x4000));
        assert!(!s.contains(0x2000, 0x3000));
        assert_eq!(s.len_bytes(), 0x2000);
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(matches!(
            RangeSet::from_vmas(&[vma(0x1000, 0x1000)], 4096),
            Err(VmaError::BadRange { .. })
        ));
        assert!(matches!(
            RangeSet::from_vmas(&[vma(0x1001, 0x2000)], 4096),
            Err(VmaError::BadRange { .. })
        ));
        assert!(matches!(
            RangeSet::from_vmas(&[vma(0x1000, 0x3000), vma(0x2000, 0x4000)], 4096),
            Err(VmaError::Overlap { .. })
        ));
    }
}
