//! When to stop pre-dumping and freeze: the round policy, as a pure
//! function of the figures of the rounds done so far.
//!
//! The main rule is QEMU's: freeze once the final delta, sent at the
//! bandwidth measured so far, fits the downtime budget. Pre-copy does not
//! always converge (a process that writes faster than the link carries
//! never gets there), so P.Haul's backstops end it anyway: a delta that
//! grows from one round to the next, a delta too small to be worth another
//! round, or a maximum number of rounds. Keeping this a function of
//! [`RoundStats`] lets the tests walk every path without a process or a
//! network, and lets the caller show why it stopped ([`StopReason`]'s
//! `Display`).

use std::fmt;
use std::time::Duration;

/// What one round moved and how long that took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundStats {
    /// Pages sent (data and zero runs).
    pub pages: u64,
    /// Bytes of those pages before encoding.
    pub raw_bytes: u64,
    /// Bytes on the wire after encoding (compression, zero runs).
    pub wire_bytes: u64,
    /// Wall time of the round's transfer, in seconds.
    pub seconds: f64,
}

/// The knobs of the round policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Downtime budget for sending the final delta.
    pub max_downtime: Duration,
    /// Pre-dump rounds at most (round 0, the full copy, included); 0 means
    /// no pre-dump at all: freeze and copy everything (stop-and-copy).
    pub max_rounds: u32,
    /// A delta of at most this many pages is not worth another round.
    pub tiny_pages: u64,
    /// A delta more than this factor larger than the one before means the
    /// process writes faster than we send: more rounds will not help.
    pub max_growth: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(50),
            max_rounds: 8,
            tiny_pages: 64,
            max_growth: 1.10,
        }
    }
}

/// Why the policy chose to freeze.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StopReason {
    /// `max_rounds` is 0: no pre-dump at all.
    StopAndCopy,
    /// The predicted final delta fits the downtime budget.
    FitsDowntime { predicted: Duration },
    /// The last delta (pages) grew by more than `max_growth` over the one
    /// before.
    DeltaGrew { previous: u64, last: u64 },
    /// The maximum number of pre-dump rounds (the limit) was reached.
    MaxRounds(u32),
    /// The last delta (pages) was tiny.
    TinyDelta(u64),
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Do another pre-dump round.
    PreDump,
    /// Freeze the process and send the final delta.
    Freeze(StopReason),
}

/// Rounds that moved at least this much measure the bandwidth on their
/// own; smaller ones are dominated by latency and per-round costs.
const MIN_MEASURE_BYTES: u64 = 1 << 20;

impl Policy {
    /// Called before every round with the figures of the rounds done so
    /// far (empty before round 0).
    ///
    /// In order:
    /// 1. `max_rounds == 0`: freeze at once, [`StopReason::StopAndCopy`].
    /// 2. No round yet: pre-dump (round 0, the full copy).
    /// 3. The predicted downtime fits `max_downtime`. Checked from round 0
    ///    on: after round 0 the prediction is the whole memory, so a small
    ///    process freezes after a single round.
    /// 4. The last round sent at most `tiny_pages` pages.
    /// 5. The last delta grew by more than `max_growth` over the previous.
    ///    Round 0 is everything, not a delta, so it is never compared:
    ///    round k is compared with round k-1 for k ≥ 2 only.
    /// 6. `max_rounds` rounds are done.
    ///
    /// Otherwise another round. A NaN `max_growth` never triggers rule 5.
    pub fn decide(&self, rounds: &[RoundStats]) -> Decision {
        if self.max_rounds == 0 {
            return Decision::Freeze(StopReason::StopAndCopy);
        }
        let Some(last) = rounds.last() else {
            return Decision::PreDump;
        };
        if let Some(predicted) = self.predicted_downtime(rounds) {
            if predicted <= self.max_downtime {
                return Decision::Freeze(StopReason::FitsDowntime { predicted });
            }
        }
        if last.pages <= self.tiny_pages {
            return Decision::Freeze(StopReason::TinyDelta(last.pages));
        }
        if rounds.len() >= 3 {
            let previous = rounds[rounds.len() - 2].pages;
            if last.pages as f64 > previous as f64 * self.max_growth {
                return Decision::Freeze(StopReason::DeltaGrew {
                    previous,
                    last: last.pages,
                });
            }
        }
        if rounds.len() >= self.max_rounds as usize {
            return Decision::Freeze(StopReason::MaxRounds(self.max_rounds));
        }
        Decision::PreDump
    }

