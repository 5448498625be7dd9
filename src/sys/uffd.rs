//! Dirty-page tracking of another process with userfaultfd write-protect in
//! async mode (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7), the recipe of
//! `probes/p2_uffdwp.c`.
//!
//! A userfaultfd is bound to the memory of the process that creates it, so
//! it is created *inside* the target by an injected `userfaultfd()` call,
//! copied out with `pidfd_getfd`, and the target's own copy is closed
//! again by injection (on every path: the target is never left with a stray
//! fd). From then on ferry holds the only reference; closing it (dropping
//! [`WriteProtect`]) ends tracking and the kernel unregisters everything.
//!
//! Each registered range is write-protected once ("armed") when it is
//! registered. In async mode a write to a protected page does not stop the
//! writer: the kernel just lifts the protection (about 1.2 µs on the first
//! write of a page). `PAGEMAP_SCAN` with `PAGE_IS_WRITTEN` and
//! `PM_SCAN_WP_MATCHING` then returns the pages written since the last scan
//! and protects them again in the same step, so no write can fall between
//! reporting and re-arming. Writes by `process_vm_writev` count, and pages
//! zapped by `MADV_DONTNEED` are reported as written (they are, to zero).
//! A write-protected transparent huge page splits on its first write, so
//! only the written 4 KiB page is reported.
//!
//! The order that keeps the invariant ("a round reports every page written
//! since the previous one"): [`WriteProtect::register`] first, which arms
//! the range, then read its contents ([`WriteProtect::scan_present`] and
//! [`super::vm::read_ranges`]); any write after the arming is reported by
//! the next [`WriteProtect::scan_written`].
//!
//! The trap (DESIGN.md §8): with `PM_SCAN_CHECK_WPASYNC`, a scan that
//! reaches a mapping not registered with us fails with `EPERM` *after*
//! re-protecting what it walked before it. [`WriteProtect::scan_written`]
//! therefore only scans inside one range registered here, and if the
//! target replaced a mapping meanwhile (so the kernel refuses anyway), the
//! pages reported before the failure are still appended to the output and
//! the error ([`UffdError::Stale`]) says that the range needs a fresh look.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use nix::errno::Errno;

use super::pagemap::{
    append_merged, Pagemap, PagemapError, Region, PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
};
use super::ptrace::{PtraceError, Tracee};
use super::{ior, iowr, page_size, USER_ADDR_END};

/// Unpopulated pages (no pte yet) can be write-protected, so a first write
/// to never-touched memory is reported too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Write faults on protected pages are resolved by the kernel, no handler.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const REQUIRED: u64 = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;

/// `userfaultfd()` flag: handle only faults from user mode, which an
/// unprivileged process may ask for when `vm.unprivileged_userfaultfd` is 0.
/// With async write-protect no fault is ever handed to a handler, so this
/// changes nothing for tracking.
const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

const UFFDIO_API: u64 = iowr::<UffdioApi>(0xaa, 0x3f);
const UFFDIO_REGISTER: u64 = iowr::<UffdioRegister>(0xaa, 0x00);
const UFFDIO_UNREGISTER: u64 = ior::<UffdioRange>(0xaa, 0x01);

