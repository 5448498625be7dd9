//! The raw half of `--keep-pids` (DESIGN.md §7 "Chosen pids"): how a
//! process is born with a chosen pid in a fresh pid namespace.
//!
//! `clone3` takes `set_tid`, an array of pids, innermost namespace first;
//! one entry picks the pid in the namespace the child is born in and
//! leaves the outer ones to the kernel. It needs `CAP_SYS_ADMIN` (or
//! `CAP_CHECKPOINT_RESTORE`) over the user namespace owning that pid
//! namespace, fails with `EEXIST` when the pid is taken and `EINVAL` when
//! it is above that namespace's `pid_max`.
//!
//! The first process of a namespace is its pid 1: ferry makes it with
//! `clone3(CLONE_NEWPID)` from a short-lived forked child ([`Birth`], used
//! by [`crate::sys::stub::Stub::spawn_with`]), so none of ferry's own
//! threads ever changes namespace. Every other process is made from inside
//! the namespace, by `clone3` with `set_tid` injected into its parent's
//! stub (the root from pid 1, tree children from their parent, threads
//! from their process): [`CloneArgs`] written into the stub's memory. A
//! process made from outside (`setns` then `clone3`) would be orphaned to
//! ferry's init when its forking parent exits, not to the namespace's pid
//! 1 (the kernel picks the reaper of the *parent's* namespace).

use nix::errno::Errno;

/// `CLONE_ARGS_SIZE_VER1`: `struct clone_args` up to `set_tid_size`.
pub const CLONE_ARGS_SIZE: usize = 80;

/// `struct clone_args` (linux/sched.h) up to `set_tid_size`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    /// Address of an `i32` array, innermost namespace first.
    pub set_tid: u64,
    pub set_tid_size: u64,
}

impl CloneArgs {
    /// The struct as the kernel reads it (native endianness).
    pub fn to_bytes(&self) -> [u8; CLONE_ARGS_SIZE] {
        let words = [
            self.flags,
            self.pidfd,
            self.child_tid,
            self.parent_tid,
            self.exit_signal,
            self.stack,
            self.stack_size,
            self.tls,
            self.set_tid,
            self.set_tid_size,
        ];
        let mut out = [0u8; CLONE_ARGS_SIZE];
        for (i, w) in words.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
        }
        out
    }
}

/// Where and with which pid [`crate::sys::stub::Stub::spawn_with`] makes a
/// stub.
#[derive(Debug, Clone, Copy)]
pub enum Birth {
    /// A plain `fork`, in ferry's own pid namespace.
    Here,
    /// Pid 1 of a new pid namespace (`clone3` with `CLONE_NEWPID`).
    NewPidNs,
}

/// Makes the child for `birth`, like `fork`: 0 in the child, the child's
/// pid (in the caller's namespace) in the parent, `-errno` on failure; the
/// step that failed is `*failed_at` (1: the fork or clone3).
///
/// # Safety
/// Only for a single-threaded caller that is itself a fresh `fork` child
/// of ferry: it makes async-signal-safe raw syscalls only, and the child
/// returns into the caller's stack like after `fork`.
pub unsafe fn born(birth: &Birth, failed_at: &mut i32) -> i64 {
    let mut args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    match *birth {
        Birth::Here => {
            *failed_at = 1;
            // SAFETY: the caller is a fresh single-threaded fork child.
            let r = unsafe { libc::fork() };
            return if r < 0 { -errno() } else { r as i64 };
        }
        Birth::NewPidNs => args.flags = libc::CLONE_NEWPID as u64,
    }
    *failed_at = 1;
    // SAFETY: `args` lives across the call; without CLONE_VM the
    // child runs on a copy of this stack and returns from here like after
    // fork.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, CLONE_ARGS_SIZE) };
    if r < 0 {
        -errno()
    } else {
        r
    }
}

/// The calling thread's errno, without allocating (async-signal-safe).
fn errno() -> i64 {
    // SAFETY: __errno_location returns this thread's errno slot, always
    // valid for reads.
    unsafe { *libc::__errno_location() as i64 }
}

/// The inode number that names process `pid`'s pid namespace (what
/// `readlink /proc/PID/ns/pid` shows as `pid:[N]`).
pub fn pid_ns_inode(pid: i32) -> Result<u64, Errno> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/pid"))
        .map(|m| m.ino())
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_args_are_laid_out_as_the_kernel_reads_them() {
        assert_eq!(std::mem::size_of::<CloneArgs>(), CLONE_ARGS_SIZE);
        let a = CloneArgs {
            flags: 1,
            child_tid: 3,
            exit_signal: 17,
            set_tid: 0x1000,
            set_tid_size: 1,
            ..Default::default()
        };
        let b = a.to_bytes();
        let word = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(
            (word(0), word(2), word(4), word(8), word(9)),
            (1, 3, 17, 0x1000, 1)
        );
    }
}
