//! `ferry migrate --keep-pids`, end to end on real processes through a
//! page server of this test (restoring on this host): a python3 with
//! threads keeps its pid and every thread id, in a new pid namespace whose
//! pid 1 is ferry's reaper, and reports the same ids itself after the
//! move; a tree keeps its pids, parents, sessions and groups; a tree that
//! spans two pid namespaces is refused by name before any freeze and runs
//! on; without the flag the process lands in the page server's namespace;
//! a pipeline keeps its pids and every byte in its pipe.
//! CI runs this inside `unshare --pid --fork --mount-proc`: the sources'
//! pids are then those of that namespace, which is what is kept. Needs
//! root.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry::dump::DumpOptions;
use ferry::migrate::{MigrateError, MigrateReport};
use ferry::tree;
use ferry_page_server::store::mem::MemStore;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{
    certs, connect, gone, is_root, proc_field, proc_state, python, python_tree, restore_options,
    start_tree, KillOnDrop, ZOMBIE_PARENT,
};

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace, clone3 with set_tid)");
            return;
        }
    };
}

fn wait_until(what: &str, f: impl FnMut() -> bool) {
    common::wait_until(what, Duration::from_secs(10), f)
}

/// The ids of a `/proc/.../status` line such as `NSpid:`, outermost first.
fn ns_ids(path: &str, field: &str) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The last (innermost) id of `field` of process `pid`.
fn inner(pid: i32, field: &str) -> i32 {
    *ns_ids(&format!("/proc/{pid}/status"), field)
        .last()
        .unwrap_or_else(|| panic!("no {field} for {pid}"))
}

/// The innermost tids of every thread of `pid`, sorted.
fn inner_tids(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|e| {
            let path = format!("{}/status", e.path().display());
            *ns_ids(&path, "NSpid:").last().unwrap()
        })
        .collect();
    v.sort();
    v
}

fn pid_ns(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .unwrap()
        .display()
        .to_string()
}

/// A restoring page server of this test, in this process, on a memory
/// store.
struct Dest {
    server: common::Server,
    tls: tempfile::TempDir,
}

impl Dest {
    fn start() -> Dest {
        let tls = certs();
        let server = common::Server::start_restoring(tls.path(), Arc::new(MemStore::new()));
        Dest { server, tls }
    }

