//! The tokio runtime: [`Repo`] and [`DocHandle`] drive an [`Engine`].
//!
//! One actor task owns the engine. Everything else talks to it through a
//! channel: handles send commands and edits, connection tasks send the
//! frames they read, the storage thread sends finished tasks. The actor
//! feeds each into the engine and acts on the output: frames go to each
//! connection's outbound queue, storage tasks to the storage thread (which
//! performs them one by one, in order), events to subscribers. When nothing
//! arrives it sleeps until the engine's next wake-up.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod context;
mod presence;
mod storage_thread;

pub use context::{Context, ContextEvent, Subscription, View};
pub use presence::{Presence, PresenceConfig, PresenceEvent};

use automerge::{Automerge, ChangeHash};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::engine::{
    ChangeError, Command, CommandId, CommandResult, ConnectionId, Direction, DocStatus, Engine,
    EngineConfig, Event, Input, Output, SyncStatus, Timestamp,
};
use crate::storage::{Storage, StorageKey, StorageOp, StorageResult, TaskId};
use crate::wire::{self, DocumentId, PeerId, StorageId};
use storage_thread::spawn_storage_thread;

/// What a connection task is told to do by the repo.
#[derive(Debug)]
pub enum Outbound {
    /// Send one binary frame.
    Frame(Vec<u8>),
    /// Close the connection with this reason.
    Close(String),
}

/// What the repo sends down one connection: frames and orderly closes in
/// order, and — ahead of anything still waiting — the news that the peer is
/// cut off (it fell too far behind reading). One small shared lane per
/// connection: with tens of thousands of idle connections, a channel's
/// preallocated block each (about a KiB) is a tenth of what one costs.
#[derive(Debug)]
pub struct OutboundQueue {
    lane: Arc<Lane>,
}

/// What [`OutboundQueue::next`] found.
#[derive(Debug)]
pub enum Next {
    /// The peer is cut off, for this reason: close at once.
    Cut(String),
    /// The next item, in order.
    Item(Outbound),
    /// The repo let go of the connection and nothing is left.
    Released,
}

/// The state both ends of a connection's queue share.
#[derive(Debug)]
struct Lane {
    items: std::sync::Mutex<LaneItems>,
    wake: tokio::sync::Notify,
    /// Bytes of frames queued and not yet taken by the transport.
    bytes: AtomicUsize,
    /// The limit those bytes are held to (set when the repo queues).
    limit: AtomicUsize,
    /// When (ms after `since`) the queue was last seen at or under it.
    under_at: AtomicU64,
    since: Instant,
}

#[derive(Debug, Default)]
struct LaneItems {
    queue: std::collections::VecDeque<Outbound>,
    cut: Option<String>,
    released: bool,
}

