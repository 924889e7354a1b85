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

pub use memory::MemoryStorage;

use std::fmt;
use std::sync::Arc;

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

    /// `doc/<id>/acl/list`: the document's access list (read with the
    /// document).
    pub fn doc_acl(doc: &DocumentId) -> Self {
        Self::new([
            "doc".to_owned(),
            doc.to_string(),
            "acl".to_owned(),
            "list".to_owned(),
        ])
    }

    /// `meta/<id>`: when the document last changed and who changed it
    /// (see [`DocMeta`]).
    pub fn doc_meta(doc: &DocumentId) -> Self {
        Self::new(["meta".to_owned(), doc.to_string()])
    }

    /// `meta/<id>/created`: when this store first held the document.
    pub fn doc_created(doc: &DocumentId) -> Self {
        Self::new(["meta".to_owned(), doc.to_string(), "created".to_owned()])
    }

    /// `meta`: every document's [`DocMeta`].
    pub fn meta_prefix() -> Self {
        Self::new(["meta"])
    }

    /// `meta-backfilled`: present once every stored document has its
    /// [`DocMeta`] (see [`backfill_meta`]).
    pub fn meta_backfilled() -> Self {
        Self::new(["meta-backfilled"])
    }

    /// What a key under `doc/<id>` holds, if it is one of ours.
    pub fn classify(&self) -> Option<DocKey<'_>> {
        match self.0.as_slice() {
            [d, _, kind, name] if d == "doc" => match kind.as_str() {
                "snapshot" => Some(DocKey::Chunk(ChunkKind::Snapshot, name)),
                "incremental" => Some(DocKey::Chunk(ChunkKind::Incremental, name)),
                "sync-state" => Some(DocKey::SyncState(name)),
                "acl" if name == "list" => Some(DocKey::Acl),
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

/// What the store keeps about a document beside its contents. The engine
/// is its one writer: it goes to storage in the same atomic write as the
/// changes it describes.
///
/// Two keys, both written blind so that the engine never reads them to
/// open a document (a read per document open would cost block cache on a
/// relay touching millions): [`StorageKey::doc_meta`] holds `updated_ms`
/// and `last_writer`, rewritten with every save; [`StorageKey::doc_created`]
/// holds `created_ms`, written once, with the first save of a document
/// this store did not hold before.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DocMeta {
    /// When this store first held a change of the document (ms since the
    /// Unix epoch, the engine's clock); `None` when not known (in the
    /// engine's memory, for a document it loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<u64>,
    /// When a change last arrived or was made.
    pub updated_ms: u64,
    /// The peer whose change arrived last; `None` for a change made here.
    pub last_writer: Option<String>,
}

impl DocMeta {
    /// The stored form of `meta/<id>` (JSON; `created_ms` is stored under
    /// its own key).
    pub fn encode(&self) -> Vec<u8> {
        let updated = DocMeta {
            created_ms: None,
            ..self.clone()
        };
        serde_json::to_vec(&updated).unwrap_or_default()
    }

    /// The write ops storing `self` for `id`: `meta/<id>`, and
    /// `meta/<id>/created` too when `with_created` and `created_ms` is
    /// known.
    pub fn ops(&self, id: &DocumentId, with_created: bool) -> Vec<BatchOp> {
        let mut ops = vec![BatchOp::Put(StorageKey::doc_meta(id), self.encode())];
        if let Some(created) = self.created_ms.filter(|_| with_created) {
            ops.push(BatchOp::Put(
                StorageKey::doc_created(id),
                created.to_string().into_bytes(),
            ));
        }
        ops
    }

    /// Reads `meta/<id>`; `None` if it is not one. (Stores written before
    /// the split kept `created_ms` in it too: it is read.)
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// Folds one stored entry under `meta/<id>` into `self`.
    fn absorb(&mut self, key: &StorageKey, value: &[u8]) {
        match key.parts() {
            [_, _] => {
                if let Some(m) = DocMeta::decode(value) {
                    self.updated_ms = m.updated_ms;
                    self.last_writer = m.last_writer;
                    self.created_ms = self.created_ms.or(m.created_ms);
                }
            }
            [_, _, created] if created == "created" => {
                let ms = std::str::from_utf8(value).ok().and_then(|t| t.parse().ok());
                if ms.is_some() {
                    self.created_ms = ms;
                }
            }
            _ => {}
        }
    }

    /// Every document's metadata in `storage`, by id (entries that do not
    /// parse are skipped).
    pub fn all(
        storage: &dyn Storage,
    ) -> Result<std::collections::BTreeMap<DocumentId, DocMeta>, StorageError> {
        let mut all = std::collections::BTreeMap::<DocumentId, DocMeta>::new();
        for (key, value) in storage.range(&StorageKey::meta_prefix())? {
            let Some(Ok(id)) = key.parts().get(1).map(|id| id.parse::<DocumentId>()) else {
                continue;
            };
            all.entry(id).or_default().absorb(&key, &value);
        }
        Ok(all)
    }

    /// One document's metadata in `storage`, if it has any.
    pub fn load(storage: &dyn Storage, id: &DocumentId) -> Result<Option<DocMeta>, StorageError> {
        let entries = storage.range(&StorageKey::doc_meta(id))?;
        if entries.is_empty() {
            return Ok(None);
        }
        let mut meta = DocMeta::default();
        for (key, value) in entries {
            meta.absorb(&key, &value);
        }
        Ok(Some(meta))
    }

    /// `newer` (the engine's, a write ahead of the disk) over `self` (the
    /// stored): the latest update, the stored creation time if known.
    pub fn overlay(self, newer: DocMeta) -> DocMeta {
        DocMeta {
            created_ms: self.created_ms.or(newer.created_ms),
            ..newer
        }
    }
}

/// Gives every stored document without [`DocMeta`] one (created and
/// updated now, writer unknown): stores written before the engine kept
/// metadata list all their documents too. Runs once per store (a marker
/// key records it); returns how many documents it filled in.
pub fn backfill_meta(storage: &dyn Storage, now_ms: u64) -> Result<usize, StorageError> {
    let marker = StorageKey::meta_backfilled();
    if storage.get(&marker)?.is_some() {
        return Ok(0);
    }
    let known = DocMeta::all(storage)?;
    let missing: Vec<DocumentId> = document_ids(storage)?
        .into_iter()
        .filter(|id| !known.contains_key(id))
        .collect();
    let meta = DocMeta {
        created_ms: Some(now_ms),
        updated_ms: now_ms,
        last_writer: None,
    };
    let mut ops: Vec<BatchOp> = missing.iter().flat_map(|id| meta.ops(id, true)).collect();
    ops.push(BatchOp::Put(marker, Vec::new()));
    storage.batch(ops)?;
    Ok(missing.len())
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
    /// The document's access list ([`crate::engine::Acl`]).
    Acl,
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
    /// batch, write it and delete them. See
    /// [`engine::compaction`](crate::engine::compaction).
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
    pub(crate) fn is_write(&self) -> bool {
        matches!(
            self,
            StorageOp::Put(..) | StorageOp::Delete(_) | StorageOp::Batch(_)
        )
    }

    /// The writes this op consists of, or the op back if it reads.
    pub(crate) fn into_writes(self) -> Result<Vec<BatchOp>, StorageOp> {
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
#[derive(Clone, Debug)]
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
    /// The task failed. Shared: one failed batch fails every task in it.
    Failed(Arc<StorageError>),
}

/// An error from below, kept as the source of a [`StorageError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The backing store reported an error.
    #[error("storage backend error: {0}")]
    Backend(#[source] BoxError),
    /// A document's stored chunks could not be merged into a snapshot
    /// (nothing was written or deleted).
    #[error("cannot compact document {document}: {source}")]
    Compaction {
        /// Which document.
        document: DocumentId,
        /// Why the merge failed.
        source: BoxError,
    },
    /// Carrying out the operation panicked; the panic was contained.
    #[error("storage operation panicked")]
    Panicked,
}

impl StorageError {
    /// A backend error from any error value.
    pub fn backend(e: impl Into<BoxError>) -> Self {
        StorageError::Backend(e.into())
    }
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
