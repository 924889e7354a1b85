//! An in-memory [`Storage`] for tests and ephemeral peers.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{BatchOp, Storage, StorageError, StorageKey};

/// Keeps everything in an ordered map behind a mutex. Nothing survives the
/// process.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    entries: Mutex<BTreeMap<StorageKey, Vec<u8>>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<StorageKey, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-written
        // (every write below is a single insert/remove), so a poisoned lock
        // is safe to keep using.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every entry, in key order (for tests).
    pub fn snapshot(&self) -> BTreeMap<StorageKey, Vec<u8>> {
        self.lock().clone()
    }

    /// Applies ops in order without the atomicity bookkeeping of
    /// [`Storage::batch`]; the map is behind one lock, so it is atomic anyway.
    fn apply(map: &mut BTreeMap<StorageKey, Vec<u8>>, ops: Vec<BatchOp>) {
        for op in ops {
            match op {
                BatchOp::Put(k, v) => {
                    map.insert(k, v);
                }
                BatchOp::Delete(k) => {
                    map.remove(&k);
                }
            }
        }
    }
}

impl Storage for MemoryStorage {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().get(key).cloned())
    }

    fn range(&self, prefix: &StorageKey) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        Ok(self
            .lock()
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        Self::apply(&mut self.lock(), ops);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_returns_only_keys_under_the_prefix() {
        let s = MemoryStorage::new();
        let put = |k: &[&str]| BatchOp::Put(StorageKey::new(k.iter().copied()), vec![1]);
        s.batch(vec![
            put(&["doc", "a", "snapshot", "1"]),
            put(&["doc", "a", "incremental", "2"]),
            put(&["doc", "ab", "snapshot", "1"]),
            put(&["doc", "b", "snapshot", "1"]),
        ])
        .expect("memory writes succeed");
        let got = s
            .range(&StorageKey::new(["doc", "a"]))
            .expect("memory reads succeed");
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|(k, _)| k.parts()[1] == "a"));
    }
}
