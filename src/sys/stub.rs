//! The raw half of restore: a stub process that ferry forks from itself and
//! then rebuilds, one injected syscall at a time, into the process of an
//! image (DESIGN.md §7, `probes/p5_restore.c`). No position-independent
//! restorer blob is needed: every step is a syscall made *by the stub* while
//! ptrace holds it, so it acts on the stub's own mm, fd table and thread.
//!
//! **Thread affinity.** A tracee belongs to the OS thread that attached it,
//! and the forking thread should be that thread too. [`Stub`] and [`Seized`]
//! are therefore `!Send`: create them on a dedicated `std::thread` (never a
//! tokio worker) and finish with them there.
//!
//! **The stub's birth.** After `fork` in a multi-threaded process the child
//! may only make async-signal-safe calls: no allocation, no locks. The child
//! forks again and exits; the grandchild calls `setsid`, reports its pid
//! through a pipe and waits reading a second pipe whose write end only
//! ferry holds: if ferry dies before it has seized the stub (from then on
//! `PTRACE_O_EXITKILL` takes care), the read sees end-of-file and the stub
//! exits instead of waiting forever. So the restored process is the
//! leader of its own session and its parent is init (or the nearest child
//! subreaper) from the start: it outlives ferry, and ferry leaves no zombie
//! behind (it reaps the short-lived middle child at once; the restored
//! process is reaped by its new parent when it exits).
//!
//! **Injection** (`probes/ptinj.h`): `rip` points at a `syscall`
//! instruction, `orig_rax = -1`, then two `PTRACE_SYSCALL` steps to the
//! entry and exit stops; `rax` holds the result. The first injection uses a
//! `syscall` found in the stub's `[vdso]`; restore then maps a gadget page
//! (`syscall; int3`) at an address nobody uses and injects through it, so the
//! whole old address space can go. Since every injection stops at the
//! syscall-exit stop, the instruction after the `syscall` never runs: an
//! `munmap` of the very page holding the gadget is safe, as long as the next
//! thing done is setting the final registers.
//!
//! **Inherited baggage.** The stub is a copy of a ferry thread: its rseq
//! registration, alternate signal stack, robust list and clear-tid address
//! point into ferry's memory. rseq in particular must be unregistered before
//! that memory is unmapped, or the kernel's next rseq update (on any return
//! to user space after a preemption) kills the stub with `SIGSEGV`.
//! [`Stub::rseq`] reads the registration so the caller can drop it.

use std::io;
use std::marker::PhantomData;
use std::os::fd::FromRawFd;

use libc::user_regs_struct;
use nix::errno::Errno;

use crate::sys::pidns::{Birth, CloneArgs};
use crate::sys::vm::{self, VmError};

const PTRACE_EVENT_STOP: i32 = 128;
/// Tags of the 8-byte reports on the stub's birth pipe.
const MSG_OUTER: i32 = 1;
const MSG_SELF: i32 = 2;
/// `MSG_FAILED + step` (see [`crate::sys::pidns::born`]), then the errno.
const MSG_FAILED: i32 = 10;
const PTRACE_EVENT_CLONE: i32 = 3;
const PTRACE_EVENT_FORK: i32 = 1;
/// `si_status` of a syscall stop with `PTRACE_O_TRACESYSGOOD`.
const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;
/// Not in every libc crate version.
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const NT_X86_XSTATE: libc::c_ulong = 0x202;
/// Large enough for any XSAVE layout (AMX tiles included).
const XSTATE_MAX: usize = 64 * 1024;

/// `struct ptrace_rseq_configuration`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RseqConfig {
    pub addr: u64,
    pub len: u32,
    pub signature: u32,
    pub flags: u32,
    pad: u32,
}

