//! The source's QUIC client: streams layers to a page server through the
//! `ferry_proto` sender state machine.
//!
//! A connection has one control stream and `streams` data streams ("lanes").
//! Each lane is a task that encodes its batches (zero detection, zstd) on the
//! blocking pool and writes them to its own QUIC stream, so encoding runs in
//! parallel and a packet lost on one stream never stalls the others. Lanes
//! take jobs through bounded channels: a producer faster than the network
//! waits instead of filling memory. Batch numbers are handed out in
//! submission order by the sender state machine, so the destination puts
//! the layer back together whatever order the lanes deliver in.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_proto::batch::{BatchError, Compress, Encoder};
use ferry_proto::frame::{self, FrameError};
use ferry_proto::pb;
use ferry_proto::session::{Event, ProtocolError, Sender, SenderConfig, Ticket};
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

/// Where and how to connect.
#[derive(Clone)]
pub struct Connect {
    pub addr: SocketAddr,
    pub tls: quinn::ClientConfig,
    /// Name checked in the server's certificate.
    pub server_name: String,
    /// Data streams used in parallel.
    pub streams: usize,
    pub compress: Compress,
    /// Longest wait for any one answer of the page server.
    pub timeout: Duration,
}

impl Connect {
    pub fn new(addr: SocketAddr, tls: quinn::ClientConfig) -> Self {
        Self {
            addr,
            tls,
            server_name: ferry_page_server::tls::SERVER_NAME.into(),
            streams: 4,
            compress: Compress::default(),
            timeout: Duration::from_secs(60),
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
    Stored { layers: u32, pages: u64 },
    Restored { pid: i32 },
    Failed { reason: String },
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

/// A session with a page server.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    addr: SocketAddr,
    timeout: Duration,
    csend: quinn::SendStream,
    crecv: quinn::RecvStream,
    cbuf: BytesMut,
    sender: Sender,
    lanes: Vec<mpsc::Sender<Job>>,
    next_lane: usize,
    done_rx: mpsc::UnboundedReceiver<Result<Done, ClientError>>,
    outstanding: usize,
    stats: LayerStats,
    lane_tasks: JoinSet<()>,
}

impl Client {
    /// Connects, says Hello and waits for Welcome. The returned client's
    /// [`Client::next_layer`] is where the page server wants to continue
    /// (0 unless the session is resumed).
    pub async fn connect(c: Connect, session: SenderConfig) -> Result<Client, ClientError> {
        let bind: SocketAddr = if c.addr.is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let endpoint =
            ferry_page_server::tls::endpoint(bind, None).map_err(ClientError::Endpoint)?;
        let addr = c.addr;
        let conn_err = |source| ClientError::Connection { addr, source };
        let conn = endpoint
            .connect_with(c.tls.clone(), addr, &c.server_name)
            .map_err(|source| ClientError::Connect { addr, source })?;
        let conn = tokio::time::timeout(c.timeout, conn)
            .await
            .map_err(|_| ClientError::Timeout(c.timeout))?
            .map_err(conn_err)?;
        let (csend, crecv) = conn.open_bi().await.map_err(conn_err)?;

        let page_size = session.page_size;
        let mut client = Client {
            endpoint,
            conn,
            addr,
            timeout: c.timeout,
            csend,
            crecv,
            cbuf: BytesMut::with_capacity(64 << 10),
            sender: Sender::new(session),
            lanes: Vec::new(),
            next_lane: 0,
            done_rx: mpsc::unbounded_channel().1,
            outstanding: 0,
            stats: LayerStats::default(),
            lane_tasks: JoinSet::new(),
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
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        client.done_rx = done_rx;
        for _ in 0..c.streams.max(1) {
            let send = client.conn.open_uni().await.map_err(conn_err)?;
            let (tx, rx) = mpsc::channel(2);
            client.lanes.push(tx);
            client
                .lane_tasks
                .spawn(lane(send, rx, done_tx.clone(), page_size, c.compress, addr));
        }
        Ok(client)
    }

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

    /// Commits the session and waits for the page server's verdict; layers
    /// still unsealed are waited for on the way. Closes the connection.
    pub async fn commit(mut self, restore: bool) -> Result<CommitOutcome, ClientError> {
        let msg = self.sender.commit(restore)?;
        self.write(&msg).await?;
        let outcome = loop {
            match self.next_event().await? {
                Event::Sealed { .. } => continue,
                Event::Stored { layers, pages } => break CommitOutcome::Stored { layers, pages },
                Event::Restored { pid } => break CommitOutcome::Restored { pid },
                Event::Failed { reason } => break CommitOutcome::Failed { reason },
                e => {
                    return Err(ClientError::Protocol(ProtocolError::Unexpected {
                        state: "committing",
                        msg: event_name(&e),
                    }))
                }
            }
        };
        // The answer is in: closing (draining the connection) is no business
        // of the caller, who may be holding a frozen process meanwhile.
        tokio::spawn(self.close(0, b"done"));
        Ok(outcome)
    }

    /// Gives up: tells the page server why, so it drops the unsealed layer.
    pub async fn abort(mut self, reason: &str) {
        let msg = self.sender.abort(reason);
        let _ = self.write(&msg).await;
        let _ = self.csend.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.csend.stopped()).await;
        self.close(1, reason.as_bytes()).await;
    }

    async fn close(mut self, code: u32, reason: &[u8]) {
        self.lanes.clear();
        self.lane_tasks.shutdown().await;
        self.conn.close(code.into(), reason);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
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

    /// A stream the page server stopped says nothing about why; the
    /// connection close that follows does. Waits a moment for it.
    async fn explain(&self, e: ClientError) -> ClientError {
        match e {
            ClientError::Write(quinn::WriteError::Stopped(_)) | ClientError::Lane(_) => {
                match tokio::time::timeout(Duration::from_secs(1), self.conn.closed()).await {
                    Ok(source) => ClientError::Connection {
                        addr: self.addr,
                        source,
                    },
                    Err(_) => e,
                }
            }
            e => e,
        }
    }

    async fn write(&mut self, msg: &pb::Control) -> Result<(), ClientError> {
        let mut buf = BytesMut::new();
        frame::encode_control(msg, &mut buf);
        self.csend
            .write_all(&buf)
            .await
            .map_err(|e| self.explain_write(e))
    }

    /// A write fails with "connection lost"; the close reason the page
    /// server gave says why.
    fn explain_write(&self, e: quinn::WriteError) -> ClientError {
        match e {
            quinn::WriteError::ConnectionLost(source) => ClientError::Connection {
                addr: self.addr,
                source,
            },
            e => ClientError::Write(e),
        }
    }

    async fn next_event(&mut self) -> Result<Event, ClientError> {
        let read = async {
            loop {
                if let Some(m) = frame::decode_control(&mut self.cbuf)? {
                    return Ok::<_, ClientError>(m);
                }
                let chunk = self
                    .crecv
                    .read_chunk(1 << 16, true)
                    .await
                    .map_err(|e| match e {
                        quinn::ReadError::ConnectionLost(source) => ClientError::Connection {
                            addr: self.addr,
                            source,
                        },
                        e => ClientError::Read(e),
                    })?;
                let n = match chunk {
                    Some(c) => {
                        self.cbuf.extend_from_slice(&c.bytes);
                        c.bytes.len()
                    }
                    None => 0,
                };
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

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Welcomed { .. } => "Welcome",
        Event::Sealed { .. } => "LayerSealed",
        Event::Stored { .. } => "Stored",
        Event::Restored { .. } => "Restored",
        Event::Failed { .. } => "Failed",
        Event::Aborted { .. } => "Abort",
    }
}

/// One data stream: encode each job, write it, report what it cost.
async fn lane(
    mut send: quinn::SendStream,
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::UnboundedSender<Result<Done, ClientError>>,
    page_size: u32,
    compress: Compress,
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
                let mut chunks = Vec::with_capacity(1 + b.payload.len());
                chunks.push(prefix);
                chunks.extend(b.payload);
                match send.write_all_chunks(&mut chunks).await {
                    Ok(()) => Ok(Done {
                        ticket: job.ticket,
                        pages: b.pages,
                        zero_pages: b.zero_pages,
                        raw,
                        wire,
                        digest: b.digest,
                    }),
                    // The close reason the page server gave says why.
                    Err(quinn::WriteError::ConnectionLost(source)) => {
                        Err(ClientError::Connection { addr, source })
                    }
                    Err(e) => Err(ClientError::Write(e)),
                }
            }
            Err(e) => Err(e.into()),
        };
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            return;
        }
    }
    let _ = send.finish();
}
