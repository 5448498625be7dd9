//! The on-disk layer store: sessions that survive a page server restart.
//!
//! Layout, one directory per session and per layer:
//!
//! ```text
//! <root>/<session-hex>/meta                 SessionMeta
//! <root>/<session-hex>/state                ProcessTree
//! <root>/<session-hex>/layer-000000/pages   data pages, appended as batches arrive
//! <root>/<session-hex>/layer-000000/index   LayerIndex: runs, file offsets, checksum
//! ```
//!
//! Every metadata file starts with a header (magic, format version, kind,
//! body length, xxh3-64 of the body) so a foreign, truncated, bit-rotted or
//! newer file is refused by name instead of being misread, and the length is
//! checked against a cap before anything is allocated.
//!
//! The `index` file is the commit point of a layer: it is written to a
//! temporary name, fsynced, renamed, and both directories are fsynced before
//! `seal` returns, after the pages file itself was fsynced. So a layer
//! directory with an `index` is whole, and one without is the leftover of a
//! round that never sealed; recovery deletes the latter (and anything after
//! a gap) and never half-uses it. An `index` that exists but cannot be read
//! is not a crash artefact but damage or a newer format, so that session is
//! kept untouched and refused with the reason instead of being "repaired".

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_proto::batch::DecodedBatch;
use ferry_proto::vma::RangeSet;
use ferry_proto::{pb, SessionId};
use prost::Message;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::common::{
    batch_runs, check_begin, check_meta, check_vmas, empty_image, find_run, flat_runs,
    flatten_pieces, lock, session_summary, slice_buf, sort_and_check, Lease, Loc, Registry, SrcRun,
};
use super::{FlatImage, LayerSummary, Page, SessionStore, SessionSummary, Store, StoreError};

const MAGIC: &[u8; 8] = b"FERRYIMG";
/// Format of the files this build writes; newer ones are refused.
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
/// Largest metadata body read; a bigger length field is damage, not data.
const MAX_BODY: u64 = 256 << 20;
/// Pages files smaller than this are read by one thread.
const PARALLEL_READ_MIN: usize = 64 << 20;
/// Suffix a session directory gets while it is being removed.
const REMOVED: &str = ".removed";

/// What a metadata file holds, so one file is never read as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Meta = 1,
    State = 2,
    Index = 3,
}

impl Kind {
    fn name(code: u32) -> &'static str {
        match code {
            1 => "meta",
            2 => "state",
            3 => "index",
            _ => "unknown",
        }
    }
}

/// Sessions in a directory. Clones share the same sessions.
#[derive(Clone)]
pub struct DiskStore {
    root: PathBuf,
    reg: Registry<DiskSession>,
    /// Sessions found damaged at startup, with the reason, so `open` says
    /// why instead of "unknown session".
    broken: Arc<Mutex<std::collections::HashMap<SessionId, String>>>,
}

struct DiskSession {
    meta: pb::SessionMeta,
    dir: PathBuf,
    layers: Vec<Arc<DiskLayer>>,
    has_state: bool,
}

struct DiskLayer {
    summary: LayerSummary,
    vmas: Vec<pb::Vma>,
    ranges: RangeSet,
    /// Ascending, non-overlapping; `Loc::off` is the offset in `pages`.
    runs: Vec<SrcRun>,
    pages: PathBuf,
    pages_len: u64,
    checksum: u64,
}

struct OpenLayer {
    layer: u32,
    vmas: Vec<pb::Vma>,
    ranges: RangeSet,
    dir: PathBuf,
    pages_path: PathBuf,
    file: File,
    /// Bytes of the pages file that are committed to runs. Writes are
    /// positioned here, so a failed write leaves no gap or misplaced data.
    len: u64,
    hasher: Xxh3,
    runs: Vec<SrcRun>,
    pages: u64,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{}: {what}", path.display()))
}

fn layer_dir_name(layer: u32) -> String {
    format!("layer-{layer:06}")
}

