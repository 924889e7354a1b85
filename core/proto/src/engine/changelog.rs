//! The change-log replica: a document held as its change graph.
//!
//! A relay mostly passes changes on. Holding each document as a full
//! `Automerge` makes it pay for that twice per keystroke: applying the
//! change to the op set, and — on every sync message to or from every
//! reader — walking the change history to work out what the reader lacks
//! (automerge 0.12 recomputes vector clocks from the graph). [`ChangeLog`]
//! keeps only what the protocol needs:
//!
//! - every change's hash, dependencies, actor, sequence number and raw
//!   bytes, in an append-only arena in causal (topological) order;
//! - per actor, its changes by sequence number, so "everything after this
//!   clock" is a handful of slices;
//! - vector clocks of recent changes, cached, so "is this an ancestor of
//!   those heads" is one comparison.
//!
//! It answers the sync protocol with the same rules as automerge's
//! `generate_sync_message` / `receive_sync_message` (same state, same
//! messages, same Bloom filters), so peers cannot tell the difference. The
//! document is materialized only when someone reads or edits its contents
//! (HTTP API, local changes), lazily, and dropped again when a remote
//! change arrives.
//!
//! # Ancestry by clocks
//!
//! Like automerge's change graph, this uses vector clocks for ancestry: a
//! change `(actor, seq)` is an ancestor of a set of heads when `seq` is at
//! most the heads' clock entry for `actor`. That is exact only if each
//! actor's changes form a chain (every change has its actor's previous
//! change among its ancestors) — which every honest Automerge writer
//! guarantees. A change that breaks it (a forged, concurrent change by the
//! same actor) is refused here rather than silently mis-synced.

use std::cell::{OnceCell, RefCell};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;

use automerge::sync::{self, BloomFilter, Capability, Have, MessageFlags, MessageVersion};
use automerge::{
    ActorId, Automerge, Change, ChangeHash, LoadOptions, OnPartialLoad, VerificationMode,
};

use super::replica::{
    load_document, parse_change, settled, split_chunks, FullDocument, PeerSync, RawChunk, Replica,
    ReplicaError, ReplicaKind, CHUNK_CHANGE, CHUNK_COMPRESSED_CHANGE, CHUNK_DOCUMENT,
};

/// A vector clock: (actor index, highest sequence number), sorted by actor.
type Clock = Vec<(u32, u32)>;

/// Hash tables keyed by change hashes (already uniform SHA-256 output),
/// actor ids or small integers need no SipHash: foldhash is several times
/// faster. Each log keys it from the seed the engine hands its replicas
/// (see [`ReplicaFactory`](super::ReplicaFactory)), so runs replay exactly
/// and, with a secret seed, a peer has no way to aim its hashes at one
/// bucket. No `Default`: every table must be built with the log's key.
#[derive(Clone, Copy, Debug)]
struct HashState(u64);

impl BuildHasher for HashState {
    type Hasher = foldhash::fast::FoldHasher<'static>;
    #[inline]
    fn build_hasher(&self) -> Self::Hasher {
        foldhash::fast::FixedState::with_seed(self.0).build_hasher()
    }
}

type FastMap<K, V> = HashMap<K, V, HashState>;
type FastSet<K> = HashSet<K, HashState>;

/// How many clocks of whole head sets are remembered.
const SET_CLOCKS: usize = 16;

/// Most clocks kept in the cache before it is trimmed to recent changes.
const CLOCK_CACHE_MAX: usize = 8192;
/// How many of the most recent changes keep their clocks when trimming.
const CLOCK_CACHE_RECENT: usize = 2048;

/// One change in the log.
#[derive(Debug, Clone, Copy)]
struct Entry {
    hash: ChangeHash,
    /// Where its bytes are in `ChangeLog::bytes`.
    start: usize,
    len: u32,
    /// Where its dependencies (log indexes) are in `ChangeLog::deps`.
    deps_start: u32,
    deps_len: u32,
    actor: u32,
    seq: u32,
}