impl Lane {
    fn new() -> Self {
        Self {
            items: std::sync::Mutex::new(LaneItems::default()),
            wake: tokio::sync::Notify::new(),
            bytes: AtomicUsize::new(0),
            limit: AtomicUsize::new(usize::MAX),
            under_at: AtomicU64::new(0),
            since: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    /// Runs `f` on the shared items (a poisoned lock is still usable: the
    /// items are plain data) and wakes the transport.
    fn update(&self, f: impl FnOnce(&mut LaneItems)) {
        f(&mut self.items.lock().unwrap_or_else(|p| p.into_inner()));
        self.wake.notify_one();
    }

    fn take(&self, cut_first: bool) -> Option<Next> {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if cut_first {
            if let Some(reason) = items.cut.take() {
                return Some(Next::Cut(reason));
            }
        }
        match items.queue.pop_front() {
            Some(item) => {
                if items.queue.is_empty() && items.queue.capacity() > 16 {
                    // Give back what a burst grew.
                    items.queue = Default::default();
                }
                drop(items);
                if let Outbound::Frame(bytes) = &item {
                    let left = self.bytes.fetch_sub(bytes.len(), Ordering::Relaxed) - bytes.len();
                    if left <= self.limit.load(Ordering::Relaxed) {
                        self.under_at.store(self.now_ms(), Ordering::Relaxed);
                    }
                }
                Some(Next::Item(item))
            }
            None if items.released => Some(Next::Released),
            None => None,
        }
    }
}

impl OutboundQueue {
    /// Waits for the next thing to do: a cut goes ahead of queued items.
    pub async fn next(&mut self) -> Next {
        loop {
            // Taken before looking: a wake-up in between is not lost.
            let woken = self.lane.wake.notified();
            if let Some(next) = self.lane.take(true) {
                return next;
            }
            woken.await;
        }
    }

    /// The next queued item, if one is waiting now (a cut is left for
    /// [`OutboundQueue::next`] or [`CutSignal::cut`]).
    pub fn try_next(&mut self) -> Option<Outbound> {
        match self.lane.take(false) {
            Some(Next::Item(item)) => Some(item),
            _ => None,
        }
    }

    /// A handle that resolves when the peer is cut off, to race writes with.
    pub fn cut_signal(&self) -> CutSignal {
        CutSignal {
            lane: self.lane.clone(),
        }
    }
}

/// See [`OutboundQueue::cut_signal`].
#[derive(Debug)]
pub struct CutSignal {
    lane: Arc<Lane>,
}

impl CutSignal {
    /// Resolves with the reason once the peer is cut off.
    pub async fn cut(&self) -> String {
        loop {
            let woken = self.lane.wake.notified();
            let taken = self
                .lane
                .items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .cut
                .take();
            if let Some(reason) = taken {
                return reason;
            }
            woken.await;
            // Whatever else woke us (a new frame) is found by `next`, which
            // looks before it waits.
        }
    }
}

/// The repo's end of one connection's queue.
#[derive(Debug)]
struct ConnTx {
    lane: Arc<Lane>,
}

impl ConnTx {
    /// Queues a frame, unless more than `limit` bytes have been waiting for
    /// longer than `grace`; then hands it back.
    fn push(&self, frame: Vec<u8>, (limit, grace): (usize, Duration)) -> Result<(), Vec<u8>> {
        let w = &self.lane;
        w.limit.store(limit, Ordering::Relaxed);
        let len = frame.len();
        let before = w.bytes.fetch_add(len, Ordering::Relaxed);
        let now = w.now_ms();
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        if before == 0 || before + len <= limit {
            w.under_at.store(now, Ordering::Relaxed);
        } else if now.saturating_sub(w.under_at.load(Ordering::Relaxed)) > grace_ms {
            w.bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(frame);
        }
        w.update(|items| items.queue.push_back(Outbound::Frame(frame)));
        Ok(())
    }

    /// Queues an orderly close behind everything already queued.
    fn close(&self, reason: String) {
        self.lane
            .update(|items| items.queue.push_back(Outbound::Close(reason)));
    }

    /// Cuts the peer off, ahead of whatever waits.
    fn cut(&self, reason: String) {
        self.lane.update(|items| items.cut = Some(reason));
    }
}

impl Drop for ConnTx {
    fn drop(&mut self) {
        self.lane.update(|items| items.released = true);
    }
}

/// Why a repo call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// Nobody (storage or any peer) has the document.
    #[error("document {0} is unavailable")]
    Unavailable(DocumentId),
    /// The document could not be edited.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// A Context API operation was refused (bad path, wrong type…).
    #[error(transparent)]
    Context(#[from] crate::context::ContextError),
    /// The command failed.
    #[error("{0}")]
    Failed(String),
    /// The repo has shut down.
    #[error("the repo has shut down")]
    Stopped,
}

/// A read of a document, run inside the actor.
type Reader = Box<dyn FnOnce(Option<&Automerge>) + Send>;
/// An edit of a document, run inside the actor.
type Editor = Box<dyn FnOnce(&mut Automerge) + Send>;
/// A look at the engine's state, run inside the actor.
type Inspector = Box<dyn FnOnce(&Engine) + Send>;

enum Msg {
    Command(Command, oneshot::Sender<CommandResult>),
    Change(DocumentId, Editor, oneshot::Sender<Result<(), ChangeError>>),
    Read(DocumentId, Reader),
    Inspect(Inspector),
    Opened(ConnectionId, Direction, ConnTx, Option<String>),
    Sessions(oneshot::Sender<Vec<Session>>),
    Bytes(ConnectionId, Vec<u8>),
    Closed(ConnectionId),
    Shutdown(oneshot::Sender<()>),
}

/// One connected peer: a session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Session {
    /// The peer's id.
    pub peer_id: PeerId,
    /// Its storage id, if it has storage.
    pub storage_id: Option<StorageId>,
    /// Whether it said it keeps nothing.
    pub ephemeral: bool,
    /// Its network address, when the transport knows it.
    pub remote: Option<String>,
    /// When the handshake completed, ms since the epoch.
    pub connected_since_ms: u64,
}

/// Builds a [`Repo`].
#[derive(Debug, Clone)]
pub struct RepoConfig {
    /// The engine's configuration (peer id, policy, limits…).
    pub engine: EngineConfig,
    /// Most bytes of frames that may wait to be written to one connection
    /// for longer than [`RepoConfig::outbound_grace`]: a peer whose queue
    /// stays above this that long reads more slowly than it is sent to and
    /// is disconnected. (Bursts above it that drain in time are fine, and a
    /// single frame of any allowed size goes out when nothing else waits.)
    pub max_outbound_bytes: usize,
    /// How long a connection's queue may stay above
    /// [`RepoConfig::max_outbound_bytes`].
    pub outbound_grace: Duration,
}

/// The default for [`RepoConfig::max_outbound_bytes`].
pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 16 << 20;
/// The default for [`RepoConfig::outbound_grace`].
pub const DEFAULT_OUTBOUND_GRACE: Duration = Duration::from_secs(10);

impl RepoConfig {
    /// A client repo with a random peer id. `storage_id` should be stable
    /// for persistent storage; see [`load_or_create_storage_id`].
    pub fn new(storage_id: Option<StorageId>) -> Self {
        // The peer id is public; the engine's seed must not follow from it.
        let peer = PeerId::new(&format!("converge-{:016x}", random_seed())).unwrap_or_else(|_| {
            // The name above is always 26 ASCII bytes, which is valid.
            unreachable_peer()
        });
        Self {
            engine: EngineConfig::new(peer, storage_id, random_seed()),
            max_outbound_bytes: DEFAULT_MAX_OUTBOUND_BYTES,
            outbound_grace: DEFAULT_OUTBOUND_GRACE,
        }
    }
}

fn unreachable_peer() -> PeerId {
    PeerId::new("converge").unwrap_or_else(|e| panic!("static peer id is valid: {e}"))
}

/// A random u64 from the OS (via the standard library's hash seeds).
pub fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// Reads the store's storage id, creating and saving a fresh UUID-shaped
/// one the first time (automerge-repo keeps it under `storage-adapter-id`).
pub fn load_or_create_storage_id(storage: &dyn Storage) -> Result<StorageId, RepoError> {
    let key = StorageKey::new(["storage-adapter-id"]);
    let existing = storage
        .get(&key)
        .map_err(|e| RepoError::Failed(e.to_string()))?;
    if let Some(bytes) = existing {
        if let Some(id) = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| StorageId::new(s).ok())
        {
            return Ok(id);
        }
    }
    let (a, b) = (random_seed(), random_seed());
    let text = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    );
    storage
        .batch(vec![crate::storage::BatchOp::Put(
            key,
            text.clone().into_bytes(),
        )])
        .map_err(|e| RepoError::Failed(e.to_string()))?;
    StorageId::new(&text).map_err(|e| RepoError::Failed(e.to_string()))
}

