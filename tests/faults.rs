//! Fault injection on real migrations (issue 7): the page server killed
//! after each round, and the source `ferry migrate` killed at each step
//! and inside an injected syscall; the link cut at each step.
//! Whatever happens, nothing is lost and nothing runs twice: before the
//! commit the source runs on, neither stopped nor traced, counting from
//! where it was; after it, the destination runs the process and the source
//! is gone or stopped (the stop guard). A disk store a killed page server
//! leaves behind opens again and flattens to a consistent image of the
//! rounds it sealed. A disk store that fills mid-round ends that session
//! only, with "No space left on device" at the source, which runs on.
//!
//! Needs root (ptrace); skipped with a message otherwise.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    assert_source_runs, certs, fixed_rounds, free_port, is_root, log_values, logging_fixture,
    migrate_command, page_server_command, proc_state, wait_for_server, Fixture, ServerProcess,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use ferry::dump::{Destination, DumpOptions};
use ferry::migrate::{migrate, LocalRestorer, MigrateError};
use ferry_page_server::store::mem::MemStore;
use ferry_page_server::store::{disk::DiskStore, Store};
use ferry_page_server::tls::{server_config, TlsFiles};
use ferry_page_server::Config;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (ptrace)");
            return;
        }
    };
}

/// A single-threaded fixture that dirties pages (so there are several
/// rounds) and logs its counter, ready.
fn fixture(dir: &Path, name: &str) -> (Fixture, std::path::PathBuf) {
    logging_fixture(dir, name, &["--mib", "32", "--dirty-rate", "3000"])
}

