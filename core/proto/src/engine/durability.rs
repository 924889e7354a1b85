//! A document's durability machine: what of it is on disk, the writes in
//! flight, retries after a failed write, when to compact, and everything
//! that waits for a write — `WhenSaved` commands and outgoing sync messages.
//!
//! Holding outgoing messages is what keeps the relay's promise that a change
//! reaches another peer only once it is on disk: a sync message generated
//! while the document has changes not yet confirmed written leaves when the
//! write holding them (and every write before it) is confirmed. Writes are
//! numbered in the order they are issued; storage performs them in that
//! order and commits whatever queued up together as one group, so many
//! changes (and many held messages) share one write.
//!
//! The machine decides; the engine carries out its decisions (storage tasks,
//! timers, sends) and feeds back the results.

use std::collections::BTreeSet;
use std::time::Duration;

use automerge::ChangeHash;
use sha2::{Digest, Sha256};

use super::replica::Replica;
use super::types::{CommandId, Send};
use crate::storage::{ChunkKind, Snapshot, StorageKey};
use crate::wire::{DocumentId, PeerId};

/// The first wait before writing a document again after a failed write;
/// it doubles with every failure in a row, up to [`SAVE_RETRY_MAX`].
pub(super) const SAVE_RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between attempts to write a document.
pub(super) const SAVE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Something waiting for the document's current heads to be on disk.
#[derive(Debug, PartialEq)]
pub(super) enum Waiter {
    /// A `WhenSaved` command.
    Command(CommandId),
    /// A sync message that may carry changes not yet written, and the
    /// peer it is for.
    Send(PeerId, Send),
}

/// The writes asked of storage by one save.
#[derive(Debug)]
pub(super) struct SavePlan {
    /// The write's number.
    pub seq: u64,
    /// Where the new incremental chunk goes.
    pub key: StorageKey,
    /// The chunk: every change since the last save.
    pub chunk: Vec<u8>,
    /// When the incrementals outweigh the snapshot: the chunks to merge
    /// into one snapshot (this write's included) and the snapshot itself,
    /// if the replica can make one cheaply.
    pub compact: Option<(Vec<StorageKey>, Option<Snapshot>)>,
}

/// What a save came to.
#[derive(Debug)]
pub(super) enum Save {
    /// The heads were already written (or being written).
    Nothing,
    /// Nothing new to write after all; these waiters are answered.
    Released(Vec<Waiter>),
    /// Write this.
    Write(SavePlan),
}

/// What a finished write came to.
#[derive(Debug, Default)]
pub(super) struct WriteDone {
    /// Waiters whose write and every write before it are confirmed.
    pub released: Vec<Waiter>,
    /// Every change is on disk now, with these heads.
    pub saved: Option<Vec<ChangeHash>>,
    /// The write failed: schedule a retry after this long (`None` if one is
    /// already scheduled).
    pub retry_in: Option<Duration>,
}

/// The durability state of one document.
#[derive(Debug, Default)]
pub(super) struct Durability {
    /// Heads covered by chunks already written (or being written).
    saved_heads: Vec<ChangeHash>,
    snapshot_keys: Vec<StorageKey>,
    snapshot_bytes: usize,
    incremental_keys: Vec<StorageKey>,
    incremental_bytes: usize,
    /// How many bytes of incremental chunks the snapshot has absorbed so
    /// far. Snapshots compress history far below the size of its changes,
    /// so comparing new chunks with the snapshot alone would re-read a
    /// growing document every few hundred changes; comparing them with what
    /// was compacted doubles the interval each time (linear total work).
    compacted_bytes: usize,
    /// A compaction is under way (at most one at a time).
    compacting: bool,
    /// Writes issued so far; each is numbered with the count.
    issued: u64,
    /// The numbers of the writes not yet confirmed.
    unconfirmed: BTreeSet<u64>,
    /// Waiters, in arrival order, each with the write that must be
    /// confirmed, with every write before it; `None` until the next write
    /// is issued (the changes are not written yet, or a write failed and
    /// everything is to be written again). Targets never decrease along the
    /// list, so answering in order keeps held messages in order.
    waiters: Vec<(Waiter, Option<u64>)>,
    /// After failed writes: how long the next retry waits, and whether one
    /// is scheduled.
    retry: Option<(Duration, bool)>,
}

impl Durability {
    /// Every change is written: no write is waiting for its result, and the
    /// last one written holds `heads` (the replica's current heads).
    pub fn is_saved(&self, heads: &[ChangeHash]) -> bool {
        self.unconfirmed.is_empty() && self.saved_heads == heads
    }

