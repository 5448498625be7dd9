//! State capture on real, frozen processes (needs root for ptrace and for
//! the privileged `/proc` fields; skipped with a message otherwise).
//!
//! Besides checking each captured field against what the test knows of the
//! target, every test checks the property the dump depends on: capture
//! leaves the target's mappings and writable memory exactly as they were
//! (the pages were sent before it ran), its registers as the image says,
//! and the process running normally once detached.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{is_root, Fixture};
use ferry::procfs::{self, MapEntry};
use ferry::proto::pb;
use ferry::state::{self, regs_from_bytes, regs_to_bytes, StateError};
use ferry::sys::ptrace::{resume_regs, Tracee};
use ferry::sys::vm;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: state capture needs root (ptrace, privileged /proc fields)");
            return;
        }
    };
}

/// The maps text and the contents of every writable mapping.
struct Snapshot {
    maps: String,
    mem: BTreeMap<u64, Vec<u8>>,
}

fn snapshot(pid: i32) -> Snapshot {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = BTreeMap::new();
    for m in procfs::parse_maps(&maps).unwrap() {
        if !(m.read && m.write) || m.is_special() {
            continue;
        }
        let mut buf = Vec::new();
        vm::read_ranges(pid, &[(m.start, m.end)], &mut buf).unwrap();
        mem.insert(m.start, buf);
    }
    Snapshot { maps, mem }
}

/// Asserts two snapshots are equal, byte for byte: the rseq areas too,
/// which the kernel refreshes when an injection passes through user space
/// and capture writes back.
fn assert_unchanged(before: &Snapshot, after: &Snapshot) {
    assert_eq!(before.maps, after.maps, "the mappings changed");
    assert_eq!(before.mem.len(), after.mem.len());
    for ((start, a), (_, b)) in before.mem.iter().zip(&after.mem) {
        assert_eq!(a.len(), b.len());
        if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
            panic!("memory changed at {:#x}", start + i as u64);
        }
    }
}

fn maps(pid: i32) -> Vec<MapEntry> {
    procfs::read_maps(pid).unwrap()
}

fn inside(maps: &[MapEntry], addr: u64) -> Option<&MapEntry> {
    maps.iter().find(|m| (m.start..m.end).contains(&addr))
}

fn sigaction(p: &pb::Process, sig: i32) -> &pb::SigAction {
    p.sigactions
        .iter()
        .find(|a| a.signo == sig as u32)
        .unwrap_or_else(|| panic!("no action for signal {sig}"))
}

fn fd(p: &pb::Process, n: i32) -> &pb::FileDesc {
    p.fds
        .iter()
        .find(|d| d.fd == n)
        .unwrap_or_else(|| panic!("no fd {n} in {:?}", p.fds))
}

/// Inodes of the pipes this test process holds.
fn our_pipes() -> Vec<u64> {
    procfs::list_fds(std::process::id() as i32)
        .unwrap()
        .into_iter()
        .filter_map(|(_, t)| t.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(5));
    }
}

