//! Where the runtime's time comes from: a [`Clock`], chosen in
//! [`RepoConfig::clock`](super::RepoConfig::clock).
//!
//! The clock drives everything the runtime times: the engine's timers
//! (handshake timeout, request timeout and grace, resync, save retries),
//! each connection's outbound grace, presence heartbeats and time-to-live,
//! and the times stamped on sessions and Context changes. Transports keep
//! tokio's time: their pings and reconnect backoff deal with real sockets.
//! So does [`DocHandle::wait_synced`](super::DocHandle::wait_synced), whose
//! timeout is how long its caller is willing to wait.
//!
//! [`SystemClock`] (the default) is real time. [`ManualClock`] is virtual
//! time for tests: it stands still until the test moves it, so a test can
//! step to just before a deadline, see that nothing happened, step past it
//! and see the timer fire, without waiting and without races.
//!
//! # Why not tokio's paused time
//!
//! [`SystemClock`] reads [`tokio::time::Instant`], so under tokio's
//! `time::pause()` it follows tokio's virtual clock too. But a paused
//! runtime *auto-advances* to its next timer whenever every task is idle,
//! and the repo's storage thread is an OS thread that tokio does not see:
//! while a write or load is under way the actor is idle waiting for it, so
//! tokio jumps ahead and a request or handshake timeout fires "before" the
//! storage answer that would have prevented it. Such a test passes or fails
//! with the thread's scheduling. A [`ManualClock`] moves only when told to,
//! whatever the threads do; it does not touch tokio's clock (which keeps
//! running in real time for the transports), so the two never interfere.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::engine::Timestamp;

/// A future that resolves when a clock reaches a time.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of time for a [`Repo`](super::Repo): milliseconds since the
/// Unix epoch, as the engine counts them.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The time now. Must not go back.
    fn now(&self) -> Timestamp;

    /// Resolves once [`Clock::now`] has reached `at` (at once if it has).
    fn sleep_until(&self, at: Timestamp) -> Sleep;
}

/// Real time: monotonic, anchored at the wall clock when it was made.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
    epoch_ms: u64,
}

impl SystemClock {
    /// A clock reading the wall-clock time now and counting on from it
    /// monotonically (a later change of the wall clock does not move it).
    pub fn new() -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        Self {
            start: Instant::now(),
            epoch_ms,
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.epoch_ms + self.start.elapsed().as_millis() as u64)
    }

    fn sleep_until(&self, at: Timestamp) -> Sleep {
        let deadline = self.start + Duration::from_millis(at.0.saturating_sub(self.epoch_ms));
        Box::pin(tokio::time::sleep_until(deadline))
    }
}

/// Virtual time for tests: stands still until [`ManualClock::advance`].
///
/// Cheap to clone; clones share one time, so several repos given clones
/// of one clock live in the same virtual time. Moving it wakes every
/// sleeper whose time has come. A repo serves a due timer before anything
/// sent to it after the clock moved, so after `advance`, any call on the
/// repo that answers (say [`Repo::sessions`](super::Repo::sessions)) sees
/// what the timers did.
///
/// Steps behave as time passing in one jump: timers that a step makes due
/// fire once, at the end of the step. To watch timers that follow one
/// another (a deadline that is extended, then expires), step through them.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<watch::Sender<Timestamp>>,
}

impl ManualClock {
    /// 2025-01-01T00:00:00Z, where [`ManualClock::new`] starts.
    pub const START: Timestamp = Timestamp(1_735_689_600_000);

    /// A clock standing at [`ManualClock::START`].
    pub fn new() -> Self {
        Self::starting_at(Self::START)
    }

    /// A clock standing at `at`.
    pub fn starting_at(at: Timestamp) -> Self {
        Self {
            now: Arc::new(watch::Sender::new(at)),
        }
    }

    /// Moves the clock forward by `by` (whole milliseconds).
    pub fn advance(&self, by: Duration) {
        self.now.send_modify(|now| *now = now.plus(by));
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.borrow()
    }

    fn sleep_until(&self, at: Timestamp) -> Sleep {
        let mut now = self.now.subscribe();
        Box::pin(async move {
            if now.wait_for(|now| *now >= at).await.is_err() {
                // The clock is gone: its time never comes.
                std::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_only_when_their_time_comes() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        let mut sleep = clock.sleep_until(t0.plus(Duration::from_millis(100)));
        clock.advance(Duration::from_millis(99));
        assert!(futures::FutureExt::now_or_never(&mut sleep).is_none());
        clock.advance(Duration::from_millis(1));
        assert!(futures::FutureExt::now_or_never(&mut sleep).is_some());
        assert_eq!(clock.now(), t0.plus(Duration::from_millis(100)));
        // A time already reached resolves at once.
        assert!(futures::FutureExt::now_or_never(clock.sleep_until(t0)).is_some());
    }
}
