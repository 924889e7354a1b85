//! Documents on RocksDB through the runtime: history survives a restart,
//! and a corrupt chunk is reported by document and key without taking
//! anything else down or being deleted.

use std::sync::Arc;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ReadDoc, ROOT};
use converge_core::engine::{Event, ReplicaKind};
use converge_core::runtime::{ManualClock, Repo, RepoConfig, RepoError};
use converge_core::storage::{BatchOp, DocKey, RocksStorage, Storage, StorageError, StorageKey};

use super::wait;

async fn write(repo: &Repo, value: &'static str) -> converge_core::wire::DocumentId {
    let handle = repo.create(None).await.expect("create");
    handle
        .change(move |d| {
            let mut tx = d.transaction();
            tx.put(ROOT, "value", value).expect("put");
            tx.commit();
        })
        .await
        .expect("change");
    handle.id().clone()
}

/// The string at `key` in the document's root map, if there is one.
async fn read_str(handle: &converge_core::runtime::DocHandle, key: &'static str) -> Option<String> {
    handle
        .with_doc(move |d| {
            d.get(ROOT, key)
                .ok()
                .flatten()
                .and_then(|(v, _)| v.into_string().ok())
        })
        .await
        .expect("alive")
        .flatten()
}

/// One change: sets the root key `n`.
async fn put_n(handle: &converge_core::runtime::DocHandle, i: i64) {
    handle
        .change(move |d| {
            let mut tx = d.transaction();
            tx.put(ROOT, "n", i).expect("put");
            tx.commit();
        })
        .await
        .expect("change");
}

fn open(dir: &std::path::Path) -> Arc<RocksStorage> {
    Arc::new(RocksStorage::open(dir, false).expect("open rocksdb"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_restarts_and_corruption_is_contained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (good, bad) = {
        let storage = open(dir.path());
        let repo = Repo::start(RepoConfig::new(None), storage.clone());
        let good = write(&repo, "intact").await;
        let bad = write(&repo, "damaged").await;
        repo.shutdown().await;
        (good, bad)
    };

    // Flip one byte in the middle of every chunk of the `bad` document.
    let damaged: Vec<StorageKey> = {
        let storage = open(dir.path());
        let entries = storage.range(&StorageKey::doc_prefix(&bad)).expect("range");
        let mut ops = Vec::new();
        let mut keys = Vec::new();
        for (key, mut value) in entries {
            if matches!(key.classify(), Some(DocKey::Chunk(..))) {
                let mid = value.len() / 2;
                value[mid] ^= 0xff;
                keys.push(key.clone());
                ops.push(BatchOp::Put(key, value));
            }
        }
        storage.batch(ops).expect("write damage");
        keys
    };
    assert!(!damaged.is_empty());

    let storage = open(dir.path());
    let repo = Repo::start(RepoConfig::new(None), storage.clone());
    let mut events = repo.events();
    let found = repo.find(&good).await.expect("the intact document loads");
    assert_eq!(read_str(&found, "value").await.as_deref(), Some("intact"));

    match repo.find(&bad).await {
        Err(RepoError::Unavailable(id)) => assert_eq!(id, bad),
        other => panic!("a document whose only chunks are corrupt loaded: {other:?}"),
    }
    let reported = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::CorruptChunk {
                document_id,
                key,
                reason,
            }) = events.recv().await
            {
                return (document_id, key, reason);
            }
        }
    })
    .await
    .expect("a CorruptChunk event");
    assert_eq!(reported.0, bad);
    assert!(
        damaged.contains(&reported.1),
        "reported key {} is one of the damaged ones",
        reported.1
    );
    assert!(
        reported.2.contains("corrupt") || reported.2.contains("checksum"),
        "{}",
        reported.2
    );
    // Nothing was deleted: the damaged bytes are still there for recovery.
    for key in &damaged {
        assert!(
            storage.get(key).expect("get").is_some(),
            "{key} was deleted"
        );
    }
    repo.shutdown().await;
}

/// Compaction replaces incremental chunks with snapshots, but every old
/// version stays reachable by its heads after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_stays_reachable_after_compaction_and_restart() {
    // A full document hands storage a ready snapshot; a change log has
    // storage merge the chunks.
    for kind in [ReplicaKind::FullDocument, ReplicaKind::ChangeLog] {
        versions_survive_compaction(kind).await;
    }
}

