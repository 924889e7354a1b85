//! The change log's tests: against automerge (same messages, same
//! ancestry), through snapshots opened lazily or at once, and under
//! hostile input.

use std::collections::BTreeSet;

use automerge::sync::{BloomFilter, MessageVersion};
use automerge::transaction::Transactable;
use automerge::{Change, ReadDoc, ROOT};

use super::clock::{clock_get, merge_into, Clock, CLOCK_CACHE_MAX};
use super::*;
use crate::engine::FullDocument;

/// One step of a xorshift generator: deterministic schedules.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn actor(n: u8) -> ActorId {
    ActorId::from(vec![n; 16])
}

fn full(n: u8) -> Box<dyn Replica> {
    Box::new(FullDocument::new(actor(n)))
}

fn log(n: u8) -> Box<dyn Replica> {
    Box::new(ChangeLog::new(actor(n), 0x5eed))
}

fn edit(r: &mut dyn Replica, key: &str, value: i64) {
    let doc = r.document_mut().expect("editable");
    let mut tx = doc.transaction();
    tx.put(ROOT, key, value).expect("put");
    tx.commit();
    r.absorb_local_edits().expect("absorb");
}

/// Runs the sync protocol between two replicas (through the wire
/// encoding) until neither has anything to say; returns the number of
/// messages.
fn sync(a: &mut dyn Replica, sa: &mut PeerSync, b: &mut dyn Replica, sb: &mut PeerSync) -> usize {
    let mut messages = 0;
    for _ in 0..100 {
        let ab = a.generate_sync_message(sa);
        if let Some(m) = &ab {
            messages += 1;
            let m = sync::Message::decode(&m.clone().encode()).expect("decode");
            b.receive_sync_message(sb, m).expect("b receives");
        }
        let ba = b.generate_sync_message(sb);
        if let Some(m) = &ba {
            messages += 1;
            let m = sync::Message::decode(&m.clone().encode()).expect("decode");
            a.receive_sync_message(sa, m).expect("a receives");
        }
        if ab.is_none() && ba.is_none() {
            return messages;
        }
    }
    panic!("sync did not settle");
}

/// A full document of `edits` edits by actor 1 over `keys` keys.
fn source_with(edits: i64, keys: i64) -> Box<dyn Replica> {
    let mut source = full(1);
    for i in 0..edits {
        edit(source.as_mut(), &format!("k{}", i % keys), i);
    }
    source
}

