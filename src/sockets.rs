//! Sockets in the image: which ones migrate, what is read of them on the
//! source, and how the destination rebuilds them.
//!
//! Everything on the source is read through `pidfd_getfd` copies: a copy
//! is the very same socket, so its options, addresses and queues are the
//! process's own, and nothing the process sees changes. Four kinds
//! migrate:
//!
//! - **TCP listeners** (IPv4, IPv6): address, backlog (`sock_diag`: no
//!   socket option says it) and the options that shape behaviour
//!   (SO_REUSEADDR, SO_REUSEPORT, TCP_NODELAY, SO_KEEPALIVE, IPV6_V6ONLY).
//!   Connections still waiting in the accept queue cannot move with it, so
//!   a listener that has some at the freeze fails the migration (the
//!   source runs on).
//! - **Established TCP connections**, by TCP repair (the steps and their
//!   order follow CRIU's libsoccr). From the freeze on, the source's
//!   sockets stay in repair mode ([`TcpRepairHold`]): a socket in repair
//!   mode sends nothing, and when it is closed or its process killed it
//!   sends neither FIN nor RST, so the peer never learns the source went
//!   away. If the migration fails, the hold takes them out of repair mode
//!   before the source resumes. On the destination the socket is made in
//!   repair mode, bound, given the sequence numbers, "connected" (no SYN),
//!   its options, queues and window set, and leaves repair mode only once
//!   the whole process is restored ([`finish_established`]): a restore
//!   that fails before kills a socket that never sent a byte.
//! - **UNIX stream socket pairs** with both ends in the process, with the
//!   bytes waiting at each end (peeked, left in place).
//! - **Listening UNIX stream sockets bound to a path** (or an abstract
//!   name): the stale socket file is removed before binding again, only if
//!   it is a socket.
//!
//! Anything else is refused by name and kind before anything is frozen.
//!
//! **The network lock.** A socket in repair mode still takes packets: the
//! source's kernel would acknowledge bytes the peer sends after the queues
//! were read, and they would be lost. CRIU drops that traffic with
//! netfilter rules; ferry attaches a drop-everything socket filter to each
//! held connection instead (before repair mode, through the same copy):
//! TCP runs the filter before it processes a segment, so nothing is
//! acknowledged, the peer retransmits, and it needs no tool or rule in the
//! source's namespace. A failed migration removes the filter again. After
//! a successful one the source's sockets are gone and the source host
//! answers the peer's segments with RST if they still reach it: the
//! connection's address must move with the process (routing), as it must
//! for any migration that keeps connections.
//!
//! Limits: half-closed connections (FIN_WAIT*, CLOSE_WAIT, …), urgent data,
//! SO_RCVBUF/SO_SNDBUF and most other options are not carried.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bytes::Bytes;
use ferry_proto::pb;

use crate::sys::fds as sys_fds;
use crate::sys::sock;

/// Errors of capturing or rebuilding a socket; each names the fd.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A socket call failed.
    #[error("fd {fd} ({what}): {source}")]
    Io {
        fd: i32,
        what: String,
        #[source]
        source: io::Error,
    },
    /// Connections the process has not accepted yet cannot move.
    #[error("fd {fd}: listening socket {addr} has {pending} connection(s) not accepted yet")]
    Pending { fd: i32, addr: String, pending: u32 },
    /// A socket of a kind that migrates, in a state that does not.
    #[error("fd {fd}: {what}: not supported yet")]
    Unsupported { fd: i32, what: String },
    /// The socket queues exceed what an image carries.
    #[error("fd {fd}: {bytes} bytes of socket queues, more than the {max} an image holds")]
    TooMuchData { fd: i32, bytes: u64, max: u64 },
}

fn io_err(fd: i32, what: impl Into<String>) -> impl FnOnce(io::Error) -> SocketError {
    let what = what.into();
    move |source| SocketError::Io { fd, what, source }
}

// ---------------------------------------------------------------- kernel values

const SOL_TCP: i32 = libc::IPPROTO_TCP;
const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_NO_QUEUE: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
/// `TCPI_OPT_*` of `tcp_info.tcpi_options`.
const TCPI_OPT_TIMESTAMPS: u32 = 1;
const TCPI_OPT_SACK: u32 = 2;
const TCPI_OPT_WSCALE: u32 = 4;
/// `TCPOPT_*` codes `TCP_REPAIR_OPTIONS` takes.
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// `TCP_ESTABLISHED` and `TCP_LISTEN` of the kernel's state numbers.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_LISTEN: u8 = 10;

/// The kernel's name of TCP state `s`.
pub fn tcp_state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------- addresses

