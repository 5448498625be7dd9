//! Memory and FIFOs shared between the processes of a tree, end to end:
//! a parent and two children share a `MAP_SHARED` anonymous region and a
//! sealed memfd (mapped, and open in all three), and a FIFO carries
//! numbered records from one child to the other. After `ferry migrate`
//! every process sees the others' writes through both objects, the region
//! still matches what each process wrote (each keeps a private mirror of
//! its part), the memfd keeps its contents, offset and seals, the image
//! holds each shared page once, and the FIFO's records go on without a gap
//! or a repeat. These tests need root (ptrace; CI runs as root).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry::dump::{Destination, DumpOptions};
use ferry::policy::Policy;
use ferry::procfs;
use ferry::tree;
use ferry_page_server::store::mem::MemStore;
use ferry_page_server::store::Store;
use ferry_proto::pb;

mod common;
use common::{certs, connect, gone, is_root, only_stdio, proc_state, python, KillTree};

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace, /proc/PID/mem of another process)");
            return;
        }
    };
}

/// Process `i` (0 the parent, 1 and 2 its children) counts in its own
/// 64 pages of a shared anonymous region (one page per step, round robin)
/// and in a private mirror of them, and checks the two agree; publishes
/// its count in the region's last page and in the memfd; and logs every
/// 20 steps `count seen0 seen1 seen2 mem0 mem1 mem2` (the counts it reads
/// through the region and through the memfd). Child 1 writes 8-byte
/// records numbered from 1 into the FIFO, 20 every 10 ms (skipping when it
/// is full); child 2 reads one per step and logs each, so bytes wait in the
/// FIFO. A mismatch or a record out of order is logged as BAD.
const SHARED: &str = r#"
import fcntl, mmap, os, struct, sys, time
d = sys.argv[1]
PS = 4096
shm = mmap.mmap(-1, 256 * PS)
mfd = os.memfd_create("ferry shared", os.MFD_ALLOW_SEALING)
os.ftruncate(mfd, 16 * PS)
os.write(mfd, b"memfd-head")
fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
mm = mmap.mmap(mfd, 16 * PS)
ro = os.memfd_create("ferry sealed", os.MFD_ALLOW_SEALING)
os.write(ro, b"sealed" * 100)
os.ftruncate(ro, PS)
fcntl.fcntl(ro, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
rm = mmap.mmap(ro, PS, prot=mmap.PROT_READ)
fifo = os.path.join(d, "fifo")
os.mkfifo(fifo)
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(shm))
maddr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
import re
raddr = [int(l.split("-")[0], 16) for l in open("/proc/self/maps") if "ferry sealed" in l][0]

def run(i):
    log = open(os.path.join(d, "log%d" % i), "a", buffering=1)
    lo, hi = i * 64 * PS, (i + 1) * 64 * PS
    mine = bytearray(shm[lo:hi])
    c = 0
    fw = fr = None
    if i == 1:
        fw = os.open(fifo, os.O_WRONLY)
        os.set_blocking(fw, False)
        seq = 0
        flog = None
    if i == 2:
        fr = os.open(fifo, os.O_RDONLY)
        flog = open(os.path.join(d, "fifo.log"), "a", buffering=1)
        want = 1
    while True:
        c += 1
        off = lo + (c % 64) * PS
        rec = struct.pack("<Q", c) * 4
        shm[off:off + 32] = rec
        mine[off - lo:off - lo + 32] = rec
        shm[255 * PS + 8 * i:255 * PS + 8 * i + 8] = struct.pack("<Q", c)
        mm[64 + 8 * i:64 + 8 * i + 8] = struct.pack("<Q", c)
        if shm[lo:hi] != mine:
            log.write("BAD region of %d differs from its mirror at step %d\n" % (i, c))
        if fw is not None and c % 10 == 0:
            for _ in range(20):
                try:
                    os.write(fw, b"%07d\n" % (seq + 1))
                    seq += 1
                except BlockingIOError:
                    break
        if fr is not None:
            r = os.read(fr, 8)
            n = int(r)
            if len(r) != 8 or n != want:
                flog.write("BAD %r after %d\n" % (r, want - 1))
            else:
                flog.write("%d\n" % n)
            want = n + 1
        if c % 20 == 0:
            seen = [struct.unpack("<Q", shm[255 * PS + 8 * j:255 * PS + 8 * j + 8])[0] for j in range(3)]
            mem = [struct.unpack("<Q", mm[64 + 8 * j:64 + 8 * j + 8])[0] for j in range(3)]
            log.write(" ".join(str(x) for x in [c] + seen + mem) + "\n")
        time.sleep(0.001)

