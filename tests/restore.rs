//! Restore on real processes: a live single-threaded `python3` that counts
//! into a file is frozen, imaged, restored as a new process, and must go on
//! counting from where it was frozen, outlive the original, and be nobody's
//! zombie child.
//!
//! Two ways to the image:
//! - built here, by hand, from `/proc` and ptrace (`ferry::sys::stub::Seized`
//!   for the registers): tests the restore engine without depending on the
//!   capture side;
//! - made by `ferry dump` into an images dir and restored with
//!   `restore_from_images_dir`: the real pipeline. Until the capture side
//!   fills the process state (registers, mm, files), `restore::check`
//!   refuses that image for a missing field and the test says so and stops.
//!
//! Needs root (ptrace, `PR_SET_MM_MAP`); skipped with a message otherwise.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry::procfs;
use ferry::restore::{self, RestoreError};
use ferry::sys::stub::{self, Seized};
use ferry::sys::vm;
use ferry_page_server::store::{FlatImage, FlatRun};
use ferry_proto::pb;

mod common;
use common::{is_root, only_stdio, python};

/// One restore at a time: the tests look at the whole process table.
static SERIAL: Mutex<()> = Mutex::new(());

const COUNTER: &str = "import time,sys\nn=0\np=sys.argv[1]\nwhile True:\n  n+=1\n  with open(p,'w') as f: f.write(str(n))\n  time.sleep(0.01)\n";

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace, PR_SET_MM_MAP)");
            return;
        }
    };
}

/// A process killed (and, if ours, reaped) on drop.
struct Proc {
    pid: i32,
    child: Option<Child>,
}

impl Proc {
    fn kill(&mut self) {
        // SAFETY: kill takes integers.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn counter(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The counter of a running writer: the file is empty for a moment after
/// each `open('w')`, so read until it holds a number.
fn read_counter(path: &Path) -> u64 {
    let mut n = 0;
    wait_until("a counter value", Duration::from_secs(5), || {
        counter(path).inspect(|&v| n = v).is_some()
    });
    n
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        sleep(Duration::from_millis(10));
    }
}

fn start_counter(file: &Path) -> Proc {
    let mut cmd = Command::new(python());
    cmd.args(["-c", COUNTER])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Only 0-2: fds leaked by the test harness (pipes) would be refused.
    let child = only_stdio(&mut cmd).spawn().expect("spawning python3");
    let p = Proc {
        pid: child.id() as i32,
        child: Some(child),
    };
    wait_until("the counter to reach 5", Duration::from_secs(10), || {
        counter(file).is_some_and(|n| n >= 5)
    });
    p
}

fn stat_field(pid: i32, n: usize) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    // Field 3 (state) is the first after the ')'.
    rest.split_whitespace().nth(n - 3).unwrap().parse().unwrap()
}

fn status(pid: i32) -> procfs::Status {
    procfs::read_status(pid).unwrap()
}

