//! The one test suite both stores must pass, plus the disk store's own
//! tests (restart, crash leftovers, damaged files).
//!
//! Every shared test is a function of a store factory, instantiated for
//! [`MemStore`] and [`DiskStore`] by `suite!`, so the two cannot drift
//! apart in behaviour. Flatten and lookup are checked against a page-by-page
//! model that is obviously right and far too slow for real images; the
//! stores themselves must stay range based (one test flattens a 16 GiB zero
//! run).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use ferry_proto::batch::{self, DecodedBatch, PageRun};
use ferry_proto::{frame, pb, SessionId};

use super::disk::DiskStore;
use super::mem::MemStore;
use super::quota::{Quota, QuotaStore};
use super::{FlatImage, Page, SessionStore, Store, StoreError};

const PS: u32 = 4096;
const P: u64 = PS as u64;

type Make<'a> = &'a dyn Fn() -> Box<dyn Store>;

/// Runs of one batch: `(addr, pages, zero)`.
type Runs = Vec<(u64, u32, bool)>;

/// One layer as a test sends it.
#[derive(Clone, Debug, Default)]
struct Spec {
    vmas: Vec<(u64, u64)>,
    batches: Vec<Runs>,
}

fn id(n: u8) -> SessionId {
    SessionId([n; 16])
}

fn meta(n: u8) -> pb::SessionMeta {
    pb::SessionMeta {
        session: Bytes::from(vec![n; 16]),
        page_size: PS,
        arch: "x86_64".into(),
        kernel: "6.8.0".into(),
        label: format!("pid {n} /usr/bin/test"),
        created_unix_ms: 1_700_000_000_000,
    }
}

fn vmas(ranges: &[(u64, u64)]) -> Vec<pb::Vma> {
    ranges
        .iter()
        .map(|&(start, end)| pb::Vma {
            start,
            end,
            prot: 3,
            kind: pb::VmaKind::Anon as i32,
            ..Default::default()
        })
        .collect()
}

/// A page that says which layer sent it and for which address.
fn page(layer: u32, addr: u64) -> Vec<u8> {
    let mut p = vec![(addr / P) as u8 ^ (layer as u8).wrapping_mul(31) | 1; PS as usize];
    p[..8].copy_from_slice(&addr.to_le_bytes());
    p[8..12].copy_from_slice(&layer.to_le_bytes());
    p
}

fn batch(layer: u32, seq: u32, runs: &[(u64, u32, bool)]) -> DecodedBatch {
    let mut data = Vec::new();
    for &(addr, pages, zero) in runs {
        if !zero {
            for i in 0..pages as u64 {
                data.extend(page(layer, addr + i * P));
            }
        }
    }
    DecodedBatch {
        layer,
        seq,
        runs: runs
            .iter()
            .map(|&(addr, pages, zero)| PageRun { addr, pages, zero })
            .collect(),
        data: Bytes::from(data),
        digest: 0,
    }
}

/// Sends and seals one layer, batches in the order `order` gives.
fn send(h: &mut dyn SessionStore, layer: u32, spec: &Spec, order: &[usize]) {
    h.begin_layer(layer, vmas(&spec.vmas)).unwrap();
    for &i in order {
        h.put(&batch(layer, i as u32, &spec.batches[i])).unwrap();
    }
    let s = h.seal().unwrap();
    assert_eq!(s.layer, layer);
}

fn session_with(store: &dyn Store, n: u8, specs: &[Spec]) -> Box<dyn SessionStore> {
    let mut h = store.create(meta(n)).unwrap();
    for (l, spec) in specs.iter().enumerate() {
        let order: Vec<usize> = (0..spec.batches.len()).collect();
        send(h.as_mut(), l as u32, spec, &order);
    }
    h
}

/// The model: the newest copy of every page sent, as long as every newer
/// layer still maps it (a mapping that went away voids its old pages).
fn model_pages(specs: &[Spec]) -> BTreeMap<u64, Page> {
    let mut m = BTreeMap::new();
    for (l, spec) in specs.iter().enumerate() {
        m.retain(|a: &u64, _| spec.vmas.iter().any(|&(s, e)| s <= *a && *a < e));
        for &(addr, pages, zero) in spec.batches.iter().flatten() {
            for i in 0..pages as u64 {
                let a = addr + i * P;
                let p = if zero {
                    Page::Zero
                } else {
                    Page::Data(Bytes::from(page(l as u32, a)))
                };
                m.insert(a, p);
            }
        }
    }
    m
}

/// The model of flatten: the same (the last layer's mappings clip it).
fn model_flat(specs: &[Spec]) -> BTreeMap<u64, Page> {
    model_pages(specs)
}

/// An image page by page, after checking the shape flatten promises.
fn expand(img: &FlatImage) -> BTreeMap<u64, Page> {
    assert_eq!(img.page_size, PS);
    let mut m = BTreeMap::new();
    let mut prev: Option<&super::FlatRun> = None;
    for r in &img.runs {
        assert!(r.pages > 0, "empty run {r:?}");
        assert_eq!(r.addr % P, 0);
        if let Some(p) = prev {
            let end = p.addr + p.pages * P;
            assert!(end <= r.addr, "runs overlap or descend at {:#x}", r.addr);
            assert!(
                !(end == r.addr && p.data.is_none() && r.data.is_none()),
                "adjacent zero runs at {:#x} not coalesced",
                r.addr
            );
        }
        if let Some(d) = &r.data {
            assert_eq!(d.len() as u64, r.pages * P, "run at {:#x}", r.addr);
        }
        for i in 0..r.pages {
            let a = r.addr + i * P;
            m.insert(a, img.page(a).unwrap());
        }
        prev = Some(r);
    }
    m
}

fn assert_flat(h: &dyn SessionStore, specs: &[Spec]) -> FlatImage {
    let img = h.flatten().unwrap();
    let got = expand(&img);
    let want = model_flat(specs);
    assert_eq!(got.len(), want.len(), "page count");
    for (a, p) in &want {
        assert_eq!(got.get(a), Some(p), "page {a:#x}");
    }
    assert_eq!(img.vmas, vmas(&specs.last().unwrap().vmas));
    img
}

fn err<T>(r: Result<T, StoreError>) -> StoreError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

const A: u64 = 0x10_0000;

/// Three layers over one mapping, with zero runs, overwrites both ways and
/// a page of layer 0 that nothing later touches.
fn three_layers() -> Vec<Spec> {
    let v = vec![(A, A + 64 * P)];
    vec![
        Spec {
            vmas: v.clone(),
            batches: vec![
                vec![(A, 4, false), (A + 4 * P, 8, true)],
                vec![(A + 16 * P, 2, false), (A + 20 * P, 1, false)],
            ],
        },
        Spec {
            vmas: v.clone(),
            batches: vec![
                // data over data, zero over data, data over zero
                vec![
                    (A + P, 1, false),
                    (A + 5 * P, 2, false),
                    (A + 16 * P, 1, true),
                ],
                vec![(A + 40 * P, 3, true)],
            ],
        },
        Spec {
            vmas: v,
            batches: vec![vec![
                (A + 2 * P, 1, true),
                (A + 6 * P, 1, true),
                (A + 30 * P, 1, false),
            ]],
        },
    ]
}

