//! Spill to disk (issue 7): `ferry page-server --store mem --session-quota
//! 4M --spill-dir DIR --restore` takes a 16 MiB process that goes over its
//! quota in round 0: the session moves to the disk store in DIR instead of
//! being ended, the migration completes, and the restored process's memory
//! is exactly the source's.
//!
//! Needs root (ptrace, restore); skipped with a message otherwise.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{
    certs, free_port, is_root, log_values, logging_fixture, proc_state, restore_options,
    wait_for_server, KillOnDrop,
};
use ferry::migrate::migrate;
use ferry_page_server::store::{disk::DiskStore, Store};

fn region(pid: i32, base: u64, len: u64) -> Vec<u8> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; len as usize];
    mem.read_exact_at(&mut buf, base).unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_quota_spills_to_disk_and_restores_exactly() {
    if !is_root() {
        eprintln!("skipped: needs root (ptrace, restore)");
        return;
    }
    let tls = certs();
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("spill");
    let stderr = dir.path().join("server.log");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let _server = common::ServerProcess(
        common::page_server_command(tls.path(), port)
            .args(["--restore", "--keep-restored", "--log", "info"])
            .args(["--store", "mem", "--session-quota", "4M", "--spill-dir"])
            .arg(&spill)
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_server(addr, tls.path()).await;

    // No dirty writer: the region only changes if the migration changes it.
    let (fx, log) = logging_fixture(dir.path(), "log", &["--mib", "16"]);
    let before = region(fx.pid, fx.base, fx.len);
    let count = *log_values(&log).last().unwrap();
    let opts = restore_options(fx.pid, common::connect(addr, tls.path()));
    let report = migrate(opts, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("a session over quota spills instead of failing: {e}"));
    let new = report.restored_pid;
    let _kill = KillOnDrop(new);
    eprintln!("migrated {} -> {new} over a 4 MiB quota", fx.pid);
    assert!(
        matches!(proc_state(fx.pid), '?' | 'Z' | 'X'),
        "the source is gone"
    );
    let after = region(new, fx.base, fx.len);
    let differ = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "the restored region differs in {differ} bytes");
    std::thread::sleep(Duration::from_millis(300));
    let values = log_values(&log);
    assert!(*values.last().unwrap() > count, "it counts on");
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "from where it was");

    // It did spill: the image is in the disk store, whole, with its state.
    let text = std::fs::read_to_string(&stderr).unwrap();
    assert!(text.contains("spilled to the disk store"), "{text}");
    let disk = DiskStore::open(&spill).unwrap();
    let sessions = disk.list().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(sessions[0].has_state);
    let img = disk.open(sessions[0].id).unwrap().flatten().unwrap();
    assert!(img.data_bytes() > 4 << 20, "{} bytes", img.data_bytes());
}
