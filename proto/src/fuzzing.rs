//! Fuzz entry points over the wire decoders, and the seeds of their corpus.
//!
//! The cargo-fuzz targets in `fuzz/` call these, and so does the corpus
//! replay test of `ferry` (`tests/fuzz_corpus.rs`), so the checked-in corpus
//! runs on stable in every `cargo test`. Each takes arbitrary bytes, must not
//! panic whatever they are, and asserts what the decoders promise beyond
//! that: limits hold, encoders and decoders agree, a decoder fed in pieces
//! says what it says fed whole. Each returns whether the input got all the
//! way through (a valid frame, a committed session), which the replay test
//! requires of the generated seeds. Not an API: hidden and free to change.

use std::collections::{BTreeMap, HashSet};

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

use crate::batch::{self, Compress, DecodedBatch, EncodedBatch, Encoder, MAX_RUNS};
use crate::frame::{self, FrameError, WireBatch, MAX_BATCH_HEADER, MAX_BATCH_PAYLOAD};
use crate::pb::{self, control::Msg};
use crate::session::{Action, Fate, Outcome, Receiver, Sender, SenderConfig};
use crate::vma::RangeSet;
use crate::SessionId;

/// Page sizes the batch targets use, picked by the input's first byte.
const PAGE_SIZES: [u32; 3] = [4096, 16384, 65536];

fn page_size(selector: u8) -> u32 {
    PAGE_SIZES[selector as usize % PAGE_SIZES.len()]
}

// ------------------------------------------------------------------ frame

/// `data` as a control stream and as a data stream, each decoded fed whole
/// and fed in small pieces; true if either held at least one frame and no
/// error.
pub fn frame(data: &[u8]) -> bool {
    let step = 1 + data.len() % 13;
    let control = control_stream(data, data.len().max(1));
    assert_eq!(
        control_stream(data, step),
        control,
        "control stream decodes differently in {step}-byte pieces"
    );
    let batches = batch_stream(data, data.len().max(1));
    assert_eq!(
        batch_stream(data, step),
        batches,
        "data stream decodes differently in {step}-byte pieces"
    );
    (!control.0.is_empty() && control.1.is_ok()) || (!batches.0.is_empty() && batches.1.is_ok())
}

type Decoded<T> = (Vec<T>, Result<(), FrameError>);

/// Every control message of `data` fed `step` bytes at a time, then the
/// error that stopped the stream or the end-of-stream verdict.
fn control_stream(data: &[u8], step: usize) -> Decoded<pb::Control> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match frame::decode_control(&mut buf) {
                Ok(Some(m)) => {
                    assert!(m.msg.is_some(), "an empty control message was let through");
                    let again = pb::Control::decode(&m.encode_to_vec()[..]).expect("re-decode");
                    assert_eq!(again, m, "control message does not survive re-encoding");
                    out.push(m);
                }
                Ok(None) => break,
                Err(e) => return (out, Err(e)),
            }
        }
    }
    (out, frame::check_eof(&buf))
}

/// Every batch frame of `data` fed `step` bytes at a time, as for
/// [`control_stream`].
fn batch_stream(data: &[u8], step: usize) -> Decoded<WireBatch> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match frame::decode_batch(&mut buf) {
                Ok(Some(w)) => {
                    assert!(
                        w.payload.len() <= MAX_BATCH_PAYLOAD,
                        "payload over the limit"
                    );
                    let hlen = w.header.encoded_len();
                    // Re-encoding may grow a header (a negative enum value
                    // sent in 5 bytes takes 10): only frame it if it fits.
                    if hlen <= MAX_BATCH_HEADER {
                        let mut again = BytesMut::new();
                        again.extend_from_slice(&frame::encode_batch_prefix(
                            &w.header,
                            w.payload.len(),
                        ));
                        again.extend_from_slice(&w.payload);
                        let w2 = frame::decode_batch(&mut again).expect("re-decode");
                        assert_eq!(w2.as_ref(), Some(&w), "batch does not survive re-framing");
                        assert!(again.is_empty(), "re-framed batch left bytes behind");
                    }
                    out.push(w);
                }
                Ok(None) => break,
                Err(e) => return (out, Err(e)),
            }
        }
    }
    (out, frame::check_eof(&buf))
}

