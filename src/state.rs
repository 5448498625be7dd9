//! Capture of a frozen process's state into the image (DESIGN.md §6):
//! everything the destination needs besides the memory pages to rebuild
//! the process, in `ferry_proto::pb` form.
//!
//! **Called last, on a frozen process whose memory is already sent.** The
//! final delta has left before this runs, so capturing must not change a
//! single byte of the target's memory: the image would no longer match.
//! Most of the state is read from outside (`/proc`, ptrace requests,
//! `get_robust_list`), but three things only the target itself can say:
//! its signal actions (`rt_sigaction`), each thread's `clear_child_tid`
//! (`prctl(PR_GET_TID_ADDRESS)`) and the current break (`brk(0)`) (and,
//! answered in a register, each thread's securebits and the process's
//! dumpable flag, which `/proc` does not show). Those
//! are injected syscalls whose answers the kernel writes into target
//! memory, so a private scratch mapping is injected first, read back with
//! `process_vm_readv`, and unmapped before returning, on error paths too.
//! Each thread is asked everything in one batch ([`Tracee::syscalls_in`]:
//! one set of registers, two syscall stops a call, the table in the
//! scratch area), which makes the 62 signal actions 0.8 ms rather than 4.8.
//! Injections run with every signal blocked in the injected thread
//! ([`Tracee::syscall_in`]): a handler running now would write pages the
//! image does not have. The mappings are listed before the scratch area
//! exists, so it never shows up in the image.
//!
//! One write is the kernel's and cannot be prevented: a thread resumed for
//! an injection passes through the return to user space, where the kernel
//! refreshes the `cpu_id`/`mm_cid` fields of its rseq area, and they differ
//! when the thread lands on another CPU. So each thread's rseq area is read
//! before the injections and written back after them, while the thread is
//! still stopped: the memory is again byte for byte what was sent. (The
//! kernel refreshes the fields anyway before the thread runs user code
//! again, here or on the destination.)
//!
//! Descriptors are read from `/proc/PID/fdinfo` (eventfd counts, timers,
//! signalfd masks, epoll registrations) and, for what has contents, from
//! copies taken with `pidfd_getfd` ([`capture_fd_data`]): a pipe's unread
//! bytes are peeked with `tee`, a memfd's or deleted file's contents read
//! with `pread`, so neither the pipe nor the shared file offset changes.
//! Sockets are classified and read by [`crate::sockets`] (listeners,
//! established TCP connections in repair mode, UNIX pairs and listeners);
//! other sockets, inotify, fanotify, io_uring and the like stay
//! `UNSUPPORTED`, with a description that names them.
//!
//! Registers are saved in the form the thread resumes with after an
//! injection ([`resume_regs`]): an interrupted syscall rewound to be
//! issued again, since the kernel's restart logic will not run for a thread
//! rebuilt on another host.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};

use bytes::Bytes;
use ferry_proto::pb;
use libc::user_regs_struct;

use crate::procfs::{self, FdInfo, MapEntry, ProcError};
use crate::sys::fds as sys_fds;
use crate::sys::ptrace::{self, resume_regs, PtraceError, Tracee};
use crate::sys::vm::{self, VmError};

/// `prctl` option missing from the libc crate (`linux/prctl.h`).
const PR_GET_TID_ADDRESS: u64 = 40;
const PR_GET_DUMPABLE: u64 = 3;
const PR_GET_SECUREBITS: u64 = 27;
const PR_GET_PDEATHSIG: u64 = 2;
const PR_GET_TIMERSLACK: u64 = 30;
const PR_GET_CHILD_SUBREAPER: u64 = 37;
const PR_GET_THP_DISABLE: u64 = 42;
const PR_GET_MDWE: u64 = 66;
/// Size of the kernel's `struct sigaction` on x86_64: handler, flags,
/// restorer, mask, each 8 bytes.
const KSIGACTION: usize = 32;
/// Highest signal number (`_NSIG`).
const NSIG: u32 = 64;
/// Scratch bytes for the signal actions: one slot per signal, so every
/// answer lands in its own place and the area is read back once.
const SIG_AREA: usize = KSIGACTION * NSIG as usize;
/// `sizeof(stack_t)` on x86_64: sp, flags (padded), size.
const STACK_T: usize = 24;
/// `sizeof(struct itimerval)` on x86_64: interval and value, each seconds
/// and microseconds.
const ITIMERVAL: usize = 32;
/// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
const ITIMERS: usize = 3;
/// `sizeof(struct itimerspec)` on x86_64: interval and value, each seconds
/// and nanoseconds.
const ITIMERSPEC: usize = 32;
/// `sizeof(struct user_regs_struct)` on x86_64: 27 registers.
pub const GPREGS_LEN: usize = 27 * 8;

/// Errors of state capture.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The process is running: what would be read of it is not consistent
    /// with the memory sent. Freeze it first.
    #[error("process {0} is not frozen")]
    NotFrozen(i32),
    /// The tracee has no live thread (it exited).
    #[error("process {0} has no live thread")]
    NoThreads(i32),
    /// Reading `/proc` failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// A ptrace request (registers, masks, rseq) failed.
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    /// An injected syscall failed; `what` names it and the thread.
    #[error("{what}: {source}")]
    Inject {
        what: String,
        #[source]
        source: PtraceError,
    },
    /// An injected syscall that cannot fail answered an error.
    #[error("{what} answered {ret}")]
    Answer { what: String, ret: i64 },
    /// Reading the answers back from the scratch area failed.
    #[error("reading the scratch area of process {pid}: {source}")]
    Read {
        pid: i32,
        #[source]
        source: VmError,
    },
    /// A `/proc` link or file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A POSIX timer counts another process's CPU time
    /// (`clock_getcpuclockid`), which does not move with this one.
    #[error(
        "process {pid}: POSIX timer {id} counts the CPU time of another process \
         (clock {clock}), which is not carried over: not supported yet"
    )]
    PosixTimerClock { pid: i32, id: i32, clock: i32 },
    /// A POSIX timer signals a thread that is not one of the process's.
    #[error(
        "process {pid}: POSIX timer {id} signals thread {tid}, which is not one of its threads"
    )]
    PosixTimerThread { pid: i32, id: i32, tid: i32 },
    /// A thread runs under seccomp, which the restore cannot put back yet
    /// (see [`procfs::Status::seccomp_refusal`]).
    #[error("thread {tid} of process {pid} {why}: not supported yet")]
    Seccomp { pid: i32, tid: i32, why: String },
    /// A thread's scheduling could not be read.
    #[error("thread {tid}: {op}: {errno}")]
    Sched {
        tid: i32,
        op: &'static str,
        errno: nix::errno::Errno,
    },
    /// The thread's seccomp filters could not be read (reading them
    /// takes `CAP_SYS_ADMIN`).
    #[error("reading the {count} seccomp filter(s) of thread {tid} of process {pid} (needs CAP_SYS_ADMIN): {source}")]
    SeccompFilters {
        pid: i32,
        tid: i32,
        count: u32,
        #[source]
        source: PtraceError,
    },
    /// Pipe bytes and file contents together exceed [`MAX_FD_DATA`].
    #[error(
        "fd {fd}: {bytes} bytes of pipe or file contents, more than the {MAX_FD_DATA} an image holds in all"
    )]
    TooMuchData { fd: i32, bytes: u64 },
    /// A socket's state could not be read, or cannot move as it is.
    #[error(transparent)]
    Socket(#[from] crate::sockets::SocketError),
    /// Writing a thread's rseq area back failed: the kernel's refresh of
    /// its cpu fields stays, and the memory differs from what was sent.
    #[error("putting back the rseq area of thread {tid} at {addr:#x}: {source}")]
    RseqArea {
        tid: i32,
        addr: u64,
        #[source]
        source: VmError,
    },
    /// The scratch mapping could not be removed: the target now has a
    /// mapping its image does not list.
    #[error("removing the scratch mapping {addr:#x} (+{len}) from process {pid}: {source}")]
    ScratchLeft {
        pid: i32,
        addr: u64,
        len: u64,
        #[source]
        source: PtraceError,
    },
}

