//! Timers and eviction: what fires when the engine's clock passes a
//! deadline, and dropping cold documents when the hot set is full.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    Handshake(ConnectionId),
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
    pub(super) fn touch(&mut self, id: &DocumentId) {
        let now = self.now;
        if let Some(doc) = self.docs.get_mut(id) {
            doc.last_used = now;
        }
    }
}