    /// Migrates `pid` (its tree) here, in at most 3 rounds.
    async fn migrate(&self, pid: i32, keep_pids: bool) -> Result<MigrateReport, MigrateError> {
        let opts = DumpOptions {
            keep_pids,
            ..restore_options(pid, connect(self.server.addr, self.tls.path()))
        };
        ferry::migrate::migrate(opts, &mut |_| {}).await
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

/// The parent of restored process `new`: with `--keep-pids`, its pid
/// namespace's reaper, which takes everything in it along when killed.
fn reaper_of(new: i32) -> KillOnDrop {
    KillOnDrop(proc_field(new, "PPid:").unwrap().parse::<i32>().unwrap())
}

/// Three threads that each log `getpid native_id n` to `argv[1]` every
/// 10 ms, taking a lock around a shared counter; `n` counts per thread.
const THREADS: &str = r#"
import os, sys, threading, time
lock = threading.Lock()
total = [0]
log = open(sys.argv[1], 'a', buffering=1)
def work():
    n = 0
    while True:
        n += 1
        with lock:
            total[0] += 1
            log.write('%d %d %d\n' % (os.getpid(), threading.get_native_id(), n))
        time.sleep(0.01)
for _ in range(3):
    threading.Thread(target=work, daemon=True).start()
while True:
    time.sleep(1)
"#;

/// (pid, native thread id, count) per line of a `THREADS` log.
fn thread_log(path: &std::path::Path) -> Vec<(i32, i32, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_keep_their_pid_and_tids_in_a_new_pid_namespace() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("threads");
    let src = python_tree(THREADS, &log);
    let pid = src.0;
    wait_until("every thread to log", || {
        let l = thread_log(&log);
        let mut t: Vec<i32> = l.iter().map(|x| x.1).collect();
        t.sort();
        t.dedup();
        t.len() == 3 && l.len() > 30
    });
    let ns_pid = inner(pid, "NSpid:");
    let tids = inner_tids(pid);
    assert_eq!(tids.len(), 4, "main thread and three workers");
    let source_ns = pid_ns(pid);
    // What python itself says before: its pid and its threads' ids.
    let said: std::collections::BTreeSet<(i32, i32)> =
        thread_log(&log).iter().map(|x| (x.0, x.1)).collect();
    assert!(said.iter().all(|&(p, t)| p == ns_pid && tids.contains(&t)));

    let dest = Dest::start();
    let report = dest.migrate(pid, true).await.unwrap();
    let new = report.restored_pid;
    let ns = reaper_of(new);
    let reaper = ns.0;
    wait_until("the source to be gone", || gone(pid));

    // Its own pid and every tid again, in a namespace of its own whose
    // pid 1 is the reaper.
    assert_eq!(inner(new, "NSpid:"), ns_pid, "the pid in its namespace");
    assert_eq!(inner_tids(new), tids, "every thread's tid");
    assert_ne!(pid_ns(new), source_ns, "a new pid namespace");
    assert_eq!(
        pid_ns(new),
        format!("pid:[{}]", report.restored_ns.1),
        "the namespace the page server reported"
    );
    assert_eq!(
        report.restored_ns.0, ns_pid,
        "the pid the page server reported"
    );
    assert_eq!(inner(reaper, "NSpid:"), 1, "the reaper is pid 1");
    assert_eq!(pid_ns(reaper), pid_ns(new));
    assert_eq!(proc_field(reaper, "Name:").as_deref(), Some("ferry-init"));

    // python goes on, and what it says about itself is unchanged: every
    // thread counts on from where it was, with the same ids.
    let before = thread_log(&log).len();
    wait_until("the restored threads to log on", || {
        thread_log(&log).len() > before + 30
    });
    let after = thread_log(&log);
    let mut last: std::collections::HashMap<i32, u64> = std::collections::HashMap::new();
    for &(p, t, n) in &after {
        assert!(
            said.contains(&(p, t)),
            "line ({p}, {t}, {n}): ids python did not have before"
        );
        if let Some(prev) = last.insert(t, n) {
            assert_eq!(n, prev + 1, "thread {t} counts on without a gap");
        }
    }

    // The namespace lives on its pid 1: killing it ends the process.
    kill(Pid::from_raw(reaper), Signal::SIGKILL).unwrap();
    wait_until("the namespace to end", || gone(new));
    dest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keep_pids_the_process_lands_in_the_page_servers_namespace() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("threads");
    let src = python_tree(THREADS, &log);
    let pid = src.0;
    wait_until("the threads to log", || thread_log(&log).len() > 10);
    let dest = Dest::start();
    let report = dest.migrate(pid, false).await.unwrap();
    let new = report.restored_pid;
    let _new = KillOnDrop(new);
    assert_eq!(report.restored_ns, (0, 0), "no namespace reported");
    assert_ne!(new, pid, "a new pid");
    assert_eq!(pid_ns(new), pid_ns(std::process::id() as i32));
    assert_eq!(ns_ids(&format!("/proc/{new}/status"), "NSpid:").len(), 1);
    let before = thread_log(&log).len();
    wait_until("the restored threads to log on", || {
        thread_log(&log).len() > before + 10
    });
    dest.stop().await;
}

/// A parent and two children, each logging a count to its own file in
/// `argv[1]`; `a` leads a session of its own, `b` a process group of its
/// own in the parent's session. Writes `pid_a pid_b` (as the tree sees
/// them) to `argv[1]/info`.
const FAMILY: &str = r#"
import os, sys, time
d = sys.argv[1]
def run(name):
    log = open(os.path.join(d, name), 'a', buffering=1)
    n = 0
    while True:
        n += 1
        log.write('%d %d %d %d %d\n' % (n, os.getpid(), os.getppid(), os.getsid(0), os.getpgid(0)))
        time.sleep(0.02)
kids = []
for name in ('a', 'b'):
    pid = os.fork()
    if pid == 0:
        if name == 'a':
            os.setsid()
        else:
            os.setpgid(0, 0)
        run(name)
    kids.append(pid)
with open(os.path.join(d, 'info.tmp'), 'w') as f:
    f.write('%d %d\n' % (kids[0], kids[1]))
os.rename(os.path.join(d, 'info.tmp'), os.path.join(d, 'info'))
run('root')
"#;

/// (pid, ppid, sid, pgid) as a process of the tree sees them: its own
/// namespace's ids.
fn own_view(pid: i32, parent_ns_pid: i32) -> (i32, i32, i32, i32) {
    (
        inner(pid, "NSpid:"),
        parent_ns_pid,
        inner(pid, "NSsid:"),
        inner(pid, "NSpgid:"),
    )
}

/// The last line of a `FAMILY` log: (n, pid, ppid, sid, pgid).
fn last_line(path: &std::path::Path) -> Option<[i64; 5]> {
    let text = std::fs::read_to_string(path).ok()?;
    let l = text.lines().last()?;
    let v: Vec<i64> = l
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    v.try_into().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_keeps_its_pids_parents_sessions_and_groups() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let src = python_tree(FAMILY, dir.path());
    let root = src.0;
    let info = dir.path().join("info");
    wait_until("the children", || info.exists());
    let logs = ["root", "a", "b"].map(|n| dir.path().join(n));
    for l in &logs {
        wait_until("every log to start", || {
            last_line(l).is_some_and(|v| v[0] >= 3)
        });
    }
    let shape = tree::discover(root).unwrap();
    assert_eq!(shape.len(), 3);
    let root_ns = inner(root, "NSpid:");
    let mut before: Vec<(i32, i32, i32, i32)> = shape[1..]
        .iter()
        .map(|s| own_view(s.pid, root_ns))
        .collect();
    before.sort();
    // What the children say of themselves matches /proc.
    for l in &logs[1..] {
        let v = last_line(l).unwrap();
        let mine = (v[1] as i32, v[2] as i32, v[3] as i32, v[4] as i32);
        assert!(before.contains(&mine), "{mine:?} in {before:?}");
    }

    let dest = Dest::start();
    let report = dest.migrate(root, true).await.unwrap();
    let new = report.restored_pid;
    let ns = reaper_of(new);
    let reaper = ns.0;
    for s in &shape {
        wait_until("the source to be gone", || gone(s.pid));
    }
    assert_eq!(inner(reaper, "NSpid:"), 1, "ferry's reaper is pid 1");

    let restored = tree::discover(new).unwrap();
    assert_eq!(restored.len(), 3, "{restored:?}");
    assert_eq!(inner(new, "NSpid:"), root_ns, "the root's pid");
    // The root leads a session and group of its own (as any restored
    // root), under its own pid.
    assert_eq!(
        (inner(new, "NSsid:"), inner(new, "NSpgid:")),
        (root_ns, root_ns)
    );
    let mut after: Vec<(i32, i32, i32, i32)> = restored[1..]
        .iter()
        .map(|s| {
            assert_eq!(s.ppid, new, "a child of the restored root");
            own_view(s.pid, inner(s.ppid, "NSpid:"))
        })
        .collect();
    after.sort();
    // The children's sessions and groups are their own or the root's,
    // which kept its pid: the same tuples.
    let expect: Vec<(i32, i32, i32, i32)> = before
        .iter()
        .map(|&(p, pp, sid, pgid)| {
            let fix = |x: i32| if x == p { x } else { root_ns };
            (p, pp, fix(sid), fix(pgid))
        })
        .collect();
    assert_eq!(after, expect, "pid, ppid, sid, pgid of each child");
    // And what they say of themselves: each goes on counting with the
    // same ids.
    for l in &logs[1..] {
        let n = last_line(l).unwrap()[0];
        wait_until("the restored tree to log on", || {
            last_line(l).is_some_and(|v| v[0] > n + 5)
        });
        let v = last_line(l).unwrap();
        let mine = (v[1] as i32, v[2] as i32, v[3] as i32, v[4] as i32);
        assert!(after.contains(&mine), "{mine:?} in {after:?}");
    }
    dest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_across_two_pid_namespaces_is_refused_before_the_freeze() {
    need_root!();
    if Command::new("unshare").arg("--help").output().is_err() {
        eprintln!("skipped: no unshare");
        return;
    }
    // sh, its child unshare, and unshare's child in a pid namespace of
    // its own.
    let src =
        start_tree(Command::new("/bin/sh").args(["-c", "unshare --pid --fork sleep 1000 & wait"]));
    let root = src.0;
    wait_until("the nested process", || {
        tree::discover(root).is_ok_and(|t| t.len() == 3)
    });
    let nested = tree::discover(root).unwrap()[2].pid;
    let dest = Dest::start();
    let e = dest.migrate(root, true).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("process {nested} (sleep)")) && e.contains("nested pid namespaces"),
        "{e}"
    );
    // Never frozen: every process runs on, untraced.
    for s in tree::discover(root).unwrap() {
        assert_eq!(proc_field(s.pid, "TracerPid:").as_deref(), Some("0"));
        assert!(!matches!(proc_state(s.pid), 't' | 'T'), "{}", s.pid);
    }
    dest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespaces_pid_1_is_restored_as_pid_1_of_the_new_one() {
    need_root!();
    if Command::new("unshare").arg("--help").output().is_err() {
        eprintln!("skipped: no unshare");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("threads");
    let src = start_tree(
        Command::new("unshare")
            .args(["--pid", "--fork", python(), "-c", THREADS])
            .arg(&log),
    );
    let outer = src.0;
    wait_until("python to log", || thread_log(&log).len() > 30);
    let pid = tree::discover(outer).unwrap()[1].pid;
    assert_eq!(inner(pid, "NSpid:"), 1, "python is its namespace's pid 1");
    let tids = inner_tids(pid);

    let dest = Dest::start();
    let report = dest.migrate(pid, true).await.unwrap();
    let new = report.restored_pid;
    let _ns = KillOnDrop(new);
    assert_eq!(inner(new, "NSpid:"), 1, "pid 1 again, no reaper above it");
    assert_eq!(inner_tids(new), tids, "every thread's tid");
    assert_ne!(pid_ns(new), pid_ns(std::process::id() as i32));
    let before = thread_log(&log).len();
    wait_until("the restored threads to log on", || {
        thread_log(&log).len() > before + 30
    });
    assert!(thread_log(&log)
        .iter()
        .all(|&(p, t, _)| p == 1 && tids.contains(&t)));
    dest.stop().await;
}

/// Processes other than `except` whose command line mentions `needle`.
fn copies_of(needle: &str, except: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != except)
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_failing_in_the_new_namespace_loses_nothing() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("threads-failing");
    let src = python_tree(THREADS, &log);
    let pid = src.0;
    wait_until("the threads to log", || thread_log(&log).len() > 10);

    // A real page server whose restore fails once the threads are made.
    let tls = certs();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = common::ServerProcess(
        common::page_server_command(tls.path(), port)
            .args(["--restore", "--log", "warn"])
            .env(ferry::failpoint::VAR, "restore:threads")
            .spawn()
            .unwrap(),
    );
    common::wait_for_server(addr.parse().unwrap(), tls.path()).await;
    let out = common::migrate_command(pid, &addr, tls.path())
        .args(["--keep-pids", "--log", "warn"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("restore stage threads"), "{stderr}");
    // The source runs on, untraced; nothing of the half-made namespace is
    // left (its pid 1 killed, and everything in it with it).
    wait_until("the source to be let go", || {
        proc_field(pid, "TracerPid:").as_deref() == Some("0")
            && !matches!(proc_state(pid), 't' | 'T')
    });
    let before = thread_log(&log).len();
    wait_until("the source to log on", || {
        thread_log(&log).len() > before + 10
    });
    let needle = log.to_str().unwrap();
    wait_until("no copy of the source to be left", || {
        copies_of(needle, pid).iter().all(|&p| gone(p))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_keeps_its_pid_and_its_parents_wait_returns_it() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let src = python_tree(ZOMBIE_PARENT, dir.path());
    let parent = src.0;
    let info = dir.path().join("info");
    wait_until("the child", || info.exists());
    // As the parent saw it: its own namespace's pid.
    let zombie: i32 = std::fs::read_to_string(&info).unwrap().parse().unwrap();
    let outer = tree::discover(parent).unwrap()[1].pid;
    wait_until("the zombie", || proc_state(outer) == 'Z');

    let dest = Dest::start();
    let report = dest.migrate(parent, true).await.unwrap();
    let new = report.restored_pid;
    let _ns = reaper_of(new);
    let shape = tree::discover(new).unwrap();
    assert_eq!(shape.len(), 2, "{shape:?}");
    assert_eq!(shape[1].state, 'Z');
    assert_eq!(inner(shape[1].pid, "NSpid:"), zombie, "the zombie's pid");

    std::fs::write(dir.path().join("reap"), b"").unwrap();
    let reaped = dir.path().join("reaped");
    wait_until("the restored parent to reap its zombie", || reaped.exists());
    assert_eq!(
        std::fs::read_to_string(&reaped).unwrap(),
        format!("{zombie} 3"),
        "wait() returns the pid the parent had from fork(), and the status"
    );
    dest.stop().await;
}

/// A shell pipeline's shape: the parent writes a count into a pipe every
/// 10 ms, its child reads the pipe and logs each line to `argv[1]`.
const PIPELINE: &str = r#"
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.close(w)
    log = open(sys.argv[1], 'a', buffering=1)
    for line in os.fdopen(r):
        log.write(line)
    os._exit(0)
os.close(r)
n = 0
while True:
    n += 1
    os.write(w, b'%d\n' % n)
    time.sleep(0.01)
"#;

fn counts(log: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_keeps_its_pids_and_every_byte_in_its_pipe() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("pipe");
    let src = python_tree(PIPELINE, &log);
    wait_until("the reader to log", || counts(&log).len() > 10);
    let pids: Vec<i32> = tree::discover(src.0)
        .unwrap()
        .iter()
        .map(|p| inner(p.pid, "NSpid:"))
        .collect();
    assert_eq!(pids.len(), 2, "writer and reader");

    let dest = Dest::start();
    let report = dest.migrate(src.0, true).await.unwrap();
    let new = report.restored_pid;
    let _ns = reaper_of(new);
    wait_until("the source to be gone", || gone(src.0));
    let after: Vec<i32> = tree::discover(new)
        .unwrap()
        .iter()
        .map(|p| inner(p.pid, "NSpid:"))
        .collect();
    assert_eq!(after, pids, "both keep their pids");
    let before = counts(&log).len();
    wait_until("the restored pipeline to go on", || {
        counts(&log).len() > before + 30
    });
    // Every count once, in order: the pipe lost nothing, repeated nothing.
    let c = counts(&log);
    for w in c.windows(2) {
        assert_eq!(w[1], w[0] + 1, "the pipe's bytes around the move");
    }
    dest.stop().await;
}