#[test]
fn captures_a_frozen_fixture_and_leaves_it_as_it_was() {
    require_root!();
    let mut fx = Fixture::start(&["--mib", "4", "--threads", "3"]);
    let pid = fx.pid;
    // "ready" comes before the new threads have run their start-up (where
    // glibc registers rseq): wait until every one has gone to sleep.
    wait_for("every thread to sleep", || {
        let tids = procfs::list_tasks(pid).unwrap();
        tids.len() == 5
            && tids
                .iter()
                .all(|&t| procfs::read_task_status(pid, t).is_ok_and(|s| s.state == 'S'))
    });
    let tr = Tracee::seize(pid).expect("seize");
    tr.freeze().expect("freeze");
    let tids = tr.tids();
    assert_eq!(tids.len(), 5, "main, counter, writer and 2 workers");
    let regs_before: Vec<_> = tids.iter().map(|&t| tr.regs(t).unwrap()).collect();
    let before = snapshot(pid);

    let t0 = Instant::now();
    let tree = state::capture(pid, &tr).expect("capture");
    // Part of the downtime: the process is frozen while this runs.
    eprintln!("capture of 5 threads took {:?}", t0.elapsed());

    let after = snapshot(pid);
    assert_eq!(tree.processes.len(), 1);
    let p = &tree.processes[0];
    assert_unchanged(&before, &after);
    // Registers: exactly what the image says, which is what they were
    // (rewound if the freeze caught a syscall).
    for (&tid, regs) in tids.iter().zip(&regs_before) {
        let now = regs_to_bytes(&tr.regs(tid).unwrap());
        assert_eq!(now, regs_to_bytes(&resume_regs(regs)), "thread {tid}");
        let t = p.threads.iter().find(|t| t.tid == tid).unwrap();
        assert_eq!(&t.gpregs[..], &now[..], "thread {tid}");
    }

    // Identity.
    let me = procfs::read_stat_fields(std::process::id() as i32).unwrap();
    assert_eq!(p.pid, pid);
    assert_eq!(p.ppid, std::process::id() as i32);
    assert_eq!((p.pgid, p.sid), (me.pgrp, me.session));
    assert_eq!(p.comm, "ferry-fixture");
    assert_eq!(
        p.cwd,
        std::env::current_dir().unwrap().to_string_lossy().as_ref()
    );
    let creds = p.creds.as_ref().unwrap();
    assert_eq!((creds.uid, creds.euid, creds.gid), (0, 0, 0));
    assert_ne!(creds.cap_effective, 0);
    assert_eq!(p.rlimits.len(), 16);
    let nofile = p
        .rlimits
        .iter()
        .find(|r| r.resource == libc::RLIMIT_NOFILE)
        .unwrap();
    assert!(nofile.soft > 0 && nofile.soft <= nofile.hard);
    assert_eq!(p.pending_signals, 0);
    assert_eq!(
        p.vmas.len(),
        procfs::parse_maps(&before.maps).unwrap().len()
    );

    // mm fields.
    let mm = p.mm.as_ref().unwrap();
    let maps = maps(pid);
    assert!(mm.start_code < mm.end_code, "{mm:?}");
    assert!(mm.end_code <= mm.start_data, "{mm:?}");
    assert!(mm.start_data <= mm.end_data, "{mm:?}");
    assert!(mm.end_data <= mm.start_brk, "{mm:?}");
    assert!(mm.brk >= mm.start_brk, "{mm:?}");
    assert!(
        mm.arg_start < mm.arg_end && mm.arg_end <= mm.env_start,
        "{mm:?}"
    );
    assert!(mm.env_start < mm.env_end, "{mm:?}");
    assert!(inside(&maps, mm.start_code).is_some_and(|m| m.exec));
    assert!(inside(&maps, mm.start_stack).is_some());
    assert!(inside(&maps, mm.arg_start).is_some());
    assert!(!mm.auxv.is_empty() && mm.auxv.len() % 16 == 0);
    let auxv: Vec<u64> = mm
        .auxv
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let at_pagesz = auxv.chunks_exact(2).find(|kv| kv[0] == libc::AT_PAGESZ);
    assert_eq!(at_pagesz.map(|kv| kv[1]), Some(4096));
    assert!(mm.exe.ends_with("/ferry-fixture"), "{}", mm.exe);

    // Threads.
    assert_eq!(p.threads.len(), tids.len());
    assert_eq!(p.threads[0].tid, pid, "the main thread comes first");
    for t in &p.threads {
        let regs = regs_from_bytes(&t.gpregs).expect("216 bytes of registers");
        let exec = inside(&maps, regs.rip);
        assert!(
            exec.is_some_and(|m| m.exec),
            "tid {} rip {:#x}",
            t.tid,
            regs.rip
        );
        assert!(inside(&maps, regs.rsp).is_some(), "tid {} rsp", t.tid);
        assert_eq!((t.fs_base, t.gs_base), (regs.fs_base, regs.gs_base));
        assert!(t.fs_base != 0 && inside(&maps, t.fs_base).is_some());
        assert!(t.xstate.len() >= 576, "xstate {} bytes", t.xstate.len());
        let rseq = t.rseq.as_ref().unwrap();
        assert!(rseq.addr != 0 && rseq.len >= 32, "tid {}: {rseq:?}", t.tid);
        assert_eq!(rseq.signature, 0x5305_3053, "glibc's RSEQ_SIG");
        assert!(inside(&maps, rseq.addr).is_some());
        // glibc: set_tid_address at start and for every pthread; the
        // robust list head is 24 bytes in the thread's descriptor.
        assert!(t.clear_child_tid != 0, "tid {}", t.tid);
        assert!(inside(&maps, t.clear_child_tid).is_some());
        assert!(t.robust_list != 0 && t.robust_list_len == 24, "{t:?}");
        assert_eq!(t.pending_signals, 0);
    }
    // Worker threads block nothing in particular, but they are not the
    // main thread: their TLS differs.
    let mut bases: Vec<u64> = p.threads.iter().map(|t| t.fs_base).collect();
    bases.dedup();
    assert_eq!(bases.len(), p.threads.len());

    // Signal actions: the Rust runtime ignores SIGPIPE and catches SIGSEGV
    // and SIGBUS on an alternate stack (stack overflow reports).
    assert_eq!(p.sigactions.len(), 62);
    assert_eq!(sigaction(p, libc::SIGPIPE).handler, 1, "SIG_IGN");
    let segv = sigaction(p, libc::SIGSEGV);
    assert!(segv.handler > 1);
    // SA_RESTORER (0x04000000): the libc crate does not export it here.
    let want = (libc::SA_SIGINFO | libc::SA_ONSTACK) as u64 | 0x0400_0000;
    assert_eq!(segv.flags & want, want, "{segv:?}");
    assert!(inside(&maps, segv.restorer).is_some_and(|m| m.exec));
    assert_eq!(sigaction(p, libc::SIGUSR1).handler, 0, "SIG_DFL");

    // Files: stdin and stdout are the test's pipes.
    let stdin = fd(p, 0);
    assert_eq!(stdin.kind, pb::FdKind::Pipe as i32);
    assert_eq!(stdin.flags & libc::O_ACCMODE as u32, libc::O_RDONLY as u32);
    let stdout = fd(p, 1);
    assert_eq!(stdout.kind, pb::FdKind::Pipe as i32);
    assert!(
        our_pipes().contains(&stdout.pipe_id),
        "the pipe the test reads"
    );
    assert!(
        our_pipes().contains(&stdin.pipe_id),
        "the pipe the test writes"
    );
    assert_eq!(stdout.flags & libc::O_ACCMODE as u32, libc::O_WRONLY as u32);
    assert_ne!(stdin.pipe_id, stdout.pipe_id);

    // It goes on as if nothing happened.
    tr.thaw().unwrap();
    tr.detach(false).unwrap();
    let c1: u64 = fx.cmd("counter").parse().unwrap();
    wait_for("the counter to move", || {
        fx.cmd("counter").parse::<u64>().unwrap() > c1
    });
}

