//! Soak (issue 7): one `ferry workload` migrated back and forth between two
//! `ferry page-server --restore` processes on loopback, 50 hops. Each hop is
//! a real migration with restore; its memory is compared with what it was
//! at the freeze (a digest of the workload's memory region read from the
//! frozen source and from the restored process), the workload checks every
//! page itself, and its counter goes on. After the last hop, each page
//! server holds no more descriptors and (nearly) no more memory than before
//! the first.
//!
//! Needs root (ptrace, restore); skipped with a message otherwise.
//! `FERRY_SOAK_HOPS` changes the number of hops (default 50).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{certs, free_port, is_root, proc_state, wait_for_server};
use ferry::dump::{Destination, DumpOptions};
use ferry::migrate::migrate;
use ferry::policy::Policy;

const MIB: u64 = 4;
/// What a page server's memory may stay above its baseline (measured:
/// +3.5 to +5 MiB after 50 hops; +35 MiB when the allocator kept freed
/// images; the 25 images each server held came to 100 MiB).
const RSS_SLACK_KIB: u64 = 12 << 10;

/// A child process killed (and reaped) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn page_server(tls: &Path, port: u16) -> Killed {
    Killed(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["page-server", "--restore", "--log", "warn", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--tls")
            .arg(tls)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Where the workload's memory is: the start of the anonymous mapping just
/// over `MIB` MiB (its own mmap'ed chunk; malloc rounds it up a page).
fn region(pid: i32) -> (u64, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let want = MIB << 20;
    for l in maps.lines() {
        let mut f = l.split_whitespace();
        let range = f.next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let a = u64::from_str_radix(a, 16).unwrap();
        let b = u64::from_str_radix(b, 16).unwrap();
        let anon = l.split_whitespace().nth(5).is_none();
        if anon && b - a >= want && b - a <= want + (64 << 10) {
            // The kernel may have merged older small mappings above it,
            // which the running process goes on writing: only the buffer
            // (after malloc's 16-byte header) and its chunk's last page.
            return (a, a + want + 4096);
        }
    }
    panic!("no {MIB} MiB region in pid {pid}:\n{maps}");
}

/// The bytes of `[a, b)` of `pid`, read through /proc/PID/mem.
fn read_region(pid: i32, (a, b): (u64, u64)) -> Vec<u8> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; (b - a) as usize];
    mem.read_exact_at(&mut buf, a).unwrap();
    buf
}

/// FNV-1a: the digest the soak compares and reports.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |r| r.count())
}

