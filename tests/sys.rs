//! `ferry::sys` on real processes: ptrace control and syscall injection,
//! userfaultfd write-protect tracking, `PAGEMAP_SCAN`, and cross-process
//! memory access.
//!
//! The targets are children spawned here (`sleep`, a shell busy loop, a
//! multi-threaded `python3`), killed by a guard at the end. The tests need
//! the right to ptrace them (root here and in CI); without it each test
//! prints why and returns.

mod common;
use common::kernel_thread;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ferry::sys::page_size;
use ferry::sys::pagemap::{self, Pagemap, PME_PRESENT};
use ferry::sys::ptrace::{PtraceError, Tracee};
use ferry::sys::trampoline::{Site, LEN};
use ferry::sys::uffd::{UffdError, WriteProtect};
use ferry::sys::vm::{self, VmError};

// ------------------------------------------------------------------ helpers

/// A child process, killed and reaped on drop.
struct Target(Child);

impl Target {
    fn spawn(cmd: &str, args: &[&str]) -> Target {
        let child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"));
        let t = Target(child);
        // Past exec: /proc shows the new program's memory.
        wait_for("the target to exec", || {
            exe(t.pid()).is_some_and(|e| !e.contains("ferry") && !e.contains("sys-"))
        });
        t
    }

    fn sleep() -> Target {
        let t = Target::spawn("sleep", &["600"]);
        wait_for("sleep to sleep", || state(t.pid()) == 'S');
        t
    }

    fn busy() -> Target {
        let t = Target::spawn("sh", &["-c", "while :; do :; done"]);
        wait_for("the loop to run", || state(t.pid()) == 'R');
        t
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn stdout(&mut self) -> BufReader<ChildStdout> {
        BufReader::new(self.0.stdout.take().expect("stdout is piped"))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Whether this process may ptrace its children; prints why not, once.
fn traceable() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let t = Target::sleep();
        match Tracee::seize(t.pid()) {
            Ok(_) => true,
            Err(e @ PtraceError::Permission { .. }) => {
                eprintln!("skipping sys tests: cannot ptrace a child: {e}");
                false
            }
            Err(e) => panic!("seizing a sleeping child: {e}"),
        }
    })
}

macro_rules! require_ptrace {
    () => {
        if !traceable() {
            eprintln!("skipped: needs ptrace rights (root)");
            return;
        }
    };
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(5));
    }
}

fn status(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

fn status_of_task(pid: i32, tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default()
}

fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// The one-letter state: R, S, D, T (job-control stop), t (ptrace stop), Z.
fn state(pid: i32) -> char {
    field(&status(pid), "State:").chars().next().unwrap_or('?')
}

fn tracer(pid: i32) -> i32 {
    field(&status(pid), "TracerPid:").parse().unwrap_or(-1)
}

/// Every thread of `pid` is untraced: ferry let it go.
fn assert_no_thread_traced(pid: i32) {
    for tid in tasks(pid) {
        assert_eq!(
            field(&status_of_task(pid, tid), "TracerPid:"),
            "0",
            "thread {tid}"
        );
    }
}

fn exe(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn tasks(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn maps_has(pid: i32, start: u64) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines().any(|l| {
        l.split_once('-')
            .and_then(|(s, _)| u64::from_str_radix(s, 16).ok())
            == Some(start)
    })
}

fn me() -> i32 {
    std::process::id() as i32
}

/// Whether `pid` is traced by a thread of this process (the tracer is
/// ferry's tracer thread, so TracerPid names that thread).
fn traced_by_us(tracer: i32) -> bool {
    tracer > 0 && field(&status(tracer), "Tgid:") == me().to_string()
}

fn mmap_anon(tr: &Tracee, len: u64) -> u64 {
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let addr = tr
        .syscall(libc::SYS_mmap, &[0, len, prot, flags, u64::MAX, 0])
        .expect("mmap in the target");
    addr as u64
}

fn munmap(tr: &Tracee, addr: u64, len: u64) {
    tr.syscall(libc::SYS_munmap, &[addr, len])
        .expect("munmap in the target");
}

/// Page indices (relative to `base`) covered by the ranges.
fn pages_of(ranges: &[(u64, u64)], base: u64) -> BTreeSet<u64> {
    let ps = page_size();
    let mut set = BTreeSet::new();
    for &(s, e) in ranges {
        assert_eq!(s % ps, 0, "unaligned start {s:#x}");
        assert_eq!(e % ps, 0, "unaligned end {e:#x}");
        let mut a = s;
        while a < e {
            assert!(a >= base, "page {a:#x} below the region");
            set.insert((a - base) / ps);
            a += ps;
        }
    }
    set
}

fn set(pages: &[u64]) -> BTreeSet<u64> {
    pages.iter().copied().collect()
}

fn page_pattern(page: u64, round: u8) -> Vec<u8> {
    (0..page_size())
        .map(|i| (i as u8) ^ (page as u8).wrapping_mul(31) ^ round)
        .collect()
}

fn write_pages(pid: i32, base: u64, pages: &[u64], round: u8) {
    for &p in pages {
        vm::write(pid, base + p * page_size(), &page_pattern(p, round)).expect("process_vm_writev");
    }
}

fn no_userfaultfd_in(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .all(|l| !l.to_string_lossy().contains("userfaultfd"))
        })
        .unwrap_or(true)
}