// ------------------------------------------------------------------ batch

/// A page-size byte, then one data frame: decoded and validated like the
/// page server does, then its pages encoded again, raw and compressed, and
/// decoded back. True if the frame decoded to a valid batch.
pub fn batch(data: &[u8]) -> bool {
    let Some((&sel, rest)) = data.split_first() else {
        return false;
    };
    let ps = page_size(sel);
    let mut buf = BytesMut::from(rest);
    let Ok(Some(wire)) = frame::decode_batch(&mut buf) else {
        return false;
    };
    let Ok(b) = batch::decode(wire.clone(), ps) else {
        return false;
    };
    check_decoded(&b, &wire.header, ps);
    let again = batch::decode(wire, ps).expect("decoded once");
    assert_eq!(again.digest, b.digest, "the digest is not deterministic");
    reencode(&b, ps);
    true
}

/// What [`batch::decode`] promises of a batch it accepts.
fn check_decoded(b: &DecodedBatch, h: &pb::BatchHeader, ps: u32) {
    assert_eq!((b.layer, b.seq), (h.layer, h.seq));
    assert!((1..=MAX_RUNS).contains(&b.runs.len()), "run count");
    assert!(b.data.len() <= MAX_BATCH_PAYLOAD, "data over the limit");
    let mut next_min = 0u64;
    let mut data_bytes = 0usize;
    for (r, d) in b.iter_runs(ps) {
        assert!(r.pages > 0 && r.addr % ps as u64 == 0 && r.addr >= next_min);
        next_min = r
            .addr
            .checked_add(r.pages as u64 * ps as u64)
            .expect("run ends inside the address space");
        match d {
            None => assert!(r.zero),
            Some(d) => {
                assert_eq!(d.len(), r.pages as usize * ps as usize);
                data_bytes += d.len();
            }
        }
    }
    assert_eq!(data_bytes, b.data.len(), "runs and data disagree");
    assert_eq!(data_bytes as u64, h.raw_len as u64);
}

/// Encodes the data pages of `b` again, raw and compressed, and checks the
/// decoder gives the same pages back under the encoder's digest; a batch of
/// zero runs only must come back identical, digest included.
fn reencode(b: &DecodedBatch, ps: u32) {
    let data: Vec<(u64, Bytes)> = b
        .iter_runs(ps)
        .filter_map(|(r, d)| Some((r.addr, d?)))
        .collect();
    if data.is_empty() {
        let zero: Vec<(u64, u64)> = b.runs.iter().map(|r| (r.addr, r.end(ps))).collect();
        let e = Encoder::new(ps, Compress::Off)
            .encode_zero(b.layer, b.seq, &zero)
            .expect("zero runs of a valid batch encode");
        let d = through_wire(&e, ps);
        assert_eq!(d.runs, b.runs, "zero runs change on re-encoding");
        assert_eq!(
            d.digest, b.digest,
            "zero batch digest changes on re-encoding"
        );
        return;
    }
    let want = pages_of(ranges_of(&data, ps), ps);
    for compress in [Compress::Off, Compress::Zstd { level: 1 }] {
        let e = Encoder::new(ps, compress)
            .encode(b.layer, b.seq, data.iter().cloned())
            .expect("data runs of a valid batch encode");
        let d = through_wire(&e, ps);
        assert_eq!(d.digest, e.digest, "encoder and decoder digests differ");
        assert_eq!(d.pages(), e.pages);
        let got = pages_of(runs_of(&d, ps), ps);
        assert_eq!(got, want, "pages change on re-encoding");
    }
}

/// Frames an encoded batch and decodes it like the receiver.
fn through_wire(e: &EncodedBatch, ps: u32) -> DecodedBatch {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&frame::encode_batch_prefix(
        &e.header,
        e.wire_bytes() as usize,
    ));
    for p in &e.payload {
        buf.extend_from_slice(p);
    }
    let wire = frame::decode_batch(&mut buf)
        .expect("own frame decodes")
        .expect("own frame is whole");
    assert!(buf.is_empty());
    batch::decode(wire, ps).expect("own batch decodes")
}

