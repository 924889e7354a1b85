//! [`Repo`]: the handle on a running repo, and how it is configured.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};

use super::actor::{Actor, Msg, MsgBox, Responder};
use super::clock::{Clock, SystemClock};
use super::outbound::{self, OutboundQueue};
use super::DocHandle;
use crate::engine::{
    Access, Acl, ChangeError, Command, ConnectionId, CreateError, Direction, DocStatus, Engine,
    EngineConfig, Event, FindError, Grant,
};
use crate::storage::{backfill_meta, DocMeta, Storage, StorageError, StorageKey};
use crate::wire::{DocumentId, PeerId, StorageId};

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
    /// `create` made no document.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// Storage failed (reading a document, listing, the storage id); for a
    /// document, the next attempt reads it again.
    #[error("storage failed{}: {source}", document.as_ref().map(|d| format!(" for document {d}")).unwrap_or_default())]
    Storage {
        /// The document being read, if one was.
        document: Option<DocumentId>,
        /// What storage said.
        source: Arc<StorageError>,
    },
    /// An id is not valid.
    #[error(transparent)]
    Id(#[from] crate::wire::IdError),
    /// The repo has shut down.
    #[error("the repo has shut down")]
    Stopped,
}

impl RepoError {
    /// A storage failure not tied to one document.
    fn storage(e: StorageError) -> Self {
        RepoError::Storage {
            document: None,
            source: Arc::new(e),
        }
    }
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
    /// Who it is (its token's `sub`), if it authenticated.
    pub subject: Option<String>,
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
    /// Where the repo's time comes from: [`SystemClock`] by default; a
    /// [`ManualClock`](super::ManualClock) gives tests virtual time.
    pub clock: Arc<dyn Clock>,
    /// How many engine events [`Repo::events`] holds for a subscriber that
    /// has not read them yet. One that falls further behind is told so:
    /// `RecvError::Lagged` from the channel, [`ContextEvent::Lagged`] from a
    /// context subscription.
    ///
    /// [`ContextEvent::Lagged`]: super::ContextEvent::Lagged
    pub event_capacity: usize,
}

/// The default for [`RepoConfig::max_outbound_bytes`].
pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 16 << 20;
/// The default for [`RepoConfig::outbound_grace`].
pub const DEFAULT_OUTBOUND_GRACE: Duration = Duration::from_secs(10);
/// The default for [`RepoConfig::event_capacity`].
pub const DEFAULT_EVENT_CAPACITY: usize = 4096;

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
            clock: Arc::new(SystemClock::new()),
            event_capacity: DEFAULT_EVENT_CAPACITY,
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

/// Reads the store's storage id, creating and saving a fresh random UUID
/// the first time (automerge-repo keeps it under `storage-adapter-id`).
pub fn load_or_create_storage_id(storage: &dyn Storage) -> Result<StorageId, RepoError> {
    let key = StorageKey::new(["storage-adapter-id"]);
    let existing = storage.get(&key).map_err(RepoError::storage)?;
    if let Some(bytes) = existing {
        if let Some(id) = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| StorageId::new(s).ok())
        {
            return Ok(id);
        }
    }
    let text = uuid::Uuid::new_v4().to_string();
    storage
        .batch(vec![crate::storage::BatchOp::Put(
            key,
            text.clone().into_bytes(),
        )])
        .map_err(RepoError::storage)?;
    Ok(StorageId::new(&text)?)
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
    clock: Arc<dyn Clock>,
    next_conn: AtomicU64,
    /// For reads outside the engine (listing documents); released on
    /// shutdown so the store can be reopened at once.
    storage: std::sync::Mutex<Option<Arc<dyn Storage>>>,
}

