//! # converge-proto
//!
//! The deterministic heart of Converge: everything that decides what to
//! send, store and answer, and nothing that does it. No sockets, no clock,
//! no OS randomness and no tokio appear in this crate's dependencies (a
//! `make test` step checks its dependency tree), so a driver is free to be
//! tokio (`converge-core`), a deterministic simulator (`converge-tests`), a
//! phone's own event loop or a test that calls it by hand.
//!
//! Layout, from the bottom up (dependencies point downwards only):
//!
//! - [`wire`]: ids, the automerge-repo v1 messages and their CBOR codec.
//! - [`storage`]: storage keys, storage operations and their results as
//!   data, the [`Storage`](storage::Storage) trait and an in-memory store.
//! - [`engine`]: the sync engine, a state machine fed [`engine::Input`]s
//!   and the time, answering with an [`engine::Output`]; its two replica
//!   kinds; compaction and the code that carries out storage operations.
//! - [`context`]: the Context API — typed reads and writes by JSON Pointer,
//!   transactions, history, time travel and patches — as plain functions
//!   over an Automerge document.
//!
//! # Two engines, by hand
//!
//! The driver's whole job: deliver what one engine sends to the other,
//! carry out storage tasks, and stop when neither has anything to say.
//!
//! ```
//! use std::collections::VecDeque;
//!
//! use automerge::{transaction::Transactable, ReadDoc, ROOT};
//! use converge_proto::engine::{
//!     perform, Command, CommandId, CommandResult, ConnectionId, Direction, Engine,
//!     EngineConfig, Grant, Input, Output, Timestamp,
//! };
//! use converge_proto::storage::MemoryStorage;
//! use converge_proto::wire::{encode, PeerId};
//!
//! /// Queues what `out` asks for: its messages for the other engine, its
//! /// storage results for the one that produced it.
//! fn route(from: usize, out: Output, store: &MemoryStorage, queue: &mut VecDeque<(usize, Input)>) {
//!     for send in out.sends {
//!         let bytes = encode(&send.message);
//!         queue.push_back((1 - from, Input::Received { conn: send.conn, bytes }));
//!     }
//!     for task in out.storage {
//!         let result = perform(store, task.op);
//!         queue.push_back((from, Input::Storage { task: task.id, result }));
//!     }
//! }
//!
//! let config = |name: &str, seed| {
//!     EngineConfig::new(PeerId::new(name).expect("valid peer id"), None, seed)
//! };
//! let mut engines = [Engine::new(config("alice", 1)), Engine::new(config("bob", 2))];
//! let stores = [MemoryStorage::new(), MemoryStorage::new()];
//! let now = Timestamp(0);
//! let mut queue = VecDeque::new();
//!
//! // Alice creates a document and writes into it.
//! let out = engines[0].handle(now, Input::Command(CommandId(1), Command::Create { initial: None, owner: None }));
//! let Some((_, CommandResult::Create(Ok(id)))) = out.completed.first() else {
//!     panic!("create answers at once");
//! };
//! let id = id.clone();
//! route(0, out, &stores[0], &mut queue);
//! let (_, out) = engines[0]
//!     .change(now, &id, |doc| doc.transact(|tx| tx.put(ROOT, "greeting", "hello")))
//!     .expect("the document is open");
//! route(0, out, &stores[0], &mut queue);
//!
//! // One connection, seen from both ends (the same id on each side here):
//! // Bob dials, Alice accepts, and Bob asks for the document.
//! let link = ConnectionId(1);
//! queue.push_back((0, Input::Connected { conn: link, direction: Direction::Incoming, grant: Grant::everything().into() }));
//! queue.push_back((1, Input::Connected { conn: link, direction: Direction::Outgoing, grant: Grant::everything().into() }));
//! queue.push_back((1, Input::Command(CommandId(2), Command::Find { document_id: id.clone() })));
//!
//! // Deliver everything, in order, until neither engine has more to say.
//! let mut found = false;
//! while let Some((to, input)) = queue.pop_front() {
//!     let out = engines[to].handle(now, input);
//!     found |= out.completed.iter().any(|(_, r)| matches!(r, CommandResult::Find(Ok(_))));
//!     route(to, out, &stores[to], &mut queue);
//! }
//!
//! // Quiet: Bob holds what Alice wrote.
//! assert!(found);
//! let doc = engines[1].document(&id).expect("Bob has the document");
//! let (value, _) = doc.get(ROOT, "greeting").expect("readable").expect("present");
//! assert_eq!(value.to_str(), Some("hello"));
//! ```

#![deny(missing_docs)]

pub mod context;
pub mod engine;
#[cfg(any(test, feature = "test-support"))]
pub mod fuzz;
pub mod storage;
pub mod wire;
