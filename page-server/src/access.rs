//! Who may migrate in: an optional allow-list of client certificates, on
//! top of mutual TLS.
//!
//! Mutual TLS already refuses any client whose certificate the CA did not
//! sign. The CA may sign more than one source, though, and a page server
//! with `--restore` runs what it is sent as root, so an operator can narrow
//! it down to certain certificates: by SHA-256 fingerprint of the DER
//! certificate (one exact certificate, immune to a CA issuing a second one
//! with the same name) or by subject common name (`CN=NAME`, which survives
//! reissuing a certificate). The check runs right after the handshake,
//! before any session exists.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error(
        "allow-list entry {0:?}: expected a SHA-256 fingerprint (64 hex digits, optionally \
         prefixed with sha256: and separated by colons; see `ferry certs fingerprint FILE.pem`) \
         or CN=NAME"
    )]
    Entry(String),
    #[error("reading the allow-list {path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}: no certificate in it")]
    NoCert { path: PathBuf },
}

/// SHA-256 of a certificate's DER bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// Parses `sha256:ab12…`, `AB:12:…` or plain hex.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let s = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .unwrap_or(s);
        let hex: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(hex.chunks(2)) {
            let pair = std::str::from_utf8(pair).ok()?;
            *o = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The client certificates that may start a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    fingerprints: BTreeSet<Fingerprint>,
    names: BTreeSet<String>,
}

/// Why a client was refused by the allow-list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "client certificate {fingerprint}{} is not on this page server's allow-list",
    cn.as_ref().map(|c| format!(" (CN={c})")).unwrap_or_default()
)]
pub struct NotAllowed {
    pub fingerprint: Fingerprint,
    pub cn: Option<String>,
}

impl AllowList {
    /// Adds one entry: a fingerprint or `CN=NAME`.
    pub fn add(&mut self, entry: &str) -> Result<(), AccessError> {
        let e = entry.trim();
        if let Some(name) = e.strip_prefix("CN=").or_else(|| e.strip_prefix("cn=")) {
            if name.is_empty() {
                return Err(AccessError::Entry(entry.into()));
            }
            self.names.insert(name.to_string());
        } else {
            let fp = Fingerprint::parse(e).ok_or_else(|| AccessError::Entry(entry.into()))?;
            self.fingerprints.insert(fp);
        }
        Ok(())
    }

