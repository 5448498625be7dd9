//! Mutual TLS for both ends of a ferry connection.
//!
//! The page server restores code as root, so no unauthenticated peer may
//! reach it: the server requires a client certificate signed by the
//! configured CA, and the handshake fails (before any session exists) for a
//! client without one. The client in turn only trusts a server certificate
//! signed by the same CA and issued for [`SERVER_NAME`]. Trust comes from
//! the private CA that `ferry certs init` writes, not from host names, so a
//! page server is reached by any address without reissuing certificates.
//!
//! Layout of a TLS directory: `ca.pem`, `server.pem`, `server.key`,
//! `client.pem`, `client.key` (`ca.key` too on the machine that issues).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Name every page server certificate is issued for and every client checks.
pub const SERVER_NAME: &str = "ferry-page-server";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source} (create certificates with `ferry certs init DIR`)")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Paths of one side's identity and the CA it trusts.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    pub fn server(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: Some(dir.join("server.pem")),
            key: Some(dir.join("server.key")),
        }
    }

    pub fn client(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: Some(dir.join("client.pem")),
            key: Some(dir.join("client.key")),
        }
    }
}

/// ring's suites with AES-128-GCM first: every page crosses AES-GCM twice
/// (seal, open), and 128-bit keys take 10 rounds a block against 256-bit
/// keys' 14; AES-128-GCM is TLS 1.3's mandatory suite and QUIC's own for
/// its first packets. The others stay, for peers that want them.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.into(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// QUIC transport settings shared by both ends: windows large enough for a
/// few GB/s on a LAN, a keep-alive so an idle round (the source computing)
/// never times the connection out, and a bounded number of data streams.
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(16u32.into());
    t.stream_receive_window((32u32 << 20).into());
    t.receive_window((128u32 << 20).into());
    t.send_window(128 << 20);
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(
        Duration::from_secs(20)
            .try_into()
            .expect("20 s fits a QUIC idle timeout"),
    ));
    t.datagram_receive_buffer_size(None);
    // Loopback and jumbo-frame LANs carry far larger datagrams than the
    // 1452-byte default, and QUIC pays per packet (measured: 64 KiB
    // datagrams on loopback cost 6-7 % less CPU per MiB than 6.5 KB ones).
    // Discovery only probes upwards, so a 1500-byte path stays correct, it
    // just stops at its own MTU. The socket cuts GSO sends to what the
    // kernel takes (`udp`): without that, ten large datagrams in one send
    // fail with EMSGSIZE, quinn counts them lost, and a few such losses in
    // a row read as a black hole that drops the path to 1200 bytes.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Largest UDP payload either end accepts or probes for (see
/// [`crate::udp::MAX_UDP_PAYLOAD`]).
pub const MAX_UDP_PAYLOAD: u16 = crate::udp::MAX_UDP_PAYLOAD as u16;

/// Endpoint settings for both ends (see [`transport`] on datagram size).
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut e = quinn::EndpointConfig::default();
    e.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("65507 is within QUIC's bounds");
    e
}

/// Binds a QUIC endpoint on `addr`, a server if `server` is given.
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(),
        server,
        crate::udp::bind(addr)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The page server's QUIC configuration: its certificate, and the CA a
/// client certificate must chain to. Clients without one are refused.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig, TlsError> {
    let roots = Arc::new(roots(&files.ca)?);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    let certs = read_certs(files.cert.as_deref().ok_or(TlsError::Empty {
        path: files.ca.clone(),
        what: "server certificate path",
    })?)?;
    let key = read_key(files.key.as_deref().ok_or(TlsError::Empty {
        path: files.ca.clone(),
        what: "server key path",
    })?)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ferry_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport()));
    Ok(cfg)
}

/// The source's QUIC configuration. Without `cert`/`key` the client offers
/// no certificate (only useful to test that the server refuses it).
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, TlsError> {
    let roots = roots(&files.ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match (&files.cert, &files.key) {
        (Some(c), Some(k)) => builder.with_client_auth_cert(read_certs(c)?, read_key(k)?)?,
        _ => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ferry_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport()));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_comes_first_and_nothing_is_dropped() {
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let all = rustls::crypto::ring::default_provider().cipher_suites.len();
        assert_eq!(suites.len(), all);
    }
}