/// A running repo. Cheap to clone; every clone talks to the same engine.
#[derive(Clone, Debug)]
pub struct Repo {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tx: mpsc::UnboundedSender<MsgBox>,
    events: broadcast::Sender<Event>,
    peer_id: PeerId,
    next_conn: AtomicU64,
    /// For reads outside the engine (listing documents); released on
    /// shutdown so the store can be reopened at once.
    storage: std::sync::Mutex<Option<Arc<dyn Storage>>>,
}

/// `Msg` holds closures, which are not `Debug`; this wrapper is.
struct MsgBox(Msg);

impl std::fmt::Debug for MsgBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Repo {
    /// Starts a repo on the current tokio runtime over `storage`.
    pub fn start(config: RepoConfig, storage: Arc<dyn Storage>) -> Repo {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let peer_id = config.engine.peer_id.clone();
        // When every handle is dropped the channel closes and the actor
        // ends, dropping the storage queue's sender: the thread drains its
        // queue and releases the store, with or without `shutdown`.
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let (storage_tx, storage_thread) = spawn_storage_thread(storage.clone(), results_tx);
        let actor = Actor {
            outbound_limit: (config.max_outbound_bytes, config.outbound_grace),
            engine: Engine::new(config.engine),
            remotes: BTreeMap::new(),
            sessions: BTreeMap::new(),
            clock: Clock::new(),
            conns: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_cmd: 0,
            events: events.clone(),
            storage_tx: Some(storage_tx),
            storage_results: results_rx,
            storage_thread: Some(storage_thread),
            in_flight_storage: 0,
            shutdown: None,
        };
        tokio::spawn(actor.run(rx));
        Repo {
            inner: Arc::new(Inner {
                tx,
                events,
                peer_id,
                next_conn: AtomicU64::new(1),
                storage: std::sync::Mutex::new(Some(storage)),
            }),
        }
    }

