//! A migrated process's `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` go on from
//! where they stopped: the source here lives in a time namespace 100 days
//! ahead of this host (as if its host had booted 100 days earlier), and
//! after the migration through a page server of this test the python
//! process's own readings never go back nor jump. Without the restore's
//! time namespace it would read this host's clocks, 100 days behind. Needs
//! root.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{is_root, python, start_tree};

/// Every 10 ms: `monotonic boottime realtime`, in ns, to `argv[1]`.
const CLOCKS: &str = r#"
import sys, time
log = open(sys.argv[1], 'a', buffering=1)
while True:
    log.write('%d %d %d\n' % (time.clock_gettime_ns(time.CLOCK_MONOTONIC),
                              time.clock_gettime_ns(time.CLOCK_BOOTTIME),
                              time.time_ns()))
    time.sleep(0.01)
"#;

const AHEAD_S: i64 = 100 * 86_400;

fn readings(log: &std::path::Path) -> Vec<[i64; 3]> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: Vec<i64> = l.split(' ').filter_map(|w| w.parse().ok()).collect();
            v.try_into().ok()
        })
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_100_days_ahead_go_on_without_a_jump_after_a_migration() {
    if !is_root() {
        eprintln!("skipped: needs root (ptrace, time namespaces)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("clocks");
    let ahead = AHEAD_S.to_string();
    let unshare = start_tree(
        Command::new("unshare")
            .args([
                "--time",
                "--monotonic",
                &ahead,
                "--boottime",
                &ahead,
                "--fork",
            ])
            .args([python(), "-c", CLOCKS])
            .arg(&log),
    );
    wait_until("python to log", || readings(&log).len() > 5);
    let kids = ferry::tree::discover(unshare.0).unwrap();
    let pid = kids
        .iter()
        .map(|p| p.pid)
        .find(|&p| p != unshare.0)
        .expect("python, the child of unshare");
    let offsets = |pid: i32| {
        ferry::clocks::parse_offsets(
            &std::fs::read_to_string(format!("/proc/{pid}/timens_offsets")).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(offsets(pid).monotonic, AHEAD_S * 1_000_000_000);

    let before = readings(&log).len();
    let moved = common::migrate_here(pid).await;
    let new = moved.report.restored_pid;
    wait_until("the restored process to log on", || {
        readings(&log).len() > before + 30
    });

    // The restored process is in a time namespace of its own, 100 days
    // ahead of this host like the source's (less the downtime, which it
    // does not see).
    let o = offsets(new).monotonic;
    assert!(
        (AHEAD_S - 5) * 1_000_000_000 < o && o <= AHEAD_S * 1_000_000_000,
        "the restored process's monotonic offset: {o} ns"
    );
    // Its own readings: never back, never a jump; only the wall clock
    // shows the freeze.
    let r = readings(&log);
    let host_now = ferry::clocks::Clocks::now().unwrap();
    for w in r.windows(2) {
        let (a, b) = (w[0], w[1]);
        for (i, clock) in ["monotonic", "boottime"].into_iter().enumerate() {
            let step = b[i] - a[i];
            assert!(
                (0..1_000_000_000).contains(&step),
                "{clock} went from {} to {} ns across a reading of the log",
                a[i],
                b[i]
            );
        }
    }
    let last = r.last().unwrap();
    assert!(
        last[0] > host_now.monotonic + (AHEAD_S - 5) * 1_000_000_000,
        "monotonic {} ns after the move: not 100 days ahead of this host's {}",
        last[0],
        host_now.monotonic
    );
    eprintln!(
        "{} readings; restored as {new}, downtime {:?}",
        r.len(),
        moved.report.downtime
    );
    moved.server.stop().await;
}
