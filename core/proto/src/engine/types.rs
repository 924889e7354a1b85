//! The plain data that goes in and out of the [`Engine`](super::Engine).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use automerge::ChangeHash;

use super::access::{Access, Acl, Grant};
use super::policy::{AnnounceAll, SharePolicy};
use super::replica::{ReplicaError, ReplicaFactory};
use super::validate::SyncLimits;
use crate::storage::{StorageError, StorageKey, StorageResult, TaskId};
use crate::wire::{DocumentId, Message, PeerId, PeerMetadata, SessionId, StorageId};

/// A point on the driver's clock: milliseconds since the Unix epoch. The
/// engine never reads a clock; every input carries the time. Drivers
/// should feed a monotonic clock anchored at the epoch, but the engine
/// tolerates time standing still or stepping back (it keeps the latest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `self` plus `d` (saturating).
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(u128::from(u64::MAX)) as u64),
        )
    }

    /// Whole seconds since the epoch, as Automerge stamps changes.
    pub fn as_secs(self) -> i64 {
        (self.0 / 1000) as i64
    }
}

/// Names one connection; chosen by the driver, unique among open ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// Names one local command; chosen by the driver, echoed in its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(pub u64);

/// Which side opened a connection. The dialling side sends `join`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// We dialled; we send `join` and expect `peer`.
    Outgoing,
    /// They dialled; we expect `join` and answer `peer`.
    Incoming,
}

/// How an engine is set up.
#[derive(Clone)]
pub struct EngineConfig {
    /// Our peer id, sent in every message.
    pub peer_id: PeerId,
    /// Our storage id; `None` makes us an ephemeral peer, for whom others
    /// persist no sync state.
    pub storage_id: Option<StorageId>,
    /// Seeds the generator for document ids, actor ids, the session id and
    /// the keys of the replicas' hash tables. Draw it from the OS where
    /// peers are untrusted (a relay), and do not derive public names from
    /// it: whoever knows it can predict ids and aim at hash buckets.
    pub seed: u64,
    /// Which documents we offer to and accept from whom.
    pub policy: Arc<dyn SharePolicy>,
    /// Builds the replica that holds each document.
    pub replica: ReplicaFactory,
    /// Bounds on incoming sync messages.
    pub limits: SyncLimits,
    /// Largest message accepted from a peer, in bytes.
    pub max_message_bytes: usize,
    /// A connection that has not finished the handshake by then is closed.
    pub handshake_timeout: Duration,
    /// A `request` nobody has answered by then counts as unavailable.
    pub request_timeout: Duration,
    /// How long to wait, when no peer can be asked for a document, before
    /// calling it unavailable: a peer may be offering it that very moment.
    pub unavailable_grace: Duration,
    /// A sync exchange that stalls this long (message lost, peer wedged)
    /// is restarted from the persisted part of its state.
    pub resync_interval: Duration,
    /// The hot set: at most this many documents stay in memory when more
    /// are cold. Cold means fully written to storage, not wanted by a
    /// local `find`/`create`, and not being synced with any connected peer;
    /// the least recently used cold documents are dropped from memory and
    /// read back from storage when next needed.
    pub max_docs_in_memory: usize,
    /// Incremental chunks are merged into one snapshot once they add up
    /// to as many bytes as the snapshot has absorbed before (so merges get
    /// rarer as the history grows) *and* to at least this many bytes.
    /// Merging reads the whole document; the floor keeps small, busy
    /// documents from being re-read every few changes.
    pub compact_after_bytes: usize,
    /// Most distinct documents one connection may sync or ask for; one
    /// more closes it ([`CloseReason::TooManyDocuments`]).
    pub max_docs_per_connection: usize,
    /// Largest a document may grow to, in stored bytes; a message whose
    /// changes would take it past this is not applied and closes the
    /// connection ([`CloseReason::DocumentTooBig`]).
    pub max_doc_bytes: usize,
    /// Whether a peer that may only read a document may still send
    /// ephemeral messages about it (cursors, presence). Default: yes,
    /// viewers show where they look.
    pub read_only_ephemeral: bool,
}