/// Raw `struct sockaddr` bytes as text: `10.0.0.1:80`, `[::1]:80`, a UNIX
/// path, `@name` for an abstract one, `unnamed`.
pub fn addr_string(raw: &[u8]) -> String {
    let family = match raw.get(..2) {
        Some(b) => u16::from_ne_bytes([b[0], b[1]]) as i32,
        None => return "unnamed".into(),
    };
    match family {
        libc::AF_INET if raw.len() >= 8 => {
            let port = u16::from_be_bytes([raw[2], raw[3]]);
            let ip = std::net::Ipv4Addr::new(raw[4], raw[5], raw[6], raw[7]);
            format!("{ip}:{port}")
        }
        libc::AF_INET6 if raw.len() >= 24 => {
            let port = u16::from_be_bytes([raw[2], raw[3]]);
            let mut o = [0u8; 16];
            o.copy_from_slice(&raw[8..24]);
            format!("[{}]:{port}", std::net::Ipv6Addr::from(o))
        }
        libc::AF_UNIX => match unix_path(raw) {
            UnixName::Unnamed => "unnamed".into(),
            UnixName::Path(p) => p,
            UnixName::Abstract(n) => format!("@{}", String::from_utf8_lossy(&n)),
        },
        f => format!("address of family {f}"),
    }
}

/// The name of a UNIX socket, from its raw `sockaddr_un`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixName {
    Unnamed,
    Path(String),
    Abstract(Vec<u8>),
}

pub fn unix_path(raw: &[u8]) -> UnixName {
    let name = raw.get(2..).unwrap_or_default();
    match name.first() {
        None => UnixName::Unnamed,
        Some(0) => UnixName::Abstract(name[1..].to_vec()),
        Some(_) => {
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            UnixName::Path(String::from_utf8_lossy(&name[..end]).into_owned())
        }
    }
}

// ---------------------------------------------------------------- classification

/// What is read of a socket to decide whether it migrates. Pure input of
/// [`kind_of`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub family: i32,
    pub ty: i32,
    pub protocol: i32,
    pub listening: bool,
    /// `tcp_info.tcpi_state`, for TCP.
    pub tcp_state: u8,
    pub local: Vec<u8>,
    pub peer: Vec<u8>,
    /// UNIX: the peer's inode (0: none) and whether the process holds it.
    pub peer_ino: u64,
    pub peer_in_process: bool,
}

fn type_name(ty: i32) -> &'static str {
    match ty {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        libc::SOCK_RAW => "raw",
        _ => "other",
    }
}

/// The kind a socket migrates as, or why it does not (naming what it is).
pub fn kind_of(f: &Facts) -> Result<pb::FdKind, String> {
    let local = addr_string(&f.local);
    let peer = addr_string(&f.peer);
    match (f.family, f.ty, f.protocol) {
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP) => {
            let v = if f.family == libc::AF_INET { "" } else { "v6" };
            match f.tcp_state {
                TCP_LISTEN => Ok(pb::FdKind::TcpListen),
                TCP_ESTABLISHED => Ok(pb::FdKind::TcpEstablished),
                7 if f.local.len() > 3 && f.local[2..4] != [0, 0] => Err(format!(
                    "TCP{v} socket bound to {local} but neither listening nor connected"
                )),
                7 => Err(format!("TCP{v} socket neither bound nor connected")),
                s => Err(format!(
                    "TCP{v} connection {local} -> {peer} in state {}",
                    tcp_state_name(s)
                )),
            }
        }
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM, _) => {
            let v = if f.family == libc::AF_INET { "" } else { "v6" };
            Err(format!("UDP{v} socket on {local}"))
        }
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_RAW, _) => Err("raw IP socket".into()),
        (libc::AF_UNIX, libc::SOCK_STREAM, _) if f.listening => match unix_path(&f.local) {
            UnixName::Unnamed => Err("UNIX stream socket listening without a name".into()),
            _ => Ok(pb::FdKind::UnixListen),
        },
        (libc::AF_UNIX, ty, _) if f.peer_ino != 0 && !f.peer_in_process => Err(format!(
            "UNIX {} socket connected to a process outside the image",
            type_name(ty)
        )),
        (libc::AF_UNIX, libc::SOCK_STREAM, _) if f.peer_ino != 0 => Ok(pb::FdKind::UnixPair),
        (libc::AF_UNIX, ty, _) if f.peer_ino != 0 => Err(format!(
            "UNIX {} socket pair (only stream pairs keep their bytes)",
            type_name(ty)
        )),
        (libc::AF_UNIX, ty, _) => match unix_path(&f.local) {
            UnixName::Unnamed => Err(format!(
                "UNIX {} socket neither bound nor connected",
                type_name(ty)
            )),
            _ => Err(format!(
                "UNIX {} socket bound to {local}, not connected",
                type_name(ty)
            )),
        },
        (libc::AF_NETLINK, ..) => Err("netlink socket".into()),
        (libc::AF_PACKET, ..) => Err("packet socket".into()),
        (family, ty, _) => Err(format!(
            "socket of family {family} ({} type)",
            type_name(ty)
        )),
    }
}

