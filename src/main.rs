//! The `ferry` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry::demo::{self, DemoOptions};
use ferry_page_server::store::{disk::DiskStore, mem::MemStore, Store};
use ferry_page_server::tls::{server_config, TlsFiles};
use ferry_page_server::{Config, PageServer};
use ferry_proto::batch::Compress;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of Linux processes: iterative, disk-less pre-copy over QUIC",
    long_about = "ferry moves a running Linux process to another host. While the process \
runs, it sends its memory in rounds, each with only the pages written since the round \
before, to a page server on the destination that keeps them as layered images; then it \
freezes the process, sends the last small delta and the state, and the destination \
restores it.\n\nEvery connection is mutually authenticated QUIC: create certificates with \
`ferry certs init DIR` and give both ends the same directory."
)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. "info" or "ferry_page_server=debug".
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive migrations: a QUIC page server that keeps each session's
    /// rounds as layered images.
    PageServer {
        /// Address to listen on, e.g. 0.0.0.0:7070 or [::]:7070.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory with ca.pem, server.pem and server.key (see `ferry certs init`).
        #[arg(long)]
        tls: PathBuf,
        /// Where images live: "mem" (in memory, lost when the server stops)
        /// or "disk:PATH" (a directory; survives restarts).
        #[arg(long, default_value = "mem")]
        store: String,
        /// Sessions served at once; more connections are refused.
        #[arg(long, default_value_t = 32)]
        max_sessions: usize,
    },
    /// Certificates for mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Inspect stored images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Show the transfer path end to end on loopback: fresh certificates, a
    /// page server, a synthetic address space sent in rounds, and a check of
    /// the destination's image page for page.
    Demo {
        /// Size of the synthetic address space in MiB.
        #[arg(long, default_value_t = 256)]
        size: u64,
        /// Rounds after the first, full one.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Percent of pages rewritten between rounds.
        #[arg(long, default_value_t = 5)]
        dirty: u32,
        /// QUIC data streams used in parallel.
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// Send pages uncompressed.
        #[arg(long)]
        no_zstd: bool,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a CA, a page server identity and a source identity into DIR
    /// (keys mode 0600). Copy DIR to both hosts of a migration.
    Init {
        dir: PathBuf,
        /// Extra names for the server certificate (clients always check
        /// "ferry-page-server").
        #[arg(long = "name")]
        names: Vec<String>,
        /// Replace existing keys.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// List the sessions a store holds: session, layers, pages, bytes.
    List {
        /// "disk:PATH" (a "mem" store lives only inside its page server).
        #[arg(long)]
        store: String,
    },
}

fn open_store(spec: &str) -> Result<Arc<dyn Store>> {
    if spec == "mem" {
        return Ok(Arc::new(MemStore::new()));
    }
    match spec.strip_prefix("disk:") {
        Some(path) if !path.is_empty() => Ok(Arc::new(
            DiskStore::open(path).with_context(|| format!("opening store {path}"))?,
        )),
        _ => bail!("unknown store {spec:?}: use \"mem\" or \"disk:PATH\""),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(cli.command))
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::PageServer {
            listen,
            tls,
            store,
            max_sessions,
        } => {
            let tls = server_config(&TlsFiles::server(&tls))?;
            let store = open_store(&store)?;
            let mut cfg = Config::new(tls, store);
            cfg.max_sessions = max_sessions;
            let server = PageServer::bind(listen, cfg)?;
            eprintln!(
                "ferry page server listening on {} (QUIC, mutual TLS)",
                server.local_addr()?
            );
            server
                .run(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await;
            eprintln!("ferry page server stopped");
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Init { dir, names, force },
        } => {
            let w = ferry::certs::init(&dir, &names, force)?;
            for f in w.files {
                println!("{}", f.display());
            }
            eprintln!(
                "copy {} to the source and the destination host; keep ca.key off both if you can",
                dir.display()
            );
            Ok(())
        }
        Command::Images {
            command: ImagesCommand::List { store },
        } => {
            if store == "mem" {
                bail!("a \"mem\" store lives inside its page server; list a \"disk:PATH\" store");
            }
            let store = open_store(&store)?;
            let mut sessions = store.list()?;
            sessions.sort_by_key(|s| s.id);
            println!(
                "{:<32}  {:>6}  {:>10}  {:>12}  {:>5}  label",
                "session", "layers", "pages", "bytes", "state"
            );
            for s in sessions {
                println!(
                    "{:<32}  {:>6}  {:>10}  {:>12}  {:>5}  {}",
                    s.id.to_hex(),
                    s.layers,
                    s.pages,
                    s.bytes,
                    if s.has_state { "yes" } else { "no" },
                    s.label
                );
            }
            Ok(())
        }
        Command::Demo {
            size,
            rounds,
            dirty,
            streams,
            no_zstd,
        } => {
            let opts = DemoOptions {
                mib: size,
                rounds,
                dirty_percent: dirty,
                streams,
                compress: if no_zstd {
                    Compress::Off
                } else {
                    Compress::default()
                },
            };
            demo::run(&opts, &mut std::io::stdout()).await?;
            Ok(())
        }
    }
}
