//! The two-phase end of a migration (issue 7), on real migrations through
//! a real `ferry page-server --restore`: the destination holds the restored
//! process stopped until the source's `Go`, so however the end goes wrong,
//! one copy of the process runs — never two — and if none runs, someone
//! says so. Each case is made by a test-only failpoint (see
//! src/failpoint.rs): (a) the source ferry SIGKILLed right after `Ready`;
//! (b) `Restored` lost after `Go`; (c) a destination slower than the
//! source's answer timeout.
//!
//! Copies are counted as processes whose command line names the fixture's
//! log (a restored copy keeps the source's), not counting zombies.
//!
//! Needs root (ptrace, restore); skipped with a message otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    assert_source_runs, certs, free_port, is_root, log_values, logging_fixture, wait_for_server,
    Fixture,
};
use ferry::dump::{Destination, DumpOptions};
use ferry::migrate::migrate;
use ferry::policy::Policy;

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace, restore)");
            return;
        }
    };
}

/// A single-threaded fixture that logs its counter, ready.
fn fixture(dir: &Path, name: &str) -> (Fixture, PathBuf) {
    logging_fixture(dir, name, &["--mib", "8"])
}

/// A test's destination: `ferry page-server --restore` on a free port,
/// logging to `slog` in a directory of the test. Fields drop in order:
/// the page server is killed first.
struct Dest {
    server: common::ServerProcess,
    slog: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    tls: tempfile::TempDir,
}

impl Dest {
    /// With a 2 s Go timeout and `failpoint` armed.
    fn start(failpoint: Option<&str>) -> Dest {
        Self::start_waiting(failpoint, 2)
    }

