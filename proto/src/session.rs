//! The session state machines: [`Sender`] on the source, [`Receiver`] on the
//! destination. Like `quinn-proto`, they do no I/O and read no clock: the
//! drivers (QUIC client in `ferry`, page server) feed them what arrived and
//! carry out what they ask, so every ordering the network can produce is
//! tested here, in memory.
//!
//! ```text
//!  source (Sender)                                   destination (Receiver)
//!   │ Hello{version, session, page_size, arch, resume} ─▶│ check version, page size
//!   │                                                    │ create / reopen session
//!   │◀─ Welcome{version, next_layer} ────────────────────│
//!   │ LayerBegin{k, vmas} ─▶ (control)                   │
//!   │ BatchHeader{k, seq}+payload ═▶ (any data stream,   │ validate runs against
//!   │   any order; may overtake LayerBegin)              │   layer k's mappings, store
//!   │ LayerEnd{k, batches, pages, digest} ─▶             │ all batches in, digest equal
//!   │◀─ LayerSealed{k} ──────────────────────────────────│   → durable, then sealed
//!   │   ... rounds k+1, k+2 ... (LayerBegin waits for the│
//!   │   previous LayerSealed)                            │
//!   │ State{process tree} ─▶                             │ keep it
//!   │ Commit{restore} ─▶                                 │ store, or restore
//!   │◀─ Stored{..} | Restored{pid} | Failed{reason} ─────│
//!   │ Abort{reason} ◀─▶ either side, any time            │ drop the unsealed layer
//! ```
//!
//! With the feature `ready-go` in both Hello and Welcome (the destination's
//! driver opts in with [`Receiver::with_ready_go`]), a `Commit{restore}`
//! ends in two phases, so that a source that never hears `Restored` can
//! still know whether a copy runs:
//!
//! ```text
//!   │ Commit{restore} ─▶                                 │ restore, every thread
//!   │                                                    │   stopped, final state set
//!   │◀─ Ready{pid} | Failed{reason} ─────────────────────│
//!   │ Go ─▶  (or Abort: the prepared process is killed)  │ let it run
//!   │◀─ Restored{pid} | Failed{reason} ──────────────────│
//!
//!   later, a new connection, instead of Hello:
//!   │ Query{session} ─▶                                  │ look up its fate
//!   │◀─ Outcome{unknown | pending | resumed pid | abandoned}
//! ```
//!
//! The last round may be pipelined: `LayerEnd`, `State` and `Commit` can go
//! out without waiting for `LayerSealed`, which saves round trips while the
//! source is frozen. The control stream is ordered, so the receiver still
//! sees them in order, and its driver finishes each action (a seal, a store
//! open) before it feeds the next input: from the receiver's view every
//! action completes between two inputs.
//!
//! Receiver states: `AwaitHello → Opening → Ready ⇄ (layer open) → Committing
//! [→ Prepared → Releasing] → Done`, or `AwaitHello → Querying → Done`, with
//! `Failed` reachable from all of them. Any input that does not
//! fit the state is a [`ProtocolError`] that ends the session, never a panic.

use std::collections::{HashSet, VecDeque};

use crate::batch::{DecodedBatch, LayerDigest};
use crate::lazy::{LazyError, LazySet};
use crate::pb::{self, control::Msg};
use crate::vma::{RangeSet, VmaError};
use crate::{valid_page_size, SessionId, FEATURE_POST_COPY, FEATURE_READY_GO, PROTOCOL_VERSION};

/// Most batches in one layer (at 1024 pages each, 4 TiB of 4 KiB pages).
pub const MAX_BATCHES_PER_LAYER: u32 = 1 << 20;
/// Bytes of batches the receiver holds for a layer whose `LayerBegin` has
/// not arrived yet (data streams may overtake the control stream).
pub const DEFAULT_MAX_EARLY_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("peer speaks protocol version {theirs}, this build speaks {ours}")]
    WrongVersion { ours: u32, theirs: u32 },
    #[error("bad hello: {0}")]
    BadHello(String),
    #[error("unexpected {msg} while {state}")]
    Unexpected {
        state: &'static str,
        msg: &'static str,
    },
    #[error("layer {got} out of order: expected layer {expected}")]
    LayerOrder { got: u32, expected: u32 },
    #[error("batch for unknown layer {layer}")]
    UnknownLayer { layer: u32 },
    #[error("batch for layer {layer}, which is already sealed")]
    SealedLayer { layer: u32 },
    #[error("layer {layer}: pages {start:#x}-{end:#x} lie outside the layer's mappings")]
    OutsideMappings { layer: u32, start: u64, end: u64 },
    #[error("layer {layer}: batch {seq} arrived twice")]
    DuplicateBatch { layer: u32, seq: u32 },
    #[error("layer {layer}: batch {seq} but the layer has {batches} batches")]
    SeqOutOfRange { layer: u32, seq: u32, batches: u32 },
    #[error("layer {layer}: {batches} batches exceed the limit of {MAX_BATCHES_PER_LAYER}")]
    TooManyBatches { layer: u32, batches: u32 },
    #[error("layer {layer}: {what} differs: sender says {sent}, received {got}")]
    Mismatch {
        layer: u32,
        what: &'static str,
        sent: String,
        got: String,
    },
    #[error("more than {limit} bytes of batches arrived before their layer began")]
    EarlyOverflow { limit: usize },
    #[error("layer {layer}: {source}")]
    Vmas {
        layer: u32,
        #[source]
        source: VmaError,
    },
    #[error("commit with no sealed layer")]
    NothingToCommit,
    #[error("commit asks for a restore but no process state was sent")]
    NoState,
    #[error("the destination said Ready for pid {ready} but Restored pid {restored}")]
    PidChanged { ready: i32, restored: i32 },
    #[error("bad Outcome: {0}")]
    BadOutcome(String),
    #[error("{0}")]
    Misuse(&'static str),
    #[error("the page server does not offer {feature} (an older version, or one that cannot do it: {why})")]
    MissingFeature {
        feature: &'static str,
        why: &'static str,
    },
    #[error("{0}")]
    Lazy(#[from] LazyError),
    #[error("post-copy range {start:#x}-{end:#x} lies outside the last layer's mappings")]
    LazyOutside { start: u64, end: u64 },
}

fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello(_) => "Hello",
        Msg::Welcome(_) => "Welcome",
        Msg::LayerBegin(_) => "LayerBegin",
        Msg::LayerEnd(_) => "LayerEnd",
        Msg::LayerSealed(_) => "LayerSealed",
        Msg::State(_) => "State",
        Msg::Commit(_) => "Commit",
        Msg::Stored(_) => "Stored",
        Msg::Restored(_) => "Restored",
        Msg::Failed(_) => "Failed",
        Msg::Abort(_) => "Abort",
        Msg::PostCopy(_) => "PostCopy",
        Msg::PageRequest(_) => "PageRequest",
        Msg::PostCopyDone(_) => "PostCopyDone",
        Msg::Ready(_) => "Ready",
        Msg::Go(_) => "Go",
        Msg::Query(_) => "Query",
        Msg::Outcome(_) => "Outcome",
    }
}

