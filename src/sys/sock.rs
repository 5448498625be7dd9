//! Sockets, seen through descriptors ferry holds: copies of another
//! process's sockets (`pidfd_getfd`, the same socket, not a new one) and
//! sockets a restore stub made. Socket options, addresses as the kernel's
//! raw `struct sockaddr` bytes (kept opaque so a restore binds exactly what
//! the source had), queue peeks, and one `sock_diag` query for what no
//! socket option says (a listener's backlog and accept queue, a UNIX
//! socket's peer).
//!
//! TCP repair (`TCP_REPAIR`, kernel 3.11+, CAP_NET_ADMIN) is only option
//! values here; the order of the steps is `crate::sockets`'.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `SIOCINQ` (= `FIONREAD`): bytes in the receive queue.
pub const SIOCINQ: libc::c_ulong = 0x541b;
/// `SIOCOUTQ` (= `TIOCOUTQ`): bytes sent but not acknowledged, plus unsent.
pub const SIOCOUTQ: libc::c_ulong = 0x5411;
/// `SIOCOUTQNSD`: bytes not sent yet.
pub const SIOCOUTQNSD: libc::c_ulong = 0x894b;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A new socket of ours, close-on-exec.
pub fn socket(family: i32, ty: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes three integers; no memory is passed.
    let fd = check(unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol) }.into())?;
    // SAFETY: socket returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A connected pair of UNIX sockets of ours, close-on-exec.
pub fn socketpair(ty: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    let ty = ty | libc::SOCK_CLOEXEC;
    // SAFETY: socketpair writes two ints into the array, which is ours.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) };
    check(r.into())?;
    // SAFETY: socketpair returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `getsockopt` into `buf`; the length the kernel wrote.
pub fn getsockopt(fd: BorrowedFd<'_>, level: i32, opt: i32, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    let (raw, p) = (fd.as_raw_fd(), buf.as_mut_ptr().cast());
    // SAFETY: the kernel writes at most `len` bytes into `buf`, which is
    // ours and that long, and the written length into `len`.
    let r = unsafe { libc::getsockopt(raw, level, opt, p, &mut len) };
    check(r.into())?;
    Ok(len as usize)
}

/// An integer socket option.
pub fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, opt: i32) -> io::Result<i32> {
    let mut b = [0u8; 4];
    getsockopt(fd, level, opt, &mut b)?;
    Ok(i32::from_ne_bytes(b))
}

/// `setsockopt` with `val` as the option's bytes.
pub fn setsockopt(fd: BorrowedFd<'_>, level: i32, opt: i32, val: &[u8]) -> io::Result<()> {
    let (raw, len) = (fd.as_raw_fd(), val.len() as libc::socklen_t);
    // SAFETY: the kernel reads `val.len()` bytes from `val`, which is ours.
    let r = unsafe { libc::setsockopt(raw, level, opt, val.as_ptr().cast(), len) };
    check(r.into()).map(drop)
}

pub fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, opt: i32, val: i32) -> io::Result<()> {
    setsockopt(fd, level, opt, &val.to_ne_bytes())
}

/// The raw `struct sockaddr` bytes of `getsockname` (`peer` false) or
/// `getpeername`.
pub fn address(fd: BorrowedFd<'_>, peer: bool) -> io::Result<Vec<u8>> {
    let mut buf = [0u8; std::mem::size_of::<libc::sockaddr_storage>()];
    let mut len = buf.len() as libc::socklen_t;
    let p = buf.as_mut_ptr().cast::<libc::sockaddr>();
    // SAFETY: the kernel writes at most `len` bytes into `buf` (a
    // sockaddr_storage's worth, ours) and the full length into `len`.
    let r = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), p, &mut len)
        }
    };
    check(r.into())?;
    Ok(buf[..(len as usize).min(buf.len())].to_vec())
}