/// Page address → contents, `None` for a zero page whether it came as a
/// zero run or as zero bytes. Zero runs are expanded page by page, so the
/// callers only pass runs that came from data (bounded by the payload
/// limit), never a decoded batch's own zero runs.
fn pages_of(
    runs: impl Iterator<Item = (u64, u64, Option<Bytes>)>,
    ps: u32,
) -> BTreeMap<u64, Option<Bytes>> {
    let psz = ps as usize;
    let mut out = BTreeMap::new();
    for (addr, pages, data) in runs {
        for i in 0..pages {
            let page = data
                .as_ref()
                .map(|d| d.slice(i as usize * psz..(i as usize + 1) * psz))
                .filter(|p| !batch::is_zero(p));
            out.insert(addr + i * ps as u64, page);
        }
    }
    out
}

/// A decoded batch's pages, for [`pages_of`].
fn runs_of(d: &DecodedBatch, ps: u32) -> impl Iterator<Item = (u64, u64, Option<Bytes>)> + '_ {
    d.iter_runs(ps).map(|(r, x)| (r.addr, r.pages as u64, x))
}

/// Input ranges, for [`pages_of`].
fn ranges_of(
    ranges: &[(u64, Bytes)],
    ps: u32,
) -> impl Iterator<Item = (u64, u64, Option<Bytes>)> + '_ {
    ranges
        .iter()
        .map(move |(a, b)| (*a, (b.len() / ps as usize) as u64, Some(b.clone())))
}

/// Most bytes of pages a round-trip input builds: past the compression
/// sample (twice 32 KiB), small enough that zstd does not set the pace.
const MAX_ROUNDTRIP_BYTES: usize = 256 << 10;

/// Builds page ranges from the bytes and checks they survive the encoder,
/// the framing and the decoder: same pages, same digest, zero pages as
/// zero runs, compression only when it shrinks. Then one payload byte is
/// flipped: a raw batch must change its digest, a compressed one must fail
/// or change it, and neither may panic.
///
/// Input: `[flags]` (page size, compression) then `[gap, pages, fill]`
/// triples, one per range; fill picks zero, a constant, a text pattern or
/// bytes of the input itself for each page.
pub fn batch_roundtrip(data: &[u8]) -> bool {
    let Some((&flags, rest)) = data.split_first() else {
        return false;
    };
    let ps = page_size(flags);
    let psz = ps as usize;
    let compress = if flags & 4 == 0 {
        Compress::Off
    } else {
        Compress::Zstd {
            level: 1 + (flags >> 3 & 3) as i32,
        }
    };
    let mut ranges: Vec<(u64, Bytes)> = Vec::new();
    let mut addr = 0x10000u64;
    let mut total = 0usize;
    for t in rest.chunks_exact(3) {
        let (gap, pages, fill) = (t[0] as u64, 1 + (t[1] % 16) as usize, t[2]);
        if total + pages * psz > MAX_ROUNDTRIP_BYTES {
            break;
        }
        addr += gap * ps as u64;
        let mut bytes = Vec::with_capacity(pages * psz);
        for i in 0..pages {
            fill_page(&mut bytes, fill.wrapping_add(i as u8), rest, psz);
        }
        total += bytes.len();
        let len = bytes.len() as u64;
        ranges.push((addr, Bytes::from(bytes)));
        addr += len;
    }
    let mut enc = Encoder::new(ps, compress);
    let e = match enc.encode(7, flags as u32, ranges.iter().cloned()) {
        Err(batch::BatchError::Empty) if ranges.is_empty() => return false,
        r => r.expect("valid ranges encode"),
    };
    let d = through_wire(&e, ps);
    assert_eq!(d.digest, e.digest, "encoder and decoder digests differ");
    assert_eq!((d.layer, d.seq), (7, flags as u32));
    assert_eq!(d.pages(), e.pages);
    let zero_pages: u64 = d
        .runs
        .iter()
        .filter(|r| r.zero)
        .map(|r| r.pages as u64)
        .sum();
    assert_eq!(zero_pages, e.zero_pages);
    if e.header.compression == pb::Compression::Zstd as i32 {
        assert!(e.wire_bytes() < e.raw_bytes(), "compressed without gain");
    }
    let want = pages_of(ranges_of(&ranges, ps), ps);
    let got = pages_of(runs_of(&d, ps), ps);
    assert_eq!(got, want, "pages change through the wire");
    corrupt_one_byte(&e, ps, rest);
    true
}

