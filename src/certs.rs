//! `ferry certs init`: a private CA and the two identities of a migration,
//! the page server's and the source's; `ferry certs client`: one more
//! source identity from the same CA, under its own name, for a page server
//! that allows only some sources in (`--allow-client CN=NAME`).
//!
//! Both ends of a migration hold the same CA; the page server accepts only
//! clients whose certificate it signed. Keys are written with mode 0600 and
//! never overwritten by accident: an existing directory with keys in it is
//! refused unless asked to replace them.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ferry_page_server::tls::SERVER_NAME;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Name in the client certificate (informational: trust is the CA's).
pub const CLIENT_NAME: &str = "ferry-source";

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already holds keys; pass --force to replace them")]
    Exists(PathBuf),
    #[error("client name {0:?}: use letters, digits, '.', '_' and '-' only")]
    BadName(String),
}

/// The CA's parameters. `ferry certs client` rebuilds the CA certificate
/// from them and `ca.key` (rcgen cannot parse `ca.pem` without extra
/// dependencies); a certificate is only ever checked against the CA by
/// subject name and key, which are the same.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "ferry CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// A leaf certificate and its key (PEM), named `names[0]` (CN and SAN).
fn leaf(
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    ca_cert: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> Result<(String, String), rcgen::Error> {
    let cn = names.first().cloned().unwrap_or_default();
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, ca_cert, ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What `init` wrote.
#[derive(Debug)]
pub struct Written {
    pub files: Vec<PathBuf>,
}

/// Writes `ca.pem`, `ca.key`, `server.pem`, `server.key`, `client.pem` and
/// `client.key` into `dir`. `extra_names` are added to the server
/// certificate's names (the client always checks [`SERVER_NAME`]).
pub fn init(dir: &Path, extra_names: &[String], force: bool) -> Result<Written, CertsError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| CertsError::Io { op, path, source }
    };
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    if !force && dir.join("ca.key").exists() {
        return Err(CertsError::Exists(dir.to_path_buf()));
    }

    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;

    let mut server_names = vec![SERVER_NAME.to_string()];
    server_names.extend(extra_names.iter().cloned());
    let (server_pem, server_key) = leaf(
        server_names,
        ExtendedKeyUsagePurpose::ServerAuth,
        &ca_cert,
        &ca_key,
    )?;
    let (client_pem, client_key) = leaf(
        vec![CLIENT_NAME.to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
        &ca_cert,
        &ca_key,
    )?;

    let files = [
        ("ca.pem", ca_cert.pem(), 0o644),
        ("ca.key", ca_key.serialize_pem(), 0o600),
        ("server.pem", server_pem, 0o644),
        ("server.key", server_key, 0o600),
        ("client.pem", client_pem, 0o644),
        ("client.key", client_key, 0o600),
    ];
    let mut written = Vec::new();
    for (name, body, mode) in files {
        written.push(write_file(dir, name, &body, mode)?);
    }
    Ok(Written { files: written })
}

/// Issues one more client identity from the CA in `dir` (which needs
/// `ca.key`): `NAME.pem` and `NAME.key`, with common name `NAME`.
pub fn issue_client(dir: &Path, name: &str) -> Result<Written, CertsError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('.');
    if !ok || ["ca", "server", "client"].contains(&name) {
        return Err(CertsError::BadName(name.into()));
    }
    let key_path = dir.join("ca.key");
    let pem = fs::read_to_string(&key_path).map_err(|source| CertsError::Io {
        op: "reading",
        path: key_path,
        source,
    })?;
    let ca_key = KeyPair::from_pem(&pem)?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;
    let (cert, key) = leaf(
        vec![name.to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
        &ca_cert,
        &ca_key,
    )?;
    Ok(Written {
        files: vec![
            write_file(dir, &format!("{name}.pem"), &cert, 0o644)?,
            write_file(dir, &format!("{name}.key"), &key, 0o600)?,
        ],
    })
}

fn write_file(dir: &Path, name: &str, body: &str, mode: u32) -> Result<PathBuf, CertsError> {
    let path = dir.join(name);
    let io = |op| {
        let path = path.clone();
        move |source| CertsError::Io { op, path, source }
    };
    // Remove first: `mode` only applies to a file being created, and a key
    // must never be left readable by others from an older file.
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("replacing")(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(io("creating"))?;
    f.write_all(body.as_bytes()).map_err(io("writing"))?;
    f.sync_all().map_err(io("syncing"))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_keys_private_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let w = init(dir.path(), &["dst.example".into()], false).unwrap();
        assert_eq!(w.files.len(), 6);
        for k in ["ca.key", "server.key", "client.key"] {
            let mode = fs::metadata(dir.path().join(k))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{k}");
        }
        assert!(matches!(
            init(dir.path(), &[], false),
            Err(CertsError::Exists(_))
        ));
        init(dir.path(), &[], true).unwrap();
        // The files load as a TLS configuration on both ends.
        use ferry_page_server::tls::{client_config, server_config, TlsFiles};
        server_config(&TlsFiles::server(dir.path())).unwrap();
        client_config(&TlsFiles::client(dir.path())).unwrap();
    }

    #[test]
    fn issued_clients_carry_their_name_and_chain_to_the_ca() {
        use ferry_page_server::access::{common_name, pem_fingerprint};
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], false).unwrap();
        let w = issue_client(dir.path(), "node-7").unwrap();
        assert_eq!(w.files.len(), 2);
        let pem = dir.path().join("node-7.pem");
        let der = CertificateDer::from_pem_file(&pem).unwrap();
        assert_eq!(common_name(&der).as_deref(), Some("node-7"));
        let default = CertificateDer::from_pem_file(dir.path().join("client.pem")).unwrap();
        assert_eq!(common_name(&default).as_deref(), Some(CLIENT_NAME));
        assert_ne!(
            pem_fingerprint(&pem).unwrap(),
            pem_fingerprint(&dir.path().join("client.pem")).unwrap()
        );
        // It verifies against the CA as a client certificate.
        use ferry_page_server::tls::{client_config, TlsFiles};
        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: Some(pem),
            key: Some(dir.path().join("node-7.key")),
        };
        client_config(&files).unwrap();
        for bad in ["", "../x", "a/b", "ca", "client", ".hidden", "a b"] {
            assert!(
                matches!(issue_client(dir.path(), bad), Err(CertsError::BadName(_))),
                "{bad}"
            );
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            issue_client(empty.path(), "x"),
            Err(CertsError::Io { .. })
        ));
    }
}
