//! A relay that checks tokens, over real sockets: the authorization
//! matrix (every bad token refused before the upgrade), documents a token
//! may not read (unavailable, not a byte of them sent), read-only peers
//! (their changes never stored nor forwarded), expiry and revocation mid
//! session (close codes 4401 and 4403), and the HTTP API's 401/403/404.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use converge_core::engine::Access;
use converge_core::runtime::RepoError;
use converge_core::transport::ws;
use converge_core::wire::{
    self, DocMessage, DocumentId, EphemeralMessage, Message, PeerId, SessionId,
};
use converge_server::auth::{mint_hs256, AuthSettings, Claims, Rights};
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::http::http_with;
use super::relay::{node, put, rust_client, Relay};
use super::sockets::{close_code, handshake, Socket};
use super::wait;

const SECRET: &[u8] = b"a test secret of more than 32 bytes, honest";
/// Content of the protected document: must never reach a client that may
/// not read it.
const CONTENT: &str = "classified-7f3a";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn claims(sub: &str, docs: &[(&str, Access)]) -> Claims {
    Claims {
        sub: Some(sub.into()),
        exp: now() + 600,
        iat: Some(now() - 1),
        converge: Rights {
            docs: docs.iter().map(|(k, a)| ((*k).to_owned(), *a)).collect(),
            ..Rights::default()
        },
        ..Claims::default()
    }
}

fn token(c: &Claims) -> String {
    mint_hs256(SECRET, c).expect("mint")
}

/// An admin token (with the audience the matrix relay requires; relays
/// without one ignore it).
fn admin() -> String {
    token(&Claims {
        aud: Some("converge-test".into()),
        converge: Rights {
            admin: true,
            ..Rights::default()
        },
        ..claims("root", &[])
    })
}

/// An Ed25519 key pair: (PKCS#8 DER of the private key, PEM of the public).
fn ed25519() -> (Vec<u8>, String) {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("generate");
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("parse");
    // SubjectPublicKeyInfo for Ed25519: a fixed prefix, then the 32 bytes.
    let mut spki = hex::decode("302a300506032b6570032100").expect("hex");
    spki.extend_from_slice(pair.public_key().as_ref());
    let b64 = base64::engine::general_purpose::STANDARD.encode(spki);
    let pem = format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n");
    (pkcs8.as_ref().to_vec(), pem)
}

/// A relay on `dir` with the shared secret and an Ed25519 key `ed`;
/// returns it and the Ed25519 private key.
async fn relay(dir: &Path, audience: Option<&str>) -> (Relay, Vec<u8>, String) {
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let (private, public) = ed25519();
    let public_file = dir.join("ed.pem");
    std::fs::write(&public_file, &public).expect("public key");
    let settings = AuthSettings {
        secret_file: Some(secret),
        public_keys: vec![format!("ed={}", public_file.display())],
        audience: audience.map(str::to_owned),
        ..AuthSettings::default()
    };
    let relay = Relay::start_auth(&dir.join("db"), settings).await;
    (relay, private, public)
}

fn addr(relay: &Relay) -> String {
    relay.url.trim_start_matches("ws://").to_owned()
}

/// One HTTP request with an optional bearer token.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_with(addr, method, path, &headers, body).await
}

/// Where a WebSocket client puts its token.
#[derive(Clone, Copy, Debug)]
enum Via {
    Query,
    Header,
    Cookie,
}

/// Opens a WebSocket with `token` placed `via`: the socket, or the HTTP
/// status and body the upgrade was refused with.
async fn dial(relay: &Relay, token: Option<&str>, via: Via) -> Result<Socket, (u16, String)> {
    let url = match (token, via) {
        (Some(t), Via::Query) => format!("{}/?token={t}", relay.url),
        _ => relay.url.clone(),
    };
    let mut request = url.into_client_request().expect("request");
    match (token, via) {
        (Some(t), Via::Header) => {
            let v = format!("Bearer {t}").parse().expect("header");
            request.headers_mut().insert("authorization", v);
        }
        (Some(t), Via::Cookie) => {
            let v = format!("converge_token={t}").parse().expect("header");
            request.headers_mut().insert("cookie", v);
        }
        _ => {}
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("dial failed for another reason: {e}"),
    }
}