pub fn control(msg: Msg) -> pb::Control {
    pb::Control { msg: Some(msg) }
}

// ------------------------------------------------------------------ receiver

/// What the receiver asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this on the control stream.
    Send(pb::Control),
    /// Create the session (or reopen it, with `hello.resume`), then call
    /// [`Receiver::session_ready`] with its sealed layer count, or
    /// [`Receiver::fail`].
    OpenSession {
        id: SessionId,
        hello: pb::Hello,
    },
    BeginLayer {
        layer: u32,
        vmas: Vec<pb::Vma>,
    },
    /// Store a batch that was checked against its layer.
    Store(DecodedBatch),
    /// Every batch of the layer arrived and its digest matches: make it
    /// durable, then call [`Receiver::sealed`].
    Seal {
        layer: u32,
        pages: u64,
    },
    StoreState(pb::ProcessTree),
    /// Keep or restore the image, then call [`Receiver::finished`].
    Commit {
        restore: bool,
    },
    /// The source will leave these ranges out of the image and serve them
    /// after the resume (post-copy); they were checked against the last
    /// layer's mappings. Comes before [`Action::Commit`].
    PostCopy {
        ranges: Vec<pb::LazyRange>,
    },
    /// The source gave up: drop the open layer. The session is over.
    Aborted {
        reason: String,
    },
    /// Two-phase: the source said `Go`. Let the prepared process run, then
    /// call [`Receiver::finished`] with `Restored{pid}` (or, if releasing
    /// failed and the process was killed, `Failed`).
    Release {
        pid: i32,
    },
    /// Two-phase: the source gave up after `Ready`. Kill and reap the
    /// prepared process; the session is over.
    Abandon {
        pid: i32,
        reason: String,
    },
    /// A `Query`: look up the session's fate and call [`Receiver::answer`].
    Lookup {
        id: SessionId,
    },
}

/// What became of a session, as the page server remembers it (the answer
/// to `Query`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Never seen, or forgotten.
    Unknown,
    /// Prepared and waiting for `Go`, or being released: not decided yet.
    Pending,
    /// The restored process was let run.
    Resumed { pid: i32 },
    /// No copy runs: the restore failed or the prepared process was killed.
    Abandoned { reason: String },
}

impl Fate {
    pub fn to_pb(&self) -> pb::Outcome {
        use pb::SessionFate as F;
        let (fate, pid, reason) = match self {
            Fate::Unknown => (F::Unknown, 0, String::new()),
            Fate::Pending => (F::Pending, 0, String::new()),
            Fate::Resumed { pid } => (F::Resumed, *pid, String::new()),
            Fate::Abandoned { reason } => (F::Abandoned, 0, reason.clone()),
        };
        pb::Outcome {
            fate: fate as i32,
            pid,
            reason,
            uptime_ms: 0,
        }
    }

    /// Reads an `Outcome`; an unspecified or unknown fate, or a resumed
    /// one with no pid, is refused rather than guessed at.
    pub fn from_pb(o: &pb::Outcome) -> Result<Self, ProtocolError> {
        use pb::SessionFate as F;
        match F::try_from(o.fate) {
            Ok(F::Unknown) => Ok(Fate::Unknown),
            Ok(F::Pending) => Ok(Fate::Pending),
            Ok(F::Resumed) if o.pid > 0 => Ok(Fate::Resumed { pid: o.pid }),
            Ok(F::Resumed) => Err(ProtocolError::BadOutcome(format!(
                "resumed with pid {}",
                o.pid
            ))),
            Ok(F::Abandoned) => Ok(Fate::Abandoned {
                reason: o.reason.clone(),
            }),
            Ok(F::Unspecified) | Err(_) => Err(ProtocolError::BadOutcome(format!(
                "fate {} is not one this build knows",
                o.fate
            ))),
        }
    }
}

