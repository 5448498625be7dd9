//! `ferry demo`: a whole migration on this machine, with nothing to set up.
//! It writes fresh certificates to a temporary directory, starts a page
//! server on loopback (mutual TLS, restores enabled), starts a small
//! workload (`ferry workload`: memory, a counter, a log), migrates it —
//! rounds while it runs, a freeze, the final delta, a restore — and shows
//! the counter going on in the restored process while the original is gone.

use std::io::Write;
use std::time::Duration;

use ferry_page_server::tls::TlsError;
use ferry_proto::batch::Compress;

use crate::dump::{Destination, DumpOptions, RoundReport};
use crate::loopback::{Loopback, LoopbackError};
use crate::migrate::{migrate, MigrateError, MigrateReport};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Loopback(#[from] LoopbackError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Workload(#[from] crate::workload::WorkloadError),
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Size of the workload's memory.
    pub mib: u64,
    /// Pages it rewrites each second.
    pub dirty_rate: u64,
    pub streams: usize,
    pub compress: Compress,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            mib: 256,
            dirty_rate: 2000,
            streams: 4,
            compress: Compress::default(),
        }
    }
}

/// Runs the demo, narrating on `out`; `progress` shows each round.
pub async fn run(
    opts: &DemoOptions,
    out: &mut (dyn Write + Send),
    progress: &mut (dyn FnMut(&RoundReport) + Send),
) -> Result<MigrateReport, DemoError> {
    let server = Loopback::start()?;
    let _ = writeln!(
        out,
        "certificates: {} (fresh CA, mutual TLS)",
        server.tls_dir().display()
    );
    let _ = writeln!(
        out,
        "page server: {} (in memory, restores enabled)",
        server.addr
    );

    let log = server.scratch().join("workload.log");
    let spec = crate::workload::Spec::new(opts.mib, opts.dirty_rate as f64);
    let (mut child, before) = crate::workload::spawn(&spec, &log)?;
    let pid = child.id() as i32;
    let _ = writeln!(
        out,
        "workload: pid {pid}, {} MiB, rewriting {} pages/s, counter at {before} (log {})",
        opts.mib,
        opts.dirty_rate,
        log.display()
    );

    let connect = server.connect(opts.streams)?;
    let report = migrate(
        DumpOptions {
            compress: opts.compress,
            restore: true,
            ..DumpOptions::new(pid, Destination::Remote(connect))
        },
        progress,
    )
    .await;
    // The original is our child: collect it whatever happened.
    let report = match report {
        Ok(r) => {
            let _ = child.wait();
            r
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
    };
    let new = report.restored_pid;
    let at_freeze = crate::workload::last_count(&log).unwrap_or(before);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = crate::workload::last_count(&log).unwrap_or(0);
    let checked = tokio::task::spawn_blocking({
        let log = log.clone();
        move || crate::workload::verify(&log, Duration::from_secs(30))
    })
    .await
    .map_err(|e| crate::workload::WorkloadError::Corrupt(e.to_string()))?;
    let _ = writeln!(
        out,
        "migrated: pid {pid} is gone; the workload runs on as pid {new}.\n\
         downtime {:.1} ms (freeze to restored), {} rounds ({}), tracking {}.\n\
         its counter went on from {at_freeze} to {after}, not from zero.",
        report.downtime.as_secs_f64() * 1e3,
        report.dump.rounds.len(),
        report.dump.stop,
        report.dump.backend.name(),
    );
    match checked {
        Ok(n) => {
            let _ = writeln!(
                out,
                "it checked its whole memory: {n} pages as they should be."
            );
        }
        Err(e) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(new),
                nix::sys::signal::Signal::SIGTERM,
            );
            server.stop().await;
            return Err(e.into());
        }
    }
    // The demo's workload would run forever: stop it.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = writeln!(out, "stopped the migrated workload (pid {new}); demo over");
    server.stop().await;
    Ok(report)
}
