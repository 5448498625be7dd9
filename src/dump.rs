//! `ferry dump`: iterative pre-dump of a live process, streamed round by
//! round, then a freeze and the final delta — CRIU's pre-dump + dump in one
//! command, without a disk in between.
//!
//! Each round: read the mappings, ask the tracker which pages changed, and
//! push them through a pipeline (a blocking reader thread doing
//! `process_vm_readv`, a bounded channel, the client's parallel QUIC lanes
//! encoding and sending), so reads, compression and the network overlap and
//! memory stays bounded by the channel and lane depths. The round policy
//! (a pure function, [`crate::policy`]) decides after each round whether
//! another pre-dump round pays or the process should be frozen.
//!
//! The target is never left stopped or traced by accident: [`Tracee`](crate::sys::ptrace::Tracee) detaches
//! (leaving it running) when dropped, which happens on every error path,
//! when ferry is interrupted (the future is dropped), and when the page
//! server goes away.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_page_server::store::disk::DiskStore;
use ferry_page_server::store::{SessionStore, Store, StoreError};
use ferry_proto::batch::{decode, Compress, Encoder, MAX_RUNS};
use ferry_proto::session::SenderConfig;
use ferry_proto::{pb, SessionId};
use tokio::sync::mpsc;

use crate::client::{Client, ClientError, CommitOutcome, Connect, LayerStats, LazyLink};
use crate::policy::{Decision, Policy, RoundStats, StopReason};
use crate::procfs::{self, MapEntry, ProcError};
use crate::state::StateError;
use crate::sys::ptrace::PtraceError;
use crate::sys::vm::{self, VmError};
use crate::track::{self, Backend, Delta, TrackError, Tracker};
use crate::tree::{TreeError, TreeTracee};

