//! Dirty tracking: which pages each round must send.
//!
//! One trait, three backends, chosen by probing (`--track auto`):
//! - [`UffdWp`]: userfaultfd write-protect in async mode, read and re-armed
//!   atomically by `PAGEMAP_SCAN` (the only exact tracker on kernels without
//!   soft-dirty, and the default wherever it works);
//! - [`SoftDirty`]: the classic `clear_refs` + pagemap bit 55, used only
//!   after a probe shows the bit really moves (it is silently dead on
//!   kernels built without `CONFIG_MEM_SOFT_DIRTY`);
//! - [`Checksum`]: hash every page every round; works anywhere, costs a full
//!   read per round.
//!
//! The invariant for all three: a round reports every page written since
//! the previous round (a superset is allowed, a miss never is), and pages of
//! a round that failed to send go back into the dirty set ([`Tracker::put_back`]).
//!
//! What is sent at all: pages of private mappings that have content (present
//! or swapped); of private file mappings only the pages copied on write (the
//! rest comes from the file); shared file mappings never (their contents
//! live in the file); `[vdso]`-like mappings never. Shared anonymous memory
//! and memfd mappings live only in RAM, so they are sent like private
//! anonymous memory (a tree sends each object's pages once: see
//! [`crate::shmem`]).
//!
//! Mappings are followed from round to round by identity (range,
//! permissions, offset, file). One that appears, changes or is found no
//! longer registered is sent whole: its pages with content as data, and, for
//! anonymous memory after round 0, its holes as zero runs, so the
//! destination never lets pages of an older mapping at the same address show
//! through a new one.

use std::collections::{HashMap, HashSet};

use xxhash_rust::xxh3::xxh3_64;

use crate::procfs::{MapEntry, ProcError};
use crate::sys::pagemap::{self, Pagemap, PagemapError};
use crate::sys::ptrace::{PtraceError, Tracee};
use crate::sys::uffd::{UffdError, WriteProtect};
use crate::sys::vm::{self, VmError};

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("userfaultfd write-protect: {0}")]
    Uffd(#[from] UffdError),
    #[error("pagemap: {0}")]
    Pagemap(#[from] PagemapError),
    #[error("reading memory for checksums: {0}")]
    Read(#[from] VmError),
    #[error("{0}")]
    Proc(#[from] ProcError),
    #[error("{0}")]
    Ptrace(#[from] PtraceError),
    #[error(
        "soft-dirty tracking does not work on this kernel (CONFIG_MEM_SOFT_DIRTY is unset, \
         or a freshly written page did not show the soft-dirty bit); use --track uffd-wp or checksum"
    )]
    SoftDirtyUnavailable,
}

/// Which backend, as `--track` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    UffdWp,
    SoftDirty,
    Checksum,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::UffdWp => "uffd-wp",
            Backend::SoftDirty => "soft-dirty",
            Backend::Checksum => "checksum",
        }
    }

    pub fn parse(s: &str) -> Option<Option<Backend>> {
        match s {
            "auto" => Some(None),
            "uffd-wp" => Some(Some(Backend::UffdWp)),
            "soft-dirty" => Some(Some(Backend::SoftDirty)),
            "checksum" => Some(Some(Backend::Checksum)),
            _ => None,
        }
    }
}

/// What one round sends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Page ranges to read and send, ascending, merged.
    pub data: Vec<(u64, u64)>,
    /// Page ranges known to read as zero, sent as zero runs unread.
    pub zero: Vec<(u64, u64)>,
}

impl Delta {
    pub fn pages(&self, page_size: u64) -> u64 {
        let n = |v: &[(u64, u64)]| v.iter().map(|(s, e)| (e - s) / page_size).sum::<u64>();
        n(&self.data) + n(&self.zero)
    }
}

pub trait Tracker: Send {
    fn backend(&self) -> Backend;
    /// The pages to send this round, given the mappings as they are now.
    /// The first call returns every page with content.
    fn collect(&mut self, maps: &[MapEntry]) -> Result<Delta, TrackError>;
    /// Pages that were not sent after all: the next `collect` returns them.
    fn put_back(&mut self, delta: &Delta);
    /// The bytes actually sent for pages of the last `collect` (read after
    /// it, so they may be newer than what the tracker looked at).
    fn sent(&mut self, _ranges: &[(u64, bytes::Bytes)]) {}
}

/// Whether a mapping's pages are sent at all.
pub fn sendable(m: &MapEntry) -> bool {
    // A memfd's file exists only on the source: its pages travel.
    let lives_in_file = m.shared && m.is_file() && !m.is_memfd();
    m.read && !m.is_special() && !lives_in_file
}

