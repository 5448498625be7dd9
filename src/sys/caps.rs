//! Capabilities: dropping what a ferry process no longer needs, for good
//! (effective, permitted, inheritable, ambient and bounding sets, so that
//! neither it nor any process it forks can take them back), and naming
//! them. `capset` and `capget` are raw syscalls (nix has no wrapper); the
//! bounding set goes first, while `CAP_SETPCAP` is still effective.

use nix::errno::Errno;

/// The names of capabilities 0..=40, as `capabilities(7)` spells them
/// without the `CAP_` prefix, lower case.
pub const NAMES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("unknown capability {0:?} (use names like sys_ptrace or CAP_SYS_PTRACE, \"none\" or \"all\")")]
    Unknown(String),
    #[error("{op}: {errno}")]
    Syscall { op: String, errno: Errno },
}

/// The bit of capability `name` (`sys_ptrace`, `CAP_SYS_PTRACE`, any case).
pub fn bit(name: &str) -> Result<u64, CapsError> {
    let n = name.trim().to_ascii_lowercase();
    let n = n.strip_prefix("cap_").unwrap_or(&n);
    NAMES
        .iter()
        .position(|c| *c == n)
        .map(|i| 1u64 << i)
        .ok_or_else(|| CapsError::Unknown(name.trim().to_string()))
}

/// A comma-separated list of capability names, `none` or `all`, as a mask.
pub fn parse_list(list: &str) -> Result<u64, CapsError> {
    match list.trim() {
        "" | "none" => Ok(0),
        "all" => Ok(u64::MAX),
        l => l.split(',').try_fold(0, |m, n| Ok(m | bit(n)?)),
    }
}

/// The names of the capabilities in `mask`, comma separated (`none`).
pub fn names(mask: u64) -> String {
    let v: Vec<&str> = NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

/// The highest capability this kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63)
}

const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This thread's effective, permitted and inheritable sets.
pub fn current() -> Result<(u64, u64, u64), CapsError> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget writes two `Data` (version 3) into `d` and reads `h`;
    // both live until it returns.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    if r < 0 {
        return Err(CapsError::Syscall {
            op: "capget".into(),
            errno: Errno::last(),
        });
    }
    let join = |f: fn(&Data) -> u32| f(&d[0]) as u64 | (f(&d[1]) as u64) << 32;
    Ok((
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ))
}

/// This thread's securebits (`prctl(PR_GET_SECUREBITS)`).
pub fn securebits() -> Result<u32, CapsError> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) };
    if r < 0 {
        return Err(CapsError::Syscall {
            op: "prctl(PR_GET_SECUREBITS)".into(),
            errno: Errno::last(),
        });
    }
    Ok(r as u32)
}

/// Keeps only the capabilities in `keep`, in every set, for good. Call it
/// before any other thread exists: `capset` changes the calling thread
/// only (threads made later inherit it); the bounding set is per thread
/// too.
pub fn keep_only(keep: u64) -> Result<(), CapsError> {
    let fail = |op: String| {
        let errno = Errno::last();
        CapsError::Syscall { op, errno }
    };
    // Without CAP_SETPCAP the bounding set cannot shrink; what is not
    // permitted cannot be regained from it anyway but by executing a
    // program with file capabilities.
    let setpcap = current()?.0 & 1 << 8 != 0;
    for cap in 0..=last_cap() {
        if !setpcap || keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if r == 1 {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } < 0 {
                return Err(fail(format!(
                    "dropping cap_{} from the bounding set",
                    NAMES.get(cap as usize).unwrap_or(&"?")
                )));
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r < 0 {
        return Err(fail("clearing the ambient set".into()));
    }
    let (eff, prm, inh) = current()?;
    let (eff, prm, inh) = (eff & keep, prm & keep, inh & keep);
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let split = |m: u64, i: usize| (m >> (32 * i)) as u32;
    let d: [Data; 2] = std::array::from_fn(|i| Data {
        effective: split(eff, i),
        permitted: split(prm, i),
        inheritable: split(inh, i),
    });
    // SAFETY: capset reads `h` and two `Data` (version 3); both live until
    // it returns.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    if r < 0 {
        return Err(fail(format!("capset to {}", names(keep))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_lists_parse_both_ways() {
        assert_eq!(bit("sys_ptrace").unwrap(), 1 << 19);
        assert_eq!(bit("CAP_SYS_PTRACE").unwrap(), 1 << 19);
        assert_eq!(bit("checkpoint_restore").unwrap(), 1 << 40);
        assert_eq!(parse_list("none").unwrap(), 0);
        assert_eq!(parse_list("all").unwrap(), u64::MAX);
        let m = parse_list("kill, cap_sys_ptrace").unwrap();
        assert_eq!(m, 1 << 5 | 1 << 19);
        assert_eq!(names(m), "kill,sys_ptrace");
        assert_eq!(names(0), "none");
        let e = parse_list("kill,sys_ptrac").unwrap_err().to_string();
        assert!(e.contains("sys_ptrac"), "{e}");
        for (i, n) in NAMES.iter().enumerate() {
            assert_eq!(bit(n).unwrap(), 1 << i);
        }
    }
}