/// `bind` to raw sockaddr bytes.
pub fn bind(fd: BorrowedFd<'_>, addr: &[u8]) -> io::Result<()> {
    let a = storage(addr)?;
    let (p, len) = (
        (&a as *const libc::sockaddr_storage).cast(),
        addr.len() as libc::socklen_t,
    );
    // SAFETY: `a` is a sockaddr_storage of ours holding `addr.len()` valid
    // bytes; the kernel reads that many.
    let r = unsafe { libc::bind(fd.as_raw_fd(), p, len) };
    check(r.into()).map(drop)
}

/// `connect` to raw sockaddr bytes. `EINPROGRESS` (a non-blocking socket)
/// counts as success.
pub fn connect(fd: BorrowedFd<'_>, addr: &[u8]) -> io::Result<()> {
    let a = storage(addr)?;
    // SAFETY: as in `bind`.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&a as *const libc::sockaddr_storage).cast(),
            addr.len() as libc::socklen_t,
        )
    };
    match check(r.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
        r => r.map(drop),
    }
}

fn storage(addr: &[u8]) -> io::Result<libc::sockaddr_storage> {
    // SAFETY: sockaddr_storage is plain bytes; all zeros is valid.
    let mut a: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    if addr.len() > std::mem::size_of_val(&a) || addr.len() < 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a socket address of {} bytes", addr.len()),
        ));
    }
    // SAFETY: `addr` fits in `a` (checked above); both are ours.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr(),
            (&mut a as *mut libc::sockaddr_storage).cast::<u8>(),
            addr.len(),
        )
    };
    Ok(a)
}

pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: listen takes an fd and an integer.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) }.into()).map(drop)
}

/// An `ioctl` that answers one int (`SIOCINQ`, `SIOCOUTQ`, …).
pub fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: these requests write one int to the pointer, which is ours.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut n) }.into())?;
    Ok(n)
}

/// Exactly `len` bytes from the front of the queue the socket reads from
/// (in TCP repair mode: the queue `TCP_REPAIR_QUEUE` selects), left in
/// place. One byte more is asked for, so a queue that holds more than it
/// said is an error, not a silent truncation.
pub fn peek(fd: BorrowedFd<'_>, len: usize) -> io::Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; len + 1];
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    let n = check(r as libc::c_long)? as usize;
    if n != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the queue holds {n} bytes where {len} were expected"),
        ));
    }
    buf.truncate(len);
    Ok(buf)
}

/// Sends all of `data`, without blocking. Halves the chunk when the kernel
/// refuses a big one (a repair-mode receive queue is filled with one
/// linear buffer per call, which can fail with `ENOMEM`).
pub fn send_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    let mut chunk = data.len().max(1);
    while !data.is_empty() {
        let n = chunk.min(data.len());
        // SAFETY: the kernel reads `n` bytes of `data`, which is ours.
        let r = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                n,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match check(r as libc::c_long) {
            Ok(sent) => data = &data[sent as usize..],
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && chunk > 1024 => chunk /= 2,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- filters

/// Whether socket `s` has a socket filter attached (`SO_GET_FILTER`
/// answers its length in instructions; 0 without one).
pub fn has_filter(s: BorrowedFd<'_>) -> io::Result<bool> {
    let mut len: libc::socklen_t = 0;
    // SAFETY: with a length of 0 the kernel writes no instruction, only the
    // filter's length into `len`, which is ours.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            std::ptr::null_mut(),
            &mut len,
        )
    };
    check(r.into())?;
    Ok(len > 0)
}

