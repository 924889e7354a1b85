//! Transports: carry a [`Repo`](crate::runtime::Repo)'s frames over real
//! connections.
//!
//! [`drive`] runs one connection for any WebSocket implementation, mapped
//! onto [`Incoming`] and [`Outgoing`] frames: it feeds binary frames to the
//! repo, writes the repo's frames out, pings to detect dead peers, and turns
//! protocol violations (text frames, oversized messages) into a close with
//! the right code. [`ws`] has the tokio-tungstenite client with reconnect;
//! [`memory`] links two repos in one process.

pub mod memory;
pub mod ws;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;

use crate::engine::{Direction, Grant};
use crate::runtime::{Next, Outbound, Repo};

/// A frame read from a WebSocket, reduced to what matters here.
#[derive(Debug)]
pub enum Incoming {
    /// A binary message: one protocol message.
    Binary(Vec<u8>),
    /// A text message (not allowed by the protocol).
    Text,
    /// A ping or pong (proof of life; pongs are answered by the library).
    Alive,
    /// The peer closed the connection.
    Close,
    /// The message exceeded the configured size limit.
    TooBig,
    /// The peer sends faster than it may (closed with 1008).
    RateLimited,
    /// The connection failed.
    Error(String),
}

/// A frame to write.
#[derive(Debug)]
pub enum Outgoing {
    /// A binary message.
    Binary(Vec<u8>),
    /// A liveness probe.
    Ping,
    /// Close with a code and a reason.
    Close(u16, String),
}

pub use converge_proto::engine::close_code;

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Who ended it and why.
    pub reason: String,
}

/// Runs one connection until it ends. `remote` names the other end (for
/// session listings); `grant` is what it may do (see [`Grant`]: a relay
/// builds it from the client's token, everyone else gives
/// [`Grant::everything`]); `ping_every` sends a ping at that interval and
/// gives up on a peer silent for two intervals.
#[allow(clippy::too_many_arguments)]
pub async fn drive<St, Si>(
    repo: &Repo,
    direction: Direction,
    remote: Option<String>,
    grant: Arc<Grant>,
    mut stream: St,
    mut sink: Si,
    ping_every: Option<Duration>,
) -> Ended
where
    St: Stream<Item = Incoming> + Unpin,
    Si: Sink<Outgoing> + Unpin,
{
    let Ok((conn, mut outbound)) = repo.open_connection(direction, remote, grant) else {
        return Ended {
            reason: "repo stopped".into(),
        };
    };
    // However this function ends — even if its task is aborted at an
    // await — the repo hears that the connection is gone.
    let _closed = ClosedGuard { repo, conn };
    let period = ping_every.unwrap_or(Duration::from_secs(3600));
    let started = Instant::now();
    // Milliseconds since `started` when the peer was last heard from;
    // shared by the reading and writing halves below.
    let last_seen = AtomicU64::new(0);
    // Resolves when the repo cuts the peer off, to race writes with.
    let cut = outbound.cut_signal();

    // Reading and writing run side by side, so a write that waits on a slow
    // peer never stops us reading (two peers writing big frames to each
    // other at once cannot deadlock), and a peer that stops reading is cut
    // off after WRITE_TIMEOUT instead of holding its queue forever.
    let stop = {
        let reader = async {
            loop {
                let frame = stream.next().await;
                last_seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                match frame {
                    Some(Incoming::Binary(bytes)) => repo.received(conn, bytes),
                    Some(Incoming::Alive) => {}
                    Some(Incoming::Text) => {
                        return Stop::Close(
                            close_code::UNSUPPORTED,
                            "text frames are not part of the protocol; send binary CBOR".into(),
                        )
                    }
                    Some(Incoming::TooBig) => {
                        return Stop::Close(close_code::TOO_BIG, "message too big".into())
                    }
                    Some(Incoming::RateLimited) => {
                        return Stop::Close(close_code::POLICY, "rate limit exceeded".into())
                    }
                    Some(Incoming::Close) | None => return Stop::Gone("closed by peer".into()),
                    Some(Incoming::Error(e)) => {
                        return Stop::Gone(format!("connection error: {e}"))
                    }
                }
            }
        };
        let writer = async {
            let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
            loop {
                tokio::select! {
                    // (`next` puts being cut off ahead of what still waits.)
                    next = outbound.next() => match next {
                        Next::Cut(reason) => return Stop::Close(close_code::POLICY, reason),
                        Next::Item(Outbound::Frame(bytes)) => {
                            // Frames already queued behind this one go out
                            // in the same write: under load a peer gets one
                            // syscall for a burst instead of one per frame.
                            let mut close = None;
                            let burst = async {
                                let mut budget = BURST_BYTES.saturating_sub(bytes.len());
                                sink.feed(Outgoing::Binary(bytes)).await?;
                                while budget > 0 {
                                    match outbound.try_next() {
                                        Some(Outbound::Frame(more)) => {
                                            budget = budget.saturating_sub(more.len());
                                            sink.feed(Outgoing::Binary(more)).await?;
                                        }
                                        Some(Outbound::Close(code, reason)) => {
                                            close = Some((code, reason));
                                            break;
                                        }
                                        None => break,
                                    }
                                }
                                sink.flush().await
                            };
                            // A write stuck on a slow peer still yields to
                            // the repo cutting that peer off. (Boxed: held
                            // inline, the write and its timer would make
                            // every idle connection's task that much bigger.)
                            let write = Box::pin(tokio::time::timeout(WRITE_TIMEOUT, burst));
                            let written = tokio::select! {
                                biased;
                                reason = cut.cut() => return Stop::Close(close_code::POLICY, reason),
                                written = write => written,
                            };
                            match written {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => return Stop::Gone("write failed".into()),
                                Err(_) => return Stop::Gone("peer stopped reading (write timed out)".into()),
                            }
                            if let Some((code, reason)) = close {
                                return Stop::Close(code, reason);
                            }
                        }
                        Next::Item(Outbound::Close(code, reason)) => return Stop::Close(code, reason),
                        Next::Released => return Stop::Close(close_code::NORMAL, "shutting down".into()),
                    },
                    _ = ticker.tick(), if ping_every.is_some() => {
                        let seen = Duration::from_millis(last_seen.load(Ordering::Relaxed));
                        if started.elapsed().saturating_sub(seen) > period * 2 {
                            return Stop::Close(close_code::GOING_AWAY, "ping timeout".into());
                        }
                        let ping = Box::pin(tokio::time::timeout(WRITE_TIMEOUT, sink.send(Outgoing::Ping)));
                        if ping.await.map_or(true, |r| r.is_err()) {
                            return Stop::Gone("write failed".into());
                        }
                    }
                }
            }
        };
        tokio::select! {
            stop = reader => stop,
            stop = writer => stop,
        }
    };
    let reason = match stop {
        Stop::Gone(reason) => reason,
        Stop::Close(code, reason) => {
            let frame = Outgoing::Close(code, truncate(&reason));
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(frame)).await;
            reason
        }
    };
    Ended { reason }
}

