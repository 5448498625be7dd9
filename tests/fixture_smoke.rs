//! The `ferry-fixture` workload answers its protocol (see
//! `tests/fixture/ferry_fixture.rs`) and is the process it claims to be.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::procfs;

struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pid: i32,
    base: u64,
    len: u64,
    counter_addr: u64,
}

impl Fixture {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-fixture"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ferry-fixture");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let field = |key: &str| -> String {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .to_owned()
        };
        assert!(line.starts_with("ready "), "{line:?}");
        let hex = |s: String| u64::from_str_radix(s.strip_prefix("0x").unwrap(), 16).unwrap();
        let pid: i32 = field("pid=").parse().unwrap();
        assert_eq!(pid as u32, child.id());
        Self {
            pid,
            base: hex(field("base=")),
            len: field("len=").parse().unwrap(),
            counter_addr: hex(field("counter=")),
            child,
            stdin,
            stdout,
        }
    }

    /// Sends one command and returns its answer line.
    fn cmd(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        answer.trim_end().to_owned()
    }

    /// Sends a command that must succeed; returns what follows "ok".
    fn ok(&mut self, line: &str) -> String {
        let answer = self.cmd(line);
        assert!(
            answer == "ok" || answer.starts_with("ok "),
            "{line}: {answer}"
        );
        answer.get(3..).unwrap_or("").to_owned()
    }

    fn counter(&mut self) -> u64 {
        self.ok("counter").parse().unwrap()
    }

    /// Waits for the process to end, killing it after `timeout`.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ferry-fixture did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn protocol() {
    let mut fx = Fixture::start(&["--mib", "8", "--dirty-rate", "100"]);
    assert_eq!(fx.len, 8 << 20);

    let c1 = fx.counter();
    std::thread::sleep(Duration::from_millis(30));
    let c2 = fx.counter();
    assert!(c2 > c1, "counter did not move: {c1} then {c2}");

    fx.ok("pause");
    let d1 = fx.ok("digest");
    std::thread::sleep(Duration::from_millis(50));
    let d2 = fx.ok("digest");
    assert_eq!(d1, d2, "memory changed while paused");
    assert_eq!(d1.len(), 16);

    fx.ok("write 3");
    let d3 = fx.ok("digest");
    assert_ne!(d3, d2, "write 3 did not change the memory");

    // Dropping a written page makes it read as zero again.
    fx.ok("write 5 7");
    fx.ok("dontneed 0 2048");
    let zero = fx.ok("digest");
    let mut fresh = Fixture::start(&["--mib", "8"]);
    fresh.ok("dontneed 0 2048");
    assert_eq!(zero, fresh.ok("digest"));

    let addr = fx.ok("mmap 4");
    let addr = u64::from_str_radix(addr.strip_prefix("0x").unwrap(), 16).unwrap();
    let maps = procfs::read_maps(fx.pid).unwrap();
    assert!(
        maps.iter()
            .any(|m| m.start <= addr && addr + 4 * 4096 <= m.end),
        "mmap region {addr:#x} not in the maps"
    );
    fx.ok(&format!("munmap {addr:#x} 1"));
    fx.ok(&format!("munmap {:#x} 3", addr + 4096));
    assert!(fx.cmd(&format!("munmap {addr:#x} 1")).starts_with("err "));

    fx.ok("freeze-counter");
    let frozen = fx.counter();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(fx.counter(), frozen);
    fx.ok("thaw-counter");
    fx.ok("resume");

    for bad in [
        "",
        "nope",
        "write",
        "write 2048",
        "write x",
        "dontneed 2047 2",
        "mmap 0",
        "counter 1",
    ] {
        let answer = fx.cmd(bad);
        assert!(answer.starts_with("err "), "{bad:?}: {answer}");
    }

    assert_eq!(fx.cmd("exit"), "ok");
    assert!(fx.wait(Duration::from_secs(5)).success());
}

#[test]
fn same_seed_same_memory() {
    let mut a = Fixture::start(&["--mib", "2", "--seed", "7"]);
    let mut b = Fixture::start(&["--mib", "2", "--seed", "7"]);
    let mut c = Fixture::start(&["--mib", "2", "--seed", "8"]);
    let (da, db, dc) = (a.ok("digest"), b.ok("digest"), c.ok("digest"));
    assert_eq!(da, db);
    assert_ne!(da, dc);
}

#[test]
fn process_shape() {
    let fx = Fixture::start(&["--mib", "4", "--threads", "3"]);
    let maps = procfs::read_maps(fx.pid).unwrap();
    let big = maps
        .iter()
        .find(|m| m.start <= fx.base && fx.base + fx.len <= m.end)
        .expect("big region in the maps");
    assert!(big.write && !big.shared && big.path.is_none());
    assert!(maps
        .iter()
        .any(|m| m.start <= fx.counter_addr && fx.counter_addr < m.end && m.write));
    // main, counter, writer and two idle workers.
    let tasks = procfs::list_tasks(fx.pid).unwrap();
    assert_eq!(tasks.len(), 5, "{tasks:?}");
}

#[test]
fn survives_eof_and_exits_0_on_sigterm() {
    let mut fx = Fixture::start(&["--mib", "1", "--log", "/dev/null"]);
    drop(fx.stdin.take());
    std::thread::sleep(Duration::from_millis(100));
    assert!(fx.child.try_wait().unwrap().is_none(), "exited on EOF");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fx.pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = fx.wait(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn log_file_grows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.log");
    let mut fx = Fixture::start(&["--mib", "1", "--log", path.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(350));
    fx.ok("counter");
    let text = std::fs::read_to_string(&path).unwrap();
    let values: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
    assert!(values.len() >= 2, "{text:?}");
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
}
