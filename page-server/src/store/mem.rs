//! The in-memory layer store.
//!
//! [`MemStore`] keeps every session in RAM for the life of the page server,
//! so a restore can be served straight from memory with no disk in the path.
//! Batches are kept as the [`Bytes`] they arrived in and runs point into
//! them, so storing a batch and flattening the image copy no page. When a
//! layer is sealed, the parts of older layers it covers can never be seen
//! again (lookup and flatten both take the newest copy), so they are cut out
//! of the older layers' run lists and batches no run points into any more are
//! freed: a session that sends the same hot pages every round does not grow
//! by a full copy per round.

use std::sync::Arc;

use bytes::Bytes;
use ferry_proto::batch::DecodedBatch;
use ferry_proto::vma::RangeSet;
use ferry_proto::{pb, SessionId};

use super::common::{
    batch_runs, check_begin, check_meta, covered_ranges, empty_image, find_run, flat_runs,
    flatten_pieces, lock, session_summary, slice_buf, sort_and_check, Lease, Registry, SrcRun,
};
use super::{FlatImage, LayerSummary, Page, SessionStore, SessionSummary, Store, StoreError};

/// Sessions kept in memory. Clones share the same sessions.
#[derive(Clone, Default)]
pub struct MemStore {
    reg: Registry<MemSession>,
}

struct MemSession {
    meta: pb::SessionMeta,
    layers: Vec<Arc<MemLayer>>,
    state: Option<pb::ProcessTree>,
}

/// A sealed layer. Behind an `Arc` so flatten works on a snapshot without
/// holding the session lock, and trimming replaces it rather than editing it.
struct MemLayer {
    summary: LayerSummary,
    vmas: Vec<pb::Vma>,
    ranges: RangeSet,
    /// Ascending, non-overlapping; `Loc::buf` indexes `bufs`.
    runs: Vec<SrcRun>,
    /// One per batch; emptied once no run points into it.
    bufs: Vec<Bytes>,
}

struct OpenLayer {
    layer: u32,
    vmas: Vec<pb::Vma>,
    ranges: RangeSet,
    runs: Vec<SrcRun>,
    bufs: Vec<Bytes>,
    pages: u64,
    bytes: u64,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemStore {
    fn create(&self, meta: pb::SessionMeta) -> Result<Box<dyn SessionStore>, StoreError> {
        let id = check_meta(&meta)?;
        let lease = self.reg.create(id, || {
            Ok(MemSession {
                meta: meta.clone(),
                layers: Vec::new(),
                state: None,
            })
        })?;
        Ok(Box::new(MemHandle {
            id,
            meta,
            lease,
            open: None,
        }))
    }

    fn open(&self, id: SessionId) -> Result<Box<dyn SessionStore>, StoreError> {
        let lease = self.reg.lease(id)?.ok_or(StoreError::UnknownSession(id))?;
        let meta = lease.get().meta.clone();
        Ok(Box::new(MemHandle {
            id,
            meta,
            lease,
            open: None,
        }))
    }

    fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        let mut out: Vec<_> = self
            .reg
            .all()
            .into_iter()
            .map(|(id, s)| lock(&s).summary(id))
            .collect();
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    fn remove(&self, id: SessionId) -> Result<(), StoreError> {
        if self.reg.remove(id, || Ok(()))? {
            Ok(())
        } else {
            Err(StoreError::UnknownSession(id))
        }
    }
}

impl MemSession {
    fn summary(&self, id: SessionId) -> SessionSummary {
        session_summary(
            id,
            &self.meta,
            self.layers.iter().map(|l| l.summary),
            self.state.is_some(),
        )
    }
}

/// The exclusive handle; the open layer lives here, not in the shared
/// session, so dropping the handle is all it takes to discard it.
struct MemHandle {
    id: SessionId,
    meta: pb::SessionMeta,
    lease: Lease<MemSession>,
    open: Option<OpenLayer>,
}

impl MemHandle {
    fn page_size(&self) -> u32 {
        self.meta.page_size
    }

    fn snapshot(&self) -> Vec<Arc<MemLayer>> {
        self.lease.get().layers.clone()
    }
}

impl SessionStore for MemHandle {
    fn meta(&self) -> &pb::SessionMeta {
        &self.meta
    }

    fn sealed_layers(&self) -> u32 {
        self.lease.get().layers.len() as u32
    }

    fn begin_layer(&mut self, layer: u32, vmas: Vec<pb::Vma>) -> Result<(), StoreError> {
        let ranges = check_begin(
            layer,
            self.sealed_layers(),
            self.open.as_ref().map(|o| o.layer),
            &vmas,
            self.page_size(),
        )?;
        self.open = Some(OpenLayer {
            layer,
            vmas,
            ranges,
            runs: Vec::new(),
            bufs: Vec::new(),
            pages: 0,
            bytes: 0,
        });
        Ok(())
    }

    fn put(&mut self, batch: &DecodedBatch) -> Result<(), StoreError> {
        let ps = self.page_size();
        let open = self.open.as_mut().ok_or(StoreError::NoOpenLayer)?;
        let buf = u32::try_from(open.bufs.len())
            .map_err(|_| StoreError::Corrupt("too many batches in one layer".into()))?;
        let runs = batch_runs(batch, open.layer, ps, buf, 0)?;
        open.pages += batch.pages();
        open.bytes += batch.data.len() as u64;
        open.runs.extend(runs);
        open.bufs.push(batch.data.clone());
        Ok(())
    }