/// How long one write may wait for the peer to accept it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How many bytes of queued frames one write gathers at most.
const BURST_BYTES: usize = 256 * 1024;

/// The WebSocket write buffer (tungstenite's `write_buffer_size`): frames
/// fed in one burst collect here and leave in one write when it fills or
/// the burst is flushed.
pub const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// A WebSocket message limit for clients that have no configured one.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The socket settings of every Converge WebSocket, client and server: a
/// small read buffer (tungstenite's default 128 KiB per connection would
/// dominate a busy relay's memory), a write buffer that gathers a burst of
/// frames into one write, and the message limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketSettings {
    /// Read buffer per connection, in bytes.
    pub read_buffer: usize,
    /// Write buffer: frames collect here until it fills or is flushed.
    pub write_buffer: usize,
    /// Most bytes the write buffer may hold before writes fail.
    pub max_write_buffer: usize,
    /// Largest message (and frame) accepted.
    pub max_message: usize,
}

impl SocketSettings {
    /// The settings for a given message limit.
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            read_buffer: 4 * 1024,
            write_buffer: WRITE_BUFFER_BYTES,
            max_write_buffer: max_message_bytes.saturating_mul(2).max(1 << 20),
            max_message: max_message_bytes,
        }
    }

    /// The same, as tungstenite's configuration.
    pub fn tungstenite(&self) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(self.read_buffer)
            .write_buffer_size(self.write_buffer)
            .max_write_buffer_size(self.max_write_buffer)
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message))
    }
}

/// Why a connection ends.
enum Stop {
    /// The connection is already unusable.
    Gone(String),
    /// Close it with this code and reason.
    Close(u16, String),
}

/// Tells the repo a connection ended when dropped.
struct ClosedGuard<'a> {
    repo: &'a Repo,
    conn: crate::engine::ConnectionId,
}

impl Drop for ClosedGuard<'_> {
    fn drop(&mut self) {
        self.repo.closed(self.conn);
    }
}

/// Close reasons must fit in a control frame (123 bytes).
fn truncate(reason: &str) -> String {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}