fn fill_page(out: &mut Vec<u8>, fill: u8, input: &[u8], psz: usize) {
    let start = out.len();
    match fill % 4 {
        0 => out.resize(start + psz, 0),
        1 => out.resize(start + psz, fill | 1),
        2 => {
            let words: [&[u8]; 4] = [b"ferry ", b"page ", b"layer ", b"round "];
            let mut i = fill as usize;
            while out.len() < start + psz {
                out.extend_from_slice(words[i % words.len()]);
                i = i.wrapping_mul(7).wrapping_add(3);
            }
            out.truncate(start + psz);
        }
        _ => {
            // The fuzzer's own bytes, so it controls some page contents
            // outright; all-zero input still makes a zero page.
            let src = if input.is_empty() { &[1u8][..] } else { input };
            out.extend(src.iter().cycle().skip(fill as usize).take(psz));
        }
    }
}

fn corrupt_one_byte(e: &EncodedBatch, ps: u32, input: &[u8]) {
    let payload: Vec<u8> = e.payload.concat();
    if payload.is_empty() {
        return;
    }
    let at = input.iter().map(|&b| b as usize).sum::<usize>() % payload.len();
    let mut bad = payload;
    bad[at] ^= 0x5a;
    let wire = WireBatch {
        header: e.header.clone(),
        payload: Bytes::from(bad),
    };
    let r = batch::decode(wire, ps);
    // A flipped zstd byte may decode to the same pages (padding bits), or
    // fail: only a raw batch has a fixed answer.
    if e.header.compression == pb::Compression::None as i32 {
        let d = r.expect("a raw batch of the right size decodes");
        assert_ne!(d.digest, e.digest, "a corrupted raw batch kept its digest");
    }
}

// ------------------------------------------------------------------ session

/// Receiver's early-batch budget in the session target: small, so the
/// fuzzer reaches the limit.
const EARLY_BYTES: usize = 64 << 10;

/// Input tags of the session target: a control frame or a data frame
/// follows.
const TAG_CONTROL: u8 = b'C';
const TAG_BATCH: u8 = b'B';

/// Feeds a [`Receiver`] a transcript: `C` + control frame or `B` + data
/// frame, repeated, with a driver that carries out every action at once
/// (opens with 0 sealed layers, or 1 on resume; seals; commits) and a model
/// that checks each action against what was fed: batches stored only
/// inside their layer's mappings and once, seals with the pages stored,
/// layers in order, commits only of sealed layers and with state when a
/// restore is asked. A protocol error must end the session. True if the
/// transcript reached a commit.
pub fn session(data: &[u8]) -> bool {
    let mut rx = Receiver::new(EARLY_BYTES).with_ready_go();
    let mut m = Model::default();
    let mut buf = BytesMut::from(data);
    while let Some(&tag) = buf.first() {
        buf.advance(1);
        let r = match tag {
            TAG_CONTROL => match frame::decode_control(&mut buf) {
                Ok(Some(c)) => rx.handle_control(c),
                _ => break,
            },
            TAG_BATCH => match frame::decode_batch(&mut buf) {
                Ok(Some(w)) => {
                    // Before Hello no page size is known, and the receiver
                    // refuses any batch anyway.
                    let ps = Some(rx.page_size()).filter(|&p| p != 0).unwrap_or(4096);
                    match batch::decode(w, ps) {
                        Ok(b) => rx.handle_batch(b),
                        Err(_) => break,
                    }
                }
                _ => break,
            },
            _ => break,
        };
        if r.is_err() {
            assert!(rx.is_finished(), "a protocol error left the session open");
            break;
        }
        m.drive(&mut rx);
    }
    m.committed || m.answered
}

#[derive(Default)]
struct Model {
    next_layer: u32,
    open: Option<ModelLayer>,
    has_state: bool,
    committed: bool,
    /// A Query was answered.
    answered: bool,
}

struct ModelLayer {
    layer: u32,
    ranges: RangeSet,
    seqs: HashSet<u32>,
    pages: u64,
}