/// The socket inode of a `socket:[N]` link target.
pub fn socket_ino(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn facts(fd: i32, s: BorrowedFd<'_>, inos: &HashSet<u64>, ino: u64) -> Result<Facts, SocketError> {
    let int =
        |level, opt, what: &str| sock::getsockopt_int(s, level, opt).map_err(io_err(fd, what));
    let mut f = Facts {
        family: int(libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN")?,
        ty: int(libc::SOL_SOCKET, libc::SO_TYPE, "SO_TYPE")?,
        protocol: int(libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL")?,
        listening: int(libc::SOL_SOCKET, libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 0,
        local: sock::address(s, false).unwrap_or_default(),
        peer: sock::address(s, true).unwrap_or_default(),
        ..Default::default()
    };
    if f.protocol == libc::IPPROTO_TCP {
        let mut info = [0u8; 8];
        sock::getsockopt(s, SOL_TCP, libc::TCP_INFO, &mut info).map_err(io_err(fd, "TCP_INFO"))?;
        f.tcp_state = info[0];
    }
    if f.family == libc::AF_UNIX {
        if let Ok(Some(d)) = sock::unix_diag(ino) {
            f.peer_ino = d.peer;
        } else if !f.peer.is_empty() || f.ty != libc::SOCK_STREAM {
            // Another network namespace's socket, whose peer ferry cannot
            // see: treat it as connected elsewhere.
            f.peer_ino = u64::MAX;
        }
        f.peer_in_process = f.peer_ino != 0 && inos.contains(&f.peer_ino);
    }
    Ok(f)
}

/// Classifies every `socket:[N]` descriptor of process `pid` (the others
/// are left as they are): a kind that migrates with its [`pb::Socket`]
/// (addresses, options, backlog; no queues, see [`capture_data`]), or
/// unsupported with a description naming what it is. Works on a running
/// process: nothing of it changes.
pub fn describe_all(pid: i32, fds: &mut [pb::FileDesc]) {
    let inos: HashSet<u64> = fds.iter().filter_map(|f| socket_ino(&f.path)).collect();
    let mut seen: HashMap<u64, i32> = HashMap::new();
    fds.sort_by_key(|f| f.fd);
    for d in fds.iter_mut() {
        let Some(ino) = socket_ino(&d.path) else {
            continue;
        };
        let fd = d.fd;
        let unsupported = |d: &mut pb::FileDesc, why: String| {
            d.kind = pb::FdKind::Unsupported as i32;
            d.socket = None;
            d.description = format!("fd {fd}: {why}");
        };
        if let Some(first) = seen.insert(ino, fd) {
            unsupported(
                d,
                format!("{}: the same socket as fd {first} (dup)", d.path),
            );
            seen.insert(ino, first);
            continue;
        }
        match describe(pid, fd, ino, &inos) {
            Ok((kind, s)) => {
                d.kind = kind as i32;
                d.socket = Some(s);
            }
            Err(SocketError::Unsupported { what, .. }) => unsupported(d, what),
            Err(e) => unsupported(d, format!("{}: {e}", d.path)),
        }
    }
}

fn describe(
    pid: i32,
    fd: i32,
    ino: u64,
    inos: &HashSet<u64>,
) -> Result<(pb::FdKind, pb::Socket), SocketError> {
    let copy = sys_fds::take_fd(pid, fd).map_err(io_err(fd, "pidfd_getfd"))?;
    let s = copy.as_fd();
    let f = facts(fd, s, inos, ino)?;
    let kind = kind_of(&f).map_err(|what| SocketError::Unsupported { fd, what })?;
    // The freeze attaches a filter of ferry's own (the network lock); any
    // other is the process's.
    if kind == pb::FdKind::TcpEstablished
        && sock::has_filter(s).map_err(io_err(fd, "SO_GET_FILTER"))?
        && !sock::is_drop_all(s).map_err(io_err(fd, "SO_GET_FILTER"))?
    {
        return Err(SocketError::Unsupported {
            fd,
            what: format!(
                "TCP connection {} -> {} with a socket filter of its own",
                addr_string(&f.local),
                addr_string(&f.peer)
            ),
        });
    }
    let flag = |level, opt| sock::getsockopt_int(s, level, opt).map(|v| v != 0);
    let mut out = pb::Socket {
        family: f.family,
        r#type: f.ty,
        protocol: f.protocol,
        local: Bytes::from(f.local.clone()),
        peer: Bytes::from(f.peer.clone()),
        ino,
        peer_ino: f.peer_ino,
        ..Default::default()
    };
    let e = |what: &str| io_err(fd, what.to_string());
    if matches!(f.family, libc::AF_INET | libc::AF_INET6) {
        out.reuseaddr = flag(libc::SOL_SOCKET, libc::SO_REUSEADDR).map_err(e("SO_REUSEADDR"))?;
        out.reuseport = flag(libc::SOL_SOCKET, libc::SO_REUSEPORT).map_err(e("SO_REUSEPORT"))?;
        out.keepalive = flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE).map_err(e("SO_KEEPALIVE"))?;
        out.nodelay = flag(SOL_TCP, libc::TCP_NODELAY).map_err(e("TCP_NODELAY"))?;
        if f.family == libc::AF_INET6 {
            out.v6only = flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).map_err(e("IPV6_V6ONLY"))?;
        }
    }
    match kind {
        pb::FdKind::TcpListen => {
            // Found only from ferry's own network namespace; elsewhere the
            // restore falls back to SOMAXCONN.
            if let Some(d) = sock::inet_diag(f.family, 1 << TCP_LISTEN, ino)
                .map_err(e("sock_diag of the listener"))?
            {
                out.backlog = d.wqueue;
            }
        }
        pb::FdKind::UnixListen => {
            if let Some(d) = sock::unix_diag(ino).map_err(e("sock_diag of the listener"))? {
                out.backlog = d.wqueue;
            }
        }
        _ => {}
    }
    Ok((kind, out))
}

// ---------------------------------------------------------------- frozen capture

/// Reads what travels with the sockets of frozen process `pid`: the queues
/// of established TCP connections (which must be in repair mode already:
/// see [`TcpRepairHold`]) and of UNIX pairs, left in place. A listener with
/// connections not accepted yet is refused. `budget` is what the image may
/// still carry; the bytes read are returned.
pub fn capture_data(pid: i32, fds: &mut [pb::FileDesc], budget: u64) -> Result<u64, SocketError> {
    let mut total = 0u64;
    for d in fds.iter_mut() {
        let fd = d.fd;
        let kind = d.kind();
        let Some(s) = d.socket.as_mut() else {
            continue;
        };
        let added = match kind {
            pb::FdKind::TcpListen | pb::FdKind::UnixListen => {
                // Without sock_diag (ferry in another network namespace)
                // the accept queue is invisible: no socket option says it.
                let diag = if kind == pb::FdKind::TcpListen {
                    sock::inet_diag(s.family, 1 << TCP_LISTEN, s.ino).map(|d| d.map(|d| d.rqueue))
                } else {
                    sock::unix_diag(s.ino).map(|d| d.map(|d| d.rqueue))
                };
                let pending = diag
                    .map_err(io_err(fd, "sock_diag of the listener"))?
                    .unwrap_or(0);
                if pending > 0 {
                    return Err(SocketError::Pending {
                        fd,
                        addr: addr_string(&s.local),
                        pending,
                    });
                }
                0
            }
            pb::FdKind::TcpEstablished => {
                let copy = sys_fds::take_fd(pid, fd).map_err(io_err(fd, "pidfd_getfd"))?;
                let t = read_repair(fd, copy.as_fd())?;
                let n = (t.send_queue.len() + t.recv_queue.len()) as u64;
                s.tcp = Some(t);
                n
            }
            pb::FdKind::UnixPair => {
                let copy = sys_fds::take_fd(pid, fd).map_err(io_err(fd, "pidfd_getfd"))?;
                let n =
                    sock::ioctl_int(copy.as_fd(), sock::SIOCINQ).map_err(io_err(fd, "SIOCINQ"))?;
                let unread =
                    sock::peek(copy.as_fd(), n.max(0) as usize).map_err(io_err(fd, "peek"))?;
                let n = unread.len() as u64;
                s.unread = Bytes::from(unread);
                n
            }
            _ => 0,
        };
        total += added;
        if total > budget {
            return Err(SocketError::TooMuchData {
                fd,
                bytes: total,
                max: budget,
            });
        }
    }
    Ok(total)
}

/// Everything TCP repair mode says of established socket `s`, which must
/// be in repair mode (`TCP_REPAIR_QUEUE` is refused with EPERM otherwise).
fn read_repair(fd: i32, s: BorrowedFd<'_>) -> Result<pb::TcpRepair, SocketError> {
    let e = |what: &str| io_err(fd, what.to_string());
    let mut info = [0u8; 8];
    sock::getsockopt(s, SOL_TCP, libc::TCP_INFO, &mut info).map_err(e("TCP_INFO"))?;
    if info[0] != TCP_ESTABLISHED {
        return Err(SocketError::Unsupported {
            fd,
            what: format!(
                "TCP connection in state {} at the freeze",
                tcp_state_name(info[0])
            ),
        });
    }
    let mut t = pb::TcpRepair {
        options: u32::from(info[5]),
        ..Default::default()
    };
    if t.options & TCPI_OPT_WSCALE != 0 {
        t.snd_wscale = u32::from(info[6] & 0xf);
        t.rcv_wscale = u32::from(info[6] >> 4);
    }
    t.sndbuf = sock::getsockopt_int(s, libc::SOL_SOCKET, libc::SO_SNDBUF)
        .map_err(e("SO_SNDBUF"))?
        .max(0) as u32;
    t.mss = sock::getsockopt_int(s, SOL_TCP, libc::TCP_MAXSEG).map_err(e("TCP_MAXSEG"))? as u32;
    if t.options & TCPI_OPT_TIMESTAMPS != 0 {
        t.timestamp =
            sock::getsockopt_int(s, SOL_TCP, TCP_TIMESTAMP).map_err(e("TCP_TIMESTAMP"))? as u32;
    }
    let mut w = [0u8; 20];
    sock::getsockopt(s, SOL_TCP, TCP_REPAIR_WINDOW, &mut w).map_err(e("TCP_REPAIR_WINDOW"))?;
    let w32 = |i: usize| u32::from_ne_bytes([w[i * 4], w[i * 4 + 1], w[i * 4 + 2], w[i * 4 + 3]]);
    (t.snd_wl1, t.snd_wnd, t.max_window, t.rcv_wnd, t.rcv_wup) =
        (w32(0), w32(1), w32(2), w32(3), w32(4));
    let inq = sock::ioctl_int(s, sock::SIOCINQ)
        .map_err(e("SIOCINQ"))?
        .max(0) as usize;
    let outq = sock::ioctl_int(s, sock::SIOCOUTQ)
        .map_err(e("SIOCOUTQ"))?
        .max(0) as usize;
    let unsent = sock::ioctl_int(s, sock::SIOCOUTQNSD)
        .map_err(e("SIOCOUTQNSD"))?
        .max(0) as u32;
    let queue = |q: i32, len: usize, name: &str| -> Result<(u32, Vec<u8>), SocketError> {
        sock::setsockopt_int(s, SOL_TCP, TCP_REPAIR_QUEUE, q).map_err(e(&format!(
            "TCP_REPAIR_QUEUE {name} (is it in repair mode?)"
        )))?;
        let seq = sock::getsockopt_int(s, SOL_TCP, TCP_QUEUE_SEQ)
            .map_err(e(&format!("TCP_QUEUE_SEQ of the {name} queue")))?;
        let bytes = sock::peek(s, len).map_err(e(&format!("peek of the {name} queue")))?;
        Ok((seq as u32, bytes))
    };
    let (rcv_seq, recv_queue) = queue(TCP_RECV_QUEUE, inq, "receive")?;
    let (snd_seq, send_queue) = queue(TCP_SEND_QUEUE, outq, "send")?;
    sock::setsockopt_int(s, SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        .map_err(e("TCP_REPAIR_QUEUE none"))?;
    t.rcv_seq = rcv_seq;
    t.snd_seq = snd_seq;
    t.recv_queue = Bytes::from(recv_queue);
    t.send_queue = Bytes::from(send_queue);
    t.unsent = unsent.min(outq as u32);
    Ok(t)
}

/// The source's established TCP sockets, held in repair mode from the
/// freeze on (through copies ferry keeps). Dropping the hold takes them
/// out of repair mode (a failed migration: the source resumes with its
/// connections); once [`TcpRepairHold::disarm`]ed it only closes the
/// copies, still in repair mode: after the source is killed nothing is
/// sent.
pub struct TcpRepairHold {
    pid: i32,
    held: Vec<(i32, OwnedFd)>,
    armed: bool,
}

impl TcpRepairHold {
    /// Puts every established TCP socket of frozen process `pid` behind
    /// the drop filter, then in repair mode. Sockets of other kinds and states are left alone (the image's
    /// check refuses what cannot move).
    pub fn enter(pid: i32) -> Result<TcpRepairHold, SocketError> {
        let mut hold = TcpRepairHold {
            pid,
            held: Vec::new(),
            armed: true,
        };
        let fds = crate::procfs::list_fds(pid).map_err(|e| SocketError::Io {
            fd: -1,
            what: format!("/proc/{pid}/fd"),
            source: io::Error::other(e.to_string()),
        })?;
        for (fd, target) in fds {
            if socket_ino(&target).is_none() {
                continue;
            }
            let Ok(copy) = sys_fds::take_fd(pid, fd) else {
                continue;
            };
            let s = copy.as_fd();
            let tcp = sock::getsockopt_int(s, libc::SOL_SOCKET, libc::SO_PROTOCOL)
                .is_ok_and(|p| p == libc::IPPROTO_TCP);
            let mut info = [0u8; 8];
            if !tcp || sock::getsockopt(s, SOL_TCP, libc::TCP_INFO, &mut info).is_err() {
                continue;
            }
            if info[0] != TCP_ESTABLISHED {
                continue;
            }
            if sock::has_filter(s).map_err(io_err(fd, "SO_GET_FILTER"))? {
                return Err(SocketError::Unsupported {
                    fd,
                    what: "TCP connection with a socket filter of its own".into(),
                });
            }
            sock::attach_drop_all(s).map_err(io_err(fd, "SO_ATTACH_FILTER"))?;
            // Held from here: a failure below takes the filter off again.
            hold.held.push((fd, copy));
            let s = hold
                .held
                .last()
                .map(|(_, c)| c.as_fd())
                .expect("just pushed");
            sock::setsockopt_int(s, SOL_TCP, TCP_REPAIR, 1)
                .map_err(io_err(fd, "TCP_REPAIR on (needs CAP_NET_ADMIN)"))?;
        }
        if !hold.held.is_empty() {
            tracing::debug!(pid, sockets = hold.held.len(), "TCP sockets in repair mode");
        }
        Ok(hold)
    }

    /// How many sockets are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// From now on the hold never takes the sockets out of repair mode:
    /// the destination owns the connections, and once the source is gone
    /// its sockets vanish without a FIN or RST.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TcpRepairHold {
    fn drop(&mut self) {
        for (fd, copy) in self.held.drain(..) {
            if !self.armed {
                continue;
            }
            // Repair mode off first: the kernel's window probe then tells
            // the peer to send again what the filter dropped.
            if let Err(e) = sock::setsockopt_int(copy.as_fd(), SOL_TCP, TCP_REPAIR, 0) {
                tracing::error!(pid = self.pid, fd, "TCP_REPAIR off: {e}");
            }
            if let Err(e) = sock::detach_filter(copy.as_fd()) {
                tracing::error!(pid = self.pid, fd, "SO_DETACH_FILTER: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------- restore

fn sopt(
    fd: i32,
    s: BorrowedFd<'_>,
    level: i32,
    opt: i32,
    on: bool,
    name: &str,
) -> Result<(), SocketError> {
    sock::setsockopt_int(s, level, opt, i32::from(on)).map_err(io_err(fd, name.to_string()))
}

/// The options of the image's socket that are set before `bind`.
fn pre_bind(fd: i32, s: BorrowedFd<'_>, p: &pb::Socket) -> Result<(), SocketError> {
    if p.reuseaddr {
        sopt(
            fd,
            s,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            true,
            "SO_REUSEADDR",
        )?;
    }
    if p.reuseport {
        sopt(
            fd,
            s,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            true,
            "SO_REUSEPORT",
        )?;
    }
    if p.family == libc::AF_INET6 {
        sopt(
            fd,
            s,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            p.v6only,
            "IPV6_V6ONLY",
        )?;
    }
    Ok(())
}

fn post_connect(fd: i32, s: BorrowedFd<'_>, p: &pb::Socket) -> Result<(), SocketError> {
    if p.nodelay {
        sopt(fd, s, SOL_TCP, libc::TCP_NODELAY, true, "TCP_NODELAY")?;
    }
    if p.keepalive {
        sopt(
            fd,
            s,
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            true,
            "SO_KEEPALIVE",
        )?;
    }
    Ok(())
}

/// Makes socket `s` (new, of the image's family and type, not bound) the
/// TCP listener `p` of fd `fd`.
pub fn restore_tcp_listen(fd: i32, s: BorrowedFd<'_>, p: &pb::Socket) -> Result<(), SocketError> {
    pre_bind(fd, s, p)?;
    sock::bind(s, &p.local).map_err(io_err(fd, format!("bind to {}", addr_string(&p.local))))?;
    post_connect(fd, s, p)?;
    let backlog = if p.backlog == 0 {
        libc::SOMAXCONN
    } else {
        p.backlog.min(i32::MAX as u32) as i32
    };
    sock::listen(s, backlog).map_err(io_err(fd, format!("listen({backlog})")))
}

/// Makes socket `s` the UNIX listener `p`: a stale socket file at its
/// path is removed first (anything else there is left and fails the bind).
pub fn restore_unix_listen(fd: i32, s: BorrowedFd<'_>, p: &pb::Socket) -> Result<(), SocketError> {
    if let UnixName::Path(path) = unix_path(&p.local) {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(&path).map_err(io_err(fd, format!("removing stale {path}")))?;
        }
    }
    sock::bind(s, &p.local).map_err(io_err(fd, format!("bind to {}", addr_string(&p.local))))?;
    let backlog = if p.backlog == 0 {
        libc::SOMAXCONN
    } else {
        p.backlog.min(i32::MAX as u32) as i32
    };
    sock::listen(s, backlog).map_err(io_err(fd, format!("listen({backlog})")))
}

/// Rebuilds established connection `p` on socket `s` (new, of the image's
/// family) in TCP repair mode, where it stays: no packet leaves until
/// [`finish_established`].
pub fn restore_established(fd: i32, s: BorrowedFd<'_>, p: &pb::Socket) -> Result<(), SocketError> {
    let Some(t) = &p.tcp else {
        return Err(SocketError::Unsupported {
            fd,
            what: "TCP connection without its repair state".into(),
        });
    };
    let e = |what: &str| io_err(fd, what.to_string());
    // Options first: SO_REUSEADDR would undo the forced address reuse
    // repair mode gives (the listener of the same port is bound already).
    pre_bind(fd, s, p)?;
    sock::setsockopt_int(s, SOL_TCP, TCP_REPAIR, 1)
        .map_err(e("TCP_REPAIR on (needs CAP_NET_ADMIN)"))?;
    sock::bind(s, &p.local).map_err(e(&format!("bind to {}", addr_string(&p.local))))?;
    // The kernel advances the sequence numbers as the queues are refilled,
    // so each starts where its queue's first byte was.
    let set_seq = |q: i32, seq: u32, name: &str| -> Result<(), SocketError> {
        sock::setsockopt_int(s, SOL_TCP, TCP_REPAIR_QUEUE, q).map_err(e("TCP_REPAIR_QUEUE"))?;
        sock::setsockopt_int(s, SOL_TCP, TCP_QUEUE_SEQ, seq as i32)
            .map_err(e(&format!("TCP_QUEUE_SEQ of the {name} queue")))
    };
    set_seq(
        TCP_RECV_QUEUE,
        t.rcv_seq.wrapping_sub(t.recv_queue.len() as u32),
        "receive",
    )?;
    set_seq(
        TCP_SEND_QUEUE,
        t.snd_seq.wrapping_sub(t.send_queue.len() as u32),
        "send",
    )?;
    sock::connect(s, &p.peer)
        .map_err(e(&format!("connect (repair) to {}", addr_string(&p.peer))))?;
    let mut opts: Vec<(u32, u32)> = Vec::new();
    if t.options & TCPI_OPT_SACK != 0 {
        opts.push((TCPOPT_SACK_PERM, 0));
    }
    if t.options & TCPI_OPT_WSCALE != 0 {
        opts.push((TCPOPT_WINDOW, t.snd_wscale | (t.rcv_wscale << 16)));
    }
    if t.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push((TCPOPT_TIMESTAMP, 0));
    }
    opts.push((TCPOPT_MAXSEG, t.mss));
    let raw: Vec<u8> = opts
        .iter()
        .flat_map(|&(c, v)| c.to_ne_bytes().into_iter().chain(v.to_ne_bytes()))
        .collect();
    sock::setsockopt(s, SOL_TCP, TCP_REPAIR_OPTIONS, &raw).map_err(e("TCP_REPAIR_OPTIONS"))?;
    if t.options & TCPI_OPT_TIMESTAMPS != 0 {
        sock::setsockopt_int(s, SOL_TCP, TCP_TIMESTAMP, t.timestamp as i32)
            .map_err(e("TCP_TIMESTAMP"))?;
    }
    // A new socket's send buffer starts small, the source's had grown with
    // its queue: without room the refill fails. The size is then fixed
    // (no more autotuning of it for this connection).
    let have =
        sock::getsockopt_int(s, libc::SOL_SOCKET, libc::SO_SNDBUF).map_err(e("SO_SNDBUF"))?;
    let need = t.sndbuf.max(2 * t.send_queue.len() as u32);
    if !t.send_queue.is_empty() && (have.max(0) as u32) < need {
        // The kernel doubles what it is given.
        sock::setsockopt_int(s, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, (need / 2) as i32)
            .map_err(e("SO_SNDBUFFORCE"))?;
    }
    if !t.recv_queue.is_empty() {
        sock::setsockopt_int(s, SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            .map_err(e("TCP_REPAIR_QUEUE"))?;
        sock::send_all(s, &t.recv_queue).map_err(e("refilling the receive queue"))?;
    }
    // Sent but not acknowledged: back in repair mode, as sent (the peer
    // may acknowledge them, or they are retransmitted). The unsent rest
    // goes out normally once repair mode ends.
    let sent = t.send_queue.len() - (t.unsent as usize).min(t.send_queue.len());
    if sent > 0 {
        sock::setsockopt_int(s, SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            .map_err(e("TCP_REPAIR_QUEUE"))?;
        sock::send_all(s, &t.send_queue[..sent]).map_err(e("refilling the send queue"))?;
    }
    let w: Vec<u8> = [t.snd_wl1, t.snd_wnd, t.max_window, t.rcv_wnd, t.rcv_wup]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    sock::setsockopt(s, SOL_TCP, TCP_REPAIR_WINDOW, &w).map_err(e("TCP_REPAIR_WINDOW"))?;
    sock::setsockopt_int(s, SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        .map_err(e("TCP_REPAIR_QUEUE"))?;
    post_connect(fd, s, p)
}

/// Takes restored connection `p` out of repair mode (the kernel sends a
/// window probe: the peer learns where the connection is now) and sends
/// the bytes the source had not sent yet.
pub fn finish_established(fd: i32, s: BorrowedFd<'_>, p: &pb::Socket) -> Result<(), SocketError> {
    sock::setsockopt_int(s, SOL_TCP, TCP_REPAIR, 0).map_err(io_err(fd, "TCP_REPAIR off"))?;
    // Leaving repair mode clears the address reuse flag.
    if p.reuseaddr {
        sopt(
            fd,
            s,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            true,
            "SO_REUSEADDR",
        )?;
    }
    if let Some(t) = &p.tcp {
        let unsent = (t.unsent as usize).min(t.send_queue.len());
        if unsent > 0 {
            let from = t.send_queue.len() - unsent;
            sock::send_all(s, &t.send_queue[from..])
                .map_err(io_err(fd, "sending the unsent bytes"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[4..8].copy_from_slice(&ip);
        b
    }

    fn unix(name: &[u8]) -> Vec<u8> {
        let mut b = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        b.extend_from_slice(name);
        b
    }

    #[test]
    fn addresses_read_as_text() {
        assert_eq!(addr_string(&v4([10, 77, 1, 1], 6379)), "10.77.1.1:6379");
        let mut v6 = vec![0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&80u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(addr_string(&v6), "[::1]:80");
        assert_eq!(addr_string(&unix(b"/run/x.sock\0")), "/run/x.sock");
        assert_eq!(addr_string(&unix(b"\0name")), "@name");
        assert_eq!(addr_string(&unix(b"")), "unnamed");
        assert_eq!(addr_string(&[]), "unnamed");
        assert_eq!(socket_ino("socket:[1234]"), Some(1234));
        assert_eq!(socket_ino("pipe:[1234]"), None);
    }

    #[test]
    fn what_migrates_and_what_is_refused_by_name() {
        let tcp = |state: u8| Facts {
            family: libc::AF_INET,
            ty: libc::SOCK_STREAM,
            protocol: libc::IPPROTO_TCP,
            tcp_state: state,
            listening: state == TCP_LISTEN,
            local: v4([127, 0, 0, 1], 80),
            peer: v4([127, 0, 0, 2], 5555),
            ..Default::default()
        };
        assert_eq!(kind_of(&tcp(TCP_LISTEN)), Ok(pb::FdKind::TcpListen));
        assert_eq!(
            kind_of(&tcp(TCP_ESTABLISHED)),
            Ok(pb::FdKind::TcpEstablished)
        );
        assert_eq!(
            kind_of(&tcp(8)).unwrap_err(),
            "TCP connection 127.0.0.1:80 -> 127.0.0.2:5555 in state CLOSE_WAIT"
        );
        let udp = Facts {
            ty: libc::SOCK_DGRAM,
            protocol: libc::IPPROTO_UDP,
            ..tcp(7)
        };
        assert_eq!(kind_of(&udp).unwrap_err(), "UDP socket on 127.0.0.1:80");
        let pair = Facts {
            family: libc::AF_UNIX,
            ty: libc::SOCK_STREAM,
            peer_ino: 99,
            peer_in_process: true,
            ..Default::default()
        };
        assert_eq!(kind_of(&pair), Ok(pb::FdKind::UnixPair));
        let outside = Facts {
            peer_in_process: false,
            ..pair.clone()
        };
        assert_eq!(
            kind_of(&outside).unwrap_err(),
            "UNIX stream socket connected to a process outside the image"
        );
        let dgram = Facts {
            ty: libc::SOCK_DGRAM,
            ..pair.clone()
        };
        assert!(kind_of(&dgram)
            .unwrap_err()
            .starts_with("UNIX datagram socket pair"));
        let listener = Facts {
            family: libc::AF_UNIX,
            ty: libc::SOCK_STREAM,
            listening: true,
            local: unix(b"/tmp/s\0"),
            ..Default::default()
        };
        assert_eq!(kind_of(&listener), Ok(pb::FdKind::UnixListen));
        let nameless = Facts {
            local: unix(b""),
            ..listener
        };
        assert!(kind_of(&nameless).is_err());
        let netlink = Facts {
            family: libc::AF_NETLINK,
            ty: libc::SOCK_RAW,
            ..Default::default()
        };
        assert_eq!(kind_of(&netlink).unwrap_err(), "netlink socket");
    }
}