/// Errors of the stub and of the small capture helper.
#[derive(Debug, thiserror::Error)]
pub enum StubError {
    #[error("{op}: {errno}")]
    Os { op: &'static str, errno: Errno },
    #[error("the stub did not report its pid (it failed before setsid)")]
    NoPid,
    #[error("{op} on process {pid}: {errno}")]
    Ptrace {
        op: &'static str,
        pid: i32,
        errno: Errno,
    },
    #[error("process {pid}: {what}")]
    Unexpected { pid: i32, what: String },
    #[error("no `syscall` instruction in the [vdso] of process {0}")]
    NoSyscallInsn(i32),
    #[error("gpregs: {0} bytes, a user_regs_struct has {n}", n = REGS_SIZE)]
    RegsSize(usize),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Bytes of `struct user_regs_struct` (the image's `gpregs`).
pub const REGS_SIZE: usize = std::mem::size_of::<user_regs_struct>();

/// The image's `gpregs` bytes as registers (one codec for capture and
/// restore: [`crate::state::regs_from_bytes`]).
pub fn regs_from_bytes(bytes: &[u8]) -> Result<user_regs_struct, StubError> {
    crate::state::regs_from_bytes(bytes).ok_or(StubError::RegsSize(bytes.len()))
}

/// Registers as the image's `gpregs` bytes.
pub fn regs_to_bytes(regs: &user_regs_struct) -> Vec<u8> {
    crate::state::regs_to_bytes(regs)
}

fn errno_of(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret == -1 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// The ptrace requests both [`Stub`] and [`Seized`] need, on a stopped tracee.
mod req {
    use super::*;

    pub fn get_regs(pid: i32) -> Result<user_regs_struct, StubError> {
        // SAFETY: all-zero is a valid user_regs_struct.
        let mut regs: user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: PTRACE_GETREGS writes one user_regs_struct to `data`, which
        // points at one.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGS,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                &mut regs as *mut user_regs_struct,
            )
        };
        errno_of(r).map_err(|errno| ptrace_err("PTRACE_GETREGS", pid, errno))?;
        Ok(regs)
    }

    pub fn set_regs(pid: i32, regs: &user_regs_struct) -> Result<(), StubError> {
        // SAFETY: PTRACE_SETREGS reads one user_regs_struct from `data`.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SETREGS,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                regs as *const user_regs_struct,
            )
        };
        errno_of(r).map_err(|errno| ptrace_err("PTRACE_SETREGS", pid, errno))?;
        Ok(())
    }

    pub fn regset(pid: i32, set: bool, buf: &mut [u8]) -> Result<usize, StubError> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let (request, op) = if set {
            (libc::PTRACE_SETREGSET, "PTRACE_SETREGSET NT_X86_XSTATE")
        } else {
            (libc::PTRACE_GETREGSET, "PTRACE_GETREGSET NT_X86_XSTATE")
        };
        // SAFETY: the iovec describes `buf`, which lives across the call; the
        // kernel reads or writes at most iov_len bytes and updates iov_len.
        let r = unsafe { libc::ptrace(request, pid, NT_X86_XSTATE, &mut iov as *mut libc::iovec) };
        errno_of(r).map_err(|errno| ptrace_err(op, pid, errno))?;
        Ok(iov.iov_len)
    }

    pub fn rseq(pid: i32) -> Result<RseqConfig, StubError> {
        let mut conf = RseqConfig::default();
        // SAFETY: the kernel writes at most `addr` (= its size) bytes of
        // struct ptrace_rseq_configuration to `data`.
        let r = unsafe {
            libc::ptrace(
                PTRACE_GET_RSEQ_CONFIGURATION,
                pid,
                std::mem::size_of::<RseqConfig>(),
                &mut conf as *mut RseqConfig,
            )
        };
        errno_of(r).map_err(|errno| ptrace_err("PTRACE_GET_RSEQ_CONFIGURATION", pid, errno))?;
        Ok(conf)
    }

    pub fn set_sigmask(pid: i32, mask: u64) -> Result<(), StubError> {
        // SAFETY: the kernel reads an 8-byte sigset_t from `data`; `addr` is
        // its size.
        let r = unsafe { libc::ptrace(PTRACE_SETSIGMASK, pid, 8usize, &mask as *const u64) };
        errno_of(r).map_err(|errno| ptrace_err("PTRACE_SETSIGMASK", pid, errno))?;
        Ok(())
    }

    /// A request whose `addr` and `data` are plain integers.
    pub fn simple(
        op: &'static str,
        request: libc::c_uint,
        pid: i32,
        data: libc::c_ulong,
    ) -> Result<(), StubError> {
        // SAFETY: the requests used here (SEIZE, INTERRUPT, SYSCALL, DETACH)
        // take integers, not pointers, in `addr` and `data`.
        let r = unsafe { libc::ptrace(request, pid, 0usize, data) };
        errno_of(r).map_err(|errno| ptrace_err(op, pid, errno))?;
        Ok(())
    }

    /// The message of the last ptrace event (the new tid after a clone).
    pub fn event_msg(pid: i32) -> Result<u64, StubError> {
        let mut msg: libc::c_ulong = 0;
        // SAFETY: PTRACE_GETEVENTMSG writes one unsigned long to `data`.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETEVENTMSG,
                pid,
                0usize,
                &mut msg as *mut libc::c_ulong,
            )
        };
        errno_of(r).map_err(|errno| ptrace_err("PTRACE_GETEVENTMSG", pid, errno))?;
        Ok(msg as u64)
    }

    /// Waits for the next state change of the tracee; the raw status.
    pub fn wait(pid: i32) -> Result<i32, StubError> {
        let mut status = 0;
        loop {
            // SAFETY: waitpid writes the status to a local.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
            if r == pid {
                return Ok(status);
            }
            match Errno::last() {
                Errno::EINTR => continue,
                errno => return Err(ptrace_err("waitpid", pid, errno)),
            }
        }
    }

    pub fn ptrace_err(op: &'static str, pid: i32, errno: Errno) -> StubError {
        StubError::Ptrace { op, pid, errno }
    }

    pub fn describe(status: i32) -> String {
        if libc::WIFEXITED(status) {
            format!("exited with status {}", libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else if libc::WIFSTOPPED(status) {
            format!(
                "stopped by signal {} (event {})",
                libc::WSTOPSIG(status),
                status >> 16
            )
        } else {
            format!("status {status:#x}")
        }
    }

    /// SEIZE + INTERRUPT, waiting for the interrupt stop.
    pub fn seize_stopped(pid: i32, options: libc::c_ulong) -> Result<(), StubError> {
        simple("PTRACE_SEIZE", libc::PTRACE_SEIZE, pid, options)?;
        simple("PTRACE_INTERRUPT", libc::PTRACE_INTERRUPT, pid, 0)?;
        loop {
            let st = wait(pid)?;
            if libc::WIFSTOPPED(st) && st >> 16 == PTRACE_EVENT_STOP {
                return Ok(());
            }
            if libc::WIFSTOPPED(st) {
                // A signal-delivery stop that raced the interrupt: deliver it
                // and wait again for the interrupt stop still pending.
                let sig = libc::WSTOPSIG(st) as libc::c_ulong;
                simple("PTRACE_CONT", libc::PTRACE_CONT, pid, sig)?;
                continue;
            }
            return Err(StubError::Unexpected {
                pid,
                what: req::describe(st),
            });
        }
    }
}

/// A process forked from ferry, stopped under ptrace, waiting to become the
/// restored process. Dropping it kills it: a half-restored process never
/// runs.
pub struct Stub {
    pid: i32,
    /// The pid the stub sees itself (`getpid()`): `pid` unless it lives
    /// in a pid namespace below ferry's. Injected syscalls take this one.
    vpid: i32,
    base: user_regs_struct,
    syscall_at: u64,
    alive: bool,
    /// Threads made with [`Stub::clone_thread`], each with its registers at
    /// its first stop (the base of its injections).
    threads: Vec<(i32, user_regs_struct)>,
    tracing_clones: bool,
    /// Seccomp is suspended for the stub and its threads (see
    /// [`Stub::suspend_seccomp`]).
    seccomp_suspended: bool,
    /// ptrace requests must come from the thread that attached.
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for Stub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stub").field("pid", &self.pid).finish()
    }
}

