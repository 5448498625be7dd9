//! Shared memory of a process tree: `MAP_SHARED` anonymous memory (and
//! shared `/dev/zero`) and memfds that several processes map or hold open,
//! migrated as one object each.
//!
//! **Identity.** A shared memory object is its shmem inode: the inode and
//! device columns of `/proc/PID/maps` ([`MapEntry::shm_key`], recorded in
//! `pb::Vma.shm_ino`/`shm_dev`), and for a memfd held open, the `ino` of
//! its fdinfo. Every mapping of one object, in any process and at any
//! address and offset, carries the same key.
//!
//! **Source: pages once, in a space of their own.** Each process's tracker
//! still watches its own mappings: userfaultfd write-protection is per
//! page table, so a write by one process shows only in that process's
//! scan, and a page only one process touched is present only in its
//! pagemap. Each round [`Registry::take`] takes the shared pages out of
//! every process's delta, turns them into object offsets (the union over
//! all processes: nothing one process wrote is missed), and sends each
//! offset once, read through the first mapping that covers it, at
//! `tag(SHM_SPACE, base + offset)`: a pseudo address space
//! ([`SHM_SPACE`], above every process's) where each object has a fixed
//! slot for the whole dump and one `pb::Vma` (`[ferry shm]`) per layer. The
//! store's flatten then keeps the newest copy of every object page whoever
//! wrote it, which per-process addresses could not (the process that
//! sends an offset may change between rounds as mappings come and go).
//! Zero runs of shared mappings are dropped: a hole in one process's page
//! table says nothing of the object (another may have the page), and an
//! object's slot is never reused, so nothing stale shows through. An
//! object new to the dump goes whole, as [`resident`] finds it in the
//! object's page cache: a page no page table holds (written by a child
//! that has exited since) is no write the trackers could see.
//!
//! **Destination.** [`objects`] groups the image's mappings and memfd
//! descriptors into objects; [`make`] makes each once in ferry (anonymous
//! shared memory the kernel's way, memfds by name), sized, filled once (a
//! memfd held open with its whole contents read at the freeze, which a
//! `write(2)` unseen by the trackers cannot have made stale; any other
//! object with the pages of its slot), and sealed; the restore maps it into every process at its address, offset
//! and protection and hands memfd descriptors over, so a write by one
//! process is seen by the others after the migration too.
//!
//! Not carried: holes punched into an object during the rounds
//! (`MADV_REMOVE`, `fallocate`), which read back as the pages they had;
//! System V segments (refused by name).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;

use ferry_page_server::store::FlatImage;
use ferry_proto::pb;

use crate::procfs::MapEntry;
use crate::track::{intersect, normalize, subtract, Delta};
use crate::tree::{tag, untag};

/// The pseudo address space of the objects' slots: one past the last
/// process space, so the tags stay below `[vsyscall]`.
pub const SHM_SPACE: u32 = crate::tree::MAX_SPACES;
/// Bytes of address each object's slot spans (its largest size).
pub const SLOT: u64 = 1 << 36;
/// Slots in the pseudo space (user addresses below 2^47).
pub const MAX_OBJECTS: u64 = (1 << 47) / SLOT - 1;
/// The name of a slot's mapping in a layer.
pub const SLOT_NAME: &str = "[ferry shm]";

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// What the restore cannot make, named.
    #[error("{0}: not supported yet")]
    Unsupported(String),
    /// Asking a process which pages of an object it can see failed.
    #[error("process {pid}: which pages of shared memory {start:#x}-{end:#x} hold data: {source}")]
    Resident {
        pid: i32,
        start: u64,
        end: u64,
        #[source]
        source: crate::sys::ptrace::PtraceError,
    },
    #[error("process {pid}: reading mincore's answer: {source}")]
    ResidentRead {
        pid: i32,
        #[source]
        source: crate::sys::vm::VmError,
    },
    #[error("shared memory object {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A shared memory object: its inode and device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShmKey {
    pub ino: u64,
    pub dev: u64,
}

