//! The relay over real sockets, against the real automerge-repo 2.5 npm
//! packages (scripts in `tests/js/`, run with Node).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::ROOT;
use converge_core::engine::{Event, RelayPolicy, ReplicaKind};

/// Both ways a relay can hold documents; the interop scenarios run on each.
const BOTH: [ReplicaKind; 2] = [ReplicaKind::FullDocument, ReplicaKind::ChangeLog];
use converge_core::runtime::{load_or_create_storage_id, Repo, RepoConfig};
use converge_core::storage::{MemoryStorage, RocksStorage};
use converge_core::transport::ws;
use converge_core::wire::{self, DocumentId, Message, PeerId};
use converge_server::server::{serve, AppState};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::wait;

/// A relay running in this process on a random port.
pub(crate) struct Relay {
    pub(crate) url: String,
    /// The relay's repo (sessions, inspection).
    pub(crate) repo: Repo,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay as `converge-server` runs by default (change-log replicas).
    pub(crate) async fn start(dir: &Path) -> Relay {
        Self::start_with(dir, 64 << 20, ReplicaKind::ChangeLog, None).await
    }

    /// A relay holding documents as `replica`.
    pub(crate) async fn start_kind(dir: &Path, replica: ReplicaKind) -> Relay {
        Self::start_with(dir, 64 << 20, replica, None).await
    }

    async fn start_with(
        dir: &Path,
        max_message_bytes: usize,
        replica: ReplicaKind,
        outbound: Option<(usize, Duration)>,
    ) -> Relay {
        let setup = Setup {
            max_message_bytes,
            replica,
            outbound,
            ..Setup::default()
        };
        Self::start_full(dir, setup).await
    }

    /// A relay checking tokens as `auth` says.
    pub(crate) async fn start_auth(dir: &Path, auth: converge_server::auth::AuthSettings) -> Relay {
        let setup = Setup {
            auth,
            ..Setup::default()
        };
        Self::start_full(dir, setup).await
    }

    /// A relay with these connection limits, and its engine configured by
    /// `engine`.
    pub(crate) async fn start_limited(
        dir: &Path,
        limits: converge_server::limits::Limits,
        engine: impl FnOnce(&mut converge_core::engine::EngineConfig),
    ) -> Relay {
        let mut setup = Setup {
            limits,
            ..Setup::default()
        };
        engine(&mut setup.engine);
        Self::start_full(dir, setup).await
    }

    /// A relay serving TLS with `tls`, allowing `origins` (empty: any);
    /// its `url` is `wss://…`.
    pub(crate) async fn start_tls(
        dir: &Path,
        tls: Option<tokio_rustls::TlsAcceptor>,
        origins: Vec<String>,
    ) -> Relay {
        let setup = Setup {
            tls,
            origins,
            ..Setup::default()
        };
        Self::start_full(dir, setup).await
    }

    /// [`Relay::start_limited`] with a message size limit.
    pub(crate) async fn start_limited_messages(
        dir: &Path,
        limits: converge_server::limits::Limits,
        max_message_bytes: usize,
    ) -> Relay {
        let setup = Setup {
            limits,
            max_message_bytes,
            ..Setup::default()
        };
        Self::start_full(dir, setup).await
    }

    async fn start_full(dir: &Path, setup: Setup) -> Relay {
        let Setup {
            max_message_bytes,
            replica,
            outbound,
            auth,
            limits,
            engine,
            origins,
            tls,
        } = setup;
        // A previous relay on this directory may still be letting go of it
        // (its connection tasks end asynchronously); wait for the lock.
        let storage = wait::until(
            &format!("the last relay on {} lets go of its store", dir.display()),
            || async {
                match RocksStorage::open(dir, false) {
                    Ok(s) => Some(Arc::new(s)),
                    Err(e) if e.to_string().contains("lock") => None,
                    Err(e) => panic!("open rocksdb: {e}"),
                }
            },
        )
        .await;
        let storage_id = load_or_create_storage_id(storage.as_ref()).expect("storage id");
        let mut config = RepoConfig::new(Some(storage_id));
        config.engine.handshake_timeout = engine.handshake_timeout;
        config.engine.max_docs_per_connection = engine.max_docs_per_connection;
        config.engine.max_doc_bytes = engine.max_doc_bytes;
        config.engine.limits = engine.limits;
        config.engine.policy = Arc::new(RelayPolicy);
        config.engine.max_message_bytes = max_message_bytes;
        config.engine.replica = replica.factory();
        if let Some((limit, grace)) = outbound {
            config.max_outbound_bytes = limit;
            config.outbound_grace = grace;
        }
        let repo = Repo::start(config, storage.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let url = format!("{scheme}://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let state = AppState {
            repo: repo.clone(),
            max_message_bytes,
            ping_interval: Duration::from_secs(5),
            storage: storage.clone(),
            auth: Arc::new(
                converge_server::auth::Auth::open(&auth, storage.clone()).expect("auth settings"),
            ),
            gate: converge_server::limits::Gate::new(limits),
            allowed_origins: Arc::new(origins),
        };
        let relay_repo = repo.clone();
        let done = tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            let _ = match tls {
                Some(acceptor) => {
                    converge_server::server::serve_tls(listener, acceptor, state, stopped).await
                }
                None => serve(listener, state, stopped).await,
            };
            repo.shutdown().await;
            let _ = storage.flush();
        });
        Relay {
            url,
            repo: relay_repo,
            stop: Some(stop),
            done,
        }
    }

    /// Graceful shutdown, as on SIGTERM.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.done).await;
    }
}

