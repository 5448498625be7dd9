//! `--keep-pids`: which pids a process tree keeps, and whether it can.
//!
//! The dump records, for every process and thread, its pid as seen in its
//! own pid namespace (the last `NSpid` entry of its status: a process in a
//! container or under `unshare --pid` keeps the pids it sees itself, not
//! the host's) and that namespace's inode ([`record`]). With `--keep-pids`
//! the restore makes a fresh pid namespace and gives every process and
//! thread that pid again (`clone3` with `set_tid`, see
//! [`crate::sys::pidns`]). [`check`] says beforehand, by name, what
//! cannot be: processes from different pid namespaces, pids missing from
//! the image, one pid twice, a pid 1 that is not the root, a pid above the
//! destination's `pid_max`.
//!
//! Pid 1 of the new namespace is the restored root itself when its pid
//! was 1; otherwise a tiny reaper made by the restore
//! ([`REAPER_CODE`]): it reaps whatever is orphaned to it and exits when
//! nothing in the namespace is left, and killing it kills the namespace.

use ferry_proto::pb;

/// Errors of `--keep-pids`: why a tree cannot keep its pids.
#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no NSpid line")]
    NoNsPid { path: String },
    #[error(
        "--keep-pids: process {pid} ({comm}) has no pid of its own pid namespace in the image (dumped by an older ferry)"
    )]
    NotRecorded { pid: i32, comm: String },
    #[error(
        "--keep-pids: process {pid} ({comm}) is in pid namespace {ns}, the root in {root_ns}: a tree from nested pid namespaces is not supported"
    )]
    Nested {
        pid: i32,
        comm: String,
        ns: u64,
        root_ns: u64,
    },
    #[error("--keep-pids: pid {ns_pid} is both process/thread {a} and {b}")]
    Twice { ns_pid: i32, a: i32, b: i32 },
    #[error(
        "--keep-pids: process {pid} ({comm}) has pid 1 in its namespace but is not the root of the tree"
    )]
    NotRootInit { pid: i32, comm: String },
    #[error("--keep-pids: {what} {pid} needs pid {ns_pid}, above this host's pid_max ({pid_max})")]
    AbovePidMax {
        what: &'static str,
        pid: i32,
        ns_pid: i32,
        pid_max: i32,
    },
}

/// The pids of `/proc/.../status`'s `NSpid` line, outermost first.
pub fn parse_nspid(status: &str) -> Option<Vec<i32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let ids: Option<Vec<i32>> = line.split_whitespace().map(|w| w.parse().ok()).collect();
    ids.filter(|v| !v.is_empty())
}

/// Process `pid`'s pid in its own (innermost) pid namespace.
pub fn ns_pid(pid: i32) -> Result<i32, PidNsError> {
    innermost(format!("/proc/{pid}/status"))
}

/// The pid of `path` (a status file) in its innermost pid namespace.
fn innermost(path: String) -> Result<i32, PidNsError> {
    let text = std::fs::read_to_string(&path).map_err(|source| PidNsError::Read {
        path: path.clone(),
        source,
    })?;
    parse_nspid(&text)
        .and_then(|v| v.last().copied())
        .ok_or(PidNsError::NoNsPid { path })
}

/// Fills `ns_pid`, `pid_ns` and every thread's `ns_tid` of a tree whose
/// processes are frozen (or zombies) and still there.
pub fn record(tree: &mut pb::ProcessTree) -> Result<(), PidNsError> {
    for p in &mut tree.processes {
        p.ns_pid = innermost(format!("/proc/{}/status", p.pid))?;
        p.pid_ns = crate::sys::pidns::pid_ns_inode(p.pid).map_err(|errno| PidNsError::Read {
            path: format!("/proc/{}/ns/pid", p.pid),
            source: std::io::Error::from_raw_os_error(errno as i32),
        })?;
        for t in &mut p.threads {
            t.ns_tid = innermost(format!("/proc/{}/task/{}/status", p.pid, t.tid))?;
        }
    }
    Ok(())
}

