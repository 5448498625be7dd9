//! Process and thread state that lives in the kernel only, across a
//! migration through a page server of this test: a python3 whose two
//! threads each run on an alternate signal stack of their own
//! (`sigaltstack`, which Go's runtime and Rust's stack-overflow handler
//! rely on) with a parent-death signal of their own, and whose umask is
//! 027, reports the same stacks, signals and mask after the move; one with a periodic `ITIMER_REAL` keeps getting its SIGALRMs
//! and its `ITIMER_VIRTUAL` keeps what it had left; one in a seccomp
//! sandbox that denies calls ferry injects keeps its two filters, in
//! order; one with POSIX timers finds them under the same ids, still
//! ticking, each queued timer signal with its siginfo; one with a timer
//! on another process's CPU time is refused by name and runs on.
//! Without them the restored threads would have no alternate stack, the
//! page server's umask, no timers and no sandbox. Needs root.

use std::process::Command;
use std::time::Duration;

mod common;
use common::{is_root, python, start_tree, KillTree};

/// Each thread sets an alternate signal stack and a parent-death signal of
/// its own, then logs `name sp flags size umask pdeathsig` every 10 ms to
/// `argv[1]`, as it reads them.
const ALTSTACK: &str = r#"
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
class stack_t(ctypes.Structure):
    _fields_ = [('sp', ctypes.c_void_p), ('flags', ctypes.c_int), ('size', ctypes.c_size_t)]
log = open(sys.argv[1], 'a', buffering=1)
lock = threading.Lock()
os.umask(0o027)
def run(name, size, pdeathsig):
    buf = ctypes.create_string_buffer(size)
    ss = stack_t(ctypes.cast(buf, ctypes.c_void_p), 0, size)
    assert libc.sigaltstack(ctypes.byref(ss), None) == 0
    assert libc.prctl(1, pdeathsig, 0, 0, 0) == 0
    while True:
        old = stack_t()
        libc.sigaltstack(None, ctypes.byref(old))
        sig = ctypes.c_int()
        libc.prctl(2, ctypes.byref(sig), 0, 0, 0)
        with lock:
            mask = os.umask(0o027)
            log.write('%s %d %d %d %o %d\n' % (name, old.sp or 0, old.flags, old.size, mask, sig.value))
        time.sleep(0.01)
threading.Thread(target=run, args=('worker', 40960, 12), daemon=True).start()
run('main', 65536, 10)
"#;

fn last_of(log: &std::path::Path, name: &str) -> Option<String> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .rev()
        .find(|l| l.starts_with(&format!("{name} ")))
        .map(str::to_owned)
}

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace)");
            return;
        }
    };
}

/// The python `script` started with a log file `name` in a fresh
/// directory as its `argv[1]`; its tree is killed when dropped.
fn logging(script: &str, name: &str) -> (tempfile::TempDir, std::path::PathBuf, KillTree) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join(name);
    let src = start_tree(Command::new(python()).args(["-c", script]).arg(&log));
    (dir, log, src)
}

fn lines(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |t| t.lines().count())
}

