//! Compaction: merging a document's chunks into one snapshot.
//!
//! It sits beside the replicas because merging needs one; the storage
//! module below stays pure data.

use automerge::ChangeHash;

use super::replica::{FullDocument, Replica};
use crate::storage::{BatchOp, ChunkKind, DocKey, Snapshot, StorageError, StorageKey};
use crate::wire::DocumentId;

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
    get: impl Fn(&StorageKey) -> Result<Option<Vec<u8>>, StorageError>,
) -> Result<(Vec<BatchOp>, StorageKey, usize), StorageError> {
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
        let Some(bytes) = get(key)? else {
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
        .map_err(|e| StorageError::Compaction {
            document: doc.clone(),
            source: Box::new(e),
        })?;
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
fn heads_name(heads: &[ChangeHash]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for h in heads {
        hasher.update(h.0);
    }
    hex::encode(&hasher.finalize()[..16])
}
