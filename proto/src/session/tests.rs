//! Sender and receiver driven against each other in memory: data streams
//! overtaking the control stream, batches spread over lanes in any order,
//! and every kind of hostile input the receiver must refuse.

use std::collections::{BTreeMap, VecDeque};

use super::*;
use crate::batch::{decode, Compress, Encoder};
use bytes::Bytes;

const PS: u32 = 4096;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn vma(start: u64, end: u64) -> pb::Vma {
    pb::Vma {
        start,
        end,
        ..Default::default()
    }
}

/// One round: mappings and the pages sent (`None` = a zero page).
struct Round {
    vmas: Vec<pb::Vma>,
    pages: BTreeMap<u64, Option<Vec<u8>>>,
}

fn page(tag: u64) -> Vec<u8> {
    let mut p = vec![0u8; PS as usize];
    p[..8].copy_from_slice(&tag.to_le_bytes());
    p[PS as usize - 1] = tag as u8 | 1;
    p
}

fn rounds() -> Vec<Round> {
    let base = 0x10_0000u64;
    let p = |i: u64| base + i * PS as u64;
    let mut r0 = BTreeMap::new();
    for i in 0..40 {
        r0.insert(p(i), if i % 7 == 3 { None } else { Some(page(i)) });
    }
    let mut r1 = BTreeMap::new();
    for i in [1, 2, 3, 10, 11, 39] {
        r1.insert(p(i), Some(page(1000 + i)));
    }
    r1.insert(p(5), None); // data overwritten by zero
    let mut r2 = BTreeMap::new();
    r2.insert(p(3), Some(page(2003))); // zero-then-data-then-data again
    r2.insert(p(64), Some(page(2064))); // a newly mapped region
    r2.insert(p(1), None);
    vec![
        Round {
            vmas: vec![vma(p(0), p(40))],
            pages: r0,
        },
        Round {
            vmas: vec![vma(p(0), p(40))],
            pages: r1,
        },
        // The last round drops pages 32..40 and maps 64..80.
        Round {
            vmas: vec![vma(p(0), p(32)), vma(p(64), p(80))],
            pages: r2,
        },
    ]
}

/// Newest copy of every page inside the last round's mappings.
fn expected(rounds: &[Round]) -> BTreeMap<u64, Option<Vec<u8>>> {
    let last = RangeSet::from_vmas(&rounds.last().unwrap().vmas, PS).unwrap();
    let mut m = BTreeMap::new();
    for r in rounds {
        for (a, p) in &r.pages {
            m.insert(*a, p.clone());
        }
    }
    m.retain(|a, _| last.contains(*a, a + PS as u64));
    m
}

/// Encodes a round's pages into batches of at most `per` pages.
fn encode_round(layer: u32, first_seq: u32, round: &Round, per: usize) -> Vec<DecodedBatch> {
    let mut enc = Encoder::new(PS, Compress::default());
    let items: Vec<_> = round.pages.iter().collect();
    let zero = vec![0u8; PS as usize];
    items
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let ranges = chunk.iter().map(|(a, p)| {
                (
                    **a,
                    Bytes::copy_from_slice(p.as_deref().unwrap_or(&zero[..])),
                )
            });
            let e = enc.encode(layer, first_seq + i as u32, ranges).unwrap();
            decode(e.to_wire(), PS).unwrap()
        })
        .collect()
}

/// A layer of the model store: its mappings and pages (`None` = zero).
type ModelLayer = (Vec<pb::Vma>, BTreeMap<u64, Option<Vec<u8>>>);

#[derive(Default)]
struct ModelStore {
    layers: Vec<ModelLayer>,
    open: Option<ModelLayer>,
    state: bool,
    committed: bool,
    aborted: Option<String>,
    lazy: Option<Vec<pb::LazyRange>>,
}

impl ModelStore {
    fn flatten(&self) -> BTreeMap<u64, Option<Vec<u8>>> {
        let last = RangeSet::from_vmas(&self.layers.last().unwrap().0, PS).unwrap();
        let mut m = BTreeMap::new();
        for (_, pages) in &self.layers {
            for (a, p) in pages {
                m.insert(*a, p.clone());
            }
        }
        m.retain(|a, _| last.contains(*a, a + PS as u64));
        m
    }
}

