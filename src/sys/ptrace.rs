//! Control of the process to migrate: seize every thread with ptrace, freeze
//! and thaw it, inject syscalls into it (x86_64).
//!
//! **One thread owns the tracee.** ptrace requests for a tracee are only
//! accepted from the OS thread that attached it, so [`Tracee`] spawns a
//! dedicated thread that makes every ptrace and wait call, and talks to it
//! over a channel. Callers may use a `Tracee` from any thread, tokio workers
//! included.
//!
//! **The target is always left as it was.** Threads are attached with
//! `PTRACE_SEIZE` (no stop, no `SIGSTOP`) and never with
//! `PTRACE_O_EXITKILL`: if ferry dies, the kernel detaches the threads and
//! the process runs on. While attached, the process runs: the tracer thread
//! polls for ptrace stops every [`POLL_INTERVAL`] while any thread runs and
//! passes signals on at once (a signal-delivery stop is resumed with the
//! same signal), puts job-control stops back with `PTRACE_LISTEN`, and reaps
//! threads that exit. Polling, rather than a blocking wait, is what lets one
//! thread serve both the channel and the tracee; the price is up to 2 ms of
//! extra latency on a signal to the target while it is attached. `Drop`
//! detaches, leaving the process running, also on error paths and panics.
//!
//! Waiting uses `waitid` with `__WALL | __WNOTHREAD` and `P_ALL`: it sees
//! exactly the tracees of the tracer thread, never the other children of
//! ferry. Exits are first looked at with `WNOWAIT`: when ferry is the real
//! parent of the target (tests), the main thread's exit status is left for
//! the code that spawned it. Every wait is bounded ([`STOP_TIMEOUT`]).
//!
//! **Syscall injection** (DESIGN.md §5, `probes/ptinj.h`): stop the thread,
//! save its registers, point `rip` at a `syscall` instruction (the first
//! instruction of the trampoline, [`super::trampoline`], whose code after it
//! gives the thread its own registers back should ferry die mid-injection;
//! a bare `0f 05` in `[vdso]` where there is no room), set `orig_rax = -1` so the kernel's restart logic
//! leaves the injected registers alone, and step with `PTRACE_SYSCALL` to
//! the syscall's entry and exit stops; `rax` holds the result; then restore
//! the registers exactly. If the thread had been stopped inside an
//! interrupted syscall (`rax` = `-ERESTART*`), the restored registers are
//! rewound to re-issue it (`rax = orig_rax`, `rip -= 2`; `restart_syscall`
//! for `-ERESTART_RESTARTBLOCK`), because after the injection the kernel's
//! own restart logic no longer runs. A signal that arrives before the
//! injected syscall starts is delivered with the thread's own registers, as
//! if ferry had not been there, and the injection is retried.
//!
//! **Reading a frozen thread** (for the image, DESIGN.md §6): registers,
//! the XSAVE area, the signal mask and the rseq registration are read with
//! ptrace requests that need the thread in a ptrace stop, so they refuse a
//! thread that is not ([`PtraceError::NotStopped`]) rather than stop it:
//! what they return is only meaningful for a process that stays frozen.
//! [`Tracee::syscall_in`] injects into one chosen thread of a frozen
//! process with every signal blocked in that thread meanwhile, because its
//! memory has already been sent: a signal handler running now would write
//! pages the image no longer gets. [`robust_list`] needs no stop at all
//! (a plain syscall on another thread), but belongs to the same picture.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use libc::user_regs_struct;
use nix::errno::Errno;
use nix::sys::ptrace as pt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a thread may take to reach a ptrace stop we asked for.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the tracer thread looks for stops while the target runs.
pub const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// Rounds of "list threads, seize the new ones" before giving up on a
/// process that keeps creating threads faster than they are seized.
const MAX_LIST_PASSES: usize = 100;
/// Attempts at one injection when signals keep arriving first.
const MAX_INJECT_ATTEMPTS: usize = 16;