    /// With a Go timeout of `go_timeout` seconds.
    fn start_waiting(failpoint: Option<&str>, go_timeout: u64) -> Dest {
        let tls = certs();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let slog = dir.path().join("server.log");
        let mut c = common::page_server_command(tls.path(), port);
        c.args(["--restore", "--go-timeout"])
            .arg(go_timeout.to_string())
            .args(["--log", "info"])
            .stderr(std::fs::File::create(&slog).unwrap());
        if let Some(f) = failpoint {
            c.env(ferry::failpoint::VAR, f);
        }
        let server = common::ServerProcess(c.spawn().unwrap());
        Dest {
            server,
            slog,
            port,
            dir,
            tls,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    /// A client of it that waits `secs` for answers.
    fn connect(&self, secs: u64) -> ferry::client::Connect {
        let mut c = common::connect(self.addr(), self.tls.path());
        c.timeout = Duration::from_secs(secs);
        c
    }

    /// Its log so far.
    fn log(&self) -> String {
        text(&self.slog)
    }

    /// `ferry migrate` of `fx` (with more `flags`), SIGKILLed by its
    /// failpoint on `Ready`.
    fn migrate_dying_at_ready(&self, fx: &Fixture, flags: &[&str]) {
        let status =
            common::migrate_command(fx.pid, &format!("127.0.0.1:{}", self.port), self.tls.path())
                .args(["--max-rounds", "3", "--log", "warn"])
                .args(flags)
                .env(ferry::failpoint::VAR, "client:ready")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
        self.assert_died_at_ready(status);
    }

    fn assert_died_at_ready(&self, status: std::process::ExitStatus) {
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "ferry died at the failpoint: {status:?}\n{}",
            self.log()
        );
    }

    /// The page server gives up the held process for want of a `Go`, and
    /// says why.
    fn assert_abandoned(&self) {
        assert!(
            eventually(10, || self.log().contains("abandoned")),
            "the page server abandons the held process: {}",
            self.log()
        );
        assert!(
            self.log().contains("no Go from the source"),
            "and says why: {}",
            self.log()
        );
    }

    /// (b): `ferry migrate`'s `Restored` is lost after `Go`; the source
    /// asks, hears "resumed" and kills itself, leaving exactly one copy,
    /// the destination's, whose pid this returns.
    async fn migrate_losing_restored(&self, fx: &Fixture, log: &Path, keep_pids: bool) -> i32 {
        let mut opts = options(fx, self.connect(5));
        opts.keep_pids = keep_pids;
        let report = migrate(opts, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("the query settles it: {e}\n{}", self.log()));
        let pid = report.restored_pid;
        assert!(self.log().contains("answered a query"), "{}", self.log());
        assert!(
            eventually(5, || matches!(common::proc_state(fx.pid), 'Z' | 'X' | '?')),
            "the source is killed"
        );
        let live = copies(log);
        assert_eq!(live.len(), 1, "exactly one copy: {live:?}");
        assert_eq!(live[0].0, pid, "the destination's");
        pid
    }
}

/// Live (not zombie) processes whose command line names `log`.
fn copies(log: &Path) -> Vec<(i32, char)> {
    let needle = log.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .map(|pid| (pid, common::proc_state(pid)))
        .filter(|&(_, s)| !matches!(s, 'Z' | 'X' | '?'))
        .collect()
}

fn kill_all(log: &Path) {
    for (pid, _) in copies(log) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The source is left stopped, untraced, and is the only copy.
fn assert_only_the_stopped_source(fx: &Fixture, log: &Path) {
    assert!(eventually(5, || fx.tracer() == 0));
    assert_eq!(copies(log), vec![(fx.pid, 'T')], "only the stopped source");
}

/// It alone writes the log, counting on from the source's last value.
fn assert_one_writer(log: &Path) {
    let a = log_values(log).len();
    std::thread::sleep(Duration::from_millis(500));
    let values = log_values(log);
    assert!(values.len() > a, "the destination's copy counts on");
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "one writer: {:?}",
        &values[values.len().saturating_sub(20)..]
    );
}

/// What the message leaves to the operator: resume the source by hand.
fn resume(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
}

/// Waits until `what` holds, up to `secs`.
fn eventually(secs: u64, mut what: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    what()
}

fn options(fx: &Fixture, c: ferry::client::Connect) -> DumpOptions {
    DumpOptions {
        policy: Policy {
            max_rounds: 3,
            ..Policy::default()
        },
        restore: true,
        ..DumpOptions::new(fx.pid, Destination::Remote(c))
    }
}

fn text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The page server's lines about the end of sessions, for the record.
fn show(p: &Path) {
    for l in text(p).lines().filter(|l| {
        ["held", "released", "abandoned", "query", "failed"]
            .iter()
            .any(|w| l.contains(w))
    }) {
        eprintln!("  page server: {l}");
    }
}

/// (a) `Go` never arrives: the source ferry dies right after `Ready`. The
/// destination kills what it held once its Go timeout passes; the source
/// is left stopped by the stop guard — no copy runs, and the page server's
/// log says the session was abandoned, so resuming the source
/// (`kill -CONT`) is safe, and it counts on from where it was.
#[test]
fn go_that_never_comes_leaves_no_copy_on_the_destination() {
    need_root!();
    let d = Dest::start(None);
    std::thread::sleep(Duration::from_millis(500));
    let (fx, log) = fixture(d.dir.path(), "a.log");
    d.migrate_dying_at_ready(&fx, &[]);
    d.assert_abandoned();
    // Only the source is left, stopped by the guard, untraced: zero
    // copies run, and the page server's log says so.
    assert_only_the_stopped_source(&fx, &log);
    let n = log_values(&log).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(log_values(&log).len(), n, "nobody writes the log");
    resume(fx.pid);
    assert_source_runs(&fx, &log, "resumed by hand");
    assert_eq!(copies(&log).len(), 1, "one copy");
    show(&d.slog);
    kill_all(&log);
}

/// (b) The connection drops after `Go`, before `Restored` (the page server
/// releases the process, then loses the answer): the source asks on a new
/// connection, hears "resumed", and kills itself — exactly one copy runs,
/// the destination's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_restored_is_asked_for_and_one_copy_runs() {
    need_root!();
    let d = Dest::start(Some("page-server:restored-lost"));
    wait_for_server(d.addr(), d.tls.path()).await;
    let (fx, log) = fixture(d.dir.path(), "b.log");
    d.migrate_losing_restored(&fx, &log, false).await;
    assert_one_writer(&log);
    show(&d.slog);
    kill_all(&log);
}

