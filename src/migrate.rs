//! `ferry migrate`: the whole transaction. Rounds of pre-dump while the
//! process runs, a freeze, the final delta and the state, a restore on the
//! destination that ends in two phases: the destination holds the restored
//! process stopped and says `Ready{pid}`, the source (still frozen) says
//! `Go`, the destination lets it run and answers `Restored{pid}`, and only
//! then is the source killed. Any failure before `Go` — the destination
//! refusing or failing the restore, a lost connection, a timeout, ferry
//! interrupted — resumes the source, untraced, and names the cause; the
//! destination kills what it held. After `Go` without `Restored` the
//! source asks the page server on a new connection what became of the
//! session ([`resolve`]) and acts on the answer; if it cannot get one it
//! stays stopped and says so: never two copies, and never none without a
//! message. A page server without the two-phase end (`ready-go`) gets the
//! old one-phase end, with a warning.

use std::time::Duration;

use ferry_page_server::store::{FlatImage, SessionStore};
use ferry_page_server::{
    LazyEvent, LazyProcess, PreparedProcess, Released, RestoredPid, Restorer, WarmRestore,
};
use ferry_proto::pb;

use crate::client::CommitOutcome;
use crate::dump::{
    dump_frozen, dump_frozen_with, Destination, DumpError, DumpOptions, DumpReport, Frozen,
    RoundReport,
};
use crate::postcopy::{PostCopyError, PostCopyOptions, PostCopyReport};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "migration failed before the destination restored the process; the source runs on: {0}"
    )]
    Dump(#[from] DumpError),
    #[error("the destination could not restore the process; the source runs on: {0}")]
    Refused(String),
    #[error("cannot migrate pid {pid}: {reason} (nothing was frozen)")]
    Unsupported { pid: i32, reason: String },
    #[error(
        "the destination restored the process as pid {pid}, but the source ({source_pid}) \
         could not be killed: {error}; two copies may be running"
    )]
    Kill {
        pid: i32,
        source_pid: i32,
        error: DumpError,
    },
    #[error(transparent)]
    InDoubt(Box<InDoubt>),
    #[error(
        "post-copy failed after the destination resumed the process as pid {pid}: {error}. \
         The destination kills its copy (pages were still missing). The source {source_pid} \
         is left stopped (SIGSTOP) with its memory as at the freeze; it cannot take over by \
         itself since the destination's copy already ran: `kill -CONT {source_pid}` if \
         running it again from the freeze is safe, else kill it"
    )]
    PostCopy {
        pid: i32,
        source_pid: i32,
        error: Box<PostCopyError>,
    },
}

/// After `Go`, no answer and no word from the page server: the source is
/// left stopped (see [`MigrateError::InDoubt`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "the destination was told to run the process (pid {pid} there), but its answer never \
         came ({error}) and the page server could not say what became of session {session} \
         within {waited:?} ({last}). Two copies must never run, so the source {source_pid} is \
         left stopped (SIGSTOP). Decide by hand: if pid {pid} runs on the destination (its \
         page server's log names the session's fate: \"released\" or \"abandoned\"), \
         `kill -KILL {source_pid}`; if it does not, `kill -CONT {source_pid}` resumes the source \
         (its TCP connections stay silent in repair mode)"
)]
pub struct InDoubt {
    /// The destination's process.
    pub pid: i32,
    pub source_pid: i32,
    pub session: String,
    /// Why the answer after `Go` never came.
    pub error: String,
    /// How long the page server was asked.
    pub waited: Duration,
    /// Its last answer, or why there was none.
    pub last: String,
}

impl InDoubt {
    /// The error for session `report` whose answer after `Go` never came
    /// (`error`) and whose fate the page server could not tell within
    /// `asked` (how long, and its last answer).
    fn error(
        pid: i32,
        source_pid: i32,
        report: &DumpReport,
        error: String,
        asked: (Duration, String),
    ) -> MigrateError {
        let (waited, last) = asked;
        MigrateError::InDoubt(Box::new(InDoubt {
            pid,
            source_pid,
            session: report.session.to_hex(),
            error,
            waited,
            last,
        }))
    }
}

#[derive(Debug, Clone)]
pub struct MigrateReport {
    pub dump: DumpReport,
    /// The process on the destination.
    pub restored_pid: i32,
    /// With `--keep-pids`: its pid inside its new pid namespace and that
    /// namespace's inode number (else 0, 0).
    pub restored_ns: (i32, u64),
    /// From the freeze to the destination's `Restored`: the outage.
    pub downtime: Duration,
    /// With `--post-copy`: what serving the missing pages took.
    pub post_copy: Option<PostCopyReport>,
}

