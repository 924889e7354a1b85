//! Fuzzing entry points: each takes arbitrary bytes and must neither panic
//! (outside what the engine contains) nor hang. The cargo-fuzz targets in
//! `fuzz/` call them, and `cargo test` replays every input committed under
//! `fuzz/regressions/<target>/` through them (so a crash found once stays
//! fixed). Behind the `test-support` feature.

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ROOT};

use crate::context::{self, JsonOp, Op};
use crate::engine::{
    perform, Claims, ConnectionId, Direction, Engine, EngineConfig, Grant, Input, Output,
    RelayPolicy, ReplicaKind, Timestamp,
};
use crate::storage::{BatchOp, ChunkKind, MemoryStorage, Storage, StorageKey};
use crate::wire::{self, DocMessage, DocumentId, Message, PeerId};

/// The names of the targets, as under `fuzz/fuzz_targets/` and
/// `fuzz/regressions/`.
pub const TARGETS: [&str; 5] = [
    "wire_decode",
    "sync_message",
    "chunk_load",
    "claims",
    "context_ops",
];

/// For a cargo-fuzz target, before its first input: puts back Rust's
/// default panic hook in place of libFuzzer's aborting one, so a panic the
/// engine contains (inside Automerge) unwinds to where the engine catches
/// it; one that escapes still ends at libFuzzer's `catch_unwind` and is
/// reported as a crash.
pub fn contain_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
}

/// Runs target `name` on `data` (for the replay test).
pub fn run(name: &str, data: &[u8]) {
    match name {
        "wire_decode" => wire_decode(data),
        "sync_message" => sync_message(data),
        "chunk_load" => chunk_load(data),
        "claims" => claims(data),
        "context_ops" => context_ops(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// The wire decoder: whatever decodes re-encodes to bytes that decode to
/// the same message.
pub fn wire_decode(data: &[u8]) {
    if let Ok(message) = wire::decode(data) {
        let bytes = wire::encode(&message);
        let again = wire::decode(&bytes).expect("what we encode decodes");
        assert_eq!(wire::encode(&again), bytes, "encoding is stable");
    }
}

/// A small document with a map, a list, a text and a counter.
fn seeded() -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from([7u8; 16].to_vec()));
    let mut tx = doc.transaction();
    let _ = tx.put(ROOT, "title", "seed");
    if let Ok(list) = tx.put_object(ROOT, "items", automerge::ObjType::List) {
        let _ = tx.insert(&list, 0, 1i64);
        let _ = tx.insert(&list, 1, "two");
    }
    if let Ok(text) = tx.put_object(ROOT, "text", automerge::ObjType::Text) {
        let _ = tx.splice_text(&text, 0, 0, "hello");
    }
    let _ = tx.put(ROOT, "count", automerge::ScalarValue::counter(3));
    tx.commit();
    doc
}

/// Hands every storage task of `out` to `store`, and its results back to
/// the engine, until it asks for nothing more.
fn settle(engine: &mut Engine, store: &MemoryStorage, mut out: Output) {
    for _ in 0..64 {
        if out.storage.is_empty() {
            return;
        }
        let inputs: Vec<Input> = out
            .storage
            .into_iter()
            .map(|task| Input::Storage {
                task: task.id,
                result: perform(store, task.op),
            })
            .collect();
        out = engine.handle_batch(Timestamp(1), inputs);
    }
}

/// A sync message from a connected client, through the relay's engine:
/// decode, validate, receive and answer, against a seeded document held
/// by the replica kind the first byte chooses.
pub fn sync_message(data: &[u8]) {
    let Some((&choice, message)) = data.split_first() else {
        return;
    };
    let kind = if choice & 1 == 0 {
        ReplicaKind::ChangeLog
    } else {
        ReplicaKind::FullDocument
    };
    let store = MemoryStorage::new();
    let id = DocumentId::from_random([9; 16]);
    let key = StorageKey::doc_chunk(&id, ChunkKind::Snapshot, "seed");
    if store
        .batch(vec![BatchOp::Put(key, seeded().save())])
        .is_err()
    {
        return;
    }
    let relay = PeerId::new("relay").expect("valid");
    let client = PeerId::new("client").expect("valid");
    let mut cfg = EngineConfig::new(relay.clone(), None, 1);
    cfg.policy = std::sync::Arc::new(RelayPolicy);
    cfg.replica = kind.factory();
    let mut engine = Engine::new(cfg);
    let conn = ConnectionId(1);
    let now = Timestamp(1);
    let out = engine.handle(
        now,
        Input::Connected {
            conn,
            direction: Direction::Incoming,
            grant: Grant::everything().into(),
        },
    );
    settle(&mut engine, &store, out);
    let join = wire::encode(&Message::Join {
        sender_id: client.clone(),
        metadata: None,
        supported_protocol_versions: Some(vec!["1".into()]),
    });
    let out = engine.handle(now, Input::Received { conn, bytes: join });
    settle(&mut engine, &store, out);
    // Twice: the first may find the document loading, the second meets it
    // loaded, with sync state from the first.
    for request in [true, false] {
        let doc = DocMessage {
            sender_id: client.clone(),
            target_id: relay.clone(),
            document_id: id.clone(),
            data: message.to_vec(),
        };
        let bytes = wire::encode(&if request {
            Message::Request(doc)
        } else {
            Message::Sync(doc)
        });
        let out = engine.handle(now, Input::Received { conn, bytes });
        settle(&mut engine, &store, out);
    }
}

/// Stored bytes loaded as a document chunk by both replica kinds, as the
/// engine loads them (inside `catch_unwind`: a panic in Automerge is
/// contained and the chunk reported corrupt); what loads saves again.
pub fn chunk_load(data: &[u8]) {
    for kind in [ReplicaKind::ChangeLog, ReplicaKind::FullDocument] {
        let mut replica = (kind.factory())(ActorId::from([1u8; 16].to_vec()), 7);
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            replica.load_chunk(data).is_ok()
        }));
        if matches!(loaded, Ok(true)) {
            let _ = replica.heads();
            let _ = replica.save();
        }
    }
}

/// Token claims (the JSON a verified token carries) made into a grant.
pub fn claims(data: &[u8]) {
    if let Ok(claims) = serde_json::from_slice::<Claims>(data) {
        if let Ok(grant) = claims.grant() {
            let doc = DocumentId::from_random([1; 16]);
            let _ = grant.on(&doc);
            let _ = grant.may_create(&doc);
        }
    }
}

/// What the bindings and the HTTP API take from outside, as text: JSON ops
/// applied to a seeded document, JSON Pointer paths and automerge URLs.
pub fn context_ops(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = text.parse::<DocumentId>();
    let _ = text.parse::<context::Path>();
    let Ok(json) = serde_json::from_str::<Vec<serde_json::Value>>(text) else {
        return;
    };
    let ops: Vec<Op> = json
        .into_iter()
        .filter_map(|op| serde_json::from_value::<JsonOp>(op).ok())
        .filter_map(|op| op.into_op().ok())
        .collect();
    let mut doc = seeded();
    if context::apply(&mut doc, &ops, None, Some(0)).is_ok() {
        let _ = context::to_json(&doc, &context::Path::root(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_takes_empty_and_sample_input() {
        for target in TARGETS {
            run(target, b"");
            run(target, b"\x00\x01garbage");
        }
        context_ops(br#"[{"op": "set", "path": "/title", "value": "x"}]"#);
        claims(br#"{"sub": "a", "exp": 1, "converge": {"docs": {"*": "read"}}}"#);
    }
}
