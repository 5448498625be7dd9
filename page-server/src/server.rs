//! The page server: a QUIC endpoint (mutual TLS, see [`crate::tls`]) that
//! runs one session per connection against the shared [`Store`]; or, as a
//! benchmark baseline, a plain-TCP listener with the same framing
//! ([`crate::tcp`]). The session driver is the same over both, written
//! against [`crate::transport::Conn`].
//!
//! Per connection, one task owns the session's [`Receiver`] and store handle
//! and is the only one to touch them; data streams are read and their
//! batches decompressed by one task each, in parallel, and handed to it over
//! a bounded channel, so a fast sender cannot make the server buffer more
//! than the channel and the receiver's early-batch limit. Anything wrong
//! with a session (a protocol error, a malformed frame, a store failure)
//! ends that session only: the peer gets an `Abort` with the reason and (on
//! QUIC) a connection close carrying it too, its unsealed layer is dropped,
//! and the server goes on serving the others.
//!
//! Limits bound what one peer can take: sessions at once, an idle timeout
//! on control and data progress (QUIC keep-alives only prove the peer's
//! stack is alive, not that its session moves), the data one layer may
//! carry, and, with a QUIC allow-list, which certificates may start a
//! session at all. A peer refused before its session (not allowed, no room)
//! is told why with an `Abort` on its control stream and a close reason,
//! and the refusal is logged with its address.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_proto::batch::{self, BatchError, DecodedBatch};
use ferry_proto::frame::{self, FrameError};
use ferry_proto::pb;
use ferry_proto::session::{Action, Fate, Outcome, ProtocolError, Receiver};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::access::AllowList;
use crate::fates::Fates;
use crate::lazy::{LazyProcess, LazyServeError};
use crate::limits::show_size;
use crate::store::{FlatImage, SessionStore, Store, StoreError};
use crate::tcp::TcpError;
use crate::transport::{Conn, QuicConn, Until};

/// Restores a committed image (hooked in by the `ferry` crate, which owns
/// restore).
pub trait Restorer: Send + Sync + 'static {
    /// Restores the session's image and returns the pid of the process,
    /// running; or why it could not.
    fn restore(&self, session: &mut dyn SessionStore) -> Result<i32, String>;

    /// [`Restorer::restore`] that also says where the process's pids live:
    /// with `--keep-pids` the restore makes a pid namespace, and the pid
    /// inside it and the namespace go back to the source.
    fn restore_in_ns(&self, session: &mut dyn SessionStore) -> Result<RestoredPid, String> {
        self.restore(session).map(|pid| RestoredPid {
            pid,
            ..RestoredPid::default()
        })
    }

    /// Pre-flight at the handshake of a session that will ask for a
    /// restore: can this host run what the source describes at all
    /// (architecture, page size)?
    fn preflight_hello(&self, _hello: &pb::Hello) -> Result<(), String> {
        Ok(())
    }

    /// Pre-flight on every round's mappings: will the restore find what it
    /// needs (mapped files present and unchanged, a compatible vdso)? A
    /// refusal here ends the session while the source still runs.
    fn preflight_layer(&self, _vmas: &[pb::Vma]) -> Result<(), String> {
        Ok(())
    }

    /// A restore that follows the rounds of a new session (see
    /// [`WarmRestore`]), if this restorer can do one.
    fn warm(&self) -> Option<Box<dyn WarmRestore>> {
        None
    }

    /// [`Restorer::warm`] for `--keep-pids`: the waiting process is made in
    /// a fresh pid namespace with pid `ns_pid` there (the Hello's
    /// `keep_pids_root`).
    fn warm_keeping_pid(&self, _ns_pid: i32) -> Option<Box<dyn WarmRestore>> {
        None
    }

    /// Whether [`Restorer::prepare`] (and [`WarmRestore::prepare`]) work:
    /// the two-phase end (`ready-go`) is granted to a source only then.
    fn ready_go(&self) -> bool {
        false
    }

    /// Two-phase end: restores the session's image but holds the process
    /// stopped with its final state set, until released or abandoned.
    fn prepare(&self, _session: &mut dyn SessionStore) -> Result<Box<dyn PreparedProcess>, String> {
        Err("this restorer cannot hold a process before it runs (no ready-go)".into())
    }
}

/// A restored process held stopped (every thread, every process of a
/// tree) with its final state set: the two-phase end of a migration waits
/// with it for the source's `Go`. Dropping it abandons it.
pub trait PreparedProcess: Send {
    /// The process (the root of a tree).
    fn pid(&self) -> i32;
    /// Lets it run; where it runs (with `--keep-pids` also its pid in its
    /// own pid namespace and that namespace) and, prepared for post-copy,
    /// the process waiting for its missing pages; or why it was killed
    /// instead.
    fn release(self: Box<Self>) -> Result<Released, String>;
    /// Kills and reaps it: it never ran.
    fn abandon(self: Box<Self>);
}

/// A prepared process let run.
pub struct Released {
    pub at: RestoredPid,
    /// Post-copy ([`WarmRestore::prepare_lazy`]): the process, running,
    /// with pages still missing.
    pub lazy: Option<Box<dyn LazyProcess>>,
}