/// The first message of a connection that asks for a session's fate.
pub fn query(session: SessionId) -> pb::Control {
    control(Msg::Query(pb::Query {
        session: session.0.to_vec().into(),
    }))
}

/// Reads the answer to [`query`].
pub fn read_outcome(msg: pb::Control) -> Result<Fate, ProtocolError> {
    match msg.msg {
        Some(Msg::Outcome(o)) => Fate::from_pb(&o),
        Some(Msg::Abort(a)) => Err(ProtocolError::BadOutcome(format!(
            "the page server refused the query: {}",
            a.reason
        ))),
        Some(m) => Err(ProtocolError::Unexpected {
            state: "awaiting Outcome",
            msg: msg_name(&m),
        }),
        None => Err(ProtocolError::Misuse("empty control message")),
    }
}

/// How a commit ended, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Stored {
        layers: u32,
        pages: u64,
    },
    /// `pid` as the page server sees it; with `--keep-pids` also the pid
    /// inside the new pid namespace and that namespace's inode (else 0).
    Restored {
        pid: i32,
        ns_pid: i32,
        pid_ns: u64,
    },
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RState {
    AwaitHello,
    Opening,
    Ready,
    Sealing,
    Committing,
    Prepared,
    Releasing,
    Querying,
    Done,
    Failed,
}

impl RState {
    fn name(self) -> &'static str {
        match self {
            RState::AwaitHello => "awaiting Hello",
            RState::Opening => "opening the session",
            RState::Ready => "ready",
            RState::Sealing => "sealing a layer",
            RState::Committing => "committing",
            RState::Prepared => "waiting for Go",
            RState::Releasing => "releasing the process",
            RState::Querying => "answering a query",
            RState::Done => "done",
            RState::Failed => "failed",
        }
    }
}

struct OpenLayer {
    layer: u32,
    ranges: RangeSet,
    seen: HashSet<u32>,
    max_seq: Option<u32>,
    pages: u64,
    digest: LayerDigest,
    end: Option<pb::LayerEnd>,
}

/// The destination's half of a session.
pub struct Receiver {
    state: RState,
    page_size: u32,
    session: Option<SessionId>,
    next_layer: u32,
    open: Option<OpenLayer>,
    early: Vec<DecodedBatch>,
    early_bytes: usize,
    max_early_bytes: usize,
    has_state: bool,
    pending_commit: Option<bool>,
    actions: VecDeque<Action>,
    /// The mappings of the newest layer begun.
    last_ranges: Option<RangeSet>,
    /// The driver can do the two-phase end and answer queries.
    can_ready_go: bool,
    /// ... and this session's Hello asked for it.
    ready_go: bool,
    /// The commit under way restores.
    restoring: bool,
    prepared_pid: i32,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EARLY_BYTES)
    }
}

impl Receiver {
    pub fn new(max_early_bytes: usize) -> Self {
        Self {
            state: RState::AwaitHello,
            page_size: 0,
            session: None,
            next_layer: 0,
            open: None,
            early: Vec::new(),
            early_bytes: 0,
            max_early_bytes,
            has_state: false,
            pending_commit: None,
            actions: VecDeque::new(),
            last_ranges: None,
            can_ready_go: false,
            ready_go: false,
            restoring: false,
            prepared_pid: 0,
        }
    }

    /// The driver carries out [`Action::Release`], [`Action::Abandon`] and
    /// [`Action::Lookup`]: the receiver then grants `ready-go` to a source
    /// that asks and answers `Query`. Without it a `Query` is refused and
    /// the commit ends in one phase, as with an older page server.
    pub fn with_ready_go(mut self) -> Self {
        self.can_ready_go = true;
        self
    }

    /// This session ends in two phases (negotiated at the handshake).
    pub fn ready_go(&self) -> bool {
        self.ready_go
    }

    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// True once the session has ended, well or not.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, RState::Done | RState::Failed)
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Feeds one message from the control stream.
    pub fn handle_control(&mut self, msg: pb::Control) -> Result<(), ProtocolError> {
        let r = self.on_control(msg);
        if r.is_err() {
            self.state = RState::Failed;
        }
        r
    }

    /// Feeds one decoded batch from any data stream.
    pub fn handle_batch(&mut self, batch: DecodedBatch) -> Result<(), ProtocolError> {
        let r = self.on_batch(batch);
        if r.is_err() {
            self.state = RState::Failed;
        }
        r
    }

    fn unexpected(&self, m: &Msg) -> ProtocolError {
        ProtocolError::Unexpected {
            state: self.state.name(),
            msg: msg_name(m),
        }
    }

