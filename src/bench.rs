//! `ferry bench`: real migrations of a `ferry workload` through a page
//! server on loopback (QUIC with mutual TLS, restore included), repeated
//! and compared in one invocation, so every figure is a ratio against a
//! baseline measured on the same machine at the same time.
//!
//! Modes change one thing each against `iterative` (the default
//! migration, with warm restore on the page server): `stop-and-copy` (no
//! pre-dump round: the baseline for downtime), `cold-restore` (the page
//! server restores only at commit), `no-zstd`, `checksum` (tracking by
//! hashing instead of uffd-wp), `one-stream` (one lane instead of four,
//! see [`crate::client::Connect::streams`]), `tcp` (plain TCP with the
//! same framing instead of QUIC with mutual TLS: the baseline for what the
//! secure transport costs; its page server restores warm too), `post-copy` (the same rounds, then the
//! process resumes on the destination with the last round's dirty pages
//! still to come, see [`crate::postcopy`]; it also reports the faults that
//! asked the source for a page, their latency, the time until the last
//! page arrived and the workload's slowdown in the second after the
//! resume). Each run reports its rounds (pages, bytes raw and on the wire,
//! time, rate, predicted downtime), its downtime broken into parts (freeze,
//! final round, state, restore), how much the rounds slowed the workload,
//! and that the migrated workload found its whole memory intact; each mode
//! the medians and min–max over the runs, and the rate of round 0 (the bulk
//! copy, where the transport shows most), for each memory size asked.
//!
//! The workload is `ferry workload --busy`: it counts fixed units of
//! computation, so its count per second before the migration against
//! during the rounds is the slowdown. By default it gets a CPU of its own
//! and both ends of the migration the others (on a real migration the
//! destination is another host); `--no-pin` lets all three share them.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::batch::Compress;

use crate::dump::{Destination, DumpOptions, FrozenParts, RoundReport};
use crate::loopback::Loopback;
use crate::migrate::{migrate, ColdRestorer, LocalRestorer};
use crate::policy::Policy;
use crate::track::Backend;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Loopback(#[from] crate::loopback::LoopbackError),
    #[error(transparent)]
    Tls(#[from] ferry_page_server::tls::TlsError),
    #[error(transparent)]
    Workload(#[from] crate::workload::WorkloadError),
    #[error("{mode}, run {run}: {source}")]
    Migrate {
        mode: &'static str,
        run: usize,
        #[source]
        source: crate::migrate::MigrateError,
    },
    #[error("unknown mode {0:?}: use iterative, stop-and-copy, cold-restore, no-zstd, checksum, one-stream, tcp or post-copy")]
    Mode(String),
    #[error("--separate-ends needs at least two CPUs for this process (one per end)")]
    SeparateEnds,
    #[error("starting the page server's runtime: {source}")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("{mode}, run {run}: the migrated workload is not intact: {source}")]
    Verify {
        mode: &'static str,
        run: usize,
        #[source]
        source: crate::workload::WorkloadError,
    },
}

/// One thing changed against a plain iterative migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Iterative,
    StopAndCopy,
    ColdRestore,
    NoZstd,
    Checksum,
    OneStream,
    /// Iterative over plain TCP (unencrypted, loopback only).
    Tcp,
    /// Iterative rounds, then post-copy instead of the final delta.
    PostCopy,
    /// Iterative, restored with `--keep-pids` into a pid namespace of its
    /// own.
    KeepPids,
}

impl Mode {
    pub const ALL: [Mode; 9] = [
        Mode::Iterative,
        Mode::StopAndCopy,
        Mode::ColdRestore,
        Mode::NoZstd,
        Mode::Checksum,
        Mode::OneStream,
        Mode::Tcp,
        Mode::PostCopy,
        Mode::KeepPids,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Iterative => "iterative",
            Mode::StopAndCopy => "stop-and-copy",
            Mode::ColdRestore => "cold-restore",
            Mode::NoZstd => "no-zstd",
            Mode::Checksum => "checksum",
            Mode::OneStream => "one-stream",
            Mode::Tcp => "tcp",
            Mode::PostCopy => "post-copy",
            Mode::KeepPids => "keep-pids",
        }
    }

    pub fn parse(s: &str) -> Result<Mode, BenchError> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| BenchError::Mode(s.into()))
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Workload sizes in MiB; every mode runs at each.
    pub sizes: Vec<u64>,
    /// Pages the workload rewrites per second.
    pub dirty_rate: u64,
    pub pattern: crate::workload::Pattern,
    pub content: crate::workload::Fill,
    pub runs: usize,
    pub modes: Vec<Mode>,
    /// Give the workload a CPU of its own and keep ferry (both ends) off
    /// it, so the slowdown shows what the migration does to the workload
    /// rather than two ends of a migration competing with it for two cores.
    pub pin: bool,
    /// Cap on the data streams in wire bytes per second, standing in for a
    /// slower link; 0 for none.
    pub link_rate: u64,
    /// Run the page server on a CPU of its own and the source end (with
    /// the workload, not busy then) on the others, as two hosts would: the
    /// rates are then each end's own rather than both ends' on one CPU.
    pub separate_ends: bool,
}

