//! The sync protocol per (document, peer): receiving sync messages,
//! generating them (held back until their changes are durable), restarting
//! stalled exchanges, persisting sync states and containing Automerge
//! panics.

use super::*;

/// Most messages buffered for a document while it loads from storage.
const MAX_PENDING_PER_DOC: usize = 4096;

/// Logs the shape of a sync message going `way` ("received", "sending").
fn trace_sync(way: &str, id: &DocumentId, peer: &PeerId, message: &sync::Message, request: bool) {
    tracing::debug!(
        document = %id,
        %peer,
        heads = message.heads.len(),
        need = message.need.len(),
        changes = message.changes.len(),
        request,
        "{way} sync message"
    );
}

impl Engine {
    pub(super) fn new_replica(&mut self) -> Box<dyn Replica> {
        (self.cfg.replica)(
            ActorId::from(self.rng.bytes::<16>().to_vec()),
            self.hash_seed,
        )
    }

    pub(super) fn on_doc_message(
        &mut self,
        conn: ConnectionId,
        peer: PeerId,
        m: DocMessage,
        is_request: bool,
    ) {
        // The id as the engine already holds it, when it does: each peer's
        // messages parse their own copy, and a relay should keep one per
        // document rather than one per (document, connection).
        let id = match self.docs.get_key_value(&m.document_id) {
            Some((held, _)) => held.clone(),
            None => m.document_id,
        };
        if !self.may_reach(&peer, &id) {
            self.tell_unavailable(&peer, &id);
            return;
        }
        let limit = self.cfg.max_docs_per_connection;
        if let Some(c) = self.connections.get_mut(&conn) {
            if let Err(at) = c.docs.binary_search(&id) {
                if c.docs.len() >= limit {
                    tracing::info!(%conn, limit, "connection asked for too many documents");
                    self.close(conn, CloseReason::TooManyDocuments(limit));
                    return;
                }
                // Most connections sync one document or a few: room for
                // exactly one at first, doubling after.
                if c.docs.capacity() == 0 {
                    c.docs.reserve_exact(1);
                }
                c.docs.insert(at, id.clone());
            }
        }
        let message = match validate::decode_sync_message(&m.data, &self.cfg.limits) {
            Ok(msg) => msg,
            Err(e) => {
                let reason = CloseReason::InvalidSync {
                    document: id,
                    source: e,
                };
                self.close(conn, reason);
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
                self.close(conn, CloseReason::TooManyPending(id));
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

    pub(super) fn apply_sync_message(
        &mut self,
        id: &DocumentId,
        peer: &PeerId,
        message: sync::Message,
        is_request: bool,
    ) {
        if !self.peers.contains_key(peer) {
            return; // the peer left while the document loaded
        }
        // With the document loaded its access list counts: the decision
        // made here is the one that holds.
        let Some(message) = self.admit(id, peer, message) else {
            return;
        };
        self.activate(id, peer);
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        trace_sync("received", id, peer, &message, is_request);
        let changed = match doc.receive(peer, message, is_request) {
            Received::Panicked => return self.contain_panic(id, peer, true),
            Received::Rejected(e) => {
                doc.remove_peer(peer);
                self.unindex(id, peer);
                let reason = CloseReason::Rejected {
                    document: id.clone(),
                    source: e,
                };
                return self.close_peer(peer, reason);
            }
            Received::Applied { changed } => changed,
        };
        let lacking = is_request && doc.replica.is_empty() && doc.status != DocStatus::Requesting;
        if let Some(op) = doc.sync_state_write(peer) {
            self.storage(op, Task::Other);
        }
        if changed {
            self.doc_changed(id, Origin::Remote(peer.clone()));
        } else {
            self.defer_sync(id, peer);
        }
        if lacking {
            self.begin_request(id);
        }
    }

    /// Whether `peer` could have any business with `id` before it is
    /// loaded: read by its grant, or possibly by the document's access
    /// list (it has a subject) or by creating it (it may create). The
    /// answer that counts is [`Engine::admit`]'s once the document is
    /// loaded; this one spares loading documents for peers that can have
    /// nothing to do with them.
    fn may_reach(&self, peer: &PeerId, id: &DocumentId) -> bool {
        if !self.cfg.policy.access(peer, id) {
            return false;
        }
        let Some(grant) = self.grant_of(peer) else {
            return false;
        };
        if grant.on(id) >= Access::Read {
            return true;
        }
        match self.docs.get(id) {
            Some(doc) if doc.status != DocStatus::Loading => {
                self.access(peer, id) >= Access::Read
                    || (doc.replica.is_empty() && grant.may_create(id))
            }
            _ => grant.subject.is_some() || grant.may_create(id),
        }
    }

    /// Answers `doc-unavailable`, as for a document nobody has.
    pub(super) fn tell_unavailable(&mut self, peer: &PeerId, id: &DocumentId) {
        let reply = Message::DocUnavailable {
            sender_id: self.cfg.peer_id.clone(),
            target_id: peer.clone(),
            document_id: id.clone(),
        };
        self.send_to_peer(peer, reply);
    }

    /// Applies the peer's rights to a sync message for a loaded document:
    /// `None` if nothing of it may be applied (the peer has been answered),
    /// else the message to apply — without its changes if the peer may
    /// only read. A peer that brings a document this store does not hold
    /// becomes its owner.
    fn admit(
        &mut self,
        id: &DocumentId,
        peer: &PeerId,
        mut message: sync::Message,
    ) -> Option<sync::Message> {
        let access = self.access(peer, id);
        let (empty, stored, grant) = match (self.docs.get(id), self.grant_of(peer)) {
            (Some(doc), Some(grant)) => (doc.replica.is_empty(), doc.durable.stored_bytes(), grant),
            _ => return None,
        };
        let incoming: usize = message.changes.iter().map(<[u8]>::len).sum();
        let limit = self.cfg.max_doc_bytes;
        if incoming > 0 && stored.saturating_add(incoming) > limit {
            tracing::info!(%peer, document = %id, stored, incoming, limit, "refused changes past the document size limit");
            let reason = CloseReason::DocumentTooBig {
                document: id.clone(),
                limit,
            };
            self.close_peer(peer, reason);
            return None;
        }
        // A document this store does not hold: a peer that may create it
        // syncs (its first message offers heads, the next brings changes),
        // and owns it once its changes arrive.
        if empty && grant.may_create(id) {
            let owner = grant
                .subject
                .clone()
                .filter(|_| !message.changes.is_empty());
            if let (Some(owner), Some(doc)) = (owner, self.docs.get_mut(id)) {
                if doc.acl.owner.is_none() {
                    doc.acl.owner = Some(owner);
                    doc.acl_dirty = true;
                }
            }
            return Some(message);
        }
        match access {
            Access::Write => Some(message),
            Access::None => {
                self.tell_unavailable(peer, id);
                None
            }
            Access::Read => {
                if !message.changes.is_empty() {
                    message.changes = sync::ChunkList::empty();
                    self.refuse_write(peer, id);
                    if !self.peers.contains_key(peer) {
                        return None;
                    }
                }
                Some(message)
            }
        }
    }

    /// Makes sure `peer` has sync state for `id`, restoring a persisted
    /// one when the peer has a usable storage id.
    pub(super) fn activate(&mut self, id: &DocumentId, peer: &PeerId) {
        let persist_key = self.persist_key_for(id, peer);
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        if doc.activate(peer, persist_key) {
            self.peer_docs
                .entry(peer.clone())
                .or_default()
                .insert(id.clone());
        }
    }

    pub(super) fn unindex(&mut self, id: &DocumentId, peer: &PeerId) {
        if let Some(set) = self.peer_docs.get_mut(peer) {
            set.remove(id);
        }
    }

    pub(super) fn persist_key_for(&self, id: &DocumentId, peer: &PeerId) -> Option<StorageKey> {
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

    pub(super) fn persist_sync_state(&mut self, id: &DocumentId, peer: &PeerId) {
        let write = self.docs.get_mut(id).and_then(|d| d.sync_state_write(peer));
        if let Some(op) = write {
            self.storage(op, Task::Other);
        }
    }

    /// Sends `peer` whatever the sync protocol says it needs next.
    pub(super) fn sync_peer(&mut self, id: &DocumentId, peer: &PeerId) {
        let Some(conn) = self.peers.get(peer).copied() else {
            return;
        };
        self.activate(id, peer);
        let resync_at = self.now.plus(self.cfg.resync_interval);
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let (message, as_request, resync) = match doc.generate(peer, conn, resync_at) {
            Generated::Nothing => return,
            Generated::Panicked => return self.contain_panic(id, peer, false),
            Generated::Message {
                message,
                as_request,
                resync,
            } => (message, as_request, resync),
        };
        if resync {
            self.timers
                .insert((resync_at, Timer::Resync(id.clone(), peer.clone())));
        }
        trace_sync("sending", id, peer, &message, as_request);
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
        // A message may carry changes storage has not confirmed yet: it
        // leaves once they are on disk, so that no peer ever holds a change
        // a crash here could lose.
        let released = doc.hold_until_durable(peer, Send { conn, message });
        self.deliver(id, released);
    }

    /// Restarts a stalled exchange: keep only what a reconnect would keep
    /// (the shared heads) and send a fresh message. Only exchanges that are
    /// waiting on an answer *and* are not known to be in sync qualify, so a
    /// quiet, converged pair costs nothing.
    pub(super) fn resync(&mut self, id: &DocumentId, peer: &PeerId, at: Timestamp) {
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

    /// Automerge panicked on something this peer sent. Close the peer's
    /// connection, drop its sync state, and — if the panic hit while the
    /// document was being modified — rebuild the document from a save so a
    /// half-applied change cannot linger.
    pub(super) fn contain_panic(&mut self, id: &DocumentId, peer: &PeerId, while_receiving: bool) {
        tracing::error!(document = %id, %peer, "automerge panicked; closing the peer's connection");
        self.out.events.push(Event::PanicContained {
            document_id: id.clone(),
            peer_id: peer.clone(),
        });
        if let Some(doc) = self.docs.get_mut(id) {
            doc.remove_peer(peer);
        }
        self.unindex(id, peer);
        self.close_peer(peer, CloseReason::Internal(id.clone()));
        if while_receiving {
            self.rebuild_replica(id);
        }
    }

    pub(super) fn rebuild_replica(&mut self, id: &DocumentId) {
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
                    let interest = doc.request.interest();
                    *doc = Doc::new(DocStatus::Loading, replica);
                    doc.request = interest;
                }
                self.start_load(id);
            }
        }
    }

    /// A document's heads moved: save, resolve waiters, tell peers.
    pub(super) fn doc_changed(&mut self, id: &DocumentId, origin: Origin) {
        self.touch(id);
        self.deferred_saves.insert(id.clone());
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        match &origin {
            Origin::Local => doc.touch_meta(self.now.0, None),
            Origin::Remote(peer) => doc.touch_meta(self.now.0, Some(peer.to_string())),
            Origin::Storage | Origin::Log => {}
        }
        if doc.status != DocStatus::Ready && !doc.replica.is_empty() {
            doc.status = DocStatus::Ready;
            for cmd in doc.request.finish() {
                self.out
                    .completed
                    .push((cmd, CommandResult::Find(Ok(id.clone()))));
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
}