/// The object behind an image's mapping, if it is one.
pub fn key_of(v: &pb::Vma) -> Option<ShmKey> {
    (v.shm_ino != 0).then_some(ShmKey {
        ino: v.shm_ino,
        dev: v.shm_dev,
    })
}

fn key_of_entry(m: &MapEntry) -> Option<ShmKey> {
    m.shm_key().map(|(ino, dev)| ShmKey { ino, dev })
}

// ---------------------------------------------------------------- source

/// One process's part of a round, as the dump's round has it.
pub struct Part<'a> {
    pub pid: i32,
    pub maps: &'a [MapEntry],
    pub delta: &'a mut Delta,
}

/// Ranges of one process to read, each `(start, end, tagged destination)`.
pub type Reads = Vec<(u64, u64, u64)>;

/// What a round sends of the objects: which pages of which process to
/// read, and where each range goes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sends {
    /// The slots' mappings for the layer, tagged, ascending.
    pub vmas: Vec<pb::Vma>,
    /// Per process (in the order of the parts): its pid and the ranges to
    /// read, each `(start, end, tagged destination)`, ascending.
    pub reads: Vec<(i32, Reads)>,
}

/// The objects' slots over a whole dump: an object keeps its slot from
/// the round it is first seen on.
#[derive(Debug, Default)]
pub struct Registry {
    slots: BTreeMap<ShmKey, u64>,
}

impl Registry {
    /// Takes every page of a shared memory mapping out of the parts'
    /// deltas (data and zero runs) and returns them as sends to the slots
    /// (see the module documentation). The parts must be in tree order:
    /// each offset is read from the first process that maps it.
    pub fn take(&mut self, parts: &mut [Part<'_>]) -> Result<Sends, ShmError> {
        // (part, start, end, offset) of every mapping of each object.
        let mut maps: BTreeMap<ShmKey, Vec<(usize, u64, u64, u64)>> = BTreeMap::new();
        let mut dirty: BTreeMap<ShmKey, Vec<(u64, u64)>> = BTreeMap::new();
        for (i, p) in parts.iter_mut().enumerate() {
            let mut own: Vec<(u64, u64)> = Vec::new();
            for m in p.maps {
                let Some(k) = key_of_entry(m) else { continue };
                maps.entry(k)
                    .or_default()
                    .push((i, m.start, m.end, m.offset));
                own.push((m.start, m.end));
                for (a, b) in intersect(&p.delta.data, &[(m.start, m.end)]) {
                    dirty
                        .entry(k)
                        .or_default()
                        .push((a - m.start + m.offset, b - m.start + m.offset));
                }
            }
            normalize(&mut own);
            p.delta.data = subtract(&p.delta.data, &own);
            p.delta.zero = subtract(&p.delta.zero, &own);
        }
        let mut sends = Sends::default();
        let mut reads: Vec<Reads> = vec![Vec::new(); parts.len()];
        for (k, ms) in &maps {
            let size = ms
                .iter()
                .map(|&(_, s, e, o)| o + (e - s))
                .max()
                .unwrap_or(0);
            let base = self.slot(*k, size)?;
            sends.vmas.push(pb::Vma {
                start: tag(SHM_SPACE, base),
                end: tag(SHM_SPACE, base + size),
                prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
                flags: (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u32,
                offset: 0,
                kind: pb::VmaKind::SharedAnon as i32,
                file: None,
                name: SLOT_NAME.into(),
                shm_ino: k.ino,
                shm_dev: k.dev,
            });
            let Some(d) = dirty.get_mut(k) else { continue };
            normalize(d);
            let mut left = std::mem::take(d);
            for &(i, s, e, o) in ms {
                let here = intersect(&left, &[(o, o + (e - s))]);
                for &(a, b) in &here {
                    reads[i].push((a - o + s, b - o + s, tag(SHM_SPACE, base + a)));
                }
                left = subtract(&left, &here);
            }
        }
        sends.vmas.sort_by_key(|v| v.start);
        for (p, mut r) in parts.iter().zip(reads) {
            if !r.is_empty() {
                r.sort_unstable();
                sends.reads.push((p.pid, r));
            }
        }
        Ok(sends)
    }

    /// Whether `m` maps an object a round before this one has seen.
    pub fn knows(&self, m: &MapEntry) -> bool {
        key_of_entry(m).is_some_and(|k| self.slots.contains_key(&k))
    }

    fn slot(&mut self, k: ShmKey, size: u64) -> Result<u64, ShmError> {
        let n = self.slots.len() as u64;
        let base = *self.slots.entry(k).or_insert((n + 1) * SLOT);
        if base / SLOT > MAX_OBJECTS {
            return Err(ShmError::Unsupported(format!(
                "more than {MAX_OBJECTS} shared memory objects in one tree"
            )));
        }
        if size > SLOT {
            return Err(ShmError::Unsupported(format!(
                "shared memory object (inode {}) of {size} bytes, more than {SLOT}",
                k.ino
            )));
        }
        Ok(base)
    }
}

/// The pages of shared memory mapping `m` of process `tracee` that hold
/// data, as address ranges: `mincore` (injected, with a scratch vector
/// mapped in the process for the call) answers from the object's page
/// cache, so it also finds pages no page table holds, which neither
/// pagemap nor the write-protect scan can: written by a child that has
/// exited since, or through a descriptor closed since. Asked once per
/// mapping of an object new to the dump; the trackers follow the writes
/// from there.
pub fn resident(
    tracee: &crate::sys::ptrace::Tracee,
    m: &MapEntry,
) -> Result<Vec<(u64, u64)>, ShmError> {
    let ps = crate::sys::page_size();
    let pages = m.len() / ps;
    let pid = tracee.pid();
    let fail = |source| ShmError::Resident {
        pid,
        start: m.start,
        end: m.end,
        source,
    };
    let len = pages.div_ceil(ps).max(1) * ps;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let vec = tracee
        .syscall(libc::SYS_mmap, &[0, len, rw, anon, u64::MAX, 0])
        .map_err(fail)? as u64;
    let asked = tracee.syscall(libc::SYS_mincore, &[m.start, m.len(), vec]);
    let mut buf = Vec::new();
    let read = asked.map_err(fail).and_then(|_| {
        crate::sys::vm::read_ranges(pid, &[(vec, vec + len)], &mut buf)
            .map_err(|source| ShmError::ResidentRead { pid, source })
    });
    let unmapped = tracee.syscall(libc::SYS_munmap, &[vec, len]).map_err(fail);
    read?;
    unmapped?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &b) in buf.iter().take(pages as usize).enumerate() {
        if b & 1 != 0 {
            let a = m.start + i as u64 * ps;
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = a + ps,
                _ => out.push((a, a + ps)),
            }
        }
    }
    Ok(out)
}

