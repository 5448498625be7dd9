//! A workload to migrate: `ferry workload` holds memory of a chosen content,
//! rewrites pages at a set rate in a chosen pattern, counts the work it gets
//! done and logs the count, and can check its whole memory on request.
//! `ferry demo` and `ferry bench` migrate it; it is also a handy target for
//! trying `ferry dump` and `ferry migrate` by hand. It detaches from its
//! terminal (stdio on /dev/null, other descriptors closed) so that it holds
//! nothing a restore cannot recreate.
//!
//! **Memory.** Page `i` is of a kind fixed by `i` (zero, text-like or
//! random; `--content mixed` is 3 : 6 : 1 in that order) and has a version
//! `v`, 0 at start. A text or random page holds `i` and `v` in its first 16
//! bytes and, after them, bytes that depend only on `(seed, i, v)`; a zero
//! page is all zero whatever its version. A rewrite bumps the version and
//! regenerates the whole page, so any page can be checked on its own.
//!
//! **Rewrites.** `--dirty-rate` pages a second, evenly in time, chosen by
//! `--pattern`: `uniform` (any page), `hot` (nine in ten from the first
//! tenth of the memory), `sequential` (one after the other, wrapping).
//!
//! **Work and log.** The loop counts iterations: light ones (a 1 ms sleep
//! each, for demos and tests on small machines) or, with `--busy`, a fixed
//! amount of computation each, so the count measures how much CPU and
//! memory time the workload got (benchmarks read their slowdown from it).
//! Every 100 ms it appends `COUNT UNIX_MS` to the log.
//!
//! **Checks.** When a file `<log>.verify` appears, the workload checks every
//! page against its rule, removes the file and logs `verified N pages` or
//! `corrupt page I: WHY`. [`verify`] does that from outside, which is how
//! the demo and the benchmark confirm a migrated workload is intact.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::synthetic::{fill, Content, Rng};

const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown {what} {got:?}: use {choices}")]
    Choice {
        what: &'static str,
        got: String,
        choices: &'static str,
    },
    #[error("the workload's memory check failed: {0}")]
    Corrupt(String),
    #[error("the workload did not answer the memory check within {0:?} (is it running?)")]
    NoAnswer(Duration),
}

/// Which pages the rewrites hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Uniform,
    Hot,
    Sequential,
}

/// What the memory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Mixed,
    Zero,
    Text,
    Random,
}

impl Pattern {
    pub const NAMES: &'static str = "uniform, hot or sequential";

    pub fn name(self) -> &'static str {
        match self {
            Pattern::Uniform => "uniform",
            Pattern::Hot => "hot",
            Pattern::Sequential => "sequential",
        }
    }

    pub fn parse(s: &str) -> Result<Self, WorkloadError> {
        [Pattern::Uniform, Pattern::Hot, Pattern::Sequential]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| WorkloadError::Choice {
                what: "pattern",
                got: s.into(),
                choices: Self::NAMES,
            })
    }
}

impl Fill {
    pub const NAMES: &'static str = "mixed, zero, text or random";

    pub fn name(self) -> &'static str {
        match self {
            Fill::Mixed => "mixed",
            Fill::Zero => "zero",
            Fill::Text => "text",
            Fill::Random => "random",
        }
    }

    pub fn parse(s: &str) -> Result<Self, WorkloadError> {
        [Fill::Mixed, Fill::Zero, Fill::Text, Fill::Random]
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| WorkloadError::Choice {
                what: "content",
                got: s.into(),
                choices: Self::NAMES,
            })
    }

    /// The kind of page `i`.
    pub fn kind(self, i: u64) -> Content {
        match self {
            Fill::Zero => Content::Zero,
            Fill::Text => Content::Text,
            Fill::Random => Content::Random,
            Fill::Mixed => match i % 10 {
                0..=2 => Content::Zero,
                3..=8 => Content::Text,
                _ => Content::Random,
            },
        }
    }
}

/// What `ferry workload` runs.
#[derive(Debug, Clone)]
pub struct Spec {
    pub mib: u64,
    /// Pages rewritten per second.
    pub dirty_rate: f64,
    pub pattern: Pattern,
    pub content: Fill,
    /// Count fixed units of computation instead of sleeping between
    /// iterations.
    pub busy: bool,
    pub seed: u64,
}

impl Spec {
    /// A light mixed workload with uniform rewrites.
    pub fn new(mib: u64, dirty_rate: f64) -> Spec {
        Spec {
            mib,
            dirty_rate,
            pattern: Pattern::Uniform,
            content: Fill::Mixed,
            busy: false,
            seed: 1,
        }
    }