// ------------------------------------------------------------------ ptrace

#[test]
fn seize_freeze_thaw_detach_sleeping_target() {
    require_ptrace!();
    let t = Target::sleep();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    assert_eq!(tr.pid(), pid);
    assert_eq!(tr.tids(), vec![pid]);
    assert!(traced_by_us(tracer(pid)), "traced by us");
    assert_eq!(state(pid), 'S', "seizing does not stop the target");
    assert!(!tr.is_frozen());

    tr.freeze().expect("freeze");
    assert!(tr.is_frozen());
    assert_eq!(state(pid), 't');
    tr.freeze().expect("freeze is idempotent");
    assert!(tr.is_frozen());

    tr.thaw().expect("thaw");
    wait_for("sleep to sleep again", || state(pid) == 'S');
    assert!(!tr.is_frozen());
    tr.thaw().expect("thaw is idempotent");

    tr.detach(false).expect("detach");
    assert_eq!(tracer(pid), 0);
    wait_for("sleep to sleep after detach", || state(pid) == 'S');
}

#[test]
fn busy_target_runs_between_freezes_and_can_be_left_stopped() {
    require_ptrace!();
    let t = Target::busy();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    let before = cpu_ticks(pid);
    sleep(Duration::from_millis(300));
    assert!(cpu_ticks(pid) > before, "the target runs while seized");

    tr.freeze().expect("freeze");
    assert_eq!(state(pid), 't');
    let frozen_at = cpu_ticks(pid);
    sleep(Duration::from_millis(200));
    assert_eq!(cpu_ticks(pid), frozen_at, "a frozen target uses no CPU");

    tr.thaw().expect("thaw");
    wait_for("the loop to run again", || state(pid) == 'R');

    tr.detach(true).expect("detach leaving it stopped");
    assert_eq!(tracer(pid), 0);
    wait_for("a job-control stop", || state(pid) == 'T');
    let stopped_at = cpu_ticks(pid);
    sleep(Duration::from_millis(200));
    assert_eq!(cpu_ticks(pid), stopped_at);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    wait_for("the loop to run after SIGCONT", || state(pid) == 'R');
}

#[test]
fn drop_detaches_and_leaves_the_target_running() {
    require_ptrace!();
    let t = Target::busy();
    let pid = t.pid();
    {
        let tr = Tracee::seize(pid).expect("seize");
        tr.freeze().expect("freeze");
        assert_eq!(state(pid), 't');
        // Dropped frozen, as on an error path.
    }
    assert_eq!(tracer(pid), 0);
    wait_for("the loop to run after drop", || state(pid) == 'R');

    let s = Target::sleep();
    drop(Tracee::seize(s.pid()).expect("seize"));
    assert_eq!(tracer(s.pid()), 0);
    wait_for("sleep to sleep after drop", || state(s.pid()) == 'S');
}

#[test]
fn target_dying_while_traced_does_not_hang() {
    require_ptrace!();
    let mut t = Target::sleep();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    t.0.kill().expect("kill");
    wait_for("the target to die", || matches!(state(pid), 'Z' | '?'));
    let started = Instant::now();
    assert!(matches!(tr.freeze(), Err(PtraceError::NoProcess(p)) if p == pid));
    assert!(matches!(
        tr.syscall(libc::SYS_getpid, &[]),
        Err(PtraceError::NoProcess(_))
    ));
    assert!(tr.tids().is_empty());
    drop(tr);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The exit status is still there for the parent.
    let st = t.0.wait().expect("wait");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
}

