//! `/proc/PID/pagemap`: the `PAGEMAP_SCAN` ioctl, classic per-page entries,
//! and the soft-dirty probe.
//!
//! `PAGEMAP_SCAN` (Linux 6.7) walks a range of another process's page tables
//! and returns runs of pages by category (present, swapped, file-backed,
//! written since write-protected, ...); with `PM_SCAN_WP_MATCHING` it also
//! write-protects what it reports, which is how [`super::uffd`] gets the
//! written pages of a round and re-arms them in one step. The struct layouts
//! and constants are defined here from the 6.18 uapi: Debian's headers are
//! older than the kernel.
//!
//! Traps handled here (DESIGN.md §8):
//! - `end` must not exceed [`USER_ADDR_END`]; `[vsyscall]` lies above it.
//!   Ranges are clamped, so a scan of `[vsyscall]` reports nothing.
//! - When the output vector fills, the kernel stops early with
//!   `walk_end < end`; [`Pagemap::scan`] continues from `walk_end` until the
//!   range is done, reusing one buffer. Measured here: after an internal
//!   flush the kernel may also return a `walk_end` *behind* regions it
//!   already reported, so the continuation re-reports them; runs already
//!   returned by the same walk are dropped.
//! - With `PM_SCAN_CHECK_WPASYNC`, a range that reaches a mapping without
//!   async write-protect fails with `EPERM` *after* re-protecting the pages
//!   walked before it. Those pages are written to the output vector before
//!   the error; [`Pagemap::scan`] recovers them (the buffer is zeroed before
//!   such a call, and a real region never has `start == end`) and appends
//!   them to `out` before returning [`PagemapError::NotWpAsync`], so they are
//!   not lost.
//! - Soft-dirty can be compiled out (`CONFIG_MEM_SOFT_DIRTY`) and then fails
//!   silently: `clear_refs` accepts `4` and bit 55 stays 0.
//!   [`soft_dirty_works`] tests the real behaviour instead of trusting it.

use std::fs::File;
use std::hint::black_box;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use nix::errno::Errno;

use super::{iowr, page_size, USER_ADDR_END};

/// The page may be write-protected asynchronously (registered with a
/// `UFFD_FEATURE_WP_ASYNC` userfaultfd in WP mode). A property of the VMA.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// Written since it was last write-protected (or never write-protected).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Backed by a file page (or shmem): not a private anonymous copy.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// In memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Swapped out.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Mapped to the shared zero page: present, but reads as zeros.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// Part of a transparent or hugetlb huge page.
pub const PAGE_IS_HUGE: u64 = 1 << 6;
/// Soft-dirty (always clear without `CONFIG_MEM_SOFT_DIRTY`).
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;
/// A guard region (`MADV_GUARD_INSTALL`).
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// Write-protect the pages that match.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with `EPERM` on a mapping without async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Classic pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
pub const PME_SOFT_DIRTY: u64 = 1 << 55;
/// The page is exclusively mapped.
pub const PME_EXCLUSIVE: u64 = 1 << 56;
/// The pte is uffd write-protected.
pub const PME_UFFD_WP: u64 = 1 << 57;
/// File page or shared anonymous page.
pub const PME_FILE: u64 = 1 << 61;
/// Swapped out.
pub const PME_SWAP: u64 = 1 << 62;
/// Present in memory.
pub const PME_PRESENT: u64 = 1 << 63;
/// The page frame number, or for a swap entry its type (bits 0-4) and
/// offset; zero unless the reader has `CAP_SYS_ADMIN`.
pub const PME_FRAME_MASK: u64 = (1 << 55) - 1;
/// Swap type of pte markers (uffd-wp, guard): the last of the 32 types
/// (`MAX_SWAPFILES_SHIFT` = 5), whatever the kernel configuration.
pub const SWP_PTE_MARKER: u64 = 31;

/// Whether a classic entry is a pte marker rather than swapped-out data.
pub fn is_pte_marker(entry: u64) -> bool {
    entry & PME_SWAP != 0
        && entry & PME_PRESENT == 0
        && entry & PME_FRAME_MASK & 0x1f == SWP_PTE_MARKER
}

