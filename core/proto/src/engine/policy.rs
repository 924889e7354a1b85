//! Who gets which documents.
//!
//! automerge-repo splits this into two questions, and so do we:
//! - *announce*: may I offer this document to this peer unasked (and ask
//!   it for documents I lack)?
//! - *access*: may this peer sync this document with me when it asks?
//!
//! A client announces everything to its relay. A relay announces nothing
//! (it would flood every client with every document) and grants access to
//! everything; authorization narrows `access` later.

use std::fmt;

use crate::wire::{DocumentId, PeerId};

/// Decides, per peer and document, what is offered and what is allowed.
pub trait SharePolicy: Send + Sync + fmt::Debug {
    /// May we offer `doc` to `peer` without being asked?
    fn announce(&self, peer: &PeerId, doc: &DocumentId) -> bool;
    /// May `peer` sync `doc` with us?
    fn access(&self, peer: &PeerId, doc: &DocumentId) -> bool;
    /// True if `announce` is false for every input; lets the engine skip
    /// scanning every peer on every change.
    fn announces_nothing(&self) -> bool {
        false
    }
}

/// Offer and allow everything: the client default.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnnounceAll;

impl SharePolicy for AnnounceAll {
    fn announce(&self, _: &PeerId, _: &DocumentId) -> bool {
        true
    }
    fn access(&self, _: &PeerId, _: &DocumentId) -> bool {
        true
    }
}

/// Offer nothing, allow everything: the relay default.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayPolicy;

impl SharePolicy for RelayPolicy {
    fn announce(&self, _: &PeerId, _: &DocumentId) -> bool {
        false
    }
    fn access(&self, _: &PeerId, _: &DocumentId) -> bool {
        true
    }
    fn announces_nothing(&self) -> bool {
        true
    }
}