/// Errors of userfaultfd write-protect tracking.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Injecting a syscall into the target failed.
    #[error("injecting {what} into the target: {source}")]
    Inject {
        what: &'static str,
        #[source]
        source: PtraceError,
    },
    /// The kernel's userfaultfd lacks async write-protect.
    #[error(
        "this kernel's userfaultfd lacks {missing} (features {available:#x}); \
         uffd-wp tracking needs WP_ASYNC and WP_UNPOPULATED (Linux 6.7)"
    )]
    Unsupported { missing: String, available: u64 },
    /// `pidfd_open`/`pidfd_getfd` failed.
    #[error("{op} on process {pid}: {errno}")]
    Fd {
        op: &'static str,
        pid: i32,
        errno: Errno,
    },
    /// `UFFDIO_API` failed.
    #[error("UFFDIO_API: {0}")]
    Api(Errno),
    /// The kernel refuses to register this range for write-protect
    /// (`[vdso]`, `[vvar]`, `VM_PFNMAP`/`VM_IO` mappings, ranges with holes
    /// or registered elsewhere). The caller falls back for this range.
    #[error("the kernel refuses to register {start:#x}-{end:#x} for write-protect: {errno}")]
    Unregistrable { start: u64, end: u64, errno: Errno },
    /// The range is not inside one range registered here: scanning it could
    /// reach an unregistered mapping and lose pages, so it was not scanned.
    #[error("{start:#x}-{end:#x} is not inside one registered range")]
    NotRegistered { start: u64, end: u64 },
    /// The scan reached a mapping that is no longer registered (the target
    /// replaced it since). The pages found before it were appended to the
    /// output; the rest of the range was not scanned.
    #[error(
        "{start:#x}-{end:#x} reached a mapping that is no longer registered (replaced \
         since); the pages reported before it were kept"
    )]
    Stale { start: u64, end: u64 },
    /// Another `PAGEMAP_SCAN` or pagemap failure.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    /// An ioctl on the userfaultfd failed.
    #[error("{op} of {start:#x}-{end:#x}: {errno}")]
    Ioctl {
        op: &'static str,
        start: u64,
        end: u64,
        errno: Errno,
    },
}

/// Write-protect tracking of one process. See the module documentation.
pub struct WriteProtect {
    pid: i32,
    uffd: OwnedFd,
    pagemap: Pagemap,
    /// Registered ranges, sorted, disjoint, adjacent ones merged.
    ranges: Vec<(u64, u64)>,
    regions: Vec<Region>,
}

impl WriteProtect {
    /// Creates a userfaultfd inside the target through `tracee`, takes it
    /// over, and enables async write-protect on it. Nothing is registered
    /// yet.
    pub fn arm(tracee: &Tracee) -> Result<WriteProtect, UffdError> {
        let pid = tracee.pid();
        // Refuse before touching the target if the kernel cannot do it.
        if let Some(available) = kernel_features() {
            let missing = REQUIRED & !available;
            if missing != 0 {
                return Err(UffdError::Unsupported {
                    missing: feature_names(missing),
                    available,
                });
            }
        }
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let remote = match tracee.syscall(libc::SYS_userfaultfd, &[flags]) {
            Err(PtraceError::SyscallFailed {
                errno: Errno::EPERM,
                ..
            }) => tracee.syscall(libc::SYS_userfaultfd, &[flags | UFFD_USER_MODE_ONLY]),
            r => r,
        }
        .map_err(|source| UffdError::Inject {
            what: "userfaultfd()",
            source,
        })?;
        let copied = take_fd(pid, remote as RawFd);
        let closed = tracee.syscall(libc::SYS_close, &[remote as u64]);
        let uffd = copied?;
        closed.map_err(|source| UffdError::Inject {
            what: "close() of the target's userfaultfd",
            source,
        })?;
        if let Err(errno) = api_handshake(&uffd, REQUIRED) {
            return Err(match errno {
                Errno::EINVAL => UffdError::Unsupported {
                    missing: feature_names(REQUIRED),
                    available: 0,
                },
                errno => UffdError::Api(errno),
            });
        }
        Ok(WriteProtect {
            pid,
            uffd,
            pagemap: Pagemap::open(pid)?,
            ranges: Vec::new(),
            regions: Vec::new(),
        })
    }

