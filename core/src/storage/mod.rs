//! Storage as data: keys, operations and their results.
//!
//! The engine never touches a disk. It asks for storage work by returning
//! [`StorageTask`]s; whoever drives it (the tokio runtime, the simulation)
//! performs them against a [`Storage`] and feeds each [`StorageResult`] back.
//!
//! Keys mirror automerge-repo's layout, one component per element:
//!
//! | key | holds |
//! |---|---|
//! | `doc/<id>/snapshot/<name>` | a whole saved document |
//! | `doc/<id>/incremental/<name>` | changes saved since a snapshot |
//! | `doc/<id>/sync-state/<storage-id>` | `automerge::sync::State::encode` for one remote storage |
//!
//! so loading a document is one prefix scan of `doc/<id>`.

mod memory;
#[cfg(feature = "rocksdb")]
mod rocks;

pub use memory::MemoryStorage;
#[cfg(feature = "rocksdb")]
pub use rocks::RocksStorage;
/// The RocksDB bindings this crate stores with (for measuring tools).
#[cfg(feature = "rocksdb")]
pub use rocksdb;

use std::fmt;

use crate::wire::{DocumentId, StorageId};

/// A storage key: a short list of path components. Components never
/// contain `/` when produced by this crate, so the `/`-joined byte form is
/// unambiguous.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorageKey(Vec<String>);

impl StorageKey {
    /// A key from its components.
    pub fn new<I, S>(parts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self(parts.into_iter().map(Into::into).collect())
    }

    /// The components.
    pub fn parts(&self) -> &[String] {
        &self.0
    }

    /// Whether `prefix`'s components are the first components of `self`.
    pub fn starts_with(&self, prefix: &StorageKey) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// The `/`-joined form, as stored in a key-value database.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.join("/").into_bytes()
    }

    /// Parses the `/`-joined form.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        Some(Self(text.split('/').map(str::to_owned).collect()))
    }

    /// `doc/<id>`: everything stored about one document.
    pub fn doc_prefix(doc: &DocumentId) -> Self {
        Self::new(["doc".to_owned(), doc.to_string()])
    }

    /// `doc/<id>/<kind>/<name>`.
    pub fn doc_chunk(doc: &DocumentId, kind: ChunkKind, name: &str) -> Self {
        Self::new([
            "doc".to_owned(),
            doc.to_string(),
            kind.as_str().to_owned(),
            name.to_owned(),
        ])
    }

    /// `doc/<id>/sync-state/<storage-id>`.
    pub fn sync_state(doc: &DocumentId, storage: &StorageId) -> Self {
        Self::new([
            "doc".to_owned(),
            doc.to_string(),
            "sync-state".to_owned(),
            storage.as_str().to_owned(),
        ])
    }

    /// What a key under `doc/<id>` holds, if it is one of ours.
    pub fn classify(&self) -> Option<DocKey<'_>> {
        match self.0.as_slice() {
            [d, _, kind, name] if d == "doc" => match kind.as_str() {
                "snapshot" => Some(DocKey::Chunk(ChunkKind::Snapshot, name)),
                "incremental" => Some(DocKey::Chunk(ChunkKind::Incremental, name)),
                "sync-state" => Some(DocKey::SyncState(name)),
                _ => None,
            },
            _ => None,
        }
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({})", self.0.join("/"))
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("/"))
    }
}

/// The two kinds of document chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChunkKind {
    /// A whole document (`Automerge::save`).
    Snapshot,
    /// Changes since an earlier chunk (`Automerge::save_after`).
    Incremental,
}

impl ChunkKind {
    /// The key component for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkKind::Snapshot => "snapshot",
            ChunkKind::Incremental => "incremental",
        }
    }
}

/// What a key under `doc/<id>` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocKey<'a> {
    /// A document chunk and its name.
    Chunk(ChunkKind, &'a str),
    /// A sync state and the storage id it belongs to.
    SyncState(&'a str),
}

/// Identifies one storage task so its result can be matched to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u64);

/// One write inside an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchOp {
    /// Set `key` to the bytes.
    Put(StorageKey, Vec<u8>),
    /// Remove `key` (absent keys are fine).
    Delete(StorageKey),
}

/// A piece of storage work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageOp {
    /// Read one key.
    Load(StorageKey),
    /// Read every key under a prefix, in key order.
    LoadRange(StorageKey),
    /// Write one key.
    Put(StorageKey, Vec<u8>),
    /// Remove one key.
    Delete(StorageKey),
    /// Apply every op or none.
    Batch(Vec<BatchOp>),
    /// Merge the chunks at `replace` into one snapshot and, in one atomic
    /// batch, write it and delete them. See [`compaction`].
    Compact {
        /// The document the chunks belong to.
        doc: DocumentId,
        /// The chunks to merge and replace.
        replace: Vec<StorageKey>,
        /// The snapshot, when the engine had the document in memory and
        /// saved it: then nothing is read or merged here.
        snapshot: Option<Snapshot>,
    },
}

