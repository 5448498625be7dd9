//! Every raw syscall and every `unsafe` block of ferry, behind safe wrappers.
//!
//! The rest of the crate sees plain Rust types and one error enum per module;
//! the kernel interfaces it needs are narrow and each has a trap that cost
//! someone an afternoon (DESIGN.md §8), documented where it is handled:
//!
//! - [`ptrace`]: seize every thread of a process, freeze and thaw it, inject
//!   syscalls into it. A dedicated OS thread owns all ptrace calls, because a
//!   tracee belongs to the thread that attached it.
//! - [`trampoline`]: the code an injected syscall runs through, so that a
//!   thread released mid-injection (ferry killed) resumes as it was.
//! - [`uffd`]: userfaultfd write-protect tracking of *another* process: the
//!   fd is created inside the target by an injected syscall and copied out
//!   with `pidfd_getfd`; each round one `PAGEMAP_SCAN` reports the written
//!   pages and protects them again.
//! - [`pagemap`]: `PAGEMAP_SCAN` (layouts defined here: the distribution's
//!   headers are older than the kernel), classic pagemap entries, and the
//!   soft-dirty probe (soft-dirty can be silently absent).
//! - [`fds`]: copies of another process's descriptors (`pidfd_getfd`) and
//!   a look at a pipe's unread bytes that leaves them in place (`tee`).
//! - [`shm`]: shared memory objects (anonymous shared memory, memfds) made
//!   in ferry for a restored tree.
//! - [`pidns`]: `clone3` with `set_tid` and a new pid namespace's pid 1
//!   (`--keep-pids`).
//! - [`sched`]: another thread's scheduling attributes, I/O priority and
//!   CPU affinity, by its tid.
//! - [`timens`]: a time namespace with chosen clock offsets, for a
//!   restored process's clocks.
//! - [`vm`]: reading and writing another process's memory with
//!   `process_vm_readv`/`writev`, many iovecs per call, `/proc/PID/mem` as
//!   the fallback.
//!
//! Everything here is x86_64 Linux; the injection code says so where it
//! touches registers.

pub mod caps;
pub mod fds;
pub mod heap;
pub mod pagemap;
pub mod pidns;
pub mod ptrace;
pub mod sched;
pub mod shm;
pub mod sock;
pub mod stub;
pub mod timens;
pub mod trampoline;
pub mod uffd;
pub mod vm;

use std::sync::OnceLock;

/// One past the highest user address on x86_64 with 4-level paging
/// (`TASK_SIZE_MAX`). `PAGEMAP_SCAN` refuses an `end` above it, and
/// `[vsyscall]` lies above it: such ranges are clamped here, never sent.
pub const USER_ADDR_END: u64 = 0x7fff_ffff_f000;

/// The system page size (4 KiB on x86_64), read once.
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf takes an integer name and touches no memory of ours.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            n as u64
        } else {
            4096
        }
    })
}

/// Whether this kernel can make a POSIX timer under a chosen id
/// (`PR_TIMER_CREATE_RESTORE_IDS`, Linux 6.15): asking for the mode
/// fails with EINVAL on older ones.
pub fn timer_ids_restorable() -> bool {
    const PR_TIMER_CREATE_RESTORE_IDS: libc::c_int = 77;
    const GET: libc::c_ulong = 2;
    // SAFETY: prctl with integer arguments; the GET form only returns the
    // calling process's mode.
    let r = unsafe {
        libc::prctl(
            PR_TIMER_CREATE_RESTORE_IDS,
            GET,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    r >= 0
}

/// Points stdin, stdout and stderr at /dev/null and closes every other
/// descriptor but `keep`: a process meant to be migrated should hold
/// nothing a restore cannot recreate (descriptors leak into children from
/// shells and test harnesses).
pub fn detach_stdio(keep: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors from an open file; no
        // Rust handle owns fds 0-2 in a way this invalidates.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd > 2 && fd != keep.as_raw_fd() && fd != null.as_raw_fd() {
            // SAFETY: closing descriptors nothing in this process uses any
            // more (EBADF for the directory handle already gone is harmless).
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// `_IOC(dir, type, nr, size)` of the kernel's `ioctl.h`, for requests the
/// libc crate does not define.
const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOWR(ty, nr, T)`.
const fn iowr<T>(ty: u8, nr: u8) -> u64 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, std::mem::size_of::<T>())
}

/// `_IOR(ty, nr, T)`.
const fn ior<T>(ty: u8, nr: u8) -> u64 {
    ioc(IOC_READ, ty, nr, std::mem::size_of::<T>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values printed by a C program against the 6.18 uapi headers.
        assert_eq!(iowr::<[u64; 12]>(b'f', 16), 0xc060_6610); // PAGEMAP_SCAN
        assert_eq!(iowr::<[u64; 3]>(0xaa, 0x3f), 0xc018_aa3f); // UFFDIO_API
        assert_eq!(iowr::<[u64; 4]>(0xaa, 0x00), 0xc020_aa00); // UFFDIO_REGISTER
        assert_eq!(ior::<[u64; 2]>(0xaa, 0x01), 0x8010_aa01); // UFFDIO_UNREGISTER
    }

    #[test]
    fn page_size_is_a_power_of_two() {
        assert!(page_size().is_power_of_two());
    }
}
