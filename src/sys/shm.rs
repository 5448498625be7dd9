//! Shared memory objects made in ferry for a restored tree: one per object
//! of the source, filled once and handed to every process that maps it or
//! holds it open.
//!
//! Anonymous shared memory is made the way the kernel makes it for
//! `mmap(MAP_SHARED|MAP_ANONYMOUS)`: ferry maps such a region for a moment
//! and opens the object behind it through `/proc/self/map_files` (root
//! only), so a restored process's mapping shows "/dev/zero (deleted)" as the
//! source's did, not a memfd. memfds are made by name.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A new anonymous shared memory object of `size` bytes (a multiple of the
/// page size, not 0), read-write.
pub fn anon_shared(size: u64) -> io::Result<OwnedFd> {
    if size == 0 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let len = usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a new shared anonymous mapping at an address the kernel
    // picks; it aliases nothing of ferry's and is only unmapped below,
    // never read or written through a pointer.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = at as u64;
    let path = format!("/proc/self/map_files/{:x}-{:x}", start, start + size);
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path);
    // SAFETY: the mapping made above, of that length; nothing refers to it.
    unsafe { libc::munmap(at, len) };
    Ok(OwnedFd::from(opened?))
}

/// A new memfd named `name`, read-write, sealable unless `sealing` is
/// false (a memfd made without `MFD_ALLOW_SEALING` carries `F_SEAL_SEAL`).
pub fn memfd(name: &str, sealing: bool) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = libc::MFD_CLOEXEC | if sealing { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create reads the NUL-terminated name, which outlives
    // the call.
    let fd = check(unsafe { libc::syscall(libc::SYS_memfd_create, name.as_ptr(), flags) })?;
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Adds `seals` to memfd `fd` (`F_ADD_SEALS`).
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an integer and touches no memory.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) };
    check(n.into()).map(drop)
}
