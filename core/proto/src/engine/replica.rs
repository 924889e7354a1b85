//! How the engine holds one document: the [`Replica`] seam.
//!
//! The engine never calls Automerge directly; it goes through this trait so
//! a document can be held in whichever form suits the peer:
//!
//! - [`FullDocument`]: a materialized `automerge::Automerge`, needed
//!   wherever contents are read or written (clients, the HTTP API).
//! - [`ChangeLog`](super::ChangeLog): hashes, dependencies and raw change
//!   bytes, for relays that mostly pass changes on; it answers the sync
//!   protocol from the change graph and materializes the document only
//!   when its contents are read or edited.
//!
//! Everything here may be handed hostile input, so every method that takes
//! bytes from outside returns an error instead of panicking where it can;
//! the engine additionally runs these calls under `catch_unwind`.

use std::fmt;

use std::sync::Arc;

use automerge::sync::{self, SyncDoc};
use automerge::{
    ActorId, Automerge, Change, ChangeHash, LoadOptions, OnPartialLoad, VerificationMode,
};

use super::changelog::PeerLog;

/// Which implementation holds a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ReplicaKind {
    /// A materialized Automerge document.
    #[default]
    FullDocument,
    /// A change log, materialized on demand.
    ChangeLog,
}

impl ReplicaKind {
    /// Its name in configuration (`full-document`, `change-log`).
    pub fn name(self) -> &'static str {
        match self {
            Self::FullDocument => "full-document",
            Self::ChangeLog => "change-log",
        }
    }

    /// The factory building replicas of this kind.
    pub fn factory(self) -> ReplicaFactory {
        match self {
            Self::FullDocument => full_document_factory(),
            Self::ChangeLog => {
                Arc::new(|actor, hash_seed| Box::new(super::ChangeLog::new(actor, hash_seed)))
            }
        }
    }
}

impl std::str::FromStr for ReplicaKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full-document" => Ok(Self::FullDocument),
            "change-log" => Ok(Self::ChangeLog),
            other => Err(format!(
                "unknown replica kind '{other}' (expected full-document or change-log)"
            )),
        }
    }
}

/// Why a replica refused an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// Automerge rejected the input.
    #[error("automerge rejected the data: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// Stored bytes are corrupt or truncated.
    #[error("corrupt or truncated data: {0}")]
    Corrupt(String),
    /// The replica cannot do this (e.g. edit contents it does not hold).
    #[error("this replica cannot {0}")]
    Unsupported(&'static str),
}

/// What the engine keeps per (document, peer) for the sync protocol.
#[derive(Debug, Clone)]
pub struct PeerSync {
    /// Automerge's sync state (what is persisted between sessions).
    pub state: sync::State,
    /// What a change log remembers about this peer between messages (see
    /// [`ChangeLog`](super::ChangeLog)); its business alone, not persisted.
    /// A fresh `PeerSync` starts with nothing offered.
    pub(super) log: PeerLog,
}

impl PeerSync {
    /// Wraps a (new or restored) sync state.
    pub fn new(state: sync::State) -> Self {
        Self {
            state,
            log: PeerLog::default(),
        }
    }
}

impl Default for PeerSync {
    fn default() -> Self {
        Self::new(sync::State::new())
    }
}

/// One document as the engine holds it.
pub trait Replica: Send + fmt::Debug {
    /// Which implementation this is.
    fn kind(&self) -> ReplicaKind;
    /// The current heads (sorted).
    fn heads(&self) -> Vec<ChangeHash>;
    /// Whether it holds no changes at all.
    fn is_empty(&self) -> bool;
    /// Whether it holds the change with this hash.
    fn has_change(&self, hash: &ChangeHash) -> bool;
    /// Produces the next sync message for a peer, if there is one to send.
    fn generate_sync_message(&self, peer: &mut PeerSync) -> Option<sync::Message>;
    /// Applies a (validated) sync message from a peer.
    fn receive_sync_message(
        &mut self,
        peer: &mut PeerSync,
        message: sync::Message,
    ) -> Result<(), ReplicaError>;
    /// Adds one stored chunk (snapshot or incremental). A chunk that is
    /// corrupt fails without changing the replica.
    fn load_chunk(&mut self, bytes: &[u8]) -> Result<(), ReplicaError>;
    /// The whole document, compressed, for a snapshot.
    fn save(&self) -> Vec<u8>;
    /// The changes not reachable from `heads`, for an incremental chunk.
    fn save_after(&self, heads: &[ChangeHash]) -> Vec<u8>;
    /// A compact snapshot of everything, if the replica can make one
    /// cheaply (it holds the document); otherwise storage builds it by
    /// merging the stored chunks.
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }
    /// The materialized document, when this replica holds one.
    fn document(&self) -> Option<&Automerge>;
    /// The materialized document for editing, when this replica holds one.
    /// After editing it the engine calls [`Replica::absorb_local_edits`].
    fn document_mut(&mut self) -> Option<&mut Automerge>;
    /// Takes in whatever changes were made through [`Replica::document_mut`]
    /// (a replica whose document *is* its state has nothing to do).
    fn absorb_local_edits(&mut self) -> Result<(), ReplicaError> {
        Ok(())
    }
}

