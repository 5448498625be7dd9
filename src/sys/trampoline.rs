//! The way back for a thread released in the middle of an injected syscall
//! (x86_64).
//!
//! An injection ([`super::ptrace`]) points a stopped thread's `rip` at a
//! `syscall` instruction with ferry's number and arguments in its registers,
//! steps it through the syscall and puts the thread's own registers back at
//! the exit stop. If ferry dies in between (SIGKILL, the OOM killer), the
//! kernel detaches the thread and it runs on *with ferry's registers*: the
//! code after that `syscall` instruction, with the wrong `rax`, `rdi`…,
//! which corrupts or kills the process ferry promised to leave as it was.
//!
//! So ferry injects through a trampoline of its own: a `syscall`
//! instruction followed by code that puts back the thread's signal mask and
//! every general-purpose register, the flags and the stack pointer it had,
//! and jumps to its own `rip`. A thread released at any point of an
//! injection runs the injected syscall (at most once more than ferry asked:
//! its effect is a leaked descriptor or mapping, never a wrong register) and
//! resumes exactly where it was, as after any interrupted syscall. When
//! ferry lives, it resets the registers at the exit stop and the code after
//! the `syscall` never runs.
//!
//! Where it lives: in bytes of an executable mapping that no code executes
//! or reads, the tail of the last page of an ELF file's executable segment
//! past the segment's end (zero padding with the linker's default
//! `-z separate-code`; the next segment's bytes, used only through their own
//! mapping, otherwise). Executable pages are not writable, so ferry writes
//! through `/proc/PID/mem`, which copies the page in this process only; the
//! original bytes go back when ferry detaches. Making a fresh page instead
//! would need an injected `mmap`: the very hazard this closes.
//!
//! Flags are restored by `popf` from 8 bytes just below the red zone (which
//! the thread may use and a signal frame would skip too), the stack pointer
//! by a `mov`, the rest by RIP-relative loads from the data that follows
//! the code, so no register is needed to address it.

use libc::user_regs_struct;

/// Bytes of code before the data (see [`code`] and [`batch_code`]).
const CODE_LEN: usize = 240;
/// Data slots after the code: 15 registers, `rsp`, `rsp - 128`, flags,
/// `rip`, the signal mask, a batch's table and its length.
const SLOTS: usize = 22;
/// Bytes a trampoline takes.
pub const LEN: usize = CODE_LEN + SLOTS * 8;

const SLOT_RSP: usize = 15;
const SLOT_RSP_BELOW_RED_ZONE: usize = 16;
const SLOT_FLAGS: usize = 17;
const SLOT_RIP: usize = 18;
const SLOT_MASK: usize = 19;
const SLOT_TABLE: usize = 20;
const SLOT_COUNT: usize = 21;

/// Bytes of one entry of a batch's table (see [`batch_code`]): the syscall
/// number, six arguments, and the result the code stores.
pub const BATCH_ENTRY: usize = 64;

/// x86-64 red zone: the 128 bytes below `rsp` a leaf function may use.
const RED_ZONE: u64 = 128;

/// The registers the trampoline reloads, with their x86 register number
/// (`reg` field of ModRM, plus 8 for r8–r15), in slot order.
fn gprs(r: &user_regs_struct) -> [(u8, u64); 15] {
    [
        (0, r.rax),
        (3, r.rbx),
        (1, r.rcx),
        (2, r.rdx),
        (6, r.rsi),
        (7, r.rdi),
        (5, r.rbp),
        (8, r.r8),
        (9, r.r9),
        (10, r.r10),
        (11, r.r11),
        (12, r.r12),
        (13, r.r13),
        (14, r.r14),
        (15, r.r15),
    ]
}

/// Emits `insn` followed by a RIP-relative 32-bit displacement to data
/// slot `slot`.
fn rip_rel(out: &mut Vec<u8>, insn: &[u8], slot: usize) {
    out.extend_from_slice(insn);
    let end = out.len() + 4;
    let disp = (CODE_LEN + slot * 8) as i64 - end as i64;
    out.extend_from_slice(&(disp as i32).to_le_bytes());
}

/// The trampoline for a thread whose own registers are `regs` and whose own
/// signal mask is `mask`: position-independent, [`LEN`] bytes; the
/// injection starts at its first byte, a `syscall` instruction.
pub fn code(regs: &user_regs_struct, mask: u64) -> Vec<u8> {
    // The injected syscall, then the way back.
    build(&[0x0f, 0x05], regs, mask, 0, 0)
}

