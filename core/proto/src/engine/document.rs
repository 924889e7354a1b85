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
    /// Chunks handed over (`Command::ApplyChunk`) while the document
    /// loaded: applied once it has.
    pub(super) pending_chunks: Vec<Vec<u8>>,
    /// What is on disk, the writes in flight and who waits for them.
    pub(super) durable: Durability,
    /// When the document was last touched (for eviction).
    pub(super) last_used: Timestamp,
    /// The heads last reported in an [`Event::DocChanged`].
    pub(super) announced_heads: Vec<ChangeHash>,
    /// The document's metadata as far as the engine knows it: started by
    /// its first change here, never read from storage (the store's copy
    /// is written blind; readers overlay this one on it).
    pub(super) meta: Option<DocMeta>,
    /// `meta` changed since it was last written.
    pub(super) meta_dirty: bool,
    /// The store did not hold the document when it was opened here: its
    /// first save records when it was created.
    pub(super) fresh: bool,
    /// Who may do what with it beside what their grants say (read with
    /// the document).
    pub(super) acl: Acl,
    /// `acl` changed since it was last written.
    pub(super) acl_dirty: bool,
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
            pending_chunks: Vec::new(),
            durable: Durability::default(),
            last_used: Timestamp(0),
            announced_heads: Vec::new(),
            meta: None,
            meta_dirty: false,
            fresh: false,
            acl: Acl::default(),
            acl_dirty: false,
        }
    }

    /// A change arrived from `writer` (`None`: made here) at `now_ms`.
    pub(super) fn touch_meta(&mut self, now_ms: u64, writer: Option<String>) {
        let fresh = self.fresh;
        let meta = self.meta.get_or_insert(DocMeta {
            created_ms: fresh.then_some(now_ms),
            updated_ms: now_ms,
            last_writer: None,
        });
        meta.updated_ms = meta.updated_ms.max(now_ms);
        meta.last_writer = writer;
        self.meta_dirty = true;
    }

    /// Every change is written: no write is waiting for its result, and the
    /// last one written holds the current heads.
    pub(super) fn is_saved(&self) -> bool {
        self.durable.is_saved(&self.replica.heads())
    }

    /// Gives `peer` sync state for this document unless it has some,
    /// resuming from a state stored under `persist_key` when there is one
    /// we can trust. Says whether the peer is new here.
    pub(super) fn activate(&mut self, peer: &PeerId, persist_key: Option<StorageKey>) -> bool {
        if self.peers.contains_key(peer) {
            return false;
        }
        let mut state = sync::State::new();
        let mut persisted_heads = Vec::new();
        let stored = persist_key
            .as_ref()
            .and_then(|key| key.parts().last())
            .and_then(|name| self.stored_sync_states.remove(name))
            .and_then(|bytes| sync::State::decode(&bytes).ok());
        if let Some(restored) = stored {
            // A state that claims heads we do not hold (we lost unsynced
            // writes in a crash) would mislead the exchange; start fresh
            // instead.
            if restored
                .shared_heads
                .iter()
                .all(|h| self.replica.has_change(h))
            {
                persisted_heads = restored.shared_heads.clone();
                state = restored;
            }
        }
        self.peers.insert(
            peer.clone(),
            Box::new(DocPeer {
                sync: PeerSync::new(state),
                ask: PeerAsk::default(),
                persist_key,
                persisted_heads,
                resync_at: None,
                resynced_at_heads: None,
                reply_due: false,
                held: None,
                due_after_held: false,
            }),
        );
        true
    }

    /// The write that stores `peer`'s sync state, if it has a place to be
    /// stored and moved on since it was last written.
    pub(super) fn sync_state_write(&mut self, peer: &PeerId) -> Option<StorageOp> {
        let dp = self.peers.get_mut(peer)?;
        let key = dp.persist_key.clone()?;
        if dp.sync.state.shared_heads == dp.persisted_heads {
            return None;
        }
        dp.persisted_heads = dp.sync.state.shared_heads.clone();
        Some(StorageOp::Put(key, dp.sync.state.encode()))
    }

    /// Whether a connected peer has told us heads for this document: it
    /// has the document and our exchange with it will bring it here.
    pub(super) fn someone_has_it(&self, connected: impl Fn(&PeerId) -> bool) -> bool {
        self.peers.iter().any(|(p, dp)| {
            connected(p)
                && !dp.ask.lacks()
                && dp
                    .sync
                    .state
                    .their_heads
                    .as_ref()
                    .is_some_and(|h| !h.is_empty())
        })
    }

    /// Receives a sync message from `peer` (which must have sync state).
    pub(super) fn receive(
        &mut self,
        peer: &PeerId,
        message: sync::Message,
        is_request: bool,
    ) -> Received {
        let Some(dp) = self.peers.get_mut(peer) else {
            return Received::Applied { changed: false };
        };
        if is_request {
            dp.ask.on_request();
        } else if !message.heads.is_empty() {
            dp.ask.on_offer();
        }
        // Only changes move the heads (most messages are acknowledgements;
        // copying the heads costs as much as the rest of receiving one).
        let before = (!message.changes.is_empty()).then(|| self.replica.heads());
        // A message without changes naming our heads makes the sync state
        // record those heads as told to the peer, so nothing more is sent.
        // That holds when every earlier message has been answered; in a
        // batch, the answer to an earlier message (say, the one that
        // brought those heads) may still be due, and the peer would never
        // learn we hold its changes. Keep what we really sent until then.
        let sent_heads = (dp.reply_due && message.changes.is_empty() && !message.heads.is_empty())
            .then(|| dp.sync.state.last_sent_heads.clone());
        let replica = &mut self.replica;
        let state = &mut dp.sync;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            replica.receive_sync_message(state, message)
        }));
        if let Some(heads) = sent_heads {
            state.state.last_sent_heads = heads;
        }
        match outcome {
            Err(_) => Received::Panicked,
            Ok(Err(e)) => Received::Rejected(e),
            Ok(Ok(())) => Received::Applied {
                changed: before.is_some_and(|before| self.replica.heads() != before),
            },
        }
    }

    /// Generates the next sync message for `peer` on connection `conn`.
    /// `resync_at` is when to restart the exchange should it stall (see
    /// [`Generated::Message`]).
    pub(super) fn generate(
        &mut self,
        peer: &PeerId,
        conn: ConnectionId,
        resync_at: Timestamp,
    ) -> Generated {
        let requesting = self.status == DocStatus::Requesting;
        let empty = self.replica.is_empty();
        let Some(dp) = self.peers.get_mut(peer) else {
            return Generated::Nothing;
        };
        if dp.held == Some(conn) {
            // Still due (receiving relies on knowing that): generated once
            // the held message leaves.
            dp.due_after_held = true;
            return Generated::Nothing;
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
            if !dp.ask.ask(requesting) {
                return Generated::Nothing;
            }
            as_request = true;
        }
        let replica = &self.replica;
        let state = &mut dp.sync;
        let message = match catch_unwind(AssertUnwindSafe(|| replica.generate_sync_message(state)))
        {
            Err(_) => return Generated::Panicked,
            Ok(None) => return Generated::Nothing,
            Ok(Some(m)) => m,
        };
        let resync = dp.resync_at.is_none();
        if resync {
            dp.resync_at = Some(resync_at);
        }
        Generated::Message {
            message,
            as_request,
            resync,
        }
    }

    /// Queues `send` for `peer` until the writes holding what the document
    /// has now are confirmed; returns it if nothing needs to wait. While it
    /// waits, no other message for `peer` on that connection is generated.
    pub(super) fn hold_until_durable(&mut self, peer: &PeerId, send: Send) -> Option<Waiter> {
        let conn = send.conn;
        let heads = self.replica.heads();
        let released = self.durable.wait(Waiter::Send(peer.clone(), send), &heads);
        if released.is_none() {
            if let Some(dp) = self.peers.get_mut(peer) {
                dp.held = Some(conn);
            }
        }
        released
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

/// What [`Doc::receive`] made of a sync message.
pub(super) enum Received {
    /// Applied; `changed` says whether our heads moved.
    Applied { changed: bool },
    /// Automerge refused it (changes that do not apply).
    Rejected(ReplicaError),
    /// Automerge panicked on it.
    Panicked,
}

/// What [`Doc::generate`] came up with.
pub(super) enum Generated {
    /// Nothing to send now.
    Nothing,
    /// Automerge panicked generating the message.
    Panicked,
    /// A message to send, as a `request` (we lack the document) or a
    /// `sync`. `resync`: no restart was scheduled for this peer; one is
    /// now, at the time given to [`Doc::generate`].
    Message {
        message: sync::Message,
        as_request: bool,
        resync: bool,
    },
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
