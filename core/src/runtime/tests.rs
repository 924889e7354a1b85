//! The runtime's timers on virtual time: a [`ManualClock`] stands still
//! while the test looks, so "not yet" and "now" are checked exactly, with
//! no real waiting.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use super::{ManualClock, Next, Outbound, OutboundQueue, Repo, RepoConfig, RepoError};
use crate::engine::{ConnectionId, Direction};
use crate::storage::MemoryStorage;
use crate::wire::{self, DocumentId, Message, PeerId};

const MS: Duration = Duration::from_millis(1);

/// How long a test waits for something that happens without the clock
/// moving (the storage thread, the actor); generous, as it only matters
/// when the test fails.
const REAL_DEADLINE: Duration = Duration::from_secs(10);

fn repo_on(clock: &ManualClock) -> (Repo, RepoConfig) {
    let mut config = RepoConfig::new(None);
    config.clock = Arc::new(clock.clone());
    let repo = Repo::start(config.clone(), Arc::new(MemoryStorage::new()));
    (repo, config)
}

/// Returns once the actor has handled everything sent to it before, and
/// every timer the clock has made due.
async fn settle(repo: &Repo) {
    repo.sessions().await.expect("repo alive");
}

/// The next frame the repo sends on `queue`, decoded.
async fn next_message(queue: &mut OutboundQueue, what: &str) -> Message {
    match tokio::time::timeout(REAL_DEADLINE, queue.next()).await {
        Ok(Next::Item(Outbound::Frame(bytes))) => wire::decode(&bytes).expect("a valid frame"),
        Ok(other) => panic!("waiting for {what}: got {other:?}"),
        Err(_) => panic!("waiting for {what}: nothing within {REAL_DEADLINE:?}"),
    }
}

/// A peer played by the test: it dials in and completes the handshake,
/// then answers nothing.
async fn silent_peer(repo: &Repo) -> (ConnectionId, OutboundQueue) {
    let (conn, mut queue) = repo
        .open_connection(
            Direction::Incoming,
            None,
            crate::engine::Grant::everything().into(),
        )
        .expect("repo alive");
    let join = Message::Join {
        sender_id: PeerId::new("silent").expect("valid"),
        metadata: None,
        supported_protocol_versions: Some(vec!["1".into()]),
    };
    repo.received(conn, wire::encode(&join));
    let answer = next_message(&mut queue, "the answer to join").await;
    assert!(matches!(answer, Message::Peer { .. }), "{answer:?}");
    (conn, queue)
}

/// A connection that never says `join` is closed when the handshake
/// timeout passes, not a millisecond earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_at_the_handshake_timeout() {
    let clock = ManualClock::new();
    let (repo, config) = repo_on(&clock);
    let timeout = config.engine.handshake_timeout;
    let (_conn, mut queue) = repo
        .open_connection(
            Direction::Incoming,
            None,
            crate::engine::Grant::everything().into(),
        )
        .expect("repo alive");
    settle(&repo).await;

    clock.advance(timeout - MS);
    settle(&repo).await;
    assert!(
        queue.try_next().is_none(),
        "something was sent before the handshake timeout"
    );

    clock.advance(MS);
    settle(&repo).await;
    match queue.try_next() {
        Some(Outbound::Close(code, reason)) => {
            assert_eq!(
                code,
                crate::engine::close_code::HANDSHAKE_TIMEOUT,
                "{reason}"
            )
        }
        other => panic!("not closed at the handshake timeout: {other:?}"),
    }
    repo.shutdown().await;
}

/// `find` of a document that the only peer never sends: the request
/// timeout passes, is extended once (the peer is still being asked), and
/// when that passes too the document is unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_is_unavailable_once_the_request_timeout_passes_twice() {
    let clock = ManualClock::new();
    let (repo, config) = repo_on(&clock);
    let timeout = config.engine.request_timeout;
    let (_conn, mut peer) = silent_peer(&repo).await;

    let id = DocumentId::from_random([7; 16]);
    let mut find = Box::pin(repo.find(&id));
    assert!((&mut find).now_or_never().is_none(), "answered at once");
    // The repo looks in storage first (on its thread, while the clock
    // stands still), then asks the peer: the request timeout runs from here.
    match next_message(&mut peer, "the request").await {
        Message::Request(m) => assert_eq!(m.document_id, id),
        other => panic!("expected a request, got {other:?}"),
    }

    for (step, by) in [timeout - MS, MS, timeout - 2 * MS, MS]
        .into_iter()
        .enumerate()
    {
        clock.advance(by);
        settle(&repo).await;
        assert!(
            (&mut find).now_or_never().is_none(),
            "step {step}: answered before the (extended) request timeout"
        );
    }
    clock.advance(MS);
    settle(&repo).await;
    match (&mut find).now_or_never() {
        Some(Err(RepoError::Unavailable(got))) => assert_eq!(got, id),
        Some(other) => panic!("expected unavailable, got {other:?}"),
        None => panic!("still waiting after twice the request timeout"),
    }
    repo.shutdown().await;
}

/// With nobody to ask, `find` waits the short grace before answering
/// unavailable (a peer may be offering the document that very moment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_with_nobody_to_ask_is_unavailable_after_the_grace() {
    let clock = ManualClock::new();
    let (repo, config) = repo_on(&clock);
    let grace = config.engine.unavailable_grace;
    let id = DocumentId::from_random([8; 16]);
    let mut find = Box::pin(repo.find(&id));
    assert!((&mut find).now_or_never().is_none(), "answered at once");
    // Wait (in real time) until the storage lookup is done and the grace
    // timer runs: the repo then holds the document as requesting.
    let deadline = tokio::time::Instant::now() + REAL_DEADLINE;
    loop {
        let requesting = repo
            .inspect({
                let id = id.clone();
                move |engine| engine.status(&id)
            })
            .await
            .expect("repo alive");
        if requesting == Some(crate::engine::DocStatus::Requesting) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the storage lookup never finished"
        );
        tokio::task::yield_now().await;
    }

    clock.advance(grace - MS);
    settle(&repo).await;
    assert!(
        (&mut find).now_or_never().is_none(),
        "answered before the grace passed"
    );
    clock.advance(MS);
    settle(&repo).await;
    assert!(
        matches!(
            (&mut find).now_or_never(),
            Some(Err(RepoError::Unavailable(_)))
        ),
        "not unavailable once the grace passed"
    );
    repo.shutdown().await;
}
