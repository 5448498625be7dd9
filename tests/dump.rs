//! `ferry dump` end to end on real processes: the image a page server holds
//! after the rounds equals the process's memory at the freeze, page for
//! page; rounds shrink; and the target is never left stopped or traced when
//! a dump fails or ferry is interrupted. These tests need root (ptrace of a
//! child is allowed to root here; CI runs as root).

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry::dump::{dump, dump_frozen, Destination, DumpError, DumpOptions, RoundReport};
use ferry::sys::ptrace::PtraceError;
use ferry::track::Backend;
use ferry_page_server::store::{disk::DiskStore, mem::MemStore, Store};
use ferry_proto::batch::Compress;

mod common;
use common::{
    assert_image_holds_memory, certs, connect, fixed_rounds, is_root, kernel_thread, proc_state,
    Fixture, Server,
};

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace, /proc/PID/mem of another process)");
            return;
        }
    };
}

fn options(fx: &Fixture, dest: Destination, rounds: u32, track: Option<Backend>) -> DumpOptions {
    DumpOptions {
        leave_stopped: true,
        track,
        policy: fixed_rounds(rounds),
        ..DumpOptions::new(fx.pid, dest)
    }
}

fn show(r: &RoundReport) {
    eprintln!(
        "round {} frozen={} dirty={} raw={} wire={} {:?}",
        r.round, r.frozen, r.dirty_pages, r.stats.raw_bytes, r.stats.wire_bytes, r.total
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_through_a_page_server_equals_memory_at_freeze() {
    need_root!();
    let tls = certs();
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let server = Server::start(tls.path(), store.clone());
    // 256 MiB that keeps writing: a counter and ~8 MiB/s of random pages.
    let mut fx = Fixture::start(&["--mib", "256", "--dirty-rate", "2000"]);
    let dest = Destination::Remote(connect(server.addr, tls.path()));
    let (report, frozen) = dump_frozen(options(&fx, dest, 3, None), &mut show)
        .await
        .unwrap();
    assert_eq!(
        report.rounds.len(),
        4,
        "3 pre-dump rounds and the final one"
    );
    assert!(report.rounds.last().unwrap().frozen);

    // Compared while the process is still frozen: once it moves, even the
    // kernel writes to it (rseq's cpu id when a thread changed CPU).
    let img = store.open(report.session).unwrap().flatten().unwrap();
    let pages = assert_image_holds_memory(fx.pid, 0, &img);
    assert!(pages >= 65536, "checked {pages} pages");
    let state = store
        .open(report.session)
        .unwrap()
        .state()
        .unwrap()
        .unwrap();
    assert_eq!(state.processes[0].pid, fx.pid);

    frozen.leave_stopped().unwrap();
    // The group stop is taken as each thread leaves its ptrace stop.
    for _ in 0..200 {
        if fx.state() == 'T' {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fx.state(), 'T', "--leave-stopped leaves it stopped");
    assert_eq!(fx.tracer(), 0, "and not traced");
    // It runs on from there.
    Command::new("kill")
        .args(["-CONT", &fx.pid.to_string()])
        .status()
        .unwrap();
    let a: u64 = fx.cmd("counter").parse().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let b: u64 = fx.cmd("counter").parse().unwrap();
    assert!(b > a, "counter moves after the dump");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_to_an_images_dir_equals_memory_with_each_backend() {
    need_root!();
    for backend in [Backend::UffdWp, Backend::Checksum] {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::start(&["--mib", "32", "--dirty-rate", "500"]);
        let dest = Destination::ImagesDir(dir.path().into());
        let (report, frozen) = dump_frozen(options(&fx, dest, 2, Some(backend)), &mut show)
            .await
            .unwrap();
        assert_eq!(report.backend, backend);
        let store = DiskStore::open(dir.path()).unwrap();
        let img = store.open(report.session).unwrap().flatten().unwrap();
        assert_image_holds_memory(fx.pid, 0, &img);
        frozen.resume().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_shrink_when_the_workload_dirties_little() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    // 256 MiB = 65536 pages; 5 % a second = 3277 pages/s.
    let fx = Fixture::start(&["--mib", "256", "--dirty-rate", "3277"]);
    let dest = Destination::ImagesDir(dir.path().into());
    let report = dump(options(&fx, dest, 3, None), &mut show).await.unwrap();
    let sent: Vec<u64> = report.rounds.iter().map(|r| r.stats.pages).collect();
    eprintln!("pages per round: {sent:?}");
    assert!(
        sent[2] * 10 < sent[0],
        "third round {} vs first {}",
        sent[2],
        sent[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_for_a_dead_pid_a_kernel_thread_and_no_permission() {
    need_root!();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id() as i32;
    child.wait().unwrap();
    let opts = |pid| DumpOptions {
        policy: fixed_rounds(1),
        ..DumpOptions::new(
            pid,
            Destination::ImagesDir(tempfile::tempdir().unwrap().keep()),
        )
    };
    let e = dump(opts(dead), &mut |_| {}).await.unwrap_err();
    assert!(
        matches!(e, DumpError::Ptrace(PtraceError::NoProcess(_))),
        "{e}"
    );
    eprintln!(
        "dead pid: {}",
        dump(opts(dead), &mut |_| {}).await.unwrap_err()
    );
    // Inside a pid namespace (as under some CI runners) no kernel thread
    // is visible.
    match kernel_thread() {
        Some(k) => {
            let e = dump(opts(k), &mut |_| {}).await.unwrap_err();
            assert!(
                matches!(e, DumpError::Ptrace(PtraceError::KernelThread(_))),
                "{e}"
            );
            eprintln!("kernel thread: {e}");
        }
        None => eprintln!("no kernel thread visible here: that case is not tried"),
    }

    // An unprivileged ferry against a root process.
    let fx = Fixture::start(&["--mib", "4"]);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["dump", "--pid", &fx.pid.to_string(), "--images-dir"])
        .arg(dir.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("unprivileged: {err}");
    assert!(!out.status.success());
    assert!(err.contains("not permitted"), "{err}");
    assert_eq!(fx.state(), 'S');
}

/// Waits until the dump has started its rounds (the fixture is traced).
fn wait_traced(fx: &Fixture) {
    for _ in 0..200 {
        if fx.tracer() != 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("dump never attached");
}

fn assert_left_running(fx: &mut Fixture) {
    for _ in 0..100 {
        if fx.tracer() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fx.tracer(), 0, "still traced");
    let s = proc_state(fx.pid);
    assert!(s == 'S' || s == 'R', "state {s}");
    let a: u64 = fx.cmd("counter").parse().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let b: u64 = fx.cmd("counter").parse().unwrap();
    assert!(b > a, "the target runs on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_ferry_leaves_the_target_running_and_untraced() {
    need_root!();
    for signal in ["-INT", "-TERM"] {
        let mut fx = Fixture::start(&["--mib", "256", "--dirty-rate", "20000"]);
        let dir = tempfile::tempdir().unwrap();
        let mut ferry = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["dump", "--pid", &fx.pid.to_string(), "--max-rounds", "1000"])
            .args(["--max-downtime", "0", "--track", "checksum", "--images-dir"])
            .arg(dir.path())
            .spawn()
            .unwrap();
        wait_traced(&fx);
        std::thread::sleep(Duration::from_millis(300));
        Command::new("kill")
            .args([signal, &ferry.id().to_string()])
            .status()
            .unwrap();
        let status = ferry.wait().unwrap();
        assert!(!status.success(), "{signal}: ferry exited {status}");
        assert_left_running(&mut fx);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_server_that_dies_mid_round_leaves_the_target_running() {
    need_root!();
    let tls = certs();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = common::ServerProcess::start(tls.path(), "mem", port);
    common::wait_for_server(addr, tls.path()).await;
    let mut fx = Fixture::start(&["--mib", "512", "--dirty-rate", "20000"]);
    let mut c = connect(addr, tls.path());
    c.timeout = Duration::from_secs(5);
    let pid = fx.pid;
    let task = tokio::spawn(async move {
        dump(
            DumpOptions {
                policy: fixed_rounds(1000),
                compress: Compress::Off,
                ..DumpOptions::new(pid, Destination::Remote(c))
            },
            &mut |_| {},
        )
        .await
    });
    wait_traced(&fx);
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.kill();
    let e = task.await.unwrap().unwrap_err();
    eprintln!("page server killed: {e}");
    assert_left_running(&mut fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_exits_mid_round_is_a_clear_error() {
    need_root!();
    let mut fx = Fixture::start(&["--mib", "256", "--dirty-rate", "20000"]);
    let dir = tempfile::tempdir().unwrap();
    let pid = fx.pid;
    let path = dir.path().to_path_buf();
    let task = tokio::spawn(async move {
        dump(
            DumpOptions {
                track: Some(Backend::Checksum),
                policy: fixed_rounds(1000),
                ..DumpOptions::new(pid, Destination::ImagesDir(path))
            },
            &mut |_| {},
        )
        .await
    });
    wait_traced(&fx);
    tokio::time::sleep(Duration::from_millis(200)).await;
    fx.child.kill().unwrap();
    fx.child.wait().unwrap();
    let e = task.await.unwrap().unwrap_err();
    eprintln!("target gone: {e}");
}