/// (c) The destination takes longer to restore than the source waits for
/// an answer: the source gives up and runs on; the destination, done at
/// last, holds the process for a `Go` that never comes and kills it — no
/// duplicate at any moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_slower_than_the_source_never_runs_a_second_copy() {
    need_root!();
    let d = Dest::start(Some("page-server:slow-prepare"));
    wait_for_server(d.addr(), d.tls.path()).await;
    let (fx, log) = fixture(d.dir.path(), "c.log");
    let e = migrate(options(&fx, d.connect(2)), &mut |_| {})
        .await
        .expect_err("the source stops waiting");
    eprintln!("source: {e}");
    assert!(e.to_string().contains("the source runs on"), "{e}");
    assert_source_runs(&fx, &log, "after its timeout");
    // Through the destination's 5 s restore and its 2 s Go timeout, the
    // source is the only copy that ever runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline && !d.log().contains("abandoned") {
        let live = copies(&log);
        assert!(
            live.iter()
                .all(|&(p, s)| p == fx.pid || matches!(s, 't' | 'T')),
            "a second copy runs: {live:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.log().contains("abandoned"), "{}", d.log());
    // Pids only: a second read of the state may find it running where the
    // first found it sleeping (CI saw `S` against `R`); whether it runs is
    // what the next line checks.
    let pids: Vec<i32> = copies(&log).iter().map(|&(p, _)| p).collect();
    assert_eq!(pids, vec![fx.pid], "only the source");
    assert_source_runs(&fx, &log, "after the destination gave up");
    show(&d.slog);
    kill_all(&log);

    // A session it never saw is unknown to it, and it says so honestly.
    let c = common::connect(d.addr(), d.tls.path());
    let a = ferry::client::Client::query(&c, ferry_proto::SessionId([7; 16]))
        .await
        .unwrap();
    assert_eq!(a.fate, ferry_proto::session::Fate::Unknown);
    assert!(a.note.contains("never seen"), "{a:?}");
    assert!(a.uptime >= Duration::from_secs(5), "{a:?}");
}

/// The page server killed while it holds a prepared process (the source's
/// ferry died after `Ready`, so no `Go` comes): the held process dies with
/// it (`PTRACE_O_EXITKILL`) instead of running unasked; only the stopped
/// source is left.
#[test]
fn a_page_server_killed_while_holding_takes_the_held_process_along() {
    need_root!();
    let d = Dest::start_waiting(None, 60);
    std::thread::sleep(Duration::from_millis(500));
    let (fx, log) = fixture(d.dir.path(), "d.log");
    d.migrate_dying_at_ready(&fx, &[]);
    assert!(d.log().contains("restored and held"), "{}", d.log());
    // The source's tracer died with that ferry: it wakes and takes the
    // guard's pending SIGSTOP, running ('R') for that moment.
    let stopped =
        |c: &[(i32, char)]| c.len() == 2 && c.iter().all(|&(_, s)| matches!(s, 't' | 'T'));
    assert!(
        eventually(5, || stopped(&copies(&log))),
        "the stopped source and the held copy: {:?}",
        copies(&log)
    );
    let Dest { server, .. } = d;
    server.kill();
    assert!(
        eventually(5, || copies(&log).len() == 1),
        "the held copy died with the page server: {:?}",
        copies(&log)
    );
    assert_only_the_stopped_source(&fx, &log);
    kill_all(&log);
}