/// One run of pages `[start, end)` sharing the categories selected by the
/// scan's `return_mask`. Same layout as the kernel's `struct page_region`,
/// so the kernel writes these directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg` of `linux/fs.h` (96 bytes).
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const PAGEMAP_SCAN: u64 = iowr::<PmScanArg>(b'f', 16);

/// Regions per `PAGEMAP_SCAN` call (24 bytes each). The kernel bounces
/// through a smaller buffer anyway; this only bounds the number of calls.
const SCAN_VEC_LEN: usize = 8192;

/// Pagemap entries read per `pread` (512 KiB).
const ENTRIES_PER_READ: usize = 64 * 1024;

/// Errors of the pagemap interfaces.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// The process does not exist (any more).
    #[error("no process {0}")]
    NoProcess(i32),
    /// `/proc/PID/pagemap` could not be opened (permission, mostly).
    #[error("opening /proc/{pid}/pagemap: {source}")]
    Open {
        pid: i32,
        #[source]
        source: io::Error,
    },
    /// Scan ranges must start and end on page boundaries.
    #[error("range {start:#x}-{end:#x} is not page aligned")]
    Unaligned { start: u64, end: u64 },
    /// The ioctl failed.
    #[error("PAGEMAP_SCAN of {start:#x}-{end:#x} in process {pid}: {errno}")]
    Scan {
        pid: i32,
        start: u64,
        end: u64,
        errno: Errno,
    },
    /// With `PM_SCAN_CHECK_WPASYNC`, the walk of `[start, end)` reached a
    /// mapping that is not registered for async write-protect. The pages
    /// reported (and re-protected) before that point are in the output.
    #[error(
        "PAGEMAP_SCAN of {start:#x}-{end:#x} in process {pid} reached a mapping \
         without async write-protect; the pages reported before it were kept"
    )]
    NotWpAsync { pid: i32, start: u64, end: u64 },
    /// The kernel returned `walk_end` without progress: a kernel behaviour
    /// this code does not know, reported instead of looping.
    #[error("PAGEMAP_SCAN of {start:#x}-{end:#x} made no progress (walk_end {walk_end:#x})")]
    Stalled { start: u64, end: u64, walk_end: u64 },
    /// Reading classic entries failed.
    #[error("reading pagemap entries of {start:#x}-{end:#x} of process {pid}: {source}")]
    Read {
        pid: i32,
        start: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    /// Writing `/proc/PID/clear_refs` failed.
    #[error("writing /proc/{pid}/clear_refs: {source}")]
    ClearRefs {
        pid: i32,
        #[source]
        source: io::Error,
    },
}

/// An open `/proc/PID/pagemap` with a reusable scan buffer.
pub struct Pagemap {
    pid: i32,
    file: File,
    /// Kernel output vector, allocated on first scan.
    vec: Vec<Region>,
    /// Scratch for [`Pagemap::present`] and its marker check.
    tmp: Vec<Region>,
    entries: Vec<u64>,
}

