//! Migrations through the real `ferry` binary: a program nobody here wrote
//! (`python3` keeping its state in memory), and a migration across two
//! hosts — two network namespaces joined by a veth pair, made and removed
//! by the test — with the page server in one and the source in the other.
//! Needs root.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::{certs, free_port, gone, is_root, log_values, KillOnDrop};

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env("RUST_BACKTRACE", "0");
    c
}

/// A python3 program that keeps a counter and 8 MiB of data in memory and
/// appends the counter to `log` (opening it each time, so it holds no
/// descriptor across iterations).
fn python(log: &Path) -> Option<Child> {
    let script = format!(
        r#"
import os, time
os.closerange(3, 4096)
state = {{"n": 0, "data": bytearray(os.urandom(1 << 16) * 128)}}
while True:
    state["n"] += 1
    i = state["n"] % len(state["data"])
    state["data"][i] = (state["data"][i] + 1) % 256
    with open({log:?}, "a") as f:
        f.write("%d %d\n" % (state["n"], sum(state["data"][:4096])))
    time.sleep(0.01)
"#,
        log = log.to_str().unwrap()
    );
    run_python(&script)
}

/// `python3 -c script`, detached from our stdio; `None` without python3.
fn run_python(script: &str) -> Option<Child> {
    Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn counters(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

fn wait_for_log(path: &Path) {
    for _ in 0..200 {
        if !log_values(path).is_empty() || !counters(path).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} stays empty", path.display());
}

/// Runs `ferry migrate`, returns the restored pid.
fn migrate(netns: Option<&str>, pid: i32, to: &str, tls: &Path) -> i32 {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferry")]);
            c.env("RUST_BACKTRACE", "0");
            c
        }
        None => ferry(),
    };
    let out = common::migrate_args(&mut cmd, pid, to, tls)
        .args(["--json", "--log", "warn"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferry migrate failed: {stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "migrated {pid} -> {} downtime {} ms, rounds {}",
        json["restored_pid"],
        json["downtime_ms"],
        json["rounds"].as_array().map_or(0, |r| r.len())
    );
    json["restored_pid"].as_i64().unwrap() as i32
}

fn page_server(netns: Option<&str>, listen: &str, tls: &Path) -> common::ServerProcess {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferry")]);
            c
        }
        None => ferry(),
    };
    let child = common::page_server_args(&mut cmd, listen, tls)
        .args(["--restore", "--log", "warn"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    common::ServerProcess(child)
}

/// `ferry page-server --restore` on a free loopback port, killed when
/// dropped (before its TLS files go).
struct Loopback {
    _server: common::ServerProcess,
    to: String,
    tls: tempfile::TempDir,
}

impl Loopback {
    fn start() -> Loopback {
        let tls = certs();
        let to = format!("127.0.0.1:{}", free_port());
        let _server = page_server(None, &to, tls.path());
        Loopback { _server, to, tls }
    }

    /// `ferry migrate` of `pid` to it: the restored pid.
    fn migrate(&self, pid: i32) -> i32 {
        migrate(None, pid, &self.to, self.tls.path())
    }
}

fn assert_continues(pid: i32, new: i32, log: &Path, before: u64) {
    assert_ne!(new, pid);
    assert!(gone(pid), "the source is gone");
    std::thread::sleep(Duration::from_millis(400));
    let values = counters(log);
    let after = *values.last().unwrap();
    assert!(after > before + 5, "it counts on: {before} -> {after}");
    assert!(
        values.windows(2).all(|w| w[1] == w[0] + 1),
        "every value once, in order (no restart, no gap): {:?}",
        &values[values.len().saturating_sub(20)..]
    );
}

#[test]
fn python3_keeps_its_state_across_a_migration() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("python.log");
    let Some(mut child) = python(&log) else {
        eprintln!("skipped: no python3 on this machine");
        return;
    };
    let pid = child.id() as i32;
    wait_for_log(&log);
    let dest = Loopback::start();
    std::thread::sleep(Duration::from_millis(200));
    let before = *counters(&log).last().unwrap();
    let new = dest.migrate(pid);
    let _guard = KillOnDrop(new);
    let _ = child.wait();
    assert_continues(pid, new, &log, before);
}

/// A python3 program with a pool of four threads that take a lock and
/// count, and a main thread that writes the total and each thread's count
/// through a file it keeps open.
fn python_pool(log: &Path) -> Option<Child> {
    let script = format!(
        r#"
import os, threading, time
from concurrent.futures import ThreadPoolExecutor
os.closerange(3, 4096)
lock = threading.Lock()
counts = [0, 0, 0, 0]
total = [0]
def work(k):
    while True:
        with lock:
            counts[k] += 1
            total[0] += 1
        time.sleep(0.002)
pool = ThreadPoolExecutor(max_workers=4)
for k in range(4):
    pool.submit(work, k)
f = open({log:?}, "a", buffering=1)
while True:
    with lock:
        f.write("%d %s\n" % (total[0], " ".join(map(str, counts))))
    time.sleep(0.02)
"#,
        log = log.to_str().unwrap()
    );
    run_python(&script)
}

/// The per-thread counts of the last line of a `python_pool` log.
fn pool_counts(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rfind(|l| l.split_whitespace().count() == 5)
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn python3_with_a_thread_pool_and_an_open_file_continues() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("pool.log");
    let Some(mut child) = python_pool(&log) else {
        eprintln!("skipped: no python3 on this machine");
        return;
    };
    let pid = child.id() as i32;
    wait_for_log(&log);
    std::thread::sleep(Duration::from_millis(300));
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(threads >= 5, "the pool runs: {threads} threads");
    let dest = Loopback::start();
    let before = *counters(&log).last().unwrap();
    let new = dest.migrate(pid);
    let _guard = KillOnDrop(new);
    let _ = child.wait();
    assert!(gone(pid), "the source is gone");
    let at = pool_counts(&log);
    std::thread::sleep(Duration::from_millis(500));
    let after = pool_counts(&log);
    let values = counters(&log);
    assert_eq!(
        std::fs::read_dir(format!("/proc/{new}/task"))
            .unwrap()
            .count(),
        threads,
        "every thread came along"
    );
    assert!(*values.last().unwrap() > before, "the total grows");
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "the total never went back (no restart)"
    );
    assert_eq!(at.len(), 4);
    for k in 0..4 {
        assert!(
            after[k] > at[k],
            "worker {k} counts on: {at:?} -> {after:?}"
        );
    }
}