#[test]
fn seize_refuses_what_cannot_be_traced() {
    require_ptrace!();
    // A dead, reaped pid.
    let mut done = Command::new("true").spawn().expect("spawn true");
    let dead = done.id() as i32;
    done.wait().expect("wait");
    assert!(matches!(Tracee::seize(dead), Err(PtraceError::NoProcess(p)) if p == dead));

    // A kernel thread, when one is visible (none is inside a pid
    // namespace, as under some CI runners).
    if let Some(k) = kernel_thread() {
        assert!(matches!(
            Tracee::seize(k),
            Err(PtraceError::KernelThread(p)) if p == k
        ));
    }

    // A zombie.
    let mut z = Command::new("true").spawn().expect("spawn true");
    let zpid = z.id() as i32;
    wait_for("a zombie", || state(zpid) == 'Z');
    assert!(matches!(Tracee::seize(zpid), Err(PtraceError::Zombie(p)) if p == zpid));
    z.wait().expect("wait");

    // Already traced: the reason names the tracer.
    let t = Target::sleep();
    let first = Tracee::seize(t.pid()).expect("seize");
    match Tracee::seize(t.pid()) {
        Err(PtraceError::Permission { reason, .. }) => {
            assert!(reason.contains(&tracer(t.pid()).to_string()), "{reason}")
        }
        Err(e) => panic!("expected Permission, got {e}"),
        Ok(_) => panic!("seized twice"),
    }
    drop(first);

    // A thread id is not a process.
    let py = Target::spawn(
        python(),
        &["-c", "import threading,time; threading.Thread(target=time.sleep, args=(600,), daemon=True).start(); time.sleep(600)"],
    );
    wait_for("python's thread", || tasks(py.pid()).len() >= 2);
    let tid = *tasks(py.pid()).last().expect("a thread");
    assert!(matches!(
        Tracee::seize(tid),
        Err(PtraceError::NotAProcess { .. })
    ));
}

#[test]
fn every_thread_is_seized_including_new_ones() {
    require_ptrace!();
    // 4 threads at once, then one more every 50 ms for 2.5 s.
    let script = "import threading,time\n\
                  def t(): time.sleep(600)\n\
                  for _ in range(4): threading.Thread(target=t, daemon=True).start()\n\
                  for _ in range(50):\n    threading.Thread(target=t, daemon=True).start(); time.sleep(0.05)\n\
                  time.sleep(600)\n";
    let t = Target::spawn(python(), &["-c", script]);
    let pid = t.pid();
    wait_for("python's first threads", || tasks(pid).len() >= 5);

    let tr = Tracee::seize(pid).expect("seize");
    let seized = tr.tids();
    assert!(seized.len() >= 5, "{seized:?}");
    for &tid in &seized {
        let t: i32 = field(&status_of_task(pid, tid), "TracerPid:")
            .parse()
            .unwrap_or(0);
        assert!(traced_by_us(t), "thread {tid} traced by {t}");
    }
    sleep(Duration::from_millis(500));
    tr.freeze().expect("freeze");
    let all = tasks(pid);
    assert_eq!(
        tr.tids(),
        all,
        "threads created while seized are caught by freeze"
    );
    assert!(all.len() > seized.len(), "python kept creating threads");
    for &tid in &all {
        let st = field(&status_of_task(pid, tid), "State:");
        assert!(st.starts_with('t'), "thread {tid} is {st}");
    }
    tr.thaw().expect("thaw");
    wait_for("python's threads to sleep again", || {
        tasks(pid)
            .iter()
            .all(|&tid| !field(&status_of_task(pid, tid), "State:").starts_with('t'))
    });
    drop(tr);
    assert_no_thread_traced(pid);
}

#[test]
fn job_control_stops_pass_through_while_seized() {
    require_ptrace!();
    use nix::sys::signal::{kill, Signal};
    let t = Target::sleep();
    let pid = t.pid();
    let target = nix::unistd::Pid::from_raw(pid);
    let tr = Tracee::seize(pid).expect("seize");
    // A seized process in a job-control stop shows 't' while ferry holds
    // the stop, 'T' once it is listening.
    let job_stopped = || matches!(state(pid), 'T' | 't');

    // SIGSTOP while seized: the process stays stopped (held with
    // PTRACE_LISTEN), and SIGCONT wakes it up as without ferry.
    kill(target, Signal::SIGSTOP).expect("SIGSTOP");
    wait_for("the job-control stop", job_stopped);
    sleep(Duration::from_millis(50));
    assert!(
        matches!(state(pid), 'T' | 't'),
        "still stopped: {}",
        state(pid)
    );
    // Injection into a stopped process, which stays stopped.
    assert_eq!(
        tr.syscall(libc::SYS_getpid, &[]).expect("getpid"),
        pid as i64
    );
    sleep(Duration::from_millis(50));
    assert!(
        matches!(state(pid), 'T' | 't'),
        "still stopped: {}",
        state(pid)
    );
    tr.freeze().expect("freeze");
    tr.thaw().expect("thaw");
    sleep(Duration::from_millis(50));
    assert!(
        matches!(state(pid), 'T' | 't'),
        "thaw keeps a job-control stop: {}",
        state(pid)
    );
    kill(target, Signal::SIGCONT).expect("SIGCONT");
    wait_for("sleep to sleep after SIGCONT", || state(pid) == 'S');
    assert!(!tr.is_frozen());

    // Detached while job-control stopped: it stays stopped.
    kill(target, Signal::SIGSTOP).expect("SIGSTOP");
    wait_for("the job-control stop", job_stopped);
    tr.detach(false).expect("detach");
    assert_eq!(tracer(pid), 0);
    wait_for("a plain job-control stop", || state(pid) == 'T');
    kill(target, Signal::SIGCONT).expect("SIGCONT");
    wait_for("sleep to sleep", || state(pid) == 'S');
}