async fn versions_survive_compaction(kind: ReplicaKind) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (id, versions) = {
        let storage = open(dir.path());
        let mut config = RepoConfig::new(None);
        config.engine.compact_after_bytes = 0;
        config.engine.replica = kind.factory();
        let repo = Repo::start(config, storage.clone());
        let handle = repo.create(None).await.expect("create");
        let mut versions = Vec::new();
        for i in 0..60i64 {
            put_n(&handle, i).await;
            versions.push((i, handle.heads().await.expect("heads")));
            // Let each save land, so compactions can follow: one decided
            // while an earlier one is still running is skipped, and with
            // a slow disk the first could otherwise outlast all 60 edits.
            handle.saved().await.expect("saved");
        }
        repo.shutdown().await;
        let chunks = storage
            .range(&StorageKey::doc_prefix(handle.id()))
            .expect("range");
        let snapshots = chunks
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k.classify(),
                    Some(DocKey::Chunk(
                        converge_core::storage::ChunkKind::Snapshot,
                        _
                    ))
                )
            })
            .count();
        assert_eq!(
            snapshots,
            1,
            "{}: compaction keeps one snapshot",
            kind.name()
        );
        // Compaction runs in the background, so how many incrementals remain
        // depends on timing; fewer chunks than changes shows it ran.
        assert!(
            chunks.len() < 60,
            "{}: 60 changes were compacted into {} chunks",
            kind.name(),
            chunks.len()
        );
        (handle.id().clone(), versions)
    };
    let repo = Repo::start(RepoConfig::new(None), open(dir.path()));
    let handle = repo.find(&id).await.expect("found after restart");
    for (i, heads) in versions {
        let n = handle
            .with_doc(move |d| {
                let old = d.fork_at(&heads).expect("version reachable");
                old.get(ROOT, "n")
                    .ok()
                    .flatten()
                    .and_then(|(v, _)| v.as_i64())
            })
            .await
            .expect("alive")
            .flatten();
        assert_eq!(n, Some(i), "{}", kind.name());
    }
    repo.shutdown().await;
}