/// Can `tree` keep its pids in one fresh pid namespace whose `pid_max` is
/// `pid_max`? Pure: what [`record`] put in the image against the rules.
pub fn check(tree: &pb::ProcessTree, pid_max: i32) -> Result<(), PidNsError> {
    let Some(root) = tree.processes.first() else {
        return Ok(());
    };
    let mut seen: std::collections::HashMap<i32, i32> = std::collections::HashMap::new();
    let mut take = |ns_pid: i32, who: i32| match seen.insert(ns_pid, who) {
        Some(a) if a != who => Err(PidNsError::Twice { ns_pid, a, b: who }),
        _ => Ok(()),
    };
    for (i, p) in tree.processes.iter().enumerate() {
        let comm = || p.comm.clone();
        if p.ns_pid <= 0 || p.pid_ns == 0 {
            return Err(PidNsError::NotRecorded {
                pid: p.pid,
                comm: comm(),
            });
        }
        if p.pid_ns != root.pid_ns {
            return Err(PidNsError::Nested {
                pid: p.pid,
                comm: comm(),
                ns: p.pid_ns,
                root_ns: root.pid_ns,
            });
        }
        if p.ns_pid == 1 && i != 0 {
            return Err(PidNsError::NotRootInit {
                pid: p.pid,
                comm: comm(),
            });
        }
        let above = |what, pid, ns_pid| PidNsError::AbovePidMax {
            what,
            pid,
            ns_pid,
            pid_max,
        };
        if p.ns_pid >= pid_max {
            return Err(above("process", p.pid, p.ns_pid));
        }
        take(p.ns_pid, p.pid)?;
        for t in &p.threads {
            if t.ns_tid <= 0 {
                return Err(PidNsError::NotRecorded {
                    pid: t.tid,
                    comm: comm(),
                });
            }
            if t.ns_tid >= pid_max {
                return Err(above("thread", t.tid, t.ns_tid));
            }
            // The main thread's tid is its process's pid.
            take(t.ns_tid, if t.tid == p.pid { p.pid } else { t.tid })?;
        }
    }
    Ok(())
}

/// [`check`] on the running processes `pids` (the root first), before any
/// freeze: their namespaces and thread ids as they are now (the
/// destination's `pid_max` is checked there).
pub fn precheck(pids: &[i32]) -> Result<(), PidNsError> {
    let mut processes = Vec::with_capacity(pids.len());
    for &pid in pids {
        let dir = format!("/proc/{pid}/task");
        let mut threads = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|source| PidNsError::Read {
            path: dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // A thread that ends meanwhile is no reason to refuse.
            if let Ok(ns_tid) = innermost(format!("{dir}/{tid}/status")) {
                threads.push(pb::Thread {
                    tid,
                    ns_tid,
                    ..Default::default()
                });
            }
        }
        processes.push(pb::Process {
            pid,
            comm: crate::procfs::read_comm(pid).unwrap_or_default(),
            ns_pid: innermost(format!("/proc/{pid}/status"))?,
            pid_ns: crate::sys::pidns::pid_ns_inode(pid).map_err(|errno| PidNsError::Read {
                path: format!("/proc/{pid}/ns/pid"),
                source: std::io::Error::from_raw_os_error(errno as i32),
            })?,
            threads,
            ..Default::default()
        });
    }
    check(&pb::ProcessTree { processes }, i32::MAX)
}

/// This host's `pid_max` (a new pid namespace starts with its creator's).
pub fn pid_max() -> Result<i32, PidNsError> {
    let path = "/proc/sys/kernel/pid_max".to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| PidNsError::Read {
        path: path.clone(),
        source,
    })?;
    text.trim().parse().map_err(|_| PidNsError::Read {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, text.trim().to_string()),
    })
}

/// Offset of the reaper's loop in [`REAPER_CODE`].
pub const REAPER_ENTRY: usize = 0;