/// Splits the CPUs ferry may use: the last one for the workload, the rest
/// for every thread of this process (threads made later inherit it).
/// `None` if there are fewer than two.
fn pin_split() -> Option<nix::sched::CpuSet> {
    let (rest, last) = split_cpus()?;
    pin_process(&rest);
    Some(last)
}

/// The CPUs this process may use, as (all but the last, the last); `None`
/// with fewer than two.
fn split_cpus() -> Option<(nix::sched::CpuSet, nix::sched::CpuSet)> {
    use nix::sched::{sched_getaffinity, CpuSet};
    let mine = sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| mine.is_set(c).unwrap_or(false))
        .collect();
    let (&last, rest) = cpus.split_last()?;
    if rest.is_empty() {
        return None;
    }
    let (mut one, mut others) = (CpuSet::new(), CpuSet::new());
    one.set(last).ok()?;
    for &c in rest {
        others.set(c).ok()?;
    }
    Some((others, one))
}

/// Moves every thread of this process to `cpus` (threads made later
/// inherit it from the thread that makes them).
fn pin_process(cpus: &nix::sched::CpuSet) {
    use nix::sched::sched_setaffinity;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
            let _ = sched_setaffinity(nix::unistd::Pid::from_raw(tid), cpus);
        }
    }
}

/// `--separate-ends`: a runtime for the page servers whose every thread
/// (workers, and the blocking ones that restores and `block_in_place`
/// start) runs on the last CPU, while the rest of this process (the source
/// end) and the workload run on the others. Together with the workload
/// staying with the source, as it would on a real source host.
struct Ends {
    source: nix::sched::CpuSet,
    dest: tokio::runtime::Runtime,
}

fn separate_ends() -> Result<Ends, BenchError> {
    let (source, dest) = split_cpus().ok_or(BenchError::SeparateEnds)?;
    pin_process(&source);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ferry-dest")
        // Blocking threads outliving the runs, so none is made on the
        // clock of a later one.
        .thread_keep_alive(Duration::from_secs(3600))
        .on_thread_start(move || {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &dest);
        })
        .enable_all()
        .build()
        .map_err(|source| BenchError::Runtime { source })?;
    Ok(Ends { source, dest: rt })
}

/// One migration.
#[derive(Debug, Clone)]
pub struct Run {
    pub rounds: Vec<RoundReport>,
    pub downtime: Duration,
    pub parts: FrozenParts,
    pub total: Duration,
    /// 1 − (work rate during the rounds ÷ before them); `None` without
    /// rounds long enough to measure.
    pub slowdown: Option<f64>,
    /// Pages the migrated workload checked and found intact.
    pub verified: u64,
    /// Post-copy mode: what serving the missing pages took.
    pub post_copy: Option<crate::postcopy::PostCopyReport>,
    /// Post-copy mode: 1 − (work rate in the second after the resume ÷
    /// before the migration).
    pub slowdown_after: Option<f64>,
    /// CPU time this process spent on the migration: both ends, source and
    /// page server, run in it (see `process_cpu`).
    pub cpu: Duration,
    /// The same from the start of the migration to the end of each round
    /// (round 0's includes the connection and arming the tracking).
    pub round_cpu: Vec<Duration>,
}

impl Run {
    /// Round 0 (every page, while the process runs) in MB/s: raw bytes,
    /// or bytes on the wire.
    fn round0_rate(&self, wire: bool) -> f64 {
        self.rounds.first().map_or(f64::NAN, |r| {
            let bytes = if wire {
                r.stats.wire_bytes
            } else {
                r.stats.raw_bytes
            };
            bytes as f64 / r.total.as_secs_f64().max(1e-9) / 1e6
        })
    }

    /// CPU milliseconds per MiB moved (raw, or on the wire), over every
    /// round: the cost of moving a byte whatever the load, which a rate is
    /// not. NaN when nothing moved.
    fn cpu_per_mib(&self, wire: bool) -> f64 {
        per_mib(self.cpu, self.bytes(wire))
    }

    /// CPU milliseconds per MiB on the wire in round 0, the bulk copy:
    /// the transport's cost with least else mixed in (the later rounds add
    /// the scans, the freeze, the state and the restore).
    fn round0_cpu_per_mib(&self) -> f64 {
        match (self.round_cpu.first(), self.rounds.first()) {
            (Some(&cpu), Some(r)) => per_mib(cpu, r.stats.wire_bytes),
            _ => f64::NAN,
        }
    }

    fn bytes(&self, wire: bool) -> u64 {
        self.rounds
            .iter()
            .map(|r| {
                if wire {
                    r.stats.wire_bytes
                } else {
                    r.stats.raw_bytes
                }
            })
            .sum()
    }
}

#[derive(Debug, Clone)]
pub struct ModeResult {
    pub mode: Mode,
    pub mib: u64,
    pub runs: Vec<Run>,
}

/// Median, min and max of some figure over the runs.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

impl ModeResult {
    pub fn figure(&self, f: impl Fn(&Run) -> f64) -> Spread {
        spread(self.runs.iter().map(f).collect())
    }

