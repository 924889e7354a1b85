//! Logs that start from a stored snapshot: the snapshot kept whole with the
//! entries taken from it (their bytes rebuilt only when single changes are
//! asked for), large snapshots left unopened until a change arrives, and
//! the document materialized from the log.

use std::cell::OnceCell;

use automerge::{Automerge, Change, LoadOptions, OnPartialLoad, VerificationMode};

use super::log::Incoming;
use super::ChangeLog;
use crate::engine::replica::{
    load_document, split_chunks, FullDocument, Replica, ReplicaError, CHUNK_DOCUMENT,
};

/// The changes a log took from the snapshot it was loaded from. The log
/// knows their hashes, dependencies, actors and sequence numbers from the
/// start, but rebuilds their bytes only when something needs single changes
/// (a peer with part of the history, an old-protocol peer): re-encoding
/// every change of a long history costs about as much again as loading it,
/// and a peer with nothing, or storage, takes the snapshot itself.
#[derive(Debug)]
pub(super) struct Loaded {
    /// The document chunk as stored.
    pub(super) snapshot: Box<[u8]>,
    /// Log entries `0..covers` came from it (their arena bytes are empty).
    pub(super) covers: u32,
    /// Their bytes once rebuilt: end to end, and where each one ends.
    pub(super) bytes: OnceCell<(Vec<u8>, Vec<usize>)>,
}

/// A large snapshot, loaded but not yet taken apart into the log. Until a
/// change arrives (or someone edits, or single changes are asked of
/// storage) automerge answers from the loaded document, so a cold start
/// costs one `Automerge::load` and nothing more.
#[derive(Debug)]
pub(super) struct Unopened {
    pub(super) doc: FullDocument,
    pub(super) snapshot: Box<[u8]>,
    /// A peer with nothing was answered already. Automerge answers each one
    /// with a fresh `save()` of the whole document; from the second on, the
    /// log is opened instead and hands out the stored snapshot.
    pub(super) answered_a_fresh_peer: bool,
}

/// Snapshots from this size on are opened lazily (see [`Unopened`]).
/// Smaller ones are taken apart at once: keeping a loaded document per small
/// document would cost more memory than its log, and takes little time.
pub(super) const OPEN_LAZILY_BYTES: usize = 32 * 1024;

impl ChangeLog {
    /// Adds one stored chunk. A snapshot into an empty log is kept whole
    /// (see [`Loaded`]), or, when large and alone, left unopened (see
    /// [`Unopened`]); anything else is ingested change by change.
    pub(super) fn load(&mut self, bytes: &[u8]) -> Result<(), ReplicaError> {
        let pieces = split_chunks(bytes)?;
        self.open()?;
        match pieces.split_first() {
            Some((first, rest))
                if first.kind == CHUNK_DOCUMENT
                    && self.entries.is_empty()
                    && self.queue.is_empty() =>
            {
                // Everything is parsed before the log changes.
                let doc = load_document(first.bytes)?;
                let rest = Self::parse_pieces(rest)?;
                // A copy materialized from the empty log is out of date.
                self.materialized = OnceCell::new();
                if rest.is_empty() && first.bytes.len() >= self.open_lazily_from {
                    if !doc.get_heads().is_empty() {
                        self.unopened = Some(Box::new(Unopened {
                            doc: FullDocument::from_document(doc),
                            snapshot: first.bytes.into(),
                            answered_a_fresh_peer: false,
                        }));
                    }
                    return Ok(());
                }
                let loaded = self.take_snapshot(first.bytes, &doc);
                drop(doc);
                let result = loaded.and_then(|()| self.ingest(rest));
                if result.is_err() {
                    *self = Self::new(self.actor.clone(), self.hasher.0);
                }
                result.map(|_| ())
            }
            _ => self.ingest(Self::parse_pieces(&pieces)?).map(|_| ()),
        }
    }

    /// Takes a lazily loaded snapshot apart into the log, keeping the loaded
    /// document as the materialized copy. On error the snapshot stays
    /// unopened (automerge accepted it, but its history breaks the rule under
    /// "Ancestry by clocks" in [`super`], so it can be read but not extended).
    pub(super) fn open(&mut self) -> Result<(), ReplicaError> {
        let Some(unopened) = self.unopened.take() else {
            return Ok(());
        };
        let doc = unopened.doc.into_document();
        if let Err(e) = self.take_snapshot(&unopened.snapshot, &doc) {
            *self = Self::new(self.actor.clone(), self.hasher.0);
            self.unopened = Some(Box::new(Unopened {
                doc: FullDocument::from_document(doc),
                snapshot: unopened.snapshot,
                answered_a_fresh_peer: unopened.answered_a_fresh_peer,
            }));
            return Err(e);
        }
        let doc = doc.with_actor(self.actor.clone());
        self.materialized = OnceCell::from(Some(Box::new(doc)));
        Ok(())
    }