fn contents(r: &dyn Replica) -> String {
    let doc = r.document().expect("materializes");
    let mut keys: Vec<String> = doc.keys(ROOT).collect();
    keys.sort();
    keys.iter()
        .map(|k| {
            let v = doc.get(ROOT, k).expect("get").expect("value").0;
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn a_change_log_relay_carries_edits_between_clients() {
    let mut a = full(1);
    let mut b = full(2);
    let mut relay = log(9);
    let (mut a_r, mut r_a, mut b_r, mut r_b) = Default::default();
    for i in 0..20 {
        edit(a.as_mut(), &format!("a{i}"), i);
        if i % 3 == 0 {
            edit(b.as_mut(), &format!("b{i}"), i);
        }
        sync(a.as_mut(), &mut a_r, relay.as_mut(), &mut r_a);
        sync(b.as_mut(), &mut b_r, relay.as_mut(), &mut r_b);
    }
    sync(a.as_mut(), &mut a_r, relay.as_mut(), &mut r_a);
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a.heads(), relay.heads());
    assert_eq!(contents(a.as_ref()), contents(b.as_ref()));
    assert_eq!(contents(relay.as_ref()), contents(a.as_ref()));
}

/// The same exchanges against a full-document relay and a change-log
/// relay: same heads after every round, and the same number of
/// messages (the protocol state machines agree).
#[test]
fn change_log_and_full_document_relays_behave_alike() {
    let mut rounds = Vec::new();
    for relay_kind in [ReplicaKind::FullDocument, ReplicaKind::ChangeLog] {
        let mut clients: Vec<Box<dyn Replica>> = (1..=3).map(full).collect();
        let mut relay = relay_kind.factory()(actor(9), 0x5eed);
        let mut to_relay: Vec<PeerSync> = (0..3).map(|_| PeerSync::default()).collect();
        let mut from_relay: Vec<PeerSync> = (0..3).map(|_| PeerSync::default()).collect();
        let mut trace = Vec::new();
        // A deterministic pseudo-random schedule.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..120 {
            xorshift(&mut x);
            let c = (x % 3) as usize;
            if x % 5 != 0 {
                edit(clients[c].as_mut(), &format!("k{}", x % 7), step);
            }
            if x % 4 != 0 {
                let n = sync(
                    clients[c].as_mut(),
                    &mut to_relay[c],
                    relay.as_mut(),
                    &mut from_relay[c],
                );
                trace.push((n, relay.heads()));
            }
        }
        // Two passes: the first brings everything to the relay, the
        // second back to every client.
        for c in (0..3).chain(0..3) {
            sync(
                clients[c].as_mut(),
                &mut to_relay[c],
                relay.as_mut(),
                &mut from_relay[c],
            );
        }
        for client in &clients {
            assert_eq!(client.heads(), relay.heads());
            assert_eq!(contents(client.as_ref()), contents(relay.as_ref()));
        }
        rounds.push(trace);
    }
    assert_eq!(rounds[0], rounds[1]);
}

/// The relay answers a peer it already answered by looking only at
/// what it held back and what arrived since; every such answer must be
/// the one the full rule gives. Three clients type concurrently and
/// their messages reach the relay late and in bursts, so the relay
/// often answers several times between two messages from a peer.
#[test]
fn incremental_answers_match_the_full_rule() {
    let mut clients: Vec<Box<dyn Replica>> = (1..=3).map(full).collect();
    let mut relay = log(9);
    let mut at_client: Vec<PeerSync> = (0..3).map(|_| PeerSync::default()).collect();
    let mut at_relay: Vec<PeerSync> = (0..3).map(|_| PeerSync::default()).collect();
    // Messages in flight towards the relay, per client.
    let mut inbox: Vec<Vec<sync::Message>> = vec![Vec::new(); 3];
    let (mut incremental, mut compared) = (0, 0);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for step in 0..600 {
        xorshift(&mut x);
        let c = (x % 3) as usize;
        match (x >> 8) % 4 {
            0 | 1 => edit(clients[c].as_mut(), &format!("k{}", x % 11), step),
            _ => {}
        }
        // The client speaks; its message waits in the inbox.
        if let Some(m) = clients[c].generate_sync_message(&mut at_client[c]) {
            inbox[c].push(sync::Message::decode(&m.encode()).expect("decode"));
        }
        // Sometimes the relay reads one client's whole inbox.
        if (x >> 16) % 3 == 0 {
            let r = ((x >> 24) % 3) as usize;
            for m in std::mem::take(&mut inbox[r]) {
                relay
                    .receive_sync_message(&mut at_relay[r], m)
                    .expect("relay receives");
            }
        }
        // The relay answers everyone; compare with the full rule.
        for r in 0..3 {
            let mut full_rule = at_relay[r].clone();
            full_rule.log.offered = None;
            let expected = relay.generate_sync_message(&mut full_rule);
            if at_relay[r].log.offered.is_some() {
                incremental += 1;
            }
            let got = relay.generate_sync_message(&mut at_relay[r]);
            let got = got.map(|m| m.encode());
            assert_eq!(got, expected.map(|m| m.encode()), "step {step}, client {r}");
            assert_eq!(at_relay[r].state.sent_hashes, full_rule.state.sent_hashes);
            compared += 1;
            // The answer reaches the client at once.
            if let Some(bytes) = got {
                let m = sync::Message::decode(&bytes).expect("decode");
                clients[r]
                    .receive_sync_message(&mut at_client[r], m)
                    .expect("client receives");
            }
        }
    }
    for (c, client) in clients.iter().enumerate() {
        assert_eq!(client.heads(), relay.heads(), "client {c}");
    }
    assert!(incremental > compared / 2, "{incremental} of {compared}");
}

/// The same comparison with summaries made by hand, including false
/// claims (what a Bloom filter's false positives do): a reader holds a
/// prefix of the relay's history, acknowledges more of it from time to
/// time, and its filter also claims random changes it lacks, so held
/// back changes are released and claimed ones follow released ones.
#[test]
fn incremental_answers_match_the_full_rule_with_false_claims() {
    let mut writers: Vec<Box<dyn Replica>> = (1..=3).map(full).collect();
    let mut relay = ChangeLog::new(actor(9), 0x5eed);
    let mut peer = PeerSync::default();
    // The relay's heads after every step.
    let mut history: Vec<Vec<ChangeHash>> = vec![Vec::new()];
    let (mut has, mut synced) = (0usize, 0usize);
    let (mut incremental, mut released) = (0, 0);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || xorshift(&mut x);
    // Changes on their way to the relay (the reader may know them
    // already, as a writer knows its own).
    let mut pending: std::collections::VecDeque<(Vec<u8>, ChangeHash)> = Default::default();
    for step in 0..400 {
        // One or two writers type; their changes reach the relay later.
        for _ in 0..1 + next() % 2 {
            let w = (next() % 3) as usize;
            let before = writers[w].heads();
            let value = next() as i64;
            edit(writers[w].as_mut(), &format!("k{}", value % 5), value);
            let all = writers[w].save_after(&before);
            let hash = *writers[w]
                .heads()
                .iter()
                .find(|h| !before.contains(h))
                .expect("new head");
            pending.push_back((all.clone(), hash));
            // Writers see each other now and then (concurrency).
            if next() % 3 == 0 {
                let other = (w + 1) % 3;
                writers[other].load_chunk(&all).expect("writer loads");
            }
        }
        for _ in 0..next() % 4 {
            if let Some((chunk, _)) = pending.pop_front() {
                relay.load_chunk(&chunk).expect("relay loads");
            }
        }
        history.push(relay.heads.clone());
        // Sometimes the reader reports: it has caught up to an earlier
        // point, acknowledges part of that, claims what it has since
        // the acknowledged point plus some changes it lacks, and may
        // ask for one.
        if next() % 3 == 0 {
            has = (has + (next() % 4) as usize).min(history.len() - 1);
            synced = (synced + (next() % 3) as usize).min(has);
            let held = relay.clock_of_set(&history[has]);
            let mut claimed = Vec::new();
            for i in relay.indexes_after(&history[synced]) {
                let e = relay.entries[i as usize];
                if e.seq <= clock_get(&held, e.actor) || next() % 6 == 0 {
                    claimed.push(e.hash);
                }
            }
            claimed.extend(pending.iter().filter(|_| next() % 2 == 0).map(|p| p.1));
            // Now and then it asks for up to three changes (in no
            // particular order, possibly one twice).
            let mut need = Vec::new();
            for _ in 0..next() % 4 {
                if next() % 2 == 0 {
                    let i = (next() % relay.entries.len() as u64) as usize;
                    need.push(relay.entries[i].hash);
                }
            }
            let message = sync::Message {
                heads: history[has].clone(),
                need,
                have: vec![Have {
                    last_sync: history[synced].clone(),
                    bloom: BloomFilter::from_hashes(claimed.iter()),
                }],
                changes: sync::ChunkList::empty(),
                flags: None,
                version: MessageVersion::V1,
            };
            relay
                .receive_sync_message(&mut peer, message)
                .expect("receives");
        }
        let mut full_rule = peer.clone();
        full_rule.log.offered = None;
        let expected = relay.generate_sync_message(&mut full_rule);
        if peer.log.offered.is_some() {
            incremental += 1;
            released += usize::from(!peer.log.withheld.is_empty());
        }
        let got = relay.generate_sync_message(&mut peer);
        assert_eq!(
            got.map(|m| m.encode()),
            expected.map(|m| m.encode()),
            "step {step}"
        );
        assert_eq!(peer.state.sent_hashes, full_rule.state.sent_hashes);
    }
    assert!(
        incremental > 100 && released > 0,
        "{incremental} / {released}"
    );
}

/// A log loaded from a snapshot hands a peer that has nothing that
/// snapshot (and what arrived after it), as automerge hands it `save()`,
/// not every change uncompressed.
#[test]
fn a_peer_with_nothing_gets_the_loaded_snapshot() {
    let mut source = source_with(300, 7);
    let mut relay = ChangeLog::new(actor(9), 0x5eed);
    relay
        .load_chunk(&source.save())
        .expect("loads the snapshot");
    assert!(relay.loaded.is_some());
    let before = source.heads();
    edit(source.as_mut(), "late", 1);
    relay
        .load_chunk(&source.save_after(&before))
        .expect("loads a later change");
    let mut client = full(2);
    let (mut at_client, mut at_relay) = (PeerSync::default(), PeerSync::default());
    let hello = client.generate_sync_message(&mut at_client).expect("asks");
    relay
        .receive_sync_message(&mut at_relay, hello)
        .expect("receives");
    let reply = relay
        .generate_sync_message(&mut at_relay)
        .expect("answers")
        .encode();
    let every_change = relay.concat(&(0..relay.len() as u32).collect::<Vec<_>>());
    assert!(
        reply.len() * 4 < every_change.len(),
        "{} bytes for {} bytes of changes",
        reply.len(),
        every_change.len()
    );
    client
        .receive_sync_message(
            &mut at_client,
            sync::Message::decode(&reply).expect("decodes"),
        )
        .expect("client takes it");
    sync(client.as_mut(), &mut at_client, &mut relay, &mut at_relay);
    assert_eq!(client.heads(), relay.heads());
    assert_eq!(contents(client.as_ref()), contents(source.as_ref()));
}

/// A version 2 peer that lacks more than a third of the history gets
/// the whole document, as automerge answers; one that lacks less gets
/// just those changes. Both answers are automerge's, byte for byte.
#[test]
fn a_peer_lacking_over_a_third_gets_the_whole_document_like_from_automerge() {
    for (known, whole) in [(20usize, true), (26, true), (27, false), (38, false)] {
        let source = source_with(40, 6);
        let history = source.document().expect("full").get_changes(&[]);
        // The peer holds the first `known` changes.
        let upto: Vec<u8> = history[..known]
            .iter()
            .flat_map(|c| c.raw_bytes().to_vec())
            .collect();
        let mut relays: Vec<Box<dyn Replica>> = vec![full(9), log(9)];
        let mut answers = Vec::new();
        for relay in relays.iter_mut() {
            relay.load_chunk(&source.save()).expect("relay loads");
            let mut p = full(2);
            p.load_chunk(&upto).expect("peer loads its part");
            let (mut at_p, mut at_relay) = (PeerSync::default(), PeerSync::default());
            // The relay speaks first; the peer's answer summarises what
            // it has, and the relay answers that.
            let hello = relay.generate_sync_message(&mut at_relay).expect("hello");
            p.receive_sync_message(&mut at_p, hello)
                .expect("peer receives");
            let summary = p.generate_sync_message(&mut at_p).expect("summary");
            relay
                .receive_sync_message(&mut at_relay, summary)
                .expect("relay receives");
            let reply = relay.generate_sync_message(&mut at_relay).expect("reply");
            let is_whole = reply.changes.len() == 1
                && Automerge::load(reply.changes.iter().next().expect("chunk"))
                    .is_ok_and(|d| d.get_changes(&[]).len() == history.len());
            assert_eq!(
                is_whole,
                whole,
                "{known} known, {} relay",
                relay.kind().name()
            );
            answers.push(reply.encode());
        }
        assert_eq!(
            answers[0], answers[1],
            "{known} known: the log answers as automerge"
        );
    }
}

#[test]
fn saves_load_back_into_either_kind() {
    let mut source = source_with(30, 5);
    let mut relay = log(9);
    relay
        .load_chunk(&source.save())
        .expect("load a document chunk");
    assert_eq!(relay.heads(), source.heads());
    let middle = relay.heads();
    edit(source.as_mut(), "late", 1);
    let (mut s1, mut s2) = Default::default();
    sync(source.as_mut(), &mut s1, relay.as_mut(), &mut s2);
    assert_eq!(relay.heads(), source.heads());

    for kind in [ReplicaKind::FullDocument, ReplicaKind::ChangeLog] {
        let mut copy = kind.factory()(actor(3), 0x5eed);
        copy.load_chunk(&relay.save()).expect("reload");
        assert_eq!(copy.heads(), source.heads());
        assert_eq!(contents(copy.as_ref()), contents(source.as_ref()));
        // Incremental: the change after `middle` only.
        let mut partial = kind.factory()(actor(4), 0x5eed);
        partial.load_chunk(&source.save()).expect("load");
        let after = relay.save_after(&middle);
        assert!(!after.is_empty() && after.len() < relay.save().len());
        let mut base = kind.factory()(actor(5), 0x5eed);
        let mut old = full(1);
        for i in 0..30 {
            edit(old.as_mut(), &format!("k{}", i % 5), i);
        }
        base.load_chunk(&old.save()).expect("base");
        base.load_chunk(&after).expect("incremental");
        assert_eq!(base.heads(), source.heads());
    }
}

#[test]
fn changes_arriving_before_their_dependencies_wait() {
    let mut source = full(1);
    for i in 0..5 {
        edit(source.as_mut(), "k", i);
    }
    let doc = source.document().expect("doc");
    let changes = doc.get_changes(&[]);
    let mut relay = ChangeLog::new(actor(9), 0x5eed);
    // Newest first: each waits for the one before it.
    for c in changes.iter().rev() {
        relay.load_chunk(c.raw_bytes()).expect("queued or applied");
    }
    assert_eq!(relay.heads(), source.heads());
    assert_eq!(relay.len(), 5);
    assert!(relay.queue.is_empty());
}

#[test]
fn hostile_changes_are_refused_without_a_trace() {
    let mut relay = ChangeLog::new(actor(9), 0x5eed);
    let mut a = full(1);
    edit(a.as_mut(), "x", 1);
    relay.load_chunk(&a.save()).expect("load");
    let heads = relay.heads();
    let saved = relay.save();

    // Corrupt bytes.
    let mut bad = a.save();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert!(relay.load_chunk(&bad).is_err());
    assert!(relay.load_chunk(b"not automerge at all").is_err());

    // Two different changes by one actor with the same seq (two
    // documents forked with the same actor).
    let mut twin = full(1);
    edit(twin.as_mut(), "x", 2);
    let mut forged = full(1);
    edit(forged.as_mut(), "y", 3);
    edit(forged.as_mut(), "y", 4);
    let mut fresh = ChangeLog::new(actor(8), 0x5eed);
    fresh.load_chunk(&twin.save()).expect("first one");
    assert!(fresh.load_chunk(&a.save()).is_err(), "same actor and seq");
    // A valid change followed by one that reuses a seq: neither lands.
    assert!(relay.load_chunk(&forged.save()).is_err());
    assert_eq!(relay.heads(), heads);
    assert_eq!(relay.save(), saved);
    assert!(relay.queue.is_empty());
}

#[test]
fn a_change_with_a_wrong_checksum_is_refused_by_both_kinds() {
    let mut a = full(1);
    edit(a.as_mut(), "x", 1);
    let change = a.document().expect("doc").get_changes(&[])[0]
        .raw_bytes()
        .to_vec();
    let mut bad = change.clone();
    bad[4] ^= 0x01;
    for kind in [ReplicaKind::FullDocument, ReplicaKind::ChangeLog] {
        let mut r = kind.factory()(actor(7), 0x5eed);
        assert!(r.load_chunk(&bad).is_err(), "{}", kind.name());
        assert!(r.is_empty());
        r.load_chunk(&change).expect("the intact change loads");
    }
}

#[test]
fn local_edits_on_the_materialized_document_enter_the_log() {
    let mut relay = log(9);
    edit(relay.as_mut(), "local", 1);
    assert_eq!(relay.heads().len(), 1);
    let mut client = full(1);
    let (mut s1, mut s2) = Default::default();
    sync(relay.as_mut(), &mut s1, client.as_mut(), &mut s2);
    assert_eq!(contents(client.as_ref()), "local=1");
    // A remote change drops the materialized copy; reading rebuilds it.
    edit(client.as_mut(), "remote", 2);
    sync(relay.as_mut(), &mut s1, client.as_mut(), &mut s2);
    assert_eq!(contents(relay.as_ref()), "local=1,remote=2");
    edit(relay.as_mut(), "local", 3);
    sync(relay.as_mut(), &mut s1, client.as_mut(), &mut s2);
    assert_eq!(contents(client.as_ref()), "local=3,remote=2");
}

/// Relays hold one log per document in memory (a million stored, tens
/// of thousands hot): the rarely used parts stay boxed.
#[test]
fn a_log_stays_small_in_memory() {
    let size = std::mem::size_of::<ChangeLog>();
    assert!(size <= 512, "ChangeLog is {size} bytes inline");
}

#[test]
fn clocks_merge_entry_wise() {
    let mut a: Clock = vec![(0, 3), (2, 1), (5, 9)];
    merge_into(&mut a, &vec![(1, 4), (2, 7), (5, 2), (8, 1)]);
    assert_eq!(a, vec![(0, 3), (1, 4), (2, 7), (5, 9), (8, 1)]);
    let mut empty = Clock::new();
    merge_into(&mut empty, &a);
    assert_eq!(empty, a);
    merge_into(&mut a, &Clock::new());
    assert_eq!(a, empty);
}

#[test]
fn clocks_survive_cache_trimming() {
    let mut source = full(1);
    let mut other = full(2);
    let mut relay = ChangeLog::new(actor(9), 0x5eed);
    for i in 0..(CLOCK_CACHE_MAX as i64 + 500) {
        if i % 1000 == 0 {
            edit(other.as_mut(), "o", i);
        }
        edit(source.as_mut(), "k", i);
    }
    relay.load_chunk(&source.save()).expect("load");
    relay.load_chunk(&other.save()).expect("load");
    relay.clocks.borrow_mut().clear();
    // An old change's clock is recomputed from scratch.
    let doc = source.document().expect("doc");
    let early = doc.get_changes(&[])[10].hash();
    let after = relay.indexes_after(&[early]);
    assert_eq!(after.len(), relay.len() - 11);
}

/// The changes after `set` by the log and by automerge, both sorted.
fn after_both(
    log: &ChangeLog,
    reference: &Automerge,
    set: &[ChangeHash],
) -> (Vec<ChangeHash>, Vec<ChangeHash>) {
    let mut ours: Vec<ChangeHash> = log
        .indexes_after(set)
        .into_iter()
        .map(|i| log.entries[i as usize].hash)
        .collect();
    let mut want: Vec<ChangeHash> = reference
        .get_changes(set)
        .iter()
        .map(|c| c.hash())
        .collect();
    ours.sort();
    want.sort();
    (ours, want)
}

/// Ancestry by clocks against automerge's own answer, on random
/// histories of several actors fed to the log in a shuffled order,
/// asking about random sets of changes (including ones that arrive
/// only later: a set's clock must not be remembered while incomplete).
#[test]
fn changes_after_any_heads_match_automerge() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| xorshift(&mut x) % n;
    for round in 0..20 {
        let mut peers: Vec<Box<dyn Replica>> = (1..=4).map(full).collect();
        let mut all = Vec::new();
        for step in 0..60 {
            let p = next(4) as usize;
            edit(peers[p].as_mut(), &format!("k{}", next(5)), step);
            if next(3) == 0 {
                // Merge one peer into another so histories interleave.
                let q = next(4) as usize;
                if q != p {
                    let bytes = peers[p].save();
                    peers[q].load_chunk(&bytes).expect("merge");
                }
            }
        }
        for p in &peers {
            for c in p.document().expect("doc").get_changes(&[]) {
                all.push(c);
            }
        }
        let mut reference = Automerge::new();
        reference.apply_changes(all.clone()).expect("apply");
        let hashes: Vec<ChangeHash> = reference
            .get_changes(&[])
            .iter()
            .map(|c| c.hash())
            .collect();
        let mut log = ChangeLog::new(actor(9), 0x5eed);
        // Shuffle the arrival order; ask questions while it fills.
        let mut order: Vec<usize> = (0..all.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, next(i as u64 + 1) as usize);
        }
        for (n, &i) in order.iter().enumerate() {
            log.load_chunk(all[i].raw_bytes()).expect("load");
            if n % 7 == 0 || n + 1 == order.len() {
                let k = 1 + next(3) as usize;
                let mut set: Vec<ChangeHash> = (0..k)
                    .map(|_| hashes[next(hashes.len() as u64) as usize])
                    .collect();
                set.sort();
                set.dedup();
                // Ask now (maybe about changes not yet held)...
                let _ = log.indexes_after(&set);
                if n + 1 == order.len() {
                    // ...and once everything is there, compare.
                    let (ours, want) = after_both(&log, &reference, &set);
                    assert_eq!(ours, want, "round {round}");
                }
            }
        }
        assert_eq!(log.heads(), reference.get_heads(), "round {round}");
        // Every remembered set is checked against automerge too.
        let memo: Vec<Vec<ChangeHash>> = log
            .set_clocks
            .borrow()
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        for set in memo {
            let (ours, want) = after_both(&log, &reference, &set);
            assert_eq!(ours, want, "round {round}, remembered set");
        }
    }
}

