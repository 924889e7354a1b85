//! Waiting on conditions instead of sleeping for a guessed time: each wait
//! polls (or listens) until what it waits for is true and fails with what
//! it waited for at a deadline generous enough for a loaded machine.

use std::future::Future;
use std::time::Duration;

use converge_core::runtime::Repo;
use tokio::time::Instant;

/// How long a test waits for something that should take milliseconds;
/// reached only when the test fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// How often a condition is looked at again.
const POLL: Duration = Duration::from_millis(20);

/// Runs `check` until it gives `Some`, every `every`; panics naming
/// `what` if that takes longer than `within`.
pub(crate) async fn until_every<T, F, Fut>(
    what: &str,
    within: Duration,
    every: Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(every).await;
    }
}

/// [`until_every`] looking every 20 ms, for up to [`DEADLINE`].
pub(crate) async fn until<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    until_every(what, DEADLINE, POLL, check).await
}

/// Waits until `repo` has finished the handshake with `peers` peers.
pub(crate) async fn connected(repo: &Repo, peers: usize) {
    until(
        &format!("{} connected to {peers} peer(s)", repo.peer_id()),
        || async {
            let sessions = repo.sessions().await.expect("repo alive");
            (sessions.len() >= peers).then_some(())
        },
    )
    .await
}