/// A trampoline that runs a batch of syscalls: `count` entries of
/// [`BATCH_ENTRY`] bytes at `table` (writable memory of the process), each
/// the syscall number and six arguments, to which the code adds the result
/// at offset 56; then the way back, as [`code`]. Ferry follows it with one
/// pair of syscall stops per entry; should it die in between, the thread
/// runs the rest of the batch and resumes as it was.
pub fn batch_code(regs: &user_regs_struct, mask: u64, table: u64, count: u64) -> Vec<u8> {
    assert!(count > 0, "an empty batch would loop for ever");
    let mut p = Vec::new();
    rip_rel(&mut p, &[0x4c, 0x8b, 0x25], SLOT_TABLE); // mov r12, [rip+table]
    rip_rel(&mut p, &[0x4c, 0x8b, 0x2d], SLOT_COUNT); // mov r13, [rip+count]
    let top = p.len();
    p.extend_from_slice(&[0x49, 0x8b, 0x04, 0x24]); // mov rax, [r12]
    p.extend_from_slice(&[0x49, 0x8b, 0x7c, 0x24, 8]); // mov rdi, [r12+8]
    p.extend_from_slice(&[0x49, 0x8b, 0x74, 0x24, 16]); // mov rsi, [r12+16]
    p.extend_from_slice(&[0x49, 0x8b, 0x54, 0x24, 24]); // mov rdx, [r12+24]
    p.extend_from_slice(&[0x4d, 0x8b, 0x54, 0x24, 32]); // mov r10, [r12+32]
    p.extend_from_slice(&[0x4d, 0x8b, 0x44, 0x24, 40]); // mov r8, [r12+40]
    p.extend_from_slice(&[0x4d, 0x8b, 0x4c, 0x24, 48]); // mov r9, [r12+48]
    p.extend_from_slice(&[0x0f, 0x05]); // syscall
    p.extend_from_slice(&[0x49, 0x89, 0x44, 0x24, 56]); // mov [r12+56], rax
    p.extend_from_slice(&[0x49, 0x83, 0xc4, BATCH_ENTRY as u8]); // add r12, 64
    p.extend_from_slice(&[0x49, 0xff, 0xcd]); // dec r13
    let back = top as i64 - (p.len() + 2) as i64;
    p.extend_from_slice(&[0x75, back as i8 as u8]); // jnz top
    build(&p, regs, mask, table, count)
}

/// `prologue` (which must not depend on where it ends), then the way back
/// to `regs` and `mask`, then the data.
fn build(prologue: &[u8], regs: &user_regs_struct, mask: u64, table: u64, count: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(LEN);
    c.extend_from_slice(prologue);
    // rt_sigprocmask(SIG_SETMASK, &mask, NULL, 8): signals ferry blocked
    // for the injection must not stay blocked.
    c.extend_from_slice(&[0xb8, 14, 0, 0, 0]); // mov eax, SYS_rt_sigprocmask
    c.extend_from_slice(&[0xbf, 2, 0, 0, 0]); // mov edi, SIG_SETMASK
    rip_rel(&mut c, &[0x48, 0x8d, 0x35], SLOT_MASK); // lea rsi, [rip+mask]
    c.extend_from_slice(&[0x31, 0xd2]); // xor edx, edx
    c.extend_from_slice(&[0x41, 0xba, 8, 0, 0, 0]); // mov r10d, 8
    c.extend_from_slice(&[0x0f, 0x05]); // syscall
    rip_rel(&mut c, &[0x48, 0x8b, 0x25], SLOT_RSP_BELOW_RED_ZONE); // mov rsp, [..]
    rip_rel(&mut c, &[0xff, 0x35], SLOT_FLAGS); // push qword [rip+flags]
    c.push(0x9d); // popf
    for (slot, (reg, _)) in gprs(regs).iter().enumerate() {
        // mov r64, [rip+slot]: REX.W, plus REX.R for r8–r15.
        let rex = if *reg >= 8 { 0x4c } else { 0x48 };
        rip_rel(&mut c, &[rex, 0x8b, ((reg & 7) << 3) | 0b101], slot);
    }
    rip_rel(&mut c, &[0x48, 0x8b, 0x25], SLOT_RSP); // mov rsp, [rip+rsp]
    rip_rel(&mut c, &[0xff, 0x25], SLOT_RIP); // jmp [rip+rip]
    assert!(c.len() <= CODE_LEN, "trampoline code is {} bytes", c.len());
    c.resize(CODE_LEN, 0xcc); // int3: never reached
    for (_, v) in gprs(regs) {
        c.extend_from_slice(&v.to_le_bytes());
    }
    for v in [
        regs.rsp,
        regs.rsp.wrapping_sub(RED_ZONE),
        regs.eflags,
        regs.rip,
        mask,
        table,
        count,
    ] {
        c.extend_from_slice(&v.to_le_bytes());
    }
    c
}