/// A log loaded from a snapshot of an interleaved history knows every
/// change at once but rebuilds their bytes only when single changes are
/// asked for; then they are automerge's own, in the log's order, also
/// after later changes arrived and with a materialized copy around.
#[test]
fn a_log_from_a_snapshot_rebuilds_changes_on_demand() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| xorshift(&mut x) % n;
    for round in 0..16 {
        // Odd rounds open the snapshot lazily (see `Unopened`).
        let lazy = round % 2 == 1;
        let mut peers: Vec<Box<dyn Replica>> = (1..=3).map(full).collect();
        for step in 0..40 {
            let p = next(3) as usize;
            edit(peers[p].as_mut(), &format!("k{}", next(4)), step);
            let q = next(3) as usize;
            if q != p && next(2) == 0 {
                let bytes = peers[p].save();
                peers[q].load_chunk(&bytes).expect("merge");
            }
        }
        for q in 1..3 {
            let bytes = peers[q].save();
            peers[0].load_chunk(&bytes).expect("merge");
        }
        let reference = peers[0].document().expect("doc").clone();
        let mut log = ChangeLog::new(actor(9), 0x5eed);
        log.open_lazily_from = if lazy { 0 } else { usize::MAX };
        log.load_chunk(&reference.save()).expect("loads");
        assert_eq!(log.heads(), reference.get_heads());
        assert_eq!(log.unopened.is_some(), lazy);
        assert_eq!(log.len(), reference.get_changes(&[]).len());
        // A peer with nothing is handed the snapshot; storage too.
        assert_eq!(log.save(), reference.save());
        if round % 3 == 1 {
            // A materialized copy is the source of the rebuild.
            assert_eq!(contents(&log), contents(peers[0].as_ref()));
        }
        log.open().expect("opens");
        assert!(log.unopened.is_none());
        let loaded = log.loaded.as_ref().expect("kept the snapshot");
        assert_eq!(loaded.covers as usize, log.len());
        assert!(loaded.bytes.get().is_none(), "nothing rebuilt yet");
        assert_eq!(log.save(), reference.save());
        if round % 3 == 2 {
            // A later change arrives before anything is rebuilt.
            let before = peers[1].heads();
            peers[1].load_chunk(&reference.save()).expect("merge");
            edit(peers[1].as_mut(), "late", 1);
            log.load_chunk(&peers[1].save_after(&before))
                .expect("a later change");
            assert!(log.loaded.as_ref().expect("loaded").bytes.get().is_none());
        }
        let everything = peers[if round % 3 == 2 { 1 } else { 0 }]
            .document()
            .expect("doc")
            .get_changes(&[]);
        for change in &everything {
            let idx = log.index[&change.hash()];
            assert_eq!(log.change_bytes(idx), change.raw_bytes(), "round {round}");
        }
        let hashes: Vec<ChangeHash> = everything.iter().map(|c| c.hash()).collect();
        for _ in 0..5 {
            let set = vec![hashes[next(hashes.len() as u64) as usize]];
            let ours = ChangeLog::parse(&log.save_after(&set)).expect("valid changes");
            let want: BTreeSet<ChangeHash> = reference_after(&everything, &set);
            let got: BTreeSet<ChangeHash> = ours.iter().map(|c| c.hash).collect();
            assert_eq!(got, want, "round {round}");
        }
        // What it saves loads back to the same document.
        let mut back = ChangeLog::new(actor(8), 0x5eed);
        back.load_chunk(&log.save()).expect("reloads");
        assert_eq!(back.heads(), log.heads());
    }
}