/// Where the bytes read at `addr` go, given a process's read table.
pub fn destination(reads: &[(u64, u64, u64)], addr: u64) -> Option<u64> {
    let i = reads.partition_point(|r| r.1 <= addr);
    reads
        .get(i)
        .filter(|r| r.0 <= addr)
        .map(|r| r.2 + (addr - r.0))
}

// ---------------------------------------------------------------- destination

/// One shared memory object of a tree image, as the restore makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub key: ShmKey,
    /// The memfd's name, `None` for anonymous shared memory.
    pub memfd: Option<String>,
    /// Bytes: the farthest mapping's end in the object, or the memfd's
    /// size if larger.
    pub size: u64,
    /// Every mapping: `(space, start, end, offset)`.
    pub maps: Vec<(u32, u64, u64, u64)>,
    /// Every descriptor of it: `(process index, fd)`.
    pub fds: Vec<(usize, i32)>,
    /// The memfd's seals (`F_GET_SEALS` at the freeze).
    pub seals: u32,
}

/// The name of a memfd as its link or mapping shows it
/// ("/memfd:NAME (deleted)").
pub fn memfd_name(path: &str) -> Option<&str> {
    path.strip_prefix("/memfd:")?.strip_suffix(" (deleted)")
}

/// The objects of a tree image (`procs` in tree order, `spaces` its
/// mappings by space): every object mapped by some process, and every
/// memfd held open by more than one descriptor (a `dup`, a fork). A memfd
/// one descriptor alone holds and nobody maps stays its process's
/// (restored with it). What
/// cannot be made is refused by name: System V segments, a memfd whose
/// descriptors disagree on their offset.
pub fn objects(
    procs: &[pb::Process],
    spaces: &BTreeMap<u32, Vec<pb::Vma>>,
) -> Result<Vec<Object>, ShmError> {
    let mut out: BTreeMap<ShmKey, Object> = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, ShmKey> = BTreeMap::new();
    for (&space, vmas) in spaces.iter().filter(|(&s, _)| s != SHM_SPACE) {
        let who = || {
            procs
                .iter()
                .find(|p| p.space == space && !p.zombie)
                .map_or(format!("space {space}"), |p| {
                    format!("process {} ({})", p.pid, p.comm)
                })
        };
        for v in vmas {
            let Some(k) = key_of(v) else { continue };
            if v.name.starts_with("/SYSV") {
                return Err(ShmError::Unsupported(format!(
                    "mapping {:#x}-{:#x} of {}: System V shared memory {}",
                    v.start,
                    v.end,
                    who(),
                    v.name
                )));
            }
            let memfd = match v.kind() {
                pb::VmaKind::File => Some(
                    memfd_name(&v.name)
                        .ok_or_else(|| {
                            ShmError::Unsupported(format!(
                                "mapping {:#x}-{:#x} of {}: shared memory {} that is no memfd",
                                v.start,
                                v.end,
                                who(),
                                v.name
                            ))
                        })?
                        .to_string(),
                ),
                _ => None,
            };
            let end = v.offset.checked_add(v.end.saturating_sub(v.start));
            let Some(end) = end.filter(|&e| v.end > v.start && e <= SLOT) else {
                return Err(ShmError::Unsupported(format!(
                    "mapping {:#x}-{:#x} at offset {:#x} of {}: shared memory beyond {SLOT} bytes or an empty range",
                    v.start,
                    v.end,
                    v.offset,
                    who()
                )));
            };
            let o = out.entry(k).or_insert_with(|| Object {
                key: k,
                memfd: memfd.clone(),
                size: 0,
                maps: Vec::new(),
                fds: Vec::new(),
                seals: 0,
            });
            o.size = o.size.max(end);
            o.maps.push((space, v.start, v.end, v.offset));
            if memfd.is_some() {
                by_ino.insert(k.ino, k);
            }
        }
    }
    // memfd descriptors: joined to the object they map, or an object of
    // their own when several processes hold one.
    let mut holders: BTreeMap<u64, Vec<(usize, &pb::FileDesc)>> = BTreeMap::new();
    for (i, p) in procs.iter().enumerate() {
        for f in p
            .fds
            .iter()
            .filter(|f| f.kind() == pb::FdKind::Memfd && f.ino != 0)
        {
            holders.entry(f.ino).or_default().push((i, f));
        }
    }
    for (ino, fds) in holders {
        let k = match by_ino.get(&ino) {
            Some(&k) => k,
            None if fds.len() > 1 => ShmKey { ino, dev: 0 },
            None => continue,
        };
        let first = fds[0].1;
        let name = memfd_name(&first.path).ok_or_else(|| {
            ShmError::Unsupported(format!("fd {}: {}: not a memfd name", first.fd, first.path))
        })?;
        if let Some(&(i, f)) = fds.iter().find(|(_, f)| f.pos != first.pos) {
            let p = &procs[i];
            return Err(ShmError::Unsupported(format!(
                "fd {} of process {} ({}): memfd {} at offset {}, fd {} of process {} at {}: one memfd opened apart in several processes",
                f.fd, p.pid, p.comm, first.path, f.pos, first.fd, procs[fds[0].0].pid, first.pos
            )));
        }
        let o = out.entry(k).or_insert_with(|| Object {
            key: k,
            memfd: Some(name.to_string()),
            size: 0,
            maps: Vec::new(),
            fds: Vec::new(),
            seals: 0,
        });
        for (i, f) in fds {
            // Contents are bounded by the image's budget for descriptors.
            o.size = o.size.max(f.data.len() as u64);
            o.seals |= f.seals;
            o.fds.push((i, f.fd));
        }
    }
    Ok(out.into_values().collect())
}

