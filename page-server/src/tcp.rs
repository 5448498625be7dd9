//! The plain-TCP baseline transport: the same frames as over QUIC, with no
//! encryption and no authentication, so a benchmark can tell what QUIC and
//! TLS cost. It is not for migrations across a network: anyone who can
//! connect can send a session, and with restores enabled that means code
//! run on this host. [`check_plaintext_addr`] therefore allows loopback
//! addresses only, unless the caller explicitly forces otherwise.
//!
//! Each stream of a session is a TCP connection of its own, opened by a
//! preamble ([`ferry_proto::preamble`]): the control connection registers
//! the source's random token, and data connections with the same token are
//! routed to that session. Whatever is wrong with a connection before it
//! reaches a session (a bad or missing preamble, an unknown token, one data
//! connection too many, no room for another session) is logged and only
//! that socket is closed; a refused control connection is told why with an
//! `Abort`, as a session would be.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use ferry_proto::preamble::{self, Kind, Preamble, PreambleError};
use ferry_proto::{frame, pb, session::control};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::server::{SessionError, Shared};
use crate::transport::{Conn, Until};

/// Data connections one session may open (QUIC allows as many concurrent
/// data streams, see [`crate::tls::transport`]).
pub const MAX_DATA_CONNECTIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error(
        "refusing plain TCP on {0}: it is unencrypted and unauthenticated, so only loopback \
         addresses are allowed unless explicitly forced (--insecure-allow-remote)"
    )]
    NotLoopback(SocketAddr),
    #[error("reading the preamble: {0}")]
    Read(#[source] std::io::Error),
    #[error("no preamble within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Preamble(#[from] PreambleError),
    #[error("unknown connection token {0}: no session here has it")]
    UnknownToken(String),
    #[error("connection token {0} is already in use by another session")]
    TokenInUse(String),
    #[error("session with token {0} already has {MAX_DATA_CONNECTIONS} data connections")]
    TooManyData(String),
    #[error("{0} sessions already running (--max-sessions)")]
    Full(usize),
}

/// Whether plain TCP may use `addr` (to listen on or to connect to): only a
/// loopback address, unless `allow_remote`. A wildcard such as `0.0.0.0`
/// listens on every interface, so it is not loopback; an IPv4-mapped IPv6
/// address counts as its IPv4 address.
pub fn check_plaintext_addr(addr: SocketAddr, allow_remote: bool) -> Result<(), TcpError> {
    let ip: IpAddr = addr.ip().to_canonical();
    if allow_remote || ip.is_loopback() {
        Ok(())
    } else {
        Err(TcpError::NotLoopback(addr))
    }
}

/// The warning both ends print when they use plain TCP.
pub const WARNING: &str = "plain TCP transport: UNENCRYPTED and UNAUTHENTICATED (a benchmark \
baseline; anyone who can connect can send or read a session, and a page server with \
--restore runs what it is sent). Use QUIC with mutual TLS for real migrations.";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Live sessions by token, each with the way to hand it data connections.
#[derive(Default)]
struct Routes {
    map: Mutex<HashMap<[u8; 16], Route>>,
    next_id: AtomicU64,
}

struct Route {
    /// Tells this session's registration from a later one with the token.
    id: u64,
    tx: mpsc::Sender<TcpStream>,
    opened: usize,
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], Route>> {
        // A panic elsewhere while holding the lock leaves a plain map
        // behind, still consistent: keep serving.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, token: [u8; 16]) -> Result<(u64, mpsc::Receiver<TcpStream>), TcpError> {
        let mut map = self.lock();
        if map.contains_key(&token) {
            return Err(TcpError::TokenInUse(hex(&token)));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(MAX_DATA_CONNECTIONS);
        map.insert(token, Route { id, tx, opened: 0 });
        Ok((id, rx))
    }

    fn route(&self, token: [u8; 16], sock: TcpStream) -> Result<(), TcpError> {
        let mut map = self.lock();
        let route = map
            .get_mut(&token)
            .ok_or_else(|| TcpError::UnknownToken(hex(&token)))?;
        if route.opened >= MAX_DATA_CONNECTIONS {
            return Err(TcpError::TooManyData(hex(&token)));
        }
        // The channel holds as many as a session may open, so it is only
        // ever full or closed when the session has gone.
        route
            .tx
            .try_send(sock)
            .map_err(|_| TcpError::UnknownToken(hex(&token)))?;
        route.opened += 1;
        Ok(())
    }

    fn remove(&self, token: &[u8; 16], id: u64) {
        let mut map = self.lock();
        if map.get(token).is_some_and(|r| r.id == id) {
            map.remove(token);
        }
    }
}

