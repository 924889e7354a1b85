//! The sync protocol's rules, answered from the log: what to send a peer
//! (automerge's rule, and the incremental form for a peer answered before),
//! our own summary (Bloom filters), what a peer's message tells us, and the
//! per-peer record ([`PeerLog`]) that makes the incremental form possible.

use std::collections::BTreeSet;

use automerge::sync::{self, BloomFilter, Capability, Have, MessageFlags, MessageVersion};
use automerge::ChangeHash;

use super::clock::SET_CLOCKS;
use super::{ChangeLog, FastSet};
use crate::engine::replica::{settled, PeerSync, Replica, ReplicaError};

/// What a change log remembers about one peer between messages. The
/// engine keeps it in [`PeerSync`] without looking inside; a fresh one has
/// offered nothing, so the next answer follows the full rule.
#[derive(Debug, Clone, Default)]
pub(in crate::engine) struct PeerLog {
    /// How much of its history (a log length) the log has already offered
    /// this peer under the peer's current `have`/`need`, so the next
    /// message only looks at what arrived since.
    pub(super) offered: Option<u32>,
    /// Of those, the ones held back because the peer's summary claimed
    /// them (log indexes, ascending).
    pub(super) withheld: Vec<u32>,
    /// The `last_sync` heads of the summary they were offered under.
    pub(super) offered_from: Vec<ChangeHash>,
}

impl PeerLog {
    /// Forgets what was offered: the next answer follows the full rule.
    fn forget(&mut self) {
        self.offered = None;
        self.withheld = Vec::new();
    }
}

