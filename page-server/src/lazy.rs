//! Post-copy on the destination: after the restored process was resumed
//! with some pages missing (registered with a userfaultfd in MISSING mode
//! by the restorer, see [`LazyProcess`]), serve its faults from the source
//! and place every page the source pushes, until none is missing.
//!
//! Three things run at once: an OS thread reads the userfaultfd (faults,
//! and the process dropping or unmapping memory itself), the session task
//! asks the source for each faulted page (`PageRequest`) and places what
//! arrives (`UFFDIO_COPY`), pages asked for first (they come on their own
//! data stream, batch layer [`LAZY_URGENT_LAYER`]). The missing set sits
//! behind one lock taken both to place pages and to read an event, so a
//! page the process dropped (`MADV_DONTNEED`) while its old contents were
//! in flight is never placed after the drop: the kernel holds the
//! `madvise` until its event is read, and the set forgets the range under
//! the same lock.
//!
//! The process cannot live without its missing pages: if the source goes
//! quiet, aborts, or the connection drops, the process is killed (before
//! the userfaultfd is closed, which would turn missing pages into zero
//! pages) and the reason logged; the source hears it in the `Abort`, if it
//! is still there to hear.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_proto::batch::DecodedBatch;
use ferry_proto::lazy::{latency_summary, LazySet};
use ferry_proto::pb;
use ferry_proto::session::control;
use ferry_proto::LAZY_URGENT_LAYER;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::server::{read_control, write_control, SessionError};

/// What the process did, as its userfaultfd tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyEvent {
    /// A thread waits for the page at `addr`.
    Fault(u64),
    /// The process dropped or unmapped `[start, end)` itself.
    Removed(u64, u64),
    /// The process moved memory (`mremap`), which post-copy cannot follow.
    Remapped { from: u64, to: u64, len: u64 },
}

/// A restored process running with pages missing (made by
/// [`crate::WarmRestore::finish_lazy`]). Methods may be called from two
/// threads at once. Dropping it before [`LazyProcess::complete`] must kill
/// the process (its memory is not whole).
pub trait LazyProcess: Send + Sync {
    fn pid(&self) -> i32;
    /// Places whole pages at `addr` and wakes their waiters; pages present
    /// already are skipped. Returns the bytes of `data` done: fewer than
    /// all while the process is changing its mappings (place the rest once
    /// the pending event was read).
    fn place(&self, addr: u64, data: &[u8]) -> Result<u64, String>;
    /// Resolves a fault on a page no data will come for (never in the
    /// image, or dropped by the process): a zero page, or a wake-up if the
    /// page is present by now.
    fn zero(&self, addr: u64) -> Result<(), String>;
    /// Waits up to `timeout_ms` for an event to be there to read.
    fn wait(&self, timeout_ms: i32) -> Result<(), String>;
    /// Reads the next event, if one is there (does not wait).
    fn read_event(&self) -> Result<Option<LazyEvent>, String>;
    /// Every page is in: dropping no longer kills.
    fn complete(&self);
    /// Kills the process and waits until it is gone.
    fn kill(&self);
}

#[derive(Debug, thiserror::Error)]
pub enum LazyServeError {
    #[error(
        "post-copy: the connection to the source is gone with {missing} pages still missing; \
         the restored process {pid} was killed (its memory is incomplete): {why}"
    )]
    Lost { pid: i32, missing: u64, why: String },
    #[error(
        "post-copy: the source aborted with {missing} pages still missing; the restored \
         process {pid} was killed: {why}"
    )]
    Aborted { pid: i32, missing: u64, why: String },
    #[error(
        "post-copy: process {pid} moved memory ({from:#x} to {to:#x}, {len} bytes) while \
         pages were missing, which post-copy cannot follow; it was killed"
    )]
    Remapped {
        pid: i32,
        from: u64,
        to: u64,
        len: u64,
    },
    #[error("post-copy: placing pages into process {pid} failed, it was killed: {why}")]
    Place { pid: i32, why: String },
}

/// How one post-copy ended well.
pub(crate) fn done_message(d: pb::PostCopyDone) -> pb::Control {
    control(pb::control::Msg::PostCopyDone(d))
}

pub(crate) struct Channels<'a> {
    pub data: &'a mut mpsc::Receiver<Result<DecodedBatch, SessionError>>,
    pub urgent: &'a mut mpsc::Receiver<Result<DecodedBatch, SessionError>>,
}