const PTRACE_EVENT_STOP: i32 = 128;
/// `si_status` of a syscall stop with `PTRACE_O_TRACESYSGOOD`.
const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Requests the libc crate does not name (values from the 6.18 uapi
/// `linux/ptrace.h`).
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
/// Of `ptrace_peeksiginfo_args.flags`: the process's shared queue, not the
/// thread's own.
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
/// `sizeof(siginfo_t)`.
pub const SIGINFO_LEN: usize = 128;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_GET_SECCOMP_METADATA: libc::c_uint = 0x420d;
/// `sizeof(struct sock_filter)`: one classic BPF instruction.
pub const BPF_INSN_LEN: usize = 8;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// `elf.h`: the regset holding the whole XSAVE area.
const NT_X86_XSTATE: usize = 0x202;
/// Floor for the XSAVE buffer: the legacy area plus the header (576 bytes)
/// rounded up, used when CPUID cannot tell the size.
const MIN_XSTATE: usize = 4096;

/// Errors of process control.
#[derive(Debug, thiserror::Error)]
pub enum PtraceError {
    /// The process does not exist, or no longer does.
    #[error("no process {0}")]
    NoProcess(i32),
    /// A kernel thread: it has no user memory to migrate.
    #[error("process {0} is a kernel thread")]
    KernelThread(i32),
    /// A zombie: it has exited and only waits to be reaped.
    #[error("process {0} is a zombie")]
    Zombie(i32),
    /// The kernel refused to attach; `reason` says why as far as it can be
    /// known (another tracer, Yama, credentials).
    #[error("not permitted to trace process {pid}: {reason}")]
    Permission { pid: i32, reason: String },
    /// The id names a thread, not a process.
    #[error("{tid} is a thread of process {tgid}, not a process")]
    NotAProcess { tid: i32, tgid: i32 },
    /// The injected syscall returned `-errno`.
    #[error("injected syscall {nr} failed: {errno}")]
    SyscallFailed { nr: i64, errno: Errno },
    /// The thread being worked on exited.
    #[error("thread {0} exited")]
    ThreadExited(i32),
    /// A thread did not reach the expected stop in time.
    #[error("thread {tid}: timed out waiting for {what}")]
    Timeout { tid: i32, what: &'static str },
    /// No `syscall` instruction found to inject through.
    #[error("no `syscall` instruction found in the executable mappings of process {0}")]
    NoSyscallInsn(i32),
    /// More than the 6 arguments a syscall takes.
    #[error("{0} syscall arguments given, at most 6 exist")]
    TooManyArgs(usize),
    /// A ptrace or wait call failed.
    #[error("{op} on thread {tid}: {errno}")]
    Os {
        op: &'static str,
        tid: i32,
        errno: Errno,
    },
    /// Reading a `/proc` file failed.
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A stop this code does not expect at that point.
    #[error("thread {tid}: {what}")]
    Unexpected { tid: i32, what: String },
    /// The tracer thread is gone (it panicked, or the tracee was detached).
    #[error("the tracer thread is gone")]
    TracerGone,
    /// The tracer thread could not be started.
    #[error("starting the tracer thread: {0}")]
    Spawn(#[source] io::Error),
    /// The thread is not in a ptrace stop (freeze the process first), or
    /// is not a thread of the tracee.
    #[error("thread {0} is not a stopped thread of the tracee")]
    NotStopped(i32),
}

/// The rseq registration of a thread, as `PTRACE_GET_RSEQ_CONFIGURATION`
/// reports it (`struct ptrace_rseq_configuration`). All zero when the
/// thread registered none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RseqConfig {
    /// Address of the thread's `struct rseq`.
    pub abi_pointer: u64,
    /// The length given to `rseq(2)` (32 bytes, or more with the extended
    /// ABI fields glibc asks for).
    pub abi_size: u32,
    /// The signature the abort handlers must be preceded by.
    pub signature: u32,
    /// `rseq(2)` flags of the registration.
    pub flags: u32,
}

/// The registers `regs` (read in a ptrace stop) will resume with once an
/// injection has run in that thread: an interrupted syscall rewound to be
/// issued again (`rax = orig_rax`, `rip -= 2`; `restart_syscall` for
/// `-ERESTART_RESTARTBLOCK`). Idempotent. This is the state to save in an
/// image: the kernel's own restart logic will not run for a thread that is
/// rebuilt elsewhere.
pub fn resume_regs(regs: &user_regs_struct) -> user_regs_struct {
    let mut r = *regs;
    rewind_interrupted_syscall(&mut r);
    r
}

type Reply<T> = SyncSender<Result<T, PtraceError>>;

enum Cmd {
    Tids(SyncSender<Vec<i32>>),
    IsFrozen(SyncSender<bool>),
    Freeze(Reply<()>),
    Thaw(Reply<()>),
    GuardStop(Reply<()>),
    HoldStopped(std::sync::Arc<std::sync::atomic::AtomicBool>, Reply<()>),
    Syscall {
        nr: i64,
        args: [u64; 6],
        reply: Reply<i64>,
    },
    SyscallIn {
        tid: i32,
        nr: i64,
        args: [u64; 6],
        reply: Reply<i64>,
    },
    SyscallsIn {
        tid: i32,
        table: u64,
        calls: Vec<(i64, [u64; 6])>,
        reply: Reply<Vec<i64>>,
    },
    Regs {
        tid: i32,
        reply: Reply<user_regs_struct>,
    },
    Xstate {
        tid: i32,
        reply: Reply<Vec<u8>>,
    },
    Sigmask {
        tid: i32,
        reply: Reply<u64>,
    },
    Queued {
        tid: i32,
        shared: bool,
        reply: Reply<Vec<Vec<u8>>>,
    },
    Seccomp {
        tid: i32,
        count: u32,
        reply: Reply<Vec<SeccompFilter>>,
    },
    Rseq {
        tid: i32,
        reply: Reply<RseqConfig>,
    },
    Detach {
        leave_stopped: bool,
        reply: Reply<()>,
    },
}

/// A process whose threads are all attached with ptrace. See the module
/// documentation for what that means for the process.
pub struct Tracee {
    pid: i32,
    tx: Option<Sender<Cmd>>,
    worker: Option<JoinHandle<()>>,
}

impl Tracee {
    /// `PTRACE_SEIZE`s every thread of `pid`, listing `/proc/PID/task` again
    /// until no new thread shows up, so threads created meanwhile are caught
    /// (threads created later are seized by [`Tracee::freeze`] and
    /// [`Tracee::tids`]). The process keeps running.
    pub fn seize(pid: i32) -> Result<Tracee, PtraceError> {
        precheck(pid)?;
        let (tx, rx) = mpsc::channel();
        let (itx, irx) = mpsc::sync_channel(1);
        let worker = thread::Builder::new()
            .name(format!("ferry-ptrace-{pid}"))
            .spawn(move || match Worker::attach(pid) {
                Ok(w) => {
                    let _ = itx.send(Ok(()));
                    w.serve(rx);
                }
                Err(e) => {
                    let _ = itx.send(Err(e));
                }
            })
            .map_err(PtraceError::Spawn)?;
        match irx.recv() {
            Ok(Ok(())) => Ok(Tracee {
                pid,
                tx: Some(tx),
                worker: Some(worker),
            }),
            Ok(Err(e)) => {
                let _ = worker.join();
                Err(e)
            }
            Err(_) => {
                let _ = worker.join();
                Err(PtraceError::TracerGone)
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The live threads, seizing any created since the last look. Empty if
    /// the process is gone.
    pub fn tids(&self) -> Vec<i32> {
        self.call(Cmd::Tids).unwrap_or_default()
    }

    /// Stops every thread (`PTRACE_INTERRUPT`) and waits until each is in a
    /// ptrace stop, seizing threads created meanwhile. Idempotent.
    pub fn freeze(&self) -> Result<(), PtraceError> {
        self.call(Cmd::Freeze)
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// Resumes every stopped thread (`PTRACE_CONT` without a signal; a
    /// thread that was in a job-control stop stays stopped). Idempotent.
    pub fn thaw(&self) -> Result<(), PtraceError> {
        self.call(Cmd::Thaw).unwrap_or(Err(PtraceError::TracerGone))
    }

    /// Queues a SIGSTOP while every thread is held, so that if ferry dies
    /// from here on (the tracer goes, the kernel lets the threads go) the
    /// process stops instead of running: once the destination may run it,
    /// a stopped source is the safe leftover, a running one a duplicate. A
    /// normal [`Tracee::detach`] without `leave_stopped` cancels it with a
    /// SIGCONT (which the process sees, if it handles SIGCONT).
    pub fn guard_stop(&self) -> Result<(), PtraceError> {
        self.call(Cmd::GuardStop)
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// While `hold` is set, every detach (a drop included) leaves the
    /// process stopped, as `detach(true)` does: the two-phase end sets it
    /// when `Go` goes out, after which resuming the source could make a
    /// second copy. Clear it before a deliberate resume.
    pub fn hold_stopped_while(
        &self,
        hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<(), PtraceError> {
        self.call(|reply| Cmd::HoldStopped(hold, reply))
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// Whether every thread is in a ptrace stop.
    pub fn is_frozen(&self) -> bool {
        self.call(Cmd::IsFrozen).unwrap_or(false)
    }

    /// Injects syscall `nr` with `args` (at most 6) into the main thread and
    /// returns its result. A running main thread is stopped for the
    /// injection alone (the other threads keep running) and resumed after
    /// it; a frozen process stays frozen. A negative result is returned as
    /// [`PtraceError::SyscallFailed`].
    pub fn syscall(&self, nr: i64, args: &[u64]) -> Result<i64, PtraceError> {
        if args.len() > 6 {
            return Err(PtraceError::TooManyArgs(args.len()));
        }
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        self.call(|reply| Cmd::Syscall { nr, args: a, reply })
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// Runs `calls` (number and six arguments each) one after the other in
    /// thread `tid`, which must be in a ptrace stop, as [`Tracee::syscall_in`]
    /// would, but in one injection: code of ferry's own in the process runs
    /// them from a table it writes at `table` (`calls.len()` ×
    /// [`super::trampoline::BATCH_ENTRY`] bytes of writable memory of the
    /// process, e.g. a scratch mapping), which spares two thirds of the
    /// ptrace round trips of one injection each. Returns each call's raw
    /// result (`-errno` on failure: one call failing does not stop the
    /// others). Without room for the trampoline, falls back to one
    /// injection per call.
    pub fn syscalls_in(
        &self,
        tid: i32,
        table: u64,
        calls: Vec<(i64, [u64; 6])>,
    ) -> Result<Vec<i64>, PtraceError> {
        self.call(|reply| Cmd::SyscallsIn {
            tid,
            table,
            calls,
            reply,
        })
        .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// Injects syscall `nr` with `args` (at most 6) into thread `tid`, which
    /// must be in a ptrace stop (a frozen process; otherwise
    /// [`PtraceError::NotStopped`]). Every signal is blocked in the thread
    /// for the injection and its mask put back after it, so no signal
    /// handler of the target runs; a signal arriving meanwhile stays
    /// pending. The registers are restored as with [`Tracee::syscall`].
    pub fn syscall_in(&self, tid: i32, nr: i64, args: &[u64]) -> Result<i64, PtraceError> {
        if args.len() > 6 {
            return Err(PtraceError::TooManyArgs(args.len()));
        }
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        self.call(|reply| Cmd::SyscallIn {
            tid,
            nr,
            args: a,
            reply,
        })
        .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// The general registers of stopped thread `tid`, exactly as
    /// `PTRACE_GETREGS` returns them (see [`resume_regs`] for the form to
    /// save in an image).
    pub fn regs(&self, tid: i32) -> Result<user_regs_struct, PtraceError> {
        self.call(|reply| Cmd::Regs { tid, reply })
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// The whole XSAVE area of stopped thread `tid` (`PTRACE_GETREGSET
    /// NT_X86_XSTATE`), as many bytes as the kernel wrote: the legacy FPU
    /// and SSE area, the XSAVE header and every enabled component.
    pub fn xstate(&self, tid: i32) -> Result<Vec<u8>, PtraceError> {
        self.call(|reply| Cmd::Xstate { tid, reply })
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// The blocked-signal mask of stopped thread `tid`
    /// (`PTRACE_GETSIGMASK`; bit `n - 1` is signal `n`). Inside
    /// `sigsuspend` and friends this is the mask saved for after the call,
    /// which is the one a rewound thread must get back.
    pub fn sigmask(&self, tid: i32) -> Result<u64, PtraceError> {
        self.call(|reply| Cmd::Sigmask { tid, reply })
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// The signals queued for stopped thread `tid` (or, `shared`, for its
    /// whole process), each as the `siginfo_t` it will be delivered with,
    /// in the order of delivery within each signal (`PTRACE_PEEKSIGINFO`).
    /// A signal pending without an entry (the kernel could not allocate
    /// one) is in the pending mask only.
    pub fn queued_signals(&self, tid: i32, shared: bool) -> Result<Vec<Vec<u8>>, PtraceError> {
        self.call(|reply| Cmd::Queued { tid, shared, reply })
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// The `count` seccomp filters of stopped thread `tid`, oldest first
    /// (the order to install them in), each with the flags the kernel
    /// kept of it (`PTRACE_SECCOMP_GET_FILTER`, `PTRACE_GET_SECCOMP_METADATA`;
    /// `CAP_SYS_ADMIN`).
    pub fn seccomp_filters(&self, tid: i32, count: u32) -> Result<Vec<SeccompFilter>, PtraceError> {
        self.call(|reply| Cmd::Seccomp { tid, count, reply })
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// The rseq registration of stopped thread `tid`.
    pub fn rseq_config(&self, tid: i32) -> Result<RseqConfig, PtraceError> {
        self.call(|reply| Cmd::Rseq { tid, reply })
            .unwrap_or(Err(PtraceError::TracerGone))
    }

    /// Detaches every thread. With `leave_stopped` the process is left in a
    /// job-control stop (`SIGSTOP`, sent while every thread is still held,
    /// so no thread runs an instruction in between); otherwise it runs.
    pub fn detach(mut self, leave_stopped: bool) -> Result<(), PtraceError> {
        let r = self
            .call(|reply| Cmd::Detach {
                leave_stopped,
                reply,
            })
            .unwrap_or(Err(PtraceError::TracerGone));
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        r
    }

    fn call<T>(&self, make: impl FnOnce(SyncSender<T>) -> Cmd) -> Option<T> {
        let tx = self.tx.as_ref()?;
        let (rtx, rrx) = mpsc::sync_channel(1);
        tx.send(make(rtx)).ok()?;
        rrx.recv().ok()
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.tx.is_none() {
            return;
        }
        let detached = self.call(|reply| Cmd::Detach {
            leave_stopped: false,
            reply,
        });
        if let Some(Err(e)) = &detached {
            tracing::debug!(pid = self.pid, "detach on drop: {e}");
        }
        self.tx = None;
        // The tracer thread ends right after answering (or has ended). If it
        // did not answer, it is gone already, so joining cannot block.
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The robust futex list of thread `tid` (`get_robust_list(2)`): its head
/// address and length, `(0, 0)` if it registered none. A plain syscall, no
/// ptrace stop needed; the kernel allows it to whoever may ptrace-read
/// the thread.
pub fn robust_list(tid: i32) -> Result<(u64, u64), PtraceError> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: both out-pointers point to writable locals of the sizes the
    // kernel writes (a pointer and a size_t on x86_64).
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut libc::size_t,
        )
    };
    if r == -1 {
        return Err(match Errno::last() {
            Errno::ESRCH => PtraceError::ThreadExited(tid),
            errno => PtraceError::Os {
                op: "get_robust_list",
                tid,
                errno,
            },
        });
    }
    Ok((head, len as u64))
}

// ------------------------------------------------------------- tracer thread

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// Attached and running (or on its way to a stop we asked for).
    Running,
    /// In a job-control stop, released with `PTRACE_LISTEN`.
    Listening,
    /// In a ptrace stop: registers may be read and written.
    Stopped,
    /// Exiting or dead, its exit not yet reaped: nothing to do with it.
    Gone,
}

#[derive(Clone, Copy, Debug)]
struct Thread {
    run: Run,
    /// A `PTRACE_INTERRUPT` was sent and its stop is to be kept.
    want_stop: bool,
    /// The last event stop was a job-control (group) stop.
    group: bool,
    /// The thread sits in a `PTRACE_EVENT_STOP`, where `PTRACE_LISTEN` works.
    event_stop: bool,
}

impl Thread {
    fn new() -> Thread {
        Thread {
            run: Run::Running,
            want_stop: false,
            group: false,
            event_stop: false,
        }
    }
}

enum Event {
    Stop { tid: i32, status: i32 },
    Exit { tid: i32 },
}

impl Event {
    fn tid(&self) -> i32 {
        match *self {
            Event::Stop { tid, .. } | Event::Exit { tid } => tid,
        }
    }
}

/// What the injected thread did after a `PTRACE_SYSCALL`.
enum Step {
    Syscall,
    Signal(i32),
}

struct Worker {
    pid: i32,
    threads: BTreeMap<i32, Thread>,
    want_frozen: bool,
    /// False when ferry is the target's real parent: its exit status then
    /// belongs to whoever spawned it.
    reap_leader: bool,
    /// A SIGSTOP is queued (see [`Tracee::guard_stop`]).
    stop_guard: bool,
    /// See [`Tracee::hold_stopped_while`].
    hold: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    dead: bool,
    detached: bool,
    insn: Option<u64>,
    /// Where injections run through the trampoline; `searched` once there
    /// was none (see [`super::trampoline`]).
    site: Option<super::trampoline::Site>,
    searched: bool,
    /// The site was found intact while no thread has run since: checking
    /// again before each injection of a frozen process would only cost.
    verified: bool,
    /// The thread being injected, the registers it must get back and, if
    /// the injection blocked its signals, its own mask: for teardown in the
    /// middle of an injection.
    injecting: Option<(i32, user_regs_struct, Option<u64>)>,
    /// The thread whose seccomp is suspended for an injection.
    suspending: Option<i32>,
}

impl Worker {
    fn attach(pid: i32) -> Result<Worker, PtraceError> {
        let parent = read_status(pid)
            .ok()
            .and_then(|s| status_field(&s, "PPid:").and_then(|v| v.parse::<i32>().ok()));
        let mut w = Worker {
            pid,
            threads: BTreeMap::new(),
            want_frozen: false,
            reap_leader: parent != Some(std::process::id() as i32),
            stop_guard: false,
            hold: None,
            dead: false,
            detached: false,
            insn: None,
            site: None,
            searched: false,
            verified: false,
            injecting: None,
            suspending: None,
        };
        // The main thread first: its failure is the process's failure.
        match seize_thread(pid) {
            Ok(()) => {
                w.threads.insert(pid, Thread::new());
            }
            Err(Errno::ESRCH) => return Err(PtraceError::NoProcess(pid)),
            Err(Errno::EPERM) => return Err(diagnose_eperm(pid)),
            Err(errno) => {
                return Err(PtraceError::Os {
                    op: "PTRACE_SEIZE",
                    tid: pid,
                    errno,
                })
            }
        }
        for _ in 0..MAX_LIST_PASSES {
            if !w.refresh()? {
                return Ok(w);
            }
        }
        // Still growing: the rest are caught by the next freeze.
        tracing::debug!(pid, "thread list still changing after seize");
        Ok(w)
    }

    fn serve(mut self, rx: Receiver<Cmd>) {
        loop {
            let cmd = if self.needs_polling() {
                match rx.recv_timeout(POLL_INTERVAL) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = self.service() {
                            tracing::warn!(pid = self.pid, "tracer: {e}");
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                }
            };
            match cmd {
                Cmd::Tids(reply) => {
                    if let Err(e) = self.service().and_then(|()| self.refresh().map(drop)) {
                        tracing::debug!(pid = self.pid, "listing threads: {e}");
                    }
                    let _ = reply.send(self.live_tids());
                }
                Cmd::IsFrozen(reply) => {
                    let _ = self.service();
                    let _ = reply.send(self.is_frozen());
                }
                Cmd::GuardStop(reply) => {
                    let _ = reply.send(self.guard_stop());
                }
                Cmd::HoldStopped(hold, reply) => {
                    self.hold = Some(hold);
                    let _ = reply.send(Ok(()));
                }
                Cmd::Freeze(reply) => {
                    let _ = reply.send(self.freeze());
                }
                Cmd::Thaw(reply) => {
                    let _ = reply.send(self.thaw());
                }
                Cmd::Syscall { nr, args, reply } => {
                    let _ = reply.send(self.syscall(nr, &args));
                }
                Cmd::SyscallIn {
                    tid,
                    nr,
                    args,
                    reply,
                } => {
                    let _ = reply.send(self.syscall_in(tid, nr, &args));
                }
                Cmd::SyscallsIn {
                    tid,
                    table,
                    calls,
                    reply,
                } => {
                    let r = self.syscalls_in(tid, table, &calls);
                    if let Err(e) = &r {
                        self.recover_injection(e);
                        self.disarm();
                    }
                    let _ = reply.send(r);
                }
                Cmd::Regs { tid, reply } => {
                    let r = self.require_stopped(tid).and_then(|()| {
                        pt::getregs(Pid::from_raw(tid)).map_err(|errno| PtraceError::Os {
                            op: "PTRACE_GETREGS",
                            tid,
                            errno,
                        })
                    });
                    let _ = reply.send(r);
                }
                Cmd::Xstate { tid, reply } => {
                    let r = self.require_stopped(tid).and_then(|()| {
                        get_xstate(tid).map_err(|errno| PtraceError::Os {
                            op: "PTRACE_GETREGSET NT_X86_XSTATE",
                            tid,
                            errno,
                        })
                    });
                    let _ = reply.send(r);
                }
                Cmd::Sigmask { tid, reply } => {
                    let r = self.require_stopped(tid).and_then(|()| {
                        get_sigmask(tid).map_err(|errno| PtraceError::Os {
                            op: "PTRACE_GETSIGMASK",
                            tid,
                            errno,
                        })
                    });
                    let _ = reply.send(r);
                }
                Cmd::Queued { tid, shared, reply } => {
                    let r = self.require_stopped(tid).and_then(|()| {
                        peek_siginfo(tid, shared).map_err(|errno| PtraceError::Os {
                            op: "PTRACE_PEEKSIGINFO",
                            tid,
                            errno,
                        })
                    });
                    let _ = reply.send(r);
                }
                Cmd::Seccomp { tid, count, reply } => {
                    let r = self.require_stopped(tid).and_then(|()| {
                        (0..u64::from(count))
                            .map(|index| seccomp_filter(tid, index))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|(op, errno)| PtraceError::Os { op, tid, errno })
                    });
                    let _ = reply.send(r);
                }
                Cmd::Rseq { tid, reply } => {
                    let r = self.require_stopped(tid).and_then(|()| {
                        get_rseq(tid).map_err(|errno| PtraceError::Os {
                            op: "PTRACE_GET_RSEQ_CONFIGURATION",
                            tid,
                            errno,
                        })
                    });
                    let _ = reply.send(r);
                }
                Cmd::Detach {
                    leave_stopped,
                    reply,
                } => {
                    let _ = reply.send(self.detach(leave_stopped));
                    return;
                }
            }
        }
    }

    fn needs_polling(&self) -> bool {
        !self.dead
            && self
                .threads
                .values()
                .any(|t| matches!(t.run, Run::Running | Run::Listening))
    }

    fn live_tids(&self) -> Vec<i32> {
        self.threads
            .iter()
            .filter(|(_, t)| t.run != Run::Gone)
            .map(|(&tid, _)| tid)
            .collect()
    }

    fn is_frozen(&self) -> bool {
        !self.dead
            && self.threads.values().any(|t| t.run == Run::Stopped)
            && self
                .threads
                .values()
                .all(|t| matches!(t.run, Run::Stopped | Run::Gone))
    }

    fn alive(&self) -> Result<(), PtraceError> {
        if self.dead || self.threads.is_empty() {
            Err(PtraceError::NoProcess(self.pid))
        } else {
            Ok(())
        }
    }

    /// Seizes threads not seen before; true if there were any.
    fn refresh(&mut self) -> Result<bool, PtraceError> {
        if self.dead {
            return Ok(false);
        }
        let tids = match list_tasks(self.pid) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(false);
            }
            Err(source) => {
                return Err(PtraceError::Proc {
                    path: format!("/proc/{}/task", self.pid),
                    source,
                })
            }
        };
        let mut new = false;
        for tid in tids {
            if self.threads.contains_key(&tid) {
                continue;
            }
            match seize_thread(tid) {
                Ok(()) => {
                    self.threads.insert(tid, Thread::new());
                    new = true;
                }
                // Exited meanwhile, or exiting (a zombie cannot be seized).
                Err(Errno::ESRCH | Errno::EPERM) => {}
                Err(errno) => {
                    return Err(PtraceError::Os {
                        op: "PTRACE_SEIZE",
                        tid,
                        errno,
                    })
                }
            }
        }
        Ok(new)
    }

    fn freeze(&mut self) -> Result<(), PtraceError> {
        self.alive()?;
        self.want_frozen = true;
        let deadline = Instant::now() + STOP_TIMEOUT;
        for _ in 0..MAX_LIST_PASSES {
            self.refresh()?;
            let pending: Vec<i32> = self
                .threads
                .iter()
                .filter(|(_, t)| matches!(t.run, Run::Running | Run::Listening) && !t.want_stop)
                .map(|(&tid, _)| tid)
                .collect();
            for tid in pending {
                self.interrupt(tid)?;
            }
            self.wait_until(deadline, "every thread to stop", Worker::all_stopped)?;
            // Stopped threads create no threads: once a fresh listing
            // finds nothing new, the set is complete.
            if !self.refresh()? {
                return Ok(());
            }
        }
        Err(PtraceError::Unexpected {
            tid: self.pid,
            what: "threads keep appearing while freezing".into(),
        })
    }

    fn all_stopped(&self) -> bool {
        self.threads
            .values()
            .all(|t| matches!(t.run, Run::Stopped | Run::Gone))
    }

    fn thaw(&mut self) -> Result<(), PtraceError> {
        self.want_frozen = false;
        self.alive()?;
        let tids: Vec<i32> = self.threads.keys().copied().collect();
        let mut first_err = None;
        for tid in tids {
            if let Err(e) = self.resume(tid) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Lets a stopped thread go: `PTRACE_CONT`, or back into its job-control
    /// stop with `PTRACE_LISTEN`.
    fn resume(&mut self, tid: i32) -> Result<(), PtraceError> {
        self.verified = false;
        let Some(t) = self.threads.get_mut(&tid) else {
            return Ok(());
        };
        t.want_stop = false;
        if t.run != Run::Stopped {
            return Ok(());
        }
        let t = *t;
        if t.group && t.event_stop {
            self.request(tid, Req::Listen, 0, Run::Listening)
        } else if t.group {
            // Left the group stop for an injection: re-trap it into an event
            // stop, which the generic handler turns into PTRACE_LISTEN.
            self.request(tid, Req::Interrupt, 0, Run::Stopped)?;
            self.request(tid, Req::Cont, 0, Run::Running)
        } else {
            self.request(tid, Req::Cont, 0, Run::Running)
        }
    }

    /// Sends `PTRACE_INTERRUPT` and records that its stop is to be kept.
    fn interrupt(&mut self, tid: i32) -> Result<(), PtraceError> {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.want_stop = true;
        }
        let run = self.threads.get(&tid).map_or(Run::Gone, |t| t.run);
        self.request(tid, Req::Interrupt, 0, run)
    }

    /// One ptrace request; on success the thread's state becomes `then`. A
    /// thread that is gone (`ESRCH`) is marked so and not an error: its
    /// exit is reaped when it is reported.
    fn request(&mut self, tid: i32, req: Req, data: usize, then: Run) -> Result<(), PtraceError> {
        match ptrace_req(req, tid, data) {
            Ok(()) => {
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.run = then;
                    if then != Run::Stopped {
                        t.event_stop = false;
                    }
                }
                Ok(())
            }
            Err(Errno::ESRCH) => {
                // Dead or dying; or, if /proc still shows it alive, not in
                // the stop we thought: then it runs, and a freeze stops it.
                let alive = thread_alive(self.pid, tid);
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.run = if alive && !matches!(req, Req::Interrupt) {
                        Run::Running
                    } else {
                        Run::Gone
                    };
                    t.event_stop = false;
                }
                Ok(())
            }
            Err(errno) => Err(PtraceError::Os {
                op: req.name(),
                tid,
                errno,
            }),
        }
    }

    /// Handles every event available now.
    fn service(&mut self) -> Result<(), PtraceError> {
        while let Some(ev) = self.next_event()? {
            self.dispatch(ev)?;
        }
        Ok(())
    }

    /// The next ptrace stop or thread exit of our tracees, without blocking.
    fn next_event(&mut self) -> Result<Option<Event>, PtraceError> {
        const BASE: i32 = libc::WNOHANG | libc::__WALL | libc::__WNOTHREAD;
        let os = |errno| PtraceError::Os {
            op: "waitid",
            tid: self.pid,
            errno,
        };
        // Stops first, consumed at once: the hot path of an injection.
        // Without WEXITED no exit is reported (nor reaped), and the kernel
        // answers ECHILD for tracees that merely run.
        match waitid(libc::P_ALL, 0, BASE | libc::WSTOPPED) {
            Ok(Some(w)) => {
                return Ok(Some(Event::Stop {
                    tid: w.pid,
                    status: w.status,
                }))
            }
            Ok(None) | Err(Errno::ECHILD) => {}
            Err(errno) => return Err(os(errno)),
        }
        // Then exits, looked at before being reaped. ptrace stops are
        // reported whatever the flags, so one may show up here too.
        let w = match waitid(libc::P_ALL, 0, BASE | libc::WEXITED | libc::WNOWAIT) {
            Ok(Some(w)) => w,
            Ok(None) => return Ok(None),
            Err(Errno::ECHILD) => return Ok(self.no_tracees()),
            Err(errno) => return Err(os(errno)),
        };
        let tid = w.pid;
        if matches!(w.code, libc::CLD_TRAPPED | libc::CLD_STOPPED) {
            return match waitid(libc::P_PID, tid as libc::id_t, BASE | libc::WSTOPPED) {
                Ok(Some(w)) => Ok(Some(Event::Stop {
                    tid,
                    status: w.status,
                })),
                Ok(None) | Err(Errno::ECHILD) => Ok(None),
                Err(errno) => Err(os(errno)),
            };
        }
        if tid == self.pid && !self.reap_leader {
            // Left for the parent: reported once, then ignored.
            return Ok(self
                .threads
                .contains_key(&tid)
                .then_some(Event::Exit { tid }));
        }
        let _ = waitid(libc::P_PID, tid as libc::id_t, BASE | libc::WEXITED);
        Ok(Some(Event::Exit { tid }))
    }

    /// The kernel says this thread traces nothing (any more): whatever we
    /// still list is gone (reaped by someone else, e.g. the real parent).
    fn no_tracees(&mut self) -> Option<Event> {
        if !self.threads.is_empty() {
            self.threads.clear();
            self.dead = true;
        }
        None
    }

    fn dispatch(&mut self, ev: Event) -> Result<(), PtraceError> {
        match ev {
            Event::Exit { tid } => {
                self.threads.remove(&tid);
                // The main thread is reported last, when the group is empty.
                if tid == self.pid || self.threads.is_empty() {
                    self.threads.clear();
                    self.dead = true;
                }
                Ok(())
            }
            Event::Stop { tid, status } => self.on_stop(tid, status),
        }
    }

    /// The generic handling of a stop: keep it if we asked for it, otherwise
    /// put the thread back where it was going, passing signals on.
    fn on_stop(&mut self, tid: i32, status: i32) -> Result<(), PtraceError> {
        let keep = self.want_frozen;
        let Some(t) = self.threads.get_mut(&tid) else {
            // Not ours to hold (cannot happen without auto-attach options).
            let _ = ptrace_req(Req::Cont, tid, 0);
            return Ok(());
        };
        let sig = status & 0xff;
        let event = status >> 8;
        if event == PTRACE_EVENT_STOP {
            t.group = sig != libc::SIGTRAP;
            t.event_stop = true;
            if t.want_stop || keep {
                t.want_stop = false;
                t.run = Run::Stopped;
                Ok(())
            } else if t.group {
                t.run = Run::Stopped;
                self.request(tid, Req::Listen, 0, Run::Listening)
            } else {
                t.run = Run::Stopped;
                self.request(tid, Req::Cont, 0, Run::Running)
            }
        } else if status == SYSCALL_STOP || event != 0 {
            t.event_stop = false;
            t.run = Run::Stopped;
            if t.want_stop || keep {
                t.want_stop = false;
                Ok(())
            } else {
                self.request(tid, Req::Cont, 0, Run::Running)
            }
        } else {
            // Signal-delivery stop: deliver it now. A pending interrupt
            // still traps once the signal is handled.
            t.run = Run::Stopped;
            t.event_stop = false;
            self.request(tid, Req::Cont, sig as usize, Run::Running)
        }
    }

    /// Handles events until `done` holds, backing off between polls.
    fn wait_until(
        &mut self,
        deadline: Instant,
        what: &'static str,
        done: fn(&Worker) -> bool,
    ) -> Result<(), PtraceError> {
        let mut backoff = Backoff::default();
        loop {
            self.service()?;
            self.alive()?;
            if done(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PtraceError::Timeout {
                    tid: self.pid,
                    what,
                });
            }
            backoff.wait();
        }
    }

    /// Waits for `tid` to be in a ptrace stop.
    fn wait_stopped(&mut self, tid: i32, deadline: Instant) -> Result<(), PtraceError> {
        let mut backoff = Backoff::default();
        loop {
            self.service()?;
            self.alive()?;
            match self.threads.get(&tid).map(|t| t.run) {
                Some(Run::Stopped) => return Ok(()),
                None | Some(Run::Gone) => return Err(PtraceError::ThreadExited(tid)),
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(PtraceError::Timeout {
                    tid,
                    what: "the thread to stop",
                });
            }
            backoff.wait();
        }
    }

    /// The next event of `tid`, handling other threads' events meanwhile.
    fn wait_own_event(&mut self, tid: i32, deadline: Instant) -> Result<Event, PtraceError> {
        let mut backoff = Backoff::default();
        loop {
            while let Some(ev) = self.next_event()? {
                if ev.tid() == tid {
                    if let Event::Stop { .. } = ev {
                        if let Some(t) = self.threads.get_mut(&tid) {
                            t.run = Run::Stopped;
                        }
                    } else {
                        self.dispatch(Event::Exit { tid })?;
                    }
                    return Ok(ev);
                }
                self.dispatch(ev)?;
            }
            if Instant::now() > deadline {
                return Err(PtraceError::Timeout {
                    tid,
                    what: "a syscall stop of the injected syscall",
                });
            }
            backoff.wait();
        }
    }

    fn syscall(&mut self, nr: i64, args: &[u64; 6]) -> Result<i64, PtraceError> {
        self.alive()?;
        let tid = self.main_tid()?;
        let was_stopped = self.threads.get(&tid).map(|t| t.run) == Some(Run::Stopped);
        if !was_stopped {
            self.interrupt(tid)?;
            self.wait_stopped(tid, Instant::now() + STOP_TIMEOUT)?;
        }
        let result = self.inject(tid, nr, args, false);
        if let Err(e) = &result {
            self.recover_injection(e);
        }
        if !was_stopped && !self.want_frozen {
            let resumed = self.resume(tid);
            if result.is_ok() {
                resumed?;
            }
        }
        result
    }

    /// Injection into one stopped thread with its signals blocked; see
    /// [`Tracee::syscall_in`].
    fn syscall_in(&mut self, tid: i32, nr: i64, args: &[u64; 6]) -> Result<i64, PtraceError> {
        self.alive()?;
        self.require_stopped(tid)?;
        let result = self.inject(tid, nr, args, true);
        if let Err(e) = &result {
            self.recover_injection(e);
        }
        result
    }

    /// Ok if `tid` is one of ours and sits in a ptrace stop.
    fn require_stopped(&mut self, tid: i32) -> Result<(), PtraceError> {
        self.service()?;
        self.alive()?;
        match self.threads.get(&tid).map(|t| t.run) {
            Some(Run::Stopped) => Ok(()),
            _ => Err(PtraceError::NotStopped(tid)),
        }
    }

    /// The main thread, or any live thread if it has exited alone.
    fn main_tid(&self) -> Result<i32, PtraceError> {
        let live = |t: &Thread| t.run != Run::Gone;
        if self.threads.get(&self.pid).is_some_and(live) {
            return Ok(self.pid);
        }
        self.threads
            .iter()
            .find(|(_, t)| live(t))
            .map(|(&tid, _)| tid)
            .ok_or(PtraceError::NoProcess(self.pid))
    }

    /// Runs syscall `nr` in stopped thread `tid` and puts the thread back as
    /// it was; with `block`, every signal is blocked in it meanwhile. The
    /// syscall runs through the trampoline (see [`super::trampoline`]), so
    /// from the first register change to the last, a ferry killed here
    /// leaves a thread that resumes with its own registers and mask.
    fn inject(
        &mut self,
        tid: i32,
        nr: i64,
        args: &[u64; 6],
        block: bool,
    ) -> Result<i64, PtraceError> {
        self.seccomp_suspended(tid, |w| w.inject_as_is(tid, nr, args, block))
    }

    /// Runs `f`, which injects into stopped thread `tid`, with the thread's
    /// seccomp filters suspended (`PTRACE_O_SUSPEND_SECCOMP`): ferry's
    /// calls are not the process's, and a filter may deny or kill for them
    /// (Docker's default profile denies `userfaultfd`). The suspension ends
    /// with the injection: between injections the process runs under its
    /// filters as before. A ferry that cannot suspend (no `CAP_SYS_ADMIN`,
    /// or itself under seccomp) goes on where the thread has no filter.
    fn seccomp_suspended<T>(
        &mut self,
        tid: i32,
        f: impl FnOnce(&mut Self) -> Result<T, PtraceError>,
    ) -> Result<T, PtraceError> {
        let os = |errno| PtraceError::Os {
            op: "PTRACE_SETOPTIONS (PTRACE_O_SUSPEND_SECCOMP)",
            tid,
            errno,
        };
        let suspended = match set_options(tid, SEIZE_OPTIONS | PTRACE_O_SUSPEND_SECCOMP) {
            Ok(()) => true,
            Err(errno) => {
                let filtered =
                    std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", self.pid))
                        .ok()
                        .and_then(|t| crate::procfs::parse_status(&t).ok())
                        .is_none_or(|st| st.seccomp != 0);
                if filtered {
                    return Err(os(errno));
                }
                false
            }
        };
        self.suspending = suspended.then_some(tid);
        let r = f(self);
        self.suspending = None;
        if suspended {
            let back = set_options(tid, SEIZE_OPTIONS).map_err(os);
            // A thread that died or left its stop keeps no suspension.
            if r.is_ok() {
                back?;
            }
        }
        r
    }

    fn inject_as_is(
        &mut self,
        tid: i32,
        nr: i64,
        args: &[u64; 6],
        block: bool,
    ) -> Result<i64, PtraceError> {
        let os = |op: &'static str| move |errno: Errno| PtraceError::Os { op, tid, errno };
        let mask = get_sigmask(tid).map_err(os("PTRACE_GETSIGMASK"))?;
        for _ in 0..MAX_INJECT_ATTEMPTS {
            let saved = pt::getregs(Pid::from_raw(tid)).map_err(os("PTRACE_GETREGS"))?;
            let mut restore = saved;
            rewind_interrupted_syscall(&mut restore);
            let insn = self.injection_site(&restore, mask)?;
            let mut regs = saved;
            regs.rip = insn;
            regs.rax = nr as u64;
            regs.orig_rax = u64::MAX;
            regs.rdi = args[0];
            regs.rsi = args[1];
            regs.rdx = args[2];
            regs.r10 = args[3];
            regs.r8 = args[4];
            regs.r9 = args[5];
            pt::setregs(Pid::from_raw(tid), regs).map_err(os("PTRACE_SETREGS"))?;
            self.injecting = Some((tid, restore, block.then_some(mask)));
            if block {
                // SIGKILL and SIGSTOP are dropped from the mask by the
                // kernel; they cannot run a handler anyway.
                set_sigmask(tid, u64::MAX).map_err(os("PTRACE_SETSIGMASK"))?;
            }
            if crate::failpoint::armed("ptrace", "kill-before-entry") {
                crate::failpoint::die();
            }
            match self.syscall_step(tid)? {
                Step::Syscall => {}
                Step::Signal(sig) => {
                    // A signal was due before our syscall ran. Deliver it on
                    // the thread's own registers, as if we were not here
                    // (handler frame, restart rules), then start over from
                    // the stop that follows.
                    if block {
                        set_sigmask(tid, mask).map_err(os("PTRACE_SETSIGMASK"))?;
                    }
                    pt::setregs(Pid::from_raw(tid), saved).map_err(os("PTRACE_SETREGS"))?;
                    self.injecting = None;
                    self.verified = false;
                    self.interrupt(tid)?;
                    // The handler is the process's own code: it runs
                    // under its filters.
                    let suspended = self.suspending == Some(tid);
                    if suspended {
                        set_options(tid, SEIZE_OPTIONS).map_err(os("PTRACE_SETOPTIONS"))?;
                    }
                    self.request(tid, Req::Cont, sig as usize, Run::Running)?;
                    self.wait_stopped(tid, Instant::now() + STOP_TIMEOUT)?;
                    if suspended {
                        set_options(tid, SEIZE_OPTIONS | PTRACE_O_SUSPEND_SECCOMP)
                            .map_err(os("PTRACE_SETOPTIONS"))?;
                    }
                    continue;
                }
            }
            if crate::failpoint::armed(
                "ptrace",
                if block {
                    "kill-at-entry-frozen"
                } else {
                    "kill-at-entry"
                },
            ) {
                crate::failpoint::die();
            }
            if let Step::Signal(sig) = self.syscall_step(tid)? {
                return Err(PtraceError::Unexpected {
                    tid,
                    what: format!("signal {sig} stop between syscall entry and exit"),
                });
            }
            if crate::failpoint::armed("ptrace", "kill-at-exit") {
                crate::failpoint::die();
            }
            let out = pt::getregs(Pid::from_raw(tid)).map_err(os("PTRACE_GETREGS"))?;
            self.put_back(tid, &restore, block.then_some(mask))?;
            let rax = out.rax as i64;
            return if (-4095..0).contains(&rax) {
                Err(PtraceError::SyscallFailed {
                    nr,
                    errno: Errno::from_raw(-rax as i32),
                })
            } else {
                Ok(rax)
            };
        }
        Err(PtraceError::Unexpected {
            tid,
            what: "signals kept arriving before the injected syscall".into(),
        })
    }

    /// Gives an injected thread its own mask (if the injection changed it)
    /// and registers back, the mask first: until the registers are back, the
    /// trampoline would still restore both.
    fn put_back(
        &mut self,
        tid: i32,
        regs: &user_regs_struct,
        mask: Option<u64>,
    ) -> Result<(), PtraceError> {
        let os = |op: &'static str| move |errno: Errno| PtraceError::Os { op, tid, errno };
        let masked = match mask.map(|m| set_sigmask(tid, m)) {
            // Gone meanwhile: the register write says so.
            None | Some(Ok(()) | Err(Errno::ESRCH)) => Ok(()),
            Some(Err(errno)) => {
                // Left with every signal blocked: say so loudly.
                tracing::error!(tid, "restoring the signal mask after an injection: {errno}");
                Err(errno)
            }
        };
        let set = pt::setregs(Pid::from_raw(tid), *regs).map_err(os("PTRACE_SETREGS"));
        self.disarm();
        set?;
        self.injecting = None;
        masked.map_err(os("PTRACE_SETSIGMASK"))
    }

    /// Puts the bytes under the trampoline back (see
    /// [`super::trampoline::Site`]); a site that cannot be written is
    /// dropped, never used again.
    fn disarm(&mut self) {
        if let Some(site) = &mut self.site {
            if let Err(e) = site.disarm() {
                tracing::warn!(
                    pid = self.pid,
                    "putting back the bytes under the trampoline: {e}"
                );
                self.site = None;
            }
        }
    }

    /// The address to inject through for a thread whose own registers are
    /// `regs` and mask `mask`: a trampoline armed for it, or, where the
    /// process has no room for one, a bare `syscall` instruction (a ferry
    /// killed mid-injection then leaves that thread with wrong registers:
    /// said once, loudly).
    fn injection_site(&mut self, regs: &user_regs_struct, mask: u64) -> Result<u64, PtraceError> {
        if self.arm(&super::trampoline::code(regs, mask)) {
            if let Some(site) = &self.site {
                return Ok(site.addr);
            }
        }
        self.syscall_insn()
    }

    /// Finds the trampoline's site (once), checks it is still ours, and
    /// writes `code` there; false if the process has no site.
    fn arm(&mut self, code: &[u8]) -> bool {
        if !self.verified {
            if self.site.as_ref().is_some_and(|s| !s.intact(self.pid)) {
                // The mapping changed under us (an unloaded library).
                self.site = None;
                self.searched = false;
            }
            self.verified = self.is_frozen();
        }
        if self.site.is_none() && !self.searched {
            self.searched = true;
            self.site = super::trampoline::Site::find(self.pid);
            match &self.site {
                Some(s) => tracing::debug!(pid = self.pid, addr = s.addr, "injection trampoline"),
                None => tracing::warn!(
                    pid = self.pid,
                    "no room for an injection trampoline: a ferry killed during an injected syscall would leave a thread with wrong registers"
                ),
            }
        }
        let Some(site) = &mut self.site else {
            return false;
        };
        match site.arm(code) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pid = self.pid, "writing the injection trampoline: {e}");
                self.site = None;
                false
            }
        }
    }

    /// Runs `calls` in order in stopped thread `tid`, every signal blocked,
    /// through one batch trampoline whose table goes to `table`; see
    /// [`Tracee::syscalls_in`].
    fn syscalls_in(
        &mut self,
        tid: i32,
        table: u64,
        calls: &[(i64, [u64; 6])],
    ) -> Result<Vec<i64>, PtraceError> {
        self.alive()?;
        self.require_stopped(tid)?;
        self.seccomp_suspended(tid, |w| w.syscalls_in_as_is(tid, table, calls))
    }

    fn syscalls_in_as_is(
        &mut self,
        tid: i32,
        table: u64,
        calls: &[(i64, [u64; 6])],
    ) -> Result<Vec<i64>, PtraceError> {
        use super::trampoline::BATCH_ENTRY;
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let os = |op: &'static str| move |errno: Errno| PtraceError::Os { op, tid, errno };
        let mask = get_sigmask(tid).map_err(os("PTRACE_GETSIGMASK"))?;
        let saved = pt::getregs(Pid::from_raw(tid)).map_err(os("PTRACE_GETREGS"))?;
        let mut restore = saved;
        rewind_interrupted_syscall(&mut restore);
        let mut entries = vec![0u8; calls.len() * BATCH_ENTRY];
        for ((nr, args), e) in calls.iter().zip(entries.chunks_mut(BATCH_ENTRY)) {
            for (k, v) in std::iter::once(*nr as u64)
                .chain(args.iter().copied())
                .enumerate()
            {
                e[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        let code = super::trampoline::batch_code(&restore, mask, table, calls.len() as u64);
        if !self.arm(&code) {
            // No room for code of ferry's own: one injection each.
            return calls
                .iter()
                .map(|(nr, args)| match self.syscall_in(tid, *nr, args) {
                    Err(PtraceError::SyscallFailed { errno, .. }) => Ok(-(errno as i64)),
                    r => r,
                })
                .collect();
        }
        let site = self.site.as_ref().map_or(0, |s| s.addr);
        let unexpected = |what: String| PtraceError::Unexpected { tid, what };
        if let Err(e) = super::vm::write(self.pid, table, &entries) {
            self.disarm();
            return Err(unexpected(format!(
                "writing a batch's table at {table:#x}: {e}"
            )));
        }
        let mut regs = saved;
        regs.rip = site;
        regs.orig_rax = u64::MAX;
        pt::setregs(Pid::from_raw(tid), regs).map_err(os("PTRACE_SETREGS"))?;
        self.injecting = Some((tid, restore, Some(mask)));
        set_sigmask(tid, u64::MAX).map_err(os("PTRACE_SETSIGMASK"))?;
        for i in 0..calls.len() {
            // Entry and exit of each call; with every signal blocked only
            // SIGKILL or a stop could come between.
            for _ in 0..2 {
                if let Step::Signal(sig) = self.syscall_step(tid)? {
                    return Err(unexpected(format!(
                        "signal {sig} stop in call {i} of a batch of injected syscalls"
                    )));
                }
            }
            if crate::failpoint::armed("ptrace", "kill-in-batch") {
                crate::failpoint::die();
            }
        }
        // The code stores each result after its call; the last one is only
        // in `rax` at this exit stop, where the thread goes back.
        let last = pt::getregs(Pid::from_raw(tid))
            .map_err(os("PTRACE_GETREGS"))?
            .rax as i64;
        self.put_back(tid, &restore, Some(mask))?;
        super::vm::read(self.pid, table, &mut entries)
            .map_err(|e| unexpected(format!("reading a batch's results at {table:#x}: {e}")))?;
        let mut results: Vec<i64> = entries
            .chunks(BATCH_ENTRY)
            .map(|e| i64::from_le_bytes(e[56..64].try_into().expect("8 bytes")))
            .collect();
        if let Some(r) = results.last_mut() {
            *r = last;
        }
        Ok(results)
    }

    /// Resumes `tid` with `PTRACE_SYSCALL` and waits for its next syscall
    /// stop. Job-control stops on the way are stepped over (and remembered);
    /// a signal-delivery stop is returned. If the syscall blocks past the
    /// timeout, it is interrupted so the registers can still be restored.
    fn syscall_step(&mut self, tid: i32) -> Result<Step, PtraceError> {
        self.request(tid, Req::Syscall, 0, Run::Running)?;
        let mut deadline = Instant::now() + STOP_TIMEOUT;
        let mut timed_out = false;
        loop {
            let ev = match self.wait_own_event(tid, deadline) {
                Ok(ev) => ev,
                Err(PtraceError::Timeout { .. }) if !timed_out => {
                    timed_out = true;
                    let _ = ptrace_req(Req::Interrupt, tid, 0);
                    deadline = Instant::now() + Duration::from_secs(1);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let status = match ev {
                Event::Stop { status, .. } => status,
                Event::Exit { .. } => {
                    self.injecting = None;
                    return Err(if self.dead {
                        PtraceError::NoProcess(self.pid)
                    } else {
                        PtraceError::ThreadExited(tid)
                    });
                }
            };
            if status == SYSCALL_STOP {
                if timed_out {
                    return Err(PtraceError::Timeout {
                        tid,
                        what: "the injected syscall to return",
                    });
                }
                return Ok(Step::Syscall);
            }
            let (sig, event) = (status & 0xff, status >> 8);
            if event == 0 {
                return Ok(Step::Signal(sig));
            }
            if event == PTRACE_EVENT_STOP {
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.group = sig != libc::SIGTRAP;
                }
            }
            self.request(tid, Req::Syscall, 0, Run::Running)?;
        }
    }

    /// After a failed injection: make sure the thread has its own registers
    /// back if it is still there.
    fn recover_injection(&mut self, why: &PtraceError) {
        let Some((tid, regs, mask)) = self.injecting.take() else {
            return;
        };
        if self.threads.get(&tid).map(|t| t.run) != Some(Run::Stopped) {
            if let Some(t) = self.threads.get_mut(&tid) {
                t.want_stop = true;
            }
            let _ = ptrace_req(Req::Interrupt, tid, 0);
            if self
                .wait_stopped(tid, Instant::now() + Duration::from_secs(1))
                .is_err()
            {
                tracing::error!(tid, "injection failed ({why}) and the thread could not be stopped to restore its registers");
                return;
            }
        }
        if let Err(e) = self.put_back(tid, &regs, mask) {
            tracing::error!(tid, "injection failed ({why}); restoring registers: {e}");
        }
    }

    /// Address of a `syscall` instruction in the target: `[vdso]` first,
    /// then any executable mapping. Found once.
    fn syscall_insn(&mut self) -> Result<u64, PtraceError> {
        if let Some(a) = self.insn {
            return Ok(a);
        }
        let path = format!("/proc/{}/maps", self.pid);
        let maps =
            fs::read_to_string(&path).map_err(|source| PtraceError::Proc { path, source })?;
        let mut exec: Vec<(u64, u64, bool)> =
            maps.lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (s, e) = f.next()?.split_once('-')?;
                    let perms = f.next()?;
                    let name = f.nth(3).unwrap_or("");
                    let (s, e) = (
                        u64::from_str_radix(s, 16).ok()?,
                        u64::from_str_radix(e, 16).ok()?,
                    );
                    (perms.as_bytes().get(2) == Some(&b'x') && e < super::USER_ADDR_END)
                        .then_some((s, e, name == "[vdso]"))
                })
                .collect();
        exec.sort_by_key(|&(_, _, vdso)| !vdso);
        let mut buf = Vec::new();
        for (s, e) in exec.into_iter().map(|(s, e, _)| (s, e.min(s + (4 << 20)))) {
            if super::vm::read_ranges(self.pid, &[(s, e)], &mut buf).is_err() {
                continue;
            }
            if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
                self.insn = Some(s + i as u64);
                return Ok(s + i as u64);
            }
        }
        Err(PtraceError::NoSyscallInsn(self.pid))
    }

    fn guard_stop(&mut self) -> Result<(), PtraceError> {
        if !self.is_frozen() {
            return Err(PtraceError::Unexpected {
                tid: self.pid,
                what: "the stop guard needs every thread held".into(),
            });
        }
        kill(Pid::from_raw(self.pid), Signal::SIGSTOP).map_err(|errno| PtraceError::Os {
            op: "kill(SIGSTOP)",
            tid: self.pid,
            errno,
        })?;
        self.stop_guard = true;
        Ok(())
    }

    fn detach(&mut self, leave_stopped: bool) -> Result<(), PtraceError> {
        let held = self
            .hold
            .as_ref()
            .is_some_and(|h| h.load(std::sync::atomic::Ordering::SeqCst));
        let leave_stopped = leave_stopped || held;
        self.detached = true;
        if self.dead || self.threads.is_empty() {
            self.threads.clear();
            return Err(PtraceError::NoProcess(self.pid));
        }
        // PTRACE_DETACH needs a ptrace stop (a listening thread is not).
        let frozen = self.freeze();
        self.disarm();
        if self.stop_guard && !leave_stopped {
            // Discards the queued SIGSTOP.
            if let Err(errno) = kill(Pid::from_raw(self.pid), Signal::SIGCONT) {
                tracing::warn!(pid = self.pid, "SIGCONT cancelling the stop guard: {errno}");
            }
        }
        if leave_stopped && frozen.is_ok() && !self.stop_guard {
            // Queued while every thread is held: each one takes the group
            // stop on its way out of the ptrace stop, before user code.
            if let Err(errno) = kill(Pid::from_raw(self.pid), Signal::SIGSTOP) {
                tracing::warn!(pid = self.pid, "SIGSTOP before detach: {errno}");
            }
        }
        let mut first_err = frozen.err();
        for (&tid, t) in &self.threads {
            if t.run != Run::Stopped {
                continue;
            }
            match ptrace_req(Req::Detach, tid, 0) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(errno) => {
                    first_err.get_or_insert(PtraceError::Os {
                        op: "PTRACE_DETACH",
                        tid,
                        errno,
                    });
                }
            }
        }
        // Threads that could not be stopped are released by the kernel when
        // this thread exits.
        self.threads.clear();
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some((tid, ..)) = self.injecting {
            // Torn down mid-injection (a panic): put the registers back.
            self.recover_injection(&PtraceError::Unexpected {
                tid,
                what: "teardown".into(),
            });
        }
        if !self.detached && !self.dead {
            if let Err(e) = self.detach(false) {
                tracing::debug!(pid = self.pid, "detach on teardown: {e}");
            }
        }
    }
}

/// Rewrites registers saved in an interrupted syscall so that, restored
/// after an injection, they re-issue it: the kernel's own restart logic runs
/// only on the way out of the original stop, which the injection replaced.
fn rewind_interrupted_syscall(r: &mut user_regs_struct) {
    if (r.orig_rax as i64) < 0 {
        return;
    }
    match -(r.rax as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => {
            // Continue through the restart block (remaining sleep time);
            // injected syscalls do not touch it.
            r.rax = libc::SYS_restart_syscall as u64;
            r.rip -= 2;
        }
        _ => {}
    }
}

#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    /// Spins with `yield` first (a stop normally takes tens of
    /// microseconds), then sleeps, doubling up to 256 µs: on a loaded
    /// machine a longer sleep is added to every injection.
    fn wait(&mut self) {
        if self.0 < 200 {
            thread::yield_now();
        } else {
            let shift = ((self.0 - 200) / 8).min(3);
            thread::sleep(Duration::from_micros(32 << shift));
        }
        self.0 = self.0.saturating_add(1);
    }
}

// ------------------------------------------------------------- raw calls

/// The ptrace requests whose `addr` is unused and whose `data` is an
/// integer (options or a signal number), never a pointer.
#[derive(Clone, Copy)]
enum Req {
    Seize,
    Interrupt,
    Cont,
    Syscall,
    Listen,
    Detach,
}

impl Req {
    fn raw(self) -> libc::c_uint {
        match self {
            Req::Seize => libc::PTRACE_SEIZE,
            Req::Interrupt => libc::PTRACE_INTERRUPT,
            Req::Cont => libc::PTRACE_CONT,
            Req::Syscall => libc::PTRACE_SYSCALL,
            Req::Listen => libc::PTRACE_LISTEN,
            Req::Detach => libc::PTRACE_DETACH,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Req::Seize => "PTRACE_SEIZE",
            Req::Interrupt => "PTRACE_INTERRUPT",
            Req::Cont => "PTRACE_CONT",
            Req::Syscall => "PTRACE_SYSCALL",
            Req::Listen => "PTRACE_LISTEN",
            Req::Detach => "PTRACE_DETACH",
        }
    }
}

fn ptrace_req(req: Req, tid: i32, data: usize) -> Result<(), Errno> {
    // SAFETY: every `Req` takes no pointer: `addr` is ignored and `data` is
    // read as an integer by the kernel, so no memory of ours is accessed.
    let r = unsafe {
        libc::ptrace(
            req.raw(),
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

fn check(r: libc::c_long) -> Result<libc::c_long, Errno> {
    if r == -1 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

fn get_sigmask(tid: i32) -> Result<u64, Errno> {
    let mut mask = 0u64;
    // SAFETY: `addr` is the size of the sigset (8 bytes on x86_64) and
    // `data` points to that many writable bytes of ours.
    check(unsafe {
        libc::ptrace(
            PTRACE_GETSIGMASK,
            tid,
            std::mem::size_of::<u64>(),
            &mut mask as *mut u64,
        )
    })?;
    Ok(mask)
}

/// One seccomp filter of a thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompFilter {
    /// Its `struct sock_filter` instructions, [`BPF_INSN_LEN`] bytes each.
    pub program: Vec<u8>,
    /// `SECCOMP_FILTER_FLAG_*` as the kernel reports them (`_LOG`).
    pub flags: u64,
}

/// `struct seccomp_metadata`.
#[repr(C)]
struct SeccompMetadata {
    filter_off: u64,
    flags: u64,
}

/// Filter `index` of thread `tid`: 0 is the oldest, the first installed
/// (the kernel walks `count - index - 1` steps back from the newest).
fn seccomp_filter(tid: i32, index: u64) -> Result<SeccompFilter, (&'static str, Errno)> {
    let get = "PTRACE_SECCOMP_GET_FILTER";
    // SAFETY: with a null `data` the kernel only returns the length.
    let len = check(unsafe {
        libc::ptrace(
            PTRACE_SECCOMP_GET_FILTER,
            tid,
            index as *mut libc::c_void,
            std::ptr::null_mut::<libc::c_void>(),
        )
    })
    .map_err(|e| (get, e))? as usize;
    let mut program = vec![0u8; len * BPF_INSN_LEN];
    // SAFETY: `data` points to room for the `len` instructions the kernel
    // just reported; a filter never changes once installed.
    let got = check(unsafe {
        libc::ptrace(
            PTRACE_SECCOMP_GET_FILTER,
            tid,
            index as *mut libc::c_void,
            program.as_mut_ptr(),
        )
    })
    .map_err(|e| (get, e))? as usize;
    program.truncate(got.min(len) * BPF_INSN_LEN);
    let mut md = SeccompMetadata {
        filter_off: index,
        flags: 0,
    };
    // SAFETY: `addr` is the size of the struct `data` points to, which the
    // kernel reads (`filter_off`) and writes.
    check(unsafe {
        libc::ptrace(
            PTRACE_GET_SECCOMP_METADATA,
            tid,
            std::mem::size_of::<SeccompMetadata>(),
            &mut md as *mut SeccompMetadata,
        )
    })
    .map_err(|e| ("PTRACE_GET_SECCOMP_METADATA", e))?;
    Ok(SeccompFilter {
        program,
        flags: md.flags,
    })
}

/// `struct ptrace_peeksiginfo_args`.
#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

fn peek_siginfo(tid: i32, shared: bool) -> Result<Vec<Vec<u8>>, Errno> {
    const BATCH: usize = 32;
    let mut out = Vec::new();
    let mut buf = vec![0u8; SIGINFO_LEN * BATCH];
    loop {
        let args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: BATCH as i32,
        };
        // SAFETY: `addr` points to the arguments, which the kernel only
        // reads; `data` to room for `nr` siginfo_t of ours, of which it
        // writes as many as it returns.
        let n = check(unsafe {
            libc::ptrace(
                PTRACE_PEEKSIGINFO,
                tid,
                &args as *const PeekSiginfoArgs,
                buf.as_mut_ptr(),
            )
        })? as usize;
        out.extend(
            buf.chunks(SIGINFO_LEN)
                .take(n.min(BATCH))
                .map(<[u8]>::to_vec),
        );
        if n < BATCH {
            return Ok(out);
        }
    }
}

fn set_sigmask(tid: i32, mask: u64) -> Result<(), Errno> {
    // SAFETY: `addr` is the size of the sigset and `data` points to it; the
    // kernel only reads it.
    check(unsafe {
        libc::ptrace(
            PTRACE_SETSIGMASK,
            tid,
            std::mem::size_of::<u64>(),
            &mask as *const u64,
        )
    })
    .map(drop)
}

/// `struct ptrace_rseq_configuration` of the uapi headers.
#[repr(C)]
#[derive(Default)]
struct RawRseqConfig {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

fn get_rseq(tid: i32) -> Result<RseqConfig, Errno> {
    let mut raw = RawRseqConfig::default();
    // SAFETY: `addr` is the size of the struct and `data` points to one of
    // ours, writable; the kernel writes at most `addr` bytes.
    check(unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<RawRseqConfig>(),
            &mut raw as *mut RawRseqConfig,
        )
    })?;
    Ok(RseqConfig {
        abi_pointer: raw.rseq_abi_pointer,
        abi_size: raw.rseq_abi_size,
        signature: raw.signature,
        flags: raw.flags,
    })
}

/// Size of the XSAVE area for every feature the CPU can enable (CPUID leaf
/// 0xD, sub-leaf 0, `ecx`), the most the kernel's regset can hold here.
fn xstate_size() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid_count;
        // SAFETY: CPUID exists on every x86_64 CPU and only reads
        // registers; leaf 0 gives the highest leaf, checked before 0xD.
        // (Safe functions on newer compilers, hence the allow.)
        #[allow(unused_unsafe)]
        let size = unsafe {
            if __cpuid_count(0, 0).eax >= 0xd {
                __cpuid_count(0xd, 0).ecx as usize
            } else {
                0
            }
        };
        size.max(MIN_XSTATE)
    }
    #[cfg(not(target_arch = "x86_64"))]
    MIN_XSTATE
}

fn get_xstate(tid: i32) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; xstate_size()];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `data` points to an iovec describing `buf`, which is writable
    // and outlives the call; the kernel writes at most `iov_len` bytes
    // there and stores the count written back into `iov_len`.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE,
            &mut iov as *mut libc::iovec,
        )
    })?;
    buf.truncate(iov.iov_len.min(buf.len()));
    Ok(buf)
}

