//! The arena: every change's entry (hash, dependencies, actor, sequence
//! number, where its bytes are), the indexes by hash and by actor, and
//! ingest — parsing, duplicate checks, the queue of changes waiting for
//! their dependencies, and rolling a failed batch back.

use std::cell::OnceCell;

use automerge::{ActorId, Change, ChangeHash};

use super::clock::{clock_get, include, merge_into, Clock};
use super::{ChangeLog, FastMap, FastSet};
use crate::engine::replica::{
    load_document, parse_change, split_chunks, RawChunk, ReplicaError, CHUNK_CHANGE,
    CHUNK_COMPRESSED_CHANGE, CHUNK_DOCUMENT,
};

/// One change in the log.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) hash: ChangeHash,
    /// Where its bytes are in `ChangeLog::bytes`.
    pub(super) start: usize,
    pub(super) len: u32,
    /// Where its dependencies (log indexes) are in `ChangeLog::deps`.
    deps_start: u32,
    deps_len: u32,
    pub(super) actor: u32,
    pub(super) seq: u32,
}

/// A change parsed from the outside, not yet in the log.
#[derive(Debug, Clone)]
pub(super) struct Incoming {
    pub(super) hash: ChangeHash,
    change: Change,
}

impl Incoming {
    pub(super) fn from_change(change: Change) -> Self {
        Self {
            hash: change.hash(),
            change,
        }
    }

    fn deps(&self) -> &[ChangeHash] {
        self.change.deps()
    }

    fn actor(&self) -> &ActorId {
        self.change.actor_id()
    }

    fn seq(&self) -> u64 {
        self.change.seq()
    }

    /// The change uncompressed, as automerge's own `save_after` and sync
    /// messages carry it (so both kinds of replica write and send the same
    /// bytes).
    fn bytes(&self) -> &[u8] {
        self.change.raw_bytes()
    }
}

impl ChangeLog {
    pub(super) fn entry_deps(&self, e: &Entry) -> &[u32] {
        let start = e.deps_start as usize;
        &self.deps[start..start + e.deps_len as usize]
    }

    fn max_seq(&self, actor: &ActorId) -> u64 {
        self.actor_index
            .get(actor)
            .map_or(0, |&a| self.by_actor[a as usize].len() as u64)
    }

    /// Parses stored or received bytes (any mix of document and change
    /// chunks) into changes. Strict: a corrupt chunk fails the whole input.
    pub(super) fn parse(bytes: &[u8]) -> Result<Vec<Incoming>, ReplicaError> {
        Self::parse_pieces(&split_chunks(bytes)?)
    }

