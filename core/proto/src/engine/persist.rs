//! The engine's side of storage: reading documents in, writing their
//! changes out, and answering whoever waits for a write (the decisions are
//! the [durability machine](super::durability)'s).

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::durability::{Save, Waiter};
use super::*;

impl Engine {
    pub(super) fn when_saved(&mut self, cmd: CommandId, id: DocumentId) {
        let released = match self.docs.get_mut(&id) {
            Some(doc) => {
                let heads = doc.replica.heads();
                doc.durable.wait(Waiter::Command(cmd), &heads)
            }
            None => Some(Waiter::Command(cmd)),
        };
        self.deliver(&id, released);
    }

    /// Answers `WhenSaved` commands and sends held messages whose writes
    /// are confirmed. A held message whose connection is gone is dropped:
    /// the peer's sync state went with it.
    pub(super) fn deliver(&mut self, id: &DocumentId, waiters: impl IntoIterator<Item = Waiter>) {
        for waiter in waiters {
            match waiter {
                Waiter::Command(cmd) => self
                    .out
                    .completed
                    .push((cmd, CommandResult::Saved(id.clone()))),
                Waiter::Send(peer, send) => {
                    let conn = send.conn;
                    if self.peers.get(&peer) == Some(&conn) {
                        self.out.sends.push(send);
                    }
                    let dp = self.docs.get_mut(id).and_then(|d| d.peers.get_mut(&peer));
                    if let Some(dp) = dp.filter(|dp| dp.held == Some(conn)) {
                        dp.held = None;
                        if std::mem::take(&mut dp.due_after_held) {
                            self.defer_sync(id, &peer);
                        }
                    }
                }
            }
        }
    }

    pub(super) fn storage(&mut self, op: StorageOp, purpose: Task) {
        self.next_task += 1;
        let id = TaskId(self.next_task);
        self.tasks.insert(id, purpose);
        self.out.storage.push(StorageTask { id, op });
    }

    pub(super) fn start_load(&mut self, id: &DocumentId) {
        self.storage(
            StorageOp::LoadRange(StorageKey::doc_prefix(id)),
            Task::LoadDoc(id.clone()),
        );
    }

    pub(super) fn on_storage(&mut self, task: TaskId, result: StorageResult) {
        let Some(purpose) = self.tasks.remove(&task) else {
            return;
        };
        if let StorageResult::Failed(reason) = &result {
            self.out.events.push(Event::StorageFailed {
                task,
                reason: reason.clone(),
            });
        }
        match (purpose, result) {
            (Task::LoadDoc(id), StorageResult::Range(entries)) => self.loaded(&id, entries),
            (Task::LoadDoc(id), StorageResult::Failed(reason)) => self.load_failed(&id, reason),
            (Task::LoadDoc(id), _) => self.loaded(&id, Vec::new()),
            (Task::Compact { doc, replaced }, result) => {
                if let Some(d) = self.docs.get_mut(&doc) {
                    let snapshot = match result {
                        StorageResult::Compacted { key, bytes } => Some((key, bytes)),
                        _ => None,
                    };
                    d.durable.compaction_done(snapshot, replaced);
                }
            }
            (Task::SaveDoc { doc, seq, key, len }, result) => {
                let Some(d) = self.docs.get_mut(&doc) else {
                    return;
                };
                let failed = match &result {
                    StorageResult::Failed(reason) => Some(reason),
                    _ => None,
                };
                if failed.is_some() {
                    // The retry writes the metadata again too (and the
                    // creation time, if this store is where it began).
                    d.meta_dirty = d.meta.is_some();
                    d.fresh = d.meta.as_ref().is_some_and(|m| m.created_ms.is_some());
                    d.acl_dirty = !d.acl.is_empty();
                }
                let done = d
                    .durable
                    .write_done(seq, &key, len, failed.is_none(), &*d.replica);
                if let Some(reason) = failed {
                    tracing::warn!(document = %doc, %reason, retry_in = ?done.retry_in, "writing a document failed");
                }
                if let Some(wait) = done.retry_in {
                    let at = self.now.plus(wait);
                    self.timers.insert((at, Timer::RetrySave(doc.clone())));
                }
                if let Some(heads) = done.saved {
                    self.out.events.push(Event::Saved {
                        document_id: doc.clone(),
                        heads,
                    });
                }
                self.deliver(&doc, done.released);
            }
            _ => {}
        }
    }

    /// Storage could not be read: that is not "the document does not
    /// exist", so nobody is told it is unavailable. Waiting finds fail with
    /// the reason and the document is forgotten, to be read again next time.
    pub(super) fn load_failed(&mut self, id: &DocumentId, reason: Arc<StorageError>) {
        let Some(mut doc) = self.docs.remove(id) else {
            return;
        };
        tracing::error!(document = %id, %reason, "cannot read document from storage");
        // Nothing of a document being loaded waits to be written.
        for waiter in doc.durable.into_waiters() {
            if let Waiter::Command(cmd) = waiter {
                self.out
                    .completed
                    .push((cmd, CommandResult::Saved(id.clone())));
            }
        }
        for cmd in doc.request.finish() {
            let failed = FindError::Storage {
                document: id.clone(),
                source: reason.clone(),
            };
            self.out
                .completed
                .push((cmd, CommandResult::Find(Err(failed))));
        }
        for peer in doc.peers.keys() {
            if let Some(set) = self.peer_docs.get_mut(peer) {
                set.remove(id);
            }
        }
    }