    /// Our peer id.
    pub fn peer_id(&self) -> &PeerId {
        &self.inner.peer_id
    }

    fn send(&self, msg: Msg) -> Result<(), RepoError> {
        self.inner
            .tx
            .send(MsgBox(msg))
            .map_err(|_| RepoError::Stopped)
    }

    async fn command(&self, command: Command) -> Result<CommandResult, RepoError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Command(command, tx))?;
        rx.await.map_err(|_| RepoError::Stopped)
    }

    /// Creates a document (empty, or from `Automerge::save` bytes).
    pub async fn create(&self, initial: Option<Vec<u8>>) -> Result<DocHandle, RepoError> {
        match self.command(Command::Create { initial }).await? {
            CommandResult::Created(id) => Ok(self.handle(id)),
            CommandResult::Failed(e) => Err(RepoError::Failed(e)),
            other => Err(RepoError::Failed(format!("unexpected result {other:?}"))),
        }
    }

    /// Finds a document in storage or at peers. Never hangs: if nobody has
    /// it, this returns [`RepoError::Unavailable`] (the repo keeps wanting
    /// it; [`Repo::events`] reports when it arrives).
    pub async fn find(&self, id: &DocumentId) -> Result<DocHandle, RepoError> {
        match self
            .command(Command::Find {
                document_id: id.clone(),
            })
            .await?
        {
            CommandResult::Found(id) => Ok(self.handle(id)),
            CommandResult::Unavailable(id) => Err(RepoError::Unavailable(id)),
            CommandResult::Failed(e) => Err(RepoError::Failed(e)),
            other => Err(RepoError::Failed(format!("unexpected result {other:?}"))),
        }
    }

    /// A handle on a document without looking it up.
    pub fn handle(&self, id: DocumentId) -> DocHandle {
        DocHandle {
            repo: self.clone(),
            id,
        }
    }

    /// Runs `f` on the engine inside the actor and returns what it returns.
    async fn inspect<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> R + Send + 'static,
    ) -> Result<R, RepoError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Inspect(Box::new(move |engine| {
            let _ = tx.send(f(engine));
        })))?;
        rx.await.map_err(|_| RepoError::Stopped)
    }

    /// Every document this repo holds: in storage or in memory (ready).
    pub async fn documents(&self) -> Result<Vec<DocumentId>, RepoError> {
        let in_memory = self
            .inspect(|engine| {
                engine
                    .documents()
                    .filter(|(_, status)| *status == DocStatus::Ready)
                    .map(|(id, _)| id.clone())
                    .collect::<Vec<_>>()
            })
            .await?;
        let storage = self
            .inner
            .storage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(RepoError::Stopped)?;
        let mut ids = tokio::task::spawn_blocking(move || crate::storage::document_ids(&*storage))
            .await
            .map_err(|e| RepoError::Failed(format!("listing documents failed: {e}")))?
            .map_err(|e| RepoError::Failed(format!("listing documents failed: {e}")))?;
        ids.extend(in_memory);
        Ok(ids.into_iter().collect())
    }

    /// Every engine event, as it happens.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Registers a new connection; returns its id and the queue of frames
    /// to write to it. Transports call this, then [`Repo::received`] for
    /// every frame read and [`Repo::closed`] at the end.
    pub fn open_connection(
        &self,
        direction: Direction,
        remote: Option<String>,
    ) -> Result<(ConnectionId, OutboundQueue), RepoError> {
        let conn = ConnectionId(self.inner.next_conn.fetch_add(1, Ordering::Relaxed));
        let lane = Arc::new(Lane::new());
        let sender = ConnTx { lane: lane.clone() };
        self.send(Msg::Opened(conn, direction, sender, remote))?;
        Ok((conn, OutboundQueue { lane }))
    }

    /// Every connection that completed the handshake: a session each.
    pub async fn sessions(&self) -> Result<Vec<Session>, RepoError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Sessions(tx))?;
        rx.await.map_err(|_| RepoError::Stopped)
    }

    /// A frame arrived on a connection.
    pub fn received(&self, conn: ConnectionId, bytes: Vec<u8>) {
        let _ = self.send(Msg::Bytes(conn, bytes));
    }

    /// A connection ended.
    pub fn closed(&self, conn: ConnectionId) {
        let _ = self.send(Msg::Closed(conn));
    }

    /// Stops the repo after every storage task already issued is done.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        self.inner
            .storage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// A document in a [`Repo`].
