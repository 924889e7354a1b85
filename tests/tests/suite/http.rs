//! The relay's HTTP API over a real socket, checked against the checked-in
//! OpenAPI document and fed bad input of every kind. A last test makes sure
//! the document and the router list the same routes.

use std::sync::Arc;
use std::time::Duration;

use converge_core::context::PatchKind;
use converge_core::runtime::{ContextEvent, Repo, RepoConfig};
use converge_core::storage::MemoryStorage;
use converge_core::transport::ws;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::relay::Relay;
use super::wait;

fn addr(relay: &Relay) -> String {
    relay.url.trim_start_matches("ws://").to_owned()
}

/// One HTTP/1.1 request; returns the status and the body parsed as JSON
/// (or as a JSON string if it is not JSON).
async fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    http_as(addr, method, path, body, "application/json").await
}

/// [`http`] with another content type.
async fn http_as(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    content_type: &str,
) -> (u16, Value) {
    http_with(addr, method, path, &[("Content-Type", content_type)], body).await
}

/// One HTTP/1.1 request with these headers (JSON content unless they say
/// otherwise).
pub(crate) async fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = body.unwrap_or("");
    let mut extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        extra.push_str("Content-Type: application/json\r\n");
    }
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    (status, value)
}

fn openapi() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../sync-server/openapi.json"
    ))
    .expect("openapi.json");
    serde_json::from_str(&text).expect("valid JSON")
}

/// Follows `$ref`s within the document.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut cur = doc;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            resolve(doc, cur)
        }
        None => v,
    }
}

/// Checks `value` against the required properties of `schema` (and of the
/// first item of arrays), which is what clients rely on.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for key in required {
            let key = key.as_str().unwrap_or_default();
            if value.get(key).is_none() {
                return Err(format!("{at}: missing required `{key}` in {value}"));
            }
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (key, sub) in props {
            if let Some(v) = value.get(key) {
                let sub = resolve(doc, sub);
                let ok = match sub.get("type").and_then(Value::as_str) {
                    Some("string") => v.is_string() || (v.is_null() && sub["nullable"] == true),
                    Some("integer") => {
                        v.is_i64() || v.is_u64() || (v.is_null() && sub["nullable"] == true)
                    }
                    Some("array") => v.is_array(),
                    Some("object") => v.is_object(),
                    _ => true,
                };
                if !ok {
                    return Err(format!("{at}.{key}: {v} does not match {sub}"));
                }
                conforms(doc, sub, v, &format!("{at}.{key}"))?;
                if let (Some(items), Some(first)) =
                    (sub.get("items"), v.as_array().and_then(|a| a.first()))
                {
                    conforms(doc, items, first, &format!("{at}.{key}[0]"))?;
                }
            }
        }
    }
    Ok(())
}

