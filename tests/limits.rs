//! Who may migrate in, and how much: the allow-list of client certificates
//! and each of the page server's limits, end to end over QUIC on loopback.
//! Every refusal must reach the source with its reason, and a session that
//! hits a limit must leave the others alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry::client::{Client, ClientError};
use ferry::synthetic::{Mix, Workload};
use ferry_page_server::access::{pem_fingerprint, AllowList};
use ferry_page_server::store::mem::MemStore;
use ferry_page_server::store::quota::{Quota, QuotaStore};
use ferry_page_server::store::Store;
use ferry_page_server::tls::{client_config, server_config, TlsFiles};
use ferry_page_server::Config;
use ferry_proto::{pb, SessionId};

mod common;
use common::{certs, connect, sender_config, Server};

fn config(tls: &Path, store: Arc<dyn Store>) -> Config {
    Config::new(server_config(&TlsFiles::server(tls)).unwrap(), store)
}

/// The TLS files of the client identity `name` (`client` or one made by
/// `ferry certs client`).
fn identity(tls: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: tls.join("ca.pem"),
        cert: Some(tls.join(format!("{name}.pem"))),
        key: Some(tls.join(format!("{name}.key"))),
    }
}

/// `n` rounds of every page of `w`.
async fn send_rounds(client: &mut Client, w: &Workload, n: u32) {
    for _ in 0..n {
        client
            .send_layer(w.vmas.clone(), w.batches(&w.all_pages(), 32))
            .await
            .unwrap();
    }
}

/// A whole small session (3 rounds, stored) as identity `name`.
async fn stored_session(server: &Server, tls: &Path, name: &str, id: u8) {
    let w = Workload::new(4, Mix::TYPICAL, id as u64);
    let mut client = connect_as(server, tls, name, id).await.unwrap();
    send_rounds(&mut client, &w, 3).await;
    client.send_state(pb::ProcessTree::default()).await.unwrap();
    client.commit(false).await.unwrap();
}