/// What a page server records as the reason of a post-copy process that
/// was released on `Go` and then killed before its last page came (the
/// source went away): it ran until then, so the source must not be
/// resumed as if no copy ever ran.
pub const RAN_THEN_KILLED: &str = "post-copy: released on Go, then killed";

/// Where a restored process runs: its pid as the page server sees it and,
/// when it was restored into a pid namespace of its own (`--keep-pids`),
/// its pid there and the namespace's inode number (0 otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoredPid {
    pub pid: i32,
    pub ns_pid: i32,
    pub pid_ns: u64,
}

/// A restore begun at the first round: every sealed layer is laid into the
/// waiting process as it arrives, so the commit has only the last delta's
/// tail and the process state left to do. Dropping it (the session failed
/// or was aborted) removes the waiting process.
pub trait WarmRestore: Send {
    /// Takes the layer just sealed, read alone; it is applied in the
    /// background. An error means the warm restore gave up: the commit then
    /// restores from the flattened image instead.
    fn layer(&mut self, layer: FlatImage) -> Result<(), String>;

    /// At commit: finishes the restore (or restores cold if the warm one
    /// failed on the way) and returns the pid of the running process.
    fn finish(self: Box<Self>, session: &mut dyn SessionStore) -> Result<i32, String>;

    /// Whether [`WarmRestore::finish_lazy`] works here (post-copy is
    /// offered to the source only then).
    fn post_copy(&self) -> bool {
        false
    }

    /// Post-copy: finishes the restore with the pages of `lazy` missing
    /// and the process running, waiting on each such page it touches until
    /// it is placed through the returned [`LazyProcess`].
    fn finish_lazy(
        self: Box<Self>,
        _session: &mut dyn SessionStore,
        _lazy: &[pb::LazyRange],
    ) -> Result<Box<dyn LazyProcess>, String> {
        Err("this restorer cannot leave pages missing (no post-copy)".into())
    }

    /// Two-phase post-copy: [`WarmRestore::finish_lazy`], holding the
    /// process stopped with its userfaultfd registered until released;
    /// the [`Released`] then carries the [`LazyProcess`].
    fn prepare_lazy(
        self: Box<Self>,
        _session: &mut dyn SessionStore,
        _lazy: &[pb::LazyRange],
    ) -> Result<Box<dyn PreparedProcess>, String> {
        Err("this restorer cannot hold a post-copy process before it runs".into())
    }

    /// Two-phase end: [`WarmRestore::finish`], holding the process stopped
    /// (see [`Restorer::prepare`]); restores cold if the warm one failed.
    fn prepare(
        self: Box<Self>,
        _session: &mut dyn SessionStore,
    ) -> Result<Box<dyn PreparedProcess>, String> {
        Err("this restorer cannot hold a process before it runs (no ready-go)".into())
    }
}

/// Longest post-copy wait for the next page from the source while pages
/// are missing (capped by the idle timeout): after it, the source counts
/// as gone and the process is killed.
pub const POST_COPY_STALL: Duration = Duration::from_secs(5);

/// Default of [`Config::go_timeout`].
pub const DEFAULT_GO_TIMEOUT: Duration = Duration::from_secs(15);

/// What the page server listens with.
pub enum Transport {
    /// QUIC with mutual TLS: the transport for real migrations.
    Quic(quinn::ServerConfig),
    /// Plain TCP with the same framing, unencrypted and unauthenticated: a
    /// benchmark baseline. Binding a non-loopback address is refused
    /// unless `allow_remote`.
    Tcp { allow_remote: bool },
}

pub struct Config {
    pub transport: Transport,
    pub store: Arc<dyn Store>,
    pub restorer: Option<Arc<dyn Restorer>>,
    /// Sessions served at once; further connections are refused.
    pub max_sessions: usize,
    /// How long a new connection may take to open its control stream.
    pub handshake_timeout: Duration,
    /// A session with no control message and no page batch for this long
    /// is ended.
    pub idle_timeout: Duration,
    /// Bytes of page data one layer may carry (zero pages carry none).
    pub max_layer_bytes: u64,
    /// QUIC only: the client certificates that may start a session, on
    /// top of being signed by the CA; `None` for any the CA signed.
    pub allow: Option<AllowList>,
    /// Remove a session's image once its process is restored: the process
    /// runs on, and restoring the image again would run it twice, so a
    /// long-lived page server gives the memory (or disk) back at once.
    pub forget_restored: bool,
    /// Two-phase end: how long a prepared process waits for the source's
    /// `Go` before it is abandoned (killed).
    pub go_timeout: Duration,
}