/// Carries out every action the receiver asks for; returns what to send.
fn drive_receiver(rx: &mut Receiver, store: &mut ModelStore, resume_at: u32) -> Vec<pb::Control> {
    let mut out = vec![];
    while let Some(a) = rx.poll_action() {
        match a {
            Action::Send(c) => out.push(c),
            Action::OpenSession { .. } => rx.session_ready(resume_at).unwrap(),
            Action::BeginLayer { vmas, .. } => store.open = Some((vmas, BTreeMap::new())),
            Action::Store(b) => {
                let open = &mut store.open.as_mut().unwrap().1;
                for (run, data) in b.iter_runs(PS) {
                    for i in 0..run.pages as u64 {
                        let a = run.addr + i * PS as u64;
                        let p = data.as_ref().map(|d| {
                            d[(i * PS as u64) as usize..((i + 1) * PS as u64) as usize].to_vec()
                        });
                        open.insert(a, p);
                    }
                }
            }
            Action::Seal { layer, .. } => {
                store.layers.push(store.open.take().unwrap());
                rx.sealed(layer).unwrap();
            }
            Action::StoreState(_) => store.state = true,
            Action::Commit { .. } => {
                store.committed = true;
                rx.finished(Outcome::Stored {
                    layers: store.layers.len() as u32,
                    pages: 0,
                })
                .unwrap();
            }
            Action::PostCopy { ranges } => store.lazy = Some(ranges),
            Action::Aborted { reason } => store.aborted = Some(reason),
            a @ (Action::Release { .. } | Action::Abandon { .. } | Action::Lookup { .. }) => {
                panic!("{a:?} from a receiver without ready-go")
            }
        }
    }
    out
}

fn sender() -> Sender {
    Sender::new(SenderConfig {
        session: SessionId([9; 16]),
        page_size: PS,
        arch: "x86_64".into(),
        kernel: "6.18".into(),
        label: "test".into(),
        resume: false,
        features: Vec::new(),
        creds: Vec::new(),
        keep_pids_root: 0,
    })
}

/// Runs a whole session with a random delivery order; returns the store.
fn run_session(seed: u64, lanes: usize) -> ModelStore {
    let rounds = rounds();
    let mut rng = Rng(seed | 1);
    let mut tx = sender();
    let mut rx = Receiver::default();
    let mut store = ModelStore::default();
    let mut to_rx: VecDeque<pb::Control> = VecDeque::new();
    let mut to_tx: VecDeque<pb::Control> = VecDeque::new();
    let mut data: Vec<VecDeque<DecodedBatch>> = vec![VecDeque::new(); lanes];
    to_rx.push_back(tx.hello().unwrap());
    let mut next_round = 0usize;
    let mut done = false;

    let send_round = |tx: &mut Sender,
                      to_rx: &mut VecDeque<pb::Control>,
                      data: &mut Vec<VecDeque<DecodedBatch>>,
                      rng: &mut Rng,
                      k: usize| {
        let r = &rounds[k];
        to_rx.push_back(tx.begin_layer(r.vmas.clone()).unwrap());
        let per = 1 + rng.below(6);
        for b in encode_round(tx.next_layer(), 0, r, per) {
            let t = tx.next_batch().unwrap();
            assert_eq!(t.seq, b.seq);
            tx.batch_sent(t, b.pages(), b.digest).unwrap();
            let lane = rng.below(data.len());
            data[lane].push_back(b);
        }
        to_rx.push_back(tx.end_layer().unwrap());
        if k + 1 == rounds.len() {
            // The last round is pipelined: no wait for LayerSealed.
            to_rx.push_back(tx.state(pb::ProcessTree::default()).unwrap());
            to_rx.push_back(tx.commit(false).unwrap());
        }
    };

    for _ in 0..100_000 {
        if done {
            break;
        }
        let mut choices = vec![];
        if !to_rx.is_empty() {
            choices.push(0);
        }
        if !to_tx.is_empty() {
            choices.push(1);
        }
        for (i, l) in data.iter().enumerate() {
            if !l.is_empty() {
                choices.push(2 + i);
            }
        }
        assert!(!choices.is_empty(), "stalled");
        match choices[rng.below(choices.len())] {
            0 => rx.handle_control(to_rx.pop_front().unwrap()).unwrap(),
            1 => match tx.handle_control(to_tx.pop_front().unwrap()).unwrap() {
                Event::Welcomed { next_layer } => {
                    assert_eq!(next_layer, 0);
                    send_round(&mut tx, &mut to_rx, &mut data, &mut rng, next_round);
                    next_round += 1;
                }
                Event::Sealed { layer, .. } => {
                    if next_round < rounds.len() && layer as usize + 1 == next_round {
                        send_round(&mut tx, &mut to_rx, &mut data, &mut rng, next_round);
                        next_round += 1;
                    }
                }
                Event::Stored { layers, .. } => {
                    assert_eq!(layers, 3);
                    done = true;
                }
                e => panic!("unexpected {e:?}"),
            },
            lane => {
                let b = data[lane - 2].pop_front().unwrap();
                rx.handle_batch(b).unwrap();
            }
        }
        to_tx.extend(drive_receiver(&mut rx, &mut store, 0));
    }
    assert!(done, "session did not finish");
    assert!(rx.is_finished());
    store
}

