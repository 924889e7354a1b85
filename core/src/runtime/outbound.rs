//! Each connection's outbound queue: what the repo hands a transport to
//! write, in order, with a cut-off for a peer that reads too slowly.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::clock::Clock;

/// What a connection task is told to do by the repo.
#[derive(Debug)]
pub enum Outbound {
    /// Send one binary frame.
    Frame(Vec<u8>),
    /// Close the connection with this WebSocket close code and reason.
    Close(u16, String),
}

/// What the repo sends down one connection: frames and orderly closes in
/// order, and — ahead of anything still waiting — the news that the peer is
/// cut off (it fell too far behind reading). One small shared lane per
/// connection: with tens of thousands of idle connections, a channel's
/// preallocated block each (about a KiB) is a tenth of what one costs.
#[derive(Debug)]
pub struct OutboundQueue {
    lane: Arc<Lane>,
}

/// What [`OutboundQueue::next`] found.
#[derive(Debug)]
pub enum Next {
    /// The peer is cut off, for this reason: close at once.
    Cut(String),
    /// The next item, in order.
    Item(Outbound),
    /// The repo let go of the connection and nothing is left.
    Released,
}

/// The state both ends of a connection's queue share.
#[derive(Debug)]
pub(super) struct Lane {
    items: std::sync::Mutex<LaneItems>,
    wake: tokio::sync::Notify,
    /// Bytes of frames queued and not yet taken by the transport.
    bytes: AtomicUsize,
    /// The limit those bytes are held to (set when the repo queues).
    limit: AtomicUsize,
    /// When (the clock's ms) the queue was last seen at or under it.
    under_at: AtomicU64,
    clock: Arc<dyn Clock>,
}

#[derive(Debug, Default)]
struct LaneItems {
    queue: std::collections::VecDeque<Outbound>,
    cut: Option<String>,
    released: bool,
}

impl Lane {
    pub(super) fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            items: std::sync::Mutex::new(LaneItems::default()),
            wake: tokio::sync::Notify::new(),
            bytes: AtomicUsize::new(0),
            limit: AtomicUsize::new(usize::MAX),
            under_at: AtomicU64::new(0),
            clock,
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now().0
    }

    /// Runs `f` on the shared items (a poisoned lock is still usable: the
    /// items are plain data) and wakes the transport.
    fn update(&self, f: impl FnOnce(&mut LaneItems)) {
        f(&mut self.items.lock().unwrap_or_else(|p| p.into_inner()));
        self.wake.notify_one();
    }

    fn take(&self, cut_first: bool) -> Option<Next> {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if cut_first {
            if let Some(reason) = items.cut.take() {
                return Some(Next::Cut(reason));
            }
        }
        match items.queue.pop_front() {
            Some(item) => {
                if items.queue.is_empty() && items.queue.capacity() > 16 {
                    // Give back what a burst grew.
                    items.queue = Default::default();
                }
                drop(items);
                if let Outbound::Frame(bytes) = &item {
                    let left = self.bytes.fetch_sub(bytes.len(), Ordering::Relaxed) - bytes.len();
                    if left <= self.limit.load(Ordering::Relaxed) {
                        self.under_at.store(self.now_ms(), Ordering::Relaxed);
                    }
                }
                Some(Next::Item(item))
            }
            None if items.released => Some(Next::Released),
            None => None,
        }
    }
}

impl OutboundQueue {
    /// Waits for the next thing to do: a cut goes ahead of queued items.
    pub async fn next(&mut self) -> Next {
        loop {
            // Taken before looking: a wake-up in between is not lost.
            let woken = self.lane.wake.notified();
            if let Some(next) = self.lane.take(true) {
                return next;
            }
            woken.await;
        }
    }

    /// The next queued item, if one is waiting now (a cut is left for
    /// [`OutboundQueue::next`] or [`CutSignal::cut`]).
    pub fn try_next(&mut self) -> Option<Outbound> {
        match self.lane.take(false) {
            Some(Next::Item(item)) => Some(item),
            _ => None,
        }
    }

    /// A handle that resolves when the peer is cut off, to race writes with.
    pub fn cut_signal(&self) -> CutSignal {
        CutSignal {
            lane: self.lane.clone(),
        }
    }
}

/// See [`OutboundQueue::cut_signal`].
#[derive(Debug)]
pub struct CutSignal {
    lane: Arc<Lane>,
}

