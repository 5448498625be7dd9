//! Post-copy bookkeeping with no I/O: the pages the destination's process
//! still lacks ([`LazySet`]) and the fault latency figures reported at the
//! end ([`latency_summary`]). The page server's post-copy loop and the
//! source's `PostCopy` message both go through here, so what counts as a
//! valid set of ranges, and when the last page is in, is decided once and
//! tested without a process.

use std::collections::BTreeMap;

use crate::pb;

/// Most ranges one `PostCopy` may name (a scattered 64 GiB dirty set
/// stays far below).
pub const MAX_LAZY_RANGES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LazyError {
    #[error("post-copy range {start:#x}-{end:#x} is empty or not page aligned")]
    Unaligned { start: u64, end: u64 },
    #[error("post-copy range {start:#x}-{end:#x} is out of order or overlaps the one before")]
    Order { start: u64, end: u64 },
    #[error("post-copy names {got} ranges, more than the limit of {MAX_LAZY_RANGES}")]
    TooMany { got: usize },
}

/// Page-aligned address ranges still missing, disjoint; adjacent ranges are
/// kept apart as given (merging would change nothing but the count).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazySet {
    page_size: u64,
    /// start → end.
    ranges: BTreeMap<u64, u64>,
    pages: u64,
}

impl LazySet {
    /// Checks `ranges` (page aligned, non-empty, sorted, disjoint, at most
    /// [`MAX_LAZY_RANGES`]) and takes them all as missing.
    pub fn new(ranges: &[pb::LazyRange], page_size: u32) -> Result<LazySet, LazyError> {
        if ranges.len() > MAX_LAZY_RANGES {
            return Err(LazyError::TooMany { got: ranges.len() });
        }
        let ps = u64::from(page_size.max(1));
        let mut set = LazySet {
            page_size: ps,
            ..Default::default()
        };
        let mut last_end = 0u64;
        for r in ranges {
            if r.start >= r.end || r.start % ps != 0 || r.end % ps != 0 {
                return Err(LazyError::Unaligned {
                    start: r.start,
                    end: r.end,
                });
            }
            if r.start < last_end {
                return Err(LazyError::Order {
                    start: r.start,
                    end: r.end,
                });
            }
            last_end = r.end;
            set.ranges.insert(r.start, r.end);
            set.pages += (r.end - r.start) / ps;
        }
        Ok(set)
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Pages still missing.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The missing ranges, in address order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    /// Whether the page holding `addr` is still missing.
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges
            .range(..=addr)
            .next_back()
            .is_some_and(|(_, &e)| addr < e)
    }

    /// Marks `[start, end)` as arrived (or no longer wanted); returns how
    /// many missing pages that covered.
    pub fn remove(&mut self, start: u64, end: u64) -> u64 {
        let ps = self.page_size;
        let (start, end) = (start - start % ps, end.div_ceil(ps) * ps);
        if start >= end {
            return 0;
        }
        let hit: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let mut removed = 0;
        for (s, e) in hit {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, start);
            }
            if e > end {
                self.ranges.insert(end, e);
            }
            removed += (e.min(end) - s.max(start)) / ps;
        }
        self.pages -= removed;
        removed
    }
}

/// Median, 99th percentile and maximum of `samples` (any order); zeros for
/// none. Nearest-rank percentiles: every figure is a real sample.
pub fn latency_summary(mut samples: Vec<u64>) -> (u64, u64, u64) {
    if samples.is_empty() {
        return (0, 0, 0);
    }
    samples.sort_unstable();
    let rank = |p: usize| {
        let r = (samples.len() * p).div_ceil(100).max(1);
        samples[r - 1]
    };
    (rank(50), rank(99), samples[samples.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> pb::LazyRange {
        pb::LazyRange { start, end }
    }

    #[test]
    fn ranges_are_checked() {
        assert!(LazySet::new(&[r(0x1000, 0x3000), r(0x3000, 0x4000)], 4096).is_ok());
        assert_eq!(
            LazySet::new(&[r(0x1000, 0x1800)], 4096),
            Err(LazyError::Unaligned {
                start: 0x1000,
                end: 0x1800
            })
        );
        assert!(matches!(
            LazySet::new(&[r(0x2000, 0x2000)], 4096),
            Err(LazyError::Unaligned { .. })
        ));
        assert_eq!(
            LazySet::new(&[r(0x4000, 0x6000), r(0x5000, 0x7000)], 4096),
            Err(LazyError::Order {
                start: 0x5000,
                end: 0x7000
            })
        );
    }

    #[test]
    fn removing_splits_and_counts() {
        let mut s = LazySet::new(&[r(0x1000, 0x5000), r(0x8000, 0xa000)], 4096).unwrap();
        assert_eq!(s.pages(), 6);
        assert!(s.contains(0x1fff) && !s.contains(0x5000) && !s.contains(0));
        assert_eq!(s.remove(0x2000, 0x3000), 1);
        assert!(!s.contains(0x2000) && s.contains(0x3000));
        // Unaligned ends widen to whole pages; already-gone pages count 0.
        assert_eq!(s.remove(0x2800, 0x3001), 1);
        assert_eq!(s.remove(0x2000, 0x3000), 0);
        // One call across two ranges and the hole between.
        assert_eq!(s.remove(0x4000, 0x9000), 2);
        assert_eq!(
            s.ranges().collect::<Vec<_>>(),
            vec![(0x1000, 0x2000), (0x9000, 0xa000)]
        );
        assert_eq!(s.remove(0, u64::MAX - 4095), 2);
        assert!(s.is_empty());
    }

    #[test]
    fn latency_figures_are_samples() {
        assert_eq!(latency_summary(vec![]), (0, 0, 0));
        assert_eq!(latency_summary(vec![7]), (7, 7, 7));
        let v: Vec<u64> = (1..=200).rev().collect();
        assert_eq!(latency_summary(v), (100, 198, 200));
    }
}
