//! The `ferry` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry::demo::{self, DemoOptions};
use ferry::dump::{self, Destination, DumpOptions, DumpReport, RoundReport};
use ferry::policy::Policy;
use ferry::track::Backend;
use ferry_page_server::store::quota::{Quota, QuotaStore};
use ferry_page_server::store::{disk::DiskStore, mem::MemStore, Store};
use ferry_page_server::tls::{client_config, server_config, TlsFiles};
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
`ferry certs init DIR` and give both ends the same directory. (`--transport tcp` is an \
unencrypted, unauthenticated baseline for benchmarks, limited to loopback.)"
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
        /// Directory with ca.pem, server.pem and server.key (see `ferry
        /// certs init`); needed for QUIC.
        #[arg(long)]
        tls: Option<PathBuf>,
        #[command(flatten)]
        transport: TransportArgs,
        /// Where images live: "mem" (in memory, lost when the server stops)
        /// or "disk:PATH" (a directory; survives restarts).
        #[arg(long, default_value = "mem")]
        store: String,
        /// Sessions served at once; a source connecting beyond that is
        /// refused with the reason.
        #[arg(long, default_value_t = ferry_page_server::server::DEFAULT_MAX_SESSIONS)]
        max_sessions: usize,
        /// Only clients whose certificate is listed may migrate in (QUIC;
        /// repeatable): a SHA-256 fingerprint of the certificate (see
        /// `ferry certs fingerprint FILE.pem`) or CN=NAME (its subject
        /// common name; see `ferry certs client`). Without any, every
        /// client certificate the CA signed is accepted.
        #[arg(long = "allow-client", value_name = "FINGERPRINT|CN=NAME")]
        allow_clients: Vec<String>,
        /// More --allow-client entries from a file: one per line, `#`
        /// starts a comment.
        #[arg(long, value_name = "PATH")]
        allow_clients_file: Option<PathBuf>,
        /// Page data one session may hold in the mem store (sizes take K,
        /// M, G, T; "none" for no limit). A session over it is ended with
        /// "over quota".
        #[arg(long, value_name = "SIZE", default_value = "none", value_parser = size)]
        session_quota: u64,
        /// Page data all sessions together may hold in the mem store
        /// [default: half of this host's physical memory]. A new session is
        /// refused while it is full, a batch that would pass it ends its
        /// session (unless --spill-dir is given).
        #[arg(long, value_name = "SIZE", value_parser = size)]
        mem_quota: Option<u64>,
        /// With --store mem: a session that goes over --session-quota or
        /// --mem-quota moves to a disk store in this directory (its layers
        /// are copied there once) instead of being ended.
        #[arg(long, value_name = "DIR")]
        spill_dir: Option<PathBuf>,
        /// A session with no control message and no page batch for this
        /// many seconds is ended (QUIC keep-alives do not count).
        #[arg(long, value_name = "SECS", default_value_t = 60,
              value_parser = clap::value_parser!(u64).range(1..))]
        idle_timeout: u64,
        /// With --restore: how long a restored process is held stopped
        /// waiting for the source's Go (the two-phase end of `ferry
        /// migrate`) before it is killed and the session abandoned.
        #[arg(long, value_name = "SECS",
              default_value_t = ferry_page_server::server::DEFAULT_GO_TIMEOUT.as_secs(),
              value_parser = clap::value_parser!(u64).range(1..))]
        go_timeout: u64,
        /// Page data one layer (one round) may carry [default: this host's
        /// physical memory: a round larger than that could not be restored
        /// here]. Zero pages carry none. Frames are limited by the protocol
        /// itself: control messages to 16 MiB, page batches to 8 MiB of
        /// payload and 256 KiB of header.
        #[arg(long, value_name = "SIZE", value_parser = size)]
        max_layer_size: Option<u64>,
        /// Restore committed migrations on this host (`ferry migrate`
        /// needs it). Restored processes run as their own session, under
        /// the credentials they had. The restore is warm: each round is
        /// laid into the waiting process as it arrives, so the commit has
        /// little left to do.
        #[arg(long)]
        restore: bool,
        /// With --restore: do all of the restore at commit instead (longer
        /// downtime; for comparison and troubleshooting).
        #[arg(long, requires = "restore")]
        cold_restore: bool,
        /// With --restore: keep a session's image after its process is
        /// restored (by default it is removed then: the process runs on,
        /// and the memory or disk goes back to the page server).
        #[arg(long, requires = "restore")]
        keep_restored: bool,
        /// Capabilities the page server keeps once started (comma
        /// separated, e.g. sys_ptrace,checkpoint_restore; "none"; "all");
        /// every other one is dropped from all its sets, the bounding set
        /// included, for good. A restored process gets exactly its own
        /// credentials; an image needing a capability not kept here is
        /// refused by name. [default: none; with --restore: all (every
        /// ordinary process's bounding set is full)]
        #[arg(long, value_name = "LIST")]
        caps: Option<String>,
    },
    /// Move a running process to another host: rounds of pre-dump while it
    /// runs, a freeze, the final delta and the state, a restore by the page
    /// server (started with --restore), and only then is the source killed.
    /// Any failure before the destination runs the process resumes the
    /// source, untouched, and names the cause.
    Migrate {
        /// The process to move.
        #[arg(long)]
        pid: i32,
        /// Page server as HOST:PORT.
        #[arg(long)]
        to: String,
        /// Directory with ca.pem, client.pem and client.key; needed for
        /// QUIC.
        #[arg(long)]
        tls: Option<PathBuf>,
        #[command(flatten)]
        transport: TransportArgs,
        #[command(flatten)]
        rounds: RoundArgs,
        /// Post-copy: after the rounds, freeze and send only the state and
        /// the pages that cannot wait; the destination resumes the process
        /// at once and fetches the last round's other dirty pages on fault
        /// while the source pushes them. After the resume the source can no
        /// longer take over (see README, `ferry migrate --post-copy`).
        /// Needs QUIC and a page server with warm restore.
        #[arg(long)]
        post_copy: bool,
        /// With --post-copy: at most N pre-copy rounds before the freeze
        /// (same as --max-rounds N).
        #[arg(long, value_name = "N", requires = "post_copy")]
        post_copy_after: Option<u32>,
        /// With --post-copy: cap the background push at this many bytes a
        /// second (K/M/G suffixes); requested pages are never held back.
        #[arg(long, value_name = "SIZE", value_parser = size, requires = "post_copy")]
        post_copy_bandwidth: Option<u64>,
        /// Restore into a fresh pid namespace on the destination where the
        /// process (tree) keeps the pid and thread ids it has in its own
        /// pid namespace (see README, `--keep-pids`). The restore is then
        /// cold, at commit.
        #[arg(long, conflicts_with = "post_copy")]
        keep_pids: bool,
    },
    /// Restore a dumped process on this host from an image directory.
    Restore {
        /// The directory `ferry dump --images-dir` wrote.
        #[arg(long)]
        images_dir: PathBuf,
        /// Which session (see `ferry images list`); default: the newest with
        /// a process state.
        #[arg(long)]
        session: Option<String>,
        /// Restore into a fresh pid namespace with the pids and thread ids
        /// the process (tree) had in its own pid namespace.
        #[arg(long)]
        keep_pids: bool,
    },
    /// Dump a running process in rounds while it runs (iterative pre-dump),
    /// then freeze it and send the final delta and its state. The layers go
    /// to a page server (--to) or to a local image directory (--images-dir).
    /// The process is left running (default) or stopped; on any failure it
    /// is left running and untraced.
    Dump {
        /// The process to dump.
        #[arg(long)]
        pid: i32,
        /// Page server as HOST:PORT, e.g. dst.example.org:7070 or [::1]:7070.
        #[arg(long, conflicts_with = "images_dir")]
        to: Option<String>,
        /// Directory with ca.pem, client.pem and client.key; needed for
        /// --to over QUIC.
        #[arg(long)]
        tls: Option<PathBuf>,
        #[command(flatten)]
        transport: TransportArgs,
        /// Write the layered image to this directory (disk store format).
        #[arg(long, required_unless_present = "to")]
        images_dir: Option<PathBuf>,
        /// Leave the process running after the dump (the default).
        #[arg(long, conflicts_with = "leave_stopped")]
        leave_running: bool,
        /// Leave the process stopped (SIGSTOP) after a successful dump.
        #[arg(long)]
        leave_stopped: bool,
        #[command(flatten)]
        rounds: RoundArgs,
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
    /// A whole migration on this machine, nothing to set up: fresh
    /// certificates, a page server on loopback, a small workload, the
    /// rounds, the restore, and the counter going on in the new process.
    /// Needs root (ptrace).
    Demo {
        /// Workload memory in MiB.
        #[arg(long, default_value_t = 256)]
        size: u64,
        /// Pages the workload rewrites per second.
        #[arg(long, default_value_t = 2000)]
        dirty_rate: u64,
        /// Lanes: batches compressed and sent at once (over QUIC they
        /// share one data stream, over TCP each is a connection).
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// Send pages uncompressed.
        #[arg(long)]
        no_zstd: bool,
    },
    /// Measure migrations: a workload migrated through a page server on
    /// loopback (real QUIC, real restore), several runs per mode, medians
    /// and min-max, downtime part by part; with --compare, the modes side
    /// by side in one invocation. Needs root.
    Bench {
        /// Workload memory in MiB; several (comma separated) run every mode
        /// at each size and show how downtime grows with size.
        #[arg(long, value_delimiter = ',', default_value = "512")]
        size: Vec<u64>,
        /// Pages the workload rewrites per second (4096 = 16 MiB/s).
        #[arg(long, default_value_t = 4096)]
        dirty_rate: u64,
        /// Which pages the workload rewrites: uniform, hot or sequential.
        #[arg(long, default_value = "uniform")]
        pattern: String,
        /// What the workload's memory holds: mixed, zero, text or random.
        #[arg(long, default_value = "mixed")]
        content: String,
        /// Runs per mode.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Let the workload share every CPU with both ends of the
        /// migration (by default it gets one to itself, and the slowdown
        /// shows what the migration does to it rather than CPU contention
        /// that a second host would not have).
        #[arg(long)]
        no_pin: bool,
        /// Modes to run: iterative, stop-and-copy, cold-restore, no-zstd,
        /// checksum, one-stream, tcp, post-copy, keep-pids (comma
        /// separated).
        #[arg(long, value_delimiter = ',', default_value = "iterative")]
        modes: Vec<String>,
        /// All modes (stop-and-copy is the baseline the downtime ratios
        /// use, tcp the one for the transport's rate).
        #[arg(long)]
        compare: bool,
        /// Stand in for a slower link: cap the data streams at this many
        /// wire bytes per second (as `migrate --max-rate`; K/M/G suffixes),
        /// so what compression saves on the wire shows in the rates. Both
        /// ends still share this host's CPUs.
        #[arg(long, default_value = "0", value_parser = size)]
        link_rate: u64,
        /// Run the two ends of the migration on separate CPUs, as on two
        /// hosts: the page server (destination) on the last CPU, the source
        /// end and the workload on the others. The workload is then not
        /// busy (it sleeps between page writes, so it leaves the source
        /// its CPU) and no slowdown is measured; needs two CPUs.
        #[arg(long, conflicts_with = "no_pin")]
        separate_ends: bool,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write an SVG of bytes per round and downtime parts to this file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// A workload to migrate: memory of a chosen content, pages rewritten
    /// at a set rate in a set pattern, a count of the work done logged to
    /// a file every 100 ms as `COUNT UNIX_MS`. It detaches from the
    /// terminal. Creating `<log-file>.verify` makes it check every page of
    /// its memory and log `verified N pages` or `corrupt page I: ...`.
    Workload {
        /// Memory in MiB.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// Pages rewritten per second (4096 = 16 MiB/s).
        #[arg(long, default_value_t = 0.0)]
        dirty_rate: f64,
        /// Which pages are rewritten: uniform, hot (9 in 10 from the first
        /// tenth) or sequential.
        #[arg(long, default_value = "uniform")]
        pattern: String,
        /// What memory holds: mixed (3 zero : 6 text-like : 1 random),
        /// zero, text or random.
        #[arg(long, default_value = "mixed")]
        content: String,
        /// Count fixed units of computation instead of sleeping 1 ms per
        /// iteration (uses a whole core; the count then measures the CPU
        /// the workload got).
        #[arg(long)]
        busy: bool,
        /// Seed of the memory contents.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// File the count is appended to.
        #[arg(long)]
        log_file: PathBuf,
    },
}

/// Which transport, shared by `page-server`, `dump` and `migrate`.
#[derive(clap::Args)]
struct TransportArgs {
    /// "quic" (mutual TLS) or "tcp": plain TCP with the same framing,
    /// UNENCRYPTED and UNAUTHENTICATED, a baseline for benchmarks, refused
    /// on non-loopback addresses.
    #[arg(long, value_enum, default_value_t = TransportKind::Quic)]
    transport: TransportKind,
    /// Let --transport tcp use a non-loopback address. Anyone on the path
    /// can then read the process's memory, and anyone who can connect can
    /// send a page server sessions (with --restore: code to run).
    #[arg(long)]
    insecure_allow_remote: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum TransportKind {
    Quic,
    Tcp,
}

impl TransportArgs {
    /// Plain TCP (checked: no certificates, the loopback rule, a banner),
    /// or `None` for QUIC.
    fn tcp(
        &self,
        tls: Option<&std::path::Path>,
        addr: SocketAddr,
        role: &str,
    ) -> Result<Option<bool>> {
        if self.transport == TransportKind::Quic {
            if self.insecure_allow_remote {
                bail!("--insecure-allow-remote only applies to --transport tcp");
            }
            return Ok(None);
        }
        if tls.is_some() {
            bail!("--transport tcp is unencrypted: --tls does not apply (drop it, or use QUIC)");
        }
        ferry_page_server::tcp::check_plaintext_addr(addr, self.insecure_allow_remote)?;
        eprintln!(
            "\n!!! WARNING: {role} {addr} over PLAIN TCP\n!!! {}\n",
            ferry_page_server::tcp::WARNING
        );
        Ok(Some(self.insecure_allow_remote))
    }
}

/// How the rounds run, shared by `dump` and `migrate`.
#[derive(clap::Args)]
struct RoundArgs {
    /// Dirty tracking: auto, uffd-wp, soft-dirty or checksum.
    #[arg(long, default_value = "auto")]
    track: String,
    /// Freeze once the predicted final round fits this many milliseconds.
    #[arg(long, default_value_t = 50)]
    max_downtime: u64,
    /// Most pre-dump rounds; 0 freezes at once (stop-and-copy).
    #[arg(long, default_value_t = 8)]
    max_rounds: u32,
    /// Lanes: batches compressed and sent at once (over QUIC they share
    /// one data stream, over TCP each is a connection).
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Send pages uncompressed.
    #[arg(long)]
    no_zstd: bool,
    /// Cap the migration's bandwidth, all data streams together, in bytes
    /// on the wire per second (suffixes K, M, G: powers of 1024; 0 or
    /// none = no cap), to leave room on a shared link. Rounds get longer and the
    /// freeze is planned with the capped rate.
    #[arg(long, default_value = "0", value_parser = size)]
    max_rate: u64,
    /// Print the rounds and the summary as one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

impl RoundArgs {
    fn options(&self, pid: i32, dest: Destination) -> Result<DumpOptions> {
        let Some(track) = Backend::parse(&self.track) else {
            bail!(
                "unknown --track {:?}: use auto, uffd-wp, soft-dirty or checksum",
                self.track
            );
        };
        Ok(DumpOptions {
            pid,
            dest,
            leave_stopped: false,
            track,
            policy: Policy {
                max_downtime: std::time::Duration::from_millis(self.max_downtime),
                max_rounds: self.max_rounds,
                ..Policy::default()
            },
            compress: if self.no_zstd {
                Compress::Off
            } else {
                Compress::default()
            },
            restore: false,
            keep_pids: false,
        })
    }

    fn connect(
        &self,
        to: &str,
        transport: &TransportArgs,
        tls: Option<&std::path::Path>,
    ) -> Result<ferry::client::Connect> {
        use ferry::client::{Connect, Transport};
        let addr = resolve(to)?;
        let mut c = match transport.tcp(tls, addr, "sending to")? {
            Some(allow_remote) => Connect::with_transport(addr, Transport::Tcp { allow_remote }),
            None => {
                let tls = tls.context("--to needs --tls DIR (QUIC with mutual TLS)")?;
                Connect::new(addr, client_config(&TlsFiles::client(tls))?)
            }
        };
        c.streams = self.streams;
        c.max_rate = if self.max_rate == u64::MAX {
            0
        } else {
            self.max_rate
        };
        Ok(c)
    }

    /// The live display: a line per round on stderr (nothing with --json).
    fn progress(&self) -> impl FnMut(&RoundReport) + Send {
        let json = self.json;
        move |r: &RoundReport| {
            if json {
                return;
            }
            if r.round == 0 {
                eprintln!(
                    "{:>5} {:>8} {:>10} {:>10} {:>10} {:>8} {:>9} {:>10}",
                    "round", "", "dirty pg", "raw MiB", "wire MiB", "ms", "MB/s", "predicted"
                );
            }
            eprintln!("{}", round_line(r));
        }
    }
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
    /// Issue one more source identity from the CA in DIR (needs ca.key):
    /// DIR/NAME.pem and DIR/NAME.key, with common name NAME, for a page
    /// server that allows sources by name (--allow-client CN=NAME).
    Client { dir: PathBuf, name: String },
    /// Print the SHA-256 fingerprint of a certificate (PEM), as
    /// `--allow-client` takes it.
    Fingerprint { file: PathBuf },
}

/// A size from the command line (see `ferry_page_server::limits`).
fn size(s: &str) -> std::result::Result<u64, String> {
    ferry_page_server::limits::parse_size(s).map_err(|e| e.to_string())
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

/// What the source keeps: tracing the process and reading its memory and
/// descriptors (`CAP_SYS_PTRACE`: a root process with full capabilities
/// may only be traced by one holding them all, or this one), killing it
/// after the commit, reaching files of its in other users' directories
/// for the pre-flight check, and TCP repair of its connections
/// (`CAP_NET_ADMIN`). `CAP_SYS_ADMIN` is added for a process under
/// seccomp.
const SOURCE_CAPS: &str = "sys_ptrace,kill,dac_read_search,net_admin";

/// Drops every capability the command does not need (README, Security).
fn drop_capabilities(command: &Command) -> Result<()> {
    use ferry::sys::caps;
    let keep = match command {
        Command::PageServer {
            caps: list,
            restore,
            listen,
            ..
        } => {
            let list = list
                .as_deref()
                .unwrap_or(if *restore { "all" } else { "none" });
            let mut keep = caps::parse_list(list)?;
            // Binding happens later, on the runtime.
            if listen.port() < 1024 {
                keep |= caps::bit("net_bind_service")?;
            }
            keep
        }
        Command::Migrate { pid, .. } => {
            let mut keep = caps::parse_list(SOURCE_CAPS)?;
            // Reading seccomp filters and suspending them for ferry's own
            // injected calls take CAP_SYS_ADMIN: kept only for a sandboxed
            // process (tree).
            if ferry::migrate::sandboxed(*pid) {
                keep |= caps::bit("sys_admin")?;
            }
            keep
        }
        _ => return Ok(()),
    };
    if keep == u64::MAX {
        return Ok(());
    }
    let (eff, _, _) = caps::current()?;
    if eff & !keep == 0 {
        return Ok(());
    }
    caps::keep_only(keep).context("dropping capabilities")?;
    tracing::debug!(kept = %caps::names(keep), "capabilities dropped");
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Before any runtime or thread exists: the workload closes every
    // descriptor it does not need.
    if let Command::Workload {
        mib,
        dirty_rate,
        pattern,
        content,
        busy,
        seed,
        log_file,
    } = &cli.command
    {
        let spec = ferry::workload::Spec {
            mib: *mib,
            dirty_rate: *dirty_rate,
            pattern: ferry::workload::Pattern::parse(pattern)?,
            content: ferry::workload::Fill::parse(content)?,
            busy: *busy,
            seed: *seed,
        };
        ferry::workload::run(&spec, log_file)?;
        return Ok(());
    }
    if matches!(cli.command, Command::PageServer { .. }) {
        // Images come and go: their memory must go back to the system.
        ferry::sys::heap::return_large_frees();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Before any thread exists (capabilities are per thread; threads made
    // later inherit the reduced sets).
    drop_capabilities(&cli.command)?;
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
            transport,
            store,
            max_sessions,
            allow_clients,
            allow_clients_file,
            session_quota,
            mem_quota,
            spill_dir,
            idle_timeout,
            go_timeout,
            max_layer_size,
            restore,
            cold_restore,
            keep_restored,
            caps: _,
        } => {
            use ferry_page_server::limits;
            let mut allow = ferry_page_server::access::AllowList::default();
            for a in &allow_clients {
                allow.add(a)?;
            }
            if let Some(f) = &allow_clients_file {
                allow.add_file(f)?;
            }
            let (transport, what) = match transport.tcp(tls.as_deref(), listen, "listening on")? {
                Some(allow_remote) => (
                    ferry_page_server::Transport::Tcp { allow_remote },
                    "PLAIN TCP: unencrypted, unauthenticated",
                ),
                None => {
                    let tls = tls.context("--tls DIR is needed (QUIC with mutual TLS)")?;
                    (
                        ferry_page_server::Transport::Quic(server_config(&TlsFiles::server(&tls))?),
                        "QUIC, mutual TLS",
                    )
                }
            };
            if !allow.is_empty() && matches!(transport, ferry_page_server::Transport::Tcp { .. }) {
                bail!(
                    "--allow-client needs QUIC with mutual TLS: plain TCP has no client \
                     certificates to check"
                );
            }
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
            let mem_quota = mem_quota.unwrap_or(limits::default_mem_quota(meminfo.as_deref()));
            let max_layer_bytes = max_layer_size.unwrap_or(
                meminfo
                    .as_deref()
                    .and_then(limits::mem_total)
                    .unwrap_or(2 * limits::FALLBACK_MEM_QUOTA),
            );
            let quota = (store == "mem").then_some(Quota {
                session: session_quota,
                total: mem_quota,
            });
            if spill_dir.is_some() && quota.is_none() {
                bail!("--spill-dir needs --store mem (a disk store has nothing to spill)");
            }
            let mut store = open_store(&store).context(
                "cannot open the page server's store (it runs with only the capabilities \
                 --caps lists, none by default without --restore: another user's directory \
                 needs --caps dac_override)",
            )?;
            if let Some(q) = quota {
                store = Arc::new(QuotaStore::new(store, q));
            }
            if let Some(dir) = &spill_dir {
                let disk = DiskStore::open(dir)
                    .with_context(|| format!("opening the spill store {}", dir.display()))?;
                store = Arc::new(ferry_page_server::store::spill::SpillStore::new(
                    store,
                    Arc::new(disk),
                ));
            }
            let mut cfg = Config::with_transport(transport, store);
            cfg.max_sessions = max_sessions;
            cfg.idle_timeout = std::time::Duration::from_secs(idle_timeout);
            cfg.go_timeout = std::time::Duration::from_secs(go_timeout);
            cfg.max_layer_bytes = max_layer_bytes;
            cfg.forget_restored = !keep_restored;
            let allowed = allow.len();
            cfg.allow = (!allow.is_empty()).then_some(allow);
            if cold_restore {
                cfg.restorer = Some(Arc::new(ferry::migrate::ColdRestorer));
            } else if restore {
                cfg.restorer = Some(Arc::new(ferry::migrate::LocalRestorer));
            }
            let server = PageServer::bind(listen, cfg)?;
            eprintln!(
                "ferry page server listening on {} ({what})",
                server.local_addr()?
            );
            let show = limits::show_size;
            eprintln!(
                "limits: {max_sessions} sessions, idle timeout {idle_timeout} s, layers up to {}{}{}",
                show(max_layer_bytes),
                match quota {
                    Some(q) => format!(
                        ", mem store quota {} per session and {} in total{}",
                        show(q.session),
                        show(q.total),
                        match &spill_dir {
                            Some(d) => format!(" (over it: spilled to {})", d.display()),
                            None => String::new(),
                        }
                    ),
                    None => String::new(),
                },
                if allowed > 0 {
                    format!(", {allowed} allowed client certificate(s)")
                } else {
                    String::new()
                }
            );
            server
                .run(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await;
            eprintln!("ferry page server stopped");
            Ok(())
        }
        Command::Dump {
            pid,
            to,
            tls,
            transport,
            images_dir,
            leave_running: _,
            leave_stopped,
            rounds,
        } => {
            let dest = match (to, images_dir) {
                (Some(to), _) => {
                    Destination::Remote(rounds.connect(&to, &transport, tls.as_deref())?)
                }
                (None, Some(dir)) => Destination::ImagesDir(dir),
                (None, None) => bail!("give --to HOST:PORT or --images-dir DIR"),
            };
            let mut opts = rounds.options(pid, dest)?;
            opts.leave_stopped = leave_stopped;
            let json = rounds.json;
            let mut show = rounds.progress();
            let report = tokio::select! {
                r = dump::dump(opts, &mut show) => r?,
                _ = interrupted() => bail!("interrupted: the process was left running and untraced"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report_json(&report))?);
            } else {
                eprintln!(
                    "dumped pid {} as session {} ({} tracking): {} rounds, stopped because {}; \
                     frozen {:.1} ms, total {:.2} s; the process was left {}",
                    report.pid,
                    report.session,
                    report.backend.name(),
                    report.rounds.len(),
                    report.stop,
                    report.frozen.as_secs_f64() * 1e3,
                    report.total.as_secs_f64(),
                    if leave_stopped { "stopped" } else { "running" }
                );
            }
            Ok(())
        }
        Command::Migrate {
            pid,
            to,
            tls,
            transport,
            rounds,
            post_copy,
            post_copy_after,
            post_copy_bandwidth,
            keep_pids,
        } => {
            let dest = Destination::Remote(rounds.connect(&to, &transport, tls.as_deref())?);
            let mut opts = rounds.options(pid, dest)?;
            opts.keep_pids = keep_pids;
            if let Some(n) = post_copy_after {
                opts.policy.max_rounds = n;
            }
            let mut show = rounds.progress();
            let report = if post_copy {
                let pc = ferry::postcopy::PostCopyOptions {
                    bandwidth: post_copy_bandwidth,
                };
                tokio::select! {
                    r = ferry::migrate::migrate_post_copy(opts, &pc, &mut show) => r?,
                    _ = interrupted() => bail!(
                        "interrupted: before the destination resumed the process, the source \
                         was left running and untraced; after it, the source was left stopped \
                         and the destination kills its copy"
                    ),
                }
            } else {
                tokio::select! {
                    r = ferry::migrate::migrate(opts, &mut show) => r?,
                    _ = interrupted() => bail!(
                        "interrupted: the source process was left running and untraced; or, if \
                         the destination had already been told to run it (Go), left stopped: \
                         the page server's log says whether it runs there"
                    ),
                }
            };
            if rounds.json {
                let mut j = report_json(&report.dump);
                j["restored_pid"] = report.restored_pid.into();
                if report.restored_ns.1 != 0 {
                    j["restored_ns_pid"] = report.restored_ns.0.into();
                    j["restored_pid_ns"] = report.restored_ns.1.into();
                }
                j["downtime_ms"] = (report.downtime.as_secs_f64() * 1e3).into();
                if let Some(pc) = &report.post_copy {
                    j["post_copy"] = serde_json::json!({
                        "lazy_pages": pc.lazy_pages,
                        "faults": pc.faults,
                        "local_faults": pc.local_faults,
                        "fault_median_us": pc.fault_median_us,
                        "fault_p99_us": pc.fault_p99_us,
                        "fault_max_us": pc.fault_max_us,
                        "requests": pc.requests,
                        "pushed_pages": pc.pushed_pages,
                        "last_page_ms": pc.last_page.as_secs_f64() * 1e3,
                    });
                }
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                if let Some(pc) = &report.post_copy {
                    eprintln!(
                        "post-copy: {} pages served after the resume, the last {:.1} ms after \
                         it; {} faults asked the source (median {} µs, p99 {} µs), {} served \
                         locally",
                        pc.lazy_pages,
                        pc.last_page.as_secs_f64() * 1e3,
                        pc.faults,
                        pc.fault_median_us,
                        pc.fault_p99_us,
                        pc.local_faults,
                    );
                }
                let p = report.dump.parts;
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                let ns = match report.restored_ns {
                    (_, 0) => String::new(),
                    (ns_pid, ns) => format!(" (pid {ns_pid} in its new pid namespace pid:[{ns}])"),
                };
                eprintln!(
                    "migrated pid {} to {to}: running there as pid {}{ns}; downtime {:.1} ms \
                     (freeze {:.1} + final round {:.1} + state {:.1} + restore {:.1}), \
                     {} rounds, stopped because {}; the source is gone",
                    report.dump.pid,
                    report.restored_pid,
                    ms(report.downtime),
                    ms(p.freeze),
                    ms(p.final_round),
                    ms(p.state),
                    ms(p.commit),
                    report.dump.rounds.len(),
                    report.dump.stop,
                );
            }
            Ok(())
        }
        Command::Restore {
            images_dir,
            session,
            keep_pids,
        } => {
            let session = match session {
                Some(s) => Some(
                    ferry_proto::SessionId::from_hex(&s)
                        .with_context(|| format!("{s:?} is not a session id (32 hex digits)"))?,
                ),
                None => None,
            };
            if keep_pids {
                let k = tokio::task::spawn_blocking(move || {
                    ferry::restore::restore_from_images_dir_keeping_pids(&images_dir, session)
                })
                .await??;
                println!("{}", k.pid);
                eprintln!(
                    "restored as pid {} (pid {} in its new pid namespace pid:[{}]), running",
                    k.pid, k.ns_pid, k.pid_ns
                );
                return Ok(());
            }
            let pid = tokio::task::spawn_blocking(move || {
                ferry::restore::restore_from_images_dir(&images_dir, session)
            })
            .await??;
            println!("{pid}");
            eprintln!("restored as pid {pid}, running");
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
        Command::Certs {
            command: CertsCommand::Client { dir, name },
        } => {
            let w = ferry::certs::issue_client(&dir, &name)?;
            for f in &w.files {
                println!("{}", f.display());
            }
            let fp = ferry_page_server::access::pem_fingerprint(&dir.join(format!("{name}.pem")))?;
            eprintln!(
                "give {name}.pem and {name}.key to the source (with ca.pem); allow it on the \
                 page server with --allow-client CN={name} or --allow-client {fp}"
            );
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Fingerprint { file },
        } => {
            println!("{}", ferry_page_server::access::pem_fingerprint(&file)?);
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
            dirty_rate,
            streams,
            no_zstd,
        } => {
            let opts = DemoOptions {
                mib: size,
                dirty_rate,
                streams,
                compress: if no_zstd {
                    Compress::Off
                } else {
                    Compress::default()
                },
            };
            let mut show = |r: &RoundReport| {
                if r.round == 0 {
                    println!(
                        "{:>5} {:>8} {:>10} {:>10} {:>10} {:>8} {:>9} {:>10}",
                        "round", "", "dirty pg", "raw MiB", "wire MiB", "ms", "MB/s", "predicted"
                    );
                }
                println!("{}", round_line(r));
            };
            demo::run(&opts, &mut std::io::stdout(), &mut show).await?;
            Ok(())
        }
        Command::Bench {
            size,
            dirty_rate,
            pattern,
            content,
            runs,
            no_pin,
            modes,
            compare,
            link_rate,
            separate_ends,
            json,
            svg,
        } => {
            let modes = if compare {
                ferry::bench::Mode::ALL.to_vec()
            } else {
                modes
                    .iter()
                    .map(|m| ferry::bench::Mode::parse(m))
                    .collect::<Result<Vec<_>, _>>()?
            };
            let opts = ferry::bench::BenchOptions {
                sizes: size,
                dirty_rate,
                pattern: ferry::workload::Pattern::parse(&pattern)?,
                content: ferry::workload::Fill::parse(&content)?,
                runs: runs.max(1),
                modes,
                pin: !no_pin,
                link_rate: if link_rate == u64::MAX { 0 } else { link_rate },
                separate_ends,
            };
            let results = ferry::bench::run(&opts, &mut std::io::stdout()).await?;
            if let Some(path) = json {
                std::fs::write(
                    &path,
                    serde_json::to_string_pretty(&ferry::bench::json(&results))?,
                )
                .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(path) = svg {
                std::fs::write(&path, ferry::bench::svg(&results))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Workload { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// Resolves on SIGINT or SIGTERM. Dropping the dump then detaches from the
/// target, which keeps running.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn round_line(r: &RoundReport) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    format!(
        "{:>5} {:>8} {:>10} {:>10.1} {:>10.1} {:>8.1} {:>9.0} {:>10}",
        r.round,
        if r.frozen { "frozen" } else { "running" },
        r.dirty_pages,
        mib(r.stats.raw_bytes),
        mib(r.stats.wire_bytes),
        r.total.as_secs_f64() * 1e3,
        r.rate_mb_s(),
        r.predicted_downtime
            .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "-".into()),
    )
}

fn report_json(r: &DumpReport) -> serde_json::Value {
    let rounds: Vec<_> = r
        .rounds
        .iter()
        .map(|x| {
            serde_json::json!({
                "round": x.round,
                "frozen": x.frozen,
                "dirty_pages": x.dirty_pages,
                "pages_sent": x.stats.pages,
                "zero_pages": x.stats.zero_pages,
                "batches": x.stats.batches,
                "raw_bytes": x.stats.raw_bytes,
                "wire_bytes": x.stats.wire_bytes,
                "scan_ms": x.scan.as_secs_f64() * 1e3,
                "total_ms": x.total.as_secs_f64() * 1e3,
                "rate_mb_s": x.rate_mb_s(),
                "predicted_downtime_ms": x.predicted_downtime.map(|d| d.as_secs_f64() * 1e3),
            })
        })
        .collect();
    serde_json::json!({
        "pid": r.pid,
        "session": r.session.to_hex(),
        "tracking": r.backend.name(),
        "stop_reason": r.stop.to_string(),
        "frozen_ms": r.frozen.as_secs_f64() * 1e3,
        "frozen_parts_ms": {
            "freeze": r.parts.freeze.as_secs_f64() * 1e3,
            "final_round": r.parts.final_round.as_secs_f64() * 1e3,
            "state": r.parts.state.as_secs_f64() * 1e3,
            "commit": r.parts.commit.as_secs_f64() * 1e3,
        },
        "total_s": r.total.as_secs_f64(),
        "rounds": rounds,
    })
}

/// The first address `HOST:PORT` resolves to.
fn resolve(to: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    to.to_socket_addrs()
        .with_context(|| format!("cannot resolve {to:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("{to:?} resolves to no address"))
}