fn inject_err(what: impl Into<String>) -> impl FnOnce(PtraceError) -> StateError {
    let what = what.into();
    move |source| StateError::Inject { what, source }
}

/// Captures the state of process `pid`, which `tracee` holds frozen, as a
/// one-process tree. Its memory is left exactly as it was (see the module
/// documentation); its registers are left as [`resume_regs`] of what they
/// were, which is what the image records.
pub fn capture(pid: i32, tracee: &Tracee) -> Result<pb::ProcessTree, StateError> {
    if !tracee.is_frozen() {
        return Err(StateError::NotFrozen(pid));
    }
    let tids = thread_order(pid, tracee.tids());
    if tids.is_empty() {
        return Err(StateError::NoThreads(pid));
    }
    let stat = procfs::read_stat_fields(pid)?;
    let status = procfs::read_status(pid)?;
    let timers = posix_timers(pid, &tids)?;
    let creds = procfs::read_creds(pid)?;
    // Before the scratch area is mapped, so it is never part of the image.
    let vmas = procfs::read_maps(pid)?
        .iter()
        .map(|m| vma(pid, m))
        .collect();
    let mut fds = capture_fds(pid)?;
    capture_fd_data(pid, &mut fds)?;
    let rseq_areas = save_rseq_areas(pid, tracee, &tids)?;
    let injected = injected_reads(pid, tracee, &tids, timers);
    let put_back = put_back_rseq_areas(pid, &rseq_areas);
    let injected = injected?;
    put_back?;
    let threads = tids
        .iter()
        .zip(&injected.clear_child_tid)
        .zip(&injected.securebits)
        .zip(injected.altstacks.iter().zip(&injected.pdeathsigs))
        .zip(&injected.timer_slack)
        .map(|((((&tid, &ctid), &sb), (alt, &pdeathsig)), &slack)| {
            capture_thread(pid, tracee, tid, ctid, sb).map(|t| pb::Thread {
                altstack: Some(*alt),
                pdeathsig,
                timer_slack_ns: Some(slack),
                ..t
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mm = pb::MmFields {
        start_code: stat.start_code,
        end_code: stat.end_code,
        start_data: stat.start_data,
        end_data: stat.end_data,
        start_brk: stat.start_brk,
        brk: injected.brk,
        start_stack: stat.start_stack,
        arg_start: stat.arg_start,
        arg_end: stat.arg_end,
        env_start: stat.env_start,
        env_end: stat.env_end,
        auxv: Bytes::from(read_file(pid, "auxv")?),
        exe: read_link(pid, "exe")?,
    };
    let process = pb::Process {
        pid,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        comm: procfs::read_comm(pid)?,
        cwd: read_link(pid, "cwd")?,
        creds: Some(crate::creds::Creds::from_proc(creds, injected.securebits[0]).to_pb()),
        mm: Some(mm),
        vmas,
        threads,
        fds,
        sigactions: injected.sigactions,
        rlimits: procfs::read_limits(pid)?
            .into_iter()
            .map(|(resource, soft, hard)| pb::Rlimit {
                resource,
                soft,
                hard,
            })
            .collect(),
        pending_signals: status.sig_pnd | status.shd_pnd,
        shared_queued_signals: queued(tracee, tids[0], true)?,
        personality: procfs::read_personality(pid)?,
        // The dump of a tree sets it; a lone process is the root.
        space: 0,
        zombie: false,
        exit_status: 0,
        dumpable: Some(injected.dumpable),
        umask: status.umask,
        itimers: injected.itimers,
        child_subreaper: injected.child_subreaper,
        thp_disable: injected.thp_disable,
        mdwe: injected.mdwe,
        posix_timers: injected.posix_timers,
        // Pid namespace ids: filled for the whole tree by the dump
        // (crate::pidns::record).
        ..Default::default()
    };
    Ok(pb::ProcessTree {
        processes: vec![process],
    })
}

/// The main thread first (the restore creates it first, as the process),
/// the others in tid order. A leader that exited alone is not listed.
fn thread_order(pid: i32, mut tids: Vec<i32>) -> Vec<i32> {
    tids.sort_unstable();
    tids.dedup();
    if let Some(i) = tids.iter().position(|&t| t == pid) {
        tids.remove(i);
        tids.insert(0, pid);
    }
    tids
}

// ---------------------------------------------------------------- injected

/// A thread's registered rseq area and its contents.
struct RseqArea {
    tid: i32,
    addr: u64,
    bytes: Vec<u8>,
}

fn save_rseq_areas(pid: i32, tracee: &Tracee, tids: &[i32]) -> Result<Vec<RseqArea>, StateError> {
    let mut out = Vec::new();
    for &tid in tids {
        let c = tracee.rseq_config(tid)?;
        if c.abi_pointer == 0 || c.abi_size == 0 {
            continue;
        }
        let mut bytes = vec![0u8; c.abi_size as usize];
        vm::read(pid, c.abi_pointer, &mut bytes).map_err(|source| StateError::RseqArea {
            tid,
            addr: c.abi_pointer,
            source,
        })?;
        out.push(RseqArea {
            tid,
            addr: c.abi_pointer,
            bytes,
        });
    }
    Ok(out)
}

/// Writes every saved area back, even after a failure, and reports the
/// first failure.
fn put_back_rseq_areas(pid: i32, areas: &[RseqArea]) -> Result<(), StateError> {
    let mut first = Ok(());
    for a in areas {
        if let Err(source) = vm::write(pid, a.addr, &a.bytes) {
            if first.is_ok() {
                first = Err(StateError::RseqArea {
                    tid: a.tid,
                    addr: a.addr,
                    source,
                });
            }
        }
    }
    first
}

/// What only injected syscalls can tell.
struct Injected {
    brk: u64,
    /// One per thread, in the order given.
    clear_child_tid: Vec<u64>,
    /// One per thread, in the order given.
    altstacks: Vec<pb::SigAltStack>,
    /// One per thread, in the order given.
    pdeathsigs: Vec<i32>,
    /// The armed ones.
    itimers: Vec<pb::ITimer>,
    /// Every one, armed or not, with its times.
    posix_timers: Vec<pb::PosixTimer>,
    sigactions: Vec<pb::SigAction>,
    /// One per thread, in the order given.
    securebits: Vec<u32>,
    dumpable: u32,
    /// One per thread, in the order given, in ns.
    timer_slack: Vec<u64>,
    child_subreaper: bool,
    thp_disable: bool,
    /// `PR_MDWE_*` flags.
    mdwe: u32,
}

/// The signals whose action can be asked for: all but SIGKILL and SIGSTOP,
/// whose actions are fixed.
fn signals() -> impl Iterator<Item = u32> {
    (1..=NSIG).filter(|&s| s != libc::SIGKILL as u32 && s != libc::SIGSTOP as u32)
}

/// Where the table of the batches goes in the scratch area: after the
/// signal actions and the tid addresses.
/// Where the per-thread `stack_t` answers start: after the tid addresses.
fn alt_area(threads: usize) -> usize {
    SIG_AREA + 8 * threads
}

/// Where the interval timers' answers start: after the stacks.
fn itimer_area(threads: usize) -> usize {
    alt_area(threads) + STACK_T * threads
}

/// Where the per-thread parent-death signals start: after the timers.
fn pdeath_area(threads: usize) -> usize {
    itimer_area(threads) + ITIMERVAL * ITIMERS
}

/// Where the child-subreaper flag (an `int`) lands: after the
/// parent-death signals.
fn subreaper_slot(threads: usize) -> usize {
    pdeath_area(threads) + 8 * threads
}

/// Where the POSIX timers' `struct itimerspec` answers start: after the
/// subreaper flag.
fn posix_area(threads: usize) -> usize {
    subreaper_slot(threads) + 8
}

fn table_offset(threads: usize, timers: usize) -> u64 {
    (posix_area(threads) + ITIMERSPEC * timers) as u64
}

fn scratch_len(threads: usize, timers: usize) -> u64 {
    let page = crate::sys::page_size();
    // The first thread's batch is the longest: 10 calls, both kinds of
    // timers and the signals.
    let calls = 10 + ITIMERS + timers + signals().count();
    let bytes =
        table_offset(threads, timers) + (calls * crate::sys::trampoline::BATCH_ENTRY) as u64;
    bytes.div_ceil(page) * page
}

/// Whose CPU time clock `clock` counts, if it is one of the ids
/// `clock_getcpuclockid` and `pthread_getcpuclockid` make (`~id << 3 |
/// kind`, negative): the pid or tid, and whether it is a thread's.
pub fn cpu_clock_owner(clock: i32) -> Option<(i32, bool)> {
    /// `CPUCLOCK_PERTHREAD_MASK`.
    const PERTHREAD: i32 = 4;
    (clock < 0).then_some((!(clock >> 3), clock & PERTHREAD != 0))
}

/// The CPU time clock of kind `clock` (see [`cpu_clock_owner`]) for
/// process or thread `id`.
pub fn cpu_clock_of(id: i32, clock: i32) -> i32 {
    (!id).wrapping_shl(3) | (clock & 7)
}

/// The POSIX timers of frozen process `pid` as `/proc/PID/timers` lists
/// them, checked to be ones the restore can make; their times are asked
/// in the injections. Also [`crate::migrate`]'s look before anything is
/// frozen (then a timer may still come or go). A kernel without `CONFIG_CHECKPOINT_RESTORE` has no
/// such file, and no way to restore their ids either: none are listed.
pub(crate) fn posix_timers(pid: i32, tids: &[i32]) -> Result<Vec<pb::PosixTimer>, StateError> {
    if !std::path::Path::new(&format!("/proc/{pid}/timers")).exists() {
        tracing::debug!(pid, "no /proc/{pid}/timers: POSIX timers not listed");
        return Ok(Vec::new());
    }
    let timers = procfs::read_posix_timers(pid)?;
    for t in &timers {
        // The CPU time of the process itself or of one of its threads
        // follows them to their new ids; another process's cannot.
        if cpu_clock_owner(t.clock_id).is_some_and(|(id, thread)| {
            if thread {
                !tids.contains(&id)
            } else {
                id != pid
            }
        }) {
            return Err(StateError::PosixTimerClock {
                pid,
                id: t.id,
                clock: t.clock_id,
            });
        }
        if t.notify & libc::SIGEV_THREAD_ID != 0 && !tids.contains(&t.notify_tid) {
            return Err(StateError::PosixTimerThread {
                pid,
                id: t.id,
                tid: t.notify_tid,
            });
        }
    }
    Ok(timers)
}

/// Runs the injections through a scratch mapping and removes it again,
/// whatever happened in between.
fn injected_reads(
    pid: i32,
    tracee: &Tracee,
    tids: &[i32],
    timers: Vec<pb::PosixTimer>,
) -> Result<Injected, StateError> {
    let lead = tids[0];
    let len = scratch_len(tids.len(), timers.len());
    let addr = tracee
        .syscall_in(
            lead,
            libc::SYS_mmap,
            &[
                0,
                len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX, // fd -1
                0,
            ],
        )
        .map_err(inject_err(format!(
            "mmap of a scratch area in thread {lead}"
        )))? as u64;
    let result = ask(pid, tracee, tids, addr, len, timers);
    let unmapped = tracee.syscall_in(lead, libc::SYS_munmap, &[addr, len]);
    match (result, unmapped) {
        (result, Ok(_)) => result,
        (result, Err(source)) => {
            if let Err(e) = result {
                tracing::warn!(pid, "state capture failed ({e}), then:");
            }
            Err(StateError::ScratchLeft {
                pid,
                addr,
                len,
                source,
            })
        }
    }
}

fn ask(
    pid: i32,
    tracee: &Tracee,
    tids: &[i32],
    scratch: u64,
    len: u64,
    timers: Vec<pb::PosixTimer>,
) -> Result<Injected, StateError> {
    // One batch per thread (see `Tracee::syscalls_in`): its tid address,
    // securebits and alternate signal stack; in the first thread also the
    // heap's end, the dumpable flag, the interval timers and every
    // signal's action. Answers in memory land in the scratch area, the
    // others come back as results.
    let table = scratch + table_offset(tids.len(), timers.len());
    let (mut brk, mut dumpable, mut securebits) = (0, 0, Vec::new());
    let (mut timer_slack, mut thp_disable, mut mdwe) = (Vec::new(), false, 0);
    for (i, &tid) in tids.iter().enumerate() {
        let slot = scratch + (SIG_AREA + 8 * i) as u64;
        let mut calls = vec![
            (
                libc::SYS_prctl,
                [PR_GET_TID_ADDRESS, slot, 0, 0, 0, 0],
                "prctl(PR_GET_TID_ADDRESS)".to_string(),
            ),
            (
                libc::SYS_prctl,
                [PR_GET_SECUREBITS, 0, 0, 0, 0, 0],
                "prctl(PR_GET_SECUREBITS)".into(),
            ),
            (
                libc::SYS_sigaltstack,
                [
                    0,
                    scratch + (alt_area(tids.len()) + STACK_T * i) as u64,
                    0,
                    0,
                    0,
                    0,
                ],
                "sigaltstack(NULL, &old)".into(),
            ),
            (
                libc::SYS_prctl,
                [
                    PR_GET_PDEATHSIG,
                    scratch + (pdeath_area(tids.len()) + 8 * i) as u64,
                    0,
                    0,
                    0,
                    0,
                ],
                "prctl(PR_GET_PDEATHSIG)".into(),
            ),
            (
                libc::SYS_prctl,
                [PR_GET_TIMERSLACK, 0, 0, 0, 0, 0],
                "prctl(PR_GET_TIMERSLACK)".into(),
            ),
        ];
        if i == 0 {
            calls.push((libc::SYS_brk, [0; 6], "brk(0)".into()));
            calls.push((
                libc::SYS_prctl,
                [PR_GET_DUMPABLE, 0, 0, 0, 0, 0],
                "prctl(PR_GET_DUMPABLE)".into(),
            ));
            calls.push((
                libc::SYS_prctl,
                [
                    PR_GET_CHILD_SUBREAPER,
                    scratch + subreaper_slot(tids.len()) as u64,
                    0,
                    0,
                    0,
                    0,
                ],
                "prctl(PR_GET_CHILD_SUBREAPER)".into(),
            ));
            calls.push((
                libc::SYS_prctl,
                [PR_GET_THP_DISABLE, 0, 0, 0, 0, 0],
                "prctl(PR_GET_THP_DISABLE)".into(),
            ));
            calls.push((
                libc::SYS_prctl,
                [PR_GET_MDWE, 0, 0, 0, 0, 0],
                "prctl(PR_GET_MDWE)".into(),
            ));
            for which in 0..ITIMERS {
                let at = scratch + (itimer_area(tids.len()) + ITIMERVAL * which) as u64;
                calls.push((
                    libc::SYS_getitimer,
                    [which as u64, at, 0, 0, 0, 0],
                    format!("getitimer({which})"),
                ));
            }
            for (k, t) in timers.iter().enumerate() {
                let at = scratch + (posix_area(tids.len()) + ITIMERSPEC * k) as u64;
                calls.push((
                    libc::SYS_timer_gettime,
                    [t.id as u64, at, 0, 0, 0, 0],
                    format!("timer_gettime({})", t.id),
                ));
            }
            for sig in signals() {
                let at = scratch + u64::from(sig - 1) * KSIGACTION as u64;
                calls.push((
                    libc::SYS_rt_sigaction,
                    [u64::from(sig), 0, at, 8, 0, 0],
                    format!("rt_sigaction({sig})"),
                ));
            }
        }
        let results = tracee
            .syscalls_in(
                tid,
                table,
                calls.iter().map(|(nr, a, _)| (*nr, *a)).collect(),
            )
            .map_err(inject_err(format!(
                "{} injected calls in thread {tid}",
                calls.len()
            )))?;
        for ((nr, args, what), &ret) in calls.iter().zip(&results) {
            // PR_GET_MDWE is Linux 6.3's: before it, nothing to carry.
            let older =
                *nr == libc::SYS_prctl && args[0] == PR_GET_MDWE && ret == -libc::EINVAL as i64;
            if (-4095..0).contains(&ret) && !older {
                return Err(StateError::Inject {
                    what: format!("{what} in thread {tid}"),
                    source: PtraceError::SyscallFailed {
                        nr: *nr,
                        errno: nix::errno::Errno::from_raw(-ret as i32),
                    },
                });
            }
        }
        let answer = |k: usize| {
            let (ret, what) = (results[k], format!("{} in thread {tid}", calls[k].2));
            u32::try_from(ret).map_err(|_| StateError::Answer { what, ret })
        };
        securebits.push(answer(1)?);
        timer_slack.push(results[4] as u64);
        if i == 0 {
            brk = results[5] as u64;
            dumpable = answer(6)?;
            thp_disable = answer(8)? != 0;
            mdwe = answer(9).unwrap_or(0);
        }
    }
    let mut buf = vec![0u8; len as usize];
    vm::read(pid, scratch, &mut buf).map_err(|source| StateError::Read { pid, source })?;
    Ok(Injected {
        securebits,
        dumpable,
        timer_slack,
        thp_disable,
        mdwe,
        ..decode_scratch(&buf, tids.len(), brk, timers)
    })
}

fn u64_at(buf: &[u8], off: usize) -> u64 {
    buf.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Decodes the scratch area laid out by [`ask`]: the kernel's `struct
/// sigaction` of signal `s` at `(s - 1) * 32`, then one `clear_child_tid`
/// per thread, then one `stack_t` per thread, then the `struct itimerval`
/// of each interval timer, then each thread's parent-death signal (an
/// `int` in 8 bytes), then the `struct itimerspec` of each of `timers`,
/// whose times it fills in. A short buffer reads as zeros rather than
/// panicking.
fn decode_scratch(
    buf: &[u8],
    threads: usize,
    brk: u64,
    mut posix_timers: Vec<pb::PosixTimer>,
) -> Injected {
    let sigactions = signals()
        .map(|sig| {
            let at = (sig as usize - 1) * KSIGACTION;
            pb::SigAction {
                signo: sig,
                handler: u64_at(buf, at),
                flags: u64_at(buf, at + 8),
                restorer: u64_at(buf, at + 16),
                mask: u64_at(buf, at + 24),
            }
        })
        .collect();
    let clear_child_tid = (0..threads)
        .map(|i| u64_at(buf, SIG_AREA + 8 * i))
        .collect();
    let us = |at: usize| u64_at(buf, at) * 1_000_000 + u64_at(buf, at + 8);
    let itimers = (0..ITIMERS)
        .map(|which| {
            let at = itimer_area(threads) + ITIMERVAL * which;
            pb::ITimer {
                which: which as i32,
                interval_us: us(at),
                value_us: us(at + 16),
            }
        })
        // A periodic ITIMER_REAL whose SIGALRM waits undelivered (the
        // freeze) reads 0 left: the kernel re-arms it only as the signal
        // is taken. It is armed all the same.
        .filter(|t| t.value_us != 0 || t.interval_us != 0)
        .collect();
    let ns = |at: usize| u64_at(buf, at) * 1_000_000_000 + u64_at(buf, at + 8);
    for (k, t) in posix_timers.iter_mut().enumerate() {
        let at = posix_area(threads) + ITIMERSPEC * k;
        (t.interval_ns, t.value_ns) = (ns(at), ns(at + 16));
    }
    let pdeathsigs = (0..threads)
        .map(|i| u64_at(buf, pdeath_area(threads) + 8 * i) as i32)
        .collect();
    let altstacks = (0..threads)
        .map(|i| {
            let at = alt_area(threads) + STACK_T * i;
            pb::SigAltStack {
                sp: u64_at(buf, at),
                flags: u64_at(buf, at + 8) as i32,
                size: u64_at(buf, at + 16),
            }
        })
        .collect();
    Injected {
        brk,
        clear_child_tid,
        altstacks,
        pdeathsigs,
        itimers,
        posix_timers,
        sigactions,
        securebits: vec![0; threads],
        dumpable: 0,
        timer_slack: vec![0; threads],
        child_subreaper: u64_at(buf, subreaper_slot(threads)) as u32 != 0,
        thp_disable: false,
        mdwe: 0,
    }
}

// ---------------------------------------------------------------- threads

fn capture_thread(
    pid: i32,
    tracee: &Tracee,
    tid: i32,
    clear_child_tid: u64,
    securebits: u32,
) -> Result<pb::Thread, StateError> {
    let regs = resume_regs(&tracee.regs(tid)?);
    let creds = crate::creds::Creds::from_proc(procfs::read_task_creds(pid, tid)?, securebits);
    let rseq = tracee.rseq_config(tid)?;
    let (robust_list, robust_list_len) = ptrace::robust_list(tid)?;
    let status = procfs::read_task_status(pid, tid)?;
    // Authoritative, at the freeze: strict mode entered during the rounds
    // fails the migration here and the source runs on.
    if let Some(why) = status.seccomp_refusal() {
        return Err(StateError::Seccomp { pid, tid, why });
    }
    let seccomp_filters = if status.seccomp == 0 {
        Vec::new()
    } else {
        tracee
            .seccomp_filters(tid, status.seccomp_filters)
            .map_err(|source| StateError::SeccompFilters {
                pid,
                tid,
                count: status.seccomp_filters,
                source,
            })?
            .into_iter()
            .map(|f| pb::SeccompFilter {
                program: Bytes::from(f.program),
                flags: f.flags,
            })
            .collect()
    };
    Ok(pb::Thread {
        seccomp_filters,
        sched: Some(thread_sched(tid)?),
        comm: thread_comm(pid, tid)?,
        tid,
        gpregs: Bytes::from(regs_to_bytes(&regs)),
        xstate: Bytes::from(tracee.xstate(tid)?),
        fs_base: regs.fs_base,
        gs_base: regs.gs_base,
        sigmask: tracee.sigmask(tid)?,
        clear_child_tid,
        robust_list,
        robust_list_len,
        rseq: Some(pb::Rseq {
            addr: rseq.abi_pointer,
            len: rseq.abi_size,
            signature: rseq.signature,
            flags: rseq.flags,
        }),
        pending_signals: status.sig_pnd,
        queued_signals: queued(tracee, tid, false)?,
        creds: Some(creds.to_pb()),
        // ns_tid: filled by the dump (crate::pidns::record).
        ..Default::default()
    })
}

/// The name of thread `tid` as the kernel has it (`comm`, raw: the
/// status file escapes it).
fn thread_comm(pid: i32, tid: i32) -> Result<String, StateError> {
    let mut b = read_file(pid, &format!("task/{tid}/comm"))?;
    if b.last() == Some(&b'\n') {
        b.pop();
    }
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// How thread `tid` is scheduled (see [`crate::sched`] for its CPU mask).
fn thread_sched(tid: i32) -> Result<pb::ThreadSched, StateError> {
    use crate::sys::sched;
    let err = |op: &'static str| move |errno| StateError::Sched { tid, op, errno };
    let a = sched::get_attr(tid).map_err(err("sched_getattr"))?;
    let mask = sched::get_affinity(tid).map_err(err("sched_getaffinity"))?;
    Ok(pb::ThreadSched {
        policy: a.policy,
        flags: a.flags & sched::SCHED_FLAGS_KEPT,
        nice: a.nice,
        priority: a.priority,
        runtime_ns: a.runtime,
        deadline_ns: a.deadline,
        period_ns: a.period,
        ioprio: sched::get_ioprio(tid).map_err(err("ioprio_get"))?,
        affinity: crate::sched::recorded(&mask, crate::sched::online_cpus().as_deref()),
    })
}

/// The `siginfo_t` of each signal queued for thread `tid`, or for its
/// process (`shared`).
fn queued(tracee: &Tracee, tid: i32, shared: bool) -> Result<Vec<Bytes>, StateError> {
    Ok(tracee
        .queued_signals(tid, shared)?
        .into_iter()
        .map(Bytes::from)
        .collect())
}

/// The registers in `user_regs_struct` order, as the image stores them.
fn regs_array(r: &user_regs_struct) -> [u64; 27] {
    [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// `user_regs_struct` as the image's `Thread.gpregs`: its 27 registers in
/// declaration order, little endian (the C layout, byte for byte).
pub fn regs_to_bytes(r: &user_regs_struct) -> Vec<u8> {
    regs_array(r).iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The inverse of [`regs_to_bytes`]; `None` unless `b` is exactly
/// [`GPREGS_LEN`] bytes.
pub fn regs_from_bytes(b: &[u8]) -> Option<user_regs_struct> {
    if b.len() != GPREGS_LEN {
        return None;
    }
    let v: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Some(user_regs_struct {
        r15: v[0],
        r14: v[1],
        r13: v[2],
        r12: v[3],
        rbp: v[4],
        rbx: v[5],
        r11: v[6],
        r10: v[7],
        r9: v[8],
        r8: v[9],
        rax: v[10],
        rcx: v[11],
        rdx: v[12],
        rsi: v[13],
        rdi: v[14],
        orig_rax: v[15],
        rip: v[16],
        cs: v[17],
        eflags: v[18],
        rsp: v[19],
        ss: v[20],
        fs_base: v[21],
        gs_base: v[22],
        ds: v[23],
        es: v[24],
        fs: v[25],
        gs: v[26],
    })
}

// ---------------------------------------------------------------- files

/// The most file contents and pipe bytes one image carries, all
/// descriptors together: they travel in the state message, whose frame is
/// bounded (`ferry_proto::frame::MAX_CONTROL_FRAME`), and are written back
/// during the downtime.
pub const MAX_FD_DATA: u64 = 8 << 20;

/// What `stat` says a descriptor's file is, as far as the image cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Regular,
    Directory,
    CharDevice,
    Fifo,
    /// Sockets, block devices, anonymous inodes, …
    Other,
}

/// `stat` of an open file, reduced to what classifying it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub node: Node,
    pub ino: u64,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
}

const DELETED: &str = " (deleted)";
const MEMFD: &str = "/memfd:";

/// Classifies descriptor `fd` from its link target (`readlink` of
/// `/proc/PID/fd/N`), what `stat` of the link says (`None` when it could
/// not be read) and its fdinfo, parsed (`info`) and as text (for the lines
/// of one kind of file). Pure, so every rule is unit-tested. Contents (of
/// pipes, memfds, deleted files) are not read here: see [`capture_fd_data`].
pub fn classify(
    fd: i32,
    target: &str,
    stat: Option<Stat>,
    info: &FdInfo,
    fdinfo: &str,
) -> pb::FileDesc {
    let mut d = pb::FileDesc {
        fd,
        path: target.to_owned(),
        pos: info.pos,
        flags: info.flags,
        cloexec: info.flags & libc::O_CLOEXEC as u32 != 0,
        ino: info.ino,
        ..Default::default()
    };
    let unsupported = |d: &mut pb::FileDesc, why: &str| {
        d.kind = pb::FdKind::Unsupported as i32;
        d.description = format!("fd {fd}: {target}: {why}");
    };
    if let Some(ino) = target
        .strip_prefix("pipe:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse::<u64>().ok())
    {
        d.kind = pb::FdKind::Pipe as i32;
        d.pipe_id = ino;
        return d;
    }
    if let Some(anon) = target.strip_prefix("anon_inode:") {
        let parsed = match anon {
            "[eventfd]" => procfs::parse_eventfd(fdinfo).map(|(count, sem)| {
                d.kind = pb::FdKind::Eventfd as i32;
                d.eventfd_count = count;
                d.eventfd_semaphore = sem;
            }),
            "[timerfd]" => procfs::parse_timerfd(fdinfo).map(|t| {
                d.kind = pb::FdKind::Timerfd as i32;
                d.timerfd = Some(t);
            }),
            "[signalfd]" => procfs::parse_signalfd(fdinfo).map(|mask| {
                d.kind = pb::FdKind::Signalfd as i32;
                d.sigmask = mask;
            }),
            "[eventpoll]" => procfs::parse_epoll(fdinfo).map(|targets| {
                d.kind = pb::FdKind::Epoll as i32;
                d.epoll_targets = targets;
            }),
            _ => {
                unsupported(&mut d, "not supported yet");
                return d;
            }
        };
        if let Err(e) = parsed {
            unsupported(&mut d, &format!("unreadable fdinfo: {e}"));
        }
        return d;
    }
    if !target.starts_with('/') {
        unsupported(&mut d, "not supported yet");
        return d;
    }
    if target.ends_with(DELETED) {
        match stat {
            Some(st) if st.node == Node::Regular && st.size > MAX_FD_DATA => unsupported(
                &mut d,
                &format!(
                    "{} bytes to carry, more than the {MAX_FD_DATA} an image holds",
                    st.size
                ),
            ),
            Some(st) if st.node == Node::Regular => {
                d.kind = if target.starts_with(MEMFD) {
                    pb::FdKind::Memfd
                } else {
                    pb::FdKind::Deleted
                } as i32;
                d.mode = st.mode;
            }
            // Only the source has the file, and it is not one whose
            // contents can travel.
            _ => unsupported(&mut d, "an unlinked file of this kind is not supported yet"),
        }
        return d;
    }
    match stat.map(|s| (s.node, s.ino)) {
        Some((Node::Regular, _)) => d.kind = pb::FdKind::Regular as i32,
        Some((Node::Directory, _)) => d.kind = pb::FdKind::Directory as i32,
        Some((Node::CharDevice, _)) if target == "/dev/null" => d.kind = pb::FdKind::DevNull as i32,
        Some((Node::CharDevice, _)) => d.kind = pb::FdKind::CharDevice as i32,
        Some((Node::Fifo, ino)) => {
            d.kind = pb::FdKind::Fifo as i32;
            d.pipe_id = ino;
        }
        Some((Node::Other, _)) => unsupported(&mut d, "this kind of file is not supported yet"),
        None => unsupported(&mut d, "cannot stat it"),
    }
    d
}

fn stat_of(md: &fs::Metadata) -> Stat {
    let ft = md.file_type();
    let node = if ft.is_file() {
        Node::Regular
    } else if ft.is_dir() {
        Node::Directory
    } else if ft.is_char_device() {
        Node::CharDevice
    } else if ft.is_fifo() {
        Node::Fifo
    } else {
        Node::Other
    };
    Stat {
        node,
        ino: md.ino(),
        size: md.size(),
        mode: md.mode() & 0o7777,
    }
}

/// The process's descriptors, classified (also usable while it runs).
/// Contents are not read: [`capture`] adds them on the frozen process.
pub fn capture_fds(pid: i32) -> Result<Vec<pb::FileDesc>, StateError> {
    let mut fds = procfs::list_fds(pid)?
        .into_iter()
        .map(|(fd, target)| {
            let text = procfs::read_fdinfo_text(pid, fd)?;
            let info = procfs::parse_fdinfo(&text)?;
            // `metadata` follows the magic link to the open file itself,
            // even one whose path no longer leads to it.
            let stat = fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                .ok()
                .map(|md| stat_of(&md));
            Ok(classify(fd, &target, stat, &info, &text))
        })
        .collect::<Result<Vec<_>, StateError>>()?;
    refuse_shared(pid, &mut fds);
    crate::sockets::describe_all(pid, &mut fds);
    Ok(fds)
}

/// Kinds whose state lives in the open file itself: two fds sharing one
/// (dup) would come back as two separate counters, timers or files.
pub(crate) fn stateful(k: pb::FdKind) -> bool {
    matches!(
        k,
        pb::FdKind::Eventfd
            | pb::FdKind::Timerfd
            | pb::FdKind::Signalfd
            | pb::FdKind::Epoll
            | pb::FdKind::Memfd
            | pb::FdKind::Deleted
            | pb::FdKind::TcpListen
            | pb::FdKind::TcpEstablished
            | pb::FdKind::UnixPair
            | pb::FdKind::UnixListen
    )
}

/// Marks as unsupported every fd of a [`stateful`] kind that shares its
/// open file with a lower one (`kcmp`); when `kcmp` cannot tell, too.
fn refuse_shared(pid: i32, fds: &mut [pb::FileDesc]) {
    fds.sort_by_key(|f| f.fd);
    for i in 0..fds.len() {
        // A memfd held twice is one object of the tree (crate::shmem); a
        // lone process's is refused by the restore's check.
        if !stateful(fds[i].kind()) || fds[i].kind() == pb::FdKind::Memfd {
            continue;
        }
        let shared = (0..i)
            .filter(|&j| fds[j].kind == fds[i].kind)
            .find_map(|j| match sys_fds::same_file(pid, fds[j].fd, fds[i].fd) {
                Ok(true) => Some(format!("the same open file as fd {} (dup)", fds[j].fd)),
                Ok(false) => None,
                Err(e) => Some(format!("kcmp with fd {}: {e}", fds[j].fd)),
            });
        if let Some(why) = shared {
            let f = &mut fds[i];
            f.kind = pb::FdKind::Unsupported as i32;
            f.description = format!("fd {}: {}: {why}", f.fd, f.path);
        }
    }
}

/// Whether `f` can be read from: a pipe's read end, or a FIFO opened for
/// reading (O_RDWR included).
fn reads(f: &pb::FileDesc) -> bool {
    let mode = f.flags & libc::O_ACCMODE as u32;
    mode == libc::O_RDONLY as u32 || mode == libc::O_RDWR as u32
}

/// Reads what travels with descriptors of frozen process `pid`: the unread
/// bytes of each pipe and FIFO it can read (left in place), and the whole
/// contents of its memfds and deleted files. Through copies of its fds
/// (`pidfd_getfd`): nothing of the process changes, not even an offset.
pub fn capture_fd_data(pid: i32, fds: &mut [pb::FileDesc]) -> Result<(), StateError> {
    let io_err = |fd: i32, what: &str| {
        let path = format!("fd {fd} of process {pid} ({what})");
        move |source| StateError::Io { path, source }
    };
    let mut total = 0u64;
    let mut seen_pipes = std::collections::HashSet::new();
    let mut order: Vec<usize> = (0..fds.len()).collect();
    order.sort_by_key(|&i| fds[i].fd);
    for i in order {
        let f = &fds[i];
        let (fd, kind) = (f.fd, f.kind());
        let data = match kind {
            pb::FdKind::Pipe | pb::FdKind::Fifo => {
                let copy = sys_fds::take_fd(pid, fd).map_err(io_err(fd, "pidfd_getfd"))?;
                fds[i].pipe_size =
                    sys_fds::pipe_size(copy.as_fd()).map_err(io_err(fd, "F_GETPIPE_SZ"))?;
                // The lowest read end carries the pipe's bytes.
                if !reads(&fds[i]) || !seen_pipes.insert(fds[i].pipe_id) {
                    continue;
                }
                sys_fds::peek_pipe(copy.as_fd()).map_err(io_err(fd, "tee of the pipe"))?
            }
            pb::FdKind::Memfd | pb::FdKind::Deleted => {
                let file =
                    fs::File::from(sys_fds::take_fd(pid, fd).map_err(io_err(fd, "pidfd_getfd"))?);
                if kind == pb::FdKind::Memfd {
                    fds[i].seals =
                        sys_fds::seals(file.as_fd()).map_err(io_err(fd, "F_GET_SEALS"))?;
                }
                let size = file.metadata().map_err(io_err(fd, "fstat"))?.size();
                if total + size > MAX_FD_DATA {
                    return Err(StateError::TooMuchData { fd, bytes: size });
                }
                let mut data = vec![0u8; size as usize];
                // At offset 0 by pread: the shared file offset stays put.
                file.read_exact_at(&mut data, 0)
                    .map_err(io_err(fd, "reading the contents"))?;
                data
            }
            _ => continue,
        };
        total += data.len() as u64;
        if total > MAX_FD_DATA {
            return Err(StateError::TooMuchData {
                fd,
                bytes: data.len() as u64,
            });
        }
        fds[i].data = Bytes::from(data);
    }
    crate::sockets::capture_data(pid, fds, MAX_FD_DATA - total)?;
    Ok(())
}

// ---------------------------------------------------------------- misc

/// The image's VMA, with size and mtime of the file actually mapped (read
/// through `/proc/PID/map_files`, so a replaced or deleted path does not
/// mislead the destination's check), falling back to the path.
fn vma(pid: i32, m: &MapEntry) -> pb::Vma {
    let mut v = m.to_vma();
    if let Some(f) = v.file.as_mut() {
        let mapped = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
        let md = fs::metadata(mapped)
            .ok()
            .or_else(|| m.file_path().and_then(|p| fs::metadata(p).ok()));
        if let Some(md) = md {
            f.size = md.size();
            f.mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        }
    }
    v
}

fn read_link(pid: i32, what: &str) -> Result<String, StateError> {
    let path = format!("/proc/{pid}/{what}");
    fs::read_link(&path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| StateError::Io { path, source })
}

fn read_file(pid: i32, what: &str) -> Result<Vec<u8>, StateError> {
    let path = format!("/proc/{pid}/{what}");
    fs::read(&path).map_err(|source| StateError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pos: u64, flags: u32) -> FdInfo {
        FdInfo {
            pos,
            flags,
            mnt_id: 0,
            ino: 0,
        }
    }

    fn st(node: Node, ino: u64) -> Option<Stat> {
        Some(Stat {
            node,
            ino,
            size: 10,
            mode: 0o640,
        })
    }

    #[test]
    fn regs_round_trip_in_c_layout() {
        let mut r = regs_from_bytes(&[0u8; GPREGS_LEN]).unwrap();
        r.r15 = 1;
        r.rip = 0x1122_3344_5566_7788;
        r.gs = 27;
        let b = regs_to_bytes(&r);
        assert_eq!(b.len(), GPREGS_LEN);
        assert_eq!(b.len(), std::mem::size_of::<user_regs_struct>());
        assert_eq!(&b[..8], &1u64.to_le_bytes());
        // rip is the 17th register, at byte 128 (offsetof in <sys/user.h>).
        assert_eq!(&b[128..136], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[208..], &27u64.to_le_bytes());
        let back = regs_from_bytes(&b).unwrap();
        assert_eq!(regs_to_bytes(&back), b);
        assert!(regs_from_bytes(&b[1..]).is_none());
    }

    #[test]
    fn scratch_decoding() {
        let mut buf = vec![0u8; scratch_len(2, 2) as usize];
        let usr1 = (libc::SIGUSR1 as usize - 1) * KSIGACTION;
        for (k, v) in [0xabcu64, 0x0400_0004, 0xdef, 1 << 9].iter().enumerate() {
            buf[usr1 + 8 * k..usr1 + 8 * k + 8].copy_from_slice(&v.to_le_bytes());
        }
        buf[SIG_AREA + 8..SIG_AREA + 16].copy_from_slice(&0x7777u64.to_le_bytes());
        let inj = decode_scratch(&buf, 2, 0x5000, vec![]);
        assert_eq!(inj.sigactions.len(), 62);
        assert!(inj.sigactions.iter().all(|a| a.signo != 9 && a.signo != 19));
        let a = inj
            .sigactions
            .iter()
            .find(|a| a.signo == libc::SIGUSR1 as u32)
            .unwrap();
        assert_eq!(
            (a.handler, a.flags, a.restorer, a.mask),
            (0xabc, 0x0400_0004, 0xdef, 1 << 9)
        );
        assert_eq!(inj.clear_child_tid, vec![0, 0x7777]);
        let alt = alt_area(2) + STACK_T;
        for (k, v) in [0x7f00_0000u64, 4, 0x8000].iter().enumerate() {
            buf[alt + 8 * k..alt + 8 * k + 8].copy_from_slice(&v.to_le_bytes());
        }
        let inj = decode_scratch(&buf, 2, 0x5000, vec![]);
        assert_eq!(inj.altstacks[0], pb::SigAltStack::default());
        assert_eq!(
            inj.altstacks[1],
            pb::SigAltStack {
                sp: 0x7f00_0000,
                flags: 4,
                size: 0x8000
            }
        );
        assert!(inj.itimers.is_empty(), "disarmed timers are not listed");
        // ITIMER_REAL every 20 ms, its SIGALRM pending: 0 left, still armed.
        let real = itimer_area(2);
        buf[real + 8..real + 16].copy_from_slice(&20_000u64.to_le_bytes());
        let inj = decode_scratch(&buf, 2, 0x5000, vec![]);
        assert_eq!(
            inj.itimers,
            [pb::ITimer {
                which: 0,
                interval_us: 20_000,
                value_us: 0
            }]
        );
        buf[real + 8..real + 16].copy_from_slice(&0u64.to_le_bytes());
        // ITIMER_VIRTUAL: every 0.25 s, 1.5 s left.
        let it = itimer_area(2) + ITIMERVAL;
        for (k, v) in [0u64, 250_000, 1, 500_000].iter().enumerate() {
            buf[it + 8 * k..it + 8 * k + 8].copy_from_slice(&v.to_le_bytes());
        }
        let inj = decode_scratch(&buf, 2, 0x5000, vec![]);
        assert_eq!(
            inj.itimers,
            [pb::ITimer {
                which: 1,
                interval_us: 250_000,
                value_us: 1_500_000
            }]
        );
        assert!(pdeath_area(2) >= it + 2 * ITIMERVAL);
        let pd = pdeath_area(2) + 8;
        buf[pd..pd + 4].copy_from_slice(&10i32.to_le_bytes());
        assert_eq!(decode_scratch(&buf, 2, 0, vec![]).pdeathsigs, vec![0, 10]);
        assert!(!decode_scratch(&buf, 2, 0, vec![]).child_subreaper);
        buf[subreaper_slot(2)] = 1;
        assert!(decode_scratch(&buf, 2, 0, vec![]).child_subreaper);
        assert!(subreaper_slot(2) >= pd + 8);
        // Two POSIX timers: the second every 5 ms with 1.000000002 s left.
        let pt = posix_area(2);
        assert!(pt >= pd + 8);
        for (k, v) in [0u64, 5_000_000, 1, 2].iter().enumerate() {
            let at = pt + ITIMERSPEC + 8 * k;
            buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        let timers = vec![
            pb::PosixTimer {
                id: 3,
                ..Default::default()
            },
            pb::PosixTimer {
                id: 9,
                ..Default::default()
            },
        ];
        let inj = decode_scratch(&buf, 2, 0, timers);
        assert_eq!(
            inj.posix_timers
                .iter()
                .map(|t| (t.id, t.interval_ns, t.value_ns))
                .collect::<Vec<_>>(),
            [(3, 0, 0), (9, 5_000_000, 1_000_000_002)]
        );
        assert!(table_offset(2, 2) as usize >= pt + 2 * ITIMERSPEC);
        // A short read never panics.
        let inj = decode_scratch(&[], 3, 0, vec![pb::PosixTimer::default()]);
        assert_eq!(inj.clear_child_tid, vec![0, 0, 0]);
        assert_eq!(inj.posix_timers[0].value_ns, 0);
    }

    #[test]
    fn cpu_clocks_name_their_process_or_thread() {
        // As python's time.pthread_getcpuclockid and glibc's
        // clock_getcpuclockid made them for tid 24250 and pid 24248.
        assert_eq!(cpu_clock_owner(-194002), Some((24250, true)));
        assert_eq!(cpu_clock_owner(-193982), Some((24247, false)));
        assert_eq!(cpu_clock_owner(libc::CLOCK_MONOTONIC), None);
        assert_eq!(cpu_clock_of(24250, -194002), -194002);
        assert_eq!(cpu_clock_owner(cpu_clock_of(7, -194002)), Some((7, true)));
        assert_eq!(cpu_clock_owner(cpu_clock_of(9, -193982)), Some((9, false)));
    }

    #[test]
    fn main_thread_first() {
        assert_eq!(thread_order(50, vec![52, 50, 51]), vec![50, 51, 52]);
        assert_eq!(thread_order(50, vec![53, 52]), vec![52, 53]);
    }

    #[test]
    fn fd_classification() {
        let ro_cloexec = (libc::O_RDONLY | libc::O_CLOEXEC) as u32;
        let c = |fd, target, stat, info: &FdInfo| classify(fd, target, stat, info, "");
        let d = c(3, "/tmp/a b", st(Node::Regular, 7), &info(1234, ro_cloexec));
        assert_eq!(d.kind, pb::FdKind::Regular as i32);
        assert_eq!(
            (d.path.as_str(), d.pos, d.cloexec),
            ("/tmp/a b", 1234, true)
        );

        let d = c(4, "pipe:[991]", st(Node::Fifo, 991), &info(0, 1));
        assert_eq!(
            (d.kind, d.pipe_id, d.cloexec),
            (pb::FdKind::Pipe as i32, 991, false)
        );

        let d = c(5, "/dev/null", st(Node::CharDevice, 5), &info(0, 2));
        assert_eq!(d.kind, pb::FdKind::DevNull as i32);
        let d = c(5, "/dev/pts/3", st(Node::CharDevice, 6), &info(0, 2));
        assert_eq!(d.kind, pb::FdKind::CharDevice as i32);
        let d = c(6, "/tmp/fifo", st(Node::Fifo, 42), &info(0, 2));
        assert_eq!((d.kind, d.pipe_id), (pb::FdKind::Fifo as i32, 42));
        let d = c(7, "/", st(Node::Directory, 2), &info(0, 0o200000));
        assert_eq!(d.kind, pb::FdKind::Directory as i32);

        let d = c(8, "/memfd:x y (deleted)", st(Node::Regular, 9), &info(3, 2));
        assert_eq!((d.kind, d.pos), (pb::FdKind::Memfd as i32, 3));
        let d = c(8, "/tmp/gone (deleted)", st(Node::Regular, 9), &info(0, 2));
        assert_eq!((d.kind, d.mode), (pb::FdKind::Deleted as i32, 0o640));

        for (target, stat) in [
            ("socket:[1234]", st(Node::Other, 1234)),
            ("anon_inode:inotify", st(Node::Other, 1)),
            ("anon_inode:[eventfd]", st(Node::Other, 1)), // fdinfo lacks the count
            ("/tmp/gone (deleted)", st(Node::Directory, 9)),
            ("/tmp/gone (deleted)", None),
            ("/dev/sda", st(Node::Other, 9)),
            ("/somewhere", None),
            ("pipe:[notanumber]", None),
        ] {
            let d = c(8, target, stat, &info(0, 2));
            assert_eq!(d.kind, pb::FdKind::Unsupported as i32, "{target}");
            assert!(
                d.description.starts_with(&format!("fd 8: {target}: ")),
                "{}",
                d.description
            );
        }
        let big = Some(Stat {
            node: Node::Regular,
            ino: 1,
            size: MAX_FD_DATA + 1,
            mode: 0o600,
        });
        let d = c(9, "/memfd:big (deleted)", big, &info(0, 2));
        assert_eq!(d.kind, pb::FdKind::Unsupported as i32);
        assert!(
            d.description.contains("bytes to carry"),
            "{}",
            d.description
        );
    }

    #[test]
    fn special_files_are_classified_from_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t04002\neventfd-count: 2a\neventfd-semaphore: 1\n";
        let d = classify(5, "anon_inode:[eventfd]", None, &info(0, 0o4002), fdinfo);
        assert_eq!(d.kind, pb::FdKind::Eventfd as i32);
        assert_eq!((d.eventfd_count, d.eventfd_semaphore), (42, true));

        let fdinfo =
            "clockid: 0\nticks: 1\nsettime flags: 00\nit_value: (0, 5)\nit_interval: (0, 0)\n";
        let d = classify(6, "anon_inode:[timerfd]", None, &info(0, 2), fdinfo);
        assert_eq!(d.kind, pb::FdKind::Timerfd as i32);
        let t = d.timerfd.unwrap();
        assert_eq!((t.clockid, t.ticks, t.value_ns), (0, 1, 5));

        let d = classify(
            7,
            "anon_inode:[signalfd]",
            None,
            &info(0, 2),
            "sigmask:\t0000000000000002\n",
        );
        assert_eq!((d.kind, d.sigmask), (pb::FdKind::Signalfd as i32, 2));

        let fdinfo =
            "tfd:        5 events:       19 data:                7  pos:0 ino:40e sdev:10\n";
        let d = classify(8, "anon_inode:[eventpoll]", None, &info(0, 2), fdinfo);
        assert_eq!(d.kind, pb::FdKind::Epoll as i32);
        assert_eq!(d.epoll_targets.len(), 1);
        assert_eq!((d.epoll_targets[0].fd, d.epoll_targets[0].data), (5, 7));

        let d = classify(9, "anon_inode:[timerfd]", None, &info(0, 2), "clockid: x\n");
        assert_eq!(d.kind, pb::FdKind::Unsupported as i32);
        assert!(d
            .description
            .starts_with("fd 9: anon_inode:[timerfd]: unreadable fdinfo"));
    }
}
