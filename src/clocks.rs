//! Clocks across a migration: what a process sees of `CLOCK_MONOTONIC` and
//! `CLOCK_BOOTTIME`, and the time namespace that keeps both going on after
//! the restore.
//!
//! Both clocks count from the host's boot, so a process moved to a host
//! that booted at another time would see them jump (by days, either way):
//! deadlines computed before the move fire at once or never. The source
//! records the two clocks as the frozen process sees them (its own time
//! namespace's offsets included, `/proc/PID/timens_offsets`); the restore
//! makes a time namespace whose offsets are those values less the
//! restoring host's clocks, and the process enters it before it runs
//! again, so its clocks go on from where they stopped. The downtime itself
//! does not show in them, as with CRIU: the process cannot tell the freeze
//! happened (`CLOCK_REALTIME` has no namespace and shows it).

use std::os::fd::OwnedFd;

use nix::time::{clock_gettime, ClockId};

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no monotonic and boottime offsets in {text:?}")]
    Parse { path: String, text: String },
    #[error("clock_gettime: {0}")]
    Clock(nix::errno::Errno),
    #[error("a time namespace for the restored process: {0}")]
    Namespace(#[from] crate::sys::timens::TimeNsError),
}

/// The two clocks a time namespace moves, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Clocks {
    pub monotonic: i64,
    pub boottime: i64,
}

impl Clocks {
    /// This side's clocks now, as ferry itself sees them.
    pub fn now() -> Result<Clocks, ClockError> {
        let ns = |id| {
            clock_gettime(id)
                .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
                .map_err(ClockError::Clock)
        };
        Ok(Clocks {
            monotonic: ns(ClockId::CLOCK_MONOTONIC)?,
            boottime: ns(ClockId::CLOCK_BOOTTIME)?,
        })
    }

    fn minus(self, o: Clocks) -> Clocks {
        Clocks {
            monotonic: self.monotonic - o.monotonic,
            boottime: self.boottime - o.boottime,
        }
    }

    fn plus(self, o: Clocks) -> Clocks {
        Clocks {
            monotonic: self.monotonic + o.monotonic,
            boottime: self.boottime + o.boottime,
        }
    }
}

/// The clocks as process `pid` sees them now: ferry's, moved by the
/// difference between its time namespace's offsets and ferry's own.
pub fn seen_by(pid: i32) -> Result<Clocks, ClockError> {
    let theirs = offsets_of(&format!("/proc/{pid}/timens_offsets"))?;
    let ours = offsets_of("/proc/self/timens_offsets")?;
    Ok(Clocks::now()?.plus(theirs.minus(ours)))
}

fn offsets_of(path: &str) -> Result<Clocks, ClockError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClockError::Read {
        path: path.into(),
        source,
    })?;
    parse_offsets(&text).ok_or_else(|| ClockError::Parse {
        path: path.into(),
        text,
    })
}

/// Parses `/proc/PID/timens_offsets`: a line per clock, its name (or
/// number) and the offset in seconds and nanoseconds.
pub fn parse_offsets(text: &str) -> Option<Clocks> {
    let (mut mono, mut boot) = (None, None);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(clock), Some(s), Some(n)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let v = s.parse::<i64>().ok()? * 1_000_000_000 + n.parse::<i64>().ok()?;
        match clock {
            "monotonic" | "1" => mono = Some(v),
            "boottime" | "7" => boot = Some(v),
            _ => {}
        }
    }
    Some(Clocks {
        monotonic: mono?,
        boottime: boot?,
    })
}

/// What to write to `timens_offsets` so that a process seeing `now` (this
/// host's clocks) sees `want` instead: one line per clock, seconds and
/// nanoseconds, the nanoseconds in `0..1e9` as the kernel demands (−1.5 s
/// is `-2 500000000`).
pub fn offsets_text(want: Clocks, now: Clocks) -> String {
    let o = want.minus(now);
    let line = |name: &str, ns: i64| {
        format!(
            "{name} {} {}\n",
            ns.div_euclid(1_000_000_000),
            ns.rem_euclid(1_000_000_000)
        )
    };
    line("monotonic", o.monotonic) + &line("boottime", o.boottime)
}

/// A new time namespace in which the clocks read `want` now and go on
/// from there: its descriptor, to `setns` the restored process into.
pub fn namespace(want: Clocks) -> Result<OwnedFd, ClockError> {
    // A namespace's offsets count from the host's clocks, not from those
    // of the namespace ferry runs in (a page server in a container).
    let ours = offsets_of("/proc/self/timens_offsets")?;
    // Read last: the offsets are fixed as written, and the clocks run on
    // (by the microseconds of a fork) until the process enters, which can
    // only move them forward.
    let text = offsets_text(want, Clocks::now()?.minus(ours));
    crate::sys::timens::time_namespace(text.as_bytes()).map_err(ClockError::Namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_by_name_or_number() {
        let c = parse_offsets("monotonic           0         0\nboottime            0         0\n");
        assert_eq!(c, Some(Clocks::default()));
        let c = parse_offsets("monotonic 8640000 5\nboottime -3 999999999\n").unwrap();
        assert_eq!(c.monotonic, 8_640_000_000_000_005);
        assert_eq!(c.boottime, -2_000_000_001);
        let c = parse_offsets("1 2 0\n7 -1 0\n").unwrap();
        assert_eq!((c.monotonic, c.boottime), (2_000_000_000, -1_000_000_000));
        assert_eq!(parse_offsets("monotonic 1 0\n"), None);
        assert_eq!(parse_offsets("monotonic x 0\nboottime 1 0\n"), None);
        assert_eq!(parse_offsets(""), None);
    }

    #[test]
    fn offsets_are_written_with_nanoseconds_in_range() {
        let now = Clocks {
            monotonic: 10_000_000_000,
            boottime: 20_000_000_000,
        };
        let ahead = Clocks {
            monotonic: 8_640_010_250_000_000,
            boottime: 20_000_000_000,
        };
        assert_eq!(
            offsets_text(ahead, now),
            "monotonic 8640000 250000000\nboottime 0 0\n"
        );
        let behind = Clocks {
            monotonic: 8_500_000_000,
            boottime: 19_999_999_999,
        };
        assert_eq!(
            offsets_text(behind, now),
            "monotonic -2 500000000\nboottime -1 999999999\n"
        );
        // What is written reads back as the same offset.
        let o = parse_offsets(&offsets_text(behind, now)).unwrap();
        assert_eq!(o, behind.minus(now));
    }
}