#[test]
fn any_delivery_order_gives_the_same_image() {
    let want = expected(&rounds());
    for seed in 1..300 {
        let store = run_session(seed, 1 + (seed as usize % 4));
        assert!(store.committed && store.state);
        assert_eq!(store.layers.len(), 3);
        assert_eq!(store.flatten(), want, "seed {seed}");
    }
}

/// A receiver that has accepted Hello and begun layer 0 on `0..16 pages`.
fn ready_receiver() -> (Receiver, Sender, ModelStore) {
    let mut tx = sender();
    let mut rx = Receiver::default();
    let mut store = ModelStore::default();
    rx.handle_control(tx.hello().unwrap()).unwrap();
    for c in drive_receiver(&mut rx, &mut store, 0) {
        tx.handle_control(c).unwrap();
    }
    rx.handle_control(tx.begin_layer(vec![vma(0x10000, 0x20000)]).unwrap())
        .unwrap();
    drive_receiver(&mut rx, &mut store, 0);
    (rx, tx, store)
}

fn one_page_batch(layer: u32, seq: u32, addr: u64) -> DecodedBatch {
    let p = page(addr);
    let mut enc = Encoder::new(PS, Compress::Off);
    let e = enc.encode(layer, seq, [(addr, Bytes::from(p))]).unwrap();
    decode(e.to_wire(), PS).unwrap()
}

#[test]
fn wrong_version_is_refused_by_name() {
    let mut rx = Receiver::default();
    let mut hello = sender().hello().unwrap();
    if let Some(Msg::Hello(h)) = hello.msg.as_mut() {
        h.version = 99;
    }
    let e = rx.handle_control(hello).unwrap_err();
    assert_eq!(
        e,
        ProtocolError::WrongVersion {
            ours: 1,
            theirs: 99
        }
    );
    assert!(e.to_string().contains("version 99"));
    assert!(rx.is_finished());
}

#[test]
fn bad_hellos() {
    for (sess, ps) in [
        (vec![1u8; 3], 4096),
        (vec![1u8; 16], 1000),
        (vec![1u8; 16], 1 << 20),
    ] {
        let mut rx = Receiver::default();
        let h = control(Msg::Hello(pb::Hello {
            version: PROTOCOL_VERSION,
            session: sess.into(),
            page_size: ps,
            ..Default::default()
        }));
        assert!(matches!(
            rx.handle_control(h),
            Err(ProtocolError::BadHello(_))
        ));
    }
}

#[test]
fn anything_before_hello_is_unexpected() {
    let mut rx = Receiver::default();
    let e = rx
        .handle_control(control(Msg::Commit(pb::Commit { restore: false })))
        .unwrap_err();
    assert!(matches!(e, ProtocolError::Unexpected { msg: "Commit", .. }));
    let mut rx = Receiver::default();
    assert!(rx.handle_batch(one_page_batch(0, 0, 0x10000)).is_err());
}

#[test]
fn batch_for_unknown_or_sealed_layer() {
    let (mut rx, _, _) = ready_receiver();
    assert_eq!(
        rx.handle_batch(one_page_batch(7, 0, 0x10000)).unwrap_err(),
        ProtocolError::UnknownLayer { layer: 7 }
    );

    let (mut rx, mut tx, mut store) = ready_receiver();
    let b = one_page_batch(0, 0, 0x10000);
    let t = tx.next_batch().unwrap();
    tx.batch_sent(t, 1, b.digest).unwrap();
    rx.handle_batch(b).unwrap();
    rx.handle_control(tx.end_layer().unwrap()).unwrap();
    drive_receiver(&mut rx, &mut store, 0);
    assert_eq!(store.layers.len(), 1);
    assert_eq!(
        rx.handle_batch(one_page_batch(0, 1, 0x11000)).unwrap_err(),
        ProtocolError::SealedLayer { layer: 0 }
    );
}

#[test]
fn address_outside_mappings() {
    let (mut rx, _, _) = ready_receiver();
    let e = rx.handle_batch(one_page_batch(0, 0, 0x20000)).unwrap_err();
    assert!(matches!(
        e,
        ProtocolError::OutsideMappings { start: 0x20000, .. }
    ));
}

#[test]
fn early_batch_outside_mappings_is_caught_at_begin() {
    let mut tx = sender();
    let mut rx = Receiver::default();
    let mut store = ModelStore::default();
    rx.handle_control(tx.hello().unwrap()).unwrap();
    for c in drive_receiver(&mut rx, &mut store, 0) {
        tx.handle_control(c).unwrap();
    }
    rx.handle_batch(one_page_batch(0, 0, 0x90000)).unwrap();
    let e = rx
        .handle_control(tx.begin_layer(vec![vma(0x10000, 0x20000)]).unwrap())
        .unwrap_err();
    assert!(matches!(e, ProtocolError::OutsideMappings { .. }));
}