/// Whether any thread of process `pid` or of its descendants runs under
/// seccomp, as it looks now: migrating it takes `CAP_SYS_ADMIN` (reading
/// its filters, suspending them for ferry's injected calls). A process
/// that is not there is not.
pub fn sandboxed(pid: i32) -> bool {
    let Ok(tree) = crate::tree::discover(pid) else {
        return false;
    };
    tree.iter().any(|s| {
        crate::procfs::list_tasks(s.pid)
            .unwrap_or_default()
            .into_iter()
            .any(|tid| crate::procfs::read_task_status(s.pid, tid).is_ok_and(|st| st.seccomp != 0))
    })
}

/// Migrates `opts.pid` to the page server in `opts.dest`, which must run
/// with `--restore`.
pub async fn migrate(
    mut opts: DumpOptions,
    progress: &mut (dyn FnMut(&RoundReport) + Send),
) -> Result<MigrateReport, MigrateError> {
    opts.restore = true;
    precheck(opts.pid)?;
    let connect = match &opts.dest {
        Destination::Remote(c) => Some(c.clone()),
        Destination::ImagesDir(_) => None,
    };
    let (report, frozen) = dump_frozen(opts, progress).await?;
    let returned = std::time::Instant::now();
    match report.outcome.clone() {
        Some(CommitOutcome::Restored {
            pid,
            ns_pid,
            pid_ns,
        }) => kill_source(frozen, report, pid, (ns_pid, pid_ns)),
        Some(CommitOutcome::Failed { reason }) => {
            frozen.resume()?;
            Err(MigrateError::Refused(reason))
        }
        Some(CommitOutcome::InDoubt { pid, error }) => {
            let source_pid = frozen.pid();
            // Left stopped on any way out but the two below.
            let mut held = StopOnDrop(Some(frozen));
            tracing::warn!(
                pid,
                source_pid,
                "no answer after Go ({error}); asking the page server what became of the session"
            );
            // The commit began before Go: a page server up for less than
            // this may have been restarted since Go, and forgotten it.
            let since_go = report.parts.commit + returned.elapsed();
            let c = connect.ok_or_else(|| MigrateError::Refused("no page server".into()))?;
            match resolve(&c, report.session, since_go).await {
                Resolution::Resumed { pid } => held.source_gone(pid, report),
                Resolution::NoCopy { why } => held.no_copy(&error, &why),
                Resolution::Unknown { waited, last } => Err(InDoubt::error(
                    pid,
                    source_pid,
                    &report,
                    error,
                    (waited, last),
                )),
            }
        }
        other => {
            frozen.resume()?;
            Err(MigrateError::Refused(format!(
                "unexpected answer {other:?}"
            )))
        }
    }
}

/// What the page server said about a session in doubt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The process runs there: the source must go.
    Resumed { pid: i32 },
    /// No copy runs there: the source may resume.
    NoCopy { why: String },
    /// No usable answer within the time allowed: leave the source stopped.
    Unknown { waited: Duration, last: String },
}

/// How long to wait between two queries (page server unreachable, or the
/// session still pending there).
const QUERY_RETRY: Duration = Duration::from_millis(250);

/// What one answer means for the source, `since_go` after `Go` (an upper
/// bound); `None` to ask again. Pure, for the unit tests.
pub fn judge(a: &crate::client::QueryAnswer, since_go: Duration) -> Option<Resolution> {
    use ferry_proto::session::Fate;
    match &a.fate {
        Fate::Resumed { pid } => Some(Resolution::Resumed { pid: *pid }),
        Fate::Abandoned { reason } => Some(Resolution::NoCopy {
            why: format!("abandoned: {reason}"),
        }),
        Fate::Pending => None,
        // Up since before Go and never saw the session: it never held
        // the process, so none runs. Up for less: it may have been
        // restarted after releasing it and forgotten.
        Fate::Unknown if a.uptime > since_go => Some(Resolution::NoCopy {
            why: format!("session unknown: {}", a.note),
        }),
        Fate::Unknown => Some(Resolution::Unknown {
            waited: Duration::ZERO,
            last: format!(
                "session unknown, but the page server has been up only {:?}, less than the \
                 {since_go:?} since Go: it may have restarted after running the process ({})",
                a.uptime, a.note
            ),
        }),
    }
}

/// Post-copy, after `Go` and a lost answer: whether the page server's "no
/// copy runs" (the `why` of [`Resolution::NoCopy`]) lets the source
/// resume — only if the process was never released. One released and then
/// killed for want of its pages has run: the source stays stopped.
pub fn post_copy_may_resume(why: &str) -> bool {
    !why.contains(ferry_page_server::RAN_THEN_KILLED)
}