    /// The tracked process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The parts of `[start, end)` the kernel does not track for us, merged:
    /// never registered, or replaced by a new mapping since (the kernel
    /// drops the registration with the old mapping). Scanning such a part
    /// for written pages would fail; its contents must be taken whole.
    pub fn untracked(&mut self, start: u64, end: u64) -> Result<Vec<(u64, u64)>, UffdError> {
        self.regions.clear();
        self.pagemap.scan(
            start,
            end,
            0,
            PAGE_IS_WPALLOWED,
            0,
            PAGE_IS_WPALLOWED,
            PAGE_IS_WPALLOWED,
            &mut self.regions,
        )?;
        let mut out = Vec::new();
        append_merged(&mut out, &self.regions);
        Ok(out)
    }

    /// Registers `[start, end)` (page aligned, mapped) for write-protect and
    /// arms the part of it that was not registered before: from the return
    /// on, every write there is reported by [`WriteProtect::scan_written`].
    /// Parts already registered keep their pending written pages. Read the
    /// contents after this call, not before.
    ///
    /// Ranges the kernel refuses give [`UffdError::Unregistrable`].
    pub fn register(&mut self, start: u64, end: u64) -> Result<(), UffdError> {
        let ps = page_size();
        if start % ps != 0 || end % ps != 0 {
            return Err(PagemapError::Unaligned { start, end }.into());
        }
        if start >= end {
            return Ok(());
        }
        if end > USER_ADDR_END {
            // [vsyscall] and anything else outside user space.
            return Err(UffdError::Unregistrable {
                start,
                end,
                errno: Errno::EINVAL,
            });
        }
        // What the kernel does not yet track for us, whatever our list says
        // (the target may have replaced a mapping): only that gets armed.
        let fresh = self.untracked(start, end)?;

        if let Err(errno) = uffdio_register(&self.uffd, start, end, UFFDIO_REGISTER_MODE_WP) {
            return Err(match errno {
                errno @ (Errno::EINVAL | Errno::ENOMEM | Errno::EBUSY | Errno::EPERM) => {
                    UffdError::Unregistrable { start, end, errno }
                }
                errno => UffdError::Ioctl {
                    op: "UFFDIO_REGISTER",
                    start,
                    end,
                    errno,
                },
            });
        }
        insert_range(&mut self.ranges, start, end);
        for (s, e) in fresh {
            // The arming scan reports every page not yet protected (all of
            // them, touched or not): that is the contents the caller reads
            // next, so the report is dropped.
            self.regions.clear();
            let armed = self.pagemap.scan(
                s,
                e,
                PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                PAGE_IS_WRITTEN,
                0,
                0,
                PAGE_IS_WRITTEN,
                &mut self.regions,
            );
            match armed {
                Ok(()) => {}
                Err(PagemapError::NotWpAsync { .. }) => {
                    return Err(UffdError::Stale { start: s, end: e })
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Unregisters `[start, end)` (the mapping vanished or shrank), best
    /// effort, and forgets it.
    pub fn unregister(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut range = UffdioRange {
            start,
            len: end - start,
        };
        // SAFETY: `range` is a valid `struct uffdio_range` for the call; the
        // userfaultfd is open.
        let r = unsafe {
            libc::ioctl(
                self.uffd.as_raw_fd(),
                UFFDIO_UNREGISTER as libc::Ioctl,
                &mut range as *mut UffdioRange,
            )
        };
        if r < 0 {
            // Typical when the mapping is gone: nothing left to unregister.
            tracing::debug!(
                pid = self.pid,
                "UFFDIO_UNREGISTER {start:#x}-{end:#x}: {}",
                Errno::last()
            );
        }
        remove_range(&mut self.ranges, start, end);
    }

    /// The registered ranges, sorted; adjacent registrations are merged.
    pub fn registered(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Appends to `out` the pages written in `[start, end)` since the last
    /// scan (or the registration), as page-aligned `[s, e)` runs, and
    /// write-protects them again in the same step. `[start, end)` must lie
    /// inside one registered range, otherwise nothing is scanned
    /// ([`UffdError::NotRegistered`]). On [`UffdError::Stale`], the runs
    /// appended before the error are real and already re-protected: keep
    /// them.
    pub fn scan_written(
        &mut self,
        start: u64,
        end: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<(), UffdError> {
        if start >= end {
            return Ok(());
        }
        if !self.ranges.iter().any(|&(s, e)| s <= start && end <= e) {
            return Err(UffdError::NotRegistered { start, end });
        }
        self.regions.clear();
        let r = self.pagemap.scan(
            start,
            end,
            PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            PAGE_IS_WRITTEN,
            0,
            0,
            PAGE_IS_WRITTEN,
            &mut self.regions,
        );
        append_merged(out, &self.regions);
        match r {
            Ok(()) => Ok(()),
            Err(PagemapError::NotWpAsync { .. }) => Err(UffdError::Stale { start, end }),
            Err(e) => Err(e.into()),
        }
    }

    /// Pages with content in `[start, end)` (present or swapped; with
    /// `anon_only`, not those still backed by their file), without changing
    /// any protection: what round 0 and a newly seen mapping send. After
    /// arming, every never-touched page of a registered range carries a
    /// uffd-wp pte marker that `PAGEMAP_SCAN` calls "swapped"; those are
    /// holes and are left out (see [`Pagemap::present`]).
    pub fn scan_present(
        &mut self,
        start: u64,
        end: u64,
        anon_only: bool,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<(), UffdError> {
        Ok(self.pagemap.present(start, end, anon_only, out)?)
    }
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, UffdError> {
    // SAFETY: pidfd_open takes a pid and flags; no memory is passed.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(UffdError::Fd {
            op: "pidfd_open",
            pid,
            errno: Errno::last(),
        });
    }
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) })
}

/// Copies fd `fd` of process `pid` into ours (`pidfd_getfd`, close-on-exec).
fn take_fd(pid: i32, fd: RawFd) -> Result<OwnedFd, UffdError> {
    let err = |op| move |errno| UffdError::Fd { op, pid, errno };
    let pidfd = pidfd_open(pid)?;
    // SAFETY: pidfd_getfd takes two fds and flags; no memory is passed.
    let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if ours < 0 {
        return Err(err("pidfd_getfd")(Errno::last()));
    }
    // SAFETY: pidfd_getfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ours as RawFd) })
}

/// The userfaultfd features of this kernel, from a throwaway userfaultfd
/// of our own process; `None` if we may not create one (then `UFFDIO_API`
/// on the target's fd is the test).
fn kernel_features() -> Option<u64> {
    static FEATURES: OnceLock<Option<u64>> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        for f in [flags, flags | UFFD_USER_MODE_ONLY] {
            // SAFETY: userfaultfd takes flags only; no memory is passed.
            let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, f) };
            if fd < 0 {
                continue;
            }
            // SAFETY: userfaultfd returned a new fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
            return api_handshake(&fd, 0).ok();
        }
        None
    })
}