/// A python3 program holding one descriptor of each kind ferry carries with
/// state: a pipe with unread bytes (both ends, non-blocking read end), an
/// eventfd at 41, a 50 ms periodic timerfd, a signalfd for SIGUSR1, an
/// epoll watching the pipe, a memfd and an unlinked file with contents and
/// offsets, a FIFO with unread bytes. It logs "ready", waits for `go` to exist, then logs what each
/// descriptor says, one `key value` line each, and "done".
fn python_fds(log: &Path, go: &Path, dir: &Path) -> Option<Child> {
    let script = format!(
        r#"
import os, time, select, signal, ctypes, struct
os.closerange(3, 4096)
libc = ctypes.CDLL(None, use_errno=True)
def log(*a):
    with open({log:?}, "a") as f:
        f.write(" ".join(map(str, a)) + "\n")
r, w = os.pipe()
os.set_blocking(r, False)
os.write(w, b"unread-bytes")
e = os.eventfd(41, os.EFD_CLOEXEC)
t = libc.timerfd_create(1, os.O_CLOEXEC)
its = struct.pack("qqqq", 0, 50000000, 0, 50000000)
assert libc.timerfd_settime(t, 0, its, None) == 0
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
mask = ctypes.c_uint64(1 << (signal.SIGUSR1 - 1))
s = libc.signalfd(-1, ctypes.byref(mask), os.O_CLOEXEC)
assert s >= 0
ep = select.epoll()
ep.register(r, select.EPOLLIN)
m = os.memfd_create("ferry test", os.MFD_CLOEXEC)
os.write(m, b"memfd-contents")
os.lseek(m, 6, os.SEEK_SET)
path = os.path.join({dir:?}, "doomed")
d = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.write(d, b"deleted-contents")
os.lseek(d, 8, os.SEEK_SET)
os.unlink(path)
fifo = os.path.join({dir:?}, "fifo")
os.mkfifo(fifo)
ff = os.open(fifo, os.O_RDWR)
os.write(ff, b"fifo-bytes")
log("ready")
n = 0
while not os.path.exists({go:?}):
    n += 1
    time.sleep(0.005)
log("epoll", ep.poll(0) == [(r, select.EPOLLIN)])
log("pipe", os.read(r, 100), os.get_blocking(r))
log("eventfd", os.eventfd_read(e))
log("timer", struct.unpack("Q", os.read(t, 8))[0] > 0)
info = os.read(s, 128)
log("signalfd", struct.unpack("I", info[:4])[0])
log("memfd", os.read(m, 100))
log("deleted", os.read(d, 100))
log("fifo", os.read(ff, 100))
log("done")
while True:
    time.sleep(1)
"#,
        log = log.to_str().unwrap(),
        go = go.to_str().unwrap(),
        dir = dir.to_str().unwrap(),
    );
    run_python(&script)
}