# A page only an exited child ever touched: in no page table at the dump.
pid = os.fork()
if pid == 0:
    shm[220 * PS:220 * PS + 16] = b"from-a-dead-kid!"
    os._exit(0)
os.waitpid(pid, 0)
kids = []
for i in (1, 2):
    pid = os.fork()
    if pid == 0:
        run(i)
    kids.append(pid)
with open(os.path.join(d, "info.tmp"), "w") as f:
    f.write("%d %d %d %d %d %d %d\n" % (addr, maddr, mfd, kids[0], kids[1], raddr, ro))
os.rename(os.path.join(d, "info.tmp"), os.path.join(d, "info"))
run(0)
"#;

/// The tree of [`SHARED`] in `dir`, its stderr in `dir/stderr`.
fn start_shared(dir: &Path) -> KillTree {
    let mut cmd = Command::new(python());
    cmd.args(["-c", SHARED])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
    let child = only_stdio(&mut cmd).spawn().unwrap();
    KillTree(child.id() as i32, Some(child))
}

/// Waits up to 15 s for `f`; a timeout shows the tree's `stderr`.
fn wait_showing(stderr: &Path, what: &str, f: &mut dyn FnMut() -> bool) {
    for _ in 0..1500 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "timed out waiting for {what}; the tree's stderr: {}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
}

/// A python3 `script` that prints one line once it is set up: the tree,
/// and that line.
fn start_printing(script: &str) -> (KillTree, String) {
    use std::io::BufRead;
    let mut cmd = Command::new(python());
    cmd.args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = only_stdio(&mut cmd).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (KillTree(child.id() as i32, Some(child)), line)
}

/// The lines of a log, each as its numbers; BAD lines fail the test.
fn lines(path: &std::path::Path) -> Vec<Vec<u64>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for l in text.lines() {
        assert!(!l.starts_with("BAD"), "{}: {l}", path.display());
        // The last line may be cut short mid-write.
        if let Ok(v) = l
            .split_whitespace()
            .map(|w| w.parse::<u64>())
            .collect::<Result<Vec<_>, _>>()
        {
            if !v.is_empty() {
                out.push(v);
            }
        }
    }
    out
}