#[derive(Clone, Debug)]
pub struct DocHandle {
    pub(crate) repo: Repo,
    id: DocumentId,
}

impl DocHandle {
    /// The document's id.
    pub fn id(&self) -> &DocumentId {
        &self.id
    }

    /// The document's `automerge:` URL.
    pub fn url(&self) -> String {
        self.id.url().to_string()
    }

    /// The Context API on this document.
    pub fn context(&self) -> Context {
        Context::new(self.clone())
    }

    /// Edits the document; the change is saved and synced.
    ///
    /// The edit is queued when this is called, not when the future is first
    /// polled: an editor can hand over keystrokes one after another without
    /// waiting for each (they run in call order) and collect the results
    /// later. Dropping the future does not cancel the edit.
    pub fn change<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Automerge) -> R + Send + 'static,
    ) -> impl std::future::Future<Output = Result<R, RepoError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let (rtx, rrx) = oneshot::channel();
        let f = Box::new(move |doc: &mut Automerge| {
            let _ = rtx.send(f(doc));
        });
        let queued = self.repo.send(Msg::Change(self.id.clone(), f, tx));
        async move {
            queued?;
            rx.await.map_err(|_| RepoError::Stopped)??;
            rrx.await.map_err(|_| RepoError::Stopped)
        }
    }

    /// Reads the document; `None` if it is not in memory as a document.
    pub async fn with_doc<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Automerge) -> R + Send + 'static,
    ) -> Result<Option<R>, RepoError> {
        let (tx, rx) = oneshot::channel();
        let f = Box::new(move |doc: Option<&Automerge>| {
            let _ = tx.send(doc.map(f));
        });
        self.repo.send(Msg::Read(self.id.clone(), f))?;
        rx.await.map_err(|_| RepoError::Stopped)
    }

    /// The repo this handle belongs to.
    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// How far each connected peer has synced this document, and whether
    /// every change is saved locally. `None` if it is not in memory.
    pub async fn sync_status(&self) -> Result<Option<SyncStatus>, RepoError> {
        let id = self.id.clone();
        self.repo
            .inspect(move |engine| engine.sync_status(&id))
            .await
    }

    /// Waits until the document is [synced](SyncStatus::synced): saved,
    /// and every connected peer (at least one) has our heads. Looks again
    /// on every repo event and at least every 50 ms. `Ok(None)` if the
    /// document is not in memory, `Ok(Some(false))` if `timeout` passed.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<Option<bool>, RepoError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.repo.events();
        loop {
            match self.sync_status().await? {
                None => return Ok(None),
                Some(status) if status.synced() => return Ok(Some(true)),
                Some(_) => {}
            }
            tokio::select! {
                event = events.recv() => {
                    if let Err(broadcast::error::RecvError::Closed) = event {
                        return Err(RepoError::Stopped);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Some(false)),
            }
        }
    }

    /// Waits until every change made to the document so far is on disk
    /// (fsynced, if the storage syncs writes).
    pub async fn saved(&self) -> Result<(), RepoError> {
        // The engine answers once the writes holding today's changes are
        // confirmed; changes arriving meanwhile do not delay the answer.
        match self
            .repo
            .command(Command::WhenSaved {
                document_id: self.id.clone(),
            })
            .await?
        {
            CommandResult::Saved(_) => Ok(()),
            other => Err(RepoError::Failed(format!("unexpected result {other:?}"))),
        }
    }

    /// The document's heads.
    pub async fn heads(&self) -> Result<Vec<ChangeHash>, RepoError> {
        let id = self.id.clone();
        Ok(self
            .repo
            .inspect(move |engine| engine.heads(&id))
            .await?
            .unwrap_or_default())
    }

    /// Sends ephemeral data to the document's peers; returns how many.
    pub async fn broadcast(&self, data: Vec<u8>) -> Result<usize, RepoError> {
        match self
            .repo
            .command(Command::Broadcast {
                document_id: self.id.clone(),
                data,
            })
            .await?
        {
            CommandResult::Broadcast(n) => Ok(n),
            other => Err(RepoError::Failed(format!("unexpected result {other:?}"))),
        }
    }

    /// Waits until the document's heads change (from anywhere) and returns
    /// the new heads.
    pub async fn changed(
        &self,
        events: &mut broadcast::Receiver<Event>,
    ) -> Result<Vec<ChangeHash>, RepoError> {
        loop {
            match events.recv().await {
                Ok(Event::DocChanged {
                    document_id, heads, ..
                }) if document_id == self.id => return Ok(heads),
                Err(broadcast::error::RecvError::Lagged(_)) => return self.heads().await,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Closed) => return Err(RepoError::Stopped),
            }
        }
    }
}

