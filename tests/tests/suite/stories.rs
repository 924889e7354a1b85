//! Small stories on the simulator, each proving one behaviour.

use automerge::transaction::Transactable;
use automerge::{ReadDoc, ROOT};
use std::time::Duration;

use converge_core::engine::{
    CloseReason, Command, CommandResult, ConnectionId, DocStatus, EngineConfig, Event, FindError,
    Origin, ReplicaKind,
};
use converge_core::wire::{self, DocumentId, Message, PeerId};
use converge_tests::scenario::text_on;
use converge_tests::sim::{result, seed_document, NetConfig, Role, Sim};

const SETTLE: u64 = 100_000;

fn world(clients: &[&str]) -> (Sim, usize, Vec<usize>) {
    let mut sim = Sim::new(7, NetConfig::default());
    let relay = sim.add_node("relay", Role::Relay);
    let ids = clients
        .iter()
        .map(|name| {
            let c = sim.add_node(name, Role::Client);
            sim.link(c, relay);
            c
        })
        .collect();
    sim.run_until_quiescent(SETTLE);
    (sim, relay, ids)
}

fn type_text(sim: &mut Sim, node: usize, doc: &DocumentId, s: &str) -> bool {
    let s = s.to_owned();
    sim.edit(node, doc, move |am| {
        let mut tx = am.transaction();
        let (_, text) = tx.get(ROOT, "text").ok().flatten().expect("text exists");
        let len = tx.length(&text);
        tx.splice_text(&text, len, 0, &s).expect("splice");
        tx.commit();
    })
}

/// What a `find` answered.
#[derive(Debug, PartialEq)]
enum Answer {
    Found(DocumentId),
    Unavailable(DocumentId),
}

fn find(sim: &mut Sim, node: usize, doc: &DocumentId) -> Option<Answer> {
    let cmd = sim.command(
        node,
        Command::Find {
            document_id: doc.clone(),
        },
    )?;
    sim.run_until_quiescent(SETTLE);
    match result(sim, node, cmd)? {
        CommandResult::Find(Ok(id)) => Some(Answer::Found(id.clone())),
        CommandResult::Find(Err(FindError::Unavailable(id))) => {
            Some(Answer::Unavailable(id.clone()))
        }
        other => panic!("find answered {other:?}"),
    }
}

/// Alice creates a document; Bob, who only knows its id, finds it through
/// the relay; each then sees the other's typing.
#[test]
fn two_clients_sync_through_a_relay() {
    let (mut sim, _relay, c) = world(&["alice", "bob"]);
    let (alice, bob) = (c[0], c[1]);
    let doc = sim.create(alice, &seed_document());
    assert!(type_text(&mut sim, alice, &doc, "hello"));
    sim.run_until_quiescent(SETTLE);
    assert_eq!(find(&mut sim, bob, &doc), Some(Answer::Found(doc.clone())));
    assert_eq!(text_on(&sim, bob, &doc), "hello");
    assert!(type_text(&mut sim, bob, &doc, " world"));
    sim.run_until_quiescent(SETTLE);
    assert_eq!(text_on(&sim, alice, &doc), "hello world");
    // Bob's edit reached Alice as a remote change from the relay.
    assert!(sim.nodes[alice].events.iter().any(|e| matches!(e,
        Event::DocChanged { origin: Origin::Remote(p), .. } if p.as_str() == "relay")));
}

/// Both sides edit while cut off from each other; after the partition
/// heals they hold the same merged text.
#[test]
fn offline_edits_merge_after_the_partition_heals() {
    let (mut sim, relay, c) = world(&["alice", "bob"]);
    let (alice, bob) = (c[0], c[1]);
    let doc = sim.create(alice, &seed_document());
    sim.run_until_quiescent(SETTLE);
    find(&mut sim, bob, &doc);
    sim.partition(&[alice]);
    sim.advance(5_000);
    assert!(type_text(&mut sim, alice, &doc, "A"));
    assert!(type_text(&mut sim, bob, &doc, "B"));
    sim.advance(5_000);
    assert_eq!(
        text_on(&sim, relay, &doc).len(),
        1,
        "only Bob's edit got through"
    );
    sim.heal();
    sim.run_until_quiescent(SETTLE);
    let merged = text_on(&sim, alice, &doc);
    assert_eq!(merged.len(), 2);
    assert_eq!(text_on(&sim, bob, &doc), merged);
    assert_eq!(text_on(&sim, relay, &doc), merged);
}

