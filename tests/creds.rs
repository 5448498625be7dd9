//! Credentials (issue 7 item 6): a restored process gets exactly the uids,
//! gids, groups, capability sets and no_new_privs it had, in every thread,
//! never the page server's; a page server that cannot give them all
//! refuses the image by name and the source runs on; threads whose
//! credentials differ keep theirs, and so do the processes of a tree; a
//! stub that already
//! took another user's credentials is still killed when the restore fails
//! after that. Real processes started with `setpriv` (util-linux), migrated
//! with `ferry migrate` through a real `ferry page-server --restore`.
//!
//! Needs root; skipped with a message otherwise.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    assert_counts_on, certs, free_port, gone, is_root, log_values, proc_field, proc_state,
    restored_pid, wait_for_server, KillOnDrop,
};
use ferry::sys::ptrace::Tracee;

const CREDS: [&str; 9] = [
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
];

/// The credential lines of every thread of `pid`, one string per thread,
/// sorted (tids change in a migration, the set of threads' credentials
/// must not).
fn thread_creds(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(|tid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            CREDS
                .iter()
                .map(|k| {
                    s.lines()
                        .find(|l| l.starts_with(&format!("{k}:")))
                        .unwrap_or_else(|| panic!("no {k} in thread {tid}"))
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect();
    v.sort();
    v
}

/// `ferry page-server --restore` with `args` and `env`, once it answers.
async fn server(
    tls: &Path,
    port: u16,
    args: &[&str],
    env: &[(&str, &str)],
) -> common::ServerProcess {
    let ps = common::ServerProcess(
        common::page_server_command(tls, port)
            .args(["--log", "warn", "--restore"])
            .args(args)
            .envs(env.iter().copied())
            .spawn()
            .unwrap(),
    );
    wait_for_server(format!("127.0.0.1:{port}").parse().unwrap(), tls).await;
    ps
}

fn migrate(pid: i32, port: u16, tls: &Path) -> Output {
    common::migrate_command(pid, &format!("127.0.0.1:{port}"), tls)
        .args(["--json", "--log", "warn"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `ferry migrate` that must fail: its stderr.
fn migrate_refused(pid: i32, port: u16, tls: &Path) -> String {
    let out = migrate(pid, port, tls);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "migrated: {stderr}");
    stderr
}

/// `python3 -c SCRIPT ARG`, detached from our stdio; `None` without
/// python3.
fn python3(script: &str, arg: &Path) -> Option<Source> {
    Command::new("python3")
        .args(["-c", script])
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
        .map(Source)
}

/// Waits up to 5 s for `ready`.
fn wait_5s(mut ready: impl FnMut() -> bool) {
    for _ in 0..500 {
        if ready() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A directory every user may write (the log of a process running as
/// nobody) holding a copy of the fixture named `name`, so its processes
/// are told apart from every other test's by their command name.
fn workdir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let exe = dir.path().join(name);
    std::fs::copy(env!("CARGO_BIN_EXE_ferry-fixture"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, exe)
}

const CLOSE_AND_EXEC: &str = r#"for f in /proc/$$/fd/*; do n=${f##*/}; if [ "$n" -gt 2 ]; then eval "exec $n<&-"; fi; done; exec "$@""#;

/// The fixture (threads: main, counter, writer and `threads - 1` idle
/// ones) under `setpriv SETPRIV... --`, logging its counter to `log`;
/// setpriv execs it, so the pid is the child's. Its stdin and stderr are
/// /dev/null (it runs on at EOF) and its stdout a file next to `log`: no
/// pipe to this test, which a migration would refuse.
fn start(setpriv: &[&str], exe: &Path, log: &Path, threads: u32) -> Source {
    let out = log.with_extension("out");
    // bash closes what leaks from the harness (cargo's jobserver pipe,
    // say) and execs setpriv, which execs the fixture.
    let child = Command::new("bash")
        .arg("-c")
        .arg(CLOSE_AND_EXEC)
        .args(["bash", "/usr/bin/setpriv"])
        .args(setpriv)
        .arg("--")
        .arg(exe)
        .args(["--mib", "8", "--threads", &threads.to_string(), "--log"])
        .arg(log)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let src = Source(child);
    for _ in 0..500 {
        let ready = std::fs::read_to_string(&out).is_ok_and(|s| s.starts_with("ready"));
        if ready && !log_values(log).is_empty() {
            return src;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "the fixture does not start: {:?}",
        std::fs::read_to_string(&out)
    );
}

/// The source process, killed when dropped.
struct Source(std::process::Child);

impl Source {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Not traced, not stopped, counting on.
    fn runs_on(&self, log: &Path, what: &str) {
        let pid = self.pid();
        let tracer = || proc_field(pid, "TracerPid:").unwrap_or_default();
        for _ in 0..200 {
            if tracer() == "0" && matches!(proc_state(pid), 'S' | 'R') {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(tracer(), "0", "{what}: the source is left traced");
        let st = proc_state(pid);
        assert!(st == 'S' || st == 'R', "{what}: the source is {st}");
        assert_counts_on(
            log,
            Duration::from_millis(400),
            &format!("{what}: the source counts on"),
        );
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Migrates `fx` through a default page server and checks that the
/// restored process's threads hold exactly the credentials the source's
/// did, and that it runs on.
async fn migrates_with_exactly_its_creds(fx: &Source, log: &Path, what: &str) -> KillOnDrop {
    let tls = certs();
    let port = free_port();
    let ps = server(tls.path(), port, &[], &[]).await;
    let before = thread_creds(fx.pid());
    eprintln!("{what}, before:\n{}", before.join("\n"));
    let new = restored_pid(&migrate(fx.pid(), port, tls.path()), what);
    let _kill = KillOnDrop(new);
    assert!(gone(fx.pid()), "{what}: the source is gone");
    let after = thread_creds(new);
    assert_eq!(before.len(), after.len(), "{what}: threads");
    assert_eq!(before, after, "{what}: every thread's credentials");
    assert_counts_on(
        log,
        Duration::from_millis(400),
        &format!("{what}: the restored process counts on"),
    );
    drop(ps);
    _kill
}

/// What `/proc` does not show, as a capture sees it: each thread's
/// securebits and the process's dumpable flag.
fn injected_creds(pid: i32) -> (Vec<u32>, Option<u32>) {
    let tr = Tracee::seize(pid).expect("seize");
    tr.freeze().expect("freeze");
    let tree = ferry::state::capture(pid, &tr).expect("capture");
    drop(tr);
    let p = &tree.processes[0];
    let sb = p
        .threads
        .iter()
        .map(|t| t.creds.as_ref().expect("thread creds").securebits)
        .collect();
    assert_eq!(
        p.creds.as_ref().unwrap().securebits,
        p.threads[0].creds.as_ref().unwrap().securebits
    );
    (sb, p.dumpable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_migrates_as_nobody() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (dir, exe) = workdir(&format!("fxnobody{}", std::process::id() % 10000));
    let log = dir.path().join("log");
    // Groups, no_new_privs and locked securebits too; four threads.
    let fx = start(
        &[
            "--reuid=65534",
            "--regid=65534",
            "--groups=100,65534",
            "--no-new-privs",
            "--securebits=+noroot,+noroot_locked",
        ],
        &exe,
        &log,
        2,
    );
    let creds = thread_creds(fx.pid());
    assert!(creds.len() >= 4, "{creds:?}");
    assert!(
        creds.iter().all(|c| c.starts_with(
            "Uid: 65534 65534 65534 65534 | Gid: 65534 65534 65534 65534 | Groups: 100 65534 | CapInh: 0000000000000000 | CapPrm: 0000000000000000 | CapEff: 0000000000000000"
        ) && c.ends_with("NoNewPrivs: 1")),
        "{creds:?}"
    );
    // Securebits (noroot, locked) and dumpable, captured, then again from
    // the restored process.
    let (sb, dumpable) = injected_creds(fx.pid());
    assert!(sb.len() >= 4 && sb.iter().all(|&b| b == 0b11), "{sb:?}");
    assert_eq!(dumpable, Some(1));
    let new = migrates_with_exactly_its_creds(&fx, &log, "nobody").await;
    assert_eq!(injected_creds(new.0), (sb, dumpable), "after the restore");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_with_dropped_sets_keeps_all_five() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (dir, exe) = workdir(&format!("fxroot{}", std::process::id() % 10000));
    let log = dir.path().join("log");
    // uid 0 without root's automatic capabilities (SECBIT_NOROOT): its
    // permitted and effective sets are its ambient set; inheritable holds
    // one more, the bounding set lacks two.
    let fx = start(
        &[
            "--securebits=+noroot",
            "--inh-caps=+net_raw,+kill,+setuid",
            "--ambient-caps=+net_raw,+kill",
            "--bounding-set=-sys_module,-sys_rawio",
        ],
        &exe,
        &log,
        2,
    );
    let creds = thread_creds(fx.pid());
    assert!(
        creds.iter().all(|c| c.contains(
            "CapInh: 00000000000020a0 | CapPrm: 0000000000002020 | CapEff: 0000000000002020"
        ) && c.contains("CapAmb: 0000000000002020")),
        "{creds:?}"
    );
    let _new = migrates_with_exactly_its_creds(&fx, &log, "root with dropped sets").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_server_lacking_a_capability_refuses_and_the_source_runs_on() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tls = certs();
    let port = free_port();
    let ps = server(tls.path(), port, &["--caps", "checkpoint_restore"], &[]).await;
    let (dir, exe) = workdir(&format!("fxrefuse{}", std::process::id() % 10000));
    // Root with every capability: its permitted set holds what the page
    // server dropped.
    let log = dir.path().join("root");
    let fx = start(&[], &exe, &log, 1);
    let stderr = migrate_refused(fx.pid(), port, tls.path());
    // At the handshake, from what the source read in /proc: before the
    // first round, nothing frozen.
    assert!(
        stderr.contains(&format!(
            "pre-flight: this host could not restore the process: pid {} ",
            fx.pid()
        )) && stderr.contains("credentials: its permitted set holds cap_chown,")
            && stderr.contains("which this page server does not hold"),
        "{stderr}"
    );
    fx.runs_on(&log, "root refused");
    drop(fx);
    // Nobody, with only that capability in its bounding set: the page
    // server could hold its sets but cannot change uids.
    let log = dir.path().join("nobody");
    let fx = start(
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--bounding-set=-all,+checkpoint_restore",
        ],
        &exe,
        &log,
        1,
    );
    let stderr = migrate_refused(fx.pid(), port, tls.path());
    assert!(
        stderr.contains("needs cap_set") && stderr.contains("which this page server does not hold"),
        "{stderr}"
    );
    fx.runs_on(&log, "nobody refused");
    drop(fx);
    // Root with SECBIT_NOROOT and only that capability: the pre-flight
    // (securebits read as 0) lets it through, the state captured at the
    // freeze has securebits 0x1, which the page server cannot set without
    // cap_setpcap: refused at the restore, and the source resumes.
    let log = dir.path().join("noroot");
    let fx = start(
        &[
            "--securebits=+noroot",
            "--bounding-set=-all,+checkpoint_restore",
        ],
        &exe,
        &log,
        1,
    );
    let stderr = migrate_refused(fx.pid(), port, tls.path());
    assert!(
        !stderr.contains("pre-flight")
            && stderr.contains(&format!("process {} (", fx.pid()))
            && stderr.contains("setting the securebits 0x1 needs cap_setpcap"),
        "{stderr}"
    );
    fx.runs_on(&log, "noroot refused at the restore");
    drop(ps);
}

/// Processes whose command name is `comm`, but `except`.
fn named(comm: &str, except: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != except)
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .filter(|&p| !matches!(proc_state(p), 'Z' | 'X' | '?'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_the_credentials_kills_the_half_restored_process() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // A page server holding what restoring a nobody process needs (and
    // dac_override to open its log, nobody's file), without CAP_KILL: once
    // the stub is nobody's, kill(2) from the page server fails and only
    // its tracer can still kill it.
    const NEEDS: &str = "checkpoint_restore,setuid,setgid,setpcap,dac_override";
    let tls = certs();
    let port = free_port();
    let ps = server(
        tls.path(),
        port,
        &["--caps", NEEDS],
        &[("FERRY_FAILPOINT", "restore:creds")],
    )
    .await;
    let name = format!("fxfail{}", std::process::id() % 10000);
    let (dir, exe) = workdir(&name);
    let log = dir.path().join("log");
    let fx = start(
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--bounding-set=-all,+checkpoint_restore,+setuid,+setgid,+setpcap",
        ],
        &exe,
        &log,
        2,
    );
    let stderr = migrate_refused(fx.pid(), port, tls.path());
    assert!(stderr.contains("restore stage creds"), "{stderr}");
    fx.runs_on(&log, "failure after the credentials");
    let mut left = named(&name, fx.pid());
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        left = named(&name, fx.pid());
    }
    assert!(left.is_empty(), "half-restored processes left: {left:?}");
    drop(ps);
    // Without the failpoint the same page server restores it, exactly.
    let port = free_port();
    let ps = server(tls.path(), port, &["--caps", NEEDS], &[]).await;
    let before = thread_creds(fx.pid());
    let new = restored_pid(
        &migrate(fx.pid(), port, tls.path()),
        "without the failpoint",
    );
    let _kill = KillOnDrop(new);
    assert_eq!(before, thread_creds(new));
    drop(ps);
}

/// A python3 process whose threads hold different credentials: the main
/// thread is root with every capability, one thread switched itself alone
/// to uid/gid 1000 with the raw syscalls (glibc's wrappers would switch
/// every thread), one dropped cap_net_raw from its own bounding set.
/// Every thread stays alive; the main one appends a
/// counter to `log`.
const PER_THREAD: &str = r#"
import ctypes, os, sys, threading, time
os.closerange(3, 4096)
libc = ctypes.CDLL(None, use_errno=True)
SYS_setresuid, SYS_setresgid, PR_CAPBSET_DROP = 117, 119, 24
ready = []
def other_user():
    assert libc.syscall(SYS_setresgid, 1000, 1000, 1000) == 0
    assert libc.syscall(SYS_setresuid, 1000, 1000, 1000) == 0
    ready.append(1)
    while True:
        time.sleep(0.05)
def fewer_caps():
    assert libc.prctl(PR_CAPBSET_DROP, 13, 0, 0, 0) == 0
    ready.append(2)
    while True:
        time.sleep(0.05)
for f in (other_user, fewer_caps):
    threading.Thread(target=f, daemon=True).start()
n = 0
while True:
    n += 1
    if len(ready) == 2:
        with open(sys.argv[1], "a") as f:
            f.write("%d\n" % n)
    time.sleep(0.05)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_with_different_credentials_keep_theirs() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let Some(src) = python3(PER_THREAD, &log) else {
        eprintln!("skipped: no python3");
        return;
    };
    wait_5s(|| !log_values(&log).is_empty());
    assert!(!log_values(&log).is_empty(), "the program runs");
    let creds = thread_creds(src.pid());
    assert_eq!(creds.len(), 3, "{creds:?}");
    assert!(
        creds
            .iter()
            .any(|c| c.starts_with("Uid: 1000 1000 1000 1000"))
            && creds.iter().any(|c| c.starts_with("Uid: 0 0 0 0"))
            && creds.iter().collect::<std::collections::HashSet<_>>().len() == 3,
        "three different threads: {creds:?}"
    );
    let _new = migrates_with_exactly_its_creds(&src, &log, "threads that differ").await;
}

/// A tree: a root python3 parent whose child runs as nobody (setpriv),
/// each appending a counter to its own log.
const TREE: &str = r#"
import os, subprocess, sys, time
os.closerange(3, 4096)
d = sys.argv[1]
child = "import time\nn = 0\nwhile True:\n    n += 1\n    open(%r, 'a').write('%%d\\n' %% n)\n    time.sleep(0.05)\n" % (d + "/child")
subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                  sys.executable, "-c", child],
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
n = 0
while True:
    n += 1
    with open(d + "/parent", "a") as f:
        f.write("%d\n" % n)
    time.sleep(0.05)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_keeps_each_process_its_own_credentials() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let Some(src) = python3(TREE, dir.path()) else {
        eprintln!("skipped: no python3");
        return;
    };
    let (plog, clog) = (dir.path().join("parent"), dir.path().join("child"));
    wait_5s(|| !log_values(&plog).is_empty() && !log_values(&clog).is_empty());
    assert!(!log_values(&clog).is_empty(), "the child runs");
    let kid = |pid: i32| -> i32 {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap()
            .split_whitespace()
            .next()
            .expect("a child")
            .parse()
            .unwrap()
    };
    let old_kid = kid(src.pid());
    let (parent_before, child_before) = (thread_creds(src.pid()), thread_creds(old_kid));
    assert!(
        child_before[0].starts_with("Uid: 65534"),
        "{child_before:?}"
    );
    let tls = certs();
    let port = free_port();
    let ps = server(tls.path(), port, &[], &[]).await;
    let new = restored_pid(&migrate(src.pid(), port, tls.path()), "a tree");
    let new_kid = kid(new);
    let _kill = (KillOnDrop(new_kid), KillOnDrop(new));
    assert_eq!(thread_creds(new), parent_before, "the parent");
    assert_eq!(thread_creds(new_kid), child_before, "the child");
    assert_counts_on(&clog, Duration::from_millis(400), "the child counts on");
    drop(ps);
}
