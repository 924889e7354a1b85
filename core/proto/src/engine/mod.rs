//! The sync engine: a deterministic state machine with no IO.
//!
//! [`Engine::handle`] takes the time and one [`Input`] — a local command, a
//! connection opening or closing, bytes from a peer, a finished storage
//! task, a tick — and returns an [`Output`]: messages to send, connections
//! to close, storage tasks, finished commands, events and when to wake it
//! next. It reads no clock, opens no socket and draws no OS randomness (ids
//! come from a generator seeded in [`EngineConfig`]); every collection is
//! ordered. Two engines given the same inputs produce the same outputs,
//! which is what lets `converge-tests` simulate whole networks from a seed.
//!
//! # What it does
//!
//! - **Handshake.** The dialling side sends `join`; the other answers
//!   `peer` (or `error` for an unsupported protocol version). Nothing else
//!   is accepted before it; after it, a message must name the bound peer as
//!   sender and us (or nobody) as target.
//! - **Sync.** One `automerge::sync::State` per (document, peer). A client
//!   offers every document to every peer its [`SharePolicy`] announces to;
//!   a relay answers only peers that talked to it about a document first.
//! - **Requests.** A document we lack is asked for with `request`; when
//!   storage and every peer asked say no (or a timeout passes) it is
//!   unavailable — but it stays wanted, and if it turns up later everyone
//!   who asked gets it.
//! - **Ephemeral messages** go to the document's other peers unchanged,
//!   minus duplicates (by sender, session and count).
//! - **Storage.** Changes are saved as incremental chunks and compacted into
//!   a snapshot once the chunks outweigh it; sync states are saved per
//!   remote storage id so a reconnect sends only the difference.
//! - **Hostile input** closes the one connection it came on: undecodable
//!   frames, invalid sync messages (see [`validate`]) and any panic inside
//!   Automerge, which is caught and contained.

mod changelog;
mod compaction;
mod durability;
mod perform;
mod persist;
mod policy;
mod replica;
mod rng;
mod types;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::sync;
use automerge::transaction::CommitOptions;
use automerge::{ActorId, Automerge, ChangeHash};

pub use changelog::ChangeLog;
pub use compaction::compaction;
pub use perform::{perform, perform_many};
pub use policy::{AnnounceAll, RelayPolicy, SharePolicy};
pub use replica::{
    full_document_factory, FullDocument, PeerSync, Replica, ReplicaError, ReplicaFactory,
    ReplicaKind,
};
pub use types::{
    Close, Command, CommandId, CommandResult, ConnectionId, Direction, EngineConfig, Event, Input,
    Origin, Output, Send, Timestamp,
};

use crate::storage::{
    ChunkKind, DocKey, StorageKey, StorageOp, StorageResult, StorageTask, TaskId,
};
use crate::wire::{
    self, DecodeError, DocMessage, DocumentId, EphemeralMessage, Message, PeerId, PeerMetadata,
    SessionId, PROTOCOL_VERSION,
};
use durability::{Durability, Waiter};
use rng::Rng;

/// Most messages buffered for a document while it loads from storage.
const MAX_PENDING_PER_DOC: usize = 4096;
/// Most (sender, session) pairs remembered for ephemeral de-duplication.
const MAX_EPHEMERAL_SESSIONS: usize = 65_536;

/// Why [`Engine::change`] could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// The document is not in memory (create or find it first).
    #[error("document {0} is not loaded")]
    NotLoaded(DocumentId),
    /// The document is still being fetched or nobody has it.
    #[error("document {0} is not available yet")]
    NotReady(DocumentId),
    /// This engine's replicas do not hold document contents.
    #[error("this engine's replicas cannot be edited")]
    NotEditable,
    /// The edit panicked; the document was left as it was before.
    #[error("the edit panicked; nothing was changed")]
    Panicked,
}

/// The sync engine. See the [module docs](self).
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    rng: Rng,
    /// Keys the replicas' hash tables; drawn from the config's seed.
    hash_seed: u64,
    session_id: SessionId,
    now: Timestamp,
    next_task: u64,
    ephemeral_count: u64,
    connections: BTreeMap<ConnectionId, Connection>,
    /// Peers that completed the handshake, and their connection.
    peers: BTreeMap<PeerId, ConnectionId>,
    docs: BTreeMap<DocumentId, Doc>,
    /// Which documents each peer has sync state for (index into `docs`).
    peer_docs: BTreeMap<PeerId, BTreeSet<DocumentId>>,
    tasks: BTreeMap<TaskId, Task>,
    timers: BTreeSet<(Timestamp, Timer)>,
    /// (document, peer) pairs to generate a sync message for once the
    /// current input or batch is handled.
    deferred_sync: BTreeSet<(DocumentId, PeerId)>,
    /// Documents changed during the current input or batch, saved when it
    /// is done: one incremental chunk for a burst of changes.
    deferred_saves: BTreeSet<DocumentId>,
    /// Highest ephemeral `count` seen per (sender, session).
    ephemeral_seen: BTreeMap<(PeerId, SessionId), u64>,
    out: Output,
}

#[derive(Debug)]
struct Connection {
    state: ConnState,
    direction: Direction,
    handshake_deadline: Timestamp,
}

#[derive(Debug)]
enum ConnState {
    /// Incoming: waiting for `join`.
    AwaitingJoin,
    /// Outgoing: sent `join`, waiting for `peer`.
    AwaitingPeer,
    /// Handshake done.
    Ready {
        peer_id: PeerId,
        metadata: PeerMetadata,
    },
}

/// A document's sync progress, from [`Engine::sync_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    /// Our heads (sorted).
    pub heads: Vec<ChangeHash>,
    /// Every change we hold has been handed to storage and confirmed.
    pub saved: bool,
    /// Each connected peer we sync this document with.
    pub peers: Vec<PeerSyncStatus>,
}

impl SyncStatus {
    /// Saved, and at least one peer is connected and every connected peer
    /// has our heads.
    pub fn synced(&self) -> bool {
        self.saved && !self.peers.is_empty() && self.peers.iter().all(|p| p.in_sync)
    }
}

/// One peer's view of a document, as its sync messages told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSyncStatus {
    /// The peer.
    pub peer: PeerId,
    /// Its heads as last reported (sorted), if it has told us.
    pub their_heads: Option<Vec<ChangeHash>>,
    /// It reported exactly our heads.
    pub in_sync: bool,
}

/// What a document is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocStatus {
    /// Being read from storage.
    Loading,
    /// Held and syncing.
    Ready,
    /// Not held; peers have been asked.
    Requesting,
    /// Not held and nobody asked has it.
    Unavailable,
}