/// The image of a frozen single-threaded process, built from `/proc` and
/// ptrace: every readable page of every mapping but the vdso block (zero
/// pages as zero runs), registers, mm fields, files.
fn capture(pid: i32, frozen: &Seized) -> (pb::ProcessTree, FlatImage) {
    let ps = ferry::sys::page_size();
    let maps = procfs::read_maps(pid).unwrap();
    let mut vmas = Vec::new();
    let mut runs = Vec::new();
    for m in &maps {
        let mut v = m.to_vma();
        if let Some(f) = v.file.as_mut() {
            let md = fs::metadata(&f.path).unwrap();
            f.size = md.len();
            f.mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        }
        let special = m.is_special();
        vmas.push(v);
        if special || !m.read {
            continue;
        }
        let mut page = vec![0u8; ps as usize];
        let mut addr = m.start;
        while addr < m.end {
            // Page by page: a file mapping may reach past its file's end.
            if vm::read(pid, addr, &mut page).is_ok() {
                let zero = page.iter().all(|&b| b == 0);
                match runs.last_mut() {
                    Some(FlatRun {
                        addr: a,
                        pages,
                        data,
                    }) if *a + *pages * ps == addr && data.is_none() == zero => {
                        *pages += 1;
                        if let Some(d) = data {
                            let mut v = d.to_vec();
                            v.extend_from_slice(&page);
                            *data = Some(Bytes::from(v));
                        }
                    }
                    _ => runs.push(FlatRun {
                        addr,
                        pages: 1,
                        data: (!zero).then(|| Bytes::copy_from_slice(&page)),
                    }),
                }
            }
            addr += ps;
        }
    }
    let regs = frozen.regs().unwrap();
    let gp = stub::regs_from_bytes(&regs.gpregs).unwrap();
    let st = status(pid);
    let heap_end = maps
        .iter()
        .find(|m| m.path.as_deref() == Some("[heap]"))
        .map(|m| m.end);
    let start_brk = stat_field(pid, 47);
    let mm = pb::MmFields {
        start_code: stat_field(pid, 26),
        end_code: stat_field(pid, 27),
        start_stack: stat_field(pid, 28),
        start_data: stat_field(pid, 45),
        end_data: stat_field(pid, 46),
        start_brk,
        brk: heap_end.unwrap_or(start_brk),
        arg_start: stat_field(pid, 48),
        arg_end: stat_field(pid, 49),
        env_start: stat_field(pid, 50),
        env_end: stat_field(pid, 51),
        auxv: fs::read(format!("/proc/{pid}/auxv")).unwrap().into(),
        exe: fs::read_link(format!("/proc/{pid}/exe"))
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    };
    let fds = procfs::list_fds(pid)
        .unwrap()
        .into_iter()
        .map(|(fd, target)| {
            let info = procfs::read_fdinfo(pid, fd).unwrap();
            let kind = if target == "/dev/null" {
                pb::FdKind::DevNull
            } else if target.starts_with('/') && Path::new(&target).is_file() {
                pb::FdKind::Regular
            } else {
                pb::FdKind::Unsupported
            };
            pb::FileDesc {
                fd,
                kind: kind as i32,
                path: target.clone(),
                pos: info.pos,
                flags: info.flags,
                cloexec: info.flags & libc::O_CLOEXEC as u32 != 0,
                description: target,
                ..Default::default()
            }
        })
        .collect();
    // Ignored signals are all that /proc tells of the actions; handlers
    // would need an injected rt_sigaction (the capture side's job).
    let sigactions = (1..=64u32)
        .filter(|s| st.sig_ign & (1 << (s - 1)) != 0)
        .map(|signo| pb::SigAction {
            signo,
            handler: libc::SIG_IGN as u64,
            ..Default::default()
        })
        .collect();
    let thread = pb::Thread {
        tid: pid,
        gpregs: regs.gpregs.clone().into(),
        xstate: regs.xstate.clone().into(),
        fs_base: gp.fs_base,
        gs_base: gp.gs_base,
        sigmask: st.sig_blk,
        rseq: regs.rseq.map(|r| pb::Rseq {
            addr: r.addr,
            len: r.len,
            signature: r.signature,
            ..Default::default()
        }),
        ..Default::default()
    };
    let proc = pb::Process {
        pid,
        ppid: st.ppid,
        comm: fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim_end()
            .to_string(),
        cwd: fs::read_link(format!("/proc/{pid}/cwd"))
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        // Its credentials as /proc shows them (securebits: none, as in
        // this test).
        creds: Some(
            ferry::creds::Creds::from_proc(ferry::procfs::read_creds(pid).unwrap(), 0).to_pb(),
        ),
        mm: Some(mm),
        vmas: vmas.clone(),
        threads: vec![thread],
        fds,
        sigactions,
        ..Default::default()
    };
    let tree = pb::ProcessTree {
        processes: vec![proc],
    };
    let img = FlatImage {
        page_size: ps as u32,
        vmas,
        runs,
    };
    (tree, img)
}