    /// Nothing waits and nothing is being compacted: the document may be
    /// dropped from memory (if it is also saved).
    pub fn is_idle(&self) -> bool {
        self.waiters.is_empty() && !self.compacting
    }

    /// Queues `waiter` until `heads` (the replica's current heads) are on
    /// disk, or gives it back at once if they are.
    pub fn wait(&mut self, waiter: Waiter, heads: &[ChangeHash]) -> Option<Waiter> {
        if self.is_saved(heads) {
            return Some(waiter);
        }
        // The current heads are being written by the last write issued, or
        // else will be by the next one.
        let target = (self.saved_heads == heads).then_some(self.issued);
        self.waiters.push((waiter, target));
        None
    }

    /// Records what storage held when the document was read: its chunks
    /// (key and size) and the heads they make up.
    pub fn loaded(
        &mut self,
        snapshots: Vec<(StorageKey, usize)>,
        incrementals: Vec<(StorageKey, usize)>,
        heads: Vec<ChangeHash>,
    ) {
        self.snapshot_bytes = snapshots.iter().map(|(_, n)| n).sum();
        self.snapshot_keys = snapshots.into_iter().map(|(k, _)| k).collect();
        self.incremental_bytes = incrementals.iter().map(|(_, n)| n).sum();
        self.incremental_keys = incrementals.into_iter().map(|(k, _)| k).collect();
        self.saved_heads = heads;
    }

    /// Keeps a chunk out of compaction so it is never deleted (a corrupt
    /// chunk: someone may want to recover it by hand).
    pub fn keep_chunk(&mut self, key: &StorageKey) {
        self.snapshot_keys.retain(|k| k != key);
        self.incremental_keys.retain(|k| k != key);
    }

    /// Plans writing whatever `replica` holds beyond the saved heads: an
    /// incremental chunk, and — once the incrementals outweigh the snapshot
    /// and `compact_after` bytes — a compaction replacing every chunk with
    /// one snapshot. Every version stays reachable: a snapshot holds the
    /// full history.
    pub fn save(&mut self, id: &DocumentId, replica: &dyn Replica, compact_after: usize) -> Save {
        let heads = replica.heads();
        if heads == self.saved_heads {
            return Save::Nothing;
        }
        let chunk = replica.save_after(&self.saved_heads);
        self.saved_heads = heads;
        if chunk.is_empty() {
            return Save::Released(self.release(replica));
        }
        let name = hex::encode(&Sha256::digest(&chunk)[..16]);
        let key = StorageKey::doc_chunk(id, ChunkKind::Incremental, &name);
        self.incremental_bytes += chunk.len();
        self.incremental_keys.push(key.clone());
        self.issued += 1;
        let seq = self.issued;
        self.unconfirmed.insert(seq);
        for (_, target) in &mut self.waiters {
            target.get_or_insert(seq);
        }
        // Compaction happens off the engine: the storage side merges the
        // chunks into a snapshot and swaps them atomically. The changes are
        // already durable as incrementals, so compaction can fail or be
        // lost in a crash without losing anything.
        let compact = !self.compacting
            && self.incremental_keys.len() > 1
            && self.incremental_bytes >= self.snapshot_bytes.max(self.compacted_bytes)
            && self.incremental_bytes >= compact_after;
        let compact = compact.then(|| {
            self.compacting = true;
            self.compacted_bytes =
                self.compacted_bytes.max(self.snapshot_bytes) + self.incremental_bytes;
            self.incremental_bytes = 0;
            let mut keys = std::mem::take(&mut self.snapshot_keys);
            keys.append(&mut self.incremental_keys);
            // The saved heads are the replica's heads here: the snapshot
            // holds exactly what the replaced chunks and this write hold.
            let snapshot = replica.snapshot().map(|bytes| Snapshot {
                heads: self.saved_heads.clone(),
                bytes,
            });
            (keys, snapshot)
        });
        Save::Write(SavePlan {
            seq,
            key,
            chunk,
            compact,
        })
    }

    /// Bytes of the document in storage (its snapshots and incremental
    /// chunks, before compaction merges them).
    pub(super) fn stored_bytes(&self) -> usize {
        self.snapshot_bytes + self.incremental_bytes
    }