/// `UFFDIO_REGISTER` of `[start, end)` on `uffd` in `mode`.
fn uffdio_register(uffd: &OwnedFd, start: u64, end: u64, mode: u64) -> Result<(), Errno> {
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start,
            len: end.saturating_sub(start),
        },
        mode,
        ioctls: 0,
    };
    // SAFETY: `reg` is a valid `struct uffdio_register` the kernel reads and
    // writes back; the userfaultfd is open.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_REGISTER as libc::Ioctl,
            &mut reg as *mut UffdioRegister,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// The `UFFDIO_API` handshake on `uffd`, asking for `features`: the
/// features the kernel offers (all of them when `features` is 0).
fn api_handshake(uffd: &OwnedFd, features: u64) -> Result<u64, Errno> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `uffd` is an open userfaultfd and `api` a valid `struct
    // uffdio_api` that the kernel reads and writes back.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_API as libc::Ioctl,
            &mut api as *mut UffdioApi,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(api.features)
}

fn feature_names(bits: u64) -> String {
    let mut names = Vec::new();
    if bits & UFFD_FEATURE_WP_ASYNC != 0 {
        names.push("WP_ASYNC");
    }
    if bits & UFFD_FEATURE_WP_UNPOPULATED != 0 {
        names.push("WP_UNPOPULATED");
    }
    names.join(" and ")
}