impl Stub {
    /// Forks the stub (see the module docs), seizes it with
    /// `PTRACE_O_EXITKILL` (if ferry dies mid-restore, so does the stub) and
    /// stops it.
    pub fn spawn() -> Result<Stub, StubError> {
        Stub::spawn_with(Birth::Here)
    }

    /// [`Stub::spawn`] with the stub born as `birth` says: in ferry's pid
    /// namespace, or as pid 1 of a new one (`--keep-pids`,
    /// [`crate::sys::pidns`]). The middle child makes
    /// the stub and reports its pid as ferry sees it; the stub reports the
    /// pid it sees itself, once it leads its session.
    pub fn spawn_with(birth: Birth) -> Result<Stub, StubError> {
        let pipe = || {
            let mut fds = [0; 2];
            // SAFETY: pipe2 writes two fds into the array.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return Err(StubError::Os {
                    op: "pipe2",
                    errno: Errno::last(),
                });
            }
            Ok(fds)
        };
        let [rd, wr] = pipe()?;
        let [go_rd, go_wr] = match pipe() {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: closing the first pipe, ours alone.
                unsafe {
                    libc::close(rd);
                    libc::close(wr);
                }
                return Err(e);
            }
        };
        // SAFETY: the child only makes async-signal-safe calls (fork or
        // setns and clone3, setsid, getpid, close, write, read, _exit) and
        // never returns into Rust.
        let middle = unsafe { libc::fork() };
        if middle == 0 {
            // SAFETY: async-signal-safe calls only, in the forked child; no
            // memory is allocated and `wr` stays open for the grandchild.
            // Each report is one 8-byte write (tag, value): atomic on a pipe.
            unsafe {
                let report = |tag: i32, v: i32| {
                    let m = [tag, v];
                    libc::write(wr, m.as_ptr().cast(), 8);
                };
                let mut failed_at = 0;
                let child = crate::sys::pidns::born(&birth, &mut failed_at);
                if child == 0 {
                    libc::close(go_wr);
                    if libc::setsid() < 0 {
                        libc::_exit(1);
                    }
                    report(MSG_SELF, libc::getpid());
                    libc::close(wr);
                    let mut b = 0u8;
                    while libc::read(go_rd, (&mut b as *mut u8).cast(), 1) < 0
                        && *libc::__errno_location() == libc::EINTR
                    {}
                    libc::_exit(1);
                }
                if child < 0 {
                    report(MSG_FAILED + failed_at, -child as i32);
                } else {
                    report(MSG_OUTER, child as i32);
                }
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copies of the ends the stub uses, which
        // nothing else here does.
        unsafe {
            libc::close(wr);
            libc::close(go_rd);
        }
        // Closed when this function returns: by then the stub is seized
        // (with EXITKILL) or killed.
        // SAFETY: go_wr is a fresh fd owned by nobody else.
        let _go = unsafe { std::os::fd::OwnedFd::from_raw_fd(go_wr) };
        if middle < 0 {
            let errno = Errno::last();
            // SAFETY: closing the read end, ours alone.
            unsafe { libc::close(rd) };
            return Err(StubError::Os { op: "fork", errno });
        }
        let mut status = 0;
        // SAFETY: reaping our own child; the status goes to a local.
        while unsafe { libc::waitpid(middle, &mut status, 0) } < 0 && Errno::last() == Errno::EINTR
        {
        }
        // Both reports, in either order; the middle has exited, so a
        // missing one ends in end-of-file once the stub is gone too.
        let (mut outer, mut inner, mut failed) = (None, None, None);
        while (outer.is_none() || inner.is_none()) && failed.is_none() {
            let mut buf = [0u8; 8];
            let mut got = 0;
            while got < 8 {
                // SAFETY: reading into the rest of a local buffer.
                let n = unsafe { libc::read(rd, buf[got..].as_mut_ptr().cast(), 8 - got) };
                if n > 0 {
                    got += n as usize;
                } else if n < 0 && Errno::last() == Errno::EINTR {
                    continue;
                } else {
                    break;
                }
            }
            if got < 8 {
                break;
            }
            let tag = i32::from_ne_bytes(buf[..4].try_into().unwrap_or_default());
            let v = i32::from_ne_bytes(buf[4..].try_into().unwrap_or_default());
            match tag {
                MSG_OUTER => outer = Some(v),
                MSG_SELF => inner = Some(v),
                t => failed = Some((t - MSG_FAILED, v)),
            }
        }
        // SAFETY: closing the read end, ours alone.
        unsafe { libc::close(rd) };
        if let Some((step, errno)) = failed {
            let op = match (step, birth) {
                (1, Birth::NewPidNs) => "clone3(CLONE_NEWPID) of a new pid namespace's pid 1",
                _ => "fork",
            };
            return Err(StubError::Os {
                op,
                errno: Errno::from_raw(errno),
            });
        }
        let (Some(pid), Some(vpid)) = (outer, inner) else {
            if let Some(pid) = outer {
                // SAFETY: kill takes integers; a stub that never reported.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            return Err(StubError::NoPid);
        };
        let mut stub = Stub {
            pid,
            vpid,
            base: {
                // SAFETY: all-zero is a valid user_regs_struct.
                unsafe { std::mem::zeroed() }
            },
            syscall_at: 0,
            alive: true,
            threads: Vec::new(),
            tracing_clones: false,
            seccomp_suspended: false,
            _not_send: PhantomData,
        };
        let opts = (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL) as libc::c_ulong;
        if let Err(e) = req::seize_stopped(pid, opts) {
            // Not ours to trace: kill it so no stray stub is left.
            // SAFETY: kill takes integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            stub.alive = false;
            return Err(e);
        }
        stub.base = req::get_regs(pid)?;
        Ok(stub)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pid as the stub sees itself: what injected syscalls that name a
    /// process (setpgid, tgkill) must be given.
    pub fn vpid(&self) -> i32 {
        self.vpid
    }

    /// The address of a `syscall` instruction in the stub's `[vdso]`, for
    /// the injections before the gadget exists.
    pub fn vdso_syscall(&self) -> Result<u64, StubError> {
        let path = format!("/proc/{}/maps", self.pid);
        let maps = std::fs::read_to_string(&path).map_err(|source| StubError::Proc {
            path: path.clone(),
            source,
        })?;
        for line in maps.lines().filter(|l| l.ends_with("[vdso]")) {
            let Some((range, _)) = line.split_once(' ') else {
                continue;
            };
            let Some((s, e)) = range.split_once('-') else {
                continue;
            };
            let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
                continue;
            };
            let mut text = vec![0u8; (e - s) as usize];
            vm::read(self.pid, s, &mut text)?;
            if let Some(i) = text.windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(s + i as u64);
            }
        }
        Err(StubError::NoSyscallInsn(self.pid))
    }

    /// Injects the following syscalls through the `syscall` at `addr`.
    pub fn set_syscall_at(&mut self, addr: u64) {
        self.syscall_at = addr;
    }

    /// Makes syscall `nr` in the stub; the raw result (`-errno` on failure).
    /// The stub is left in the syscall-exit stop: the instruction after the
    /// `syscall` never runs.
    pub fn syscall(&mut self, nr: libc::c_long, args: [u64; 6]) -> Result<i64, StubError> {
        let (pid, base) = (self.pid, self.base);
        self.syscall_as(pid, base, nr, args)
    }

    /// The same in thread `tid`: the stub's own or one
    /// [`Stub::clone_thread`] made.
    pub fn syscall_in(
        &mut self,
        tid: i32,
        nr: libc::c_long,
        args: [u64; 6],
    ) -> Result<i64, StubError> {
        if tid == self.pid {
            return self.syscall(nr, args);
        }
        let base = self
            .threads
            .iter()
            .find(|t| t.0 == tid)
            .map(|t| t.1)
            .ok_or(StubError::Unexpected {
                pid: tid,
                what: "not a thread of the stub".into(),
            })?;
        self.syscall_as(tid, base, nr, args)
    }

    fn regs_for(
        &self,
        base: user_regs_struct,
        nr: libc::c_long,
        args: [u64; 6],
    ) -> user_regs_struct {
        let mut r = base;
        r.rip = self.syscall_at;
        r.rax = nr as u64;
        // -1: the kernel's restart logic must leave these registers alone.
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        r
    }

    /// Resumes `tid` to its next stop, which must be a syscall stop.
    fn syscall_stop(&mut self, tid: i32, what: &str) -> Result<(), StubError> {
        req::simple("PTRACE_SYSCALL", libc::PTRACE_SYSCALL, tid, 0)?;
        let st = req::wait(tid)?;
        if libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == SYSCALL_STOP {
            return Ok(());
        }
        if (libc::WIFEXITED(st) || libc::WIFSIGNALED(st)) && tid == self.pid {
            self.alive = false;
        }
        Err(StubError::Unexpected {
            pid: tid,
            what: format!("{what}: {}", req::describe(st)),
        })
    }

    fn syscall_as(
        &mut self,
        tid: i32,
        base: user_regs_struct,
        nr: libc::c_long,
        args: [u64; 6],
    ) -> Result<i64, StubError> {
        req::set_regs(tid, &self.regs_for(base, nr, args))?;
        for phase in ["entry", "exit"] {
            self.syscall_stop(tid, &format!("syscall {nr}: instead of the {phase} stop"))?;
        }
        Ok(req::get_regs(tid)?.rax as i64)
    }

    /// Makes a new thread of the stub with `clone(flags, 0, 0, ctid, 0)`
    /// from its main thread; the new thread is traced too and waits at its
    /// first stop. Returns its tid (or the clone's `-errno`).
    pub fn clone_thread(&mut self, flags: u64, ctid: u64) -> Result<i64, StubError> {
        let regs = self.regs_for(self.base, libc::SYS_clone, [flags, 0, 0, ctid, 0, 0]);
        Ok(self.clone_via(regs)?.0)
    }

    /// [`Stub::clone_thread`] with the new thread's tid chosen: `clone3`
    /// with `set_tid = [vtid]` (the tid in the stub's own pid namespace),
    /// its arguments written at `scratch` as for [`Stub::fork_child_as`].
    /// Returns the new thread's tid as ferry sees it (the one ptrace and
    /// [`Stub::syscall_in`] take), or the clone's `-errno`.
    pub fn clone_thread_as(
        &mut self,
        flags: u64,
        ctid: u64,
        vtid: i32,
        scratch: u64,
    ) -> Result<i64, StubError> {
        let args = self.put_clone_args(
            CloneArgs {
                flags,
                child_tid: ctid,
                ..CloneArgs::default()
            },
            vtid,
            scratch,
        )?;
        let regs = self.regs_for(self.base, libc::SYS_clone3, args);
        Ok(match self.clone_via(regs)? {
            (ret, Some(tid)) if ret >= 0 => tid as i64,
            (ret, _) => ret,
        })
    }

    /// The injected clone's result and the new thread's tid as ferry sees
    /// it (from the ptrace event; none if the clone failed).
    fn clone_via(&mut self, regs: user_regs_struct) -> Result<(i64, Option<i32>), StubError> {
        if !self.tracing_clones {
            let opts = libc::PTRACE_O_TRACESYSGOOD
                | libc::PTRACE_O_EXITKILL
                | libc::PTRACE_O_TRACECLONE
                | self.suspension();
            req::simple(
                "PTRACE_SETOPTIONS",
                libc::PTRACE_SETOPTIONS,
                self.pid,
                opts as libc::c_ulong,
            )?;
            self.tracing_clones = true;
        }
        let pid = self.pid;
        req::set_regs(pid, &regs)?;
        self.syscall_stop(pid, "clone: instead of the entry stop")?;
        req::simple("PTRACE_SYSCALL", libc::PTRACE_SYSCALL, pid, 0)?;
        let st = req::wait(pid)?;
        let clone_event =
            libc::WIFSTOPPED(st) && st >> 8 == (libc::SIGTRAP | (PTRACE_EVENT_CLONE << 8));
        if !clone_event {
            // A failed clone goes straight to the exit stop.
            if libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == SYSCALL_STOP {
                return Ok((req::get_regs(pid)?.rax as i64, None));
            }
            return Err(StubError::Unexpected {
                pid,
                what: format!("clone: {} instead of the clone event", req::describe(st)),
            });
        }
        let tid = req::event_msg(pid)? as i32;
        // The new thread's first stop; from here on it is ours to kill.
        let st = req::wait(tid)?;
        if !(libc::WIFSTOPPED(st) && st >> 16 == PTRACE_EVENT_STOP) {
            return Err(StubError::Unexpected {
                pid: tid,
                what: format!(
                    "new thread: {} instead of its first stop",
                    req::describe(st)
                ),
            });
        }
        self.threads.push((tid, req::get_regs(tid)?));
        self.syscall_stop(pid, "clone: instead of the exit stop")?;
        Ok((req::get_regs(pid)?.rax as i64, Some(tid)))
    }

    /// Forks the stub with an injected `fork` (`PTRACE_O_TRACEFORK`: the
    /// child is traced from its birth and inherits the stub's options,
    /// `PTRACE_O_EXITKILL` included). The child is a copy of the stub as it
    /// is now, the gadget and the injection address included, and the
    /// stub's child: a tree restored this way keeps its parent relations.
    /// Call it on a single-threaded stub.
    pub fn fork_child(&mut self) -> Result<Stub, StubError> {
        let regs = self.regs_for(self.base, libc::SYS_fork, [0; 6]);
        self.fork_via(regs, None)
    }

    /// [`Stub::fork_child`] with the child's pid chosen: `clone3` with
    /// `set_tid = [vpid]` injected, its arguments written at `scratch` (80
    /// bytes and the pid; writable memory of the stub). The pid is the one
    /// in the stub's own pid namespace (`--keep-pids`).
    pub fn fork_child_as(&mut self, vpid: i32, scratch: u64) -> Result<Stub, StubError> {
        let args = self.put_clone_args(
            CloneArgs {
                exit_signal: libc::SIGCHLD as u64,
                ..CloneArgs::default()
            },
            vpid,
            scratch,
        )?;
        let regs = self.regs_for(self.base, libc::SYS_clone3, args);
        self.fork_via(regs, Some(vpid))
    }

    /// Writes `args` with `set_tid = [vpid]` at `scratch`; the syscall's
    /// arguments.
    fn put_clone_args(
        &self,
        mut args: CloneArgs,
        vpid: i32,
        scratch: u64,
    ) -> Result<[u64; 6], StubError> {
        let tid_at = scratch + crate::sys::pidns::CLONE_ARGS_SIZE as u64;
        args.set_tid = tid_at;
        args.set_tid_size = 1;
        let mut bytes = args.to_bytes().to_vec();
        bytes.extend_from_slice(&vpid.to_ne_bytes());
        vm::write(self.pid, scratch, &bytes)?;
        Ok([
            scratch,
            crate::sys::pidns::CLONE_ARGS_SIZE as u64,
            0,
            0,
            0,
            0,
        ])
    }

    fn fork_via(&mut self, regs: user_regs_struct, vpid: Option<i32>) -> Result<Stub, StubError> {
        let opts = libc::PTRACE_O_TRACESYSGOOD
            | libc::PTRACE_O_EXITKILL
            | libc::PTRACE_O_TRACEFORK
            | if self.tracing_clones {
                libc::PTRACE_O_TRACECLONE
            } else {
                0
            }
            | self.suspension();
        let pid = self.pid;
        req::simple(
            "PTRACE_SETOPTIONS",
            libc::PTRACE_SETOPTIONS,
            pid,
            opts as libc::c_ulong,
        )?;
        req::set_regs(pid, &regs)?;
        self.syscall_stop(pid, "fork: instead of the entry stop")?;
        req::simple("PTRACE_SYSCALL", libc::PTRACE_SYSCALL, pid, 0)?;
        let st = req::wait(pid)?;
        let fork_event =
            libc::WIFSTOPPED(st) && st >> 8 == (libc::SIGTRAP | (PTRACE_EVENT_FORK << 8));
        if !fork_event {
            let what = if libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == SYSCALL_STOP {
                let ret = req::get_regs(pid)?.rax as i64;
                if let (Some(_), -4095..=-1) = (vpid, ret) {
                    // The errno says why the pid could not be had.
                    return Err(StubError::Ptrace {
                        op: "injected clone3 with set_tid",
                        pid,
                        errno: Errno::from_raw(-ret as i32),
                    });
                }
                format!("fork failed: {ret}")
            } else {
                format!("fork: {} instead of the fork event", req::describe(st))
            };
            return Err(StubError::Unexpected { pid, what });
        }
        let child_pid = req::event_msg(pid)? as i32;
        // From here on the child is ours: dropping it kills it.
        let mut child = Stub {
            pid: child_pid,
            vpid: vpid.unwrap_or(child_pid),
            base: self.base,
            syscall_at: self.syscall_at,
            alive: true,
            threads: Vec::new(),
            tracing_clones: false,
            seccomp_suspended: false,
            _not_send: PhantomData,
        };
        let st = req::wait(child_pid)?;
        if !(libc::WIFSTOPPED(st) && st >> 16 == PTRACE_EVENT_STOP) {
            return Err(StubError::Unexpected {
                pid: child_pid,
                what: format!(
                    "new process: {} instead of its first stop",
                    req::describe(st)
                ),
            });
        }
        child.base = req::get_regs(child_pid)?;
        self.syscall_stop(pid, "fork: instead of the exit stop")?;
        Ok(child)
    }

    /// Makes the stub exit with wait status `status` (an exit code in bits
    /// 8-15): `exit_group` injected, the stub let go at its entry. It
    /// stays a zombie until its parent reaps it. Returns its pid.
    pub fn exit_as_zombie(mut self, status: i32) -> Result<i32, StubError> {
        let pid = self.pid;
        let code = ((status >> 8) & 0xff) as u64;
        let regs = self.regs_for(self.base, libc::SYS_exit_group, [code, 0, 0, 0, 0, 0]);
        req::set_regs(pid, &regs)?;
        self.syscall_stop(pid, "exit_group: instead of the entry stop")?;
        req::simple("PTRACE_DETACH", libc::PTRACE_DETACH, pid, 0)?;
        self.alive = false;
        Ok(pid)
    }

    /// Lets the stub run the code at `rip` (in its own memory) with no
    /// signal blocked and its other registers as they were at its birth;
    /// detaches. Returns the pid.
    pub fn run_at(self, rip: u64) -> Result<i32, StubError> {
        let mut regs = self.base;
        regs.rip = rip;
        regs.orig_rax = u64::MAX;
        let pid = self.pid;
        self.resume_all(&[Resume {
            tid: pid,
            regs,
            xstate: &[],
            sigmask: 0,
        }])
    }

    /// From here until the stub and `tids` (threads it made) are let go,
    /// seccomp filters do not apply to their syscalls
    /// (`PTRACE_O_SUSPEND_SECCOMP`, `CAP_SYS_ADMIN`): filters installed
    /// while ferry still has calls to inject would judge ferry's calls
    /// by the process's rules. Detaching ends it.
    pub fn suspend_seccomp(&mut self, tids: &[i32]) -> Result<(), StubError> {
        self.seccomp_suspended = true;
        let opts = libc::PTRACE_O_TRACESYSGOOD
            | libc::PTRACE_O_EXITKILL
            | if self.tracing_clones {
                libc::PTRACE_O_TRACECLONE
            } else {
                0
            }
            | self.suspension();
        for &tid in std::iter::once(&self.pid).chain(tids) {
            req::simple(
                "PTRACE_SETOPTIONS (PTRACE_O_SUSPEND_SECCOMP)",
                libc::PTRACE_SETOPTIONS,
                tid,
                opts as libc::c_ulong,
            )?;
        }
        Ok(())
    }

    fn suspension(&self) -> libc::c_int {
        if self.seccomp_suspended {
            super::ptrace::PTRACE_O_SUSPEND_SECCOMP as libc::c_int
        } else {
            0
        }
    }

    /// Sets the blocked signals of thread `tid` (the stub's or one it made).
    pub fn set_sigmask_of(&self, tid: i32, mask: u64) -> Result<(), StubError> {
        req::set_sigmask(tid, mask)
    }

    /// Writes `data` at `addr` of the stub (the page must be writable).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), VmError> {
        vm::write(self.pid, addr, data)
    }

    /// Reads `out.len()` bytes at `addr` of the stub.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), VmError> {
        vm::read(self.pid, addr, out)
    }

    /// The stub's rseq registration (inherited from the forking thread), if
    /// any.
    pub fn rseq(&self) -> Result<Option<RseqConfig>, StubError> {
        let c = req::rseq(self.pid)?;
        Ok((c.addr != 0).then_some(c))
    }

    /// Sets the blocked signals (`PTRACE_SETSIGMASK`).
    pub fn set_sigmask(&self, mask: u64) -> Result<(), StubError> {
        req::set_sigmask(self.pid, mask)
    }

    /// Sets the final state and lets the process run: XSAVE area (must be
    /// exactly this CPU's size), blocked signals, then the general
    /// registers, then detach. Returns the pid.
    pub fn resume(
        self,
        regs: &user_regs_struct,
        xstate: &[u8],
        sigmask: u64,
    ) -> Result<i32, StubError> {
        let pid = self.pid;
        self.resume_all(&[Resume {
            tid: pid,
            regs: *regs,
            xstate,
            sigmask,
        }])
    }

    /// [`Stub::resume`] for every thread: each thread's state is set before
    /// any is let go; the main thread goes last.
    pub fn resume_all(mut self, threads: &[Resume<'_>]) -> Result<i32, StubError> {
        self.set_final(threads)?;
        let tids: Vec<i32> = threads.iter().map(|t| t.tid).collect();
        self.release(&tids)
    }

    /// The first half of [`Stub::resume_all`]: every thread gets its final
    /// state but stays stopped, so the process can still be dropped
    /// (killed) unseen until [`Stub::release`] (the two-phase end of a
    /// migration).
    pub fn set_final(&mut self, threads: &[Resume<'_>]) -> Result<(), StubError> {
        for t in threads {
            if !t.xstate.is_empty() {
                let mut buf = t.xstate.to_vec();
                req::regset(t.tid, true, &mut buf)?;
            }
            req::set_sigmask(t.tid, t.sigmask)?;
            req::set_regs(t.tid, &t.regs)?;
        }
        Ok(())
    }

    /// The second half: detaches `tids` (the main thread last), and the
    /// process runs.
    pub fn release(mut self, tids: &[i32]) -> Result<i32, StubError> {
        for &tid in tids.iter().filter(|&&t| t != self.pid) {
            req::simple("PTRACE_DETACH", libc::PTRACE_DETACH, tid, 0)?;
        }
        req::simple("PTRACE_DETACH", libc::PTRACE_DETACH, self.pid, 0)?;
        self.alive = false;
        Ok(self.pid)
    }
}

/// What [`Stub::resume_all`] sets in one thread.
pub struct Resume<'a> {
    pub tid: i32,
    pub regs: user_regs_struct,
    pub xstate: &'a [u8],
    pub sigmask: u64,
}