/// How a test relay is set up.
struct Setup {
    max_message_bytes: usize,
    replica: ReplicaKind,
    outbound: Option<(usize, Duration)>,
    auth: converge_server::auth::AuthSettings,
    limits: converge_server::limits::Limits,
    /// Browser origins allowed (empty: any).
    origins: Vec<String>,
    /// Serve TLS with this acceptor.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Only the limits are taken from it (handshake timeout, documents
    /// per connection, document and change size).
    engine: converge_core::engine::EngineConfig,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            max_message_bytes: 64 << 20,
            replica: ReplicaKind::ChangeLog,
            outbound: None,
            auth: Default::default(),
            limits: Default::default(),
            origins: Vec::new(),
            tls: None,
            engine: converge_core::engine::EngineConfig::new(
                converge_core::wire::PeerId::new("unused").expect("a peer id"),
                None,
                0,
            ),
        }
    }
}

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

fn node_command(script: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(js_dir().join(script))
        .args(args)
        .env("INTEROP_QUIET", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs a script to completion; returns its JSON result or panics with
/// its stderr.
pub(crate) async fn node(script: &str, args: &[&str]) -> Value {
    let out = node_command(script, args)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{script}: bad output {line:?}: {e}"))
}

/// A Node script running beside the test, which can wait for the
/// `interop-event {...}` lines the script writes to stderr at the moments
/// the harness may need to know about.
struct Script {
    name: String,
    child: tokio::process::Child,
    events: tokio::sync::mpsc::UnboundedReceiver<Value>,
    stderr: tokio::task::JoinHandle<String>,
}

impl Script {
    fn spawn(script: &str, args: &[&str]) -> Script {
        // Named by the script and its words (not its URLs).
        let words = args.iter().filter(|a| !a.contains(':'));
        let name = std::iter::once(&script)
            .chain(words)
            .copied()
            .collect::<Vec<_>>();
        let name = name.join(" ");
        let mut child = node_command(script, args).spawn().expect("spawn node");
        let err = child.stderr.take().expect("stderr is piped");
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let stderr = tokio::spawn(async move {
            let mut all = String::new();
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(json) = line.strip_prefix("interop-event ") {
                    if let Ok(event) = serde_json::from_str::<Value>(json) {
                        let _ = tx.send(event);
                    }
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        Script {
            name,
            child,
            events,
            stderr,
        }
    }

    /// Waits for the script to report `event`; returns its fields.
    async fn event(&mut self, event: &str) -> Value {
        let name = &self.name;
        tokio::time::timeout(Duration::from_secs(40), async {
            loop {
                match self.events.recv().await {
                    Some(e) if e["event"] == event => return e,
                    Some(_) => continue,
                    None => panic!("{name} ended without reporting {event}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name} did not report {event} within 40 s"))
    }

    /// Waits for the script to end; returns its JSON result or panics with
    /// its output.
    async fn finish(self) -> Value {
        let Script {
            name,
            child,
            stderr,
            ..
        } = self;
        let out = tokio::time::timeout(Duration::from_secs(40), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{name} did not finish within 40 s"))
            .expect("script runs");
        let stderr = stderr.await.unwrap_or_default();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
            out.status,
        );
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("json result")
    }
}

pub(crate) fn rust_client() -> Repo {
    Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()))
}

/// Sets a string in the document's root map, through the repo.
pub(crate) async fn put(
    handle: &converge_core::runtime::DocHandle,
    key: &'static str,
    value: &'static str,
) {
    handle
        .change(move |d| {
            let mut tx = d.transaction();
            tx.put(ROOT, key, value).expect("put");
            tx.commit();
        })
        .await
        .expect("change");
}

fn doc_id(url: &str) -> DocumentId {
    url.parse().expect("automerge URL")
}

/// Finds a document, retrying while the connection comes up.
async fn find_with_retry(repo: &Repo, id: &DocumentId) -> converge_core::runtime::DocHandle {
    wait::until(&format!("document {id} becomes available"), || async {
        repo.find(id).await.ok()
    })
    .await
}

/// Waits until `doc[key]` reads as the string `value` (JS writes strings
/// as collaborative text, Rust as scalars; the JSON view shows both alike).
async fn wait_until(
    handle: &converge_core::runtime::DocHandle,
    what: &str,
    key: &str,
    value: &str,
) {
    wait::until(&format!("{what}: {key} becomes {value}"), || async {
        let json = handle
            .with_doc(|d| serde_json::to_value(automerge::AutoSerde::from(d)).unwrap_or_default())
            .await
            .expect("repo alive")
            .unwrap_or_default();
        (json[key] == value).then_some(())
    })
    .await
}

/// (a) Two unmodified automerge-repo clients sync a document through the
/// Converge relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_js_clients_sync_through_the_relay() {
    for kind in BOTH {
        let dir = tempfile::tempdir().expect("tempdir");
        let relay = Relay::start_kind(dir.path(), kind).await;
        let result = node("interop-two-clients.mjs", &[&relay.url]).await;
        assert_eq!(result["doc"]["n"], 2, "{} relay", kind.name());
        relay.stop().await;
    }
}

/// (b) A document created by JS survives a relay restart and a new JS
/// client finds it. (f) Unknown documents are reported unavailable, and
/// one that arrives later reaches the client that asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_survive_restarts_and_unknown_ones_arrive_later() {
    for kind in BOTH {
        documents_survive_restarts_with(kind).await;
    }
}

async fn documents_survive_restarts_with(kind: ReplicaKind) {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start_kind(dir.path(), kind).await;
    let created = node("interop-create.mjs", &[&relay.url]).await;
    let url = created["url"].as_str().expect("url").to_owned();
    relay.stop().await;

    let relay = Relay::start_kind(dir.path(), kind).await;
    let expected = dir.path().join("expected.json");
    std::fs::write(&expected, created["doc"].to_string()).expect("write expected");
    let found = node(
        "interop-find.mjs",
        &[&relay.url, &url, expected.to_str().expect("utf8")],
    )
    .await;
    assert_eq!(found["ok"], true);

    let unavailable = node("interop-unavailable.mjs", &[&relay.url]).await;
    assert_eq!(unavailable["unavailable"], true);

    // A client asks for a document that does not exist yet...
    let later_url = DocumentId::from_random([9; 16]).url().to_string();
    let mut waiter = Script::spawn(
        "interop-unavailable.mjs",
        &[&relay.url, "later", &later_url],
    );
    // ...is told it is unavailable...
    waiter.event("unavailable").await;
    // ...then another client creates it under that id.
    node("interop-create.mjs", &[&relay.url, &later_url]).await;
    let arrived = waiter.finish().await;
    assert_eq!(arrived["arrivedLater"], true);
    relay.stop().await;
}

/// (c) A JS client and a Converge Rust client edit one document at the
/// same time through the relay and end up with both edits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_and_rust_clients_edit_concurrently() {
    for kind in BOTH {
        js_and_rust_clients_edit_concurrently_with(kind).await;
    }
}

async fn js_and_rust_clients_edit_concurrently_with(kind: ReplicaKind) {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start_kind(dir.path(), kind).await;
    let created = node("interop-create.mjs", &[&relay.url]).await;
    let url = created["url"].as_str().expect("url").to_owned();

    let js = Script::spawn(
        "interop-edit.mjs",
        &[&relay.url, &url, "js", "fromjs", "rust", "fromrust"],
    );
    let rust = rust_client();
    let _conn = ws::connect(rust.clone(), relay.url.clone());
    let handle = find_with_retry(&rust, &doc_id(&url)).await;
    put(&handle, "rust", "fromrust").await;
    wait_until(&handle, "rust client", "js", "fromjs").await;
    let js_result = js.finish().await;
    assert_eq!(js_result["doc"]["rust"], "fromrust");
    assert_eq!(js_result["doc"]["js"], "fromjs");
    relay.stop().await;
}

/// (d) A Converge Rust client syncs through the reference Node server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_syncs_through_the_reference_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = node_command(
        "reference-server.mjs",
        &["0", dir.path().to_str().expect("utf8")],
    )
    .spawn()
    .expect("spawn reference server");
    let stdout = server.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready: Value = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("server starts")
            .expect("read")
            .expect("a line");
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["ready"] == true {
                break v;
            }
        }
    };
    let url = format!("ws://127.0.0.1:{}", ready["port"]);

    let rust = rust_client();
    let _conn = ws::connect(rust.clone(), url.clone());
    let mut events = rust.events();
    // Wait for the handshake with the reference server.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::PeerConnected { .. }) = events.recv().await {
                break;
            }
        }
    })
    .await
    .expect("connected to the reference server");
    let handle = rust.create(None).await.expect("create");
    put(&handle, "from", "rust").await;
    let expected = dir.path().join("expected.json");
    std::fs::write(&expected, r#"{"from":"rust"}"#).expect("write");
    let found = node(
        "interop-find.mjs",
        &[&url, &handle.url(), expected.to_str().expect("utf8")],
    )
    .await;
    assert_eq!(found["ok"], true);

    // And the other way: a JS edit reaches the Rust client.
    let edited = node(
        "interop-edit.mjs",
        &[&url, &handle.url(), "from_js", "yes", "-"],
    )
    .await;
    assert_eq!(edited["ok"], true);
    wait_until(&handle, "rust client", "from_js", "yes").await;
    let _ = server.start_kill();
}

