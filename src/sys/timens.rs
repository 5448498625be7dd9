//! The raw half of [`crate::clocks`]: a time namespace with chosen clock
//! offsets.
//!
//! Offsets are written to `/proc/PID/timens_offsets`, which acts on the
//! namespace PID's *children* will get (`time_for_children`, set by
//! `unshare(CLONE_NEWTIME)`), and only until a process enters it. The file
//! exists for whole processes only, not for threads, so a thread of ferry
//! cannot make one for itself: a short-lived forked child unshares, writes
//! the offsets and waits while ferry opens its `ns/time_for_children`,
//! the descriptor a restored process then `setns`es into.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
#[error("{step}: {errno}")]
pub struct TimeNsError {
    pub step: &'static str,
    pub errno: Errno,
}

/// The steps of the child, by the number it reports.
const STEPS: [&str; 4] = [
    "",
    "unshare(CLONE_NEWTIME)",
    "opening /proc/self/timens_offsets",
    "writing /proc/self/timens_offsets",
];

/// A new time namespace whose clock offsets are `offsets` (the text
/// `/proc/PID/timens_offsets` takes, see [`crate::clocks::offsets_text`]).
pub fn time_namespace(offsets: &[u8]) -> Result<OwnedFd, TimeNsError> {
    let err = |step, errno| TimeNsError { step, errno };
    let path = CString::new("/proc/self/timens_offsets").expect("no NUL in a constant");
    let pipe = || {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(err("pipe2", Errno::last()));
        }
        // SAFETY: both are fresh fds owned by nobody else.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    };
    let (ready_rd, ready_wr) = pipe()?;
    let (done_rd, done_wr) = pipe()?;
    use std::os::fd::AsRawFd;
    let (rw, dr, dw) = (
        ready_wr.as_raw_fd(),
        done_rd.as_raw_fd(),
        done_wr.as_raw_fd(),
    );
    // SAFETY: the child makes async-signal-safe raw calls only (unshare,
    // open, write, close, read, _exit) on memory prepared before the fork,
    // and never returns into Rust.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: as above; each report is one 8-byte write (step, errno),
        // atomic on a pipe.
        unsafe {
            let report = |step: i32, errno: i32| {
                let m = [step, errno];
                libc::write(rw, m.as_ptr().cast(), 8);
            };
            let errno = || *libc::__errno_location();
            libc::close(dw);
            if libc::unshare(libc::CLONE_NEWTIME) != 0 {
                report(1, errno());
                libc::_exit(1);
            }
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                report(2, errno());
                libc::_exit(1);
            }
            let n = libc::write(fd, offsets.as_ptr().cast(), offsets.len());
            if n != offsets.len() as isize {
                report(3, if n < 0 { errno() } else { libc::EIO });
                libc::_exit(1);
            }
            libc::close(fd);
            report(0, 0);
            // Until ferry has opened the namespace and closes its end.
            let mut b = 0u8;
            while libc::read(dr, (&mut b as *mut u8).cast(), 1) < 0 && errno() == libc::EINTR {}
            libc::_exit(0);
        }
    }
    if child < 0 {
        return Err(err("fork", Errno::last()));
    }
    drop(ready_wr);
    drop(done_rd);
    let mut m = [0i32; 2];
    let mut got = 0usize;
    while got < 8 {
        // SAFETY: reading into the rest of a local 8-byte buffer.
        let n = unsafe {
            libc::read(
                ready_rd.as_raw_fd(),
                m.as_mut_ptr().cast::<u8>().add(got).cast(),
                8 - got,
            )
        };
        match n {
            n if n > 0 => got += n as usize,
            n if n < 0 && Errno::last() == Errno::EINTR => {}
            _ => break,
        }
    }
    let opened = match (got, m[0]) {
        (8, 0) => std::fs::File::open(format!("/proc/{child}/ns/time_for_children"))
            .map(OwnedFd::from)
            .map_err(|e| {
                err(
                    "opening the new time namespace",
                    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                )
            }),
        (8, s) => Err(err(
            STEPS.get(s as usize).copied().unwrap_or("the child"),
            Errno::from_raw(m[1]),
        )),
        _ => Err(err("the child's report", Errno::EPIPE)),
    };
    drop(done_wr);
    let mut status = 0;
    // SAFETY: reaping our own child; the status goes to a local.
    while unsafe { libc::waitpid(child, &mut status, 0) } < 0 && Errno::last() == Errno::EINTR {}
    opened
}
