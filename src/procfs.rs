//! `/proc` introspection of the process to migrate: its mappings, status,
//! threads and file descriptors.
//!
//! Every format is parsed by a pure function over text (`parse_*`), tested
//! on fixture text captured from real processes, so the parsing rules can be
//! read and checked without a live target. The readers (`read_*`, `list_*`)
//! only fetch the text and turn the errors of a vanished or forbidden process
//! into [`ProcError::NoProcess`] and [`ProcError::Permission`], the two cases
//! a caller acts on. Malformed input is an error naming the file, the line
//! and the reason, never a panic.
//!
//! Files are read as bytes and converted lossily: a path that is not UTF-8
//! keeps its shape with U+FFFD in place of the bad bytes, so it will not be
//! found again on the destination and the file checks fail there, loudly.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ferry_proto::pb;

/// Errors of `/proc` introspection.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The text of a `/proc` file is not in the expected format. `line`
    /// counts from 1; 0 means the file as a whole (a missing field).
    #[error("parsing {what}, line {line}: {reason}")]
    Parse {
        what: &'static str,
        line: usize,
        reason: String,
    },
    /// The process does not exist (any more).
    #[error("no process {0}")]
    NoProcess(i32),
    /// The process exists but has no such file descriptor (any more).
    #[error("process {pid} has no file descriptor {fd}")]
    NoFd { pid: i32, fd: i32 },
    /// Not allowed to read this file of the process (another user's process
    /// without `CAP_SYS_PTRACE`, or a Yama restriction).
    #[error("permission denied reading {path} of process {pid}")]
    Permission { pid: i32, path: PathBuf },
    /// Any other I/O error, with the file it concerns.
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn parse_err(what: &'static str, line: usize, reason: impl Into<String>) -> ProcError {
    ProcError::Parse {
        what,
        line,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------- maps

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` in the permissions: `MAP_SHARED`; `p` is private.
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The last column as the kernel shows it: a path (with " (deleted)"
    /// appended when the file was unlinked), a pseudo-name such as
    /// `[heap]` or `[anon:name]`, or `None` for a plain anonymous mapping.
    pub path: Option<String>,
}

/// Pseudo-names of the kernel-provided mappings.
const SPECIAL: [&str; 4] = ["[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"];

const DELETED: &str = " (deleted)";

impl MapEntry {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True for an empty range (never produced by [`parse_maps`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[vdso]`, `[vvar]`, `[vvar_vclock]`, `[vsyscall]`: provided by the
    /// kernel, so never registered for dirty tracking and never sent as
    /// data; the restore maps the destination kernel's own.
    pub fn is_special(&self) -> bool {
        self.inode == 0 && self.path.as_deref().is_some_and(|p| SPECIAL.contains(&p))
    }

    /// The file was unlinked after it was mapped (" (deleted)" suffix).
    pub fn is_deleted(&self) -> bool {
        self.is_path() && self.path.as_deref().is_some_and(|p| p.ends_with(DELETED))
    }

    /// The path without the " (deleted)" suffix, for a path; `None` for
    /// pseudo-names and anonymous mappings.
    pub fn file_path(&self) -> Option<&str> {
        let p = self.path.as_deref().filter(|p| p.starts_with('/'))?;
        Some(p.strip_suffix(DELETED).unwrap_or(p))
    }

    fn is_path(&self) -> bool {
        self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }

    /// Shared memory of the kernel's internal shmem mount that no file on
    /// the destination can provide: a shared mapping of `/dev/zero` (the
    /// kernel shows it as "/dev/zero (deleted)") and System V segments
    /// ("/SYSV<key> (deleted)"). memfd mappings are not counted here: they
    /// are files (see [`MapEntry::kind`]).
    fn is_anon_shmem_path(&self) -> bool {
        match self.path.as_deref() {
            Some("/dev/zero (deleted)") => true,
            Some(p) => p.starts_with("/SYSV") && p.ends_with(DELETED),
            None => false,
        }
    }

    /// A memfd ("/memfd:name (deleted)"): a file only the source has, its
    /// contents in RAM like anonymous shared memory.
    pub fn is_memfd(&self) -> bool {
        self.inode != 0
            && self
                .path
                .as_deref()
                .is_some_and(|p| p.starts_with("/memfd:") && p.ends_with(DELETED))
    }

    /// A System V shared memory segment (`/SYSV<key> (deleted)`).
    pub fn is_sysv(&self) -> bool {
        self.shared
            && self
                .path
                .as_deref()
                .is_some_and(|p| p.starts_with("/SYSV") && p.ends_with(DELETED))
    }

    /// The `(inode, device)` of the shared memory object behind a
    /// `MAP_SHARED` mapping whose contents live only in RAM: anonymous
    /// shared memory (`/dev/zero` included) and memfds, System V segments
    /// too (refused by name where unsupported). `None` for the rest.
    pub fn shm_key(&self) -> Option<(u64, u64)> {
        let shmem = self.kind() == pb::VmaKind::SharedAnon || self.is_memfd();
        (self.shared && shmem && self.inode != 0)
            .then(|| (self.inode, libc::makedev(self.dev_major, self.dev_minor)))
    }

    /// Backed by a file: the last column is a path, the inode is not 0,
    /// and it is not anonymous shared memory in disguise (`/dev/zero`,
    /// `/SYSV…`). Exactly the entries whose [`MapEntry::kind`] is `File`.
    pub fn is_file(&self) -> bool {
        self.is_path() && self.inode != 0 && !self.is_anon_shmem_path()
    }

    /// What the mapping is, for the image.
    ///
    /// - `[heap]` → `Heap`; `[stack]` (and the `[stack:TID]` of old
    ///   kernels) → `Stack`; `[vdso]` → `Vdso`; `[vvar]` and
    ///   `[vvar_vclock]` → `Vvar`; `[vsyscall]` → `Vsyscall`.
    /// - A file ([`MapEntry::is_file`]) → `File`, deleted or not. This
    ///   includes memfd mappings ("/memfd:name (deleted)"): their contents
    ///   live in a file only the source has, which the caller must treat
    ///   like any other deleted file.
    /// - Otherwise shared → `SharedAnon` (`MAP_SHARED|MAP_ANONYMOUS`,
    ///   `[anon_shmem:name]`, "/dev/zero (deleted)", "/SYSV… (deleted)");
    ///   private → `Anon` (no name, `[anon:name]`, any other pseudo-name).
    pub fn kind(&self) -> pb::VmaKind {
        match self.path.as_deref() {
            Some("[heap]") => return pb::VmaKind::Heap,
            Some(p) if p == "[stack]" || p.starts_with("[stack:") => return pb::VmaKind::Stack,
            Some("[vdso]") => return pb::VmaKind::Vdso,
            Some("[vvar]") | Some("[vvar_vclock]") => return pb::VmaKind::Vvar,
            Some("[vsyscall]") => return pb::VmaKind::Vsyscall,
            _ => {}
        }
        if self.is_file() {
            pb::VmaKind::File
        } else if self.shared {
            pb::VmaKind::SharedAnon
        } else {
            pb::VmaKind::Anon
        }
    }

    /// `PROT_*` bits.
    pub fn prot(&self) -> u32 {
        let mut prot = libc::PROT_NONE;
        if self.read {
            prot |= libc::PROT_READ;
        }
        if self.write {
            prot |= libc::PROT_WRITE;
        }
        if self.exec {
            prot |= libc::PROT_EXEC;
        }
        prot as u32
    }

    /// The image's description of this mapping.
    ///
    /// `flags` is `MAP_SHARED` or `MAP_PRIVATE`, plus `MAP_ANONYMOUS` for
    /// the anonymous kinds (`Anon`, `Heap`, `Stack`, `SharedAnon`); the
    /// kernel-provided mappings carry only `MAP_PRIVATE`. `name` is the
    /// last column as shown. `file` is set for file mappings, with the path
    /// as shown (a deleted file keeps its " (deleted)" suffix, so the
    /// destination cannot mistake another file for it) and `dev` in glibc's
    /// `makedev` encoding; `size` and `mtime_ns` are left 0 for the caller
    /// to fill from `stat` (of `/proc/PID/map_files/…` for deleted files).
    pub fn to_vma(&self) -> pb::Vma {
        let kind = self.kind();
        let mut flags = if self.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        if matches!(
            kind,
            pb::VmaKind::Anon | pb::VmaKind::Heap | pb::VmaKind::Stack | pb::VmaKind::SharedAnon
        ) {
            flags |= libc::MAP_ANONYMOUS;
        }
        let file = (kind == pb::VmaKind::File).then(|| pb::FileRef {
            path: self.path.clone().unwrap_or_default(),
            dev: libc::makedev(self.dev_major, self.dev_minor),
            inode: self.inode,
            size: 0,
            mtime_ns: 0,
        });
        let (shm_ino, shm_dev) = self.shm_key().unwrap_or_default();
        pb::Vma {
            start: self.start,
            end: self.end,
            prot: self.prot(),
            flags: flags as u32,
            offset: self.offset,
            kind: kind as i32,
            file,
            name: self.path.clone().unwrap_or_default(),
            shm_ino,
            shm_dev,
        }
    }
}

/// Splits off the next whitespace-separated field, returning it and the
/// rest (which still starts with the separator).
fn next_field(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches([' ', '\t']);
    if s.is_empty() {
        return None;
    }
    let end = s.find([' ', '\t']).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

fn parse_map_line(line: &str) -> Result<MapEntry, String> {
    let (range, rest) = next_field(line).ok_or("empty line")?;
    let (perms, rest) = next_field(rest).ok_or("no permissions")?;
    let (offset, rest) = next_field(rest).ok_or("no offset")?;
    let (dev, rest) = next_field(rest).ok_or("no device")?;
    let (inode, rest) = next_field(rest).ok_or("no inode")?;

    let (start, end) = range
        .split_once('-')
        .ok_or_else(|| format!("address range {range:?} has no '-'"))?;
    let hex =
        |s: &str, name: &str| u64::from_str_radix(s, 16).map_err(|e| format!("{name} {s:?}: {e}"));
    let start = hex(start, "start address")?;
    let end = hex(end, "end address")?;
    if start >= end {
        return Err(format!("empty or reversed range {start:#x}-{end:#x}"));
    }

    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err(format!("permissions {perms:?} are not 4 characters"));
    }
    let flag = |i: usize, yes: u8| match p[i] {
        b'-' => Ok(false),
        c if c == yes => Ok(true),
        _ => Err(format!(
            "permissions {perms:?}: unexpected {:?}",
            p[i] as char
        )),
    };
    let read = flag(0, b'r')?;
    let write = flag(1, b'w')?;
    let exec = flag(2, b'x')?;
    let shared = match p[3] {
        b's' => true,
        b'p' => false,
        c => return Err(format!("permissions {perms:?}: unexpected {:?}", c as char)),
    };

    let offset = hex(offset, "offset")?;
    let (major, minor) = dev
        .split_once(':')
        .ok_or_else(|| format!("device {dev:?} has no ':'"))?;
    let dev_num = |s: &str| u32::from_str_radix(s, 16).map_err(|e| format!("device {dev:?}: {e}"));
    let dev_major = dev_num(major)?;
    let dev_minor = dev_num(minor)?;
    let inode = inode
        .parse::<u64>()
        .map_err(|e| format!("inode {inode:?}: {e}"))?;

    // The kernel pads the path column with spaces; the path itself may hold
    // spaces (even trailing ones), so only the padding in front goes.
    let path = rest.trim_start_matches([' ', '\t']);
    let path = (!path.is_empty()).then(|| path.to_owned());

    Ok(MapEntry {
        start,
        end,
        read,
        write,
        exec,
        shared,
        offset,
        dev_major,
        dev_minor,
        inode,
        path,
    })
}

/// Parses `/proc/PID/maps`. Empty lines are skipped; any malformed line is
/// a [`ProcError::Parse`] with its line number, and so is a mapping that
/// does not start at or after the end of the one before: the kernel lists
/// them ascending and disjoint, and everything downstream (the byte counts
/// included, which could otherwise overflow) relies on it.
pub fn parse_maps(text: &str) -> Result<Vec<MapEntry>, ProcError> {
    let mut out: Vec<MapEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m = parse_map_line(line).map_err(|r| parse_err("maps", i + 1, r))?;
        if let Some(prev) = out.last().filter(|p| m.start < p.end) {
            return Err(parse_err(
                "maps",
                i + 1,
                format!(
                    "{:#x}-{:#x} overlaps or precedes {:#x}-{:#x}",
                    m.start, m.end, prev.start, prev.end
                ),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// Bytes of the mappings whose pages may have to be sent: every anonymous
/// mapping (private or shared, heap, stack, whatever its protection, since
/// a page may have been written before an `mprotect`) and every writable
/// private file mapping (its copied-on-write pages). An upper bound on
/// round 0, for progress estimates; untouched pages are counted too.
pub fn dumpable_bytes(maps: &[MapEntry]) -> u64 {
    maps.iter()
        .filter(|m| !m.is_special())
        .filter(|m| !m.is_file() || (m.write && !m.shared))
        .map(MapEntry::len)
        .sum()
}

// ---------------------------------------------------------------- status

/// The fields of `/proc/PID/status` ferry uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// `comm`, as escaped by the kernel (`\n` and `\\`).
    pub name: String,
    /// `R`, `S`, `D`, `T`, `t`, `Z`, `X`, `I`, …
    pub state: char,
    pub tgid: i32,
    pub pid: i32,
    pub ppid: i32,
    pub tracer_pid: i32,
    /// Real, effective, saved, filesystem.
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub threads: u32,
    /// `Kthread: 1` (kernels from 6.9 on say so; older ones don't, and
    /// this stays false: check for an empty `maps` too).
    pub kthread: bool,
    pub sig_pnd: u64,
    pub shd_pnd: u64,
    pub sig_blk: u64,
    pub sig_ign: u64,
    pub sig_cgt: u64,
    pub cap_eff: u64,
    /// Absent for kernel threads and zombies.
    pub vm_rss_kb: Option<u64>,
    /// `Umask` (octal); absent for kernel threads.
    pub umask: Option<u32>,
    /// `Seccomp`: 0 none, 1 strict, 2 filters (`Seccomp_filters` of them).
    pub seccomp: u32,
    pub seccomp_filters: u32,
}

impl Status {
    /// Why a process or thread with this status cannot be restored as it
    /// is, if it runs under seccomp in strict mode (which allows no call
    /// ferry's restore could be finished by). Filters are carried over.
    pub fn seccomp_refusal(&self) -> Option<String> {
        (self.seccomp == 1)
            .then(|| "runs in seccomp strict mode, which a restore cannot enter for it".to_string())
    }
}

/// Parses `/proc/PID/status` (or `/proc/PID/task/TID/status`). Every field
/// of [`Status`] is required except `Kthread` and `VmRSS`; unknown fields
/// are ignored.
pub fn parse_status(text: &str) -> Result<Status, ProcError> {
    const WHAT: &str = "status";
    #[derive(Default)]
    struct Seen {
        name: bool,
        state: bool,
        tgid: bool,
        pid: bool,
        ppid: bool,
        tracer: bool,
        uid: bool,
        gid: bool,
        threads: bool,
        masks: [bool; 6],
    }
    let mut st = Status::default();
    let mut seen = Seen::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((key, value)) = line.split_once(':') else {
            if line.trim().is_empty() {
                continue;
            }
            return Err(parse_err(WHAT, n, format!("no ':' in {line:?}")));
        };
        // The name keeps its inner and trailing spaces; only the tab after
        // the colon goes.
        let raw = value.strip_prefix('\t').unwrap_or(value);
        let value = value.trim();
        let int = |v: &str| {
            v.parse::<i32>()
                .map_err(|e| parse_err(WHAT, n, format!("{key} {v:?}: {e}")))
        };
        let mask = |v: &str| {
            u64::from_str_radix(v, 16).map_err(|e| parse_err(WHAT, n, format!("{key} {v:?}: {e}")))
        };
        let ids = |v: &str| -> Result<[u32; 4], ProcError> {
            let mut out = [0u32; 4];
            let mut it = v.split_whitespace();
            for slot in &mut out {
                let f = it
                    .next()
                    .ok_or_else(|| parse_err(WHAT, n, format!("{key}: fewer than 4 ids")))?;
                *slot = f
                    .parse()
                    .map_err(|e| parse_err(WHAT, n, format!("{key} {f:?}: {e}")))?;
            }
            Ok(out)
        };
        match key {
            "Name" => {
                st.name = raw.to_owned();
                seen.name = true;
            }
            "State" => {
                st.state = value
                    .chars()
                    .next()
                    .ok_or_else(|| parse_err(WHAT, n, "empty State"))?;
                seen.state = true;
            }
            "Tgid" => {
                st.tgid = int(value)?;
                seen.tgid = true;
            }
            "Pid" => {
                st.pid = int(value)?;
                seen.pid = true;
            }
            "PPid" => {
                st.ppid = int(value)?;
                seen.ppid = true;
            }
            "TracerPid" => {
                st.tracer_pid = int(value)?;
                seen.tracer = true;
            }
            "Uid" => {
                st.uid = ids(value)?;
                seen.uid = true;
            }
            "Gid" => {
                st.gid = ids(value)?;
                seen.gid = true;
            }
            "Threads" => {
                st.threads = value
                    .parse()
                    .map_err(|e| parse_err(WHAT, n, format!("Threads {value:?}: {e}")))?;
                seen.threads = true;
            }
            "Kthread" => st.kthread = value == "1",
            "SigPnd" => (st.sig_pnd, seen.masks[0]) = (mask(value)?, true),
            "ShdPnd" => (st.shd_pnd, seen.masks[1]) = (mask(value)?, true),
            "SigBlk" => (st.sig_blk, seen.masks[2]) = (mask(value)?, true),
            "SigIgn" => (st.sig_ign, seen.masks[3]) = (mask(value)?, true),
            "SigCgt" => (st.sig_cgt, seen.masks[4]) = (mask(value)?, true),
            "CapEff" => (st.cap_eff, seen.masks[5]) = (mask(value)?, true),
            "Seccomp" => st.seccomp = int(value)? as u32,
            "Seccomp_filters" => st.seccomp_filters = int(value)? as u32,
            "Umask" => {
                st.umask = Some(
                    u32::from_str_radix(value, 8)
                        .map_err(|e| parse_err(WHAT, n, format!("Umask {value:?}: {e}")))?,
                );
            }
            "VmRSS" => {
                let kb = value.strip_suffix("kB").unwrap_or(value).trim();
                st.vm_rss_kb = Some(
                    kb.parse()
                        .map_err(|e| parse_err(WHAT, n, format!("VmRSS {value:?}: {e}")))?,
                );
            }
            _ => {}
        }
    }
    let required = [
        ("Name", seen.name),
        ("State", seen.state),
        ("Tgid", seen.tgid),
        ("Pid", seen.pid),
        ("PPid", seen.ppid),
        ("TracerPid", seen.tracer),
        ("Uid", seen.uid),
        ("Gid", seen.gid),
        ("Threads", seen.threads),
        ("SigPnd", seen.masks[0]),
        ("ShdPnd", seen.masks[1]),
        ("SigBlk", seen.masks[2]),
        ("SigIgn", seen.masks[3]),
        ("SigCgt", seen.masks[4]),
        ("CapEff", seen.masks[5]),
    ];
    if let Some((field, _)) = required.iter().find(|(_, ok)| !ok) {
        return Err(parse_err(WHAT, 0, format!("missing field {field}")));
    }
    Ok(st)
}

// ---------------------------------------------------------------- fdinfo

/// The fields of `/proc/PID/fdinfo/FD` common to every kind of file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdInfo {
    /// File position.
    pub pos: u64,
    /// `O_*` open flags (octal in the file).
    pub flags: u32,
    /// Mount id, as in `/proc/PID/mountinfo`; 0 if the kernel does not
    /// show it (before 3.15).
    pub mnt_id: u32,
    /// Inode number; 0 if the kernel does not show it (before 5.14).
    pub ino: u64,
}

/// Parses `/proc/PID/fdinfo/FD`: `pos` and `flags` are required, the
/// lines specific to a file kind (`eventfd-count`, `tfd`, `inotify`, …) are
/// ignored.
pub fn parse_fdinfo(text: &str) -> Result<FdInfo, ProcError> {
    const WHAT: &str = "fdinfo";
    let (mut pos, mut flags, mut mnt_id, mut ino) = (None, None, 0u32, 0u64);
    for (i, line) in text.lines().enumerate() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let bad =
            |e: std::num::ParseIntError| parse_err(WHAT, i + 1, format!("{key} {value:?}: {e}"));
        match key {
            "pos" => pos = Some(value.parse::<u64>().map_err(bad)?),
            "flags" => flags = Some(u32::from_str_radix(value, 8).map_err(bad)?),
            "mnt_id" => mnt_id = value.parse::<u32>().map_err(bad)?,
            "ino" => ino = value.parse::<u64>().map_err(bad)?,
            _ => {}
        }
    }
    Ok(FdInfo {
        pos: pos.ok_or_else(|| parse_err(WHAT, 0, "missing field pos"))?,
        flags: flags.ok_or_else(|| parse_err(WHAT, 0, "missing field flags"))?,
        mnt_id,
        ino,
    })
}

/// The `key:` lines of an fdinfo text, trimmed, with their line numbers.
fn fdinfo_fields(text: &str) -> impl Iterator<Item = (usize, &str, &str)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| l.split_once(':').map(|(k, v)| (i + 1, k.trim(), v.trim())))
}

