//! Golden fixtures: frames written by the real automerge-repo 2.5 (client
//! and server), captured by `tests/js/gen-fixtures.mjs`. We must read every
//! one of them the way JavaScript did, and write the same bytes back.

use std::path::PathBuf;

use converge_core::wire::{self, Message, PeerMetadata};
use serde_json::{json, Map, Value};

/// The committed fixtures, or freshly generated ones when
/// `CONVERGE_FIXTURE_DIR` points at them (`make test` does both).
fn fixture_dir() -> PathBuf {
    match std::env::var_os("CONVERGE_FIXTURE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/wire"),
    }
}

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture_dir().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest is JSON")
}

fn bytes_value(b: &[u8]) -> Value {
    json!({ "$bytes": hex::encode(b) })
}

fn metadata_value(m: &PeerMetadata) -> Value {
    let mut o = Map::new();
    if let Some(s) = &m.storage_id {
        o.insert("storageId".into(), json!(s.as_str()));
    }
    if let Some(e) = m.is_ephemeral {
        o.insert("isEphemeral".into(), json!(e));
    }
    Value::Object(o)
}

/// Our decoded message, rendered the way the manifest renders the JS one.
fn render(m: &Message) -> Value {
    let mut o = Map::new();
    o.insert("type".into(), json!(m.type_name()));
    if let Some(s) = m.sender_id() {
        o.insert("senderId".into(), json!(s.as_str()));
    }
    if let Some(t) = m.target_id() {
        o.insert("targetId".into(), json!(t.as_str()));
    }
    match m {
        Message::Join {
            metadata,
            supported_protocol_versions,
            ..
        } => {
            if let Some(meta) = metadata {
                o.insert("peerMetadata".into(), metadata_value(meta));
            }
            if let Some(v) = supported_protocol_versions {
                o.insert("supportedProtocolVersions".into(), json!(v));
            }
        }
        Message::Peer {
            metadata,
            selected_protocol_version,
            ..
        } => {
            if let Some(meta) = metadata {
                o.insert("peerMetadata".into(), metadata_value(meta));
            }
            o.insert(
                "selectedProtocolVersion".into(),
                json!(selected_protocol_version),
            );
        }
        Message::Sync(d) | Message::Request(d) => {
            o.insert("documentId".into(), json!(d.document_id.to_string()));
            o.insert("data".into(), bytes_value(&d.data));
        }
        Message::DocUnavailable { document_id, .. } => {
            o.insert("documentId".into(), json!(document_id.to_string()));
        }
        Message::Ephemeral(e) => {
            o.insert("documentId".into(), json!(e.document_id.to_string()));
            o.insert("data".into(), bytes_value(&e.data));
            o.insert("count".into(), json!(e.count as f64));
            o.insert("sessionId".into(), json!(e.session_id.as_str()));
        }
        Message::RemoteSubscriptionChange { add, remove, .. } => {
            for (k, v) in [("add", add), ("remove", remove)] {
                if let Some(list) = v {
                    let list: Vec<&str> = list.iter().map(|s| s.as_str()).collect();
                    o.insert(k.into(), json!(list));
                }
            }
        }
        Message::RemoteHeadsChanged {
            document_id,
            new_heads,
            ..
        } => {
            o.insert("documentId".into(), json!(document_id.to_string()));
            let mut heads = Map::new();
            for (storage, h) in new_heads {
                heads.insert(
                    storage.as_str().into(),
                    json!({ "heads": h.heads, "timestamp": h.timestamp }),
                );
            }
            o.insert("newHeads".into(), Value::Object(heads));
        }
        Message::Error { message, .. } => {
            o.insert("message".into(), json!(message));
        }
        _ => {}
    }
    Value::Object(o)
}

/// The JS rendering with what we deliberately do not keep removed:
/// `undefined` fields (absent to us), keys we do not know, the old name
/// `metadata` (we read it as `peerMetadata`); numbers compared as floats.
fn normalize(v: &Value) -> Value {
    const KNOWN: &[&str] = &[
        "type",
        "senderId",
        "targetId",
        "documentId",
        "data",
        "count",
        "sessionId",
        "peerMetadata",
        "supportedProtocolVersions",
        "selectedProtocolVersion",
        "message",
        "add",
        "remove",
        "newHeads",
        "storageId",
        "isEphemeral",
        "heads",
        "timestamp",
    ];
    match v {
        Value::Object(o) if o.contains_key("$bytes") => v.clone(),
        Value::Object(o) => {
            let mut out = Map::new();
            let in_new_heads = o.values().all(|x| x.get("heads").is_some()) && !o.is_empty();
            for (k, x) in o {
                if x.get("$undefined").is_some() {
                    continue;
                }
                let key = if k == "metadata" {
                    "peerMetadata"
                } else {
                    k.as_str()
                };
                if !in_new_heads && !KNOWN.contains(&key) {
                    continue;
                }
                if key == "peerMetadata" && out.contains_key("peerMetadata") {
                    continue;
                }
                out.insert(key.to_owned(), normalize(x));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::Number(n) => json!(n.as_f64()),
        other => other.clone(),
    }
}

#[test]
fn every_fixture_decodes_to_what_javascript_saw() {
    let entries = manifest();
    assert!(entries.len() >= 20, "expected the full fixture set");
    for entry in &entries {
        let name = entry["name"].as_str().expect("name");
        let bytes = std::fs::read(fixture_dir().join(entry["file"].as_str().expect("file")))
            .expect("fixture file");
        let decoded = wire::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = normalize(&render(&decoded));
        let theirs = normalize(&entry["message"]);
        assert_eq!(ours, theirs, "fixture {name} decodes differently");
    }
}

/// Everything JavaScript actually sends re-encodes to the same bytes. The
/// synthetic oddities (old key names, unknown keys, explicit `undefined`
/// where JS would omit, a storage-less peer without the `storageId` key
/// that real clients send as `undefined`) are read, not reproduced; nor is the relayed
/// ephemeral, whose key order is that of the fixture script's hand-made
/// sender (a relay forwards the sender's object as it came).
#[test]
fn real_frames_re_encode_byte_for_byte() {
    let mut checked = 0;
    for entry in manifest() {
        let name = entry["name"].as_str().expect("name").to_owned();
        let reproducible = ![
            "metadata-alias",
            "unknown-key",
            "undefined-field",
            "relayed",
            "join-ephemeral-peer",
        ]
        .iter()
        .any(|s| name.contains(s));
        if !reproducible {
            continue;
        }
        let bytes = std::fs::read(fixture_dir().join(entry["file"].as_str().expect("file")))
            .expect("fixture file");
        let decoded = wire::decode(&bytes).expect("decodes");
        assert_eq!(
            hex::encode(wire::encode(&decoded)),
            hex::encode(&bytes),
            "fixture {name} re-encodes differently"
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} fixtures were byte-checked");
}

#[test]
fn big_counts_arrive_as_floats_and_decode_exactly() {
    let bytes =
        std::fs::read(fixture_dir().join("synthetic-ephemeral-big-count.cbor")).expect("fixture");
    assert!(
        bytes.windows(1).any(|w| w[0] == 0xfb),
        "cbor-x wrote a float64"
    );
    let Message::Ephemeral(e) = wire::decode(&bytes).expect("decodes") else {
        panic!("not ephemeral")
    };
    assert_eq!(e.count, (1u64 << 32) + 7);
}
