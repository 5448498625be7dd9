//! The layer store: where a session's rounds live on the destination.
//!
//! A session's image is a stack of layers; layer k holds the pages of round k
//! and the mapping list of that round, and its parent is layer k-1. A page is
//! looked up from the newest layer down, and zero runs count as hits.
//! [`SessionStore::flatten`] keeps, for every page inside the last layer's
//! mappings, its newest copy. A page of layer j counts only while every
//! newer layer maps its address: a mapping that disappeared in some round
//! and reappeared later is a new mapping, and the old contents must not show
//! through it. (A mapping replaced *within* one round looks unchanged here;
//! the source must resend such a range whole.)
//!
//! Two implementations sit behind one trait and pass one test suite:
//! [`mem::MemStore`] (rounds kept in memory, for restore straight from RAM)
//! and [`disk::DiskStore`] (a directory per session, a header with magic,
//! version and checksum on every file, `fsync` before a layer is sealed, and
//! sessions found again after a restart). [`quota::QuotaStore`] wraps
//! either to bound the memory its sessions hold.

use bytes::Bytes;
use ferry_proto::batch::DecodedBatch;
use ferry_proto::{pb, SessionId};

mod common;
pub mod disk;
pub mod mem;
pub mod quota;
pub mod spill;

#[cfg(test)]
mod suite;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    #[error("session {0} already exists")]
    SessionExists(SessionId),
    #[error("session {0} is in use by another connection")]
    Busy(SessionId),
    #[error("layer {got} out of order: the next layer is {expected}")]
    LayerOrder { got: u32, expected: u32 },
    #[error("no sealed layer {0}")]
    NoLayer(u32),
    #[error("no open layer")]
    NoOpenLayer,
    #[error("batch for layer {got}, but layer {open} is open")]
    WrongLayer { got: u32, open: u32 },
    #[error(
        "over quota: {what} would hold {would} bytes of page data, more than its {} ({flag})",
        crate::limits::show_size(*limit)
    )]
    OverQuota {
        what: &'static str,
        would: u64,
        limit: u64,
        flag: &'static str,
    },
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One page as the image holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    Zero,
    Data(Bytes),
}

/// A run of the flattened image: `pages` pages from `addr`, data back to
/// back or zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatRun {
    pub addr: u64,
    pub pages: u64,
    /// `None` for zero pages.
    pub data: Option<Bytes>,
}

/// The newest copy of every page inside the last layer's mappings, in
/// ascending address order. Pages never sent are absent (holes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatImage {
    pub page_size: u32,
    pub vmas: Vec<pb::Vma>,
    pub runs: Vec<FlatRun>,
}

impl FlatImage {
    /// The page at `addr` (page aligned), if the image has it.
    pub fn page(&self, addr: u64) -> Option<Page> {
        let ps = self.page_size as u64;
        let i = self.runs.partition_point(|r| r.addr + r.pages * ps <= addr);
        let r = self.runs.get(i)?;
        if addr < r.addr {
            return None;
        }
        Some(match &r.data {
            None => Page::Zero,
            Some(d) => {
                let off = ((addr - r.addr) / ps * ps) as usize;
                Page::Data(d.slice(off..off + ps as usize))
            }
        })
    }

    /// Pages the image holds, zero or not.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.pages).sum()
    }

    /// Bytes of data pages.
    pub fn data_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter_map(|r| r.data.as_ref())
            .map(|d| d.len() as u64)
            .sum()
    }
}

/// What `ferry images list` shows of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    pub id: SessionId,
    pub label: String,
    pub layers: u32,
    /// Pages over all sealed layers (a page sent in two rounds counts twice).
    pub pages: u64,
    /// Data bytes over all sealed layers.
    pub bytes: u64,
    pub has_state: bool,
}

/// What a sealed layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSummary {
    pub layer: u32,
    pub pages: u64,
    pub bytes: u64,
}

/// A store of sessions. Shared by every connection of a page server.
pub trait Store: Send + Sync + 'static {
    /// Creates a session; refused if the id exists.
    fn create(&self, meta: pb::SessionMeta) -> Result<Box<dyn SessionStore>, StoreError>;
    /// Opens a session that exists (to resume it or restore it). Refused
    /// while another handle to it is open.
    fn open(&self, id: SessionId) -> Result<Box<dyn SessionStore>, StoreError>;
    fn list(&self) -> Result<Vec<SessionSummary>, StoreError>;
    fn remove(&self, id: SessionId) -> Result<(), StoreError>;
}

/// One session's layers, through a handle that only one connection holds at
/// a time (dropping it releases the session; an open layer is discarded).
pub trait SessionStore: Send {
    fn meta(&self) -> &pb::SessionMeta;
    /// Number of sealed layers, which is also the next layer's id.
    fn sealed_layers(&self) -> u32;
    /// Opens layer `layer` (must equal `sealed_layers()`, with no layer
    /// open) with the mappings of its round.
    fn begin_layer(&mut self, layer: u32, vmas: Vec<pb::Vma>) -> Result<(), StoreError>;
    /// Adds a validated batch to the open layer. Batches of one layer come
    /// in any order and never overlap each other.
    fn put(&mut self, batch: &DecodedBatch) -> Result<(), StoreError>;
    /// Makes the open layer durable and part of the image.
    fn seal(&mut self) -> Result<LayerSummary, StoreError>;
    /// Drops the open layer, if any.
    fn discard_open(&mut self) -> Result<(), StoreError>;
    /// Keeps the process state (durably), replacing any earlier one.
    fn put_state(&mut self, tree: &pb::ProcessTree) -> Result<(), StoreError>;
    fn state(&self) -> Result<Option<pb::ProcessTree>, StoreError>;
    fn summary(&self) -> SessionSummary;
    /// Bytes of page data the sealed layers still hold (what quotas count):
    /// less than the summary's when newer layers superseded older pages
    /// and the store freed them.
    fn held_bytes(&self) -> u64 {
        self.summary().bytes
    }
    /// The newest copy of the page at `addr` over the sealed layers (`None`
    /// where a newer layer no longer maps `addr`, see the module docs).
    fn lookup(&self, addr: u64) -> Result<Option<Page>, StoreError>;
    /// The sealed layers flattened (see the module docs).
    fn flatten(&self) -> Result<FlatImage, StoreError>;
    /// One sealed layer alone: its mappings and its runs. Exact for the
    /// newest layer; an older one has lost the pages newer layers replaced
    /// (a warm restore reads each layer as it is sealed).
    fn layer(&self, layer: u32) -> Result<FlatImage, StoreError>;
}