impl ChangeLog {
    /// The next sync message for a peer, if there is one to send (the
    /// log's [`Replica::generate_sync_message`]).
    pub(super) fn answer(&self, peer: &mut PeerSync) -> Option<sync::Message> {
        if let Some(u) = &self.unopened {
            return u.doc.generate_sync_message(peer);
        }
        let state = &mut peer.state;
        if settled(&self.heads, state) {
            return None;
        }
        let our_heads = self.heads.clone();
        let our_need = if state.read_only {
            Vec::new()
        } else {
            self.missing_deps_from(state.their_heads.as_deref().unwrap_or(&[]))
        };
        // Our summary goes along unless we are asking for changes the
        // peer has not announced (built below, once we know we answer).
        let send_have = our_need
            .iter()
            .all(|h| state.their_heads.as_ref().is_some_and(|t| t.contains(h)));
        // The peer claims to have synced up to heads we do not hold: we
        // lost data since. Ask it to start over.
        if let Some(first) = state.their_have.as_ref().and_then(|h| h.first()) {
            if first.last_sync != self.heads && !first.last_sync.iter().all(|h| self.has_change(h))
            {
                let mut flags = MessageFlags::new();
                flags.set(MessageFlags::SUPPORTS_SYNC_RESET);
                return Some(sync::Message {
                    heads: our_heads,
                    need: Vec::new(),
                    have: vec![Have::default()],
                    changes: sync::ChunkList::empty(),
                    flags: Some(flags),
                    version: MessageVersion::V1,
                });
            }
        }
        let v2 = has_capability(state, &Capability::MessageV2);
        let answerable =
            !state.is_peer_read_only() && state.their_have.is_some() && state.their_need.is_some();
        // Only a peer that summarised what it has is offered our changes
        // (one with an empty `have` gets just what it names in `need`).
        let offering = answerable && state.their_have.as_ref().is_some_and(|h| !h.is_empty());
        // What to send, and (for the record kept in `peer`) the changes
        // the peer's summary claims that we therefore hold back.
        let their_last_sync = last_sync_of(state.their_have.as_deref().unwrap_or(&[]));
        let has_nothing = state.their_heads.as_deref() == Some(&[]);
        // A version 2 peer with nothing gets the whole document.
        let whole_document = answerable && has_nothing && v2;
        let (to_send, withheld): (Vec<u32>, Vec<u32>) =
            match (answerable, &state.their_have, &state.their_need) {
                (true, Some(have), Some(need)) => {
                    match peer.log.offered {
                        Some(from) if !has_nothing && from as usize <= self.entries.len() => self
                            .indexes_offered_since(
                                from,
                                &peer.log.withheld,
                                have,
                                &their_last_sync,
                                need,
                                &state.sent_hashes,
                            ),
                        _ if whole_document => {
                            // The peer has nothing: send everything.
                            ((0..self.entries.len() as u32).collect(), Vec::new())
                        }
                        _ => {
                            let (mut out, withheld) = self.indexes_to_send(have, need);
                            let sent = &state.sent_hashes;
                            if out.len() * 8 < sent.len() {
                                // Few candidates: look each up.
                                out.retain(|&i| !sent.contains(&self.entries[i as usize].hash));
                            } else if !sent.is_empty() {
                                let mut ids: FastSet<u32> = self.new_set();
                                ids.extend(sent.iter().filter_map(|h| self.index.get(h).copied()));
                                let sent = ids;
                                out.retain(|i| !sent.contains(i));
                            }
                            (out, withheld)
                        }
                    }
                }
                _ => (Vec::new(), Vec::new()),
            };
        // Like automerge, a version 2 peer that lacks more than a third of
        // the history gets the whole document instead: it costs little more
        // than the changes, and covers any the peer's summary wrongly
        // claimed (a Bloom filter's false positives), saving a round trip.
        let whole_document =
            whole_document || (v2 && answerable && to_send.len() > self.entries.len() / 3);
        let (to_send, withheld) = if whole_document {
            ((0..self.entries.len() as u32).collect(), Vec::new())
        } else {
            (to_send, withheld)
        };

        let heads_unchanged = state.last_sent_heads == our_heads;
        let heads_equal = state.their_heads.as_ref() == Some(&our_heads);
        if heads_unchanged && state.have_responded {
            if (heads_equal || state.read_only) && to_send.is_empty() {
                return None;
            }
            if state.in_flight {
                return None;
            }
        }

        state.have_responded = true;
        state.last_sent_heads.clone_from(&our_heads);
        if offering {
            peer.log.offered = Some(self.entries.len() as u32);
            peer.log.withheld = withheld;
            peer.log.offered_from = their_last_sync;
        }
        let sending = to_send.iter().map(|&i| self.entries[i as usize].hash);
        if state.sent_hashes.is_empty() {
            // Built in bulk (sorted, then filled leaf by leaf): a whole
            // history at once is several times faster than one by one.
            let mut hashes: Vec<ChangeHash> = sending.collect();
            hashes.sort_unstable();
            state.sent_hashes = hashes.into_iter().collect();
        } else {
            state.sent_hashes.extend(sending);
        }

        let mut flags = MessageFlags::new();
        flags.set(MessageFlags::SUPPORTS_SYNC_RESET);
        if state.read_only {
            flags.set(MessageFlags::READ_ONLY);
        }
        let heads = if state.needs_reset {
            state.needs_reset = false;
            if has_capability(state, &Capability::SyncReset) {
                flags.set(MessageFlags::SYNC_RESET);
                our_heads
            } else {
                Vec::new()
            }
        } else {
            our_heads
        };
        // Version 2 peers take all changes as one chunk; version 1 peers a
        // list of change chunks.
        let (changes, version) = if v2 {
            let chunks = if to_send.is_empty() {
                Vec::new()
            } else if whole_document {
                // As automerge sends `save()`: with a loaded snapshot, that
                // and whatever arrived after it, rather than every change
                // uncompressed (for a long history, ~200 times the bytes).
                vec![self.save()]
            } else {
                vec![self.concat(&to_send)]
            };
            (sync::ChunkList::from(chunks), MessageVersion::V2)
        } else {
            let chunks: Vec<Vec<u8>> = to_send
                .iter()
                .map(|&i| self.change_bytes(i).to_vec())
                .collect();
            (sync::ChunkList::from(chunks), MessageVersion::V1)
        };
        let our_have = if send_have {
            vec![self.bloom_since(state.shared_heads.clone())]
        } else {
            Vec::new()
        };
        state.in_flight = true;
        Some(sync::Message {
            heads,
            need: our_need,
            have: our_have,
            changes,
            flags: Some(flags),
            version,
        })
    }