/// Runs `script`, whose threads `main` and `worker` each log lines that
/// start with their name and say what they read of themselves; lets
/// `check` look at their last lines, migrates it, and asserts that each
/// thread reads the same of itself after the move (`what`).
async fn threads_read_the_same_after_a_migration(
    script: &str,
    name: &str,
    what: &str,
    check: impl Fn(&[String]),
) {
    let (_dir, log, src) = logging(script, name);
    common::wait_until("both threads to log", Duration::from_secs(10), || {
        last_of(&log, "main").is_some() && last_of(&log, "worker").is_some()
    });
    let last = || -> Vec<String> {
        ["main", "worker"]
            .iter()
            .map(|n| last_of(&log, n).unwrap())
            .collect()
    };
    let before = last();
    check(&before);

    let moved = common::migrate_here(src.0).await;
    let n = lines(&log);
    common::wait_until(
        "the restored threads to log",
        Duration::from_secs(10),
        || lines(&log) > n + 20,
    );
    assert_eq!(last(), before, "{what} of each thread");
    moved.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternate_signal_stacks_parent_death_signals_and_the_umask_survive_a_migration() {
    need_root!();
    let what = "sp flags size umask pdeathsig";
    threads_read_the_same_after_a_migration(ALTSTACK, "altstack", what, |before| {
        for l in before {
            let f: Vec<&str> = l.split(' ').collect();
            assert_ne!(f[1], "0", "the thread has an alternate stack: {l}");
            assert_eq!(f[4], "27", "the umask: {l}");
            assert_ne!(f[5], "0", "a parent-death signal: {l}");
        }
        assert_ne!(before[0], before[1], "each thread has its own");
    })
    .await;
}

/// The main thread at nice 5, idle-class I/O; a worker under SCHED_BATCH
/// pinned to the last CPU, best-effort I/O at level 7, named
/// `ferry-worker`. Each logs `name policy nice cpus ioprio comm` every
/// 10 ms to `argv[1]`, as it reads them.
const SCHEDULED: &str = r#"
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
log = open(sys.argv[1], 'a', buffering=1)
lock = threading.Lock()
last = max(os.sched_getaffinity(0))
def run(name, setup):
    setup()
    while True:
        cpus = ','.join(str(c) for c in sorted(os.sched_getaffinity(0)))
        comm = ctypes.create_string_buffer(16)
        libc.prctl(16, comm)
        line = '%s %d %d %s %d %s\n' % (name, os.sched_getscheduler(0),
            os.getpriority(os.PRIO_PROCESS, 0), cpus, libc.syscall(252, 1, 0),
            comm.value.decode())
        with lock:
            log.write(line)
        time.sleep(0.01)
def worker():
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    os.sched_setaffinity(0, {last})
    assert libc.syscall(251, 1, 0, (2 << 13) | 7) == 0
    assert libc.prctl(15, b'ferry-worker') == 0
def main():
    os.nice(5)
    assert libc.syscall(251, 1, 0, 3 << 13) == 0
threading.Thread(target=run, args=('worker', worker), daemon=True).start()
run('main', main)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threads_scheduling_and_name_survive_a_migration() {
    need_root!();
    let what = "policy nice cpus ioprio comm";
    threads_read_the_same_after_a_migration(SCHEDULED, "sched", what, |before| {
        let f: Vec<&str> = before[0].split(' ').collect();
        assert_eq!((f[1], f[2], f[4]), ("0", "5", "24576"), "{}", before[0]);
        let f: Vec<&str> = before[1].split(' ').collect();
        assert_eq!((f[1], f[2], f[4]), ("3", "0", "16391"), "{}", before[1]);
        assert!(!f[3].contains(','), "the worker is pinned: {}", before[1]);
        assert_eq!(f[5], "ferry-worker");
    })
    .await;
}

/// The main thread makes its process a child subreaper, without
/// transparent huge pages, memory-deny-write-execute, timer slack 100 µs;
/// the worker's timer slack is 777 µs. Each logs `name slack subreaper thp
/// mdwe` every 10 ms to `argv[1]`, as it reads them.
const PRCTLS: &str = r#"
import ctypes, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
log = open(sys.argv[1], 'a', buffering=1)
lock = threading.Lock()
def run(name, setup):
    setup()
    while True:
        sub = ctypes.c_int(-1)
        libc.prctl(37, ctypes.byref(sub), 0, 0, 0)
        line = '%s %d %d %d %d\n' % (name, libc.prctl(30, 0, 0, 0, 0), sub.value,
            libc.prctl(42, 0, 0, 0, 0), libc.prctl(66, 0, 0, 0, 0))
        with lock:
            log.write(line)
        time.sleep(0.01)
def worker():
    assert libc.prctl(29, 777000, 0, 0, 0) == 0
def main():
    assert libc.prctl(36, 1, 0, 0, 0) == 0
    assert libc.prctl(41, 1, 0, 0, 0) == 0
    assert libc.prctl(65, 1, 0, 0, 0) == 0
    assert libc.prctl(29, 100000, 0, 0, 0) == 0
    threading.Thread(target=run, args=('worker', worker), daemon=True).start()
run('main', main)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subreaper_thp_mdwe_and_timer_slack_survive_a_migration() {
    need_root!();
    let what = "slack subreaper thp mdwe";
    threads_read_the_same_after_a_migration(PRCTLS, "prctls", what, |before| {
        assert!(before[0].ends_with(" 100000 1 1 1"), "{}", before[0]);
        assert!(before[1].ends_with(" 777000 1 1 1"), "{}", before[1]);
    })
    .await;
}

/// A SIGALRM every 20 ms (ITIMER_REAL) counted by a handler, and an
/// ITIMER_VIRTUAL with an hour of CPU time left, every minute; logs
/// `ticks virtual_left virtual_interval` every 10 ms to `argv[1]`.
const ITIMERS: &str = r#"
import signal, sys, time
ticks = [0]
def tick(s, f):
    ticks[0] += 1
signal.signal(signal.SIGALRM, tick)
signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
signal.setitimer(signal.ITIMER_VIRTUAL, 3600, 60)
log = open(sys.argv[1], 'a', buffering=1)
while True:
    left, every = signal.getitimer(signal.ITIMER_VIRTUAL)
    log.write('%d %.3f %.3f\n' % (ticks[0], left, every))
    time.sleep(0.01)
"#;

fn timer_log(log: &std::path::Path) -> Vec<(u64, f64, f64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_timers_go_on_after_a_migration() {
    need_root!();
    let (_dir, log, src) = logging(ITIMERS, "itimers");
    common::wait_until("SIGALRMs to come", Duration::from_secs(10), || {
        timer_log(&log).last().is_some_and(|l| l.0 > 5)
    });

    let moved = common::migrate_here(src.0).await;
    let at_move = timer_log(&log).last().unwrap().0;
    // 20 more SIGALRMs: ~0.4 s of the restored ITIMER_REAL.
    common::wait_until(
        "the restored process's SIGALRMs",
        Duration::from_secs(10),
        || timer_log(&log).last().is_some_and(|l| l.0 > at_move + 20),
    );
    let (_, left, every) = *timer_log(&log).last().unwrap();
    assert_eq!(every, 60.0, "ITIMER_VIRTUAL's interval");
    an_hour_less_a_little(left, "ITIMER_VIRTUAL kept what it had left");
    moved.server.stop().await;
}

/// A timer armed for an hour before the move has a little less left after
/// it (getitimer rounds up to the tick: 3600.004 is "nothing used").
fn an_hour_less_a_little(left: f64, what: &str) {
    assert!(3500.0 < left && left < 3601.0, "{what}: {left} s");
}

/// Two seccomp filters, like a sandboxed service's: the first denies
/// `uname`, `userfaultfd` and `prctl` with EPERM (Docker's default profile
/// denies `userfaultfd`, which ferry's dirty tracking injects; ferry's
/// state capture and restore inject `prctl`), the second `uname` with
/// EACCES, which wins as the newer. Then logs `n uname_errno uffd_errno`
/// every 10 ms to `argv[1]`.
const SANDBOXED: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
class sock_filter(ctypes.Structure):
    _fields_ = [('code', ctypes.c_ushort), ('jt', ctypes.c_ubyte), ('jf', ctypes.c_ubyte), ('k', ctypes.c_uint)]
class sock_fprog(ctypes.Structure):
    _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.POINTER(sock_filter))]