impl EngineConfig {
    /// A client-style configuration: offers every document to every peer.
    pub fn new(peer_id: PeerId, storage_id: Option<StorageId>, seed: u64) -> Self {
        Self {
            peer_id,
            storage_id,
            seed,
            policy: Arc::new(AnnounceAll),
            replica: super::replica::full_document_factory(),
            limits: SyncLimits::default(),
            max_message_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(30),
            unavailable_grace: Duration::from_millis(250),
            resync_interval: Duration::from_secs(15),
            compact_after_bytes: 64 << 10,
            max_docs_in_memory: 10_000,
            read_only_ephemeral: true,
            max_docs_per_connection: usize::MAX,
            max_doc_bytes: usize::MAX,
        }
    }
}

impl fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineConfig")
            .field("peer_id", &self.peer_id)
            .field("storage_id", &self.storage_id)
            .field("seed", &self.seed)
            .field("policy", &self.policy)
            .field("limits", &self.limits)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("resync_interval", &self.resync_interval)
            .field("unavailable_grace", &self.unavailable_grace)
            .field("max_docs_in_memory", &self.max_docs_in_memory)
            .finish_non_exhaustive()
    }
}

/// Something for the engine to react to.
#[derive(Debug)]
pub enum Input {
    /// A local command; its result comes back in [`Output::completed`].
    Command(CommandId, Command),
    /// A connection is open and can carry messages.
    Connected {
        /// Its id.
        conn: ConnectionId,
        /// Who dialled.
        direction: Direction,
        /// What the other end may do (see [`Grant`]); connections the
        /// application makes itself get [`Grant::everything`].
        grant: std::sync::Arc<Grant>,
    },
    /// A connection closed (from either side, for any reason).
    Disconnected {
        /// Its id.
        conn: ConnectionId,
    },
    /// One whole message arrived on a connection.
    Received {
        /// From where.
        conn: ConnectionId,
        /// The encoded message, as received.
        bytes: Vec<u8>,
    },
    /// A storage task finished.
    Storage {
        /// Which task.
        task: TaskId,
        /// How it went.
        result: StorageResult,
    },
    /// Time passed; fire whatever is due.
    Tick,
}

/// A local request.
#[derive(Debug, Clone)]
pub enum Command {
    /// Make a new document, empty or from saved bytes.
    Create {
        /// `Automerge::save` output to start from.
        initial: Option<Vec<u8>>,
        /// Who owns it (see [`Acl::owner`]), if anyone.
        owner: Option<String>,
    },
    /// Get a document from storage or from peers.
    Find {
        /// Which one.
        document_id: DocumentId,
    },
    /// Send ephemeral data to the document's peers.
    Broadcast {
        /// About which document.
        document_id: DocumentId,
        /// The payload.
        data: Vec<u8>,
    },
    /// Answer once every change the document holds now is on disk. Later
    /// changes (local or from peers) do not hold the answer back.
    WhenSaved {
        /// Which document.
        document_id: DocumentId,
    },
    /// Close every connection whose grant names this subject or token id
    /// ([`CloseReason::Revoked`]).
    Revoke {
        /// The token's `sub`.
        subject: Option<String>,
        /// The token's `jti`.
        token_id: Option<String>,
    },
    /// Apply a chunk of changes (`Automerge::save_incremental` output, or a
    /// saved document) that arrived outside the sync protocol — a relay
    /// cluster's log — to a document in memory, and sync it on
    /// ([`Origin::Log`]). A document that is loading gets it once loaded;
    /// one not in memory is left alone (its storage has the chunk).
    ApplyChunk {
        /// Which document.
        document_id: DocumentId,
        /// The chunk.
        chunk: Vec<u8>,
    },
    /// Give `subject` `access` on a document in memory (see [`Acl`];
    /// `Access::None` takes it away). Peers that lose read are dropped
    /// from the document.
    SetAccess {
        /// Which document (`Find` it first).
        document_id: DocumentId,
        /// Who.
        subject: String,
        /// What.
        access: Access,
    },
}

