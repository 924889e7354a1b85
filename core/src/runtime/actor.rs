//! The actor: the one task that owns the engine (see the [module
//! docs](super)).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use automerge::Automerge;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::clock::Clock;
use super::outbound::ConnTx;
use super::storage_thread::spawn_storage_thread;
use super::{RepoConfig, Session};
use crate::engine::{
    Acl, ChangeError, Command, CommandId, CommandResult, ConnectionId, CreateError, Direction,
    Engine, Event, FindError, Grant, Input, Output, Timestamp,
};
use crate::storage::{Storage, StorageOp, StorageResult, TaskId};
use crate::wire::{self, DocumentId};

/// A read of a document, run inside the actor.
type Reader = Box<dyn FnOnce(Option<&Automerge>) + Send>;
/// An edit of a document, run inside the actor.
type Editor = Box<dyn FnOnce(&mut Automerge) + Send>;
/// A look at the engine's state, run inside the actor.
type Inspector = Box<dyn FnOnce(&Engine) + Send>;

/// What the actor is told.
pub(super) enum Msg {
    Command(Command, Responder),
    Change(DocumentId, Editor, oneshot::Sender<Result<(), ChangeError>>),
    Read(DocumentId, Reader),
    Inspect(Inspector),
    Opened(ConnectionId, Direction, ConnTx, Option<String>, Arc<Grant>),
    Sessions(oneshot::Sender<Vec<Session>>),
    Bytes(ConnectionId, Vec<u8>),
    Closed(ConnectionId),
    Shutdown(oneshot::Sender<()>),
}

/// Who waits for a command's result, typed by the command: the engine
/// answers each command with its own [`CommandResult`] variant.
pub(super) enum Responder {
    Create(oneshot::Sender<Result<DocumentId, CreateError>>),
    Find(oneshot::Sender<Result<DocumentId, FindError>>),
    Broadcast(oneshot::Sender<usize>),
    Saved(oneshot::Sender<()>),
    Revoked(oneshot::Sender<usize>),
    ChunkApplied(oneshot::Sender<bool>),
    AccessSet(oneshot::Sender<Option<Acl>>),
}

impl Responder {
    /// Hands the result over (nobody may be waiting any more: fine).
    fn answer(self, result: CommandResult) {
        match (self, result) {
            (Responder::Create(tx), CommandResult::Create(r)) => drop(tx.send(r)),
            (Responder::Find(tx), CommandResult::Find(r)) => drop(tx.send(r)),
            (Responder::Broadcast(tx), CommandResult::Broadcast(n)) => drop(tx.send(n)),
            (Responder::Saved(tx), CommandResult::Saved(_)) => drop(tx.send(())),
            (Responder::Revoked(tx), CommandResult::Revoked(n)) => drop(tx.send(n)),
            (Responder::ChunkApplied(tx), CommandResult::ChunkApplied(c)) => drop(tx.send(c)),
            (Responder::AccessSet(tx), CommandResult::AccessSet(acl)) => drop(tx.send(acl)),
            // The engine answers each command with its own variant; were
            // that broken, the caller would see the repo as stopped.
            (_, result) => tracing::error!(?result, "a command got another command's result"),
        }
    }
}

/// What the actor keeps per connection, from `open_connection` until the
/// transport says it closed: one record (a relay holds tens of thousands).
struct Link {
    /// Its frames' queue; `None` once the engine closed or cut it.
    tx: Option<ConnTx>,
    /// The network address, when the transport knows it.
    address: Option<String>,
    /// What it may do (its subject is listed in sessions).
    grant: Arc<Grant>,
    /// Set once the handshake completed.
    joined: Option<Joined>,
}

/// A completed handshake, for session listings.
struct Joined {
    peer_id: crate::wire::PeerId,
    storage_id: Option<crate::wire::StorageId>,
    ephemeral: bool,
    since_ms: u64,
}

impl Link {
    fn session(&self) -> Option<Session> {
        let joined = self.joined.as_ref()?;
        Some(Session {
            peer_id: joined.peer_id.clone(),
            storage_id: joined.storage_id.clone(),
            ephemeral: joined.ephemeral,
            remote: self.address.clone(),
            subject: self.grant.subject.clone(),
            connected_since_ms: joined.since_ms,
        })
    }
}

/// `Msg` holds closures, which are not `Debug`; this wrapper is.
pub(super) struct MsgBox(pub(super) Msg);

impl std::fmt::Debug for MsgBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

/// Most network messages (or local edits) handed to the engine as one batch.
const MAX_BATCH: usize = 256;

/// Adds to `batch` whatever queued messages `pick` takes, up to
/// [`MAX_BATCH`], without waiting. The first message `pick` gives back ends
/// the batch and is kept in `carried`, to be handled next.
fn take_more<T>(
    rx: &mut mpsc::UnboundedReceiver<MsgBox>,
    carried: &mut Option<MsgBox>,
    batch: &mut Vec<T>,
    pick: impl Fn(Msg) -> Result<T, Msg>,
) {
    while batch.len() < MAX_BATCH {
        let Ok(MsgBox(msg)) = rx.try_recv() else {
            return;
        };
        match pick(msg) {
            Ok(item) => batch.push(item),
            Err(other) => {
                *carried = Some(MsgBox(other));
                return;
            }
        }
    }
}

