//! WebSocket client transport (tokio-tungstenite) with reconnect.
//!
//! [`connect`] keeps a connection to one server up for as long as the
//! returned [`Connection`] lives: when the socket fails or closes it dials
//! again after an exponential backoff (100 ms doubling to 10 s) with random
//! jitter, so a fleet of clients does not reconnect in lockstep.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::{drive, Incoming, Outgoing};
use crate::engine::Direction;
use crate::runtime::{random_seed, Repo};

/// A kept-up connection to a server; dropping it (or calling
/// [`Connection::close`]) stops reconnecting and closes the socket.
#[derive(Debug)]
pub struct Connection {
    task: JoinHandle<()>,
}

impl Connection {
    /// Stops the connection.
    pub fn close(self) {
        self.task.abort();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects `repo` to the automerge-repo server at `url` (`ws://…`) and
/// keeps the connection up.
pub fn connect(repo: Repo, url: String) -> Connection {
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let config = super::SocketSettings::new(super::DEFAULT_MAX_MESSAGE_BYTES).tungstenite();
            match tokio_tungstenite::connect_async_with_config(&url, Some(config), true).await {
                Ok((socket, _)) => {
                    let connected_at = tokio::time::Instant::now();
                    let (sink, stream) = socket.split();
                    let stream = stream.map(|m| match m {
                        Ok(Message::Binary(b)) => Incoming::Binary(b.to_vec()),
                        Ok(Message::Text(_)) => Incoming::Text,
                        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
                            Incoming::Alive
                        }
                        Ok(Message::Close(_)) => Incoming::Close,
                        Err(WsError::Capacity(_)) => Incoming::TooBig,
                        Err(e) => Incoming::Error(e.to_string()),
                    });
                    let sink = sink.with(|o: Outgoing| {
                        futures::future::ready(Ok::<_, WsError>(match o {
                            Outgoing::Binary(b) => Message::Binary(b.into()),
                            Outgoing::Ping => Message::Ping(Vec::new().into()),
                            Outgoing::Close(code, reason) => Message::Close(Some(CloseFrame {
                                code: CloseCode::from(code),
                                reason: reason.into(),
                            })),
                        }))
                    });
                    let ended = drive(
                        &repo,
                        Direction::Outgoing,
                        Some(url.clone()),
                        Box::pin(stream),
                        Box::pin(sink),
                        Some(Duration::from_secs(5)),
                    )
                    .await;
                    tracing::info!(%url, reason = %ended.reason, "connection ended; reconnecting");
                    // Only a connection that lasted resets the backoff; a
                    // server that drops us at once is not hammered.
                    if connected_at.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(100);
                    }
                }
                Err(e) => tracing::debug!(%url, error = %e, "connect failed"),
            }
            let jitter =
                Duration::from_millis(random_seed() % (backoff.as_millis() as u64 / 2 + 1));
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    });
    Connection { task }
}