/// Private file mappings send only their copied-on-write pages.
fn anon_only(m: &MapEntry) -> bool {
    m.is_file() && !m.shared
}

/// Identity of a mapping across rounds.
type MapKey = (u64, u64, bool, bool, bool, bool, u64, u64, Option<String>);

fn key(m: &MapEntry) -> MapKey {
    (
        m.start,
        m.end,
        m.read,
        m.write,
        m.exec,
        m.shared,
        m.offset,
        m.inode,
        m.path.clone(),
    )
}

/// Sorts and merges ranges in place.
pub fn normalize(v: &mut Vec<(u64, u64)>) {
    v.retain(|(s, e)| s < e);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for &(s, e) in v.iter() {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    *v = out;
}

/// `a` minus `b`, both sorted and merged.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut cur = s;
        while j < b.len() && b[j].1 <= cur {
            j += 1;
        }
        let mut k = j;
        while cur < e {
            match b.get(k) {
                Some(&(bs, be)) if bs < e => {
                    if bs > cur {
                        out.push((cur, bs));
                    }
                    cur = cur.max(be);
                    k += 1;
                }
                _ => {
                    out.push((cur, e));
                    break;
                }
            }
        }
    }
    out
}

/// `a` ∩ `b`, both sorted and merged.
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Normalizes a round's delta: data clipped to the live mappings, and a
/// page both written and known zero sent as data.
fn finish(mut delta: Delta, maps: &[MapEntry]) -> Delta {
    clip_to_maps(&mut delta.data, maps);
    normalize(&mut delta.zero);
    delta.zero = subtract(&delta.zero, &delta.data);
    delta
}

/// Queues a failed round's pages for the next round.
fn queue(pending: &mut Delta, d: &Delta) {
    pending.data.extend_from_slice(&d.data);
    pending.zero.extend_from_slice(&d.zero);
}

/// Keeps only the parts of the put-back pages still inside sendable
/// mappings: memory that was unmapped meanwhile has nothing left to send.
fn clip_to_maps(v: &mut Vec<(u64, u64)>, maps: &[MapEntry]) {
    let mut live: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| sendable(m))
        .map(|m| (m.start, m.end))
        .collect();
    normalize(&mut live);
    normalize(v);
    *v = intersect(v, &live);
}

// ------------------------------------------------------------------ uffd-wp

/// userfaultfd write-protect tracking (async mode, `PAGEMAP_SCAN`).
pub struct UffdWp {
    wp: WriteProtect,
    known: HashSet<MapKey>,
    /// Mappings the kernel would not register: sent whole every round.
    unregistrable: HashSet<MapKey>,
    first: bool,
    pending: Delta,
}

impl UffdWp {
    /// Arms tracking in the target (injects `userfaultfd` through `tracee`).
    pub fn arm(tracee: &Tracee) -> Result<Self, TrackError> {
        Ok(Self {
            wp: WriteProtect::arm(tracee)?,
            known: HashSet::new(),
            unregistrable: HashSet::new(),
            first: true,
            pending: Delta::default(),
        })
    }

    /// Sends `[start, end)` of `m` whole: registers it (tracking starts
    /// before the contents are read, so no write falls between), then its
    /// pages with content, and its holes as zero runs after round 0.
    fn send_whole(
        &mut self,
        m: &MapEntry,
        start: u64,
        end: u64,
        delta: &mut Delta,
    ) -> Result<(), TrackError> {
        match self.wp.register(start, end) {
            Ok(()) => {}
            Err(UffdError::Unregistrable { .. }) => {
                self.unregistrable.insert(key(m));
            }
            Err(e) => return Err(e.into()),
        }
        let mut present = Vec::new();
        self.wp
            .scan_present(start, end, anon_only(m), &mut present)?;
        normalize(&mut present);
        if !self.first && !m.is_file() {
            delta.zero.extend(subtract(&[(start, end)], &present));
        }
        delta.data.extend(present);
        Ok(())
    }
}

impl Tracker for UffdWp {
    fn backend(&self) -> Backend {
        Backend::UffdWp
    }