/// A change parsed from the outside, not yet in the log.
#[derive(Debug, Clone)]
struct Incoming {
    hash: ChangeHash,
    change: Change,
}

impl Incoming {
    fn from_change(change: Change) -> Self {
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

/// The changes a log took from the snapshot it was loaded from. The log
/// knows their hashes, dependencies, actors and sequence numbers from the
/// start, but rebuilds their bytes only when something needs single changes
/// (a peer with part of the history, an old-protocol peer): re-encoding
/// every change of a long history costs about as much again as loading it,
/// and a peer with nothing, or storage, takes the snapshot itself.
#[derive(Debug)]
struct Loaded {
    /// The document chunk as stored.
    snapshot: Box<[u8]>,
    /// Log entries `0..covers` came from it (their arena bytes are empty).
    covers: u32,
    /// Their bytes once rebuilt: end to end, and where each one ends.
    bytes: OnceCell<(Vec<u8>, Vec<usize>)>,
}

/// A large snapshot, loaded but not yet taken apart into the log. Until a
/// change arrives (or someone edits, or single changes are asked of
/// storage) automerge answers from the loaded document, so a cold start
/// costs one `Automerge::load` and nothing more.
#[derive(Debug)]
struct Unopened {
    doc: FullDocument,
    snapshot: Box<[u8]>,
    /// A peer with nothing was answered already. Automerge answers each one
    /// with a fresh `save()` of the whole document; from the second on, the
    /// log is opened instead and hands out the stored snapshot.
    answered_a_fresh_peer: bool,
}

/// Snapshots from this size on are opened lazily (see [`Unopened`]).
/// Smaller ones are taken apart at once: keeping a loaded document per small
/// document would cost more memory than its log, and takes little time.
const OPEN_LAZILY_BYTES: usize = 32 * 1024;

/// A document held as its change log. See the module documentation.
#[derive(Debug)]
pub struct ChangeLog {
    /// Who authors local edits (made on the materialized document).
    actor: ActorId,
    entries: Vec<Entry>,
    bytes: Vec<u8>,
    deps: Vec<u32>,
    /// Keys every hash table of this log.
    hasher: HashState,
    index: FastMap<ChangeHash, u32>,
    actor_index: FastMap<ActorId, u32>,
    /// The actors by index (the inverse of `actor_index`).
    actor_ids: Vec<ActorId>,
    /// Per actor index: its changes' log indexes, by sequence number
    /// (`seq` n at position n - 1).
    by_actor: Vec<Vec<u32>>,
    /// Current heads, sorted.
    heads: Vec<ChangeHash>,
    /// Changes waiting for dependencies we do not have yet.
    queue: Vec<Incoming>,
    clocks: RefCell<FastMap<u32, Clock>>,
    /// Clocks of recently asked-about head sets, newest first. The clock
    /// of a set of changes we hold never changes (history is immutable), so
    /// these stay valid until a rollback removes changes.
    set_clocks: RefCell<Vec<(Vec<ChangeHash>, Clock)>>,
    /// The Bloom filter last built (with the log length it was built at):
    /// peers acknowledging the same heads get the same summary.
    blooms: RefCell<Vec<(usize, Have)>>,
    /// The snapshot this log was loaded from, if it started from one.
    loaded: Option<Loaded>,
    /// A snapshot not yet taken apart; while set, the log is empty. Boxed:
    /// it holds an `Automerge`, several KiB inline, and is rarely set.
    unopened: Option<Box<Unopened>>,
    /// From what size a snapshot is opened lazily.
    open_lazily_from: usize,
    /// The document, built on demand from the log.
    /// Boxed: an `Automerge` is several KiB inline, and most logs never
    /// materialize.
    materialized: OnceCell<Option<Box<Automerge>>>,
}

impl ChangeLog {
    /// An empty log whose local edits are authored by `actor`, its hash
    /// tables keyed by `hash_seed`.
    pub fn new(actor: ActorId, hash_seed: u64) -> Self {
        let hasher = HashState(hash_seed);
        Self {
            actor,
            entries: Vec::new(),
            bytes: Vec::new(),
            deps: Vec::new(),
            hasher,
            index: FastMap::with_hasher(hasher),
            actor_index: FastMap::with_hasher(hasher),
            actor_ids: Vec::new(),
            by_actor: Vec::new(),
            heads: Vec::new(),
            queue: Vec::new(),
            clocks: RefCell::new(FastMap::with_hasher(hasher)),
            set_clocks: RefCell::new(Vec::new()),
            blooms: RefCell::new(Vec::new()),
            loaded: None,
            unopened: None,
            open_lazily_from: OPEN_LAZILY_BYTES,
            materialized: OnceCell::new(),
        }
    }

    fn new_map<K, V>(&self) -> FastMap<K, V> {
        FastMap::with_hasher(self.hasher)
    }

    fn new_set<K>(&self) -> FastSet<K> {
        FastSet::with_hasher(self.hasher)
    }

    /// How many changes it holds (not counting queued ones).
    pub fn len(&self) -> usize {
        match &self.unopened {
            Some(u) => u
                .doc
                .document()
                .map_or(0, |d| d.get_changes_meta(&[]).len()),
            None => self.entries.len(),
        }
    }

    /// Whether it holds no changes.
    pub fn is_empty(&self) -> bool {
        self.unopened.is_none() && self.entries.is_empty()
    }

    /// Takes a lazily loaded snapshot apart into the log, keeping the loaded
    /// document as the materialized copy. On error the snapshot stays
    /// unopened (automerge accepted it, but its history breaks the rule in
    /// the module documentation, so it can be read but not extended).
    fn open(&mut self) -> Result<(), ReplicaError> {
        let Some(unopened) = self.unopened.take() else {
            return Ok(());
        };
        let doc = unopened.doc.into_document();
        if let Err(e) = self.take_snapshot(&unopened.snapshot, &doc) {
            *self = Self::new(self.actor.clone(), self.hasher.0);
            self.unopened = Some(Box::new(Unopened {
                doc: FullDocument::from_document(doc),
                snapshot: unopened.snapshot,
                answered_a_fresh_peer: unopened.answered_a_fresh_peer,
            }));
            return Err(e);
        }
        let doc = doc.with_actor(self.actor.clone());
        self.materialized = OnceCell::from(Some(Box::new(doc)));
        Ok(())
    }

    /// The bytes of the change at log index `idx`.
    fn change_bytes(&self, idx: u32) -> &[u8] {
        if let Some(loaded) = self.loaded.as_ref().filter(|l| idx < l.covers) {
            // A failed rebuild is not kept: the next call tries again.
            let built = match loaded.bytes.get() {
                Some(built) => built,
                None => match self.rebuild_loaded(loaded) {
                    Some(built) => loaded.bytes.get_or_init(|| built),
                    None => return &[],
                },
            };
            let (bytes, ends) = built;
            let i = idx as usize;
            let start = if i == 0 { 0 } else { ends[i - 1] };
            return &bytes[start..ends[i]];
        }
        let e = &self.entries[idx as usize];
        &self.bytes[e.start..e.start + e.len as usize]
    }

    /// Rebuilds the bytes of the changes taken from the loaded snapshot, in
    /// log order, from the materialized document when there is one (it
    /// holds them all), else by loading the snapshot again.
    fn rebuild_loaded(&self, loaded: &Loaded) -> Option<(Vec<u8>, Vec<usize>)> {
        let covers = loaded.covers as usize;
        let reloaded;
        let doc = match self.materialized.get().and_then(Option::as_deref) {
            Some(doc) => doc,
            None => {
                let options = LoadOptions::new()
                    .on_partial_load(OnPartialLoad::Error)
                    .verification_mode(VerificationMode::DontCheck);
                match Automerge::load_with_options(&loaded.snapshot, options) {
                    Ok(doc) => {
                        reloaded = doc;
                        &reloaded
                    }
                    Err(e) => {
                        // It loaded once already; only running out of
                        // memory could get here. Peers then get empty
                        // changes and refuse them; nothing is stored.
                        tracing::error!(error = %e, "cannot reload a loaded snapshot");
                        return None;
                    }
                }
            }
        };
        let mut changes: Vec<Option<Change>> = vec![None; covers];
        for change in doc.get_changes(&[]) {
            if let Some(&i) = self.index.get(&change.hash()) {
                if let Some(slot) = changes.get_mut(i as usize) {
                    *slot = Some(change);
                }
            }
        }
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(covers);
        for change in &changes {
            if let Some(change) = change {
                bytes.extend_from_slice(change.raw_bytes());
            }
            ends.push(bytes.len());
        }
        Some((bytes, ends))
    }

    fn entry_deps(&self, e: &Entry) -> &[u32] {
        let start = e.deps_start as usize;
        &self.deps[start..start + e.deps_len as usize]
    }

    fn max_seq(&self, actor: &ActorId) -> u64 {
        self.actor_index
            .get(actor)
            .map_or(0, |&a| self.by_actor[a as usize].len() as u64)
    }

    // ------------------------------------------------------------ clocks

    /// The clock of one change: the merge of its dependencies' clocks plus
    /// itself. Computed without recursion; cached.
    fn clock_of(&self, idx: u32) -> Clock {
        if let Some(c) = self.clocks.borrow().get(&idx) {
            return c.clone();
        }
        let mut local: FastMap<u32, Clock> = self.new_map();
        let mut stack = vec![idx];
        while let Some(&top) = stack.last() {
            if local.contains_key(&top) {
                stack.pop();
                continue;
            }
            let entry = self.entries[top as usize];
            let cache = self.clocks.borrow();
            let missing: Vec<u32> = self
                .entry_deps(&entry)
                .iter()
                .copied()
                .filter(|d| !local.contains_key(d) && !cache.contains_key(d))
                .collect();
            if !missing.is_empty() {
                drop(cache);
                stack.extend(missing);
                continue;
            }
            let mut clock = Clock::new();
            for d in self.entry_deps(&entry) {
                let dep = local.get(d).or_else(|| cache.get(d)).expect("computed");
                merge_into(&mut clock, dep);
            }
            drop(cache);
            include(&mut clock, entry.actor, entry.seq);
            local.insert(top, clock);
            stack.pop();
        }
        let clock = local.remove(&idx).expect("computed");
        self.remember_clock(idx, clock.clone());
        clock
    }

    fn remember_clock(&self, idx: u32, clock: Clock) {
        let mut cache = self.clocks.borrow_mut();
        if cache.len() >= CLOCK_CACHE_MAX {
            let keep_from = (self.entries.len().saturating_sub(CLOCK_CACHE_RECENT)) as u32;
            let mut heads: FastSet<u32> = self.new_set();
            heads.extend(self.heads.iter().filter_map(|h| self.index.get(h).copied()));
            cache.retain(|i, _| *i >= keep_from || heads.contains(i));
        }
        cache.insert(idx, clock);
    }

    /// The clock of a set of changes (unknown hashes are ignored).
    fn clock_of_set(&self, hashes: &[ChangeHash]) -> Clock {
        if let [one] = hashes {
            return self
                .index
                .get(one)
                .map_or_else(Clock::new, |&i| self.clock_of(i));
        }
        {
            let mut memo = self.set_clocks.borrow_mut();
            if let Some(at) = memo.iter().position(|(k, _)| k.as_slice() == hashes) {
                let hit = memo.remove(at);
                let clock = hit.1.clone();
                memo.insert(0, hit);
                return clock;
            }
        }
        let mut all_known = true;
        let clock = if hashes.len() <= 4 {
            let mut clock = Clock::new();
            for h in hashes {
                match self.index.get(h) {
                    Some(&idx) => merge_into(&mut clock, &self.clock_of(idx)),
                    None => all_known = false,
                }
            }
            clock
        } else {
            // Many heads (many concurrent writers): take the maximum per
            // actor in a dense table rather than merging clock after clock.
            let mut dense = vec![0u32; self.by_actor.len()];
            for h in hashes {
                match self.index.get(h) {
                    Some(&idx) => {
                        for (actor, seq) in self.clock_of(idx) {
                            let slot = &mut dense[actor as usize];
                            *slot = (*slot).max(seq);
                        }
                    }
                    None => all_known = false,
                }
            }
            dense
                .into_iter()
                .enumerate()
                .filter(|&(_, seq)| seq > 0)
                .map(|(actor, seq)| (actor as u32, seq))
                .collect()
        };
        // A set naming changes we do not hold yet would get a different
        // clock once they arrive: only complete sets are remembered.
        if !all_known {
            return clock;
        }
        let mut memo = self.set_clocks.borrow_mut();
        memo.truncate(SET_CLOCKS - 1);
        memo.insert(0, (hashes.to_vec(), clock.clone()));
        clock
    }

    /// Log indexes of every change that is not an ancestor of `heads` (or
    /// one of them), in causal order. All of them for no heads.
    fn indexes_after(&self, heads: &[ChangeHash]) -> Vec<u32> {
        if heads.is_empty() {
            return (0..self.entries.len() as u32).collect();
        }
        let clock = self.clock_of_set(heads);
        let mut out = Vec::new();
        for (actor, changes) in self.by_actor.iter().enumerate() {
            let known = clock_get(&clock, actor as u32) as usize;
            out.extend_from_slice(changes.get(known..).unwrap_or(&[]));
        }
        out.sort_unstable();
        out
    }

    fn concat(&self, indexes: &[u32]) -> Vec<u8> {
        let size = indexes
            .iter()
            .map(|&i| self.entries[i as usize].len as usize)
            .sum();
        let mut out = Vec::with_capacity(size);
        for &i in indexes {
            out.extend_from_slice(self.change_bytes(i));
        }
        out
    }

    // ------------------------------------------------------------ ingest

    /// Parses stored or received bytes (any mix of document and change
    /// chunks) into changes. Strict: a corrupt chunk fails the whole input.
    fn parse(bytes: &[u8]) -> Result<Vec<Incoming>, ReplicaError> {
        Self::parse_pieces(&split_chunks(bytes)?)
    }

    fn parse_pieces(pieces: &[RawChunk<'_>]) -> Result<Vec<Incoming>, ReplicaError> {
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
    fn ingest(&mut self, incoming: Vec<Incoming>) -> Result<bool, ReplicaError> {
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

    /// Fills an empty log from a loaded snapshot: every change's entry,
    /// but not its bytes (see [`Loaded`]). Changes come in causal order;
    /// should one not, the log takes the changes with their bytes instead.
    fn take_snapshot(&mut self, snapshot: &[u8], doc: &Automerge) -> Result<(), ReplicaError> {
        let metas = doc.get_changes_meta(&[]);
        self.entries.reserve(metas.len());
        self.index.reserve(metas.len());
        self.deps.reserve(metas.len());
        for meta in &metas {
            if !meta.deps.iter().all(|d| self.index.contains_key(d)) {
                *self = Self::new(self.actor.clone(), self.hasher.0);
                let changes = doc.get_changes(&[]);
                return self
                    .ingest(changes.into_iter().map(Incoming::from_change).collect())
                    .map(|_| ());
            }
            self.append_entry(meta.hash, &meta.deps, &meta.actor, meta.seq, &[])?;
        }
        self.loaded = Some(Loaded {
            snapshot: snapshot.into(),
            covers: self.entries.len() as u32,
            bytes: OnceCell::new(),
        });
        Ok(())
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

    /// Appends a change (its bytes may be empty: see [`Loaded`]) whose
    /// dependencies are all in the log.
    fn append_entry(
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
        // The actor's previous change must be an ancestor (see the module
        // documentation), and its sequence number the next one.
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
    fn missing_deps_from(&self, start: &[ChangeHash]) -> Vec<ChangeHash> {
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

    /// Whether change `idx` is covered by `clock` (one of, or an ancestor
    /// of, the changes the clock was taken of).
    fn within(&self, idx: u32, clock: &Clock) -> bool {
        let e = &self.entries[idx as usize];
        e.seq <= clock_get(clock, e.actor)
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

    fn materialize(&self) -> Option<Automerge> {
        let loaded = Automerge::load_with_options(
            &self.save(),
            LoadOptions::new()
                .on_partial_load(OnPartialLoad::Error)
                .verification_mode(VerificationMode::DontCheck),
        );
        match loaded {
            Ok(doc) => Some(doc.with_actor(self.actor.clone())),
            Err(e) => {
                tracing::error!(error = %e, changes = self.entries.len(), "cannot materialize a change log");
                None
            }
        }
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

fn clock_get(clock: &Clock, actor: u32) -> u32 {
    clock
        .binary_search_by_key(&actor, |&(a, _)| a)
        .map_or(0, |i| clock[i].1)
}

fn include(clock: &mut Clock, actor: u32, seq: u32) {
    match clock.binary_search_by_key(&actor, |&(a, _)| a) {
        Ok(i) => clock[i].1 = clock[i].1.max(seq),
        Err(i) => clock.insert(i, (actor, seq)),
    }
}

/// Entry-wise maximum of two clocks, in one pass over both (they are
/// sorted by actor).
fn merge_into(into: &mut Clock, other: &Clock) {
    if into.is_empty() {
        into.clone_from(other);
        return;
    }
    if other.is_empty() {
        return;
    }
    let mut merged = Clock::with_capacity(into.len().max(other.len()));
    let (mut a, mut b) = (into.iter().peekable(), other.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (Some(&&(x, sx)), Some(&&(y, sy))) => {
                if x == y {
                    merged.push((x, sx.max(sy)));
                    a.next();
                    b.next();
                } else if x < y {
                    merged.push((x, sx));
                    a.next();
                } else {
                    merged.push((y, sy));
                    b.next();
                }
            }
            (Some(&&e), None) => {
                merged.push(e);
                a.next();
            }
            (None, Some(&&e)) => {
                merged.push(e);
                b.next();
            }
            (None, None) => break,
        }
    }
    *into = merged;
}

fn has_capability(state: &sync::State, cap: &Capability) -> bool {
    state
        .their_capabilities
        .as_ref()
        .is_some_and(|caps| caps.contains(cap))
}

impl Replica for ChangeLog {
    fn kind(&self) -> ReplicaKind {
        ReplicaKind::ChangeLog
    }

    fn heads(&self) -> Vec<ChangeHash> {
        match &self.unopened {
            Some(u) => u.doc.heads(),
            None => self.heads.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        ChangeLog::is_empty(self)
    }

    fn has_change(&self, hash: &ChangeHash) -> bool {
        match &self.unopened {
            Some(u) => u.doc.has_change(hash),
            None => self.index.contains_key(hash),
        }
    }

    fn generate_sync_message(&self, peer: &mut PeerSync) -> Option<sync::Message> {
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
                    match peer.offered {
                        Some(from) if !has_nothing && from as usize <= self.entries.len() => self
                            .indexes_offered_since(
                                from,
                                &peer.withheld,
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
            peer.offered = Some(self.entries.len() as u32);
            peer.withheld = withheld;
            peer.offered_from = their_last_sync;
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

    fn receive_sync_message(
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
                peer.offered = None;
                peer.withheld = Vec::new();
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
                peer.offered = None;
                peer.withheld = Vec::new();
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
            || (peer.offered.is_some() && !self.moves_forward(&peer.offered_from, &message.have))
        {
            peer.offered = None;
            peer.withheld = Vec::new();
        }
        state.their_have = Some(message.have);
        state.their_heads = Some(message_heads);
        state.their_need = Some(message.need);
        Ok(())
    }

    fn load_chunk(&mut self, bytes: &[u8]) -> Result<(), ReplicaError> {
        let pieces = split_chunks(bytes)?;
        self.open()?;
        match pieces.split_first() {
            Some((first, rest))
                if first.kind == CHUNK_DOCUMENT
                    && self.entries.is_empty()
                    && self.queue.is_empty() =>
            {
                // Everything is parsed before the log changes.
                let doc = load_document(first.bytes)?;
                let rest = Self::parse_pieces(rest)?;
                // A copy materialized from the empty log is out of date.
                self.materialized = OnceCell::new();
                if rest.is_empty() && first.bytes.len() >= self.open_lazily_from {
                    if !doc.get_heads().is_empty() {
                        self.unopened = Some(Box::new(Unopened {
                            doc: FullDocument::from_document(doc),
                            snapshot: first.bytes.into(),
                            answered_a_fresh_peer: false,
                        }));
                    }
                    return Ok(());
                }
                let loaded = self.take_snapshot(first.bytes, &doc);
                drop(doc);
                let result = loaded.and_then(|()| self.ingest(rest));
                if result.is_err() {
                    *self = Self::new(self.actor.clone(), self.hasher.0);
                }
                result.map(|_| ())
            }
            _ => self.ingest(Self::parse_pieces(&pieces)?).map(|_| ()),
        }
    }

    fn save(&self) -> Vec<u8> {
        if let Some(u) = &self.unopened {
            return u.snapshot.to_vec();
        }
        // Entries taken from a snapshot have no bytes in the arena: the
        // snapshot stands for them, followed by every later change.
        match &self.loaded {
            Some(loaded) => {
                let mut out = Vec::with_capacity(loaded.snapshot.len() + self.bytes.len());
                out.extend_from_slice(&loaded.snapshot);
                out.extend_from_slice(&self.bytes);
                out
            }
            None => self.bytes.clone(),
        }
    }

    fn save_after(&self, heads: &[ChangeHash]) -> Vec<u8> {
        if heads.is_empty() {
            return self.save();
        }
        if let Some(u) = &self.unopened {
            return u.doc.save_after(heads);
        }
        self.concat(&self.indexes_after(heads))
    }

    fn document(&self) -> Option<&Automerge> {
        if let Some(u) = &self.unopened {
            return u.doc.document();
        }
        self.materialized
            .get_or_init(|| self.materialize().map(Box::new))
            .as_deref()
    }

    fn document_mut(&mut self) -> Option<&mut Automerge> {
        if let Err(e) = self.open() {
            tracing::warn!(error = %e, "this document cannot be edited here");
            return None;
        }
        if self.materialized.get().is_none() {
            let doc = self.materialize().map(Box::new);
            let _ = self.materialized.set(doc);
        }
        self.materialized.get_mut().and_then(Option::as_deref_mut)
    }

    fn absorb_local_edits(&mut self) -> Result<(), ReplicaError> {
        let Some(doc) = self.materialized.get().and_then(Option::as_deref) else {
            return Ok(());
        };
        if doc.get_heads() == self.heads {
            return Ok(());
        }
        let incoming: Vec<Incoming> = doc
            .get_changes(&self.heads)
            .into_iter()
            .map(Incoming::from_change)
            .collect();
        // The materialized copy already holds these; keep it.
        let kept = self.materialized.take();
        let result = self.ingest(incoming);
        if let Some(doc) = kept {
            let _ = self.materialized.set(doc);
        }
        result.map(|_| ())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FullDocument;
    use automerge::transaction::Transactable;
    use automerge::{ReadDoc, ROOT};

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
    fn sync(
        a: &mut dyn Replica,
        sa: &mut PeerSync,
        b: &mut dyn Replica,
        sb: &mut PeerSync,
    ) -> usize {
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
                full_rule.offered = None;
                let expected = relay.generate_sync_message(&mut full_rule);
                if at_relay[r].offered.is_some() {
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
            full_rule.offered = None;
            let expected = relay.generate_sync_message(&mut full_rule);
            if peer.offered.is_some() {
                incremental += 1;
                released += usize::from(!peer.withheld.is_empty());
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
}
