//! One document as the engine holds it: its replica, its status, its
//! peers' sync states, and its request and durability machines.

use super::*;

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
pub(super) struct Doc {
    pub(super) status: DocStatus,
    pub(super) replica: Box<dyn Replica>,
    /// Who wants it and the round of asking peers for it.
    pub(super) request: Request,
    /// Boxed: a sync state is large, and a map node holds room for
    /// eleven entries even when it holds one.
    pub(super) peers: BTreeMap<PeerId, Box<DocPeer>>,
    /// Sync states read from storage, by remote storage id, not yet in use.
    pub(super) stored_sync_states: BTreeMap<String, Vec<u8>>,
    pub(super) pending: Vec<PendingMessage>,
    /// What is on disk, the writes in flight and who waits for them.
    pub(super) durable: Durability,
    /// When the document was last touched (for eviction).
    pub(super) last_used: Timestamp,
    /// The heads last reported in an [`Event::DocChanged`].
    pub(super) announced_heads: Vec<ChangeHash>,
}

impl Doc {
    pub(super) fn new(status: DocStatus, replica: Box<dyn Replica>) -> Self {
        Self {
            status,
            replica,
            request: Request::default(),
            peers: BTreeMap::new(),
            stored_sync_states: BTreeMap::new(),
            pending: Vec::new(),
            durable: Durability::default(),
            last_used: Timestamp(0),
            announced_heads: Vec::new(),
        }
    }

    /// Every change is written: no write is waiting for its result, and the
    /// last one written holds the current heads.
    pub(super) fn is_saved(&self) -> bool {
        self.durable.is_saved(&self.replica.heads())
    }

    /// Forgets a peer's sync state for this document. An emptied map gives
    /// back its node: a cold document in memory should cost little.
    pub(super) fn remove_peer(&mut self, peer: &PeerId) -> Option<Box<DocPeer>> {
        let removed = self.peers.remove(peer);
        if self.peers.is_empty() {
            self.peers = BTreeMap::new();
        }
        removed
    }
}

#[derive(Debug)]
pub(super) struct DocPeer {
    pub(super) sync: PeerSync,
    /// Its part in finding the document.
    pub(super) ask: PeerAsk,
    /// Where its sync state is persisted, if anywhere.
    pub(super) persist_key: Option<StorageKey>,
    /// The `shared_heads` last persisted.
    pub(super) persisted_heads: Vec<ChangeHash>,
    /// When to restart a stalled exchange.
    pub(super) resync_at: Option<Timestamp>,
    /// Our heads when we last restarted the exchange.
    pub(super) resynced_at_heads: Option<Vec<ChangeHash>>,
    /// A message for this peer is due at the end of the current input or
    /// batch and has not been generated yet.
    pub(super) reply_due: bool,
    /// A message to it, on this connection, waits for a write (see
    /// [`Durability`]). No other is generated meanwhile: when it leaves, one
    /// message carries whatever accumulated, instead of one per change,
    /// each with its own summary of everything not yet acknowledged. A
    /// message held for an earlier connection holds nothing back.
    pub(super) held: Option<ConnectionId>,
    /// It was due another message while one was held.
    pub(super) due_after_held: bool,
}

#[derive(Debug)]
pub(super) struct PendingMessage {
    pub(super) peer: PeerId,
    pub(super) message: sync::Message,
    pub(super) is_request: bool,
}
