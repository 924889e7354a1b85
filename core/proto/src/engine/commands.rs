//! Local commands (create, find, broadcast) and ephemeral messages.

use super::*;

/// Most (sender, session) pairs remembered for ephemeral de-duplication.
const MAX_EPHEMERAL_SESSIONS: usize = 65_536;

impl Engine {
    pub(super) fn on_command(&mut self, cmd: CommandId, command: Command) {
        match command {
            Command::Create { initial, owner } => self.create(cmd, initial, owner),
            Command::Find { document_id } => self.find(cmd, document_id),
            Command::Broadcast { document_id, data } => {
                let sent = self.broadcast(&document_id, data);
                self.out
                    .completed
                    .push((cmd, CommandResult::Broadcast(sent)));
            }
            Command::WhenSaved { document_id } => self.when_saved(cmd, document_id),
            Command::ApplyChunk { document_id, chunk } => {
                let changed = self.apply_chunk(&document_id, chunk);
                self.out
                    .completed
                    .push((cmd, CommandResult::ChunkApplied(changed)));
            }
            Command::Revoke { subject, token_id } => {
                let closed = self.revoke(subject.as_deref(), token_id.as_deref());
                self.out
                    .completed
                    .push((cmd, CommandResult::Revoked(closed)));
            }
            Command::SetAccess {
                document_id,
                subject,
                access,
            } => {
                let acl = self.set_access(&document_id, subject, access);
                self.out
                    .completed
                    .push((cmd, CommandResult::AccessSet(acl)));
            }
        }
    }

    /// Changes a ready document's access list and writes it; peers that
    /// can no longer read it are dropped from it (and told it is
    /// unavailable).
    fn set_access(&mut self, id: &DocumentId, subject: String, access: Access) -> Option<Acl> {
        let doc = self
            .docs
            .get_mut(id)
            .filter(|d| d.status == DocStatus::Ready)?;
        if access == Access::None {
            doc.acl.users.remove(&subject);
        } else {
            doc.acl.users.insert(subject, access);
        }
        let acl = doc.acl.clone();
        let peers: Vec<PeerId> = doc.peers.keys().cloned().collect();
        self.storage(
            StorageOp::Put(StorageKey::doc_acl(id), acl.encode()),
            Task::Other,
        );
        for peer in peers {
            if self.access(&peer, id) == Access::None {
                if let Some(doc) = self.docs.get_mut(id) {
                    doc.remove_peer(&peer);
                }
                self.unindex(id, &peer);
                self.tell_unavailable(&peer, id);
            }
        }
        Some(acl)
    }