/// Adds `[start, end)` to a sorted list of disjoint ranges, merging
/// overlapping and adjacent ones.
fn insert_range(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let (mut s, mut e) = (start, end);
    ranges.retain(|&(rs, re)| {
        if re < s || rs > e {
            true
        } else {
            s = s.min(rs);
            e = e.max(re);
            false
        }
    });
    let at = ranges.partition_point(|&(rs, _)| rs < s);
    ranges.insert(at, (s, e));
}

/// Removes `[start, end)` from a sorted list of disjoint ranges, splitting
/// a range that contains it.
fn remove_range(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(rs, re) in ranges.iter() {
        if re <= start || rs >= end {
            out.push((rs, re));
            continue;
        }
        if rs < start {
            out.push((rs, start));
        }
        if re > end {
            out.push((end, re));
        }
    }
    *ranges = out;
}

// ------------------------------------------------------------- post-copy

/// The process's own `madvise(MADV_DONTNEED)` on a registered range.
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// The process's `munmap` of a registered range.
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// The process's `mremap` of a registered range.
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const MISSING_FEATURES: u64 =
    UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const UFFDIO_WAKE: u64 = ior::<UffdioRange>(0xaa, 0x02);
const UFFDIO_COPY: u64 = iowr::<UffdioCopy>(0xaa, 0x03);
const UFFDIO_ZEROPAGE: u64 = iowr::<UffdioZeropage>(0xaa, 0x04);

/// What the restored process did, read from its userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingEvent {
    /// A thread touched a missing page at `addr` and waits for it.
    Fault { addr: u64 },
    /// The process dropped `[start, end)` itself (`MADV_DONTNEED`) or
    /// unmapped it: what was there is no longer wanted.
    Removed { start: u64, end: u64 },
    /// The process moved `len` bytes from `from` to `to` (`mremap`).
    Remapped { from: u64, to: u64, len: u64 },
}

/// A userfaultfd in MISSING mode on a restored process (post-copy): faults
/// on registered ranges wait until [`Missing::copy`] places the page. Made
/// like [`WriteProtect`]: created inside the process by an injected call,
/// copied out with `pidfd_getfd`, the process's copy closed by the caller.
/// Dropping it closes the fd, which unregisters everything: a page not
/// placed by then reads as zero, so the owner kills the process first when
/// pages are still missing.
///
/// Reading events and placing pages may happen from two threads at once.
pub struct Missing {
    pid: i32,
    uffd: OwnedFd,
    /// Taken while the process is still stopped under ptrace, so a kill
    /// can never reach a reused pid.
    pidfd: OwnedFd,
}

impl Missing {
    /// Takes fd `remote` of `pid` (a fresh userfaultfd the caller made in
    /// it) and enables the events post-copy needs.
    pub fn adopt(pid: i32, remote: RawFd) -> Result<Missing, UffdError> {
        let uffd = take_fd(pid, remote)?;
        let pidfd = pidfd_open(pid)?;
        api_handshake(&uffd, MISSING_FEATURES).map_err(UffdError::Api)?;
        Ok(Missing { pid, uffd, pidfd })
    }

