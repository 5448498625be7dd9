//! A page server on loopback, inside this process, with fresh certificates
//! in a temporary directory and restores enabled: the destination `ferry
//! demo` and `ferry bench` migrate to, so both need nothing set up. `ferry
//! bench` also starts one over plain TCP, its unencrypted baseline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_page_server::store::{mem::MemStore, Store};
use ferry_page_server::tls::{client_config, server_config, TlsError, TlsFiles};
use ferry_page_server::{Config, PageServer, Restorer};

use crate::client::Connect;
use crate::migrate::LocalRestorer;

#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Certs(#[from] crate::certs::CertsError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Server(#[from] ferry_page_server::server::ServerError),
}

pub struct Loopback {
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
    tls: PathBuf,
    tcp: bool,
    dir: tempfile::TempDir,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
}

impl Loopback {
    /// Starts it on `127.0.0.1:0` with an in-memory store, over QUIC with
    /// mutual TLS, restoring with [`LocalRestorer`] (warm).
    pub fn start() -> Result<Loopback, LoopbackError> {
        Self::start_on(false, Arc::new(LocalRestorer))
    }

    /// Over QUIC with another restorer.
    pub fn start_with(restorer: Arc<dyn Restorer>) -> Result<Loopback, LoopbackError> {
        Self::start_on(false, restorer)
    }

    /// Over QUIC (`tcp` false) or plain TCP with the same framing (no
    /// certificates) with `restorer`, served by the runtime of `rt` instead
    /// of the caller's: every task of the page server, and every thread
    /// they start, then runs on that runtime's threads (`ferry bench
    /// --separate-ends` pins them to a CPU of their own).
    pub fn start_in(
        rt: &tokio::runtime::Handle,
        tcp: bool,
        restorer: Arc<dyn Restorer>,
    ) -> Result<Loopback, LoopbackError> {
        // The endpoint's driver and the socket's registration go to the
        // runtime entered here, as does the spawn of the server itself.
        let _in = rt.enter();
        Self::start_on(tcp, restorer)
    }

    fn start_on(tcp: bool, restorer: Arc<dyn Restorer>) -> Result<Loopback, LoopbackError> {
        let io = |what| move |source| LoopbackError::Io { what, source };
        let dir = tempfile::tempdir().map_err(io("temporary directory"))?;
        let tls = dir.path().join("tls");
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let mut cfg = if tcp {
            Config::tcp(store.clone())
        } else {
            crate::certs::init(&tls, &[], false)?;
            Config::new(server_config(&TlsFiles::server(&tls))?, store.clone())
        };
        cfg.restorer = Some(restorer);
        let server = PageServer::bind("127.0.0.1:0".parse().expect("literal"), cfg)?;
        let addr = server.local_addr().map_err(io("page server address"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Ok(Loopback {
            addr,
            store,
            tls,
            tcp,
            dir,
            stop,
            served,
        })
    }

    /// The certificate directory (both identities and the CA; empty over
    /// TCP).
    pub fn tls_dir(&self) -> &Path {
        &self.tls
    }

    /// A scratch directory that lives as long as the server.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// How a source reaches it, over `streams` data streams.
    pub fn connect(&self, streams: usize) -> Result<Connect, TlsError> {
        let mut c = if self.tcp {
            Connect::tcp(self.addr)
        } else {
            Connect::new(self.addr, client_config(&TlsFiles::client(&self.tls))?)
        };
        c.streams = streams;
        Ok(c)
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.served.await;
    }
}