    /// Fills an empty log from a loaded snapshot: every change's entry,
    /// but not its bytes (see [`Loaded`]). Changes come in causal order;
    /// should one not, the log takes the changes with their bytes instead.
    fn take_snapshot(&mut self, snapshot: &[u8], doc: &Automerge) -> Result<(), ReplicaError> {
        let metas = doc.get_changes_meta(&[]);
        self.entries.reserve(metas.len());
        self.index.reserve(metas.len());
        self.deps.reserve(metas.len());
        for meta in &metas {
            if !meta.deps.iter().all(|d| self.index.contains_key(d)) {
                *self = Self::new(self.actor.clone(), self.hasher.0);
                let changes = doc.get_changes(&[]);
                return self
                    .ingest(changes.into_iter().map(Incoming::from_change).collect())
                    .map(|_| ());
            }
            self.append_entry(meta.hash, &meta.deps, &meta.actor, meta.seq, &[])?;
        }
        self.loaded = Some(Loaded {
            snapshot: snapshot.into(),
            covers: self.entries.len() as u32,
            bytes: OnceCell::new(),
        });
        Ok(())
    }

    /// The bytes of the change at log index `idx`.
    pub(super) fn change_bytes(&self, idx: u32) -> &[u8] {
        if let Some(loaded) = self.loaded.as_ref().filter(|l| idx < l.covers) {
            // A failed rebuild is not kept: the next call tries again.
            let built = match loaded.bytes.get() {
                Some(built) => built,
                None => match self.rebuild_loaded(loaded) {
                    Some(built) => loaded.bytes.get_or_init(|| built),
                    None => return &[],
                },
            };
            let (bytes, ends) = built;
            let i = idx as usize;
            let start = if i == 0 { 0 } else { ends[i - 1] };
            return &bytes[start..ends[i]];
        }
        let e = &self.entries[idx as usize];
        &self.bytes[e.start..e.start + e.len as usize]
    }

    /// Rebuilds the bytes of the changes taken from the loaded snapshot, in
    /// log order, from the materialized document when there is one (it
    /// holds them all), else by loading the snapshot again.
    fn rebuild_loaded(&self, loaded: &Loaded) -> Option<(Vec<u8>, Vec<usize>)> {
        let covers = loaded.covers as usize;
        let reloaded;
        let doc = match self.materialized.get().and_then(Option::as_deref) {
            Some(doc) => doc,
            None => {
                let options = LoadOptions::new()
                    .on_partial_load(OnPartialLoad::Error)
                    .verification_mode(VerificationMode::DontCheck);
                match Automerge::load_with_options(&loaded.snapshot, options) {
                    Ok(doc) => {
                        reloaded = doc;
                        &reloaded
                    }
                    Err(e) => {
                        // It loaded once already; only running out of
                        // memory could get here. Peers then get empty
                        // changes and refuse them; nothing is stored.
                        tracing::error!(error = %e, "cannot reload a loaded snapshot");
                        return None;
                    }
                }
            }
        };
        let mut changes: Vec<Option<Change>> = vec![None; covers];
        for change in doc.get_changes(&[]) {
            if let Some(&i) = self.index.get(&change.hash()) {
                if let Some(slot) = changes.get_mut(i as usize) {
                    *slot = Some(change);
                }
            }
        }
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(covers);
        for change in &changes {
            if let Some(change) = change {
                bytes.extend_from_slice(change.raw_bytes());
            }
            ends.push(bytes.len());
        }
        Some((bytes, ends))
    }

    pub(super) fn concat(&self, indexes: &[u32]) -> Vec<u8> {
        let size = indexes
            .iter()
            .map(|&i| self.entries[i as usize].len as usize)
            .sum();
        let mut out = Vec::with_capacity(size);
        for &i in indexes {
            out.extend_from_slice(self.change_bytes(i));
        }
        out
    }

    pub(super) fn materialize(&self) -> Option<Automerge> {
        let loaded = Automerge::load_with_options(
            &self.save(),
            LoadOptions::new()
                .on_partial_load(OnPartialLoad::Error)
                .verification_mode(VerificationMode::DontCheck),
        );
        match loaded {
            Ok(doc) => Some(doc.with_actor(self.actor.clone())),
            Err(e) => {
                tracing::error!(error = %e, changes = self.entries.len(), "cannot materialize a change log");
                None
            }
        }
    }
}