#[test]
fn threads_exiting_while_traced_do_not_hang_anything() {
    require_ptrace!();
    // Short-lived threads, one every 5 ms, for as long as the test runs.
    let script = "import threading,time\n\
                  while True:\n    threading.Thread(target=time.sleep, args=(0.02,)).start(); time.sleep(0.005)\n";
    let t = Target::spawn(python(), &["-c", script]);
    let pid = t.pid();
    wait_for("python's threads", || tasks(pid).len() >= 2);
    let tr = Tracee::seize(pid).expect("seize");
    let started = Instant::now();
    for _ in 0..30 {
        tr.freeze().expect("freeze");
        let live: Vec<i32> = tasks(pid)
            .into_iter()
            .filter(|&tid| !field(&status_of_task(pid, tid), "State:").starts_with('Z'))
            .collect();
        let seized = tr.tids();
        for tid in &live {
            assert!(
                seized.contains(tid),
                "live thread {tid} not seized: {seized:?}"
            );
            let st = field(&status_of_task(pid, *tid), "State:");
            assert!(st.starts_with('t') || st.is_empty(), "thread {tid} is {st}");
        }
        tr.syscall(libc::SYS_getpid, &[])
            .expect("getpid while frozen");
        tr.thaw().expect("thaw");
        tr.syscall(libc::SYS_getpid, &[])
            .expect("getpid while running");
        sleep(Duration::from_millis(10));
    }
    println!(
        "30 freeze/inject/thaw cycles with thread churn: {:?}",
        started.elapsed()
    );
    drop(tr);
    assert_no_thread_traced(pid);
}

// ------------------------------------------------------------------ injection

#[test]
fn injected_syscalls_in_a_sleeping_target() {
    require_ptrace!();
    // A sleep that must end on time: the interrupted nanosleep is restarted
    // with its remaining time after the injections, neither cut short nor
    // started over.
    let mut t = Target::spawn("sleep", &["2"]);
    let pid = t.pid();
    let started = Instant::now();
    wait_for("sleep to sleep", || state(pid) == 'S');
    let tr = Tracee::seize(pid).expect("seize");

    assert_eq!(
        tr.syscall(libc::SYS_getpid, &[]).expect("getpid"),
        pid as i64
    );
    wait_for("sleep to sleep after the injection", || state(pid) == 'S');

    let len = 4 * page_size();
    let addr = mmap_anon(&tr, len);
    assert!(maps_has(pid, addr), "mapping {addr:#x} in /proc/{pid}/maps");
    munmap(&tr, addr, len);
    assert!(!maps_has(pid, addr));

    // A failing syscall reports its errno.
    match tr.syscall(libc::SYS_close, &[100_000]) {
        Err(PtraceError::SyscallFailed { nr, errno }) => {
            assert_eq!(nr, libc::SYS_close);
            assert_eq!(errno, nix::errno::Errno::EBADF);
        }
        r => panic!("close(100000) gave {r:?}"),
    }
    assert!(matches!(
        tr.syscall(libc::SYS_getpid, &[0; 7]),
        Err(PtraceError::TooManyArgs(7))
    ));

    // While frozen: works, and the target stays frozen.
    tr.freeze().expect("freeze");
    assert_eq!(
        tr.syscall(libc::SYS_getppid, &[]).expect("getppid"),
        me() as i64
    );
    assert!(tr.is_frozen());
    assert_eq!(state(pid), 't');
    tr.thaw().expect("thaw");
    tr.detach(false).expect("detach");

    let st = t.0.wait().expect("wait");
    let took = started.elapsed();
    assert!(st.success(), "sleep exited with {st}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "sleep 2 took {took:?}"
    );
}

/// Injections run through a trampoline in the target's own executable
/// memory (see `ferry::sys::trampoline`): found in common programs, written
/// for the injection, the bytes under it put back after it.
#[test]
fn injections_go_through_a_trampoline_whose_bytes_are_put_back() {
    require_ptrace!();
    let targets = [
        Target::sleep(),
        Target::busy(),
        Target::spawn(python(), &["-c", "import time; time.sleep(600)"]),
    ];
    for t in &targets {
        let pid = t.pid();
        let site =
            Site::find(pid).unwrap_or_else(|| panic!("no trampoline site in {:?}", exe(pid)));
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let inside = maps.lines().any(|l| {
            let (range, rest) = l.split_once(' ').unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            rest.starts_with("r-xp") && a <= site.addr && site.addr + LEN as u64 <= b
        });
        assert!(
            inside,
            "site {:#x} is not in one r-x mapping:\n{maps}",
            site.addr
        );
        let mut before = vec![0u8; LEN];
        vm::read(pid, site.addr, &mut before).unwrap();
        let tr = Tracee::seize(pid).expect("seize");
        assert_eq!(
            tr.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            pid as i64
        );
        // Written there (the page became the process's own copy), and the
        // original bytes back as soon as the injection ended.
        assert!(
            anonymous_kb_at(pid, site.addr) >= 4,
            "the trampoline's page of {pid} was not written"
        );
        let mut now = vec![0u8; LEN];
        vm::read(pid, site.addr, &mut now).unwrap();
        assert_eq!(now, before, "the bytes under the trampoline are back");
        tr.detach(false).expect("detach");
        vm::read(pid, site.addr, &mut now).unwrap();
        assert_eq!(now, before, "and stay so after the detach");
        assert!(matches!(state(pid), 'S' | 'R'), "{pid} runs on");
    }
}

