//! Cluster mode (`--nats-url`): relays share every document through NATS
//! JetStream, so any node serves any document and no node holds state
//! another could not rebuild.
//!
//! - **The log.** Documents hash onto `--cluster-shards` streams
//!   (`CONVERGE_DOCS_<n>`, `--cluster-replicas` replicas each); a document's
//!   changes are messages on its subject `converge.doc.<n>.<id>`, one
//!   message per incremental chunk the engine writes (one or more raw
//!   Automerge changes), its message id the chunk's name (a hash of its
//!   changes), so a chunk published twice within JetStream's duplicate
//!   window is stored once.
//! - **Saved means acknowledged by JetStream.** The relay's store is
//!   [`ClusterStorage`]: RocksDB as a cache under the log. A write holding
//!   incremental chunks returns only once JetStream acknowledged each
//!   chunk (a quorum of the stream's replicas), then writes the local
//!   cache. The engine forwards a peer's change only after its write
//!   completes, so in cluster mode nothing reaches another client before
//!   the log has it.
//! - **Catch-up.** Loading a document reads its local chunks plus every
//!   message on its subject after the stream sequence the cache covers
//!   (kept under `cluster/seq/<id>`); a new or wiped node reads the whole
//!   subject.
//! - **Live fan-out.** Each node follows every shard's subjects with an
//!   ordered consumer from "now" and hands each chunk to its repo
//!   ([`Repo::apply_chunk`]); the engine applies it to the document if it
//!   is in memory (its own echoes change nothing) and syncs it on. A
//!   document not in memory is left alone: its next load reads the log.
//!   Chunks that arrived from the log are not published again.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use automerge::ChangeHash;
use converge_core::engine::split_chunks;
use converge_core::runtime::Repo;
use converge_core::storage::{BatchOp, ChunkKind, DocKey, Storage, StorageError, StorageKey};
use converge_core::wire::DocumentId;
use futures::StreamExt;

/// How to reach the cluster (flags in [`crate::config::Config`]).
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// NATS server URLs (any of them will do).
    pub urls: Vec<String>,
    /// Replicas of each stream (3 for a three-server JetStream cluster).
    pub replicas: usize,
    /// Streams the documents are spread over.
    pub shards: u32,
}

/// How long a node waits for JetStream to become available at start (a
/// cluster elects its leaders for a few seconds after it starts).
const START_DEADLINE: Duration = Duration::from_secs(60);

/// How long one publish or fetch may take before the write or load fails
/// (the engine retries failed writes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Change hashes remembered as having come from the log (so the chunks
/// the engine writes for them are not published again).
const REMEMBERED_HASHES: usize = 200_000;

