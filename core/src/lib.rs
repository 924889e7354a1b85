//! # converge-core
//!
//! The core of Converge, a CRDT state-synchronization engine that speaks the
//! automerge-repo protocol: the deterministic engine of
//! [`converge_proto`], driven on tokio.
//!
//! Layout, from the bottom up (dependencies point downwards only):
//!
//! - [`wire`], [`storage`] (as data), [`engine`] and [`context`] come from
//!   `converge-proto`, the sans-IO crate: no sockets, no clock, no OS
//!   randomness, no tokio (a `make test` step checks its dependency tree).
//! - [`storage::RocksStorage`]: the RocksDB store (feature `rocksdb`, on by
//!   default).
//! - [`runtime`]: [`runtime::Repo`] and [`runtime::DocHandle`], which drive
//!   the engine on tokio, perform its storage tasks and wake it on time.
//! - [`transport`]: WebSocket connections (client with reconnect; the
//!   server side lives in `converge-server`).

/// converge-proto's fuzzing entry points (for the replay test).
#[cfg(feature = "test-support")]
pub use converge_proto::fuzz as proto_fuzz;
pub use converge_proto::{context, engine, wire};

pub mod runtime;
pub mod storage;
pub mod transport;

/// The README's Rust examples, compiled by `cargo test --doc` so that they
/// cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;