/// Builds an empty replica whose local changes (if it can make any) are
/// authored by the given actor. The engine calls it once per document.
pub type ReplicaFactory = Arc<dyn Fn(ActorId, u64) -> Box<dyn Replica> + Send + Sync>;

/// The factory for [`FullDocument`] replicas.
pub fn full_document_factory() -> ReplicaFactory {
    Arc::new(|actor, _| Box::new(FullDocument::new(actor)))
}

/// A replica holding a full Automerge document.
#[derive(Debug)]
pub struct FullDocument {
    doc: Automerge,
}

impl FullDocument {
    /// An empty document with the given actor.
    pub fn new(actor: ActorId) -> Self {
        Self {
            doc: Automerge::new().with_actor(actor),
        }
    }
}

impl FullDocument {
    /// Wraps a loaded document.
    pub(super) fn from_document(doc: Automerge) -> Self {
        Self { doc }
    }

    /// The document it holds.
    pub(super) fn into_document(self) -> Automerge {
        self.doc
    }
}

impl Replica for FullDocument {
    fn kind(&self) -> ReplicaKind {
        ReplicaKind::FullDocument
    }

    fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    fn is_empty(&self) -> bool {
        self.doc.get_heads().is_empty()
    }

    fn has_change(&self, hash: &ChangeHash) -> bool {
        self.doc.get_change_meta_by_hash(hash).is_some()
    }

    fn generate_sync_message(&self, peer: &mut PeerSync) -> Option<sync::Message> {
        if settled(&self.doc.get_heads(), &peer.state) {
            return None;
        }
        self.doc.generate_sync_message(&mut peer.state)
    }

    fn receive_sync_message(
        &mut self,
        peer: &mut PeerSync,
        message: sync::Message,
    ) -> Result<(), ReplicaError> {
        Ok(self.doc.receive_sync_message(&mut peer.state, message)?)
    }

    fn load_chunk(&mut self, bytes: &[u8]) -> Result<(), ReplicaError> {
        // `load_incremental` tolerates a damaged chunk by keeping whatever
        // it could read, which would hide corruption. So every piece is
        // parsed strictly first, and only a wholly sound chunk is applied.
        let mut documents = Vec::new();
        let mut changes = Vec::new();
        for piece in split_chunks(bytes)? {
            match piece.kind {
                CHUNK_DOCUMENT => documents.push(load_document(piece.bytes)?),
                CHUNK_CHANGE | CHUNK_COMPRESSED_CHANGE => changes.push(parse_change(piece)?),
                other => {
                    return Err(ReplicaError::Corrupt(format!(
                        "unexpected chunk type {other} in stored data"
                    )))
                }
            }
        }
        for parsed in documents {
            if self.doc.is_empty() {
                let actor = self.doc.get_actor().clone();
                self.doc = parsed.with_actor(actor);
            } else {
                let mut parsed = parsed;
                self.doc.merge(&mut parsed)?;
            }
        }
        if !changes.is_empty() {
            self.doc.apply_changes(changes)?;
        }
        Ok(())
    }

    fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        Some(self.doc.save())
    }

    fn save_after(&self, heads: &[ChangeHash]) -> Vec<u8> {
        // The common case, a local edit on top of what was saved: the one
        // new change is the last local one, whose bytes automerge already
        // holds; `save_after` would search the history for it.
        // (Building the last local change costs automerge some work, so
        // only when a single head makes it possible.)
        let current = self.doc.get_heads();
        if current.len() == 1 {
            if let Some(last) = self.doc.get_last_local_change() {
                if current[0] == last.hash()
                    && last.deps().len() == heads.len()
                    && last.deps().iter().all(|d| heads.contains(d))
                {
                    return last.raw_bytes().to_vec();
                }
            }
        }
        self.doc.save_after(heads)
    }

    fn document(&self) -> Option<&Automerge> {
        Some(&self.doc)
    }

    fn document_mut(&mut self) -> Option<&mut Automerge> {
        Some(&mut self.doc)
    }
}

