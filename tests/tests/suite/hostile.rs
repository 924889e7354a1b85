//! Hostile and broken input against a relay that is serving others: each
//! bad connection is closed with a reason, and everyone else carries on.

use std::sync::Arc;

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{Automerge, ChangeHash, ReadDoc, ROOT};
use converge_core::engine::validate::{
    hostile_bloom_bytes, sync_message_with_bloom, InvalidSyncMessage,
};
use converge_core::engine::{
    close_code, CloseReason, Command, ConnectionId, Event, FullDocument, PeerSync, Replica,
    ReplicaError,
};
use converge_core::wire::{self, DocMessage, DocumentId, Message, PeerId};
use converge_tests::scenario::text_on;
use converge_tests::sim::{seed_document, NetConfig, Role, Sim};

const SETTLE: u64 = 100_000;
const EVE: ConnectionId = ConnectionId(7_000);

/// A relay serving alice, bob and carol, who share one document.
fn busy_relay(
    tweak: impl FnOnce(&mut converge_core::engine::EngineConfig),
) -> (Sim, usize, Vec<usize>, DocumentId) {
    let mut sim = Sim::new(99, NetConfig::default());
    let relay = sim.add_node_with("relay", Role::Relay, tweak);
    let clients: Vec<usize> = ["alice", "bob", "carol"]
        .iter()
        .map(|n| {
            let c = sim.add_node(n, Role::Client);
            sim.link(c, relay);
            c
        })
        .collect();
    sim.run_until_quiescent(SETTLE);
    let doc = sim.create(clients[0], &seed_document());
    sim.run_until_quiescent(SETTLE);
    for &c in &clients[1..] {
        sim.command(
            c,
            Command::Find {
                document_id: doc.clone(),
            },
        );
    }
    sim.run_until_quiescent(SETTLE);
    (sim, relay, clients, doc)
}

fn eve_joins(sim: &mut Sim, relay: usize) {
    sim.open_raw(relay, EVE);
    let join = Message::Join {
        sender_id: PeerId::new("eve").expect("valid"),
        metadata: None,
        supported_protocol_versions: Some(vec!["1".into()]),
    };
    sim.inject(relay, EVE, wire::encode(&join));
}

fn eve_syncs(sim: &mut Sim, relay: usize, doc: &DocumentId, data: Vec<u8>) {
    let m = Message::Sync(DocMessage {
        sender_id: PeerId::new("eve").expect("valid"),
        target_id: PeerId::new("relay").expect("valid"),
        document_id: doc.clone(),
        data,
    });
    sim.inject(relay, EVE, wire::encode(&m));
}

/// The others still sync: alice types, bob and carol see it.
fn others_unaffected(sim: &mut Sim, clients: &[usize], doc: &DocumentId, word: &str) {
    let w = word.to_owned();
    assert!(sim.edit(clients[0], doc, move |am| {
        let mut tx = am.transaction();
        let (_, text) = tx.get(ROOT, "text").ok().flatten().expect("text");
        let len = tx.length(&text);
        tx.splice_text(&text, len, 0, &w).expect("splice");
        tx.commit();
    }));
    sim.run_until_quiescent(SETTLE);
    for &c in &clients[1..] {
        assert!(
            text_on(sim, c, doc).ends_with(word),
            "{} missed the edit",
            sim.nodes[c].name
        );
    }
    // Nobody but eve was disconnected.
    for &c in clients {
        assert!(
            sim.nodes[c].closed.is_empty(),
            "{} had a connection closed",
            sim.nodes[c].name
        );
    }
}

fn closed_with(sim: &Sim, relay: usize, conn: ConnectionId) -> &CloseReason {
    sim.nodes[relay]
        .closed
        .iter()
        .find(|(c, _)| *c == conn)
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("{conn} was not closed"))
}

