//! Storage: the data the engine asks for ([`StorageOp`], [`StorageTask`],
//! [`StorageResult`]), the [`Storage`] trait and the in-memory store, all
//! from `converge-proto`, plus the RocksDB store the relay and the bindings
//! keep documents in.

pub use converge_proto::storage::*;

#[cfg(feature = "rocksdb")]
mod rocks;

#[cfg(feature = "rocksdb")]
pub use rocks::RocksStorage;

/// The RocksDB crate, for tools that measure RocksDB itself.
#[cfg(all(feature = "rocksdb", feature = "test-support"))]
pub use rocksdb;