impl DiskStore {
    /// Opens (creating if missing) a store at `root` and recovers the
    /// sessions in it.
    pub fn open(root: impl AsRef<Path>) -> Result<DiskStore, StoreError> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(io_err("create_dir_all", &root))?;
        let store = DiskStore {
            root: root.clone(),
            reg: Registry::default(),
            broken: Arc::default(),
        };
        for entry in fs::read_dir(&root).map_err(io_err("read_dir", &root))? {
            let entry = entry.map_err(io_err("read_dir", &root))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(REMOVED) {
                // A remove that crashed after the rename: finish it.
                tracing::warn!(path = %path.display(), "deleting a half-removed session");
                if let Err(e) = fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete");
                }
                continue;
            }
            let Some(id) = SessionId::from_hex(name) else {
                tracing::warn!(path = %path.display(), "not a session directory, ignored");
                continue;
            };
            match recover_session(&path, id) {
                Ok(s) => store.reg.insert_idle(id, s),
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "session skipped");
                    lock(&store.broken).insert(id, e.to_string());
                }
            }
        }
        Ok(store)
    }

    fn session_dir(&self, id: SessionId) -> PathBuf {
        self.root.join(id.to_hex())
    }

    /// Commits the removal of a session by renaming its directory, so a
    /// crash leaves a name recovery knows to finish deleting, never a
    /// half-deleted session that looks real. Returns the new name.
    fn retire(&self, id: SessionId) -> Result<PathBuf, StoreError> {
        let dir = self.session_dir(id);
        let gone = self.root.join(format!("{}{REMOVED}", id.to_hex()));
        fs::rename(&dir, &gone).map_err(io_err("rename", &dir))?;
        sync_dir(&self.root)?;
        Ok(gone)
    }
}

/// Reads a session directory back: meta, whether there is a state, and the
/// sealed layers 0..n. Unsealed layer directories and layers after a gap
/// are deleted; an unreadable meta or index fails the whole session.
fn recover_session(dir: &Path, id: SessionId) -> Result<DiskSession, StoreError> {
    let meta: pb::SessionMeta =
        read_record(&dir.join("meta"), Kind::Meta)?.ok_or_else(|| corrupt(dir, "no meta file"))?;
    let meta_id = check_meta(&meta)?;
    if meta_id != id {
        return Err(corrupt(dir, format!("meta names session {meta_id}")));
    }
    let ps = meta.page_size;
    let mut layer_dirs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read_dir", dir))? {
        let entry = entry.map_err(io_err("read_dir", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            // A metadata write that never reached its rename.
            let p = entry.path();
            if let Err(e) = fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot delete");
            }
        } else if let Some(n) = name
            .strip_prefix("layer-")
            .and_then(|n| n.parse::<u32>().ok())
        {
            layer_dirs.push((n, entry.path()));
        }
    }
    layer_dirs.sort();
    let mut layers: Vec<Arc<DiskLayer>> = Vec::new();
    let mut gap = false;
    for (n, ldir) in layer_dirs {
        if !gap && n == layers.len() as u32 {
            let index_path = ldir.join("index");
            if let Some(ix) = read_record::<pb::LayerIndex>(&index_path, Kind::Index)? {
                layers.push(Arc::new(load_layer(&ldir, n, ix, ps)?));
                continue;
            }
            tracing::warn!(session = %id, layer = n, "deleting a layer that was never sealed");
        } else {
            tracing::warn!(session = %id, layer = n, "deleting a layer after a gap");
        }
        gap = true;
        // If this fails the directory is still never used: a later
        // begin_layer of that number clears it first.
        if let Err(e) = fs::remove_dir_all(&ldir) {
            tracing::warn!(path = %ldir.display(), error = %e, "cannot delete");
        }
    }
    let state = dir.join("state");
    let has_state = state.try_exists().map_err(io_err("stat", &state))?;
    Ok(DiskSession {
        meta,
        dir: dir.to_path_buf(),
        layers,
        has_state,
    })
}

/// An index that passed [`check_index`].
struct CheckedIndex {
    ranges: RangeSet,
    /// Ascending, non-overlapping; `Loc::off` is the offset in `pages`.
    runs: Vec<SrcRun>,
    pages: u64,
    /// End of the last byte of `pages` a run uses.
    data_end: u64,
}

