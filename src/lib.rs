//! ferry: live migration of Linux processes by iterative, disk-less
//! pre-copy over QUIC.
//!
//! Map of the crate:
//! - [`client`]: the source's QUIC client; streams layers of pages to a
//!   page server over several data streams.
//! - [`certs`]: `ferry certs init`, the CA and identities for mutual TLS.
//! - [`clocks`]: a process's monotonic and boot clocks, kept going across
//!   hosts by a time namespace.
//! - [`demo`]: `ferry demo`, the transfer path end to end on loopback.
//! - [`procfs`]: `/proc` introspection, pure parsers over fixture text.
//! - [`policy`]: when to stop pre-dumping, as a pure function.
//! - [`track`]: dirty-page tracking backends (uffd-wp, soft-dirty,
//!   checksum) behind one trait.
//! - [`dump`]: `ferry dump`, rounds of pre-dump, freeze, final delta.
//! - [`state`]: the process state captured at the freeze.
//! - [`tree`]: process trees: discovery, freezing them together, and the
//!   address-space tags that keep their pages apart in one image.
//! - [`shmem`]: shared memory of a tree (`MAP_SHARED` anonymous memory,
//!   memfds): each object's pages sent once, made once on the destination.
//! - [`restore`]: ptrace-driven restore of an image into a new process.
//! - [`creds`]: credentials of a restored process: exactly the image's,
//!   or refused when the page server cannot give them.
//! - [`pace`]: the bandwidth cap (`--max-rate`) shared by the data
//!   streams.
//! - [`migrate`]: `ferry migrate`, dump + restore on the destination + kill
//!   of the source, as one transaction.
//! - [`postcopy`]: `ferry migrate --post-copy`, serving the pages the
//!   resumed destination still lacks from the frozen source.
//! - [`readygo`]: the destination's two-phase end: a restored process held
//!   stopped until the source says `Go`, else killed.
//! - [`sys`]: every raw syscall and `unsafe` block of ferry (ptrace and
//!   syscall injection, userfaultfd, `PAGEMAP_SCAN`, `process_vm_readv`)
//!   behind safe wrappers.
//! - `fuzzing` (hidden): the entry points of the fuzz targets in `fuzz/`.
//!
//! The wire protocol lives in `ferry-proto`, the destination in
//! `ferry-page-server`.

pub mod bench;
pub mod certs;
pub mod client;
pub mod clocks;
pub mod creds;
pub mod demo;
pub mod dump;
pub mod failpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod loopback;
pub mod migrate;
pub mod pace;
pub mod pidns;
pub mod policy;
pub mod postcopy;
pub mod procfs;
pub mod readygo;
pub mod restore;
pub mod sched;
pub mod shmem;
pub mod sockets;
pub mod state;
pub mod synthetic;
pub mod sys;
pub mod track;
pub mod tree;
pub mod workload;

pub use ferry_page_server as page_server;
pub use ferry_proto as proto;