/// One session's connections over TCP.
pub(crate) struct TcpConn {
    peer: SocketAddr,
    token: [u8; 16],
    id: u64,
    control: Mutex<Option<TcpStream>>,
    data: tokio::sync::Mutex<mpsc::Receiver<TcpStream>>,
    routes: Arc<Routes>,
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.routes.remove(&self.token, self.id);
    }
}

// Halves from `tokio::io::split`, not `into_split`: dropping the unused
// write half of a data connection must not send the source a FIN, so that
// an accepted data connection looks open and a refused one closed.
impl Conn for TcpConn {
    type Send = WriteHalf<TcpStream>;
    type Recv = ReadHalf<TcpStream>;

    fn remote_address(&self) -> SocketAddr {
        self.peer
    }

    async fn accept_control(&self) -> Result<(Self::Send, Self::Recv), SessionError> {
        let sock = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(SessionError::ControlClosed)?;
        let (r, w) = tokio::io::split(sock);
        Ok((w, r))
    }

    async fn accept_data(&self) -> Option<Self::Recv> {
        let sock = self.data.lock().await.recv().await?;
        Some(tokio::io::split(sock).0)
    }

    async fn finish(
        &self,
        send: &mut Self::Send,
        recv: &mut Self::Recv,
        _until: Until,
        wait: Duration,
    ) {
        linger(send, recv, wait).await;
    }

    fn close(&self, _code: u32, _reason: &[u8]) {
        // No more data connections for this session; the ones it has are
        // closed as their readers end, the control connection as the
        // session drops it. The reason went out in the Abort before.
        self.routes.remove(&self.token, self.id);
    }
}

/// Shuts our side of a control connection down after the last message and
/// waits, at most `wait`, for the peer to close its side: over TCP that is
/// the only sign it has read everything. Reading until then also matters:
/// closing a socket with unread bytes sends a reset, which can destroy the
/// last message before the peer reads it.
async fn linger(
    send: &mut (impl AsyncWrite + Unpin),
    recv: &mut (impl AsyncRead + Unpin),
    wait: Duration,
) {
    let _ = send.shutdown().await;
    let _ = tokio::time::timeout(wait, drain(recv)).await;
}

async fn drain(recv: &mut (impl AsyncRead + Unpin)) {
    let mut scratch = vec![0u8; 64 << 10];
    while let Ok(n) = recv.read(&mut scratch).await {
        if n == 0 {
            break;
        }
    }
}

