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

mod access;
mod changelog;
mod commands;
mod compaction;
mod connection;
mod document;
mod durability;
mod inspect;
mod local;
mod peer_sync;
mod perform;
mod persist;
mod policy;
mod replica;
mod request;
mod rng;
mod timers;
mod types;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use automerge::sync;
use automerge::transaction::CommitOptions;
use automerge::{ActorId, Automerge, ChangeHash};

pub use access::{Access, Acl, Claims, ClaimsError, Grant, Rights};
pub use changelog::ChangeLog;
pub use compaction::compaction;
pub use local::ChangeError;
pub use perform::{perform, perform_many};
pub use policy::{AnnounceAll, RelayPolicy, SharePolicy};
pub use replica::{
    full_document_factory, split_chunks, FullDocument, PeerSync, RawChunk, Replica, ReplicaError,
    ReplicaFactory, ReplicaKind,
};
pub use types::{
    close_code, Close, CloseReason, Command, CommandId, CommandResult, ConnectionId, CreateError,
    Direction, EngineConfig, Event, FindError, Input, Origin, Output, Send, Timestamp,
};

use crate::storage::{
    BatchOp, ChunkKind, DocKey, DocMeta, StorageError, StorageKey, StorageOp, StorageResult,
    StorageTask, TaskId,
};
use crate::wire::{
    self, DecodeError, DocMessage, DocumentId, EphemeralMessage, Message, PeerId, PeerMetadata,
    SessionId, PROTOCOL_VERSION,
};
use connection::{ConnState, Connection};

/// For unit tests: creates an empty document at `now`; its id.
#[cfg(test)]
pub(crate) fn created(engine: &mut Engine, now: Timestamp) -> DocumentId {
    let create = Command::Create {
        initial: None,
        owner: None,
    };
    let out = engine.handle(now, Input::Command(CommandId(u64::MAX), create));
    match out.completed.first() {
        Some((_, CommandResult::Create(Ok(id)))) => id.clone(),
        other => panic!("create answers at once: {other:?}"),
    }
}
use document::{Doc, Generated, PendingMessage, Received};
pub use document::{DocStatus, PeerSyncStatus, SyncStatus};
use durability::{Durability, Waiter};
use request::{PeerAsk, Request};
use rng::Rng;
use timers::Timer;

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
            Input::Connected {
                conn,
                direction,
                grant,
            } => self.on_connected(conn, direction, grant),
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
}
