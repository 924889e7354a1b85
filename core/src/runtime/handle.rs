//! [`DocHandle`]: one document of a [`Repo`].

use std::time::Duration;

use automerge::{Automerge, ChangeHash};
use tokio::sync::{broadcast, oneshot};

use super::actor::{Msg, Responder};
use super::{Context, Repo, RepoError};
use crate::engine::{Command, Event, SyncStatus};
use crate::wire::DocumentId;

/// A document in a [`Repo`].
#[derive(Clone, Debug)]
pub struct DocHandle {
    pub(crate) repo: Repo,
    id: DocumentId,
}

impl DocHandle {
    pub(super) fn new(repo: Repo, id: DocumentId) -> Self {
        Self { repo, id }
    }

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
        let (tx, rx) = oneshot::channel();
        let command = Command::WhenSaved {
            document_id: self.id.clone(),
        };
        self.repo
            .send(Msg::Command(command, Responder::Saved(tx)))?;
        rx.await.map_err(|_| RepoError::Stopped)
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
        let (tx, rx) = oneshot::channel();
        let command = Command::Broadcast {
            document_id: self.id.clone(),
            data,
        };
        self.repo
            .send(Msg::Command(command, Responder::Broadcast(tx)))?;
        rx.await.map_err(|_| RepoError::Stopped)
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