#[test]
fn early_batches_are_bounded() {
    let mut rx = Receiver::new(10_000);
    let mut tx = sender();
    let mut store = ModelStore::default();
    rx.handle_control(tx.hello().unwrap()).unwrap();
    drive_receiver(&mut rx, &mut store, 0);
    rx.handle_batch(one_page_batch(0, 0, 0x10000)).unwrap();
    rx.handle_batch(one_page_batch(0, 1, 0x11000)).unwrap();
    assert_eq!(
        rx.handle_batch(one_page_batch(0, 2, 0x12000)).unwrap_err(),
        ProtocolError::EarlyOverflow { limit: 10_000 }
    );
}

#[test]
fn duplicate_and_out_of_range_batches() {
    let (mut rx, _, _) = ready_receiver();
    rx.handle_batch(one_page_batch(0, 0, 0x10000)).unwrap();
    assert_eq!(
        rx.handle_batch(one_page_batch(0, 0, 0x11000)).unwrap_err(),
        ProtocolError::DuplicateBatch { layer: 0, seq: 0 }
    );

    let (mut rx, _, _) = ready_receiver();
    rx.handle_batch(one_page_batch(0, 5, 0x10000)).unwrap();
    let end = control(Msg::LayerEnd(pb::LayerEnd {
        layer: 0,
        batches: 2,
        pages: 1,
        digest: vec![0; 16].into(),
    }));
    assert!(matches!(
        rx.handle_control(end),
        Err(ProtocolError::SeqOutOfRange { seq: 5, .. })
    ));
}

#[test]
fn digest_and_count_mismatch() {
    let (mut rx, mut tx, _) = ready_receiver();
    let b = one_page_batch(0, 0, 0x10000);
    let t = tx.next_batch().unwrap();
    tx.batch_sent(t, 1, b.digest ^ 1).unwrap();
    rx.handle_batch(b).unwrap();
    let e = rx.handle_control(tx.end_layer().unwrap()).unwrap_err();
    assert!(matches!(e, ProtocolError::Mismatch { what: "digest", .. }));

    let (mut rx, mut tx, _) = ready_receiver();
    let b = one_page_batch(0, 0, 0x10000);
    let t = tx.next_batch().unwrap();
    tx.batch_sent(t, 2, b.digest).unwrap();
    rx.handle_batch(b).unwrap();
    let e = rx.handle_control(tx.end_layer().unwrap()).unwrap_err();
    assert!(matches!(
        e,
        ProtocolError::Mismatch {
            what: "page count",
            ..
        }
    ));
}

#[test]
fn commit_rules() {
    let (mut rx, _, _) = ready_receiver();
    let e = rx
        .handle_control(control(Msg::Commit(pb::Commit { restore: false })))
        .unwrap_err();
    assert!(matches!(e, ProtocolError::Unexpected { msg: "Commit", .. }));

    let mut tx = sender();
    let mut rx = Receiver::default();
    let mut store = ModelStore::default();
    rx.handle_control(tx.hello().unwrap()).unwrap();
    drive_receiver(&mut rx, &mut store, 0);
    assert_eq!(
        rx.handle_control(control(Msg::Commit(pb::Commit { restore: false })))
            .unwrap_err(),
        ProtocolError::NothingToCommit
    );

    let (mut rx, mut tx, mut store) = ready_receiver();
    rx.handle_control(tx.end_layer().unwrap()).unwrap();
    drive_receiver(&mut rx, &mut store, 0);
    assert_eq!(
        rx.handle_control(control(Msg::Commit(pb::Commit { restore: true })))
            .unwrap_err(),
        ProtocolError::NoState
    );
}

#[test]
fn abort_mid_layer_reaches_the_driver() {
    let (mut rx, mut tx, mut store) = ready_receiver();
    rx.handle_batch(one_page_batch(0, 0, 0x10000)).unwrap();
    rx.handle_control(tx.abort("source interrupted")).unwrap();
    drive_receiver(&mut rx, &mut store, 0);
    assert_eq!(store.aborted.as_deref(), Some("source interrupted"));
    assert!(store.layers.is_empty());
    assert!(rx.is_finished());
    assert!(rx.handle_batch(one_page_batch(0, 1, 0x11000)).is_err());
}

