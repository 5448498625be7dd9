//! Process trees on the source: finding every process under a root,
//! seizing and freezing them together, and the address-space tags that
//! keep their pages apart in one image.
//!
//! **Discovery.** `/proc/PID/task/TID/children` needs `CONFIG_PROC_CHILDREN`,
//! which kernels often lack (this one included), so the tree is found by
//! one pass over `/proc/*/status` (`PPid`) and [`subtree`], a pure function,
//! orders it: the root first, every process after its parent (breadth
//! first, siblings by pid), the order `pb::ProcessTree` promises.
//!
//! **Freezing a tree.** Each process gets its own [`Tracee`] (its own
//! tracer thread). A running process may fork between the scan and the
//! freeze, so [`TreeTracee::freeze`] freezes what it knows, scans again,
//! seizes and freezes the newcomers, and repeats until a scan finds nothing
//! new: a frozen process cannot fork, so once every known process is frozen
//! and the scan is unchanged, the tree is complete. Processes that left the
//! tree meanwhile (exited and reaped, or reparented away) are let go.
//! Zombies are not seized (they have nothing to freeze); the freeze's last
//! scan records them with their wait status, so the restore can make each
//! again as a child of its parent that has exited, still to be reaped. A
//! zombie killed by a signal is refused by name (the restore only makes
//! zombies that exited).
//!
//! **One image, several address spaces** (DESIGN.md §5 extended). Pages of
//! different processes live at the same addresses, so every address in a
//! layer (runs and VMAs) carries its process's *space* in the top byte:
//! `space << 56 | addr`. User addresses are below 2^56 even with 5-level
//! paging, so the tag never collides with an address. The root is space 0,
//! untagged: a one-process image is byte for byte what it was before trees
//! existed, and the wire, the stores (keyed by address), flatten and the
//! fuzz corpus need no change. The kernel-provided `[vsyscall]` mapping
//! (above 2^56) is listed for the root only. `pb::Process.space` records
//! which space holds each process's pages; [`split_vmas`] takes a layer's
//! VMA list apart again. (The alternative, one page-server session per
//! process, would have needed a second level of sessions on the server,
//! one commit over several of them, and a restore gathering them: far
//! more moving parts for the same result.)
//!
//! **Restore order** ([`plan`], pure): processes are forked from their
//! parent in tree order, each given its session (`setsid`) and then its
//! group (`setpgid`) before it forks children of its own, as CRIU does;
//! [`check_tree`] refuses by name what the restore cannot make yet.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;

use ferry_proto::pb;

use crate::procfs::{self, ProcError};
use crate::sys::ptrace::{PtraceError, Tracee};

/// The tag's position: addresses below `1 << SPACE_SHIFT` are user space.
pub const SPACE_SHIFT: u32 = 56;
/// Spaces a tree may have (tags 0..MAX_SPACES). 255 rather than 256 so that
/// no tagged range comes near `[vsyscall]` at 0xffff_ffff_ff60_0000.
pub const MAX_SPACES: u32 = 255;
/// Scans of a tree whose processes keep forking before giving up.
const MAX_PASSES: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("no process {0}")]
    NoProcess(i32),
    #[error(
        "process {pid} ({comm}), child of {ppid}, is a zombie killed by signal {signal}: migrating such zombies is not supported yet"
    )]
    Zombie {
        pid: i32,
        comm: String,
        ppid: i32,
        signal: i32,
    },
    #[error(
        "the tree of process {root} has {count} processes, at most {MAX_SPACES} are supported"
    )]
    TooMany { root: i32, count: usize },
    #[error("the tree of process {0} kept changing over {MAX_PASSES} scans")]
    Unstable(i32),
    #[error("process {pid} of the tree: {source}")]
    Ptrace {
        pid: i32,
        #[source]
        source: PtraceError,
    },
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("listing /proc: {0}")]
    ListProc(#[source] std::io::Error),
    #[error("mapping {start:#x}-{end:#x} of space {space} lies above user space")]
    NotUser { space: u32, start: u64, end: u64 },
}

// ---------------------------------------------------------------- tags

/// `addr` of space `space` as it travels in a layer.
pub fn tag(space: u32, addr: u64) -> u64 {
    (u64::from(space) << SPACE_SHIFT) | addr
}

