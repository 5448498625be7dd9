//! The preamble of the plain-TCP baseline transport.
//!
//! QUIC gives a migration one connection with a control stream and several
//! data streams. Plain TCP has no streams, so each of them is a connection
//! of its own, and the page server must learn from the first bytes what a
//! connection is and which session it belongs to: a fixed-size preamble of
//! magic, version, kind (control or data) and a random 16-byte token the
//! source chose for its control connection and repeats on each of its data
//! connections. After the preamble the bytes are exactly those a QUIC
//! stream of the same kind carries (see [`crate::frame`]).
//!
//! The token is a routing label, not a credential: anyone who sees the
//! traffic of this unencrypted transport sees it too. That is why the
//! transport is a loopback benchmark baseline and nothing more.

/// First bytes of every ferry TCP connection.
pub const MAGIC: [u8; 4] = *b"FRYT";
/// Version of the preamble and of the TCP transport's conventions.
pub const VERSION: u8 = 1;
/// Size of a preamble on the wire: magic, version, kind, token.
pub const LEN: usize = 4 + 1 + 1 + 16;

/// What a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The control stream: one per session, opened first.
    Control,
    /// A data stream of the session whose control connection has the token.
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub kind: Kind,
    pub token: [u8; 16],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreambleError {
    #[error("not a ferry TCP connection (it starts with {0:02x?}, not \"FRYT\")")]
    Magic([u8; 4]),
    #[error("ferry TCP preamble version {0}; this build speaks version {VERSION}")]
    Version(u8),
    #[error("unknown ferry TCP connection kind {0} (0 is control, 1 is data)")]
    Kind(u8),
}

impl Preamble {
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = match self.kind {
            Kind::Control => 0,
            Kind::Data => 1,
        };
        out[6..].copy_from_slice(&self.token);
        out
    }

    /// Checks magic, version and kind, in that order, so a stranger (an
    /// HTTP request, a port scan) is named as such rather than as a bad
    /// version.
    pub fn decode(b: &[u8; LEN]) -> Result<Preamble, PreambleError> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[..4]);
        if magic != MAGIC {
            return Err(PreambleError::Magic(magic));
        }
        if b[4] != VERSION {
            return Err(PreambleError::Version(b[4]));
        }
        let kind = match b[5] {
            0 => Kind::Control,
            1 => Kind::Data,
            k => return Err(PreambleError::Kind(k)),
        };
        let mut token = [0u8; 16];
        token.copy_from_slice(&b[6..]);
        Ok(Preamble { kind, token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for kind in [Kind::Control, Kind::Data] {
            let p = Preamble {
                kind,
                token: [0x5a; 16],
            };
            assert_eq!(Preamble::decode(&p.encode()), Ok(p));
        }
    }

    #[test]
    fn strangers_and_mismatches_are_named() {
        let good = Preamble {
            kind: Kind::Data,
            token: [1; 16],
        }
        .encode();
        let mut http = [b' '; LEN];
        http[..4].copy_from_slice(b"GET ");
        assert_eq!(Preamble::decode(&http), Err(PreambleError::Magic(*b"GET ")));
        let mut v = good;
        v[4] = 2;
        assert_eq!(Preamble::decode(&v), Err(PreambleError::Version(2)));
        let mut k = good;
        k[5] = 7;
        assert_eq!(Preamble::decode(&k), Err(PreambleError::Kind(7)));
        assert!(Preamble::decode(&[0u8; LEN])
            .unwrap_err()
            .to_string()
            .contains("not a ferry TCP connection"));
    }
}
