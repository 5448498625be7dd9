//! The ferry wire protocol, with no I/O in it.
//!
//! A migration is one QUIC connection: a control stream carrying
//! length-delimited [`pb::Control`] messages and several unidirectional data
//! streams carrying page batches. This crate holds everything about that
//! protocol that can be decided without a socket or a clock, so it is tested
//! in memory, deterministically:
//!
//! - [`pb`]: the messages and the image model, generated from
//!   `schema/ferry.proto` (compiled by `protox` at build time, no `protoc`).
//! - [`frame`]: framing of both stream kinds, with hard size limits checked
//!   before anything is allocated.
//! - [`batch`]: page batches: runs of data and zero pages, zstd when it pays,
//!   and the digests that prove a layer arrived whole.
//! - [`session`]: the sender (source) and receiver (destination) state
//!   machines, and the protocol's sequence diagram.
//! - [`lazy`]: the page set post-copy still waits for, and fault latency
//!   figures.
//! - [`vma`]: address-range checks shared by both ends.
//! - [`preamble`]: how a connection of the plain-TCP baseline transport
//!   says what it carries (TCP has no streams: each is a connection).
//! - `fuzzing` (hidden): what the fuzz targets in `fuzz/` run on each input.

pub mod batch;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod lazy;
pub mod preamble;
pub mod session;
pub mod vma;

/// Generated protobuf types (`package ferry.v1`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/ferry.v1.rs"));
}

/// Protocol version spoken by this build. A peer with another version is
/// refused at the handshake, by name.
pub const PROTOCOL_VERSION: u32 = 1;

/// Hello feature: the source will commit with `restore` (a migration), so
/// the destination must be able to restore and checks it can, round by
/// round, before the source is ever frozen.
pub const FEATURE_RESTORE: &str = "restore";

/// Hello feature: the source asks for post-copy (see `PostCopy` in the
/// schema); a page server that can do it echoes it in `Welcome`, and the
/// source refuses to go on with one that does not.
pub const FEATURE_POST_COPY: &str = "post-copy";
/// Hello feature of `ferry migrate --keep-pids`: the restore makes a pid
/// namespace and keeps the process's pids, so it is done cold, at commit.
pub const FEATURE_KEEP_PIDS: &str = "keep-pids";

/// Hello feature: a thread of the process (tree) runs under seccomp, so
/// the destination must be able to install its filters (`CAP_SYS_ADMIN`);
/// one that cannot refuses before anything is frozen. Older page servers
/// ignore it.
pub const FEATURE_SECCOMP: &str = "seccomp";
/// Hello feature: the process (tree) holds POSIX timers, so the
/// destination's kernel must restore their ids
/// (`PR_TIMER_CREATE_RESTORE_IDS`, Linux 6.15).
pub const FEATURE_POSIX_TIMERS: &str = "posix-timers";

/// Batch layer of pages the destination asked for (post-copy).
pub const LAZY_URGENT_LAYER: u32 = u32::MAX;
/// Batch layer of pages the source pushes in the background (post-copy).
pub const LAZY_PUSH_LAYER: u32 = u32::MAX - 1;

/// Hello and Welcome feature: the two-phase end of a migration (`Ready`,
/// `Go`; see [`session`]). Used only when both sides name it, so either
/// side may be older.
pub const FEATURE_READY_GO: &str = "ready-go";

/// ALPN protocol id of a ferry connection.
pub const ALPN: &[u8] = b"ferry/1";

/// A session id: 16 random bytes chosen by the source.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// Parses the id from the wire; anything but 16 bytes is refused.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }

    /// Parses the 32-digit hex form used in directory names and the CLI.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionId({})", self.to_hex())
    }
}

/// Page sizes a session may use: powers of two from 4 KiB to 64 KiB.
pub fn valid_page_size(page_size: u32) -> bool {
    page_size.is_power_of_two() && (4096..=65536).contains(&page_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_hex_round_trip() {
        let id = SessionId([0xab; 16]);
        assert_eq!(SessionId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(SessionId::from_hex("zz"), None);
        assert_eq!(SessionId::from_hex(&"g".repeat(32)), None);
        assert_eq!(SessionId::from_slice(&[1, 2, 3]), None);
    }

    #[test]
    fn page_sizes() {
        assert!(valid_page_size(4096));
        assert!(valid_page_size(65536));
        assert!(!valid_page_size(0));
        assert!(!valid_page_size(4097));
        assert!(!valid_page_size(1 << 20));
    }
}