#[test]
fn resume_continues_at_the_sealed_count() {
    let mut tx = Sender::new(SenderConfig {
        resume: true,
        features: Vec::new(),
        creds: Vec::new(),
        keep_pids_root: 0,
        ..sender().cfg
    });
    let mut rx = Receiver::default();
    let mut store = ModelStore::default();
    rx.handle_control(tx.hello().unwrap()).unwrap();
    for c in drive_receiver(&mut rx, &mut store, 2) {
        assert_eq!(
            tx.handle_control(c).unwrap(),
            Event::Welcomed { next_layer: 2 }
        );
    }
    let begin = tx.begin_layer(vec![vma(0x10000, 0x20000)]).unwrap();
    assert!(matches!(
        begin.msg,
        Some(Msg::LayerBegin(pb::LayerBegin { layer: 2, .. }))
    ));
    rx.handle_control(begin).unwrap();

    // A fresh (non-resume) sender refuses a destination that says otherwise.
    let mut fresh = sender();
    fresh.hello().unwrap();
    let w = control(Msg::Welcome(pb::Welcome {
        version: PROTOCOL_VERSION,
        next_layer: 3,
        features: vec![],
    }));
    assert!(fresh.handle_control(w).is_err());
}

#[test]
fn sender_refuses_what_the_destination_must_not_say() {
    let mut tx = sender();
    tx.hello().unwrap();
    let e = tx
        .handle_control(control(Msg::Restored(pb::Restored {
            pid: 1,
            ..Default::default()
        })))
        .unwrap_err();
    assert!(matches!(
        e,
        ProtocolError::Unexpected {
            msg: "Restored",
            ..
        }
    ));

    let (_, mut tx, _) = ready_receiver();
    tx.end_layer().unwrap();
    let e = tx
        .handle_control(control(Msg::LayerSealed(pb::LayerSealed {
            layer: 4,
            pages: 0,
        })))
        .unwrap_err();
    assert!(matches!(
        e,
        ProtocolError::LayerOrder {
            got: 4,
            expected: 0
        }
    ));
}

#[test]
fn sender_api_misuse_is_an_error() {
    let mut tx = sender();
    assert!(tx.begin_layer(vec![]).is_err());
    tx.hello().unwrap();
    assert!(tx.hello().is_err());
    let (_, mut tx, _) = ready_receiver();
    let t = tx.next_batch().unwrap();
    assert!(tx.end_layer().is_err(), "a ticket is outstanding");
    tx.batch_sent(t, 0, 0).unwrap();
    tx.end_layer().unwrap();
    assert!(tx.begin_layer(vec![]).is_err(), "layer 0 not sealed yet");
}

fn post_copy_sender() -> Sender {
    let mut tx = sender();
    tx.cfg.features = vec![crate::FEATURE_POST_COPY.into()];
    tx
}

#[test]
fn post_copy_needs_the_feature_in_welcome() {
    // A page server that does not echo the feature (an old one, or one
    // without warm restore) is refused at the handshake, by name.
    let mut tx = post_copy_sender();
    let mut rx = Receiver::default();
    let mut store = ModelStore::default();
    rx.handle_control(tx.hello().unwrap()).unwrap();
    let welcome = drive_receiver(&mut rx, &mut store, 0).remove(0);
    let e = tx.handle_control(welcome).unwrap_err();
    assert!(matches!(
        e,
        ProtocolError::MissingFeature {
            feature: "post-copy",
            ..
        }
    ));
    assert!(e.to_string().contains("does not offer post-copy"), "{e}");

    let mut tx = post_copy_sender();
    let mut rx = Receiver::default();
    rx.handle_control(tx.hello().unwrap()).unwrap();
    assert!(matches!(rx.poll_action(), Some(Action::OpenSession { .. })));
    rx.session_ready_with(0, vec![crate::FEATURE_POST_COPY.into()])
        .unwrap();
    let Some(Action::Send(welcome)) = rx.poll_action() else {
        panic!("no Welcome")
    };
    assert!(matches!(
        tx.handle_control(welcome).unwrap(),
        Event::Welcomed { next_layer: 0 }
    ));
    // Without the feature asked for, post_copy() is misuse.
    assert!(sender().post_copy(vec![]).is_err());
}

#[test]
fn post_copy_ranges_are_checked_against_the_last_layer() {
    let lazy = |start, end| pb::LazyRange { start, end };
    let send = |ranges: Vec<pb::LazyRange>| {
        let (mut rx, mut tx, mut store) = ready_receiver();
        tx.cfg.features = vec![crate::FEATURE_POST_COPY.into()];
        rx.handle_control(tx.end_layer().unwrap()).unwrap();
        drive_receiver(&mut rx, &mut store, 0);
        let r = rx.handle_control(tx.post_copy(ranges).unwrap());
        drive_receiver(&mut rx, &mut store, 0);
        (r, store.lazy)
    };
    let (r, got) = send(vec![lazy(0x11000, 0x13000), lazy(0x18000, 0x19000)]);
    r.unwrap();
    assert_eq!(got.unwrap().len(), 2);
    let (r, _) = send(vec![lazy(0x1f000, 0x21000)]);
    assert_eq!(
        r.unwrap_err(),
        ProtocolError::LazyOutside {
            start: 0x1f000,
            end: 0x21000
        }
    );
    let (r, _) = send(vec![lazy(0x11000, 0x11800)]);
    assert!(matches!(r.unwrap_err(), ProtocolError::Lazy(_)));
    // Mid-layer it is out of order.
    let (mut rx, _, _) = ready_receiver();
    let e = rx
        .handle_control(control(Msg::PostCopy(pb::PostCopy { ranges: vec![] })))
        .unwrap_err();
    assert!(matches!(
        e,
        ProtocolError::Unexpected {
            msg: "PostCopy",
            ..
        }
    ));
}

