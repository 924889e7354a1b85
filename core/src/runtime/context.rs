//! [`Context`]: the Context API on a live document in a [`Repo`].
//!
//! Every method runs inside the repo's actor, so edits are atomic with
//! respect to incoming sync messages, and each call that writes becomes one
//! Automerge change, saved and synced at once.

use automerge::{Automerge, ChangeHash};
use serde_json::Value as Json;
use tokio::sync::{broadcast, mpsc};

use super::{DocHandle, RepoError};
use crate::context::{self, ChangeInfo, ContextError, ContextPatch, Op, Path, Value};
use crate::engine::{Event, Origin};
use crate::wire::AutomergeUrl;

/// A context: one document, addressed by JSON Pointer paths.
#[derive(Clone, Debug)]
pub struct Context {
    handle: DocHandle,
}

/// Changes under a subscribed path, with where they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextChange {
    /// Local, a peer, or storage.
    pub origin: Origin,
    /// The document's heads after the change.
    pub heads: Vec<ChangeHash>,
    /// What changed under the subscribed path.
    pub patches: Vec<ContextPatch>,
}

/// What a [`Subscription`] delivers.
#[derive(Clone, Debug, PartialEq)]
pub enum ContextEvent {
    /// Changes under the subscribed path.
    Changed(ContextChange),
    /// The subscription fell behind: the repo's event channel (of
    /// [`RepoConfig::event_capacity`](super::RepoConfig::event_capacity)
    /// events) overflowed before it read `missed` events, and changes
    /// among them are not reported one by one. `heads` are the document's
    /// heads when this was noticed: re-read the context (at these heads, or
    /// now) to catch up. The events that follow report only changes that
    /// are not already part of `heads`, so patches applied on top of the
    /// re-read are never applied twice.
    Lagged {
        /// How many repo events (of any document, of any kind) were
        /// dropped; an upper bound on the changes missed here.
        missed: u64,
        /// The document's heads once the subscription caught up.
        heads: Vec<ChangeHash>,
    },
}

/// A live subscription; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<ContextEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// The next change under the path, or word that some were missed
    /// ([`ContextEvent::Lagged`]); `None` once the repo stops.
    pub async fn next(&mut self) -> Option<ContextEvent> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse(path: &str) -> Result<Path, RepoError> {
    path.parse::<Path>()
        .map_err(|e| RepoError::Context(ContextError::BadPath(e)))
}

impl Context {
    /// The context over a document handle.
    pub fn new(handle: DocHandle) -> Context {
        Context { handle }
    }

    /// The underlying handle.
    pub fn handle(&self) -> &DocHandle {
        &self.handle
    }