#[derive(Debug)]
struct Doc {
    status: DocStatus,
    replica: Box<dyn Replica>,
    /// A local `find` or `create` wants this document (so keep asking new
    /// peers for it while we lack it).
    wanted: bool,
    waiting_finds: Vec<CommandId>,
    request_deadline: Option<Timestamp>,
    /// Until then, "nobody has it" is not yet an answer (see
    /// [`EngineConfig::unavailable_grace`]).
    grace_until: Option<Timestamp>,
    /// The request deadline was extended once already.
    request_extended: bool,
    /// Boxed: a sync state is large, and a map node holds room for
    /// eleven entries even when it holds one.
    peers: BTreeMap<PeerId, Box<DocPeer>>,
    /// Sync states read from storage, by remote storage id, not yet in use.
    stored_sync_states: BTreeMap<String, Vec<u8>>,
    pending: Vec<PendingMessage>,
    /// What is on disk, the writes in flight and who waits for them.
    durable: Durability,
    /// When the document was last touched (for eviction).
    last_used: Timestamp,
    /// The heads last reported in an [`Event::DocChanged`].
    announced_heads: Vec<ChangeHash>,
}

impl Doc {
    /// Every change is written: no write is waiting for its result, and the
    /// last one written holds the current heads.
    fn is_saved(&self) -> bool {
        self.durable.is_saved(&self.replica.heads())
    }

    /// Forgets a peer's sync state for this document. An emptied map gives
    /// back its node: a cold document in memory should cost little.
    fn remove_peer(&mut self, peer: &PeerId) -> Option<Box<DocPeer>> {
        let removed = self.peers.remove(peer);
        if self.peers.is_empty() {
            self.peers = BTreeMap::new();
        }
        removed
    }
}

#[derive(Debug)]
struct DocPeer {
    sync: PeerSync,
    /// The peer told us (by `request` or `doc-unavailable`) it lacks the doc.
    lacks: bool,
    /// The peer sent `request`; answer it when we learn something.
    they_requested: bool,
    /// We told it `doc-unavailable` already.
    told_unavailable: bool,
    /// We sent it `request`.
    we_requested: bool,
    /// Where its sync state is persisted, if anywhere.
    persist_key: Option<StorageKey>,
    /// The `shared_heads` last persisted.
    persisted_heads: Vec<ChangeHash>,
    /// When to restart a stalled exchange.
    resync_at: Option<Timestamp>,
    /// Our heads when we last restarted the exchange.
    resynced_at_heads: Option<Vec<ChangeHash>>,
    /// A message for this peer is due at the end of the current input or
    /// batch and has not been generated yet.
    reply_due: bool,
    /// A message to it, on this connection, waits for a write (see
    /// [`Durability`]). No other is generated meanwhile: when it leaves, one
    /// message carries whatever accumulated, instead of one per change,
    /// each with its own summary of everything not yet acknowledged. A
    /// message held for an earlier connection holds nothing back.
    held: Option<ConnectionId>,
    /// It was due another message while one was held.
    due_after_held: bool,
}

#[derive(Debug)]
struct PendingMessage {
    peer: PeerId,
    message: sync::Message,
    is_request: bool,
}

#[derive(Debug)]
enum Task {
    LoadDoc(DocumentId),
    SaveDoc {
        doc: DocumentId,
        /// The write's number (see [`Durability`]).
        seq: u64,
        /// The chunk written, and its size.
        key: StorageKey,
        len: usize,
    },
    Compact {
        doc: DocumentId,
        replaced: Vec<StorageKey>,
    },
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Handshake(ConnectionId),
    Request(DocumentId),
    Resync(DocumentId, PeerId),
    RetrySave(DocumentId),
}

impl Engine {
    /// A new engine with no connections and no documents.
    pub fn new(cfg: EngineConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let session_id = SessionId::from_trusted(hex::encode(rng.bytes::<8>()));
        // Its own stream, so hash keys do not shift the ids drawn above.
        let hash_seed = Rng::new(cfg.seed ^ 0x243f_6a88_85a3_08d3).next_u64();
        Self {
            cfg,
            rng,
            hash_seed,
            session_id,
            now: Timestamp(0),
            next_task: 0,
            ephemeral_count: 0,
            connections: BTreeMap::new(),
            peers: BTreeMap::new(),
            docs: BTreeMap::new(),
            peer_docs: BTreeMap::new(),
            tasks: BTreeMap::new(),
            timers: BTreeSet::new(),
            deferred_sync: BTreeSet::new(),
            deferred_saves: BTreeSet::new(),
            ephemeral_seen: BTreeMap::new(),
            out: Output::default(),
        }
    }

    /// Our peer id.
    pub fn peer_id(&self) -> &PeerId {
        &self.cfg.peer_id
    }

    /// Our ephemeral session id.
    pub fn session_id(&self) -> &SessionId {
        &self.session_id
    }

    /// The configuration the engine was built with.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Peers with a completed handshake, with their connections.
    pub fn connected_peers(&self) -> impl Iterator<Item = (&PeerId, ConnectionId)> {
        self.peers.iter().map(|(p, c)| (p, *c))
    }

    /// Documents in memory, with their status.
    pub fn documents(&self) -> impl Iterator<Item = (&DocumentId, DocStatus)> {
        self.docs.iter().map(|(id, d)| (id, d.status))
    }

    /// A document's status, if it is in memory.
    pub fn status(&self, id: &DocumentId) -> Option<DocStatus> {
        self.docs.get(id).map(|d| d.status)
    }

    /// A document's heads, if it is in memory.
    pub fn heads(&self, id: &DocumentId) -> Option<Vec<ChangeHash>> {
        self.docs.get(id).map(|d| d.replica.heads())
    }

    /// How far each peer syncing `id` has got, or `None` if the document
    /// is not in memory.
    pub fn sync_status(&self, id: &DocumentId) -> Option<SyncStatus> {
        let doc = self.docs.get(id)?;
        let mut ours = doc.replica.heads();
        ours.sort();
        let peers = doc
            .peers
            .iter()
            .filter(|(peer, _)| self.peers.contains_key(*peer))
            .map(|(peer, dp)| {
                let their_heads = dp.sync.state.their_heads.clone().map(|mut h| {
                    h.sort();
                    h
                });
                PeerSyncStatus {
                    peer: peer.clone(),
                    in_sync: their_heads.as_ref() == Some(&ours),
                    their_heads,
                }
            })
            .collect();
        Some(SyncStatus {
            saved: doc.is_saved(),
            heads: ours,
            peers,
        })
    }

    /// The materialized document, if it is in memory in that form.
    pub fn document(&self, id: &DocumentId) -> Option<&Automerge> {
        self.docs.get(id).and_then(|d| d.replica.document())
    }

    /// Runs `f` on a document and syncs and saves whatever it changed.
    /// The document must be ready. Returns `f`'s result and the output.
    pub fn change<R>(
        &mut self,
        now: Timestamp,
        id: &DocumentId,
        f: impl FnOnce(&mut Automerge) -> R,
    ) -> Result<(R, Output), ChangeError> {
        self.advance(now);
        let result = self.change_one(id, f)?;
        Ok((result, self.finish()))
    }

