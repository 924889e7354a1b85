//! The runtime's clock: the engine's [`Timestamp`]s from a monotonic clock.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::engine::Timestamp;

/// Milliseconds since the epoch, monotonic within the process.
#[derive(Debug)]
pub(super) struct Clock {
    start: Instant,
    epoch_ms: u64,
}

impl Clock {
    pub(super) fn new() -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        Self {
            start: Instant::now(),
            epoch_ms,
        }
    }

    pub(super) fn now(&self) -> Timestamp {
        Timestamp(self.epoch_ms + self.start.elapsed().as_millis() as u64)
    }

    pub(super) fn instant_of(&self, t: Timestamp) -> Instant {
        self.start + Duration::from_millis(t.0.saturating_sub(self.epoch_ms))
    }
}