/// Serves TCP connections until `shutdown` resolves.
pub(crate) async fn run(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot serve the TCP listener: {e}");
            return;
        }
    };
    let routes = Arc::new(Routes::default());
    let sessions = Arc::new(Semaphore::new(shared.max_sessions));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let (shared, routes, sessions) =
                        (shared.clone(), routes.clone(), sessions.clone());
                    tasks.spawn(async move {
                        if let Err(e) = serve_socket(sock, peer, shared, routes, sessions).await {
                            warn!(%peer, "refusing TCP connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors, mostly: let some close first.
                    warn!("accepting a TCP connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

async fn read_preamble(sock: &mut TcpStream, wait: Duration) -> Result<Preamble, TcpError> {
    let mut b = [0u8; preamble::LEN];
    tokio::time::timeout(wait, sock.read_exact(&mut b))
        .await
        .map_err(|_| TcpError::Timeout(wait))?
        .map_err(TcpError::Read)?;
    Ok(Preamble::decode(&b)?)
}

async fn serve_socket(
    mut sock: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    routes: Arc<Routes>,
    sessions: Arc<Semaphore>,
) -> Result<(), TcpError> {
    // Control messages are small and answered one by one: Nagle's delay
    // would land on every round trip, the freeze's included.
    let _ = sock.set_nodelay(true);
    let p = read_preamble(&mut sock, shared.handshake_timeout).await?;
    match p.kind {
        Kind::Data => {
            routes.route(p.token, sock)?;
            debug!(%peer, token = %hex(&p.token), "data connection routed");
            Ok(())
        }
        Kind::Control => {
            let Ok(permit) = sessions.try_acquire_owned() else {
                return Err(refuse(sock, TcpError::Full(shared.max_sessions)).await);
            };
            let (id, rx) = match routes.register(p.token) {
                Ok(r) => r,
                Err(e) => return Err(refuse(sock, e).await),
            };
            let conn = TcpConn {
                peer,
                token: p.token,
                id,
                control: Mutex::new(Some(sock)),
                data: tokio::sync::Mutex::new(rx),
                routes,
            };
            crate::server::serve(Arc::new(conn), shared).await;
            drop(permit);
            Ok(())
        }
    }
}

/// Tells a refused source why, as an `Abort` on its control connection
/// (the sender state machine takes one in any state), and hands the error
/// back for the log.
async fn refuse(sock: TcpStream, e: TcpError) -> TcpError {
    let mut buf = BytesMut::new();
    frame::encode_control(
        &control(pb::control::Msg::Abort(pb::Abort {
            reason: format!("page server refused the connection: {e}"),
        })),
        &mut buf,
    );
    let (mut r, mut w) = tokio::io::split(sock);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = w.write_all(&buf).await;
        linger(&mut w, &mut r, Duration::from_millis(500)).await;
    })
    .await;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn plaintext_is_loopback_only_unless_forced() {
        for ok in [
            "127.0.0.1:7070",
            "127.1.2.3:1",
            "[::1]:7070",
            "[::ffff:127.0.0.1]:7070",
        ] {
            check_plaintext_addr(a(ok), false).unwrap();
        }
        for refused in [
            "0.0.0.0:7070",
            "[::]:7070",
            "10.0.0.1:7070",
            "192.168.1.2:7070",
            "[::ffff:10.0.0.1]:7070",
            "[fe80::1]:7070",
            "[2001:db8::1]:7070",
        ] {
            let e = check_plaintext_addr(a(refused), false).unwrap_err();
            assert!(matches!(e, TcpError::NotLoopback(x) if x == a(refused)));
            assert!(e.to_string().contains("unencrypted"), "{e}");
            check_plaintext_addr(a(refused), true).unwrap();
        }
    }

    #[test]
    fn routes_refuse_unknown_tokens_duplicates_and_one_too_many() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accept = || async {
                let (s, c) = tokio::join!(listener.accept(), TcpStream::connect(addr));
                (s.unwrap().0, c.unwrap())
            };
            let routes = Routes::default();
            let (id, mut rx) = routes.register([1; 16]).unwrap();
            assert!(matches!(
                routes.register([1; 16]),
                Err(TcpError::TokenInUse(_))
            ));
            let (s, _c) = accept().await;
            assert!(matches!(
                routes.route([2; 16], s),
                Err(TcpError::UnknownToken(_))
            ));
            let mut keep = Vec::new();
            for _ in 0..MAX_DATA_CONNECTIONS {
                let (s, c) = accept().await;
                routes.route([1; 16], s).unwrap();
                keep.push(c);
            }
            let (s, _c) = accept().await;
            assert!(matches!(
                routes.route([1; 16], s),
                Err(TcpError::TooManyData(_))
            ));
            for _ in 0..MAX_DATA_CONNECTIONS {
                rx.recv().await.unwrap();
            }
            // A stale removal leaves a newer registration alone.
            routes.remove(&[1; 16], id + 100);
            assert!(routes.lock().contains_key(&[1; 16]));
            routes.remove(&[1; 16], id);
            let (s, _c) = accept().await;
            assert!(matches!(
                routes.route([1; 16], s),
                Err(TcpError::UnknownToken(_))
            ));
        });
    }
}
