//! Spilling to disk: [`SpillStore`] keeps sessions in a quota'd memory
//! store and moves a session to a disk store the moment it goes over quota,
//! instead of ending it.
//!
//! A session starts in memory. When a batch would take it (or all sessions
//! together) over quota, its sealed layers are copied into a new session of
//! the disk store under the same id, layer by layer, with the process state
//! if it has one; the open layer is begun again on disk and the batches it
//! already took are put again, then the one that did not fit; the memory
//! copy is removed, which gives its quota back. From then on the session
//! lives on disk. Copying (rather than stacking later layers on disk over
//! the ones left in memory) keeps every session in one store, so flatten,
//! warm restore, resume and removal need nothing new, and the memory is
//! freed at once for the other sessions; the cost is one copy of what the
//! session held, paid once, when it spills.
//!
//! Replaying the open layer needs its batches: the handle keeps them until
//! the layer is sealed or discarded. They share their page data with the
//! memory store (reference-counted buffers), so that costs their run lists
//! only. An older sealed layer, read alone, has lost the pages newer layers
//! replaced (see `SessionStore::layer`); copied like that, the layers still
//! flatten to the same image.
//!
//! A session the memory store refuses from the start (it is full) is made
//! on disk directly.

use std::sync::Arc;

use ferry_proto::batch::{DecodedBatch, PageRun};
use ferry_proto::{pb, SessionId};
use tracing::info;

use super::{FlatImage, LayerSummary, Page, SessionStore, SessionSummary, Store, StoreError};

/// Pages per batch when a layer is copied to disk.
const COPY_PAGES: u64 = 1024;

/// A memory store (normally a [`super::quota::QuotaStore`]) that spills
/// sessions over quota to a disk store.
pub struct SpillStore {
    mem: Arc<dyn Store>,
    disk: Arc<dyn Store>,
}

impl SpillStore {
    pub fn new(mem: Arc<dyn Store>, disk: Arc<dyn Store>) -> Self {
        Self { mem, disk }
    }
}

impl Store for SpillStore {
    fn create(&self, meta: pb::SessionMeta) -> Result<Box<dyn SessionStore>, StoreError> {
        match self.mem.create(meta.clone()) {
            Ok(h) => Ok(Box::new(SpillHandle {
                cur: h,
                spilled: false,
                mem: self.mem.clone(),
                disk: self.disk.clone(),
                open: None,
            })),
            Err(StoreError::OverQuota { .. }) => {
                info!("memory store full: the new session is stored on disk");
                self.disk.create(meta)
            }
            Err(e) => Err(e),
        }
    }

