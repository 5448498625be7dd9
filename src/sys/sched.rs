//! A thread's scheduling as the kernel keeps it: policy, priority, nice
//! value and deadline parameters (`sched_getattr`), I/O priority
//! (`ioprio_get`) and CPU affinity (`sched_getaffinity`), read from and
//! set on another thread by its tid. No injection: these calls name their
//! target, and the one setting them on a thread it did not make needs
//! `CAP_SYS_NICE`.

use nix::errno::Errno;

/// `struct sched_attr` as of Linux 5.3 (`SCHED_ATTR_SIZE_VER1`, 56 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedAttr {
    pub size: u32,
    pub policy: u32,
    pub flags: u64,
    pub nice: i32,
    pub priority: u32,
    pub runtime: u64,
    pub deadline: u64,
    pub period: u64,
    pub util_min: u32,
    pub util_max: u32,
}

/// `SCHED_FLAG_RESET_ON_FORK`, `_RECLAIM`, `_DL_OVERRUN`: the flags that
/// are part of a thread's setting. The others ask for something of one
/// call (keep the policy, keep the parameters, clamp utilisation).
pub const SCHED_FLAGS_KEPT: u64 = 0x1 | 0x2 | 0x4;

/// `IOPRIO_WHO_PROCESS`: `ioprio_get`/`_set` of one thread by its tid.
const IOPRIO_WHO_PROCESS: u64 = 1;

/// Bytes of CPU mask asked for: 8192 CPUs.
const MASK_BYTES: usize = 1024;

/// The scheduling attributes of thread `tid`.
pub fn get_attr(tid: i32) -> Result<SchedAttr, Errno> {
    let mut attr = SchedAttr::default();
    // SAFETY: the kernel writes at most `size` (our struct's size) bytes
    // into `attr`, which is ours and lives through the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0u32,
        )
    };
    Errno::result(r).map(|_| attr)
}

/// Sets thread `tid`'s policy, priority, nice value and deadline
/// parameters as `attr` has them (flags beyond [`SCHED_FLAGS_KEPT`]
/// dropped).
pub fn set_attr(tid: i32, attr: &SchedAttr) -> Result<(), Errno> {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        flags: attr.flags & SCHED_FLAGS_KEPT,
        util_min: 0,
        util_max: 0,
        ..*attr
    };
    // SAFETY: the kernel reads `size` bytes of `attr`, ours, alive through
    // the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            tid,
            &attr as *const SchedAttr,
            0u32,
        )
    };
    Errno::result(r).map(drop)
}

/// The I/O priority of thread `tid` (`IOPRIO_PRIO_VALUE(class, data)`).
pub fn get_ioprio(tid: i32) -> Result<i32, Errno> {
    // SAFETY: ioprio_get takes integers only.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) };
    Errno::result(r).map(|v| v as i32)
}

pub fn set_ioprio(tid: i32, prio: i32) -> Result<(), Errno> {
    // SAFETY: ioprio_set takes integers only.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, prio) };
    Errno::result(r).map(drop)
}

/// The CPUs thread `tid` may run on, as 64-bit words (bit `n` of word
/// `n / 64` is CPU `n`), trailing empty words dropped.
pub fn get_affinity(tid: i32) -> Result<Vec<u64>, Errno> {
    let mut buf = [0u8; MASK_BYTES];
    // SAFETY: the kernel writes at most `MASK_BYTES` into `buf`, ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getaffinity,
            tid,
            MASK_BYTES,
            buf.as_mut_ptr(),
        )
    };
    let n = Errno::result(r)? as usize;
    let mut words: Vec<u64> = buf[..n.min(MASK_BYTES)]
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    while words.last() == Some(&0) {
        words.pop();
    }
    Ok(words)
}

pub fn set_affinity(tid: i32, words: &[u64]) -> Result<(), Errno> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    // SAFETY: the kernel reads `bytes.len()` bytes of the buffer, ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setaffinity,
            tid,
            bytes.len(),
            bytes.as_ptr(),
        )
    };
    Errno::result(r).map(drop)
}