/// The last `NSpid:` entry of `pid` (its pid in its own pid namespace).
fn own_ns_pid(pid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    ferry::pidns::parse_nspid(&status)
        .and_then(|ids| ids.last().copied())
        .unwrap_or(-1)
}

fn pid_ns_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .map(|l| l.display().to_string())
        .unwrap_or_default()
}

/// Every child of `pid`'s threads (a page server's stubs and reapers).
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .flat_map(|t| {
                    std::fs::read_to_string(t.path().join("children"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|c| c.parse().ok())
                        .collect::<Vec<i32>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// (a) with `--keep-pids`: the tree is held in its new pid namespace (the
/// namespace's reaper a stopped stub beside it) and `Go` never comes. The
/// destination kills the held process and the reaper, and with it the
/// namespace; the source is left stopped as without `--keep-pids`.
#[test]
fn keep_pids_go_that_never_comes_leaves_no_copy_nor_namespace() {
    need_root!();
    let d = Dest::start(None);
    std::thread::sleep(Duration::from_millis(500));
    let (fx, log) = fixture(d.dir.path(), "ka.log");
    d.migrate_dying_at_ready(&fx, &["--keep-pids"]);
    assert!(d.log().contains("restored and held"), "{}", d.log());
    d.assert_abandoned();
    assert_only_the_stopped_source(&fx, &log);
    let server_pid = d.server.0.id() as i32;
    assert!(
        eventually(5, || children(server_pid).is_empty()),
        "no stub or reaper of the namespace is left: {:?}",
        children(server_pid)
    );
    resume(fx.pid);
    assert_source_runs(&fx, &log, "resumed by hand");
    show(&d.slog);
    kill_all(&log);
}

/// (b) with `--keep-pids`: `Restored` lost after `Go`; the source asks,
/// hears "resumed" and kills itself. Exactly one copy runs: the
/// destination's, in a pid namespace of its own with the source's pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_pids_a_lost_restored_is_asked_for_and_one_copy_runs() {
    need_root!();
    let d = Dest::start(Some("page-server:restored-lost"));
    wait_for_server(d.addr(), d.tls.path()).await;
    let (fx, log) = fixture(d.dir.path(), "kb.log");
    let (ns_pid, source_ns) = (own_ns_pid(fx.pid), pid_ns_of(fx.pid));
    let pid = d.migrate_losing_restored(&fx, &log, true).await;
    assert_eq!(own_ns_pid(pid), ns_pid, "it kept its pid");
    assert_ne!(pid_ns_of(pid), source_ns, "in a pid namespace of its own");
    assert_one_writer(&log);
    show(&d.slog);
    kill_all(&log);
}

/// `ferry workload` of 64 MiB rewriting 8192 random pages a second (so the
/// last round leaves pages for post-copy), logging to `log`; returned once
/// it logs.
fn busy_workload(log: &Path) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["workload", "--mib", "64", "--dirty-rate", "8192"])
        .args(["--pattern", "uniform", "--log-file"])
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(60, || ferry::workload::last_count(log).is_some()),
        "the workload never logs"
    );
    if let Ok(Some(st)) = child.try_wait() {
        panic!("the workload exited: {st}");
    }
    child
}

/// Live (not zombie) processes with exactly `cmdline`.
fn with_cmdline(cmdline: &[u8]) -> Vec<(i32, char)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok().as_deref() == Some(cmdline))
        .map(|p| (p, common::proc_state(p)))
        .filter(|&(_, s)| !matches!(s, 'Z' | 'X' | '?'))
        .collect()
}

