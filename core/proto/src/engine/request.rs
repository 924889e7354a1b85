//! Finding documents we lack: asking peers, deciding when a document is
//! unavailable, and telling peers who asked.

use super::*;

impl Engine {
    /// Asks every peer we may ask for a document we lack; if there is
    /// nobody to ask, it is unavailable now.
    pub(super) fn begin_request(&mut self, id: &DocumentId) {
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
    pub(super) fn check_request_done(&mut self, id: &DocumentId) {
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
    pub(super) fn someone_has_it(&self, id: &DocumentId) -> bool {
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

    pub(super) fn mark_unavailable(&mut self, id: &DocumentId) {
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

    pub(super) fn on_doc_unavailable(&mut self, peer: &PeerId, id: &DocumentId) {
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
}