/// The space and the process's own address of a tagged address.
pub fn untag(addr: u64) -> (u32, u64) {
    (
        (addr >> SPACE_SHIFT) as u32,
        addr & ((1u64 << SPACE_SHIFT) - 1),
    )
}

/// The VMAs of `space` as a layer lists them: tagged, and without
/// `[vsyscall]` (the kernel's, above user space) except for the root.
pub fn tag_vmas(space: u32, vmas: Vec<pb::Vma>) -> Result<Vec<pb::Vma>, TreeError> {
    if space == 0 {
        return Ok(vmas);
    }
    let mut out = Vec::with_capacity(vmas.len());
    for mut v in vmas {
        if v.kind() == pb::VmaKind::Vsyscall {
            continue;
        }
        if v.end >= 1u64 << SPACE_SHIFT {
            return Err(TreeError::NotUser {
                space,
                start: v.start,
                end: v.end,
            });
        }
        v.start = tag(space, v.start);
        v.end = tag(space, v.end);
        out.push(v);
    }
    Ok(out)
}

/// A layer's VMA list taken apart by space, each with its own addresses,
/// spaces ascending. `[vsyscall]` belongs to the root.
pub fn split_vmas(vmas: &[pb::Vma]) -> BTreeMap<u32, Vec<pb::Vma>> {
    let mut out: BTreeMap<u32, Vec<pb::Vma>> = BTreeMap::new();
    for v in vmas {
        if v.kind() == pb::VmaKind::Vsyscall {
            out.entry(0).or_default().push(v.clone());
            continue;
        }
        let (space, start) = untag(v.start);
        let mut v = v.clone();
        v.start = start;
        v.end = untag(v.end).1;
        out.entry(space).or_default().push(v);
    }
    out
}

// ---------------------------------------------------------------- shape

/// One process as a scan of `/proc` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub pid: i32,
    pub ppid: i32,
    /// `State:` of /proc/PID/status ('Z' for a zombie).
    pub state: char,
    pub comm: String,
}

/// The processes under `root` (itself included) in tree order: the root
/// first, then breadth first, siblings by pid, so every process comes after
/// its parent. Empty if `root` is not among `all`.
pub fn subtree(root: i32, all: &[Seen]) -> Vec<Seen> {
    let mut children: BTreeMap<i32, Vec<&Seen>> = BTreeMap::new();
    let mut root_seen = None;
    for s in all {
        if s.pid == root {
            root_seen = Some(s);
        } else {
            children.entry(s.ppid).or_default().push(s);
        }
    }
    let Some(r) = root_seen else {
        return Vec::new();
    };
    for c in children.values_mut() {
        c.sort_by_key(|s| s.pid);
    }
    let mut out = vec![r.clone()];
    let mut seen = HashSet::from([root]);
    let mut i = 0;
    while i < out.len() {
        let pid = out[i].pid;
        for c in children.get(&pid).into_iter().flatten() {
            // A pid cycle cannot happen in a consistent scan; a torn one
            // must not loop.
            if seen.insert(c.pid) {
                out.push((*c).clone());
            }
        }
        i += 1;
    }
    out
}

/// The wait status in the text of /proc/PID/stat (field 52, `exit_code`),
/// if the kernel shows it.
pub fn parse_exit_status(stat: &str) -> Option<i32> {
    // Fields after the comm, which may hold spaces and parentheses: the
    // state is field 3, so field 52 is the 50th.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(49)?.parse().ok()
}

/// The wait status of zombie `pid`.
pub fn exit_status(pid: i32) -> Result<i32, TreeError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|_| TreeError::NoProcess(pid))?;
    parse_exit_status(&text).ok_or(TreeError::NoProcess(pid))
}

/// The zombies of a tree with their wait status; one killed by a signal
/// is refused by name.
pub fn zombies(tree: &[Seen]) -> Result<Vec<(Seen, i32)>, TreeError> {
    let mut out = Vec::new();
    for z in tree.iter().filter(|s| s.state == 'Z') {
        let status = exit_status(z.pid)?;
        if status & 0x7f != 0 {
            return Err(TreeError::Zombie {
                pid: z.pid,
                comm: z.comm.clone(),
                ppid: z.ppid,
                signal: status & 0x7f,
            });
        }
        out.push((z.clone(), status));
    }
    Ok(out)
}