    fn seal(&mut self) -> Result<LayerSummary, StoreError> {
        let ps = self.page_size();
        let open = self.open.as_mut().ok_or(StoreError::NoOpenLayer)?;
        // On an overlap the layer stays open: the caller decides whether to
        // discard it, as with any other failed seal.
        sort_and_check(&mut open.runs, open.layer, ps)?;
        let Some(open) = self.open.take() else {
            return Err(StoreError::NoOpenLayer);
        };
        let summary = LayerSummary {
            layer: open.layer,
            pages: open.pages,
            bytes: open.bytes,
        };
        let cover = covered_ranges(&open.runs, ps);
        let mut s = self.lease.get();
        for old in s.layers.iter_mut() {
            if let Some(trimmed) = trim(old, &cover, ps) {
                *old = Arc::new(trimmed);
            }
        }
        s.layers.push(Arc::new(MemLayer {
            summary,
            vmas: open.vmas,
            ranges: open.ranges,
            runs: open.runs,
            bufs: open.bufs,
        }));
        Ok(summary)
    }

    fn discard_open(&mut self) -> Result<(), StoreError> {
        self.open = None;
        Ok(())
    }

    fn put_state(&mut self, tree: &pb::ProcessTree) -> Result<(), StoreError> {
        self.lease.get().state = Some(tree.clone());
        Ok(())
    }

    fn state(&self) -> Result<Option<pb::ProcessTree>, StoreError> {
        Ok(self.lease.get().state.clone())
    }

    fn summary(&self) -> SessionSummary {
        self.lease.get().summary(self.id)
    }

    fn held_bytes(&self) -> u64 {
        // Trimmed layers keep empty `Bytes` for the batches they freed.
        let s = self.lease.get();
        s.layers
            .iter()
            .flat_map(|l| l.bufs.iter())
            .map(|b| b.len() as u64)
            .sum()
    }

    fn lookup(&self, addr: u64) -> Result<Option<Page>, StoreError> {
        let ps = self.page_size();
        let addr = addr & !(ps as u64 - 1);
        for l in self.snapshot().iter().rev() {
            // Pages under a mapping that went away in a newer round are void.
            if !l.ranges.contains(addr, addr + ps as u64) {
                return Ok(None);
            }
            if let Some(r) = find_run(&l.runs, addr, ps) {
                return Ok(Some(match r.data {
                    None => Page::Zero,
                    Some(loc) => {
                        let off = loc.off + (addr - r.addr);
                        Page::Data(slice_buf(l.bufs.get(loc.buf as usize), off, ps as u64)?)
                    }
                }));
            }
        }
        Ok(None)
    }

    fn flatten(&self) -> Result<FlatImage, StoreError> {
        image_of(&self.snapshot(), self.page_size())
    }

    fn layer(&self, layer: u32) -> Result<FlatImage, StoreError> {
        let layers = self.snapshot();
        let l = layers
            .get(layer as usize)
            .ok_or(StoreError::NoLayer(layer))?;
        image_of(std::slice::from_ref(l), self.page_size())
    }
}

/// `layers` flattened (see the module docs of the store).
fn image_of(layers: &[Arc<MemLayer>], ps: u32) -> Result<FlatImage, StoreError> {
    let Some(last) = layers.last() else {
        return Ok(empty_image(ps));
    };
    let runs: Vec<_> = layers.iter().map(|l| (&l.runs[..], &l.ranges)).collect();
    let pieces = flatten_pieces(&runs, ps);
    let runs = flat_runs(pieces, ps, |li, loc, len| {
        let bufs = layers
            .get(li as usize)
            .and_then(|l| l.bufs.get(loc.buf as usize));
        slice_buf(bufs, loc.off, len)
    })?;
    Ok(FlatImage {
        page_size: ps,
        vmas: last.vmas.clone(),
        runs,
    })
}

/// `old` without the ranges in `cover`, or `None` if nothing changes.
/// Batches no run points into any more are released.
fn trim(old: &MemLayer, cover: &[(u64, u64)], ps: u32) -> Option<MemLayer> {
    let runs = subtract(&old.runs, cover, ps);
    if runs == old.runs {
        return None;
    }
    let mut used = vec![false; old.bufs.len()];
    for loc in runs.iter().filter_map(|r| r.data) {
        if let Some(u) = used.get_mut(loc.buf as usize) {
            *u = true;
        }
    }
    let bufs = old
        .bufs
        .iter()
        .zip(used)
        .map(|(b, u)| if u { b.clone() } else { Bytes::new() })
        .collect();
    Some(MemLayer {
        summary: old.summary,
        vmas: old.vmas.clone(),
        ranges: old.ranges.clone(),
        runs,
        bufs,
    })
}

/// `runs` (ascending, non-overlapping) minus the sorted, disjoint `cover`.
fn subtract(runs: &[SrcRun], cover: &[(u64, u64)], ps: u32) -> Vec<SrcRun> {
    let mut out = Vec::with_capacity(runs.len());
    let mut j = 0;
    for r in runs {
        let (mut a, b) = (r.addr, r.end(ps));
        // Runs ascend, so cover ranges ending before this run end before
        // every later run too.
        while cover.get(j).is_some_and(|&(_, e)| e <= a) {
            j += 1;
        }
        let mut k = j;
        while a < b {
            match cover.get(k) {
                Some(&(cs, ce)) if cs < b => {
                    if cs > a {
                        out.push(r.part(a, cs, ps));
                    }
                    a = a.max(ce);
                    k += 1;
                }
                _ => {
                    out.push(r.part(a, b, ps));
                    break;
                }
            }
        }
    }
    out
}