fn kill_pid(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Whether the workload's log grows within half a second.
fn counts_on(log: &Path) -> bool {
    let n = ferry::workload::last_count(log);
    std::thread::sleep(Duration::from_millis(500));
    ferry::workload::last_count(log) > n
}

/// Only the source with `cmdline` is left, stopped: nobody runs the
/// workload until it is resumed by hand, and then it runs on.
fn assert_stopped_until_resumed(source: i32, cmdline: &[u8], log: &Path) {
    assert!(eventually(5, || with_cmdline(cmdline) == vec![(source, 'T')]));
    assert!(!counts_on(log), "nobody runs the workload");
    resume(source);
    assert!(counts_on(log), "the source runs on once resumed by hand");
}

/// (a) with `--post-copy`: the destination holds the process prepared —
/// its userfaultfd registered, its last pages still missing — and `Go`
/// never comes (the source ferry dies at `Ready`). The destination kills
/// it without ever letting it run; the source is left stopped, and
/// resumed by hand it runs on.
#[test]
fn post_copy_go_that_never_comes_leaves_no_copy_on_the_destination() {
    need_root!();
    let d = Dest::start(None);
    let log = d.dir.path().join("pa.log");
    let mut child = busy_workload(&log);
    let source = child.id() as i32;
    let cmdline = std::fs::read(format!("/proc/{source}/cmdline")).unwrap();
    let status = common::migrate_command(source, &format!("127.0.0.1:{}", d.port), d.tls.path())
        .arg("--post-copy")
        .args(["--max-rounds", "2", "--log", "warn"])
        .env(ferry::failpoint::VAR, "client:ready")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    d.assert_died_at_ready(status);
    assert!(d.log().contains("restored and held"), "{}", d.log());
    d.assert_abandoned();
    assert!(
        !d.log().contains("released: the process runs"),
        "{}",
        d.log()
    );
    assert_stopped_until_resumed(source, &cmdline, &log);
    assert_eq!(with_cmdline(&cmdline).len(), 1, "one copy");
    show(&d.slog);
    kill_pid(source);
    let _ = child.wait();
}

/// (b) with `--post-copy`: the page server releases the process on `Go`
/// and the answer is lost with the connection, so the pages it still
/// misses can never come: the page server kills it and records that it
/// ran. The source asks, learns so, and — the destination's copy having
/// run — stays stopped for the operator, as post-copy leaves it after any
/// failure past the resume: no two copies at any moment, and one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_copy_a_lost_restored_is_asked_for_and_the_source_stays_stopped() {
    need_root!();
    let d = Dest::start(Some("page-server:restored-lost"));
    wait_for_server(d.addr(), d.tls.path()).await;
    let log = d.dir.path().join("pb.log");
    let mut child = busy_workload(&log);
    let source = child.id() as i32;
    let cmdline = std::fs::read(format!("/proc/{source}/cmdline")).unwrap();
    let opts = DumpOptions {
        policy: Policy {
            max_rounds: 2,
            ..Policy::default()
        },
        restore: true,
        ..DumpOptions::new(source, Destination::Remote(d.connect(5)))
    };
    let pc = ferry::postcopy::PostCopyOptions::default();
    let e = ferry::migrate::migrate_post_copy(opts, &pc, &mut |_| {})
        .await
        .expect_err("the destination's copy cannot get its pages");
    eprintln!("source: {e}");
    let ferry::migrate::MigrateError::PostCopy { pid, error, .. } = &e else {
        panic!("a post-copy failure after Go: {e}\n{}", d.log());
    };
    assert!(
        matches!(**error, ferry::postcopy::PostCopyError::LostAfterGo { .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("left stopped"), "{msg}");
    assert!(msg.contains(ferry_page_server::RAN_THEN_KILLED), "{msg}");
    assert!(d.log().contains("answered a query"), "{}", d.log());
    assert!(d.log().contains("released"), "{}", d.log());
    assert!(
        eventually(5, || matches!(common::proc_state(*pid), 'Z' | 'X' | '?')),
        "the destination's copy was killed"
    );
    assert_stopped_until_resumed(source, &cmdline, &log);
    show(&d.slog);
    kill_pid(source);
    let _ = child.wait();
}