// ---------------------------------------------------------------------------
// The shared suite.
// ---------------------------------------------------------------------------

fn three_layers_with_zero_runs(make: Make) {
    let store = make();
    let specs = three_layers();
    let h = session_with(store.as_ref(), 1, &specs);
    assert_eq!(h.sealed_layers(), 3);
    let img = assert_flat(h.as_ref(), &specs);
    assert_eq!(img.pages(), model_flat(&specs).len() as u64);
    // Data pages: A, A+P(l1), A+3P, A+5P, A+17P, A+20P, A+30P.
    assert_eq!(img.data_bytes(), 7 * P);
}

fn later_layers_override_earlier_ones(make: Make) {
    let store = make();
    let h = session_with(store.as_ref(), 1, &three_layers());
    let img = h.flatten().unwrap();
    let data = |l, a| Some(Page::Data(Bytes::from(page(l, a))));
    assert_eq!(img.page(A), data(0, A));
    assert_eq!(img.page(A + P), data(1, A + P), "data over data");
    assert_eq!(img.page(A + 16 * P), Some(Page::Zero), "zero over data");
    assert_eq!(img.page(A + 5 * P), data(1, A + 5 * P), "data over zero");
    assert_eq!(
        img.page(A + 6 * P),
        Some(Page::Zero),
        "zero over data over zero"
    );
    assert_eq!(img.page(A + 4 * P), Some(Page::Zero));
    assert_eq!(img.page(A + 12 * P), None, "never sent");
    assert_eq!(img.page(A + 30 * P), data(2, A + 30 * P));
}

fn shuffled_batches_flatten_identically(make: Make) {
    let store = make();
    let spec = Spec {
        vmas: vec![(A, A + 256 * P)],
        batches: (0..12u64)
            .map(|i| {
                let b = A + i * 16 * P;
                vec![
                    (b, 3, false),
                    (b + 3 * P, 2, true),
                    (b + 8 * P, 8, i % 3 == 0),
                ]
            })
            .collect(),
    };
    let specs = [spec.clone()];
    let mut in_order = store.create(meta(1)).unwrap();
    send(in_order.as_mut(), 0, &spec, &(0..12).collect::<Vec<_>>());
    let mut shuffled = store.create(meta(2)).unwrap();
    send(
        shuffled.as_mut(),
        0,
        &spec,
        &[7, 2, 11, 0, 5, 9, 1, 3, 10, 4, 8, 6],
    );
    let a = assert_flat(in_order.as_ref(), &specs);
    let b = assert_flat(shuffled.as_ref(), &specs);
    assert_eq!(expand(&a), expand(&b));
    assert_eq!(in_order.summary().pages, shuffled.summary().pages);
}

fn pages_outside_final_vmas_are_dropped(make: Make) {
    let store = make();
    let b = A + 0x10_0000;
    let c = A + 0x20_0000;
    let specs = vec![
        Spec {
            vmas: vec![(A, A + 8 * P), (b, b + 4 * P), (c, c + 4 * P)],
            batches: vec![vec![
                (A, 8, false),
                (b, 4, false),
                (c, 2, true),
                (c + 2 * P, 2, false),
            ]],
        },
        // The mapping at b is gone and the one at A shrank; c is unmapped.
        Spec {
            vmas: vec![(A, A + 4 * P)],
            batches: vec![],
        },
        // c is mapped again but not resent: a new mapping, so its layer-0
        // pages must not show through (they read as holes).
        Spec {
            vmas: vec![(A, A + 4 * P), (c, c + 4 * P)],
            batches: vec![vec![(A + 3 * P, 1, true)]],
        },
    ];
    let h = session_with(store.as_ref(), 1, &specs);
    let img = assert_flat(h.as_ref(), &specs);
    assert_eq!(img.page(A + 4 * P), None);
    assert_eq!(img.page(b), None);
    assert_eq!(img.page(c), None);
    assert_eq!(img.pages(), 4);
    // Lookup follows the same rule.
    assert_eq!(h.lookup(b).unwrap(), None);
    assert_eq!(h.lookup(c).unwrap(), None);
    assert_eq!(
        h.lookup(A).unwrap(),
        Some(Page::Data(Bytes::from(page(0, A))))
    );
}

fn lookup_newest_wins(make: Make) {
    let store = make();
    let specs = three_layers();
    let h = session_with(store.as_ref(), 1, &specs);
    let want = model_pages(&specs);
    for a in (A - 2 * P..A + 70 * P).step_by(P as usize) {
        assert_eq!(h.lookup(a).unwrap(), want.get(&a).cloned(), "page {a:#x}");
    }
    // Any address inside a page finds that page.
    assert_eq!(h.lookup(A + P + 123).unwrap(), want.get(&(A + P)).cloned());
}

fn layer_order_is_enforced(make: Make) {
    let store = make();
    let mut h = store.create(meta(1)).unwrap();
    let v = vmas(&[(A, A + P)]);
    assert!(matches!(
        err(h.begin_layer(1, v.clone())),
        StoreError::LayerOrder {
            got: 1,
            expected: 0
        }
    ));
    h.begin_layer(0, v.clone()).unwrap();
    assert!(matches!(
        err(h.begin_layer(0, v.clone())),
        StoreError::LayerOrder { got: 0, .. }
    ));
    assert!(matches!(
        err(h.begin_layer(1, v.clone())),
        StoreError::LayerOrder { got: 1, .. }
    ));
    h.seal().unwrap();
    assert!(matches!(
        err(h.begin_layer(0, v.clone())),
        StoreError::LayerOrder {
            got: 0,
            expected: 1
        }
    ));
    h.begin_layer(1, v).unwrap();
}

fn put_and_seal_need_an_open_layer(make: Make) {
    let store = make();
    let mut h = store.create(meta(1)).unwrap();
    let b = batch(0, 0, &[(A, 1, false)]);
    assert!(matches!(err(h.put(&b)), StoreError::NoOpenLayer));
    assert!(matches!(err(h.seal()), StoreError::NoOpenLayer));
    h.begin_layer(0, vmas(&[(A, A + P)])).unwrap();
    assert!(matches!(
        err(h.put(&batch(1, 0, &[(A, 1, false)]))),
        StoreError::WrongLayer { got: 1, open: 0 }
    ));
    h.put(&b).unwrap();
    h.seal().unwrap();
    assert!(matches!(err(h.put(&b)), StoreError::NoOpenLayer));
}

