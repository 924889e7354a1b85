//! Local edits: running the app's changes on a document, then saving and
//! syncing what they changed.

use super::*;

/// Why [`Engine::change`] could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// The document is not in memory (create or find it first).
    #[error("document {0} is not loaded")]
    NotLoaded(DocumentId),
    /// The document is still being fetched or nobody has it.
    #[error("document {0} is not available yet")]
    NotReady(DocumentId),
    /// This engine's replicas do not hold document contents.
    #[error("this engine's replicas cannot be edited")]
    NotEditable,
    /// The edit panicked; the document was left as it was before.
    #[error("the edit panicked; nothing was changed")]
    Panicked,
}

impl Engine {
    /// Runs `f` on a document and syncs and saves whatever it changed.
    /// The document must be ready. Returns `f`'s result and the output.
    pub fn change<R>(
        &mut self,
        now: Timestamp,
        id: &DocumentId,
        f: impl FnOnce(&mut Automerge) -> R,
    ) -> Result<(R, Output), ChangeError> {
        self.advance(now);
        let result = self.change_one(id, f)?;
        Ok((result, self.finish()))
    }

    /// Makes several local changes, in order, and answers them together:
    /// each changed document is saved once (one incremental chunk holding
    /// all its new changes) and each peer gets one sync message per
    /// document. An edit that fails (document not loaded, not ready, not
    /// editable) does not stop the others.
    pub fn change_many<R, F: FnOnce(&mut Automerge) -> R>(
        &mut self,
        now: Timestamp,
        edits: impl IntoIterator<Item = (DocumentId, F)>,
    ) -> (Vec<Result<R, ChangeError>>, Output) {
        self.advance(now);
        let results = edits
            .into_iter()
            .map(|(id, f)| self.change_one(&id, f))
            .collect();
        (results, self.finish())
    }

    fn change_one<R>(
        &mut self,
        id: &DocumentId,
        f: impl FnOnce(&mut Automerge) -> R,
    ) -> Result<R, ChangeError> {
        let doc = self
            .docs
            .get_mut(id)
            .ok_or_else(|| ChangeError::NotLoaded(id.clone()))?;
        if doc.status != DocStatus::Ready {
            return Err(ChangeError::NotReady(id.clone()));
        }
        let before = doc.replica.heads();
        let am = doc.replica.document_mut().ok_or(ChangeError::NotEditable)?;
        let result = f(am);
        if let Err(e) = doc.replica.absorb_local_edits() {
            // Only a replica that keeps its own log can fail here, and only
            // on a change Automerge itself just made: a bug, not input.
            tracing::error!(document = %id, error = %e, "a local change could not be recorded");
        }
        if doc.replica.heads() != before {
            self.doc_changed(id, Origin::Local);
        }
        Ok(result)
    }
}