/// Asks the page server at `c` about `session` until it gives an answer
/// that decides, or `c.timeout` passes.
pub async fn resolve(
    c: &crate::client::Connect,
    session: ferry_proto::SessionId,
    since_go: Duration,
) -> Resolution {
    let t0 = std::time::Instant::now();
    let deadline = t0 + c.timeout;
    let mut last = String::from("no attempt");
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Resolution::Unknown {
                waited: t0.elapsed(),
                last,
            };
        }
        let mut each = c.clone();
        each.timeout = left;
        match crate::client::Client::query(&each, session).await {
            Ok(a) => {
                tracing::info!(session = %session, fate = ?a.fate, "page server answered");
                match judge(&a, since_go + t0.elapsed()) {
                    Some(Resolution::Unknown { last, .. }) => {
                        return Resolution::Unknown {
                            waited: t0.elapsed(),
                            last,
                        }
                    }
                    Some(r) => return r,
                    None => last = "the session is still pending there".into(),
                }
            }
            Err(e) => {
                tracing::debug!(session = %session, "query: {e}");
                last = e.to_string();
            }
        }
        tokio::time::sleep(QUERY_RETRY.min(left)).await;
    }
}

/// Migrates `opts.pid` with post-copy (`ferry migrate --post-copy`): the
/// rounds as [`migrate`], then a freeze, the state and only the pages that
/// cannot wait; the destination holds the process prepared (`Ready`),
/// resumes it on `Go`, and the last round's other dirty pages follow,
/// asked for on fault or pushed. The source is killed once every page is
/// in. Before `Go`, any failure resumes the source as [`migrate`] does;
/// after it, the source can no longer take over and is left stopped
/// ([`MigrateError::PostCopy`]), also when the answer to `Go` was lost and
/// the page server says the released process died for want of its pages.
pub async fn migrate_post_copy(
    mut opts: DumpOptions,
    pc: &PostCopyOptions,
    progress: &mut (dyn FnMut(&RoundReport) + Send),
) -> Result<MigrateReport, MigrateError> {
    opts.restore = true;
    let pid = opts.pid;
    if let Destination::Remote(c) = &opts.dest {
        if matches!(c.transport, crate::client::Transport::Tcp { .. }) {
            return Err(MigrateError::Unsupported {
                pid,
                reason: "post-copy needs QUIC, not plain TCP".into(),
            });
        }
    }
    precheck(pid)?;
    let connect = match &opts.dest {
        Destination::Remote(c) => Some(c.clone()),
        Destination::ImagesDir(_) => None,
    };
    let (report, frozen, lazy) = dump_frozen_with(opts, true, progress).await?;
    let returned = std::time::Instant::now();
    match (report.outcome.clone(), lazy) {
        (Some(CommitOutcome::Restored { pid, .. }), Some(lazy)) => {
            let source_pid = frozen.pid();
            tracing::info!(
                pid,
                source_pid,
                lazy_ranges = lazy.ranges.len(),
                "resumed on the destination; serving the missing pages"
            );
            let mut held = StopOnDrop(Some(frozen));
            match crate::postcopy::serve(lazy.link, source_pid, lazy.ranges, pc).await {
                Ok(pcr) => {
                    let frozen = held.0.take().expect("held until here");
                    let mut done = kill_source(frozen, report, pid, (0, 0))?;
                    done.post_copy = Some(pcr);
                    Ok(done)
                }
                Err(error) => {
                    drop(held);
                    Err(MigrateError::PostCopy {
                        pid,
                        source_pid,
                        error: Box::new(error),
                    })
                }
            }
        }
        (Some(CommitOutcome::Failed { reason }), _) => {
            frozen.resume()?;
            Err(MigrateError::Refused(reason))
        }
        (Some(CommitOutcome::InDoubt { pid, error }), _) => {
            let source_pid = frozen.pid();
            // Left stopped on any way out but the two below.
            let mut held = StopOnDrop(Some(frozen));
            tracing::warn!(
                pid,
                source_pid,
                "post-copy: no answer after Go ({error}); asking the page server what became \
                 of the session"
            );
            let since_go = report.parts.commit + returned.elapsed();
            let c = connect.ok_or_else(|| MigrateError::Refused("no page server".into()))?;
            match resolve(&c, report.session, since_go).await {
                // Every page reached it before the answer was lost.
                Resolution::Resumed { pid } => held.source_gone(pid, report),
                Resolution::NoCopy { why } if !post_copy_may_resume(&why) => {
                    // It ran, then died for want of its pages: as a
                    // post-copy failure after Restored, the source stays
                    // stopped for the operator.
                    drop(held);
                    Err(MigrateError::PostCopy {
                        pid,
                        source_pid,
                        error: Box::new(PostCopyError::LostAfterGo { error, fate: why }),
                    })
                }
                Resolution::NoCopy { why } => held.no_copy(&error, &why),
                Resolution::Unknown { waited, last } => Err(InDoubt::error(
                    pid,
                    source_pid,
                    &report,
                    error,
                    (waited, last),
                )),
            }
        }
        (other, _) => {
            frozen.resume()?;
            Err(MigrateError::Refused(format!(
                "unexpected answer {other:?}"
            )))
        }
    }
}