/// Defaults of the limits (the CLI shows the same).
pub const DEFAULT_MAX_SESSIONS: usize = 32;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Config {
    /// QUIC with mutual TLS.
    pub fn new(tls: quinn::ServerConfig, store: Arc<dyn Store>) -> Self {
        Self::with_transport(Transport::Quic(tls), store)
    }

    /// Plain TCP, loopback only (see [`Transport::Tcp`]).
    pub fn tcp(store: Arc<dyn Store>) -> Self {
        Self::with_transport(
            Transport::Tcp {
                allow_remote: false,
            },
            store,
        )
    }

    pub fn with_transport(transport: Transport, store: Arc<dyn Store>) -> Self {
        Self {
            transport,
            store,
            restorer: None,
            max_sessions: DEFAULT_MAX_SESSIONS,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_layer_bytes: u64::MAX,
            allow: None,
            forget_restored: false,
            go_timeout: DEFAULT_GO_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plaintext(#[from] TcpError),
}

/// Why one session ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("reading a stream: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing the control stream: {0}")]
    Write(#[source] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("bad page batch: {0}")]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("peer opened no control stream within {0:?}")]
    NoControl(Duration),
    #[error("peer closed the control stream mid-session")]
    ControlClosed,
    #[error("idle for {0:?}: no control message or page batch (--idle-timeout)")]
    Idle(Duration),
    #[error(
        "layer {layer} carries more than {} of page data (--max-layer-size)",
        show_size(*limit)
    )]
    LayerTooLarge { layer: u32, limit: u64 },
    #[error("{0}")]
    Refused(String),
    #[error("pre-flight: this host could not restore the process: {0}")]
    Preflight(String),
    #[error("{0}")]
    PostCopy(#[from] LazyServeError),
    #[error("no Go from the source within {0:?} after Ready (--go-timeout)")]
    NoGo(Duration),
    #[error("failure injected by FERRY_FAILPOINT={0} (test only)")]
    Failpoint(&'static str),
}

impl SessionError {
    /// Close code (QUIC application close): 1 for the peer's fault, 2 for
    /// ours.
    fn code(&self) -> u32 {
        match self {
            SessionError::Store(StoreError::OverQuota { .. }) => 1,
            SessionError::Store(_) => 2,
            _ => 1,
        }
    }
}

/// A bound page server; [`PageServer::run`] serves until shut down.
pub struct PageServer {
    listener: Listener,
    shared: Arc<Shared>,
}

enum Listener {
    Quic(quinn::Endpoint),
    // Made a tokio listener in `run`, inside the runtime.
    Tcp(std::net::TcpListener),
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) restorer: Option<Arc<dyn Restorer>>,
    pub(crate) max_sessions: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_layer_bytes: u64,
    pub(crate) allow: Option<AllowList>,
    pub(crate) forget_restored: bool,
    pub(crate) go_timeout: Duration,
    /// What became of recent two-phase sessions (answers `Query`).
    pub(crate) fates: Mutex<Fates>,
    pub(crate) started: Instant,
}

impl PageServer {
    pub fn bind(addr: SocketAddr, cfg: Config) -> Result<Self, ServerError> {
        let bind_err = |source| ServerError::Bind { addr, source };
        let listener = match cfg.transport {
            Transport::Quic(tls) => {
                Listener::Quic(crate::tls::endpoint(addr, Some(tls)).map_err(bind_err)?)
            }
            Transport::Tcp { allow_remote } => {
                crate::tcp::check_plaintext_addr(addr, allow_remote)?;
                warn!(%addr, "{}", crate::tcp::WARNING);
                Listener::Tcp(std::net::TcpListener::bind(addr).map_err(bind_err)?)
            }
        };
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                store: cfg.store,
                restorer: cfg.restorer,
                max_sessions: cfg.max_sessions,
                handshake_timeout: cfg.handshake_timeout,
                idle_timeout: cfg.idle_timeout,
                max_layer_bytes: cfg.max_layer_bytes,
                allow: cfg.allow.filter(|a| !a.is_empty()),
                forget_restored: cfg.forget_restored,
                go_timeout: cfg.go_timeout,
                fates: Mutex::new(Fates::default()),
                started: Instant::now(),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Listener::Quic(e) => e.local_addr(),
            Listener::Tcp(l) => l.local_addr(),
        }
    }

    /// Serves connections until `shutdown` resolves, then closes them.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        match self.listener {
            Listener::Quic(endpoint) => run_quic(endpoint, self.shared, shutdown).await,
            Listener::Tcp(l) => crate::tcp::run(l, self.shared, shutdown).await,
        }
    }
}

async fn run_quic(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) {
    let sessions = Arc::new(Semaphore::new(shared.max_sessions));
    // Telling a refused peer why costs a handshake: bound how many are
    // told at once, and refuse the rest without a word.
    let refusals = Arc::new(Semaphore::new(shared.max_sessions.clamp(4, 64)));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let peer = incoming.remote_address();
                let shared = shared.clone();
                match sessions.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tasks.spawn(async move {
                            serve_quic(incoming, shared).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let full = format!(
                            "page server refused the connection: {} sessions already \
                             running (--max-sessions)",
                            shared.max_sessions
                        );
                        warn!(%peer, "{full}");
                        let Ok(permit) = refusals.clone().try_acquire_owned() else {
                            incoming.refuse();
                            continue;
                        };
                        tasks.spawn(async move {
                            if let Ok(conn) = incoming.await {
                                refuse_quic(conn, &shared, full).await;
                            }
                            drop(permit);
                        });
                    }
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    endpoint.close(0u32.into(), b"page server shutting down");
    tasks.shutdown().await;
    endpoint.wait_idle().await;
}

async fn serve_quic(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let peer = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // A failed handshake is how an unauthenticated peer ends.
            info!(%peer, "connection refused: {e}");
            return;
        }
    };
    if let Some(allow) = &shared.allow {
        // The handshake verified the chain; a client without a certificate
        // never gets this far.
        let cert = conn
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|certs| certs.first().cloned());
        let verdict = match &cert {
            Some(c) => allow.check(c).map_err(|e| e.to_string()),
            None => Err("no client certificate".to_string()),
        };
        if let Err(why) = verdict {
            warn!(%peer, "connection refused: {why}");
            refuse_quic(
                conn,
                &shared,
                format!("page server refused the connection: {why}"),
            )
            .await;
            return;
        }
    }
    debug!(%peer, "connection accepted");
    serve(Arc::new(QuicConn(conn)), shared).await;
}