/// The maps entry of `pid` starting at `addr`.
fn map_at(pid: i32, addr: u64) -> procfs::MapEntry {
    procfs::read_maps(pid)
        .unwrap()
        .into_iter()
        .find(|m| m.start == addr)
        .unwrap_or_else(|| panic!("process {pid} maps nothing at {addr:#x}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_memfd_and_fifo_of_a_tree_migrate_as_one() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let t = start_shared(dir.path());
    let src = t.0;
    let info = dir.path().join("info");
    let stderr = dir.path().join("stderr");
    let wait_until = |what: &str, f: &mut dyn FnMut() -> bool| wait_showing(&stderr, what, f);
    wait_until("the children", &mut || info.exists());
    let w: Vec<u64> = std::fs::read_to_string(&info)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (addr, maddr, mfd) = (w[0], w[1], w[2] as i32);
    let logs: Vec<_> = (0..3).map(|i| dir.path().join(format!("log{i}"))).collect();
    let fifo_log = dir.path().join("fifo.log");
    for l in &logs {
        wait_until("every log to start", &mut || lines(l).len() >= 3);
    }
    wait_until("records through the FIFO", &mut || {
        lines(&fifo_log).len() >= 200
    });
    // Page 220 of the region is in the object but in no page table (the
    // others are 16 or more pages away: no read fault maps it around them).
    let present = |pid: i32, a: u64| {
        let pm = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
        let mut e = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&pm, &mut e, a / 4096 * 8).unwrap();
        u64::from_le_bytes(e) >> 63 == 1
    };
    for pid in [src, w[3] as i32, w[4] as i32] {
        assert!(!present(pid, addr + 220 * 4096), "page 220 mapped in {pid}");
    }

    let tls = certs();
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let server = common::Server::start_restoring(tls.path(), store.clone());
    let opts = DumpOptions {
        policy: Policy {
            max_rounds: 3,
            ..Policy::default()
        },
        ..DumpOptions::new(src, Destination::Remote(connect(server.addr, tls.path())))
    };
    let report = ferry::migrate::migrate(opts, &mut |_| {}).await.unwrap();
    let root = report.restored_pid;
    let _restored = KillTree(root, None);
    for pid in [src, w[3] as i32, w[4] as i32] {
        wait_until("the source to be gone", &mut || gone(pid));
    }
    let shape = tree::discover(root).unwrap();
    assert_eq!(shape.len(), 3, "{shape:?}");
    let pids: Vec<i32> = shape.iter().map(|s| s.pid).collect();

    // One object each, mapped by all three at the source's addresses.
    let region: Vec<procfs::MapEntry> = pids.iter().map(|&p| map_at(p, addr)).collect();
    let memfd: Vec<procfs::MapEntry> = pids.iter().map(|&p| map_at(p, maddr)).collect();
    for m in &region {
        assert_eq!(
            (m.len(), m.shared, m.inode),
            (256 * 4096, true, region[0].inode)
        );
        assert_eq!(m.path.as_deref(), Some("/dev/zero (deleted)"));
    }
    for (m, &p) in memfd.iter().zip(&pids) {
        assert_eq!((m.shared, m.inode), (true, memfd[0].inode));
        assert_eq!(m.path.as_deref(), Some("/memfd:ferry shared (deleted)"));
        let fd = std::fs::metadata(format!("/proc/{p}/fd/{mfd}")).unwrap();
        assert_eq!(fd.ino(), m.inode, "fd {mfd} of {p} is the mapped memfd");
        let pos = std::fs::read_to_string(format!("/proc/{p}/fdinfo/{mfd}")).unwrap();
        assert!(pos.starts_with("pos:\t10\n"), "{pos}");
    }
    assert_ne!(region[0].inode, memfd[0].inode);
    let f = std::fs::File::open(format!("/proc/{root}/fd/{mfd}")).unwrap();
    // SAFETY: F_GET_SEALS takes no argument and touches no memory.
    let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
    assert_eq!(seals, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
    let mut head = [0u8; 10];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
    assert_eq!(&head, b"memfd-head");
    assert_eq!(f.metadata().unwrap().len(), 16 * 4096);
    // A write-sealed memfd, mapped read-only by all three: one object,
    // every seal kept.
    let (raddr, ro) = (w[5], w[6] as i32);
    let sealed: Vec<procfs::MapEntry> = pids.iter().map(|&p| map_at(p, raddr)).collect();
    for m in &sealed {
        assert_eq!((m.shared, m.write, m.inode), (true, false, sealed[0].inode));
    }
    let f = std::fs::File::open(format!("/proc/{root}/fd/{ro}")).unwrap();
    assert_eq!(f.metadata().unwrap().ino(), sealed[0].inode);
    // SAFETY: F_GET_SEALS takes no argument and touches no memory.
    let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
    assert_eq!(
        seals,
        libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
    );
    let mut head = [0u8; 12];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
    assert_eq!(&head, b"sealedsealed");

    // The page the exited child wrote came along.
    let mem = std::fs::File::open(format!("/proc/{root}/mem")).unwrap();
    let mut b = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut b, addr + 220 * 4096).unwrap();
    assert_eq!(&b, b"from-a-dead-kid!");

    // The image holds each shared page once: in the objects' slots, none
    // at a process's own address.
    let img = store.open(report.dump.session).unwrap().flatten().unwrap();
    let mut in_slots = 0;
    for r in &img.runs {
        let (space, a) = tree::untag(r.addr);
        if space == ferry::shmem::SHM_SPACE {
            in_slots += r.pages;
            continue;
        }
        for (lo, len) in [(addr, 256 * 4096), (maddr, 16 * 4096)] {
            assert!(
                a + r.pages * 4096 <= lo || a >= lo + len,
                "space {space} carries shared pages at {a:#x}"
            );
        }
    }
    assert!(in_slots >= 193, "{in_slots} pages in the slots");
    let state = store
        .open(report.dump.session)
        .unwrap()
        .state()
        .unwrap()
        .unwrap();
    let in_fifo: usize = state
        .processes
        .iter()
        .flat_map(|p| &p.fds)
        .filter(|f| f.kind() == pb::FdKind::Fifo)
        .map(|f| f.data.len())
        .max()
        .unwrap_or(0);
    assert!(in_fifo > 0, "no bytes waited in the FIFO at the freeze");

    // Writes after the migration are seen by the others, through both the
    // region and the memfd: each process's count, once it has logged it
    // after the restore, is soon exceeded in every other process's view.
    let pos: BTreeMap<usize, usize> = (0..3).map(|i| (i, lines(&logs[i]).len())).collect();
    for j in 0..3 {
        wait_until("a count logged after the restore", &mut || {
            lines(&logs[j]).len() > pos[&j] + 2
        });
        let x = lines(&logs[j]).last().unwrap()[0];
        for i in (0..3).filter(|&i| i != j) {
            wait_until("another process to see the new count", &mut || {
                lines(&logs[i])
                    .last()
                    .is_some_and(|l| l.len() == 7 && l[1 + j] > x && l[4 + j] > x)
            });
        }
    }
    // The FIFO goes on: every record once, in order (the reader logs BAD
    // otherwise, which `lines` fails on).
    let before = lines(&fifo_log).len();
    wait_until("records through the restored FIFO", &mut || {
        lines(&fifo_log).len() > before + 300
    });
    let v: Vec<u64> = lines(&fifo_log).into_iter().map(|l| l[0]).collect();
    let want: Vec<u64> = (1..=v.len() as u64).collect();
    assert_eq!(v, want, "FIFO records");
    for l in &logs {
        lines(l);
    }
    eprintln!(
        "{in_slots} shared pages sent once, {in_fifo} bytes in the FIFO at the freeze, rounds: {:?}",
        report
            .dump
            .rounds
            .iter()
            .map(|r| r.stats.pages)
            .collect::<Vec<_>>()
    );
    server.stop().await;
}

/// A parent fills 64 MiB of shared anonymous memory and forks a child
/// that keeps writing 16 of its pages; the parent writes nothing.
const BIG: &str = r#"
import mmap, os, sys, time
N = 16384
shm = mmap.mmap(-1, N * 4096)
shm[:] = bytes(range(256)) * (N * 16)
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(shm))
pid = os.fork()
if pid == 0:
    i = 0
    while True:
        i += 1
        shm[(i % 16) * 4096 * 7:(i % 16) * 4096 * 7 + 8] = i.to_bytes(8, "little")
        time.sleep(0.002)
