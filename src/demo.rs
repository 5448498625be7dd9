//! `ferry demo`: the transfer path end to end on loopback, with nothing to
//! set up. It writes fresh certificates to a temporary directory, starts a
//! page server with mutual TLS, streams a synthetic address space in rounds
//! (all pages, then only the pages rewritten since), commits, and checks
//! that the destination's flattened image equals the source's memory page
//! for page.
//!
//! It moves synthetic memory, not a process: live dumps of real processes
//! come with `ferry dump` and `ferry migrate`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ferry_page_server::store::{mem::MemStore, Page, Store, StoreError};
use ferry_page_server::tls::{client_config, server_config, TlsError, TlsFiles};
use ferry_page_server::{Config, PageServer};
use ferry_proto::batch::{is_zero, Compress};
use ferry_proto::session::SenderConfig;
use ferry_proto::{pb, SessionId};

use crate::certs::{self, CertsError};
use crate::client::{Client, ClientError, CommitOutcome, Connect, LayerStats};
use crate::synthetic::{Mix, Rng, Workload};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("temporary directory: {0}")]
    TempDir(#[source] std::io::Error),
    #[error(transparent)]
    Certs(#[from] CertsError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Server(#[from] ferry_page_server::server::ServerError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("writing output: {0}")]
    Output(#[source] std::io::Error),
    #[error("commit did not store the image: {0:?}")]
    Commit(CommitOutcome),
    #[error("destination image differs from the source at {addr:#x}: {what}")]
    Mismatch { addr: u64, what: &'static str },
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Size of the synthetic address space.
    pub mib: u64,
    /// Rounds after the first full one.
    pub rounds: u32,
    /// Share of pages rewritten between two rounds, in percent.
    pub dirty_percent: u32,
    pub streams: usize,
    pub compress: Compress,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            mib: 256,
            rounds: 3,
            dirty_percent: 5,
            streams: 4,
            compress: Compress::default(),
        }
    }
}

/// One round as the demo saw it.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub stats: LayerStats,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub struct DemoReport {
    pub rounds: Vec<RoundReport>,
    pub pages_checked: u64,
}

/// Runs the demo, printing a line per round to `out`.
pub async fn run(opts: &DemoOptions, out: &mut dyn Write) -> Result<DemoReport, DemoError> {
    let dir = tempfile::tempdir().map_err(DemoError::TempDir)?;
    let o = |e| DemoError::Output(e);
    certs::init(dir.path(), &[], false)?;
    writeln!(
        out,
        "certificates: {} (fresh CA, mutual TLS)",
        dir.path().display()
    )
    .map_err(o)?;

    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let server = PageServer::bind(
        "127.0.0.1:0".parse().expect("literal"),
        Config::new(server_config(&TlsFiles::server(dir.path()))?, store.clone()),
    )?;
    let addr: SocketAddr = server.local_addr().map_err(DemoError::TempDir)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    writeln!(out, "page server: {addr} (in memory)").map_err(o)?;

    let mut workload = Workload::new(opts.mib, Mix::TYPICAL, 1);
    let mut rng = Rng::new(7);
    let session = SessionId(
        rng.next_u64()
            .to_le_bytes()
            .repeat(2)
            .try_into()
            .expect("16"),
    );
    let mut connect = Connect::new(addr, client_config(&TlsFiles::client(dir.path()))?);
    connect.streams = opts.streams;
    connect.compress = opts.compress;
    let mut client = Client::connect(
        connect,
        SenderConfig {
            session,
            page_size: workload.page_size,
            arch: std::env::consts::ARCH.into(),
            kernel: String::new(),
            label: format!("ferry demo, {} MiB synthetic", opts.mib),
            resume: false,
            features: Vec::new(),
        },
    )
    .await?;

    writeln!(
        out,
        "{:>5} {:>9} {:>9} {:>10} {:>10} {:>9} {:>10}",
        "round", "pages", "zero", "raw MiB", "wire MiB", "time ms", "raw MB/s"
    )
    .map_err(o)?;
    let mut rounds = Vec::new();
    for round in 0..=opts.rounds {
        let addrs = if round == 0 {
            workload.all_pages()
        } else {
            workload.dirty(opts.dirty_percent, Mix::TYPICAL, &mut rng)
        };
        let t = Instant::now();
        let stats = client
            .send_layer(workload.vmas.clone(), workload.batches(&addrs, 256))
            .await?;
        let secs = t.elapsed().as_secs_f64();
        writeln!(
            out,
            "{:>5} {:>9} {:>9} {:>10.1} {:>10.1} {:>9.1} {:>10.0}",
            stats.layer,
            stats.pages,
            stats.zero_pages,
            stats.raw_bytes as f64 / (1 << 20) as f64,
            stats.wire_bytes as f64 / (1 << 20) as f64,
            secs * 1e3,
            stats.raw_bytes as f64 / secs / 1e6,
        )
        .map_err(o)?;
        rounds.push(RoundReport {
            stats,
            seconds: secs,
        });
    }
    client.send_state(pb::ProcessTree::default()).await?;
    match client.commit(false).await? {
        CommitOutcome::Stored { .. } => {}
        other => return Err(DemoError::Commit(other)),
    }

    let pages_checked = verify(store.as_ref(), session, &workload)?;
    writeln!(
        out,
        "verified: the destination's flattened image equals the source's memory \
         ({pages_checked} pages, byte for byte)"
    )
    .map_err(o)?;
    let _ = stop.send(());
    let _ = served.await;
    Ok(DemoReport {
        rounds,
        pages_checked,
    })
}

/// Compares the stored session, flattened, with the workload's memory.
pub fn verify(store: &dyn Store, id: SessionId, w: &Workload) -> Result<u64, DemoError> {
    let flat = store.open(id)?.flatten()?;
    if flat.pages() != w.memory.len() as u64 {
        return Err(DemoError::Mismatch {
            addr: 0,
            what: "page count",
        });
    }
    for (&addr, want) in &w.memory {
        let ok = match flat.page(addr) {
            None => false,
            Some(Page::Zero) => is_zero(want),
            Some(Page::Data(d)) => d == *want,
        };
        if !ok {
            return Err(DemoError::Mismatch {
                addr,
                what: "contents",
            });
        }
    }
    Ok(w.memory.len() as u64)
}