/// `Anonymous:` of the mapping holding `addr`, from `/proc/PID/smaps`.
fn anonymous_kb_at(pid: i32, addr: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut inside = false;
    for l in smaps.lines() {
        let range = l.split_once(' ').map_or("", |(r, _)| r);
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = a <= addr && addr < b;
                continue;
            }
        }
        if inside {
            if let Some(kb) = l.strip_prefix("Anonymous:") {
                return kb.trim().trim_end_matches(" kB").trim().parse().unwrap();
            }
        }
    }
    panic!("no mapping of {pid} holds {addr:#x}")
}

#[test]
fn sleeping_target_still_exits_on_sigterm() {
    require_ptrace!();
    let mut t = Target::sleep();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    for _ in 0..20 {
        tr.syscall(libc::SYS_getpid, &[]).expect("getpid");
    }
    drop(tr);
    wait_for("sleep to sleep after detach", || state(pid) == 'S');
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let st = t.0.wait().expect("wait");
    assert_eq!(st.signal(), Some(libc::SIGTERM));
}

#[test]
fn injection_into_a_running_target_keeps_it_running() {
    require_ptrace!();
    let t = Target::busy();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    let n = 200;
    let started = Instant::now();
    for _ in 0..n {
        assert_eq!(
            tr.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            pid as i64
        );
    }
    let per = started.elapsed() / n;
    println!("inject getpid into a running target: {per:?} per call (interrupt + inject + resume)");
    tr.freeze().expect("freeze");
    let started = Instant::now();
    for _ in 0..n {
        tr.syscall(libc::SYS_getpid, &[]).expect("getpid");
    }
    println!(
        "inject getpid into a frozen target: {:?} per call",
        started.elapsed() / n
    );
    tr.thaw().expect("thaw");
    let before = cpu_ticks(pid);
    sleep(Duration::from_millis(300));
    assert!(cpu_ticks(pid) > before, "the loop still runs");
    assert_eq!(state(pid), 'R');
}

#[test]
fn registers_are_restored_exactly() {
    require_ptrace!();
    // A shell counting on stdout, sleeping in between (the shell waits in
    // wait4 for `sleep`): after many injections at arbitrary points the
    // count goes on without a gap or a repeat.
    let mut t = Target::spawn(
        "sh",
        &[
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i; sleep 0.01; done",
        ],
    );
    let pid = t.pid();
    let mut out = t.stdout();
    let mut line = String::new();
    let mut next = |line: &mut String| -> u64 {
        line.clear();
        out.read_line(line).expect("read a count");
        line.trim().parse().expect("a number")
    };
    let first = next(&mut line);
    let tr = Tracee::seize(pid).expect("seize");
    for i in 0..300 {
        tr.syscall(libc::SYS_getpid, &[]).expect("getpid");
        if i % 50 == 0 {
            tr.freeze().expect("freeze");
            tr.syscall(libc::SYS_gettid, &[]).expect("gettid");
            tr.thaw().expect("thaw");
        }
        sleep(Duration::from_micros(700));
    }
    drop(tr);
    let mut expect = first + 1;
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        assert_eq!(next(&mut line), expect, "the count goes on");
        expect += 1;
    }
}

// ------------------------------------------------------------------ uffd-wp