/// A protected document holding `CONTENT`, created by the admin.
async fn protected(relay: &Relay) -> String {
    let body = format!(r#"{{"secret": "{CONTENT}"}}"#);
    let (status, created) = http(
        &addr(relay),
        "POST",
        "/v1/contexts",
        Some(&admin()),
        Some(&body),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().expect("id").to_owned()
}

/// Every bad token is refused before the upgrade (HTTP 401, no WebSocket,
/// so not a byte of any document), wherever the client puts it; good ones
/// are taken from the query, a header or a cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_a_401_and_no_websocket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (relay, ed_private, ed_public) = relay(dir.path(), Some("converge-test")).await;
    let doc = protected(&relay).await;
    let good = Claims {
        aud: Some("converge-test".into()),
        ..claims("alice", &[(&doc, Access::Read)])
    };
    for via in [Via::Query, Via::Header, Via::Cookie] {
        let socket = dial(&relay, Some(&token(&good)), via).await;
        assert!(
            socket.is_ok(),
            "a good token via {via:?}: {:?}",
            socket.err()
        );
    }
    let mut flipped = token(&good).into_bytes();
    let at = flipped.len() - 5;
    flipped[at] = if flipped[at] == b'x' { b'y' } else { b'x' };
    let flipped = String::from_utf8(flipped).expect("ascii");
    let wrong_key = mint_hs256(b"some other secret, also 32 bytes long", &good).expect("mint");
    let alg_none = format!(
        "{}.{}.",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&good).expect("json"))
    );
    // HS256 "signed" with the Ed25519 public key as the HMAC secret, under
    // the Ed25519 key's id: the classic algorithm confusion.
    let confused = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("ed".into());
        jsonwebtoken::encode(
            &header,
            &good,
            &EncodingKey::from_secret(ed_public.as_bytes()),
        )
        .expect("mint")
    };
    let ed_good = {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("ed".into());
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_ed_der(&ed_private)).expect("mint")
    };
    let ed_unknown_kid = {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("retired".into());
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_ed_der(&ed_private)).expect("mint")
    };
    assert!(
        dial(&relay, Some(&ed_good), Via::Header).await.is_ok(),
        "an Ed25519 token"
    );
    let expired = Claims {
        exp: now() - 3600,
        ..good.clone()
    };
    let early = Claims {
        nbf: Some(now() + 3600),
        ..good.clone()
    };
    let other_audience = Claims {
        aud: Some("another-service".into()),
        ..good.clone()
    };
    let no_audience = Claims {
        aud: None,
        ..good.clone()
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("malformed", Some("not.a.jwt".into())),
        ("one flipped byte", Some(flipped)),
        ("wrong key", Some(wrong_key)),
        ("alg none", Some(alg_none)),
        ("HS256 signed with the public key", Some(confused)),
        ("unknown key id", Some(ed_unknown_kid)),
        ("expired", Some(token(&expired))),
        ("not yet valid", Some(token(&early))),
        ("wrong audience", Some(token(&other_audience))),
        ("no audience", Some(token(&no_audience))),
    ];
    for (what, bad) in cases {
        for via in [Via::Query, Via::Header] {
            match dial(&relay, bad.as_deref(), via).await {
                Ok(_) => panic!("{what} via {via:?} was accepted"),
                Err((status, body)) => {
                    assert_eq!(status, 401, "{what} via {via:?}: {body}");
                    assert!(
                        !body.contains(CONTENT),
                        "{what}: the refusal leaks the document"
                    );
                    if let Some(t) = &bad {
                        assert!(!body.contains(t.as_str()), "{what}: the token is echoed");
                    }
                }
            }
        }
    }
    relay.stop().await;
}

