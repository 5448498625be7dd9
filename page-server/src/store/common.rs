//! What both stores share, so they give exactly the same answers: the
//! session registry that makes handles exclusive, batch checks, and the
//! range-based flatten.
//!
//! Flatten works on runs, never on pages: a zero run may name gigabytes, and
//! an image may hold half a million pages. It walks the layers newest first,
//! keeps the set of address ranges not yet covered (starting from the last
//! layer's mappings), and emits only the uncovered parts of each run. A page
//! of layer j only counts if every newer layer's mappings still contain its
//! address: a mapping that vanished in some round and came back later is a
//! new mapping, and the old pages must not show through it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use ferry_proto::batch::DecodedBatch;
use ferry_proto::vma::RangeSet;
use ferry_proto::{pb, SessionId};

use super::{FlatImage, FlatRun, LayerSummary, SessionSummary, StoreError};

/// Where a data run's bytes are: buffer `buf` of its layer (a batch in the
/// mem store, the pages file on disk), from byte `off`. Keeping the location
/// rather than a `Bytes` lets flatten merge runs that are contiguous in the
/// same buffer into one slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub buf: u32,
    pub off: u64,
}

/// A stored run: `pages` pages from `addr`, zero if `data` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SrcRun {
    pub addr: u64,
    pub pages: u64,
    pub data: Option<Loc>,
}

impl SrcRun {
    pub fn end(&self, ps: u32) -> u64 {
        self.addr + self.pages * ps as u64
    }

    /// The part `[lo, hi)` of this run.
    pub(super) fn part(&self, lo: u64, hi: u64, ps: u32) -> SrcRun {
        SrcRun {
            addr: lo,
            pages: (hi - lo) / ps as u64,
            data: self.data.map(|l| Loc {
                buf: l.buf,
                off: l.off + (lo - self.addr),
            }),
        }
    }
}

/// A run of the flat image whose data is still a location in layer `.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    pub addr: u64,
    pub pages: u64,
    pub data: Option<(u32, Loc)>,
}

/// Sessions by id, each marked busy while a handle holds it.
pub(super) struct Registry<T> {
    map: Arc<Mutex<HashMap<SessionId, Slot<T>>>>,
}

struct Slot<T> {
    shared: Arc<Mutex<T>>,
    busy: bool,
}

impl<T> Clone for Registry<T> {
    fn clone(&self) -> Self {
        Self {
            map: self.map.clone(),
        }
    }
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Self {
            map: Arc::default(),
        }
    }
}

impl<T> Registry<T> {
    /// Adds a session and leases it. `make` runs under the registry lock, so
    /// two creates of one id cannot both get past the existence check.
    pub fn create(
        &self,
        id: SessionId,
        make: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<Lease<T>, StoreError> {
        let mut map = lock(&self.map);
        match map.get(&id) {
            Some(slot) if slot.busy => return Err(StoreError::Busy(id)),
            Some(_) => return Err(StoreError::SessionExists(id)),
            None => {}
        }
        let shared = Arc::new(Mutex::new(make()?));
        map.insert(
            id,
            Slot {
                shared: shared.clone(),
                busy: true,
            },
        );
        Ok(Lease {
            id,
            shared,
            map: self.map.clone(),
        })
    }

    /// Adds a session found at startup, not leased.
    pub fn insert_idle(&self, id: SessionId, value: T) {
        lock(&self.map).insert(
            id,
            Slot {
                shared: Arc::new(Mutex::new(value)),
                busy: false,
            },
        );
    }

    /// Leases a session; `None` if it does not exist.
    pub fn lease(&self, id: SessionId) -> Result<Option<Lease<T>>, StoreError> {
        let mut map = lock(&self.map);
        let Some(slot) = map.get_mut(&id) else {
            return Ok(None);
        };
        if slot.busy {
            return Err(StoreError::Busy(id));
        }
        slot.busy = true;
        Ok(Some(Lease {
            id,
            shared: slot.shared.clone(),
            map: self.map.clone(),
        }))
    }

    /// Removes an idle session after `destroy` succeeds; `false` if it does
    /// not exist.
    pub fn remove(
        &self,
        id: SessionId,
        destroy: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<bool, StoreError> {
        let mut map = lock(&self.map);
        match map.get(&id) {
            None => return Ok(false),
            Some(slot) if slot.busy => return Err(StoreError::Busy(id)),
            Some(_) => {}
        }
        destroy()?;
        map.remove(&id);
        Ok(true)
    }

    pub fn all(&self) -> Vec<(SessionId, Arc<Mutex<T>>)> {
        lock(&self.map)
            .iter()
            .map(|(id, s)| (*id, s.shared.clone()))
            .collect()
    }
}

/// Exclusive use of one session; dropping it frees the session for the next
/// `open`.
pub(super) struct Lease<T> {
    id: SessionId,
    shared: Arc<Mutex<T>>,
    map: Arc<Mutex<HashMap<SessionId, Slot<T>>>>,
}

impl<T> Lease<T> {
    pub fn get(&self) -> MutexGuard<'_, T> {
        lock(&self.shared)
    }
}

impl<T> Drop for Lease<T> {
    fn drop(&mut self) {
        if let Some(slot) = lock(&self.map).get_mut(&self.id) {
            if Arc::ptr_eq(&slot.shared, &self.shared) {
                slot.busy = false;
            }
        }
    }
}

/// A poisoned lock only means another handle panicked mid-operation; the
/// data under it is still consistent at the granularity we mutate it.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The session id from its meta, refusing metas that would break the page
/// arithmetic later.
pub(super) fn check_meta(meta: &pb::SessionMeta) -> Result<SessionId, StoreError> {
    if !ferry_proto::valid_page_size(meta.page_size) {
        return Err(StoreError::Corrupt(format!(
            "session meta: invalid page size {}",
            meta.page_size
        )));
    }
    SessionId::from_slice(&meta.session).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "session meta: id is {} bytes, not 16",
            meta.session.len()
        ))
    })
}