    /// The `ferry workload` arguments for this spec.
    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "workload".to_string(),
            "--mib".into(),
            self.mib.to_string(),
            "--dirty-rate".into(),
            self.dirty_rate.to_string(),
            "--pattern".into(),
            self.pattern.name().into(),
            "--content".into(),
            self.content.name().into(),
            "--seed".into(),
            self.seed.to_string(),
        ];
        if self.busy {
            a.push("--busy".into());
        }
        a
    }
}

/// Page `i` at version `v`, per the rule in the module docs.
pub fn page_content(page: &mut [u8], content: Fill, seed: u64, i: u64, v: u64) {
    let kind = content.kind(i);
    let mix = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ v.wrapping_mul(0xd6e8_feb8_6659_fd93);
    fill(page, kind, mix);
    if kind != Content::Zero && page.len() >= 16 {
        page[..8].copy_from_slice(&i.to_le_bytes());
        page[8..16].copy_from_slice(&v.to_le_bytes());
    }
}

/// Checks page `i` against the rule; `buf` is scratch of a page's size.
pub fn check_page(
    page: &[u8],
    content: Fill,
    seed: u64,
    i: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let v = match content.kind(i) {
        Content::Zero => 0,
        _ => {
            let word = |r: std::ops::Range<usize>| {
                u64::from_le_bytes(page[r].try_into().unwrap_or([0; 8]))
            };
            if word(0..8) != i {
                return Err(format!("holds the header of page {}", word(0..8)));
            }
            word(8..16)
        }
    };
    page_content(buf, content, seed, i, v);
    if page != buf {
        let at = page.iter().zip(buf.iter()).position(|(a, b)| a != b);
        return Err(format!("version {v} differs at byte {}", at.unwrap_or(0)));
    }
    Ok(())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn trigger(log: &Path) -> PathBuf {
    let mut t = log.as_os_str().to_owned();
    t.push(".verify");
    PathBuf::from(t)
}

/// One unit of work of a busy workload: a fixed amount of arithmetic on a
/// stack buffer (about 20 µs here), so the count measures CPU time got.
fn work_unit(seed: u64) -> u64 {
    let mut buf = [0u64; 512];
    let mut x = seed | 1;
    for _ in 0..16 {
        for w in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = w.wrapping_add(x);
        }
    }
    std::hint::black_box(&buf);
    buf.iter().fold(0, |a, &w| a ^ w)
}

