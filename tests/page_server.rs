//! The page server end to end over real QUIC on loopback: layers streamed
//! into both stores and flattened byte for byte, mutual TLS refusing
//! strangers while serving a good client, hostile input ending only its own
//! session, and the disk store surviving a killed page server.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use ferry::client::{Client, ClientError, CommitOutcome, Connect};
use ferry::synthetic::verify;
use ferry::synthetic::{Mix, Rng, Workload};
use ferry_page_server::store::{disk::DiskStore, mem::MemStore, Store};
use ferry_page_server::tls::{client_config, TlsFiles, SERVER_NAME};
use ferry_proto::batch::{Compress, Encoder};
use ferry_proto::frame;
use ferry_proto::pb::{self, control::Msg};
use ferry_proto::session::control;
use ferry_proto::{SessionId, PROTOCOL_VERSION};

mod common;
use common::{
    certs, connect, connect_retrying, free_port, migrate_synthetic, sender_config,
    store_three_layers, Server, ServerProcess,
};

async fn full_session(addr: SocketAddr, tls: &Path, id: u8, mib: u64, store: &dyn Store) {
    let mut w = Workload::new(mib, Mix::TYPICAL, id as u64);
    let client = Client::connect(connect(addr, tls), sender_config(id, w.page_size, false))
        .await
        .unwrap();
    store_three_layers(client, &mut w, id, mib, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_layers_through_quic_flatten_exactly_in_both_stores() {
    let tls = certs();
    let disk_dir = tempfile::tempdir().unwrap();
    let stores: Vec<Arc<dyn Store>> = vec![
        Arc::new(MemStore::new()),
        Arc::new(DiskStore::open(disk_dir.path()).unwrap()),
    ];
    for store in stores {
        let server = Server::start(tls.path(), store.clone());
        full_session(server.addr, tls.path(), 1, 8, store.as_ref()).await;
        server.stop().await;
    }
}

async fn expect_refused(addr: SocketAddr, tls: quinn::ClientConfig) -> ClientError {
    let mut c = Connect::new(addr, tls);
    c.timeout = Duration::from_secs(10);
    match Client::connect(c, sender_config(9, 4096, false)).await {
        Ok(_) => panic!("an untrusted client got a session"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_trusted_certificate_are_refused_while_a_good_one_is_served() {
    let tls = certs();
    let other = certs();
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let server = Server::start(tls.path(), store.clone());
    let addr = server.addr;

    let good = {
        let (tls, store) = (tls.path().to_path_buf(), store.clone());
        tokio::spawn(async move { full_session(addr, &tls, 2, 16, store.as_ref()).await })
    };
    // No client certificate at all.
    let none = TlsFiles {
        ca: tls.path().join("ca.pem"),
        cert: None,
        key: None,
    };
    let e = expect_refused(addr, client_config(&none).unwrap()).await;
    eprintln!("no certificate: {e}");
    // A certificate from another CA (which trusts the real server's CA, so
    // only the client side of the handshake is wrong).
    let foreign = TlsFiles {
        ca: tls.path().join("ca.pem"),
        cert: Some(other.path().join("client.pem")),
        key: Some(other.path().join("client.key")),
    };
    let e = expect_refused(addr, client_config(&foreign).unwrap()).await;
    eprintln!("foreign CA: {e}");
    // A server certificate presented as a client certificate is signed by the
    // right CA but is not for client authentication.
    let wrong_use = TlsFiles {
        ca: tls.path().join("ca.pem"),
        cert: Some(tls.path().join("server.pem")),
        key: Some(tls.path().join("server.key")),
    };
    expect_refused(addr, client_config(&wrong_use).unwrap()).await;
    // And a client must not trust a server from another CA either.
    let e = expect_refused(
        addr,
        client_config(&TlsFiles::client(other.path())).unwrap(),
    )
    .await;
    eprintln!("server from another CA: {e}");

    good.await.unwrap();
    assert!(store
        .list()
        .unwrap()
        .iter()
        .all(|s| s.id == SessionId([2; 16])));
    server.stop().await;
}

/// A connection with hand-made frames, to play a hostile source.
struct Raw {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _endpoint: quinn::Endpoint,
}

impl Raw {
    async fn connect(addr: SocketAddr, tls: &Path) -> Raw {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let cfg = client_config(&TlsFiles::client(tls)).unwrap();
        let conn = endpoint
            .connect_with(cfg, addr, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Raw {
            conn,
            send,
            recv,
            _endpoint: endpoint,
        }
    }

    async fn write(&mut self, msg: Msg) {
        let mut b = BytesMut::new();
        frame::encode_control(&control(msg), &mut b);
        self.send.write_all(&b).await.unwrap();
    }

    async fn hello(&mut self, id: u8, version: u32) {
        self.write(Msg::Hello(pb::Hello {
            version,
            session: vec![id; 16].into(),
            page_size: 4096,
            ..Default::default()
        }))
        .await;
    }

    /// Reads control messages until the session ends; returns the reason
    /// the server gave (its Abort, or its connection close).
    async fn reason(mut self) -> String {
        let mut buf = BytesMut::new();
        let read = async {
            loop {
                while let Ok(Some(m)) = frame::decode_control(&mut buf) {
                    if let Some(Msg::Abort(a)) = m.msg {
                        return a.reason;
                    }
                }
                match self.recv.read_chunk(65536, true).await {
                    Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                    Ok(None) => return "control stream ended".into(),
                    Err(e) => return e.to_string(),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the server answered a hostile session")
    }

    async fn begin_layer0(&mut self) {
        self.hello(5, PROTOCOL_VERSION).await;
        self.write(Msg::LayerBegin(pb::LayerBegin {
            layer: 0,
            vmas: vec![pb::Vma {
                start: 0x10000,
                end: 0x20000,
                ..Default::default()
            }],
        }))
        .await;
    }

    async fn data(&mut self, bytes: &[u8]) {
        let mut s = self.conn.open_uni().await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.finish().unwrap();
    }
}

fn batch_frame(layer: u32, addr: u64) -> Vec<u8> {
    let page = vec![0xa5u8; 4096];
    let e = Encoder::new(4096, Compress::Off)
        .encode(layer, 0, [(addr, page.into())])
        .unwrap()
        .to_wire();
    let mut v = frame::encode_batch_prefix(&e.header, e.payload.len()).to_vec();
    v.extend_from_slice(&e.payload);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_ends_only_its_own_session() {
    let tls = certs();
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let server = Server::start(tls.path(), store.clone());
    let addr = server.addr;

    // Garbage datagrams at the QUIC port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = Rng::new(3);
    for len in [1usize, 20, 1200, 1500, 65000] {
        let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        udp.send_to(&junk, addr).unwrap();
    }
    // A QUIC-looking initial packet with a bogus version and lengths.
    udp.send_to(&[0xc0, 0xff, 0xff, 0xff, 0xff, 0x50, 0x50], addr)
        .unwrap();

    let mut cases: Vec<(&str, String)> = Vec::new();

    // Wrong protocol version.
    let mut r = Raw::connect(addr, tls.path()).await;
    r.hello(10, 99).await;
    cases.push(("version 99", r.reason().await));

    // A control frame cut short by the end of the stream.
    let mut r = Raw::connect(addr, tls.path()).await;
    let mut b = BytesMut::new();
    b.put_u32(100);
    b.put_slice(&[1, 2, 3]);
    r.send.write_all(&b).await.unwrap();
    r.send.finish().unwrap();
    cases.push(("ended inside a frame", r.reason().await));

    // An oversized control frame: refused from its length alone.
    let mut r = Raw::connect(addr, tls.path()).await;
    r.send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    cases.push(("exceeds the limit", r.reason().await));

    // Protobuf garbage inside a well-sized frame.
    let mut r = Raw::connect(addr, tls.path()).await;
    let mut b = BytesMut::new();
    b.put_u32(6);
    b.put_slice(&[0xff; 6]);
    r.send.write_all(&b).await.unwrap();
    cases.push(("does not decode", r.reason().await));

    // An oversized data frame.
    let mut r = Raw::connect(addr, tls.path()).await;
    r.begin_layer0().await;
    let mut b = BytesMut::new();
    b.put_u32(10);
    b.put_u32(u32::MAX);
    r.data(&b).await;
    cases.push(("batch payload frame", r.reason().await));

    // A truncated data frame.
    let mut r = Raw::connect(addr, tls.path()).await;
    r.begin_layer0().await;
    let f = batch_frame(0, 0x10000);
    r.data(&f[..f.len() - 100]).await;
    cases.push(("ended inside a frame", r.reason().await));

    // A batch for a layer that was never begun.
    let mut r = Raw::connect(addr, tls.path()).await;
    r.begin_layer0().await;
    r.data(&batch_frame(7, 0x10000)).await;
    cases.push(("unknown layer 7", r.reason().await));

    // Pages outside the layer's mappings.
    let mut r = Raw::connect(addr, tls.path()).await;
    r.begin_layer0().await;
    r.data(&batch_frame(0, 0x40000)).await;
    cases.push(("outside the layer's mappings", r.reason().await));

    // Resuming a session the server never had.
    let mut r = Raw::connect(addr, tls.path()).await;
    r.write(Msg::Hello(pb::Hello {
        version: PROTOCOL_VERSION,
        session: vec![77; 16].into(),
        page_size: 4096,
        resume: true,
        ..Default::default()
    }))
    .await;
    cases.push(("unknown session", r.reason().await));

    // A message only the destination may send.
    let mut r = Raw::connect(addr, tls.path()).await;
    r.write(Msg::Restored(pb::Restored {
        pid: 1,
        ..Default::default()
    }))
    .await;
    cases.push(("unexpected Restored", r.reason().await));

    for (want, got) in &cases {
        assert!(got.contains(want), "wanted {want:?} in {got:?}");
    }
    // None of the hostile sessions left a layer behind.
    for s in store.list().unwrap() {
        assert_eq!(s.layers, 0, "{s:?}");
    }
    // The server still serves.
    full_session(addr, tls.path(), 3, 4, store.as_ref()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_store_survives_a_killed_page_server_and_the_session_resumes() {
    let tls = certs();
    let images = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut w = Workload::new(8, Mix::TYPICAL, 4);

    let store_arg = format!("disk:{}", images.path().display());
    let server = ServerProcess::start(tls.path(), &store_arg, port);
    let mut client =
        connect_retrying(connect(addr, tls.path()), sender_config(4, 4096, false)).await;
    migrate_synthetic(&mut client, &mut w, 3, 4).await;
    let sealed = w.clone();
    // A fourth layer reaches the server but is never ended.
    let mut rng = Rng::new(99);
    let dirty = w.dirty(20, Mix::TYPICAL, &mut rng);
    client.begin_layer(w.vmas.clone()).await.unwrap();
    for b in w.batches(&dirty, 32) {
        client.send_pages(b).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();
    drop(client);

    // What a restarted server finds: three sealed layers, the fourth gone.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["images", "list", "--store"])
        .arg(format!("disk:{}", images.path().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    eprintln!("{listing}");
    let row = listing
        .lines()
        .find(|l| l.starts_with(&SessionId([4; 16]).to_hex()))
        .expect("session listed");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "3", "layers: {row}");

    let store = DiskStore::open(images.path()).unwrap();
    verify(&store, SessionId([4; 16]), &sealed).unwrap();
    drop(store);

    // The source resumes the session on a restarted server at layer 3.
    let server = ServerProcess::start(tls.path(), &store_arg, port);
    let mut client =
        connect_retrying(connect(addr, tls.path()), sender_config(4, 4096, true)).await;
    assert_eq!(client.next_layer(), 3);
    client
        .send_layer(w.vmas.clone(), w.batches(&dirty, 32))
        .await
        .unwrap();
    let outcome = client.commit(false).await.unwrap();
    assert!(
        matches!(outcome, CommitOutcome::Stored { layers: 4, .. }),
        "{outcome:?}"
    );
    server.kill();
    let store = DiskStore::open(images.path()).unwrap();
    verify(&store, SessionId([4; 16]), &w).unwrap();
}