impl Pagemap {
    /// Opens `/proc/PID/pagemap` (needs ptrace read access to `pid`).
    pub fn open(pid: i32) -> Result<Pagemap, PagemapError> {
        let file = File::open(format!("/proc/{pid}/pagemap")).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                PagemapError::NoProcess(pid)
            } else {
                PagemapError::Open { pid, source }
            }
        })?;
        Ok(Pagemap {
            pid,
            file,
            vec: Vec::new(),
            tmp: Vec::new(),
            entries: Vec::new(),
        })
    }

    /// The process this pagemap belongs to.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// One `PAGEMAP_SCAN` walk of `[start, end)`, continued from `walk_end`
    /// until the range is done; the regions are appended to `out` in address
    /// order. `end` is clamped to [`USER_ADDR_END`].
    ///
    /// A page matches when `(categories ^ category_inverted)` has every bit
    /// of `category_mask` and, if `category_anyof_mask` is not zero, one of
    /// its bits; `return_mask` selects the categories reported (and adjacent
    /// pages with the same reported categories merge into one region).
    ///
    /// On [`PagemapError::NotWpAsync`] the regions found before the offending
    /// mapping have still been appended to `out`: with
    /// `PM_SCAN_WP_MATCHING` they are already re-protected, so keep them.
    #[allow(clippy::too_many_arguments)] // mirrors the kernel's pm_scan_arg
    pub fn scan(
        &mut self,
        start: u64,
        end: u64,
        flags: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        category_inverted: u64,
        return_mask: u64,
        out: &mut Vec<Region>,
    ) -> Result<(), PagemapError> {
        let ps = page_size();
        if start % ps != 0 || end % ps != 0 {
            return Err(PagemapError::Unaligned { start, end });
        }
        let end = end.min(USER_ADDR_END);
        if start >= end {
            return Ok(());
        }
        if self.vec.len() != SCAN_VEC_LEN {
            self.vec = vec![Region::default(); SCAN_VEC_LEN];
        }
        // Only a failing CHECK_WPASYNC scan needs the zeroed buffer to find
        // where the partial output ends.
        let recover = flags & PM_SCAN_CHECK_WPASYNC != 0;
        let mut from = start;
        // What this walk has reported so far (sorted, disjoint): a
        // continuation may report it again, and only that is dropped.
        let mut reported: Vec<(u64, u64)> = Vec::new();
        let first_out = out.len();
        while from < end {
            if recover {
                self.vec.fill(Region::default());
            }
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start: from,
                end,
                walk_end: 0,
                vec: self.vec.as_mut_ptr() as u64,
                vec_len: self.vec.len() as u64,
                max_pages: 0,
                category_inverted,
                category_mask,
                category_anyof_mask,
                return_mask,
            };
            // SAFETY: `arg` is a `struct pm_scan_arg` with its size field
            // set; `vec`/`vec_len` describe `self.vec`, which is live and
            // not otherwise borrowed during the call, and the kernel writes
            // at most `vec_len` regions of the matching layout into it.
            let r = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    PAGEMAP_SCAN as libc::Ioctl,
                    &mut arg as *mut PmScanArg,
                )
            };
            if r < 0 {
                let errno = Errno::last();
                return Err(match errno {
                    Errno::EPERM if recover => {
                        let n = self.vec.iter().take_while(|r| r.end > r.start).count();
                        for reg in &self.vec[..n] {
                            for (s, e) in unreported(&reported, reg.start, reg.end) {
                                out.push(Region {
                                    start: s,
                                    end: e,
                                    ..*reg
                                });
                            }
                        }
                        out[first_out..].sort_unstable_by_key(|r| r.start);
                        PagemapError::NotWpAsync {
                            pid: self.pid,
                            start: from,
                            end,
                        }
                    }
                    Errno::ESRCH => PagemapError::NoProcess(self.pid),
                    errno => PagemapError::Scan {
                        pid: self.pid,
                        start: from,
                        end,
                        errno,
                    },
                });
            }
            let n = (r as usize).min(self.vec.len());
            // A continuation may report again what an earlier call of this
            // walk did: the kernel can leave `walk_end` behind regions it
            // already returned (6.18 does, after an internal buffer flush).
            // Only those pages are dropped. A page in that stretch that the
            // earlier call did *not* report (clean then, written since) is
            // new, and with PM_SCAN_WP_MATCHING the kernel has just
            // protected it again: dropping it would lose the write for good.
            for reg in &self.vec[..n] {
                for (s, e) in unreported(&reported, reg.start, reg.end) {
                    out.push(Region {
                        start: s,
                        end: e,
                        ..*reg
                    });
                }
                cover(&mut reported, reg.start, reg.end);
            }
            if arg.walk_end >= end {
                break;
            }
            if arg.walk_end <= from {
                return Err(PagemapError::Stalled {
                    start: from,
                    end,
                    walk_end: arg.walk_end,
                });
            }
            from = arg.walk_end;
        }
        // Continuations can report out of order; callers merge sorted runs.
        out[first_out..].sort_unstable_by_key(|r| r.start);
        Ok(())
    }

    /// Pages with content in `[start, end)`: present or swapped, excluding
    /// pages mapped to the zero page (they read as zeros, like a hole) and
    /// pte markers (below). With `anon_only`, pages still backed by their
    /// file (`PAGE_IS_FILE`) are excluded too: the destination gets those
    /// from the file. Runs are appended to `out` as `[s, e)`, merged where
    /// adjacent. Nothing is write-protected.
    ///
    /// `PAGEMAP_SCAN` files pte markers under `PAGE_IS_SWAPPED`: the uffd-wp
    /// marker that arming puts on every never-touched page of a registered
    /// range, and guard markers. They hold no data, and reading them would
    /// fault in zero pages across all the untouched memory, so swapped runs
    /// are checked against the classic entries, where a marker has swap type
    /// [`SWP_PTE_MARKER`]. The type is only visible with `CAP_SYS_ADMIN`;
    /// without it markers count as content (a superset: correct, slower).
    pub fn present(
        &mut self,
        start: u64,
        end: u64,
        anon_only: bool,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<(), PagemapError> {
        let exclude = PAGE_IS_PFNZERO | if anon_only { PAGE_IS_FILE } else { 0 };
        let mut tmp = std::mem::take(&mut self.tmp);
        tmp.clear();
        let r = self.scan(
            start,
            end,
            0,
            exclude,
            PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            exclude,
            PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            &mut tmp,
        );
        let r = r.and_then(|()| self.drop_markers(&mut tmp));
        append_merged(out, &tmp);
        self.tmp = tmp;
        r
    }

    /// Removes the pages of pte markers from the swapped runs of `regions`.
    fn drop_markers(&mut self, regions: &mut Vec<Region>) -> Result<(), PagemapError> {
        if !regions.iter().any(|r| r.categories & PAGE_IS_SWAPPED != 0) {
            return Ok(());
        }
        let ps = page_size();
        let mut entries = std::mem::take(&mut self.entries);
        let mut kept = Vec::with_capacity(regions.len());
        let mut result = Ok(());
        for r in regions.iter() {
            if r.categories & PAGE_IS_SWAPPED == 0 {
                kept.push(*r);
                continue;
            }
            entries.clear();
            if let Err(e) = self.entries(r.start, r.end, &mut entries) {
                result = Err(e);
                break;
            }
            let mut run: Option<Region> = None;
            for (i, &e) in entries.iter().enumerate() {
                let addr = r.start + i as u64 * ps;
                if is_pte_marker(e) {
                    kept.extend(run.take());
                    continue;
                }
                match run.as_mut() {
                    Some(cur) => cur.end = addr + ps,
                    None => {
                        run = Some(Region {
                            start: addr,
                            end: addr + ps,
                            categories: r.categories,
                        })
                    }
                }
            }
            kept.extend(run);
        }
        self.entries = entries;
        *regions = kept;
        result
    }

    /// Classic pagemap entries (one `u64` per page) for `[start, end)`,
    /// appended to `out`: bit 55 soft-dirty, 61 file/shared, 62 swapped,
    /// 63 present (see the `PME_*` constants). Pages at or above
    /// [`USER_ADDR_END`] read as 0.
    pub fn entries(
        &mut self,
        start: u64,
        end: u64,
        out: &mut Vec<u64>,
    ) -> Result<(), PagemapError> {
        let ps = page_size();
        if start % ps != 0 || end % ps != 0 {
            return Err(PagemapError::Unaligned { start, end });
        }
        if start >= end {
            return Ok(());
        }
        let user_end = end.min(USER_ADDR_END).max(start);
        let mut bytes = vec![0u8; ENTRIES_PER_READ.min(((user_end - start) / ps) as usize) * 8];
        let mut page = start / ps;
        while page < user_end / ps {
            let n = (ENTRIES_PER_READ as u64).min(user_end / ps - page) as usize;
            let chunk = &mut bytes[..n * 8];
            self.file.read_exact_at(chunk, page * 8).map_err(|source| {
                if source.kind() == io::ErrorKind::UnexpectedEof
                    || source.raw_os_error() == Some(libc::ESRCH)
                {
                    PagemapError::NoProcess(self.pid)
                } else {
                    PagemapError::Read {
                        pid: self.pid,
                        start,
                        end,
                        source,
                    }
                }
            })?;
            out.extend(
                chunk
                    .chunks_exact(8)
                    .map(|b| u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
            );
            page += n as u64;
        }
        out.extend(std::iter::repeat_n(0, ((end - user_end) / ps) as usize));
        Ok(())
    }
}

/// Appends the regions to `out` as ranges, merging runs that touch (the
/// kernel splits runs where the reported categories differ and at the
/// boundaries of continuation calls). Only ranges appended by this call are
/// merged, so the caller's own entries keep their shape.
pub(crate) fn append_merged(out: &mut Vec<(u64, u64)>, regions: &[Region]) {
    let first_new = out.len();
    for r in regions {
        let merge = out.len() > first_new;
        match out.last_mut() {
            Some(last) if merge && last.1 == r.start => last.1 = r.end,
            _ => out.push((r.start, r.end)),
        }
    }
}

/// Whether soft-dirty tracking really works on this kernel. Without
/// `CONFIG_MEM_SOFT_DIRTY` the interface is there and silent, so this writes
/// a page of our own process, clears the bits (`clear_refs` 4 on
/// `/proc/self`), writes it again and reads bit 55 back. Probed once.
pub fn soft_dirty_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| match probe_soft_dirty() {
        Ok(works) => works,
        Err(e) => {
            tracing::debug!("soft-dirty probe failed: {e}");
            false
        }
    })
}