/// (e) Ephemeral messages pass between JS clients through the relay and
/// from a Rust client to a JS client, with sender, count and session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_messages_pass_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path()).await;
    let both = node("interop-ephemeral.mjs", &[&relay.url, "new", "both"]).await;
    assert_eq!(both["senderId"], both["aPeerId"]);
    assert_eq!(both["sessionId"], both["aSessionId"]);

    let created = node("interop-create.mjs", &[&relay.url]).await;
    let url = created["url"].as_str().expect("url").to_owned();
    let receiver = Script::spawn("interop-ephemeral.mjs", &[&relay.url, &url, "receive"]);
    let rust = rust_client();
    let _conn = ws::connect(rust.clone(), relay.url.clone());
    let handle = find_with_retry(&rust, &doc_id(&url)).await;
    // automerge-repo puts CBOR in `data`; send a small CBOR map.
    let payload = vec![
        0xa1, 0x65, b'h', b'e', b'l', b'l', b'o', 0x64, b'r', b'u', b's', b't',
    ];
    let received = tokio::spawn(receiver.finish());
    // Ephemeral messages are not kept: send until the receiver (which may
    // still be finding the document) has one.
    wait::until_every(
        "the JS client receives an ephemeral message",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            handle.broadcast(payload.clone()).await.expect("broadcast");
            received.is_finished().then_some(())
        },
    )
    .await;
    let got = received.await.expect("join");
    assert_eq!(got["senderId"], rust.peer_id().as_str());
    assert_eq!(got["message"]["hello"], "rust");
    assert!(got["count"].as_u64().is_some_and(|c| c >= 1));
    assert!(got["sessionId"].is_string());
    relay.stop().await;
}