/// The value of the one required `key` of an fdinfo text.
fn fdinfo_field<'a>(
    text: &'a str,
    what: &'static str,
    key: &str,
) -> Result<(usize, &'a str), ProcError> {
    fdinfo_fields(text)
        .find(|(_, k, _)| *k == key)
        .map(|(i, _, v)| (i, v))
        .ok_or_else(|| parse_err(what, 0, format!("missing field {key}")))
}

/// An eventfd's `eventfd-count` and `eventfd-semaphore` (the latter absent
/// before Linux 6.7: then `false`).
pub fn parse_eventfd(text: &str) -> Result<(u64, bool), ProcError> {
    const WHAT: &str = "eventfd fdinfo";
    let (i, v) = fdinfo_field(text, WHAT, "eventfd-count")?;
    // The kernel prints the count in hex (`%16llx`).
    let count =
        u64::from_str_radix(v, 16).map_err(|e| parse_err(WHAT, i, format!("count {v:?}: {e}")))?;
    let semaphore = match fdinfo_field(text, WHAT, "eventfd-semaphore") {
        Ok((_, "1")) => true,
        Ok((_, "0")) | Err(_) => false,
        Ok((i, v)) => return Err(parse_err(WHAT, i, format!("semaphore {v:?}"))),
    };
    Ok((count, semaphore))
}