/// How a [`Command`] ended: one variant per command, each with its own
/// error type.
#[derive(Debug)]
pub enum CommandResult {
    /// `Create`: the new document, or why none was made.
    Create(Result<DocumentId, CreateError>),
    /// `Find`: the document is in memory now, or why not.
    Find(Result<DocumentId, FindError>),
    /// `Broadcast` sent to this many peers.
    Broadcast(usize),
    /// `WhenSaved`: what the document held when asked is on disk (or it
    /// was not in memory, so nothing of it was waiting to be written).
    Saved(DocumentId),
    /// `ApplyChunk`: whether the document changed.
    ChunkApplied(bool),
    /// `Revoke` closed this many connections.
    Revoked(usize),
    /// `SetAccess`: the document's list now, or `None` if the document is
    /// not in memory and ready.
    AccessSet(Option<Acl>),
}

/// Why `Create` made no document.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// The initial bytes are not an Automerge document.
    #[error("the initial document cannot be loaded: {0}")]
    Initial(#[source] Box<ReplicaError>),
    /// The empty first change could not be recorded.
    #[error("the initial change cannot be recorded: {0}")]
    InitialChange(#[source] Box<ReplicaError>),
    /// This engine's replicas do not hold document contents.
    #[error("this engine's replicas cannot be edited")]
    NotEditable,
}

/// Why `Find` has no document.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// Neither storage nor any peer has it (yet). If it arrives later,
    /// [`Event::DocChanged`] says so.
    #[error("document {0} is unavailable")]
    Unavailable(DocumentId),
    /// Storage could not be read (which is not "it does not exist"); the
    /// next `Find` reads it again.
    #[error("cannot read document {document} from storage: {source}")]
    Storage {
        /// Which document.
        document: DocumentId,
        /// What storage said.
        source: Arc<StorageError>,
    },
}

/// Where a document change came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Made here.
    Local,
    /// Arrived from this peer.
    Remote(PeerId),
    /// Loaded from storage.
    Storage,
    /// Handed over as a chunk from outside the sync protocol
    /// ([`Command::ApplyChunk`]: a relay cluster's log).
    Log,
}

/// Something the driver (or the app above it) may want to know.
#[derive(Debug, Clone)]
pub enum Event {
    /// A handshake completed.
    PeerConnected {
        /// On which connection.
        conn: ConnectionId,
        /// Who.
        peer_id: PeerId,
        /// What it said about itself.
        metadata: PeerMetadata,
    },
    /// A peer's connection ended.
    PeerDisconnected {
        /// Which connection.
        conn: ConnectionId,
        /// Who.
        peer_id: PeerId,
    },
    /// A document's heads moved.
    DocChanged {
        /// Which document.
        document_id: DocumentId,
        /// Its heads at the previous `DocChanged` (empty the first time),
        /// so `Automerge::diff(previous, heads)` is exactly this change.
        previous: Vec<ChangeHash>,
        /// Its new heads.
        heads: Vec<ChangeHash>,
        /// Why.
        origin: Origin,
    },
    /// Every change of a document up to `heads` is on disk (with
    /// `--sync-writes`, fsynced): no write for it is outstanding.
    Saved {
        /// Which document.
        document_id: DocumentId,
        /// The heads that are saved.
        heads: Vec<ChangeHash>,
    },
    /// Nobody had a requested document.
    DocUnavailable {
        /// Which document.
        document_id: DocumentId,
    },
    /// Ephemeral data for a document arrived.
    Ephemeral {
        /// About which document.
        document_id: DocumentId,
        /// Who first sent it.
        sender_id: PeerId,
        /// The sender's session.
        session_id: SessionId,
        /// Its sequence number in that session.
        count: u64,
        /// The payload.
        data: Vec<u8>,
    },
    /// A stored chunk could not be read; it was skipped, not deleted.
    CorruptChunk {
        /// Which document.
        document_id: DocumentId,
        /// Which key.
        key: StorageKey,
        /// What is wrong.
        reason: String,
    },
    /// A storage task failed.
    StorageFailed {
        /// Which task.
        task: TaskId,
        /// Why.
        reason: Arc<StorageError>,
    },
    /// Automerge panicked while handling a peer's message; the panic was
    /// contained to that peer's connection.
    PanicContained {
        /// The document concerned.
        document_id: DocumentId,
        /// The peer whose message it was.
        peer_id: PeerId,
    },
}