/// Every malformed frame closes only its own connection; a well-behaved
/// client on the same relay keeps syncing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start_with(dir.path(), 64 * 1024, ReplicaKind::ChangeLog, None).await;

    let good = rust_client();
    let _good_conn = ws::connect(good.clone(), relay.url.clone());
    let other = rust_client();
    let _other_conn = ws::connect(other.clone(), relay.url.clone());
    wait::connected(&good, 1).await;
    wait::connected(&other, 1).await;
    let handle = good.create(None).await.expect("create");
    let id = handle.id().clone();

    let join = wire::encode(&Message::Join {
        sender_id: PeerId::new("mallory").expect("valid"),
        metadata: None,
        supported_protocol_versions: Some(vec!["1".into()]),
    });
    let cases: Vec<(&str, Vec<WsMessage>, Option<u16>)> = vec![
        (
            "text frame",
            vec![WsMessage::Text("{\"type\":\"join\"}".into())],
            Some(1003),
        ),
        (
            "not CBOR",
            vec![WsMessage::Binary(vec![0xff, 0x00, 0x13].into())],
            Some(1002),
        ),
        (
            "empty frame",
            vec![WsMessage::Binary(Vec::new().into())],
            Some(1002),
        ),
        (
            "missing fields",
            vec![WsMessage::Binary(
                vec![
                    0xa1, 0x64, b't', b'y', b'p', b'e', 0x64, b's', b'y', b'n', b'c',
                ]
                .into(),
            )],
            Some(1002),
        ),
        (
            "message before join",
            vec![WsMessage::Binary(
                wire::encode(&Message::Leave {
                    sender_id: PeerId::new("m").expect("valid"),
                })
                .into(),
            )],
            Some(1002),
        ),
        (
            "oversized",
            vec![
                WsMessage::Binary(join.clone().into()),
                WsMessage::Binary(vec![0u8; 100 * 1024].into()),
            ],
            Some(1009),
        ),
    ];
    for (what, frames, code) in cases {
        let (mut socket, _) = tokio_tungstenite::connect_async(&relay.url)
            .await
            .expect("connect");
        for f in frames {
            let _ = socket.send(f).await;
        }
        let closed = super::sockets::closed_with(&mut socket).await;
        assert_eq!(closed, code, "{what}: close code");
    }

    // The well-behaved clients never noticed.
    let seen = find_with_retry(&other, &id).await;
    put(&handle, "still", "working").await;
    wait_until(&seen, "other client", "still", "working").await;
    relay.stop().await;
}

