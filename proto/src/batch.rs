//! Page batches: how a set of pages becomes one data frame and back.
//!
//! A batch names its pages as runs (`addr`, `pages`, DATA or ZERO) in
//! ascending, non-overlapping order; the payload holds the DATA pages back to
//! back, zstd-compressed when a sample says it pays and raw when not (random
//! memory would only cost CPU). Zero pages cost a run entry, never payload.
//!
//! Each batch has a digest over its runs and decompressed data; the layer
//! digest combines the batch digests in `seq` order, so sender and receiver
//! agree on it whatever order the batches arrived in. It checks the whole
//! pipeline (encode, decode, store), not the network: QUIC already does that.

use bytes::Bytes;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::frame::{WireBatch, MAX_BATCH_PAYLOAD};
use crate::pb;

/// Most runs in one batch.
pub const MAX_RUNS: usize = 16 * 1024;

/// A run of pages in a decoded batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub addr: u64,
    pub pages: u32,
    pub zero: bool,
}

impl PageRun {
    pub fn end(&self, page_size: u32) -> u64 {
        self.addr + self.pages as u64 * page_size as u64
    }
}

/// A batch after validation and decompression.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedBatch {
    pub layer: u32,
    pub seq: u32,
    pub runs: Vec<PageRun>,
    /// The DATA pages, back to back in run order.
    pub data: Bytes,
    pub digest: u64,
}

impl DecodedBatch {
    /// Pages named by the runs, data and zero.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.pages as u64).sum()
    }

    /// Each run with its slice of `data` (`None` for zero runs).
    pub fn iter_runs(&self, page_size: u32) -> impl Iterator<Item = (PageRun, Option<Bytes>)> + '_ {
        let mut off = 0usize;
        self.runs.iter().map(move |r| {
            if r.zero {
                (*r, None)
            } else {
                let len = r.pages as usize * page_size as usize;
                let s = self.data.slice(off..off + len);
                off += len;
                (*r, Some(s))
            }
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch has {0} runs, more than the limit of {MAX_RUNS}")]
    TooManyRuns(usize),
    #[error("batch has no runs")]
    Empty,
    #[error("run at {addr:#x}: {reason}")]
    BadRun { addr: u64, reason: &'static str },
    #[error("unknown compression {0}")]
    UnknownCompression(i32),
    #[error("runs name {expected} data bytes but the header says {raw_len}")]
    LengthMismatch { expected: u64, raw_len: u32 },
    #[error("raw payload is {got} bytes, expected {expected}")]
    PayloadSize { got: usize, expected: usize },
    #[error("zstd payload does not decompress to {expected} bytes: {reason}")]
    Decompress { expected: usize, reason: String },
    #[error("input range at {addr:#x} ({len} bytes) is not whole pages or not ascending")]
    BadInput { addr: u64, len: usize },
    #[error("batch would exceed {MAX_BATCH_PAYLOAD} bytes of data")]
    TooMuchData,
}

/// True if every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    // OR-folding fixed chunks lets the compiler vectorize; the early exit per
    // chunk keeps data pages (which usually differ early) cheap.
    let mut chunks = page.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Whether and how hard the encoder compresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    Off,
    Zstd { level: i32 },
}

impl Default for Compress {
    fn default() -> Self {
        Compress::Zstd { level: 1 }
    }
}

/// An encoded batch ready to frame, and what it cost.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    pub header: pb::BatchHeader,
    /// The payload in pieces: slices of the caller's buffers when sent raw
    /// (no copy), one buffer when compressed. Written back to back.
    pub payload: Vec<Bytes>,
    pub digest: u64,
    pub pages: u64,
    pub zero_pages: u64,
}

impl EncodedBatch {
    pub fn raw_bytes(&self) -> u64 {
        self.header.raw_len as u64
    }

    pub fn wire_bytes(&self) -> u64 {
        self.payload.iter().map(|b| b.len() as u64).sum()
    }

    /// The batch as the receiver sees it after framing (copies the payload
    /// into one buffer: for tests and benchmarks).
    pub fn to_wire(&self) -> WireBatch {
        WireBatch {
            header: self.header.clone(),
            payload: Bytes::from(self.payload.concat()),
        }
    }
}

/// Builds batches; keeps its buffers and zstd context across calls.
pub struct Encoder {
    page_size: usize,
    compress: Compress,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Gather buffer for compressing scattered data, reused.
    gather: Vec<u8>,
}

/// Size of the sample compressed to decide whether a batch is worth
/// compressing at all.
const SAMPLE: usize = 32 * 1024;

