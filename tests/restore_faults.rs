//! Restore failing at each of its stages (issue 7): stub, memory layers,
//! vdso, mm, files, signals, threads, credentials, final registers. Each is made to fail
//! in a real `ferry page-server --restore` by the test-only failpoint
//! (`FERRY_FAILPOINT=restore:STAGE`, see src/failpoint.rs); a real
//! migration then fails with an error that names the stage, the source
//! runs on untouched, and the half-restored stub on the destination is
//! gone: killed, and reaped by its parent (this test, their subreaper), so
//! neither a process nor a zombie is left. Then the same with a real cause:
//! a page server whose hard limit on open files is below the source's, and
//! no CAP_SYS_RESOURCE to raise it.
//!
//! Needs root (ptrace, restore); skipped with a message otherwise. Its own
//! test binary: as subreaper it adopts every orphan of this process.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    assert_source_runs, certs, free_port, is_root, logging_fixture, logging_fixture_under,
    restore_options, wait_for_server, Fixture,
};
use ferry::migrate::{migrate, MigrateError};

const STAGES: [&str; 9] = [
    "stub",
    "memory",
    "vdso",
    "mm",
    "files",
    "signals",
    "threads",
    "creds",
    "registers",
];

/// Children of this process that it did not start itself: restore stubs
/// adopted after their middle parent exited (`PPid` is this process).
fn adopted(known: &HashSet<i32>) -> Vec<(i32, char)> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| !known.contains(pid))
        .filter(|&pid| {
            common::proc_field(pid, "PPid:").and_then(|v| v.parse::<i32>().ok()) == Some(me)
        })
        .map(|pid| (pid, common::proc_state(pid)))
        .collect()
}

fn fixture(dir: &Path, name: &str) -> (Fixture, PathBuf) {
    logging_fixture(dir, name, &["--mib", "8"])
}

/// Migrates `fx` to the page server at `addr`, which cannot restore it
/// (`why`): the error.
async fn migrate_failing(fx: &Fixture, addr: SocketAddr, tls: &Path, why: &str) -> MigrateError {
    migrate(
        restore_options(fx.pid, common::connect(addr, tls)),
        &mut |_| {},
    )
    .await
    .expect_err(why)
}

/// Every stub the failed restore made (the warm one of the rounds, the
/// cold one the commit tried again) is dead; reaping it leaves nothing.
async fn assert_stubs_killed_and_reaped(known: &HashSet<i32>, what: &str) {
    let mut stubs = adopted(known);
    for _ in 0..150 {
        if !stubs.is_empty() && stubs.iter().all(|&(_, s)| s == 'Z') {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stubs = adopted(known);
    }
    assert!(!stubs.is_empty(), "{what}: the restore made a stub");
    for &(pid, state) in &stubs {
        assert_eq!(state, 'Z', "{what}: stub {pid} is left {state}");
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
    }
    assert!(adopted(known).is_empty(), "{what}: nothing is left");
    eprintln!("{what}: {} stub(s) killed and reaped", stubs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_failing_at_any_stage_loses_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root (ptrace, restore)");
        return;
    }
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let tls = certs();
    let dir = tempfile::tempdir().unwrap();
    for stage in STAGES {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let server = common::ServerProcess(
            common::page_server_command(tls.path(), port)
                .args(["--restore", "--log", "warn"])
                .env(ferry::failpoint::VAR, format!("restore:{stage}"))
                .spawn()
                .unwrap(),
        );
        wait_for_server(addr, tls.path()).await;
        let (fx, log) = fixture(dir.path(), stage);
        let known: HashSet<i32> = [server.0.id() as i32, fx.pid].into();
        let e = migrate_failing(&fx, addr, tls.path(), "the destination cannot restore").await;
        eprintln!("{stage}: {e}");
        assert!(
            e.to_string().contains(&format!("restore stage {stage}")),
            "{stage}: the error names the stage: {e}"
        );
        assert_source_runs(&fx, &log, stage);
        assert_stubs_killed_and_reaped(&known, stage).await;
        server.kill();
        drop(fx);
    }

    // A real cause, no failpoint: the page server's hard limit on open
    // files is below the source's, and without CAP_SYS_RESOURCE the
    // restore cannot raise it (the signals stage sets the rlimits). The
    // source lacks it too: a page server refuses an image holding a
    // capability it lacks (tests/creds.rs).
    let hard: u64 = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse().ok())
        .expect("the hard limit on open files");
    let lower = hard / 2;
    let all_but_sys_resource = ferry::sys::caps::NAMES
        .iter()
        .filter(|&&n| n != "sys_resource")
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut prlimit = Command::new("prlimit");
    prlimit
        .arg(format!("--nofile={}:{lower}", lower.min(256)))
        .arg(env!("CARGO_BIN_EXE_ferry"));
    let server = common::ServerProcess(
        common::page_server_args(&mut prlimit, &format!("127.0.0.1:{port}"), tls.path())
            .args(["--restore", "--caps", &all_but_sys_resource])
            .args(["--log", "warn"])
            .spawn()
            .unwrap(),
    );
    wait_for_server(addr, tls.path()).await;
    let (fx, log) = logging_fixture_under(
        &["--bounding-set=-sys_resource"],
        dir.path(),
        "rlimit",
        &["--mib", "8"],
    );
    let known: HashSet<i32> = [server.0.id() as i32, fx.pid].into();
    let e = migrate_failing(
        &fx,
        addr,
        tls.path(),
        "the destination cannot raise the limit",
    )
    .await;
    eprintln!("rlimit: {e}");
    assert!(
        e.to_string().contains("prlimit64 of resource 7") && e.to_string().contains("EPERM"),
        "the error names the limit: {e}"
    );
    assert_source_runs(&fx, &log, "rlimit");
    assert_stubs_killed_and_reaped(&known, "rlimit").await;
    server.kill();
}