impl Model {
    fn drive(&mut self, rx: &mut Receiver) {
        while let Some(a) = rx.poll_action() {
            match a {
                Action::Send(_) | Action::Aborted { .. } | Action::PostCopy { .. } => {}
                Action::OpenSession { hello, .. } => {
                    self.next_layer = hello.resume as u32;
                    rx.session_ready(self.next_layer).expect("session_ready");
                }
                Action::BeginLayer { layer, vmas } => {
                    assert!(self.open.is_none(), "a layer began over an open one");
                    assert_eq!(layer, self.next_layer, "layer out of order");
                    let ranges = RangeSet::from_vmas(&vmas, rx.page_size())
                        .expect("the receiver began a layer with bad mappings");
                    self.open = Some(ModelLayer {
                        layer,
                        ranges,
                        seqs: HashSet::new(),
                        pages: 0,
                    });
                }
                Action::Store(b) => {
                    let o = self.open.as_mut().expect("a batch stored with no layer");
                    assert_eq!(b.layer, o.layer, "a batch stored in another layer");
                    assert!(o.seqs.insert(b.seq), "a batch stored twice");
                    for r in &b.runs {
                        assert!(
                            o.ranges.contains(r.addr, r.end(rx.page_size())),
                            "a run outside the layer's mappings was stored"
                        );
                    }
                    o.pages += b.pages();
                }
                Action::Seal { layer, pages } => {
                    let o = self.open.take().expect("a seal with no layer");
                    assert_eq!((layer, pages), (o.layer, o.pages), "seal of other pages");
                    self.next_layer = layer + 1;
                    rx.sealed(layer).expect("sealed");
                }
                Action::StoreState(_) => self.has_state = true,
                Action::Commit { restore } => {
                    assert!(self.next_layer > 0, "a commit with no sealed layer");
                    assert!(self.open.is_none(), "a commit with a layer open");
                    assert!(!restore || self.has_state, "a restore with no state");
                    if restore && rx.ready_go() {
                        // Committed only once the source says Go.
                        rx.prepared(4242).expect("prepared");
                        continue;
                    }
                    self.committed = true;
                    let outcome = if restore {
                        Outcome::Restored {
                            pid: 1,
                            ns_pid: 0,
                            pid_ns: 0,
                        }
                    } else {
                        Outcome::Stored {
                            layers: self.next_layer,
                            pages: 0,
                        }
                    };
                    rx.finished(outcome).expect("finished");
                }
                Action::Release { pid } => {
                    assert_eq!(pid, 4242, "released another pid than prepared");
                    self.committed = true;
                    rx.finished(Outcome::Restored {
                        pid,
                        ns_pid: 0,
                        pid_ns: 0,
                    })
                    .expect("finished");
                }
                Action::Abandon { pid, .. } => {
                    assert_eq!(pid, 4242, "abandoned another pid than prepared")
                }
                Action::Lookup { .. } => {
                    self.answered = true;
                    rx.answer(&Fate::Unknown).expect("answer");
                }
            }
        }
    }
}

// ------------------------------------------------------------------ seeds

/// A seed input for one target.
#[derive(Debug, Clone)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub data: Vec<u8>,
}

fn seed(target: &'static str, name: &str, data: Vec<u8>) -> Seed {
    Seed {
        target,
        name: name.to_owned(),
        data,
    }
}

const PS: u32 = 4096;

fn text_page(seed: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(PS as usize);
    fill_page(&mut p, 2 + 4 * seed, &[], PS as usize);
    p
}

