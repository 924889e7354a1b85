//! Every limit of an internet-facing relay, triggered over real sockets,
//! with the relay serving everyone else meanwhile: the handshake deadline,
//! connections in total and per address (and who may say which address
//! through `X-Forwarded-For`), new connections per second, messages per
//! second, documents per connection, and the size of a change and of a
//! document.

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::ROOT;
use converge_core::engine::Event;
use converge_core::transport::ws;
use converge_core::wire::{self, DocMessage, DocumentId, Message, PeerId};
use converge_server::limits::Limits;
use futures::SinkExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::http::http_with;
use super::relay::{put, rust_client, Relay};
use super::sockets::{close_code, handshake, join, Socket};
use super::wait;

/// Opens a raw WebSocket, optionally saying it is forwarded for `xff`:
/// the socket, or the HTTP status the upgrade was refused with.
async fn dial(relay: &Relay, xff: Option<&str>) -> Result<Socket, u16> {
    let mut request = relay.url.as_str().into_client_request().expect("request");
    if let Some(xff) = xff {
        let value = xff.parse().expect("header");
        request.headers_mut().insert("x-forwarded-for", value);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("dial failed for another reason: {e}"),
    }
}

/// Another client syncs a new document through the relay: it is serving.
async fn still_serves(relay: &Relay) {
    let client = rust_client();
    let _link = ws::connect(client.clone(), relay.url.clone());
    wait::connected(&client, 1).await;
    let doc = client.create(None).await.expect("create");
    put(&doc, "alive", "yes").await;
    wait::until("another client's document reaches the relay", || async {
        relay.repo.find(doc.id()).await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_join_in_time_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start_limited(dir.path(), Limits::default(), |e| {
        e.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    let mut silent = dial(&relay, None).await.expect("upgrade");
    still_serves(&relay).await;
    assert_eq!(close_code(&mut silent).await, 4408);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_limited_in_total_and_per_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Per address, counted by the TCP peer: X-Forwarded-For from an
    // untrusted peer changes nothing.
    let limits = Limits {
        max_connections: 3,
        max_connections_per_ip: 2,
        new_connections_per_ip_per_sec: 1000.0,
        ..Limits::default()
    };
    let relay = Relay::start_limited(&dir.path().join("a"), limits.clone(), |_| {}).await;
    let mut a = dial(&relay, Some("10.0.0.1")).await.expect("first");
    let _b = dial(&relay, Some("10.0.0.2")).await.expect("second");
    assert_eq!(
        dial(&relay, Some("10.0.0.3")).await.err(),
        Some(429),
        "per address"
    );
    handshake(&mut a, "a").await;
    relay.stop().await;

    // Behind a trusted proxy, its X-Forwarded-For names the address; the
    // total still holds.
    let trusted = Limits {
        trusted_proxies: vec!["127.0.0.1".parse().expect("ip")],
        ..limits
    };
    let relay = Relay::start_limited(&dir.path().join("b"), trusted, |_| {}).await;
    let mut a = dial(&relay, Some("10.0.0.1")).await.expect("first");
    let _b = dial(&relay, Some("10.0.0.1"))
        .await
        .expect("second from the same");
    assert_eq!(
        dial(&relay, Some("10.0.0.1")).await.err(),
        Some(429),
        "per address"
    );
    let mut c = dial(&relay, Some("10.0.0.2"))
        .await
        .expect("another address");
    assert_eq!(
        dial(&relay, Some("10.0.0.3")).await.err(),
        Some(503),
        "in total"
    );
    handshake(&mut a, "a").await;
    handshake(&mut c, "c").await;
    drop(c);
    // A freed place is taken again.
    let mut d = wait::until("a closed connection frees its place", || async {
        dial(&relay, Some("10.0.0.4")).await.ok()
    })
    .await;
    handshake(&mut d, "d").await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_opening_connections_too_fast_is_slowed_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        new_connections_per_ip_per_sec: 2.0,
        trusted_proxies: vec!["127.0.0.1".parse().expect("ip")],
        ..Limits::default()
    };
    let relay = Relay::start_limited(dir.path(), limits, |_| {}).await;
    let mut first = dial(&relay, Some("10.1.1.1")).await.expect("first");
    let _second = dial(&relay, Some("10.1.1.1")).await.expect("second");
    assert_eq!(dial(&relay, Some("10.1.1.1")).await.err(), Some(429));
    // Other addresses are not held back, and open connections are served.
    let mut other = dial(&relay, Some("10.2.2.2"))
        .await
        .expect("another address");
    handshake(&mut other, "other").await;
    handshake(&mut first, "first").await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_sending_too_fast_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        messages_per_sec: 10.0,
        ..Limits::default()
    };
    let relay = Relay::start_limited(dir.path(), limits, |_| {}).await;
    let mut flood = dial(&relay, None).await.expect("upgrade");
    handshake(&mut flood, "flood").await;
    // The burst is ten seconds' worth (100 messages): 300 at once is over.
    for _ in 0..300 {
        if flood.send(join("flood")).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut flood).await, 1008);
    still_serves(&relay).await;
    relay.stop().await;
}

/// Bytes per second: with 16 KiB messages allowed and 4 KiB/s, the burst
/// holds one largest message; two 12 KiB messages at once are too much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_sending_too_many_bytes_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        bytes_per_sec: 4096.0,
        ..Limits::default()
    };
    let relay = Relay::start_limited_messages(dir.path(), limits, 16 * 1024).await;
    let mut heavy = dial(&relay, None).await.expect("upgrade");
    handshake(&mut heavy, "heavy").await;
    for count in 1..=3u64 {
        let message = Message::Ephemeral(converge_core::wire::EphemeralMessage {
            sender_id: PeerId::new("heavy").expect("valid"),
            target_id: relay.repo.peer_id().clone(),
            document_id: DocumentId::from_random([5; 16]),
            count,
            session_id: converge_core::wire::SessionId::new("s1").expect("valid"),
            data: vec![0xa0; 12 * 1024],
        });
        if heavy
            .send(WsMessage::Binary(wire::encode(&message).into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(close_code(&mut heavy).await, 1008);
    still_serves(&relay).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_asking_for_too_many_documents_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start_limited(dir.path(), Limits::default(), |e| {
        e.max_docs_per_connection = 2;
    })
    .await;
    let mut greedy = dial(&relay, None).await.expect("upgrade");
    handshake(&mut greedy, "greedy").await;
    let sync = converge_core::engine::validate::empty_sync_message();
    let relay_peer = relay.repo.peer_id().clone();
    for n in 0..3u8 {
        let request = Message::Request(DocMessage {
            sender_id: PeerId::new("greedy").expect("valid"),
            target_id: relay_peer.clone(),
            document_id: DocumentId::from_random([n + 1; 16]),
            data: sync.clone(),
        });
        let _ = greedy
            .send(WsMessage::Binary(wire::encode(&request).into()))
            .await;
    }
    assert_eq!(close_code(&mut greedy).await, 1008);
    still_serves(&relay).await;
    relay.stop().await;
}

/// A change over the change limit, or one taking a document past the
/// document limit, is not applied and closes the writer's connection
/// (1002 and 1009); the relay keeps the document as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_and_documents_past_their_size_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, limit) in [("change", 0), ("document", 1)] {
        let relay = Relay::start_limited(&dir.path().join(name), Limits::default(), |e| {
            if limit == 0 {
                e.limits.max_change_bytes = 4096;
            } else {
                e.max_doc_bytes = 4096;
            }
        })
        .await;
        let client = rust_client();
        let _link = ws::connect(client.clone(), relay.url.clone());
        wait::connected(&client, 1).await;
        let doc = client.create(None).await.expect("create");
        put(&doc, "small", "ok").await;
        let on_relay = wait::until("the small document reaches the relay", || async {
            relay.repo.find(doc.id()).await.ok()
        })
        .await;
        doc.saved().await.expect("saved");
        let mut events = relay.repo.events();
        // Random, so Automerge's compression cannot shrink it under the
        // limits: about 20 KB however it is stored.
        let big: String = (0..20_000)
            .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
            .collect();
        doc.change(move |d| {
            let mut tx = d.transaction();
            tx.put(ROOT, "big", big.as_str()).expect("put");
            tx.commit();
        })
        .await
        .expect("change");
        let client_peer = client.peer_id().clone();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match events.recv().await {
                    Ok(Event::PeerDisconnected { peer_id, .. }) if peer_id == client_peer => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(e) => panic!("relay events ended: {e}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name} limit: the writer was not disconnected"));
        let json = on_relay
            .with_doc(|d| serde_json::to_value(automerge::AutoSerde::from(d)).unwrap_or_default())
            .await
            .expect("alive")
            .unwrap_or_default();
        assert_eq!(
            json.get("small"),
            Some(&serde_json::json!("ok")),
            "{name}: {json}"
        );
        assert!(
            json.get("big").is_none(),
            "{name} limit: the big change was applied"
        );
        still_serves(&relay).await;
        relay.stop().await;
    }
}