/// With real automerge-repo clients: a token for one document finds it; a
/// token for another document gets `doc-unavailable` and never a byte of
/// the protected one; a reader's change is refused with an `error`
/// message, never stored, never forwarded; the Rust client with a token
/// for another document gets "unavailable" too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_writers_and_strangers_get_exactly_their_rights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (relay, _, _) = relay(dir.path(), None).await;
    let doc = protected(&relay).await;
    let url = format!("automerge:{doc}");
    let other = DocumentId::from_random([7; 16]).to_string();
    let with = |c: &Claims| format!("{}/?token={}", relay.url, token(c));

    // A reader sees it.
    let reader = with(&claims("alice", &[(&doc, Access::Read)]));
    let seen = node("interop-auth.mjs", &[&reader, "read", &url, CONTENT]).await;
    assert_eq!(seen["state"], "ready", "{seen}");
    assert_eq!(seen["doc"]["secret"], CONTENT, "{seen}");

    // A stranger (a token for another document) gets nothing at all.
    let stranger = with(&claims("mallory", &[(&other, Access::Write)]));
    let seen = node("interop-auth.mjs", &[&stranger, "read", &url, CONTENT]).await;
    assert_eq!(seen["state"], "unavailable", "{seen}");
    assert_eq!(
        seen["sawSecret"], false,
        "the stranger received the content: {seen}"
    );

    // A reader's change is refused and goes nowhere.
    let refused = node(
        "interop-auth.mjs",
        &[&reader, "write", &url, CONTENT, "vandal", "was here"],
    )
    .await;
    assert!(
        refused["errors"][0]
            .as_str()
            .is_some_and(|e| e.contains("read-only")),
        "{refused}"
    );
    let writer = with(&claims("bob", &[(&doc, Access::Write)]));
    let seen = node("interop-auth.mjs", &[&writer, "read", &url, CONTENT]).await;
    assert_eq!(seen["state"], "ready", "{seen}");
    assert!(seen["doc"].get("vandal").is_none(), "forwarded: {seen}");
    let id: DocumentId = doc.parse().expect("id");
    let on_relay = relay.repo.find(&id).await.expect("relay has it");
    let json = on_relay
        .with_doc(|d| serde_json::to_value(automerge::AutoSerde::from(d)).unwrap_or_default())
        .await
        .expect("alive")
        .unwrap_or_default();
    assert!(json.get("vandal").is_none(), "the relay applied it: {json}");

    // The Rust client, token in the Authorization header: its own
    // document syncs, the protected one is unavailable.
    let client = rust_client();
    let mine = Claims {
        converge: Rights {
            create: true,
            ..Rights::default()
        },
        ..claims("carol", &[])
    };
    let t = token(&mine);
    let _link = ws::connect_with_token(client.clone(), relay.url.clone(), move || Some(t.clone()));
    let created = client.create(None).await.expect("create");
    put(&created, "owner", "carol").await;
    wait::until("carol's new document reaches the relay", || async {
        relay.repo.find(created.id()).await.ok()
    })
    .await;
    let acl = relay.repo.acl(created.id()).await.expect("acl");
    assert_eq!(acl.owner.as_deref(), Some("carol"), "the creator owns it");
    match client.find(&id).await {
        Err(RepoError::Unavailable(_)) => {}
        other => panic!("carol found the protected document: {other:?}"),
    }
    relay.stop().await;
}