/// Runs forever (see the module docs).
pub fn run(spec: &Spec, log_path: &Path) -> Result<(), WorkloadError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| WorkloadError::Io { what, source }
    };
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(io(&format!("opening {}", log_path.display())))?;
    crate::sys::detach_stdio(&log).map_err(io("detaching from the terminal"))?;
    let mut memory = vec![0u8; (spec.mib as usize) << 20];
    let pages = (memory.len() / PAGE) as u64;
    for (i, page) in memory.chunks_mut(PAGE).enumerate() {
        page_content(page, spec.content, spec.seed, i as u64, 0);
    }
    let check = trigger(log_path);
    let mut rng = Rng::new(spec.seed ^ 0x5eed);
    let mut scratch = vec![0u8; PAGE];
    let (mut count, mut written, mut next_seq) = (0u64, 0u64, 0u64);
    let (mut last_log, t0) = (Instant::now(), Instant::now());
    loop {
        count += 1;
        let due = (t0.elapsed().as_secs_f64() * spec.dirty_rate) as u64;
        while written < due && pages > 0 {
            let p = match spec.pattern {
                Pattern::Uniform => rng.below(pages),
                Pattern::Hot if rng.below(10) != 0 => rng.below((pages / 10).max(1)),
                Pattern::Hot => rng.below(pages),
                Pattern::Sequential => {
                    next_seq = (next_seq + 1) % pages;
                    next_seq
                }
            };
            let page = &mut memory[p as usize * PAGE..(p as usize + 1) * PAGE];
            let v = u64::from_le_bytes(page[8..16].try_into().unwrap_or([0; 8]));
            let v = if spec.content.kind(p) == Content::Zero {
                0
            } else {
                v + 1
            };
            page_content(page, spec.content, spec.seed, p, v);
            written += 1;
        }
        if last_log.elapsed() >= Duration::from_millis(100) {
            last_log = Instant::now();
            if check.exists() {
                let verdict = memory
                    .chunks(PAGE)
                    .enumerate()
                    .find_map(|(i, page)| {
                        check_page(page, spec.content, spec.seed, i as u64, &mut scratch)
                            .err()
                            .map(|e| format!("corrupt page {i}: {e}"))
                    })
                    .unwrap_or_else(|| format!("verified {pages} pages"));
                let _ = std::fs::remove_file(&check);
                let _ = writeln!(log, "{verdict}");
            }
            // A full disk must not stop the workload.
            let _ = writeln!(log, "{count} {}", unix_ms());
        }
        if spec.busy {
            std::hint::black_box(work_unit(count));
        } else {
            std::hint::black_box(&memory);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Starts `ferry workload` (this very binary) as a child and waits until it
/// logs, by which time it has filled its memory and left the terminal.
/// Returns the child and the count it logged first.
pub fn spawn(spec: &Spec, log: &Path) -> Result<(Child, u64), WorkloadError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| WorkloadError::Io { what, source }
    };
    let exe = std::env::current_exe().map_err(io("finding the ferry binary"))?;
    let mut child = Command::new(exe)
        .args(spec.args())
        .arg("--log-file")
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("starting the workload"))?;
    // Filling 2 GiB of fresh memory takes seconds on a small machine.
    for _ in 0..1200 {
        if let Some(n) = last_count(log) {
            return Ok((child, n));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(WorkloadError::Io {
                what: format!("the workload exited ({status}) before logging"),
                source: std::io::Error::other("exited"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(WorkloadError::Io {
        what: "the workload wrote nothing to its log in 60 s".into(),
        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
    })
}

/// The `(count, unix ms)` samples of a workload's log.
pub fn samples(log: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// The last count in a workload's log.
pub fn last_count(log: &Path) -> Option<u64> {
    samples(log).last().map(|s| s.0)
}

/// Counts per second between the first sample at or after `from_ms` and
/// the last one at or before `to_ms` (unix ms); `None` if fewer than two
/// samples fall in the window.
pub fn rate(samples: &[(u64, u64)], from_ms: u64, to_ms: u64) -> Option<f64> {
    let inside: Vec<&(u64, u64)> = samples
        .iter()
        .filter(|s| s.1 >= from_ms && s.1 <= to_ms)
        .collect();
    let (a, b) = (inside.first()?, inside.last()?);
    (b.1 > a.1).then(|| b.0.saturating_sub(a.0) as f64 * 1000.0 / (b.1 - a.1) as f64)
}

/// Asks the workload logging to `log` to check its whole memory and waits
/// for the answer: the number of pages checked, or what was wrong.
pub fn verify(log: &Path, timeout: Duration) -> Result<u64, WorkloadError> {
    let before = std::fs::read_to_string(log).map_or(0, |s| s.len());
    let t = trigger(log);
    std::fs::write(&t, b"").map_err(|source| WorkloadError::Io {
        what: format!("writing {}", t.display()),
        source,
    })?;
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.get(before..).unwrap_or("").lines() {
            if let Some(n) = line.strip_prefix("verified ") {
                return n
                    .trim_end_matches(" pages")
                    .parse()
                    .map_err(|_| WorkloadError::Corrupt(format!("unreadable answer {line:?}")));
            }
            if line.starts_with("corrupt ") {
                return Err(WorkloadError::Corrupt(line.to_string()));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&t);
    Err(WorkloadError::NoAnswer(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_check_against_their_rule() {
        let mut buf = vec![0u8; PAGE];
        let mut page = vec![0u8; PAGE];
        for content in [Fill::Mixed, Fill::Zero, Fill::Text, Fill::Random] {
            for i in 0..20 {
                for v in [0, 1, 7] {
                    page_content(&mut page, content, 3, i, v);
                    check_page(&page, content, 3, i, &mut buf).unwrap();
                    if content.kind(i) != Content::Zero {
                        page[100] ^= 1;
                        assert!(check_page(&page, content, 3, i, &mut buf).is_err());
                        page_content(&mut page, content, 3, i + 1, v);
                        assert!(check_page(&page, content, 3, i, &mut buf).is_err());
                    }
                }
            }
        }
        // A zero page with anything in it is corrupt.
        let mut z = vec![0u8; PAGE];
        z[4000] = 1;
        assert!(check_page(&z, Fill::Zero, 3, 0, &mut buf).is_err());
    }

    #[test]
    fn choices_parse_and_refuse_by_name() {
        assert_eq!(Pattern::parse("hot").unwrap(), Pattern::Hot);
        assert_eq!(Fill::parse("text").unwrap(), Fill::Text);
        let e = Pattern::parse("zigzag").unwrap_err().to_string();
        assert!(e.contains("zigzag") && e.contains("uniform"), "{e}");
        assert!(Fill::parse("").is_err());
    }

    #[test]
    fn rates_come_from_the_samples_in_the_window() {
        let s = [(0, 1000), (100, 1100), (300, 1300), (400, 1400)];
        assert_eq!(rate(&s, 1000, 1400), Some(1000.0));
        assert_eq!(rate(&s, 1050, 1300), Some(1000.0));
        assert_eq!(rate(&s, 1301, 1399), None);
        assert_eq!(rate(&s, 2000, 3000), None);
    }
}