/// Owns the engine; see the [module docs](super).
pub(super) struct Actor {
    engine: Engine,
    clock: Arc<dyn Clock>,
    links: BTreeMap<ConnectionId, Link>,
    outbound_limit: (usize, Duration),
    pending: BTreeMap<CommandId, Responder>,
    next_cmd: u64,
    events: broadcast::Sender<Event>,
    storage_tx: Option<std::sync::mpsc::Sender<(TaskId, StorageOp)>>,
    /// Finished storage tasks, on their own channel: they are answered
    /// ahead of everything queued, since the messages they release (see
    /// the engine's durability machine) should not wait behind new work.
    storage_results: mpsc::UnboundedReceiver<(TaskId, StorageResult)>,
    storage_thread: Option<std::thread::JoinHandle<()>>,
    in_flight_storage: usize,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Actor {
    /// An actor for a new repo, with its storage thread started.
    pub(super) fn new(
        config: RepoConfig,
        storage: Arc<dyn Storage>,
        events: broadcast::Sender<Event>,
    ) -> Self {
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let (storage_tx, storage_thread) = spawn_storage_thread(storage, results_tx);
        Actor {
            outbound_limit: (config.max_outbound_bytes, config.outbound_grace),
            engine: Engine::new(config.engine),
            clock: config.clock,
            links: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_cmd: 0,
            events,
            storage_tx: Some(storage_tx),
            storage_results: results_rx,
            storage_thread: Some(storage_thread),
            in_flight_storage: 0,
            shutdown: None,
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<MsgBox>) {
        let mut wake: Option<Timestamp> = None;
        // A message taken from the queue while batching, to handle next.
        let mut carried: Option<MsgBox> = None;
        loop {
            if self.shutdown.is_some() && self.in_flight_storage == 0 {
                // Close the storage thread's queue and wait for it, so the
                // store is released (and reopenable) when shutdown returns.
                self.storage_tx = None;
                if let Some(thread) = self.storage_thread.take() {
                    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                }
                if let Some(done) = self.shutdown.take() {
                    let _ = done.send(());
                }
                return;
            }
            if let Ok(first) = self.storage_results.try_recv() {
                wake = self.storage_done(first);
                continue;
            }
            let msg = match (carried.take(), wake) {
                (Some(m), _) => Some(m),
                (None, Some(at)) => {
                    // A due timer goes ahead of messages: whatever is sent
                    // after the clock passed a deadline finds it handled
                    // (a test on a manual clock relies on that).
                    tokio::select! {
                        biased;
                        Some(done) = self.storage_results.recv() => {
                            wake = self.storage_done(done);
                            continue;
                        }
                        _ = self.clock.sleep_until(at) => {
                            let out = self.engine.handle(self.clock.now(), Input::Tick);
                            wake = self.act(out);
                            continue;
                        }
                        m = rx.recv() => m,
                    }
                }
                (None, None) => tokio::select! {
                    biased;
                    Some(done) = self.storage_results.recv() => {
                        wake = self.storage_done(done);
                        continue;
                    }
                    m = rx.recv() => m,
                },
            };
            let Some(MsgBox(msg)) = msg else { return };
            let now = self.clock.now();
            let out = match msg {
                Msg::Command(command, reply) => {
                    self.next_cmd += 1;
                    let id = CommandId(self.next_cmd);
                    self.pending.insert(id, reply);
                    self.engine.handle(now, Input::Command(id, command))
                }
                Msg::Change(doc, f, reply) => {
                    // Edits queued back to back (an editor handing over
                    // keystrokes) run as one batch: saved and synced once.
                    let mut edits = vec![(doc, f, reply)];
                    take_more(&mut rx, &mut carried, &mut edits, |msg| match msg {
                        Msg::Change(doc, f, reply) => Ok((doc, f, reply)),
                        other => Err(other),
                    });
                    let (edits, replies): (Vec<_>, Vec<_>) = edits
                        .into_iter()
                        .map(|(doc, f, reply)| ((doc, f), reply))
                        .unzip();
                    let (results, out) = self.engine.change_many(
                        now,
                        edits.into_iter().map(|(doc, f)| {
                            (doc, move |am: &mut Automerge| {
                                // A panicking closure must not take the repo down.
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(am)))
                                    .is_ok()
                            })
                        }),
                    );
                    for (result, reply) in results.into_iter().zip(replies) {
                        let _ = reply.send(match result {
                            Ok(true) => Ok(()),
                            Ok(false) => Err(ChangeError::Panicked),
                            Err(e) => Err(e),
                        });
                    }
                    out
                }
                Msg::Inspect(f) => {
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&self.engine)))
                        .is_err()
                    {
                        tracing::error!("an engine inspection panicked; the repo carries on");
                    }
                    continue;
                }
                Msg::Read(doc, f) => {
                    let doc = self.engine.document(&doc);
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(doc))).is_err() {
                        tracing::error!("a document read panicked; the repo carries on");
                    }
                    continue;
                }
                Msg::Opened(conn, direction, tx, address, grant) => {
                    let link = Link {
                        tx: Some(tx),
                        address,
                        grant: grant.clone(),
                        joined: None,
                    };
                    self.links.insert(conn, link);
                    self.engine.handle(
                        now,
                        Input::Connected {
                            conn,
                            direction,
                            grant,
                        },
                    )
                }
                Msg::Bytes(conn, bytes) => {
                    // Take whatever else arrived meanwhile and answer it as
                    // one batch (see `Engine::handle_batch`).
                    let mut inputs = vec![Input::Received { conn, bytes }];
                    take_more(&mut rx, &mut carried, &mut inputs, |msg| match msg {
                        Msg::Bytes(conn, bytes) => Ok(Input::Received { conn, bytes }),
                        other => Err(other),
                    });
                    self.engine.handle_batch(now, inputs)
                }
                Msg::Sessions(reply) => {
                    let _ = reply.send(self.links.values().filter_map(Link::session).collect());
                    continue;
                }
                Msg::Closed(conn) => {
                    self.links.remove(&conn);
                    self.engine.handle(now, Input::Disconnected { conn })
                }
                Msg::Shutdown(done) => {
                    // Close every connection so transports wind down (and
                    // release what they hold) while storage drains.
                    for tx in self.links.values_mut().filter_map(|l| l.tx.take()) {
                        tx.close(crate::engine::close_code::NORMAL, "shutting down".into());
                    }
                    self.shutdown = Some(done);
                    continue;
                }
            };
            wake = self.act(out);
        }
    }

    /// Answers finished storage tasks: `first` and whatever else finished
    /// with it. A group commit finishes many at once; answered together, the
    /// messages they held leave as one batch.
    fn storage_done(&mut self, first: (TaskId, StorageResult)) -> Option<Timestamp> {
        let mut inputs = vec![Input::Storage {
            task: first.0,
            result: first.1,
        }];
        while inputs.len() < MAX_BATCH {
            let Ok((task, result)) = self.storage_results.try_recv() else {
                break;
            };
            inputs.push(Input::Storage { task, result });
        }
        self.in_flight_storage = self.in_flight_storage.saturating_sub(inputs.len());
        let out = self.engine.handle_batch(self.clock.now(), inputs);
        self.act(out)
    }

    fn act(&mut self, out: Output) -> Option<Timestamp> {
        for send in out.sends {
            let Some(conn) = self.links.get(&send.conn).and_then(|l| l.tx.as_ref()) else {
                continue;
            };
            if conn
                .push(wire::encode(&send.message), self.outbound_limit)
                .is_err()
            {
                // The peer reads more slowly than it is sent to: cut it off
                // (ahead of what waits) rather than hold ever more for it
                // or drop frames and leave it silently out of sync.
                if let Some(conn) = self.links.get_mut(&send.conn).and_then(|l| l.tx.take()) {
                    let (limit, grace) = self.outbound_limit;
                    let reason = format!(
                        "over {limit} bytes waited more than {} s: the peer reads too slowly",
                        grace.as_secs_f64()
                    );
                    tracing::warn!(conn = %send.conn, %reason, "disconnecting a slow peer");
                    conn.cut(reason);
                }
            }
        }
        for close in out.closes {
            if let Some(conn) = self.links.get_mut(&close.conn).and_then(|l| l.tx.take()) {
                let code = close.reason.code();
                tracing::info!(conn = %close.conn, code, reason = %close.reason, "closing connection");
                conn.close(code, close.reason.to_string());
            }
        }
        for task in out.storage {
            self.in_flight_storage += 1;
            let sent = self
                .storage_tx
                .as_ref()
                .is_some_and(|tx| tx.send((task.id, task.op)).is_ok());
            if !sent {
                self.in_flight_storage -= 1;
                tracing::error!("storage thread is gone");
            }
        }
        for (id, result) in out.completed {
            if let Some(reply) = self.pending.remove(&id) {
                reply.answer(result);
            }
        }
        for event in out.events {
            match &event {
                Event::PeerConnected {
                    conn,
                    peer_id,
                    metadata,
                } => {
                    let since_ms = self.clock.now().0;
                    if let Some(link) = self.links.get_mut(conn) {
                        link.joined = Some(Joined {
                            peer_id: peer_id.clone(),
                            storage_id: metadata.storage_id.clone(),
                            ephemeral: metadata.ephemeral(),
                            since_ms,
                        });
                    }
                }
                Event::PeerDisconnected { conn, .. } => {
                    if let Some(link) = self.links.get_mut(conn) {
                        link.joined = None;
                    }
                }
                _ => {}
            }
            if let Event::CorruptChunk {
                document_id,
                key,
                reason,
            } = &event
            {
                tracing::error!(document = %document_id, %key, %reason, "corrupt chunk skipped");
            }
            let _ = self.events.send(event);
        }
        out.next_wakeup
    }
}