/// `ferry page-server --restore` on a disk store, as a child process.
fn page_server(tls: &Path, store: &Path, port: u16) -> Child {
    page_server_command(tls, port)
        .args(["--restore", "--log", "warn", "--store"])
        .arg(format!("disk:{}", store.display()))
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_server_killed_after_any_round_loses_nothing() {
    need_root!();
    let tls = certs();
    let dir = tempfile::tempdir().unwrap();
    for kill_after in 0..3u32 {
        let store = dir.path().join(format!("store{kill_after}"));
        let port = free_port();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut server = page_server(tls.path(), &store, port);
        wait_for_server(addr, tls.path()).await;
        let (fx, log) = fixture(dir.path(), &format!("log{kill_after}"));
        let mut connect = common::connect(addr, tls.path());
        // A dead peer says nothing: the source notices by the silence.
        connect.timeout = Duration::from_secs(3);
        let opts = DumpOptions {
            // Never content: rounds go on until the page server is gone.
            policy: fixed_rounds(6),
            restore: true,
            ..DumpOptions::new(fx.pid, Destination::Remote(connect))
        };
        let server_pid = server.id() as i32;
        let e = migrate(opts, &mut |r| {
            if r.round == kill_after && !r.frozen {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(server_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        })
        .await
        .expect_err("the destination died mid-migration");
        let _ = server.wait();
        eprintln!("page server killed after round {kill_after}: {e}");
        assert_source_runs(&fx, &log, &format!("killed after round {kill_after}"));
        kill_restored(&log);

        // What the dead server kept opens and flattens: every sealed layer
        // is whole, an unsealed one is gone.
        let disk = DiskStore::open(&store).unwrap();
        let sessions = disk.list().unwrap();
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        let s = &sessions[0];
        assert!(
            s.layers > kill_after,
            "round {kill_after} was sealed before the kill: {s:?}"
        );
        let img = disk.open(s.id).unwrap().flatten().unwrap();
        assert!(img.pages() > 0);
    }
}

#[test]
fn the_source_ferry_killed_at_any_step_leaves_the_process_running() {
    need_root!();
    let tls = certs();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let port = free_port();
    let mut server = page_server(tls.path(), &store, port);
    std::thread::sleep(Duration::from_millis(500));
    // Killed after the live display shows this many lines of rounds: 0 is
    // before any round ends (arming, round 0 in flight), later ones between
    // rounds and, with luck, while the process is frozen.
    for lines in [0usize, 1, 2, 3] {
        let (fx, log) = fixture(dir.path(), &format!("src{lines}"));
        let mut ferry = migrate_command(fx.pid, &format!("127.0.0.1:{port}"), tls.path())
            .args(["--max-rounds", "8", "--max-downtime", "0", "--log", "warn"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(ferry.stdout.take().unwrap());
        let mut seen = 0;
        if lines == 0 {
            std::thread::sleep(Duration::from_millis(30));
        } else {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if line.contains("running") || line.contains("frozen") {
                    seen += 1;
                    if seen == lines {
                        break;
                    }
                }
            }
        }
        let _ = ferry.kill();
        let _ = ferry.wait();
        let what = format!("ferry killed after {seen} round lines");
        for _ in 0..100 {
            if fx.tracer() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let state = proc_state(fx.pid);
        eprintln!("{what}: the source is {state}");
        match state {
            // The migration had finished, or had been committed (the stop
            // guard keeps the source stopped): the destination runs it, and
            // it alone writes the log.
            '?' | 'Z' | 'X' | 'T' => assert_log_grows_in_order(&log, &what),
            _ => assert_source_runs(&fx, &log, &what),
        }
        kill_restored(&log);
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// `ferry migrate` SIGKILLed inside an injected syscall, at each point of
/// an injection (registers already replaced, the syscall entered, the
/// syscall returned), in the running process (arming the tracker), in
/// the frozen one with its signals blocked (reading its state), and in the
/// middle of a batch of injected calls (the state's signal actions): the thread
/// must resume where it was, with its own registers and signal mask, and
/// the process count on as if ferry had never been there.
#[test]
fn the_source_ferry_killed_inside_an_injected_syscall_leaves_the_process_running() {
    need_root!();
    let tls = certs();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Killed when dropped, also when an assertion fails.
    let _server = ServerProcess(page_server(tls.path(), &dir.path().join("store"), port));
    std::thread::sleep(Duration::from_millis(500));
    for point in [
        "kill-before-entry",
        "kill-at-entry",
        "kill-at-exit",
        "kill-at-entry-frozen",
        "kill-in-batch",
    ] {
        let (fx, log) = fixture(dir.path(), point);
        let mask = sigblk(fx.pid);
        let status = migrate_command(fx.pid, &format!("127.0.0.1:{port}"), tls.path())
            .args(["--max-rounds", "2", "--log", "warn"])
            .env("FERRY_FAILPOINT", format!("ptrace:{point}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{point}: ferry was to die there ({status})"
        );
        let what = format!("ferry killed at {point}");
        assert_source_runs(&fx, &log, &what);
        assert_eq!(sigblk(fx.pid), mask, "{what}: the signal mask changed");
        kill_restored(&log);
    }
}

/// A UDP relay between a QUIC client and a page server on loopback that
/// can cut the link: from then on it drops every datagram both ways, as a
/// pulled cable would (no FIN, no reset, no ICMP: silence).
struct Relay {
    addr: std::net::SocketAddr,
    /// Datagrams relayed from the client; the link is cut once this
    /// reaches `cut_at`.
    sent: Arc<AtomicU64>,
    cut_at: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(server: std::net::SocketAddr) -> Relay {
        let front = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(server).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let (sent, cut_at) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(u64::MAX)),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let client = Arc::new(std::sync::Mutex::new(None));
        let open = {
            let (sent, cut_at) = (sent.clone(), cut_at.clone());
            move || sent.load(SeqCst) < cut_at.load(SeqCst)
        };
        let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let up = {
            let (stop, client, sent, open) =
                (stop.clone(), client.clone(), sent.clone(), open.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(SeqCst) {
                    if let Ok((n, from)) = front.recv_from(&mut buf) {
                        *client.lock().unwrap() = Some(from);
                        if open() {
                            sent.fetch_add(1, SeqCst);
                            let _ = back.send(&buf[..n]);
                        }
                    }
                }
            })
        };
        let down = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(SeqCst) {
                    if let Ok(n) = back2.recv(&mut buf) {
                        let to = *client.lock().unwrap();
                        if let (true, Some(to)) = (open(), to) {
                            let _ = front2.send_to(&buf[..n], to);
                        }
                    }
                }
            })
        };
        Relay {
            addr,
            sent,
            cut_at,
            stop,
            threads: vec![up, down],
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The link between source and destination cut (silence both ways) at
/// points spread over a whole migration: during round 0, between rounds,
/// in the final round, around the commit, `Ready` and `Go`. Whatever the
/// point, exactly one copy counts on: the source, resumed and untraced;
/// or, if the cut fell after `Go` reached the destination, the
/// destination's copy, with the source killed (the answer came through) or
/// left stopped, in doubt, as `ferry migrate` says. Nothing is left behind on the destination: a
/// restored process it holds without `Go` is killed, and the page server
/// goes on serving: a last migration through it, without the relay,
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_at_any_step_leaves_exactly_one_copy_running() {
    need_root!();
    let tls = certs();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut cfg = Config::new(server_config(&TlsFiles::server(tls.path())).unwrap(), store);
    cfg.restorer = Some(Arc::new(LocalRestorer));
    cfg.go_timeout = Duration::from_secs(2);
    cfg.idle_timeout = Duration::from_secs(3);
    let server = common::Server::start_with(cfg);
    let opts = |pid, addr| {
        let mut connect = common::connect(addr, tls.path());
        connect.timeout = Duration::from_secs(3);
        DumpOptions {
            policy: fixed_rounds(3),
            restore: true,
            ..DumpOptions::new(pid, Destination::Remote(connect))
        }
    };

    // A whole migration through the relay: how many datagrams it takes.
    let (fx, _) = fixture(dir.path(), "whole");
    let relay = Relay::start(server.addr);
    let mut frozen_at = 0;
    let r = migrate(opts(fx.pid, relay.addr), &mut |r| {
        if r.frozen {
            frozen_at = relay.sent.load(SeqCst);
        }
    })
    .await
    .unwrap();
    let total = relay.sent.load(SeqCst);
    drop(relay);
    let tail = total - frozen_at;
    eprintln!("a whole migration: {total} datagrams from the source, {tail} after the final round");
    let _ = kill(Pid::from_raw(r.restored_pid), Signal::SIGKILL);
    drop(fx);

    // Cut points: a share of the datagrams before the final round (round 0
    // and the rounds after it), or a number of datagrams after the final
    // round's report (state, commit, Ready, Go, Restored: the protocol's
    // end, whose length varies least from run to run).
    let mut points: Vec<(String, Option<u64>, u64)> = [2u64, 30, 60, 95]
        .iter()
        .map(|&p| {
            (
                format!("{p}% of the rounds"),
                Some((frozen_at * p / 100).max(1)),
                0,
            )
        })
        .collect();
    for k in 0..tail {
        points.push((format!("{k} datagrams after the final round"), None, k));
    }
    let mut outcomes = Vec::new();
    for (i, (point, before, after)) in points.into_iter().enumerate() {
        let (fx, log) = fixture(dir.path(), &format!("cut{i}"));
        let relay = Relay::start(server.addr);
        if let Some(n) = before {
            relay.cut_at.store(n, SeqCst);
        }
        let (sent, cut_at) = (relay.sent.clone(), relay.cut_at.clone());
        let result = migrate(opts(fx.pid, relay.addr), &mut |r| {
            if r.frozen && before.is_none() {
                cut_at.store(sent.load(SeqCst) + after, SeqCst);
            }
        })
        .await;
        let what = format!("link cut at {point}");
        drop(relay);
        // A copy the destination holds without Go dies after its Go
        // timeout (2 s); one released by Go runs on.
        let doubt = matches!(result, Err(MigrateError::InDoubt(_)));
        let mut copies = copies_of(&log, fx.pid);
        for _ in 0..100 {
            if doubt || copies.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            copies = copies_of(&log, fx.pid);
        }
        match &result {
            Ok(r) => {
                // Everything the migration needed got through before the
                // cut: the destination runs it, the source is gone.
                assert!(
                    matches!(proc_state(fx.pid), 'Z' | 'X' | '?'),
                    "{what}: migrated, and the source is {}",
                    proc_state(fx.pid)
                );
                assert_eq!(copies, [r.restored_pid], "{what}: one copy");
                assert_log_grows_in_order(&log, &what);
                outcomes.push(format!("{point}: migrated"));
            }
            Err(MigrateError::InDoubt(d)) => {
                // Go went out, and the source waits stopped for a person to
                // decide. Go may have been cut on its way: then the
                // destination drops the copy it holds after its Go timeout.
                assert_eq!(
                    proc_state(fx.pid),
                    'T',
                    "{what}: the source in doubt is stopped"
                );
                let held = |c: &[i32]| c.iter().any(|&p| matches!(proc_state(p), 't' | 'T'));
                for _ in 0..50 {
                    if !held(&copies) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    copies = copies_of(&log, fx.pid);
                }
                if copies.is_empty() {
                    // As the error says to: the page server, asked without
                    // the relay, says no copy runs there; resume the source.
                    let id = ferry_proto::SessionId::from_hex(&d.session).unwrap();
                    let c = common::connect(server.addr, tls.path());
                    let a = ferry::client::Client::query(&c, id).await.unwrap();
                    assert!(
                        matches!(a.fate, ferry_proto::session::Fate::Abandoned { .. }),
                        "{what}: in doubt, no copy, and the page server says {a:?}"
                    );
                    kill(Pid::from_raw(fx.pid), Signal::SIGCONT).unwrap();
                    assert_source_runs(&fx, &log, &what);
                    outcomes.push(format!(
                        "{point}: in doubt, Go never arrived; the source resumed by hand"
                    ));
                } else {
                    assert_eq!(
                        copies.len(),
                        1,
                        "{what}: one copy on the destination: {copies:?}"
                    );
                    assert_log_grows_in_order(&log, &what);
                    outcomes.push(format!("{point}: in doubt, the destination runs it"));
                }
            }
            Err(e) => {
                assert!(copies.is_empty(), "{what} ({e}): copies left: {copies:?}");
                assert_source_runs(&fx, &log, &what);
                outcomes.push(format!("{point}: the source runs on ({e})"));
            }
        }
        kill_restored(&log);
    }
    eprintln!("{}", outcomes.join("\n"));

    // The page server still serves, directly.
    let (fx, log) = fixture(dir.path(), "after");
    let r = migrate(opts(fx.pid, server.addr), &mut |_| {})
        .await
        .expect("a migration after the cuts");
    assert_log_grows_in_order(&log, "the process migrated after the cuts");
    let _ = kill(Pid::from_raw(r.restored_pid), Signal::SIGKILL);
    server.stop().await;
}

/// Processes other than `source` writing to `log` (restored copies).
fn copies_of(log: &Path, source: i32) -> Vec<i32> {
    let needle = log.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != source && proc_state(pid) != 'Z')
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

/// The `SigBlk` line of a process's status: its main thread's signal mask.
fn sigblk(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("SigBlk:"))
        .unwrap()
        .to_string()
}

/// One writer, counting on: the log grows and never goes back (two copies
/// of the process would interleave two counters).
fn assert_log_grows_in_order(log: &Path, what: &str) {
    let a = log_values(log).len();
    std::thread::sleep(Duration::from_millis(500));
    let values = log_values(log);
    assert!(values.len() > a, "{what}: nobody writes the log any more");
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "{what}: two writers, or a restart: {:?}",
        &values[values.len().saturating_sub(30)..]
    );
}

/// Kills restored copies of the fixture writing to `log` (children of
/// init, found by their command line).
fn kill_restored(log: &Path) {
    let needle = log.to_str().unwrap();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A tmpfs of `mib` MiB mounted at `dir` for this test, unmounted (lazily,
/// so an open file cannot keep it) when dropped, on failure too.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, mib: u64) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700")])
            .arg(format!("ferry-test-{}", std::process::id()))
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", dir.display());
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_store_fails_the_session_and_nothing_else() {
    use ferry::migrate::LocalRestorer;
    use ferry_page_server::tls::{server_config, TlsFiles};
    use ferry_page_server::{Config, PageServer};
    use std::sync::Arc;

    need_root!();
    let tls = certs();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    // Round 0 of the 16 MiB fixture fits; the rounds after it, each
    // stored as a layer of its own, fill the rest mid-round. The fixture
    // dirties fast enough (80 MB/s) that no round comes back empty: an
    // empty round would fit the zero downtime asked and end the rounds.
    let _disk = SmallDisk::mount(&root, 18);
    let disk = Arc::new(DiskStore::open(&root).unwrap());
    let store: Arc<dyn ferry_page_server::store::Store> = disk.clone();
    let mut cfg = Config::new(server_config(&TlsFiles::server(tls.path())).unwrap(), store);
    cfg.restorer = Some(Arc::new(LocalRestorer));
    let server = PageServer::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let (fx, log) = logging_fixture(
        dir.path(),
        "full",
        &["--mib", "16", "--dirty-rate", "20000"],
    );
    let opts = |pid, max_rounds| DumpOptions {
        policy: fixed_rounds(max_rounds),
        restore: true,
        ..DumpOptions::new(pid, Destination::Remote(common::connect(addr, tls.path())))
    };
    let mut rounds = 0;
    let e = migrate(opts(fx.pid, 400), &mut |_| rounds += 1)
        .await
        .expect_err("an 18 MiB store cannot take 400 rounds of a 16 MiB process");
    eprintln!("after {rounds} rounds: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains("No space left on device") && msg.contains(root.to_str().unwrap()),
        "the source is told the disk is full, and where: {msg}"
    );
    assert!(rounds >= 1, "round 0 fitted");
    assert_source_runs(&fx, &log, "disk full");

    // What was sealed before the disk filled is whole and readable; the
    // round that did not fit left nothing behind.
    let sessions = disk.list().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let s = &sessions[0];
    assert!(s.layers >= 1, "{s:?}");
    assert!(!s.has_state, "{s:?}");
    let layer_dirs = std::fs::read_dir(root.join(s.id.to_hex()))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("layer-"))
        })
        .count();
    assert_eq!(layer_dirs, s.layers as usize, "the unsealed layer is gone");
    let img = disk.open(s.id).unwrap().flatten().unwrap();
    // Page i of the fixture's region holds i in its first 8 bytes (a hole
    // the dirty writer hit holds 0 there).
    let mut data = 0;
    for i in 0..fx.len / 4096 {
        if let Some(ferry_page_server::store::Page::Data(d)) = img.page(fx.base + i * 4096) {
            let first = u64::from_le_bytes(d[..8].try_into().unwrap());
            assert!(
                first == i || first == 0,
                "page {i} of the sealed image holds {first}"
            );
            data += (first == i) as u64;
        }
    }
    assert!(
        data > fx.len / 4096 / 2,
        "the region is in the image: {data} pages"
    );
    let reopened = DiskStore::open(&root).unwrap();
    let again = reopened.list().unwrap();
    assert_eq!(
        again[0].layers, s.layers,
        "a fresh look sees the same layers"
    );
    drop(reopened);
    drop(fx);

    // Space freed, the same page server takes and restores the next one.
    disk.remove(s.id).unwrap();
    let (fx2, log2) = logging_fixture(dir.path(), "after", &["--mib", "4"]);
    let r = migrate(opts(fx2.pid, 3), &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("after space was freed: {e}"));
    eprintln!("after space was freed: {} -> {}", fx2.pid, r.restored_pid);
    assert_log_grows_in_order(&log2, "the restored process");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.restored_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = stop.send(());
    let _ = task.await;
}