    fn open(&self, id: SessionId) -> Result<Box<dyn SessionStore>, StoreError> {
        match self.mem.open(id) {
            Ok(h) => Ok(Box::new(SpillHandle {
                cur: h,
                spilled: false,
                mem: self.mem.clone(),
                disk: self.disk.clone(),
                open: None,
            })),
            Err(StoreError::UnknownSession(_)) => self.disk.open(id),
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        let mut all = self.mem.list()?;
        let spilled = self.disk.list()?;
        all.retain(|s| !spilled.iter().any(|d| d.id == s.id));
        all.extend(spilled);
        Ok(all)
    }

    fn remove(&self, id: SessionId) -> Result<(), StoreError> {
        match self.mem.remove(id) {
            Err(StoreError::UnknownSession(_)) => self.disk.remove(id),
            r => r,
        }
    }
}

/// The open layer: its id, mappings and the batches it took so far.
struct Open {
    layer: u32,
    vmas: Vec<pb::Vma>,
    batches: Vec<DecodedBatch>,
}

struct SpillHandle {
    cur: Box<dyn SessionStore>,
    spilled: bool,
    mem: Arc<dyn Store>,
    disk: Arc<dyn Store>,
    /// Kept while in memory only (on disk nothing is replayed again).
    open: Option<Open>,
}

impl SpillHandle {
    /// Moves the session to disk (see the module docs), `pending` last.
    fn spill(&mut self, pending: &DecodedBatch) -> Result<(), StoreError> {
        let id = self.cur.summary().id;
        let mut d = self.disk.create(self.cur.meta().clone())?;
        let copied = copy_into(self.cur.as_ref(), d.as_mut(), self.open.as_ref(), pending);
        if let Err(e) = copied {
            drop(d);
            let _ = self.disk.remove(id);
            return Err(e);
        }
        let layers = self.cur.sealed_layers();
        let bytes = self.cur.held_bytes();
        // The memory copy goes: its quota is given back to the others.
        self.cur = d;
        self.spilled = true;
        self.open = None;
        if let Err(e) = self.mem.remove(id) {
            tracing::warn!(session = %id, "removing the spilled session from memory: {e}");
        }
        info!(
            session = %id,
            layers,
            bytes,
            "over the memory quota: session spilled to the disk store"
        );
        Ok(())
    }
}

/// Copies every sealed layer, the state and the open layer's batches of
/// `from` into `to`, then `pending`.
fn copy_into(
    from: &dyn SessionStore,
    to: &mut dyn SessionStore,
    open: Option<&Open>,
    pending: &DecodedBatch,
) -> Result<(), StoreError> {
    for layer in 0..from.sealed_layers() {
        let img = from.layer(layer)?;
        to.begin_layer(layer, img.vmas.clone())?;
        for b in batches_of(&img, layer) {
            to.put(&b)?;
        }
        to.seal()?;
    }
    if let Some(tree) = from.state()? {
        to.put_state(&tree)?;
    }
    if let Some(o) = open {
        to.begin_layer(o.layer, o.vmas.clone())?;
        for b in &o.batches {
            to.put(b)?;
        }
    }
    to.put(pending)
}

/// A layer's runs as batches of at most [`COPY_PAGES`] pages, each data
/// batch a slice of the layer's buffers (no copy).
fn batches_of(img: &FlatImage, layer: u32) -> Vec<DecodedBatch> {
    let ps = img.page_size as u64;
    let mut out = Vec::new();
    for r in &img.runs {
        let mut done = 0;
        while done < r.pages {
            let n = (r.pages - done).min(COPY_PAGES);
            let addr = r.addr + done * ps;
            let data = match &r.data {
                Some(d) => d.slice((done * ps) as usize..((done + n) * ps) as usize),
                None => bytes::Bytes::new(),
            };
            out.push(DecodedBatch {
                layer,
                seq: out.len() as u32,
                runs: vec![PageRun {
                    addr,
                    pages: n as u32,
                    zero: r.data.is_none(),
                }],
                data,
                digest: 0,
            });
            done += n;
        }
    }
    out
}

impl SessionStore for SpillHandle {
    fn meta(&self) -> &pb::SessionMeta {
        self.cur.meta()
    }

    fn sealed_layers(&self) -> u32 {
        self.cur.sealed_layers()
    }

    fn begin_layer(&mut self, layer: u32, vmas: Vec<pb::Vma>) -> Result<(), StoreError> {
        self.cur.begin_layer(layer, vmas.clone())?;
        if !self.spilled {
            self.open = Some(Open {
                layer,
                vmas,
                batches: Vec::new(),
            });
        }
        Ok(())
    }

    fn put(&mut self, batch: &DecodedBatch) -> Result<(), StoreError> {
        match self.cur.put(batch) {
            Ok(()) => {
                if let Some(o) = self.open.as_mut() {
                    o.batches.push(batch.clone());
                }
                Ok(())
            }
            Err(StoreError::OverQuota { .. }) if !self.spilled => self.spill(batch),
            Err(e) => Err(e),
        }
    }

    fn seal(&mut self) -> Result<LayerSummary, StoreError> {
        let s = self.cur.seal()?;
        self.open = None;
        Ok(s)
    }

    fn discard_open(&mut self) -> Result<(), StoreError> {
        self.open = None;
        self.cur.discard_open()
    }

    fn put_state(&mut self, tree: &pb::ProcessTree) -> Result<(), StoreError> {
        self.cur.put_state(tree)
    }

    fn state(&self) -> Result<Option<pb::ProcessTree>, StoreError> {
        self.cur.state()
    }

    fn summary(&self) -> SessionSummary {
        self.cur.summary()
    }

    fn held_bytes(&self) -> u64 {
        self.cur.held_bytes()
    }

    fn lookup(&self, addr: u64) -> Result<Option<Page>, StoreError> {
        self.cur.lookup(addr)
    }

    fn flatten(&self) -> Result<FlatImage, StoreError> {
        self.cur.flatten()
    }

    fn layer(&self, layer: u32) -> Result<FlatImage, StoreError> {
        self.cur.layer(layer)
    }
}