print(addr, pid, flush=True)
while True:
    time.sleep(1)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_is_tracked_in_the_rounds_and_sent_once() {
    need_root!();
    use ferry_page_server::store::disk::DiskStore;
    use ferry_page_server::store::Page;
    let (t, line) = start_printing(BIG);
    let root = t.0;
    let w: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (addr, kid) = (w[0], w[1] as i32);
    let pages = 16384u64;
    let dir = tempfile::tempdir().unwrap();
    let opts = DumpOptions {
        leave_stopped: true,
        policy: common::fixed_rounds(4),
        ..DumpOptions::new(root, Destination::ImagesDir(dir.path().into()))
    };
    let (report, frozen) = ferry::dump::dump_frozen(opts, &mut |r| {
        eprintln!(
            "round {} frozen={} dirty={} sent={}",
            r.round, r.frozen, r.dirty_pages, r.stats.pages
        );
        // Time for the child to write during the rounds.
        std::thread::sleep(Duration::from_millis(100));
    })
    .await
    .unwrap();
    let sent: Vec<u64> = report.rounds.iter().map(|r| r.stats.pages).collect();
    // Round 0 carries the region once (not once per process); every later
    // round only what was written since (uffd-wp tracks shmem here), far
    // less than the region.
    assert!(
        sent[0] >= pages && sent[0] < 2 * pages,
        "round 0 sent {sent:?}"
    );
    for (i, &n) in sent.iter().enumerate().skip(1) {
        assert!(n < pages / 8, "round {i} sent {n} pages: {sent:?}");
    }
    // The slot holds the region as the frozen processes see it.
    let store = DiskStore::open(dir.path()).unwrap();
    let img = store.open(report.session).unwrap().flatten().unwrap();
    let slot = img
        .vmas
        .iter()
        .find(|v| v.name == ferry::shmem::SLOT_NAME)
        .expect("a slot for the region");
    assert_eq!(slot.end - slot.start, pages * 4096);
    let mem = std::fs::File::open(format!("/proc/{kid}/mem")).unwrap();
    let mut page = vec![0u8; 4096];
    for i in 0..pages {
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut page, addr + i * 4096).unwrap();
        match img.page(slot.start + i * 4096) {
            Some(Page::Data(d)) => assert!(d[..] == page[..], "page {i} of the region differs"),
            other => panic!("page {i} of the region: {other:?}"),
        }
    }
    drop(frozen);
}

/// Prints a line once its shared memory is set up, then sleeps: a System V
/// segment attached before a fork (removed at once, so it goes with the
/// processes), or a memfd mapped by a lone process.
const SYSV: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
sid = libc.shmget(0, 4096, 0o1600)
at = libc.shmat(sid, None, 0)
libc.shmctl(sid, 0, None)
ctypes.memset(at, 7, 4096)
pid = os.fork()
if pid == 0:
    while True:
        time.sleep(1)
