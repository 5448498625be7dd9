//! Page-batch encode and decode on the kinds of memory a process holds:
//! zero, text-like, random, and a typical mix of the three.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry::synthetic::{fill, Content, Mix, Rng};
use ferry_proto::batch::{decode, Compress, Encoder};

const PS: usize = 4096;
const PAGES: usize = 1024;

fn pages(kind: &str) -> Bytes {
    let mut rng = Rng::new(42);
    let mut buf = vec![0u8; PS * PAGES];
    for (i, p) in buf.chunks_mut(PS).enumerate() {
        let c = match kind {
            "zero" => Content::Zero,
            "text" => Content::Text,
            "random" => Content::Random,
            _ => Mix::TYPICAL.pick(&mut rng),
        };
        fill(p, c, i as u64);
    }
    Bytes::from(buf)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Bytes((PS * PAGES) as u64));
    for kind in ["zero", "text", "random", "typical"] {
        let mem = pages(kind);
        for (name, compress) in [("raw", Compress::Off), ("zstd1", Compress::default())] {
            let mut enc = Encoder::new(PS as u32, compress);
            g.bench_with_input(
                BenchmarkId::new(format!("encode/{name}"), kind),
                &mem,
                |b, m| b.iter(|| enc.encode(0, 0, [(0x10_0000u64, m.clone())]).unwrap()),
            );
            let wire = enc
                .encode(0, 0, [(0x10_0000u64, mem.clone())])
                .unwrap()
                .to_wire();
            g.bench_with_input(
                BenchmarkId::new(format!("decode/{name}"), kind),
                &wire,
                |b, w| b.iter(|| decode(w.clone(), PS as u32).unwrap()),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