/// The destination runs the process as `pid` (in namespace `ns`): the
/// frozen source is killed, which ends the migration.
fn kill_source(
    frozen: Frozen,
    report: DumpReport,
    pid: i32,
    ns: (i32, u64),
) -> Result<MigrateReport, MigrateError> {
    let source_pid = frozen.pid();
    frozen.kill().map_err(|error| MigrateError::Kill {
        pid,
        source_pid,
        error,
    })?;
    Ok(MigrateReport {
        downtime: report.frozen,
        dump: report,
        restored_pid: pid,
        restored_ns: ns,
        post_copy: None,
    })
}

/// The source after the destination ran: never resumed by accident (ferry
/// interrupted, an error), only left stopped.
struct StopOnDrop(Option<Frozen>);

impl StopOnDrop {
    /// The page server says the destination's copy runs (the answer after
    /// `Go` was lost and asked for): the source is killed.
    fn source_gone(&mut self, pid: i32, report: DumpReport) -> Result<MigrateReport, MigrateError> {
        let frozen = self.0.take().expect("held until the answer");
        // The page server's record keeps only the pid: with --keep-pids its
        // namespace went with the lost answer (README, "ferry migrate").
        kill_source(frozen, report, pid, (0, 0))
    }

    /// The page server says no copy runs there: the source resumes.
    fn no_copy(&mut self, error: &str, why: &str) -> Result<MigrateReport, MigrateError> {
        self.0.take().expect("held until the answer").resume()?;
        Err(MigrateError::Refused(format!(
            "the answer after Go was lost ({error}); the page server says no copy runs \
             there: {why}"
        )))
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            let pid = f.pid();
            // The destination owns the connections now: the source's stay
            // in repair mode, silent, while it waits stopped.
            let mut f = f;
            f.disarm_repair();
            if let Err(e) = f.leave_stopped() {
                tracing::warn!(pid, "leaving the source stopped: {e}");
            }
        }
    }
}

/// What restore cannot do yet, found on the live process (every process of
/// its tree) before anything is frozen: descriptors of kinds it cannot
/// recreate, pipes to processes outside the tree, zombies. (The destination
/// checks the mappings every round.) A process that is not there is the
/// dump's to report, by name.
fn precheck(pid: i32) -> Result<(), MigrateError> {
    let unsupported = |reason: String| MigrateError::Unsupported { pid, reason };
    // A tree: what its restore cannot make yet (pipes between processes,
    // shared anonymous memory, sessions and groups without an order, a
    // zombie), from a look at every process, by name.
    if let Ok(tree) = crate::tree::discover(pid) {
        crate::tree::zombies(&tree).map_err(|e| unsupported(e.to_string()))?;
        // What the restore cannot carry over yet and must not drop
        // silently: POSIX timers on another process's CPU clock, and
        // seccomp's strict mode (threads may differ).
        for s in tree.iter().filter(|s| s.state != 'Z') {
            let tids = crate::procfs::list_tasks(s.pid).unwrap_or_default();
            if let Err(e) = crate::state::posix_timers(s.pid, &tids) {
                return Err(unsupported(format!("{e} ({})", s.comm)));
            }
            for tid in tids {
                let why = crate::procfs::read_task_status(s.pid, tid)
                    .ok()
                    .and_then(|st| st.seccomp_refusal());
                if let Some(why) = why {
                    return Err(unsupported(format!(
                        "process {} ({}), thread {tid}: {why}: not supported yet",
                        s.pid, s.comm
                    )));
                }
            }
        }
        if tree.len() > 1 {
            let procs: Vec<pb::Process> = tree
                .iter()
                .filter(|s| s.state != 'Z')
                .enumerate()
                .filter_map(|(i, s)| {
                    let stat = crate::procfs::read_stat_fields(s.pid).ok()?;
                    Some(pb::Process {
                        pid: s.pid,
                        ppid: s.ppid,
                        pgid: stat.pgrp,
                        sid: stat.session,
                        comm: s.comm.clone(),
                        space: i as u32,
                        fds: crate::state::capture_fds(s.pid).ok()?,
                        vmas: crate::procfs::read_maps(s.pid)
                            .ok()?
                            .iter()
                            .map(|m| m.to_vma())
                            .collect(),
                        ..Default::default()
                    })
                })
                .collect();
            crate::tree::check_tree(&procs)
                .map_err(|e| unsupported(format!("{e}: not supported yet")))?;
            let spaces = procs.iter().map(|p| (p.space, p.vmas.clone())).collect();
            crate::shmem::objects(&procs, &spaces).map_err(|e| unsupported(e.to_string()))?;
            let tree_fds: Vec<pb::FileDesc> = procs.iter().flat_map(|p| p.fds.clone()).collect();
            for p in &procs {
                crate::restore::check_fds_in(&p.fds, &tree_fds)
                    .map_err(|e| unsupported(format!("process {} ({}): {e}", p.pid, p.comm)))?;
            }
            shared_state(&procs).map_err(unsupported)?;
            return Ok(());
        }
    }
    if let Ok(fds) = crate::state::capture_fds(pid) {
        crate::restore::check_fds(&fds).map_err(|e| unsupported(e.to_string()))?;
        let vmas: Vec<pb::Vma> = crate::procfs::read_maps(pid)
            .map(|m| m.iter().map(|m| m.to_vma()).collect())
            .unwrap_or_default();
        crate::restore::check_lone_memfds(&fds, &vmas).map_err(|e| unsupported(e.to_string()))?;
    }
    Ok(())
}