/// Whether the socket's filter is exactly the one [`attach_drop_all`]
/// attaches (ferry's own, during a migration).
pub fn is_drop_all(s: BorrowedFd<'_>) -> io::Result<bool> {
    if !has_filter(s)? {
        return Ok(false);
    }
    let mut insn = [0u8; 8];
    // SO_GET_FILTER counts in instructions: room for one. A longer filter
    // answers EINVAL, and is not ferry's.
    let mut len: libc::socklen_t = 1;
    // SAFETY: the kernel writes at most `len` instructions (8 bytes each)
    // into `insn`, which is ours and 8 bytes long.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            insn.as_mut_ptr().cast(),
            &mut len,
        )
    };
    match check(r.into()) {
        Ok(_) => Ok(len == 1 && insn == [0x06, 0, 0, 0, 0, 0, 0, 0]),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Attaches a classic BPF filter that drops every packet the socket
/// receives: for TCP, before the stack sees it, so nothing is
/// acknowledged.
pub fn attach_drop_all(s: BorrowedFd<'_>) -> io::Result<()> {
    // One instruction: BPF_RET | BPF_K with k = 0 (keep no byte).
    let mut prog = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: the kernel copies the program `fprog` points to (one
    // instruction in `prog`, alive for the call) and keeps its own copy.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    check(r.into()).map(drop)
}

/// Removes the socket's filter (`SO_DETACH_FILTER`).
pub fn detach_filter(s: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(s, libc::SOL_SOCKET, libc::SO_DETACH_FILTER, 0)
}

// ---------------------------------------------------------------- sock_diag

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
/// `sizeof(struct nlmsghdr)`.
const NLHDR: usize = 16;

/// What `inet_diag` says of one TCP socket: its accept queue (pending
/// connections) and the backlog `listen` was given, for a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InetDiag {
    pub rqueue: u32,
    pub wqueue: u32,
}

fn netlink() -> io::Result<OwnedFd> {
    socket(libc::AF_NETLINK, libc::SOCK_DGRAM, NETLINK_SOCK_DIAG)
}

/// Sends one request and collects the answers' payloads (after the
/// `nlmsghdr`) until `NLMSG_DONE` or, for a request that is not a dump,
/// the first answer.
fn ask(req: &[u8], dump: bool) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let nl = netlink()?;
    // SAFETY: the kernel reads `req.len()` bytes of `req`, which is ours;
    // a zeroed sockaddr_nl addresses the kernel.
    let r = unsafe {
        let mut to: libc::sockaddr_nl = std::mem::zeroed();
        to.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            nl.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    check(r as libc::c_long)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let r = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = check(r as libc::c_long)? as usize;
        let mut at = 0;
        while at + NLHDR <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
            let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < NLHDR || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a truncated netlink message",
                ));
            }
            let payload = &buf[at + NLHDR..at + len];
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if errno == 0 {
                        return Ok(out);
                    }
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => out.push((ty, payload.to_vec())),
            }
            at += (len + 3) & !3;
        }
        if !dump {
            return Ok(out);
        }
    }
}

fn nl_request(payload: &[u8], dump: bool) -> Vec<u8> {
    let len = NLHDR + payload.len();
    let flags = libc::NLM_F_REQUEST as u16 | if dump { libc::NLM_F_DUMP as u16 } else { 0 };
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

/// `inet_diag` of the TCP socket with inode `ino` in `states` (a bit per
/// TCP state), among those of `family` in ferry's network namespace;
/// `None` when there is none (another namespace's socket).
pub fn inet_diag(family: i32, states: u32, ino: u64) -> io::Result<Option<InetDiag>> {
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then a
    // zeroed inet_diag_sockid (48 bytes): a dump filtered by state.
    let mut req = vec![family as u8, libc::IPPROTO_TCP as u8, 0, 0];
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(&[0u8; 48]);
    for (_, msg) in ask(&nl_request(&req, true), true)? {
        // struct inet_diag_msg: family, state, timer, retrans (4), sockid
        // (48), expires (4), rqueue (4), wqueue (4), uid (4), inode (4).
        if msg.len() < 72 {
            continue;
        }
        let u32_at = |o: usize| u32::from_ne_bytes([msg[o], msg[o + 1], msg[o + 2], msg[o + 3]]);
        if u64::from(u32_at(68)) == ino {
            return Ok(Some(InetDiag {
                rqueue: u32_at(56),
                wqueue: u32_at(60),
            }));
        }
    }
    Ok(None)
}

/// What `unix_diag` says of one UNIX socket: its peer's inode (0: not
/// connected) and, for a listener, its accept queue and backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnixDiag {
    pub peer: u64,
    pub rqueue: u32,
    pub wqueue: u32,
}

