//! Transfer-round figures on a real process (needs root): the stream rate of
//! a 1 GiB dump over loopback QUIC (random and text-like memory, zstd on
//! and off), the cost of a clean and a 10 %-dirty uffd-wp scan of 1 GiB,
//! and what write tracking costs the target per write. Medians of several
//! runs, each configuration measured in this one process.
//!
//! `cargo bench --bench transfer`

use std::sync::Arc;
use std::time::Instant;

use ferry::client::Connect;
use ferry::dump::{dump, Destination, DumpOptions};
use ferry::policy::Policy;
use ferry::procfs;
use ferry::sys::ptrace::Tracee;
use ferry::track::{self, Backend};
use ferry_page_server::store::{mem::MemStore, Store};
use ferry_page_server::tls::{client_config, server_config, TlsFiles};
use ferry_page_server::{Config, PageServer};
use ferry_proto::batch::Compress;

#[path = "../tests/common/mod.rs"]
mod common;
use common::Fixture;

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn stream_rate(content: &str, compress: Compress, tls: &std::path::Path) -> (f64, f64, f64) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let cfg = Config::new(
        server_config(&TlsFiles::server(tls)).unwrap(),
        store.clone(),
    );
    let server = PageServer::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let (mut raw, mut wire, mut ratio) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let fx = Fixture::start(&["--mib", "1024", "--content", content]);
        let mut c = Connect::new(addr, client_config(&TlsFiles::client(tls)).unwrap());
        c.streams = 4;
        let report = dump(
            DumpOptions {
                track: Some(Backend::UffdWp),
                policy: Policy {
                    max_rounds: 0,
                    ..Policy::default()
                },
                compress,
                ..DumpOptions::new(fx.pid, Destination::Remote(c))
            },
            &mut |_| {},
        )
        .await
        .unwrap();
        let r = &report.rounds[0];
        let secs = r.total.as_secs_f64();
        raw.push(r.stats.raw_bytes as f64 / secs / 1e9);
        wire.push(r.stats.wire_bytes as f64 / secs / 1e9);
        ratio.push(r.stats.raw_bytes as f64 / r.stats.wire_bytes.max(1) as f64);
        for s in store.list().unwrap() {
            let _ = store.remove(s.id);
        }
    }
    let _ = stop.send(());
    let _ = served.await;
    (median(raw), median(wire), median(ratio))
}

fn scans() -> (f64, f64, f64, f64) {
    let mut fx = Fixture::start(&["--mib", "1024"]);
    fx.cmd("pause");
    fx.cmd("freeze-counter");
    let untracked: f64 = fx.cmd("touch-bench 100000").parse().unwrap();
    let tracee = Tracee::seize(fx.pid).unwrap();
    let mut t = track::choose(&tracee, Some(Backend::UffdWp)).unwrap();
    let maps = procfs::read_maps(fx.pid).unwrap();
    let t0 = Instant::now();
    t.collect(&maps).unwrap();
    let arm = t0.elapsed().as_secs_f64() * 1e3;
    let mut clean = vec![];
    for _ in 0..5 {
        let t0 = Instant::now();
        t.collect(&maps).unwrap();
        clean.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    // Every page write-protected now: the same writes again.
    let tracked: f64 = fx.cmd("touch-bench 100000").parse().unwrap();
    let mut dirty10 = vec![];
    for _ in 0..3 {
        t.collect(&maps).unwrap();
        fx.cmd("touch-bench 26214");
        let t0 = Instant::now();
        t.collect(&maps).unwrap();
        dirty10.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    drop(t);
    tracee.detach(false).unwrap();
    (arm, median(clean), median(dirty10), tracked / untracked)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !uid {
        eprintln!("transfer bench skipped: needs root (ptrace)");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tls = tempfile::tempdir().unwrap();
    ferry::certs::init(tls.path(), &[], false).unwrap();
    println!(
        "1 GiB stop-and-copy dump over loopback QUIC (4 streams, mutual TLS), median of {RUNS}:"
    );
    println!(
        "{:<8} {:<6} {:>10} {:>10} {:>8}",
        "content", "zstd", "raw GB/s", "wire GB/s", "ratio"
    );
    for content in ["random", "text"] {
        for (name, c) in [("on", Compress::default()), ("off", Compress::Off)] {
            let (raw, wire, ratio) = rt.block_on(stream_rate(content, c, tls.path()));
            println!("{content:<8} {name:<6} {raw:>10.2} {wire:>10.2} {ratio:>8.2}");
        }
    }
    let (arm, clean, dirty, slow) = scans();
    println!("uffd-wp on 1 GiB: round 0 (register + present scan) {arm:.1} ms; clean rescan {clean:.2} ms; 10 % dirty rescan {dirty:.2} ms");
    println!(
        "first write to a tracked page vs untracked, 100000 random pages: {slow:.1}x the time"
    );
}