/// `(seconds, nanoseconds)` as timerfd's fdinfo prints a timespec.
fn parse_timespec(v: &str) -> Option<u64> {
    let (s, ns) = v.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    let (s, ns) = (
        s.trim().parse::<u64>().ok()?,
        ns.trim().parse::<u64>().ok()?,
    );
    if ns >= 1_000_000_000 {
        return None;
    }
    s.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// A timerfd's clock, pending expirations, settime flags and timer.
pub fn parse_timerfd(text: &str) -> Result<pb::Timerfd, ProcError> {
    const WHAT: &str = "timerfd fdinfo";
    let num = |key: &str, radix: u32| -> Result<u64, ProcError> {
        let (i, v) = fdinfo_field(text, WHAT, key)?;
        u64::from_str_radix(v, radix).map_err(|e| parse_err(WHAT, i, format!("{key} {v:?}: {e}")))
    };
    let time = |key: &str| -> Result<u64, ProcError> {
        let (i, v) = fdinfo_field(text, WHAT, key)?;
        parse_timespec(v).ok_or_else(|| parse_err(WHAT, i, format!("{key} {v:?}")))
    };
    let clockid = num("clockid", 10)?;
    Ok(pb::Timerfd {
        clockid: i32::try_from(clockid)
            .map_err(|_| parse_err(WHAT, 0, format!("clockid {clockid}")))?,
        ticks: num("ticks", 10)?,
        settime_flags: u32::try_from(num("settime flags", 8)?)
            .map_err(|_| parse_err(WHAT, 0, "settime flags out of range"))?,
        value_ns: time("it_value")?,
        interval_ns: time("it_interval")?,
    })
}

/// A signalfd's mask (`sigmask`, hex), bit n-1 = signal n.
pub fn parse_signalfd(text: &str) -> Result<u64, ProcError> {
    const WHAT: &str = "signalfd fdinfo";
    let (i, v) = fdinfo_field(text, WHAT, "sigmask")?;
    u64::from_str_radix(v, 16).map_err(|e| parse_err(WHAT, i, format!("sigmask {v:?}: {e}")))
}

/// An epoll's registrations, one `tfd:` line each:
/// `tfd: FD events: HEX data: HEX pos:N ino:HEX sdev:HEX`.
pub fn parse_epoll(text: &str) -> Result<Vec<pb::EpollTarget>, ProcError> {
    const WHAT: &str = "epoll fdinfo";
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(rest) = line.strip_prefix("tfd:") else {
            continue;
        };
        let bad = |why: String| parse_err(WHAT, i + 1, why);
        let mut words = rest.split_whitespace();
        let fd = words.next().unwrap_or("");
        let fd = fd
            .parse::<i32>()
            .map_err(|e| bad(format!("tfd {fd:?}: {e}")))?;
        let mut t = pb::EpollTarget {
            fd,
            ..Default::default()
        };
        let (mut events, mut data) = (None, None);
        while let Some(w) = words.next() {
            // "events:" and "data:" are followed by a space; "ino:" is not.
            let (key, value) = match w.split_once(':') {
                Some((k, "")) => (k, words.next().unwrap_or("")),
                Some((k, v)) => (k, v),
                None => return Err(bad(format!("word {w:?}"))),
            };
            let hex =
                |v: &str| u64::from_str_radix(v, 16).map_err(|e| bad(format!("{key} {v:?}: {e}")));
            match key {
                "events" => {
                    events = Some(
                        u32::try_from(hex(value)?).map_err(|_| bad(format!("events {value}")))?,
                    )
                }
                "data" => data = Some(hex(value)?),
                "ino" => t.ino = hex(value)?,
                _ => {}
            }
        }
        t.events = events.ok_or_else(|| bad("no events".into()))?;
        t.data = data.ok_or_else(|| bad("no data".into()))?;
        out.push(t);
    }
    Ok(out)
}

// ---------------------------------------------------------------- stat