/// `unix_diag` of UNIX socket `ino`, if that socket is in ferry's network
/// namespace.
pub fn unix_diag(ino: u64) -> io::Result<Option<UnixDiag>> {
    // struct unix_diag_req: family, protocol, pad (2), states, ino, show,
    // cookie (2 × u32, all ones: no cookie check).
    let mut req = vec![libc::AF_UNIX as u8, 0, 0, 0];
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&(ino as u32).to_ne_bytes());
    req.extend_from_slice(&(UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    let answers = match ask(&nl_request(&req, false), false) {
        Ok(a) => a,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    // One request, one answer.
    if let Some((_, msg)) = answers.into_iter().next() {
        // struct unix_diag_msg is 16 bytes, then attributes.
        let mut at = 16;
        let mut d = UnixDiag::default();
        let u32_at = |o: usize| u32::from_ne_bytes([msg[o], msg[o + 1], msg[o + 2], msg[o + 3]]);
        while at + 4 <= msg.len() {
            let len = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
            let ty = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]);
            if len < 4 || at + len > msg.len() {
                break;
            }
            if ty == UNIX_DIAG_PEER && len >= 8 {
                d.peer = u64::from(u32_at(at + 4));
            }
            if ty == UNIX_DIAG_RQLEN && len >= 12 {
                d.rqueue = u32_at(at + 4);
                d.wqueue = u32_at(at + 8);
            }
            at += (len + 3) & !3;
        }
        return Ok(Some(d));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_peek_leaves_the_bytes_and_a_pair_knows_its_peer() {
        let (a, b) = socketpair(libc::SOCK_STREAM).unwrap();
        send_all(a.as_fd(), b"hello").unwrap();
        assert_eq!(ioctl_int(b.as_fd(), SIOCINQ).unwrap(), 5);
        assert_eq!(peek(b.as_fd(), 5).unwrap(), b"hello");
        assert!(peek(b.as_fd(), 4).is_err(), "more bytes than said");
        assert_eq!(ioctl_int(b.as_fd(), SIOCINQ).unwrap(), 5);
        let ino = |fd: &OwnedFd| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .ino()
        };
        assert_eq!(unix_diag(ino(&a)).unwrap().unwrap().peer, ino(&b));
    }

    #[test]
    fn the_drop_filter_is_recognised_and_comes_off() {
        let s = socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap();
        assert!(!has_filter(s.as_fd()).unwrap());
        assert!(!is_drop_all(s.as_fd()).unwrap());
        attach_drop_all(s.as_fd()).unwrap();
        assert!(has_filter(s.as_fd()).unwrap());
        assert!(is_drop_all(s.as_fd()).unwrap());
        detach_filter(s.as_fd()).unwrap();
        assert!(!has_filter(s.as_fd()).unwrap());
    }

    #[test]
    fn a_listener_reports_its_backlog() {
        let s = socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap();
        let mut sin = vec![0u8; 16];
        sin[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        sin[4..8].copy_from_slice(&[127, 0, 0, 1]);
        bind(s.as_fd(), &sin).unwrap();
        listen(s.as_fd(), 77).unwrap();
        let addr = address(s.as_fd(), false).unwrap();
        assert_eq!(addr.len(), 16);
        assert_ne!(&addr[2..4], &[0, 0], "a port was given");
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
            .unwrap()
            .ino();
        let d = inet_diag(libc::AF_INET, 1 << 10, ino).unwrap().unwrap();
        assert_eq!((d.rqueue, d.wqueue), (0, 77));
    }
}