/// The restored maps cover the image's mappings with the same protection
/// and names (`[heap]`, `[stack]`, `[vdso]` and paths), once adjacent
/// entries the kernel may or may not merge are merged on both sides.
fn assert_same_layout(img: &FlatImage, pid: i32) {
    fn merged(it: impl Iterator<Item = (u64, u64, u32, String)>) -> Vec<(u64, u64, u32, String)> {
        let mut out: Vec<(u64, u64, u32, String)> = Vec::new();
        for (s, e, prot, name) in it {
            match out.last_mut() {
                Some(l) if l.1 == s && l.2 == prot && l.3 == name => l.1 = e,
                _ => out.push((s, e, prot, name)),
            }
        }
        out
    }
    let want = merged(
        img.vmas
            .iter()
            .map(|v| (v.start, v.end, v.prot, v.name.clone())),
    );
    let got = merged(procfs::read_maps(pid).unwrap().iter().map(|m| {
        let v = m.to_vma();
        (v.start, v.end, v.prot, v.name)
    }));
    assert_eq!(want, got, "restored layout differs from the image");
}

/// Pages of mappings without write permission cannot have changed since
/// the restore: they must equal the image's data, byte for byte (they were
/// filled through a temporarily writable mapping, then `mprotect`ed).
fn assert_readonly_pages_equal(img: &FlatImage, pid: i32) {
    let mut checked = 0usize;
    for run in &img.runs {
        let Some(data) = &run.data else { continue };
        let ps = img.page_size as u64;
        for v in img
            .vmas
            .iter()
            .filter(|v| v.prot & libc::PROT_WRITE as u32 == 0)
        {
            let (a, b) = (
                run.addr.max(v.start),
                (run.addr + run.pages * ps).min(v.end),
            );
            if a >= b || v.prot & libc::PROT_READ as u32 == 0 {
                continue;
            }
            let mut got = vec![0u8; (b - a) as usize];
            vm::read(pid, a, &mut got).unwrap();
            let want = &data[(a - run.addr) as usize..(b - run.addr) as usize];
            assert!(got == want, "{} at {a:#x}-{b:#x} differs", v.name);
            checked += got.len();
        }
    }
    assert!(checked > 0, "no read-only data pages in the image");
}

/// Zombies among our own children.
fn our_zombies() -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| procfs::read_status(pid).is_ok_and(|s| s.ppid == me && s.state == 'Z'))
        .collect()
}

/// The checks both tests make once `restored` runs: a new pid, its own
/// session, not our child, counting on from `frozen_at` (not from 1), and
/// still counting once the original is dead.
fn assert_continues(
    file: &Path,
    original: &mut Proc,
    img: &FlatImage,
    restored: i32,
    frozen_at: u64,
) {
    let mut restored = Proc {
        pid: restored,
        child: None,
    };
    assert_ne!(restored.pid, original.pid);
    assert_same_layout(img, restored.pid);
    assert_readonly_pages_equal(img, restored.pid);
    for what in ["cmdline", "environ", "auxv"] {
        let (a, b) = (
            fs::read(format!("/proc/{}/{what}", original.pid)).unwrap(),
            fs::read(format!("/proc/{}/{what}", restored.pid)).unwrap(),
        );
        assert_eq!(a, b, "/proc/PID/{what} differs");
    }
    for what in ["exe", "cwd"] {
        let (a, b) = (
            fs::read_link(format!("/proc/{}/{what}", original.pid)).unwrap(),
            fs::read_link(format!("/proc/{}/{what}", restored.pid)).unwrap(),
        );
        assert_eq!(a, b, "/proc/PID/{what} differs");
    }
    wait_until(
        "the restored counter to move",
        Duration::from_secs(10),
        || counter(file).is_some_and(|n| n > frozen_at),
    );
    let first = read_counter(file);
    eprintln!(
        "frozen at {frozen_at}, restored {} counts {first}",
        restored.pid
    );
    assert!(
        first > frozen_at && first < frozen_at + 1000,
        "{first} vs {frozen_at}"
    );

    let st = status(restored.pid);
    assert_ne!(
        st.ppid,
        std::process::id() as i32,
        "the restored process is our child"
    );
    assert_eq!(st.threads, 1);
    assert_eq!(
        stat_field(restored.pid, 6) as i32,
        restored.pid,
        "not its own session"
    );

    original.kill();
    let before = read_counter(file);
    wait_until(
        "counting after the original died",
        Duration::from_secs(10),
        || counter(file).is_some_and(|n| n > before + 5),
    );
    assert!(our_zombies().is_empty(), "zombies: {:?}", our_zombies());
    restored.kill();
    wait_until(
        "the restored process to die",
        Duration::from_secs(5),
        || procfs::read_status(restored.pid).map_or(true, |s| s.state == 'Z'),
    );
    assert!(our_zombies().is_empty(), "zombies: {:?}", our_zombies());
}