/// Where an ELF object's executable segments end and their last page ends,
/// as `(end, page_end)` in the process, for an object whose ELF header
/// `ehdr` and program headers `phdrs` were read from its first mapping at
/// `base`. Empty for anything that is not a little-endian 64-bit ELF.
pub fn exec_tails(ehdr: &[u8], phdrs: &[u8], base: u64, page: u64) -> Vec<(u64, u64)> {
    const PT_LOAD: u32 = 1;
    const PF_X: u32 = 1;
    let u16_at = |b: &[u8], o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
    };
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
    };
    // \x7fELF, ELFCLASS64, ELFDATA2LSB.
    if ehdr.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1]) {
        return Vec::new();
    }
    let (Some(entsize), Some(count)) = (u16_at(ehdr, 54), u16_at(ehdr, 56)) else {
        return Vec::new();
    };
    if entsize < 56 {
        return Vec::new();
    }
    // (p_type, p_flags, p_vaddr, p_memsz) of each program header.
    let loads: Vec<(u32, u32, u64, u64)> = (0..usize::from(count))
        .map_while(|i| {
            let o = i * usize::from(entsize);
            Some((
                u32_at(phdrs, o)?,
                u32_at(phdrs, o + 4)?,
                u64_at(phdrs, o + 16)?,
                u64_at(phdrs, o + 40)?,
            ))
        })
        .filter(|&(t, ..)| t == PT_LOAD)
        .collect();
    // The first load segment sits at `base`: that gives the load bias
    // (0 for a fixed-address executable).
    let Some(first) = loads.iter().map(|&(_, _, v, _)| v).min() else {
        return Vec::new();
    };
    let bias = base.wrapping_sub(first & !(page - 1));
    loads
        .iter()
        .filter(|&&(_, flags, ..)| flags & PF_X != 0)
        .filter_map(|&(_, _, vaddr, memsz)| {
            let end = bias.checked_add(vaddr)?.checked_add(memsz)?;
            let page_end = end.checked_add(page - 1)? & !(page - 1);
            (end < page_end).then_some((end, page_end))
        })
        .collect()
}

/// A place in the target for the trampoline, and the bytes it held there.
///
/// The trampoline is written for each injection and the original bytes put
/// back right after it ([`Site::disarm`]): the page stays a private copy,
/// but what the process holds between injections, and so what an image of
/// it holds, is byte for byte what it had.
#[derive(Debug)]
pub struct Site {
    pub addr: u64,
    original: Vec<u8>,
    /// `/proc/PID/mem`, open for writing: executable pages are not
    /// writable, and only this path writes through (`FOLL_FORCE`).
    mem: std::fs::File,
    armed: bool,
}

impl Site {
    /// Finds room for a trampoline in `pid`: an executable segment's tail in
    /// the main executable first (it cannot be unloaded), then in any other
    /// mapped ELF file, then `[vdso]` (its tail holds section headers, which
    /// nothing reads at run time). `None` if none has [`LEN`] bytes to spare.
    pub fn find(pid: i32) -> Option<Site> {
        let maps = crate::procfs::read_maps(pid).ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let page = super::page_size();
        let rank = |m: &crate::procfs::MapEntry| {
            let path = m.path.as_deref().map(std::path::Path::new);
            if m.is_file() && path.is_some() && path == exe.as_deref() {
                0
            } else if m.is_file() {
                1
            } else {
                2
            }
        };
        let mut candidates: Vec<_> = maps
            .iter()
            .filter(|m| {
                m.exec
                    && !m.shared
                    && m.end <= super::USER_ADDR_END
                    && (m.is_file() || m.path.as_deref() == Some("[vdso]"))
            })
            .collect();
        candidates.sort_by_key(|m| rank(m));
        for m in candidates {
            // The ELF headers are in the file's first mapping.
            let base = if m.is_file() {
                maps.iter()
                    .filter(|o| o.inode == m.inode && o.dev_major == m.dev_major)
                    .filter(|o| o.dev_minor == m.dev_minor && o.offset == 0)
                    .map(|o| o.start)
                    .min()
            } else {
                Some(m.start)
            };
            let Some(base) = base else { continue };
            let mut ehdr = [0u8; 64];
            if super::vm::read(pid, base, &mut ehdr).is_err() {
                continue;
            }
            let phoff = u64::from_le_bytes(ehdr[32..40].try_into().expect("8 bytes"));
            let phlen = usize::from(u16::from_le_bytes([ehdr[54], ehdr[55]]))
                * usize::from(u16::from_le_bytes([ehdr[56], ehdr[57]]));
            if phoff > page || phlen > page as usize {
                continue;
            }
            let mut phdrs = vec![0u8; phlen];
            if super::vm::read(pid, base + phoff, &mut phdrs).is_err() {
                continue;
            }
            for (end, page_end) in exec_tails(&ehdr, &phdrs, base, page) {
                let start = (end + 15) & !15;
                if start < m.start || page_end > m.end || page_end - start < LEN as u64 {
                    continue;
                }
                let addr = page_end - LEN as u64;
                let mut original = vec![0u8; LEN];
                if super::vm::read(pid, addr, &mut original).is_err() {
                    continue;
                }
                let mem = std::fs::OpenOptions::new()
                    .write(true)
                    .open(format!("/proc/{pid}/mem"))
                    .ok()?;
                return Some(Site {
                    addr,
                    original,
                    mem,
                    armed: false,
                });
            }
        }
        None
    }