/// Milliseconds since the epoch, monotonic within the process.
#[derive(Debug)]
struct Clock {
    start: Instant,
    epoch_ms: u64,
}

impl Clock {
    fn new() -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        Self {
            start: Instant::now(),
            epoch_ms,
        }
    }

    fn now(&self) -> Timestamp {
        Timestamp(self.epoch_ms + self.start.elapsed().as_millis() as u64)
    }

    fn instant_of(&self, t: Timestamp) -> Instant {
        self.start + Duration::from_millis(t.0.saturating_sub(self.epoch_ms))
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

struct Actor {
    engine: Engine,
    remotes: BTreeMap<ConnectionId, String>,
    sessions: BTreeMap<ConnectionId, Session>,
    clock: Clock,
    conns: BTreeMap<ConnectionId, ConnTx>,
    outbound_limit: (usize, Duration),
    pending: BTreeMap<CommandId, oneshot::Sender<CommandResult>>,
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
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<MsgBox>) {
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
                    let deadline = tokio::time::Instant::from_std(self.clock.instant_of(at));
                    tokio::select! {
                        biased;
                        Some(done) = self.storage_results.recv() => {
                            wake = self.storage_done(done);
                            continue;
                        }
                        m = rx.recv() => m,
                        _ = tokio::time::sleep_until(deadline) => {
                            let out = self.engine.handle(self.clock.now(), Input::Tick);
                            wake = self.act(out);
                            continue;
                        }
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
                Msg::Opened(conn, direction, tx, remote) => {
                    self.conns.insert(conn, tx);
                    if let Some(remote) = remote {
                        self.remotes.insert(conn, remote);
                    }
                    self.engine
                        .handle(now, Input::Connected { conn, direction })
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
                    let _ = reply.send(self.sessions.values().cloned().collect());
                    continue;
                }
                Msg::Closed(conn) => {
                    self.conns.remove(&conn);
                    self.remotes.remove(&conn);
                    self.engine.handle(now, Input::Disconnected { conn })
                }
                Msg::Shutdown(done) => {
                    // Close every connection so transports wind down (and
                    // release what they hold) while storage drains.
                    for (_, conn) in std::mem::take(&mut self.conns) {
                        conn.close("shutting down".into());
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
            let Some(conn) = self.conns.get(&send.conn) else {
                continue;
            };
            if conn
                .push(wire::encode(&send.message), self.outbound_limit)
                .is_err()
            {
                // The peer reads more slowly than it is sent to: cut it off
                // (ahead of what waits) rather than hold ever more for it
                // or drop frames and leave it silently out of sync.
                if let Some(conn) = self.conns.remove(&send.conn) {
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
            if let Some(conn) = self.conns.remove(&close.conn) {
                tracing::info!(conn = %close.conn, reason = %close.reason, "closing connection");
                conn.close(close.reason);
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
                let _ = reply.send(result);
            }
        }
        for event in out.events {
            match &event {
                Event::PeerConnected {
                    conn,
                    peer_id,
                    metadata,
                } => {
                    self.sessions.insert(
                        *conn,
                        Session {
                            peer_id: peer_id.clone(),
                            storage_id: metadata.storage_id.clone(),
                            ephemeral: metadata.ephemeral(),
                            remote: self.remotes.get(conn).cloned(),
                            connected_since_ms: self.clock.now().0,
                        },
                    );
                }
                Event::PeerDisconnected { conn, .. } => {
                    self.sessions.remove(conn);
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

#[cfg(test)]
mod lane_tests {
    use super::*;

    /// Every frame pushed reaches the reader, in order, however its waits
    /// interleave with pushes: the reader drops its wait now and then (as
    /// the transport does when its ping timer fires) and races a cut
    /// signal while "writing", from another thread than the pusher.
    #[test]
    fn no_frame_is_lost_between_pusher_and_reader() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for round in 0..20u64 {
                let lane = Arc::new(Lane::new());
                let tx = ConnTx { lane: lane.clone() };
                let mut queue = OutboundQueue { lane };
                let cut = queue.cut_signal();
                const N: usize = 20_000;
                let pusher = std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_u64 ^ round;
                    for i in 0..N {
                        let frame = (i as u32).to_le_bytes().to_vec();
                        tx.push(frame, (usize::MAX, Duration::from_secs(10)))
                            .expect("no limit");
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if x % 7 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    // Dropping the sender releases the lane.
                });
                let mut seen = 0usize;
                // Odd rounds drop the wait now and then; even rounds never
                // do, so a lost wake-up would stall them for good.
                let period = if round % 2 == 1 { 50 } else { 3_600_000_000 };
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::now() + Duration::from_micros(period),
                    Duration::from_micros(period),
                );
                let reader = async {
                    loop {
                        tokio::select! {
                            next = queue.next() => match next {
                                Next::Item(Outbound::Frame(bytes)) => {
                                    let n = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
                                    assert_eq!(n as usize, seen, "in order");
                                    seen += 1;
                                    // A "write" racing the cut signal.
                                    tokio::select! {
                                        biased;
                                        _ = cut.cut() => panic!("never cut"),
                                        _ = tokio::task::yield_now() => {}
                                    }
                                    while let Some(Outbound::Frame(bytes)) = queue.try_next() {
                                        let n = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
                                        assert_eq!(n as usize, seen, "in order");
                                        seen += 1;
                                    }
                                }
                                Next::Item(Outbound::Close(_)) | Next::Cut(_) => panic!("unexpected"),
                                Next::Released => return,
                            },
                            _ = tick.tick() => {}
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(20), reader)
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: stalled after {seen} frames"));
                pusher.join().expect("pusher");
                assert_eq!(seen, N);
            }
        });
    }
}