/// A saved document ready to replace the chunks it contains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The heads it covers (they name its key).
    pub heads: Vec<automerge::ChangeHash>,
    /// `Automerge::save` of the document.
    pub bytes: Vec<u8>,
}

impl StorageOp {
    /// Whether this op only writes.
    fn is_write(&self) -> bool {
        matches!(
            self,
            StorageOp::Put(..) | StorageOp::Delete(_) | StorageOp::Batch(_)
        )
    }

    /// The writes this op consists of, or the op back if it reads.
    fn into_writes(self) -> Result<Vec<BatchOp>, StorageOp> {
        match self {
            StorageOp::Put(key, value) => Ok(vec![BatchOp::Put(key, value)]),
            StorageOp::Delete(key) => Ok(vec![BatchOp::Delete(key)]),
            StorageOp::Batch(ops) => Ok(ops),
            other => Err(other),
        }
    }
}

/// A storage op with the id its result will carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageTask {
    /// Matches the result to the task.
    pub id: TaskId,
    /// What to do.
    pub op: StorageOp,
}

/// The outcome of a [`StorageTask`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageResult {
    /// The value of a `Load`, `None` if absent.
    Loaded(Option<Vec<u8>>),
    /// The entries of a `LoadRange`, in key order.
    Range(Vec<(StorageKey, Vec<u8>)>),
    /// A write (`Put`, `Delete`, `Batch`) is done.
    Written,
    /// A `Compact` wrote this snapshot, of this many bytes.
    Compacted {
        /// The new snapshot's key.
        key: StorageKey,
        /// Its size.
        bytes: usize,
    },
    /// The task failed; the text says why.
    Failed(String),
}

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The backing store reported an error.
    #[error("storage backend error: {0}")]
    Backend(String),
}

/// A key-value store the runtime performs [`StorageOp`]s against.
pub trait Storage: Send + Sync + fmt::Debug + 'static {
    /// Reads one key.
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError>;
    /// Reads every key under `prefix`, in key order.
    fn range(&self, prefix: &StorageKey) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError>;
    /// Applies all ops atomically.
    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError>;

    /// Every key under `prefix`, in key order, without the values.
    fn keys(&self, prefix: &StorageKey) -> Result<Vec<StorageKey>, StorageError> {
        Ok(self.range(prefix)?.into_iter().map(|(k, _)| k).collect())
    }

    /// Performs one op and turns the outcome into a [`StorageResult`].
    fn perform(&self, op: StorageOp) -> StorageResult {
        let outcome = match op {
            StorageOp::Load(key) => self.get(&key).map(StorageResult::Loaded),
            StorageOp::LoadRange(prefix) => self.range(&prefix).map(StorageResult::Range),
            StorageOp::Put(key, value) => self
                .batch(vec![BatchOp::Put(key, value)])
                .map(|()| StorageResult::Written),
            StorageOp::Delete(key) => self
                .batch(vec![BatchOp::Delete(key)])
                .map(|()| StorageResult::Written),
            StorageOp::Batch(ops) => self.batch(ops).map(|()| StorageResult::Written),
            StorageOp::Compact {
                doc,
                replace,
                snapshot,
            } => {
                match compaction(&doc, &replace, snapshot, |k| {
                    self.get(k).map_err(|e| e.to_string())
                }) {
                    Ok((ops, key, bytes)) => self
                        .batch(ops)
                        .map(|()| StorageResult::Compacted { key, bytes }),
                    Err(reason) => Ok(StorageResult::Failed(reason)),
                }
            }
        };
        outcome.unwrap_or_else(|e| StorageResult::Failed(e.to_string()))
    }

    /// Performs ops in order, as [`Storage::perform`] would one by one, but
    /// commits each run of consecutive writes as one atomic batch: one write
    /// (and, with synced writes, one fsync) for the whole run. Every op of a
    /// run gets the run's outcome.
    fn perform_many(&self, ops: Vec<StorageOp>) -> Vec<StorageResult> {
        let mut results = Vec::with_capacity(ops.len());
        let mut ops = ops.into_iter().peekable();
        while let Some(op) = ops.next() {
            let mut run = match op.into_writes() {
                Ok(writes) => writes,
                Err(other) => {
                    // A panic (Automerge during a compaction) fails this op
                    // only, not the others taken with it.
                    results.push(
                        contained(|| self.perform(other)).unwrap_or_else(StorageResult::Failed),
                    );
                    continue;
                }
            };
            let mut run_len = 1;
            while let Some(next) = ops.next_if(StorageOp::is_write) {
                run.extend(next.into_writes().unwrap_or_default());
                run_len += 1;
            }
            let result = match contained(|| self.batch(run)) {
                Ok(Ok(())) => StorageResult::Written,
                Ok(Err(e)) => StorageResult::Failed(e.to_string()),
                Err(reason) => StorageResult::Failed(reason),
            };
            results.extend(std::iter::repeat_n(result, run_len));
        }
        results
    }
}

