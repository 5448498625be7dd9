//! The destination side of ferry: a QUIC page server that receives a
//! migration's rounds as layers and keeps them in memory or on disk.
//!
//! - [`access`]: the optional allow-list of client certificates.
//! - [`fates`]: what became of recent two-phase sessions, for `Query`.
//! - [`limits`]: sizes and defaults of the page server's limits.
//! - [`tls`]: mutual TLS; no peer without a certificate from the
//!   configured CA reaches a session.
//! - [`server`]: the endpoint and the per-connection session driver around
//!   `ferry_proto::session::Receiver`.
//! - `transport`: what the session driver needs from a connection, for
//!   QUIC and for [`tcp`], the unencrypted benchmark baseline.
//! - [`lazy`]: post-copy: serving the faults of a process restored with
//!   pages missing, and placing the pages the source pushes.
//! - [`store`]: layered images, `mem` and `disk`, behind one trait.
//! - [`udp`]: the UDP socket under QUIC, for datagrams up to 64 KiB.

pub mod access;
pub mod fates;
pub mod lazy;
pub mod limits;
pub mod server;
pub mod store;
pub mod tcp;
pub mod tls;
mod transport;
pub mod udp;

pub use lazy::{LazyEvent, LazyProcess};
pub use server::{
    Config, PageServer, PreparedProcess, Released, RestoredPid, Restorer, Transport, WarmRestore,
    RAN_THEN_KILLED,
};