impl Drop for Stub {
    fn drop(&mut self) {
        if !self.alive {
            return;
        }
        // SAFETY: kill takes integers; the pid is our tracee, which cannot
        // have been reaped and reused while we trace it.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            // A stub that took the image's credentials (another uid) may be
            // beyond kill(2) without CAP_KILL; its tracer can always kill it.
            // SAFETY: ptrace with integer arguments, on our own tracee.
            unsafe { libc::ptrace(libc::PTRACE_KILL, self.pid, 0, 0) };
        }
        // Collect the tracees' exit notifications; the real parent (init or
        // a subreaper) reaps the zombie.
        for &(tid, _) in &self.threads {
            let _ = req::wait(tid);
        }
        let _ = req::wait(self.pid);
    }
}

/// The per-thread state a capture reads with ptrace.
#[derive(Debug, Clone)]
pub struct ThreadRegs {
    /// `struct user_regs_struct`, as the image's `gpregs`.
    pub gpregs: Vec<u8>,
    /// The XSAVE area (`NT_X86_XSTATE`), as the image's `xstate`.
    pub xstate: Vec<u8>,
    pub rseq: Option<RseqConfig>,
}

/// A live process held stopped under ptrace from this thread, to read a
/// thread's registers (a small capture helper for tests and tools; the dump
/// path uses [`crate::sys::ptrace::Tracee`]). Dropping it detaches.
pub struct Seized {
    pid: i32,
    attached: bool,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for Seized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seized").field("pid", &self.pid).finish()
    }
}