/// Checks an index against the invariants flatten and lookup rely on;
/// `path` only names it in errors. Pure, so it is fuzzed.
fn check_index(
    path: &Path,
    n: u32,
    ix: &pb::LayerIndex,
    ps: u32,
) -> Result<CheckedIndex, StoreError> {
    if ix.layer != n {
        return Err(corrupt(
            path,
            format!("index of layer {} in the directory of layer {n}", ix.layer),
        ));
    }
    let ranges = check_vmas(n, &ix.vmas, ps)?;
    let ps64 = ps as u64;
    let mut runs = Vec::with_capacity(ix.runs.len());
    let (mut pages, mut data_end) = (0u64, 0u64);
    let mut next_min = 0u64;
    for r in &ix.runs {
        let bad = |what: &str| corrupt(path, format!("run at {:#x} {what}", r.addr));
        let len = r
            .pages
            .checked_mul(ps64)
            .filter(|_| r.pages > 0 && r.addr % ps64 == 0 && r.addr >= next_min)
            .ok_or_else(|| bad("is empty, unaligned, out of order or too long"))?;
        next_min = r
            .addr
            .checked_add(len)
            .ok_or_else(|| bad("ends past the address space"))?;
        pages += r.pages;
        let data = if r.zero {
            None
        } else {
            let end = r.offset.checked_add(len).filter(|&e| e <= ix.pages_len);
            data_end = data_end.max(end.ok_or_else(|| bad("points past the pages file"))?);
            Some(Loc {
                buf: 0,
                off: r.offset,
            })
        };
        runs.push(SrcRun {
            addr: r.addr,
            pages: r.pages,
            data,
        });
    }
    if pages != ix.pages {
        return Err(corrupt(
            path,
            format!("runs name {pages} pages, the index says {}", ix.pages),
        ));
    }
    Ok(CheckedIndex {
        ranges,
        runs,
        pages,
        data_end,
    })
}

/// Checks an index ([`check_index`]) and its pages file's length; the
/// checksum is checked when the data is read.
fn load_layer(dir: &Path, n: u32, ix: pb::LayerIndex, ps: u32) -> Result<DiskLayer, StoreError> {
    let CheckedIndex {
        ranges,
        runs,
        pages,
        data_end,
    } = check_index(&dir.join("index"), n, &ix, ps)?;
    let pages_path = dir.join("pages");
    let on_disk = fs::metadata(&pages_path)
        .map_err(io_err("stat", &pages_path))?
        .len();
    if on_disk != ix.pages_len || data_end != ix.pages_len {
        return Err(corrupt(
            &pages_path,
            format!(
                "{on_disk} bytes on disk, {data_end} used by runs, index says {}",
                ix.pages_len
            ),
        ));
    }
    Ok(DiskLayer {
        summary: LayerSummary {
            layer: n,
            pages,
            bytes: ix.pages_len,
        },
        vmas: ix.vmas,
        ranges,
        runs,
        pages: pages_path,
        pages_len: ix.pages_len,
        checksum: ix.pages_checksum,
    })
}

impl Store for DiskStore {
    fn create(&self, meta: pb::SessionMeta) -> Result<Box<dyn SessionStore>, StoreError> {
        let id = check_meta(&meta)?;
        let dir = self.session_dir(id);
        let lease = self.reg.create(id, || {
            match fs::create_dir(&dir) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // A session skipped at startup still owns its directory.
                    return Err(StoreError::SessionExists(id));
                }
                r => r.map_err(io_err("create_dir", &dir))?,
            }
            let written =
                write_record(&dir, "meta", Kind::Meta, &meta).and_then(|()| sync_dir(&self.root));
            if let Err(e) = written {
                // Without its meta the directory would only be skipped at
                // every start, and block the id for good.
                if let Err(rm) = fs::remove_dir_all(&dir) {
                    tracing::warn!(path = %dir.display(), error = %rm, "cannot delete");
                }
                return Err(e);
            }
            Ok(DiskSession {
                meta: meta.clone(),
                dir: dir.clone(),
                layers: Vec::new(),
                has_state: false,
            })
        })?;
        Ok(Box::new(DiskHandle {
            id,
            meta,
            dir,
            lease,
            open: None,
        }))
    }

    fn open(&self, id: SessionId) -> Result<Box<dyn SessionStore>, StoreError> {
        let Some(lease) = self.reg.lease(id)? else {
            return Err(match lock(&self.broken).get(&id) {
                Some(why) => StoreError::Corrupt(format!("session {id}: {why}")),
                None => StoreError::UnknownSession(id),
            });
        };
        let (meta, dir) = {
            let s = lease.get();
            (s.meta.clone(), s.dir.clone())
        };
        Ok(Box::new(DiskHandle {
            id,
            meta,
            dir,
            lease,
            open: None,
        }))
    }

    fn list(&self) -> Result<Vec<SessionSummary>, StoreError> {
        let mut out: Vec<_> = self
            .reg
            .all()
            .into_iter()
            .map(|(id, s)| {
                let s = lock(&s);
                session_summary(id, &s.meta, s.layers.iter().map(|l| l.summary), s.has_state)
            })
            .collect();
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    fn remove(&self, id: SessionId) -> Result<(), StoreError> {
        let mut gone = None;
        // Only the rename happens under the registry lock; deleting gigabytes
        // of pages must not stall every other open.
        let found = self.reg.remove(id, || {
            gone = Some(self.retire(id)?);
            Ok(())
        })?;
        if !found {
            // A damaged session can be removed too; that is how an operator
            // clears it.
            let mut broken = lock(&self.broken);
            if !broken.contains_key(&id) {
                return Err(StoreError::UnknownSession(id));
            }
            gone = Some(self.retire(id)?);
            broken.remove(&id);
        }
        if let Some(gone) = gone {
            if let Err(e) = fs::remove_dir_all(&gone) {
                // The removal is committed; the next start finishes it.
                tracing::warn!(path = %gone.display(), error = %e, "cannot delete");
            }
        }
        Ok(())
    }
}