    pub(super) fn loaded(&mut self, id: &DocumentId, entries: Vec<(StorageKey, Vec<u8>)>) {
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        if doc.status != DocStatus::Loading {
            return;
        }
        let mut snapshots = Vec::new();
        let mut incrementals = Vec::new();
        for (key, bytes) in entries {
            match key.classify() {
                Some(DocKey::Chunk(ChunkKind::Snapshot, _)) => snapshots.push((key, bytes)),
                Some(DocKey::Chunk(ChunkKind::Incremental, _)) => incrementals.push((key, bytes)),
                Some(DocKey::SyncState(storage)) => {
                    let storage = storage.to_owned();
                    doc.stored_sync_states.insert(storage, bytes);
                }
                Some(DocKey::Acl) => doc.acl = Acl::decode(&bytes),
                None => {}
            }
        }
        let mut corrupt = Vec::new();
        for (key, bytes) in snapshots.iter().chain(incrementals.iter()) {
            let replica = &mut doc.replica;
            let outcome = catch_unwind(AssertUnwindSafe(|| replica.load_chunk(bytes)));
            let reason = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "loading it crashed automerge".to_owned(),
            };
            corrupt.push((key.clone(), reason));
        }
        let sizes = |chunks: Vec<(StorageKey, Vec<u8>)>| {
            chunks
                .into_iter()
                .map(|(k, b)| (k, b.len()))
                .collect::<Vec<_>>()
        };
        let heads = doc.replica.heads();
        doc.durable
            .loaded(sizes(snapshots), sizes(incrementals), heads);
        for (key, reason) in corrupt {
            tracing::error!(document = %id, %key, %reason, "skipping corrupt chunk");
            // Keep the damaged chunk out of compaction so it is never
            // deleted: someone may want to recover it by hand.
            doc.durable.keep_chunk(&key);
            self.out.events.push(Event::CorruptChunk {
                document_id: id.clone(),
                key,
                reason,
            });
        }
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let pending = std::mem::take(&mut doc.pending);
        if doc.replica.is_empty() {
            doc.status = DocStatus::Unavailable;
            doc.fresh = true;
            if doc.request.has_waiters() {
                self.begin_request(id);
            }
        } else {
            doc.status = DocStatus::Ready;
            for cmd in doc.request.finish() {
                self.out
                    .completed
                    .push((cmd, CommandResult::Find(Ok(id.clone()))));
            }
            let heads = doc.replica.heads();
            doc.announced_heads = heads.clone();
            self.out.events.push(Event::DocChanged {
                document_id: id.clone(),
                previous: Vec::new(),
                heads,
                origin: Origin::Storage,
            });
            for peer in self.doc_audience(id, None) {
                self.sync_peer(id, &peer);
            }
        }
        for p in pending {
            self.apply_sync_message(id, &p.peer, p.message, p.is_request);
        }
        let chunks = self
            .docs
            .get_mut(id)
            .map(|doc| std::mem::take(&mut doc.pending_chunks))
            .unwrap_or_default();
        for chunk in chunks {
            self.apply_chunk(id, chunk);
        }
    }

    /// Writes whatever changed since the last save (see
    /// [`Durability::save`]).
    pub(super) fn save_doc(&mut self, id: &DocumentId) {
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let plan = match doc
            .durable
            .save(id, &*doc.replica, self.cfg.compact_after_bytes)
        {
            Save::Nothing => return,
            Save::Released(waiters) => return self.deliver(id, waiters),
            Save::Write(plan) => plan,
        };
        let len = plan.chunk.len();
        // The metadata goes in the same atomic write as the changes it
        // describes.
        let meta = doc
            .meta
            .as_ref()
            .filter(|_| std::mem::take(&mut doc.meta_dirty))
            .map(|m| m.ops(id, std::mem::take(&mut doc.fresh)));
        // So does the access list naming the owner of a new document.
        let acl = std::mem::take(&mut doc.acl_dirty)
            .then(|| BatchOp::Put(StorageKey::doc_acl(id), doc.acl.encode()));
        let op = match (meta, acl) {
            (None, None) => StorageOp::Put(plan.key.clone(), plan.chunk),
            (meta, acl) => StorageOp::Batch(
                std::iter::once(BatchOp::Put(plan.key.clone(), plan.chunk))
                    .chain(meta.into_iter().flatten())
                    .chain(acl)
                    .collect(),
            ),
        };
        self.storage(
            op,
            Task::SaveDoc {
                doc: id.clone(),
                seq: plan.seq,
                key: plan.key,
                len,
            },
        );
        if let Some((replace, snapshot)) = plan.compact {
            self.storage(
                StorageOp::Compact {
                    doc: id.clone(),
                    replace: replace.clone(),
                    snapshot,
                },
                Task::Compact {
                    doc: id.clone(),
                    replaced: replace,
                },
            );
        }
    }
}
