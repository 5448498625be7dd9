//! Sockets across a migration, end to end through the real `ferry` binary:
//! a TCP listener and an established connection with unread bytes both
//! ways, redis-server with a client writing to it, UNIX sockets, and the
//! refusals. Needs root (network namespaces, TCP repair).
//!
//! **Why three namespaces.** A connection's 4-tuple cannot exist twice in
//! one namespace while the source still holds it, and the destination
//! must own the server's address. So the server runs in namespace A, the
//! destination page server in B, and both have the server address
//! 10.77.0.1 on a veth toward the client's namespace C (addresses are per
//! namespace, so parallel tests need no unique addresses, only unique
//! namespace names). C reaches 10.77.0.1 through A; the test cuts A's link
//! when the source is frozen (or before, when nothing flows) and points
//! C's route at B once the migration is done: for TCP this is a short
//! outage, which the connection survives with retransmissions. Cutting
//! A's link, rather than just rerouting, keeps the source host's kernel
//! from answering the client with RST once the source is gone. A and B
//! talk to each other (ferry to the page server) over their own veth,
//! 10.78.0.1 and 10.78.0.2.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::{certs, gone, is_root, KillOnDrop};

const SERVER: &str = "10.77.0.1";
const PAGE_SERVER: &str = "10.78.0.2:7070";