/// Field 22 of `/proc/PID/stat`, the start time in clock ticks since boot:
/// with the pid, it names a process unambiguously (pids are reused). The
/// command name (field 2) may hold spaces and parentheses, so the fields
/// are counted from the last `)`.
pub fn parse_stat_starttime(text: &str) -> Result<u64, ProcError> {
    let close = text
        .rfind(')')
        .ok_or_else(|| parse_err("stat", 1, "no ')' after the command name"))?;
    // Fields after the name start at 3 (state); 22 is the 20th of them.
    let field = text[close + 1..]
        .split_whitespace()
        .nth(22 - 3)
        .ok_or_else(|| parse_err("stat", 1, "fewer than 22 fields"))?;
    field
        .parse()
        .map_err(|e| parse_err("stat", 1, format!("starttime {field:?}: {e}")))
}

// ---------------------------------------------------------------- readers

fn proc_path(pid: i32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

fn map_io(pid: i32, path: &Path, err: io::Error) -> ProcError {
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => ProcError::NoProcess(pid),
        Some(libc::EACCES) | Some(libc::EPERM) => ProcError::Permission {
            pid,
            path: path.to_owned(),
        },
        _ => ProcError::Io {
            path: path.to_owned(),
            source: err,
        },
    }
}

fn read_text(pid: i32, rest: &str) -> Result<String, ProcError> {
    let path = proc_path(pid, rest);
    let bytes = fs::read(&path).map_err(|e| map_io(pid, &path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The mappings of process `pid`. A process that has exited but not been
/// reaped (or a kernel thread) has none.
pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>, ProcError> {
    // A running process's maps can be torn: the kernel reads them a
    // mapping at a time without holding the process's whole mm, so a
    // mapping that grows meanwhile can show twice, old and new end (seen
    // on ferry's own maps in CI: a malloc arena growing). A second read
    // sees it settled; a stopped process's maps parse the same every time,
    // so a real error stays one.
    let mut tries = 0;
    loop {
        match parse_maps(&read_text(pid, "maps")?) {
            Err(ProcError::Parse { .. }) if tries < 3 => tries += 1,
            r => return r,
        }
    }
}

/// The status of process `pid` (its thread-group leader).
pub fn read_status(pid: i32) -> Result<Status, ProcError> {
    parse_status(&read_text(pid, "status")?)
}

/// The start time of `pid` (see [`parse_stat_starttime`]).
pub fn read_starttime(pid: i32) -> Result<u64, ProcError> {
    parse_stat_starttime(&read_text(pid, "stat")?)
}

/// The POSIX timers of process `pid` as `/proc/PID/timers` lists them
/// (see [`parse_posix_timers`]).
pub fn read_posix_timers(pid: i32) -> Result<Vec<pb::PosixTimer>, ProcError> {
    parse_posix_timers(&read_text(pid, "timers")?)
}

/// Parses `/proc/PID/timers`: per timer an `ID:` line, then `signal:
/// SIGNO/VALUE` (the value in hex), `notify: KIND/pid.N` or `KIND/tid.N`
/// (KIND `signal`, `none` or `thread`; `tid` adds `SIGEV_THREAD_ID`) and
/// `ClockID:`. The times are not there: they are left 0.
pub fn parse_posix_timers(text: &str) -> Result<Vec<pb::PosixTimer>, ProcError> {
    const WHAT: &str = "/proc/PID/timers";
    let mut timers: Vec<pb::PosixTimer> = Vec::new();
    let mut seen = [false; 3];
    let check = |seen: &[bool; 3], line: usize| {
        if seen.iter().all(|&s| s) {
            Ok(())
        } else {
            Err(parse_err(
                WHAT,
                line,
                "a timer without its signal, notify and ClockID lines",
            ))
        }
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let int = |v: &str| {
            v.parse::<i32>()
                .map_err(|_| parse_err(WHAT, n, format!("not a number: {v:?}")))
        };
        if key == "ID" {
            if !timers.is_empty() {
                check(&seen, n)?;
            }
            seen = [false; 3];
            timers.push(pb::PosixTimer {
                id: int(value)?,
                ..Default::default()
            });
            continue;
        }
        let Some(t) = timers.last_mut() else {
            return Err(parse_err(WHAT, n, "a field before the first ID line"));
        };
        match key {
            "signal" => {
                let (signo, v) = value
                    .split_once('/')
                    .ok_or_else(|| parse_err(WHAT, n, "no '/' in the signal line"))?;
                t.signo = int(signo)?;
                t.value = u64::from_str_radix(v, 16)
                    .map_err(|_| parse_err(WHAT, n, format!("not a hex value: {v:?}")))?;
                seen[0] = true;
            }
            "notify" => {
                let bad = || parse_err(WHAT, n, format!("not KIND/pid.N or KIND/tid.N: {value:?}"));
                let (kind, target) = value.split_once('/').ok_or_else(bad)?;
                let (whom, id) = target.split_once('.').ok_or_else(bad)?;
                let kind = match kind {
                    "signal" => libc::SIGEV_SIGNAL,
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD,
                    _ => return Err(bad()),
                };
                (t.notify, t.notify_tid) = match whom {
                    "pid" => (kind, 0),
                    "tid" => (kind | libc::SIGEV_THREAD_ID, int(id)?),
                    _ => return Err(bad()),
                };
                seen[1] = true;
            }
            "ClockID" => {
                t.clock_id = int(value)?;
                seen[2] = true;
            }
            _ => {}
        }
    }
    if !timers.is_empty() {
        check(&seen, text.lines().count())?;
    }
    Ok(timers)
}

/// The thread ids of process `pid`, sorted. Threads come and go while
/// this runs unless the process is stopped.
pub fn list_tasks(pid: i32) -> Result<Vec<i32>, ProcError> {
    let path = proc_path(pid, "task");
    let mut tids = Vec::new();
    for entry in fs::read_dir(&path).map_err(|e| map_io(pid, &path, e))? {
        let entry = entry.map_err(|e| map_io(pid, &path, e))?;
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// The open file descriptors of `pid` with their `readlink` targets
/// (`/path`, `pipe:[ino]`, `socket:[ino]`, `anon_inode:[eventfd]`, …),
/// sorted by fd. A descriptor closed while this runs is left out.
pub fn list_fds(pid: i32) -> Result<Vec<(i32, String)>, ProcError> {
    let path = proc_path(pid, "fd");
    let mut fds = Vec::new();
    for entry in fs::read_dir(&path).map_err(|e| map_io(pid, &path, e))? {
        let entry = entry.map_err(|e| map_io(pid, &path, e))?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        match fs::read_link(entry.path()) {
            Ok(target) => fds.push((fd, target.to_string_lossy().into_owned())),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(map_io(pid, &entry.path(), e)),
        }
    }
    fds.sort_unstable_by_key(|(fd, _)| *fd);
    Ok(fds)
}

/// `/proc/PID/fdinfo/FD`. A missing file is [`ProcError::NoFd`] while the
/// process still exists, [`ProcError::NoProcess`] once it does not.
pub fn read_fdinfo(pid: i32, fd: i32) -> Result<FdInfo, ProcError> {
    parse_fdinfo(&read_fdinfo_text(pid, fd)?)
}

/// The text of `/proc/PID/fdinfo/FD`, for the parsers of one kind of file.
pub fn read_fdinfo_text(pid: i32, fd: i32) -> Result<String, ProcError> {
    match read_text(pid, &format!("fdinfo/{fd}")) {
        Ok(text) => Ok(text),
        Err(ProcError::NoProcess(_)) if Path::new(&format!("/proc/{pid}")).exists() => {
            Err(ProcError::NoFd { pid, fd })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on this project's machines (kernel 6.18): the maps of a
    // Python process holding a file whose name has spaces and parentheses,
    // an unlinked file, and shared `/dev/zero` mappings. The kernel here
    // lacks CONFIG_ANON_VMA_NAME, so the `[anon:…]`, `[anon_shmem:…]`,
    // memfd and SysV lines were written in the kernel's exact format
    // (memfd and SysV as captured from another process).
    const MAPS: &str = include_str!("../tests/fixtures/proc/maps");
    const STATUS_THREADS: &str = include_str!("../tests/fixtures/proc/status_threads");
    const STATUS_KTHREAD: &str = include_str!("../tests/fixtures/proc/status_kthread");
    const STAT_ODD_NAME: &str = include_str!("../tests/fixtures/proc/stat_odd_name");
    const FDINFO_FILE: &str = include_str!("../tests/fixtures/proc/fdinfo_file");
    const FDINFO_EVENTFD: &str = include_str!("../tests/fixtures/proc/fdinfo_eventfd");

    fn by_path<'a>(maps: &'a [MapEntry], path: &str) -> &'a MapEntry {
        maps.iter()
            .find(|m| m.path.as_deref() == Some(path))
            .unwrap_or_else(|| panic!("{path} not in the fixture"))
    }

    #[test]
    fn maps_fixture_parses() {
        let maps = parse_maps(MAPS).unwrap();
        assert_eq!(maps.len(), MAPS.lines().count());
        let first = &maps[0];
        assert_eq!(
            first,
            &MapEntry {
                start: 0x5655_04ab_b000,
                end: 0x5655_04ab_c000,
                read: true,
                write: false,
                exec: false,
                shared: false,
                offset: 0,
                dev_major: 0xfe,
                dev_minor: 0,
                inode: 18504,
                path: Some("/root/.pyenv/versions/3.11.7/bin/python3.11".into()),
            }
        );
        assert_eq!(first.len(), 0x1000);
        assert_eq!(first.kind(), pb::VmaKind::File);
        let libc_text = maps
            .iter()
            .find(|m| m.exec && m.path.as_deref().is_some_and(|p| p.ends_with("libc.so.6")))
            .unwrap();
        assert_eq!(libc_text.offset, 0x26000);
        let vsyscall = maps.last().unwrap();
        assert_eq!(vsyscall.start, 0xffff_ffff_ff60_0000);
        assert!(vsyscall.exec && !vsyscall.read);
    }

    #[test]
    fn maps_paths_with_spaces_and_deleted() {
        let maps = parse_maps(MAPS).unwrap();
        let spaced = by_path(&maps, "/tmp/fx/my file (v2).bin");
        assert!(spaced.shared && spaced.is_file() && !spaced.is_deleted());
        assert_eq!(spaced.file_path(), Some("/tmp/fx/my file (v2).bin"));

        let gone = by_path(&maps, "/tmp/fx/gone.bin (deleted)");
        assert!(gone.is_file() && gone.is_deleted());
        assert_eq!(gone.file_path(), Some("/tmp/fx/gone.bin"));
        assert_eq!(gone.kind(), pb::VmaKind::File);
        let vma = gone.to_vma();
        let file = vma.file.unwrap();
        assert_eq!(file.path, "/tmp/fx/gone.bin (deleted)");
        assert_eq!(file.inode, 10019154);
        assert_eq!(file.dev, libc::makedev(0xfe, 0));
        assert_eq!(vma.flags, libc::MAP_SHARED as u32);
        assert_eq!(vma.prot, (libc::PROT_READ | libc::PROT_WRITE) as u32);

        let memfd = by_path(&maps, "/memfd:ferry pool (deleted)");
        assert_eq!(memfd.kind(), pb::VmaKind::File);
        assert!(memfd.is_deleted());
    }

    #[test]
    fn shared_memory_objects_are_named_by_their_inode() {
        let maps = parse_maps(MAPS).unwrap();
        let key = |p: &str| by_path(&maps, p).shm_key();
        let shm = libc::makedev(0, 1);
        assert_eq!(key("[anon_shmem:ring]"), Some((2051, shm)));
        let memfd = by_path(&maps, "/memfd:ferry pool (deleted)");
        assert!(memfd.is_memfd() && !memfd.is_sysv());
        assert_eq!(memfd.shm_key(), Some((1027, shm)));
        let v = memfd.to_vma();
        assert_eq!(
            (v.shm_ino, v.shm_dev, v.kind()),
            (1027, shm, pb::VmaKind::File)
        );
        assert!(by_path(&maps, "/SYSV00000000 (deleted)").is_sysv());
        // Files, private memory and the heap are no such objects.
        for p in ["/tmp/fx/my file (v2).bin", "[heap]", "[anon:ferry buf]"] {
            assert_eq!(key(p), None, "{p}");
            assert_eq!(by_path(&maps, p).to_vma().shm_ino, 0, "{p}");
        }
    }

    #[test]
    fn maps_kinds() {
        let maps = parse_maps(MAPS).unwrap();
        let kind = |p: &str| by_path(&maps, p).kind();
        assert_eq!(kind("[heap]"), pb::VmaKind::Heap);
        assert_eq!(kind("[stack]"), pb::VmaKind::Stack);
        assert_eq!(kind("[vdso]"), pb::VmaKind::Vdso);
        assert_eq!(kind("[vvar]"), pb::VmaKind::Vvar);
        assert_eq!(kind("[vvar_vclock]"), pb::VmaKind::Vvar);
        assert_eq!(kind("[vsyscall]"), pb::VmaKind::Vsyscall);
        assert_eq!(kind("[anon:ferry buf]"), pb::VmaKind::Anon);
        assert_eq!(kind("[anon_shmem:ring]"), pb::VmaKind::SharedAnon);
        assert_eq!(kind("/dev/zero (deleted)"), pb::VmaKind::SharedAnon);
        assert_eq!(kind("/SYSV00000000 (deleted)"), pb::VmaKind::SharedAnon);
        assert!(!by_path(&maps, "/dev/zero (deleted)").is_file());

        let specials: Vec<_> = maps
            .iter()
            .filter(|m| m.is_special())
            .map(|m| m.path.clone().unwrap())
            .collect();
        assert_eq!(
            specials,
            ["[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]"]
        );

        let anon: Vec<_> = maps.iter().filter(|m| m.path.is_none()).collect();
        assert_eq!(anon.len(), 2);
        for m in &anon {
            assert_eq!(m.kind(), pb::VmaKind::Anon);
            let vma = m.to_vma();
            assert_eq!(vma.flags, (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32);
            assert!(vma.file.is_none());
            assert_eq!(vma.name, "");
        }
        // is_file and kind agree everywhere.
        for m in &maps {
            assert_eq!(m.is_file(), m.kind() == pb::VmaKind::File, "{m:?}");
            assert_eq!(m.to_vma().file.is_some(), m.is_file());
        }
    }

    #[test]
    fn to_vma_fields() {
        let maps = parse_maps(MAPS).unwrap();
        let heap = by_path(&maps, "[heap]").to_vma();
        assert_eq!(heap.kind, pb::VmaKind::Heap as i32);
        assert_eq!(heap.name, "[heap]");
        assert_eq!(heap.flags, (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32);
        let shm = by_path(&maps, "[anon_shmem:ring]").to_vma();
        assert_eq!(shm.flags, (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u32);
        let vdso = by_path(&maps, "[vdso]").to_vma();
        assert_eq!(vdso.flags, libc::MAP_PRIVATE as u32);
        assert_eq!(vdso.prot, (libc::PROT_READ | libc::PROT_EXEC) as u32);
        let data = maps
            .iter()
            .find(|m| m.write && m.path.as_deref().is_some_and(|p| p.ends_with("libc.so.6")))
            .unwrap()
            .to_vma();
        assert_eq!(data.offset, 0x1d3000);
        assert_eq!(data.flags, libc::MAP_PRIVATE as u32);
        assert_eq!(data.file.unwrap().inode, 326279);
    }

    #[test]
    fn dumpable_bytes_counts_anon_and_private_writable_files() {
        let maps = parse_maps(
            "1000-3000 rw-p 00000000 00:00 0 \n\
             3000-4000 r--p 00000000 00:00 0 \n\
             4000-5000 rw-p 00001000 fe:00 7 /lib/x.so\n\
             5000-6000 r--p 00000000 fe:00 7 /lib/x.so\n\
             6000-7000 rw-s 00000000 fe:00 8 /data\n\
             7000-9000 rw-s 00000000 00:01 9 /dev/zero (deleted)\n\
             9000-a000 r-xp 00000000 00:00 0 [vdso]\n",
        )
        .unwrap();
        assert_eq!(dumpable_bytes(&maps), 0x2000 + 0x1000 + 0x1000 + 0x2000);
    }

    #[test]
    fn maps_edge_columns() {
        // A path ending in spaces keeps them; tabs before it are padding;
        // a long device major; a 16-digit offset.
        let maps = parse_maps(
            "7f00-8f00 r--s ffffffffffff0000 103:0a 42\t  /a dir/f  \n\n\
             9000-a000 ---p 00000000 00:00 0",
        )
        .unwrap();
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].path.as_deref(), Some("/a dir/f  "));
        assert_eq!((maps[0].dev_major, maps[0].dev_minor), (0x103, 0xa));
        assert_eq!(maps[0].offset, 0xffff_ffff_ffff_0000);
        assert_eq!(maps[1].path, None);
        assert_eq!(maps[1].to_vma().prot, 0);
        assert_eq!(
            parse_maps("1000-2000 rw-p 0 00:00 0 [stack:1234]").unwrap()[0].kind(),
            pb::VmaKind::Stack
        );
    }

    #[test]
    fn maps_malformed_lines_are_errors() {
        let good = "1000-2000 rw-p 00000000 00:00 0 \n";
        for (bad, reason) in [
            ("1000 rw-p 00000000 00:00 0", "no '-'"),
            ("10g0-2000 rw-p 00000000 00:00 0", "start address"),
            ("2000-1000 rw-p 00000000 00:00 0", "reversed"),
            ("1000-1000 rw-p 00000000 00:00 0", "reversed"),
            ("1000-2000 rw- 00000000 00:00 0", "4 characters"),
            ("1000-2000 rwxq 00000000 00:00 0", "unexpected 'q'"),
            ("1000-2000 wr-p 00000000 00:00 0", "unexpected"),
            ("1000-2000 rw-p zz 00:00 0", "offset"),
            ("1000-2000 rw-p 0 0000 0", "no ':'"),
            ("1000-2000 rw-p 0 0g:00 0", "device"),
            ("1000-2000 rw-p 0 00:00 -1", "inode"),
            ("1000-2000 rw-p 0 00:00", "no inode"),
            ("1000-2000", "no permissions"),
            ("1000-20000000000000000 rw-p 0 00:00 0", "end address"),
            ("é-ü rw-p 0 00:00 0", "start address"),
            ("1800-3000 rw-p 0 00:00 0", "overlaps"),
            ("0-1000 rw-p 0 00:00 0", "precedes"),
        ] {
            let text = format!("{good}{bad}\n");
            match parse_maps(&text) {
                Err(ProcError::Parse {
                    what,
                    line,
                    reason: r,
                }) => {
                    assert_eq!((what, line), ("maps", 2), "{bad}");
                    assert!(r.contains(reason), "{bad}: {r}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    /// Found by the `procfs` fuzz target: two huge overlapping mappings
    /// overflowed the sum in `dumpable_bytes`.
    #[test]
    fn overlapping_maps_are_refused_before_anything_sums_them() {
        let text = "0-ffffffffff601000 rw-p 0 00:00 0\n\
                    ffff00-ffffffffff601000 --xp 0 00:00 0 [vsyscall]\n";
        assert!(matches!(
            parse_maps(text),
            Err(ProcError::Parse { line: 2, .. })
        ));
        let disjoint = "0-8000000000000000 rw-p 0 00:00 0\n\
                        8000000000000000-ffffffffffffffff rw-p 0 00:00 0\n";
        let maps = parse_maps(disjoint).unwrap();
        assert_eq!(dumpable_bytes(&maps), u64::MAX);
    }

    #[test]
    fn status_of_a_threaded_process() {
        let st = parse_status(STATUS_THREADS).unwrap();
        assert_eq!(st.name, "my (odd) name");
        assert_eq!(st.state, 'R');
        assert_eq!(
            (st.tgid, st.pid, st.ppid, st.tracer_pid),
            (32564, 32564, 32561, 0)
        );
        assert_eq!(st.uid, [0; 4]);
        assert_eq!(st.threads, 2);
        assert!(!st.kthread);
        // SIGUSR2 (12) blocked; SIGUSR1 (10) caught.
        assert_eq!(st.sig_blk, 1 << (12 - 1));
        assert_ne!(st.sig_cgt & (1 << (10 - 1)), 0);
        assert_eq!(st.sig_ign, 0x0100_1000);
        assert_eq!(st.cap_eff, 0x1ff_feff_ffff);
        assert_eq!(st.vm_rss_kb, Some(13928));
        assert_eq!(st.umask, Some(0o022));
        assert_eq!(st.seccomp_refusal(), None);
        let filtered = STATUS_THREADS
            .replace("Seccomp:\t0", "Seccomp:\t2")
            .replace("Seccomp_filters:\t0", "Seccomp_filters:\t3");
        let st = parse_status(&filtered).unwrap();
        assert_eq!((st.seccomp, st.seccomp_filters), (2, 3));
        assert_eq!(st.seccomp_refusal(), None, "filters are carried");
        let strict = STATUS_THREADS.replace("Seccomp:\t0", "Seccomp:\t1");
        let st = parse_status(&strict).unwrap();
        assert!(st.seccomp_refusal().unwrap().contains("strict mode"));
    }

    #[test]
    fn posix_timers_are_read_by_their_id_lines() {
        let two = "ID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.27309\nClockID: 1\n\
                   ID: 1\nsignal: 10/00007f0000001000\nnotify: thread/tid.27310\nClockID: 0\n";
        let t = parse_posix_timers(two).unwrap();
        assert_eq!(
            t,
            [
                pb::PosixTimer {
                    id: 0,
                    clock_id: 1,
                    notify: libc::SIGEV_SIGNAL,
                    signo: 14,
                    ..Default::default()
                },
                pb::PosixTimer {
                    id: 1,
                    clock_id: 0,
                    notify: libc::SIGEV_THREAD | libc::SIGEV_THREAD_ID,
                    signo: 10,
                    value: 0x7f00_0000_1000,
                    notify_tid: 27310,
                    ..Default::default()
                },
            ]
        );
        assert_eq!(parse_posix_timers("").unwrap(), []);
        let none = "ID: 5\nsignal: 0/0000000000000007\nnotify: none/pid.9\nClockID: 2\n";
        assert_eq!(
            parse_posix_timers(none).unwrap()[0].notify,
            libc::SIGEV_NONE
        );
    }

    #[test]
    fn malformed_posix_timer_lists_are_errors() {
        for bad in [
            "signal: 14/0\n",
            "ID: x\n",
            "ID: 1\nsignal: 14/0\n",
            "ID: 1\nsignal: 14/zz\nnotify: signal/pid.1\nClockID: 0\n",
            "ID: 1\nsignal: 14/0\nnotify: later/pid.1\nClockID: 0\n",
            "ID: 1\nsignal: 14/0\nnotify: signal/tid.x\nClockID: 0\n",
            "ID: 1\nsignal: 14/0\nnotify: signal/pid.1\nID: 2\n",
        ] {
            assert!(
                matches!(parse_posix_timers(bad), Err(ProcError::Parse { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn status_of_a_kernel_thread() {
        let st = parse_status(STATUS_KTHREAD).unwrap();
        assert_eq!(st.name, "kthreadd");
        assert_eq!((st.pid, st.ppid, st.state), (2, 0, 'S'));
        assert!(st.kthread);
        assert_eq!(st.sig_ign, u64::MAX);
        assert_eq!(st.vm_rss_kb, None);
    }

    #[test]
    fn status_malformed() {
        let bad_line = |text: &str, want_line: usize, want: &str| match parse_status(text) {
            Err(ProcError::Parse { what, line, reason }) => {
                assert_eq!((what, line), ("status", want_line), "{text}");
                assert!(reason.contains(want), "{reason}");
            }
            other => panic!("{text}: {other:?}"),
        };
        let with = |key: &str, value: &str| {
            STATUS_KTHREAD
                .lines()
                .map(|l| {
                    if l.starts_with(&format!("{key}:")) {
                        format!("{key}:\t{value}")
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let line_of = |key: &str| {
            1 + STATUS_KTHREAD
                .lines()
                .position(|l| l.starts_with(&format!("{key}:")))
                .unwrap()
        };
        bad_line(&with("Pid", "x"), line_of("Pid"), "Pid");
        bad_line(&with("Uid", "0\t0\t0"), line_of("Uid"), "fewer than 4");
        bad_line(&with("SigBlk", "zz"), line_of("SigBlk"), "SigBlk");
        bad_line(&with("State", ""), line_of("State"), "empty State");
        let bad_rss = STATUS_THREADS.replace("VmRSS:\t   13928 kB", "VmRSS:\tlots kB");
        assert!(matches!(
            parse_status(&bad_rss),
            Err(ProcError::Parse { .. })
        ));
        let garbage = format!("{STATUS_KTHREAD}garbage line\n");
        bad_line(&garbage, STATUS_KTHREAD.lines().count() + 1, "no ':'");
        let no_pid: String = STATUS_KTHREAD
            .lines()
            .filter(|l| !l.starts_with("Pid:"))
            .map(|l| format!("{l}\n"))
            .collect();
        bad_line(&no_pid, 0, "missing field Pid");
        bad_line("", 0, "missing field Name");
    }

    #[test]
    fn fdinfo_fixtures() {
        let f = parse_fdinfo(FDINFO_FILE).unwrap();
        assert_eq!(f.pos, 100);
        assert_eq!(f.mnt_id, 27);
        // The kernel's O_LARGEFILE (0o100000); libc's is 0 on x86_64.
        let want = libc::O_RDWR | libc::O_APPEND | libc::O_CLOEXEC | 0o100000;
        assert_eq!(f.flags, want as u32);
        let e = parse_fdinfo(FDINFO_EVENTFD).unwrap();
        assert_eq!((e.pos, e.flags, e.mnt_id), (0, 0o2000002, 17));

        assert_eq!(
            parse_fdinfo("pos:\t1\nflags:\t02\n").unwrap(),
            FdInfo {
                pos: 1,
                flags: 2,
                mnt_id: 0,
                ino: 0
            }
        );
        for (bad, line) in [("pos:\t1\nflags:\t09\n", 2), ("pos:\t-1\nflags:\t0\n", 1)] {
            assert!(
                matches!(parse_fdinfo(bad), Err(ProcError::Parse { line: l, .. }) if l == line),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_fdinfo("flags:\t0\n"),
            Err(ProcError::Parse { line: 0, .. })
        ));
    }

    #[test]
    fn fdinfo_of_special_files() {
        assert_eq!(parse_eventfd(FDINFO_EVENTFD).unwrap(), (5, false));
        // The count is hex: 0x1f = 31.
        let sem = "eventfd-count:               1f\neventfd-semaphore: 1\n";
        assert_eq!(parse_eventfd(sem).unwrap(), (31, true));
        assert!(parse_eventfd("eventfd-count: xyz\n").is_err());
        assert!(parse_eventfd("pos:\t0\n").is_err());

        let t = parse_timerfd(include_str!("../tests/fixtures/proc/fdinfo_timerfd")).unwrap();
        assert_eq!(
            t,
            pb::Timerfd {
                clockid: 1,
                ticks: 2,
                settime_flags: 1,
                value_ns: 4_999_376_395,
                interval_ns: 1_500_000_000,
            }
        );
        let broken =
            "clockid: 1\nticks: 0\nsettime flags: 00\nit_value: (4 5)\nit_interval: (0, 0)\n";
        assert!(matches!(
            parse_timerfd(broken),
            Err(ProcError::Parse { line: 4, .. })
        ));
        assert!(parse_timerfd("clockid: 1\n").is_err());

        let mask = parse_signalfd(include_str!("../tests/fixtures/proc/fdinfo_signalfd")).unwrap();
        assert_eq!(mask, (1 << 9) | (1 << 11)); // SIGUSR1, SIGUSR2
        assert!(parse_signalfd("sigmask:\tzz\n").is_err());

        let e = parse_epoll(include_str!("../tests/fixtures/proc/fdinfo_epoll")).unwrap();
        assert_eq!(
            e,
            vec![
                pb::EpollTarget {
                    fd: 5,
                    events: 0x8000_0019,
                    data: 5,
                    ino: 0x40e,
                },
                pb::EpollTarget {
                    fd: 3,
                    events: 0x19,
                    data: u64::MAX,
                    ino: 0x5abe8,
                },
            ]
        );
        assert!(parse_epoll("pos:\t0\nflags:\t02\n").unwrap().is_empty());
        for bad in [
            "tfd: x events: 1 data: 1\n",
            "tfd: 3 events: 1\n",
            "tfd: 3 events: 1ffffffff data: 0\n",
            "tfd: 3 data: 0\n",
        ] {
            assert!(parse_epoll(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stat_starttime() {
        assert_eq!(parse_stat_starttime(STAT_ODD_NAME).unwrap(), 151216);
        // A name that is itself a closing parenthesis followed by fields.
        let tricky = "7 () 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20) S 1 1 1 0 -1 \
                      0 0 0 0 0 0 0 0 0 20 0 1 0 999 0";
        assert_eq!(parse_stat_starttime(tricky).unwrap(), 999);
        assert!(matches!(
            parse_stat_starttime("12 (x) S 1 2"),
            Err(ProcError::Parse { what: "stat", .. })
        ));
        assert!(parse_stat_starttime("no paren").is_err());
        assert!(parse_stat_starttime("1 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 -5").is_err());
    }

    /// A pid that is not in use: a child that has been reaped (its pid
    /// could only be reused after the whole pid space wrapped around).
    fn dead_pid() -> i32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        pid
    }

    #[test]
    fn readers_on_self() {
        let me = std::process::id() as i32;
        let maps = read_maps(me).unwrap();
        assert!(maps.iter().any(|m| m.kind() == pb::VmaKind::Stack));
        assert!(maps.iter().any(|m| m.is_special()));
        assert!(dumpable_bytes(&maps) > 0);

        let st = read_status(me).unwrap();
        assert_eq!((st.pid, st.tgid), (me, me));
        assert!(st.threads >= 1);
        assert!(!st.kthread);

        let tasks = list_tasks(me).unwrap();
        assert!(tasks.contains(&me));
        assert!(tasks.windows(2).all(|w| w[0] < w[1]));

        let file = fs::File::open("/proc/self/status").unwrap();
        let fds = list_fds(me).unwrap();
        assert!(fds.iter().any(|(_, t)| t.starts_with("/proc/")));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let info = read_fdinfo(me, fd).unwrap();
        assert_eq!(info.flags & libc::O_ACCMODE as u32, libc::O_RDONLY as u32);
        drop(file);

        assert!(read_starttime(me).unwrap() > 0);
        assert!(matches!(
            read_fdinfo(me, 1 << 30),
            Err(ProcError::NoFd { .. })
        ));
    }

    #[test]
    fn readers_on_a_dead_pid() {
        let pid = dead_pid();
        assert!(matches!(read_maps(pid), Err(ProcError::NoProcess(p)) if p == pid));
        assert!(matches!(read_status(pid), Err(ProcError::NoProcess(_))));
        assert!(matches!(list_tasks(pid), Err(ProcError::NoProcess(_))));
        assert!(matches!(list_fds(pid), Err(ProcError::NoProcess(_))));
        assert!(matches!(read_fdinfo(pid, 0), Err(ProcError::NoProcess(_))));
        assert!(matches!(read_maps(-1), Err(ProcError::NoProcess(-1))));
        // pid_max itself is never a pid.
        let pid_max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(matches!(read_status(pid_max), Err(ProcError::NoProcess(_))));
    }
}

// ------------------------------------------------- process state (image)
//
// What `crate::state` needs beyond the pre-copy: the rest of `stat`, the
// credentials, the resource limits and the personality. Same rules as
// above: pure parsers over text, readers that only fetch it.

/// The fields of `/proc/PID/stat` that describe the process for the image:
/// its place in the process tree and the `mm` bounds `PR_SET_MM_MAP`
/// takes back on restore. The bounds read as 0 unless the reader may
/// ptrace the process (root here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatFields {
    /// Field 4.
    pub ppid: i32,
    /// Field 5: the process group.
    pub pgrp: i32,
    /// Field 6: the session.
    pub session: i32,
    /// Fields 26 and 27: the text segment (`startcode`, `endcode`).
    pub start_code: u64,
    pub end_code: u64,
    /// Field 28: the bottom of the initial stack (`startstack`).
    pub start_stack: u64,
    /// Fields 45 to 47: data segment and the start of the heap.
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    /// Fields 48 to 51: where `argv` and `envp` strings live.
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// Parses `/proc/PID/stat` into [`StatFields`]. Fields are counted from
/// the last `)`, as the command name may hold spaces and parentheses.
pub fn parse_stat_fields(text: &str) -> Result<StatFields, ProcError> {
    const WHAT: &str = "stat";
    let close = text
        .rfind(')')
        .ok_or_else(|| parse_err(WHAT, 1, "no ')' after the command name"))?;
    // Index 0 is field 3 (state).
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let get = |n: usize| -> Result<&str, ProcError> {
        fields
            .get(n - 3)
            .copied()
            .ok_or_else(|| parse_err(WHAT, 1, format!("fewer than {n} fields")))
    };
    let int = |n: usize| -> Result<i32, ProcError> {
        let f = get(n)?;
        f.parse()
            .map_err(|e| parse_err(WHAT, 1, format!("field {n} {f:?}: {e}")))
    };
    let addr = |n: usize| -> Result<u64, ProcError> {
        let f = get(n)?;
        f.parse()
            .map_err(|e| parse_err(WHAT, 1, format!("field {n} {f:?}: {e}")))
    };
    Ok(StatFields {
        ppid: int(4)?,
        pgrp: int(5)?,
        session: int(6)?,
        start_code: addr(26)?,
        end_code: addr(27)?,
        start_stack: addr(28)?,
        start_data: addr(45)?,
        end_data: addr(46)?,
        start_brk: addr(47)?,
        arg_start: addr(48)?,
        arg_end: addr(49)?,
        env_start: addr(50)?,
        env_end: addr(51)?,
    })
}

/// The credentials lines of `/proc/PID/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Creds {
    /// Real, effective, saved, filesystem.
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    /// Supplementary groups, in the kernel's (sorted) order.
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    /// `CapAmb` (absent before 4.3: 0).
    pub cap_amb: u64,
    /// `NoNewPrivs` (absent before 4.10: false).
    pub no_new_privs: bool,
}

/// Parses the credentials out of `/proc/PID/status`: `Uid`, `Gid`,
/// `Groups` and the five capability sets are required except `CapAmb`;
/// `NoNewPrivs` too is read when present.
pub fn parse_creds(text: &str) -> Result<Creds, ProcError> {
    const WHAT: &str = "status";
    let mut c = Creds::default();
    let mut seen = [false; 7];
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let mask = |v: &str| {
            u64::from_str_radix(v, 16).map_err(|e| parse_err(WHAT, n, format!("{key} {v:?}: {e}")))
        };
        let list = |v: &str| -> Result<Vec<u32>, ProcError> {
            v.split_whitespace()
                .map(|f| {
                    f.parse::<u32>()
                        .map_err(|e| parse_err(WHAT, n, format!("{key} {f:?}: {e}")))
                })
                .collect()
        };
        let four = |v: &str| -> Result<[u32; 4], ProcError> {
            let ids = list(v)?;
            ids.as_slice()
                .try_into()
                .map_err(|_| parse_err(WHAT, n, format!("{key}: {} ids, not 4", ids.len())))
        };
        match key {
            "Uid" => (c.uid, seen[0]) = (four(value)?, true),
            "Gid" => (c.gid, seen[1]) = (four(value)?, true),
            "Groups" => (c.groups, seen[2]) = (list(value)?, true),
            "CapInh" => (c.cap_inh, seen[3]) = (mask(value)?, true),
            "CapPrm" => (c.cap_prm, seen[4]) = (mask(value)?, true),
            "CapEff" => (c.cap_eff, seen[5]) = (mask(value)?, true),
            "CapBnd" => (c.cap_bnd, seen[6]) = (mask(value)?, true),
            "CapAmb" => c.cap_amb = mask(value)?,
            "NoNewPrivs" => {
                c.no_new_privs = match value {
                    "0" => false,
                    "1" => true,
                    v => return Err(parse_err(WHAT, n, format!("{key} {v:?}: not 0 or 1"))),
                }
            }
            _ => {}
        }
    }
    let names = [
        "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
    ];
    if let Some((name, _)) = names.iter().zip(seen).find(|(_, ok)| !ok) {
        return Err(parse_err(WHAT, 0, format!("missing field {name}")));
    }
    Ok(c)
}

/// `RLIM_INFINITY` as `prlimit(2)` reports it.
pub const RLIM_INFINITY: u64 = u64::MAX;

/// The row names of `/proc/PID/limits`, indexed by resource number
/// (`RLIMIT_CPU` = 0 … `RLIMIT_RTTIME` = 15), as the kernel's `lnames`.
const LIMIT_NAMES: [&str; 16] = [
    "Max cpu time",
    "Max file size",
    "Max data size",
    "Max stack size",
    "Max core file size",
    "Max resident set",
    "Max processes",
    "Max open files",
    "Max locked memory",
    "Max address space",
    "Max file locks",
    "Max pending signals",
    "Max msgqueue size",
    "Max nice priority",
    "Max realtime priority",
    "Max realtime timeout",
];

/// One resource limit: `(resource, soft, hard)`, in the kernel's raw units
/// (the file shows them unconverted), [`RLIM_INFINITY`] for "unlimited".
pub type Limit = (u32, u64, u64);

/// Parses `/proc/PID/limits` into limits sorted by resource. Rows are
/// found by name, so an unknown row (a newer kernel) is skipped rather
/// than shifting the others.
pub fn parse_limits(text: &str) -> Result<Vec<Limit>, ProcError> {
    const WHAT: &str = "limits";
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let n = i + 1;
        // Longest names first would matter if one were a prefix of another
        // followed by a space; none is.
        let Some((res, rest)) = LIMIT_NAMES.iter().enumerate().find_map(|(r, name)| {
            let rest = line.strip_prefix(name)?;
            rest.starts_with(' ').then_some((r as u32, rest))
        }) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let mut value = |which: &str| -> Result<u64, ProcError> {
            let v = f
                .next()
                .ok_or_else(|| parse_err(WHAT, n, format!("no {which} limit")))?;
            if v == "unlimited" {
                return Ok(RLIM_INFINITY);
            }
            v.parse()
                .map_err(|e| parse_err(WHAT, n, format!("{which} limit {v:?}: {e}")))
        };
        let soft = value("soft")?;
        let hard = value("hard")?;
        out.push((res, soft, hard));
    }
    if out.is_empty() {
        return Err(parse_err(WHAT, 0, "no limits"));
    }
    out.sort_unstable_by_key(|l| l.0);
    Ok(out)
}

/// Parses `/proc/PID/personality` (hexadecimal, as `personality(2)`).
pub fn parse_personality(text: &str) -> Result<u32, ProcError> {
    let v = text.trim();
    u32::from_str_radix(v, 16).map_err(|e| parse_err("personality", 1, format!("{v:?}: {e}")))
}

/// See [`parse_stat_fields`].
pub fn read_stat_fields(pid: i32) -> Result<StatFields, ProcError> {
    parse_stat_fields(&read_text(pid, "stat")?)
}

/// See [`parse_creds`].
pub fn read_creds(pid: i32) -> Result<Creds, ProcError> {
    parse_creds(&read_text(pid, "status")?)
}

/// The credentials of one thread (`/proc/PID/task/TID/status`): threads
/// of a process may differ.
pub fn read_task_creds(pid: i32, tid: i32) -> Result<Creds, ProcError> {
    parse_creds(&read_text(pid, &format!("task/{tid}/status"))?)
}

/// See [`parse_limits`].
pub fn read_limits(pid: i32) -> Result<Vec<Limit>, ProcError> {
    parse_limits(&read_text(pid, "limits")?)
}

/// See [`parse_personality`].
pub fn read_personality(pid: i32) -> Result<u32, ProcError> {
    parse_personality(&read_text(pid, "personality")?)
}

/// The status of one thread (`/proc/PID/task/TID/status`): its own
/// `SigPnd` and `SigBlk`, where the process's file shows the leader's.
pub fn read_task_status(pid: i32, tid: i32) -> Result<Status, ProcError> {
    parse_status(&read_text(pid, &format!("task/{tid}/status"))?)
}

/// `/proc/PID/comm` unescaped (unlike the `Name:` of `status`), without
/// the newline the kernel appends.
pub fn read_comm(pid: i32) -> Result<String, ProcError> {
    let text = read_text(pid, "comm")?;
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_owned())
}

#[cfg(test)]
mod state_tests {
    use super::*;

    // A python3 process on this project's machines (kernel 6.18); its
    // command name has spaces and a parenthesis to test the counting.
    const STAT: &str = "4242 (py (x) y) S 4000 4242 3999 34816 4242 4194304 1130 0 0 0 \
        3 1 0 0 20 0 1 0 123456 17502208 2420 18446744073709551615 \
        94650000000000 94650000004000 140730000000000 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0 0 \
        94650000010000 94650000011000 94650100000000 140730000001000 140730000001100 \
        140730000001100 140730000002000 0\n";

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let s = parse_stat_fields(STAT).unwrap();
        assert_eq!((s.ppid, s.pgrp, s.session), (4000, 4242, 3999));
        assert_eq!(
            (s.start_code, s.end_code, s.start_stack),
            (94650000000000, 94650000004000, 140730000000000)
        );
        assert_eq!(
            (s.start_data, s.end_data, s.start_brk),
            (94650000010000, 94650000011000, 94650100000000)
        );
        assert_eq!((s.arg_start, s.arg_end), (140730000001000, 140730000001100));
        assert_eq!((s.env_start, s.env_end), (140730000001100, 140730000002000));
    }

    #[test]
    fn stat_fields_refuse_truncated_text() {
        let cut = &STAT[..STAT.len() / 2];
        assert!(matches!(
            parse_stat_fields(cut),
            Err(ProcError::Parse { .. })
        ));
        assert!(parse_stat_fields("no paren").is_err());
        assert!(parse_stat_fields("1 (x) S x 1 1").is_err());
    }

    #[test]
    fn creds() {
        let text = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t6\t7\t8\n\
            Groups:\t4 24 27 \nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
            CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000001\n";
        let c = parse_creds(text).unwrap();
        assert_eq!(c.uid, [1000, 1001, 1002, 1003]);
        assert_eq!(c.gid, [5, 6, 7, 8]);
        assert_eq!(c.groups, vec![4, 24, 27]);
        assert_eq!((c.cap_inh, c.cap_prm, c.cap_amb), (0, 0x1ff_ffff_ffff, 1));
        // Root with no supplementary groups: an empty (whitespace) list.
        let root = text.replace("Groups:\t4 24 27 ", "Groups:\t ");
        assert!(parse_creds(&root).unwrap().groups.is_empty());
        assert!(parse_creds(&text.replace("CapBnd", "CapXxx")).is_err());
        assert!(parse_creds(&text.replace("\t1003", "")).is_err());
        assert!(!c.no_new_privs);
        let nnp = format!("{text}NoNewPrivs:\t1\n");
        assert!(parse_creds(&nnp).unwrap().no_new_privs);
        assert!(parse_creds(&nnp.replace("NoNewPrivs:\t1", "NoNewPrivs:\t2")).is_err());
    }

    #[test]
    fn limits_by_name() {
        let text =
            "Limit                     Soft Limit           Hard Limit           Units     \n\
            Max cpu time              unlimited            unlimited            seconds   \n\
            Max stack size            8388608              unlimited            bytes     \n\
            Max open files            1024                 524288               files     \n\
            Max future thing          1                    2                    things    \n\
            Max nice priority         0                    0                    \n";
        let l = parse_limits(text).unwrap();
        assert_eq!(
            l,
            vec![
                (0, RLIM_INFINITY, RLIM_INFINITY),
                (3, 8388608, RLIM_INFINITY),
                (7, 1024, 524288),
                (13, 0, 0),
            ]
        );
        assert!(parse_limits("Limit\nMax open files  x 1\n").is_err());
        assert!(parse_limits("").is_err());
    }

    #[test]
    fn personality() {
        assert_eq!(parse_personality("00400000\n").unwrap(), 0x0040_0000);
        assert!(parse_personality("zz").is_err());
    }

    #[test]
    fn readers_on_ourselves() {
        let me = std::process::id() as i32;
        let s = read_stat_fields(me).unwrap();
        // A leader outside our pid namespace shows as 0 (so it does under CI).
        assert_eq!(s.session, nix::unistd::getsid(None).unwrap().as_raw());
        assert_eq!(s.pgrp, nix::unistd::getpgrp().as_raw());
        let c = read_creds(me).unwrap();
        assert_eq!(c.uid[1], read_status(me).unwrap().uid[1]);
        let l = read_limits(me).unwrap();
        assert_eq!(l.len(), 16);
        assert!(read_personality(me).is_ok());
        assert!(!read_comm(me).unwrap().ends_with('\n'));
        assert_eq!(read_task_status(me, me).unwrap().pid, me);
    }
}
