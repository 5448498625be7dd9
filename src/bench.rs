//! `ferry bench`: real migrations of a `ferry workload` through a page
//! server on loopback (QUIC with mutual TLS, restore included), repeated
//! and compared in one invocation, so every figure is a ratio against a
//! baseline measured on the same machine at the same time.
//!
//! Modes change one thing each against `iterative` (the default
//! migration): `stop-and-copy` (no pre-dump round: the baseline for
//! downtime), `no-zstd`, `checksum` (tracking by hashing instead of
//! uffd-wp), `one-stream` (one QUIC data stream instead of four), `tcp`
//! (plain TCP with the same framing instead of QUIC with mutual TLS: the
//! baseline for what the secure transport costs). Each run reports its
//! rounds (pages, bytes raw and on the wire, time, rate, predicted
//! downtime) and its downtime broken into parts (freeze, final round,
//! state, restore); each mode the medians and min–max over the runs, and
//! the rate of round 0, the bulk copy, where the transport shows most.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use ferry_proto::batch::Compress;

use crate::dump::{Destination, DumpOptions, FrozenParts, RoundReport};
use crate::loopback::Loopback;
use crate::migrate::migrate;
use crate::policy::Policy;
use crate::track::Backend;
use crate::workload::Fill;

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
    #[error(
        "unknown mode {0:?}: use iterative, stop-and-copy, no-zstd, checksum, one-stream or tcp"
    )]
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
    /// Iterative over plain TCP (unencrypted, loopback only).
    Tcp,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Iterative,
        Mode::StopAndCopy,
        Mode::NoZstd,
        Mode::Checksum,
        Mode::OneStream,
        Mode::Tcp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Iterative => "iterative",
            Mode::StopAndCopy => "stop-and-copy",
            Mode::NoZstd => "no-zstd",
            Mode::Checksum => "checksum",
            Mode::OneStream => "one-stream",
            Mode::Tcp => "tcp",
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
    /// What the workload's memory holds.
    pub fill: Fill,
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
    // One page server per transport, started when a mode first needs it.
    let (mut quic, mut tcp) = (None, None);
    let mut results = Vec::new();
    let total_runs = opts.runs;
    for &mode in &opts.modes {
        let slot = if mode == Mode::Tcp {
            &mut tcp
        } else {
            &mut quic
        };
        let server: &Loopback = match slot {
            Some(s) => s,
            None => slot.insert(if mode == Mode::Tcp {
                Loopback::start_tcp()?
            } else {
                Loopback::start()?
            }),
        };
        let store = server.store.clone();
        let mut runs = Vec::new();
        for run in 1..=total_runs {
            let log = server.scratch().join(format!("{}-{run}.log", mode.name()));
            let (mut child, _) =
                crate::workload::spawn(opts.mib, opts.dirty_rate, opts.fill, &log)?;
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
    for s in [quic, tcp].into_iter().flatten() {
        s.stop().await;
    }
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
        "\n{:<14} {:>22} {:>8} {:>7} {:>7} {:>7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}",
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
        "r0 wire"
    );
    for r in results {
        let d = r.figure(|x| ms(x.downtime));
        let ratio = base.map_or("-".to_string(), |b| format!("{:.3}", d.median / b));
        let mib = |wire| r.figure(|x| x.bytes(wire) as f64 / (1 << 20) as f64).median;
        let _ = writeln!(
            t,
            "{:<14} {:>8.1} ({:>5.0}-{:<5.0}) {:>8} {:>7.2} {:>7.1} {:>7.1} {:>9.1} {:>7.0} {:>9.1} {:>9.1} {:>9.0} {:>9.0}",
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
        );
    }
    if let Some(ratio) = quic_vs_tcp(results) {
        let _ = writeln!(
            t,
            "\nQUIC with mutual TLS moves {ratio:.2} x the bytes per second of plain TCP \
             (round 0 on the wire, medians of iterative / tcp)"
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

/// Median round-0 wire rate of `iterative` (QUIC) over that of `tcp`, when
/// both ran.
pub fn quic_vs_tcp(results: &[ModeResult]) -> Option<f64> {
    let rate = |m| {
        results
            .iter()
            .find(|r| r.mode == m)
            .map(|r| r.figure(|x| x.round0_rate(true)).median)
    };
    Some(rate(Mode::Iterative)? / rate(Mode::Tcp)?)
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
                    "round0_mb_s": {
                        "raw": s(r.figure(|x| x.round0_rate(false))),
                        "wire": s(r.figure(|x| x.round0_rate(true))),
                    },
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

    fn run_at(mb_per_s: u64) -> Run {
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
        }
    }

    #[test]
    fn round0_rates_and_the_transport_ratio() {
        let r = run_at(800);
        assert!((r.round0_rate(false) - 800.0).abs() < 1e-6);
        assert!((r.round0_rate(true) - 400.0).abs() < 1e-6);
        let mode = |mode, rates: &[u64]| ModeResult {
            mode,
            runs: rates.iter().map(|&x| run_at(x)).collect(),
        };
        let quic = mode(Mode::Iterative, &[700, 600, 900]);
        let tcp = mode(Mode::Tcp, &[1000, 800, 1200]);
        assert_eq!(quic_vs_tcp(std::slice::from_ref(&quic)), None);
        let ratio = quic_vs_tcp(&[quic.clone(), tcp.clone()]).unwrap();
        assert!((ratio - 0.7).abs() < 1e-9, "{ratio}");
        let t = table(&[quic, tcp]);
        assert!(t.contains("r0 MB/s") && t.contains("0.70 x"), "{t}");
    }

    #[test]
    fn empty_results_render() {
        assert!(table(&[]).contains("mode"));
        assert!(svg(&[]).starts_with("<svg"));
        assert_eq!(json(&[]), serde_json::json!([]));
    }
}