    /// Storage finished write `seq` (chunk `key`, `len` bytes); `ok` says
    /// whether it succeeded. `replica` is the document now.
    pub fn write_done(
        &mut self,
        seq: u64,
        key: &StorageKey,
        len: usize,
        ok: bool,
        replica: &dyn Replica,
    ) -> WriteDone {
        self.unconfirmed.remove(&seq);
        let mut done = WriteDone::default();
        if ok {
            if self.is_saved(&replica.heads()) {
                self.retry = None;
                done.saved = Some(self.saved_heads.clone());
            }
        } else {
            // Whoever needed this write waits for the rewrite.
            for (_, target) in &mut self.waiters {
                if target.is_some_and(|t| t >= seq) {
                    *target = None;
                }
            }
            // Write it again, with the next change or after a while,
            // whichever comes first. Only ever move back: an earlier write
            // may have failed too (writes fail together when committed as a
            // group), and then not even the heads it started from are on
            // disk. Everything is rewritten.
            self.saved_heads = Vec::new();
            // The chunk is not there: compaction must not count or look
            // for it.
            self.incremental_keys.retain(|k| k != key);
            self.incremental_bytes = self.incremental_bytes.saturating_sub(len);
            let (wait, scheduled) = self.retry.unwrap_or((SAVE_RETRY_FIRST, false));
            if !scheduled {
                done.retry_in = Some(wait);
            }
            self.retry = Some(((wait * 2).min(SAVE_RETRY_MAX), true));
        }
        done.released = self.release(replica);
        done
    }

    /// The retry timer fired: the next failure schedules another.
    pub fn retry_fired(&mut self) {
        if let Some((_, scheduled)) = &mut self.retry {
            *scheduled = false;
        }
    }

    /// Storage finished a compaction of `replaced`: `Some((key, bytes))` if
    /// the snapshot replaced them, `None` if nothing was replaced.
    pub fn compaction_done(
        &mut self,
        result: Option<(StorageKey, usize)>,
        replaced: Vec<StorageKey>,
    ) {
        self.compacting = false;
        match result {
            Some((key, bytes)) => {
                self.snapshot_keys.push(key);
                self.snapshot_bytes = bytes;
            }
            // Keep tracking the chunks so a later compaction includes them.
            None => self.snapshot_keys.extend(replaced),
        }
    }

    /// Takes the waiters whose write is confirmed along with every write
    /// before it (all of them once the document is saved), in order.
    fn release(&mut self, replica: &dyn Replica) -> Vec<Waiter> {
        if self.waiters.is_empty() {
            return Vec::new();
        }
        let everything = self.is_saved(&replica.heads());
        let oldest_unconfirmed = self.unconfirmed.first().copied();
        let ready = |target: Option<u64>| {
            everything || matches!(target, Some(t) if oldest_unconfirmed.is_none_or(|u| u > t))
        };
        // Targets never decrease along the list: the released ones are a
        // prefix.
        let cut = self
            .waiters
            .iter()
            .position(|(_, t)| !ready(*t))
            .unwrap_or(self.waiters.len());
        self.waiters.drain(..cut).map(|(w, _)| w).collect()
    }