/// PROTOCOL.md's two poison pills: a Bloom filter with zero bits per entry
/// (divides by zero in the next `generate_sync_message`) and one with a
/// huge probe count (a giant allocation). Both are refused before Automerge
/// sees them.
#[test]
fn hostile_bloom_filters_are_refused_and_others_carry_on() {
    for (what, bloom) in [
        ("zero bits per entry", hostile_bloom_bytes(10, 0, 7, 0)),
        (
            "huge probe count",
            hostile_bloom_bytes(10, 10, u32::MAX, 13),
        ),
    ] {
        let (mut sim, relay, clients, doc) = busy_relay(|_| {});
        eve_joins(&mut sim, relay);
        eve_syncs(&mut sim, relay, &doc, sync_message_with_bloom(&bloom));
        sim.run_until_quiescent(SETTLE);
        let reason = closed_with(&sim, relay, EVE);
        assert!(
            matches!(
                reason,
                CloseReason::InvalidSync {
                    source: InvalidSyncMessage::BadBloom(_),
                    ..
                }
            ),
            "{what}: closed for `{reason}`"
        );
        assert_eq!(reason.code(), close_code::PROTOCOL);
        assert!(!sim.nodes[relay]
            .events
            .iter()
            .any(|e| matches!(e, Event::PanicContained { .. })));
        others_unaffected(&mut sim, &clients, &doc, what);
    }
}

/// Every kind of broken frame closes only the connection it came on.
#[test]
fn malformed_frames_close_only_their_connection() {
    let (mut sim, relay, clients, doc) = busy_relay(|cfg| cfg.max_message_bytes = 1 << 16);
    let valid_sync = {
        let am = Automerge::new();
        am.generate_sync_message(&mut sync::State::new())
            .expect("first message")
            .encode()
    };
    let malformed = |r: &CloseReason| matches!(r, CloseReason::Malformed(_));
    let too_big = |r: &CloseReason| matches!(r, CloseReason::MessageTooBig { .. });
    type Expect = fn(&CloseReason) -> bool;
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "text instead of CBOR",
            b"{\"type\":\"join\"}".to_vec(),
            malformed,
        ),
        ("not CBOR at all", vec![0xff, 0xfe, 0xfd], malformed),
        ("empty frame", vec![], malformed),
        (
            "a map without a type",
            vec![0xa1, 0x61, 0x78, 0x01],
            malformed,
        ),
        ("oversized", vec![0u8; (1 << 16) + 1], too_big),
    ];
    for (i, (what, bytes, expect)) in cases.into_iter().enumerate() {
        let conn = ConnectionId(8_000 + i as u64);
        sim.open_raw(relay, conn);
        sim.inject(relay, conn, bytes);
        let reason = closed_with(&sim, relay, conn);
        assert!(expect(reason), "{what}: closed for `{reason}`");
    }
    // After a good handshake: a sync message whose payload is garbage, and
    // one that is missing its document id.
    eve_joins(&mut sim, relay);
    eve_syncs(&mut sim, relay, &doc, vec![0x42, 0xff]);
    assert!(matches!(
        closed_with(&sim, relay, EVE),
        CloseReason::InvalidSync { .. }
    ));
    let conn = ConnectionId(8_100);
    sim.open_raw(relay, conn);
    sim.inject(
        relay,
        conn,
        wire::encode(&Message::Join {
            sender_id: PeerId::new("mallory").expect("valid"),
            metadata: None,
            supported_protocol_versions: None,
        }),
    );
    let mut no_doc = wire::encode(&Message::Sync(DocMessage {
        sender_id: PeerId::new("mallory").expect("valid"),
        target_id: PeerId::new("relay").expect("valid"),
        document_id: doc.clone(),
        data: valid_sync,
    }));
    // Corrupt the key `documentId` so the field is missing.
    let at = no_doc
        .windows(10)
        .position(|w| w == b"documentId")
        .expect("key present");
    no_doc[at] = b'X';
    sim.inject(relay, conn, no_doc);
    assert!(matches!(
        closed_with(&sim, relay, conn),
        CloseReason::Malformed(e) if e.to_string().contains("documentId")
    ));
    sim.run_until_quiescent(SETTLE);
    others_unaffected(&mut sim, &clients, &doc, "still fine");
}

/// A replica that panics when a sync message asks for a particular hash:
/// a stand-in for an Automerge bug reachable from the network.
#[derive(Debug)]
struct Booby(FullDocument);

const TRIGGER: ChangeHash = ChangeHash([0xee; 32]);