/// A connection to the cluster's NATS servers and its streams.
pub struct Cluster {
    client: async_nats::Client,
    js: jetstream::Context,
    shards: u32,
    /// Changes that arrived from the log, oldest first (bounded).
    from_log: Mutex<Remembered>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Remembered {
    set: HashSet<ChangeHash>,
    order: VecDeque<ChangeHash>,
}

impl Remembered {
    fn insert(&mut self, hash: ChangeHash) {
        if self.set.insert(hash) {
            self.order.push_back(hash);
            if self.order.len() > REMEMBERED_HASHES {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

impl Cluster {
    /// Connects and makes sure every shard's stream exists (waiting for
    /// JetStream to be ready, up to a minute).
    pub async fn connect(settings: &ClusterSettings) -> anyhow::Result<Arc<Cluster>> {
        anyhow::ensure!(!settings.urls.is_empty(), "no NATS URL given");
        anyhow::ensure!(settings.shards > 0, "cluster_shards must be at least 1");
        anyhow::ensure!(
            (1..=5).contains(&settings.replicas),
            "cluster_replicas must be 1 to 5 (JetStream's range)"
        );
        let servers = settings
            .urls
            .iter()
            .map(|url| {
                url.parse::<async_nats::ServerAddr>()
                    .map_err(|e| anyhow::anyhow!("bad NATS URL `{url}`: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let client = async_nats::ConnectOptions::new()
            .name("converge-relay")
            .retry_on_initial_connect()
            .connect(servers)
            .await?;
        let js = jetstream::new(client.clone());
        let cluster = Cluster {
            client,
            js,
            shards: settings.shards,
            from_log: Mutex::new(Remembered::default()),
        };
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        for shard in 0..settings.shards {
            let config = stream::Config {
                name: stream_name(shard),
                subjects: vec![format!("converge.doc.{shard}.*")],
                num_replicas: settings.replicas,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            };
            loop {
                let created = cluster.js.get_or_create_stream(config.clone()).await;
                // Created is not yet usable: a replicated stream first
                // elects its leader.
                let usable = match created {
                    Ok(mut stream) => Ok(ready(&mut stream).await),
                    Err(e) => Err(e),
                };
                match usable {
                    Ok(true) => break,
                    Ok(false) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(false) => anyhow::bail!(
                        "stream {} has no leader after {START_DEADLINE:?}",
                        stream_name(shard)
                    ),
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::info!(shard, error = %e, "JetStream not ready yet; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => anyhow::bail!(
                        "cannot create stream {} with {} replicas: {e} (a single NATS server needs --cluster-replicas 1)",
                        stream_name(shard),
                        settings.replicas
                    ),
                }
            }
        }
        Ok(Arc::new(cluster))
    }

    /// The shard a document's changes go to: a stable hash of its id.
    pub fn shard(&self, id: &DocumentId) -> u32 {
        // FNV-1a: stable across builds and machines (the std hasher is not).
        let mut hash: u32 = 0x811c_9dc5;
        for byte in id.to_string().bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        hash % self.shards
    }

    /// The subject a document's changes are published on.
    pub fn subject(&self, id: &DocumentId) -> String {
        format!("converge.doc.{}.{id}", self.shard(id))
    }

    fn remember(&self, chunk: &[u8]) {
        let mut from_log = self.from_log.lock().unwrap_or_else(|p| p.into_inner());
        for hash in change_hashes(chunk) {
            from_log.insert(hash);
        }
    }

    /// Whether every change in `chunk` came from the log.
    fn came_from_log(&self, chunk: &[u8]) -> bool {
        let hashes = change_hashes(chunk);
        let from_log = self.from_log.lock().unwrap_or_else(|p| p.into_inner());
        !hashes.is_empty() && hashes.iter().all(|h| from_log.set.contains(h))
    }

    /// Publishes chunks and waits until JetStream acknowledged every one.
    async fn publish(&self, chunks: Vec<(DocumentId, String, Vec<u8>)>) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(chunks.len());
        for (id, name, bytes) in chunks {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, name.as_str());
            let ack = self
                .js
                .publish_with_headers(self.subject(&id), headers, bytes.into())
                .await?;
            acks.push(ack);
        }
        // Published back to back, acknowledged together: many chunks share
        // one round trip's wait.
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    /// Every chunk on `id`'s subject after stream sequence `after`, with
    /// the last sequence read. Read from the stream's leader message by
    /// message (what the leader acknowledged is there: read after write
    /// holds), with no consumer to create per document.
    async fn fetch(&self, id: &DocumentId, after: u64) -> anyhow::Result<(Vec<Vec<u8>>, u64)> {
        let stream = self
            .js
            .get_stream_no_info(stream_name(self.shard(id)))
            .await?;
        let subject = self.subject(id);
        let mut chunks = Vec::new();
        let mut last = after;
        loop {
            match stream
                .get_first_raw_message_by_subject(&subject, last + 1)
                .await
            {
                Ok(message) => {
                    last = message.sequence;
                    chunks.push(message.payload.to_vec());
                }
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok((chunks, last))
    }

    /// Follows every shard from now on, handing each chunk to `repo`:
    /// returns once every shard's consumer exists (so a relay that serves
    /// only after this misses nothing published meanwhile), the following
    /// itself runs in background tasks.
    pub async fn follow(self: Arc<Self>, repo: Repo) -> anyhow::Result<()> {
        for shard in 0..self.shards {
            let stream = self.js.get_stream(stream_name(shard)).await?;
            let consumer = stream
                .create_consumer(consumer::push::OrderedConfig {
                    deliver_subject: self.client.new_inbox(),
                    filter_subject: format!("converge.doc.{shard}.*"),
                    deliver_policy: consumer::DeliverPolicy::New,
                    ..Default::default()
                })
                .await?;
            let mut messages = consumer.messages().await?;
            let cluster = self.clone();
            let repo = repo.clone();
            tokio::spawn(async move {
                while let Some(message) = messages.next().await {
                    let message = match message {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(shard, error = %e, "following the log failed; the ordered consumer recovers");
                            continue;
                        }
                    };
                    let Some(id) = message
                        .subject
                        .rsplit('.')
                        .next()
                        .and_then(|id| id.parse::<DocumentId>().ok())
                    else {
                        continue;
                    };
                    cluster.remember(&message.payload);
                    if let Err(e) = repo.apply_chunk(&id, message.payload.to_vec()).await {
                        tracing::warn!(document = %id, error = %e, "a chunk from the log was not applied");
                    }
                }
            });
        }
        Ok(())
    }
}

/// Whether a stream has elected its leader.
async fn ready(stream: &mut stream::Stream) -> bool {
    match stream.info().await {
        Ok(info) => match &info.cluster {
            Some(cluster) => cluster.leader.is_some(),
            // A single server: no Raft group to wait for.
            None => true,
        },
        Err(_) => false,
    }
}

fn stream_name(shard: u32) -> String {
    format!("CONVERGE_DOCS_{shard}")
}

/// The hashes of the changes in an incremental chunk (none if it does not
/// parse).
fn change_hashes(chunk: &[u8]) -> Vec<ChangeHash> {
    let Ok(pieces) = split_chunks(chunk) else {
        return Vec::new();
    };
    pieces
        .into_iter()
        .filter_map(|piece| automerge::Change::from_bytes(piece.bytes.to_vec()).ok())
        .map(|change| change.hash())
        .collect()
}

/// The relay's store in cluster mode: the log in JetStream, RocksDB as
/// its cache (see the module docs).
pub struct ClusterStorage {
    cluster: Arc<Cluster>,
    local: Arc<dyn Storage>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for ClusterStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStorage").finish_non_exhaustive()
    }
}

impl ClusterStorage {
    /// `local` under the log of `cluster`; `rt` runs the NATS calls (the
    /// storage thread is not a tokio thread).
    pub fn new(cluster: Arc<Cluster>, local: Arc<dyn Storage>, rt: tokio::runtime::Handle) -> Self {
        ClusterStorage { cluster, local, rt }
    }

    /// Runs a NATS call to its end (or [`REQUEST_TIMEOUT`]) from the
    /// storage thread.
    fn wait<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> Result<T, StorageError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Blocking a runtime thread on the runtime would deadlock it.
            return Err(StorageError::backend(format!(
                "{what}: the cluster store is used from the storage thread only"
            )));
        }
        // (The timer is made inside the runtime: this thread has none.)
        let outcome = self
            .rt
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, call).await });
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StorageError::backend(format!("{what}: {e}"))),
            Err(_) => Err(StorageError::backend(format!("{what}: timed out"))),
        }
    }

