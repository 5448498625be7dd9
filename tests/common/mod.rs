//! Helpers shared by the end-to-end tests: certificates, an in-process page
//! server, and a page server as a child process that can be killed; the
//! `ferry page-server` and `ferry migrate` command lines; the fixture
//! started and logging; guards that kill a process or a whole tree; and
//! the checks several tests make the same way (an image against a
//! process's memory, a log that grows, a process gone).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry::client::{Client, Connect};
use ferry::synthetic::{Mix, Rng, Workload};
use ferry_page_server::store::{FlatImage, Page, Store};
use ferry_page_server::tls::{client_config, server_config, TlsFiles};
use ferry_page_server::{Config, PageServer};
use ferry_proto::session::SenderConfig;
use ferry_proto::SessionId;
use tokio::sync::oneshot;

pub fn certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ferry::certs::init(dir.path(), &[], false).unwrap();
    dir
}

/// A page server running in this process.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn start(tls: &Path, store: Arc<dyn Store>) -> Server {
        Self::start_with(Config::new(
            server_config(&TlsFiles::server(tls)).unwrap(),
            store,
        ))
    }

    /// On `127.0.0.1:0`, with any configuration (the plain-TCP one too).
    pub fn start_with(cfg: Config) -> Server {
        let server = PageServer::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

pub fn sender_config(id: u8, page_size: u32, resume: bool) -> SenderConfig {
    SenderConfig {
        session: SessionId([id; 16]),
        page_size,
        arch: "x86_64".into(),
        kernel: "test".into(),
        label: format!("test session {id}"),
        resume,
        features: Vec::new(),
        creds: Vec::new(),
        keep_pids_root: 0,
    }
}

/// A whole session of workload `w` (`mib` MiB, session id `id`) over
/// `client`: three layers, an empty state and a commit, stored; the store
/// then flattens to exactly the workload's pages.
pub async fn store_three_layers(
    mut client: Client,
    w: &mut Workload,
    id: u8,
    mib: u64,
    store: &dyn Store,
) {
    migrate_synthetic(&mut client, w, 3, id as u64).await;
    client
        .send_state(ferry_proto::pb::ProcessTree::default())
        .await
        .unwrap();
    let outcome = client.commit(false).await.unwrap();
    assert!(
        matches!(
            outcome,
            ferry::client::CommitOutcome::Stored { layers: 3, .. }
        ),
        "{outcome:?}"
    );
    let pages = ferry::synthetic::verify(store, SessionId([id; 16]), w).unwrap();
    assert_eq!(pages, mib * 256);
}

/// Streams a workload in `rounds` rounds (layer 0 whole, then 10 % dirty),
/// with small batches so every layer is spread over every stream.
pub async fn migrate_synthetic(client: &mut Client, w: &mut Workload, rounds: u32, seed: u64) {
    let mut rng = Rng::new(seed);
    for round in 0..rounds {
        let addrs = if round == 0 {
            w.all_pages()
        } else {
            w.dirty(10, Mix::TYPICAL, &mut rng)
        };
        let stats = client
            .send_layer(w.vmas.clone(), w.batches(&addrs, 32))
            .await
            .unwrap();
        assert!(stats.batches >= 4, "layer spread over streams");
        assert!(stats.zero_pages > 0, "zero runs in every layer");
    }
}

pub fn connect(addr: SocketAddr, tls: &Path) -> Connect {
    let mut c = Connect::new(addr, client_config(&TlsFiles::client(tls)).unwrap());
    c.streams = 4;
    c.timeout = Duration::from_secs(20);
    c
}

/// `ferry page-server` as a child process, killed when dropped.
pub struct ServerProcess(pub Child);

impl ServerProcess {
    pub fn start(tls: &Path, store: &str, port: u16) -> ServerProcess {
        let child = page_server_command(tls, port)
            .args(["--store", store])
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        ServerProcess(child)
    }

    pub fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects once the page server is up.
pub async fn connect_retrying(c: Connect, s: SenderConfig) -> Client {
    for _ in 0..100 {
        if let Ok(client) = Client::connect(c.clone(), s.clone()).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("page server did not come up");
}

/// Waits until a UDP port answers QUIC (the child page server is up), by
/// asking it about a session that does not exist: a `Query` opens no
/// session, so a try that timed out on a loaded machine leaves nothing
/// behind (a probe session would, until its idle timeout, and the next
/// probe with its id was "in use by another connection" every time). Any
/// answer past the handshake counts, a refusal too (a page server without
/// `--restore` takes no queries).
pub async fn wait_for_server(addr: SocketAddr, tls: &Path) {
    use ferry::client::ClientError as E;
    for _ in 0..100 {
        let mut c = connect(addr, tls);
        c.timeout = Duration::from_millis(500);
        match Client::query(&c, ferry_proto::SessionId([0xee; 16])).await {
            Ok(_) => return,
            Err(E::Endpoint(_) | E::Connect { .. } | E::Connection { .. } | E::Timeout(_)) => {}
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("page server at {addr} did not come up");
}

/// The `ferry-fixture` workload, driven over its stdin (protocol in
/// tests/fixture/ferry_fixture.rs). Killed when dropped.
pub struct Fixture {
    pub child: Child,
    pub pid: i32,
    pub base: u64,
    pub len: u64,
    pub counter: u64,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Fixture {
    pub fn start(args: &[&str]) -> Fixture {
        Self::start_at(Path::new(env!("CARGO_BIN_EXE_ferry-fixture")), args)
    }

    /// The fixture from a copy of its binary at `exe`.
    pub fn start_at(exe: &Path, args: &[&str]) -> Fixture {
        use std::io::BufRead;
        // A binary copied just now may still be open for writing in a
        // child another test thread forked while the copy was open (until
        // that child execs): exec fails with ETXTBSY for that moment.
        let mut tries = 0;
        let mut child = loop {
            match Command::new(exe)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
            {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r.unwrap(),
            }
        };
        let stdin = child.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let field = |name: &str| -> &str {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        };
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        let pid = field("pid").parse().unwrap();
        let base = hex(field("base"));
        let len = field("len").parse().unwrap();
        let counter = hex(field("counter"));
        Fixture {
            child,
            pid,
            base,
            len,
            counter,
            stdin,
            stdout,
        }
    }

    /// Sends one command and returns the rest of its `ok` answer.
    pub fn cmd(&mut self, c: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let line = line.trim_end();
        match line.strip_prefix("ok") {
            Some(rest) => rest.trim().to_string(),
            None => panic!("fixture answered {line:?} to {c:?}"),
        }
    }

    /// The process state letter from /proc/PID/status ('R', 'S', 'T', 't', 'Z').
    pub fn state(&self) -> char {
        proc_state(self.pid)
    }

    pub fn tracer(&self) -> i32 {
        proc_field(self.pid, "TracerPid:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn proc_field(pid: i32, name: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
}

pub fn proc_state(pid: i32) -> char {
    proc_field(pid, "State:")
        .and_then(|v| v.chars().next())
        .unwrap_or('?')
}

pub fn is_root() -> bool {
    // The effective uid, the second column of the Uid: line.
    proc_field(std::process::id() as i32, "Uid:")
        .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

/// A kernel thread visible in `/proc` (`PF_KTHREAD` in the stat flags).
pub fn kernel_thread() -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // Field 9, counted after the parenthesised comm.
            let flags = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
            flags.is_some_and(|f| f & 0x0020_0000 != 0)
        })
}

/// The numbers a fixture or test program logged, one per line.
pub fn log_values(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Each thread's state letter and /proc/PID/task/TID/syscall, for a
/// failure message.
pub fn thread_states(pid: i32) -> String {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("process {pid} is gone");
    };
    dir.flatten()
        .map(|t| {
            let p = t.path();
            let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string();
            let sys = std::fs::read_to_string(p.join("syscall")).unwrap_or_default();
            format!(
                "[{} {state} syscall {}]",
                t.file_name().to_string_lossy(),
                sys.trim()
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The source runs as it did: not traced, not stopped, counting on.
pub fn assert_source_runs(fx: &Fixture, log: &Path, what: &str) {
    for _ in 0..200 {
        if fx.tracer() == 0 && matches!(fx.state(), 'S' | 'R') {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fx.tracer(), 0, "{what}: the source is left traced");
    let s = fx.state();
    assert!(s == 'S' || s == 'R', "{what}: the source is {s}");
    let a = *log_values(log).last().unwrap();
    // It logs every 100 ms; a loaded machine may starve it for a while,
    // a broken one never logs again.
    let mut values = log_values(log);
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(50));
        values = log_values(log);
        if *values.last().unwrap() > a {
            break;
        }
    }
    let b = *values.last().unwrap();
    assert!(
        b > a,
        "{what}: the source counts on ({a} -> {b}); its threads now: {}",
        thread_states(fx.pid)
    );
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "{what}: the counter never went back"
    );
}

/// Appends `page-server --listen LISTEN --tls TLS` to `cmd` (the ferry
/// binary, or a wrapper such as `ip netns exec NS ferry` or `prlimit …
/// ferry`), with stdin and stdout on /dev/null; callers add the other
/// flags, the environment and stderr.
pub fn page_server_args<'a>(cmd: &'a mut Command, listen: &str, tls: &Path) -> &'a mut Command {
    cmd.args(["page-server", "--listen", listen])
        .arg("--tls")
        .arg(tls)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
}

/// `ferry page-server --listen 127.0.0.1:PORT --tls TLS`, as
/// [`page_server_args`] makes it.
pub fn page_server_command(tls: &Path, port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    page_server_args(&mut cmd, &format!("127.0.0.1:{port}"), tls);
    cmd
}

/// Appends `migrate --pid PID --to TO --tls TLS` to `cmd` (the ferry
/// binary or a wrapper of it); callers add flags and stdio.
pub fn migrate_args<'a>(cmd: &'a mut Command, pid: i32, to: &str, tls: &Path) -> &'a mut Command {
    cmd.args(["migrate", "--pid", &pid.to_string(), "--to", to])
        .arg("--tls")
        .arg(tls)
}

/// `ferry migrate --pid PID --to TO --tls TLS`.
pub fn migrate_command(pid: i32, to: &str, tls: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    migrate_args(&mut cmd, pid, to, tls);
    cmd
}

/// The restored pid that `ferry migrate --json` printed; fails the test
/// with its stderr if the migration failed.
pub fn restored_pid(out: &std::process::Output, what: &str) -> i32 {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: ferry migrate failed: {stderr}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["restored_pid"].as_i64().unwrap() as i32
}

/// What the migration tests ask: at most 3 rounds, the default policy
/// otherwise, the process restored by the page server at `c`.
pub fn restore_options(pid: i32, c: Connect) -> ferry::dump::DumpOptions {
    ferry::dump::DumpOptions {
        policy: ferry::policy::Policy {
            max_rounds: 3,
            ..ferry::policy::Policy::default()
        },
        restore: true,
        ..ferry::dump::DumpOptions::new(pid, ferry::dump::Destination::Remote(c))
    }
}

impl Server {
    /// A page server in this process that restores what it receives here
    /// (`LocalRestorer`), keeping images in `store`.
    pub fn start_restoring(tls: &Path, store: Arc<dyn Store>) -> Server {
        let mut cfg = Config::new(server_config(&TlsFiles::server(tls)).unwrap(), store);
        cfg.restorer = Some(Arc::new(ferry::migrate::LocalRestorer));
        Self::start_with(cfg)
    }
}

/// A process migrated by [`migrate_here`]: the page server it went to
/// (stop it at the end), its certificates, the report, and the restored
/// process, killed when this drops.
pub struct Migrated {
    pub server: Server,
    pub tls: tempfile::TempDir,
    pub report: ferry::migrate::MigrateReport,
    pub restored: KillOnDrop,
}

/// Migrates `pid` through a restoring page server of this test (QUIC,
/// mutual TLS, a `mem` store) and waits for the source to be gone.
pub async fn migrate_here(pid: i32) -> Migrated {
    let tls = certs();
    let server = Server::start_restoring(
        tls.path(),
        Arc::new(ferry_page_server::store::mem::MemStore::new()),
    );
    let report = ferry::migrate::migrate(
        restore_options(pid, connect(server.addr, tls.path())),
        &mut |_| {},
    )
    .await
    .unwrap();
    let restored = KillOnDrop(report.restored_pid);
    wait_until("the source to be gone", Duration::from_secs(10), || {
        gone(pid)
    });
    Migrated {
        server,
        tls,
        report,
        restored,
    }
}

/// Waits up to 2 s for a first value in `log`; whether one came.
pub fn log_started(log: &Path) -> bool {
    for _ in 0..200 {
        if !log_values(log).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The fixture with `args` then `--single-thread --log DIR/NAME`, once it
/// has logged its counter (panics if the log stays empty for 2 s).
pub fn logging_fixture(dir: &Path, name: &str, args: &[&str]) -> (Fixture, std::path::PathBuf) {
    logging_fixture_under(&[], dir, name, args)
}

/// [`logging_fixture`] under `setpriv SETPRIV… --` when SETPRIV is not
/// empty (setpriv execs it: the pid is the fixture's).
pub fn logging_fixture_under(
    setpriv: &[&str],
    dir: &Path,
    name: &str,
    args: &[&str],
) -> (Fixture, std::path::PathBuf) {
    let log = dir.join(name);
    let exe = env!("CARGO_BIN_EXE_ferry-fixture");
    let mut all = setpriv.to_vec();
    if !setpriv.is_empty() {
        all.extend(["--", exe]);
    }
    all.extend(args);
    all.extend(["--single-thread", "--log", log.to_str().unwrap()]);
    let fx = match setpriv {
        [] => Fixture::start(&all),
        _ => Fixture::start_at(Path::new("/usr/bin/setpriv"), &all),
    };
    wait_for_log(&log);
    (fx, log)
}

/// Waits up to 2 s for a first value in `log`; panics if none comes.
pub fn wait_for_log(log: &Path) {
    assert!(log_started(log), "{} stays empty", log.display());
}

/// The last value of `log` grows within `wait`: the process counts on.
pub fn assert_counts_on(log: &Path, wait: Duration, what: &str) {
    let n = *log_values(log).last().unwrap();
    std::thread::sleep(wait);
    assert!(*log_values(log).last().unwrap() > n, "{what}");
}

/// Kills process `pid` when dropped: a restored process, or a source a
/// failure left behind.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills every process of the tree under pid `.0` when dropped, leaves
/// first, then kills and reaps `.1`, the child this test started (if any).
pub struct KillTree(pub i32, pub Option<Child>);

impl Drop for KillTree {
    fn drop(&mut self) {
        if let Ok(t) = ferry::tree::discover(self.0) {
            for s in t.iter().rev() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(s.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Some(c) = self.1.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// `cmd` with nothing inherited from the harness but 0-2 (cargo's
/// jobserver pipe, say, would be a pipe to a process outside the tree,
/// which a migration refuses).
pub fn only_stdio(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}

/// Starts `cmd` with stdin, stdout and stderr on /dev/null and nothing
/// else inherited; its whole tree is killed when dropped.
pub fn start_tree(cmd: &mut Command) -> KillTree {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = only_stdio(cmd).spawn().unwrap();
    KillTree(child.id() as i32, Some(child))
}

/// `python3 -c SCRIPT ARG` as [`start_tree`] starts it.
pub fn python_tree(script: &str, arg: impl AsRef<std::ffi::OsStr>) -> KillTree {
    start_tree(Command::new(python()).args(["-c", script]).arg(arg))
}

/// Process `pid` is gone: exited (a zombie not reaped yet) or reaped.
pub fn gone(pid: i32) -> bool {
    matches!(proc_state(pid), 'Z' | 'X' | '?')
}

/// Every page ferry sends of (stopped) process `pid` reads back from
/// `img` under the tag of its address space `space` (0: untagged): a hole
/// is zero for anonymous memory and the file's bytes for a private file
/// mapping. Returns the pages checked.
pub fn assert_image_holds_memory(pid: i32, space: u32, img: &FlatImage) -> u64 {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut page = vec![0u8; 4096];
    let mut checked = 0;
    for m in ferry::procfs::read_maps(pid)
        .unwrap()
        .iter()
        .filter(|m| ferry::track::sendable(m))
    {
        let file = if m.is_file() && !m.shared {
            m.path.as_ref().and_then(|p| std::fs::File::open(p).ok())
        } else {
            None
        };
        let mut a = m.start;
        while a < m.end {
            mem.read_exact_at(&mut page, a)
                .unwrap_or_else(|e| panic!("reading {a:#x} of {m:?}: {e}"));
            let ok = match img.page(ferry::tree::tag(space, a)) {
                Some(Page::Data(d)) => d[..] == page[..],
                Some(Page::Zero) => ferry_proto::batch::is_zero(&page),
                None => match &file {
                    Some(f) => {
                        let mut fp = vec![0u8; 4096];
                        let n = f.read_at(&mut fp, m.offset + (a - m.start)).unwrap_or(0);
                        fp[n..].fill(0);
                        fp == page
                    }
                    None => ferry_proto::batch::is_zero(&page),
                },
            };
            assert!(
                ok,
                "page {a:#x} of {:?} of process {pid} (space {space}) differs from the image",
                m.path
            );
            checked += 1;
            a += 4096;
        }
    }
    checked
}

/// A parent with a child that exited with status 3 and is not reaped yet;
/// once `argv[1]/reap` exists the parent reaps it and writes `pid
/// exit-code` (what `wait()` said) to `argv[1]/reaped`.
pub const ZOMBIE_PARENT: &str = r#"
import os, sys, time
d = sys.argv[1]
pid = os.fork()
if pid == 0:
    os._exit(3)
with open(d + '/info.tmp', 'w') as f:
    f.write('%d' % pid)
os.rename(d + '/info.tmp', d + '/info')
while not os.path.exists(d + '/reap'):
    time.sleep(0.02)
got, status = os.wait()
with open(d + '/reaped.tmp', 'w') as f:
    f.write('%d %d' % (got, os.waitstatus_to_exitcode(status)))
os.rename(d + '/reaped.tmp', d + '/reaped')
while True:
    time.sleep(1)
"#;

/// Polls `f` every 10 ms for up to `timeout`; panics naming `what` if it
/// never holds.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    for _ in 0..timeout.as_millis() / 10 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

/// A policy under which the rounds go on to `rounds` unless one comes
/// back empty: no downtime is short enough, no round too small, no growth
/// too large.
pub fn fixed_rounds(rounds: u32) -> ferry::policy::Policy {
    ferry::policy::Policy {
        max_downtime: Duration::ZERO,
        max_rounds: rounds,
        tiny_pages: 0,
        max_growth: 1000.0,
    }
}
