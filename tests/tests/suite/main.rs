//! The Converge test suite, in one binary (each extra test binary costs a
//! link step, and links are slow with RocksDB in the tree).

mod auth;
mod context;
mod fuzz_replay;
mod hostile;
mod http;
mod limits;
mod properties;
mod relay;
mod scenarios;
mod sockets;
mod storage;
mod stories;
mod tls;
mod wait;
mod wire_fixtures;
mod wire_props;
