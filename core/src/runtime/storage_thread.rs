//! The storage thread: performs the engine's storage tasks in order, off
//! the async runtime, committing whatever queued up together as one group.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::engine::perform_many;
use crate::storage::{Storage, StorageError, StorageOp, StorageResult, TaskId};

/// Most storage tasks taken from the queue and performed as one group.
const MAX_STORAGE_GROUP: usize = 256;

pub(super) fn spawn_storage_thread(
    storage: Arc<dyn Storage>,
    results: mpsc::UnboundedSender<(TaskId, StorageResult)>,
) -> (
    std::sync::mpsc::Sender<(TaskId, StorageOp)>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = std::sync::mpsc::channel::<(TaskId, StorageOp)>();
    let handle = std::thread::Builder::new()
        .name("converge-storage".into())
        .spawn(move || {
            // One thread, tasks in order: a later write never overtakes an
            // earlier one, which compaction relies on. Whatever queued up
            // while the last tasks ran is taken at once, so writes that
            // arrive together are committed together (group commit).
            while let Ok(first) = rx.recv() {
                let mut tasks = vec![first];
                while tasks.len() < MAX_STORAGE_GROUP {
                    match rx.try_recv() {
                        Ok(next) => tasks.push(next),
                        Err(_) => break,
                    }
                }
                let (ids, ops): (Vec<TaskId>, Vec<StorageOp>) = tasks.into_iter().unzip();
                let count = ids.len();
                // A panic in the store (or in Automerge during compaction)
                // fails these tasks instead of silently killing the thread.
                let outcomes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    perform_many(storage.as_ref(), ops)
                }))
                .unwrap_or_else(|_| {
                    vec![StorageResult::Failed(Arc::new(StorageError::Panicked)); count]
                });
                // Once the actor is gone nobody wants the results, but the
                // remaining writes still go to the store.
                for (task, result) in ids.into_iter().zip(outcomes) {
                    let _ = results.send((task, result));
                }
            }
        })
        .unwrap_or_else(|e| panic!("cannot start the storage thread: {e}"));
    (tx, handle)
}