/// HTTP API requests over an address's rate get 429 with `Retry-After`
/// and the API's JSON error; another address (named by a trusted proxy),
/// the health check and WebSocket clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_limited_per_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        // Two seconds' worth in a burst: two requests, then one a second.
        http_requests_per_ip_per_sec: 1.0,
        trusted_proxies: vec!["127.0.0.1".parse().expect("ip")],
        ..Limits::default()
    };
    let relay = Relay::start_limited(dir.path(), limits, |_| {}).await;
    let addr = relay.url.trim_start_matches("ws://").to_owned();
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (status, body) = http_with(&addr, "GET", "/v1/sessions", &from("10.0.0.1"), None).await;
        statuses.push(status);
        if status == 429 {
            assert_eq!(body["error"]["code"], "limit", "{body}");
        }
    }
    // (A request may refill a fraction of a token; three in a row from one
    // address cannot all pass at one a second with a burst of two.)
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    let head = raw_head(&addr, "/v1/sessions", "10.0.0.1").await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let (status, _) = http_with(&addr, "GET", "/v1/sessions", &from("10.0.0.2"), None).await;
    assert_eq!(status, 200, "another address is served");
    let (status, _) = http_with(&addr, "GET", "/healthz", &from("10.0.0.1"), None).await;
    assert_eq!(status, 200, "the health check is not counted");
    still_serves(&relay).await;
    relay.stop().await;
}

/// The status line and headers of a GET forwarded for `xff`.
async fn raw_head(addr: &str, path: &str, xff: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}