fn bad_input_is_refused_not_stored(make: Make) {
    let store = make();
    let mut h = store.create(meta(1)).unwrap();
    assert!(matches!(
        err(h.begin_layer(0, vmas(&[(A, A + P), (A, A + 2 * P)]))),
        StoreError::Corrupt(_)
    ));
    h.begin_layer(0, vmas(&[(A, A + 8 * P)])).unwrap();
    let mut short = batch(0, 0, &[(A, 2, false)]);
    short.data.truncate(P as usize);
    assert!(matches!(err(h.put(&short)), StoreError::Corrupt(_)));
    let mut unaligned = batch(0, 0, &[(A, 1, true)]);
    unaligned.runs[0].addr += 1;
    assert!(matches!(err(h.put(&unaligned)), StoreError::Corrupt(_)));
    // Batches that overlap each other make "the" copy ambiguous: the seal
    // fails and the layer stays open for the caller to discard.
    h.put(&batch(0, 0, &[(A, 2, false)])).unwrap();
    h.put(&batch(0, 1, &[(A + P, 2, true)])).unwrap();
    assert!(matches!(err(h.seal()), StoreError::Corrupt(_)));
    h.discard_open().unwrap();
    assert_eq!(h.sealed_layers(), 0);
    let mut bad_meta = meta(2);
    bad_meta.page_size = 1000;
    assert!(store.create(bad_meta).is_err());
    let mut bad_meta = meta(2);
    bad_meta.session = Bytes::from_static(&[2; 3]);
    assert!(store.create(bad_meta).is_err());
}

fn discard_open_drops_the_layer(make: Make) {
    let store = make();
    let specs = three_layers();
    let mut h = session_with(store.as_ref(), 1, &specs[..1]);
    h.begin_layer(1, vmas(&specs[1].vmas)).unwrap();
    h.put(&batch(1, 0, &specs[1].batches[0])).unwrap();
    h.discard_open().unwrap();
    h.discard_open().unwrap();
    assert_eq!(h.sealed_layers(), 1);
    assert_flat(h.as_ref(), &specs[..1]);
    // The same layer can be sent again, and only the resent copy counts.
    send(h.as_mut(), 1, &specs[1], &[1]);
    let resent = [
        specs[0].clone(),
        Spec {
            vmas: specs[1].vmas.clone(),
            batches: vec![specs[1].batches[1].clone()],
        },
    ];
    assert_flat(h.as_ref(), &resent);
}

fn dropped_handle_discards_open_layer(make: Make) {
    let store = make();
    let specs = three_layers();
    let mut h = session_with(store.as_ref(), 1, &specs[..1]);
    h.begin_layer(1, vmas(&specs[1].vmas)).unwrap();
    h.put(&batch(1, 0, &specs[1].batches[0])).unwrap();
    drop(h);
    let mut h = store.open(id(1)).unwrap();
    assert_eq!(h.sealed_layers(), 1);
    assert_flat(h.as_ref(), &specs[..1]);
    send(h.as_mut(), 1, &specs[1], &[0, 1]);
    assert_flat(h.as_ref(), &specs[..2]);
}

fn open_layer_is_invisible(make: Make) {
    let store = make();
    let specs = three_layers();
    let mut h = session_with(store.as_ref(), 1, &specs[..1]);
    let before = h.flatten().unwrap();
    let summary = h.summary();
    h.begin_layer(1, vmas(&[(A, A + 2 * P)])).unwrap();
    h.put(&batch(1, 0, &[(A, 2, true)])).unwrap();
    assert_eq!(h.flatten().unwrap(), before);
    assert_eq!(h.summary(), summary);
    assert_eq!(h.sealed_layers(), 1);
    assert_eq!(
        h.lookup(A).unwrap(),
        Some(Page::Data(Bytes::from(page(0, A))))
    );
}

fn handles_are_exclusive(make: Make) {
    let store = make();
    let h = store.create(meta(1)).unwrap();
    assert!(matches!(err(store.open(id(1))), StoreError::Busy(_)));
    assert!(matches!(err(store.create(meta(1))), StoreError::Busy(_)));
    assert!(matches!(err(store.remove(id(1))), StoreError::Busy(_)));
    drop(h);
    assert!(matches!(
        err(store.create(meta(1))),
        StoreError::SessionExists(_)
    ));
    let h = store.open(id(1)).unwrap();
    assert_eq!(h.meta(), &meta(1));
    assert!(matches!(err(store.open(id(1))), StoreError::Busy(_)));
    drop(h);
    store.open(id(1)).unwrap();
    assert!(matches!(
        err(store.open(id(9))),
        StoreError::UnknownSession(_)
    ));
    assert!(matches!(
        err(store.remove(id(9))),
        StoreError::UnknownSession(_)
    ));
    // Other sessions are not affected by one being busy.
    let _a = store.open(id(1)).unwrap();
    let _b = store.create(meta(2)).unwrap();
}

fn sessions_outlive_handles(make: Make) {
    let store = make();
    let specs = three_layers();
    let h = session_with(store.as_ref(), 1, &specs);
    let before = h.flatten().unwrap();
    drop(h);
    let h = store.open(id(1)).unwrap();
    assert_eq!(h.sealed_layers(), 3);
    assert_eq!(expand(&h.flatten().unwrap()), expand(&before));
}

fn list_and_summary_numbers(make: Make) {
    let store = make();
    assert!(store.list().unwrap().is_empty());
    let mut h = store.create(meta(1)).unwrap();
    h.begin_layer(0, vmas(&[(A, A + 16 * P)])).unwrap();
    h.put(&batch(0, 0, &[(A, 3, false), (A + 3 * P, 5, true)]))
        .unwrap();
    let l0 = h.seal().unwrap();
    assert_eq!((l0.layer, l0.pages, l0.bytes), (0, 8, 3 * P));
    h.begin_layer(1, vmas(&[(A, A + 16 * P)])).unwrap();
    h.put(&batch(1, 0, &[(A, 2, false)])).unwrap();
    let l1 = h.seal().unwrap();
    assert_eq!((l1.layer, l1.pages, l1.bytes), (1, 2, 2 * P));
    h.put_state(&pb::ProcessTree::default()).unwrap();
    // An open layer is not counted.
    h.begin_layer(2, vmas(&[(A, A + 16 * P)])).unwrap();
    h.put(&batch(2, 0, &[(A, 4, false)])).unwrap();
    let s = h.summary();
    assert_eq!(s.id, id(1));
    assert_eq!(s.label, meta(1).label);
    assert_eq!(
        (s.layers, s.pages, s.bytes, s.has_state),
        (2, 10, 5 * P, true)
    );
    let _other = store.create(meta(2)).unwrap();
    let list = store.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0], s);
    assert_eq!(
        (list[1].id, list[1].layers, list[1].pages, list[1].has_state),
        (id(2), 0, 0, false)
    );
}

