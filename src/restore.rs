//! Restore: turn a flattened image and its process state back into a
//! running process on this host (DESIGN.md §7).
//!
//! Everything is done by ptrace and injected syscalls into a stub forked
//! from ferry ([`crate::sys::stub`]): no restorer blob, no exec. The order
//! is forced by the kernel:
//!
//! 1. Stub, then a gadget page (`syscall; int3` plus a data area for paths
//!    and structs) at an address neither the image nor the stub uses. The
//!    stub's inherited rseq registration goes first: its area is in ferry's
//!    memory, which is about to vanish.
//! 2. Unmap everything but the gadget, `[vdso]`/`[vvar]` included.
//! 3. Memory, layer by layer ([`Warm`]): each round's mappings are made
//!    `MAP_FIXED` at their addresses (anonymous ones fresh, file ones from
//!    the same file opened *in the stub*, whose size and mtime are checked
//!    on that very fd), ranges a round no longer maps are unmapped, and the
//!    round's pages go in with `process_vm_writev`. Everything but shared
//!    file mappings stays read-write until the end (`process_vm_writev`
//!    cannot write without write permission), then gets the image's
//!    protection. With the page server's warm restore this happens during
//!    the rounds; a cold restore is the same with the flattened image as
//!    the only layer.
//! 4. `arch_prctl(ARCH_MAP_VDSO_64)` at the image's `[vvar]`; it silently
//!    lands elsewhere when the range is busy, so the maps are read back.
//! 5. `PR_SET_MM_MAP` (needs the old executable unmapped for `exe_fd`).
//! 6. Files (the stub's inherited fds are closed first; each is made,
//!    `dup3`ed to its number, seeked): paths opened again; a pipe made
//!    once for all its fds; a FIFO through a read-write helper open, so no
//!    open blocks; eventfd, timerfd (re-armed with the time it had left,
//!    relative to now), signalfd; memfds by name and deleted files as new
//!    `O_TMPFILE` files in the same directory; epolls last, once what they
//!    watch exists; sockets made by the stub (`socket`, `socketpair`) and
//!    set up through ferry's copy of them ([`crate::sockets`]: listeners
//!    bound and listening, TCP connections rebuilt in repair mode, which
//!    they leave only as the last step before the process runs, UNIX
//!    pairs refilled). Pipe bytes and file contents are written from ferry
//!    through a `pidfd_getfd` copy of the stub's fd, before the image's
//!    status flags (O_NONBLOCK, …) are set. Then cwd, name, signal actions (every
//!    signal: those the image lacks go back to `SIG_DFL`, since the stub
//!    carries ferry's), rlimits, umask, rseq, personality, alternate signal
//!    stack, robust list and clear-tid address (the last five only the
//!    thread itself can set), pending signals (queued again while
//!    everything is blocked). Every other thread is cloned from the stub
//!    (traced from its birth) and sets its own rseq, alternate signal
//!    stack, robust list and pending signals; the tid glibc keeps at
//!    each thread's clear-tid address is rewritten to the new one.
//! 7. Credentials, in every thread ([`crate::creds`]): groups, gids, uids,
//!    capability sets, securebits, no_new_privs, then the dumpable flag,
//!    read back and compared with the image. Last of the privileged steps:
//!    the process may now be another user's.
//! 8. `munmap` the gadget from inside the gadget: the stub stops at that
//!    syscall's exit and never runs the next instruction; the final
//!    registers (an interrupted syscall rewound), XSAVE area and signal
//!    mask replace its state and every thread's, and all are detached.
//!
//! **Trees** ([`restore`] of an image with several processes): the root's
//! stub is made and emptied, then every other process is forked from its
//! parent's stub ([`Stub::fork_child`]) while all hold only the gadget, in
//! tree order, each given its session and group at once
//! ([`crate::tree::plan`]); then each is rebuilt as above from its own
//! address space of the image, and only when all are ready are they let
//! go. Pipes between processes are made by ferry and taken by each.
//!
//! What cannot be restored yet is refused by [`check`], by name, before a
//! stub exists: a pipe with an end outside the process (tree),
//! sockets of the kinds [`crate::sockets`] does not migrate, inotify and
//! other special files, an epoll watching an fd the
//! image lacks, credentials this ferry cannot give exactly (more
//! capabilities than it holds, say), a vdso layout this kernel
//! does not make. Any failure later kills the stub: no
//! half-restored process is ever left running.
//!
//! **Life after ferry.** The stub is born a grandchild whose middle parent
//! exits at once (ferry reaps it), and calls `setsid`: the restored process
//! leads its own session, has no controlling terminal, and is a child of
//! init (or of the nearest `PR_SET_CHILD_SUBREAPER` ancestor), which reaps
//! it when it exits. Ferry holds no child of its own afterwards, so it
//! leaves no zombie whether it exits first or not.
//!
//! **Pids** ([`restore_keeping_pids`], `--keep-pids`): the tree goes into
//! a fresh pid namespace with the pids and tids of the source's own
//! namespace (`clone3` `set_tid` injected into each parent's stub, see
//! [`crate::pidns`]); its pid 1 is the root or a reaper made first, the
//! root's parent. Otherwise pids are new.
//!
//! **Blocking.** The whole restore runs on one dedicated `std::thread`
//! (ptrace requests must come from the thread that forked and attached the
//! stub) and [`restore`] waits for it: call it from `spawn_blocking` or a
//! plain thread, not from an async task.
//!
//! **Clocks.** The stub enters a time namespace in which its monotonic and
//! boot clocks go on from the image's readings (see [`crate::clocks`]).
//!
//! **Seccomp.** Each thread's filters are installed from the thread before
//! its credentials; ferry's calls after that run with seccomp suspended.
//!
//! **Timers.** Interval timers and POSIX timers (the latter under the ids
//! the process was given, `PR_TIMER_CREATE_RESTORE_IDS`) are armed last,
//! with the time each had left.
//!
//! Not carried over yet (not in the image): the siginfo of queued
//! signals, a timer's overrun count.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use ferry_page_server::store::disk::DiskStore;
use ferry_page_server::store::{FlatImage, Store, StoreError};
use ferry_proto::{pb, SessionId};
use libc::user_regs_struct;
use nix::errno::Errno;

use crate::procfs::{self, MapEntry};
use crate::readygo::{Gate, Prepared};
use crate::sys::pidns::Birth;
use crate::sys::ptrace::SIGINFO_LEN;
use crate::sys::stub::{self, Stub, StubError};
use crate::sys::uffd::Missing;
use crate::sys::vm::VmError;
use crate::sys::{page_size, USER_ADDR_END};
use crate::track::{intersect, normalize, subtract};
use bytes::Bytes;

const ARCH_MAP_VDSO_64: u64 = 0x2003;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const PR_SET_NAME: u64 = 15;
const PR_SET_TIMERSLACK: u64 = 29;
const PR_SET_CHILD_SUBREAPER: u64 = 36;
const PR_SET_THP_DISABLE: u64 = 41;
const PR_SET_MDWE: u64 = 65;
const PR_GET_DUMPABLE: u64 = 3;
const PR_SET_DUMPABLE: u64 = 4;
const PR_GET_SECUREBITS: u64 = 27;
/// `sizeof(struct prctl_mm_map)`.
const PRCTL_MM_MAP_SIZE: usize = 104;
const RSEQ_FLAG_UNREGISTER: u64 = 1;
/// `SS_AUTODISARM` (linux/signal.h), missing from the libc crate: clear the
/// alternate stack while a handler runs on it.
const SS_AUTODISARM: i32 = 1 << 31;
/// `sizeof(struct robust_list_head)`, the only length the kernel accepts.
const ROBUST_LIST_HEAD_SIZE: u64 = 24;
/// Pages of the gadget: one of code, the rest a scratch data area.
const GADGET_CODE_PAGES: u64 = 1;
/// Room for the largest seccomp filter (4096 instructions, 32 KiB).
const GADGET_DATA_PAGES: u64 = 9;
/// Distance kept from every other mapping, beyond the stack guard gap.
const GADGET_MARGIN: u64 = 2 << 20;
/// `syscall; int3`.
const GADGET_CODE: [u8; 3] = [0x0f, 0x05, 0xcc];
/// The `struct itimerval` (`per_sec` 10^6) or `struct itimerspec` (10^9)
/// that arms a timer of `interval` with `left` to go, both in units of
/// 1/`per_sec` s. 0 left with an interval: its signal was pending at the
/// freeze (queued again from the image), after which the kernel would
/// have re-armed it: armed for one interval.
fn timer_spec(interval: u64, left: u64, per_sec: u64) -> Vec<u8> {
    let left = if left == 0 { interval } else { left };
    [interval, left]
        .into_iter()
        .flat_map(|v| [v / per_sec, v % per_sec])
        .flat_map(u64::to_ne_bytes)
        .collect()
}