// ------------------------------------------------------------ ready-go

fn ready_go_sender() -> Sender {
    Sender::new(SenderConfig {
        features: vec![crate::FEATURE_RESTORE.into(), FEATURE_READY_GO.into()],
        ..sender().cfg
    })
}

/// What a two-phase driver did.
#[derive(Debug, Default, PartialEq)]
struct Fates {
    prepared: Option<i32>,
    released: Option<i32>,
    abandoned: Option<(i32, String)>,
    looked_up: Option<SessionId>,
}

/// Drives a ready-go receiver: a restoring commit prepares pid 77, a
/// release succeeds; returns what to send.
fn drive_two_phase(rx: &mut Receiver, fates: &mut Fates) -> Vec<pb::Control> {
    let mut out = vec![];
    while let Some(a) = rx.poll_action() {
        match a {
            Action::Send(c) => out.push(c),
            Action::OpenSession { .. } => rx.session_ready(0).unwrap(),
            Action::Seal { layer, .. } => rx.sealed(layer).unwrap(),
            Action::BeginLayer { .. } | Action::Store(_) | Action::StoreState(_) => {}
            Action::Commit { restore: true } if rx.ready_go() => {
                fates.prepared = Some(77);
                rx.prepared(77).unwrap();
            }
            Action::Commit { restore } => {
                let o = if restore {
                    Outcome::Restored {
                        pid: 77,
                        ns_pid: 0,
                        pid_ns: 0,
                    }
                } else {
                    Outcome::Stored {
                        layers: 1,
                        pages: 1,
                    }
                };
                rx.finished(o).unwrap();
            }
            Action::Release { pid } => {
                fates.released = Some(pid);
                rx.finished(Outcome::Restored {
                    pid,
                    ns_pid: 0,
                    pid_ns: 0,
                })
                .unwrap();
            }
            Action::Abandon { pid, reason } => fates.abandoned = Some((pid, reason)),
            Action::Lookup { id } => {
                fates.looked_up = Some(id);
                rx.answer(&Fate::Resumed { pid: 77 }).unwrap();
            }
            Action::Aborted { reason } => fates.abandoned = Some((0, reason)),
            a @ Action::PostCopy { .. } => panic!("{a:?} in a ready-go session"),
        }
    }
    out
}

/// Feeds `msgs` to the sender; returns its events.
fn deliver(tx: &mut Sender, msgs: Vec<pb::Control>) -> Vec<Event> {
    msgs.into_iter()
        .map(|c| tx.handle_control(c).unwrap())
        .collect()
}

/// A two-phase session up to the restoring commit: one layer of one page
/// sealed, the state sent. Returns the commit message, not yet delivered.
fn up_to_commit(tx: &mut Sender, rx: &mut Receiver, fates: &mut Fates) -> pb::Control {
    rx.handle_control(tx.hello().unwrap()).unwrap();
    deliver(tx, drive_two_phase(rx, fates));
    rx.handle_control(tx.begin_layer(vec![vma(0x10000, 0x20000)]).unwrap())
        .unwrap();
    let t = tx.next_batch().unwrap();
    let b = one_page_batch(0, t.seq, 0x10000);
    tx.batch_sent(t, b.pages(), b.digest).unwrap();
    rx.handle_batch(b).unwrap();
    rx.handle_control(tx.end_layer().unwrap()).unwrap();
    deliver(tx, drive_two_phase(rx, fates));
    rx.handle_control(tx.state(pb::ProcessTree::default()).unwrap())
        .unwrap();
    tx.commit(true).unwrap()
}