/// Checks that `layer` may begin now, with these mappings; returns their
/// ranges.
pub(super) fn check_begin(
    layer: u32,
    sealed: u32,
    open: Option<u32>,
    vmas: &[pb::Vma],
    ps: u32,
) -> Result<RangeSet, StoreError> {
    if open.is_some() || layer != sealed {
        // With a layer open, the next acceptable begin is after it seals.
        return Err(StoreError::LayerOrder {
            got: layer,
            expected: open.map_or(sealed, |o| o + 1),
        });
    }
    check_vmas(layer, vmas, ps)
}

pub(super) fn check_vmas(layer: u32, vmas: &[pb::Vma], ps: u32) -> Result<RangeSet, StoreError> {
    RangeSet::from_vmas(vmas, ps)
        .map_err(|e| StoreError::Corrupt(format!("layer {layer} mappings: {e}")))
}

/// Checks a batch against `layer` and turns its runs into stored runs whose
/// data sits in buffer `buf` from byte `base`. The batch was validated by
/// the decoder, but its fields are public and a bad one must not become a
/// panic in `iter_runs` or in flatten's arithmetic.
pub(super) fn batch_runs(
    batch: &DecodedBatch,
    layer: u32,
    ps: u32,
    buf: u32,
    base: u64,
) -> Result<Vec<SrcRun>, StoreError> {
    if batch.layer != layer {
        return Err(StoreError::WrongLayer {
            got: batch.layer,
            open: layer,
        });
    }
    let bad = |addr: u64, what: &str| {
        StoreError::Corrupt(format!(
            "batch {} of layer {layer}: run at {addr:#x} {what}",
            batch.seq
        ))
    };
    let ps64 = ps as u64;
    let mut out = Vec::with_capacity(batch.runs.len());
    let mut next_min = 0u64;
    let mut off = 0u64;
    for r in &batch.runs {
        if r.pages == 0 || r.addr % ps64 != 0 || r.addr < next_min {
            return Err(bad(r.addr, "is empty, unaligned or out of order"));
        }
        let len = r.pages as u64 * ps64;
        next_min = r
            .addr
            .checked_add(len)
            .ok_or_else(|| bad(r.addr, "ends past the address space"))?;
        out.push(SrcRun {
            addr: r.addr,
            pages: r.pages as u64,
            data: (!r.zero).then_some(Loc {
                buf,
                off: base + off,
            }),
        });
        if !r.zero {
            off += len;
        }
    }
    if off != batch.data.len() as u64 {
        return Err(StoreError::Corrupt(format!(
            "batch {} of layer {layer}: runs name {off} data bytes, it holds {}",
            batch.seq,
            batch.data.len()
        )));
    }
    Ok(out)
}

/// Sorts a layer's runs (its batches arrive in any order) and refuses
/// overlaps, which would make "the" copy of a page ambiguous.
pub(super) fn sort_and_check(runs: &mut [SrcRun], layer: u32, ps: u32) -> Result<(), StoreError> {
    runs.sort_unstable_by_key(|r| r.addr);
    for w in runs.windows(2) {
        if w[1].addr < w[0].end(ps) {
            return Err(StoreError::Corrupt(format!(
                "layer {layer}: batches overlap at {:#x}",
                w[1].addr
            )));
        }
    }
    Ok(())
}

/// The address ranges a layer's sorted runs cover, adjacent ones merged.
pub(super) fn covered_ranges(runs: &[SrcRun], ps: u32) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(last) if last.1 == r.addr => last.1 = r.end(ps),
            _ => out.push((r.addr, r.end(ps))),
        }
    }
    out
}

/// The run of `runs` (ascending, non-overlapping) holding `addr`.
pub(super) fn find_run(runs: &[SrcRun], addr: u64, ps: u32) -> Option<&SrcRun> {
    let i = runs.partition_point(|r| r.end(ps) <= addr);
    runs.get(i).filter(|r| r.addr <= addr)
}

