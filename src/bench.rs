//! `ferry bench`: real migrations of a `ferry workload` through a page
//! server on loopback (QUIC with mutual TLS, restore included), repeated
//! and compared in one invocation, so every figure is a ratio against a
//! baseline measured on the same machine at the same time.
//!
//! Modes change one thing each against `iterative` (the default
//! migration): `stop-and-copy` (no pre-dump round: the baseline for
//! downtime), `no-zstd`, `checksum` (tracking by hashing instead of
//! uffd-wp), `one-stream` (one QUIC data stream instead of four). Each run
//! reports its rounds (pages, bytes raw and on the wire, time, rate,
//! predicted downtime) and its downtime broken into parts (freeze, final
//! round, state, restore); each mode the medians and min–max over the runs.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use ferry_proto::batch::Compress;

use crate::dump::{Destination, DumpOptions, FrozenParts, RoundReport};
use crate::loopback::Loopback;
use crate::migrate::migrate;
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
    #[error("unknown mode {0:?}: use iterative, stop-and-copy, no-zstd, checksum or one-stream")]
    Mode(String),
}

/// One thing changed against a plain iterative migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Iterative,
    StopAndCopy,
    NoZstd,
    Checksum,
    OneStream,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Iterative,
        Mode::StopAndCopy,
        Mode::NoZstd,
        Mode::Checksum,
        Mode::OneStream,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Iterative => "iterative",
            Mode::StopAndCopy => "stop-and-copy",
            Mode::NoZstd => "no-zstd",
            Mode::Checksum => "checksum",
            Mode::OneStream => "one-stream",
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
    pub mib: u64,
    /// Pages the workload rewrites per second.
    pub dirty_rate: u64,
    pub runs: usize,
    pub modes: Vec<Mode>,
}

/// One migration.
#[derive(Debug, Clone)]
pub struct Run {
    pub rounds: Vec<RoundReport>,
    pub downtime: Duration,
    pub parts: FrozenParts,
    pub total: Duration,
}

impl Run {
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

/// Runs the benchmark, printing progress and the tables to `out`.
pub async fn run(
    opts: &BenchOptions,
    out: &mut (dyn Write + Send),
) -> Result<Vec<ModeResult>, BenchError> {
    let server = Loopback::start()?;
    let store = server.store.clone();

    let mut results = Vec::new();
    let total_runs = opts.runs;
    for &mode in &opts.modes {
        let mut runs = Vec::new();
        for run in 1..=total_runs {
            let log = server.scratch().join(format!("{}-{run}.log", mode.name()));
            let (mut child, _) = crate::workload::spawn(opts.mib, opts.dirty_rate, &log)?;
            // Let it dirty memory at its pace before the migration starts.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let connect = server.connect(if mode == Mode::OneStream { 1 } else { 4 })?;
            let dump = DumpOptions {
                pid: child.id() as i32,
                dest: Destination::Remote(connect),
                leave_stopped: false,
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
            };
            let result = migrate(dump, &mut |_| {}).await;
            let _ = child.kill();
            let _ = child.wait();
            let report = result.map_err(|source| BenchError::Migrate {
                mode: mode.name(),
                run,
                source,
            })?;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(report.restored_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = store.remove(report.dump.session);
            let _ =
                writeln!(
                out,
                "{:<14} run {run}/{}: downtime {:8.1} ms, {} rounds, {:.1} MiB raw, {:.1} MiB wire",
                mode.name(),
                total_runs,
                ms(report.downtime),
                report.dump.rounds.len(),
                report.dump.rounds.iter().map(|r| r.stats.raw_bytes).sum::<u64>() as f64
                    / (1 << 20) as f64,
                report.dump.rounds.iter().map(|r| r.stats.wire_bytes).sum::<u64>() as f64
                    / (1 << 20) as f64,
            );
            runs.push(Run {
                rounds: report.dump.rounds.clone(),
                downtime: report.downtime,
                parts: report.dump.parts,
                total: report.dump.total,
            });
        }
        results.push(ModeResult { mode, runs });
    }
    server.stop().await;
    let _ = write!(out, "{}", table(&results));
    Ok(results)
}

/// The summary tables: per mode, then the rounds of the iterative median
/// run.
pub fn table(results: &[ModeResult]) -> String {
    let mut t = String::new();
    let base = results
        .iter()
        .find(|r| r.mode == Mode::StopAndCopy)
        .map(|r| r.figure(|x| ms(x.downtime)).median);
    let _ = writeln!(
        t,
        "\n{:<14} {:>22} {:>8} {:>7} {:>7} {:>7} {:>9} {:>7} {:>9} {:>9}",
        "mode",
        "downtime ms med (min-max)",
        "vs s&c",
        "freeze",
        "final",
        "state",
        "restore",
        "rounds",
        "raw MiB",
        "wire MiB"
    );
    for r in results {
        let d = r.figure(|x| ms(x.downtime));
        let ratio = base.map_or("-".to_string(), |b| format!("{:.3}", d.median / b));
        let mib = |wire| r.figure(|x| x.bytes(wire) as f64 / (1 << 20) as f64).median;
        let _ = writeln!(
            t,
            "{:<14} {:>8.1} ({:>5.0}-{:<5.0}) {:>8} {:>7.2} {:>7.1} {:>7.1} {:>9.1} {:>7.0} {:>9.1} {:>9.1}",
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
        );
    }
    if let Some(run) = results
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
    t
}

pub fn json(results: &[ModeResult]) -> serde_json::Value {
    let s = |v: Spread| serde_json::json!({"median": v.median, "min": v.min, "max": v.max});
    serde_json::Value::Array(
        results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "mode": r.mode.name(),
                    "downtime_ms": s(r.figure(|x| ms(x.downtime))),
                    "parts_ms": {
                        "freeze": s(r.figure(|x| ms(x.parts.freeze))),
                        "final_round": s(r.figure(|x| ms(x.parts.final_round))),
                        "state": s(r.figure(|x| ms(x.parts.state))),
                        "restore": s(r.figure(|x| ms(x.parts.commit))),
                    },
                    "total_s": s(r.figure(|x| x.total.as_secs_f64())),
                    "runs": r.runs.iter().map(|run| serde_json::json!({
                        "downtime_ms": ms(run.downtime),
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
    let (w, h) = (960.0, 360.0);
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
        let y = 45.0 + i as f64 * 55.0;
        let mut x = 580.0;
        let _ = writeln!(
            s,
            "<text x=\"470\" y=\"{:.1}\">{}</text>",
            y + 18.0,
            r.mode.name()
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

    #[test]
    fn empty_results_render() {
        assert!(table(&[]).contains("mode"));
        assert!(svg(&[]).starts_with("<svg"));
        assert_eq!(json(&[]), serde_json::json!([]));
    }
}
