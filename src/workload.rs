//! A small workload to migrate: `ferry workload` holds a memory pattern,
//! keeps a counter, rewrites random pages at a set rate and appends the
//! counter to a log file, all in one thread. `ferry demo` migrates it; it
//! is also a handy target for trying `ferry dump` and `ferry migrate` by
//! hand. It detaches from its terminal (stdio on /dev/null, other
//! descriptors closed) so that it holds nothing a restore cannot recreate.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::synthetic::{fill, Content, Rng};

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the workload's memory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// 30 % zero, 60 % text-like, 10 % random pages, as a typical heap.
    Mixed,
    /// Incompressible pages only: every byte crosses the wire, so the
    /// transport's rate shows undiluted.
    Random,
}

impl Fill {
    pub fn name(self) -> &'static str {
        match self {
            Fill::Mixed => "mixed",
            Fill::Random => "random",
        }
    }

    pub fn parse(s: &str) -> Option<Fill> {
        [Fill::Mixed, Fill::Random]
            .into_iter()
            .find(|f| f.name() == s)
    }
}

/// Runs forever: `mib` MiB of pages as `fill` says, `dirty_pages_per_sec`
/// of them rewritten each second, the counter logged every 100 ms.
pub fn run(
    mib: usize,
    dirty_pages_per_sec: f64,
    fill_with: Fill,
    log: &Path,
) -> Result<(), WorkloadError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| WorkloadError::Io { what, source }
    };
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(&format!("opening {}", log.display())))?;
    crate::sys::detach_stdio(&log).map_err(io("detaching from the terminal"))?;
    let ps = 4096;
    let mut memory = vec![0u8; mib << 20];
    let mut rng = Rng::new(1);
    for (i, page) in memory.chunks_mut(ps).enumerate() {
        let c = match (fill_with, i % 10) {
            (Fill::Random, _) => Content::Random,
            (Fill::Mixed, 0..=2) => Content::Zero,
            (Fill::Mixed, 3..=8) => Content::Text,
            (Fill::Mixed, _) => Content::Random,
        };
        fill(page, c, i as u64);
    }
    let pages = memory.len() / ps;
    let mut counter: u64 = 0;
    let (mut last_log, t0) = (Instant::now(), Instant::now());
    let mut written: u64 = 0;
    loop {
        counter += 1;
        let due = (t0.elapsed().as_secs_f64() * dirty_pages_per_sec) as u64;
        while written < due && pages > 0 {
            let p = rng.below(pages as u64) as usize;
            let off = p * ps + (rng.below(ps as u64 / 8) as usize) * 8;
            memory[off..off + 8].copy_from_slice(&counter.to_le_bytes());
            written += 1;
        }
        if last_log.elapsed() >= Duration::from_millis(100) {
            last_log = Instant::now();
            // A full disk must not stop the workload.
            let _ = writeln!(log, "{counter}");
        }
        std::hint::black_box(&memory);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Starts `ferry workload` (this very binary) as a child and waits until it
/// logs, by which time it has filled its memory and left the terminal.
/// Returns the child and the counter it logged first.
pub fn spawn(
    mib: u64,
    dirty_pages_per_sec: u64,
    fill_with: Fill,
    log: &Path,
) -> Result<(Child, u64), WorkloadError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| WorkloadError::Io { what, source }
    };
    let exe = std::env::current_exe().map_err(io("finding the ferry binary"))?;
    let mut child = Command::new(exe)
        .args(["workload", "--mib", &mib.to_string()])
        .args([
            "--dirty-rate",
            &dirty_pages_per_sec.to_string(),
            "--fill",
            fill_with.name(),
            "--log-file",
        ])
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

/// The last counter value in a workload's log.
pub fn last_count(log: &Path) -> Option<u64> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
}