    /// The run with the median downtime (its rounds are the ones shown).
    pub fn median_run(&self) -> Option<&Run> {
        let mut v: Vec<&Run> = self.runs.iter().collect();
        v.sort_by_key(|r| r.downtime);
        v.get(v.len() / 2).copied()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Milliseconds of `cpu` per MiB of `bytes`; NaN for no bytes.
fn per_mib(cpu: Duration, bytes: u64) -> f64 {
    if bytes == 0 {
        return f64::NAN;
    }
    ms(cpu) / (bytes as f64 / (1 << 20) as f64)
}

/// CPU time of this whole process so far, every thread (also those that
/// ended) and nothing of its children: both ends of a bench migration run
/// in it, while the workload and the process restored from it are other
/// processes, and the control's busy loop runs only after the migrations.
fn process_cpu() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Runs the benchmark, printing progress and the tables to `out`.
pub async fn run(
    opts: &BenchOptions,
    out: &mut (dyn Write + Send),
) -> Result<Vec<ModeResult>, BenchError> {
    let ends = if opts.separate_ends {
        let e = separate_ends()?;
        let _ = writeln!(
            out,
            "separate ends: the page server on a CPU of its own, the source end and the \
             workload (not busy: no slowdown measured) on the other(s)"
        );
        Some(e)
    } else {
        None
    };
    let workload_cpus = match &ends {
        Some(e) => Some(e.source),
        None if opts.pin => pin_split(),
        None => None,
    };
    if opts.pin && workload_cpus.is_none() {
        let _ = writeln!(
            out,
            "fewer than two CPUs: the workload shares them with ferry"
        );
    }
    if opts.link_rate > 0 {
        let _ = writeln!(
            out,
            "data streams capped at {:.1} MB/s of wire bytes (--link-rate), standing in for a slower link",
            opts.link_rate as f64 / 1e6
        );
    }
    let start = |tcp, restorer: Arc<dyn ferry_page_server::Restorer>| match &ends {
        Some(e) => Loopback::start_in(e.dest.handle(), tcp, restorer),
        None => Loopback::start_in(&tokio::runtime::Handle::current(), tcp, restorer),
    };
    let warm = start(false, Arc::new(LocalRestorer))?;
    let cold = if opts.modes.contains(&Mode::ColdRestore) {
        Some(start(false, Arc::new(ColdRestorer))?)
    } else {
        None
    };
    let tcp = if opts.modes.contains(&Mode::Tcp) {
        Some(start(true, Arc::new(LocalRestorer))?)
    } else {
        None
    };
    let mut results = Vec::new();
    for &mib in &opts.sizes {
        for &mode in &opts.modes {
            let server = match (&cold, &tcp, mode) {
                (Some(c), _, Mode::ColdRestore) => c,
                (_, Some(t), Mode::Tcp) => t,
                _ => &warm,
            };
            let mut runs = Vec::new();
            for run in 1..=opts.runs {
                let r = one_run(opts, server, mode, mib, run, workload_cpus.as_ref()).await?;
                let _ = writeln!(
                    out,
                    "{:>5} MiB {:<14} run {run}/{}: downtime {:8.1} ms, {} rounds, {:.1} MiB raw, {:.1} MiB wire, slowdown {}, {} pages verified",
                    mib,
                    mode.name(),
                    opts.runs,
                    ms(r.downtime),
                    r.rounds.len(),
                    r.bytes(false) as f64 / (1 << 20) as f64,
                    r.bytes(true) as f64 / (1 << 20) as f64,
                    r.slowdown.map_or("-".into(), |s| format!("{:.1} %", s * 100.0)),
                    r.verified,
                );
                runs.push(r);
            }
            results.push(ModeResult { mode, mib, runs });
        }
    }
    let _ = write!(out, "{}", table(&results));
    // With separate ends the workload is not busy and shares the source's
    // CPU: there is no slowdown to compare with.
    let control_cpus = workload_cpus.as_ref().filter(|_| ends.is_none());
    if let (Some(cpus), Some(&mib)) = (control_cpus, opts.sizes.first()) {
        let mut control = Vec::new();
        for run in 1..=opts.runs.min(3) {
            control.extend(contention_control(opts, &warm, mib, run, cpus).await?);
        }
        if !control.is_empty() {
            let f = spread(control.iter().map(|s| s * 100.0).collect());
            let _ = writeln!(
                out,
                "\ncontrol, no migration: a busy loop on ferry's CPU slows the workload by {:.1} % ({:.1}-{:.1}, {} runs)",
                f.median,
                f.min,
                f.max,
                control.len()
            );
        }
    }
    warm.stop().await;
    for s in [cold, tcp].into_iter().flatten() {
        s.stop().await;
    }
    if let Some(e) = ends {
        // Not dropped here: dropping a runtime may block, which an async
        // context refuses.
        e.dest.shutdown_background();
    }
    Ok(results)
}

/// The slowdown a plain busy loop on ferry's CPUs causes the pinned
/// workload, with no migration at all: the part of a run's slowdown that
/// is only two vCPUs sharing a core (on these machines they act as SMT
/// siblings), which a migration between two hosts would not have.
async fn contention_control(
    opts: &BenchOptions,
    server: &Loopback,
    mib: u64,
    run: usize,
    cpus: &nix::sched::CpuSet,
) -> Result<Option<f64>, BenchError> {
    let log = server.scratch().join(format!("{mib}-control-{run}.log"));
    let spec = crate::workload::Spec {
        busy: true,
        pattern: opts.pattern,
        content: opts.content,
        ..crate::workload::Spec::new(mib, opts.dirty_rate as f64)
    };
    let (mut child, _) = crate::workload::spawn(&spec, &log)?;
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(child.id() as i32), cpus);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let start = unix_ms();
    // The burner inherits this process's CPUs: those ferry runs on.
    tokio::task::spawn_blocking(|| {
        let until = std::time::Instant::now() + Duration::from_secs(2);
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    })
    .await
    .ok();
    let end = unix_ms();
    let _ = child.kill();
    let _ = child.wait();
    let samples = crate::workload::samples(&log);
    let before = crate::workload::rate(&samples, start.saturating_sub(1000), start);
    let during = crate::workload::rate(&samples, start, end);
    Ok(before.zip(during).map(|(b, d)| 1.0 - d / b))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One migration of a fresh workload; the migrated one checks its memory
/// and is killed.
async fn one_run(
    opts: &BenchOptions,
    server: &Loopback,
    mode: Mode,
    mib: u64,
    run: usize,
    cpus: Option<&nix::sched::CpuSet>,
) -> Result<Run, BenchError> {
    let log = server
        .scratch()
        .join(format!("{mib}-{}-{run}.log", mode.name()));
    let spec = crate::workload::Spec {
        // With separate ends it shares the source's CPU, and a busy one
        // would take half of it.
        busy: !opts.separate_ends,
        pattern: opts.pattern,
        content: opts.content,
        ..crate::workload::Spec::new(mib, opts.dirty_rate as f64)
    };
    let (mut child, _) = crate::workload::spawn(&spec, &log)?;
    if let Some(c) = cpus {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(child.id() as i32), c);
    }
    // Its pace before the migration is the baseline of the slowdown.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut connect = server.connect(if mode == Mode::OneStream { 1 } else { 4 })?;
    connect.max_rate = opts.link_rate;
    let dump = DumpOptions {
        track: Some(if mode == Mode::Checksum {
            Backend::Checksum
        } else {
            Backend::UffdWp
        }),
        policy: Policy {
            max_rounds: if mode == Mode::StopAndCopy { 0 } else { 8 },
            ..Policy::default()
        },
        compress: if mode == Mode::NoZstd {
            Compress::Off
        } else {
            Compress::default()
        },
        restore: true,
        keep_pids: mode == Mode::KeepPids,
        ..DumpOptions::new(child.id() as i32, Destination::Remote(connect))
    };
    let start = unix_ms();
    let cpu_start = process_cpu();
    let mut round_cpu = Vec::new();
    let mut progress = |_: &RoundReport| round_cpu.push(process_cpu().saturating_sub(cpu_start));
    let result = if mode == Mode::PostCopy {
        let pc = crate::postcopy::PostCopyOptions::default();
        crate::migrate::migrate_post_copy(dump, &pc, &mut progress).await
    } else {
        migrate(dump, &mut progress).await
    };
    let cpu = process_cpu().saturating_sub(cpu_start);
    let end = unix_ms();
    let _ = child.kill();
    let _ = child.wait();
    let report = result.map_err(|source| BenchError::Migrate {
        mode: mode.name(),
        run,
        source,
    })?;
    let pid = nix::unistd::Pid::from_raw(report.restored_pid);
    let checked = tokio::task::spawn_blocking({
        let log = log.clone();
        move || crate::workload::verify(&log, Duration::from_secs(60))
    })
    .await
    .unwrap_or_else(|e| Err(crate::workload::WorkloadError::Corrupt(e.to_string())));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = server.store.remove(report.dump.session);
    let verified = checked.map_err(|source| BenchError::Verify {
        mode: mode.name(),
        run,
        source,
    })?;
    let samples = crate::workload::samples(&log);
    // The resume: the end, less the post-copy phase.
    let resumed = end.saturating_sub(
        report
            .post_copy
            .as_ref()
            .map_or(0, |p| p.elapsed.as_millis() as u64),
    );
    let frozen = resumed.saturating_sub(report.downtime.as_millis() as u64);
    let before = crate::workload::rate(&samples, start.saturating_sub(1000), start);
    let during = crate::workload::rate(&samples, start, frozen);
    tracing::debug!(
        ?before,
        ?during,
        start,
        frozen,
        "workload rates (counts per second)"
    );
    Ok(Run {
        rounds: report.dump.rounds.clone(),
        downtime: report.downtime,
        parts: report.dump.parts,
        total: report.dump.total,
        slowdown: before
            .zip(during)
            .filter(|_| !opts.separate_ends)
            .map(|(b, d)| 1.0 - d / b),
        verified,
        slowdown_after: report.post_copy.as_ref().and_then(|_| {
            let after = crate::workload::rate(&samples, resumed, resumed + 1000)?;
            before.map(|b| 1.0 - after / b)
        }),
        post_copy: report.post_copy.clone(),
        cpu,
        round_cpu,
    })
}

/// The summary tables, per size: per mode, then the rounds of the
/// iterative median run; with several sizes, how downtime grows with size.
pub fn table(results: &[ModeResult]) -> String {
    let mut t = String::new();
    let mut sizes: Vec<u64> = results.iter().map(|r| r.mib).collect();
    sizes.dedup();
    if sizes.is_empty() {
        sizes.push(0);
    }
    for &mib in &sizes {
        let group: Vec<&ModeResult> = results.iter().filter(|r| r.mib == mib).collect();
        let base = group
            .iter()
            .find(|r| r.mode == Mode::StopAndCopy)
            .map(|r| r.figure(|x| ms(x.downtime)).median);
        let _ = writeln!(
            t,
            "\n{mib} MiB\n{:<14} {:>22} {:>8} {:>7} {:>7} {:>7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
            "mode",
            "downtime ms med (min-max)",
            "vs s&c",
            "freeze",
            "final",
            "state",
            "restore",
            "rounds",
            "raw MiB",
            "wire MiB",
            "r0 MB/s",
            "r0 wire",
            "slowdown",
            "r0 CPU/MiB",
            "CPU ms/MiB"
        );
        for r in &group {
            let d = r.figure(|x| ms(x.downtime));
            let ratio = base.map_or("-".to_string(), |b| format!("{:.3}", d.median / b));
            let mib = |wire| r.figure(|x| x.bytes(wire) as f64 / (1 << 20) as f64).median;
            let slow: Vec<f64> = r.runs.iter().filter_map(|x| x.slowdown).collect();
            let slow = if slow.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1} %", spread(slow).median * 100.0)
            };
            let _ = writeln!(
                t,
                "{:<14} {:>8.1} ({:>5.0}-{:<5.0}) {:>8} {:>7.2} {:>7.1} {:>7.1} {:>9.1} {:>7.0} {:>9.1} {:>9.1} {:>9.0} {:>9.0} {:>9} {:>10.2} {:>10.2}",
                r.mode.name(),
                d.median,
                d.min,
                d.max,
                ratio,
                r.figure(|x| ms(x.parts.freeze)).median,
                r.figure(|x| ms(x.parts.final_round)).median,
                r.figure(|x| ms(x.parts.state)).median,
                r.figure(|x| ms(x.parts.commit)).median,
                r.figure(|x| x.rounds.len() as f64).median,
                mib(false),
                mib(true),
                r.figure(|x| x.round0_rate(false)).median,
                r.figure(|x| x.round0_rate(true)).median,
                slow,
                r.figure(|x| x.round0_cpu_per_mib()).median,
                r.figure(|x| x.cpu_per_mib(true)).median,
            );
        }
        for r in group.iter().filter(|r| r.mode == Mode::PostCopy) {
            let pc = |f: &dyn Fn(&crate::postcopy::PostCopyReport) -> f64| {
                let v: Vec<f64> = r
                    .runs
                    .iter()
                    .filter_map(|x| x.post_copy.as_ref().map(f))
                    .collect();
                if v.is_empty() {
                    f64::NAN
                } else {
                    spread(v).median
                }
            };
            let after: Vec<f64> = r.runs.iter().filter_map(|x| x.slowdown_after).collect();
            let _ = writeln!(
                t,
                "\npost-copy (medians): {:.0} pages lazy, last page {:.1} ms after the resume; \
                 {:.0} faults asked the source, latency median {:.0} µs, p99 {:.0} µs; \
                 {:.0} served locally; slowdown in the second after the resume {}",
                pc(&|p| p.lazy_pages as f64),
                pc(&|p| p.last_page.as_secs_f64() * 1e3),
                pc(&|p| p.faults as f64),
                pc(&|p| p.fault_median_us as f64),
                pc(&|p| p.fault_p99_us as f64),
                pc(&|p| p.local_faults as f64),
                if after.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.1} %", spread(after).median * 100.0)
                },
            );
        }
        let group_owned: Vec<ModeResult> = group.iter().map(|r| (*r).clone()).collect();
        if let Some(ratio) = quic_vs_tcp(&group_owned) {
            let _ = writeln!(
                t,
                "\nQUIC with mutual TLS moves {ratio:.2} x the bytes per second of plain TCP \
                 (round 0 on the wire, medians of iterative / tcp)"
            );
        }
        if let (Some(r0), Some(all)) = (
            quic_vs_tcp_cpu(&group_owned, true),
            quic_vs_tcp_cpu(&group_owned, false),
        ) {
            let _ = writeln!(
                t,
                "QUIC with mutual TLS spends {r0:.2} x the CPU per MiB of plain TCP in round 0, \
                 {all:.2} x over the whole migration (ferry's process, both ends, per MiB on \
                 the wire, medians of iterative / tcp)"
            );
        }
        if let Some(gain) = zstd_gain(&group_owned) {
            let _ = writeln!(
                t,
                "\nwith zstd, memory goes out {gain:.2} x as fast as without \
                 (round 0 raw MB/s, medians of iterative / no-zstd)"
            );
        }
        if let Some(run) = group
            .iter()
            .find(|r| r.mode == Mode::Iterative)
            .and_then(|r| r.median_run())
        {
            let _ = writeln!(
                t,
                "\nrounds of the median iterative run:\n{:>5} {:>8} {:>10} {:>10} {:>10} {:>8} {:>9} {:>10}",
                "round", "", "pages", "raw MiB", "wire MiB", "ms", "MB/s", "predicted"
            );
            for x in &run.rounds {
                let _ = writeln!(
                    t,
                    "{:>5} {:>8} {:>10} {:>10.1} {:>10.1} {:>8.1} {:>9.0} {:>10}",
                    x.round,
                    if x.frozen { "frozen" } else { "running" },
                    x.stats.pages,
                    x.stats.raw_bytes as f64 / (1 << 20) as f64,
                    x.stats.wire_bytes as f64 / (1 << 20) as f64,
                    ms(x.total),
                    x.rate_mb_s(),
                    x.predicted_downtime
                        .map_or("-".to_string(), |d| format!("{:.1} ms", ms(d))),
                );
            }
        }
    }
    if sizes.len() > 1 {
        let (small, large) = (sizes[0], sizes[sizes.len() - 1]);
        let _ = writeln!(t, "\nmedian downtime at {large} MiB ÷ at {small} MiB:");
        for r in results.iter().filter(|r| r.mib == small) {
            if let Some(l) = results.iter().find(|x| x.mib == large && x.mode == r.mode) {
                let (a, b) = (
                    r.figure(|x| ms(x.downtime)).median,
                    l.figure(|x| ms(x.downtime)).median,
                );
                let _ = writeln!(
                    t,
                    "{:<14} {:>8.1} ms ÷ {:>8.1} ms = {:.2}",
                    r.mode.name(),
                    b,
                    a,
                    b / a
                );
            }
        }
    }
    t
}

