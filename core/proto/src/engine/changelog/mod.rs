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
//!
//! # Layout
//!
//! - `clock`: vector clocks, their caches and the ancestry questions.
//! - `log`: the arena of changes and its indexes; ingest and rollback.
//! - `snapshot`: starting from a stored snapshot, lazily; materializing.
//! - `answer`: the sync rules, and what the log keeps per peer
//!   ([`PeerLog`]).
//! - here: the [`ChangeLog`] itself, its hasher and the [`Replica`] glue.

mod answer;
mod clock;
mod log;
mod snapshot;
#[cfg(test)]
mod tests;

use std::cell::{OnceCell, RefCell};
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;

use automerge::sync::{self, Have};
use automerge::{ActorId, Automerge, ChangeHash};

use self::clock::Clock;
use self::log::{Entry, Incoming};
use self::snapshot::{Loaded, Unopened, OPEN_LAZILY_BYTES};
use super::replica::{PeerSync, Replica, ReplicaError, ReplicaKind};

pub(super) use self::answer::PeerLog;

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
        self.answer(peer)
    }

    fn receive_sync_message(
        &mut self,
        peer: &mut PeerSync,
        message: sync::Message,
    ) -> Result<(), ReplicaError> {
        self.take_message(peer, message)
    }

    fn load_chunk(&mut self, bytes: &[u8]) -> Result<(), ReplicaError> {
        self.load(bytes)
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