    /// Adds the entries of a file: one per line, `#` starts a comment.
    pub fn add_text(&mut self, text: &str) -> Result<(), AccessError> {
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                self.add(line)?;
            }
        }
        Ok(())
    }

    pub fn add_file(&mut self, path: &Path) -> Result<(), AccessError> {
        let text = std::fs::read_to_string(path).map_err(|e| AccessError::File {
            path: path.into(),
            msg: e.to_string(),
        })?;
        self.add_text(&text).map_err(|e| AccessError::File {
            path: path.into(),
            msg: e.to_string(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty() && self.names.is_empty()
    }

    pub fn len(&self) -> usize {
        self.fingerprints.len() + self.names.len()
    }

    /// Whether the client certificate `der` (already verified against the
    /// CA) may start a session.
    pub fn check(&self, der: &[u8]) -> Result<(), NotAllowed> {
        let fingerprint = Fingerprint::of(der);
        let cn = common_name(der);
        if self.fingerprints.contains(&fingerprint)
            || cn.as_ref().is_some_and(|c| self.names.contains(c))
        {
            Ok(())
        } else {
            Err(NotAllowed { fingerprint, cn })
        }
    }
}

/// The fingerprint of the first certificate in a PEM file (what
/// `ferry certs fingerprint` prints).
pub fn pem_fingerprint(path: &Path) -> Result<Fingerprint, AccessError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut certs = CertificateDer::pem_file_iter(path).map_err(|e| AccessError::File {
        path: path.into(),
        msg: e.to_string(),
    })?;
    match certs.next() {
        Some(Ok(c)) => Ok(Fingerprint::of(&c)),
        Some(Err(e)) => Err(AccessError::File {
            path: path.into(),
            msg: e.to_string(),
        }),
        None => Err(AccessError::NoCert { path: path.into() }),
    }
}

/// One DER element: tag, contents, and the rest after it. `None` for
/// anything malformed (the certificate was verified already, so this only
/// guards against a panic, never decides trust).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l0, b) = b.split_first()?;
    let (len, b) = if l0 < 0x80 {
        (l0 as usize, b)
    } else {
        let n = (l0 & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
        (len, &b[n..])
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

/// The subject common name (OID 2.5.4.3) of a DER certificate.
pub fn common_name(cert: &[u8]) -> Option<String> {
    const SEQ: u8 = 0x30;
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let (SEQ, cert, _) = der(cert)? else {
        return None;
    };
    let (SEQ, tbs, _) = der(cert)? else {
        return None;
    };
    // tbsCertificate: [0] version (optional), serial, signature algorithm,
    // issuer, validity, subject.
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der(rest)?.2;
    }
    for _ in 0..4 {
        rest = der(rest)?.2;
    }
    let (SEQ, mut rdns, _) = der(rest)? else {
        return None;
    };
    while !rdns.is_empty() {
        let (_, set, next) = der(rdns)?;
        rdns = next;
        let mut atvs = set;
        while !atvs.is_empty() {
            let (_, atv, next) = der(atvs)?;
            atvs = next;
            let (0x06, oid, value) = der(atv)? else {
                continue;
            };
            if oid == CN_OID {
                let (_, v, _) = der(value)?;
                return String::from_utf8(v.to_vec()).ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_cn(cn: &str) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec![cn.to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "ferry test");
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let fp = Fingerprint([0xab; 32]);
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        for s in [
            hex.clone(),
            format!("sha256:{hex}"),
            colons,
            format!(" {hex} "),
        ] {
            assert_eq!(Fingerprint::parse(&s), Some(fp), "{s}");
        }
        assert_eq!(fp.to_string(), format!("sha256:{hex}"));
        assert_eq!(Fingerprint::parse(&fp.to_string()), Some(fp));
        for bad in [
            "",
            "ab",
            &"ab".repeat(31),
            &"zz".repeat(32),
            &"ab".repeat(33),
        ] {
            assert_eq!(Fingerprint::parse(bad), None, "{bad}");
        }
        // Not a multibyte panic: 64 bytes, not 64 hex digits.
        assert_eq!(Fingerprint::parse(&"é".repeat(32)), None);
    }

    #[test]
    fn common_name_is_read_from_the_subject_not_the_issuer() {
        let der = cert_with_cn("source-a");
        assert_eq!(common_name(&der).as_deref(), Some("source-a"));
        // Every truncation of a certificate is handled without a panic.
        for n in 0..der.len() {
            let _ = common_name(&der[..n]);
        }
        assert_eq!(common_name(b""), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn allow_list_matches_by_fingerprint_or_name() {
        let a = cert_with_cn("source-a");
        let b = cert_with_cn("source-b");
        let c = cert_with_cn("source-a");

        let mut by_fp = AllowList::default();
        by_fp.add(&Fingerprint::of(&a).to_string()).unwrap();
        by_fp.check(&a).unwrap();
        let e = by_fp.check(&b).unwrap_err();
        assert_eq!(e.fingerprint, Fingerprint::of(&b));
        assert_eq!(e.cn.as_deref(), Some("source-b"));
        let msg = e.to_string();
        assert!(msg.contains(&Fingerprint::of(&b).to_string()), "{msg}");
        assert!(
            msg.contains("CN=source-b") && msg.contains("allow-list"),
            "{msg}"
        );
        // Same name, another certificate: a fingerprint is exact.
        assert!(by_fp.check(&c).is_err());

        let mut by_name = AllowList::default();
        by_name.add("CN=source-a").unwrap();
        by_name.check(&a).unwrap();
        by_name.check(&c).unwrap();
        assert!(by_name.check(&b).is_err());
        // Names match whole and case-sensitively.
        let mut partial = AllowList::default();
        partial.add("CN=source").unwrap();
        partial.add("CN=SOURCE-A").unwrap();
        assert!(partial.check(&a).is_err());

        assert!(AllowList::default().check(&a).is_err());
        assert!(AllowList::default().is_empty());
    }

    #[test]
    fn allow_list_files_have_comments_and_refuse_bad_entries() {
        let fp = Fingerprint([7; 32]);
        let mut l = AllowList::default();
        l.add_text(&format!(
            "# sources of the batch cluster\n\n{fp}  # node 1\n  CN=node-2\n#CN=old\n"
        ))
        .unwrap();
        assert_eq!(l.len(), 2);
        let mut want = AllowList::default();
        want.add(&fp.to_string()).unwrap();
        want.add("CN=node-2").unwrap();
        assert_eq!(l, want);

        for bad in ["node-1", "CN=", "sha256:1234", "O=ferry"] {
            assert_eq!(
                AllowList::default().add(bad),
                Err(AccessError::Entry(bad.into()))
            );
        }
        let e = AllowList::default().add_text("CN=a\nbogus\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = AllowList::default()
            .add_file(Path::new("/nonexistent/allow"))
            .unwrap_err();
        assert!(matches!(e, AccessError::File { .. }), "{e}");
    }
}