/// No `PTRACE_O_EXITKILL`: ferry dying must not kill the target.
const SEIZE_OPTIONS: usize = libc::PTRACE_O_TRACESYSGOOD as usize;
/// Seccomp filters are not applied to the tracee's syscalls while set
/// (`CAP_SYS_ADMIN`); the kernel clears it when the tracer detaches or dies.
pub(crate) const PTRACE_O_SUSPEND_SECCOMP: usize = 1 << 21;

fn seize_thread(tid: i32) -> Result<(), Errno> {
    ptrace_req(Req::Seize, tid, SEIZE_OPTIONS)
}

fn set_options(tid: i32, options: usize) -> Result<(), Errno> {
    // SAFETY: PTRACE_SETOPTIONS reads `data` as an integer; `addr` is
    // ignored. No memory of ours is accessed.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETOPTIONS,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            options as *mut libc::c_void,
        )
    })
    .map(drop)
}

/// What `waitid` reports about one child or tracee.
struct Waited {
    pid: i32,
    /// `si_code`: `CLD_TRAPPED` for a ptrace stop, `CLD_EXITED`, ...
    code: i32,
    /// `si_status`: for a ptrace stop, the stop signal with the ptrace
    /// event in bits 8-15; for an exit, the exit code or signal.
    status: i32,
}