impl CutSignal {
    /// Resolves with the reason once the peer is cut off.
    pub async fn cut(&self) -> String {
        loop {
            let woken = self.lane.wake.notified();
            let taken = self
                .lane
                .items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .cut
                .take();
            if let Some(reason) = taken {
                return reason;
            }
            woken.await;
            // Whatever else woke us (a new frame) is found by `next`, which
            // looks before it waits.
        }
    }
}

/// The repo's end of one connection's queue.
#[derive(Debug)]
pub(super) struct ConnTx {
    lane: Arc<Lane>,
}

/// A new connection's queue: the repo's end and the transport's.
pub(super) fn queue(clock: Arc<dyn Clock>) -> (ConnTx, OutboundQueue) {
    let lane = Arc::new(Lane::new(clock));
    (ConnTx { lane: lane.clone() }, OutboundQueue { lane })
}

impl ConnTx {
    /// Queues a frame, unless more than `limit` bytes have been waiting for
    /// longer than `grace`; then hands it back.
    pub(super) fn push(
        &self,
        frame: Vec<u8>,
        (limit, grace): (usize, Duration),
    ) -> Result<(), Vec<u8>> {
        let w = &self.lane;
        w.limit.store(limit, Ordering::Relaxed);
        let len = frame.len();
        let before = w.bytes.fetch_add(len, Ordering::Relaxed);
        let now = w.now_ms();
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        if before == 0 || before + len <= limit {
            w.under_at.store(now, Ordering::Relaxed);
        } else if now.saturating_sub(w.under_at.load(Ordering::Relaxed)) > grace_ms {
            w.bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(frame);
        }
        w.update(|items| items.queue.push_back(Outbound::Frame(frame)));
        Ok(())
    }

    /// Queues an orderly close behind everything already queued.
    pub(super) fn close(&self, code: u16, reason: String) {
        self.lane
            .update(|items| items.queue.push_back(Outbound::Close(code, reason)));
    }

    /// Cuts the peer off, ahead of whatever waits.
    pub(super) fn cut(&self, reason: String) {
        self.lane.update(|items| items.cut = Some(reason));
    }
}

impl Drop for ConnTx {
    fn drop(&mut self) {
        self.lane.update(|items| items.released = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame pushed reaches the reader, in order, however its waits
    /// interleave with pushes: the reader drops its wait now and then (as
    /// the transport does when its ping timer fires) and races a cut
    /// signal while "writing", from another thread than the pusher.
    #[test]
    fn no_frame_is_lost_between_pusher_and_reader() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for round in 0..20u64 {
                let (tx, mut queue) = queue(Arc::new(super::super::SystemClock::new()));
                let cut = queue.cut_signal();
                const N: usize = 20_000;
                let pusher = std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_u64 ^ round;
                    for i in 0..N {
                        let frame = (i as u32).to_le_bytes().to_vec();
                        tx.push(frame, (usize::MAX, Duration::from_secs(10)))
                            .expect("no limit");
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if x % 7 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    // Dropping the sender releases the lane.
                });
                let mut seen = 0usize;
                // Odd rounds drop the wait now and then; even rounds never
                // do, so a lost wake-up would stall them for good.
                let period = if round % 2 == 1 { 50 } else { 3_600_000_000 };
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::now() + Duration::from_micros(period),
                    Duration::from_micros(period),
                );
                let reader = async {
                    loop {
                        tokio::select! {
                            next = queue.next() => match next {
                                Next::Item(Outbound::Frame(bytes)) => {
                                    let n = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
                                    assert_eq!(n as usize, seen, "in order");
                                    seen += 1;
                                    // A "write" racing the cut signal.
                                    tokio::select! {
                                        biased;
                                        _ = cut.cut() => panic!("never cut"),
                                        _ = tokio::task::yield_now() => {}
                                    }
                                    while let Some(Outbound::Frame(bytes)) = queue.try_next() {
                                        let n = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
                                        assert_eq!(n as usize, seen, "in order");
                                        seen += 1;
                                    }
                                }
                                Next::Item(Outbound::Close(..)) | Next::Cut(_) => panic!("unexpected"),
                                Next::Released => return,
                            },
                            _ = tick.tick() => {}
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(20), reader)
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: stalled after {seen} frames"));
                pusher.join().expect("pusher");
                assert_eq!(seen, N);
            }
        });
    }
}