    /// The context's `automerge:` URL.
    pub fn url(&self) -> String {
        self.handle.url()
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Automerge) -> Result<R, ContextError> + Send + 'static,
    ) -> Result<R, RepoError> {
        match self.handle.with_doc(f).await? {
            Some(result) => Ok(result?),
            None => Err(RepoError::Unavailable(self.handle.id().clone())),
        }
    }

    /// Applies ops as one change (with an optional message); either all
    /// apply or none. Returns the change's hash (`None` if nothing changed).
    pub async fn apply(
        &self,
        ops: Vec<Op>,
        message: Option<String>,
    ) -> Result<Option<ChangeHash>, RepoError> {
        let time = Some(self.handle.repo().clock().now().as_secs());
        Ok(self
            .handle
            .change(move |doc| context::apply(doc, &ops, message, time))
            .await??)
    }

    /// The value at `path`.
    pub async fn get(&self, path: &str) -> Result<Value, RepoError> {
        let path = parse(path)?;
        self.read(move |doc| context::get(doc, &path, None)).await
    }

    /// The subtree at `path` as JSON.
    pub async fn to_json(&self, path: &str) -> Result<Json, RepoError> {
        let path = parse(path)?;
        self.read(move |doc| context::to_json(doc, &path, None))
            .await
    }

    /// Sets `path` to `value`.
    pub async fn set(&self, path: &str, value: Value) -> Result<(), RepoError> {
        let path = parse(path)?;
        self.apply(vec![Op::Set { path, value }], None)
            .await
            .map(drop)
    }

    /// Deletes the map key or list element at `path`.
    pub async fn delete(&self, path: &str) -> Result<(), RepoError> {
        let path = parse(path)?;
        self.apply(vec![Op::Delete { path }], None).await.map(drop)
    }

    /// Adds `by` to the counter at `path`.
    pub async fn increment(&self, path: &str, by: i64) -> Result<(), RepoError> {
        let path = parse(path)?;
        self.apply(vec![Op::Increment { path, by }], None)
            .await
            .map(drop)
    }

    /// Inserts into the list at `path`.
    pub async fn insert(&self, path: &str, index: usize, value: Value) -> Result<(), RepoError> {
        let path = parse(path)?;
        self.apply(vec![Op::Insert { path, index, value }], None)
            .await
            .map(drop)
    }

    /// Removes `count` elements from the list at `path`.
    pub async fn remove(&self, path: &str, index: usize, count: usize) -> Result<(), RepoError> {
        let path = parse(path)?;
        self.apply(vec![Op::Remove { path, index, count }], None)
            .await
            .map(drop)
    }

    /// Splices the text at `path`.
    pub async fn splice(
        &self,
        path: &str,
        index: usize,
        delete: usize,
        insert: &str,
    ) -> Result<(), RepoError> {
        let path = parse(path)?;
        let insert = insert.to_owned();
        self.apply(
            vec![Op::Splice {
                path,
                index,
                delete,
                insert,
            }],
            None,
        )
        .await
        .map(drop)
    }

    /// Merges a JSON object into the map at `path`.
    pub async fn merge_json(&self, path: &str, json: Json) -> Result<(), RepoError> {
        let path = parse(path)?;
        self.apply(vec![Op::MergeJson { path, json }], None)
            .await
            .map(drop)
    }

    /// History, newest first.
    pub async fn history(&self, offset: usize, limit: usize) -> Result<Vec<ChangeInfo>, RepoError> {
        self.read(move |doc| Ok(context::history(doc, offset, limit)))
            .await
    }

    /// The current heads.
    pub async fn heads(&self) -> Result<Vec<ChangeHash>, RepoError> {
        self.handle.heads().await
    }

    /// A read-only copy of the context as it was at `heads`.
    pub async fn view_at(&self, heads: Vec<ChangeHash>) -> Result<View, RepoError> {
        self.read(move |doc| context::view_at(doc, &heads).map(|doc| View { doc }))
            .await
    }

    /// A read-only view of the version an `automerge:` URL names (its
    /// `#heads`), or of the current version if it names none.
    pub async fn open_url(&self, url: &AutomergeUrl) -> Result<View, RepoError> {
        match &url.heads {
            Some(heads) => self.view_at(heads.clone()).await,
            None => {
                let heads = self.heads().await?;
                self.view_at(heads).await
            }
        }
    }

    /// The patches from version `before` to version `after` under `prefix`.
    pub async fn diff(
        &self,
        before: Vec<ChangeHash>,
        after: Vec<ChangeHash>,
        prefix: &str,
    ) -> Result<Vec<ContextPatch>, RepoError> {
        let prefix = parse(prefix)?;
        self.read(move |doc| context::diff(doc, &before, &after, &prefix))
            .await
    }

    /// Subscribes to changes at or below `prefix`, local and remote alike.
    pub fn subscribe(&self, prefix: &str) -> Result<Subscription, RepoError> {
        let prefix = parse(prefix)?;
        let mut events = self.handle.repo.events();
        let handle = self.handle.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            // After a lag: the heads reported to the subscriber. Events
            // still queued may describe changes already part of them;
            // those are skipped until the first one that is not.
            let mut caught_up: Option<Vec<ChangeHash>> = None;
            loop {
                let event = match events.recv().await {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "subscription fell behind; reporting current heads");
                        let Ok(heads) = current_heads(&handle).await else {
                            return;
                        };
                        caught_up = Some(heads.clone());
                        if tx.send(ContextEvent::Lagged { missed, heads }).is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Event::DocChanged {
                    document_id,
                    previous,
                    heads,
                    origin,
                } = event
                else {
                    continue;
                };
                if &document_id != handle.id() {
                    continue;
                }
                let prefix = prefix.clone();
                let after = heads.clone();
                let seen = caught_up.clone();
                let patches = handle
                    .with_doc(move |doc| {
                        if seen.is_some_and(|seen| contains_all(doc, &seen, &after)) {
                            return Ok(None);
                        }
                        context::diff(doc, &previous, &after, &prefix).map(Some)
                    })
                    .await;
                // Covered by the heads reported after a lag, not loaded, or
                // failed: nothing to send.
                let Ok(Some(Ok(Some(patches)))) = patches else {
                    continue;
                };
                caught_up = None;
                if patches.is_empty() {
                    continue;
                }
                let change = ContextChange {
                    origin,
                    heads,
                    patches,
                };
                if tx.send(ContextEvent::Changed(change)).is_err() {
                    return;
                }
            }
        });
        Ok(Subscription { rx, task })
    }
}

/// The document's heads, read in one step of the actor (so every change
/// whose event was sent before is part of them).
async fn current_heads(handle: &DocHandle) -> Result<Vec<ChangeHash>, RepoError> {
    match handle.with_doc(Automerge::get_heads).await? {
        Some(heads) => Ok(heads),
        None => handle.heads().await,
    }
}

/// Whether every change in `heads` is already part of the version `seen`
/// (an ancestor of it or one of its heads).
fn contains_all(doc: &Automerge, seen: &[ChangeHash], heads: &[ChangeHash]) -> bool {
    let newer: Vec<ChangeHash> = doc.get_changes_meta(seen).iter().map(|c| c.hash).collect();
    heads.iter().all(|h| !newer.contains(h))
}

/// A read-only past version of a context.
#[derive(Debug)]
pub struct View {
    doc: Automerge,
}

impl View {
    /// The value at `path` in this version.
    pub fn get(&self, path: &str) -> Result<Value, ContextError> {
        context::get(&self.doc, &path.parse()?, None)
    }

    /// The subtree at `path` in this version, as JSON.
    pub fn to_json(&self, path: &str) -> Result<Json, ContextError> {
        context::to_json(&self.doc, &path.parse()?, None)
    }

    /// This version's heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }
}