fn state_round_trip(make: Make) {
    let store = make();
    let mut h = store.create(meta(1)).unwrap();
    assert_eq!(h.state().unwrap(), None);
    let mut tree = pb::ProcessTree {
        processes: vec![pb::Process {
            pid: 4242,
            comm: "python3".into(),
            vmas: vmas(&[(A, A + P)]),
            threads: vec![pb::Thread {
                tid: 4242,
                gpregs: Bytes::from(vec![7; 216]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    h.put_state(&tree).unwrap();
    assert_eq!(h.state().unwrap().as_ref(), Some(&tree));
    tree.processes[0].pid = 4343;
    h.put_state(&tree).unwrap();
    drop(h);
    let h = store.open(id(1)).unwrap();
    assert_eq!(h.state().unwrap(), Some(tree));
    assert!(h.summary().has_state);
}

fn remove_forgets_the_session(make: Make) {
    let store = make();
    let h = session_with(store.as_ref(), 1, &three_layers());
    let _keep = session_with(store.as_ref(), 2, &three_layers()[..1]);
    drop(h);
    store.remove(id(1)).unwrap();
    assert!(matches!(
        err(store.open(id(1))),
        StoreError::UnknownSession(_)
    ));
    assert!(matches!(
        err(store.remove(id(1))),
        StoreError::UnknownSession(_)
    ));
    assert_eq!(store.list().unwrap().len(), 1);
    let h = store.create(meta(1)).unwrap();
    assert_eq!(h.sealed_layers(), 0);
    assert_eq!(h.flatten().unwrap().runs, vec![]);
}

fn adjacent_runs_coalesce(make: Make) {
    let store = make();
    let specs = vec![
        Spec {
            vmas: vec![(A, A + 16 * P)],
            batches: vec![
                vec![(A, 2, true)],
                vec![(A + 2 * P, 2, true)],
                // Separate runs, contiguous in one batch's data.
                vec![(A + 4 * P, 1, false), (A + 5 * P, 1, false)],
            ],
        },
        Spec {
            vmas: vec![(A, A + 16 * P)],
            batches: vec![vec![(A + 6 * P, 2, true)]],
        },
    ];
    let h = session_with(store.as_ref(), 1, &specs);
    let img = assert_flat(h.as_ref(), &specs);
    let shape: Vec<_> = img
        .runs
        .iter()
        .map(|r| (r.addr, r.pages, r.data.is_some()))
        .collect();
    assert_eq!(
        shape,
        vec![(A, 4, false), (A + 4 * P, 2, true), (A + 6 * P, 2, false)]
    );
}

fn huge_zero_runs_stay_ranges(make: Make) {
    let store = make();
    let gib16 = 4u32 << 20; // pages
    let end = A + gib16 as u64 * P;
    let specs = vec![
        Spec {
            vmas: vec![(A, end)],
            batches: vec![vec![(A, gib16, true)]],
        },
        Spec {
            vmas: vec![(A, end)],
            batches: vec![vec![(A + (1 << 30), 1, false)]],
        },
    ];
    let h = session_with(store.as_ref(), 1, &specs);
    let t = Instant::now();
    let img = h.flatten().unwrap();
    assert!(t.elapsed().as_secs() < 5, "flatten took {:?}", t.elapsed());
    let shape: Vec<_> = img
        .runs
        .iter()
        .map(|r| (r.addr, r.pages, r.data.is_some()))
        .collect();
    let split = (1u64 << 30) / P;
    assert_eq!(
        shape,
        vec![
            (A, split, false),
            (A + (1 << 30), 1, true),
            (A + (1 << 30) + P, gib16 as u64 - split - 1, false)
        ]
    );
    assert_eq!(h.summary().pages, gib16 as u64 + 1);
}

fn encoded_batches_round_trip(make: Make) {
    let store = make();
    let mut mem = Vec::new();
    for i in 0..8u64 {
        if i % 3 == 1 {
            mem.extend(vec![0u8; PS as usize]);
        } else {
            mem.extend(page(0, A + i * P));
        }
    }
    let mut enc = batch::Encoder::new(PS, batch::Compress::default());
    let e = enc
        .encode(0, 0, [(A, Bytes::from(mem.clone()))])
        .unwrap()
        .to_wire();
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&frame::encode_batch_prefix(&e.header, e.payload.len()));
    buf.extend_from_slice(&e.payload);
    let wire = frame::decode_batch(&mut buf).unwrap().unwrap();
    let decoded = batch::decode(wire, PS).unwrap();
    let mut h = store.create(meta(1)).unwrap();
    h.begin_layer(0, vmas(&[(A, A + 8 * P)])).unwrap();
    h.put(&decoded).unwrap();
    assert_eq!(h.seal().unwrap().pages, 8);
    let img = h.flatten().unwrap();
    for (i, chunk) in mem.chunks(PS as usize).enumerate() {
        let a = A + i as u64 * P;
        let want = if i % 3 == 1 {
            Page::Zero
        } else {
            Page::Data(Bytes::copy_from_slice(chunk))
        };
        assert_eq!(img.page(a), Some(want.clone()));
        assert_eq!(h.lookup(a).unwrap(), Some(want));
    }
}

/// xorshift64: deterministic, dependency-free randomness for the model test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_specs(rng: &mut Rng) -> Vec<Spec> {
    const REGIONS: u64 = 8;
    const REGION: u64 = 64;
    let layers = 1 + rng.below(5);
    (0..layers)
        .map(|_| {
            let mut spec = Spec::default();
            let mut runs = Vec::new();
            for r in 0..REGIONS {
                if rng.below(4) == 0 {
                    continue;
                }
                let (start, end) = (A + r * REGION * P, A + (r + 1) * REGION * P);
                spec.vmas.push((start, end));
                let mut a = start + rng.below(4) * P;
                while a < end {
                    let pages = (1 + rng.below(8)).min((end - a) / P);
                    runs.push((a, pages as u32, rng.below(3) == 0));
                    a += (pages + rng.below(6)) * P;
                }
            }
            let mut rest = &runs[..];
            while !rest.is_empty() {
                let n = (1 + rng.below(5) as usize).min(rest.len());
                spec.batches.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            spec
        })
        .collect()
}

fn random_layers_match_a_page_model(make: Make) {
    let store = make();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for n in 0..12u8 {
        let specs = random_specs(&mut rng);
        let mut h = store.create(meta(n)).unwrap();
        for (l, spec) in specs.iter().enumerate() {
            let mut order: Vec<usize> = (0..spec.batches.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            send(h.as_mut(), l as u32, spec, &order);
        }
        assert_flat(h.as_ref(), &specs);
        let want = model_pages(&specs);
        for a in (A - P..A + 8 * 64 * P + P).step_by(P as usize) {
            assert_eq!(
                h.lookup(a).unwrap(),
                want.get(&a).cloned(),
                "session {n} page {a:#x}"
            );
        }
        let s = h.summary();
        let sent: u64 = specs
            .iter()
            .flat_map(|s| s.batches.iter().flatten())
            .map(|r| r.1 as u64)
            .sum();
        assert_eq!((s.layers, s.pages), (specs.len() as u32, sent));
    }
}

/// Each layer read alone right after its seal is what was sent, and laying
/// the layers over each other the way a warm restore does (drop what a
/// round no longer maps, then write the round's pages) gives the flat image.
fn newest_layer_alone_is_what_was_sent(make: Make) {
    let store = make();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for n in 0..8u8 {
        let specs = random_specs(&mut rng);
        let mut h = store.create(meta(n)).unwrap();
        let mut warm: BTreeMap<u64, Page> = BTreeMap::new();
        for (l, spec) in specs.iter().enumerate() {
            let order: Vec<usize> = (0..spec.batches.len()).collect();
            send(h.as_mut(), l as u32, spec, &order);
            let img = h.layer(l as u32).unwrap();
            assert_eq!(img.vmas, vmas(&spec.vmas));
            let alone = expand(&img);
            let upto = model_pages(&specs[..=l]);
            let sent: Vec<u64> = spec
                .batches
                .iter()
                .flatten()
                .flat_map(|&(a, n, _)| (0..n as u64).map(move |i| a + i * P))
                .collect();
            assert_eq!(alone.len(), sent.len(), "session {n} layer {l}: page count");
            for a in sent {
                assert!(
                    alone.get(&a) == upto.get(&a),
                    "session {n} layer {l} page {a:#x}"
                );
            }
            warm.retain(|a, _| img.vmas.iter().any(|v| v.start <= *a && *a < v.end));
            warm.extend(alone);
        }
        assert!(warm == expand(&h.flatten().unwrap()), "session {n}");
        let sealed = h.sealed_layers();
        assert!(matches!(
            err(h.layer(sealed)),
            StoreError::NoLayer(l) if l == sealed
        ));
    }
}

/// Instantiates every shared test for both stores, and for the mem store
/// behind quotas.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod mem {
            $(
                #[test]
                fn $name() {
                    super::$name(&|| Box::new(super::MemStore::new()));
                }
            )*
        }
        mod disk {
            $(
                #[test]
                fn $name() {
                    super::on_disk(super::$name);
                }
            )*
        }
        // Quotas too large to hit: the wrapper must change nothing else.
        mod quota {
            $(
                #[test]
                fn $name() {
                    super::$name(&|| Box::new(super::QuotaStore::new(
                        std::sync::Arc::new(super::MemStore::new()),
                        super::Quota { session: 1 << 40, total: 1 << 41 },
                    )));
                }
            )*
        }
    };
}

/// Runs a shared test with each store it makes in a fresh directory.
fn on_disk(test: fn(Make)) {
    let tmp = tempfile::TempDir::new().unwrap();
    let n = Cell::new(0);
    test(&|| {
        n.set(n.get() + 1);
        Box::new(DiskStore::open(tmp.path().join(n.get().to_string())).unwrap())
    });
}

suite!(
    three_layers_with_zero_runs,
    later_layers_override_earlier_ones,
    shuffled_batches_flatten_identically,
    pages_outside_final_vmas_are_dropped,
    lookup_newest_wins,
    layer_order_is_enforced,
    put_and_seal_need_an_open_layer,
    bad_input_is_refused_not_stored,
    discard_open_drops_the_layer,
    dropped_handle_discards_open_layer,
    open_layer_is_invisible,
    handles_are_exclusive,
    sessions_outlive_handles,
    list_and_summary_numbers,
    state_round_trip,
    remove_forgets_the_session,
    adjacent_runs_coalesce,
    huge_zero_runs_stay_ranges,
    encoded_batches_round_trip,
    random_layers_match_a_page_model,
    newest_layer_alone_is_what_was_sent,
);

/// Quotas: refused by name when hit, bytes given back when a layer is
/// discarded or superseded and when a session goes.
mod quotas {
    use super::*;
    use std::sync::Arc;

    /// A layer of `pages` data pages from 0x100000, in one batch.
    fn spec(pages: u32) -> Spec {
        Spec {
            vmas: vec![(0x100000, 0x100000 + 256 * P)],
            batches: vec![vec![(0x100000, pages, false)]],
        }
    }

    fn quota(session: u64, total: u64) -> QuotaStore {
        QuotaStore::new(Arc::new(MemStore::new()), Quota { session, total })
    }

    fn over(e: StoreError, flag: &str) {
        let msg = e.to_string();
        assert!(matches!(e, StoreError::OverQuota { .. }), "{msg}");
        assert!(
            msg.starts_with("over quota: ") && msg.contains(flag),
            "{msg}"
        );
    }

    #[test]
    fn a_session_over_its_quota_is_refused_and_others_go_on() {
        let q = quota(10 * P, 100 * P);
        let mut a = session_with(&q, 1, &[spec(8)]);
        assert_eq!(q.used(), 8 * P);
        a.begin_layer(1, vmas(&spec(8).vmas)).unwrap();
        // 8 sealed + 4 would pass 10; the same pages again (superseding
        // the old ones) still count until the layer is sealed.
        over(
            a.put(&batch(1, 0, &[(0x100000, 4, false)])).unwrap_err(),
            "--session-quota",
        );
        assert_eq!(q.used(), 8 * P, "a refused batch reserves nothing");
        // Zero pages hold no memory and always fit.
        a.put(&batch(1, 0, &[(0x100000 + 8 * P, 192, true)]))
            .unwrap();
        a.put(&batch(1, 1, &[(0x100000 + 200 * P, 2, false)]))
            .unwrap();
        a.seal().unwrap();
        assert_eq!(q.used(), 10 * P);
        // Another session has its own quota.
        let b = session_with(&q, 2, &[spec(10)]);
        assert_eq!(q.used(), 20 * P);
        drop((a, b));
        assert_eq!(q.used(), 20 * P, "sealed layers stay counted");
    }

    #[test]
    fn the_total_quota_bounds_all_sessions_and_refuses_new_ones_when_full() {
        let q = quota(u64::MAX, 12 * P);
        let _a = session_with(&q, 1, &[spec(8)]);
        let mut b = q.create(meta(2)).unwrap();
        b.begin_layer(0, vmas(&spec(1).vmas)).unwrap();
        over(
            b.put(&batch(0, 0, &[(0x100000, 5, false)])).unwrap_err(),
            "--mem-quota",
        );
        b.put(&batch(0, 0, &[(0x100000, 4, false)])).unwrap();
        b.seal().unwrap();
        assert_eq!(q.used(), 12 * P);
        over(q.create(meta(3)).err().unwrap(), "--mem-quota");
        // Removing a session gives its bytes back.
        drop(b);
        q.remove(id(2)).unwrap();
        assert_eq!(q.used(), 8 * P);
        q.create(meta(3)).unwrap();
    }

    #[test]
    fn discarded_and_superseded_bytes_are_given_back() {
        let q = quota(u64::MAX, u64::MAX);
        let mut h = session_with(&q, 1, &[spec(16)]);
        h.begin_layer(1, vmas(&spec(16).vmas)).unwrap();
        h.put(&batch(1, 0, &[(0x100000, 4, false)])).unwrap();
        assert_eq!(q.used(), 20 * P);
        h.discard_open().unwrap();
        assert_eq!(q.used(), 16 * P);
        // A dropped handle discards its open layer, and its reservation.
        h.begin_layer(1, vmas(&spec(16).vmas)).unwrap();
        h.put(&batch(1, 0, &[(0x100000, 4, false)])).unwrap();
        drop(h);
        assert_eq!(q.used(), 16 * P);
        // A layer resending every page of the last one frees it: the
        // session then holds one copy, not two.
        let mut h = q.open(id(1)).unwrap();
        send(h.as_mut(), 1, &spec(16), &[0]);
        assert_eq!(h.held_bytes(), 16 * P);
        assert_eq!(q.used(), 16 * P);
        drop(h);
        q.remove(id(1)).unwrap();
        assert_eq!(q.used(), 0);
    }

    #[test]
    fn a_wrapped_store_counts_sessions_it_did_not_see_made() {
        let mem = Arc::new(MemStore::new());
        drop(session_with(mem.as_ref(), 1, &[spec(6)]));
        let q = QuotaStore::new(
            mem,
            Quota {
                session: 8 * P,
                total: u64::MAX,
            },
        );
        let mut h = q.open(id(1)).unwrap();
        assert_eq!(q.used(), 6 * P);
        h.begin_layer(1, vmas(&spec(6).vmas)).unwrap();
        over(
            h.put(&batch(1, 0, &[(0x100000 + 100 * P, 3, false)]))
                .unwrap_err(),
            "--session-quota",
        );
    }
}

/// What only the mem store promises: no copies, and memory given back.
mod mem_only {
    use super::*;

    #[test]
    fn flatten_copies_nothing_and_superseded_batches_are_freed() {
        let store = MemStore::new();
        let mut h = store.create(meta(1)).unwrap();
        h.begin_layer(0, vmas(&[(A, A + 8 * P)])).unwrap();
        let (b0, b1) = (
            batch(0, 0, &[(A, 4, false)]),
            batch(0, 1, &[(A + 4 * P, 4, false)]),
        );
        let (d0, d1) = (b0.data.clone(), b1.data.clone());
        h.put(&b0).unwrap();
        h.put(&b1).unwrap();
        drop((b0, b1));
        h.seal().unwrap();
        let img = h.flatten().unwrap();
        assert_eq!(img.runs[0].data.as_ref().unwrap().as_ptr(), d0.as_ptr());
        drop(img);
        // Layer 1 covers all of batch 0 and half of batch 1.
        h.begin_layer(1, vmas(&[(A, A + 8 * P)])).unwrap();
        h.put(&batch(1, 0, &[(A, 4, true), (A + 4 * P, 2, false)]))
            .unwrap();
        h.seal().unwrap();
        assert!(d0.is_unique(), "batch 0 is superseded but still held");
        assert!(!d1.is_unique(), "batch 1 still has live pages");
        assert_eq!(h.summary().pages, 14, "the summary counts what was sent");
        assert_eq!(
            h.lookup(A + 6 * P).unwrap(),
            Some(Page::Data(Bytes::from(page(0, A + 6 * P))))
        );
    }
}

// ---------------------------------------------------------------------------
// Disk store only: restart, crash leftovers, damage.
// ---------------------------------------------------------------------------

mod disk_only {
    use super::*;

    fn session_dir(root: &Path, n: u8) -> PathBuf {
        root.join(id(n).to_hex())
    }

    fn layer_dir(root: &Path, n: u8, layer: u32) -> PathBuf {
        session_dir(root, n).join(format!("layer-{layer:06}"))
    }

    fn corrupt_msg(e: StoreError) -> String {
        match e {
            StoreError::Corrupt(m) => m,
            e => panic!("expected Corrupt, got {e:?}"),
        }
    }

    /// A root holding session 1 with three sealed layers and a state.
    fn populated() -> (tempfile::TempDir, FlatImage) {
        let tmp = tempfile::TempDir::new().unwrap();
        let store = DiskStore::open(tmp.path()).unwrap();
        let mut h = session_with(&store, 1, &three_layers());
        h.put_state(&pb::ProcessTree::default()).unwrap();
        let img = h.flatten().unwrap();
        (tmp, img)
    }

    #[test]
    fn restart_finds_sealed_layers() {
        let (tmp, img) = populated();
        let store = DiskStore::open(tmp.path()).unwrap();
        let list = store.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].layers, list[0].has_state), (3, true));
        assert_eq!(list[0].label, meta(1).label);
        let mut h = store.open(id(1)).unwrap();
        assert_eq!(h.meta(), &meta(1));
        assert_eq!(h.flatten().unwrap(), img);
        assert_eq!(h.state().unwrap(), Some(pb::ProcessTree::default()));
        // The session carries on where it stopped.
        let next = Spec {
            vmas: vec![(A, A + 64 * P)],
            batches: vec![vec![(A, 1, true)]],
        };
        send(h.as_mut(), 3, &next, &[0]);
        let mut specs = three_layers();
        specs.push(next);
        assert_flat(h.as_ref(), &specs);
    }

    #[test]
    fn dropped_handle_deletes_its_unsealed_layer() {
        let (tmp, _) = populated();
        let store = DiskStore::open(tmp.path()).unwrap();
        let mut h = store.open(id(1)).unwrap();
        h.begin_layer(3, vmas(&[(A, A + P)])).unwrap();
        h.put(&batch(3, 0, &[(A, 1, false)])).unwrap();
        assert!(layer_dir(tmp.path(), 1, 3).join("pages").exists());
        drop(h);
        assert!(!layer_dir(tmp.path(), 1, 3).exists());
        let store = DiskStore::open(tmp.path()).unwrap();
        assert_eq!(store.open(id(1)).unwrap().sealed_layers(), 3);
    }

    #[test]
    fn crash_before_seal_loses_only_the_open_layer() {
        let (tmp, img) = populated();
        let store = DiskStore::open(tmp.path()).unwrap();
        let mut h = store.open(id(1)).unwrap();
        h.begin_layer(3, vmas(&[(A, A + P)])).unwrap();
        h.put(&batch(3, 0, &[(A, 1, false)])).unwrap();
        // A second server on the same root stands for the restarted process:
        // the first one's open layer is exactly what a crash leaves behind.
        let restarted = DiskStore::open(tmp.path()).unwrap();
        assert!(!layer_dir(tmp.path(), 1, 3).exists());
        let h2 = restarted.open(id(1)).unwrap();
        assert_eq!(h2.sealed_layers(), 3);
        assert_eq!(h2.flatten().unwrap(), img);
        drop(h); // its directory is already gone; that is only logged
    }

    #[test]
    fn leftover_layer_directories_are_deleted_at_restart() {
        let (tmp, img) = populated();
        let l2 = layer_dir(tmp.path(), 1, 2);
        // Crashed mid-seal: pages and index.tmp, no index.
        let l3 = layer_dir(tmp.path(), 1, 3);
        std::fs::create_dir(&l3).unwrap();
        std::fs::copy(l2.join("pages"), l3.join("pages")).unwrap();
        std::fs::copy(l2.join("index"), l3.join("index.tmp")).unwrap();
        // After the gap, even a complete-looking layer is not used.
        let l5 = layer_dir(tmp.path(), 1, 5);
        std::fs::create_dir(&l5).unwrap();
        std::fs::copy(l2.join("pages"), l5.join("pages")).unwrap();
        std::fs::copy(l2.join("index"), l5.join("index")).unwrap();
        // A metadata write that never got renamed.
        std::fs::write(session_dir(tmp.path(), 1).join("state.tmp"), b"partial").unwrap();
        let store = DiskStore::open(tmp.path()).unwrap();
        assert!(!l3.exists());
        assert!(!l5.exists());
        assert!(!session_dir(tmp.path(), 1).join("state.tmp").exists());
        let h = store.open(id(1)).unwrap();
        assert_eq!(h.sealed_layers(), 3);
        assert_eq!(h.flatten().unwrap(), img);
    }

    /// Rewrites `path` with `f` applied, then restarts and opens session 1.
    fn damaged(tmp: &Path, path: &Path, f: impl FnOnce(&mut Vec<u8>)) -> Result<(), StoreError> {
        let mut bytes = std::fs::read(path).unwrap();
        f(&mut bytes);
        std::fs::write(path, &bytes).unwrap();
        let store = DiskStore::open(tmp).unwrap();
        store.open(id(1)).map(drop)
    }

    /// Damage done to a file's bytes.
    type Damage = fn(&mut Vec<u8>);

    #[test]
    fn damaged_index_is_refused_by_name_and_kept() {
        let cases: [(&str, Damage); 5] = [
            ("checksum mismatch", |b| *b.last_mut().unwrap() ^= 0x40),
            ("bad magic", |b| b[0] = b'X'),
            ("format version 2 is newer than this build's 1", |b| {
                b[8] = 2
            }),
            ("truncated header", |b| b.truncate(10)),
            ("exceeds", |b| {
                b[16..24].copy_from_slice(&u64::MAX.to_le_bytes())
            }),
        ];
        for (want, f) in cases {
            let (tmp, _) = populated();
            let index = layer_dir(tmp.path(), 1, 1).join("index");
            let msg = corrupt_msg(damaged(tmp.path(), &index, f).unwrap_err());
            assert!(msg.contains(want), "{msg:?} does not say {want:?}");
            assert!(msg.contains("index"), "{msg:?} does not name the file");
            // Nothing is "repaired" away: the layers are all still there.
            for l in 0..3 {
                assert!(layer_dir(tmp.path(), 1, l).join("index").exists());
            }
            let store = DiskStore::open(tmp.path()).unwrap();
            assert!(store.list().unwrap().is_empty());
            assert!(matches!(
                err(store.create(meta(1))),
                StoreError::SessionExists(_)
            ));
            store.remove(id(1)).unwrap();
            assert!(!session_dir(tmp.path(), 1).exists());
        }
    }

    #[test]
    fn damaged_meta_skips_the_session_without_deleting_it() {
        let (tmp, _) = populated();
        let store = DiskStore::open(tmp.path()).unwrap();
        drop(session_with(&store, 2, &three_layers()[..1]));
        let m = session_dir(tmp.path(), 1).join("meta");
        let msg = corrupt_msg(damaged(tmp.path(), &m, |b| b[40] ^= 1).unwrap_err());
        assert!(msg.contains("meta") && msg.contains("checksum"), "{msg}");
        let store = DiskStore::open(tmp.path()).unwrap();
        let list = store.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, id(2));
        assert!(m.exists());
        // A record of another kind is refused even with a valid checksum.
        let state = session_dir(tmp.path(), 1).join("state");
        std::fs::copy(&state, &m).unwrap();
        let store = DiskStore::open(tmp.path()).unwrap();
        let msg = corrupt_msg(err(store.open(id(1))));
        assert!(msg.contains("holds a state record"), "{msg}");
        std::fs::remove_file(&m).unwrap();
        let store = DiskStore::open(tmp.path()).unwrap();
        assert!(corrupt_msg(err(store.open(id(1)))).contains("no meta"));
    }

    #[test]
    fn damaged_state_is_an_error_not_a_panic() {
        let (tmp, _) = populated();
        let state = session_dir(tmp.path(), 1).join("state");
        let mut b = std::fs::read(&state).unwrap();
        b[8] = 9;
        std::fs::write(&state, b).unwrap();
        let store = DiskStore::open(tmp.path()).unwrap();
        let h = store.open(id(1)).unwrap();
        assert!(corrupt_msg(err(h.state())).contains("format version 9"));
    }

    #[test]
    fn every_truncation_and_bit_flip_of_an_index_is_caught() {
        let (tmp, img) = populated();
        let index = layer_dir(tmp.path(), 1, 1).join("index");
        let good = std::fs::read(&index).unwrap();
        let try_with = |bytes: &[u8]| {
            std::fs::write(&index, bytes).unwrap();
            let store = DiskStore::open(tmp.path()).unwrap();
            store.open(id(1)).map(drop)
        };
        for len in 0..good.len() {
            assert!(try_with(&good[..len]).is_err(), "truncated to {len}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(try_with(&long).is_err(), "trailing byte");
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert!(try_with(&b).is_err(), "flip in byte {i}");
        }
        try_with(&good).unwrap();
        let store = DiskStore::open(tmp.path()).unwrap();
        assert_eq!(store.open(id(1)).unwrap().flatten().unwrap(), img);
    }

    #[test]
    fn damaged_pages_are_caught() {
        let (tmp, _) = populated();
        let pages = layer_dir(tmp.path(), 1, 0).join("pages");
        // A flipped bit passes the cheap checks at startup; flatten reads the
        // whole file and refuses it.
        damaged(tmp.path(), &pages, |b| b[100] ^= 1).unwrap();
        let store = DiskStore::open(tmp.path()).unwrap();
        let h = store.open(id(1)).unwrap();
        let msg = corrupt_msg(err(h.flatten()));
        assert!(msg.contains("checksum") && msg.contains("pages"), "{msg}");
        drop(h);
        // A short file is caught at startup.
        let msg = corrupt_msg(damaged(tmp.path(), &pages, |b| b.truncate(P as usize)).unwrap_err());
        assert!(msg.contains("pages"), "{msg}");
    }

    #[test]
    fn files_carry_the_header() {
        let (tmp, _) = populated();
        for f in [
            session_dir(tmp.path(), 1).join("meta"),
            session_dir(tmp.path(), 1).join("state"),
            layer_dir(tmp.path(), 1, 0).join("index"),
        ] {
            let b = std::fs::read(&f).unwrap();
            assert_eq!(&b[..8], b"FERRYIMG", "{}", f.display());
            assert_eq!(b[8..12], 1u32.to_le_bytes());
        }
        assert!(!layer_dir(tmp.path(), 1, 0).join("index.tmp").exists());
    }

    #[test]
    fn remove_deletes_the_directory_and_finishes_after_a_crash() {
        let (tmp, _) = populated();
        let store = DiskStore::open(tmp.path()).unwrap();
        store.remove(id(1)).unwrap();
        assert!(!session_dir(tmp.path(), 1).exists());
        // A remove that crashed after its rename is finished at startup.
        let half = tmp.path().join(format!("{}.removed", id(7).to_hex()));
        std::fs::create_dir_all(half.join("layer-000000")).unwrap();
        let store = DiskStore::open(tmp.path()).unwrap();
        assert!(!half.exists());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn strangers_in_the_root_are_left_alone() {
        let (tmp, _) = populated();
        std::fs::write(tmp.path().join("README"), b"hello").unwrap();
        std::fs::create_dir(tmp.path().join("lost+found")).unwrap();
        let store = DiskStore::open(tmp.path()).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(tmp.path().join("README").exists());
        assert!(tmp.path().join("lost+found").exists());
    }
}

// ---------------------------------------------------------------------------
// Timing, by hand: cargo test --release -p ferry-page-server flatten_1gib -- --ignored --nocapture
// ---------------------------------------------------------------------------

/// 1 GiB in layer 0, every fourth page rewritten and every eighth zeroed in
/// layer 1, in 2 MiB batches: the shape of a real pre-copy round.
fn flatten_1gib(store: &dyn Store) {
    const PAGES: u64 = (1 << 30) / P;
    const BATCH: u64 = 512;
    let end = A + PAGES * P;
    let mut h = store.create(meta(1)).unwrap();
    h.begin_layer(0, vmas(&[(A, end)])).unwrap();
    for (seq, b) in (0..PAGES / BATCH).enumerate() {
        h.put(&DecodedBatch {
            layer: 0,
            seq: seq as u32,
            runs: vec![PageRun {
                addr: A + b * BATCH * P,
                pages: BATCH as u32,
                zero: false,
            }],
            data: Bytes::from(vec![seq as u8 | 1; (BATCH * P) as usize]),
            digest: 0,
        })
        .unwrap();
    }
    h.seal().unwrap();
    h.begin_layer(1, vmas(&[(A, end)])).unwrap();
    for (seq, b) in (0..PAGES / BATCH).enumerate() {
        let base = A + b * BATCH * P;
        let runs: Vec<PageRun> = (0..BATCH / 4)
            .map(|i| PageRun {
                addr: base + i * 4 * P,
                pages: 1,
                zero: i % 2 == 1,
            })
            .collect();
        let data = vec![7u8; (BATCH / 8 * P) as usize];
        h.put(&DecodedBatch {
            layer: 1,
            seq: seq as u32,
            runs,
            data: Bytes::from(data),
            digest: 0,
        })
        .unwrap();
    }
    h.seal().unwrap();
    let t = Instant::now();
    let img = h.flatten().unwrap();
    let took = t.elapsed();
    assert_eq!(img.pages(), PAGES);
    eprintln!("flatten of 1 GiB: {took:?}, {} runs", img.runs.len());
}

#[test]
#[ignore = "timing; run by hand in release"]
fn flatten_1gib_mem() {
    flatten_1gib(&MemStore::new());
}

#[test]
#[ignore = "timing; run by hand in release"]
fn flatten_1gib_disk() {
    let tmp = tempfile::TempDir::new().unwrap();
    flatten_1gib(&DiskStore::open(tmp.path()).unwrap());
}

/// A mem store behind a quota of `session_pages` data pages a session,
/// spilling into a disk store in `dir`; also the quota store, to read
/// what memory is still held.
fn spilling(
    dir: &Path,
    session_pages: u64,
    total_pages: u64,
) -> (
    super::spill::SpillStore,
    QuotaStore,
    std::sync::Arc<DiskStore>,
) {
    let mem = QuotaStore::new(
        std::sync::Arc::new(MemStore::new()),
        Quota {
            session: session_pages * P,
            total: total_pages * P,
        },
    );
    let disk = std::sync::Arc::new(DiskStore::open(dir).unwrap());
    (
        super::spill::SpillStore::new(std::sync::Arc::new(mem.clone()), disk.clone()),
        mem,
        disk,
    )
}

#[test]
fn sessions_over_quota_spill_to_disk_and_flatten_the_same() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (store, mem, disk) = spilling(tmp.path(), 40, 1 << 20);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut spilled = 0;
    for n in 0..16u8 {
        let specs = random_specs(&mut rng);
        let mut h = store.create(meta(n)).unwrap();
        for (l, spec) in specs.iter().enumerate() {
            let order: Vec<usize> = (0..spec.batches.len()).collect();
            send(h.as_mut(), l as u32, spec, &order);
        }
        assert_flat(h.as_ref(), &specs);
        let want = model_pages(&specs);
        for a in (A - P..A + 8 * 64 * P + P).step_by(P as usize) {
            assert_eq!(h.lookup(a).unwrap(), want.get(&a).cloned(), "page {a:#x}");
        }
        let sent_data: u64 = specs
            .iter()
            .flat_map(|s| s.batches.iter().flatten())
            .filter(|r| !r.2)
            .map(|r| r.1 as u64)
            .sum();
        let on_disk = disk.list().unwrap().iter().any(|s| s.id == id(n));
        assert_eq!(
            on_disk,
            sent_data > 40,
            "session {n}: {sent_data} data pages"
        );
        spilled += on_disk as u32;
        drop(h);
        // Opened again from wherever it lives, it is the same image.
        let h = store.open(id(n)).unwrap();
        assert_flat(h.as_ref(), &specs);
        assert_eq!(store.list().unwrap().len(), n as usize + 1);
    }
    assert!(spilled >= 4, "only {spilled} sessions went over quota");
    // What spilled holds no memory any more.
    let in_mem: u64 = mem.list().unwrap().iter().map(|s| s.bytes).sum();
    assert!(mem.used() <= in_mem, "{} held for {in_mem}", mem.used());
    for s in disk.list().unwrap() {
        store.remove(s.id).unwrap();
    }
    assert!(disk.list().unwrap().is_empty());
}