impl Encoder {
    pub fn new(page_size: u32, compress: Compress) -> Self {
        let zstd = match compress {
            Compress::Off => None,
            Compress::Zstd { level } => zstd::bulk::Compressor::new(level).ok(),
        };
        Self {
            page_size: page_size as usize,
            compress,
            zstd,
            gather: Vec::new(),
        }
    }

    pub fn compress(&self) -> Compress {
        self.compress
    }

    /// Encodes contiguous page ranges `(addr, bytes)`, ascending and
    /// non-overlapping, into one batch. Zero pages become zero runs; data
    /// pages stay in the caller's buffers until the payload is written.
    pub fn encode(
        &mut self,
        layer: u32,
        seq: u32,
        ranges: impl IntoIterator<Item = (u64, Bytes)>,
    ) -> Result<EncodedBatch, BatchError> {
        let ps = self.page_size;
        let mut runs: Vec<pb::Run> = Vec::new();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut raw_len = 0usize;
        let mut next_min = 0u64;
        let (mut pages, mut zero_pages) = (0u64, 0u64);
        for (addr, bytes) in ranges {
            if bytes.is_empty() || bytes.len() % ps != 0 || addr % ps as u64 != 0 || addr < next_min
            {
                return Err(BatchError::BadInput {
                    addr,
                    len: bytes.len(),
                });
            }
            next_min = addr + bytes.len() as u64;
            // Start of the data span being collected in `bytes`, if any.
            let mut span: Option<usize> = None;
            for (i, page) in bytes.chunks_exact(ps).enumerate() {
                let off = i * ps;
                let a = addr + off as u64;
                let zero = is_zero(page);
                pages += 1;
                if zero {
                    zero_pages += 1;
                    if let Some(s) = span.take() {
                        chunks.push(bytes.slice(s..off));
                    }
                } else {
                    if raw_len + ps > MAX_BATCH_PAYLOAD {
                        return Err(BatchError::TooMuchData);
                    }
                    raw_len += ps;
                    span.get_or_insert(off);
                }
                let kind = if zero {
                    pb::RunKind::Zero
                } else {
                    pb::RunKind::Data
                } as i32;
                match runs.last_mut() {
                    Some(r) if r.kind == kind && r.addr + r.pages as u64 * ps as u64 == a => {
                        r.pages += 1
                    }
                    _ => {
                        if runs.len() == MAX_RUNS {
                            return Err(BatchError::TooManyRuns(runs.len() + 1));
                        }
                        runs.push(pb::Run {
                            addr: a,
                            pages: 1,
                            kind,
                        })
                    }
                }
            }
            if let Some(s) = span {
                chunks.push(bytes.slice(s..));
            }
        }
        if runs.is_empty() {
            return Err(BatchError::Empty);
        }
        let mut hasher = Xxh3::new();
        for r in &runs {
            hash_run(
                &mut hasher,
                r.addr,
                r.pages,
                r.kind == pb::RunKind::Zero as i32,
            );
        }
        for c in &chunks {
            hasher.update(c);
        }
        let digest = hasher.digest();
        let (compression, payload) = self.maybe_compress(chunks, raw_len);
        Ok(EncodedBatch {
            header: pb::BatchHeader {
                layer,
                seq,
                runs,
                compression: compression as i32,
                raw_len: raw_len as u32,
            },
            payload,
            digest,
            pages,
            zero_pages,
        })
    }

    /// A batch of zero runs only, for page ranges `[start, end)` the source
    /// knows read as zero without reading them (the holes of a mapping that
    /// replaced an older one: they must override older layers). Ranges must
    /// be ascending, page aligned, at most [`MAX_RUNS`] runs in all.
    pub fn encode_zero(
        &mut self,
        layer: u32,
        seq: u32,
        ranges: &[(u64, u64)],
    ) -> Result<EncodedBatch, BatchError> {
        let ps = self.page_size as u64;
        let mut runs = Vec::new();
        let mut next_min = 0u64;
        let mut pages = 0u64;
        for &(start, end) in ranges {
            if start >= end || start % ps != 0 || end % ps != 0 || start < next_min {
                return Err(BatchError::BadInput {
                    addr: start,
                    len: end.saturating_sub(start) as usize,
                });
            }
            next_min = end;
            let mut a = start;
            while a < end {
                let n = ((end - a) / ps).min(u32::MAX as u64);
                if runs.len() == MAX_RUNS {
                    return Err(BatchError::TooManyRuns(runs.len() + 1));
                }
                runs.push(pb::Run {
                    addr: a,
                    pages: n as u32,
                    kind: pb::RunKind::Zero as i32,
                });
                pages += n;
                a += n * ps;
            }
        }
        if runs.is_empty() {
            return Err(BatchError::Empty);
        }
        let mut hasher = Xxh3::new();
        for r in &runs {
            hash_run(&mut hasher, r.addr, r.pages, true);
        }
        Ok(EncodedBatch {
            header: pb::BatchHeader {
                layer,
                seq,
                runs,
                compression: pb::Compression::None as i32,
                raw_len: 0,
            },
            payload: Vec::new(),
            digest: hasher.digest(),
            pages,
            zero_pages: pages,
        })
    }