print(at, pid, flush=True)
while True:
    time.sleep(1)
"#;
const LONE_MEMFD: &str = r#"
import mmap, os, time
fd = os.memfd_create("lone")
os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096)
m[:5] = b"hello"
os.close(fd)
print(0, 0, flush=True)
os.dup2(os.open("/dev/null", os.O_WRONLY), 1)
while True:
    time.sleep(1)
"#;

fn not_held(pid: i32) -> bool {
    common::proc_field(pid, "TracerPid:").as_deref() == Some("0")
        && !matches!(proc_state(pid), 't' | 'T')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_shared_memory_cannot_make_is_refused_by_name_before_the_freeze() {
    need_root!();
    for (script, want) in [
        (SYSV, "System V shared memory /SYSV00000000 (deleted)"),
        (
            LONE_MEMFD,
            "/memfd:lone (deleted): a memfd mapped by a lone process",
        ),
    ] {
        let (t, line) = start_printing(script);
        let root = t.0;
        let kid: i32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let tls = certs();
        let dest = Destination::Remote(connect(
            format!("127.0.0.1:{}", common::free_port())
                .parse()
                .unwrap(),
            tls.path(),
        ));
        let opts = DumpOptions::new(root, dest);
        let e = ferry::migrate::migrate(opts, &mut |_| {})
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && e.contains("nothing was frozen"), "{e}");
        if kid != 0 {
            assert!(e.contains(&format!("of process {root} (python3)")), "{e}");
        }
        for pid in [root, kid].into_iter().filter(|&p| p != 0) {
            assert!(not_held(pid), "process {pid} runs on untraced");
        }
    }
}

/// `ferry dump` to a directory and `ferry restore` from it take the same
/// path: the tree of [`SHARED`], dumped, killed, restored cold from the
/// images, shares its region, memfd and FIFO again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_dumped_to_a_directory_restores_its_shared_memory() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("stderr");
    let t = start_shared(dir.path());
    let src = t.0;
    let wait = |what: &str, f: &mut dyn FnMut() -> bool| wait_showing(&stderr, what, f);
    let info = dir.path().join("info");
    wait("the children", &mut || info.exists());
    let w: Vec<u64> = std::fs::read_to_string(&info)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let logs: Vec<_> = (0..3).map(|i| dir.path().join(format!("log{i}"))).collect();
    let fifo_log = dir.path().join("fifo.log");
    wait("records through the FIFO", &mut || {
        lines(&fifo_log).len() >= 100 && logs.iter().all(|l| lines(l).len() >= 3)
    });
    let opts = DumpOptions {
        leave_stopped: true,
        policy: Policy {
            max_rounds: 2,
            ..Policy::default()
        },
        ..DumpOptions::new(src, Destination::ImagesDir(images.path().into()))
    };
    let (_, frozen) = ferry::dump::dump_frozen(opts, &mut |_| {}).await.unwrap();
    // The source goes before the copy runs: the FIFO's path is one.
    frozen.kill().unwrap();
    for pid in [src, w[3] as i32, w[4] as i32] {
        wait("the source to be gone", &mut || gone(pid));
    }
    let root = ferry::restore::restore_from_images_dir(images.path(), None).unwrap();
    let _restored = KillTree(root, None);
    let pids: Vec<i32> = tree::discover(root)
        .unwrap()
        .iter()
        .map(|s| s.pid)
        .collect();
    assert_eq!(pids.len(), 3);
    let region: Vec<u64> = pids.iter().map(|&p| map_at(p, w[0]).inode).collect();
    assert!(region.iter().all(|&i| i == region[0]), "{region:?}");
    // Each count soon seen by the others, the FIFO going on without a gap.
    let pos: Vec<usize> = logs.iter().map(|l| lines(l).len()).collect();
    for j in 0..3 {
        wait("a count logged after the restore", &mut || {
            lines(&logs[j]).len() > pos[j] + 2
        });
        let x = lines(&logs[j]).last().unwrap()[0];
        for i in (0..3).filter(|&i| i != j) {
            wait("another process to see the new count", &mut || {
                lines(&logs[i])
                    .last()
                    .is_some_and(|l| l.len() == 7 && l[1 + j] > x && l[4 + j] > x)
            });
        }
    }
    let before = lines(&fifo_log).len();
    wait("records through the restored FIFO", &mut || {
        lines(&fifo_log).len() > before + 200
    });
    let v: Vec<u64> = lines(&fifo_log).into_iter().map(|l| l[0]).collect();
    assert_eq!(v, (1..=v.len() as u64).collect::<Vec<_>>(), "FIFO records");
}