/// Flattens `layers` (oldest first: each layer's runs, ascending and
/// non-overlapping, and its mappings) to the newest copy of every page
/// inside the last layer's mappings, ascending, with adjacent zero pieces
/// merged and adjacent data pieces merged when they are also contiguous in
/// the same buffer. A page of layer j counts only where every newer layer's
/// mappings contain it.
pub(super) fn flatten_pieces(layers: &[(&[SrcRun], &RangeSet)], ps: u32) -> Vec<Piece> {
    let ps64 = ps as u64;
    let Some((_, last)) = layers.last() else {
        return Vec::new();
    };
    // Ranges no newer layer has covered yet and every newer layer maps,
    // start → end.
    let mut open: BTreeMap<u64, u64> = last.ranges().iter().copied().collect();
    let mut pieces = Vec::new();
    let mut hit = Vec::new();
    for (li, (runs, _)) in layers.iter().enumerate().rev() {
        if let Some((_, newer)) = layers.get(li + 1) {
            open = intersect(&open, newer.ranges());
        }
        if open.is_empty() {
            break;
        }
        for r in runs.iter() {
            let (a, b) = (r.addr, r.end(ps));
            if a >= b {
                continue;
            }
            hit.clear();
            if let Some((&s, &e)) = open.range(..a).next_back() {
                if e > a {
                    hit.push((s, e));
                }
            }
            hit.extend(open.range(a..b).map(|(&s, &e)| (s, e)));
            for &(s, e) in &hit {
                open.remove(&s);
                if s < a {
                    open.insert(s, a);
                }
                if e > b {
                    open.insert(b, e);
                }
                let part = r.part(s.max(a), e.min(b), ps);
                pieces.push(Piece {
                    addr: part.addr,
                    pages: part.pages,
                    data: part.data.map(|l| (li as u32, l)),
                });
            }
        }
    }
    pieces.sort_unstable_by_key(|p| p.addr);
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        if let Some(last) = out.last_mut() {
            let len = last.pages * ps64;
            let merge = last.addr + len == p.addr
                && match (last.data, p.data) {
                    (None, None) => true,
                    (Some((la, a)), Some((lb, b))) => {
                        la == lb && a.buf == b.buf && a.off + len == b.off
                    }
                    _ => false,
                };
            if merge {
                last.pages += p.pages;
                continue;
            }
        }
        out.push(p);
    }
    out
}

/// The parts of `open` inside the sorted, disjoint `ranges`.
fn intersect(open: &BTreeMap<u64, u64>, ranges: &[(u64, u64)]) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    let mut j = 0;
    for (&s, &e) in open {
        while ranges.get(j).is_some_and(|&(_, re)| re <= s) {
            j += 1;
        }
        let mut k = j;
        while let Some(&(rs, re)) = ranges.get(k).filter(|&&(rs, _)| rs < e) {
            let (a, b) = (s.max(rs), e.min(re));
            if a < b {
                out.insert(a, b);
            }
            if re >= e {
                break;
            }
            k += 1;
        }
    }
    out
}

/// `len` bytes of `buf` from `off`, or `Corrupt` instead of a panic if an
/// index points outside its buffer.
pub(super) fn slice_buf(buf: Option<&Bytes>, off: u64, len: u64) -> Result<Bytes, StoreError> {
    let b = buf.ok_or_else(|| StoreError::Corrupt("run points to a missing buffer".into()))?;
    let range = usize::try_from(off)
        .ok()
        .and_then(|o| Some(o..o.checked_add(usize::try_from(len).ok()?)?))
        .filter(|r| r.end <= b.len())
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "run data {off}+{len} lies outside its {}-byte buffer",
                b.len()
            ))
        })?;
    Ok(b.slice(range))
}

/// The runs of a flat image from its pieces; `data(layer, loc, len)` gives
/// the bytes of a data piece.
pub(super) fn flat_runs(
    pieces: Vec<Piece>,
    ps: u32,
    mut data: impl FnMut(u32, Loc, u64) -> Result<Bytes, StoreError>,
) -> Result<Vec<FlatRun>, StoreError> {
    pieces
        .into_iter()
        .map(|p| {
            Ok(FlatRun {
                addr: p.addr,
                pages: p.pages,
                data: match p.data {
                    None => None,
                    Some((li, loc)) => Some(data(li, loc, p.pages * ps as u64)?),
                },
            })
        })
        .collect()
}

pub(super) fn empty_image(ps: u32) -> FlatImage {
    FlatImage {
        page_size: ps,
        vmas: Vec::new(),
        runs: Vec::new(),
    }
}

pub(super) fn session_summary(
    id: SessionId,
    meta: &pb::SessionMeta,
    layers: impl Iterator<Item = LayerSummary>,
    has_state: bool,
) -> SessionSummary {
    let mut s = SessionSummary {
        id,
        label: meta.label.clone(),
        layers: 0,
        pages: 0,
        bytes: 0,
        has_state,
    };
    for l in layers {
        s.layers += 1;
        s.pages += l.pages;
        s.bytes += l.bytes;
    }
    s
}
