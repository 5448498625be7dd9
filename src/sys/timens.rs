//! The raw half of [`crate::clocks`]: a time namespace with chosen clock
//! offsets.
//!
//! Offsets are written to `/proc/PID/timens_offsets`, which acts on the
//! namespace PID's *children* will get (`time_for_children`, set by
//! `unshare(CLONE_NEWTIME)`), and only until a process enters it. The file
//! exists for whole processes only, not for threads, so a thread of ferry
//! cannot make one for itself: a short-lived child process unshares,
//! writes the offsets and opens its `ns/time_for_children`, the descriptor
//! a restored process then `setns`es into.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
#[error("{step}: {errno}")]
pub struct TimeNsError {
    pub step: &'static str,
    pub errno: Errno,
}

/// The steps of the child, by the number it reports; the last, that it
/// never got to report.
const STEPS: [&str; 6] = [
    "",
    "unshare(CLONE_NEWTIME)",
    "opening /proc/self/timens_offsets",
    "writing /proc/self/timens_offsets",
    "opening /proc/self/ns/time_for_children",
    "the child",
];

/// What the child is given and hands back; it shares ferry's memory.
#[repr(C)]
struct Job {
    path: *const libc::c_char,
    ns_path: *const libc::c_char,
    offsets: *const u8,
    len: usize,
    /// Out: the step that failed (index into [`STEPS`]), 0 if none.
    step: i32,
    errno: i32,
    /// Out: the namespace's descriptor, in the fd table ferry shares.
    fd: i32,
}

/// A new time namespace whose clock offsets are `offsets` (the text
/// `/proc/PID/timens_offsets` takes, see [`crate::clocks::offsets_text`]).
///
/// The child shares ferry's memory and descriptor table and ferry waits
/// while it runs (`CLONE_VM | CLONE_FILES | CLONE_VFORK`): a plain `fork`
/// of a page server holding images costs milliseconds of page-table
/// copies and copy-on-write faults, and this runs during the downtime.
pub fn time_namespace(offsets: &[u8]) -> Result<OwnedFd, TimeNsError> {
    let path = CString::new("/proc/self/timens_offsets").expect("no NUL in a constant");
    let ns_path = CString::new("/proc/self/ns/time_for_children").expect("no NUL in a constant");
    let mut job = Job {
        path: path.as_ptr(),
        ns_path: ns_path.as_ptr(),
        offsets: offsets.as_ptr(),
        len: offsets.len(),
        step: STEPS.len() as i32 - 1,
        errno: libc::ECHILD,
        fd: -1,
    };
    let mut stack = vec![0u8; 64 << 10];
    // SAFETY: the stack is ours and outlives the child (CLONE_VFORK: we
    // resume only once it has exited); its top, 16-byte aligned, is where
    // x86_64 stacks start. The child touches nothing but `job` and the
    // strings and bytes it points to, all alive until then.
    let child = unsafe {
        let top = stack.as_mut_ptr().add(stack.len());
        let top = top.sub(top as usize % 16);
        libc::clone(
            run_job,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut job as *mut Job).cast(),
        )
    };
    if child < 0 {
        return Err(TimeNsError {
            step: "clone",
            errno: Errno::last(),
        });
    }
    let mut status = 0;
    // SAFETY: reaping our own child; the status goes to a local.
    while unsafe { libc::waitpid(child, &mut status, 0) } < 0 && Errno::last() == Errno::EINTR {}
    drop(stack);
    if job.step != 0 {
        return Err(TimeNsError {
            step: STEPS.get(job.step as usize).copied().unwrap_or("the child"),
            errno: Errno::from_raw(job.errno),
        });
    }
    // SAFETY: the child opened it into the table we share, for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(job.fd) })
}

/// The child: its own process (so `unshare` and `/proc/self` are its own),
/// in ferry's memory, raw syscalls only.
extern "C" fn run_job(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `Job`, alive and untouched while the
    // parent waits (CLONE_VFORK); only async-signal-safe calls follow.
    unsafe {
        let job = &mut *arg.cast::<Job>();
        let errno = || *libc::__errno_location();
        let mut fail = |step: i32, e: i32| {
            job.step = step;
            job.errno = e;
            libc::_exit(1)
        };
        if libc::unshare(libc::CLONE_NEWTIME) != 0 {
            fail(1, errno());
        }
        let fd = libc::open(job.path, libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            fail(2, errno());
        }
        let n = libc::write(fd, job.offsets.cast(), job.len);
        if n != job.len as isize {
            fail(3, if n < 0 { errno() } else { libc::EIO });
        }
        libc::close(fd);
        let ns = libc::open(job.ns_path, libc::O_RDONLY | libc::O_CLOEXEC);
        if ns < 0 {
            fail(4, errno());
        }
        job.fd = ns;
        job.step = 0;
        libc::_exit(0)
    }
}