def deny(nrs, errno):
    insns = [sock_filter(0x20, 0, 0, 0)]
    for nr in nrs:
        insns += [sock_filter(0x15, 0, 1, nr), sock_filter(0x06, 0, 0, 0x00050000 | errno)]
    insns.append(sock_filter(0x06, 0, 0, 0x7fff0000))
    arr = (sock_filter * len(insns))(*insns)
    prog = sock_fprog(len(insns), arr)
    assert libc.syscall(317, 1, 0, ctypes.byref(prog)) == 0
assert libc.prctl(38, 1, 0, 0, 0) == 0
deny([63, 323, 157], 1)
deny([63], 13)
def errno_of(f):
    try:
        f()
        return 0
    except OSError as e:
        return e.errno
def uffd():
    if libc.syscall(323, 0) < 0:
        raise OSError(ctypes.get_errno(), 'userfaultfd')
log = open(sys.argv[1], 'a', buffering=1)
n = 0
while True:
    n += 1
    log.write('%d %d %d\n' % (n, errno_of(os.uname), errno_of(uffd)))
    time.sleep(0.01)
"#;

/// `Seccomp:` and `Seccomp_filters:` of `/proc/PID/status`.
fn seccomp_of(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("Seccomp"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_process_keeps_its_seccomp_filters_across_a_migration() {
    need_root!();
    let (_dir, log, src) = logging(SANDBOXED, "sandboxed");
    let last = || {
        std::fs::read_to_string(&log)
            .ok()
            .and_then(|t| t.lines().last().map(str::to_owned))
            .unwrap_or_default()
    };
    let n = |l: &str| {
        l.split(' ')
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    common::wait_until("it to log", Duration::from_secs(10), || n(&last()) > 3);
    let before = last();
    assert!(before.ends_with(" 13 1"), "sandboxed before: {before}");
    let status = seccomp_of(src.0);
    assert_eq!(status, ["Seccomp:\t2", "Seccomp_filters:\t2"]);

    // `ferry migrate` itself, which keeps CAP_SYS_ADMIN for a sandboxed
    // process (its filters, and their suspension for ferry's injections,
    // userfaultfd and prctl among them) and drops the rest.
    let tls = common::certs();
    let server = common::Server::start_restoring(
        tls.path(),
        std::sync::Arc::new(ferry_page_server::store::mem::MemStore::new()),
    );
    let out = common::migrate_command(src.0, &server.addr.to_string(), tls.path())
        .args(["--json", "--log", "debug"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let new = common::restored_pid(&out, "a sandboxed process");
    let _kill = common::KillOnDrop(new);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("dac_read_search,kill,net_admin,sys_ptrace,sys_admin"),
        "the source keeps sys_admin for a sandbox: {stderr}"
    );
    assert_eq!(seccomp_of(new), status);
    let at = n(&last());
    common::wait_until(
        "the restored process to log",
        Duration::from_secs(10),
        || n(&last()) > at + 10,
    );
    let after = last();
    assert!(
        after.ends_with(" 13 1"),
        "the same sandbox, the newer filter still first: {after}"
    );
    server.stop().await;
}

/// A page server without `CAP_SYS_ADMIN` cannot install a sandbox's
/// filters: it says so at the handshake, before anything is frozen, and
/// the source counts on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_server_that_cannot_install_the_filters_refuses_before_the_freeze() {
    need_root!();
    let tls = common::certs();
    let port = common::free_port();
    let mut ps = common::page_server_command(tls.path(), port)
        .args(["--restore", "--caps", "checkpoint_restore"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    common::wait_for_server(addr, tls.path()).await;
    let (_dir, log, src) = logging(SANDBOXED, "refused");
    let count = || lines(&log);
    common::wait_until("it to count", Duration::from_secs(10), || count() > 3);
    let e = ferry::migrate::migrate(
        common::restore_options(src.0, common::connect(addr, tls.path())),
        &mut |r| assert!(!r.frozen, "frozen before the refusal"),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("pre-flight") && e.to_string().contains("cap_sys_admin"),
        "{e}"
    );
    let n = count();
    common::wait_until("it to count on", Duration::from_secs(10), || {
        count() > n + 5
    });
    assert_ne!(common::proc_state(src.0), 'T', "left stopped");
    let _ = ps.kill();
    let _ = ps.wait();
}

/// Four POSIX timers made with the raw syscalls (the kernel's ids), after
/// a first one is deleted so the ids start at 1, not at what a fresh
/// process would be given: A sends SIGUSR1 every 20 ms to the process (a
/// handler counts), B is never armed, C fires in an hour, D sends SIGUSR2
/// every 20 ms to the worker thread alone, which takes it with
/// `sigwaitinfo` and counts those that say they come from a timer
/// (`SI_TIMER`) and any that do not; E counts the main thread's CPU time
/// (its clock names the thread's tid), an hour of it. Logs `a d bad
/// c_left b_ok ids e_left` every 10 ms to `argv[1]`.
const POSIX_TIMERS: &str = r#"
import ctypes, signal, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
class sigevent(ctypes.Structure):
    _fields_ = [('value', ctypes.c_void_p), ('signo', ctypes.c_int), ('notify', ctypes.c_int),
                ('tid', ctypes.c_int), ('pad', ctypes.c_int * 11)]
class itimerspec(ctypes.Structure):
    _fields_ = [('interval', ctypes.c_long * 2), ('value', ctypes.c_long * 2)]
def create(clock, ev):
    tid = ctypes.c_int(-1)
    assert libc.syscall(222, clock, ctypes.byref(ev) if ev else None, ctypes.byref(tid)) == 0
    return tid.value
def arm(t, every, first):
    spec = itimerspec((0, every), (int(first), int(first * 1e9) % 1000000000))
    assert libc.syscall(223, t, 0, ctypes.byref(spec), None) == 0
def left(t):
    spec = itimerspec()
    if libc.syscall(224, t, ctypes.byref(spec)) != 0:
        return -1.0
    return spec.value[0] + spec.value[1] / 1e9
counts = {'a': 0, 'd': 0, 'bad': 0}
def on_usr1(s, f):
    counts['a'] += 1
signal.signal(signal.SIGUSR1, on_usr1)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
ready = threading.Event()
worker_tid = []
def worker():
    worker_tid.append(threading.get_native_id())
    ready.set()
    while True:
        info = signal.sigwaitinfo([signal.SIGUSR2])
        if info.si_code == -2:
            counts['d'] += 1
        else:
            counts['bad'] += 1
threading.Thread(target=worker, daemon=True).start()
ready.wait()
gone = create(1, None)
a = create(1, sigevent(0x1234, signal.SIGUSR1, 0, 0))
b = create(0, None)
c = create(7, sigevent(0, signal.SIGUSR1, 1, 0))
d = create(1, sigevent(0x5678, signal.SIGUSR2, 4, worker_tid[0]))
e = create(time.pthread_getcpuclockid(threading.main_thread().ident), sigevent(0, 0, 1, 0))
assert libc.syscall(226, gone) == 0
arm(a, 20000000, 0.02)
arm(c, 0, 3600)
arm(d, 20000000, 0.02)
arm(e, 0, 3600)
log = open(sys.argv[1], 'a', buffering=1)
while True:
    log.write('%d %d %d %.3f %d %d,%d,%d,%d %.3f\n' % (counts['a'], counts['d'], counts['bad'],
              left(c), left(b) == 0.0, a, b, c, d, left(e)))
    time.sleep(0.01)
"#;

/// The fields of the last line of the POSIX timers' log.
fn posix_log(log: &std::path::Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(log).ok()?;
    let last = text.lines().rev().find(|l| l.split(' ').count() == 7)?;
    Some(last.split(' ').map(str::to_owned).collect())
}

/// The `ID:`, `signal:` and `ClockID:` lines of `/proc/PID/timers`, its
/// `notify:` lines without the pid or tid they name, and a thread's CPU
/// clock (which names its tid) as `cpu`.
fn timers_of(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/timers"))
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("ClockID: -") {
            Some(_) => "ClockID: cpu".to_owned(),
            None => l.split('.').next().unwrap().to_owned(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_timers_keep_their_ids_signals_and_times_across_a_migration() {
    need_root!();
    let (_dir, log, src) = logging(POSIX_TIMERS, "posix");
    let count = |k: usize| posix_log(&log).map_or(0, |f| f[k].parse::<u64>().unwrap());
    common::wait_until("both timers to tick", Duration::from_secs(10), || {
        count(0) > 5 && count(1) > 5
    });
    let before = posix_log(&log).unwrap();
    assert_eq!(before[5], "1,2,3,4", "ids after the first was deleted");
    let listed = timers_of(src.0);
    assert_eq!(listed.iter().filter(|l| l.starts_with("ID:")).count(), 5);

    let moved = common::migrate_here(src.0).await;
    assert_eq!(
        timers_of(moved.report.restored_pid),
        listed,
        "the restored process's /proc/PID/timers: ids, signals and values, notify kinds, clocks"
    );
    let (a0, d0) = (count(0), count(1));
    common::wait_until(
        "the restored timers to tick",
        Duration::from_secs(10),
        || count(0) > a0 + 20 && count(1) > d0 + 20,
    );
    let after = posix_log(&log).unwrap();
    assert_eq!(
        after[2], "0",
        "every SIGUSR2 the worker took came from its timer"
    );
    an_hour_less_a_little(
        after[3].parse().unwrap(),
        "the one-hour timer kept what it had left",
    );
    assert_eq!(after[4], "1", "the unarmed timer is there, unarmed");
    assert_eq!(after[5], "1,2,3,4");
    an_hour_less_a_little(
        after[6].parse().unwrap(),
        "the timer on the main thread's CPU time runs on its new tid",
    );
    moved.server.stop().await;
}

/// A POSIX timer on its parent's CPU time, then counts to `argv[1]`.
const OTHERS_CPU_CLOCK: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
clock, timer = ctypes.c_int(), ctypes.c_int()
assert libc.clock_getcpuclockid(os.getppid(), ctypes.byref(clock)) == 0
assert libc.syscall(222, clock.value, None, ctypes.byref(timer)) == 0
log = open(sys.argv[1], 'a', buffering=1)
n = 0
while True:
    n += 1
    log.write('%d\n' % n)
    time.sleep(0.01)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_on_another_processs_cpu_time_is_refused_by_name_and_runs_on() {
    need_root!();
    refused_and_runs_on(OTHERS_CPU_CLOCK, "counts the CPU time of another process").await;
}

/// Migrating the python `script` (counting to its `argv[1]`) is refused
/// with an error that says `why`, and the source counts on, not stopped.
async fn refused_and_runs_on(script: &str, why: &str) {
    let (_dir, log, src) = logging(script, "count");
    let count = || lines(&log);
    common::wait_until("it to count", Duration::from_secs(10), || count() > 3);
    let tls = common::certs();
    let server = common::Server::start_restoring(
        tls.path(),
        std::sync::Arc::new(ferry_page_server::store::mem::MemStore::new()),
    );
    let e = ferry::migrate::migrate(
        common::restore_options(src.0, common::connect(server.addr, tls.path())),
        &mut |_| {},
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains(why),
        "refused for another reason: {e}"
    );
    let n = count();
    common::wait_until("it to count on", Duration::from_secs(10), || {
        count() > n + 5
    });
    assert_ne!(common::proc_state(src.0), 'T', "left stopped");
    server.stop().await;
}
