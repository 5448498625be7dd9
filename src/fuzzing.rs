//! Fuzz entry points, one per target of `fuzz/`, each over arbitrary bytes.
//! The targets call them and so does the corpus replay test
//! (`tests/fuzz_corpus.rs`), so the checked-in corpus runs on stable in
//! every `cargo test`. The wire targets live in `ferry_proto::fuzzing` and
//! the store files' in the disk store, next to the private code they reach;
//! this module adds the `/proc` parsers and the restore checks, and lists
//! every target. Each returns whether the input was accepted all the way
//! (the replay test requires it of the generated seeds). Not an API.

use std::borrow::Cow;

use ferry_page_server::store::disk::fuzzing::store_file;
pub use ferry_proto::fuzzing::{batch, batch_roundtrip, frame, session};
use ferry_proto::pb;

use crate::procfs::{self, ProcError};
use crate::{restore, state};

/// A target's entry point.
pub type Target = fn(&[u8]) -> bool;

/// Every target, by the name of its `fuzz/fuzz_targets/` file and corpus
/// directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame", frame),
    ("batch", batch),
    ("batch_roundtrip", batch_roundtrip),
    ("session", session),
    ("image", image),
    ("procfs", procfs),
];

/// `data` as a file of the disk store (see `store_file`); whatever of it
/// decodes as a process tree then goes through the checks a restore makes
/// before it touches anything: they may refuse it, never panic. Those
/// checks `stat` the paths the tree names and read `/proc/self/maps`,
/// nothing more. True if `data` is a valid record.
pub fn image(data: &[u8]) -> bool {
    let f = store_file(data);
    if let Some(tree) = &f.tree {
        check_tree(tree);
    }
    f.record
}

fn check_tree(tree: &pb::ProcessTree) {
    for p in &tree.processes {
        for t in &p.threads {
            if let Some(regs) = state::regs_from_bytes(&t.gpregs) {
                assert_eq!(state::regs_to_bytes(&regs), t.gpregs, "gpregs codec");
            }
        }
        let _ = restore::check_fds(&p.fds);
        let _ = restore::check_mappings(&p.vmas);
    }
    let vmas = tree
        .processes
        .first()
        .map(|p| p.vmas.clone())
        .unwrap_or_default();
    let _ = restore::check(tree, &vmas);
}

/// `data`, converted lossily as the readers do, through every pure `/proc`
/// parser. Errors must name a line the text has; what parses must hold
/// together (mappings non-empty, ascending, disjoint and convertible to
/// the image's form, the same ids from `parse_status` and `parse_creds`,
/// limits sorted and known, personality printable back). True if any
/// parser accepted it.
pub fn procfs(data: &[u8]) -> bool {
    let text: Cow<str> = String::from_utf8_lossy(data);
    let text = &*text;
    // One-line files (stat, personality) say line 1 even when empty.
    let lines = text.lines().count().max(1);
    let line_ok = |e: &ProcError| match e {
        ProcError::Parse { line, .. } => {
            assert!(*line <= lines, "error names line {line} of {lines}")
        }
        e => panic!("a parser did I/O: {e}"),
    };
    let mut any = false;
    let mut ok = |r: Result<(), ProcError>| match r {
        Ok(()) => any = true,
        Err(e) => line_ok(&e),
    };

    ok(procfs::parse_maps(text).map(|maps| {
        for w in maps.windows(2) {
            assert!(w[0].end <= w[1].start, "maps overlap or are unsorted");
        }
        for m in &maps {
            assert!(m.start < m.end && !m.is_empty());
            assert_eq!(m.kind() == pb::VmaKind::File, m.is_file());
            if m.file_path().is_some() {
                assert!(m.path.as_deref().is_some_and(|p| p.starts_with('/')));
            }
            let v = m.to_vma();
            assert_eq!((v.start, v.end, v.kind()), (m.start, m.end, m.kind()));
        }
        procfs::dumpable_bytes(&maps);
    }));
    let status = procfs::parse_status(text);
    let creds = procfs::parse_creds(text);
    if let (Ok(s), Ok(c)) = (&status, &creds) {
        assert_eq!((s.uid, s.gid, s.cap_eff), (c.uid, c.gid, c.cap_eff));
    }
    ok(status.map(drop));
    ok(creds.map(drop));
    ok(procfs::parse_fdinfo(text).map(drop));
    ok(procfs::parse_stat_starttime(text).map(drop));
    ok(procfs::parse_stat_fields(text).map(drop));
    ok(procfs::parse_limits(text).map(|limits| {
        assert!(!limits.is_empty());
        for w in limits.windows(2) {
            assert!(w[0].0 <= w[1].0, "limits unsorted");
        }
        assert!(limits.iter().all(|l| l.0 < 16), "unknown resource");
    }));
    ok(procfs::parse_personality(text).map(|p| {
        assert_eq!(procfs::parse_personality(&format!("{p:x}")).ok(), Some(p));
    }));
    any
}