    /// How long sending the final delta would take: the predicted final
    /// delta divided by the measured bandwidth.
    ///
    /// The model: freezing right after a round, the final delta is what
    /// the process wrote while that round was sent; when pre-copy
    /// converges, that is no larger than the round itself, so the last
    /// round's wire bytes predict it. The bandwidth is that of the most
    /// recent round that moved at least 1 MiB on the wire (small rounds are
    /// dominated by latency and would understate it), or, if none did, the
    /// aggregate of all rounds.
    ///
    /// Its limits: it covers the page data only, not the freeze, the final
    /// scan, the process state, the commit or the restore; it assumes the
    /// next round compresses like the last and that the link (or the
    /// encoder, whichever bounds the pipeline) keeps its pace; a process
    /// that writes faster than we send makes it optimistic, which the
    /// growth backstop catches.
    ///
    /// `None` before any round, or when no bandwidth can be measured (no
    /// bytes, or no positive finite time). A delta of zero bytes predicts
    /// zero whatever the bandwidth. Never divides by zero; a prediction too
    /// large for a [`Duration`] saturates to [`Duration::MAX`].
    pub fn predicted_downtime(&self, rounds: &[RoundStats]) -> Option<Duration> {
        let last = rounds.last()?;
        if last.wire_bytes == 0 {
            return Some(Duration::ZERO);
        }
        let usable = |r: &&RoundStats| r.seconds.is_finite() && r.seconds > 0.0;
        let bandwidth = match rounds
            .iter()
            .rev()
            .filter(usable)
            .find(|r| r.wire_bytes >= MIN_MEASURE_BYTES)
        {
            Some(r) => r.wire_bytes as f64 / r.seconds,
            None => {
                let (bytes, secs) = rounds
                    .iter()
                    .filter(usable)
                    .fold((0u64, 0f64), |(b, s), r| {
                        (b.saturating_add(r.wire_bytes), s + r.seconds)
                    });
                if bytes == 0 || !(secs > 0.0 && secs.is_finite()) {
                    return None;
                }
                bytes as f64 / secs
            }
        };
        let secs = last.wire_bytes as f64 / bandwidth;
        Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
    }
}

/// A duration for people: "850 µs", "12 ms", "3.4 ms", "2.5 s".
fn human(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us < 10_000_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else {
        format!("{:.1} s", us / 1e6)
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StopReason::StopAndCopy => write!(f, "stop-and-copy: no pre-dump rounds"),
            StopReason::FitsDowntime { predicted } => {
                write!(f, "predicted downtime {} fits the budget", human(predicted))
            }
            StopReason::DeltaGrew { previous, last } => {
                let pct = if previous == 0 {
                    String::new()
                } else {
                    format!(" (+{:.0} %)", (last as f64 / previous as f64 - 1.0) * 100.0)
                };
                write!(
                    f,
                    "delta grew from {previous} to {last} pages{pct}: not converging"
                )
            }
            StopReason::MaxRounds(n) => write!(f, "reached the limit of {n} pre-dump rounds"),
            StopReason::TinyDelta(pages) => write!(f, "delta of {pages} pages is tiny"),
        }
    }
}