async fn connect_as(
    server: &Server,
    tls: &Path,
    name: &str,
    id: u8,
) -> Result<Client, ClientError> {
    let mut c = connect(server.addr, tls);
    c.transport = ferry::client::Transport::Quic {
        tls: client_config(&identity(tls, name)).unwrap(),
        server_name: ferry_page_server::tls::SERVER_NAME.into(),
    };
    c.timeout = Duration::from_secs(10);
    Client::connect(c, sender_config(id, 4096, false)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_client_certificates_migrate_in() {
    let tls = certs();
    ferry::certs::issue_client(tls.path(), "intruder").unwrap();
    ferry::certs::issue_client(tls.path(), "node-2").unwrap();
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut cfg = config(tls.path(), store.clone());
    let mut allow = AllowList::default();
    let allowed = pem_fingerprint(&tls.path().join("client.pem")).unwrap();
    allow.add(&allowed.to_string()).unwrap();
    allow.add("CN=node-2").unwrap();
    cfg.allow = Some(allow);
    let server = Server::start_with(cfg);

    // The allowed one is served while the other is refused.
    let good = {
        let (tls, server) = (tls.path().to_path_buf(), &server);
        async move { stored_session(server, &tls, "client", 1).await }
    };
    let bad = async {
        let e = connect_as(&server, tls.path(), "intruder", 2)
            .await
            .err()
            .expect("a certificate not on the allow-list got a session");
        let fp = pem_fingerprint(&tls.path().join("intruder.pem")).unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("not on this page server's allow-list"),
            "{msg}"
        );
        assert!(msg.contains(&fp.to_string()), "{msg}");
        assert!(msg.contains("CN=intruder"), "{msg}");
    };
    tokio::join!(good, bad);
    // Allowed by name.
    stored_session(&server, tls.path(), "node-2", 3).await;
    let mut ids: Vec<_> = store.list().unwrap().iter().map(|s| s.id).collect();
    ids.sort();
    assert_eq!(ids, [SessionId([1; 16]), SessionId([3; 16])]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_too_many_is_told_why() {
    let tls = certs();
    let mut cfg = config(tls.path(), Arc::new(MemStore::new()));
    cfg.max_sessions = 1;
    let server = Server::start_with(cfg);
    let first = connect_as(&server, tls.path(), "client", 1).await.unwrap();
    let e = connect_as(&server, tls.path(), "client", 2)
        .await
        .err()
        .expect("a second session with --max-sessions 1");
    let msg = e.to_string();
    assert!(
        msg.contains("1 sessions already running (--max-sessions)"),
        "{msg}"
    );
    first.abort("done").await;
    // The slot is free again once the first session has gone.
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(c) = connect_as(&server, tls.path(), "client", 3).await {
            c.abort("done").await;
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the session slot was not given back");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_ended_despite_keep_alives() {
    let tls = certs();
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut cfg = config(tls.path(), store.clone());
    cfg.idle_timeout = Duration::from_millis(500);
    let server = Server::start_with(cfg);
    let mut client = connect_as(&server, tls.path(), "client", 1).await.unwrap();
    // Past the idle timeout, and past a QUIC keep-alive (2 s) too.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let w = Workload::new(1, Mix::TYPICAL, 1);
    let e = client
        .send_layer(w.vmas.clone(), w.batches(&w.all_pages(), 32))
        .await
        .map(|_| ())
        .expect_err("an idle session went on");
    let msg = e.to_string();
    assert!(
        msg.contains("idle for") && msg.contains("--idle-timeout"),
        "{msg}"
    );
    assert!(
        store.list().unwrap().is_empty(),
        "the empty session is gone"
    );
    // A session that keeps moving is not cut: one round every 300 ms.
    let w = Workload::new(1, Mix::TYPICAL, 2);
    let mut c = connect_as(&server, tls.path(), "client", 2).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        send_rounds(&mut c, &w, 1).await;
    }
    c.commit(false).await.unwrap();
    server.stop().await;
}

/// Sends one 8 MiB round (its data pages are a few MiB) and returns why the
/// page server ended the session.
async fn one_big_round(server: &Server, tls: &Path, id: u8) -> String {
    let w = Workload::new(8, Mix::TYPICAL, id as u64);
    let mut client = connect_as(server, tls, "client", id).await.unwrap();
    let r = async {
        let addrs = w.all_pages();
        client
            .send_layer(w.vmas.clone(), w.batches(&addrs, 32))
            .await?;
        client.send_state(pb::ProcessTree::default()).await?;
        client.commit(false).await
    }
    .await;
    match r {
        Ok(_) => panic!("an oversized round was stored"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_over_the_size_limit_ends_only_its_session() {
    let tls = certs();
    let mut cfg = config(tls.path(), Arc::new(MemStore::new()));
    cfg.max_layer_bytes = 1 << 20;
    let server = Server::start_with(cfg);
    let msg = one_big_round(&server, tls.path(), 1).await;
    assert!(
        msg.contains("layer 0 carries more than 1 MiB") && msg.contains("--max-layer-size"),
        "{msg}"
    );
    // A round under the limit is served (the 1 MiB workload has less data).
    let w = Workload::new(1, Mix::TYPICAL, 2);
    let mut c = connect_as(&server, tls.path(), "client", 2).await.unwrap();
    send_rounds(&mut c, &w, 2).await;
    c.commit(false).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_quota_are_ended_and_their_memory_given_back() {
    let tls = certs();
    let quota = QuotaStore::new(
        Arc::new(MemStore::new()),
        Quota {
            session: 1 << 20,
            total: 3 << 20,
        },
    );
    let server = Server::start_with(config(tls.path(), Arc::new(quota.clone())));
    let msg = one_big_round(&server, tls.path(), 1).await;
    assert!(
        msg.contains("over quota: this session would hold") && msg.contains("--session-quota"),
        "{msg}"
    );
    assert_eq!(quota.used(), 0, "the failed session's bytes are given back");
    // Others are served within their quota.
    let w = Workload::new(1, Mix::TYPICAL, 2);
    let mut c = connect_as(&server, tls.path(), "client", 2).await.unwrap();
    send_rounds(&mut c, &w, 1).await;
    c.commit(false).await.unwrap();
    assert!(quota.used() > 0);
    server.stop().await;
}

/// The flags as the `ferry` binary takes them, and the log line a refused
/// peer leaves: its address and its certificate's fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_allow_list_refuses_and_logs_the_peer() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let tls = certs();
    ferry::certs::issue_client(tls.path(), "intruder").unwrap();
    let list = tls.path().join("allowed");
    std::fs::write(&list, "# only the default source\nCN=ferry-source\n").unwrap();
    let port = common::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = common::ServerProcess(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["page-server", "--listen", &addr.to_string(), "--tls"])
            .arg(tls.path())
            .arg("--allow-clients-file")
            .arg(&list)
            .args(["--idle-timeout", "30", "--session-quota", "64M"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    common::wait_for_server(addr, tls.path()).await;
    let mut c = connect(addr, tls.path());
    c.transport = ferry::client::Transport::Quic {
        tls: client_config(&identity(tls.path(), "intruder")).unwrap(),
        server_name: ferry_page_server::tls::SERVER_NAME.into(),
    };
    let e = match Client::connect(c, sender_config(2, 4096, false)).await {
        Ok(_) => panic!("a certificate not in the allow-list file got a session"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("not on this page server's allow-list"), "{e}");
    let _ = child.0.kill();
    let _ = child.0.wait();
    let mut log = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    // Colours or not, the words are there: drop escape sequences.
    let log = strip_ansi(&log);
    let fp = pem_fingerprint(&tls.path().join("intruder.pem")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("connection refused") && l.contains(&fp.to_string()))
        .unwrap_or_else(|| panic!("no refusal logged with the fingerprint:\n{log}"));
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(log.contains("1 allowed client certificate"), "{log}");
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then a final letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
