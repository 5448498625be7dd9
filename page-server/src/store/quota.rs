//! Memory quotas for a store: [`QuotaStore`] wraps another store and
//! refuses a batch that would make one session, or all sessions together,
//! hold more than their quota.
//!
//! The `mem` store keeps every page it is sent in RAM for the life of the
//! page server, so without a bound one source (or a few at once) can take
//! all of the host's memory, the restored processes' included. Accounting
//! wraps the store rather than living in it so the same limits apply to any
//! store and are tested with the shared suite. Bytes are reserved before a
//! batch is stored and given back when its layer is discarded, when a
//! sealed layer frees what it supersedes (see
//! [`SessionStore::held_bytes`]), and when a session is removed. An
//! over-quota session is refused; [`super::spill::SpillStore`] wrapped
//! around this store moves it to disk instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_proto::batch::DecodedBatch;
use ferry_proto::{pb, SessionId};

use super::{FlatImage, LayerSummary, Page, SessionStore, SessionSummary, Store, StoreError};

/// The limits a [`QuotaStore`] enforces, in bytes of page data (`u64::MAX`
/// for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// What one session may hold.
    pub session: u64,
    /// What all sessions together may hold.
    pub total: u64,
}

impl Quota {
    pub const NONE: Quota = Quota {
        session: u64::MAX,
        total: u64::MAX,
    };
}

#[derive(Default)]
struct Accounts {
    /// Bytes held over all sessions, open layers included.
    total: u64,
    /// Bytes of each session's sealed layers.
    sealed: HashMap<SessionId, u64>,
}

/// A store whose sessions are held to a [`Quota`]. Clones share accounts.
#[derive(Clone)]
pub struct QuotaStore {
    inner: Arc<dyn Store>,
    quota: Quota,
    acct: Arc<Mutex<Accounts>>,
}

impl QuotaStore {
    pub fn new(inner: Arc<dyn Store>, quota: Quota) -> Self {
        Self {
            inner,
            quota,
            acct: Arc::default(),
        }
    }

    /// Bytes held over all sessions now.
    pub fn used(&self) -> u64 {
        lock(&self.acct).total
    }
}

fn lock(m: &Mutex<Accounts>) -> MutexGuard<'_, Accounts> {
    // The accounts are plain numbers, consistent between statements.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store for QuotaStore {
    fn create(&self, meta: pb::SessionMeta) -> Result<Box<dyn SessionStore>, StoreError> {
        // A full store refuses new sessions outright, rather than letting
        // them start and fail at their first batch.
        let used = self.used();
        if used >= self.quota.total {
            return Err(StoreError::OverQuota {
                what: "the mem store",
                would: used,
                limit: self.quota.total,
                flag: "--mem-quota",
            });
        }
        let h = self.inner.create(meta)?;
        Ok(self.wrap(h))
    }

    fn open(&self, id: SessionId) -> Result<Box<dyn SessionStore>, StoreError> {
        let h = self.inner.open(id)?;
        Ok(self.wrap(h))
    }

    fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        self.inner.list()
    }

    fn remove(&self, id: SessionId) -> Result<(), StoreError> {
        self.inner.remove(id)?;
        let mut a = lock(&self.acct);
        if let Some(n) = a.sealed.remove(&id) {
            a.total = a.total.saturating_sub(n);
        }
        Ok(())
    }
}

impl QuotaStore {
    fn wrap(&self, inner: Box<dyn SessionStore>) -> Box<dyn SessionStore> {
        let id = inner.summary().id;
        {
            // A session the accounts have not seen (made before the
            // wrapper, through another handle) counts from what it holds.
            let mut a = lock(&self.acct);
            if let std::collections::hash_map::Entry::Vacant(e) = a.sealed.entry(id) {
                let held = inner.held_bytes();
                e.insert(held);
                a.total = a.total.saturating_add(held);
            }
        }
        Box::new(QuotaHandle {
            id,
            inner,
            quota: self.quota,
            acct: self.acct.clone(),
            open: 0,
        })
    }
}

struct QuotaHandle {
    id: SessionId,
    inner: Box<dyn SessionStore>,
    quota: Quota,
    acct: Arc<Mutex<Accounts>>,
    /// Bytes reserved for the open layer.
    open: u64,
}

impl QuotaHandle {
    fn reserve(&mut self, n: u64) -> Result<(), StoreError> {
        let mut a = lock(&self.acct);
        let sealed = a.sealed.get(&self.id).copied().unwrap_or(0);
        let session = sealed.saturating_add(self.open).saturating_add(n);
        if session > self.quota.session {
            return Err(StoreError::OverQuota {
                what: "this session",
                would: session,
                limit: self.quota.session,
                flag: "--session-quota",
            });
        }
        let total = a.total.saturating_add(n);
        if total > self.quota.total {
            return Err(StoreError::OverQuota {
                what: "the mem store",
                would: total,
                limit: self.quota.total,
                flag: "--mem-quota",
            });
        }
        a.total = total;
        self.open += n;
        Ok(())
    }

    fn release_open(&mut self) {
        let mut a = lock(&self.acct);
        a.total = a.total.saturating_sub(self.open);
        self.open = 0;
    }
}

impl Drop for QuotaHandle {
    fn drop(&mut self) {
        // Dropping the handle discards its open layer (see `SessionStore`).
        self.release_open();
    }
}

impl SessionStore for QuotaHandle {
    fn meta(&self) -> &pb::SessionMeta {
        self.inner.meta()
    }

    fn sealed_layers(&self) -> u32 {
        self.inner.sealed_layers()
    }

    fn begin_layer(&mut self, layer: u32, vmas: Vec<pb::Vma>) -> Result<(), StoreError> {
        self.inner.begin_layer(layer, vmas)
    }

    fn put(&mut self, batch: &DecodedBatch) -> Result<(), StoreError> {
        let n = batch.data.len() as u64;
        self.reserve(n)?;
        if let Err(e) = self.inner.put(batch) {
            let mut a = lock(&self.acct);
            a.total = a.total.saturating_sub(n);
            self.open -= n;
            return Err(e);
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<LayerSummary, StoreError> {
        let s = self.inner.seal()?;
        // Sealing may free older layers' superseded pages: count what the
        // session holds now instead of adding the layer on top.
        let held = self.inner.held_bytes();
        let mut a = lock(&self.acct);
        let before = a.sealed.insert(self.id, held).unwrap_or(0);
        a.total = a
            .total
            .saturating_sub(before)
            .saturating_sub(self.open)
            .saturating_add(held);
        self.open = 0;
        Ok(s)
    }

    fn discard_open(&mut self) -> Result<(), StoreError> {
        self.inner.discard_open()?;
        self.release_open();
        Ok(())
    }

    fn put_state(&mut self, tree: &pb::ProcessTree) -> Result<(), StoreError> {
        self.inner.put_state(tree)
    }

    fn state(&self) -> Result<Option<pb::ProcessTree>, StoreError> {
        self.inner.state()
    }

    fn summary(&self) -> SessionSummary {
        self.inner.summary()
    }

    fn held_bytes(&self) -> u64 {
        self.inner.held_bytes()
    }

    fn lookup(&self, addr: u64) -> Result<Option<Page>, StoreError> {
        self.inner.lookup(addr)
    }

    fn flatten(&self) -> Result<FlatImage, StoreError> {
        self.inner.flatten()
    }

    fn layer(&self, layer: u32) -> Result<FlatImage, StoreError> {
        self.inner.layer(layer)
    }
}
