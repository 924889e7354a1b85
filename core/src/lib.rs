//! # converge-core
//!
//! The core of Converge, a CRDT state-synchronization engine that speaks the
//! automerge-repo protocol.
//!
//! Layout, from the bottom up (dependencies point downwards only):
//!
//! - [`wire`]: ids, the automerge-repo v1 messages and their CBOR codec.
//!   Pure data.
//! - [`storage`]: storage keys, storage operations as data, the [`Storage`]
//!   trait and an in-memory store.
//! - [`engine`]: the sync engine, a deterministic state machine. It does
//!   no IO: no sockets, no clock, no OS randomness, no tokio.
//! - [`context`]: the Context API — typed reads and writes by JSON Pointer,
//!   transactions, history, time travel and patches — as plain functions
//!   over an Automerge document.
//! - [`runtime`]: [`runtime::Repo`] and [`runtime::DocHandle`], which drive
//!   the engine on tokio, perform its storage tasks and wake it on time.
//! - [`transport`]: WebSocket connections (client with reconnect; the
//!   server side lives in `converge-server`).
//!
//! [`Storage`]: storage::Storage

pub mod context;
pub mod engine;
pub mod runtime;
pub mod storage;
pub mod transport;
pub mod wire;