/// Pages read and sent as one batch (4 MiB of 4 KiB pages).
const BATCH_PAGES: u64 = 1024;
/// Batches read ahead of the network.
const READ_AHEAD: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    #[error("dirty tracking: {0}")]
    Track(#[from] TrackError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("reading the target's memory: {0}")]
    Read(#[from] VmError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("image directory: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    PidNs(#[from] crate::pidns::PidNsError),
    #[error("the frozen process's clocks: {0}")]
    Clocks(#[from] crate::clocks::ClockError),
    #[error("--keep-pids needs a page server's restore (ferry migrate), not an image directory")]
    KeepPidsLocal,
    #[error("--keep-pids and --post-copy together: not supported yet (--keep-pids restores cold, at commit)")]
    KeepPidsLazy,
    #[error("the destination did not keep the image: {0}")]
    Commit(String),
    #[error("the reader thread failed: {0}")]
    Reader(String),
    #[error("killing the source process {pid}: {errno}")]
    Kill { pid: i32, errno: nix::errno::Errno },
    #[error("capturing the process state: {0}")]
    State(#[from] StateError),
    #[error(transparent)]
    Socket(#[from] crate::sockets::SocketError),
    #[error("shared memory: {0}")]
    Shm(#[from] crate::shmem::ShmError),
    #[error("process tree: {0}")]
    Tree(#[from] TreeError),
    #[error("post-copy needs a page server (--to), not an images directory")]
    LazyLocal,
    #[error("post-copy of a process tree ({0} processes) is not supported yet; migrate it without --post-copy")]
    LazyTree(usize),
}

/// Where the layers go.
pub enum Destination {
    /// A page server, over QUIC.
    Remote(Connect),
    /// A local directory in the disk store's format.
    ImagesDir(PathBuf),
}

pub struct DumpOptions {
    pub pid: i32,
    pub dest: Destination,
    /// Leave the process stopped after a successful dump (else running).
    pub leave_stopped: bool,
    /// `None`: the best backend that works here.
    pub track: Option<Backend>,
    pub policy: Policy,
    pub compress: Compress,
    /// Ask the page server to restore the image on commit (`ferry migrate`);
    /// the answer is in [`DumpReport::outcome`].
    pub restore: bool,
    /// With `restore`: ask for the process (tree) to keep its pids, in a
    /// fresh pid namespace on the destination (`ferry migrate --keep-pids`).
    pub keep_pids: bool,
}

impl DumpOptions {
    /// Dumping `pid` to `dest` with the defaults of `ferry dump`: the best
    /// tracker, the default policy and compression, the process running
    /// afterwards, no restore. Callers change what they need with
    /// `DumpOptions { restore: true, ..DumpOptions::new(pid, dest) }`.
    pub fn new(pid: i32, dest: Destination) -> Self {
        DumpOptions {
            pid,
            dest,
            leave_stopped: false,
            track: None,
            policy: Policy::default(),
            compress: Compress::default(),
            restore: false,
            keep_pids: false,
        }
    }
}

/// One round as the display and `--json` show it.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: u32,
    /// The final round, with the process frozen.
    pub frozen: bool,
    /// Pages the tracker reported (data and known-zero).
    pub dirty_pages: u64,
    pub stats: LayerStats,
    /// Time to find the dirty pages.
    pub scan: Duration,
    /// Time of the whole round, scan included, until the layer was sealed.
    pub total: Duration,
    /// Policy's prediction of the downtime after this round.
    pub predicted_downtime: Option<Duration>,
}

impl RoundReport {
    pub fn rate_mb_s(&self) -> f64 {
        self.stats.raw_bytes as f64 / self.total.as_secs_f64().max(1e-9) / 1e6
    }
}

#[derive(Debug, Clone)]
pub struct DumpReport {
    pub pid: i32,
    pub session: SessionId,
    pub backend: Backend,
    pub rounds: Vec<RoundReport>,
    pub stop: StopReason,
    /// From freezing the process to the destination's acknowledgement.
    pub frozen: Duration,
    pub total: Duration,
    /// The page server's verdict on the commit (`None` for an images dir).
    pub outcome: Option<CommitOutcome>,
    /// The frozen time, part by part.
    pub parts: FrozenParts,
}

/// Where the frozen time goes (cloud-hypervisor reports downtime the same
/// way): the final round, capturing and sending the state, and the commit,
/// which with a restore is the destination rebuilding the process.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrozenParts {
    /// Freezing every thread.
    pub freeze: Duration,
    /// Finding, reading and sending the last dirty pages, until sealed.
    pub final_round: Duration,
    /// Registers, signals, files... captured and sent.
    pub state: Duration,
    /// Commit to the destination's verdict (its restore, plus a round trip).
    pub commit: Duration,
}

/// A process tree left frozen (ptrace-stopped) after a successful dump:
/// its memory is exactly what the image holds until it is released. `ferry
/// migrate` keeps it so until the destination answers; dropping it resumes
/// every process.
pub struct Frozen {
    /// Its established TCP sockets (every process's), in repair mode since
    /// the freeze. First field, so it is dropped (repair mode ended) before
    /// the tracees detach and the processes run again.
    repair: Vec<crate::sockets::TcpRepairHold>,
    tree: TreeTracee,
    /// Set once the two-phase end's `Go` went out: dropped or detached,
    /// the processes then stay stopped (see `Tracee::hold_stopped_while`).
    go: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Frozen {
    /// The root's pid.
    pub fn pid(&self) -> i32 {
        self.tree.root()
    }

    /// Every frozen process, root first.
    pub fn pids(&self) -> Vec<i32> {
        self.tree.pids()
    }

    /// Lets the processes run on, untraced.
    pub fn resume(self) -> Result<(), DumpError> {
        if let Some(go) = &self.go {
            go.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        drop(self.repair);
        detach_all(self.tree, false)
    }

    /// From here the destination owns the TCP connections: the source's
    /// stay in repair mode (silent) whatever happens to the source next.
    pub fn disarm_repair(&mut self) {
        for r in &mut self.repair {
            r.disarm();
        }
    }

    /// Detaches, leaving every process stopped (SIGSTOP).
    pub fn leave_stopped(self) -> Result<(), DumpError> {
        drop(self.repair);
        detach_all(self.tree, true)
    }

    /// Kills every process of the tree: the end of a migration, once the
    /// destination runs it. SIGKILL reaches a traced, stopped process too.
    pub fn kill(self) -> Result<(), DumpError> {
        use nix::sys::signal::{kill, Signal};
        let Frozen {
            tree, mut repair, ..
        } = self;
        // From here the destination owns the connections: the source's
        // copies of them never leave repair mode, whatever happens, and
        // close when this returns, after the source is gone.
        for r in &mut repair {
            r.disarm();
        }
        let members = tree.into_members();
        for m in &members {
            kill(nix::unistd::Pid::from_raw(m.pid), Signal::SIGKILL)
                .map_err(|errno| DumpError::Kill { pid: m.pid, errno })?;
        }
        let pids: Vec<i32> = members.iter().map(|m| m.pid).collect();
        for m in members {
            match m.tracee.detach(false) {
                Ok(()) | Err(PtraceError::NoProcess(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // SIGKILL is delivered asynchronously: report success only once the
        // source is really gone (a zombie waiting for its parent counts).
        let deadline = Instant::now() + Duration::from_secs(5);
        for pid in pids {
            loop {
                match procfs::read_status(pid) {
                    Err(ProcError::NoProcess(_)) => break,
                    Ok(st) if matches!(st.state, 'Z' | 'X') => break,
                    _ if Instant::now() > deadline => {
                        return Err(DumpError::Kill {
                            pid,
                            errno: nix::errno::Errno::ETIMEDOUT,
                        })
                    }
                    _ => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
        Ok(())
    }
}

/// Detaches every process; all are let go even if one fails, the first
/// failure is reported.
fn detach_all(tree: TreeTracee, leave_stopped: bool) -> Result<(), DumpError> {
    let mut first = None;
    for m in tree.into_members() {
        if let Err(e) = m.tracee.detach(leave_stopped) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), |e| Err(e.into()))
}

/// Runs a dump and releases the process as `opts.leave_stopped` says;
/// `progress` is called after every round.
pub async fn dump(
    opts: DumpOptions,
    progress: &mut (dyn FnMut(&RoundReport) + Send),
) -> Result<DumpReport, DumpError> {
    let leave_stopped = opts.leave_stopped;
    let (report, frozen) = dump_frozen(opts, progress).await?;
    if leave_stopped {
        frozen.leave_stopped()?;
    } else {
        frozen.resume()?;
    }
    Ok(report)
}

/// One address space of the dump: a process of the tree and its tracker.
struct Space<'t> {
    space: u32,
    pid: i32,
    tracker: Box<dyn Tracker + 't>,
}

/// Runs a dump of `opts.pid` and every process under it (see
/// [`crate::tree`]) and returns with them all still frozen.
pub async fn dump_frozen(
    opts: DumpOptions,
    progress: &mut (dyn FnMut(&RoundReport) + Send),
) -> Result<(DumpReport, Frozen), DumpError> {
    let (report, frozen, _) = dump_frozen_with(opts, false, progress).await?;
    Ok((report, frozen))
}

/// Post-copy's hand-over after `Restored`: the open connection and the
/// ranges the destination's process still lacks.
pub struct Lazy {
    pub link: LazyLink,
    pub ranges: Vec<(u64, u64)>,
}

/// Pages around each thread's stack pointer that go in before the resume
/// even in post-copy: the first thing every thread touches. Below the
/// pointer: the red zone and the next calls; above: the callers' frames.
const HOT_STACK_BELOW: u64 = 4;
const HOT_STACK_ABOVE: u64 = 12;

/// [`dump_frozen`], with `post_copy`: the last round sends only the pages
/// that cannot be left out (see [`split_lazy`]), names the rest in
/// `PostCopy`, and a `Restored` comes with the [`Lazy`] hand-over.
pub async fn dump_frozen_with(
    opts: DumpOptions,
    post_copy: bool,
    progress: &mut (dyn FnMut(&RoundReport) + Send),
) -> Result<(DumpReport, Frozen, Option<Lazy>), DumpError> {
    let t_start = Instant::now();
    let pid = opts.pid;
    let restore = opts.restore;
    if post_copy && matches!(opts.dest, Destination::ImagesDir(_)) {
        return Err(DumpError::LazyLocal);
    }
    let keep_pids = opts.keep_pids;
    if keep_pids && !restore {
        return Err(DumpError::KeepPidsLocal);
    }
    if keep_pids && post_copy {
        return Err(DumpError::KeepPidsLazy);
    }
    let tree = TreeTracee::seize(pid).map_err(|e| match e {
        // The root's own refusal keeps its precise form.
        TreeError::Ptrace { pid: p, source } if p == pid => DumpError::Ptrace(source),
        e => DumpError::Tree(e),
    })?;
    let root = track::choose(tree.root_tracee(), opts.track)?;
    let backend = root.backend();
    let mut spaces = vec![Space {
        space: 0,
        pid,
        tracker: root,
    }];
    for m in &tree.members()[1..] {
        spaces.push(Space {
            space: m.space,
            pid: m.pid,
            tracker: track::choose(&m.tracee, Some(backend))?,
        });
    }
    if post_copy && spaces.len() > 1 {
        return Err(DumpError::LazyTree(spaces.len()));
    }
    // The root's own pid, which the destination gives the process it
    // makes at the first round (a warm restore with --keep-pids).
    let mut keep_pids_root = 0;
    if keep_pids {
        // Before any freeze: a tree that cannot keep its pids is refused
        // while it runs on untouched.
        crate::pidns::precheck(&tree.pids())?;
        keep_pids_root = crate::pidns::ns_pid(pid)? as u32;
    }
    let session = SessionId(random_id());
    let mut features = Vec::new();
    if restore {
        features.push(ferry_proto::FEATURE_RESTORE.to_string());
    }
    if post_copy {
        features.push(ferry_proto::FEATURE_POST_COPY.to_string());
    }
    if restore {
        features.push(ferry_proto::FEATURE_READY_GO.to_string());
    }
    if keep_pids {
        features.push(ferry_proto::FEATURE_KEEP_PIDS.to_string());
    }
    // What the destination must be able to make, said while the process
    // runs (the state at the freeze is authoritative).
    if restore && crate::migrate::sandboxed(pid) {
        features.push(ferry_proto::FEATURE_SECCOMP.to_string());
    }
    if restore
        && tree
            .pids()
            .iter()
            .any(|&p| crate::procfs::read_posix_timers(p).is_ok_and(|t| !t.is_empty()))
    {
        features.push(ferry_proto::FEATURE_POSIX_TIMERS.to_string());
    }
    let mut sink = Sink::open(
        opts.dest,
        Opening {
            session,
            pid,
            compress: opts.compress,
            features,
            keep_pids_root,
        },
    )
    .await?;

    let mut rounds: Vec<RoundReport> = Vec::new();
    let mut history: Vec<RoundStats> = Vec::new();
    // Shared memory objects of a tree, sent once each (see crate::shmem).
    let mut shm: Option<crate::shmem::Registry> = None;
    let stop = loop {
        match opts.policy.decide(&history) {
            Decision::Freeze(reason) => break reason,
            Decision::PreDump => {}
        }
        let n = rounds.len() as u32;
        let mut r = round(&tree, &mut spaces, &mut shm, &mut sink, n, false).await?;
        history.push(RoundStats {
            pages: r.stats.pages,
            raw_bytes: r.stats.raw_bytes,
            wire_bytes: r.stats.wire_bytes,
            seconds: r.total.as_secs_f64(),
        });
        r.predicted_downtime = opts.policy.predicted_downtime(&history);
        progress(&r);
        rounds.push(r);
    };

    let t_freeze = Instant::now();
    // Processes born since the seize are frozen too and sent whole: a
    // checksum tracker's first look returns every page with content.
    for (space, pid) in tree.freeze()? {
        spaces.push(Space {
            space,
            pid,
            tracker: Box::new(track::Checksum::new(pid)?),
        });
    }
    // Dropped before the tracees on any error below: out of repair mode
    // before the processes resume.
    let repair = tree
        .pids()
        .into_iter()
        .map(crate::sockets::TcpRepairHold::enter)
        .collect::<Result<Vec<_>, _>>()?;
    let t_frozen = Instant::now();
    let n = rounds.len() as u32;
    let (t_final, lazy_ranges) = if post_copy {
        // The state first: its stack pointers and thread blocks say which
        // pages are hot.
        let state = capture_state(&tree, keep_pids)?;
        let hot = hot_pages(&state, track::page_size());
        let (r, lazy) = lazy_round(&mut spaces, &mut sink, n, &hot).await?;
        progress(&r);
        rounds.push(r);
        let t_final = Instant::now();
        sink.state(state).await?;
        sink.post_copy(&lazy).await?;
        (t_final, Some(lazy))
    } else {
        let r = round(&tree, &mut spaces, &mut shm, &mut sink, n, true).await?;
        progress(&r);
        rounds.push(r);
        let t_final = Instant::now();
        let state = capture_state(&tree, keep_pids)?;
        sink.state(state).await?;
        (t_final, None)
    };
    let t_state = Instant::now();
    let mut go = None;
    if restore {
        // From the commit on, the destination may run the process: should
        // ferry die before it has killed the source, the source must stay
        // stopped, not run beside it.
        tree.each(|m| {
            m.tracee
                .guard_stop()
                .map_err(|source| TreeError::Ptrace { pid: m.pid, source })
        })?;
        // Once `Go` is out, not even an error or an interrupt may resume
        // the source: only an answer that no copy runs does.
        go = sink.go_flag();
        if let Some(go) = &go {
            tree.each(|m| {
                m.tracee
                    .hold_stopped_while(go.clone())
                    .map_err(|source| TreeError::Ptrace { pid: m.pid, source })
            })?;
        }
    }
    let (outcome, lazy) = match lazy_ranges {
        Some(ranges) => {
            let (outcome, link) = sink.commit_lazy().await?;
            (outcome, link.map(|link| Lazy { link, ranges }))
        }
        None => (sink.commit(restore).await?, None),
    };
    let frozen = t_freeze.elapsed();
    let parts = FrozenParts {
        freeze: t_frozen - t_freeze,
        final_round: t_final - t_frozen,
        state: t_state - t_final,
        commit: t_state.elapsed(),
    };
    drop(spaces);
    let report = DumpReport {
        pid,
        session,
        backend,
        rounds,
        stop,
        frozen,
        total: t_start.elapsed(),
        outcome,
        parts,
    };
    Ok((report, Frozen { repair, tree, go }, lazy))
}

/// The final round of a post-copy migration: the dirty pages that may be
/// left out are, the rest is sent as usual. Returns the round and the
/// ranges left out.
async fn lazy_round(
    spaces: &mut [Space<'_>],
    sink: &mut Sink,
    round: u32,
    hot: &[(u64, u64)],
) -> Result<(RoundReport, Vec<(u64, u64)>), DumpError> {
    let t0 = Instant::now();
    // Post-copy migrates one process (checked at the seize): space 0.
    let s = &mut spaces[0];
    let maps = procfs::read_maps(s.pid)?;
    let delta = tokio::task::block_in_place(|| s.tracker.collect(&maps))?;
    let scan = t0.elapsed();
    let dirty_pages = delta.pages(track::page_size());
    let vmas: Vec<pb::Vma> = maps.iter().map(|m| m.to_vma()).collect();
    let (eager, lazy) = split_lazy(&vmas, &delta.data, hot);
    let work = vec![(
        0,
        maps,
        Delta {
            data: eager,
            zero: delta.zero.clone(),
        },
    )];
    match send_layer(spaces, &work, &crate::shmem::Sends::default(), sink).await {
        Ok(stats) => Ok((
            RoundReport {
                round,
                frozen: true,
                dirty_pages,
                stats,
                scan,
                total: t0.elapsed(),
                predicted_downtime: None,
            },
            lazy,
        )),
        Err(e) => {
            // Nothing lost: the whole delta, lazy part included, is due.
            spaces[0].tracker.put_back(&delta);
            Err(e)
        }
    }
}

/// The pages that must be in place before the resume even in post-copy:
/// around every thread's stack pointer (see [`HOT_STACK_BELOW`]), the
/// thread's TLS block (`fs_base`), and what the kernel itself reads or
/// writes for the thread (its rseq area, robust list and clear-tid word,
/// all in glibc's thread control block). The kernel touches the rseq area
/// on the way out of every syscall the restore injects, and the restore
/// writes the new tid into the clear-tid word: such a page would be filled
/// behind the userfaultfd's back, so it cannot wait.
fn hot_pages(state: &pb::ProcessTree, ps: u64) -> Vec<(u64, u64)> {
    let page = |a: u64| a - a % ps;
    let mut hot = Vec::new();
    for t in state.processes.iter().flat_map(|p| p.threads.iter()) {
        if let Ok(r) = crate::sys::stub::regs_from_bytes(&t.gpregs) {
            let sp = page(r.rsp);
            hot.push((
                sp.saturating_sub(HOT_STACK_BELOW * ps),
                sp.saturating_add(HOT_STACK_ABOVE * ps),
            ));
        }
        let rseq = t.rseq.as_ref().map_or(0, |r| r.addr);
        for a in [t.fs_base, rseq, t.robust_list, t.clear_child_tid] {
            if a != 0 {
                // A structure may straddle a page boundary.
                hot.push((page(a), page(a) + 2 * ps));
            }
        }
    }
    track::normalize(&mut hot);
    hot
}

/// Page-aligned `[start, end)` address ranges.
type Ranges = Vec<(u64, u64)>;

/// Splits the last round's data ranges into those sent before the resume
/// and those left for post-copy: only anonymous private memory may wait
/// (shared and file-backed pages, and zero runs, always go first), and
/// never the `hot` pages. Lazy ranges are cut at mapping boundaries, so
/// each lies inside one mapping, as the destination requires.
pub fn split_lazy(vmas: &[pb::Vma], data: &[(u64, u64)], hot: &[(u64, u64)]) -> (Ranges, Ranges) {
    let mut lazy = Vec::new();
    for v in vmas.iter().filter(|v| crate::restore::lazy_eligible(v)) {
        let inside = track::intersect(data, &[(v.start, v.end)]);
        lazy.extend(track::subtract(&inside, hot));
    }
    lazy.sort_unstable();
    let eager = track::subtract(data, &lazy);
    (eager, lazy)
}

/// One round: find the dirty pages of every process, send them as one
/// layer (each process's addresses tagged with its space), wait for the
/// seal.
async fn round(
    tree: &TreeTracee,
    spaces: &mut [Space<'_>],
    shm: &mut Option<crate::shmem::Registry>,
    sink: &mut Sink,
    round: u32,
    frozen: bool,
) -> Result<RoundReport, DumpError> {
    let t0 = Instant::now();
    let mut work: Vec<(usize, Vec<MapEntry>, Delta)> = Vec::new();
    for (i, s) in spaces.iter_mut().enumerate() {
        if tree.is_gone(s.pid) {
            continue;
        }
        let maps = match procfs::read_maps(s.pid) {
            Ok(m) => m,
            // A child that exited while the tree ran: the freeze's scan
            // tells whether it is really gone.
            Err(ProcError::NoProcess(_)) if s.space != 0 && !frozen => continue,
            Err(e) => {
                put_back(spaces, &work);
                return Err(e.into());
            }
        };
        match tokio::task::block_in_place(|| s.tracker.collect(&maps)) {
            Ok(delta) => work.push((i, maps, delta)),
            Err(e) => {
                put_back(spaces, &work);
                return Err(e.into());
            }
        }
    }
    let scan = t0.elapsed();
    let dirty_pages = work
        .iter()
        .map(|(_, _, d)| d.pages(track::page_size()))
        .sum();
    // A tree (from the first round with two processes on): the shared
    // memory pages leave the processes' deltas for the objects' slots. The
    // deltas as collected are what goes back should the round fail.
    if spaces.len() > 1 && shm.is_none() {
        *shm = Some(crate::shmem::Registry::default());
    }
    let collected: Vec<Delta> = work.iter().map(|(_, _, d)| d.clone()).collect();
    if let Some(reg) = shm.as_ref() {
        // An object new to the dump goes whole: every page it holds, also
        // those no page table shows (see crate::shmem::resident).
        for (i, maps, delta) in work.iter_mut() {
            let pid = spaces[*i].pid;
            for m in maps
                .iter()
                .filter(|m| m.shm_key().is_some() && track::sendable(m) && !reg.knows(m))
            {
                // A few injected syscalls, through the tracer's thread.
                let found = tokio::task::block_in_place(|| {
                    tree.each(|t| {
                        Ok(match t.pid == pid {
                            true => Some(crate::shmem::resident(&t.tracee, m)),
                            false => None,
                        })
                    })
                });
                match found.map(|v| v.into_iter().flatten().next()) {
                    Ok(Some(Ok(r))) => delta.data.extend(r),
                    Ok(Some(Err(e))) if !frozen && exited(&e) => {}
                    Ok(Some(Err(e))) => {
                        put_back_collected(spaces, &work, &collected);
                        return Err(DumpError::Shm(e));
                    }
                    // Left the tree since the scan.
                    Ok(None) | Err(_) => {}
                }
            }
            track::normalize(&mut delta.data);
        }
    }
    let sends = match shm.as_mut() {
        Some(reg) => {
            let mut parts: Vec<crate::shmem::Part<'_>> = work
                .iter_mut()
                .map(|(i, maps, delta)| crate::shmem::Part {
                    pid: spaces[*i].pid,
                    maps,
                    delta,
                })
                .collect();
            match reg.take(&mut parts) {
                Ok(s) => s,
                Err(e) => {
                    put_back_collected(spaces, &work, &collected);
                    return Err(DumpError::Shm(e));
                }
            }
        }
        None => crate::shmem::Sends::default(),
    };
    match send_layer(spaces, &work, &sends, sink).await {
        Ok(stats) => Ok(RoundReport {
            round,
            frozen,
            dirty_pages,
            stats,
            scan,
            total: t0.elapsed(),
            predicted_downtime: None,
        }),
        Err(e) => {
            // Nothing lost: should the dump be retried, these pages are due.
            put_back_collected(spaces, &work, &collected);
            Err(e)
        }
    }
}

/// A process of the tree that exited while a round asked it something:
/// the freeze's scan tells whether it is really gone.
fn exited(e: &crate::shmem::ShmError) -> bool {
    matches!(
        e,
        crate::shmem::ShmError::Resident {
            source: crate::sys::ptrace::PtraceError::NoProcess(_)
                | crate::sys::ptrace::PtraceError::ThreadExited(_),
            ..
        }
    )
}

fn put_back(spaces: &mut [Space<'_>], work: &[(usize, Vec<MapEntry>, Delta)]) {
    for (i, _, delta) in work {
        spaces[*i].tracker.put_back(delta);
    }
}

/// [`put_back`] of the deltas as the trackers returned them (shared
/// memory pages included).
fn put_back_collected(
    spaces: &mut [Space<'_>],
    work: &[(usize, Vec<MapEntry>, Delta)],
    collected: &[Delta],
) {
    for ((i, _, _), delta) in work.iter().zip(collected) {
        spaces[*i].tracker.put_back(delta);
    }
}

async fn send_layer(
    spaces: &mut [Space<'_>],
    work: &[(usize, Vec<MapEntry>, Delta)],
    shm: &crate::shmem::Sends,
    sink: &mut Sink,
) -> Result<LayerStats, DumpError> {
    let mut vmas = Vec::new();
    for (i, maps, _) in work {
        let own = maps.iter().map(vma_of).collect();
        vmas.extend(crate::tree::tag_vmas(spaces[*i].space, own)?);
    }
    // The slots' space comes after every process's: the list stays sorted.
    vmas.extend(shm.vmas.iter().cloned());
    sink.begin(vmas).await?;
    for (i, _, delta) in work {
        let s = &mut spaces[*i];
        send_space(s.space, s.pid, delta, sink, s.tracker.as_mut()).await?;
    }
    for (pid, reads) in &shm.reads {
        send_shm(*pid, reads, sink).await?;
    }
    sink.end().await
}

/// One batch of pages read, or why not.
type ReadBatch = Result<Vec<(u64, Bytes)>, DumpError>;

/// Reads `batches` of process `pid` on a blocking thread, up to
/// [`READ_AHEAD`] batches ahead of the sender; the first error ends it.
fn read_ahead(
    pid: i32,
    batches: Vec<Vec<(u64, u64)>>,
) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<ReadBatch>) {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let reader = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        for ranges in batches {
            let r = read_batch(pid, &ranges, &mut buf);
            let stop = r.is_err();
            if tx.blocking_send(r).is_err() || stop {
                return;
            }
        }
    });
    (reader, rx)
}

/// Shared memory pages read from process `pid` and sent to their objects'
/// slots (see [`crate::shmem`]).
async fn send_shm(pid: i32, reads: &[(u64, u64, u64)], sink: &mut Sink) -> Result<(), DumpError> {
    let ps = track::page_size();
    let ranges: Vec<(u64, u64)> = reads.iter().map(|&(s, e, _)| (s, e)).collect();
    let batches = split(&ranges, BATCH_PAGES * ps);
    let (reader, mut rx) = read_ahead(pid, batches);
    while let Some(item) = rx.recv().await {
        let mut moved: Vec<(u64, Bytes)> = item?
            .into_iter()
            .filter_map(|(a, b)| Some((crate::shmem::destination(reads, a)?, b)))
            .collect();
        moved.sort_unstable_by_key(|r| r.0);
        if !moved.is_empty() {
            sink.data(moved).await?;
        }
    }
    reader.await.map_err(|e| DumpError::Reader(e.to_string()))
}

/// The pages of one process in the layer being sent.
async fn send_space(
    space: u32,
    pid: i32,
    delta: &Delta,
    sink: &mut Sink,
    tracker: &mut dyn Tracker,
) -> Result<(), DumpError> {
    let ps = track::page_size();
    let batches = split(&delta.data, BATCH_PAGES * ps);
    let (reader, mut rx) = read_ahead(pid, batches);
    while let Some(item) = rx.recv().await {
        let ranges = item?;
        if !ranges.is_empty() {
            tracker.sent(&ranges);
            let tagged = ranges
                .into_iter()
                .map(|(a, b)| (crate::tree::tag(space, a), b))
                .collect();
            sink.data(tagged).await?;
        }
    }
    reader.await.map_err(|e| DumpError::Reader(e.to_string()))?;
    for chunk in delta.zero.chunks(MAX_RUNS / 2) {
        let tagged = chunk
            .iter()
            .map(|&(s, e)| (crate::tree::tag(space, s), crate::tree::tag(space, e)))
            .collect();
        sink.zero(tagged).await?;
    }
    Ok(())
}

/// Reads one batch of ranges. A range whose memory vanished since the scan
/// (the process unmapped it while running) has nothing left to send; any
/// other failure is an error.
fn read_batch(
    pid: i32,
    ranges: &[(u64, u64)],
    buf: &mut Vec<u8>,
) -> Result<Vec<(u64, Bytes)>, DumpError> {
    match vm::read_ranges(pid, ranges, buf) {
        Ok(()) => return Ok(slice_ranges(ranges, std::mem::take(buf))),
        Err(VmError::Fault { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let mut out = Vec::new();
    for &r in ranges {
        match vm::read_ranges(pid, &[r], buf) {
            Ok(()) => out.extend(slice_ranges(&[r], std::mem::take(buf))),
            Err(VmError::Fault { addr }) => {
                let maps = procfs::read_maps(pid)?;
                if maps
                    .iter()
                    .any(|m| m.start <= addr && addr < m.end && m.read)
                {
                    return Err(VmError::Fault { addr }.into());
                }
                // Unmapped meanwhile; the next round's mappings show it gone.
                let ps = track::page_size();
                let mut a = r.0;
                while a < r.1 {
                    if let Ok(()) = vm::read_ranges(pid, &[(a, a + ps)], buf) {
                        out.extend(slice_ranges(&[(a, a + ps)], std::mem::take(buf)));
                    }
                    a += ps;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

fn slice_ranges(ranges: &[(u64, u64)], buf: Vec<u8>) -> Vec<(u64, Bytes)> {
    let all = Bytes::from(buf);
    let mut off = 0usize;
    ranges
        .iter()
        .map(|&(s, e)| {
            let len = (e - s) as usize;
            let b = all.slice(off..off + len);
            off += len;
            (s, b)
        })
        .collect()
}

/// Cuts ranges into batches of at most `max` bytes.
pub(crate) fn split(ranges: &[(u64, u64)], max: u64) -> Vec<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0;
    for &(mut s, e) in ranges {
        while s < e {
            let take = (e - s).min(max - size);
            cur.push((s, s + take));
            size += take;
            s += take;
            if size == max {
                out.push(std::mem::take(&mut cur));
                size = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The image's VMA, with the backing file's size and mtime for the
/// destination's pre-flight check.
fn vma_of(m: &MapEntry) -> pb::Vma {
    let mut v = m.to_vma();
    if let Some(f) = v.file.as_mut() {
        if let Ok(md) = std::fs::metadata(&f.path) {
            use std::os::unix::fs::MetadataExt;
            f.size = md.size();
            f.mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        }
    }
    v
}

/// The frozen tree's state (DESIGN.md §6), see [`crate::state`]: each
/// process captured as a one-process tree, told its space, and ordered
/// root first, children after their parent.
fn capture_state(tree: &TreeTracee, keep_pids: bool) -> Result<pb::ProcessTree, DumpError> {
    // All at once: the frozen time grows with the slowest process, not
    // with the sum.
    let mut procs = Vec::new();
    for r in tree.each_parallel(|m| crate::state::capture(m.pid, &m.tracee).map(|t| (m.space, t))) {
        let (space, t) = r?;
        procs.extend(t.processes.into_iter().map(|mut p| {
            p.space = space;
            p
        }));
    }
    for (z, status) in tree.zombies() {
        let stat = procfs::read_stat_fields(z.pid)?;
        procs.push(pb::Process {
            pid: z.pid,
            ppid: z.ppid,
            pgid: stat.pgrp,
            sid: stat.session,
            comm: z.comm,
            zombie: true,
            exit_status: status,
            ..Default::default()
        });
    }
    let mut state = pb::ProcessTree {
        processes: crate::tree::order_processes(tree.root(), procs),
    };
    for p in state.processes.iter_mut().filter(|p| !p.zombie) {
        let c = crate::clocks::seen_by(p.pid)?;
        (p.clock_monotonic_ns, p.clock_boottime_ns) = (c.monotonic, c.boottime);
    }
    if keep_pids {
        crate::pidns::record(&mut state)?;
        // The destination's pid_max is checked there.
        crate::pidns::check(&state, i32::MAX)?;
        if let Some(root) = state.processes.first_mut() {
            root.keep_pids = true;
        }
    } else if let Err(e) = crate::pidns::record(&mut state) {
        // Only --keep-pids needs them; a later `ferry restore --keep-pids`
        // of this image refuses it by name.
        tracing::debug!("pid namespace ids not recorded: {e}");
    }
    Ok(state)
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut id);
    }
    id
}

/// The destination of the layers: a page server or a local image directory.
enum Sink {
    Remote(Box<Client>),
    Local(Box<LocalSink>),
}

struct LocalSink {
    _store: DiskStore,
    handle: Box<dyn SessionStore>,
    encoder: Encoder,
    layer: u32,
    seq: u32,
    stats: LayerStats,
}

/// What a session opens with, besides where it goes.
struct Opening {
    session: SessionId,
    pid: i32,
    compress: Compress,
    features: Vec<String>,
    keep_pids_root: u32,
}

impl Sink {
    async fn open(dest: Destination, o: Opening) -> Result<Sink, DumpError> {
        let Opening {
            session,
            pid,
            compress,
            features,
            keep_pids_root,
        } = o;
        let comm = procfs::read_status(pid).map(|s| s.name).unwrap_or_default();
        let label = format!("pid {pid} {comm}");
        match dest {
            Destination::Remote(mut connect) => {
                connect.compress = compress;
                let client = Client::connect(
                    connect,
                    SenderConfig {
                        session,
                        page_size: track::page_size() as u32,
                        arch: std::env::consts::ARCH.into(),
                        kernel: kernel_release(),
                        label,
                        resume: false,
                        creds: if features.iter().any(|f| f == ferry_proto::FEATURE_RESTORE) {
                            crate::creds::of_tree(pid)
                        } else {
                            Vec::new()
                        },
                        features,
                        keep_pids_root,
                    },
                )
                .await?;
                Ok(Sink::Remote(Box::new(client)))
            }
            Destination::ImagesDir(dir) => {
                let store = DiskStore::open(&dir)?;
                let handle = store.create(pb::SessionMeta {
                    session: session.0.to_vec().into(),
                    page_size: track::page_size() as u32,
                    arch: std::env::consts::ARCH.into(),
                    kernel: kernel_release(),
                    label,
                    created_unix_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0),
                })?;
                Ok(Sink::Local(Box::new(LocalSink {
                    _store: store,
                    handle,
                    encoder: Encoder::new(track::page_size() as u32, Compress::Off),
                    layer: 0,
                    seq: 0,
                    stats: LayerStats::default(),
                })))
            }
        }
    }

    async fn begin(&mut self, vmas: Vec<pb::Vma>) -> Result<(), DumpError> {
        match self {
            Sink::Remote(c) => {
                c.begin_layer(vmas).await?;
            }
            Sink::Local(l) => {
                l.layer = l.handle.sealed_layers();
                l.seq = 0;
                l.stats = LayerStats {
                    layer: l.layer,
                    ..Default::default()
                };
                tokio::task::block_in_place(|| l.handle.begin_layer(l.layer, vmas))?;
            }
        }
        Ok(())
    }

    async fn data(&mut self, ranges: Vec<(u64, Bytes)>) -> Result<(), DumpError> {
        match self {
            Sink::Remote(c) => Ok(c.send_pages(ranges).await?),
            Sink::Local(l) => {
                let e = l
                    .encoder
                    .encode(l.layer, l.seq, ranges)
                    .map_err(ClientError::from)?;
                l.put(e)
            }
        }
    }

    async fn zero(&mut self, ranges: Vec<(u64, u64)>) -> Result<(), DumpError> {
        match self {
            Sink::Remote(c) => Ok(c.send_zero(ranges).await?),
            Sink::Local(l) => {
                let e = l
                    .encoder
                    .encode_zero(l.layer, l.seq, &ranges)
                    .map_err(ClientError::from)?;
                l.put(e)
            }
        }
    }

    async fn end(&mut self) -> Result<LayerStats, DumpError> {
        match self {
            Sink::Remote(c) => {
                let stats = c.end_layer().await?;
                c.wait_sealed().await?;
                Ok(stats)
            }
            Sink::Local(l) => {
                tokio::task::block_in_place(|| l.handle.seal())?;
                Ok(l.stats)
            }
        }
    }

    async fn state(&mut self, tree: pb::ProcessTree) -> Result<(), DumpError> {
        match self {
            Sink::Remote(c) => Ok(c.send_state(tree).await?),
            Sink::Local(l) => Ok(tokio::task::block_in_place(|| l.handle.put_state(&tree))?),
        }
    }

    async fn post_copy(&mut self, ranges: &[(u64, u64)]) -> Result<(), DumpError> {
        match self {
            Sink::Remote(c) => Ok(c.post_copy(ranges).await?),
            Sink::Local(_) => Err(DumpError::LazyLocal),
        }
    }

    /// Commits a post-copy migration: the verdict, and on `Restored` the
    /// connection for the missing pages.
    async fn commit_lazy(self) -> Result<(Option<CommitOutcome>, Option<LazyLink>), DumpError> {
        match self {
            Sink::Remote(c) => {
                let (o, link) = c.commit_lazy().await?;
                Ok((Some(o), link))
            }
            Sink::Local(_) => Err(DumpError::LazyLocal),
        }
    }

    /// Set once the two-phase end's `Go` is out (see
    /// [`Client::go_flag`]).
    fn go_flag(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        match self {
            Sink::Remote(c) => Some(c.go_flag()),
            Sink::Local(_) => None,
        }
    }

    /// Commits; with `restore`, the destination's verdict is returned as
    /// is (a `Failed` is the caller's to act on, not an error here).
    async fn commit(self, restore: bool) -> Result<Option<CommitOutcome>, DumpError> {
        match self {
            Sink::Remote(c) => match c.commit(restore).await? {
                o @ CommitOutcome::Stored { .. } if !restore => Ok(Some(o)),
                o @ (CommitOutcome::Restored { .. }
                | CommitOutcome::Failed { .. }
                | CommitOutcome::InDoubt { .. })
                    if restore =>
                {
                    Ok(Some(o))
                }
                other => Err(DumpError::Commit(format!("{other:?}"))),
            },
            Sink::Local(_) if restore => Err(DumpError::Commit(
                "an images directory cannot restore: use ferry restore --images-dir".into(),
            )),
            Sink::Local(_) => Ok(None),
        }
    }
}

impl LocalSink {
    fn put(&mut self, e: ferry_proto::batch::EncodedBatch) -> Result<(), DumpError> {
        self.stats.batches += 1;
        self.stats.pages += e.pages;
        self.stats.zero_pages += e.zero_pages;
        self.stats.raw_bytes += e.raw_bytes();
        self.stats.wire_bytes += e.wire_bytes();
        self.seq += 1;
        let d = decode(e.to_wire(), track::page_size() as u32).map_err(ClientError::from)?;
        tokio::task::block_in_place(|| self.handle.put(&d))?;
        Ok(())
    }
}

/// This host's kernel release (`uname -r`).
pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_anonymous_private_pages_away_from_stack_pointers_wait() {
        let vma = |start, end, kind: pb::VmaKind, flags: i32| pb::Vma {
            start,
            end,
            kind: kind as i32,
            flags: flags as u32,
            ..Default::default()
        };
        let private = libc::MAP_PRIVATE;
        let vmas = [
            vma(0x10000, 0x20000, pb::VmaKind::File, private),
            vma(0x20000, 0x40000, pb::VmaKind::Anon, private),
            vma(0x40000, 0x50000, pb::VmaKind::SharedAnon, libc::MAP_SHARED),
            vma(0x50000, 0x60000, pb::VmaKind::Heap, private),
            vma(0x60000, 0x70000, pb::VmaKind::Stack, private),
        ];
        // One dirty run across every mapping; a hot window in the stack.
        let data = [(0x18000, 0x70000)];
        let hot = [(0x64000, 0x68000)];
        let (eager, lazy) = split_lazy(&vmas, &data, &hot);
        assert_eq!(
            lazy,
            vec![
                (0x20000, 0x40000),
                (0x50000, 0x60000),
                (0x60000, 0x64000),
                (0x68000, 0x70000)
            ]
        );
        assert_eq!(
            eager,
            vec![(0x18000, 0x20000), (0x40000, 0x50000), (0x64000, 0x68000)]
        );
    }

    #[test]
    fn split_cuts_at_the_byte_limit() {
        let v = split(&[(0, 10), (20, 35)], 8);
        assert_eq!(
            v,
            vec![
                vec![(0, 8)],
                vec![(8, 10), (20, 26)],
                vec![(26, 34)],
                vec![(34, 35)]
            ]
        );
        assert!(split(&[], 8).is_empty());
    }

    #[test]
    fn slices_follow_the_ranges() {
        let s = slice_ranges(&[(0x1000, 0x1002), (0x5000, 0x5001)], vec![1, 2, 3]);
        assert_eq!(s[0], (0x1000, Bytes::from_static(&[1, 2])));
        assert_eq!(s[1], (0x5000, Bytes::from_static(&[3])));
    }
}