/// The bytes of `obj` an image holds, as `(offset in the object, bytes)`,
/// `None` for a zero run: first the pages of its mappings in the
/// processes' own spaces (an image whose tree grew at the freeze has
/// some), then those of its slot, which are newer where both exist.
pub fn contents<'a>(
    obj: &Object,
    img: &'a FlatImage,
    slots: &[pb::Vma],
) -> Vec<(u64, Option<&'a [u8]>)> {
    let ps = img.page_size as u64;
    let mut ranges: Vec<(u64, u64, u64)> = obj
        .maps
        .iter()
        .map(|&(space, s, e, o)| (tag(space, s), tag(space, e), o))
        .collect();
    if let Some(v) = slots.iter().find(|v| key_of(v) == Some(obj.key)) {
        ranges.push((v.start, v.end, 0));
    }
    let mut out = Vec::new();
    for (s, e, o) in ranges {
        let first = img
            .runs
            .partition_point(|r| r.addr.saturating_add(r.pages.saturating_mul(ps)) <= s);
        for r in img.runs[first..].iter().take_while(|r| r.addr < e) {
            let end = r.addr.saturating_add(r.pages.saturating_mul(ps));
            let (a, b) = (r.addr.max(s), end.min(e));
            if a >= b {
                continue;
            }
            let bytes = match &r.data {
                Some(d) => match d.get((a - r.addr) as usize..(b - r.addr) as usize) {
                    Some(x) => Some(x),
                    None => continue,
                },
                None => None,
            };
            out.push((a - s + o, bytes));
        }
    }
    out
}