/// Serves the process until every page is in; returns the figures the
/// source gets in `PostCopyDone`. On any error the process is killed
/// before this returns.
pub(crate) async fn serve(
    lazy: Arc<dyn LazyProcess>,
    set: LazySet,
    send: &mut (impl AsyncWrite + Unpin),
    recv: &mut (impl AsyncRead + Unpin),
    cbuf: &mut BytesMut,
    ch: Channels<'_>,
    stall: Duration,
) -> Result<pb::PostCopyDone, LazyServeError> {
    let t0 = Instant::now();
    let pid = lazy.pid();
    let total = set.pages();
    let ps = set.page_size();
    let set = Arc::new(Mutex::new(set));
    let stop = Arc::new(AtomicBool::new(false));
    // Also when this future is dropped (the server shutting down): the
    // thread lets go of the process, whose last holder kills it.
    let _stop_on_drop = StopOnDrop(stop.clone());
    let (ev_tx, mut events) = mpsc::unbounded_channel();
    let reader = {
        let (lazy, set, stop) = (lazy.clone(), set.clone(), stop.clone());
        std::thread::Builder::new()
            .name("ferry-uffd".into())
            .spawn(move || read_events(lazy, set, stop, ev_tx))
    };
    let mut s = Serving {
        lazy: lazy.clone(),
        set,
        ps,
        pending: BTreeMap::new(),
        latencies: Vec::new(),
        faults: 0,
        local_faults: 0,
        zeros: vec![0u8; 256 * ps as usize],
    };
    let r = match reader {
        Ok(_) => s.run(send, recv, cbuf, ch, &mut events, stall).await,
        Err(e) => Err(LazyServeError::Place {
            pid,
            why: format!("no fault thread: {e}"),
        }),
    };
    stop.store(true, Ordering::Relaxed);
    match r {
        Ok(()) => {
            lazy.complete();
            let (median, p99, max) = latency_summary(std::mem::take(&mut s.latencies));
            let done = pb::PostCopyDone {
                pages: total,
                faults: s.faults,
                local_faults: s.local_faults,
                fault_median_us: median,
                fault_p99_us: p99,
                fault_max_us: max,
                elapsed_us: t0.elapsed().as_micros() as u64,
            };
            info!(
                pid,
                pages = total,
                faults = s.faults,
                local_faults = s.local_faults,
                fault_median_us = median,
                fault_p99_us = p99,
                elapsed_ms = t0.elapsed().as_millis() as u64,
                "post-copy complete: every page is in"
            );
            Ok(done)
        }
        Err(e) => {
            lazy.kill();
            warn!(pid, "{e}");
            Err(e)
        }
    }
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Serving {
    lazy: Arc<dyn LazyProcess>,
    set: Arc<Mutex<LazySet>>,
    ps: u64,
    /// Pages asked for and when their fault was read.
    pending: BTreeMap<u64, Instant>,
    latencies: Vec<u64>,
    faults: u64,
    local_faults: u64,
    zeros: Vec<u8>,
}

type Events = mpsc::UnboundedReceiver<Result<LazyEvent, String>>;

impl Serving {
    fn missing(&self) -> u64 {
        self.set.lock().map(|s| s.pages()).unwrap_or(0)
    }

    async fn run(
        &mut self,
        send: &mut (impl AsyncWrite + Unpin),
        recv: &mut (impl AsyncRead + Unpin),
        cbuf: &mut BytesMut,
        ch: Channels<'_>,
        events: &mut Events,
        stall: Duration,
    ) -> Result<(), LazyServeError> {
        let pid = self.lazy.pid();
        let lost = |s: &Self, why: String| LazyServeError::Lost {
            pid,
            missing: s.missing(),
            why,
        };
        let mut last_data = Instant::now();
        loop {
            if self.missing() == 0 {
                return Ok(());
            }
            tokio::select! {
                biased;
                ev = events.recv() => match ev {
                    Some(Ok(LazyEvent::Fault(addr))) => self.fault(addr, send).await.map_err(|e| lost(self, e.to_string()))?,
                    Some(Ok(LazyEvent::Remapped { from, to, len })) => {
                        return Err(LazyServeError::Remapped { pid, from, to, len })
                    }
                    Some(Ok(LazyEvent::Removed(a, b))) => debug!(a, b, "dropped by the process"),
                    Some(Err(why)) => return Err(LazyServeError::Place { pid, why }),
                    None => return Err(LazyServeError::Place { pid, why: "the fault thread ended".into() }),
                },
                b = ch.urgent.recv() => {
                    let b = b.ok_or_else(|| lost(self, "data streams closed".into()))?
                        .map_err(|e| lost(self, e.to_string()))?;
                    last_data = Instant::now();
                    self.place_all(&b).await?;
                }
                b = ch.data.recv() => {
                    let b = b.ok_or_else(|| lost(self, "data streams closed".into()))?
                        .map_err(|e| lost(self, e.to_string()))?;
                    last_data = Instant::now();
                    self.place_all(&b).await?;
                }
                msg = read_control(recv, cbuf) => match msg {
                    Ok(Some(pb::Control { msg: Some(pb::control::Msg::Abort(a)) })) => {
                        return Err(LazyServeError::Aborted { pid, missing: self.missing(), why: a.reason });
                    }
                    Ok(Some(m)) => {
                        return Err(lost(self, format!("unexpected control message {m:?}")));
                    }
                    Ok(None) => return Err(lost(self, "the source closed the control stream".into())),
                    Err(e) => return Err(lost(self, e.to_string())),
                },
                () = tokio::time::sleep_until((last_data + stall).into()) => {
                    return Err(lost(self, format!("no page arrived for {stall:?}")));
                }
            }
        }
    }

    async fn fault(
        &mut self,
        addr: u64,
        send: &mut (impl AsyncWrite + Unpin),
    ) -> Result<(), SessionError> {
        let page = addr - addr % self.ps;
        let missing = self.set.lock().map(|s| s.contains(page)).unwrap_or(false);
        if !missing {
            // Arrived meanwhile, or never had data: nothing to ask for.
            self.local_faults += 1;
            debug!(addr, "fault served locally");
            if let Err(e) = self.lazy.zero(page) {
                debug!(page, "zero page for a local fault: {e}");
            }
            return Ok(());
        }
        if self.pending.contains_key(&page) {
            return Ok(());
        }
        self.faults += 1;
        self.pending.insert(page, Instant::now());
        let req = control(pb::control::Msg::PageRequest(pb::PageRequest {
            addr: page,
            pages: 1,
        }));
        write_control(send, &req).await
    }

    /// Places a batch, waiting out the moments the process changes its
    /// mappings (the fault thread reads the event meanwhile, which needs
    /// the lock `place` lets go of).
    async fn place_all(&mut self, b: &DecodedBatch) -> Result<(), LazyServeError> {
        while !self.place(b)? {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        Ok(())
    }

    /// Places the parts of a batch that are still missing; false if it
    /// stopped early (see [`LazyProcess::place`]).
    fn place(&mut self, b: &DecodedBatch) -> Result<bool, LazyServeError> {
        let pid = self.lazy.pid();
        let ps = self.ps;
        let mut set = self.set.lock().map_err(|_| LazyServeError::Place {
            pid,
            why: "poisoned".into(),
        })?;
        for (run, data) in b.iter_runs(ps as u32) {
            let end = run.addr.saturating_add(run.pages as u64 * ps);
            let parts: Vec<(u64, u64)> = set
                .ranges()
                .skip_while(|&(_, e)| e <= run.addr)
                .take_while(|&(s, _)| s < end)
                .map(|(s, e)| (s.max(run.addr), e.min(end)))
                .collect();
            for (s, e) in parts {
                // Zero runs in slices of the zero buffer.
                let step = if data.is_some() {
                    e - s
                } else {
                    self.zeros.len() as u64
                };
                let mut at = s;
                while at < e {
                    let n = (e - at).min(step);
                    let bytes = match &data {
                        Some(d) => &d[(at - run.addr) as usize..(at + n - run.addr) as usize],
                        None => &self.zeros[..n as usize],
                    };
                    let done = crate::server::blocking(|| self.lazy.place(at, bytes))
                        .map_err(|why| LazyServeError::Place { pid, why })?;
                    set.remove(at, at + done);
                    let now = Instant::now();
                    let arrived: Vec<u64> =
                        self.pending.range(at..at + done).map(|(&p, _)| p).collect();
                    for p in arrived {
                        if let Some(t) = self.pending.remove(&p) {
                            self.latencies.push((now - t).as_micros() as u64);
                        }
                    }
                    if done < n {
                        return Ok(false);
                    }
                    at += n;
                }
            }
        }
        if b.layer == LAZY_URGENT_LAYER {
            debug!(seq = b.seq, "requested pages placed");
        }
        Ok(true)
    }
}

/// The fault thread: reads the userfaultfd until told to stop. Removals
/// are applied to the set right here, under its lock (see the module
/// documentation); the rest goes to the session task.
fn read_events(
    lazy: Arc<dyn LazyProcess>,
    set: Arc<Mutex<LazySet>>,
    stop: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Result<LazyEvent, String>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let guard = match set.lock() {
            Ok(g) => g,
            Err(_) => return,
        };
        // Waiting with the lock held would stall placement: read only what
        // is there, and wait outside the lock.
        let ev = lazy.read_event();
        let ev = match ev {
            Ok(Some(LazyEvent::Removed(s, e))) => {
                let mut guard = guard;
                guard.remove(s, e);
                drop(guard);
                Ok(Some(LazyEvent::Removed(s, e)))
            }
            other => {
                drop(guard);
                other
            }
        };
        match ev {
            Ok(Some(e)) => {
                if tx.send(Ok(e)).is_err() {
                    return;
                }
            }
            Ok(None) => {
                // Wait for the next event without holding the lock.
                if let Err(e) = lazy.wait(20) {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}