/// A python counter held frozen, with its image: where every test here
/// starts. `frozen_at` is the value the file held at the freeze (or, if it
/// was frozen between `open('w')` and the write, the last value seen).
struct Held {
    dir: tempfile::TempDir,
    file: PathBuf,
    original: Proc,
    frozen: Seized,
    frozen_at: u64,
    tree: pb::ProcessTree,
    img: FlatImage,
}

impl Held {
    /// [`assert_continues`] for the process restored as `pid`; the
    /// original stays frozen (as after a dump) until then.
    fn assert_restored_as(mut self, pid: i32) {
        assert_continues(
            &self.file,
            &mut self.original,
            &self.img,
            pid,
            self.frozen_at,
        );
        drop(self.frozen);
    }
}

/// [`held_counter`], its image asking for `--keep-pids`, and the pid it
/// keeps.
fn held_keeping_pids() -> (Held, i32) {
    let mut h = held_counter();
    ferry::pidns::record(&mut h.tree).unwrap();
    h.tree.processes[0].keep_pids = true;
    let n = h.tree.processes[0].ns_pid;
    (h, n)
}

fn held_counter() -> Held {
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("count");
    let original = start_counter(&file);
    let seen = read_counter(&file);
    let frozen = Seized::seize(original.pid).unwrap();
    let frozen_at = counter(&file).unwrap_or(seen);
    let (tree, img) = capture(original.pid, &frozen);
    Held {
        dir,
        file,
        original,
        frozen,
        frozen_at,
        tree,
        img,
    }
}

#[test]
fn a_hand_built_image_of_a_python_counter_runs_on() {
    need_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = held_counter();
    eprintln!(
        "image: {} vmas, {} pages ({} bytes of data), {} fds",
        h.img.vmas.len(),
        h.img.pages(),
        h.img.data_bytes(),
        h.tree.processes[0].fds.len()
    );
    restore::check(&h.tree, &h.img.vmas).unwrap();
    let t0 = Instant::now();
    let pid = restore::restore(&h.tree, &h.img).unwrap();
    eprintln!("restored as {pid} in {:?}", t0.elapsed());
    h.assert_restored_as(pid);
}