fn probe_soft_dirty() -> io::Result<bool> {
    let ps = page_size() as usize;
    let mut mem = vec![0u8; 2 * ps];
    let off = mem.as_ptr().align_offset(ps);
    let page = &mut mem[off..off + ps];
    // black_box keeps the stores: they are observed only through pagemap.
    page[0] = 1;
    black_box(&mut *page);
    std::fs::write("/proc/self/clear_refs", "4")?;
    page[0] = 2;
    black_box(&mut *page);
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, page.as_ptr() as u64 / ps as u64 * 8)?;
    Ok(u64::from_ne_bytes(entry) & PME_SOFT_DIRTY != 0)
}

/// Clears the soft-dirty bits of every page of `pid` (writes `4` to
/// `/proc/PID/clear_refs`), starting a new soft-dirty round.
pub fn clear_soft_dirty(pid: i32) -> Result<(), PagemapError> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "4").map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
            PagemapError::NoProcess(pid)
        } else {
            PagemapError::ClearRefs { pid, source }
        }
    })
}

/// The parts of `[start, end)` not covered by `done` (sorted, disjoint).
fn unreported(done: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    let first = done.partition_point(|&(_, e)| e <= start);
    for &(s, e) in &done[first..] {
        if s >= end {
            break;
        }
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
        if at >= end {
            break;
        }
    }
    if at < end {
        out.push((at, end));
    }
    out
}