#[test]
fn python3_keeps_its_pipes_eventfd_timerfd_signalfd_epoll_and_unlinked_files() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, go) = (dir.path().join("fds.log"), dir.path().join("go"));
    let Some(mut child) = python_fds(&log, &go, dir.path()) else {
        eprintln!("skipped: no python3 on this machine");
        return;
    };
    let pid = child.id() as i32;
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    for _ in 0..300 {
        if text().contains("ready") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(text().contains("ready"), "python set up: {}", text());
    let dest = Loopback::start();
    let new = dest.migrate(pid);
    let _guard = KillOnDrop(new);
    let _ = child.wait();
    assert!(gone(pid), "the source is gone");
    // Sent to the restored process only: its signalfd must be there.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    std::fs::write(&go, b"").unwrap();
    for _ in 0..300 {
        if text().contains("done") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = text();
    assert!(
        out.contains("done"),
        "the restored process got through: {out}"
    );
    for want in [
        "epoll True".to_string(),
        "pipe b'unread-bytes' False".into(),
        "eventfd 41".into(),
        "timer True".into(),
        format!("signalfd {}", libc::SIGUSR1),
        "memfd b'contents'".into(),
        "deleted b'contents'".into(),
        "fifo b'fifo-bytes'".into(),
    ] {
        assert!(out.lines().any(|l| l == want), "{want:?} in {out}");
    }
}

#[test]
fn descriptors_ferry_cannot_restore_are_refused_by_name_and_the_source_runs_on() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("refused.log");
    let script = format!(
        r#"
import os, time, ctypes
os.closerange(3, 4096)
libc = ctypes.CDLL(None)
i = libc.inotify_init1(0)
assert i >= 0
e = os.eventfd(0)
os.dup2(e, 9)
n = 0
while True:
    n += 1
    with open({log:?}, "a") as f:
        f.write("%d\n" % n)
    time.sleep(0.01)
"#,
        log = log.to_str().unwrap()
    );
    let Some(mut child) = run_python(&script) else {
        eprintln!("skipped: no python3 on this machine");
        return;
    };
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    wait_for_log(&log);
    let dest = Loopback::start();
    let out = common::migrate_args(&mut ferry(), pid, &dest.to, dest.tls.path())
        .args(["--log", "warn"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("fd 3: anon_inode:inotify"), "{stderr}");
    let before = *log_values(&log).last().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // Without the inotify, the eventfd at two numbers is refused next.
    let mut fds = ferry::state::capture_fds(pid).unwrap();
    fds.retain(|f| f.fd != 3);
    let e = ferry::restore::check_fds(&fds).unwrap_err().to_string();
    assert!(
        e.starts_with("fd 9: anon_inode:[eventfd]: the same open file as fd 4"),
        "{e}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(*log_values(&log).last().unwrap() > before, "it runs on");
    assert!(child.try_wait().unwrap().is_none());
}

/// Two network namespaces joined by veth, removed on drop.
struct Hosts {
    a: String,
    b: String,
}

impl Hosts {
    fn make() -> Option<Hosts> {
        let tag = std::process::id() % 100_000;
        let h = Hosts {
            a: format!("ferry-a-{tag}"),
            b: format!("ferry-b-{tag}"),
        };
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !ip(&["netns", "add", &h.a]) {
            return None;
        }
        let ok = ip(&["netns", "add", &h.b])
            && ip(&[
                "link", "add", "fa0", "netns", &h.a, "type", "veth", "peer", "name", "fb0",
                "netns", &h.b,
            ])
            && ip(&["-n", &h.a, "addr", "add", "10.213.0.1/24", "dev", "fa0"])
            && ip(&["-n", &h.b, "addr", "add", "10.213.0.2/24", "dev", "fb0"])
            && ip(&["-n", &h.a, "link", "set", "lo", "up"])
            && ip(&["-n", &h.b, "link", "set", "lo", "up"])
            && ip(&["-n", &h.a, "link", "set", "fa0", "up"])
            && ip(&["-n", &h.b, "link", "set", "fb0", "up"]);
        ok.then_some(h)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn migration_across_two_hosts_in_network_namespaces() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let Some(hosts) = Hosts::make() else {
        panic!("cannot make network namespaces (is iproute2 installed?)");
    };
    let tls = certs();
    let _server = page_server(Some(&hosts.b), "10.213.0.2:7070", tls.path());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fixture.log");
    // The workload runs in host A's namespace, like the source ferry.
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.a,
            env!("CARGO_BIN_EXE_ferry-fixture"),
        ])
        .args([
            "--mib",
            "64",
            "--dirty-rate",
            "1000",
            "--single-thread",
            "--log",
        ])
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    {
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut ready)
            .unwrap();
    }
    let pid: i32 = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    wait_for_log(&log);
    let before = *log_values(&log).last().unwrap();
    let new = migrate(Some(&hosts.a), pid, "10.213.0.2:7070", tls.path());
    let _guard = KillOnDrop(new);
    let _ = child.wait();
    // The restored process lives in host B's network namespace.
    let ns_b = std::fs::read_link(format!("/proc/{new}/ns/net")).unwrap();
    let server_ns = std::fs::read_link(format!("/run/netns/{}", hosts.b)).ok();
    eprintln!("restored in {ns_b:?} (host B: {server_ns:?})");
    assert_ne!(
        ns_b,
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "restored on host B, not here"
    );
    std::thread::sleep(Duration::from_millis(400));
    let values = log_values(&log);
    let after = *values.last().unwrap();
    assert!(
        after > before,
        "it counts on after the move: {before} -> {after}"
    );
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "the counter never restarted"
    );
    assert!(gone(pid), "the source is gone");
}

#[test]
fn the_demo_migrates_its_workload() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let out = ferry()
        .args(["demo", "--size", "32", "--log", "warn"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("migrated: pid"), "{stdout}");
    assert!(stdout.contains("not from zero"), "{stdout}");
    assert!(stdout.contains("pages as they should be"), "{stdout}");
}

#[test]
fn bench_compares_modes_and_writes_json_and_svg() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (dir.path().join("b.json"), dir.path().join("b.svg"));
    let out = ferry()
        .args(["bench", "--size", "16", "--runs", "1", "--log", "warn"])
        .args(["--modes", "iterative,stop-and-copy", "--json"])
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("vs s&c"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let modes: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["iterative", "stop-and-copy"]);
    for m in v.as_array().unwrap() {
        assert!(m["downtime_ms"]["median"].as_f64().unwrap() > 0.0);
        // 16 MiB: the migrated workload checked all 4096 pages.
        assert_eq!(m["runs"][0]["verified_pages"].as_u64(), Some(4096), "{m}");
    }
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}