/// The layers of a warm restore that make `img` the hard way: round 0
/// has garbage where the image has data (read-only file pages, heap), a
/// read-only file mapping replaced by anonymous memory, an extra mapping,
/// and the largest anonymous mapping cut in half; round 1 zeroes half of
/// the garbage (short runs are written, long ones dropped with
/// `MADV_DONTNEED`), restores the file mapping and the whole anonymous one
/// with its second half, and adds another extra mapping; round 2 drops the
/// extras and sends the true pages where garbage was. Laid one over the
/// other they must give `img` exactly.
fn hard_layers(img: &FlatImage) -> Vec<FlatImage> {
    let ps = img.page_size as u64;
    // Runs cut at mapping boundaries (flatten merges across them).
    let mut pieces: Vec<FlatRun> = Vec::new();
    for r in &img.runs {
        let r_end = r.addr + r.pages * ps;
        for v in img
            .vmas
            .iter()
            .filter(|v| v.start < r_end && r.addr < v.end)
        {
            let (a, b) = (r.addr.max(v.start), r_end.min(v.end));
            pieces.push(FlatRun {
                addr: a,
                pages: (b - a) / ps,
                data: r
                    .data
                    .as_ref()
                    .map(|d| d.slice((a - r.addr) as usize..(b - r.addr) as usize)),
            });
        }
    }
    let img = &FlatImage {
        page_size: img.page_size,
        vmas: img.vmas.clone(),
        runs: pieces,
    };
    let end = |r: &FlatRun| r.addr + r.pages * ps;
    let garbage = |r: &FlatRun| FlatRun {
        data: Some(Bytes::from(vec![0xa5u8; (r.pages * ps) as usize])),
        ..r.clone()
    };
    let inside = |r: &FlatRun, v: &pb::Vma| r.addr >= v.start && end(r) <= v.end;
    let vma_of = |r: &FlatRun| img.vmas.iter().find(|v| inside(r, v));
    let read_only = |v: &pb::Vma| v.prot & libc::PROT_WRITE as u32 == 0;
    let anon_rw = |v: &pb::Vma| v.file.is_none() && !read_only(v) && v.name.is_empty();
    // The largest anonymous read-write mapping with data: cut in half.
    let big = img
        .vmas
        .iter()
        .filter(|v| anon_rw(v))
        .max_by_key(|v| {
            img.runs
                .iter()
                .filter(|r| r.data.is_some() && inside(r, v))
                .count()
        })
        .expect("an anonymous mapping")
        .clone();
    let mid = big.start + (big.end - big.start) / ps / 2 * ps;
    // A read-only file mapping with data: anonymous garbage in round 0.
    let swapped = img
        .vmas
        .iter()
        .find(|v| {
            v.file.is_some()
                && read_only(v)
                && img.runs.iter().any(|r| r.data.is_some() && inside(r, v))
        })
        .expect("a read-only file mapping with data")
        .clone();
    // Extra mappings in gaps of the image.
    let mut gaps = img
        .vmas
        .windows(2)
        .filter(|w| w[1].start - w[0].end >= 64 * ps)
        .map(|w| w[0].end + 16 * ps);
    let extra = |at: u64| pb::Vma {
        start: at,
        end: at + 8 * ps,
        prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
        flags: (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32,
        kind: pb::VmaKind::Anon as i32,
        ..Default::default()
    };
    let (x0, x1) = (extra(gaps.next().unwrap()), extra(gaps.next().unwrap()));
    let sorted = |mut v: Vec<pb::Vma>| {
        v.sort_by_key(|v| v.start);
        v
    };

    let mut l0_vmas: Vec<pb::Vma> = img
        .vmas
        .iter()
        .filter(|v| v.start != swapped.start)
        .map(|v| {
            let mut v = v.clone();
            if v.start == big.start {
                v.end = mid;
            }
            v
        })
        .collect();
    let mut anon = swapped.clone();
    anon.file = None;
    anon.kind = pb::VmaKind::Anon as i32;
    anon.name = String::new();
    anon.flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32;
    l0_vmas.push(anon);
    l0_vmas.push(x0.clone());
    let mut spoiled = Vec::new();
    let mut l0_runs = Vec::new();
    for r in &img.runs {
        let v = vma_of(r).expect("pieces lie in one mapping");
        if v.start == big.start && end(r) > mid {
            continue; // the cut half comes in round 1
        }
        let spoil = r.data.is_some() && (read_only(v) || v.start == big.start);
        if spoil {
            spoiled.push(r.clone());
            l0_runs.push(garbage(r));
        } else if v.start != swapped.start {
            l0_runs.push(r.clone());
        }
    }
    l0_runs.push(garbage(&FlatRun {
        addr: x0.start,
        pages: 8,
        data: None,
    }));
    l0_runs.sort_by_key(|r| r.addr);

    let l1_vmas = sorted(img.vmas.iter().cloned().chain([x1.clone()]).collect());
    let mut l1_runs: Vec<FlatRun> = spoiled
        .iter()
        .step_by(2)
        .map(|r| FlatRun {
            data: None,
            ..r.clone()
        })
        .collect();
    l1_runs.extend(
        img.runs
            .iter()
            .filter(|r| r.addr >= mid && end(r) <= big.end)
            .cloned(),
    );
    l1_runs.push(garbage(&FlatRun {
        addr: x1.start,
        pages: 8,
        data: None,
    }));
    l1_runs.sort_by_key(|r| r.addr);
    assert!(
        l1_runs
            .iter()
            .any(|r| r.data.is_none() && r.pages * ps > 64 << 10),
        "no zero run long enough for MADV_DONTNEED"
    );

    // The remapped file mapping also needs its zero runs again.
    let mut l2_runs = spoiled;
    l2_runs.extend(
        img.runs
            .iter()
            .filter(|r| r.data.is_none() && vma_of(r).is_some_and(|v| v.start == swapped.start))
            .cloned(),
    );
    l2_runs.sort_by_key(|r| r.addr);
    let layer = |vmas: Vec<pb::Vma>, runs: Vec<FlatRun>| FlatImage {
        page_size: img.page_size,
        vmas: sorted(vmas),
        runs,
    };
    vec![
        layer(l0_vmas, l0_runs),
        layer(l1_vmas, l1_runs),
        layer(img.vmas.clone(), l2_runs),
    ]
}

#[test]
fn layers_laid_one_by_one_restore_the_flat_image() {
    need_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = held_counter();
    let mut warm = restore::Warm::start().unwrap();
    for l in hard_layers(&h.img) {
        warm.layer(l).unwrap();
    }
    let pid = warm.finish(&h.tree).map_err(|f| f.error).unwrap();
    h.assert_restored_as(pid);
}

#[test]
fn a_warm_restore_keeping_pids_lays_the_rounds_into_a_process_with_its_pid() {
    need_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (h, n) = held_keeping_pids();
    let mut warm = restore::Warm::start_keeping_pid(n).unwrap();
    for l in hard_layers(&h.img) {
        warm.layer(l).unwrap();
    }
    // Before the commit: the waiting process already has its pid, in a
    // namespace of its own whose pid 1, its parent, is the reaper.
    let stub = warm.stub_pid().expect("the layers are in a stub");
    let nspid = |pid: i32| {
        ferry::pidns::parse_nspid(&fs::read_to_string(format!("/proc/{pid}/status")).unwrap())
            .unwrap()
    };
    assert_eq!(nspid(stub), [stub, n], "the waiting process's pids");
    let reaper = status(stub).ppid;
    assert_eq!(nspid(reaper), [reaper, 1], "its parent is pid 1 there");
    let ns = |pid: i32| fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    assert_eq!(ns(stub), ns(reaper));
    assert_ne!(ns(stub), ns(std::process::id() as i32), "a new namespace");

    let pid = warm.finish(&h.tree).map_err(|f| f.error).unwrap();
    assert_eq!(pid, stub, "the process laid warm is the one that runs");
    assert_eq!(
        fs::read_to_string(format!("/proc/{reaper}/comm")).unwrap(),
        "ferry-init\n",
        "the reaper runs"
    );
    h.assert_restored_as(pid);
    // Its only child gone, the reaper ends and the namespace with it.
    wait_until("the reaper to end", Duration::from_secs(5), || {
        procfs::read_status(reaper).map_or(true, |s| s.state == 'Z')
    });
}

#[test]
fn a_warm_restore_keeping_another_pid_than_the_states_gives_way_to_a_cold_one() {
    need_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (h, n) = held_keeping_pids();
    let mut warm = restore::Warm::start_keeping_pid(n + 1).unwrap();
    warm.layer(h.img.clone()).unwrap();
    let stub = warm.stub_pid().expect("the layer is in a stub");
    let f = warm.finish(&h.tree).unwrap_err();
    // "In the layers": the pages are all in the store, so the page server
    // restores cold from the flattened image instead.
    assert!(f.in_layers, "{}", f.error);
    assert!(
        f.error.to_string().contains(&format!("made pid {}", n + 1)),
        "{}",
        f.error
    );
    wait_until("the stub laid warm to die", Duration::from_secs(10), || {
        procfs::read_status(stub).map_or(true, |s| s.state == 'Z')
    });
    let k = restore::restore_keeping_pids(&h.tree, &h.img).unwrap();
    assert_eq!(k.ns_pid, n);
    h.assert_restored_as(k.pid);
}

#[test]
fn an_abandoned_warm_restore_leaves_nothing_running() {
    need_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Held {
        dir: _dir,
        file,
        original: _original,
        frozen,
        img,
        ..
    } = held_counter();
    drop(frozen);
    let mut warm = restore::Warm::start().unwrap();
    warm.layer(img).unwrap();
    let stub = warm.stub_pid().expect("the layer is in a stub");
    assert_eq!(
        status(stub).state,
        't',
        "the stub waits, stopped under ptrace"
    );
    // The session ends without a commit: the waiting process must go.
    drop(warm);
    wait_until("the stub to die", Duration::from_secs(10), || {
        procfs::read_status(stub).map_or(true, |s| s.state == 'Z')
    });
    let n = read_counter(&file);
    wait_until("the original to count on", Duration::from_secs(5), || {
        counter(&file).is_some_and(|m| m > n)
    });
}

#[test]
fn a_failed_restore_leaves_nothing_running() {
    need_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Held {
        dir,
        original: _original,
        frozen,
        mut tree,
        img,
        ..
    } = held_counter();
    // A "directory" that is a regular file passes the check and fails
    // inside the stub (ENOTDIR), after the memory is built.
    let not_a_dir = dir.path().join("not-a-dir");
    fs::write(&not_a_dir, b"x").unwrap();
    tree.processes[0].fds.push(pb::FileDesc {
        fd: 42,
        kind: pb::FdKind::Directory as i32,
        path: not_a_dir.to_string_lossy().into_owned(),
        ..Default::default()
    });
    restore::check(&tree, &img.vmas).unwrap();
    let before: Vec<i32> = children_of_init_named(&tree.processes[0].comm);
    let err = restore::restore(&tree, &img).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, RestoreError::Syscall { .. }), "{err:?}");
    assert!(
        msg.contains("for fd 42") && msg.contains("ENOTDIR"),
        "{msg}"
    );
    sleep(Duration::from_millis(100));
    let after = children_of_init_named(&tree.processes[0].comm);
    let leaked: Vec<_> = after
        .iter()
        .filter(|p| !before.contains(p) && procfs::read_status(**p).is_ok_and(|s| s.state != 'Z'))
        .collect();
    assert!(leaked.is_empty(), "left running: {leaked:?}");
    assert!(our_zombies().is_empty());
    drop(frozen);
}

