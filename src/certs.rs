//! `ferry certs init`: a private CA and the two identities of a migration,
//! the page server's and the source's.
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

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "ferry CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;

    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let cn = names[0].clone();
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
        Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
    };
    let mut server_names = vec![SERVER_NAME.to_string()];
    server_names.extend(extra_names.iter().cloned());
    let (server_pem, server_key) = leaf(server_names, ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_pem, client_key) = leaf(
        vec![CLIENT_NAME.to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
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
        let path = dir.join(name);
        // Remove first: `mode` only applies to a file being created, and a
        // key must never be left readable by others from an older file.
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("replacing", &path)(e)),
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io("creating", &path))?;
        f.write_all(body.as_bytes()).map_err(io("writing", &path))?;
        f.sync_all().map_err(io("syncing", &path))?;
        written.push(path);
    }
    Ok(Written { files: written })
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
}