/// `waitid`, or `None` when `WNOHANG` found nothing. Retries on `EINTR`.
fn waitid(idtype: libc::idtype_t, id: libc::id_t, options: i32) -> Result<Option<Waited>, Errno> {
    // SAFETY: siginfo_t is plain data; all zeros is a valid value, and
    // `si_pid == 0` is how an empty WNOHANG result is told apart.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `info` is a valid, writable siginfo_t for the call.
        let r = unsafe { libc::waitid(idtype, id, &mut info, options) };
        if r == 0 {
            break;
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
    // SAFETY: a successful waitid fills the SIGCHLD member of the union
    // (si_pid, si_status) or, with nothing to report, leaves it zeroed.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    Ok((pid != 0).then_some(Waited {
        pid,
        code: info.si_code,
        status,
    }))
}

// ------------------------------------------------------------- /proc checks

fn read_status(pid: i32) -> io::Result<String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

/// Whether `/proc` shows the thread and it is neither a zombie nor dead.
fn thread_alive(pid: i32, tid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(!matches!(state, 'Z' | 'X' | 'x'))
        })
        .unwrap_or(false)
}

fn list_tasks(pid: i32) -> io::Result<Vec<i32>> {
    let mut tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// Clear errors for what cannot be traced, before any ptrace call.
fn precheck(pid: i32) -> Result<(), PtraceError> {
    if pid <= 0 {
        return Err(PtraceError::NoProcess(pid));
    }
    let status = match read_status(pid) {
        Ok(s) => s,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
            return Err(PtraceError::NoProcess(pid))
        }
        Err(source) => {
            return Err(PtraceError::Proc {
                path: format!("/proc/{pid}/status"),
                source,
            })
        }
    };
    if let Some(tgid) = status_field(&status, "Tgid:").and_then(|v| v.parse::<i32>().ok()) {
        if tgid != pid {
            return Err(PtraceError::NotAProcess { tid: pid, tgid });
        }
    }
    match status_field(&status, "State:").and_then(|s| s.chars().next()) {
        Some('Z') => return Err(PtraceError::Zombie(pid)),
        Some('X') => return Err(PtraceError::NoProcess(pid)),
        _ => {}
    }
    // "Kthread:" exists since Linux 6.4; before, a kernel thread shows no mm.
    let kthread = match status_field(&status, "Kthread:") {
        Some(v) => v == "1",
        None => status_field(&status, "VmSize:").is_none(),
    };
    if kthread {
        return Err(PtraceError::KernelThread(pid));
    }
    if pid == std::process::id() as i32 {
        return Err(PtraceError::Permission {
            pid,
            reason: "ferry cannot trace its own process".into(),
        });
    }
    Ok(())
}