/// Asking for a document nobody reachable has ends in `Unavailable`, not
/// a hang. When the document later reaches the relay, the relay passes it
/// on to the client that asked.
#[test]
fn unknown_documents_are_unavailable_and_arrive_later() {
    let (mut sim, relay, c) = world(&["alice", "bob"]);
    let (alice, bob) = (c[0], c[1]);
    // Alice works offline on a new document.
    sim.unlink(alice, relay);
    sim.run_until_quiescent(SETTLE);
    let doc = sim.create(alice, &seed_document());
    assert!(type_text(&mut sim, alice, &doc, "draft"));
    // Bob has the link (say, from a chat message) and asks for it.
    assert_eq!(
        find(&mut sim, bob, &doc),
        Some(Answer::Unavailable(doc.clone()))
    );
    assert_eq!(
        sim.nodes[relay]
            .engine
            .as_ref()
            .and_then(|e| e.status(&doc)),
        Some(DocStatus::Unavailable)
    );
    // A truly unknown id is unavailable too.
    let nobody = DocumentId::from_random([42; 16]);
    assert_eq!(
        find(&mut sim, bob, &nobody),
        Some(Answer::Unavailable(nobody))
    );
    // Alice comes online; her document reaches the relay and, through it,
    // Bob, who asked earlier.
    sim.link(alice, relay);
    sim.run_until_quiescent(SETTLE);
    assert_eq!(text_on(&sim, bob, &doc), "draft");
    assert_eq!(
        sim.nodes[bob].engine.as_ref().and_then(|e| e.status(&doc)),
        Some(DocStatus::Ready)
    );
}

/// Bob asks for Alice's new document at the very moment she creates it,
/// before her first sync round reaches the relay: the relay, which has
/// heard Alice say she has it, waits for it instead of answering
/// "unavailable".
#[test]
fn a_find_racing_the_creation_still_succeeds() {
    let (mut sim, _relay, c) = world(&["alice", "bob"]);
    let (alice, bob) = (c[0], c[1]);
    let doc = sim.create(alice, &seed_document());
    let cmd = sim
        .command(
            bob,
            Command::Find {
                document_id: doc.clone(),
            },
        )
        .expect("bob is alive");
    sim.run_until_quiescent(SETTLE);
    assert!(matches!(
        result(&sim, bob, cmd),
        Some(CommandResult::Find(Ok(id))) if *id == doc
    ));
}

/// The relay keeps documents on its disk: after it restarts, a new client
/// finds a document whose author is gone.
#[test]
fn a_relay_restart_keeps_documents() {
    let (mut sim, relay, c) = world(&["alice"]);
    let alice = c[0];
    let doc = sim.create(alice, &seed_document());
    assert!(type_text(&mut sim, alice, &doc, "kept"));
    sim.run_until_quiescent(SETTLE);
    sim.crash(alice);
    sim.crash(relay);
    sim.run_until_quiescent(SETTLE);
    sim.restart(relay);
    let carol = sim.add_node("carol", Role::Client);
    sim.link(carol, relay);
    sim.run_until_quiescent(SETTLE);
    assert_eq!(
        find(&mut sim, carol, &doc),
        Some(Answer::Found(doc.clone()))
    );
    assert_eq!(text_on(&sim, carol, &doc), "kept");
}

/// A relay with a hot set of one document drops cold documents from
/// memory and reads them back from its disk when they are asked for.
#[test]
fn a_relay_evicts_cold_documents_and_reloads_them() {
    let mut sim = Sim::new(5, NetConfig::default());
    let relay = sim.add_node_with("relay", Role::Relay, |cfg| cfg.max_docs_in_memory = 1);
    let alice = sim.add_node("alice", Role::Client);
    sim.link(alice, relay);
    sim.run_until_quiescent(SETTLE);
    let docs: Vec<DocumentId> = (0..3)
        .map(|_| sim.create(alice, &seed_document()))
        .collect();
    for (i, doc) in docs.iter().enumerate() {
        assert!(type_text(&mut sim, alice, doc, &format!("doc{i}")));
    }
    sim.run_until_quiescent(SETTLE);
    // While Alice syncs all three they are hot; once she leaves they are
    // cold and all but one are dropped.
    sim.unlink(alice, relay);
    sim.run_until_quiescent(SETTLE);
    sim.advance(10);
    let in_memory = sim.nodes[relay]
        .engine
        .as_ref()
        .expect("alive")
        .documents()
        .count();
    assert!(in_memory <= 1, "relay still holds {in_memory} documents");
    let bob = sim.add_node("bob", Role::Client);
    sim.link(bob, relay);
    sim.run_until_quiescent(SETTLE);
    for (i, doc) in docs.iter().enumerate() {
        assert_eq!(find(&mut sim, bob, doc), Some(Answer::Found(doc.clone())));
        assert_eq!(text_on(&sim, bob, doc), format!("doc{i}"));
    }
}

