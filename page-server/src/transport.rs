//! What a session needs from the connection that carries it, so that one
//! session driver ([`crate::server`]) runs unchanged over QUIC with mutual
//! TLS and over the plain-TCP baseline ([`crate::tcp`]).
//!
//! A connection gives a control stream (both directions), then any number
//! of data streams (source to server), and a way to end it. The two
//! transports differ in how an ending is told: QUIC carries a close code
//! and reason and acknowledges stream data; TCP has neither, so there the
//! session's last control message (an `Abort` with the reason, which the
//! session sends on either transport) is the explanation, and the peer
//! closing its side is the only sign it has read it.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::server::SessionError;

/// How long [`Conn::finish`] waits, at most, and for what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// The peer has received everything sent (the session failed: its
    /// `Abort` must arrive before the connection is closed).
    Delivered,
    /// The peer has gone (the session finished: its answer is in, the
    /// source closes when it has read it).
    Gone,
}

pub(crate) trait Conn: Send + Sync + 'static {
    type Send: AsyncWrite + Send + Unpin + 'static;
    type Recv: AsyncRead + Send + Unpin + 'static;

    fn remote_address(&self) -> SocketAddr;

    /// The control stream, which the source opens first.
    fn accept_control(
        &self,
    ) -> impl Future<Output = Result<(Self::Send, Self::Recv), SessionError>> + Send;

    /// The next data stream; `None` once the connection brings no more.
    fn accept_data(&self) -> impl Future<Output = Option<Self::Recv>> + Send;

    /// Ends the control stream after the session's last message and waits,
    /// at most `wait`, for `until`.
    fn finish(
        &self,
        send: &mut Self::Send,
        recv: &mut Self::Recv,
        until: Until,
        wait: Duration,
    ) -> impl Future<Output = ()> + Send;

    /// Ends the connection and every stream of it.
    fn close(&self, code: u32, reason: &[u8]);
}

/// A QUIC connection (mutual TLS done): streams are QUIC streams, and a
/// close carries its code and reason to the source.
pub(crate) struct QuicConn(pub quinn::Connection);

impl Conn for QuicConn {
    type Send = quinn::SendStream;
    type Recv = quinn::RecvStream;

    fn remote_address(&self) -> SocketAddr {
        self.0.remote_address()
    }

    async fn accept_control(&self) -> Result<(Self::Send, Self::Recv), SessionError> {
        Ok(self.0.accept_bi().await?)
    }

    async fn accept_data(&self) -> Option<Self::Recv> {
        self.0.accept_uni().await.ok()
    }

    async fn finish(
        &self,
        send: &mut Self::Send,
        _recv: &mut Self::Recv,
        until: Until,
        wait: Duration,
    ) {
        let _ = send.finish();
        // Closing discards unsent stream data: wait for the peer first.
        let _ = tokio::time::timeout(wait, async {
            match until {
                Until::Delivered => {
                    let _ = send.stopped().await;
                }
                Until::Gone => {
                    self.0.closed().await;
                }
            }
        })
        .await;
    }

    fn close(&self, code: u32, reason: &[u8]) {
        self.0.close(code.into(), reason);
    }
}