impl Repo {
    /// Starts a repo on the current tokio runtime over `storage`.
    pub fn start(config: RepoConfig, storage: Arc<dyn Storage>) -> Repo {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        let peer_id = config.engine.peer_id.clone();
        let clock = config.clock.clone();
        // Before anything reads the store: one written before the engine
        // kept document metadata gets it for every document (once; a
        // marker key records it), so listings are complete.
        match backfill_meta(storage.as_ref(), clock.now().0) {
            Ok(0) => {}
            Ok(n) => tracing::info!(documents = n, "recorded metadata for stored documents"),
            Err(e) => tracing::warn!(error = %e, "cannot record metadata for stored documents"),
        }
        // When every handle is dropped the channel closes and the actor
        // ends, dropping the storage queue's sender: the thread drains its
        // queue and releases the store, with or without `shutdown`.
        let actor = Actor::new(config, storage.clone(), events.clone());
        tokio::spawn(actor.run(rx));
        Repo {
            inner: Arc::new(Inner {
                tx,
                events,
                peer_id,
                clock,
                next_conn: AtomicU64::new(1),
                storage: std::sync::Mutex::new(Some(storage)),
            }),
        }
    }

    /// Our peer id.
    pub fn peer_id(&self) -> &PeerId {
        &self.inner.peer_id
    }

    /// The repo's clock (see [`RepoConfig::clock`]).
    pub(super) fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    pub(super) fn send(&self, msg: Msg) -> Result<(), RepoError> {
        self.inner
            .tx
            .send(MsgBox(msg))
            .map_err(|_| RepoError::Stopped)
    }

    /// Creates a document (empty, or from `Automerge::save` bytes).
    pub async fn create(&self, initial: Option<Vec<u8>>) -> Result<DocHandle, RepoError> {
        self.create_owned(initial, None).await
    }