struct DiskHandle {
    id: SessionId,
    meta: pb::SessionMeta,
    dir: PathBuf,
    lease: Lease<DiskSession>,
    open: Option<OpenLayer>,
}

impl DiskHandle {
    fn page_size(&self) -> u32 {
        self.meta.page_size
    }

    fn snapshot(&self) -> Vec<Arc<DiskLayer>> {
        self.lease.get().layers.clone()
    }
}

impl Drop for DiskHandle {
    // Runs before the lease is released, so no new handle can begin the same
    // layer while its leftover directory is still being deleted.
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            if let Err(e) = fs::remove_dir_all(&open.dir) {
                tracing::warn!(path = %open.dir.display(), error = %e,
                    "cannot delete an unsealed layer; the next start will");
            }
        }
    }
}

impl SessionStore for DiskHandle {
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
        let dir = self.dir.join(layer_dir_name(layer));
        // A leftover of an earlier attempt whose delete failed.
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("remove_dir_all", &dir)(e))
            }
            _ => {}
        }
        fs::create_dir(&dir).map_err(io_err("create_dir", &dir))?;
        let pages_path = dir.join("pages");
        let file = File::create(&pages_path).map_err(io_err("create", &pages_path))?;
        self.open = Some(OpenLayer {
            layer,
            vmas,
            ranges,
            dir,
            pages_path,
            file,
            len: 0,
            hasher: Xxh3::new(),
            runs: Vec::new(),
            pages: 0,
        });
        Ok(())
    }

    fn put(&mut self, batch: &DecodedBatch) -> Result<(), StoreError> {
        let ps = self.page_size();
        let open = self.open.as_mut().ok_or(StoreError::NoOpenLayer)?;
        let runs = batch_runs(batch, open.layer, ps, 0, open.len)?;
        // The batch's data runs are back to back, as they sit in the file.
        open.file
            .write_all_at(&batch.data, open.len)
            .map_err(io_err("write", &open.pages_path))?;
        open.len += batch.data.len() as u64;
        open.hasher.update(&batch.data);
        open.pages += batch.pages();
        open.runs.extend(runs);
        Ok(())
    }

    fn seal(&mut self) -> Result<LayerSummary, StoreError> {
        let ps = self.page_size();
        let open = self.open.as_mut().ok_or(StoreError::NoOpenLayer)?;
        sort_and_check(&mut open.runs, open.layer, ps)?;
        // A failed write may have left bytes past `len`; they are no page.
        open.file
            .set_len(open.len)
            .map_err(io_err("truncate", &open.pages_path))?;
        open.file
            .sync_all()
            .map_err(io_err("fsync", &open.pages_path))?;
        let checksum = open.hasher.digest();
        let index = pb::LayerIndex {
            layer: open.layer,
            vmas: open.vmas.clone(),
            runs: open
                .runs
                .iter()
                .map(|r| pb::IndexRun {
                    addr: r.addr,
                    pages: r.pages,
                    zero: r.data.is_none(),
                    offset: r.data.map_or(0, |l| l.off),
                })
                .collect(),
            pages: open.pages,
            pages_checksum: checksum,
            pages_len: open.len,
        };
        write_record(&open.dir, "index", Kind::Index, &index)?;
        sync_dir(&self.dir)?;
        let Some(open) = self.open.take() else {
            return Err(StoreError::NoOpenLayer);
        };
        let summary = LayerSummary {
            layer: open.layer,
            pages: open.pages,
            bytes: open.len,
        };
        self.lease.get().layers.push(Arc::new(DiskLayer {
            summary,
            vmas: open.vmas,
            ranges: open.ranges,
            runs: open.runs,
            pages: open.pages_path,
            pages_len: open.len,
            checksum,
        }));
        Ok(summary)
    }

    fn discard_open(&mut self) -> Result<(), StoreError> {
        if let Some(open) = self.open.take() {
            drop(open.file);
            fs::remove_dir_all(&open.dir).map_err(io_err("remove_dir_all", &open.dir))?;
        }
        Ok(())
    }

    fn put_state(&mut self, tree: &pb::ProcessTree) -> Result<(), StoreError> {
        write_record(&self.dir, "state", Kind::State, tree)?;
        self.lease.get().has_state = true;
        Ok(())
    }

    fn state(&self) -> Result<Option<pb::ProcessTree>, StoreError> {
        read_record(&self.dir.join("state"), Kind::State)
    }

    fn summary(&self) -> SessionSummary {
        let s = self.lease.get();
        session_summary(
            self.id,
            &s.meta,
            s.layers.iter().map(|l| l.summary),
            s.has_state,
        )
    }

    fn lookup(&self, addr: u64) -> Result<Option<Page>, StoreError> {
        let ps = self.page_size();
        let addr = addr & !(ps as u64 - 1);
        for l in self.snapshot().iter().rev() {
            // Pages under a mapping that went away in a newer round are void.
            if !l.ranges.contains(addr, addr + ps as u64) {
                return Ok(None);
            }
            let Some(r) = find_run(&l.runs, addr, ps) else {
                continue;
            };
            let Some(loc) = r.data else {
                return Ok(Some(Page::Zero));
            };
            let file = File::open(&l.pages).map_err(io_err("open", &l.pages))?;
            let mut page = vec![0u8; ps as usize];
            file.read_exact_at(&mut page, loc.off + (addr - r.addr))
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => {
                        corrupt(&l.pages, "shorter than its index says")
                    }
                    _ => io_err("read", &l.pages)(e),
                })?;
            return Ok(Some(Page::Data(Bytes::from(page))));
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
fn image_of(layers: &[Arc<DiskLayer>], ps: u32) -> Result<FlatImage, StoreError> {
    let Some(last) = layers.last() else {
        return Ok(empty_image(ps));
    };
    let runs: Vec<_> = layers.iter().map(|l| (&l.runs[..], &l.ranges)).collect();
    let pieces = flatten_pieces(&runs, ps);
    // Only the pages files the image takes data from are read, each once
    // and whole, so its checksum can be verified.
    let mut files: Vec<Option<Bytes>> = vec![None; layers.len()];
    for (li, _) in pieces.iter().filter_map(|p| p.data) {
        let li = li as usize;
        if let (Some(slot @ None), Some(l)) = (files.get_mut(li), layers.get(li)) {
            *slot = Some(read_pages(l)?);
        }
    }
    let runs = flat_runs(pieces, ps, |li, loc, len| {
        slice_buf(
            files.get(li as usize).and_then(Option::as_ref),
            loc.off,
            len,
        )
    })?;
    Ok(FlatImage {
        page_size: ps,
        vmas: last.vmas.clone(),
        runs,
    })
}