#[test]
fn uffd_wp_reports_exactly_the_written_pages() {
    require_ptrace!();
    let t = Target::sleep();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    let ps = page_size();
    let n = 64;
    let base = mmap_anon(&tr, n * ps);
    let end = base + n * ps;

    let started = Instant::now();
    let mut wp = WriteProtect::arm(&tr).expect("arm");
    println!(
        "arm (inject userfaultfd, pidfd_getfd, close, UFFDIO_API): {:?}",
        started.elapsed()
    );
    assert!(no_userfaultfd_in(pid), "the target keeps no userfaultfd");
    wp.register(base, end).expect("register");
    assert_eq!(wp.registered(), &[(base, end)]);

    let mut out = Vec::new();
    wp.scan_written(base, end, &mut out).expect("scan");
    assert!(out.is_empty(), "registering arms the range: {out:x?}");

    let a = [0, 1, 2, 17, 40, 63];
    write_pages(pid, base, &a, 1);
    wp.scan_written(base, end, &mut out).expect("scan");
    assert_eq!(pages_of(&out, base), set(&a));
    out.clear();
    wp.scan_written(base, end, &mut out).expect("rescan");
    assert!(out.is_empty(), "nothing written since: {out:x?}");

    let b = [5, 6, 33];
    write_pages(pid, base, &b, 2);
    wp.scan_written(base, end, &mut out).expect("scan");
    assert_eq!(pages_of(&out, base), set(&b));
    out.clear();

    // Sub-ranges of a registered range.
    write_pages(pid, base, &[3, 20, 21], 3);
    wp.scan_written(base, base + 16 * ps, &mut out)
        .expect("scan");
    assert_eq!(pages_of(&out, base), set(&[3]));
    out.clear();
    wp.scan_written(base + 16 * ps, end, &mut out)
        .expect("scan");
    assert_eq!(pages_of(&out, base), set(&[20, 21]));
    out.clear();

    // MADV_DONTNEED zeroes pages: reported as written.
    tr.syscall(
        libc::SYS_madvise,
        &[base + ps, 2 * ps, libc::MADV_DONTNEED as u64],
    )
    .expect("madvise");
    wp.scan_written(base, end, &mut out).expect("scan");
    assert_eq!(pages_of(&out, base), set(&[1, 2]));
    out.clear();
    let mut buf = Vec::new();
    vm::read_ranges(pid, &[(base + ps, base + 3 * ps)], &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0), "zapped pages read as zeros");

    // Present pages: everything written, minus the zapped ones.
    let mut present = Vec::new();
    wp.scan_present(base, end, true, &mut present)
        .expect("present");
    assert_eq!(
        pages_of(&present, base),
        set(&[0, 3, 5, 6, 17, 20, 21, 33, 40, 63])
    );
    // Reading never-written pages maps the zero page: neither written nor
    // content.
    vm::read_ranges(pid, &[(base + 50 * ps, base + 52 * ps)], &mut buf).expect("read");
    wp.scan_written(base, end, &mut out).expect("scan");
    assert!(out.is_empty(), "reads are not writes: {out:x?}");
    present.clear();
    wp.scan_present(base, end, true, &mut present)
        .expect("present");
    assert!(!pages_of(&present, base).contains(&50));

    // Ranges not registered are refused before any scan.
    assert!(matches!(
        wp.scan_written(base - ps, base + ps, &mut out),
        Err(UffdError::NotRegistered { .. })
    ));
    assert!(matches!(
        wp.scan_written(end, end + ps, &mut out),
        Err(UffdError::NotRegistered { .. })
    ));
    assert!(out.is_empty());
    // Registering again what is registered keeps the pending pages.
    write_pages(pid, base, &[7], 4);
    wp.register(base, end).expect("register again");
    wp.scan_written(base, end, &mut out).expect("scan");
    assert_eq!(pages_of(&out, base), set(&[7]));
    out.clear();

    // The target replaces part of the range with a new mapping (which is
    // not registered): the scan fails on it, the pages before it are kept,
    // and those after it are reported once the new part is registered.
    write_pages(pid, base, &[9, 60], 5);
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let fixed = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
    let hole = base + 48 * ps;
    assert_eq!(
        tr.syscall(libc::SYS_mmap, &[hole, 2 * ps, prot, fixed, u64::MAX, 0])
            .expect("mmap fixed") as u64,
        hole
    );
    match wp.scan_written(base, end, &mut out) {
        Err(UffdError::Stale { .. }) => {}
        r => panic!("expected Stale, got {r:?}"),
    }
    assert_eq!(
        pages_of(&out, base),
        set(&[9]),
        "pages before the new mapping kept"
    );
    out.clear();
    wp.register(hole, hole + 2 * ps)
        .expect("register the new mapping");
    wp.scan_written(base, end, &mut out).expect("scan");
    assert_eq!(pages_of(&out, base), set(&[60]), "pages after it not lost");
    out.clear();

    // Unregistering forgets the range.
    wp.unregister(base, base + 8 * ps);
    assert_eq!(wp.registered(), &[(base + 8 * ps, end)]);
    assert!(matches!(
        wp.scan_written(base, end, &mut out),
        Err(UffdError::NotRegistered { .. })
    ));
    drop(wp);
    munmap(&tr, base, n * ps);
}