/// A peer that asks for a document and then stops reading is cut off once
/// more than the outbound limit has waited for it too long (instead of the
/// relay holding everything sent its way), while a peer that reads along
/// the same burst — far over the limit in total — stays, and everyone
/// carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_cut_off_and_others_carry_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start_with(
        dir.path(),
        64 << 20,
        ReplicaKind::ChangeLog,
        Some((1 << 20, Duration::from_secs(1))),
    )
    .await;
    let writer = rust_client();
    let _writer_conn = ws::connect(writer.clone(), relay.url.clone());
    let reader = rust_client();
    let _reader_conn = ws::connect(reader.clone(), relay.url.clone());
    wait::connected(&writer, 1).await;
    wait::connected(&reader, 1).await;
    let handle = writer.create(None).await.expect("create");
    let id = handle.id().clone();
    let seen = find_with_retry(&reader, &id).await;

    // The slow peer joins, asks for the document, then reads no more.
    let (mut slow, _) = tokio_tungstenite::connect_async(&relay.url)
        .await
        .expect("connect");
    let me = PeerId::new("slowpoke").expect("valid");
    let join = Message::Join {
        sender_id: me.clone(),
        metadata: None,
        supported_protocol_versions: Some(vec!["1".into()]),
    };
    slow.send(WsMessage::Binary(wire::encode(&join).into()))
        .await
        .expect("join");
    let relay_id = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), slow.next())
            .await
            .expect("an answer to join")
            .expect("open")
            .expect("frame");
        if let WsMessage::Binary(bytes) = frame {
            if let Ok(Message::Peer { sender_id, .. }) = wire::decode(&bytes) {
                break sender_id;
            }
        }
    };
    let hello = automerge::sync::SyncDoc::generate_sync_message(
        &automerge::Automerge::new(),
        &mut automerge::sync::State::new(),
    )
    .expect("a first message");
    let ask = Message::Request(wire::DocMessage {
        sender_id: me,
        target_id: relay_id,
        document_id: id.clone(),
        data: hello.encode(),
    });
    slow.send(WsMessage::Binary(wire::encode(&ask).into()))
        .await
        .expect("request");
    let slow_is_on = |sessions: Vec<converge_core::runtime::Session>| {
        sessions.iter().any(|s| s.peer_id.to_string() == "slowpoke")
    };
    assert!(slow_is_on(relay.repo.sessions().await.expect("sessions")));

    // Far more than socket buffers hold, in changes the relay forwards.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..400 {
        let text: String = (0..64 * 1024)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'a' + (seed % 26) as u8)
            })
            .collect();
        handle
            .change(move |d| {
                let mut tx = d.transaction();
                tx.put(ROOT, format!("k{}", i % 8), text).expect("put");
                tx.commit();
            })
            .await
            .expect("change");
    }

    // The relay let go of it (well within the 30 s a single stuck write
    // may take)...
    wait::until_every(
        "the relay lets go of the peer that stopped reading",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { (!slow_is_on(relay.repo.sessions().await.expect("sessions"))).then_some(()) },
    )
    .await;
    // ...and reading now, the slow peer finds its connection ended rather
    // than every frame still waiting for it.
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match slow.next().await {
                Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| f.reason.to_string()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the slow peer was never cut off");
    if let Some(reason) = ended {
        assert!(reason.contains("too slowly"), "{reason}");
    }

    // The reader took the whole burst and is still connected.
    let sessions = relay.repo.sessions().await.expect("sessions");
    assert!(
        sessions.iter().any(|s| s.peer_id == *reader.peer_id()),
        "a peer that keeps reading was cut off"
    );
    put(&handle, "after", "still served").await;
    wait_until(&seen, "reader", "after", "still served").await;
    relay.stop().await;
}