    fn maybe_compress(
        &mut self,
        chunks: Vec<Bytes>,
        raw_len: usize,
    ) -> (pb::Compression, Vec<Bytes>) {
        let Some(z) = self.zstd.as_mut() else {
            return (pb::Compression::None, chunks);
        };
        if raw_len == 0 {
            return (pb::Compression::None, chunks);
        }
        if raw_len >= 2 * SAMPLE && chunks[0].len() >= SAMPLE {
            // Random memory does not compress; finding out on a sample costs a
            // fraction of compressing the whole batch for nothing.
            match z.compress(&chunks[0][..SAMPLE]) {
                Ok(c) if c.len() < SAMPLE * 7 / 8 => {}
                _ => return (pb::Compression::None, chunks),
            }
        }
        let input: &[u8] = if chunks.len() == 1 {
            &chunks[0]
        } else {
            self.gather.clear();
            for c in &chunks {
                self.gather.extend_from_slice(c);
            }
            &self.gather
        };
        match z.compress(input) {
            Ok(c) if c.len() < raw_len - raw_len / 16 => {
                (pb::Compression::Zstd, vec![Bytes::from(c)])
            }
            _ => (pb::Compression::None, chunks),
        }
    }
}

fn hash_run(h: &mut Xxh3, addr: u64, pages: u32, zero: bool) {
    h.update(&addr.to_le_bytes());
    h.update(&pages.to_le_bytes());
    h.update(&[zero as u8]);
}

/// Validates and decompresses a batch. Checks everything that does not need
/// the layer's mappings (the receiver checks those).
pub fn decode(wire: WireBatch, page_size: u32) -> Result<DecodedBatch, BatchError> {
    let h = wire.header;
    if h.runs.len() > MAX_RUNS {
        return Err(BatchError::TooManyRuns(h.runs.len()));
    }
    if h.runs.is_empty() {
        return Err(BatchError::Empty);
    }
    let ps = page_size as u64;
    let mut runs = Vec::with_capacity(h.runs.len());
    let mut data_bytes = 0u64;
    let mut next_min = 0u64;
    for r in &h.runs {
        let bad = |reason| BatchError::BadRun {
            addr: r.addr,
            reason,
        };
        let zero = match pb::RunKind::try_from(r.kind) {
            Ok(pb::RunKind::Data) => false,
            Ok(pb::RunKind::Zero) => true,
            _ => return Err(bad("unknown run kind")),
        };
        if r.pages == 0 {
            return Err(bad("no pages"));
        }
        if r.addr % ps != 0 {
            return Err(bad("not page aligned"));
        }
        if r.addr < next_min {
            return Err(bad("runs overlap or are not ascending"));
        }
        let end = (r.pages as u64)
            .checked_mul(ps)
            .and_then(|l| r.addr.checked_add(l))
            .ok_or_else(|| bad("ends past the address space"))?;
        next_min = end;
        if !zero {
            data_bytes += r.pages as u64 * ps;
        }
        runs.push(PageRun {
            addr: r.addr,
            pages: r.pages,
            zero,
        });
    }
    if data_bytes != h.raw_len as u64 {
        return Err(BatchError::LengthMismatch {
            expected: data_bytes,
            raw_len: h.raw_len,
        });
    }
    let raw_len = h.raw_len as usize;
    if raw_len > MAX_BATCH_PAYLOAD {
        return Err(BatchError::TooMuchData);
    }
    let data = match pb::Compression::try_from(h.compression) {
        Ok(pb::Compression::None) => {
            if wire.payload.len() != raw_len {
                return Err(BatchError::PayloadSize {
                    got: wire.payload.len(),
                    expected: raw_len,
                });
            }
            wire.payload
        }
        Ok(pb::Compression::Zstd) => {
            // The output buffer is sized by the (already limited) header, so a
            // decompression bomb fails instead of growing it.
            let out = zstd::bulk::decompress(&wire.payload, raw_len).map_err(|e| {
                BatchError::Decompress {
                    expected: raw_len,
                    reason: e.to_string(),
                }
            })?;
            let n = out.len();
            if n != raw_len {
                return Err(BatchError::Decompress {
                    expected: raw_len,
                    reason: format!("got {n} bytes"),
                });
            }
            Bytes::from(out)
        }
        _ => return Err(BatchError::UnknownCompression(h.compression)),
    };
    let mut hasher = Xxh3::new();
    for r in &runs {
        hash_run(&mut hasher, r.addr, r.pages, r.zero);
    }
    hasher.update(&data);
    Ok(DecodedBatch {
        layer: h.layer,
        seq: h.seq,
        runs,
        data,
        digest: hasher.digest(),
    })
}