    fn collect(&mut self, maps: &[MapEntry]) -> Result<Delta, TrackError> {
        let mut delta = std::mem::take(&mut self.pending);
        let mut seen = HashSet::new();
        // Forget ranges that are gone, so a later scan never walks them.
        let mut live: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
        normalize(&mut live);
        let mut registered = self.wp.registered().to_vec();
        normalize(&mut registered);
        for (s, e) in subtract(&registered, &live) {
            self.wp.unregister(s, e);
        }
        for m in maps.iter().filter(|m| sendable(m)) {
            let k = key(m);
            seen.insert(k.clone());
            if self.first || !self.known.contains(&k) {
                self.send_whole(m, m.start, m.end, &mut delta)?;
                continue;
            }
            if self.unregistrable.contains(&k) {
                let mut present = Vec::new();
                self.wp
                    .scan_present(m.start, m.end, anon_only(m), &mut present)?;
                delta.data.extend(present);
                continue;
            }
            // A range that lost its registration was replaced by a new
            // mapping since the last round: scanning it would fail (and, on
            // a range mixing both, lose pages), so send it whole instead.
            let stale = self.wp.untracked(m.start, m.end)?;
            for &(s, e) in &stale {
                self.send_whole(m, s, e, &mut delta)?;
            }
            for (s, e) in subtract(&[(m.start, m.end)], &stale) {
                match self.wp.scan_written(s, e, &mut delta.data) {
                    Ok(()) => {}
                    // Replaced between the check above and the scan.
                    Err(UffdError::Stale { .. }) => self.send_whole(m, s, e, &mut delta)?,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.unregistrable.retain(|k| seen.contains(k));
        self.known = seen;
        self.first = false;
        Ok(finish(delta, maps))
    }

    fn put_back(&mut self, d: &Delta) {
        queue(&mut self.pending, d);
    }
}

// ------------------------------------------------------------------ soft-dirty

/// Soft-dirty tracking. Reading the bits and clearing them is not atomic,
/// so it runs with the target frozen (a write between the two would be
/// lost); that freeze is the price of this backend.
pub struct SoftDirty<'t> {
    tracee: &'t Tracee,
    pagemap: Pagemap,
    known: HashSet<MapKey>,
    first: bool,
    pending: Delta,
    entries: Vec<u64>,
}

const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_FILE: u64 = 1 << 61;
const PM_SWAP: u64 = 1 << 62;
const PM_PRESENT: u64 = 1 << 63;

impl<'t> SoftDirty<'t> {
    pub fn new(tracee: &'t Tracee) -> Result<Self, TrackError> {
        if !pagemap::soft_dirty_works() {
            return Err(TrackError::SoftDirtyUnavailable);
        }
        Ok(Self {
            tracee,
            pagemap: Pagemap::open(tracee.pid())?,
            known: HashSet::new(),
            first: true,
            pending: Delta::default(),
            entries: Vec::new(),
        })
    }
}

impl Tracker for SoftDirty<'_> {
    fn backend(&self) -> Backend {
        Backend::SoftDirty
    }

    fn collect(&mut self, maps: &[MapEntry]) -> Result<Delta, TrackError> {
        let mut delta = std::mem::take(&mut self.pending);
        let was_frozen = self.tracee.is_frozen();
        if !was_frozen {
            self.tracee.freeze()?;
        }
        let ps = page_size();
        let mut seen = HashSet::new();
        let result = (|| {
            for m in maps.iter().filter(|m| sendable(m)) {
                let k = key(m);
                let whole = self.first || !self.known.contains(&k);
                seen.insert(k);
                self.entries.clear();
                self.pagemap.entries(m.start, m.end, &mut self.entries)?;
                for (i, &e) in self.entries.iter().enumerate() {
                    let has = e & (PM_PRESENT | PM_SWAP) != 0;
                    let cow = !anon_only(m) || e & PM_FILE == 0;
                    let a = m.start + i as u64 * ps;
                    if has && cow && (whole || e & PM_SOFT_DIRTY != 0) {
                        delta.data.push((a, a + ps));
                    } else if whole && !self.first && !m.is_file() && !has {
                        delta.zero.push((a, a + ps));
                    }
                }
            }
            pagemap::clear_soft_dirty(self.tracee.pid())?;
            Ok::<_, TrackError>(())
        })();
        if !was_frozen {
            let _ = self.tracee.thaw();
        }
        result?;
        self.known = seen;
        self.first = false;
        Ok(finish(delta, maps))
    }

    fn put_back(&mut self, d: &Delta) {
        queue(&mut self.pending, d);
    }
}

// ------------------------------------------------------------------ checksum

/// Hashes every page with content each round and reports the changed ones.
pub struct Checksum {
    pid: i32,
    pagemap: Pagemap,
    hashes: HashMap<u64, u64>,
    known: HashSet<MapKey>,
    first: bool,
    pending: Delta,
    buf: Vec<u8>,
}

impl Checksum {
    pub fn new(pid: i32) -> Result<Self, TrackError> {
        Ok(Self {
            pid,
            pagemap: Pagemap::open(pid)?,
            hashes: HashMap::new(),
            known: HashSet::new(),
            first: true,
            pending: Delta::default(),
            buf: Vec::new(),
        })
    }
}

impl Tracker for Checksum {
    fn backend(&self) -> Backend {
        Backend::Checksum
    }

