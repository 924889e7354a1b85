//! # converge-server
//!
//! The Converge relay: an automerge-repo compatible sync server. Point an
//! automerge-repo app's `WebSocketClientAdapter` at `ws://host:3030` and it
//! syncs through this relay, which keeps every document's full history in
//! RocksDB.
//!
//! Layout:
//! - [`config`]: settings from flags, environment and a TOML file.
//! - [`api`]: the HTTP API for backend services (`openapi.json`).
//! - [`server`]: the axum router (WebSocket at `/`, `/healthz`) and
//!   [`server::serve`], which takes a bound listener and a shutdown future so
//!   tests can run a relay on port 0.
//! - `storage_bench` (feature `bench`): the benchmark subcommands.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod limits;
pub mod server;
#[cfg(feature = "bench")]
pub mod storage_bench;
pub mod tls;
