//! Process trees on the source, end to end on real processes: `ferry dump`
//! of a parent and its children (one born during the rounds) keeps every
//! process's pages apart in one image, each equal to that process's memory
//! at the freeze; the state lists the tree root first with its ppid, pgid
//! and sid; what cannot be migrated yet (restoring a tree, a zombie) is
//! refused by name before anything is frozen and the processes run on.
//! These tests need root (ptrace; CI runs as root).

use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry::dump::{dump_frozen, Destination, DumpError, DumpOptions, RoundReport};
use ferry::policy::Policy;
use ferry::procfs;
use ferry::tree::{self, TreeError};
use ferry_page_server::store::mem::MemStore;
use ferry_page_server::store::{disk::DiskStore, Page, Store};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{
    assert_image_holds_memory, certs, connect, fixed_rounds, free_port, gone, is_root, proc_field,
    proc_state, python, python_tree, start_tree, KillTree, ZOMBIE_PARENT,
};

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace, /proc/PID/mem of another process)");
            return;
        }
    };
}

/// A parent that maps 16 KiB private before forking two children; each
/// process fills it with its own byte (parent 0x10, children 0x11, 0x12),
/// so the same address holds different pages in each. SIGUSR1 makes the
/// parent fork one more child (0x20); SIGUSR2 makes a child exit with
/// status 7 (the parent never reaps it). Prints `addr kid kid`.
const TREE: &str = r#"
import ctypes, mmap, os, signal, sys, time
buf = mmap.mmap(-1, 16384, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
def child(b):
    if os.fork() == 0:
        buf[:] = bytes([b]) * 16384
        while True:
            time.sleep(1)
kids = []
for b in (0x11, 0x12):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGUSR2, lambda *a: os._exit(7))
        buf[:] = bytes([b]) * 16384
        while True:
            time.sleep(1)
    kids.append(pid)
buf[:] = bytes([0x10]) * 16384
signal.signal(signal.SIGUSR1, lambda *a: child(0x20))
print(addr, *kids, flush=True)
while True:
    time.sleep(1)
"#;

/// A python3 process tree that printed its first line, every process of
/// it killed when dropped.
struct Tree {
    procs: KillTree,
    line: String,
}

impl Tree {
    fn start(script: &str) -> Tree {
        let mut child = Command::new(python())
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Tree {
            procs: KillTree(child.id() as i32, Some(child)),
            line,
        }
    }

    fn pid(&self) -> i32 {
        self.procs.0
    }

    fn words(&self) -> Vec<u64> {
        self.line
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect()
    }
}

fn options(pid: i32, dest: Destination) -> DumpOptions {
    DumpOptions {
        policy: fixed_rounds(2),
        ..DumpOptions::new(pid, dest)
    }
}

fn read_page(pid: i32, addr: u64) -> Vec<u8> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut page = vec![0u8; 4096];
    mem.read_exact_at(&mut page, addr).unwrap();
    page
}

fn wait_until(what: &str, f: impl FnMut() -> bool) {
    common::wait_until(what, Duration::from_secs(5), f)
}

