//! Credentials of a restored process (issue 7 item 6): what each thread
//! held (uids, gids, supplementary groups, the five capability sets,
//! securebits, no_new_privs), the policy that a page server restores them
//! exactly or not at all (never with more privilege than the image had,
//! never silently with less), and the plan of syscalls that does it. Pure
//! logic: [`crate::restore`] injects the [`Step`]s into each thread of the
//! restored process as the last privileged work before its final registers.
//!
//! The order is forced by the kernel (`capabilities(7)`, and CRIU's
//! restorer does the same): groups and gids while `CAP_SETGID` is
//! effective; `SECBIT_NO_SETUID_FIXUP` before the uid change so that
//! leaving uid 0 clears no capability (it is stronger than
//! `SECBIT_KEEP_CAPS`, which still clears the effective set); the
//! inheritable set before the bounding set shrinks (raising it is bounded
//! by the bounding set) and before the ambient set (an ambient capability
//! must be permitted and inheritable); the bounding set and the securebits
//! while `CAP_SETPCAP` is still effective; the final `capset` last, then
//! no_new_privs, which nothing can clear.

use ferry_proto::pb;

use crate::procfs;
use crate::sys::caps::NAMES;

pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SETPCAP: u32 = 8;

pub const SECBIT_NO_SETUID_FIXUP: u32 = 1 << 2;
pub const SECBIT_NO_CAP_AMBIENT_RAISE: u32 = 1 << 6;
/// Every `*_LOCKED` securebit: the bit above the one it locks.
const SECBIT_LOCKS: u32 = 0xaaaa_aaaa;

const PR_CAPBSET_DROP: u64 = 24;
const PR_SET_SECUREBITS: u64 = 28;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const PR_CAP_AMBIENT: u64 = 47;
const PR_CAP_AMBIENT_RAISE: u64 = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Supplementary groups the restore writes into the process at most
/// (`NGROUPS_MAX` is 65536; the restore's scratch area holds this many).
pub const MAX_GROUPS: usize = 2048;

/// Why credentials cannot be restored exactly. The caller names the
/// process and thread.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    /// The image holds capabilities the page server cannot hand out.
    #[error(
        "its {set} set holds {caps}, which this page server does not hold \
         (its --caps and bounding set); refusing to restore it with fewer"
    )]
    Exceeds { set: &'static str, caps: String },
    /// A step of the restore needs a capability the page server lacks.
    #[error("{what} needs {cap}, which this page server does not hold (its --caps)")]
    Needs { what: String, cap: String },
    #[error(
        "no_new_privs is set in this page server and clear in the image: it cannot be cleared"
    )]
    NoNewPrivs,
    #[error(
        "securebits {want:#x} cannot be set: this page server's securebits {have:#x} lock them"
    )]
    Locked { have: u32, want: u32 },
    #[error("{0}")]
    Invalid(String),
    /// What the restore made differs from the image (read back from
    /// `/proc`).
    #[error("restored, the thread holds {0}")]
    Mismatch(String),
    #[error("reading this thread's credentials: {0}")]
    Own(String),
}

/// One thread's credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Creds {
    /// Real, effective, saved, filesystem.
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub inh: u64,
    pub prm: u64,
    pub eff: u64,
    pub bnd: u64,
    pub amb: u64,
    pub securebits: u32,
    pub no_new_privs: bool,
}

impl Creds {
    pub fn from_pb(c: &pb::Credentials) -> Creds {
        Creds {
            uid: [c.uid, c.euid, c.suid, c.fsuid],
            gid: [c.gid, c.egid, c.sgid, c.fsgid],
            groups: c.groups.clone(),
            inh: c.cap_inheritable,
            prm: c.cap_permitted,
            eff: c.cap_effective,
            bnd: c.cap_bounding,
            amb: c.cap_ambient,
            securebits: c.securebits,
            no_new_privs: c.no_new_privs,
        }
    }

    /// What `/proc/PID/status` shows, with the securebits it does not.
    pub fn from_proc(c: procfs::Creds, securebits: u32) -> Creds {
        Creds {
            uid: c.uid,
            gid: c.gid,
            groups: c.groups,
            inh: c.cap_inh,
            prm: c.cap_prm,
            eff: c.cap_eff,
            bnd: c.cap_bnd,
            amb: c.cap_amb,
            securebits,
            no_new_privs: c.no_new_privs,
        }
    }