/// Tells a peer refused before its session why: an `Abort` on its control
/// stream once it opens one (the source reads the reason from it at any
/// point of its handshake), and the same reason in the close.
async fn refuse_quic(conn: quinn::Connection, shared: &Shared, reason: String) {
    let c = QuicConn(conn);
    let tell = async {
        let (mut send, mut recv) = c.accept_control().await?;
        let abort = ferry_proto::session::control(pb::control::Msg::Abort(pb::Abort {
            reason: reason.clone(),
        }));
        write_control(&mut send, &abort).await?;
        c.finish(
            &mut send,
            &mut recv,
            Until::Delivered,
            Duration::from_millis(500),
        )
        .await;
        Ok::<_, SessionError>(())
    };
    let _ = tokio::time::timeout(shared.handshake_timeout.min(Duration::from_secs(2)), tell).await;
    let mut r = reason.into_bytes();
    r.truncate(1000);
    c.close(1, &r);
}

/// Runs one session on an accepted connection, to its end.
pub(crate) async fn serve<C: Conn>(conn: Arc<C>, shared: Arc<Shared>) {
    let peer = conn.remote_address();
    let two_phase = shared.restorer.as_ref().is_some_and(|r| r.ready_go());
    let mut rx = Receiver::new(64 << 20);
    if two_phase {
        rx = rx.with_ready_go();
    }
    let mut s = Session {
        conn: conn.clone(),
        shared,
        rx,
        prepared: None,
        handle: None,
        data: None,
        readers: JoinSet::new(),
        control: None,
        layer_bytes: 0,
        created: false,
        preflight: false,
        warm: None,
        lazy_ranges: None,
        lazy: None,
        urgent: None,
        page_size: 0,
    };
    match s.run().await {
        Ok(()) => info!(%peer, session = %s.session_name(), "session finished"),
        Err(e) => {
            warn!(%peer, session = %s.session_name(), "session failed: {e}");
            let reason = e.to_string();
            s.abandon(&reason);
            let abort = s.rx.fail(&reason);
            if let Some(h) = s.handle.as_mut() {
                if let Err(e) = h.discard_open() {
                    warn!(%peer, "discarding the unsealed layer: {e}");
                }
            }
            s.forget_if_empty();
            s.send_last(abort).await;
            let mut r = reason.into_bytes();
            r.truncate(1000);
            conn.close(e.code(), &r);
        }
    }
    s.readers.shutdown().await;
}

type BatchResult = Result<DecodedBatch, SessionError>;

struct Session<C: Conn> {
    conn: Arc<C>,
    shared: Arc<Shared>,
    rx: Receiver,
    handle: Option<Box<dyn SessionStore>>,
    data: Option<mpsc::Receiver<BatchResult>>,
    readers: JoinSet<()>,
    control: Option<(C::Send, C::Recv)>,
    /// This connection created the session (it did not resume it).
    created: bool,
    /// The source will ask for a restore: check every round can be.
    preflight: bool,
    warm: Option<Box<dyn WarmRestore>>,
    /// Two-phase end: the process restored and held for the source's `Go`.
    prepared: Option<Box<dyn PreparedProcess>>,
    /// Page data stored in the open layer so far.
    layer_bytes: u64,
    /// Post-copy: the ranges the source left out, then the process that
    /// waits for them.
    lazy_ranges: Option<Vec<pb::LazyRange>>,
    lazy: Option<Box<dyn LazyProcess>>,
    /// Batches of pages the process faulted on (post-copy), apart from the
    /// rest so they are placed first.
    urgent: Option<mpsc::Receiver<BatchResult>>,
    page_size: u32,
}

