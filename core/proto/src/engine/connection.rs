//! Connections and the handshake: who is on each connection, the `join` /
//! `peer` exchange, checking that every later message comes from the bound
//! peer, and closing connections with a [`CloseReason`].

use super::*;

#[derive(Debug)]
pub(super) struct Connection {
    pub(super) state: ConnState,
    pub(super) direction: Direction,
    pub(super) handshake_deadline: Timestamp,
    /// What the other end may do.
    pub(super) grant: Arc<Grant>,
    /// Messages with changes refused because the peer may only read.
    pub(super) refused_writes: u32,
    /// The documents it synced or asked for, sorted (see
    /// [`EngineConfig::max_docs_per_connection`]). A vector: a relay holds
    /// tens of thousands of connections with a document or two each.
    pub(super) docs: Vec<DocumentId>,
}

/// Refused messages with changes after which a read-only peer is closed.
const MAX_REFUSED_WRITES: u32 = 3;

#[derive(Debug)]
pub(super) enum ConnState {
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

impl Engine {
    pub(super) fn on_connected(
        &mut self,
        conn: ConnectionId,
        direction: Direction,
        grant: Arc<Grant>,
    ) {
        if self.connections.contains_key(&conn) {
            self.close(conn, CloseReason::ConnectionReused);
        }
        if let Some(ms) = grant.expires_ms {
            self.timers
                .insert((Timestamp(ms), Timer::GrantExpiry(conn)));
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
                grant,
                refused_writes: 0,
                docs: Vec::new(),
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

    pub(super) fn our_metadata(&self) -> PeerMetadata {
        PeerMetadata {
            storage_id: self.cfg.storage_id.clone(),
            is_ephemeral: Some(self.cfg.storage_id.is_none()),
        }
    }

    /// Closes a connection on our side and forgets it.
    pub(super) fn close(&mut self, conn: ConnectionId, reason: CloseReason) {
        if self.connections.contains_key(&conn) {
            tracing::debug!(%conn, %reason, "closing connection");
            self.out.closes.push(Close { conn, reason });
            self.forget_connection(conn);
        }
    }

    pub(super) fn forget_connection(&mut self, conn: ConnectionId) {
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
    pub(super) fn peer_gone(&mut self, peer: &PeerId) {
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

    pub(super) fn on_received(&mut self, conn: ConnectionId, bytes: &[u8]) {
        let Some(c) = self.connections.get(&conn) else {
            return;
        };
        if bytes.len() > self.cfg.max_message_bytes {
            let reason = CloseReason::MessageTooBig {
                size: bytes.len(),
                limit: self.cfg.max_message_bytes,
            };
            self.close(conn, reason);
            return;
        }
        let message = match wire::decode(bytes) {
            Ok(m) => m,
            Err(DecodeError::UnknownType(kind)) => {
                tracing::debug!(%conn, %kind, "ignoring message of unknown type");
                return;
            }
            Err(e) => {
                self.close(conn, CloseReason::Malformed(e));
                return;
            }
        };
        if let Message::Error { message, .. } = &message {
            let reason = CloseReason::PeerError(message.clone());
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
                    CloseReason::UnexpectedFirst {
                        expected: "join",
                        got: other.type_name(),
                    },
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
                        let version = Some(selected_protocol_version);
                        self.close(conn, CloseReason::UnsupportedVersion(version));
                    } else {
                        self.bind_peer(conn, sender_id, metadata.unwrap_or_default());
                    }
                }
                other => self.close(
                    conn,
                    CloseReason::UnexpectedFirst {
                        expected: "peer",
                        got: other.type_name(),
                    },
                ),
            },
            ConnState::Ready { peer_id, .. } => {
                let peer = peer_id.clone();
                self.on_peer_message(conn, peer, message);
            }
        }
    }

    pub(super) fn on_join(
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
            self.close(conn, CloseReason::UnsupportedVersion(None));
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

    pub(super) fn bind_peer(&mut self, conn: ConnectionId, peer: PeerId, metadata: PeerMetadata) {
        if peer == self.cfg.peer_id {
            self.close(conn, CloseReason::OwnPeerId);
            return;
        }
        if let Some(old) = self.peers.get(&peer).copied() {
            if old != conn {
                // Only the same user takes over its own peer id: someone
                // else claiming it cannot push the owner off.
                let subject =
                    |c: ConnectionId| self.connections.get(&c).map(|c| c.grant.subject.clone());
                if subject(old) != subject(conn) {
                    self.close(conn, CloseReason::PeerIdTaken);
                    return;
                }
                self.close(old, CloseReason::Replaced);
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
                        DocStatus::Requesting | DocStatus::Unavailable => d.request.wanted(),
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

    pub(super) fn on_peer_message(&mut self, conn: ConnectionId, peer: PeerId, message: Message) {
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

    /// The grant of `peer`'s connection (`None` if it is not connected).
    pub(super) fn grant_of(&self, peer: &PeerId) -> Option<&Grant> {
        let conn = self.peers.get(peer)?;
        Some(&self.connections.get(conn)?.grant)
    }

    /// What `peer` may do with `id`: its grant and the document's list
    /// together (the list counts once the document is loaded), narrowed by
    /// the share policy.
    pub(super) fn access(&self, peer: &PeerId, id: &DocumentId) -> Access {
        if !self.cfg.policy.access(peer, id) {
            return Access::None;
        }
        let Some(grant) = self.grant_of(peer) else {
            return Access::None;
        };
        let acl = self
            .docs
            .get(id)
            .filter(|d| d.status != DocStatus::Loading)
            .map(|d| &d.acl);
        grant.access(acl, id)
    }

    /// A message with changes from a peer that may only read `id`: nothing
    /// of it is applied; the peer is told, and closed if it keeps trying.
    pub(super) fn refuse_write(&mut self, peer: &PeerId, id: &DocumentId) {
        let Some(conn) = self.peers.get(peer).copied() else {
            return;
        };
        let refused = match self.connections.get_mut(&conn) {
            Some(c) => {
                c.refused_writes += 1;
                c.refused_writes
            }
            None => return,
        };
        tracing::info!(%peer, document = %id, refused, "refused changes from a read-only peer");
        if refused >= MAX_REFUSED_WRITES {
            self.close(conn, CloseReason::ReadOnly(id.clone()));
            return;
        }
        self.send(
            conn,
            Message::Error {
                sender_id: Some(self.cfg.peer_id.clone()),
                target_id: Some(peer.clone()),
                message: format!("read-only: your changes to {id} were not applied"),
            },
        );
    }

    /// Closes every connection whose grant names `subject` or `token_id`;
    /// returns how many.
    pub(super) fn revoke(&mut self, subject: Option<&str>, token_id: Option<&str>) -> usize {
        let hit: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, c)| {
                let g = &c.grant;
                (subject.is_some() && g.subject.as_deref() == subject)
                    || (token_id.is_some() && g.token_id.as_deref() == token_id)
            })
            .map(|(conn, _)| *conn)
            .collect();
        for conn in &hit {
            self.close(*conn, CloseReason::Revoked);
        }
        hit.len()
    }

    pub(super) fn close_peer(&mut self, peer: &PeerId, reason: CloseReason) {
        if let Some(conn) = self.peers.get(peer).copied() {
            self.close(conn, reason);
        }
    }

    pub(super) fn send(&mut self, conn: ConnectionId, message: Message) {
        self.out.sends.push(Send { conn, message });
    }

    pub(super) fn send_to_peer(&mut self, peer: &PeerId, message: Message) {
        if let Some(conn) = self.peers.get(peer).copied() {
            self.send(conn, message);
        }
    }
}