/// Orders the processes of an image as `pb::ProcessTree` wants them (root
/// first, children after their parent), given the root's pid.
pub fn order_processes(root: i32, procs: Vec<pb::Process>) -> Vec<pb::Process> {
    let seen: Vec<Seen> = procs
        .iter()
        .map(|p| Seen {
            pid: p.pid,
            ppid: p.ppid,
            state: 'S',
            comm: String::new(),
        })
        .collect();
    let order = subtree(root, &seen);
    let mut by_pid: BTreeMap<i32, pb::Process> = procs.into_iter().map(|p| (p.pid, p)).collect();
    order.iter().filter_map(|s| by_pid.remove(&s.pid)).collect()
}

// ---------------------------------------------------------------- restore

/// How the restore sets up process `i` of a tree right after forking it
/// from its parent, before it forks children of its own (so they inherit
/// the result): a session first, then a group, the order CRIU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// Index of the parent in the tree (`None` for the root).
    pub parent: Option<usize>,
    /// `setsid()`: the process leads its own session (and group).
    pub setsid: bool,
    pub group: Group,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Stays in the group it was forked into (its parent's).
    Inherit,
    /// `setpgid(0, 0)`: leads a group of its own.
    Own,
    /// `setpgid(0, leader)`: joins the group led by process `.0` of the tree
    /// (restored earlier, same session).
    Join(usize),
}

/// The restore plan of a tree's sessions and groups (`procs` root first).
/// The root is restored leading a new session and group whatever it had
/// (a session it only belonged to lies outside the tree); below it every
/// session and group must be made inside the tree, in tree order: a
/// process's session is its own or its parent's, its group its own, its
/// parent's, or one led by a process before it in the same session.
pub fn plan(procs: &[pb::Process]) -> Result<Vec<Setup>, String> {
    let mut out = Vec::with_capacity(procs.len());
    for (i, p) in procs.iter().enumerate() {
        if i == 0 {
            out.push(Setup {
                parent: None,
                setsid: false,
                group: Group::Inherit,
            });
            continue;
        }
        let name = format!("process {} ({})", p.pid, p.comm);
        let parent = procs[..i]
            .iter()
            .position(|q| q.pid == p.ppid)
            .ok_or_else(|| format!("{name}: its parent {} comes not before it", p.ppid))?;
        let pp = &procs[parent];
        let setsid = p.sid == p.pid;
        if !setsid && p.sid != pp.sid {
            return Err(format!(
                "{name}: session {} is neither its own nor its parent's ({})",
                p.sid, pp.sid
            ));
        }
        let group = if setsid {
            if p.pgid != p.pid {
                return Err(format!(
                    "{name}: leads session {} but is in group {}",
                    p.sid, p.pgid
                ));
            }
            Group::Inherit
        } else if p.pgid == p.pid {
            Group::Own
        } else if p.pgid == pp.pgid {
            Group::Inherit
        } else {
            match procs[..i]
                .iter()
                .position(|q| q.pid == p.pgid && q.sid == p.sid)
            {
                Some(j) => Group::Join(j),
                None => {
                    return Err(format!(
                        "{name}: its process group {} is led by no process restored before it in its session",
                        p.pgid
                    ))
                }
            }
        };
        out.push(Setup {
            parent: Some(parent),
            setsid,
            group,
        });
    }
    Ok(out)
}

/// What a tree image holds that the restore cannot make yet, by name:
/// System V shared memory.
/// A tree that is not one (root not first, a parent after its child,
/// two processes in one space) is refused too, as are its sessions and
/// groups when [`plan`] has no order for them.
pub fn check_tree(procs: &[pb::Process]) -> Result<(), String> {
    let Some(root) = procs.first() else {
        return Err("an empty process tree".into());
    };
    if root.space != 0 {
        return Err(format!(
            "the root {} has space {}, not 0",
            root.pid, root.space
        ));
    }
    let mut spaces = HashSet::new();
    for p in procs {
        if p.zombie {
            if p.exit_status & 0x7f != 0 {
                return Err(format!(
                    "process {} ({}): a zombie killed by signal {}",
                    p.pid,
                    p.comm,
                    p.exit_status & 0x7f
                ));
            }
            if let Some(c) = procs.iter().find(|c| c.ppid == p.pid) {
                return Err(format!(
                    "process {} ({}): a child of zombie {}",
                    c.pid, c.comm, p.pid
                ));
            }
            continue;
        }
        if !spaces.insert(p.space) || p.space >= MAX_SPACES {
            return Err(format!(
                "process {}: space {} taken twice or out of range",
                p.pid, p.space
            ));
        }
    }
    // A FIFO open in several processes is opened by each at its path and
    // filled once (the restore finds its bytes there already); shared
    // memory is made once (crate::shmem). System V segments are not.
    for p in procs {
        if let Some(v) = p
            .vmas
            .iter()
            .find(|v| v.kind() == pb::VmaKind::SharedAnon && v.name.starts_with("/SYSV"))
        {
            return Err(format!(
                "mapping {:#x}-{:#x} of process {} ({}): System V shared memory {}",
                v.start, v.end, p.pid, p.comm, v.name
            ));
        }
    }
    plan(procs).map(|_| ())
}