/// Two runtime repos over the in-memory transport: a change on one shows
/// up on the other, with its origin, and ephemeral data passes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_repos_sync_over_the_in_memory_transport() {
    use converge_core::engine::Origin;
    use converge_core::storage::MemoryStorage;
    use converge_core::transport::memory;

    let alice = Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()));
    let bob = Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()));
    let _link = memory::connect(&alice, &bob);
    let doc = alice.create(None).await.expect("create");
    let mut bob_events = bob.events();
    let on_bob = wait::until("bob finds alice's document", || async {
        bob.find(doc.id()).await.ok()
    })
    .await;
    doc.change(|d| {
        let mut tx = d.transaction();
        tx.put(ROOT, "from", "alice").expect("put");
        tx.commit();
    })
    .await
    .expect("change");
    let alice_heads = doc.heads().await.expect("heads");
    let origin = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::DocChanged { heads, origin, .. }) = bob_events.recv().await {
                if heads == alice_heads {
                    return origin;
                }
            }
        }
    })
    .await
    .expect("bob hears of the change");
    assert_eq!(origin, Origin::Remote(alice.peer_id().clone()));
    assert_eq!(read_str(&on_bob, "from").await.as_deref(), Some("alice"));

    let sent = doc.broadcast(b"hi".to_vec()).await.expect("broadcast");
    assert_eq!(sent, 1);
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Ephemeral {
                data, sender_id, ..
            }) = bob_events.recv().await
            {
                return (data, sender_id);
            }
        }
    })
    .await
    .expect("bob gets the ephemeral message");
    assert_eq!(got, (b"hi".to_vec(), alice.peer_id().clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_repo_without_shutdown_releases_the_store_and_keeps_its_writes() {
    // Mobile apps drop a repo without ceremony (an Android activity goes
    // away); the store must be released for the next repo on the same
    // directory, with every change written.
    let dir = tempfile::tempdir().expect("tempdir");
    let id = {
        let repo = Repo::start(RepoConfig::new(None), open(dir.path()));
        write(&repo, "kept").await
    };
    let storage = wait::until("the dropped repo releases the store", || async {
        RocksStorage::open(dir.path(), false).ok().map(Arc::new)
    })
    .await;
    let repo = Repo::start(RepoConfig::new(None), storage);
    let handle = repo.find(&id).await.expect("the change was written");
    assert_eq!(read_str(&handle, "value").await.as_deref(), Some("kept"));
    repo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_store_even_while_handles_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::start(RepoConfig::new(None), open(dir.path()));
    let id = write(&repo, "kept").await;
    let handle = repo.handle(id.clone());
    repo.shutdown().await;
    // `repo` and `handle` are still alive: the store must be free anyway.
    let again = Repo::start(RepoConfig::new(None), open(dir.path()));
    assert!(again.find(&id).await.is_ok());
    assert!(matches!(repo.documents().await, Err(RepoError::Stopped)));
    drop(handle);
    again.shutdown().await;
}

/// `DocHandle::saved` returns once the document's changes are on disk, and
/// the store then holds them (a restart finds the last change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_waits_until_the_changes_are_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = {
        let storage = open(dir.path());
        let repo = Repo::start(RepoConfig::new(None), storage.clone());
        let handle = repo.create(None).await.expect("create");
        for i in 0..20i64 {
            put_n(&handle, i).await;
        }
        handle.saved().await.expect("saved");
        let status = handle
            .sync_status()
            .await
            .expect("status")
            .expect("in memory");
        assert!(status.saved);
        // Still running: whatever `saved` promised must already be in the
        // store, readable as the document with the last change.
        let mut replica = converge_core::engine::FullDocument::new(automerge::ActorId::random());
        for (key, bytes) in storage
            .range(&StorageKey::doc_prefix(handle.id()))
            .expect("range")
        {
            if matches!(key.classify(), Some(DocKey::Chunk(..))) {
                converge_core::engine::Replica::load_chunk(&mut replica, &bytes).expect("chunk");
            }
        }
        let doc = converge_core::engine::Replica::document(&replica).expect("doc");
        assert_eq!(
            doc.get(ROOT, "n")
                .expect("get")
                .map(|(v, _)| v.to_string())
                .as_deref(),
            Some("19")
        );
        repo.shutdown().await;
        handle.id().clone()
    };
    let repo = Repo::start(RepoConfig::new(None), open(dir.path()));
    let handle = repo.find(&id).await.expect("found");
    let n = handle
        .with_doc(|d| d.get(ROOT, "n").expect("get").map(|(v, _)| v.to_string()))
        .await
        .expect("read");
    assert_eq!(n.flatten().as_deref(), Some("19"));
    repo.shutdown().await;
}

/// Edits handed over without waiting run in call order, even when their
/// futures are dropped, and a burst of them is saved as one chunk per batch
/// rather than one per edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_edits_run_in_order_and_are_saved_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = open(dir.path());
    let repo = Repo::start(RepoConfig::new(None), storage.clone());
    let handle = repo.create(None).await.expect("create");
    let list = handle
        .change(|d| {
            let mut tx = d.transaction();
            let l = tx
                .put_object(ROOT, "list", automerge::ObjType::List)
                .expect("list");
            tx.commit();
            l
        })
        .await
        .expect("change");
    handle.saved().await.expect("saved");
    let before = storage
        .range(&StorageKey::doc_prefix(handle.id()))
        .expect("range")
        .len();
    let mut kept = Vec::new();
    for i in 0..200i64 {
        let list = list.clone();
        let done = handle.change(move |d| {
            let mut tx = d.transaction();
            tx.insert(&list, i as usize, i).expect("insert");
            tx.commit();
        });
        // Every other future is dropped: its edit must still happen.
        if i % 2 == 0 {
            kept.push(done);
        }
    }
    for done in kept {
        done.await.expect("edit");
    }
    handle.saved().await.expect("saved");
    let values = handle
        .with_doc(move |d| {
            (0..d.length(&list))
                .map(|i| d.get(&list, i).expect("get").and_then(|(v, _)| v.as_i64()))
                .collect::<Vec<_>>()
        })
        .await
        .expect("alive")
        .expect("in memory");
    assert_eq!(values, (0..200).map(Some).collect::<Vec<_>>());
    let chunks = storage
        .range(&StorageKey::doc_prefix(handle.id()))
        .expect("range")
        .len()
        - before;
    // The actor may start on the first edit before the rest are queued, so
    // the exact count depends on timing; one chunk per edit means no
    // batching at all.
    assert!(
        (1..100).contains(&chunks),
        "200 queued edits were saved as {chunks} chunks"
    );
    repo.shutdown().await;
}

