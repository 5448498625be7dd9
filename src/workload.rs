//! A small workload to migrate: `ferry workload` holds a memory pattern,
//! keeps a counter, rewrites random pages at a set rate and appends the
//! counter to a log file, all in one thread. `ferry demo` migrates it; it
//! is also a handy target for trying `ferry dump` and `ferry migrate` by
//! hand. It detaches from its terminal (stdio on /dev/null, other
//! descriptors closed) so that it holds nothing a restore cannot recreate.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
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

/// Runs forever: `mib` MiB of text-like pages, `dirty_pages_per_sec` of
/// them rewritten each second, the counter logged every 100 ms.
pub fn run(mib: usize, dirty_pages_per_sec: f64, log: &Path) -> Result<(), WorkloadError> {
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
        let c = match i % 10 {
            0..=2 => Content::Zero,
            3..=8 => Content::Text,
            _ => Content::Random,
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
