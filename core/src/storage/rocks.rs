//! [`Storage`] on RocksDB.
//!
//! Column families keep the kinds of data apart so each can be tuned and
//! scanned on its own:
//!
//! | family | holds |
//! |---|---|
//! | `chunks` | `doc/<id>/snapshot/*` and `doc/<id>/incremental/*` |
//! | `sync` | `doc/<id>/sync-state/*` |
//! | `meta` | `meta/<id>`: per-context metadata (created, updated, writer) |
//! | `default` | everything else (the store's own id) |
//!
//! Writes go through the write-ahead log. By default they are not fsynced
//! one by one: a write that returned survives the process being killed
//! (the WAL is in the OS page cache), and [`RocksStorage::flush`] makes
//! everything durable against power loss. `sync_writes` fsyncs every batch.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use super::{BatchOp, DocKey, Storage, StorageError, StorageKey};

const CF_CHUNKS: &str = "chunks";
const CF_SYNC: &str = "sync";
const CF_META: &str = "meta";
const FAMILIES: [&str; 4] = ["default", CF_CHUNKS, CF_SYNC, CF_META];

/// A RocksDB database holding Converge's data.
pub struct RocksStorage {
    db: DB,
    sync_writes: bool,
}

impl std::fmt::Debug for RocksStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStorage")
            .field("path", &self.db.path())
            .field("sync_writes", &self.sync_writes)
            .finish()
    }
}

fn backend(e: rocksdb::Error) -> StorageError {
    StorageError::backend(e)
}

impl RocksStorage {
    /// The underlying database, for tools that measure RocksDB itself
    /// (`converge-server bench-storage`). Writing to it directly bypasses
    /// the key layout above. (Feature `test-support`.)
    #[cfg(feature = "test-support")]
    pub fn raw(&self) -> &DB {
        &self.db
    }

    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path, sync_writes: bool) -> Result<Self, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let families = FAMILIES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, families).map_err(backend)?;
        Ok(Self { db, sync_writes })
    }

    /// Visits every key at or under `prefix` in every column family, with
    /// its value borrowed from the iterator (copied only by those who keep it).
    fn scan(
        &self,
        prefix: &StorageKey,
        mut visit: impl FnMut(StorageKey, &[u8]),
    ) -> Result<(), StorageError> {
        let exact = prefix.to_bytes();
        let mut start = exact.clone();
        start.push(b'/');
        for name in FAMILIES {
            let Some(cf) = self.db.cf_handle(name) else {
                continue;
            };
            let mut iter = self.db.raw_iterator_cf(cf);
            iter.seek(&exact);
            while let Some(k) = iter.key() {
                if k == exact.as_slice() || k.starts_with(&start) {
                    if let Some(key) = StorageKey::from_bytes(k) {
                        visit(key, iter.value().unwrap_or_default());
                    }
                } else if k > start.as_slice() {
                    break;
                }
                // Keys such as `doc/a-x` sort between `doc/a` and `doc/a/`:
                // not ours, but the matches may still follow.
                iter.next();
            }
            iter.status().map_err(backend)?;
        }
        Ok(())
    }

    fn family(&self, key: &StorageKey) -> Result<&rocksdb::ColumnFamily, StorageError> {
        let name = match key.classify() {
            Some(DocKey::Chunk(..)) => CF_CHUNKS,
            Some(DocKey::SyncState(_)) => CF_SYNC,
            Some(DocKey::Acl) => "default",
            None if key.parts().first().map(String::as_str) == Some("meta") => CF_META,
            None => "default",
        };
        self.db
            .cf_handle(name)
            .ok_or_else(|| StorageError::backend(format!("column family {name} is missing")))
    }

    /// Flushes memtables and the WAL to disk.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true).map_err(backend)?;
        for name in FAMILIES {
            if let Some(cf) = self.db.cf_handle(name) {
                self.db.flush_cf(cf).map_err(backend)?;
            }
        }
        Ok(())
    }
}

impl Storage for RocksStorage {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        self.db
            .get_cf(self.family(key)?, key.to_bytes())
            .map_err(backend)
    }

    fn range(&self, prefix: &StorageKey) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        self.scan(prefix, |key, value| out.push((key, value.to_vec())))?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn keys(&self, prefix: &StorageKey) -> Result<Vec<StorageKey>, StorageError> {
        let mut out = Vec::new();
        self.scan(prefix, |key, _| out.push(key))?;
        out.sort();
        Ok(out)
    }

    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        for op in &ops {
            match op {
                BatchOp::Put(k, v) => batch.put_cf(self.family(k)?, k.to_bytes(), v),
                BatchOp::Delete(k) => batch.delete_cf(self.family(k)?, k.to_bytes()),
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(self.sync_writes);
        self.db.write_opt(batch, &opts).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_survives_reopening_and_ranges_stay_in_their_prefix() {
        let dir = std::env::temp_dir().join(format!("converge-rocks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = RocksStorage::open(&dir, false).expect("open");
            s.batch(vec![
                BatchOp::Put(
                    StorageKey::new(["doc", "a", "snapshot", "1"]),
                    b"snap".to_vec(),
                ),
                BatchOp::Put(
                    StorageKey::new(["doc", "a", "sync-state", "peer"]),
                    b"st".to_vec(),
                ),
                BatchOp::Put(
                    StorageKey::new(["doc", "ab", "snapshot", "1"]),
                    b"other".to_vec(),
                ),
                // Sorts between `doc/a` and `doc/a/`: must not end the scan.
                BatchOp::Put(
                    StorageKey::new(["doc", "a-x", "snapshot", "1"]),
                    b"other".to_vec(),
                ),
                BatchOp::Put(StorageKey::new(["storage-adapter-id"]), b"id".to_vec()),
            ])
            .expect("write");
        }
        let s = RocksStorage::open(&dir, false).expect("reopen");
        let got = s.range(&StorageKey::new(["doc", "a"])).expect("range");
        let keys: Vec<String> = got.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys, ["doc/a/snapshot/1", "doc/a/sync-state/peer"]);
        let only_keys: Vec<String> = s
            .keys(&StorageKey::new(["doc", "a"]))
            .expect("keys")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(only_keys, keys);
        assert_eq!(
            s.get(&StorageKey::new(["storage-adapter-id"]))
                .expect("get"),
            Some(b"id".to_vec())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