    /// Makes several local changes, in order, and answers them together:
    /// each changed document is saved once (one incremental chunk holding
    /// all its new changes) and each peer gets one sync message per
    /// document. An edit that fails (document not loaded, not ready, not
    /// editable) does not stop the others.
    pub fn change_many<R, F: FnOnce(&mut Automerge) -> R>(
        &mut self,
        now: Timestamp,
        edits: impl IntoIterator<Item = (DocumentId, F)>,
    ) -> (Vec<Result<R, ChangeError>>, Output) {
        self.advance(now);
        let results = edits
            .into_iter()
            .map(|(id, f)| self.change_one(&id, f))
            .collect();
        (results, self.finish())
    }

    fn change_one<R>(
        &mut self,
        id: &DocumentId,
        f: impl FnOnce(&mut Automerge) -> R,
    ) -> Result<R, ChangeError> {
        let doc = self
            .docs
            .get_mut(id)
            .ok_or_else(|| ChangeError::NotLoaded(id.clone()))?;
        if doc.status != DocStatus::Ready {
            return Err(ChangeError::NotReady(id.clone()));
        }
        let before = doc.replica.heads();
        let am = doc.replica.document_mut().ok_or(ChangeError::NotEditable)?;
        let result = f(am);
        if let Err(e) = doc.replica.absorb_local_edits() {
            // Only a replica that keeps its own log can fail here, and only
            // on a change Automerge itself just made: a bug, not input.
            tracing::error!(document = %id, error = %e, "a local change could not be recorded");
        }
        if doc.replica.heads() != before {
            self.doc_changed(id, Origin::Local);
        }
        Ok(result)
    }

    /// Feeds one input in at time `now`.
    pub fn handle(&mut self, now: Timestamp, input: Input) -> Output {
        self.advance(now);
        self.step(input);
        self.finish()
    }

    /// Feeds several inputs in at time `now` and answers them together.
    /// The result is what feeding them one by one would give, except that
    /// each peer gets one sync message per document for the whole batch
    /// instead of one per input: under load the runtime hands over whatever
    /// queued up, so the cost of answering a burst of changes does not grow
    /// with the burst.
    pub fn handle_batch(
        &mut self,
        now: Timestamp,
        inputs: impl IntoIterator<Item = Input>,
    ) -> Output {
        self.advance(now);
        for input in inputs {
            self.step(input);
        }
        self.finish()
    }

    fn step(&mut self, input: Input) {
        match input {
            Input::Command(id, command) => self.on_command(id, command),
            Input::Connected { conn, direction } => self.on_connected(conn, direction),
            Input::Disconnected { conn } => self.forget_connection(conn),
            Input::Received { conn, bytes } => self.on_received(conn, &bytes),
            Input::Storage { task, result } => self.on_storage(task, result),
            Input::Tick => {}
        }
    }

    fn flush_deferred(&mut self) {
        for id in std::mem::take(&mut self.deferred_saves) {
            self.save_doc(&id);
        }
        for (id, peer) in std::mem::take(&mut self.deferred_sync) {
            self.sync_peer(&id, &peer);
        }
    }

    /// Notes that `peer` may need a sync message for `id`; it is generated
    /// when the current input (or batch) is done.
    fn defer_sync(&mut self, id: &DocumentId, peer: &PeerId) {
        if let Some(dp) = self.docs.get_mut(id).and_then(|d| d.peers.get_mut(peer)) {
            dp.reply_due = true;
        }
        self.deferred_sync.insert((id.clone(), peer.clone()));
    }

    fn advance(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
    }

    fn finish(&mut self) -> Output {
        self.flush_deferred();
        self.fire_timers();
        self.flush_deferred();
        if self.docs.len() > self.cfg.max_docs_in_memory {
            self.evict_cold();
        }
        let mut out = std::mem::take(&mut self.out);
        out.next_wakeup = self.timers.first().map(|(t, _)| *t);
        out
    }

    // ------------------------------------------------------------ eviction

    /// Drops the least recently used cold documents until the hot set
    /// fits (see [`EngineConfig::max_docs_in_memory`]), with a tenth of it
    /// to spare: finding the coldest means looking at every document, so
    /// it should not happen again with the very next document loaded.
    fn evict_cold(&mut self) {
        let mut cold: Vec<(Timestamp, DocumentId)> = self
            .docs
            .iter()
            .filter(|(_, d)| {
                matches!(d.status, DocStatus::Ready | DocStatus::Unavailable)
                    && !d.wanted
                    && d.peers.is_empty()
                    && d.pending.is_empty()
                    && d.waiting_finds.is_empty()
                    && d.durable.is_idle()
                    && d.is_saved()
            })
            .map(|(id, d)| (d.last_used, id.clone()))
            .collect();
        let target = self.cfg.max_docs_in_memory - self.cfg.max_docs_in_memory / 10;
        let excess = self.docs.len().saturating_sub(target).min(cold.len());
        if excess == 0 {
            return;
        }
        if excess < cold.len() {
            cold.select_nth_unstable(excess);
            cold.truncate(excess);
        }
        for (_, id) in cold {
            tracing::debug!(document = %id, "evicting cold document");
            self.docs.remove(&id);
        }
    }

    /// Marks a document as just used.
    fn touch(&mut self, id: &DocumentId) {
        let now = self.now;
        if let Some(doc) = self.docs.get_mut(id) {
            doc.last_used = now;
        }
    }

    // ------------------------------------------------------------ timers

    fn fire_timers(&mut self) {
        while let Some((at, _)) = self.timers.first() {
            if *at > self.now {
                break;
            }
            let Some((at, timer)) = self.timers.pop_first() else {
                break;
            };
            match timer {
                Timer::Handshake(conn) => {
                    let expired = self.connections.get(&conn).is_some_and(|c| {
                        !matches!(c.state, ConnState::Ready { .. }) && c.handshake_deadline == at
                    });
                    if expired {
                        self.close(conn, "handshake timed out".into());
                    }
                }
                Timer::Request(id) => {
                    let expired = self.docs.get(&id).is_some_and(|d| {
                        d.status == DocStatus::Requesting && d.request_deadline == Some(at)
                    });
                    if expired {
                        let still_asking = self.docs.get(&id).is_some_and(|d| {
                            d.peers.iter().any(|(p, dp)| {
                                dp.we_requested && !dp.lacks && self.peers.contains_key(p)
                            })
                        });
                        let extendable = self.docs.get(&id).is_some_and(|d| !d.request_extended);
                        if extendable && (still_asking || self.someone_has_it(&id)) {
                            // An exchange with a peer that has it is under
                            // way; give it the full request timeout.
                            let deadline = self.now.plus(self.cfg.request_timeout);
                            if let Some(d) = self.docs.get_mut(&id) {
                                d.request_deadline = Some(deadline);
                                d.grace_until = None;
                                // Once only: a peer that claims the document
                                // and never sends it cannot hold us forever.
                                d.request_extended = true;
                            }
                            self.timers.insert((deadline, Timer::Request(id)));
                        } else {
                            self.mark_unavailable(&id);
                        }
                    }
                }
                Timer::Resync(id, peer) => self.resync(&id, &peer, at),
                Timer::RetrySave(id) => {
                    if let Some(d) = self.docs.get_mut(&id) {
                        d.durable.retry_fired();
                    }
                    self.save_doc(&id);
                }
            }
        }
    }

