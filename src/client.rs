//! The source's client: streams layers to a page server through the
//! `ferry_proto` sender state machine, over QUIC with mutual TLS or, as an
//! unencrypted benchmark baseline, plain TCP with the same frames (each
//! stream a TCP connection, see `ferry_proto::preamble`).
//!
//! A connection has one control stream and `streams` data streams ("lanes").
//! Each lane is a task that encodes its batches (zero detection, zstd) on the
//! blocking pool and writes them to its own stream, so encoding runs in
//! parallel and a packet lost on one stream never stalls the others. Lanes
//! take jobs through bounded channels: a producer faster than the network
//! waits instead of filling memory. Batch numbers are handed out in
//! submission order by the sender state machine, so the destination puts
//! the layer back together whatever order the lanes deliver in.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ferry_page_server::tcp::{check_plaintext_addr, TcpError};
use ferry_proto::batch::{BatchError, Compress, Encoder};
use ferry_proto::frame::{self, FrameError};
use ferry_proto::pb;
use ferry_proto::preamble::{Kind, Preamble};
use ferry_proto::session::{Event, Fate, ProtocolError, Sender, SenderConfig, Ticket};
use ferry_proto::SessionId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot open a local UDP socket: {0}")]
    Endpoint(#[source] std::io::Error),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("cannot connect to {addr} over TCP: {source}")]
    TcpConnect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plaintext(#[from] TcpError),
    #[error("no random connection token: {0}")]
    Token(#[source] std::io::Error),
    #[error("connection to {addr}: {source}")]
    Connection {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("reading from the page server: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("reading from the page server: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing to the page server: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("writing to the page server: {0}")]
    TcpWrite(#[source] std::io::Error),
    #[error("page server closed the control stream")]
    Closed,
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("encoding a batch: {0}")]
    Batch(#[from] BatchError),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("page server ended the session: {0}")]
    Aborted(String),
    #[error("a data stream task failed: {0}")]
    Lane(String),
    #[error("no answer from the page server within {0:?}")]
    Timeout(Duration),
}

/// How the source reaches the page server.
#[derive(Clone)]
pub enum Transport {
    /// QUIC with mutual TLS; `server_name` is checked in the server's
    /// certificate.
    Quic {
        tls: quinn::ClientConfig,
        server_name: String,
    },
    /// Plain TCP with the same frames: unencrypted and unauthenticated, a
    /// benchmark baseline. A non-loopback address is refused unless
    /// `allow_remote`.
    Tcp { allow_remote: bool },
}

/// QUIC data streams the lanes share by default (see
/// [`Connect::quic_streams`]).
pub const QUIC_STREAMS: usize = 1;

/// Where and how to connect.
#[derive(Clone)]
pub struct Connect {
    pub addr: SocketAddr,
    pub transport: Transport,
    /// Lanes: batches encoded (compressed) and sent in parallel. Over TCP
    /// each lane has a connection of its own; over QUIC they share
    /// `quic_streams` data streams.
    pub streams: usize,
    /// QUIC data streams the lanes share (at least 1, at most `streams`).
    /// Every stream of a connection shares its congestion window, so more
    /// streams add no rate, only CPU: on loopback 4 streams cost ~25 % more
    /// CPU per byte than 1 at both ends together (`ferry bench`, r0
    /// CPU/MiB 3.36 against 2.67 ms), and [`QUIC_STREAMS`] is the default.
    pub quic_streams: usize,
    pub compress: Compress,
    /// Longest wait for any one answer of the page server.
    pub timeout: Duration,
    /// Cap on the data streams together, in wire bytes per second; 0 for
    /// none (see [`crate::pace`]).
    pub max_rate: u64,
}

impl Connect {
    /// QUIC with mutual TLS.
    pub fn new(addr: SocketAddr, tls: quinn::ClientConfig) -> Self {
        Self::with_transport(
            addr,
            Transport::Quic {
                tls,
                server_name: ferry_page_server::tls::SERVER_NAME.into(),
            },
        )
    }

    /// Plain TCP, loopback only (see [`Transport::Tcp`]).
    pub fn tcp(addr: SocketAddr) -> Self {
        Self::with_transport(
            addr,
            Transport::Tcp {
                allow_remote: false,
            },
        )
    }

    pub fn with_transport(addr: SocketAddr, transport: Transport) -> Self {
        Self {
            addr,
            transport,
            streams: 4,
            quic_streams: QUIC_STREAMS,
            compress: Compress::default(),
            timeout: Duration::from_secs(60),
            max_rate: 0,
        }
    }
}

/// What one layer cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub layer: u32,
    pub batches: u32,
    pub pages: u64,
    pub zero_pages: u64,
    /// Data bytes before compression.
    pub raw_bytes: u64,
    /// Payload bytes sent.
    pub wire_bytes: u64,
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Stored {
        layers: u32,
        pages: u64,
    },
    /// `pid` on the destination; with `--keep-pids` also its pid inside
    /// the pid namespace it was restored into and that namespace's inode.
    Restored {
        pid: i32,
        ns_pid: i32,
        pid_ns: u64,
    },
    Failed {
        reason: String,
    },
    /// Two-phase end: the source said `Go` for the destination's process
    /// `pid`, but the answer never came: whether that copy runs is only
    /// known by asking ([`Client::query`]).
    InDoubt {
        pid: i32,
        error: String,
    },
}

/// The page server's answer to [`Client::query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryAnswer {
    pub fate: Fate,
    /// What it can tell about a session it does not know.
    pub note: String,
    /// How long it has been up.
    pub uptime: Duration,
}

struct Job {
    ticket: Ticket,
    pages: Pages,
}

enum Pages {
    Data(Vec<(u64, Bytes)>),
    Zero(Vec<(u64, u64)>),
}

struct Done {
    ticket: Ticket,
    pages: u64,
    zero_pages: u64,
    raw: u64,
    wire: u64,
    digest: u64,
}

/// The connection under a session.
enum Link {
    Quic {
        endpoint: quinn::Endpoint,
        conn: quinn::Connection,
    },
    /// Data connections repeat the control connection's token.
    Tcp { token: [u8; 16] },
}

/// The control stream, both ways.
enum Control {
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    Tcp {
        send: OwnedWriteHalf,
        recv: OwnedReadHalf,
    },
}

/// Where a lane writes its batches.
enum DataStream {
    Quic(quinn::SendStream),
    Tcp(TcpStream),
}

/// A data stream and the lanes that write to it, a whole batch frame at a
/// time under the lock, so frames never interleave.
type SharedStream = Arc<tokio::sync::Mutex<DataStream>>;

fn shared_stream(s: DataStream) -> SharedStream {
    Arc::new(tokio::sync::Mutex::new(s))
}

/// A session with a page server.
pub struct Client {
    link: Link,
    addr: SocketAddr,
    timeout: Duration,
    control: Control,
    cbuf: BytesMut,
    sender: Sender,
    lanes: Vec<mpsc::Sender<Job>>,
    next_lane: usize,
    done_rx: mpsc::UnboundedReceiver<Result<Done, ClientError>>,
    outstanding: usize,
    stats: LayerStats,
    lane_tasks: JoinSet<()>,
    /// Set once `Go` is on its way: from then on the destination may run
    /// the process.
    go_sent: Arc<AtomicBool>,
}

impl Client {
    /// Connects, says Hello and waits for Welcome. The returned client's
    /// [`Client::next_layer`] is where the page server wants to continue
    /// (0 unless the session is resumed).
    pub async fn connect(c: Connect, session: SenderConfig) -> Result<Client, ClientError> {
        let addr = c.addr;
        let conn_err = |source| ClientError::Connection { addr, source };
        let (link, control) = open(&c).await?;
        let page_size = session.page_size;
        let asked_ready_go = session
            .features
            .iter()
            .any(|f| f == ferry_proto::FEATURE_READY_GO);
        let mut client = Client {
            link,
            addr,
            timeout: c.timeout,
            control,
            cbuf: BytesMut::with_capacity(64 << 10),
            sender: Sender::new(session),
            lanes: Vec::new(),
            next_lane: 0,
            done_rx: mpsc::unbounded_channel().1,
            outstanding: 0,
            stats: LayerStats::default(),
            lane_tasks: JoinSet::new(),
            go_sent: Arc::new(AtomicBool::new(false)),
        };
        let hello = client.sender.hello()?;
        client.write(&hello).await?;
        match client.next_event().await? {
            Event::Welcomed { .. } => {}
            e => {
                return Err(ClientError::Protocol(ProtocolError::Unexpected {
                    state: "awaiting Welcome",
                    msg: event_name(&e),
                }))
            }
        }
        if asked_ready_go && !client.sender.ready_go() {
            tracing::warn!(
                %addr,
                "the page server does not offer the two-phase end (ready-go; an older \
                 version?): the migration ends in one phase, and should its answer be lost \
                 the source resumes although the destination may run the process too"
            );
        }
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        client.done_rx = done_rx;
        let pacer = crate::pace::Pacer::new(c.max_rate).map(std::sync::Arc::new);
        let lanes = c.streams.max(1);
        let shared = c.quic_streams.clamp(1, lanes);
        let mut quic_streams: Vec<SharedStream> = Vec::new();
        for i in 0..lanes {
            let send = match &client.link {
                Link::Quic { .. } if i >= shared => quic_streams[i % shared].clone(),
                Link::Quic { conn, .. } => {
                    let s =
                        shared_stream(DataStream::Quic(conn.open_uni().await.map_err(conn_err)?));
                    quic_streams.push(s.clone());
                    s
                }
                Link::Tcp { token } => shared_stream(DataStream::Tcp(
                    open_tcp(addr, Kind::Data, *token, c.timeout).await?,
                )),
            };
            let (tx, rx) = mpsc::channel(2);
            client.lanes.push(tx);
            client.lane_tasks.spawn(lane(
                send,
                rx,
                done_tx.clone(),
                page_size,
                c.compress,
                pacer.clone(),
                addr,
            ));
        }
        Ok(client)
    }

    /// Asks the page server at `c` what became of `session` (a two-phase
    /// session whose answer was lost after `Go`), on a new connection with
    /// the same identity; no session is created.
    pub async fn query(c: &Connect, session: SessionId) -> Result<QueryAnswer, ClientError> {
        let (link, mut control) = open(c).await?;
        let ask = async {
            control
                .write(&encode(&ferry_proto::session::query(session)), c.addr)
                .await?;
            let mut buf = BytesMut::new();
            loop {
                if let Some(m) = frame::decode_control(&mut buf)? {
                    return Ok::<_, ClientError>(m);
                }
                if control.read(&mut buf, c.addr).await? == 0 {
                    frame::check_eof(&buf)?;
                    return Err(ClientError::Closed);
                }
            }
        };
        let msg = tokio::time::timeout(c.timeout, ask)
            .await
            .map_err(|_| ClientError::Timeout(c.timeout));
        if let Link::Quic { endpoint, conn } = &link {
            conn.close(0u32.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        let msg = msg??;
        let (note, uptime_ms) = match &msg.msg {
            Some(pb::control::Msg::Outcome(o)) => (o.reason.clone(), o.uptime_ms),
            _ => (String::new(), 0),
        };
        Ok(QueryAnswer {
            fate: ferry_proto::session::read_outcome(msg)?,
            note,
            uptime: Duration::from_millis(uptime_ms),
        })
    }

    /// Set once `Go` has gone out (see [`CommitOutcome::InDoubt`]).
    pub fn go_flag(&self) -> Arc<AtomicBool> {
        self.go_sent.clone()
    }
}

/// Opens the connection and its control stream.
async fn open(c: &Connect) -> Result<(Link, Control), ClientError> {
    let addr = c.addr;
    let conn_err = |source| ClientError::Connection { addr, source };
    Ok(match &c.transport {
        Transport::Quic { tls, server_name } => {
            let bind: SocketAddr = if addr.is_ipv6() {
                "[::]:0".parse().expect("literal")
            } else {
                "0.0.0.0:0".parse().expect("literal")
            };
            let endpoint =
                ferry_page_server::tls::endpoint(bind, None).map_err(ClientError::Endpoint)?;
            let conn = endpoint
                .connect_with(tls.clone(), addr, server_name)
                .map_err(|source| ClientError::Connect { addr, source })?;
            let conn = tokio::time::timeout(c.timeout, conn)
                .await
                .map_err(|_| ClientError::Timeout(c.timeout))?
                .map_err(conn_err)?;
            let (send, recv) = conn.open_bi().await.map_err(conn_err)?;
            (Link::Quic { endpoint, conn }, Control::Quic { send, recv })
        }
        Transport::Tcp { allow_remote } => {
            check_plaintext_addr(addr, *allow_remote)?;
            tracing::warn!(%addr, "{}", ferry_page_server::tcp::WARNING);
            let token = random_token().map_err(ClientError::Token)?;
            let sock = open_tcp(addr, Kind::Control, token, c.timeout).await?;
            let (recv, send) = sock.into_split();
            (Link::Tcp { token }, Control::Tcp { send, recv })
        }
    })
}

impl Client {
    /// The id the next layer gets.
    pub fn next_layer(&self) -> u32 {
        self.sender.next_layer()
    }

    pub fn page_size(&self) -> u32 {
        self.sender.page_size()
    }

    /// Starts a layer with the mappings of its round.
    pub async fn begin_layer(&mut self, vmas: Vec<pb::Vma>) -> Result<u32, ClientError> {
        let layer = self.sender.next_layer();
        let msg = self.sender.begin_layer(vmas)?;
        self.write(&msg).await?;
        self.stats = LayerStats {
            layer,
            ..Default::default()
        };
        Ok(layer)
    }

    /// Queues one batch: contiguous page ranges, ascending, at most
    /// `ferry_proto::frame::MAX_BATCH_PAYLOAD` bytes in all. Waits while
    /// every lane is busy.
    pub async fn send_pages(&mut self, ranges: Vec<(u64, Bytes)>) -> Result<(), ClientError> {
        self.submit(Pages::Data(ranges)).await
    }

    /// Queues one batch of page ranges `[start, end)` that read as zero
    /// (sent as zero runs, no data): ascending, at most
    /// `ferry_proto::batch::MAX_RUNS` of them.
    pub async fn send_zero(&mut self, ranges: Vec<(u64, u64)>) -> Result<(), ClientError> {
        self.submit(Pages::Zero(ranges)).await
    }

    async fn submit(&mut self, pages: Pages) -> Result<(), ClientError> {
        self.collect_done(false).await?;
        let ticket = self.sender.next_batch()?;
        let lane = self.next_lane;
        self.next_lane = (self.next_lane + 1) % self.lanes.len();
        self.outstanding += 1;
        if self.lanes[lane].send(Job { ticket, pages }).await.is_err() {
            // The lane stopped on an error, which it reported: take that.
            self.collect_done(false).await?;
            return Err(self
                .explain(ClientError::Lane("data stream task ended".into()))
                .await);
        }
        Ok(())
    }

    /// Waits for every queued batch to be written, then sends `LayerEnd`.
    /// The layer is not yet sealed: see [`Client::wait_sealed`].
    pub async fn end_layer(&mut self) -> Result<LayerStats, ClientError> {
        self.collect_done(true).await?;
        let msg = self.sender.end_layer()?;
        self.write(&msg).await?;
        Ok(self.stats)
    }

    /// Waits until the page server has made the oldest unsealed layer
    /// durable.
    pub async fn wait_sealed(&mut self) -> Result<(u32, u64), ClientError> {
        match self.next_event().await? {
            Event::Sealed { layer, pages } => Ok((layer, pages)),
            e => Err(ClientError::Protocol(ProtocolError::Unexpected {
                state: "awaiting LayerSealed",
                msg: event_name(&e),
            })),
        }
    }

    /// A whole layer: begin, the batches, end, sealed.
    pub async fn send_layer(
        &mut self,
        vmas: Vec<pb::Vma>,
        batches: impl IntoIterator<Item = Vec<(u64, Bytes)>>,
    ) -> Result<LayerStats, ClientError> {
        self.begin_layer(vmas).await?;
        for b in batches {
            self.send_pages(b).await?;
        }
        let stats = self.end_layer().await?;
        self.wait_sealed().await?;
        Ok(stats)
    }

    pub async fn send_state(&mut self, tree: pb::ProcessTree) -> Result<(), ClientError> {
        let msg = self.sender.state(tree)?;
        self.write(&msg).await
    }

    /// Post-copy: names the ranges left out of the last layer (before
    /// [`Client::commit_lazy`]).
    pub async fn post_copy(&mut self, ranges: &[(u64, u64)]) -> Result<(), ClientError> {
        let ranges = ranges
            .iter()
            .map(|&(start, end)| pb::LazyRange { start, end })
            .collect();
        let msg = self.sender.post_copy(ranges)?;
        self.write(&msg).await
    }

    /// Commits a post-copy session: like [`Client::commit`], but on
    /// `Restored` the connection stays open and is handed over to serve
    /// the missing pages (QUIC only).
    pub async fn commit_lazy(mut self) -> Result<(CommitOutcome, Option<LazyLink>), ClientError> {
        let outcome = self.verdict(true).await?;
        if !matches!(outcome, CommitOutcome::Restored { .. }) {
            tokio::spawn(self.close(0, b"done"));
            return Ok((outcome, None));
        }
        self.lanes.clear();
        self.lane_tasks.shutdown().await;
        let Link::Quic { endpoint, conn } = self.link else {
            return Err(ClientError::Lane("post-copy needs QUIC".into()));
        };
        let link = LazyLink {
            endpoint,
            conn,
            control: self.control,
            cbuf: self.cbuf,
            addr: self.addr,
            page_size: self.sender.page_size(),
        };
        Ok((outcome, Some(link)))
    }

    /// Commits the session and waits for the page server's verdict; layers
    /// still unsealed are waited for on the way. Closes the connection.
    pub async fn commit(mut self, restore: bool) -> Result<CommitOutcome, ClientError> {
        let outcome = self.verdict(restore).await?;
        // The answer is in: closing (draining the connection) is no business
        // of the caller, who may be holding a frozen process meanwhile.
        tokio::spawn(self.close(0, b"done"));
        Ok(outcome)
    }

    async fn verdict(&mut self, restore: bool) -> Result<CommitOutcome, ClientError> {
        let msg = self.sender.commit(restore)?;
        self.write(&msg).await?;
        let outcome = loop {
            match self.next_event().await? {
                Event::Sealed { .. } => continue,
                Event::Stored { layers, pages } => break CommitOutcome::Stored { layers, pages },
                Event::Restored {
                    pid,
                    ns_pid,
                    pid_ns,
                } => {
                    break CommitOutcome::Restored {
                        pid,
                        ns_pid,
                        pid_ns,
                    }
                }
                Event::Failed { reason } => break CommitOutcome::Failed { reason },
                Event::Ready { pid } => break self.go(pid).await,
                e => {
                    return Err(ClientError::Protocol(ProtocolError::Unexpected {
                        state: "committing",
                        msg: event_name(&e),
                    }))
                }
            }
        };
        if let Link::Quic { conn, .. } = &self.link {
            let st = conn.stats();
            tracing::debug!(
                mtu = st.path.current_mtu,
                sent_packets = st.path.sent_packets,
                lost_packets = st.path.lost_packets,
                black_holes = st.path.black_holes_detected,
                rtt_us = st.path.rtt.as_micros() as u64,
                cwnd = st.path.cwnd,
                udp_datagrams = st.udp_tx.datagrams,
                udp_bytes = st.udp_tx.bytes,
                "QUIC path at commit"
            );
        }
        Ok(outcome)
    }

    /// Two-phase end, the destination holding `pid` ready: says `Go` and
    /// waits for `Restored`. From the moment `Go` is written the outcome
    /// can only be in doubt, never a failure to resume on: any error is
    /// [`CommitOutcome::InDoubt`].
    async fn go(&mut self, pid: i32) -> CommitOutcome {
        if crate::failpoint::armed("client", "ready") {
            // Test only: ferry dies between Ready and Go.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        let in_doubt = |error: String| CommitOutcome::InDoubt { pid, error };
        let go = match self.sender.go() {
            Ok(go) => go,
            Err(e) => return in_doubt(e.to_string()),
        };
        self.go_sent.store(true, Ordering::SeqCst);
        if let Err(e) = self.write(&go).await {
            return in_doubt(e.to_string());
        }
        match self.next_event().await {
            Ok(Event::Restored {
                pid,
                ns_pid,
                pid_ns,
            }) => CommitOutcome::Restored {
                pid,
                ns_pid,
                pid_ns,
            },
            // The release failed and the process was killed: none runs.
            Ok(Event::Failed { reason }) => CommitOutcome::Failed { reason },
            Ok(e) => in_doubt(format!("unexpected {} after Go", event_name(&e))),
            Err(e) => in_doubt(e.to_string()),
        }
    }

    /// Gives up: tells the page server why, so it drops the unsealed layer.
    pub async fn abort(mut self, reason: &str) {
        let msg = self.sender.abort(reason);
        let _ = self.control.write(&encode(&msg), self.addr).await;
        self.control.finish(Duration::from_secs(1)).await;
        self.close(1, reason.as_bytes()).await;
    }

    async fn close(mut self, code: u32, reason: &[u8]) {
        self.lanes.clear();
        self.lane_tasks.shutdown().await;
        // TCP has no close reason to give: its sockets close as they drop.
        if let Link::Quic { endpoint, conn } = &self.link {
            conn.close(code.into(), reason);
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
    }

    /// Accounts finished batches; with `all`, waits for every outstanding
    /// one.
    async fn collect_done(&mut self, all: bool) -> Result<(), ClientError> {
        loop {
            let d = if all && self.outstanding > 0 {
                self.done_rx
                    .recv()
                    .await
                    .ok_or_else(|| ClientError::Lane("data stream tasks ended".into()))?
            } else {
                match self.done_rx.try_recv() {
                    Ok(d) => d,
                    Err(_) => return Ok(()),
                }
            };
            let d = match d {
                Ok(d) => d,
                Err(e) => return Err(self.explain(e).await),
            };
            self.outstanding -= 1;
            self.sender.batch_sent(d.ticket, d.pages, d.digest)?;
            let s = &mut self.stats;
            s.batches += 1;
            s.pages += d.pages;
            s.zero_pages += d.zero_pages;
            s.raw_bytes += d.raw;
            s.wire_bytes += d.wire;
            if all && self.outstanding == 0 {
                return Ok(());
            }
        }
    }

    /// A stream the page server stopped or reset says nothing about why.
    /// Over QUIC, the connection close that follows does; over TCP, which
    /// has no close reason, the `Abort` the page server sent before closing
    /// does. Waits a moment for either.
    async fn explain(&mut self, e: ClientError) -> ClientError {
        let wait = Duration::from_secs(1);
        match (&self.link, e) {
            (
                Link::Quic { conn, .. },
                e @ (ClientError::Write(quinn::WriteError::Stopped(_)) | ClientError::Lane(_)),
            ) => {
                let conn = conn.clone();
                match tokio::time::timeout(wait, conn.closed()).await {
                    Ok(source) => ClientError::Connection {
                        addr: self.addr,
                        source,
                    },
                    Err(_) => e,
                }
            }
            (Link::Tcp { .. }, e @ (ClientError::TcpWrite(_) | ClientError::Lane(_))) => {
                match tokio::time::timeout(wait, self.abort_reason()).await {
                    Ok(Some(reason)) => ClientError::Aborted(reason),
                    _ => e,
                }
            }
            (_, e) => e,
        }
    }

    /// Reads what is left of the control stream for the page server's
    /// `Abort`; `None` if the stream ends or fails first.
    async fn abort_reason(&mut self) -> Option<String> {
        loop {
            loop {
                match frame::decode_control(&mut self.cbuf) {
                    Ok(Some(pb::Control {
                        msg: Some(pb::control::Msg::Abort(a)),
                    })) => return Some(a.reason),
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => return None,
                }
            }
            match self.control.read(&mut self.cbuf, self.addr).await {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
        }
    }

    async fn write(&mut self, msg: &pb::Control) -> Result<(), ClientError> {
        match self.control.write(&encode(msg), self.addr).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.explain(e).await),
        }
    }

    async fn next_event(&mut self) -> Result<Event, ClientError> {
        let read = async {
            loop {
                if let Some(m) = frame::decode_control(&mut self.cbuf)? {
                    return Ok::<_, ClientError>(m);
                }
                let n = self.control.read(&mut self.cbuf, self.addr).await?;
                if n == 0 {
                    frame::check_eof(&self.cbuf)?;
                    return Err(ClientError::Closed);
                }
            }
        };
        let msg = tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))??;
        match self.sender.handle_control(msg)? {
            Event::Aborted { reason } => Err(ClientError::Aborted(reason)),
            e => Ok(e),
        }
    }
}

/// The connection of a post-copy session after `Restored`: the control
/// stream (page requests in, `PostCopyDone` in) and the means to open data
/// streams for the pages (see [`crate::postcopy`]).
pub struct LazyLink {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    control: Control,
    cbuf: BytesMut,
    addr: SocketAddr,
    page_size: u32,
}

/// A data stream of a post-copy session.
pub struct LazyStream(quinn::SendStream);

impl LazyLink {
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A new data stream; a higher `priority` is sent first.
    pub async fn open_stream(&self, priority: i32) -> Result<LazyStream, ClientError> {
        let s = self
            .conn
            .open_uni()
            .await
            .map_err(|source| ClientError::Connection {
                addr: self.addr,
                source,
            })?;
        let _ = s.set_priority(priority);
        Ok(LazyStream(s))
    }

    /// The page server's next control message (no time limit: a process
    /// that faults rarely asks rarely; a dead peer ends the connection by
    /// QUIC's idle timeout).
    pub async fn next_message(&mut self) -> Result<pb::Control, ClientError> {
        loop {
            if let Some(m) = frame::decode_control(&mut self.cbuf)? {
                return Ok(m);
            }
            let n = self.control.read(&mut self.cbuf, self.addr).await?;
            if n == 0 {
                frame::check_eof(&self.cbuf)?;
                return Err(ClientError::Closed);
            }
        }
    }

    /// Ends the session: closes the connection and waits (briefly) until
    /// the page server has it.
    pub async fn close(self, code: u32, reason: &[u8]) {
        self.conn.close(code.into(), reason);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Tells the page server to give up (it kills the process it holds).
    pub async fn abort(mut self, reason: &str) {
        let msg = ferry_proto::session::control(pb::control::Msg::Abort(pb::Abort {
            reason: reason.into(),
        }));
        let _ = self.control.write(&encode(&msg), self.addr).await;
        self.control.finish(Duration::from_secs(1)).await;
        self.close(1, reason.as_bytes()).await;
    }
}

impl LazyStream {
    /// Writes one encoded batch.
    pub async fn write(
        &mut self,
        b: ferry_proto::batch::EncodedBatch,
        addr: SocketAddr,
    ) -> Result<(), ClientError> {
        let prefix = frame::encode_batch_prefix(&b.header, b.wire_bytes() as usize);
        let mut chunks = Vec::with_capacity(1 + b.payload.len());
        chunks.push(prefix);
        chunks.extend(b.payload);
        self.0
            .write_all_chunks(&mut chunks)
            .await
            .map_err(|e| match e {
                quinn::WriteError::ConnectionLost(source) => {
                    ClientError::Connection { addr, source }
                }
                e => ClientError::Write(e),
            })
    }

    /// Ends the stream once what was written is sent.
    pub fn finish(&mut self) {
        let _ = self.0.finish();
    }
}

fn encode(msg: &pb::Control) -> BytesMut {
    let mut buf = BytesMut::new();
    frame::encode_control(msg, &mut buf);
    buf
}

impl Control {
    /// Writes all of `buf`. A lost QUIC connection carries the page
    /// server's close reason: that becomes the error.
    async fn write(&mut self, buf: &[u8], addr: SocketAddr) -> Result<(), ClientError> {
        match self {
            Control::Quic { send, .. } => send.write_all(buf).await.map_err(|e| match e {
                quinn::WriteError::ConnectionLost(source) => {
                    ClientError::Connection { addr, source }
                }
                e => ClientError::Write(e),
            }),
            Control::Tcp { send, .. } => send.write_all(buf).await.map_err(ClientError::TcpWrite),
        }
    }

    /// Appends what the page server sent next to `buf`; 0 at the end of
    /// the stream.
    async fn read(&mut self, buf: &mut BytesMut, addr: SocketAddr) -> Result<usize, ClientError> {
        match self {
            Control::Quic { recv, .. } => match recv.read_chunk(1 << 16, true).await {
                Ok(Some(c)) => {
                    buf.extend_from_slice(&c.bytes);
                    Ok(c.bytes.len())
                }
                Ok(None) => Ok(0),
                Err(quinn::ReadError::ConnectionLost(source)) => {
                    Err(ClientError::Connection { addr, source })
                }
                Err(e) => Err(ClientError::Read(e)),
            },
            Control::Tcp { recv, .. } => {
                buf.reserve(64 << 10);
                Ok(recv.read_buf(buf).await?)
            }
        }
    }

    /// Ends our side and waits, at most `wait`, until the page server has
    /// it (over TCP: until it closes its side, the only sign there is).
    async fn finish(&mut self, wait: Duration) {
        match self {
            Control::Quic { send, .. } => {
                let _ = send.finish();
                let _ = tokio::time::timeout(wait, send.stopped()).await;
            }
            Control::Tcp { send, recv } => {
                let _ = send.shutdown().await;
                let _ = tokio::time::timeout(wait, drain(recv)).await;
            }
        }
    }
}

async fn drain(recv: &mut (impl AsyncRead + Unpin)) {
    let mut scratch = vec![0u8; 16 << 10];
    while let Ok(n) = recv.read(&mut scratch).await {
        if n == 0 {
            break;
        }
    }
}

impl DataStream {
    async fn write_chunks(
        &mut self,
        chunks: &mut [Bytes],
        addr: SocketAddr,
    ) -> Result<(), ClientError> {
        match self {
            DataStream::Quic(send) => send.write_all_chunks(chunks).await.map_err(|e| match e {
                // The close reason the page server gave says why.
                quinn::WriteError::ConnectionLost(source) => {
                    ClientError::Connection { addr, source }
                }
                e => ClientError::Write(e),
            }),
            DataStream::Tcp(sock) => write_all_vectored(sock, chunks)
                .await
                .map_err(ClientError::TcpWrite),
        }
    }

    async fn finish(&mut self) {
        match self {
            DataStream::Quic(send) => {
                let _ = send.finish();
            }
            DataStream::Tcp(sock) => {
                let _ = sock.shutdown().await;
            }
        }
    }
}

/// Writes the chunks in order with as few `writev` calls as the socket
/// allows, so a batch's prefix and payload leave together and nothing is
/// copied to be framed.
async fn write_all_vectored(sock: &mut TcpStream, chunks: &mut [Bytes]) -> std::io::Result<()> {
    // Well under IOV_MAX (1024).
    const MAX_SLICES: usize = 256;
    let mut i = 0;
    loop {
        while i < chunks.len() && chunks[i].is_empty() {
            i += 1;
        }
        if i == chunks.len() {
            return Ok(());
        }
        let slices: Vec<IoSlice<'_>> = chunks[i..]
            .iter()
            .take(MAX_SLICES)
            .map(|c| IoSlice::new(c))
            .collect();
        let mut n = sock.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let take = n.min(chunks[i].len());
            chunks[i].advance(take);
            n -= take;
            if chunks[i].is_empty() {
                i += 1;
            }
        }
    }
}

/// Opens one TCP connection of a session and sends its preamble.
async fn open_tcp(
    addr: SocketAddr,
    kind: Kind,
    token: [u8; 16],
    timeout: Duration,
) -> Result<TcpStream, ClientError> {
    let err = |source| ClientError::TcpConnect { addr, source };
    let mut sock = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
        .map_err(err)?;
    // Control messages are answered one by one; Nagle's delay would land on
    // each of those round trips.
    sock.set_nodelay(true).map_err(err)?;
    sock.write_all(&Preamble { kind, token }.encode())
        .await
        .map_err(err)?;
    Ok(sock)
}

/// The token that ties a session's TCP connections together: random, so
/// concurrent sources do not collide.
fn random_token() -> std::io::Result<[u8; 16]> {
    use std::io::Read as _;
    let mut t = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut t)?;
    Ok(t)
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Welcomed { .. } => "Welcome",
        Event::Sealed { .. } => "LayerSealed",
        Event::Stored { .. } => "Stored",
        Event::Restored { .. } => "Restored",
        Event::Failed { .. } => "Failed",
        Event::Aborted { .. } => "Abort",
        Event::Ready { .. } => "Ready",
    }
}

/// One data stream: encode each job, write it, report what it cost.
async fn lane(
    send: SharedStream,
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::UnboundedSender<Result<Done, ClientError>>,
    page_size: u32,
    compress: Compress,
    pacer: Option<std::sync::Arc<crate::pace::Pacer>>,
    addr: SocketAddr,
) {
    let mut encoder = Some(Encoder::new(page_size, compress));
    while let Some(job) = jobs.recv().await {
        let Some(mut enc) = encoder.take() else {
            return;
        };
        let joined = tokio::task::spawn_blocking(move || {
            let t = job.ticket;
            let r = match job.pages {
                Pages::Data(ranges) => enc.encode(t.layer, t.seq, ranges),
                Pages::Zero(ranges) => enc.encode_zero(t.layer, t.seq, &ranges),
            };
            (enc, r)
        })
        .await;
        let (enc, encoded) = match joined {
            Ok(x) => x,
            Err(e) => {
                let _ = done.send(Err(ClientError::Lane(e.to_string())));
                return;
            }
        };
        encoder = Some(enc);
        let result = match encoded {
            Ok(b) => {
                let prefix = frame::encode_batch_prefix(&b.header, b.wire_bytes() as usize);
                let (wire, raw) = (b.wire_bytes(), b.raw_bytes());
                if let Some(p) = &pacer {
                    p.wait((prefix.len() as u64) + wire).await;
                }
                let mut chunks = Vec::with_capacity(1 + b.payload.len());
                chunks.push(prefix);
                chunks.extend(b.payload);
                // A lane whose write fails ends the session, so no other
                // lane writes after a partial frame.
                let mut stream = send.lock().await;
                stream.write_chunks(&mut chunks, addr).await.map(|()| Done {
                    ticket: job.ticket,
                    pages: b.pages,
                    zero_pages: b.zero_pages,
                    raw,
                    wire,
                    digest: b.digest,
                })
            }
            Err(e) => Err(e.into()),
        };
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            return;
        }
    }
    // The last lane on a stream ends it.
    if let Some(s) = Arc::into_inner(send) {
        s.into_inner().finish().await;
    }
}