/// Combines batch digests into the layer digest, independent of arrival
/// order.
#[derive(Debug, Clone, Default)]
pub struct LayerDigest {
    batches: Vec<(u32, u64)>,
}

impl LayerDigest {
    pub fn add(&mut self, seq: u32, digest: u64) {
        self.batches.push((seq, digest));
    }

    /// The 16-byte digest sent in `LayerEnd`.
    pub fn finish(&self) -> [u8; 16] {
        let mut v = self.batches.clone();
        v.sort_unstable();
        let mut buf = Vec::with_capacity(v.len() * 12);
        for (seq, d) in v {
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(&d.to_le_bytes());
        }
        xxh3_128(&buf).to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_batch, encode_batch_prefix};
    use bytes::BytesMut;

    const PS: u32 = 4096;

    fn b(x: &[u8]) -> Bytes {
        Bytes::copy_from_slice(x)
    }

    fn text_page(seed: u8) -> Vec<u8> {
        let words = ["ferry ", "page ", "layer ", "round ", "delta "];
        let mut p = Vec::with_capacity(PS as usize);
        let mut i = seed as usize;
        while p.len() < PS as usize {
            p.extend_from_slice(words[i % words.len()].as_bytes());
            i = i.wrapping_mul(7).wrapping_add(3);
        }
        p.truncate(PS as usize);
        p
    }