/// Pages of every kind: text, zero, a run of two zero pages, noise.
fn mixed_ranges() -> Vec<(u64, Bytes)> {
    let mut a = text_page(1);
    a.extend(vec![0u8; 2 * PS as usize]);
    let mut x = 0x9e3779b97f4a7c15u64;
    a.extend((0..PS).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    vec![
        (0x10000, Bytes::from(a)),
        (0x20000, Bytes::from(text_page(3))),
    ]
}

fn frame_bytes(e: &EncodedBatch) -> Vec<u8> {
    let mut out = frame::encode_batch_prefix(&e.header, e.wire_bytes() as usize).to_vec();
    for p in &e.payload {
        out.extend_from_slice(p);
    }
    out
}

fn control_bytes(msgs: &[pb::Control]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for m in msgs {
        frame::encode_control(m, &mut out);
    }
    out.to_vec()
}

fn vma(start: u64, end: u64) -> pb::Vma {
    pb::Vma {
        start,
        end,
        prot: 3,
        flags: 0x22,
        kind: pb::VmaKind::Anon as i32,
        ..Default::default()
    }
}

/// Seeds made by the real encoders and the real [`Sender`]: valid inputs
/// from which the fuzzer mutates its way into the decoders' corners.
pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut raw = Encoder::new(PS, Compress::Off);
    let mut zstd = Encoder::new(PS, Compress::default());
    let mixed_raw = raw.encode(0, 0, mixed_ranges()).expect("seed encodes");
    let mixed_zstd = zstd.encode(0, 1, mixed_ranges()).expect("seed encodes");
    let text: Vec<u8> = (0..4).flat_map(text_page).collect();
    let text_zstd = zstd
        .encode(1, 2, [(0x40000, Bytes::from(text))])
        .expect("seed encodes");
    assert_eq!(text_zstd.header.compression, pb::Compression::Zstd as i32);
    let zero = zstd
        .encode_zero(0, 3, &[(0x1000, 0x5000), (0x10000, 0x11000)])
        .expect("seed encodes");
    for (name, e) in [
        ("mixed-raw", &mixed_raw),
        ("mixed-zstd", &mixed_zstd),
        ("text-zstd", &text_zstd),
        ("zero", &zero),
    ] {
        let mut b = vec![0u8];
        b.extend(frame_bytes(e));
        out.push(seed("batch", name, b));
    }

    // Every control message the protocol has, one frame each.
    let mut tx = sender(false, false);
    let vmas = vec![vma(0x10000, 0x30000)];
    let mut controls = vec![
        tx.hello().expect("hello"),
        session_control(Msg::Welcome(pb::Welcome {
            version: crate::PROTOCOL_VERSION,
            next_layer: 0,
            features: vec![crate::FEATURE_RESTORE.into()],
        })),
    ];
    for m in [
        Msg::LayerBegin(pb::LayerBegin {
            layer: 0,
            vmas: vmas.clone(),
        }),
        Msg::LayerEnd(pb::LayerEnd {
            layer: 0,
            batches: 2,
            pages: 9,
            digest: Bytes::from_static(&[0xab; 16]),
        }),
        Msg::LayerSealed(pb::LayerSealed { layer: 0, pages: 9 }),
        Msg::State(pb::State {
            tree: Some(pb::ProcessTree::default()),
        }),
        Msg::Commit(pb::Commit { restore: true }),
        Msg::Stored(pb::Stored {
            layers: 1,
            pages: 9,
        }),
        Msg::Restored(pb::Restored {
            pid: 4242,
            ..Default::default()
        }),
        Msg::Failed(pb::Failed {
            reason: "no room".into(),
        }),
        Msg::Abort(pb::Abort {
            reason: "operator".into(),
        }),
        Msg::Ready(pb::Ready { pid: 4242 }),
        Msg::Go(pb::Go {}),
        Msg::Query(pb::Query {
            session: Bytes::from_static(&[0x5e; 16]),
        }),
        Msg::Outcome(Fate::Resumed { pid: 4242 }.to_pb()),
    ] {
        controls.push(session_control(m));
    }
    out.push(seed("frame", "controls", control_bytes(&controls)));
    out.push(seed("frame", "batches", {
        let mut b = frame_bytes(&mixed_zstd);
        b.extend(frame_bytes(&zero));
        b
    }));

    out.push(seed("batch_roundtrip", "mixed-raw", {
        // 4 KiB pages, raw; ranges of every fill kind, one after a gap.
        vec![0, 0, 3, 0, 1, 1, 1, 2, 2, 2, 0, 0, 3, 9, 4, 7]
    }));
    out.push(seed("batch_roundtrip", "text-zstd", {
        vec![4 | 8, 0, 15, 2, 0, 7, 6, 1, 2, 3]
    }));

    out.push(seed("session", "store", transcript(false, false, false)));
    out.push(seed(
        "session",
        "restore-early-batch",
        transcript(true, true, false),
    ));
    out.push(seed(
        "session",
        "restore-ready-go",
        transcript(false, true, true),
    ));
    out.push(seed("session", "query", {
        let mut b = vec![TAG_CONTROL];
        b.extend(control_bytes(&[crate::session::query(SessionId(
            [0x5e; 16],
        ))]));
        b
    }));
    out
}