#[test]
fn uffd_wp_refuses_special_mappings() {
    require_ptrace!();
    let t = Target::sleep();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    let mut wp = WriteProtect::arm(&tr).expect("arm");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let vdso = maps
        .lines()
        .find(|l| l.ends_with("[vdso]"))
        .and_then(|l| {
            let (s, e) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .expect("a [vdso]");
    assert!(matches!(
        wp.register(vdso.0, vdso.1),
        Err(UffdError::Unregistrable { .. })
    ));
    assert!(wp.registered().is_empty());
    assert!(matches!(
        wp.register(0xffff_ffff_ff60_0000, 0xffff_ffff_ff60_1000),
        Err(UffdError::Unregistrable { .. })
    ));
}

#[test]
fn uffd_wp_costs_on_256_mib() {
    require_ptrace!();
    let t = Target::sleep();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    let ps = page_size();
    let len = 256 << 20;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE) as u64;
    let base = tr
        .syscall(libc::SYS_mmap, &[0, len, prot, flags, u64::MAX, 0])
        .expect("mmap") as u64;
    let end = base + len;
    let mut wp = WriteProtect::arm(&tr).expect("arm");
    let t0 = Instant::now();
    wp.register(base, end).expect("register");
    let arm = t0.elapsed();
    let mut out = Vec::new();
    let t0 = Instant::now();
    wp.scan_written(base, end, &mut out).expect("scan");
    let clean = t0.elapsed();
    assert!(out.is_empty());
    let dirty: Vec<u64> = (0..len / ps).step_by(10).collect();
    let one = vec![0xa5u8; 8];
    for &p in &dirty {
        vm::write(pid, base + p * ps, &one).expect("write");
    }
    let t0 = Instant::now();
    wp.scan_written(base, end, &mut out).expect("scan");
    let ten = t0.elapsed();
    assert_eq!(pages_of(&out, base), dirty.iter().copied().collect());
    let runs = out.len();
    // 13 108 separate runs: more than one output vector holds, so the scan
    // continues from walk_end, write-protecting as it goes.
    let dirty: Vec<u64> = (0..len / ps).step_by(5).collect();
    for &p in &dirty {
        vm::write(pid, base + p * ps, &one).expect("write");
    }
    out.clear();
    wp.scan_written(base, end, &mut out).expect("scan");
    assert_eq!(pages_of(&out, base), dirty.iter().copied().collect());
    out.clear();
    wp.scan_written(base, end, &mut out).expect("scan");
    assert!(out.is_empty(), "the continued scan re-protected everything");

    let mut present = Vec::new();
    let t0 = Instant::now();
    wp.scan_present(base, end, true, &mut present)
        .expect("present");
    let pres = t0.elapsed();
    assert_eq!(present, vec![(base, end)]);
    println!(
        "256 MiB populated: register+arm {arm:?}, clean scan {clean:?}, 10% scattered dirty scan \
         {ten:?} ({runs} runs), present scan {pres:?}"
    );
}

// ------------------------------------------------------------------ pagemap

#[test]
fn handles_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Tracee>();
    send::<WriteProtect>();
    send::<Pagemap>();
}

#[test]
fn soft_dirty_is_detected_as_absent_here() {
    let works = pagemap::soft_dirty_works();
    println!("soft-dirty works: {works}");
    let config = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null | grep MEM_SOFT_DIRTY",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if config.contains("# CONFIG_MEM_SOFT_DIRTY is not set") {
        assert!(
            !works,
            "soft-dirty is compiled out, yet the probe says it works"
        );
    } else if config.contains("CONFIG_MEM_SOFT_DIRTY=y") {
        assert!(
            works,
            "soft-dirty is built in, yet the probe says it does not work"
        );
    }
}

#[test]
fn pagemap_scan_continues_past_a_full_vector() {
    require_ptrace!();
    let t = Target::sleep();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    let ps = page_size();
    // Every other page of 20 000: 10 000 separate runs, more than one
    // output vector holds.
    let n = 20_000;
    let base = mmap_anon(&tr, n * ps);
    tr.syscall(
        libc::SYS_madvise,
        &[base, n * ps, libc::MADV_NOHUGEPAGE as u64],
    )
    .expect("madvise");
    let written: Vec<u64> = (0..n).step_by(2).collect();
    for &p in &written {
        vm::write(pid, base + p * ps, &[1]).expect("write");
    }
    let mut pm = Pagemap::open(pid).expect("open pagemap");
    let mut present = Vec::new();
    pm.present(base, base + n * ps, true, &mut present)
        .expect("present");
    assert_eq!(present.len(), written.len());
    assert_eq!(pages_of(&present, base), written.iter().copied().collect());

    let mut regions = Vec::new();
    pm.scan(
        base,
        base + n * ps,
        0,
        0,
        pagemap::PAGE_IS_PRESENT,
        0,
        pagemap::PAGE_IS_PRESENT,
        &mut regions,
    )
    .expect("scan");
    assert_eq!(regions.len(), written.len());
    assert!(regions
        .iter()
        .all(|r| r.categories == pagemap::PAGE_IS_PRESENT));

    // Classic entries agree.
    let mut entries = Vec::new();
    pm.entries(base, base + 8 * ps, &mut entries)
        .expect("entries");
    assert_eq!(entries.len(), 8);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e & PME_PRESENT != 0, i % 2 == 0, "page {i}: {e:#x}");
    }

    // Ranges above user space ([vsyscall]) are clamped to nothing.
    regions.clear();
    pm.scan(
        0xffff_ffff_ff60_0000,
        0xffff_ffff_ff60_1000,
        0,
        0,
        pagemap::PAGE_IS_PRESENT,
        0,
        pagemap::PAGE_IS_PRESENT,
        &mut regions,
    )
    .expect("scan of [vsyscall]");
    assert!(regions.is_empty());
    assert!(pm
        .scan(base + 1, base + ps, 0, 0, 0, 0, 0, &mut regions)
        .is_err());
}