/// Presence between a Converge Rust client and an unmodified automerge-repo
/// client through the relay: each sees the other's state and updates, and
/// each notices the other leave when it goes silent (time-to-live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_between_rust_and_js_clients() {
    use converge_core::runtime::{Presence, PresenceConfig, PresenceEvent};
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path()).await;
    let fast = PresenceConfig {
        heartbeat: Duration::from_millis(300),
        ttl: Duration::from_millis(2000),
    };

    let rust = rust_client();
    let _conn = ws::connect(rust.clone(), relay.url.clone());
    let observer = rust_client();
    let _conn2 = ws::connect(observer.clone(), relay.url.clone());
    wait::connected(&rust, 1).await;
    wait::connected(&observer, 1).await;
    let doc = rust.create(None).await.expect("create");
    let url = doc.url();
    let observed = find_with_retry(&observer, doc.id()).await;
    let watcher = Presence::start(observed, serde_json::json!({"name": "observer"}), fast)
        .await
        .expect("observer presence");
    let mut watched = watcher.events();
    let me = Presence::start(doc.clone(), serde_json::json!({"name": "rust"}), fast)
        .await
        .expect("rust presence");
    let mut mine = me.events();

    let mut js = Script::spawn(
        "interop-presence.mjs",
        &[&relay.url, &url, rust.peer_id().as_str()],
    );

    // The JS peer appears with its state, then moves its cursor.
    let js_peer = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(PresenceEvent::Joined { peer, state }) = mine.recv().await {
                if state.get("name") == Some(&serde_json::json!("js")) {
                    return peer;
                }
            }
        }
    })
    .await
    .expect("the JS client's presence arrives");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(PresenceEvent::Updated { peer, state }) = mine.recv().await {
                if peer == js_peer && state.get("cursor") == Some(&serde_json::json!({"line": 3})) {
                    return;
                }
            }
        }
    })
    .await
    .expect("the JS cursor update arrives");
    me.set("cursor", serde_json::json!({"line": 7}))
        .await
        .expect("set");
    // Once the JS side has our cursor, go silent: no goodbye; the JS side
    // must time us out.
    js.event("saw-cursor").await;
    drop(me);
    let result = js.finish().await;
    assert_eq!(result["sawState"]["name"], "rust");
    assert_eq!(result["cursor"], serde_json::json!({"line": 7}));
    // The JS client exited without a goodbye; our observer times it out.
    let left = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(PresenceEvent::Left { peer, goodbye }) = watched.recv().await {
                if peer == js_peer {
                    return goodbye;
                }
            }
        }
    })
    .await
    .expect("the JS client times out");
    assert!(
        !left,
        "no goodbye was sent, so this must be the time-to-live"
    );
    relay.stop().await;
}

/// The Kotlin binding's `waitSynced` scenario, many times over real
/// sockets: connect, create a document, edit it twice at once, and wait
/// until the relay has acknowledged our heads. (Before the fix tested
/// deterministically by `a_batched_relay_still_acknowledges_every_change`,
/// about one round in 500 waited for the 15 s resync timer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_edits_are_acknowledged_by_the_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path()).await;
    for round in 0..300u32 {
        let client = rust_client();
        let _conn = ws::connect(client.clone(), relay.url.clone());
        if round % 3 == 1 {
            // Sometimes let the connection come up first.
            tokio::time::sleep(Duration::from_millis(u64::from(round % 7))).await;
        }
        let handle = client.create(None).await.expect("create");
        put(&handle, "v", "0").await;
        put(&handle, "v", "1").await;
        let synced = handle
            .wait_synced(Duration::from_secs(10))
            .await
            .expect("alive")
            .expect("in memory");
        if !synced {
            let ours = handle.sync_status().await.expect("alive");
            let relays = relay.repo.handle(handle.id().clone()).sync_status().await;
            panic!("round {round}: not acknowledged: {ours:?}\nthe relay: {relays:?}");
        }
        client.shutdown().await;
    }
    relay.stop().await;
}
