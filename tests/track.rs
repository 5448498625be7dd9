//! The tracking invariant on a real process, per backend: after a round,
//! the fixture writes a known set of pages (in an old mapping, a newly
//! mapped region, pages dropped with MADV_DONTNEED, pages written from
//! outside with process_vm_writev); the next round must report every one of
//! them — uffd-wp exactly those, the others at least those. Needs root.

use std::collections::BTreeSet;

use ferry::procfs;
use ferry::sys::ptrace::Tracee;
use ferry::sys::vm;
use ferry::track::{self, Backend, Delta, TrackError, Tracker};

mod common;
use common::{is_root, Fixture};

const PS: u64 = 4096;

fn pages_in(d: &[(u64, u64)], lo: u64, hi: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for &(s, e) in d {
        let mut a = s.max(lo);
        while a < e.min(hi) {
            out.insert(a);
            a += PS;
        }
    }
    out
}

fn collect(t: &mut dyn Tracker, pid: i32) -> Delta {
    t.collect(&procfs::read_maps(pid).unwrap()).unwrap()
}

fn check(backend: Backend) {
    let mut fx = Fixture::start(&["--mib", "16"]);
    fx.cmd("pause");
    fx.cmd("freeze-counter");
    let (base, end) = (fx.base, fx.base + fx.len);
    // Make the pages the test drops or writes from outside present first,
    // so "changed" is unambiguous.
    fx.cmd("write 20 21 30");
    let tracee = Tracee::seize(fx.pid).unwrap();
    let mut t = track::choose(&tracee, Some(backend)).unwrap();
    let first = collect(t.as_mut(), fx.pid);
    assert!(
        pages_in(&first.data, base, end).len() > 3000,
        "round 0 sends the region"
    );
    let quiet = collect(t.as_mut(), fx.pid);
    if backend == Backend::UffdWp {
        assert!(
            pages_in(&quiet.data, base, end).is_empty(),
            "nothing written yet"
        );
    }

    fx.cmd("write 1 5 9");
    let new = u64::from_str_radix(fx.cmd("mmap 4").trim_start_matches("0x"), 16).unwrap();
    fx.cmd("dontneed 20 2");
    vm::write(fx.pid, base + 30 * PS + 100, b"written from outside").unwrap();

    let d = collect(t.as_mut(), fx.pid);
    let want: BTreeSet<u64> = [1, 5, 9, 20, 21, 30]
        .iter()
        .map(|i| base + i * PS)
        .collect();
    let got = pages_in(&d.data, base, end);
    if backend == Backend::UffdWp {
        assert_eq!(got, want, "uffd-wp reports exactly the written pages");
    } else {
        assert!(
            got.is_superset(&want),
            "{backend:?} missed {:?}",
            want.difference(&got)
        );
    }
    let new_pages = pages_in(&d.data, new, new + 4 * PS);
    assert_eq!(new_pages.len(), 4, "a new mapping is sent whole");

    // A failed round puts its pages back: the next round reports them again.
    t.put_back(&d);
    let again = collect(t.as_mut(), fx.pid);
    assert!(pages_in(&again.data, base, end).is_superset(&want));
    drop(t);
    tracee.detach(false).unwrap();
}

#[test]
fn uffd_wp_reports_exactly_the_written_pages() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    check(Backend::UffdWp);
}

#[test]
fn checksum_reports_at_least_the_written_pages() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    check(Backend::Checksum);
}

#[test]
fn soft_dirty_is_refused_clearly_where_the_kernel_lacks_it() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let fx = Fixture::start(&["--mib", "1"]);
    let tracee = Tracee::seize(fx.pid).unwrap();
    match track::choose(&tracee, Some(Backend::SoftDirty)) {
        Ok(_) => eprintln!("soft-dirty works on this kernel"),
        Err(e) => {
            assert!(matches!(e, TrackError::SoftDirtyUnavailable));
            assert!(e.to_string().contains("CONFIG_MEM_SOFT_DIRTY"));
        }
    }
    // Auto never picks a backend that does not work.
    let t = track::choose(&tracee, None).unwrap();
    assert_ne!(t.backend(), Backend::SoftDirty);
}