    fn random_page(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        (0..PS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn through_wire(e: &EncodedBatch) -> DecodedBatch {
        let mut buf = BytesMut::new();
        let w = e.to_wire();
        buf.extend_from_slice(&encode_batch_prefix(&w.header, w.payload.len()));
        buf.extend_from_slice(&w.payload);
        decode(decode_batch(&mut buf).unwrap().unwrap(), PS).unwrap()
    }

    #[test]
    fn mixed_pages_round_trip_with_zero_runs() {
        let mut mem = Vec::new();
        mem.extend(text_page(1));
        mem.extend(vec![0u8; 2 * PS as usize]);
        mem.extend(random_page(5));
        let other = text_page(9);
        for compress in [Compress::Off, Compress::default()] {
            let mut enc = Encoder::new(PS, compress);
            let e = enc
                .encode(2, 7, [(0x10000, b(&mem)), (0x20000, b(&other))])
                .unwrap();
            assert_eq!(e.pages, 5);
            assert_eq!(e.zero_pages, 2);
            assert_eq!(e.header.runs.len(), 4);
            assert_eq!(e.raw_bytes(), 3 * PS as u64);
            let d = through_wire(&e);
            assert_eq!(d.digest, e.digest);
            assert_eq!((d.layer, d.seq), (2, 7));
            let runs: Vec<_> = d.iter_runs(PS).collect();
            assert_eq!(runs[0].1.as_deref(), Some(&mem[..PS as usize]));
            assert!(runs[1].0.zero && runs[1].0.pages == 2);
            assert_eq!(runs[2].1.as_deref(), Some(&mem[3 * PS as usize..]));
            assert_eq!(runs[3].0.addr, 0x20000);
            assert_eq!(runs[3].1.as_deref(), Some(&other[..]));
        }
    }

    #[test]
    fn compression_only_when_it_pays() {
        let text: Vec<u8> = (0..32).flat_map(text_page).collect();
        let random: Vec<u8> = (0..32).flat_map(random_page).collect();
        let mut enc = Encoder::new(PS, Compress::default());
        let t = enc.encode(0, 0, [(0, b(&text))]).unwrap();
        assert_eq!(t.header.compression, pb::Compression::Zstd as i32);
        assert!(t.wire_bytes() * 4 < t.raw_bytes());
        let r = enc.encode(0, 1, [(0, b(&random))]).unwrap();
        assert_eq!(r.header.compression, pb::Compression::None as i32);
        assert_eq!(r.wire_bytes(), r.raw_bytes());
        assert_eq!(through_wire(&t).data, Bytes::from(text));
    }

    #[test]
    fn all_zero_batch_has_no_payload() {
        let z = vec![0u8; 64 * PS as usize];
        let mut enc = Encoder::new(PS, Compress::default());
        let e = enc.encode(0, 0, [(0x1000, b(&z))]).unwrap();
        assert_eq!(e.wire_bytes(), 0);
        assert_eq!(e.header.runs.len(), 1);
        assert_eq!(through_wire(&e).pages(), 64);
    }

    #[test]
    fn zero_only_batches_round_trip() {
        let mut enc = Encoder::new(PS, Compress::default());
        let e = enc
            .encode_zero(1, 2, &[(0x1000, 0x5000), (0x10000, 0x11000)])
            .unwrap();
        assert_eq!((e.pages, e.zero_pages, e.wire_bytes()), (5, 5, 0));
        let d = through_wire(&e);
        assert_eq!(d.digest, e.digest);
        assert_eq!(d.pages(), 5);
        assert!(d.runs.iter().all(|r| r.zero));
        assert!(enc.encode_zero(0, 0, &[(0x2000, 0x1000)]).is_err());
        assert!(enc
            .encode_zero(0, 0, &[(0x3000, 0x4000), (0x1000, 0x2000)])
            .is_err());
        assert!(enc.encode_zero(0, 0, &[]).is_err());
    }

    #[test]
    fn bad_input_to_encoder() {
        let p = vec![1u8; PS as usize];
        let mut enc = Encoder::new(PS, Compress::Off);
        assert!(enc.encode(0, 0, [(0x1001, b(&p))]).is_err());
        assert!(enc.encode(0, 0, [(0x1000, b(&p[..10]))]).is_err());
        assert!(enc
            .encode(0, 0, [(0x2000, b(&p)), (0x1000, b(&p))])
            .is_err());
        assert_eq!(
            enc.encode(0, 0, std::iter::empty()).unwrap_err(),
            BatchError::Empty
        );
    }

    fn wire(
        runs: Vec<pb::Run>,
        compression: pb::Compression,
        raw_len: u32,
        payload: &[u8],
    ) -> WireBatch {
        WireBatch {
            header: pb::BatchHeader {
                layer: 0,
                seq: 0,
                runs,
                compression: compression as i32,
                raw_len,
            },
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn run(addr: u64, pages: u32, kind: pb::RunKind) -> pb::Run {
        pb::Run {
            addr,
            pages,
            kind: kind as i32,
        }
    }

    #[test]
    fn hostile_batches_are_refused() {
        use pb::Compression::{None, Zstd};
        use pb::RunKind::{Data, Zero};
        let cases = [
            wire(vec![], None, 0, &[]),
            wire(vec![run(0x1001, 1, Zero)], None, 0, &[]),
            wire(vec![run(0x1000, 0, Zero)], None, 0, &[]),
            wire(vec![run(0x1000, 1, pb::RunKind::Unspecified)], None, 0, &[]),
            wire(
                vec![run(0x3000, 1, Zero), run(0x1000, 1, Zero)],
                None,
                0,
                &[],
            ),
            wire(vec![run(!0xfff, 2, Zero)], None, 0, &[]),
            wire(vec![run(0x1000, 1, Data)], None, 10, &[0; 10]),
            wire(vec![run(0x1000, 1, Data)], None, PS, &[0; 10]),
            wire(vec![run(0x1000, 1, Data)], Zstd, PS, b"not zstd"),
            wire(
                vec![run(0x1000, 1, Data)],
                pb::Compression::Unspecified,
                PS,
                &[0; 4096],
            ),
        ];
        for c in cases {
            assert!(decode(c.clone(), PS).is_err(), "{c:?} decoded");
        }
        // A zstd frame that expands past raw_len is cut off, not followed.
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
        assert!(matches!(
            decode(wire(vec![run(0x1000, 1, Data)], Zstd, PS, &bomb), PS),
            Err(BatchError::Decompress { .. })
        ));
        let many: Vec<_> = (0..MAX_RUNS as u64 + 1)
            .map(|i| run(i * 0x2000, 1, Zero))
            .collect();
        assert!(matches!(
            decode(wire(many, None, 0, &[]), PS),
            Err(BatchError::TooManyRuns(_))
        ));
    }

    #[test]
    fn layer_digest_ignores_arrival_order() {
        let mut a = LayerDigest::default();
        let mut b = LayerDigest::default();
        a.add(0, 11);
        a.add(1, 22);
        b.add(1, 22);
        b.add(0, 11);
        assert_eq!(a.finish(), b.finish());
        b.add(2, 33);
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 100]));
    }
}