    /// Applies a (validated) sync message from a peer (the log's
    /// [`Replica::receive_sync_message`]).
    pub(super) fn take_message(
        &mut self,
        peer: &mut PeerSync,
        message: sync::Message,
    ) -> Result<(), ReplicaError> {
        if let Some(u) = &mut self.unopened {
            let fresh = message.heads.is_empty();
            if (message.changes.is_empty() || peer.state.read_only)
                && !(fresh && u.answered_a_fresh_peer)
            {
                u.answered_a_fresh_peer |= fresh;
                return u.doc.receive_sync_message(peer, message);
            }
        }
        self.open()?;
        let state = &mut peer.state;
        // Parse everything before touching the state: a message we refuse
        // leaves no trace.
        let mut incoming = Vec::new();
        if !state.read_only {
            for chunk in message.changes.iter() {
                incoming.extend(Self::parse(chunk)?);
            }
        }
        state.in_flight = false;
        let had_changes = !message.changes.is_empty();
        let before = if had_changes {
            self.heads.clone()
        } else {
            Vec::new()
        };
        if let Some(flags) = message.flags {
            let caps: &[Capability] = if flags.contains(MessageFlags::SUPPORTS_SYNC_RESET) {
                &[Capability::MessageV2, Capability::SyncReset]
            } else {
                &[Capability::MessageV2]
            };
            if state.their_capabilities.as_deref() != Some(caps) {
                state.their_capabilities = Some(caps.to_vec());
            }
            if flags.contains(MessageFlags::SYNC_RESET) {
                state.sent_hashes.clear();
                peer.log.forget();
            }
            state.peer_read_only = flags.contains(MessageFlags::READ_ONLY);
        }
        if had_changes && !state.read_only {
            self.ingest(incoming)?;
            state.shared_heads = advance_heads(&before, &self.heads, &state.shared_heads);
        }
        let message_heads = message.heads;
        self.forget_acknowledged(&message_heads, &mut state.sent_hashes);
        if !had_changes && message_heads == self.heads {
            state.last_sent_heads.clone_from(&message_heads);
        }
        // A peer that is up to date (the common acknowledgement) names our
        // own heads: no need to look each one up.
        let all_known =
            message_heads == self.heads || message_heads.iter().all(|h| self.has_change(h));
        if all_known {
            state.shared_heads.clone_from(&message_heads);
            if message_heads.is_empty() {
                // The peer lost everything: start over with it.
                state.last_sent_heads = Vec::new();
                state.sent_hashes.clear();
                peer.log.forget();
            }
        } else {
            let mut shared = std::mem::take(&mut state.shared_heads);
            shared.extend(message_heads.iter().filter(|h| self.has_change(h)));
            shared.sort();
            shared.dedup();
            state.shared_heads = shared;
        }
        // A peer that summarises nothing, or from no common point (a fresh
        // sync state on its side), or from heads we do not know, is
        // answered in full again.
        let fresh_summary = message.have.is_empty()
            || message.have.iter().any(|h| {
                h.last_sync.is_empty()
                    || (h.last_sync != self.heads
                        && !(all_known && h.last_sync == message_heads)
                        && !h.last_sync.iter().all(|x| self.has_change(x)))
            });
        if fresh_summary
            || (peer.log.offered.is_some()
                && !self.moves_forward(&peer.log.offered_from, &message.have))
        {
            peer.log.forget();
        }
        state.their_have = Some(message.have);
        state.their_heads = Some(message_heads);
        state.their_need = Some(message.need);
        Ok(())
    }