    /// SIGKILLs the process and waits (at most 5 s) until it is gone: a
    /// process whose missing pages cannot come any more must not run on,
    /// and must be gone before the userfaultfd closes (missing pages would
    /// read as zeros).
    pub fn kill(&self) -> Result<(), UffdError> {
        // SAFETY: pidfd_send_signal with a pidfd we own, no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 && Errno::last() != Errno::ESRCH {
            return Err(UffdError::Fd {
                op: "pidfd_send_signal(SIGKILL)",
                pid: self.pid,
                errno: Errno::last(),
            });
        }
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1; a pidfd polls readable once
        // the process has exited.
        unsafe { libc::poll(&mut pfd, 1, 5000) };
        Ok(())
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Registers `[start, end)` (page aligned, anonymous private memory)
    /// in MISSING mode: from now on a touch of a page not present there
    /// waits for [`Missing::copy`] or [`Missing::zero`].
    pub fn register(&self, start: u64, end: u64) -> Result<(), UffdError> {
        uffdio_register(&self.uffd, start, end, UFFDIO_REGISTER_MODE_MISSING).map_err(|errno| {
            UffdError::Ioctl {
                op: "UFFDIO_REGISTER (missing)",
                start,
                end,
                errno,
            }
        })
    }

    /// Places `data` (whole pages) at `dst` and wakes whoever waits there.
    /// Pages already present (faulted in as zero after a removal, or placed
    /// before) are skipped, as are pages the process unmapped meanwhile.
    /// Returns the pages placed and the bytes of `data` done: fewer than
    /// all when the process is changing its mappings (`EAGAIN`), then the
    /// rest is to be placed again once its pending event was read.
    pub fn copy(&self, dst: u64, data: &[u8]) -> Result<(u64, u64), UffdError> {
        let ps = page_size();
        let len = data.len() as u64;
        let mut done = 0u64;
        let mut placed = 0u64;
        while done < len {
            let mut c = UffdioCopy {
                dst: dst + done,
                src: data.as_ptr() as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `src..src+len` lies inside `data`, which outlives the
            // call and is only read; `c` is a valid `struct uffdio_copy`.
            let r = unsafe {
                libc::ioctl(
                    self.uffd.as_raw_fd(),
                    UFFDIO_COPY as libc::Ioctl,
                    &mut c as *mut UffdioCopy,
                )
            };
            if r == 0 {
                placed += (len - done) / ps;
                done = len;
                break;
            }
            let errno = Errno::last();
            let got = if c.copy > 0 { c.copy as u64 } else { 0 };
            placed += got / ps;
            done += got;
            match errno {
                // Present already, or no longer a registered mapping: this
                // page needs nothing from us.
                Errno::EEXIST | Errno::ENOENT => done += ps,
                // The process is changing its mappings and the event that
                // says how is not read yet: the caller reads it first.
                Errno::EAGAIN => return Ok((placed, done)),
                errno => {
                    return Err(UffdError::Ioctl {
                        op: "UFFDIO_COPY",
                        start: dst + done,
                        end: dst + len,
                        errno,
                    })
                }
            }
        }
        Ok((placed, done))
    }

    /// Resolves a fault on a page that has no data to come (never in the
    /// image, or removed by the process): a zero page; if the page is
    /// present by now, only wakes the waiter.
    pub fn zero(&self, addr: u64) -> Result<(), UffdError> {
        let ps = page_size();
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: addr,
                len: ps,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `z` is a valid `struct uffdio_zeropage`; the fd is open.
        let r = unsafe {
            libc::ioctl(
                self.uffd.as_raw_fd(),
                UFFDIO_ZEROPAGE as libc::Ioctl,
                &mut z as *mut UffdioZeropage,
            )
        };
        match (r, Errno::last()) {
            (0, _) | (_, Errno::ENOENT) => Ok(()),
            (_, Errno::EEXIST) => self.wake(addr, ps),
            (_, errno) => Err(UffdError::Ioctl {
                op: "UFFDIO_ZEROPAGE",
                start: addr,
                end: addr + ps,
                errno,
            }),
        }
    }

    /// Wakes threads waiting on `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: `range` is a valid `struct uffdio_range`; the fd is open.
        let r = unsafe {
            libc::ioctl(
                self.uffd.as_raw_fd(),
                UFFDIO_WAKE as libc::Ioctl,
                &mut range as *mut UffdioRange,
            )
        };
        if r < 0 {
            return Err(UffdError::Ioctl {
                op: "UFFDIO_WAKE",
                start,
                end: start + len,
                errno: Errno::last(),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` until an event is there to read.
    pub fn wait(&self, timeout_ms: i32) -> Result<(), UffdError> {
        let mut pfd = libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 && Errno::last() != Errno::EINTR {
            return Err(UffdError::Fd {
                op: "poll of the userfaultfd",
                pid: self.pid,
                errno: Errno::last(),
            });
        }
        Ok(())
    }

    /// The next event if one is there (the fd is non-blocking).
    pub fn read_event(&self) -> Result<Option<MissingEvent>, UffdError> {
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes into a 32-byte buffer of ours.
        let r = unsafe { libc::read(self.uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if r < 0 {
            return match Errno::last() {
                Errno::EAGAIN | Errno::EINTR => Ok(None),
                errno => Err(UffdError::Fd {
                    op: "read of the userfaultfd",
                    pid: self.pid,
                    errno,
                }),
            };
        }
        Ok(parse_msg(&msg[..r as usize]))
    }
}

/// Decodes one `struct uffd_msg` (32 bytes: event, padding, then the
/// event's fields from byte 8); events post-copy does not ask for are
/// `None`.
fn parse_msg(msg: &[u8]) -> Option<MissingEvent> {
    if msg.len() < 32 {
        return None;
    }
    let word =
        |i: usize| u64::from_ne_bytes(msg[8 + 8 * i..16 + 8 * i].try_into().unwrap_or([0; 8]));
    match msg[0] {
        UFFD_EVENT_PAGEFAULT => Some(MissingEvent::Fault { addr: word(1) }),
        UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => Some(MissingEvent::Removed {
            start: word(0),
            end: word(1),
        }),
        UFFD_EVENT_REMAP => Some(MissingEvent::Remapped {
            from: word(0),
            to: word(1),
            len: word(2),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_uapi_and_messages() {
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        let mut m = [0u8; 32];
        m[0] = UFFD_EVENT_PAGEFAULT;
        m[16..24].copy_from_slice(&0x7f00_1234u64.to_ne_bytes());
        assert_eq!(
            parse_msg(&m),
            Some(MissingEvent::Fault { addr: 0x7f00_1234 })
        );
        m[0] = UFFD_EVENT_UNMAP;
        m[8..16].copy_from_slice(&0x7f00_0000u64.to_ne_bytes());
        assert_eq!(
            parse_msg(&m),
            Some(MissingEvent::Removed {
                start: 0x7f00_0000,
                end: 0x7f00_1234
            })
        );
        m[0] = 0x13; // fork: not asked for
        assert_eq!(parse_msg(&m), None);
        assert_eq!(parse_msg(&m[..8]), None);
    }

    #[test]
    fn uapi_numbers() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
    }

    #[test]
    fn range_bookkeeping() {
        let mut r = Vec::new();
        insert_range(&mut r, 0x5000, 0x6000);
        insert_range(&mut r, 0x1000, 0x2000);
        insert_range(&mut r, 0x2000, 0x3000); // adjacent: merged
        assert_eq!(r, vec![(0x1000, 0x3000), (0x5000, 0x6000)]);
        insert_range(&mut r, 0x2800, 0x5800); // bridges both
        assert_eq!(r, vec![(0x1000, 0x6000)]);
        remove_range(&mut r, 0x2000, 0x3000);
        assert_eq!(r, vec![(0x1000, 0x2000), (0x3000, 0x6000)]);
        remove_range(&mut r, 0, 0x4000);
        assert_eq!(r, vec![(0x4000, 0x6000)]);
        remove_range(&mut r, 0x4000, 0x6000);
        assert!(r.is_empty());
    }
}