/// The slots' mappings of an image's layer (space [`SHM_SPACE`]).
pub fn slots(vmas: &[pb::Vma]) -> Vec<pb::Vma> {
    vmas.iter()
        .filter(|v| untag(v.start).0 == SHM_SPACE)
        .cloned()
        .collect()
}

/// Makes `obj` in ferry: created, sized, filled with `data` (its memfd's
/// whole contents at the freeze, if held open) or else the image's pages,
/// sealed.
pub fn make(
    obj: &Object,
    data: &[u8],
    img: &FlatImage,
    slots: &[pb::Vma],
) -> Result<OwnedFd, ShmError> {
    let what = match &obj.memfd {
        Some(n) => format!("memfd {n:?} (inode {})", obj.key.ino),
        None => format!("anonymous shared memory (inode {})", obj.key.ino),
    };
    let err = |step: &str| {
        let what = format!("{what}: {step}");
        move |source| ShmError::Io { what, source }
    };
    let ps = crate::sys::page_size();
    let size = obj.size.max(data.len() as u64);
    let memfd = |name: &str, sealing: bool| -> Result<OwnedFd, ShmError> {
        let fd = crate::sys::shm::memfd(name, sealing).map_err(err("memfd_create"))?;
        std::fs::File::from(fd.try_clone().map_err(err("dup"))?)
            .set_len(size)
            .map_err(err("ftruncate"))?;
        Ok(fd)
    };
    let fd = match &obj.memfd {
        // Made without MFD_ALLOW_SEALING, a memfd shows F_SEAL_SEAL alone.
        Some(name) => memfd(name, obj.seals != libc::F_SEAL_SEAL as u32)?,
        None => match crate::sys::shm::anon_shared(size.div_ceil(ps).max(1) * ps) {
            Ok(fd) => fd,
            // Opening /proc/self/map_files needs CAP_CHECKPOINT_RESTORE (or
            // CAP_SYS_ADMIN); without it the object is a memfd, the same
            // memory under another name in /proc/PID/maps.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                tracing::debug!("anonymous shared memory as a memfd: map_files: {e}");
                memfd("dev/zero", false)?
            }
            Err(e) => return Err(err("a shared anonymous mapping")(e)),
        },
    };
    let file = std::fs::File::from(fd.try_clone().map_err(err("dup"))?);
    file.write_all_at(data, 0)
        .map_err(err("writing its contents"))?;
    // A memfd held open was read whole at the freeze: newer than any page
    // of the rounds (a write(2) to it is no write to a page table, which
    // the trackers would see). Otherwise the object is its pages; zero
    // runs need nothing in a new object.
    if obj.fds.is_empty() {
        for (off, bytes) in contents(obj, img, slots) {
            if let Some(b) = bytes {
                file.write_all_at(b, off)
                    .map_err(err(&format!("writing its pages at offset {off:#x}")))?;
            }
        }
    }
    // After the filling (a write seal would forbid it), before any process
    // maps it (F_SEAL_WRITE cannot be added over a shared writable map).
    if obj.memfd.is_some() && obj.seals & !(libc::F_SEAL_SEAL as u32) != 0 {
        crate::sys::shm::add_seals(fd.as_fd(), obj.seals).map_err(err("F_ADD_SEALS"))?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;

    fn entry(start: u64, end: u64, offset: u64, ino: u64, path: &str) -> MapEntry {
        MapEntry {
            start,
            end,
            read: true,
            write: true,
            exec: false,
            shared: true,
            offset,
            dev_major: 0,
            dev_minor: 1,
            inode: ino,
            path: Some(path.into()),
        }
    }

    fn private(start: u64, end: u64) -> MapEntry {
        MapEntry {
            shared: false,
            inode: 0,
            dev_minor: 0,
            path: None,
            ..entry(start, end, 0, 0, "")
        }
    }

    const ZERO: &str = "/dev/zero (deleted)";

    #[test]
    fn shared_pages_go_once_to_the_slot_whoever_wrote_them() {
        // Parent and child map one object (inode 7) at 0x10000, the child
        // also a second view of its last two pages at 0x90000 (offset
        // 0x2000). The parent wrote page 0, the child pages 1 and 3 (the
        // latter through its second view); both wrote page 2.
        let pmaps = vec![private(0x1000, 0x3000), entry(0x10000, 0x14000, 0, 7, ZERO)];
        let cmaps = vec![
            entry(0x10000, 0x14000, 0, 7, ZERO),
            entry(0x90000, 0x92000, 0x2000, 7, ZERO),
        ];
        let mut pd = Delta {
            data: vec![(0x1000, 0x2000), (0x10000, 0x11000), (0x12000, 0x13000)],
            zero: vec![(0x13000, 0x14000)],
        };
        let mut cd = Delta {
            data: vec![(0x11000, 0x13000), (0x91000, 0x92000)],
            zero: vec![],
        };
        let mut reg = Registry::default();
        let sends = {
            let mut parts = [
                Part {
                    pid: 10,
                    maps: &pmaps,
                    delta: &mut pd,
                },
                Part {
                    pid: 11,
                    maps: &cmaps,
                    delta: &mut cd,
                },
            ];
            reg.take(&mut parts).unwrap()
        };
        // Private pages stay; shared ones and their zero runs are taken.
        assert_eq!(pd.data, vec![(0x1000, 0x2000)]);
        assert!(pd.zero.is_empty() && cd.data.is_empty());
        let base = tag(SHM_SPACE, SLOT);
        assert_eq!(sends.vmas.len(), 1);
        assert_eq!(
            (sends.vmas[0].start, sends.vmas[0].end),
            (base, base + 0x4000)
        );
        assert_eq!(sends.vmas[0].shm_ino, 7);
        // Every offset read once, from the first process that maps it.
        assert_eq!(
            sends.reads,
            vec![(10, vec![(0x10000, 0x14000, base)])],
            "offsets 0-3 all mapped by the parent"
        );
        // The slot stays across rounds; a second object gets the next one.
        let maps2 = vec![
            entry(0x10000, 0x14000, 0, 7, ZERO),
            entry(0x20000, 0x21000, 0, 9, ZERO),
        ];
        let mut d = Delta {
            data: vec![(0x20000, 0x21000)],
            zero: vec![],
        };
        let s = reg
            .take(&mut [Part {
                pid: 10,
                maps: &maps2,
                delta: &mut d,
            }])
            .unwrap();
        assert_eq!(s.vmas[0].start, base, "object 7 keeps its slot");
        assert_eq!(s.vmas[1].start, tag(SHM_SPACE, 2 * SLOT));
        assert_eq!(
            s.reads,
            vec![(10, vec![(0x20000, 0x21000, tag(SHM_SPACE, 2 * SLOT))])]
        );
    }

    #[test]
    fn an_offset_only_a_later_process_maps_is_read_from_it() {
        // The parent maps pages 0-1 of object 5, the child pages 1-3.
        let pmaps = vec![entry(0x10000, 0x12000, 0, 5, ZERO)];
        let cmaps = vec![entry(0x50000, 0x53000, 0x1000, 5, ZERO)];
        let mut pd = Delta::default();
        let mut cd = Delta {
            data: vec![(0x50000, 0x53000)],
            zero: vec![],
        };
        let s = Registry::default()
            .take(&mut [
                Part {
                    pid: 1,
                    maps: &pmaps,
                    delta: &mut pd,
                },
                Part {
                    pid: 2,
                    maps: &cmaps,
                    delta: &mut cd,
                },
            ])
            .unwrap();
        let base = tag(SHM_SPACE, SLOT);
        assert_eq!(
            s.reads,
            vec![
                (1, vec![(0x11000, 0x12000, base + 0x1000)]),
                (2, vec![(0x51000, 0x53000, base + 0x2000)]),
            ]
        );
        assert_eq!(s.vmas[0].end - s.vmas[0].start, 0x4000);
        assert_eq!(destination(&s.reads[1].1, 0x52000), Some(base + 0x3000));
        assert_eq!(destination(&s.reads[1].1, 0x50000), None);
    }

    #[test]
    fn private_and_file_mappings_are_left_alone() {
        let mut file = entry(0x10000, 0x11000, 0, 3, "/usr/lib/x.so");
        file.shared = true;
        let maps = vec![file.clone(), private(0x20000, 0x21000)];
        let mut d = Delta {
            data: vec![(0x10000, 0x11000), (0x20000, 0x21000)],
            zero: vec![],
        };
        let before = d.clone();
        let s = Registry::default()
            .take(&mut [Part {
                pid: 1,
                maps: &maps,
                delta: &mut d,
            }])
            .unwrap();
        assert_eq!(d, before);
        assert_eq!(s, Sends::default());
        // A memfd mapping is an object.
        let memfd = entry(0x30000, 0x31000, 0, 4, "/memfd:pool (deleted)");
        let mut d = Delta {
            data: vec![(0x30000, 0x31000)],
            zero: vec![],
        };
        let s = Registry::default()
            .take(&mut [Part {
                pid: 1,
                maps: &[memfd],
                delta: &mut d,
            }])
            .unwrap();
        assert!(d.data.is_empty());
        assert_eq!(s.vmas[0].shm_ino, 4);
    }

    fn vma(start: u64, end: u64, offset: u64, ino: u64, name: &str) -> pb::Vma {
        let kind = if name.starts_with("/memfd:") {
            pb::VmaKind::File
        } else {
            pb::VmaKind::SharedAnon
        };
        pb::Vma {
            start,
            end,
            offset,
            kind: kind as i32,
            name: name.into(),
            shm_ino: ino,
            shm_dev: 1,
            flags: libc::MAP_SHARED as u32,
            ..Default::default()
        }
    }

    fn proc(pid: i32, space: u32) -> pb::Process {
        pb::Process {
            pid,
            space,
            comm: format!("p{pid}"),
            ..Default::default()
        }
    }

    fn memfd_fd(fd: i32, ino: u64, pos: u64, data: &[u8]) -> pb::FileDesc {
        pb::FileDesc {
            fd,
            kind: pb::FdKind::Memfd as i32,
            path: "/memfd:pool (deleted)".into(),
            ino,
            pos,
            data: data.to_vec().into(),
            seals: libc::F_SEAL_GROW as u32,
            ..Default::default()
        }
    }

    #[test]
    fn mappings_and_descriptors_group_into_objects() {
        let mut procs = vec![proc(100, 0), proc(101, 1), proc(102, 2)];
        // A memfd mapped by the root and held by the root and process 102;
        // a memfd only process 101 holds (stays its own).
        procs[0].fds = vec![memfd_fd(3, 8, 0, b"abc")];
        procs[2].fds = vec![memfd_fd(4, 8, 0, b"abc")];
        procs[1].fds = vec![memfd_fd(5, 99, 0, b"x")];
        let spaces = BTreeMap::from([
            (
                0,
                vec![
                    vma(0x10000, 0x14000, 0, 7, ZERO),
                    vma(0x40000, 0x41000, 0x1000, 8, "/memfd:pool (deleted)"),
                ],
            ),
            (1, vec![vma(0x10000, 0x12000, 0x2000, 7, ZERO)]),
            (2, vec![]),
        ]);
        let objs = objects(&procs, &spaces).unwrap();
        assert_eq!(objs.len(), 2);
        let anon = &objs[0];
        assert_eq!((anon.key.ino, anon.memfd.as_deref()), (7, None));
        assert_eq!(anon.size, 0x4000);
        assert_eq!(
            anon.maps,
            vec![(0, 0x10000, 0x14000, 0), (1, 0x10000, 0x12000, 0x2000)]
        );
        let m = &objs[1];
        assert_eq!((m.key.ino, m.memfd.as_deref()), (8, Some("pool")));
        assert_eq!(m.size, 0x2000);
        assert_eq!(m.fds, vec![(0, 3), (2, 4)]);
        assert_eq!(m.seals, libc::F_SEAL_GROW as u32);

        // A memfd held apart at two offsets is refused by name.
        procs[2].fds[0].pos = 2;
        let e = objects(&procs, &spaces).unwrap_err().to_string();
        assert!(
            e.contains("fd 4 of process 102") && e.contains("offset 2"),
            "{e}"
        );
        procs[2].fds[0].pos = 0;
        // A mapping past the largest object, or reversed, is refused.
        let mut huge = spaces.clone();
        huge.insert(1, vec![vma(0x10000, 0x12000, u64::MAX - 0x1000, 7, ZERO)]);
        assert!(objects(&procs, &huge)
            .unwrap_err()
            .to_string()
            .contains("beyond"));
        huge.insert(1, vec![vma(0x12000, 0x10000, 0, 7, ZERO)]);
        assert!(objects(&procs, &huge).is_err());
        // So is System V shared memory.
        let mut sysv = spaces.clone();
        sysv.insert(
            1,
            vec![vma(0x10000, 0x12000, 0, 11, "/SYSV00001234 (deleted)")],
        );
        let e = objects(&procs, &sysv).unwrap_err().to_string();
        assert!(
            e.contains("0x10000-0x12000 of process 101") && e.contains("System V"),
            "{e}"
        );
    }

    #[test]
    fn contents_come_from_the_slot_over_the_processes_pages() {
        use ferry_page_server::store::FlatRun;
        let obj = Object {
            key: ShmKey { ino: 7, dev: 1 },
            memfd: None,
            size: 0x3000,
            maps: vec![(1, 0x10000, 0x13000, 0)],
            fds: vec![],
            seals: 0,
        };
        let base = tag(SHM_SPACE, SLOT);
        let slot = pb::Vma {
            start: base,
            end: base + 0x3000,
            shm_ino: 7,
            shm_dev: 1,
            ..Default::default()
        };
        let page = |b: u8| bytes::Bytes::from(vec![b; PS as usize]);
        let img = FlatImage {
            page_size: PS as u32,
            vmas: vec![],
            runs: vec![
                FlatRun {
                    addr: tag(1, 0x10000),
                    pages: 1,
                    data: Some(page(1)),
                },
                FlatRun {
                    addr: tag(1, 0x12000),
                    pages: 1,
                    data: None,
                },
                FlatRun {
                    addr: base + 0x1000,
                    pages: 1,
                    data: Some(page(2)),
                },
            ],
        };
        let got: Vec<(u64, Option<u8>)> = contents(&obj, &img, &[slot])
            .into_iter()
            .map(|(o, b)| (o, b.map(|b| b[0])))
            .collect();
        assert_eq!(got, vec![(0, Some(1)), (0x2000, None), (0x1000, Some(2))]);
    }
}