/// Each thread's scheduling as the image has it, set by ferry on the
/// thread's new tid while it is still ferry's user's (`CAP_SYS_NICE` for
/// a higher priority than ferry's). A CPU pinning is cut to the CPUs online here; pinned to
/// none of them, the thread runs on any, as the log says.
fn sched(p: &pb::Process, tids: &[i32]) -> Result<()> {
    use crate::sys::sched::{self as sys, SchedAttr};
    let online = crate::sched::online_cpus();
    for (t, &tid) in p.threads.iter().zip(tids) {
        let Some(s) = &t.sched else { continue };
        let step = |what: String| move |errno| RestoreError::Syscall { step: what, errno };
        let attr = SchedAttr {
            policy: s.policy,
            flags: s.flags,
            nice: s.nice,
            priority: s.priority,
            runtime: s.runtime_ns,
            deadline: s.deadline_ns,
            period: s.period_ns,
            ..SchedAttr::default()
        };
        sys::set_attr(tid, &attr).map_err(step(format!(
            "sched_setattr(policy {}, nice {}, priority {}) of thread {} (now {tid})",
            s.policy, s.nice, s.priority, t.tid
        )))?;
        sys::set_ioprio(tid, s.ioprio).map_err(step(format!(
            "ioprio_set({:#x}) of thread {} (now {tid})",
            s.ioprio, t.tid
        )))?;
        match crate::sched::here(&s.affinity, online.as_deref()) {
            Some(mask) => sys::set_affinity(tid, &mask).map_err(step(format!(
                "sched_setaffinity({}) of thread {} (now {tid})",
                crate::sched::cpu_list(&mask),
                t.tid
            )))?,
            None if !s.affinity.is_empty() => tracing::warn!(
                tid,
                "thread {} was pinned to CPUs {}, none of which is online here: it runs on any",
                t.tid,
                crate::sched::cpu_list(&s.affinity)
            ),
            // Unpinned: every CPU here, not the page server's own mask,
            // which the stub inherited (a page server under `taskset`).
            None => {
                if let Some(all) = &online {
                    if let Err(e) = sys::set_affinity(tid, all) {
                        tracing::warn!(tid, "thread {}: sched_setaffinity(any CPU): {e}", t.tid);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Open flags that must never be replayed: they create or truncate.
const OPEN_DROP: i32 = libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC;

/// Errors of restore; each names the step and its object.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Something the image holds that this version cannot restore.
    #[error("{0}: not supported yet")]
    Unsupported(String),
    /// A field the capture side did not fill.
    #[error("the image has no {0}")]
    Missing(String),
    /// A file the image depends on is missing or differs from the source's.
    #[error("{path}: {what}")]
    File { path: String, what: String },
    /// The vdso cannot be reproduced here.
    #[error("vdso: {0}")]
    Vdso(String),
    /// An injected syscall failed.
    #[error("{step}: {errno}")]
    Syscall { step: String, errno: Errno },
    /// Writing memory into the stub failed.
    #[error("writing {what}: {source}")]
    Write {
        what: String,
        #[source]
        source: VmError,
    },
    #[error("restore stub: {0}")]
    Stub(#[from] StubError),
    #[error("reading {what}: {source}")]
    Proc {
        what: String,
        #[source]
        source: procfs::ProcError,
    },
    #[error("images: {0}")]
    Images(#[from] StoreError),
    #[error("images: {0}")]
    NoSession(String),
    #[error("restore thread: {0}")]
    Thread(String),
    /// Pipe bytes or file contents could not be written back.
    #[error("{what}: {source}")]
    FdData {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A socket could not be rebuilt.
    #[error(transparent)]
    Socket(#[from] crate::sockets::SocketError),
    /// Failpoint (test only): a failure injected at a restore stage.
    #[error("restore stage {0}: failure injected by FERRY_FAILPOINT=restore:{0} (test only)")]
    Failpoint(&'static str),
    /// Post-copy: a range the source left out cannot be made lazy here.
    #[error("post-copy: {0}")]
    Lazy(String),
    #[error("post-copy: {0}")]
    Uffd(#[from] crate::sys::uffd::UffdError),
    /// The image's credentials cannot be restored exactly here.
    #[error("{who}: credentials: {source}")]
    Creds {
        who: String,
        #[source]
        source: crate::creds::CredsError,
    },
    /// `--keep-pids`: a pid the tree cannot have.
    #[error(transparent)]
    PidNs(#[from] crate::pidns::PidNsError),
    /// `--keep-pids`: a process or thread did not get its pid.
    #[error(
        "--keep-pids: {what} {pid} could not get pid {ns_pid} in the new pid namespace: {why}"
    )]
    PidTaken {
        what: &'static str,
        pid: i32,
        ns_pid: i32,
        why: String,
    },
    /// Two-phase end: the prepared process was killed, never run (no `Go`).
    #[error("the prepared process was abandoned (killed before it ran)")]
    Abandoned,
}

/// Failpoint (test only): fails `stage` when FERRY_FAILPOINT=restore:STAGE
/// (see [`crate::failpoint`]).
fn failpoint(stage: &'static str) -> Result<()> {
    match crate::failpoint::armed("restore", stage) {
        true => Err(RestoreError::Failpoint(stage)),
        false => Ok(()),
    }
}

type Result<T, E = RestoreError> = std::result::Result<T, E>;

fn unsupported(s: impl Into<String>) -> RestoreError {
    RestoreError::Unsupported(s.into())
}

fn shm_error(e: crate::shmem::ShmError) -> RestoreError {
    match e {
        crate::shmem::ShmError::Unsupported(s) => RestoreError::Unsupported(s),
        crate::shmem::ShmError::Io { what, source } => RestoreError::FdData { what, source },
        // The source side's; not met here.
        other => RestoreError::Unsupported(other.to_string()),
    }
}

fn is_special(v: &pb::Vma) -> bool {
    matches!(
        v.kind(),
        pb::VmaKind::Vdso | pb::VmaKind::Vvar | pb::VmaKind::Vsyscall
    ) || matches!(
        v.name.as_str(),
        "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]"
    )
}

/// Memory post-copy may leave missing: anonymous and private (heap and
/// stacks included). Shared memory and file pages go in before the resume.
pub fn lazy_eligible(v: &pb::Vma) -> bool {
    matches!(
        v.kind(),
        pb::VmaKind::Anon | pb::VmaKind::Heap | pb::VmaKind::Stack
    ) && !is_shared(v)
        && !is_special(v)
}

fn is_file(v: &pb::Vma) -> bool {
    v.kind() == pb::VmaKind::File
}

fn is_shared(v: &pb::Vma) -> bool {
    v.flags & libc::MAP_SHARED as u32 != 0
}

/// Whether two paths name the same file (device and inode).
fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

/// The vvar/vdso block of some maps as `(name, offset from its start, len)`.
fn vdso_layout<'a>(maps: impl Iterator<Item = (&'a str, u64, u64)>) -> Vec<(String, u64, u64)> {
    let mut parts: Vec<(String, u64, u64)> = maps
        .filter(|(n, _, _)| matches!(*n, "[vvar]" | "[vvar_vclock]" | "[vdso]"))
        .map(|(n, s, e)| (n.to_string(), s, e - s))
        .collect();
    parts.sort_by_key(|p| p.1);
    let base = parts.first().map_or(0, |p| p.1);
    for p in &mut parts {
        p.1 -= base;
    }
    parts
}

fn own_vdso_layout() -> Result<Vec<(String, u64, u64)>> {
    let maps =
        procfs::read_maps(std::process::id() as i32).map_err(|source| RestoreError::Proc {
            what: "/proc/self/maps".into(),
            source,
        })?;
    Ok(vdso_layout(maps.iter().map(|m| {
        (m.path.as_deref().unwrap_or(""), m.start, m.end)
    })))
}

/// Refuses, by name and before anything happens, what cannot be restored.
pub fn check(tree: &pb::ProcessTree, vmas: &[pb::Vma]) -> Result<()> {
    match tree.processes.as_slice() {
        [] => Err(RestoreError::Missing("process".into())),
        [p] if p.space == 0 && crate::tree::split_vmas(vmas).len() <= 1 => {
            check_lone_memfds(&p.fds, vmas)?;
            check_process(p, vmas, &p.fds)
        }
        many => {
            crate::tree::check_tree(many).map_err(unsupported)?;
            let mut spaces = crate::tree::split_vmas(vmas);
            crate::shmem::objects(many, &spaces).map_err(shm_error)?;
            // The shared memory objects' slots are no process's.
            spaces.remove(&crate::shmem::SHM_SPACE);
            let tree_fds: Vec<pb::FileDesc> = many.iter().flat_map(|p| p.fds.clone()).collect();
            for p in many.iter().filter(|p| !p.zombie) {
                let own = spaces.get(&p.space).ok_or_else(|| {
                    RestoreError::Missing(format!(
                        "mappings of process {} (space {})",
                        p.pid, p.space
                    ))
                })?;
                check_process(p, own, &tree_fds).map_err(|e| match e {
                    RestoreError::Unsupported(s) => {
                        unsupported(format!("process {} ({}): {s}", p.pid, p.comm))
                    }
                    e => e,
                })?;
            }
            let live = many.iter().filter(|p| !p.zombie).count();
            if spaces.len() != live {
                return Err(unsupported(format!(
                    "{} address spaces for {live} live processes",
                    spaces.len(),
                )));
            }
            Ok(())
        }
    }
}

/// [`check`] for one process and its own mappings; `tree_fds` are the fds
/// of the whole tree (its own for a lone process).
fn check_process(proc: &pb::Process, vmas: &[pb::Vma], tree_fds: &[pb::FileDesc]) -> Result<()> {
    if proc.threads.is_empty() {
        return Err(RestoreError::Missing("thread".into()));
    }
    for t in &proc.threads {
        if t.gpregs.len() != stub::REGS_SIZE {
            return Err(RestoreError::Missing(format!(
                "gpregs for thread {} ({} bytes, need {})",
                t.tid,
                t.gpregs.len(),
                stub::REGS_SIZE
            )));
        }
        if t.xstate.is_empty() {
            return Err(RestoreError::Missing(format!(
                "xstate (NT_X86_XSTATE) for thread {}",
                t.tid
            )));
        }
    }
    let mm = proc
        .mm
        .as_ref()
        .filter(|m| m.start_code != 0 && !m.auxv.is_empty());
    let Some(mm) = mm else {
        return Err(RestoreError::Missing("mm fields (PR_SET_MM_MAP)".into()));
    };
    if mm.auxv.len() > 512 || mm.auxv.len() % 16 != 0 {
        return Err(RestoreError::Missing(format!(
            "valid auxv ({} bytes)",
            mm.auxv.len()
        )));
    }
    check_fds_in(&proc.fds, tree_fds)?;
    for s in &proc.sigactions {
        if !(1..=64).contains(&s.signo) || s.signo == 9 || s.signo == 19 {
            return Err(unsupported(format!("an action for signal {}", s.signo)));
        }
    }
    check_mappings(vmas)?;
    check_creds(proc)
}

/// Whether this ferry can give every thread of `proc` exactly the
/// credentials of the image (see [`crate::creds::plan`]): the stub is
/// forked from the calling thread and starts with its credentials.
pub fn check_creds(proc: &pb::Process) -> Result<()> {
    let have = crate::creds::own().map_err(|source| creds_err(proc, None, source))?;
    let last = crate::sys::caps::last_cap();
    for t in &proc.threads {
        let want = thread_creds(proc, t)?;
        crate::creds::plan(&want, &have, last).map_err(|e| creds_err(proc, Some(t), e))?;
    }
    Ok(())
}

/// A thread's own credentials in the image, else its process's.
fn thread_creds(proc: &pb::Process, t: &pb::Thread) -> Result<crate::creds::Creds> {
    t.creds
        .as_ref()
        .or(proc.creds.as_ref())
        .map(crate::creds::Creds::from_pb)
        .ok_or_else(|| {
            RestoreError::Missing(format!(
                "credentials of process {} ({})",
                proc.pid, proc.comm
            ))
        })
}

fn creds_err(
    proc: &pb::Process,
    t: Option<&pb::Thread>,
    source: crate::creds::CredsError,
) -> RestoreError {
    let who = match t {
        Some(t) if t.tid != proc.pid && t.tid != 0 => {
            format!("process {} ({}) thread {}", proc.pid, proc.comm, t.tid)
        }
        _ => format!("process {} ({})", proc.pid, proc.comm),
    };
    RestoreError::Creds { who, source }
}

/// The part of [`check`] about file descriptors: what kinds ferry restores.
/// `ferry migrate` runs it on the live process before the first round, so
/// an unsupported descriptor never costs a freeze. A pipe needs both ends
/// in the process (the other end cannot be connected again), an epoll only
/// registrations on descriptors the image has.
pub fn check_fds(fds: &[pb::FileDesc]) -> Result<()> {
    check_fds_in(fds, fds)
}

/// [`check_fds`] for one process of a tree: a pipe's other end may be in
/// any process of it (`tree_fds`, every fd of the tree).
pub fn check_fds_in(fds: &[pb::FileDesc], tree_fds: &[pb::FileDesc]) -> Result<()> {
    let ends = |id: u64| {
        let mode = |f: &&pb::FileDesc| f.flags & libc::O_ACCMODE as u32;
        let group = tree_fds
            .iter()
            .filter(move |f| f.kind() == pb::FdKind::Pipe && f.pipe_id == id);
        (
            group.clone().any(|f| mode(&f) != libc::O_WRONLY as u32),
            group.clone().any(|f| mode(&f) != libc::O_RDONLY as u32),
        )
    };
    let mut data = 0u64;
    for fd in fds {
        // The capture side may already say "fd N: what: why".
        let prefix = format!("fd {}: ", fd.fd);
        let desc = match fd.description.as_str() {
            "" => fd.path.as_str(),
            d => d.strip_prefix(&prefix).unwrap_or(d),
        };
        // The refusal says "not supported yet" itself.
        let desc = desc.strip_suffix(": not supported yet").unwrap_or(desc);
        let refuse = |why: &str| unsupported(format!("fd {}: {desc}{why}", fd.fd));
        data += fd.data.len() as u64;
        if data > crate::state::MAX_FD_DATA {
            return Err(refuse(&format!(
                ": more than {} bytes of contents in all",
                crate::state::MAX_FD_DATA
            )));
        }
        let has_path = match fd.kind() {
            pb::FdKind::Regular
            | pb::FdKind::DevNull
            | pb::FdKind::CharDevice
            | pb::FdKind::Directory
            | pb::FdKind::Fifo => true,
            pb::FdKind::Pipe => {
                if ends(fd.pipe_id) != (true, true) {
                    let outside = if tree_fds.len() > fds.len() {
                        " whose other end is outside the process tree"
                    } else {
                        " whose other end is outside the process"
                    };
                    return Err(refuse(outside));
                }
                false
            }
            pb::FdKind::Eventfd | pb::FdKind::Signalfd => false,
            pb::FdKind::TcpListen | pb::FdKind::TcpEstablished | pb::FdKind::UnixListen
                if fd.socket.is_none() =>
            {
                return Err(RestoreError::Missing(format!("socket of fd {}", fd.fd)))
            }
            // The repair state is read at the freeze: the live process's
            // check (`ferry migrate`'s precheck) has none yet.
            pb::FdKind::TcpListen | pb::FdKind::TcpEstablished | pb::FdKind::UnixListen => false,
            pb::FdKind::UnixPair => {
                let peer = fd.socket.as_ref().map_or(0, |s| s.peer_ino);
                let held = fds.iter().filter(|g| {
                    g.kind() == pb::FdKind::UnixPair
                        && g.socket.as_ref().is_some_and(|s| s.ino == peer)
                });
                if held.count() != 1 {
                    return Err(refuse(": its peer is not (once) in the image"));
                }
                false
            }
            pb::FdKind::Timerfd if fd.timerfd.is_none() => {
                return Err(RestoreError::Missing(format!("timer of fd {}", fd.fd)))
            }
            pb::FdKind::Timerfd => false,
            pb::FdKind::Epoll => {
                for t in &fd.epoll_targets {
                    let target = fds.iter().find(|f| f.fd == t.fd);
                    match target {
                        Some(f) if f.ino == 0 || t.ino == 0 || f.ino == t.ino => {}
                        Some(_) => {
                            return Err(refuse(&format!(
                                ": watches a file no longer at fd {} (closed and reused)",
                                t.fd
                            )))
                        }
                        None => {
                            return Err(refuse(&format!(
                                ": watches fd {}, which is not open any more",
                                t.fd
                            )))
                        }
                    }
                }
                false
            }
            pb::FdKind::Memfd => {
                if memfd_name(&fd.path).is_none() {
                    return Err(refuse(": not a memfd name"));
                }
                false
            }
            pb::FdKind::Deleted => {
                let dir = deleted_dir(&fd.path);
                if !dir.is_some_and(|d| d.is_dir()) {
                    return Err(refuse(
                        ": its directory is not here to hold a new unlinked file",
                    ));
                }
                false
            }
            _ => return Err(unsupported(format!("fd {}: {desc}", fd.fd))),
        };
        if !has_path {
            continue;
        }
        if fd.path.is_empty() || fd.path.ends_with(" (deleted)") {
            return Err(unsupported(format!(
                "fd {}: {desc}: a deleted or unnamed file",
                fd.fd
            )));
        }
        if let Err(e) = std::fs::metadata(&fd.path) {
            return Err(RestoreError::File {
                path: fd.path.clone(),
                what: format!("fd {}: {e}", fd.fd),
            });
        }
    }
    Ok(())
}

/// The name a memfd was created with, from its link target
/// ("/memfd:NAME (deleted)").
fn memfd_name(path: &str) -> Option<&str> {
    path.strip_prefix("/memfd:")?.strip_suffix(" (deleted)")
}

/// The directory an unlinked file was in ("/dir/name (deleted)").
fn deleted_dir(path: &str) -> Option<&Path> {
    Path::new(path.strip_suffix(" (deleted)")?).parent()
}

/// A lone process's memfd mappings: made from the tree's objects only
/// (see [`crate::shmem`]), refused by name for one process alone.
pub fn check_lone_shm(vmas: &[pb::Vma]) -> Result<()> {
    check_lone_memfds(&[], vmas)
}

/// [`check_lone_shm`], and a memfd held by two descriptors of a lone
/// process (a `dup`): both refused by name.
pub fn check_lone_memfds(fds: &[pb::FileDesc], vmas: &[pb::Vma]) -> Result<()> {
    for (i, f) in fds.iter().enumerate() {
        if f.kind() != pb::FdKind::Memfd || f.ino == 0 {
            continue;
        }
        if let Some(g) = fds[..i]
            .iter()
            .find(|g| g.kind() == pb::FdKind::Memfd && g.ino == f.ino)
        {
            return Err(unsupported(format!(
                "fd {}: {}: the same memfd as fd {}, in a lone process (supported in a process tree only)",
                f.fd, f.path, g.fd
            )));
        }
    }
    match vmas
        .iter()
        .find(|v| is_file(v) && crate::shmem::key_of(v).is_some())
    {
        Some(v) => Err(unsupported(format!(
            "mapping {:#x}-{:#x} of {}: a memfd mapped by a lone process (supported in a process tree only)",
            v.start, v.end, v.name
        ))),
        None => Ok(()),
    }
}

/// The part of [`check`] that needs only the mappings: every file mapped
/// must be here, unchanged, and the vdso block must fit this kernel's. The
/// page server runs it on every round's mappings (pre-flight), so a
/// migration that cannot end well fails before the source is frozen.
pub fn check_mappings(vmas: &[pb::Vma]) -> Result<()> {
    let mut prev_end = 0;
    for v in vmas {
        if v.start < prev_end || v.end <= v.start || v.start % page_size() != 0 {
            return Err(unsupported(format!(
                "VMA {:#x}-{:#x} (overlapping, unsorted or unaligned)",
                v.start, v.end
            )));
        }
        prev_end = v.end;
        if is_special(v) {
            continue;
        }
        match v.kind() {
            pb::VmaKind::Unspecified => {
                return Err(unsupported(format!(
                    "VMA {:#x}-{:#x} {} of unknown kind",
                    v.start, v.end, v.name
                )))
            }
            // A memfd: made by the restore (a tree's shared memory).
            pb::VmaKind::File if crate::shmem::key_of(v).is_some() => {}
            pb::VmaKind::File => check_file(v)?,
            _ => {}
        }
    }
    check_vdso(vmas)?;
    Ok(())
}

fn check_file(v: &pb::Vma) -> Result<()> {
    let Some(f) = v.file.as_ref().filter(|f| !f.path.is_empty()) else {
        return Err(RestoreError::Missing(format!(
            "file of the VMA {:#x}-{:#x}",
            v.start, v.end
        )));
    };
    let md = std::fs::metadata(&f.path).map_err(|e| RestoreError::File {
        path: f.path.clone(),
        what: format!("mapped at {:#x}: {e}", v.start),
    })?;
    if md.len() != f.size || mtime_ns(&md) != f.mtime_ns {
        return Err(RestoreError::File {
            path: f.path.clone(),
            what: format!(
                "differs from the source's: size {} (source {}), mtime {} ns (source {})",
                md.len(),
                f.size,
                mtime_ns(&md),
                f.mtime_ns
            ),
        });
    }
    Ok(())
}

fn image_vdso_layout(vmas: &[pb::Vma]) -> Vec<(String, u64, u64)> {
    vdso_layout(vmas.iter().map(|v| (v.name.as_str(), v.start, v.end)))
}

fn check_vdso(vmas: &[pb::Vma]) -> Result<()> {
    let want = image_vdso_layout(vmas);
    if want.is_empty() {
        return Ok(());
    }
    if want[0].0 != "[vvar]" {
        return Err(RestoreError::Vdso(format!(
            "the image's vdso block starts with {}, not [vvar]",
            want[0].0
        )));
    }
    let here = own_vdso_layout()?;
    if here != want {
        return Err(RestoreError::Vdso(format!(
            "the image's layout {want:?} differs from this kernel's {here:?} (another kernel build?)"
        )));
    }
    Ok(())
}

/// Restores the image's process; returns its pid, running (a warm restore
/// given the whole image as one layer).
pub fn restore(tree: &pb::ProcessTree, img: &FlatImage) -> Result<i32> {
    check(tree, &img.vmas)?;
    if tree.processes.len() > 1 {
        let (tree, img) = (tree.clone(), img.clone());
        return std::thread::Builder::new()
            .name("ferry-restore".into())
            .spawn(move || restore_tree(&tree, &img, None))
            .map_err(|e| RestoreError::Thread(e.to_string()))?
            .join()
            .map_err(|_| RestoreError::Thread("panicked".into()))?;
    }
    let mut w = Warm::start()?;
    w.layer(img.clone())?;
    w.finish(tree).map_err(|f| f.error)
}

/// [`restore`], ending prepared instead of running (the two-phase end, see
/// [`crate::readygo`]).
pub fn prepare(tree: &pb::ProcessTree, img: &FlatImage) -> Result<Prepared> {
    check(tree, &img.vmas)?;
    if tree.processes.len() > 1 {
        let (tree, img) = (tree.clone(), img.clone());
        let (gate, waiting) = crate::readygo::gate();
        let h = std::thread::Builder::new()
            .name("ferry-restore".into())
            .spawn(move || restore_tree(&tree, &img, Some(gate)))
            .map_err(|e| RestoreError::Thread(e.to_string()))?;
        return waiting.prepared(Box::new(move || {
            h.join()
                .map_err(|_| RestoreError::Thread("panicked".into()))?
        }));
    }
    let mut w = Warm::start()?;
    w.layer(img.clone())?;
    w.prepare(tree).map_err(|f| f.error)
}

/// A restore that follows the rounds: the process skeleton (stub, gadget,
/// mappings) is made at the first layer and every later layer is laid over
/// it as it is sealed, so at commit only the thread and process state are
/// left to do. Laying layer k over the skeleton of layers 0..k gives what
/// flattening them gives: ranges layer k no longer maps are unmapped,
/// ranges it maps anew (or maps with another backing) are mapped fresh,
/// and its pages, zero runs included, are written over the rest.
///
/// The work runs on its own thread (ptrace requests must come from the
/// thread that attached the stub), in the order the layers were given;
/// [`Warm::layer`] only queues. The stub stays stopped until
/// [`Warm::finish`]; dropping a `Warm` kills it.
pub struct Warm {
    tx: Option<std::sync::mpsc::Sender<Cmd>>,
    /// Counts layers as the worker finishes them.
    /// The stub's pid, once per layer the worker finishes.
    applied_rx: std::sync::mpsc::Receiver<i32>,
    applied: u32,
    stub_pid: Option<i32>,
    worker: Option<std::thread::JoinHandle<WarmDone>>,
    vmas: Vec<pb::Vma>,
    layers: u32,
    /// `--keep-pids`: the pid the process was made with in its new pid
    /// namespace.
    keep_pid: Option<i32>,
}

/// What the restore thread ends with: the pid, running, and with lazy
/// ranges the userfaultfd they wait on.
type WarmDone = Result<(i32, Option<Missing>), WarmFailure>;

enum Cmd {
    Layer(FlatImage),
    /// With a gate, the process is held prepared until its verdict.
    Finish(Box<pb::Process>, Vec<(u64, u64)>, Option<Gate>),
}

/// Why a warm restore failed, and whether the layers already had: then a
/// cold restore from the flattened image may still succeed (the gadget
/// collided with a new mapping, say).
#[derive(Debug)]
pub struct WarmFailure {
    pub in_layers: bool,
    pub error: RestoreError,
}

impl WarmFailure {
    fn layers(error: RestoreError) -> Self {
        WarmFailure {
            in_layers: true,
            error,
        }
    }

    fn state(error: RestoreError) -> Self {
        WarmFailure {
            in_layers: false,
            error,
        }
    }
}

impl Warm {
    /// Starts the worker; the stub is made when the first layer arrives.
    pub fn start() -> Result<Warm> {
        Warm::start_as(None)
    }

    /// [`Warm::start`] for `--keep-pids`: the stub is made in a fresh pid
    /// namespace with pid `ns_pid` there, forked from the namespace's
    /// reaper unless it is pid 1 itself (as [`restore_keeping_pids`]
    /// does at commit). Only a single process: a tree's layers make the
    /// warm restore give up, and the commit restores it cold.
    pub fn start_keeping_pid(ns_pid: i32) -> Result<Warm> {
        Warm::start_as(Some(ns_pid))
    }

    fn start_as(keep_pid: Option<i32>) -> Result<Warm> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (applied_tx, applied_rx) = std::sync::mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("ferry-restore".into())
            .spawn(move || warm_worker(rx, applied_tx, keep_pid))
            .map_err(|e| RestoreError::Thread(e.to_string()))?;
        Ok(Warm {
            tx: Some(tx),
            applied_rx,
            applied: 0,
            stub_pid: None,
            worker: Some(worker),
            vmas: Vec::new(),
            layers: 0,
            keep_pid,
        })
    }

    /// `--keep-pids`: the pid the process gets in its new pid namespace.
    pub fn keep_pid(&self) -> Option<i32> {
        self.keep_pid
    }

    /// Queues the next layer, read alone (see `SessionStore::layer`), once
    /// every earlier one is in: the page server acknowledges a layer only
    /// after this returns, so the source's rounds keep pace with the
    /// restore instead of freezing while a big layer is still being laid
    /// (the freeze would then wait for it). An error means the worker has
    /// already given up; [`Warm::finish`] says why.
    pub fn layer(&mut self, img: FlatImage) -> Result<()> {
        let stopped = || RestoreError::Thread("the warm restore stopped".into());
        // Which process forks which is only known from the state, at
        // commit: a tree is restored cold, from the flattened image.
        let spaces = crate::tree::split_vmas(&img.vmas).len();
        if spaces > 1 {
            return Err(unsupported(format!(
                "a warm restore of {spaces} address spaces (a process tree restores at commit)"
            )));
        }
        self.catch_up().map_err(|_| stopped())?;
        self.vmas = img.vmas.clone();
        self.layers += 1;
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(Cmd::Layer(img)).ok())
            .ok_or_else(stopped)
    }

    /// Waits until every queued layer is in.
    fn catch_up(&mut self) -> Result<(), std::sync::mpsc::RecvError> {
        while self.applied < self.layers {
            self.stub_pid = Some(self.applied_rx.recv()?);
            self.applied += 1;
        }
        Ok(())
    }

    /// Layers queued so far.
    pub fn layers(&self) -> u32 {
        self.layers
    }

    /// The waiting process, once every queued layer is in it (for tests and
    /// diagnostics: it is stopped under ptrace until [`Warm::finish`]).
    pub fn stub_pid(&mut self) -> Option<i32> {
        self.catch_up().ok()?;
        self.stub_pid
    }

    /// Checks the state against the last layer's mappings, then finishes
    /// the restore once every queued layer is in: the process runs.
    pub fn finish(self, tree: &pb::ProcessTree) -> Result<i32, WarmFailure> {
        self.finish_lazy(tree, Vec::new()).map(|(pid, _)| pid)
    }

    /// [`Warm::finish`] for post-copy: the pages of `lazy` (page aligned,
    /// sorted, each inside one anonymous private mapping) are dropped from
    /// the process before it resumes and registered with a userfaultfd in
    /// MISSING mode, returned with the pid: the process runs, and waits on
    /// each such page it touches until it is placed through the
    /// [`Missing`].
    pub fn finish_lazy(
        mut self,
        tree: &pb::ProcessTree,
        lazy: Vec<(u64, u64)>,
    ) -> Result<(i32, Option<Missing>), WarmFailure> {
        let sent = self.send_finish(tree, lazy, None)?;
        Self::join(self.worker.take(), sent)
    }

    /// [`Warm::finish`], ending prepared instead of running (see
    /// [`crate::readygo`]).
    pub fn prepare(self, tree: &pb::ProcessTree) -> Result<Prepared, WarmFailure> {
        self.prepare_with(tree, Vec::new(), |(pid, _)| pid)
    }

    /// [`Warm::finish_lazy`], ending prepared instead of running: the
    /// userfaultfd is registered and the final state set before the
    /// process is held, so a release only lets it go; what it yields is
    /// what [`Warm::finish_lazy`] returns.
    pub fn prepare_lazy(
        self,
        tree: &pb::ProcessTree,
        lazy: Vec<(u64, u64)>,
    ) -> Result<Prepared<(i32, Option<Missing>)>, WarmFailure> {
        self.prepare_with(tree, lazy, |done| done)
    }

    fn prepare_with<T: 'static>(
        mut self,
        tree: &pb::ProcessTree,
        lazy: Vec<(u64, u64)>,
        yields: fn((i32, Option<Missing>)) -> T,
    ) -> Result<Prepared<T>, WarmFailure> {
        let (gate, waiting) = crate::readygo::gate();
        let sent = self.send_finish(tree, lazy, Some(gate))?;
        let worker = self.worker.take();
        let in_layers = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = in_layers.clone();
        waiting
            .prepared(Box::new(move || {
                Self::join(worker, sent).map(yields).map_err(|f| {
                    seen.store(f.in_layers, std::sync::atomic::Ordering::Relaxed);
                    f.error
                })
            }))
            .map_err(|error| WarmFailure {
                in_layers: in_layers.load(std::sync::atomic::Ordering::Relaxed),
                error,
            })
    }

    /// Checks the state and hands it to the worker; false if the worker
    /// had already stopped.
    fn send_finish(
        &mut self,
        tree: &pb::ProcessTree,
        lazy: Vec<(u64, u64)>,
        gate: Option<Gate>,
    ) -> Result<bool, WarmFailure> {
        check(tree, &self.vmas).map_err(WarmFailure::state)?;
        if let Some(n) = self.keep_pid {
            let max = crate::pidns::pid_max().map_err(|e| WarmFailure::state(e.into()))?;
            crate::pidns::check(tree, max).map_err(|e| WarmFailure::state(e.into()))?;
            let root = tree.processes.first().map_or(0, |p| p.ns_pid);
            if root != n {
                // The Hello said another pid than the state: the pages are
                // all in the store, and a cold restore makes the right one.
                return Err(WarmFailure::layers(unsupported(format!(
                    "a warm restore made pid {n}, the state's root has pid {root}"
                ))));
            }
        }
        if tree.processes.len() > 1 {
            // One address space laid warm (a root whose only other
            // processes are zombies): the tree is made cold all the same.
            return Err(WarmFailure::layers(unsupported(
                "a warm restore of a process tree (it restores from the flattened image)",
            )));
        }
        let p = Box::new(tree.processes[0].clone());
        Ok(self
            .tx
            .take()
            .is_some_and(|tx| tx.send(Cmd::Finish(p, lazy, gate)).is_ok()))
    }

    fn join(
        worker: Option<std::thread::JoinHandle<WarmDone>>,
        sent: bool,
    ) -> Result<(i32, Option<Missing>), WarmFailure> {
        let joined = worker
            .map(|w| w.join())
            .ok_or_else(|| WarmFailure::state(RestoreError::Thread("no worker".into())))?;
        match joined {
            Ok(r) => r,
            Err(_) => Err(WarmFailure::layers(RestoreError::Thread("panicked".into()))),
        }
        .map_err(|mut f| {
            f.in_layers |= !sent;
            f
        })
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        // Closing the queue makes the worker drop (kill) the stub as soon as
        // it is done with the layer at hand; nobody waits for that.
        self.tx.take();
    }
}

fn warm_worker(
    rx: std::sync::mpsc::Receiver<Cmd>,
    applied: std::sync::mpsc::Sender<i32>,
    keep_pid: Option<i32>,
) -> WarmDone {
    let mut r: Option<Restorer> = None;
    // `--keep-pids` below pid 1: the namespace's reaper, a stopped stub
    // until the process runs (dropped, it takes the namespace along).
    let mut reaper: Option<Restorer> = None;
    let mut layers = 0u32;
    loop {
        match rx.recv() {
            Ok(Cmd::Layer(img)) => {
                let t = std::time::Instant::now();
                let restorer = match r.as_mut() {
                    Some(r) => r,
                    None => {
                        let (root, pid1) = Restorer::warm_stub(&img.vmas, keep_pid)
                            .map_err(WarmFailure::layers)?;
                        reaper = pid1;
                        r.insert(root)
                    }
                };
                restorer.apply(&img).map_err(WarmFailure::layers)?;
                tracing::debug!(
                    layer = layers,
                    pages = img.pages(),
                    elapsed_ms = t.elapsed().as_secs_f64() * 1e3,
                    "layer laid into the restored process"
                );
                layers += 1;
                let _ = applied.send(restorer.stub.pid());
            }
            Ok(Cmd::Finish(p, lazy, gate)) => {
                let r = r.ok_or_else(|| {
                    WarmFailure::layers(RestoreError::Missing("memory image (no layer)".into()))
                })?;
                let done = r.finish(&p, &lazy, gate).map_err(WarmFailure::state)?;
                if let Some(mut reaper) = reaper {
                    // As at commit: the process runs, then its reaper; a
                    // failure drops (kills) the reaper and the namespace.
                    let rip = reaper.become_reaper().map_err(WarmFailure::state)?;
                    reaper
                        .stub
                        .run_at(rip)
                        .map_err(|e| WarmFailure::state(e.into()))?;
                }
                return Ok(done);
            }
            Err(_) => {
                return Err(WarmFailure::layers(RestoreError::Thread(
                    "abandoned (the session ended)".into(),
                )))
            }
        }
    }
}

/// The pipes with ends in more than one process of `procs`, made in ferry
/// with their capacity and their unread bytes, keyed by pipe id.
fn shared_pipes(
    procs: &[pb::Process],
) -> Result<HashMap<u64, (std::os::fd::OwnedFd, std::os::fd::OwnedFd)>> {
    use std::io::Write;
    let mut holders: HashMap<u64, Vec<(usize, &pb::FileDesc)>> = HashMap::new();
    for (i, p) in procs.iter().enumerate() {
        for f in p.fds.iter().filter(|f| f.kind() == pb::FdKind::Pipe) {
            holders.entry(f.pipe_id).or_default().push((i, f));
        }
    }
    let mut out = HashMap::new();
    for (id, fds) in holders {
        if fds.iter().all(|(i, _)| *i == fds[0].0) {
            continue;
        }
        let err = |what: String| move |source| RestoreError::FdData { what, source };
        let (r, w) = crate::sys::fds::pipe().map_err(err(format!("pipe {id}: pipe2")))?;
        if let Some(size) = fds.iter().map(|(_, f)| f.pipe_size).find(|&n| n > 0) {
            crate::sys::fds::set_pipe_size(w.as_fd(), size)
                .map_err(err(format!("pipe {id}: F_SETPIPE_SZ {size}")))?;
        }
        // Lowest process first, as the image lists them.
        if let Some((i, f)) = fds.iter().find(|(_, f)| !f.data.is_empty()) {
            std::fs::File::from(w.try_clone().map_err(err(format!("pipe {id}: dup")))?)
                .write_all(&f.data)
                .map_err(err(format!(
                    "fd {} of process {}: writing {} unread bytes back",
                    f.fd,
                    procs[*i].pid,
                    f.data.len()
                )))?;
        }
        out.insert(id, (r, w));
    }
    Ok(out)
}

/// The part of a tree image that is process `space`'s, with its own
/// addresses.
fn space_image(img: &FlatImage, space: u32, vmas: Vec<pb::Vma>) -> FlatImage {
    let runs = img
        .runs
        .iter()
        .filter(|r| crate::tree::untag(r.addr).0 == space)
        .map(|r| ferry_page_server::store::FlatRun {
            addr: crate::tree::untag(r.addr).1,
            pages: r.pages,
            data: r.data.clone(),
        })
        .collect();
    FlatImage {
        page_size: img.page_size,
        vmas,
        runs,
    }
}

/// Restores a checked tree (see [`crate::tree`]): the root's stub is made
/// and emptied as for one process, then every other process is forked
/// from its parent's stub while they are all still empty (gadget only), in
/// tree order, and given its session and group right away, before it forks
/// children of its own ([`crate::tree::plan`]). Then each gets its memory,
/// files and threads as a lone process would; only when every one is ready
/// are they let go, the root last. Any failure before that kills every
/// stub (each `Stub` is killed when dropped). With a `gate`, every process
/// is held prepared there first (see [`crate::readygo`]). Runs on the
/// calling thread, which must be a plain thread (ptrace affinity); returns
/// the root's pid.
fn restore_tree(tree: &pb::ProcessTree, img: &FlatImage, gate: Option<Gate>) -> Result<i32> {
    restore_tree_as(tree, img, Root::Spawn, gate)
}

/// How the root of a restored tree comes to be.
enum Root<'a> {
    /// Forked from ferry, in ferry's pid namespace.
    Spawn,
    /// `--keep-pids` with a root whose pid was 1: pid 1 of a new pid
    /// namespace.
    Init,
    /// `--keep-pids`: forked with its pid from the namespace's reaper.
    FromReaper(&'a mut Restorer),
}

/// [`restore_tree`] with the root made as `how` says; with `--keep-pids`
/// every process below it gets its pid.
fn restore_tree_as(
    tree: &pb::ProcessTree,
    img: &FlatImage,
    how: Root<'_>,
    gate: Option<Gate>,
) -> Result<i32> {
    let procs = &tree.processes;
    let plan = crate::tree::plan(procs).map_err(unsupported)?;
    let spaces = crate::tree::split_vmas(&img.vmas);
    // The gadget sits at one address in every process (they are forked
    // with it), so it must miss every process's mappings.
    let all_vmas: Vec<pb::Vma> = spaces
        .iter()
        .filter(|(&s, _)| s != crate::shmem::SHM_SPACE)
        .flat_map(|(_, v)| v.iter().cloned())
        .collect();
    // Pipes between processes are made here, in ferry, filled once with
    // their unread bytes (every process holding a read end captured the
    // same bytes), and each process takes its ends from ferry; ferry's
    // copies close when this returns.
    let shared = shared_pipes(procs)?;
    let shared_fds: HashMap<u64, (i32, i32)> = shared
        .iter()
        .map(|(&id, (r, w))| (id, (r.as_raw_fd(), w.as_raw_fd())))
        .collect();
    // Shared memory objects: made and filled once here, mapped by each
    // process from ferry's fd (ferry's copies close when this returns).
    let objects = crate::shmem::objects(procs, &spaces).map_err(shm_error)?;
    let slots = crate::shmem::slots(&img.vmas);
    let mut made: Vec<(crate::shmem::Object, std::os::fd::OwnedFd)> = Vec::new();
    for o in objects {
        // The contents a descriptor of it carried (the memfd's at the
        // freeze), read before the pages laid over them.
        let data = o
            .fds
            .iter()
            .find_map(|&(i, fd)| {
                procs[i]
                    .fds
                    .iter()
                    .find(|f| f.fd == fd && !f.data.is_empty())
                    .map(|f| f.data.clone())
            })
            .unwrap_or_default();
        let fd = crate::shmem::make(&o, &data, img, &slots).map_err(shm_error)?;
        made.push((o, fd));
    }
    let shm: HashMap<crate::shmem::ShmKey, i32> =
        made.iter().map(|(o, fd)| (o.key, fd.as_raw_fd())).collect();
    let shm_fds = |i: usize| -> HashMap<i32, i32> {
        made.iter()
            .flat_map(|(o, fd)| {
                o.fds
                    .iter()
                    .filter(move |&&(j, _)| j == i)
                    .map(move |&(_, n)| (n, fd.as_raw_fd()))
            })
            .collect()
    };
    let keep = !matches!(how, Root::Spawn);
    let mut root = match how {
        Root::Spawn => Restorer::new(&all_vmas)?,
        Root::Init => {
            let r = Restorer::new_with(&all_vmas, Birth::NewPidNs)?;
            r.has_pid("process", &procs[0], 1)?;
            r
        }
        Root::FromReaper(reaper) => {
            let mut r = reaper.child(Some(&procs[0]))?;
            // Like a spawned stub: the leader of its own session.
            r.call(
                format!("setsid of process {}", procs[0].pid),
                libc::SYS_setsid,
                [0; 6],
            )?;
            r
        }
    };
    root.shared_pipes = shared_fds.clone();
    root.shm = shm.clone();
    root.shm_fds = shm_fds(0);
    let mut rs: Vec<Restorer> = vec![root];
    for (i, p) in procs.iter().enumerate().skip(1) {
        let step = plan[i];
        let parent = step.parent.unwrap_or(0);
        let mut r = rs[parent].child(keep.then_some(p))?;
        r.shm = shm.clone();
        r.shm_fds = shm_fds(i);
        if step.setsid {
            r.call(
                format!("setsid of process {}", p.pid),
                libc::SYS_setsid,
                [0; 6],
            )?;
        }
        let leader = match step.group {
            crate::tree::Group::Inherit => None,
            crate::tree::Group::Own => Some(0),
            // As the process itself sees it.
            crate::tree::Group::Join(j) => Some(rs[j].stub.vpid() as u64),
        };
        if let Some(l) = leader {
            r.call(
                format!("setpgid of process {} (group {})", p.pid, p.pgid),
                libc::SYS_setpgid,
                [0, l, 0, 0, 0, 0],
            )?;
        }
        rs.push(r);
    }
    for (r, p) in rs.iter_mut().zip(procs).filter(|(_, p)| !p.zombie) {
        let own = spaces.get(&p.space).cloned().unwrap_or_default();
        r.apply(&space_image(img, p.space, own))?;
    }
    let mut ready = Vec::with_capacity(rs.len());
    for (r, p) in rs.iter_mut().zip(procs) {
        ready.push(if p.zombie {
            None
        } else {
            Some(r.prepare(p, &[])?.0)
        });
    }
    let root = rs[0].stub.pid();
    // Every process gets its final state, children first; a zombie exits
    // now, its parent still stopped (the SIGCHLD waits for it).
    let mut held: Vec<(Stub, Vec<i32>)> = Vec::new();
    for ((mut r, all), p) in rs.into_iter().zip(ready).zip(procs).rev() {
        let done = match all {
            Some(all) => {
                r.stub.set_final(&all)?;
                held.push((r.stub, all.iter().map(|t| t.tid).collect()));
                continue;
            }
            None => r.stub.exit_as_zombie(p.exit_status).and_then(|pid| {
                // Dead before its parent runs, so the parent finds a
                // zombie to reap, as it would have on the source.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while !matches!(procfs::read_status(pid).map(|s| s.state), Ok('Z') | Err(_)) {
                    if std::time::Instant::now() > deadline {
                        return Err(StubError::Unexpected {
                            pid,
                            what: "still running 5 s after its exit_group".into(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Ok(pid)
            }),
        };
        done?;
    }
    if let Some(g) = gate {
        if !g.wait(root) {
            // Every stub is killed as `held` drops.
            return Err(RestoreError::Abandoned);
        }
    }
    let mut let_go: Vec<i32> = Vec::new();
    // Children first, so none is still a stub when its parent runs.
    for (stub, tids) in held {
        match stub.release(&tids) {
            Ok(pid) => let_go.push(pid),
            Err(e) => {
                // Nothing half restored runs: what was let go dies too (the
                // stubs left are killed as they are dropped).
                for pid in let_go {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(e.into());
            }
        }
    }
    tracing::info!(
        pid = root,
        processes = procs.len(),
        "restored a process tree"
    );
    Ok(root)
}

/// Restores a session of the disk store in `dir`: `session`, or the only or
/// newest session that holds a process state.
pub fn restore_from_images_dir(dir: &Path, session: Option<SessionId>) -> Result<i32> {
    let (tree, img) = load_images_dir(dir, session)?;
    restore(&tree, &img)
}

/// [`restore_from_images_dir`] with `--keep-pids` ([`restore_keeping_pids`]).
pub fn restore_from_images_dir_keeping_pids(
    dir: &Path,
    session: Option<SessionId>,
) -> Result<Kept> {
    let (tree, img) = load_images_dir(dir, session)?;
    restore_keeping_pids(&tree, &img)
}

fn load_images_dir(dir: &Path, session: Option<SessionId>) -> Result<(pb::ProcessTree, FlatImage)> {
    let store = DiskStore::open(dir)?;
    let id = match session {
        Some(id) => id,
        None => {
            let mut best: Option<(i64, SessionId)> = None;
            for s in store.list()?.into_iter().filter(|s| s.has_state) {
                let created = store.open(s.id)?.meta().created_unix_ms;
                if best.is_none_or(|b| created >= b.0) {
                    best = Some((created, s.id));
                }
            }
            best.map(|b| b.1).ok_or_else(|| {
                RestoreError::NoSession(format!(
                    "no session with a process state in {}",
                    dir.display()
                ))
            })?
        }
    };
    let session = store.open(id)?;
    let tree = session
        .state()?
        .ok_or_else(|| RestoreError::NoSession(format!("session {id} has no process state")))?;
    let img = session.flatten()?;
    drop(session);
    Ok((tree, img))
}

/// The registers to resume with: an interrupted syscall is rewound so it is
/// made again (the kernel's restart logic is not run for the new process).
pub fn resume_regs(t: &pb::Thread) -> Result<user_regs_struct> {
    let mut r = stub::regs_from_bytes(&t.gpregs)?;
    if r.fs_base == 0 {
        r.fs_base = t.fs_base;
    }
    if r.gs_base == 0 {
        r.gs_base = t.gs_base;
    }
    if (r.orig_rax as i64) >= 0 {
        match -(r.rax as i64) {
            512..=514 => {
                // ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND.
                r.rax = r.orig_rax;
                r.rip = r.rip.wrapping_sub(2);
            }
            // ERESTART_RESTARTBLOCK: the restart block stayed with the
            // source; the caller sees EINTR (nanosleep & co. handle it).
            516 => r.rax = (-libc::EINTR) as u64,
            _ => {}
        }
    }
    r.orig_rax = u64::MAX;
    Ok(r)
}

/// One past the last byte of `run` (saturating: a corrupt count must not
/// panic; the data length check refuses it later).
fn run_end(run: &ferry_page_server::store::FlatRun, ps: u64) -> u64 {
    run.addr.saturating_add(run.pages.saturating_mul(ps))
}

/// Picks `len` bytes far from every busy range, below the usual mmap area.
fn pick_gadget(busy: &mut [(u64, u64)], len: u64) -> Option<u64> {
    busy.sort_unstable();
    let mut at = 1u64 << 32;
    for &(s, e) in busy.iter() {
        if at + len + GADGET_MARGIN <= s {
            return Some(at);
        }
        at = at.max(e + GADGET_MARGIN);
    }
    (at + len <= USER_ADDR_END).then_some(at)
}

/// How a range is mapped; a range whose key changes between layers is
/// mapped afresh (its old contents do not belong to the new mapping).
#[derive(Debug, Clone, PartialEq, Eq)]
struct MapKey {
    /// `None` for anonymous memory.
    file: Option<FileKey>,
    shared: bool,
    /// `MAP_GROWSDOWN` and `MAP_NORESERVE`.
    flags: i32,
    /// Shared file mappings keep the image's protection while mapped (their
    /// contents live in the file); everything else is mapped read-write
    /// and gets its protection at the end.
    prot: Option<u32>,
    /// A tree's shared memory object, mapped from ferry's fd of it (with
    /// the image's protection: it is filled through that fd).
    shm: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileKey {
    path: String,
    /// File offset minus address: equal for two ranges of one mapping.
    base: u64,
    /// Opened read-write (writable shared mappings).
    rw: bool,
}

/// The protection of everything but shared file mappings until the end.
const WARM_PROT: u32 = (libc::PROT_READ | libc::PROT_WRITE) as u32;

fn map_key(v: &pb::Vma) -> Result<MapKey> {
    let shared = is_shared(v);
    let file = if is_file(v) {
        let f = v
            .file
            .as_ref()
            .ok_or_else(|| RestoreError::Missing(format!("file of {:#x}", v.start)))?;
        Some(FileKey {
            path: f.path.clone(),
            base: v.offset.wrapping_sub(v.start),
            rw: shared && v.prot & libc::PROT_WRITE as u32 != 0,
        })
    } else {
        None
    };
    let mut flags = v.flags as i32 & (libc::MAP_GROWSDOWN | libc::MAP_NORESERVE);
    if v.kind() == pb::VmaKind::Stack {
        flags |= libc::MAP_GROWSDOWN;
    }
    let prot = (shared && file.is_some()).then_some(v.prot);
    Ok(MapKey {
        file,
        shared,
        flags,
        prot,
        shm: None,
    })
}

/// What the stub has mapped of the image, ascending.
struct Mapped {
    start: u64,
    end: u64,
    key: MapKey,
}

/// Zero runs up to this size are written as zeros (one vectored write for
/// many); longer ones are dropped with `MADV_DONTNEED` (one injected call).
const ZERO_WRITE_MAX: u64 = 64 << 10;

struct Restorer {
    stub: Stub,
    gadget: u64,
    data: u64,
    /// The last layer's mappings.
    vmas: Vec<pb::Vma>,
    mapped: Vec<Mapped>,
    /// Restored TCP connections, in repair mode until the very end.
    repaired: Vec<(i32, pb::Socket)>,
    /// Pipes of a tree shared between processes: pipe id → ferry's own
    /// (read end, write end), each process takes its ends from there.
    shared_pipes: HashMap<u64, (i32, i32)>,
    /// Shared memory objects of a tree (see [`crate::shmem`]): object →
    /// ferry's fd of it, mapped from there.
    shm: HashMap<crate::shmem::ShmKey, i32>,
    /// This process's memfd descriptors of those objects: fd → ferry's fd.
    shm_fds: HashMap<i32, i32>,
    /// `--keep-pids`: the stub lives in a pid namespace of its own and its
    /// threads get their tids from the image.
    keep_pids: bool,
}

impl Restorer {
    /// Stub, gadget, and an empty address space, with the gadget far from
    /// the first layer's mappings.
    fn new(vmas: &[pb::Vma]) -> Result<Restorer> {
        Restorer::new_with(vmas, Birth::Here)
    }

    /// [`Restorer::new`] with the stub born as `birth` says.
    fn new_with(vmas: &[pb::Vma], birth: Birth) -> Result<Restorer> {
        let stub = Stub::spawn_with(birth)?;
        failpoint("stub")?; // failpoint (test only)
        let mut r = Restorer {
            stub,
            gadget: 0,
            data: 0,
            vmas: Vec::new(),
            mapped: Vec::new(),
            repaired: Vec::new(),
            shared_pipes: HashMap::new(),
            shm: HashMap::new(),
            shm_fds: HashMap::new(),
            keep_pids: !matches!(birth, Birth::Here),
        };
        r.gadget(vmas)?;
        r.empty_stub()?;
        Ok(r)
    }

    /// Thread and process state on top of the laid layers, then resume;
    /// with `lazy` ranges, those are left missing (see [`Warm::finish_lazy`]).
    /// With a `gate`, the process is held prepared there until its verdict
    /// (see [`crate::readygo`]); abandoned, it is killed as `self` drops.
    fn finish(
        mut self,
        p: &pb::Process,
        lazy: &[(u64, u64)],
        gate: Option<Gate>,
    ) -> Result<(i32, Option<Missing>)> {
        let t0 = std::time::Instant::now();
        let (all, missing) = self.prepare(p, lazy)?;
        let threads = all.len();
        self.stub.set_final(&all)?;
        if let Some(g) = gate {
            if !g.wait(self.stub.pid()) {
                return Err(RestoreError::Abandoned);
            }
        }
        let tids: Vec<i32> = all.iter().map(|t| t.tid).collect();
        let pid = self.stub.release(&tids)?;
        tracing::info!(
            pid,
            source_pid = p.pid,
            threads,
            state_ms = t0.elapsed().as_secs_f64() * 1e3,
            lazy_ranges = lazy.len(),
            "restored"
        );
        Ok((pid, missing))
    }

    /// Everything of [`Restorer::finish`] but letting the process go: the
    /// final state of each thread, to hand to [`Stub::resume_all`], and the
    /// userfaultfd of the `lazy` ranges if there are any.
    fn prepare<'p>(
        &mut self,
        p: &'p pb::Process,
        lazy: &[(u64, u64)],
    ) -> Result<(Vec<stub::Resume<'p>>, Option<Missing>)> {
        self.protections()?;
        self.clocks(p)?;
        failpoint("vdso")?; // failpoint (test only)
        self.vdso()?;
        failpoint("mm")?; // failpoint (test only)
        self.mm(p)?;
        failpoint("files")?; // failpoint (test only)
        self.files(p)?;
        failpoint("signals")?; // failpoint (test only)
        self.signals(p)?;
        failpoint("threads")?; // failpoint (test only)
        let tids = self.threads(p)?;
        self.thread_state(p)?;
        self.timers(p, &tids)?;
        self.leave_repair()?;
        // After the files: the userfaultfd takes the lowest free fd number
        // for a moment, which must not be one of the image's.
        let missing = if lazy.is_empty() {
            None
        } else {
            Some(self.lazy(lazy)?)
        };
        // While every thread is still privileged (installing a filter
        // takes CAP_SYS_ADMIN or no_new_privs).
        self.seccomp(p, &tids)?;
        // While the threads are still ferry's user's: another user's
        // would take CAP_SYS_NICE, which a page server may not hold.
        sched(p, &tids)?;
        // The last privileged step: after it the process may be another
        // user's, which ferry can no longer write into.
        self.creds(p, &tids)?;
        failpoint("creds")?; // failpoint (test only)
        if p.mdwe != 0 {
            // Sticky, and it refuses making memory executable: only once
            // every mapping is in place (a tree's children are forked
            // before, and would inherit it).
            self.call(
                format!("prctl(PR_SET_MDWE, {:#x})", p.mdwe),
                libc::SYS_prctl,
                [PR_SET_MDWE, u64::from(p.mdwe), 0, 0, 0, 0],
            )?;
        }
        // After the credentials, whose change clears it.
        for (t, &tid) in p
            .threads
            .iter()
            .zip(&tids)
            .filter(|(t, _)| t.pdeathsig != 0)
        {
            let ret = self.stub.syscall_in(
                tid,
                libc::SYS_prctl,
                [
                    libc::PR_SET_PDEATHSIG as u64,
                    t.pdeathsig as u64,
                    0,
                    0,
                    0,
                    0,
                ],
            )?;
            if (-4095..0).contains(&ret) {
                return Err(RestoreError::Syscall {
                    step: format!(
                        "prctl(PR_SET_PDEATHSIG, {}) in thread {}",
                        t.pdeathsig, t.tid
                    ),
                    errno: Errno::from_raw(-ret as i32),
                });
            }
        }
        // Last injection: unmap the gadget from inside it. The stub stays in
        // that syscall's exit stop, its rip in the unmapped page, until the
        // final registers replace it.
        let (g, len) = (
            self.gadget,
            (GADGET_CODE_PAGES + GADGET_DATA_PAGES) * page_size(),
        );
        self.call(
            "munmap of the gadget",
            libc::SYS_munmap,
            [g, len, 0, 0, 0, 0],
        )?;
        let regs = p
            .threads
            .iter()
            .map(resume_regs)
            .collect::<Result<Vec<_>>>()?;
        let all: Vec<stub::Resume<'_>> = p
            .threads
            .iter()
            .zip(&tids)
            .zip(regs)
            .map(|((t, &tid), regs)| stub::Resume {
                tid,
                regs,
                xstate: &t.xstate,
                sigmask: t.sigmask,
            })
            .collect();
        failpoint("registers")?; // failpoint (test only)
        Ok((all, missing))
    }

    /// Drops the stale copies of the lazy ranges (`MADV_DONTNEED` makes
    /// anonymous private pages missing) and registers every mapping that
    /// holds one with a userfaultfd made inside the process, in MISSING
    /// mode. Whole mappings are registered, which splits none: their other
    /// pages are present and never fault, and a never-touched page there
    /// faults once and gets a zero page from the server.
    fn lazy(&mut self, lazy: &[(u64, u64)]) -> Result<Missing> {
        let mut hulls: Vec<(u64, u64)> = Vec::new();
        for &(s, e) in lazy {
            let v = self
                .vmas
                .iter()
                .find(|v| v.start <= s && e <= v.end)
                .ok_or_else(|| {
                    RestoreError::Lazy(format!(
                        "{s:#x}-{e:#x} is not inside one mapping of the image"
                    ))
                })?;
            if !lazy_eligible(v) {
                return Err(RestoreError::Lazy(format!(
                    "{s:#x}-{e:#x} lies in {} ({:?}), not anonymous private memory",
                    if v.name.is_empty() {
                        "a mapping"
                    } else {
                        &v.name
                    },
                    v.kind()
                )));
            }
            if hulls.last() != Some(&(v.start, v.end)) {
                hulls.push((v.start, v.end));
            }
        }
        let mut drops = lazy.to_vec();
        normalize(&mut drops);
        self.drop_pages(&drops)?;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let fd = self.call(
            "userfaultfd()",
            libc::SYS_userfaultfd,
            [flags, 0, 0, 0, 0, 0],
        )?;
        let adopted = Missing::adopt(self.stub.pid(), fd as i32);
        self.call(
            "close of the process's userfaultfd",
            libc::SYS_close,
            [fd, 0, 0, 0, 0, 0],
        )?;
        let missing = adopted?;
        normalize(&mut hulls);
        for (a, b) in hulls {
            missing.register(a, b)?;
        }
        Ok(missing)
    }

    fn stub_maps(&self) -> Result<Vec<MapEntry>> {
        procfs::read_maps(self.stub.pid()).map_err(|source| RestoreError::Proc {
            what: format!("/proc/{}/maps", self.stub.pid()),
            source,
        })
    }

    /// Injects a syscall; a negative result is an error naming `step`.
    fn call(&mut self, step: impl AsRef<str>, nr: libc::c_long, args: [u64; 6]) -> Result<u64> {
        let ret = self.stub.syscall(nr, args)?;
        tracing::trace!(step = step.as_ref(), ret, "injected");
        if (-4095..0).contains(&ret) {
            return Err(RestoreError::Syscall {
                step: step.as_ref().to_string(),
                errno: Errno::from_raw(-ret as i32),
            });
        }
        Ok(ret as u64)
    }

    /// Copies `bytes` into the gadget's data area at `off`; their address.
    fn put(&self, off: u64, bytes: &[u8], what: &str) -> Result<u64> {
        let addr = self.data + off;
        self.stub
            .write(addr, bytes)
            .map_err(|source| RestoreError::Write {
                what: what.to_string(),
                source,
            })?;
        Ok(addr)
    }

    /// A NUL-terminated path in the data area.
    fn put_path(&self, path: &str) -> Result<u64> {
        let max = (GADGET_DATA_PAGES * page_size()) as usize - 1;
        if path.len() > max || path.contains('\0') {
            return Err(unsupported(format!("path {path:?}")));
        }
        let mut b = Vec::with_capacity(path.len() + 1);
        b.extend_from_slice(path.as_bytes());
        b.push(0);
        self.put(0, &b, path)
    }

    fn gadget(&mut self, vmas: &[pb::Vma]) -> Result<()> {
        let ps = page_size();
        let len = (GADGET_CODE_PAGES + GADGET_DATA_PAGES) * ps;
        let mut busy: Vec<(u64, u64)> = vmas.iter().map(|v| (v.start, v.end)).collect();
        busy.extend(self.stub_maps()?.iter().map(|m| (m.start, m.end)));
        let at = pick_gadget(&mut busy, len)
            .ok_or_else(|| unsupported("an address space with no room for the restore gadget"))?;
        let sc = self.stub.vdso_syscall()?;
        self.stub.set_syscall_at(sc);
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let got = self.call(
            format!("mmap of the gadget at {at:#x}"),
            libc::SYS_mmap,
            [at, len, rw, flags as u64, u64::MAX, 0],
        )?;
        if got != at {
            return Err(RestoreError::Syscall {
                step: format!("mmap of the gadget at {at:#x} (got {got:#x})"),
                errno: Errno::EEXIST,
            });
        }
        self.stub
            .write(at, &GADGET_CODE)
            .map_err(|source| RestoreError::Write {
                what: "the gadget".into(),
                source,
            })?;
        let rx = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        self.call(
            "mprotect of the gadget",
            libc::SYS_mprotect,
            [at, GADGET_CODE_PAGES * ps, rx, 0, 0, 0],
        )?;
        self.gadget = at;
        self.data = at + GADGET_CODE_PAGES * ps;
        self.stub.set_syscall_at(at);
        Ok(())
    }

    /// Drops what the stub inherited from ferry, then its whole address
    /// space but the gadget.
    fn empty_stub(&mut self) -> Result<()> {
        if let Some(rs) = self.stub.rseq()? {
            let args = [
                rs.addr,
                rs.len as u64,
                RSEQ_FLAG_UNREGISTER,
                rs.signature as u64,
                0,
                0,
            ];
            self.call("rseq unregistration of the stub", libc::SYS_rseq, args)?;
        }
        // stack_t { ss_sp, ss_flags, ss_size }: disable the inherited one.
        let mut ss = [0u8; 24];
        ss[8..12].copy_from_slice(&libc::SS_DISABLE.to_ne_bytes());
        let at = self.put(0, &ss, "stack_t")?;
        self.call(
            "sigaltstack(SS_DISABLE)",
            libc::SYS_sigaltstack,
            [at, 0, 0, 0, 0, 0],
        )?;
        self.call(
            "close_range of the stub's fds",
            libc::SYS_close_range,
            [0, u32::MAX as u64, 0, 0, 0, 0],
        )?;
        let end = self.gadget + (GADGET_CODE_PAGES + GADGET_DATA_PAGES) * page_size();
        self.call(
            "munmap below the gadget",
            libc::SYS_munmap,
            [0, self.gadget, 0, 0, 0, 0],
        )?;
        self.call(
            "munmap above the gadget",
            libc::SYS_munmap,
            [end, USER_ADDR_END - end, 0, 0, 0, 0],
        )?;
        let left: Vec<String> = self
            .stub_maps()?
            .iter()
            .filter(|m| !(m.start >= self.gadget && m.end <= end) && m.start < USER_ADDR_END)
            .map(|m| {
                format!(
                    "{:#x}-{:#x} {}",
                    m.start,
                    m.end,
                    m.path.as_deref().unwrap_or("")
                )
            })
            .collect();
        if !left.is_empty() {
            return Err(RestoreError::Syscall {
                step: format!("emptying the stub: still mapped: {}", left.join(", ")),
                errno: Errno::EBUSY,
            });
        }
        Ok(())
    }

    /// Opens `path` in the stub and checks size and mtime on that fd.
    fn open_checked(&mut self, path: &str, flags: i32, want: Option<&pb::FileRef>) -> Result<u64> {
        let at = self.put_path(path)?;
        let fd = self.call(
            format!("open of {path}"),
            libc::SYS_openat,
            [
                libc::AT_FDCWD as u64,
                at,
                (flags | libc::O_CLOEXEC) as u64,
                0,
                0,
                0,
            ],
        )?;
        if let Some(f) = want {
            // struct stat is written past the path; x86_64 layout:
            // st_size at 48, st_mtime at 88, st_mtime_nsec at 96.
            let off = 4096;
            let st = self.data + off;
            self.call(
                format!("fstat of {path}"),
                libc::SYS_fstat,
                [fd, st, 0, 0, 0, 0],
            )?;
            let mut b = [0u8; 144];
            self.stub
                .read(st, &mut b)
                .map_err(|source| RestoreError::Write {
                    what: format!("(reading back) the stat of {path}"),
                    source,
                })?;
            let word = |o: usize| i64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
            let (size, mtime) = (
                word(48) as u64,
                word(88)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(word(96)),
            );
            if size != f.size || mtime != f.mtime_ns {
                return Err(RestoreError::File {
                    path: path.to_string(),
                    what: format!(
                        "changed since the check: size {size} (source {}), mtime {mtime} ns (source {})",
                        f.size, f.mtime_ns
                    ),
                });
            }
        }
        Ok(fd)
    }

    /// Lays one layer over what is mapped: see [`Warm`].
    fn apply(&mut self, layer: &FlatImage) -> Result<()> {
        let ps = page_size();
        let vmas: Vec<&pb::Vma> = layer.vmas.iter().filter(|v| !is_special(v)).collect();
        let gadget_end = self.gadget + (GADGET_CODE_PAGES + GADGET_DATA_PAGES) * ps;
        if let Some(v) = vmas
            .iter()
            .find(|v| v.start < gadget_end && self.gadget < v.end)
        {
            return Err(unsupported(format!(
                "a mapping at {:#x}-{:#x} over the restore gadget (laid at {:#x} for the first round)",
                v.start, v.end, self.gadget
            )));
        }
        let keys = vmas
            .iter()
            .map(|v| {
                let mut k = map_key(v)?;
                if let Some(&fd) = self.shm_of(v) {
                    k.file = None;
                    k.prot = Some(v.prot);
                    k.shm = Some(fd);
                }
                Ok(k)
            })
            .collect::<Result<Vec<_>>>()?;
        // Per VMA: the parts mapped already with the same key keep their
        // contents; the rest is mapped fresh.
        let mut fresh: Vec<(usize, u64, u64)> = Vec::new();
        let mut kept: Vec<(u64, u64)> = Vec::new();
        for (i, v) in vmas.iter().enumerate() {
            let same: Vec<(u64, u64)> = self
                .mapped
                .iter()
                .filter(|m| m.key == keys[i] && m.start < v.end && v.start < m.end)
                .map(|m| (m.start, m.end))
                .collect();
            let k = intersect(&[(v.start, v.end)], &same);
            fresh.extend(
                subtract(&[(v.start, v.end)], &k)
                    .into_iter()
                    .map(|(a, b)| (i, a, b)),
            );
            kept.extend(k);
        }
        normalize(&mut kept);
        let mut now: Vec<(u64, u64)> = vmas.iter().map(|v| (v.start, v.end)).collect();
        normalize(&mut now);
        let mut before: Vec<(u64, u64)> = self.mapped.iter().map(|m| (m.start, m.end)).collect();
        normalize(&mut before);
        for (a, b) in subtract(&before, &now) {
            self.call(
                format!("munmap of {a:#x}-{b:#x} (gone since the last round)"),
                libc::SYS_munmap,
                [a, b - a, 0, 0, 0, 0],
            )?;
        }
        let mut fds: HashMap<(String, bool), u64> = HashMap::new();
        let mapped = self.map_fresh(&vmas, &keys, &fresh, &mut fds);
        for ((path, _), fd) in fds {
            self.call(
                format!("close of {path}"),
                libc::SYS_close,
                [fd, 0, 0, 0, 0, 0],
            )?;
        }
        mapped?;
        self.mapped = vmas
            .iter()
            .zip(keys)
            .map(|(v, key)| Mapped {
                start: v.start,
                end: v.end,
                key,
            })
            .collect();
        self.vmas = layer.vmas.clone();
        failpoint("memory")?; // failpoint (test only): mapped, pages not written
        self.contents(layer, &vmas, &kept)
    }

    fn map_fresh(
        &mut self,
        vmas: &[&pb::Vma],
        keys: &[MapKey],
        fresh: &[(usize, u64, u64)],
        fds: &mut HashMap<(String, bool), u64>,
    ) -> Result<()> {
        for &(i, a, b) in fresh {
            let (v, key) = (vmas[i], &keys[i]);
            let mut flags = key.flags
                | libc::MAP_FIXED
                | if key.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
            let (fd, offset, what) = match (&key.file, key.shm) {
                (_, Some(ours)) => {
                    let name = format!("shared memory object (ferry fd {ours})");
                    let fd = match fds.get(&(name.clone(), true)) {
                        Some(&fd) => fd,
                        None => {
                            let fd = self.take_from_ferry(ours, libc::O_RDWR, &name)?;
                            fds.insert((name.clone(), true), fd);
                            fd
                        }
                    };
                    let what = if v.name.is_empty() {
                        "shared memory".to_string()
                    } else {
                        v.name.clone()
                    };
                    (fd, v.offset + (a - v.start), what)
                }
                (Some(f), None) => {
                    let fd = match fds.get(&(f.path.clone(), f.rw)) {
                        Some(&fd) => fd,
                        None => {
                            let mode = if f.rw { libc::O_RDWR } else { libc::O_RDONLY };
                            let fd = self.open_checked(&f.path, mode, v.file.as_ref())?;
                            fds.insert((f.path.clone(), f.rw), fd);
                            fd
                        }
                    };
                    (fd, v.offset + (a - v.start), f.path.clone())
                }
                (None, None) => {
                    flags |= libc::MAP_ANONYMOUS;
                    let what = if v.name.is_empty() {
                        "anonymous memory".to_string()
                    } else {
                        v.name.clone()
                    };
                    (u64::MAX, 0, what)
                }
            };
            let prot = key.prot.unwrap_or(WARM_PROT);
            let step = format!("mmap of {what} at {a:#x}-{b:#x}");
            let got = self.call(
                &step,
                libc::SYS_mmap,
                [a, b - a, prot as u64, flags as u64, fd, offset],
            )?;
            if got != a {
                return Err(RestoreError::Syscall {
                    step: format!("{step} (landed at {got:#x})"),
                    errno: Errno::EFAULT,
                });
            }
        }
        Ok(())
    }

    /// Writes a layer's pages. Data go everywhere but into shared file
    /// mappings (their contents live in the file). A zero run matters where
    /// the range held something before: in private file mappings (the
    /// file's bytes) and in anonymous memory kept from an earlier layer.
    fn contents(
        &mut self,
        layer: &FlatImage,
        vmas: &[&pb::Vma],
        kept: &[(u64, u64)],
    ) -> Result<()> {
        let ps = page_size();
        let mut zero_writes: Vec<(u64, u64)> = Vec::new();
        let mut drops: Vec<(u64, u64)> = Vec::new();
        for run in &layer.runs {
            let (s, e) = (run.addr, run_end(run, ps));
            let first = vmas.partition_point(|v| v.end <= s);
            for v in vmas[first..].iter().take_while(|v| v.start < e) {
                let (a, b) = (s.max(v.start), e.min(v.end));
                // A tree's shared memory object was filled in ferry.
                if a >= b || (is_file(v) && is_shared(v)) || self.shm_of(v).is_some() {
                    continue;
                }
                match &run.data {
                    Some(d) => {
                        let bytes = d.get((a - s) as usize..(b - s) as usize).ok_or_else(|| {
                            RestoreError::Missing(format!("data for the run at {s:#x} (short)"))
                        })?;
                        self.stub
                            .write(a, bytes)
                            .map_err(|source| RestoreError::Write {
                                what: format!("{} pages at {a:#x} ({})", (b - a) / ps, v.name),
                                source,
                            })?;
                    }
                    None if is_file(v) => zero_writes.push((a, b)),
                    None => {
                        for (x, y) in intersect(&[(a, b)], kept) {
                            // MADV_DONTNEED zeroes private memory only.
                            if y - x <= ZERO_WRITE_MAX || is_shared(v) {
                                zero_writes.push((x, y));
                            } else {
                                drops.push((x, y));
                            }
                        }
                    }
                }
            }
        }
        let zeros = vec![0u8; (256 * ps) as usize];
        for (a, b) in zero_writes {
            let mut at = a;
            while at < b {
                let n = (b - at).min(zeros.len() as u64);
                self.stub
                    .write(at, &zeros[..n as usize])
                    .map_err(|source| RestoreError::Write {
                        what: format!("zero pages at {at:#x}"),
                        source,
                    })?;
                at += n;
            }
        }
        for (a, b) in drops {
            self.call(
                format!("madvise(MADV_DONTNEED) of the zero run {a:#x}-{b:#x}"),
                libc::SYS_madvise,
                [a, b - a, libc::MADV_DONTNEED as u64, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// `MADV_DONTNEED` on every range, all of it frozen time: batched, up
    /// to `IOV_MAX` ranges per injected `process_madvise` on the process
    /// itself (any advice is allowed on oneself since Linux 6.13), or one
    /// `madvise` per range where that is refused.
    fn drop_pages(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        const IOV_MAX: usize = 1024;
        let room = (GADGET_DATA_PAGES * page_size()) as usize / 16;
        let per_call = IOV_MAX.min(room);
        let pid = self.stub.pid() as u64;
        let pidfd = self.call(
            "pidfd_open of itself",
            libc::SYS_pidfd_open,
            [pid, 0, 0, 0, 0, 0],
        );
        let mut left = ranges;
        if let Ok(pidfd) = pidfd {
            while !left.is_empty() {
                let (chunk, rest) = left.split_at(left.len().min(per_call));
                let mut iov = Vec::with_capacity(chunk.len() * 16);
                for &(a, b) in chunk {
                    iov.extend_from_slice(&a.to_ne_bytes());
                    iov.extend_from_slice(&(b - a).to_ne_bytes());
                }
                let at = self.put(0, &iov, "the lazy ranges")?;
                let want: u64 = chunk.iter().map(|(a, b)| b - a).sum();
                let args = [
                    pidfd,
                    at,
                    chunk.len() as u64,
                    libc::MADV_DONTNEED as u64,
                    0,
                    0,
                ];
                let ret = self.stub.syscall(libc::SYS_process_madvise, args)?;
                if ret as u64 != want {
                    tracing::debug!(ret, "process_madvise on itself refused; madvise per range");
                    break;
                }
                left = rest;
            }
            self.call(
                "close of its pidfd",
                libc::SYS_close,
                [pidfd, 0, 0, 0, 0, 0],
            )?;
        }
        for &(a, b) in left {
            self.call(
                format!("madvise(MADV_DONTNEED) of the lazy range {a:#x}-{b:#x}"),
                libc::SYS_madvise,
                [a, b - a, libc::MADV_DONTNEED as u64, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// Gives every mapping that was read-write while being filled the
    /// image's protection.
    fn protections(&mut self) -> Result<()> {
        let todo: Vec<(u64, u64, u32, String)> = self
            .vmas
            .iter()
            .filter(|v| !(is_special(v) || is_file(v) && is_shared(v)) && v.prot != WARM_PROT)
            .filter(|v| self.shm_of(v).is_none())
            .map(|v| (v.start, v.end, v.prot, v.name.clone()))
            .collect();
        for (a, b, prot, name) in todo {
            self.call(
                format!("mprotect of {name} at {a:#x}"),
                libc::SYS_mprotect,
                [a, b - a, prot as u64, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    fn vdso(&mut self) -> Result<()> {
        let want = image_vdso_layout(&self.vmas);
        let Some(vvar) = self.vmas.iter().find(|v| v.name == "[vvar]") else {
            return Ok(());
        };
        let vvar_start = vvar.start;
        self.call(
            format!("arch_prctl(ARCH_MAP_VDSO_64, {vvar_start:#x})"),
            libc::SYS_arch_prctl,
            [ARCH_MAP_VDSO_64, vvar_start, 0, 0, 0, 0],
        )?;
        let maps = self.stub_maps()?;
        let got = vdso_layout(
            maps.iter()
                .map(|m| (m.path.as_deref().unwrap_or(""), m.start, m.end)),
        );
        let got_start = maps
            .iter()
            .find(|m| m.path.as_deref() == Some("[vvar]"))
            .map(|m| m.start);
        if got != want || got_start != Some(vvar_start) {
            return Err(RestoreError::Vdso(format!(
                "asked for the block at {vvar_start:#x}, the kernel placed it at {got_start:x?} as {got:?}"
            )));
        }
        Ok(())
    }

    fn mm(&mut self, p: &pb::Process) -> Result<()> {
        let mm =
            p.mm.as_ref()
                .ok_or_else(|| RestoreError::Missing("mm fields".into()))?;
        let exe_fd = if mm.exe.is_empty() || same_file(&mm.exe, "/proc/self/exe") {
            // The stub was forked from ferry, so its exe is ferry's. When
            // the image's exe is that very file (a migrated ferry workload)
            // it is also mapped again by now, and the kernel refuses to
            // replace an exe that is still mapped (EBUSY): it is already
            // the right one, so leave it.
            u64::from(u32::MAX)
        } else {
            self.open_checked(&mm.exe, libc::O_RDONLY, None)?
        };
        let auxv = self.put(1024, &mm.auxv, "auxv")?;
        let mut m = Vec::with_capacity(PRCTL_MM_MAP_SIZE);
        for f in [
            mm.start_code,
            mm.end_code,
            mm.start_data,
            mm.end_data,
            mm.start_brk,
            mm.brk.max(mm.start_brk),
            mm.start_stack,
            mm.arg_start,
            mm.arg_end,
            mm.env_start,
            mm.env_end,
            auxv,
        ] {
            m.extend_from_slice(&f.to_ne_bytes());
        }
        m.extend_from_slice(&(mm.auxv.len() as u32).to_ne_bytes());
        m.extend_from_slice(&(exe_fd as u32).to_ne_bytes());
        let at = self.put(0, &m, "struct prctl_mm_map")?;
        self.call(
            format!("prctl(PR_SET_MM_MAP) with exe {}", mm.exe),
            libc::SYS_prctl,
            [PR_SET_MM, PR_SET_MM_MAP, at, PRCTL_MM_MAP_SIZE as u64, 0, 0],
        )?;
        if exe_fd != u64::from(u32::MAX) {
            self.call(
                "close of the exe fd",
                libc::SYS_close,
                [exe_fd, 0, 0, 0, 0, 0],
            )?;
        }
        if !p.comm.is_empty() {
            let mut name = [0u8; 16];
            let n = p.comm.len().min(15);
            name[..n].copy_from_slice(&p.comm.as_bytes()[..n]);
            let at = self.put(0, &name, "comm")?;
            self.call(
                "prctl(PR_SET_NAME)",
                libc::SYS_prctl,
                [PR_SET_NAME, at, 0, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// Every descriptor of the image, at its number. Pipes and FIFOs are
    /// made per pipe (all its fds at once, its bytes written back before
    /// the status flags are set); epolls last, once what they watch exists.
    fn files(&mut self, p: &pb::Process) -> Result<()> {
        let mut fds: Vec<&pb::FileDesc> = p.fds.iter().collect();
        fds.sort_by_key(|f| f.fd);
        // Helper fds live above every fd of the image, so placing one of
        // the image's never closes them.
        let above = fds.last().map_or(0, |f| f.fd as u64 + 1);
        let mut pipes_done = std::collections::HashSet::new();
        for &f in &fds {
            match f.kind() {
                pb::FdKind::Pipe if self.shared_pipes.contains_key(&f.pipe_id) => {
                    self.take_shared_pipe_end(f)?;
                }
                pb::FdKind::Pipe | pb::FdKind::Fifo => {
                    if pipes_done.insert((f.kind, f.pipe_id)) {
                        let group: Vec<&pb::FileDesc> = fds
                            .iter()
                            .copied()
                            .filter(|g| g.kind == f.kind && g.pipe_id == f.pipe_id)
                            .collect();
                        self.pipe(&group, above)?;
                    }
                }
                pb::FdKind::Epoll => {}
                pb::FdKind::Eventfd => self.eventfd(f)?,
                pb::FdKind::Timerfd => self.timerfd(f)?,
                pb::FdKind::Signalfd => {
                    let at = self.put(0, &f.sigmask.to_le_bytes(), "a signalfd mask")?;
                    let flags = f.flags & libc::O_NONBLOCK as u32;
                    let fd = self.call(
                        format!("signalfd4 for fd {}", f.fd),
                        libc::SYS_signalfd4,
                        [u64::MAX, at, 8, flags as u64, 0, 0],
                    )?;
                    self.place(fd, f)?;
                }
                pb::FdKind::Memfd if self.shm_fds.contains_key(&f.fd) => self.shared_memfd(f)?,
                pb::FdKind::Memfd | pb::FdKind::Deleted => self.unlinked(f, above)?,
                pb::FdKind::TcpListen | pb::FdKind::TcpEstablished | pb::FdKind::UnixListen => {
                    self.socket(f, above)?
                }
                pb::FdKind::UnixPair => {
                    let s = f
                        .socket
                        .as_ref()
                        .ok_or_else(|| RestoreError::Missing(format!("socket of fd {}", f.fd)))?;
                    // The pair is made once, at its lower fd.
                    if let Some(peer) = fds.iter().copied().find(|g| {
                        g.kind() == pb::FdKind::UnixPair
                            && g.socket.as_ref().is_some_and(|t| t.ino == s.peer_ino)
                    }) {
                        if f.fd < peer.fd {
                            self.unix_pair(f, peer, above)?;
                        }
                    }
                }
                _ => self.open_path(f)?,
            }
        }
        let epolls: Vec<&pb::FileDesc> = fds
            .iter()
            .copied()
            .filter(|f| f.kind() == pb::FdKind::Epoll)
            .collect();
        // All of them before any registration: an epoll may watch another.
        for &f in &epolls {
            let fd = self.call(
                format!("epoll_create1 for fd {}", f.fd),
                libc::SYS_epoll_create1,
                [0; 6],
            )?;
            self.place(fd, f)?;
        }
        for &f in &epolls {
            for t in &f.epoll_targets {
                // struct epoll_event is packed on x86_64: events, then data.
                let mut ev = [0u8; 12];
                ev[..4].copy_from_slice(&t.events.to_le_bytes());
                ev[4..].copy_from_slice(&t.data.to_le_bytes());
                let at = self.put(0, &ev, "an epoll_event")?;
                self.call(
                    format!("epoll_ctl(ADD) of fd {} to epoll fd {}", t.fd, f.fd),
                    libc::SYS_epoll_ctl,
                    [
                        f.fd as u64,
                        libc::EPOLL_CTL_ADD as u64,
                        t.fd as u64,
                        at,
                        0,
                        0,
                    ],
                )?;
            }
        }
        if !p.cwd.is_empty() {
            let at = self.put_path(&p.cwd)?;
            self.call(
                format!("chdir to {}", p.cwd),
                libc::SYS_chdir,
                [at, 0, 0, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// A new socket in the stub, of the image's family and type, above
    /// every fd of the image; with a copy of it in ferry. The socket is
    /// made by the stub, so it belongs to the stub's network namespace;
    /// the rest (options, bind, listen, TCP repair, queue contents) goes
    /// through ferry's copy, the same socket, as pipe bytes do: megabytes
    /// of queue need no trip through the gadget's data area.
    fn new_socket(&mut self, f: &pb::FileDesc, above: u64) -> Result<(u64, std::os::fd::OwnedFd)> {
        let s = f
            .socket
            .as_ref()
            .ok_or_else(|| RestoreError::Missing(format!("socket of fd {}", f.fd)))?;
        let fd = self.call(
            format!(
                "socket({}, {}, {}) for fd {}",
                s.family, s.r#type, s.protocol, f.fd
            ),
            libc::SYS_socket,
            [s.family as u64, s.r#type as u64, s.protocol as u64, 0, 0, 0],
        )?;
        let fd = self.lift(fd, above)?;
        let copy = crate::sys::fds::take_fd(self.stub.pid(), fd as i32).map_err(|source| {
            RestoreError::FdData {
                what: format!("fd {}: pidfd_getfd of the new socket", f.fd),
                source,
            }
        })?;
        Ok((fd, copy))
    }

    /// A TCP or UNIX listener, or an established TCP connection (left in
    /// repair mode until [`Restorer::leave_repair`]).
    fn socket(&mut self, f: &pb::FileDesc, above: u64) -> Result<()> {
        use std::os::fd::AsFd;
        let (fd, copy) = self.new_socket(f, above)?;
        let s = f.socket.as_ref().expect("new_socket checked it");
        match f.kind() {
            pb::FdKind::TcpListen => crate::sockets::restore_tcp_listen(f.fd, copy.as_fd(), s)?,
            pb::FdKind::UnixListen => crate::sockets::restore_unix_listen(f.fd, copy.as_fd(), s)?,
            _ => {
                crate::sockets::restore_established(f.fd, copy.as_fd(), s)?;
                self.repaired.push((f.fd, s.clone()));
            }
        }
        self.place(fd, f)?;
        self.set_status_flags(f)
    }

    /// Both ends of a UNIX stream pair, each with the bytes that waited at
    /// it (sent from the other end, before the status flags are set).
    fn unix_pair(&mut self, a: &pb::FileDesc, b: &pb::FileDesc, above: u64) -> Result<()> {
        use std::os::fd::AsFd;
        let s = a.socket.as_ref().expect("checked by the caller");
        let (x, y) = self.fd_pair(
            format!("socketpair for fds {} and {}", a.fd, b.fd),
            libc::SYS_socketpair,
            |at| [libc::AF_UNIX as u64, s.r#type as u64, 0, at, 0, 0],
            above,
        )?;
        // What waits at one end was sent from the other.
        for (from, f) in [(y, a), (x, b)] {
            let unread = f
                .socket
                .as_ref()
                .map(|s| s.unread.clone())
                .unwrap_or_default();
            if unread.is_empty() {
                continue;
            }
            let copy =
                crate::sys::fds::take_fd(self.stub.pid(), from as i32).map_err(|source| {
                    RestoreError::FdData {
                        what: format!("fd {}: pidfd_getfd of its peer", f.fd),
                        source,
                    }
                })?;
            crate::sys::sock::send_all(copy.as_fd(), &unread).map_err(|source| {
                RestoreError::FdData {
                    what: format!("fd {}: writing its {} bytes back", f.fd, unread.len()),
                    source,
                }
            })?;
        }
        self.place(x, a)?;
        self.place(y, b)?;
        self.set_status_flags(a)?;
        self.set_status_flags(b)
    }

    /// Takes the restored TCP connections out of repair mode, the last
    /// step before the process runs: until here a failure kills sockets
    /// that never sent a packet.
    fn leave_repair(&mut self) -> Result<()> {
        use std::os::fd::AsFd;
        for (fd, s) in std::mem::take(&mut self.repaired) {
            let copy = crate::sys::fds::take_fd(self.stub.pid(), fd).map_err(|source| {
                RestoreError::FdData {
                    what: format!("fd {fd}: pidfd_getfd of the socket"),
                    source,
                }
            })?;
            crate::sockets::finish_established(fd, copy.as_fd(), &s)?;
        }
        Ok(())
    }

    /// The tree's shared memory object behind `v`, if it is one: ferry's fd.
    fn shm_of(&self, v: &pb::Vma) -> Option<&i32> {
        crate::shmem::key_of(v).and_then(|k| self.shm.get(&k))
    }

    /// Moves the stub into a time namespace in which its monotonic and boot
    /// clocks go on from the image's (see [`crate::clocks`]): while it is
    /// single-threaded, as `setns` into a time namespace demands, and
    /// before the vdso is placed, whose data page shows the namespace's
    /// clocks. A host that cannot make one (no `CONFIG_TIME_NS`, no
    /// `CAP_SYS_ADMIN`) restores without it, and says so.
    fn clocks(&mut self, p: &pb::Process) -> Result<()> {
        if p.clock_monotonic_ns == 0 && p.clock_boottime_ns == 0 {
            return Ok(());
        }
        let want = crate::clocks::Clocks {
            monotonic: p.clock_monotonic_ns,
            boottime: p.clock_boottime_ns,
        };
        let ns = match crate::clocks::namespace(want) {
            Ok(ns) => ns,
            Err(e) => {
                tracing::warn!(
                    pid = p.pid,
                    "the restored process sees this host's monotonic and boot clocks, \
                     which jump from the source's unless both hosts booted together: {e}"
                );
                return Ok(());
            }
        };
        // Opened through ferry's /proc in any case: a namespace has no
        // offset or flags to lose.
        let fd = self.open_from_ferry(ns.as_raw_fd(), libc::O_RDONLY, "the time namespace")?;
        let entered = self.call(
            "setns of the time namespace",
            libc::SYS_setns,
            [fd, libc::CLONE_NEWTIME as u64, 0, 0, 0, 0],
        );
        self.call(
            "close of the time namespace's fd",
            libc::SYS_close,
            [fd, 0, 0, 0, 0, 0],
        )?;
        entered.map(|_| ())
    }

    /// A copy of ferry's fd `ours` in the stub, close-on-exec; its number.
    /// Taken with `pidfd_getfd` (injected, through a pidfd of ferry): the
    /// same open file. A stub in a pid namespace of its own
    /// (`--keep-pids`) cannot name ferry's pid there, so it opens ferry's
    /// `/proc/PID/fd/N` instead (ferry's /proc shows it): the same file,
    /// opened anew in `mode`, with an offset and status flags of its own,
    /// which the callers set as the image says.
    fn take_from_ferry(&mut self, ours: i32, mode: i32, what: &str) -> Result<u64> {
        if self.keep_pids {
            return self.open_from_ferry(ours, mode, what);
        }
        let ferry = std::process::id() as u64;
        let pidfd = self.call(
            format!("pidfd_open of ferry ({ferry}) for {what}"),
            libc::SYS_pidfd_open,
            [ferry, 0, 0, 0, 0, 0],
        )?;
        let got = self.call(
            format!("pidfd_getfd of {what}"),
            libc::SYS_pidfd_getfd,
            [pidfd, ours as u64, 0, 0, 0, 0],
        );
        self.call(
            "close of ferry's pidfd",
            libc::SYS_close,
            [pidfd, 0, 0, 0, 0, 0],
        )?;
        got
    }

    /// Ferry's fd `ours` opened anew in the stub through ferry's
    /// `/proc/PID/fd/N` in `mode`, close-on-exec (see
    /// [`Restorer::take_from_ferry`]); its number.
    fn open_from_ferry(&mut self, ours: i32, mode: i32, what: &str) -> Result<u64> {
        let link = format!("/proc/{}/fd/{ours}", std::process::id());
        let at = self.put_path(&link)?;
        self.call(
            format!("open of {link}, {what}"),
            libc::SYS_openat,
            [
                libc::AT_FDCWD as u64,
                at,
                (mode | libc::O_CLOEXEC) as u64,
                0,
                0,
                0,
            ],
        )
    }

    /// `fd` (made read-write) as `f` had it open: itself for read-write,
    /// else reopened through /proc in `f`'s access mode and closed.
    fn in_access_mode(&mut self, fd: u64, f: &pb::FileDesc) -> Result<u64> {
        if f.flags & libc::O_ACCMODE as u32 == libc::O_RDWR as u32 {
            return Ok(fd);
        }
        let at = self.put_path(&format!("/proc/self/fd/{fd}"))?;
        let flags = f.flags as i32 & !OPEN_DROP & libc::O_ACCMODE;
        let again = self.call(
            format!("reopen of {} for fd {}", f.path, f.fd),
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, at, flags as u64, 0, 0, 0],
        )?;
        self.call("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        Ok(again)
    }

    /// Fd `f`, a memfd of the tree's shared memory objects: ferry's, taken
    /// (one open file for every process, as after a fork), or reopened
    /// through /proc for an access mode other than read-write; then its
    /// number, offset and flags.
    fn shared_memfd(&mut self, f: &pb::FileDesc) -> Result<()> {
        let ours = self.shm_fds[&f.fd];
        let fd = self.take_from_ferry(
            ours,
            libc::O_RDWR,
            &format!("memfd {} for fd {}", f.path, f.fd),
        )?;
        let fd = self.in_access_mode(fd, f)?;
        self.place_taken(fd, f)?;
        self.seek(f)?;
        self.set_status_flags(f)
    }

    /// Fd `f`, an end of a pipe shared with other processes of the tree,
    /// taken from ferry's copy (see [`Restorer::take_from_ferry`]) and
    /// given `f`'s number, close-on-exec flag and status flags.
    fn take_shared_pipe_end(&mut self, f: &pb::FileDesc) -> Result<()> {
        let (r, w) = self.shared_pipes[&f.pipe_id];
        let (end, mode, which) = if f.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
            (w, libc::O_WRONLY, "write")
        } else {
            (r, libc::O_RDONLY, "read")
        };
        let got = self.take_from_ferry(
            end,
            mode,
            &format!("the shared pipe's {which} end for fd {}", f.fd),
        )?;
        self.place_taken(got, f)?;
        self.set_status_flags(f)
    }

    /// Gives `fd`, taken into the stub with `pidfd_getfd` (which sets
    /// close-on-exec), `f`'s number and close-on-exec flag.
    fn place_taken(&mut self, fd: u64, f: &pb::FileDesc) -> Result<()> {
        if fd != f.fd as u64 {
            return self.place(fd, f);
        }
        let flag = if f.cloexec { libc::FD_CLOEXEC } else { 0 };
        self.call(
            format!("fcntl(F_SETFD) of fd {}", f.fd),
            libc::SYS_fcntl,
            [fd, libc::F_SETFD as u64, flag as u64, 0, 0, 0],
        )?;
        Ok(())
    }

    /// Moves the stub's fd `fd` to `f.fd` with `f`'s close-on-exec flag.
    fn place(&mut self, fd: u64, f: &pb::FileDesc) -> Result<()> {
        let cloexec = if f.cloexec { libc::O_CLOEXEC } else { 0 };
        if fd != f.fd as u64 {
            self.call(
                format!("dup3 of {} to fd {}", f.path, f.fd),
                libc::SYS_dup3,
                [fd, f.fd as u64, cloexec as u64, 0, 0, 0],
            )?;
            self.call("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        } else if f.cloexec {
            self.call(
                format!("fcntl(FD_CLOEXEC) of fd {}", f.fd),
                libc::SYS_fcntl,
                [fd, libc::F_SETFD as u64, libc::FD_CLOEXEC as u64, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// Runs `nr` (`socketpair`, `pipe2`: calls that write an `int[2]` of
    /// new fds to the address given to `args`) in the stub and returns both
    /// fds, lifted above `above`.
    fn fd_pair(
        &mut self,
        step: String,
        nr: libc::c_long,
        args: impl FnOnce(u64) -> [u64; 6],
        above: u64,
    ) -> Result<(u64, u64)> {
        let at = self.put(0, &[0u8; 8], "room for two fds")?;
        self.call(&step, nr, args(at))?;
        let mut both = [0u8; 8];
        self.stub
            .read(at, &mut both)
            .map_err(|source| RestoreError::Write {
                what: format!("{step}: its answer"),
                source,
            })?;
        let x = u32::from_le_bytes([both[0], both[1], both[2], both[3]]) as u64;
        let y = u32::from_le_bytes([both[4], both[5], both[6], both[7]]) as u64;
        Ok((self.lift(x, above)?, self.lift(y, above)?))
    }

    /// A copy of the stub's fd `fd` above every fd of the image; the
    /// original is closed.
    fn lift(&mut self, fd: u64, above: u64) -> Result<u64> {
        let high = self.call(
            "fcntl(F_DUPFD_CLOEXEC) of a helper fd",
            libc::SYS_fcntl,
            [fd, libc::F_DUPFD_CLOEXEC as u64, above, 0, 0, 0],
        )?;
        self.call("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        Ok(high)
    }

    /// The status flags of `f` that `F_SETFL` can set (the access mode and
    /// creation flags cannot change after open).
    fn set_status_flags(&mut self, f: &pb::FileDesc) -> Result<()> {
        let settable = libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_NOATIME;
        let flags = f.flags as i32 & settable;
        self.call(
            format!("fcntl(F_SETFL) of fd {}", f.fd),
            libc::SYS_fcntl,
            [f.fd as u64, libc::F_SETFL as u64, flags as u64, 0, 0, 0],
        )?;
        Ok(())
    }

    /// Writes `data` through the stub's fd `fd` (a copy of it in ferry:
    /// one write, not one injection per 16 KiB), at offset 0 for a file.
    fn fill(&self, fd: u64, data: &[u8], f: &pb::FileDesc, at_zero: bool) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let err = |what: &str| {
            let what = format!("fd {}: {what}", f.fd);
            move |source| RestoreError::FdData { what, source }
        };
        let copy = crate::sys::fds::take_fd(self.stub.pid(), fd as i32)
            .map_err(err("pidfd_getfd of the new file"))?;
        let mut file = std::fs::File::from(copy);
        if at_zero {
            file.write_all_at(data, 0)
        } else {
            file.write_all(data)
        }
        .map_err(err(&format!("writing its {} bytes back", data.len())))
    }

    fn open_path(&mut self, f: &pb::FileDesc) -> Result<()> {
        let mut flags = (f.flags as i32 & !OPEN_DROP) | libc::O_NOCTTY;
        if f.kind() == pb::FdKind::Directory {
            flags |= libc::O_DIRECTORY;
        }
        let at = self.put_path(&f.path)?;
        let fd = self.call(
            format!("open of {} for fd {}", f.path, f.fd),
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, at, flags as u64, 0, 0, 0],
        )?;
        self.place(fd, f)?;
        if f.kind() == pb::FdKind::Regular && f.pos != 0 {
            self.seek(f)?;
        }
        Ok(())
    }

    fn seek(&mut self, f: &pb::FileDesc) -> Result<()> {
        self.call(
            format!("lseek of fd {} ({}) to {}", f.fd, f.path, f.pos),
            libc::SYS_lseek,
            [f.fd as u64, f.pos, libc::SEEK_SET as u64, 0, 0, 0],
        )?;
        Ok(())
    }

    /// One pipe or FIFO with all its fds (`group`, at least one). The
    /// helper end(s) are non-blocking so that writing the bytes back can
    /// fail but never hang; each fd then gets its own status flags.
    fn pipe(&mut self, group: &[&pb::FileDesc], above: u64) -> Result<()> {
        let first = group[0];
        let nonblock = libc::O_NONBLOCK as u64;
        // (read end, write end) in the stub, above the image's fds.
        let (r, w, helper) = if first.kind() == pb::FdKind::Pipe {
            let (r, w) = self.fd_pair(
                format!("pipe2 for fd {}", first.fd),
                libc::SYS_pipe2,
                |at| [at, nonblock, 0, 0, 0, 0],
                above,
            )?;
            (r, w, None)
        } else {
            // Opening a FIFO read-write never blocks (Linux): this helper
            // is a reader and a writer while the real ends are opened.
            let at = self.put_path(&first.path)?;
            let flags = libc::O_RDWR | libc::O_NONBLOCK | libc::O_NOCTTY;
            let h = self.call(
                format!("open of FIFO {} for fd {}", first.path, first.fd),
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, at, flags as u64, 0, 0, 0],
            )?;
            let h = self.lift(h, above)?;
            (h, h, Some(h))
        };
        if first.pipe_size > 0 {
            self.call(
                format!(
                    "fcntl(F_SETPIPE_SZ, {}) for fd {}",
                    first.pipe_size, first.fd
                ),
                libc::SYS_fcntl,
                [
                    w,
                    libc::F_SETPIPE_SZ as u64,
                    first.pipe_size as u64,
                    0,
                    0,
                    0,
                ],
            )?;
        }
        for f in group.iter().filter(|f| !f.data.is_empty()) {
            if helper.is_some() && self.fifo_holds(w, f)? {
                continue;
            }
            self.fill(w, &f.data, f, false)?;
        }
        for &f in group {
            let fd = if let Some(_h) = helper {
                let at = self.put_path(&f.path)?;
                let flags = (f.flags as i32 & !OPEN_DROP) | libc::O_NOCTTY | libc::O_NONBLOCK;
                self.call(
                    format!("open of FIFO {} for fd {}", f.path, f.fd),
                    libc::SYS_openat,
                    [libc::AT_FDCWD as u64, at, flags as u64, 0, 0, 0],
                )?
            } else {
                let end = if f.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
                    w
                } else {
                    r
                };
                self.call(
                    format!("fcntl(F_DUPFD) of the pipe for fd {}", f.fd),
                    libc::SYS_fcntl,
                    [end, libc::F_DUPFD as u64, 0, 0, 0, 0],
                )?
            };
            self.place(fd, f)?;
        }
        for &f in group {
            self.set_status_flags(f)?;
        }
        self.call("close", libc::SYS_close, [r, 0, 0, 0, 0, 0])?;
        if helper.is_none() {
            self.call("close", libc::SYS_close, [w, 0, 0, 0, 0, 0])?;
        }
        Ok(())
    }

    /// Whether the FIFO open at the stub's `fd` already holds `f`'s bytes.
    /// It does when the source ran on this host: its FIFO is the same pipe,
    /// kept alive by the source until the restore succeeds, and writing the
    /// bytes again would double them. Bytes of someone else's are refused.
    fn fifo_holds(&self, fd: u64, f: &pb::FileDesc) -> Result<bool> {
        let err = |what: &str| {
            let what = format!("fd {}: {what}", f.fd);
            move |source| RestoreError::FdData { what, source }
        };
        let copy = crate::sys::fds::take_fd(self.stub.pid(), fd as i32)
            .map_err(err("pidfd_getfd of the FIFO"))?;
        let there = crate::sys::fds::peek_pipe(std::os::fd::AsFd::as_fd(&copy))
            .map_err(err("reading what the FIFO holds"))?;
        if there.is_empty() {
            Ok(false)
        } else if there == f.data {
            Ok(true)
        } else {
            Err(unsupported(format!(
                "fd {}: FIFO {} holds {} bytes of another process here",
                f.fd,
                f.path,
                there.len()
            )))
        }
    }

    fn eventfd(&mut self, f: &pb::FileDesc) -> Result<()> {
        let mut flags = f.flags & libc::O_NONBLOCK as u32;
        if f.eventfd_semaphore {
            flags |= libc::EFD_SEMAPHORE as u32;
        }
        let fd = self.call(
            format!("eventfd2 for fd {}", f.fd),
            libc::SYS_eventfd2,
            [0, flags as u64, 0, 0, 0, 0],
        )?;
        self.place(fd, f)?;
        // eventfd2 takes a 32-bit start value; a write adds any 64-bit one
        // (and never blocks on a counter at 0).
        if f.eventfd_count > 0 {
            let at = self.put(0, &f.eventfd_count.to_le_bytes(), "an eventfd count")?;
            self.call(
                format!("write of the count {} to eventfd {}", f.eventfd_count, f.fd),
                libc::SYS_write,
                [f.fd as u64, at, 8, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// The timer is armed relative to now with the time it had left, so
    /// the downtime delays it; TFD_TIMER_ABSTIME and CANCEL_ON_SET are
    /// not kept. Expirations not yet read are put back as they were.
    fn timerfd(&mut self, f: &pb::FileDesc) -> Result<()> {
        /// `_IOW('T', 0, u64)`.
        const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
        let Some(t) = &f.timerfd else {
            return Err(RestoreError::Missing(format!("timer of fd {}", f.fd)));
        };
        let flags = f.flags & libc::O_NONBLOCK as u32;
        let fd = self.call(
            format!("timerfd_create(clock {}) for fd {}", t.clockid, f.fd),
            libc::SYS_timerfd_create,
            [t.clockid as u64, flags as u64, 0, 0, 0, 0],
        )?;
        self.place(fd, f)?;
        if t.value_ns > 0 {
            let ts = |ns: u64| [ns / 1_000_000_000, ns % 1_000_000_000];
            let spec: Vec<u8> = ts(t.interval_ns)
                .into_iter()
                .chain(ts(t.value_ns))
                .flat_map(u64::to_le_bytes)
                .collect();
            let at = self.put(0, &spec, "an itimerspec")?;
            self.call(
                format!("timerfd_settime of fd {}", f.fd),
                libc::SYS_timerfd_settime,
                [f.fd as u64, 0, at, 0, 0, 0],
            )?;
        }
        if t.ticks > 0 {
            let at = self.put(0, &t.ticks.to_le_bytes(), "timerfd ticks")?;
            self.call(
                format!("ioctl(TFD_IOC_SET_TICKS, {}) of fd {}", t.ticks, f.fd),
                libc::SYS_ioctl,
                [f.fd as u64, TFD_IOC_SET_TICKS, at, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// A memfd (same name, same seals) or an unlinked file (a new one made
    /// with O_TMPFILE in the same directory, same mode), with the image's
    /// contents, offset and flags. Both are made read-write to be filled;
    /// an fd of another access mode is then reopened through /proc.
    fn unlinked(&mut self, f: &pb::FileDesc, above: u64) -> Result<()> {
        let memfd = f.kind() == pb::FdKind::Memfd;
        let fd = if memfd {
            let name = memfd_name(&f.path)
                .ok_or_else(|| unsupported(format!("fd {}: {}: not a memfd", f.fd, f.path)))?;
            let at = self.put_path(name)?;
            let sealing = if f.seals == libc::F_SEAL_SEAL as u32 {
                0
            } else {
                libc::MFD_ALLOW_SEALING
            };
            self.call(
                format!("memfd_create({name:?}) for fd {}", f.fd),
                libc::SYS_memfd_create,
                [at, sealing as u64, 0, 0, 0, 0],
            )?
        } else {
            let dir = deleted_dir(&f.path)
                .ok_or_else(|| unsupported(format!("fd {}: {}: no directory", f.fd, f.path)))?;
            let at = self.put_path(&dir.to_string_lossy())?;
            let flags = libc::O_TMPFILE | libc::O_RDWR;
            self.call(
                format!("open(O_TMPFILE) in {} for fd {}", dir.display(), f.fd),
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, at, flags as u64, f.mode as u64, 0, 0],
            )?
        };
        let fd = self.lift(fd, above)?;
        self.fill(fd, &f.data, f, true)?;
        if memfd && f.seals & !(libc::F_SEAL_SEAL as u32) != 0 {
            self.call(
                format!("fcntl(F_ADD_SEALS, {:#x}) of fd {}", f.seals, f.fd),
                libc::SYS_fcntl,
                [fd, libc::F_ADD_SEALS as u64, f.seals as u64, 0, 0, 0],
            )?;
        }
        let fd = self.in_access_mode(fd, f)?;
        self.place(fd, f)?;
        self.seek(f)?;
        self.set_status_flags(f)
    }

    fn signals(&mut self, p: &pb::Process) -> Result<()> {
        let by_sig: HashMap<u32, &pb::SigAction> =
            p.sigactions.iter().map(|s| (s.signo, s)).collect();
        // Every action is set: those the image lacks go back to SIG_DFL,
        // since the stub inherited ferry's (Rust ignores SIGPIPE, say).
        for signo in (1u32..=64).filter(|&s| s != 9 && s != 19) {
            let (handler, flags, restorer, mask) = by_sig
                .get(&signo)
                .map_or((0, 0, 0, 0), |s| (s.handler, s.flags, s.restorer, s.mask));
            let mut act = Vec::with_capacity(32);
            for w in [handler, flags, restorer, mask] {
                act.extend_from_slice(&w.to_ne_bytes());
            }
            let at = self.put(0, &act, "struct sigaction")?;
            let ret = self
                .stub
                .syscall(libc::SYS_rt_sigaction, [signo as u64, at, 0, 8, 0, 0])?;
            // Signals 32 and 33 belong to glibc's NPTL, but the kernel takes
            // them; only a captured action failing is an error.
            if ret < 0 && by_sig.contains_key(&signo) {
                return Err(RestoreError::Syscall {
                    step: format!("rt_sigaction of signal {signo}"),
                    errno: Errno::from_raw(-ret as i32),
                });
            }
        }
        for l in &p.rlimits {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&l.soft.to_ne_bytes());
            b[8..].copy_from_slice(&l.hard.to_ne_bytes());
            let at = self.put(0, &b, "struct rlimit64")?;
            self.call(
                format!(
                    "prlimit64 of resource {} to {}/{}",
                    l.resource, l.soft, l.hard
                ),
                libc::SYS_prlimit64,
                [0, l.resource as u64, at, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// Makes every thread but the first (the stub is the first) and sets
    /// what only a thread can set for itself; returns the new tids, in the
    /// image's order. glibc keeps each thread's tid in its `struct pthread`,
    /// at the very address the kernel clears on thread exit
    /// (`clear_child_tid`): where that word still holds the old tid it gets
    /// the new one, so `pthread_kill` and friends reach the right thread.
    /// What keeps an old tid: the owner field of a mutex locked at the
    /// freeze (only error-checking, recursive and robust mutexes look at
    /// it).
    fn threads(&mut self, p: &pb::Process) -> Result<Vec<i32>> {
        const FLAGS: i32 = libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM;
        let mut tids = vec![self.stub.pid()];
        for t in &p.threads[1..] {
            let mut flags = FLAGS;
            if t.clear_child_tid != 0 {
                flags |= libc::CLONE_CHILD_CLEARTID;
            }
            let ret = if self.keep_pids {
                self.stub
                    .clone_thread_as(flags as u64, t.clear_child_tid, t.ns_tid, self.data)
            } else {
                self.stub.clone_thread(flags as u64, t.clear_child_tid)
            }
            .map_err(RestoreError::Stub)?;
            if ret < 0 && self.keep_pids {
                return Err(RestoreError::PidTaken {
                    what: "thread",
                    pid: t.tid,
                    ns_pid: t.ns_tid,
                    why: Errno::from_raw(-ret as i32).to_string(),
                });
            }
            if ret < 0 {
                return Err(RestoreError::Syscall {
                    step: format!("clone of thread {}", t.tid),
                    errno: Errno::from_raw(-ret as i32),
                });
            }
            let tid = ret as i32;
            self.thread_self_state(tid, t, (0, &[]))?;
            tids.push(tid);
        }
        for (t, &tid) in p.threads.iter().zip(&tids) {
            // With --keep-pids the word already holds the right tid.
            if t.clear_child_tid == 0 || self.keep_pids {
                continue;
            }
            // glibc keeps the tid the thread sees itself: the one of its
            // own pid namespace, where the image has it.
            let old = if t.ns_tid != 0 { t.ns_tid } else { t.tid };
            let mut word = [0u8; 4];
            if self.stub.read(t.clear_child_tid, &mut word).is_ok()
                && i32::from_ne_bytes(word) == old
            {
                self.stub
                    .write(t.clear_child_tid, &tid.to_ne_bytes())
                    .map_err(|source| RestoreError::Write {
                        what: format!("the tid of thread {} (now {tid})", t.tid),
                        source,
                    })?;
            }
        }
        Ok(tids)
    }

    /// rseq, robust list and pending signals (its own and `also_pending`),
    /// which only the thread itself can set; for the main thread and those
    /// [`Restorer::threads`] made. Pending signals are queued again by the
    /// thread to itself with everything blocked, so none is delivered (as
    /// a signal-delivery stop) before the image's mask is set at resume.
    /// What is lost: the siginfo of queued real-time signals.
    /// `shared`: for the main thread, the process's pending signals (a
    /// mask) and their queue, which go back to the process as a whole.
    fn thread_self_state(
        &mut self,
        tid: i32,
        t: &pb::Thread,
        shared: (u64, &[Bytes]),
    ) -> Result<()> {
        let (also_pending, shared_queue) = shared;
        let call = |r: &mut Self, step: String, nr: libc::c_long, args: [u64; 6]| {
            let ret = r.stub.syscall_in(tid, nr, args)?;
            if (-4095..0).contains(&ret) {
                return Err(RestoreError::Syscall {
                    step: format!("{step} in thread {} (now {tid})", t.tid),
                    errno: Errno::from_raw(-ret as i32),
                });
            }
            Ok(())
        };
        if !t.comm.is_empty() {
            // Its own name, which only the thread itself may set.
            let mut name = [0u8; 16];
            let n = t.comm.len().min(15);
            name[..n].copy_from_slice(&t.comm.as_bytes()[..n]);
            let at = self.put(0, &name, "a thread's name")?;
            call(
                self,
                format!("prctl(PR_SET_NAME, {:?})", t.comm),
                libc::SYS_prctl,
                [PR_SET_NAME, at, 0, 0, 0, 0],
            )?;
        }
        if let Some(ns) = t.timer_slack_ns {
            call(
                self,
                format!("prctl(PR_SET_TIMERSLACK, {ns})"),
                libc::SYS_prctl,
                [PR_SET_TIMERSLACK, ns, 0, 0, 0, 0],
            )?;
        }
        if let Some(rs) = t.rseq.as_ref().filter(|r| r.addr != 0) {
            call(
                self,
                format!("rseq registration at {:#x}", rs.addr),
                libc::SYS_rseq,
                [
                    rs.addr,
                    rs.len as u64,
                    rs.flags as u64,
                    rs.signature as u64,
                    0,
                    0,
                ],
            )?;
        }
        if let Some(alt) = t.altstack.filter(|a| a.flags & libc::SS_DISABLE == 0) {
            // SS_ONSTACK only reports where the thread was; the thread
            // runs ferry's code on the gadget's stack here, never on it.
            let ss: Vec<u8> = [alt.sp, (alt.flags & SS_AUTODISARM) as u64, alt.size]
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect();
            let at = self.put(0, &ss, "an alternate signal stack")?;
            call(
                self,
                format!("sigaltstack({:#x}, {} bytes)", alt.sp, alt.size),
                libc::SYS_sigaltstack,
                [at, 0, 0, 0, 0, 0],
            )?;
        }
        let len = if t.robust_list_len == 0 {
            ROBUST_LIST_HEAD_SIZE
        } else {
            t.robust_list_len
        };
        call(
            self,
            format!("set_robust_list({:#x})", t.robust_list),
            libc::SYS_set_robust_list,
            [t.robust_list, len, 0, 0, 0, 0],
        )?;
        let pending = (t.pending_signals | also_pending) & !(1 << 8 | 1 << 18);
        if pending != 0 {
            self.stub.set_sigmask_of(tid, u64::MAX)?;
            // These run in the process: the ids it sees itself.
            let me = self.stub.vpid() as u64;
            let vtid = self.own_view(tid, t);
            // Each queued signal with the siginfo it had (a timer's
            // SI_TIMER and value, a sigqueue's data), from the thread
            // itself, which may queue any: the kernel refuses kernel-made
            // siginfo only from another thread.
            let mut queued = 0u64;
            let queues = [(&t.queued_signals[..], false), (shared_queue, true)];
            for (info, to_process) in queues
                .iter()
                .flat_map(|(q, s)| q.iter().map(move |i| (i, *s)))
            {
                let signo = info
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                if !(1..=64).contains(&signo) || info.len() != SIGINFO_LEN {
                    return Err(RestoreError::Missing(format!(
                        "a queued signal's siginfo (signal {signo}, {} bytes) of thread {}",
                        info.len(),
                        t.tid
                    )));
                }
                if pending & (1 << (signo - 1)) == 0 {
                    continue;
                }
                queued |= 1 << (signo - 1);
                let at = self.put(0, info, "a siginfo")?;
                let (step, nr, args) = if to_process {
                    (
                        "rt_sigqueueinfo",
                        libc::SYS_rt_sigqueueinfo,
                        [me, signo as u64, at, 0, 0, 0],
                    )
                } else {
                    (
                        "rt_tgsigqueueinfo",
                        libc::SYS_rt_tgsigqueueinfo,
                        [me, vtid as u64, signo as u64, at, 0, 0],
                    )
                };
                call(
                    self,
                    format!("{step} to queue signal {signo} again"),
                    nr,
                    args,
                )?;
            }
            let plain = pending & !queued;
            for signo in (1..=64u64).filter(|s| plain & (1 << (s - 1)) != 0) {
                call(
                    self,
                    format!("tgkill to queue pending signal {signo}"),
                    libc::SYS_tgkill,
                    [me, vtid as u64, signo, 0, 0, 0],
                )?;
            }
        }
        Ok(())
    }

    /// Every thread's credentials as the image has them
    /// ([`crate::creds::plan`], injected into each thread: the raw
    /// syscalls change the calling thread only), then the dumpable flag,
    /// then a check of each thread's `/proc` status and securebits against
    /// the image. Every pointer argument is written into the process
    /// before the first step: once a thread leaves ferry's uid the process
    /// is no longer dumpable, and writing into it would need
    /// `CAP_SYS_PTRACE`.
    fn creds(&mut self, p: &pb::Process, tids: &[i32]) -> Result<()> {
        use crate::creds::{self, Step};
        let t0 = std::time::Instant::now();
        let last = crate::sys::caps::last_cap();
        let mut plans: Vec<(&pb::Thread, i32, creds::Creds, Vec<Step>)> = Vec::new();
        for (t, &tid) in p.threads.iter().zip(tids) {
            let want = thread_creds(p, t)?;
            let have = self.stub_creds(tid)?;
            let steps = creds::plan(&want, &have, last).map_err(|e| creds_err(p, Some(t), e))?;
            plans.push((t, tid, want, steps));
        }
        let room = GADGET_DATA_PAGES * page_size();
        let mut placed: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut off = 0u64;
        for m in plans.iter().flat_map(|pl| &pl.3).filter_map(Step::memory) {
            if placed.contains_key(&m) {
                continue;
            }
            if off + m.len() as u64 > room {
                return Err(unsupported(format!(
                    "credentials of process {} ({}): more groups and capability sets than the {room} bytes of the restore's scratch area",
                    p.pid, p.comm
                )));
            }
            let at = self.put(off, &m, "groups and capability sets")?;
            off = (off + m.len() as u64).next_multiple_of(8);
            placed.insert(m, at);
        }
        for (t, tid, _, steps) in &plans {
            for step in steps {
                let mem = step.memory().map_or(0, |m| placed[&m]);
                let (nr, args) = step.syscall(mem);
                let ret = self.stub.syscall_in(*tid, nr, args)?;
                tracing::trace!(tid, %step, ret, "credentials");
                if !step.unchecked() && (-4095..0).contains(&ret) {
                    return Err(RestoreError::Syscall {
                        step: format!("{step} in thread {} (now {tid})", t.tid),
                        errno: Errno::from_raw(-ret as i32),
                    });
                }
            }
        }
        self.dumpable(p)?;
        let known = creds::known_mask(last);
        for (t, tid, want, _) in &plans {
            let got = self.stub_creds(*tid)?;
            if let Some(d) = got.differs_from(want, known) {
                return Err(creds_err(p, Some(t), creds::CredsError::Mismatch(d)));
            }
        }
        tracing::debug!(
            pid = p.pid,
            threads = plans.len(),
            steps = plans.iter().map(|pl| pl.3.len()).sum::<usize>(),
            us = t0.elapsed().as_micros() as u64,
            "credentials restored"
        );
        Ok(())
    }

    /// What thread `tid` of the stub holds now.
    fn stub_creds(&mut self, tid: i32) -> Result<crate::creds::Creds> {
        let pid = self.stub.pid();
        let c = procfs::read_task_creds(pid, tid).map_err(|source| RestoreError::Proc {
            what: format!("/proc/{pid}/task/{tid}/status"),
            source,
        })?;
        let sb = self
            .stub
            .syscall_in(tid, libc::SYS_prctl, [PR_GET_SECUREBITS, 0, 0, 0, 0, 0])?;
        if sb < 0 {
            return Err(RestoreError::Syscall {
                step: format!("prctl(PR_GET_SECUREBITS) in thread {tid}"),
                errno: Errno::from_raw(-sb as i32),
            });
        }
        Ok(crate::creds::Creds::from_proc(c, sb as u32))
    }

    /// The image's dumpable flag: a change of uid has just set it to the
    /// `fs.suid_dumpable` sysctl. `prctl` sets only 0 and 1; an image with
    /// 2 (suidsafe) keeps the sysctl's value if that is 2, else gets 0 (as
    /// CRIU does: never more dumpable than it was).
    fn dumpable(&mut self, p: &pb::Process) -> Result<()> {
        let Some(want) = p.dumpable else {
            return Ok(());
        };
        let now = self.call(
            "prctl(PR_GET_DUMPABLE)",
            libc::SYS_prctl,
            [PR_GET_DUMPABLE, 0, 0, 0, 0, 0],
        )?;
        let set = match want {
            0 | 1 => want as u64,
            _ => 0,
        };
        if now != u64::from(want) && now != set {
            self.call(
                format!("prctl(PR_SET_DUMPABLE, {set})"),
                libc::SYS_prctl,
                [PR_SET_DUMPABLE, set, 0, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// The main thread's own state, the process's personality and its
    /// shared pending signals.
    /// The interval timers of `setitimer` and the POSIX timers, each with
    /// the time it had left, counting from here as the clocks go on from
    /// the freeze. Every thread (the stub and `tids`) blocks every signal
    /// first: a signal due before the process runs stays pending rather
    /// than stopping an injection of the steps left; the image's masks are
    /// set at resume.
    fn timers(&mut self, p: &pb::Process, tids: &[i32]) -> Result<()> {
        if p.itimers.is_empty() && p.posix_timers.is_empty() {
            return Ok(());
        }
        for &tid in std::iter::once(&self.stub.pid()).chain(tids) {
            self.stub.set_sigmask_of(tid, u64::MAX)?;
        }
        self.posix_timers(p, tids)?;
        for t in &p.itimers {
            let v = timer_spec(t.interval_us, t.value_us, 1_000_000);
            let at = self.put(0, &v, "an interval timer")?;
            self.call(
                format!(
                    "setitimer({}, {} us every {} us)",
                    t.which, t.value_us, t.interval_us
                ),
                libc::SYS_setitimer,
                [t.which as u64, at, 0, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// Makes each POSIX timer under the id the process knows it by: with
    /// `PR_TIMER_CREATE_RESTORE_IDS` on, `timer_create` takes the id it is
    /// handed instead of the next free one. Threads `tids` (in the image's
    /// order) already exist, so a timer may signal one of them. Armed
    /// after all are made.
    fn posix_timers(&mut self, p: &pb::Process, tids: &[i32]) -> Result<()> {
        const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
        /// `sizeof(struct sigevent)`.
        const SIGEVENT: usize = 64;
        if p.posix_timers.is_empty() {
            return Ok(());
        }
        let on = |this: &mut Self, on: u64| {
            this.call(
                format!("prctl(PR_TIMER_CREATE_RESTORE_IDS, {on}) (Linux 6.15 or later)"),
                libc::SYS_prctl,
                [PR_TIMER_CREATE_RESTORE_IDS, on, 0, 0, 0, 0],
            )
        };
        on(self, 1)?;
        // `/proc/PID/timers` lists the newest first: made oldest first,
        // they are listed as they were.
        for t in p.posix_timers.iter().rev() {
            let target = if t.notify & libc::SIGEV_THREAD_ID == 0 {
                0
            } else {
                let i = p
                    .threads
                    .iter()
                    .position(|th| th.tid == t.notify_tid)
                    .ok_or_else(|| {
                        RestoreError::Missing(format!(
                            "thread {} that POSIX timer {} signals",
                            t.notify_tid, t.id
                        ))
                    })?;
                self.own_view(tids[i], &p.threads[i])
            };
            // A CPU time clock names the process or a thread by its id,
            // which is a new one here.
            let clock = match crate::state::cpu_clock_owner(t.clock_id) {
                None => t.clock_id,
                Some((_, false)) => crate::state::cpu_clock_of(self.stub.vpid(), t.clock_id),
                Some((id, true)) => {
                    let i = p
                        .threads
                        .iter()
                        .position(|th| th.tid == id)
                        .ok_or_else(|| {
                            RestoreError::Missing(format!(
                                "thread {id} whose CPU time POSIX timer {} counts",
                                t.id
                            ))
                        })?;
                    crate::state::cpu_clock_of(self.own_view(tids[i], &p.threads[i]), t.clock_id)
                }
            };
            let mut ev = [0u8; SIGEVENT + 8];
            ev[..8].copy_from_slice(&t.value.to_ne_bytes());
            ev[8..12].copy_from_slice(&t.signo.to_ne_bytes());
            ev[12..16].copy_from_slice(&t.notify.to_ne_bytes());
            ev[16..20].copy_from_slice(&target.to_ne_bytes());
            // The id asked for, where timer_create also writes the one given.
            ev[SIGEVENT..SIGEVENT + 4].copy_from_slice(&t.id.to_ne_bytes());
            let at = self.put(0, &ev, "a sigevent")?;
            self.call(
                format!(
                    "timer_create(clock {}, signal {}, notify {:#x}) as timer {}",
                    t.clock_id, t.signo, t.notify, t.id
                ),
                libc::SYS_timer_create,
                [clock as i64 as u64, at, at + SIGEVENT as u64, 0, 0, 0],
            )?;
        }
        on(self, 0)?;
        for t in p
            .posix_timers
            .iter()
            .filter(|t| t.value_ns != 0 || t.interval_ns != 0)
        {
            let spec = timer_spec(t.interval_ns, t.value_ns, 1_000_000_000);
            let at = self.put(0, &spec, "an itimerspec")?;
            self.call(
                format!(
                    "timer_settime({}, {} ns every {} ns)",
                    t.id, t.value_ns, t.interval_ns
                ),
                libc::SYS_timer_settime,
                [t.id as u64, 0, at, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// Each thread's seccomp filters, oldest first, installed from the
    /// thread itself. Seccomp is suspended for the stub's threads first:
    /// ferry's calls still to come (credentials, the end of the restore)
    /// would otherwise be judged by the process's filters. The process
    /// runs under them from the moment ferry lets it go.
    fn seccomp(&mut self, p: &pb::Process, tids: &[i32]) -> Result<()> {
        const SECCOMP_SET_MODE_FILTER: u64 = 1;
        /// `sizeof(struct sock_fprog)`: a u16 length, padding, a pointer.
        const SOCK_FPROG: usize = 16;
        if p.threads.iter().all(|t| t.seccomp_filters.is_empty()) {
            return Ok(());
        }
        self.stub.suspend_seccomp(&tids[1..])?;
        let room = (GADGET_DATA_PAGES * page_size()) as usize - SOCK_FPROG;
        for (t, &tid) in p.threads.iter().zip(tids) {
            for (k, f) in t.seccomp_filters.iter().enumerate() {
                let insns = f.program.len() / crate::sys::ptrace::BPF_INSN_LEN;
                if f.program.len() % crate::sys::ptrace::BPF_INSN_LEN != 0
                    || insns == 0
                    || f.program.len() > room
                {
                    return Err(unsupported(format!(
                        "seccomp filter {k} of thread {}: {} bytes",
                        t.tid,
                        f.program.len()
                    )));
                }
                let mut b = Vec::with_capacity(SOCK_FPROG + f.program.len());
                b.extend_from_slice(&(insns as u64).to_ne_bytes());
                b.extend_from_slice(&(self.data + SOCK_FPROG as u64).to_ne_bytes());
                b.extend_from_slice(&f.program);
                let at = self.put(0, &b, "a seccomp filter")?;
                let ret = self.stub.syscall_in(
                    tid,
                    libc::SYS_seccomp,
                    [SECCOMP_SET_MODE_FILTER, f.flags, at, 0, 0, 0],
                )?;
                if (-4095..0).contains(&ret) {
                    return Err(RestoreError::Syscall {
                        step: format!(
                            "seccomp(SECCOMP_SET_MODE_FILTER) of filter {k} ({insns} instructions) in thread {}",
                            t.tid
                        ),
                        errno: Errno::from_raw(-ret as i32),
                    });
                }
            }
        }
        Ok(())
    }

    /// The id by which the restored process itself names thread `tid`
    /// (host view), image thread `t`: the same unless its pids are kept in
    /// a namespace of their own.
    fn own_view(&self, tid: i32, t: &pb::Thread) -> i32 {
        if !self.keep_pids {
            tid
        } else if tid == self.stub.pid() {
            self.stub.vpid()
        } else {
            t.ns_tid
        }
    }

    fn thread_state(&mut self, p: &pb::Process) -> Result<()> {
        let t = &p.threads[0];
        if p.personality != 0 {
            self.call(
                format!("personality({:#x})", p.personality),
                libc::SYS_personality,
                [p.personality as u64, 0, 0, 0, 0, 0],
            )?;
        }
        // Process-wide, as are the umask's below.
        if p.child_subreaper {
            self.call(
                "prctl(PR_SET_CHILD_SUBREAPER, 1)",
                libc::SYS_prctl,
                [PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, 0],
            )?;
        }
        if p.thp_disable {
            self.call(
                "prctl(PR_SET_THP_DISABLE, 1)",
                libc::SYS_prctl,
                [PR_SET_THP_DISABLE, 1, 0, 0, 0, 0],
            )?;
        }
        if let Some(mask) = p.umask {
            // Process-wide (the threads share it), and harmless to set
            // before they exist.
            self.call(
                format!("umask({mask:#o})"),
                libc::SYS_umask,
                [u64::from(mask), 0, 0, 0, 0, 0],
            )?;
        }
        let pid = self.stub.pid();
        self.thread_self_state(pid, t, (p.pending_signals, &p.shared_queued_signals))?;
        self.call(
            format!("set_tid_address({:#x})", t.clear_child_tid),
            libc::SYS_set_tid_address,
            [t.clear_child_tid, 0, 0, 0, 0, 0],
        )?;
        Ok(())
    }
}

// ------------------------------------------------------------ --keep-pids

/// A tree restored with `--keep-pids`: the root's pid as ferry sees it,
/// its pid inside the new pid namespace (the source's own) and that
/// namespace's inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub pid: i32,
    pub ns_pid: i32,
    pub pid_ns: u64,
}

/// Restores the image's process or tree into a fresh pid namespace where
/// every process and thread has the pid and tid it had in its own pid
/// namespace on the source (`--keep-pids`, see [`crate::pidns`]).
///
/// Pid 1 of the namespace is the root itself if that was its pid, else a
/// reaper made first, from which the root is forked with its pid (a
/// process forked from outside would be orphaned to ferry's init, not to
/// the namespace's); the reaper runs only once the tree does, and any
/// failure kills it, which kills the whole namespace. Cold only: the pids
/// must be known when the first stub is made.
pub fn restore_keeping_pids(tree: &pb::ProcessTree, img: &FlatImage) -> Result<Kept> {
    check(tree, &img.vmas)?;
    crate::pidns::check(tree, crate::pidns::pid_max()?)?;
    let (tree, img) = (tree.clone(), img.clone());
    std::thread::Builder::new()
        .name("ferry-restore".into())
        .spawn(move || restore_in_new_ns(&tree, &img, None))
        .map_err(|e| RestoreError::Thread(e.to_string()))?
        .join()
        .map_err(|_| RestoreError::Thread("panicked".into()))?
}

/// [`restore_keeping_pids`], ending prepared instead of running (the
/// two-phase end, see [`crate::readygo`]): every process of the tree is
/// held with its final state, and the namespace's reaper (if one is
/// needed) is not started; on release the tree runs and then the reaper,
/// on abandon both are killed, and with the reaper the namespace.
pub fn prepare_keeping_pids(tree: &pb::ProcessTree, img: &FlatImage) -> Result<Prepared> {
    check(tree, &img.vmas)?;
    crate::pidns::check(tree, crate::pidns::pid_max()?)?;
    let ns_pid = tree
        .processes
        .first()
        .ok_or_else(|| RestoreError::Missing("process".into()))?
        .ns_pid;
    let (tree, img) = (tree.clone(), img.clone());
    let (gate, waiting) = crate::readygo::gate();
    let h = std::thread::Builder::new()
        .name("ferry-restore".into())
        .spawn(move || restore_in_new_ns(&tree, &img, Some(gate)))
        .map_err(|e| RestoreError::Thread(e.to_string()))?;
    let prepared = waiting.prepared(Box::new(move || {
        h.join()
            .map_err(|_| RestoreError::Thread("panicked".into()))?
            .map(|k| k.pid)
    }))?;
    in_its_ns(prepared, ns_pid)
}

/// A process prepared with `--keep-pids`, with its pid `ns_pid` in its new
/// pid namespace and that namespace recorded for `Restored`.
pub fn in_its_ns(prepared: Prepared, ns_pid: i32) -> Result<Prepared> {
    // The root exists (held), so its namespace can be named now; a root
    // that vanished meanwhile is abandoned as the prepared value drops.
    let pid_ns = crate::sys::pidns::pid_ns_inode(prepared.pid()).map_err(|e| {
        RestoreError::Thread(format!(
            "the pid namespace of prepared process {}: {e}",
            prepared.pid()
        ))
    })?;
    Ok(prepared.in_ns(ns_pid, pid_ns))
}

fn restore_in_new_ns(tree: &pb::ProcessTree, img: &FlatImage, gate: Option<Gate>) -> Result<Kept> {
    let root = tree
        .processes
        .first()
        .ok_or_else(|| RestoreError::Missing("process".into()))?;
    let kept = |pid: i32| Kept {
        pid,
        ns_pid: root.ns_pid,
        pid_ns: crate::sys::pidns::pid_ns_inode(pid).unwrap_or(0),
    };
    if root.ns_pid == 1 {
        let pid = restore_tree_as(tree, img, Root::Init, gate)?;
        tracing::info!(pid, "restored as pid 1 of a new pid namespace");
        return Ok(kept(pid));
    }
    // The reaper's gadget (which every process forked from it inherits)
    // must miss every process's mappings.
    let all_vmas: Vec<pb::Vma> = crate::tree::split_vmas(&img.vmas)
        .into_values()
        .flatten()
        .collect();
    let mut reaper = Restorer::new_with(&all_vmas, Birth::NewPidNs)?;
    reaper.has_pid("the reaper", &pb::Process::default(), 1)?;
    // With a gate the tree is held there; the reaper stays a stopped stub
    // until the tree is released (abandoned, it is killed as it drops).
    let pid = restore_tree_as(tree, img, Root::FromReaper(&mut reaper), gate)?;
    let done = kept(pid);
    // The tree runs; until the reaper does too, what is orphaned in the
    // namespace waits as a zombie. A failure here drops (kills) the
    // reaper, and with it everything in the namespace.
    let rip = reaper.become_reaper()?;
    let reaper_pid = reaper.stub.pid();
    reaper.stub.run_at(rip)?;
    tracing::info!(
        pid,
        ns_pid = done.ns_pid,
        pid_ns = done.pid_ns,
        reaper = reaper_pid,
        "restored into a new pid namespace with the source's pids"
    );
    Ok(done)
}

impl Restorer {
    /// The warm restore's stub, made at the first layer: here, or with
    /// `keep_pid` in a fresh pid namespace, as pid 1 or forked with that
    /// pid from the namespace's reaper (returned too).
    fn warm_stub(vmas: &[pb::Vma], keep_pid: Option<i32>) -> Result<(Restorer, Option<Restorer>)> {
        let Some(n) = keep_pid else {
            return Ok((Restorer::new(vmas)?, None));
        };
        let root = pb::Process {
            ns_pid: n,
            ..Default::default()
        };
        if n == 1 {
            let r = Restorer::new_with(vmas, Birth::NewPidNs)?;
            r.has_pid("process", &root, 1)?;
            return Ok((r, None));
        }
        let mut reaper = Restorer::new_with(vmas, Birth::NewPidNs)?;
        reaper.has_pid("the reaper", &pb::Process::default(), 1)?;
        let mut r = reaper.child(Some(&root))?;
        // Like a spawned stub: the leader of its own session.
        r.call(format!("setsid of process {n}"), libc::SYS_setsid, [0; 6])?;
        Ok((r, Some(reaper)))
    }

    /// A process forked from this stub (gadget and all), with pid
    /// `p.ns_pid` in the stub's pid namespace when `p` is given
    /// (`--keep-pids`), else whatever `fork` gives.
    fn child(&mut self, p: Option<&pb::Process>) -> Result<Restorer> {
        let stub = match p {
            Some(p) => self.stub.fork_child_as(p.ns_pid, self.data).map_err(|e| {
                RestoreError::PidTaken {
                    what: "process",
                    pid: p.pid,
                    ns_pid: p.ns_pid,
                    why: e.to_string(),
                }
            })?,
            None => self.stub.fork_child()?,
        };
        let r = Restorer {
            stub,
            gadget: self.gadget,
            data: self.data,
            vmas: Vec::new(),
            mapped: Vec::new(),
            repaired: Vec::new(),
            shared_pipes: self.shared_pipes.clone(),
            shm: self.shm.clone(),
            shm_fds: HashMap::new(),
            keep_pids: p.is_some(),
        };
        if let Some(p) = p {
            r.has_pid("process", p, p.ns_pid)?;
        }
        Ok(r)
    }

    /// Checks, from its `NSpid`, that the stub has pid `want` in its own
    /// namespace (and is in a namespace below ferry's).
    fn has_pid(&self, what: &'static str, p: &pb::Process, want: i32) -> Result<()> {
        let pid = self.stub.pid();
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).map_err(|e| RestoreError::FdData {
            what: path.clone(),
            source: e,
        })?;
        let ids = crate::pidns::parse_nspid(&text).unwrap_or_default();
        if ids.len() < 2 || ids.last() != Some(&want) || self.stub.vpid() != want {
            return Err(RestoreError::PidTaken {
                what,
                pid: p.pid,
                ns_pid: want,
                why: format!("it got NSpid {ids:?}"),
            });
        }
        Ok(())
    }

    /// Turns this emptied stub into the namespace's reaper: every signal
    /// at its default, no fd (closed when it was emptied), `/` as its cwd,
    /// named `ferry-init`, and [`crate::pidns::REAPER_CODE`] in the last
    /// page of the gadget's data area, made executable. Returns where to
    /// start it.
    fn become_reaper(&mut self) -> Result<u64> {
        self.signals(&pb::Process::default())?;
        let root = self.put_path("/")?;
        self.call(
            "chdir(\"/\") of the reaper",
            libc::SYS_chdir,
            [root, 0, 0, 0, 0, 0],
        )?;
        let name = self.put(0, b"ferry-init\0", "the reaper's name")?;
        self.call(
            "prctl(PR_SET_NAME) of the reaper",
            libc::SYS_prctl,
            [PR_SET_NAME, name, 0, 0, 0, 0],
        )?;
        let ps = page_size();
        let at = self.data + (GADGET_DATA_PAGES - 1) * ps;
        self.stub
            .write(at, &crate::pidns::REAPER_CODE)
            .map_err(|source| RestoreError::Write {
                what: "the reaper's code".into(),
                source,
            })?;
        let rx = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        self.call(
            "mprotect of the reaper's code",
            libc::SYS_mprotect,
            [at, ps, rx, 0, 0, 0],
        )?;
        Ok(at + crate::pidns::REAPER_ENTRY as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs_bytes(f: impl FnOnce(&mut user_regs_struct)) -> Vec<u8> {
        let mut r = stub::regs_from_bytes(&[0; stub::REGS_SIZE]).unwrap();
        f(&mut r);
        stub::regs_to_bytes(&r)
    }

    #[test]
    fn interrupted_syscalls_are_rewound() {
        let t = pb::Thread {
            gpregs: regs_bytes(|r| {
                r.orig_rax = 7;
                r.rax = (-512i64) as u64;
                r.rip = 0x1002;
            })
            .into(),
            ..Default::default()
        };
        let r = resume_regs(&t).unwrap();
        assert_eq!((r.rax, r.rip, r.orig_rax), (7, 0x1000, u64::MAX));
        let t = pb::Thread {
            gpregs: regs_bytes(|r| {
                r.orig_rax = 230;
                r.rax = (-516i64) as u64;
                r.rip = 0x1002;
            })
            .into(),
            ..Default::default()
        };
        let r = resume_regs(&t).unwrap();
        assert_eq!((r.rax as i64, r.rip), (-4, 0x1002));
    }

    #[test]
    fn the_gadget_keeps_its_distance() {
        let mut busy = vec![
            (0x5555_0000_0000, 0x5555_0001_0000),
            (0x1_0000_0000, 0x1_0010_0000),
        ];
        let at = pick_gadget(&mut busy, 0x5000).unwrap();
        for (s, e) in busy {
            assert!(at + 0x5000 + GADGET_MARGIN <= s || at >= e + GADGET_MARGIN);
        }
    }

    #[test]
    fn refusals_name_what() {
        let img = FlatImage {
            page_size: 4096,
            vmas: vec![],
            runs: vec![],
        };
        let p = pb::Process {
            threads: vec![
                pb::Thread {
                    gpregs: vec![0; stub::REGS_SIZE].into(),
                    xstate: vec![0; 64].into(),
                    ..Default::default()
                },
                pb::Thread {
                    tid: 12,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let tree = pb::ProcessTree { processes: vec![p] };
        let e = check(&tree, &img.vmas).unwrap_err().to_string();
        assert_eq!(
            e,
            "the image has no gpregs for thread 12 (0 bytes, need 216)"
        );
        let p = pb::Process {
            threads: vec![pb::Thread {
                gpregs: vec![0; stub::REGS_SIZE].into(),
                xstate: vec![0; 64].into(),
                ..Default::default()
            }],
            mm: Some(pb::MmFields {
                start_code: 1,
                auxv: vec![0; 16].into(),
                ..Default::default()
            }),
            fds: vec![pb::FileDesc {
                fd: 5,
                kind: pb::FdKind::Unsupported as i32,
                description: "socket:[123]".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let tree = pb::ProcessTree { processes: vec![p] };
        assert_eq!(
            check(&tree, &img.vmas).unwrap_err().to_string(),
            "fd 5: socket:[123]: not supported yet"
        );
    }

    #[test]
    fn timers_are_armed_with_what_they_had_left() {
        let words = |b: Vec<u8>| -> Vec<u64> {
            b.chunks(8)
                .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
                .collect()
        };
        // Every 5 ms, 1.000000002 s left.
        assert_eq!(
            words(timer_spec(5_000_000, 1_000_000_002, 1_000_000_000)),
            [0, 5_000_000, 1, 2]
        );
        // Its signal pending: armed for one interval (20 ms).
        assert_eq!(
            words(timer_spec(20_000, 0, 1_000_000)),
            [0, 20_000, 0, 20_000]
        );
        // One-shot, 90 s left.
        assert_eq!(words(timer_spec(0, 90_000_000, 1_000_000)), [0, 0, 90, 0]);
    }

    #[test]
    fn pipes_need_both_ends_and_epolls_their_targets() {
        let fd = |fd: i32, kind: pb::FdKind, flags: i32, path: &str| pb::FileDesc {
            fd,
            kind: kind as i32,
            flags: flags as u32,
            path: path.into(),
            pipe_id: 77,
            ..Default::default()
        };
        let read = fd(3, pb::FdKind::Pipe, libc::O_RDONLY, "pipe:[77]");
        let write = fd(4, pb::FdKind::Pipe, libc::O_WRONLY, "pipe:[77]");
        assert!(check_fds(&[read.clone(), write.clone()]).is_ok());
        assert_eq!(
            check_fds(std::slice::from_ref(&write))
                .unwrap_err()
                .to_string(),
            "fd 4: pipe:[77] whose other end is outside the process: not supported yet"
        );
        let mut ep = fd(5, pb::FdKind::Epoll, libc::O_RDWR, "anon_inode:[eventpoll]");
        ep.epoll_targets = vec![pb::EpollTarget {
            fd: 3,
            events: 1,
            data: 3,
            ino: 9,
        }];
        let mut fds = vec![read.clone(), write.clone(), ep.clone()];
        assert!(check_fds(&fds).is_ok());
        fds[0].ino = 10;
        let e = check_fds(&fds).unwrap_err().to_string();
        assert!(e.contains("watches a file no longer at fd 3"), "{e}");
        let e = check_fds(&[write, ep]).unwrap_err().to_string();
        assert!(e.starts_with("fd 4: "), "{e}");
        let mut big = fd(6, pb::FdKind::Memfd, libc::O_RDWR, "/memfd:x (deleted)");
        assert!(check_fds(std::slice::from_ref(&big)).is_ok());
        big.data = vec![0; crate::state::MAX_FD_DATA as usize + 1].into();
        let e = check_fds(&[big]).unwrap_err().to_string();
        assert!(e.contains("bytes of contents in all"), "{e}");
        let gone = fd(
            7,
            pb::FdKind::Deleted,
            libc::O_RDWR,
            "/nonexistent/x (deleted)",
        );
        let e = check_fds(&[gone]).unwrap_err().to_string();
        assert!(e.contains("its directory is not here"), "{e}");
    }

    #[test]
    fn a_lone_process_refuses_a_memfd_mapped_or_held_twice_by_name() {
        let memfd = |fd, ino| pb::FileDesc {
            fd,
            kind: pb::FdKind::Memfd as i32,
            path: "/memfd:pool (deleted)".into(),
            ino,
            ..Default::default()
        };
        assert!(check_lone_memfds(&[memfd(3, 7), memfd(4, 8)], &[]).is_ok());
        let e = check_lone_memfds(&[memfd(3, 7), memfd(5, 7)], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fd 5: /memfd:pool (deleted): the same memfd as fd 3"),
            "{e}"
        );
        let mapped = pb::Vma {
            start: 0x10000,
            end: 0x11000,
            kind: pb::VmaKind::File as i32,
            name: "/memfd:pool (deleted)".into(),
            shm_ino: 7,
            ..Default::default()
        };
        let e = check_lone_shm(std::slice::from_ref(&mapped))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mapping 0x10000-0x11000 of /memfd:pool (deleted)"),
            "{e}"
        );
        // Anonymous shared memory of a lone process is restored as before.
        let anon = pb::Vma {
            kind: pb::VmaKind::SharedAnon as i32,
            name: "/dev/zero (deleted)".into(),
            ..mapped
        };
        assert!(check_lone_shm(&[anon]).is_ok());
    }
}