/// Runs `f`, turning a panic into an error message.
fn contained<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| "storage task panicked".to_owned())
}

/// Every document that has at least one chunk in `storage`.
pub fn document_ids(
    storage: &dyn Storage,
) -> Result<std::collections::BTreeSet<DocumentId>, StorageError> {
    let mut ids = std::collections::BTreeSet::new();
    for key in storage.keys(&StorageKey::new(["doc"]))? {
        if let (Some(DocKey::Chunk(..)), Some(id)) = (key.classify(), key.parts().get(1)) {
            if let Ok(id) = id.parse::<DocumentId>() {
                ids.insert(id);
            }
        }
    }
    Ok(ids)
}

/// Plans a compaction: reads the chunks at `replace` through `get`, merges
/// them into one document and returns the atomic batch that writes its
/// snapshot and deletes the chunks, the snapshot's key and its size. With a
/// ready `snapshot` (which holds every replaced chunk's changes) nothing is
/// read: it replaces them all.
///
/// Every chunk is loaded strictly; if any is damaged nothing is planned, so
/// a compaction can never lose data it could not read.
pub fn compaction(
    doc: &DocumentId,
    replace: &[StorageKey],
    snapshot: Option<Snapshot>,
    get: impl Fn(&StorageKey) -> Result<Option<Vec<u8>>, String>,
) -> Result<(Vec<BatchOp>, StorageKey, usize), String> {
    if let Some(Snapshot { heads, bytes }) = snapshot {
        let key = StorageKey::doc_chunk(doc, ChunkKind::Snapshot, &heads_name(&heads));
        let size = bytes.len();
        let mut ops: Vec<BatchOp> = replace
            .iter()
            .filter(|k| **k != key)
            .cloned()
            .map(BatchOp::Delete)
            .collect();
        ops.push(BatchOp::Put(key.clone(), bytes));
        return Ok((ops, key, size));
    }
    use crate::engine::{FullDocument, Replica};
    let mut merged = FullDocument::new(automerge::ActorId::from(vec![0u8; 16]));
    let mut ordered: Vec<&StorageKey> = replace.iter().collect();
    // Snapshots first, as loading does.
    ordered.sort_by_key(|k| !matches!(k.classify(), Some(DocKey::Chunk(ChunkKind::Snapshot, _))));
    let mut merged_keys = Vec::new();
    let mut all = Vec::new();
    for key in ordered {
        // A read error stops everything; a chunk that is simply not there
        // was never written (its write failed and the engine writes those
        // changes again), so there is nothing to merge or delete.
        let Some(bytes) =
            get(key).map_err(|e| format!("cannot compact {doc}: reading {key}: {e}"))?
        else {
            continue;
        };
        all.extend_from_slice(&bytes);
        merged_keys.push(key.clone());
    }
    // One load for all chunks: automerge applies the changes as one batch.
    // Applying them chunk by chunk costs a pass over the document each
    // time (a busy document's thousands of keystroke chunks made that
    // quadratic). A damaged chunk fails the whole load, so nothing is
    // planned.
    merged
        .load_chunk(&all)
        .map_err(|e| format!("cannot compact {doc}: {e}"))?;
    let snapshot = merged.save();
    let key = StorageKey::doc_chunk(doc, ChunkKind::Snapshot, &heads_name(&merged.heads()));
    let bytes = snapshot.len();
    // Only chunks whose contents are in the snapshot are deleted.
    let mut ops: Vec<BatchOp> = merged_keys
        .into_iter()
        .filter(|k| *k != key)
        .map(BatchOp::Delete)
        .collect();
    ops.push(BatchOp::Put(key.clone(), snapshot));
    Ok((ops, key, bytes))
}

/// A snapshot's name: a digest of the heads it covers.
fn heads_name(heads: &[automerge::ChangeHash]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for h in heads {
        hasher.update(h.0);
    }
    hex::encode(&hasher.finalize()[..16])
}