    /// Which changes to send a peer that summarised what it has in `have`
    /// and asked for `need`: automerge's rule (everything since the
    /// `last_sync` heads that no Bloom filter claims, plus everything that
    /// depends on those), without walking the whole history.
    /// Also returns the candidates held back because the filters claim
    /// them (in log order), so later messages can look at just those and
    /// what arrives after ([`Self::indexes_offered_since`]).
    fn indexes_to_send(&self, have: &[Have], need: &[ChangeHash]) -> (Vec<u32>, Vec<u32>) {
        let need: Vec<u32> = need
            .iter()
            .filter_map(|h| self.index.get(h).copied())
            .collect();
        if have.is_empty() {
            return (need, Vec::new());
        }
        let candidates = self.indexes_after(&last_sync_of(have));
        // Candidates are in causal order, so one forward pass closes the
        // set under "depends on something we send".
        let mut sending: FastSet<u32> = self.new_set();
        let mut withheld = Vec::new();
        for &idx in &candidates {
            let entry = &self.entries[idx as usize];
            let unclaimed = have.iter().all(|h| !h.bloom.contains_hash(&entry.hash));
            if unclaimed || self.entry_deps(entry).iter().any(|d| sending.contains(d)) {
                sending.insert(idx);
            } else {
                withheld.push(idx);
            }
        }
        let mut out: Vec<u32> = need.into_iter().filter(|i| !sending.contains(i)).collect();
        out.extend(candidates.into_iter().filter(|i| sending.contains(i)));
        (out, withheld)
    }

    /// [`Self::indexes_to_send`] for a peer already answered under an
    /// earlier summary: every change before `from` was then sent, held back
    /// (`withheld`), or an ancestor of its `last_sync`. Its `last_sync` only
    /// moves forward (the caller checks), so only the held-back changes and
    /// those appended since need a look, by the same rule: a candidate is
    /// sent when no filter claims it or it depends on one being sent.
    /// Returns what to send and what stays held back.
    ///
    /// One case differs from the full rule, and only for a dishonest peer:
    /// a change it acknowledged (its heads showed it holds it, so it left
    /// `sent`) that its filter then stops claiming is not sent again here.
    /// An honest filter always claims what the peer holds.
    fn indexes_offered_since(
        &self,
        from: u32,
        withheld: &[u32],
        have: &[Have],
        last_sync: &[ChangeHash],
        need: &[ChangeHash],
        sent: &BTreeSet<ChangeHash>,
    ) -> (Vec<u32>, Vec<u32>) {
        // Asked-for changes in the order asked (as the full rule keeps them).
        let asked: Vec<u32> = need
            .iter()
            .filter(|h| !sent.contains(h))
            .filter_map(|h| self.index.get(h).copied())
            .collect();
        let clock = self.clock_of_set(last_sync);
        let is_candidate = |idx: u32| !self.within(idx, &clock);
        let unclaimed = |idx: u32| {
            let hash = &self.entries[idx as usize].hash;
            have.iter().all(|h| !h.bloom.contains_hash(hash))
        };
        // The full rule's closure ("depends on a change being sent") means:
        // a claimed candidate goes out when one of its ancestors is an
        // unclaimed candidate. Those are among the ones sent and not yet
        // acknowledged, and this round's. Each actor's lowest such sequence
        // number is enough to tell (an ancestor test is then one clock
        // comparison per actor, however many changes are in flight); the
        // sent ones are looked at only once a claimed candidate needs it.
        let mut lowest: Vec<u32> = vec![u32::MAX; self.by_actor.len()];
        let lower = |lowest: &mut Vec<u32>, idx: u32| {
            let e = &self.entries[idx as usize];
            let slot = &mut lowest[e.actor as usize];
            *slot = (*slot).min(e.seq);
        };
        let mut counted_sent = false;
        let mut sending: Vec<u32> = Vec::new();
        let mut still = Vec::new();
        let candidates = withheld
            .iter()
            .copied()
            .chain(from..self.entries.len() as u32)
            .filter(|&i| is_candidate(i));
        for idx in candidates {
            if unclaimed(idx) {
                sending.push(idx);
                lower(&mut lowest, idx);
                continue;
            }
            if !counted_sent {
                counted_sent = true;
                for i in sent.iter().filter_map(|h| self.index.get(h).copied()) {
                    if is_candidate(i) && unclaimed(i) {
                        lower(&mut lowest, i);
                    }
                }
            }
            let follows = self
                .clock_of(idx)
                .iter()
                .any(|&(actor, seq)| lowest[actor as usize] <= seq);
            if follows {
                sending.push(idx);
                lower(&mut lowest, idx);
            } else {
                still.push(idx);
            }
        }
        // As in the full rule: asked-for changes first, then the rest in
        // log order, leaving out what was already sent.
        let mut out: Vec<u32> = asked
            .into_iter()
            .filter(|i| sending.binary_search(i).is_err())
            .collect();
        out.extend(
            sending
                .into_iter()
                .filter(|&i| !sent.contains(&self.entries[i as usize].hash)),
        );
        (out, still)
    }