/// Ephemeral messages reach the document's other peers through the relay
/// with sender, session and count intact; a duplicate is dropped.
#[test]
fn ephemeral_messages_fan_out_once() {
    // Every message is delivered twice.
    let net = NetConfig {
        duplicate: 1.0,
        ..NetConfig::default()
    };
    let mut sim = Sim::new(11, net);
    let relay = sim.add_node("relay", Role::Relay);
    let names = ["alice", "bob", "carol"];
    let c: Vec<usize> = names
        .iter()
        .map(|n| {
            let id = sim.add_node(n, Role::Client);
            sim.link(id, relay);
            id
        })
        .collect();
    sim.run_until_quiescent(SETTLE);
    let doc = sim.create(c[0], &seed_document());
    sim.run_until_quiescent(SETTLE);
    for &n in &c[1..] {
        find(&mut sim, n, &doc);
    }
    sim.command(
        c[0],
        Command::Broadcast {
            document_id: doc.clone(),
            data: b"cursor:5".to_vec(),
        },
    );
    sim.run_until_quiescent(SETTLE);
    let alice_session = sim.nodes[c[0]]
        .engine
        .as_ref()
        .expect("alive")
        .session_id()
        .clone();
    for &n in &c[1..] {
        let got: Vec<_> = sim.nodes[n]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Ephemeral {
                    sender_id,
                    session_id,
                    count,
                    data,
                    ..
                } => Some((
                    sender_id.as_str().to_owned(),
                    session_id.clone(),
                    *count,
                    data.clone(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            got,
            vec![(
                "alice".to_owned(),
                alice_session.clone(),
                1,
                b"cursor:5".to_vec()
            )]
        );
    }
    // Alice never hears her own message back.
    assert!(!sim.nodes[c[0]]
        .events
        .iter()
        .any(|e| matches!(e, Event::Ephemeral { .. })));
}

/// A reconnecting peer whose sync state was persisted (it has a storage
/// id) exchanges far fewer bytes than an ephemeral one that starts fresh.
#[test]
fn persisted_sync_state_makes_reconnects_cheap() {
    let measure = |persistent: bool| {
        let mut sim = Sim::new(3, NetConfig::default());
        let relay = sim.add_node("relay", Role::Relay);
        let bob = sim.add_node_with("bob", Role::Client, |cfg| {
            if !persistent {
                cfg.storage_id = None;
            }
        });
        let alice = sim.add_node("alice", Role::Client);
        sim.link(alice, relay);
        sim.link(bob, relay);
        sim.run_until_quiescent(SETTLE);
        let doc = sim.create(alice, &seed_document());
        for i in 0..1000 {
            type_text(&mut sim, alice, &doc, &format!("{}", i % 10));
            sim.advance(1);
        }
        sim.run_until_quiescent(SETTLE);
        find(&mut sim, bob, &doc);
        sim.unlink(bob, relay);
        sim.run_until_quiescent(SETTLE);
        type_text(&mut sim, alice, &doc, "!");
        sim.run_until_quiescent(SETTLE);
        let before = sim.nodes[relay].bytes_sent + sim.nodes[bob].bytes_sent;
        sim.link(bob, relay);
        sim.run_until_quiescent(SETTLE);
        assert_eq!(text_on(&sim, bob, &doc).len(), 1001);
        sim.nodes[relay].bytes_sent + sim.nodes[bob].bytes_sent - before
    };
    let (stored, fresh) = (measure(true), measure(false));
    assert!(
        stored * 2 < fresh,
        "stored-state reconnect {stored} B vs fresh {fresh} B"
    );
}

/// The same seed gives the same run, message for message.
#[test]
fn runs_replay_exactly_from_their_seed() {
    let run = || {
        let scenario = converge_tests::scenario::random_scenario(1234);
        converge_tests::scenario::run(&scenario)
            .expect("converges")
            .trace
    };
    assert_eq!(run(), run());
}

/// Handshake rules: no `"1"` in the versions gets an error and a close; a
/// message before `join` closes the connection; a second connection with
/// the same peer id replaces the first.
#[test]
fn handshake_rules() {
    let (mut sim, relay, _) = world(&[]);
    let join = |versions: Option<Vec<&str>>| {
        wire::encode(&Message::Join {
            sender_id: PeerId::new("eve").expect("valid"),
            metadata: None,
            supported_protocol_versions: versions
                .map(|v| v.into_iter().map(String::from).collect()),
        })
    };
    sim.open_raw(relay, ConnectionId(900));
    sim.inject(relay, ConnectionId(900), join(Some(vec!["2"])));
    assert!(
        matches!(&sim.nodes[relay].raw_out[0], (ConnectionId(900), Message::Error { message, .. }) if message == "unsupported protocol version")
    );
    assert!(sim.nodes[relay]
        .closed
        .iter()
        .any(|(c, _)| *c == ConnectionId(900)));

    sim.open_raw(relay, ConnectionId(901));
    let early = wire::encode(&Message::Leave {
        sender_id: PeerId::new("eve").expect("valid"),
    });
    sim.inject(relay, ConnectionId(901), early);
    assert!(sim.nodes[relay]
        .closed
        .iter()
        .any(|(c, r)| *c == ConnectionId(901)
            && matches!(
                r,
                CloseReason::UnexpectedFirst {
                    expected: "join",
                    ..
                }
            )));

    // A missing version list means version 1.
    sim.open_raw(relay, ConnectionId(902));
    sim.inject(relay, ConnectionId(902), join(None));
    assert!(sim.nodes[relay]
        .raw_out
        .iter()
        .any(|(c, m)| *c == ConnectionId(902) && matches!(m, Message::Peer { .. })));
    sim.open_raw(relay, ConnectionId(903));
    sim.inject(relay, ConnectionId(903), join(Some(vec!["1"])));
    assert!(sim.nodes[relay]
        .closed
        .iter()
        .any(|(c, r)| *c == ConnectionId(902) && matches!(r, CloseReason::Replaced)));
    let peers: Vec<_> = sim.nodes[relay]
        .engine
        .as_ref()
        .expect("alive")
        .connected_peers()
        .map(|(_, c)| c)
        .collect();
    assert_eq!(peers, vec![ConnectionId(903)]);
}

/// A relay that reads two of a client's messages in one batch — the change
/// it lacked, then the client's "I am at these heads" — still tells the
/// client it now holds that change. Automerge takes a changeless message
/// naming our heads as proof the peer knows them; here the answer that
/// would have told it was still due, and without it the client's sync
/// status stayed behind until the resync timer (the Kotlin binding's
/// `waitSynced` timing out).
#[test]
fn a_batched_relay_still_acknowledges_every_change() {
    for kind in [ReplicaKind::FullDocument, ReplicaKind::ChangeLog] {
        let net = NetConfig {
            latency: (5, 5),
            storage_latency: (1, 1),
            ..NetConfig::default()
        };
        let mut sim = Sim::new(13, net);
        let no_resync = |c: &mut EngineConfig| c.resync_interval = Duration::from_secs(600);
        let relay = sim.add_node_with("relay", Role::Relay, |c| {
            no_resync(c);
            c.replica = kind.factory();
        });
        let alice = sim.add_node_with("alice", Role::Client, no_resync);
        sim.link(alice, relay);
        sim.run_until_quiescent(SETTLE);
        let doc = sim.create(alice, &seed_document());
        sim.run_until_quiescent(SETTLE);

        assert!(type_text(&mut sim, alice, &doc, "a"));
        // The relay takes the change and answers; the answer is on its way.
        sim.advance(6);
        sim.hold(relay);
        assert!(type_text(&mut sim, alice, &doc, "b"));
        // The answer reaches Alice, who replies with her heads; the relay
        // gets that together with the second change.
        sim.advance(12);
        sim.release(relay);
        sim.advance(50);

        let status = sim.nodes[alice]
            .engine
            .as_ref()
            .and_then(|e| e.sync_status(&doc))
            .expect("alice holds the document");
        assert!(
            !status.peers.is_empty() && status.peers.iter().all(|p| p.in_sync),
            "{kind:?}: the relay never acknowledged Alice's last change: {status:?}"
        );
        assert_eq!(text_on(&sim, relay, &doc), "ab", "{kind:?}");
    }
}