/// Median round-0 wire rate of `iterative` (QUIC) over that of `tcp`, when
/// both ran (at the first size both ran at).
/// Median round-0 rate of `a` over that of `b` (on the wire or raw).
fn rate_ratio(results: &[ModeResult], a: Mode, b: Mode, wire: bool) -> Option<f64> {
    let rate = |m| {
        results
            .iter()
            .find(|r| r.mode == m)
            .map(|r| r.figure(|x| x.round0_rate(wire)).median)
    };
    Some(rate(a)? / rate(b)?)
}

/// How much faster memory goes out with zstd than without: round 0's raw
/// rate (memory moved per second), medians of iterative / no-zstd.
pub fn zstd_gain(results: &[ModeResult]) -> Option<f64> {
    rate_ratio(results, Mode::Iterative, Mode::NoZstd, false)
}

pub fn quic_vs_tcp(results: &[ModeResult]) -> Option<f64> {
    rate_ratio(results, Mode::Iterative, Mode::Tcp, true)
}

/// Median CPU per MiB on the wire of `a` over that of `b`, in round 0 or
/// over the whole migration.
fn cpu_ratio(results: &[ModeResult], a: Mode, b: Mode, round0: bool) -> Option<f64> {
    let cpu = |m| {
        results.iter().find(|r| r.mode == m).map(|r| {
            r.figure(|x| {
                if round0 {
                    x.round0_cpu_per_mib()
                } else {
                    x.cpu_per_mib(true)
                }
            })
            .median
        })
    };
    Some(cpu(a)? / cpu(b)?)
}