    fn seq_key(id: &DocumentId) -> StorageKey {
        StorageKey::new(["cluster".to_owned(), "seq".to_owned(), id.to_string()])
    }

    /// Reads what the log holds for `id` beyond the cache into the cache.
    fn catch_up(&self, id: &DocumentId) -> Result<(), StorageError> {
        let after = self
            .local
            .get(&Self::seq_key(id))?
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let (chunks, last) = self.wait("reading the log", self.cluster.fetch(id, after))?;
        if chunks.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::with_capacity(chunks.len() + 1);
        for chunk in chunks {
            self.cluster.remember(&chunk);
            let name = format!("log-{}", short_hash(&chunk));
            ops.push(BatchOp::Put(
                StorageKey::doc_chunk(id, ChunkKind::Incremental, &name),
                chunk,
            ));
        }
        ops.push(BatchOp::Put(
            Self::seq_key(id),
            last.to_string().into_bytes(),
        ));
        self.local.batch(ops)
    }
}

/// A short, stable name for a chunk read from the log.
fn short_hash(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

impl Storage for ClusterStorage {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        self.local.get(key)
    }

    fn range(&self, prefix: &StorageKey) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        // Loading a document (`doc/<id>`): the log first.
        if let [d, id] = prefix.parts() {
            if d == "doc" {
                if let Ok(id) = id.parse::<DocumentId>() {
                    self.catch_up(&id)?;
                }
            }
        }
        self.local.range(prefix)
    }

    fn keys(&self, prefix: &StorageKey) -> Result<Vec<StorageKey>, StorageError> {
        self.local.keys(prefix)
    }

    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let mut chunks = Vec::new();
        for op in &ops {
            let BatchOp::Put(key, bytes) = op else {
                continue;
            };
            let Some(DocKey::Chunk(ChunkKind::Incremental, name)) = key.classify() else {
                continue;
            };
            if self.cluster.came_from_log(bytes) {
                continue;
            }
            let Some(id) = key.parts().get(1).and_then(|id| id.parse().ok()) else {
                continue;
            };
            chunks.push((id, name.to_owned(), bytes.clone()));
        }
        if !chunks.is_empty() {
            self.wait("publishing to the log", self.cluster.publish(chunks))?;
        }
        self.local.batch(ops)
    }
}