/// A connection whose token expires is closed at that moment with 4401; a
/// revoked user's connections are closed at once with 4403 and its token
/// is refused from then on; an admin grants a user read on a document
/// through the access list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_revocation_close_live_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (relay, _, _) = relay(dir.path(), None).await;
    let short = Claims {
        exp: now() + 2,
        ..claims("dave", &[("*", Access::Read)])
    };
    let mut socket = dial(&relay, Some(&token(&short)), Via::Header)
        .await
        .expect("valid for now");
    assert_eq!(close_code(&mut socket).await, 4401, "expired mid-session");

    let erin = token(&claims("erin", &[("*", Access::Read)]));
    let mut one = dial(&relay, Some(&erin), Via::Query).await.expect("erin");
    let mut two = dial(&relay, Some(&erin), Via::Header)
        .await
        .expect("erin again");
    let other = token(&claims("frank", &[("*", Access::Read)]));
    let mut franks = dial(&relay, Some(&other), Via::Header)
        .await
        .expect("frank");
    let (status, answer) = http(
        &addr(&relay),
        "POST",
        "/v1/admin/revoke",
        Some(&admin()),
        Some(r#"{"sub": "erin"}"#),
    )
    .await;
    assert_eq!((status, &answer["closed"]), (200, &json!(2)), "{answer}");
    assert_eq!(close_code(&mut one).await, 4403);
    assert_eq!(close_code(&mut two).await, 4403);
    let again = dial(&relay, Some(&erin), Via::Header).await;
    assert_eq!(
        again.err().map(|(s, _)| s),
        Some(401),
        "a revoked token is refused"
    );
    // Frank is untouched: his connection still answers.
    franks
        .send(WsMessage::Ping(Vec::new().into()))
        .await
        .expect("frank's connection is open");

    // Access lists: gina's token names no document; the admin gives her
    // read on one, and she can read it over HTTP.
    let doc = protected(&relay).await;
    let gina = token(&claims("gina", &[]));
    let path = format!("/v1/contexts/{doc}");
    let (status, _) = http(&addr(&relay), "GET", &path, Some(&gina), None).await;
    assert_eq!(status, 404, "not on the list: as if it did not exist");
    let (status, acl) = http(
        &addr(&relay),
        "PUT",
        &format!("/v1/admin/contexts/{doc}/access"),
        Some(&admin()),
        Some(r#"{"subject": "gina", "access": "read"}"#),
    )
    .await;
    assert_eq!(status, 200, "{acl}");
    assert_eq!(acl["users"]["gina"], "read");
    let (status, body) = http(&addr(&relay), "GET", &path, Some(&gina), None).await;
    assert_eq!((status, &body["secret"]), (200, &json!(CONTENT)), "{body}");
    let ops = format!("/v1/contexts/{doc}/ops");
    let write = r#"{"ops": [{"op": "set", "path": "/secret", "value": "changed"}]}"#;
    let (status, _) = http(&addr(&relay), "POST", &ops, Some(&gina), Some(write)).await;
    assert_eq!(status, 403, "read is not write");
    relay.stop().await;
}

/// The HTTP API takes the same tokens: 401 without or with a bad one, 404
/// for a context the token may not read, 403 for a right it lacks, and
/// the admin routes only for admins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_checks_the_same_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (relay, _, _) = relay(dir.path(), None).await;
    let a = addr(&relay);
    let doc = protected(&relay).await;
    let read = format!("/v1/contexts/{doc}");
    let reader = token(&claims("alice", &[(&doc, Access::Read)]));
    let stranger = token(&claims("mallory", &[]));
    let writer = token(&claims("bob", &[(&doc, Access::Write)]));
    let root = admin();
    /// method, path, token, body, expected status
    type Case<'a> = (&'a str, String, Option<&'a str>, Option<&'a str>, u16);
    let cases: Vec<Case<'_>> = vec![
        ("GET", read.clone(), None, None, 401),
        ("GET", read.clone(), Some("garbage"), None, 401),
        ("GET", read.clone(), Some(&stranger), None, 404),
        ("GET", read.clone(), Some(&reader), None, 200),
        ("GET", format!("{read}/history"), Some(&reader), None, 200),
        ("GET", format!("{read}/metadata"), Some(&reader), None, 403),
        (
            "POST",
            format!("{read}/ops"),
            Some(&reader),
            Some(r#"{"ops": []}"#),
            403,
        ),
        (
            "POST",
            format!("{read}/ops"),
            Some(&writer),
            Some(r#"{"ops": [{"op": "set", "path": "/n", "value": 1}]}"#),
            200,
        ),
        (
            "POST",
            "/v1/contexts".into(),
            Some(&reader),
            Some("{}"),
            403,
        ),
        ("GET", "/v1/contexts".into(), Some(&reader), None, 403),
        ("GET", "/v1/sessions".into(), Some(&writer), None, 403),
        (
            "POST",
            "/v1/admin/revoke".into(),
            Some(&writer),
            Some(r#"{"sub": "alice"}"#),
            403,
        ),
        ("GET", "/v1/contexts".into(), Some(&root), None, 200),
    ];
    for (method, path, token, body, status) in cases {
        let (got, answer) = http(&a, method, &path, token, body).await;
        assert_eq!(got, status, "{method} {path} with {token:?}: {answer}");
        if status >= 400 {
            assert!(answer["error"]["code"].is_string(), "{answer}");
            assert!(!answer.to_string().contains(CONTENT), "{answer}");
        }
    }
    relay.stop().await;
}

/// Without a key the relay is open (today's behaviour, `make run`); with a
/// key and `--allow-anonymous read`, a request without a token may read
/// but not write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_access_only_when_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = Relay::start(&dir.path().join("open")).await;
    assert!(dial(&open, None, Via::Header).await.is_ok(), "no key: open");
    open.stop().await;

    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let settings = AuthSettings {
        secret_file: Some(secret),
        anonymous: Some(converge_server::auth::Anonymous::Read),
        ..AuthSettings::default()
    };
    let relay = Relay::start_auth(&dir.path().join("db"), settings).await;
    assert!(
        dial(&relay, None, Via::Header).await.is_ok(),
        "anonymous reader"
    );
    let doc = protected(&relay).await;
    let a = addr(&relay);
    let (status, _) = http(&a, "GET", &format!("/v1/contexts/{doc}"), None, None).await;
    assert_eq!(status, 200, "anonymous read");
    let ops = format!("/v1/contexts/{doc}/ops");
    let (status, _) = http(&a, "POST", &ops, None, Some(r#"{"ops": []}"#)).await;
    assert_eq!(status, 403, "anonymous write");
    let (status, _) = http(&a, "GET", "/v1/sessions", Some("bad"), None).await;
    assert_eq!(status, 401, "a bad token is not downgraded to anonymous");
    relay.stop().await;
}

/// Ephemeral messages (presence, cursors) about a document reach only the
/// peers that may read it: over real sockets, a reader gets the writer's,
/// and a stranger that asked for the same document gets none of them.
/// Frames reach one socket in the order the relay handles them, so once
/// the stranger has the writer's next message (about a document it may
/// read), the first would have come before it had it been forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_messages_reach_readers_only_over_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (relay, _, _) = relay(dir.path(), None).await;
    let doc = protected(&relay).await;
    let open = protected(&relay).await;
    let connected = |name: &'static str, docs: Vec<(String, Access)>| {
        let relay = &relay;
        async move {
            let docs: Vec<(&str, Access)> = docs.iter().map(|(d, a)| (d.as_str(), *a)).collect();
            let t = token(&claims(name, &docs));
            let mut socket = dial(relay, Some(&t), Via::Header).await.expect("upgrade");
            handshake(&mut socket, name).await;
            socket
        }
    };
    let mut writer = connected(
        "bob",
        vec![(doc.clone(), Access::Write), (open.clone(), Access::Read)],
    )
    .await;
    let mut reader = connected("alice", vec![(doc.clone(), Access::Read)]).await;
    let mut stranger = connected("mallory", vec![(open.clone(), Access::Read)]).await;

    // Each asks for what it wants; the relay answers each request.
    let answered = |id: &str| {
        let id: DocumentId = id.parse().expect("id");
        move |m: &Message| match m {
            Message::Sync(d) | Message::Request(d) => d.document_id == id,
            Message::DocUnavailable { document_id, .. } => *document_id == id,
            _ => false,
        }
    };
    for (socket, name, ids) in [
        (&mut writer, "bob", vec![&doc, &open]),
        (&mut reader, "alice", vec![&doc]),
        (&mut stranger, "mallory", vec![&doc, &open]),
    ] {
        for id in ids {
            ask(socket, name, &relay, id).await;
            frames_until(socket, answered(id)).await;
        }
    }

    let secret = cbor_text("cursor-at-the-secret");
    ephemeral(&mut writer, &relay, &doc, 1, secret.clone()).await;
    ephemeral(&mut writer, &relay, &open, 2, cbor_text("marker")).await;
    let about = |id: &str| {
        let id: DocumentId = id.parse().expect("id");
        move |m: &Message| matches!(m, Message::Ephemeral(e) if e.document_id == id)
    };
    let seen = frames_until(&mut reader, about(&doc)).await;
    let Some(Message::Ephemeral(e)) = seen.last() else {
        unreachable!("frames_until ends with the match")
    };
    assert_eq!(e.data, secret, "the reader gets the writer's presence");
    let seen = frames_until(&mut stranger, about(&open)).await;
    let leaked: Vec<&Message> = seen.iter().filter(|m| about(&doc)(m)).collect();
    assert!(
        leaked.is_empty(),
        "the stranger got presence about a document it may not read: {leaked:?}"
    );
    relay.stop().await;
}