/// A message to send on a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Send {
    /// Where.
    pub conn: ConnectionId,
    /// What.
    pub message: Message,
}

/// A connection the engine has given up on. The engine has already
/// forgotten it; the driver should close the socket with
/// [`CloseReason::code`] and the reason's text.
#[derive(Debug)]
pub struct Close {
    /// Which connection.
    pub conn: ConnectionId,
    /// Why.
    pub reason: CloseReason,
}

/// WebSocket close codes Converge sends (RFC 6455 section 7.4, and the
/// 4000-4999 range left to applications).
pub mod close_code {
    /// Normal closure: shutting down, or the peer reported an error.
    pub const NORMAL: u16 = 1000;
    /// Going away: the peer stopped answering pings.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error: a frame or message that breaks the protocol.
    pub const PROTOCOL: u16 = 1002;
    /// Unsupported data: a text frame.
    pub const UNSUPPORTED: u16 = 1003;
    /// Policy violation: well-formed input refused (a sync message whose
    /// changes do not apply, too much sent while a document loads, a peer
    /// too slow to read what it is sent).
    pub const POLICY: u16 = 1008;
    /// A message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// An internal error while handling the peer's input (contained; the
    /// relay serves everyone else).
    pub const INTERNAL: u16 = 1011;
    /// The peer did not finish the handshake in time.
    pub const HANDSHAKE_TIMEOUT: u16 = 4408;
    /// The same peer id connected again; the older connection is closed.
    pub const REPLACED: u16 = 4409;
    /// The connection's token expired: connect again with a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4401;
    /// The user or token was revoked: do not reconnect with it.
    pub const REVOKED: u16 = 4403;
}