/// The response a documented operation promises for `status`.
fn documented(doc: &Value, path: &str, method: &str, status: u16) -> Value {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let response = resolve(doc, &op["responses"][status.to_string()]);
    assert!(
        response.is_object(),
        "{method} {path} does not document status {status}"
    );
    response["content"]["application/json"]["schema"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_works_and_matches_the_openapi_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path()).await;
    let a = addr(&relay);
    let spec = openapi();
    let check = |path: &str, method: &str, status: u16, body: &Value| {
        let schema = documented(&spec, path, method, status);
        conforms(&spec, &schema, body, &format!("{method} {path} {status}"))
            .unwrap_or_else(|e| panic!("{e}"));
    };

    let (s, created) = http(
        &a,
        "POST",
        "/v1/contexts",
        Some(r#"{"settings": {"theme": "light"}, "visits": 0}"#),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    check("/v1/contexts", "post", s, &created);
    let id = created["id"].as_str().expect("id").to_owned();
    let first_heads = created["heads"]
        .as_array()
        .expect("heads")
        .iter()
        .map(|h| h.as_str().unwrap_or_default().to_owned())
        .collect::<Vec<_>>()
        .join(",");

    let (s, doc) = http(&a, "GET", &format!("/v1/contexts/{id}"), None).await;
    assert_eq!(
        (s, doc.clone()),
        (200, json!({"settings": {"theme": "light"}, "visits": 0}))
    );
    check("/v1/contexts/{id}", "get", s, &doc);

    let ops = json!({"message": "dark mode", "ops": [
        {"op": "set", "path": "/settings/theme", "value": "dark"},
        {"op": "set", "path": "/hits", "value": 1, "type": "counter"},
        {"op": "increment", "path": "/hits", "by": 4},
        {"op": "set", "path": "/tags", "value": []},
        {"op": "insert", "path": "/tags", "index": 0, "value": "a"},
        {"op": "insert", "path": "/tags", "index": 1, "value": "b"},
        {"op": "remove", "path": "/tags", "index": 0},
        {"op": "splice", "path": "/settings/theme", "index": 0, "delete": 0, "insert": "very "},
        {"op": "merge", "path": "", "value": {"visits": null, "owner": "svc"}},
        {"op": "delete", "path": "/owner"}
    ]});
    let (s, applied) = http(
        &a,
        "POST",
        &format!("/v1/contexts/{id}/ops"),
        Some(&ops.to_string()),
    )
    .await;
    assert_eq!(s, 200, "{applied}");
    check("/v1/contexts/{id}/ops", "post", s, &applied);
    let (_, doc) = http(&a, "GET", &format!("/v1/contexts/{id}"), None).await;
    assert_eq!(
        doc,
        json!({"settings": {"theme": "very dark"}, "hits": 5, "tags": ["b"]})
    );
    let (_, theme) = http(
        &a,
        "GET",
        &format!("/v1/contexts/{id}?path=/settings/theme"),
        None,
    )
    .await;
    assert_eq!(theme, json!("very dark"));
    // The first version is still there.
    let (s, old) = http(
        &a,
        "GET",
        &format!("/v1/contexts/{id}?heads={first_heads}"),
        None,
    )
    .await;
    assert_eq!(
        (s, old),
        (200, json!({"settings": {"theme": "light"}, "visits": 0}))
    );

    let (s, history) = http(
        &a,
        "GET",
        &format!("/v1/contexts/{id}/history?limit=1"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    check("/v1/contexts/{id}/history", "get", s, &history);
    assert_eq!(history["changes"][0]["message"], "dark mode");

    let (s, meta) = http(&a, "GET", &format!("/v1/contexts/{id}/metadata"), None).await;
    assert_eq!(s, 200, "{meta}");
    check("/v1/contexts/{id}/metadata", "get", s, &meta);
    assert!(meta["size_bytes"].as_u64().is_some_and(|n| n > 0));
    assert!(meta["change_count"].as_u64().is_some_and(|n| n >= 3));
    assert!(meta["created_ms"].as_u64().is_some());

    for _ in 0..3 {
        http(&a, "POST", "/v1/contexts", None).await;
    }
    // A context is listed as soon as it exists (the listing reads the
    // documents in memory and the metadata written with their changes).
    let (_, all) = http(&a, "GET", "/v1/contexts", None).await;
    assert_eq!(all["contexts"].as_array().map(Vec::len), Some(4), "{all}");
    let (s, page) = http(&a, "GET", "/v1/contexts?limit=2", None).await;
    assert_eq!(s, 200);
    check("/v1/contexts", "get", s, &page);
    assert_eq!(page["contexts"].as_array().map(Vec::len), Some(2));
    let after = page["next_after"].as_str().expect("more pages").to_owned();
    let (_, rest) = http(
        &a,
        "GET",
        &format!("/v1/contexts?limit=10&after={after}"),
        None,
    )
    .await;
    assert_eq!(rest["contexts"].as_array().map(Vec::len), Some(2));
    let (_, mine) = http(
        &a,
        "GET",
        &format!("/v1/contexts?prefix={}", &id[..6]),
        None,
    )
    .await;
    assert!(mine["contexts"]
        .as_array()
        .expect("list")
        .iter()
        .any(|c| c["id"] == id.as_str()));
    relay.stop().await;
}

/// Bad input gets a 4xx with a clear JSON error, and the context is left
/// exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path()).await;
    let a = addr(&relay);
    let spec = openapi();
    let (_, created) = http(
        &a,
        "POST",
        "/v1/contexts",
        Some(r#"{"n": 1, "text": "hi"}"#),
    )
    .await;
    let id = created["id"].as_str().expect("id").to_owned();
    let (_, before) = http(&a, "GET", &format!("/v1/contexts/{id}/metadata"), None).await;
    let unknown = converge_core::wire::DocumentId::from_random([3; 16]).to_string();
    let ops = format!("/v1/contexts/{id}/ops");
    /// method, path, body, status, error code, documented path
    type Case<'a> = (&'a str, String, Option<&'a str>, u16, &'a str, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "POST",
            "/v1/contexts".into(),
            Some("{oops"),
            400,
            "bad_json",
            "/v1/contexts",
        ),
        (
            "POST",
            "/v1/contexts".into(),
            Some("[1,2]"),
            400,
            "bad_json",
            "/v1/contexts",
        ),
        (
            "GET",
            "/v1/contexts/not-an-id!".into(),
            None,
            400,
            "bad_id",
            "/v1/contexts/{id}",
        ),
        (
            "GET",
            format!("/v1/contexts/{unknown}"),
            None,
            404,
            "not_found",
            "/v1/contexts/{id}",
        ),
        (
            "GET",
            format!("/v1/contexts/{id}?heads=zzz"),
            None,
            400,
            "bad_heads",
            "/v1/contexts/{id}",
        ),
        (
            "GET",
            format!("/v1/contexts/{id}?heads={}", "ab".repeat(32)),
            None,
            422,
            "unknown_heads",
            "/v1/contexts/{id}",
        ),
        (
            "GET",
            format!("/v1/contexts/{id}?path=nope"),
            None,
            400,
            "bad_path",
            "/v1/contexts/{id}",
        ),
        (
            "GET",
            format!("/v1/contexts/{id}?path=/missing"),
            None,
            404,
            "path_not_found",
            "/v1/contexts/{id}",
        ),
        (
            "POST",
            ops.clone(),
            Some("not json"),
            400,
            "bad_json",
            "/v1/contexts/{id}/ops",
        ),
        (
            "POST",
            ops.clone(),
            Some(r#"{"ops": 5}"#),
            400,
            "bad_json",
            "/v1/contexts/{id}/ops",
        ),
        (
            "POST",
            ops.clone(),
            Some(r#"{"ops": [{"op": "set", "value": 1}]}"#),
            400,
            "bad_op",
            "/v1/contexts/{id}/ops",
        ),
        (
            "POST",
            ops.clone(),
            Some(r#"{"ops": [{"op": "explode", "path": "/n"}]}"#),
            400,
            "bad_op",
            "/v1/contexts/{id}/ops",
        ),
        (
            "POST",
            ops.clone(),
            Some(r#"{"ops": [{"op": "set", "path": "/n", "value": "x", "type": "counter"}]}"#),
            422,
            "wrong_value",
            "/v1/contexts/{id}/ops",
        ),
        (
            "POST",
            ops.clone(),
            Some(
                r#"{"ops": [{"op": "set", "path": "/n", "value": 2}, {"op": "increment", "path": "/n"}]}"#,
            ),
            422,
            "type_mismatch",
            "/v1/contexts/{id}/ops",
        ),
        (
            "POST",
            ops.clone(),
            Some(r#"{"ops": [{"op": "splice", "path": "/text", "index": 99, "insert": "x"}]}"#),
            422,
            "index_out_of_range",
            "/v1/contexts/{id}/ops",
        ),
        (
            "POST",
            ops.clone(),
            Some(r#"{"ops": [{"op": "set", "path": "/a/b", "value": 1}]}"#),
            404,
            "path_not_found",
            "/v1/contexts/{id}/ops",
        ),
        (
            "POST",
            format!("/v1/contexts/{unknown}/ops"),
            Some(r#"{"ops": []}"#),
            404,
            "not_found",
            "/v1/contexts/{id}/ops",
        ),
        (
            "GET",
            format!("/v1/contexts/{unknown}/history"),
            None,
            404,
            "not_found",
            "/v1/contexts/{id}/history",
        ),
        (
            "GET",
            format!("/v1/contexts/{id}/history?limit=x"),
            None,
            400,
            "bad_query",
            "/v1/contexts/{id}/history",
        ),
        (
            "GET",
            format!("/v1/contexts/{id}/history?limit=0"),
            None,
            400,
            "bad_query",
            "/v1/contexts/{id}/history",
        ),
        (
            "GET",
            "/v1/contexts?limit=1001".into(),
            None,
            400,
            "bad_query",
            "/v1/contexts",
        ),
        (
            "GET",
            format!("/v1/contexts/{id}/history?offset=-1"),
            None,
            400,
            "bad_query",
            "/v1/contexts/{id}/history",
        ),
        (
            "POST",
            "/v1/contexts".into(),
            Some("null"),
            400,
            "bad_json",
            "/v1/contexts",
        ),
        (
            // Whitespace is not "no body": it is a body that is not JSON.
            "POST",
            "/v1/contexts".into(),
            Some("\n"),
            400,
            "bad_json",
            "/v1/contexts",
        ),
        (
            "POST",
            ops.clone(),
            Some(r#"{"ops": [], "message": null}"#),
            400,
            "bad_json",
            "/v1/contexts/{id}/ops",
        ),
        (
            "POST",
            ops.clone(),
            Some(r#"{"ops": null}"#),
            400,
            "bad_json",
            "/v1/contexts/{id}/ops",
        ),
        (
            // In the id alphabet, but its checksum fails: no such context.
            "GET",
            format!("/v1/contexts/{}", "2".repeat(28)),
            None,
            404,
            "not_found",
            "/v1/contexts/{id}",
        ),
        (
            "GET",
            format!("/v1/contexts/{id}?heads={}", "2".repeat(40)),
            None,
            422,
            "unknown_heads",
            "/v1/contexts/{id}",
        ),
        (
            "GET",
            format!("/v1/contexts/{unknown}/metadata"),
            None,
            404,
            "not_found",
            "/v1/contexts/{id}/metadata",
        ),
        (
            "GET",
            format!("/v1/contexts/{unknown}/events"),
            None,
            404,
            "not_found",
            "/v1/contexts/{id}/events",
        ),
    ];
    for (method, path, body, status, code, documented_path) in cases {
        let (s, err) = http(&a, method, &path, body).await;
        assert_eq!(s, status, "{method} {path}: {err}");
        if !code.is_empty() {
            assert_eq!(err["error"]["code"], code, "{method} {path}: {err}");
            assert!(err["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
            let schema = documented(&spec, documented_path, &method.to_lowercase(), s);
            conforms(&spec, &schema, &err, &path).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // Unknown routes and methods answer in the same JSON shape.
    for (method, path, status, code) in [
        ("GET", "/v1/nothing-here", 404, "no_route"),
        ("DELETE", "/v1/contexts", 405, "method_not_allowed"),
    ] {
        let (s, err) = http(&a, method, path, None).await;
        assert_eq!(
            (s, err["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {err}"
        );
        conforms(&spec, &spec["components"]["schemas"]["Error"], &err, path)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (_, after) = http(&a, "GET", &format!("/v1/contexts/{id}/metadata"), None).await;
    assert_eq!(
        before["heads"], after["heads"],
        "a failed request changed the context"
    );
    let (_, doc) = http(&a, "GET", &format!("/v1/contexts/{id}"), None).await;
    assert_eq!(doc, json!({"n": 1, "text": "hi"}));
    relay.stop().await;
}

/// The README's `curl -d` examples work as written: curl sends them as a
/// form, and the API reads the body as JSON whatever its content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_curl_examples_work_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path()).await;
    let a = addr(&relay);
    let form = "application/x-www-form-urlencoded";
    let (s, created) = http_as(
        &a,
        "POST",
        "/v1/contexts",
        Some(r#"{"room": {"topic": "hello"}}"#),
        form,
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let id = created["id"].as_str().expect("id");
    let ops = r#"{"ops": [{"op": "set", "path": "/room/topic", "value": "updated"}], "message": "from a service"}"#;
    let (s, applied) = http_as(
        &a,
        "POST",
        &format!("/v1/contexts/{id}/ops"),
        Some(ops),
        form,
    )
    .await;
    assert_eq!(s, 200, "{applied}");
    let (_, doc) = http(&a, "GET", &format!("/v1/contexts/{id}"), None).await;
    assert_eq!(doc, json!({"room": {"topic": "updated"}}));
    relay.stop().await;
}

/// A change made over HTTP reaches a connected client at once, and the
/// event stream reports it as patches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_changes_reach_clients_and_the_event_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path()).await;
    let a = addr(&relay);
    let (_, created) = http(&a, "POST", "/v1/contexts", Some(r#"{"status": "idle"}"#)).await;
    let id = created["id"].as_str().expect("id").to_owned();

    let client = Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()));
    let _conn = ws::connect(client.clone(), relay.url.clone());
    let doc_id: converge_core::wire::DocumentId = id.parse().expect("id");
    let ctx = wait::until("the client finds the context", || async {
        client.find(&doc_id).await.ok()
    })
    .await
    .context();
    let mut sub = ctx.subscribe("/status").expect("subscribe");

    // The relay lists the client as a session, with its address.
    let (s, sessions) = http(&a, "GET", "/v1/sessions", None).await;
    assert_eq!(s, 200);
    let spec = openapi();
    let schema = documented(&spec, "/v1/sessions", "get", s);
    conforms(&spec, &schema, &sessions, "GET /v1/sessions").unwrap_or_else(|e| panic!("{e}"));
    let list = sessions["sessions"].as_array().expect("sessions");
    let me = list
        .iter()
        .find(|x| x["peer_id"] == client.peer_id().as_str())
        .unwrap_or_else(|| panic!("client missing from {sessions}"));
    assert!(me["remote"]
        .as_str()
        .is_some_and(|r| r.starts_with("127.0.0.1:")));
    assert!(me["connected_since_ms"].as_u64().is_some());

    let mut sse = TcpStream::connect(&a).await.expect("connect");
    sse.write_all(format!("GET /v1/contexts/{id}/events HTTP/1.1\r\nHost: {a}\r\nAccept: text/event-stream\r\n\r\n").as_bytes())
        .await
        .expect("write");
    // The relay subscribes before it answers: once the response head is
    // here, the change below cannot be missed.
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !seen.contains("\r\n\r\n") {
            let n = sse.read(&mut buf).await.expect("read");
            assert!(n > 0, "event stream closed");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .expect("the event stream's response head");

    let (s, _) = http(
        &a,
        "POST",
        &format!("/v1/contexts/{id}/ops"),
        Some(r#"{"ops": [{"op": "set", "path": "/status", "value": "busy", "type": "string"}]}"#),
    )
    .await;
    assert_eq!(s, 200);

    // (The subscription may first report the document's arrival.)
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let ContextEvent::Changed(event) = sub.next().await.expect("open") else {
                panic!("the subscription fell behind");
            };
            if event.patches.iter().any(|p| {
                p.path == "/status"
                    && p.kind
                        == PatchKind::Put {
                            value: json!("busy"),
                        }
            }) {
                break;
            }
        }
    })
    .await
    .expect("the client hears of the HTTP change");
    assert_eq!(
        ctx.get("/status").await.expect("value"),
        converge_core::context::Value::Str("busy".into())
    );

    tokio::time::timeout(Duration::from_secs(5), async {
        while !seen.contains("\"/status\"") {
            let n = sse.read(&mut buf).await.expect("read");
            assert!(n > 0, "event stream closed");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .expect("an SSE change event");
    assert!(seen.contains("text/event-stream"), "{seen}");
    assert!(seen.contains("event: change"), "{seen}");
    assert!(seen.contains("\"busy\""), "{seen}");
    // An open event stream would hold the relay's graceful shutdown.
    drop(sse);
    relay.stop().await;
}

/// Every route the OpenAPI document lists answers (not 404/405), so the
/// document and the router cannot drift apart silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_only_real_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start(dir.path()).await;
    let a = addr(&relay);
    let (_, created) = http(&a, "POST", "/v1/contexts", Some("{}")).await;
    let id = created["id"].as_str().expect("id").to_owned();
    let spec = openapi();
    for (path, ops) in spec["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("methods").keys() {
            if path.ends_with("/events") {
                continue; // a stream; covered above
            }
            let concrete = path.replace("{id}", &id);
            let body = (method == "post").then_some(r#"{"ops": []}"#);
            let (s, _) = http(&a, &method.to_uppercase(), &concrete, body).await;
            assert!(s != 404 && s != 405, "{method} {path} answered {s}");
        }
    }
    relay.stop().await;
}