impl Replica for Booby {
    fn kind(&self) -> converge_core::engine::ReplicaKind {
        self.0.kind()
    }
    fn heads(&self) -> Vec<ChangeHash> {
        self.0.heads()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn has_change(&self, h: &ChangeHash) -> bool {
        self.0.has_change(h)
    }
    fn generate_sync_message(&self, s: &mut PeerSync) -> Option<sync::Message> {
        self.0.generate_sync_message(s)
    }
    fn receive_sync_message(
        &mut self,
        s: &mut PeerSync,
        m: sync::Message,
    ) -> Result<(), ReplicaError> {
        if m.need.contains(&TRIGGER) {
            panic!("injected fault");
        }
        self.0.receive_sync_message(s, m)
    }
    fn load_chunk(&mut self, b: &[u8]) -> Result<(), ReplicaError> {
        self.0.load_chunk(b)
    }
    fn save(&self) -> Vec<u8> {
        self.0.save()
    }
    fn save_after(&self, h: &[ChangeHash]) -> Vec<u8> {
        self.0.save_after(h)
    }
    fn document(&self) -> Option<&Automerge> {
        self.0.document()
    }
    fn document_mut(&mut self) -> Option<&mut Automerge> {
        self.0.document_mut()
    }
}

/// A panic inside Automerge while handling one peer's message closes that
/// peer's connection only; the document and every other peer are fine.
#[test]
fn a_panic_is_contained_to_one_connection() {
    let (mut sim, relay, clients, doc) = busy_relay(|cfg| {
        cfg.replica = Arc::new(|actor, _| Box::new(Booby(FullDocument::new(actor))));
    });
    eve_joins(&mut sim, relay);
    let poison = sync::Message {
        heads: vec![],
        need: vec![TRIGGER],
        have: vec![],
        changes: sync::ChunkList::empty(),
        flags: None,
        version: sync::MessageVersion::V1,
    };
    let before = text_on(&sim, relay, &doc);
    eve_syncs(&mut sim, relay, &doc, poison.encode());
    let reason = closed_with(&sim, relay, EVE);
    assert!(matches!(reason, CloseReason::Internal(_)), "{reason}");
    assert_eq!(reason.code(), close_code::INTERNAL);
    assert!(sim.nodes[relay]
        .events
        .iter()
        .any(|e| matches!(e, Event::PanicContained { peer_id, .. } if peer_id.as_str() == "eve")));
    assert_eq!(text_on(&sim, relay, &doc), before);
    others_unaffected(&mut sim, &clients, &doc, "after the panic");
}

/// A client cannot speak for another: an ephemeral message whose sender
/// is not the peer on that connection is dropped by the relay, so it can
/// neither impersonate Alice nor poison her de-duplication counter.
#[test]
fn spoofed_ephemeral_senders_are_dropped() {
    let (mut sim, relay, clients, doc) = busy_relay(|_| {});
    eve_joins(&mut sim, relay);
    let alice = sim.nodes[clients[0]].engine.as_ref().expect("alive");
    let forged = Message::Ephemeral(converge_core::wire::EphemeralMessage {
        sender_id: PeerId::new("alice").expect("valid"),
        target_id: PeerId::new("relay").expect("valid"),
        document_id: doc.clone(),
        count: 1 << 50,
        session_id: alice.session_id().clone(),
        data: b"forged".to_vec(),
    });
    sim.inject(relay, EVE, wire::encode(&forged));
    sim.run_until_quiescent(SETTLE);
    for &c in &clients[1..] {
        assert!(
            !sim.nodes[c]
                .events
                .iter()
                .any(|e| matches!(e, Event::Ephemeral { .. })),
            "{} received a forged message",
            sim.nodes[c].name
        );
    }
    // Alice's real messages still get through.
    sim.command(
        clients[0],
        Command::Broadcast {
            document_id: doc.clone(),
            data: b"real".to_vec(),
        },
    );
    sim.run_until_quiescent(SETTLE);
    for &c in &clients[1..] {
        assert!(sim.nodes[c]
            .events
            .iter()
            .any(|e| matches!(e, Event::Ephemeral { data, .. } if data == b"real")));
    }
}
