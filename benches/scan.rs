//! Dirty tracking and memory reads on a real 1 GiB process (needs root):
//! a clean uffd-wp rescan, a rescan with 10 % of the pages written, and
//! reading 1024 scattered pages with `process_vm_readv`, and one injected
//! syscall (running, and frozen with signals blocked), and the 62 signal
//! actions of a state capture injected one by one against one batch.
//!
//! `cargo bench --bench scan`

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferry::procfs;
use ferry::synthetic::Rng;
use ferry::sys::ptrace::Tracee;
use ferry::sys::vm;
use ferry::track::{self, Backend};

const MIB: u64 = 1024;

struct Workload(Child);

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

fn bench(c: &mut Criterion) {
    if !is_root() {
        eprintln!("scan bench skipped: needs root (ptrace)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["workload", "--mib", &MIB.to_string(), "--log-file"])
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let workload = Workload(child);
    let pid = workload.0.id() as i32;
    while !log.exists() || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == 0 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let maps = procfs::read_maps(pid).unwrap();
    let region = maps
        .iter()
        .filter(|m| m.path.is_none() && m.write)
        .max_by_key(|m| m.end - m.start)
        .map(|m| (m.start, m.end))
        .unwrap();
    let pages = (region.1 - region.0) / 4096;
    let tracee = Tracee::seize(pid).unwrap();
    let mut t = track::choose(&tracee, Some(Backend::UffdWp)).unwrap();
    t.collect(&maps).unwrap();

    let mut g = c.benchmark_group("scan");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(MIB << 20));
    g.bench_function("uffd-wp/clean/1GiB", |b| {
        b.iter(|| t.collect(&maps).unwrap())
    });
    let mut rng = Rng::new(3);
    g.bench_function("uffd-wp/10%-dirty/1GiB", |b| {
        b.iter_batched(
            || {
                for _ in 0..pages / 10 {
                    let a = region.0 + rng.below(pages) * 4096;
                    vm::write(pid, a, &[1]).unwrap();
                }
            },
            |()| t.collect(&maps).unwrap(),
            BatchSize::PerIteration,
        )
    });
    let mut buf = Vec::new();
    let mut ranges: Vec<(u64, u64)> = (0..1024)
        .map(|_| {
            let a = region.0 + rng.below(pages) * 4096;
            (a, a + 4096)
        })
        .collect();
    ranges.sort_unstable();
    ranges.dedup();
    g.throughput(Throughput::Bytes(ranges.len() as u64 * 4096));
    g.bench_function("read/1024-scattered-pages", |b| {
        b.iter(|| vm::read_ranges(pid, &ranges, &mut buf).unwrap())
    });
    g.finish();
    drop(t);

    // One injected syscall, as the rounds (running process) and the state
    // capture (frozen, signals blocked) make them; each goes through the
    // trampoline (written before, the original bytes put back after).
    let mut g = c.benchmark_group("inject");
    g.sample_size(50);
    g.bench_function("getpid/running", |b| {
        b.iter(|| tracee.syscall(libc::SYS_getpid, &[]).unwrap())
    });
    tracee.freeze().unwrap();
    let tid = tracee.tids()[0];
    g.bench_function("getpid/frozen-signals-blocked", |b| {
        b.iter(|| tracee.syscall_in(tid, libc::SYS_getpid, &[]).unwrap())
    });
    // What the state capture asks of a frozen process's first thread: the
    // 62 signal actions, one injection each against one batch.
    let scratch = tracee
        .syscall_in(
            tid,
            libc::SYS_mmap,
            &[
                0,
                1 << 16,
                3,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )
        .unwrap() as u64;
    let calls: Vec<(i64, [u64; 6])> = (1..=64u64)
        .filter(|&s| s != 9 && s != 19)
        .map(|s| (libc::SYS_rt_sigaction, [s, 0, scratch + s * 32, 8, 0, 0]))
        .collect();
    g.bench_function("62-sigactions/one-injection-each", |b| {
        b.iter(|| {
            for (nr, a) in &calls {
                tracee.syscall_in(tid, *nr, &a[..4]).unwrap();
            }
        })
    });
    g.bench_function("62-sigactions/one-batch", |b| {
        b.iter(|| {
            tracee
                .syscalls_in(tid, scratch + (1 << 15), calls.clone())
                .unwrap()
        })
    });
    g.finish();
    let _ = tracee.syscall_in(tid, libc::SYS_munmap, &[scratch, 1 << 16]);
    let _ = tracee.thaw();
    let _ = tracee.detach(false);
}

criterion_group!(benches, bench);
criterion_main!(benches);