impl Seized {
    /// Seizes `tid` and stops it.
    pub fn seize(tid: i32) -> Result<Seized, StubError> {
        req::seize_stopped(tid, 0)?;
        Ok(Seized {
            pid: tid,
            attached: true,
            _not_send: PhantomData,
        })
    }

    pub fn regs(&self) -> Result<ThreadRegs, StubError> {
        let regs = req::get_regs(self.pid)?;
        let mut xstate = vec![0u8; XSTATE_MAX];
        let n = req::regset(self.pid, false, &mut xstate)?;
        xstate.truncate(n);
        let rseq = req::rseq(self.pid)?;
        Ok(ThreadRegs {
            gpregs: regs_to_bytes(&regs),
            xstate,
            rseq: (rseq.addr != 0).then_some(rseq),
        })
    }

    /// Lets it run again.
    pub fn detach(mut self) -> Result<(), StubError> {
        self.attached = false;
        req::simple("PTRACE_DETACH", libc::PTRACE_DETACH, self.pid, 0)
    }
}

impl Drop for Seized {
    fn drop(&mut self) {
        if self.attached {
            let _ = req::simple("PTRACE_DETACH", libc::PTRACE_DETACH, self.pid, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_round_trip_through_bytes() {
        // SAFETY: all-zero is a valid user_regs_struct.
        let mut r: user_regs_struct = unsafe { std::mem::zeroed() };
        r.rip = 0x1234;
        r.fs_base = 0x7f00_0000_1000;
        let b = regs_to_bytes(&r);
        assert_eq!(b.len(), 27 * 8);
        let back = regs_from_bytes(&b).unwrap();
        assert_eq!((back.rip, back.fs_base), (0x1234, 0x7f00_0000_1000));
        assert!(matches!(
            regs_from_bytes(&b[1..]),
            Err(StubError::RegsSize(215))
        ));
    }
}
