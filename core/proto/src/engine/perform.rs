//! Carrying out storage operations against a [`Storage`].
//!
//! The runtime's storage thread and the simulator both run the engine's
//! [`StorageOp`]s through these functions, so what the simulation proves
//! about storage holds for the relay.

use super::compaction::compaction;
use std::sync::Arc;

use crate::storage::{BatchOp, Storage, StorageError, StorageOp, StorageResult};

/// Performs one op and turns the outcome into a [`StorageResult`].
pub fn perform(storage: &dyn Storage, op: StorageOp) -> StorageResult {
    let outcome = match op {
        StorageOp::Load(key) => storage.get(&key).map(StorageResult::Loaded),
        StorageOp::LoadRange(prefix) => storage.range(&prefix).map(StorageResult::Range),
        StorageOp::Put(key, value) => storage
            .batch(vec![BatchOp::Put(key, value)])
            .map(|()| StorageResult::Written),
        StorageOp::Delete(key) => storage
            .batch(vec![BatchOp::Delete(key)])
            .map(|()| StorageResult::Written),
        StorageOp::Batch(ops) => storage.batch(ops).map(|()| StorageResult::Written),
        StorageOp::Compact {
            doc,
            replace,
            snapshot,
        } => compaction(&doc, &replace, snapshot, |k| storage.get(k)).and_then(
            |(ops, key, bytes)| {
                storage
                    .batch(ops)
                    .map(|()| StorageResult::Compacted { key, bytes })
            },
        ),
    };
    outcome.unwrap_or_else(|e| StorageResult::Failed(Arc::new(e)))
}

/// Performs ops in order, as [`perform`] would one by one, but
/// commits each run of consecutive writes as one atomic batch: one write
/// (and, with synced writes, one fsync) for the whole run. Every op of a
/// run gets the run's outcome.
pub fn perform_many(storage: &dyn Storage, ops: Vec<StorageOp>) -> Vec<StorageResult> {
    let mut results = Vec::with_capacity(ops.len());
    let mut ops = ops.into_iter().peekable();
    while let Some(op) = ops.next() {
        let mut run = match op.into_writes() {
            Ok(writes) => writes,
            Err(other) => {
                // A panic (Automerge during a compaction) fails this op
                // only, not the others taken with it.
                results.push(
                    contained(|| perform(storage, other))
                        .unwrap_or_else(|e| StorageResult::Failed(Arc::new(e))),
                );
                continue;
            }
        };
        let mut run_len = 1;
        while let Some(next) = ops.next_if(StorageOp::is_write) {
            run.extend(next.into_writes().unwrap_or_default());
            run_len += 1;
        }
        let result = match contained(|| storage.batch(run)) {
            Ok(Ok(())) => StorageResult::Written,
            Ok(Err(e)) | Err(e) => StorageResult::Failed(Arc::new(e)),
        };
        results.extend(std::iter::repeat_n(result, run_len));
    }
    results
}

/// Runs `f`, turning a panic into [`StorageError::Panicked`].
fn contained<T>(f: impl FnOnce() -> T) -> Result<T, StorageError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| StorageError::Panicked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStorage, StorageKey};

    #[test]
    fn grouped_ops_behave_like_ops_one_by_one() {
        let key = |n: &str| StorageKey::new(["k", n]);
        let ops = vec![
            StorageOp::Put(key("a"), vec![1]),
            StorageOp::Batch(vec![
                BatchOp::Put(key("b"), vec![2]),
                BatchOp::Delete(key("a")),
            ]),
            // A read between writes sees the writes before it.
            StorageOp::Load(key("a")),
            StorageOp::Load(key("b")),
            StorageOp::Put(key("a"), vec![3]),
            StorageOp::Delete(key("b")),
            StorageOp::LoadRange(StorageKey::new(["k"])),
        ];
        let one_by_one = MemoryStorage::new();
        let expected: Vec<StorageResult> = ops
            .iter()
            .cloned()
            .map(|op| perform(&one_by_one, op))
            .collect();
        let grouped = MemoryStorage::new();
        // (Results compare by their Debug form: a failure holds an error.)
        assert_eq!(
            format!("{:?}", perform_many(&grouped, ops)),
            format!("{expected:?}")
        );
        assert_eq!(
            grouped.range(&StorageKey::new(["k"])).expect("range"),
            vec![(key("a"), vec![3])]
        );
    }
}
