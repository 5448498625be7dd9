//! The UDP socket under both ends' QUIC endpoints.
//!
//! quinn sizes its datagrams by path MTU discovery and hands the kernel up
//! to ten of them in one GSO send. Two things of the kernel's get in the
//! way of large datagrams, which matter because QUIC's cost is partly per
//! packet (header protection, ACKs, a stream frame each): a GSO send must
//! fit one IP packet (65 507 bytes of UDP payload over IPv4), and the
//! socket buffers are capped at `net.core.[rw]mem_max` (4 MiB here), which
//! a burst of 64 KiB datagrams overruns. [`CappedGso`] splits a GSO send
//! that would not fit into several that do, so discovery may probe up to
//! the largest datagram and each path settles at its own MTU (1 452 on an
//! Ethernet LAN, where nothing changes, ~64 KiB on loopback); [`bind`]
//! asks for buffers beyond the cap where the process may (`CAP_NET_ADMIN`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nix::sys::socket::{setsockopt, sockopt};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

/// Largest UDP payload over IPv4 (65 535 less 28 bytes of headers); QUIC
/// itself allows 65 527, which the kernel refuses over IPv4. Also the
/// largest GSO send: the kernel builds it as one packet before cutting it.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// Socket buffer size asked for on both ends: room for 256 of the largest
/// datagrams, so a burst is not dropped (QUIC would read the drops as loss
/// and slow down).
const SOCKET_BUFFER: usize = 16 << 20;

/// Binds a UDP socket on `addr` with large buffers and wraps it for quinn.
pub fn bind(addr: SocketAddr) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    let socket = std::net::UdpSocket::bind(addr)?;
    // The FORCE variants pass `[rw]mem_max` by but need CAP_NET_ADMIN;
    // without it the capped request is the best there is.
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
    Ok(Arc::new(CappedGso { inner }))
}

/// A socket whose GSO sends never exceed [`MAX_UDP_PAYLOAD`] in all.
#[derive(Debug)]
pub struct CappedGso {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl AsyncUdpSocket for CappedGso {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        // Were a later part to find the socket full after an earlier one
        // went out, quinn sends the whole transmit again: the peer drops
        // the duplicate packets, which is cheaper than losing the rest.
        split(t, |part| self.inner.try_send(part))
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Hands `send` the transmit `t` in parts of at most [`MAX_UDP_PAYLOAD`]
/// bytes, each a whole number of `t`'s datagrams; the first error ends it.
fn split(t: &Transmit, mut send: impl FnMut(&Transmit) -> io::Result<()>) -> io::Result<()> {
    let Some(seg) = t
        .segment_size
        .filter(|_| t.contents.len() > MAX_UDP_PAYLOAD)
    else {
        return send(t);
    };
    let per_part = (MAX_UDP_PAYLOAD / seg).max(1) * seg;
    for part in t.contents.chunks(per_part) {
        send(&Transmit {
            destination: t.destination,
            ecn: t.ecn,
            contents: part,
            segment_size: (part.len() > seg).then_some(seg),
            src_ip: t.src_ip,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(len: usize, seg: Option<usize>) -> Vec<(usize, Option<usize>)> {
        let data = vec![0u8; len];
        let t = Transmit {
            destination: "127.0.0.1:1".parse().unwrap(),
            ecn: None,
            contents: &data,
            segment_size: seg,
            src_ip: None,
        };
        let mut out = Vec::new();
        split(&t, |p| {
            out.push((p.contents.len(), p.segment_size));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn sends_that_fit_one_packet_go_out_whole() {
        assert_eq!(parts(1200, None), [(1200, None)]);
        assert_eq!(parts(10 * 1452, Some(1452)), [(14520, Some(1452))]);
        assert_eq!(parts(65_507, Some(6_500)), [(65_507, Some(6_500))]);
        assert_eq!(parts(65_507, None), [(65_507, None)]);
    }

    #[test]
    fn large_sends_are_cut_at_datagram_boundaries() {
        // Ten 64 KiB datagrams, the last one short: one send each.
        let seg = 65_000;
        let got = parts(9 * seg + 100, Some(seg));
        assert_eq!(got.len(), 10);
        assert!(got[..9].iter().all(|&p| p == (seg, None)));
        assert_eq!(got[9], (100, None));
        // 20 000-byte datagrams go three to a send.
        let got = parts(10 * 20_000, Some(20_000));
        assert_eq!(
            got,
            [
                (60_000, Some(20_000)),
                (60_000, Some(20_000)),
                (60_000, Some(20_000)),
                (20_000, None)
            ]
        );
        let total: usize = parts(7 * 30_000 + 5, Some(30_000))
            .iter()
            .map(|p| p.0)
            .sum();
        assert_eq!(total, 7 * 30_000 + 5);
    }

    #[test]
    fn the_first_failed_part_ends_the_send() {
        let data = vec![0u8; 4 * 40_000];
        let t = Transmit {
            destination: "127.0.0.1:1".parse().unwrap(),
            ecn: None,
            contents: &data,
            segment_size: Some(40_000),
            src_ip: None,
        };
        let mut n = 0;
        let e = split(&t, |_| {
            n += 1;
            match n {
                2 => Err(io::ErrorKind::WouldBlock.into()),
                _ => Ok(()),
            }
        })
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(n, 2);
    }
}