    /// Restarts a stalled exchange: keep only what a reconnect would keep
    /// (the shared heads) and send a fresh message. Only exchanges that are
    /// waiting on an answer *and* are not known to be in sync qualify, so a
    /// quiet, converged pair costs nothing.
    fn resync(&mut self, id: &DocumentId, peer: &PeerId, at: Timestamp) {
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let ours = doc.replica.heads();
        let Some(dp) = doc.peers.get_mut(peer) else {
            return;
        };
        if dp.resync_at != Some(at) {
            return;
        }
        dp.resync_at = None;
        let stalled = dp.sync.state.in_flight && dp.sync.state.their_heads.as_ref() != Some(&ours);
        // One restart per state of ours: if the peer stays silent after it,
        // it has nothing to add (a silent reply means equal heads), and
        // retrying forever would only spin.
        if !stalled
            || doc.status != DocStatus::Ready
            || dp.resynced_at_heads.as_ref() == Some(&ours)
        {
            return;
        }
        dp.resynced_at_heads = Some(ours);
        let shared = std::mem::take(&mut dp.sync.state.shared_heads);
        let capabilities = dp.sync.state.their_capabilities.take();
        dp.sync = PeerSync::default();
        dp.sync.state.shared_heads = shared;
        dp.sync.state.their_capabilities = capabilities;
        // Ask the peer to forget what it believes it already sent us, in
        // case that is what went missing.
        dp.sync.state.needs_reset = true;
        self.sync_peer(id, peer);
    }

    // ------------------------------------------------------------ commands

    fn on_command(&mut self, cmd: CommandId, command: Command) {
        match command {
            Command::Create { initial } => self.create(cmd, initial),
            Command::Find { document_id } => self.find(cmd, document_id),
            Command::Broadcast { document_id, data } => {
                let sent = self.broadcast(&document_id, data);
                self.out
                    .completed
                    .push((cmd, CommandResult::Broadcast(sent)));
            }
            Command::WhenSaved { document_id } => self.when_saved(cmd, document_id),
        }
    }

    fn create(&mut self, cmd: CommandId, initial: Option<Vec<u8>>) {
        let id = DocumentId::from_random(self.rng.bytes::<16>());
        let mut replica = self.new_replica();
        match &initial {
            Some(bytes) => {
                if let Err(e) = replica.load_chunk(bytes) {
                    self.out
                        .completed
                        .push((cmd, CommandResult::Failed(format!("initial document: {e}"))));
                    return;
                }
            }
            None => {
                // Like automerge-repo, start with one empty change so the
                // document has heads: an empty document and a missing one
                // look the same to peers otherwise.
                let time = self.now.as_secs();
                match replica.document_mut() {
                    Some(am) => {
                        am.empty_commit(CommitOptions::default().with_time(time));
                        if let Err(e) = replica.absorb_local_edits() {
                            self.out
                                .completed
                                .push((cmd, CommandResult::Failed(format!("initial change: {e}"))));
                            return;
                        }
                    }
                    None => {
                        self.out.completed.push((
                            cmd,
                            CommandResult::Failed(ChangeError::NotEditable.to_string()),
                        ));
                        return;
                    }
                }
            }
        }
        let mut doc = Doc::new(DocStatus::Ready, replica);
        doc.wanted = true;
        self.docs.insert(id.clone(), doc);
        self.doc_changed(&id, Origin::Local);
        self.out.completed.push((cmd, CommandResult::Created(id)));
    }

    fn find(&mut self, cmd: CommandId, id: DocumentId) {
        if !self.docs.contains_key(&id) {
            let replica = self.new_replica();
            let mut doc = Doc::new(DocStatus::Loading, replica);
            doc.wanted = true;
            doc.waiting_finds.push(cmd);
            self.docs.insert(id.clone(), doc);
            self.start_load(&id);
            return;
        }
        self.touch(&id);
        let Some(doc) = self.docs.get_mut(&id) else {
            return;
        };
        doc.wanted = true;
        match doc.status {
            DocStatus::Ready => self.out.completed.push((cmd, CommandResult::Found(id))),
            DocStatus::Loading | DocStatus::Requesting => doc.waiting_finds.push(cmd),
            DocStatus::Unavailable => {
                // Ask again: peers may have it by now.
                doc.waiting_finds.push(cmd);
                self.begin_request(&id);
            }
        }
    }

    fn broadcast(&mut self, id: &DocumentId, data: Vec<u8>) -> usize {
        self.ephemeral_count += 1;
        let targets = self.doc_audience(id, None);
        for peer in &targets {
            let message = Message::Ephemeral(EphemeralMessage {
                sender_id: self.cfg.peer_id.clone(),
                target_id: peer.clone(),
                document_id: id.clone(),
                count: self.ephemeral_count,
                session_id: self.session_id.clone(),
                data: data.clone(),
            });
            self.send_to_peer(peer, message);
        }
        targets.len()
    }

    /// Connected peers a document's news goes to: those already syncing it
    /// with us, plus (unless `only_active`) those our policy announces to.
    fn doc_audience(&self, id: &DocumentId, exclude: Option<&PeerId>) -> Vec<PeerId> {
        let mut out: BTreeSet<PeerId> = self
            .docs
            .get(id)
            .map(|d| d.peers.keys().cloned().collect())
            .unwrap_or_default();
        if !self.cfg.policy.announces_nothing() {
            for peer in self.peers.keys() {
                if self.cfg.policy.announce(peer, id) {
                    out.insert(peer.clone());
                }
            }
        }
        out.into_iter()
            .filter(|p| Some(p) != exclude && self.peers.contains_key(p))
            .collect()
    }

    // ------------------------------------------------------------ connections

    fn on_connected(&mut self, conn: ConnectionId, direction: Direction) {
        if self.connections.contains_key(&conn) {
            self.close(conn, "connection id reused while open".into());
        }
        let deadline = self.now.plus(self.cfg.handshake_timeout);
        let state = match direction {
            Direction::Outgoing => ConnState::AwaitingPeer,
            Direction::Incoming => ConnState::AwaitingJoin,
        };
        self.connections.insert(
            conn,
            Connection {
                state,
                direction,
                handshake_deadline: deadline,
            },
        );
        self.timers.insert((deadline, Timer::Handshake(conn)));
        if direction == Direction::Outgoing {
            let join = Message::Join {
                sender_id: self.cfg.peer_id.clone(),
                metadata: Some(self.our_metadata()),
                supported_protocol_versions: Some(vec![PROTOCOL_VERSION.to_owned()]),
            };
            self.send(conn, join);
        }
    }

