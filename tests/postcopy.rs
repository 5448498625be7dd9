//! `ferry migrate --post-copy` end to end on one host, through a real page
//! server with warm restore: a `ferry workload` rewriting pages at a high
//! rate is resumed on the destination with its last dirty pages missing,
//! runs on while they arrive, and checks every page of its memory; the
//! connection going away after the resume kills the destination's copy
//! and leaves the source stopped; a page server that cannot do post-copy
//! is refused before anything is frozen. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::dump::{Destination, DumpOptions};
use ferry::loopback::Loopback;
use ferry::migrate::{migrate_post_copy, ColdRestorer, MigrateError};
use ferry::policy::Policy;
use ferry::postcopy::PostCopyOptions;

mod common;
use common::{is_root, proc_field, proc_state};

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace, restore, userfaultfd)");
            return;
        }
    };
}

/// `ferry workload` of `mib` MiB rewriting `rate` random pages a second,
/// logging to `log`; returned once it logs.
fn workload(mib: u64, rate: u64, log: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["workload", "--mib", &mib.to_string()])
        .args(["--dirty-rate", &rate.to_string(), "--pattern", "uniform"])
        .arg("--log-file")
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry workload starts");
    let t0 = Instant::now();
    while ferry::workload::last_count(log).is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the workload never logs"
        );
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the workload exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn options(pid: i32, server: &Loopback, rounds: u32) -> DumpOptions {
    DumpOptions {
        policy: Policy {
            max_rounds: rounds,
            ..Policy::default()
        },
        restore: true,
        ..DumpOptions::new(pid, Destination::Remote(server.connect(4).unwrap()))
    }
}

fn gone(pid: i32) -> bool {
    matches!(proc_state(pid), '?' | 'Z' | 'X')
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Pids of running processes with exactly this command line.
fn pids_with_cmdline(cmdline: &[u8]) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| std::fs::read(format!("/proc/{p}/cmdline")).ok().as_deref() == Some(cmdline))
        .filter(|&p| !gone(p))
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("workload.log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_workload_resumes_with_pages_missing_and_every_page_arrives() {
    need_root!();
    let server = Loopback::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = log_in(&dir);
    // 64 MiB, a fifth of it rewritten every second.
    let mut child = workload(64, 4096, &log);
    let source = child.id() as i32;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let report = migrate_post_copy(
        options(source, &server, 2),
        &PostCopyOptions::default(),
        &mut |_| {},
    )
    .await
    .unwrap();
    let _ = child.wait();
    let new = report.restored_pid;
    let pc = report.post_copy.clone().expect("a post-copy report");
    eprintln!(
        "post-copy {source} -> {new}: downtime {:?}, {} pages lazy, {} faults asked \
         (median {} us, p99 {} us), {} local, last page {:?} after the resume",
        report.downtime,
        pc.lazy_pages,
        pc.faults,
        pc.fault_median_us,
        pc.fault_p99_us,
        pc.local_faults,
        pc.last_page
    );
    assert!(pc.lazy_pages > 0, "the last round left pages for post-copy");
    assert!(gone(source), "the source is gone once every page is in");
    let s = proc_state(new);
    assert!(s == 'S' || s == 'R', "the migrated workload runs: {s}");

    // It goes on counting, and every one of its 16384 pages is right.
    let before = ferry::workload::last_count(&log).unwrap();
    let checked = tokio::task::spawn_blocking({
        let log = log.clone();
        move || ferry::workload::verify(&log, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let after = ferry::workload::last_count(&log).unwrap();
    kill(new);
    assert_eq!(checked.unwrap(), 64 * 256);
    assert!(after > before, "the count goes on: {before} then {after}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_gone_after_the_resume_kills_the_copy_and_leaves_the_source_stopped() {
    need_root!();
    let server = Loopback::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = log_in(&dir);
    let mut child = workload(64, 8192, &log);
    let source = child.id() as i32;
    let cmdline = std::fs::read(format!("/proc/{source}/cmdline")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A slow push keeps post-copy going long enough to cut it.
    let mut opts = options(source, &server, 1);
    // The cut can fall between the destination's release of the process
    // and its `Restored` reaching the source: the source then asks a page
    // server that is gone, for as long as its connect timeout (60 s by
    // default), and is left stopped in doubt. Keep that short.
    if let Destination::Remote(c) = &mut opts.dest {
        c.timeout = Duration::from_secs(10);
    }
    let migration = tokio::spawn(async move {
        let pc = PostCopyOptions {
            bandwidth: Some(64 << 10),
        };
        migrate_post_copy(opts, &pc, &mut |_| {}).await
    });
    let restored = tokio::task::spawn_blocking(move || {
        let mut found = 0;
        wait_until("the destination copy runs", Duration::from_secs(60), || {
            // Resumed: running or sleeping, no longer traced by the restore.
            found = pids_with_cmdline(&cmdline)
                .into_iter()
                .find(|&p| {
                    p != source
                        && matches!(proc_state(p), 'S' | 'R')
                        && proc_field(p, "TracerPid:").as_deref() == Some("0")
                })
                .unwrap_or(0);
            found != 0
        });
        found
    })
    .await
    .unwrap();
    // The page server goes away with pages still missing.
    let t_cut = Instant::now();
    server.stop().await;
    let err = tokio::time::timeout(Duration::from_secs(30), migration)
        .await
        .expect("the source side ends, no hang")
        .unwrap()
        .unwrap_err();
    eprintln!("source side: {err}");
    // Post-copy failed after `Restored`, or `Restored` lost with the link:
    // either way the source stays stopped and the copy dies.
    assert!(
        matches!(
            err,
            MigrateError::PostCopy { .. } | MigrateError::InDoubt(_)
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("left stopped"), "{msg}");
    wait_until(
        "the destination's copy is killed",
        Duration::from_secs(15),
        || gone(restored),
    );
    eprintln!("copy {restored} gone {:?} after the cut", t_cut.elapsed());
    // The source: stopped, not running, not gone.
    wait_until("the source is stopped", Duration::from_secs(5), || {
        proc_state(source) == 'T'
    });
    let count = ferry::workload::last_count(&log).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ferry::workload::last_count(&log).unwrap(),
        count,
        "nothing runs on"
    );
    kill(source);
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_server_without_post_copy_is_refused_and_the_source_runs_on() {
    need_root!();
    // A cold-restoring page server cannot leave pages missing, so it does
    // not offer post-copy (like one of a version before it).
    let server = Loopback::start_with(Arc::new(ColdRestorer)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = log_in(&dir);
    let mut child = workload(16, 1000, &log);
    let source = child.id() as i32;
    let err = migrate_post_copy(
        options(source, &server, 2),
        &PostCopyOptions::default(),
        &mut |_| {},
    )
    .await
    .unwrap_err();
    eprintln!("{err}");
    assert!(
        err.to_string().contains("does not offer post-copy"),
        "{err}"
    );
    let s = proc_state(source);
    assert!(s == 'S' || s == 'R', "the source runs on: {s}");
    let before = ferry::workload::last_count(&log).unwrap();
    let checked = tokio::task::spawn_blocking({
        let log = log.clone();
        move || ferry::workload::verify(&log, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(checked.unwrap(), 16 * 256);
    assert!(ferry::workload::last_count(&log).unwrap() > before);
    let _ = child.kill();
    let _ = child.wait();
    server.stop().await;
}
