//! `ferry migrate`: the whole transaction. Rounds of pre-dump while the
//! process runs, a freeze, the final delta and the state, a restore on the
//! destination, and only when the destination answers `Restored{pid}` is
//! the source killed. Until that answer the source is held frozen and
//! intact; any failure before it — the destination refusing or failing the
//! restore, a lost connection, a timeout, ferry interrupted — resumes the
//! source, untraced, and names the cause. Exactly one copy of the process
//! runs afterwards.

use std::time::Duration;

use ferry_page_server::store::{FlatImage, SessionStore};
use ferry_page_server::{Restorer, WarmRestore};
use ferry_proto::pb;

use crate::client::CommitOutcome;
use crate::dump::{dump_frozen, DumpError, DumpOptions, DumpReport, RoundReport};

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
}

#[derive(Debug, Clone)]
pub struct MigrateReport {
    pub dump: DumpReport,
    /// The process on the destination.
    pub restored_pid: i32,
    /// From the freeze to the destination's `Restored`: the outage.
    pub downtime: Duration,
}

/// Migrates `opts.pid` to the page server in `opts.dest`, which must run
/// with `--restore`.
pub async fn migrate(
    mut opts: DumpOptions,
    progress: &mut (dyn FnMut(&RoundReport) + Send),
) -> Result<MigrateReport, MigrateError> {
    opts.restore = true;
    precheck(opts.pid)?;
    let (report, frozen) = dump_frozen(opts, progress).await?;
    match report.outcome.clone() {
        Some(CommitOutcome::Restored { pid }) => {
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
            })
        }
        Some(CommitOutcome::Failed { reason }) => {
            frozen.resume()?;
            Err(MigrateError::Refused(reason))
        }
        other => {
            frozen.resume()?;
            Err(MigrateError::Refused(format!(
                "unexpected answer {other:?}"
            )))
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
    }
    Ok(())
}

/// An open file with state of its own (eventfd, timerfd, memfd, …) held by
/// two processes of a tree would come back as two: refused by name.
fn shared_state(procs: &[pb::Process]) -> Result<(), String> {
    for (i, p) in procs.iter().enumerate() {
        for f in p.fds.iter().filter(|f| crate::state::stateful(f.kind())) {
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
        Ok(())
    }

    fn preflight_layer(&self, vmas: &[pb::Vma]) -> Result<(), String> {
        // A tree's layer: each process's mappings on their own.
        for (space, own) in crate::tree::split_vmas(vmas) {
            crate::restore::check_mappings(&own).map_err(|e| match space {
                0 => e.to_string(),
                _ => format!("address space {space}: {e}"),
            })?;
        }
        Ok(())
    }

    fn restore(&self, session: &mut dyn SessionStore) -> Result<i32, String> {
        let tree = session_state(session)?;
        let img = session.flatten().map_err(|e| e.to_string())?;
        crate::restore::restore(&tree, &img).map_err(|e| e.to_string())
    }

    fn warm(&self) -> Option<Box<dyn WarmRestore>> {
        match crate::restore::Warm::start() {
            Ok(w) => Some(Box::new(LocalWarm(w))),
            Err(e) => {
                tracing::warn!("no warm restore: {e}");
                None
            }
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
                crate::restore::restore(&tree, &img).map_err(|e| e.to_string())
            }
            Err(f) => Err(f.error.to_string()),
        }
    }
}