/// Runs a store operation that may block (file writes, `fsync`) without
/// stalling the other tasks of a multi-threaded runtime.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl<C: Conn> Session<C> {
    async fn run(&mut self) -> Result<(), SessionError> {
        let timeout = self.shared.handshake_timeout;
        let idle = self.shared.idle_timeout;
        let (mut send, mut recv) = tokio::time::timeout(timeout, self.conn.accept_control())
            .await
            .map_err(|_| SessionError::NoControl(timeout))??;
        let mut cbuf = BytesMut::with_capacity(64 << 10);
        let result: Result<(), SessionError> = async {
            loop {
                self.act(&mut send).await?;
                if self.rx.is_finished() {
                    return Ok(());
                }
                let (wait, prepared) = (self.wait_limit(), self.prepared.is_some());
                tokio::select! {
                    msg = read_control(&mut recv, &mut cbuf) => {
                        let msg = msg?.ok_or(SessionError::ControlClosed)?;
                        self.rx.handle_control(msg)?;
                    }
                    Some(b) = recv_batch(&mut self.data) => self.rx.handle_batch(b?)?,
                    // Restarted by every message and batch; the time spent
                    // acting on them (a restore) does not count. A prepared
                    // process waits for Go only so long.
                    () = tokio::time::sleep(wait) => {
                        return Err(match prepared {
                            true => SessionError::NoGo(wait),
                            false => SessionError::Idle(idle),
                        })
                    }
                }
            }
        }
        .await;
        let result = match (result, self.lazy.take()) {
            (Ok(()), Some(lazy)) => {
                let pid = lazy.pid();
                let served = self.post_copy(lazy, &mut send, &mut recv, &mut cbuf).await;
                match &served {
                    Ok(()) => self.record(Fate::Resumed { pid }),
                    Err(e) => self.ran_then_killed(pid, e),
                }
                served
            }
            (Err(e), Some(lazy)) => {
                // Released, but its pages can no longer come.
                let pid = lazy.pid();
                lazy.kill();
                self.ran_then_killed(pid, &e);
                Err(e)
            }
            (r, None) => r,
        };
        self.control = Some((send, recv));
        result?;
        // Let the last answer reach the source before the connection goes.
        if let Some((mut s, mut r)) = self.control.take() {
            self.conn
                .finish(&mut s, &mut r, Until::Gone, Duration::from_secs(5))
                .await;
        }
        Ok(())
    }

    /// Serves the process restored with pages missing until every page is
    /// in, then tells the source (see [`crate::lazy`]).
    async fn post_copy(
        &mut self,
        lazy: Box<dyn LazyProcess>,
        send: &mut C::Send,
        recv: &mut C::Recv,
        cbuf: &mut BytesMut,
    ) -> Result<(), SessionError> {
        let ranges = self.lazy_ranges.take().unwrap_or_default();
        let set = ferry_proto::lazy::LazySet::new(&ranges, self.page_size)
            .map_err(ProtocolError::from)?;
        let (Some(data), Some(urgent)) = (self.data.as_mut(), self.urgent.as_mut()) else {
            lazy.kill();
            return Err(SessionError::Protocol(ProtocolError::Misuse(
                "post-copy without data streams",
            )));
        };
        let stall = POST_COPY_STALL.min(self.shared.idle_timeout);
        let done = crate::lazy::serve(
            std::sync::Arc::from(lazy),
            set,
            send,
            recv,
            cbuf,
            crate::lazy::Channels { data, urgent },
            stall,
        )
        .await?;
        write_control(send, &crate::lazy::done_message(done)).await
    }

    /// Carries out everything the receiver asked for.
    async fn act(&mut self, send: &mut C::Send) -> Result<(), SessionError> {
        while let Some(a) = self.rx.poll_action() {
            match a {
                Action::Send(c) => write_control(send, &c).await?,
                Action::OpenSession { id, hello } => {
                    let mut offer = Vec::new();
                    if hello
                        .features
                        .iter()
                        .any(|f| f == ferry_proto::FEATURE_RESTORE)
                    {
                        let Some(r) = &self.shared.restorer else {
                            return Err(SessionError::Refused(
                                "this page server does not restore processes \
                                 (start it with --restore)"
                                    .into(),
                            ));
                        };
                        r.preflight_hello(&hello).map_err(SessionError::Preflight)?;
                        self.preflight = true;
                        let asks = |f: &str| hello.features.iter().any(|x| x == f);
                        // A resumed session's earlier layers were never laid
                        // into a process: it restores cold. So does
                        // --keep-pids from a source that does not say the
                        // root's pid up front (the stub needs it).
                        if !hello.resume {
                            self.warm = match hello.keep_pids_root {
                                _ if !asks(ferry_proto::FEATURE_KEEP_PIDS) => r.warm(),
                                0 => None,
                                n => i32::try_from(n).ok().and_then(|n| r.warm_keeping_pid(n)),
                            };
                        }
                        if asks(ferry_proto::FEATURE_POST_COPY)
                            && self.warm.as_ref().is_some_and(|w| w.post_copy())
                        {
                            offer.push(ferry_proto::FEATURE_POST_COPY.to_string());
                        }
                    }
                    let store = &self.shared.store;
                    let h = if hello.resume {
                        store.open(id)?
                    } else {
                        store.create(pb::SessionMeta {
                            session: hello.session.clone(),
                            page_size: hello.page_size,
                            arch: hello.arch.clone(),
                            kernel: hello.kernel.clone(),
                            label: hello.label.clone(),
                            created_unix_ms: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_millis() as i64)
                                .unwrap_or(0),
                        })?
                    };
                    info!(peer = %self.conn.remote_address(), session = %id,
                          label = %hello.label, resume = hello.resume, "session opened");
                    self.created = !hello.resume;
                    self.rx.session_ready_with(h.sealed_layers(), offer)?;
                    self.page_size = hello.page_size;
                    self.handle = Some(h);
                    self.start_data(hello.page_size);
                }
                Action::BeginLayer { layer, vmas } => {
                    if let (true, Some(r)) = (self.preflight, &self.shared.restorer) {
                        r.preflight_layer(&vmas).map_err(SessionError::Preflight)?;
                    }
                    self.store()?.begin_layer(layer, vmas)?;
                    self.layer_bytes = 0;
                }
                Action::Store(b) => {
                    self.layer_bytes = self.layer_bytes.saturating_add(b.data.len() as u64);
                    if self.layer_bytes > self.shared.max_layer_bytes {
                        return Err(SessionError::LayerTooLarge {
                            layer: b.layer,
                            limit: self.shared.max_layer_bytes,
                        });
                    }
                    let h = self.store()?;
                    blocking(|| h.put(&b))?;
                }
                Action::Seal { layer, pages } => {
                    let h = self.store()?;
                    let s = blocking(|| h.seal())?;
                    debug!(layer, pages, bytes = s.bytes, "layer sealed");
                    if let (Some(w), Some(h)) = (self.warm.as_mut(), self.handle.as_ref()) {
                        let fed = blocking(|| h.layer(layer))
                            .map_err(|e| e.to_string())
                            .and_then(|img| w.layer(img));
                        if let Err(e) = fed {
                            warn!(
                                layer,
                                "warm restore given up, the commit restores cold: {e}"
                            );
                            self.warm = None;
                        }
                    }
                    self.rx.sealed(layer)?;
                }
                Action::PostCopy { ranges } => self.lazy_ranges = Some(ranges),
                Action::StoreState(tree) => {
                    let h = self.store()?;
                    blocking(|| h.put_state(&tree))?;
                }
                Action::Commit { restore: true } if self.rx.ready_go() => {
                    self.prepare()?;
                }
                Action::Commit { restore } => {
                    let outcome = self.commit(restore);
                    // Release the session before the verdict goes out: the
                    // source may act on it at once (restore it elsewhere,
                    // list it), and the connection may linger closing.
                    let restored = match (&outcome, self.handle.as_ref()) {
                        (Outcome::Restored { .. }, Some(h)) if self.shared.forget_restored => {
                            Some(h.summary().id)
                        }
                        _ => None,
                    };
                    self.handle = None;
                    if let Some(id) = restored {
                        if let Err(e) = blocking(|| self.shared.store.remove(id)) {
                            warn!(session = %id, "removing a restored session's image: {e}");
                        }
                    }
                    self.rx.finished(outcome)?;
                }
                Action::Release { .. } => self.release()?,
                Action::Abandon { reason, .. } => {
                    self.abandon(&format!("the source aborted after Ready: {reason}"));
                }
                Action::Lookup { id } => {
                    let (fate, note) = self.look_up(id);
                    info!(peer = %self.conn.remote_address(), session = %id, ?fate,
                          "answered a query");
                    let up = self.shared.started.elapsed().as_millis() as u64;
                    self.rx.answer_with(&fate, &note, up)?;
                }
                Action::Aborted { reason } => {
                    info!(session = %self.session_name(), "source aborted: {reason}");
                    self.warm = None;
                    if let Some(h) = self.handle.as_mut() {
                        h.discard_open()?;
                    }
                    self.forget_if_empty();
                }
            }
        }
        Ok(())
    }

    fn store(&mut self) -> Result<&mut Box<dyn SessionStore>, SessionError> {
        self.handle
            .as_mut()
            .ok_or(SessionError::Protocol(ProtocolError::Misuse("no session")))
    }

    fn commit(&mut self, restore: bool) -> Outcome {
        let Some(h) = self.handle.as_mut() else {
            return Outcome::Failed {
                reason: "no session".into(),
            };
        };
        if !restore {
            self.warm = None;
            let s = h.summary();
            return Outcome::Stored {
                layers: s.layers,
                pages: s.pages,
            };
        }
        match &self.shared.restorer {
            None => Outcome::Failed {
                reason: format!(
                    "this page server does not restore (start it with --restore); \
                     the image is kept as session {}",
                    h.summary().id
                ),
            },
            Some(r) => {
                let r = r.clone();
                let warm = self.warm.take();
                if let Some(ranges) = self.lazy_ranges.as_ref() {
                    let done = match warm {
                        Some(w) => blocking(|| w.finish_lazy(h.as_mut(), ranges)),
                        None => Err("post-copy needs the warm restore, which gave up during \
                                     the rounds (see the page server's log)"
                            .into()),
                    };
                    return match done {
                        Ok(lazy) => {
                            let pid = lazy.pid();
                            self.lazy = Some(lazy);
                            Outcome::Restored {
                                pid,
                                ns_pid: 0,
                                pid_ns: 0,
                            }
                        }
                        Err(reason) => Outcome::Failed { reason },
                    };
                }
                let done = blocking(|| match warm {
                    Some(w) => w.finish(h.as_mut()).map(|pid| RestoredPid {
                        pid,
                        ..RestoredPid::default()
                    }),
                    None => r.restore_in_ns(h.as_mut()),
                });
                match done {
                    Ok(r) => Outcome::Restored {
                        pid: r.pid,
                        ns_pid: r.ns_pid,
                        pid_ns: r.pid_ns,
                    },
                    Err(reason) => Outcome::Failed { reason },
                }
            }
        }
    }

    /// Accepts the data streams of the session and reads each in a task.
    fn start_data(&mut self, page_size: u32) {
        let (tx, rx) = mpsc::channel(16);
        let (urgent_tx, urgent_rx) = mpsc::channel(16);
        self.data = Some(rx);
        self.urgent = Some(urgent_rx);
        let conn = self.conn.clone();
        self.readers.spawn(async move {
            let mut streams = JoinSet::new();
            while let Some(recv) = conn.accept_data().await {
                streams.spawn(read_data(recv, page_size, tx.clone(), urgent_tx.clone()));
            }
            streams.shutdown().await;
        });
    }

    fn session_name(&self) -> String {
        self.rx
            .session()
            .map(|s| s.to_hex())
            .unwrap_or_else(|| "-".into())
    }

    /// A session this connection created that never sealed a layer holds
    /// nothing worth keeping: remove it rather than leave an empty entry.
    fn forget_if_empty(&mut self) {
        let Some(h) = self.handle.take() else { return };
        let id = h.summary().id;
        let keep = !self.created || h.sealed_layers() > 0;
        drop(h);
        if !keep {
            if let Err(e) = self.shared.store.remove(id) {
                warn!(session = %id, "removing an empty failed session: {e}");
            }
        }
    }

    /// Sends a last control message on a failed session, best effort.
    async fn send_last(&mut self, msg: pb::Control) {
        if let Some((mut s, mut r)) = self.control.take() {
            let write = async {
                write_control(&mut s, &msg).await?;
                // Give the peer a moment to read it before the close.
                self.conn
                    .finish(&mut s, &mut r, Until::Delivered, Duration::from_millis(500))
                    .await;
                Ok::<_, SessionError>(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
        }
    }
}

/// The two-phase end (feature `ready-go`): prepare, then release on `Go`
/// or abandon on anything else; every step's fate is recorded so a source
/// that lost the answer can ask (`Query`).
impl<C: Conn> Session<C> {
    /// The idle timeout, or while a prepared process waits, the Go timeout.
    fn wait_limit(&self) -> Duration {
        match self.prepared {
            Some(_) => self.shared.go_timeout,
            None => self.shared.idle_timeout,
        }
    }

    fn record(&self, fate: Fate) {
        let Some(id) = self.rx.session() else { return };
        if let Ok(mut f) = self.shared.fates.lock() {
            f.record(id, fate, Instant::now());
        }
    }

    /// Restores with every thread held; `Ready{pid}` goes out, or `Failed`.
    fn prepare(&mut self) -> Result<(), SessionError> {
        let warm = self.warm.take();
        let (Some(h), Some(r)) = (self.handle.as_mut(), self.shared.restorer.clone()) else {
            return self.fail_commit("no session or no restorer".into());
        };
        let t = Instant::now();
        if failpoint("slow-prepare") {
            // Test only: a destination slower than the source's patience.
            blocking(|| std::thread::sleep(Duration::from_secs(5)));
        }
        let lazy = self.lazy_ranges.clone();
        let done = blocking(|| match (warm, lazy) {
            (Some(w), Some(ranges)) => w.prepare_lazy(h.as_mut(), &ranges),
            // A cold restore cannot leave pages missing: refuse, so the
            // source runs on.
            (None, Some(_)) => Err("post-copy needs the warm restore, which gave up during \
                                    the rounds (see the page server's log)"
                .into()),
            (Some(w), None) => w.prepare(h.as_mut()),
            (None, None) => r.prepare(h.as_mut()),
        });
        match done {
            Ok(p) => {
                let pid = p.pid();
                info!(session = %self.session_name(), pid,
                      restore_ms = t.elapsed().as_secs_f64() * 1e3,
                      "restored and held: waiting for Go");
                self.record(Fate::Pending);
                self.prepared = Some(p);
                self.rx.prepared(pid)?;
                Ok(())
            }
            Err(reason) => self.fail_commit(reason),
        }
    }

    fn fail_commit(&mut self, reason: String) -> Result<(), SessionError> {
        warn!(session = %self.session_name(), "restore failed, nothing runs: {reason}");
        self.record(Fate::Abandoned {
            reason: reason.clone(),
        });
        self.handle = None;
        self.rx.finished(Outcome::Failed { reason })?;
        Ok(())
    }

    /// `Go`: the process runs; `Restored{pid}` goes out.
    fn release(&mut self) -> Result<(), SessionError> {
        let Some(p) = self.prepared.take() else {
            return Err(SessionError::Protocol(ProtocolError::Misuse(
                "Go with no prepared process",
            )));
        };
        let outcome = match blocking(|| p.release()) {
            Ok(Released {
                at:
                    RestoredPid {
                        pid,
                        ns_pid,
                        pid_ns,
                    },
                lazy,
            }) => {
                info!(session = %self.session_name(), pid, ns_pid, pid_ns,
                      post_copy = lazy.is_some(), "released: the process runs");
                match lazy {
                    // It runs, but lives only if its missing pages come:
                    // pending until they all have (see `run`).
                    Some(l) => self.lazy = Some(l),
                    None => self.record(Fate::Resumed { pid }),
                }
                self.forget_restored();
                Outcome::Restored {
                    pid,
                    ns_pid,
                    pid_ns,
                }
            }
            Err(reason) => {
                let reason =
                    format!("releasing the restored process failed, it was killed: {reason}");
                warn!(session = %self.session_name(), "{reason}");
                self.record(Fate::Abandoned {
                    reason: reason.clone(),
                });
                Outcome::Failed { reason }
            }
        };
        self.handle = None;
        if failpoint("restored-lost") {
            // Test only: the answer is lost after the release.
            return Err(SessionError::Failpoint("page-server:restored-lost"));
        }
        self.rx.finished(outcome)?;
        Ok(())
    }

    /// A post-copy process released on `Go` and killed before its last
    /// page: recorded so a source asking learns that it ran, then died.
    fn ran_then_killed(&self, pid: i32, e: &SessionError) {
        if self.rx.ready_go() {
            warn!(session = %self.session_name(), pid, "{RAN_THEN_KILLED}: {e}");
            self.record(Fate::Abandoned {
                reason: format!("{RAN_THEN_KILLED} (pid {pid}): {e}"),
            });
        }
    }

    /// Kills the prepared process, if there is one; records why.
    fn abandon(&mut self, reason: &str) {
        let Some(p) = self.prepared.take() else {
            return;
        };
        let pid = p.pid();
        blocking(|| p.abandon());
        warn!(session = %self.session_name(), pid,
              "abandoned: the prepared process was killed before it ran ({reason})");
        self.record(Fate::Abandoned {
            reason: reason.into(),
        });
    }

    /// After a release with `--keep-restored` off: the image could only
    /// run the process a second time.
    fn forget_restored(&mut self) {
        if !self.shared.forget_restored {
            return;
        }
        let Some(id) = self.handle.take().map(|h| h.summary().id) else {
            return;
        };
        if let Err(e) = blocking(|| self.shared.store.remove(id)) {
            warn!(session = %id, "removing a restored session's image: {e}");
        }
    }

    /// What this page server can say about session `id`, and a note for an
    /// unknown one.
    fn look_up(&self, id: ferry_proto::SessionId) -> (Fate, String) {
        let fate = match self.shared.fates.lock() {
            Ok(mut f) => f.get(&id, Instant::now()),
            Err(_) => Fate::Unknown,
        };
        if fate != Fate::Unknown {
            return (fate, String::new());
        }
        let stored = self
            .shared
            .store
            .list()
            .ok()
            .and_then(|l| l.into_iter().find(|s| s.id == id));
        let note = match stored {
            Some(s) if s.has_state => "its image (with a process state) is stored here, but no                  record of how its end went: this page server may have been restarted since"
                .to_string(),
            Some(_) => "its image is stored here, without a process state: it never committed"
                .to_string(),
            None => "never seen by this page server (or forgotten)".to_string(),
        };
        (Fate::Unknown, note)
    }
}

/// Failpoint (test only): `FERRY_FAILPOINT=page-server:SITE` (the
/// convention of ferry's `failpoint` module, which this crate cannot use).
fn failpoint(site: &str) -> bool {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var("FERRY_FAILPOINT").ok())
        .as_deref()
        .and_then(|a| a.split_once(':'))
        == Some(("page-server", site))
}

