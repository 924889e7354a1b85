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

use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;

use crate::engine::Direction;
use crate::runtime::{Outbound, Repo};

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

/// WebSocket close codes used by Converge.
pub mod close_code {
    /// Normal closure (shutting down).
    pub const NORMAL: u16 = 1000;
    /// Going away (peer stopped answering pings).
    pub const GOING_AWAY: u16 = 1001;
    /// Unsupported data (a text frame).
    pub const UNSUPPORTED: u16 = 1003;
    /// Policy violation (a protocol error; the reason says which).
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Who ended it and why.
    pub reason: String,
}

/// Runs one connection until it ends. `remote` names the other end (for
/// session listings); `ping_every` sends a ping at that interval and gives
/// up on a peer silent for two intervals.
pub async fn drive<St, Si>(
    repo: &Repo,
    direction: Direction,
    remote: Option<String>,
    mut stream: St,
    mut sink: Si,
    ping_every: Option<Duration>,
) -> Ended
where
    St: Stream<Item = Incoming> + Unpin,
    Si: Sink<Outgoing> + Unpin,
{
    let Ok((conn, mut outbound)) = repo.open_connection(direction, remote) else {
        return Ended {
            reason: "repo stopped".into(),
        };
    };
    // However this function ends — even if its task is aborted at an
    // await — the repo hears that the connection is gone.
    let _closed = ClosedGuard { repo, conn };
    let period = ping_every.unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    let mut last_seen = Instant::now();
    let ended = loop {
        tokio::select! {
            frame = stream.next() => {
                last_seen = Instant::now();
                match frame {
                    Some(Incoming::Binary(bytes)) => repo.received(conn, bytes),
                    Some(Incoming::Alive) => {}
                    Some(Incoming::Text) => {
                        let reason = "text frames are not part of the protocol; send binary CBOR".to_owned();
                        let _ = sink.send(Outgoing::Close(close_code::UNSUPPORTED, reason.clone())).await;
                        break reason;
                    }
                    Some(Incoming::TooBig) => {
                        let reason = "message too big".to_owned();
                        let _ = sink.send(Outgoing::Close(close_code::TOO_BIG, reason.clone())).await;
                        break reason;
                    }
                    Some(Incoming::Close) | None => break "closed by peer".to_owned(),
                    Some(Incoming::Error(e)) => break format!("connection error: {e}"),
                }
            }
            out = outbound.recv() => match out {
                Some(Outbound::Frame(bytes)) => {
                    if let Err(_e) = sink.send(Outgoing::Binary(bytes)).await {
                        break "write failed".to_owned();
                    }
                }
                Some(Outbound::Close(reason)) => {
                    let _ = sink.send(Outgoing::Close(close_code::POLICY, truncate(&reason))).await;
                    break reason;
                }
                None => {
                    let _ = sink.send(Outgoing::Close(close_code::NORMAL, "shutting down".into())).await;
                    break "repo stopped".to_owned();
                }
            },
            _ = ticker.tick(), if ping_every.is_some() => {
                if last_seen.elapsed() > period * 2 {
                    let _ = sink.send(Outgoing::Close(close_code::GOING_AWAY, "ping timeout".into())).await;
                    break "ping timeout".to_owned();
                }
                if sink.send(Outgoing::Ping).await.is_err() {
                    break "write failed".to_owned();
                }
            }
        }
    };
    Ended { reason: ended }
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