fn rss_kib(pid: i32) -> u64 {
    common::proc_field(pid, "VmRSS:")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_hops_back_and_forth_lose_nothing_and_leak_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root (ptrace, restore)");
        return;
    }
    let hops: usize = std::env::var("FERRY_SOAK_HOPS")
        .ok()
        .and_then(|h| h.parse().ok())
        .unwrap_or(50);
    let tls = certs();
    let ports = [free_port(), free_port()];
    let servers = [
        page_server(tls.path(), ports[0]),
        page_server(tls.path(), ports[1]),
    ];
    let addrs: Vec<std::net::SocketAddr> = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    for a in &addrs {
        wait_for_server(*a, tls.path()).await;
    }
    let spids: Vec<i32> = servers.iter().map(|s| s.0.id() as i32).collect();
    let baseline: Vec<(usize, u64)> = spids.iter().map(|&p| (fds(p), rss_kib(p))).collect();

    // Memory that does not change on its own (no rewrites): what the
    // frozen source holds must be exactly what the restored process holds.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("workload.log");
    let mut first = Killed(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["workload", "--mib", &MIB.to_string(), "--dirty-rate", "0"])
            .arg("--log-file")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if ferry::workload::last_count(&log).is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut pid = first.0.id() as i32;
    let mut restored = Vec::new();
    let (mut times, mut downtimes) = (Vec::new(), Vec::new());
    let t_all = Instant::now();
    for hop in 0..hops {
        let to = addrs[hop % 2];
        let before = ferry::workload::last_count(&log).expect("the workload logs");
        let area = region(pid);
        let mut frozen = Vec::new();
        let mut connect = common::connect(to, tls.path());
        connect.streams = 2;
        let opts = DumpOptions {
            policy: Policy {
                max_rounds: 3,
                ..Policy::default()
            },
            restore: true,
            ..DumpOptions::new(pid, Destination::Remote(connect))
        };
        let t0 = Instant::now();
        let report = migrate(opts, &mut |r| {
            if r.frozen {
                frozen = read_region(pid, area);
            }
        })
        .await
        .unwrap_or_else(|e| panic!("hop {hop} ({pid} -> {to}): {e}"));
        let took = t0.elapsed();
        if hop == 0 {
            let _ = first.0.wait();
        }
        let new = report.restored_pid;
        restored.push(new);
        assert!(
            matches!(proc_state(pid), '?' | 'Z' | 'X'),
            "hop {hop}: the source {pid} is gone"
        );
        let s = proc_state(new);
        assert!(s == 'S' || s == 'R', "hop {hop}: {new} runs ({s})");
        assert_eq!(region(new), area, "hop {hop}: the region is where it was");
        let got = read_region(new, area);
        if got != frozen {
            let at = got.iter().zip(&frozen).position(|(a, b)| a != b);
            panic!(
                "hop {hop}: the restored memory differs from the frozen source's \
                 (digest {:#x} vs {:#x}; first at {:#x} in {area:x?}, {} bytes differ)",
                digest(&got),
                digest(&frozen),
                area.0 + at.unwrap_or(0) as u64,
                got.iter().zip(&frozen).filter(|(a, b)| a != b).count()
            );
        }
        let checked = tokio::task::spawn_blocking({
            let log = log.clone();
            move || ferry::workload::verify(&log, Duration::from_secs(20))
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("hop {hop}: {e}"));
        assert_eq!(checked, (MIB << 20) / 4096);
        // The count is logged on its own clock: give the restored process
        // time to log one past the frozen count (a loaded CI machine).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut after = ferry::workload::last_count(&log).unwrap();
        while after <= before && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            after = ferry::workload::last_count(&log).unwrap();
        }
        assert!(
            after > before,
            "hop {hop}: it counts on ({before} -> {after})"
        );
        let counts: Vec<u64> = ferry::workload::samples(&log).iter().map(|s| s.0).collect();
        assert!(
            counts.windows(2).all(|w| w[0] < w[1]),
            "hop {hop}: one writer, never restarted"
        );
        eprintln!(
            "hop {hop}: {pid} -> {new} ({} rounds) in {:.0} ms, downtime {:.1} ms, digest {:#x}, \
             page servers' VmRSS {} + {} KiB",
            report.dump.rounds.len(),
            took.as_secs_f64() * 1e3,
            report.downtime.as_secs_f64() * 1e3,
            digest(&got),
            rss_kib(spids[0]),
            rss_kib(spids[1])
        );
        times.push(took);
        downtimes.push(report.downtime);
        pid = new;
    }
    let total = t_all.elapsed();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );

    // Every session has ended (its image removed at restore): descriptors
    // back to the baseline; memory back within a few MiB of it (the
    // allocator keeps some), far below what the images took.
    let settled = |n: &[(usize, u64)]| {
        n.iter()
            .zip(&baseline)
            .all(|(n, b)| n.0 <= b.0 && n.1 <= b.1 + RSS_SLACK_KIB)
    };
    let mut now = baseline.clone();
    for _ in 0..120 {
        now = spids.iter().map(|&p| (fds(p), rss_kib(p))).collect();
        if settled(&now) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let images_kib = (hops as u64).div_ceil(2) * (MIB << 10);
    for (i, (n, b)) in now.iter().zip(&baseline).enumerate() {
        eprintln!(
            "page server {i}: fds {} -> {}, VmRSS {} KiB -> {} KiB",
            b.0, n.0, b.1, n.1
        );
        assert!(
            n.0 <= b.0,
            "page server {i}: descriptors {} -> {}",
            b.0,
            n.0
        );
        assert!(
            n.1 <= b.1 + RSS_SLACK_KIB,
            "page server {i}: VmRSS {} KiB -> {} KiB (the {hops} images held {images_kib} KiB)",
            b.1,
            n.1
        );
    }
    for s in &spids {
        assert!(proc_state(*s) != 'Z', "page server {s} is alive");
    }
    eprintln!(
        "soak: {hops} hops in {:.1} s, {:.0} ms per hop (median), downtime median {:.1} ms",
        total.as_secs_f64(),
        median(&mut times).as_secs_f64() * 1e3,
        median(&mut downtimes).as_secs_f64() * 1e3
    );
}