/// Why the engine closed a connection. The text ([`Display`]) is what the
/// peer reads in the close frame; [`CloseReason::code`] is the code.
///
/// [`Display`]: std::fmt::Display
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// A message over [`EngineConfig::max_message_bytes`].
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    MessageTooBig {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Bytes that are not a protocol message.
    #[error("malformed message: {0}")]
    Malformed(#[source] crate::wire::DecodeError),
    /// A message other than the one the handshake expects.
    #[error("expected `{expected}` first, got `{got}`")]
    UnexpectedFirst {
        /// The message the handshake waits for.
        expected: &'static str,
        /// The message that came.
        got: &'static str,
    },
    /// No protocol version in common.
    #[error("unsupported protocol version{}", .0.as_deref().map(|v| format!(" {v}")).unwrap_or_default())]
    UnsupportedVersion(Option<String>),
    /// The peer claims our own peer id.
    #[error("peer uses our own peer id")]
    OwnPeerId,
    /// The driver opened a connection under an id still open.
    #[error("connection id reused while open")]
    ConnectionReused,
    /// A sync message that does not decode or breaks a limit.
    #[error("invalid sync message for document {document}: {source}")]
    InvalidSync {
        /// For which document.
        document: DocumentId,
        /// What is wrong with it.
        source: super::validate::InvalidSyncMessage,
    },
    /// A sync message Automerge refused (changes that do not apply).
    #[error("sync message for document {document} rejected: {source}")]
    Rejected {
        /// For which document.
        document: DocumentId,
        /// Automerge's reason.
        source: super::replica::ReplicaError,
    },
    /// Too many messages for a document still loading from storage.
    #[error("too many messages for document {0} while it loads")]
    TooManyPending(DocumentId),
    /// Handling the peer's input for this document panicked (contained).
    #[error("internal error handling document {0}; connection closed")]
    Internal(DocumentId),
    /// The handshake did not finish within
    /// [`EngineConfig::handshake_timeout`].
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// A newer connection from the same peer id took over.
    #[error("replaced by a newer connection from the same peer")]
    Replaced,
    /// The connection's grant (its token) expired.
    #[error("token expired")]
    TokenExpired,
    /// The connection's subject or token was revoked.
    #[error("access revoked")]
    Revoked,
    /// The peer kept sending changes to a document it may only read.
    #[error("changes to document {0} refused: read-only access")]
    ReadOnly(DocumentId),
    /// The peer id is held by a connection of another subject.
    #[error("peer id in use by another user")]
    PeerIdTaken,
    /// The connection asked about more documents than allowed.
    #[error("more than {0} documents on one connection")]
    TooManyDocuments(usize),
    /// The peer's changes would take a document past its size limit.
    #[error("document {document} would exceed {limit} bytes")]
    DocumentTooBig {
        /// Which document.
        document: DocumentId,
        /// The limit.
        limit: usize,
    },
    /// The peer sent an `error` message; we close our side normally.
    #[error("peer reported an error: {0}")]
    PeerError(String),
}

impl CloseReason {
    /// The WebSocket close code for this reason (see [`close_code`]).
    pub fn code(&self) -> u16 {
        match self {
            CloseReason::MessageTooBig { .. } => close_code::TOO_BIG,
            CloseReason::Malformed(_)
            | CloseReason::UnexpectedFirst { .. }
            | CloseReason::UnsupportedVersion(_)
            | CloseReason::OwnPeerId
            | CloseReason::ConnectionReused
            | CloseReason::InvalidSync { .. } => close_code::PROTOCOL,
            CloseReason::Rejected { .. }
            | CloseReason::TooManyPending(_)
            | CloseReason::ReadOnly(_)
            | CloseReason::PeerIdTaken
            | CloseReason::TooManyDocuments(_) => close_code::POLICY,
            CloseReason::DocumentTooBig { .. } => close_code::TOO_BIG,
            CloseReason::TokenExpired => close_code::TOKEN_EXPIRED,
            CloseReason::Revoked => close_code::REVOKED,
            CloseReason::Internal(_) => close_code::INTERNAL,
            CloseReason::HandshakeTimeout => close_code::HANDSHAKE_TIMEOUT,
            CloseReason::Replaced => close_code::REPLACED,
            CloseReason::PeerError(_) => close_code::NORMAL,
        }
    }
}

/// Everything one call to [`Engine::handle`](super::Engine::handle)
/// produced, in the order it happened within each list.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages to send.
    pub sends: Vec<Send>,
    /// Connections to close.
    pub closes: Vec<Close>,
    /// Storage work to perform and report back.
    pub storage: Vec<crate::storage::StorageTask>,
    /// Finished commands.
    pub completed: Vec<(CommandId, CommandResult)>,
    /// Things that happened.
    pub events: Vec<Event>,
    /// Call [`Engine::handle`](super::Engine::handle) with
    /// [`Input::Tick`] at this time (or earlier); `None`: nothing pending.
    pub next_wakeup: Option<Timestamp>,
}

impl Output {
    /// Whether the call produced nothing to act on.
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty()
            && self.closes.is_empty()
            && self.storage.is_empty()
            && self.completed.is_empty()
            && self.events.is_empty()
    }
}