/// Hashes of the changes in `all` that are not ancestors of `heads`.
fn reference_after(all: &[Change], heads: &[ChangeHash]) -> BTreeSet<ChangeHash> {
    let mut doc = Automerge::new();
    doc.apply_changes(all.to_vec()).expect("apply");
    doc.get_changes(heads).iter().map(|c| c.hash()).collect()
}

/// A large snapshot is answered from by automerge until a change
/// arrives; then it becomes a log and goes on from there, with nothing
/// lost or repeated on either side.
#[test]
fn a_lazily_opened_snapshot_syncs_then_opens_on_the_first_change() {
    let mut source = full(1);
    let mut old = full(2);
    for i in 0..200 {
        edit(source.as_mut(), &format!("k{}", i % 9), i);
        if i == 120 {
            old.load_chunk(&source.save()).expect("an older copy");
        }
    }
    let mut relay = ChangeLog::new(actor(9), 0x5eed);
    relay.open_lazily_from = 0;
    relay.load_chunk(&source.save()).expect("loads");
    assert!(relay.unopened.is_some());
    assert!(relay.has_change(&source.heads()[0]));
    assert!(!relay.has_change(&ChangeHash([7; 32])));
    // A peer with part of the history catches up without opening it.
    let (mut at_old, mut at_relay_old) = (PeerSync::default(), PeerSync::default());
    sync(old.as_mut(), &mut at_old, &mut relay, &mut at_relay_old);
    assert_eq!(old.heads(), source.heads());
    assert!(relay.unopened.is_some(), "no change arrived");
    assert!(relay.save_after(&source.heads()).is_empty());
    // Its next edit opens the log, mid-session.
    edit(old.as_mut(), "from old", 1);
    sync(old.as_mut(), &mut at_old, &mut relay, &mut at_relay_old);
    assert!(relay.unopened.is_none());
    assert_eq!(relay.heads(), old.heads());
    // A fresh peer gets everything, from the log.
    let mut fresh = full(3);
    let (mut at_fresh, mut at_relay_fresh) = (PeerSync::default(), PeerSync::default());
    sync(
        fresh.as_mut(),
        &mut at_fresh,
        &mut relay,
        &mut at_relay_fresh,
    );
    assert_eq!(contents(fresh.as_ref()), contents(old.as_ref()));
    // And what it stores reloads to the same document.
    let mut back = ChangeLog::new(actor(8), 0x5eed);
    back.open_lazily_from = 0;
    back.load_chunk(&relay.save()).expect("reloads");
    assert_eq!(back.heads(), relay.heads());
    assert_eq!(contents(&back), contents(old.as_ref()));
}