/// Storage whose writes fail while `broken` is set (a full or unplugged
/// disk); reads always work.
#[derive(Debug, Default)]
struct Flaky {
    inner: converge_core::storage::MemoryStorage,
    broken: std::sync::atomic::AtomicBool,
    failed_writes: std::sync::atomic::AtomicUsize,
}

impl Storage for Flaky {
    fn get(
        &self,
        key: &StorageKey,
    ) -> Result<Option<Vec<u8>>, converge_core::storage::StorageError> {
        self.inner.get(key)
    }
    fn range(
        &self,
        prefix: &StorageKey,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, converge_core::storage::StorageError> {
        self.inner.range(prefix)
    }
    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), converge_core::storage::StorageError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.broken.load(SeqCst) {
            self.failed_writes.fetch_add(1, SeqCst);
            return Err(converge_core::storage::StorageError::backend(
                "no space left on device",
            ));
        }
        self.inner.batch(ops)
    }
}

/// A write that fails is tried again on its own, with nothing else
/// changing, once storage works again; until then the document is not
/// reported saved. On virtual time: the retries wait for the repo's clock,
/// which the test moves on in steps while it looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_are_retried_without_another_change() {
    use std::sync::atomic::Ordering::SeqCst;
    const STEP: Duration = Duration::from_millis(100);
    let storage = Arc::new(Flaky::default());
    let clock = ManualClock::new();
    let mut config = RepoConfig::new(None);
    config.clock = Arc::new(clock.clone());
    let repo = Repo::start(config, storage.clone());
    let mut events = repo.events();
    storage.broken.store(true, SeqCst);
    let id = write(&repo, "kept").await;
    // Someone waits for it to be on disk.
    let waiting = tokio::spawn({
        let handle = repo.handle(id.clone());
        async move { handle.saved().await }
    });
    // Writing it fails; then, with nothing else happening but time
    // passing, it is tried again (and fails again), with nothing reported
    // saved.
    let first_failures = wait::until("the document is written (and fails)", || async {
        let n = storage.failed_writes.load(SeqCst);
        (n > 0).then_some(n)
    })
    .await;
    wait::until("the failed write is tried again as time passes", || {
        clock.advance(STEP);
        let retried = storage.failed_writes.load(SeqCst) > first_failures;
        async move { retried.then_some(()) }
    })
    .await;
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, Event::Saved { ref document_id, .. } if *document_id == id),
            "reported saved while storage failed"
        );
    }
    assert!(
        !waiting.is_finished(),
        "saved() returned while storage failed"
    );
    // The disk comes back: with no further edit, the document is written
    // and reported saved.
    storage.broken.store(false, SeqCst);
    wait::until("saved once storage works again", || {
        clock.advance(STEP);
        let mut saved = false;
        loop {
            match events.try_recv() {
                Ok(Event::Saved { document_id, .. }) if document_id == id => saved = true,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                Err(e) => panic!("events ended: {e}"),
            }
        }
        async move { saved.then_some(()) }
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter is told")
        .expect("task")
        .expect("saved");
    repo.shutdown().await;
    // Its contents are on "disk": a new repo over the same storage reads them.
    let again = Repo::start(RepoConfig::new(None), storage.clone());
    let handle = again.find(&id).await.expect("found after the retry");
    assert_eq!(read_str(&handle, "value").await.as_deref(), Some("kept"));
    again.shutdown().await;
}

/// `WhenSaved` (what `DocHandle::saved` asks) answers once the writes
/// holding the document's changes at the time of asking are confirmed, even
/// while later writes are outstanding: under a steady stream of edits there
/// may never be a moment with nothing left to write. A failed write holds
/// the answer back until everything has been written again.
#[test]
fn when_saved_answers_for_the_changes_made_before_it() {
    use converge_core::engine::{
        Command, CommandId, CommandResult, Engine, EngineConfig, Input, Output, Timestamp,
    };
    use converge_core::storage::{StorageOp, StorageResult, TaskId};
    use converge_core::wire::{PeerId, StorageId};

    fn writes(out: &Output) -> Vec<TaskId> {
        out.storage
            .iter()
            .filter(|t| matches!(t.op, StorageOp::Put(..) | StorageOp::Batch(_)))
            .map(|t| t.id)
            .collect()
    }
    fn answered(out: &Output) -> Vec<u64> {
        out.completed
            .iter()
            .filter(|(_, r)| matches!(r, CommandResult::Saved(_)))
            .map(|(c, _)| c.0)
            .collect()
    }
    let mut cfg = EngineConfig::new(
        PeerId::new("writer").expect("peer id"),
        Some(StorageId::new("writer-storage").expect("storage id")),
        7,
    );
    // Incremental chunks only: one write per save, nothing compacted.
    cfg.compact_after_bytes = usize::MAX;
    let mut engine = Engine::new(cfg);
    let now = Timestamp(1_000);
    let out = engine.handle(
        now,
        Input::Command(
            CommandId(1),
            Command::Create {
                initial: None,
                owner: None,
            },
        ),
    );
    let Some((_, CommandResult::Create(Ok(id)))) = out.completed.first() else {
        panic!("not created: {:?}", out.completed);
    };
    for t in &out.storage {
        engine.handle(
            now,
            Input::Storage {
                task: t.id,
                result: StorageResult::Written,
            },
        );
    }
    let edit = |engine: &mut Engine, n: i64| {
        let ((), out) = engine
            .change(now, id, |d| {
                let mut tx = d.transaction();
                tx.put(ROOT, "n", n).expect("put");
                tx.commit();
            })
            .expect("change");
        let w = writes(&out);
        assert_eq!(w.len(), 1, "one write per edit");
        w[0]
    };
    let done = |task| Input::Storage {
        task,
        result: StorageResult::Written,
    };
    let ask = |c| {
        Input::Command(
            CommandId(c),
            Command::WhenSaved {
                document_id: id.clone(),
            },
        )
    };

    // Asked while the first write is out; a second edit follows.
    let w1 = edit(&mut engine, 1);
    assert!(answered(&engine.handle(now, ask(10))).is_empty());
    let w2 = edit(&mut engine, 2);
    // The first write lands: the caller's changes are on disk, though the
    // document as a whole is not.
    assert_eq!(answered(&engine.handle(now, done(w1))), vec![10]);
    assert_eq!(engine.sync_status(id).map(|s| s.saved), Some(false));

    // Asked while the second is out; it fails after a third was issued on
    // top of it, so the third landing proves nothing.
    assert!(answered(&engine.handle(now, ask(11))).is_empty());
    let w3 = edit(&mut engine, 3);
    let failed = engine.handle(
        now,
        Input::Storage {
            task: w2,
            result: StorageResult::Failed(std::sync::Arc::new(StorageError::backend("disk full"))),
        },
    );
    assert!(answered(&failed).is_empty());
    assert!(answered(&engine.handle(now, done(w3))).is_empty());
    // The retry writes everything again; once it lands, the caller is told.
    let retry_at = failed.next_wakeup.expect("a retry is scheduled");
    let retry = engine.handle(retry_at, Input::Tick);
    let w4 = writes(&retry);
    assert_eq!(w4.len(), 1, "the retry rewrites the document");
    assert!(answered(&retry).is_empty());
    assert_eq!(answered(&engine.handle(retry_at, done(w4[0]))), vec![11]);

    // Nothing waiting to be written, or not in memory: answered at once.
    assert_eq!(answered(&engine.handle(retry_at, ask(12))), vec![12]);
    let elsewhere = converge_core::wire::DocumentId::from_random([9; 16]);
    let out = engine.handle(
        retry_at,
        Input::Command(
            CommandId(13),
            Command::WhenSaved {
                document_id: elsewhere,
            },
        ),
    );
    assert_eq!(answered(&out), vec![13]);
}

/// Document metadata has one writer, the engine, and goes to disk in the
/// same write as the change it describes: whoever reads the store finds
/// metadata for every document whose changes are there, naming the peer
/// that wrote last. Listing (HTTP and bindings both use
/// `documents_with_meta`) reads it back after a restart, and a store from
/// before metadata existed gets it filled in once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_written_with_the_change_and_names_the_writer() {
    use converge_core::storage::{backfill_meta, DocMeta, MemoryStorage};
    use converge_core::transport::memory;

    let dir = tempfile::tempdir().expect("tempdir");
    let alice = Repo::start(RepoConfig::new(None), Arc::new(MemoryStorage::new()));
    let store = open(dir.path());
    let bob = Repo::start(RepoConfig::new(None), store.clone());
    let _link = memory::connect(&alice, &bob);
    let doc = write(&alice, "from alice").await;
    let on_bob = wait::until("bob finds alice's document", || async {
        bob.find(&doc).await.ok()
    })
    .await;
    on_bob.saved().await.expect("saved");
    // On disk, beside the changes: every document with a chunk has
    // metadata, and alice is named as the writer.
    let stored = DocMeta::all(&*store).expect("read metadata");
    let chunks = converge_core::storage::document_ids(&*store).expect("ids");
    assert_eq!(
        stored.keys().cloned().collect::<Vec<_>>(),
        chunks.into_iter().collect::<Vec<_>>()
    );
    let meta = stored.get(&doc).expect("metadata for the document");
    assert_eq!(meta.last_writer.as_deref(), Some(alice.peer_id().as_str()));
    let created = meta.created_ms.expect("created is recorded");
    assert!(created <= meta.updated_ms);
    // A change made on bob's side names nobody (made here).
    put_n(&on_bob, 1).await;
    on_bob.saved().await.expect("saved");
    let mine = DocMeta::all(&*store).expect("read")[&doc].clone();
    assert_eq!(mine.last_writer, None);
    assert_eq!(mine.created_ms, meta.created_ms, "created stays");
    bob.shutdown().await;
    drop((on_bob, store));

    // After a restart the listing has it, from disk; a change to the
    // document opened from disk updates it and keeps when it was created
    // (the engine does not read metadata to open a document).
    let bob = Repo::start(RepoConfig::new(None), open(dir.path()));
    let listed = bob.documents_with_meta().await.expect("list");
    assert_eq!(listed.get(&doc), Some(&Some(mine.clone())));
    let reopened = bob.find(&doc).await.expect("find");
    put_n(&reopened, 2).await;
    reopened.saved().await.expect("saved");
    let after = bob.meta(&doc).await.expect("meta").expect("some");
    assert_eq!(
        after.created_ms,
        Some(created),
        "created stays after a reopen"
    );
    assert!(after.updated_ms >= mine.updated_ms);
    let listed = bob.documents_with_meta().await.expect("list");
    assert_eq!(listed.get(&doc), Some(&Some(after.clone())));
    drop(reopened);
    bob.shutdown().await;
    let on_disk = DocMeta::all(&*open(dir.path())).expect("read")[&doc].clone();
    assert_eq!(on_disk, after);

    // A store whose documents predate metadata: the next start fills it in
    // for every document, once.
    let legacy = open(dir.path());
    legacy
        .batch(vec![
            BatchOp::Delete(StorageKey::doc_meta(&doc)),
            BatchOp::Delete(StorageKey::doc_created(&doc)),
            BatchOp::Delete(StorageKey::new(["meta-backfilled"])),
        ])
        .expect("forget metadata");
    assert!(DocMeta::all(&*legacy).expect("read").is_empty());
    drop(legacy);
    let bob = Repo::start(RepoConfig::new(None), open(dir.path()));
    let listed = bob.documents().await.expect("list");
    assert_eq!(listed, vec![doc.clone()]);
    bob.shutdown().await;
    assert_eq!(
        backfill_meta(&*open(dir.path()), 0).expect("second run"),
        0,
        "once only"
    );
}