fn not_held(pid: i32) -> bool {
    proc_field(pid, "TracerPid:").as_deref() == Some("0") && !matches!(proc_state(pid), 't' | 'T')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_of_a_tree_keeps_every_address_space_apart() {
    need_root!();
    let t = Tree::start(TREE);
    let w = t.words();
    let (addr, kids) = (w[0], [w[1] as i32, w[2] as i32]);
    let root = t.pid();
    for (pid, b) in [(root, 0x10u8), (kids[0], 0x11), (kids[1], 0x12)] {
        wait_until("the children to fill their buffers", || {
            read_page(pid, addr)[0] == b
        });
    }
    let dir = tempfile::tempdir().unwrap();
    // After the first round the parent forks once more: the newcomer is
    // found at the freeze and sent whole in the final round. And a child
    // exits: a zombie at the freeze, recorded with its status.
    let mut born = None;
    let mut progress = |r: &RoundReport| {
        eprintln!(
            "round {} frozen={} pages={}",
            r.round, r.frozen, r.stats.pages
        );
        if r.round == 0 {
            kill(Pid::from_raw(kids[1]), Signal::SIGUSR2).unwrap();
            wait_until("a zombie", || proc_state(kids[1]) == 'Z');
            kill(Pid::from_raw(root), Signal::SIGUSR1).unwrap();
            wait_until("a third child", || {
                let t = tree::discover(root).unwrap();
                born = t
                    .iter()
                    .map(|s| s.pid)
                    .find(|p| *p != root && !kids.contains(p));
                born.is_some_and(|p| read_page(p, addr)[0] == 0x20)
            });
        }
    };
    let (report, frozen) = dump_frozen(
        options(root, Destination::ImagesDir(dir.path().into())),
        &mut progress,
    )
    .await
    .unwrap();
    let born = born.unwrap();
    let mut pids = frozen.pids();
    pids.sort();
    let mut want = vec![root, kids[0], born];
    want.sort();
    assert_eq!(pids, want, "every live process of the tree is held");

    let store = DiskStore::open(dir.path()).unwrap();
    let session = store.open(report.session).unwrap();
    let state = session.state().unwrap().unwrap();
    let img = session.flatten().unwrap();
    let (dead, procs): (Vec<_>, Vec<_>) = state.processes.iter().partition(|p| p.zombie);
    assert_eq!(dead.len(), 1, "the zombie is in the image");
    assert_eq!(
        (dead[0].pid, dead[0].ppid, dead[0].exit_status),
        (kids[1], root, 7 << 8)
    );
    assert_eq!(procs.len(), 3);
    assert_eq!(procs[0].pid, root, "the root first");
    assert_eq!(procs[0].space, 0, "the root's addresses are untagged");
    let mut spaces: Vec<u32> = procs.iter().map(|p| p.space).collect();
    spaces.sort();
    spaces.dedup();
    assert_eq!(spaces.len(), 3, "one space per live process");
    for p in &procs {
        let stat = procfs::read_stat_fields(p.pid).unwrap();
        assert_eq!(
            (p.ppid, p.pgid, p.sid),
            (stat.ppid, stat.pgrp, stat.session),
            "ppid, pgid and sid of {}",
            p.pid
        );
        if p.pid != root {
            assert_eq!(p.ppid, root);
        }
        let want = match p.pid {
            pid if pid == root => 0x10,
            pid if pid == kids[0] => 0x11,
            _ => 0x20,
        };
        for off in [0u64, 4096, 8192, 12288] {
            match img.page(tree::tag(p.space, addr + off)) {
                Some(Page::Data(d)) => assert!(
                    d.iter().all(|&b| b == want),
                    "process {} page {:#x}",
                    p.pid,
                    addr + off
                ),
                other => panic!("process {} page {:#x}: {other:?}", p.pid, addr + off),
            }
        }
        let checked = assert_image_holds_memory(p.pid, p.space, &img);
        assert!(checked > 100, "checked {checked} pages of {}", p.pid);
    }
    // Its processes write to a pipe read by this test, outside the tree:
    // the restore refuses that by name.
    let e = ferry::restore::restore_from_images_dir(dir.path(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("whose other end is outside the process tree"),
        "{e}"
    );

    frozen.resume().unwrap();
    for pid in want {
        wait_until("the tree to run on, untraced", || not_held(pid));
    }
}

/// The processes of [`TREE`] write to a pipe whose reader is this test,
/// outside the tree: refused by name, nothing frozen, everyone runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_tree_restore_cannot_make_is_refused_before_anything_is_frozen() {
    need_root!();
    let t = Tree::start(TREE);
    let w = t.words();
    let tls = certs();
    let port = free_port();
    let dest = Destination::Remote(connect(
        format!("127.0.0.1:{port}").parse().unwrap(),
        tls.path(),
    ));
    let e = ferry::migrate::migrate(options(t.pid(), dest), &mut |_| {})
        .await
        .map(|_| ())
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, ferry::migrate::MigrateError::Unsupported { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("whose other end is outside the process tree")
            && msg.contains(&format!("process {}", t.pid()))
            && msg.contains("nothing was frozen"),
        "{msg}"
    );
    for pid in [t.pid(), w[1] as i32, w[2] as i32] {
        assert!(not_held(pid), "process {pid} runs on untraced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_killed_by_a_signal_is_refused_by_name() {
    need_root!();
    // The child kills itself with SIGKILL; the parent never reaps it.
    let t = Tree::start(
        "import os, signal, time\npid = os.fork()\nif pid == 0:\n    os.kill(os.getpid(), signal.SIGKILL)\nprint(pid, flush=True)\nwhile True:\n    time.sleep(1)\n",
    );
    let zombie = t.words()[0] as i32;
    wait_until("the zombie", || proc_state(zombie) == 'Z');
    let dir = tempfile::tempdir().unwrap();
    let e = dump_frozen(
        options(t.pid(), Destination::ImagesDir(dir.path().into())),
        &mut |_| {},
    )
    .await
    .map(|_| ())
    .unwrap_err();
    match &e {
        DumpError::Tree(TreeError::Zombie {
            pid, ppid, signal, ..
        }) => {
            assert_eq!((*pid, *ppid, *signal), (zombie, t.pid(), 9));
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains(&format!("process {zombie}")), "{e}");
    wait_until("the parent to run on", || not_held(t.pid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_child_migrates_and_its_parent_reaps_it() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let t = python_tree(ZOMBIE_PARENT, dir.path());
    let info = dir.path().join("info");
    wait_until("the child", || info.exists());
    let zombie: i32 = std::fs::read_to_string(&info).unwrap().parse().unwrap();
    wait_until("the zombie", || proc_state(zombie) == 'Z');

    let tls = certs();
    let (server, store) = restoring_server(tls.path());
    let (report, _restored) = migrate_tree(t.0, &server, tls.path(), None).await;
    let root = report.restored_pid;
    let state = store
        .open(report.dump.session)
        .unwrap()
        .state()
        .unwrap()
        .unwrap();
    let z: Vec<_> = state.processes.iter().filter(|p| p.zombie).collect();
    assert_eq!(z.len(), 1, "the image records the zombie");
    assert_eq!((z[0].pid, z[0].exit_status), (zombie, 3 << 8));
    wait_until("the source to be gone", || gone(t.0));
    let shape = tree::discover(root).unwrap();
    assert_eq!(shape.len(), 2, "{shape:?}");
    let z = &shape[1];
    assert_eq!((z.ppid, z.state), (root, 'Z'), "{z:?}");
    assert_eq!(tree::exit_status(z.pid).unwrap(), 3 << 8);

    std::fs::write(dir.path().join("reap"), b"").unwrap();
    let reaped = dir.path().join("reaped");
    wait_until("the restored parent to reap its zombie", || reaped.exists());
    let got = std::fs::read_to_string(&reaped).unwrap();
    assert_eq!(
        got,
        format!("{} 3", z.pid),
        "pid and exit code of the reaped child"
    );
    server.stop().await;
}

/// A parent and two children, each appending 1, 2, 3, … to its own log in
/// `argv[1]` every 20 ms and holding its own byte in a page mapped before
/// the forks (parent 0x10, `a` 0x11, `b` 0x12). `a` leads a session of its
/// own, `b` a process group of its own in the parent's session. Writes
/// `addr pid_a pid_b` to `argv[1]/info` once both are forked.
const FAMILY: &str = r#"
import ctypes, mmap, os, sys, time
d = sys.argv[1]
buf = mmap.mmap(-1, 16384, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
def run(name, b):
    buf[:] = bytes([b]) * 16384
    log = open(os.path.join(d, name), 'a', buffering=1)
    n = 0
    while True:
        n += 1
        log.write('%d\n' % n)
        time.sleep(0.02)
kids = []
for name, b in (('a', 0x11), ('b', 0x12)):
    pid = os.fork()
    if pid == 0:
        if name == 'a':
            os.setsid()
        else:
            os.setpgid(0, 0)
        run(name, b)
    kids.append(pid)
with open(os.path.join(d, 'info.tmp'), 'w') as f:
    f.write('%d %d %d\n' % (addr, kids[0], kids[1]))
os.rename(os.path.join(d, 'info.tmp'), os.path.join(d, 'info'))
run('root', 0x10)
"#;

fn logged(path: &std::path::Path) -> Vec<u64> {
    common::log_values(path)
}

/// A restoring page server in this process on a memory store, kept to
/// read the image.
fn restoring_server(tls: &std::path::Path) -> (common::Server, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    (common::Server::start_restoring(tls, store.clone()), store)
}

/// Migrates the tree under `pid` to `server` (in [`options`]' two rounds,
/// or at most `rounds` of the default policy); the report, and the
/// restored tree, killed when dropped.
async fn migrate_tree(
    pid: i32,
    server: &common::Server,
    tls: &std::path::Path,
    rounds: Option<u32>,
) -> (ferry::migrate::MigrateReport, KillTree) {
    let mut opts = options(pid, Destination::Remote(connect(server.addr, tls)));
    if let Some(max_rounds) = rounds {
        opts.policy = Policy {
            max_rounds,
            ..Policy::default()
        };
    }
    let report = ferry::migrate::migrate(opts, &mut |_| {}).await.unwrap();
    let root = report.restored_pid;
    (report, KillTree(root, None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_with_two_children_migrates_with_its_sessions_and_groups() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let t = python_tree(FAMILY, dir.path());
    let info = dir.path().join("info");
    wait_until("the children", || info.exists());
    let w: Vec<u64> = std::fs::read_to_string(&info)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let addr = w[0];
    let logs = ["root", "a", "b"].map(|n| dir.path().join(n));
    for l in &logs {
        wait_until("every log to start", || logged(l).len() >= 3);
    }

    let tls = certs();
    let (server, _) = restoring_server(tls.path());
    let (report, _restored) = migrate_tree(t.0, &server, tls.path(), Some(3)).await;
    let root = report.restored_pid;
    for pid in [t.0, w[1] as i32, w[2] as i32] {
        wait_until("the source to be gone", || gone(pid));
    }

    // The same shape: two children of the restored root, each with its
    // own page at the same address, its session and its group.
    let shape = tree::discover(root).unwrap();
    assert_eq!(shape.len(), 3, "{shape:?}");
    let stat = |pid| procfs::read_stat_fields(pid).unwrap();
    assert_eq!((stat(root).session, stat(root).pgrp), (root, root));
    assert_eq!(read_page(root, addr)[0], 0x10);
    let mut seen = Vec::new();
    for s in &shape[1..] {
        assert_eq!(s.ppid, root);
        let st = stat(s.pid);
        match read_page(s.pid, addr)[0] {
            0x11 => {
                assert_eq!((st.session, st.pgrp), (s.pid, s.pid), "a leads its session");
                seen.push('a');
            }
            0x12 => {
                assert_eq!((st.session, st.pgrp), (root, s.pid), "b leads its group");
                seen.push('b');
            }
            other => panic!("process {} holds {other:#x}", s.pid),
        }
    }
    seen.sort();
    assert_eq!(seen, ['a', 'b']);
    // Each goes on counting where it was: nothing repeated, nothing lost.
    for l in &logs {
        let before = logged(l).len();
        wait_until("the restored tree to log on", || {
            logged(l).len() > before + 5
        });
        let v = logged(l);
        let want: Vec<u64> = (1..=v.len() as u64).collect();
        assert_eq!(v, want, "{} counts on without a gap", l.display());
    }
    server.stop().await;
}

const PRODUCER: &str = "import time\ni = 0\nwhile True:\n    i += 1\n    print(i, flush=True)\n    time.sleep(0.001)\n";
/// Slower than the producer, so the pipes fill up.
const CONSUMER: &str = "import sys, time\nf = open(sys.argv[1], 'a', buffering=1)\nfor line in sys.stdin:\n    f.write(line)\n    time.sleep(0.002)\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_pipeline_migrates_with_its_bytes_in_flight() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let (prod, cons, out) = (
        dir.path().join("producer.py"),
        dir.path().join("consumer.py"),
        dir.path().join("out"),
    );
    std::fs::write(&prod, PRODUCER).unwrap();
    std::fs::write(&cons, CONSUMER).unwrap();
    let py = python();
    let line = format!(
        "{py} -u {} | grep --line-buffered -v x | {py} {} {}",
        prod.display(),
        cons.display(),
        out.display()
    );
    let t = start_tree(Command::new("/bin/sh").args(["-c", &line]));
    wait_until("the pipeline to deliver", || logged(&out).len() >= 300);
    let source: Vec<i32> = tree::discover(t.0).unwrap().iter().map(|s| s.pid).collect();
    assert_eq!(source.len(), 4, "sh and its three commands");

    let tls = certs();
    let (server, store) = restoring_server(tls.path());
    let (report, _restored) = migrate_tree(t.0, &server, tls.path(), Some(3)).await;
    let root = report.restored_pid;
    for &pid in &source {
        wait_until("the source to be gone", || gone(pid));
    }
    // Bytes were in flight: the image holds unread pipe contents.
    let state = store
        .open(report.dump.session)
        .unwrap()
        .state()
        .unwrap()
        .unwrap();
    let in_flight: usize = state
        .processes
        .iter()
        .flat_map(|p| &p.fds)
        .filter(|f| f.kind() == ferry_proto::pb::FdKind::Pipe)
        .map(|f| f.data.len())
        .sum();
    assert!(in_flight > 0, "no bytes in the pipes at the freeze");
    let shape = tree::discover(root).unwrap();
    assert_eq!(shape.len(), 4, "{shape:?}");
    for s in &shape[1..] {
        assert_eq!(s.ppid, root, "{s:?}");
    }

    // The output goes on: nothing lost, nothing repeated.
    let before = logged(&out).len();
    wait_until("the restored pipeline to deliver", || {
        logged(&out).len() > before + 300
    });
    let v = logged(&out);
    let want: Vec<u64> = (1..=v.len() as u64).collect();
    if v != want {
        let bad = v.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "the sequence breaks at line {bad:?} of {} ({in_flight} bytes were in flight)",
            v.len()
        );
    }
    eprintln!(
        "{} lines, {in_flight} bytes in flight at the freeze",
        v.len()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eventfd_shared_by_parent_and_child_is_refused_by_name() {
    need_root!();
    // One eventfd, inherited by the child: restored apart, the two would
    // count apart.
    let script = "import os, sys, time\nfd = os.eventfd(5)\nos.set_inheritable(fd, True)\npid = os.fork()\nif pid == 0:\n    while True:\n        time.sleep(1)\nwith open(sys.argv[1] + '.tmp', 'w') as f:\n    f.write('%d %d' % (pid, fd))\nos.rename(sys.argv[1] + '.tmp', sys.argv[1])\nwhile True:\n    time.sleep(1)\n";
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("info");
    let t = python_tree(script, &info);
    wait_until("the child", || info.exists());
    let w: Vec<i32> = std::fs::read_to_string(&info)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let tls = certs();
    let dest = Destination::Remote(connect(
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        tls.path(),
    ));
    let e = ferry::migrate::migrate(options(t.0, dest), &mut |_| {})
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "fd {} of process {} (python3): anon_inode:[eventfd], the same open file as fd {} of process {}",
            w[1],
            w[0],
            w[1],
            t.0
        )) && e.contains("nothing was frozen"),
        "{e}"
    );
    for pid in [t.0, w[0]] {
        assert!(not_held(pid), "process {pid} runs on untraced");
    }
}
