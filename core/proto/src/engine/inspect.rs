//! What the driver may read of the engine's documents between inputs.

use super::*;

impl Engine {
    /// Documents in memory, with their status.
    pub fn documents(&self) -> impl Iterator<Item = (&DocumentId, DocStatus)> {
        self.docs.iter().map(|(id, d)| (id, d.status))
    }

    /// What the store keeps about a document in memory (possibly a write
    /// ahead of the disk); `None` if it is not in memory or has no change
    /// here yet.
    pub fn meta(&self, id: &DocumentId) -> Option<&DocMeta> {
        self.docs.get(id).and_then(|d| d.meta.as_ref())
    }

    /// A loaded document's access list (`None` if it is not in memory or
    /// still loading).
    pub fn acl(&self, id: &DocumentId) -> Option<&Acl> {
        self.docs
            .get(id)
            .filter(|d| d.status != DocStatus::Loading)
            .map(|d| &d.acl)
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
}