    fn on_control(&mut self, msg: pb::Control) -> Result<(), ProtocolError> {
        let Some(m) = msg.msg else {
            return Err(ProtocolError::Misuse("empty control message"));
        };
        match (self.state, m) {
            (RState::AwaitHello, Msg::Hello(h)) => {
                if h.version != PROTOCOL_VERSION {
                    return Err(ProtocolError::WrongVersion {
                        ours: PROTOCOL_VERSION,
                        theirs: h.version,
                    });
                }
                let id = SessionId::from_slice(&h.session).ok_or_else(|| {
                    ProtocolError::BadHello(format!(
                        "session id must be 16 bytes, got {}",
                        h.session.len()
                    ))
                })?;
                if !valid_page_size(h.page_size) {
                    return Err(ProtocolError::BadHello(format!(
                        "page size {} is not supported",
                        h.page_size
                    )));
                }
                self.page_size = h.page_size;
                self.session = Some(id);
                self.ready_go =
                    self.can_ready_go && h.features.iter().any(|f| f == FEATURE_READY_GO);
                self.state = RState::Opening;
                self.actions.push_back(Action::OpenSession { id, hello: h });
                Ok(())
            }
            (RState::AwaitHello, Msg::Query(q)) if self.can_ready_go => {
                let id = SessionId::from_slice(&q.session).ok_or_else(|| {
                    ProtocolError::BadHello(format!(
                        "session id must be 16 bytes, got {}",
                        q.session.len()
                    ))
                })?;
                self.session = Some(id);
                self.state = RState::Querying;
                self.actions.push_back(Action::Lookup { id });
                Ok(())
            }
            (RState::Prepared, Msg::Go(_)) => {
                self.state = RState::Releasing;
                self.actions.push_back(Action::Release {
                    pid: self.prepared_pid,
                });
                Ok(())
            }
            (RState::Prepared, Msg::Abort(a)) => {
                self.state = RState::Done;
                self.actions.push_back(Action::Abandon {
                    pid: self.prepared_pid,
                    reason: a.reason,
                });
                Ok(())
            }
            (RState::Ready | RState::Committing, Msg::Abort(a)) => {
                self.state = RState::Done;
                self.open = None;
                self.actions.push_back(Action::Aborted { reason: a.reason });
                Ok(())
            }
            (RState::Ready, Msg::LayerBegin(b)) => self.begin_layer(b),
            (RState::Ready, Msg::LayerEnd(e)) => self.end_layer(e),
            (RState::Ready, Msg::State(s)) => {
                if self.layer_open() {
                    return Err(ProtocolError::Unexpected {
                        state: "a layer is open",
                        msg: "State",
                    });
                }
                self.has_state = true;
                self.actions
                    .push_back(Action::StoreState(s.tree.unwrap_or_default()));
                Ok(())
            }
            (RState::Ready, Msg::PostCopy(p)) => {
                if self.layer_open() {
                    return Err(ProtocolError::Unexpected {
                        state: "a layer is open",
                        msg: "PostCopy",
                    });
                }
                LazySet::new(&p.ranges, self.page_size)?;
                let within = self.last_ranges.as_ref();
                if let Some(r) = p
                    .ranges
                    .iter()
                    .find(|r| !within.is_some_and(|w| w.contains(r.start, r.end)))
                {
                    return Err(ProtocolError::LazyOutside {
                        start: r.start,
                        end: r.end,
                    });
                }
                self.actions
                    .push_back(Action::PostCopy { ranges: p.ranges });
                Ok(())
            }
            (RState::Ready, Msg::Commit(c)) => {
                if self.layer_open() || self.pending_commit.is_some() {
                    return Err(ProtocolError::Unexpected {
                        state: "a layer is open",
                        msg: "Commit",
                    });
                }
                if self.next_layer == 0 && self.open.is_none() {
                    return Err(ProtocolError::NothingToCommit);
                }
                if c.restore && !self.has_state {
                    return Err(ProtocolError::NoState);
                }
                if self.open.is_some() {
                    // The last layer ended but batches are still in flight:
                    // commit once it is sealed.
                    self.pending_commit = Some(c.restore);
                } else {
                    self.commit(c.restore);
                }
                Ok(())
            }
            (_, m) => Err(self.unexpected(&m)),
        }
    }