/// Scans `/proc` once. Processes that vanish while it runs are skipped.
pub fn scan() -> Result<Vec<Seen>, TreeError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(TreeError::ListProc)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        match procfs::read_status(pid) {
            Ok(st) if !st.kthread => out.push(Seen {
                pid,
                ppid: st.ppid,
                state: st.state,
                comm: st.name,
            }),
            Ok(_) | Err(ProcError::NoProcess(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The live tree under `root`, in tree order.
pub fn discover(root: i32) -> Result<Vec<Seen>, TreeError> {
    let tree = subtree(root, &scan()?);
    if tree.is_empty() {
        return Err(TreeError::NoProcess(root));
    }
    Ok(tree)
}

// ---------------------------------------------------------------- tracing

/// One process of a seized tree.
pub struct Member {
    pub space: u32,
    pub pid: i32,
    pub tracee: Tracee,
}

/// Every process of a tree under ptrace, each with its [`Tracee`]. The
/// members found by [`TreeTracee::seize`] never move (trackers borrow their
/// tracees for the whole dump); processes found later, at the freeze, are
/// kept apart in `late`. Dropping it lets every process go, running.
pub struct TreeTracee {
    root: i32,
    members: Vec<Member>,
    late: Mutex<Vec<Member>>,
    /// Pids no longer part of the tree (exited, reparented away).
    gone: Mutex<BTreeSet<i32>>,
    /// The zombies of the tree at the freeze, with their wait status.
    zombies: Mutex<Vec<(Seen, i32)>>,
}

fn seize_one(pid: i32) -> Result<Tracee, TreeError> {
    Tracee::seize(pid).map_err(|source| TreeError::Ptrace { pid, source })
}

impl TreeTracee {
    /// Seizes `root` and every process under it, scanning again until a
    /// scan finds no process not yet seized. Zombies killed by a signal are
    /// refused before
    /// anything is seized. The processes keep running.
    pub fn seize(root: i32) -> Result<TreeTracee, TreeError> {
        // The root first: its refusals (no such process, a kernel thread,
        // a thread id) are the precise ones.
        let tracee = seize_one(root)?;
        zombies(&discover(root)?)?;
        let mut members = vec![Member {
            space: 0,
            pid: root,
            tracee,
        }];
        for _ in 0..MAX_PASSES {
            let tree = discover(root)?;
            let new: Vec<&Seen> = tree
                .iter()
                .filter(|s| s.state != 'Z' && !members.iter().any(|m| m.pid == s.pid))
                .collect();
            if new.is_empty() {
                return Ok(TreeTracee {
                    root,
                    members,
                    late: Mutex::new(Vec::new()),
                    gone: Mutex::new(BTreeSet::new()),
                    zombies: Mutex::new(Vec::new()),
                });
            }
            for s in new {
                let space = members.len() as u32;
                if space >= MAX_SPACES {
                    return Err(TreeError::TooMany {
                        root,
                        count: tree.len(),
                    });
                }
                match seize_one(s.pid) {
                    Ok(tracee) => members.push(Member {
                        space,
                        pid: s.pid,
                        tracee,
                    }),
                    // Exited since the scan: the next scan shows it gone.
                    Err(TreeError::Ptrace {
                        source: PtraceError::NoProcess(_) | PtraceError::Zombie(_),
                        ..
                    }) if s.pid != root => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Err(TreeError::Unstable(root))
    }

    pub fn root(&self) -> i32 {
        self.root
    }

    /// The root's tracee.
    pub fn root_tracee(&self) -> &Tracee {
        &self.members[0].tracee
    }

    /// The members found by [`TreeTracee::seize`] (root first), including
    /// any gone since.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Whether `pid` has left the tree since it was seized.
    pub fn is_gone(&self, pid: i32) -> bool {
        self.gone.lock().map(|g| g.contains(&pid)).unwrap_or(false)
    }

    /// Freezes the whole tree (see the module documentation) and returns
    /// the `(space, pid)` of processes that joined it since the seize.
    /// Idempotent. A zombie in the tree, or a process that cannot be
    /// frozen, is an error; the tree then runs on once this is dropped.
    pub fn freeze(&self) -> Result<Vec<(u32, i32)>, TreeError> {
        let mut late = self.late.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        let mut joined = Vec::new();
        for _ in 0..MAX_PASSES {
            for m in self.members.iter().chain(late.iter()) {
                if gone.contains(&m.pid) {
                    continue;
                }
                match m.tracee.freeze() {
                    Ok(()) => {}
                    Err(PtraceError::NoProcess(_) | PtraceError::ThreadExited(_))
                        if m.pid != self.root =>
                    {
                        gone.insert(m.pid);
                    }
                    Err(source) => return Err(TreeError::Ptrace { pid: m.pid, source }),
                }
            }
            let tree = discover(self.root)?;
            let dead = zombies(&tree)?;
            let in_tree: HashSet<i32> = tree
                .iter()
                .filter(|s| s.state != 'Z')
                .map(|s| s.pid)
                .collect();
            for m in self.members.iter().chain(late.iter()) {
                if !gone.contains(&m.pid) && !in_tree.contains(&m.pid) {
                    // Reparented away or exited: no longer ours to move.
                    let _ = m.tracee.thaw();
                    gone.insert(m.pid);
                }
            }
            let known = |pid: i32| {
                self.members.iter().chain(late.iter()).any(|m| m.pid == pid) && !gone.contains(&pid)
            };
            let new: Vec<i32> = tree
                .iter()
                .filter(|s| s.state != 'Z')
                .map(|s| s.pid)
                .filter(|&p| !known(p))
                .collect();
            if new.is_empty() {
                *self.zombies.lock().unwrap_or_else(|p| p.into_inner()) = dead;
                return Ok(joined);
            }
            for pid in new {
                let space = (self.members.len() + late.len()) as u32;
                if space >= MAX_SPACES {
                    return Err(TreeError::TooMany {
                        root: self.root,
                        count: tree.len(),
                    });
                }
                match seize_one(pid) {
                    Ok(tracee) => {
                        late.push(Member { space, pid, tracee });
                        joined.push((space, pid));
                    }
                    Err(TreeError::Ptrace {
                        source: PtraceError::NoProcess(_),
                        ..
                    }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Err(TreeError::Unstable(self.root))
    }

    /// Runs `f` on every live member, root first, then the late ones.
    pub fn each<T>(
        &self,
        mut f: impl FnMut(&Member) -> Result<T, TreeError>,
    ) -> Result<Vec<T>, TreeError> {
        let late = self.late.lock().unwrap_or_else(|p| p.into_inner());
        let gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        self.members
            .iter()
            .chain(late.iter())
            .filter(|m| !gone.contains(&m.pid))
            .map(&mut f)
            .collect()
    }

    /// Runs `f` on every live member at once, one thread each (each
    /// member's tracee has its own tracer thread, so nothing waits on
    /// another process); results root first, then the late ones.
    pub fn each_parallel<T: Send>(&self, f: impl Fn(&Member) -> T + Sync) -> Vec<T> {
        let late = self.late.lock().unwrap_or_else(|p| p.into_inner());
        let gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        let live: Vec<&Member> = self
            .members
            .iter()
            .chain(late.iter())
            .filter(|m| !gone.contains(&m.pid))
            .collect();
        let f = &f;
        std::thread::scope(|s| {
            let running: Vec<_> = live.iter().map(|&m| s.spawn(move || f(m))).collect();
            running
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// The zombies the freeze found, with their wait status.
    pub fn zombies(&self) -> Vec<(Seen, i32)> {
        self.zombies.lock().map(|z| z.clone()).unwrap_or_default()
    }

    /// Pids of the live members, root first.
    pub fn pids(&self) -> Vec<i32> {
        self.each(|m| Ok(m.pid)).unwrap_or_default()
    }

    /// Takes the live members out, root first, the gone ones let go.
    pub fn into_members(self) -> Vec<Member> {
        let gone = self.gone.into_inner().unwrap_or_else(|p| p.into_inner());
        let late = self.late.into_inner().unwrap_or_else(|p| p.into_inner());
        self.members
            .into_iter()
            .chain(late)
            .filter(|m| !gone.contains(&m.pid))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(pid: i32, ppid: i32) -> Seen {
        Seen {
            pid,
            ppid,
            state: 'S',
            comm: format!("p{pid}"),
        }
    }

    fn pids(v: &[Seen]) -> Vec<i32> {
        v.iter().map(|s| s.pid).collect()
    }

    #[test]
    fn subtree_puts_every_process_after_its_parent() {
        // 10 -> {30, 20}, 20 -> {40}, 30 -> {25}; 99 and 5 are strangers.
        let all = vec![
            seen(40, 20),
            seen(99, 1),
            seen(30, 10),
            seen(10, 1),
            seen(25, 30),
            seen(20, 10),
            seen(5, 99),
        ];
        let t = subtree(10, &all);
        assert_eq!(pids(&t), vec![10, 20, 30, 40, 25]);
        for (i, s) in t.iter().enumerate().skip(1) {
            let parent = t.iter().position(|p| p.pid == s.ppid).unwrap();
            assert!(parent < i, "{} before its parent {}", s.pid, s.ppid);
        }
        assert_eq!(pids(&subtree(30, &all)), vec![30, 25]);
        assert_eq!(pids(&subtree(40, &all)), vec![40]);
        assert!(subtree(7, &all).is_empty());
    }

    #[test]
    fn a_torn_scan_with_a_cycle_ends() {
        let all = vec![seen(1, 3), seen(2, 1), seen(3, 2)];
        assert_eq!(pids(&subtree(1, &all)), vec![1, 2, 3]);
    }

    #[test]
    fn the_exit_status_is_field_52_of_stat() {
        // A zombie python3 that called os._exit(3), its comm with a space
        // and a parenthesis to make the split honest.
        let mut f: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        f[0] = "Z".into();
        f[49] = "768".into();
        let stat = format!("4242 (a) b) {}\n", f.join(" "));
        assert_eq!(parse_exit_status(&stat), Some(768));
        assert_eq!(parse_exit_status("4242 (short) Z 1 2"), None);
        assert_eq!(parse_exit_status("no parenthesis"), None);
    }

    #[test]
    fn processes_are_ordered_root_first() {
        let p = |pid, ppid| pb::Process {
            pid,
            ppid,
            ..Default::default()
        };
        let v = order_processes(5, vec![p(9, 7), p(7, 5), p(5, 1), p(6, 5)]);
        let got: Vec<i32> = v.iter().map(|p| p.pid).collect();
        assert_eq!(got, vec![5, 6, 7, 9]);
    }

    fn proc(pid: i32, ppid: i32, pgid: i32, sid: i32) -> pb::Process {
        pb::Process {
            pid,
            ppid,
            pgid,
            sid,
            space: pid as u32 % 100,
            comm: format!("p{pid}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_shell_job_inherits_the_roots_session_and_group() {
        // sh -c 'a | b' started from a terminal: nobody in the tree leads
        // the session (1) or the group (7).
        let t = vec![
            proc(100, 7, 7, 1),
            proc(101, 100, 7, 1),
            proc(102, 100, 7, 1),
        ];
        let p = plan(&t).unwrap();
        assert_eq!(p[0].parent, None);
        for s in &p[1..] {
            assert_eq!(
                (s.parent, s.setsid, s.group),
                (Some(0), false, Group::Inherit)
            );
        }
    }

    #[test]
    fn sessions_come_before_groups_and_groups_join_earlier_leaders() {
        // 100 leads session and group 100; 101 leads its own group with
        // 103 (a grandchild) in it; 102 starts a session of its own; 104
        // joins group 101 from a cousin branch.
        let t = vec![
            proc(100, 1, 100, 100),
            proc(101, 100, 101, 100),
            proc(102, 100, 102, 102),
            proc(103, 101, 101, 100),
            proc(104, 100, 101, 100),
        ];
        let p = plan(&t).unwrap();
        assert_eq!(p[1].group, Group::Own);
        assert!(p[2].setsid && p[2].group == Group::Inherit);
        assert_eq!((p[3].parent, p[3].group), (Some(1), Group::Inherit));
        assert_eq!((p[4].parent, p[4].group), (Some(0), Group::Join(1)));
        assert!(check_tree(&t).is_ok());
    }

    #[test]
    fn plans_without_an_order_are_refused_by_name() {
        // The group's leader comes after its member.
        let t = vec![
            proc(100, 1, 100, 100),
            proc(101, 100, 102, 100),
            proc(102, 100, 102, 100),
        ];
        let e = plan(&t).unwrap_err();
        assert!(e.contains("process 101") && e.contains("group 102"), "{e}");
        // A session that is neither its own nor its parent's.
        let t = vec![proc(100, 1, 100, 100), proc(101, 100, 101, 55)];
        assert!(plan(&t).unwrap_err().contains("session 55"));
        // A parent after its child.
        let t = vec![
            proc(100, 1, 100, 100),
            proc(102, 101, 100, 100),
            proc(101, 100, 100, 100),
        ];
        assert!(plan(&t).unwrap_err().contains("parent 101"));
    }

    #[test]
    fn fifos_and_shared_memory_between_processes_pass_but_system_v_is_refused() {
        let fd = |fd, pipe_id| pb::FileDesc {
            fd,
            kind: pb::FdKind::Fifo as i32,
            pipe_id,
            ..Default::default()
        };
        let mut t = vec![proc(100, 1, 100, 100), proc(101, 100, 100, 100)];
        t[0].fds = vec![fd(3, 9), fd(4, 9)];
        t[1].fds = vec![fd(0, 9), fd(5, 9)];
        assert!(check_tree(&t).is_ok(), "a FIFO open in both processes");
        t[1].vmas = vec![vma(0x1000, 0x2000, pb::VmaKind::SharedAnon)];
        assert!(check_tree(&t).is_ok(), "shared anonymous memory");
        t[1].vmas[0].name = "/SYSV0000abcd (deleted)".into();
        let e = check_tree(&t).unwrap_err();
        assert!(
            e.contains("0x1000-0x2000 of process 101") && e.contains("System V"),
            "{e}"
        );
        t[1].vmas.clear();
        t[1].space = 0;
        assert!(check_tree(&t).unwrap_err().contains("space 0"));
    }

    #[test]
    fn tags_round_trip_and_stay_apart() {
        let a = 0x7fff_f000_0000u64;
        assert_eq!(tag(0, a), a);
        assert_eq!(untag(tag(3, a)), (3, a));
        assert_eq!(untag(tag(MAX_SPACES - 1, a)), (MAX_SPACES - 1, a));
        assert!(tag(MAX_SPACES - 1, (1 << SPACE_SHIFT) - 1) < 0xffff_ffff_ff60_0000);
        assert!(tag(1, 0) > a);
    }

    fn vma(start: u64, end: u64, kind: pb::VmaKind) -> pb::Vma {
        pb::Vma {
            start,
            end,
            kind: kind as i32,
            ..Default::default()
        }
    }

    #[test]
    fn vmas_are_tagged_and_split_back() {
        let own = vec![
            vma(0x1000, 0x3000, pb::VmaKind::Anon),
            vma(0x7fff_0000_0000, 0x7fff_0000_1000, pb::VmaKind::Stack),
            vma(
                0xffff_ffff_ff60_0000,
                0xffff_ffff_ff60_1000,
                pb::VmaKind::Vsyscall,
            ),
        ];
        let root = tag_vmas(0, own.clone()).unwrap();
        assert_eq!(root, own);
        let child = tag_vmas(2, own.clone()).unwrap();
        assert_eq!(child.len(), 2, "no [vsyscall] for a child");
        assert_eq!(child[0].start, tag(2, 0x1000));
        let layer: Vec<pb::Vma> = root.into_iter().chain(child).collect();
        let split = split_vmas(&layer);
        assert_eq!(split.keys().copied().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(split[&0], own);
        assert_eq!(split[&2], own[..2].to_vec());
    }

    #[test]
    fn a_mapping_above_user_space_is_refused_for_a_child() {
        let high = vec![vma(
            1 << SPACE_SHIFT,
            (1 << SPACE_SHIFT) + 0x1000,
            pb::VmaKind::Anon,
        )];
        assert!(matches!(
            tag_vmas(1, high),
            Err(TreeError::NotUser { space: 1, .. })
        ));
    }
}