    /// Whether a peer's new summary starts at or after `before` (every
    /// earlier `last_sync` head is an ancestor of, or one of, the new ones).
    fn moves_forward(&self, before: &[ChangeHash], have: &[Have]) -> bool {
        if let [one] = have {
            if one.last_sync == before {
                return true;
            }
        }
        let now = last_sync_of(have);
        if now == before {
            return true;
        }
        let clock = self.clock_of_set(&now);
        before
            .iter()
            .all(|h| self.index.get(h).is_some_and(|&i| self.within(i, &clock)))
    }

    fn bloom_since(&self, last_sync: Vec<ChangeHash>) -> Have {
        let len = self.entries.len();
        {
            let mut memo = self.blooms.borrow_mut();
            memo.retain(|(at, _)| *at == len);
            if let Some((_, have)) = memo.iter().find(|(_, h)| h.last_sync == last_sync) {
                return have.clone();
            }
        }
        let have = self.build_bloom(last_sync);
        let mut memo = self.blooms.borrow_mut();
        memo.truncate(SET_CLOCKS - 1);
        memo.push((len, have.clone()));
        have
    }

    fn build_bloom(&self, last_sync: Vec<ChangeHash>) -> Have {
        let hashes: Vec<ChangeHash> = self
            .indexes_after(&last_sync)
            .into_iter()
            .map(|i| self.entries[i as usize].hash)
            .collect();
        Have {
            last_sync,
            bloom: BloomFilter::from_hashes(hashes.iter()),
        }
    }

    /// Removes from `sent` every change that is an ancestor of `heads`
    /// (those the peer now has).
    fn forget_acknowledged(&self, heads: &[ChangeHash], sent: &mut BTreeSet<ChangeHash>) {
        if sent.is_empty() {
            return;
        }
        let clock = self.clock_of_set(heads);
        sent.retain(|h| self.index.get(h).is_none_or(|&i| !self.within(i, &clock)));
    }
}

/// The heads a peer's summaries start from, sorted and deduplicated.
fn last_sync_of(have: &[Have]) -> Vec<ChangeHash> {
    if let [one] = have {
        if one.last_sync.windows(2).all(|w| w[0] < w[1]) {
            return one.last_sync.clone();
        }
    }
    let mut last_sync: Vec<ChangeHash> = have
        .iter()
        .flat_map(|h| h.last_sync.iter().copied())
        .collect();
    last_sync.sort();
    last_sync.dedup();
    last_sync
}

fn has_capability(state: &sync::State, cap: &Capability) -> bool {
    state
        .their_capabilities
        .as_ref()
        .is_some_and(|caps| caps.contains(cap))
}

/// Automerge's rule for moving the shared heads forward after applying a
/// peer's changes: our new heads that were not heads before, plus the old
/// shared heads that are still heads.
fn advance_heads(old: &[ChangeHash], new: &[ChangeHash], shared: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut out: Vec<ChangeHash> = new
        .iter()
        .filter(|h| !old.contains(h))
        .chain(shared.iter().filter(|h| new.contains(h)))
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out
}