    /// Whether the bytes at the site are still the ones ferry left there
    /// (the mapping was not replaced since).
    pub fn intact(&self, pid: i32) -> bool {
        let mut now = vec![0u8; LEN];
        !self.armed && super::vm::read(pid, self.addr, &mut now).is_ok() && now == self.original
    }

    /// Writes `code` (from [`code`] or [`batch_code`]) there.
    pub fn arm(&mut self, code: &[u8]) -> std::io::Result<()> {
        self.write(code)?;
        self.armed = true;
        Ok(())
    }

    /// Puts the original bytes back, if the trampoline is there.
    pub fn disarm(&mut self) -> std::io::Result<()> {
        if self.armed {
            let original = std::mem::take(&mut self.original);
            let written = self.write(&original);
            self.original = original;
            written?;
            self.armed = false;
        }
        Ok(())
    }

    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.mem.write_all_at(bytes, self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> user_regs_struct {
        // SAFETY: user_regs_struct is plain integers; all-zero is valid.
        let mut r: user_regs_struct = unsafe { std::mem::zeroed() };
        let vals = [
            &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rbp,
            &mut r.r8, &mut r.r9, &mut r.r10, &mut r.r11, &mut r.r12, &mut r.r13, &mut r.r14,
            &mut r.r15,
        ];
        for (i, v) in vals.into_iter().enumerate() {
            *v = 0x1111_0000 + i as u64;
        }
        r.rsp = 0x7ffd_0000_1000;
        r.rip = 0x5555_0000_2000;
        r.eflags = 0x246;
        r
    }

    /// Decodes the displacement of a RIP-relative instruction ending at
    /// `end` and returns the 8 bytes it points to.
    fn target(code: &[u8], end: usize) -> u64 {
        let disp = i32::from_le_bytes(code[end - 4..end].try_into().unwrap());
        let at = (end as i64 + i64::from(disp)) as usize;
        u64::from_le_bytes(code[at..at + 8].try_into().unwrap())
    }

    /// Walks the way back that starts at `at` in `c`, checking that every
    /// RIP-relative operand reads the value it must.
    fn check_way_back(c: &[u8], mut at: usize, r: &user_regs_struct, mask: u64) {
        assert_eq!(&c[at..at + 5], &[0xb8, 14, 0, 0, 0]);
        at += 5 + 5;
        assert_eq!(&c[at..at + 3], &[0x48, 0x8d, 0x35]);
        assert_eq!(target(c, at + 7), mask, "lea rsi -> mask");
        at += 7 + 2 + 6;
        assert_eq!(&c[at..at + 2], &[0x0f, 0x05]);
        at += 2;
        assert_eq!(&c[at..at + 3], &[0x48, 0x8b, 0x25]);
        assert_eq!(target(c, at + 7), r.rsp - 128, "rsp below the red zone");
        at += 7;
        assert_eq!(&c[at..at + 2], &[0xff, 0x35]);
        assert_eq!(target(c, at + 6), r.eflags, "push flags");
        at += 6;
        assert_eq!(c[at], 0x9d);
        at += 1;
        for (reg, value) in gprs(r) {
            let rex = if reg >= 8 { 0x4c } else { 0x48 };
            assert_eq!(&c[at..at + 2], &[rex, 0x8b]);
            assert_eq!(c[at + 2] & 0b1100_0111, 0b101, "RIP-relative ModRM");
            assert_eq!((c[at + 2] >> 3) & 7, reg & 7);
            assert_eq!(target(c, at + 7), value, "register {reg}");
            at += 7;
        }
        assert_eq!(&c[at..at + 3], &[0x48, 0x8b, 0x25]);
        assert_eq!(target(c, at + 7), r.rsp, "mov rsp");
        at += 7;
        assert_eq!(&c[at..at + 2], &[0xff, 0x25]);
        assert_eq!(target(c, at + 6), r.rip, "jmp back");
        assert!(at + 6 <= CODE_LEN);
    }

    #[test]
    fn starts_with_the_syscall_and_every_load_reads_its_own_register() {
        let r = regs();
        let c = code(&r, 0xdead_beef);
        assert_eq!(c.len(), LEN);
        assert_eq!(&c[..2], &[0x0f, 0x05]);
        check_way_back(&c, 2, &r, 0xdead_beef);
    }

    #[test]
    fn a_batch_loops_over_its_table_then_goes_back_the_same_way() {
        let r = regs();
        let c = batch_code(&r, 7, 0x7f00_1000, 3);
        assert_eq!(c.len(), LEN);
        assert_eq!(&c[..3], &[0x4c, 0x8b, 0x25]);
        assert_eq!(target(&c, 7), 0x7f00_1000, "mov r12 -> table");
        assert_eq!(&c[7..10], &[0x4c, 0x8b, 0x2d]);
        assert_eq!(target(&c, 14), 3, "mov r13 -> count");
        let syscall = 14 + 4 + 6 * 5;
        assert_eq!(&c[syscall..syscall + 2], &[0x0f, 0x05]);
        let jnz = syscall + 2 + 5 + 4 + 3;
        assert_eq!(c[jnz], 0x75);
        let top = (jnz as i64 + 2 + i64::from(c[jnz + 1] as i8)) as usize;
        assert_eq!(top, 14, "jnz goes back to the first load");
        check_way_back(&c, jnz + 2, &r, 7);
    }

    fn elf(kind: u16, loads: &[(u32, u64, u64)]) -> (Vec<u8>, Vec<u8>) {
        let mut e = vec![0u8; 64];
        e[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        e[16..18].copy_from_slice(&kind.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&(loads.len() as u16).to_le_bytes());
        let mut p = Vec::new();
        for &(flags, vaddr, memsz) in loads {
            let mut h = vec![0u8; 56];
            h[..4].copy_from_slice(&1u32.to_le_bytes());
            h[4..8].copy_from_slice(&flags.to_le_bytes());
            h[16..24].copy_from_slice(&vaddr.to_le_bytes());
            h[40..48].copy_from_slice(&memsz.to_le_bytes());
            p.extend_from_slice(&h);
        }
        (e, p)
    }

    #[test]
    fn a_shared_object_s_tail_is_past_its_text_in_the_load_address() {
        // r--, r-x, rw- like a `-z separate-code` library loaded at base.
        let (e, p) = elf(
            3,
            &[(4, 0, 0x1f30), (5, 0x2000, 0x1234), (6, 0x4000, 0x100)],
        );
        let tails = exec_tails(&e, &p, 0x7f00_0000_0000, 4096);
        assert_eq!(tails, vec![(0x7f00_0000_3234, 0x7f00_0000_4000)]);
    }

    #[test]
    fn a_fixed_address_executable_has_no_bias() {
        let (e, p) = elf(2, &[(4, 0x40_0000, 0x500), (5, 0x40_1000, 0x2000)]);
        // Text ending on a page boundary leaves no tail.
        assert!(exec_tails(&e, &p, 0x40_0000, 4096).is_empty());
        let (e, p) = elf(2, &[(4, 0x40_0000, 0x500), (5, 0x40_1000, 0x1ff0)]);
        assert_eq!(
            exec_tails(&e, &p, 0x40_0000, 4096),
            vec![(0x40_2ff0, 0x40_3000)]
        );
    }

    #[test]
    fn anything_else_has_no_tail() {
        assert!(exec_tails(b"#!/bin/sh\n", &[], 0x1000, 4096).is_empty());
        let (mut e, p) = elf(3, &[(5, 0, 0x10)]);
        e[4] = 1; // 32-bit
        assert!(exec_tails(&e, &p, 0x1000, 4096).is_empty());
        let (e, _) = elf(3, &[(5, 0, 0x10)]);
        assert!(
            exec_tails(&e, &[1, 2, 3], 0x1000, 4096).is_empty(),
            "truncated headers"
        );
    }
}