    fn our_metadata(&self) -> PeerMetadata {
        PeerMetadata {
            storage_id: self.cfg.storage_id.clone(),
            is_ephemeral: Some(self.cfg.storage_id.is_none()),
        }
    }

    /// Closes a connection on our side and forgets it.
    fn close(&mut self, conn: ConnectionId, reason: String) {
        if self.connections.contains_key(&conn) {
            tracing::debug!(%conn, %reason, "closing connection");
            self.out.closes.push(Close { conn, reason });
            self.forget_connection(conn);
        }
    }

    fn forget_connection(&mut self, conn: ConnectionId) {
        let Some(c) = self.connections.remove(&conn) else {
            return;
        };
        if let ConnState::Ready { peer_id, .. } = c.state {
            if self.peers.get(&peer_id) == Some(&conn) {
                self.peers.remove(&peer_id);
                self.peer_gone(&peer_id);
            }
            self.out
                .events
                .push(Event::PeerDisconnected { conn, peer_id });
        }
    }

    /// Drops a departed peer's per-document state, persisting what matters.
    fn peer_gone(&mut self, peer: &PeerId) {
        let docs = self.peer_docs.remove(peer).unwrap_or_default();
        for id in docs {
            self.persist_sync_state(&id, peer);
            let Some(doc) = self.docs.get_mut(&id) else {
                continue;
            };
            if let Some(dp) = doc.remove_peer(peer) {
                // Keep what a reconnect should resume from in memory too:
                // the document may stay loaded until the peer is back.
                if let Some(name) = dp.persist_key.as_ref().and_then(|k| k.parts().last()) {
                    doc.stored_sync_states
                        .insert(name.clone(), dp.sync.state.encode());
                }
            }
            if doc.status == DocStatus::Requesting {
                self.check_request_done(&id);
            }
        }
    }

    fn on_received(&mut self, conn: ConnectionId, bytes: &[u8]) {
        let Some(c) = self.connections.get(&conn) else {
            return;
        };
        if bytes.len() > self.cfg.max_message_bytes {
            self.close(
                conn,
                format!(
                    "message of {} bytes exceeds the limit of {}",
                    bytes.len(),
                    self.cfg.max_message_bytes
                ),
            );
            return;
        }
        let message = match wire::decode(bytes) {
            Ok(m) => m,
            Err(DecodeError::UnknownType(kind)) => {
                tracing::debug!(%conn, %kind, "ignoring message of unknown type");
                return;
            }
            Err(e) => {
                self.close(conn, format!("malformed message: {e}"));
                return;
            }
        };
        if let Message::Error { message, .. } = &message {
            let reason = format!("peer reported an error: {message}");
            self.close(conn, reason);
            return;
        }
        match &c.state {
            ConnState::AwaitingJoin => match message {
                Message::Join {
                    sender_id,
                    metadata,
                    supported_protocol_versions,
                } => self.on_join(conn, sender_id, metadata, supported_protocol_versions),
                other => self.close(
                    conn,
                    format!("expected `join` first, got `{}`", other.type_name()),
                ),
            },
            ConnState::AwaitingPeer => match message {
                Message::Peer {
                    sender_id,
                    metadata,
                    selected_protocol_version,
                    ..
                } => {
                    if selected_protocol_version != PROTOCOL_VERSION {
                        self.close(
                            conn,
                            format!("peer selected unsupported protocol version {selected_protocol_version}"),
                        );
                    } else {
                        self.bind_peer(conn, sender_id, metadata.unwrap_or_default());
                    }
                }
                other => self.close(
                    conn,
                    format!("expected `peer` first, got `{}`", other.type_name()),
                ),
            },
            ConnState::Ready { peer_id, .. } => {
                let peer = peer_id.clone();
                self.on_peer_message(conn, peer, message);
            }
        }
    }

    fn on_join(
        &mut self,
        conn: ConnectionId,
        sender: PeerId,
        metadata: Option<PeerMetadata>,
        versions: Option<Vec<String>>,
    ) {
        let supported = versions
            .as_ref()
            .is_none_or(|v| v.iter().any(|v| v == PROTOCOL_VERSION));
        if !supported {
            self.send(
                conn,
                Message::Error {
                    sender_id: Some(self.cfg.peer_id.clone()),
                    target_id: Some(sender),
                    message: "unsupported protocol version".into(),
                },
            );
            self.close(conn, "unsupported protocol version".into());
            return;
        }
        let reply = Message::Peer {
            sender_id: self.cfg.peer_id.clone(),
            target_id: sender.clone(),
            metadata: Some(self.our_metadata()),
            selected_protocol_version: PROTOCOL_VERSION.to_owned(),
        };
        self.send(conn, reply);
        self.bind_peer(conn, sender, metadata.unwrap_or_default());
    }

