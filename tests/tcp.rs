//! The plain-TCP baseline transport end to end on loopback: a session over
//! it is stored and flattened byte for byte, as over QUIC; strangers at the
//! port (bad preambles, silence, unknown tokens, one data connection too
//! many, a token already in use) are refused one socket at a time while
//! other sessions complete; the page server's reasons still reach the
//! source; and non-loopback addresses are refused unless forced.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry::client::{Client, ClientError, Connect, Transport};
use ferry::synthetic::{Mix, Workload};
use ferry_page_server::server::ServerError;
use ferry_page_server::store::{disk::DiskStore, mem::MemStore, Store};
use ferry_page_server::{Config, PageServer};
use ferry_proto::pb::{self, control::Msg};
use ferry_proto::preamble::{self, Kind, Preamble};
use ferry_proto::session::{control, SenderConfig};
use ferry_proto::{frame, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::{sender_config, store_three_layers, Server};

fn tcp(addr: SocketAddr) -> Connect {
    let mut c = Connect::tcp(addr);
    c.streams = 4;
    c.timeout = Duration::from_secs(20);
    c
}

async fn full_session(addr: SocketAddr, id: u8, mib: u64, store: &dyn Store) {
    let mut w = Workload::new(mib, Mix::TYPICAL, id as u64);
    let client = connect_when_free(addr, sender_config(id, w.page_size, false)).await;
    store_three_layers(client, &mut w, id, mib, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_layers_over_tcp_flatten_exactly_in_both_stores() {
    let disk_dir = tempfile::tempdir().unwrap();
    let stores: Vec<Arc<dyn Store>> = vec![
        Arc::new(MemStore::new()),
        Arc::new(DiskStore::open(disk_dir.path()).unwrap()),
    ];
    for store in stores {
        let server = Server::start_with(Config::tcp(store.clone()));
        full_session(server.addr, 1, 8, store.as_ref()).await;
        server.stop().await;
    }
}

/// Connects once a session that just ended has given back its place
/// (`max_sessions`): the server frees it a moment after the source is done.
async fn connect_when_free(addr: SocketAddr, s: SenderConfig) -> Client {
    for _ in 0..50 {
        match Client::connect(tcp(addr), s.clone()).await {
            Ok(c) => return c,
            Err(e) if e.to_string().contains("sessions already running") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the page server never gave the session's place back");
}

async fn open(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(first).await.unwrap();
    s
}

fn preamble(kind: Kind, token: [u8; 16]) -> [u8; preamble::LEN] {
    Preamble { kind, token }.encode()
}

/// Whether the page server closed the socket (within `wait`) rather than
/// keeping it open: it never writes to data connections.
async fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 64];
    match tokio::time::timeout(wait, s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("the page server wrote {n} bytes to a data connection"),
        Err(_) => false,
    }
}

/// Reads control messages until one decodes, or `None` at the end.
async fn read_control(s: &mut TcpStream, buf: &mut BytesMut) -> Option<pb::Control> {
    let read = async {
        loop {
            if let Some(m) = frame::decode_control(buf).unwrap() {
                return Some(m);
            }
            buf.reserve(4096);
            match s.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the page server answered")
}

async fn write_control(s: &mut TcpStream, msg: Msg) {
    let mut b = BytesMut::new();
    frame::encode_control(&control(msg), &mut b);
    s.write_all(&b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_one_socket_at_a_time_while_sessions_complete() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut cfg = Config::tcp(store.clone());
    cfg.handshake_timeout = Duration::from_secs(1);
    let server = Server::start_with(cfg);
    let addr = server.addr;
    let good = {
        let store = store.clone();
        tokio::spawn(async move { full_session(addr, 2, 16, store.as_ref()).await })
    };
    let quick = Duration::from_secs(3);

    // Not ferry at all, a wrong version, an unknown kind.
    let mut http = open(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(closed_by_server(&mut http, quick).await, "HTTP request");
    let mut v = preamble(Kind::Data, [3; 16]);
    v[4] = 9;
    assert!(
        closed_by_server(&mut open(addr, &v).await, quick).await,
        "version"
    );
    let mut k = preamble(Kind::Data, [3; 16]);
    k[5] = 4;
    assert!(
        closed_by_server(&mut open(addr, &k).await, quick).await,
        "kind"
    );
    // A preamble cut short, and then silence: the handshake timeout.
    let mut short = open(addr, &preamble(Kind::Control, [3; 16])[..5]).await;
    assert!(closed_by_server(&mut short, quick).await, "silence");
    // A data connection for no session.
    let mut unknown = open(addr, &preamble(Kind::Data, [0x77; 16])).await;
    assert!(closed_by_server(&mut unknown, quick).await, "unknown token");

    // A session by hand, to know its token.
    let token = [0x42; 16];
    let mut ctl = open(addr, &preamble(Kind::Control, token)).await;
    write_control(
        &mut ctl,
        Msg::Hello(pb::Hello {
            version: PROTOCOL_VERSION,
            session: vec![0x42; 16].into(),
            page_size: 4096,
            ..Default::default()
        }),
    )
    .await;
    let mut cbuf = BytesMut::new();
    let welcome = read_control(&mut ctl, &mut cbuf).await;
    assert!(
        matches!(
            welcome,
            Some(pb::Control {
                msg: Some(Msg::Welcome(_))
            })
        ),
        "{welcome:?}"
    );
    // Its data connections, one more than allowed: exactly one is closed,
    // whichever the server happened to route last.
    let mut data = Vec::new();
    for _ in 0..=ferry_page_server::tcp::MAX_DATA_CONNECTIONS {
        data.push(open(addr, &preamble(Kind::Data, token)).await);
    }
    let mut closed = 0;
    for s in &mut data {
        closed += closed_by_server(s, Duration::from_millis(300)).await as usize;
    }
    assert_eq!(closed, 1, "one data connection too many");
    // A second control connection with the same token is told why.
    let mut twin = open(addr, &preamble(Kind::Control, token)).await;
    let mut tbuf = BytesMut::new();
    match read_control(&mut twin, &mut tbuf).await {
        Some(pb::Control {
            msg: Some(Msg::Abort(a)),
        }) => assert!(a.reason.contains("already in use"), "{}", a.reason),
        m => panic!("wanted an Abort, got {m:?}"),
    }
    // The hand-made session still works: it can end itself cleanly.
    write_control(
        &mut ctl,
        Msg::Abort(pb::Abort {
            reason: "test over".into(),
        }),
    )
    .await;
    drop(data);
    drop(ctl);

    good.await.unwrap();
    full_session(addr, 3, 4, store.as_ref()).await;
    server.stop().await;
}

fn vma(start: u64, end: u64) -> pb::Vma {
    pb::Vma {
        start,
        end,
        prot: 3,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_servers_reasons_reach_a_tcp_source() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut cfg = Config::tcp(store.clone());
    cfg.max_sessions = 1;
    let server = Server::start_with(cfg);
    let addr = server.addr;

    // Refused at the handshake: no restores here.
    let mut s = sender_config(5, 4096, false);
    s.features = vec![ferry_proto::FEATURE_RESTORE.into()];
    let e = Client::connect(tcp(addr), s).await.err().expect("refused");
    eprintln!("restore: {e}");
    assert!(e.to_string().contains("--restore"), "{e}");

    // No room: one session at a time. The refused session above holds its
    // place until its goodbye is read, which can be after our error.
    let held = connect_when_free(addr, sender_config(6, 4096, false)).await;
    let e = Client::connect(tcp(addr), sender_config(7, 4096, false))
        .await
        .err()
        .expect("refused");
    eprintln!("full: {e}");
    assert!(e.to_string().contains("sessions already running"), "{e}");
    held.abort("done").await;

    // Ended mid-layer while the lanes write: the reason, not "broken pipe".
    let base = 0x10000u64;
    let mut client = connect_when_free(addr, sender_config(8, 4096, false)).await;
    let page = Bytes::from(vec![0x5au8; 16 * 4096]);
    let e = async {
        client
            .begin_layer(vec![vma(base, base + (1 << 30))])
            .await?;
        client.send_pages(vec![(1 << 40, page.clone())]).await?;
        for i in 0..16_384u64 {
            client
                .send_pages(vec![(base + i * page.len() as u64, page.clone())])
                .await?;
        }
        client.end_layer().await?;
        client.wait_sealed().await?;
        Ok::<_, ClientError>(())
    }
    .await
    .unwrap_err();
    eprintln!("mid-layer: {e}");
    assert!(
        e.to_string().contains("outside the layer's mappings"),
        "{e}"
    );
    drop(client);

    // The failed sessions left nothing behind, and the server still serves.
    for s in store.list().unwrap() {
        assert_eq!(s.layers, 0, "{s:?}");
    }
    full_session(addr, 9, 8, store.as_ref()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_refuses_non_loopback_addresses_unless_forced() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    match PageServer::bind("0.0.0.0:0".parse().unwrap(), Config::tcp(store.clone())) {
        Err(ServerError::Plaintext(e)) => assert!(e.to_string().contains("loopback"), "{e}"),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("plain TCP bound every interface"),
    }
    let forced = Config::with_transport(
        ferry_page_server::Transport::Tcp { allow_remote: true },
        store,
    );
    drop(PageServer::bind("0.0.0.0:0".parse().unwrap(), forced).unwrap());

    // TEST-NET-1: nothing answers there, so only a refusal is quick.
    let far: SocketAddr = "192.0.2.1:7070".parse().unwrap();
    let mut c = Connect::tcp(far);
    c.timeout = Duration::from_secs(30);
    let e = tokio::time::timeout(
        Duration::from_secs(5),
        Client::connect(c, sender_config(1, 4096, false)),
    )
    .await
    .expect("refused before any connection attempt")
    .err()
    .expect("refused");
    assert!(matches!(e, ClientError::Plaintext(_)), "{e}");
    let mut c = Connect::with_transport(far, Transport::Tcp { allow_remote: true });
    c.timeout = Duration::from_millis(300);
    let e = Client::connect(c, sender_config(1, 4096, false))
        .await
        .err()
        .expect("nothing there");
    assert!(!matches!(e, ClientError::Plaintext(_)), "{e}");
}

fn ferry(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_refuses_plain_tcp_beyond_loopback_and_says_it_is_unencrypted() {
    let (ok, err) = ferry(&["page-server", "--listen", "0.0.0.0:0", "--transport", "tcp"]);
    assert!(!ok && err.contains("loopback"), "{err}");
    // A pid that cannot exist: were the address not refused first, the
    // error would be about the process.
    let (ok, err) = ferry(&[
        "dump",
        "--pid",
        "999999999",
        "--to",
        "192.0.2.1:7070",
        "--transport",
        "tcp",
    ]);
    assert!(!ok && err.contains("loopback"), "{err}");
    let (ok, err) = ferry(&[
        "migrate",
        "--pid",
        "999999999",
        "--to",
        "127.0.0.1:1",
        "--transport",
        "tcp",
        "--tls",
        "/nonexistent",
    ]);
    assert!(!ok && err.contains("unencrypted"), "{err}");
    let (ok, err) = ferry(&[
        "migrate",
        "--pid",
        "999999999",
        "--to",
        "127.0.0.1:1",
        "--insecure-allow-remote",
    ]);
    assert!(
        !ok && err.contains("only applies to --transport tcp"),
        "{err}"
    );
    // On loopback the banner comes first, then the dump goes on (and fails
    // on the pid that cannot exist, or on the closed port).
    let (ok, err) = ferry(&[
        "dump",
        "--pid",
        "999999999",
        "--to",
        "127.0.0.1:1",
        "--transport",
        "tcp",
    ]);
    assert!(!ok && err.contains("UNENCRYPTED"), "{err}");
}