/// A python3 process with one descriptor of each kind and a SIGUSR1
/// handler; prints its fd numbers once set up.
const PY: &str = r#"
import os, signal, socket, sys, time
f = open(sys.argv[1], "w+b")
f.write(b"x" * 5000)
f.flush()
f.seek(1234)
r, w = os.pipe()
null = os.open("/dev/null", os.O_WRONLY)
d = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
os.mkfifo(sys.argv[2])
ff = os.open(sys.argv[2], os.O_RDWR)
os.write(w, b"in the pipe")
os.write(ff, b"in the fifo")
m = os.memfd_create("mem")
os.write(m, b"memory")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
hits = []
signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))
# Its own, not Python's default one: a parent that ignores SIGINT (any
# background job of a shell) would have it inherited ignored.
signal.signal(signal.SIGINT, lambda *a: None)
print("ready", f.fileno(), r, w, null, d, ff, s.fileno(), m, flush=True)
while True:
    time.sleep(100)
"#;

struct Py(Child);

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> Option<&'static str> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

#[test]
fn captures_files_signal_actions_and_pending_signals_of_python() {
    require_root!();
    let Some(python) = python() else {
        eprintln!("skipped: no python3");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data file");
    let fifo = dir.path().join("fifo");
    let mut child = Command::new(python)
        .args(["-c", PY])
        .arg(&file)
        .arg(&fifo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let py = Py(child);
    let pid = py.0.id() as i32;
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let n: Vec<i32> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    let [f, r, w, null, dirfd, ff, sock, memfd] = n[..] else {
        panic!("python said {line:?}");
    };

    let tr = Tracee::seize(pid).expect("seize");
    tr.freeze().expect("freeze");
    // A signal with a handler arrives while frozen: it must stay pending.
    // Had an injection let the handler run, Python's signal flags (and the
    // `hits` list) would change memory the image no longer gets.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    let bit = 1u64 << (libc::SIGUSR1 - 1);
    wait_for("SIGUSR1 to be pending", || {
        procfs::read_status(pid).unwrap().shd_pnd & bit != 0
    });
    let before = snapshot(pid);

    let tree = state::capture(pid, &tr).expect("capture");

    let p = &tree.processes[0];
    assert_unchanged(&before, &snapshot(pid));
    assert_ne!(p.pending_signals & bit, 0, "SIGUSR1 still pending");
    // Queued for the process, with the siginfo kill(2) gave it: SIGUSR1,
    // SI_USER, from this test.
    let int = |b: &[u8], at: usize| i32::from_ne_bytes(b[at..at + 4].try_into().unwrap());
    let q = &p.shared_queued_signals;
    assert_eq!(q.len(), 1, "one signal queued for the process");
    assert_eq!(q[0].len(), 128);
    assert_eq!(
        (int(&q[0], 0), int(&q[0], 8), int(&q[0], 16)),
        (libc::SIGUSR1, libc::SI_USER, std::process::id() as i32)
    );
    assert!(p.threads.iter().all(|t| t.queued_signals.is_empty()));

    let reg = fd(p, f);
    assert_eq!(reg.kind, pb::FdKind::Regular as i32, "{reg:?}");
    assert_eq!(reg.path, file.to_str().unwrap());
    assert_eq!(reg.pos, 1234);
    assert!(reg.cloexec, "Python opens files non-inheritable");
    assert_eq!(reg.flags & libc::O_ACCMODE as u32, libc::O_RDWR as u32);

    let (rd, wr) = (fd(p, r), fd(p, w));
    assert_eq!(
        (rd.kind, wr.kind),
        (pb::FdKind::Pipe as i32, pb::FdKind::Pipe as i32)
    );
    assert_eq!(rd.pipe_id, wr.pipe_id, "both ends of one pipe");
    assert_ne!(rd.pipe_id, 0);
    assert_eq!(wr.flags & libc::O_ACCMODE as u32, libc::O_WRONLY as u32);
    // The unread bytes travel on the read end, and are still in the pipe.
    assert_eq!(&rd.data[..], b"in the pipe");
    assert!(wr.data.is_empty());
    assert_eq!((rd.pipe_size, wr.pipe_size), (65536, 65536));
    let copy = ferry::sys::fds::take_fd(pid, r).unwrap();
    assert_eq!(
        ferry::sys::fds::peek_pipe(std::os::fd::AsFd::as_fd(&copy)).unwrap(),
        b"in the pipe"
    );
    let m = fd(p, memfd);
    assert_eq!(m.kind, pb::FdKind::Memfd as i32);
    assert_eq!((&m.data[..], m.pos), (&b"memory"[..], 6));

    assert_eq!(fd(p, null).kind, pb::FdKind::DevNull as i32);
    assert_eq!(fd(p, null).path, "/dev/null");
    assert_eq!(fd(p, dirfd).kind, pb::FdKind::Directory as i32);
    assert_eq!(fd(p, dirfd).path, "/");
    let fifo_fd = fd(p, ff);
    assert_eq!(fifo_fd.kind, pb::FdKind::Fifo as i32);
    assert_eq!(fifo_fd.path, fifo.to_str().unwrap());
    assert_eq!(fifo_fd.pipe_id, std::fs::metadata(&fifo).unwrap().ino());
    assert_eq!(&fifo_fd.data[..], b"in the fifo");
    let s = fd(p, sock);
    assert_eq!(s.kind, pb::FdKind::Unsupported as i32);
    assert_eq!(
        s.description,
        format!("fd {sock}: UNIX stream socket neither bound nor connected")
    );

    // Python's handlers: its own for SIGUSR1 and SIGINT, SIGPIPE ignored.
    for sig in [libc::SIGUSR1, libc::SIGINT] {
        assert!(sigaction(p, sig).handler > 1, "signal {sig}");
    }
    assert_eq!(sigaction(p, libc::SIGPIPE).handler, 1);
    assert!(p.mm.as_ref().unwrap().exe.contains("python3"));

    // Detached, it handles the signal and goes on sleeping.
    tr.detach(false).unwrap();
    wait_for("SIGUSR1 to be handled", || {
        procfs::read_status(pid).unwrap().shd_pnd & bit == 0
    });
    sleep(Duration::from_millis(50));
    assert!(matches!(procfs::read_status(pid).unwrap().state, 'S' | 'R'));
}

#[test]
fn refuses_a_running_process() {
    require_root!();
    let fx = Fixture::start(&["--mib", "1"]);
    let tr = Tracee::seize(fx.pid).expect("seize");
    let before = std::fs::read_to_string(format!("/proc/{}/maps", fx.pid)).unwrap();
    assert!(matches!(
        state::capture(fx.pid, &tr),
        Err(StateError::NotFrozen(p)) if p == fx.pid
    ));
    let after = std::fs::read_to_string(format!("/proc/{}/maps", fx.pid)).unwrap();
    assert_eq!(before, after, "nothing was injected");
}

#[test]
fn thread_reads_need_a_stopped_thread_of_the_tracee() {
    use ferry::sys::ptrace::PtraceError;
    require_root!();
    let fx = Fixture::start(&["--mib", "1"]);
    let tr = Tracee::seize(fx.pid).expect("seize");
    let not_stopped = |r: Result<(), PtraceError>| matches!(r, Err(PtraceError::NotStopped(_)));
    assert!(not_stopped(tr.regs(fx.pid).map(drop)));
    assert!(not_stopped(tr.xstate(fx.pid).map(drop)));
    assert!(not_stopped(tr.sigmask(fx.pid).map(drop)));
    assert!(not_stopped(tr.rseq_config(fx.pid).map(drop)));
    assert!(not_stopped(
        tr.syscall_in(fx.pid, libc::SYS_getpid, &[]).map(drop)
    ));
    tr.freeze().unwrap();
    // Not one of ours.
    assert!(not_stopped(tr.regs(std::process::id() as i32).map(drop)));
    assert_eq!(
        tr.syscall_in(fx.pid, libc::SYS_getpid, &[]).unwrap(),
        i64::from(fx.pid)
    );
    // The mask is back after the injection.
    let mask = tr.sigmask(fx.pid).unwrap();
    tr.syscall_in(fx.pid, libc::SYS_getpid, &[]).unwrap();
    assert_eq!(tr.sigmask(fx.pid).unwrap(), mask);
    let t = tr.tids()[1];
    assert_eq!(
        tr.syscall_in(t, libc::SYS_gettid, &[]).unwrap(),
        i64::from(t),
        "injected into the thread asked for"
    );
}