// ------------------------------------------------------------------ memory

#[test]
fn read_ranges_of_scattered_pages() {
    require_ptrace!();
    let t = Target::sleep();
    let pid = t.pid();
    let tr = Tracee::seize(pid).expect("seize");
    let ps = page_size();
    // More runs than one process_vm_readv call takes (1024 iovecs).
    let n = 3000;
    let base = mmap_anon(&tr, n * ps);
    let pages: Vec<u64> = (0..n).step_by(2).collect();
    write_pages(pid, base, &pages, 7);
    let ranges: Vec<(u64, u64)> = pages
        .iter()
        .map(|&p| (base + p * ps, base + (p + 1) * ps))
        .collect();
    let mut buf = vec![0xffu8; 3]; // reused: its old contents do not matter
    let t0 = Instant::now();
    vm::read_ranges(pid, &ranges, &mut buf).expect("read");
    let took = t0.elapsed();
    assert_eq!(buf.len(), pages.len() * ps as usize);
    for (i, &p) in pages.iter().enumerate() {
        let got = &buf[i * ps as usize..(i + 1) * ps as usize];
        assert!(got == page_pattern(p, 7).as_slice(), "page {p}");
    }
    println!(
        "read_ranges: {} scattered pages in {took:?} ({:.2} GB/s)",
        pages.len(),
        buf.len() as f64 / took.as_secs_f64() / 1e9
    );

    // Multi-page runs and an empty range mixed in.
    let mixed = [
        (base, base + 3 * ps),
        (base + 10 * ps, base + 10 * ps),
        (base + 20 * ps, base + 21 * ps),
    ];
    vm::read_ranges(pid, &mixed, &mut buf).expect("read");
    assert_eq!(buf.len(), 4 * ps as usize);
    assert_eq!(&buf[..ps as usize], page_pattern(0, 7).as_slice());
    assert!(buf[ps as usize..2 * ps as usize].iter().all(|&b| b == 0));
    assert_eq!(&buf[3 * ps as usize..], page_pattern(20, 7).as_slice());

    // A page without read permission is still read (/proc/PID/mem).
    tr.syscall(
        libc::SYS_mprotect,
        &[base + 2 * ps, ps, libc::PROT_NONE as u64],
    )
    .expect("mprotect");
    vm::read_ranges(pid, &[(base + 2 * ps, base + 3 * ps)], &mut buf).expect("read PROT_NONE");
    assert_eq!(buf, page_pattern(2, 7));

    // Unmapped pages: a clear error naming the first one.
    munmap(&tr, base + 100 * ps, 2 * ps);
    match vm::read_ranges(pid, &[(base + 98 * ps, base + 104 * ps)], &mut buf) {
        Err(VmError::Fault { addr }) => assert_eq!(addr, base + 100 * ps),
        r => panic!("expected a fault at page 100, got {r:?}"),
    }
    assert_eq!(&buf[..ps as usize], page_pattern(98, 7).as_slice());
    match vm::read_ranges(pid, &[(base + 100 * ps, base + 101 * ps)], &mut buf) {
        Err(VmError::Fault { addr }) => assert_eq!(addr, base + 100 * ps),
        r => panic!("expected a fault, got {r:?}"),
    }
    assert!(matches!(
        vm::write(pid, base + 100 * ps, &[1]),
        Err(VmError::Fault { .. })
    ));
    // Writes do not force: a read-only page is a fault.
    tr.syscall(
        libc::SYS_mprotect,
        &[base + 4 * ps, ps, libc::PROT_READ as u64],
    )
    .expect("mprotect");
    assert!(matches!(
        vm::write(pid, base + 4 * ps, &[1]),
        Err(VmError::Fault { .. })
    ));
    drop(tr);
    drop(t);
    assert!(matches!(
        vm::read_ranges(pid, &[(base, base + ps)], &mut buf),
        Err(VmError::NoProcess(_))
    ));
}