fn session_control(m: Msg) -> pb::Control {
    pb::Control { msg: Some(m) }
}

fn sender(resume: bool, ready_go: bool) -> Sender {
    let mut features = vec![crate::FEATURE_RESTORE.into()];
    if ready_go {
        features.push(crate::FEATURE_READY_GO.into());
    }
    Sender::new(SenderConfig {
        session: SessionId([0x5e; 16]),
        page_size: PS,
        arch: "x86_64".into(),
        kernel: "6.8.0".into(),
        label: "fuzz seed".into(),
        resume,
        features,
        creds: Vec::new(),
        keep_pids_root: 0,
    })
}

/// A whole session as the receiver sees it: two layers of real batches,
/// the second overlapping the first; with `early`, a batch that overtakes
/// its `LayerBegin`; with `restore`, a state and a restoring commit; with
/// `ready_go` too, the two-phase end's `Go`.
fn transcript(early: bool, restore: bool, ready_go: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let control = |out: &mut Vec<u8>, c: pb::Control| {
        out.push(TAG_CONTROL);
        out.extend(control_bytes(&[c]));
    };
    let data = |out: &mut Vec<u8>, e: &EncodedBatch| {
        out.push(TAG_BATCH);
        out.extend(frame_bytes(e));
    };
    let mut tx = sender(false, ready_go);
    control(&mut out, tx.hello().expect("hello"));
    let granted = if ready_go {
        vec![crate::FEATURE_READY_GO.into()]
    } else {
        Vec::new()
    };
    tx.handle_control(session_control(Msg::Welcome(pb::Welcome {
        version: crate::PROTOCOL_VERSION,
        next_layer: 0,
        features: granted,
    })))
    .expect("welcome");
    let mut enc = Encoder::new(PS, Compress::default());
    let vmas = vec![vma(0x10000, 0x30000), vma(0x40000, 0x50000)];
    let rounds: [Vec<(u64, Bytes)>; 2] =
        [mixed_ranges(), vec![(0x11000, Bytes::from(text_page(7)))]];
    for (layer, ranges) in rounds.into_iter().enumerate() {
        let begin = tx.begin_layer(vmas.clone()).expect("begin");
        let t = tx.next_batch().expect("ticket");
        let e = enc.encode(t.layer, t.seq, ranges).expect("encode");
        tx.batch_sent(t, e.pages, e.digest).expect("sent");
        let t = tx.next_batch().expect("ticket");
        let z = enc
            .encode_zero(t.layer, t.seq, &[(0x40000, 0x42000)])
            .expect("encode");
        tx.batch_sent(t, z.pages, z.digest).expect("sent");
        if early && layer == 1 {
            data(&mut out, &z);
            control(&mut out, begin);
        } else {
            control(&mut out, begin);
            data(&mut out, &z);
        }
        data(&mut out, &e);
        control(&mut out, tx.end_layer().expect("end"));
        let sealed = Msg::LayerSealed(pb::LayerSealed {
            layer: layer as u32,
            pages: e.pages + z.pages,
        });
        tx.handle_control(session_control(sealed)).expect("sealed");
    }
    if restore {
        control(
            &mut out,
            tx.state(pb::ProcessTree::default()).expect("state"),
        );
    }
    control(&mut out, tx.commit(restore).expect("commit"));
    if restore && ready_go {
        let ready = session_control(Msg::Ready(pb::Ready { pid: 4242 }));
        tx.handle_control(ready).expect("ready");
        control(&mut out, tx.go().expect("go"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_get_all_the_way_through() {
        for s in seeds() {
            let ok = match s.target {
                "frame" => frame(&s.data),
                "batch" => batch(&s.data),
                "batch_roundtrip" => batch_roundtrip(&s.data),
                "session" => session(&s.data),
                t => panic!("no target {t}"),
            };
            assert!(ok, "seed {}/{} stops early", s.target, s.name);
        }
    }

    #[test]
    fn garbage_is_refused_quietly() {
        for data in [&b""[..], b"\0", b"C\0\0\0\x05hello", b"B\xff\xff\xff\xff"] {
            assert!(!session(data));
            assert!(!batch(data));
            frame(data);
            batch_roundtrip(data);
        }
    }
}