#[test]
fn ready_go_is_negotiated_by_both_sides() {
    // Both ask: granted.
    let (mut tx, mut rx) = (ready_go_sender(), Receiver::default().with_ready_go());
    rx.handle_control(tx.hello().unwrap()).unwrap();
    deliver(&mut tx, drive_two_phase(&mut rx, &mut Fates::default()));
    assert!(rx.ready_go() && tx.ready_go());

    // An older (or unwilling) page server: one phase on both sides.
    let (mut tx, mut rx) = (ready_go_sender(), Receiver::default());
    rx.handle_control(tx.hello().unwrap()).unwrap();
    let mut store = ModelStore::default();
    deliver(&mut tx, drive_receiver(&mut rx, &mut store, 0));
    assert!(!rx.ready_go() && !tx.ready_go());

    // An older source: the page server does not offer it unasked.
    let (mut tx, mut rx) = (sender(), Receiver::default().with_ready_go());
    rx.handle_control(tx.hello().unwrap()).unwrap();
    deliver(&mut tx, drive_two_phase(&mut rx, &mut Fates::default()));
    assert!(!rx.ready_go() && !tx.ready_go());
}

#[test]
fn two_phase_commit_releases_only_on_go() {
    let (mut tx, mut rx, mut fates) = (
        ready_go_sender(),
        Receiver::default().with_ready_go(),
        Fates::default(),
    );
    let commit = up_to_commit(&mut tx, &mut rx, &mut fates);
    rx.handle_control(commit).unwrap();
    let out = drive_two_phase(&mut rx, &mut fates);
    assert_eq!(fates.prepared, Some(77));
    assert_eq!(fates.released, None, "released before Go");
    assert_eq!(rx.prepared_pid(), Some(77));
    assert_eq!(deliver(&mut tx, out), vec![Event::Ready { pid: 77 }]);
    assert!(!rx.is_finished());

    rx.handle_control(tx.go().unwrap()).unwrap();
    let out = drive_two_phase(&mut rx, &mut fates);
    assert_eq!(fates.released, Some(77));
    assert_eq!(
        deliver(&mut tx, out),
        vec![Event::Restored {
            pid: 77,
            ns_pid: 0,
            pid_ns: 0
        }]
    );
    assert!(rx.is_finished());
    assert_eq!(rx.prepared_pid(), None);
    assert_eq!(fates.abandoned, None);
}

#[test]
fn abort_after_ready_abandons_the_prepared_process() {
    let (mut tx, mut rx, mut fates) = (
        ready_go_sender(),
        Receiver::default().with_ready_go(),
        Fates::default(),
    );
    let commit = up_to_commit(&mut tx, &mut rx, &mut fates);
    rx.handle_control(commit).unwrap();
    deliver(&mut tx, drive_two_phase(&mut rx, &mut fates));
    rx.handle_control(tx.abort("operator")).unwrap();
    drive_two_phase(&mut rx, &mut fates);
    assert_eq!(fates.abandoned, Some((77, "operator".into())));
    assert_eq!(fates.released, None);
    assert!(rx.is_finished());
}

#[test]
fn a_failed_two_phase_restore_says_failed_without_ready() {
    let (mut tx, mut rx, mut fates) = (
        ready_go_sender(),
        Receiver::default().with_ready_go(),
        Fates::default(),
    );
    let commit = up_to_commit(&mut tx, &mut rx, &mut fates);
    rx.handle_control(commit).unwrap();
    assert!(matches!(
        std::iter::from_fn(|| rx.poll_action()).find(|a| !matches!(a, Action::StoreState(_))),
        Some(Action::Commit { restore: true })
    ));
    rx.finished(Outcome::Failed {
        reason: "no vdso".into(),
    })
    .unwrap();
    let out = drive_two_phase(&mut rx, &mut fates);
    assert_eq!(
        deliver(&mut tx, out),
        vec![Event::Failed {
            reason: "no vdso".into()
        }]
    );
}

