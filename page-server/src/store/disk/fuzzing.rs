//! Fuzz entry point over the disk store's metadata files, the image
//! decoder that recovery runs on whatever it finds in a store directory.
//! Shared by the `image` fuzz target and the corpus replay test of `ferry`,
//! like `ferry_proto::fuzzing`. Not an API: hidden and free to change.

use std::path::Path;

use prost::Message;

use super::{check_index, decode_body, parse_header, record_bytes, CheckedIndex, Kind, HEADER_LEN};
use crate::store::common::{check_meta, flatten_pieces};
use ferry_proto::pb;

/// What [`store_file`] made of its input.
#[derive(Debug, Default)]
pub struct StoreFile {
    /// The whole input is a valid record of some kind.
    pub record: bool,
    /// The bytes after the header decode as a process tree (whatever the
    /// checksum says), for the restore checks the caller runs.
    pub tree: Option<pb::ProcessTree>,
}

/// `data` as a metadata file: decoded as each kind of record (only the kind
/// its header names may accept it); a record that decodes is written and
/// read back unchanged. The bytes after the header are also decoded as each
/// message whatever the checksum says, so mutated bodies reach the checks
/// recovery makes: `check_meta`, and `check_index` for two page sizes, an
/// index that passes being flattened alone and under itself, with every
/// piece inside its mappings and its pages file.
pub fn store_file(data: &[u8]) -> StoreFile {
    let meta = record::<pb::SessionMeta>(data, Kind::Meta);
    let state = record::<pb::ProcessTree>(data, Kind::State);
    let index = record::<pb::LayerIndex>(data, Kind::Index);
    let kinds = [meta, state, index].iter().filter(|&&ok| ok).count();
    assert!(kinds <= 1, "one file decodes as {kinds} kinds of record");

    let body = data.get(HEADER_LEN..).unwrap_or_default();
    if let Ok(m) = pb::SessionMeta::decode(body) {
        if let Ok(id) = check_meta(&m) {
            assert_eq!(&id.0[..], &m.session[..]);
            assert!(ferry_proto::valid_page_size(m.page_size));
        }
    }
    if let Ok(ix) = pb::LayerIndex::decode(body) {
        for ps in [4096, 65536] {
            if let Ok(c) = check_index(Path::new("index"), ix.layer, &ix, ps) {
                check_checked_index(&ix, &c, ps);
            }
        }
    }
    StoreFile {
        record: kinds == 1,
        tree: pb::ProcessTree::decode(body).ok(),
    }
}

/// The whole file as `read_record` sees it: at most one byte of body past
/// the length the header gives.
fn decode_record<M: Message + Default>(data: &[u8], kind: Kind) -> Result<M, String> {
    let (h, body) = data
        .split_first_chunk::<HEADER_LEN>()
        .ok_or("truncated header")?;
    let h = parse_header(h, kind)?;
    let body = &body[..body.len().min(h.len.saturating_add(1) as usize)];
    decode_body(body, &h)
}

/// True if `data` is a record of `kind`, checking it survives a write and
/// a read.
fn record<M: Message + Default + PartialEq>(data: &[u8], kind: Kind) -> bool {
    let Ok(m) = decode_record::<M>(data, kind) else {
        return false;
    };
    let again = decode_record::<M>(&record_bytes(kind, &m.encode_to_vec()), kind);
    assert!(
        again.as_ref() == Ok(&m),
        "a record changes when written again"
    );
    true
}

/// What flatten and lookup rely on of an index `check_index` accepted.
fn check_checked_index(ix: &pb::LayerIndex, c: &CheckedIndex, ps: u32) {
    let ps64 = ps as u64;
    assert_eq!(c.pages, ix.pages);
    assert!(c.data_end <= ix.pages_len);
    for w in c.runs.windows(2) {
        assert!(w[0].end(ps) <= w[1].addr, "runs overlap or are unsorted");
    }
    for r in &c.runs {
        assert!(r.pages > 0 && r.addr % ps64 == 0);
        if let Some(l) = r.data {
            assert!(l.off + r.pages * ps64 <= c.data_end, "run past the data");
        }
    }
    let one = [(&c.runs[..], &c.ranges)];
    let two = [(&c.runs[..], &c.ranges), (&c.runs[..], &c.ranges)];
    for layers in [&one[..], &two[..]] {
        let pieces = flatten_pieces(layers, ps);
        let mut next_min = 0;
        let mut pages = 0u64;
        for p in &pieces {
            assert!(p.pages > 0 && p.addr >= next_min, "pieces overlap");
            let end = p.addr + p.pages * ps64;
            next_min = end;
            pages += p.pages;
            assert!(c.ranges.contains(p.addr, end), "piece outside the mappings");
            if let Some((li, l)) = p.data {
                assert!((li as usize) < layers.len());
                assert!(
                    l.off + p.pages * ps64 <= ix.pages_len,
                    "piece past the file"
                );
            }
        }
        assert!(pages <= c.pages, "flatten made pages up");
    }
}