/// An open file with state of its own (eventfd, timerfd, memfd, …) held by
/// two processes of a tree would come back as two: refused by name.
fn shared_state(procs: &[pb::Process]) -> Result<(), String> {
    for (i, p) in procs.iter().enumerate() {
        // memfds shared between processes are one object (crate::shmem).
        let stateful =
            |f: &&pb::FileDesc| crate::state::stateful(f.kind()) && f.kind() != pb::FdKind::Memfd;
        for f in p.fds.iter().filter(stateful) {
            for q in &procs[..i] {
                for g in q.fds.iter().filter(|g| g.kind == f.kind) {
                    // When kcmp cannot tell, refusing is the safe answer.
                    if crate::sys::fds::same_file_of(q.pid, g.fd, p.pid, f.fd).unwrap_or(true) {
                        return Err(format!(
                            "fd {} of process {} ({}): {}, the same open file as fd {} of process {}, shared between processes: not supported yet",
                            f.fd, p.pid, p.comm, f.path, g.fd, q.pid
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The page server's restore hook (`ferry page-server --restore`): restores
/// a committed session on this host, straight from the store.
pub struct LocalRestorer;

impl Restorer for LocalRestorer {
    fn preflight_hello(&self, hello: &pb::Hello) -> Result<(), String> {
        let arch = std::env::consts::ARCH;
        if hello.arch != arch {
            return Err(format!(
                "the process is {}, this host is {arch}",
                hello.arch
            ));
        }
        let ps = crate::sys::page_size();
        if u64::from(hello.page_size) != ps {
            return Err(format!(
                "the process uses {}-byte pages, this host {ps}",
                hello.page_size
            ));
        }
        let asks = |f: &str| hello.features.iter().any(|x| x == f);
        if asks(ferry_proto::FEATURE_SECCOMP) {
            let (eff, _, _) = crate::sys::caps::current().map_err(|e| e.to_string())?;
            if eff & crate::sys::caps::bit("sys_admin").map_err(|e| e.to_string())? == 0 {
                return Err(format!(
                    "{} runs under seccomp: installing its filters needs cap_sys_admin, \
                     which this page server does not hold (its --caps)",
                    hello.label
                ));
            }
        }
        if asks(ferry_proto::FEATURE_POSIX_TIMERS) && !crate::sys::timer_ids_restorable() {
            return Err(format!(
                "{} holds POSIX timers: restoring their ids needs Linux 6.15 or later \
                 (PR_TIMER_CREATE_RESTORE_IDS); this host runs {}",
                hello.label,
                crate::dump::kernel_release()
            ));
        }
        crate::creds::preflight(&hello.creds, &hello.label)
    }

    fn preflight_layer(&self, vmas: &[pb::Vma]) -> Result<(), String> {
        // A tree's layer: each process's mappings on their own.
        let spaces = crate::tree::split_vmas(vmas);
        if spaces.len() == 1 {
            crate::restore::check_lone_shm(vmas).map_err(|e| e.to_string())?;
        }
        for (space, own) in spaces {
            crate::restore::check_mappings(&own).map_err(|e| match space {
                0 => e.to_string(),
                _ => format!("address space {space}: {e}"),
            })?;
        }
        Ok(())
    }

    fn restore(&self, session: &mut dyn SessionStore) -> Result<i32, String> {
        self.restore_in_ns(session).map(|r| r.pid)
    }

    fn restore_in_ns(&self, session: &mut dyn SessionStore) -> Result<RestoredPid, String> {
        let tree = session_state(session)?;
        let img = session.flatten().map_err(|e| e.to_string())?;
        restore_as_asked(&tree, &img)
    }

    fn warm(&self) -> Option<Box<dyn WarmRestore>> {
        LocalWarm::boxed(crate::restore::Warm::start())
    }

    fn warm_keeping_pid(&self, ns_pid: i32) -> Option<Box<dyn WarmRestore>> {
        LocalWarm::boxed(crate::restore::Warm::start_keeping_pid(ns_pid))
    }

    fn ready_go(&self) -> bool {
        true
    }

    fn prepare(&self, session: &mut dyn SessionStore) -> Result<Box<dyn PreparedProcess>, String> {
        let tree = session_state(session)?;
        let img = session.flatten().map_err(|e| e.to_string())?;
        let prepared = if tree.processes.first().is_some_and(|p| p.keep_pids) {
            crate::restore::prepare_keeping_pids(&tree, &img)
        } else {
            crate::restore::prepare(&tree, &img)
        };
        prepared
            .map(LocalPrepared::boxed)
            .map_err(|e| e.to_string())
    }
}

/// [`crate::readygo::Prepared`] behind the page server's trait; dropped, it
/// abandons the process.
enum LocalPrepared {
    Whole(crate::readygo::Prepared),
    /// Post-copy: released, it yields the userfaultfd of its missing pages.
    Lazy(crate::readygo::Prepared<(i32, Option<crate::sys::uffd::Missing>)>),
}

impl LocalPrepared {
    fn boxed(p: crate::readygo::Prepared) -> Box<dyn PreparedProcess> {
        Box::new(LocalPrepared::Whole(p))
    }
}

impl PreparedProcess for LocalPrepared {
    fn pid(&self) -> i32 {
        match self {
            LocalPrepared::Whole(p) => p.pid(),
            LocalPrepared::Lazy(p) => p.pid(),
        }
    }

    fn release(self: Box<Self>) -> Result<Released, String> {
        match *self {
            LocalPrepared::Whole(p) => {
                let (ns_pid, pid_ns) = p.ns();
                let pid = p.release().map_err(|e| e.to_string())?;
                Ok(Released {
                    at: RestoredPid {
                        pid,
                        ns_pid,
                        pid_ns,
                    },
                    lazy: None,
                })
            }
            LocalPrepared::Lazy(p) => match p.release().map_err(|e| e.to_string())? {
                (pid, Some(missing)) => Ok(Released {
                    at: RestoredPid {
                        pid,
                        ..RestoredPid::default()
                    },
                    lazy: Some(Box::new(LocalLazy {
                        missing,
                        complete: std::sync::atomic::AtomicBool::new(false),
                    })),
                }),
                (pid, None) => {
                    // Running without a userfaultfd is no post-copy: it
                    // must not stay.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    Err(format!(
                        "process {pid} was released without a userfaultfd (no post-copy \
                         ranges); it was killed"
                    ))
                }
            },
        }
    }

    fn abandon(self: Box<Self>) {
        match *self {
            LocalPrepared::Whole(p) => p.abandon(),
            LocalPrepared::Lazy(p) => p.abandon(),
        }
    }
}

/// [`LocalRestorer`] without warm restore: everything happens at commit
/// (`ferry page-server --cold-restore`, and the benchmark's baseline for
/// what warm restore saves).
pub struct ColdRestorer;

impl Restorer for ColdRestorer {
    fn preflight_hello(&self, hello: &pb::Hello) -> Result<(), String> {
        LocalRestorer.preflight_hello(hello)
    }

    fn preflight_layer(&self, vmas: &[pb::Vma]) -> Result<(), String> {
        LocalRestorer.preflight_layer(vmas)
    }

    fn restore(&self, session: &mut dyn SessionStore) -> Result<i32, String> {
        LocalRestorer.restore(session)
    }

    fn restore_in_ns(&self, session: &mut dyn SessionStore) -> Result<RestoredPid, String> {
        LocalRestorer.restore_in_ns(session)
    }

    fn ready_go(&self) -> bool {
        true
    }

    fn prepare(&self, session: &mut dyn SessionStore) -> Result<Box<dyn PreparedProcess>, String> {
        LocalRestorer.prepare(session)
    }
}

/// A cold restore of `tree`, into a pid namespace of its own when the
/// source asked for `--keep-pids` (the root's `keep_pids`).
fn restore_as_asked(tree: &pb::ProcessTree, img: &FlatImage) -> Result<RestoredPid, String> {
    if tree.processes.first().is_some_and(|p| p.keep_pids) {
        let k = crate::restore::restore_keeping_pids(tree, img).map_err(|e| e.to_string())?;
        return Ok(RestoredPid {
            pid: k.pid,
            ns_pid: k.ns_pid,
            pid_ns: k.pid_ns,
        });
    }
    let pid = crate::restore::restore(tree, img).map_err(|e| e.to_string())?;
    Ok(RestoredPid {
        pid,
        ..RestoredPid::default()
    })
}

fn session_state(session: &dyn SessionStore) -> Result<pb::ProcessTree, String> {
    session
        .state()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the session has no process state".into())
}

/// [`crate::restore::Warm`] behind the page server's trait.
struct LocalWarm(crate::restore::Warm);

impl WarmRestore for LocalWarm {
    fn layer(&mut self, layer: FlatImage) -> Result<(), String> {
        self.0.layer(layer).map_err(|e| e.to_string())
    }

    fn finish(self: Box<Self>, session: &mut dyn SessionStore) -> Result<i32, String> {
        let tree = session_state(session)?;
        let layers = self.0.layers();
        if tree.processes.first().is_some_and(|p| p.keep_pids) != self.0.keep_pid().is_some() {
            // The state and the Hello disagree on --keep-pids: the stub
            // laid warm is in the wrong pid namespace.
            drop(self);
            let img = session.flatten().map_err(|e| e.to_string())?;
            return restore_as_asked(&tree, &img).map(|r| r.pid);
        }
        match self.0.finish(&tree) {
            Ok(pid) => Ok(pid),
            Err(f) if f.in_layers => {
                // The pages are all in the store: what failed was laying
                // them in early (a new mapping over the gadget, say).
                tracing::warn!(
                    layers,
                    "warm restore failed ({}); restoring from the flattened image",
                    f.error
                );
                let img = session.flatten().map_err(|e| e.to_string())?;
                restore_as_asked(&tree, &img).map(|r| r.pid)
            }
            Err(f) => Err(f.error.to_string()),
        }
    }

    fn post_copy(&self) -> bool {
        true
    }

    fn prepare(
        self: Box<Self>,
        session: &mut dyn SessionStore,
    ) -> Result<Box<dyn PreparedProcess>, String> {
        let tree = session_state(session)?;
        let layers = self.0.layers();
        let keep_pid = self.0.keep_pid();
        if tree.processes.first().is_some_and(|p| p.keep_pids) != keep_pid.is_some() {
            // As in `finish`: the stub laid warm is in the wrong pid
            // namespace.
            drop(self);
            return LocalRestorer.prepare(session);
        }
        let prepared = self.0.prepare(&tree).and_then(|p| match keep_pid {
            Some(n) => {
                crate::restore::in_its_ns(p, n).map_err(|error| crate::restore::WarmFailure {
                    // The process is held: the pages were laid; a cold
                    // restore is no help.
                    in_layers: false,
                    error,
                })
            }
            None => Ok(p),
        });
        match prepared {
            Ok(p) => Ok(LocalPrepared::boxed(p)),
            Err(f) if f.in_layers => {
                // As in `finish`: the pages are all in the store.
                tracing::warn!(
                    layers,
                    "warm restore failed ({}); restoring from the flattened image",
                    f.error
                );
                LocalRestorer.prepare(session)
            }
            Err(f) => Err(f.error.to_string()),
        }
    }

    fn finish_lazy(
        self: Box<Self>,
        session: &mut dyn SessionStore,
        lazy: &[pb::LazyRange],
    ) -> Result<Box<dyn LazyProcess>, String> {
        (*self).lazy(session, lazy)
    }

    fn prepare_lazy(
        self: Box<Self>,
        session: &mut dyn SessionStore,
        lazy: &[pb::LazyRange],
    ) -> Result<Box<dyn PreparedProcess>, String> {
        let tree = session_state(session)?;
        let ranges = lazy.iter().map(|r| (r.start, r.end)).collect();
        // A cold restore cannot leave pages missing: a failure refuses, so
        // the source runs on.
        self.0
            .prepare_lazy(&tree, ranges)
            .map(|p| Box::new(LocalPrepared::Lazy(p)) as Box<dyn PreparedProcess>)
            .map_err(|f| f.error.to_string())
    }
}

impl LocalWarm {
    fn boxed(
        w: Result<crate::restore::Warm, crate::restore::RestoreError>,
    ) -> Option<Box<dyn WarmRestore>> {
        match w {
            Ok(w) => Some(Box::new(LocalWarm(w))),
            Err(e) => {
                tracing::warn!("no warm restore: {e}");
                None
            }
        }
    }

    fn lazy(
        self,
        session: &mut dyn SessionStore,
        lazy: &[pb::LazyRange],
    ) -> Result<Box<dyn LazyProcess>, String> {
        let tree = session_state(session)?;
        let ranges = lazy.iter().map(|r| (r.start, r.end)).collect();
        match self.0.finish_lazy(&tree, ranges) {
            Ok((_, Some(missing))) => Ok(Box::new(LocalLazy {
                missing,
                complete: std::sync::atomic::AtomicBool::new(false),
            })),
            Ok((pid, None)) => Err(format!(
                "process {pid} was restored without a userfaultfd (no post-copy ranges)"
            )),
            // A cold restore cannot leave pages missing: refuse, so the
            // source runs on.
            Err(f) => Err(f.error.to_string()),
        }
    }
}

/// A restored process waiting for its post-copy pages, through its
/// userfaultfd ([`crate::sys::uffd::Missing`]). Dropped before every page
/// is in, it kills the process first.
struct LocalLazy {
    missing: crate::sys::uffd::Missing,
    complete: std::sync::atomic::AtomicBool,
}

impl LazyProcess for LocalLazy {
    fn pid(&self) -> i32 {
        self.missing.pid()
    }

    fn place(&self, addr: u64, data: &[u8]) -> Result<u64, String> {
        self.missing
            .copy(addr, data)
            .map(|(_, done)| done)
            .map_err(|e| e.to_string())
    }

    fn zero(&self, addr: u64) -> Result<(), String> {
        self.missing.zero(addr).map_err(|e| e.to_string())
    }

    fn wait(&self, timeout_ms: i32) -> Result<(), String> {
        self.missing.wait(timeout_ms).map_err(|e| e.to_string())
    }

    fn read_event(&self) -> Result<Option<LazyEvent>, String> {
        use crate::sys::uffd::MissingEvent as M;
        Ok(self
            .missing
            .read_event()
            .map_err(|e| e.to_string())?
            .map(|e| match e {
                M::Fault { addr } => LazyEvent::Fault(addr),
                M::Removed { start, end } => LazyEvent::Removed(start, end),
                M::Remapped { from, to, len } => LazyEvent::Remapped { from, to, len },
            }))
    }

    fn complete(&self) {
        self.complete
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn kill(&self) {
        if let Err(e) = self.missing.kill() {
            tracing::warn!(
                pid = self.missing.pid(),
                "killing the restored process: {e}"
            );
        }
    }
}

impl Drop for LocalLazy {
    fn drop(&mut self) {
        if !self.complete.load(std::sync::atomic::Ordering::Relaxed) {
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::QueryAnswer;
    use ferry_proto::session::Fate;

    fn answer(fate: Fate, uptime_s: u64) -> QueryAnswer {
        QueryAnswer {
            fate,
            note: "never seen by this page server".into(),
            uptime: Duration::from_secs(uptime_s),
        }
    }

    #[test]
    fn post_copy_resumes_the_source_only_if_nothing_ran() {
        let since = Duration::from_secs(3);
        let why = |reason: String| match judge(&answer(Fate::Abandoned { reason }, 100), since) {
            Some(Resolution::NoCopy { why }) => why,
            other => panic!("{other:?}"),
        };
        let never_released = why("no Go from the source within 15s after Ready".into());
        assert!(post_copy_may_resume(&never_released));
        let ran = why(format!(
            "{} (pid 42): the connection is gone",
            ferry_page_server::RAN_THEN_KILLED
        ));
        assert!(!post_copy_may_resume(&ran));
    }

    #[test]
    fn only_a_resumed_session_kills_the_source() {
        let since = Duration::from_secs(3);
        assert_eq!(
            judge(&answer(Fate::Resumed { pid: 9 }, 100), since),
            Some(Resolution::Resumed { pid: 9 })
        );
        let abandoned = Fate::Abandoned {
            reason: "no Go".into(),
        };
        assert!(matches!(
            judge(&answer(abandoned, 100), since),
            Some(Resolution::NoCopy { why }) if why.contains("no Go")
        ));
        // Not decided yet there: ask again.
        assert_eq!(judge(&answer(Fate::Pending, 100), since), None);
    }

    #[test]
    fn an_unknown_session_is_no_copy_only_from_a_page_server_up_since_before_go() {
        let since = Duration::from_secs(3);
        assert!(matches!(
            judge(&answer(Fate::Unknown, 100), since),
            Some(Resolution::NoCopy { why }) if why.contains("never seen")
        ));
        // Restarted since Go: it may have run the process and forgotten.
        assert!(matches!(
            judge(&answer(Fate::Unknown, 2), since),
            Some(Resolution::Unknown { last, .. }) if last.contains("may have restarted")
        ));
    }
}