    pub fn to_pb(&self) -> pb::Credentials {
        pb::Credentials {
            uid: self.uid[0],
            euid: self.uid[1],
            suid: self.uid[2],
            fsuid: self.uid[3],
            gid: self.gid[0],
            egid: self.gid[1],
            sgid: self.gid[2],
            fsgid: self.gid[3],
            groups: self.groups.clone(),
            cap_inheritable: self.inh,
            cap_permitted: self.prm,
            cap_effective: self.eff,
            cap_bounding: self.bnd,
            cap_ambient: self.amb,
            securebits: self.securebits,
            no_new_privs: self.no_new_privs,
        }
    }

    /// The first field where `self` (what the restore made) differs from
    /// `want` (the image), bounding set compared over `known` only.
    pub fn differs_from(&self, want: &Creds, known: u64) -> Option<String> {
        let caps = |name: &str, have: u64, want: u64| {
            (have != want).then(|| format!("{name} {} (image: {})", cap_list(have), cap_list(want)))
        };
        let mut groups = want.groups.clone();
        groups.sort_unstable();
        (self.uid != want.uid)
            .then(|| format!("uids {:?} (image: {:?})", self.uid, want.uid))
            .or_else(|| {
                (self.gid != want.gid)
                    .then(|| format!("gids {:?} (image: {:?})", self.gid, want.gid))
            })
            .or_else(|| {
                (self.groups != groups)
                    .then(|| format!("groups {:?} (image: {:?})", self.groups, want.groups))
            })
            .or_else(|| caps("inheritable", self.inh, want.inh))
            .or_else(|| caps("permitted", self.prm, want.prm))
            .or_else(|| caps("effective", self.eff, want.eff))
            .or_else(|| caps("bounding", self.bnd & known, want.bnd & known))
            .or_else(|| caps("ambient", self.amb, want.amb))
            .or_else(|| {
                (self.securebits != want.securebits).then(|| {
                    format!(
                        "securebits {:#x} (image: {:#x})",
                        self.securebits, want.securebits
                    )
                })
            })
            .or_else(|| {
                (self.no_new_privs != want.no_new_privs).then(|| {
                    format!(
                        "no_new_privs {} (image: {})",
                        self.no_new_privs, want.no_new_privs
                    )
                })
            })
    }
}

/// The credentials of the calling thread: what a restore's stub, forked
/// from it, starts with.
pub fn own() -> Result<Creds, CredsError> {
    let text = std::fs::read_to_string("/proc/thread-self/status")
        .map_err(|e| CredsError::Own(format!("/proc/thread-self/status: {e}")))?;
    let c = procfs::parse_creds(&text).map_err(|e| CredsError::Own(e.to_string()))?;
    let sb = crate::sys::caps::securebits().map_err(|e| CredsError::Own(e.to_string()))?;
    Ok(Creds::from_proc(c, sb))
}