/// What QUIC with mutual TLS costs in CPU per byte against plain TCP:
/// median CPU ms per MiB on the wire of iterative / tcp, in round 0 or
/// over the whole migration. Unlike the rates' ratio it holds on a loaded
/// machine.
pub fn quic_vs_tcp_cpu(results: &[ModeResult], round0: bool) -> Option<f64> {
    cpu_ratio(results, Mode::Iterative, Mode::Tcp, round0)
}

pub fn json(results: &[ModeResult]) -> serde_json::Value {
    let s = |v: Spread| serde_json::json!({"median": v.median, "min": v.min, "max": v.max});
    let same_size = |mib| results.iter().filter(move |r: &&ModeResult| r.mib == mib);
    serde_json::Value::Array(
        results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "mode": r.mode.name(),
                    "mib": r.mib,
                    "downtime_ms": s(r.figure(|x| ms(x.downtime))),
                    "parts_ms": {
                        "freeze": s(r.figure(|x| ms(x.parts.freeze))),
                        "final_round": s(r.figure(|x| ms(x.parts.final_round))),
                        "state": s(r.figure(|x| ms(x.parts.state))),
                        "restore": s(r.figure(|x| ms(x.parts.commit))),
                    },
                    "total_s": s(r.figure(|x| x.total.as_secs_f64())),
                    "round0_mb_s": {
                        "raw": s(r.figure(|x| x.round0_rate(false))),
                        "wire": s(r.figure(|x| x.round0_rate(true))),
                    },
                    "cpu_ms": s(r.figure(|x| ms(x.cpu))),
                    "cpu_ms_per_mib": {
                        "raw": s(r.figure(|x| x.cpu_per_mib(false))),
                        "wire": s(r.figure(|x| x.cpu_per_mib(true))),
                        "round0_wire": s(r.figure(|x| x.round0_cpu_per_mib())),
                    },
                    // Against the tcp mode at the same size, when it ran:
                    // for iterative, what QUIC with mutual TLS costs.
                    "vs_tcp": same_size(r.mib).find(|t| t.mode == Mode::Tcp).map(|t| {
                        let both = [r.clone(), (*t).clone()];
                        serde_json::json!({
                            "round0_wire": rate_ratio(&both, r.mode, Mode::Tcp, true),
                            "cpu_ms_per_mib": cpu_ratio(&both, r.mode, Mode::Tcp, false),
                            "round0_cpu_ms_per_mib": cpu_ratio(&both, r.mode, Mode::Tcp, true),
                        })
                    }),
                    "runs": r.runs.iter().map(|run| serde_json::json!({
                        "downtime_ms": ms(run.downtime),
                        "cpu_ms": ms(run.cpu),
                        "round_cpu_ms": run.round_cpu.iter().map(|&c| ms(c)).collect::<Vec<_>>(),
                        "slowdown": run.slowdown,
                        "verified_pages": run.verified,
                        "post_copy": run.post_copy.as_ref().map(|p| serde_json::json!({
                            "lazy_pages": p.lazy_pages,
                            "faults": p.faults,
                            "local_faults": p.local_faults,
                            "fault_median_us": p.fault_median_us,
                            "fault_p99_us": p.fault_p99_us,
                            "fault_max_us": p.fault_max_us,
                            "last_page_ms": ms(p.last_page),
                            "slowdown_after": run.slowdown_after,
                        })),
                        "rounds": run.rounds.iter().map(|x| serde_json::json!({
                            "round": x.round,
                            "frozen": x.frozen,
                            "pages": x.stats.pages,
                            "raw_bytes": x.stats.raw_bytes,
                            "wire_bytes": x.stats.wire_bytes,
                            "ms": ms(x.total),
                            "predicted_downtime_ms": x.predicted_downtime.map(ms),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// An SVG a person reads at a glance: the bytes of each round of the
/// median iterative run (convergence), and each mode's median downtime as
/// stacked parts.
pub fn svg(results: &[ModeResult]) -> String {
    let (w, h) = (960.0, f64::max(360.0, 70.0 + results.len() as f64 * 34.0));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    // Left: bytes per round.
    let _ = writeln!(s, "<text x=\"20\" y=\"20\" font-size=\"14\">bytes per round (median iterative run; raw, wire)</text>");
    if let Some(run) = results
        .iter()
        .find(|r| r.mode == Mode::Iterative)
        .and_then(|r| r.median_run())
    {
        let max = run
            .rounds
            .iter()
            .map(|r| r.stats.raw_bytes)
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let (x0, y0, ph) = (40.0, 320.0, 260.0);
        let bw = (380.0 / run.rounds.len().max(1) as f64).min(60.0);
        for (i, r) in run.rounds.iter().enumerate() {
            let x = x0 + i as f64 * bw;
            let hr = r.stats.raw_bytes as f64 / max * ph;
            let hw = r.stats.wire_bytes as f64 / max * ph;
            let _ = writeln!(s, "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{hr:.1}\" fill=\"#9ecae1\"/>", y0 - hr, bw * 0.45);
            let _ = writeln!(s, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{hw:.1}\" fill=\"#3182bd\"/>", x + bw * 0.45, y0 - hw, bw * 0.45);
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{}{}: {:.1} MiB</text>",
                x,
                y0 + 14.0 + (i % 2) as f64 * 11.0,
                r.round,
                if r.frozen { "*" } else { "" },
                r.stats.raw_bytes as f64 / (1 << 20) as f64
            );
        }
    }
    // Right: downtime parts per mode.
    let _ = writeln!(s, "<text x=\"470\" y=\"20\" font-size=\"14\">median downtime per mode (ms): final round, state, restore</text>");
    let max = results
        .iter()
        .map(|r| r.figure(|x| ms(x.downtime)).median)
        .fold(1.0, f64::max);
    for (i, r) in results.iter().enumerate() {
        let y = 45.0 + i as f64 * 34.0;
        let mut x = 580.0;
        let _ = writeln!(
            s,
            "<text x=\"470\" y=\"{:.1}\" font-size=\"10\">{} {} MiB</text>",
            y + 18.0,
            r.mode.name(),
            r.mib
        );
        for (v, color) in [
            (r.figure(|x| ms(x.parts.final_round)).median, "#31a354"),
            (r.figure(|x| ms(x.parts.state)).median, "#fd8d3c"),
            (r.figure(|x| ms(x.parts.commit)).median, "#de2d26"),
        ] {
            let wpx = v / max * 280.0;
            let _ = writeln!(s, "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{wpx:.1}\" height=\"26\" fill=\"{color}\"/>");
            x += wpx;
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">{:.0}</text>",
            x + 4.0,
            y + 18.0,
            r.figure(|x| ms(x.downtime)).median
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_and_modes() {
        let s = spread(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert!(spread(vec![]).median.is_nan());
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.name()).unwrap(), m);
        }
        assert!(Mode::parse("teleport").is_err());
    }

    fn run_at(mb_per_s: u64) -> Run {
        run_costing(mb_per_s, Duration::from_millis(100))
    }

    /// A run at `mb_per_s` in round 0 whose migration took `cpu`.
    fn run_costing(mb_per_s: u64, cpu: Duration) -> Run {
        let round = |round: u32, bytes: u64| RoundReport {
            round,
            frozen: round > 0,
            dirty_pages: bytes / 4096,
            stats: crate::client::LayerStats {
                raw_bytes: bytes,
                wire_bytes: bytes / 2,
                ..Default::default()
            },
            scan: Duration::ZERO,
            total: Duration::from_millis(500),
            predicted_downtime: None,
        };
        Run {
            // Round 0 moves mb_per_s / 2 MB in half a second; the frozen
            // round after it must not count.
            rounds: vec![round(0, mb_per_s * 500_000), round(1, 1)],
            downtime: Duration::from_millis(10),
            parts: FrozenParts::default(),
            total: Duration::from_secs(1),
            slowdown: Some(0.05),
            verified: 1,
            post_copy: None,
            slowdown_after: None,
            cpu,
            // A quarter of it in round 0.
            round_cpu: vec![cpu / 4, cpu],
        }
    }

    #[test]
    fn round0_rates_and_the_transport_ratio() {
        let r = run_at(800);
        assert!((r.round0_rate(false) - 800.0).abs() < 1e-6);
        assert!((r.round0_rate(true) - 400.0).abs() < 1e-6);
        let mode = |mode, rates: &[u64]| ModeResult {
            mode,
            mib: 64,
            runs: rates.iter().map(|&x| run_at(x)).collect(),
        };
        let quic = mode(Mode::Iterative, &[700, 600, 900]);
        let tcp = mode(Mode::Tcp, &[1000, 800, 1200]);
        assert_eq!(quic_vs_tcp(std::slice::from_ref(&quic)), None);
        let ratio = quic_vs_tcp(&[quic.clone(), tcp.clone()]).unwrap();
        assert!((ratio - 0.7).abs() < 1e-9, "{ratio}");
        let t = table(&[quic, tcp]);
        assert!(
            t.contains("r0 MB/s") && t.contains("0.70 x") && t.contains("5.0 %"),
            "{t}"
        );
    }

    #[test]
    fn cpu_per_mib_and_its_transport_ratio() {
        // 800 MB/s for half a second: 400 MB raw and 200 MB on the wire,
        // plus round 1's byte raw (none on the wire); every round counts.
        let r = run_costing(800, Duration::from_millis(1000));
        let mib = |b: f64| b / (1 << 20) as f64;
        assert!((r.cpu_per_mib(true) - 1000.0 / mib(200e6)).abs() < 1e-9);
        assert!((r.cpu_per_mib(false) - 1000.0 / mib(400e6 + 1.0)).abs() < 1e-9);
        assert!((r.round0_cpu_per_mib() - 250.0 / mib(200e6)).abs() < 1e-9);
        let unmeasured = Run {
            round_cpu: Vec::new(),
            ..r.clone()
        };
        assert!(unmeasured.round0_cpu_per_mib().is_nan());
        assert!(per_mib(Duration::from_secs(1), 0).is_nan());
        assert_eq!(per_mib(Duration::from_millis(3), 2 << 20), 1.5);
        let mode = |mode, cpu_ms: &[u64]| ModeResult {
            mode,
            mib: 64,
            runs: cpu_ms
                .iter()
                .map(|&c| run_costing(800, Duration::from_millis(c)))
                .collect(),
        };
        // Medians 600 and 200 ms for the same bytes: 3 x; the outliers
        // must not count.
        let quic = mode(Mode::Iterative, &[600, 5000, 550, 610, 100]);
        let tcp = mode(Mode::Tcp, &[200, 190, 900, 210, 10]);
        assert_eq!(quic_vs_tcp_cpu(std::slice::from_ref(&quic), false), None);
        for round0 in [false, true] {
            let ratio = quic_vs_tcp_cpu(&[quic.clone(), tcp.clone()], round0).unwrap();
            assert!((ratio - 3.0).abs() < 1e-9, "{ratio}");
        }
        let t = table(&[quic.clone(), tcp.clone()]);
        assert!(
            t.contains("CPU ms/MiB") && t.contains("spends 3.00 x") && t.contains("3.00 x over"),
            "{t}"
        );
        let j = json(&[quic, tcp]);
        assert!((j[0]["vs_tcp"]["cpu_ms_per_mib"].as_f64().unwrap() - 3.0).abs() < 1e-9);
        assert!((j[0]["vs_tcp"]["round0_cpu_ms_per_mib"].as_f64().unwrap() - 3.0).abs() < 1e-9);
        assert!((j[0]["cpu_ms"]["median"].as_f64().unwrap() - 600.0).abs() < 1e-9);
        assert_eq!(j[1]["vs_tcp"]["cpu_ms_per_mib"].as_f64(), Some(1.0));
        // Without a tcp mode there is nothing to compare with.
        let alone = json(&[mode(Mode::Iterative, &[1])]);
        assert!(alone[0]["vs_tcp"].is_null());
    }

    #[test]
    fn empty_results_render() {
        assert!(table(&[]).contains("mode"));
        assert!(svg(&[]).starts_with("<svg"));
        assert_eq!(json(&[]), serde_json::json!([]));
    }
}