    /// A layer has begun and its `LayerEnd` has not arrived yet.
    fn layer_open(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.end.is_none())
    }

    fn commit(&mut self, restore: bool) {
        self.state = RState::Committing;
        self.restoring = restore;
        self.actions.push_back(Action::Commit { restore });
    }

    fn begin_layer(&mut self, b: pb::LayerBegin) -> Result<(), ProtocolError> {
        if self.open.is_some() || b.layer != self.next_layer {
            return Err(ProtocolError::LayerOrder {
                got: b.layer,
                expected: self.next_layer,
            });
        }
        let ranges =
            RangeSet::from_vmas(&b.vmas, self.page_size).map_err(|source| ProtocolError::Vmas {
                layer: b.layer,
                source,
            })?;
        self.last_ranges = Some(ranges.clone());
        self.open = Some(OpenLayer {
            layer: b.layer,
            ranges,
            seen: HashSet::new(),
            max_seq: None,
            pages: 0,
            digest: LayerDigest::default(),
            end: None,
        });
        self.actions.push_back(Action::BeginLayer {
            layer: b.layer,
            vmas: b.vmas,
        });
        self.early_bytes = 0;
        for batch in std::mem::take(&mut self.early) {
            self.accept(batch)?;
        }
        Ok(())
    }

    fn end_layer(&mut self, e: pb::LayerEnd) -> Result<(), ProtocolError> {
        let Some(open) = self
            .open
            .as_mut()
            .filter(|o| o.layer == e.layer && o.end.is_none())
        else {
            return Err(ProtocolError::LayerOrder {
                got: e.layer,
                expected: self.next_layer,
            });
        };
        if e.batches > MAX_BATCHES_PER_LAYER {
            return Err(ProtocolError::TooManyBatches {
                layer: e.layer,
                batches: e.batches,
            });
        }
        if let Some(max) = open.max_seq.filter(|&m| m >= e.batches) {
            return Err(ProtocolError::SeqOutOfRange {
                layer: e.layer,
                seq: max,
                batches: e.batches,
            });
        }
        open.end = Some(e);
        self.maybe_seal()
    }

    fn on_batch(&mut self, b: DecodedBatch) -> Result<(), ProtocolError> {
        match self.state {
            RState::Ready => {}
            RState::AwaitHello | RState::Opening => {
                return Err(ProtocolError::Unexpected {
                    state: self.state.name(),
                    msg: "page batch",
                })
            }
            _ => {
                return Err(ProtocolError::Unexpected {
                    state: self.state.name(),
                    msg: "page batch",
                })
            }
        }
        match &self.open {
            Some(o) if o.layer == b.layer => {
                self.accept(b)?;
                self.maybe_seal()
            }
            None if b.layer == self.next_layer => {
                let cost = b.data.len() + b.runs.len() * 16 + 64;
                if self.early_bytes + cost > self.max_early_bytes {
                    return Err(ProtocolError::EarlyOverflow {
                        limit: self.max_early_bytes,
                    });
                }
                self.early_bytes += cost;
                self.early.push(b);
                Ok(())
            }
            _ if b.layer < self.next_layer => Err(ProtocolError::SealedLayer { layer: b.layer }),
            _ => Err(ProtocolError::UnknownLayer { layer: b.layer }),
        }
    }

    /// Checks a batch of the open layer and passes it to the store.
    fn accept(&mut self, b: DecodedBatch) -> Result<(), ProtocolError> {
        let ps = self.page_size;
        let open = self
            .open
            .as_mut()
            .ok_or(ProtocolError::Misuse("no open layer"))?;
        if let Some(e) = &open.end {
            if b.seq >= e.batches {
                return Err(ProtocolError::SeqOutOfRange {
                    layer: b.layer,
                    seq: b.seq,
                    batches: e.batches,
                });
            }
        }
        if b.seq >= MAX_BATCHES_PER_LAYER {
            return Err(ProtocolError::TooManyBatches {
                layer: b.layer,
                batches: b.seq,
            });
        }
        for r in &b.runs {
            let end = r.end(ps);
            if !open.ranges.contains(r.addr, end) {
                return Err(ProtocolError::OutsideMappings {
                    layer: b.layer,
                    start: r.addr,
                    end,
                });
            }
        }
        if !open.seen.insert(b.seq) {
            return Err(ProtocolError::DuplicateBatch {
                layer: b.layer,
                seq: b.seq,
            });
        }
        open.max_seq = open.max_seq.max(Some(b.seq));
        open.pages += b.pages();
        open.digest.add(b.seq, b.digest);
        self.actions.push_back(Action::Store(b));
        Ok(())
    }

    fn maybe_seal(&mut self) -> Result<(), ProtocolError> {
        let Some(open) = &self.open else {
            return Ok(());
        };
        let Some(end) = &open.end else {
            return Ok(());
        };
        if open.seen.len() < end.batches as usize {
            return Ok(());
        }
        if open.pages != end.pages {
            return Err(ProtocolError::Mismatch {
                layer: open.layer,
                what: "page count",
                sent: end.pages.to_string(),
                got: open.pages.to_string(),
            });
        }
        let digest = open.digest.finish();
        if end.digest[..] != digest[..] {
            return Err(ProtocolError::Mismatch {
                layer: open.layer,
                what: "digest",
                sent: hex(&end.digest),
                got: hex(&digest),
            });
        }
        self.actions.push_back(Action::Seal {
            layer: open.layer,
            pages: open.pages,
        });
        self.state = RState::Sealing;
        Ok(())
    }

    /// The store has the session; `next_layer` is its sealed layer count.
    pub fn session_ready(&mut self, next_layer: u32) -> Result<(), ProtocolError> {
        self.session_ready_with(next_layer, Vec::new())
    }

    /// [`Receiver::session_ready`], offering `features` (those of the
    /// source's `Hello` this destination can do) in `Welcome`.
    pub fn session_ready_with(
        &mut self,
        next_layer: u32,
        features: Vec<String>,
    ) -> Result<(), ProtocolError> {
        if self.state != RState::Opening {
            return Err(ProtocolError::Misuse("session_ready outside Opening"));
        }
        self.next_layer = next_layer;
        self.state = RState::Ready;
        self.actions
            .push_back(Action::Send(control(Msg::Welcome(pb::Welcome {
                version: PROTOCOL_VERSION,
                next_layer,
                features: {
                    let mut features = features;
                    if self.ready_go && !features.iter().any(|f| f == FEATURE_READY_GO) {
                        features.push(FEATURE_READY_GO.into());
                    }
                    features
                },
            }))));
        Ok(())
    }

    /// The layer asked for by [`Action::Seal`] is durable.
    pub fn sealed(&mut self, layer: u32) -> Result<(), ProtocolError> {
        let open = self
            .open
            .take()
            .filter(|o| o.layer == layer && self.state == RState::Sealing)
            .ok_or(ProtocolError::Misuse(
                "sealed() for a layer not being sealed",
            ))?;
        self.next_layer = layer + 1;
        self.state = RState::Ready;
        self.actions
            .push_back(Action::Send(control(Msg::LayerSealed(pb::LayerSealed {
                layer,
                pages: open.pages,
            }))));
        if let Some(restore) = self.pending_commit.take() {
            self.commit(restore);
        }
        Ok(())
    }

    /// Two-phase: the restore asked for by [`Action::Commit`] is done and
    /// the process `pid` is held stopped with its final state; tells the
    /// source `Ready` and waits for its `Go` (the driver bounds the wait).
    pub fn prepared(&mut self, pid: i32) -> Result<(), ProtocolError> {
        if self.state != RState::Committing || !self.ready_go || !self.restoring {
            return Err(ProtocolError::Misuse(
                "prepared() outside a two-phase restoring commit",
            ));
        }
        self.state = RState::Prepared;
        self.prepared_pid = pid;
        self.actions
            .push_back(Action::Send(control(Msg::Ready(pb::Ready { pid }))));
        Ok(())
    }

    /// The pid held between [`Receiver::prepared`] and the end: the process
    /// the driver must kill if the session fails or times out now.
    pub fn prepared_pid(&self) -> Option<i32> {
        matches!(self.state, RState::Prepared | RState::Releasing).then_some(self.prepared_pid)
    }

    /// The commit asked for by [`Action::Commit`] is over; in a two-phase
    /// restore, a success is only reported after [`Action::Release`].
    pub fn finished(&mut self, outcome: Outcome) -> Result<(), ProtocolError> {
        let two_phase = self.ready_go && self.restoring;
        match (self.state, &outcome) {
            (RState::Committing, Outcome::Restored { .. }) if two_phase => {
                return Err(ProtocolError::Misuse(
                    "finished(Restored) before the source said Go",
                ))
            }
            (RState::Committing, _) => {}
            (RState::Releasing, Outcome::Restored { pid, .. }) if *pid == self.prepared_pid => {}
            (RState::Releasing, Outcome::Failed { .. }) => {}
            _ => return Err(ProtocolError::Misuse("finished() outside Committing")),
        }
        self.state = RState::Done;
        let m = match outcome {
            Outcome::Stored { layers, pages } => Msg::Stored(pb::Stored { layers, pages }),
            Outcome::Restored {
                pid,
                ns_pid,
                pid_ns,
            } => Msg::Restored(pb::Restored {
                pid,
                ns_pid,
                pid_ns,
            }),
            Outcome::Failed { reason } => Msg::Failed(pb::Failed { reason }),
        };
        self.actions.push_back(Action::Send(control(m)));
        Ok(())
    }

    /// Answers the `Query` asked for by [`Action::Lookup`]; ends the
    /// connection's business.
    pub fn answer(&mut self, fate: &Fate) -> Result<(), ProtocolError> {
        self.answer_with(fate, "", 0)
    }

    /// [`Receiver::answer`], with what the page server can add: a `note`
    /// on an unknown session and its uptime (see `Outcome` in the schema).
    pub fn answer_with(
        &mut self,
        fate: &Fate,
        note: &str,
        uptime_ms: u64,
    ) -> Result<(), ProtocolError> {
        if self.state != RState::Querying {
            return Err(ProtocolError::Misuse("answer() with no Query"));
        }
        self.state = RState::Done;
        let mut o = fate.to_pb();
        if o.reason.is_empty() {
            o.reason = note.into();
        }
        o.uptime_ms = uptime_ms;
        self.actions
            .push_back(Action::Send(control(Msg::Outcome(o))));
        Ok(())
    }

    /// Ends the session because of `reason` (a protocol error or a failure
    /// of the driver); returns the `Abort` to send to the peer.
    pub fn fail(&mut self, reason: impl std::fmt::Display) -> pb::Control {
        self.state = RState::Failed;
        self.open = None;
        self.early.clear();
        control(Msg::Abort(pb::Abort {
            reason: reason.to_string(),
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ------------------------------------------------------------------ sender

/// What the source says about itself in `Hello`.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub session: SessionId,
    pub page_size: u32,
    pub arch: String,
    pub kernel: String,
    pub label: String,
    pub resume: bool,
    /// What the source will ask of the destination, e.g.
    /// [`crate::FEATURE_RESTORE`]: a destination that cannot do it refuses
    /// at the handshake instead of at the commit.
    pub features: Vec<String>,
    /// The credentials of the threads to migrate, for the destination's
    /// pre-flight (Hello.creds); empty when unknown.
    pub creds: Vec<pb::Credentials>,
    /// With [`crate::FEATURE_KEEP_PIDS`]: the root's pid in its own pid
    /// namespace (Hello.keep_pids_root); 0 when not given.
    pub keep_pids_root: u32,
}

/// What the destination told the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Welcomed {
        next_layer: u32,
    },
    Sealed {
        layer: u32,
        pages: u64,
    },
    Stored {
        layers: u32,
        pages: u64,
    },
    /// See [`Outcome::Restored`].
    Restored {
        pid: i32,
        ns_pid: i32,
        pid_ns: u64,
    },
    Failed {
        reason: String,
    },
    Aborted {
        reason: String,
    },
    /// Two-phase: the destination holds the process `pid` restored and
    /// stopped; the source must answer with [`Sender::go`] or abort.
    Ready {
        pid: i32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SState {
    New,
    AwaitWelcome,
    Idle,
    Open,
    Committing,
    Prepared,
    Releasing,
    Done,
}

/// A batch number handed out by [`Sender::next_batch`]; give it back to
/// [`Sender::batch_sent`] once the batch is on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub layer: u32,
    pub seq: u32,
}

/// The source's half of a session.
pub struct Sender {
    cfg: SenderConfig,
    state: SState,
    next_layer: u32,
    layer: u32,
    next_seq: u32,
    outstanding: u32,
    pages: u64,
    digest: LayerDigest,
    /// Layers ended but not yet acknowledged, oldest first.
    unsealed: VecDeque<u32>,
    /// Both sides named `ready-go`.
    ready_go: bool,
    /// The commit under way restores.
    restoring: bool,
    ready_pid: i32,
}

impl Sender {
    pub fn new(cfg: SenderConfig) -> Self {
        Self {
            cfg,
            state: SState::New,
            next_layer: 0,
            layer: 0,
            next_seq: 0,
            outstanding: 0,
            pages: 0,
            digest: LayerDigest::default(),
            unsealed: VecDeque::new(),
            ready_go: false,
            restoring: false,
            ready_pid: 0,
        }
    }

    /// The commit of a restore ends in two phases (`Ready`, `Go`): the
    /// source asked for `ready-go` and the destination's Welcome granted it.
    pub fn ready_go(&self) -> bool {
        self.ready_go
    }

    pub fn page_size(&self) -> u32 {
        self.cfg.page_size
    }

    /// The id the next layer will get.
    pub fn next_layer(&self) -> u32 {
        self.next_layer
    }

    /// Layers sent but not yet sealed by the destination.
    pub fn unsealed(&self) -> usize {
        self.unsealed.len()
    }

    pub fn hello(&mut self) -> Result<pb::Control, ProtocolError> {
        if self.state != SState::New {
            return Err(ProtocolError::Misuse("hello() twice"));
        }
        self.state = SState::AwaitWelcome;
        Ok(control(Msg::Hello(pb::Hello {
            version: PROTOCOL_VERSION,
            session: self.cfg.session.0.to_vec().into(),
            page_size: self.cfg.page_size,
            arch: self.cfg.arch.clone(),
            kernel: self.cfg.kernel.clone(),
            features: self.cfg.features.clone(),
            resume: self.cfg.resume,
            label: self.cfg.label.clone(),
            creds: self.cfg.creds.clone(),
            keep_pids_root: self.cfg.keep_pids_root,
        })))
    }

    pub fn handle_control(&mut self, msg: pb::Control) -> Result<Event, ProtocolError> {
        let r = self.on_control(msg);
        if r.is_err() {
            self.state = SState::Done;
        }
        r
    }

    fn on_control(&mut self, msg: pb::Control) -> Result<Event, ProtocolError> {
        let Some(m) = msg.msg else {
            return Err(ProtocolError::Misuse("empty control message"));
        };
        let state = self.state;
        match (state, m) {
            (SState::AwaitWelcome, Msg::Welcome(w)) => {
                if w.version != PROTOCOL_VERSION {
                    return Err(ProtocolError::WrongVersion {
                        ours: PROTOCOL_VERSION,
                        theirs: w.version,
                    });
                }
                if !self.cfg.resume && w.next_layer != 0 {
                    return Err(ProtocolError::LayerOrder {
                        got: w.next_layer,
                        expected: 0,
                    });
                }
                let wanted = |f: &str| self.cfg.features.iter().any(|x| x == f);
                if wanted(FEATURE_POST_COPY) && !w.features.iter().any(|x| x == FEATURE_POST_COPY) {
                    return Err(ProtocolError::MissingFeature {
                        feature: "post-copy",
                        why: "it needs `ferry page-server --restore` with warm restore, \
                              a fresh session, and a version with post-copy",
                    });
                }
                self.next_layer = w.next_layer;
                let named = |f: &[String]| f.iter().any(|f| f == FEATURE_READY_GO);
                self.ready_go = named(&self.cfg.features) && named(&w.features);
                self.state = SState::Idle;
                Ok(Event::Welcomed {
                    next_layer: w.next_layer,
                })
            }
            (SState::Idle | SState::Open | SState::Committing, Msg::LayerSealed(s)) => {
                match self.unsealed.front() {
                    Some(&l) if l == s.layer => {
                        self.unsealed.pop_front();
                        Ok(Event::Sealed {
                            layer: s.layer,
                            pages: s.pages,
                        })
                    }
                    _ => Err(ProtocolError::LayerOrder {
                        got: s.layer,
                        expected: self.unsealed.front().copied().unwrap_or(self.next_layer),
                    }),
                }
            }
            (SState::Committing, Msg::Stored(s)) if self.unsealed.is_empty() => {
                self.state = SState::Done;
                Ok(Event::Stored {
                    layers: s.layers,
                    pages: s.pages,
                })
            }
            (SState::Committing, Msg::Restored(r))
                if self.unsealed.is_empty() && !(self.ready_go && self.restoring) =>
            {
                self.state = SState::Done;
                Ok(Event::Restored {
                    pid: r.pid,
                    ns_pid: r.ns_pid,
                    pid_ns: r.pid_ns,
                })
            }
            (SState::Committing, Msg::Ready(r))
                if self.unsealed.is_empty() && self.ready_go && self.restoring =>
            {
                self.state = SState::Prepared;
                self.ready_pid = r.pid;
                Ok(Event::Ready { pid: r.pid })
            }
            (SState::Releasing, Msg::Restored(r)) => {
                self.state = SState::Done;
                if r.pid != self.ready_pid {
                    return Err(ProtocolError::PidChanged {
                        ready: self.ready_pid,
                        restored: r.pid,
                    });
                }
                Ok(Event::Restored {
                    pid: r.pid,
                    ns_pid: r.ns_pid,
                    pid_ns: r.pid_ns,
                })
            }
            (SState::Committing | SState::Prepared | SState::Releasing, Msg::Failed(f)) => {
                self.state = SState::Done;
                Ok(Event::Failed { reason: f.reason })
            }
            (s, Msg::Abort(a)) if s != SState::New && s != SState::Done => {
                self.state = SState::Done;
                Ok(Event::Aborted { reason: a.reason })
            }
            (_, m) => Err(ProtocolError::Unexpected {
                state: match state {
                    SState::New => "before Hello",
                    SState::AwaitWelcome => "awaiting Welcome",
                    SState::Idle => "between layers",
                    SState::Open => "sending a layer",
                    SState::Committing => "committing",
                    SState::Prepared => "holding the source for Go",
                    SState::Releasing => "awaiting Restored after Go",
                    SState::Done => "done",
                },
                msg: msg_name(&m),
            }),
        }
    }

    /// Starts the next layer; every earlier layer must be sealed.
    pub fn begin_layer(&mut self, vmas: Vec<pb::Vma>) -> Result<pb::Control, ProtocolError> {
        if self.state != SState::Idle {
            return Err(ProtocolError::Misuse("begin_layer() outside Idle"));
        }
        if !self.unsealed.is_empty() {
            return Err(ProtocolError::Misuse(
                "begin_layer() before the previous layer was sealed",
            ));
        }
        self.state = SState::Open;
        self.layer = self.next_layer;
        self.next_seq = 0;
        self.outstanding = 0;
        self.pages = 0;
        self.digest = LayerDigest::default();
        Ok(control(Msg::LayerBegin(pb::LayerBegin {
            layer: self.layer,
            vmas,
        })))
    }

    /// Hands out the next batch number of the open layer.
    pub fn next_batch(&mut self) -> Result<Ticket, ProtocolError> {
        if self.state != SState::Open {
            return Err(ProtocolError::Misuse("next_batch() with no open layer"));
        }
        if self.next_seq >= MAX_BATCHES_PER_LAYER {
            return Err(ProtocolError::TooManyBatches {
                layer: self.layer,
                batches: self.next_seq,
            });
        }
        let t = Ticket {
            layer: self.layer,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.outstanding += 1;
        Ok(t)
    }

    /// Records a batch as sent: its page count and digest go into the
    /// layer's totals.
    pub fn batch_sent(&mut self, t: Ticket, pages: u64, digest: u64) -> Result<(), ProtocolError> {
        if self.state != SState::Open || t.layer != self.layer || self.outstanding == 0 {
            return Err(ProtocolError::Misuse(
                "batch_sent() for no outstanding batch",
            ));
        }
        self.outstanding -= 1;
        self.pages += pages;
        self.digest.add(t.seq, digest);
        Ok(())
    }

    /// Ends the open layer once every ticket came back.
    pub fn end_layer(&mut self) -> Result<pb::Control, ProtocolError> {
        if self.state != SState::Open || self.outstanding != 0 {
            return Err(ProtocolError::Misuse(
                "end_layer() with no open layer or batches still outstanding",
            ));
        }
        self.state = SState::Idle;
        self.unsealed.push_back(self.layer);
        self.next_layer = self.layer + 1;
        Ok(control(Msg::LayerEnd(pb::LayerEnd {
            layer: self.layer,
            batches: self.next_seq,
            pages: self.pages,
            digest: self.digest.finish().to_vec().into(),
        })))
    }

    pub fn state(&mut self, tree: pb::ProcessTree) -> Result<pb::Control, ProtocolError> {
        if self.state != SState::Idle {
            return Err(ProtocolError::Misuse("state() outside Idle"));
        }
        Ok(control(Msg::State(pb::State { tree: Some(tree) })))
    }

    /// The ranges left out of the image for post-copy (before
    /// [`Sender::commit`]; the session must have asked for
    /// [`crate::FEATURE_POST_COPY`]).
    pub fn post_copy(&mut self, ranges: Vec<pb::LazyRange>) -> Result<pb::Control, ProtocolError> {
        if self.state != SState::Idle || self.next_layer == 0 {
            return Err(ProtocolError::Misuse(
                "post_copy() outside Idle or before any layer",
            ));
        }
        if !self.cfg.features.iter().any(|f| f == FEATURE_POST_COPY) {
            return Err(ProtocolError::Misuse(
                "post_copy() in a session that did not ask for it",
            ));
        }
        Ok(control(Msg::PostCopy(pb::PostCopy { ranges })))
    }

    pub fn commit(&mut self, restore: bool) -> Result<pb::Control, ProtocolError> {
        if self.state != SState::Idle || self.next_layer == 0 {
            return Err(ProtocolError::Misuse(
                "commit() outside Idle or before any layer",
            ));
        }
        self.state = SState::Committing;
        self.restoring = restore;
        Ok(control(Msg::Commit(pb::Commit { restore })))
    }

    /// Two-phase: after [`Event::Ready`], lets the destination run its
    /// copy. From here until `Restored` the outcome is in doubt: a source
    /// that hears nothing must [`query`] before it resumes.
    pub fn go(&mut self) -> Result<pb::Control, ProtocolError> {
        if self.state != SState::Prepared {
            return Err(ProtocolError::Misuse("go() without Ready"));
        }
        self.state = SState::Releasing;
        Ok(control(Msg::Go(pb::Go {})))
    }

    pub fn abort(&mut self, reason: impl Into<String>) -> pb::Control {
        self.state = SState::Done;
        control(Msg::Abort(pb::Abort {
            reason: reason.into(),
        }))
    }
}

#[cfg(test)]
mod tests;
