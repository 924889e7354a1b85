//! Timers and eviction: what fires when the engine's clock passes a
//! deadline, and dropping cold documents when the hot set is full.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    Handshake(ConnectionId),
    /// The connection's grant ends.
    GrantExpiry(ConnectionId),
    Request(DocumentId),
    Resync(DocumentId, PeerId),
    RetrySave(DocumentId),
}

impl Engine {
    pub(super) fn fire_timers(&mut self) {
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
                        self.close(conn, CloseReason::HandshakeTimeout);
                    }
                }
                Timer::GrantExpiry(conn) => {
                    let expired = self
                        .connections
                        .get(&conn)
                        .is_some_and(|c| c.grant.expires_ms.is_some_and(|ms| Timestamp(ms) <= at));
                    if expired {
                        self.close(conn, CloseReason::TokenExpired);
                    }
                }
                Timer::Request(id) => self.request_deadline(&id, at),
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

    /// Drops the least recently used cold documents until the hot set
    /// fits (see [`EngineConfig::max_docs_in_memory`]), with a tenth of it
    /// to spare: finding the coldest means looking at every document, so
    /// it should not happen again with the very next document loaded.
    pub(super) fn evict_cold(&mut self) {
        let mut cold: Vec<(Timestamp, DocumentId)> = self
            .docs
            .iter()
            .filter(|(_, d)| {
                matches!(d.status, DocStatus::Ready | DocStatus::Unavailable)
                    && d.request.is_idle()
                    && d.peers.is_empty()
                    && d.pending.is_empty()
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
    pub(super) fn touch(&mut self, id: &DocumentId) {
        let now = self.now;
        if let Some(doc) = self.docs.get_mut(id) {
            doc.last_used = now;
        }
    }
}
