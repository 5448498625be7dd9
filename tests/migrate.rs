//! `ferry migrate` end to end on one host: the migrated process continues
//! from its exact state and the source is gone; and every failure before
//! the destination runs the process leaves the source running, unchanged;
//! and eight at once through one page server, which afterwards holds no
//! more descriptors or threads than before. Needs root.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry::dump::{Destination, DumpOptions};
use ferry::migrate::{migrate, LocalRestorer, MigrateError};
use ferry::policy::Policy;
use ferry_page_server::store::{mem::MemStore, Page, SessionStore, Store};
use ferry_page_server::tls::{server_config, TlsFiles};
use ferry_page_server::{Config, PageServer, Restorer};
use ferry_proto::batch::is_zero;

mod common;
use common::{
    certs, connect, gone, is_root, log_values, logging_fixture, proc_state, wait_for_log, Fixture,
};

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace, restore)");
            return;
        }
    };
}

struct Dest {
    addr: std::net::SocketAddr,
    store: Arc<dyn Store>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn destination(tls: &Path, restorer: Arc<dyn Restorer>) -> Dest {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut cfg = Config::new(
        server_config(&TlsFiles::server(tls)).unwrap(),
        store.clone(),
    );
    cfg.restorer = Some(restorer);
    let server = PageServer::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Dest {
        addr,
        store,
        stop,
        task,
    }
}

fn options(pid: i32, addr: std::net::SocketAddr, tls: &Path) -> DumpOptions {
    DumpOptions {
        policy: Policy {
            max_rounds: 3,
            ..Policy::default()
        },
        ..DumpOptions::new(pid, Destination::Remote(connect(addr, tls)))
    }
}

/// A 16 MiB single-threaded fixture logging to `dir/name`, ready (it
/// has detached its stdio once it logs).
fn single(dir: &Path, name: &str) -> (Fixture, std::path::PathBuf) {
    logging_fixture(dir, name, &["--mib", "16"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_process_continues_from_its_state_and_the_source_is_gone() {
    need_root!();
    let tls = certs();
    let dest = destination(tls.path(), Arc::new(LocalRestorer));
    let dir = tempfile::tempdir().unwrap();
    let (fx, log) = logging_fixture(dir.path(), "log", &["--mib", "64"]);
    std::thread::sleep(Duration::from_millis(300));
    let before = *log_values(&log).last().expect("the fixture logs");

    let report = migrate(options(fx.pid, dest.addr, tls.path()), &mut |_| {})
        .await
        .unwrap();
    let new = report.restored_pid;
    eprintln!(
        "migrated {} -> {new} in {} rounds, downtime {:?}",
        fx.pid,
        report.dump.rounds.len(),
        report.downtime
    );
    assert_ne!(new, fx.pid);
    assert!(gone(fx.pid), "the source is gone");
    let s = proc_state(new);
    assert!(s == 'S' || s == 'R', "the migrated process runs: {s}");

    // Its memory is the image: the region never changes without a
    // dirty rate, so it must read back exactly.
    let img = dest
        .store
        .open(report.dump.session)
        .unwrap()
        .flatten()
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::File::open(format!("/proc/{new}/mem")).unwrap();
        let mut page = vec![0u8; 4096];
        let mut checked = 0;
        for a in (fx.base..fx.base + fx.len).step_by(4096) {
            mem.read_exact_at(&mut page, a).unwrap();
            let ok = match img.page(a) {
                Some(Page::Data(d)) => d[..] == page[..],
                Some(Page::Zero) | None => is_zero(&page),
            };
            assert!(
                ok,
                "page {a:#x} of the restored process differs from the image"
            );
            checked += 1;
        }
        assert_eq!(checked, fx.len / 4096);
    }

    // It counts on from where it was, not from zero, and the log grows.
    std::thread::sleep(Duration::from_millis(500));
    let values = log_values(&log);
    let after = *values.last().unwrap();
    assert!(after > before, "the log grows: {before} -> {after}");
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "the counter never restarted: {values:?}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = dest.stop.send(());
    let _ = dest.task.await;
}

/// A destination that fails in a chosen way.
struct FailingRestorer(&'static str);

impl Restorer for FailingRestorer {
    fn restore(&self, _: &mut dyn SessionStore) -> Result<i32, String> {
        match self.0 {
            "hang" => {
                std::thread::sleep(Duration::from_secs(4));
                Err("too late".into())
            }
            reason => Err(reason.into()),
        }
    }
}

async fn assert_source_survives(fx: &mut Fixture, log: &Path) {
    for _ in 0..100 {
        if fx.tracer() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fx.tracer(), 0, "the source is not left traced");
    let s = fx.state();
    assert!(s == 'S' || s == 'R', "the source runs: {s}");
    // The first line comes 100 ms after start.
    let mut a = None;
    for _ in 0..50 {
        a = log_values(log).last().copied();
        if a.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = a.expect("the source logs");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = *log_values(log).last().unwrap();
    assert!(
        b > a,
        "the source keeps counting: {a} -> {b}, state {}, log {:?}, wchan {:?}",
        fx.state(),
        log_values(log),
        std::fs::read_to_string(format!("/proc/{}/wchan", fx.pid))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_restored_leave_the_source_running() {
    need_root!();
    let tls = certs();
    let dir = tempfile::tempdir().unwrap();

    // The destination cannot restore.
    let dest = destination(tls.path(), Arc::new(FailingRestorer("no room for it here")));
    let (mut fx, log) = single(dir.path(), "log1");
    let e = migrate(options(fx.pid, dest.addr, tls.path()), &mut |_| {})
        .await
        .unwrap_err();
    eprintln!("refused: {e}");
    assert!(
        matches!(e, MigrateError::Refused(ref r) if r.contains("no room")),
        "{e}"
    );
    assert_source_survives(&mut fx, &log).await;
    drop(fx);

    // The destination does not answer in time (the connection is as good as
    // cut after the final layer).
    let dest = destination(tls.path(), Arc::new(FailingRestorer("hang")));
    let (mut fx, log) = single(dir.path(), "log2");
    let mut opts = options(fx.pid, dest.addr, tls.path());
    if let Destination::Remote(c) = &mut opts.dest {
        c.timeout = Duration::from_secs(1);
    }
    let e = migrate(opts, &mut |_| {}).await.unwrap_err();
    eprintln!("timeout: {e}");
    assert!(e.to_string().contains("no answer"), "{e}");
    assert_source_survives(&mut fx, &log).await;
    drop(fx);

    // A file the process maps is gone on the destination: the pre-flight
    // check refuses it by name in the first round, before any freeze.
    let dest = destination(tls.path(), Arc::new(LocalRestorer));
    let exe = dir.path().join("fixture-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_ferry-fixture"), &exe).unwrap();
    let log = dir.path().join("log3");
    let mut fx = Fixture::start_at(
        &exe,
        &[
            "--mib",
            "16",
            "--single-thread",
            "--log",
            log.to_str().unwrap(),
        ],
    );
    wait_for_log(&log);
    std::fs::remove_file(&exe).unwrap();
    let e = migrate(options(fx.pid, dest.addr, tls.path()), &mut |_| {})
        .await
        .unwrap_err();
    eprintln!("missing file: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains("pre-flight") && msg.contains("fixture-copy"),
        "{e}"
    );
    assert_source_survives(&mut fx, &log).await;
    drop(fx);

    // A page server that does not restore is refused at the handshake.
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let plain = common::Server::start(tls.path(), store);
    let (mut fx, log) = single(dir.path(), "log4");
    let e = migrate(options(fx.pid, plain.addr, tls.path()), &mut |_| {})
        .await
        .unwrap_err();
    eprintln!("no restore: {e}");
    assert!(e.to_string().contains("--restore"), "{e}");
    assert_source_survives(&mut fx, &log).await;
    plain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_restore_cannot_do_is_refused_before_anything_is_frozen() {
    need_root!();
    let tls = certs();
    let dest = destination(tls.path(), Arc::new(LocalRestorer));
    // The fixture's default mode reads commands from a pipe on stdin.
    let mut fx = Fixture::start(&["--mib", "8"]);
    let e = migrate(options(fx.pid, dest.addr, tls.path()), &mut |_| {})
        .await
        .unwrap_err();
    eprintln!("a pipe on stdin: {e}");
    assert!(matches!(e, MigrateError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("fd 0"), "{e}");
    assert_eq!(fx.tracer(), 0);
    let a: u64 = fx.cmd("counter").parse().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b: u64 = fx.cmd("counter").parse().unwrap();
    assert!(b > a);
    let _ = dest.stop.send(());
}

/// Open descriptors and threads of this process (the page server runs in
/// it).
fn own_fds_and_threads() -> (usize, usize) {
    let count = |d: &str| std::fs::read_dir(d).map_or(0, |r| r.count());
    (count("/proc/self/fd"), count("/proc/self/task"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_migrations_at_once_through_one_page_server() {
    need_root!();
    let tls = certs();
    let dest = destination(tls.path(), Arc::new(LocalRestorer));
    let dir = tempfile::tempdir().unwrap();
    let fxs: Vec<(Fixture, std::path::PathBuf)> = (0..8)
        .map(|i| single(dir.path(), &format!("load{i}")))
        .collect();
    let (fds0, threads0) = own_fds_and_threads();
    let mut set = tokio::task::JoinSet::new();
    for (i, (fx, _)) in fxs.iter().enumerate() {
        let opts = options(fx.pid, dest.addr, tls.path());
        set.spawn(async move {
            let mut quiet = |_: &ferry::dump::RoundReport| {};
            (i, migrate(opts, &mut quiet).await)
        });
    }
    let mut restored = vec![0; fxs.len()];
    while let Some(done) = set.join_next().await {
        let (i, r) = done.unwrap();
        let r = r.unwrap_or_else(|e| panic!("migration {i}: {e}"));
        eprintln!(
            "migration {i}: pid {} -> {} downtime {:?}",
            fxs[i].0.pid, r.restored_pid, r.downtime
        );
        restored[i] = r.restored_pid;
    }
    std::thread::sleep(Duration::from_millis(400));
    for (i, (fx, log)) in fxs.iter().enumerate() {
        assert!(gone(fx.pid), "source {i} is gone");
        let a = log_values(log);
        std::thread::sleep(Duration::from_millis(150));
        let b = log_values(log);
        assert!(b.len() > a.len(), "restored {i} logs on");
        assert!(b.windows(2).all(|w| w[0] <= w[1]), "restored {i} counts on");
    }
    for &pid in &restored {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // Sessions end: their images go, and the page server holds no more
    // descriptors or threads than before the eight came.
    let store = dest.store.clone();
    for s in store.list().unwrap() {
        store.remove(s.id).unwrap();
    }
    assert!(store.list().unwrap().is_empty());
    let mut now = own_fds_and_threads();
    for _ in 0..100 {
        if now.0 <= fds0 && now.1 <= threads0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = own_fds_and_threads();
    }
    assert!(
        now.0 <= fds0,
        "descriptors: {} before the migrations, {} after",
        fds0,
        now.0
    );
    // tokio keeps idle blocking-pool threads for 10 s: a little slack.
    assert!(
        now.1 <= threads0 + 2,
        "threads: {} before the migrations, {} after",
        threads0,
        now.1
    );
    let _ = dest.stop.send(());
}
