//! WebSocket client transport (tokio-tungstenite) with reconnect.
//!
//! [`connect`] keeps a connection to one server up for as long as the
//! returned [`Connection`] lives: when the socket fails or closes it dials
//! again after an exponential backoff (100 ms doubling to 10 s) with random
//! jitter, so a fleet of clients does not reconnect in lockstep.
//! [`connect_with_token`] presents a token (`Authorization: Bearer`) to a
//! relay that requires one, asking for it anew before every dial, so an
//! application can hand a fresh token to a reconnect after the relay
//! closed an expired one (close code 4401).

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::{drive, Incoming, Outgoing};
use crate::engine::{Direction, Grant};
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

/// Supplies the token for the next dial (`None`: connect without one).
pub type TokenSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Connects `repo` to the automerge-repo server at `url` (`ws://…`) and
/// keeps the connection up.
pub fn connect(repo: Repo, url: String) -> Connection {
    connect_inner(repo, url, None)
}

/// [`connect`] to a relay that wants a token: `token` is called before
/// every dial and its answer sent as `Authorization: Bearer <token>`.
pub fn connect_with_token(
    repo: Repo,
    url: String,
    token: impl Fn() -> Option<String> + Send + Sync + 'static,
) -> Connection {
    connect_inner(repo, url, Some(Arc::new(token)))
}

/// The request for one dial: `url`, with the token if there is one.
fn request(
    url: &str,
    token: Option<&TokenSource>,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, WsError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{header::AUTHORIZATION, HeaderValue};
    let mut request = url.into_client_request()?;
    if let Some(token) = token.and_then(|source| source()) {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| WsError::HttpFormat(e.into()))?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    Ok(request)
}

fn connect_inner(repo: Repo, url: String, token: Option<TokenSource>) -> Connection {
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let config = super::SocketSettings::new(super::DEFAULT_MAX_MESSAGE_BYTES).tungstenite();
            let dial = async {
                let request = request(&url, token.as_ref())?;
                tokio_tungstenite::connect_async_with_config(request, Some(config), true).await
            };
            match dial.await {
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
                        Grant::everything().into(),
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