async fn recv_batch(rx: &mut Option<mpsc::Receiver<BatchResult>>) -> Option<BatchResult> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn write_control(
    send: &mut (impl AsyncWrite + Unpin),
    msg: &pb::Control,
) -> Result<(), SessionError> {
    let mut buf = BytesMut::new();
    frame::encode_control(msg, &mut buf);
    send.write_all(&buf).await.map_err(SessionError::Write)?;
    Ok(())
}

/// Least free room in a read buffer before a read: a full `BytesMut` would
/// otherwise take a few dozen bytes per call.
const READ_ROOM: usize = 256 << 10;

/// Appends what the stream has next to `buf`; false at its end. Cancel
/// safe: a read that loses a `select!` took no bytes.
async fn read_more(
    recv: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<bool, SessionError> {
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(READ_ROOM);
    }
    let n = recv.read_buf(buf).await.map_err(SessionError::Read)?;
    Ok(n > 0)
}

/// Reads until one whole control message is buffered; `None` at a clean end
/// of stream.
pub(crate) async fn read_control(
    recv: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<Option<pb::Control>, SessionError> {
    loop {
        if let Some(m) = frame::decode_control(buf)? {
            return Ok(Some(m));
        }
        if !read_more(recv, buf).await? {
            frame::check_eof(buf)?;
            return Ok(None);
        }
    }
}

/// Reads one data stream: frames, then batches checked and decompressed.
/// Post-copy pages the process faulted on go to `urgent`.
async fn read_data(
    mut recv: impl AsyncRead + Unpin,
    page_size: u32,
    tx: mpsc::Sender<BatchResult>,
    urgent: mpsc::Sender<BatchResult>,
) {
    let mut buf = BytesMut::with_capacity(1 << 20);
    loop {
        let r = match frame::decode_batch(&mut buf) {
            Ok(Some(w)) => Some(batch::decode(w, page_size).map_err(SessionError::from)),
            Ok(None) => match read_more(&mut recv, &mut buf).await {
                Ok(false) => match frame::check_eof(&buf) {
                    Ok(()) => return,
                    Err(e) => Some(Err(e.into())),
                },
                Ok(true) => None,
                Err(e) => Some(Err(e)),
            },
            Err(e) => Some(Err(e.into())),
        };
        if let Some(r) = r {
            let fatal = r.is_err();
            let to = match &r {
                Ok(b) if b.layer == ferry_proto::LAZY_URGENT_LAYER => &urgent,
                _ => &tx,
            };
            if to.send(r).await.is_err() || fatal {
                return;
            }
        }
    }
}
