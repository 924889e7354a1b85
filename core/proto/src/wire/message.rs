//! The messages of the automerge-repo network protocol, version 1.
//!
//! Every message is a map with a `type` and, nearly always, the `senderId`
//! of the peer that wrote it and the `targetId` of the peer it is for. See
//! `PROTOCOL.md` in the design notes for what each one means; the field
//! docs below say what each field is for.

use super::ids::{DocumentId, PeerId, SessionId, StorageId};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: &str = "1";

/// What a peer says about itself in `join` and `peer`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// Where the peer keeps its data; lets the other side persist sync
    /// state for it across reconnections.
    pub storage_id: Option<StorageId>,
    /// An ephemeral peer keeps nothing, so persisting sync state for it
    /// would be wasted. `None` when the sender left the flag out.
    pub is_ephemeral: Option<bool>,
}

impl PeerMetadata {
    /// True when the peer said it keeps nothing between sessions.
    pub fn ephemeral(&self) -> bool {
        self.is_ephemeral.unwrap_or(false)
    }
}

/// A `sync` or `request` message: one Automerge sync message about one
/// document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocMessage {
    /// Who wrote it.
    pub sender_id: PeerId,
    /// Who it is for.
    pub target_id: PeerId,
    /// The document it is about.
    pub document_id: DocumentId,
    /// The encoded `automerge::sync::Message`.
    pub data: Vec<u8>,
}

/// An `ephemeral` message: application data about a document that is passed
/// on to the document's other peers and never stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EphemeralMessage {
    /// The peer that first sent it; relays forward it unchanged.
    pub sender_id: PeerId,
    /// The next hop.
    pub target_id: PeerId,
    /// The document it is about.
    pub document_id: DocumentId,
    /// Increases with every ephemeral message the sender sends in one
    /// session; receivers drop anything not above the last one seen.
    pub count: u64,
    /// The sender's session (process lifetime).
    pub session_id: SessionId,
    /// The application payload (CBOR in automerge-repo).
    pub data: Vec<u8>,
}

/// The heads one storage location holds, as gossiped in
/// `remote-heads-changed`.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteHeads {
    /// base58check change hashes.
    pub heads: Vec<String>,
    /// When the sender learned them, milliseconds since the Unix epoch.
    pub timestamp: f64,
}

/// One automerge-repo protocol message.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// First message of a connection, from the side that dialled.
    Join {
        /// Who is joining.
        sender_id: PeerId,
        /// What the joiner says about itself.
        metadata: Option<PeerMetadata>,
        /// Versions the joiner speaks; `None` (absent) means version 1.
        supported_protocol_versions: Option<Vec<String>>,
    },
    /// Reply to `join` completing the handshake.
    Peer {
        /// Who is answering.
        sender_id: PeerId,
        /// The peer that sent `join`.
        target_id: PeerId,
        /// What the answering side says about itself.
        metadata: Option<PeerMetadata>,
        /// The version both sides will speak.
        selected_protocol_version: String,
    },
    /// Normal document synchronisation.
    Sync(DocMessage),
    /// Like `sync`, but says "I have no copy: answer `doc-unavailable` if you
    /// have none either".
    Request(DocMessage),
    /// Answer to `request` when the document is unknown or not shared.
    DocUnavailable {
        /// Who is answering.
        sender_id: PeerId,
        /// Who asked.
        target_id: PeerId,
        /// The document asked for.
        document_id: DocumentId,
    },
    /// Presence, cursors and other data that is forwarded, never stored.
    Ephemeral(EphemeralMessage),
    /// Subscribe to (or unsubscribe from) heads gossip about storage ids.
    RemoteSubscriptionChange {
        /// Who is (un)subscribing.
        sender_id: PeerId,
        /// Who should change what it sends.
        target_id: PeerId,
        /// Storage ids to start hearing about.
        add: Option<Vec<StorageId>>,
        /// Storage ids to stop hearing about.
        remove: Option<Vec<StorageId>>,
    },
    /// Heads gossip: which storage locations hold which heads of a document.
    RemoteHeadsChanged {
        /// Who is telling.
        sender_id: PeerId,
        /// Who is told.
        target_id: PeerId,
        /// The document concerned.
        document_id: DocumentId,
        /// Storage id → what it holds, in the order received.
        new_heads: Vec<(StorageId, RemoteHeads)>,
    },
    /// A fatal complaint; the sender closes the connection after it.
    Error {
        /// Who complains, if it said.
        sender_id: Option<PeerId>,
        /// Who is complained to, if it said.
        target_id: Option<PeerId>,
        /// What went wrong, for people.
        message: String,
    },
    /// The sender is going away.
    Leave {
        /// Who is leaving.
        sender_id: PeerId,
    },
}

impl Message {
    /// The wire name of this message's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Join { .. } => "join",
            Message::Peer { .. } => "peer",
            Message::Sync(_) => "sync",
            Message::Request(_) => "request",
            Message::DocUnavailable { .. } => "doc-unavailable",
            Message::Ephemeral(_) => "ephemeral",
            Message::RemoteSubscriptionChange { .. } => "remote-subscription-change",
            Message::RemoteHeadsChanged { .. } => "remote-heads-changed",
            Message::Error { .. } => "error",
            Message::Leave { .. } => "leave",
        }
    }

    /// The sender, for every message that names one.
    pub fn sender_id(&self) -> Option<&PeerId> {
        match self {
            Message::Join { sender_id, .. }
            | Message::Peer { sender_id, .. }
            | Message::DocUnavailable { sender_id, .. }
            | Message::RemoteSubscriptionChange { sender_id, .. }
            | Message::RemoteHeadsChanged { sender_id, .. }
            | Message::Leave { sender_id } => Some(sender_id),
            Message::Sync(m) | Message::Request(m) => Some(&m.sender_id),
            Message::Ephemeral(m) => Some(&m.sender_id),
            Message::Error { sender_id, .. } => sender_id.as_ref(),
        }
    }

    /// The target, for every message that names one.
    pub fn target_id(&self) -> Option<&PeerId> {
        match self {
            Message::Peer { target_id, .. }
            | Message::DocUnavailable { target_id, .. }
            | Message::RemoteSubscriptionChange { target_id, .. }
            | Message::RemoteHeadsChanged { target_id, .. } => Some(target_id),
            Message::Sync(m) | Message::Request(m) => Some(&m.target_id),
            Message::Ephemeral(m) => Some(&m.target_id),
            Message::Error { target_id, .. } => target_id.as_ref(),
            Message::Join { .. } | Message::Leave { .. } => None,
        }
    }
}