/// `text` as a CBOR text string (what automerge-repo puts in ephemeral
/// messages).
fn cbor_text(text: &str) -> Vec<u8> {
    assert!(text.len() < 24, "short strings only");
    let mut out = vec![0x60 | text.len() as u8];
    out.extend_from_slice(text.as_bytes());
    out
}

/// Sends a `request` for `id` with an empty sync message.
async fn ask(socket: &mut Socket, name: &str, relay: &Relay, id: &str) {
    let request = Message::Request(DocMessage {
        sender_id: PeerId::new(name).expect("valid"),
        target_id: relay.repo.peer_id().clone(),
        document_id: id.parse().expect("id"),
        data: converge_core::engine::validate::empty_sync_message(),
    });
    socket
        .send(WsMessage::Binary(wire::encode(&request).into()))
        .await
        .expect("send request");
}

/// Sends an ephemeral message from the writer ("bob") about `id`.
async fn ephemeral(socket: &mut Socket, relay: &Relay, id: &str, count: u64, data: Vec<u8>) {
    let message = Message::Ephemeral(EphemeralMessage {
        sender_id: PeerId::new("bob").expect("valid"),
        target_id: relay.repo.peer_id().clone(),
        document_id: id.parse().expect("id"),
        count,
        session_id: SessionId::new("bob-session").expect("valid"),
        data,
    });
    socket
        .send(WsMessage::Binary(wire::encode(&message).into()))
        .await
        .expect("send ephemeral");
}

/// Every message the relay sends on `socket` up to and including the
/// first that `done` accepts (panics after 10 s without one).
async fn frames_until(socket: &mut Socket, done: impl Fn(&Message) -> bool) -> Vec<Message> {
    let mut seen = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(frame) = socket.next().await {
            if let Ok(WsMessage::Binary(bytes)) = frame {
                let message = wire::decode(&bytes).expect("the relay sends valid frames");
                let last = done(&message);
                seen.push(message);
                if last {
                    return;
                }
            }
        }
        panic!("the connection ended first; got {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("nothing expected within 10 s"));
    seen
}