    pub(super) fn parse_pieces(pieces: &[RawChunk<'_>]) -> Result<Vec<Incoming>, ReplicaError> {
        let mut out = Vec::new();
        for &piece in pieces {
            match piece.kind {
                CHUNK_DOCUMENT => {
                    for change in load_document(piece.bytes)?.get_changes(&[]) {
                        out.push(Incoming::from_change(change));
                    }
                }
                CHUNK_CHANGE | CHUNK_COMPRESSED_CHANGE => {
                    // Parsing decodes every op column, so structurally
                    // broken changes never enter the log.
                    out.push(Incoming::from_change(parse_change(piece)?));
                }
                other => {
                    return Err(ReplicaError::Corrupt(format!(
                        "unexpected chunk type {other}"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Adds changes: those whose dependencies are all present go into the
    /// log (in causal order), the rest wait in the queue. All or nothing:
    /// on error the log is as it was. Returns whether the heads moved.
    pub(super) fn ingest(&mut self, incoming: Vec<Incoming>) -> Result<bool, ReplicaError> {
        // The same duplicate rules as automerge: a change we hold is
        // skipped; a different change reusing an (actor, seq) is refused.
        let mut seen: FastSet<ChangeHash> = self.new_set();
        seen.extend(self.queue.iter().map(|c| c.hash));
        let mut keep = vec![false; incoming.len()];
        {
            let mut seqs: FastSet<(&ActorId, u64)> = self.new_set();
            seqs.extend(self.queue.iter().map(|c| (c.actor(), c.seq())));
            for (change, keep) in incoming.iter().zip(&mut keep) {
                if self.index.contains_key(&change.hash) || !seen.insert(change.hash) {
                    continue;
                }
                if self.max_seq(change.actor()) >= change.seq()
                    || !seqs.insert((change.actor(), change.seq()))
                {
                    return Err(duplicate_seq(change.actor(), change.seq()));
                }
                *keep = true;
            }
        }
        let batch: Vec<Incoming> = incoming
            .into_iter()
            .zip(keep)
            .filter_map(|(change, keep)| keep.then_some(change))
            .collect();
        if batch.is_empty() {
            return Ok(false);
        }
        let mut waiting = std::mem::take(&mut self.queue);
        waiting.extend(batch);
        let mark = self.mark();
        let mut appended = false;
        loop {
            let before = waiting.len();
            let mut still = Vec::with_capacity(waiting.len());
            for change in waiting {
                if change.deps().iter().all(|d| self.index.contains_key(d)) {
                    if let Err(e) = self.append(&change) {
                        self.rollback(mark);
                        return Err(e);
                    }
                    appended = true;
                } else {
                    still.push(change);
                }
            }
            waiting = still;
            if waiting.len() == before || waiting.is_empty() {
                break;
            }
        }
        self.queue = waiting;
        if appended {
            // The contents changed under any materialized copy.
            self.materialized = OnceCell::new();
        }
        Ok(appended)
    }

    /// Appends one change whose dependencies are all in the log.
    fn append(&mut self, change: &Incoming) -> Result<(), ReplicaError> {
        self.append_entry(
            change.hash,
            change.deps(),
            change.actor(),
            change.seq(),
            change.bytes(),
        )
    }

    /// Appends a change (its bytes may be empty: see
    /// [`Loaded`](super::snapshot::Loaded)) whose dependencies are all in
    /// the log.
    pub(super) fn append_entry(
        &mut self,
        hash: ChangeHash,
        deps: &[ChangeHash],
        actor_id: &ActorId,
        seq: u64,
        bytes: &[u8],
    ) -> Result<(), ReplicaError> {
        let seq = u32::try_from(seq)
            .ok()
            .filter(|&s| s >= 1)
            .ok_or_else(|| duplicate_seq(actor_id, seq))?;
        let len = u32::try_from(bytes.len())
            .map_err(|_| ReplicaError::Corrupt("change larger than 4 GiB".into()))?;
        // Runs of changes by one author are the rule: skip the map then.
        let same_as_last = self
            .entries
            .last()
            .filter(|last| self.actor_ids[last.actor as usize] == *actor_id);
        let actor = match same_as_last.map(|last| last.actor) {
            Some(a) => a,
            None => match self.actor_index.get(actor_id) {
                Some(&a) => a,
                None => {
                    let a = self.by_actor.len() as u32;
                    self.actor_index.insert(actor_id.clone(), a);
                    self.actor_ids.push(actor_id.clone());
                    self.by_actor.push(Vec::new());
                    a
                }
            },
        };
        let deps_start = self.deps.len();
        self.deps.extend(deps.iter().map(|d| self.index[d]));
        let mut clock = Clock::new();
        for k in deps_start..self.deps.len() {
            let d = self.deps[k];
            let cached = self
                .clocks
                .borrow()
                .get(&d)
                .map(|c| merge_into(&mut clock, c));
            if cached.is_none() {
                merge_into(&mut clock, &self.clock_of(d));
            }
        }
        // The actor's previous change must be an ancestor (see "Ancestry
        // by clocks" in the `changelog` module documentation), and its
        // sequence number the next one.
        let previous = self.by_actor[actor as usize].len() as u32;
        if clock_get(&clock, actor) != previous || seq != previous + 1 {
            self.deps.truncate(deps_start);
            return Err(ReplicaError::Corrupt(format!(
                "change {hash} by actor {actor_id} has seq {seq} but does not follow that actor's change {previous}"
            )));
        }
        include(&mut clock, actor, seq);
        let idx = self.entries.len() as u32;
        self.entries.push(Entry {
            hash,
            start: self.bytes.len(),
            len,
            deps_start: deps_start as u32,
            deps_len: deps.len() as u32,
            actor,
            seq,
        });
        self.bytes.extend_from_slice(bytes);
        self.index.insert(hash, idx);
        self.by_actor[actor as usize].push(idx);
        self.heads.retain(|h| !deps.contains(h));
        let at = self.heads.binary_search(&hash).unwrap_or_else(|i| i);
        self.heads.insert(at, hash);
        self.remember_clock(idx, clock);
        Ok(())
    }

    fn mark(&self) -> Mark {
        Mark {
            entries: self.entries.len(),
            bytes: self.bytes.len(),
            deps: self.deps.len(),
            actors: self.by_actor.len(),
            heads: self.heads.clone(),
        }
    }

    fn rollback(&mut self, mark: Mark) {
        for e in self.entries.drain(mark.entries..) {
            self.index.remove(&e.hash);
            self.by_actor[e.actor as usize].pop();
        }
        self.bytes.truncate(mark.bytes);
        self.deps.truncate(mark.deps);
        self.by_actor.truncate(mark.actors);
        self.actor_ids.truncate(mark.actors);
        self.actor_index.retain(|_, a| (*a as usize) < mark.actors);
        self.heads = mark.heads;
        let len = mark.entries as u32;
        self.clocks.borrow_mut().retain(|i, _| *i < len);
        self.set_clocks.borrow_mut().clear();
        self.blooms.borrow_mut().clear();
    }

    /// Dependencies of the peer's heads we lack (following queued changes
    /// back to what they wait for).
    pub(super) fn missing_deps_from(&self, start: &[ChangeHash]) -> Vec<ChangeHash> {
        if self.queue.is_empty() {
            let mut missing: Vec<ChangeHash> = start
                .iter()
                .filter(|h| !self.index.contains_key(*h))
                .copied()
                .collect();
            missing.sort();
            missing.dedup();
            return missing;
        }
        let mut queued: FastMap<ChangeHash, &Incoming> = self.new_map();
        queued.extend(self.queue.iter().map(|c| (c.hash, c)));
        let mut missing: FastSet<ChangeHash> = self.new_set();
        let mut seen: FastSet<ChangeHash> = self.new_set();
        let mut stack = start.to_vec();
        while let Some(hash) = stack.pop() {
            if self.index.contains_key(&hash) || !seen.insert(hash) {
                continue;
            }
            match queued.get(&hash) {
                Some(c) => stack.extend(c.deps().iter().copied()),
                None => {
                    missing.insert(hash);
                }
            }
        }
        let mut missing: Vec<_> = missing.into_iter().collect();
        missing.sort();
        missing
    }
}

struct Mark {
    entries: usize,
    bytes: usize,
    deps: usize,
    actors: usize,
    heads: Vec<ChangeHash>,
}

fn duplicate_seq(actor: &ActorId, seq: u64) -> ReplicaError {
    ReplicaError::Corrupt(format!(
        "duplicate or invalid sequence number {seq} for actor {actor}"
    ))
}