/// A layer's whole pages file, checked against its index.
fn read_pages(l: &DiskLayer) -> Result<Bytes, StoreError> {
    let path = &l.pages;
    let file = File::open(path).map_err(io_err("open", path))?;
    let on_disk = file.metadata().map_err(io_err("stat", path))?.len();
    let len = usize::try_from(l.pages_len)
        .ok()
        .filter(|_| on_disk == l.pages_len)
        .ok_or_else(|| {
            corrupt(
                path,
                format!("{on_disk} bytes, the index says {}", l.pages_len),
            )
        })?;
    let mut data = vec![0u8; len];
    // Reading a large image is bound by faulting in the fresh buffer, not
    // by the (cached) file, and that parallelizes: one reader per core
    // roughly halves a 1 GiB flatten on two cores. Small files stay on this
    // thread.
    let readers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let chunk = len.div_ceil(readers).max(PARALLEL_READ_MIN);
    let read = |buf: &mut [u8], off: usize| {
        file.read_exact_at(buf, off as u64)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => corrupt(path, "shrank while being read"),
                _ => io_err("read", path)(e),
            })
    };
    std::thread::scope(|s| {
        let mut chunks = data.chunks_mut(chunk).enumerate();
        let first = chunks.next();
        let others = chunks
            .map(|(i, buf)| {
                std::thread::Builder::new()
                    .name("ferry-read".into())
                    .spawn_scoped(s, move || read(buf, i * chunk))
                    .map_err(io_err("spawn reader for", path))
            })
            .collect::<Vec<_>>();
        if let Some((_, buf)) = first {
            read(buf, 0)?;
        }
        for h in others {
            h?.join()
                .unwrap_or_else(|_| Err(corrupt(path, "reader thread panicked")))?;
        }
        Ok::<(), StoreError>(())
    })?;
    let sum = xxh3_64(&data);
    if sum != l.checksum {
        return Err(corrupt(
            path,
            format!("checksum {sum:016x}, the index says {:016x}", l.checksum),
        ));
    }
    Ok(Bytes::from(data))
}