    pub(super) fn create(
        &mut self,
        cmd: CommandId,
        initial: Option<Vec<u8>>,
        owner: Option<String>,
    ) {
        let id = DocumentId::from_random(self.rng.bytes::<16>());
        let mut replica = self.new_replica();
        match &initial {
            Some(bytes) => {
                if let Err(e) = replica.load_chunk(bytes) {
                    let failed = CommandResult::Create(Err(CreateError::Initial(Box::new(e))));
                    self.out.completed.push((cmd, failed));
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
                            let failed =
                                CommandResult::Create(Err(CreateError::InitialChange(Box::new(e))));
                            self.out.completed.push((cmd, failed));
                            return;
                        }
                    }
                    None => {
                        let failed = CommandResult::Create(Err(CreateError::NotEditable));
                        self.out.completed.push((cmd, failed));
                        return;
                    }
                }
            }
        }
        let mut doc = Doc::new(DocStatus::Ready, replica);
        doc.fresh = true;
        if owner.is_some() {
            doc.acl.owner = owner;
            doc.acl_dirty = true;
        }
        doc.request.want();
        self.docs.insert(id.clone(), doc);
        self.doc_changed(&id, Origin::Local);
        self.out
            .completed
            .push((cmd, CommandResult::Create(Ok(id))));
    }

    pub(super) fn find(&mut self, cmd: CommandId, id: DocumentId) {
        if !self.docs.contains_key(&id) {
            let replica = self.new_replica();
            let mut doc = Doc::new(DocStatus::Loading, replica);
            doc.request.want();
            doc.request.wait(cmd);
            self.docs.insert(id.clone(), doc);
            self.start_load(&id);
            return;
        }
        self.touch(&id);
        let Some(doc) = self.docs.get_mut(&id) else {
            return;
        };
        doc.request.want();
        match doc.status {
            DocStatus::Ready => self.out.completed.push((cmd, CommandResult::Find(Ok(id)))),
            DocStatus::Loading | DocStatus::Requesting => doc.request.wait(cmd),
            DocStatus::Unavailable => {
                // Ask again: peers may have it by now.
                doc.request.wait(cmd);
                self.begin_request(&id);
            }
        }
    }

    pub(super) fn broadcast(&mut self, id: &DocumentId, data: Vec<u8>) -> usize {
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
    pub(super) fn doc_audience(&self, id: &DocumentId, exclude: Option<&PeerId>) -> Vec<PeerId> {
        let mut out: BTreeSet<PeerId> = self
            .docs
            .get(id)
            .map(|d| d.peers.keys().cloned().collect())
            .unwrap_or_default();
        if !self.cfg.policy.announces_nothing() {
            for peer in self.peers.keys() {
                if self.cfg.policy.announce(peer, id) && self.access(peer, id) >= Access::Read {
                    out.insert(peer.clone());
                }
            }
        }
        out.into_iter()
            .filter(|p| Some(p) != exclude && self.peers.contains_key(p))
            .collect()
    }

    /// See [`Command::ApplyChunk`]; whether the document changed.
    pub(super) fn apply_chunk(&mut self, id: &DocumentId, chunk: Vec<u8>) -> bool {
        let Some(doc) = self.docs.get_mut(id) else {
            return false;
        };
        if doc.status == DocStatus::Loading {
            doc.pending_chunks.push(chunk);
            return false;
        }
        let before = doc.replica.heads();
        let replica = &mut doc.replica;
        match catch_unwind(AssertUnwindSafe(|| replica.load_chunk(&chunk))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(document = %id, error = %e, "a chunk from outside does not load; skipped");
                return false;
            }
            Err(_) => {
                tracing::error!(document = %id, "a chunk from outside crashed automerge; skipped");
                return false;
            }
        }
        if doc.replica.heads() == before {
            return false;
        }
        self.doc_changed(id, Origin::Log);
        true
    }

    pub(super) fn on_ephemeral(&mut self, from: &PeerId, m: EphemeralMessage) {
        let allowed = match self.access(from, &m.document_id) {
            Access::Write => true,
            Access::Read => self.cfg.read_only_ephemeral,
            Access::None => false,
        };
        if !allowed || m.sender_id == self.cfg.peer_id {
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
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;

    use crate::engine::{
        Command, CommandId, CommandResult, Engine, EngineConfig, Event, Input, Origin, Output,
        Timestamp,
    };
    use crate::storage::{StorageOp, StorageResult};
    use crate::wire::{DocumentId, PeerId};

    /// A chunk of one change setting `key`, as another node would publish.
    fn chunk(key: &str) -> Vec<u8> {
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, key, "v").expect("put");
        doc.save()
    }

    fn apply(engine: &mut Engine, id: &DocumentId, bytes: Vec<u8>) -> (bool, Output) {
        let command = Command::ApplyChunk {
            document_id: id.clone(),
            chunk: bytes,
        };
        let out = engine.handle(Timestamp(2), Input::Command(CommandId(9), command));
        let applied = out
            .completed
            .iter()
            .any(|(_, r)| matches!(r, CommandResult::ChunkApplied(true)));
        (applied, out)
    }

    fn changed_from_log(out: &Output) -> bool {
        out.events.iter().any(|e| {
            matches!(
                e,
                Event::DocChanged {
                    origin: Origin::Log,
                    ..
                }
            )
        })
    }

    /// A chunk from a cluster's log changes a document in memory (once:
    /// the same chunk again changes nothing), is saved, and leaves
    /// documents not in memory alone.
    #[test]
    fn a_chunk_applies_to_a_document_in_memory_once() {
        let mut engine = Engine::new(EngineConfig::new(PeerId::new("n").expect("valid"), None, 1));
        let id = crate::engine::created(&mut engine, Timestamp(1));
        let bytes = chunk("from-the-log");
        let (applied, out) = apply(&mut engine, &id, bytes.clone());
        assert!(applied && changed_from_log(&out), "{out:?}");
        assert!(
            out.storage
                .iter()
                .any(|t| matches!(t.op, StorageOp::Batch(_) | StorageOp::Put(..))),
            "the change is saved: {out:?}"
        );
        let (again, out) = apply(&mut engine, &id, bytes);
        assert!(!again && !changed_from_log(&out), "applied twice: {out:?}");
        let elsewhere = DocumentId::from_random([3; 16]);
        let (applied, out) = apply(&mut engine, &elsewhere, chunk("x"));
        assert!(!applied && out.storage.is_empty(), "{out:?}");
    }

    /// A chunk arriving while the document loads is held and applied once
    /// the load is done: a document the store did not have becomes
    /// available from the chunk alone.
    #[test]
    fn a_chunk_for_a_loading_document_waits_for_the_load() {
        let mut engine = Engine::new(EngineConfig::new(PeerId::new("n").expect("valid"), None, 1));
        let id = DocumentId::from_random([4; 16]);
        let out = engine.handle(
            Timestamp(1),
            Input::Command(
                CommandId(1),
                Command::Find {
                    document_id: id.clone(),
                },
            ),
        );
        let load = out
            .storage
            .iter()
            .find(|t| matches!(t.op, StorageOp::LoadRange(_)))
            .expect("the document is loaded from storage")
            .id;
        let (applied, out) = apply(&mut engine, &id, chunk("early"));
        assert!(
            !applied && !changed_from_log(&out),
            "applied before the load: {out:?}"
        );
        let out = engine.handle(
            Timestamp(3),
            Input::Storage {
                task: load,
                result: StorageResult::Range(Vec::new()),
            },
        );
        assert!(changed_from_log(&out), "{out:?}");
        assert!(
            out.completed
                .iter()
                .any(|(c, r)| *c == CommandId(1) && matches!(r, CommandResult::Find(Ok(_)))),
            "the find is answered with the chunk's content: {out:?}"
        );
    }
}