    /// Gives up on the document: every waiter, to be answered or dropped.
    pub fn into_waiters(self) -> Vec<Waiter> {
        self.waiters.into_iter().map(|(w, _)| w).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::replica::{full_document_factory, Replica};
    use crate::engine::types::ConnectionId;
    use crate::wire::Message;
    use automerge::{transaction::Transactable, ActorId, ROOT};

    fn replica() -> Box<dyn Replica> {
        full_document_factory()(ActorId::from(vec![1u8; 16]), 0)
    }

    fn edit(r: &mut Box<dyn Replica>, n: i64) {
        let doc = r.document_mut().expect("full document");
        let mut tx = doc.transaction();
        tx.put(ROOT, "n", n).expect("put");
        tx.commit();
        r.absorb_local_edits().expect("absorb");
    }

    fn id() -> DocumentId {
        DocumentId::from_random([7; 16])
    }

    fn held(n: u64) -> Waiter {
        let relay = PeerId::new("relay").expect("valid id");
        Waiter::Send(
            relay.clone(),
            Send {
                conn: ConnectionId(n),
                message: Message::Leave { sender_id: relay },
            },
        )
    }

    /// A save that must write, compacting past `compact_after` bytes.
    fn write_compacting(d: &mut Durability, r: &dyn Replica, compact_after: usize) -> SavePlan {
        match d.save(&id(), r, compact_after) {
            Save::Write(plan) => plan,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    fn write(d: &mut Durability, r: &dyn Replica) -> SavePlan {
        write_compacting(d, r, usize::MAX)
    }

    #[test]
    fn a_saved_document_lets_waiters_through_at_once() {
        let mut d = Durability::default();
        let r = replica();
        assert!(d.is_saved(&r.heads()));
        assert_eq!(d.wait(held(1), &r.heads()), Some(held(1)));
        assert!(d.is_idle());
    }

    #[test]
    fn a_message_waits_for_the_write_that_holds_its_changes() {
        let mut d = Durability::default();
        let mut r = replica();
        edit(&mut r, 1);
        // Not yet written: it waits for the next write.
        assert_eq!(d.wait(held(1), &r.heads()), None);
        let first = write(&mut d, &*r);
        assert_eq!(d.wait(held(2), &r.heads()), None);
        edit(&mut r, 2);
        assert_eq!(d.wait(held(3), &r.heads()), None);
        let second = write(&mut d, &*r);
        // The second write finishing first frees nothing: the first one is
        // still outstanding.
        let done = d.write_done(second.seq, &second.key, second.chunk.len(), true, &*r);
        assert!(done.released.is_empty());
        assert_eq!(done.saved, None);
        let done = d.write_done(first.seq, &first.key, first.chunk.len(), true, &*r);
        assert_eq!(done.released, vec![held(1), held(2), held(3)]);
        assert_eq!(done.saved, Some(r.heads()));
        assert!(d.is_idle());
    }

    #[test]
    fn waiters_leave_in_order_as_their_writes_complete() {
        let mut d = Durability::default();
        let mut r = replica();
        edit(&mut r, 1);
        let first = write(&mut d, &*r);
        assert_eq!(d.wait(held(1), &r.heads()), None);
        edit(&mut r, 2);
        let second = write(&mut d, &*r);
        assert_eq!(d.wait(held(2), &r.heads()), None);
        let done = d.write_done(first.seq, &first.key, first.chunk.len(), true, &*r);
        assert_eq!(done.released, vec![held(1)]);
        let done = d.write_done(second.seq, &second.key, second.chunk.len(), true, &*r);
        assert_eq!(done.released, vec![held(2)]);
    }

    #[test]
    fn a_failed_write_holds_its_waiters_until_everything_is_rewritten() {
        let mut d = Durability::default();
        let mut r = replica();
        edit(&mut r, 1);
        let first = write(&mut d, &*r);
        assert_eq!(d.wait(held(1), &r.heads()), None);
        let done = d.write_done(first.seq, &first.key, first.chunk.len(), false, &*r);
        assert_eq!(done.retry_in, Some(SAVE_RETRY_FIRST));
        assert!(done.released.is_empty());
        assert!(!d.is_saved(&r.heads()));
        // The rewrite holds everything from the start.
        d.retry_fired();
        let again = write(&mut d, &*r);
        let mut fresh = replica();
        fresh.load_chunk(&again.chunk).expect("a whole chunk");
        assert_eq!(fresh.heads(), r.heads());
        let done = d.write_done(again.seq, &again.key, again.chunk.len(), true, &*r);
        assert_eq!(done.released, vec![held(1)]);
        assert_eq!(done.saved, Some(r.heads()));
    }

    #[test]
    fn failures_in_a_row_back_off_and_schedule_one_retry() {
        let mut d = Durability::default();
        let mut r = replica();
        edit(&mut r, 1);
        let a = write(&mut d, &*r);
        edit(&mut r, 2);
        let b = write(&mut d, &*r);
        let done = d.write_done(a.seq, &a.key, a.chunk.len(), false, &*r);
        assert_eq!(done.retry_in, Some(SAVE_RETRY_FIRST));
        // Already scheduled: the second failure only doubles the wait.
        let done = d.write_done(b.seq, &b.key, b.chunk.len(), false, &*r);
        assert_eq!(done.retry_in, None);
        d.retry_fired();
        let c = write(&mut d, &*r);
        let done = d.write_done(c.seq, &c.key, c.chunk.len(), false, &*r);
        assert_eq!(done.retry_in, Some(SAVE_RETRY_FIRST * 4));
    }

    #[test]
    fn compaction_replaces_every_chunk_once_they_outweigh_the_snapshot() {
        let mut d = Durability::default();
        let mut r = replica();
        edit(&mut r, 1);
        let first = write_compacting(&mut d, &*r, 0);
        // One chunk alone is never compacted.
        assert!(first.compact.is_none());
        edit(&mut r, 2);
        let second = write_compacting(&mut d, &*r, 0);
        let (replaced, _) = second.compact.expect("a compaction");
        assert_eq!(replaced, vec![first.key.clone(), second.key.clone()]);
        assert!(!d.is_idle());
        edit(&mut r, 3);
        // One compaction at a time.
        let third = write_compacting(&mut d, &*r, 0);
        assert!(third.compact.is_none());
        d.compaction_done(None, replaced);
        assert!(d.is_idle());
    }

    #[test]
    fn saving_unchanged_heads_does_nothing() {
        let mut d = Durability::default();
        let mut r = replica();
        assert!(matches!(d.save(&id(), &*r, 0), Save::Nothing));
        edit(&mut r, 1);
        let _ = write(&mut d, &*r);
        assert!(matches!(d.save(&id(), &*r, 0), Save::Nothing));
    }
}