/// The reaper, pid 1 of a namespace whose restored root had another pid
/// (x86_64, no stack, no memory but its own code):
///
/// ```text
/// again: wait4(-1, NULL, 0, NULL)
///        if rax != -ECHILD: goto again     (reaped one, or EINTR)
///        exit_group(0)                     (nothing left to reap)
/// ```
///
/// It only runs once the root is its child, so `-ECHILD` means the
/// namespace is empty. Every signal is at its default, which the kernel
/// ignores for a namespace's init unless it comes from outside as
/// `SIGKILL`/`SIGSTOP`.
pub const REAPER_CODE: [u8; 38] = [
    0x48, 0xc7, 0xc7, 0xff, 0xff, 0xff, 0xff, // mov rdi, -1
    0x31, 0xf6, // xor esi, esi
    0x31, 0xd2, // xor edx, edx
    0x45, 0x31, 0xd2, // xor r10d, r10d
    0xb8, 0x3d, 0x00, 0x00, 0x00, // mov eax, 61 (wait4)
    0x0f, 0x05, // syscall
    0x48, 0x83, 0xf8, 0xf6, // cmp rax, -10 (-ECHILD)
    0x75, 0xe5, // jne again (-27)
    0x31, 0xff, // xor edi, edi
    0xb8, 0xe7, 0x00, 0x00, 0x00, // mov eax, 231 (exit_group)
    0x0f, 0x05, // syscall
    0x0f, 0x0b, // ud2
];

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(tid: i32, ns_tid: i32) -> pb::Thread {
        pb::Thread {
            tid,
            ns_tid,
            ..Default::default()
        }
    }

    fn proc(pid: i32, ns_pid: i32, ns: u64, tids: &[(i32, i32)]) -> pb::Process {
        let mut threads = vec![thread(pid, ns_pid)];
        threads.extend(tids.iter().map(|&(t, n)| thread(t, n)));
        pb::Process {
            pid,
            ns_pid,
            pid_ns: ns,
            comm: format!("p{pid}"),
            threads,
            ..Default::default()
        }
    }

    fn tree(p: Vec<pb::Process>) -> pb::ProcessTree {
        pb::ProcessTree { processes: p }
    }

    #[test]
    fn nspid_is_read_outermost_first() {
        let s = "Name:\tx\nTgid:\t900\nNSpid:\t900\t12\t3\nNSpgid:\t900\n";
        assert_eq!(parse_nspid(s), Some(vec![900, 12, 3]));
        assert_eq!(parse_nspid("NSpid:\t42\n"), Some(vec![42]));
        assert_eq!(parse_nspid("Name:\tx\n"), None);
        assert_eq!(parse_nspid("NSpid:\tx\n"), None);
    }

    #[test]
    fn a_tree_of_one_namespace_keeps_its_pids() {
        let t = tree(vec![
            proc(900, 5, 7, &[(901, 6), (902, 9)]),
            proc(903, 7, 7, &[]),
        ]);
        check(&t, 4_194_304).unwrap();
        // Pid 1 as the root is fine.
        check(&tree(vec![proc(900, 1, 7, &[(901, 2)])]), 32768).unwrap();
    }

    #[test]
    fn what_cannot_keep_its_pids_is_named() {
        let e = check(&tree(vec![proc(900, 0, 7, &[])]), 32768).unwrap_err();
        assert!(matches!(e, PidNsError::NotRecorded { pid: 900, .. }), "{e}");
        let e = check(
            &tree(vec![proc(900, 5, 7, &[]), proc(903, 1, 8, &[])]),
            32768,
        )
        .unwrap_err();
        assert!(e.to_string().contains("process 903 (p903)"), "{e}");
        assert!(e.to_string().contains("nested pid namespaces"), "{e}");
        let e = check(
            &tree(vec![proc(900, 5, 7, &[]), proc(903, 1, 7, &[])]),
            32768,
        )
        .unwrap_err();
        assert!(matches!(e, PidNsError::NotRootInit { pid: 903, .. }), "{e}");
        let e = check(&tree(vec![proc(900, 5, 7, &[(901, 5)])]), 32768).unwrap_err();
        assert!(
            matches!(
                e,
                PidNsError::Twice {
                    ns_pid: 5,
                    a: 900,
                    b: 901
                }
            ),
            "{e}"
        );
        let e = check(&tree(vec![proc(900, 5, 7, &[(901, 40000)])]), 32768).unwrap_err();
        assert!(
            e.to_string().contains("thread 901 needs pid 40000")
                && e.to_string().contains("pid_max (32768)"),
            "{e}"
        );
        let e = check(&tree(vec![proc(900, 0, 7, &[])]), 32768).unwrap_err();
        assert!(e.to_string().contains("process 900 (p900)"), "{e}");
    }

    #[test]
    fn the_reaper_loops_back_to_its_wait4() {
        // The jne's target is the loop's start.
        let jne = REAPER_CODE.windows(1).position(|w| w[0] == 0x75).unwrap();
        let target = (jne + 2) as i64 + (REAPER_CODE[jne + 1] as i8) as i64;
        assert_eq!(target, REAPER_ENTRY as i64);
        // Both syscalls are there: wait4 (61) then exit_group (231).
        let calls: Vec<usize> = REAPER_CODE
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w == &[0x0f, 0x05])
            .map(|(i, _)| i)
            .collect();
        assert_eq!(calls.len(), 2);
        assert_eq!(REAPER_CODE[calls[0] - 4], 61);
        assert_eq!(REAPER_CODE[calls[1] - 4], 231);
    }
}
