//! Synthetic memory for the demo, the tests and the benchmarks: pages of
//! the three kinds real processes hold (zero, text-like, random) and rounds
//! that rewrite a share of them, with a model of what the destination must
//! end up with.

use std::collections::BTreeMap;

use bytes::Bytes;
use ferry_page_server::store::{Page, Store, StoreError};
use ferry_proto::batch::is_zero;
use ferry_proto::{pb, SessionId};

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    /// Words and numbers, as heaps of strings and small integers look:
    /// compresses several times.
    Text,
    /// Incompressible.
    Random,
}

/// A small, fast PRNG (xorshift64*), so runs are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Fills `page` with content of kind `c`, varied by `seed`.
pub fn fill(page: &mut [u8], c: Content, seed: u64) {
    let mut rng = Rng::new(seed);
    match c {
        Content::Zero => page.fill(0),
        Content::Random => {
            for chunk in page.chunks_mut(8) {
                let v = rng.next_u64().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        }
        Content::Text => {
            const WORDS: [&str; 12] = [
                "session ", "layer ", "page ", "round ", "delta ", "ferry ", "migrate ",
                "process ", "memory ", "state ", "= ", "\n",
            ];
            let mut i = 0;
            while i < page.len() {
                let w: &[u8] = if rng.below(4) == 0 {
                    &[b'0' + (rng.below(10) as u8), b' ']
                } else {
                    WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes()
                };
                let n = w.len().min(page.len() - i);
                page[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
    }
}

/// The mix a page of `Mix::pick` draws from, in percent.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub zero: u32,
    pub text: u32,
    pub random: u32,
}

impl Mix {
    /// A typical process: a third untouched-but-allocated zero pages, half
    /// text-like heap, the rest incompressible.
    pub const TYPICAL: Mix = Mix {
        zero: 30,
        text: 50,
        random: 20,
    };

    pub fn pick(&self, rng: &mut Rng) -> Content {
        let total = (self.zero + self.text + self.random).max(1) as u64;
        let r = rng.below(total) as u32;
        if r < self.zero {
            Content::Zero
        } else if r < self.zero + self.text {
            Content::Text
        } else {
            Content::Random
        }
    }
}

/// A synthetic address space and the rounds of a migration of it.
#[derive(Debug, Clone)]
pub struct Workload {
    pub page_size: u32,
    pub vmas: Vec<pb::Vma>,
    /// Every page's current contents (the "source process").
    pub memory: BTreeMap<u64, Bytes>,
}

impl Workload {
    /// `mib` MiB in two mappings, filled from `mix`.
    pub fn new(mib: u64, mix: Mix, seed: u64) -> Self {
        let ps = 4096u64;
        let pages = mib * 256;
        let a = 0x7f00_0000_0000u64;
        let half = pages / 2 * ps;
        let b = a + half + 16 * ps;
        let vmas = vec![vma(a, a + half), vma(b, b + (pages * ps - half))];
        let mut rng = Rng::new(seed);
        let mut memory = BTreeMap::new();
        for v in &vmas {
            let mut addr = v.start;
            while addr < v.end {
                let mut p = vec![0u8; ps as usize];
                fill(&mut p, mix.pick(&mut rng), rng.next_u64());
                memory.insert(addr, Bytes::from(p));
                addr += ps;
            }
        }
        Self {
            page_size: ps as u32,
            vmas,
            memory,
        }
    }

    /// Rewrites `percent` % of the pages (drawn at random, by `mix`) and
    /// returns their addresses, sorted: the dirty set of the next round.
    pub fn dirty(&mut self, percent: u32, mix: Mix, rng: &mut Rng) -> Vec<u64> {
        let addrs: Vec<u64> = self.memory.keys().copied().collect();
        let n = (addrs.len() as u64 * percent as u64 / 100).max(1);
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let a = addrs[rng.below(addrs.len() as u64) as usize];
            let mut p = vec![0u8; self.page_size as usize];
            fill(&mut p, mix.pick(rng), rng.next_u64());
            self.memory.insert(a, Bytes::from(p));
            out.push(a);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Batches of at most `per_batch` pages for the given addresses, a
    /// range per page (shared, not copied: the encoder merges neighbours
    /// into runs).
    pub fn batches(&self, addrs: &[u64], per_batch: usize) -> Vec<Vec<(u64, Bytes)>> {
        addrs
            .chunks(per_batch.max(1))
            .map(|chunk| chunk.iter().map(|a| (*a, self.memory[a].clone())).collect())
            .collect()
    }

    /// Every page address, ascending.
    pub fn all_pages(&self) -> Vec<u64> {
        self.memory.keys().copied().collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the image differs from the source at {addr:#x}: {what}")]
    Mismatch { addr: u64, what: &'static str },
}

/// Compares a stored session, flattened, with the workload's memory page
/// for page; returns the pages checked.
pub fn verify(store: &dyn Store, id: SessionId, w: &Workload) -> Result<u64, VerifyError> {
    let flat = store.open(id)?.flatten()?;
    if flat.pages() != w.memory.len() as u64 {
        return Err(VerifyError::Mismatch {
            addr: 0,
            what: "page count",
        });
    }
    for (&addr, want) in &w.memory {
        let ok = match flat.page(addr) {
            None => false,
            Some(Page::Zero) => is_zero(want),
            Some(Page::Data(d)) => d == *want,
        };
        if !ok {
            return Err(VerifyError::Mismatch {
                addr,
                what: "contents",
            });
        }
    }
    Ok(w.memory.len() as u64)
}

fn vma(start: u64, end: u64) -> pb::Vma {
    pb::Vma {
        start,
        end,
        prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
        flags: (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32,
        kind: pb::VmaKind::Anon as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::batch::{Compress, Encoder};

    #[test]
    fn contents_have_the_expected_compressibility() {
        let mut text = vec![0u8; 4096 * 16];
        let mut random = vec![0u8; 4096 * 16];
        for (i, p) in text.chunks_mut(4096).enumerate() {
            fill(p, Content::Text, i as u64);
        }
        for (i, p) in random.chunks_mut(4096).enumerate() {
            fill(p, Content::Random, i as u64);
        }
        let t = zstd::bulk::compress(&text, 1).unwrap();
        let r = zstd::bulk::compress(&random, 1).unwrap();
        assert!(t.len() * 2 < text.len(), "text compresses: {}", t.len());
        assert!(r.len() * 100 > random.len() * 99, "random does not");
    }

    #[test]
    fn batches_merge_neighbours_and_encode() {
        let w = Workload::new(1, Mix::TYPICAL, 1);
        let all = w.all_pages();
        let batches = w.batches(&all, 64);
        assert_eq!(batches.len(), 4);
        assert_eq!(batches[0].len(), 64);
        let mut enc = Encoder::new(4096, Compress::default());
        let e = enc.encode(0, 0, batches[0].clone()).unwrap();
        assert_eq!(e.pages, 64);
        // Neighbouring pages of one kind merge into runs.
        assert!(e.header.runs.len() < 64);
    }
}