#[test]
fn pending_signals_are_delivered_after_restore() {
    need_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Held {
        dir: _dir,
        original: _original,
        frozen,
        mut tree,
        img,
        ..
    } = held_counter();
    // SIGTERM, pending and not blocked: default action, the restored
    // process dies of it as soon as it runs.
    tree.processes[0].pending_signals = 1 << (libc::SIGTERM - 1);
    let pid = restore::restore(&tree, &img).unwrap();
    let _restored = Proc { pid, child: None };
    wait_until(
        "the restored process to die",
        Duration::from_secs(5),
        || procfs::read_status(pid).map_or(true, |s| s.state == 'Z'),
    );
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 52, the wait status of a zombie: killed by SIGTERM.
        let code: i32 = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .nth(52 - 3)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(code & 0x7f, libc::SIGTERM, "wait status {code:#x}");
    }
    drop(frozen);
}

/// Processes named `comm` in the stub's position (a child of init or of a
/// subreaper, anything but ours).
fn children_of_init_named(comm: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
                || fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim_end() == "ferry-restore")
        })
        .collect()
}

#[test]
fn check_refuses_what_it_cannot_restore_by_name() {
    let img = FlatImage {
        page_size: 4096,
        vmas: vec![],
        runs: vec![],
    };
    let two = pb::ProcessTree {
        processes: vec![pb::Process::default(), pb::Process::default()],
    };
    // Two processes in one address space are no tree.
    let e = restore::check(&two, &img.vmas).unwrap_err().to_string();
    assert!(e.contains("space 0 taken twice"), "{e}");
    let mut v = pb::Vma {
        start: 0x10000,
        end: 0x11000,
        kind: pb::VmaKind::File as i32,
        name: "/nonexistent/lib.so".into(),
        file: Some(pb::FileRef {
            path: "/nonexistent/lib.so".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let p = pb::Process {
        threads: vec![pb::Thread {
            gpregs: vec![0; stub::REGS_SIZE].into(),
            xstate: vec![0; 64].into(),
            ..Default::default()
        }],
        mm: Some(pb::MmFields {
            start_code: 0x10000,
            auxv: vec![0; 16].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let one = pb::ProcessTree { processes: vec![p] };
    let img = FlatImage {
        page_size: 4096,
        vmas: vec![v.clone()],
        runs: vec![],
    };
    let e = restore::check(&one, &img.vmas).unwrap_err().to_string();
    assert!(
        e.starts_with("/nonexistent/lib.so: mapped at 0x10000"),
        "{e}"
    );
    v.file.as_mut().unwrap().path = "/etc/hostname".into();
    let img = FlatImage {
        page_size: 4096,
        vmas: vec![v],
        runs: vec![],
    };
    let e = restore::check(&one, &img.vmas).unwrap_err().to_string();
    assert!(e.contains("differs from the source's"), "{e}");
}

/// The real pipeline: `ferry dump` into an images dir, then
/// `restore_from_images_dir`. Active as soon as the capture side fills the
/// state; until then `check` names the missing field and the test stops.
#[test]
fn dump_then_restore_from_an_images_dir() {
    need_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use ferry::dump::{dump_frozen, Destination, DumpOptions};
    use ferry_page_server::store::{disk::DiskStore, Store};

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("count");
    let images = dir.path().join("images");
    let mut original = start_counter(&file);
    let opts = DumpOptions {
        leave_stopped: true,
        policy: ferry::policy::Policy {
            max_downtime: Duration::ZERO,
            max_rounds: 2,
            tiny_pages: 0,
            max_growth: 1000.0,
        },
        compress: Default::default(),
        ..DumpOptions::new(original.pid, Destination::ImagesDir(images.clone()))
    };
    let seen = read_counter(&file);
    let (report, frozen) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(dump_frozen(opts, &mut |_| {}))
        .unwrap();
    let frozen_at = counter(&file).unwrap_or(seen);
    let store = DiskStore::open(&images).unwrap();
    let session = store.open(report.session).unwrap();
    let tree = session.state().unwrap();
    let img = session.flatten().unwrap();
    drop((session, store));
    let Some(tree) = tree else {
        eprintln!("skipped: `ferry dump` stored no process state yet (capture side pending)");
        return;
    };
    match restore::check(&tree, &img.vmas) {
        Err(e @ (RestoreError::Missing(_) | RestoreError::Unsupported(_))) => {
            eprintln!("skipped: the dumped state cannot be restored yet: {e}");
            return;
        }
        r => r.unwrap(),
    }
    // From a plain thread: restore makes its own ptrace thread anyway.
    let pid = restore::restore_from_images_dir(&images, None).unwrap();
    assert_continues(&file, &mut original, &img, pid, frozen_at);
    drop(frozen);
}
