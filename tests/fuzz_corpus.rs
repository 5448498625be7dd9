//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the
//! targets' entry points (`ferry::fuzzing`) on stable, so every `cargo
//! test` runs it: no input may panic, and the generated seeds (`seed-*`)
//! must still get all the way through, or the corpus has gone stale against
//! the formats. `write_seed_corpus` (ignored; run it as root for a real
//! state capture) writes the seeds again:
//!
//! ```text
//! cargo test --test fuzz_corpus -- --ignored write_seed_corpus
//! ```

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ferry::fuzzing::TARGETS;
use ferry::proto::batch::{self, Compress, Encoder};
use ferry::proto::{pb, SessionId};
use ferry::state;
use ferry::sys::ptrace::Tracee;
use ferry_page_server::store::disk::DiskStore;
use ferry_page_server::store::Store;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn corpus_replays_without_panics() {
    let root = corpus_root();
    for &(name, target) in TARGETS {
        let inputs = files(&root.join(name));
        let (mut accepted, mut seeds) = (0, 0);
        for path in &inputs {
            let data = fs::read(path).unwrap();
            let ok = panic::catch_unwind(AssertUnwindSafe(|| target(&data)))
                .unwrap_or_else(|_| panic!("{} panics", path.display()));
            accepted += ok as usize;
            let file = path.file_name().unwrap().to_string_lossy();
            if file.starts_with("seed-") {
                seeds += 1;
                assert!(
                    ok,
                    "{} no longer gets through: regenerate the seeds (see this file's docs)",
                    path.display()
                );
            }
        }
        assert!(seeds > 0, "no seeds for target {name}");
        eprintln!("{name}: {} inputs, {accepted} accepted", inputs.len());
    }
}

#[test]
fn every_corpus_directory_has_a_target() {
    for entry in fs::read_dir(corpus_root()).unwrap() {
        let name = entry.unwrap().file_name();
        let name = name.to_string_lossy();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/corpus/{name} has no target in ferry::fuzzing::TARGETS"
        );
    }
}

/// Writes `fuzz/corpus/<target>/seed-*` from the real encoders, a real disk
/// store and this machine's `/proc`, replacing the old seeds.
#[test]
#[ignore = "writes the seed corpus into the source tree"]
fn write_seed_corpus() {
    let mut seeds: Vec<(&str, String, Vec<u8>)> = ferry::proto::fuzzing::seeds()
        .into_iter()
        .map(|s| (s.target, s.name, s.data))
        .collect();
    for (name, data) in store_files() {
        seeds.push(("image", name, data));
    }
    for (name, data) in proc_texts() {
        seeds.push(("procfs", name, data));
    }
    let root = corpus_root();
    for &(target, _) in TARGETS {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap();
        for old in files(&dir) {
            if old
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
            {
                fs::remove_file(old).unwrap();
            }
        }
    }
    for (target, name, data) in seeds {
        let path = root.join(target).join(format!("seed-{name}"));
        fs::write(&path, &data).unwrap();
        eprintln!("{} ({} bytes)", path.display(), data.len());
    }
}

/// The metadata files of a real disk store session: its meta, the index of
/// a layer of real batches and a state, captured from a running fixture
/// when root (a minimal tree otherwise).
fn store_files() -> Vec<(String, Vec<u8>)> {
    const PS: u32 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    let id = SessionId([0x5e; 16]);
    let mut s = store
        .create(pb::SessionMeta {
            session: id.0.to_vec().into(),
            page_size: PS,
            arch: "x86_64".into(),
            kernel: "6.8.0".into(),
            label: "fuzz seed".into(),
            created_unix_ms: 1_700_000_000_000,
        })
        .unwrap();
    let vma = |start, end| pb::Vma {
        start,
        end,
        prot: 3,
        flags: 0x22,
        kind: pb::VmaKind::Anon as i32,
        ..Default::default()
    };
    s.begin_layer(0, vec![vma(0x10000, 0x30000), vma(0x40000, 0x50000)])
        .unwrap();
    let mut enc = Encoder::new(PS, Compress::default());
    let mut text = b"ferry seed page ".repeat(256);
    text.extend(vec![0u8; PS as usize]);
    text.extend(b"another page ".repeat(316));
    text.resize(3 * PS as usize, b'!');
    let e = enc.encode(0, 0, [(0x10000, Bytes::from(text))]).unwrap();
    let z = enc.encode_zero(0, 1, &[(0x40000, 0x42000)]).unwrap();
    for e in [e, z] {
        s.put(&batch::decode(e.to_wire(), PS).unwrap()).unwrap();
    }
    s.seal().unwrap();
    s.put_state(&process_tree()).unwrap();
    drop(s);
    let session = dir.path().join(id.to_hex());
    ["meta", "layer-000000/index", "state"]
        .iter()
        .map(|f| {
            let name = f.rsplit('/').next().unwrap().to_owned();
            (name, fs::read(session.join(f)).unwrap())
        })
        .collect()
}

fn process_tree() -> pb::ProcessTree {
    if !common::is_root() {
        eprintln!("not root: the state seed is a minimal tree, not a capture");
        return pb::ProcessTree {
            processes: vec![pb::Process {
                pid: 42,
                comm: "seed".into(),
                threads: vec![pb::Thread {
                    tid: 42,
                    gpregs: vec![0; state::GPREGS_LEN].into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
    }
    let fx = common::Fixture::start(&["--mib", "1", "--single-thread"]);
    let tr = Tracee::seize(fx.pid).expect("seize");
    tr.freeze().expect("freeze");
    let tree = state::capture(fx.pid, &tr).expect("capture");
    tr.detach(false).expect("detach");
    tree
}

/// `/proc` text of this process, plus the fixtures the parsers' unit tests
/// use.
fn proc_texts() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // Held open while its fdinfo is read.
    let null = fs::File::open("/dev/null").unwrap();
    let fdinfo = format!("fdinfo/{}", null.as_raw_fd());
    for f in ["maps", "status", "stat", "limits", "personality", &fdinfo] {
        let name = format!("self-{}", f.split('/').next().unwrap());
        out.push((name, fs::read(format!("/proc/self/{f}")).unwrap()));
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc");
    for path in files(&fixtures) {
        let name = format!("fixture-{}", path.file_name().unwrap().to_string_lossy());
        out.push((name, fs::read(path).unwrap()));
    }
    // Every parser must accept something; the fixture texts are real.
    for (name, data) in &out {
        assert!(ferry::fuzzing::procfs(data), "{name} parses with nothing");
    }
    out
}