    fn bind_peer(&mut self, conn: ConnectionId, peer: PeerId, metadata: PeerMetadata) {
        if peer == self.cfg.peer_id {
            self.close(conn, "peer uses our own peer id".into());
            return;
        }
        if let Some(old) = self.peers.get(&peer).copied() {
            if old != conn {
                self.close(
                    old,
                    "replaced by a newer connection from the same peer".into(),
                );
            }
        }
        if let Some(c) = self.connections.get_mut(&conn) {
            c.state = ConnState::Ready {
                peer_id: peer.clone(),
                metadata: metadata.clone(),
            };
        }
        self.peers.insert(peer.clone(), conn);
        self.out.events.push(Event::PeerConnected {
            conn,
            peer_id: peer.clone(),
            metadata,
        });
        if self.cfg.policy.announces_nothing() {
            return;
        }
        let ids: Vec<DocumentId> = self
            .docs
            .iter()
            .filter(|(id, d)| {
                self.cfg.policy.announce(&peer, id)
                    && match d.status {
                        DocStatus::Ready => true,
                        DocStatus::Requesting | DocStatus::Unavailable => d.wanted,
                        DocStatus::Loading => false,
                    }
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let status = self.docs.get(&id).map(|d| d.status);
            if status == Some(DocStatus::Unavailable) {
                self.begin_request(&id);
            } else {
                self.sync_peer(&id, &peer);
            }
        }
    }

    fn on_peer_message(&mut self, conn: ConnectionId, peer: PeerId, message: Message) {
        // Ephemeral messages keep their original sender as relays pass
        // them on, so only other messages must come from the bound peer.
        // Only a server we dialled (a relay) passes on other peers'
        // ephemeral messages; from anyone else a foreign sender is spoofed.
        let from_server = self
            .connections
            .get(&conn)
            .is_some_and(|c| c.direction == Direction::Outgoing);
        let relayed = from_server && matches!(message, Message::Ephemeral(_));
        if !relayed && message.sender_id() != Some(&peer) {
            tracing::debug!(%conn, "dropping message whose sender is not the connected peer");
            return;
        }
        if message.target_id().is_some_and(|t| *t != self.cfg.peer_id) {
            tracing::debug!(%conn, "dropping message addressed to another peer");
            return;
        }
        match message {
            Message::Sync(m) => self.on_doc_message(conn, peer, m, false),
            Message::Request(m) => self.on_doc_message(conn, peer, m, true),
            Message::DocUnavailable { document_id, .. } => {
                self.on_doc_unavailable(&peer, &document_id)
            }
            Message::Ephemeral(m) => self.on_ephemeral(&peer, m),
            Message::Join { .. } => {
                // A repeated join on a live connection: answer it again.
                let reply = Message::Peer {
                    sender_id: self.cfg.peer_id.clone(),
                    target_id: peer,
                    metadata: Some(self.our_metadata()),
                    selected_protocol_version: PROTOCOL_VERSION.to_owned(),
                };
                self.send(conn, reply);
            }
            // Heads gossip and `leave` are optional; we do not act on them.
            _ => {}
        }
    }

    // ------------------------------------------------------------ documents

    fn new_replica(&mut self) -> Box<dyn Replica> {
        (self.cfg.replica)(
            ActorId::from(self.rng.bytes::<16>().to_vec()),
            self.hash_seed,
        )
    }

    fn on_doc_message(
        &mut self,
        conn: ConnectionId,
        peer: PeerId,
        m: DocMessage,
        is_request: bool,
    ) {
        let id = m.document_id;
        if !self.cfg.policy.access(&peer, &id) {
            let reply = Message::DocUnavailable {
                sender_id: self.cfg.peer_id.clone(),
                target_id: peer,
                document_id: id,
            };
            self.send(conn, reply);
            return;
        }
        let message = match validate::decode_sync_message(&m.data, &self.cfg.limits) {
            Ok(msg) => msg,
            Err(e) => {
                self.close(conn, format!("invalid sync message for document {id}: {e}"));
                return;
            }
        };
        if !self.docs.contains_key(&id) {
            let replica = self.new_replica();
            self.docs
                .insert(id.clone(), Doc::new(DocStatus::Loading, replica));
            self.start_load(&id);
        }
        self.touch(&id);
        let Some(doc) = self.docs.get_mut(&id) else {
            return;
        };
        if doc.status == DocStatus::Loading {
            if doc.pending.len() >= MAX_PENDING_PER_DOC {
                self.close(
                    conn,
                    format!("too many messages for document {id} while it loads"),
                );
                return;
            }
            doc.pending.push(PendingMessage {
                peer,
                message,
                is_request,
            });
            return;
        }
        self.apply_sync_message(&id, &peer, message, is_request);
    }

    fn apply_sync_message(
        &mut self,
        id: &DocumentId,
        peer: &PeerId,
        message: sync::Message,
        is_request: bool,
    ) {
        if !self.peers.contains_key(peer) {
            return; // the peer left while the document loaded
        }
        self.activate(id, peer);
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let Some(dp) = doc.peers.get_mut(peer) else {
            return;
        };
        if is_request {
            dp.they_requested = true;
            dp.told_unavailable = false;
            dp.lacks = true;
        } else if !message.heads.is_empty() {
            dp.lacks = false;
        }
        tracing::debug!(
            document = %id,
            %peer,
            heads = message.heads.len(),
            need = message.need.len(),
            changes = message.changes.len(),
            is_request,
            "received sync message"
        );
        // Only changes move the heads (most messages are acknowledgements;
        // copying the heads costs as much as the rest of receiving one).
        let before = (!message.changes.is_empty()).then(|| doc.replica.heads());
        // A message without changes naming our heads makes the sync state
        // record those heads as told to the peer, so nothing more is sent.
        // That holds when every earlier message has been answered; in a
        // batch, the answer to an earlier message (say, the one that
        // brought those heads) may still be due, and the peer would never
        // learn we hold its changes. Keep what we really sent until then.
        let sent_heads = (dp.reply_due && message.changes.is_empty() && !message.heads.is_empty())
            .then(|| dp.sync.state.last_sent_heads.clone());
        let replica = &mut doc.replica;
        let state = &mut dp.sync;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            replica.receive_sync_message(state, message)
        }));
        if let Some(heads) = sent_heads {
            state.state.last_sent_heads = heads;
        }
        match outcome {
            Err(_) => {
                self.contain_panic(id, peer, true);
                return;
            }
            Ok(Err(e)) => {
                if let Some(doc) = self.docs.get_mut(id) {
                    doc.remove_peer(peer);
                }
                self.unindex(id, peer);
                self.close_peer(
                    peer,
                    format!("sync message for document {id} rejected: {e}"),
                );
                return;
            }
            Ok(Ok(())) => {}
        }
        self.persist_sync_state(id, peer);
        let changed = before.is_some_and(|before| {
            self.docs
                .get(id)
                .is_some_and(|d| d.replica.heads() != before)
        });
        if changed {
            self.doc_changed(id, Origin::Remote(peer.clone()));
        } else {
            self.defer_sync(id, peer);
        }
        let Some(doc) = self.docs.get(id) else { return };
        if is_request && doc.replica.is_empty() {
            match doc.status {
                DocStatus::Requesting => {}
                _ => self.begin_request(id),
            }
        }
    }

    /// Makes sure `peer` has sync state for `id`, restoring a persisted
    /// one when the peer has a usable storage id.
    fn activate(&mut self, id: &DocumentId, peer: &PeerId) {
        let persist_key = self.persist_key_for(id, peer);
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        if doc.peers.contains_key(peer) {
            return;
        }
        let mut state = sync::State::new();
        let mut persisted_heads = Vec::new();
        if let Some(key) = &persist_key {
            let storage_name = key.parts().last().cloned().unwrap_or_default();
            if let Some(bytes) = doc.stored_sync_states.remove(&storage_name) {
                if let Ok(restored) = sync::State::decode(&bytes) {
                    // A state that claims heads we do not hold (we lost
                    // unsynced writes in a crash) would mislead the
                    // exchange; start fresh instead.
                    if restored
                        .shared_heads
                        .iter()
                        .all(|h| doc.replica.has_change(h))
                    {
                        persisted_heads = restored.shared_heads.clone();
                        state = restored;
                    }
                }
            }
        }
        doc.peers.insert(
            peer.clone(),
            Box::new(DocPeer {
                sync: PeerSync::new(state),
                lacks: false,
                they_requested: false,
                told_unavailable: false,
                we_requested: false,
                persist_key,
                persisted_heads,
                resync_at: None,
                resynced_at_heads: None,
                reply_due: false,
                held: None,
                due_after_held: false,
            }),
        );
        self.peer_docs
            .entry(peer.clone())
            .or_default()
            .insert(id.clone());
    }

    fn unindex(&mut self, id: &DocumentId, peer: &PeerId) {
        if let Some(set) = self.peer_docs.get_mut(peer) {
            set.remove(id);
        }
    }

    fn persist_key_for(&self, id: &DocumentId, peer: &PeerId) -> Option<StorageKey> {
        self.cfg.storage_id.as_ref()?;
        let conn = self.peers.get(peer)?;
        let ConnState::Ready { metadata, .. } = &self.connections.get(conn)?.state else {
            return None;
        };
        let storage_id = metadata.storage_id.as_ref()?;
        if metadata.ephemeral() || !storage_id.is_key_safe() {
            return None;
        }
        Some(StorageKey::sync_state(id, storage_id))
    }

    fn persist_sync_state(&mut self, id: &DocumentId, peer: &PeerId) {
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let Some(dp) = doc.peers.get_mut(peer) else {
            return;
        };
        let Some(key) = dp.persist_key.clone() else {
            return;
        };
        if dp.sync.state.shared_heads == dp.persisted_heads {
            return;
        }
        dp.persisted_heads = dp.sync.state.shared_heads.clone();
        let bytes = dp.sync.state.encode();
        self.storage(StorageOp::Put(key, bytes), Task::Other);
    }

    /// Sends `peer` whatever the sync protocol says it needs next.
    fn sync_peer(&mut self, id: &DocumentId, peer: &PeerId) {
        if !self.peers.contains_key(peer) {
            return;
        }
        self.activate(id, peer);
        let resync_at = self.now.plus(self.cfg.resync_interval);
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let status = doc.status;
        let empty = doc.replica.is_empty();
        let Some(dp) = doc.peers.get_mut(peer) else {
            return;
        };
        if dp.held.is_some() && dp.held == self.peers.get(peer).copied() {
            // Still due (receiving relies on knowing that): generated once
            // the held message leaves.
            dp.due_after_held = true;
            return;
        }
        dp.reply_due = false;
        // With nothing of our own we still answer a peer that offers the
        // document (that is how we get it); otherwise we ask for it, once,
        // if we are asking around and this peer has not said it lacks it.
        let they_have_it = dp
            .sync
            .state
            .their_heads
            .as_ref()
            .is_some_and(|h| !h.is_empty());
        let mut as_request = false;
        if empty && !they_have_it {
            if status != DocStatus::Requesting || dp.lacks || dp.we_requested {
                return;
            }
            dp.we_requested = true;
            as_request = true;
        }
        let replica = &doc.replica;
        let state = &mut dp.sync;
        let generated = catch_unwind(AssertUnwindSafe(|| replica.generate_sync_message(state)));
        let message = match generated {
            Err(_) => {
                self.contain_panic(id, peer, false);
                return;
            }
            Ok(None) => return,
            Ok(Some(m)) => m,
        };
        if dp.resync_at.is_none() {
            dp.resync_at = Some(resync_at);
            self.timers
                .insert((resync_at, Timer::Resync(id.clone(), peer.clone())));
        }
        tracing::debug!(
            document = %id,
            %peer,
            heads = message.heads.len(),
            need = message.need.len(),
            changes = message.changes.len(),
            request = as_request,
            "sending sync message"
        );
        let doc_message = DocMessage {
            sender_id: self.cfg.peer_id.clone(),
            target_id: peer.clone(),
            document_id: id.clone(),
            data: message.encode(),
        };
        let message = if as_request {
            Message::Request(doc_message)
        } else {
            Message::Sync(doc_message)
        };
        let Some(conn) = self.peers.get(peer).copied() else {
            return;
        };
        // A message may carry changes storage has not confirmed yet: it
        // leaves once they are on disk, so that no peer ever holds a change
        // a crash here could lose.
        let send = Waiter::Send(peer.clone(), Send { conn, message });
        let released = match self.docs.get_mut(id) {
            Some(doc) => {
                let heads = doc.replica.heads();
                let released = doc.durable.wait(send, &heads);
                if released.is_none() {
                    if let Some(dp) = doc.peers.get_mut(peer) {
                        dp.held = Some(conn);
                    }
                }
                released
            }
            None => Some(send),
        };
        self.deliver(id, released);
    }

    /// Automerge panicked on something this peer sent. Close the peer's
    /// connection, drop its sync state, and — if the panic hit while the
    /// document was being modified — rebuild the document from a save so a
    /// half-applied change cannot linger.
    fn contain_panic(&mut self, id: &DocumentId, peer: &PeerId, while_receiving: bool) {
        tracing::error!(document = %id, %peer, "automerge panicked; closing the peer's connection");
        self.out.events.push(Event::PanicContained {
            document_id: id.clone(),
            peer_id: peer.clone(),
        });
        if let Some(doc) = self.docs.get_mut(id) {
            doc.remove_peer(peer);
        }
        self.unindex(id, peer);
        self.close_peer(
            peer,
            format!("internal error handling document {id}; connection closed"),
        );
        if while_receiving {
            self.rebuild_replica(id);
        }
    }

    fn rebuild_replica(&mut self, id: &DocumentId) {
        let mut fresh = self.new_replica();
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let replica = &doc.replica;
        let rebuilt = catch_unwind(AssertUnwindSafe(|| {
            let bytes = replica.save();
            fresh.load_chunk(&bytes).map(|()| fresh)
        }));
        match rebuilt {
            Ok(Ok(r)) => {
                doc.replica = r;
                // What peers were offered is recorded as positions in the
                // old replica's history: work it out afresh.
                for dp in doc.peers.values_mut() {
                    dp.sync = PeerSync::new(std::mem::take(&mut dp.sync.state));
                }
            }
            _ => {
                // Cannot even save it: forget the in-memory copy and read it
                // back from storage. Peers re-sync from their own state.
                tracing::error!(document = %id, "document unusable after a panic; reloading from storage");
                let peers: Vec<PeerId> = doc.peers.keys().cloned().collect();
                for p in &peers {
                    self.unindex(id, p);
                }
                let replica = self.new_replica();
                if let Some(doc) = self.docs.get_mut(id) {
                    let waiting = std::mem::take(&mut doc.waiting_finds);
                    let wanted = doc.wanted;
                    *doc = Doc::new(DocStatus::Loading, replica);
                    doc.waiting_finds = waiting;
                    doc.wanted = wanted;
                }
                self.start_load(id);
            }
        }
    }

    fn close_peer(&mut self, peer: &PeerId, reason: String) {
        if let Some(conn) = self.peers.get(peer).copied() {
            self.close(conn, reason);
        }
    }

    /// A document's heads moved: save, resolve waiters, tell peers.
    fn doc_changed(&mut self, id: &DocumentId, origin: Origin) {
        self.touch(id);
        self.deferred_saves.insert(id.clone());
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        if doc.status != DocStatus::Ready && !doc.replica.is_empty() {
            doc.status = DocStatus::Ready;
            doc.request_deadline = None;
            doc.grace_until = None;
            for cmd in std::mem::take(&mut doc.waiting_finds) {
                self.out
                    .completed
                    .push((cmd, CommandResult::Found(id.clone())));
            }
        }
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let heads = doc.replica.heads();
        let previous = std::mem::replace(&mut doc.announced_heads, heads.clone());
        self.out.events.push(Event::DocChanged {
            document_id: id.clone(),
            previous,
            heads,
            origin,
        });
        for peer in self.doc_audience(id, None) {
            self.defer_sync(id, &peer);
        }
    }

    /// Asks every peer we may ask for a document we lack; if there is
    /// nobody to ask, it is unavailable now.
    fn begin_request(&mut self, id: &DocumentId) {
        let candidates: Vec<PeerId> = self
            .peers
            .keys()
            .filter(|p| {
                self.cfg.policy.announce(p, id)
                    && !self
                        .docs
                        .get(id)
                        .and_then(|d| d.peers.get(*p))
                        .is_some_and(|dp| dp.lacks)
            })
            .cloned()
            .collect();
        // With nobody to ask we still wait a moment before saying
        // "unavailable": the peer that has the document may be about to
        // offer it (a client that just created a document announces it in
        // the same instant another asks for it).
        let nobody = candidates.is_empty() && !self.someone_has_it(id);
        if nobody && self.cfg.unavailable_grace.is_zero() {
            self.mark_unavailable(id);
            return;
        }
        let wait = if nobody {
            self.cfg.unavailable_grace
        } else {
            self.cfg.request_timeout
        };
        let deadline = self.now.plus(wait);
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        doc.status = DocStatus::Requesting;
        doc.request_deadline = Some(deadline);
        doc.grace_until = nobody.then_some(deadline);
        doc.request_extended = false;
        for dp in doc.peers.values_mut() {
            dp.we_requested = false;
        }
        self.timers.insert((deadline, Timer::Request(id.clone())));
        for peer in candidates {
            self.sync_peer(id, &peer);
        }
        self.check_request_done(id);
    }

    /// While requesting: if every peer we asked has said no (or left),
    /// the document is unavailable.
    fn check_request_done(&mut self, id: &DocumentId) {
        let Some(doc) = self.docs.get(id) else { return };
        if doc.status != DocStatus::Requesting || doc.grace_until.is_some_and(|g| self.now < g) {
            return;
        }
        let still_asking = doc
            .peers
            .iter()
            .any(|(p, dp)| dp.we_requested && !dp.lacks && self.peers.contains_key(p));
        if !still_asking && !self.someone_has_it(id) {
            self.mark_unavailable(id);
        }
    }

    /// Whether a connected peer has told us heads for this document: it
    /// has the document and our exchange with it will bring it here, so
    /// nobody should be told it is unavailable yet.
    fn someone_has_it(&self, id: &DocumentId) -> bool {
        self.docs.get(id).is_some_and(|doc| {
            doc.peers.iter().any(|(p, dp)| {
                self.peers.contains_key(p)
                    && !dp.lacks
                    && dp
                        .sync
                        .state
                        .their_heads
                        .as_ref()
                        .is_some_and(|h| !h.is_empty())
            })
        })
    }

    fn mark_unavailable(&mut self, id: &DocumentId) {
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        doc.status = DocStatus::Unavailable;
        doc.request_deadline = None;
        doc.grace_until = None;
        for cmd in std::mem::take(&mut doc.waiting_finds) {
            self.out
                .completed
                .push((cmd, CommandResult::Unavailable(id.clone())));
        }
        let mut tell = Vec::new();
        for (peer, dp) in doc.peers.iter_mut() {
            if dp.they_requested && !dp.told_unavailable {
                dp.told_unavailable = true;
                tell.push(peer.clone());
            }
        }
        self.out.events.push(Event::DocUnavailable {
            document_id: id.clone(),
        });
        for peer in tell {
            let message = Message::DocUnavailable {
                sender_id: self.cfg.peer_id.clone(),
                target_id: peer.clone(),
                document_id: id.clone(),
            };
            self.send_to_peer(&peer, message);
        }
    }

    fn on_doc_unavailable(&mut self, peer: &PeerId, id: &DocumentId) {
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let Some(dp) = doc.peers.get_mut(peer) else {
            return;
        };
        dp.lacks = true;
        // The peer dropped its side of the exchange; if the document turns
        // up later we start over with it.
        dp.sync = PeerSync::default();
        self.check_request_done(id);
    }

    fn on_ephemeral(&mut self, from: &PeerId, m: EphemeralMessage) {
        if !self.cfg.policy.access(from, &m.document_id) || m.sender_id == self.cfg.peer_id {
            return;
        }
        let key = (m.sender_id.clone(), m.session_id.clone());
        if self
            .ephemeral_seen
            .get(&key)
            .is_some_and(|&seen| m.count <= seen)
        {
            return;
        }
        if self.ephemeral_seen.len() >= MAX_EPHEMERAL_SESSIONS {
            self.ephemeral_seen.clear();
        }
        self.ephemeral_seen.insert(key, m.count);
        self.out.events.push(Event::Ephemeral {
            document_id: m.document_id.clone(),
            sender_id: m.sender_id.clone(),
            session_id: m.session_id.clone(),
            count: m.count,
            data: m.data.clone(),
        });
        let only_active: Vec<PeerId> = match self.docs.get(&m.document_id) {
            Some(doc) => doc.peers.keys().cloned().collect(),
            None => Vec::new(),
        };
        for peer in only_active {
            if peer == *from || peer == m.sender_id || !self.peers.contains_key(&peer) {
                continue;
            }
            let mut forwarded = m.clone();
            forwarded.target_id = peer.clone();
            self.send_to_peer(&peer, Message::Ephemeral(forwarded));
        }
    }

    // ------------------------------------------------------------ storage

    // ------------------------------------------------------------ sending

    fn send(&mut self, conn: ConnectionId, message: Message) {
        self.out.sends.push(Send { conn, message });
    }

    fn send_to_peer(&mut self, peer: &PeerId, message: Message) {
        if let Some(conn) = self.peers.get(peer).copied() {
            self.send(conn, message);
        }
    }
}

impl Doc {
    fn new(status: DocStatus, replica: Box<dyn Replica>) -> Self {
        Self {
            status,
            replica,
            wanted: false,
            waiting_finds: Vec::new(),
            request_deadline: None,
            grace_until: None,
            request_extended: false,
            peers: BTreeMap::new(),
            stored_sync_states: BTreeMap::new(),
            pending: Vec::new(),
            durable: Durability::default(),
            last_used: Timestamp(0),
            announced_heads: Vec::new(),
        }
    }
}