#[test]
fn two_phase_misuse_and_hostile_answers() {
    let (mut tx, mut rx, mut fates) = (
        ready_go_sender(),
        Receiver::default().with_ready_go(),
        Fates::default(),
    );
    let commit = up_to_commit(&mut tx, &mut rx, &mut fates);
    assert!(tx.go().is_err(), "Go before Ready");
    rx.handle_control(commit).unwrap();
    assert!(matches!(
        std::iter::from_fn(|| rx.poll_action()).find(|a| !matches!(a, Action::StoreState(_))),
        Some(Action::Commit { restore: true })
    ));
    // The driver may not report a running process before Go.
    assert!(rx
        .finished(Outcome::Restored {
            pid: 77,
            ns_pid: 0,
            pid_ns: 0
        })
        .is_err());

    // A destination that resumes without waiting for Go is refused.
    let (mut tx, mut rx, mut fates) = (
        ready_go_sender(),
        Receiver::default().with_ready_go(),
        Fates::default(),
    );
    up_to_commit(&mut tx, &mut rx, &mut fates);
    let e = tx
        .handle_control(control(Msg::Restored(pb::Restored {
            pid: 77,
            ..Default::default()
        })))
        .unwrap_err();
    assert!(matches!(
        e,
        ProtocolError::Unexpected {
            msg: "Restored",
            ..
        }
    ));

    // Restored for another pid than Ready named.
    let (mut tx, mut rx, mut fates) = (
        ready_go_sender(),
        Receiver::default().with_ready_go(),
        Fates::default(),
    );
    up_to_commit(&mut tx, &mut rx, &mut fates);
    tx.handle_control(control(Msg::Ready(pb::Ready { pid: 77 })))
        .unwrap();
    tx.go().unwrap();
    assert_eq!(
        tx.handle_control(control(Msg::Restored(pb::Restored {
            pid: 78,
            ..Default::default()
        })))
        .unwrap_err(),
        ProtocolError::PidChanged {
            ready: 77,
            restored: 78
        }
    );

    // Ready in a one-phase session, Go to a receiver that is not prepared.
    let (_, mut tx, _) = ready_receiver();
    assert!(tx
        .handle_control(control(Msg::Ready(pb::Ready { pid: 1 })))
        .is_err());
    let (mut rx, _, _) = ready_receiver();
    assert!(rx.handle_control(control(Msg::Go(pb::Go {}))).is_err());
    assert!(rx.is_finished());
    assert!(Receiver::default().prepared(1).is_err());
}

#[test]
fn query_is_answered_without_a_session() {
    let mut rx = Receiver::default().with_ready_go();
    let mut fates = Fates::default();
    rx.handle_control(query(SessionId([9; 16]))).unwrap();
    let out = drive_two_phase(&mut rx, &mut fates);
    assert_eq!(fates.looked_up, Some(SessionId([9; 16])));
    assert_eq!(out.len(), 1);
    assert_eq!(
        read_outcome(out.into_iter().next().unwrap()).unwrap(),
        Fate::Resumed { pid: 77 }
    );
    assert!(rx.is_finished());
    assert!(rx.handle_control(query(SessionId([9; 16]))).is_err());

    // A receiver whose driver cannot answer refuses the query, by name.
    let e = Receiver::default()
        .handle_control(query(SessionId([9; 16])))
        .unwrap_err();
    assert!(matches!(e, ProtocolError::Unexpected { msg: "Query", .. }));
    let bad = control(Msg::Query(pb::Query {
        session: Bytes::from_static(b"short"),
    }));
    assert!(matches!(
        Receiver::default().with_ready_go().handle_control(bad),
        Err(ProtocolError::BadHello(_))
    ));
}

#[test]
fn outcomes_round_trip_and_nonsense_is_refused() {
    for f in [
        Fate::Unknown,
        Fate::Pending,
        Fate::Resumed { pid: 4 },
        Fate::Abandoned {
            reason: "no Go within 30s".into(),
        },
    ] {
        assert_eq!(Fate::from_pb(&f.to_pb()).unwrap(), f);
    }
    for o in [
        pb::Outcome::default(),
        pb::Outcome {
            fate: 99,
            ..Default::default()
        },
        pb::Outcome {
            fate: pb::SessionFate::Resumed as i32,
            pid: 0,
            ..Default::default()
        },
    ] {
        assert!(Fate::from_pb(&o).is_err(), "{o:?}");
    }
    let abort = control(Msg::Abort(pb::Abort {
        reason: "not allowed".into(),
    }));
    assert!(read_outcome(abort).is_err());
    assert!(read_outcome(control(Msg::Go(pb::Go {}))).is_err());
}

#[test]
fn an_answer_carries_the_note_and_the_uptime() {
    let mut rx = Receiver::default().with_ready_go();
    rx.handle_control(query(SessionId([5; 16]))).unwrap();
    assert!(matches!(rx.poll_action(), Some(Action::Lookup { .. })));
    rx.answer_with(&Fate::Unknown, "never seen", 1234).unwrap();
    let Some(Action::Send(c)) = rx.poll_action() else {
        panic!("no Outcome")
    };
    let Some(Msg::Outcome(o)) = c.msg else {
        panic!("not an Outcome")
    };
    assert_eq!((o.reason.as_str(), o.uptime_ms), ("never seen", 1234));
    // An abandoned session's own reason is kept over the note.
    let mut rx = Receiver::default().with_ready_go();
    rx.handle_control(query(SessionId([5; 16]))).unwrap();
    rx.poll_action();
    let gone = Fate::Abandoned {
        reason: "no Go".into(),
    };
    rx.answer_with(&gone, "note", 1).unwrap();
    let Some(Action::Send(c)) = rx.poll_action() else {
        panic!("no Outcome")
    };
    assert_eq!(read_outcome(c).unwrap(), gone);
    assert!(rx.answer(&Fate::Unknown).is_err(), "one answer per query");
}
