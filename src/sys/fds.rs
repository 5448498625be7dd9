//! Descriptors of another process, seen from ferry: a copy of one taken
//! with `pidfd_getfd` (the caller must be allowed to ptrace the process),
//! and what can be read of a pipe without taking anything from it.
//!
//! A pipe's unread bytes are read with `tee(2)` into a pipe of ferry's own:
//! `tee` duplicates the buffers without consuming them, so the process
//! finds its pipe exactly as it was. The temporary pipe gets the same
//! capacity, since capacity counts buffers (slots), not bytes: what fits in
//! the one fits in the other.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `FIONREAD` (`asm-generic/ioctls.h`): bytes ready to read.
const FIONREAD: libc::c_ulong = 0x541b;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Copies fd `fd` of process `pid` into ours (`pidfd_getfd`, close-on-exec).
/// The copy shares the open file description: its offset and status flags
/// are the process's own.
pub fn take_fd(pid: i32, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; no memory is passed.
    let pidfd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: pidfd_getfd takes two fds and flags; no memory is passed.
    let ours = check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })?;
    // SAFETY: pidfd_getfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ours as RawFd) })
}

/// The capacity of the pipe or FIFO `fd` in bytes (`F_GETPIPE_SZ`).
pub fn pipe_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: F_GETPIPE_SZ takes no argument and touches no memory.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    check(n.into()).map(|n| n as u32)
}

/// Sets the capacity of pipe `fd` (`F_SETPIPE_SZ`); the kernel rounds it up.
pub fn set_pipe_size(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    // SAFETY: F_SETPIPE_SZ takes an integer and touches no memory.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes as libc::c_int) };
    check(n.into()).map(drop)
}

/// The seals of memfd `fd` (`F_GET_SEALS`).
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    check(n.into()).map(|n| n as u32)
}

/// Whether fds `a` and `b` of process `pid` are one open file description
/// (one was dup'ed from the other): `kcmp(KCMP_FILE)`.
pub fn same_file(pid: i32, a: RawFd, b: RawFd) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes pids, a type and two fd numbers; no memory.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    check(r).map(|r| r == 0)
}

/// Whether fd `a` of process `pa` and fd `b` of process `pb` are one open
/// file description (inherited across a fork, say): `kcmp(KCMP_FILE)`.
pub fn same_file_of(pa: i32, a: RawFd, pb: i32, b: RawFd) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes pids, a type and two fd numbers; no memory.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pa, pb, KCMP_FILE, a, b) };
    check(r).map(|r| r == 0)
}

/// Bytes waiting in pipe `fd` (`FIONREAD`).
fn unread(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer, which is ours.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), FIONREAD, &mut n) }.into())?;
    Ok(n.max(0) as usize)
}

/// A new pipe, close-on-exec and non-blocking: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two ints into the array, which is ours.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }.into())?;
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The unread bytes of pipe (or FIFO) `fd`, a read end, left in place.
/// Fails with `WouldBlock` if they could not all be copied (another reader
/// raced us: the process must be frozen).
pub fn peek_pipe(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let want = unread(fd)?;
    if want == 0 {
        return Ok(Vec::new());
    }
    let (r, w) = pipe()?;
    let size = pipe_size(fd)?;
    if pipe_size(w.as_fd())? < size {
        set_pipe_size(w.as_fd(), size)?;
    }
    // SAFETY: tee takes two fds, a length and flags; no memory is passed.
    let n = unsafe { libc::tee(fd.as_raw_fd(), w.as_raw_fd(), want, libc::SPLICE_F_NONBLOCK) };
    // tee always starts from the first buffer: a second call would copy the
    // same bytes again, so this one must copy them all.
    let n = check(n as libc::c_long)? as usize;
    if n != want {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("tee copied {n} of the pipe's {want} bytes"),
        ));
    }
    drop(w);
    let mut out = Vec::with_capacity(want);
    std::fs::File::from(r).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_peek_leaves_the_pipe_as_it_was() {
        let (r, w) = pipe().unwrap();
        assert!(peek_pipe(r.as_fd()).unwrap().is_empty());
        let mut wf = std::fs::File::from(w);
        // Separate writes, so the pipe holds the bytes in several buffers.
        for chunk in [&b"first "[..], &[7u8; 5000][..], b" last"] {
            wf.write_all(chunk).unwrap();
        }
        let seen = peek_pipe(r.as_fd()).unwrap();
        assert_eq!(seen.len(), 6 + 5000 + 5);
        assert_eq!(&seen[..6], b"first ");
        assert_eq!(peek_pipe(r.as_fd()).unwrap(), seen);
        let mut left = Vec::new();
        drop(wf);
        std::fs::File::from(r).read_to_end(&mut left).unwrap();
        assert_eq!(left, seen);
    }

    #[test]
    fn dups_are_one_file() {
        let (r, w) = pipe().unwrap();
        let d = r.try_clone().unwrap();
        let me = std::process::id() as i32;
        assert!(same_file(me, r.as_raw_fd(), d.as_raw_fd()).unwrap());
        assert!(!same_file(me, r.as_raw_fd(), w.as_raw_fd()).unwrap());
    }

    #[test]
    fn a_full_big_pipe_is_peeked_whole() {
        let (r, w) = pipe().unwrap();
        set_pipe_size(w.as_fd(), 256 << 10).unwrap();
        let size = pipe_size(r.as_fd()).unwrap() as usize;
        assert!(size >= 256 << 10);
        let mut wf = std::fs::File::from(w);
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        wf.write_all(&data).unwrap();
        assert_eq!(peek_pipe(r.as_fd()).unwrap(), data);
    }
}