/// Whether a sync exchange is at rest: we already told the peer our current
/// heads, it reports exactly those heads and asks for nothing. Automerge
/// would answer `None` here too, but only after computing which changes the
/// peer lacks, which walks the change graph (cost grows with history); on a
/// relay that is one walk per reply from every reader of every change.
pub(super) fn settled(ours: &[ChangeHash], state: &sync::State) -> bool {
    if !state.have_responded || state.needs_reset || state.last_sent_heads.as_slice() != ours {
        return false;
    }
    if state.their_need.as_ref().is_some_and(|n| !n.is_empty()) {
        return false;
    }
    match &state.their_heads {
        // Peers send their heads sorted; only an unsorted list is copied.
        Some(theirs) if theirs.len() == ours.len() => {
            theirs == ours || {
                let mut theirs = theirs.clone();
                theirs.sort();
                theirs == ours
            }
        }
        _ => false,
    }
}

/// Every Automerge chunk starts with these four bytes.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
pub(super) const CHUNK_DOCUMENT: u8 = 0;
pub(super) const CHUNK_CHANGE: u8 = 1;
pub(super) const CHUNK_COMPRESSED_CHANGE: u8 = 2;

/// One chunk of stored Automerge data, header included.
#[derive(Debug, Clone, Copy)]
pub struct RawChunk<'a> {
    /// The chunk type byte (0 document, 1 change, 2 compressed change).
    pub kind: u8,
    /// The whole chunk, header included.
    pub bytes: &'a [u8],
}

/// Loads one document chunk strictly: a partial load is an error, and its
/// heads must match its contents.
pub(super) fn load_document(bytes: &[u8]) -> Result<Automerge, ReplicaError> {
    Automerge::load_with_options(
        bytes,
        LoadOptions::new()
            .on_partial_load(OnPartialLoad::Error)
            .verification_mode(VerificationMode::Check),
    )
    .map_err(|e| ReplicaError::Corrupt(e.to_string()))
}

/// Parses one change chunk (plain or compressed) and checks its checksum:
/// the start of the change's hash, which parsing computes anyway (automerge's
/// `Change::try_from` does not compare the two). One hash per change.
pub(super) fn parse_change(piece: RawChunk<'_>) -> Result<Change, ReplicaError> {
    let change = Change::try_from(piece.bytes).map_err(|e| ReplicaError::Corrupt(e.to_string()))?;
    if piece.bytes.get(4..8) != Some(&change.hash().0[..4]) {
        return Err(ReplicaError::Corrupt("chunk checksum mismatch".into()));
    }
    Ok(change)
}

/// Splits concatenated Automerge chunks (each: magic, 4-byte checksum,
/// type byte, LEB128 length, data) without interpreting them; checksums are
/// left to whoever parses each chunk.
pub fn split_chunks(mut input: &[u8]) -> Result<Vec<RawChunk<'_>>, ReplicaError> {
    let corrupt = |what: &str| ReplicaError::Corrupt(what.to_owned());
    let mut out = Vec::new();
    while !input.is_empty() {
        if input.len() < 9 || input[..4] != MAGIC {
            return Err(corrupt("bad chunk header"));
        }
        let kind = input[8];
        let mut at = 9;
        let mut len: u64 = 0;
        let mut shift = 0;
        loop {
            let byte = *input
                .get(at)
                .ok_or_else(|| corrupt("truncated chunk length"))?;
            at += 1;
            if shift > 63 {
                return Err(corrupt("chunk length too long"));
            }
            len |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| at.checked_add(l))
            .filter(|&end| end <= input.len())
            .ok_or_else(|| corrupt("chunk runs past the end of the data"))?;
        // Checksums are checked where the chunk is parsed (`parse_change`,
        // or `Automerge::load` for documents), which hashes it anyway.
        out.push(RawChunk {
            kind,
            bytes: &input[..end],
        });
        input = &input[end..];
    }
    Ok(out)
}