/// Why `PTRACE_SEIZE` said `EPERM`, as far as `/proc` tells.
fn diagnose_eperm(pid: i32) -> PtraceError {
    let status = read_status(pid).unwrap_or_default();
    if status_field(&status, "State:").is_some_and(|s| s.starts_with('Z')) {
        return PtraceError::Zombie(pid);
    }
    if let Some(tracer) = status_field(&status, "TracerPid:").and_then(|v| v.parse::<i32>().ok()) {
        if tracer != 0 {
            let name = read_status(tracer)
                .ok()
                .and_then(|s| status_field(&s, "Name:").map(str::to_owned))
                .unwrap_or_default();
            return PtraceError::Permission {
                pid,
                reason: format!("already traced by process {tracer} ({name})"),
            };
        }
    }
    if let Ok(scope) = fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        let scope = scope.trim();
        if scope != "0" {
            return PtraceError::Permission {
                pid,
                reason: format!(
                    "kernel.yama.ptrace_scope = {scope} (1: only descendants, 2: only with \
                     CAP_SYS_PTRACE, 3: never)"
                ),
            };
        }
    }
    PtraceError::Permission {
        pid,
        reason: "the kernel refused PTRACE_SEIZE (other credentials without CAP_SYS_PTRACE, \
                 a non-dumpable process, or a security module)"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> user_regs_struct {
        // SAFETY: user_regs_struct is plain integers; zero is valid.
        unsafe { std::mem::zeroed() }
    }

    #[test]
    fn rewinds_restartable_syscalls() {
        let mut r = regs();
        r.orig_rax = 35; // nanosleep
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        r.rip = 0x1002;
        rewind_interrupted_syscall(&mut r);
        assert_eq!((r.rax, r.rip), (libc::SYS_restart_syscall as u64, 0x1000));

        let mut r = regs();
        r.orig_rax = 0; // read
        r.rax = (-ERESTARTSYS) as u64;
        r.rip = 0x2002;
        rewind_interrupted_syscall(&mut r);
        assert_eq!((r.rax, r.rip), (0, 0x2000));
    }

    #[test]
    fn leaves_user_code_and_finished_syscalls_alone() {
        let mut r = regs();
        r.orig_rax = u64::MAX;
        r.rax = (-ERESTARTSYS) as u64;
        r.rip = 0x3000;
        rewind_interrupted_syscall(&mut r);
        assert_eq!(r.rip, 0x3000);

        let mut r = regs();
        r.orig_rax = 1;
        r.rax = (-libc::EINTR as i64) as u64;
        r.rip = 0x4002;
        rewind_interrupted_syscall(&mut r);
        assert_eq!(r.rip, 0x4002);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tsleep\nState:\tS (sleeping)\nTgid:\t42\nTracerPid:\t0\n";
        assert_eq!(status_field(s, "State:"), Some("S (sleeping)"));
        assert_eq!(status_field(s, "Tgid:"), Some("42"));
        assert_eq!(status_field(s, "Kthread:"), None);
    }
}