    fn collect(&mut self, maps: &[MapEntry]) -> Result<Delta, TrackError> {
        let mut delta = std::mem::take(&mut self.pending);
        let ps = page_size();
        let mut seen = HashSet::new();
        let mut hashes = HashMap::with_capacity(self.hashes.len());
        for m in maps.iter().filter(|m| sendable(m)) {
            let k = key(m);
            let whole = self.first || !self.known.contains(&k);
            seen.insert(k);
            let mut present = Vec::new();
            self.pagemap
                .present(m.start, m.end, anon_only(m), &mut present)?;
            normalize(&mut present);
            if whole && !self.first && !m.is_file() {
                delta.zero.extend(subtract(&[(m.start, m.end)], &present));
            }
            for &(s, e) in &present {
                // Read in slices so the buffer stays small.
                let mut a = s;
                while a < e {
                    let b = e.min(a + (1 << 22));
                    match vm::read_ranges(self.pid, &[(a, b)], &mut self.buf) {
                        Ok(()) => {}
                        // Unmapped meanwhile: nothing left to send there.
                        Err(VmError::Fault { .. }) => {
                            a = b;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    for (i, page) in self.buf.chunks_exact(ps as usize).enumerate() {
                        let pa = a + i as u64 * ps;
                        let h = xxh3_64(page);
                        if whole || self.hashes.get(&pa) != Some(&h) {
                            delta.data.push((pa, pa + ps));
                        }
                        hashes.insert(pa, h);
                    }
                    a = b;
                }
            }
        }
        // Pages hashed last round that no longer have content (dropped with
        // MADV_DONTNEED, say) changed too: they read as zero now, or as the
        // file again, and the read that follows sends exactly that.
        for &a in self.hashes.keys() {
            if !hashes.contains_key(&a) {
                delta.data.push((a, a + ps));
            }
        }
        self.hashes = hashes;
        self.known = seen;
        self.first = false;
        Ok(finish(delta, maps))
    }

    /// A page can change between the read that hashed it and the read that
    /// sent it, and change back later (a thread's rseq cpu id flipping
    /// between two CPUs does exactly that): had the first hash stayed, the
    /// page would look unchanged against it while the destination holds the
    /// other version. So the hash kept is the hash of what was sent.
    fn sent(&mut self, ranges: &[(u64, bytes::Bytes)]) {
        let ps = page_size();
        for (addr, data) in ranges {
            for (i, page) in data.chunks_exact(ps as usize).enumerate() {
                self.hashes.insert(addr + i as u64 * ps, xxh3_64(page));
            }
        }
    }

    fn put_back(&mut self, d: &Delta) {
        // The hashes already hold the new contents: without the put-back
        // these pages would never be seen as changed again.
        for &(s, e) in &d.data {
            let mut a = s;
            while a < e {
                self.hashes.remove(&a);
                a += page_size();
            }
        }
        queue(&mut self.pending, d);
    }
}

pub fn page_size() -> u64 {
    4096
}

/// Picks a backend: the one asked for, or the best that works here.
pub fn choose<'t>(
    tracee: &'t Tracee,
    want: Option<Backend>,
) -> Result<Box<dyn Tracker + 't>, TrackError> {
    match want {
        Some(Backend::UffdWp) => Ok(Box::new(UffdWp::arm(tracee)?)),
        Some(Backend::SoftDirty) => Ok(Box::new(SoftDirty::new(tracee)?)),
        Some(Backend::Checksum) => Ok(Box::new(Checksum::new(tracee.pid())?)),
        None => match UffdWp::arm(tracee) {
            Ok(t) => Ok(Box::new(t)),
            Err(e) => {
                tracing::warn!("uffd-wp tracking unavailable ({e}); trying soft-dirty");
                match SoftDirty::new(tracee) {
                    Ok(t) => Ok(Box::new(t)),
                    Err(_) => {
                        tracing::warn!("soft-dirty unavailable; falling back to checksums");
                        Ok(Box::new(Checksum::new(tracee.pid())?))
                    }
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_algebra() {
        let mut v = vec![(10, 20), (0, 5), (15, 30), (40, 40)];
        normalize(&mut v);
        assert_eq!(v, vec![(0, 5), (10, 30)]);
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (30, 40)]),
            vec![(0, 10), (20, 30), (40, 100)]
        );
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), vec![]);
        assert_eq!(
            subtract(&[(0, 10), (20, 30)], &[(5, 25)]),
            vec![(0, 5), (25, 30)]
        );
        assert_eq!(
            intersect(&[(0, 10), (20, 30)], &[(5, 25)]),
            vec![(5, 10), (20, 25)]
        );
        assert_eq!(intersect(&[(0, 10)], &[(10, 20)]), vec![]);
    }
}
