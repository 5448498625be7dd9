//! Capabilities (issue 7): a page server keeps only the capabilities it is
//! told to (`--caps`; none by default without --restore), dropped from
//! every set and the bounding set of every thread, and still migrates with
//! `--restore --caps checkpoint_restore` (a process that needs no more);
//! a restored process holds exactly its own sets; `ferry migrate` runs with
//! `sys_ptrace,kill,dac_read_search,net_admin` only.
//!
//! Needs root; skipped with a message otherwise.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{
    certs, free_port, is_root, logging_fixture_under, proc_field, proc_state, wait_for_server,
    KillOnDrop,
};

fn caps(pid: i32, set: &str) -> u64 {
    proc_field(pid, &format!("{set}:"))
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or_else(|| panic!("no {set} for {pid}"))
}

fn server(tls: &std::path::Path, port: u16, args: &[&str]) -> common::ServerProcess {
    common::ServerProcess(
        common::page_server_command(tls, port)
            .args(["--log", "warn"])
            .args(args)
            .spawn()
            .unwrap(),
    )
}

fn every_thread(pid: i32, set: &str) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(|tid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            s.lines()
                .find_map(|l| l.strip_prefix(&format!("{set}:")))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_servers_drop_capabilities_and_still_migrate() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tls = certs();
    let me = std::process::id() as i32;
    eprintln!(
        "this test: CapEff {:#x} CapBnd {:#x}",
        caps(me, "CapEff"),
        caps(me, "CapBnd")
    );

    // Without --restore a page server needs nothing.
    let port = free_port();
    let plain = server(tls.path(), port, &[]);
    wait_for_server(format!("127.0.0.1:{port}").parse().unwrap(), tls.path()).await;
    let pid = plain.0.id() as i32;
    for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(caps(pid, set), 0, "{set} of a plain page server");
    }
    drop(plain);

    // With --restore it needs CAP_CHECKPOINT_RESTORE alone (PR_SET_MM_MAP
    // setting the restored process's executable), measured: with none the
    // restore fails with EPERM there.
    const CHECKPOINT_RESTORE: u64 = 1 << 40;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let restoring = server(
        tls.path(),
        port,
        &["--restore", "--caps", "checkpoint_restore"],
    );
    wait_for_server(addr.parse().unwrap(), tls.path()).await;
    let spid = restoring.0.id() as i32;
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            every_thread(spid, set)
                .iter()
                .all(|&c| c == CHECKPOINT_RESTORE),
            "{set} of every thread of the page server: {:x?}",
            every_thread(spid, set)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    // Such a page server restores only processes that need no more than
    // it holds (tests/creds.rs): a root process whose bounding set, hence
    // every set, holds checkpoint_restore alone.
    let (fx, log) = logging_fixture_under(
        &["--bounding-set=-all,+checkpoint_restore"],
        dir.path(),
        "log",
        &["--mib", "8"],
    );
    assert_ne!(
        caps(fx.pid, "CapEff"),
        0,
        "the source runs with capabilities"
    );
    // `ferry migrate` itself, which keeps only what the source needs.
    let out = common::migrate_command(fx.pid, &addr, tls.path())
        .args(["--json", "--log", "debug"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let new = common::restored_pid(&out, "caps");
    let _kill = KillOnDrop(new);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("capabilities dropped")
            && stderr.contains("dac_read_search,kill,net_admin,sys_ptrace"),
        "the source drops the rest: {stderr}"
    );
    assert!(
        matches!(proc_state(fx.pid), '?' | 'Z' | 'X'),
        "the source is gone"
    );
    common::assert_counts_on(
        &log,
        Duration::from_millis(400),
        "the restored process counts on",
    );
    // It has exactly what it had, no more than the page server.
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(caps(new, set), CHECKPOINT_RESTORE, "{set}");
    }
    drop(restoring);
}