/// The distinct credentials of the threads of `pid` and its descendants
/// as `/proc` shows them now (securebits read as 0: only an injection into
/// the frozen process can read them), for the page server's pre-flight
/// (`Hello.creds`). Threads that vanish meanwhile are skipped: the
/// capture at the freeze is what counts.
pub fn of_tree(pid: i32) -> Vec<pb::Credentials> {
    let pids: Vec<i32> = match crate::tree::discover(pid) {
        Ok(tree) => tree
            .iter()
            .filter(|s| s.state != 'Z')
            .map(|s| s.pid)
            .collect(),
        Err(_) => vec![pid],
    };
    let mut out: Vec<pb::Credentials> = Vec::new();
    for p in pids {
        for tid in procfs::list_tasks(p).unwrap_or_default() {
            if let Ok(c) = procfs::read_task_creds(p, tid) {
                let c = Creds::from_proc(c, 0).to_pb();
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// The page server's pre-flight of `Hello.creds` (of the process the
/// Hello's `label` names): the first of them this ferry could not restore
/// exactly, and why.
pub fn preflight(creds: &[pb::Credentials], label: &str) -> Result<(), String> {
    let have = own().map_err(|e| e.to_string())?;
    let last = crate::sys::caps::last_cap();
    for c in creds {
        plan(&Creds::from_pb(c), &have, last)
            .map_err(|e| format!("{label}: a thread of uid {}: credentials: {e}", c.euid))?;
    }
    Ok(())
}

/// The capabilities this kernel knows, as a mask.
pub fn known_mask(last_cap: u32) -> u64 {
    match last_cap {
        63.. => u64::MAX,
        n => (1u64 << (n + 1)) - 1,
    }
}

/// `cap_net_raw,cap_sys_admin`, `none` for an empty mask; capabilities
/// this build has no name for as `cap_N`.
pub fn cap_list(mask: u64) -> String {
    let v: Vec<String> = (0..64u32)
        .filter(|i| mask & (1u64 << i) != 0)
        .map(|i| match NAMES.get(i as usize) {
            Some(n) => format!("cap_{n}"),
            None => format!("cap_{i}"),
        })
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

fn bits(mask: u64) -> impl Iterator<Item = u32> {
    (0..64u32).filter(move |i| mask & (1u64 << i) != 0)
}

/// One syscall of the restore of a thread's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    SetGroups(Vec<u32>),
    Securebits(u32),
    Resgid([u32; 3]),
    Fsgid(u32),
    Resuid([u32; 3]),
    Fsuid(u32),
    Capset { eff: u64, prm: u64, inh: u64 },
    AmbientClear,
    AmbientRaise(u32),
    BoundingDrop(u32),
    NoNewPrivs,
}

impl Step {
    /// The bytes the syscall reads through its pointer argument, if any
    /// (to be placed in the process before any step runs).
    pub fn memory(&self) -> Option<Vec<u8>> {
        match self {
            Step::SetGroups(g) => Some(g.iter().flat_map(|g| g.to_ne_bytes()).collect()),
            Step::Capset { eff, prm, inh } => {
                // struct __user_cap_header_struct (version, pid 0 = this
                // thread), then two __user_cap_data_struct (effective,
                // permitted, inheritable; low then high 32 bits).
                let mut b = Vec::with_capacity(32);
                b.extend_from_slice(&LINUX_CAPABILITY_VERSION_3.to_ne_bytes());
                b.extend_from_slice(&0i32.to_ne_bytes());
                for half in 0..2 {
                    for m in [eff, prm, inh] {
                        b.extend_from_slice(&((m >> (32 * half)) as u32).to_ne_bytes());
                    }
                }
                Some(b)
            }
            _ => None,
        }
    }

    /// The syscall number and arguments, given the address of
    /// [`Step::memory`] in the process (0 when it has none).
    pub fn syscall(&self, mem: u64) -> (libc::c_long, [u64; 6]) {
        let prctl = |a: u64, b: u64, c: u64| (libc::SYS_prctl, [a, b, c, 0, 0, 0]);
        let three = |nr, [a, b, c]: [u32; 3]| (nr, [a as u64, b as u64, c as u64, 0, 0, 0]);
        match self {
            Step::SetGroups(g) => (libc::SYS_setgroups, [g.len() as u64, mem, 0, 0, 0, 0]),
            Step::Securebits(b) => prctl(PR_SET_SECUREBITS, *b as u64, 0),
            Step::Resgid(g) => three(libc::SYS_setresgid, *g),
            Step::Fsgid(g) => (libc::SYS_setfsgid, [*g as u64, 0, 0, 0, 0, 0]),
            Step::Resuid(u) => three(libc::SYS_setresuid, *u),
            Step::Fsuid(u) => (libc::SYS_setfsuid, [*u as u64, 0, 0, 0, 0, 0]),
            Step::Capset { .. } => (libc::SYS_capset, [mem, mem + 8, 0, 0, 0, 0]),
            Step::AmbientClear => prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0),
            Step::AmbientRaise(c) => prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, *c as u64),
            Step::BoundingDrop(c) => prctl(PR_CAPBSET_DROP, *c as u64, 0),
            Step::NoNewPrivs => prctl(PR_SET_NO_NEW_PRIVS, 1, 0),
        }
    }

    /// Whether the syscall's result says nothing (setfsuid and setfsgid
    /// return the old id, success or not): checked afterwards instead.
    pub fn unchecked(&self) -> bool {
        matches!(self, Step::Fsgid(_) | Step::Fsuid(_))
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::SetGroups(g) => write!(f, "setgroups({g:?})"),
            Step::Securebits(b) => write!(f, "prctl(PR_SET_SECUREBITS, {b:#x})"),
            Step::Resgid([a, b, c]) => write!(f, "setresgid({a}, {b}, {c})"),
            Step::Fsgid(g) => write!(f, "setfsgid({g})"),
            Step::Resuid([a, b, c]) => write!(f, "setresuid({a}, {b}, {c})"),
            Step::Fsuid(u) => write!(f, "setfsuid({u})"),
            Step::Capset { eff, prm, inh } => write!(
                f,
                "capset(effective {}, permitted {}, inheritable {})",
                cap_list(*eff),
                cap_list(*prm),
                cap_list(*inh)
            ),
            Step::AmbientClear => write!(f, "prctl(PR_CAP_AMBIENT_CLEAR_ALL)"),
            Step::AmbientRaise(c) => {
                write!(f, "prctl(PR_CAP_AMBIENT_RAISE, {})", cap_list(1 << c))
            }
            Step::BoundingDrop(c) => write!(f, "prctl(PR_CAPBSET_DROP, {})", cap_list(1 << c)),
            Step::NoNewPrivs => write!(f, "prctl(PR_SET_NO_NEW_PRIVS, 1)"),
        }
    }
}

/// Whether the kernel lets securebits `from` become `to` (with
/// `CAP_SETPCAP`): a locked bit keeps its value and its lock.
fn securebits_may_change(from: u32, to: u32) -> bool {
    let locks = from & SECBIT_LOCKS;
    (locks >> 1) & (from ^ to) == 0 && locks & !to == 0
}

/// The steps that turn a thread holding `have` (the page server's
/// credentials, which the restore's stub inherits) into one holding
/// exactly `want` (the image's), or why that cannot be done: `want` asks
/// for a capability `have` lacks (in its permitted or bounding set), or a
/// step needs a capability `have` does not hold effective, or no_new_privs
/// or locked securebits stand in the way. `last_cap` is this kernel's
/// highest capability: bounding bits above it do not exist here and are
/// ignored; any other set holding one is refused.
pub fn plan(want: &Creds, have: &Creds, last_cap: u32) -> Result<Vec<Step>, CredsError> {
    let known = known_mask(last_cap);
    for (set, m) in [
        ("permitted", want.prm),
        ("effective", want.eff),
        ("inheritable", want.inh),
        ("ambient", want.amb),
    ] {
        if m & !known != 0 {
            return Err(CredsError::Invalid(format!(
                "its {set} set holds {}, which this kernel does not know (its last capability is {last_cap})",
                cap_list(m & !known)
            )));
        }
    }
    if want.eff & !want.prm != 0 {
        return Err(CredsError::Invalid(format!(
            "invalid credentials: effective {} not permitted",
            cap_list(want.eff & !want.prm)
        )));
    }
    if want.amb & !(want.prm & want.inh) != 0 {
        return Err(CredsError::Invalid(format!(
            "invalid credentials: ambient {} not permitted and inheritable",
            cap_list(want.amb & !(want.prm & want.inh))
        )));
    }
    if want.groups.len() > MAX_GROUPS {
        return Err(CredsError::Invalid(format!(
            "{} supplementary groups: more than {MAX_GROUPS} are not supported yet",
            want.groups.len()
        )));
    }
    let bnd = want.bnd & known;
    let exceeds = |set: &'static str, m: u64| match m {
        0 => Ok(()),
        m => Err(CredsError::Exceeds {
            set,
            caps: cap_list(m),
        }),
    };
    exceeds("permitted", want.prm & !have.prm)?;
    exceeds("bounding", bnd & !have.bnd)?;
    // Raising the inheritable set: within the bounding set with
    // CAP_SETPCAP, within the permitted set without.
    let setpcap = have.eff & (1 << CAP_SETPCAP) != 0;
    let inh_room = have.inh | if setpcap { have.bnd } else { have.prm };
    exceeds("inheritable", want.inh & !inh_room)?;
    if have.no_new_privs && !want.no_new_privs {
        return Err(CredsError::NoNewPrivs);
    }
    let need = |cap: u32, what: &dyn Fn() -> String| {
        if have.eff & (1u64 << cap) != 0 {
            Ok(())
        } else {
            Err(CredsError::Needs {
                what: what(),
                cap: cap_list(1 << cap),
            })
        }
    };
    let mut steps = Vec::new();
    let mut sb = have.securebits;
    let set_sb = |steps: &mut Vec<Step>, sb: &mut u32, to: u32, why: &dyn Fn() -> String| {
        if *sb == to {
            return Ok(());
        }
        need(CAP_SETPCAP, why)?;
        if !securebits_may_change(*sb, to) {
            return Err(CredsError::Locked {
                have: *sb,
                want: to,
            });
        }
        steps.push(Step::Securebits(to));
        *sb = to;
        Ok(())
    };
    // The kernel keeps them sorted.
    let mut groups = want.groups.clone();
    groups.sort_unstable();
    if groups != have.groups {
        need(CAP_SETGID, &|| {
            format!("setting the groups {:?}", want.groups)
        })?;
        steps.push(Step::SetGroups(want.groups.clone()));
    }
    if want.uid != have.uid {
        // Without it the uid change clears capabilities (and with
        // SECBIT_KEEP_CAPS alone, still the effective set), which the
        // steps below need.
        let to = sb | SECBIT_NO_SETUID_FIXUP;
        set_sb(&mut steps, &mut sb, to, &|| {
            format!(
                "keeping capabilities across the change to uid {} (SECBIT_NO_SETUID_FIXUP)",
                want.uid[1]
            )
        })?;
    }
    if want.gid != have.gid {
        need(CAP_SETGID, &|| format!("setting the gids {:?}", want.gid))?;
        steps.push(Step::Resgid([want.gid[0], want.gid[1], want.gid[2]]));
        if want.gid[3] != want.gid[1] {
            steps.push(Step::Fsgid(want.gid[3]));
        }
    }
    if want.uid != have.uid {
        need(CAP_SETUID, &|| format!("setting the uids {:?}", want.uid))?;
        steps.push(Step::Resuid([want.uid[0], want.uid[1], want.uid[2]]));
        if want.uid[3] != want.uid[1] {
            steps.push(Step::Fsuid(want.uid[3]));
        }
    }
    let (eff, prm, mut inh) = (have.eff, have.prm, have.inh);
    if want.inh != inh || want.amb != have.amb {
        steps.push(Step::Capset {
            eff,
            prm,
            inh: want.inh,
        });
        inh = want.inh;
    }
    // capset has just dropped any ambient capability that is no longer
    // inheritable; the others are cleared here if the image lacks them.
    let amb_now = have.amb & inh & prm;
    let raise = if amb_now & !want.amb != 0 {
        steps.push(Step::AmbientClear);
        want.amb
    } else {
        want.amb & !amb_now
    };
    if raise != 0 && sb & SECBIT_NO_CAP_AMBIENT_RAISE != 0 {
        return Err(CredsError::Locked {
            have: sb,
            want: want.securebits,
        });
    }
    steps.extend(bits(raise).map(Step::AmbientRaise));
    for cap in bits(have.bnd & !bnd) {
        need(CAP_SETPCAP, &|| {
            format!("dropping {} from the bounding set", cap_list(1 << cap))
        })?;
        steps.push(Step::BoundingDrop(cap));
    }
    set_sb(&mut steps, &mut sb, want.securebits, &|| {
        format!("setting the securebits {:#x}", want.securebits)
    })?;
    if (want.eff, want.prm, want.inh) != (eff, prm, inh) {
        steps.push(Step::Capset {
            eff: want.eff,
            prm: want.prm,
            inh: want.inh,
        });
    }
    if want.no_new_privs && !have.no_new_privs {
        steps.push(Step::NoNewPrivs);
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAST: u32 = 40;
    const ALL: u64 = (1 << 41) - 1;

    fn root() -> Creds {
        Creds {
            prm: ALL,
            eff: ALL,
            bnd: ALL,
            ..Creds::default()
        }
    }

    fn nobody() -> Creds {
        Creds {
            uid: [65534; 4],
            gid: [65534; 4],
            groups: vec![65534],
            bnd: ALL,
            ..Creds::default()
        }
    }

    fn cap(name: &str) -> u64 {
        crate::sys::caps::bit(name).unwrap()
    }

    #[test]
    fn the_same_credentials_need_nothing() {
        assert_eq!(plan(&root(), &root(), LAST).unwrap(), vec![]);
        // Even without any capability to change them.
        let n = nobody();
        assert_eq!(plan(&n, &n, LAST).unwrap(), vec![]);
    }

    #[test]
    fn root_to_nobody_keeps_caps_until_the_last_capset() {
        let steps = plan(&nobody(), &root(), LAST).unwrap();
        assert_eq!(
            steps,
            vec![
                Step::SetGroups(vec![65534]),
                Step::Securebits(SECBIT_NO_SETUID_FIXUP),
                Step::Resgid([65534; 3]),
                Step::Resuid([65534; 3]),
                Step::Securebits(0),
                Step::Capset {
                    eff: 0,
                    prm: 0,
                    inh: 0
                },
            ]
        );
    }

    #[test]
    fn fs_ids_and_every_set_are_restored_in_order() {
        let want = Creds {
            uid: [1000, 1001, 1002, 1003],
            gid: [5, 6, 7, 8],
            groups: vec![27, 4],
            inh: cap("net_raw") | cap("kill"),
            prm: cap("net_raw") | cap("net_admin"),
            eff: cap("net_admin"),
            bnd: ALL & !cap("sys_admin") & !cap("sys_module"),
            amb: cap("net_raw"),
            securebits: 1 << 4 | 1 << 5, // KEEP_CAPS, locked
            no_new_privs: true,
        };
        let steps = plan(&want, &root(), LAST).unwrap();
        assert_eq!(
            steps,
            vec![
                Step::SetGroups(vec![27, 4]),
                Step::Securebits(SECBIT_NO_SETUID_FIXUP),
                Step::Resgid([5, 6, 7]),
                Step::Fsgid(8),
                Step::Resuid([1000, 1001, 1002]),
                Step::Fsuid(1003),
                Step::Capset {
                    eff: ALL,
                    prm: ALL,
                    inh: want.inh
                },
                Step::AmbientRaise(13),
                Step::BoundingDrop(16),
                Step::BoundingDrop(21),
                Step::Securebits(0x30),
                Step::Capset {
                    eff: want.eff,
                    prm: want.prm,
                    inh: want.inh
                },
                Step::NoNewPrivs,
            ]
        );
        // The kernel keeps the groups sorted: the same set in another
        // order needs no setgroups.
        let have = Creds {
            groups: vec![4, 27],
            ..root()
        };
        assert!(!plan(&want, &have, LAST)
            .unwrap()
            .iter()
            .any(|s| matches!(s, Step::SetGroups(_))));
    }

    #[test]
    fn more_than_the_page_server_holds_is_refused_by_name() {
        // A page server with --caps checkpoint_restore: permitted and
        // bounding hold that one capability.
        let narrow = Creds {
            prm: cap("checkpoint_restore"),
            eff: cap("checkpoint_restore"),
            bnd: cap("checkpoint_restore"),
            ..Creds::default()
        };
        let e = plan(&root(), &narrow, LAST).unwrap_err().to_string();
        assert!(e.contains("permitted set holds cap_chown,"), "{e}");
        assert!(e.contains("does not hold"), "{e}");
        // Nothing permitted, but a fuller bounding set.
        let e = plan(&nobody(), &narrow, LAST).unwrap_err().to_string();
        assert!(e.contains("bounding set holds cap_chown"), "{e}");
        // Same bounding set, but the uid change needs setuid/setgid.
        let n = Creds {
            bnd: narrow.bnd,
            ..nobody()
        };
        let e = plan(&n, &narrow, LAST).unwrap_err().to_string();
        assert!(e.contains("cap_setgid"), "{e}");
        let more = Creds {
            prm: narrow.prm | cap("setgid"),
            eff: narrow.prm | cap("setgid"),
            ..narrow.clone()
        };
        let e = plan(&n, &more, LAST).unwrap_err().to_string();
        assert!(e.contains("cap_setpcap"), "{e}");
        // A smaller bounding set, from a page server without setpcap.
        let e = plan(
            &Creds {
                bnd: ALL & !cap("sys_admin"),
                ..Creds::default()
            },
            &Creds {
                bnd: ALL,
                ..Creds::default()
            },
            LAST,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("dropping cap_sys_admin from the bounding set needs cap_setpcap"),
            "{e}"
        );
    }

    #[test]
    fn what_cannot_be_undone_is_refused() {
        let nnp = Creds {
            no_new_privs: true,
            ..root()
        };
        assert!(matches!(
            plan(&root(), &nnp, LAST),
            Err(CredsError::NoNewPrivs)
        ));
        assert_eq!(plan(&nnp, &nnp, LAST).unwrap(), vec![]);
        // NOROOT locked in the page server, the image without it.
        let locked = Creds {
            securebits: 0b11,
            ..root()
        };
        assert!(matches!(
            plan(&root(), &locked, LAST),
            Err(CredsError::Locked { .. })
        ));
        assert!(securebits_may_change(0, 0x3f));
        assert!(securebits_may_change(0b11, 0b111));
        assert!(!securebits_may_change(0b10, 0b11));
        assert!(!securebits_may_change(0b11, 0b01));
    }

    #[test]
    fn inconsistent_or_foreign_sets_are_refused() {
        let bad = Creds {
            eff: cap("kill"),
            ..Creds::default()
        };
        assert!(plan(&bad, &root(), LAST)
            .unwrap_err()
            .to_string()
            .contains("effective cap_kill not permitted"));
        let bad = Creds {
            prm: cap("kill"),
            amb: cap("kill"),
            ..Creds::default()
        };
        assert!(plan(&bad, &root(), LAST).is_err());
        let future = Creds {
            prm: 1 << 45,
            ..Creds::default()
        };
        let e = plan(&future, &root(), LAST).unwrap_err().to_string();
        assert!(e.contains("cap_45"), "{e}");
        // A bounding set naming capabilities this kernel lacks is fine.
        let newer = Creds {
            bnd: u64::MAX,
            ..root()
        };
        assert_eq!(plan(&newer, &root(), LAST).unwrap(), vec![]);
    }

    #[test]
    fn ambient_clear_and_raise() {
        let have = Creds {
            inh: cap("kill") | cap("net_raw"),
            amb: cap("kill") | cap("net_raw"),
            ..root()
        };
        let want = Creds {
            inh: cap("kill") | cap("net_raw"),
            amb: cap("net_raw"),
            ..root()
        };
        let steps = plan(&want, &have, LAST).unwrap();
        assert!(steps.contains(&Step::AmbientClear), "{steps:?}");
        assert!(steps.contains(&Step::AmbientRaise(13)), "{steps:?}");
        let locked = Creds {
            securebits: SECBIT_NO_CAP_AMBIENT_RAISE,
            ..root()
        };
        assert!(plan(&want, &locked, LAST).is_err());
    }

    #[test]
    fn syscalls_and_their_memory() {
        let s = Step::Capset {
            eff: 1 << 40 | 1,
            prm: 2,
            inh: 0,
        };
        let m = s.memory().unwrap();
        assert_eq!(m.len(), 32);
        assert_eq!(&m[..4], &0x2008_0522u32.to_ne_bytes());
        assert_eq!(&m[8..12], &1u32.to_ne_bytes()); // eff low
        assert_eq!(&m[12..16], &2u32.to_ne_bytes()); // prm low
        assert_eq!(&m[20..24], &(1u32 << 8).to_ne_bytes()); // eff high
        assert_eq!(s.syscall(0x1000).1[..2], [0x1000, 0x1008]);
        let g = Step::SetGroups(vec![1, 2]);
        assert_eq!(g.memory().unwrap().len(), 8);
        assert_eq!(
            g.syscall(0x2000),
            (libc::SYS_setgroups, [2, 0x2000, 0, 0, 0, 0])
        );
        assert_eq!(
            Step::Resuid([1, 2, 3]).syscall(0),
            (libc::SYS_setresuid, [1, 2, 3, 0, 0, 0])
        );
        assert!(Step::Fsuid(1).unchecked());
        assert_eq!(
            Step::BoundingDrop(13).to_string(),
            "prctl(PR_CAPBSET_DROP, cap_net_raw)"
        );
    }

    #[test]
    fn a_restored_thread_is_compared_field_by_field() {
        let n = nobody();
        assert_eq!(n.differs_from(&n, ALL), None);
        let other = Creds {
            groups: vec![65534, 4],
            ..n.clone()
        };
        let sorted = Creds {
            groups: vec![4, 65534],
            ..n.clone()
        };
        assert_eq!(sorted.differs_from(&other, ALL), None);
        let e = root().differs_from(&n, ALL).unwrap();
        assert!(e.starts_with("uids [0, 0, 0, 0]"), "{e}");
        let fewer = Creds {
            bnd: ALL & !cap("net_raw"),
            ..n.clone()
        };
        assert!(fewer.differs_from(&n, ALL).unwrap().contains("bounding"));
        assert_eq!(
            Creds::from_pb(&fewer.to_pb()),
            fewer,
            "the image form round-trips"
        );
    }
}