/// A log read while still empty (a materialized empty document) and
/// then loaded from a snapshot shows the loaded contents, and rebuilds
/// its changes from them, not from the stale empty copy.
#[test]
fn a_snapshot_loaded_after_a_read_replaces_the_empty_copy() {
    let source = source_with(50, 5);
    let mut log = ChangeLog::new(actor(9), 0x5eed);
    assert!(log.document().is_some(), "an empty document");
    log.load_chunk(&source.save()).expect("loads");
    assert_eq!(contents(&log), contents(source.as_ref()));
    for change in source.document().expect("doc").get_changes(&[]) {
        let idx = log.index[&change.hash()];
        assert_eq!(log.change_bytes(idx), change.raw_bytes());
    }
}

/// Automerge answers every peer with nothing by saving the whole
/// document again; an unopened snapshot lets it answer the first (a
/// cold start), and opens the log for the next, which is handed the
/// stored snapshot as it is.
#[test]
fn a_second_peer_with_nothing_opens_the_log_and_gets_the_stored_snapshot() {
    let source = source_with(100, 5);
    let stored = source.save();
    let mut relay = ChangeLog::new(actor(9), 0x5eed);
    relay.open_lazily_from = 0;
    relay.load_chunk(&stored).expect("loads");
    let mut first = full(2);
    let (mut a, mut b) = (PeerSync::default(), PeerSync::default());
    sync(first.as_mut(), &mut a, &mut relay, &mut b);
    assert!(relay.unopened.is_some(), "the first one is automerge's");
    assert_eq!(contents(first.as_ref()), contents(source.as_ref()));

    let mut second = full(3);
    let (mut c, mut d) = (PeerSync::default(), PeerSync::default());
    let hello = second.generate_sync_message(&mut c).expect("asks");
    relay.receive_sync_message(&mut d, hello).expect("receives");
    assert!(relay.unopened.is_none(), "the second one opens the log");
    let reply = relay.generate_sync_message(&mut d).expect("answers");
    let chunks: Vec<&[u8]> = reply.changes.iter().collect();
    assert_eq!(chunks, vec![stored.as_slice()]);
    second
        .receive_sync_message(&mut c, reply)
        .expect("takes it");
    sync(second.as_mut(), &mut c, &mut relay, &mut d);
    assert_eq!(contents(second.as_ref()), contents(source.as_ref()));
}