/// Adds `[start, end)` to `done`, keeping it sorted and disjoint.
fn cover(done: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    if start >= end {
        return;
    }
    let i = done.partition_point(|&(_, e)| e < start);
    let mut j = i;
    let (mut s, mut e) = (start, end);
    while j < done.len() && done[j].0 <= e {
        s = s.min(done[j].0);
        e = e.max(done[j].1);
        j += 1;
    }
    done.splice(i..j, [(s, e)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continuation_drops_only_what_was_reported() {
        let mut done = Vec::new();
        cover(&mut done, 0x1000, 0x2000);
        cover(&mut done, 0x5000, 0x6000);
        // Re-reported pages go, the clean-then-written gap between them stays.
        assert_eq!(unreported(&done, 0x1000, 0x6000), vec![(0x2000, 0x5000)]);
        assert_eq!(unreported(&done, 0x3000, 0x4000), vec![(0x3000, 0x4000)]);
        assert_eq!(unreported(&done, 0x1800, 0x5800), vec![(0x2000, 0x5000)]);
        assert!(unreported(&done, 0x1000, 0x2000).is_empty());
        assert_eq!(unreported(&done, 0x6000, 0x7000), vec![(0x6000, 0x7000)]);
        cover(&mut done, 0x2000, 0x5000);
        assert_eq!(done, vec![(0x1000, 0x6000)]);
        cover(&mut done, 0x8000, 0x9000);
        cover(&mut done, 0x7000, 0x8000);
        assert_eq!(done, vec![(0x1000, 0x6000), (0x7000, 0x9000)]);
    }

    #[test]
    fn layouts_match_the_uapi() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<Region>(), 24);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn merges_only_new_adjacent_runs() {
        let mut out = vec![(0, 0x1000)];
        let regs = [
            Region {
                start: 0x1000,
                end: 0x2000,
                categories: 8,
            },
            Region {
                start: 0x2000,
                end: 0x3000,
                categories: 16,
            },
            Region {
                start: 0x5000,
                end: 0x6000,
                categories: 8,
            },
        ];
        append_merged(&mut out, &regs);
        assert_eq!(out, vec![(0, 0x1000), (0x1000, 0x3000), (0x5000, 0x6000)]);
    }
}
