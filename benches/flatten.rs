//! Store insert and flatten: a 256 MiB image in three layers (all pages,
//! then 10 % and 1 % rewritten), in the memory and the disk store.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::synthetic::{Mix, Rng, Workload};
use ferry_page_server::store::{disk::DiskStore, mem::MemStore, Store};
use ferry_proto::batch::{decode, Compress, DecodedBatch, Encoder};
use ferry_proto::{pb, SessionId};

const MIB: u64 = 256;

fn layers() -> (Workload, Vec<Vec<DecodedBatch>>) {
    let mut w = Workload::new(MIB, Mix::TYPICAL, 1);
    let mut rng = Rng::new(2);
    let mut enc = Encoder::new(w.page_size, Compress::Off);
    let mut out = Vec::new();
    for (layer, pct) in [(0u32, 100u32), (1, 10), (2, 1)] {
        let addrs = if pct == 100 {
            w.all_pages()
        } else {
            w.dirty(pct, Mix::TYPICAL, &mut rng)
        };
        let batches = w
            .batches(&addrs, 256)
            .into_iter()
            .enumerate()
            .map(|(seq, ranges)| {
                let e = enc.encode(layer, seq as u32, ranges).unwrap();
                decode(e.to_wire(), w.page_size).unwrap()
            })
            .collect();
        out.push(batches);
    }
    (w, out)
}

fn fill_store(store: &dyn Store, id: u8, w: &Workload, layers: &[Vec<DecodedBatch>]) {
    let mut s = store
        .create(pb::SessionMeta {
            session: vec![id; 16].into(),
            page_size: w.page_size,
            ..Default::default()
        })
        .unwrap();
    for (i, batches) in layers.iter().enumerate() {
        s.begin_layer(i as u32, w.vmas.clone()).unwrap();
        for b in batches {
            s.put(b).unwrap();
        }
        s.seal().unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let (w, layers) = layers();
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(MIB << 20));
    let disk_dir = tempfile::tempdir().unwrap();
    let stores: Vec<(&str, Arc<dyn Store>)> = vec![
        ("mem", Arc::new(MemStore::new())),
        ("disk", Arc::new(DiskStore::open(disk_dir.path()).unwrap())),
    ];
    for (name, store) in &stores {
        let mut id = 0u8;
        g.bench_function(format!("insert3/{name}"), |b| {
            b.iter(|| {
                id = id.wrapping_add(1);
                let _ = store.remove(SessionId([id; 16]));
                fill_store(store.as_ref(), id, &w, &layers);
                store.remove(SessionId([id; 16])).unwrap();
            })
        });
        fill_store(store.as_ref(), 200, &w, &layers);
        let s = store.open(SessionId([200; 16])).unwrap();
        g.bench_function(format!("flatten3/{name}"), |b| {
            b.iter(|| s.flatten().unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