#[test]
fn a_spill_keeps_the_state_and_the_open_layer() {
    let tmp = tempfile::TempDir::new().unwrap();
    // Layer 0 holds 7 data pages; layer 1's first batch brings the 8th, its
    // second goes over: the spill replays the first before it.
    let (store, mem, disk) = spilling(tmp.path(), 8, 1 << 20);
    let mut specs = three_layers();
    specs[1].batches = vec![
        vec![(A + P, 1, false)],
        vec![(A + 5 * P, 2, false), (A + 16 * P, 1, true)],
        vec![(A + 40 * P, 3, true)],
    ];
    let mut h = store.create(meta(1)).unwrap();
    send(h.as_mut(), 0, &specs[0], &[0, 1]);
    let tree = pb::ProcessTree::default();
    h.put_state(&tree).unwrap();
    h.begin_layer(1, vmas(&specs[1].vmas)).unwrap();
    h.put(&batch(1, 0, &specs[1].batches[0])).unwrap();
    assert!(disk.list().unwrap().is_empty(), "still in memory");
    h.put(&batch(1, 1, &specs[1].batches[1])).unwrap();
    assert_eq!(disk.list().unwrap().len(), 1, "it spilled");
    assert_eq!(mem.used(), 0, "and gave its memory back");
    h.put(&batch(1, 2, &specs[1].batches[2])).unwrap();
    h.seal().unwrap();
    send(h.as_mut(), 2, &specs[2], &[0]);
    assert_eq!(h.state().unwrap(), Some(tree));
    assert_flat(h.as_ref(), &specs);
}

#[test]
fn a_full_mem_store_starts_new_sessions_on_disk() {
    let tmp = tempfile::TempDir::new().unwrap();
    // Layer 0 of three_layers fills the store exactly.
    let (store, mem, disk) = spilling(tmp.path(), 1 << 20, 7);
    let specs = three_layers();
    let _first = session_with(&store, 1, &specs[..1]);
    assert_eq!(mem.used(), 7 * P);
    let h = session_with(&store, 2, &specs);
    assert_flat(h.as_ref(), &specs);
    assert_eq!(disk.list().unwrap()[0].id, id(2));
    assert_eq!(store.list().unwrap().len(), 2);
}