    /// Creates a document owned by `owner` (see [`Acl::owner`]).
    pub async fn create_owned(
        &self,
        initial: Option<Vec<u8>>,
        owner: Option<String>,
    ) -> Result<DocHandle, RepoError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Command(
            Command::Create { initial, owner },
            Responder::Create(tx),
        ))?;
        let id = rx.await.map_err(|_| RepoError::Stopped)??;
        Ok(self.handle(id))
    }

    /// Finds a document in storage or at peers. Never hangs: if nobody has
    /// it, this returns [`RepoError::Unavailable`] (the repo keeps wanting
    /// it; [`Repo::events`] reports when it arrives).
    pub async fn find(&self, id: &DocumentId) -> Result<DocHandle, RepoError> {
        let (tx, rx) = oneshot::channel();
        let find = Command::Find {
            document_id: id.clone(),
        };
        self.send(Msg::Command(find, Responder::Find(tx)))?;
        match rx.await.map_err(|_| RepoError::Stopped)? {
            Ok(id) => Ok(self.handle(id)),
            Err(FindError::Unavailable(id)) => Err(RepoError::Unavailable(id)),
            Err(FindError::Storage { document, source }) => Err(RepoError::Storage {
                document: Some(document),
                source,
            }),
        }
    }

    /// A handle on a document without looking it up.
    pub fn handle(&self, id: DocumentId) -> DocHandle {
        DocHandle::new(self.clone(), id)
    }

    /// Runs `f` on the engine inside the actor and returns what it returns.
    pub(super) async fn inspect<R: Send + 'static>(
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
        Ok(self.documents_with_meta().await?.into_keys().collect())
    }

    /// Every document this repo holds, with what the store keeps about it:
    /// those on disk (by their [`DocMeta`], which the engine writes with
    /// their changes) and those in memory and ready, whose metadata in
    /// memory may be a write ahead of the disk (and is `None` for a
    /// document without a change here yet).
    pub async fn documents_with_meta(
        &self,
    ) -> Result<BTreeMap<DocumentId, Option<DocMeta>>, RepoError> {
        // The store first, then the engine: what the engine holds is never
        // older than what it wrote.
        let stored = self.read_storage(DocMeta::all).await?;
        let in_memory = self
            .inspect(|engine| {
                engine
                    .documents()
                    .filter(|(_, status)| *status == DocStatus::Ready)
                    .map(|(id, _)| (id.clone(), engine.meta(id).cloned()))
                    .collect::<Vec<_>>()
            })
            .await?;
        let mut all: BTreeMap<DocumentId, Option<DocMeta>> =
            stored.into_iter().map(|(id, m)| (id, Some(m))).collect();
        for (id, meta) in in_memory {
            let entry = all.entry(id).or_default();
            if let Some(newer) = meta {
                *entry = Some(match entry.take() {
                    Some(stored) => stored.overlay(newer),
                    None => newer,
                });
            }
        }
        Ok(all)
    }

    /// What the store keeps about one document (`None` if nothing: a
    /// document without a change stored here), with the engine's newer
    /// copy over it if the document is in memory.
    pub async fn meta(&self, id: &DocumentId) -> Result<Option<DocMeta>, RepoError> {
        let key = id.clone();
        let stored = self
            .read_storage(move |storage| DocMeta::load(storage, &key))
            .await?;
        let id = id.clone();
        let newer = self
            .inspect(move |engine| engine.meta(&id).cloned())
            .await?;
        Ok(match (stored, newer) {
            (Some(stored), Some(newer)) => Some(stored.overlay(newer)),
            (stored, newer) => newer.or(stored),
        })
    }

    /// Runs a read of the store on the blocking pool.
    async fn read_storage<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn Storage) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, RepoError> {
        let storage = self
            .inner
            .storage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(RepoError::Stopped)?;
        tokio::task::spawn_blocking(move || read(&*storage))
            .await
            .map_err(|_| RepoError::storage(StorageError::Panicked))?
            .map_err(RepoError::storage)
    }

    /// Every engine event, as it happens. A receiver that falls more than
    /// [`RepoConfig::event_capacity`] events behind gets
    /// `RecvError::Lagged` (with how many it missed) instead of them; it
    /// should then re-read what it follows.
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
        grant: Arc<Grant>,
    ) -> Result<(ConnectionId, OutboundQueue), RepoError> {
        let conn = ConnectionId(self.inner.next_conn.fetch_add(1, Ordering::Relaxed));
        let (sender, queue) = outbound::queue(self.inner.clock.clone());
        self.send(Msg::Opened(conn, direction, sender, remote, grant))?;
        Ok((conn, queue))
    }

    /// Applies a chunk of changes that arrived outside the sync protocol (a
    /// relay cluster's log) to document `id` if it is in memory, and syncs
    /// it on (see [`Command::ApplyChunk`]); whether the document changed.
    pub async fn apply_chunk(&self, id: &DocumentId, chunk: Vec<u8>) -> Result<bool, RepoError> {
        let (tx, rx) = oneshot::channel();
        let command = Command::ApplyChunk {
            document_id: id.clone(),
            chunk,
        };
        self.send(Msg::Command(command, Responder::ChunkApplied(tx)))?;
        rx.await.map_err(|_| RepoError::Stopped)
    }

    /// Closes every connection of `subject` or of the token `token_id`
    /// (close code 4403); returns how many.
    pub async fn revoke(
        &self,
        subject: Option<String>,
        token_id: Option<String>,
    ) -> Result<usize, RepoError> {
        let (tx, rx) = oneshot::channel();
        let revoke = Command::Revoke { subject, token_id };
        self.send(Msg::Command(revoke, Responder::Revoked(tx)))?;
        rx.await.map_err(|_| RepoError::Stopped)
    }

    /// Gives `subject` `access` on a document (`Access::None` removes it
    /// from the list); returns the list as it is now. Connected peers that
    /// can no longer read it are dropped from it.
    pub async fn set_access(
        &self,
        id: &DocumentId,
        subject: String,
        access: Access,
    ) -> Result<Acl, RepoError> {
        self.find(id).await?;
        let (tx, rx) = oneshot::channel();
        let set = Command::SetAccess {
            document_id: id.clone(),
            subject,
            access,
        };
        self.send(Msg::Command(set, Responder::AccessSet(tx)))?;
        rx.await
            .map_err(|_| RepoError::Stopped)?
            .ok_or_else(|| RepoError::Unavailable(id.clone()))
    }

    /// A document's access list (found first, so it is loaded).
    pub async fn acl(&self, id: &DocumentId) -> Result<Acl, RepoError> {
        self.find(id).await?;
        let id = id.clone();
        let acl = self.inspect(move |engine| engine.acl(&id).cloned()).await?;
        Ok(acl.unwrap_or_default())
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