impl Policy {
    /// [`StopReason`]'s text with this policy's limits filled in, e.g.
    /// "predicted downtime 12 ms fits 50 ms".
    pub fn describe(&self, reason: &StopReason) -> String {
        match *reason {
            StopReason::FitsDowntime { predicted } => format!(
                "predicted downtime {} fits {}",
                human(predicted),
                human(self.max_downtime)
            ),
            StopReason::TinyDelta(pages) => {
                format!("delta of {pages} pages is tiny (≤ {})", self.tiny_pages)
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn round(pages: u64, wire_bytes: u64, seconds: f64) -> RoundStats {
        RoundStats {
            pages,
            raw_bytes: pages * 4096,
            wire_bytes,
            seconds,
        }
    }

    /// A round of `pages` pages sent raw at `mib_s` MiB/s.
    fn at(pages: u64, mib_s: f64) -> RoundStats {
        let bytes = pages * 4096;
        round(pages, bytes, bytes as f64 / (mib_s * MIB as f64))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn defaults() {
        let p = Policy::default();
        assert_eq!(p.max_downtime, ms(50));
        assert_eq!((p.max_rounds, p.tiny_pages), (8, 64));
        assert_eq!(p.max_growth, 1.10);
    }

    #[test]
    fn stop_and_copy_when_no_rounds_allowed() {
        let p = Policy {
            max_rounds: 0,
            ..Policy::default()
        };
        assert_eq!(p.decide(&[]), Decision::Freeze(StopReason::StopAndCopy));
        assert_eq!(
            p.decide(&[at(100_000, 100.0)]),
            Decision::Freeze(StopReason::StopAndCopy)
        );
    }

    #[test]
    fn round_zero_always_runs() {
        let p = Policy {
            max_rounds: 1,
            ..Policy::default()
        };
        assert_eq!(p.decide(&[]), Decision::PreDump);
        assert_eq!(Policy::default().decide(&[]), Decision::PreDump);
    }

    #[test]
    fn small_process_freezes_after_round_zero() {
        // 1 MiB at 100 MiB/s: the whole memory takes 10 ms, within 50 ms.
        let d = Policy::default().decide(&[at(256, 100.0)]);
        match d {
            Decision::Freeze(StopReason::FitsDowntime { predicted }) => {
                assert!(
                    (predicted.as_secs_f64() - 0.010).abs() < 1e-6,
                    "{predicted:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn converging_rounds_until_fit() {
        // 1 GiB at 100 MiB/s, then deltas shrinking by half each round.
        let p = Policy::default();
        let mut rounds = vec![at(262_144, 100.0)];
        let mut pages = 65_536;
        loop {
            match p.decide(&rounds) {
                Decision::PreDump => {
                    rounds.push(at(pages, 100.0));
                    pages /= 2;
                }
                Decision::Freeze(StopReason::FitsDowntime { predicted }) => {
                    assert!(predicted <= ms(50));
                    break;
                }
                other => panic!("{other:?} after {rounds:?}"),
            }
        }
        // 256 MiB, 128, 64, 32, 16, 8, 4: 4 MiB at 100 MiB/s is 40 ms.
        assert_eq!(rounds.len(), 8);
        assert_eq!(rounds.last().unwrap().pages, 1024);
    }

    #[test]
    fn tiny_delta_stops() {
        // A slow link: 64 pages = 256 KiB at 1 MiB/s is 250 ms, over budget.
        let p = Policy::default();
        let rounds = [at(10_000, 1.0), at(64, 1.0)];
        assert_eq!(
            p.decide(&rounds),
            Decision::Freeze(StopReason::TinyDelta(64))
        );
        let rounds = [at(10_000, 1.0), at(65, 1.0)];
        assert_eq!(p.decide(&rounds), Decision::PreDump);
    }

    #[test]
    fn growth_compares_deltas_not_round_zero() {
        let p = Policy::default();
        // Round 1 is a delta, round 0 the full copy: never compared, even
        // though round 1 is not smaller by much.
        let base = [at(10_000, 1.0), at(9_999, 1.0)];
        assert_eq!(p.decide(&base), Decision::PreDump);
        // Round 1 "grows" over round 0 (the full copy was small because
        // most pages were never touched): still not a growth stop.
        let grew_over_zero = [at(1_000, 1.0), at(5_000, 1.0)];
        assert_eq!(p.decide(&grew_over_zero), Decision::PreDump);

        // Round 2 grows by exactly 10 %: allowed; by more: stop.
        let r = [at(100_000, 1.0), at(1_000, 1.0), at(1_100, 1.0)];
        assert_eq!(p.decide(&r), Decision::PreDump);
        let r = [at(100_000, 1.0), at(1_000, 1.0), at(1_101, 1.0)];
        assert_eq!(
            p.decide(&r),
            Decision::Freeze(StopReason::DeltaGrew {
                previous: 1_000,
                last: 1_101
            })
        );
    }

    #[test]
    fn max_rounds_counts_pre_dump_rounds() {
        let p = Policy {
            max_rounds: 3,
            ..Policy::default()
        };
        // A steady, slow, non-converging delta.
        let mut rounds = vec![];
        while p.decide(&rounds) == Decision::PreDump {
            rounds.push(at(5_000, 1.0));
            assert!(rounds.len() <= 3);
        }
        assert_eq!(rounds.len(), 3);
        assert_eq!(
            p.decide(&rounds),
            Decision::Freeze(StopReason::MaxRounds(3))
        );
        // Past the limit (a caller that kept going): still frozen.
        rounds.push(at(5_000, 1.0));
        assert_eq!(
            p.decide(&rounds),
            Decision::Freeze(StopReason::MaxRounds(3))
        );
        let one = Policy {
            max_rounds: 1,
            ..Policy::default()
        };
        assert_eq!(
            one.decide(&[at(5_000, 1.0)]),
            Decision::Freeze(StopReason::MaxRounds(1))
        );
    }

    #[test]
    fn check_order() {
        // Fits and tiny: fits wins.
        let p = Policy::default();
        let r = [at(10, 100.0)];
        assert!(matches!(
            p.decide(&r),
            Decision::Freeze(StopReason::FitsDowntime { .. })
        ));
        // Tiny and grew and max rounds: tiny wins.
        let p = Policy {
            max_rounds: 3,
            max_downtime: Duration::ZERO,
            ..Policy::default()
        };
        let r = [at(1000, 1.0), at(10, 1.0), at(50, 1.0)];
        assert_eq!(p.decide(&r), Decision::Freeze(StopReason::TinyDelta(50)));
        // Grew and max rounds: grew wins.
        let r = [at(1000, 1.0), at(100, 1.0), at(500, 1.0)];
        assert!(matches!(
            p.decide(&r),
            Decision::Freeze(StopReason::DeltaGrew { .. })
        ));
    }

    #[test]
    fn bandwidth_from_the_last_big_round() {
        let p = Policy::default();
        // Round 0: 100 MiB in 1 s. Round 1: 2 MiB in 0.1 s (20 MiB/s).
        // Round 2: 512 KiB in 1 s (too small to measure).
        let r = [
            round(25_600, 100 * MIB, 1.0),
            round(512, 2 * MIB, 0.1),
            round(128, MIB / 2, 1.0),
        ];
        // 0.5 MiB at 20 MiB/s = 25 ms.
        let d = p.predicted_downtime(&r).unwrap();
        assert!((d.as_secs_f64() - 0.025).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn bandwidth_aggregate_when_all_rounds_are_small() {
        let p = Policy::default();
        // 0.5 MiB in 1 s and 0.25 MiB in 0.5 s: 0.5 MiB/s overall.
        let r = [round(128, MIB / 2, 1.0), round(64, MIB / 4, 0.5)];
        let d = p.predicted_downtime(&r).unwrap();
        assert!((d.as_secs_f64() - 0.5).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn prediction_edge_cases() {
        let p = Policy::default();
        assert_eq!(p.predicted_downtime(&[]), None);
        // Zero seconds: no bandwidth, no prediction (and no division).
        assert_eq!(p.predicted_downtime(&[round(10, 4096, 0.0)]), None);
        // Zero bytes to send: zero, however the time looks.
        assert_eq!(
            p.predicted_downtime(&[round(0, 0, 0.0)]),
            Some(Duration::ZERO)
        );
        assert_eq!(
            p.predicted_downtime(&[round(0, 0, f64::NAN)]),
            Some(Duration::ZERO)
        );
        // Time measured but no bytes: no bandwidth, no prediction.
        assert_eq!(
            p.predicted_downtime(&[round(0, 0, 1.0), round(1, 10, 0.0)]),
            None
        );
        // NaN, infinite and negative times are ignored.
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            assert_eq!(p.predicted_downtime(&[round(10, 2 * MIB, bad)]), None);
            let r = [round(10, 2 * MIB, 1.0), round(10, 2 * MIB, bad)];
            assert_eq!(p.predicted_downtime(&r), Some(Duration::from_secs(1)));
        }
        // Absurdly slow: saturates instead of panicking.
        let r = [round(1, 1, 1e300), round(1, 1000, 1.0)];
        assert_eq!(p.predicted_downtime(&r), Some(Duration::MAX));
        let r = [round(1, 1, 1e-300), round(1, u64::MAX, f64::MIN_POSITIVE)];
        assert!(p.predicted_downtime(&r).is_some());
        let r = [round(1, 2 * MIB, 1e300), round(1, 2 * MIB, 1e300)];
        assert_eq!(p.predicted_downtime(&r), Some(Duration::MAX));
    }

    #[test]
    fn decide_without_a_prediction_falls_back_to_backstops() {
        let p = Policy::default();
        // Zero time everywhere: no prediction; backstops still work.
        let r = [round(100_000, 400 * MIB, 0.0), round(1_000, 4 * MIB, 0.0)];
        assert_eq!(p.decide(&r), Decision::PreDump);
        let r = [round(100_000, 400 * MIB, 0.0), round(10, 40_960, 0.0)];
        assert_eq!(p.decide(&r), Decision::Freeze(StopReason::TinyDelta(10)));
    }

    #[test]
    fn nan_growth_never_stops() {
        let p = Policy {
            max_growth: f64::NAN,
            ..Policy::default()
        };
        let r = [at(100_000, 1.0), at(1_000, 1.0), at(100_000, 1.0)];
        assert_eq!(p.decide(&r), Decision::PreDump);
    }

    #[test]
    fn growth_from_an_empty_delta() {
        // With tiny_pages 0 and a budget of zero, an empty round 1 that is
        // followed by a real round 2 counts as growth, not a division by 0.
        let p = Policy {
            tiny_pages: 0,
            max_downtime: Duration::ZERO,
            ..Policy::default()
        };
        let r = [at(1000, 1.0), round(0, 0, 0.0), at(100, 1.0)];
        assert_eq!(
            p.decide(&r),
            Decision::Freeze(StopReason::DeltaGrew {
                previous: 0,
                last: 100
            })
        );
        let text = StopReason::DeltaGrew {
            previous: 0,
            last: 5,
        }
        .to_string();
        assert_eq!(text, "delta grew from 0 to 5 pages: not converging");
    }

    #[test]
    fn texts() {
        let p = Policy::default();
        let fits = StopReason::FitsDowntime {
            predicted: Duration::from_micros(12_300),
        };
        assert_eq!(fits.to_string(), "predicted downtime 12 ms fits the budget");
        assert_eq!(p.describe(&fits), "predicted downtime 12 ms fits 50 ms");
        let fast = StopReason::FitsDowntime {
            predicted: Duration::from_micros(3_460),
        };
        assert_eq!(p.describe(&fast), "predicted downtime 3.5 ms fits 50 ms");
        let instant = StopReason::FitsDowntime {
            predicted: Duration::from_micros(850),
        };
        assert_eq!(
            instant.to_string(),
            "predicted downtime 850 µs fits the budget"
        );
        assert_eq!(
            StopReason::DeltaGrew {
                previous: 1000,
                last: 1250
            }
            .to_string(),
            "delta grew from 1000 to 1250 pages (+25 %): not converging"
        );
        assert_eq!(
            StopReason::MaxRounds(8).to_string(),
            "reached the limit of 8 pre-dump rounds"
        );
        assert_eq!(
            StopReason::TinyDelta(12).to_string(),
            "delta of 12 pages is tiny"
        );
        assert_eq!(
            p.describe(&StopReason::TinyDelta(12)),
            "delta of 12 pages is tiny (≤ 64)"
        );
        assert_eq!(
            StopReason::StopAndCopy.to_string(),
            "stop-and-copy: no pre-dump rounds"
        );
        assert_eq!(human(Duration::from_secs(25)), "25.0 s");
    }
}