/// Writes a metadata file atomically and durably: temporary name, fsync,
/// rename, fsync of the directory.
fn write_record<M: Message>(dir: &Path, name: &str, kind: Kind, msg: &M) -> Result<(), StoreError> {
    let body = msg.encode_to_vec();
    let path = dir.join(name);
    if body.len() as u64 > MAX_BODY {
        // It could never be read back.
        return Err(corrupt(
            &path,
            format!("{} bytes exceed the {MAX_BODY}-byte limit", body.len()),
        ));
    }
    let buf = record_bytes(kind, &body);
    let tmp = dir.join(format!("{name}.tmp"));
    let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all_at(&buf, 0).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir)
}

/// A metadata file's bytes: header, then `body`.
fn record_bytes(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&(kind as u32).to_le_bytes());
    buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
    buf.extend_from_slice(&xxh3_64(body).to_le_bytes());
    buf.extend_from_slice(body);
    buf
}

/// What a checked header says of its body.
struct Header {
    len: u64,
    checksum: u64,
}

/// Checks a metadata file's header: magic, version, kind, and the body
/// length against its cap, before anything is allocated for the body.
fn parse_header(h: &[u8; HEADER_LEN], kind: Kind) -> Result<Header, String> {
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if &h[..8] != MAGIC {
        return Err("bad magic, not a ferry image file".into());
    }
    let version = u32_at(8);
    if version > FORMAT_VERSION {
        return Err(format!(
            "format version {version} is newer than this build's {FORMAT_VERSION}"
        ));
    }
    if version == 0 {
        return Err("format version 0 does not exist".into());
    }
    let got_kind = u32_at(12);
    if got_kind != kind as u32 {
        return Err(format!(
            "holds a {} record, expected {}",
            Kind::name(got_kind),
            Kind::name(kind as u32)
        ));
    }
    let len = u64_at(16);
    if len > MAX_BODY {
        return Err(format!(
            "body of {len} bytes exceeds the {MAX_BODY}-byte limit"
        ));
    }
    Ok(Header {
        len,
        checksum: u64_at(24),
    })
}

/// Checks a body (read up to one byte past its length, to notice trailing
/// garbage) against its header and decodes it.
fn decode_body<M: Message + Default>(body: &[u8], h: &Header) -> Result<M, String> {
    if body.len() as u64 != h.len {
        return Err(format!(
            "body is {} bytes, header says {}",
            body.len(),
            h.len
        ));
    }
    if xxh3_64(body) != h.checksum {
        return Err("checksum mismatch".into());
    }
    M::decode(body).map_err(|e| format!("undecodable body: {e}"))
}

/// Reads a metadata file; `None` if it does not exist.
fn read_record<M: Message + Default>(path: &Path, kind: Kind) -> Result<Option<M>, StoreError> {
    let mut file = match File::open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        r => r.map_err(io_err("open", path))?,
    };
    let mut h = [0u8; HEADER_LEN];
    file.read_exact(&mut h).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => corrupt(path, "truncated header"),
        _ => io_err("read", path)(e),
    })?;
    let h = parse_header(&h, kind).map_err(|e| corrupt(path, e))?;
    let mut body = Vec::with_capacity(h.len as usize);
    (&mut file)
        .take(h.len + 1)
        .read_to_end(&mut body)
        .map_err(io_err("read", path))?;
    decode_body(&body, &h)
        .map(Some)
        .map_err(|e| corrupt(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

#[doc(hidden)]
pub mod fuzzing;