/// A child process killed (and reaped) when dropped.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ferry migrate --pid PID` (with `--json` if asked) through a
/// `ferry page-server --restore` started for it on loopback, gone when
/// this returns (a restored process does not depend on it).
fn migrate_on_this_host(pid: i32, json: bool) -> std::process::Output {
    let tls = certs();
    let port = common::free_port();
    let _ps = {
        let child = common::page_server_command(tls.path(), port)
            .args(["--restore", "--log", "warn"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        Kid(child)
    };
    let mut cmd = common::migrate_command(pid, &format!("127.0.0.1:{port}"), tls.path());
    if json {
        cmd.arg("--json");
    }
    cmd.args(["--log", "warn"]).output().unwrap()
}

/// Namespaces A (source), B (destination), C (client); removed on drop.
struct Net {
    a: String,
    b: String,
    c: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Net {
    fn make() -> Net {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            a: format!("ferry-sa-{tag}"),
            b: format!("ferry-sb-{tag}"),
            c: format!("ferry-sc-{tag}"),
        };
        let (a, b, c) = (net.a.as_str(), net.b.as_str(), net.c.as_str());
        let veth = |x: &str, xn: &str, y: &str, yn: &str| {
            ip(&[
                "link", "add", xn, "netns", x, "type", "veth", "peer", "name", yn, "netns", y,
            ])
        };
        let ok = ip(&["netns", "add", a])
            && ip(&["netns", "add", b])
            && ip(&["netns", "add", c])
            && veth(a, "ab", b, "ba")
            && veth(a, "ac", c, "ca")
            && veth(b, "bc", c, "cb")
            && ip(&["-n", a, "addr", "add", "10.78.0.1/24", "dev", "ab"])
            && ip(&["-n", b, "addr", "add", "10.78.0.2/24", "dev", "ba"])
            && ip(&["-n", a, "addr", "add", "10.77.0.1/32", "dev", "ac"])
            && ip(&["-n", b, "addr", "add", "10.77.0.1/32", "dev", "bc"])
            && ip(&["-n", c, "addr", "add", "10.77.0.2/32", "dev", "ca"])
            && [
                (a, "ab"),
                (a, "ac"),
                (b, "ba"),
                (b, "bc"),
                (c, "ca"),
                (c, "cb"),
            ]
            .iter()
            .chain(&[(a, "lo"), (b, "lo"), (c, "lo")])
            .all(|(ns, dev)| ip(&["-n", ns, "link", "set", dev, "up"]))
            && ip(&["-n", a, "route", "add", "10.77.0.2/32", "dev", "ac"])
            && ip(&["-n", b, "route", "add", "10.77.0.2/32", "dev", "bc"])
            && ip(&["-n", c, "route", "add", "10.77.0.1/32", "dev", "ca"])
            // IPv6 likewise (no duplicate address detection: usable at once).
            && ip(&["-n", a, "addr", "add", "fd77::1/128", "dev", "ac", "nodad"])
            && ip(&["-n", b, "addr", "add", "fd77::1/128", "dev", "bc", "nodad"])
            && ip(&["-n", c, "addr", "add", "fd77::2/128", "dev", "ca", "nodad"])
            // Neighbour discovery answers only for an interface's own
            // addresses (ARP answers for any): B must find fd77::2 on cb.
            && ip(&["-n", c, "addr", "add", "fd77::2/128", "dev", "cb", "nodad"])
            && ip(&["-n", a, "-6", "route", "add", "fd77::2/128", "dev", "ac"])
            && ip(&["-n", b, "-6", "route", "add", "fd77::2/128", "dev", "bc"])
            && ip(&["-n", c, "-6", "route", "add", "fd77::1/128", "dev", "ca"]);
        assert!(ok, "cannot build the namespaces (is iproute2 installed?)");
        net
    }

    /// `ip netns exec NS program args…`.
    fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c.env("RUST_BACKTRACE", "0");
        c
    }

    /// Cuts the source's side: nothing of C reaches A any more, and A's
    /// kernel cannot answer anything with RST.
    fn cut_source(&self) {
        assert!(ip(&["-n", &self.a, "link", "set", "ac", "down"]));
    }

    /// The server address now lives in B.
    fn route_to_destination(&self) {
        assert!(ip(&[
            "-n",
            &self.c,
            "route",
            "replace",
            "10.77.0.1/32",
            "dev",
            "cb"
        ]));
        assert!(ip(&[
            "-n",
            &self.c,
            "-6",
            "route",
            "replace",
            "fd77::1/128",
            "dev",
            "cb"
        ]));
    }

    fn page_server(&self, tls: &Path) -> Kid {
        let mut ferry = Net::exec(&self.b, env!("CARGO_BIN_EXE_ferry"));
        let child = common::page_server_args(&mut ferry, PAGE_SERVER, tls)
            .args(["--restore", "--log", "warn"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        Kid(child)
    }

    /// `ferry migrate` of `pid` from A to B: its output.
    fn migrate(&self, pid: i32, tls: &Path, extra: &[&str]) -> std::process::Output {
        let mut ferry = Net::exec(&self.a, env!("CARGO_BIN_EXE_ferry"));
        common::migrate_args(&mut ferry, pid, PAGE_SERVER, tls)
            .args(["--json", "--log", "warn"])
            .args(extra)
            .output()
            .unwrap()
    }

    /// The restored pid of a successful migration.
    fn migrated(&self, pid: i32, tls: &Path, extra: &[&str]) -> i32 {
        let out = self.migrate(pid, tls, extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ferry migrate failed: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!(
            "migrated {pid} -> {} downtime {} ms",
            json["restored_pid"], json["downtime_ms"]
        );
        json["restored_pid"].as_i64().unwrap() as i32
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.c] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits for a line of `path` starting with `prefix`; the rest of it.
fn wait_line(path: &Path, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
            return l.trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no {prefix:?} in {}: {text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `python3 -c SCRIPT`, `python3` being a command for it here or in a
/// namespace, detached from our stdio.
fn python(mut python3: Command, script: &str) -> Kid {
    let child = python3
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Kid(child)
}

/// [`python`] of a script that first logs `pid N` to `log`: it, and N.
fn python_saying_pid(python3: Command, script: &str, log: &Path) -> (Kid, i32) {
    let kid = python(python3, script);
    let pid: i32 = wait_line(log, "pid ").parse().unwrap();
    (kid, pid)
}

fn read_line(r: &mut BufReader<ChildStdout>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l.trim().to_string()
}

/// A python3 TCP server in namespace `ns`: one listener (backlog 7,
/// SO_REUSEADDR), one accepted connection (TCP_NODELAY) into which it
/// queues as many bytes as the client's small window leaves in its send
/// queue, then waits for `go` to exist before reading the client's 50 000
/// bytes, answering with their hash, and serving one more connection on
/// the listener. Reports to `log`.
fn tcp_server(ns: &str, log: &Path, go: &Path) -> (Kid, i32) {
    let script = format!(
        r#"
import hashlib, os, socket, time
os.closerange(3, 4096)
def say(s):
    with open({log:?}, "a") as f:
        f.write(s + "\n")
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("{SERVER}", 7000))
l.listen(7)
l6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
l6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
l6.bind(("fd77::1", 7001))
l6.listen(5)
l6.setblocking(False)
say("pid %d" % os.getpid())
c, _ = l.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
pattern = bytes(i % 251 for i in range(4 << 20))
c.setblocking(False)
sent = 0
try:
    while sent < len(pattern):
        sent += c.send(pattern[sent:sent + 65536])
except BlockingIOError:
    pass
c.setblocking(True)
say("queued %d" % sent)
while not os.path.exists({go:?}):
    time.sleep(0.01)
got = b""
while len(got) < 50000:
    b = c.recv(65536)
    if not b:
        break
    got += b
c.sendall(("got %d %s\n" % (len(got), hashlib.sha256(got).hexdigest())).encode())
say("answered")
say("options reuseaddr=%d reuseport6=%d v6only=%d nodelay=%d nonblocking6=%d" % (
    l.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
    l6.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
    l6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
    c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
    not l6.getblocking()))
d, _ = l.accept()
d.sendall(b"second\n")
l6.setblocking(True)
e, _ = l6.accept()
e.sendall(b"v6\n")
time.sleep(60)
"#,
        log = log.to_str().unwrap(),
        go = go.to_str().unwrap(),
    );
    python_saying_pid(Net::exec(ns, "python3"), &script, log)
}

/// The client, in namespace `ns`: a small receive buffer (so the server's
/// bytes wait in the server's send queue), 50 000 bytes sent at once (so
/// they wait in the server's receive queue); after `go N` on stdin it
/// reads the N queued bytes and the answer, then connects once more.
const TCP_CLIENT: &str = r#"
import hashlib, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.settimeout(30)
s.connect(("10.77.0.1", 7000))
data = bytes((i * 7) % 251 for i in range(50000))
s.sendall(data)
print("sent %s" % hashlib.sha256(data).hexdigest(), flush=True)
n = int(sys.stdin.readline().split()[1])
buf = b""
while not (len(buf) > n and buf.endswith(b"\n")):
    b = s.recv(65536)
    if not b:
        break
    buf += b
print("queued-bytes-intact", buf[:n] == bytes(i % 251 for i in range(n)), flush=True)
print("answer", buf[n:].decode().strip(), flush=True)
t = socket.create_connection(("10.77.0.1", 7000), timeout=10)
print("second", t.recv(100).decode().strip(), flush=True)
if len(sys.argv) > 1:
    u = socket.create_connection(("fd77::1", 7001), timeout=10)
    print("v6", u.recv(100).decode().strip(), flush=True)
"#;

/// With `v6`, it also connects to the IPv6 listener at the end.
fn tcp_client(ns: &str, v6: bool) -> (Kid, BufReader<ChildStdout>) {
    let mut child = Net::exec(ns, "python3")
        .args(["-c", TCP_CLIENT])
        .args(v6.then_some("v6"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (Kid(child), out)
}

/// The TCP case: a page server in B, [`tcp_server`] in A and
/// [`tcp_client`] in C, once the server has queued its bytes. Fields drop
/// in order: the client first, the page server last.
struct Tcp {
    out: BufReader<ChildStdout>,
    client: Kid,
    _guard: KillOnDrop,
    _server: Kid,
    _ps: Kid,
    pid: i32,
    sent: String,
    queued: usize,
    log: PathBuf,
    go: PathBuf,
    tls: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Tcp {
    /// With `v6`, the client also connects to the IPv6 listener at the end.
    fn start(net: &Net, v6: bool) -> Tcp {
        let dir = tempfile::tempdir().unwrap();
        let (log, go) = (dir.path().join("server.log"), dir.path().join("go"));
        let tls = certs();
        let ps = net.page_server(tls.path());
        let (server, pid) = tcp_server(&net.a, &log, &go);
        let guard = KillOnDrop(pid);
        let (client, mut out) = tcp_client(&net.c, v6);
        let sent = read_line(&mut out);
        let queued: usize = wait_line(&log, "queued ").parse().unwrap();
        Tcp {
            out,
            client,
            _guard: guard,
            _server: server,
            _ps: ps,
            pid,
            sent,
            queued,
            log,
            go,
            tls,
            _dir: dir,
        }
    }

    /// Lets the server read: the client gets the queued bytes intact, the
    /// answer about its own bytes, and a second connection's greeting.
    fn go_on(&mut self) {
        std::fs::write(&self.go, b"").unwrap();
        writeln!(self.client.0.stdin.as_mut().unwrap(), "go {}", self.queued).unwrap();
        assert_eq!(read_line(&mut self.out), "queued-bytes-intact True");
        let hash = self.sent.strip_prefix("sent ").unwrap();
        assert_eq!(read_line(&mut self.out), format!("answer got 50000 {hash}"));
        assert_eq!(read_line(&mut self.out), "second second");
    }
}

#[test]
fn a_tcp_listener_and_connection_keep_their_bytes_across_a_migration() {
    if !is_root() || !have("python3") {
        eprintln!("skipped: needs root and python3");
        return;
    }
    let net = Net::make();
    let mut t = Tcp::start(&net, true);
    let (pid, queued) = (t.pid, t.queued);
    assert!(
        queued > 10_000,
        "the server's send queue holds bytes: {queued}"
    );
    // Everything sent is acknowledged (or waits on the client's window).
    std::thread::sleep(Duration::from_millis(300));
    let fd_kinds = ferry::state::capture_fds(pid).unwrap();
    let kinds: Vec<_> = fd_kinds.iter().map(|f| f.kind()).collect();
    assert!(
        kinds.contains(&ferry_proto::pb::FdKind::TcpListen),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&ferry_proto::pb::FdKind::TcpEstablished),
        "{kinds:?}"
    );

    net.cut_source();
    let new = net.migrated(pid, t.tls.path(), &[]);
    let _guard2 = KillOnDrop(new);
    net.route_to_destination();
    assert!(gone(pid), "the source is gone");
    let ns_b = std::fs::read_link(format!("/run/netns/{}", net.b)).ok();
    let ns_new = std::fs::read_link(format!("/proc/{new}/ns/net")).ok();
    eprintln!("restored in {ns_new:?}, B is {ns_b:?}");

    t.go_on();
    assert_eq!(read_line(&mut t.out), "v6 v6");
    assert_eq!(wait_line(&t.log, "answered"), "");
    assert_eq!(
        wait_line(&t.log, "options "),
        "reuseaddr=1 reuseport6=1 v6only=1 nodelay=1 nonblocking6=1"
    );
    // The backlogs, as `ss` shows them in B (Send-Q of a listener).
    let ss = Net::exec(&net.b, "ss").args(["-ltnH"]).output().unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    let backlog = |port: &str| {
        ss.lines()
            .find(|l| l.contains(port))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    };
    assert_eq!(backlog("10.77.0.1:7000").as_deref(), Some("7"), "{ss}");
    assert_eq!(backlog("[fd77::1]:7001").as_deref(), Some("5"), "{ss}");
}

#[test]
fn a_failed_migration_gives_the_source_its_connection_back() {
    if !is_root() || !have("python3") {
        eprintln!("skipped: needs root and python3");
        return;
    }
    let net = Net::make();
    // The destination lacks the server address: the listener's bind fails
    // there, after the source's connection went into repair mode.
    assert!(ip(&[
        "-n",
        &net.b,
        "addr",
        "del",
        "10.77.0.1/32",
        "dev",
        "bc"
    ]));
    let mut t = Tcp::start(&net, false);
    std::thread::sleep(Duration::from_millis(300));

    let out_m = net.migrate(t.pid, t.tls.path(), &[]);
    let stderr = String::from_utf8_lossy(&out_m.stderr);
    assert!(!out_m.status.success());
    assert!(stderr.contains("the source runs on"), "{stderr}");
    assert!(stderr.contains("bind to 10.77.0.1:7000"), "{stderr}");
    assert!(!gone(t.pid), "the source lives");

    // The source's connection works as if nothing happened.
    t.go_on();
}

/// Sockets that stay unsupported are refused by name before anything is
/// frozen, and the source runs on.
#[test]
fn unsupported_sockets_are_refused_by_name_and_the_source_runs_on() {
    if !is_root() || !have("python3") {
        eprintln!("skipped: needs root and python3");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("refused.log");
    let path = dir.path().join("peer.sock");
    // A UNIX listener outside the process: the process connects to it.
    let outside = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let script = format!(
        r#"
import os, socket, time
os.closerange(3, 4096)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
x = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
x.connect({path:?})
assert u.fileno() == 3 and x.fileno() == 4
# Open once: a descriptor that comes and goes would race the fd listing
# below.
f = open({log:?}, "a", buffering=1)
n = 0
while True:
    n += 1
    f.write("%d\n" % n)
    time.sleep(0.01)
"#,
        path = path.to_str().unwrap(),
        log = log.to_str().unwrap(),
    );
    let kid = python(Command::new("python3"), &script);
    let pid = kid.0.id() as i32;
    let _accepted = outside.accept().unwrap();
    let count = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() == 0 {
        assert!(Instant::now() < deadline, "the program does not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = migrate_on_this_host(pid, false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("fd 3: UDP socket on 127.0.0.1:") && stderr.contains("not supported yet"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was frozen"), "{stderr}");
    let mut fds = ferry::state::capture_fds(pid).unwrap();
    fds.retain(|f| f.fd != 3);
    let e = ferry::restore::check_fds(&fds).unwrap_err().to_string();
    assert_eq!(
        e,
        "fd 4: UNIX stream socket connected to a process outside the image: not supported yet"
    );
    let before = count();
    std::thread::sleep(Duration::from_millis(200));
    assert!(count() > before, "it runs on");
}

/// A client in namespace C that keeps writing `live:N` keys over one
/// connection (reconnecting only if it breaks, and counting that) until
/// `stop` exists; then checks over the same connection that every key
/// redis acknowledged is there.
const REDIS_WRITER: &str = r#"
import os, socket, sys, time
stop = sys.argv[1]
def conn():
    while True:
        try:
            s = socket.create_connection(("10.77.0.1", 6379), timeout=30)
            return s, s.makefile("rb")
        except OSError:
            time.sleep(0.05)
def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out
s, f = conn()
acked = reconnects = 0
while not os.path.exists(stop):
    try:
        s.sendall(cmd("SET", "live:%d" % acked, acked))
        line = f.readline()
        if line != b"+OK\r\n":
            raise OSError("reply %r" % line)
        acked += 1
        if acked == 100:
            print("writing", flush=True)
    except OSError:
        reconnects += 1
        s, f = conn()
    time.sleep(0.002)
missing = 0
for k in range(0, acked, 1000):
    keys = ["live:%d" % j for j in range(k, min(acked, k + 1000))]
    s.sendall(cmd("MGET", *keys))
    n = int(f.readline()[1:])
    for _ in range(n):
        if f.readline().startswith(b"$-1"):
            missing += 1
        else:
            f.readline()
print("acked %d reconnects %d missing %d" % (acked, reconnects, missing), flush=True)
"#;

const CLOSE_AND_EXEC: &str =
    "import os, sys; os.closerange(3, 4096); os.execvp(sys.argv[1], sys.argv[1:])";

/// Whether every thread of `pid` is in a ptrace stop: ferry froze it.
fn frozen(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.trim().chars().next());
        if state != Some('t') {
            return false;
        }
        any = true;
    }
    any
}

fn redis_cli(ns: &str, args: &[&str]) -> String {
    let out = Net::exec(ns, "redis-cli")
        .args(["-h", SERVER])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn redis_server_keeps_its_keys_and_its_writing_client_across_a_migration() {
    if !is_root() || !have("python3") {
        eprintln!("skipped: needs root and python3");
        return;
    }
    if !have("redis-server") || !have("redis-cli") {
        eprintln!(
            "\n\n!!!!! SKIPPED: redis-server/redis-cli are not installed \
             (apt-get install -y redis-server redis-tools); CI installs them !!!!!\n\n"
        );
        return;
    }
    let net = Net::make();
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("redis.sock");
    let stop = dir.path().join("stop");
    let tls = certs();
    let _ps = net.page_server(tls.path());
    // Through a python3 exec that closes whatever descriptors the test
    // inherited (a harness's pipe would be refused as a pipe to outside).
    let redis = Net::exec(&net.a, "python3")
        .args(["-c", CLOSE_AND_EXEC, "redis-server"])
        .args([
            "--bind",
            SERVER,
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--protected-mode",
            "no",
            "--unixsocketperm",
            "700",
            "--unixsocket",
        ])
        .arg(&unix)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // `ip netns exec` and python3 exec the program in place.
    let pid = redis.id() as i32;
    let _redis = Kid(redis);
    let _guard = KillOnDrop(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_cli(&net.c, &["PING"]) != "PONG" {
        assert!(Instant::now() < deadline, "redis does not answer");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "redis fds before: {:?}",
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .map(|e| std::fs::read_link(e.path()).unwrap_or_default())
            .collect::<Vec<_>>()
    );
    // 100 000 keys, through one pipelined connection.
    let mut fill = Vec::new();
    for i in 0..100_000 {
        let (k, v) = (format!("key:{i}"), format!("value:{i}"));
        write!(
            fill,
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        )
        .unwrap();
    }
    let mut pipe = Net::exec(&net.c, "redis-cli")
        .args(["-h", SERVER, "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    pipe.stdin.take().unwrap().write_all(&fill).unwrap();
    assert!(pipe.wait().unwrap().success());
    assert_eq!(redis_cli(&net.c, &["DBSIZE"]), "100000");

    let mut writer = Net::exec(&net.c, "python3")
        .args(["-c", REDIS_WRITER])
        .arg(&stop)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(writer.stdout.take().unwrap());
    let _writer = Kid(writer);
    assert_eq!(read_line(&mut out), "writing");

    // Cut the source's link as soon as ferry has frozen it (its own filter
    // drops the client's segments until then); checksum tracking stops no
    // thread before the freeze, so a stopped process means frozen.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (done, a) = (done.clone(), net.a.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if frozen(pid) {
                    assert!(ip(&["-n", &a, "link", "set", "ac", "down"]));
                    return true;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            false
        })
    };
    let new = net.migrated(pid, tls.path(), &["--track", "checksum"]);
    done.store(true, Ordering::Relaxed);
    let _guard2 = KillOnDrop(new);
    let caught = watcher.join().unwrap();
    if !caught {
        net.cut_source();
    }
    net.route_to_destination();
    eprintln!("freeze seen by the test: {caught}");
    assert!(gone(pid), "the source is gone");
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&stop, b"").unwrap();
    let summary = read_line(&mut out);
    eprintln!("writer: {summary}");
    let words: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(words.len(), 6, "{summary}");
    let acked: u64 = words[1].parse().unwrap();
    assert!(acked > 100, "{summary}");
    assert_eq!(words[5], "0", "every acknowledged key is there: {summary}");
    assert_eq!(words[3], "0", "the same connection throughout: {summary}");

    assert_eq!(
        redis_cli(&net.c, &["DBSIZE"]),
        (100_000 + acked).to_string()
    );
    assert_eq!(redis_cli(&net.c, &["GET", "key:99999"]), "value:99999");
    assert_eq!(redis_cli(&net.c, &["SET", "after", "1"]), "OK");
    assert_eq!(redis_cli(&net.c, &["GET", "after"]), "1");
    // The UNIX listener was bound again at its path.
    let out = Command::new("redis-cli")
        .arg("-s")
        .arg(&unix)
        .arg("PING")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "PONG");
}

/// UNIX sockets that stay inside the process: a stream pair with bytes
/// waiting at both ends, and a listener bound to a path (whose stale file
/// the destination replaces). The migration stays on this host.
#[test]
fn unix_socket_pairs_and_listeners_migrate_with_their_bytes() {
    if !is_root() || !have("python3") {
        eprintln!("skipped: needs root and python3");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, go) = (dir.path().join("unix.log"), dir.path().join("go"));
    let path = dir.path().join("listen.sock");
    let script = format!(
        r#"
import os, socket, time
os.closerange(3, 4096)
def say(s):
    with open({log:?}, "a") as f:
        f.write(s + "\n")
a, b = socket.socketpair()
a.sendall(b"a-to-b " * 1000)
b.sendall(b"b-to-a")
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind({path:?})
l.listen(3)
say("pid %d" % os.getpid())
while not os.path.exists({go:?}):
    time.sleep(0.01)
got_b = b""
while len(got_b) < 7000:
    got_b += b.recv(65536)
got_a = a.recv(100)
say("pair %s %s" % (got_b == b"a-to-b " * 1000, got_a == b"b-to-a"))
c, _ = l.accept()
c.sendall(b"hello\n")
time.sleep(60)
"#,
        log = log.to_str().unwrap(),
        go = go.to_str().unwrap(),
        path = path.to_str().unwrap(),
    );
    let (_kid, pid) = python_saying_pid(Command::new("python3"), &script, &log);
    let _guard = KillOnDrop(pid);
    let fds = ferry::state::capture_fds(pid).unwrap();
    let kinds: Vec<_> = fds.iter().map(|f| f.kind()).collect();
    use ferry_proto::pb::FdKind;
    assert_eq!(
        kinds.iter().filter(|&&k| k == FdKind::UnixPair).count(),
        2,
        "{kinds:?}"
    );
    assert!(kinds.contains(&FdKind::UnixListen), "{kinds:?}");

    let new = common::restored_pid(&migrate_on_this_host(pid, true), "UNIX sockets");
    let _guard2 = KillOnDrop(new);
    assert!(gone(pid), "the source is gone");
    std::fs::write(&go, b"").unwrap();
    assert_eq!(wait_line(&log, "pair "), "True True");
    let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = String::new();
    BufReader::new(&mut c).read_line(&mut hello).unwrap();
    assert_eq!(hello, "hello\n");
}

/// A connection waiting in a listener's accept queue cannot move: the
/// migration fails at the freeze, and the source runs on and accepts it.
#[test]
fn a_listener_with_connections_not_accepted_yet_is_not_migrated() {
    if !is_root() || !have("python3") {
        eprintln!("skipped: needs root and python3");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (log, go) = (dir.path().join("pending.log"), dir.path().join("go"));
    let port = common::free_port();
    let script = format!(
        r#"
import os, socket, time
os.closerange(3, 4096)
def say(s):
    with open({log:?}, "a") as f:
        f.write(s + "\n")
l = socket.socket()
l.bind(("127.0.0.1", {port}))
l.listen(4)
say("pid %d" % os.getpid())
while not os.path.exists({go:?}):
    time.sleep(0.01)
c, _ = l.accept()
c.sendall(b"accepted\n")
time.sleep(60)
"#,
        log = log.to_str().unwrap(),
        go = go.to_str().unwrap(),
    );
    let (_kid, pid) = python_saying_pid(Command::new("python3"), &script, &log);
    let mut waiting = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let out = migrate_on_this_host(pid, false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "fd 3: listening socket 127.0.0.1:{port} has 1 connection(s) not accepted yet"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("the source runs on"), "{stderr}");
    std::fs::write(&go, b"").unwrap();
    let mut line = String::new();
    BufReader::new(&mut waiting).read_line(&mut line).unwrap();
    assert_eq!(line, "accepted\n");
}
